//! AdamW (Loshchilov & Hutter, decoupled weight decay) over named tensors, with its state
//! keyed by name so a checkpoint restores it exactly (burn's optimizers key their state by
//! random parameter ids, which a reloaded model does not keep).
//!
//! `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`, `p ← p − lr·(m̂/(√v̂ + ε) + wd·p)` with
//! `m̂ = m/(1−β₁ᵗ)`, `v̂ = v/(1−β₂ᵗ)` — PyTorch's `torch.optim.AdamW` update.

use std::collections::BTreeMap;

use burn::prelude::*;
use serde::{Deserialize, Serialize};

/// Hyper-parameters (PyTorch defaults except the weight decay, which RESSA sets to 0).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub epsilon: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            weight_decay: 0.0,
        }
    }
}

impl AdamWConfig {
    /// β₁, β₂ in [0, 1), ε > 0, weight decay ≥ 0, all finite.
    pub fn validate(&self) -> crate::error::Result<()> {
        let bad = |field: &str, v: f64, want: &str| {
            Err(crate::error::TrainError::config(
                field,
                format!("adamw.{field} {v}: expected {want}"),
            ))
        };
        for (field, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return bad(field, v, "a value in [0, 1)");
            }
        }
        if !(self.epsilon > 0.0 && self.epsilon.is_finite()) {
            return bad("epsilon", self.epsilon, "a positive number");
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return bad("weight_decay", self.weight_decay, "a non-negative number");
        }
        Ok(())
    }
}

/// First and second moments of one tensor.
#[derive(Debug, Clone)]
pub struct Moments<B: Backend> {
    pub m: Tensor<B, 2>,
    pub v: Tensor<B, 2>,
}

/// The optimizer: its settings, the number of updates done and the moments by name.
#[derive(Debug, Clone)]
pub struct AdamW<B: Backend> {
    pub config: AdamWConfig,
    pub steps: u64,
    pub moments: BTreeMap<String, Moments<B>>,
}

impl<B: Backend> AdamW<B> {
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            steps: 0,
            moments: BTreeMap::new(),
        }
    }

    /// Starts update `t = steps + 1`; call [`AdamW::update`] for each tensor after it.
    pub fn begin_step(&mut self) {
        self.steps += 1;
    }

    /// The updated value of `param` (named `name`) given its gradient, at learning rate `lr`.
    pub fn update(
        &mut self,
        name: &str,
        param: Tensor<B, 2>,
        grad: Tensor<B, 2>,
        lr: f64,
    ) -> Tensor<B, 2> {
        let c = self.config;
        let t = self.steps.max(1) as i32;
        let (m, v) = match self.moments.remove(name) {
            Some(s) => (
                s.m.mul_scalar(c.beta1) + grad.clone().mul_scalar(1.0 - c.beta1),
                s.v.mul_scalar(c.beta2) + grad.powi_scalar(2).mul_scalar(1.0 - c.beta2),
            ),
            None => (
                grad.clone().mul_scalar(1.0 - c.beta1),
                grad.powi_scalar(2).mul_scalar(1.0 - c.beta2),
            ),
        };
        let m_hat = m.clone().div_scalar(1.0 - c.beta1.powi(t));
        let v_hat = v.clone().div_scalar(1.0 - c.beta2.powi(t));
        let step = m_hat / v_hat.sqrt().add_scalar(c.epsilon);
        let decayed = if c.weight_decay != 0.0 {
            param.clone().mul_scalar(1.0 - lr * c.weight_decay)
        } else {
            param
        };
        self.moments.insert(name.to_string(), Moments { m, v });
        decayed - step.mul_scalar(lr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    /// Two steps by hand against the formula (PyTorch's AdamW with these settings).
    #[test]
    fn matches_the_adamw_formula() {
        let device = Default::default();
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut opt = AdamW::<Flex>::new(cfg);
        let mut p = Tensor::<Flex, 2>::from_floats([[1.0, -2.0]], &device);
        let grads = [[0.5f32, -1.0], [0.25, 0.5]];
        let (lr, b1, b2, eps, wd) = (0.01f64, 0.9f64, 0.999f64, 1e-8f64, 0.1f64);
        let (mut pe, mut m, mut v) = ([1.0f64, -2.0], [0.0f64; 2], [0.0f64; 2]);
        for (t, g) in grads.iter().enumerate() {
            opt.begin_step();
            p = opt.update("p", p, Tensor::from_floats([*g], &device), lr);
            for i in 0..2 {
                let gi = g[i] as f64;
                m[i] = b1 * m[i] + (1.0 - b1) * gi;
                v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                let mh = m[i] / (1.0 - b1.powi(t as i32 + 1));
                let vh = v[i] / (1.0 - b2.powi(t as i32 + 1));
                pe[i] = pe[i] * (1.0 - lr * wd) - lr * mh / (vh.sqrt() + eps);
            }
        }
        let got = p.into_data().into_vec::<f32>().unwrap();
        for i in 0..2 {
            assert!((got[i] as f64 - pe[i]).abs() < 1e-6, "{got:?} vs {pe:?}");
        }
    }
}
