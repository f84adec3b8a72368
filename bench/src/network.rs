//! Network egress: what a policy adds to a create, and a sandbox's connect latency, HTTP
//! throughput and DNS answer time through moat against the host's own, to a web host and a
//! resolver this benchmark runs in a network namespace of its own (documentation addresses
//! routed only into it: nothing leaves the machine).

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::server::Server;
use crate::stats::{Samples, ms};

const NETNS: &str = "moat-bench-net";
const VETH: &str = "mbn0";
const PEER: &str = "mbn1";
const HOST_SIDE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 253);
const FAKE_SIDE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 254);
const WEB: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 250);
const DNS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 251);
/// The bytes each throughput download carries.
const DOWNLOAD: u64 = 512 * 1024 * 1024;

fn ip(args: &[&str]) -> Result<()> {
    let ok = Command::new("ip")
        .args(args)
        .stderr(Stdio::null())
        .status()?
        .success();
    if !ok {
        bail!("ip {}", args.join(" "));
    }
    Ok(())
}

/// The namespace, its link and routes; removed on drop.
struct BenchNet;

impl BenchNet {
    fn start() -> Result<BenchNet> {
        let _ = ip(&["netns", "del", NETNS]);
        let _ = ip(&["link", "del", VETH]);
        ip(&["netns", "add", NETNS])?;
        let net = BenchNet;
        ip(&["link", "add", VETH, "type", "veth", "peer", "name", PEER])?;
        ip(&["link", "set", PEER, "netns", NETNS])?;
        ip(&["addr", "add", &format!("{HOST_SIDE}/30"), "dev", VETH])?;
        ip(&["link", "set", VETH, "up"])?;
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["addr", "add", &format!("{FAKE_SIDE}/30"), "dev", PEER],
            vec!["link", "set", PEER, "up"],
            vec!["addr", "add", &format!("{WEB}/32"), "dev", "lo"],
            vec!["addr", "add", &format!("{DNS}/32"), "dev", "lo"],
            vec!["route", "add", "default", "via", &format!("{HOST_SIDE}")],
        ] {
            let mut all = vec!["-n", NETNS];
            all.extend(args.iter().map(|s| &**s));
            ip(&all)?;
        }
        for a in [WEB, DNS] {
            ip(&[
                "route",
                "replace",
                &format!("{a}/32"),
                "via",
                &FAKE_SIDE.to_string(),
            ])?;
        }
        serve_in_netns()?;
        Ok(net)
    }
}

impl Drop for BenchNet {
    fn drop(&mut self) {
        for a in [WEB, DNS] {
            let _ = ip(&["route", "del", &format!("{a}/32")]);
        }
        let _ = ip(&["netns", "del", NETNS]);
        let _ = ip(&["link", "del", VETH]);
    }
}

/// Starts, on threads inside the namespace, an HTTP server on WEB:80 (`/bytes/N` answers N
/// bytes, anything else a few; one request per connection) and a resolver on DNS:53 that
/// answers every A query with WEB.
fn serve_in_netns() -> Result<()> {
    let ns = std::fs::File::open(format!("/run/netns/{NETNS}"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: this thread (and those it starts) alone enter the namespace.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            let _ = tx.send(Err(std::io::Error::last_os_error()));
            return;
        }
        let web = TcpListener::bind((WEB, 80));
        let dns = UdpSocket::bind((DNS, 53));
        let (web, dns) = match (web, dns) {
            (Ok(w), Ok(d)) => (w, d),
            (Err(e), _) | (_, Err(e)) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        let _ = tx.send(Ok(()));
        std::thread::spawn(move || answer_dns(&dns));
        for conn in web.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = serve_http(conn);
            });
        }
    });
    rx.recv()?.context("serving in the benchmark's namespace")
}

fn serve_http(conn: std::net::TcpStream) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split(' ').nth(1).unwrap_or("/").to_owned();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
    }
    let n: u64 = path
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse().ok())
        .unwrap_or(2);
    let mut conn = conn;
    write!(
        conn,
        "HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n"
    )?;
    let chunk = vec![b'x'; 256 * 1024];
    let mut left = n;
    while left > 0 {
        let k = left.min(chunk.len() as u64) as usize;
        conn.write_all(&chunk[..k])?;
        left -= k as u64;
    }
    Ok(())
}

fn answer_dns(sock: &UdpSocket) {
    let mut buf = [0u8; 512];
    while let Ok((n, peer)) = sock.recv_from(&mut buf) {
        if n < 17 {
            continue;
        }
        // The question ends after the name's terminating zero and four bytes.
        let Some(end) = buf[12..n].iter().position(|&b| b == 0).map(|p| 12 + p + 5) else {
            continue;
        };
        let mut r = buf[..end.min(n)].to_vec();
        r[2] = 0x81;
        r[3] = 0x80;
        r[6..12].copy_from_slice(&[0, 1, 0, 0, 0, 0]);
        r.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        r.extend_from_slice(&WEB.octets());
        let _ = sock.send_to(&r, peer);
    }
}

/// Runs `script` with `sh -c` on the host and returns its stdout.
fn host_sh(script: &str) -> Result<String> {
    let out = Command::new("sh").args(["-c", script]).output()?;
    if !out.status.success() {
        bail!("{script}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Samples from lines of seconds.
fn samples(text: &str) -> Samples {
    let mut s = Samples::default();
    for v in text.lines().filter_map(|l| l.trim().parse::<f64>().ok()) {
        s.push(Duration::from_secs_f64(v));
    }
    s
}

/// `curl` fetching a small answer `n` times, each on a new connection: the time to the first
/// byte of each, one a line.
fn first_byte_script(n: usize) -> String {
    let urls = vec![format!("http://{WEB}/"); n].join(" ");
    format!("curl -s -o /dev/null -w '%{{time_starttransfer}}\\n' {urls}")
}

/// `curl` downloading DOWNLOAD bytes `n` times: bytes per second of each, one a line.
fn throughput_script(n: usize) -> String {
    let urls = vec![format!("http://{WEB}/bytes/{DOWNLOAD}"); n].join(" ");
    format!("curl -s -o /dev/null -w '%{{speed_download}}\\n' {urls}")
}

/// Python sending `n` A queries, one after another, to DNS: the answer time of each.
fn dns_script(n: usize) -> String {
    format!(
        "python3 -c \"
import socket, struct, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
for i in range({n}):
    q = struct.pack('!HHHHHH', i, 0x0100, 1, 0, 0, 0) + b'\\x03web\\x05bench\\x00\\x00\\x01\\x00\\x01'
    t = time.perf_counter(); s.sendto(q, ('{DNS}', 53)); s.recv(512); print(time.perf_counter() - t)
\""
    )
}

/// CPU time (user and system) the process `pid` has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let after = stat.rsplit_once(')').map(|(_, a)| a).unwrap_or("");
    let f: Vec<u64> = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let ticks: u64 = f.iter().sum();
    Duration::from_millis(ticks * 1000 / hz)
}

fn median_rate(text: &str) -> f64 {
    let mut v: Vec<f64> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Runs the network benchmarks and prints their table.
pub fn run(moat: &Path, runs: usize) -> Result<()> {
    let _net = BenchNet::start()?;
    let server = Server::start(moat)?;
    let mut c = server.client()?;
    let policy = format!(r#"{{"network":{{"internet":true,"dns_servers":["{DNS}"]}}}}"#);

    println!("\n## Network egress ({runs} runs each)\n");
    println!("| what | median | p99 | vs without |");
    println!("| --- | --- | --- | --- |");
    let (mut plain, mut with) = (Samples::default(), Samples::default());
    for i in 0..runs + 3 {
        for (body, s) in [("{}", &mut plain), (policy.as_str(), &mut with)] {
            let t = Instant::now();
            let id = c.create(body)?;
            if i >= 3 {
                s.push(t.elapsed());
            }
            c.delete(&id)?;
        }
    }
    let ratio = |a: &Samples, b: &Samples| {
        a.median().as_secs_f64() / b.median().as_secs_f64().max(f64::MIN_POSITIVE)
    };
    println!(
        "| cold create, no network | {} | {} | 1.00× |",
        ms(plain.median()),
        ms(plain.percentile(99.0))
    );
    println!(
        "| cold create with `internet` (timed in turn) | {} | {} | {:.2}× (+{}) |",
        ms(with.median()),
        ms(with.percentile(99.0)),
        ratio(&with, &plain),
        ms(with.median().saturating_sub(plain.median()))
    );

    let id = c.create(&policy)?;
    let exec = |c: &mut crate::server::Client, script: &str| exec_in(c, &id, script);
    // Warm both paths once.
    exec(&mut c, &first_byte_script(3))?;
    host_sh(&first_byte_script(3))?;

    println!("\n| what | sandbox (through moat) | host | sandbox / host |");
    println!("| --- | --- | --- | --- |");
    let fetches = runs.max(20);
    let sbx = samples(&exec(&mut c, &first_byte_script(fetches))?);
    let host = samples(&host_sh(&first_byte_script(fetches))?);
    println!(
        "| new connection + request, time to first byte, median ({fetches} fetches) | {} | {} | {:.2}× |",
        ms(sbx.median()),
        ms(host.median()),
        ratio(&sbx, &host)
    );
    let downloads = 5;
    let mut sbx_rates = String::new();
    let mut host_rates = String::new();
    let mut relay_cpu = Duration::ZERO;
    // In turn, so the machine's drift affects both alike.
    for _ in 0..downloads {
        let before = cpu_time(server.pid());
        sbx_rates.push_str(&exec(&mut c, &throughput_script(1))?);
        relay_cpu += cpu_time(server.pid()).saturating_sub(before);
        host_rates.push_str(&host_sh(&throughput_script(1))?);
    }
    download_row(downloads, &sbx_rates, &host_rates);
    let relayed_gib = (downloads as u64 * DOWNLOAD) as f64 / f64::from(1u32 << 30);
    println!(
        "| CPU time of `moat serve` per GiB relayed (the downloads above) | {} | | |",
        ms(relay_cpu.div_f64(relayed_gib))
    );
    let queries = runs.max(20);
    let sbx = samples(&exec(&mut c, &dns_script(queries))?);
    let host = samples(&host_sh(&dns_script(queries))?);
    println!(
        "| DNS A query answered, median ({queries} queries) | {} | {} | {:.2}× |",
        ms(sbx.median()),
        ms(host.median()),
        ratio(&sbx, &host)
    );
    c.delete(&id)?;
    gvisor(&mut c, runs)?;
    Ok(())
}

/// Prints the row of `downloads` downloads' rates, from a sandbox and from the host.
fn download_row(downloads: usize, sbx_rates: &str, host_rates: &str) {
    let (s, h) = (median_rate(sbx_rates), median_rate(host_rates));
    println!(
        "| HTTP download of {} MiB, median of {downloads} | {:.0} MiB/s | {:.0} MiB/s | {:.0} % |",
        DOWNLOAD >> 20,
        s / 1048576.0,
        h / 1048576.0,
        100.0 * s / h.max(1.0)
    );
}

/// Runs `script` in sandbox `id`, which must succeed; its standard output.
fn exec_in(c: &mut crate::server::Client, id: &str, script: &str) -> Result<String> {
    let body = serde_json::json!({ "shell": script, "timeout_secs": 600 }).to_string();
    let text = c.ok("POST", &format!("/v1/sandboxes/{id}/exec"), &body, 200)?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    if v["exit_code"] != 0 {
        bail!("{script}: {text}");
    }
    Ok(v["stdout"].as_str().unwrap_or_default().to_owned())
}

/// The same fetches from a gvisor sandbox with a network (runsc's host network in its outer
/// jail's namespace), where runsc is installed.
fn gvisor(c: &mut crate::server::Client, runs: usize) -> Result<()> {
    if crate::which("runsc").is_none() {
        println!(
            "
(runsc is not installed: no gvisor rows)"
        );
        return Ok(());
    }
    c.ok(
        "POST",
        "/v1/templates",
        r#"{"name":"bench-gvisor-net","spec":{"rootfs":"host","user":"user","backend":"gvisor"}}"#,
        201,
    )?;
    let body = format!(
        r#"{{"template":"bench-gvisor-net","network":{{"internet":true,"dns_servers":["{DNS}"]}}}}"#
    );
    let id = c.create(&body)?;
    exec_in(c, &id, &first_byte_script(3))?;
    println!(
        "
| what, from a gvisor sandbox | sandbox (through moat) | host | sandbox / host |"
    );
    println!("| --- | --- | --- | --- |");
    let fetches = runs.max(20);
    let sbx = samples(&exec_in(c, &id, &first_byte_script(fetches))?);
    let host = samples(&host_sh(&first_byte_script(fetches))?);
    println!(
        "| new connection + request, time to first byte, median ({fetches} fetches) | {} | {} | {:.2}× |",
        ms(sbx.median()),
        ms(host.median()),
        sbx.median().as_secs_f64() / host.median().as_secs_f64().max(f64::MIN_POSITIVE)
    );
    let downloads = 3;
    let (mut sbx_rates, mut host_rates) = (String::new(), String::new());
    for _ in 0..downloads {
        sbx_rates.push_str(&exec_in(c, &id, &throughput_script(1))?);
        host_rates.push_str(&host_sh(&throughput_script(1))?);
    }
    download_row(downloads, &sbx_rates, &host_rates);
    c.delete(&id)?;
    Ok(())
}
