//! The name a connection's first bytes carry: the SNI of a TLS ClientHello, or the Host of a
//! plain HTTP request. Read only to check it against the policy; the bytes are then relayed
//! unchanged.

/// The most bytes read before a name must have shown up.
pub const MAX_SNIFF: usize = 16 * 1024;

/// What the first bytes of a connection say about its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniffed {
    /// The name it carries, lowercase, without a port or trailing dot.
    Name(String),
    /// Not enough bytes yet.
    More,
    /// No name (not TLS with SNI, not HTTP with Host), or a malformed start.
    None,
}

/// Looks for the name in `buf`, the connection's bytes so far.
pub fn sniff(buf: &[u8]) -> Sniffed {
    Sniffer::default().sniff(buf)
}

/// [`sniff`] over a buffer that only grows between calls: the end of an HTTP request's head is
/// looked for only in the bytes added since the last call, so a client that sends its head a
/// byte at a time costs the relay time in proportion to the head, not to its square.
#[derive(Debug, Default)]
pub struct Sniffer {
    /// How much of the buffer has been searched for the end of the head.
    searched: usize,
}

impl Sniffer {
    /// Looks for the name in `buf`, which holds the bytes of the last call and maybe more.
    pub fn sniff(&mut self, buf: &[u8]) -> Sniffed {
        match buf.first() {
            None => Sniffed::More,
            Some(0x16) => tls_sni(buf),
            Some(_) => {
                // The last three bytes searched may start the end with the new ones.
                let from = self.searched.saturating_sub(3).min(buf.len());
                self.searched = buf.len();
                http_host(buf, from)
            }
        }
    }
}

fn normalise(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    ok.then(|| name.to_ascii_lowercase())
}

/// Reads the SNI of the ClientHello in the first TLS record.
fn tls_sni(buf: &[u8]) -> Sniffed {
    if buf.len() < 5 {
        return Sniffed::More;
    }
    let record_len = u16::from_be_bytes([buf[3], buf[4]]) as usize;
    if buf.len() < 5 + record_len {
        return if 5 + record_len > MAX_SNIFF {
            Sniffed::None
        } else {
            Sniffed::More
        };
    }
    let rec = &buf[5..5 + record_len];
    client_hello_sni(rec).map_or(Sniffed::None, Sniffed::Name)
}

/// A cursor over bytes that fails, rather than panics, past their end.
struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.buf.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| b[0] as usize)
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
    }
}

fn client_hello_sni(rec: &[u8]) -> Option<String> {
    let mut c = Cursor { buf: rec, at: 0 };
    // Handshake type 1 (ClientHello) and its 3-byte length, which must fit the record.
    if c.u8()? != 1 {
        return None;
    }
    let len = c.take(3)?;
    let len = (len[0] as usize) << 16 | (len[1] as usize) << 8 | len[2] as usize;
    let mut c = Cursor {
        buf: rec.get(4..4 + len)?,
        at: 0,
    };
    c.take(2 + 32)?; // version, random
    let n = c.u8()?;
    c.take(n)?; // session id
    let n = c.u16()?;
    c.take(n)?; // cipher suites
    let n = c.u8()?;
    c.take(n)?; // compression methods
    let n = c.u16()?;
    let mut ext = Cursor {
        buf: c.take(n)?,
        at: 0,
    };
    // Exactly one `server_name` extension with exactly one host name: with two, which one a
    // server reads is its own business.
    let mut found = None;
    while ext.at < ext.buf.len() {
        let kind = ext.u16()?;
        let n = ext.u16()?;
        let body = ext.take(n)?;
        if kind != 0 {
            continue;
        }
        if found.is_some() {
            return None;
        }
        let mut sni = Cursor { buf: body, at: 0 };
        let list = sni.u16()?;
        let mut list = Cursor {
            buf: sni.take(list)?,
            at: 0,
        };
        let mut names = Vec::new();
        while list.at < list.buf.len() {
            let name_type = list.u8()?;
            let n = list.u16()?;
            let name = list.take(n)?;
            if name_type == 0 {
                names.push(name);
            }
        }
        let [name] = names[..] else {
            return None;
        };
        found = Some(normalise(std::str::from_utf8(name).ok()?)?);
    }
    found
}

/// Reads the Host header of a plain HTTP/1 request (its absolute-form target, if it has one,
/// must name the same host); the end of its head is looked for from `from` on.
fn http_host(buf: &[u8], from: usize) -> Sniffed {
    // Not a request line's method (uppercase letters, then a space): no name will come, so
    // say so now rather than wait for bytes that are not HTTP.
    let method = buf.iter().take_while(|b| b.is_ascii_uppercase()).count();
    match buf.get(method) {
        _ if method > 16 => return Sniffed::None,
        Some(b' ') if method > 0 => {}
        Some(_) => return Sniffed::None,
        None => return Sniffed::More,
    }
    let Some(end) = buf[from..]
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| from + at)
    else {
        return if buf.len() >= MAX_SNIFF {
            Sniffed::None
        } else {
            Sniffed::More
        };
    };
    let Ok(head) = std::str::from_utf8(&buf[..end]) else {
        return Sniffed::None;
    };
    // Read as strictly as the strictest server, so no server reads a host moat did not: no
    // bare LF, no folded lines, no space before a header's colon, a three-part request line.
    if head.replace("\r\n", "").contains(['\r', '\n']) {
        return Sniffed::None;
    }
    let mut lines = head.split("\r\n");
    let Some(request) = lines.next() else {
        return Sniffed::None;
    };
    let parts: Vec<&str> = request.split(' ').collect();
    let [method, target, version] = parts[..] else {
        return Sniffed::None;
    };
    if !version.starts_with("HTTP/1.") || method.eq_ignore_ascii_case("CONNECT") {
        return Sniffed::None;
    }
    let mut hosts = Vec::new();
    for line in lines {
        let Some((k, v)) = line.split_once(':') else {
            return Sniffed::None;
        };
        if k.is_empty() || k.contains(|c: char| c.is_ascii_whitespace()) {
            return Sniffed::None;
        }
        if k.eq_ignore_ascii_case("host") {
            hosts.push(v.trim());
        }
    }
    let [host] = hosts[..] else {
        // None, or two: which one a server reads is its own business.
        return Sniffed::None;
    };
    let Some(name) = strip_port(host).and_then(normalise) else {
        return Sniffed::None;
    };
    // The target: a path, `*`, or an absolute URL (any scheme, any case), whose host a server
    // uses over the header's, so it must be the same.
    if !(target.starts_with('/') || target == "*") {
        let Some((_, rest)) = target.split_once("://") else {
            return Sniffed::None;
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        // User information has no place in a request's target (RFC 9112), and parsers split
        // `a\@b` differently: a target with any is not read.
        if authority.contains(['@', '\\']) {
            return Sniffed::None;
        }
        if strip_port(authority).and_then(normalise).as_deref() != Some(&name) {
            return Sniffed::None;
        }
    }
    Sniffed::Name(name)
}

/// The bytes of a plain HTTP/1 connection's start (`buf`, holding at least the first
/// request's head) with that request made the connection's last: its `Connection`,
/// `Proxy-Connection` and `Keep-Alive` headers replaced by `Connection: close`, and its
/// `Upgrade`, `HTTP2-Settings` and `TE` headers dropped. A server then answers that one
/// request and closes, never switching the connection to another protocol, so nothing
/// moat never read is served on it.
pub fn one_request_only(buf: &[u8]) -> Vec<u8> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return buf.to_vec();
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut out = Vec::with_capacity(buf.len() + 19);
    for (i, line) in head.split("\r\n").enumerate() {
        let name = line.split(':').next().unwrap_or_default();
        let drop = i > 0
            && [
                "connection",
                "proxy-connection",
                "keep-alive",
                "upgrade",
                "http2-settings",
                "te",
            ]
            .iter()
            .any(|h| name.eq_ignore_ascii_case(h));
        if !drop {
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    out.extend_from_slice(&buf[end + 4..]);
    out
}

/// `host[:port]` without the port; `None` for a bracketed IPv6 literal (never a domain).
fn strip_port(host: &str) -> Option<&str> {
    if host.starts_with('[') {
        return None;
    }
    Some(host.split_once(':').map_or(host, |(h, _)| h))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ClientHello carrying `sni`.
    pub(crate) fn client_hello(sni: &str) -> Vec<u8> {
        hello_with(&sni_extension(&[sni]))
    }

    /// A `server_name` extension listing `names`.
    fn sni_extension(names: &[&str]) -> Vec<u8> {
        let mut list = Vec::new();
        for name in names {
            list.push(0);
            list.extend_from_slice(&(name.len() as u16).to_be_bytes());
            list.extend_from_slice(name.as_bytes());
        }
        let mut sni_ext = (list.len() as u16).to_be_bytes().to_vec();
        sni_ext.extend_from_slice(&list);
        let mut ext = vec![0, 0];
        ext.extend_from_slice(&(sni_ext.len() as u16).to_be_bytes());
        ext.extend_from_slice(&sni_ext);
        ext
    }

    /// A minimal ClientHello with the extensions `exts`.
    fn hello_with(exts: &[u8]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[0; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[1, 0]); // null compression
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(exts);
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![0x16, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn the_sni_of_a_client_hello_is_read() {
        let hello = client_hello("PyPI.org.");
        assert_eq!(sniff(&hello), Sniffed::Name("pypi.org".into()));
        for cut in [1, 4, 20, hello.len() - 1] {
            assert_eq!(sniff(&hello[..cut]), Sniffed::More, "{cut}");
        }
        let mut bad = hello.clone();
        bad[5] = 2; // not a ClientHello
        assert_eq!(sniff(&bad), Sniffed::None);
        // Two names, in one extension or in two: which one a server reads is its own.
        assert_eq!(
            sniff(&hello_with(&sni_extension(&["a.com", "evil.com"]))),
            Sniffed::None
        );
        let mut two = sni_extension(&["a.com"]);
        two.extend_from_slice(&sni_extension(&["evil.com"]));
        assert_eq!(sniff(&hello_with(&two)), Sniffed::None);
    }

    #[test]
    fn the_first_request_is_made_the_last() {
        let out = one_request_only(
            b"GET / HTTP/1.1\r\nHost: a.com\r\nConnection: keep-alive\r\nKeep-Alive: 5\r\n\r\nGET / HTTP/1.1\r\nHost: evil.com\r\n\r\n",
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET / HTTP/1.1\r\nHost: a.com\r\nConnection: close\r\n\r\nGET / HTTP/1.1\r\nHost: evil.com\r\n\r\n"
        );
        // Nor does it become another protocol.
        let out = one_request_only(
            b"GET / HTTP/1.1\r\nHost: a.com\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: websocket\r\nHTTP2-Settings: AA\r\nTE: trailers\r\n\r\n",
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET / HTTP/1.1\r\nHost: a.com\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn the_host_of_an_http_request_is_read() {
        assert_eq!(
            sniff(b"GET / HTTP/1.1\r\nHost: Example.COM:8080\r\n\r\n"),
            Sniffed::Name("example.com".into())
        );
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nHost: a"), Sniffed::More);
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n\r\n"), Sniffed::None);
        assert_eq!(
            sniff(b"GET / HTTP/1.1\r\nHost: a.com\r\nHost: b.com\r\n\r\n"),
            Sniffed::None
        );
        assert_eq!(
            sniff(b"GET http://evil.com/ HTTP/1.1\r\nHost: a.com\r\n\r\n"),
            Sniffed::None
        );
        assert_eq!(
            sniff(b"CONNECT evil.com:443 HTTP/1.1\r\nHost: a.com\r\n\r\n"),
            Sniffed::None
        );
        // User information in the target, which parsers split differently.
        assert_eq!(
            sniff(b"GET http://evil.com\\@a.com/ HTTP/1.1\r\nHost: a.com\r\n\r\n"),
            Sniffed::None
        );
        assert_eq!(
            sniff(b"GET http://user@a.com/ HTTP/1.1\r\nHost: a.com\r\n\r\n"),
            Sniffed::None
        );
        // A scheme in any case names the host a server uses.
        assert_eq!(
            sniff(b"GET HTTP://evil.com/ HTTP/1.1\r\nHost: a.com\r\n\r\n"),
            Sniffed::None
        );
        assert_eq!(
            sniff(b"GET HTTP://A.com/x HTTP/1.1\r\nHost: a.com\r\n\r\n"),
            Sniffed::Name("a.com".into())
        );
        // What some servers read differently: a bare LF, a folded line, a space before ':'.
        assert_eq!(
            sniff(b"GET / HTTP/1.1\nHost: evil\r\nX: 1\r\n Host: a.com\r\n\r\n"),
            Sniffed::None
        );
        assert_eq!(
            sniff(b"GET / HTTP/1.1\r\nX: 1\r\n Host: a.com\r\n\r\n"),
            Sniffed::None
        );
        assert_eq!(
            sniff(b"GET / HTTP/1.1\r\nHost : a.com\r\n\r\n"),
            Sniffed::None
        );
        assert_eq!(
            sniff(b"GET  / HTTP/1.1\r\nHost: a.com\r\n\r\n"),
            Sniffed::None
        );
        assert_eq!(
            sniff(b"GET a.com:80 HTTP/1.1\r\nHost: a.com\r\n\r\n"),
            Sniffed::None
        );
        // Not HTTP: known at once, without waiting for more.
        assert_eq!(sniff(b"SSH-2.0-OpenSSH"), Sniffed::None);
        assert_eq!(sniff(b"GE"), Sniffed::More);
        assert_eq!(sniff(b"get / HTTP/1.1"), Sniffed::None);
    }

    #[test]
    fn a_head_fed_a_byte_at_a_time_reads_as_one_sent_whole() {
        let heads: [&[u8]; 3] = [
            b"GET / HTTP/1.1\r\nHost: Example.COM:8080\r\nX: y\r\n\r\nbody",
            b"GET / HTTP/1.1\r\nHost: a.com\r\nHost: b.com\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: \r\n\r",
        ];
        for head in heads {
            let mut sniffer = Sniffer::default();
            let mut last = Sniffed::More;
            for end in 1..=head.len() {
                last = sniffer.sniff(&head[..end]);
                if last != Sniffed::More {
                    assert_eq!(last, sniff(&head[..end]), "{end}");
                    break;
                }
            }
            assert_eq!(last, sniff(head), "{}", String::from_utf8_lossy(head));
        }
    }
}
