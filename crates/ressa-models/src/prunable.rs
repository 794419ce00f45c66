//! The pruning seam: a model is stacks of blocks of linears, and can run one block on cached
//! inputs while each linear reports its input (burn has no forward hooks). Calibration (in
//! `ressa-prune`) is written against [`Prunable`] only, so a new architecture is one
//! implementation of this trait, with its own types for a stack's id, a block's input and the
//! per-sample state carried from one stack to the next.

use std::fmt::Debug;

use burn::prelude::*;

use crate::error::{ModelError, Result};
use crate::linear::Linear;
use crate::nn::Tap;
use crate::vlm::VlmInputs;

/// The unit of sparsity allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tower {
    Vision,
    /// The modality connector: InstructBLIP's Q-Former (LLaVA's projector).
    QFormer,
    Language,
}

impl Tower {
    pub fn name(self) -> &'static str {
        match self {
            Tower::Vision => "vision",
            Tower::QFormer => "qformer",
            Tower::Language => "language",
        }
    }
}

/// A sequence of blocks run one after the other, e.g. `language_model.encoder.block`.
#[derive(Debug, Clone, PartialEq)]
pub struct StackInfo<S> {
    pub id: S,
    pub tower: Tower,
    /// HF key prefix of the blocks (block `i` is `{name}.{i}`), for progress and reports.
    pub name: String,
    pub blocks: usize,
}

/// One calibration sample of a vision-language model: its inputs (usually batch 1) and the
/// target tokens teacher-forced after each row's prompt (as the language model wants them,
/// see [`crate::lm::LanguageModel::target_ids`]; empty: none).
#[derive(Debug, Clone)]
pub struct CalibrationSample<B: Backend> {
    pub inputs: VlmInputs<B>,
    pub targets: Vec<Vec<u32>>,
}

/// Options of a calibration block run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockOptions {
    /// T5 blocks after the first get the shared relative position bias (what inference does).
    /// `false` reproduces the reference code, whose catcher replays `position_bias=None`, so
    /// blocks ≥ 1 run with the attention mask only during calibration.
    pub t5_position_bias_after_block0: bool,
}

impl Default for BlockOptions {
    fn default() -> Self {
        Self {
            t5_position_bias_after_block0: true,
        }
    }
}

/// A model that can be pruned block by block.
///
/// Calibration runs, per sample: [`Prunable::context`] once; then for each stack in order
/// [`Prunable::stack_input`], every block through [`Prunable::run_block`] (outputs fed to the
/// next block with [`Prunable::with_hidden`]), and [`Prunable::end_stack`] with the last
/// block's output, which records what later stacks read (e.g. the vision features the
/// Q-Former attends to), so no tower runs twice.
pub trait Prunable<B: Backend> {
    /// What one calibration sample is.
    type Sample;
    /// Names a stack (an enum of the model's stacks, say).
    type Stack: Copy + Eq + Debug;
    /// What a block needs besides its weights, for one sample.
    type BlockInput: Clone;
    /// Per-sample state carried from stack to stack.
    type Context;

    /// The stacks in calibration order.
    fn stacks(&self) -> Vec<StackInfo<Self::Stack>>;
    /// The state of a sample before any stack ran.
    fn context(&self, sample: &Self::Sample) -> Result<Self::Context>;
    /// Inputs of block 0 of `stack` (the stacks before it have ended on this context).
    fn stack_input(&self, stack: Self::Stack, ctx: &Self::Context) -> Result<Self::BlockInput>;
    /// Runs block `block` of `stack`; every linear's input goes to `tap`. Returns the block's
    /// output hidden state.
    fn run_block(
        &self,
        stack: Self::Stack,
        block: usize,
        input: &Self::BlockInput,
        options: BlockOptions,
        tap: Tap<B>,
    ) -> Result<Tensor<B, 3>>;
    /// The same block context with a new hidden state (the previous block's output).
    fn with_hidden(&self, input: Self::BlockInput, hidden: Tensor<B, 3>) -> Self::BlockInput;
    /// Records the output of `stack`'s last block in the context, for the stacks after it.
    fn end_stack(
        &self,
        stack: Self::Stack,
        hidden: Tensor<B, 3>,
        ctx: &mut Self::Context,
        options: BlockOptions,
    ) -> Result<()>;
    /// The block's prunable linears (each knows its HF name, [`Linear::key`]).
    fn block_linears(&self, stack: Self::Stack, block: usize) -> Vec<&Linear<B>>;
    fn block_linears_mut(&mut self, stack: Self::Stack, block: usize) -> Vec<&mut Linear<B>>;

    /// Options of the forward whose last-block output [`Prunable::end_stack`] must receive,
    /// when they differ from `options` (T5 under the reference's bias mode: its blocks ≥ 1 are
    /// calibrated without the position bias, but the decoder reads the output of a real
    /// encoder forward). Calibration then carries a second hidden state per sample through
    /// the stack, every block run on it once more after the block's weights are final for
    /// propagation (pruned, or dense on the RESSA path), and advanced with
    /// [`Prunable::with_hidden`] like the first. Default: `None`, the calibration pass's
    /// output is the stack's output.
    fn output_options(&self, stack: Self::Stack, options: BlockOptions) -> Option<BlockOptions> {
        let _ = (stack, options);
        None
    }

    /// Takes the hidden state out of a block input: `(frame, hidden)`, the frame holding
    /// everything else (masks, biases, what a cross-attention reads) and an empty tensor in
    /// the hidden state's place. [`Prunable::join_hidden`] puts them back together. Calibration
    /// uses the pair to spill the calibration set's hidden states to disk between blocks when
    /// they exceed its memory budget. Default: the input back (`Err`), kept in memory whole.
    #[allow(clippy::type_complexity)]
    fn split_hidden(
        &self,
        input: Self::BlockInput,
    ) -> std::result::Result<(Self::BlockInput, Tensor<B, 3>), Self::BlockInput> {
        Err(input)
    }

    /// The block input `frame` (from [`Prunable::split_hidden`]) with `hidden` back in place:
    /// the input that was split, with no other effect (a model whose
    /// [`Prunable::with_hidden`] records states on the way implements this without it).
    fn join_hidden(&self, frame: Self::BlockInput, hidden: Tensor<B, 3>) -> Self::BlockInput {
        self.with_hidden(frame, hidden)
    }

    /// Linears outside the stacks that calibration never runs (a language model's output
    /// head, layers after the last one the features read): streamed pruning leaves their
    /// weights on disk instead of loading them. Default: none.
    fn idle_linears(&self) -> Vec<&Linear<B>> {
        Vec::new()
    }
}

/// The empty tensor [`Prunable::split_hidden`] leaves in a frame.
pub fn empty_hidden<B: Backend>(device: &B::Device) -> Tensor<B, 3> {
    Tensor::zeros([0, 0, 0], device)
}

/// Every prunable linear with its tower, stack by stack, block by block.
pub fn prunable_linears<B: Backend, M: Prunable<B>>(model: &M) -> Vec<(Tower, &Linear<B>)> {
    let mut out = Vec::new();
    for s in model.stacks() {
        for b in 0..s.blocks {
            out.extend(
                model
                    .block_linears(s.id, b)
                    .into_iter()
                    .map(|l| (s.tower, l)),
            );
        }
    }
    out
}

/// Calls `f(tower, linear)` on every prunable linear, stack by stack, block by block.
pub fn for_each_prunable_mut<B: Backend, M: Prunable<B>>(
    model: &mut M,
    mut f: impl FnMut(Tower, &mut Linear<B>),
) {
    for s in model.stacks() {
        for b in 0..s.blocks {
            for l in model.block_linears_mut(s.id, b) {
                f(s.tower, l);
            }
        }
    }
}

/// The error of a block input handed to a stack it does not belong to.
pub fn mismatch(stack: impl Debug) -> ModelError {
    ModelError::Input(format!(
        "calibration: a block input of another stack was given to stack {stack:?}"
    ))
}

/// The error of a stack whose inputs need an earlier stack that has not ended.
pub fn not_ready(stack: impl Debug, needs: &str) -> ModelError {
    ModelError::Input(format!(
        "calibration: stack {stack:?} needs {needs}, which no earlier stack produced"
    ))
}

/// A stack's name from the key of a linear in its block 0: the prefix before `.0.`
/// (`vision_model.encoder.layers.0.mlp.fc1` → `vision_model.encoder.layers`).
pub fn stack_name(first_key: Option<&str>) -> String {
    first_key
        .and_then(|k| k.split_once(".0.").map(|(p, _)| p.to_string()))
        .unwrap_or_default()
}
