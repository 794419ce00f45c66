//! `config.json` of an HF InstructBLIP / BLIP-2 model directory: serde structs that mirror the HF
//! field names, with the defaults `transformers` applies when a field is absent.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// Activation functions named in HF configs (`hidden_act`, `dense_act_fn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact GELU, x·Φ(x) with the error function (`"gelu"`).
    Gelu,
    /// Tanh approximation of GELU (`"gelu_new"`, `"gelu_pytorch_tanh"`).
    GeluTanh,
    Relu,
    /// x·σ(x) (`"silu"`, `"swish"`).
    Silu,
    /// x·σ(1.702·x) (CLIP's `"quick_gelu"`; read by `clip.rs` only).
    QuickGelu,
}

impl Activation {
    pub fn from_hf(name: &str) -> Option<Self> {
        Some(match name {
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            _ => return None,
        })
    }
}

/// `vision_config`: the EVA ViT image encoder.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub qkv_bias: bool,
    /// σ of the tower's weights at initialisation (`transformers`' vision model's own
    /// `_init_weights`); only read when a model is trained from scratch.
    pub initializer_range: f32,
}

impl Default for VisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 1408,
            intermediate_size: 6144,
            num_hidden_layers: 39,
            num_attention_heads: 16,
            image_size: 224,
            patch_size: 14,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-6,
            qkv_bias: true,
            initializer_range: 0.02,
        }
    }
}

/// `qformer_config`: the BERT-style querying transformer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct QFormerConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    pub layer_norm_eps: f64,
    pub cross_attention_frequency: usize,
    pub encoder_hidden_size: usize,
    /// BLIP-2 only: whether the Q-Former also reads instruction text (InstructBLIP always does).
    pub use_qformer_text_input: Option<bool>,
    /// σ of the Q-Former's weights at initialisation (training from scratch only).
    pub initializer_range: f32,
}

impl Default for QFormerConfig {
    fn default() -> Self {
        Self {
            vocab_size: 30522,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: "gelu".into(),
            max_position_embeddings: 512,
            layer_norm_eps: 1e-12,
            cross_attention_frequency: 2,
            encoder_hidden_size: 1408,
            use_qformer_text_input: None,
            initializer_range: 0.02,
        }
    }
}

/// `text_config` of a T5 language model.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct T5Config {
    pub model_type: String,
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_decoder_layers: Option<usize>,
    pub num_heads: usize,
    pub relative_attention_num_buckets: usize,
    pub relative_attention_max_distance: usize,
    pub layer_norm_epsilon: f64,
    pub feed_forward_proj: String,
    /// Explicit activation; when absent HF derives it from `feed_forward_proj`.
    pub dense_act_fn: Option<String>,
    pub tie_word_embeddings: Option<bool>,
    /// Written by transformers 5.x; older files imply it from `tie_word_embeddings`.
    pub scale_decoder_outputs: Option<bool>,
    pub decoder_start_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

impl Default for T5Config {
    fn default() -> Self {
        Self {
            model_type: "t5".into(),
            vocab_size: 32128,
            d_model: 512,
            d_kv: 64,
            d_ff: 2048,
            num_layers: 6,
            num_decoder_layers: None,
            num_heads: 8,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "relu".into(),
            dense_act_fn: None,
            tie_word_embeddings: None,
            scale_decoder_outputs: None,
            decoder_start_token_id: None,
            pad_token_id: None,
            eos_token_id: None,
        }
    }
}

impl T5Config {
    pub fn decoder_layers(&self) -> usize {
        self.num_decoder_layers.unwrap_or(self.num_layers)
    }

    /// `gated-X` feeds `wo(act(wi_0 x) * wi_1 x)`; `X` feeds `wo(act(wi x))`.
    pub fn is_gated(&self) -> bool {
        self.feed_forward_proj.starts_with("gated-")
    }

    /// HF rule: `dense_act_fn` if given, else the last part of `feed_forward_proj`, where
    /// `gated-gelu` means the tanh GELU (`gelu_new`).
    pub fn activation_name(&self) -> String {
        match &self.dense_act_fn {
            Some(a) => a.clone(),
            None if self.feed_forward_proj == "gated-gelu" => "gelu_new".into(),
            None => self
                .feed_forward_proj
                .rsplit('-')
                .next()
                .unwrap_or("relu")
                .to_string(),
        }
    }

    /// T5 v1.0 rescales the decoder output by d_model^-0.5 before a tied `lm_head`.
    pub fn scales_decoder_output(&self) -> bool {
        self.scale_decoder_outputs
            .unwrap_or(self.tie_word_embeddings.unwrap_or(true))
    }

    pub fn pad_token(&self) -> u32 {
        self.pad_token_id.unwrap_or(0)
    }

    pub fn eos_token(&self) -> u32 {
        self.eos_token_id.unwrap_or(1)
    }

    pub fn decoder_start_token(&self) -> u32 {
        self.decoder_start_token_id.unwrap_or(self.pad_token())
    }
}

/// `text_config` of a LLaMA-family decoder-only language model (HF `LlamaConfig`; Vicuna).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct LlamaConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Grouped-query attention when fewer than `num_attention_heads` (absent: equal).
    pub num_key_value_heads: Option<usize>,
    /// Absent: `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    /// transformers < 5 writes the theta here; 5.x writes `rope_parameters.rope_theta`.
    pub rope_theta: Option<f64>,
    pub rope_parameters: Option<serde_json::Value>,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub tie_word_embeddings: Option<bool>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
}

impl Default for LlamaConfig {
    fn default() -> Self {
        Self {
            model_type: "llama".into(),
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 11008,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: None,
            head_dim: None,
            hidden_act: "silu".into(),
            max_position_embeddings: 2048,
            rms_norm_eps: 1e-6,
            rope_theta: None,
            rope_parameters: None,
            attention_bias: false,
            mlp_bias: false,
            tie_word_embeddings: None,
            bos_token_id: None,
            eos_token_id: None,
            pad_token_id: None,
        }
    }
}

impl LlamaConfig {
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_size(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// `rope_parameters.rope_theta`, else `rope_theta`, else HF's default 10000.
    pub fn theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_theta"))
            .and_then(|t| t.as_f64())
            .or(self.rope_theta)
            .unwrap_or(10000.0)
    }

    /// `rope_parameters.rope_type` (`default` when absent); only `default` is implemented.
    pub fn rope_type(&self) -> String {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
            .and_then(|t| t.as_str())
            .unwrap_or("default")
            .to_string()
    }

    /// LLaMA does not tie `lm_head` unless the config says so.
    pub fn ties_embeddings(&self) -> bool {
        self.tie_word_embeddings.unwrap_or(false)
    }

    pub fn bos_token(&self) -> u32 {
        self.bos_token_id.unwrap_or(1)
    }

    pub fn eos_token(&self) -> u32 {
        self.eos_token_id.unwrap_or(2)
    }

    /// `pad_token_id`, else eos (what `generate` falls back to).
    pub fn pad_token(&self) -> u32 {
        self.pad_token_id.unwrap_or(self.eos_token())
    }
}

/// What the composites need from a language model's `text_config`.
pub trait LmConfig: DeserializeOwned + Clone + std::fmt::Debug + Send + Sync {
    /// The `text_config.model_type` values it reads.
    const MODEL_TYPES: &'static [&'static str];
    /// Checks the fields (one-line errors naming `text_config.<field>`).
    fn validate(&self, path: &Path) -> Result<()>;
    /// Width of the input embeddings (the projection's output).
    fn hidden_size(&self) -> usize;
    fn vocab_size(&self) -> usize;
    /// The standard deviation `transformers` initialises a weight with, by its HF leaf name
    /// (the module owning `.weight`); `None`: the composite's `initializer_range`.
    fn init_std(&self, _leaf: &str) -> Option<f32> {
        None
    }
}

/// The largest size any config field may name: far above every real model (vocabularies of
/// 256 k, widths of 16 k, 128 k positions), low enough that products of two sizes cannot
/// overflow and a hostile file fails here instead of in an allocation.
pub const MAX_SIZE: usize = 1 << 24;

/// Every `(field, value)` at most [`MAX_SIZE`].
fn bounded(path: &Path, fields: &[(&str, usize)]) -> Result<()> {
    for &(field, v) in fields {
        check(v <= MAX_SIZE, path, field, || {
            format!("{v} is beyond any model's size (at most {MAX_SIZE})")
        })?;
    }
    Ok(())
}

fn check(ok: bool, path: &Path, field: &str, msg: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(ModelError::config(path, field, msg()))
    }
}

impl LmConfig for T5Config {
    const MODEL_TYPES: &'static [&'static str] = &["t5"];

    fn validate(&self, path: &Path) -> Result<()> {
        let t = self;
        bounded(
            path,
            &[
                ("text_config.vocab_size", t.vocab_size),
                ("text_config.d_model", t.d_model),
                ("text_config.d_kv", t.d_kv),
                ("text_config.d_ff", t.d_ff),
                ("text_config.num_layers", t.num_layers),
                (
                    "text_config.num_decoder_layers",
                    t.num_decoder_layers.unwrap_or(0),
                ),
                ("text_config.num_heads", t.num_heads),
                (
                    "text_config.relative_attention_num_buckets",
                    t.relative_attention_num_buckets,
                ),
                (
                    "text_config.relative_attention_max_distance",
                    t.relative_attention_max_distance,
                ),
            ],
        )?;
        let act = t.activation_name();
        check(
            Activation::from_hf(&act).is_some(),
            path,
            "text_config.dense_act_fn",
            || format!("unknown activation `{act}`"),
        )?;
        let parts: Vec<&str> = t.feed_forward_proj.split('-').collect();
        check(
            parts.len() == 1 || (parts.len() == 2 && parts[0] == "gated"),
            path,
            "text_config.feed_forward_proj",
            || format!("`{}` is neither `ACT` nor `gated-ACT`", t.feed_forward_proj),
        )?;
        check(
            t.relative_attention_num_buckets >= 4,
            path,
            "text_config.relative_attention_num_buckets",
            || "must be at least 4".into(),
        )?;
        check(
            t.num_heads > 0 && t.d_kv > 0 && t.d_model > 0 && t.vocab_size > 0,
            path,
            "text_config",
            || "d_model, d_kv, num_heads and vocab_size must be at least 1".into(),
        )
    }

    fn hidden_size(&self) -> usize {
        self.d_model
    }

    fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// `T5PreTrainedModel._init_weights`: embeddings N(0, 1), `q` N(0, (d_model·d_kv)^-½),
    /// `o` N(0, (heads·d_kv)^-½), `wo` N(0, d_ff^-½), the rest (k, v, wi*, relative bias,
    /// lm_head) N(0, d_model^-½).
    fn init_std(&self, leaf: &str) -> Option<f32> {
        let (d, kv, h, ff) = (
            self.d_model as f32,
            self.d_kv as f32,
            self.num_heads as f32,
            self.d_ff as f32,
        );
        Some(match leaf {
            "shared" | "embed_tokens" => 1.0,
            "q" => (d * kv).powf(-0.5),
            "o" => (h * kv).powf(-0.5),
            "wo" => ff.powf(-0.5),
            _ => d.powf(-0.5),
        })
    }
}

impl LmConfig for LlamaConfig {
    const MODEL_TYPES: &'static [&'static str] = &["llama"];

    fn validate(&self, path: &Path) -> Result<()> {
        let l = self;
        bounded(
            path,
            &[
                ("text_config.vocab_size", l.vocab_size),
                ("text_config.hidden_size", l.hidden_size),
                ("text_config.intermediate_size", l.intermediate_size),
                ("text_config.num_hidden_layers", l.num_hidden_layers),
                ("text_config.num_attention_heads", l.num_attention_heads),
                ("text_config.num_key_value_heads", l.kv_heads()),
                ("text_config.head_dim", l.head_size()),
                (
                    "text_config.max_position_embeddings",
                    l.max_position_embeddings,
                ),
            ],
        )?;
        check(
            Activation::from_hf(&l.hidden_act).is_some(),
            path,
            "text_config.hidden_act",
            || format!("unknown activation `{}`", l.hidden_act),
        )?;
        check(
            l.num_attention_heads > 0
                && l.kv_heads() > 0
                && l.num_attention_heads.is_multiple_of(l.kv_heads()),
            path,
            "text_config.num_key_value_heads",
            || {
                format!(
                    "{} key/value heads do not divide {} attention heads",
                    l.kv_heads(),
                    l.num_attention_heads
                )
            },
        )?;
        check(
            l.head_size() > 0 && l.head_size().is_multiple_of(2),
            path,
            "text_config.head_dim",
            || format!("{} is not a positive even number", l.head_size()),
        )?;
        let rope = l.rope_type();
        check(
            rope == "default",
            path,
            "text_config.rope_parameters",
            || format!("rope_type `{rope}` is not supported (only `default`)"),
        )?;
        check(
            l.vocab_size > 0 && l.max_position_embeddings > 0,
            path,
            "text_config",
            || "vocab_size and max_position_embeddings must be at least 1".into(),
        )
    }

    fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    fn vocab_size(&self) -> usize {
        self.vocab_size
    }
}

/// Which composite architecture a directory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `InstructBlipForConditionalGeneration`: the Q-Former also reads the instruction.
    InstructBlip,
    /// `Blip2ForConditionalGeneration`: queries only.
    Blip2,
}

/// The top-level `config.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlipConfig {
    pub model_type: String,
    #[serde(default)]
    pub vision_config: VisionConfig,
    #[serde(default)]
    pub qformer_config: QFormerConfig,
    pub text_config: serde_json::Value,
    #[serde(default = "default_num_query_tokens")]
    pub num_query_tokens: usize,
    #[serde(default)]
    pub image_token_index: Option<u32>,
    #[serde(default)]
    pub use_decoder_only_language_model: Option<bool>,
    /// σ of the composite's own weights (query tokens, language projection) at initialisation.
    #[serde(default = "default_initializer_range")]
    pub initializer_range: f32,
}

fn default_num_query_tokens() -> usize {
    32
}

fn default_initializer_range() -> f32 {
    0.02
}

/// A parsed, validated InstructBLIP / BLIP-2 configuration over the language model's
/// `text_config` type `T`.
#[derive(Debug, Clone)]
pub struct InstructBlipConfig<T> {
    pub architecture: Architecture,
    pub vision: VisionConfig,
    pub qformer: QFormerConfig,
    pub text: T,
    pub num_query_tokens: usize,
    pub raw: BlipConfig,
}

/// `model_type` and `text_config.model_type` of a `config.json` (T5 when the text config
/// names none, as `transformers`' InstructBLIP defaults).
pub fn peek_model_types(text: &str, path: &Path) -> Result<(String, String)> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|error| ModelError::Json {
        path: path.to_path_buf(),
        error,
    })?;
    let top = v
        .get("model_type")
        .and_then(|m| m.as_str())
        .ok_or_else(|| ModelError::config(path, "model_type", "missing (expected a string)"))?;
    let text_type = v
        .get("text_config")
        .and_then(|t| t.get("model_type"))
        .and_then(|m| m.as_str())
        .unwrap_or(if top == "llava" { "llama" } else { "t5" });
    Ok((top.to_string(), text_type.to_string()))
}

impl<T: LmConfig> InstructBlipConfig<T> {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json(&text, path)
    }

    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let raw: BlipConfig = crate::error::parse_json(text, path)?;
        let architecture = match raw.model_type.as_str() {
            "instructblip" => Architecture::InstructBlip,
            "blip-2" | "blip_2" => Architecture::Blip2,
            other => {
                return Err(ModelError::config(
                    path,
                    "model_type",
                    format!("unknown model_type `{other}`, expected `instructblip` or `blip-2`"),
                ));
            }
        };
        let (_, model_type) = peek_model_types(text, path)?;
        if !T::MODEL_TYPES.contains(&model_type.as_str()) {
            return Err(ModelError::config(
                path,
                "text_config.model_type",
                format!("`{model_type}`, expected {}", T::MODEL_TYPES.join(" or ")),
            ));
        }
        let text_cfg: T = serde_path_to_error::deserialize(raw.text_config.clone())
            .map_err(|e| crate::error::json_error(path, "text_config", e))?;
        let cfg = Self {
            architecture,
            vision: raw.vision_config.clone(),
            qformer: raw.qformer_config.clone(),
            text: text_cfg,
            num_query_tokens: raw.num_query_tokens,
            raw,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Whether the Q-Former reads instruction text beside its queries.
    pub fn qformer_reads_text(&self) -> bool {
        match self.architecture {
            Architecture::InstructBlip => true,
            Architecture::Blip2 => self.qformer.use_qformer_text_input.unwrap_or(false),
        }
    }

    fn validate(&self, path: &Path) -> Result<()> {
        validate_vision(&self.vision, path)?;
        let v = &self.vision;
        let q = &self.qformer;
        bounded(
            path,
            &[
                ("qformer_config.vocab_size", q.vocab_size),
                ("qformer_config.hidden_size", q.hidden_size),
                ("qformer_config.num_hidden_layers", q.num_hidden_layers),
                ("qformer_config.num_attention_heads", q.num_attention_heads),
                ("qformer_config.intermediate_size", q.intermediate_size),
                (
                    "qformer_config.max_position_embeddings",
                    q.max_position_embeddings,
                ),
                ("num_query_tokens", self.num_query_tokens),
            ],
        )?;
        check(
            q.num_attention_heads > 0 && q.hidden_size.is_multiple_of(q.num_attention_heads),
            path,
            "qformer_config.num_attention_heads",
            || {
                format!(
                    "{} heads do not divide hidden_size {}",
                    q.num_attention_heads, q.hidden_size
                )
            },
        )?;
        check(
            q.cross_attention_frequency > 0,
            path,
            "qformer_config.cross_attention_frequency",
            || "must be at least 1".into(),
        )?;
        check(
            Activation::from_hf(&q.hidden_act).is_some(),
            path,
            "qformer_config.hidden_act",
            || format!("unknown activation `{}`", q.hidden_act),
        )?;
        check(
            q.encoder_hidden_size == v.hidden_size,
            path,
            "qformer_config.encoder_hidden_size",
            || {
                format!(
                    "{} differs from vision hidden_size {}",
                    q.encoder_hidden_size, v.hidden_size
                )
            },
        )?;
        check(
            q.vocab_size > 0 && q.max_position_embeddings > 0,
            path,
            "qformer_config",
            || "vocab_size and max_position_embeddings must be at least 1".into(),
        )?;
        self.text.validate(path)?;
        check(self.num_query_tokens > 0, path, "num_query_tokens", || {
            "must be at least 1".into()
        })
    }
}

/// Checks a ViT config (heads, patches, activation), naming `vision_config.<field>`.
pub fn validate_vision(v: &VisionConfig, path: &Path) -> Result<()> {
    bounded(
        path,
        &[
            ("vision_config.hidden_size", v.hidden_size),
            ("vision_config.intermediate_size", v.intermediate_size),
            ("vision_config.num_hidden_layers", v.num_hidden_layers),
            ("vision_config.num_attention_heads", v.num_attention_heads),
            ("vision_config.image_size", v.image_size),
            ("vision_config.patch_size", v.patch_size),
        ],
    )?;
    check(
        v.num_attention_heads > 0 && v.hidden_size.is_multiple_of(v.num_attention_heads),
        path,
        "vision_config.num_attention_heads",
        || {
            format!(
                "{} heads do not divide hidden_size {}",
                v.num_attention_heads, v.hidden_size
            )
        },
    )?;
    check(
        v.patch_size > 0 && v.image_size.is_multiple_of(v.patch_size),
        path,
        "vision_config.patch_size",
        || {
            format!(
                "{} does not divide image_size {}",
                v.patch_size, v.image_size
            )
        },
    )?;
    check(
        Activation::from_hf(&v.hidden_act).is_some(),
        path,
        "vision_config.hidden_act",
        || format!("unknown activation `{}`", v.hidden_act),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t5_activation_follows_hf_rules() {
        let mut t = T5Config {
            feed_forward_proj: "gated-gelu".into(),
            ..Default::default()
        };
        assert_eq!(t.activation_name(), "gelu_new");
        t.dense_act_fn = Some("gelu".into());
        assert_eq!(t.activation_name(), "gelu");
        t.feed_forward_proj = "gated-silu".into();
        t.dense_act_fn = None;
        assert_eq!(t.activation_name(), "silu");
        assert!(t.is_gated());
    }

    #[test]
    fn llama_text_config_reads_theta_and_heads() {
        let cfg = InstructBlipConfig::<LlamaConfig>::from_json(
            r#"{"model_type": "instructblip", "text_config": {"model_type": "llama",
               "hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 2,
               "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}}}"#,
            Path::new("config.json"),
        )
        .unwrap();
        let l = &cfg.text;
        assert_eq!((l.kv_heads(), l.head_size(), l.theta()), (2, 8, 500000.0));
        assert!(!l.ties_embeddings());
        // a LLaMA text config is not a T5 one
        let err = InstructBlipConfig::<T5Config>::from_json(
            r#"{"model_type": "instructblip", "text_config": {"model_type": "llama"}}"#,
            Path::new("config.json"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("text_config.model_type"), "{err}");
        let err = InstructBlipConfig::<LlamaConfig>::from_json(
            r#"{"model_type": "instructblip", "text_config": {"model_type": "llama",
               "num_attention_heads": 8, "num_key_value_heads": 3}}"#,
            Path::new("config.json"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("num_key_value_heads"), "{err}");
    }

    #[test]
    fn unknown_model_type_names_the_field() {
        let err = InstructBlipConfig::<T5Config>::from_json(
            r#"{"model_type": "llava", "text_config": {}}"#,
            Path::new("x/config.json"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("x/config.json") && err.contains("model_type") && err.contains("llava"),
            "{err}"
        );
    }
}
