//! `moat serve` over HTTP on loopback: warm-pool claims, cold creates, exec round trips,
//! sustained creates per second, and how many idle sandboxes fit.
//!
//! The client is a small blocking HTTP/1.1 client on kept-alive connections, so a timing is
//! the server's work plus one loopback round trip, as an SDK with a connection pool sees it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::stats::{Samples, ms};

/// A running `moat serve` with a throwaway data dir; SIGTERMed on drop.
pub(crate) struct Server {
    child: Child,
    port: u16,
    key: String,
    dir: std::path::PathBuf,
}

impl Server {
    pub(crate) fn start(moat: &Path) -> Result<Server> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir = std::env::temp_dir().join(format!("moat-bench-serve-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let child = Command::new(moat)
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                // One key drives the benchmark far harder than the default rate limit allows.
                "--rate-limit",
                "100000000",
                "--data-dir",
            ])
            .arg(&dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting moat serve")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(key) = std::fs::read_to_string(dir.join("admin.key"))
                && TcpStream::connect(("127.0.0.1", port)).is_ok()
            {
                return Ok(Server {
                    child,
                    port,
                    key: key.trim().to_owned(),
                    dir,
                });
            }
            if Instant::now() > deadline {
                bail!("moat serve did not come up");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's pid.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn client(&self) -> Result<Client> {
        Client::connect(self.port, &self.key)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let pid = i32::try_from(self.child.id()).unwrap_or(0);
        // SAFETY: kill has no memory preconditions; the pid is our child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One kept-alive HTTP/1.1 connection.
pub(crate) struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    key: String,
    port: u16,
}

impl Client {
    fn connect(port: u16, key: &str) -> Result<Client> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_nodelay(true)?;
        Ok(Client {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            key: key.to_owned(),
            port,
        })
    }

    /// Sends a request and reads the whole answer: (status, body). A kept-alive connection the
    /// server closed while it was idle (it closes those after a while) is replaced once, as
    /// HTTP clients do.
    fn call(&mut self, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.key,
            body.len()
        );
        let mut line = String::new();
        let sent = self.writer.write_all(req.as_bytes());
        if sent.is_err() || self.reader.read_line(&mut line).unwrap_or(0) == 0 {
            *self = Client::connect(self.port, &self.key)?;
            self.writer.write_all(req.as_bytes())?;
            line.clear();
            self.reader.read_line(&mut line)?;
        }
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {line:?}"))?;
        let mut length = 0usize;
        loop {
            line.clear();
            self.reader.read_line(&mut line)?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((name, value)) = l.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse()?;
            }
        }
        let mut buf = vec![0; length];
        self.reader.read_exact(&mut buf)?;
        Ok((status, String::from_utf8_lossy(&buf).into_owned()))
    }

    pub(crate) fn ok(&mut self, method: &str, path: &str, body: &str, want: u16) -> Result<String> {
        let (status, text) = self.call(method, path, body)?;
        if status != want {
            bail!("{method} {path}: {status} {text}");
        }
        Ok(text)
    }

    pub(crate) fn create(&mut self, body: &str) -> Result<String> {
        let text = self.ok("POST", "/v1/sandboxes", body, 201)?;
        id_of(&text)
    }

    pub(crate) fn delete(&mut self, id: &str) -> Result<()> {
        self.ok("DELETE", &format!("/v1/sandboxes/{id}"), "", 204)
            .map(|_| ())
    }

    pub(crate) fn pool_ready(&mut self, template: &str) -> Result<u64> {
        let text = self.ok("GET", &format!("/v1/templates/{template}"), "", 200)?;
        let v: serde_json::Value = serde_json::from_str(&text)?;
        Ok(v["pool"]["ready"].as_u64().unwrap_or(0))
    }
}

pub(crate) fn id_of(text: &str) -> Result<String> {
    let v: serde_json::Value = serde_json::from_str(text)?;
    v["id"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no id in {text}"))
}

pub(crate) fn row(label: &str, s: &Samples, goal: &str) {
    println!(
        "| {label} | {} | {} | {goal} |",
        ms(s.median()),
        ms(s.percentile(99.0))
    );
}

/// `MemAvailable` of the host, bytes.
fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Every server benchmark, printed as Markdown tables.
pub fn run(moat: &Path, runs: usize, idle: usize) -> Result<()> {
    let server = Server::start(moat)?;
    let mut c = server.client()?;
    println!("\n## moat serve over HTTP on loopback ({runs} runs each)\n");
    println!("| what | median | p99 | goal |");
    println!("| --- | --- | --- | --- |");

    // Warm pool: each timed claim finds a ready member (checked, untimed, before it).
    const POOL: usize = 16;
    c.ok(
        "POST",
        "/v1/templates",
        &format!(r#"{{"name":"warm","spec":{{"rootfs":"host","pool_size":{POOL}}}}}"#),
        201,
    )?;
    let mut claims = Samples::default();
    for i in 0..runs + 3 {
        let deadline = Instant::now() + Duration::from_secs(30);
        while c.pool_ready("warm")? == 0 {
            if Instant::now() > deadline {
                bail!("the warm pool does not refill");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let t = Instant::now();
        let id = c.create(r#"{"template":"warm"}"#)?;
        if i >= 3 {
            claims.push(t.elapsed());
        }
        c.delete(&id)?;
    }
    row(
        "warm-pool claim (`POST /v1/sandboxes`)",
        &claims,
        "≤ 5 ms p50",
    );

    // Cold create: the built-in `host` template has no pool.
    let mut cold = Samples::default();
    let mut delete = Samples::default();
    for i in 0..runs + 3 {
        let t = Instant::now();
        let id = c.create("{}")?;
        let made = t.elapsed();
        let t = Instant::now();
        c.delete(&id)?;
        if i >= 3 {
            cold.push(made);
            delete.push(t.elapsed());
        }
    }
    row("cold create (`host`, no pool)", &cold, "≤ 15 ms p50");
    row("delete", &delete, "");

    // Exec round trip through the API on one running sandbox.
    let id = c.create("{}")?;
    let mut exec = Samples::default();
    for i in 0..runs + 3 {
        let t = Instant::now();
        c.ok(
            "POST",
            &format!("/v1/sandboxes/{id}/exec"),
            r#"{"cmd":["/bin/true"]}"#,
            200,
        )?;
        if i >= 3 {
            exec.push(t.elapsed());
        }
    }
    c.delete(&id)?;
    row("exec `/bin/true` (`POST …/exec`, buffered)", &exec, "");

    // Sustained creates: clients creating and deleting cold sandboxes for a while.
    const CLIENTS: usize = 8;
    const WINDOW: Duration = Duration::from_secs(10);
    let made = AtomicU64::new(0);
    let began = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let (server, made) = (&server, &made);
                s.spawn(move || -> Result<()> {
                    let mut c = server.client()?;
                    while began.elapsed() < WINDOW {
                        let id = c.create("{}")?;
                        made.fetch_add(1, Ordering::Relaxed);
                        c.delete(&id)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
        }
        Ok(())
    })?;
    let rate = made.load(Ordering::Relaxed) as f64 / began.elapsed().as_secs_f64();
    println!(
        "\n| sustained cold create + delete, {CLIENTS} clients, {}s | {rate:.0} creates/s | goal ≥ 200/s |",
        WINDOW.as_secs()
    );

    // Idle sandboxes: how many fit, and what each costs the host.
    let before = mem_available();
    let rss_before = rss_of(server.child.id());
    let began = Instant::now();
    let ids = std::sync::Mutex::new(Vec::with_capacity(idle));
    std::thread::scope(|s| -> Result<()> {
        let per = idle.div_ceil(CLIENTS);
        let handles: Vec<_> = (0..CLIENTS)
            .map(|k| {
                let (server, ids) = (&server, &ids);
                s.spawn(move || -> Result<()> {
                    let mut c = server.client()?;
                    for _ in (k * per)..((k + 1) * per).min(idle) {
                        let id = c.create(r#"{"timeout_secs":3600}"#)?;
                        ids.lock()
                            .map_err(|_| anyhow::anyhow!("poisoned"))?
                            .push(id);
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
        }
        Ok(())
    })?;
    let took = began.elapsed();
    // Let the agents settle into idleness before measuring.
    std::thread::sleep(Duration::from_secs(2));
    let used = before.saturating_sub(mem_available());
    let rss = rss_of(server.child.id()).saturating_sub(rss_before);
    let ids = ids.into_inner().map_err(|_| anyhow::anyhow!("poisoned"))?;
    // Every one still answers.
    for id in ids.iter().step_by((ids.len() / 20).max(1)) {
        c.ok(
            "POST",
            &format!("/v1/sandboxes/{id}/exec"),
            r#"{"cmd":["/bin/true"]}"#,
            200,
        )?;
    }
    let n = ids.len() as u64;
    println!(
        "| {n} idle sandboxes at once | created in {:.1} s; host memory {:.0} MiB ({:.2} MiB each); server RSS +{:.1} MiB ({:.1} KiB each) | goal 1,000 |",
        took.as_secs_f64(),
        used as f64 / (1 << 20) as f64,
        used as f64 / n.max(1) as f64 / (1 << 20) as f64,
        rss as f64 / (1 << 20) as f64,
        rss as f64 / n.max(1) as f64 / 1024.0,
    );
    for id in &ids {
        c.delete(id)?;
    }
    Ok(())
}
