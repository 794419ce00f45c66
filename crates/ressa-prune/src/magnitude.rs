//! Magnitude pruning: score `|W_ij|`.
//!
//! The reference's `BLIPT5MagPruner` ranks the **signed** weight (no `abs`, so it prunes the
//! most negative weights); this crate uses `|W|` as upstream Wanda's magnitude baseline does.
//! Default comparison group: the whole matrix ([`ComparisonGroup::PerMatrix`]), as upstream
//! Wanda's baseline; N:M prunes the `n` smallest `|W|` of each group of `m` inputs per output.

use ressa_sparse::Mask;

use crate::select::mask_from_scores;
use crate::stats::validate_batch;
use crate::{
    ComparisonGroup, Method, PruneError, PruneOutput, PruneSpec, Pruner, Result, ThresholdRule,
    Weights,
};

/// Magnitude configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MagnitudeConfig {
    /// Unstructured comparison group (default: per matrix).
    pub group: ComparisonGroup,
    /// Per-matrix count rule (default: exactly `floor(s * numel)`; upstream Wanda's baseline
    /// is [`ThresholdRule::AtOrBelowKth`]).
    pub threshold_rule: ThresholdRule,
}

impl Default for MagnitudeConfig {
    fn default() -> Self {
        Self {
            group: ComparisonGroup::PerMatrix,
            threshold_rule: ThresholdRule::ExactCount,
        }
    }
}

/// Magnitude mask of `weights` (no calibration data needed).
pub fn magnitude_mask(
    weights: Weights<'_>,
    spec: &PruneSpec,
    config: &MagnitudeConfig,
) -> Result<Mask> {
    // |w| · 1.0 is exactly |w|
    mask_from_scores(
        weights,
        spec,
        config.group,
        config.threshold_rule,
        &vec![1.0; weights.d_in()],
    )
}

/// [`Pruner`] for magnitude pruning; calibration batches are checked and otherwise ignored.
#[derive(Clone, Debug)]
pub struct MagnitudePruner {
    d_in: usize,
    nsamples: u64,
    config: MagnitudeConfig,
}

impl MagnitudePruner {
    /// A pruner for a Linear with `d_in` inputs.
    pub fn new(d_in: usize, config: MagnitudeConfig) -> Result<Self> {
        if d_in == 0 {
            return Err(PruneError::Empty("input dimension"));
        }
        Ok(Self {
            d_in,
            nsamples: 0,
            config,
        })
    }
}

impl Pruner for MagnitudePruner {
    fn method(&self) -> Method {
        Method::Magnitude
    }

    fn d_in(&self) -> usize {
        self.d_in
    }

    fn add_batch_samples(&mut self, x: &[f32], n_tokens: usize, n_samples: usize) -> Result<()> {
        validate_batch(x, n_tokens, self.d_in, n_samples)?;
        self.nsamples += n_samples as u64;
        Ok(())
    }

    fn nsamples(&self) -> u64 {
        self.nsamples
    }

    fn prune(&self, weights: Weights<'_>, spec: &PruneSpec) -> Result<PruneOutput> {
        if weights.d_in() != self.d_in {
            return Err(PruneError::DimMismatch {
                expected: self.d_in,
                got: weights.d_in(),
            });
        }
        Ok(PruneOutput {
            mask: magnitude_mask(weights, spec, &self.config)?,
            weights: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ressa_sparse::{column_sparsity, is_n_m};

    fn weights(d_in: usize, d_out: usize) -> Vec<f32> {
        (0..d_in * d_out)
            .map(|k| {
                let x = ((k * 7919) % 1009) as f32 / 1009.0 - 0.5;
                if k % 3 == 0 { -x } else { x }
            })
            .collect()
    }

    #[test]
    fn uses_absolute_value_per_matrix() {
        // burn [2, 2]: large negative weights must survive
        let w = [-5.0f32, 0.1, 0.2, -4.0];
        let wt = Weights::new(&w, 2, 2).unwrap();
        let m = magnitude_mask(
            wt,
            &PruneSpec::unstructured(0.5).unwrap(),
            &MagnitudeConfig::default(),
        )
        .unwrap();
        assert_eq!(m.to_bools(), vec![true, false, false, true]);
    }

    #[test]
    fn counts_and_patterns() {
        let (d_in, d_out) = (64, 40);
        let w = weights(d_in, d_out);
        let wt = Weights::new(&w, d_in, d_out).unwrap();
        for s in [0.0, 0.3, 0.5, 0.7] {
            let m = magnitude_mask(
                wt,
                &PruneSpec::unstructured(s).unwrap(),
                &MagnitudeConfig::default(),
            )
            .unwrap();
            assert_eq!(
                m.count_pruned(),
                (s * (d_in * d_out) as f64).floor() as usize
            );
            let cfg = MagnitudeConfig {
                group: ComparisonGroup::PerOutput,
                ..Default::default()
            };
            let m = magnitude_mask(wt, &PruneSpec::unstructured(s).unwrap(), &cfg).unwrap();
            let k = (s * d_in as f64).floor() / d_in as f64;
            assert!(column_sparsity(&m).iter().all(|&c| (c - k).abs() < 1e-12));
        }
        for (n, m) in [(2, 4), (4, 8), (1, 4)] {
            let mask = magnitude_mask(
                wt,
                &PruneSpec::n_m(n, m).unwrap(),
                &MagnitudeConfig::default(),
            )
            .unwrap();
            assert!(is_n_m(&mask, n, m));
            // kept entries dominate pruned ones within each group
            for j in 0..d_out {
                for g in 0..d_in / m {
                    let rows = g * m..(g + 1) * m;
                    let kept_min = rows
                        .clone()
                        .filter(|&i| mask.get(i, j).unwrap())
                        .map(|i| w[i * d_out + j].abs())
                        .fold(f32::INFINITY, f32::min);
                    let pruned_max = rows
                        .filter(|&i| !mask.get(i, j).unwrap())
                        .map(|i| w[i * d_out + j].abs())
                        .fold(0.0, f32::max);
                    assert!(kept_min >= pruned_max);
                }
            }
        }
        assert!(
            magnitude_mask(
                wt,
                &PruneSpec::n_m(2, 3).unwrap(),
                &MagnitudeConfig::default()
            )
            .is_err()
        );
    }

    #[test]
    fn pruner_checks_inputs() {
        let mut p = MagnitudePruner::new(4, MagnitudeConfig::default()).unwrap();
        assert!(p.add_batch(&[0.0; 7], 2).is_err());
        p.add_batch(&[0.0; 8], 2).unwrap();
        let w = [1.0f32; 12];
        assert!(
            p.prune(
                Weights::new(&w, 3, 4).unwrap(),
                &PruneSpec::unstructured(0.5).unwrap()
            )
            .is_err()
        );
        let out = p
            .prune(
                Weights::new(&w, 4, 3).unwrap(),
                &PruneSpec::unstructured(0.5).unwrap(),
            )
            .unwrap();
        assert_eq!(out.mask.count_pruned(), 6);
        // all ties: the lowest PyTorch flat indices (output 0 first, then output 1) go first
        assert_eq!(out.mask.kept_per_column(), vec![0, 2, 4]);
    }
}
