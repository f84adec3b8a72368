//! A command followed as a stream of [`v1::ExecEvent`]s: `start`, output as it arrives, then
//! `end` or `error`.

use std::collections::VecDeque;

use futures_util::Stream;
use moat_proto::v1;

use super::exec_encoding::OutputEncoder;
use super::execution::{Execution, Output};

/// The events of one running command, read one at a time. There is no output cap: nothing is
/// read from the sandbox until the next event is asked for, so a slow reader slows the
/// command down. Dropped before its last event, it kills the command's process group.
pub struct ExecStream {
    execution: Execution,
    stdout: OutputEncoder,
    stderr: OutputEncoder,
    /// Events ready to hand out before reading further (`start`; the end's flushed output).
    ready: VecDeque<v1::ExecEvent>,
}

impl std::fmt::Debug for ExecStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecStream")
            .field("pid", &self.execution.pid())
            .finish_non_exhaustive()
    }
}

impl ExecStream {
    pub(super) fn new(execution: Execution, encoding: v1::OutputEncoding) -> Self {
        let ready = execution
            .pid()
            .map(|pid| v1::ExecEvent::Start { pid })
            .into_iter()
            .collect();
        ExecStream {
            execution,
            stdout: OutputEncoder::new(encoding),
            stderr: OutputEncoder::new(encoding),
            ready,
        }
    }

    /// The next event; `None` after the `end` or `error`.
    pub async fn next(&mut self) -> Option<v1::ExecEvent> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Some(event);
            }
            match self.execution.next_output().await? {
                Output::Stdout(bytes) => {
                    let data = self.stdout.push(&bytes);
                    if !data.is_empty() {
                        return Some(v1::ExecEvent::Stdout { data });
                    }
                }
                Output::Stderr(bytes) => {
                    let data = self.stderr.push(&bytes);
                    if !data.is_empty() {
                        return Some(v1::ExecEvent::Stderr { data });
                    }
                }
                Output::Ended(ended) => {
                    // A character left unfinished at the end is sent (replaced) before it.
                    let data = self.stdout.finish();
                    if !data.is_empty() {
                        self.ready.push_back(v1::ExecEvent::Stdout { data });
                    }
                    let data = self.stderr.finish();
                    if !data.is_empty() {
                        self.ready.push_back(v1::ExecEvent::Stderr { data });
                    }
                    self.ready.push_back(match ended {
                        Ok(end) => v1::ExecEvent::End(end),
                        Err(e) => v1::ExecEvent::Error(v1::ErrorDetail {
                            code: e.code().to_owned(),
                            message: e.to_string(),
                        }),
                    });
                }
            }
        }
    }

    /// The events as a [`Stream`], for serving.
    pub fn into_events(self) -> impl Stream<Item = v1::ExecEvent> + Send + 'static {
        futures_util::stream::unfold(self, |mut s| async move {
            let event = s.next().await?;
            Some((event, s))
        })
    }
}
