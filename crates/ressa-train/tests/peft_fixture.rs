//! `ressa repair`'s PEFT adapter files mean to PEFT what they mean to ressa.
//!
//! `tests/fixtures/peft/instructblip-t5-a/` holds the `adapters/` a short repair of the dense
//! fixture `instructblip-t5-a` wrote, and `peft_logits.safetensors`: the logits of the dense
//! model with those adapters attached by `peft.PeftModel.from_pretrained` and merged by
//! `merge_and_unload` (`scripts/check_peft_adapters.py`, which also failed on any missing or
//! unexpected adapter key). PEFT merges W + s·B·A without ressa's mask, so the test does the
//! same: it recomputes W + s·B·A on the host from the committed tensors, loads a model with
//! those weights and compares its logits with PEFT's.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::prelude::*;
use ressa_models::vlm::logits;
use ressa_models::{InstructBlipT5, Pretrained, VlmInputs};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

type B = Flex;

const TOL: f32 = 1e-4;
const DENSE: &str = "tests/fixtures/models/instructblip-t5-a";

fn repo(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(p)
}

fn peft_dir() -> PathBuf {
    repo("tests/fixtures/peft/instructblip-t5-a")
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn f32s(st: &SafeTensors<'_>, key: &str) -> (Vec<usize>, Vec<f32>) {
    let t = st
        .tensor(key)
        .unwrap_or_else(|_| panic!("no tensor `{key}`"));
    assert_eq!(t.dtype(), Dtype::F32, "{key}");
    let v = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (t.shape().to_vec(), v)
}

fn i64s(st: &SafeTensors<'_>, key: &str) -> (Vec<usize>, Vec<i64>) {
    let t = st
        .tensor(key)
        .unwrap_or_else(|_| panic!("no tensor `{key}`"));
    assert_eq!(t.dtype(), Dtype::I64, "{key}");
    let v = t
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (t.shape().to_vec(), v)
}

fn config() -> Value {
    serde_json::from_slice(&read(&peft_dir().join("adapters/adapter_config.json"))).unwrap()
}

/// One adapted module as the committed files describe it.
struct Module {
    name: String,
    rank: usize,
    scale: f64,
}

/// Target modules with the rank and scale PEFT gives them: `rank_pattern[name]` (else `r`) and
/// `alpha_pattern[name]` (else `lora_alpha`) over the rank (no rsLoRA).
fn modules(cfg: &Value) -> Vec<Module> {
    cfg["target_modules"]
        .as_array()
        .expect("target_modules is a list")
        .iter()
        .map(|t| {
            let name = t.as_str().unwrap().to_string();
            let rank = cfg["rank_pattern"]
                .get(&name)
                .unwrap_or(&cfg["r"])
                .as_u64()
                .unwrap() as usize;
            let alpha = cfg["alpha_pattern"]
                .get(&name)
                .unwrap_or(&cfg["lora_alpha"])
                .as_f64()
                .unwrap();
            Module {
                name,
                rank,
                scale: alpha / rank as f64,
            }
        })
        .collect()
}

#[test]
fn adapter_files_have_peft_layout() {
    let cfg = config();
    // The fields PEFT's LoraConfig reads, with the values that make PEFT's LoRA ressa's.
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["base_model_name_or_path"], DENSE);
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_alpha"].as_f64(), Some(16.0));
    assert_eq!(cfg["lora_dropout"].as_f64(), Some(0.0));
    assert_eq!(cfg["bias"], "none");
    assert_eq!(cfg["fan_in_fan_out"], false);
    assert!(
        cfg.get("use_rslora").is_none_or(|v| v == false),
        "rsLoRA would change PEFT's scaling"
    );
    let targets: BTreeSet<&str> = cfg["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(targets.len(), 76, "distinct target modules");
    for pattern in ["rank_pattern", "alpha_pattern"] {
        let keys: BTreeSet<&str> = cfg[pattern]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, targets, "{pattern} keys");
    }
    let ranks: BTreeSet<u64> = cfg["rank_pattern"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(ranks, BTreeSet::from([2, 4, 8]), "rank_pattern ranks");
    let sparse: BTreeSet<&str> = cfg["ressa"]["sparse_lora"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(sparse.len(), 44);
    assert!(sparse.is_subset(&targets));

    let dense = read(&repo(DENSE).join("model.safetensors"));
    let dense = SafeTensors::deserialize(&dense).unwrap();
    let bytes = read(&peft_dir().join("adapters/adapter_model.safetensors"));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut expected = BTreeSet::new();
    for m in modules(&cfg) {
        // Every target is a Linear of the dense checkpoint: weight [d_out, d_in].
        let w = dense
            .tensor(&format!("{}.weight", m.name))
            .unwrap_or_else(|_| panic!("{}: no dense weight", m.name));
        let [d_out, d_in] = w.shape() else {
            panic!("{}: weight shape {:?}", m.name, w.shape())
        };
        let a = format!("base_model.model.{}.lora_A.weight", m.name);
        let b = format!("base_model.model.{}.lora_B.weight", m.name);
        let (sa, _) = f32s(&st, &a);
        let (sb, _) = f32s(&st, &b);
        assert_eq!(sa, [m.rank, *d_in], "{a}");
        assert_eq!(sb, [*d_out, m.rank], "{b}");
        assert!(m.scale > 0.0, "{}", m.name);
        expected.insert(a);
        expected.insert(b);
    }
    let names: BTreeSet<String> = st.names().into_iter().map(String::from).collect();
    assert_eq!(names, expected, "adapter tensor keys");
}

/// The fixture's reference inputs, as `crates/ressa-models/tests/parity.rs` reads them.
fn inputs(st: &SafeTensors<'_>, device: &burn::backend::flex::FlexDevice) -> VlmInputs<B> {
    let int2 = |key: &str| -> Tensor<B, 2, Int> {
        let (shape, v) = i64s(st, key);
        Tensor::from_data(TensorData::new(v, shape), device)
    };
    let (shape, pixels) = f32s(st, "pixel_values");
    VlmInputs {
        pixel_values: Tensor::from_data(TensorData::new(pixels, shape), device),
        qformer_text: Some((
            int2("qformer_input_ids"),
            int2("qformer_attention_mask").float(),
        )),
        input_ids: int2("input_ids"),
        attention_mask: int2("attention_mask").float(),
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn peft_merged_weights_reproduce_peft_logits() {
    let cfg = config();
    let dense_dir = repo(DENSE);
    let dense_bytes = read(&dense_dir.join("model.safetensors"));
    let dense = SafeTensors::deserialize(&dense_bytes).unwrap();
    let adapter_bytes = read(&peft_dir().join("adapters/adapter_model.safetensors"));
    let adapters = SafeTensors::deserialize(&adapter_bytes).unwrap();

    // W + s·(B·A) for every adapted module, in PyTorch's [d_out, d_in] layout.
    let mut merged: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
    let mut largest_delta = 0f32;
    for m in modules(&cfg) {
        let key = format!("{}.weight", m.name);
        let (shape, mut w) = f32s(&dense, &key);
        let (d_out, d_in) = (shape[0], shape[1]);
        let (_, a) = f32s(
            &adapters,
            &format!("base_model.model.{}.lora_A.weight", m.name),
        );
        let (_, b) = f32s(
            &adapters,
            &format!("base_model.model.{}.lora_B.weight", m.name),
        );
        let s = m.scale as f32;
        for o in 0..d_out {
            for i in 0..d_in {
                let ba: f32 = (0..m.rank)
                    .map(|k| b[o * m.rank + k] * a[k * d_in + i])
                    .sum();
                largest_delta = largest_delta.max((s * ba).abs());
                w[o * d_in + i] += s * ba;
            }
        }
        let bytes = w.iter().flat_map(|x| x.to_le_bytes()).collect();
        merged.insert(key, (shape, bytes));
    }
    assert_eq!(merged.len(), 76);
    // A repair that left B at zero would make the comparison vacuous.
    assert!(largest_delta > 1e-3, "largest |s·B·A| {largest_delta}");

    // A temp copy of the dense fixture whose model.safetensors holds the merged weights.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("merged");
    copy_dir(&dense_dir, &dir);
    let views: Vec<(String, TensorView<'_>)> = dense
        .tensors()
        .into_iter()
        .map(|(name, view)| match merged.get(&name) {
            Some((shape, bytes)) => {
                let v = TensorView::new(Dtype::F32, shape.clone(), bytes).unwrap();
                (name, v)
            }
            None => (name, view),
        })
        .collect();
    let bytes = safetensors::serialize(views, None).unwrap();
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();

    let device = Default::default();
    let model = Pretrained::<B, InstructBlipT5<B>>::load(&dir, &device)
        .unwrap()
        .model;
    let reference = read(&dense_dir.join("reference.safetensors"));
    let reference = SafeTensors::deserialize(&reference).unwrap();
    let (dshape, dec) = i64s(&reference, "decoder_input_ids");
    let dec = Tensor::<B, 2, Int>::from_data(TensorData::new(dec, dshape), &device);
    let ours = logits(&model, &inputs(&reference, &device), Some(dec)).unwrap();
    let shape = ours.dims().to_vec();
    let ours = ours.into_data().convert::<f32>().into_vec::<f32>().unwrap();

    let peft = read(&peft_dir().join("peft_logits.safetensors"));
    let peft = SafeTensors::deserialize(&peft).unwrap();
    let (pshape, peft) = f32s(&peft, "logits");
    assert_eq!(shape, pshape, "logits shape");
    let diff = max_abs_diff(&ours, &peft);
    eprintln!("PEFT-merged logits: max abs diff {diff:.2e} (tolerance {TOL:.0e})");
    assert!(diff <= TOL, "logits differ from PEFT's by {diff}");

    // The adapters matter: the dense model's logits are far from PEFT's merged ones.
    let (_, dense_logits) = f32s(&reference, "logits");
    let moved = max_abs_diff(&dense_logits, &peft);
    eprintln!("dense vs PEFT-merged logits: max abs diff {moved:.2e}");
    assert!(
        moved > 100.0 * TOL,
        "adapters barely change the logits ({moved})"
    );
}

/// The writer itself: `write_peft_adapters` on the committed adapters' values writes the
/// committed files again, byte for byte (so a change to the layout, the orientation or the
/// config fields fails here, not only in PEFT).
#[test]
fn the_writer_reproduces_the_committed_files() {
    use ressa_models::prunable::Tower;
    use ressa_train::sparse_lora::{AdapterValues, write_peft_adapters};
    let cfg = config();
    let sparse: BTreeSet<String> = cfg["ressa"]["sparse_lora"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let bytes = read(&peft_dir().join("adapters/adapter_model.safetensors"));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let adapters: Vec<AdapterValues> = modules(&cfg)
        .into_iter()
        .map(|m| {
            let (sa, at) = f32s(&st, &format!("base_model.model.{}.lora_A.weight", m.name));
            let (sb, bt) = f32s(&st, &format!("base_model.model.{}.lora_B.weight", m.name));
            let (r, d_in, d_out) = (sa[0], sa[1], sb[0]);
            // Back to burn orientation: A [d_in, r], B [r, d_out].
            let mut a = vec![0f32; d_in * r];
            for k in 0..r {
                for i in 0..d_in {
                    a[i * r + k] = at[k * d_in + i];
                }
            }
            let mut b = vec![0f32; r * d_out];
            for j in 0..d_out {
                for k in 0..r {
                    b[k * d_out + j] = bt[j * r + k];
                }
            }
            let tower = if m.name.starts_with("vision_model.") {
                Tower::Vision
            } else if m.name.starts_with("qformer.") {
                Tower::QFormer
            } else {
                Tower::Language
            };
            AdapterValues {
                sparse: sparse.contains(&m.name),
                name: m.name,
                tower,
                d_in,
                d_out,
                rank: r,
                scale: m.scale,
                a,
                b,
            }
        })
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    write_peft_adapters(tmp.path(), &adapters, DENSE).unwrap();
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        assert!(
            read(&tmp.path().join(f)) == read(&peft_dir().join("adapters").join(f)),
            "{f}: the writer no longer produces the committed (PEFT-checked) file"
        );
    }
}
