//! LLaVA-1.5 through the generic commands, on both tiny fixtures (`llava-gqa`: transformers
//! 5.x's key layout in float32; `llava-hub`: the hub's `vision_tower.vision_model.*` layout in
//! float16 shards, two feature layers, CLS kept): `generate` reproduces the transformers
//! reference text, `inspect` names the towers, `prune` prunes the CLIP layers the features use
//! and the LLaMA (the projector and the unused last CLIP layer stay dense), and the whole
//! prune → repair → eval → export pipeline runs. The pruned and repaired outputs committed in
//! `tests/fixtures/llava-outputs` (`scripts/check_pruned_with_transformers.py`) load in
//! transformers with every tensor; `ressa logits` on them equals transformers' logits, and
//! fresh runs of the same commands write the same tensors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::{Dtype, SafeTensors};

const FIXTURES: [&str; 2] = ["llava-gqa", "llava-hub"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures/models").join(name)
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ressa(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ressa"))
        .args(args)
        .current_dir(repo())
        .env("RUST_LOG", "warn")
        .output()
        .expect("run ressa")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// Rows of an i64 [B, L] tensor of a fixture's `reference.safetensors`.
fn rows(name: &str, key: &str) -> Vec<Vec<u32>> {
    let bytes = std::fs::read(fixture(name).join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(key).unwrap();
    let l = t.shape()[1];
    let v: Vec<u32> = t
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect();
    v.chunks(l).map(<[u32]>::to_vec).collect()
}

/// An f32 tensor of a safetensors file: (shape, values).
fn f32_tensor(path: &Path, key: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(key).unwrap();
    assert_eq!(t.dtype(), Dtype::F32, "{key}");
    let v = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (t.shape().to_vec(), v)
}

/// A stored tensor: its file, dtype, shape and bytes.
type Stored = (String, Dtype, Vec<usize>, Vec<u8>);

/// Every tensor of a model directory (one file, or the shards its index names).
fn tensors(dir: &Path) -> BTreeMap<String, Stored> {
    let index = dir.join("model.safetensors.index.json");
    let files: std::collections::BTreeSet<String> = if index.exists() {
        json(&index)["weight_map"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    } else {
        ["model.safetensors".to_string()].into()
    };
    let mut out = BTreeMap::new();
    for file in files {
        let bytes = std::fs::read(dir.join(&file)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for (name, t) in st.tensors() {
            let v = (
                file.clone(),
                t.dtype(),
                t.shape().to_vec(),
                t.data().to_vec(),
            );
            assert!(out.insert(name.clone(), v).is_none(), "{name} twice");
        }
    }
    out
}

/// Which stored values are non-zero (float32, float16 or bfloat16).
fn nonzero(t: &Stored) -> Vec<bool> {
    match t.1 {
        Dtype::F32 => {
            t.3.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) != 0.0)
                .collect()
        }
        Dtype::F16 | Dtype::BF16 => {
            t.3.chunks_exact(2)
                .map(|c| u16::from_le_bytes(c.try_into().unwrap()) & 0x7fff != 0)
                .collect()
        }
        d => panic!("{d:?} is not a float dtype"),
    }
}

/// The same keys, each in the same file with the same dtype and shape.
fn same_layout(a: &BTreeMap<String, Stored>, b: &BTreeMap<String, Stored>, what: &str) {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{what}: key set"
    );
    for (k, x) in a {
        let y = &b[k];
        assert_eq!((&x.0, x.1, &x.2), (&y.0, y.1, &y.2), "{what}: {k}");
    }
}

/// Every weight named in `masks.safetensors` of `dir` is zero exactly where its mask prunes;
/// returns the masks.
fn zeros_follow_the_masks(dir: &Path) -> BTreeMap<String, ressa_sparse::mask::Mask> {
    let masks = ressa_sparse::sidecar::read_masks(dir.join("masks.safetensors")).unwrap();
    let stored = tensors(dir);
    for (key, mask) in &masks {
        let w = nonzero(&stored[key]);
        // Stored [d_out, d_in]; masks are [d_in, d_out].
        let (d_in, d_out) = mask.shape();
        let keep = mask.to_bools();
        for o in 0..d_out {
            for i in 0..d_in {
                assert_eq!(
                    w[o * d_in + i],
                    keep[i * d_out + o],
                    "{}: {key}[{o}, {i}]",
                    dir.display()
                );
            }
        }
    }
    masks
}

/// Every reference setting and row (one image and prompt at a time, so a left-padded row runs
/// unpadded; with transformers 5.25's repetition penalty the padding does not count, so the
/// tokens are the same): the printed text is the decoding of the reference tokens after the
/// input.
#[test]
fn generate_matches_transformers() {
    let mut checked = 0;
    for name in FIXTURES {
        let dir = fixture(name);
        let reference = json(&dir.join("reference.json"));
        let text_config = &json(&dir.join("config.json"))["text_config"];
        let (eos, pad) = (
            text_config["eos_token_id"].as_u64().unwrap() as u32,
            text_config["pad_token_id"].as_u64().unwrap() as u32,
        );
        let template = reference["template"].as_str().unwrap();
        let width = rows(name, "input_ids")[0].len();
        let tokenizer =
            ressa_data::text::TextTokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
        for g in reference["generate"].as_array().unwrap() {
            let key = g["key"].as_str().unwrap();
            for (b, row) in rows(name, key).iter().enumerate() {
                let answer: Vec<u32> = row[width..]
                    .iter()
                    .copied()
                    .take_while(|&t| t != eos)
                    .filter(|&t| t != pad)
                    .collect();
                let expected = tokenizer.decode(&answer).unwrap().trim().to_string();
                let arg = |k: &str| g[k].to_string();
                let prompt = template.replace("{}", reference["prompts"][b].as_str().unwrap());
                let text = ok(&ressa(&[
                    "generate",
                    "--model",
                    s(&dir),
                    "--image",
                    s(&dir.join(format!("image{b}.png"))),
                    "--prompt",
                    &prompt,
                    "--beams",
                    &arg("num_beams"),
                    "--max-new-tokens",
                    &arg("max_new_tokens"),
                    "--min-new-tokens",
                    &arg("min_new_tokens"),
                    "--length-penalty",
                    &arg("length_penalty"),
                    "--repetition-penalty",
                    &arg("repetition_penalty"),
                ]));
                assert_eq!(text.trim(), expected, "{name}: {key} row {b}");
                checked += 1;
            }
        }
    }
    // 8 settings × 2 rows (gqa) + 8 × 3 (hub).
    assert_eq!(checked, 40);
}

#[test]
fn inspect_and_prune_go_through_the_registry() {
    // (fixture, prunable linears, weights that must stay dense: the projector and the CLIP
    // layer after the deepest feature layer).
    for (name, linears, dense) in [
        (
            "llava-gqa",
            2 * 6 + 2 * 7,
            "vision_tower.encoder.layers.2.mlp.fc1.weight",
        ),
        (
            "llava-hub",
            3 * 6 + 3 * 7,
            "vision_tower.vision_model.encoder.layers.3.mlp.fc1.weight",
        ),
    ] {
        let dir = fixture(name);
        let info: serde_json::Value =
            serde_json::from_str(&ok(&ressa(&["inspect", "--json", "--model", s(&dir)]))).unwrap();
        let towers = info["parameters"].as_object().unwrap();
        for t in ["vision_tower", "multi_modal_projector", "language_model"] {
            assert!(towers.contains_key(t), "{name}: {towers:?}");
        }
        assert_eq!(info["linears"].as_array().unwrap().len(), linears, "{name}");

        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("pruned");
        ok(&ressa(&[
            "prune",
            "--model",
            s(&dir),
            "--method",
            "magnitude",
            "--vision",
            "0.5",
            "--language",
            "0.5",
            "--out",
            s(&out),
        ]));
        let info: serde_json::Value =
            serde_json::from_str(&ok(&ressa(&["inspect", "--json", "--model", s(&out)]))).unwrap();
        for l in info["linears"].as_array().unwrap() {
            let got = l["sparsity"].as_f64().unwrap();
            assert!((got - 0.5).abs() < 0.01, "{name}: {l}");
        }
        let stored = tensors(&out);
        for key in ["multi_modal_projector.linear_1.weight", dense] {
            assert!(
                nonzero(&stored[key]).iter().all(|&n| n),
                "{name}: {key} was pruned"
            );
        }
        // Written in the layout read: same keys, files and dtypes.
        same_layout(&tensors(&dir), &stored, name);
        let prompt = json(&dir.join("reference.json"))["template"]
            .as_str()
            .unwrap()
            .replace("{}", "what is the color of the circle");
        let text = ok(&ressa(&[
            "generate",
            "--model",
            s(&out),
            "--image",
            s(&dir.join("image0.png")),
            "--prompt",
            &prompt,
            "--max-new-tokens",
            "4",
        ]));
        assert_eq!(text.lines().count(), 1, "{name}");
    }
}

/// The whole pipeline on LLaVA through the generic commands, on both fixtures: Wanda prune of
/// both towers, RESSA repair (every pruned linear keeps exactly its zeros), VQA eval scored
/// against the official files, and a sparse-bitmask export that loads again.
#[test]
fn prune_repair_eval_export_on_llava() {
    for name in FIXTURES {
        pipeline(name);
    }
}

fn pipeline(name: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let cal = repo().join("tests/fixtures/calibration");
    let data = repo().join("tests/fixtures/data");
    let pruned = tmp.path().join("pruned");
    ok(&ressa(&[
        "prune",
        "--model",
        s(&fixture(name)),
        "--method",
        "wanda",
        "--vision",
        "0.5",
        "--language",
        "0.5",
        "--calibration",
        s(&cal.join("captions.json")),
        "--images",
        s(&cal),
        "--samples",
        "4",
        "--out",
        s(&pruned),
    ]));
    let masks = zeros_follow_the_masks(&pruned);
    assert!(
        masks.keys().any(|k| k.starts_with("vision_tower.")),
        "{name}: vision pruned"
    );
    assert!(
        masks.keys().any(|k| k.starts_with("language_model.")),
        "{name}: language pruned"
    );
    assert!(
        !masks.keys().any(|k| k.contains("multi_modal_projector")),
        "{name}: projector dense"
    );
    let repaired = tmp.path().join("repaired");
    ok(&ressa(&[
        "repair",
        "--model",
        s(&pruned),
        "--dense",
        s(&fixture(name)),
        "--data",
        s(&cal.join("captions.json")),
        "--images",
        s(&cal),
        "--out",
        s(&repaired),
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--lr",
        "1e-3",
    ]));
    let report = json(&repaired.join("repair.json"));
    assert_eq!(
        report["exact_sparsity"].as_u64().unwrap() as usize,
        masks.len(),
        "{name}"
    );
    assert_eq!(report["train"]["steps"], 4);
    // The merged weights: zero exactly where the masks prune, every tensor where it was read.
    assert_eq!(zeros_follow_the_masks(&repaired).len(), masks.len());
    same_layout(&tensors(&fixture(name)), &tensors(&repaired), name);
    let out = ressa(&[
        "eval",
        "--model",
        s(&repaired),
        "--task",
        "vqav2",
        "--annotations",
        s(&data.join("annotations/vqa_val_eval.json")),
        "--images",
        s(&data.join("images/coco")),
        "--out",
        s(&tmp.path().join("pred.json")),
        "--batch-size",
        "2",
        "--max-new-tokens",
        "3",
        "--ground-truth",
        s(&data.join("annotations/v2_mscoco_val2014_annotations.json")),
        s(&data.join("annotations/v2_OpenEnded_mscoco_val2014_questions.json")),
    ]);
    let metrics: serde_json::Value = serde_json::from_str(ok(&out).trim()).unwrap();
    assert_eq!(metrics["num_predictions"], 4.0, "{name}");
    assert!(metrics["accuracy"].as_f64().is_some());
    let bitmask = tmp.path().join("bitmask");
    ok(&ressa(&[
        "export",
        s(&repaired),
        "--format",
        "bitmask",
        "--out",
        s(&bitmask),
    ]));
    ok(&ressa(&["inspect", "--model", s(&bitmask)]));
}

/// Max |a − b| over the positions a row attends to (a left-padded position attends to nothing;
/// its logits are unspecified).
fn attended_diff(
    ours: &(Vec<usize>, Vec<f32>),
    theirs: &(Vec<usize>, Vec<f32>),
    mask: &[Vec<u32>],
) -> f32 {
    assert_eq!(ours.0, theirs.0, "shape");
    let (l, v) = (ours.0[1], ours.0[2]);
    let mut max = 0f32;
    for (b, row) in mask.iter().enumerate() {
        for (p, _) in row.iter().enumerate().filter(|(_, m)| **m != 0) {
            let at = (b * l + p) * v;
            for (x, y) in ours.1[at..at + v].iter().zip(&theirs.1[at..at + v]) {
                max = max.max((x - y).abs());
            }
        }
    }
    max
}

/// The `ressa` arguments recorded for an output, with `--model` and `--out` replaced.
fn recorded(command: &serde_json::Value, model: Option<&Path>, out: &Path) -> Vec<String> {
    let args: Vec<String> = command.as_array().unwrap()[1..]
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let mut fixed = args.clone();
    for (i, a) in args.iter().enumerate() {
        match (a.as_str(), model) {
            ("--out", _) => fixed[i + 1] = s(out).to_string(),
            ("--model", Some(m)) => fixed[i + 1] = s(m).to_string(),
            _ => {}
        }
    }
    fixed
}

/// The committed pruned and repaired outputs of both fixtures (made by ressa, checked by
/// `scripts/check_pruned_with_transformers.py`): transformers 5.25 loaded them with no missing,
/// unexpected or mismatched key and read every tensor as stored; they hold every tensor of the
/// source checkpoint in its file, dtype and shape, zeros where the masks prune; `ressa logits`
/// on them equals transformers' logits on the fixture's inputs (≤ 1e-4). A fresh `ressa prune`
/// with the recorded command writes the committed tensors byte for byte, and a fresh `ressa
/// repair` the same layout and zeros.
#[test]
fn pruned_and_repaired_outputs_load_in_transformers_with_every_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        let dir = repo().join("tests/fixtures/llava-outputs").join(name);
        let record = json(&dir.join("transformers.json"));
        let source = tensors(&fixture(name));
        let mask = rows(name, "attention_mask");
        for kind in ["pruned", "repaired"] {
            let out = dir.join(kind);
            let r = &record["outputs"][kind];
            for (what, keys) in r["loading_info"].as_object().unwrap() {
                assert!(
                    keys.as_array().unwrap().is_empty(),
                    "{name}/{kind}: {what} {keys}"
                );
            }
            same_layout(&source, &tensors(&out), &format!("{name}/{kind}"));
            let masks = zeros_follow_the_masks(&out);
            assert_eq!(
                r["pruned_weights_verified"].as_u64().unwrap() as usize,
                masks.len()
            );
            let logits = tmp.path().join(format!("{name}-{kind}.safetensors"));
            ok(&ressa(&[
                "logits",
                "--model",
                s(&out),
                "--inputs",
                s(&fixture(name).join("reference.safetensors")),
                "--out",
                s(&logits),
            ]));
            let diff = attended_diff(
                &f32_tensor(&logits, "logits"),
                &f32_tensor(
                    &dir.join("transformers.safetensors"),
                    &format!("logits_{kind}"),
                ),
                &mask,
            );
            eprintln!("{name}/{kind}: logits vs transformers {diff:.2e}");
            assert!(diff <= 1e-4, "{name}/{kind}: logits differ by {diff}");
        }

        // Fresh runs of the recorded commands.
        let pruned = tmp.path().join(format!("{name}-pruned"));
        let args = recorded(&record["outputs"]["pruned"]["command"], None, &pruned);
        ok(&ressa(&args.iter().map(String::as_str).collect::<Vec<_>>()));
        assert_eq!(tensors(&pruned), tensors(&dir.join("pruned")), "{name}");
        assert_eq!(
            std::fs::read(pruned.join("masks.safetensors")).unwrap(),
            std::fs::read(dir.join("pruned/masks.safetensors")).unwrap()
        );
        let repaired = tmp.path().join(format!("{name}-repaired"));
        let args = recorded(
            &record["outputs"]["repaired"]["command"],
            Some(&pruned),
            &repaired,
        );
        ok(&ressa(&args.iter().map(String::as_str).collect::<Vec<_>>()));
        same_layout(&tensors(&dir.join("repaired")), &tensors(&repaired), name);
        let (fresh, committed) = (
            zeros_follow_the_masks(&repaired),
            zeros_follow_the_masks(&dir.join("repaired")),
        );
        assert_eq!(
            fresh.keys().collect::<Vec<_>>(),
            committed.keys().collect::<Vec<_>>()
        );
        for (k, m) in &fresh {
            assert!(m.to_bools() == committed[k].to_bools(), "{name}: {k} mask");
        }
    }
}
