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
