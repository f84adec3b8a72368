//! Directories as tar archives, made and unpacked by `tar` running inside the sandbox as the
//! caller's user, through the agent's process service. The host only moves bytes: an untrusted
//! archive is never parsed on the host, and tar can write nothing the sandbox user could not.
//!
//! A download streams tar's standard output to the caller; an upload streams the caller's body
//! to tar's standard input, then answers with tar's exit. A tar that fails before its first byte
//! of output is an error of the call; one that fails later ends the stream with an error, so the
//! caller sees an incomplete transfer rather than a silently truncated archive.

use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use moat_proto::connect::Code;
use moat_proto::process::process_event::{EndEvent, Event, data_event::Output};
use moat_proto::process::process_selector::Selector;
use moat_proto::process::{ProcessConfig, StartRequest};
use moat_proto::v1;

use super::{
    BodyFailed, ByteStream, FileError, FileResult, UploadFailure, agent_error, agent_message,
    file_entry, is_dir, make_dir, not_a_directory, stat_opt,
};
use crate::agent_client::{AgentClient, AgentError, CallOptions, KillOnDrop, ProcessStream};

/// Longest a tar run may take (either direction); it is killed then, and the transfer fails.
pub const TAR_TIMEOUT: Duration = Duration::from_secs(3600);

/// Most of tar's standard error kept for the error message.
const MAX_TAR_STDERR: usize = 16 << 10;

/// The pieces an upload is handed to tar's standard input in (each one `SendInput` call).
const STDIN_CHUNK: usize = 256 << 10;

/// Standard error, kept up to [`MAX_TAR_STDERR`].
#[derive(Default)]
struct Stderr(Vec<u8>);

impl Stderr {
    fn push(&mut self, b: &[u8]) {
        let room = MAX_TAR_STDERR.saturating_sub(self.0.len());
        self.0.extend_from_slice(&b[..b.len().min(room)]);
    }
}

/// Starts `tar ARGS` as `user`.
async fn start(
    client: &AgentClient,
    args: Vec<String>,
    stdin: bool,
    user: Option<&str>,
) -> FileResult<(ProcessStream, KillOnDrop)> {
    let req = StartRequest {
        process: Some(ProcessConfig {
            cmd: "tar".into(),
            args,
            ..Default::default()
        }),
        pty: None,
        tag: None,
        stdin: Some(stdin),
    };
    let opts = CallOptions {
        user: user.map(str::to_owned),
        timeout: Some(TAR_TIMEOUT),
    };
    // The guard kills tar if the transfer is abandoned: it must not run on, or block on a
    // standard input nobody closes.
    match client.start_guarded(req, opts).await {
        Ok(started) => Ok(started),
        Err(e) if matches!(e.code(), Code::NotFound | Code::PermissionDenied) => {
            Err(FileError::Unsupported(format!(
                "directories travel as tar archives, and tar cannot run in this sandbox: {}",
                agent_message(&e)
            )))
        }
        Err(e) => Err(agent_error(e)),
    }
}

/// The error a failed process stream stands for.
fn stream_error(e: AgentError) -> FileError {
    if e.code() == Code::DeadlineExceeded {
        FileError::Timeout(format!(
            "tar did not finish within {} s",
            TAR_TIMEOUT.as_secs()
        ))
    } else {
        agent_error(e)
    }
}

fn succeeded(end: &EndEvent) -> bool {
    end.exited && end.exit_code == 0
}

/// The error for a tar that did not succeed, carrying its standard error. The kind follows
/// what tar reports: a full disk (or a file over the size limit) is insufficient storage, a
/// refused permission forbidden, anything else (such as a damaged archive) tar's failure.
fn tar_failed(end: &EndEvent, stderr: &[u8]) -> FileError {
    let text = String::from_utf8_lossy(stderr);
    let text = text.trim();
    let how = if end.exited {
        format!("tar exited with status {}", end.exit_code)
    } else {
        format!("tar ended by {}", end.status)
    };
    let message = if text.is_empty() {
        how
    } else {
        format!("{how}: {text}")
    };
    // GNU tar reports a write the disk cut short as "Wrote only N of M bytes", without errno.
    let no_space = [
        "No space left on device",
        "Disk quota exceeded",
        "File too large",
        "Wrote only",
    ];
    if no_space.iter().any(|s| text.contains(s)) {
        FileError::InsufficientStorage(message)
    } else if text.contains("Permission denied") {
        FileError::Forbidden(message)
    } else {
        FileError::TarFailed(message)
    }
}

/// tar's output, event by event.
struct Archive {
    stream: ProcessStream,
    guard: KillOnDrop,
    stderr: Stderr,
    /// A chunk read ahead (the first, read before the answer's status is chosen).
    pending: Option<Bytes>,
    done: bool,
}

impl Archive {
    /// The next chunk of the archive; `None` after tar exited successfully.
    async fn next(&mut self) -> Option<Result<Bytes, FileError>> {
        if let Some(b) = self.pending.take() {
            return Some(Ok(b));
        }
        if self.done {
            return None;
        }
        let result = self.next_inner().await;
        if !matches!(result, Some(Ok(_))) {
            self.done = true;
        }
        result
    }

    async fn next_inner(&mut self) -> Option<Result<Bytes, FileError>> {
        loop {
            let event = match self.stream.next().await {
                Some(Ok(ev)) => ev.event,
                Some(Err(e)) => return Some(Err(stream_error(e))),
                None => return Some(Err(ended_early())),
            };
            match event {
                Some(Event::Data(d)) => match d.output {
                    Some(Output::Stdout(b)) if !b.is_empty() => return Some(Ok(Bytes::from(b))),
                    Some(Output::Stderr(b)) => self.stderr.push(&b),
                    _ => {}
                },
                Some(Event::End(end)) => {
                    self.guard.disarm();
                    if succeeded(&end) {
                        return None;
                    }
                    return Some(Err(tar_failed(&end, &self.stderr.0)));
                }
                _ => {}
            }
        }
    }
}

/// The error of a process stream that ended without tar's exit status.
fn ended_early() -> FileError {
    FileError::Unavailable("tar's output ended without its exit status".into())
}

/// The directory `dir` (absolute, checked to be one) as a tar stream.
pub(super) async fn download(
    client: AgentClient,
    dir: &str,
    user: Option<&str>,
) -> FileResult<ByteStream> {
    let args = ["-C", dir, "-cf", "-", "."].map(str::to_owned).to_vec();
    let (stream, guard) = start(&client, args, false, user).await?;
    let mut archive = Archive {
        stream,
        guard,
        stderr: Stderr::default(),
        pending: None,
        done: false,
    };
    // Wait for the first output: a tar that fails at once (say, an unreadable directory) is an
    // error of the call rather than a success with a broken body.
    match archive.next().await {
        Some(Ok(first)) => archive.pending = Some(first),
        Some(Err(e)) => return Err(e),
        None => {}
    }
    let dir = dir.to_owned();
    let body = futures_util::stream::unfold(archive, move |mut a| {
        let dir = dir.clone();
        async move {
            let item = a.next().await?;
            let item = item.map_err(|e| {
                tracing::warn!(dir, "tar download aborted: {e}");
                std::io::Error::other(e.to_string())
            });
            Some((item, a))
        }
    });
    Ok(Box::pin(body))
}

/// Why feeding tar's standard input stopped early.
enum FeedError {
    /// The caller's body failed (too large, or the client went away); its [`UploadFailure`]
    /// says how.
    Body,
    /// The agent refused the input (usually because tar stopped reading).
    Agent,
}

/// Hands the caller's body to tar's standard input in [`STDIN_CHUNK`] pieces, then closes it.
/// Each piece waits until tar has taken it, so the body is read only as fast as tar unpacks.
async fn feed<S>(client: &AgentClient, pid: u32, data: S) -> Result<(), FeedError>
where
    S: Stream<Item = Result<Bytes, BodyFailed>>,
{
    let mut data = pin!(data);
    let sel = Selector::Pid(pid);
    let mut buf = BytesMut::new();
    while let Some(chunk) = data.next().await {
        buf.extend_from_slice(&chunk.map_err(|_| FeedError::Body)?);
        if buf.len() >= STDIN_CHUNK {
            let piece = buf.split().freeze();
            if client.send_input(sel.clone(), piece, false).await.is_err() {
                return Err(FeedError::Agent);
            }
        }
    }
    if !buf.is_empty()
        && client
            .send_input(sel.clone(), buf.freeze(), false)
            .await
            .is_err()
    {
        return Err(FeedError::Agent);
    }
    client.close_stdin(sel).await.map_err(|_| FeedError::Agent)
}

/// Reads tar's events until its end, keeping its standard error.
async fn collect(stream: &mut ProcessStream, stderr: &mut Stderr) -> FileResult<EndEvent> {
    loop {
        match stream.next().await {
            Some(Ok(ev)) => match ev.event {
                Some(Event::Data(d)) => {
                    if let Some(Output::Stderr(b)) = d.output {
                        stderr.push(&b);
                    }
                }
                Some(Event::End(end)) => return Ok(end),
                _ => {}
            },
            Some(Err(e)) => return Err(stream_error(e)),
            None => return Err(ended_early()),
        }
    }
}

/// Unpacks the archive in `data` into directory `path` (made if missing) and answers with the
/// directory.
pub(super) async fn upload<S>(
    client: AgentClient,
    path: &str,
    user: Option<&str>,
    data: S,
    failure: Arc<UploadFailure>,
) -> FileResult<v1::FileEntry>
where
    S: Stream<Item = Result<Bytes, BodyFailed>> + Send + 'static,
{
    let (dir, made) = match stat_opt(&client, path, user).await? {
        Some(e) if is_dir(&e) => (e, false),
        Some(e) => return Err(not_a_directory(&e.path)),
        None => {
            let (made, e) = make_dir(&client, path, user).await?;
            (e, made)
        }
    };
    let args = ["-C", dir.path.as_str(), "-xf", "-"]
        .map(str::to_owned)
        .to_vec();
    let (mut stream, mut guard) = match start(&client, args, true, user).await {
        Ok(started) => started,
        Err(e) => {
            // Nothing was unpacked: a directory made for it would only be litter.
            if made {
                let _ = client.remove(&dir.path, user).await;
            }
            return Err(e);
        }
    };
    let pid = stream.pid();
    let mut stderr = Stderr::default();
    let end = {
        let mut fed = pin!(feed(&client, pid, data));
        let mut ended = pin!(collect(&mut stream, &mut stderr));
        tokio::select! {
            r = &mut fed => {
                match r {
                    // The guard kills tar on the way out.
                    Err(FeedError::Body) => {
                        return Err(failure.take().unwrap_or_else(|| {
                            FileError::Invalid("reading the request body failed".into())
                        }));
                    }
                    // tar has all of it, or stopped reading: its exit tells which. Closing its
                    // input (which may fail if it is gone) makes sure it does not wait for more.
                    Err(FeedError::Agent) => {
                        let _ = client.close_stdin(Selector::Pid(pid)).await;
                    }
                    Ok(()) => {}
                }
                ended.await
            }
            // tar ended before the whole body was sent: it found the archive's end, or failed.
            end = &mut ended => end,
        }
    }?;
    guard.disarm();
    if !succeeded(&end) {
        return Err(tar_failed(&end, &stderr.0));
    }
    let entry = client.stat(&dir.path, user).await.map_err(agent_error)?;
    Ok(file_entry(entry))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(code: i32) -> EndEvent {
        EndEvent {
            exit_code: code,
            exited: true,
            status: format!("exit status {code}"),
            error: None,
        }
    }

    #[test]
    fn failures_carry_stderr() {
        let e = tar_failed(&end(2), b"tar: This does not look like a tar archive\n");
        assert!(matches!(e, FileError::TarFailed(_)), "{e:?}");
        assert_eq!(e.code(), "tar_failed");
        assert!(e.to_string().contains("does not look like"), "{e}");
        let e = tar_failed(&end(2), b"tar: x: Cannot open: Permission denied\n");
        assert!(matches!(e, FileError::Forbidden(_)), "{e:?}");
        let e = tar_failed(&end(2), b"tar: x: Cannot write: No space left on device");
        assert!(matches!(e, FileError::InsufficientStorage(_)), "{e:?}");
        let e = tar_failed(&end(2), b"tar: big: Wrote only 2560 of 10240 bytes");
        assert!(matches!(e, FileError::InsufficientStorage(_)), "{e:?}");
        assert!(succeeded(&end(0)));
        assert!(!succeeded(&end(1)));
    }

    #[test]
    fn stderr_is_capped() {
        let mut s = Stderr::default();
        s.push(&vec![b'x'; MAX_TAR_STDERR + 10]);
        s.push(b"more");
        assert_eq!(s.0.len(), MAX_TAR_STDERR);
    }
}
