//! `LlavaForConditionalGeneration` (LLaVA-1.5): a CLIP vision tower whose hidden state
//! `vision_feature_layer` (CLS dropped under the `default` strategy) goes through the
//! `multi_modal_projector` (linear → act → linear) into the positions of `input_ids` that hold
//! `image_token_index`; the LLaMA decoder ([`Llama`], reused as is) runs on the merged
//! embeddings. The processor expands each `<image>` into one placeholder per feature
//! ([`InputSpec::image_tokens`]).
//!
//! Keys: transformers 5.x writes `vision_tower.{embeddings, pre_layrnorm, encoder, post_layernorm}`,
//! older hub files nest the tower as `vision_tower.vision_model.*`; both are read, and the
//! model is saved in the layout it was read from. Prunable stacks: the CLIP layers the features
//! depend on (layers after `vision_feature_layer` never reach the output and stay dense), then
//! the LLaMA's; the projector stays dense.

use std::path::Path;
use std::sync::Arc;

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
    BlockOptions, CalibrationSample, Prunable, StackInfo, Tower, mismatch, not_ready, stack_name,
};
use crate::sparse_kernels::KernelRows;
use crate::vlm::{FamilyConfig, InputSpec, VisionLanguageModel, VlmInputs, check_inputs};
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
    /// `hidden_states` index of the image features: the output of this many CLIP layers.
    pub feature_layers: usize,
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
        let layers = raw.vision_config.num_hidden_layers;
        let feature_layers = match raw.vision_feature_layer.as_i64() {
            Some(v) => {
                // `hidden_states` has layers + 1 entries (the embeddings first).
                let n = if v < 0 { layers as i64 + 1 + v } else { v };
                if n < 1 || n > layers as i64 {
                    return Err(ModelError::config(
                        path,
                        "vision_feature_layer",
                        format!(
                            "{v} selects hidden state {n} of a {layers}-layer tower; ressa reads the output of layers 1..={layers}"
                        ),
                    ));
                }
                n as usize
            }
            None => {
                return Err(ModelError::config(
                    path,
                    "vision_feature_layer",
                    format!(
                        "{} is not supported yet (only a single layer index)",
                        raw.vision_feature_layer
                    ),
                ));
            }
        };
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
}

impl FamilyConfig for LlavaConfig {
    fn from_json(text: &str, path: &Path) -> Result<Self> {
        LlavaConfig::from_json(text, path)
    }

    fn image_size(&self) -> usize {
        self.vision.image_size
    }

    fn init_std(&self, key: &str) -> f32 {
        let leaf = key.rsplit('.').nth(1).unwrap_or("");
        if key.starts_with("language_model.")
            && let Some(s) = self.text.init_std(leaf)
        {
            return s;
        }
        self.vision.initializer_range
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
    pub feature_layers: usize,
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

    /// The selected CLIP hidden state → projected features [B, image tokens, D_lm].
    fn project(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, n, e] = hidden.dims();
        let selected = if self.keep_cls {
            hidden
        } else {
            hidden.slice([0..b, 1..n, 0..e])
        };
        let h = activate(self.projector_in.forward(selected), self.projector_act);
        self.projector_out.forward(h)
    }

    /// Pixels → projected image features [B, image tokens, D_lm] (after checking the inputs).
    pub fn image_features(&self, inputs: &VlmInputs<B>) -> Result<Tensor<B, 3>> {
        check_inputs(inputs, &self.input_spec())?;
        let hidden = self
            .vision_tower
            .hidden_state(inputs.pixel_values.clone(), self.feature_layers);
        Ok(self.project(hidden))
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
            projector_in: projector.linear("linear_1", e, d, cfg.projector_bias)?,
            projector_out: projector.linear("linear_2", d, d, cfg.projector_bias)?,
            language_model: Llama::load(&cfg.text, &vb.pp("language_model"))?,
            image_token_index: cfg.image_token_index,
            feature_layers: cfg.feature_layers,
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
    Vision(Tensor<B, 3>),
    Language(LlamaBlockInput<B>),
}

/// A sample's calibration state: its inputs and, once the vision stack ended, the LLaMA's.
pub struct LlavaContext<B: Backend> {
    sample: CalibrationSample<B>,
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
            blocks: self.feature_layers.min(self.vision_tower.layers.len()),
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
            lm: None,
        })
    }

    fn stack_input(&self, stack: LlavaStack, ctx: &LlavaContext<B>) -> Result<LlavaBlockInput<B>> {
        Ok(match stack {
            LlavaStack::Vision => LlavaBlockInput::Vision(
                self.vision_tower
                    .embed(ctx.sample.inputs.pixel_values.clone()),
            ),
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
            (LlavaStack::Vision, LlavaBlockInput::Vision(x)) => {
                let layer = self
                    .vision_tower
                    .layers
                    .get(block)
                    .filter(|_| block < self.feature_layers)
                    .ok_or_else(|| ModelError::Input(format!("{stack:?} has no block {block}")))?;
                Ok(layer.forward_tapped(x.clone(), tap))
            }
            (LlavaStack::Language(s), LlavaBlockInput::Language(i)) => {
                self.language_model.run_block(s, block, i, options, tap)
            }
            _ => Err(mismatch(stack)),
        }
    }

    fn with_hidden(&self, input: LlavaBlockInput<B>, hidden: Tensor<B, 3>) -> LlavaBlockInput<B> {
        match input {
            LlavaBlockInput::Vision(_) => LlavaBlockInput::Vision(hidden),
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
                let input = self.merge(self.project(hidden), &ctx.sample.inputs)?;
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
            LlavaStack::Vision if block < self.feature_layers => self
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
            LlavaStack::Vision if block < self.feature_layers => self
                .vision_tower
                .layers
                .get_mut(block)
                .map(|l| l.linears_mut())
                .unwrap_or_default(),
            LlavaStack::Vision => Vec::new(),
            LlavaStack::Language(s) => self.language_model.block_linears_mut(s, block),
        }
    }
}
