//! LLaVA-1.5 through the generic commands: `generate` reproduces the transformers reference
//! text, `inspect` names the towers, `prune` prunes the CLIP layers the features use and the
//! LLaMA, leaving the projector and the unused last CLIP layer dense.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::SafeTensors;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/llava-gqa")
}

fn ressa(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ressa"))
        .args(args)
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

/// Rows of an i64 [B, L] tensor of `reference.safetensors`.
fn rows(key: &str) -> Vec<Vec<u32>> {
    let bytes = std::fs::read(fixture().join("reference.safetensors")).unwrap();
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

/// Every reference setting and row (one image and prompt at a time, so the left-padded row
/// runs unpadded): the printed text is the decoding of the reference tokens after the input.
#[test]
fn generate_matches_transformers() {
    let dir = fixture();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let width = rows("input_ids")[0].len();
    let tokenizer =
        ressa_data::text::TextTokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let mut checked = 0;
    for g in json["generate"].as_array().unwrap() {
        let key = g["key"].as_str().unwrap();
        for (b, row) in rows(key).iter().enumerate() {
            let answer: Vec<u32> = row[width..]
                .iter()
                .copied()
                .take_while(|&t| t != 2)
                .filter(|&t| t != 0)
                .collect();
            let expected = tokenizer.decode(&answer).unwrap().trim().to_string();
            let arg = |k: &str| g[k].to_string();
            let prompt = format!("<image> {}", json["prompts"][b].as_str().unwrap());
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
            ]));
            assert_eq!(text.trim(), expected, "{key} row {b}");
            checked += 1;
        }
    }
    assert_eq!(checked, 8);
}

#[test]
fn inspect_and_prune_go_through_the_registry() {
    let dir = fixture();
    let json: serde_json::Value =
        serde_json::from_str(&ok(&ressa(&["inspect", "--json", "--model", s(&dir)]))).unwrap();
    let towers = json["parameters"].as_object().unwrap();
    for t in ["vision_tower", "multi_modal_projector", "language_model"] {
        assert!(towers.contains_key(t), "{towers:?}");
    }
    assert_eq!(json["linears"].as_array().unwrap().len(), 2 * 6 + 2 * 7);

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
    let json: serde_json::Value =
        serde_json::from_str(&ok(&ressa(&["inspect", "--json", "--model", s(&out)]))).unwrap();
    for l in json["linears"].as_array().unwrap() {
        let got = l["sparsity"].as_f64().unwrap();
        assert!((got - 0.5).abs() < 0.01, "{l}");
    }
    // The projector and the CLIP layer after the feature layer stay dense.
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for key in [
        "multi_modal_projector.linear_1.weight",
        "vision_tower.encoder.layers.2.mlp.fc1.weight",
    ] {
        let t = st.tensor(key).unwrap();
        let zeros = t
            .data()
            .chunks_exact(4)
            .filter(|c| f32::from_le_bytes((*c).try_into().unwrap()) == 0.0)
            .count();
        assert_eq!(zeros, 0, "{key}");
    }
    let text = ok(&ressa(&[
        "generate",
        "--model",
        s(&out),
        "--image",
        s(&dir.join("image0.png")),
        "--prompt",
        "<image> what is the color of the circle short answer:",
        "--max-new-tokens",
        "4",
    ]));
    assert_eq!(text.lines().count(), 1);
}

/// The whole pipeline on LLaVA through the generic commands: Wanda prune of both towers,
/// RESSA repair (every pruned linear keeps exactly its zeros), VQA eval scored against the
/// official files, and a sparse-bitmask export that loads again.
#[test]
fn prune_repair_eval_export_on_llava() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cal = repo.join("tests/fixtures/calibration");
    let data = repo.join("tests/fixtures/data");
    let pruned = tmp.path().join("pruned");
    ok(&ressa(&[
        "prune",
        "--model",
        s(&fixture()),
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
    let masks = ressa_sparse::sidecar::read_masks(pruned.join("masks.safetensors")).unwrap();
    assert!(
        masks.keys().any(|k| k.starts_with("vision_tower.")),
        "vision pruned"
    );
    assert!(
        masks.keys().any(|k| k.starts_with("language_model.")),
        "language pruned"
    );
    assert!(
        !masks.keys().any(|k| k.contains("multi_modal_projector")),
        "projector dense"
    );
    let repaired = tmp.path().join("repaired");
    ok(&ressa(&[
        "repair",
        "--model",
        s(&pruned),
        "--dense",
        s(&fixture()),
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
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repaired.join("repair.json")).unwrap()).unwrap();
    assert_eq!(
        report["exact_sparsity"].as_u64().unwrap() as usize,
        masks.len()
    );
    assert_eq!(report["train"]["steps"], 4);
    // The merged weights: zero exactly where the masks prune.
    let bytes = std::fs::read(repaired.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for (key, mask) in &masks {
        let t = st.tensor(key).unwrap();
        let w: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        // Stored [d_out, d_in]; masks are [d_in, d_out].
        let (d_in, d_out) = mask.shape();
        let keep = mask.to_bools();
        for o in 0..d_out {
            for i in 0..d_in {
                assert_eq!(
                    w[o * d_in + i] != 0.0,
                    keep[i * d_out + o],
                    "{key}[{o}, {i}]"
                );
            }
        }
    }
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
    assert_eq!(metrics["num_predictions"], 4.0);
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
