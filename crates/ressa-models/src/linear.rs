//! The models' linear layer: burn's `Linear` (weight `[d_in, d_out]`, `y = x·W + b`) plus an
//! optional low-rank adapter slot, so RESSA can repair a pruned model in place (burn 0.21 has no
//! reparameterization hook).
//!
//! SparseLoRA (RESSA, reference notes §8): for dense weight `W`, keep mask `M`, adapters
//! `A ∈ R^{d_in×r}`, `B ∈ R^{r×d_out}` and `s = α/r`, the student computes
//! `y = x·((W + s·A·B) ⊙ M) + b`; the teacher (dense path) computes `y = x·W + b` from the same
//! `W`, so no second copy of the weights exists. `B` starts at zero, so the student starts as
//! the pruned model. With `G = xᵀ·∂L/∂y`: `∂L/∂A = s·(G ⊙ M)·Bᵀ`, `∂L/∂B = s·Aᵀ·(G ⊙ M)`; `W`
//! and `M` are frozen. Without a mask the adapter is plain LoRA (the Q-Former's in the paper).
//! [`Linear::merge`] folds the update into the weight as `W' = (W + s·A·B) ⊙ M`, so the merged
//! model has exactly the mask's non-zeros (the reference's `merge()` does not re-zero).
//!
//! Sparse inference ([`Linear::pack`]): a pruned layer can also hold a host copy of `W ⊙ M`
//! (and `b`) packed by `ressa_sparse::SparseLinear`, which [`Linear::forward`] then runs instead
//! of burn's dense matmul. Inference only: the packed copy is not a parameter, is not saved, and
//! is dropped by [`Linear::merge`]; code that rewrites `weight` otherwise must call
//! [`Linear::unpack`] (or `pack` again).

use std::sync::Arc;

use crate::ops::{self, DenseBackend};
use burn::module::{Module, Param, ParamId};
use burn::prelude::*;
use burn::tensor::Distribution;
use ressa_sparse::{KernelKind, Mask, SparseError, SparseLinear, SparsityPattern, is_n_m};

/// A linear layer with an optional (Sparse)LoRA adapter.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// `W` [d_in, d_out] (the transpose of PyTorch's `weight`); the teacher's weight.
    pub weight: Param<Tensor<B, 2>>,
    pub bias: Option<Param<Tensor<B, 1>>>,
    pub adapter: Option<LoraAdapter<B>>,
    /// Host-packed `W ⊙ M` and `b` for the sparse CPU kernels ([`Linear::pack`]); not a
    /// parameter, not persistent.
    #[module(skip)]
    pub packed: Option<PackedWeight>,
    /// The HF module name (`….q`; the weight is `{key}.weight`), set at load. Calibration taps,
    /// masks and reports name the layer by it.
    #[module(skip)]
    pub key: Arc<str>,
}

const RELEASED: &str =
    "linear: the dense weight was released for sparse inference (Linear::release_dense)";

/// A [`SparseLinear`] shared between clones of a layer (its `Debug` prints only the kernel and
/// shape, so printing a model does not dump the weights).
#[derive(Clone)]
pub struct PackedWeight(pub Arc<SparseLinear>);

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (d_in, d_out) = self.0.shape();
        write!(f, "{:?} [{d_in}, {d_out}]", self.0.kind())
    }
}

/// The low-rank update of one [`Linear`].
#[derive(Module, Debug)]
pub struct LoraAdapter<B: Backend> {
    /// `A` [d_in, r] (PEFT's `lora_A.weight` transposed).
    pub lora_a: Param<Tensor<B, 2>>,
    /// `B` [r, d_out] (PEFT's `lora_B.weight` transposed).
    pub lora_b: Param<Tensor<B, 2>>,
    /// Pruned entries (`true` = pruned, i.e. `¬M`), [d_in, d_out]; `None` = plain LoRA.
    pub pruned: Option<Param<Tensor<B, 2, Bool>>>,
    /// The pruned model's kept values when they differ from `W` (SparseGPT rewrites them);
    /// `None` = the student starts from `W ⊙ M`.
    pub student_weight: Option<Param<Tensor<B, 2>>>,
    /// `s = α / r`.
    pub scale: f64,
}

impl<B: Backend> From<burn::nn::Linear<B>> for Linear<B> {
    fn from(l: burn::nn::Linear<B>) -> Self {
        Self {
            weight: l.weight,
            bias: l.bias,
            adapter: None,
            packed: None,
            key: "".into(),
        }
    }
}

impl<B: Backend> Linear<B> {
    /// A plain linear from its weight [d_in, d_out] and bias.
    pub fn new(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Self {
        Self {
            weight: Param::from_tensor(weight),
            bias: bias.map(Param::from_tensor),
            adapter: None,
            packed: None,
            key: "".into(),
        }
    }

    /// The same layer named `key` (its HF module name).
    pub fn with_key(mut self, key: impl Into<Arc<str>>) -> Self {
        self.key = key.into();
        self
    }

    /// Replaces `W` (e.g. by its pruned values), keeping the parameter's id, so the layer keeps
    /// its place in checkpoints and its HF key; drops a packed copy.
    pub fn set_weight(&mut self, weight: Tensor<B, 2>) {
        self.packed = None;
        let require_grad = self.weight.val().is_require_grad();
        self.weight = Param::initialized(self.weight.id, weight).set_require_grad(require_grad);
    }

    /// `[d_in, d_out]`.
    pub fn dims(&self) -> [usize; 2] {
        match &self.packed {
            Some(p) if self.dense_released() => {
                let (d_in, d_out) = p.0.shape();
                [d_in, d_out]
            }
            _ => self.weight.dims(),
        }
    }

    /// Whether burn's copy of the weight was freed ([`Linear::release_dense`]).
    pub fn dense_released(&self) -> bool {
        self.packed.is_some() && self.weight.dims() == [0, 0]
    }

    /// Frees burn's dense copy of a packed weight, so sparse inference holds the packed form
    /// only. Inference only and final: the layer keeps its packed kernel ([`Linear::unpack`]
    /// is then a no-op), and the dense-weight paths (`effective_weight`, `forward_dense`,
    /// `merge`, saving) must not be used on it. Returns whether anything was freed.
    pub fn release_dense(&mut self) -> bool {
        if self.packed.is_none() || self.dense_released() {
            return false;
        }
        let device = self.weight.device();
        self.weight = Param::initialized(self.weight.id, Tensor::zeros([0, 0], &device))
            .set_require_grad(false);
        true
    }

    /// The weight the forward pass uses: `W`, or with an adapter `(W + s·A·B) ⊙ M`.
    pub fn effective_weight(&self) -> Tensor<B, 2> {
        assert!(!self.dense_released(), "{RELEASED}");
        match &self.adapter {
            None => self.weight.val(),
            Some(a) => a.effective_weight(&self.weight),
        }
    }

    /// Folds the adapter into the weight: `W ← (W + s·A·B) ⊙ M` (exactly the mask's zeros)
    /// and drops it. The result is detached (a frozen plain weight).
    pub fn merge(&mut self) {
        if let Some(a) = self.adapter.take() {
            assert!(!self.dense_released(), "{RELEASED}");
            self.packed = None;
            let merged = a.effective_weight(&self.weight).detach();
            self.weight = Param::initialized(self.weight.id, merged).set_require_grad(false);
        }
    }

    /// Packs `W ⊙ M` (`M` = the non-zeros of `W`) and `b` into a host [`SparseLinear`] that
    /// [`Linear::forward`] uses from now on, the kernel (CSR, bitmask, N:M or dense) chosen by
    /// `ressa_sparse`'s measured cost model for calls of `rows` rows (tokens × sequences).
    /// 2:4 and 4:8 masks are recognised as N:M. Returns the kernel and the zero count, or
    /// `None` (and packs nothing) when `W` has no zeros or an adapter is attached. Reads the
    /// weight to the host.
    pub fn pack(&mut self, rows: usize) -> Result<Option<(KernelKind, usize)>, SparseError> {
        if self.dense_released() {
            return Err(SparseError::InvalidFormat {
                format: "linear",
                field: "weight",
                message: "the dense weight was released; it cannot be packed again".into(),
            });
        }
        self.packed = None;
        if self.adapter.is_some() {
            return Ok(None);
        }
        let [d_in, d_out] = self.dims();
        let w = host_f32(self.weight.val());
        let keep: Vec<bool> = w.iter().map(|v| *v != 0.0).collect();
        let zeros = keep.iter().filter(|k| !**k).count();
        if zeros == 0 {
            return Ok(None);
        }
        let mask = Mask::from_bools(d_in, d_out, &keep)?;
        // 2:4 and 4:8 prune exactly half
        let pattern = [(2, 4), (4, 8)]
            .into_iter()
            .filter(|_| 2 * zeros == d_in * d_out)
            .find(|&(n, m)| is_n_m(&mask, n, m))
            .map_or(Ok(SparsityPattern::Unstructured), |(n, m)| {
                SparsityPattern::n_m(n, m)
            })?;
        let bias = self.bias.as_ref().map(|b| host_f32(b.val()));
        let packed = SparseLinear::new(&w, &mask, pattern, bias, rows.max(1))?;
        let kind = packed.kind();
        self.packed = Some(PackedWeight(Arc::new(packed)));
        Ok(Some((kind, zeros)))
    }

    /// Drops the packed weight: burn's dense matmul again (not after [`Linear::release_dense`]:
    /// then the layer stays packed).
    pub fn unpack(&mut self) {
        if !self.dense_released() {
            self.packed = None;
        }
    }

    /// The packed kernel in use, if any.
    pub fn packed_kind(&self) -> Option<KernelKind> {
        self.packed.as_ref().map(|p| p.0.kind())
    }
}

impl<B: DenseBackend> Linear<B> {
    /// `x·W_eff + b` over the last dimension; with a packed weight and no adapter, by the
    /// packed host kernel ([`Linear::pack`]).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        if let (Some(packed), None) = (&self.packed, &self.adapter) {
            return forward_packed(&packed.0, x);
        }
        assert!(!self.dense_released(), "{RELEASED}");
        let weight = match &self.adapter {
            None => self.weight.val(),
            Some(a) => a.fused_weight(&self.weight),
        };
        ops::linear(x, weight, self.bias.as_ref().map(|b| b.val()))
    }

    /// The dense path (teacher): `x·W + b`, no mask, no adapter.
    pub fn forward_dense<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        assert!(!self.dense_released(), "{RELEASED}");
        ops::linear(x, self.weight.val(), self.bias.as_ref().map(|b| b.val()))
    }
}

/// A tensor's values as host `f32`, row-major.
fn host_f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("converted to f32")
}

/// `x·W + b` by a packed host kernel: `x` is flattened to `[tokens, d_in]` host `f32`, multiplied
/// on the CPU, and the result uploaded back in `x`'s shape, dtype and device.
///
/// Why a host round trip: burn 0.21 has no hook to register a custom CPU op on its backends
/// that we could use from generic model code, so the kernel runs on a host copy of `x`. That is
/// cheap where it matters: at decode `x` is a handful of rows (a few KiB) while the weight, the
/// bulk of the traffic, stays packed on the host and is read once per call. Meant for the CPU
/// backends (flex, ndarray), where "host" and "device" are the same memory.
fn forward_packed<B: Backend, const D: usize>(
    packed: &SparseLinear,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    let dims = x.dims();
    let (d_in, d_out) = packed.shape();
    assert_eq!(
        dims[D - 1],
        d_in,
        "linear: input has {} features, the packed weight expects {d_in}",
        dims[D - 1]
    );
    let tokens: usize = dims[..D - 1].iter().product();
    let (device, dtype) = (x.device(), x.dtype());
    let y = packed
        .forward(&host_f32(x), tokens)
        .expect("operand sizes checked above");
    let mut shape = dims;
    shape[D - 1] = d_out;
    Tensor::from_data(TensorData::new(y, shape), (&device, dtype))
}

/// Rank and scale of one adapter.
#[derive(Config, Debug)]
pub struct LoraConfig {
    /// `r`.
    pub rank: usize,
    /// `α`; the update is scaled by `α / r`.
    #[config(default = 16.0)]
    pub alpha: f64,
}

impl LoraConfig {
    /// An adapter for a `[d_in, d_out]` weight: `A ~ U(±1/√d_in)` (PEFT's Kaiming-uniform with
    /// a = √5), `B = 0`, trainable. `keep` (row-major `[d_in, d_out]`, `true` = keep) makes it
    /// SparseLoRA; `None` plain LoRA.
    pub fn init<B: Backend>(
        &self,
        d_in: usize,
        d_out: usize,
        keep: Option<&[bool]>,
        device: &B::Device,
    ) -> LoraAdapter<B> {
        assert!(self.rank > 0, "LoRA rank must be at least 1");
        let bound = 1.0 / (d_in as f64).sqrt();
        let pruned = keep.map(|keep| {
            assert_eq!(keep.len(), d_in * d_out, "mask size must match the weight");
            let pruned: Vec<bool> = keep.iter().map(|k| !k).collect();
            Param::initialized(
                ParamId::new(),
                Tensor::<B, 2, Bool>::from_data(TensorData::new(pruned, [d_in, d_out]), device),
            )
        });
        LoraAdapter {
            lora_a: Param::from_tensor(Tensor::random(
                [d_in, self.rank],
                Distribution::Uniform(-bound, bound),
                device,
            )),
            lora_b: Param::from_tensor(Tensor::zeros([self.rank, d_out], device)),
            pruned,
            student_weight: None,
            scale: self.alpha / self.rank as f64,
        }
    }
}

impl<B: Backend> LoraAdapter<B> {
    /// `r`.
    pub fn rank(&self) -> usize {
        self.lora_a.dims()[1]
    }

    /// `(W_s + s·A·B) ⊙ M`, with `W_s` the student's base (`W` unless the pruner rewrote it).
    pub fn effective_weight(&self, weight: &Param<Tensor<B, 2>>) -> Tensor<B, 2> {
        let base = match &self.student_weight {
            Some(w) => w.val(),
            None => weight.val(),
        };
        let update = self
            .lora_a
            .val()
            .matmul(self.lora_b.val())
            .mul_scalar(self.scale);
        let w = base + update;
        match &self.pruned {
            Some(p) => w.mask_fill(p.val(), 0.0),
            None => w,
        }
    }

    /// [`LoraAdapter::effective_weight`] as one fused op ([`ops::lora_weight`]; the forward
    /// pass's path).
    pub fn fused_weight(&self, weight: &Param<Tensor<B, 2>>) -> Tensor<B, 2>
    where
        B: DenseBackend,
    {
        let base = match &self.student_weight {
            Some(w) => w.val(),
            None => weight.val(),
        };
        ops::lora_weight(
            base,
            self.lora_a.val(),
            self.lora_b.val(),
            self.pruned.as_ref().map(|p| p.val()),
            self.scale,
        )
    }

    /// Replaces the adapter tensors, keeping their parameter ids (checkpoint restore: the
    /// optimizer state is keyed by them).
    pub fn with_values(
        mut self,
        a: Tensor<B, 2>,
        b: Tensor<B, 2>,
        ids: (ParamId, ParamId),
    ) -> Self {
        self.lora_a = Param::initialized(ids.0, a);
        self.lora_b = Param::initialized(ids.1, b);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::optim::{AdamConfig, GradientsParams, Optimizer};

    type B = Flex;
    type AD = Autodiff<Flex>;

    /// Keep masks of the three pattern kinds, row-major [d_in, d_out].
    fn keep(d_in: usize, d_out: usize, kind: &str) -> Vec<bool> {
        let mut out = Vec::with_capacity(d_in * d_out);
        for i in 0..d_in {
            for j in 0..d_out {
                out.push(match kind {
                    "2:4" => (i + 3 * j) % 4 >= 2,
                    "4:8" => (i + 5 * j) % 8 >= 4,
                    _ => (i * 7 + j * 13) % 10 >= 7,
                });
            }
        }
        out
    }

    fn values<const D: usize, BB: Backend>(t: Tensor<BB, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
    }

    fn random_linear<BB: Backend>(d_in: usize, d_out: usize, device: &BB::Device) -> Linear<BB> {
        Linear::new(
            Tensor::random([d_in, d_out], Distribution::Normal(0.0, 0.2), device),
            Some(Tensor::random(
                [d_out],
                Distribution::Normal(0.0, 0.2),
                device,
            )),
        )
    }

    #[test]
    fn starts_as_the_pruned_linear_and_the_dense_path_is_the_teacher() {
        let device = Default::default();
        let mut l = random_linear::<B>(16, 12, &device);
        let w = l.weight.val();
        let k = keep(16, 12, "unstructured");
        l.adapter = Some(LoraConfig::new(4).init(16, 12, Some(&k), &device));
        let m = Tensor::<B, 2>::from_data(
            TensorData::new(k.iter().map(|&b| b as u8 as f32).collect(), [16, 12]),
            &device,
        );
        let x = Tensor::<B, 3>::random([2, 5, 16], Distribution::Normal(0.0, 1.0), &device);
        let bias = l.bias.as_ref().unwrap().val().unsqueeze::<3>();
        let pruned = x.clone().matmul((w.clone() * m).unsqueeze()) + bias.clone();
        let dense = x.clone().matmul(w.unsqueeze()) + bias;
        let d1: f32 = (l.forward(x.clone()) - pruned).abs().max().into_scalar();
        let d2: f32 = (l.forward_dense(x) - dense).abs().max().into_scalar();
        assert!(d1 < 1e-6 && d2 < 1e-6, "{d1} {d2}");
    }

    /// `W ⊙ M` of a random linear: the pruned model's layer.
    fn pruned_linear<BB: Backend>(
        d_in: usize,
        d_out: usize,
        kind: &str,
        device: &BB::Device,
    ) -> Linear<BB> {
        let l = random_linear::<BB>(d_in, d_out, device);
        let m = keep(d_in, d_out, kind);
        let m = Tensor::<BB, 2>::from_data(
            TensorData::new(m.iter().map(|&b| b as u8 as f32).collect(), [d_in, d_out]),
            device,
        );
        Linear::new(l.weight.val() * m, l.bias.map(|b| b.val()))
    }

    /// Packed and burn paths agree to 1e-5 of `Σ_i |x_i·W_ij| + |b_j|` (the size of the terms
    /// summed; the kernels add in another order) on ragged shapes, 1 / 3 / 8 tokens, 2-D and
    /// 3-D inputs, 2:4 and 70 % unstructured masks.
    #[test]
    fn packed_kernels_match_the_burn_path() {
        let device = Default::default();
        let mut kinds = std::collections::HashSet::new();
        for (d_in, d_out, kind) in [
            (36, 37, "2:4"),
            (132, 65, "2:4"),
            (45, 29, "unstructured"),
            (131, 97, "unstructured"),
        ] {
            let dense_path = pruned_linear::<B>(d_in, d_out, kind, &device);
            for tokens in [1, 3, 8] {
                let mut packed = dense_path.clone();
                let (k, zeros) = packed.pack(tokens).unwrap().expect("pruned weight packs");
                kinds.insert(k);
                let want_zeros = keep(d_in, d_out, kind).iter().filter(|k| !**k).count();
                assert_eq!(zeros, want_zeros);
                assert_eq!(packed.packed_kind(), Some(k));
                let x =
                    Tensor::<B, 2>::random([tokens, d_in], Distribution::Normal(0.0, 1.0), &device);
                let scale = x.clone().abs().matmul(dense_path.weight.val().abs())
                    + dense_path
                        .bias
                        .as_ref()
                        .unwrap()
                        .val()
                        .abs()
                        .unsqueeze::<2>();
                let what = format!("{kind} {d_in}x{d_out}, {tokens} tokens, {k:?}");
                let check = |got: Vec<f32>, want: Vec<f32>| {
                    for ((g, w), s) in got.iter().zip(&want).zip(values(scale.clone())) {
                        assert!((g - w).abs() <= 1e-5 * s, "{what}: {g} vs {w} (scale {s})");
                    }
                };
                check(
                    values(packed.forward(x.clone())),
                    values(dense_path.forward(x.clone())),
                );
                // the same through a [2, tokens, d_in] input
                let x3 = Tensor::stack::<3>(vec![x.clone(), x.clone().neg()], 0);
                let y3 = packed.forward(x3.clone());
                assert_eq!(y3.dims(), [2, tokens, d_out]);
                let want3 = values(dense_path.forward(x3));
                let got3 = values(y3);
                let n = tokens * d_out;
                check(got3[..n].to_vec(), want3[..n].to_vec());
                check(got3[n..].to_vec(), want3[n..].to_vec());
            }
        }
        // the cost model picked sparse kernels for these (N:M for 2:4 at one token, CSR at 70 %)
        assert!(
            kinds.contains(&KernelKind::Nm) && kinds.contains(&KernelKind::Csr),
            "{kinds:?}"
        );
    }

    /// After `release_dense` the layer holds the packed form only: same outputs and dims, no
    /// dense tensor, and it cannot be unpacked or packed again.
    #[test]
    fn released_dense_weight_keeps_the_packed_forward() {
        let device = Default::default();
        let dense_path = pruned_linear::<B>(36, 37, "2:4", &device);
        let x = Tensor::<B, 2>::random([3, 36], Distribution::Normal(0.0, 1.0), &device);
        let mut l = dense_path.clone();
        assert!(!l.release_dense(), "nothing to release before packing");
        l.pack(3).unwrap().unwrap();
        let before = values(l.forward(x.clone()));
        assert!(l.release_dense());
        assert!(l.dense_released());
        assert_eq!(l.weight.dims(), [0, 0]);
        assert_eq!(l.dims(), [36, 37]);
        assert_eq!(values(l.forward(x.clone())), before);
        l.unpack();
        assert!(l.packed.is_some(), "a released layer stays packed");
        let err = l.pack(3).unwrap_err().to_string();
        assert!(err.contains("released"), "{err}");
        assert!(!l.release_dense(), "released once");
    }

    #[test]
    fn packing_skips_dense_weights_and_yields_to_adapters() {
        let device = Default::default();
        let mut dense = random_linear::<B>(16, 8, &device);
        assert_eq!(dense.pack(1).unwrap(), None);
        assert!(dense.packed.is_none());

        let mut l = pruned_linear::<B>(16, 8, "unstructured", &device);
        assert!(l.pack(1).unwrap().is_some());
        // an adapter takes over the forward pass; merging it drops the stale packed copy
        let k = keep(16, 8, "unstructured");
        let mut a = LoraConfig::new(2).init(16, 8, Some(&k), &device);
        a.lora_b = Param::from_tensor(Tensor::ones([2, 8], &device));
        l.adapter = Some(a);
        let x = Tensor::<B, 2>::random([3, 16], Distribution::Normal(0.0, 1.0), &device);
        let with_adapter = l.forward(x.clone());
        let expect = burn::tensor::module::linear(
            x.clone(),
            l.effective_weight(),
            l.bias.as_ref().map(|b| b.val()),
        );
        assert_eq!(values(with_adapter.clone()), values(expect));
        l.merge();
        assert!(l.packed.is_none());
        let diff: f32 = (l.forward(x) - with_adapter).abs().max().into_scalar();
        assert!(diff <= 1e-5, "{diff}");
    }

    #[test]
    fn merge_keeps_exactly_the_mask_nonzeros_and_the_outputs() {
        let device = Default::default();
        for kind in ["unstructured", "2:4", "4:8"] {
            let mut l = random_linear::<B>(32, 24, &device);
            let k = keep(32, 24, kind);
            let mut a = LoraConfig::new(8).init(32, 24, Some(&k), &device);
            // A trained-looking, non-zero update.
            a.lora_b = Param::from_tensor(Tensor::random(
                [8, 24],
                Distribution::Normal(0.0, 0.5),
                &device,
            ));
            l.adapter = Some(a);
            let x = Tensor::<B, 2>::random([7, 32], Distribution::Normal(0.0, 1.0), &device);
            let unmerged = l.forward(x.clone());
            l.merge();
            assert!(l.adapter.is_none());
            let nonzero: Vec<bool> = values(l.weight.val()).iter().map(|v| *v != 0.0).collect();
            assert_eq!(
                nonzero, k,
                "{kind}: merged zeros must be the pruned entries"
            );
            let diff: f32 = (unmerged - l.forward(x)).abs().max().into_scalar();
            assert!(diff <= 1e-5, "{kind}: merged vs unmerged {diff}");
        }
    }

    #[test]
    fn plain_lora_has_no_mask() {
        let device = Default::default();
        let mut l = random_linear::<B>(8, 6, &device);
        let mut a = LoraConfig::new(2).init(8, 6, None, &device);
        a.lora_b = Param::from_tensor(Tensor::ones([2, 6], &device));
        l.adapter = Some(a);
        let expect = l.weight.val()
            + l.adapter
                .as_ref()
                .unwrap()
                .lora_a
                .val()
                .matmul(Tensor::ones([2, 6], &device))
                .mul_scalar(8.0);
        let diff: f32 = (l.effective_weight() - expect).abs().max().into_scalar();
        assert!(diff < 1e-6, "{diff}");
    }

    #[test]
    fn gradients_flow_only_into_the_adapters() {
        let device = Default::default();
        let mut l = random_linear::<AD>(16, 8, &device).no_grad();
        let k = keep(16, 8, "2:4");
        l.adapter = Some(LoraConfig::new(4).init(16, 8, Some(&k), &device));
        let frozen = (
            values(l.weight.val()),
            values(l.bias.as_ref().unwrap().val()),
        );
        let mut optim = AdamConfig::new().init::<AD, Linear<AD>>();
        let x = Tensor::<AD, 2>::random([10, 16], Distribution::Normal(0.0, 1.0), &device);
        let target = Tensor::<AD, 2>::random([10, 8], Distribution::Normal(0.0, 1.0), &device);
        let mut losses = Vec::new();
        for _ in 0..5 {
            let loss = (l.forward(x.clone()) - target.clone())
                .powf_scalar(2.0)
                .mean();
            losses.push(loss.clone().into_scalar());
            let grads = loss.backward();
            assert!(
                l.weight.val().grad(&grads).is_none(),
                "W must get no gradient"
            );
            assert!(
                l.adapter
                    .as_ref()
                    .unwrap()
                    .lora_a
                    .val()
                    .grad(&grads)
                    .is_some()
            );
            let grads = GradientsParams::from_grads(grads, &l);
            l = optim.step(1e-2, l, grads);
        }
        assert_eq!(values(l.weight.val()), frozen.0);
        assert_eq!(values(l.bias.as_ref().unwrap().val()), frozen.1);
        let merged_zeros = {
            let mut m = l.clone();
            m.merge();
            values(m.weight.val())
                .iter()
                .map(|v| *v != 0.0)
                .collect::<Vec<_>>()
        };
        assert_eq!(merged_zeros, k);
        assert!(losses[4] < losses[0], "{losses:?}");
    }
}
