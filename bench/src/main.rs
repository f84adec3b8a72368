//! `moat-bench`: measures moat and its peers side by side on this machine and prints medians,
//! p99s and ratios as a Markdown table (the form `docs/SPEC.md` records).
//!
//! Usage: `moat-bench --moat PATH [--runs N]` (see `bench/run.sh`, which builds everything and
//! installs the peers). Peers that are not installed are reported as skipped.

mod agent;
mod gvisor;
mod network;
mod server;
mod stats;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use stats::Samples;

struct Args {
    moat: PathBuf,
    runs: usize,
    /// Idle sandboxes the server benchmark holds at once.
    idle: usize,
    /// Only the `moat serve` benchmarks.
    server_only: bool,
    /// Only the one-shot (`moat run`) benchmarks.
    run_only: bool,
    /// Only the gvisor backend's benchmarks.
    gvisor_only: bool,
    /// Only the network egress benchmarks.
    network_only: bool,
    /// Another moat binary, timed in turn with `moat` run by run (so a machine whose speed
    /// drifts affects both alike): a before/after comparison.
    baseline: Option<PathBuf>,
}

const USAGE: &str = "usage: moat-bench --moat PATH [--baseline PATH] [--runs N] [--idle N] [--server-only | --run-only | --gvisor-only | --network-only]";

fn parse_args() -> Result<Args> {
    let mut moat = None;
    let mut runs = 200;
    let mut idle = 1000;
    let mut server_only = false;
    let mut run_only = false;
    let mut gvisor_only = false;
    let mut network_only = false;
    let mut baseline = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--moat" => moat = it.next().map(PathBuf::from),
            "--baseline" => baseline = Some(PathBuf::from(it.next().context("--baseline PATH")?)),
            "--run-only" => run_only = true,
            "--gvisor-only" => gvisor_only = true,
            "--network-only" => network_only = true,
            "--runs" => runs = it.next().context("--runs N")?.parse().context("--runs N")?,
            "--idle" => idle = it.next().context("--idle N")?.parse().context("--idle N")?,
            "--server-only" => server_only = true,
            other => bail!("unknown argument {other}; {USAGE}"),
        }
    }
    if [server_only, run_only, gvisor_only, network_only]
        .iter()
        .filter(|&&b| b)
        .count()
        > 1
    {
        bail!(
            "--server-only, --run-only, --gvisor-only and --network-only exclude each other; {USAGE}"
        );
    }
    Ok(Args {
        moat: moat.with_context(|| format!("--moat PATH is required; {USAGE}"))?,
        runs,
        idle,
        server_only,
        run_only,
        gvisor_only,
        network_only,
        baseline,
    })
}

/// Times `argv` `runs` times (after 3 warm-up runs); fails if any run fails.
fn time_command(argv: &[String], runs: usize) -> Result<Samples> {
    let mut all = time_in_turn(std::slice::from_ref(&argv.to_vec()), runs)?;
    Ok(all.remove(0))
}

/// Times each of `argvs` `runs` times (after 3 warm-up runs), one run of each in turn; fails if
/// any run fails.
pub(crate) fn time_in_turn(argvs: &[Vec<String>], runs: usize) -> Result<Vec<Samples>> {
    let mut all: Vec<Samples> = argvs.iter().map(|_| Samples::default()).collect();
    for i in 0..runs + 3 {
        for (argv, s) in argvs.iter().zip(&mut all) {
            let start = Instant::now();
            let st = Command::new(&argv[0])
                .args(&argv[1..])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .with_context(|| format!("running {argv:?}"))?;
            let took = start.elapsed();
            if !st.success() {
                bail!("{argv:?} failed: {st}");
            }
            if i >= 3 {
                s.push(took);
            }
        }
    }
    Ok(all)
}

pub(crate) fn which(bin: &str) -> Option<String> {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| Path::new(d).join(bin))
        .find(|p| p.is_file())
        .map(|p| p.display().to_string())
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// bubblewrap with every namespace unshared and the same system directories as moat's `host`
/// template, read-only.
fn bwrap_argv(bwrap: &str, cmd: &[&str]) -> Vec<String> {
    let mut v = strings(&[bwrap, "--unshare-all", "--die-with-parent"]);
    for d in ["usr", "etc"] {
        v.extend(strings(&["--ro-bind", &format!("/{d}"), &format!("/{d}")]));
    }
    for d in ["bin", "sbin", "lib", "lib64"] {
        let p = Path::new("/").join(d);
        if let Ok(t) = std::fs::read_link(&p) {
            v.extend(strings(&[
                "--symlink",
                &t.display().to_string(),
                &format!("/{d}"),
            ]));
        } else if p.is_dir() {
            v.extend(strings(&["--ro-bind", &format!("/{d}"), &format!("/{d}")]));
        }
    }
    v.extend(strings(&[
        "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
    ]));
    v.extend(strings(cmd));
    v
}

/// An OCI bundle whose root is the host's `/`, read-only, running `cmd`.
pub(crate) fn runsc_bundle(cmd: &[&str]) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "moat-bench-runsc-{}-{}",
        std::process::id(),
        cmd.join("_").len()
    ));
    std::fs::create_dir_all(&dir)?;
    let args: Vec<String> = cmd.iter().map(|a| format!("{a:?}")).collect();
    let config = format!(
        r#"{{"ociVersion":"1.0.0","process":{{"user":{{"uid":0,"gid":0}},"args":[{}],"env":["PATH=/usr/bin:/bin"],"cwd":"/"}},"root":{{"path":"/","readonly":true}},"hostname":"bench","mounts":[{{"destination":"/proc","type":"proc","source":"proc"}},{{"destination":"/tmp","type":"tmpfs","source":"tmpfs"}}],"linux":{{"namespaces":[{{"type":"pid"}},{{"type":"network"}},{{"type":"ipc"}},{{"type":"uts"}},{{"type":"mount"}}]}}}}"#,
        args.join(",")
    );
    std::fs::write(dir.join("config.json"), config)?;
    Ok(dir)
}

pub(crate) fn runsc_argv(runsc: &str, bundle: &Path, root: &Path) -> Vec<String> {
    vec![
        runsc.to_string(),
        format!("--root={}", root.display()),
        "--platform=ptrace".into(),
        "--network=none".into(),
        "run".into(),
        "--bundle".into(),
        bundle.display().to_string(),
        format!("bench{}", std::process::id()),
    ]
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let moat = args.moat.display().to_string();
    let n = args.runs;
    if args.server_only {
        return server::run(&args.moat, n, args.idle);
    }
    if args.gvisor_only {
        return gvisor::run(&args.moat, n);
    }
    if args.network_only {
        return network::run(&args.moat, n);
    }
    println!(
        "# moat benchmarks ({} runs each, after 3 warm-up runs)\n",
        n
    );
    println!("| what | median | p99 | vs bare | vs bwrap |");
    println!("| --- | --- | --- | --- | --- |");
    for (label, cmd) in [
        ("/bin/true", vec!["/bin/true"]),
        ("python3 -c pass", vec!["/usr/bin/python3", "-c", "pass"]),
    ] {
        let bare = time_command(&strings(&cmd), n)?;
        let run_argv = |bin: &str| {
            let mut v = strings(&[bin, "run", "--"]);
            v.extend(strings(&cmd));
            v
        };
        let mut argvs = vec![run_argv(&moat)];
        if let Some(b) = &args.baseline {
            argvs.push(run_argv(&b.display().to_string()));
        }
        let mut timed = time_in_turn(&argvs, n)?;
        let baseline_s = (timed.len() > 1).then(|| timed.remove(1));
        let moat_s = timed.remove(0);
        let bwrap_s = match which("bwrap") {
            Some(b) => Some(time_command(&bwrap_argv(&b, &cmd), n)?),
            None => None,
        };
        let runsc_s = match which("runsc") {
            Some(r) => {
                let bundle = runsc_bundle(&cmd)?;
                let root = std::env::temp_dir()
                    .join(format!("moat-bench-runsc-root-{}", std::process::id()));
                let s = time_command(&runsc_argv(&r, &bundle, &root), (n / 10).max(10)).ok();
                let _ = std::fs::remove_dir_all(&bundle);
                let _ = std::fs::remove_dir_all(&root);
                s
            }
            None => None,
        };
        bare.row(&format!("bare `{label}`"), &bare, bwrap_s.as_ref());
        moat_s.row(&format!("`moat run -- {label}`"), &bare, bwrap_s.as_ref());
        if let (Some(b), Some(path)) = (&baseline_s, &args.baseline) {
            b.row(
                &format!(
                    "baseline `{} run -- {label}` (in turn with the row above)",
                    path.display()
                ),
                &bare,
                bwrap_s.as_ref(),
            );
        }
        match &bwrap_s {
            Some(b) => b.row(&format!("`bwrap --unshare-all {label}`"), &bare, Some(b)),
            None => println!("| `bwrap {label}` | skipped: bwrap not installed | | | |"),
        }
        match &runsc_s {
            Some(r) => r.row(
                &format!("`runsc --platform=ptrace run {label}`"),
                &bare,
                bwrap_s.as_ref(),
            ),
            None => println!("| `runsc {label}` | skipped: runsc not installed or failed | | | |"),
        }
    }
    if args.run_only {
        return Ok(());
    }
    if which("runsc").is_some() {
        gvisor::run(&args.moat, n)?;
    } else {
        println!("\n(the gvisor backend: skipped, runsc is not installed)");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(agent::exec_and_idle(&args.moat, n))?;
    server::run(&args.moat, n, args.idle)?;
    network::run(&args.moat, n)
}
