//! End-to-end checks of the `ressa` binary on the committed tiny checkpoints.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
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

/// A failing run: non-zero exit, one `error:` line naming `needle`, no panic.
fn assert_clean_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains(needle), "{stderr}");
}

#[test]
fn generate_prints_text() {
    let dir = fixture("instructblip-t5-a");
    let out = ressa(&[
        "generate",
        "--model",
        s(&dir),
        "--image",
        s(&dir.join("image0.png")),
        "--prompt",
        "question: what is the color of the circle short answer:",
        "--beams",
        "3",
        "--max-new-tokens",
        "6",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 1);
    assert!(!text.trim().is_empty());
}

#[test]
fn logits_match_transformers() {
    let dir = fixture("instructblip-t5-b");
    let tmp = tempfile::tempdir().unwrap();
    let out_path = tmp.path().join("logits.safetensors");
    // The fixture's reference holds exactly the tensors `ressa logits` reads (batch 1, no padding).
    let out = ressa(&[
        "logits",
        "--model",
        s(&dir),
        "--inputs",
        s(&dir.join("reference.safetensors")),
        "--out",
        s(&out_path),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = |p: &Path, key: &str| -> (Vec<usize>, Vec<f32>) {
        let bytes = std::fs::read(p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor(key).unwrap();
        (
            t.shape().to_vec(),
            t.data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        )
    };
    let (shape, ours) = read(&out_path, "logits");
    let (ref_shape, reference) = read(&dir.join("reference.safetensors"), "logits");
    assert_eq!(shape, ref_shape);
    let diff = ours
        .iter()
        .zip(&reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff <= 1e-4, "max abs diff {diff}");
}

#[test]
fn inspect_reports_towers_and_sparsity() {
    let out = ressa(&["inspect", "--json", "--model", s(&fixture("blip2-t5"))]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let towers = json["parameters"].as_object().unwrap();
    let sum: u64 = towers.values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(json["total"].as_u64().unwrap(), sum);
    assert!(towers.contains_key("vision_model") && towers.contains_key("language_model"));
    let linears = json["linears"].as_array().unwrap();
    assert!(
        linears
            .iter()
            .any(|l| l["name"]
                == "language_model.encoder.block.0.layer.1.DenseReluDense.wi_0.weight")
    );
    assert!(
        linears
            .iter()
            .all(|l| l["sparsity"].as_f64().unwrap() < 0.01)
    );
}

#[test]
fn bad_inputs_fail_with_one_line() {
    let dir = fixture("instructblip-t5-a");
    let img = dir.join("image0.png");
    let prompt = "question: what";
    assert_clean_error(
        &ressa(&[
            "generate",
            "--model",
            s(&dir),
            "--image",
            s(&img),
            "--prompt",
            "  ",
        ]),
        "--prompt",
    );
    assert_clean_error(
        &ressa(&[
            "generate",
            "--model",
            s(&dir),
            "--image",
            s(&dir.join("config.json")),
            "--prompt",
            prompt,
        ]),
        "config.json",
    );
    assert_clean_error(
        &ressa(&[
            "generate",
            "--model",
            "/nonexistent/model",
            "--image",
            s(&img),
            "--prompt",
            prompt,
        ]),
        "/nonexistent/model/config.json",
    );
    let tmp = tempfile::tempdir().unwrap();
    assert_clean_error(
        &ressa(&[
            "logits",
            "--model",
            s(&dir),
            "--inputs",
            s(&dir.join("config.json")),
            "--out",
            s(&tmp.path().join("o")),
        ]),
        "config.json",
    );
    // The fixture-a reference lacks nothing, but a file without `decoder_input_ids` is refused.
    let bytes: Vec<u8> = [0f32; 3].iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![3], &bytes).unwrap();
    let partial = tmp.path().join("partial.safetensors");
    safetensors::serialize_to_file([("x", view)], None, &partial).unwrap();
    assert_clean_error(
        &ressa(&[
            "logits",
            "--model",
            s(&dir),
            "--inputs",
            s(&partial),
            "--out",
            s(&tmp.path().join("o")),
        ]),
        "pixel_values",
    );
    assert!(!tmp.path().join("o").exists());
}

#[test]
fn score_prints_the_official_metrics() {
    let m = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/metrics");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(m.join("caption_expected.json")).unwrap())
            .unwrap();
    let out = ressa(&[
        "score",
        "--task",
        "coco-caption",
        "--predictions",
        s(&m.join("caption_predictions.json")),
        "--annotations",
        s(&m.join("caption_gt.json")),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in ["CIDEr", "Bleu_4"] {
        let (a, b) = (
            got[key].as_f64().unwrap(),
            expected["corpus"][key].as_f64().unwrap(),
        );
        assert!((a - b).abs() < 1e-6, "{key}: {a} vs {b}");
    }
    let out = ressa(&[
        "score",
        "--task",
        "vqav2",
        "--predictions",
        s(&m.join("vqa_predictions.json")),
        "--annotations",
        s(&m.join("vqa_annotations.json")),
        s(&m.join("vqa_questions.json")),
    ]);
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(m.join("vqa_expected.json")).unwrap())
            .unwrap();
    assert!(
        (got["accuracy"].as_f64().unwrap() - expected["accuracy"].as_f64().unwrap()).abs() < 1e-6
    );
    assert_clean_error(
        &ressa(&[
            "score",
            "--task",
            "gqa",
            "--predictions",
            s(&m.join("vqa_annotations.json")),
            "--annotations",
            s(&m.join("gqa_annotations.json")),
        ]),
        "vqa_annotations.json",
    );
}
