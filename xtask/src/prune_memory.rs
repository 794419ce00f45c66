//! `cargo xtask prune-memory`: runs `ressa prune` (release build) on a model once per method
//! and measures each run as a child process: peak resident set (`ru_maxrss` of the child,
//! from `wait4`), wall time, CPU time, and the machine's load average while it ran (sampled
//! from `/proc/loadavg`; other work may share the cores).
//!
//! The model is a directory (`--model`) or a random checkpoint of a config
//! (`--model-config configs/models/NAME`, stored in `--dtype`, bf16 by default), written once
//! under `--work-dir` and reused by later runs. A run is stopped (SIGINT, which makes `ressa`
//! remove its temporaries) when the disk's free space falls below `--min-free-disk` or after
//! `--time-limit`; the record then says so and how much of the output had been written, so a
//! peak measured over part of a model is never reported as a whole run. Each run appends a JSON
//! line to `--json` and `--report` is rewritten from all of them (the latest run per model,
//! method and settings).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ressa_prune::stream::parse_size;

#[derive(clap::Args)]
pub struct PruneMemoryArgs {
    /// The HF model directory to prune.
    #[arg(
        long,
        required_unless_present = "model_config",
        conflicts_with = "model_config"
    )]
    model: Option<PathBuf>,
    /// A model config directory (`configs/models/NAME`, its `config.json`): prune a random
    /// checkpoint of it, written under --work-dir unless one is there already.
    #[arg(long)]
    model_config: Option<PathBuf>,
    /// Stored dtype of the random checkpoint: f32, f16 or bf16.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Tokenizers and preprocessor config of the random checkpoint (default: the test fixture
    /// of the config's family).
    #[arg(long)]
    like: Option<PathBuf>,
    /// Seed of the random checkpoint.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Delete the random checkpoint after the runs.
    #[arg(long)]
    remove_checkpoint: bool,
    /// A method to run (repeat for several: one prune each).
    #[arg(long = "method", required = true)]
    methods: Vec<String>,
    /// `--sparsity` of every run.
    #[arg(long, default_value = "0.5")]
    sparsity: String,
    /// Calibration caption list.
    #[arg(long, default_value = "tests/fixtures/calibration/captions.json")]
    calibration: PathBuf,
    /// Its image root.
    #[arg(long, default_value = "tests/fixtures/calibration")]
    images: PathBuf,
    /// Calibration samples.
    #[arg(long, default_value_t = 6)]
    samples: usize,
    /// `--memory-budget` of every run (e.g. 4GiB).
    #[arg(long)]
    memory_budget: Option<String>,
    /// Fail when a run's peak resident set exceeds this (e.g. 4GiB, 3GB).
    #[arg(long)]
    max_rss: Option<String>,
    /// Stop a run when the free space of --work-dir's file system falls below this.
    #[arg(long, default_value = "3GiB")]
    min_free_disk: String,
    /// Stop a run after this many seconds.
    #[arg(long)]
    time_limit: Option<f64>,
    /// Where the checkpoints and outputs go.
    #[arg(long, default_value = "target/prune-memory")]
    work_dir: PathBuf,
    /// Keep the pruned outputs.
    #[arg(long)]
    keep: bool,
    /// The `ressa` binary (default: `cargo build --release -p ressa-cli`, then
    /// target/release/ressa).
    #[arg(long)]
    ressa: Option<PathBuf>,
    /// Each run's measurements are appended here as a JSON line.
    #[arg(long, default_value = "docs/prune-memory.json")]
    json: PathBuf,
    /// Markdown table of the latest run per model, method and settings in --json.
    #[arg(long, default_value = "docs/prune-memory.md")]
    report: PathBuf,
    /// Further `ressa prune` arguments (after `--`).
    #[arg(last = true)]
    extra: Vec<String>,
}

fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Free bytes for an unprivileged user on the file system holding `path`.
fn free_disk(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: a zeroed statvfs is a valid value for statvfs to fill; `c` is a C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Resident set of a running process (`VmRSS`), in bytes.
fn rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Bytes allocated on disk under `dir` (sparse files count what was written).
fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| {
            let p = e.path();
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => allocated_bytes(&p),
                Ok(m) => m.blocks() * 512,
                Err(_) => 0,
            }
        })
        .sum()
}

/// Size of the `*.safetensors` files of a model directory.
fn weight_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// What the watcher saw while a run went on.
#[derive(Default)]
struct Watch {
    loads: Vec<f64>,
    /// Why the run was stopped, if it was.
    stopped: Option<String>,
    /// Largest `VmRSS` sample and when (seconds after the start).
    rss_peak: (u64, f64),
    /// Output bytes on disk at the last sample.
    output: u64,
}

/// What one child run measured.
struct Measured {
    status: i32,
    wall: f64,
    max_rss: u64,
    cpu: f64,
    watch: Watch,
}

struct Limits<'a> {
    min_free: u64,
    time: Option<f64>,
    disk: &'a Path,
    output: &'a Path,
}

/// Runs `cmd` and waits for it with `wait4`, which returns the child's own resource usage; a
/// watcher thread samples the load, the child's resident set and the output written, and
/// stops the child (SIGINT, SIGKILL two minutes later) when a limit is reached.
fn run_measured(cmd: &mut Command, limits: &Limits) -> Result<Measured> {
    let start = Instant::now();
    let child = cmd.spawn().context("starting ressa")?;
    let pid = child.id();
    let done = Arc::new(AtomicBool::new(false));
    let watch = Arc::new(Mutex::new(Watch::default()));
    let watcher = {
        let (done, watch) = (Arc::clone(&done), Arc::clone(&watch));
        let (min_free, time) = (limits.min_free, limits.time);
        let (disk, output) = (limits.disk.to_path_buf(), limits.output.to_path_buf());
        std::thread::spawn(move || {
            let mut tick = 0u64;
            let mut signalled: Option<Instant> = None;
            while !done.load(Ordering::Relaxed) {
                let t = start.elapsed().as_secs_f64();
                let mut w = watch.lock().unwrap();
                if let Some(rss) = rss_of(pid)
                    && rss > w.rss_peak.0
                {
                    w.rss_peak = (rss, t);
                }
                if tick.is_multiple_of(10) {
                    if let Some(l) = loadavg() {
                        w.loads.push(l);
                    }
                    w.output = allocated_bytes(&output);
                }
                let reason = match (free_disk(&disk), time) {
                    (Some(free), _) if free < min_free => Some(format!(
                        "stopped: free disk {} MiB below --min-free-disk",
                        free >> 20
                    )),
                    (_, Some(limit)) if t > limit => {
                        Some(format!("stopped: --time-limit {limit} s"))
                    }
                    _ => None,
                };
                match (signalled, reason) {
                    (None, Some(reason)) => {
                        w.output = allocated_bytes(&output);
                        eprintln!("prune-memory: {reason}");
                        w.stopped = Some(reason);
                        signalled = Some(Instant::now());
                        // SAFETY: signalling our own child, not yet reaped (`done` is false).
                        unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) };
                    }
                    (Some(at), _) if at.elapsed() > Duration::from_secs(120) => {
                        // SAFETY: as above.
                        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                    }
                    _ => {}
                }
                drop(w);
                tick += 1;
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    let mut status = 0;
    // SAFETY: a zeroed rusage is a valid value for wait4 to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our child, not waited for elsewhere (`child` is never waited on).
    let r = unsafe { libc::wait4(pid as libc::pid_t, &mut status, 0, &mut usage) };
    done.store(true, Ordering::Relaxed);
    let _ = watcher.join();
    if r != pid as libc::pid_t {
        bail!("wait4: {}", std::io::Error::last_os_error());
    }
    drop(child);
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    let watch = std::mem::take(&mut *watch.lock().unwrap());
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
        watch,
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

/// The fixture whose tokenizers a random checkpoint of `config` borrows: any tokenizer of the
/// family does (its ids are below the model's vocabulary), the image size is the config's.
fn default_like(config: &Path) -> Result<PathBuf> {
    let text = std::fs::read_to_string(config).with_context(|| config.display().to_string())?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| config.display().to_string())?;
    let kind = v["model_type"].as_str().unwrap_or("");
    let text_kind = v["text_config"]["model_type"].as_str().unwrap_or("");
    let fixture = match (kind, text_kind) {
        ("llava", _) => "llava-hub",
        (_, "llama") => "instructblip-llama-mha",
        (_, "t5") => "instructblip-t5-a",
        _ => bail!(
            "{}: no fixture for model_type {kind:?} / text {text_kind:?}; give --like",
            config.display()
        ),
    };
    Ok(Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/models")
        .join(fixture))
}

/// The model directory to prune: `--model`, or the random checkpoint of `--model-config`
/// (written to a temporary directory renamed at the end, so an existing one is complete).
fn model_dir(args: &PruneMemoryArgs) -> Result<PathBuf> {
    if let Some(m) = &args.model {
        return Ok(m.clone());
    }
    let dir = args.model_config.as_ref().expect("clap requires one");
    let config = dir.join("config.json");
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "model".into());
    let dtype = crate::parse_dtype(&args.dtype)?;
    let out = args
        .work_dir
        .join(format!("{name}-{}", args.dtype.to_ascii_lowercase()));
    if out.is_dir() {
        eprintln!("prune-memory: reusing {}", out.display());
        return Ok(out);
    }
    let like = match &args.like {
        Some(l) => l.clone(),
        None => default_like(&config)?,
    };
    let partial = args.work_dir.join(format!(".{name}.partial"));
    if partial.exists() {
        std::fs::remove_dir_all(&partial)?;
    }
    eprintln!(
        "prune-memory: writing a random {} checkpoint of {}",
        args.dtype,
        config.display()
    );
    let start = Instant::now();
    let written = crate::random_checkpoint(&config, &partial, Some(&like), args.seed, None, dtype);
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, &out)?;
    eprintln!(
        "prune-memory: wrote {} ({:.2} GiB) in {:.0} s",
        out.display(),
        gib(weight_bytes(&out)),
        start.elapsed().as_secs_f64()
    );
    Ok(out)
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// One line of /proc/cpuinfo's `model name` and /proc/meminfo's `MemTotal` (bytes).
fn machine() -> (String, u64) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<u64>().ok())
        })
        .map_or(0, |k| k * 1024);
    (cpu, mem)
}

pub fn run(args: PruneMemoryArgs) -> Result<()> {
    let limit = args.max_rss.as_deref().map(parse_size).transpose()?;
    let min_free = parse_size(&args.min_free_disk).context("--min-free-disk")?;
    std::fs::create_dir_all(&args.work_dir)
        .with_context(|| format!("--work-dir {}", args.work_dir.display()))?;
    let model = model_dir(&args)?;
    let ressa = ressa_binary(&args)?;
    let name = model
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let checkpoint_bytes = weight_bytes(&model);
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let (cpu_model, mem_total) = machine();
    let mut failures = Vec::new();
    for method in &args.methods {
        let run_dir = args.work_dir.join(format!("run-{method}"));
        if run_dir.exists() {
            std::fs::remove_dir_all(&run_dir)?;
        }
        std::fs::create_dir_all(&run_dir)?;
        let out = run_dir.join("pruned");
        let mut cmd = Command::new(&ressa);
        cmd.arg("prune")
            .arg("--model")
            .arg(&model)
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
        eprintln!("prune-memory: {method}: {cmd:?}");
        let limits = Limits {
            min_free,
            time: args.time_limit,
            disk: &args.work_dir,
            output: &run_dir,
        };
        let m = run_measured(&mut cmd, &limits)?;
        let w = &m.watch;
        let (lo, hi) = w
            .loads
            .iter()
            .fold((f64::INFINITY, 0f64), |(a, b), &l| (a.min(l), b.max(l)));
        let mean = w.loads.iter().sum::<f64>() / w.loads.len().max(1) as f64;
        let output_bytes = if m.status == 0 {
            allocated_bytes(&run_dir)
        } else {
            w.output
        };
        let outcome = match (&w.stopped, m.status) {
            (Some(why), _) => why.clone(),
            (None, 0) => "completed".to_string(),
            // ressa's SIGINT/SIGTERM handler: someone stopped the run by hand.
            (None, 130) => "stopped: interrupted (SIGINT)".to_string(),
            (None, s) => format!("failed: exit {s}"),
        };
        println!(
            "{name} {method}: {outcome}, wall {:.1} s, cpu {:.1} s, peak RSS {:.3} GiB ({} MiB; sampled peak at {:.0} s), load average (1 min) {:.2} mean, {:.2}–{:.2} over the run, {cpus} cpus; output written {:.2} of {:.2} GiB",
            m.wall,
            m.cpu,
            gib(m.max_rss),
            m.max_rss >> 20,
            w.rss_peak.1,
            mean,
            lo,
            hi,
            gib(output_bytes),
            gib(checkpoint_bytes),
        );
        let date = Command::new("date")
            .args(["-u", "+%Y-%m-%d"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let line = serde_json::json!({
            "model": name, "model_dir": model, "dtype": args.dtype,
            "checkpoint_bytes": checkpoint_bytes, "method": method, "sparsity": args.sparsity,
            "samples": args.samples, "memory_budget": args.memory_budget, "extra": args.extra,
            "outcome": outcome, "exit": m.status, "wall_s": m.wall, "cpu_s": m.cpu,
            "max_rss_bytes": m.max_rss, "sampled_peak_at_s": w.rss_peak.1,
            "output_bytes": output_bytes, "load_mean": mean, "load_min": lo, "load_max": hi,
            "cpus": cpus, "cpu_model": cpu_model, "mem_total_bytes": mem_total, "date": date,
        });
        {
            use std::io::Write;
            if let Some(parent) = args.json.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&args.json)
                .with_context(|| format!("--json {}", args.json.display()))?;
            writeln!(f, "{line}")?;
        }
        write_report(&args.json, &args.report)?;
        if w.stopped.is_none() && !matches!(m.status, 0 | 130) {
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
        if !args.keep {
            std::fs::remove_dir_all(&run_dir)?;
        }
    }
    if args.remove_checkpoint && args.model_config.is_some() {
        std::fs::remove_dir_all(&model)?;
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("; "));
    }
    Ok(())
}

/// Rewrites the markdown report from the JSON lines: the latest run per model, method,
/// samples, sparsity, budget and extra arguments, in model then method order. Written to a
/// temporary file renamed over the report.
fn write_report(json: &Path, report: &Path) -> Result<()> {
    let text = std::fs::read_to_string(json).with_context(|| json.display().to_string())?;
    let mut runs: Vec<serde_json::Value> = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}:{}", json.display(), i + 1))?;
        let key = |v: &serde_json::Value| {
            [
                "model",
                "method",
                "samples",
                "sparsity",
                "memory_budget",
                "extra",
                "dtype",
            ]
            .map(|k| v[k].to_string())
        };
        runs.retain(|r| key(r) != key(&v));
        runs.push(v);
    }
    runs.sort_by_key(|r| (r["model"].to_string(), r["method"].to_string()));
    let num = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
    let mut md = String::from(
        "# Peak memory of `ressa prune`\n\n\
         Written by `cargo xtask prune-memory` (`xtask/src/prune_memory.rs`) from\n\
         `docs/prune-memory.json`: `ressa prune` (release build) as a child process on a random\n\
         checkpoint of the config (`cargo xtask random-checkpoint`'s initialisation), peak\n\
         resident set from `wait4` (`ru_maxrss`), wall and CPU time. The machine's other work\n\
         shares its cores: the load average column is the 1-minute load while the run went on.\n\
         A stopped run's peak covers the part of the model it pruned (output written).\n\n\
         | Model | Stored | Method | Sparsity | Samples | `--memory-budget` | Outcome | Peak RSS | Wall | CPU | Load avg | Output written | Machine | Date |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in &runs {
        let budget = r["memory_budget"].as_str().unwrap_or("none");
        let extra: Vec<&str> = r["extra"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default();
        let method = if extra.is_empty() {
            r["method"].as_str().unwrap_or("").to_string()
        } else {
            format!(
                "{} `{}`",
                r["method"].as_str().unwrap_or(""),
                extra.join(" ")
            )
        };
        md.push_str(&format!(
            "| {} | {} ({:.1} GiB) | {} | {} | {} | {} | {} | {:.2} GiB | {:.0} s | {:.0} s | {:.1} ({:.1}–{:.1}) | {:.1} GiB | {} CPUs, {:.0} GiB RAM ({}) | {} |\n",
            r["model"].as_str().unwrap_or(""),
            r["dtype"].as_str().unwrap_or(""),
            gib(num(&r["checkpoint_bytes"]) as u64),
            method,
            r["sparsity"].as_str().unwrap_or(""),
            r["samples"],
            budget,
            r["outcome"].as_str().unwrap_or(""),
            gib(num(&r["max_rss_bytes"]) as u64),
            num(&r["wall_s"]),
            num(&r["cpu_s"]),
            num(&r["load_mean"]),
            num(&r["load_min"]),
            num(&r["load_max"]),
            gib(num(&r["output_bytes"]) as u64),
            r["cpus"],
            gib(num(&r["mem_total_bytes"]) as u64),
            r["cpu_model"].as_str().unwrap_or(""),
            r["date"].as_str().unwrap_or(""),
        ));
    }
    let tmp = report.with_extension("md.partial");
    std::fs::write(&tmp, md).with_context(|| tmp.display().to_string())?;
    std::fs::rename(&tmp, report).with_context(|| report.display().to_string())?;
    Ok(())
}
