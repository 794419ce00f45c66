//! Loading, saving and config behaviour: full-size parameter counts, the relative position
//! buckets, round trips in the source layout, and one-line errors for bad checkpoints.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use burn::prelude::*;
use common::{B, fixture};
use ressa_models::pretrained::{parameter_counts, write_random_checkpoint};
use ressa_models::t5::relative_position_bucket;
use ressa_models::weights::WeightStore;
use ressa_models::{
    FamilyVisitor, InstructBlipConfig, InstructBlipLlama, InstructBlipT5, LlamaConfig, Pretrained,
    T5Config, VisionLanguageModel, visit_family,
};

type T5Blip = InstructBlipT5<B>;

/// Loads any registered family from `src` and saves it to `out`.
struct SaveCopy<'a> {
    src: &'a Path,
    out: &'a Path,
}

impl FamilyVisitor<B> for SaveCopy<'_> {
    type Output = ressa_models::Result<()>;
    fn visit<M: VisionLanguageModel<B>>(self, config: M::Config) -> Self::Output {
        let model = Pretrained::<B, M>::load_with(self.src, config, &Default::default())?;
        model.save(self.out)
    }
}

fn save_copy(src: &Path, out: &Path) -> ressa_models::Result<()> {
    visit_family::<B, _>(&src.join("config.json"), SaveCopy { src, out })?
}

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

#[test]
fn relative_position_buckets_match_transformers() {
    let text = std::fs::read_to_string(fixture("../models/t5_relative_buckets.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let rel: Vec<i64> = serde_json::from_value(json["relative_position"].clone()).unwrap();
    for (nb, md) in [(32, 128), (16, 20), (8, 16)] {
        for bidir in [true, false] {
            let key = format!(
                "{nb}_{md}_{}",
                if bidir { "bidirectional" } else { "causal" }
            );
            let expected: Vec<usize> = serde_json::from_value(json[&key].clone()).unwrap();
            for (r, e) in rel.iter().zip(&expected) {
                assert_eq!(
                    relative_position_bucket(*r, bidir, nb, md),
                    *e,
                    "{key} at {r}"
                );
            }
        }
    }
}

#[test]
fn full_size_instructblip_flan_t5_xl_counts_match_transformers() {
    let dir = repo("configs/models/instructblip-flan-t5-xl");
    let cfg = InstructBlipConfig::<T5Config>::from_file(&dir.join("config.json")).unwrap();
    let ours = parameter_counts::<B, T5Blip>(&cfg, &Default::default()).unwrap();
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("param_counts.json")).unwrap())
            .unwrap();
    let expected: BTreeMap<String, usize> =
        serde_json::from_value(reference["counts"].clone()).unwrap();
    assert_eq!(ours, expected);
    let total: usize = ours.values().sum();
    assert!((4_000_000_000..4_100_000_000).contains(&total), "{total}");
}

#[test]
fn full_size_instructblip_vicuna_7b_counts_match_transformers() {
    let dir = repo("configs/models/instructblip-vicuna-7b");
    let cfg = InstructBlipConfig::<LlamaConfig>::from_file(&dir.join("config.json")).unwrap();
    let l = &cfg.text;
    assert_eq!(
        (l.hidden_size, l.num_hidden_layers, l.kv_heads(), l.theta()),
        (4096, 32, 32, 10000.0)
    );
    let ours = parameter_counts::<B, InstructBlipLlama<B>>(&cfg, &Default::default()).unwrap();
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("param_counts.json")).unwrap())
            .unwrap();
    let expected: BTreeMap<String, usize> =
        serde_json::from_value(reference["counts"].clone()).unwrap();
    assert_eq!(ours, expected);
    let total: usize = ours.values().sum();
    assert!((7_800_000_000..8_000_000_000).contains(&total), "{total}");
}

fn tensors_of(dir: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let store = WeightStore::open_dir(dir).unwrap();
    let mut keys: Vec<String> = store.keys().cloned().collect();
    keys.sort();
    keys.into_iter()
        .map(|k| {
            let (shape, _) = store.info(&k).unwrap();
            let t = store.get(&k, &shape).unwrap();
            (k, (shape, t.data))
        })
        .collect()
}

/// Every fixture model directory (each with a `config.json`), sorted by name.
fn all_fixtures() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixture(""))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("config.json").is_file())
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn save_reproduces_every_tensor_in_the_source_layout() {
    let _device: common::Dev = Default::default();
    let names = all_fixtures();
    // The list is read from disk; make sure it is not silently short.
    for expected in [
        "instructblip-t5-a",
        "instructblip-t5-b",
        "blip2-t5",
        "instructblip-t5-untied",
        "instructblip-llama-gqa",
        "instructblip-llama-mha",
        "llava-gqa",
        "llava-hub",
    ] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing");
    }
    for name in &names {
        let src = fixture(name);
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("saved");
        save_copy(&src, &out).unwrap();
        assert_eq!(tensors_of(&src), tensors_of(&out), "{name}");
        // Exactly the source's keys, each in the same file with the same dtype, shape and bytes.
        let (before, after) = (common::raw_tensors(&src), common::raw_tensors(&out));
        assert_eq!(
            before.keys().collect::<Vec<_>>(),
            after.keys().collect::<Vec<_>>(),
            "{name}: key set"
        );
        for (k, t) in &before {
            assert!(&after[k] == t, "{name}: {k} not byte-identical");
        }
        let files = |d: &Path| {
            let mut v: Vec<String> = walk(d)
                .into_iter()
                .map(|p| p.strip_prefix(d).unwrap().display().to_string())
                .collect();
            v.sort();
            v
        };
        assert_eq!(files(&src), files(&out), "{name}: same files");
        // No temporary directory left beside the output.
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
        // Saving again onto a non-empty directory is refused.
        assert!(
            save_copy(&src, &out)
                .unwrap_err()
                .to_string()
                .contains("not empty")
        );
    }
}

fn walk(d: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Copies a fixture into a temporary directory so a test can damage it.
fn scratch_copy(name: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for p in walk(&fixture(name)) {
        let rel = p.strip_prefix(fixture(name)).unwrap();
        let to = dst.join(rel);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&p, &to).unwrap();
    }
    (tmp, dst)
}

fn load_err(dir: &Path) -> String {
    let err = match visit_family::<B, _>(
        &dir.join("config.json"),
        SaveCopy {
            src: dir,
            out: &dir.join("never-written"),
        },
    ) {
        Ok(r) => r.unwrap_err(),
        Err(e) => e,
    }
    .to_string();
    assert!(!err.contains('\n'), "one line: {err}");
    err
}

#[test]
fn missing_weights_file_is_named() {
    let (_t, dir) = scratch_copy("instructblip-t5-a");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let err = load_err(&dir);
    assert!(
        err.contains("model.safetensors") && err.contains("no model.safetensors"),
        "{err}"
    );
}

#[test]
fn truncated_weights_file_is_named() {
    let (_t, dir) = scratch_copy("instructblip-t5-a");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(&dir);
    assert!(
        err.contains("model.safetensors") && err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn missing_shard_is_named() {
    let (_t, dir) = scratch_copy("instructblip-t5-b");
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let err = load_err(&dir);
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
}

/// Shard names of the index stay inside the model directory: `../x`, absolute paths and
/// subdirectories are refused before anything is opened.
#[test]
fn shard_names_outside_the_directory_are_refused() {
    for bad in [
        "../model-00002-of-00002.safetensors",
        "/etc/passwd",
        "sub/x.safetensors",
        "..",
    ] {
        let (_t, dir) = scratch_copy("instructblip-t5-b");
        let index = dir.join("model.safetensors.index.json");
        let text = std::fs::read_to_string(&index).unwrap();
        let text = text.replacen(
            "\"model-00002-of-00002.safetensors\"",
            &format!("{:?}", bad),
            1,
        );
        std::fs::write(&index, text).unwrap();
        let err = load_err(&dir);
        assert!(
            err.contains("model.safetensors.index.json")
                && err.contains("weight_map")
                && err.contains(bad),
            "{bad}: {err}"
        );
    }
}

/// Rewrites model.safetensors of a copy with `edit` applied to its tensor map.
fn edit_weights(dir: &Path, edit: impl FnOnce(&mut BTreeMap<String, (Vec<usize>, Vec<f32>)>)) {
    let mut tensors = tensors_of(dir);
    edit(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView)> = Vec::new();
    drop(views);
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(k, (s, d))| {
            (
                k.clone(),
                d.iter().flat_map(|v| v.to_le_bytes()).collect(),
                s.clone(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(k, b, s)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

#[test]
fn missing_key_is_named() {
    let (_t, dir) = scratch_copy("instructblip-t5-a");
    let key = "language_model.decoder.block.1.layer.1.EncDecAttention.k.weight";
    edit_weights(&dir, |t| {
        t.remove(key);
    });
    let err = load_err(&dir);
    assert!(
        err.contains("model.safetensors") && err.contains(key) && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn shape_mismatch_is_named() {
    let (_t, dir) = scratch_copy("instructblip-t5-a");
    let key = "qformer.encoder.layer.0.crossattention.attention.key.weight";
    edit_weights(&dir, |t| {
        let e = t.get_mut(key).unwrap();
        e.0 = vec![e.0[1], e.0[0]];
    });
    let err = load_err(&dir);
    assert!(
        err.contains(key) && err.contains("[24, 32]") && err.contains("[32, 24]"),
        "{err}"
    );
}

#[test]
fn unknown_model_type_is_named() {
    let (_t, dir) = scratch_copy("instructblip-t5-a");
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\"instructblip\"", "\"llava_next\"");
    std::fs::write(&path, text).unwrap();
    let err = load_err(&dir);
    assert!(
        err.contains("config.json") && err.contains("model_type") && err.contains("llava_next"),
        "{err}"
    );
}

#[test]
fn malformed_config_reports_line_and_column() {
    let (_t, dir) = scratch_copy("instructblip-t5-a");
    std::fs::write(
        dir.join("config.json"),
        "{\n  \"model_type\": \"instructblip\",\n  oops\n}",
    )
    .unwrap();
    let err = load_err(&dir);
    assert!(
        err.contains("config.json") && err.contains("line 3"),
        "{err}"
    );
}

#[test]
fn half_precision_checkpoints_load_and_save_back_in_their_dtype() {
    let (_t, dir) = scratch_copy("instructblip-t5-a");
    // Rewrite as bf16 and check the logits stay close and the saved file keeps bf16.
    let tensors = tensors_of(&dir);
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(k, (s, d))| {
            (
                k.clone(),
                d.iter()
                    .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                    .collect(),
                s.clone(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(k, b, s)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let model = Pretrained::<B, T5Blip>::load(&dir, &Default::default()).unwrap();
    let out = dir.parent().unwrap().join("saved");
    model.save(&out).unwrap();
    let store = WeightStore::open_dir(&out).unwrap();
    let (_, dtype) = store.info("query_tokens").unwrap();
    assert_eq!(dtype, safetensors::Dtype::BF16);
    assert_eq!(tensors_of(&dir), tensors_of(&out));
    let _: Tensor<B, 3> = model.model.query_tokens.val();
}

#[test]
fn random_checkpoints_load_with_every_tensor_present() {
    let device = Default::default();
    let tmp = tempfile::tempdir().unwrap();
    let mut json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("instructblip-t5-a").join("config.json")).unwrap(),
    )
    .unwrap();
    json["text_config"]["tie_word_embeddings"] = false.into();
    let config_path = tmp.path().join("config.json");
    std::fs::write(&config_path, serde_json::to_string(&json).unwrap()).unwrap();
    let cfg = InstructBlipConfig::<T5Config>::from_file(&config_path).unwrap();
    write_random_checkpoint::<B, T5Blip>(&cfg, tmp.path(), 7, 0.1, &device).unwrap();
    let model = Pretrained::<B, T5Blip>::load(tmp.path(), &device).unwrap();
    let counts = parameter_counts::<B, T5Blip>(&cfg, &device).unwrap();
    // The untied lm_head is in the file (the config says untied), the fused qkv bias too.
    assert_eq!(model.model.num_params(), counts.values().sum::<usize>());
    let store = WeightStore::open_dir(tmp.path()).unwrap();
    let norm = store
        .get("vision_model.post_layernorm.weight", &[24])
        .unwrap();
    assert!(norm.data.iter().all(|&v| v == 1.0));
    let w = store
        .get("language_model.lm_head.weight", &[60, 40])
        .unwrap();
    assert!(w.data.iter().all(|v| v.abs() <= 0.1) && w.data.iter().any(|&v| v != 0.0));
}

/// A weight stored in compressed-tensors' `sparse-bitmask` layout loads as the dense weight it
/// encodes (the model's logits-relevant tensors equal), and a broken group is named.
#[test]
fn bitmask_compressed_weights_load_and_broken_groups_are_named() {
    use ressa_sparse::formats::{BitmaskWeight, ValueDtype};
    let key = "language_model.encoder.block.0.layer.0.SelfAttention.q.weight";
    let write = |dir: &Path, drop_part: Option<&str>, bad_offsets: bool| {
        let mut tensors = tensors_of(dir);
        let (shape, w) = tensors.remove(key).unwrap();
        let (d_out, d_in) = (shape[0], shape[1]);
        // Prune every other weight, then pack in burn order [d_in, d_out].
        let mut burn = vec![0f32; d_in * d_out];
        for j in 0..d_out {
            for i in 0..d_in {
                if (i + j) % 2 == 0 {
                    burn[i * d_out + j] = w[j * d_in + i];
                }
            }
        }
        let packed = BitmaskWeight::from_dense(&burn, d_in, d_out).unwrap();
        let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = tensors
            .iter()
            .map(|(k, (s, d))| {
                let b = d.iter().flat_map(|v| v.to_le_bytes()).collect();
                (k.clone(), safetensors::Dtype::F32, s.clone(), b)
            })
            .collect();
        for t in packed.to_tensors(key, ValueDtype::F32).unwrap() {
            if drop_part.is_some_and(|p| t.name.ends_with(p)) {
                continue;
            }
            let mut data = t.data;
            if bad_offsets && t.name.ends_with(".row_offsets") {
                data[8] = data[8].wrapping_add(1);
            }
            owned.push((t.name, t.dtype, t.shape, data));
        }
        let views: Vec<(String, safetensors::tensor::TensorView)> = owned
            .iter()
            .map(|(k, dt, s, b)| {
                let v = safetensors::tensor::TensorView::new(*dt, s.clone(), b).unwrap();
                (k.clone(), v)
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
        burn
    };

    let (_t, dir) = scratch_copy("instructblip-t5-a");
    let burn = write(&dir, None, false);
    let store = WeightStore::open_dir(&dir).unwrap();
    assert!(store.is_compressed(key) && store.contains(key));
    let (shape, _) = store.info(key).unwrap();
    let got = store.get(key, &shape).unwrap().data;
    let (d_out, d_in) = (shape[0], shape[1]);
    for j in 0..d_out {
        for i in 0..d_in {
            assert_eq!(got[j * d_in + i], burn[i * d_out + j]);
        }
    }
    Pretrained::<B, T5Blip>::load(&dir, &Default::default()).unwrap();

    let module = key.strip_suffix(".weight").unwrap();
    let (_t, dir) = scratch_copy("instructblip-t5-a");
    write(&dir, Some(".row_offsets"), false);
    let err = load_err(&dir);
    assert!(err.contains(&format!("{module}.row_offsets")), "{err}");

    let (_t, dir) = scratch_copy("instructblip-t5-a");
    write(&dir, None, true);
    let err = load_err(&dir);
    assert!(err.contains(key) && err.contains("row_offsets"), "{err}");
}

/// `write_initial_checkpoint_with`: a named tensor gets the σ asked for (the others keep
/// their config's), and a name the model does not have is refused in one line.
#[test]
fn initial_checkpoint_takes_per_tensor_init_std() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cfg = <T5Blip as VisionLanguageModel<B>>::Config::from_file(
        &root.join("configs/models/shapes-paper/config.json"),
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let key = "vision_model.embeddings.position_embedding";
    let init = BTreeMap::from([(key.to_string(), 5.0f32)]);
    ressa_models::pretrained::write_initial_checkpoint_with::<B, ressa_models::InstructBlipT5<B>>(
        &cfg,
        tmp.path(),
        0,
        safetensors::Dtype::F32,
        &init,
        &Default::default(),
    )
    .unwrap();
    let bytes = std::fs::read(tmp.path().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let std_of = |name: &str| {
        let v: Vec<f64> = st
            .tensor(name)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect();
        (v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64).sqrt()
    };
    // 10 × 48 values: within 15 %
    assert!((std_of(key) / 5.0 - 1.0).abs() < 0.15, "{}", std_of(key));
    let other = std_of("vision_model.embeddings.patch_embedding.weight");
    assert!((other / 0.1 - 1.0).abs() < 0.1, "{other}");
    let bad = BTreeMap::from([("vision_model.nope".to_string(), 1.0f32)]);
    let e = ressa_models::pretrained::write_initial_checkpoint_with::<
        B,
        ressa_models::InstructBlipT5<B>,
    >(
        &cfg,
        tmp.path(),
        0,
        safetensors::Dtype::F32,
        &bad,
        &Default::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("vision_model.nope") && e.lines().count() == 1,
        "{e}"
    );
}
