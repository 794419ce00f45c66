//! The CLIP vision tower as HF `CLIPVisionModel` computes it (LLaVA's `vision_tower`): patch
//! embedding (a bias-free stride-p convolution), class token and learned positions,
//! `pre_layrnorm`, pre-LN encoder layers with separate q/k/v/out projections (all with biases)
//! and a `quick_gelu` (or any HF activation) MLP. `post_layernorm` is loaded and kept (it is a
//! parameter of the checkpoint) but LLaVA reads an encoder hidden state without it.

use std::path::Path;

use crate::nn::LayerNorm;
use crate::ops::{self, DenseBackend};
use burn::module::Param;
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::config::{Activation, MAX_SIZE};
use crate::error::{ModelError, Result};
use crate::linear::Linear;
use crate::nn::{Tap, activate, attention, merge_heads, no_tap, split_heads};
use crate::weights::Loader;

/// `vision_config` of a CLIP vision tower (HF `CLIPVisionConfig` defaults).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub initializer_range: f32,
    /// Scales every initialisation σ (`CLIPPreTrainedModel._init_weights`).
    pub initializer_factor: f32,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            initializer_range: 0.02,
            initializer_factor: 1.0,
        }
    }
}

impl ClipVisionConfig {
    /// Patches per image, `(image_size / patch_size)²`.
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size.max(1)).pow(2)
    }

    /// The σ `CLIPPreTrainedModel._init_weights` draws the weight `key` from, `key` relative to
    /// the tower (`embeddings.…`, `encoder.layers.N.…`): class embedding E^-½, patch and
    /// position embeddings `initializer_range`, q/k/v and fc2 E^-½·(2·layers)^-½, out_proj E^-½,
    /// fc1 (2E)^-½, each times `initializer_factor`. Biases (0) and norms (1) are the caller's.
    pub fn init_std(&self, key: &str) -> f32 {
        let e = self.hidden_size as f32;
        let depth = (2 * self.num_hidden_layers.max(1)) as f32;
        let f = self.initializer_factor;
        let leaf = key.strip_suffix(".weight").unwrap_or(key);
        let leaf = leaf.rsplit('.').next().unwrap_or(leaf);
        f * match leaf {
            "class_embedding" => e.powf(-0.5),
            "q_proj" | "k_proj" | "v_proj" | "fc2" => e.powf(-0.5) * depth.powf(-0.5),
            "out_proj" => e.powf(-0.5),
            "fc1" => (2.0 * e).powf(-0.5),
            _ => self.initializer_range,
        }
    }

    /// Checks the fields (one-line errors naming `vision_config.<field>`).
    pub fn validate(&self, path: &Path) -> Result<()> {
        for (field, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("image_size", self.image_size),
            ("patch_size", self.patch_size),
        ] {
            if v > MAX_SIZE {
                return Err(ModelError::config(
                    path,
                    &format!("vision_config.{field}"),
                    format!("{v} is beyond any model's size (at most {MAX_SIZE})"),
                ));
            }
        }
        let err = |field: &str, msg: String| {
            Err(ModelError::config(
                path,
                &format!("vision_config.{field}"),
                msg,
            ))
        };
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return err(
                "num_attention_heads",
                format!(
                    "{} heads do not divide hidden_size {}",
                    self.num_attention_heads, self.hidden_size
                ),
            );
        }
        if self.patch_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            return err(
                "patch_size",
                format!(
                    "{} does not divide image_size {}",
                    self.patch_size, self.image_size
                ),
            );
        }
        if self.num_channels != 3 {
            return err(
                "num_channels",
                format!("{} channels, only RGB (3) is supported", self.num_channels),
            );
        }
        if ClipActivation::from_hf(&self.hidden_act).is_none() {
            return err(
                "hidden_act",
                format!("unknown activation `{}`", self.hidden_act),
            );
        }
        Ok(())
    }
}

/// CLIP's MLP activation: `quick_gelu` (x·σ(1.702x), OpenAI CLIP) or any [`Activation`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipActivation {
    QuickGelu,
    Other(Activation),
}

impl ClipActivation {
    pub fn from_hf(name: &str) -> Option<Self> {
        match name {
            "quick_gelu" => Some(Self::QuickGelu),
            other => Activation::from_hf(other).map(Self::Other),
        }
    }

    pub fn apply<B: DenseBackend, const D: usize>(self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Self::QuickGelu => activate(x, Activation::QuickGelu),
            Self::Other(a) => activate(x, a),
        }
    }
}

/// `embeddings.{class_embedding, patch_embedding, position_embedding}`.
#[derive(Module, Debug)]
pub struct ClipEmbeddings<B: Backend> {
    /// [E].
    pub class_embedding: Param<Tensor<B, 1>>,
    /// Conv2d weight in PyTorch layout [E, 3, p, p] (stride = kernel = p, no bias).
    pub patch_weight: Param<Tensor<B, 4>>,
    /// `position_embedding.weight` [1 + patches, E].
    pub position_embedding: Param<Tensor<B, 2>>,
}

impl<B: DenseBackend> ClipEmbeddings<B> {
    fn load(cfg: &ClipVisionConfig, vb: &Loader<B>) -> Result<Self> {
        let (e, p, c) = (cfg.hidden_size, cfg.patch_size, cfg.num_channels);
        Ok(Self {
            class_embedding: vb.param("class_embedding", [e])?,
            patch_weight: vb.param("patch_embedding.weight", [e, c, p, p])?,
            position_embedding: vb
                .param("position_embedding.weight", [cfg.num_patches() + 1, e])?,
        })
    }

    /// Pixels [B, 3, H, W] → [B, 1 + patches, E]: the convolution is a matmul over the
    /// non-overlapping p×p patches flattened as (channel, row, column), class token first.
    pub fn forward(&self, pixels: Tensor<B, 4>) -> Tensor<B, 3> {
        let [b, c, h, w] = pixels.dims();
        let [e, _, p, _] = self.patch_weight.dims();
        let (rows, cols) = (h / p, w / p);
        let flat = pixels
            .reshape([b, c, rows, p, cols, p])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([b, rows * cols, c * p * p]);
        let kernel = self.patch_weight.val().reshape([e, c * p * p]).transpose();
        let patches = ops::linear(flat, kernel, None);
        let cls = self
            .class_embedding
            .val()
            .reshape([1, 1, e])
            .expand([b, 1, e]);
        let x = Tensor::cat(vec![cls, patches], 1);
        let n = x.dims()[1];
        x + self
            .position_embedding
            .val()
            .slice([0..n, 0..e])
            .unsqueeze::<3>()
    }
}

/// `self_attn.{q,k,v,out}_proj`.
#[derive(Module, Debug)]
pub struct ClipAttention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub out_proj: Linear<B>,
    pub num_heads: usize,
}

impl<B: DenseBackend> ClipAttention<B> {
    fn load(cfg: &ClipVisionConfig, vb: &Loader<B>) -> Result<Self> {
        let e = cfg.hidden_size;
        Ok(Self {
            q_proj: vb.linear("q_proj", e, e, true)?,
            k_proj: vb.linear("k_proj", e, e, true)?,
            v_proj: vb.linear("v_proj", e, e, true)?,
            out_proj: vb.linear("out_proj", e, e, true)?,
            num_heads: cfg.num_attention_heads,
        })
    }

    pub fn forward(&self, x: Tensor<B, 3>, tap: Tap<B>) -> Tensor<B, 3> {
        let e = x.dims()[2];
        tap(&[&self.q_proj, &self.k_proj, &self.v_proj], &x);
        let heads = |l: &Linear<B>| split_heads(l.forward(x.clone()), self.num_heads);
        let dh = e / self.num_heads;
        let out = merge_heads(attention(
            heads(&self.q_proj),
            heads(&self.k_proj),
            heads(&self.v_proj),
            Some((dh as f64).powf(-0.5)),
            None,
        ));
        tap(&[&self.out_proj], &out);
        self.out_proj.forward(out)
    }
}

/// `encoder.layers.N`: x += attn(LN1(x)); x += fc2(act(fc1(LN2(x)))).
#[derive(Module, Debug)]
pub struct ClipLayer<B: Backend> {
    pub self_attn: ClipAttention<B>,
    pub layer_norm1: LayerNorm<B>,
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
    pub layer_norm2: LayerNorm<B>,
    #[module(skip)]
    pub act: ClipActivation,
}

impl<B: DenseBackend> ClipLayer<B> {
    fn load(cfg: &ClipVisionConfig, vb: &Loader<B>) -> Result<Self> {
        let (e, f, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        Ok(Self {
            self_attn: ClipAttention::load(cfg, &vb.pp("self_attn"))?,
            layer_norm1: vb.layer_norm("layer_norm1", e, eps)?,
            fc1: vb.linear("mlp.fc1", e, f, true)?,
            fc2: vb.linear("mlp.fc2", f, e, true)?,
            layer_norm2: vb.layer_norm("layer_norm2", e, eps)?,
            act: ClipActivation::from_hf(&cfg.hidden_act).expect("validated"),
        })
    }

    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.forward_tapped(x, &mut no_tap)
    }

    /// The layer, reporting each linear's input to `tap`.
    pub fn forward_tapped(&self, x: Tensor<B, 3>, tap: Tap<B>) -> Tensor<B, 3> {
        let x = x.clone() + self.self_attn.forward(self.layer_norm1.forward(x), tap);
        let h = self.layer_norm2.forward(x.clone());
        tap(&[&self.fc1], &h);
        let h = self.act.apply(self.fc1.forward(h));
        tap(&[&self.fc2], &h);
        x + self.fc2.forward(h)
    }

    /// The prunable linears: q/k/v/out_proj, fc1, fc2.
    pub fn linears(&self) -> Vec<&Linear<B>> {
        let a = &self.self_attn;
        vec![
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.out_proj,
            &self.fc1,
            &self.fc2,
        ]
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear<B>> {
        let a = &mut self.self_attn;
        vec![
            &mut a.q_proj,
            &mut a.k_proj,
            &mut a.v_proj,
            &mut a.out_proj,
            &mut self.fc1,
            &mut self.fc2,
        ]
    }
}

/// `CLIPVisionTransformer`: embeddings → `pre_layrnorm` → layers (→ `post_layernorm`, which
/// LLaVA does not apply to its features).
#[derive(Module, Debug)]
pub struct ClipVisionTower<B: Backend> {
    pub embeddings: ClipEmbeddings<B>,
    pub pre_layrnorm: LayerNorm<B>,
    pub layers: Vec<ClipLayer<B>>,
    pub post_layernorm: LayerNorm<B>,
    #[module(skip)]
    pub image_size: usize,
}

impl<B: DenseBackend> ClipVisionTower<B> {
    /// Loads a tower whose keys sit under `vb` (`vision_tower.` or, in older hub files,
    /// `vision_tower.vision_model.`).
    pub fn load(cfg: &ClipVisionConfig, vb: &Loader<B>) -> Result<Self> {
        let (e, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ClipLayer::load(cfg, &vb.pp(format!("encoder.layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embeddings: ClipEmbeddings::load(cfg, &vb.pp("embeddings"))?,
            pre_layrnorm: vb.layer_norm("pre_layrnorm", e, eps)?,
            layers,
            post_layernorm: vb.layer_norm("post_layernorm", e, eps)?,
            image_size: cfg.image_size,
        })
    }

    /// `hidden_states[0]`: the embeddings after `pre_layrnorm` (the input of layer 0).
    pub fn embed(&self, pixels: Tensor<B, 4>) -> Tensor<B, 3> {
        self.pre_layrnorm.forward(self.embeddings.forward(pixels))
    }

    /// `hidden_states[n]` of HF's encoder output: the output of layer `n − 1` (`n = 0`: the
    /// embeddings). Only the first `n` layers run.
    pub fn hidden_state(&self, pixels: Tensor<B, 4>, n: usize) -> Tensor<B, 3> {
        self.hidden_states(pixels, &[n]).remove(0)
    }

    /// `hidden_states[n]` for every `n` of `indices`, in their order (repeats allowed); the
    /// layers run once, up to the largest index.
    pub fn hidden_states(&self, pixels: Tensor<B, 4>, indices: &[usize]) -> Vec<Tensor<B, 3>> {
        let last = indices.iter().copied().max().unwrap_or(0);
        let mut states = vec![None; last + 1];
        let mut x = self.embed(pixels);
        for (n, state) in states.iter_mut().enumerate() {
            if n > 0 {
                x = self.layers[n - 1].forward(x);
            }
            if indices.contains(&n) {
                *state = Some(x.clone());
            }
        }
        indices
            .iter()
            .map(|&n| states[n].clone().expect("selected above"))
            .collect()
    }

    /// Tokens per image: patches + the class token.
    pub fn num_positions(&self) -> usize {
        self.embeddings.position_embedding.dims()[0]
    }
}
