//! Wanda: score `S_ij = |W_ij| · sqrt(n_j)`, with `n_j` the running mean of `Σ_t x_tj²`
//! ([`ActivationStats`]).
//!
//! Comparison group ([`ComparisonGroup`]): per output (upstream Wanda and the reference's T5
//! pruner, `floor(d_in * s)` per output) or per matrix (the reference's ViT pruner, one
//! threshold for the matrix; with [`ThresholdRule::BelowKth`] exactly the reference's
//! `S < sort(S)[floor(numel * s)]`). N:M prunes the `n` smallest scores of every group of `m`
//! inputs of each output.

use ressa_sparse::Mask;

use crate::select::mask_from_scores;
use crate::stats::ActivationStats;
use crate::{
    ComparisonGroup, Method, PruneError, PruneOutput, PruneSpec, Pruner, Result, ThresholdRule,
    Weights,
};

/// Wanda configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WandaConfig {
    /// Unstructured comparison group (default: per output). Use
    /// [`ComparisonGroup::PerMatrix`] to reproduce the reference's ViT pruning.
    pub group: ComparisonGroup,
    /// Count rule for per-matrix selection (default: exact count).
    pub threshold_rule: ThresholdRule,
}

fn check_norms(weights: &Weights<'_>, sq_norms: &[f64]) -> Result<()> {
    if sq_norms.len() != weights.d_in() {
        return Err(PruneError::DimMismatch {
            expected: sq_norms.len(),
            got: weights.d_in(),
        });
    }
    Ok(())
}

/// Wanda mask from precomputed squared input norms `n_j` (length `d_in`).
pub fn wanda_mask(
    weights: Weights<'_>,
    sq_norms: &[f64],
    spec: &PruneSpec,
    config: &WandaConfig,
) -> Result<Mask> {
    check_norms(&weights, sq_norms)?;
    let norms: Vec<f64> = sq_norms.iter().map(|v| v.sqrt()).collect();
    mask_from_scores(weights, spec, config.group, config.threshold_rule, &norms)
}

/// The Wanda score matrix (row-major `[d_in, d_out]`, `f64`).
pub fn wanda_scores(weights: Weights<'_>, sq_norms: &[f64]) -> Result<Vec<f64>> {
    check_norms(&weights, sq_norms)?;
    let d_out = weights.d_out();
    Ok(weights
        .data()
        .iter()
        .enumerate()
        .map(|(k, &w)| (w as f64).abs() * sq_norms[k / d_out].sqrt())
        .collect())
}

/// [`Pruner`] for Wanda.
#[derive(Clone, Debug)]
pub struct WandaPruner {
    stats: ActivationStats,
    config: WandaConfig,
}

impl WandaPruner {
    /// A pruner for a Linear with `d_in` inputs.
    pub fn new(d_in: usize, config: WandaConfig) -> Result<Self> {
        Ok(Self {
            stats: ActivationStats::new(d_in)?,
            config,
        })
    }

    /// The accumulated statistics.
    pub fn stats(&self) -> &ActivationStats {
        &self.stats
    }

    /// Mean Wanda score of `weights` (the reference stores it as `importance_score`).
    pub fn importance(&self, weights: Weights<'_>) -> Result<f64> {
        self.stats.require_data()?;
        let s = wanda_scores(weights, self.stats.sq_norms())?;
        Ok(s.iter().sum::<f64>() / s.len() as f64)
    }
}

impl Pruner for WandaPruner {
    fn method(&self) -> Method {
        Method::Wanda
    }

    fn d_in(&self) -> usize {
        self.stats.d_in()
    }

    fn add_batch_samples(&mut self, x: &[f32], n_tokens: usize, n_samples: usize) -> Result<()> {
        self.stats.add_batch(x, n_tokens, n_samples)
    }

    fn nsamples(&self) -> u64 {
        self.stats.nsamples()
    }

    fn prune(&self, weights: Weights<'_>, spec: &PruneSpec) -> Result<PruneOutput> {
        self.stats.require_data()?;
        Ok(PruneOutput {
            mask: wanda_mask(weights, self.stats.sq_norms(), spec, &self.config)?,
            weights: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ressa_sparse::{column_sparsity, is_n_m};

    #[test]
    fn activation_norm_changes_the_ranking() {
        // burn [2 inputs, 1 output]: w = [1.0, 0.5]; input 1 is 10x louder
        let w = [1.0f32, 0.5];
        let mut p = WandaPruner::new(2, WandaConfig::default()).unwrap();
        p.add_batch(&[1.0, 10.0], 1).unwrap();
        let out = p
            .prune(
                Weights::new(&w, 2, 1).unwrap(),
                &PruneSpec::unstructured(0.5).unwrap(),
            )
            .unwrap();
        assert_eq!(out.mask.to_bools(), vec![false, true]);
        assert!(out.weights.is_none());
        assert!((p.importance(Weights::new(&w, 2, 1).unwrap()).unwrap() - 3.0).abs() < 1e-12);
    }

    #[test]
    fn counts_and_errors() {
        let (d_in, d_out) = (32, 12);
        let w: Vec<f32> = (0..d_in * d_out)
            .map(|k| ((k * 37) % 101) as f32 - 50.0)
            .collect();
        let x: Vec<f32> = (0..5 * d_in)
            .map(|k| ((k * 13) % 17) as f32 - 8.0)
            .collect();
        let mut p = WandaPruner::new(d_in, WandaConfig::default()).unwrap();
        let wt = Weights::new(&w, d_in, d_out).unwrap();
        assert!(matches!(
            p.prune(wt, &PruneSpec::unstructured(0.5).unwrap()),
            Err(PruneError::EmptyStatistics)
        ));
        p.add_batch(&x, 5).unwrap();
        let m = p
            .prune(wt, &PruneSpec::unstructured(0.7).unwrap())
            .unwrap()
            .mask;
        assert!(column_sparsity(&m).iter().all(|&c| c == 22.0 / 32.0));
        let m = p.prune(wt, &PruneSpec::n_m(4, 8).unwrap()).unwrap().mask;
        assert!(is_n_m(&m, 4, 8));
        let pm = WandaPruner {
            config: WandaConfig {
                group: ComparisonGroup::PerMatrix,
                ..Default::default()
            },
            ..p.clone()
        };
        let m = pm
            .prune(wt, &PruneSpec::unstructured(0.5).unwrap())
            .unwrap()
            .mask;
        assert_eq!(m.count_pruned(), d_in * d_out / 2);
        let w_bad = vec![0.0f32; 31 * d_out];
        assert!(matches!(
            p.prune(
                Weights::new(&w_bad, 31, d_out).unwrap(),
                &PruneSpec::unstructured(0.5).unwrap()
            ),
            Err(PruneError::DimMismatch { .. })
        ));
    }
}
