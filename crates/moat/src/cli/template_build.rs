//! `moat template build`: a template built by the server from a Dockerfile and a context
//! directory, its log followed until it ends.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use moat_client::types::{BuildStatus, CreateBuild};
use moat_client::{Body, Client};
use sha2::{Digest as _, Sha256};

use super::output;
use super::remote::{self, Format, key_values};
use super::sandbox::ResourceFlags;

/// Largest Dockerfile read.
const MAX_DOCKERFILE_BYTES: u64 = 1 << 20;
/// How often the log is asked for while the build runs.
const POLL: Duration = Duration::from_millis(200);

/// Arguments of `moat template build`.
#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// The template to make, `name` or `name:tag` (replaced if an earlier build made it).
    name: String,
    /// Another tag of the name the build writes too (repeatable; `default`: the name alone).
    #[arg(long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    /// The build context: the directory `COPY` and `ADD` read from.
    #[arg(default_value = ".")]
    context: PathBuf,
    /// The Dockerfile [default: Dockerfile in the context].
    #[arg(long, short = 'f', value_name = "FILE")]
    file: Option<PathBuf>,
    /// A build argument for the Dockerfile's ARG (repeatable).
    #[arg(long = "build-arg", value_name = "K=V")]
    build_args: Vec<String>,
    /// The backend the steps run on and the template uses.
    #[arg(long, value_name = "KIND")]
    backend: Option<String>,
    /// Run every step again, reusing nothing from earlier builds.
    #[arg(long)]
    no_cache: bool,
    /// Longest the build may take, in seconds [default: 1800].
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    /// Return once the build is accepted, without following its log.
    #[arg(long)]
    detach: bool,
    /// Limits of each RUN step's sandbox.
    #[command(flatten)]
    resources: ResourceFlags,
    /// The network of RUN steps.
    #[command(flatten)]
    network: super::network_args::NetworkArgs,
}

/// Runs `moat template build`.
pub async fn run(client: &Client, a: &BuildArgs, format: Format) -> Result<ExitCode> {
    let dockerfile_path = a
        .file
        .clone()
        .unwrap_or_else(|| a.context.join("Dockerfile"));
    let dockerfile = read_dockerfile(&dockerfile_path)?;
    let archive = context_archive(&a.context)?;
    let digest = archive.digest.clone();
    if !client.has_build_context(&digest).await? {
        let file = tokio::fs::File::open(archive.file.path())
            .await
            .context("reopening the context archive")?;
        client
            .put_build_context(&digest, Body::from_reader(file))
            .await?;
    }
    let req = CreateBuild {
        template: a.name.clone(),
        tags: a.tags.clone(),
        dockerfile,
        context: Some(digest),
        contexts: Default::default(),
        from_templates: Default::default(),
        start: None,
        ready: None,
        args: key_values("--build-arg", &a.build_args)?
            .into_iter()
            .collect(),
        backend: a.backend.clone(),
        resources: a.resources.request()?,
        network: a.network.to_v1()?,
        timeout_secs: a.timeout,
        no_cache: a.no_cache,
    };
    let build = client.create_build(&req).await?;
    if a.detach {
        match format {
            Format::Json => remote::print_json(&build)?,
            Format::Table => output::println(&build.id)?,
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut offset = 0;
    let mut stderr = std::io::stderr();
    loop {
        let logs = client.build_logs(&build.id, offset).await?;
        if !logs.text.is_empty() {
            // The log goes to standard error, so standard output holds only the result.
            let _ = stderr.write_all(logs.text.as_bytes());
        }
        offset = logs.next_offset;
        if logs.done {
            break;
        }
        if logs.text.is_empty() {
            tokio::time::sleep(POLL).await;
        }
    }
    let build = client.get_build(&build.id).await?;
    match format {
        Format::Json => remote::print_json(&build)?,
        Format::Table if build.status == BuildStatus::Succeeded => {
            output::println(&build.template)?;
        }
        Format::Table => {}
    }
    if build.status != BuildStatus::Succeeded {
        bail!(
            "build {} {}: {}",
            build.id,
            match build.status {
                BuildStatus::Cancelled => "was cancelled",
                _ => "failed",
            },
            build.error.unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn read_dockerfile(path: &Path) -> Result<String> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("reading the Dockerfile {}", path.display()))?;
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut std::io::Read::take(file, MAX_DOCKERFILE_BYTES + 1),
        &mut text,
    )
    .with_context(|| format!("reading the Dockerfile {}", path.display()))?;
    if text.len() as u64 > MAX_DOCKERFILE_BYTES {
        bail!("the Dockerfile {} is over 1 MiB", path.display());
    }
    Ok(text)
}

/// A context directory as a tar archive in a temporary file, and the archive's digest.
struct ContextArchive {
    file: tempfile::NamedTempFile,
    digest: String,
}

/// Archives the directory `dir`: its entries sorted by name (so an unchanged directory gives
/// the same archive, uploaded once), links stored as links, other special files and what its
/// `.dockerignore` names left out.
fn context_archive(dir: &Path) -> Result<ContextArchive> {
    let meta =
        std::fs::metadata(dir).with_context(|| format!("the build context {}", dir.display()))?;
    if !meta.is_dir() {
        bail!("the build context {} is not a directory", dir.display());
    }
    let file = tempfile::Builder::new()
        .prefix("moat-context-")
        .suffix(".tar")
        .tempfile()
        .context("making a temporary file for the context archive")?;
    let out = HashingWriter {
        inner: std::io::BufWriter::new(file.reopen().context("opening the context archive")?),
        hash: Sha256::new(),
    };
    let mut tar = tar::Builder::new(out);
    tar.follow_symlinks(false);
    tar.mode(tar::HeaderMode::Complete);
    let ignore = super::dockerignore::Ignore::read(dir)?;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut names: Vec<_> = std::fs::read_dir(dir.join(&rel))
            .with_context(|| format!("listing {}", dir.join(&rel).display()))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("listing {}", dir.join(&rel).display()))?;
        names.sort();
        // Reversed onto the stack so directories are visited in name order.
        let mut subdirs = Vec::new();
        for name in names {
            let path = rel.join(&name);
            let full = dir.join(&path);
            let meta = std::fs::symlink_metadata(&full)
                .with_context(|| format!("reading {}", full.display()))?;
            let kind = meta.file_type();
            if !(kind.is_dir() || kind.is_file() || kind.is_symlink()) {
                continue;
            }
            let ignored = ignore.ignores(&path);
            if !ignored {
                tar.append_path_with_name(&full, &path)
                    .with_context(|| format!("archiving {}", full.display()))?;
            }
            // An ignored directory is walked only if a pattern may take something in it back.
            if kind.is_dir() && (!ignored || ignore.has_exceptions()) {
                subdirs.push(path);
            }
        }
        stack.extend(subdirs.into_iter().rev());
    }
    let out = tar.into_inner().context("finishing the context archive")?;
    let HashingWriter { mut inner, hash } = out;
    inner.flush().context("writing the context archive")?;
    let hex: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok(ContextArchive {
        file,
        digest: format!("sha256:{hex}"),
    })
}

/// A writer that hashes what passes through it.
struct HashingWriter<W> {
    inner: W,
    hash: Sha256,
}

impl<W: std::io::Write> std::io::Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
