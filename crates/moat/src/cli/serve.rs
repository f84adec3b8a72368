//! `moat serve`: the HTTP API over the native backend, with its state in the data dir.

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use moat_engine::backend::Backend;
use moat_engine::manager::{ManagerOptions, SandboxManager};
use moat_engine::native::{NativeBackend, NativeOptions};
use moat_engine::store::{Quotas, Role, Store, StoreError};

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
    #[arg(long, default_value = "1G", value_parser = parse_pool_memory)]
    pool_memory: u64,
    /// Log lines as text for people or JSON for collectors (on stderr).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
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
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&args.data_dir)
        .with_context(|| format!("creating the data dir {}", args.data_dir.display()))?;
    let db = args.data_dir.join("moat.db");
    let store =
        Arc::new(Store::open(&db).with_context(|| format!("opening the store {}", db.display()))?);
    // Sandboxes a previous server left behind (it was killed without a chance to clean up):
    // record them killed now, and kill what is left of them below, before serving.
    let orphaned = store
        .mark_orphaned(now_ms())
        .context("marking sandboxes of a previous run")?;
    // Warm-pool members of a previous run: forgotten here, killed below.
    let orphaned_members = store
        .take_pool_members()
        .context("forgetting warm-pool members of a previous run")?;
    let orphaned: Vec<String> = orphaned.into_iter().chain(orphaned_members).collect();
    if !orphaned.is_empty() {
        tracing::info!(
            count = orphaned.len(),
            "sandboxes and warm-pool members of a previous run to reap"
        );
    }
    first_admin_key(&store, &args.data_dir)?;
    let backend = NativeBackend::new(&NativeOptions::default()).context("native backend")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    runtime.block_on(async {
        for id in &orphaned {
            match backend.reap_orphan(id).await {
                Ok(true) => tracing::info!(sandbox = %id, "killed a sandbox of a previous run"),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(sandbox = %id, "could not reap a sandbox of a previous run: {e}")
                }
            }
        }
    });
    let opts = ManagerOptions {
        pool_memory_budget: args.pool_memory,
        ..ManagerOptions::default()
    };
    let manager = SandboxManager::new(store, Arc::new(backend), opts).context("sandbox manager")?;
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
        moat_server::serve(listener, manager, shutdown)
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

/// On a store without an admin key: makes tenant `default` and an admin key for it, writes the
/// secret to `<data>/admin.key` (0600) and prints it once to stdout.
fn first_admin_key(store: &Store, data_dir: &Path) -> Result<()> {
    if store.has_admin_key().context("looking for an admin key")? {
        return Ok(());
    }
    match store.create_tenant(DEFAULT_TENANT, "Default") {
        Ok(_) | Err(StoreError::Conflict { .. }) => {}
        Err(e) => return Err(e).context("creating the default tenant"),
    }
    let (key, secret) = store
        .create_key(DEFAULT_TENANT, "admin", Role::Admin, Quotas::default())
        .context("creating the admin key")?;
    let path = data_dir.join(ADMIN_KEY_FILE);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    // `mode` only applies to a new file; an old one may have been looser.
    file.set_permissions(Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))?;
    writeln!(file, "{}", secret.expose()).with_context(|| format!("writing {}", path.display()))?;
    file.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    eprintln!(
        "moat: created tenant {DEFAULT_TENANT:?} and admin key {} (secret below, shown once, also in {})",
        key.id,
        path.display()
    );
    println!("{}", secret.expose());
    Ok(())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn parse_pool_memory(text: &str) -> Result<u64, String> {
    moat_engine::resources::parse_size(text).map_err(|e| e.to_string())
}
