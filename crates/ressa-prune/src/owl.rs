//! OWL (outlier-weighted layer-wise sparsity): per-block sparsities from outlier ratios, as
//! llm-compressor's `_infer_owl_layer_sparsity` computes them.
//!
//! For each block (a transformer layer), over all its pruned Linears together:
//! 1. `z = |W_ij| · ‖x_j‖` for every weight entry;
//! 2. outlier ratio `r = 100 · #{z > M · mean(z)} / numel` (percent);
//! 3. normalise over blocks: `r' = (r − min r) / (max r − min r) · 2λ` (all zero when every
//!    block has the same ratio);
//! 4. `s_l = 1 − (r'_l − mean(r') + (1 − target))`, so `mean(s) = target` and blocks with
//!    more outliers are pruned less.
//!
//! The activation norm `‖x_j‖` is supplied by the caller: [`crate::ActivationStats::norms`]
//! (`sqrt` of Wanda's `n_j`) is the OWL paper's choice; llm-compressor averages per-batch
//! norms instead. Defaults (`luuyin/OWL`, unstructured): `M = 5`, `λ = 0.08`.

use crate::error::check_finite;
use crate::{PruneError, Result, Weights};

/// OWL hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OwlConfig {
    /// Outlier threshold multiplier `M` (`owl_m`).
    pub m: f64,
    /// Spread `λ` (`owl_lmbda`): sparsities range over `target ± λ`.
    pub lambda: f64,
}

impl Default for OwlConfig {
    fn default() -> Self {
        Self {
            m: 5.0,
            lambda: 0.08,
        }
    }
}

/// One Linear of a block: its weight and per-input activation norms (length `d_in`).
#[derive(Clone, Copy, Debug)]
pub struct OwlLayer<'a> {
    /// Burn-orientation weight.
    pub weights: Weights<'a>,
    /// `‖x_j‖` per input.
    pub act_norms: &'a [f64],
}

/// Outlier ratio (percent) of one block: entries of `|W|·‖x‖` above `m` times their mean,
/// over all the block's layers.
pub fn outlier_ratio(layers: &[OwlLayer<'_>], m: f64) -> Result<f64> {
    if layers.is_empty() {
        return Err(PruneError::Empty("OWL block (no layers)"));
    }
    if !m.is_finite() || m <= 0.0 {
        return Err(PruneError::InvalidConfig(format!(
            "OWL m = {m} must be > 0"
        )));
    }
    let mut total = 0f64;
    let mut count = 0usize;
    for l in layers {
        let d_in = l.weights.d_in();
        if l.act_norms.len() != d_in {
            return Err(PruneError::DimMismatch {
                expected: l.act_norms.len(),
                got: d_in,
            });
        }
        if let Some(i) = l.act_norms.iter().position(|v| !v.is_finite() || *v < 0.0) {
            return Err(PruneError::NonFinite {
                what: "OWL activation norms (or negative)",
                index: i,
                value: l.act_norms[i] as f32,
            });
        }
        let d_out = l.weights.d_out();
        for (k, &w) in l.weights.data().iter().enumerate() {
            total += (w as f64).abs() * l.act_norms[k / d_out];
        }
        count += l.weights.data().len();
    }
    let thr = total / count as f64 * m;
    let mut outliers = 0usize;
    for l in layers {
        let d_out = l.weights.d_out();
        outliers += l
            .weights
            .data()
            .iter()
            .enumerate()
            .filter(|(k, w)| (w.abs() as f64) * l.act_norms[k / d_out] > thr)
            .count();
    }
    Ok(100.0 * outliers as f64 / count as f64)
}

/// Per-block sparsities from outlier ratios; their mean equals `target`.
pub fn allocate(outlier_ratios: &[f64], target: f64, lambda: f64) -> Result<Vec<f64>> {
    if outlier_ratios.is_empty() {
        return Err(PruneError::Empty("OWL allocation (no blocks)"));
    }
    if !(0.0..1.0).contains(&target) {
        return Err(PruneError::InvalidSparsity(target));
    }
    if !lambda.is_finite() || lambda < 0.0 {
        return Err(PruneError::InvalidConfig(format!(
            "OWL lambda = {lambda} must be >= 0"
        )));
    }
    let as_f32: Vec<f32> = outlier_ratios.iter().map(|&v| v as f32).collect();
    check_finite("OWL outlier ratios", &as_f32)?;
    let min = outlier_ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let max = outlier_ratios
        .iter()
        .copied()
        .fold(f64::NEG_INFINITY, f64::max);
    let norm: Vec<f64> = if max > min {
        outlier_ratios
            .iter()
            .map(|r| (r - min) * (1.0 / (max - min) * lambda * 2.0))
            .collect()
    } else {
        vec![0.0; outlier_ratios.len()]
    };
    let mean = norm.iter().sum::<f64>() / norm.len() as f64;
    let out: Vec<f64> = norm
        .iter()
        .map(|r| 1.0 - (r - mean + (1.0 - target)))
        .collect();
    if let Some((block, &value)) = out
        .iter()
        .enumerate()
        .find(|(_, v)| !(0.0..1.0).contains(*v))
    {
        return Err(PruneError::OwlOutOfRange { block, value });
    }
    Ok(out)
}

/// OWL sparsities for `blocks` (each a list of its Linears) at mean sparsity `target`.
pub fn owl_sparsities(
    blocks: &[Vec<OwlLayer<'_>>],
    target: f64,
    config: &OwlConfig,
) -> Result<Vec<f64>> {
    let ratios = blocks
        .iter()
        .map(|b| outlier_ratio(b, config.m))
        .collect::<Result<Vec<_>>>()?;
    allocate(&ratios, target, config.lambda)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_formula() {
        let s = allocate(&[1.0, 2.0, 3.0], 0.5, 0.08).unwrap();
        // normalised: 0, 0.08, 0.16; mean 0.08 -> sparsities 0.58, 0.5, 0.42
        assert!((s[0] - 0.58).abs() < 1e-12);
        assert!((s[1] - 0.5).abs() < 1e-12);
        assert!((s[2] - 0.42).abs() < 1e-12);
        let mean = s.iter().sum::<f64>() / 3.0;
        assert!((mean - 0.5).abs() < 1e-12);
        assert_eq!(allocate(&[4.0, 4.0], 0.7, 0.08).unwrap(), vec![0.7, 0.7]);
        assert!(matches!(
            allocate(&[0.0, 1.0], 0.95, 0.2),
            Err(PruneError::OwlOutOfRange { block: 0, .. })
        ));
        assert!(allocate(&[], 0.5, 0.1).is_err());
        assert!(allocate(&[1.0], 1.0, 0.1).is_err());
    }

    #[test]
    fn outlier_ratio_counts_large_entries() {
        // 1 input x 4 outputs: z = [1, 1, 1, 9], mean 3; m = 2 -> threshold 6 -> 1 outlier
        let w = [1.0f32, -1.0, 1.0, 9.0];
        let layer = OwlLayer {
            weights: Weights::new(&w, 1, 4).unwrap(),
            act_norms: &[1.0],
        };
        assert_eq!(outlier_ratio(&[layer], 2.0).unwrap(), 25.0);
        let flat = [1.0f32; 4];
        let calm = OwlLayer {
            weights: Weights::new(&flat, 1, 4).unwrap(),
            act_norms: &[1.0],
        };
        let s = owl_sparsities(
            &[vec![layer], vec![calm]],
            0.5,
            &OwlConfig {
                m: 2.0,
                lambda: 0.1,
            },
        )
        .unwrap();
        assert!(s[0] < 0.5 && s[1] > 0.5);
        assert!(outlier_ratio(&[], 5.0).is_err());
        let bad = OwlLayer {
            weights: Weights::new(&w, 1, 4).unwrap(),
            act_norms: &[1.0, 2.0],
        };
        assert!(outlier_ratio(&[bad], 5.0).is_err());
    }
}
