//! T5 / FlanT5 encoder-decoder (HF `T5ForConditionalGeneration`, keys under `language_model.`):
//! RMS norm without mean or bias, attention without 1/√d scaling, relative position buckets whose
//! table lives in block 0 of each stack and is shared by all blocks, gated or plain FFN with the
//! activation named in the config, and an untied or tied `lm_head`.

use crate::linear::Linear;
use crate::ops::{self, DenseBackend};
use burn::module::Param;
use burn::prelude::*;

use crate::config::{Activation, T5Config};
use crate::error::{ModelError, Result};
use crate::lm::{LanguageModel, LmInput, LmSample, Padding, SpecialTokens, Start, TeacherForced};
use crate::nn::{
    Tap, activate, attention, causal_bias, embed, ids_tensor, key_padding_bias, merge_heads,
    no_tap, rows_index, split_heads,
};
use crate::prunable::{
    BlockOptions, Prunable, StackInfo, Tower, empty_hidden, mismatch, not_ready, stack_name,
};
use crate::sparse_kernels::KernelRows;
use crate::weights::Loader;

/// `T5LayerNorm`: y = w ⊙ x / sqrt(mean(x²) + ε) (no centring, no bias).
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: DenseBackend> RmsNorm<B> {
    pub(crate) fn load(vb: &Loader<B>, name: &str, d: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.param(&format!("{name}.weight"), [d])?,
            eps,
        })
    }
}

impl<B: DenseBackend> RmsNorm<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        ops::rms_norm(x, self.weight.val(), self.eps)
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

impl<B: DenseBackend> T5Attention<B> {
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
        tap: Tap<B>,
    ) -> Tensor<B, 3> {
        let q = split_heads(self.q.forward(x), self.num_heads);
        let ctx = merge_heads(attention(q, k, v, None, bias));
        tap(&[&self.o], &ctx);
        self.o.forward(ctx)
    }

    fn linears(&self) -> [&Linear<B>; 4] {
        [&self.q, &self.k, &self.v, &self.o]
    }

    fn linears_mut(&mut self) -> [&mut Linear<B>; 4] {
        [&mut self.q, &mut self.k, &mut self.v, &mut self.o]
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

impl<B: DenseBackend> T5Ffn<B> {
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

    pub fn forward(&self, x: Tensor<B, 3>, tap: Tap<B>) -> Tensor<B, 3> {
        match &self.wi_1 {
            Some(wi_1) => tap(&[&self.wi_0, wi_1], &x),
            None => tap(&[&self.wi_0], &x),
        }
        let mut h = activate(self.wi_0.forward(x.clone()), self.act);
        if let Some(wi_1) = &self.wi_1 {
            h = h * wi_1.forward(x);
        }
        tap(&[&self.wo], &h);
        self.wo.forward(h)
    }

    fn linears(&self) -> Vec<&Linear<B>> {
        let mut out = vec![&self.wi_0];
        out.extend(&self.wi_1);
        out.push(&self.wo);
        out
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear<B>> {
        let mut out = vec![&mut self.wi_0];
        out.extend(&mut self.wi_1);
        out.push(&mut self.wo);
        out
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

impl<B: DenseBackend> DecoderCache<B> {
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

impl<B: DenseBackend> T5Block<B> {
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
        let sa = &self.self_attention;
        tap(&[&sa.q, &sa.k, &sa.v], &h);
        let (mut k, mut v) = sa.key_values(h.clone());
        let mut cache = cache;
        if let Some(c) = cache.as_deref_mut() {
            if let Some((pk, pv)) = c.self_kv.take() {
                k = Tensor::cat(vec![pk, k], 2);
                v = Tensor::cat(vec![pv, v], 2);
            }
            c.self_kv = Some((k.clone(), v.clone()));
        }
        let mut x = x + sa.attend(h, k, v, self_bias, tap);
        if let (Some(attn), Some(norm), Some((enc, enc_bias))) =
            (&self.cross_attention, &self.cross_norm, cross)
        {
            let h = norm.forward(x.clone());
            tap(&[&attn.q], &h);
            tap(&[&attn.k, &attn.v], enc);
            let (k, v) = match cache {
                Some(c) => c
                    .cross_kv
                    .get_or_insert_with(|| attn.key_values(enc.clone()))
                    .clone(),
                None => attn.key_values(enc.clone()),
            };
            x = x + attn.attend(h, k, v, Some(enc_bias.clone()), tap);
        }
        let h = self.ffn_norm.forward(x.clone());
        x + self.ffn.forward(h, tap)
    }

    /// Prunable linears: self-attention q/k/v/o, (decoder) cross-attention q/k/v/o, the FFN.
    pub fn linears(&self) -> Vec<&Linear<B>> {
        let mut out: Vec<&Linear<B>> = self.self_attention.linears().into();
        if let Some(c) = &self.cross_attention {
            out.extend(c.linears());
        }
        out.extend(self.ffn.linears());
        out
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear<B>> {
        let mut out: Vec<&mut Linear<B>> = self.self_attention.linears_mut().into();
        if let Some(c) = &mut self.cross_attention {
            out.extend(c.linears_mut());
        }
        out.extend(self.ffn.linears_mut());
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

impl<B: DenseBackend> T5Stack<B> {
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
}

/// `T5ForConditionalGeneration`.
///
/// Embeddings as `transformers` reads the files: the prompt is embedded with `shared` (what
/// the composites' `get_input_embeddings()` returns) and the decoder with
/// `decoder.embed_tokens` when the checkpoint stores it (transformers 5.x writes it apart,
/// and uses it as stored when it differs from `shared`), else with `shared`. An untied
/// `lm_head` must be present; a tied one falls back to `shared`.
#[derive(Module, Debug)]
pub struct T5<B: Backend> {
    pub shared: Param<Tensor<B, 2>>,
    /// `decoder.embed_tokens` when stored.
    pub decoder_embed_tokens: Option<Param<Tensor<B, 2>>>,
    pub encoder: T5Stack<B>,
    pub decoder: T5Stack<B>,
    /// `lm_head` [d_model, vocab] in burn layout; `None` when tied to `shared`.
    pub lm_head: Option<Linear<B>>,
    pub scale_decoder_output: bool,
    pub d_model: usize,
    #[module(skip)]
    pub tokens: SpecialTokens,
}

impl<B: DenseBackend> T5<B> {
    /// The decoder's token embeddings.
    fn decoder_table(&self) -> Tensor<B, 2> {
        match &self.decoder_embed_tokens {
            Some(t) => t.val(),
            None => self.shared.val(),
        }
    }

    /// Decoder token embeddings [B, L, D].
    pub fn embed_decoder(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        embed(self.decoder_table(), ids)
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
            None => ops::linear(hidden, self.shared.val().transpose(), None),
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
        let x = self.embed_decoder(decoder_ids);
        self.lm_logits(self.decoder.decode(x, encoder, encoder_mask, cache))
    }

    /// Teacher forcing: decoder input `[start] + target[..-1]`, padded (as HF shifts labels).
    fn decoder_rows(&self, targets: &[Vec<u32>]) -> Vec<Vec<u32>> {
        let t = targets.iter().map(Vec::len).max().unwrap_or(0).max(1);
        targets
            .iter()
            .map(|target| {
                let mut row = vec![self.tokens.pad; t];
                row[0] = self.tokens.decoder_start;
                let n = target.len().saturating_sub(1);
                row[1..=n].copy_from_slice(&target[..n]);
                row
            })
            .collect()
    }
}

/// T5's decoding state: the encoder output (rows expanded) and the decoder's KV cache.
pub struct T5Decoding<B: Backend> {
    encoder: Tensor<B, 3>,
    mask: Tensor<B, 2>,
    cache: DecoderCache<B>,
}

impl<B: DenseBackend> LanguageModel<B> for T5<B> {
    type Config = T5Config;
    type Decoding = T5Decoding<B>;

    fn load(cfg: &T5Config, vb: &Loader<B>) -> Result<Self> {
        let (v, d) = (cfg.vocab_size, cfg.d_model);
        let tied = cfg.tie_word_embeddings != Some(false);
        let has = |name: &str| vb.contains_or(name, false);
        // Tied exports may keep only one of the copies.
        let shared_key = if vb.contains_or("shared.weight", true) || !tied {
            "shared.weight"
        } else if has("encoder.embed_tokens.weight") {
            "encoder.embed_tokens.weight"
        } else {
            "decoder.embed_tokens.weight"
        };
        let shared = vb.param(shared_key, [v, d])?;
        let decoder_embed_tokens = if has("decoder.embed_tokens.weight")
            && shared_key != "decoder.embed_tokens.weight"
        {
            Some(vb.param("decoder.embed_tokens.weight", [v, d])?)
        } else {
            if !tied && vb.store().is_some() {
                tracing::warn!(
                    "{}: untied T5 without `decoder.embed_tokens.weight`: the decoder embeds with `shared`",
                    vb.key("")
                );
            }
            None
        };
        let lm_head = if !tied || vb.contains_or("lm_head.weight", false) {
            Some(vb.linear("lm_head", d, v, false)?)
        } else {
            None
        };
        Ok(Self {
            shared,
            decoder_embed_tokens,
            encoder: T5Stack::load(cfg, false, &vb.pp("encoder"))?,
            decoder: T5Stack::load(cfg, true, &vb.pp("decoder"))?,
            lm_head,
            scale_decoder_output: cfg.scales_decoder_output(),
            d_model: d,
            tokens: SpecialTokens {
                decoder_start: cfg.decoder_start_token(),
                eos: cfg.eos_token(),
                pad: cfg.pad_token(),
            },
        })
    }

    fn hidden_size(&self) -> usize {
        self.d_model
    }

    fn vocab_size(&self) -> usize {
        self.shared.dims()[0]
    }

    fn special_tokens(&self) -> SpecialTokens {
        self.tokens
    }

    fn padding(&self) -> Padding {
        Padding::Right
    }

    fn is_encoder_decoder(&self) -> bool {
        true
    }

    fn context_window(&self) -> Option<usize> {
        None
    }

    fn embed(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        embed(self.shared.val(), ids)
    }

    fn target_ids(&self, tokenized: &[u32]) -> Vec<u32> {
        tokenized.to_vec()
    }

    fn teacher_forced(&self, input: LmInput<B>, targets: &[Vec<u32>]) -> Result<TeacherForced<B>> {
        let device = input.embeds.device();
        let dec = ids_tensor::<B>(&self.decoder_rows(targets), &device);
        let encoder = self.encoder.encode(input.embeds, input.mask.clone());
        let logits = self.decode_logits(dec, &encoder, input.mask, None);
        let (targets, mask, tokens) = aligned_targets(targets, &device);
        Ok(TeacherForced {
            logits,
            targets,
            mask,
            tokens,
        })
    }

    fn logits(
        &self,
        input: LmInput<B>,
        continuation: Option<Tensor<B, 2, Int>>,
    ) -> Result<Tensor<B, 3>> {
        let dec = continuation.ok_or_else(|| {
            ModelError::Input("a T5 language model needs decoder_input_ids".into())
        })?;
        let encoder = self.encoder.encode(input.embeds, input.mask.clone());
        Ok(self.decode_logits(dec, &encoder, input.mask, None))
    }

    fn start(&self, input: LmInput<B>, expand: usize) -> Result<Start<T5Decoding<B>>> {
        let encoder = self.encoder.encode(input.embeds, input.mask.clone());
        let batch = encoder.dims()[0];
        let rows = rows_index::<B>(batch, expand, &encoder.device());
        Ok(Start {
            state: T5Decoding {
                encoder: encoder.select(0, rows.clone()),
                mask: input.mask.select(0, rows),
                cache: DecoderCache::new(self.decoder.blocks.len()),
            },
            rows: vec![vec![self.tokens.decoder_start]; batch * expand],
            input_len: 1,
        })
    }

    fn step(&self, state: &mut T5Decoding<B>, last: &[u32]) -> Tensor<B, 2> {
        let device = state.encoder.device();
        let ids: Vec<Vec<u32>> = last.iter().map(|&t| vec![t]).collect();
        let logits = self.decode_logits(
            ids_tensor::<B>(&ids, &device),
            &state.encoder,
            state.mask.clone(),
            Some(&mut state.cache),
        );
        let [rows, _, vocab] = logits.dims();
        logits.reshape([rows, vocab])
    }

    fn reorder(&self, state: &mut T5Decoding<B>, rows: &[usize]) {
        // Beams of one item share the encoder output; only the cache differs.
        state
            .cache
            .select_rows(crate::nn::index_tensor(rows, &state.encoder.device()));
    }

    fn kernel_rows(&self, stack: T5StackId, rows: &KernelRows, image_tokens: usize) -> usize {
        match stack {
            T5StackId::Encoder => rows.images * (image_tokens + rows.prompt),
            T5StackId::Decoder => rows.decode,
        }
    }
}

/// Targets right-padded to the longest, with their 1/0 mask and token count.
pub(crate) fn aligned_targets<B: Backend>(
    targets: &[Vec<u32>],
    device: &B::Device,
) -> (Tensor<B, 2, Int>, Tensor<B, 2>, usize) {
    let t = targets.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let n = targets.len();
    let mut ids = vec![vec![0u32; t]; n];
    let mut mask = vec![0f32; n * t];
    for (r, target) in targets.iter().enumerate() {
        ids[r][..target.len()].copy_from_slice(target);
        mask[r * t..r * t + target.len()].fill(1.0);
    }
    let tokens = targets.iter().map(Vec::len).sum();
    (
        ids_tensor::<B>(&ids, device),
        Tensor::from_data(TensorData::new(mask, [n, t]), device),
        tokens,
    )
}

/// T5's two stacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum T5StackId {
    Encoder,
    Decoder,
}

/// A T5 block's calibration input: hidden state, self-attention bias with and without the
/// relative position bias, and (decoder) the encoder output with its key-padding bias.
#[derive(Debug, Clone)]
pub struct T5BlockInput<B: Backend> {
    pub x: Tensor<B, 3>,
    pub bias: Tensor<B, 4>,
    pub mask_bias: Tensor<B, 4>,
    pub cross: Option<(Tensor<B, 3>, Tensor<B, 4>)>,
}

/// A sample's T5 calibration state.
#[derive(Debug, Clone)]
pub struct T5Calibration<B: Backend> {
    embeds: Tensor<B, 3>,
    mask: Tensor<B, 2>,
    decoder_ids: Tensor<B, 2, Int>,
    encoder: Option<Tensor<B, 3>>,
}

impl<B: DenseBackend> Prunable<B> for T5<B> {
    type Sample = LmSample<B>;
    type Stack = T5StackId;
    type BlockInput = T5BlockInput<B>;
    type Context = T5Calibration<B>;

    fn stacks(&self) -> Vec<StackInfo<T5StackId>> {
        let prefix =
            |s: &T5Stack<B>| stack_name(s.blocks.first().map(|b| &*b.self_attention.q.key));
        vec![
            StackInfo {
                id: T5StackId::Encoder,
                tower: Tower::Language,
                name: prefix(&self.encoder),
                blocks: self.encoder.blocks.len(),
            },
            StackInfo {
                id: T5StackId::Decoder,
                tower: Tower::Language,
                name: prefix(&self.decoder),
                blocks: self.decoder.blocks.len(),
            },
        ]
    }

    fn context(&self, sample: &LmSample<B>) -> Result<T5Calibration<B>> {
        let device = sample.input.embeds.device();
        Ok(T5Calibration {
            embeds: sample.input.embeds.clone(),
            mask: sample.input.mask.clone(),
            decoder_ids: ids_tensor::<B>(&self.decoder_rows(&sample.row_targets()), &device),
            encoder: None,
        })
    }

    fn stack_input(&self, stack: T5StackId, ctx: &T5Calibration<B>) -> Result<T5BlockInput<B>> {
        Ok(match stack {
            T5StackId::Encoder => {
                let l = ctx.embeds.dims()[1];
                let mask_bias = key_padding_bias(ctx.mask.clone());
                T5BlockInput {
                    bias: self.encoder.position_bias(0, l, l) + mask_bias.clone(),
                    mask_bias,
                    x: ctx.embeds.clone(),
                    cross: None,
                }
            }
            T5StackId::Decoder => {
                let encoder = ctx
                    .encoder
                    .clone()
                    .ok_or_else(|| not_ready(stack, "the encoder output"))?;
                let x = self.embed_decoder(ctx.decoder_ids.clone());
                let l = x.dims()[1];
                let mask_bias = causal_bias(l, l, 0, &x.device());
                T5BlockInput {
                    bias: self.decoder.position_bias(0, l, l) + mask_bias.clone(),
                    mask_bias,
                    cross: Some((encoder, key_padding_bias(ctx.mask.clone()))),
                    x,
                }
            }
        })
    }

    fn run_block(
        &self,
        stack: T5StackId,
        block: usize,
        input: &T5BlockInput<B>,
        options: BlockOptions,
        tap: Tap<B>,
    ) -> Result<Tensor<B, 3>> {
        let bias = if block == 0 || options.t5_position_bias_after_block0 {
            input.bias.clone()
        } else {
            input.mask_bias.clone()
        };
        let (blocks, cross) = match (stack, &input.cross) {
            (T5StackId::Encoder, None) => (&self.encoder.blocks, None),
            (T5StackId::Decoder, Some((e, b))) => (&self.decoder.blocks, Some((e, b))),
            _ => return Err(mismatch(stack)),
        };
        let b = blocks
            .get(block)
            .ok_or_else(|| ModelError::Input(format!("{stack:?} has no block {block}")))?;
        Ok(b.forward(input.x.clone(), Some(bias), cross, None, tap))
    }

    fn with_hidden(&self, mut input: T5BlockInput<B>, hidden: Tensor<B, 3>) -> T5BlockInput<B> {
        input.x = hidden;
        input
    }

    fn end_stack(
        &self,
        stack: T5StackId,
        hidden: Tensor<B, 3>,
        ctx: &mut T5Calibration<B>,
        options: BlockOptions,
    ) -> Result<()> {
        let _ = options;
        if stack == T5StackId::Encoder {
            // Under the reference's bias mode `hidden` comes from the output pass
            // (`output_options`): the decoder reads a real encoder forward (the reference's
            // catcher runs the whole model), not the bias-less calibration pass.
            ctx.encoder = Some(self.encoder.final_layer_norm.forward(hidden));
        }
        Ok(())
    }

    /// The encoder's output under the reference's bias mode is a real forward, with the
    /// position bias in every block.
    fn output_options(&self, stack: T5StackId, options: BlockOptions) -> Option<BlockOptions> {
        (stack == T5StackId::Encoder && !options.t5_position_bias_after_block0).then_some(
            BlockOptions {
                t5_position_bias_after_block0: true,
            },
        )
    }

    fn split_hidden(
        &self,
        mut input: T5BlockInput<B>,
    ) -> std::result::Result<(T5BlockInput<B>, Tensor<B, 3>), T5BlockInput<B>> {
        let hidden = std::mem::replace(&mut input.x, empty_hidden(&input.bias.device()));
        Ok((input, hidden))
    }

    fn join_hidden(&self, mut frame: T5BlockInput<B>, hidden: Tensor<B, 3>) -> T5BlockInput<B> {
        frame.x = hidden;
        frame
    }

    fn idle_linears(&self) -> Vec<&Linear<B>> {
        self.lm_head.iter().collect()
    }

    fn block_linears(&self, stack: T5StackId, block: usize) -> Vec<&Linear<B>> {
        let blocks = match stack {
            T5StackId::Encoder => &self.encoder.blocks,
            T5StackId::Decoder => &self.decoder.blocks,
        };
        blocks.get(block).map(|b| b.linears()).unwrap_or_default()
    }

    fn block_linears_mut(&mut self, stack: T5StackId, block: usize) -> Vec<&mut Linear<B>> {
        let blocks = match stack {
            T5StackId::Encoder => &mut self.encoder.blocks,
            T5StackId::Decoder => &mut self.decoder.blocks,
        };
        blocks
            .get_mut(block)
            .map(|b| b.linears_mut())
            .unwrap_or_default()
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
