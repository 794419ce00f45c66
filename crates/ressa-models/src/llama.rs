//! LLaMA decoder-only language model (HF `LlamaForCausalLM`, keys under `language_model.`):
//! RMS norm, rotary position embeddings (HF `rotate_half` convention, the config's theta),
//! SwiGLU MLP, grouped-query attention when the config has fewer key/value heads, causal and
//! padding masks, and a KV cache.

use crate::linear::Linear;
use crate::ops::{self, DenseBackend};
use burn::module::Param;
use burn::prelude::*;

use crate::config::{Activation, LlamaConfig};
use crate::error::{ModelError, Result};
use crate::lm::{LanguageModel, LmInput, LmSample, Padding, SpecialTokens, Start, TeacherForced};
use crate::nn::{
    Tap, activate, attention, causal_bias, embed, ids_tensor, index_tensor, key_padding_bias,
    merge_heads, no_tap, rows_index, split_heads,
};
use crate::prunable::{
    BlockOptions, Prunable, StackInfo, Tower, empty_hidden, mismatch, stack_name,
};
use crate::sparse_kernels::KernelRows;
use crate::t5::{RmsNorm, aligned_targets};
use crate::weights::Loader;

/// Rotary tables for one batch: cos and sin [B, L, H·head_dim] for each head count asked for
/// (`cat(freqs, freqs)` per head), laid out as a projection's output so `apply` multiplies
/// contiguous tensors of one shape (broadcasting [B, 1, L, dh] over heads went through Flex's
/// strided path and was most of a layer's time).
#[derive(Debug, Clone)]
pub struct Rope<B: Backend> {
    tables: Vec<(usize, Tensor<B, 3>, Tensor<B, 3>)>,
    /// One head's cos and sin (B·L rows of dh), kept for head counts not built ahead.
    one: (Vec<f32>, Vec<f32>),
    /// [B, L, dh].
    dims: [usize; 3],
}

impl<B: DenseBackend> Rope<B> {
    /// Tables for `positions` [B][L] and each of `heads`, as HF `LlamaRotaryEmbedding` computes
    /// them in f32: inv_freq_i = 1 / theta^(2i / dim), angle = position · inv_freq.
    pub fn new(
        positions: &[Vec<usize>],
        head_dim: usize,
        theta: f64,
        heads: &[usize],
        device: &B::Device,
    ) -> Self {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let b = positions.len();
        let l = positions.first().map_or(0, |p| p.len());
        // One head's [B·L, dh] rows.
        let mut cos = Vec::with_capacity(b * l * head_dim);
        let mut sin = Vec::with_capacity(b * l * head_dim);
        for row in positions {
            for &p in row {
                let angles: Vec<f32> = inv_freq.iter().map(|f| p as f32 * f).collect();
                for _ in 0..2 {
                    cos.extend(angles.iter().map(|a| a.cos()));
                    sin.extend(angles.iter().map(|a| a.sin()));
                }
            }
        }
        let mut rope = Self {
            tables: Vec::new(),
            one: (cos, sin),
            dims: [b, l, head_dim],
        };
        for &h in heads {
            if !rope.tables.iter().any(|(th, _, _)| *th == h) {
                let (c, s) = rope.tiled(h, device);
                rope.tables.push((h, c, s));
            }
        }
        rope
    }

    /// cos and sin [B, L, heads·dh]: each position's row repeated once per head.
    fn tiled(&self, heads: usize, device: &B::Device) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let [b, l, d] = self.dims;
        let tile = |one: &[f32]| -> Tensor<B, 3> {
            let mut all = Vec::with_capacity(one.len() * heads);
            for row in one.chunks(d.max(1)) {
                for _ in 0..heads {
                    all.extend_from_slice(row);
                }
            }
            Tensor::from_data(TensorData::new(all, [b, l, heads * d]), device)
        };
        (tile(&self.one.0), tile(&self.one.1))
    }

    /// x·cos + rotate_half(x)·sin per head, rotate_half(x) = cat(−x₂, x₁), over a projection's
    /// output x [B, L, heads·dh]. Tables of a head count `new` was not given are built here.
    pub fn apply(&self, x: Tensor<B, 3>, heads: usize) -> Tensor<B, 3> {
        let (cos, sin) = match self.tables.iter().find(|(h, _, _)| *h == heads) {
            Some((_, c, s)) => (c.clone(), s.clone()),
            None => self.tiled(heads, &x.device()),
        };
        let [b, l, hd] = x.dims();
        let d = hd / heads;
        let x4 = x.clone().reshape([b, l, heads, d]);
        let x1 = x4.clone().slice([0..b, 0..l, 0..heads, 0..d / 2]);
        let x2 = x4.slice([0..b, 0..l, 0..heads, d / 2..d]);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3).reshape([b, l, hd]);
        x * cos + rotated * sin
    }
}

/// `self_attn.{q,k,v,o}_proj`.
#[derive(Module, Debug)]
pub struct LlamaAttention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl<B: DenseBackend> LlamaAttention<B> {
    fn load(cfg: &LlamaConfig, vb: &Loader<B>) -> Result<Self> {
        let (d, h, kv, dh) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.kv_heads(),
            cfg.head_size(),
        );
        let bias = cfg.attention_bias;
        Ok(Self {
            q_proj: vb.linear("q_proj", d, h * dh, bias)?,
            k_proj: vb.linear("k_proj", d, kv * dh, bias)?,
            v_proj: vb.linear("v_proj", d, kv * dh, bias)?,
            o_proj: vb.linear("o_proj", h * dh, d, bias)?,
            num_heads: h,
            num_kv_heads: kv,
            head_dim: dh,
        })
    }

    /// Key/value heads repeated to the query heads (HF `repeat_kv`: each kv head n_rep times).
    fn repeat_kv(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let rep = self.num_heads / self.num_kv_heads;
        if rep == 1 {
            return x;
        }
        let [b, kv, l, dh] = x.dims();
        x.reshape([b, kv, 1, l, dh])
            .expand([b, kv, rep, l, dh])
            .reshape([b, kv * rep, l, dh])
    }
}

/// `mlp`: down_proj(act(gate_proj x) ⊙ up_proj x).
#[derive(Module, Debug)]
pub struct LlamaMlp<B: Backend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
    #[module(skip)]
    pub act: Activation,
}

impl<B: DenseBackend> LlamaMlp<B> {
    fn load(cfg: &LlamaConfig, vb: &Loader<B>) -> Result<Self> {
        let (d, f, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_proj: vb.linear("gate_proj", d, f, bias)?,
            up_proj: vb.linear("up_proj", d, f, bias)?,
            down_proj: vb.linear("down_proj", f, d, bias)?,
            act: Activation::from_hf(&cfg.hidden_act).expect("validated"),
        })
    }

    pub fn forward(&self, x: Tensor<B, 3>, tap: Tap<B>) -> Tensor<B, 3> {
        tap(&[&self.gate_proj, &self.up_proj], &x);
        let h = activate(self.gate_proj.forward(x.clone()), self.act) * self.up_proj.forward(x);
        tap(&[&self.down_proj], &h);
        self.down_proj.forward(h)
    }
}

/// Cached keys/values of the decoder-only model: per layer, post-rotary keys and values
/// [B, KV heads, L, dh] (before the grouped-query repetition).
#[derive(Debug, Clone)]
pub struct LlamaCache<B: Backend> {
    pub layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    /// Positions already cached.
    pub len: usize,
}

impl<B: DenseBackend> LlamaCache<B> {
    pub fn new(layers: usize) -> Self {
        Self {
            layers: vec![None; layers],
            len: 0,
        }
    }

    /// Keeps batch rows `rows` (beam reordering).
    pub fn select_rows(&mut self, rows: Tensor<B, 1, Int>) {
        for kv in &mut self.layers {
            if let Some((k, v)) = kv.take() {
                *kv = Some((k.select(0, rows.clone()), v.select(0, rows.clone())));
            }
        }
    }
}

/// `model.layers.N`: x += attn(input_layernorm(x)); x += mlp(post_attention_layernorm(x)).
#[derive(Module, Debug)]
pub struct LlamaLayer<B: Backend> {
    pub self_attn: LlamaAttention<B>,
    pub mlp: LlamaMlp<B>,
    pub input_layernorm: RmsNorm<B>,
    pub post_attention_layernorm: RmsNorm<B>,
}

impl<B: DenseBackend> LlamaLayer<B> {
    fn load(cfg: &LlamaConfig, vb: &Loader<B>) -> Result<Self> {
        let (d, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            self_attn: LlamaAttention::load(cfg, &vb.pp("self_attn"))?,
            mlp: LlamaMlp::load(cfg, &vb.pp("mlp"))?,
            input_layernorm: RmsNorm::load(vb, "input_layernorm", d, eps)?,
            post_attention_layernorm: RmsNorm::load(vb, "post_attention_layernorm", d, eps)?,
        })
    }

    /// One layer over new positions `x` [B, L, D]. `bias`: causal + padding bias
    /// [B or 1, 1, L, cached + L]; `rope`: rotary tables of the new positions; `cache`: this
    /// layer's keys/values so far (extended in place).
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        bias: Tensor<B, 4>,
        rope: &Rope<B>,
        cache: Option<&mut Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
        tap: Tap<B>,
    ) -> Tensor<B, 3> {
        let a = &self.self_attn;
        let h = self.input_layernorm.forward(x.clone());
        tap(&[&a.q_proj, &a.k_proj, &a.v_proj], &h);
        let q = split_heads(
            rope.apply(a.q_proj.forward(h.clone()), a.num_heads),
            a.num_heads,
        );
        let mut k = split_heads(
            rope.apply(a.k_proj.forward(h.clone()), a.num_kv_heads),
            a.num_kv_heads,
        );
        let mut v = split_heads(a.v_proj.forward(h), a.num_kv_heads);
        if let Some(c) = cache {
            if let Some((pk, pv)) = c.take() {
                k = Tensor::cat(vec![pk, k], 2);
                v = Tensor::cat(vec![pv, v], 2);
            }
            *c = Some((k.clone(), v.clone()));
        }
        let scale = (a.head_dim as f64).powf(-0.5);
        let ctx = merge_heads(attention(
            q,
            a.repeat_kv(k),
            a.repeat_kv(v),
            Some(scale),
            Some(bias),
        ));
        tap(&[&a.o_proj], &ctx);
        let x = x + a.o_proj.forward(ctx);
        let h = self.post_attention_layernorm.forward(x.clone());
        x + self.mlp.forward(h, tap)
    }

    /// Prunable linears: q/k/v/o_proj, gate/up/down_proj.
    pub fn linears(&self) -> Vec<&Linear<B>> {
        let (a, m) = (&self.self_attn, &self.mlp);
        vec![
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ]
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear<B>> {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        vec![
            &mut a.q_proj,
            &mut a.k_proj,
            &mut a.v_proj,
            &mut a.o_proj,
            &mut m.gate_proj,
            &mut m.up_proj,
            &mut m.down_proj,
        ]
    }
}

/// `LlamaForCausalLM`: `model.embed_tokens`, `model.layers`, `model.norm`, `lm_head`.
#[derive(Module, Debug)]
pub struct Llama<B: Backend> {
    pub embed_tokens: Param<Tensor<B, 2>>,
    pub layers: Vec<LlamaLayer<B>>,
    pub norm: RmsNorm<B>,
    /// `lm_head` [hidden, vocab] in burn layout; `None` when tied to `embed_tokens`.
    pub lm_head: Option<Linear<B>>,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    #[module(skip)]
    pub tokens: SpecialTokens,
    /// The tokenizer's bos, which leads every text (it is dropped from targets).
    #[module(skip)]
    pub bos: Option<u32>,
}

impl<B: DenseBackend> Llama<B> {
    pub fn new_cache(&self) -> LlamaCache<B> {
        LlamaCache::new(self.layers.len())
    }

    /// Rotary tables for `positions` [B][L].
    pub fn rope(&self, positions: &[Vec<usize>], device: &B::Device) -> Rope<B> {
        let heads: Vec<usize> = self
            .layers
            .first()
            .map(|l| vec![l.self_attn.num_heads, l.self_attn.num_kv_heads])
            .unwrap_or_default();
        Rope::new(positions, self.head_dim, self.rope_theta, &heads, device)
    }

    /// Causal + key-padding bias [B, 1, Lq, Lk] for `lq` new positions after `offset` cached
    /// ones; `mask` [B, Lk] covers cached and new positions (1 attend, 0 padding).
    pub fn attention_bias(&self, mask: Tensor<B, 2>, lq: usize, offset: usize) -> Tensor<B, 4> {
        let lk = mask.dims()[1];
        causal_bias(lq, lk, offset, &mask.device()) + key_padding_bias(mask)
    }

    /// Hidden states after the final norm for new embeddings `x` [B, L, D] at `positions`
    /// [B][L]; `mask` [B, cached + L]. With a cache, its keys/values are extended.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        mask: Tensor<B, 2>,
        positions: &[Vec<usize>],
        cache: Option<&mut LlamaCache<B>>,
    ) -> Tensor<B, 3> {
        let lq = x.dims()[1];
        let device = x.device();
        let offset = cache.as_ref().map_or(0, |c| c.len);
        let bias = self.attention_bias(mask, lq, offset);
        let rope = self.rope(positions, &device);
        let mut x = x;
        match cache {
            Some(cache) => {
                for (layer, c) in self.layers.iter().zip(cache.layers.iter_mut()) {
                    x = layer.forward(x, bias.clone(), &rope, Some(c), &mut no_tap);
                }
                cache.len += lq;
            }
            None => {
                for layer in &self.layers {
                    x = layer.forward(x, bias.clone(), &rope, None, &mut no_tap);
                }
            }
        }
        self.norm.forward(x)
    }

    /// Hidden states → logits [B, L, vocab].
    pub fn lm_logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => ops::linear(hidden, self.embed_tokens.val().transpose(), None),
        }
    }

    /// The teacher-forced sequence `[input's attended positions ; target]` of every row, right
    /// padded (as LAVIS concatenates input and output tokens): embeddings [B, S, D], mask
    /// [B, S], and each row's count of input positions. Without targets, the input as is.
    fn sequence(
        &self,
        input: &LmInput<B>,
        targets: &[Vec<u32>],
    ) -> (Tensor<B, 3>, Tensor<B, 2>, Vec<usize>) {
        let [b, l, d] = input.embeds.dims();
        let device = input.embeds.device();
        if targets.iter().all(Vec::is_empty) {
            // Nothing to append: the input as it is (what `logits` runs).
            return (input.embeds.clone(), input.mask.clone(), vec![l; b]);
        }
        // One table: the input positions, then every target token, then the pad embedding.
        let flat_targets: Vec<u32> = targets.iter().flatten().copied().collect();
        let mut extra = flat_targets.clone();
        extra.push(self.tokens.pad);
        let extra_emb = embed(self.embed_tokens.val(), ids_tensor::<B>(&[extra], &device))
            .reshape([flat_targets.len() + 1, d]);
        let table = Tensor::cat(vec![input.embeds.clone().reshape([b * l, d]), extra_emb], 0);
        let pad_row = b * l + flat_targets.len();
        let mut rows: Vec<Vec<usize>> = Vec::with_capacity(b);
        let mut starts = Vec::with_capacity(b);
        let mut next_target = b * l;
        for (r, target) in targets.iter().enumerate() {
            let mut row: Vec<usize> = input.host_mask[r]
                .iter()
                .enumerate()
                .filter(|(_, m)| **m != 0)
                .map(|(p, _)| r * l + p)
                .collect();
            starts.push(row.len());
            row.extend(next_target..next_target + target.len());
            next_target += target.len();
            rows.push(row);
        }
        let s = rows.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut idx = Vec::with_capacity(b * s);
        let mut mask = Vec::with_capacity(b * s);
        for row in &rows {
            idx.extend(row);
            mask.extend(std::iter::repeat_n(1.0f32, row.len()));
            idx.extend(std::iter::repeat_n(pad_row, s - row.len()));
            mask.extend(std::iter::repeat_n(0.0f32, s - row.len()));
        }
        let x = table
            .select(0, index_tensor(&idx, &device))
            .reshape([b, s, d]);
        let mask = Tensor::from_data(TensorData::new(mask, [b, s]), &device);
        (x, mask, starts)
    }
}

/// The decoder-only decoding state.
pub struct LlamaDecoding<B: Backend> {
    /// The input embeddings, consumed by the first step.
    prefix: Option<Tensor<B, 3>>,
    /// Attention mask rows over cached positions (host).
    mask: Vec<Vec<u32>>,
    cache: LlamaCache<B>,
}

impl<B: DenseBackend> LanguageModel<B> for Llama<B> {
    type Config = LlamaConfig;
    type Decoding = LlamaDecoding<B>;

    fn load(cfg: &LlamaConfig, vb: &Loader<B>) -> Result<Self> {
        let (v, d) = (cfg.vocab_size, cfg.hidden_size);
        let m = vb.pp("model");
        let embed_tokens = m.param("embed_tokens.weight", [v, d])?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| LlamaLayer::load(cfg, &m.pp(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        // An untied head must be stored; a tied one may be stored anyway (then it is used).
        let lm_head = if !cfg.ties_embeddings() || vb.contains_or("lm_head.weight", false) {
            Some(vb.linear("lm_head", d, v, false)?)
        } else {
            None
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm: RmsNorm::load(&m, "norm", d, cfg.rms_norm_eps)?,
            lm_head,
            head_dim: cfg.head_size(),
            rope_theta: cfg.theta(),
            max_position_embeddings: cfg.max_position_embeddings,
            tokens: SpecialTokens {
                decoder_start: cfg.bos_token(),
                eos: cfg.eos_token(),
                pad: cfg.pad_token(),
            },
            bos: cfg.bos_token_id,
        })
    }

    fn hidden_size(&self) -> usize {
        self.embed_tokens.dims()[1]
    }

    fn vocab_size(&self) -> usize {
        self.embed_tokens.dims()[0]
    }

    fn special_tokens(&self) -> SpecialTokens {
        self.tokens
    }

    fn padding(&self) -> Padding {
        Padding::Left
    }

    fn is_encoder_decoder(&self) -> bool {
        false
    }

    fn context_window(&self) -> Option<usize> {
        Some(self.max_position_embeddings)
    }

    fn embed(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        embed(self.embed_tokens.val(), ids)
    }

    fn target_ids(&self, tokenized: &[u32]) -> Vec<u32> {
        let mut t: Vec<u32> = match (self.bos, tokenized.first()) {
            (Some(bos), Some(&first)) if first == bos => tokenized[1..].to_vec(),
            _ => tokenized.to_vec(),
        };
        if t.last() != Some(&self.tokens.eos) {
            t.push(self.tokens.eos);
        }
        t
    }

    fn teacher_forced(&self, input: LmInput<B>, targets: &[Vec<u32>]) -> Result<TeacherForced<B>> {
        let device = input.embeds.device();
        let (x, mask, starts) = self.sequence(&input, targets);
        let [b, s, d] = x.dims();
        let hidden = self.forward(x, mask, &arange_positions(b, s), None);
        // Target token t of row r sits at `starts[r] + t`, predicted by the position before it.
        let (tgt, tmask, tokens) = aligned_targets::<B>(targets, &device);
        let t = tgt.dims()[1];
        let mut idx = Vec::with_capacity(b * t);
        for (r, target) in targets.iter().enumerate() {
            for i in 0..t {
                let p = if i < target.len() {
                    (starts[r] + i).saturating_sub(1)
                } else {
                    0
                };
                idx.push(r * s + p);
            }
        }
        let picked = hidden
            .reshape([b * s, d])
            .select(0, index_tensor(&idx, &device))
            .reshape([b, t, d]);
        Ok(TeacherForced {
            logits: self.lm_logits(picked),
            targets: tgt,
            mask: tmask,
            tokens,
        })
    }

    fn logits(
        &self,
        input: LmInput<B>,
        continuation: Option<Tensor<B, 2, Int>>,
    ) -> Result<Tensor<B, 3>> {
        let (x, mask) = match continuation {
            None => (input.embeds, input.mask),
            Some(ids) => {
                let [b, l] = ids.dims();
                let device = ids.device();
                (
                    Tensor::cat(vec![input.embeds, self.embed(ids)], 1),
                    Tensor::cat(vec![input.mask, Tensor::ones([b, l], &device)], 1),
                )
            }
        };
        let [b, l, _] = x.dims();
        self.check_positions(l)?;
        let hidden = self.forward(x, mask, &arange_positions(b, l), None);
        Ok(self.lm_logits(hidden))
    }

    fn start(&self, input: LmInput<B>, expand: usize) -> Result<Start<LlamaDecoding<B>>> {
        let [batch, l, _] = input.embeds.dims();
        self.check_positions(l)?;
        let device = input.embeds.device();
        let rows = rows_index::<B>(batch, expand, &device);
        let mut seqs = Vec::with_capacity(batch * expand);
        let mut masks = Vec::with_capacity(batch * expand);
        for (ids, m) in input.ids.iter().zip(&input.host_mask) {
            for _ in 0..expand {
                seqs.push(ids.clone());
                masks.push(m.clone());
            }
        }
        Ok(Start {
            state: LlamaDecoding {
                prefix: Some(input.embeds.select(0, rows)),
                mask: masks,
                cache: self.new_cache(),
            },
            input_len: seqs.first().map_or(0, Vec::len),
            rows: seqs,
        })
    }

    fn step(&self, state: &mut LlamaDecoding<B>, last: &[u32]) -> Tensor<B, 2> {
        let x = match state.prefix.take() {
            Some(x) => x,
            None => {
                for m in state.mask.iter_mut() {
                    m.push(1);
                }
                let device = self.embed_tokens.device();
                let ids: Vec<Vec<u32>> = last.iter().map(|&t| vec![t]).collect();
                self.embed(ids_tensor::<B>(&ids, &device))
            }
        };
        let [rows, l, _] = x.dims();
        let device = x.device();
        let positions: Vec<Vec<usize>> = mask_positions(&state.mask)
            .into_iter()
            .map(|p| p[p.len() - l..].to_vec())
            .collect();
        let lk = state.mask[0].len();
        let flat: Vec<f32> = state.mask.iter().flatten().map(|&m| m as f32).collect();
        let mask_t = Tensor::<B, 2>::from_data(TensorData::new(flat, [rows, lk]), &device);
        let hidden = self.forward(x, mask_t, &positions, Some(&mut state.cache));
        let d = hidden.dims()[2];
        let logits = self.lm_logits(hidden.slice([0..rows, l - 1..l, 0..d]));
        let vocab = logits.dims()[2];
        logits.reshape([rows, vocab])
    }

    fn reorder(&self, state: &mut LlamaDecoding<B>, rows: &[usize]) {
        let device = self.embed_tokens.device();
        state.cache.select_rows(index_tensor(rows, &device));
        state.mask = rows.iter().map(|&r| state.mask[r].clone()).collect();
    }

    fn kernel_rows(&self, _: LlamaStack, rows: &KernelRows, _: usize) -> usize {
        rows.decode
    }
}

impl<B: DenseBackend> Llama<B> {
    /// Refuses a sequence longer than the rotary positions the model was trained for.
    pub fn check_positions(&self, len: usize) -> Result<()> {
        if len > self.max_position_embeddings {
            return Err(ModelError::Input(format!(
                "the sequence has {len} positions, more than the language model's max_position_embeddings {}",
                self.max_position_embeddings
            )));
        }
        Ok(())
    }
}

/// The decoder-only model's one stack, `model.layers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LlamaStack;

/// A LLaMA layer's calibration input: hidden state, causal + padding bias and the rotary
/// tables of positions `0..L`.
#[derive(Debug, Clone)]
pub struct LlamaBlockInput<B: Backend> {
    pub x: Tensor<B, 3>,
    pub bias: Tensor<B, 4>,
    pub rope: Rope<B>,
}

impl<B: DenseBackend> Prunable<B> for Llama<B> {
    type Sample = LmSample<B>;
    type Stack = LlamaStack;
    type BlockInput = LlamaBlockInput<B>;
    type Context = LlamaBlockInput<B>;

    fn stacks(&self) -> Vec<StackInfo<LlamaStack>> {
        let name = stack_name(self.layers.first().map(|l| &*l.self_attn.q_proj.key));
        vec![StackInfo {
            id: LlamaStack,
            tower: Tower::Language,
            name,
            blocks: self.layers.len(),
        }]
    }

    /// The teacher-forced sequence `[input ; target]`, positions `0..L`.
    fn context(&self, sample: &LmSample<B>) -> Result<LlamaBlockInput<B>> {
        let (x, mask, _) = self.sequence(&sample.input, &sample.row_targets());
        let [b, l, _] = x.dims();
        self.check_positions(l)?;
        let device = x.device();
        Ok(LlamaBlockInput {
            bias: self.attention_bias(mask, l, 0),
            rope: self.rope(&arange_positions(b, l), &device),
            x,
        })
    }

    fn stack_input(&self, _: LlamaStack, ctx: &LlamaBlockInput<B>) -> Result<LlamaBlockInput<B>> {
        Ok(ctx.clone())
    }

    fn run_block(
        &self,
        stack: LlamaStack,
        block: usize,
        input: &LlamaBlockInput<B>,
        _: BlockOptions,
        tap: Tap<B>,
    ) -> Result<Tensor<B, 3>> {
        let layer = self.layers.get(block).ok_or_else(|| mismatch(stack))?;
        Ok(layer.forward(input.x.clone(), input.bias.clone(), &input.rope, None, tap))
    }

    fn with_hidden(
        &self,
        mut input: LlamaBlockInput<B>,
        hidden: Tensor<B, 3>,
    ) -> LlamaBlockInput<B> {
        input.x = hidden;
        input
    }

    fn end_stack(
        &self,
        _: LlamaStack,
        _: Tensor<B, 3>,
        _: &mut LlamaBlockInput<B>,
        _: BlockOptions,
    ) -> Result<()> {
        Ok(())
    }

    fn block_linears(&self, _: LlamaStack, block: usize) -> Vec<&Linear<B>> {
        self.layers
            .get(block)
            .map(|l| l.linears())
            .unwrap_or_default()
    }

    fn block_linears_mut(&mut self, _: LlamaStack, block: usize) -> Vec<&mut Linear<B>> {
        self.layers
            .get_mut(block)
            .map(|l| l.linears_mut())
            .unwrap_or_default()
    }

    fn split_hidden(
        &self,
        mut input: LlamaBlockInput<B>,
    ) -> std::result::Result<(LlamaBlockInput<B>, Tensor<B, 3>), LlamaBlockInput<B>> {
        let hidden = std::mem::replace(&mut input.x, empty_hidden(&input.bias.device()));
        Ok((input, hidden))
    }

    fn join_hidden(
        &self,
        mut frame: LlamaBlockInput<B>,
        hidden: Tensor<B, 3>,
    ) -> LlamaBlockInput<B> {
        frame.x = hidden;
        frame
    }

    fn idle_linears(&self) -> Vec<&Linear<B>> {
        self.lm_head.iter().collect()
    }
}

/// Positions `0..len` for every batch row (what a forward without generation uses).
pub fn arange_positions(batch: usize, len: usize) -> Vec<Vec<usize>> {
    vec![(0..len).collect(); batch]
}

/// HF generation positions: `cumsum(mask) − 1`, 0 at padding.
pub fn mask_positions(mask: &[Vec<u32>]) -> Vec<Vec<usize>> {
    mask.iter()
        .map(|row| {
            let mut n = 0usize;
            row.iter()
                .map(|&m| {
                    if m != 0 {
                        n += 1;
                        n - 1
                    } else {
                        0
                    }
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn generation_positions_skip_padding() {
        assert_eq!(
            mask_positions(&[vec![1, 1, 0, 0, 1, 1], vec![0, 1, 1, 1, 1, 1]]),
            vec![vec![0, 1, 0, 0, 2, 3], vec![0, 0, 1, 2, 3, 4]]
        );
    }

    #[test]
    fn rope_at_position_zero_is_identity_and_rotates_pairs() {
        let device = Default::default();
        let rope = Rope::<Flex>::new(&[vec![0, 1]], 4, 10000.0, &[1], &device);
        let x = Tensor::<Flex, 3>::from_data(
            TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0, 1.0, 0.0, 0.0, 0.0], [1, 2, 4]),
            &device,
        );
        let y: Vec<f32> = rope.apply(x.clone(), 1).into_data().into_vec().unwrap();
        assert_eq!(&y[..4], &[1.0, 2.0, 3.0, 4.0]);
        // Position 1, pair (0, 2) rotates by angle 1: (cos 1, sin 1).
        assert!((y[4] - 1f32.cos()).abs() < 1e-6 && (y[6] - 1f32.sin()).abs() < 1e-6);
        // Two heads of width 2: each head rotates its own pair; position 1, angle 1.
        let rope2 = Rope::<Flex>::new(&[vec![0, 1]], 2, 10000.0, &[2], &device);
        let y2: Vec<f32> = rope2.apply(x.clone(), 2).into_data().into_vec().unwrap();
        // A head count the tables were not built for gives the same result.
        let unbuilt = Rope::<Flex>::new(&[vec![0, 1]], 2, 10000.0, &[], &device);
        let y3: Vec<f32> = unbuilt.apply(x, 2).into_data().into_vec().unwrap();
        assert_eq!(y2, y3);
        let (c, s) = (1f32.cos(), 1f32.sin());
        assert_eq!(&y2[..4], &[1.0, 2.0, 3.0, 4.0]);
        assert!(
            (y2[4] - c).abs() < 1e-6 && (y2[5] - s).abs() < 1e-6,
            "{y2:?}"
        );
        assert_eq!(&y2[6..], &[0.0, 0.0]);
    }
}
