//! The gvisor backend: `moat run --backend gvisor` against `runsc run` alone, and a `moat serve`
//! template on gvisor: cold create, warm claim, exec, pause and resume (to disk), a snapshot
//! with memory, and a template whose start does seconds of work, started cold or restored from
//! its snapshot.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::server::{Server, id_of, row};
use crate::stats::Samples;

/// Times `f` `runs` times after 2 warm-up runs.
fn timed(runs: usize, mut f: impl FnMut() -> Result<Duration>) -> Result<Samples> {
    let mut s = Samples::default();
    for i in 0..runs + 2 {
        let d = f()?;
        if i >= 2 {
            s.push(d);
        }
    }
    Ok(s)
}

/// What the heavy template's start does: two seconds of computation by the clock (hashing,
/// whatever the machine's speed), then a file that says it is done.
const HEAVY_START: &str = "python3 -c 'import hashlib, time\nh = b\"\"\nend = time.monotonic() + 2\nwhile time.monotonic() < end:\n    for i in range(10000):\n        h = hashlib.sha256(h).digest()\nopen(\"/tmp/ready\", \"w\").write(h.hex())'";

pub fn run(moat: &Path, runs: usize) -> Result<()> {
    let runs = (runs / 10).max(10);
    println!("\n## The gvisor backend ({runs} runs each, after 2 warm-up runs)\n");
    println!("| what | median | p99 | goal |");
    println!("| --- | --- | --- | --- |");

    // `moat run --backend gvisor` and `runsc run` alone (the same command, the host's root
    // read-only), one run of each in turn, so the machine's drift hits both alike.
    let runsc = crate::which("runsc").context("runsc is not installed")?;
    let bundle = crate::runsc_bundle(&["/bin/true"])?;
    let root = std::env::temp_dir().join(format!("moat-bench-gvisor-root-{}", std::process::id()));
    let moat_run: Vec<String> = [moat.display().to_string()]
        .into_iter()
        .chain(
            ["run", "--backend", "gvisor", "--", "/bin/true"]
                .iter()
                .map(|s| s.to_string()),
        )
        .collect();
    let mut both =
        crate::time_in_turn(&[moat_run, crate::runsc_argv(&runsc, &bundle, &root)], runs)?;
    let _ = std::fs::remove_dir_all(&bundle);
    let _ = std::fs::remove_dir_all(&root);
    let alone = both.remove(1);
    let one_shot = both.remove(0);
    row("`runsc --platform=ptrace run /bin/true` alone", &alone, "");
    let ratio = one_shot.median().as_secs_f64() / alone.median().as_secs_f64().max(1e-9);
    row(
        "`moat run --backend gvisor -- /bin/true` (in turn with the row above)",
        &one_shot,
        &format!("≤ 1.1× `runsc run`: {ratio:.2}×"),
    );

    let server = Server::start(moat)?;
    let mut c = server.client()?;
    c.ok(
        "POST",
        "/v1/templates",
        r#"{"name":"gv","spec":{"rootfs":"host","backend":"gvisor"}}"#,
        201,
    )?;
    let cold = timed(runs, || {
        let t = Instant::now();
        let id = c.create(r#"{"template":"gv"}"#)?;
        let d = t.elapsed();
        c.delete(&id)?;
        Ok(d)
    })?;
    row("cold create (gvisor template)", &cold, "");

    const POOL: u32 = 4;
    c.ok(
        "POST",
        "/v1/templates",
        &format!(
            r#"{{"name":"gvwarm","spec":{{"rootfs":"host","backend":"gvisor","pool_size":{POOL}}}}}"#
        ),
        201,
    )?;
    let claims = timed(runs, || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while c.pool_ready("gvwarm")? == 0 {
            if Instant::now() > deadline {
                bail!("the gvisor warm pool does not refill");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let t = Instant::now();
        let id = c.create(r#"{"template":"gvwarm"}"#)?;
        let d = t.elapsed();
        c.delete(&id)?;
        Ok(d)
    })?;
    row("warm-pool claim (gvisor template)", &claims, "≤ 5 ms p50");

    let id = c.create(r#"{"template":"gv"}"#)?;
    let exec = timed(runs, || {
        let t = Instant::now();
        c.ok(
            "POST",
            &format!("/v1/sandboxes/{id}/exec"),
            r#"{"cmd":["/bin/true"]}"#,
            200,
        )?;
        Ok(t.elapsed())
    })?;
    row("exec `/bin/true` on a gvisor sandbox", &exec, "");
    let mut pauses = Samples::default();
    let mut resumes = Samples::default();
    for i in 0..runs + 2 {
        let t = Instant::now();
        c.ok("POST", &format!("/v1/sandboxes/{id}/pause"), "", 200)?;
        let p = t.elapsed();
        let t = Instant::now();
        c.ok("POST", &format!("/v1/sandboxes/{id}/resume"), "", 200)?;
        if i >= 2 {
            pauses.push(p);
            resumes.push(t.elapsed());
        }
    }
    row("pause (saved to disk, memory released)", &pauses, "");
    row("resume (restored)", &resumes, "");
    let mut sizes = Vec::new();
    let snaps = timed(runs, || {
        let t = Instant::now();
        let text = c.ok(
            "POST",
            &format!("/v1/sandboxes/{id}/snapshots"),
            r#"{"memory":true}"#,
            201,
        )?;
        let d = t.elapsed();
        let v: serde_json::Value = serde_json::from_str(&text)?;
        sizes.push(v["size_bytes"].as_u64().unwrap_or(0));
        let snap = id_of(&text)?;
        c.ok("DELETE", &format!("/v1/snapshots/{snap}"), "", 204)?;
        Ok(d)
    })?;
    row("snapshot with memory (idle sandbox)", &snaps, "");
    sizes.sort_unstable();
    let size = sizes.get(sizes.len() / 2).copied().unwrap_or(0);
    println!(
        "| snapshot with memory: size (idle sandbox) | {:.2} MiB | | |",
        size as f64 / f64::from(1 << 20)
    );
    c.delete(&id)?;

    // A template whose start works for seconds: cold, or restored from a snapshot taken once
    // it was ready.
    c.ok(
        "POST",
        "/v1/templates",
        &format!(
            r#"{{"name":"gvheavy","spec":{{"rootfs":"host","backend":"gvisor","start":{},"ready":"test -s /tmp/ready","ready_timeout_secs":120}}}}"#,
            serde_json::Value::from(HEAVY_START)
        ),
        201,
    )?;
    let heavy_runs = (runs / 2).max(5);
    let heavy_cold = timed(heavy_runs, || {
        let t = Instant::now();
        let id = c.create(r#"{"template":"gvheavy"}"#)?;
        let d = t.elapsed();
        c.delete(&id)?;
        Ok(d)
    })?;
    let source = c.create(r#"{"template":"gvheavy"}"#)?;
    let text = c.ok(
        "POST",
        &format!("/v1/sandboxes/{source}/snapshots"),
        r#"{"memory":true}"#,
        201,
    )?;
    let snap = id_of(&text)?;
    c.delete(&source)?;
    let restored = timed(heavy_runs, || {
        let t = Instant::now();
        let id = c.create(&format!(r#"{{"snapshot":"{snap}"}}"#))?;
        let d = t.elapsed();
        c.delete(&id)?;
        Ok(d)
    })?;
    row(
        "create, template whose start computes ~2 s, cold",
        &heavy_cold,
        "",
    );
    row(
        "create, the same restored from its snapshot with memory",
        &restored,
        "≤ 0.3× cold",
    );
    println!(
        "| restored / cold | {:.2}× | | ≤ 0.3× |",
        restored.median().as_secs_f64() / heavy_cold.median().as_secs_f64().max(1e-9)
    );
    Ok(())
}
