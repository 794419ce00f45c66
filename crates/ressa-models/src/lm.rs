//! The language-model seam: what a vision-language model needs from the language model behind
//! its projection — embeddings, teacher forcing, prefill and step decoding with the model's own
//! cache type, special tokens, and its stacks for pruning ([`Prunable`]). T5 (encoder-decoder)
//! and LLaMA (decoder-only) implement it; the composites are generic over it, so a new
//! language model is one implementation of this trait and a line in the registry.

use std::fmt::Debug;

use burn::prelude::*;

use crate::config::LmConfig;
use crate::error::Result;
use crate::prunable::Prunable;
use crate::sparse_kernels::KernelRows;
use crate::weights::Loader;

/// Special tokens of the language model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialTokens {
    /// T5's `decoder_start_token_id`; a decoder-only model's bos.
    pub decoder_start: u32,
    pub eos: u32,
    pub pad: u32,
}

/// Where a batch of prompts is padded for generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// T5: the encoder reads a padded prompt under its mask.
    Right,
    /// Decoder-only: generation continues every row's last token.
    Left,
}

/// The language model's input sequence as the composite builds it: image features and prompt
/// embeddings, in sequence order.
#[derive(Debug, Clone)]
pub struct LmInput<B: Backend> {
    /// [B, L, D].
    pub embeds: Tensor<B, 3>,
    /// 1 (attend) / 0 (padding), [B, L].
    pub mask: Tensor<B, 2>,
    /// The sequence's token ids on the host, image positions holding the model's image
    /// placeholder id (a decoder-only model's generated rows start with them), [B][L].
    pub ids: Vec<Vec<u32>>,
    /// `mask` on the host.
    pub host_mask: Vec<Vec<u32>>,
}

/// Logits aligned with the target tokens they predict.
#[derive(Debug, Clone)]
pub struct TeacherForced<B: Backend> {
    /// [B, T, vocab]: position `t` predicts target token `t`.
    pub logits: Tensor<B, 3>,
    /// [B, T] (0 where masked).
    pub targets: Tensor<B, 2, Int>,
    /// 1 at target positions, 0 at padding, [B, T].
    pub mask: Tensor<B, 2>,
    /// Target tokens in the batch.
    pub tokens: usize,
}

/// A decoding session's start: the state, every row's starting tokens, and how many leading
/// tokens of a row are input rather than generated.
pub struct Start<S> {
    pub state: S,
    pub rows: Vec<Vec<u32>>,
    pub input_len: usize,
}

/// One calibration sample of a language model: its input sequence and the target tokens
/// teacher-forced after each row (none: no target).
#[derive(Debug, Clone)]
pub struct LmSample<B: Backend> {
    pub input: LmInput<B>,
    pub targets: Vec<Vec<u32>>,
}

impl<B: Backend> LmSample<B> {
    /// One target row per input row (empty rows when the sample has none).
    pub fn row_targets(&self) -> Vec<Vec<u32>> {
        let b = self.input.embeds.dims()[0];
        if self.targets.len() == b {
            self.targets.clone()
        } else {
            vec![Vec::new(); b]
        }
    }
}

/// A language model a vision-language model can sit on.
pub trait LanguageModel<B: Backend>:
    Module<B>
    + burn::module::ModuleDisplay
    + Prunable<B, Sample = LmSample<B>>
    + Clone
    + Debug
    + Send
    + Sized
{
    /// Its `text_config`.
    type Config: LmConfig;
    /// Decoding state (KV caches and what the decoder reads).
    type Decoding;

    /// Builds the model from a loader rooted at its keys (`language_model.`).
    fn load(cfg: &Self::Config, vb: &Loader<B>) -> Result<Self>;
    /// Width of the input embeddings.
    fn hidden_size(&self) -> usize;
    fn vocab_size(&self) -> usize;
    fn special_tokens(&self) -> SpecialTokens;
    /// Where prompts are padded for generation.
    fn padding(&self) -> Padding;
    /// `transformers`' `is_encoder_decoder`: generated rows start with the decoder start
    /// token, which `generate(min_length=…)` counts.
    fn is_encoder_decoder(&self) -> bool;
    /// Longest sequence the model can position (`None`: no limit).
    fn context_window(&self) -> Option<usize>;
    /// Token embeddings [B, L, D] of the prompt.
    fn embed(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3>;
    /// A tokenized target text as the model is trained to produce it (a decoder-only model:
    /// without the tokenizer's bos, with eos appended).
    fn target_ids(&self, tokenized: &[u32]) -> Vec<u32>;
    /// Teacher-forced logits of `targets` (one row per batch row) after `input`.
    fn teacher_forced(&self, input: LmInput<B>, targets: &[Vec<u32>]) -> Result<TeacherForced<B>>;
    /// Logits over the positions the model computes for `input` and `continuation`: T5 decodes
    /// `continuation` as `decoder_input_ids` ([B, Ld, vocab], required); a decoder-only model
    /// covers `[input ; continuation]`.
    fn logits(
        &self,
        input: LmInput<B>,
        continuation: Option<Tensor<B, 2, Int>>,
    ) -> Result<Tensor<B, 3>>;
    /// A decoding session over `expand` copies of every row of `input`.
    fn start(&self, input: LmInput<B>, expand: usize) -> Result<Start<Self::Decoding>>;
    /// One step on the last token of every row → logits [rows, vocab]. A decoder-only session's
    /// first step runs the whole input instead.
    fn step(&self, state: &mut Self::Decoding, last: &[u32]) -> Tensor<B, 2>;
    /// Keeps rows `rows`, in that order (beam reordering).
    fn reorder(&self, state: &mut Self::Decoding, rows: &[usize]);
    /// Rows one call of `stack`'s linears sees, for the sparse kernels' cost model.
    fn kernel_rows(&self, stack: Self::Stack, rows: &KernelRows, images_tokens: usize) -> usize;
}
