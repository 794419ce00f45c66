//! SparseLoRA on a whole model (RESSA, reference notes §8): which linears get adapters, with
//! which rank, attached in place; merging them back with exactly the pruned zeros; the
//! adapters alone in PEFT's layout.
//!
//! The adapter math lives with the model's linear ([`ressa_models::linear`]); here we walk the
//! model's prunable blocks (the [`Prunable`] seam, so any architecture with that seam works).
//! The reference targets every prunable linear of each tower: ViT `qkv/proj/fc1/fc2` (r = 4),
//! T5 `q/k/v/o/wi_0/wi_1/wo` and LLaMA `q/k/v/o/gate/up/down_proj` (r = 8), Q-Former
//! `query/key/value/dense` (r = 2, plain LoRA unless the Q-Former was pruned), α = 16.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Param;
use burn::prelude::*;
use rand::Rng;
use ressa_data::rng::item_rng;
use ressa_models::linear::{Linear, LoraConfig};
use ressa_models::prunable::{Prunable, Tower, for_each_prunable_mut, prunable_linears};
use ressa_sparse::Mask;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// Random stream of the adapters' `A` initialisation (see `ressa_data::rng`).
const LORA_INIT_STREAM: u64 = 0x4C4F_5241;

/// Rank and α of one tower's adapters; rank 0 = no adapters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TowerLora {
    pub rank: usize,
    #[serde(default = "default_alpha")]
    pub alpha: f64,
}

fn default_alpha() -> f64 {
    16.0
}

/// Adapters per tower (defaults: the reference's ranks).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdapterConfig {
    pub vision: TowerLora,
    pub qformer: TowerLora,
    pub language: TowerLora,
}

impl Default for AdapterConfig {
    fn default() -> Self {
        let r = |rank| TowerLora { rank, alpha: 16.0 };
        Self {
            vision: r(4),
            qformer: r(2),
            language: r(8),
        }
    }
}

impl AdapterConfig {
    pub fn of(&self, tower: Tower) -> TowerLora {
        match tower {
            Tower::Vision => self.vision,
            Tower::QFormer => self.qformer,
            Tower::Language => self.language,
        }
    }
}

/// Calls `f(name, tower, linear)` on every prunable linear, block by block (`name` is the
/// linear's HF module name).
pub fn for_each_linear_mut<B: Backend, M: Prunable<B>>(
    model: &mut M,
    mut f: impl FnMut(&str, Tower, &mut Linear<B>),
) {
    for_each_prunable_mut(model, |tower, linear| {
        let key = linear.key.clone();
        f(&key, tower, linear)
    });
}

/// What [`attach`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttachReport {
    /// Linears with SparseLoRA (a mask was given).
    pub sparse: usize,
    /// Linears with plain LoRA (no mask: a dense tower).
    pub plain: usize,
    /// Trainable parameters (Σ r·(d_in + d_out)).
    pub trainable: usize,
}

/// The student's starting weights where they differ from the dense `W` on kept entries
/// (SparseGPT rewrites them), by linear name, in burn orientation `[d_in, d_out]`.
pub type StudentWeights = BTreeMap<String, Vec<f32>>;

/// Attaches adapters per `cfg` to every prunable linear of `model` (which holds the **dense**
/// weights). `masks` (keyed by `{linear}.weight`, as `ressa prune` writes them) makes a
/// linear's adapter SparseLoRA; linears without a mask get plain LoRA. All other parameters
/// are frozen. `A ~ U(±1/√d_in)` is drawn from `(seed, linear index)` on the host, so the
/// start does not depend on the backend or thread count.
pub fn attach<B: Backend, M: Prunable<B> + Module<B>>(
    model: M,
    cfg: &AdapterConfig,
    masks: &BTreeMap<String, Mask>,
    student: &StudentWeights,
    seed: u64,
    device: &B::Device,
) -> Result<(M, AttachReport)> {
    let mut model = model.no_grad();
    let mut report = AttachReport::default();
    let mut error = None;
    let mut index = 0u64;
    for_each_linear_mut(&mut model, |name, tower, linear| {
        index += 1;
        if error.is_some() {
            return;
        }
        let t = cfg.of(tower);
        let key = format!("{name}.weight");
        let [d_in, d_out] = linear.dims();
        let mask = masks.get(&key);
        if t.rank > d_in.min(d_out) {
            error = Some(TrainError::config(
                "rank",
                format!(
                    "rank {} of the {} tower exceeds {name}'s smaller side {} ([{d_in}, {d_out}])",
                    t.rank,
                    tower.name(),
                    d_in.min(d_out)
                ),
            ));
            return;
        }
        if t.rank == 0 {
            // Without an adapter the merge would give back the dense weight: a pruned linear
            // needs one (its mask lives in the SparseLoRA update).
            if mask.is_some_and(|m| m.count_pruned() > 0) {
                error = Some(TrainError::config(
                    "rank",
                    format!(
                        "{key}: the {} tower is pruned but its adapter rank is 0; give it a rank of at least 1",
                        tower.name()
                    ),
                ));
            }
            return;
        }
        let keep = match mask {
            Some(m) if m.shape() != (d_in, d_out) => {
                error = Some(TrainError::Input(format!(
                    "{key}: mask shape {:?} does not match the weight [{d_in}, {d_out}] (burn orientation)",
                    m.shape()
                )));
                return;
            }
            Some(m) => Some(m.to_bools()),
            None => None,
        };
        let mut adapter = LoraConfig::new(t.rank).with_alpha(t.alpha).init::<B>(
            d_in,
            d_out,
            keep.as_deref(),
            device,
        );
        let bound = 1.0 / (d_in as f32).sqrt();
        let mut rng = item_rng(seed, LORA_INIT_STREAM, index);
        let a: Vec<f32> = (0..d_in * t.rank)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        adapter.lora_a = Param::from_tensor(Tensor::from_data(
            TensorData::new(a, [d_in, t.rank]),
            device,
        ));
        if let Some(w) = student.get(name) {
            if w.len() != d_in * d_out {
                error = Some(TrainError::Input(format!(
                    "{key}: student weight has {} values, expected {}",
                    w.len(),
                    d_in * d_out
                )));
                return;
            }
            adapter.student_weight = Some(
                Param::from_tensor(Tensor::from_data(
                    TensorData::new(w.clone(), [d_in, d_out]),
                    device,
                ))
                .set_require_grad(false),
            );
        }
        if keep.is_some() {
            report.sparse += 1;
        } else {
            report.plain += 1;
        }
        report.trainable += t.rank * (d_in + d_out);
        linear.adapter = Some(adapter);
    });
    match error {
        Some(e) => Err(e),
        None => Ok((model, report)),
    }
}

/// The teacher: the same weights on the dense path (no masks, no adapters). The tensors are
/// shared with `model`, not copied.
pub fn dense_path<B: Backend, M: Prunable<B>>(mut model: M) -> M {
    for_each_linear_mut(&mut model, |_, _, linear| linear.adapter = None);
    model
}

/// Folds every adapter into its weight: `W ← (W + s·A·B) ⊙ M`, exactly the mask's zeros.
pub fn merge<B: Backend, M: Prunable<B>>(model: &mut M) {
    for_each_linear_mut(model, |_, _, linear| linear.merge());
}

/// One adapter's values in burn orientation: `A` [d_in, r], `B` [r, d_out].
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterValues {
    pub name: String,
    pub tower: Tower,
    pub d_in: usize,
    pub d_out: usize,
    pub rank: usize,
    pub scale: f64,
    pub sparse: bool,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

fn host(t: Tensor<impl Backend, 2>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 tensor data")
}

/// Every adapter's values, in model order.
pub fn adapter_values<B: Backend, M: Prunable<B>>(model: &M) -> Vec<AdapterValues> {
    let mut out = Vec::new();
    for (tower, linear) in prunable_linears(model) {
        if let Some(a) = &linear.adapter {
            let [d_in, d_out] = linear.dims();
            out.push(AdapterValues {
                name: linear.key.to_string(),
                tower,
                d_in,
                d_out,
                rank: a.rank(),
                scale: a.scale,
                sparse: a.pruned.is_some(),
                a: host(a.lora_a.val()),
                b: host(a.lora_b.val()),
            });
        }
    }
    out
}

/// Writes the adapters alone in PEFT's layout: `adapter_model.safetensors` with
/// `base_model.model.{name}.lora_A.weight` [r, d_in] and `lora_B.weight` [d_out, r] (PyTorch
/// orientation) and `adapter_config.json` (`r`, `lora_alpha`, per-module `rank_pattern` /
/// `alpha_pattern`). PEFT's own merge is dense (`W + s·B·A`); to keep the sparsity apply the
/// masks in `masks.safetensors` after merging, or use ressa's merged model.
pub fn write_peft_adapters(
    dir: &Path,
    adapters: &[AdapterValues],
    base_model: &str,
) -> std::io::Result<()> {
    use safetensors::tensor::{Dtype, TensorView};
    let mut tensors: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::new();
    for a in adapters {
        // A [d_in, r] → lora_A.weight [r, d_in]; B [r, d_out] → lora_B.weight [d_out, r].
        let mut at = vec![0f32; a.a.len()];
        for i in 0..a.d_in {
            for k in 0..a.rank {
                at[k * a.d_in + i] = a.a[i * a.rank + k];
            }
        }
        let mut bt = vec![0f32; a.b.len()];
        for k in 0..a.rank {
            for j in 0..a.d_out {
                bt[j * a.rank + k] = a.b[k * a.d_out + j];
            }
        }
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        tensors.push((
            format!("base_model.model.{}.lora_A.weight", a.name),
            bytes(&at),
            vec![a.rank, a.d_in],
        ));
        tensors.push((
            format!("base_model.model.{}.lora_B.weight", a.name),
            bytes(&bt),
            vec![a.d_out, a.rank],
        ));
    }
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, b, s)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).expect("consistent adapter tensor"),
            )
        })
        .collect();
    let bytes =
        safetensors::serialize(views, None).map_err(|e| std::io::Error::other(e.to_string()))?;
    std::fs::write(dir.join("adapter_model.safetensors"), bytes)?;

    let rank_pattern: BTreeMap<&str, usize> =
        adapters.iter().map(|a| (a.name.as_str(), a.rank)).collect();
    let alpha_pattern: BTreeMap<&str, f64> = adapters
        .iter()
        .map(|a| (a.name.as_str(), a.scale * a.rank as f64))
        .collect();
    let first = adapters.first();
    let config = serde_json::json!({
        "peft_type": "LORA",
        "base_model_name_or_path": base_model,
        "r": first.map_or(0, |a| a.rank),
        "lora_alpha": first.map_or(0.0, |a| a.scale * a.rank as f64),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "task_type": null,
        "target_modules": adapters.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "ressa": {
            "sparse_lora": adapters.iter().filter(|a| a.sparse).map(|a| a.name.as_str()).collect::<Vec<_>>(),
            "note": "SparseLoRA: W' = (W + s·B·A) ⊙ M with M from masks.safetensors",
        },
    });
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_vec_pretty(&config).expect("json"),
    )
}
