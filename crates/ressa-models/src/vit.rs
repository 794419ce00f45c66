//! EVA ViT image encoder as in HF `InstructBlipVisionModel` / `Blip2VisionModel`
//! (keys under `vision_model.`): patch embedding, class token, absolute positions, pre-LN blocks
//! with a fused `qkv` whose bias is q‖0‖v, exact-erf GELU MLP, and `post_layernorm`.

use crate::nn::LayerNorm;
use crate::ops::{self, DenseBackend};
use burn::module::Param;

use crate::linear::Linear;
use burn::prelude::*;

use crate::config::{Activation, VisionConfig};
use crate::error::Result;
use crate::nn::{Tap, activate, attention, merge_heads, no_tap, split_heads};
use crate::weights::{Loader, Stored};

/// `embeddings.{class_embedding, patch_embedding, position_embedding}`.
#[derive(Module, Debug)]
pub struct VisionEmbeddings<B: Backend> {
    pub class_embedding: Param<Tensor<B, 3>>,
    /// Conv2d weight in PyTorch layout [E, 3, p, p] (stride = kernel = p).
    pub patch_weight: Param<Tensor<B, 4>>,
    pub patch_bias: Param<Tensor<B, 1>>,
    pub position_embedding: Param<Tensor<B, 3>>,
}

impl<B: DenseBackend> VisionEmbeddings<B> {
    fn load(cfg: &VisionConfig, vb: &Loader<B>) -> Result<Self> {
        let e = cfg.hidden_size;
        let p = cfg.patch_size;
        let n = (cfg.image_size / p).pow(2) + 1;
        Ok(Self {
            class_embedding: vb.param("class_embedding", [1, 1, e])?,
            patch_weight: vb.param("patch_embedding.weight", [e, 3, p, p])?,
            patch_bias: vb.param("patch_embedding.bias", [e])?,
            position_embedding: vb.param("position_embedding", [1, n, e])?,
        })
    }

    /// Pixels [B, 3, H, W] → tokens [B, 1 + (H/p)(W/p), E]. A stride-p p×p convolution is a
    /// matmul over non-overlapping patches flattened as (channel, row, column).
    pub fn forward(&self, pixels: Tensor<B, 4>) -> Tensor<B, 3> {
        let [b, c, h, w] = pixels.dims();
        let [e, _, p, _] = self.patch_weight.dims();
        let (gh, gw) = (h / p, w / p);
        let patches = pixels
            .reshape([b, c, gh, p, gw, p])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([b, gh * gw, c * p * p]);
        let kernel = self.patch_weight.val().reshape([e, c * p * p]).transpose();
        let tokens = ops::linear(patches, kernel, Some(self.patch_bias.val()));
        let cls = self.class_embedding.val().expand([b, 1, e]);
        let x = Tensor::cat(vec![cls, tokens], 1);
        let n = x.dims()[1];
        x + self.position_embedding.val().slice([0..1, 0..n, 0..e])
    }
}

/// `self_attn.{qkv, projection}`; the checkpoint stores the qkv bias either fused
/// (`qkv.bias`, transformers ≥ 5) or as `q_bias`/`v_bias` (the hub's files; k bias is zero).
#[derive(Module, Debug)]
pub struct VisionAttention<B: Backend> {
    pub qkv: Linear<B>,
    pub projection: Linear<B>,
    pub num_heads: usize,
    pub split_bias: bool,
}

impl<B: DenseBackend> VisionAttention<B> {
    fn load(cfg: &VisionConfig, vb: &Loader<B>) -> Result<Self> {
        let e = cfg.hidden_size;
        let mut qkv = vb.linear("qkv", e, 3 * e, false)?;
        let mut split_bias = false;
        if cfg.qkv_bias {
            if vb.contains_or("qkv.bias", true) {
                qkv.bias = Some(vb.param("qkv.bias", [3 * e])?);
            } else {
                let q = vb.tensor("q_bias", [e])?;
                let v = vb.tensor("v_bias", [e])?;
                let k = q.zeros_like();
                let bias = Param::from_tensor(Tensor::cat(vec![q, k, v], 0));
                vb.record(
                    bias.id,
                    "qkv.bias",
                    Stored::QkvBias {
                        q: vb.key("q_bias"),
                        v: vb.key("v_bias"),
                    },
                );
                qkv.bias = Some(bias);
                split_bias = true;
            }
        }
        Ok(Self {
            qkv,
            projection: vb.linear("projection", e, e, true)?,
            num_heads: cfg.num_attention_heads,
            split_bias,
        })
    }

    pub fn forward(&self, x: Tensor<B, 3>, tap: Tap<B>) -> Tensor<B, 3> {
        let [b, l, e] = x.dims();
        tap(&[&self.qkv], &x);
        let qkv = self.qkv.forward(x);
        let part = |i: usize| {
            split_heads(
                qkv.clone().slice([0..b, 0..l, i * e..(i + 1) * e]),
                self.num_heads,
            )
        };
        let dh = e / self.num_heads;
        let out = merge_heads(attention(
            part(0),
            part(1),
            part(2),
            Some((dh as f64).powf(-0.5)),
            None,
        ));
        tap(&[&self.projection], &out);
        self.projection.forward(out)
    }
}

/// `encoder.layers.N`: x += attn(LN1(x)); x += fc2(act(fc1(LN2(x)))).
#[derive(Module, Debug)]
pub struct VisionLayer<B: Backend> {
    pub self_attn: VisionAttention<B>,
    pub layer_norm1: LayerNorm<B>,
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
    pub layer_norm2: LayerNorm<B>,
    #[module(skip)]
    pub act: Activation,
}

impl<B: DenseBackend> VisionLayer<B> {
    fn load(cfg: &VisionConfig, vb: &Loader<B>) -> Result<Self> {
        let (e, f) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            self_attn: VisionAttention::load(cfg, &vb.pp("self_attn"))?,
            layer_norm1: vb.layer_norm("layer_norm1", e, cfg.layer_norm_eps)?,
            fc1: vb.linear("mlp.fc1", e, f, true)?,
            fc2: vb.linear("mlp.fc2", f, e, true)?,
            layer_norm2: vb.layer_norm("layer_norm2", e, cfg.layer_norm_eps)?,
            act: Activation::from_hf(&cfg.hidden_act).expect("validated"),
        })
    }

    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.forward_tapped(x, &mut no_tap)
    }

    /// The block, reporting each linear's input to `tap`.
    pub fn forward_tapped(&self, x: Tensor<B, 3>, tap: Tap<B>) -> Tensor<B, 3> {
        let x = x.clone() + self.self_attn.forward(self.layer_norm1.forward(x), tap);
        let h = self.layer_norm2.forward(x.clone());
        tap(&[&self.fc1], &h);
        let h = activate(self.fc1.forward(h), self.act);
        tap(&[&self.fc2], &h);
        x + self.fc2.forward(h)
    }

    /// The prunable linears: qkv, projection, fc1, fc2.
    pub fn linears(&self) -> Vec<&Linear<B>> {
        vec![
            &self.self_attn.qkv,
            &self.self_attn.projection,
            &self.fc1,
            &self.fc2,
        ]
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear<B>> {
        vec![
            &mut self.self_attn.qkv,
            &mut self.self_attn.projection,
            &mut self.fc1,
            &mut self.fc2,
        ]
    }
}

/// `vision_model`: embeddings → layers → `post_layernorm` (applied to every token).
#[derive(Module, Debug)]
pub struct VisionModel<B: Backend> {
    pub embeddings: VisionEmbeddings<B>,
    pub layers: Vec<VisionLayer<B>>,
    pub post_layernorm: LayerNorm<B>,
    #[module(skip)]
    pub image_size: usize,
}

impl<B: DenseBackend> VisionModel<B> {
    pub fn load(cfg: &VisionConfig, vb: &Loader<B>) -> Result<Self> {
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| VisionLayer::load(cfg, &vb.pp(format!("encoder.layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embeddings: VisionEmbeddings::load(cfg, &vb.pp("embeddings"))?,
            layers,
            post_layernorm: vb.layer_norm("post_layernorm", cfg.hidden_size, cfg.layer_norm_eps)?,
            image_size: cfg.image_size,
        })
    }

    /// Pixels [B, 3, H, W] → image embeddings [B, 1 + patches, E] after `post_layernorm`.
    pub fn forward(&self, pixels: Tensor<B, 4>) -> Tensor<B, 3> {
        let mut x = self.embeddings.forward(pixels);
        for layer in &self.layers {
            x = layer.forward(x);
        }
        self.post_layernorm.forward(x)
    }

    /// The square input resolution (`vision_config.image_size`).
    pub fn image_size(&self) -> usize {
        self.image_size
    }

    /// Tokens per image: patches + the class token.
    pub fn num_positions(&self) -> usize {
        self.embeddings.position_embedding.dims()[1]
    }
}
