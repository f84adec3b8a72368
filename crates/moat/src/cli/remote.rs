//! What the commands that talk to a moat server share: where the server is and with which
//! key, the output format, the runtime, error reports, and streaming a command's output.

use std::process::ExitCode;

use anyhow::{Result, anyhow};
use moat_client::types::{ExecEnd, ExecRequest};
use moat_client::{API_KEY_ENV, Client, StreamEvent, URL_ENV};
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::signal::unix::{SignalKind, signal};

use super::output;

/// Exit code when moat itself fails while running a command (as `moat run` uses).
pub const EXIT_MOAT_FAILED: u8 = 125;
/// Exit code after a command's timeout, as `timeout(1)` uses.
pub const EXIT_TIMEOUT: u8 = 124;

/// The server and key of a remote command, and how to print answers.
#[derive(Debug, Clone, clap::Args)]
pub struct Remote {
    /// The server's URL [default: $MOAT_URL].
    #[arg(long, global = true, value_name = "URL")]
    pub url: Option<String>,
    /// The API key's secret [default: $MOAT_API_KEY]. Other local users can see a flag in
    /// the process list; prefer the variable.
    #[arg(long, global = true, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Output format: aligned tables for people, or JSON for scripts.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

/// How answers are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns.
    Table,
    /// The API's JSON objects (lists as arrays).
    Json,
}

impl Remote {
    /// A client of the server named by `--url`/`--api-key`, else `MOAT_URL`/`MOAT_API_KEY`.
    pub fn client(&self) -> Result<Client> {
        let url = pick(self.url.as_deref(), URL_ENV).ok_or_else(|| {
            anyhow!(
                "no server given: set {URL_ENV} or pass --url (for example http://127.0.0.1:7070)"
            )
        })?;
        let key = pick(self.api_key.as_deref(), API_KEY_ENV).ok_or_else(|| {
            anyhow!(
                "no API key given: set {API_KEY_ENV} or pass --api-key (a key's secret, moat_…; \
                 the server's first admin key is in its data dir's admin.key)"
            )
        })?;
        Ok(Client::new(&url, &key)?)
    }
}

/// The flag's value, else the non-empty environment variable `env`.
fn pick(flag: Option<&str>, env: &str) -> Option<String> {
    flag.map(str::to_owned)
        .or_else(|| std::env::var(env).ok())
        .filter(|v| !v.trim().is_empty())
}

/// Runs `work` on a fresh single-threaded runtime; an error is printed as `moat: …` and
/// becomes exit status 1, except a closed standard output, which ends it quietly with 141.
pub fn block_on(work: impl Future<Output = Result<ExitCode>>) -> ExitCode {
    let rt = match super::runtime(ExitCode::FAILURE) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(work) {
        Ok(code) => code,
        Err(e) if output::is_closed(&e) => ExitCode::from(output::EXIT_OUTPUT_CLOSED),
        Err(e) => {
            report(&e);
            ExitCode::FAILURE
        }
    }
}

/// Prints an error as `moat: …`; a server's error shows its message, status and code.
pub fn report(e: &anyhow::Error) {
    match e.downcast_ref::<moat_client::Error>() {
        Some(moat_client::Error::Api(api)) => {
            let context = e
                .chain()
                .next()
                .map(ToString::to_string)
                .unwrap_or_default();
            let own = context != api.to_string();
            if own {
                eprintln!(
                    "moat: {context}: {} ({} {})",
                    api.message, api.status, api.code
                );
            } else {
                eprintln!("moat: {} ({} {})", api.message, api.status, api.code);
            }
        }
        _ => eprintln!("moat: {e:#}"),
    }
}

/// Prints `value` as pretty JSON on stdout.
pub fn print_json(value: &impl Serialize) -> Result<()> {
    output::println(serde_json::to_string_pretty(value)?)
}

/// `K=V` strings as pairs; `what` names the flag in errors.
pub fn key_values(what: &str, items: &[String]) -> Result<Vec<(String, String)>> {
    items
        .iter()
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| anyhow!("{what} {kv:?}: expected KEY=VALUE"))?;
            if k.is_empty() {
                return Err(anyhow!("{what} {kv:?}: the name is empty"));
            }
            Ok((k.to_owned(), v.to_owned()))
        })
        .collect()
}

/// How a streamed command finished, from this side.
pub enum Finished {
    /// It ended.
    Ended(ExecEnd),
    /// Whoever read our output went away.
    OutputClosed,
    /// We got this signal (Ctrl-C, SIGTERM, SIGHUP) before it ended.
    Signalled(i32),
}

/// Ctrl-C, SIGTERM and SIGHUP, caught from when this is made until it is dropped (so none is
/// lost between two steps that wait for them).
pub struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Starts catching the signals. They are blocked in the calling thread meanwhile: the
    /// registry behind tokio's signals installs its handler before it records who listens, and
    /// a signal in between would be swallowed (neither acted on nor left to its default). The
    /// one that arrives then stays pending until the listeners are there. Callers make this
    /// before they start other threads, so no other thread takes it first.
    pub fn catch() -> Result<Signals> {
        // SAFETY: sigset_t is plain data that sigemptyset/sigaddset initialise; the mask
        // calls change this thread's mask only and restore it below on every path.
        let (blocked, old) = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                libc::sigaddset(&mut set, sig);
            }
            let blocked = libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old) == 0;
            (blocked, old)
        };
        let made = (|| {
            Ok(Signals {
                int: signal(SignalKind::interrupt())?,
                term: signal(SignalKind::terminate())?,
                hup: signal(SignalKind::hangup())?,
            })
        })();
        if blocked {
            // SAFETY: restores the mask saved above.
            unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
        }
        made
    }

    /// The number of the next signal caught.
    pub async fn recv(&mut self) -> i32 {
        tokio::select! {
            _ = self.int.recv() => libc::SIGINT,
            _ = self.term.recv() => libc::SIGTERM,
            _ = self.hup.recv() => libc::SIGHUP,
        }
    }
}

/// Runs `req` in sandbox `id`, copying its output to our stdout and stderr as it comes,
/// until it ends or one of `signals` arrives.
pub async fn stream_exec(
    client: &Client,
    id: &str,
    req: &ExecRequest,
    signals: &mut Signals,
) -> Result<Finished> {
    let mut events = tokio::select! {
        s = client.exec_stream(id, req) => s?,
        sig = signals.recv() => return Ok(Finished::Signalled(sig)),
    };
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    loop {
        let event = tokio::select! {
            e = events.next() => e,
            sig = signals.recv() => return Ok(Finished::Signalled(sig)),
        };
        let written = match event {
            None => return Err(anyhow!("the command's stream ended without an end event")),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(StreamEvent::Ended(end))) => return Ok(Finished::Ended(end)),
            Some(Ok(StreamEvent::Started { .. })) => Ok(()),
            Some(Ok(StreamEvent::Stdout(b))) => write_out(&mut stdout, &b).await,
            Some(Ok(StreamEvent::Stderr(b))) => write_out(&mut stderr, &b).await,
        };
        match written {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                return Ok(Finished::OutputClosed);
            }
            Err(e) => return Err(anyhow!("writing the command's output: {e}")),
        }
    }
}

/// Writes `data` to `out` and flushes it, so output reaches the reader as it is made.
pub(crate) async fn write_out(
    out: &mut (impl tokio::io::AsyncWrite + Unpin),
    data: &[u8],
) -> std::io::Result<()> {
    out.write_all(data).await?;
    out.flush().await
}

/// The exit status for how a command ended, with a one-line reason on stderr where it was
/// not its own exit: `124` after its timeout, `128+N` after signal `N` (with a note after an
/// OOM kill).
pub fn exit_status(end: &ExecEnd, memory: Option<u64>) -> u8 {
    if end.timed_out {
        eprintln!("moat: timed out; the command and all its processes were killed");
        return EXIT_TIMEOUT;
    }
    let code = match (end.exit_code, &end.signal) {
        (Some(code), _) => (code & 0xff) as u8,
        (None, Some(signal)) => {
            let n = super::signal::signal_number(signal).unwrap_or(libc::SIGKILL);
            (128 + n.clamp(1, 127)) as u8
        }
        (None, None) => {
            eprintln!("moat: the command ended without an exit code");
            EXIT_MOAT_FAILED
        }
    };
    if end.oom_killed && code == 128 + libc::SIGKILL as u8 {
        match memory {
            Some(m) => eprintln!(
                "moat: killed: out of memory (the sandbox's limit is {})",
                moat_proto::units::format_size(m)
            ),
            None => eprintln!("moat: killed: out of memory (the sandbox's memory limit)"),
        }
    }
    code
}

/// Whole seconds of a duration, rounded up (the API takes seconds).
pub fn whole_secs(d: std::time::Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn end(exit_code: Option<i32>, signal: Option<&str>, timed_out: bool) -> ExecEnd {
        ExecEnd {
            exit_code,
            signal: signal.map(str::to_owned),
            duration_ms: 1,
            timed_out,
            oom_killed: false,
        }
    }

    #[test]
    fn exit_statuses() {
        assert_eq!(exit_status(&end(Some(0), None, false), None), 0);
        assert_eq!(exit_status(&end(Some(3), None, false), None), 3);
        assert_eq!(exit_status(&end(Some(256 + 7), None, false), None), 7);
        assert_eq!(
            exit_status(&end(None, Some("signal: killed"), false), None),
            137
        );
        assert_eq!(
            exit_status(&end(None, Some("signal: terminated"), false), None),
            143
        );
        assert_eq!(
            exit_status(&end(None, Some("signal: killed"), true), None),
            124
        );
        assert_eq!(exit_status(&end(None, None, false), None), 125);
    }

    #[test]
    fn key_value_flags() {
        let kv = key_values("--env", &["A=1".into(), "B=x=y".into(), "C=".into()]).unwrap();
        assert_eq!(kv[1], ("B".into(), "x=y".into()));
        assert_eq!(kv[2], ("C".into(), String::new()));
        assert!(key_values("--env", &["A".into()]).is_err());
        assert!(key_values("--env", &["=1".into()]).is_err());
    }

    #[test]
    fn seconds_round_up() {
        use std::time::Duration;
        assert_eq!(whole_secs(Duration::from_millis(500)), 1);
        assert_eq!(whole_secs(Duration::from_secs(30)), 30);
        assert_eq!(whole_secs(Duration::from_millis(30_001)), 31);
    }
}
