//! Network egress against a fake internet the tests build (`moat_test_support::fakenet`): a
//! real `moat serve`, real sandboxes, `curl` and `getent` inside them, a web host, an HTTPS
//! host and a DNS server in a network namespace of the test's own. Each case names what it
//! checks of the policy.

#![allow(clippy::unwrap_used)]

use moat_test_support::fakenet::{FakeNet, curl};
use moat_test_support::need_root;
use moat_test_support::server::{Reply, Server, body};
use serde_json::{Value, json};

/// Runs `script` in sandbox `id` and returns its exit code and stdout.
fn sh(server: &Server, key: &str, id: &str, script: &str) -> (i64, String) {
    let r = server.shell(key, id, script);
    (
        r["exit_code"].as_i64().unwrap_or(-1),
        r["stdout"].as_str().unwrap_or_default().to_owned(),
    )
}

fn with_network(server: &Server, key: &str, network: Value) -> String {
    server.create_sandbox_with(key, json!({ "network": network }))
}

/// `PUT /v1/sandboxes/{id}/network` of `network`.
fn put_network(server: &Server, key: &str, id: &str, network: Value) -> Reply {
    server.request(
        "PUT",
        &format!("/v1/sandboxes/{id}/network"),
        Some(key),
        Some(&body(network)),
    )
}

/// The latest refusals of sandbox `id`'s connections and queries, as JSON text.
fn denials_of(server: &Server, key: &str, id: &str) -> String {
    network_of(server, key, id)["stats"]["recent_denials"].to_string()
}

fn network_of(server: &Server, key: &str, id: &str) -> Value {
    let r = server.request(
        "GET",
        &format!("/v1/sandboxes/{id}/network"),
        Some(key),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

#[test]
fn a_sandbox_has_no_network_by_default() {
    need_root!();
    let net = FakeNet::start(json!({}));
    let server = Server::start();
    let key = server.admin_key();
    let id = server.create_sandbox(&key);
    let (code, out) = curl(&server, &key, &id, "", &format!("http://{}/", net.web));
    assert_ne!(code, 0, "{out}");
    // No resolver answers either.
    let (code, _) = sh(&server, &key, &id, "getent hosts web.test");
    assert_ne!(code, 0);
    // The host reaches the web host, so the failure above is the sandbox's.
    let direct = std::process::Command::new("curl")
        .args(["-s", "--max-time", "5", &format!("http://{}/", net.web)])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&direct.stdout).starts_with("http 80"));
    let shown = network_of(&server, &key, &id);
    assert_eq!(shown["network"]["internet"], false);
    assert!(shown.get("stats").is_none(), "{shown}");
}

#[test]
fn internet_reaches_public_hosts_and_names_but_never_the_host_or_private_ranges() {
    need_root!();
    let net = FakeNet::start(json!({}));
    let server = Server::start();
    let key = server.admin_key();
    let id = with_network(&server, &key, net.network(true, &[], &[]));
    let (code, out) = curl(&server, &key, &id, "", &format!("http://{}/", net.web));
    assert_eq!(
        (code, out.as_str()),
        (0, format!("http 80 host={} sni=-\n", net.web).as_str())
    );
    // Names resolve through moat's answerer, in any case, with or without the final dot.
    let (code, out) = curl(&server, &key, &id, "", "http://WEB.test./");
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("http 80 host=WEB.test."), "{out}");
    let (code, out) = curl(&server, &key, &id, "", "https://web.test/");
    assert_eq!(code, 0, "{out}");
    assert_eq!(out, "https 443 host=web.test sni=web.test\n");
    // The host itself, its loopback, the server's own port, private and metadata addresses:
    // closed under the internet policy.
    for url in net.closed_urls(server.port) {
        let (code, out) = curl(&server, &key, &id, "", &url);
        assert_ne!(code, 0, "{url}: {out}");
    }
    // A name pointing at a private address is not answered (rebinding).
    let (code, out) = sh(&server, &key, &id, "getent hosts private.test");
    assert_ne!(code, 0, "{out}");
    // Nor is a reverse lookup of a private address.
    sh(&server, &key, &id, &format!("getent hosts {}", net.private));
    let shown = network_of(&server, &key, &id);
    let stats = &shown["stats"];
    assert!(stats["connections"].as_u64().unwrap() >= 3, "{shown}");
    let reasons: Vec<String> = stats["recent_denials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| format!("{} {}", d["target"], d["reason"]))
        .collect();
    let all = reasons.join("\n");
    assert!(all.contains("the host itself"), "{all}");
    assert!(all.contains("a private network"), "{all}");
    assert!(all.contains("the cloud metadata address"), "{all}");
    assert!(all.contains("private.test"), "{all}");
    assert!(all.contains("reverse lookups of closed addresses"), "{all}");
    // The server's totals count them too.
    let metrics = server.request("GET", "/metrics", Some(&key), None).text();
    let total = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in\n{metrics}"))
    };
    assert!(total("moat_egress_denied_total") >= 3, "{metrics}");
    assert!(total("moat_egress_connections_total") >= 3, "{metrics}");
    assert!(total("moat_dns_refused_total") >= 1, "{metrics}");
    assert!(total("moat_dns_answered_total") >= 2, "{metrics}");
}

#[test]
fn cidr_rules_allow_and_deny_the_most_specific_way() {
    need_root!();
    let net = FakeNet::start(json!({}));
    let server = Server::start();
    let key = server.admin_key();
    let allow_web = format!("{}", net.web);
    let id = with_network(&server, &key, net.network(false, &[&allow_web], &[]));
    let (code, out) = curl(&server, &key, &id, "", &format!("http://{}/", net.web));
    assert_eq!(code, 0, "{out}");
    let (code, _) = curl(&server, &key, &id, "", &format!("http://{}/", net.other));
    assert_ne!(code, 0, "an address no rule allows");
    // No domain rule: the answerer resolves nothing.
    let (code, _) = sh(&server, &key, &id, "getent hosts web.test");
    assert_ne!(code, 0);

    // A port-limited rule, and a deny more specific than an allow.
    let base = u32::from(net.web) - 1;
    let subnet = format!("{}/28", std::net::Ipv4Addr::from(base));
    let id = with_network(
        &server,
        &key,
        net.network(
            false,
            &[&subnet, &format!("{}:8080", net.dns)],
            &[&net.other.to_string()],
        ),
    );
    let (code, _) = curl(&server, &key, &id, "", &format!("http://{}/", net.web));
    assert_eq!(code, 0);
    let (code, _) = curl(&server, &key, &id, "", &format!("http://{}/", net.other));
    assert_ne!(code, 0, "the deny is more specific");
    // Explicitly opening a private network works for an admin.
    let id = with_network(
        &server,
        &key,
        net.network(false, &[&format!("{}/32", net.private)], &[]),
    );
    let (code, out) = curl(&server, &key, &id, "", &format!("http://{}/", net.private));
    assert_eq!(code, 0, "{out}");
}

#[test]
fn domain_rules_pin_addresses_and_check_sni_and_host() {
    need_root!();
    let net = FakeNet::start(json!({}));
    let server = Server::start();
    let key = server.admin_key();
    // E2B's shape: one name allowed, everything else denied.
    let id = with_network(
        &server,
        &key,
        net.network(false, &["web.test"], &["0.0.0.0/0"]),
    );
    let (code, out) = curl(&server, &key, &id, "", "http://web.test/");
    assert_eq!(code, 0, "{out}");
    let (code, out) = curl(&server, &key, &id, "", "https://web.test/");
    assert_eq!(
        (code, out.as_str()),
        (0, "https 443 host=web.test sni=web.test\n")
    );
    let (code, out) = curl(&server, &key, &id, "", "http://Web.Test.:8080/");
    assert_eq!(code, 0, "{out}");
    // Names no rule allows are not resolved.
    let (code, _) = sh(&server, &key, &id, "getent hosts other.test");
    assert_ne!(code, 0);
    // The address of an allowed name, by IP: no name, no connection.
    let (code, _) = curl(&server, &key, &id, "", &format!("http://{}/", net.web));
    assert_ne!(code, 0, "HTTP by IP");
    let (code, _) = curl(&server, &key, &id, "", &format!("https://{}/", net.web));
    assert_ne!(code, 0, "HTTPS by IP (no SNI)");
    // Another name sent to the allowed name's address: wrong Host, wrong SNI.
    let (code, _) = curl(
        &server,
        &key,
        &id,
        "-H 'Host: other.test'",
        "http://web.test/",
    );
    assert_ne!(code, 0, "domain fronting by Host");
    let (code, _) = curl(
        &server,
        &key,
        &id,
        &format!("--resolve other.test:443:{}", net.web),
        "https://other.test/",
    );
    assert_ne!(code, 0, "wrong SNI");
    // The allowed name, sent to an address moat never resolved for it.
    let (code, _) = curl(
        &server,
        &key,
        &id,
        &format!("--resolve web.test:80:{}", net.other),
        "http://web.test/",
    );
    assert_ne!(code, 0, "a hard-coded address");

    // A second request on the connection, naming another host, is not served: moat made the
    // first one the connection's last.
    let script = "python3 -c \"
import socket
ip = socket.gethostbyname('web.test')
s = socket.create_connection((ip, 80), timeout=5)
s.sendall(b'GET / HTTP/1.1\\r\\nHost: web.test\\r\\n\\r\\nGET / HTTP/1.1\\r\\nHost: other.test\\r\\n\\r\\n')
got = b''
while True:
    b = s.recv(4096)
    if not b: break
    got += b
print(got.count(b'host=web.test'), got.count(b'host=other.test'))
\"";
    let (code, out) = sh(&server, &key, &id, script);
    assert_eq!((code, out.trim()), (0, "1 0"));

    // A wildcard allows the names below, not the name itself.
    let id = with_network(&server, &key, net.network(false, &["*.web.test"], &[]));
    let (code, _) = sh(&server, &key, &id, "getent hosts web.test");
    assert_ne!(code, 0);
}

#[test]
fn a_rebinding_answer_becomes_nxdomain() {
    need_root!();
    // The first answer is public, the second private: the classic rebinding.
    let net = FakeNet::start(json!({ "rebind.test": [["{web}"], ["{private}"]] }));
    let server = Server::start();
    let key = server.admin_key();
    let id = with_network(&server, &key, net.network(false, &["rebind.test"], &[]));
    let (code, out) = curl(&server, &key, &id, "", "http://rebind.test/");
    assert_eq!(code, 0, "{out}");
    // Every later answer is the private one: refused. (`getent hosts` asks; `getent ahosts`
    // would not, with only loopback configured.)
    let (code, out) = sh(&server, &key, &id, "getent hosts rebind.test");
    assert_ne!(code, 0, "{out}");
    assert!(!out.contains(&net.private.to_string()), "{code} {out}");
    let denials = denials_of(&server, &key, &id);
    assert!(
        denials.contains(&format!("an answer pointed it at {}", net.private)),
        "{denials}"
    );
    let (code, _) = curl(&server, &key, &id, "", &format!("http://{}/", net.private));
    assert_ne!(code, 0);
}

#[test]
fn udp_goes_nowhere_but_dns() {
    need_root!();
    let net = FakeNet::start(json!({}));
    let server = Server::start();
    let key = server.admin_key();
    let id = with_network(&server, &key, net.network(true, &[], &[]));
    // The fake host echoes UDP on port 7 (the host gets an answer)...
    let echo = format!(
        "python3 -c \"import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); \
         s.settimeout(2); s.sendto(b'x', ('{}', 7)); print(s.recv(10))\"",
        net.web
    );
    let host = std::process::Command::new("sh")
        .args(["-c", &echo])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&host.stdout).trim(), "b'x'");
    // ...but a sandbox's datagram never leaves it.
    let (code, out) = sh(&server, &key, &id, &format!("{echo} 2>&1"));
    assert_ne!(code, 0, "{out}");
}

#[test]
fn a_running_sandboxs_policy_changes_at_once_and_survives_a_restart() {
    need_root!();
    let net = FakeNet::start(json!({}));
    let server = Server::start_with(&["--on-shutdown", "keep"]);
    let key = server.admin_key();
    let id = server.create_sandbox(&key);
    let url = format!("http://{}/", net.web);
    assert_ne!(curl(&server, &key, &id, "", &url).0, 0);
    let put = |n: Value| {
        let r = put_network(&server, &key, &id, n);
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    };
    let shown = put(net.network(true, &[], &[]));
    assert_eq!(shown["network"]["internet"], true);
    assert_eq!(curl(&server, &key, &id, "", &url).0, 0);
    put(net.network(true, &[], &[&net.web.to_string()]));
    assert_ne!(
        curl(&server, &key, &id, "", &url).0,
        0,
        "a new deny applies at once"
    );
    put(json!({}));
    assert_ne!(curl(&server, &key, &id, "", &url).0, 0, "back to none");
    // Bad policies are refused naming the entry.
    let r = put_network(&server, &key, &id, json!({ "allow": ["10.0.0.1/8"] }));
    r.assert_error(400, "invalid");
    assert!(r.text().contains("network.allow[0]"), "{}", r.text());

    // Kept across pause and resume, and a restart that keeps the sandbox.
    put(net.network(false, &[&net.web.to_string()], &[]));
    let r = server.request(
        "POST",
        &format!("/v1/sandboxes/{id}/pause"),
        Some(&key),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = server.request(
        "POST",
        &format!("/v1/sandboxes/{id}/resume"),
        Some(&key),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(curl(&server, &key, &id, "", &url).0, 0);
    let (dir, data) = server.stop();
    let server = Server::start_in_with(dir, data, &["--on-shutdown", "keep"]);
    assert_eq!(
        curl(&server, &key, &id, "", &url).0,
        0,
        "served again after the restart"
    );
    assert_ne!(
        curl(&server, &key, &id, "", &format!("http://{}/", net.other)).0,
        0
    );
}

/// A connection still sending its name when the policy changes is decided by the policy in
/// force once the name arrives: a name the update took away is refused.
#[test]
fn an_update_decides_a_connection_still_sending_its_name() {
    need_root!();
    let net = FakeNet::start(json!({}));
    let server = Server::start();
    let key = server.admin_key();
    let id = with_network(
        &server,
        &key,
        net.network(false, &["web.test", "other.test"], &["0.0.0.0/0"]),
    );
    // Connects to other.test, says it is connected, and sends its request once told to.
    let start = "nohup python3 -c \"
import os, socket, time
s = socket.create_connection((socket.gethostbyname('other.test'), 80), timeout=20)
open('/tmp/connected', 'w').close()
while not os.path.exists('/tmp/go'): time.sleep(0.02)
s.sendall(b'GET / HTTP/1.1\\r\\nHost: other.test\\r\\n\\r\\n')
try:
    got = s.recv(4096) or b'closed'
except OSError as e:
    got = repr(e).encode()
open('/tmp/answer', 'wb').write(got)
\" >/dev/null 2>&1 &
i=0; while [ ! -e /tmp/connected ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
test -e /tmp/connected";
    let (code, _) = sh(&server, &key, &id, start);
    assert_eq!(code, 0, "the connection was never made");
    let r = put_network(
        &server,
        &key,
        &id,
        net.network(false, &["web.test"], &["0.0.0.0/0"]),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let (code, answer) = sh(
        &server,
        &key,
        &id,
        "touch /tmp/go; i=0; while [ ! -e /tmp/answer ] && [ $i -lt 300 ]; do sleep 0.05; \
         i=$((i+1)); done; cat /tmp/answer",
    );
    assert_eq!(code, 0, "no answer was written");
    assert!(
        !answer.contains("HTTP/1."),
        "served under the old policy: {answer}"
    );
    // Refused for its name, not for sending it too late.
    let denials = denials_of(&server, &key, &id);
    assert!(
        denials.contains("other.test is not an allowed name"),
        "{denials}"
    );
}

#[test]
fn malformed_or_oversized_policies_are_refused_with_the_entry_named() {
    need_root!();
    let server = Server::start();
    let admin = server.admin_key();
    let user = server.create_key(&admin, json!({ "name": "u", "role": "user" }));
    for (network, status, says) in [
        (json!({ "allow": ["not a host"] }), 400, "network.allow[0]"),
        (
            json!({ "internet": true, "deny": ["1.2.3.4/40"] }),
            400,
            "network.deny[0]",
        ),
        (
            json!({ "internet": true, "dns_servers": ["resolver"] }),
            400,
            "network.dns_servers[0]",
        ),
        (json!({ "deny": ["1.2.3.4"] }), 400, "need internet"),
        (json!({ "allow": ["127.0.0.1"] }), 400, "never reachable"),
        (json!({ "allow": ["10.1.0.0/16"] }), 403, "admin"),
        (json!({ "internet": true, "proxy": "x" }), 400, "proxy"),
    ] {
        let r = server.request(
            "POST",
            "/v1/sandboxes",
            Some(&user),
            Some(&body(json!({ "network": network }))),
        );
        assert_eq!(r.status, status, "{network}: {}", r.text());
        assert!(r.text().contains(says), "{network}: {}", r.text());
    }
    let many: Vec<String> = (0..257).map(|i| format!("203.0.113.{}", i % 256)).collect();
    let r = server.request(
        "POST",
        "/v1/sandboxes",
        Some(&user),
        Some(&body(json!({ "network": { "allow": many } }))),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("the most is 256"), "{}", r.text());
}

#[test]
fn a_fork_reaches_what_its_source_reaches() {
    need_root!();
    let net = FakeNet::start(json!({}));
    let server = Server::start();
    let key = server.admin_key();
    let id = with_network(
        &server,
        &key,
        net.network(false, &[&net.web.to_string()], &[]),
    );
    let r = server.request(
        "POST",
        &format!("/v1/sandboxes/{id}/fork"),
        Some(&key),
        Some(&body(json!({ "count": 1 }))),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let copy = r.json()["results"][0]["sandbox"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        curl(&server, &key, &copy, "", &format!("http://{}/", net.web)).0,
        0
    );
    assert_ne!(
        curl(&server, &key, &copy, "", &format!("http://{}/", net.other)).0,
        0
    );
    let shown = network_of(&server, &key, &copy);
    assert_eq!(shown["network"]["allow"][0], format!("{}/32", net.web));
}

#[test]
fn moat_run_has_no_network_unless_asked() {
    need_root!();
    let net = FakeNet::start(json!({}));
    let run = |net_args: &[&str]| {
        let out = std::process::Command::new(moat_test_support::moat_binary())
            .arg("run")
            .args(net_args)
            .args(["--", "curl", "-sI", "--max-time", "5", "http://web.test/"])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let dns = net.dns.to_string();
    let (code, out) = run(&["--net", "internet", "--dns", &dns]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let (code, _) = run(&[]);
    assert_ne!(code, Some(0));
    let (code, out) = run(&["--allow", "web.test", "--dns", &dns]);
    assert_eq!(code, Some(0), "{out}");
    let (code, _) = run(&["--allow", "other.test", "--dns", &dns]);
    assert_ne!(code, Some(0));
}

#[test]
fn ipv6_meets_the_same_rules_and_an_ipv4_allow_list_closes_it() {
    need_root!();
    let net = FakeNet::start(json!({}));
    let server = Server::start();
    let key = server.admin_key();
    let url6 = format!("http://[{}]/", net.web6);
    // The host reaches it: the refusals below are the policy's.
    let direct = std::process::Command::new("curl")
        .args(["-s", "--max-time", "5", &url6])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&direct.stdout).starts_with("http 80"));
    let id = with_network(&server, &key, net.network(true, &[], &[]));
    let (code, out) = curl(&server, &key, &id, "", &url6);
    assert_eq!(code, 0, "{out}");
    // A DNS query to an IPv6 resolver address is answered, from that address.
    let script = "python3 -c \"
import socket, struct
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.settimeout(5)
s.sendto(struct.pack('!HHHHHH', 3, 0x0100, 1, 0, 0, 0) + b'\\x03web\\x04test\\x00\\x00\\x01\\x00\\x01', ('2001:db8::53', 53))
a, peer = s.recvfrom(512)
print(peer[0], a[3] & 15, socket.inet_ntoa(a[-4:]))
\"";
    let (code, out) = sh(&server, &key, &id, script);
    assert_eq!(
        (code, out.trim()),
        (0, format!("2001:db8::53 0 {}", net.web).as_str())
    );
    let id = with_network(
        &server,
        &key,
        net.network(false, &[&net.web.to_string()], &[]),
    );
    assert_eq!(
        curl(&server, &key, &id, "", &format!("http://{}/", net.web)).0,
        0
    );
    assert_ne!(
        curl(&server, &key, &id, "", &url6).0,
        0,
        "an IPv4 allow-list closes IPv6"
    );
    let id = with_network(&server, &key, net.network(true, &[], &["::/0"]));
    assert_ne!(curl(&server, &key, &id, "", &url6).0, 0);
    assert_eq!(
        curl(&server, &key, &id, "", &format!("http://{}/", net.web)).0,
        0
    );
    let id = with_network(
        &server,
        &key,
        net.network(false, &[&format!("[{}]:80", net.web6)], &[]),
    );
    assert_eq!(curl(&server, &key, &id, "", &url6).0, 0);
    assert_ne!(
        curl(
            &server,
            &key,
            &id,
            "",
            &format!("http://[{}]:8080/", net.web6)
        )
        .0,
        0
    );
}

#[test]
fn dns_over_tcp_to_any_address_is_answered_by_moat() {
    need_root!();
    let net = FakeNet::start(json!({}));
    let server = Server::start();
    let key = server.admin_key();
    let id = with_network(
        &server,
        &key,
        net.network(false, &["web.test"], &["0.0.0.0/0"]),
    );
    // A query over TCP to an address no rule allows (a public resolver, say) still reaches
    // moat's answerer, which resolves allowed names and refuses the rest.
    let query = |name: &str| {
        format!(
            "python3 -c \"
import socket, struct
q = struct.pack('!HHHHHH', 7, 0x0100, 1, 0, 0, 0)
q += b''.join(bytes([len(l)]) + l.encode() for l in '{name}'.split('.')) + b'\\x00\\x00\\x01\\x00\\x01'
s = socket.create_connection(('192.0.2.53', 53), timeout=5)
s.sendall(struct.pack('!H', len(q)) + q)
n = struct.unpack('!H', s.recv(2))[0]
a = b''
while len(a) < n: a += s.recv(n - len(a))
print(a[3] & 15, socket.inet_ntoa(a[-4:]) if a[7] else '-')
\""
        )
    };
    let (code, out) = sh(&server, &key, &id, &query("web.test"));
    assert_eq!((code, out.trim()), (0, format!("0 {}", net.web).as_str()));
    let (code, out) = sh(&server, &key, &id, &query("other.test"));
    assert_eq!((code, out.trim()), (0, "5 -"), "REFUSED");
}

#[test]
fn a_templates_network_reaches_its_warm_pool_members() {
    need_root!();
    let net = FakeNet::start(json!({}));
    let server = Server::start();
    let key = server.admin_key();
    server.create_template(
        &key,
        "netpool",
        json!({ "rootfs": "host", "pool_size": 1, "network": net.network(false, &[&net.web.to_string()], &[]) }),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let t = server
            .request("GET", "/v1/templates/netpool", Some(&key), None)
            .json();
        if t["pool"]["ready"] == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the pool never filled: {t}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let id = server.create_sandbox_with(&key, json!({ "template": "netpool" }));
    assert_eq!(
        curl(&server, &key, &id, "", &format!("http://{}/", net.web)).0,
        0
    );
    assert_ne!(
        curl(&server, &key, &id, "", &format!("http://{}/", net.other)).0,
        0
    );
    // A create that gives its own network gets it, not the template's.
    let id = server.create_sandbox_with(
        &key,
        json!({ "template": "netpool", "network": net.network(false, &[&net.other.to_string()], &[]) }),
    );
    assert_eq!(
        curl(&server, &key, &id, "", &format!("http://{}/", net.other)).0,
        0
    );
    assert_ne!(
        curl(&server, &key, &id, "", &format!("http://{}/", net.web)).0,
        0
    );
}

#[test]
fn deleting_sandboxes_with_a_network_leaves_the_server_no_sockets() {
    need_root!();
    let net = FakeNet::start(json!({}));
    let server = Server::start();
    let key = server.admin_key();
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", server.child.id()))
            .unwrap()
            .count()
    };
    // One round first, so whatever the server makes once (pools, caches) is there before.
    let round = || {
        let ids: Vec<String> = (0..4)
            .map(|_| with_network(&server, &key, net.network(true, &[], &[])))
            .collect();
        for id in &ids {
            // A connection open at the delete, and one mid-relay.
            let _ = curl(&server, &key, id, "", &format!("http://{}/", net.web));
            let r = server.request("DELETE", &format!("/v1/sandboxes/{id}"), Some(&key), None);
            assert_eq!(r.status, 204);
        }
    };
    round();
    let before = fds();
    round();
    round();
    // Sockets close as the tasks end: give them a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while fds() > before && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(fds() <= before, "{} descriptors, {before} before", fds());
}

#[test]
fn a_dns_flood_is_refused_past_the_rate() {
    need_root!();
    let net = FakeNet::start(json!({}));
    let server = Server::start();
    let key = server.admin_key();
    let id = with_network(&server, &key, net.network(true, &[], &[]));
    // 1,000 queries for an allowed name as fast as they go: the first ones are answered, those
    // past the burst are refused at once (names are a channel out; the rate bounds it). The
    // answers are read as they come, every 20 queries: a socket buffer left to fill would
    // drop them, and the count would say more about the buffer than about the rate.
    let script = "python3 -c \"
import socket, struct, collections
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
codes = collections.Counter()
def drain():
    s.setblocking(False)
    try:
        while True: codes[s.recv(512)[3] & 15] += 1
    except BlockingIOError: pass
for i in range(1000):
    s.sendto(struct.pack('!HHHHHH', i, 0x0100, 1, 0, 0, 0) + b'\\x03web\\x04test\\x00\\x00\\x01\\x00\\x01', ('192.0.2.53', 53))
    if i % 20 == 19: drain()
s.setblocking(True); s.settimeout(3)
try:
    while True: codes[s.recv(512)[3] & 15] += 1
except socket.timeout: pass
print(codes[0], codes[5])
\"";
    let (code, out) = sh(&server, &key, &id, script);
    assert_eq!(code, 0, "{out}");
    let counts: Vec<u64> = out.split_whitespace().map(|n| n.parse().unwrap()).collect();
    assert!(counts[0] > 0, "answered: {out}");
    // Without the rate none is refused (the ones past the in-flight limit go unanswered); with
    // it, all but a burst and what the rate refills while they are sent (more refills on a
    // loaded machine, where the 1,000 take longer to send).
    assert!(counts[1] >= 20, "refused: {out}");
    let shown = network_of(&server, &key, &id);
    assert!(shown.to_string().contains("over the DNS rate"), "{shown}");
}

#[test]
fn egress_bandwidth_holds_a_sandbox_to_its_rate() {
    need_root!();
    let net = FakeNet::start(json!({}));
    let server = Server::start_with(&["--egress-bandwidth", "1M"]);
    let key = server.admin_key();
    let id = with_network(&server, &key, net.network(true, &[], &[]));
    // 3 MiB at 1 MiB a second (a second's worth may go at once): at least about 2 s.
    let (code, out) = sh(
        &server,
        &key,
        &id,
        &format!(
            "curl -sS --max-time 30 -o /dev/null -w '%{{size_download}} %{{time_total}}' http://{}/bytes/3145728",
            net.web
        ),
    );
    assert_eq!(code, 0, "{out}");
    let mut parts = out.split_whitespace();
    let size: u64 = parts.next().unwrap().parse().unwrap();
    let secs: f64 = parts.next().unwrap().parse().unwrap();
    assert_eq!(size, 3 << 20);
    assert!(secs >= 1.8, "3 MiB in {secs} s under a 1 MiB/s limit");
}

#[test]
fn a_connection_flood_is_refused_past_the_rate() {
    need_root!();
    let net = FakeNet::start(json!({}));
    let server = Server::start();
    let key = server.admin_key();
    let id = with_network(&server, &key, net.network(true, &[], &[]));
    // 1,000 connections opened and closed as fast as they go: those past the burst are reset
    // before moat connects anywhere.
    let script = format!(
        "python3 -c \"
import socket
for i in range(1000):
    try: socket.create_connection(('{}', 80), timeout=5).close()
    except OSError: pass
\"",
        net.web
    );
    let (code, out) = sh(&server, &key, &id, &script);
    assert_eq!(code, 0, "{out}");
    let shown = network_of(&server, &key, &id);
    assert!(
        shown
            .to_string()
            .contains("over the rate of 100 new connections"),
        "{shown}"
    );
    assert!(shown["stats"]["denied"].as_u64().unwrap() >= 50, "{shown}");
}

#[test]
fn the_operator_decides_who_may_give_sandboxes_a_network() {
    need_root!();
    let net = FakeNet::start(json!({}));
    for (mode, admin_ok, user_ok) in [("admin", true, false), ("none", false, false)] {
        let server = Server::start_with(&["--egress", mode]);
        let admin = server.admin_key();
        let user = server.create_key(&admin, json!({ "name": "u", "role": "user" }));
        let req = json!({ "network": net.network(true, &[], &[]) });
        for (key, ok) in [(&admin, admin_ok), (&user, user_ok)] {
            let r = server.request("POST", "/v1/sandboxes", Some(key), Some(&body(req.clone())));
            if ok {
                assert_eq!(r.status, 201, "--egress {mode}: {}", r.text());
            } else {
                r.assert_error(403, "forbidden");
                assert!(r.text().contains("--egress"), "{}", r.text());
            }
        }
        // No network is always fine.
        let r = server.request(
            "POST",
            "/v1/sandboxes",
            Some(&user),
            Some(&body(json!({ "network": {} }))),
        );
        assert_eq!(r.status, 201, "{}", r.text());
    }
}

/// A network written while the server gave one (a template's, a kept sandbox's) is refused
/// once the server restarts with `--egress none`: to its template's creates, and to forks.
#[test]
fn a_network_written_before_egress_none_is_refused_after_it() {
    need_root!();
    let net = FakeNet::start(json!({}));
    let server = Server::start_with(&["--on-shutdown", "keep"]);
    let admin = server.admin_key();
    server.create_template(
        &admin,
        "withnet",
        json!({"rootfs": "host", "network": net.network(true, &[], &[])}),
    );
    let kept = with_network(&server, &admin, net.network(true, &[], &[]));
    let (dir, data) = server.stop();
    let server = Server::start_in_with(dir, data, &["--egress", "none", "--on-shutdown", "keep"]);
    let r = server.request(
        "POST",
        "/v1/sandboxes",
        Some(&admin),
        Some(&body(json!({"template": "withnet"}))),
    );
    r.assert_error(403, "forbidden");
    assert!(r.text().contains("--egress none"), "{}", r.text());
    let r = server.request(
        "POST",
        &format!("/v1/sandboxes/{kept}/fork"),
        Some(&admin),
        Some(&body(json!({}))),
    );
    // Refused whole, or each copy refused with the reason.
    assert!(
        r.status >= 400 || r.text().contains("\"error\""),
        "{}",
        r.text()
    );
    assert!(r.text().contains("--egress none"), "{}", r.text());
}

/// An allowed name whose answer leads, through an alias, to the reverse-lookup name of a
/// private address is refused: the sandbox does not learn the private network's names.
#[test]
fn a_reverse_lookup_of_a_private_address_through_an_alias_is_refused() {
    need_root!();
    let net = FakeNet::start(json!({
        "alias.test": [["alias-ptr {private-reverse} secret-db.corp"]],
    }));
    let server = Server::start();
    let key = server.admin_key();
    let id = with_network(&server, &key, net.network(true, &[], &[]));
    // A PTR query of an allowed name, over UDP to the resolver moat answers for.
    let script = "python3 -c \"
import socket, struct
q = struct.pack('!HHHHHH', 9, 0x0100, 1, 0, 0, 0)
q += b''.join(bytes([len(l)]) + l.encode() for l in 'alias.test'.split('.')) + b'\\x00\\x00\\x0c\\x00\\x01'
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
s.sendto(q, ('192.0.2.53', 53))
a = s.recv(4096)
print(a[3] & 15, b'secret-db' in a)
\"";
    let (code, out) = sh(&server, &key, &id, script);
    assert_eq!(
        (code, out.trim()),
        (0, "5 False"),
        "REFUSED, and no name of the private network"
    );
    let denials = denials_of(&server, &key, &id);
    assert!(
        denials.contains("reverse lookup of a closed address"),
        "{denials}"
    );
}

/// Routes of the host's this test added, removed when it ends however it ends.
struct AddedRoutes(Vec<Vec<String>>);

impl AddedRoutes {
    fn add(&mut self, family: &str, route: &[&str]) {
        let mut args = vec![family.to_owned(), "route".to_owned(), "add".to_owned()];
        args.extend(route.iter().map(|a| a.to_string()));
        let ok = std::process::Command::new("ip")
            .args(&args)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip {}", args.join(" "));
        args[2] = "del".to_owned();
        self.0.push(args);
    }
}

impl Drop for AddedRoutes {
    fn drop(&mut self) {
        for args in &self.0 {
            let _ = std::process::Command::new("ip").args(args).status();
        }
    }
}

/// An address the host holds through a local route, not on any interface, whose connections
/// leave from another address (an IPv6 local prefix; an IPv4 local route with a `src`), is the
/// host itself: a sandbox with the internet open does not reach a service of the host's
/// listening on all addresses through it.
#[test]
fn an_address_of_a_local_route_is_the_host_itself() {
    need_root!();
    let net = FakeNet::start(json!({}));
    // This fake internet's own: no other test's routes meet them (nothing leaves the host).
    let n = (net.host_side.octets()[3] - 1) / 4;
    let v4 = format!("198.51.100.{}", 200 + n);
    let v6 = format!("2001:db8:ee:{n}::5");
    let mut routes = AddedRoutes(Vec::new());
    let src = net.host_side.to_string();
    routes.add(
        "-4",
        &["local", &format!("{v4}/32"), "dev", "lo", "src", &src],
    );
    routes.add(
        "-6",
        &["local", &format!("2001:db8:ee:{n}::/64"), "dev", "lo"],
    );
    let service = std::net::TcpListener::bind("[::]:0").expect("listen");
    let port = service.local_addr().expect("port").port();
    std::thread::spawn(move || {
        use std::io::Write;
        for mut conn in service.incoming().take(16).flatten() {
            let _ = conn.write_all(b"HTTP/1.0 200 OK\r\n\r\nthe host's service\n");
        }
    });
    let urls = [
        format!("http://{v4}:{port}/"),
        format!("http://[{v6}]:{port}/"),
    ];
    // The host reaches its service there: the refusals below are moat's.
    for url in &urls {
        let direct = std::process::Command::new("curl")
            .args(["-s", "--max-time", "5", url])
            .output()
            .expect("curl");
        assert!(
            String::from_utf8_lossy(&direct.stdout).contains("the host's service"),
            "{url}"
        );
    }
    let server = Server::start();
    let key = server.admin_key();
    let id = with_network(&server, &key, net.network(true, &[], &[]));
    for url in &urls {
        let (code, out) = curl(&server, &key, &id, "", url);
        assert!(
            code != 0 && !out.contains("the host's service"),
            "{url}: {out}"
        );
    }
    let denials = denials_of(&server, &key, &id);
    assert!(denials.contains("the host itself"), "{denials}");
}

/// Sets this test process's open-file limit (`moat serve` started after inherits it).
fn set_nofile(n: u64) {
    let lim = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: `lim` is a valid rlimit; setrlimit touches nothing else.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
}

#[test]
fn one_tenant_s_sandboxes_hold_at_most_a_quarter_of_the_server_s_connections() {
    need_root!();
    // At this open-file limit the server relays 256 connections, 64 per tenant.
    set_nofile(4096);
    let net = FakeNet::start(json!({}));
    let server = Server::start();
    let admin = server.admin_key();
    let other = server.create_key(&admin, json!({"name": "other", "tenant": "neighbour"}));
    let policy = net.network(true, &[], &[]);
    let (first, second) = (
        with_network(&server, &admin, policy.clone()),
        with_network(&server, &admin, policy.clone()),
    );
    // Each of the tenant's two sandboxes opens 40 connections and holds them: moat accepts
    // every one in the sandbox, then resets those past the tenant's 64.
    let hold = format!(
        "nohup python3 -c \"
import socket, time
held = []
for _ in range(40):
    try:
        held.append(socket.create_connection(('{}', 80), timeout=5))
    except OSError:
        pass
time.sleep(2)
alive = 0
for s in held:
    s.setblocking(False)
    try:
        s.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        alive += 1
    except OSError:
        pass
print('alive', alive, flush=True)
time.sleep(120)
\" > /tmp/held 2>&1 &",
        net.web
    );
    for id in [&first, &second] {
        let (code, out) = sh(&server, &admin, id, &hold);
        assert_eq!(code, 0, "{out}");
    }
    let alive = |id: &str| -> u64 {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let (_, out) = sh(&server, &admin, id, "cat /tmp/held");
            if let Some(n) = out.lines().find_map(|l| l.strip_prefix("alive ")) {
                return n.parse().unwrap();
            }
            assert!(std::time::Instant::now() < deadline, "no count: {out}");
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    };
    let held = alive(&first) + alive(&second);
    assert_eq!(held, 64, "the tenant's sandboxes hold {held} connections");
    let denials = network_of(&server, &admin, &second).to_string()
        + &network_of(&server, &admin, &first).to_string();
    assert!(
        denials.contains("the most one tenant may have"),
        "{denials}"
    );
    // Another tenant's sandbox still connects.
    let theirs = with_network(&server, &other, policy);
    let (code, out) = curl(
        &server,
        &other,
        &theirs,
        "",
        &format!("http://{}/", net.web),
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("http 80"), "{out}");
}

/// `--egress-deny` closes a network to every sandbox whatever its policy (here one of the fake
/// internet's public addresses, standing for the host's public address under 1:1 NAT): no
/// connection, no DNS answer pointing there, no allow rule naming it, no webhook.
#[test]
fn a_network_the_operator_closes_is_closed_to_every_policy() {
    need_root!();
    let net = FakeNet::start(json!({}));
    let closed = net.other.to_string();
    let server = Server::start_with(&[
        "--egress-deny",
        &closed,
        "--egress-deny",
        "2001:db8:64::/96",
        "--job-webhooks-to-private",
    ]);
    let key = server.admin_key();
    let id = with_network(&server, &key, net.network(true, &[], &[]));
    let (code, out) = curl(&server, &key, &id, "", &format!("http://{}/", net.web));
    assert_eq!(code, 0, "{out}");
    let (code, out) = curl(&server, &key, &id, "", &format!("http://{closed}/"));
    assert_ne!(code, 0, "{out}");
    // Its name's answer is refused: the sandbox is not told the address.
    let (code, out) = sh(&server, &key, &id, "getent hosts web.test");
    assert_eq!(code, 0, "{out}");
    let (code, out) = sh(&server, &key, &id, "getent hosts other.test");
    assert_ne!(code, 0, "{out}");
    let denials = denials_of(&server, &key, &id);
    assert!(
        denials.contains(&format!(
            "{closed} is a network closed by the server's operator"
        )),
        "{denials}"
    );
    assert!(denials.contains("other.test"), "{denials}");
    // No rule opens it, not even an admin's naming it alone; a broader rule is fine.
    for network in [
        net.network(false, &[&closed], &[]),
        net.network(false, &["2001:db8:64::1"], &[]),
    ] {
        let r = put_network(&server, &key, &id, network);
        assert_eq!(r.status, 400, "{}", r.text());
        assert!(
            r.text().contains("closed by the server's operator"),
            "{}",
            r.text()
        );
    }
    let r = put_network(
        &server,
        &key,
        &id,
        net.network(false, &["203.0.113.0/24"], &[]),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let (code, out) = curl(&server, &key, &id, "", &format!("http://{closed}/"));
    assert_ne!(code, 0, "{out}");
    // Webhooks are not sent there either, even where private receivers are allowed.
    let r = server.request(
        "POST",
        "/v1/jobs",
        Some(&key),
        Some(&body(
            json!({"shell": "true", "webhook_url": format!("http://{closed}/")}),
        )),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.text().contains("closed by the server's operator"),
        "{}",
        r.text()
    );
}
