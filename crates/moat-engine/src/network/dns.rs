//! The few pieces of the DNS message format the answerer needs: a query's question, a
//! refusal built from a query, and the addresses in an answer. Nothing else of a message is
//! interpreted; answers go back to the sandbox as the resolver sent them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Record types the answerer reads addresses from.
pub const TYPE_A: u16 = 1;
/// IPv6 address records.
pub const TYPE_AAAA: u16 = 28;
/// `REFUSED`: the policy does not let the sandbox resolve the name.
pub const RCODE_REFUSED: u8 = 5;
/// `NXDOMAIN`: an answer pointed the name at an address the sandbox may not reach.
pub const RCODE_NXDOMAIN: u8 = 3;
/// `SERVFAIL`: no resolver answered.
pub const RCODE_SERVFAIL: u8 = 2;

/// The question of a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// The query's id.
    pub id: u16,
    /// The name asked for, lowercase, without a trailing dot.
    pub name: String,
    /// The record type asked for.
    pub qtype: u16,
    /// Where the question ends in the message.
    end: usize,
}

/// The most compression pointers one name may follow: real names need a few; a chain of
/// thousands would make parsing an answer cost quadratic time.
const MAX_POINTERS: usize = 16;

/// Reads a name starting at `at` (following compression pointers when `pointers`); returns it
/// and where it ends in the message (after the first pointer, if any).
fn read_name(msg: &[u8], mut at: usize, pointers: bool) -> Option<(String, usize)> {
    let mut name = String::new();
    let mut end = None;
    // Each pointer must go backwards, and there are at most MAX_POINTERS of them.
    let mut limit = at;
    let mut followed = 0;
    loop {
        let len = *msg.get(at)? as usize;
        match len & 0xC0 {
            0x00 if len == 0 => {
                return Some((name, end.unwrap_or(at + 1)));
            }
            0x00 => {
                let label = msg.get(at + 1..at + 1 + len)?;
                if !name.is_empty() {
                    name.push('.');
                }
                for &b in label {
                    // Only what a host name may hold; anything else makes the name unusable.
                    if !(b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                        return None;
                    }
                    name.push(b.to_ascii_lowercase() as char);
                }
                if name.len() > 253 {
                    return None;
                }
                at += 1 + len;
            }
            0xC0 if pointers && followed < MAX_POINTERS => {
                let ptr = (len & 0x3F) << 8 | *msg.get(at + 1)? as usize;
                // Never into the header, and always backwards.
                if ptr < 12 || ptr >= limit {
                    return None;
                }
                end.get_or_insert(at + 2);
                limit = ptr;
                at = ptr;
                followed += 1;
            }
            _ => return None,
        }
    }
}

impl Question {
    /// The question of `msg`, a query (QR clear) with exactly one question; `None` for
    /// anything else.
    pub fn parse(msg: &[u8]) -> Option<Question> {
        // A query (QR clear) and a standard one (opcode 0): nothing else is forwarded.
        if msg.len() < 12 || msg[2] & 0x80 != 0 || msg[2] & 0x78 != 0 {
            return None;
        }
        let qdcount = u16::from_be_bytes([msg[4], msg[5]]);
        if qdcount != 1 {
            return None;
        }
        // A query's question is never compressed: what moat checks is what it forwards.
        let (name, at) = read_name(msg, 12, false)?;
        let qtype = u16::from_be_bytes([*msg.get(at)?, *msg.get(at + 1)?]);
        msg.get(at + 3)?;
        Some(Question {
            id: u16::from_be_bytes([msg[0], msg[1]]),
            name,
            qtype,
            end: at + 4,
        })
    }

    /// The query moat asks a resolver for this question: id `id`, a standard query (opcode 0)
    /// with recursion desired, the one question written out afresh, nothing else. Whatever
    /// else the sandbox's message carried (other opcodes, records, trailing bytes) stays here.
    pub fn upstream_query(&self, id: u16) -> Vec<u8> {
        let mut q = id.to_be_bytes().to_vec();
        q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        for label in self.name.split('.').filter(|l| !l.is_empty()) {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&self.qtype.to_be_bytes());
        q.extend_from_slice(&1u16.to_be_bytes()); // class IN
        q
    }

    /// An answer to `query` (whose question this is) with no records and `rcode`.
    pub fn reply(&self, query: &[u8], rcode: u8) -> Vec<u8> {
        let mut r = query[..self.end.min(query.len())].to_vec();
        // QR set, opcode and RD kept; RA set; the rcode; one question, nothing else.
        r[2] = 0x80 | (query[2] & 0x79);
        r[3] = 0x80 | (rcode & 0x0F);
        r[6..12].fill(0);
        r
    }
}

/// What moat reads of a resolver's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Its id.
    pub id: u16,
    /// Whether it came truncated (TC): the whole answer needs TCP.
    pub truncated: bool,
    /// The addresses of its answer section, with their TTLs (seconds, at most a day).
    pub answers: Vec<(IpAddr, u32)>,
    /// Every address anywhere in it (answer, authority and additional sections, and the
    /// address hints of SVCB and HTTPS records).
    pub all: Vec<IpAddr>,
    /// The name each record of its answer section is of (a reverse-lookup name among them
    /// says whose name it tells).
    pub owners: Vec<String>,
}

/// Record types whose data may hint at addresses (RFC 9460): SVCB, HTTPS.
const TYPE_SVCB: u16 = 64;
const TYPE_HTTPS: u16 = 65;
/// The SvcParamKeys of the address hints.
const KEY_IPV4HINT: u16 = 4;
const KEY_IPV6HINT: u16 = 6;

/// The addresses the hints of an SVCB or HTTPS record's data hold; `None` if it is malformed.
fn svcb_hints(msg: &[u8], data_at: usize, data: &[u8]) -> Option<Vec<IpAddr>> {
    // SvcPriority, then TargetName (uncompressed), then the parameters.
    let (_, mut at) = read_name(msg, data_at + 2, false)?;
    let end = data_at + data.len();
    let mut hints = Vec::new();
    while at < end {
        let head = msg.get(at..at + 4)?;
        let key = u16::from_be_bytes([head[0], head[1]]);
        let len = u16::from_be_bytes([head[2], head[3]]) as usize;
        let value = msg.get(at + 4..at + 4 + len)?;
        match key {
            KEY_IPV4HINT => {
                for a in value.chunks(4) {
                    hints.push(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(a).ok()?)));
                }
            }
            KEY_IPV6HINT => {
                for a in value.chunks(16) {
                    hints.push(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(a).ok()?)));
                }
            }
            _ => {}
        }
        at += 4 + len;
    }
    (at == end).then_some(hints)
}

/// The most records of an answer moat reads.
const MAX_RECORDS: usize = 512;

/// What `msg` answers; `None` for a message that is not a well-formed answer.
pub fn read_answer(msg: &[u8]) -> Option<Answer> {
    if msg.len() < 12 || msg[2] & 0x80 == 0 {
        return None;
    }
    let count = |i: usize| u16::from_be_bytes([msg[i], msg[i + 1]]) as usize;
    let (qdcount, ancount) = (count(4), count(6));
    let records = ancount + count(8) + count(10);
    if qdcount > 1 || records > MAX_RECORDS {
        return None;
    }
    let mut at = 12;
    for _ in 0..qdcount {
        at = read_name(msg, at, true)?.1 + 4;
    }
    let mut answer = Answer {
        id: u16::from_be_bytes([msg[0], msg[1]]),
        truncated: msg[2] & 0x02 != 0,
        answers: Vec::new(),
        all: Vec::new(),
        owners: Vec::new(),
    };
    for i in 0..records {
        let (owner, next) = read_name(msg, at, true)?;
        if i < ancount {
            answer.owners.push(owner);
        }
        at = next;
        let head = msg.get(at..at + 10)?;
        let rtype = u16::from_be_bytes([head[0], head[1]]);
        // A TTL with the top bit set counts as zero (RFC 2181); none is kept past a day.
        let ttl = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        let ttl = if ttl > i32::MAX as u32 {
            0
        } else {
            ttl.min(86_400)
        };
        let len = u16::from_be_bytes([head[8], head[9]]) as usize;
        let data = msg.get(at + 10..at + 10 + len)?;
        let addr = match (rtype, len) {
            (TYPE_A, 4) => <[u8; 4]>::try_from(data)
                .ok()
                .map(|a| IpAddr::V4(Ipv4Addr::from(a))),
            (TYPE_AAAA, 16) => <[u8; 16]>::try_from(data)
                .ok()
                .map(|a| IpAddr::V6(Ipv6Addr::from(a))),
            _ => None,
        };
        if let Some(addr) = addr {
            answer.all.push(addr);
            if i < ancount {
                answer.answers.push((addr, ttl));
            }
        }
        if rtype == TYPE_SVCB || rtype == TYPE_HTTPS {
            // Hints are addresses a client may connect to: checked like the others (a
            // malformed record's, which nothing can check, makes the answer unusable).
            answer.all.extend(svcb_hints(msg, at + 10, data)?);
        }
        at += 10 + len;
    }
    Some(answer)
}

/// Sets the id of the message `msg` (a query forwarded, or its answer sent back).
pub fn set_id(msg: &mut [u8], id: u16) {
    if msg.len() >= 2 {
        msg[..2].copy_from_slice(&id.to_be_bytes());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;

    /// A query for `name` of type `qtype` with id `id`.
    pub(crate) fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
        let mut m = id.to_be_bytes().to_vec();
        m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        for label in name.split('.').filter(|l| !l.is_empty()) {
            m.push(label.len() as u8);
            m.extend_from_slice(label.as_bytes());
        }
        m.push(0);
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        m
    }

    /// An answer to `q` with one A record per address, each named by a pointer to the
    /// question's name.
    pub(crate) fn answer(q: &[u8], addrs: &[Ipv4Addr], ttl: u32) -> Vec<u8> {
        let mut m = q.to_vec();
        m[2] |= 0x80;
        m[3] = 0x80;
        m[6..8].copy_from_slice(&(addrs.len() as u16).to_be_bytes());
        for a in addrs {
            m.extend_from_slice(&[0xC0, 12]);
            m.extend_from_slice(&TYPE_A.to_be_bytes());
            m.extend_from_slice(&1u16.to_be_bytes());
            m.extend_from_slice(&ttl.to_be_bytes());
            m.extend_from_slice(&4u16.to_be_bytes());
            m.extend_from_slice(&a.octets());
        }
        m
    }

    #[test]
    fn hints_of_https_records_and_owners_of_answers_are_read() {
        let q = query(9, "hint.test", TYPE_HTTPS);
        let mut m = q.clone();
        m[2] |= 0x80;
        m[6..8].copy_from_slice(&1u16.to_be_bytes());
        // hint.test HTTPS 1 . ipv4hint=169.254.169.254 ipv6hint=fd00:ec2::254
        let v6: Ipv6Addr = "fd00:ec2::254".parse().unwrap();
        let mut data = vec![0, 1, 0];
        data.extend_from_slice(&KEY_IPV4HINT.to_be_bytes());
        data.extend_from_slice(&4u16.to_be_bytes());
        data.extend_from_slice(&[169, 254, 169, 254]);
        data.extend_from_slice(&KEY_IPV6HINT.to_be_bytes());
        data.extend_from_slice(&16u16.to_be_bytes());
        data.extend_from_slice(&v6.octets());
        m.extend_from_slice(&[0xC0, 12]);
        m.extend_from_slice(&TYPE_HTTPS.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        m.extend_from_slice(&60u32.to_be_bytes());
        m.extend_from_slice(&(data.len() as u16).to_be_bytes());
        m.extend_from_slice(&data);
        let read = read_answer(&m).unwrap();
        assert_eq!(
            read.all,
            [
                IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
                IpAddr::V6(v6)
            ]
        );
        assert!(read.answers.is_empty(), "hints are not pinned");
        assert_eq!(read.owners, ["hint.test"]);
        // A hint cut short makes the answer unusable.
        let mut cut = m.clone();
        let n = cut.len();
        cut[n - data.len() - 2..n - data.len()]
            .copy_from_slice(&((data.len() - 1) as u16).to_be_bytes());
        cut.pop();
        assert_eq!(read_answer(&cut), None);
    }

    #[test]
    fn a_question_is_read_lowercase_and_refused_in_kind() {
        let q = query(7, "PyPI.Org", TYPE_AAAA);
        let question = Question::parse(&q).unwrap();
        assert_eq!(question.id, 7);
        assert_eq!(question.name, "pypi.org");
        assert_eq!(question.qtype, TYPE_AAAA);
        let r = question.reply(&q, RCODE_REFUSED);
        assert_eq!(&r[..2], &7u16.to_be_bytes());
        assert_eq!(r[2] & 0x80, 0x80);
        assert_eq!(r[3] & 0x0F, RCODE_REFUSED);
        assert_eq!(Question::parse(&r), None, "an answer is not a query");
        assert_eq!(read_answer(&r).unwrap().answers, vec![]);
    }

    #[test]
    fn addresses_are_read_through_name_pointers() {
        let q = query(9, "example.com", TYPE_A);
        let a = answer(
            &q,
            &[Ipv4Addr::new(203, 0, 113, 10), Ipv4Addr::new(10, 0, 0, 1)],
            60,
        );
        let read = read_answer(&a).unwrap();
        assert_eq!(read.id, 9);
        assert_eq!(read.all.len(), 2);
        assert_eq!(
            read.answers,
            vec![
                ("203.0.113.10".parse().unwrap(), 60),
                ("10.0.0.1".parse().unwrap(), 60)
            ]
        );
    }

    #[test]
    fn malformed_messages_are_refused_not_read() {
        assert_eq!(Question::parse(&[0; 5]), None);
        let mut q = query(1, "a.com", TYPE_A);
        q[12] = 60; // a label running past the end
        assert_eq!(Question::parse(&q), None);
        // A pointer loop.
        let mut a = query(1, "a.com", TYPE_A);
        a[2] |= 0x80;
        a[7] = 1;
        a.extend_from_slice(&[0xC0, (a.len()) as u8]);
        assert_eq!(read_answer(&a), None);
        // A name with a character no host name has.
        assert_eq!(Question::parse(&query(1, "a\u{1}.com", TYPE_A)), None);
        // A compressed question, and an opcode other than a standard query.
        let mut q = query(1, "a.com", TYPE_A);
        q.truncate(12);
        q.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1]);
        assert_eq!(Question::parse(&q), None);
        let mut q = query(1, "a.com", TYPE_A);
        q[2] |= 5 << 3; // UPDATE
        assert_eq!(Question::parse(&q), None);
    }

    #[test]
    fn long_pointer_chains_are_refused_quickly() {
        // An answer whose one record's name is a chain of pointers, each 2 bytes back.
        let mut a = query(1, "a.com", TYPE_A);
        a[2] |= 0x80;
        let start = a.len();
        a.extend_from_slice(&[1, b'x', 0]);
        let mut prev = start;
        for _ in 0..100 {
            let here = a.len();
            a.extend_from_slice(&[0xC0 | (prev >> 8) as u8, prev as u8]);
            prev = here;
        }
        let record = a.len();
        a.extend_from_slice(&[0xC0 | (prev >> 8) as u8, prev as u8]);
        a.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 203, 0, 113, 1]);
        a[7] = 1;
        let _ = record;
        assert_eq!(read_answer(&a), None, "more than MAX_POINTERS pointers");
    }

    #[test]
    fn the_upstream_query_is_the_question_alone() {
        let mut q = query(9, "Web.Test", TYPE_AAAA);
        q.extend_from_slice(b"trailing bytes");
        q[11] = 1; // an additional record the sandbox added
        let question = Question::parse(&q).unwrap();
        let up = question.upstream_query(77);
        assert_eq!(up, {
            let mut expect = query(77, "web.test", TYPE_AAAA);
            expect[2] = 0x01;
            expect
        });
    }
}
