//! Layer-streamed pruning: calibration over a [`Streamed`] model, whose block linears are read
//! from the memory-mapped checkpoint when their block runs and dropped after, every pruned
//! weight written to a [`StreamedOutput`] as soon as it is known. Only the model's parts
//! outside the blocks, one block, its pruning workspace and the calibration activations are
//! ever held; what that amounts to is estimated before any work ([`MemoryPlan`]).

use burn::prelude::*;
use ressa_models::VisionLanguageModel;
use ressa_models::pretrained::StreamedOutput;
use ressa_models::prunable::StackInfo;
use ressa_models::streaming::{LinearSource, Streamed};

use crate::calibrate::{
    ActivationBudget, Allocation, BlockWeights, CalibrateError, CalibrationConfig, LayerReport,
    MaskSink, Progress, calibrate_blocks,
};
use crate::{ComparisonGroup, Method};

/// [`BlockWeights`] of a streamed model: blocks read from the checkpoint, pruned weights
/// written to the output.
pub struct StreamedWeights<'a, B: Backend> {
    pub source: LinearSource<B>,
    pub output: &'a mut StreamedOutput,
}

impl<B: Backend, M: VisionLanguageModel<B>> BlockWeights<B, M> for StreamedWeights<'_, B> {
    fn load(&mut self, model: &mut M, stack: M::Stack, block: usize) -> Result<(), CalibrateError> {
        for linear in model.block_linears_mut(stack, block) {
            self.source.load_linear(linear)?;
        }
        Ok(())
    }

    fn release(
        &mut self,
        model: &mut M,
        stack: M::Stack,
        block: usize,
    ) -> Result<(), CalibrateError> {
        for linear in model.block_linears_mut(stack, block) {
            self.source.release_linear(linear);
        }
        return_freed_memory();
        Ok(())
    }

    fn pruned(
        &mut self,
        name: &str,
        values: &[f32],
        d_in: usize,
        d_out: usize,
    ) -> Result<(), CalibrateError> {
        self.output.write_linear(name, values, d_in, d_out)?;
        // (the linear's pruning workspace is free now)
        return_freed_memory();
        Ok(())
    }

    fn holds_model(&self) -> bool {
        false
    }
}

/// Hands the memory freed by a block back to the system. glibc keeps freed allocations below
/// its mmap threshold (which grows to 32 MiB as large buffers are freed) in its per-thread
/// arenas; with the pruners' and the calibration's many threads that retention reached 1.1 GiB
/// on the Vicuna-7B-sized model (`malloc_trim` returned it: 3.84 → 2.65 GiB resident),
/// memory a `--memory-budget` run does not have.
fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap memory; no pointer is invalidated.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Prunes a streamed model: calibration with blocks read from its checkpoint and every pruned
/// weight written to `output`, which [`StreamedOutput::finish`] then completes with the
/// untouched tensors. Masks and weights are those of [`crate::calibrate::calibrate_and_prune`]
/// on the loaded model.
#[allow(clippy::too_many_arguments)]
pub fn prune_streamed<B: Backend, M: VisionLanguageModel<B>>(
    streamed: &mut Streamed<B, M>,
    output: &mut StreamedOutput,
    samples: &[M::Sample],
    cfg: &CalibrationConfig,
    budget: &ActivationBudget,
    progress: Progress,
    sink: MaskSink,
) -> Result<Vec<LayerReport>, CalibrateError> {
    let mut weights = StreamedWeights {
        source: streamed.source().clone(),
        output,
    };
    calibrate_blocks(
        &mut streamed.model,
        &mut weights,
        samples,
        cfg,
        budget,
        progress,
        sink,
    )
}

/// What a streamed prune holds at once besides the process's own memory (the weights outside
/// the blocks are part of that, once the model is open): the largest block in f32 plus its
/// pruning workspace, an estimate from the linears' shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    /// f32 bytes of the weights read outside the blocks.
    pub resident: u64,
    /// The block with the largest need: its weights…
    pub block: u64,
    /// …and its pruning workspace (statistics, copies, factorizations).
    pub workspace: u64,
}

impl MemoryPlan {
    /// The block's weights and workspace.
    pub fn peak_block(&self) -> u64 {
        self.block + self.workspace
    }
}

/// Workspace of pruning one block whose linears are `dims` (`[d_in, d_out]`, block order),
/// for `method` (`per_matrix`: Wanda's selection over whole matrices).
pub fn workspace_bytes(method: Method, per_matrix: bool, dims: &[[usize; 2]]) -> u64 {
    let n = |[i, o]: [usize; 2]| (i * o) as u64;
    let sq = |[i, _]: [usize; 2]| (i * i) as u64;
    // the host copy of a weight, its mask and the pruned result
    let copies = dims.iter().map(|&d| 9 * n(d)).max().unwrap_or(0);
    match method {
        Method::Magnitude => copies + dims.iter().map(|&d| 17 * n(d)).max().unwrap_or(0),
        Method::Wanda if per_matrix => copies + dims.iter().map(|&d| 17 * n(d)).max().unwrap_or(0),
        Method::Wanda => copies + dims.iter().map(|&d| 2 * n(d)).max().unwrap_or(0),
        Method::Dsnot => copies + dims.iter().map(|&d| 24 * n(d)).max().unwrap_or(0),
        Method::SparseGpt => {
            // Statistics: a d_in² f32 sum per linear (an upper bound: linears reading the same
            // input share one). Pruning linear l: the sums of the linears after it, two d_in²
            // f64 matrices (factor and inverse) of which only the lower triangles are ever
            // touched (resident), and the reconstruction's copies.
            let stats: u64 = dims.iter().map(|&d| 4 * sq(d)).sum();
            let pruning = (0..dims.len())
                .map(|l| {
                    let later: u64 = dims[l + 1..].iter().map(|&d| 4 * sq(d)).sum();
                    later + 8 * sq(dims[l]) + copies
                })
                .max()
                .unwrap_or(0);
            stats.max(pruning)
        }
    }
}

/// The [`MemoryPlan`] of pruning `streamed` with `cfg`: the block of the stacks calibration
/// runs (each up to the last pruned one, or only the pruned ones without calibration data)
/// with the largest weights plus workspace.
pub fn memory_plan<B: Backend, M: VisionLanguageModel<B>>(
    streamed: &Streamed<B, M>,
    cfg: &CalibrationConfig,
) -> MemoryPlan {
    let model = &streamed.model;
    let stacks = model.stacks();
    let pruned = |s: &StackInfo<M::Stack>| cfg.sparsity.of(s.tower) > 0.0 && s.blocks > 0;
    let needs_data =
        cfg.method != Method::Magnitude || matches!(cfg.allocation, Allocation::Owl(_));
    let last = stacks.iter().rposition(pruned);
    let mut plan = MemoryPlan {
        resident: streamed.resident_bytes(),
        block: 0,
        workspace: 0,
    };
    for (i, stack) in stacks.iter().enumerate() {
        let runs = last.is_some_and(|l| i <= l) && (needs_data || pruned(stack));
        if !runs {
            continue;
        }
        let per_matrix = cfg.wanda_group.unwrap_or(match stack.tower {
            ressa_models::prunable::Tower::Vision => ComparisonGroup::PerMatrix,
            _ => ComparisonGroup::PerOutput,
        }) == ComparisonGroup::PerMatrix;
        for b in 0..stack.blocks {
            let dims: Vec<[usize; 2]> = model
                .block_linears(stack.id, b)
                .iter()
                .filter_map(|l| streamed.source().deferred_dims(&l.key))
                .collect();
            let block = streamed.block_bytes(stack.id, b);
            let workspace = if pruned(stack) {
                workspace_bytes(cfg.method, per_matrix, &dims)
            } else {
                0
            };
            if block + workspace > plan.block + plan.workspace {
                plan.block = block;
                plan.workspace = workspace;
            }
        }
    }
    plan
}

/// A size that is not a number with a known unit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?}: expected a size such as 4GiB, 512MiB or 3GB")]
pub struct SizeError(pub String);

/// A size for `--memory-budget` and friends: a number with an optional unit, B,
/// KiB/MiB/GiB/TiB (or K/M/G/T, powers of 1024) or KB/MB/GB/TB (powers of 1000).
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let bad = || SizeError(text.to_string());
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number.parse().map_err(|_| bad())?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024f64.powi(2),
        "g" | "gib" => 1024f64.powi(3),
        "t" | "tib" => 1024f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        _ => return Err(bad()),
    };
    let bytes = value * scale;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes as u64)
}
