//! RESSA's objective (arXiv 2404.02424; reference notes §8): `(1 − λ)·CE + λ·KL(teacher ‖ student)`
//! on the decoder logits, the teacher being the dense path of the same weights.
//!
//! With `p = softmax(z / T)`, `KL = Σ_v p_T·(log p_T − log p_S)` per target position.
//! - [`KlReduction::TokenMean`] (default): padding masked, mean over target tokens, times `T²`
//!   (Hinton's scaling, which keeps the gradient size independent of `T`).
//! - [`KlReduction::Reference`]: the reference's `KLDivLoss(reduction="batchmean")` on
//!   log-softmax inputs: summed over **all** positions (padding included) and the vocabulary,
//!   divided by the batch size, no `T²`.
//!
//! CE is the token mean over target positions (the reference's pad labels are −100).

use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// How the KL term is reduced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KlReduction {
    #[default]
    TokenMean,
    Reference,
}

impl std::str::FromStr for KlReduction {
    type Err = TrainError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "token-mean" => Ok(Self::TokenMean),
            "reference" => Ok(Self::Reference),
            other => Err(TrainError::config(
                "kl_reduction",
                format!("kl_reduction `{other}`: expected token-mean or reference"),
            )),
        }
    }
}

/// Weights of the loss terms.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistillConfig {
    /// λ: weight of the KL term; CE gets `1 − λ`.
    pub lambda: f64,
    /// Softmax temperature `T` of both distributions in the KL term.
    pub temperature: f64,
    pub reduction: KlReduction,
}

impl Default for DistillConfig {
    fn default() -> Self {
        Self {
            lambda: 0.1,
            temperature: 1.0,
            reduction: KlReduction::TokenMean,
        }
    }
}

impl DistillConfig {
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.lambda) {
            return Err(TrainError::config(
                "lambda",
                format!("lambda {}: expected a value in [0, 1]", self.lambda),
            ));
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(TrainError::config(
                "temperature",
                format!(
                    "temperature {}: expected a positive number",
                    self.temperature
                ),
            ));
        }
        Ok(())
    }
}

/// The loss and its terms (scalars, shape [1]).
#[derive(Debug, Clone)]
pub struct LossParts<B: Backend> {
    pub loss: Tensor<B, 1>,
    pub ce: Tensor<B, 1>,
    pub kl: Tensor<B, 1>,
}

/// Token-mean cross-entropy of `logits` [B, T, V] against `targets` [B, T] where `mask` [B, T]
/// is 1 (padding positions may hold any valid id).
pub fn cross_entropy<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
    mask: Tensor<B, 2>,
) -> Tensor<B, 1> {
    let [b, t] = targets.dims();
    let logp = log_softmax(logits, 2)
        .gather(2, targets.reshape([b, t, 1]))
        .reshape([b, t]);
    let n = mask.clone().sum();
    (logp * mask).sum().neg() / n
}

/// `KL(teacher ‖ student)` per position [B, T] at temperature `T`.
fn kl_per_position<B: Backend>(
    student: Tensor<B, 3>,
    teacher: Tensor<B, 3>,
    temperature: f64,
) -> Tensor<B, 2> {
    let [b, t, _] = student.dims();
    let ls = log_softmax(student.div_scalar(temperature), 2);
    let lt = log_softmax(teacher.div_scalar(temperature), 2);
    (lt.clone().exp() * (lt - ls)).sum_dim(2).reshape([b, t])
}

/// The KL term as configured.
pub fn kl_divergence<B: Backend>(
    student: Tensor<B, 3>,
    teacher: Tensor<B, 3>,
    mask: Tensor<B, 2>,
    cfg: &DistillConfig,
) -> Tensor<B, 1> {
    let batch = student.dims()[0];
    let kl = kl_per_position(student, teacher, cfg.temperature);
    match cfg.reduction {
        KlReduction::TokenMean => {
            let n = mask.clone().sum();
            ((kl * mask).sum() / n).mul_scalar(cfg.temperature * cfg.temperature)
        }
        KlReduction::Reference => kl.sum().div_scalar(batch as f64),
    }
}

/// `(1 − λ)·CE(student, targets) + λ·KL(teacher ‖ student)`. `teacher` carries no gradient.
pub fn distill_loss<B: Backend>(
    student: Tensor<B, 3>,
    teacher: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
    mask: Tensor<B, 2>,
    cfg: &DistillConfig,
) -> LossParts<B> {
    let ce = cross_entropy(student.clone(), targets, mask.clone());
    let kl = kl_divergence(student, teacher.detach(), mask, cfg);
    let loss = ce.clone().mul_scalar(1.0 - cfg.lambda) + kl.clone().mul_scalar(cfg.lambda);
    LossParts { loss, ce, kl }
}

/// The loss terms as sums over one shard of a batch (data-parallel training): N shards'
/// sums, added, give the whole batch's, and [`DistillConfig::weights`] turns the batch's
/// totals into the same loss as [`distill_loss`] on the whole batch.
#[derive(Debug, Clone)]
pub struct LossSums<B: Backend> {
    /// `Σ −log p(target)` over the target tokens.
    pub ce: Tensor<B, 1>,
    /// `Σ KL` over the target tokens ([`KlReduction::TokenMean`], without `T²`) or over every
    /// position ([`KlReduction::Reference`]).
    pub kl: Tensor<B, 1>,
}

/// The sums behind [`distill_loss`] for one shard. `teacher` carries no gradient.
///
/// With [`KlReduction::Reference`], every position counts, padding included: a shard padded to
/// its own longest target sums fewer padding positions than the whole batch would (as the
/// reference's DDP, where each GPU pads and reduces its own batch).
pub fn distill_sums<B: Backend>(
    student: Tensor<B, 3>,
    teacher: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
    mask: Tensor<B, 2>,
    cfg: &DistillConfig,
) -> LossSums<B> {
    let [b, t] = targets.dims();
    let logp = log_softmax(student.clone(), 2)
        .gather(2, targets.reshape([b, t, 1]))
        .reshape([b, t]);
    let ce = (logp * mask.clone()).sum().neg();
    let kl = kl_per_position(student, teacher.detach(), cfg.temperature);
    let kl = match cfg.reduction {
        KlReduction::TokenMean => (kl * mask).sum(),
        KlReduction::Reference => kl.sum(),
    };
    LossSums { ce, kl }
}

impl DistillConfig {
    /// `(a, b)` such that `loss = a·Σce + b·Σkl` for a batch of `tokens` target tokens and
    /// `rows` rows (the sums of [`distill_sums`] over all its shards).
    pub fn weights(&self, tokens: f64, rows: f64) -> (f64, f64) {
        let a = (1.0 - self.lambda) / tokens;
        let b = match self.reduction {
            KlReduction::TokenMean => self.lambda * self.temperature * self.temperature / tokens,
            KlReduction::Reference => self.lambda / rows,
        };
        (a, b)
    }

    /// `(loss, ce, kl)` of a batch from its sums, as [`distill_loss`] reports them.
    pub fn combine(&self, ce_sum: f64, kl_sum: f64, tokens: f64, rows: f64) -> (f64, f64, f64) {
        let ce = ce_sum / tokens;
        let kl = match self.reduction {
            KlReduction::TokenMean => kl_sum / tokens * self.temperature * self.temperature,
            KlReduction::Reference => kl_sum / rows,
        };
        (ce * (1.0 - self.lambda) + kl * self.lambda, ce, kl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::Distribution;

    type B = Flex;

    #[test]
    fn kl_of_identical_distributions_is_zero_and_ce_of_a_sure_prediction_is_small() {
        let device = Default::default();
        let logits = Tensor::<B, 3>::random([2, 3, 7], Distribution::Normal(0.0, 1.0), &device);
        let mask = Tensor::<B, 2>::ones([2, 3], &device);
        let kl: f32 = kl_divergence(
            logits.clone(),
            logits.clone(),
            mask.clone(),
            &DistillConfig::default(),
        )
        .into_scalar();
        assert!(kl.abs() < 1e-6, "{kl}");
        // Logit 30 on the target, 0 elsewhere: CE = log(1 + 6·e^-30) ≈ 0.
        let ids: Vec<i64> = vec![0, 3, 6, 2, 5, 1];
        let mut sure = vec![0f32; 2 * 3 * 7];
        for (p, &id) in ids.iter().enumerate() {
            sure[p * 7 + id as usize] = 30.0;
        }
        let sure = Tensor::<B, 3>::from_data(TensorData::new(sure, [2, 3, 7]), &device);
        let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [2, 3]), &device);
        let ce: f32 = cross_entropy(sure, targets, mask).into_scalar();
        assert!(ce < 1e-6, "{ce}");
    }

    /// Two shards' sums, added and weighted, give the whole batch's loss and its gradient.
    #[test]
    fn shard_sums_add_up_to_the_batch_loss() {
        use burn::backend::Autodiff;
        type A = Autodiff<B>;
        let device = Default::default();
        let logits = Tensor::<B, 3>::random([4, 5, 7], Distribution::Normal(0.0, 1.0), &device);
        let teacher = Tensor::<B, 3>::random([4, 5, 7], Distribution::Normal(0.0, 1.0), &device);
        let ids: Vec<i64> = (0..20).map(|i| (i * 3 % 7) as i64).collect();
        let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [4, 5]), &device);
        let lens = [5usize, 2, 4, 1];
        let m: Vec<f32> = (0..20)
            .map(|i| f32::from(u8::from(i % 5 < lens[i / 5])))
            .collect();
        let mask = Tensor::<B, 2>::from_data(TensorData::new(m, [4, 5]), &device);
        let tokens: usize = lens.iter().sum();
        for reduction in [KlReduction::TokenMean, KlReduction::Reference] {
            let cfg = DistillConfig {
                lambda: 0.3,
                temperature: 2.0,
                reduction,
            };
            let grad_of = |parts: &dyn Fn(Tensor<A, 3>) -> Tensor<A, 1>| {
                let x = Tensor::<A, 3>::from_inner(logits.clone()).require_grad();
                let loss = parts(x.clone());
                let v: f32 = loss.clone().into_scalar();
                let g = x.grad(&loss.backward()).unwrap();
                (v, g.into_data().into_vec::<f32>().unwrap())
            };
            let inner = |t: &Tensor<B, 3>| Tensor::<A, 3>::from_inner(t.clone());
            let whole = grad_of(&|x| {
                distill_loss(
                    x,
                    inner(&teacher),
                    Tensor::from_inner(targets.clone()),
                    Tensor::from_inner(mask.clone()),
                    &cfg,
                )
                .loss
            });
            let (a, b) = cfg.weights(tokens as f64, 4.0);
            let (mut ce_sum, mut kl_sum) = (0.0, 0.0);
            let sharded = grad_of(&|x| {
                let mut total = None;
                for rows in [0..1, 1..4] {
                    let s = distill_sums(
                        x.clone().slice(rows.clone()),
                        inner(&teacher).slice(rows.clone()),
                        Tensor::from_inner(targets.clone().slice(rows.clone())),
                        Tensor::from_inner(mask.clone().slice(rows)),
                        &cfg,
                    );
                    let l = s.ce.mul_scalar(a) + s.kl.mul_scalar(b);
                    total = Some(match total {
                        None => l,
                        Some(t) => t + l,
                    });
                }
                total.unwrap()
            });
            for rows in [0..1, 1..4] {
                let s = distill_sums(
                    logits.clone().slice(rows.clone()),
                    teacher.clone().slice(rows.clone()),
                    targets.clone().slice(rows.clone()),
                    mask.clone().slice(rows),
                    &cfg,
                );
                ce_sum += s.ce.into_scalar() as f64;
                kl_sum += s.kl.into_scalar() as f64;
            }
            let (loss, _, _) = cfg.combine(ce_sum, kl_sum, tokens as f64, 4.0);
            assert!(
                (loss - whole.0 as f64).abs() < 1e-5,
                "{reduction:?}: {loss} vs {}",
                whole.0
            );
            assert!((sharded.0 - whole.0).abs() < 1e-5, "{reduction:?}");
            for (x, y) in sharded.1.iter().zip(&whole.1) {
                assert!((x - y).abs() < 1e-6, "{reduction:?}: gradient {x} vs {y}");
            }
        }
    }

    #[test]
    fn rejects_bad_settings() {
        let bad = DistillConfig {
            lambda: 1.5,
            ..Default::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("lambda 1.5")
        );
        let bad = DistillConfig {
            temperature: 0.0,
            ..Default::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("temperature")
        );
    }
}
