//! The Q-Former (HF `InstructBlipQFormerModel` / `Blip2QFormerModel`, keys under `qformer.`):
//! a BERT with post-LN layers, learned query tokens in front of the (optional) instruction text,
//! cross-attention to the image every `cross_attention_frequency` layers (query positions only),
//! and a separate FFN (`intermediate_query`/`output_query`) for the query positions.

use burn::module::Param;
use burn::nn::LayerNorm;

use crate::linear::Linear;
use burn::prelude::*;

use crate::config::{Activation, QFormerConfig};
use crate::error::Result;
use crate::nn::{
    Tap, activate, attention, embed, key_padding_bias, merge_heads, no_tap, split_heads,
};
use crate::weights::{ExportTensor, Exporter, Loader};

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

impl<B: Backend> QFormerAttention<B> {
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

    /// LN(x + dense(attn(x, kv))); `kv` is `None` for self-attention. `prefix` names the
    /// module (`attention` / `crossattention`) for `tap`.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        kv: Option<Tensor<B, 3>>,
        bias: Option<Tensor<B, 4>>,
        prefix: &str,
        tap: Tap<B>,
    ) -> Tensor<B, 3> {
        let h = self.num_heads;
        let dh = x.dims()[2] / h;
        let (nq, nk, nv) = (
            format!("{prefix}.attention.query"),
            format!("{prefix}.attention.key"),
            format!("{prefix}.attention.value"),
        );
        let kv = match kv {
            Some(kv) => {
                tap(&[&nq], &x);
                tap(&[&nk, &nv], &kv);
                kv
            }
            None => {
                tap(&[&nq, &nk, &nv], &x);
                x.clone()
            }
        };
        let q = split_heads(self.query.forward(x.clone()), h);
        let k = split_heads(self.key.forward(kv.clone()), h);
        let v = split_heads(self.value.forward(kv), h);
        let ctx = merge_heads(attention(q, k, v, Some((dh as f64).powf(-0.5)), bias));
        tap(&[&format!("{prefix}.output.dense")], &ctx);
        self.layer_norm.forward(self.dense.forward(ctx) + x)
    }

    fn export(&self, ex: &mut Exporter<B>) {
        ex.linear("attention.query", &self.query);
        ex.linear("attention.key", &self.key);
        ex.linear("attention.value", &self.value);
        ex.linear("output.dense", &self.dense);
        ex.layer_norm("output.LayerNorm", &self.layer_norm);
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

impl<B: Backend> QFormerFfn<B> {
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

    /// `suffix` is `""` (text positions) or `"_query"`, for `tap`.
    pub fn forward(&self, x: Tensor<B, 3>, suffix: &str, tap: Tap<B>) -> Tensor<B, 3> {
        tap(&[&format!("intermediate{suffix}.dense")], &x);
        let h = activate(self.intermediate.forward(x.clone()), self.act);
        tap(&[&format!("output{suffix}.dense")], &h);
        self.layer_norm.forward(self.output.forward(h) + x)
    }

    fn export(&self, suffix: &str, ex: &mut Exporter<B>) {
        ex.linear(&format!("intermediate{suffix}.dense"), &self.intermediate);
        ex.linear(&format!("output{suffix}.dense"), &self.output);
        ex.layer_norm(&format!("output{suffix}.LayerNorm"), &self.layer_norm);
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

impl<B: Backend> QFormerLayer<B> {
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
        let att = self.attention.forward(x, None, self_bias, "attention", tap);
        let mut queries = att.clone().slice([0..b, 0..num_queries, 0..d]);
        if let Some(cross) = &self.crossattention {
            queries = cross.forward(queries, Some(image), None, "crossattention", tap);
        }
        let queries = self.ffn_query.forward(queries, "_query", tap);
        if l == num_queries {
            return queries;
        }
        let text = att.slice([0..b, num_queries..l, 0..d]);
        let ffn = self
            .ffn_text
            .as_ref()
            .expect("text input needs the text FFN (checked at load)");
        Tensor::cat(vec![queries, ffn.forward(text, "", tap)], 1)
    }

    fn export(&self, ex: &mut Exporter<B>) {
        ex.scope("attention", |ex| self.attention.export(ex));
        if let Some(c) = &self.crossattention {
            ex.scope("crossattention", |ex| c.export(ex));
        }
        if let Some(f) = &self.ffn_text {
            f.export("", ex);
        }
        self.ffn_query.export("_query", ex);
    }

    /// Prunable linears with HF names relative to the layer.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear<B>)> {
        let mut out: Vec<(String, &mut Linear<B>)> = Vec::new();
        let a = &mut self.attention;
        out.push(("attention.attention.query".into(), &mut a.query));
        out.push(("attention.attention.key".into(), &mut a.key));
        out.push(("attention.attention.value".into(), &mut a.value));
        out.push(("attention.output.dense".into(), &mut a.dense));
        if let Some(c) = &mut self.crossattention {
            out.push(("crossattention.attention.query".into(), &mut c.query));
            out.push(("crossattention.attention.key".into(), &mut c.key));
            out.push(("crossattention.attention.value".into(), &mut c.value));
            out.push(("crossattention.output.dense".into(), &mut c.dense));
        }
        if let Some(f) = &mut self.ffn_text {
            out.push(("intermediate.dense".into(), &mut f.intermediate));
            out.push(("output.dense".into(), &mut f.output));
        }
        out.push((
            "intermediate_query.dense".into(),
            &mut self.ffn_query.intermediate,
        ));
        out.push(("output_query.dense".into(), &mut self.ffn_query.output));
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

impl<B: Backend> QFormer<B> {
    pub fn load(cfg: &QFormerConfig, reads_text: bool, vb: &Loader<B>) -> Result<Self> {
        let d = cfg.hidden_size;
        let blip2_layout = !vb.contains_or("embeddings.layernorm.weight", reads_text);
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

    pub fn export(&self, ex: &mut Exporter<B>) {
        match &self.text_embeddings {
            Some(e) => ex.scope("embeddings", |ex| {
                ex.add(
                    "word_embeddings.weight",
                    ExportTensor::D2(e.word_embeddings.val()),
                );
                ex.add(
                    "position_embeddings.weight",
                    ExportTensor::D2(e.position_embeddings.val()),
                );
                ex.layer_norm("layernorm", &self.layernorm);
            }),
            None => ex.layer_norm("layernorm", &self.layernorm),
        }
        for (i, layer) in self.layers.iter().enumerate() {
            ex.scope(format!("encoder.layer.{i}"), |ex| layer.export(ex));
        }
    }
}
