//! Sequential layer-wise calibration (reference notes §5): for each stack, catch block 0's
//! inputs from a real forward over the calibration samples; then for each block, run it with
//! every linear's input reported, accumulate the statistics, compute all masks of the block from
//! those same statistics, and produce the next block's inputs — through the pruned block
//! (Wanda/SparseGPT default) or the dense one (the RESSA path, masks applied at the end).
//! Only one block's inputs (all samples) are alive at a time.

use std::collections::BTreeMap;

use std::sync::Arc;

use burn::prelude::*;
use ressa_models::linear::Linear;
use ressa_models::nn::no_tap;
use ressa_models::prunable::{BlockOptions, Prunable, StackInfo, Tower};
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
    /// Only the language tower at `s` (a model with one tower, say).
    pub fn language(s: f64) -> Self {
        Self {
            vision: 0.0,
            qformer: 0.0,
            language: s,
        }
    }

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

/// The kind of an [`Allocation`] (flags and configs; OWL's parameters come separately).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum AllocationKind {
    Uniform,
    Owl,
}

impl AllocationKind {
    /// The allocation, with `owl`'s parameters for [`AllocationKind::Owl`].
    pub fn with(self, owl: OwlConfig) -> Allocation {
        match self {
            AllocationKind::Uniform => Allocation::Uniform,
            AllocationKind::Owl => Allocation::Owl(owl),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AllocationKind::Uniform => "uniform",
            AllocationKind::Owl => "owl",
        }
    }
}

/// Where the next block's inputs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
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
    /// `method` at `pattern` and `sparsity`, everything else as the reference: uniform
    /// allocation, inputs through the pruned blocks, the reference's comparison groups and
    /// DSnoT settings, default block options.
    pub fn new(method: Method, pattern: SparsityPattern, sparsity: TowerSparsity) -> Self {
        Self {
            method,
            pattern,
            sparsity,
            allocation: Allocation::Uniform,
            propagation: Propagation::Pruned,
            wanda_group: None,
            dsnot: None,
            block: BlockOptions::default(),
        }
    }

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
    #[error(transparent)]
    Model(#[from] ressa_models::ModelError),
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

/// Progress callback: (stack name, block index, blocks in the stack).
pub type Progress<'a> = &'a mut dyn FnMut(&str, usize, usize);

/// Prunes `model` in place (or, with dense propagation, at the end) and returns the masks.
pub fn calibrate_and_prune<B: Backend, M: Prunable<B>>(
    model: &mut M,
    samples: &[M::Sample],
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

fn model_err(e: ressa_models::ModelError) -> CalibrateError {
    CalibrateError::Model(e)
}

/// The keys of a block's linears: every one named, none twice.
fn block_keys<B: Backend>(
    linears: &[&Linear<B>],
    block: &str,
) -> Result<Vec<Arc<str>>, CalibrateError> {
    let mut keys: Vec<Arc<str>> = Vec::with_capacity(linears.len());
    for l in linears {
        if l.key.is_empty() {
            return Err(CalibrateError::Input(format!(
                "{block}: a prunable linear has no key (set Linear::key)"
            )));
        }
        if keys.contains(&l.key) {
            return Err(CalibrateError::Input(format!(
                "{block}: the linear {} is listed twice",
                l.key
            )));
        }
        keys.push(Arc::clone(&l.key));
    }
    Ok(keys)
}

/// The keys of block `b`'s prunable linears.
fn listed_keys<B: Backend, M: Prunable<B>>(model: &M, stack: M::Stack, b: usize) -> Vec<Arc<str>> {
    model
        .block_linears(stack, b)
        .iter()
        .map(|l| Arc::clone(&l.key))
        .collect()
}

/// A tap's group key; it must name the block's own linears (a stray key would collect
/// statistics for nothing and prune nothing).
fn tap_key<B: Backend>(
    linears: &[&Linear<B>],
    listed: &[Arc<str>],
    block_name: &str,
) -> Result<Vec<Arc<str>>, CalibrateError> {
    let key: Vec<Arc<str>> = linears.iter().map(|l| Arc::clone(&l.key)).collect();
    match key.iter().find(|k| !listed.contains(k)) {
        Some(stray) => Err(CalibrateError::Input(format!(
            "{block_name}: the block tapped `{stray}`, which is not one of its prunable linears"
        ))),
        None => Ok(key),
    }
}

/// Pruner state of the linear groups that share an input, keyed by their linears' keys.
type Groups = Vec<(Vec<Arc<str>>, Box<dyn Pruner>)>;

/// Runs every input through block `b` of `stack`, feeding each tapped linear input to its
/// group's pruner; returns the outputs.
#[allow(clippy::too_many_arguments)]
fn collect_stats<B: Backend, M: Prunable<B>>(
    model: &M,
    stack: M::Stack,
    b: usize,
    inputs: &[M::BlockInput],
    pruner_cfg: &PrunerConfig,
    options: BlockOptions,
    block_name: &str,
    groups: &mut Groups,
) -> Result<Vec<Tensor<B, 3>>, CalibrateError> {
    let mut outputs = Vec::with_capacity(inputs.len());
    let mut failure: Option<CalibrateError> = None;
    let listed = listed_keys(model, stack, b);
    for input in inputs {
        let mut tap = |linears: &[&Linear<B>], x: &Tensor<B, 3>| {
            if failure.is_some() {
                return;
            }
            let [n, l, d] = x.dims();
            let key = match tap_key(linears, &listed, block_name) {
                Ok(k) => k,
                Err(e) => {
                    failure = Some(e);
                    return;
                }
            };
            let name = || {
                key.first()
                    .map_or(block_name.to_string(), |k| k.to_string())
            };
            let idx = match groups.iter().position(|(k, _)| *k == key) {
                Some(i) => i,
                None => match pruner_cfg.build(d) {
                    Ok(p) => {
                        groups.push((key.clone(), p));
                        groups.len() - 1
                    }
                    Err(e) => {
                        failure = Some(at(&name())(e));
                        return;
                    }
                },
            };
            if let Err(e) = groups[idx].1.add_batch_samples(&host(x), n * l, n) {
                failure = Some(at(&name())(e));
            }
        };
        let out = model
            .run_block(stack, b, input, options, &mut tap)
            .map_err(model_err)?;
        outputs.push(out);
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(outputs),
    }
}

/// Pruned weights held back until their stack ends (dense propagation): stack, block, linear
/// key, values.
type Pending<S> = Vec<(S, usize, Arc<str>, Vec<f32>)>;

/// [`calibrate_and_prune`] handing every mask to `sink` instead of keeping them, so a whole
/// model's masks need not be in memory; returns the per-layer report.
pub fn calibrate_and_prune_with<B: Backend, M: Prunable<B>>(
    model: &mut M,
    samples: &[M::Sample],
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
    let stacks = model.stacks();
    let pruned_stack = |s: &StackInfo<M::Stack>| cfg.sparsity.of(s.tower) > 0.0 && s.blocks > 0;
    let Some(last) = stacks.iter().rposition(pruned_stack) else {
        return Ok(Vec::new());
    };
    let mut contexts: Vec<M::Context> = if needs_data {
        samples
            .iter()
            .map(|s| model.context(s))
            .collect::<Result<_, _>>()
            .map_err(model_err)?
    } else {
        Vec::new()
    };
    let mut layers: Vec<LayerReport> = Vec::new();
    let mut pending: Pending<M::Stack> = Vec::new();
    for stack in &stacks[..=last] {
        let target = cfg.sparsity.of(stack.tower);
        let prune = pruned_stack(stack);
        if !needs_data {
            if prune {
                for b in 0..stack.blocks {
                    progress(&stack.name, b, stack.blocks);
                    prune_block(
                        model,
                        stack,
                        b,
                        target,
                        cfg,
                        None,
                        &mut layers,
                        &mut pending,
                        sink,
                    )?;
                }
            }
            continue;
        }
        if stack.blocks == 0 {
            return Err(CalibrateError::Input(format!(
                "{}: a stack without blocks cannot pass its inputs on",
                stack.name
            )));
        }
        let mut inputs: Vec<M::BlockInput> = contexts
            .iter()
            .map(|c| model.stack_input(stack.id, c))
            .collect::<Result<_, _>>()
            .map_err(model_err)?;
        let block_targets = match (prune, cfg.allocation) {
            (false, _) => vec![0.0; stack.blocks],
            (true, Allocation::Uniform) => vec![target; stack.blocks],
            (true, Allocation::Owl(owl)) => {
                owl_targets(model, stack, inputs.clone(), target, &owl, cfg.block)?
            }
        };
        let pruner_cfg = cfg.pruner_config(stack.tower);
        let mut hidden: Vec<Tensor<B, 3>> = Vec::new();
        for (b, &block_target) in block_targets.iter().enumerate().take(stack.blocks) {
            let block_name = format!("{}.{b}", stack.name);
            let rerun = |model: &M, inputs: &[M::BlockInput]| {
                inputs
                    .iter()
                    .map(|i| model.run_block(stack.id, b, i, cfg.block, &mut no_tap))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(model_err)
            };
            if !prune {
                hidden = rerun(model, &inputs)?;
            } else {
                progress(&stack.name, b, stack.blocks);
                let mut groups: Groups = Vec::new();
                let outputs = if cfg.method != Method::Magnitude {
                    collect_stats(
                        model,
                        stack.id,
                        b,
                        &inputs,
                        &pruner_cfg,
                        cfg.block,
                        &block_name,
                        &mut groups,
                    )?
                } else {
                    Vec::new()
                };
                prune_block(
                    model,
                    stack,
                    b,
                    block_target,
                    cfg,
                    Some(&groups),
                    &mut layers,
                    &mut pending,
                    sink,
                )?;
                // Next block's inputs: the dense outputs already computed, or through the
                // pruned block.
                hidden = match cfg.propagation {
                    Propagation::Dense if cfg.method != Method::Magnitude => outputs,
                    _ => rerun(model, &inputs)?,
                };
            }
            inputs = inputs
                .into_iter()
                .zip(hidden.iter().cloned())
                .map(|(i, h)| model.with_hidden(i, h))
                .collect();
        }
        if stack.id != stacks[last].id {
            for (ctx, h) in contexts.iter_mut().zip(hidden) {
                model
                    .end_stack(stack.id, h, ctx, cfg.block)
                    .map_err(model_err)?;
            }
        }
    }
    for (stack, block, key, values) in pending {
        for linear in model.block_linears_mut(stack, block) {
            if linear.key == key {
                let [d_in, d_out] = linear.weight.dims();
                let device = linear.weight.device();
                linear.set_weight(Tensor::from_data(
                    TensorData::new(values.clone(), [d_in, d_out]),
                    &device,
                ));
            }
        }
    }
    Ok(layers)
}

/// Masks of every linear of block `b` (from the block's statistics in `groups`, or by
/// magnitude), handed to `sink`; the pruned weights written (pruned propagation) or queued.
#[allow(clippy::too_many_arguments)]
fn prune_block<B: Backend, M: Prunable<B>>(
    model: &mut M,
    stack: &StackInfo<M::Stack>,
    b: usize,
    target: f64,
    cfg: &CalibrationConfig,
    groups: Option<&Groups>,
    layers: &mut Vec<LayerReport>,
    pending: &mut Pending<M::Stack>,
    sink: MaskSink,
) -> Result<(), CalibrateError> {
    let block_name = format!("{}.{b}", stack.name);
    let spec = PruneSpec::new(cfg.pattern, target).map_err(at(&block_name))?;
    let magnitude = PrunerConfig::default_for(Method::Magnitude);
    let mut updates: Vec<(Arc<str>, Vec<f32>)> = Vec::new();
    {
        let linears = model.block_linears(stack.id, b);
        block_keys(&linears, &block_name)?;
        for linear in linears {
            let full = format!("{}.weight", linear.key);
            let [d_in, d_out] = linear.weight.dims();
            spec.validate(d_in).map_err(at(&full))?;
            let mut values = host(&linear.weight.val());
            let weights = Weights::new(&values, d_in, d_out).map_err(at(&full))?;
            let output = match groups.filter(|_| cfg.method != Method::Magnitude) {
                None => magnitude.build(d_in).map_err(at(&full))?.prune(weights, &spec),
                Some(groups) => match groups.iter().find(|(k, _)| k.contains(&linear.key)) {
                    Some((_, pruner)) => pruner.prune(weights, &spec),
                    None => {
                        return Err(CalibrateError::Input(format!(
                            "{full}: no calibration input reached this linear (its block does not tap it)"
                        )));
                    }
                },
            }
            .map_err(at(&full))?;
            output.apply_to(&mut values).map_err(at(&full))?;
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
            updates.push((Arc::clone(&linear.key), values));
        }
    }
    match cfg.propagation {
        Propagation::Pruned => {
            for linear in model.block_linears_mut(stack.id, b) {
                if let Some(pos) = updates.iter().position(|(k, _)| *k == linear.key) {
                    let (_, values) = updates.swap_remove(pos);
                    let [d_in, d_out] = linear.weight.dims();
                    let device = linear.weight.device();
                    linear.set_weight(Tensor::from_data(
                        TensorData::new(values, [d_in, d_out]),
                        &device,
                    ));
                }
            }
        }
        Propagation::Dense => {
            pending.extend(updates.into_iter().map(|(k, v)| (stack.id, b, k, v)));
        }
    }
    Ok(())
}

/// OWL per-block sparsities of one stack: a dense pass collecting ‖x_j‖ of every linear input,
/// the outlier ratio of |W|·‖x‖ per block, then `allocate`.
fn owl_targets<B: Backend, M: Prunable<B>>(
    model: &M,
    stack: &StackInfo<M::Stack>,
    mut inputs: Vec<M::BlockInput>,
    target: f64,
    owl: &OwlConfig,
    options: BlockOptions,
) -> Result<Vec<f64>, CalibrateError> {
    let mut ratios = Vec::with_capacity(stack.blocks);
    for b in 0..stack.blocks {
        let block_name = format!("{}.{b}", stack.name);
        let mut stats: Vec<(Vec<Arc<str>>, ActivationStats)> = Vec::new();
        let mut failure = None;
        let mut outputs = Vec::new();
        let listed = listed_keys(model, stack.id, b);
        for input in &inputs {
            let mut tap = |linears: &[&Linear<B>], x: &Tensor<B, 3>| {
                let [n, l, d] = x.dims();
                let key = match tap_key(linears, &listed, &block_name) {
                    Ok(k) => k,
                    Err(e) => {
                        failure.get_or_insert(e);
                        return;
                    }
                };
                let i = match stats.iter().position(|(k, _)| *k == key) {
                    Some(i) => i,
                    None => match ActivationStats::new(d) {
                        Ok(s) => {
                            stats.push((key, s));
                            stats.len() - 1
                        }
                        Err(e) => {
                            failure.get_or_insert(at(&block_name)(e));
                            return;
                        }
                    },
                };
                if let Err(e) = stats[i].1.add_batch(&host(x), n * l, n) {
                    failure.get_or_insert(at(&block_name)(e));
                }
            };
            outputs.push(
                model
                    .run_block(stack.id, b, input, options, &mut tap)
                    .map_err(model_err)?,
            );
        }
        if let Some(e) = failure {
            return Err(e);
        }
        let linears = model.block_linears(stack.id, b);
        let weights: Vec<(Arc<str>, Vec<f32>, usize, usize)> = linears
            .iter()
            .map(|l| {
                let [d_in, d_out] = l.weight.dims();
                (Arc::clone(&l.key), host(&l.weight.val()), d_in, d_out)
            })
            .collect();
        let norms: Vec<(Vec<Arc<str>>, Vec<f64>)> =
            stats.iter().map(|(k, s)| (k.clone(), s.norms())).collect();
        let mut owl_layers = Vec::new();
        for (key, values, d_in, d_out) in &weights {
            match norms.iter().find(|(k, _)| k.contains(key)) {
                Some((_, n)) => owl_layers.push(OwlLayer {
                    weights: Weights::new(values, *d_in, *d_out).map_err(at(&block_name))?,
                    act_norms: n,
                }),
                None => {
                    return Err(CalibrateError::Input(format!(
                        "{key}.weight: no calibration input reached this linear (its block does not tap it)"
                    )));
                }
            }
        }
        ratios.push(outlier_ratio(&owl_layers, owl.m).map_err(at(&block_name))?);
        inputs = inputs
            .into_iter()
            .zip(outputs)
            .map(|(i, o)| model.with_hidden(i, o))
            .collect();
    }
    allocate(&ratios, target, owl.lambda).map_err(at(&stack.name))
}
