//! `ressa prune` end to end on the tiny fixtures: exact sparsity, untouched tensors
//! bit-identical, masks sidecar consistent with the weights, and clean failures.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(p)
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

/// Every tensor of a model directory, PyTorch layout, as f32.
fn tensors(dir: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if !(name.starts_with("model") && name.ends_with(".safetensors")) {
            continue;
        }
        let bytes = std::fs::read(&p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (k, t) in st.tensors() {
            let v = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            out.insert(k, (t.shape().to_vec(), v));
        }
    }
    out
}

fn prune(model: &str, extra: &[&str]) -> (tempfile::TempDir, PathBuf, Output) {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("pruned");
    let model = repo(model);
    let cal = repo("tests/fixtures/calibration");
    let mut args = vec!["prune", "--model", s(&model), "--out", s(&out_dir)];
    let captions = cal.join("captions.json");
    args.extend_from_slice(&[
        "--calibration",
        s(&captions),
        "--images",
        s(&cal),
        "--samples",
        "4",
    ]);
    let args: Vec<String> = args
        .iter()
        .map(|a| a.to_string())
        .chain(extra.iter().map(|a| a.to_string()))
        .collect();
    let refs: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
    let out = ressa(&refs);
    (tmp, out_dir, out)
}

fn check_pruned(src: &str, out_dir: &Path, expect_nm: Option<(usize, usize)>) -> serde_json::Value {
    let before = tensors(&repo(src));
    let after = tensors(out_dir);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    let masks = ressa_sparse::sidecar::read_masks(out_dir.join("masks.safetensors")).unwrap();
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("sparsity.json")).unwrap())
            .unwrap();
    assert_eq!(report["layers"].as_array().unwrap().len(), masks.len());
    for (name, (shape, values)) in &after {
        match masks.get(name) {
            None => assert_eq!(values, &before[name].1, "{name} must be bit-identical"),
            Some(mask) => {
                let (d_in, d_out) = mask.shape();
                assert_eq!(shape, &vec![d_out, d_in]);
                let zeros = values.iter().filter(|v| **v == 0.0).count();
                assert_eq!(zeros, mask.count_pruned(), "{name}: zeros = pruned entries");
                for o in 0..d_out {
                    for i in 0..d_in {
                        if !mask.get(i, o).unwrap() {
                            assert_eq!(values[o * d_in + i], 0.0);
                        }
                    }
                }
                if let Some((n, m)) = expect_nm {
                    assert!(ressa_sparse::is_n_m(mask, n, m), "{name}");
                }
            }
        }
    }
    // The output is a model directory again.
    let inspect = ressa(&["inspect", "--json", "--model", s(out_dir)]);
    assert!(
        inspect.status.success(),
        "{}",
        String::from_utf8_lossy(&inspect.stderr)
    );
    report
}

#[test]
fn wanda_prunes_vision_and_language_exactly() {
    let (_t, out_dir, out) = prune(
        "tests/fixtures/models/instructblip-t5-a",
        &["--method", "wanda", "--sparsity", "0.5"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = check_pruned("tests/fixtures/models/instructblip-t5-a", &out_dir, None);
    for layer in report["layers"].as_array().unwrap() {
        let name = layer["name"].as_str().unwrap();
        assert!(
            !name.starts_with("qformer"),
            "the Q-Former stays dense by default"
        );
        // Per-output groups (language) prune floor(0.5 d_in) per output; per-matrix (vision)
        // floor(0.5 numel): both exactly 0.5 for these even sizes... or within one entry.
        let got = layer["sparsity"].as_f64().unwrap();
        let [d_in, d_out] = [
            layer["shape"][0].as_u64().unwrap() as f64,
            layer["shape"][1].as_u64().unwrap() as f64,
        ];
        let expected = if name.starts_with("vision") {
            (0.5 * d_in * d_out).floor() / (d_in * d_out)
        } else {
            (0.5 * d_in).floor() / d_in
        };
        assert!(
            (got - expected).abs() < 1e-12,
            "{name}: {got} vs {expected}"
        );
    }
    assert_eq!(report["calibration_samples"], 4);
    let per_layer = check_stack_linears("tests/fixtures/models/instructblip-t5-a", &out_dir);
    assert_eq!(per_layer.len(), 8 + 36);
    for (name, (zeros, numel, d_out, rows)) in &per_layer {
        let d_in = numel / d_out;
        if name.starts_with("vision") {
            // Per matrix: floor(0.5 · numel) zeros.
            assert_eq!(*zeros, numel / 2, "{name}: zeros in model.safetensors");
        } else {
            // Per output: floor(0.5 · d_in) zeros in every row.
            assert!(
                rows.iter().all(|&z| z == d_in / 2),
                "{name}: zeros per output row {rows:?}, expected {} each",
                d_in / 2
            );
        }
    }
}

/// The 2-D weights of the fixture's vision and language stacks (every one a prunable linear;
/// T5's `relative_attention_bias` is an embedding), by tower.
fn stack_linears(src: &str) -> BTreeMap<String, &'static str> {
    tensors(&repo(src))
        .into_iter()
        .filter(|(k, (shape, _))| shape.len() == 2 && !k.contains("relative_attention_bias"))
        .filter_map(|(k, _)| {
            if k.starts_with("vision_model.encoder.layers.") {
                Some((k, "vision"))
            } else if k.starts_with("language_model.encoder.block.")
                || k.starts_with("language_model.decoder.block.")
            {
                Some((k, "language"))
            } else {
                None
            }
        })
        .collect()
}

/// Exactly the vision and language stack linears were pruned (counted from the source's keys),
/// the masks file lists exactly those, and each mask equals the zero pattern of the written
/// weight. Returns per layer `(zeros, numel, d_out, zeros per output row)` measured from the
/// written `model.safetensors`.
fn check_stack_linears(
    src: &str,
    out_dir: &Path,
) -> BTreeMap<String, (usize, usize, usize, Vec<usize>)> {
    let expected = stack_linears(src);
    let count = |t: &str| expected.values().filter(|v| **v == t).count();
    // The tiny T5 fixture: ViT 2 × (qkv, projection, fc1, fc2); T5 encoder 2 × 7, decoder 2 × 11.
    assert_eq!(count("vision"), 8, "{expected:?}");
    assert_eq!(count("language"), 2 * 7 + 2 * 11, "{expected:?}");
    let before = tensors(&repo(src));
    let after = tensors(out_dir);
    let masks = ressa_sparse::sidecar::read_masks(out_dir.join("masks.safetensors")).unwrap();
    assert_eq!(
        masks.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "masks.safetensors must list exactly the stack linears"
    );
    let mut out = BTreeMap::new();
    for name in expected.keys() {
        let (shape, values) = &after[name];
        let (d_out, d_in) = (shape[0], shape[1]);
        assert!(
            before[name].1.iter().all(|v| *v != 0.0),
            "{name}: the dense fixture has no exact zeros"
        );
        let mask = &masks[name];
        assert_eq!(mask.shape(), (d_in, d_out), "{name}");
        let mut rows = vec![0usize; d_out];
        for o in 0..d_out {
            for i in 0..d_in {
                let v = values[o * d_in + i];
                assert_eq!(
                    mask.get(i, o).unwrap(),
                    v != 0.0,
                    "{name}[{o}, {i}]: mask and zero pattern differ"
                );
                if v == 0.0 {
                    rows[o] += 1;
                } else {
                    assert_eq!(
                        v,
                        before[name].1[o * d_in + i],
                        "{name}: kept value changed"
                    );
                }
            }
        }
        let zeros = rows.iter().sum();
        assert!(zeros > 0, "{name} was not pruned");
        out.insert(name.clone(), (zeros, d_in * d_out, d_out, rows));
    }
    out
}

/// `--allocation owl` reaches the pruner: measured from the written weights, the two blocks of
/// every stack get OWL's sparsities. With two blocks OWL's normalised ratios are 0 and 2λ, so
/// (whatever the outlier ratios, if they differ) the targets are exactly `S − λ` and `S + λ`:
/// the block sparsities differ, average S, and each matches sparsity.json's per-layer target.
#[test]
fn owl_allocation_reaches_the_weights() {
    let model = "tests/fixtures/models/instructblip-t5-a";
    let (sparsity, lambda) = (0.5, 0.08);
    let (_t, out_dir, out) = prune(
        model,
        &[
            "--method",
            "wanda",
            "--sparsity",
            "0.5",
            "--allocation",
            "owl",
            "--owl-lambda",
            "0.08",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let per_layer = check_stack_linears(model, &out_dir);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("sparsity.json")).unwrap())
            .unwrap();
    let targets: BTreeMap<&str, f64> = report["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["name"].as_str().unwrap(), l["target"].as_f64().unwrap()))
        .collect();
    // Per block: zeros, weights, the OWL target of each of its layers.
    type Block = (usize, usize, Vec<f64>);
    let mut blocks: BTreeMap<&str, BTreeMap<usize, Block>> = BTreeMap::new();
    for (name, (zeros, numel, d_out, rows)) in &per_layer {
        let d_in = numel / d_out;
        let (stack, rest) = [
            "vision_model.encoder.layers.",
            "language_model.encoder.block.",
            "language_model.decoder.block.",
        ]
        .iter()
        .find_map(|p| name.strip_prefix(p).map(|r| (*p, r)))
        .unwrap();
        let b: usize = rest.split('.').next().unwrap().parse().unwrap();
        let target = targets[name.as_str()];
        // Each linear, measured: its block's target within one weight per matrix (vision,
        // per-matrix groups) or per output row (language, per-output groups).
        if stack.starts_with("vision") {
            assert_eq!(*zeros, (target * *numel as f64).floor() as usize, "{name}");
        } else {
            let want = (target * d_in as f64).floor() as usize;
            assert!(
                rows.iter().all(|&z| z == want),
                "{name}: {rows:?} vs {want}"
            );
        }
        let e = blocks.entry(stack).or_default().entry(b).or_default();
        e.0 += zeros;
        e.1 += numel;
        e.2.push(target);
    }
    assert_eq!(blocks.len(), 3);
    for (stack, bs) in &blocks {
        assert_eq!(bs.len(), 2, "{stack}");
        let mut measured = Vec::new();
        for (b, (zeros, numel, ts)) in bs {
            assert!(
                ts.iter().all(|t| t == &ts[0]),
                "{stack}{b}: one target per block {ts:?}"
            );
            let m = *zeros as f64 / *numel as f64;
            // Within one weight per row of each of its linears (the floor of each group).
            let slack: usize = per_layer
                .iter()
                .filter(|(n, _)| n.starts_with(&format!("{stack}{b}.")))
                .map(|(_, (_, _, d_out, _))| *d_out)
                .sum();
            assert!(
                (m - ts[0]).abs() <= slack as f64 / *numel as f64,
                "{stack}{b}: measured {m} vs OWL target {}",
                ts[0]
            );
            measured.push((m, ts[0], slack as f64 / *numel as f64));
        }
        let (lo, hi) = if measured[0].1 < measured[1].1 {
            (measured[0], measured[1])
        } else {
            (measured[1], measured[0])
        };
        // Independent of the tool's report: OWL with two blocks gives S ∓ λ.
        assert!(
            (lo.1 - (sparsity - lambda)).abs() < 1e-9 && (hi.1 - (sparsity + lambda)).abs() < 1e-9,
            "{stack}: targets {} and {}, expected {} and {}",
            lo.1,
            hi.1,
            sparsity - lambda,
            sparsity + lambda
        );
        assert!(
            hi.0 - lo.0 > lambda,
            "{stack}: measured block sparsities {} and {} are not OWL's spread",
            lo.0,
            hi.0
        );
        // The mean of the measured block sparsities is S within one weight per group.
        let mean = (lo.0 + hi.0) / 2.0;
        assert!(
            (mean - sparsity).abs() <= (lo.2 + hi.2) / 2.0,
            "{stack}: mean measured sparsity {mean} vs {sparsity}"
        );
    }
    println!(
        "OWL blocks (measured sparsity, target): {:?}",
        blocks
            .iter()
            .map(|(s, bs)| (
                *s,
                bs.values()
                    .map(|(z, n, t)| (*z as f64 / *n as f64, t[0]))
                    .collect::<Vec<_>>()
            ))
            .collect::<Vec<_>>()
    );
}

#[test]
fn sparsegpt_two_four_language_only_and_magnitude_without_data() {
    let (_t, out_dir, out) = prune(
        "tests/fixtures/models/blip2-t5",
        &["--method", "sparsegpt", "--pattern", "2:4", "--vision", "0"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = check_pruned("tests/fixtures/models/blip2-t5", &out_dir, Some((2, 4)));
    assert!(
        report["layers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["name"].as_str().unwrap().starts_with("language_model"))
    );

    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("mag");
    let src = repo("tests/fixtures/models/instructblip-t5-b");
    let out = ressa(&[
        "prune",
        "--model",
        s(&src),
        "--method",
        "magnitude",
        "--sparsity",
        "0.7",
        "--qformer",
        "0.3",
        "--out",
        s(&out_dir),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = check_pruned("tests/fixtures/models/instructblip-t5-b", &out_dir, None);
    assert!(report["towers"]["qformer"]["sparsity"].as_f64().unwrap() > 0.25);
    // The source used the hub's sharded layout; the output keeps it.
    assert!(out_dir.join("model.safetensors.index.json").exists());
}

fn assert_fails(out: &Output, needle: &str, out_dir: &Path) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains(needle), "{stderr}");
    assert!(!out_dir.exists(), "no output directory may be left behind");
    let parent = out_dir.parent().unwrap();
    assert_eq!(
        std::fs::read_dir(parent).unwrap().count(),
        0,
        "no temporary directory left behind"
    );
}

#[test]
fn bad_settings_fail_cleanly_without_output() {
    let model = "tests/fixtures/models/instructblip-t5-a";
    let (_t, d, out) = prune(model, &["--method", "wanda", "--sparsity", "1.0"]);
    assert_fails(&out, "--sparsity 1", &d);
    let (_t, d, out) = prune(model, &["--method", "wanda", "--sparsity=-0.1"]);
    assert_fails(&out, "--sparsity -0.1", &d);
    // The tiny ViT's MLP has 37 hidden units: 2:4 cannot tile fc2's inputs.
    let (_t, d, out) = prune(model, &["--method", "wanda", "--pattern", "2:4"]);
    assert_fails(&out, "vision_model.encoder.layers.0.mlp.fc2.weight", &d);
    let (_t, d, out) = prune(model, &["--method", "obs", "--sparsity", "0.5"]);
    assert_fails(&out, "--method", &d);

    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let empty = tmp.path().join("empty.json");
    std::fs::write(&empty, "[]").unwrap();
    let out_dir = work.join("out");
    let m = repo(model);
    let out = ressa(&[
        "prune",
        "--model",
        s(&m),
        "--method",
        "wanda",
        "--sparsity",
        "0.5",
        "--calibration",
        s(&empty),
        "--images",
        s(tmp.path()),
        "--out",
        s(&out_dir),
    ]);
    assert_fails(&out, "empty.json", &out_dir);
    let missing = tmp.path().join("missing.json");
    let out = ressa(&[
        "prune",
        "--model",
        s(&m),
        "--method",
        "wanda",
        "--sparsity",
        "0.5",
        "--calibration",
        s(&missing),
        "--images",
        s(tmp.path()),
        "--out",
        s(&out_dir),
    ]);
    assert_fails(&out, "missing.json", &out_dir);
    // An annotation pointing at a missing image.
    let bad = tmp.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"[{"image": "nope.png", "caption": "a red circle above a square"}]"#,
    )
    .unwrap();
    let out = ressa(&[
        "prune",
        "--model",
        s(&m),
        "--method",
        "sparsegpt",
        "--sparsity",
        "0.5",
        "--calibration",
        s(&bad),
        "--images",
        s(tmp.path()),
        "--samples",
        "1",
        "--out",
        s(&out_dir),
    ]);
    assert_fails(&out, "nope.png", &out_dir);
}

/// `ressa export`: a pruned model written as compressed-tensors `sparse-bitmask` is smaller,
/// annotated, loads in `ressa` with identical logits, and exports back to the same dense bytes.
/// (`scripts/check_bitmask_export.py` checks the same files with compressed-tensors itself.)
#[test]
fn export_bitmask_round_trips_and_loads() {
    let (tmp, pruned, out) = prune(
        "tests/fixtures/models/instructblip-t5-a",
        &["--method", "wanda", "--pattern", "2:4", "--vision", "0"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bm = tmp.path().join("bitmask");
    let out = ressa(&["export", s(&pruned), "--format", "bitmask", "--out", s(&bm)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The annotation names every masked linear; their dense weights are gone from the file.
    let masks = ressa_sparse::sidecar::read_masks(pruned.join("masks.safetensors")).unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bm.join("config.json")).unwrap()).unwrap();
    let sc = &config["quantization_config"]["sparsity_config"];
    assert_eq!(
        config["quantization_config"]["quant_method"],
        "compressed-tensors"
    );
    assert_eq!(sc["format"], "sparse-bitmask");
    assert_eq!(sc["sparsity_structure"], "2:4");
    assert!((sc["global_sparsity"].as_f64().unwrap() - 0.5).abs() < 1e-9);
    assert_eq!(sc["targets"].as_array().unwrap().len(), masks.len());
    let bytes = std::fs::read(bm.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for key in masks.keys() {
        let module = key.strip_suffix(".weight").unwrap();
        assert!(st.tensor(key).is_err(), "{key} still dense");
        for part in ["shape", "compressed", "bitmask", "row_offsets"] {
            assert!(
                st.tensor(&format!("{module}.{part}")).is_ok(),
                "{module}.{part}"
            );
        }
    }
    let dense_len = std::fs::metadata(pruned.join("model.safetensors"))
        .unwrap()
        .len();
    assert!((bytes.len() as u64) < dense_len);

    // Loads: the same logits as the dense pruned model.
    let inputs = repo("tests/fixtures/models/instructblip-t5-a/reference.safetensors");
    let logits = |model: &Path, name: &str| {
        let path = tmp.path().join(name);
        let out = ressa(&[
            "logits",
            "--model",
            s(model),
            "--inputs",
            s(&inputs),
            "--out",
            s(&path),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read(path).unwrap()
    };
    assert_eq!(
        logits(&pruned, "a.safetensors"),
        logits(&bm, "b.safetensors")
    );

    // Back to dense: byte-identical weights, no annotation.
    let dense = tmp.path().join("dense");
    let out = ressa(&["export", s(&bm), "--format", "dense", "--out", s(&dense)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(dense.join("model.safetensors")).unwrap(),
        std::fs::read(pruned.join("model.safetensors")).unwrap()
    );
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dense.join("config.json")).unwrap()).unwrap();
    assert!(config.get("quantization_config").is_none());

    // Bad input: a non-empty output, a mask naming no weight; one line, nothing written.
    let clean = tmp.path().join("clean");
    std::fs::create_dir(&clean).unwrap();
    let never = clean.join("never");
    let out = ressa(&["export", s(&pruned), "--format", "bitmask", "--out", s(&bm)]);
    assert_fails(&out, "not empty", &never);
    let broken = tmp.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    for entry in std::fs::read_dir(&pruned).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, broken.join(p.file_name().unwrap())).unwrap();
        }
    }
    let mut renamed = masks.clone();
    let (k, m) = renamed.pop_first().unwrap();
    renamed.insert(format!("{k}.nope"), m);
    ressa_sparse::sidecar::write_masks(
        broken.join("masks.safetensors"),
        renamed.iter().map(|(k, m)| (k.as_str(), m)),
    )
    .unwrap();
    let out = ressa(&[
        "export",
        s(&broken),
        "--format",
        "bitmask",
        "--out",
        s(&never),
    ]);
    assert_fails(&out, "names no tensor", &never);
}
