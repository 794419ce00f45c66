//! SparseLoRA (RESSA, reference notes §8): for a pruned linear with dense weight `W`
//! (burn `[d_in, d_out]`), keep mask `M`, adapters `A ∈ R^{d_in×r}`, `B ∈ R^{r×d_out}` and
//! `s = α/r`, the student computes `y = x·((W + s·A·B) ⊙ M) + b`; the teacher (dense path) computes
//! `y = x·W + b` from the same `W`, so no second copy of the weights exists. `B` starts at zero,
//! so the student starts as the pruned model. Only `A` and `B` require gradients:
//! `∂L/∂A = s·(G ⊙ M)·Bᵀ`, `∂L/∂B = s·Aᵀ·(G ⊙ M)` with `G = xᵀ·∂L/∂y`.
//! [`SparseLoraLinear::merge`] folds the update into a plain `Linear` with `W' = (W + s·A·B) ⊙ M`,
//! so the merged model has exactly the mask's non-zeros (the reference's `merge()` does not re-zero).

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::Distribution;
use ressa_sparse::Mask;

/// Rank and scale of the adapters.
#[derive(Config, Debug)]
pub struct SparseLoraConfig {
    /// Adapter rank `r`.
    pub rank: usize,
    /// `α`; the update is scaled by `α / r`.
    #[config(default = 16.0)]
    pub alpha: f64,
}

/// A pruned linear with a mask-preserving low-rank update.
#[derive(Module, Debug)]
pub struct SparseLoraLinear<B: Backend> {
    /// Dense weight `W` [d_in, d_out]; frozen, also the teacher's weight.
    pub weight: Param<Tensor<B, 2>>,
    /// Frozen bias.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// Keep mask `M` as 0/1 floats [d_in, d_out]; frozen.
    pub mask: Param<Tensor<B, 2>>,
    /// `A` [d_in, r], Kaiming-uniform like PEFT's `lora_A` (U(±1/√d_in)).
    pub lora_a: Param<Tensor<B, 2>>,
    /// `B` [r, d_out], zeros.
    pub lora_b: Param<Tensor<B, 2>>,
    pub scale: f64,
}

impl SparseLoraConfig {
    /// Wraps `linear` (dense weight) with `mask` (`true` = keep, burn orientation).
    pub fn init<B: Backend>(
        &self,
        linear: Linear<B>,
        mask: &Mask,
        device: &B::Device,
    ) -> SparseLoraLinear<B> {
        let [d_in, d_out] = linear.weight.dims();
        assert_eq!(
            mask.shape(),
            (d_in, d_out),
            "mask shape must match the weight"
        );
        assert!(self.rank > 0, "rank must be at least 1");
        let keep: Vec<f32> = mask
            .to_bools()
            .into_iter()
            .map(|k| if k { 1.0 } else { 0.0 })
            .collect();
        let mask = Tensor::<B, 2>::from_data(TensorData::new(keep, [d_in, d_out]), device);
        let bound = 1.0 / (d_in as f64).sqrt();
        SparseLoraLinear {
            weight: linear.weight.set_require_grad(false),
            bias: linear.bias.map(|b| b.set_require_grad(false)),
            mask: Param::from_tensor(mask).set_require_grad(false),
            lora_a: Param::from_tensor(Tensor::random(
                [d_in, self.rank],
                Distribution::Uniform(-bound, bound),
                device,
            )),
            lora_b: Param::from_tensor(Tensor::zeros([self.rank, d_out], device)),
            scale: self.alpha / self.rank as f64,
        }
    }
}

impl<B: Backend> SparseLoraLinear<B> {
    /// The student's effective weight `(W + s·A·B) ⊙ M`.
    pub fn effective_weight(&self) -> Tensor<B, 2> {
        let update = self
            .lora_a
            .val()
            .matmul(self.lora_b.val())
            .mul_scalar(self.scale);
        (self.weight.val() + update) * self.mask.val()
    }

    fn affine<const D: usize>(&self, x: Tensor<B, D>, w: Tensor<B, 2>) -> Tensor<B, D> {
        burn::tensor::module::linear(x, w, self.bias.as_ref().map(|b| b.val()))
    }

    /// Student (sparse path): `x·((W + s·A·B) ⊙ M) + b`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.affine(x, self.effective_weight())
    }

    /// Teacher (dense path): `x·W + b`, no mask, no adapters.
    pub fn forward_dense<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.affine(x, self.weight.val())
    }

    /// A plain `Linear` with `W' = (W + s·A·B) ⊙ M`: exactly the mask's zeros.
    pub fn merge(&self) -> Linear<B> {
        Linear {
            weight: Param::from_tensor(self.effective_weight().detach()),
            bias: self
                .bias
                .as_ref()
                .map(|b| Param::from_tensor(b.val().detach())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::module::AutodiffModule;
    use burn::nn::LinearConfig;
    use burn::optim::{AdamConfig, GradientsParams, Optimizer};
    use ressa_sparse::SparsityPattern;

    type B = Flex;
    type AD = Autodiff<Flex>;

    fn mask(d_in: usize, d_out: usize, pattern: SparsityPattern) -> Mask {
        match pattern {
            SparsityPattern::NM { n, m } => {
                Mask::from_fn(d_in, d_out, |i, j| (i + 3 * j) % m >= n).unwrap()
            }
            SparsityPattern::Unstructured => {
                Mask::from_fn(d_in, d_out, |i, j| (i * 7 + j * 13) % 10 >= 7).unwrap()
            }
        }
    }

    fn values<const D: usize, BB: Backend>(t: Tensor<BB, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
    }

    #[test]
    fn starts_as_the_pruned_linear_and_the_teacher_is_dense() {
        let device = Default::default();
        let linear = LinearConfig::new(16, 12).init::<B>(&device);
        let w = linear.weight.val();
        let m = mask(16, 12, SparsityPattern::Unstructured);
        let lora = SparseLoraConfig::new(4).init(linear, &m, &device);
        let x = Tensor::<B, 3>::random([2, 5, 16], Distribution::Normal(0.0, 1.0), &device);
        let pruned = x.clone().matmul((w.clone() * lora.mask.val()).unsqueeze())
            + lora.bias.as_ref().unwrap().val().unsqueeze();
        let dense = x.clone().matmul(w.unsqueeze()) + lora.bias.as_ref().unwrap().val().unsqueeze();
        let d1: f32 = (lora.forward(x.clone()) - pruned).abs().max().into_scalar();
        let d2: f32 = (lora.forward_dense(x) - dense).abs().max().into_scalar();
        assert!(d1 < 1e-6 && d2 < 1e-6, "{d1} {d2}");
    }

    #[test]
    fn merge_keeps_exactly_the_mask_nonzeros_and_the_outputs() {
        let device = Default::default();
        for pattern in [
            SparsityPattern::Unstructured,
            SparsityPattern::TWO_FOUR,
            SparsityPattern::NM { n: 4, m: 8 },
        ] {
            let linear = LinearConfig::new(32, 24).init::<B>(&device);
            let m = mask(32, 24, pattern);
            let mut lora = SparseLoraConfig::new(8).init(linear, &m, &device);
            // A trained-looking, non-zero update.
            lora.lora_b = Param::from_tensor(Tensor::random(
                [8, 24],
                Distribution::Normal(0.0, 0.5),
                &device,
            ));
            let merged = lora.merge();
            let w = values(merged.weight.val());
            let nonzero: Vec<bool> = w.iter().map(|v| *v != 0.0).collect();
            assert_eq!(
                nonzero,
                m.to_bools(),
                "{pattern}: merged zeros must be exactly the pruned entries"
            );
            if let SparsityPattern::NM { n, m: mm } = pattern {
                let merged_mask = Mask::from_bools(32, 24, &nonzero).unwrap();
                assert!(ressa_sparse::is_n_m(&merged_mask, n, mm));
            }
            let x = Tensor::<B, 2>::random([7, 32], Distribution::Normal(0.0, 1.0), &device);
            let diff: f32 = (lora.forward(x.clone()) - merged.forward(x))
                .abs()
                .max()
                .into_scalar();
            assert!(diff <= 1e-5, "{pattern}: merged vs unmerged {diff}");
        }
    }

    #[test]
    fn gradients_flow_only_into_the_adapters() {
        let device = Default::default();
        let linear = LinearConfig::new(16, 8).init::<AD>(&device);
        let m = mask(16, 8, SparsityPattern::TWO_FOUR);
        let mut lora = SparseLoraConfig::new(4).init(linear, &m, &device);
        let frozen = (
            values(lora.weight.val()),
            values(lora.bias.as_ref().unwrap().val()),
            values(lora.mask.val()),
        );
        let a0 = values(lora.lora_a.val());
        let mut optim = AdamConfig::new().init();
        let x = Tensor::<AD, 2>::random([10, 16], Distribution::Normal(0.0, 1.0), &device);
        let target = Tensor::<AD, 2>::random([10, 8], Distribution::Normal(0.0, 1.0), &device);
        let mut losses = Vec::new();
        for _ in 0..5 {
            let loss = (lora.forward(x.clone()) - target.clone())
                .powi_scalar(2)
                .mean();
            losses.push(values(loss.clone().inner())[0]);
            let grads = loss.backward();
            assert!(lora.weight.grad(&grads).is_none(), "W must get no gradient");
            assert!(lora.mask.grad(&grads).is_none(), "M must get no gradient");
            assert!(
                lora.bias.as_ref().unwrap().grad(&grads).is_none(),
                "b must get no gradient"
            );
            assert!(lora.lora_b.grad(&grads).is_some());
            let grads = GradientsParams::from_grads(grads, &lora);
            lora = optim.step(1e-2, lora, grads);
        }
        assert_eq!(values(lora.weight.val()), frozen.0, "W bit-identical");
        assert_eq!(
            values(lora.bias.as_ref().unwrap().val()),
            frozen.1,
            "b bit-identical"
        );
        assert_eq!(values(lora.mask.val()), frozen.2, "M bit-identical");
        assert_ne!(values(lora.lora_a.val()), a0, "A trains");
        assert!(losses.last().unwrap() < &losses[0], "{losses:?}");
        // The trained student still has exactly the pruned zeros after merging.
        let merged = lora.valid().merge();
        let nonzero: Vec<bool> = values(merged.weight.val())
            .iter()
            .map(|v| *v != 0.0)
            .collect();
        assert_eq!(nonzero, m.to_bools());
    }
}
