//! `LlavaForConditionalGeneration` (LLaVA-1.5): a CLIP vision tower whose hidden state
//! `vision_feature_layer` (CLS dropped under the `default` strategy; a list of layers: their
//! states concatenated along the features, as transformers does) goes through the
//! `multi_modal_projector` (linear → act → linear) into the positions of `input_ids` that hold
//! `image_token_index`; the LLaMA decoder ([`Llama`], reused as is) runs on the merged
//! embeddings. The processor expands each `<image>` into one placeholder per feature
//! ([`InputSpec::image_tokens`]).
//!
//! Keys: transformers 5.x writes `vision_tower.{embeddings, pre_layrnorm, encoder, post_layernorm}`,
//! older hub files nest the tower as `vision_tower.vision_model.*`; both are read, and the
//! model is saved in the layout it was read from. Prunable stacks: the CLIP layers the features
//! depend on (layers after the last selected one never reach the output and stay dense), then
//! the LLaMA's; the projector stays dense.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use burn::prelude::*;
use serde::Deserialize;

use crate::clip::{ClipVisionConfig, ClipVisionTower};
use crate::config::{Activation, LlamaConfig, LmConfig};
use crate::error::{ModelError, Result};
use crate::linear::Linear;
use crate::llama::{Llama, LlamaBlockInput, LlamaStack};
use crate::lm::{LanguageModel, LmInput, LmSample};
use crate::nn::{Tap, activate, host_ids, host_mask, index_tensor};
use crate::ops::DenseBackend;
use crate::prunable::{
    BlockOptions, CalibrationSample, Prunable, StackInfo, Tower, empty_hidden, mismatch, not_ready,
    stack_name,
};
use crate::sparse_kernels::KernelRows;
use crate::vlm::{
    FamilyConfig, InputSpec, VisionLanguageModel, VlmInputs, check_inputs, check_pixels,
};
use crate::weights::{Loader, ParamKeys};

/// The top-level `config.json` of a LLaVA checkpoint (HF `LlavaConfig` defaults).
#[derive(Debug, Clone, Deserialize)]
pub struct LlavaRawConfig {
    pub model_type: String,
    #[serde(default)]
    pub vision_config: ClipVisionConfig,
    pub text_config: serde_json::Value,
    #[serde(default)]
    pub image_token_index: Option<u32>,
    /// The name `transformers` maps onto `image_token_index`.
    #[serde(default)]
    pub image_token_id: Option<u32>,
    #[serde(default)]
    pub image_seq_length: Option<usize>,
    #[serde(default = "default_projector_act")]
    pub projector_hidden_act: String,
    #[serde(default = "default_true")]
    pub multimodal_projector_bias: bool,
    /// An int (negative: from the end of `hidden_states`) or a list of them.
    #[serde(default = "default_feature_layer")]
    pub vision_feature_layer: serde_json::Value,
    #[serde(default = "default_strategy")]
    pub vision_feature_select_strategy: String,
}

fn default_projector_act() -> String {
    "gelu".into()
}

fn default_true() -> bool {
    true
}

fn default_feature_layer() -> serde_json::Value {
    serde_json::Value::from(-2)
}

fn default_strategy() -> String {
    "default".into()
}

/// A parsed, validated LLaVA configuration.
#[derive(Debug, Clone)]
pub struct LlavaConfig {
    pub vision: ClipVisionConfig,
    pub text: LlamaConfig,
    pub image_token_index: u32,
    /// `hidden_states` indices of the image features (`vision_feature_layer`, one or a list, in
    /// its order): index `n` is the output of the first `n` CLIP layers, 0 the embeddings.
    pub feature_layers: Vec<usize>,
    /// `vision_feature_select_strategy == "full"`: the CLS position is kept.
    pub keep_cls: bool,
    pub projector_act: Activation,
    pub projector_bias: bool,
    pub raw: LlavaRawConfig,
}

impl LlavaConfig {
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let raw: LlavaRawConfig = crate::error::parse_json(text, path)?;
        if raw.model_type != "llava" {
            return Err(ModelError::config(
                path,
                "model_type",
                format!("unknown model_type `{}`, expected `llava`", raw.model_type),
            ));
        }
        let (_, model_type) = crate::config::peek_model_types(text, path)?;
        if !LlamaConfig::MODEL_TYPES.contains(&model_type.as_str()) {
            return Err(ModelError::config(
                path,
                "text_config.model_type",
                format!(
                    "`{model_type}`, expected {}",
                    LlamaConfig::MODEL_TYPES.join(" or ")
                ),
            ));
        }
        let text_cfg: LlamaConfig = serde_path_to_error::deserialize(raw.text_config.clone())
            .map_err(|e| crate::error::json_error(path, "text_config", e))?;
        text_cfg.validate(path)?;
        raw.vision_config.validate(path)?;
        let feature_layers = feature_layers(
            &raw.vision_feature_layer,
            raw.vision_config.num_hidden_layers,
        )
        .map_err(|e| ModelError::config(path, "vision_feature_layer", e.to_string()))?;
        // The projector reads hidden_size per selected layer.
        let width = raw.vision_config.hidden_size * feature_layers.len();
        if width > crate::config::MAX_SIZE {
            return Err(ModelError::config(
                path,
                "vision_feature_layer",
                format!(
                    "{} layers × hidden_size {} is beyond any model's size",
                    feature_layers.len(),
                    raw.vision_config.hidden_size
                ),
            ));
        }
        let keep_cls = match raw.vision_feature_select_strategy.as_str() {
            "default" => false,
            "full" => true,
            other => {
                return Err(ModelError::config(
                    path,
                    "vision_feature_select_strategy",
                    format!("`{other}`, expected `default` or `full`"),
                ));
            }
        };
        let projector_act = Activation::from_hf(&raw.projector_hidden_act).ok_or_else(|| {
            ModelError::config(
                path,
                "projector_hidden_act",
                format!("unknown activation `{}`", raw.projector_hidden_act),
            )
        })?;
        let image_token_index = raw
            .image_token_index
            .or(raw.image_token_id)
            .unwrap_or(32000);
        if image_token_index as usize >= text_cfg.vocab_size {
            return Err(ModelError::config(
                path,
                "image_token_index",
                format!(
                    "{image_token_index} is outside the language model's vocabulary of {}",
                    text_cfg.vocab_size
                ),
            ));
        }
        Ok(Self {
            vision: raw.vision_config.clone(),
            text: text_cfg,
            image_token_index,
            feature_layers,
            keep_cls,
            projector_act,
            projector_bias: raw.multimodal_projector_bias,
            raw,
        })
    }

    /// Image features (= placeholder tokens) per image.
    pub fn image_seq_length(&self) -> usize {
        self.vision.num_patches() + usize::from(self.keep_cls)
    }

    /// `text_config.initializer_range` (HF default 0.02): the σ of the LLaMA's and, as
    /// `LlavaConfig` has none of its own, the projector's weights.
    fn text_initializer_range(&self) -> f32 {
        self.raw
            .text_config
            .get("initializer_range")
            .and_then(serde_json::Value::as_f64)
            .map_or(0.02, |v| v as f32)
    }
}

/// Why a `vision_feature_layer` value selects no usable hidden states.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
enum FeatureLayerError {
    #[error("an empty list selects no hidden state")]
    Empty,
    #[error("{0}: expected an integer or a list of integers")]
    NotInteger(serde_json::Value),
    #[error("{i} is outside the {states} hidden states of a {layers}-layer vision tower")]
    OutOfRange { i: i64, states: i64, layers: usize },
    #[error(
        "{0} selects only the embeddings; ressa reads the output of at least one of the {1} layers"
    )]
    OnlyEmbeddings(serde_json::Value, usize),
}

/// `vision_feature_layer` (an int or a non-empty list; negative: from the end of the
/// `layers + 1` hidden states) as `hidden_states` indices; the deepest must be a layer's output.
fn feature_layers(
    value: &serde_json::Value,
    layers: usize,
) -> std::result::Result<Vec<usize>, FeatureLayerError> {
    let values: Vec<&serde_json::Value> = match value {
        serde_json::Value::Array(a) if !a.is_empty() => a.iter().collect(),
        serde_json::Value::Array(_) => return Err(FeatureLayerError::Empty),
        v => vec![v],
    };
    let states = layers as i64 + 1;
    let mut out = Vec::with_capacity(values.len());
    for v in values {
        let i = v
            .as_i64()
            .ok_or_else(|| FeatureLayerError::NotInteger(value.clone()))?;
        let n = if i < 0 { states + i } else { i };
        if !(0..states).contains(&n) {
            return Err(FeatureLayerError::OutOfRange { i, states, layers });
        }
        out.push(n as usize);
    }
    if out.iter().all(|&n| n == 0) {
        return Err(FeatureLayerError::OnlyEmbeddings(value.clone(), layers));
    }
    Ok(out)
}

impl FamilyConfig for LlavaConfig {
    fn from_json(text: &str, path: &Path) -> Result<Self> {
        LlavaConfig::from_json(text, path)
    }

    fn image_size(&self) -> usize {
        self.vision.image_size
    }

    /// transformers' `_init_weights` for a fresh LLaVA: the CLIP tower's own
    /// ([`ClipVisionConfig::init_std`], either key layout), the projector and the LLaMA
    /// `text_config.initializer_range`.
    fn init_std(&self, key: &str) -> f32 {
        if let Some(rest) = key.strip_prefix("vision_tower.") {
            return self
                .vision
                .init_std(rest.strip_prefix("vision_model.").unwrap_or(rest));
        }
        let leaf = key.rsplit('.').nth(1).unwrap_or("");
        if key.starts_with("language_model.")
            && let Some(s) = self.text.init_std(leaf)
        {
            return s;
        }
        self.text_initializer_range()
    }
}

/// LLaVA over the LLaMA decoder.
#[derive(Module, Debug)]
pub struct Llava<B: Backend> {
    pub vision_tower: ClipVisionTower<B>,
    /// `multi_modal_projector.linear_1`.
    pub projector_in: Linear<B>,
    /// `multi_modal_projector.linear_2`.
    pub projector_out: Linear<B>,
    pub language_model: Llama<B>,
    #[module(skip)]
    pub image_token_index: u32,
    #[module(skip)]
    pub feature_layers: Vec<usize>,
    #[module(skip)]
    pub keep_cls: bool,
    #[module(skip)]
    pub projector_act: Activation,
    #[module(skip)]
    pub keys: Arc<ParamKeys>,
}

impl<B: DenseBackend> Llava<B> {
    /// Image features per image (the placeholder count).
    pub fn image_seq_length(&self) -> usize {
        self.vision_tower.num_positions() - usize::from(!self.keep_cls)
    }

    /// CLIP layers the features depend on: up to the deepest selected hidden state.
    pub fn vision_layers(&self) -> usize {
        let deepest = self.feature_layers.iter().copied().max().unwrap_or(0);
        deepest.min(self.vision_tower.layers.len())
    }

    /// The selected CLIP hidden states (in `vision_feature_layer`'s order) → projected features
    /// [B, image tokens, D_lm]: CLS dropped from each under `default`, concatenated along the
    /// features.
    fn project(&self, states: Vec<Tensor<B, 3>>) -> Tensor<B, 3> {
        let selected: Vec<Tensor<B, 3>> = states
            .into_iter()
            .map(|h| {
                let [b, n, e] = h.dims();
                if self.keep_cls {
                    h
                } else {
                    h.slice([0..b, 1..n, 0..e])
                }
            })
            .collect();
        let selected = Tensor::cat(selected, 2);
        let h = activate(self.projector_in.forward(selected), self.projector_act);
        self.projector_out.forward(h)
    }

    /// Pixels → projected image features [B, image tokens, D_lm] (after checking the inputs).
    pub fn image_features(&self, inputs: &VlmInputs<B>) -> Result<Tensor<B, 3>> {
        check_inputs(inputs, &self.input_spec())?;
        let states = self
            .vision_tower
            .hidden_states(inputs.pixel_values.clone(), &self.feature_layers);
        Ok(self.project(states))
    }

    /// The prompt embeddings with the image features in the placeholder positions, in order;
    /// every row must hold exactly one image's placeholders.
    fn merge(&self, features: Tensor<B, 3>, inputs: &VlmInputs<B>) -> Result<LmInput<B>> {
        let [b, l] = inputs.input_ids.dims();
        let [_, p, d] = features.dims();
        let ids = host_ids(inputs.input_ids.clone());
        let t = self.image_token_index;
        let mut idx = Vec::with_capacity(b * l);
        for (r, row) in ids.iter().enumerate() {
            let n = row.iter().filter(|&&id| id == t).count();
            if n != p {
                return Err(ModelError::Input(format!(
                    "row {r} of input_ids holds {n} image tokens (id {t}) but the image gives {p} features: expand `<image>` into {p} placeholders"
                )));
            }
            let mut k = 0;
            for (pos, &id) in row.iter().enumerate() {
                if id == t {
                    idx.push(b * l + r * p + k);
                    k += 1;
                } else {
                    idx.push(r * l + pos);
                }
            }
        }
        let prompt = self.language_model.embed(inputs.input_ids.clone());
        let device = prompt.device();
        let table = Tensor::cat(
            vec![prompt.reshape([b * l, d]), features.reshape([b * p, d])],
            0,
        );
        let embeds = table
            .select(0, index_tensor(&idx, &device))
            .reshape([b, l, d]);
        let mask = inputs.attention_mask.clone();
        Ok(LmInput {
            embeds,
            host_mask: host_mask(mask.clone()),
            mask,
            ids,
        })
    }
}

impl<B: DenseBackend> VisionLanguageModel<B> for Llava<B> {
    type Lm = Llama<B>;
    type Config = LlavaConfig;

    fn load(cfg: &LlavaConfig, vb: &Loader<B>) -> Result<Self> {
        let tower = vb.pp("vision_tower");
        // Older hub files nest the tower under `vision_model`.
        let tower = if tower.contains_or("vision_model.embeddings.class_embedding", false) {
            tower.pp("vision_model")
        } else {
            tower
        };
        let (e, d) = (cfg.vision.hidden_size, cfg.text.hidden_size);
        let projector = vb.pp("multi_modal_projector");
        let model = Self {
            vision_tower: ClipVisionTower::load(&cfg.vision, &tower)?,
            // One CLIP width per selected layer.
            projector_in: projector.linear(
                "linear_1",
                e * cfg.feature_layers.len(),
                d,
                cfg.projector_bias,
            )?,
            projector_out: projector.linear("linear_2", d, d, cfg.projector_bias)?,
            language_model: Llama::load(&cfg.text, &vb.pp("language_model"))?,
            image_token_index: cfg.image_token_index,
            feature_layers: cfg.feature_layers.clone(),
            keep_cls: cfg.keep_cls,
            projector_act: cfg.projector_act,
            keys: Arc::new(ParamKeys::default()),
        };
        Ok(Self {
            keys: Arc::new(vb.keys()),
            ..model
        })
    }

    fn language_model(&self) -> &Llama<B> {
        &self.language_model
    }

    fn param_keys(&self) -> &ParamKeys {
        &self.keys
    }

    fn input_spec(&self) -> InputSpec {
        let lm = &self.language_model;
        InputSpec {
            image_size: self.vision_tower.image_size,
            qformer_text: None,
            image_tokens: Some((self.image_token_index, self.image_seq_length())),
            tokens: lm.special_tokens(),
            padding: lm.padding(),
            vocab_size: lm.vocab_size(),
            context_window: lm.context_window(),
            // The placeholders are prompt tokens (the processor expands `<image>`).
            image_positions: 0,
        }
    }

    fn lm_input(&self, inputs: &VlmInputs<B>) -> Result<LmInput<B>> {
        let features = self.image_features(inputs)?;
        self.merge(features, inputs)
    }

    fn kernel_rows(&self, stack: LlavaStack, rows: &KernelRows) -> usize {
        match stack {
            LlavaStack::Vision => rows.images.max(1) * self.vision_tower.num_positions(),
            LlavaStack::Language(s) => {
                self.language_model
                    .kernel_rows(s, rows, self.image_seq_length())
            }
        }
        .max(1)
    }

    /// The selected CLIP layers' patch states (class token left out), concatenated along the
    /// features as the projector reads them.
    fn vision_patches(&self, pixel_values: Tensor<B, 4>) -> Result<Tensor<B, 3>> {
        check_pixels(&pixel_values, self.vision_tower.image_size)?;
        let states = self
            .vision_tower
            .hidden_states(pixel_values, &self.feature_layers)
            .into_iter()
            .map(|h| {
                let [b, n, e] = h.dims();
                h.slice([0..b, 1..n, 0..e])
            })
            .collect();
        Ok(Tensor::cat(states, 2))
    }

    fn freeze_vision(mut self) -> Self {
        self.vision_tower = self.vision_tower.no_grad();
        self
    }
}

/// The stacks of LLaVA: the CLIP layers up to the feature layer, then the LLaMA's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LlavaStack {
    Vision,
    Language(LlamaStack),
}

/// A block input of one of LLaVA's stacks.
#[derive(Debug, Clone)]
pub enum LlavaBlockInput<B: Backend> {
    /// `hidden_states[layer]` of the CLIP tower (the input of layer `layer`), and where the
    /// selected states are recorded on the way.
    Vision {
        hidden: Tensor<B, 3>,
        layer: usize,
        selected: SelectedStates<B>,
    },
    Language(LlamaBlockInput<B>),
}

/// The CLIP hidden states a sample's features read besides the deepest one (a list-valued
/// `vision_feature_layer`), by `hidden_states` index, as calibration passes them from layer to
/// layer: shared by the sample's context and its vision block inputs, written by
/// [`Prunable::with_hidden`] and read by [`Prunable::end_stack`] (which only gets the last
/// layer's output). A later write of the same index (the pass after OWL's statistics pass)
/// replaces an earlier one.
#[derive(Debug)]
pub struct SelectedStates<B: Backend>(Arc<Mutex<BTreeMap<usize, Tensor<B, 3>>>>);

impl<B: Backend> Default for SelectedStates<B> {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(BTreeMap::new())))
    }
}

impl<B: Backend> Clone for SelectedStates<B> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<B: Backend> SelectedStates<B> {
    fn states(&self) -> std::sync::MutexGuard<'_, BTreeMap<usize, Tensor<B, 3>>> {
        // A panic while holding the lock leaves a map of whole tensors: still usable.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A sample's calibration state: its inputs, the selected CLIP states and, once the vision
/// stack ended, the LLaMA's.
pub struct LlavaContext<B: Backend> {
    sample: CalibrationSample<B>,
    selected: SelectedStates<B>,
    lm: Option<LlamaBlockInput<B>>,
}

impl<B: DenseBackend> Prunable<B> for Llava<B> {
    type Sample = CalibrationSample<B>;
    type Stack = LlavaStack;
    type BlockInput = LlavaBlockInput<B>;
    type Context = LlavaContext<B>;

    fn stacks(&self) -> Vec<StackInfo<LlavaStack>> {
        let mut out = vec![StackInfo {
            id: LlavaStack::Vision,
            tower: Tower::Vision,
            name: stack_name(self.vision_tower.layers.first().map(|l| &*l.fc1.key)),
            blocks: self.vision_layers(),
        }];
        out.extend(self.language_model.stacks().into_iter().map(|s| StackInfo {
            id: LlavaStack::Language(s.id),
            tower: s.tower,
            name: s.name,
            blocks: s.blocks,
        }));
        out
    }

    fn context(&self, sample: &CalibrationSample<B>) -> Result<LlavaContext<B>> {
        check_inputs(&sample.inputs, &self.input_spec())?;
        Ok(LlavaContext {
            sample: sample.clone(),
            selected: SelectedStates::default(),
            lm: None,
        })
    }

    fn stack_input(&self, stack: LlavaStack, ctx: &LlavaContext<B>) -> Result<LlavaBlockInput<B>> {
        Ok(match stack {
            LlavaStack::Vision => {
                let hidden = self
                    .vision_tower
                    .embed(ctx.sample.inputs.pixel_values.clone());
                let mut states = ctx.selected.states();
                states.clear();
                if self.feature_layers.contains(&0) {
                    states.insert(0, hidden.clone());
                }
                LlavaBlockInput::Vision {
                    hidden,
                    layer: 0,
                    selected: ctx.selected.clone(),
                }
            }
            LlavaStack::Language(s) => {
                let lm = ctx
                    .lm
                    .as_ref()
                    .ok_or_else(|| not_ready(stack, "the image features"))?;
                LlavaBlockInput::Language(self.language_model.stack_input(s, lm)?)
            }
        })
    }

    fn run_block(
        &self,
        stack: LlavaStack,
        block: usize,
        input: &LlavaBlockInput<B>,
        options: BlockOptions,
        tap: Tap<B>,
    ) -> Result<Tensor<B, 3>> {
        match (stack, input) {
            (LlavaStack::Vision, LlavaBlockInput::Vision { hidden, .. }) => {
                let layer = self
                    .vision_tower
                    .layers
                    .get(block)
                    .filter(|_| block < self.vision_layers())
                    .ok_or_else(|| ModelError::Input(format!("{stack:?} has no block {block}")))?;
                Ok(layer.forward_tapped(hidden.clone(), tap))
            }
            (LlavaStack::Language(s), LlavaBlockInput::Language(i)) => {
                self.language_model.run_block(s, block, i, options, tap)
            }
            _ => Err(mismatch(stack)),
        }
    }

    fn with_hidden(&self, input: LlavaBlockInput<B>, hidden: Tensor<B, 3>) -> LlavaBlockInput<B> {
        match input {
            LlavaBlockInput::Vision {
                layer, selected, ..
            } => {
                let layer = layer + 1;
                if self.feature_layers.contains(&layer) {
                    selected.states().insert(layer, hidden.clone());
                }
                LlavaBlockInput::Vision {
                    hidden,
                    layer,
                    selected,
                }
            }
            LlavaBlockInput::Language(i) => {
                LlavaBlockInput::Language(self.language_model.with_hidden(i, hidden))
            }
        }
    }

    fn end_stack(
        &self,
        stack: LlavaStack,
        hidden: Tensor<B, 3>,
        ctx: &mut LlavaContext<B>,
        options: BlockOptions,
    ) -> Result<()> {
        match stack {
            LlavaStack::Vision => {
                let deepest = self.vision_layers();
                let states = {
                    let kept = ctx.selected.states();
                    self.feature_layers
                        .iter()
                        .map(|&n| {
                            if n == deepest {
                                Ok(hidden.clone())
                            } else {
                                kept.get(&n).cloned().ok_or_else(|| {
                                    not_ready(stack, &format!("CLIP hidden state {n}"))
                                })
                            }
                        })
                        .collect::<Result<Vec<_>>>()?
                };
                let input = self.merge(self.project(states), &ctx.sample.inputs)?;
                ctx.lm = Some(self.language_model.context(&LmSample {
                    input,
                    targets: ctx.sample.targets.clone(),
                })?);
            }
            LlavaStack::Language(s) => {
                let lm = ctx
                    .lm
                    .as_mut()
                    .ok_or_else(|| not_ready(stack, "the image features"))?;
                self.language_model.end_stack(s, hidden, lm, options)?;
            }
        }
        Ok(())
    }

    fn block_linears(&self, stack: LlavaStack, block: usize) -> Vec<&Linear<B>> {
        match stack {
            LlavaStack::Vision if block < self.vision_layers() => self
                .vision_tower
                .layers
                .get(block)
                .map(|l| l.linears())
                .unwrap_or_default(),
            LlavaStack::Vision => Vec::new(),
            LlavaStack::Language(s) => self.language_model.block_linears(s, block),
        }
    }

    fn block_linears_mut(&mut self, stack: LlavaStack, block: usize) -> Vec<&mut Linear<B>> {
        match stack {
            LlavaStack::Vision if block < self.vision_layers() => self
                .vision_tower
                .layers
                .get_mut(block)
                .map(|l| l.linears_mut())
                .unwrap_or_default(),
            LlavaStack::Vision => Vec::new(),
            LlavaStack::Language(s) => self.language_model.block_linears_mut(s, block),
        }
    }

    fn output_options(&self, stack: LlavaStack, options: BlockOptions) -> Option<BlockOptions> {
        match stack {
            LlavaStack::Language(s) => self.language_model.output_options(s, options),
            LlavaStack::Vision => None,
        }
    }

    fn split_hidden(
        &self,
        input: LlavaBlockInput<B>,
    ) -> std::result::Result<(LlavaBlockInput<B>, Tensor<B, 3>), LlavaBlockInput<B>> {
        match input {
            LlavaBlockInput::Vision {
                hidden,
                layer,
                selected,
            } => Ok((
                LlavaBlockInput::Vision {
                    hidden: empty_hidden(&hidden.device()),
                    layer,
                    selected,
                },
                hidden,
            )),
            LlavaBlockInput::Language(i) => match self.language_model.split_hidden(i) {
                Ok((frame, x)) => Ok((LlavaBlockInput::Language(frame), x)),
                Err(i) => Err(LlavaBlockInput::Language(i)),
            },
        }
    }

    /// Unlike [`Prunable::with_hidden`], records no selected state and keeps the layer index.
    fn join_hidden(&self, frame: LlavaBlockInput<B>, hidden: Tensor<B, 3>) -> LlavaBlockInput<B> {
        match frame {
            LlavaBlockInput::Vision {
                layer, selected, ..
            } => LlavaBlockInput::Vision {
                hidden,
                layer,
                selected,
            },
            LlavaBlockInput::Language(i) => {
                LlavaBlockInput::Language(self.language_model.join_hidden(i, hidden))
            }
        }
    }

    /// The LM head, and the CLIP layers after the deepest feature layer (never run).
    fn idle_linears(&self) -> Vec<&Linear<B>> {
        let mut out: Vec<&Linear<B>> = self
            .vision_tower
            .layers
            .iter()
            .skip(self.vision_layers())
            .flat_map(|l| l.linears())
            .collect();
        out.extend(self.language_model.idle_linears());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::feature_layers;
    use serde_json::json;

    #[test]
    fn vision_feature_layer_ints_and_lists() {
        // 4 layers: hidden states 0 (embeddings) ..= 4.
        assert_eq!(feature_layers(&json!(-2), 4), Ok(vec![3]));
        assert_eq!(feature_layers(&json!(4), 4), Ok(vec![4]));
        assert_eq!(feature_layers(&json!([-4, -2]), 4), Ok(vec![1, 3]));
        assert_eq!(feature_layers(&json!([0, 2, 2]), 4), Ok(vec![0, 2, 2]));
        for (bad, says) in [
            (json!(5), "outside the 5 hidden states"),
            (json!([-6, -1]), "outside"),
            (json!([]), "empty list"),
            (json!(0), "only the embeddings"),
            (json!([0, -5]), "only the embeddings"),
            (json!("last"), "expected an integer"),
            (json!([1.5]), "expected an integer"),
        ] {
            let err = feature_layers(&bad, 4).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn a_projector_wider_than_any_model_is_a_config_error() {
        // hidden_size 24 × 700 000 selected layers > 2^24.
        let text = json!({
            "model_type": "llava",
            "text_config": {"model_type": "llama"},
            "vision_config": {"hidden_size": 24, "num_attention_heads": 3},
            "vision_feature_layer": vec![-1; 700_000],
        })
        .to_string();
        let err = super::LlavaConfig::from_json(&text, std::path::Path::new("config.json"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("vision_feature_layer") && err.contains("beyond any model's size"),
            "{err}"
        );
    }
}
