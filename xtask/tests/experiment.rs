//! `cargo xtask experiment` on a reduced config: every stage runs, `results.json` follows the
//! schema, the report and plots are written, and a rerun reuses every cell from the cache.
//! Killing a run mid-way loses at most the cell in progress. Numbers are not checked (too few
//! steps to mean anything).

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use ressa_report::Group;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn finished_cells(work: &std::path::Path) -> usize {
    std::fs::read_dir(work.join("cache"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    let n = e.file_name().to_string_lossy().to_string();
                    n.starts_with("cell-") && n.ends_with(".json")
                })
                .count()
        })
        .unwrap_or(0)
}

/// Starts the study and SIGKILLs it once `after` cells are cached; returns how many were.
fn run_and_kill(work: &std::path::Path, after: usize) -> usize {
    let mut child = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .current_dir(repo())
        .args(["experiment", "configs/shapes-ci.toml", "--work-dir"])
        .arg(work)
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while finished_cells(work) < after {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the study ended before it could be killed"
        );
        assert!(
            t.elapsed().as_secs() < 600,
            "no cell finished in 10 minutes"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    finished_cells(work)
}

/// `xtask experiment CONFIG --work-dir WORK` (CONFIG relative to the repository or absolute),
/// warnings only.
fn experiment(config: impl AsRef<std::path::Path>, work: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .current_dir(repo())
        .arg("experiment")
        .arg(config.as_ref())
        .arg("--work-dir")
        .arg(work)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn run(work: &std::path::Path) -> (std::process::Output, f64) {
    let t = Instant::now();
    let o = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .current_dir(repo())
        .args(["experiment", "configs/shapes-ci.toml", "--work-dir"])
        .arg(work)
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    (o, t.elapsed().as_secs_f64())
}

#[test]
fn a_reduced_study_writes_results_report_and_plots_and_reuses_its_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("study");
    // Killed after two cells: the rerun reuses exactly the cells that were written.
    let cached = run_and_kill(&work, 2);
    assert!(
        (2..11).contains(&cached),
        "{cached} cells cached at the kill"
    );
    assert!(!work.join("results.json").exists());
    let (o, first) = run(&work);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let log = String::from_utf8_lossy(&o.stderr);
    let counts = format!("ran={} reused={cached}", 11 - cached);
    assert!(log.contains(&counts), "expected {counts}: {log}");
    let results: ressa_report::results::Results =
        serde_json::from_slice(&std::fs::read(work.join("results.json")).unwrap()).unwrap();
    results.validate().unwrap();
    assert_eq!(results.schema, "ressa-experiment/1");
    // 2 methods × (50 % uniform, 50 % OWL, 2:4 uniform), 3 splits, 1 language-only +
    // 1 vision-only.
    assert_eq!(results.cells.len(), 11);
    assert!(results.cells.iter().filter(|c| c.ressa.is_some()).count() == 6);
    let owl: Vec<_> = results
        .cells
        .iter()
        .filter(|c| c.allocation == "owl")
        .collect();
    assert_eq!(owl.len(), 2);
    for c in &owl {
        assert_eq!((c.group, c.pattern.as_str()), (Group::Grid, "unstructured"));
        let p = c.owl.expect("OWL cells record M and λ");
        assert_eq!((p.m, p.lambda), (5.0, 0.08));
        assert!(c.ressa.is_some());
    }
    assert!(
        results
            .cells
            .iter()
            .all(|c| (c.allocation == "owl") == c.owl.is_some())
    );
    // The three named tasks, in order; every model scored on each.
    let names: Vec<_> = results.tasks.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["shapes-vqa", "shapes-vqa-val", "shapes-captions"]);
    assert_eq!(results.tasks[1].items, 12);
    let d = &results.dense;
    assert!(d.vqa_accuracy.is_some() && d.cider.is_some());
    assert_eq!(d.vqa_accuracy, d.tasks["shapes-vqa"].vqa_accuracy);
    assert_eq!(d.cider, d.tasks["shapes-captions"].cider);
    for c in &results.cells {
        let ms = std::iter::once(&c.pruned).chain(c.ressa.as_ref().map(|r| &r.metrics));
        for m in ms {
            assert_eq!(m.tasks.len(), 3, "{}", c.id);
            let vqa = &m.tasks["shapes-vqa"];
            // Per-type accuracies are the overall accuracy broken down: their weighted mean
            // is it, over every test question.
            for by in [&vqa.by_question_type, &vqa.by_answer_type] {
                assert!(by.len() >= 2, "{}: {by:?}", c.id);
                let n: usize = by.values().map(|s| s.items).sum();
                assert_eq!(n, results.tasks[0].items);
                let mean = by
                    .values()
                    .map(|s| s.accuracy * s.items as f64)
                    .sum::<f64>()
                    / n as f64;
                assert!((mean - vqa.vqa_accuracy.unwrap()).abs() < 1e-9, "{}", c.id);
            }
            // The val list carries no types and none were given.
            assert!(m.tasks["shapes-vqa-val"].by_question_type.is_empty());
            assert!(m.tasks["shapes-vqa-val"].vqa_accuracy.is_some());
            assert!(m.tasks["shapes-captions"].bleu4.is_some());
        }
    }
    let report = std::fs::read_to_string(work.join("report.md")).unwrap();
    for needle in [
        "### (a)",
        "### (b)",
        "### (c)",
        "**Verdict:",
        "## Allocation: OWL vs uniform",
        "| wanda | 50% | owl |",
        "## Tasks",
        "| shapes-vqa (VQA, 24 items) | shapes-vqa-val (VQA, 12 items) | shapes-captions (CIDEr, 6 items) |",
        "first VQA task's, `shapes-vqa`",
        "## Accuracy by question type",
        "| how many |",
    ] {
        assert!(report.contains(needle), "report.md lacks {needle}");
    }
    let pngs: Vec<_> = std::fs::read_dir(&work)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "png"))
        .collect();
    assert!(pngs.len() >= 3, "{} plots", pngs.len());
    for p in &pngs {
        image::open(p.path()).unwrap();
    }

    let (o, second) = run(&work);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(log.contains("ran=0") && log.contains("reused=11"), "{log}");
    assert!(
        second < first,
        "rerun {second:.1} s vs first run {first:.1} s"
    );
}

/// A decoder-only (LLaMA) model directory runs the same study: the runner is generic over the
/// family (pruned, repaired and scored through the model's own processor).
#[test]
fn a_decoder_only_model_runs_a_study() {
    let tmp = tempfile::tempdir().unwrap();
    let model = repo().join("tests/fixtures/models/instructblip-llama-gqa");
    let config = tmp.path().join("llama.toml");
    std::fs::write(
        &config,
        format!(
            r#"name = "llama"
[model]
dir = "{}"
[data.shapes]
seed = 0
train = 8
val = 4
test = 4
image_size = 32
[calibration]
samples = 4
[grid]
methods = ["wanda"]
settings = ["50%"]
[ressa]
steps = 2
batch_size = 4
augment = false
[eval]
vqa_items = 2
caption_items = 2
batch_size = 2
max_answer_tokens = 2
max_caption_tokens = 4
"#,
            model.display()
        ),
    )
    .unwrap();
    let work = tmp.path().join("work");
    let o = experiment(&config, &work);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let results: ressa_report::results::Results =
        serde_json::from_slice(&std::fs::read(work.join("results.json")).unwrap()).unwrap();
    results.validate().unwrap();
    assert_eq!(results.cells.len(), 1);
    let cell = &results.cells[0];
    assert_eq!((cell.method.as_str(), cell.language), ("wanda", 0.5));
    let ressa = cell.ressa.as_ref().expect("the grid cell is repaired");
    assert_eq!(ressa.steps, 2);
    assert!(ressa.loss_before.is_finite() && ressa.loss_after.is_finite());
    assert!(results.dense.vqa_accuracy.is_some() && results.dense.cider.is_some());
}

/// CI's reduced form of `configs/shapes-paper-llama-scratch.toml`: the decoder-only toy trained
/// from scratch by its recipe (vision stage, frozen tower, warm-up), pruned (grid + one-tower
/// cells), repaired and scored.
#[test]
fn the_llama_toy_study_runs_in_its_reduced_form() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("study");
    let o = experiment("configs/shapes-ci-llama.toml", &work);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let results: ressa_report::results::Results =
        serde_json::from_slice(&std::fs::read(work.join("results.json")).unwrap()).unwrap();
    results.validate().unwrap();
    // 2 methods × (50 %, 2:4), 1 language-only + 1 vision-only.
    assert_eq!(results.cells.len(), 6);
    assert_eq!(
        results.cells.iter().filter(|c| c.ressa.is_some()).count(),
        4
    );
    for c in results.cells.iter().filter_map(|c| c.ressa.as_ref()) {
        assert_eq!(c.steps, 2);
        assert!(c.loss_before.is_finite() && c.loss_after.is_finite());
    }
    assert!(work.join("report.md").exists());
}

/// `(dtype, shape, f32 values)` of every tensor of a single-file checkpoint, read from the
/// safetensors header by hand (8-byte length, JSON, data).
fn read_f32_tensors(path: &std::path::Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            assert_eq!(v["dtype"], "F32", "{k}");
            let (a, b) = (
                v["data_offsets"][0].as_u64().unwrap() as usize,
                v["data_offsets"][1].as_u64().unwrap() as usize,
            );
            let vals = data[a..b]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (k.clone(), vals)
        })
        .collect()
}

/// `cargo xtask random-checkpoint` for a LLaVA: by default the initialisation transformers
/// gives a fresh model (CLIP's σ per layer: out_proj E^-½ is (2·layers)^½ = √8 times q_proj's),
/// with `--scale S` uniform in ±S; both load.
#[test]
fn random_checkpoints_of_a_llava_use_transformers_init_or_the_given_scale() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = repo().join("tests/fixtures/models/llava-hub");
    let std = |v: &[f32]| {
        let n = v.len() as f64;
        let m = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        (v.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / n).sqrt()
    };
    for (name, scale) in [("init", None), ("uniform", Some("0.01"))] {
        let out = tmp.path().join(name);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_xtask"));
        cmd.args(["random-checkpoint", "--config"])
            .arg(fixture.join("config.json"))
            .arg("--out")
            .arg(&out)
            .arg("--like")
            .arg(&fixture);
        if let Some(s) = scale {
            cmd.args(["--scale", s]);
        }
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let tensors: std::collections::BTreeMap<String, Vec<f32>> =
            read_f32_tensors(&out.join("model.safetensors"))
                .into_iter()
                .collect();
        let layer = "vision_tower.encoder.layers.0.self_attn";
        let (q, o_proj) = (
            std(&tensors[&format!("{layer}.q_proj.weight")]),
            std(&tensors[&format!("{layer}.out_proj.weight")]),
        );
        match scale {
            None => {
                // E = 24, 4 layers: out_proj 24^-½ = 0.204, q_proj 0.204 / √8 = 0.072.
                assert!((o_proj / 0.204 - 1.0).abs() < 0.15, "out_proj σ {o_proj}");
                assert!((q / 0.0722 - 1.0).abs() < 0.15, "q_proj σ {q}");
                let bias = &tensors[&format!("{layer}.q_proj.bias")];
                assert!(bias.iter().all(|&b| b == 0.0));
            }
            Some(_) => {
                let max = tensors
                    .iter()
                    .filter(|(k, _)| !k.contains("norm"))
                    .flat_map(|(_, v)| v.iter().map(|x| x.abs()))
                    .fold(0.0f32, f32::max);
                assert!(max <= 0.01 && max > 0.009, "max |w| {max}");
            }
        }
        ressa_models::Pretrained::<burn::backend::Flex, ressa_models::Llava<_>>::load(
            &out,
            &Default::default(),
        )
        .unwrap();
    }
}

/// CI's reduced form of `configs/shapes-tiny-llava.toml`: a LLaVA (CLIP + projector + LLaMA)
/// trained from scratch through the same generic path, pruned (grid + one-tower cells),
/// repaired and scored; its CLIP layers and LLaMA are pruned, the projector is not.
#[test]
fn the_llava_toy_study_runs_in_its_reduced_form() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("study");
    let o = experiment("configs/shapes-ci-llava.toml", &work);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let results: ressa_report::results::Results =
        serde_json::from_slice(&std::fs::read(work.join("results.json")).unwrap()).unwrap();
    results.validate().unwrap();
    // 2 methods × (50 %, 2:4), 1 language-only + 1 vision-only.
    assert_eq!(results.cells.len(), 6);
    assert_eq!(
        results.cells.iter().filter(|c| c.ressa.is_some()).count(),
        4
    );
    for c in results.cells.iter().filter_map(|c| c.ressa.as_ref()) {
        assert_eq!(c.steps, 2);
        assert!(c.loss_before.is_finite() && c.loss_after.is_finite());
    }
    assert!(results.dense.vqa_accuracy.is_some() && results.dense.cider.is_some());
    // The trained dense model is a LLaVA checkpoint: CLIP tower, projector, LLaMA.
    let dense = std::fs::read_dir(work.join("cache"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.is_dir()
                && p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("dense-")
        })
        .expect("the dense model is cached");
    let keys: Vec<String> = read_f32_tensors(&dense.join("model.safetensors"))
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    for prefix in [
        "vision_tower.encoder.layers.",
        "multi_modal_projector.linear_2.",
        "language_model.model.layers.",
    ] {
        assert!(keys.iter().any(|k| k.starts_with(prefix)), "{prefix}");
    }
    assert!(work.join("report.md").exists());
}

/// A study that names no cells is refused before any data is generated or model trained.
#[test]
fn a_study_without_cells_is_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("empty.toml");
    std::fs::write(
        &config,
        r#"name = "empty"
[model]
train_config = "configs/models/shapes-tiny/config.json"
[data.shapes]
seed = 0
train = 8
val = 4
test = 4
[eval]
vqa_items = 2
"#,
    )
    .unwrap();
    let work = tmp.path().join("work");
    let t = std::time::Instant::now();
    let o = experiment(&config, &work);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(stderr.contains("empty.toml: no cells to run"), "{stderr}");
    assert!(!work.exists(), "nothing is written");
    assert!(t.elapsed().as_secs() < 30);
}
