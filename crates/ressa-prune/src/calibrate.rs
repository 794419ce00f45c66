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

use crate::activations::{Generation, Hidden, Spill};
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

/// Where the blocks' weights live while calibration runs: all in the model ([`InMemory`]),
/// or read block by block from a checkpoint and written out as they are pruned (streamed
/// pruning, `crate::stream`). Calibration loads a block before running it, releases it when
/// done, and hands every pruned weight to [`BlockWeights::pruned`].
pub trait BlockWeights<B: Backend, M: Prunable<B>> {
    /// Makes block `block` of `stack` runnable: its prunable linears' weights in the model.
    fn load(&mut self, model: &mut M, stack: M::Stack, block: usize) -> Result<(), CalibrateError>;
    /// Block `block` of `stack` is not needed until it is loaded again.
    fn release(
        &mut self,
        model: &mut M,
        stack: M::Stack,
        block: usize,
    ) -> Result<(), CalibrateError>;
    /// The pruned weight `name` (`….weight`) in burn's layout `[d_in, d_out]`, as soon as it is
    /// computed.
    fn pruned(
        &mut self,
        name: &str,
        values: &[f32],
        d_in: usize,
        d_out: usize,
    ) -> Result<(), CalibrateError>;
    /// Whether the model itself must end up holding every pruned weight (with dense
    /// propagation they are then applied after the last stack).
    fn holds_model(&self) -> bool;
}

/// The whole model in memory: blocks are always loaded, and the model ends up pruned.
#[derive(Debug, Clone, Copy, Default)]
pub struct InMemory;

impl<B: Backend, M: Prunable<B>> BlockWeights<B, M> for InMemory {
    fn load(&mut self, _: &mut M, _: M::Stack, _: usize) -> Result<(), CalibrateError> {
        Ok(())
    }

    fn release(&mut self, _: &mut M, _: M::Stack, _: usize) -> Result<(), CalibrateError> {
        Ok(())
    }

    fn pruned(&mut self, _: &str, _: &[f32], _: usize, _: usize) -> Result<(), CalibrateError> {
        Ok(())
    }

    fn holds_model(&self) -> bool {
        true
    }
}

/// How much of the calibration set's activations (block inputs between blocks) may stay in
/// memory, and where the rest goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActivationBudget {
    /// Bytes of hidden states held in memory at most (`None`: no limit).
    pub bytes: Option<u64>,
    /// Directory of the spill files (created when first needed; each file is removed when its
    /// activations are no longer needed). `None`: everything stays in memory.
    pub spill_dir: Option<std::path::PathBuf>,
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

/// Pruned weights held back until their stack ends (dense propagation): stack, block, linear
/// key, values.
type Pending<S> = Vec<(S, usize, Arc<str>, Vec<f32>, [usize; 2])>;

/// Sets the weight of linear `key` of block `b`.
fn set_linear<B: Backend, M: Prunable<B>>(
    model: &mut M,
    stack: M::Stack,
    b: usize,
    key: &str,
    weight: impl FnOnce(&B::Device) -> Tensor<B, 2>,
) {
    if let Some(linear) = model
        .block_linears_mut(stack, b)
        .into_iter()
        .find(|l| &*l.key == key)
    {
        let device = linear.weight.device();
        linear.set_weight(weight(&device));
    }
}

/// [`calibrate_and_prune`] handing every mask to `sink` instead of keeping them, so a whole
/// model's masks need not be in memory; returns the per-layer report.
pub fn calibrate_and_prune_with<B: Backend, M: Prunable<B>>(
    model: &mut M,
    samples: &[M::Sample],
    cfg: &CalibrationConfig,
    progress: Progress,
    sink: MaskSink,
) -> Result<Vec<LayerReport>, CalibrateError> {
    calibrate_blocks(
        model,
        &mut InMemory,
        samples,
        cfg,
        &ActivationBudget::default(),
        progress,
        sink,
    )
}

/// The calibration loop over any [`BlockWeights`]: for each stack, the inputs of block 0 from
/// every sample's context; for each block, load it, run it with every linear's input
/// reported, compute all its masks from those statistics (handing each mask to `sink` and
/// each pruned weight to `weights`), produce the next block's inputs (through the pruned
/// block, or the dense one), then release it. The activations between blocks are the only
/// state carried from block to block; their hidden states beyond `budget` go to disk.
/// Masks and weights do not depend on where the weights or activations were held.
pub fn calibrate_blocks<B: Backend, M: Prunable<B>, W: BlockWeights<B, M>>(
    model: &mut M,
    weights: &mut W,
    samples: &[M::Sample],
    cfg: &CalibrationConfig,
    budget: &ActivationBudget,
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
    let spill = Spill::new(budget);
    let mut layers: Vec<LayerReport> = Vec::new();
    let mut pending: Pending<M::Stack> = Vec::new();
    for stack in &stacks[..=last] {
        let target = cfg.sparsity.of(stack.tower);
        let prune = pruned_stack(stack);
        if !needs_data {
            if prune {
                for b in 0..stack.blocks {
                    progress(&stack.name, b, stack.blocks);
                    weights.load(model, stack.id, b)?;
                    prune_block(
                        model,
                        weights,
                        stack,
                        b,
                        target,
                        cfg,
                        None,
                        false,
                        &mut layers,
                        &mut pending,
                        sink,
                    )?;
                    weights.release(model, stack.id, b)?;
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
        let mut inputs = Generation::new(&spill);
        for c in &contexts {
            let input = model.stack_input(stack.id, c).map_err(model_err)?;
            inputs.push(model, input)?;
        }
        let block_targets = match (prune, cfg.allocation) {
            (false, _) => vec![0.0; stack.blocks],
            (true, Allocation::Uniform) => vec![target; stack.blocks],
            (true, Allocation::Owl(owl)) => owl_targets(
                model, weights, stack, &inputs, target, &owl, cfg.block, &spill,
            )?,
        };
        let ends = stack.id != stacks[last].id;
        // The output pass (see `Prunable::output_options`), from the same inputs.
        let out_options = ends
            .then(|| model.output_options(stack.id, cfg.block))
            .flatten();
        let mut output_pass = out_options.map(|_| inputs.share());
        let pruner_cfg = cfg.pruner_config(stack.tower);
        // The last block's outputs, for `end_stack`.
        let mut outputs: Vec<Hidden<B>> = Vec::new();
        let mut kept = Generation::<B, ()>::new(&spill);
        for (b, &block_target) in block_targets.iter().enumerate().take(stack.blocks) {
            let block_name = format!("{}.{b}", stack.name);
            let final_block = b + 1 == stack.blocks;
            weights.load(model, stack.id, b)?;
            let stats_pass = prune && cfg.method != Method::Magnitude;
            // Dense propagation: the statistics pass's outputs are the next inputs.
            let next_from_stats = stats_pass && cfg.propagation == Propagation::Dense;
            let mut next = Generation::new(&spill);
            let mut groups: Groups = Vec::new();
            // Moves a sample on: its next input, or (last block) its output for `end_stack`.
            let mut advance = |model: &M,
                               next: &mut Generation<B, M::BlockInput>,
                               input: M::BlockInput,
                               out: Tensor<B, 3>,
                               keep_output: bool|
             -> Result<(), CalibrateError> {
                if final_block {
                    if keep_output {
                        outputs.push(kept.keep(out.clone())?);
                    }
                    // (still called: a model may record states on the way)
                    drop(model.with_hidden(input, out));
                    Ok(())
                } else {
                    next.push(model, model.with_hidden(input, out))
                }
            };
            if prune {
                progress(&stack.name, b, stack.blocks);
            }
            if stats_pass {
                let listed = listed_keys(model, stack.id, b);
                for i in 0..inputs.len() {
                    let input = inputs.get(model, i)?;
                    let out = collect_stats(
                        model,
                        stack.id,
                        b,
                        &input,
                        &pruner_cfg,
                        cfg.block,
                        &block_name,
                        &listed,
                        &mut groups,
                    )?;
                    if next_from_stats {
                        advance(model, &mut next, input, out, out_options.is_none())?;
                    }
                }
            }
            if prune {
                // The dense weights are run again after pruning only by the output pass, or
                // when the next inputs come through the dense block.
                let keep_dense = cfg.propagation == Propagation::Dense
                    && (!next_from_stats || output_pass.is_some());
                prune_block(
                    model,
                    weights,
                    stack,
                    b,
                    block_target,
                    cfg,
                    stats_pass.then_some(&mut groups),
                    keep_dense,
                    &mut layers,
                    &mut pending,
                    sink,
                )?;
            }
            drop(groups);
            if !next_from_stats {
                for i in 0..inputs.len() {
                    let input = inputs.get(model, i)?;
                    let out = model
                        .run_block(stack.id, b, &input, cfg.block, &mut no_tap)
                        .map_err(model_err)?;
                    advance(model, &mut next, input, out, out_options.is_none())?;
                }
            }
            if let (Some(options), Some(pass)) = (out_options, &output_pass) {
                let mut pass_next = Generation::new(&spill);
                for i in 0..pass.len() {
                    let input = pass.get(model, i)?;
                    let out = model
                        .run_block(stack.id, b, &input, options, &mut no_tap)
                        .map_err(model_err)?;
                    advance(model, &mut pass_next, input, out, true)?;
                }
                output_pass = Some(pass_next);
            }
            weights.release(model, stack.id, b)?;
            inputs = next;
        }
        drop(inputs);
        drop(output_pass);
        if ends {
            for (ctx, h) in contexts.iter_mut().zip(&outputs) {
                model
                    .end_stack(stack.id, h.load()?, ctx, cfg.block)
                    .map_err(model_err)?;
            }
        }
        if spill.spilled() > 0 {
            tracing::debug!(
                stack = %stack.name,
                spilled_mib = spill.spilled() >> 20,
                "activations spilled so far"
            );
        }
    }
    for (stack, block, key, values, dims) in pending {
        set_linear(model, stack, block, &key, |device| {
            Tensor::from_data(TensorData::new(values, dims), device)
        });
    }
    Ok(layers)
}

/// Runs one input through block `b` of `stack`, feeding each tapped linear input to its
/// group's pruner; returns the output.
#[allow(clippy::too_many_arguments)]
fn collect_stats<B: Backend, M: Prunable<B>>(
    model: &M,
    stack: M::Stack,
    b: usize,
    input: &M::BlockInput,
    pruner_cfg: &PrunerConfig,
    options: BlockOptions,
    block_name: &str,
    listed: &[Arc<str>],
    groups: &mut Groups,
) -> Result<Tensor<B, 3>, CalibrateError> {
    let mut failure: Option<CalibrateError> = None;
    let mut tap = |linears: &[&Linear<B>], x: &Tensor<B, 3>| {
        if failure.is_some() {
            return;
        }
        let [n, l, d] = x.dims();
        let key = match tap_key(linears, listed, block_name) {
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
    match failure {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// Masks of every linear of block `b` (from the block's statistics in `groups`, or by
/// magnitude), handed to `sink`; each pruned weight handed to `weights` and set in the model
/// (pruned propagation) or queued for the end (dense propagation of a model held whole). A
/// linear's dense weight is dropped once copied for pruning unless `keep_dense` (the block
/// still runs dense), and a group's pruner once its last linear is pruned.
#[allow(clippy::too_many_arguments)]
fn prune_block<B: Backend, M: Prunable<B>, W: BlockWeights<B, M>>(
    model: &mut M,
    weights: &mut W,
    stack: &StackInfo<M::Stack>,
    b: usize,
    target: f64,
    cfg: &CalibrationConfig,
    mut groups: Option<&mut Groups>,
    keep_dense: bool,
    layers: &mut Vec<LayerReport>,
    pending: &mut Pending<M::Stack>,
    sink: MaskSink,
) -> Result<(), CalibrateError> {
    let block_name = format!("{}.{b}", stack.name);
    let spec = PruneSpec::new(cfg.pattern, target).map_err(at(&block_name))?;
    let magnitude = PrunerConfig::default_for(Method::Magnitude);
    let keys = block_keys(&model.block_linears(stack.id, b), &block_name)?;
    for linear in model.block_linears(stack.id, b) {
        let [d_in, _] = linear.weight.dims();
        spec.validate(d_in)
            .map_err(at(&format!("{}.weight", linear.key)))?;
    }
    let mut done: Vec<Arc<str>> = Vec::with_capacity(keys.len());
    for key in &keys {
        let full = format!("{key}.weight");
        let (mut values, d_in, d_out) = {
            let linears = model.block_linears(stack.id, b);
            let linear = linears
                .iter()
                .find(|l| l.key == *key)
                .expect("listed above");
            let [d_in, d_out] = linear.weight.dims();
            (host(&linear.weight.val()), d_in, d_out)
        };
        if !keep_dense {
            // (the values are in `values`; the layer gets them back pruned, or is reloaded)
            set_linear(model, stack.id, b, key, |device| {
                Tensor::zeros([0, 0], device)
            });
        }
        let output = {
            let w = Weights::new(&values, d_in, d_out).map_err(at(&full))?;
            match groups.as_deref_mut().filter(|_| cfg.method != Method::Magnitude) {
                None => magnitude.build(d_in).map_err(at(&full))?.prune(w, &spec),
                Some(groups) => match groups.iter().position(|(k, _)| k.contains(key)) {
                    Some(g) => {
                        let last_of_group = groups[g]
                            .0
                            .iter()
                            .all(|k| k == key || done.contains(k));
                        if last_of_group {
                            let (_, pruner) = groups.remove(g);
                            pruner.prune_once(w, &spec)
                        } else {
                            groups[g].1.prune(w, &spec)
                        }
                    }
                    None => {
                        return Err(CalibrateError::Input(format!(
                            "{full}: no calibration input reached this linear (its block does not tap it)"
                        )));
                    }
                },
            }
            .map_err(at(&full))?
        };
        done.push(Arc::clone(key));
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
        drop(output.weights);
        sink(&full, output.mask)?;
        weights.pruned(&full, &values, d_in, d_out)?;
        match cfg.propagation {
            Propagation::Pruned => set_linear(model, stack.id, b, key, |device| {
                Tensor::from_data(TensorData::new(values, [d_in, d_out]), device)
            }),
            Propagation::Dense if weights.holds_model() => {
                pending.push((stack.id, b, Arc::clone(key), values, [d_in, d_out]));
            }
            Propagation::Dense => {}
        }
    }
    Ok(())
}

/// OWL per-block sparsities of one stack: a dense pass (each block loaded, run on the
/// stack's inputs, released) collecting ‖x_j‖ of every linear input, the outlier ratio of
/// |W|·‖x‖ per block, then `allocate`. Its own generations of activations; the stack's
/// inputs are left for the pruning pass.
#[allow(clippy::too_many_arguments)]
fn owl_targets<B: Backend, M: Prunable<B>, W: BlockWeights<B, M>>(
    model: &mut M,
    weights: &mut W,
    stack: &StackInfo<M::Stack>,
    inputs: &Generation<B, M::BlockInput>,
    target: f64,
    owl: &OwlConfig,
    options: BlockOptions,
    spill: &Spill,
) -> Result<Vec<f64>, CalibrateError> {
    let mut ratios = Vec::with_capacity(stack.blocks);
    let mut current: Option<Generation<B, M::BlockInput>> = None;
    for b in 0..stack.blocks {
        let block_name = format!("{}.{b}", stack.name);
        weights.load(model, stack.id, b)?;
        let mut stats: Vec<(Vec<Arc<str>>, ActivationStats)> = Vec::new();
        let mut failure = None;
        let listed = listed_keys(model, stack.id, b);
        let source = current.as_ref().unwrap_or(inputs);
        let mut next = Generation::new(spill);
        for i in 0..source.len() {
            let input = source.get(model, i)?;
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
            let out = model
                .run_block(stack.id, b, &input, options, &mut tap)
                .map_err(model_err)?;
            let advanced = model.with_hidden(input, out);
            if b + 1 < stack.blocks {
                next.push(model, advanced)?;
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        let linears = model.block_linears(stack.id, b);
        let block_weights: Vec<(Arc<str>, Vec<f32>, usize, usize)> = linears
            .iter()
            .map(|l| {
                let [d_in, d_out] = l.weight.dims();
                (Arc::clone(&l.key), host(&l.weight.val()), d_in, d_out)
            })
            .collect();
        let norms: Vec<(Vec<Arc<str>>, Vec<f64>)> =
            stats.iter().map(|(k, s)| (k.clone(), s.norms())).collect();
        let mut owl_layers = Vec::new();
        for (key, values, d_in, d_out) in &block_weights {
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
        drop(owl_layers);
        drop(block_weights);
        weights.release(model, stack.id, b)?;
        current = Some(next);
    }
    allocate(&ratios, target, owl.lambda).map_err(at(&stack.name))
}
