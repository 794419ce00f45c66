//! `cargo xtask prune-memory`: runs `ressa prune` (release build) on a model once per method
//! and measures each run as a child process: peak resident set (`ru_maxrss` of the child,
//! from `wait4`), wall time, CPU time, and the machine's load average while it ran (sampled
//! from `/proc/loadavg`). Outputs are removed after each run unless `--keep`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

#[derive(clap::Args)]
pub struct PruneMemoryArgs {
    /// The HF model directory to prune.
    #[arg(long)]
    model: PathBuf,
    /// A method to run (repeat for several: one prune each).
    #[arg(long = "method", required = true)]
    methods: Vec<String>,
    /// `--sparsity` of every run.
    #[arg(long, default_value = "0.5")]
    sparsity: String,
    /// Calibration caption list.
    #[arg(long)]
    calibration: PathBuf,
    /// Its image root.
    #[arg(long)]
    images: PathBuf,
    /// Calibration samples.
    #[arg(long, default_value_t = 4)]
    samples: usize,
    /// `--memory-budget` of every run (e.g. 4GiB).
    #[arg(long)]
    memory_budget: Option<String>,
    /// Fail when a run's peak resident set exceeds this (e.g. 4GiB, 3GB).
    #[arg(long)]
    max_rss: Option<String>,
    /// Where the outputs go.
    #[arg(long, default_value = "target/prune-memory")]
    work_dir: PathBuf,
    /// Keep the pruned outputs.
    #[arg(long)]
    keep: bool,
    /// The `ressa` binary (default: `cargo build --release -p ressa-cli`, then
    /// target/release/ressa).
    #[arg(long)]
    ressa: Option<PathBuf>,
    /// Append each run's measurements to this file as a JSON line.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Further `ressa prune` arguments (after `--`).
    #[arg(last = true)]
    extra: Vec<String>,
}

/// A size as `ressa prune --memory-budget` reads it (B, K/KiB…, KB…).
fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number.parse().with_context(|| format!("size {text:?}"))?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024f64.powi(2),
        "g" | "gib" => 1024f64.powi(3),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        u => bail!("size {text:?}: unknown unit {u:?}"),
    };
    Ok((value * scale) as u64)
}

fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// What one child run measured.
struct Measured {
    status: i32,
    wall: f64,
    max_rss: u64,
    cpu: f64,
}

/// Runs `cmd` and waits for it with `wait4`, which returns the child's own resource usage.
fn run_measured(cmd: &mut Command) -> Result<Measured> {
    let start = Instant::now();
    let child = cmd.spawn().context("starting ressa")?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: a zeroed rusage is a valid value for wait4 to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our child, not waited for elsewhere (`child` is never waited on).
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if r != pid {
        bail!("wait4: {}", std::io::Error::last_os_error());
    }
    drop(child);
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    Ok(Measured {
        status: if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            -1
        },
        wall: start.elapsed().as_secs_f64(),
        // Linux reports kilobytes (KiB).
        max_rss: usage.ru_maxrss as u64 * 1024,
        cpu: secs(usage.ru_utime) + secs(usage.ru_stime),
    })
}

fn ressa_binary(args: &PruneMemoryArgs) -> Result<PathBuf> {
    if let Some(p) = &args.ressa {
        return Ok(p.clone());
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "-p", "ressa-cli"])
        .current_dir(&root)
        .status()
        .context("cargo build --release -p ressa-cli")?;
    if !status.success() {
        bail!("cargo build --release -p ressa-cli failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target.join("release").join("ressa"))
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

pub fn run(args: PruneMemoryArgs) -> Result<()> {
    let limit = args.max_rss.as_deref().map(parse_size).transpose()?;
    let ressa = ressa_binary(&args)?;
    std::fs::create_dir_all(&args.work_dir)?;
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut failures = Vec::new();
    for method in &args.methods {
        let out = args.work_dir.join(format!("pruned-{method}"));
        if out.exists() {
            std::fs::remove_dir_all(&out)?;
        }
        let mut cmd = Command::new(&ressa);
        cmd.arg("prune")
            .arg("--model")
            .arg(&args.model)
            .args(["--method", method, "--sparsity", &args.sparsity])
            .arg("--calibration")
            .arg(&args.calibration)
            .arg("--images")
            .arg(&args.images)
            .args(["--samples", &args.samples.to_string()])
            .arg("--out")
            .arg(&out);
        if let Some(b) = &args.memory_budget {
            cmd.args(["--memory-budget", b]);
        }
        cmd.args(&args.extra);
        // The machine's load while the run goes on (other work shares the cores).
        let stop = Arc::new(AtomicBool::new(false));
        let loads = Arc::new(Mutex::new(Vec::new()));
        let sampler = {
            let (stop, loads) = (Arc::clone(&stop), Arc::clone(&loads));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(l) = loadavg() {
                        loads.lock().unwrap().push(l);
                    }
                    for _ in 0..50 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            })
        };
        eprintln!("prune-memory: {method}: {cmd:?}");
        let m = run_measured(&mut cmd)?;
        stop.store(true, Ordering::Relaxed);
        let _ = sampler.join();
        let loads = loads.lock().unwrap().clone();
        let (lo, hi) = loads
            .iter()
            .fold((f64::INFINITY, 0f64), |(a, b), &l| (a.min(l), b.max(l)));
        let mean = loads.iter().sum::<f64>() / loads.len().max(1) as f64;
        let out_bytes = dir_bytes(&out);
        println!(
            "{method}: exit {}, wall {:.1} s, cpu {:.1} s, peak RSS {:.3} GiB ({} MiB), load average (1 min) {:.2} mean, {:.2}–{:.2} over the run, {cpus} cpus; output {:.2} GiB",
            m.status,
            m.wall,
            m.cpu,
            gib(m.max_rss),
            m.max_rss >> 20,
            mean,
            lo,
            hi,
            gib(out_bytes)
        );
        if let Some(path) = &args.json {
            use std::io::Write;
            let line = serde_json::json!({
                "model": args.model, "method": method, "sparsity": args.sparsity,
                "samples": args.samples, "memory_budget": args.memory_budget,
                "extra": args.extra, "exit": m.status, "wall_s": m.wall, "cpu_s": m.cpu,
                "max_rss_bytes": m.max_rss, "load_mean": mean, "load_min": lo, "load_max": hi,
                "cpus": cpus, "output_bytes": out_bytes,
            });
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            writeln!(f, "{line}")?;
        }
        if m.status != 0 {
            failures.push(format!("{method}: ressa prune exited with {}", m.status));
        }
        if let Some(limit) = limit
            && m.max_rss > limit
        {
            failures.push(format!(
                "{method}: peak RSS {} MiB above {} MiB",
                m.max_rss >> 20,
                limit >> 20
            ));
        }
        if !args.keep && out.exists() {
            std::fs::remove_dir_all(&out)?;
        }
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("; "));
    }
    Ok(())
}

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                dir_bytes(&p)
            } else {
                p.metadata().map_or(0, |m| m.len())
            }
        })
        .sum()
}
