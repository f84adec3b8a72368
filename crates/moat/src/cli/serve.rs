//! `moat serve`: the HTTP API over the isolation backends this build has (native), with its
//! state in the data dir.

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use moat_backend_gvisor::{GvisorBackend, GvisorOptions};
use moat_backend_native::{NativeBackend, NativeOptions};
use moat_engine::backend::Backends;
use moat_engine::blobs::BlobLocation;
use moat_engine::error::EngineError;
use moat_engine::images::registry::{Credentials, RegistryAccess};
use moat_engine::manager::{
    EgressAccess, JobOptions, ManagerOptions, SandboxManager, ShutdownMode,
};
use moat_engine::network::policy::{self, IpNet};
use moat_engine::store::{Quotas, Role, Secret, Store, StoreError};
use moat_server::ServerOptions;

use super::data_dir_lock;

/// Options of `moat serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address and port to listen on (loopback by default: expose it deliberately).
    #[arg(long, default_value = moat_server::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Where the database and the first admin key live (created 0700).
    #[arg(long, default_value = "/var/lib/moat")]
    data_dir: PathBuf,
    /// Memory all warm-pool members together may use (what they hold, not their limits):
    /// `512M`, `2G`.
    #[arg(long, default_value = "1G", value_parser = parse_size_arg)]
    pool_memory: u64,
    /// Free space kept on the data directory's filesystem: a snapshot or fork that would leave
    /// less is refused (507).
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = parse_size_arg)]
    min_free_disk: u64,
    /// Bytes of snapshots each tenant may keep, unless the key that makes one has a
    /// `max_snapshot_bytes` quota.
    #[arg(long, value_name = "SIZE", default_value = "10G", value_parser = parse_size_arg)]
    snapshot_quota: u64,
    /// Log lines as text for people or JSON for collectors (on stderr).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Requests per minute per API key, for keys without a quota of their own (bursts of
    /// 5 seconds' worth pass).
    #[arg(long, value_name = "N", default_value_t = moat_server::DEFAULT_REQUESTS_PER_MINUTE,
          value_parser = clap::value_parser!(u32).range(1..))]
    rate_limit: u32,
    /// Time to live, in seconds, of a sandbox whose request names none.
    #[arg(long, value_name = "SECS", default_value_t = ManagerOptions::default().default_ttl.as_secs())]
    default_ttl: u64,
    /// Longest time to live, in seconds, a request may ask for.
    #[arg(long, value_name = "SECS", default_value_t = ManagerOptions::default().max_ttl.as_secs())]
    max_ttl: u64,
    /// Domain of sandbox addresses (`<port>-<sandbox>.<domain>`, what E2B clients are told);
    /// default `localhost:<port of --listen>`.
    #[arg(long, value_name = "HOST[:PORT]", value_parser = parse_domain)]
    domain: Option<String>,
    /// What a stop (SIGTERM, SIGINT) does with running sandboxes: destroy them, or keep them
    /// running for the next `moat serve` on this data dir to take over (warm-pool members are
    /// always destroyed).
    #[arg(long, value_enum, default_value_t = OnShutdown::Destroy)]
    on_shutdown: OnShutdown,
    /// How long the record of an ended sandbox is kept (its state, reason and metadata, for
    /// `GET` and listings) before it is deleted: `24h`, `30m`, `10s`.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_retention)]
    retention: Duration,
    /// Where jobs keep their inputs, outputs and logs: `s3://BUCKET/PREFIX` (endpoint,
    /// region and credentials from the `AWS_*` variables: `AWS_ENDPOINT`, `AWS_ALLOW_HTTP`,
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`) or a directory; the data
    /// dir's `blobs` when absent.
    #[arg(long, value_name = "URL|DIR")]
    blob_store: Option<String>,
    /// Job attempts running at once; four per CPU when absent.
    #[arg(long, value_name = "N")]
    job_workers: Option<usize>,
    /// How long a finished job, its outputs and logs are kept: `7d`, `36h`, `30m`, `90s`.
    #[arg(long, value_name = "DURATION", default_value = "7d", value_parser = parse_long_duration)]
    job_retention: Duration,
    /// Bytes each tenant's jobs may keep: blobs (uploads, job inputs, outputs and logs) and
    /// the jobs' records.
    #[arg(long, value_name = "SIZE", default_value = "10G", value_parser = parse_size_arg)]
    job_quota: u64,
    /// Let jobs' webhooks go to private, loopback and link-local addresses (the host's own
    /// network). Off by default: a webhook URL is the tenant's to choose.
    #[arg(long)]
    job_webhooks_to_private: bool,
    /// Queued and running jobs each tenant may have.
    #[arg(long, value_name = "N", default_value_t = moat_engine::manager::DEFAULT_MAX_UNFINISHED_JOBS)]
    max_jobs: u64,
    /// Jobs each tenant may keep in any state: finished ones count until deleted or past
    /// `--job-retention`.
    #[arg(long, value_name = "N", default_value_t = moat_engine::manager::DEFAULT_MAX_KEPT_JOBS)]
    max_kept_jobs: u64,
    /// Make a sandbox's own services (ports other than 49983 and 49999) need its traffic
    /// access token unless its create asks for public traffic; by default they are reachable
    /// by anyone who knows the sandbox's address.
    #[arg(long)]
    private_traffic: bool,
    /// The isolation backend of templates that name none (one of: native, gvisor).
    #[arg(
        long = "default-backend",
        alias = "backend",
        value_name = "KIND",
        default_value = DEFAULT_BACKEND
    )]
    backend: String,
    /// The gVisor platform of the gvisor backend (systrap, kvm or ptrace); by default the best
    /// that works here.
    #[arg(long, value_name = "PLATFORM")]
    gvisor_platform: Option<String>,
    /// Bytes a second each sandbox with a network may move each way through its connections
    /// together (e.g. 10M); no limit by default.
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    egress_bandwidth: Option<u64>,
    /// Who may give sandboxes network access: all keys, admin keys only, or none (every
    /// sandbox has no network).
    #[arg(long, value_enum, default_value_t = Egress::All)]
    egress: Egress,
    /// A network no sandbox may reach, whatever its policy (repeatable; `ADDR` or
    /// `ADDR/PREFIX`): the host's public address where the cloud maps one to it by 1:1 NAT,
    /// a NAT64 gateway's network-specific prefix, a network of the site's. Webhooks are not
    /// sent there either.
    #[arg(long, value_name = "NET")]
    egress_deny: Vec<IpNet>,
    /// A registry (`HOST:PORT`) reached over plain HTTP, for templates from images
    /// (repeatable); loopback registries always are.
    #[arg(long, value_name = "HOST:PORT")]
    insecure_registry: Vec<String>,
    /// A registry every key may make templates from (repeatable; besides docker.io, ghcr.io,
    /// quay.io, registry.k8s.io, gcr.io, mcr.microsoft.com and public.ecr.aws). Admin keys
    /// may use any registry.
    #[arg(long, value_name = "HOST[:PORT]")]
    allow_registry: Vec<String>,
    /// A JSON file of registry credentials, `{"HOST[:PORT]": {"username": U, "password": P}}`,
    /// readable by its owner only; used for every pull from those registries.
    #[arg(long, value_name = "FILE")]
    registry_credentials: Option<PathBuf>,
}

/// Values of `--egress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Egress {
    /// Any key may.
    All,
    /// Admin keys only.
    Admin,
    /// Nobody: no sandbox has a network.
    None,
}

/// The isolation backends this build of `moat serve` registers (what `moat check` reports too):
/// gvisor where the host can run it.
pub(crate) const BACKENDS: &[&str] = &["native", "gvisor"];

/// The backend of templates that name none when `--backend` is not given.
pub(crate) const DEFAULT_BACKEND: &str = "native";

/// Values of `--on-shutdown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnShutdown {
    /// Destroy every sandbox and record it killed.
    Destroy,
    /// Leave sandboxes running for the next server to adopt.
    Keep,
}

impl ServeArgs {
    /// The manager's settings from the TTL flags, or why they do not fit together.
    fn manager_options(&self) -> Result<ManagerOptions> {
        if self.default_ttl == 0 || self.max_ttl == 0 {
            bail!("--default-ttl and --max-ttl must be at least 1 second");
        }
        if self.default_ttl > self.max_ttl {
            bail!(
                "--default-ttl {} is longer than --max-ttl {}: the default must be within the maximum",
                self.default_ttl,
                self.max_ttl
            );
        }
        if self.egress_bandwidth == Some(0) {
            bail!("--egress-bandwidth must be more than 0 (leave it out for no limit)");
        }
        Ok(ManagerOptions {
            default_ttl: Duration::from_secs(self.default_ttl),
            max_ttl: Duration::from_secs(self.max_ttl),
            pool_memory_budget: self.pool_memory,
            snapshot_dir: Some(self.data_dir.join(SNAPSHOT_DIR)),
            min_free_disk: self.min_free_disk,
            snapshot_bytes_per_tenant: self.snapshot_quota,
            retention: self.retention,
            public_traffic: !self.private_traffic,
            egress_bandwidth: self.egress_bandwidth,
            egress_access: match self.egress {
                Egress::All => EgressAccess::All,
                Egress::Admin => EgressAccess::Admin,
                Egress::None => EgressAccess::None,
            },
            image_dir: Some(self.data_dir.join(IMAGE_DIR)),
            build_dir: Some(self.data_dir.join(BUILD_DIR)),
            jobs: JobOptions {
                blobs: Some(match &self.blob_store {
                    Some(url) if url.contains("://") => BlobLocation::Url(url.clone()),
                    Some(dir) => BlobLocation::Dir(dir.into()),
                    None => BlobLocation::Dir(self.data_dir.join(BLOB_DIR)),
                }),
                workers: match self.job_workers {
                    Some(0) => bail!("--job-workers must be at least 1"),
                    Some(n) => n,
                    None => moat_engine::manager::default_workers(),
                },
                max_unfinished_per_tenant: self.max_jobs,
                max_kept_per_tenant: self.max_kept_jobs,
                bytes_per_tenant: self.job_quota,
                retention: self.job_retention,
                webhooks_to_private: self.job_webhooks_to_private,
            },
            image_grace: moat_engine::manager::IMAGE_GRACE,
            registries: {
                let mut access = RegistryAccess {
                    insecure: self.insecure_registry.clone(),
                    credentials: match &self.registry_credentials {
                        Some(path) => read_registry_credentials(path)?,
                        None => Default::default(),
                    },
                    ..RegistryAccess::default()
                };
                access
                    .open_to_tenants
                    .extend(self.allow_registry.iter().cloned());
                access
            },
        })
    }
}

/// The registry credentials in the JSON file at `path`, which only its owner may read.
fn read_registry_credentials(
    path: &Path,
) -> Result<std::collections::BTreeMap<String, Credentials>> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Entry {
        username: String,
        password: String,
    }
    let what = || format!("--registry-credentials {}", path.display());
    let meta = std::fs::metadata(path).with_context(what)?;
    if meta.permissions().mode() & 0o077 != 0 {
        bail!(
            "{}: other users may read it (mode {:o}); chmod 600 it",
            what(),
            meta.permissions().mode() & 0o777
        );
    }
    if meta.len() > 1 << 20 {
        bail!("{}: larger than 1 MiB", what());
    }
    let text = std::fs::read_to_string(path).with_context(what)?;
    let entries: std::collections::BTreeMap<String, Entry> = serde_json::from_str(&text)
        .with_context(|| {
            format!(
                "{}: not {{\"HOST\": {{\"username\": …, \"password\": …}}}}",
                what()
            )
        })?;
    Ok(entries
        .into_iter()
        .map(|(host, e)| {
            let credentials = Credentials {
                username: e.username,
                password: e.password,
            };
            (host, credentials)
        })
        .collect())
}

/// A `--domain` value, checked by [`moat_server::validate_domain`].
fn parse_domain(text: &str) -> Result<String, String> {
    moat_server::validate_domain(text)?;
    Ok(text.to_owned())
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The tenant the first admin key belongs to.
const DEFAULT_TENANT: &str = "default";
/// The file the first admin key is written to, in the data dir.
const ADMIN_KEY_FILE: &str = "admin.key";
/// The directory snapshot archives are kept in, in the data dir.
const SNAPSHOT_DIR: &str = "snapshots";
/// Where pulled images are kept, in the data dir.
const IMAGE_DIR: &str = "images";
/// Where builds keep their records, logs and contexts, in the data dir.
const BUILD_DIR: &str = "builds";
/// Where jobs keep their blobs unless `--blob-store` says otherwise, in the data dir.
const BLOB_DIR: &str = "blobs";

/// Runs the server until SIGINT or SIGTERM. Exits 0 after a clean shutdown.
pub fn main(args: ServeArgs) -> ExitCode {
    init_logging(args.log_format);
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("moat: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only help a terminal; in a file or journal they are noise.
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn run(args: ServeArgs) -> Result<()> {
    // Flags first: a bad combination is refused before anything is touched.
    let manager_opts = args.manager_options()?;
    if !BACKENDS.contains(&args.backend.as_str()) {
        bail!(
            "--default-backend {:?} is not a backend this build has (it has: {}); nothing was created",
            args.backend,
            BACKENDS.join(", ")
        );
    }
    if let Some(p) = &args.gvisor_platform
        && !moat_backend_gvisor::runsc::PLATFORMS.contains(&p.as_str())
    {
        bail!(
            "--gvisor-platform {p:?} is not one of {}; nothing was created",
            moat_backend_gvisor::runsc::PLATFORMS.join(", ")
        );
    }
    if let Err(e) = policy::close_networks(&args.egress_deny) {
        bail!("--egress-deny: {e}");
    }
    let server_opts = ServerOptions {
        requests_per_minute: args.rate_limit,
        domain: args.domain.clone(),
        on_shutdown: match args.on_shutdown {
            OnShutdown::Destroy => ShutdownMode::Destroy,
            OnShutdown::Keep => ShutdownMode::Keep,
        },
    };
    // The host next: a server that cannot run sandboxes must not make a data dir, a store or
    // an admin key first.
    match NativeBackend::preflight() {
        Ok(()) => {}
        Err(EngineError::Unsupported(why)) => bail!("{why}; nothing was created"),
        Err(e) => return Err(e).context("checking the host; nothing was created"),
    }
    // The gvisor backend, where the host can run it; a server whose default it is refuses to
    // start without it, before anything is made.
    let gvisor = GvisorBackend::new(&GvisorOptions {
        platform: args.gvisor_platform.clone(),
        ..GvisorOptions::default()
    })
    .map_err(|e| match e {
        EngineError::Unsupported(why) => why,
        e => e.to_string(),
    });
    if args.backend == "gvisor"
        && let Err(why) = &gvisor
    {
        bail!("--default-backend gvisor: {why}; nothing was created");
    }
    // Likewise: with too low a hard open-file limit no sandbox could run a command, and the
    // soft one bounds how many sandboxes and connections the server can hold.
    let nofile = moat_engine::host_limits::raise_nofile()
        .map_err(|why| anyhow::anyhow!("{why}; nothing was created"))?;
    tracing::debug!(soft = nofile.soft, hard = nofile.hard, "open-file limit");
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&args.data_dir)
        .with_context(|| format!("creating the data dir {}", args.data_dir.display()))?;
    // Held until the process exits; before the store, so a second server changes nothing.
    let _lock = data_dir_lock::lock(&args.data_dir)?;
    let db = args.data_dir.join("moat.db");
    let store =
        Arc::new(Store::open(&db).with_context(|| format!("opening the store {}", db.display()))?);
    first_admin_key(&store, &args.data_dir)?;
    // What the sandboxes this server keeps are marked with, so that servers on other data
    // dirs of this host leave them alone (and this one leaves theirs alone).
    let owner = store.data_dir_id().context("reading the data dir's id")?;
    let backend = NativeBackend::new(&NativeOptions {
        // Only a server that may keep its sandboxes gives their agents a way back in.
        keepable: args.on_shutdown == OnShutdown::Keep,
        owner: Some(owner),
        ..NativeOptions::default()
    })
    .context("native backend")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    // Every backend this build has, keyed by kind; templates name one or get
    // `--default-backend`. One the host cannot run is recorded with why, for its refusals.
    let mut backends = Backends::new(Arc::new(backend));
    match gvisor {
        Ok(gvisor) => {
            tracing::info!(
                runsc = %gvisor.runsc().path.display(),
                platform = %gvisor.runsc().platform,
                "gvisor backend ready"
            );
            backends = backends.with(Arc::new(gvisor));
        }
        Err(why) => {
            tracing::info!("gvisor backend unavailable: {why}");
            backends = backends.unavailable("gvisor", why);
        }
    }
    backends
        .set_default(&args.backend)
        .context("--default-backend")?;
    let manager =
        SandboxManager::with_backends(store, backends, manager_opts).context("sandbox manager")?;
    // What a previous server left: sandboxes it kept are taken over; anything else it left
    // (killed without a chance to clean up) is killed and recorded, before serving.
    let recovered = runtime
        .block_on(manager.recover())
        .context("taking over from the previous server")?;
    if !recovered.adopted.is_empty()
        || !recovered.reaped.is_empty()
        || !recovered.waiting.is_empty()
    {
        tracing::info!(
            adopted = recovered.adopted.len(),
            reaped = recovered.reaped.len(),
            waiting = recovered.waiting.len(),
            "sandboxes of the previous server"
        );
    }
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        tracing::info!(
            address = %listener.local_addr().unwrap_or(args.listen),
            data_dir = %args.data_dir.display(),
            "moat serve listening"
        );
        let shutdown = shutdown_signal()?;
        moat_server::serve(listener, manager, server_opts, shutdown)
            .await
            .context("serving")
    })
}

/// Completes on the first SIGINT or SIGTERM.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => tracing::info!("SIGINT"),
            _ = term.recv() => tracing::info!("SIGTERM"),
        }
    })
}

/// Writes `secret` as the file `path` (0600) whole or not at all: a new file beside it,
/// synced, renamed over it, and the directory synced.
fn write_secret_file(path: &Path, secret: &str) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let staged = path.with_extension("key.new");
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&staged)?;
        // `mode` only applies to a new file; one left by an earlier try may have been looser.
        file.set_permissions(Permissions::from_mode(0o600))?;
        writeln!(file, "{secret}")?;
        file.sync_all()?;
        std::fs::rename(&staged, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&staged);
    }
    written?;
    std::fs::File::open(dir)?.sync_all()
}

/// On a store without an admin key: makes tenant `default` and an admin key for it, writes the
/// secret to `<data>/admin.key` (0600) and prints it once to stdout. The file is written (and
/// synced, by a rename) before the key is recorded: a crash in between leaves a secret that
/// opens nothing, which the next start replaces, never a key whose secret is nowhere.
fn first_admin_key(store: &Store, data_dir: &Path) -> Result<()> {
    if store.has_admin_key().context("looking for an admin key")? {
        return Ok(());
    }
    match store.create_tenant(DEFAULT_TENANT, "Default") {
        Ok(_) | Err(StoreError::Conflict { .. }) => {}
        Err(e) => return Err(e).context("creating the default tenant"),
    }
    let secret = Secret::generate().context("making the admin key's secret")?;
    let path = data_dir.join(ADMIN_KEY_FILE);
    write_secret_file(&path, secret.expose())
        .with_context(|| format!("writing {}", path.display()))?;
    let (key, secret) = store
        .create_key_with(
            DEFAULT_TENANT,
            "admin",
            Role::Admin,
            Quotas::default(),
            secret,
        )
        .context("creating the admin key")?;
    eprintln!(
        "moat: created tenant {DEFAULT_TENANT:?} and admin key {} (secret below, shown once, also in {})",
        key.id,
        path.display()
    );
    // The secret is also in the file: a closed standard output does not stop the server.
    match super::output::println(secret.expose()) {
        Err(e) if !super::output::is_closed(&e) => Err(e),
        _ => Ok(()),
    }
}

/// A `--retention` value: a duration of at least one second.
fn parse_retention(text: &str) -> Result<Duration, String> {
    let d = moat_engine::resources::parse_duration(text).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(1) {
        return Err("must be at least 1s".into());
    }
    Ok(d)
}

/// A duration of whole seconds, minutes, hours or days (`90s`, `30m`, `36h`, `7d`), at least
/// one second, with no upper bound but what fits.
fn parse_long_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {text:?}: use e.g. 90s, 30m, 36h, 7d");
    let unit = text.chars().last().ok_or_else(bad)?;
    let scale: u64 = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(bad()),
    };
    let n: u64 = text[..text.len() - 1].parse().map_err(|_| bad())?;
    let secs = n.checked_mul(scale).ok_or_else(bad)?;
    if secs == 0 {
        return Err("must be at least 1s".into());
    }
    Ok(Duration::from_secs(secs))
}

fn parse_size_arg(text: &str) -> Result<u64, String> {
    moat_engine::resources::parse_size(text).map_err(|e| e.to_string())
}
