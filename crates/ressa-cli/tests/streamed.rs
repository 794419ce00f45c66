//! Layer-streamed `ressa prune` writes what the in-memory path writes, byte for byte: on every
//! family's fixtures (single file and shards, f32 and f16), every method, both propagations,
//! OWL, N:M and T5's reference-bias mode, with every calibration hidden state spilled to disk
//! (`--activation-budget 0`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(p)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn prune(model: &Path, out: &Path, extra: &[&str]) -> Output {
    let cal = repo("tests/fixtures/calibration");
    Command::new(env!("CARGO_BIN_EXE_ressa"))
        .args(["prune", "--model", s(model), "--out", s(out)])
        .args(["--calibration", s(&cal.join("captions.json"))])
        .args(["--images", s(&cal), "--samples", "4"])
        .args(extra)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run ressa")
}

#[path = "support/same_output.rs"]
mod same_output;
use same_output::assert_same_output;

#[test]
fn streamed_output_equals_the_in_memory_output() {
    let cases: &[(&str, &[&str])] = &[
        (
            "instructblip-t5-a",
            &["--method", "wanda", "--sparsity", "0.5"],
        ),
        (
            "instructblip-t5-b",
            &[
                "--method",
                "sparsegpt",
                "--sparsity",
                "0.5",
                "--reference-t5-bias",
            ],
        ),
        (
            "instructblip-t5-untied",
            &[
                "--method",
                "dsnot",
                "--sparsity",
                "0.6",
                "--qformer",
                "0.3",
                "--propagation",
                "dense",
            ],
        ),
        // two shards
        ("blip2-t5", &["--method", "magnitude", "--sparsity", "0.7"]),
        (
            "instructblip-t5-a",
            &[
                "--method",
                "wanda",
                "--sparsity",
                "0.5",
                "--allocation",
                "owl",
                "--reference-t5-bias",
                "--propagation",
                "dense",
            ],
        ),
        // 2:4 on the language model only (the vision fixture's widths are not multiples of 4)
        (
            "instructblip-llama-gqa",
            &[
                "--method",
                "sparsegpt",
                "--pattern",
                "2:4",
                "--vision",
                "0",
                "--language",
                "0.5",
            ],
        ),
        (
            "instructblip-llama-mha",
            &[
                "--method",
                "magnitude",
                "--sparsity",
                "0.5",
                "--allocation",
                "owl",
            ],
        ),
        // float16 in three shards, the hub's key layout
        (
            "llava-hub",
            &[
                "--method",
                "wanda",
                "--sparsity",
                "0.5",
                "--propagation",
                "dense",
            ],
        ),
        (
            "llava-gqa",
            &[
                "--method",
                "dsnot",
                "--sparsity",
                "0.5",
                "--allocation",
                "owl",
            ],
        ),
        ("llava-gqa", &["--method", "sparsegpt", "--sparsity", "0.6"]),
    ];
    let tmp = tempfile::tempdir().unwrap();
    for (i, (fixture, args)) in cases.iter().enumerate() {
        let model = repo("tests/fixtures/models").join(fixture);
        let case = format!("{fixture} {}", args.join(" "));
        let streamed = tmp.path().join(format!("{i}-streamed"));
        let mut extra = args.to_vec();
        extra.extend(["--activation-budget", "0", "--memory-budget", "2GiB"]);
        let out = prune(&model, &streamed, &extra);
        assert!(
            out.status.success(),
            "{case} (streamed): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let in_memory = tmp.path().join(format!("{i}-in-memory"));
        let mut extra = args.to_vec();
        extra.push("--in-memory");
        let out = prune(&model, &in_memory, &extra);
        assert!(
            out.status.success(),
            "{case} (in memory): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_same_output(&streamed, &in_memory, &case);
    }
    // Nothing but the outputs was left behind (spill files, partial directories).
    let mut left: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.'))
        .collect();
    left.sort();
    assert!(left.is_empty(), "temporaries left: {left:?}");
}

#[test]
fn a_budget_below_what_a_block_needs_is_refused_before_work() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("out");
    let model = repo("tests/fixtures/models/instructblip-t5-a");
    let out = prune(
        &model,
        &out_dir,
        &[
            "--method",
            "wanda",
            "--sparsity",
            "0.5",
            "--memory-budget",
            "1MiB",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("--memory-budget 1 MiB") && err.contains("give at least"),
        "{err}"
    );
    assert!(!out_dir.exists());
    for bad in ["4XB", "-1GiB", "GiB", "0"] {
        let out = prune(
            &model,
            &out_dir,
            &[
                "--method",
                "wanda",
                "--sparsity",
                "0.5",
                &format!("--memory-budget={bad}"),
            ],
        );
        assert!(!out.status.success(), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--memory-budget"), "{bad}: {err}");
        assert!(!out_dir.exists());
    }
}
