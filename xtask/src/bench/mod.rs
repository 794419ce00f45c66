//! `cargo xtask bench [--backend cpu|cuda|wgpu]...`: runs the criterion benches of every crate
//! for each chosen backend, the PyTorch scripts for the same work where PyTorch is installed,
//! and writes `docs/benchmarks.md` (tables with ratios measured in this one run) plus
//! `docs/benchmarks.json` (the raw numbers).
//!
//! Criterion writes into a fresh `CRITERION_HOME` for the run, so no number from an older run
//! reaches the report.

mod criterion;
mod report;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

pub use criterion::Measurement;

/// A burn backend the benches can run on.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// burn's Flex CPU backend (plus the host kernels and pruners).
    Cpu,
    Cuda,
    Wgpu,
}

impl Backend {
    /// The name the benches use in their ids (`.../flex`, `.../cuda`, `.../wgpu`).
    pub fn bench_name(self) -> &'static str {
        match self {
            Backend::Cpu => "flex",
            Backend::Cuda => "cuda",
            Backend::Wgpu => "wgpu",
        }
    }

    fn torch_device(self) -> &'static str {
        match self {
            Backend::Cuda => "cuda",
            _ => "cpu",
        }
    }
}

/// One criterion bench target and its PyTorch counterpart.
struct Suite {
    package: &'static str,
    bench: &'static str,
    /// Runs on the GPU backends too (generic over burn's backend; ids end in `/<backend>`).
    backend_generic: bool,
    /// Only with a GPU backend (needs that backend's feature).
    gpu_only: bool,
    torch_script: Option<&'static str>,
}

const SUITES: [Suite; 5] = [
    Suite {
        package: "ressa-sparse",
        bench: "kernels",
        backend_generic: false,
        gpu_only: false,
        torch_script: Some("scripts/bench_kernels_torch.py"),
    },
    Suite {
        package: "ressa-prune",
        bench: "pruners",
        backend_generic: false,
        gpu_only: false,
        torch_script: Some("scripts/bench_pruners_torch.py"),
    },
    Suite {
        package: "ressa-models",
        bench: "forward",
        backend_generic: true,
        gpu_only: false,
        torch_script: Some("scripts/bench_forward_torch.py"),
    },
    Suite {
        package: "ressa-train",
        bench: "train_step",
        backend_generic: true,
        gpu_only: false,
        torch_script: Some("scripts/bench_train_torch.py"),
    },
    Suite {
        package: "ressa-sparse",
        bench: "gpu_kernels",
        backend_generic: true,
        gpu_only: true,
        torch_script: None,
    },
];

/// Every package with a bench, selected together in each `cargo bench`.
const PACKAGES: [&str; 4] = ["ressa-sparse", "ressa-prune", "ressa-models", "ressa-train"];
/// Packages with `cuda` / `wgpu` features for their benches.
const GPU_FEATURE_PACKAGES: [&str; 3] = ["ressa-sparse", "ressa-models", "ressa-train"];

/// The `cargo bench` invocations for `backend`: (args, suite index).
fn cargo_bench_args(
    backend: Backend,
    quick: bool,
    filter: Option<&str>,
) -> Vec<(Vec<String>, usize)> {
    let mut runs = Vec::new();
    for (i, s) in SUITES.iter().enumerate() {
        let gpu = backend != Backend::Cpu;
        if (gpu && !s.backend_generic) || (!gpu && s.gpu_only) {
            continue;
        }
        // One package set and feature set for every suite of a backend: cargo unifies features
        // over the selected packages, and a different set per suite rebuilt burn each time.
        let mut args: Vec<String> = vec!["bench".into()];
        for p in PACKAGES {
            args.extend(["-p".into(), p.into()]);
        }
        args.extend(["--bench".into(), s.bench.into()]);
        if gpu {
            let b = backend.bench_name();
            let features: Vec<String> = GPU_FEATURE_PACKAGES
                .iter()
                .map(|p| match *p {
                    // the GPU kernels' bench against burn's own matmul on the same device
                    "ressa-sparse" => format!("{p}/burn-baseline-{b}"),
                    _ => format!("{p}/{b}"),
                })
                .collect();
            args.extend(["--features".into(), features.join(",")]);
        }
        args.push("--".into());
        if quick {
            args.push("--quick".into());
        }
        match (filter, gpu && !s.gpu_only) {
            (Some(f), _) => args.push(f.into()),
            // The generic benches run Flex too once a GPU feature is on; keep this backend's.
            (None, true) => args.push(format!("/{}$", backend.bench_name())),
            (None, false) => {}
        }
        runs.push((args, i));
    }
    runs
}

/// PyTorch's timings for one device, by the ids the scripts print.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TorchRun {
    pub version: String,
    pub threads: usize,
    pub device: String,
    pub times_ms: BTreeMap<String, f64>,
}

#[derive(Deserialize)]
struct TorchScriptOutput {
    torch: String,
    threads: usize,
    device: String,
    times_ms: BTreeMap<String, f64>,
}

/// Where and with what the numbers were measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub os: String,
    pub rustc: String,
    pub commit: String,
    pub date: String,
}

/// Everything one `cargo xtask bench` run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchRun {
    pub machine: Machine,
    pub backends: Vec<Backend>,
    pub quick: bool,
    /// Criterion medians by full id.
    pub ressa: BTreeMap<String, Measurement>,
    /// PyTorch by device (`cpu`, `cuda`); empty where PyTorch is not installed.
    pub torch: BTreeMap<String, TorchRun>,
    /// Why PyTorch numbers are missing, when they are.
    pub torch_note: Option<String>,
    pub wall_s: f64,
}

/// `cargo xtask bench` options.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Backends to measure (repeatable; default cpu). GPU backends build with that feature.
    #[arg(long = "backend", value_enum)]
    pub backends: Vec<Backend>,
    /// criterion `--quick`: fewer samples, a rough run in minutes.
    #[arg(long)]
    pub quick: bool,
    /// Only benchmarks whose id matches this regex (criterion's filter).
    #[arg(long)]
    pub filter: Option<String>,
    /// Python with torch and transformers for the PyTorch side.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// Skip the PyTorch side.
    #[arg(long)]
    pub no_torch: bool,
    /// The report (the raw numbers go beside it as .json).
    #[arg(long, default_value = "docs/benchmarks.md")]
    pub out: PathBuf,
    /// Measure nothing: write the report again from a run's JSON (e.g. docs/benchmarks.json).
    #[arg(long)]
    pub render: Option<PathBuf>,
}

/// Writes the markdown report of a run saved as JSON (`docs/benchmarks.json`) again, without
/// measuring: for a change of the report's layout.
fn render(json: &Path, out: &Path) -> Result<()> {
    let bytes = std::fs::read(json).with_context(|| format!("{}: cannot read", json.display()))?;
    let run: BenchRun = serde_json::from_slice(&bytes)
        .with_context(|| format!("{}: not a `cargo xtask bench` run", json.display()))?;
    write_atomically(out, report::markdown(&run).as_bytes())?;
    println!("wrote {} from {}", out.display(), json.display());
    Ok(())
}

pub fn run(args: BenchArgs) -> Result<()> {
    if let Some(json) = &args.render {
        return render(json, &args.out);
    }
    let root = workspace_root()?;
    let start = Instant::now();
    let mut backends = args.backends.clone();
    if backends.is_empty() {
        backends.push(Backend::Cpu);
    }
    backends.sort();
    backends.dedup();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let home = target.join("xtask-bench").join("criterion");
    if home.exists() {
        std::fs::remove_dir_all(&home)
            .with_context(|| format!("{}: cannot clear", home.display()))?;
    }
    std::fs::create_dir_all(&home)?;

    let runs: Vec<(Backend, Vec<String>, usize)> = backends
        .iter()
        .flat_map(|&b| {
            cargo_bench_args(b, args.quick, args.filter.as_deref())
                .into_iter()
                .map(move |(a, i)| (b, a, i))
        })
        .collect();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    for (k, (backend, bench_args, suite)) in runs.iter().enumerate() {
        let suite = &SUITES[*suite];
        tracing::info!(
            "bench {}/{}: {} {} on {:?}: cargo {}",
            k + 1,
            runs.len(),
            suite.package,
            suite.bench,
            backend,
            bench_args.join(" ")
        );
        let t = Instant::now();
        let status = Command::new(&cargo)
            .args(bench_args)
            .current_dir(&root)
            .env("CRITERION_HOME", &home)
            .status()
            .with_context(|| format!("running {cargo}"))?;
        if !status.success() {
            bail!("cargo {} failed ({status})", bench_args.join(" "));
        }
        tracing::info!(
            "bench {}/{} done in {:.0} s",
            k + 1,
            runs.len(),
            t.elapsed().as_secs_f64()
        );
    }
    let ressa = criterion::read_measurements(&home)?;
    if ressa.is_empty() {
        bail!(
            "{}: criterion wrote no results (a filter that matched nothing?)",
            home.display()
        );
    }

    let mut torch = BTreeMap::new();
    let mut torch_note = None;
    let mut torch_failures = Vec::new();
    if args.no_torch {
        torch_note = Some("not run (--no-torch)".to_string());
    } else if let Err(why) = torch_available(&args.python) {
        tracing::warn!("PyTorch numbers skipped: {why}");
        torch_note = Some(why);
    } else {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        for &backend in &backends {
            let device = backend.torch_device();
            if backend == Backend::Wgpu {
                continue; // PyTorch has no wgpu device; the CPU run covers the CPU.
            }
            for suite in SUITES.iter() {
                let Some(script) = suite.torch_script else {
                    continue;
                };
                if device != "cpu" && !suite.backend_generic {
                    continue;
                }
                tracing::info!("PyTorch ({device}): {script}");
                // A failing script (e.g. no CUDA in that PyTorch) costs its rows, not the run.
                let out = match run_torch_script(&args.python, &root.join(script), threads, device)
                {
                    Ok(out) => out,
                    Err(e) => {
                        let why = format!("{e:#}");
                        tracing::warn!("PyTorch numbers skipped: {why}");
                        torch_failures.push(why);
                        continue;
                    }
                };
                let entry = torch.entry(device.to_string()).or_insert_with(|| TorchRun {
                    version: out.torch.clone(),
                    threads: out.threads,
                    device: out.device.clone(),
                    times_ms: BTreeMap::new(),
                });
                entry.times_ms.extend(out.times_ms);
            }
        }
    }

    if !torch_failures.is_empty() {
        torch_note = Some(torch_failures.join("; "));
    }
    let run = BenchRun {
        machine: machine(&root),
        backends,
        quick: args.quick,
        ressa,
        torch,
        torch_note,
        wall_s: start.elapsed().as_secs_f64(),
    };
    let out = if args.out.is_absolute() {
        args.out.clone()
    } else {
        root.join(&args.out)
    };
    write_atomically(&out, report::markdown(&run).as_bytes())?;
    let json = out.with_extension("json");
    write_atomically(&json, &serde_json::to_vec_pretty(&run)?)?;
    println!(
        "wrote {} and {} ({} measurements, {:.0} s)",
        out.display(),
        json.display(),
        run.ressa.len(),
        run.wall_s
    );
    Ok(())
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

/// `Ok` when `python` imports torch and transformers; otherwise why not, in one line.
fn torch_available(python: &str) -> std::result::Result<(), String> {
    let out = Command::new(python)
        .args(["-c", "import torch, transformers"])
        .output()
        .map_err(|e| format!("{python}: cannot run ({e})"))?;
    if out.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or("").trim().to_string();
        Err(format!(
            "{python} cannot import torch and transformers: {last}"
        ))
    }
}

fn run_torch_script(
    python: &str,
    script: &Path,
    threads: usize,
    device: &str,
) -> Result<TorchScriptOutput> {
    let mut cmd = Command::new(python);
    cmd.arg(script).args(["--threads", &threads.to_string()]);
    if device != "cpu" {
        cmd.args(["--device", device]);
    }
    let out = cmd
        .output()
        .with_context(|| format!("{}: cannot run with {python}", script.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!(
            "{} failed: {}",
            script.display(),
            err.lines().last().unwrap_or("").trim()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or("");
    serde_json::from_str(line).with_context(|| {
        format!(
            "{}: expected a JSON object with torch, threads, device, times_ms on the last line",
            script.display()
        )
    })
}

fn command_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn machine(root: &Path) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let commit = command_line(
        "git",
        &[
            "-C",
            &root.display().to_string(),
            "describe",
            "--always",
            "--dirty",
        ],
    );
    Machine {
        cpu,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_gib: memory_kib / (1024.0 * 1024.0),
        os: command_line("uname", &["-sr"]),
        rustc: command_line("rustc", &["--version"]),
        commit,
        date: command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
    }
}

/// Writes `path` (creating its directory) through `ressa_report::write_atomic`.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .with_context(|| format!("{}: no parent directory", path.display()))?;
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    Ok(ressa_report::write_atomic(path, bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_runs_every_host_bench_and_gpu_backends_only_generic_ones() {
        let cpu = cargo_bench_args(Backend::Cpu, false, None);
        let names: Vec<&str> = cpu.iter().map(|(_, i)| SUITES[*i].bench).collect();
        assert_eq!(names, ["kernels", "pruners", "forward", "train_step"]);
        assert!(
            cpu.iter()
                .all(|(a, _)| !a.contains(&"--features".to_string()))
        );
        assert_eq!(cpu[0].0.last().unwrap(), "--");

        let cuda = cargo_bench_args(Backend::Cuda, true, None);
        let names: Vec<&str> = cuda.iter().map(|(_, i)| SUITES[*i].bench).collect();
        assert_eq!(names, ["forward", "train_step", "gpu_kernels"]);
        let forward = &cuda[0].0;
        let tail: Vec<&str> = forward[forward.len() - 5..]
            .iter()
            .map(String::as_str)
            .collect();
        assert_eq!(
            tail,
            [
                "--features",
                "ressa-sparse/burn-baseline-cuda,ressa-models/cuda,ressa-train/cuda",
                "--",
                "--quick",
                "/cuda$"
            ]
        );
        // the GPU-only suite has no Flex variant to filter out
        assert_eq!(cuda[2].0.last().unwrap(), "--quick");

        let filtered = cargo_bench_args(Backend::Wgpu, false, Some("t5_xl"));
        assert!(filtered.iter().all(|(a, _)| a.last().unwrap() == "t5_xl"));
    }

    #[test]
    fn atomic_write_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docs").join("benchmarks.md");
        write_atomically(&path, b"a").unwrap();
        write_atomically(&path, b"b").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"b");
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }
}
