//! The two kernel settings that turn a sandbox's network namespace into one where every
//! connection ends at moat: routes that make every address local, and an nftables chain that
//! hands every TCP connection to one transparent listener.
//!
//! In nft's words, the chain is (in table `inet moat`):
//!
//! ```text
//! chain egress { type filter hook prerouting priority mangle; policy accept;
//!   ip daddr 127.0.0.0/8 accept          # the sandbox's own loopback services
//!   ip6 daddr ::1 accept
//!   meta l4proto tcp tproxy to :PORT     # every other connection: moat's listener
//!   icmp type echo-request drop          # no answer from "the internet" to a ping
//!   icmpv6 type echo-request drop
//! }
//! ```
//!
//! Both are built as netlink messages here, so setting up a sandbox runs no program.

use std::io;

use super::netlink::Messages;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFPROTO_INET: u8 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFT_META_NFPROTO: u32 = 15;
const NFT_META_L4PROTO: u32 = 16;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFT_CMP_EQ: u32 = 0;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFTA_TPROXY_FAMILY: u16 = 1;
const NFTA_TPROXY_REG_PORT: u16 = 3;
const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
const NF_INET_PRE_ROUTING: u32 = 0;
/// `NF_IP_PRI_MANGLE`: before the kernel routes the packet to a socket.
const PRIORITY_MANGLE: i32 = -150;

const TABLE: &str = "moat";
const CHAIN: &str = "egress";

/// One expression of a rule being built.
struct Rule<'a>(&'a mut Messages);

impl Rule<'_> {
    fn expr(&mut self, name: &str, body: impl FnOnce(&mut Messages)) {
        self.0.open(NFTA_LIST_ELEM);
        self.0.attr_str(NFTA_EXPR_NAME, name);
        self.0.open(NFTA_EXPR_DATA);
        body(self.0);
        self.0.close();
        self.0.close();
    }

    fn meta(&mut self, key: u32) {
        self.expr("meta", |m| {
            m.attr_be32(NFTA_META_KEY, key);
            m.attr_be32(NFTA_META_DREG, NFT_REG_1);
        });
    }

    fn payload(&mut self, base: u32, offset: u32, len: u32) {
        self.expr("payload", |m| {
            m.attr_be32(NFTA_PAYLOAD_DREG, NFT_REG_1);
            m.attr_be32(NFTA_PAYLOAD_BASE, base);
            m.attr_be32(NFTA_PAYLOAD_OFFSET, offset);
            m.attr_be32(NFTA_PAYLOAD_LEN, len);
        });
    }

    fn equals(&mut self, value: &[u8]) {
        self.expr("cmp", |m| {
            m.attr_be32(NFTA_CMP_SREG, NFT_REG_1);
            m.attr_be32(NFTA_CMP_OP, NFT_CMP_EQ);
            m.open(NFTA_CMP_DATA);
            m.attr(NFTA_DATA_VALUE, value);
            m.close();
        });
    }

    fn verdict(&mut self, code: u32) {
        self.expr("immediate", |m| {
            m.attr_be32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT);
            m.open(NFTA_IMMEDIATE_DATA);
            m.open(NFTA_DATA_VERDICT);
            m.attr_be32(NFTA_VERDICT_CODE, code);
            m.close();
            m.close();
        });
    }

    fn tproxy(&mut self, port: u16) {
        self.expr("immediate", |m| {
            m.attr_be32(NFTA_IMMEDIATE_DREG, NFT_REG_1);
            m.open(NFTA_IMMEDIATE_DATA);
            m.attr(NFTA_DATA_VALUE, &port.to_be_bytes());
            m.close();
        });
        self.expr("tproxy", |m| {
            // Unspecified: IPv4 and IPv6 alike, which an `inet` table allows.
            m.attr_be32(NFTA_TPROXY_FAMILY, 0);
            m.attr_be32(NFTA_TPROXY_REG_PORT, NFT_REG_1);
        });
    }
}

/// The nfnetlink header: family, version 0, resource id (big-endian).
fn nfgen(family: u8, res_id: u16) -> [u8; 4] {
    let id = res_id.to_be_bytes();
    [family, 0, id[0], id[1]]
}

fn rule(m: &mut Messages, build: impl FnOnce(&mut Rule<'_>)) {
    let flags = (libc::NLM_F_CREATE | libc::NLM_F_APPEND | libc::NLM_F_ACK) as u16;
    m.begin(
        NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWRULE,
        flags,
        &nfgen(NFPROTO_INET, 0),
    );
    m.attr_str(NFTA_RULE_TABLE, TABLE);
    m.attr_str(NFTA_RULE_CHAIN, CHAIN);
    m.open(NFTA_RULE_EXPRESSIONS);
    build(&mut Rule(m));
    m.close();
    m.end();
}

/// The batch that makes table `inet moat` with the chain of this module's notes, steering TCP
/// to `port`. With `replace`, a table already there is deleted and made afresh in the same
/// transaction; without, the batch fails with `EEXIST` when there is one. Replacing costs the
/// kernel a wait for readers of the old chain (milliseconds), so a fresh namespace is not
/// asked to.
fn batch(port: u16, replace: bool) -> Messages {
    let mut m = Messages::default();
    let nft = |kind: u16| NFNL_SUBSYS_NFTABLES << 8 | kind;
    let ack = libc::NLM_F_ACK as u16;
    m.begin(NFNL_MSG_BATCH_BEGIN, 0, &nfgen(0, NFNL_SUBSYS_NFTABLES));
    m.end();
    // Replacing: add, delete, add, so the delete never fails for want of a table and the
    // table ends empty. Otherwise one exclusive add.
    let kinds: &[u16] = if replace {
        &[NFT_MSG_NEWTABLE, NFT_MSG_DELTABLE, NFT_MSG_NEWTABLE]
    } else {
        &[NFT_MSG_NEWTABLE]
    };
    for &kind in kinds {
        let flags = match kind {
            NFT_MSG_NEWTABLE if replace => ack | libc::NLM_F_CREATE as u16,
            NFT_MSG_NEWTABLE => ack | (libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16,
            _ => ack,
        };
        m.begin(nft(kind), flags, &nfgen(NFPROTO_INET, 0));
        m.attr_str(NFTA_TABLE_NAME, TABLE);
        m.end();
    }
    m.begin(
        nft(NFT_MSG_NEWCHAIN),
        ack | libc::NLM_F_CREATE as u16,
        &nfgen(NFPROTO_INET, 0),
    );
    m.attr_str(NFTA_CHAIN_TABLE, TABLE);
    m.attr_str(NFTA_CHAIN_NAME, CHAIN);
    m.open(NFTA_CHAIN_HOOK);
    m.attr_be32(NFTA_HOOK_HOOKNUM, NF_INET_PRE_ROUTING);
    m.attr_be32(NFTA_HOOK_PRIORITY, PRIORITY_MANGLE as u32);
    m.close();
    m.attr_be32(NFTA_CHAIN_POLICY, NF_ACCEPT);
    m.attr_str(NFTA_CHAIN_TYPE, "filter");
    m.end();

    rule(&mut m, |r| {
        r.meta(NFT_META_NFPROTO);
        r.equals(&[NFPROTO_IPV4]);
        r.payload(NFT_PAYLOAD_NETWORK_HEADER, 16, 1);
        r.equals(&[127]);
        r.verdict(NF_ACCEPT);
    });
    rule(&mut m, |r| {
        r.meta(NFT_META_NFPROTO);
        r.equals(&[NFPROTO_IPV6]);
        r.payload(NFT_PAYLOAD_NETWORK_HEADER, 24, 16);
        r.equals(&std::net::Ipv6Addr::LOCALHOST.octets());
        r.verdict(NF_ACCEPT);
    });
    rule(&mut m, |r| {
        r.meta(NFT_META_L4PROTO);
        r.equals(&[libc::IPPROTO_TCP as u8]);
        r.tproxy(port);
    });
    for (family, proto, echo_request) in [
        (NFPROTO_IPV4, libc::IPPROTO_ICMP as u8, 8u8),
        (NFPROTO_IPV6, libc::IPPROTO_ICMPV6 as u8, 128u8),
    ] {
        rule(&mut m, |r| {
            r.meta(NFT_META_NFPROTO);
            r.equals(&[family]);
            r.meta(NFT_META_L4PROTO);
            r.equals(&[proto]);
            r.payload(NFT_PAYLOAD_TRANSPORT_HEADER, 0, 1);
            r.equals(&[echo_request]);
            r.verdict(NF_DROP);
        });
    }
    m.begin(NFNL_MSG_BATCH_END, 0, &nfgen(0, NFNL_SUBSYS_NFTABLES));
    m.end();
    m
}

/// Installs the steering chain in the calling thread's network namespace, replacing one a
/// previous call installed.
pub(crate) fn install_steering(port: u16) -> io::Result<()> {
    match batch(port, false).send(libc::NETLINK_NETFILTER) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            batch(port, true).send(libc::NETLINK_NETFILTER)
        }
        done => done,
    }
}

const RTM_NEWLINK: u16 = 16;
const RTM_NEWROUTE: u16 = 24;
const RTA_OIF: u16 = 4;
const RT_TABLE_LOCAL: u8 = 255;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_HOST: u8 = 254;
const RTN_LOCAL: u8 = 2;

/// Makes every address of `family` (`AF_INET`, `AF_INET6`) local to the calling thread's
/// network namespace, on interface `ifindex` (its loopback): `ip route replace local default
/// dev lo`. A connection to anywhere then stays in the namespace, where the steering chain
/// hands it to moat; nothing is ever routed out.
pub(crate) fn route_everything_local(family: u8, ifindex: u32) -> io::Result<()> {
    let mut m = Messages::default();
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
    let mut rtmsg = [0u8; 12];
    rtmsg[0] = family;
    rtmsg[4] = RT_TABLE_LOCAL;
    rtmsg[5] = RTPROT_BOOT;
    rtmsg[6] = RT_SCOPE_HOST;
    rtmsg[7] = RTN_LOCAL;
    let flags = (libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_REPLACE) as u16;
    m.begin(RTM_NEWROUTE, flags, &rtmsg);
    m.attr(RTA_OIF, &ifindex.to_ne_bytes());
    m.end();
    m.send(libc::NETLINK_ROUTE)
}

/// Sets interface `ifindex` up (`ip link set dev lo up`); already up, it stays so.
pub(crate) fn set_up_link(ifindex: u32) -> io::Result<()> {
    let mut m = Messages::default();
    // struct ifinfomsg: family, pad, type, index, flags, change.
    let mut ifinfo = [0u8; 16];
    ifinfo[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    let up = libc::IFF_UP as u32;
    ifinfo[8..12].copy_from_slice(&up.to_ne_bytes());
    ifinfo[12..16].copy_from_slice(&up.to_ne_bytes());
    m.begin(RTM_NEWLINK, libc::NLM_F_ACK as u16, &ifinfo);
    m.end();
    m.send(libc::NETLINK_ROUTE)
}
