//! The models' dense math, chosen per backend at build time (burn's backend-extension pattern).
//!
//! [`DenseBackend`] is a burn backend plus the handful of ops the models spend their time in:
//! linear layers, the attention softmax, layer/RMS norms and activations, each with its
//! backward. Its default methods are burn's own ops, so a backend that implements it with an
//! empty `impl` (NdArray, Wgpu, Cuda) runs exactly what it ran before. The CPU backend Flex
//! overrides them with fused host kernels ([`flex`]: faer's runtime-dispatched gemm on strided
//! operands, one pass per row for the norms and the softmax, both cores), and `Autodiff<B>`
//! wraps `B`'s ops in one graph node each with its own backward ([`autodiff`]) — where `B`
//! has no fused kernels ([`DenseBackend::FUSED`] false), it keeps burn's own autodiff ops.
//!
//! Model code calls the tensor-level functions below ([`linear`], [`lora_weight`], [`attention`], [`softmax`],
//! [`layer_norm`], [`rms_norm`], [`activate`]); no model code names a backend.

pub mod autodiff;
#[cfg(feature = "flex")]
pub mod flex;
pub mod math;

use burn::prelude::*;
use burn::tensor::TensorPrimitive;
use burn::tensor::activation;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ops::{BoolTensor, FloatTensor};

use crate::config::Activation;

/// A burn backend with the models' dense ops (see the module docs).
///
/// Shapes: row ops act on the last dimension; a linear's `x` is `[..., K]`, `W` `[K, N]`
/// (burn's layout), `b` `[N]`.
pub trait DenseBackend: Backend {
    /// Whether the methods are this backend's own fused kernels (read by `Autodiff<Self>`,
    /// which otherwise keeps burn's autodiff ops).
    const FUSED: bool = false;

    /// `x·W + b`.
    fn dense_linear(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        b: Option<FloatTensor<Self>>,
    ) -> FloatTensor<Self> {
        Self::linear(x, w, b)
    }

    /// `∂L/∂x = g·Wᵀ` for the output gradient `g` `[..., N]`.
    fn dense_linear_backward_x(w: FloatTensor<Self>, g: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::linear_x_backward(w, g)
    }

    /// `∂L/∂W = Σ_rows xᵀ·g` `[K, N]`.
    fn dense_linear_backward_w(x: FloatTensor<Self>, g: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::linear_weight_backward(x, g)
    }

    /// `∂L/∂b = Σ_rows g` `[N]`.
    fn dense_linear_backward_b(g: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::linear_bias_backward(g)
    }

    /// SparseLoRA's student weight `(W + s·A·B) ⊙ M` (`M = ¬pruned`; no mask: plain LoRA),
    /// `W` `[K, N]`, `A` `[K, r]`, `B` `[r, N]`.
    fn dense_lora_weight(
        w: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        pruned: Option<BoolTensor<Self>>,
        scale: f64,
    ) -> FloatTensor<Self> {
        let update = tensor::<Self, 2>(a).matmul(tensor(b)).mul_scalar(scale);
        let weff = tensor::<Self, 2>(w) + update;
        float(match pruned {
            Some(p) => weff.mask_fill(Tensor::<Self, 2, Bool>::from_primitive(p), 0.0),
            None => weff,
        })
    }

    /// Gradients of [`DenseBackend::dense_lora_weight`] from `g = ∂L/∂W_eff`: with
    /// `U = g ⊙ M`, `(∂W, ∂A, ∂B) = (U, s·U·Bᵀ, s·Aᵀ·U)` (RESSA, reference notes §8).
    fn dense_lora_weight_backward(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        pruned: Option<BoolTensor<Self>>,
        scale: f64,
        g: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 3] {
        let g = tensor::<Self, 2>(g);
        let u = match pruned {
            Some(p) => g.mask_fill(Tensor::<Self, 2, Bool>::from_primitive(p), 0.0),
            None => g,
        };
        let (a, b) = (tensor::<Self, 2>(a), tensor::<Self, 2>(b));
        let da = u.clone().matmul(b.transpose()).mul_scalar(scale);
        let db = a.transpose().matmul(u.clone()).mul_scalar(scale);
        [float(u), float(da), float(db)]
    }

    /// Scaled dot-product attention `softmax(q·kᵀ·scale + bias)·v` over `[B, H, L, dh]`
    /// (`bias` broadcasts over `[B or 1, H or 1, Lq or 1, Lk]`), and, with `keep_probs`, the
    /// softmax's output `P` `[B, H, Lq, Lk]` for the backward.
    fn dense_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        scale: Option<f64>,
        keep_probs: bool,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        let (out, p) = composed::attention::<Self>(q, k, v, bias, scale);
        (out, keep_probs.then_some(p))
    }

    /// Gradients of [`DenseBackend::dense_attention`] `(∂q, ∂k, ∂v, ∂bias)` from `P` and
    /// `g = ∂L/∂out`: `∂v = Pᵀ·g`, `∂S = P ⊙ (g·vᵀ − rowsum(P ⊙ g·vᵀ))`, `∂bias = ∂S` summed
    /// over the bias's broadcast dimensions (when `bias_shape` is given), `∂q = s·∂S·k`,
    /// `∂k = s·∂Sᵀ·q`.
    #[allow(clippy::too_many_arguments)]
    fn dense_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        p: FloatTensor<Self>,
        g: FloatTensor<Self>,
        scale: Option<f64>,
        bias_shape: Option<Vec<usize>>,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        Option<FloatTensor<Self>>,
    ) {
        composed::attention_backward::<Self>(q, k, v, p, g, scale, bias_shape)
    }

    /// `softmax` over the last dimension.
    fn dense_softmax(x: FloatTensor<Self>) -> FloatTensor<Self> {
        composed::rows::<Self>(x, |x: Tensor<Self, 2>| activation::softmax(x, 1))
    }

    /// `∂L/∂x = y ⊙ (g − Σ_j g_j·y_j)` from the softmax's output `y`.
    fn dense_softmax_backward(y: FloatTensor<Self>, g: FloatTensor<Self>) -> FloatTensor<Self> {
        composed::rows2::<Self>(y, g, |y, g| {
            let dot = (g.clone() * y.clone()).sum_dim(1);
            y * (g - dot)
        })
    }

    /// `(x − μ)/√(σ² + ε)·γ + β` over the last dimension (biased variance, as PyTorch).
    fn dense_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: Option<FloatTensor<Self>>,
        eps: f64,
    ) -> FloatTensor<Self> {
        composed::layer_norm::<Self>(x, gamma, beta, eps)
    }

    /// Gradients of [`DenseBackend::dense_layer_norm`]: `(∂x, ∂γ, ∂β)`, with `x̂ = (x − μ)·r`,
    /// `r = 1/√(σ² + ε)`, `ĝ = g ⊙ γ`: `∂x = r·(ĝ − mean(ĝ) − x̂·mean(ĝ ⊙ x̂))`,
    /// `∂γ = Σ_rows g ⊙ x̂`, `∂β = Σ_rows g`.
    fn dense_layer_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        g: FloatTensor<Self>,
        eps: f64,
    ) -> [FloatTensor<Self>; 3] {
        composed::layer_norm_backward::<Self>(x, gamma, g, eps)
    }

    /// `x·r ⊙ w`, `r = 1/√(mean(x²) + ε)` over the last dimension (T5LayerNorm, LlamaRMSNorm).
    fn dense_rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        composed::rms_norm::<Self>(x, w, eps)
    }

    /// Gradients of [`DenseBackend::dense_rms_norm`]: `(∂x, ∂w)`, with `ĝ = g ⊙ w`:
    /// `∂x = r·ĝ − x·r³·mean(ĝ ⊙ x)`, `∂w = Σ_rows g ⊙ x·r`.
    fn dense_rms_norm_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        g: FloatTensor<Self>,
        eps: f64,
    ) -> [FloatTensor<Self>; 2] {
        composed::rms_norm_backward::<Self>(x, w, g, eps)
    }

    /// An activation, elementwise.
    fn dense_activation(x: FloatTensor<Self>, act: Activation) -> FloatTensor<Self> {
        composed::flat::<Self>(x, |x: Tensor<Self, 1>| composed::activate(x, act))
    }

    /// `∂L/∂x = g ⊙ act'(x)`.
    fn dense_activation_backward(
        x: FloatTensor<Self>,
        g: FloatTensor<Self>,
        act: Activation,
    ) -> FloatTensor<Self> {
        composed::flat2::<Self>(x, g, |x, g| g * composed::derivative(x, act))
    }
}

/// An autodiff backend over a [`DenseBackend`], itself dense (training: the student runs on
/// `B`, the teacher and validation on `B::InnerBackend`).
pub trait AutodiffDenseBackend: AutodiffBackend<InnerBackend: DenseBackend> + DenseBackend {}

impl<B> AutodiffDenseBackend for B
where
    B: AutodiffBackend + DenseBackend,
    B::InnerBackend: DenseBackend,
{
}

#[cfg(feature = "ndarray")]
impl DenseBackend for burn::backend::NdArray {}
#[cfg(feature = "wgpu")]
impl DenseBackend for burn::backend::Wgpu {}
#[cfg(feature = "cuda")]
impl DenseBackend for burn::backend::Cuda {}

fn float<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

fn tensor<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// `x·W + b` over the last dimension of `x`.
pub fn linear<B: DenseBackend, const D: usize>(
    x: Tensor<B, D>,
    w: Tensor<B, 2>,
    b: Option<Tensor<B, 1>>,
) -> Tensor<B, D> {
    tensor(B::dense_linear(float(x), float(w), b.map(float)))
}

/// SparseLoRA's student weight `(W + s·A·B) ⊙ ¬pruned`.
pub fn lora_weight<B: DenseBackend>(
    w: Tensor<B, 2>,
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
    pruned: Option<Tensor<B, 2, Bool>>,
    scale: f64,
) -> Tensor<B, 2> {
    tensor(B::dense_lora_weight(
        float(w),
        float(a),
        float(b),
        pruned.map(|p| p.into_primitive()),
        scale,
    ))
}

/// Scaled dot-product attention `softmax(q·kᵀ·scale + bias)·v` over `[B, H, L, dh]` inputs;
/// `bias` broadcasts over `[B or 1, H or 1, Lq or 1, Lk]` (position bias and/or key mask).
pub fn attention<B: DenseBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    scale: Option<f64>,
    bias: Option<Tensor<B, 4>>,
) -> Tensor<B, 4> {
    let (out, _) = B::dense_attention(float(q), float(k), float(v), bias.map(float), scale, false);
    tensor(out)
}

/// `softmax` over the last dimension.
pub fn softmax<B: DenseBackend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    tensor(B::dense_softmax(float(x)))
}

/// Layer norm over the last dimension with scale `gamma` and optional shift `beta`.
pub fn layer_norm<B: DenseBackend, const D: usize>(
    x: Tensor<B, D>,
    gamma: Tensor<B, 1>,
    beta: Option<Tensor<B, 1>>,
    eps: f64,
) -> Tensor<B, D> {
    tensor(B::dense_layer_norm(
        float(x),
        float(gamma),
        beta.map(float),
        eps,
    ))
}

/// RMS norm over the last dimension with scale `w`.
pub fn rms_norm<B: DenseBackend, const D: usize>(
    x: Tensor<B, D>,
    w: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    tensor(B::dense_rms_norm(float(x), float(w), eps))
}

/// An activation, elementwise.
pub fn activate<B: DenseBackend, const D: usize>(x: Tensor<B, D>, act: Activation) -> Tensor<B, D> {
    tensor(B::dense_activation(float(x), act))
}

/// The default bodies: burn's tensor ops on a 2-D (rows × last dimension) or 1-D view.
pub(crate) mod composed {
    use super::*;

    fn shape<B: Backend>(t: &FloatTensor<B>) -> Vec<usize> {
        use burn::tensor::TensorMetadata;
        t.shape().to_vec()
    }

    fn as_rows<B: Backend>(x: FloatTensor<B>) -> (Tensor<B, 2>, Vec<usize>) {
        let dims = shape::<B>(&x);
        let d = dims.last().copied().unwrap_or(1);
        let n: usize = dims.iter().product();
        let rows = n.checked_div(d).unwrap_or(0);
        (tensor::<B, 1>(x).reshape([n]).reshape([rows, d]), dims)
    }

    fn back<B: Backend, const D: usize>(t: Tensor<B, D>, dims: &[usize]) -> FloatTensor<B> {
        let n: usize = dims.iter().product();
        B::float_reshape(float(t.reshape([n])), dims.into())
    }

    /// `f` on `x` viewed as rows of its last dimension.
    pub fn rows<B: Backend>(
        x: FloatTensor<B>,
        f: impl FnOnce(Tensor<B, 2>) -> Tensor<B, 2>,
    ) -> FloatTensor<B> {
        let (x, dims) = as_rows(x);
        back(f(x), &dims)
    }

    pub fn rows2<B: Backend>(
        x: FloatTensor<B>,
        y: FloatTensor<B>,
        f: impl FnOnce(Tensor<B, 2>, Tensor<B, 2>) -> Tensor<B, 2>,
    ) -> FloatTensor<B> {
        let (x, dims) = as_rows(x);
        let (y, _) = as_rows(y);
        back(f(x, y), &dims)
    }

    pub fn flat<B: Backend>(
        x: FloatTensor<B>,
        f: impl FnOnce(Tensor<B, 1>) -> Tensor<B, 1>,
    ) -> FloatTensor<B> {
        let dims = shape::<B>(&x);
        let n: usize = dims.iter().product();
        back(f(tensor::<B, 1>(x).reshape([n])), &dims)
    }

    pub fn flat2<B: Backend>(
        x: FloatTensor<B>,
        y: FloatTensor<B>,
        f: impl FnOnce(Tensor<B, 1>, Tensor<B, 1>) -> Tensor<B, 1>,
    ) -> FloatTensor<B> {
        let dims = shape::<B>(&x);
        let n: usize = dims.iter().product();
        let x = tensor::<B, 1>(x).reshape([n]);
        let y = tensor::<B, 1>(y).reshape([n]);
        back(f(x, y), &dims)
    }

    pub fn activate<B: Backend>(x: Tensor<B, 1>, act: Activation) -> Tensor<B, 1> {
        match act {
            Activation::Gelu => activation::gelu(x),
            Activation::GeluTanh => activation::gelu_approximate(x),
            Activation::Relu => activation::relu(x),
            Activation::Silu => activation::silu(x),
            Activation::QuickGelu => x.clone() * activation::sigmoid(x.mul_scalar(1.702)),
        }
    }

    /// `act'(x)`.
    pub fn derivative<B: Backend>(x: Tensor<B, 1>, act: Activation) -> Tensor<B, 1> {
        match act {
            // Φ(x) + x·φ(x)
            Activation::Gelu => {
                let cdf = x
                    .clone()
                    .div_scalar(std::f64::consts::SQRT_2)
                    .erf()
                    .add_scalar(1.0)
                    .mul_scalar(0.5);
                let pdf = x
                    .clone()
                    .powi_scalar(2)
                    .mul_scalar(-0.5)
                    .exp()
                    .mul_scalar(1.0 / (2.0 * std::f64::consts::PI).sqrt());
                cdf + x * pdf
            }
            // y = ½x(1 + tanh(u)), u = c(x + 0.044715x³):
            // y' = ½(1 + t) + ½x(1 − t²)·c(1 + 3·0.044715x²)
            Activation::GeluTanh => {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                let x2 = x.clone().powi_scalar(2);
                let u = (x.clone() + x.clone() * x2.clone().mul_scalar(0.044715)).mul_scalar(c);
                let t = u.tanh();
                let du = x2.mul_scalar(3.0 * 0.044715).add_scalar(1.0).mul_scalar(c);
                let left = t.clone().add_scalar(1.0).mul_scalar(0.5);
                let right = x.mul_scalar(0.5) * t.powi_scalar(2).neg().add_scalar(1.0) * du;
                left + right
            }
            Activation::Relu => x.greater_elem(0.0).float(),
            // σ(x)·(1 + x·(1 − σ(x)))
            Activation::Silu => {
                let s = activation::sigmoid(x.clone());
                s.clone() * (x * s.neg().add_scalar(1.0)).add_scalar(1.0)
            }
            // σ(ax)·(1 + ax·(1 − σ(ax))), a = 1.702
            Activation::QuickGelu => {
                let ax = x.mul_scalar(1.702);
                let s = activation::sigmoid(ax.clone());
                s.clone() * (ax * s.neg().add_scalar(1.0)).add_scalar(1.0)
            }
        }
    }

    /// The attention output and its probabilities `P`.
    pub fn attention<B: Backend>(
        q: FloatTensor<B>,
        k: FloatTensor<B>,
        v: FloatTensor<B>,
        bias: Option<FloatTensor<B>>,
        scale: Option<f64>,
    ) -> (FloatTensor<B>, FloatTensor<B>) {
        let (q, k, v) = (tensor::<B, 4>(q), tensor::<B, 4>(k), tensor::<B, 4>(v));
        let mut scores = q.matmul(k.swap_dims(2, 3));
        if let Some(s) = scale {
            scores = scores.mul_scalar(s);
        }
        if let Some(bias) = bias {
            scores = scores + tensor::<B, 4>(bias);
        }
        let p = activation::softmax(scores, 3);
        (float(p.clone().matmul(v)), float(p))
    }

    pub fn attention_backward<B: Backend>(
        q: FloatTensor<B>,
        k: FloatTensor<B>,
        v: FloatTensor<B>,
        p: FloatTensor<B>,
        g: FloatTensor<B>,
        scale: Option<f64>,
        bias_shape: Option<Vec<usize>>,
    ) -> (
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        Option<FloatTensor<B>>,
    ) {
        let (q, k, v) = (tensor::<B, 4>(q), tensor::<B, 4>(k), tensor::<B, 4>(v));
        let (p, g) = (tensor::<B, 4>(p), tensor::<B, 4>(g));
        let dv = p.clone().swap_dims(2, 3).matmul(g.clone());
        let dp = g.matmul(v.swap_dims(2, 3));
        let dot = (dp.clone() * p.clone()).sum_dim(3);
        let ds = p * (dp - dot);
        let dbias = bias_shape.map(|shape| {
            let mut d = ds.clone();
            for (dim, &n) in shape.iter().enumerate() {
                if n == 1 && d.dims()[dim] != 1 {
                    d = d.sum_dim(dim);
                }
            }
            float(d)
        });
        let ds = match scale {
            Some(s) => ds.mul_scalar(s),
            None => ds,
        };
        let dq = ds.clone().matmul(k);
        let dk = ds.swap_dims(2, 3).matmul(q);
        (float(dq), float(dk), float(dv), dbias)
    }

    pub fn layer_norm<B: Backend>(
        x: FloatTensor<B>,
        gamma: FloatTensor<B>,
        beta: Option<FloatTensor<B>>,
        eps: f64,
    ) -> FloatTensor<B> {
        let (x, dims) = as_rows(x);
        let (var, mean) = x.clone().var_mean_bias(1);
        let y = (x - mean).div(var.add_scalar(eps).sqrt()) * tensor::<B, 1>(gamma).unsqueeze();
        let y = match beta {
            Some(b) => y + tensor::<B, 1>(b).unsqueeze(),
            None => y,
        };
        back(y, &dims)
    }

    pub fn layer_norm_backward<B: Backend>(
        x: FloatTensor<B>,
        gamma: FloatTensor<B>,
        g: FloatTensor<B>,
        eps: f64,
    ) -> [FloatTensor<B>; 3] {
        let (x, dims) = as_rows(x);
        let (g, _) = as_rows(g);
        let (var, mean) = x.clone().var_mean_bias(1);
        let r = var.add_scalar(eps).sqrt().recip();
        let xhat = (x - mean) * r.clone();
        let gh = g.clone() * tensor::<B, 1>(gamma).unsqueeze();
        let dx =
            (gh.clone() - gh.clone().mean_dim(1) - xhat.clone() * (gh * xhat.clone()).mean_dim(1))
                * r;
        let dgamma = (g.clone() * xhat).sum_dim(0).squeeze_dim::<1>(0);
        let dbeta = g.sum_dim(0).squeeze_dim::<1>(0);
        [back(dx, &dims), float(dgamma), float(dbeta)]
    }

    pub fn rms_norm<B: Backend>(x: FloatTensor<B>, w: FloatTensor<B>, eps: f64) -> FloatTensor<B> {
        let (x, dims) = as_rows(x);
        let ms = x.clone().powi_scalar(2).mean_dim(1);
        let y = x.div(ms.add_scalar(eps).sqrt()) * tensor::<B, 1>(w).unsqueeze();
        back(y, &dims)
    }

    pub fn rms_norm_backward<B: Backend>(
        x: FloatTensor<B>,
        w: FloatTensor<B>,
        g: FloatTensor<B>,
        eps: f64,
    ) -> [FloatTensor<B>; 2] {
        let (x, dims) = as_rows(x);
        let (g, _) = as_rows(g);
        let r = x
            .clone()
            .powi_scalar(2)
            .mean_dim(1)
            .add_scalar(eps)
            .sqrt()
            .recip();
        let gh = g.clone() * tensor::<B, 1>(w).unsqueeze();
        let dot = (gh.clone() * x.clone()).mean_dim(1);
        let dx = gh * r.clone() - x.clone() * (r.clone().powi_scalar(3) * dot);
        let dw = (g * x * r).sum_dim(0).squeeze_dim::<1>(0);
        [back(dx, &dims), float(dw)]
    }
}
