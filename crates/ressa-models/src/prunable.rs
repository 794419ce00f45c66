//! The pruning seam: a model is towers → stacks of blocks → named linears, and can run one
//! block on cached inputs while reporting each linear's input (burn has no forward hooks).
//! Calibration (in `ressa-prune`) is written against [`Prunable`] only, so a new architecture
//! is one implementation of this trait.

use crate::linear::Linear;
use burn::prelude::*;

use crate::instructblip::{InstructBlip, LanguageModel, VlmInputs};
use crate::llama::{Rope, arange_positions};
use crate::nn::{Tap, causal_bias, key_padding_bias};

/// The unit of sparsity allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tower {
    Vision,
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
#[derive(Debug, Clone)]
pub struct StackInfo {
    pub tower: Tower,
    /// HF key prefix of the blocks: block `i` is `{prefix}.{i}`.
    pub prefix: &'static str,
    pub blocks: usize,
}

/// One calibration sample: model inputs plus teacher-forced decoder tokens (T5; a
/// decoder-only model reads its whole sequence from `inputs` and ignores them).
#[derive(Debug, Clone)]
pub struct CalibrationSample<B: Backend> {
    pub inputs: VlmInputs<B>,
    pub decoder_input_ids: Tensor<B, 2, Int>,
}

/// What a block needs besides its hidden state, per sample.
#[derive(Debug, Clone)]
pub enum BlockInput<B: Backend> {
    Vision {
        x: Tensor<B, 3>,
    },
    QFormer {
        x: Tensor<B, 3>,
        bias: Option<Tensor<B, 4>>,
        image: Tensor<B, 3>,
        queries: usize,
    },
    /// `bias` = relative position bias + key mask; `mask_bias` = key mask only.
    T5Encoder {
        x: Tensor<B, 3>,
        bias: Tensor<B, 4>,
        mask_bias: Tensor<B, 4>,
    },
    T5Decoder {
        x: Tensor<B, 3>,
        bias: Tensor<B, 4>,
        mask_bias: Tensor<B, 4>,
        encoder: Tensor<B, 3>,
        cross_bias: Tensor<B, 4>,
    },
    /// A LLaMA layer: causal + padding bias and the rotary tables of positions `0..L`.
    Llama {
        x: Tensor<B, 3>,
        bias: Tensor<B, 4>,
        rope: Rope<B>,
    },
}

impl<B: Backend> BlockInput<B> {
    pub fn hidden(&self) -> &Tensor<B, 3> {
        match self {
            BlockInput::Vision { x } => x,
            BlockInput::QFormer { x, .. } => x,
            BlockInput::T5Encoder { x, .. } => x,
            BlockInput::T5Decoder { x, .. } => x,
            BlockInput::Llama { x, .. } => x,
        }
    }

    /// The same context with a new hidden state (the previous block's output).
    pub fn with_hidden(mut self, new: Tensor<B, 3>) -> Self {
        match &mut self {
            BlockInput::Vision { x } => *x = new,
            BlockInput::QFormer { x, .. } => *x = new,
            BlockInput::T5Encoder { x, .. } => *x = new,
            BlockInput::T5Decoder { x, .. } => *x = new,
            BlockInput::Llama { x, .. } => *x = new,
        }
        self
    }
}

/// Options of a calibration block run.
#[derive(Debug, Clone, Copy)]
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
pub trait Prunable<B: Backend> {
    /// The stacks in calibration order.
    fn stacks(&self) -> Vec<StackInfo>;
    /// Inputs of block 0 of `stack` for one sample, from a forward pass with the current weights.
    fn stack_input(&self, stack: usize, sample: &CalibrationSample<B>) -> BlockInput<B>;
    /// Runs block `block` of `stack`; `tap` receives each linear's input under its name
    /// relative to the block. Returns the block's output hidden state.
    fn run_block(
        &self,
        stack: usize,
        block: usize,
        input: &BlockInput<B>,
        options: BlockOptions,
        tap: Tap<B>,
    ) -> Tensor<B, 3>;
    /// The block's prunable linears with names relative to the block.
    fn block_linears_mut(&mut self, stack: usize, block: usize) -> Vec<(String, &mut Linear<B>)>;
}

/// The HF keys (`<linear>.weight`) of every prunable linear of a configuration, in
/// calibration order, from a dry construction (nothing the size of the model is allocated).
pub fn prunable_weight_keys<B: Backend>(
    cfg: &crate::ModelConfig,
    device: &B::Device,
) -> crate::Result<Vec<String>> {
    let shapes = crate::weights::ShapeLog::default();
    let mut model = InstructBlip::<B>::load(cfg, &crate::weights::Loader::dry(&shapes, device))?;
    let mut keys = Vec::new();
    for (s, stack) in model.stacks().into_iter().enumerate() {
        for b in 0..stack.blocks {
            for (name, _) in model.block_linears_mut(s, b) {
                keys.push(format!("{}.{b}.{name}.weight", stack.prefix));
            }
        }
    }
    Ok(keys)
}

const VISION: usize = 0;
const QFORMER: usize = 1;
const T5_ENCODER: usize = 2;
const T5_DECODER: usize = 3;
/// With a decoder-only language model, stack 2 is its layers.
const LLAMA_LAYERS: usize = 2;

impl<B: Backend> Prunable<B> for InstructBlip<B> {
    fn stacks(&self) -> Vec<StackInfo> {
        let stack = |tower, prefix, blocks| StackInfo {
            tower,
            prefix,
            blocks,
        };
        let mut stacks = vec![
            stack(
                Tower::Vision,
                "vision_model.encoder.layers",
                self.vision_model.layers.len(),
            ),
            stack(
                Tower::QFormer,
                "qformer.encoder.layer",
                self.qformer.layers.len(),
            ),
        ];
        match &self.language_model {
            LanguageModel::Llama(llama) => stacks.push(stack(
                Tower::Language,
                "language_model.model.layers",
                llama.layers.len(),
            )),
            LanguageModel::T5(t5) => {
                stacks.push(stack(
                    Tower::Language,
                    "language_model.encoder.block",
                    t5.encoder.blocks.len(),
                ));
                stacks.push(stack(
                    Tower::Language,
                    "language_model.decoder.block",
                    t5.decoder.blocks.len(),
                ));
            }
        }
        stacks
    }

    fn stack_input(&self, stack: usize, sample: &CalibrationSample<B>) -> BlockInput<B> {
        let inputs = &sample.inputs;
        if let (LanguageModel::Llama(llama), LLAMA_LAYERS) = (&self.language_model, stack) {
            let enc = self.encode(inputs);
            let [b, l, _] = enc.hidden.dims();
            let device = enc.hidden.device();
            return BlockInput::Llama {
                bias: llama.attention_bias(enc.mask, l, 0),
                rope: llama.rope(&arange_positions(b, l), &device),
                x: enc.hidden,
            };
        }
        match stack {
            VISION => BlockInput::Vision {
                x: self
                    .vision_model
                    .embeddings
                    .forward(inputs.pixel_values.clone()),
            },
            QFORMER => {
                let image = self.vision_model.forward(inputs.pixel_values.clone());
                let (queries, text) =
                    self.qformer_queries(image.dims()[0], inputs.qformer_text.clone());
                let q = queries.dims()[1];
                let (x, bias) = self.qformer.embed(queries, text);
                BlockInput::QFormer {
                    x,
                    bias,
                    image,
                    queries: q,
                }
            }
            T5_ENCODER => {
                let (_, _, projected) =
                    self.image_features(inputs.pixel_values.clone(), inputs.qformer_text.clone());
                let (x, mask) = self.encoder_embeds(projected, inputs);
                let l = x.dims()[1];
                let mask_bias = key_padding_bias(mask);
                BlockInput::T5Encoder {
                    bias: self.language_model.encoder.position_bias(0, l, l) + mask_bias.clone(),
                    mask_bias,
                    x,
                }
            }
            T5_DECODER => {
                let enc = self.encode(inputs);
                let x = self.language_model.embed(sample.decoder_input_ids.clone());
                let l = x.dims()[1];
                let mask_bias = causal_bias(l, l, 0, &x.device());
                BlockInput::T5Decoder {
                    bias: self.language_model.decoder.position_bias(0, l, l) + mask_bias.clone(),
                    mask_bias,
                    encoder: enc.hidden,
                    cross_bias: key_padding_bias(enc.mask),
                    x,
                }
            }
            _ => panic!("stack {stack} out of range"),
        }
    }

    fn run_block(
        &self,
        stack: usize,
        block: usize,
        input: &BlockInput<B>,
        options: BlockOptions,
        tap: Tap<B>,
    ) -> Tensor<B, 3> {
        let position = |bias: &Tensor<B, 4>, mask_bias: &Tensor<B, 4>| {
            if block == 0 || options.t5_position_bias_after_block0 {
                bias.clone()
            } else {
                mask_bias.clone()
            }
        };
        match (stack, input) {
            (VISION, BlockInput::Vision { x }) => {
                self.vision_model.layers[block].forward_tapped(x.clone(), tap)
            }
            (
                QFORMER,
                BlockInput::QFormer {
                    x,
                    bias,
                    image,
                    queries,
                },
            ) => self.qformer.layers[block].forward(
                x.clone(),
                bias.clone(),
                image.clone(),
                *queries,
                tap,
            ),
            (T5_ENCODER, BlockInput::T5Encoder { x, bias, mask_bias }) => self
                .language_model
                .encoder
                .blocks[block]
                .forward(x.clone(), Some(position(bias, mask_bias)), None, None, tap),
            (
                T5_DECODER,
                BlockInput::T5Decoder {
                    x,
                    bias,
                    mask_bias,
                    encoder,
                    cross_bias,
                },
            ) => self.language_model.decoder.blocks[block].forward(
                x.clone(),
                Some(position(bias, mask_bias)),
                Some((encoder, cross_bias)),
                None,
                tap,
            ),
            (LLAMA_LAYERS, BlockInput::Llama { x, bias, rope }) => match &self.language_model {
                LanguageModel::Llama(llama) => {
                    llama.layers[block].forward(x.clone(), bias.clone(), rope, None, tap)
                }
                LanguageModel::T5(_) => panic!("a LLaMA block input for a T5 model"),
            },
            _ => panic!("block input does not belong to stack {stack}"),
        }
    }

    fn block_linears_mut(&mut self, stack: usize, block: usize) -> Vec<(String, &mut Linear<B>)> {
        match (stack, &mut self.language_model) {
            (VISION, _) => self.vision_model.layers[block]
                .linears_mut()
                .into_iter()
                .map(|(n, l)| (n.to_string(), l))
                .collect(),
            (QFORMER, _) => self.qformer.layers[block].linears_mut(),
            (T5_ENCODER, LanguageModel::T5(t5)) => t5.encoder.blocks[block].linears_mut(),
            (T5_DECODER, LanguageModel::T5(t5)) => t5.decoder.blocks[block].linears_mut(),
            (LLAMA_LAYERS, LanguageModel::Llama(llama)) => llama.layers[block].linears_mut(),
            _ => panic!("stack {stack} out of range"),
        }
    }
}
