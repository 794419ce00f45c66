//! `config.json` of an HF InstructBLIP / BLIP-2 model directory: serde structs that mirror the HF
//! field names, with the defaults `transformers` applies when a field is absent.

use std::path::Path;

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

/// The language model's `text_config`.
#[derive(Debug, Clone)]
pub enum TextConfig {
    /// Encoder-decoder (FlanT5).
    T5(T5Config),
    /// Decoder-only (LLaMA / Vicuna).
    Llama(LlamaConfig),
}

impl TextConfig {
    pub fn as_t5(&self) -> Option<&T5Config> {
        match self {
            TextConfig::T5(t) => Some(t),
            TextConfig::Llama(_) => None,
        }
    }

    pub fn as_llama(&self) -> Option<&LlamaConfig> {
        match self {
            TextConfig::Llama(l) => Some(l),
            TextConfig::T5(_) => None,
        }
    }

    pub fn is_decoder_only(&self) -> bool {
        matches!(self, TextConfig::Llama(_))
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            TextConfig::T5(t) => t.vocab_size,
            TextConfig::Llama(l) => l.vocab_size,
        }
    }

    /// Width of the language model's input embeddings (the projection's output).
    pub fn hidden_size(&self) -> usize {
        match self {
            TextConfig::T5(t) => t.d_model,
            TextConfig::Llama(l) => l.hidden_size,
        }
    }
}

/// The T5 view of the text config for code written before decoder-only models existed.
/// Panics on a LLaMA config: such code must match on [`TextConfig`] instead.
impl std::ops::Deref for TextConfig {
    type Target = T5Config;

    fn deref(&self) -> &T5Config {
        match self {
            TextConfig::T5(t) => t,
            TextConfig::Llama(_) => {
                panic!("this code path supports T5 language models only; the model is LLaMA")
            }
        }
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
}

fn default_num_query_tokens() -> usize {
    32
}

/// A parsed, validated configuration.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vision: VisionConfig,
    pub qformer: QFormerConfig,
    pub text: TextConfig,
    pub num_query_tokens: usize,
    pub raw: BlipConfig,
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json(&text, path)
    }

    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let raw: BlipConfig = serde_json::from_str(text).map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            error: source,
        })?;
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
        let model_type = raw
            .text_config
            .get("model_type")
            .and_then(|m| m.as_str())
            .unwrap_or("t5")
            .to_string();
        let text_err =
            |e: serde_json::Error| ModelError::config(path, "text_config", e.to_string());
        let text_cfg = match model_type.as_str() {
            "t5" => {
                TextConfig::T5(serde_json::from_value(raw.text_config.clone()).map_err(text_err)?)
            }
            "llama" => TextConfig::Llama(
                serde_json::from_value(raw.text_config.clone()).map_err(text_err)?,
            ),
            other => {
                return Err(ModelError::config(
                    path,
                    "text_config.model_type",
                    format!("unsupported language model `{other}`, expected `t5` or `llama`"),
                ));
            }
        };
        let cfg = ModelConfig {
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
        let check = |ok: bool, field: &str, msg: String| {
            if ok {
                Ok(())
            } else {
                Err(ModelError::config(path, field, msg))
            }
        };
        let v = &self.vision;
        check(
            v.num_attention_heads > 0 && v.hidden_size.is_multiple_of(v.num_attention_heads),
            "vision_config.num_attention_heads",
            format!(
                "{} heads do not divide hidden_size {}",
                v.num_attention_heads, v.hidden_size
            ),
        )?;
        check(
            v.patch_size > 0 && v.image_size.is_multiple_of(v.patch_size),
            "vision_config.patch_size",
            format!(
                "{} does not divide image_size {}",
                v.patch_size, v.image_size
            ),
        )?;
        check(
            Activation::from_hf(&v.hidden_act).is_some(),
            "vision_config.hidden_act",
            format!("unknown activation `{}`", v.hidden_act),
        )?;
        let q = &self.qformer;
        check(
            q.num_attention_heads > 0 && q.hidden_size.is_multiple_of(q.num_attention_heads),
            "qformer_config.num_attention_heads",
            format!(
                "{} heads do not divide hidden_size {}",
                q.num_attention_heads, q.hidden_size
            ),
        )?;
        check(
            q.cross_attention_frequency > 0,
            "qformer_config.cross_attention_frequency",
            "must be at least 1".into(),
        )?;
        check(
            Activation::from_hf(&q.hidden_act).is_some(),
            "qformer_config.hidden_act",
            format!("unknown activation `{}`", q.hidden_act),
        )?;
        check(
            q.encoder_hidden_size == v.hidden_size,
            "qformer_config.encoder_hidden_size",
            format!(
                "{} differs from vision hidden_size {}",
                q.encoder_hidden_size, v.hidden_size
            ),
        )?;
        match &self.text {
            TextConfig::T5(t) => {
                let act = t.activation_name();
                check(
                    Activation::from_hf(&act).is_some(),
                    "text_config.dense_act_fn",
                    format!("unknown activation `{act}`"),
                )?;
                let parts: Vec<&str> = t.feed_forward_proj.split('-').collect();
                check(
                    parts.len() == 1 || (parts.len() == 2 && parts[0] == "gated"),
                    "text_config.feed_forward_proj",
                    format!("`{}` is neither `ACT` nor `gated-ACT`", t.feed_forward_proj),
                )?;
                check(
                    t.relative_attention_num_buckets >= 4,
                    "text_config.relative_attention_num_buckets",
                    "must be at least 4".into(),
                )?;
            }
            TextConfig::Llama(l) => {
                check(
                    Activation::from_hf(&l.hidden_act).is_some(),
                    "text_config.hidden_act",
                    format!("unknown activation `{}`", l.hidden_act),
                )?;
                check(
                    l.num_attention_heads > 0
                        && l.kv_heads() > 0
                        && l.num_attention_heads.is_multiple_of(l.kv_heads()),
                    "text_config.num_key_value_heads",
                    format!(
                        "{} key/value heads do not divide {} attention heads",
                        l.kv_heads(),
                        l.num_attention_heads
                    ),
                )?;
                check(
                    l.head_size() > 0 && l.head_size().is_multiple_of(2),
                    "text_config.head_dim",
                    format!("{} is not a positive even number", l.head_size()),
                )?;
                let rope = l.rope_type();
                check(
                    rope == "default",
                    "text_config.rope_parameters",
                    format!("rope_type `{rope}` is not supported (only `default`)"),
                )?;
            }
        }
        check(
            self.num_query_tokens > 0,
            "num_query_tokens",
            "must be at least 1".into(),
        )?;
        Ok(())
    }
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
        let cfg = ModelConfig::from_json(
            r#"{"model_type": "instructblip", "text_config": {"model_type": "llama",
               "hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 2,
               "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}}}"#,
            Path::new("config.json"),
        )
        .unwrap();
        let l = cfg.text.as_llama().unwrap();
        assert_eq!((l.kv_heads(), l.head_size(), l.theta()), (2, 8, 500000.0));
        assert!(cfg.text.is_decoder_only() && !l.ties_embeddings());
        let err = ModelConfig::from_json(
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
        let err = ModelConfig::from_json(
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
