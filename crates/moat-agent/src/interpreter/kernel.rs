//! One running language driver of a context: starting it (through the process service, so it is
//! confined exactly like a command of the sandbox's default user), and running executions on it.
//!
//! During an execution the agent reads three pipes of the driver: stdout and stderr (the code's
//! output, streamed as it comes) and the private event pipe (results, the error, the end). When a
//! frame arrives the output pipes are read dry first: the driver flushes before it writes a frame,
//! so output the code wrote before a result or the end is never reported after it.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use http::StatusCode;
use tokio::io::Interest;
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};

use super::control::{self, Frame, LineSplitter};
use super::language::Language;
use super::limits::{
    INTERRUPT_GRACE, INTERRUPT_REPEAT, KEEPALIVE_INTERVAL, MAX_EXECUTION_TIME, STARTUP_TIMEOUT,
};
use super::stream::{Emitter, Output, Utf8Chunks};
use crate::process::fdio::FdIo;
use crate::process::{ProcessService, kill_group};
use crate::reaper::describe_status;
use crate::rpc::Code;
use crate::state::AgentState;

/// Bytes read from a pipe at once.
const READ_CHUNK: usize = 32 * 1024;
/// Most bytes read dry from one output pipe when a frame arrives (a child process that keeps
/// writing must not hold the frame back forever).
const DRAIN_LIMIT: usize = 1 << 20;
/// Most bytes of stderr kept to explain a driver that failed to start.
const STARTUP_STDERR: usize = 4096;

/// What starting drivers needs: the sandbox's state and the process service.
#[derive(Debug, Clone)]
pub struct Launcher {
    /// The agent's state (default user, environment).
    pub state: Arc<AgentState>,
    /// Starts the driver processes.
    pub process: Arc<ProcessService>,
}

/// Why a driver could not start: the status and message for the client.
#[derive(Debug, Clone)]
pub struct StartError {
    /// `400` for the caller's mistakes (a missing working directory), else `500`.
    pub status: StatusCode,
    /// What went wrong.
    pub message: String,
}

impl StartError {
    fn internal(message: impl Into<String>) -> StartError {
        StartError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
        }
    }
}

/// How an execution ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The driver reported the end; the context lives on.
    Done,
    /// The driver process exited (its wait status, described).
    Died(String),
}

/// The pid and exit of a driver, usable while an execution holds the [`Kernel`].
#[derive(Debug, Clone)]
pub struct Handle {
    pid: u32,
    exit: watch::Receiver<Option<String>>,
}

impl Handle {
    /// How the process ended, once it has.
    pub fn exited(&self) -> Option<String> {
        self.exit.borrow().clone()
    }

    /// Kills the driver and everything in its process group.
    pub fn kill(&self) {
        if self.exited().is_none() {
            kill_group(self.pid, libc::SIGKILL);
        }
    }

    /// Interrupts the running code (SIGINT to the driver's process group, as Jupyter does).
    fn interrupt(&self) {
        if self.exited().is_none() {
            kill_group(self.pid, libc::SIGINT);
        }
    }
}

/// A running driver.
#[derive(Debug)]
pub struct Kernel {
    language: Language,
    handle: Handle,
    commands: FdIo,
    events: FdIo,
    stdout: Option<FdIo>,
    stderr: Option<FdIo>,
    lines: LineSplitter,
    /// Where the event pipe is read into.
    event_buf: Vec<u8>,
    /// Where the output pipes are read dry into (apart from `event_buf`: a frame just read must
    /// survive the drain that precedes its handling).
    drain_buf: Vec<u8>,
}

impl Drop for Kernel {
    fn drop(&mut self) {
        self.handle.kill();
    }
}

impl Kernel {
    /// Starts the driver of `language` in `cwd` as the sandbox's default user and waits (at most
    /// [`STARTUP_TIMEOUT`]) until it is ready.
    pub async fn start(
        launcher: &Launcher,
        language: Language,
        cwd: &str,
    ) -> Result<Kernel, StartError> {
        let user = launcher
            .state
            .resolve_user(None)
            .map_err(|e| StartError::internal(e.message))?;
        let io = |what: &str, e: std::io::Error| StartError::internal(format!("{what}: {e}"));
        let (cmd_read, cmd_write) = control::pipe().map_err(|e| io("creating a pipe", e))?;
        let (event_read, event_write) = control::pipe().map_err(|e| io("creating a pipe", e))?;
        let (program, args) = language.launch(cmd_read.as_raw_fd(), event_write.as_raw_fd());
        let proc = launcher
            .process
            .spawn_service(
                &user,
                program,
                &args,
                Some(cwd),
                vec![cmd_read, event_write],
            )
            .map_err(|e| match e.code {
                Code::InvalidArgument | Code::NotFound => StartError {
                    status: StatusCode::BAD_REQUEST,
                    message: e.message,
                },
                // The program was found on PATH, so what the user may not enter is the working
                // directory: the caller's choice, not a server failure.
                Code::PermissionDenied => StartError {
                    status: StatusCode::BAD_REQUEST,
                    message: format!(
                        "cannot start the {} context in {cwd}: permission denied (contexts run as \
                         user '{}', who needs search permission on the directory)",
                        language.name(),
                        user.name
                    ),
                },
                _ => StartError::internal(e.message),
            })?;
        let (exit_tx, exit_rx) = watch::channel(None);
        let exit = proc.exit;
        tokio::spawn(async move {
            let text = match exit.await {
                Ok(status) => describe_status(status).2,
                Err(_) => "exit status unknown".to_string(),
            };
            let _ = exit_tx.send(Some(text));
        });
        let handle = Handle {
            pid: proc.pid,
            exit: exit_rx,
        };
        // From here on dropping the kernel kills the process.
        let setup = (|| {
            Ok::<_, std::io::Error>((
                FdIo::new(cmd_write, Interest::WRITABLE)?,
                FdIo::new(event_read, Interest::READABLE)?,
                FdIo::new(proc.stdout, Interest::READABLE)?,
                FdIo::new(proc.stderr, Interest::READABLE)?,
            ))
        })();
        let (commands, events, stdout, stderr) = match setup {
            Ok(v) => v,
            Err(e) => {
                handle.kill();
                return Err(io("setting up the driver's pipes", e));
            }
        };
        let mut kernel = Kernel {
            language,
            handle,
            commands,
            events,
            stdout: Some(stdout),
            stderr: Some(stderr),
            lines: LineSplitter::default(),
            event_buf: vec![0; READ_CHUNK],
            drain_buf: vec![0; READ_CHUNK],
        };
        kernel.wait_ready().await?;
        Ok(kernel)
    }

    /// Waits for the driver's `ready` frame, keeping some stderr to explain a failure.
    async fn wait_ready(&mut self) -> Result<(), StartError> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let mut stderr_text = Vec::new();
        let mut frames = Vec::new();
        let program = self.language.program();
        let failed = |why: String, stderr: &[u8]| {
            let stderr = String::from_utf8_lossy(stderr);
            let stderr = stderr.trim();
            StartError::internal(if stderr.is_empty() {
                format!("the {program} driver {why}")
            } else {
                format!("the {program} driver {why}; its stderr: {stderr}")
            })
        };
        loop {
            let mut out_buf = [0u8; 4096];
            let mut err_buf = [0u8; 4096];
            tokio::select! {
                r = self.events.read(&mut self.event_buf) => match r {
                    Ok(n) if n > 0 => {
                        self.lines.push(&self.event_buf[..n], &mut frames);
                        if frames.drain(..).any(|l| control::parse(&l) == Some(Frame::Ready)) {
                            return Ok(());
                        }
                    }
                    _ => {
                        let _ = tokio::time::timeout_at(deadline, exited(self.handle.exit.clone())).await;
                        let status = self.handle.exited().unwrap_or_else(|| "still running".into());
                        self.handle.kill();
                        return Err(failed(format!("closed its event pipe ({status})"), &stderr_text));
                    }
                },
                r = read_opt(&self.stdout, &mut out_buf) => {
                    if !matches!(r, Ok(n) if n > 0) {
                        self.stdout = None;
                    }
                }
                r = read_opt(&self.stderr, &mut err_buf) => match r {
                    Ok(n) if n > 0 => {
                        let room = STARTUP_STDERR.saturating_sub(stderr_text.len());
                        stderr_text.extend_from_slice(&err_buf[..n.min(room)]);
                    }
                    _ => self.stderr = None,
                },
                _ = exited(self.handle.exit.clone()) => {
                    self.drain(Output::Stderr, &mut |chunk| {
                        let room = STARTUP_STDERR.saturating_sub(stderr_text.len());
                        stderr_text.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    });
                    let status = self.handle.exited().unwrap_or_default();
                    return Err(failed(format!("exited during start-up ({status})"), &stderr_text));
                }
                _ = sleep_until(deadline) => {
                    self.handle.kill();
                    return Err(failed(
                        format!("was not ready within {} s", STARTUP_TIMEOUT.as_secs()),
                        &stderr_text,
                    ));
                }
            }
        }
    }

    /// The driver's pid and exit.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Runs one command (from [`Language::command`]) and streams what happens to `out`: output,
    /// results, the first error. A client that goes away, or [`MAX_EXECUTION_TIME`], interrupts
    /// the code; if it has not stopped [`INTERRUPT_GRACE`] later the driver is killed.
    pub async fn execute(&mut self, command: &[u8], out: &mut Emitter) -> Outcome {
        self.discard_stale();
        let watcher = out.watcher();
        tokio::select! {
            r = self.commands.write_all(command) => {
                if r.is_err() {
                    // The driver closed its end of the command pipe: it is exiting.
                    self.wait_exit().await;
                    return self.died(out).await;
                }
            }
            _ = exited(self.handle.exit.clone()) => return self.died(out).await,
        }

        let deadline = Instant::now() + MAX_EXECUTION_TIME;
        let mut interrupted: Option<Instant> = None;
        let mut next_signal = deadline;
        let mut text = [Utf8Chunks::default(), Utf8Chunks::default()];
        let mut frames = Vec::new();
        let mut out_buf = vec![0u8; READ_CHUNK];
        let mut err_buf = vec![0u8; READ_CHUNK];
        loop {
            let keepalive_at = out.last_sent() + KEEPALIVE_INTERVAL;
            tokio::select! {
                r = self.events.read(&mut self.event_buf) => {
                    self.flush_output(out, &mut text).await;
                    match r {
                        Ok(n) if n > 0 => self.lines.push(&self.event_buf[..n], &mut frames),
                        // The driver closed its end: it is exiting.
                        _ => {
                            self.wait_exit().await;
                            return self.died(out).await;
                        }
                    }
                    for line in frames.drain(..) {
                        match control::parse(&line) {
                            Some(Frame::Result(result)) => out.result(&result).await,
                            Some(Frame::Error { name, value, traceback }) => {
                                out.error(&name, &value, &traceback).await;
                            }
                            Some(Frame::Done) => {
                                for (which, chunks) in [Output::Stdout, Output::Stderr].into_iter().zip(&mut text) {
                                    let rest = chunks.finish();
                                    if !rest.is_empty() {
                                        out.output(which, &rest).await;
                                    }
                                }
                                return Outcome::Done;
                            }
                            Some(Frame::Ready) | None => {}
                        }
                    }
                }
                r = read_opt(&self.stdout, &mut out_buf) => match r {
                    Ok(n) if n > 0 => {
                        let s = text[0].decode(&out_buf[..n]);
                        out.output(Output::Stdout, &s).await;
                    }
                    _ => self.stdout = None,
                },
                r = read_opt(&self.stderr, &mut err_buf) => match r {
                    Ok(n) if n > 0 => {
                        let s = text[1].decode(&err_buf[..n]);
                        out.output(Output::Stderr, &s).await;
                    }
                    _ => self.stderr = None,
                },
                _ = exited(self.handle.exit.clone()) => {
                    self.flush_output(out, &mut text).await;
                    return self.died(out).await;
                }
                _ = watcher.closed(), if interrupted.is_none() => {
                    self.handle.interrupt();
                    interrupted = Some(Instant::now());
                    next_signal = Instant::now() + INTERRUPT_REPEAT;
                }
                _ = sleep_until(deadline), if interrupted.is_none() => {
                    out.error(
                        "TimeoutError",
                        &format!("the execution ran longer than the limit of {} s and was interrupted", MAX_EXECUTION_TIME.as_secs()),
                        "",
                    ).await;
                    self.handle.interrupt();
                    interrupted = Some(Instant::now());
                    next_signal = Instant::now() + INTERRUPT_REPEAT;
                }
                _ = sleep_until(next_signal), if interrupted.is_some() => {
                    let since = interrupted.map_or(INTERRUPT_GRACE, |t| t.elapsed());
                    if since >= INTERRUPT_GRACE {
                        // The code ignores interrupts: end it (the context restarts on next use).
                        self.handle.kill();
                        next_signal = Instant::now() + INTERRUPT_GRACE;
                    } else {
                        self.handle.interrupt();
                        next_signal = Instant::now() + INTERRUPT_REPEAT;
                    }
                }
                _ = sleep_until(keepalive_at), if out.is_open() => out.keepalive().await,
            }
        }
    }

    /// Forwards what the output pipes hold now.
    async fn flush_output(&mut self, out: &mut Emitter, text: &mut [Utf8Chunks; 2]) {
        for (which, chunks) in [Output::Stdout, Output::Stderr].into_iter().zip(text) {
            let mut data = Vec::new();
            self.drain(which, &mut |chunk| data.extend_from_slice(chunk));
            if !data.is_empty() {
                let s = chunks.decode(&data);
                if !s.is_empty() {
                    out.output(which, &s).await;
                }
            }
        }
    }

    /// Reads the `which` pipe dry (up to [`DRAIN_LIMIT`]) into `sink`.
    fn drain(&mut self, which: Output, sink: &mut dyn FnMut(&[u8])) {
        let io = match which {
            Output::Stdout => &self.stdout,
            Output::Stderr => &self.stderr,
        };
        let Some(io) = io else { return };
        let mut total = 0;
        while total < DRAIN_LIMIT {
            match io.read_now(&mut self.drain_buf) {
                Ok(n) if n > 0 => {
                    sink(&self.drain_buf[..n]);
                    total += n;
                }
                _ => break,
            }
        }
    }

    /// Drops output and complete frames left from before this execution (written by threads or
    /// children of the code after the previous one ended): they belong to no execution.
    fn discard_stale(&mut self) {
        self.drain(Output::Stdout, &mut |_| {});
        self.drain(Output::Stderr, &mut |_| {});
        let mut lines = Vec::new();
        while let Ok(n) = self.events.read_now(&mut self.event_buf) {
            if n == 0 {
                break;
            }
            self.lines.push(&self.event_buf[..n], &mut lines);
            lines.clear();
        }
    }

    /// Waits for a driver that broke its pipes to exit, killing it after [`INTERRUPT_GRACE`]
    /// (code that closed the driver's pipes leaves it unable to serve the context).
    async fn wait_exit(&self) {
        let exit = exited(self.handle.exit.clone());
        if tokio::time::timeout(INTERRUPT_GRACE, exit).await.is_err() {
            self.handle.kill();
            exited(self.handle.exit.clone()).await;
        }
    }

    /// The outcome for a driver that exited.
    async fn died(&mut self, out: &mut Emitter) -> Outcome {
        let mut text = [Utf8Chunks::default(), Utf8Chunks::default()];
        self.flush_output(out, &mut text).await;
        Outcome::Died(
            self.handle
                .exited()
                .unwrap_or_else(|| "exit status unknown".into()),
        )
    }
}

/// Resolves once the driver has exited.
async fn exited(mut exit: watch::Receiver<Option<String>>) {
    let _ = exit.wait_for(Option::is_some).await;
}

/// Reads once from `io`, or waits forever when it is closed.
async fn read_opt(io: &Option<FdIo>, buf: &mut [u8]) -> std::io::Result<usize> {
    match io {
        Some(io) => io.read(buf).await,
        None => std::future::pending().await,
    }
}
