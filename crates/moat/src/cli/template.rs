//! `moat template …`: templates on a moat server.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use super::output;

use anyhow::{Context, Result, bail};
use moat_client::Client;
use moat_client::types::{CreateTemplate, Rootfs, Template, TemplateSpec};
use moat_proto::units::{format_size as fmt_bytes, parse_cpus, parse_duration, parse_size};

use super::remote::{self, Format, Remote, key_values, whole_secs};
use super::sandbox::ResourceFlags;
use super::table::{self, Table};

/// A pull's progress on one line of standard error (a terminal): bytes of the layers
/// fetched so far, of all, and the layers unpacked.
#[derive(Default)]
struct PullBar {
    total: u64,
    layers: u32,
    received: std::collections::BTreeMap<u32, u64>,
    sizes: std::collections::BTreeMap<u32, u64>,
    unpacked: u32,
    shown: bool,
}

impl PullBar {
    fn show(&mut self, event: &moat_client::types::TemplateCreateEvent) {
        use moat_client::types::TemplateCreateEvent as E;
        match event {
            E::Resolved { layers, bytes } => (self.layers, self.total) = (*layers, *bytes),
            E::Progress {
                layer,
                received,
                size,
            } => {
                self.received.insert(*layer, *received);
                self.sizes.insert(*layer, *size);
            }
            E::Unpacked { layer } => {
                self.unpacked += 1;
                // Fetched whole (its last byte counts may not have been sent).
                if let Some(size) = self.sizes.get(layer) {
                    self.received.insert(*layer, *size);
                }
            }
            E::Template { .. } | E::Error(_) => return,
        }
        let got: u64 = self.received.values().sum();
        let percent = (got.saturating_mul(100))
            .checked_div(self.total)
            .unwrap_or(100)
            .min(100);
        let line = format!(
            "pulling: {percent:>3}% {} of {}, {}/{} layers ready",
            moat_proto::units::describe_size(got),
            moat_proto::units::describe_size(self.total),
            self.unpacked,
            self.layers
        );
        let mut err = std::io::stderr();
        let _ = write!(err, "\r\x1b[2K{line}");
        let _ = err.flush();
        self.shown = true;
    }

    fn clear(&self) {
        if self.shown {
            let mut err = std::io::stderr();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
        }
    }
}

/// Largest spec file read.
const MAX_SPEC_BYTES: u64 = 1 << 20;

/// Arguments of `moat template`.
#[derive(Debug, clap::Args)]
pub struct TemplateArgs {
    #[command(flatten)]
    remote: Remote,
    #[command(subcommand)]
    command: TemplateCommand,
}

#[derive(Debug, clap::Subcommand)]
enum TemplateCommand {
    /// Define a template from a JSON spec file and/or flags (flags win).
    Create(Box<CreateArgs>),
    /// Build a template from a Dockerfile and a context directory, following its log.
    Build(Box<super::template_build::BuildArgs>),
    /// List the templates this key's tenant sees.
    #[command(visible_alias = "list")]
    Ls,
    /// Show one template.
    #[command(visible_alias = "show")]
    Get {
        /// Its name.
        name: String,
    },
    /// Copy a template to tags of its name (NAME:TAG), moving tags that exist.
    Tag {
        /// The template to copy (`name` or `name:tag`).
        name: String,
        /// The tags (`default`: the name alone, over what a build made).
        #[arg(required = true)]
        tags: Vec<String>,
    },
    /// Delete templates.
    #[command(visible_alias = "delete")]
    Rm {
        /// Their names.
        #[arg(required = true)]
        names: Vec<String>,
        /// Delete even while sandboxes made from it run (they keep running).
        #[arg(long, short = 'f')]
        force: bool,
    },
}

#[derive(Debug, clap::Args)]
struct CreateArgs {
    /// Its name: a-z, 0-9, '.', '_', '-', at most 63 characters.
    name: String,
    /// A JSON template spec (`{"rootfs": "host", …}`; see docs/API.md); `-` reads stdin.
    #[arg(long, short = 'f', value_name = "FILE")]
    from_file: Option<String>,
    /// Root filesystem: `host`, or a directory on the server's host (admin keys only).
    #[arg(long, conflicts_with = "image")]
    rootfs: Option<String>,
    /// Root filesystem from an OCI image (`registry/name:tag` or `@sha256:…`), pulled by the
    /// server now; its environment and working directory become the template's defaults.
    #[arg(long, value_name = "REF")]
    image: Option<String>,
    /// Default limits of its sandboxes.
    #[command(flatten)]
    resources: ResourceFlags,
    /// Environment variable of every command (repeatable).
    #[arg(long = "env", short = 'e', value_name = "K=V")]
    env: Vec<String>,
    /// The user commands run as: user or root.
    #[arg(long)]
    user: Option<String>,
    /// Default working directory of commands.
    #[arg(long, short = 'w', value_name = "DIR")]
    workdir: Option<String>,
    /// A script started in the background when a sandbox starts.
    #[arg(long, value_name = "SCRIPT")]
    start: Option<String>,
    /// A script that must exit 0 before a sandbox counts as ready.
    #[arg(long, value_name = "SCRIPT")]
    ready: Option<String>,
    /// How long `--ready` may take to succeed, e.g. 30s.
    #[arg(long, value_name = "DURATION")]
    ready_timeout: Option<String>,
    /// Time to live of its sandboxes, e.g. 10m.
    #[arg(long, value_name = "DURATION")]
    timeout: Option<String>,
    /// Sandboxes kept started and ready for claims.
    #[arg(long)]
    pool_size: Option<u32>,
    /// The isolation backend of its sandboxes (native, gvisor); the server's default otherwise.
    #[arg(long, value_name = "KIND")]
    backend: Option<String>,
    /// A snapshot with memory its sandboxes start from, already initialised (gvisor).
    #[arg(long, value_name = "ID")]
    snapshot: Option<String>,
    #[command(flatten)]
    network: super::network_args::NetworkArgs,
}

/// Runs `moat template …`.
pub fn main(args: TemplateArgs) -> ExitCode {
    let TemplateArgs { remote, command } = args;
    remote::block_on(async move {
        let client = remote.client()?;
        let format = remote.output;
        match command {
            TemplateCommand::Create(a) => {
                let req = CreateTemplate {
                    name: a.name.clone(),
                    spec: spec(&a)?,
                };
                let template = if a.image.is_some() && std::io::stderr().is_terminal() {
                    let mut bar = PullBar::default();
                    let made = client
                        .create_template_with_progress(&req, |e| bar.show(e))
                        .await;
                    bar.clear();
                    made?
                } else {
                    client.create_template(&req).await?
                };
                match format {
                    Format::Json => remote::print_json(&template)?,
                    Format::Table => output::println(template.name)?,
                }
            }
            TemplateCommand::Ls => {
                let templates = client.list_templates().await?;
                match format {
                    Format::Json => remote::print_json(&templates)?,
                    Format::Table => output::print(template_table(&templates))?,
                }
            }
            TemplateCommand::Get { name } => {
                let template = client.get_template(&name).await?;
                match format {
                    Format::Json => remote::print_json(&template)?,
                    Format::Table => output::print(describe(&template)?)?,
                }
            }
            TemplateCommand::Tag { name, tags } => {
                let written = client.tag_template(&name, &tags).await?;
                match format {
                    Format::Json => remote::print_json(&written)?,
                    Format::Table => {
                        for t in &written {
                            output::println(&t.name)?;
                        }
                    }
                }
            }
            TemplateCommand::Rm { names, force } => return rm(&client, &names, force).await,
            TemplateCommand::Build(a) => {
                return super::template_build::run(&client, &a, format).await;
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// The spec of the file (if any) with the flags over it.
fn spec(a: &CreateArgs) -> Result<TemplateSpec> {
    let mut spec = match &a.from_file {
        Some(path) => {
            let text = read_spec(path)?;
            serde_json::from_str(&text).with_context(|| format!("{path}: not a template spec"))?
        }
        None => TemplateSpec::new(Rootfs::Host),
    };
    if let Some(image) = &a.image {
        spec.rootfs = Rootfs::Image(image.clone());
    }
    if let Some(r) = &a.rootfs {
        spec.rootfs = match r.as_str() {
            "host" => Rootfs::Host,
            dir if dir.starts_with('/') => Rootfs::Dir(dir.to_owned()),
            other => bail!("--rootfs {other:?}: `host` or an absolute directory"),
        };
    }
    if let Some(flags) = a.resources.request()? {
        // Checked here so a typo fails before the request.
        if let Some(m) = &flags.memory {
            parse_size(m).context("--memory")?;
        }
        if let Some(d) = &flags.disk {
            parse_size(d).context("--disk")?;
        }
        let mut r = spec.resources.take().unwrap_or_default();
        r.memory = flags.memory.or(r.memory);
        r.cpus = flags.cpus.or(r.cpus);
        r.pids = flags.pids.or(r.pids);
        r.disk = flags.disk.or(r.disk);
        spec.resources = Some(r);
    }
    spec.env.extend(key_values("--env", &a.env)?);
    let secs = |what: &str, d: &Option<String>| -> Result<Option<u64>> {
        d.as_deref()
            .map(|t| parse_duration(t).map(whole_secs))
            .transpose()
            .with_context(|| what.to_owned())
    };
    for (field, value) in [
        (&mut spec.user, &a.user),
        (&mut spec.workdir, &a.workdir),
        (&mut spec.start, &a.start),
        (&mut spec.ready, &a.ready),
    ] {
        if value.is_some() {
            field.clone_from(value);
        }
    }
    if let Some(s) = secs("--ready-timeout", &a.ready_timeout)? {
        spec.ready_timeout_secs = Some(s);
    }
    if let Some(s) = secs("--timeout", &a.timeout)? {
        spec.timeout_secs = Some(s);
    }
    if let Some(p) = a.pool_size {
        spec.pool_size = p;
    }
    if let Some(b) = &a.backend {
        spec.backend = Some(b.clone());
    }
    if let Some(s) = &a.snapshot {
        spec.snapshot = Some(s.clone());
    }
    if let Some(n) = a.network.to_v1()? {
        spec.network = Some(n);
    }
    Ok(spec)
}

fn read_spec(path: &str) -> Result<String> {
    use std::io::Read;
    let mut text = String::new();
    let read = if path == "-" {
        std::io::stdin()
            .take(MAX_SPEC_BYTES + 1)
            .read_to_string(&mut text)
    } else {
        std::fs::File::open(path).and_then(|f| f.take(MAX_SPEC_BYTES + 1).read_to_string(&mut text))
    };
    read.with_context(|| format!("reading {path}"))?;
    if text.len() as u64 > MAX_SPEC_BYTES {
        bail!("{path}: larger than {} KiB", MAX_SPEC_BYTES >> 10);
    }
    Ok(text)
}

fn rootfs(r: &Rootfs) -> String {
    match r {
        Rootfs::Host => "host".into(),
        Rootfs::Dir(d) => d.clone(),
        Rootfs::Image(r) => format!("image {r}"),
        Rootfs::Build(d) => format!("built {d}"),
    }
}

/// The template's default memory and CPUs as shown (`-` where the engine's default applies).
fn defaults(spec: &TemplateSpec) -> (String, String) {
    let r = spec.resources.clone().unwrap_or_default();
    let memory = r
        .memory
        .as_deref()
        .and_then(|m| parse_size(m).ok())
        .map_or_else(|| "-".into(), fmt_bytes);
    let cpus = r
        .cpus
        .and_then(|c| parse_cpus(&c.to_string()).ok())
        .map_or_else(|| "-".into(), table::cpus);
    (memory, cpus)
}

/// Templates as a table for people.
pub fn template_table(templates: &[Template]) -> String {
    let mut t = Table::new(&[
        "NAME", "BUILTIN", "ROOTFS", "MEMORY", "CPUS", "POOL", "CREATED",
    ]);
    for tpl in templates {
        let (memory, cpus) = defaults(&tpl.spec);
        t.row(vec![
            tpl.name.clone(),
            if tpl.builtin { "yes" } else { "no" }.into(),
            rootfs(&tpl.spec.rootfs),
            memory,
            cpus,
            format!("{}/{}", tpl.pool.ready, tpl.pool.target),
            table::time(tpl.created_at),
        ]);
    }
    t.render()
}

fn describe(t: &Template) -> Result<String> {
    let (memory, cpus) = defaults(&t.spec);
    let mut out = table::fields(&[
        ("name", t.name.clone()),
        ("builtin", if t.builtin { "yes" } else { "no" }.into()),
        ("rootfs", rootfs(&t.spec.rootfs)),
        (
            "backend",
            t.spec
                .backend
                .clone()
                .unwrap_or_else(|| "(server default)".into()),
        ),
        ("memory", memory),
        ("cpus", cpus),
        ("pool", format!("{}/{} ready", t.pool.ready, t.pool.target)),
        ("created", table::time(t.created_at)),
    ]);
    out.push_str("spec:\n");
    out.push_str(&serde_json::to_string_pretty(&t.spec)?);
    out.push('\n');
    Ok(out)
}

async fn rm(client: &Client, names: &[String], force: bool) -> Result<ExitCode> {
    let mut failed = false;
    for name in names {
        match client.delete_template(name, force).await {
            Ok(()) => output::println(name)?,
            Err(e) => {
                failed = true;
                remote::report(&anyhow::Error::new(e).context(format!("deleting {name}")));
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use moat_client::types::{PoolStatus, ResourceRequest};

    use super::*;

    #[test]
    fn template_tables() {
        let mut spec: TemplateSpec = serde_json::from_str(r#"{"rootfs":"host"}"#).unwrap();
        let host = Template {
            name: "host".into(),
            builtin: true,
            build_id: None,
            spec: spec.clone(),
            created_at: 0,
            pool: PoolStatus::default(),
        };
        spec.resources = Some(ResourceRequest {
            memory: Some("256M".into()),
            cpus: Some(0.5),
            ..Default::default()
        });
        spec.rootfs = Rootfs::Dir("/srv/py".into());
        let py = Template {
            name: "py".into(),
            builtin: false,
            build_id: None,
            spec,
            created_at: 86_400_000,
            pool: PoolStatus {
                target: 2,
                ready: 1,
                evicted: 0,
            },
        };
        assert_eq!(
            template_table(&[host, py]),
            "NAME  BUILTIN  ROOTFS   MEMORY  CPUS  POOL  CREATED\n\
             host  yes      host     -       -     0/0   1970-01-01 00:00:00\n\
             py    no       /srv/py  256M    0.5   1/2   1970-01-02 00:00:00\n"
        );
    }
}
