//! The private channel between the agent and a language driver.
//!
//! Two pipes that only the driver holds (its stdout and stderr are separate pipes, so nothing the
//! code prints is ever read as a frame): the agent writes one command per line to the first, the
//! driver answers with JSON frames, one per line, on the second: `ready` once, then per command
//! `result` frames, an `error` frame and one `done`. The agent checks every frame: fields it does
//! not know are dropped and the size caps apply whatever the driver (or code that found the pipe
//! in its own process) writes.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use serde_json::{Map, Value};

use super::limits::{MAX_FRAME_BYTES, MAX_RESULT_ENTRY_BYTES};

/// Result keys whose values are text (base64 for the binary formats).
const TEXT_KEYS: &[&str] = &[
    "text",
    "html",
    "markdown",
    "svg",
    "png",
    "jpeg",
    "pdf",
    "latex",
    "javascript",
];
/// Result keys whose values are JSON.
const JSON_KEYS: &[&str] = &["json", "data", "chart", "extra"];

/// One frame from a driver.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// The driver is ready for commands.
    Ready,
    /// A `result` line for the stream, already checked.
    Result(Value),
    /// An exception of the code.
    Error {
        /// Exception class.
        name: String,
        /// Its message.
        value: String,
        /// The formatted traceback.
        traceback: String,
    },
    /// The command is finished.
    Done,
}

/// Parses one frame line; `None` for anything that is not a known frame.
pub fn parse(line: &[u8]) -> Option<Frame> {
    let value: Value = serde_json::from_slice(line).ok()?;
    let obj = value.as_object()?;
    let text = |key: &str| {
        let s = obj.get(key).and_then(Value::as_str).unwrap_or_default();
        truncate(s, MAX_RESULT_ENTRY_BYTES).to_string()
    };
    match obj.get("type")?.as_str()? {
        "ready" => Some(Frame::Ready),
        "done" => Some(Frame::Done),
        "error" => Some(Frame::Error {
            name: text("name"),
            value: text("value"),
            traceback: text("traceback"),
        }),
        "result" => Some(Frame::Result(result(obj))),
        _ => None,
    }
}

/// The stream's `result` line made of a driver's result frame: known keys only, each entry at
/// most [`MAX_RESULT_ENTRY_BYTES`] (a larger one is left out).
fn result(frame: &Map<String, Value>) -> Value {
    let mut out = Map::new();
    out.insert("type".into(), Value::from("result"));
    let main = frame
        .get("is_main_result")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    out.insert("is_main_result".into(), Value::from(main));
    for &key in TEXT_KEYS {
        if let Some(Value::String(s)) = frame.get(key)
            && s.len() <= MAX_RESULT_ENTRY_BYTES
        {
            let s = if key == "text" { unquote(s) } else { s };
            out.insert(key.into(), Value::from(s));
        }
    }
    for &key in JSON_KEYS {
        if let Some(v) = frame.get(key)
            && !v.is_null()
            && serde_json::to_vec(v).is_ok_and(|b| b.len() <= MAX_RESULT_ENTRY_BYTES)
        {
            out.insert(key.into(), v.clone());
        }
    }
    Value::Object(out)
}

/// `text` without one pair of surrounding quotes, as upstream's server reports a result's
/// `text/plain` (so the repr `'abc'` of a string result reads `abc`): both ends `'`, or both `"`.
fn unquote(text: &str) -> &str {
    for q in ['\'', '"'] {
        if let Some(inner) = text.strip_prefix(q).and_then(|t| t.strip_suffix(q)) {
            return inner;
        }
    }
    // A lone quote is both the first and the last character: upstream strips it to nothing.
    if text == "'" || text == "\"" {
        return "";
    }
    text
}

/// At most `max` bytes of `s`, cut at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    &s[..cut]
}

/// Splits the byte stream of the event pipe into lines of at most [`MAX_FRAME_BYTES`]; a longer
/// line is skipped whole.
#[derive(Debug, Default)]
pub struct LineSplitter {
    buf: Vec<u8>,
    skipping: bool,
}

impl LineSplitter {
    /// Adds `data`; complete lines go to `lines`.
    pub fn push(&mut self, mut data: &[u8], lines: &mut Vec<Vec<u8>>) {
        while let Some(i) = memchr::memchr(b'\n', data) {
            let part = &data[..i];
            if !self.skipping && self.buf.len() + part.len() <= MAX_FRAME_BYTES {
                self.buf.extend_from_slice(part);
                lines.push(std::mem::take(&mut self.buf));
            }
            self.buf.clear();
            self.skipping = false;
            data = &data[i + 1..];
        }
        if self.skipping {
            return;
        }
        if self.buf.len() + data.len() > MAX_FRAME_BYTES {
            self.buf = Vec::new();
            self.skipping = true;
        } else {
            self.buf.extend_from_slice(data);
        }
    }
}

/// A pipe whose ends are close-on-exec and numbered 3 or above (so that they can be handed to a
/// driver under their own numbers): (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints for the kernel to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned these descriptors and nothing else owns them.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((above_stdio(r)?, above_stdio(w)?))
}

/// `fd`, or a copy of it numbered 3 or above when it is 0, 1 or 2 (the agent's stdio may be
/// closed, which makes those numbers free).
fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() >= 3 {
        return Ok(fd);
    }
    // SAFETY: fcntl with integer arguments on an open descriptor.
    let copy = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if copy < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(copy) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames() {
        assert_eq!(parse(br#"{"type":"done"}"#), Some(Frame::Done));
        assert_eq!(parse(br#"{"type":"ready"}"#), Some(Frame::Ready));
        assert_eq!(parse(b"not json"), None);
        assert_eq!(parse(br#"{"type":"surprise"}"#), None);
        let Some(Frame::Result(v)) = parse(
            br#"{"type":"result","is_main_result":true,"text":"2","html":"<b>","png":7,"evil":"x","json":{"a":1}}"#,
        ) else {
            panic!("not a result");
        };
        assert_eq!(
            v,
            serde_json::json!({"type":"result","is_main_result":true,"text":"2","html":"<b>","json":{"a":1}})
        );
        let Some(Frame::Error { name, value, .. }) =
            parse(br#"{"type":"error","name":"E","value":"v"}"#)
        else {
            panic!("not an error");
        };
        assert_eq!((name.as_str(), value.as_str()), ("E", "v"));
    }

    #[test]
    fn result_text_loses_one_pair_of_quotes() {
        let text = |t: &str| {
            let line = serde_json::json!({"type": "result", "text": t, "html": "'h'"}).to_string();
            match parse(line.as_bytes()) {
                Some(Frame::Result(v)) => {
                    assert_eq!(v["html"], "'h'", "only text is unquoted");
                    v["text"].as_str().expect("text").to_string()
                }
                other => panic!("not a result: {other:?}"),
            }
        };
        assert_eq!(text("'abc'"), "abc");
        assert_eq!(text("\"it's\""), "it's");
        assert_eq!(text("''"), "");
        assert_eq!(text("'"), "");
        assert_eq!(text("''x''"), "'x'");
        assert_eq!(text("'a\""), "'a\"");
        assert_eq!(text("42"), "42");
    }

    #[test]
    fn lines_split_and_overlong_skipped() {
        let mut s = LineSplitter::default();
        let mut lines = Vec::new();
        s.push(b"ab", &mut lines);
        s.push(b"c\nd\n", &mut lines);
        assert_eq!(lines, vec![b"abc".to_vec(), b"d".to_vec()]);
        lines.clear();
        s.push(&vec![b'x'; MAX_FRAME_BYTES + 1], &mut lines);
        s.push(b"yy\nok\n", &mut lines);
        assert_eq!(lines, vec![b"ok".to_vec()]);
    }

    #[test]
    fn pipes_are_above_stdio() {
        let (r, w) = pipe().expect("pipe");
        assert!(r.as_raw_fd() >= 3 && w.as_raw_fd() >= 3);
    }
}
