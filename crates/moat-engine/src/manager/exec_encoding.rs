//! Output bytes turned into the JSON strings of an exec's answer, per its
//! [`v1::OutputEncoding`].

use base64::Engine as _;
use moat_proto::v1;

/// The encoder of one output (stdout or stderr) of one exec. Output arrives in pieces; in
/// `utf8` a character split between two pieces is held back until it is whole, so it is not
/// replaced, and whatever is still held at the end is flushed (replaced) by [`Self::finish`].
#[derive(Debug, Default)]
pub(super) struct OutputEncoder {
    encoding: v1::OutputEncoding,
    /// The start of a UTF-8 character whose rest has not arrived yet (at most 3 bytes).
    held: Vec<u8>,
}

impl OutputEncoder {
    pub(super) fn new(encoding: v1::OutputEncoding) -> Self {
        OutputEncoder {
            encoding,
            held: Vec::new(),
        }
    }

    /// The text of the next piece of output; empty when all of it is held back.
    pub(super) fn push(&mut self, piece: &[u8]) -> String {
        match self.encoding {
            v1::OutputEncoding::Base64 => base64::engine::general_purpose::STANDARD.encode(piece),
            v1::OutputEncoding::Utf8 => {
                let mut bytes = std::mem::take(&mut self.held);
                bytes.extend_from_slice(piece);
                let keep = incomplete_tail(&bytes);
                self.held = bytes.split_off(bytes.len() - keep);
                match String::from_utf8(bytes) {
                    Ok(text) => text,
                    Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
                }
            }
        }
    }

    /// What is still held back at the end of the output, replaced; empty when nothing is.
    pub(super) fn finish(&mut self) -> String {
        let held = std::mem::take(&mut self.held);
        String::from_utf8_lossy(&held).into_owned()
    }
}

/// How many bytes at the end of `bytes` begin a UTF-8 character that is not complete yet (0
/// when the end is a whole character or bytes that can never become one).
fn incomplete_tail(bytes: &[u8]) -> usize {
    // A character is at most 4 bytes, so an unfinished one starts in the last 3.
    for back in 1..=bytes.len().min(3) {
        let tail = &bytes[bytes.len() - back..];
        if let Err(e) = std::str::from_utf8(tail)
            && e.valid_up_to() == 0
            && e.error_len().is_none()
        {
            return back;
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utf8_pieces(pieces: &[&[u8]]) -> Vec<String> {
        let mut enc = OutputEncoder::new(v1::OutputEncoding::Utf8);
        let mut out: Vec<String> = pieces.iter().map(|p| enc.push(p)).collect();
        out.push(enc.finish());
        out
    }

    #[test]
    fn split_characters_are_carried() {
        assert_eq!(utf8_pieces(&[b"a\xc3", b"\xa9b"]), ["a", "éb", ""]);
        // A four-byte character in three pieces.
        assert_eq!(
            utf8_pieces(&[b"\xf0\x9f", b"\x98", b"\x80!"]),
            ["", "", "😀!", ""]
        );
    }

    #[test]
    fn invalid_bytes_are_replaced() {
        assert_eq!(
            utf8_pieces(&[b"a\xffb", b"\xff"]),
            ["a\u{fffd}b", "\u{fffd}", ""]
        );
        // A lead byte followed by a non-continuation byte is not held.
        assert_eq!(utf8_pieces(&[b"\xc3A"]), ["\u{fffd}A", ""]);
        // An unfinished character at the end is replaced by `finish`.
        assert_eq!(utf8_pieces(&[b"x\xe2\x82"]), ["x", "\u{fffd}"]);
    }

    #[test]
    fn base64_is_per_piece() {
        let mut enc = OutputEncoder::new(v1::OutputEncoding::Base64);
        assert_eq!(enc.push(b"\xc3"), "ww==");
        assert_eq!(enc.push(&[0, 1, 2]), "AAEC");
        assert_eq!(enc.finish(), "");
    }
}
