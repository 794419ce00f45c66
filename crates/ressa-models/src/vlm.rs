//! The vision-language model seam: what every command, the trainer and the experiment runner
//! need from a model family. A family (InstructBLIP / BLIP-2 over any [`LanguageModel`], or a
//! new one) implements [`VisionLanguageModel`] and is registered once in [`crate::family`];
//! generation, teacher forcing, pruning, repair, saving and sparse inference are written
//! against the trait.

use std::fmt::Debug;
use std::path::Path;

use burn::prelude::*;

use crate::error::{ModelError, Result};
use crate::lm::{LanguageModel, LmInput, Padding, SpecialTokens, TeacherForced};
use crate::prunable::{CalibrationSample, Prunable};
use crate::sparse_kernels::KernelRows;
use crate::weights::{Loader, ParamKeys};

/// Token ids [B, T] and their 1/0 mask.
pub type TextInput<B> = (Tensor<B, 2, Int>, Tensor<B, 2>);

/// Model inputs for one batch; masks are 1 (token) / 0 (padding).
#[derive(Debug, Clone)]
pub struct VlmInputs<B: Backend> {
    /// Preprocessed images [B, 3, H, W].
    pub pixel_values: Tensor<B, 4>,
    /// Q-Former instruction tokens [B, T] and mask (InstructBLIP).
    pub qformer_text: Option<TextInput<B>>,
    /// Language-model prompt tokens [B, L] (as the family's processor lays them out) and mask.
    pub input_ids: Tensor<B, 2, Int>,
    pub attention_mask: Tensor<B, 2>,
}

/// What a processor must produce for a model: sizes, tokenizers' ranges, prompt layout.
#[derive(Debug, Clone, PartialEq)]
pub struct InputSpec {
    /// Square input resolution of the vision tower.
    pub image_size: usize,
    /// The Q-Former reads the instruction (InstructBLIP): its vocabulary and position limit.
    pub qformer_text: Option<(usize, usize)>,
    /// Image placeholder id and how many the processor expands each `<image>` into (LLaVA).
    pub image_tokens: Option<(u32, usize)>,
    pub tokens: SpecialTokens,
    pub padding: Padding,
    pub vocab_size: usize,
    /// Longest language-model sequence (`None`: no limit).
    pub context_window: Option<usize>,
    /// Language-model positions each image occupies besides the prompt's own tokens.
    pub image_positions: usize,
}

/// A family's parsed `config.json`.
pub trait FamilyConfig: Clone + Debug + Send + Sync + Sized {
    fn from_json(text: &str, path: &Path) -> Result<Self>;

    fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json(&text, path)
    }

    /// The vision tower's input resolution (`vision_config.image_size`).
    fn image_size(&self) -> usize;

    /// The standard deviation `transformers` initialises the weight `key` with.
    fn init_std(&self, key: &str) -> f32;
}

/// A vision-language model family.
pub trait VisionLanguageModel<B: Backend>:
    Prunable<B, Sample = CalibrationSample<B>> + Module<B> + Clone + Debug + Send + Sized
{
    type Lm: LanguageModel<B>;
    type Config: FamilyConfig;

    /// Builds the model from a loader rooted at the checkpoint's top level; the model keeps
    /// the loader's parameter keys ([`VisionLanguageModel::param_keys`]).
    fn load(cfg: &Self::Config, vb: &Loader<B>) -> Result<Self>;
    fn language_model(&self) -> &Self::Lm;
    /// The HF key of every parameter read at load.
    fn param_keys(&self) -> &ParamKeys;
    /// What the processor must produce.
    fn input_spec(&self) -> InputSpec;
    /// The language model's input: image features merged with the prompt embeddings. Checks
    /// the inputs first (batch ≥ 1, non-empty prompt, ids within the vocabularies).
    fn lm_input(&self, inputs: &VlmInputs<B>) -> Result<LmInput<B>>;
    /// Rows one call of `stack`'s linears sees, for the sparse kernels' cost model.
    fn kernel_rows(&self, stack: Self::Stack, rows: &KernelRows) -> usize;
    /// The vision tower's patch features [B, patches, D] (class token left out, patches
    /// row-major): what the model's connector reads. A vision pretraining head reads them.
    fn vision_patches(&self, pixel_values: Tensor<B, 4>) -> Result<Tensor<B, 3>>;
    /// The model with its vision tower frozen: no gradient reaches the tower, so an optimiser
    /// leaves it as it is (InstructBLIP and LLaVA train with a frozen pretrained ViT).
    fn freeze_vision(self) -> Self;
}

/// Checks pixel values against the tower's square input size (at least one image).
pub fn check_pixels<B: Backend>(pixel_values: &Tensor<B, 4>, image_size: usize) -> Result<()> {
    let [b, c, h, w] = pixel_values.dims();
    if b == 0 {
        return Err(ModelError::Input(
            "the batch is empty: give at least one image".into(),
        ));
    }
    if c != 3 || h != image_size || w != image_size {
        return Err(ModelError::Input(format!(
            "pixel_values have shape [{b}, {c}, {h}, {w}], the vision tower expects [{b}, 3, {image_size}, {image_size}]"
        )));
    }
    Ok(())
}

/// Teacher-forced logits of `targets` after `inputs` (one target row per batch row).
pub fn teacher_forced<B: Backend, M: VisionLanguageModel<B>>(
    model: &M,
    inputs: &VlmInputs<B>,
    targets: &[Vec<u32>],
) -> Result<TeacherForced<B>> {
    let [b, _] = inputs.input_ids.dims();
    if targets.len() != b {
        return Err(ModelError::Input(format!(
            "{} target rows for a batch of {b}",
            targets.len()
        )));
    }
    check_ids(targets, model.language_model().vocab_size(), "target")?;
    let input = model.lm_input(inputs)?;
    model.language_model().teacher_forced(input, targets)
}

/// Logits over the language model's positions (see [`LanguageModel::logits`]).
pub fn logits<B: Backend, M: VisionLanguageModel<B>>(
    model: &M,
    inputs: &VlmInputs<B>,
    continuation: Option<Tensor<B, 2, Int>>,
) -> Result<Tensor<B, 3>> {
    if let Some(c) = &continuation {
        let [_, l] = c.dims();
        if l == 0 {
            return Err(ModelError::Input(
                "decoder_input_ids are empty: give at least one token".into(),
            ));
        }
        check_id_tensor(c, model.language_model().vocab_size(), "decoder_input_ids")?;
    }
    let input = model.lm_input(inputs)?;
    model.language_model().logits(input, continuation)
}

/// Every id of `rows` below `vocab`.
pub fn check_ids(rows: &[Vec<u32>], vocab: usize, what: &str) -> Result<()> {
    if let Some(&bad) = rows.iter().flatten().find(|&&id| id as usize >= vocab) {
        return Err(ModelError::Input(format!(
            "{what} token id {bad} is outside the vocabulary of {vocab}"
        )));
    }
    Ok(())
}

/// Every id of an Int tensor in `0..vocab`.
pub fn check_id_tensor<B: Backend>(
    ids: &Tensor<B, 2, Int>,
    vocab: usize,
    what: &str,
) -> Result<()> {
    let [b, l] = ids.dims();
    if b * l == 0 {
        return Ok(());
    }
    let values: Vec<i64> = ids
        .clone()
        .into_data()
        .convert::<i64>()
        .into_vec::<i64>()
        .map_err(|e| ModelError::Input(format!("{what}: {e:?}")))?;
    if let Some(&bad) = values.iter().find(|&&v| v < 0 || v as usize >= vocab) {
        return Err(ModelError::Input(format!(
            "{what} token id {bad} is outside the vocabulary of {vocab}"
        )));
    }
    Ok(())
}

/// The checks every family's [`VisionLanguageModel::lm_input`] starts with: batch ≥ 1, square
/// images of the model's size, a non-empty prompt whose ids and mask match, ids in range.
pub fn check_inputs<B: Backend>(inputs: &VlmInputs<B>, spec: &InputSpec) -> Result<()> {
    check_pixels(&inputs.pixel_values, spec.image_size)?;
    let b = inputs.pixel_values.dims()[0];
    let [ib, l] = inputs.input_ids.dims();
    if ib != b || inputs.attention_mask.dims() != [ib, l] {
        return Err(ModelError::Input(format!(
            "input_ids {:?} and attention_mask {:?} do not match a batch of {b} images",
            inputs.input_ids.dims(),
            inputs.attention_mask.dims()
        )));
    }
    if l == 0 {
        return Err(ModelError::Input(
            "input_ids are empty (no prompt token): give at least one token".into(),
        ));
    }
    check_id_tensor(&inputs.input_ids, spec.vocab_size, "input_ids")?;
    match (&inputs.qformer_text, spec.qformer_text) {
        (Some((ids, mask)), Some((vocab, positions))) => {
            let [qb, ql] = ids.dims();
            if qb != b || mask.dims() != [qb, ql] {
                return Err(ModelError::Input(format!(
                    "qformer_input_ids {:?} and their mask {:?} do not match a batch of {b} images",
                    ids.dims(),
                    mask.dims()
                )));
            }
            if ql > positions {
                return Err(ModelError::Input(format!(
                    "the Q-Former instruction has {ql} tokens, more than its max_position_embeddings {positions}"
                )));
            }
            check_id_tensor(ids, vocab, "qformer_input_ids")?;
        }
        (None, Some(_)) => {
            return Err(ModelError::Input(
                "this model's Q-Former reads the instruction: qformer_input_ids are missing".into(),
            ));
        }
        _ => {}
    }
    Ok(())
}
