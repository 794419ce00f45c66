//! `ressa repair` end to end: a run killed with SIGKILL at a random step and resumed ends
//! with bytes identical to an uninterrupted run; the output keeps the pruned zeros; bad
//! input fails with one line naming what is wrong.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

#[path = "support/nodes.rs"]
mod nodes;
use nodes::{coordinator_port, free_port, node_flags};

fn repo(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(p)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn ressa(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ressa"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run ressa")
}

fn pruned(tmp: &Path) -> PathBuf {
    let out = tmp.join("pruned");
    let model = repo("tests/fixtures/models/instructblip-t5-a");
    let o = ressa(
        &[
            "prune",
            "--model",
            s(&model),
            "--method",
            "magnitude",
            "--sparsity",
            "0.7",
            "--out",
            s(&out),
        ]
        .map(String::from),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

fn repair_args(pruned: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let cal = repo("tests/fixtures/calibration");
    let dense = repo("tests/fixtures/models/instructblip-t5-a");
    let mut a: Vec<String> = [
        "repair",
        "--model",
        s(pruned),
        "--dense",
        s(&dense),
        "--data",
        s(&cal.join("captions.json")),
        "--images",
        s(&cal),
        "--out",
        s(out),
        "--steps",
        "40",
        "--batch-size",
        "2",
        "--lr",
        "1e-3",
        "--checkpoint-every",
        "1",
    ]
    .map(String::from)
    .to_vec();
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

fn file(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{}: {e}", dir.join(name).display()))
}

/// Steps of the complete checkpoints in `dir` (from the directory names), ascending.
fn checkpoint_steps(dir: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().to_string();
            n.strip_prefix("step-")?.parse::<u64>().ok()
        })
        .collect();
    steps.sort_unstable();
    steps
}

#[test]
fn a_killed_run_resumes_bit_identically() {
    killed_run_resumes_bit_identically(40, 2, &[]);
}

/// Four data-parallel peers (threads) at a global batch of 4: the 6 examples give batches of 4
/// and 2 (two peers idle in the short one), and the run is still bit-identical across a kill.
#[test]
fn a_killed_data_parallel_run_resumes_bit_identically() {
    killed_run_resumes_bit_identically(20, 4, &["--devices", "4"]);
}

/// A run of `total` steps at batch `batch` (plus `extra` flags), killed with SIGKILL at a step
/// from the clock and resumed, ends with the bytes of an uninterrupted run.
fn killed_run_resumes_bit_identically(total: u64, batch: u64, extra: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let pruned = pruned(tmp.path());
    // Every checkpoint is kept (the default keeps 2), so the resumed run's own checkpoints can
    // be compared with the uninterrupted run's at the same steps. Flags override the paths.
    let toml = tmp.path().join("keep.toml");
    std::fs::write(
        &toml,
        "pruned = \"p\"\nout = \"o\"\n[data]\ntrain = \"t\"\nimages = \"i\"\n[train]\nkeep_checkpoints = 1000\n",
    )
    .unwrap();
    let keep = ["--config", s(&toml)];
    let (steps, batch_size) = (total.to_string(), batch.to_string());
    let repair_args = |pruned: &Path, out: &Path, more: &[&str]| {
        let mut a = repair_args(pruned, out, more);
        a.extend(keep.iter().map(|x| x.to_string()));
        a.extend(extra.iter().map(|x| x.to_string()));
        for (flag, v) in [("--steps", &steps), ("--batch-size", &batch_size)] {
            let i = a.iter().position(|x| x == flag).unwrap();
            a[i + 1] = v.clone();
        }
        a
    };
    let full = tmp.path().join("full");
    let o = ressa(&repair_args(&pruned, &full, &[]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // A step in 3..=total-10 from the clock: a different kill point on every run of the test.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    let kill_at = 3 + nanos % (total - 12);
    let killed = tmp.path().join("killed");
    let ckpts = tmp.path().join("killed.checkpoints");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ressa"))
        .args(repair_args(&pruned, &killed, &[]))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        let done = std::fs::read_dir(&ckpts)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| {
                        let n = e.file_name().to_string_lossy().to_string();
                        n.strip_prefix("step-")?.parse::<u64>().ok()
                    })
                    .max()
            })
            .ok()
            .flatten();
        if done.is_some_and(|d| d >= kill_at) {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before step {kill_at}"
        );
        assert!(start.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !killed.join("model.safetensors").exists(),
        "no output from a killed run"
    );

    // Without --resume the leftovers are refused, not overwritten.
    let o = ressa(&repair_args(&pruned, &killed, &[]));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--resume") && err.lines().count() == 1,
        "{err}"
    );

    // The killed run's newest checkpoint is where the resume must continue from; the older
    // ones are removed, so a run that silently starts over (and, being deterministic, ends
    // with the same bytes) is seen writing them again.
    let before = checkpoint_steps(&ckpts);
    let last = *before.last().unwrap();
    assert!(last >= kill_at);
    for &step in &before[..before.len() - 1] {
        std::fs::remove_dir_all(ckpts.join(format!("step-{step:08}"))).unwrap();
    }
    let last_state = file(&ckpts.join(format!("step-{last:08}")), "state.json");

    let o = ressa(&repair_args(&pruned, &killed, &["--resume"]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // From the checkpoint files themselves: the resumed run wrote exactly steps last+1..=40
    // (checkpoint every 1), none before, and left the one it resumed from untouched.
    let every = 1;
    let after = checkpoint_steps(&ckpts);
    assert_eq!(
        after,
        (last..=total).collect::<Vec<_>>(),
        "checkpoints after resuming from step {last}"
    );
    assert_eq!(after[1], last + every, "first checkpoint after the resume");
    assert_eq!(
        file(&ckpts.join(format!("step-{last:08}")), "state.json"),
        last_state
    );
    let full_ckpts = tmp.path().join("full.checkpoints");
    assert_eq!(
        checkpoint_steps(&full_ckpts),
        (1..=total).collect::<Vec<_>>()
    );
    // 6 training examples at batch b: ⌈6/b⌉ steps an epoch; after step k the data position
    // is epoch k / ⌈6/b⌉, example b·(k mod ⌈6/b⌉).
    let n_train = 6u64;
    let per_epoch = n_train.div_ceil(batch);
    for step in last..=total {
        let name = format!("step-{step:08}");
        let (mine, theirs) = (ckpts.join(&name), full_ckpts.join(&name));
        let state: serde_json::Value = serde_json::from_slice(&file(&mine, "state.json")).unwrap();
        assert_eq!(state["step"], step, "{name}: optimizer steps done");
        assert_eq!(state["epoch"], step / per_epoch, "{name}: epoch");
        assert_eq!(
            state["position"],
            batch * (step % per_epoch),
            "{name}: data position"
        );
        for f in [
            "state.json",
            "adapters.safetensors",
            "optimizer.safetensors",
        ] {
            assert!(
                file(&mine, f) == file(&theirs, f),
                "{name}/{f}: the resumed run differs from the uninterrupted run"
            );
        }
    }
    for f in [
        "model.safetensors",
        "adapters/adapter_model.safetensors",
        "masks.safetensors",
    ] {
        assert!(
            file(&full, f) == file(&killed, f),
            "{f} differs after resume (killed at step ≥ {kill_at})"
        );
    }
    let report: serde_json::Value = serde_json::from_slice(&file(&killed, "repair.json")).unwrap();
    assert!(report["train"]["resumed_at"].as_u64().unwrap() >= kill_at);
    assert_eq!(report["exact_sparsity"], report["sparse_adapters"]);
}

/// `ressa repair --devices 4 … 2>&1 | head -1`: the log lines written after the reader is
/// gone are dropped, and the run ends normally instead of one peer thread panicking on the
/// broken pipe and the others waiting for it.
#[test]
fn a_data_parallel_run_with_its_stderr_closed_ends() {
    let tmp = tempfile::tempdir().unwrap();
    let pruned = pruned(tmp.path());
    let out = tmp.path().join("o");
    let mut args = repair_args(&pruned, &out, &["--devices", "4"]);
    for (flag, v) in [("--steps", "4"), ("--batch-size", "4")] {
        let i = args.iter().position(|x| x == flag).unwrap();
        args[i + 1] = v.into();
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_ressa"))
        .args(&args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(120) {
            child.kill().unwrap();
            panic!("the run hangs with its stderr closed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    assert!(out.join("model.safetensors").exists());
}

#[test]
fn bad_input_is_one_line_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let pruned = pruned(tmp.path());
    let out = tmp.path().join("o");
    let with_nodes = |nodes, rank, coordinator| {
        let flags = node_flags(nodes, rank, coordinator, "127.0.0.1:29510");
        repair_args(
            &pruned,
            &out,
            &flags.iter().map(String::as_str).collect::<Vec<_>>(),
        )
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (repair_args(&pruned, &out, &["--lambda", "2"]), "lambda 2"),
        (
            repair_args(&pruned, &out, &["--grad-accum", "0"]),
            "grad_accum",
        ),
        (
            repair_args(&pruned, &out, &["--devices", "0"]),
            "--devices 0",
        ),
        (
            repair_args(&pruned, &out, &["--devices", "4"]),
            "--batch-size 2: not divisible by --devices 4",
        ),
        (
            repair_args(&pruned, &out, &["--nodes", "2", "--node-rank", "0"]),
            "--nodes N (N ≥ 2) needs --node-rank, --coordinator HOST:PORT and --node-address",
        ),
        (
            with_nodes(2, 2, "127.0.0.1:29500"),
            "--node-rank 2: expected 0..2",
        ),
        (
            with_nodes(2, 1, "node0"),
            "--coordinator \"node0\": expected HOST:PORT",
        ),
        (
            with_nodes(4, 1, "127.0.0.1:29500"),
            "--batch-size 2: not divisible by --nodes 4 × --devices 1",
        ),
        (
            {
                let mut a = repair_args(&pruned, &out, &[]);
                let i = a.iter().position(|x| x == "--data").unwrap();
                a[i + 1] = "/nonexistent/list.json".into();
                a
            },
            "/nonexistent/list.json",
        ),
        (
            repair_args(&tmp.path().join("missing"), &out, &[]),
            "missing",
        ),
    ];
    for (args, needle) in cases {
        let o = ressa(&args);
        assert!(!o.status.success(), "{needle}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(needle) && err.trim().lines().count() == 1,
            "{needle}: {err}"
        );
        assert!(!out.exists(), "{needle}: no output on failure");
    }
    // A TOML config with an unknown key names it.
    let cfg = tmp.path().join("r.toml");
    std::fs::write(
        &cfg,
        "pruned = \"p\"\nout = \"o\"\n[data]\ntrain = \"t\"\nimages = \"i\"\n[train]\nstepz = 3\n",
    )
    .unwrap();
    let o = ressa(&["repair".into(), "--config".into(), s(&cfg).into()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("stepz") && err.contains("r.toml"),
        "{err}"
    );
}

/// `ressa repair --nodes 2` as two processes on 127.0.0.1: node 0 writes a model identical
/// to `--devices 2`'s, node 1 writes nothing; both exit 0.
#[test]
fn two_nodes_on_loopback_write_what_two_threads_write() {
    let tmp = tempfile::tempdir().unwrap();
    let pruned = pruned(tmp.path());
    // 6 steps of 4 rows, no checkpoints.
    let shorter = |mut a: Vec<String>| {
        for (flag, v) in [
            ("--steps", "6"),
            ("--batch-size", "4"),
            ("--checkpoint-every", "0"),
        ] {
            let i = a.iter().position(|x| x == flag).unwrap();
            a[i + 1] = v.into();
        }
        a
    };
    let threads = tmp.path().join("threads");
    let o = ressa(&shorter(repair_args(
        &pruned,
        &threads,
        &["--devices", "2"],
    )));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let coordinator = format!("127.0.0.1:{}", coordinator_port());
    let outs = [tmp.path().join("node0"), tmp.path().join("node1")];
    let children: Vec<_> = (0..2)
        .map(|rank| {
            let address = format!("127.0.0.1:{}", free_port());
            let flags = node_flags(2, rank, &coordinator, &address);
            let args = shorter(repair_args(
                &pruned,
                &outs[rank],
                &flags.iter().map(String::as_str).collect::<Vec<_>>(),
            ));
            Command::new(env!("CARGO_BIN_EXE_ressa"))
                .args(&args)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let start = Instant::now();
    let mut children = children;
    while start.elapsed() < Duration::from_secs(120)
        && children.iter_mut().any(|c| c.try_wait().unwrap().is_none())
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    for (rank, c) in children.iter_mut().enumerate() {
        let hung = c.try_wait().unwrap().is_none();
        if hung {
            c.kill().unwrap();
        }
        let status = c.wait().unwrap();
        let mut err = String::new();
        std::io::Read::read_to_string(&mut c.stderr.take().unwrap(), &mut err).unwrap();
        assert!(!hung && status.success(), "node {rank}: {status}\n{err}");
    }
    assert_eq!(
        file(&outs[0], "model.safetensors"),
        file(&threads, "model.safetensors"),
        "node 0's model differs from two threads'"
    );
    assert!(!outs[1].exists(), "node 1 wrote an output");
}

/// The LLaMA-family fixture through the CLI: every pruner, then repair, zeros kept.
#[test]
fn llama_prunes_with_every_method_and_repairs() {
    let tmp = tempfile::tempdir().unwrap();
    let model = repo("tests/fixtures/models/instructblip-llama-gqa");
    let cal = repo("tests/fixtures/calibration");
    let captions = cal.join("captions.json");
    for method in ["magnitude", "wanda", "sparsegpt", "dsnot"] {
        let out = tmp.path().join(method);
        let o = ressa(
            &[
                "prune",
                "--model",
                s(&model),
                "--method",
                method,
                "--pattern",
                "2:4",
                "--vision",
                "0",
                "--calibration",
                s(&captions),
                "--images",
                s(&cal),
                "--samples",
                "4",
                "--out",
                s(&out),
            ]
            .map(String::from),
        );
        assert!(
            o.status.success(),
            "{method}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let report: serde_json::Value =
            serde_json::from_slice(&file(&out, "sparsity.json")).unwrap();
        assert_eq!(report["towers"]["language"]["sparsity"], 0.5, "{method}");
    }
    // SparseGPT rewrites kept weights: the student starts from them, the teacher from W.
    let pruned = tmp.path().join("sparsegpt");
    let out = tmp.path().join("repaired");
    let dense = model.clone();
    let o = ressa(
        &[
            "repair",
            "--model",
            s(&pruned),
            "--dense",
            s(&dense),
            "--data",
            s(&captions),
            "--images",
            s(&cal),
            "--out",
            s(&out),
            "--steps",
            "4",
            "--batch-size",
            "2",
        ]
        .map(String::from),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&file(&out, "repair.json")).unwrap();
    assert!(report["rewritten_by_pruner"].as_u64().unwrap() > 0);
    assert_eq!(report["exact_sparsity"], report["sparse_adapters"]);
    // The written language weights keep 2:4.
    let bytes = file(&out, "model.safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut checked = 0;
    for (k, t) in st.tensors() {
        if k.starts_with("language_model.model.layers.") && k.ends_with("proj.weight") {
            let v: Vec<f32> = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let d_in = t.shape()[1];
            for row in v.chunks(d_in) {
                for g in row.chunks(4) {
                    assert!(
                        g.iter().filter(|x| **x == 0.0).count() >= 2,
                        "{k}: a group with < 2 zeros"
                    );
                }
            }
            checked += 1;
        }
    }
    assert!(checked > 0);
}

/// SIGTERM (and SIGINT) mid-run: the handler removes the run's temporaries and exits 130 with
/// one `error:` line; nothing but the checkpoints (what `--resume` needs) is left, and the
/// partial output of a killed (SIGKILL) run of a dead process is swept by the next run.
#[test]
fn an_interrupted_run_leaves_only_its_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let pruned = pruned(tmp.path());
    let out = tmp.path().join("interrupted");
    let mut args = repair_args(&pruned, &out, &[]);
    let i = args.iter().position(|a| a == "--steps").unwrap();
    args[i + 1] = "100000".into();
    // Debris of a killed run whose process is gone (PID above Linux's pid_max).
    let stale = tmp.path().join(".interrupted.partial.tmp-4194304-0");
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("model.safetensors"), b"half").unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_ressa"))
        .args(&args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ckpts = tmp.path().join("interrupted.checkpoints");
    let start = Instant::now();
    while !std::fs::read_dir(&ckpts).is_ok_and(|mut d| d.next().is_some()) {
        assert!(start.elapsed() < Duration::from_secs(120), "no checkpoint");
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = child.id().to_string();
    // The shell's builtin `kill`: no procps needed.
    assert!(
        Command::new("sh")
            .args(["-c", &format!("kill -TERM {pid}")])
            .status()
            .unwrap()
            .success()
    );
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error:")).count(),
        1,
        "{err}"
    );
    assert!(err.contains("interrupted"), "{err}");
    assert!(!out.exists());
    let left: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    // The repair itself writes no temporary before its end; the stale one of the dead process
    // is swept when the next output is written.
    assert!(left.iter().all(|n| n.contains("4194304")), "{left:?}");
    let o = ressa(&repair_args(&pruned, &tmp.path().join("interrupted2"), &[]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        !stale.exists(),
        "the dead process's partial output is swept"
    );
}

/// Nonsense that used to exit 0: a NaN in the dense model, a diverging learning rate, a
/// checkpoint claiming a step beyond the run. Each fails in one line naming it; no model is
/// written.
#[test]
fn non_finite_runs_and_impossible_checkpoints_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let one_error = |o: &Output, needle: &str| {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{needle}: exit 0");
        let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(lines.len(), 1, "{err}");
        assert!(lines[0].contains(needle), "{needle}: {err}");
    };

    // A dense model with a NaN in a (non-prunable) layer norm, pruned as it is.
    let dense = tmp.path().join("nan-dense");
    std::fs::create_dir(&dense).unwrap();
    let src = repo("tests/fixtures/models/instructblip-t5-a");
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            let d = dense.join(p.file_name().unwrap());
            std::fs::create_dir(&d).unwrap();
            for f in std::fs::read_dir(&p).unwrap() {
                let f = f.unwrap().path();
                std::fs::copy(&f, d.join(f.file_name().unwrap())).unwrap();
            }
        } else {
            std::fs::copy(&p, dense.join(p.file_name().unwrap())).unwrap();
        }
    }
    let weights = dense.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let key = "vision_model.post_layernorm.weight";
    let view = st.tensor(key).unwrap();
    let start = view.data().as_ptr() as usize - bytes.as_ptr() as usize;
    let mut patched = bytes.clone();
    patched[start..start + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    drop(st);
    std::fs::write(&weights, patched).unwrap();
    let pruned = tmp.path().join("nan-pruned");
    let o = ressa(
        &[
            "prune",
            "--model",
            s(&dense),
            "--method",
            "magnitude",
            "--sparsity",
            "0.5",
            "--out",
            s(&pruned),
        ]
        .map(String::from),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = tmp.path().join("nan-out");
    let mut args = repair_args(&pruned, &out, &[]);
    let i = args.iter().position(|a| a == "--dense").unwrap();
    args[i + 1] = s(&dense).to_string();
    one_error(&ressa(&args), "training stopped");
    assert!(!out.exists());

    // A diverging learning rate.
    let pruned = self::pruned(tmp.path());
    let out = tmp.path().join("diverged");
    let mut args = repair_args(&pruned, &out, &[]);
    let i = args.iter().position(|a| a == "--lr").unwrap();
    args[i + 1] = "1e30".into();
    one_error(&ressa(&args), "training stopped");
    assert!(!out.exists());

    // A checkpoint that claims step 99999 of a 40-step run.
    let good = tmp.path().join("good");
    let o = ressa(&repair_args(&pruned, &good, &[]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ckpts = tmp.path().join("forged.checkpoints");
    std::fs::create_dir(&ckpts).unwrap();
    let last = std::fs::read_dir(tmp.path().join("good.checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max()
        .unwrap();
    let forged = ckpts.join(last.file_name().unwrap());
    std::fs::create_dir(&forged).unwrap();
    for f in std::fs::read_dir(&last).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, forged.join(f.file_name().unwrap())).unwrap();
    }
    let state = forged.join("state.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    v["step"] = 99999.into();
    std::fs::write(&state, serde_json::to_vec(&v).unwrap()).unwrap();
    let out = tmp.path().join("forged");
    one_error(&ressa(&repair_args(&pruned, &out, &["--resume"])), "99999");
    assert!(!out.join("model.safetensors").exists());
}

/// A masks file that contradicts the pruned model's zeros, and a "dense" model whose kept
/// weights are not the ones the pruned model kept, are refused before training, naming the
/// tensor.
#[test]
fn masks_and_dense_weights_must_agree_with_the_pruned_model() {
    let tmp = tempfile::tempdir().unwrap();
    let pruned = pruned(tmp.path());
    let one_error = |o: &Output, needles: &[&str]| {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{needles:?}: exit 0");
        let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(lines.len(), 1, "{err}");
        assert!(
            needles.iter().all(|n| lines[0].contains(n)),
            "{needles:?}: {err}"
        );
    };
    let copy_dir = |src: &Path, dst: &Path| {
        std::fs::create_dir_all(dst).unwrap();
        for e in std::fs::read_dir(src).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                let d = dst.join(p.file_name().unwrap());
                std::fs::create_dir_all(&d).unwrap();
                for f in std::fs::read_dir(&p).unwrap() {
                    let f = f.unwrap().path();
                    std::fs::copy(&f, d.join(f.file_name().unwrap())).unwrap();
                }
            } else {
                std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
            }
        }
    };

    // A mask that keeps every entry of a 70 %-pruned weight (it would train the zeros back).
    let lying = tmp.path().join("lying");
    copy_dir(&pruned, &lying);
    let mut masks = ressa_sparse::sidecar::read_masks(lying.join("masks.safetensors")).unwrap();
    let key = masks.keys().next().unwrap().clone();
    let (d_in, d_out) = masks[&key].shape();
    masks.insert(key.clone(), ressa_sparse::Mask::ones(d_in, d_out).unwrap());
    ressa_sparse::sidecar::write_masks(
        lying.join("masks.safetensors"),
        masks.iter().map(|(k, m)| (k.as_str(), m)),
    )
    .unwrap();
    let out = tmp.path().join("out-lying");
    one_error(&ressa(&repair_args(&lying, &out, &[])), &[&key]);
    assert!(!out.exists());

    // A dense model whose kept weights differ from the pruned model's (another model of the
    // same shapes): one prunable weight scaled.
    let other = tmp.path().join("other-dense");
    copy_dir(&repo("tests/fixtures/models/instructblip-t5-a"), &other);
    let weights = other.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = st.tensor(&key).unwrap();
    let start = view.data().as_ptr() as usize - bytes.as_ptr() as usize;
    let len = view.data().len();
    let mut patched = bytes.clone();
    for c in patched[start..start + len].chunks_exact_mut(4) {
        let v = f32::from_le_bytes(c.try_into().unwrap()) * 1.5;
        c.copy_from_slice(&v.to_le_bytes());
    }
    drop(st);
    std::fs::write(&weights, patched).unwrap();
    let out = tmp.path().join("out-other");
    let mut args = repair_args(&pruned, &out, &[]);
    let i = args.iter().position(|a| a == "--dense").unwrap();
    args[i + 1] = s(&other).to_string();
    one_error(&ressa(&args), &[&key]);
    assert!(!out.exists());
}
