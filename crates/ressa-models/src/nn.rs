//! Small building blocks shared by the towers: multi-head attention math, activations,
//! embedding lookups and attention masks.

use burn::module::Param;
use burn::prelude::*;

use crate::config::Activation;
use crate::linear::Linear;
use crate::ops::{self, DenseBackend};

/// Receives the input of one or more linears (which share it) during a calibration forward:
/// burn has no forward hooks, so blocks report their linears' inputs. A linear names itself
/// ([`Linear::key`]), so no name is written twice.
pub type Tap<'a, B> = &'a mut dyn FnMut(&[&Linear<B>], &Tensor<B, 3>);

/// A tap that ignores everything (plain inference).
pub fn no_tap<B: Backend>(_: &[&Linear<B>], _: &Tensor<B, 3>) {}

/// Additive value for masked attention positions (HF uses `finfo(f32).min`; any value that
/// drives `exp` to 0 gives the same softmax).
pub const MASKED: f32 = -1.0e30;

/// `[B, L, H·dh] → [B, H, L, dh]`.
pub fn split_heads<B: Backend>(x: Tensor<B, 3>, heads: usize) -> Tensor<B, 4> {
    let [b, l, d] = x.dims();
    x.reshape([b, l, heads, d / heads]).swap_dims(1, 2)
}

/// `[B, H, L, dh] → [B, L, H·dh]`.
pub fn merge_heads<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 3> {
    let [b, h, l, dh] = x.dims();
    x.swap_dims(1, 2).reshape([b, l, h * dh])
}

pub use crate::ops::attention;

pub fn activate<B: DenseBackend, const D: usize>(x: Tensor<B, D>, act: Activation) -> Tensor<B, D> {
    ops::activate(x, act)
}

/// PyTorch's `nn.LayerNorm` (`{name}.weight` = γ, `{name}.bias` = β) over the last dimension;
/// burn's `LayerNorm` keeps its ε private, and the forward here is [`ops::layer_norm`].
#[derive(Module, Debug)]
pub struct LayerNorm<B: Backend> {
    pub gamma: Param<Tensor<B, 1>>,
    pub beta: Option<Param<Tensor<B, 1>>>,
    pub epsilon: f64,
}

impl<B: DenseBackend> LayerNorm<B> {
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        ops::layer_norm(
            x,
            self.gamma.val(),
            self.beta.as_ref().map(|b| b.val()),
            self.epsilon,
        )
    }
}

/// Rows of `table` [V, D] for `ids` [B, L] → [B, L, D].
pub fn embed<B: Backend>(table: Tensor<B, 2>, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
    let [b, l] = ids.dims();
    let d = table.dims()[1];
    table.select(0, ids.reshape([b * l])).reshape([b, l, d])
}

/// A key-padding mask [B, L] of 1 (attend) / 0 (padding) → additive bias [B, 1, 1, L].
pub fn key_padding_bias<B: Backend>(mask: Tensor<B, 2>) -> Tensor<B, 4> {
    let [b, l] = mask.dims();
    mask.neg()
        .add_scalar(1.0)
        .mul_scalar(MASKED)
        .reshape([b, 1, 1, l])
}

/// Causal bias [1, 1, Lq, Lk] where query i (at absolute position `offset + i`) sees keys ≤ it.
pub fn causal_bias<B: Backend>(
    lq: usize,
    lk: usize,
    offset: usize,
    device: &B::Device,
) -> Tensor<B, 4> {
    let mut data = vec![0.0f32; lq * lk];
    for i in 0..lq {
        for j in 0..lk {
            if j > offset + i {
                data[i * lk + j] = MASKED;
            }
        }
    }
    Tensor::<B, 2>::from_data(TensorData::new(data, [lq, lk]), device).reshape([1, 1, lq, lk])
}

/// Host ids → an Int tensor [B, L].
pub fn ids_tensor<B: Backend>(ids: &[Vec<u32>], device: &B::Device) -> Tensor<B, 2, Int> {
    let b = ids.len();
    let l = ids.first().map_or(0, |r| r.len());
    let flat: Vec<i64> = ids
        .iter()
        .flat_map(|r| r.iter().map(|&x| x as i64))
        .collect();
    Tensor::from_data(TensorData::new(flat, [b, l]), device)
}

/// Host row indices → an Int tensor [N].
pub fn index_tensor<B: Backend>(rows: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
    let idx: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
    Tensor::from_data(TensorData::new(idx, [rows.len()]), device)
}

/// Each of `batch` rows repeated `expand` times (HF `_expand_inputs_for_generation`).
pub fn rows_index<B: Backend>(
    batch: usize,
    expand: usize,
    device: &B::Device,
) -> Tensor<B, 1, Int> {
    let rows: Vec<usize> = (0..batch)
        .flat_map(|b| std::iter::repeat_n(b, expand))
        .collect();
    index_tensor(&rows, device)
}

/// A float tensor's values on the host (row-major).
pub fn host_f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("converted to f32")
}

/// An Int tensor [B, L] on the host as rows of ids.
pub fn host_ids<B: Backend>(t: Tensor<B, 2, Int>) -> Vec<Vec<u32>> {
    let [_, l] = t.dims();
    let v: Vec<i64> = t
        .into_data()
        .convert::<i64>()
        .into_vec::<i64>()
        .expect("ids");
    v.chunks(l.max(1))
        .map(|r| r.iter().map(|&x| x.max(0) as u32).collect())
        .collect()
}

/// A 1/0 mask [B, L] on the host.
pub fn host_mask<B: Backend>(t: Tensor<B, 2>) -> Vec<Vec<u32>> {
    host_ids(t.round().int())
}
