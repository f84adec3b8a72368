//! The output pump of one process: reads its stdout and stderr (or its PTY), fans the chunks out
//! to every reader, and after the exit reports the end.
//!
//! Back-pressure: the pump reads the next chunk only after every reader has room for the previous
//! one, so a slow reader makes the process block on `write` and memory stays bounded.

use std::sync::Arc;
use std::time::Duration;

use moat_proto::process::ProcessEvent;
use moat_proto::process::process_event::{DataEvent, EndEvent, Event, data_event};
use tokio::sync::oneshot;

use super::fdio::FdIo;
use super::registry::{Proc, Registry};
use crate::reaper::describe_status;

/// Largest chunk read from a pipe (upstream envd's size).
pub const PIPE_CHUNK: usize = 32 * 1024;
/// Largest chunk read from a PTY (upstream envd's size).
pub const PTY_CHUNK: usize = 16 * 1024;
/// How long an exited process stays visible to `Connect`.
pub const EXITED_RETENTION: Duration = Duration::from_secs(30);
/// Most bytes read from one output after the process exited: descendants that keep the pipe
/// open and keep writing must not hold the end back forever.
const DRAIN_LIMIT: usize = 1 << 20;

/// Which output a source is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// Standard output pipe.
    Stdout,
    /// Standard error pipe.
    Stderr,
    /// PTY master.
    Pty,
}

impl Channel {
    fn chunk(self) -> usize {
        match self {
            Channel::Pty => PTY_CHUNK,
            _ => PIPE_CHUNK,
        }
    }

    fn event(self, data: Vec<u8>) -> ProcessEvent {
        let output = match self {
            Channel::Stdout => data_event::Output::Stdout(data),
            Channel::Stderr => data_event::Output::Stderr(data),
            Channel::Pty => data_event::Output::Pty(data),
        };
        ProcessEvent {
            event: Some(Event::Data(DataEvent {
                output: Some(output),
            })),
        }
    }
}

struct Source {
    channel: Channel,
    io: Arc<FdIo>,
    buf: Vec<u8>,
    done: bool,
}

impl Source {
    fn new(channel: Channel, io: Arc<FdIo>) -> Source {
        Source {
            channel,
            io,
            buf: vec![0; channel.chunk()],
            done: false,
        }
    }

    /// Reads one chunk; `None` at end of file (or on a read error, which ends this output).
    async fn read(&mut self) -> Option<ProcessEvent> {
        match self.io.read(&mut self.buf).await {
            Ok(n) if n > 0 => Some(self.channel.event(self.buf[..n].to_vec())),
            _ => None,
        }
    }

    /// Forwards what is in the pipe now, up to [`DRAIN_LIMIT`].
    async fn drain(&mut self, proc: &Proc) {
        let mut total = 0;
        while !self.done && total < DRAIN_LIMIT {
            match self.io.read_now(&mut self.buf) {
                Ok(n) if n > 0 => {
                    total += n;
                    proc.broadcast(self.channel.event(self.buf[..n].to_vec()))
                        .await;
                }
                _ => self.done = true,
            }
        }
        self.done = true;
    }
}

/// Runs the pump of `proc` until it has exited and its output is drained, reports the end, and
/// forgets the process [`EXITED_RETENTION`] later.
pub async fn pump(
    proc: Arc<Proc>,
    outputs: Vec<(Channel, Arc<FdIo>)>,
    exit: oneshot::Receiver<i32>,
    registry: Arc<Registry>,
) {
    let mut sources: Vec<Source> = outputs
        .into_iter()
        .map(|(c, io)| Source::new(c, io))
        .collect();
    let mut exit = exit;
    // Two outputs at most (stdout and stderr, or the PTY).
    let mut second = if sources.len() > 1 {
        sources.pop()
    } else {
        None
    };
    let mut first = sources.pop();
    let status = loop {
        let first_open = first.as_ref().is_some_and(|s| !s.done);
        let second_open = second.as_ref().is_some_and(|s| !s.done);
        tokio::select! {
            ev = read_opt(&mut first), if first_open => forward(&proc, &mut first, ev).await,
            ev = read_opt(&mut second), if second_open => forward(&proc, &mut second, ev).await,
            status = &mut exit => break status.ok(),
        }
    };
    for source in [first.as_mut(), second.as_mut()].into_iter().flatten() {
        source.drain(&proc).await;
    }
    drop((first, second));
    let end = match status {
        Some(status) => {
            let (exit_code, exited, text) = describe_status(status);
            EndEvent {
                exit_code,
                exited,
                error: (!exited || exit_code != 0).then(|| text.clone()),
                status: text,
            }
        }
        None => EndEvent {
            exit_code: -1,
            exited: false,
            status: "unknown".to_string(),
            error: Some("the exit status was lost".to_string()),
        },
    };
    proc.finish(end).await;
    tokio::time::sleep(EXITED_RETENTION).await;
    registry.remove(&proc);
}

async fn read_opt(source: &mut Option<Source>) -> Option<ProcessEvent> {
    match source {
        Some(s) => s.read().await,
        None => std::future::pending().await,
    }
}

async fn forward(proc: &Proc, source: &mut Option<Source>, event: Option<ProcessEvent>) {
    match event {
        Some(ev) => proc.broadcast(ev).await,
        None => {
            if let Some(s) = source {
                s.done = true;
            }
        }
    }
}
