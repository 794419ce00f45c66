//! LLaMA decoder-only language model (HF `LlamaForCausalLM`, keys under `language_model.`):
//! RMS norm, rotary position embeddings (HF `rotate_half` convention, the config's theta),
//! SwiGLU MLP, grouped-query attention when the config has fewer key/value heads, causal and
//! padding masks, and a KV cache.

use crate::linear::Linear;
use burn::module::Param;
use burn::prelude::*;

use crate::config::{Activation, LlamaConfig};
use crate::error::Result;
use crate::nn::{
    Tap, activate, attention, causal_bias, embed, key_padding_bias, merge_heads, no_tap,
    split_heads,
};
use crate::t5::RmsNorm;
use crate::weights::{ExportTensor, Exporter, Loader};

/// Rotary tables for one batch: cos and sin [B, 1, L, head_dim] (`cat(freqs, freqs)` layout).
#[derive(Debug, Clone)]
pub struct Rope<B: Backend> {
    pub cos: Tensor<B, 4>,
    pub sin: Tensor<B, 4>,
}

impl<B: Backend> Rope<B> {
    /// Tables for `positions` [B][L], as HF `LlamaRotaryEmbedding` computes them in f32:
    /// inv_freq_i = 1 / theta^(2i / dim), angle = position · inv_freq.
    pub fn new(positions: &[Vec<usize>], head_dim: usize, theta: f64, device: &B::Device) -> Self {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let b = positions.len();
        let l = positions.first().map_or(0, |p| p.len());
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
        let shape = [b, 1, l, head_dim];
        Self {
            cos: Tensor::from_data(TensorData::new(cos, shape), device),
            sin: Tensor::from_data(TensorData::new(sin, shape), device),
        }
    }

    /// x·cos + rotate_half(x)·sin, rotate_half(x) = cat(−x₂, x₁), over [B, H, L, dh].
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, h, l, d] = x.dims();
        let x1 = x.clone().slice([0..b, 0..h, 0..l, 0..d / 2]);
        let x2 = x.clone().slice([0..b, 0..h, 0..l, d / 2..d]);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * self.cos.clone() + rotated * self.sin.clone()
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

impl<B: Backend> LlamaAttention<B> {
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

    fn export(&self, ex: &mut Exporter<B>) {
        ex.linear("q_proj", &self.q_proj);
        ex.linear("k_proj", &self.k_proj);
        ex.linear("v_proj", &self.v_proj);
        ex.linear("o_proj", &self.o_proj);
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

impl<B: Backend> LlamaMlp<B> {
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
        tap(&["mlp.gate_proj", "mlp.up_proj"], &x);
        let h = activate(self.gate_proj.forward(x.clone()), self.act) * self.up_proj.forward(x);
        tap(&["mlp.down_proj"], &h);
        self.down_proj.forward(h)
    }

    fn export(&self, ex: &mut Exporter<B>) {
        ex.linear("gate_proj", &self.gate_proj);
        ex.linear("up_proj", &self.up_proj);
        ex.linear("down_proj", &self.down_proj);
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

impl<B: Backend> LlamaCache<B> {
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

impl<B: Backend> LlamaLayer<B> {
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
        tap(
            &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            &h,
        );
        let q = rope.apply(split_heads(a.q_proj.forward(h.clone()), a.num_heads));
        let mut k = rope.apply(split_heads(a.k_proj.forward(h.clone()), a.num_kv_heads));
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
        tap(&["self_attn.o_proj"], &ctx);
        let x = x + a.o_proj.forward(ctx);
        let h = self.post_attention_layernorm.forward(x.clone());
        x + self.mlp.forward(h, tap)
    }

    fn export(&self, ex: &mut Exporter<B>) {
        ex.scope("self_attn", |ex| self.self_attn.export(ex));
        ex.scope("mlp", |ex| self.mlp.export(ex));
        ex.add(
            "input_layernorm.weight",
            ExportTensor::D1(self.input_layernorm.weight.val()),
        );
        ex.add(
            "post_attention_layernorm.weight",
            ExportTensor::D1(self.post_attention_layernorm.weight.val()),
        );
    }

    /// Prunable linears with HF names relative to the layer.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear<B>)> {
        let a = &mut self.self_attn;
        let m = &mut self.mlp;
        vec![
            ("self_attn.q_proj".into(), &mut a.q_proj),
            ("self_attn.k_proj".into(), &mut a.k_proj),
            ("self_attn.v_proj".into(), &mut a.v_proj),
            ("self_attn.o_proj".into(), &mut a.o_proj),
            ("mlp.gate_proj".into(), &mut m.gate_proj),
            ("mlp.up_proj".into(), &mut m.up_proj),
            ("mlp.down_proj".into(), &mut m.down_proj),
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
}

impl<B: Backend> Llama<B> {
    pub fn load(cfg: &LlamaConfig, vb: &Loader<B>) -> Result<Self> {
        let (v, d) = (cfg.vocab_size, cfg.hidden_size);
        let m = vb.pp("model");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| LlamaLayer::load(cfg, &m.pp(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if vb.contains_or("lm_head.weight", !cfg.ties_embeddings()) {
            Some(vb.linear("lm_head", d, v, false)?)
        } else {
            None
        };
        Ok(Self {
            embed_tokens: m.param("embed_tokens.weight", [v, d])?,
            layers,
            norm: RmsNorm::load(&m, "norm", d, cfg.rms_norm_eps)?,
            lm_head,
            head_dim: cfg.head_size(),
            rope_theta: cfg.theta(),
        })
    }

    pub fn embed(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        embed(self.embed_tokens.val(), ids)
    }

    pub fn new_cache(&self) -> LlamaCache<B> {
        LlamaCache::new(self.layers.len())
    }

    /// Rotary tables for `positions` [B][L].
    pub fn rope(&self, positions: &[Vec<usize>], device: &B::Device) -> Rope<B> {
        Rope::new(positions, self.head_dim, self.rope_theta, device)
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
            None => hidden.matmul(self.embed_tokens.val().transpose().unsqueeze()),
        }
    }

    pub fn export(&self, ex: &mut Exporter<B>) {
        ex.scope("model", |ex| {
            ex.add(
                "embed_tokens.weight",
                ExportTensor::D2(self.embed_tokens.val()),
            );
            for (i, l) in self.layers.iter().enumerate() {
                ex.scope(format!("layers.{i}"), |ex| l.export(ex));
            }
            ex.add("norm.weight", ExportTensor::D1(self.norm.weight.val()));
        });
        if let Some(h) = &self.lm_head {
            ex.linear("lm_head", h);
        }
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
        let rope = Rope::<Flex>::new(&[vec![0, 1]], 4, 10000.0, &device);
        let x = Tensor::<Flex, 4>::from_data(
            TensorData::new(
                vec![1.0f32, 2.0, 3.0, 4.0, 1.0, 0.0, 0.0, 0.0],
                [1, 1, 2, 4],
            ),
            &device,
        );
        let y: Vec<f32> = rope.apply(x).into_data().into_vec().unwrap();
        assert_eq!(&y[..4], &[1.0, 2.0, 3.0, 4.0]);
        // Position 1, pair (0, 2) rotates by angle 1: (cos 1, sin 1).
        assert!((y[4] - 1f32.cos()).abs() < 1e-6 && (y[6] - 1f32.sin()).abs() < 1e-6);
    }
}
