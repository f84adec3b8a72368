//! The CLI's standard output: every answer a command prints goes through [`print`], which
//! reports a reader that went away as [`OutputClosed`] instead of panicking as `println!` does.
//! Commands then exit quietly with [`EXIT_OUTPUT_CLOSED`], as a pipeline's writer would.

use std::io::Write;

/// 128 + SIGPIPE: what a shell reports for a writer whose reader went away (`moat … | head`).
pub const EXIT_OUTPUT_CLOSED: u8 = 128 + libc::SIGPIPE as u8;

/// The reader of standard output went away (a closed pipe).
#[derive(Debug)]
pub struct OutputClosed;

impl std::fmt::Display for OutputClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("standard output was closed")
    }
}

impl std::error::Error for OutputClosed {}

/// Writes `text` to standard output and flushes it. A closed pipe is [`OutputClosed`]; any
/// other failure is an error naming standard output.
pub fn print(text: impl AsRef<str>) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out
        .write_all(text.as_ref().as_bytes())
        .and_then(|()| out.flush())
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(OutputClosed.into()),
        Err(e) => Err(anyhow::anyhow!("writing to standard output: {e}")),
    }
}

/// [`print`] with a newline after `text`.
pub fn println(text: impl AsRef<str>) -> anyhow::Result<()> {
    print(format!("{}\n", text.as_ref()))
}

/// Whether `e` is (or was caused by) a closed standard output.
pub fn is_closed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<OutputClosed>())
}
