//! Measurements that need a running sandbox: the exec round trip through the agent, and the
//! memory of an idle sandbox.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use moat_backend_native::{NativeBackend, NativeOptions};
use moat_engine::agent_client::{AgentClient, CallOptions};
use moat_engine::backend::Backend;
use moat_engine::plan::SandboxPlan;
use moat_proto::process::{ProcessConfig, StartRequest, process_event};

use crate::stats::{Samples, ms};

async fn run_true(client: &AgentClient) -> Result<()> {
    let req = StartRequest {
        process: Some(ProcessConfig {
            cmd: "/bin/true".into(),
            ..Default::default()
        }),
        stdin: Some(false),
        ..Default::default()
    };
    let mut stream = client.start(req, CallOptions::default()).await?;
    while let Some(ev) = stream.next().await {
        if let Some(process_event::Event::End(end)) = ev?.event {
            if end.exit_code != 0 {
                bail!("/bin/true exited {}", end.exit_code);
            }
            return Ok(());
        }
    }
    bail!("stream ended without an end event")
}

fn pss_kib(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Prints the exec round-trip and idle-memory rows.
pub async fn exec_and_idle(moat: &Path, n: usize) -> Result<()> {
    let backend = NativeBackend::new(&NativeOptions {
        agent_binary: Some(moat.to_path_buf()),
        ..NativeOptions::default()
    })?;
    let id = format!("bench{}", std::process::id());
    let plan = SandboxPlan::host("native");
    let mut inst = backend.create(&id, &plan).await?;
    let channel = inst.take_channel().context("agent channel")?;
    let client = AgentClient::handshake(channel).await?;

    let mut bare = Samples::default();
    let mut through_agent = Samples::default();
    for i in 0..n + 3 {
        let t = Instant::now();
        Command::new("/bin/true").stdout(Stdio::null()).status()?;
        let b = t.elapsed();
        let t = Instant::now();
        run_true(&client).await?;
        let a = t.elapsed();
        if i >= 3 {
            bare.push(b);
            through_agent.push(a);
        }
    }
    println!();
    println!("| exec round trip on a running sandbox | median | p99 | over bare |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| bare fork+exec+wait `/bin/true` | {} | {} | |",
        ms(bare.median()),
        ms(bare.percentile(99.0))
    );
    println!(
        "| `/bin/true` through the agent | {} | {} | +{} |",
        ms(through_agent.median()),
        ms(through_agent.percentile(99.0)),
        ms(through_agent.median().saturating_sub(bare.median()))
    );

    tokio::time::sleep(Duration::from_secs(1)).await;
    let stats = inst.stats();
    let pss = inst.host_pid().and_then(pss_kib);
    println!();
    println!("| idle sandbox memory | value |");
    println!("| --- | --- |");
    println!(
        "| cgroup memory (agent, page tables, tmpfs, kernel objects) | {:.2} MiB |",
        stats.memory_bytes as f64 / (1 << 20) as f64
    );
    match pss {
        Some(k) => println!(
            "| agent proportional set size (Pss) | {:.2} MiB |",
            k as f64 / 1024.0
        ),
        None => println!("| agent proportional set size (Pss) | unavailable |"),
    }
    inst.destroy().await?;
    Ok(())
}
