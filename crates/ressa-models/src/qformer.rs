//! The Q-Former (HF `InstructBlipQFormerModel` / `Blip2QFormerModel`, keys under `qformer.`):
//! a BERT with post-LN layers, learned query tokens in front of the (optional) instruction text,
//! cross-attention to the image every `cross_attention_frequency` layers (query positions only),
//! and a separate FFN (`intermediate_query`/`output_query`) for the query positions.

use crate::nn::LayerNorm;
use crate::ops::DenseBackend;
use burn::module::Param;

use crate::linear::Linear;
use burn::prelude::*;

use crate::config::{Activation, QFormerConfig};
use crate::error::Result;
use crate::nn::{
    Tap, activate, attention, embed, key_padding_bias, merge_heads, no_tap, split_heads,
};
use crate::weights::Loader;

/// `{attention,crossattention}.attention.{query,key,value}` + `.output.{dense,LayerNorm}`.
#[derive(Module, Debug)]
pub struct QFormerAttention<B: Backend> {
    pub query: Linear<B>,
    pub key: Linear<B>,
    pub value: Linear<B>,
    pub dense: Linear<B>,
    pub layer_norm: LayerNorm<B>,
    pub num_heads: usize,
}

impl<B: DenseBackend> QFormerAttention<B> {
    fn load(cfg: &QFormerConfig, kv_dim: usize, vb: &Loader<B>) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            query: vb.linear("attention.query", d, d, true)?,
            key: vb.linear("attention.key", kv_dim, d, true)?,
            value: vb.linear("attention.value", kv_dim, d, true)?,
            dense: vb.linear("output.dense", d, d, true)?,
            layer_norm: vb.layer_norm("output.LayerNorm", d, cfg.layer_norm_eps)?,
            num_heads: cfg.num_attention_heads,
        })
    }

    /// LN(x + dense(attn(x, kv))); `kv` is `None` for self-attention.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        kv: Option<Tensor<B, 3>>,
        bias: Option<Tensor<B, 4>>,
        tap: Tap<B>,
    ) -> Tensor<B, 3> {
        let h = self.num_heads;
        let dh = x.dims()[2] / h;
        let kv = match kv {
            Some(kv) => {
                tap(&[&self.query], &x);
                tap(&[&self.key, &self.value], &kv);
                kv
            }
            None => {
                tap(&[&self.query, &self.key, &self.value], &x);
                x.clone()
            }
        };
        let q = split_heads(self.query.forward(x.clone()), h);
        let k = split_heads(self.key.forward(kv.clone()), h);
        let v = split_heads(self.value.forward(kv), h);
        let ctx = merge_heads(attention(q, k, v, Some((dh as f64).powf(-0.5)), bias));
        tap(&[&self.dense], &ctx);
        self.layer_norm.forward(self.dense.forward(ctx) + x)
    }

    fn linears(&self) -> [&Linear<B>; 4] {
        [&self.query, &self.key, &self.value, &self.dense]
    }

    fn linears_mut(&mut self) -> [&mut Linear<B>; 4] {
        [
            &mut self.query,
            &mut self.key,
            &mut self.value,
            &mut self.dense,
        ]
    }
}

/// `intermediate[_query].dense` + `output[_query].{dense,LayerNorm}`: LN(x + out(act(in(x)))).
#[derive(Module, Debug)]
pub struct QFormerFfn<B: Backend> {
    pub intermediate: Linear<B>,
    pub output: Linear<B>,
    pub layer_norm: LayerNorm<B>,
    #[module(skip)]
    pub act: Activation,
}

impl<B: DenseBackend> QFormerFfn<B> {
    fn load(cfg: &QFormerConfig, suffix: &str, vb: &Loader<B>) -> Result<Self> {
        let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            intermediate: vb.linear(&format!("intermediate{suffix}.dense"), d, f, true)?,
            output: vb.linear(&format!("output{suffix}.dense"), f, d, true)?,
            layer_norm: vb.layer_norm(
                &format!("output{suffix}.LayerNorm"),
                d,
                cfg.layer_norm_eps,
            )?,
            act: Activation::from_hf(&cfg.hidden_act).expect("validated"),
        })
    }

    pub fn forward(&self, x: Tensor<B, 3>, tap: Tap<B>) -> Tensor<B, 3> {
        tap(&[&self.intermediate], &x);
        let h = activate(self.intermediate.forward(x.clone()), self.act);
        tap(&[&self.output], &h);
        self.layer_norm.forward(self.output.forward(h) + x)
    }
}

/// `encoder.layer.N`.
#[derive(Module, Debug)]
pub struct QFormerLayer<B: Backend> {
    pub attention: QFormerAttention<B>,
    pub crossattention: Option<QFormerAttention<B>>,
    /// FFN of the text positions (absent in BLIP-2 checkpoints without text input).
    pub ffn_text: Option<QFormerFfn<B>>,
    pub ffn_query: QFormerFfn<B>,
}

impl<B: DenseBackend> QFormerLayer<B> {
    fn load(cfg: &QFormerConfig, index: usize, reads_text: bool, vb: &Loader<B>) -> Result<Self> {
        let crossattention = if index.is_multiple_of(cfg.cross_attention_frequency) {
            Some(QFormerAttention::load(
                cfg,
                cfg.encoder_hidden_size,
                &vb.pp("crossattention"),
            )?)
        } else {
            None
        };
        let ffn_text = if vb.contains_or("intermediate.dense.weight", reads_text) {
            Some(QFormerFfn::load(cfg, "", vb)?)
        } else {
            None
        };
        Ok(Self {
            attention: QFormerAttention::load(cfg, cfg.hidden_size, &vb.pp("attention"))?,
            crossattention,
            ffn_text,
            ffn_query: QFormerFfn::load(cfg, "_query", vb)?,
        })
    }

    /// `x` [B, Q + T, D] with the Q query positions first; `image` [B, N, E].
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        self_bias: Option<Tensor<B, 4>>,
        image: Tensor<B, 3>,
        num_queries: usize,
        tap: Tap<B>,
    ) -> Tensor<B, 3> {
        let [b, l, d] = x.dims();
        let att = self.attention.forward(x, None, self_bias, tap);
        let mut queries = att.clone().slice([0..b, 0..num_queries, 0..d]);
        if let Some(cross) = &self.crossattention {
            queries = cross.forward(queries, Some(image), None, tap);
        }
        let queries = self.ffn_query.forward(queries, tap);
        if l == num_queries {
            return queries;
        }
        let text = att.slice([0..b, num_queries..l, 0..d]);
        let ffn = self
            .ffn_text
            .as_ref()
            .expect("text input needs the text FFN (checked at load)");
        Tensor::cat(vec![queries, ffn.forward(text, tap)], 1)
    }

    /// Prunable linears: self- and cross-attention query/key/value/output.dense, the text and
    /// query FFNs.
    pub fn linears(&self) -> Vec<&Linear<B>> {
        let mut out: Vec<&Linear<B>> = self.attention.linears().into();
        if let Some(c) = &self.crossattention {
            out.extend(c.linears());
        }
        if let Some(f) = &self.ffn_text {
            out.extend([&f.intermediate, &f.output]);
        }
        out.extend([&self.ffn_query.intermediate, &self.ffn_query.output]);
        out
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear<B>> {
        let mut out: Vec<&mut Linear<B>> = self.attention.linears_mut().into();
        if let Some(c) = &mut self.crossattention {
            out.extend(c.linears_mut());
        }
        if let Some(f) = &mut self.ffn_text {
            out.extend([&mut f.intermediate, &mut f.output]);
        }
        out.extend([&mut self.ffn_query.intermediate, &mut self.ffn_query.output]);
        out
    }
}

/// Text embeddings of the InstructBLIP Q-Former: word + absolute position (text positions start
/// at 0; the queries get none), then LayerNorm over queries and text together.
#[derive(Module, Debug)]
pub struct QFormerTextEmbeddings<B: Backend> {
    pub word_embeddings: Param<Tensor<B, 2>>,
    pub position_embeddings: Param<Tensor<B, 2>>,
}

/// `qformer`.
#[derive(Module, Debug)]
pub struct QFormer<B: Backend> {
    /// `embeddings.{word,position}_embeddings` (InstructBLIP only).
    pub text_embeddings: Option<QFormerTextEmbeddings<B>>,
    /// `embeddings.layernorm` (InstructBLIP) or `layernorm` (BLIP-2).
    pub layernorm: LayerNorm<B>,
    pub layers: Vec<QFormerLayer<B>>,
    pub blip2_layout: bool,
}

impl<B: DenseBackend> QFormer<B> {
    pub fn load(cfg: &QFormerConfig, reads_text: bool, vb: &Loader<B>) -> Result<Self> {
        let d = cfg.hidden_size;
        // A text-reading Q-Former with neither layer norm is reported as InstructBLIP's
        // missing `embeddings.layernorm`, not BLIP-2's.
        let embeddings_norm = vb.contains_or("embeddings.layernorm.weight", reads_text);
        let top_norm = vb.contains_or("layernorm.weight", false);
        let blip2_layout = !embeddings_norm && (!reads_text || top_norm);
        let (text_embeddings, layernorm) = if blip2_layout {
            (None, vb.layer_norm("layernorm", d, cfg.layer_norm_eps)?)
        } else {
            let e = vb.pp("embeddings");
            (
                Some(QFormerTextEmbeddings {
                    word_embeddings: e.param("word_embeddings.weight", [cfg.vocab_size, d])?,
                    position_embeddings: e.param(
                        "position_embeddings.weight",
                        [cfg.max_position_embeddings, d],
                    )?,
                }),
                e.layer_norm("layernorm", d, cfg.layer_norm_eps)?,
            )
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                QFormerLayer::load(
                    cfg,
                    i,
                    reads_text && !blip2_layout,
                    &vb.pp(format!("encoder.layer.{i}")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            text_embeddings,
            layernorm,
            layers,
            blip2_layout,
        })
    }

    pub fn reads_text(&self) -> bool {
        self.text_embeddings.is_some()
    }

    /// `queries` [B, Q, D]; `text` = (ids [B, T], mask [B, T] of 1/0) for InstructBLIP;
    /// `image` [B, N, E]. Returns the last hidden state [B, Q + T, D].
    pub fn forward(
        &self,
        queries: Tensor<B, 3>,
        text: Option<(Tensor<B, 2, Int>, Tensor<B, 2>)>,
        image: Tensor<B, 3>,
    ) -> Tensor<B, 3> {
        let q = queries.dims()[1];
        let (mut x, bias) = self.embed(queries, text);
        for layer in &self.layers {
            x = layer.forward(x, bias.clone(), image.clone(), q, &mut no_tap);
        }
        x
    }

    /// The layers' input: [queries ; text embeddings] after LayerNorm, and the key-padding
    /// bias of the self-attention (`None` without text).
    pub fn embed(
        &self,
        queries: Tensor<B, 3>,
        text: Option<(Tensor<B, 2, Int>, Tensor<B, 2>)>,
    ) -> (Tensor<B, 3>, Option<Tensor<B, 4>>) {
        let [b, q, _] = queries.dims();
        let (x, bias) = match (text, &self.text_embeddings) {
            (Some((ids, mask)), Some(emb)) => {
                let t = ids.dims()[1];
                let d = queries.dims()[2];
                let words = embed(emb.word_embeddings.val(), ids);
                let pos = emb
                    .position_embeddings
                    .val()
                    .slice([0..t, 0..d])
                    .unsqueeze::<3>();
                let x = Tensor::cat(vec![queries, words + pos], 1);
                let device = x.device();
                let full_mask = Tensor::cat(vec![Tensor::ones([b, q], &device), mask], 1);
                (x, Some(key_padding_bias(full_mask)))
            }
            _ => (queries, None),
        };
        (self.layernorm.forward(x), bias)
    }
}
