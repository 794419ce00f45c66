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

/// Tensor `key` of a safetensors file: shape and values (f32 as f32, i64 converted).
fn read_tensor(p: &Path, key: &str) -> (Vec<usize>, Vec<f64>) {
    let bytes = std::fs::read(p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(key).unwrap();
    let values = match t.dtype() {
        safetensors::Dtype::F32 => t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        safetensors::Dtype::I64 => t
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        d => panic!("{key}: dtype {d:?}"),
    };
    (t.shape().to_vec(), values)
}

#[test]
fn logits_match_transformers() {
    // Each fixture's reference holds the tensors `ressa logits` reads: T5 batch 1 (b) and a
    // right-padded batch of 2 (a); decoder-only left-padded batches of 2 (no
    // `decoder_input_ids`; logits over [queries ; prompt]). The untied T5 stores `shared`, both
    // `embed_tokens` and `lm_head` as four different tensors.
    for name in [
        "instructblip-t5-b",
        "instructblip-t5-a",
        "instructblip-t5-untied",
        "instructblip-llama-gqa",
        "instructblip-llama-mha",
    ] {
        let dir = fixture(name);
        let tmp = tempfile::tempdir().unwrap();
        let out_path = tmp.path().join("logits.safetensors");
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
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (shape, ours) = read_tensor(&out_path, "logits");
        let (ref_shape, reference) = read_tensor(&dir.join("reference.safetensors"), "logits");
        assert_eq!(shape, ref_shape, "{name}");
        let diff = ours
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs())
            .fold(0f64, f64::max);
        eprintln!("{name}: logits max abs diff {diff:.2e}");
        assert!(diff <= 1e-4, "{name}: max abs diff {diff}");
    }
}

/// `ressa generate` on a decoder-only model answers as `transformers`' InstructBLIP generates:
/// for every reference setting and every row of the fixture (one image and prompt at a time,
/// so the left-padded row runs unpadded), the printed text is the decoding of the reference
/// tokens after the input (image placeholders and prompt), up to eos.
#[test]
fn decoder_only_generate_matches_transformers() {
    let mut checked = 0;
    for name in ["instructblip-llama-gqa", "instructblip-llama-mha"] {
        let dir = fixture(name);
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
                .unwrap();
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        let queries = config["num_query_tokens"].as_u64().unwrap() as usize;
        let eos = config["text_config"]["eos_token_id"].as_f64().unwrap();
        let pad = config["text_config"]["pad_token_id"].as_f64().unwrap();
        let reference = dir.join("reference.safetensors");
        let (ids_shape, _) = read_tensor(&reference, "input_ids");
        let prompt_width = ids_shape[1];
        let tokenizer =
            ressa_data::text::TextTokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
        for g in json["generate"].as_array().unwrap() {
            let key = g["key"].as_str().unwrap();
            let (shape, rows) = read_tensor(&reference, key);
            for (b, row) in rows.chunks(shape[1]).enumerate() {
                // The reference row: [image x Q ; left-padded prompt ; generated].
                let answer: Vec<u32> = row[queries + prompt_width..]
                    .iter()
                    .take_while(|&&t| t != eos)
                    .filter(|&&t| t != pad)
                    .map(|&t| t as u32)
                    .collect();
                let expected = tokenizer.decode(&answer).unwrap().trim().to_string();
                let arg = |k: &str| g[k].to_string();
                let out = ressa(&[
                    "generate",
                    "--model",
                    s(&dir),
                    "--image",
                    s(&dir.join(format!("image{b}.png"))),
                    "--prompt",
                    json["prompts"][b].as_str().unwrap(),
                    "--qformer-prompt",
                    json["qformer_prompts"][b].as_str().unwrap(),
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
                ]);
                assert!(
                    out.status.success(),
                    "{name} {key} row {b}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let text = String::from_utf8(out.stdout).unwrap();
                assert_eq!(text.lines().count(), 1, "{name} {key} row {b}: {text:?}");
                assert_eq!(text.trim(), expected, "{name} {key} row {b}");
                if (name, key, b)
                    == (
                        "instructblip-llama-gqa",
                        "generate_b1_max8_min0_lpp1_rep1.0",
                        0,
                    )
                {
                    // Generated [square </s>] after the prompt.
                    assert_eq!(text.trim(), "square");
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 24);
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
    // A preprocessor whose size differs from the vision model's image_size (a panic in the
    // patch embedding before it was checked).
    let mismatched = tmp.path().join("mismatched");
    std::fs::create_dir(&mismatched).unwrap();
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, mismatched.join(p.file_name().unwrap())).unwrap();
        }
    }
    let pre = mismatched.join("preprocessor_config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&pre).unwrap()).unwrap();
    cfg["size"] = serde_json::json!({"height": 48, "width": 48});
    std::fs::write(&pre, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let out = ressa(&[
        "generate",
        "--model",
        s(&mismatched),
        "--image",
        s(&img),
        "--prompt",
        prompt,
    ]);
    assert_clean_error(&out, "preprocessor_config.json: field `size`: 48×48");
    assert_clean_error(&out, "image_size 32");
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

    // Decoder-only inputs: image placeholders belong to the model, not to `input_ids`; masks
    // must fit their ids.
    let llama = fixture("instructblip-llama-gqa");
    let reference = llama.join("reference.safetensors");
    let with = |key: &str, dtype: safetensors::Dtype, shape: Vec<usize>, values: Vec<i64>| {
        let bytes = std::fs::read(&reference).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let replaced: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut views: Vec<(String, safetensors::tensor::TensorView)> =
            st.tensors().into_iter().filter(|(k, _)| k != key).collect();
        views.push((
            key.to_string(),
            safetensors::tensor::TensorView::new(dtype, shape, &replaced).unwrap(),
        ));
        let path = tmp.path().join(format!("{key}.safetensors"));
        safetensors::serialize_to_file(views, None, &path).unwrap();
        path
    };
    let (shape, ids) = read_tensor(&reference, "input_ids");
    let mut ids: Vec<i64> = ids.iter().map(|&v| v as i64).collect();
    ids[3] = 59; // image_token_index
    let placeholders = with("input_ids", safetensors::Dtype::I64, shape, ids);
    assert_clean_error(
        &ressa(&[
            "logits",
            "--model",
            s(&llama),
            "--inputs",
            s(&placeholders),
            "--out",
            s(&tmp.path().join("o")),
        ]),
        "image_token_index 59",
    );
    let short_mask = with(
        "attention_mask",
        safetensors::Dtype::I64,
        vec![2, 3],
        vec![1; 6],
    );
    assert_clean_error(
        &ressa(&[
            "logits",
            "--model",
            s(&llama),
            "--inputs",
            s(&short_mask),
            "--out",
            s(&tmp.path().join("o")),
        ]),
        "`attention_mask` has shape [2, 3]",
    );
    assert!(!tmp.path().join("o").exists());
    assert_clean_error(
        &ressa(&[
            "generate",
            "--model",
            s(&fixture("blip2-t5")),
            "--image",
            s(&img),
            "--prompt",
            prompt,
            "--qformer-prompt",
            "what",
        ]),
        "--qformer-prompt",
    );
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

/// `ressa` at `RUST_LOG=info`: the generated token ids and the kernel counts are logged.
fn ressa_info(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_ressa"))
        .args(args)
        .env("RUST_LOG", "info")
        .output()
        .expect("run ressa");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The `key=value` field of the log line containing `message`.
fn log_field(out: &Output, message: &str, key: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find(|l| l.contains(message))
        .unwrap_or_else(|| panic!("no `{message}` log line: {stderr}"));
    let start = line
        .find(&format!(" {key}="))
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
        + key.len()
        + 2;
    let rest = &line[start..];
    let end = if rest.starts_with('[') {
        rest.find(']').unwrap() + 1
    } else {
        rest.find(' ').unwrap_or(rest.len())
    };
    rest[..end].to_string()
}

/// `--sparse-kernels` (the pruned linears run by the packed CPU kernels) changes no generated
/// token: a 70 % magnitude-pruned model (CSR at decode, dense host products elsewhere) and a
/// 2:4 language-only one (N:M), greedy and beam search; `ressa eval` writes the same
/// predictions and metrics (VQA and captions).
#[test]
fn sparse_kernels_generate_and_eval_the_same() {
    let src = fixture("instructblip-t5-a");
    let tmp = tempfile::tempdir().unwrap();
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/data");
    let (p70, p24) = (tmp.path().join("p70"), tmp.path().join("p24"));
    for (out, extra) in [
        (&p70, &["--sparsity", "0.7"][..]),
        (
            &p24,
            &["--sparsity", "0.5", "--pattern", "2:4", "--vision", "0"][..],
        ),
    ] {
        let mut args = vec![
            "prune",
            "--model",
            s(&src),
            "--method",
            "magnitude",
            "--out",
            s(out),
        ];
        args.extend_from_slice(extra);
        ressa_info(&args);
    }
    let image = src.join("image0.png");
    for (model, kernel) in [(&p70, "csr"), (&p24, "nm")] {
        for beams in ["1", "3"] {
            let args = [
                "generate",
                "--model",
                s(model),
                "--image",
                s(&image),
                "--prompt",
                "question: what is the color of the circle short answer:",
                "--beams",
                beams,
                "--max-new-tokens",
                "8",
                "--min-new-tokens",
                "8",
            ];
            let plain = ressa_info(&args);
            let sparse = ressa_info(&[&args[..], &["--sparse-kernels"]].concat());
            let what = format!("{} beams {beams}", model.display());
            assert_eq!(
                log_field(&plain, "generated", "tokens"),
                log_field(&sparse, "generated", "tokens"),
                "{what}"
            );
            assert_eq!(plain.stdout, sparse.stdout, "{what}");
            if beams == "1" {
                let n: usize = log_field(&sparse, "sparse kernels", kernel)
                    .parse()
                    .unwrap();
                assert!(n > 0, "{what}: no {kernel} kernel chosen");
            }
        }
    }

    let d = |p: &str| data.join(p);
    let eval = |task: &str, ann: &str, gt: &[&str], extra: &[&str], out: &Path| {
        let mut args: Vec<String> = [
            "eval",
            "--model",
            s(&p70),
            "--task",
            task,
            "--annotations",
            s(&d(ann)),
            "--images",
            s(&d("images/coco")),
            "--out",
            s(out),
            "--ground-truth",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        args.extend(gt.iter().map(|g| s(&d(g)).to_string()));
        args.extend(extra.iter().map(|a| a.to_string()));
        ressa_info(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    for (task, ann, gt, extra) in [
        (
            "vqav2",
            "annotations/vqa_val_eval.json",
            &[
                "annotations/v2_mscoco_val2014_annotations.json",
                "annotations/v2_OpenEnded_mscoco_val2014_questions.json",
            ][..],
            &["--batch-size", "3"][..],
        ),
        (
            "coco-caption",
            "annotations/coco_karpathy_test.json",
            &["annotations/coco_karpathy_test_gt.json"][..],
            &["--batch-size", "2", "--beams", "3"][..],
        ),
    ] {
        let (a, b) = (
            tmp.path().join("plain.json"),
            tmp.path().join("sparse.json"),
        );
        let plain = eval(task, ann, gt, extra, &a);
        let sparse = eval(task, ann, gt, &[extra, &["--sparse-kernels"]].concat(), &b);
        let csr: usize = log_field(&sparse, "sparse kernels", "csr").parse().unwrap();
        assert!(csr > 0, "{task}: no CSR kernel chosen");
        assert_eq!(plain.stdout, sparse.stdout, "{task}: metrics");
        assert_eq!(
            std::fs::read(&a).unwrap(),
            std::fs::read(&b).unwrap(),
            "{task}: predictions"
        );
    }
}

/// `--model org/name` is found in the local Hugging Face cache (`HF_HUB_CACHE` layout: refs
/// naming a snapshot whose files link to blobs), at `--revision`.
#[test]
fn a_repo_id_is_read_from_the_hf_cache() {
    let src = fixture("blip2-t5");
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--tiny--blip2-t5");
    let blobs = repo.join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    for (rev, commit) in [("main", "c0ffee"), ("v1", "beef01")] {
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join(rev), format!("{commit}\n")).unwrap();
        let snap = repo.join("snapshots").join(commit);
        std::fs::create_dir_all(&snap).unwrap();
        for e in std::fs::read_dir(&src).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                let name = p.file_name().unwrap();
                let blob = blobs.join(format!("{commit}-{}", name.to_string_lossy()));
                std::fs::copy(&p, &blob).unwrap();
                std::os::unix::fs::symlink(&blob, snap.join(name)).unwrap();
            }
        }
    }
    let run = |extra: &[&str]| {
        let mut args = vec!["inspect", "--json", "--model", "tiny/blip2-t5"];
        args.extend_from_slice(extra);
        Command::new(env!("CARGO_BIN_EXE_ressa"))
            .args(&args)
            .env("HF_HUB_CACHE", cache.path())
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    let direct = ressa(&["inspect", "--json", "--model", s(&src)]);
    for extra in [&[][..], &["--revision", "v1"], &["--revision", "beef01"]] {
        let out = run(extra);
        assert!(
            out.status.success(),
            "{extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, direct.stdout, "{extra:?}");
    }
    assert_clean_error(&run(&["--revision", "nope"]), "revision `nope`");
    let out = Command::new(env!("CARGO_BIN_EXE_ressa"))
        .args(["inspect", "--model", "tiny/missing"])
        .env("HF_HUB_CACHE", cache.path())
        .output()
        .unwrap();
    assert_clean_error(&out, "tiny/missing");
}
