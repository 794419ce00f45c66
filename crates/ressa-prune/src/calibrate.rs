//! Sequential layer-wise calibration (reference notes §5): for each stack, catch block 0's
//! inputs from a real forward over the calibration samples; then for each block, run it with
//! every linear's input reported, accumulate the statistics, compute all masks of the block from
//! those same statistics, and produce the next block's inputs — through the pruned block
//! (Wanda/SparseGPT default) or the dense one (the RESSA path, masks applied at the end).
//! Only one block's inputs (all samples) are alive at a time.

use std::collections::BTreeMap;

use burn::module::Param;
use burn::prelude::*;
use ressa_models::nn::no_tap;
use ressa_models::prunable::{BlockInput, BlockOptions, CalibrationSample, Prunable, Tower};
use ressa_sparse::{Mask, SparsityPattern};

use crate::owl::{OwlConfig, OwlLayer, allocate, outlier_ratio};
use crate::stats::ActivationStats;
use crate::{
    ComparisonGroup, CountRounding, DsnotConfig, Method, PruneError, PruneSpec, Pruner,
    PrunerConfig, Weights,
};

/// Fraction of weights removed per tower; 0 leaves a tower dense.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TowerSparsity {
    pub vision: f64,
    pub qformer: f64,
    pub language: f64,
}

impl TowerSparsity {
    pub fn of(&self, tower: Tower) -> f64 {
        match tower {
            Tower::Vision => self.vision,
            Tower::QFormer => self.qformer,
            Tower::Language => self.language,
        }
    }
}

/// How a tower's sparsity is spread over its blocks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Allocation {
    /// Every pruned matrix gets its tower's ratio.
    Uniform,
    /// OWL: per-block ratios from outlier ratios of |W|·‖x‖, mean = the tower's ratio.
    Owl(OwlConfig),
}

/// Where the next block's inputs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagation {
    /// Through the pruned block (weights zeroed as soon as the block's masks are known).
    Pruned,
    /// Through the dense block; masks are applied after the last stack (RESSA path).
    Dense,
}

/// Everything calibration needs besides the model and the samples.
#[derive(Debug, Clone)]
pub struct CalibrationConfig {
    pub method: Method,
    pub pattern: SparsityPattern,
    pub sparsity: TowerSparsity,
    pub allocation: Allocation,
    pub propagation: Propagation,
    /// Wanda's unstructured comparison group; `None` = the reference's choice per tower
    /// (per matrix for the vision tower, per output elsewhere).
    pub wanda_group: Option<ComparisonGroup>,
    /// DSnoT settings; `None` = the reference's signals, cycle limit and threshold with the
    /// prune count `floor(s·d_in)` so the requested sparsity is exact (the reference's
    /// `round` is `CountRounding::Round`).
    pub dsnot: Option<DsnotConfig>,
    pub block: BlockOptions,
}

impl CalibrationConfig {
    fn pruner_config(&self, tower: Tower) -> PrunerConfig {
        let mut cfg = PrunerConfig::default_for(self.method);
        match &mut cfg {
            PrunerConfig::Wanda(w) => {
                w.group = self.wanda_group.unwrap_or(match tower {
                    Tower::Vision => ComparisonGroup::PerMatrix,
                    _ => ComparisonGroup::PerOutput,
                });
            }
            PrunerConfig::Dsnot(d) => {
                *d = self.dsnot.clone().unwrap_or(DsnotConfig {
                    count_rounding: CountRounding::Floor,
                    ..DsnotConfig::default()
                });
            }
            _ => {}
        }
        cfg
    }
}

/// One pruned linear.
#[derive(Debug, Clone)]
pub struct LayerReport {
    /// Full HF name of the weight (`….weight`).
    pub name: String,
    pub tower: Tower,
    pub d_in: usize,
    pub d_out: usize,
    pub target: f64,
    pub sparsity: f64,
    /// Pruned entries.
    pub pruned: usize,
}

/// Masks (by weight name) and what was done.
#[derive(Debug, Default)]
pub struct CalibrationResult {
    pub masks: BTreeMap<String, Mask>,
    pub layers: Vec<LayerReport>,
}

/// A calibration failure, naming the layer.
#[derive(Debug, thiserror::Error)]
pub enum CalibrateError {
    // The cause is part of the message (not a `source`), so error chains print it once.
    #[error("{layer}: {error}")]
    Layer { layer: String, error: PruneError },
    #[error("{0}")]
    Input(String),
}

fn at(layer: &str) -> impl FnOnce(PruneError) -> CalibrateError + '_ {
    move |error| CalibrateError::Layer {
        layer: layer.to_string(),
        error,
    }
}

fn host<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Vec<f32> {
    t.clone()
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("float tensor")
}

/// Progress callback: (stack prefix, block index, blocks in the stack).
pub type Progress<'a> = &'a mut dyn FnMut(&str, usize, usize);

/// A linear's pending result in dense propagation.
struct Pending {
    stack: usize,
    block: usize,
    linear: String,
    values: Vec<f32>,
}

/// Prunes `model` in place (or, with dense propagation, at the end) and returns the masks.
pub fn calibrate_and_prune<B: Backend, M: Prunable<B>>(
    model: &mut M,
    samples: &[CalibrationSample<B>],
    cfg: &CalibrationConfig,
    progress: Progress,
) -> Result<CalibrationResult, CalibrateError> {
    let mut masks = BTreeMap::new();
    let layers = calibrate_and_prune_with(model, samples, cfg, progress, &mut |name, mask| {
        masks.insert(name.to_string(), mask);
        Ok(())
    })?;
    Ok(CalibrationResult { masks, layers })
}

/// Receives each mask as soon as it is computed (e.g. to spill it to disk).
pub type MaskSink<'a> = &'a mut dyn FnMut(&str, Mask) -> Result<(), CalibrateError>;

#[allow(clippy::needless_range_loop)]
/// [`calibrate_and_prune`] handing every mask to `sink` instead of keeping them, so a whole
/// model's masks need not be in memory; returns the per-layer report.
pub fn calibrate_and_prune_with<B: Backend, M: Prunable<B>>(
    model: &mut M,
    samples: &[CalibrationSample<B>],
    cfg: &CalibrationConfig,
    progress: Progress,
    sink: MaskSink,
) -> Result<Vec<LayerReport>, CalibrateError> {
    for (tower, s) in [
        ("vision", cfg.sparsity.vision),
        ("qformer", cfg.sparsity.qformer),
        ("language", cfg.sparsity.language),
    ] {
        if !(0.0..1.0).contains(&s) {
            return Err(CalibrateError::Input(format!(
                "{tower} sparsity {s} is outside [0, 1)"
            )));
        }
    }
    let needs_data =
        cfg.method != Method::Magnitude || matches!(cfg.allocation, Allocation::Owl(_));
    if needs_data && samples.is_empty() {
        return Err(CalibrateError::Input(format!(
            "{} needs calibration samples, none were given",
            cfg.method
        )));
    }
    let mut layers: Vec<LayerReport> = Vec::new();
    let mut pending: Vec<Pending> = Vec::new();
    let stacks = model.stacks();
    for (si, stack) in stacks.iter().enumerate() {
        let target = cfg.sparsity.of(stack.tower);
        if target == 0.0 || stack.blocks == 0 {
            continue;
        }
        let block_targets = match cfg.allocation {
            Allocation::Uniform => vec![target; stack.blocks],
            Allocation::Owl(owl) => owl_targets(model, si, samples, target, &owl, cfg.block)?,
        };
        let pruner_cfg = cfg.pruner_config(stack.tower);
        let mut inputs: Vec<BlockInput<B>> = if needs_data {
            samples.iter().map(|s| model.stack_input(si, s)).collect()
        } else {
            Vec::new()
        };
        for b in 0..stack.blocks {
            progress(stack.prefix, b, stack.blocks);
            let block_name = format!("{}.{b}", stack.prefix);
            // Statistics of every linear input group, from the block's (unpruned) inputs.
            let mut groups: Vec<(Vec<String>, Box<dyn Pruner>)> = Vec::new();
            let mut outputs = Vec::with_capacity(inputs.len());
            let mut failure: Option<CalibrateError> = None;
            if cfg.method != Method::Magnitude {
                for input in &inputs {
                    let mut tap = |names: &[&str], x: &Tensor<B, 3>| {
                        if failure.is_some() {
                            return;
                        }
                        let [n, l, d] = x.dims();
                        let key: Vec<String> = names.iter().map(|s| s.to_string()).collect();
                        let idx = match groups.iter().position(|(k, _)| *k == key) {
                            Some(i) => i,
                            None => match pruner_cfg.build(d) {
                                Ok(p) => {
                                    groups.push((key, p));
                                    groups.len() - 1
                                }
                                Err(e) => {
                                    failure = Some(at(&format!("{block_name}.{}", names[0]))(e));
                                    return;
                                }
                            },
                        };
                        if let Err(e) = groups[idx].1.add_batch_samples(&host(x), n * l, n) {
                            failure = Some(at(&format!("{block_name}.{}", names[0]))(e));
                        }
                    };
                    let out = model.run_block(si, b, input, cfg.block, &mut tap);
                    outputs.push(out);
                }
            }
            if let Some(e) = failure {
                return Err(e);
            }
            // Masks of every linear of the block.
            let spec = PruneSpec::new(cfg.pattern, block_targets[b]).map_err(at(&block_name))?;
            let magnitude = PrunerConfig::default_for(Method::Magnitude);
            let device = samples.first().map(|s| s.inputs.pixel_values.device());
            let mut updates: Vec<(String, Vec<f32>)> = Vec::new();
            for (name, linear) in model.block_linears_mut(si, b) {
                let full = format!("{block_name}.{name}.weight");
                let [d_in, d_out] = linear.weight.dims();
                spec.validate(d_in).map_err(at(&full))?;
                let mut values = host(&linear.weight.val());
                let weights = Weights::new(&values, d_in, d_out).map_err(at(&full))?;
                let output = if cfg.method == Method::Magnitude {
                    magnitude.build(d_in).map_err(at(&full))?.prune(weights, &spec)
                } else {
                    match groups.iter().find(|(k, _)| k.contains(&name)) {
                        Some((_, pruner)) => pruner.prune(weights, &spec),
                        None => {
                            tracing::warn!(layer = %full, "no calibration input reached this linear; left dense");
                            continue;
                        }
                    }
                }
                .map_err(at(&full))?;
                // The statistics borrow ended with `prune`: update the host copy in place.
                output.apply_to(&mut values).map_err(at(&full))?;
                let new = values;
                layers.push(LayerReport {
                    name: full.clone(),
                    tower: stack.tower,
                    d_in,
                    d_out,
                    target: spec.sparsity(),
                    sparsity: output.mask.sparsity(),
                    pruned: output.mask.count_pruned(),
                });
                sink(&full, output.mask)?;
                match cfg.propagation {
                    Propagation::Pruned => {
                        let dev = device.clone().unwrap_or_else(|| linear.weight.device());
                        linear.weight = Param::from_tensor(Tensor::from_data(
                            TensorData::new(new, [d_in, d_out]),
                            &dev,
                        ));
                    }
                    Propagation::Dense => updates.push((name, new)),
                }
            }
            for (linear, values) in updates {
                pending.push(Pending {
                    stack: si,
                    block: b,
                    linear,
                    values,
                });
            }
            // Next block's inputs.
            if b + 1 < stack.blocks && needs_data {
                inputs = match cfg.propagation {
                    Propagation::Dense if cfg.method != Method::Magnitude => inputs
                        .into_iter()
                        .zip(outputs)
                        .map(|(i, o)| i.with_hidden(o))
                        .collect(),
                    _ => inputs
                        .into_iter()
                        .map(|i| {
                            let o = model.run_block(si, b, &i, cfg.block, &mut no_tap);
                            i.with_hidden(o)
                        })
                        .collect(),
                };
            }
        }
    }
    for p in pending {
        for (name, linear) in model.block_linears_mut(p.stack, p.block) {
            if name == p.linear {
                let [d_in, d_out] = linear.weight.dims();
                let device = linear.weight.device();
                linear.weight = Param::from_tensor(Tensor::from_data(
                    TensorData::new(p.values.clone(), [d_in, d_out]),
                    &device,
                ));
            }
        }
    }
    Ok(layers)
}

/// OWL per-block sparsities of one stack: a dense pass collecting ‖x_j‖ of every linear input,
/// the outlier ratio of |W|·‖x‖ per block, then `allocate`.
fn owl_targets<B: Backend, M: Prunable<B>>(
    model: &mut M,
    stack: usize,
    samples: &[CalibrationSample<B>],
    target: f64,
    owl: &OwlConfig,
    options: BlockOptions,
) -> Result<Vec<f64>, CalibrateError> {
    let info = &model.stacks()[stack];
    let mut inputs: Vec<BlockInput<B>> = samples
        .iter()
        .map(|s| model.stack_input(stack, s))
        .collect();
    let mut ratios = Vec::with_capacity(info.blocks);
    for b in 0..info.blocks {
        let block_name = format!("{}.{b}", info.prefix);
        let mut stats: Vec<(Vec<String>, ActivationStats)> = Vec::new();
        let mut failure = None;
        let mut outputs = Vec::new();
        for input in &inputs {
            let mut tap = |names: &[&str], x: &Tensor<B, 3>| {
                let [n, l, d] = x.dims();
                let key: Vec<String> = names.iter().map(|s| s.to_string()).collect();
                let i = match stats.iter().position(|(k, _)| *k == key) {
                    Some(i) => i,
                    None => {
                        stats.push((key, ActivationStats::new(d).expect("d > 0")));
                        stats.len() - 1
                    }
                };
                if let Err(e) = stats[i].1.add_batch(&host(x), n * l, n) {
                    failure.get_or_insert(at(&block_name)(e));
                }
            };
            outputs.push(model.run_block(stack, b, input, options, &mut tap));
        }
        if let Some(e) = failure {
            return Err(e);
        }
        let weights: Vec<(String, Vec<f32>, usize, usize)> = model
            .block_linears_mut(stack, b)
            .into_iter()
            .map(|(n, l)| {
                let [d_in, d_out] = l.weight.dims();
                (n, host(&l.weight.val()), d_in, d_out)
            })
            .collect();
        let norms: Vec<(Vec<String>, Vec<f64>)> =
            stats.iter().map(|(k, s)| (k.clone(), s.norms())).collect();
        let mut layers = Vec::new();
        for (name, values, d_in, d_out) in &weights {
            if let Some((_, n)) = norms.iter().find(|(k, _)| k.contains(name)) {
                layers.push(OwlLayer {
                    weights: Weights::new(values, *d_in, *d_out).map_err(at(&block_name))?,
                    act_norms: n,
                });
            }
        }
        ratios.push(outlier_ratio(&layers, owl.m).map_err(at(&block_name))?);
        inputs = inputs
            .into_iter()
            .zip(outputs)
            .map(|(i, o)| i.with_hidden(o))
            .collect();
    }
    allocate(&ratios, target, owl.lambda).map_err(at(info.prefix))
}
