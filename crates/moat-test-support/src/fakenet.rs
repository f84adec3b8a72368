//! A fake internet for the network tests, built by the test and torn down when it ends: a
//! network namespace holding a web host (HTTP on 80 and 8080, HTTPS on 443 with a
//! self-signed certificate, a UDP echo on 7; IPv4 and IPv6), a DNS server answering the test's
//! names, and an address in a private range, linked to the host by a veth pair. The host routes only the
//! namespace's own addresses (documentation and private test ranges, one slot of them per
//! fake internet) into it: no test traffic can leave the machine.
//!
//! Up to [`SLOTS`] fake internets exist at once (tests run in parallel); a slot is held with
//! a lock file for as long as its [`FakeNet`] lives.

use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How many fake internets may exist at once.
pub const SLOTS: u8 = 16;

/// One fake internet (see the module's notes).
pub struct FakeNet {
    /// The network namespace's name.
    pub netns: String,
    /// The web host.
    pub web: Ipv4Addr,
    /// The DNS server.
    pub dns: Ipv4Addr,
    /// Another public address of the same hosts, for rules that allow one and not the other.
    pub other: Ipv4Addr,
    /// An address in a private range (`10.254.N.1`) the web host answers on too.
    pub private: Ipv4Addr,
    /// The web host's IPv6 address (`2001:db8:N::1`, documentation space).
    pub web6: Ipv6Addr,
    /// The host's end of the link: an address of the host itself.
    pub host_side: Ipv4Addr,
    slot: u8,
    hosts: Child,
    _lock: File,
    _dir: tempfile::TempDir,
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn must(args: &[&str]) {
    assert!(ip(args), "ip {}", args.join(" "));
}

/// Takes a free slot: its lock file, held with `flock` for as long as the file is open.
fn take_slot() -> (u8, File) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        for slot in 0..SLOTS {
            let path = format!("/tmp/moat-fakenet-{slot}.lock");
            let file = File::create(&path).expect("lock file");
            // SAFETY: flock on an open file.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return (slot, file);
            }
        }
        assert!(Instant::now() < deadline, "no free fake-internet slot");
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl FakeNet {
    /// Builds a fake internet whose DNS server answers `names` (a JSON object of name to a
    /// list of answers, each a list of addresses; successive queries of a type get successive
    /// answers). An address may be `{web}`, `{other}`, `{private}` or `{dns}`, for this fake
    /// internet's; `alias-ptr REVERSE NAME` answers an alias to the reverse-lookup name
    /// `REVERSE` (`{private-reverse}`: the private address's) and its PTR record `NAME`. The
    /// names `web.test`, `other.test` and `private.test` are added where `names` does not give
    /// them.
    pub fn start(names: serde_json::Value) -> FakeNet {
        let (slot, lock) = take_slot();
        let n = u32::from(slot);
        let netns = format!("moat-fake-{slot}");
        let veth = format!("mfk{slot}");
        let peer = format!("mfp{slot}");
        let host_side = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 51, 100, 0)) + 4 * n + 1);
        let fake_side = Ipv4Addr::from(u32::from(host_side) + 1);
        let base = u32::from(Ipv4Addr::new(203, 0, 113, 0)) + 16 * n;
        let web = Ipv4Addr::from(base + 1);
        let dns = Ipv4Addr::from(base + 2);
        let other = Ipv4Addr::from(base + 3);
        let private = Ipv4Addr::new(10, 254, slot, 1);
        let web6 = Ipv6Addr::new(0x2001, 0xdb8, u16::from(slot), 0, 0, 0, 0, 1);
        let host_side6 = Ipv6Addr::new(0x2001, 0xdb8, 0xff, u16::from(slot), 0, 0, 0, 1);
        let fake_side6 = Ipv6Addr::new(0x2001, 0xdb8, 0xff, u16::from(slot), 0, 0, 0, 2);
        // What a test that died without its drop left behind goes first.
        ip(&["netns", "del", &netns]);
        ip(&["link", "del", &veth]);
        must(&["netns", "add", &netns]);
        must(&["link", "add", &veth, "type", "veth", "peer", "name", &peer]);
        must(&["link", "set", &peer, "netns", &netns]);
        must(&["addr", "add", &format!("{host_side}/30"), "dev", &veth]);
        must(&[
            "-6",
            "addr",
            "add",
            &format!("{host_side6}/64"),
            "dev",
            &veth,
            "nodad",
        ]);
        must(&["link", "set", &veth, "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["-n", netns.as_str()];
            all.extend_from_slice(args);
            must(&all);
        };
        inside(&["link", "set", "lo", "up"]);
        inside(&["addr", "add", &format!("{fake_side}/30"), "dev", &peer]);
        inside(&["link", "set", &peer, "up"]);
        for a in [web, dns, other, private] {
            inside(&["addr", "add", &format!("{a}/32"), "dev", "lo"]);
        }
        inside(&[
            "-6",
            "addr",
            "add",
            &format!("{fake_side6}/64"),
            "dev",
            &peer,
            "nodad",
        ]);
        inside(&[
            "-6",
            "addr",
            "add",
            &format!("{web6}/128"),
            "dev",
            "lo",
            "nodad",
        ]);
        inside(&["route", "add", "default", "via", &host_side.to_string()]);
        inside(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &host_side6.to_string(),
        ]);
        must(&[
            "route",
            "replace",
            &format!("{}/28", Ipv4Addr::from(base)),
            "via",
            &fake_side.to_string(),
        ]);
        must(&[
            "-6",
            "route",
            "replace",
            &format!("{web6}/128"),
            "via",
            &fake_side6.to_string(),
        ]);
        must(&[
            "route",
            "replace",
            &format!("10.254.{slot}.0/24"),
            "via",
            &fake_side.to_string(),
        ]);

        let names = names
            .to_string()
            .replace("{web}", &web.to_string())
            .replace("{other}", &other.to_string())
            .replace("{private}", &private.to_string())
            .replace("{private-reverse}", &{
                let o = private.octets();
                format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
            })
            .replace("{dns}", &dns.to_string());
        let mut table = match serde_json::from_str(&names) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        for (name, addr) in [
            ("web.test", web),
            ("other.test", other),
            ("private.test", private),
        ] {
            table
                .entry(name)
                .or_insert_with(|| serde_json::json!([[addr.to_string()]]));
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let ready = dir.path().join("ready");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/net/fake_hosts.py");
        let hosts = Command::new("ip")
            .args(["netns", "exec", &netns, "python3"])
            .arg(&script)
            .args(["--dns", &dns.to_string(), "--names"])
            .arg(serde_json::Value::Object(table).to_string())
            .arg("--dir")
            .arg(dir.path())
            .arg("--ready")
            .arg(&ready)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the fake hosts");
        let mut net = FakeNet {
            netns,
            web,
            dns,
            other,
            private,
            web6,
            host_side,
            slot,
            hosts,
            _lock: lock,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready.exists() {
            if let Ok(Some(status)) = net.hosts.try_wait() {
                panic!("the fake hosts exited: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "the fake hosts never became ready"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        net
    }

    /// The `network` of a create that reaches this fake internet's hosts and resolves names
    /// with its DNS server, with `internet` and the rules given.
    pub fn network(&self, internet: bool, allow: &[&str], deny: &[&str]) -> serde_json::Value {
        serde_json::json!({
            "internet": internet,
            "allow": allow,
            "deny": deny,
            "dns_servers": [self.dns.to_string()],
        })
    }
}

impl FakeNet {
    /// URLs every policy keeps closed unless a rule names them: the host's side of the test
    /// network, a private address, the metadata address and the server's own port
    /// `server_port` on loopback.
    pub fn closed_urls(&self, server_port: u16) -> Vec<String> {
        vec![
            format!("http://{}/", self.host_side),
            format!("http://{}/", self.private),
            "http://169.254.169.254/".to_owned(),
            format!("http://127.0.0.1:{server_port}/healthz"),
        ]
    }
}

/// `curl` of `url` from sandbox `id` of `server` with `extra` options: its exit code and what
/// it printed (errors included).
pub fn curl(
    server: &crate::server::Server,
    key: &str,
    id: &str,
    extra: &str,
    url: &str,
) -> (i64, String) {
    let r = server.shell(
        key,
        id,
        &format!("curl -sS -k --max-time 5 {extra} '{url}' 2>&1"),
    );
    (
        r["exit_code"].as_i64().unwrap_or(-1),
        r["stdout"].as_str().unwrap_or_default().to_owned(),
    )
}

impl Drop for FakeNet {
    fn drop(&mut self) {
        let _ = self.hosts.kill();
        let _ = self.hosts.wait();
        let n = u32::from(self.slot);
        let base = u32::from(Ipv4Addr::new(203, 0, 113, 0)) + 16 * n;
        ip(&["route", "del", &format!("{}/28", Ipv4Addr::from(base))]);
        ip(&["route", "del", &format!("10.254.{}.0/24", self.slot)]);
        ip(&["-6", "route", "del", &format!("{}/128", self.web6)]);
        // Deleting the namespace deletes the veth pair with it.
        ip(&["netns", "del", &self.netns]);
        ip(&["link", "del", &format!("mfk{}", self.slot)]);
    }
}
