//! T5 / FlanT5 encoder-decoder (HF `T5ForConditionalGeneration`, keys under `language_model.`):
//! RMS norm without mean or bias, attention without 1/√d scaling, relative position buckets whose
//! table lives in block 0 of each stack and is shared by all blocks, gated or plain FFN with the
//! activation named in the config, and an untied or tied `lm_head`.

use crate::linear::Linear;
use burn::module::Param;
use burn::prelude::*;

use crate::config::{Activation, T5Config};
use crate::error::Result;
use crate::nn::{
    Tap, activate, attention, causal_bias, embed, key_padding_bias, merge_heads, no_tap,
    split_heads,
};
use crate::weights::{ExportTensor, Exporter, Loader};

/// `T5LayerNorm`: y = w ⊙ x / sqrt(mean(x²) + ε) (no centring, no bias).
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    pub(crate) fn load(vb: &Loader<B>, name: &str, d: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.param(&format!("{name}.weight"), [d])?,
            eps,
        })
    }

    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let var = x.clone().powi_scalar(2).mean_dim(2);
        x.div(var.add_scalar(self.eps).sqrt()) * self.weight.val().unsqueeze()
    }
}

/// Relative position → bucket, exactly as HF `T5Attention._relative_position_bucket`
/// (float32 logarithm, truncation toward zero).
pub fn relative_position_bucket(
    relative: i64,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> usize {
    let mut nb = num_buckets as i64;
    let mut bucket = 0i64;
    let n = if bidirectional {
        nb /= 2;
        if relative > 0 {
            bucket += nb;
        }
        relative.abs()
    } else {
        (-relative).max(0)
    };
    let max_exact = nb / 2;
    if n < max_exact {
        bucket += n;
    } else {
        let ratio = (n as f32 / max_exact as f32).ln();
        let denom = (max_distance as f64 / max_exact as f64).ln() as f32;
        let large = max_exact + (ratio / denom * (nb - max_exact) as f32) as i64;
        bucket += large.min(nb - 1);
    }
    bucket as usize
}

/// `layer.N.{SelfAttention,EncDecAttention}.{q,k,v,o}` (+ `relative_attention_bias` in block 0).
#[derive(Module, Debug)]
pub struct T5Attention<B: Backend> {
    pub q: Linear<B>,
    pub k: Linear<B>,
    pub v: Linear<B>,
    pub o: Linear<B>,
    /// [num_buckets, heads]; only block 0's self-attention has one.
    pub relative_attention_bias: Option<Param<Tensor<B, 2>>>,
    pub num_heads: usize,
}

impl<B: Backend> T5Attention<B> {
    fn load(cfg: &T5Config, with_bias_table: bool, vb: &Loader<B>) -> Result<Self> {
        let (d, inner) = (cfg.d_model, cfg.num_heads * cfg.d_kv);
        let relative_attention_bias = if with_bias_table {
            Some(vb.param(
                "relative_attention_bias.weight",
                [cfg.relative_attention_num_buckets, cfg.num_heads],
            )?)
        } else {
            None
        };
        Ok(Self {
            q: vb.linear("q", d, inner, false)?,
            k: vb.linear("k", d, inner, false)?,
            v: vb.linear("v", d, inner, false)?,
            o: vb.linear("o", inner, d, false)?,
            relative_attention_bias,
            num_heads: cfg.num_heads,
        })
    }

    /// Keys and values [B, H, L, dk] of `source`.
    pub fn key_values(&self, source: Tensor<B, 3>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        (
            split_heads(self.k.forward(source.clone()), self.num_heads),
            split_heads(self.v.forward(source), self.num_heads),
        )
    }

    /// o(softmax(q·kᵀ + bias)·v): T5 does not scale by 1/√d.
    pub fn attend(
        &self,
        x: Tensor<B, 3>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        bias: Option<Tensor<B, 4>>,
        o_name: &str,
        tap: Tap<B>,
    ) -> Tensor<B, 3> {
        let q = split_heads(self.q.forward(x), self.num_heads);
        let ctx = merge_heads(attention(q, k, v, None, bias));
        tap(&[o_name], &ctx);
        self.o.forward(ctx)
    }

    fn export(&self, ex: &mut Exporter<B>) {
        ex.linear("q", &self.q);
        ex.linear("k", &self.k);
        ex.linear("v", &self.v);
        ex.linear("o", &self.o);
        if let Some(t) = &self.relative_attention_bias {
            ex.add("relative_attention_bias.weight", ExportTensor::D2(t.val()));
        }
    }
}

/// `DenseReluDense`: wo(act(wi_0 x) ⊙ wi_1 x) when gated, wo(act(wi x)) otherwise.
#[derive(Module, Debug)]
pub struct T5Ffn<B: Backend> {
    /// `wi_0` (gated) or `wi` (plain).
    pub wi_0: Linear<B>,
    pub wi_1: Option<Linear<B>>,
    pub wo: Linear<B>,
    #[module(skip)]
    pub act: Activation,
}

impl<B: Backend> T5Ffn<B> {
    fn load(cfg: &T5Config, vb: &Loader<B>) -> Result<Self> {
        let (d, f) = (cfg.d_model, cfg.d_ff);
        let act = Activation::from_hf(&cfg.activation_name()).expect("validated");
        Ok(if cfg.is_gated() {
            Self {
                wi_0: vb.linear("wi_0", d, f, false)?,
                wi_1: Some(vb.linear("wi_1", d, f, false)?),
                wo: vb.linear("wo", f, d, false)?,
                act,
            }
        } else {
            Self {
                wi_0: vb.linear("wi", d, f, false)?,
                wi_1: None,
                wo: vb.linear("wo", f, d, false)?,
                act,
            }
        })
    }

    /// `prefix` is the block-relative name of `DenseReluDense`, for `tap`.
    pub fn forward(&self, x: Tensor<B, 3>, prefix: &str, tap: Tap<B>) -> Tensor<B, 3> {
        match &self.wi_1 {
            Some(_) => tap(&[&format!("{prefix}.wi_0"), &format!("{prefix}.wi_1")], &x),
            None => tap(&[&format!("{prefix}.wi")], &x),
        }
        let mut h = activate(self.wi_0.forward(x.clone()), self.act);
        if let Some(wi_1) = &self.wi_1 {
            h = h * wi_1.forward(x);
        }
        tap(&[&format!("{prefix}.wo")], &h);
        self.wo.forward(h)
    }

    fn export(&self, ex: &mut Exporter<B>) {
        match &self.wi_1 {
            Some(wi_1) => {
                ex.linear("wi_0", &self.wi_0);
                ex.linear("wi_1", wi_1);
            }
            None => ex.linear("wi", &self.wi_0),
        }
        ex.linear("wo", &self.wo);
    }
}

/// Cached keys/values of one decoder block.
#[derive(Debug, Clone)]
pub struct BlockCache<B: Backend> {
    pub self_kv: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
    pub cross_kv: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
}

/// The decoder's KV cache: per block, self-attention keys/values so far and the
/// cross-attention keys/values of the encoder output (computed once).
#[derive(Debug, Clone)]
pub struct DecoderCache<B: Backend> {
    pub blocks: Vec<BlockCache<B>>,
    /// Decoder positions already cached.
    pub len: usize,
}

impl<B: Backend> DecoderCache<B> {
    pub fn new(blocks: usize) -> Self {
        Self {
            blocks: vec![
                BlockCache {
                    self_kv: None,
                    cross_kv: None
                };
                blocks
            ],
            len: 0,
        }
    }

    /// Keeps batch rows `rows` (beam reordering).
    pub fn select_rows(&mut self, rows: Tensor<B, 1, Int>) {
        let pick = |kv: &mut Option<(Tensor<B, 4>, Tensor<B, 4>)>| {
            if let Some((k, v)) = kv.take() {
                *kv = Some((k.select(0, rows.clone()), v.select(0, rows.clone())));
            }
        };
        for b in &mut self.blocks {
            pick(&mut b.self_kv);
            pick(&mut b.cross_kv);
        }
    }
}

/// `block.N`: self-attention, (decoder) cross-attention, FFN, each pre-norm with a residual.
#[derive(Module, Debug)]
pub struct T5Block<B: Backend> {
    pub self_attention: T5Attention<B>,
    pub self_norm: RmsNorm<B>,
    pub cross_attention: Option<T5Attention<B>>,
    pub cross_norm: Option<RmsNorm<B>>,
    pub ffn: T5Ffn<B>,
    pub ffn_norm: RmsNorm<B>,
}

impl<B: Backend> T5Block<B> {
    fn load(cfg: &T5Config, index: usize, decoder: bool, vb: &Loader<B>) -> Result<Self> {
        let (d, eps) = (cfg.d_model, cfg.layer_norm_epsilon);
        let l0 = vb.pp("layer.0");
        let (cross_attention, cross_norm, ff) = if decoder {
            let l1 = vb.pp("layer.1");
            (
                Some(T5Attention::load(cfg, false, &l1.pp("EncDecAttention"))?),
                Some(RmsNorm::load(&l1, "layer_norm", d, eps)?),
                vb.pp("layer.2"),
            )
        } else {
            (None, None, vb.pp("layer.1"))
        };
        Ok(Self {
            self_attention: T5Attention::load(cfg, index == 0, &l0.pp("SelfAttention"))?,
            self_norm: RmsNorm::load(&l0, "layer_norm", d, eps)?,
            cross_attention,
            cross_norm,
            ffn: T5Ffn::load(cfg, &ff.pp("DenseReluDense"))?,
            ffn_norm: RmsNorm::load(&ff, "layer_norm", d, eps)?,
        })
    }

    /// One block. `self_bias`: position bias (+ masks) for self-attention; `cross`: encoder
    /// output and its key-padding bias (decoder only); `cache`: the block's KV cache.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        self_bias: Option<Tensor<B, 4>>,
        cross: Option<(&Tensor<B, 3>, &Tensor<B, 4>)>,
        cache: Option<&mut BlockCache<B>>,
        tap: Tap<B>,
    ) -> Tensor<B, 3> {
        let h = self.self_norm.forward(x.clone());
        tap(
            &[
                "layer.0.SelfAttention.q",
                "layer.0.SelfAttention.k",
                "layer.0.SelfAttention.v",
            ],
            &h,
        );
        let (mut k, mut v) = self.self_attention.key_values(h.clone());
        let mut cache = cache;
        if let Some(c) = cache.as_deref_mut() {
            if let Some((pk, pv)) = c.self_kv.take() {
                k = Tensor::cat(vec![pk, k], 2);
                v = Tensor::cat(vec![pv, v], 2);
            }
            c.self_kv = Some((k.clone(), v.clone()));
        }
        let mut x =
            x + self
                .self_attention
                .attend(h, k, v, self_bias, "layer.0.SelfAttention.o", tap);
        if let (Some(attn), Some(norm), Some((enc, enc_bias))) =
            (&self.cross_attention, &self.cross_norm, cross)
        {
            let h = norm.forward(x.clone());
            tap(&["layer.1.EncDecAttention.q"], &h);
            tap(
                &["layer.1.EncDecAttention.k", "layer.1.EncDecAttention.v"],
                enc,
            );
            let (k, v) = match cache {
                Some(c) => c
                    .cross_kv
                    .get_or_insert_with(|| attn.key_values(enc.clone()))
                    .clone(),
                None => attn.key_values(enc.clone()),
            };
            x = x + attn.attend(
                h,
                k,
                v,
                Some(enc_bias.clone()),
                "layer.1.EncDecAttention.o",
                tap,
            );
        }
        let h = self.ffn_norm.forward(x.clone());
        let ff = if self.cross_attention.is_some() {
            "layer.2"
        } else {
            "layer.1"
        };
        x + self.ffn.forward(h, &format!("{ff}.DenseReluDense"), tap)
    }

    fn export(&self, ex: &mut Exporter<B>) {
        ex.scope("layer.0", |ex| {
            ex.scope("SelfAttention", |ex| self.self_attention.export(ex));
            ex.add(
                "layer_norm.weight",
                ExportTensor::D1(self.self_norm.weight.val()),
            );
        });
        let ff = if let (Some(a), Some(n)) = (&self.cross_attention, &self.cross_norm) {
            ex.scope("layer.1", |ex| {
                ex.scope("EncDecAttention", |ex| a.export(ex));
                ex.add("layer_norm.weight", ExportTensor::D1(n.weight.val()));
            });
            "layer.2"
        } else {
            "layer.1"
        };
        ex.scope(ff, |ex| {
            ex.scope("DenseReluDense", |ex| self.ffn.export(ex));
            ex.add(
                "layer_norm.weight",
                ExportTensor::D1(self.ffn_norm.weight.val()),
            );
        });
    }

    /// Prunable linears with HF names relative to the block.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear<B>)> {
        let mut out: Vec<(String, &mut Linear<B>)> = Vec::new();
        let s = &mut self.self_attention;
        out.push(("layer.0.SelfAttention.q".into(), &mut s.q));
        out.push(("layer.0.SelfAttention.k".into(), &mut s.k));
        out.push(("layer.0.SelfAttention.v".into(), &mut s.v));
        out.push(("layer.0.SelfAttention.o".into(), &mut s.o));
        let ff = if let Some(c) = &mut self.cross_attention {
            out.push(("layer.1.EncDecAttention.q".into(), &mut c.q));
            out.push(("layer.1.EncDecAttention.k".into(), &mut c.k));
            out.push(("layer.1.EncDecAttention.v".into(), &mut c.v));
            out.push(("layer.1.EncDecAttention.o".into(), &mut c.o));
            "layer.2"
        } else {
            "layer.1"
        };
        let f = &mut self.ffn;
        match &mut f.wi_1 {
            Some(wi_1) => {
                out.push((format!("{ff}.DenseReluDense.wi_0"), &mut f.wi_0));
                out.push((format!("{ff}.DenseReluDense.wi_1"), wi_1));
            }
            None => out.push((format!("{ff}.DenseReluDense.wi"), &mut f.wi_0)),
        }
        out.push((format!("{ff}.DenseReluDense.wo"), &mut f.wo));
        out
    }
}

/// `encoder` or `decoder`: blocks + `final_layer_norm`.
#[derive(Module, Debug)]
pub struct T5Stack<B: Backend> {
    pub blocks: Vec<T5Block<B>>,
    pub final_layer_norm: RmsNorm<B>,
    pub is_decoder: bool,
    pub num_buckets: usize,
    pub max_distance: usize,
}

impl<B: Backend> T5Stack<B> {
    fn load(cfg: &T5Config, decoder: bool, vb: &Loader<B>) -> Result<Self> {
        let n = if decoder {
            cfg.decoder_layers()
        } else {
            cfg.num_layers
        };
        let blocks = (0..n)
            .map(|i| T5Block::load(cfg, i, decoder, &vb.pp(format!("block.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            blocks,
            final_layer_norm: RmsNorm::load(
                vb,
                "final_layer_norm",
                cfg.d_model,
                cfg.layer_norm_epsilon,
            )?,
            is_decoder: decoder,
            num_buckets: cfg.relative_attention_num_buckets,
            max_distance: cfg.relative_attention_max_distance,
        })
    }

    /// Block 0's relative position bias [1, H, Lq, Lk] for queries at positions
    /// `q_start..q_start+lq` and keys `0..lk`, shared by every block of the stack.
    pub fn position_bias(&self, q_start: usize, lq: usize, lk: usize) -> Tensor<B, 4> {
        let table = self.blocks[0]
            .self_attention
            .relative_attention_bias
            .as_ref()
            .expect("block 0 holds the relative attention bias")
            .val();
        let heads = table.dims()[1];
        let device = table.device();
        let mut buckets = Vec::with_capacity(lq * lk);
        for i in 0..lq {
            for j in 0..lk {
                let rel = j as i64 - (q_start + i) as i64;
                buckets.push(relative_position_bucket(
                    rel,
                    !self.is_decoder,
                    self.num_buckets,
                    self.max_distance,
                ) as i64);
            }
        }
        let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(buckets, [lq * lk]), &device);
        table
            .select(0, idx)
            .reshape([lq, lk, heads])
            .permute([2, 0, 1])
            .unsqueeze::<4>()
    }

    /// Encoder: embeddings [B, L, D] and key mask [B, L] (1/0) → hidden states after the final norm.
    pub fn encode(&self, x: Tensor<B, 3>, mask: Tensor<B, 2>) -> Tensor<B, 3> {
        let l = x.dims()[1];
        let bias = self.position_bias(0, l, l) + key_padding_bias(mask);
        let mut x = x;
        for block in &self.blocks {
            x = block.forward(x, Some(bias.clone()), None, None, &mut no_tap);
        }
        self.final_layer_norm.forward(x)
    }

    /// Decoder: new embeddings [B, Ld, D] at positions `cache.len..` (0 without a cache),
    /// encoder output [B, Le, D] and its mask [B, Le] → hidden states after the final norm.
    pub fn decode(
        &self,
        x: Tensor<B, 3>,
        encoder: &Tensor<B, 3>,
        encoder_mask: Tensor<B, 2>,
        cache: Option<&mut DecoderCache<B>>,
    ) -> Tensor<B, 3> {
        let lq = x.dims()[1];
        let offset = cache.as_ref().map_or(0, |c| c.len);
        let lk = offset + lq;
        let device = x.device();
        let self_bias = self.position_bias(offset, lq, lk) + causal_bias(lq, lk, offset, &device);
        let cross_bias = key_padding_bias(encoder_mask);
        let mut x = x;
        match cache {
            Some(cache) => {
                for (block, c) in self.blocks.iter().zip(cache.blocks.iter_mut()) {
                    x = block.forward(
                        x,
                        Some(self_bias.clone()),
                        Some((encoder, &cross_bias)),
                        Some(c),
                        &mut no_tap,
                    );
                }
                cache.len += lq;
            }
            None => {
                for block in &self.blocks {
                    x = block.forward(
                        x,
                        Some(self_bias.clone()),
                        Some((encoder, &cross_bias)),
                        None,
                        &mut no_tap,
                    );
                }
            }
        }
        self.final_layer_norm.forward(x)
    }

    fn export(&self, ex: &mut Exporter<B>) {
        for (i, b) in self.blocks.iter().enumerate() {
            ex.scope(format!("block.{i}"), |ex| b.export(ex));
        }
        ex.add(
            "final_layer_norm.weight",
            ExportTensor::D1(self.final_layer_norm.weight.val()),
        );
    }
}

/// `T5ForConditionalGeneration`.
#[derive(Module, Debug)]
pub struct T5<B: Backend> {
    pub shared: Param<Tensor<B, 2>>,
    pub encoder: T5Stack<B>,
    pub decoder: T5Stack<B>,
    /// `lm_head` [d_model, vocab] in burn layout; `None` when tied to `shared`.
    pub lm_head: Option<Linear<B>>,
    pub scale_decoder_output: bool,
    pub d_model: usize,
}

impl<B: Backend> T5<B> {
    pub fn load(cfg: &T5Config, vb: &Loader<B>) -> Result<Self> {
        let (v, d) = (cfg.vocab_size, cfg.d_model);
        let shared = if vb.contains_or("shared.weight", true) {
            vb.param("shared.weight", [v, d])?
        } else {
            // Some exports keep only the (tied) encoder copy.
            vb.param("encoder.embed_tokens.weight", [v, d])?
        };
        let untied = cfg.tie_word_embeddings == Some(false);
        let lm_head = if vb.contains_or("lm_head.weight", untied) {
            Some(vb.linear("lm_head", d, v, false)?)
        } else {
            None
        };
        Ok(Self {
            shared,
            encoder: T5Stack::load(cfg, false, &vb.pp("encoder"))?,
            decoder: T5Stack::load(cfg, true, &vb.pp("decoder"))?,
            lm_head,
            scale_decoder_output: cfg.scales_decoder_output(),
            d_model: d,
        })
    }

    pub fn embed(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        embed(self.shared.val(), ids)
    }

    /// Decoder hidden states → logits [B, L, vocab].
    pub fn lm_logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let hidden = if self.scale_decoder_output {
            hidden.mul_scalar((self.d_model as f64).powf(-0.5))
        } else {
            hidden
        };
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => hidden.matmul(self.shared.val().transpose().unsqueeze()),
        }
    }

    /// Teacher-forced decoder pass → logits [B, Ld, vocab].
    pub fn decode_logits(
        &self,
        decoder_ids: Tensor<B, 2, Int>,
        encoder: &Tensor<B, 3>,
        encoder_mask: Tensor<B, 2>,
        cache: Option<&mut DecoderCache<B>>,
    ) -> Tensor<B, 3> {
        let x = self.embed(decoder_ids);
        self.lm_logits(self.decoder.decode(x, encoder, encoder_mask, cache))
    }

    pub fn export(&self, ex: &mut Exporter<B>) {
        ex.add("shared.weight", ExportTensor::D2(self.shared.val()));
        ex.scope("encoder", |ex| self.encoder.export(ex));
        ex.scope("decoder", |ex| self.decoder.export(ex));
        if let Some(h) = &self.lm_head {
            ex.linear("lm_head", h);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::relative_position_bucket;

    #[test]
    fn buckets_small_distances_are_exact() {
        // Bidirectional, 32 buckets: 16 per direction, 8 exact.
        assert_eq!(relative_position_bucket(0, true, 32, 128), 0);
        assert_eq!(relative_position_bucket(-3, true, 32, 128), 3);
        assert_eq!(relative_position_bucket(3, true, 32, 128), 19);
        // Causal: future positions map to bucket 0.
        assert_eq!(relative_position_bucket(5, false, 32, 128), 0);
        assert_eq!(relative_position_bucket(-5, false, 32, 128), 5);
        assert_eq!(relative_position_bucket(-1000, false, 32, 128), 31);
    }
}
