//! A streaming `multipart/form-data` reader (RFC 7578 / RFC 2046).
//!
//! Written for the upload route rather than taken from a library because the route needs the
//! *raw* `filename` parameter, directories included (libraries often strip them), and because
//! memory must stay bounded whatever the client sends: part headers are capped at
//! [`MAX_HEADER_BYTES`], the preamble and the part bodies are streamed, never buffered whole.

use bytes::{Buf, Bytes, BytesMut};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;

/// Most bytes of one part's header block; more is an error.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Most bytes of whitespace tolerated after a boundary before its line break.
const MAX_PADDING: usize = 256;

/// Why a multipart body could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultipartError(pub String);

impl std::fmt::Display for MultipartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn err<T>(msg: impl Into<String>) -> Result<T, MultipartError> {
    Err(MultipartError(msg.into()))
}

/// The headers of one part that the upload route needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartInfo {
    /// The form field name (`name` of `Content-Disposition`).
    pub name: Option<String>,
    /// The raw `filename` (or decoded `filename*`) parameter, unmodified.
    pub filename: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the first boundary.
    Preamble,
    /// Just after a boundary: `--` (end) or a line break (a part) follows.
    AfterBoundary,
    /// Inside a part's body.
    Body,
    /// After the closing boundary.
    Done,
}

/// Reads parts from a body delivered as a stream of chunks.
pub struct Multipart {
    src: BoxStream<'static, Result<Bytes, MultipartError>>,
    buf: BytesMut,
    /// `\r\n--boundary`: what ends a part's body.
    delimiter: Vec<u8>,
    state: State,
    eof: bool,
}

/// The `boundary` parameter of a `multipart/form-data` content type.
pub fn boundary(content_type: &str) -> Result<String, MultipartError> {
    let mut parts = content_type.split(';');
    let essence = parts.next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case("multipart/form-data") {
        return err("not multipart/form-data");
    }
    for (k, v) in params(parts.collect::<Vec<_>>().join(";").as_str())? {
        if k == "boundary" {
            if v.is_empty() || v.len() > 70 {
                return err("the multipart boundary must be 1 to 70 characters");
            }
            return Ok(v);
        }
    }
    err("multipart/form-data without a boundary")
}

/// Parses `; key=value` parameters (values are tokens or quoted strings with `\` escapes). Keys
/// come back lowercased; values untouched.
fn params(s: &str) -> Result<Vec<(String, String)>, MultipartError> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        while i < b.len() && (b[i] == b';' || b[i] == b' ' || b[i] == b'\t') {
            i += 1;
        }
        if i >= b.len() {
            break;
        }
        let key_start = i;
        while i < b.len() && b[i] != b'=' && b[i] != b';' {
            i += 1;
        }
        let key = s[key_start..i].trim().to_ascii_lowercase();
        if i >= b.len() || b[i] == b';' {
            // A parameter without a value (tolerated, ignored).
            continue;
        }
        i += 1; // '='
        while i < b.len() && (b[i] == b' ' || b[i] == b'\t') {
            i += 1;
        }
        let mut value = Vec::new();
        if i < b.len() && b[i] == b'"' {
            i += 1;
            let mut closed = false;
            while i < b.len() {
                match b[i] {
                    b'\\' if i + 1 < b.len() => {
                        value.push(b[i + 1]);
                        i += 2;
                    }
                    b'"' => {
                        i += 1;
                        closed = true;
                        break;
                    }
                    c => {
                        value.push(c);
                        i += 1;
                    }
                }
            }
            if !closed {
                return err(format!("unterminated quoted value for parameter '{key}'"));
            }
        } else {
            let start = i;
            while i < b.len() && b[i] != b';' {
                i += 1;
            }
            value.extend_from_slice(s[start..i].trim().as_bytes());
        }
        let value = String::from_utf8(value)
            .map_err(|_| MultipartError(format!("parameter '{key}' is not UTF-8")))?;
        out.push((key, value));
    }
    Ok(out)
}

/// Decodes an RFC 8187 extended value (`UTF-8''percent-encoded`).
fn ext_value(v: &str) -> Option<String> {
    let mut it = v.splitn(3, '\'');
    let charset = it.next()?;
    let _lang = it.next()?;
    let text = it.next()?;
    if !charset.eq_ignore_ascii_case("utf-8") {
        return None;
    }
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

/// The field name and filename from a part's header block.
fn part_info(block: &[u8]) -> Result<PartInfo, MultipartError> {
    let text = std::str::from_utf8(block)
        .map_err(|_| MultipartError("part headers are not UTF-8".into()))?;
    let mut info = PartInfo::default();
    for line in text.split("\r\n").filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return err(format!("malformed part header line: {line:?}"));
        };
        if !name.trim().eq_ignore_ascii_case("content-disposition") {
            continue;
        }
        let mut sections = value.splitn(2, ';');
        let kind = sections.next().unwrap_or("").trim();
        if !kind.eq_ignore_ascii_case("form-data") {
            return err(format!("part disposition is '{kind}', not form-data"));
        }
        let mut star = None;
        for (k, v) in params(sections.next().unwrap_or(""))? {
            match k.as_str() {
                "name" => info.name = Some(v),
                "filename" => info.filename = Some(v),
                "filename*" => star = ext_value(&v),
                _ => {}
            }
        }
        // RFC 6266: the extended form wins when both are present and it decodes.
        if star.is_some() {
            info.filename = star;
        }
    }
    Ok(info)
}

impl Multipart {
    /// A reader of the parts of `src`, separated by `boundary`.
    pub fn new(src: BoxStream<'static, Result<Bytes, MultipartError>>, boundary: &str) -> Self {
        // A line break before the first boundary lets one delimiter search find it too.
        let mut buf = BytesMut::with_capacity(8192);
        buf.extend_from_slice(b"\r\n");
        Multipart {
            src,
            buf,
            delimiter: format!("\r\n--{boundary}").into_bytes(),
            state: State::Preamble,
            eof: false,
        }
    }

    /// Reads one more chunk into the buffer; false at the end of the body.
    async fn fill(&mut self) -> Result<bool, MultipartError> {
        if self.eof {
            return Ok(false);
        }
        match self.src.next().await {
            Some(Ok(chunk)) => {
                self.buf.extend_from_slice(&chunk);
                Ok(true)
            }
            Some(Err(e)) => Err(e),
            None => {
                self.eof = true;
                Ok(false)
            }
        }
    }

    /// Advances to the next part and returns its headers; `None` after the last one. Whatever is
    /// left of the current part is skipped.
    pub async fn next_part(&mut self) -> Result<Option<PartInfo>, MultipartError> {
        loop {
            match self.state {
                State::Done => return Ok(None),
                State::Body => while self.read_chunk().await?.is_some() {},
                State::Preamble => {
                    if let Some(i) = memchr::memmem::find(&self.buf, &self.delimiter) {
                        self.buf.advance(i + self.delimiter.len());
                        self.state = State::AfterBoundary;
                    } else {
                        // Keep only what could be the start of the delimiter.
                        let keep = self.delimiter.len() - 1;
                        if self.buf.len() > keep {
                            self.buf.advance(self.buf.len() - keep);
                        }
                        if !self.fill().await? {
                            return err("no multipart boundary found in the body");
                        }
                    }
                }
                State::AfterBoundary => {
                    if self.buf.len() >= 2 && &self.buf[..2] == b"--" {
                        self.state = State::Done;
                        return Ok(None);
                    }
                    let Some(eol) = memchr::memmem::find(&self.buf, b"\r\n") else {
                        if self.buf.len() > MAX_PADDING {
                            return err("garbage after a multipart boundary");
                        }
                        if !self.fill().await? {
                            return err("unexpected end of the multipart body");
                        }
                        continue;
                    };
                    if self.buf[..eol].iter().any(|b| *b != b' ' && *b != b'\t') {
                        return err("garbage after a multipart boundary");
                    }
                    self.buf.advance(eol + 2);
                    let info = self.headers().await?;
                    self.state = State::Body;
                    return Ok(Some(info));
                }
            }
        }
    }

    /// Reads the header block of a part (up to and including the empty line).
    async fn headers(&mut self) -> Result<PartInfo, MultipartError> {
        loop {
            // An empty header block is just the blank line.
            if self.buf.starts_with(b"\r\n") {
                self.buf.advance(2);
                return Ok(PartInfo::default());
            }
            if let Some(end) = memchr::memmem::find(&self.buf, b"\r\n\r\n") {
                if end > MAX_HEADER_BYTES {
                    return err(format!("part headers exceed {MAX_HEADER_BYTES} bytes"));
                }
                let block = self.buf.split_to(end + 4);
                return part_info(&block[..end]);
            }
            if self.buf.len() > MAX_HEADER_BYTES {
                return err(format!("part headers exceed {MAX_HEADER_BYTES} bytes"));
            }
            if !self.fill().await? {
                return err("unexpected end of the multipart body in part headers");
            }
        }
    }

    /// The next piece of the current part's body; `None` at its end.
    pub async fn read_chunk(&mut self) -> Result<Option<Bytes>, MultipartError> {
        if self.state != State::Body {
            return Ok(None);
        }
        loop {
            if let Some(i) = memchr::memmem::find(&self.buf, &self.delimiter) {
                if i > 0 {
                    return Ok(Some(self.buf.split_to(i).freeze()));
                }
                self.buf.advance(self.delimiter.len());
                self.state = State::AfterBoundary;
                return Ok(None);
            }
            // Everything but a possible delimiter prefix at the end is body data.
            let safe = self.buf.len().saturating_sub(self.delimiter.len() - 1);
            if safe > 0 {
                return Ok(Some(self.buf.split_to(safe).freeze()));
            }
            if !self.fill().await? {
                return err("unexpected end of the multipart body in a part");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(body: &[u8], chunk: usize, boundary: &str) -> Multipart {
        let chunks: Vec<Result<Bytes, MultipartError>> = body
            .chunks(chunk.max(1))
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        Multipart::new(futures_util::stream::iter(chunks).boxed(), boundary)
    }

    async fn collect(mut m: Multipart) -> Result<Vec<(PartInfo, Vec<u8>)>, MultipartError> {
        let mut out = Vec::new();
        while let Some(info) = m.next_part().await? {
            let mut data = Vec::new();
            while let Some(c) = m.read_chunk().await? {
                data.extend_from_slice(&c);
            }
            out.push((info, data));
        }
        Ok(out)
    }

    fn run<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    const BODY: &[u8] = b"preamble\r\n--XyZ\r\n\
Content-Disposition: form-data; name=\"file\"; filename=\"/home/user/dir/a \\\"q\\\".txt\"\r\n\
Content-Type: application/octet-stream\r\n\r\n\
hello\r\n-XyZ\r\n--X\r\n--XyZ\r\n\
Content-Disposition: form-data; name=\"other\"\r\n\r\n\
ignored\r\n\
--XyZ\r\n\
Content-Disposition: form-data; name=file; filename*=UTF-8''%E2%82%AC/b.txt\r\n\r\n\
\r\n--XyZ--\r\nepilogue";

    #[test]
    fn parses_parts_at_every_chunk_size() {
        for chunk in [1, 2, 3, 7, 16, 64, 4096] {
            let parts = run(collect(reader(BODY, chunk, "XyZ"))).expect("parse");
            assert_eq!(parts.len(), 3, "chunk {chunk}");
            assert_eq!(parts[0].0.name.as_deref(), Some("file"));
            assert_eq!(
                parts[0].0.filename.as_deref(),
                Some("/home/user/dir/a \"q\".txt")
            );
            assert_eq!(parts[0].1, b"hello\r\n-XyZ\r\n--X");
            assert_eq!(parts[1].0.name.as_deref(), Some("other"));
            assert_eq!(parts[1].1, b"ignored");
            assert_eq!(parts[2].0.filename.as_deref(), Some("\u{20ac}/b.txt"));
            assert_eq!(parts[2].1, b"");
        }
    }

    #[test]
    fn skips_unread_parts() {
        let mut m = reader(BODY, 5, "XyZ");
        let mut names = Vec::new();
        run(async {
            while let Some(info) = m.next_part().await.expect("part") {
                names.push(info.name);
            }
        });
        assert_eq!(names.len(), 3);
    }

    #[test]
    fn rejects_bad_bodies() {
        assert!(run(collect(reader(b"no boundary here", 4, "XyZ"))).is_err());
        assert!(
            run(collect(reader(
                b"--XyZ\r\nContent-Disposition: form-data\r\n\r\ntrunc",
                4,
                "XyZ"
            )))
            .is_err()
        );
        let huge = format!(
            "--XyZ\r\nX-Long: {}\r\n\r\nx\r\n--XyZ--",
            "a".repeat(MAX_HEADER_BYTES + 10)
        );
        let e = run(collect(reader(huge.as_bytes(), 1000, "XyZ"))).expect_err("too long");
        assert!(e.0.contains("exceed"), "{e}");
        assert!(
            run(collect(reader(
                b"--XyZ\r\nbad header\r\n\r\nx\r\n--XyZ--",
                4,
                "XyZ"
            )))
            .is_err()
        );
    }

    #[test]
    fn finds_boundaries() {
        assert_eq!(
            boundary("multipart/form-data; boundary=abc").as_deref(),
            Ok("abc")
        );
        assert_eq!(
            boundary("Multipart/Form-Data; charset=x; boundary=\"a b\"").as_deref(),
            Ok("a b")
        );
        assert!(boundary("multipart/form-data").is_err());
        assert!(boundary("text/plain; boundary=x").is_err());
    }
}
