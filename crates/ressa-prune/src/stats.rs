//! Streaming per-input activation statistics (Wanda and DSnoT).
//!
//! For input feature `j`, with batches of `b` samples and `T` tokens (all tokens of the batch
//! flattened, as the reference reshapes `[b, L, d]` to `[b*L, d]`):
//! - `n_j` ("scaler_row"): running mean over samples of `Σ_t x_tj²`. Per batch, exactly the
//!   reference's update: `n ← n·k/(k+b); k ← k+b; n += ‖X_j‖²/k`.
//! - `μ_j` ("sum_metric_row", DSnoT only): the same running mean of the token sum `Σ_t x_tj`.
//! - `v_j` (DSnoT only): population variance of each batch over its `T` tokens, combined as a
//!   token-count-weighted average, `v ← (v·N + v_b·T)/(N + T)` (not a pooled variance), as the
//!   reference computes it.
//!
//! Sums are accumulated in `f64` (the reference uses `f32`); the update rules are the same.

use rayon::prelude::*;

use crate::error::{PruneError, check_finite};

/// Column-chunk width for parallel accumulation.
const CHUNK: usize = 256;
/// Below this many values a batch is processed on one thread.
const PAR_MIN: usize = 1 << 16;

/// Streaming statistics of a Linear layer's inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct ActivationStats {
    d_in: usize,
    moments: bool,
    nsamples: u64,
    ntokens: u64,
    sq_norm: Vec<f64>,
    token_sum: Vec<f64>,
    var: Vec<f64>,
}

/// Per-batch sums of one column chunk: (Σx, Σx², Σ(x-mean)²).
fn batch_sums(
    x: &[f32],
    n_tokens: usize,
    d_in: usize,
    j0: usize,
    width: usize,
    moments: bool,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut s1 = vec![0f64; width];
    let mut s2 = vec![0f64; width];
    for t in 0..n_tokens {
        let row = &x[t * d_in + j0..t * d_in + j0 + width];
        for ((a, b), &v) in s1.iter_mut().zip(s2.iter_mut()).zip(row) {
            let v = v as f64;
            *a += v;
            *b += v * v;
        }
    }
    let mut sc = Vec::new();
    if moments {
        // two-pass population variance, as torch.var(unbiased=False) computes it
        let mean: Vec<f64> = s1.iter().map(|s| s / n_tokens as f64).collect();
        sc = vec![0f64; width];
        for t in 0..n_tokens {
            let row = &x[t * d_in + j0..t * d_in + j0 + width];
            for ((c, m), &v) in sc.iter_mut().zip(&mean).zip(row) {
                let d = v as f64 - m;
                *c += d * d;
            }
        }
    }
    (s1, s2, sc)
}

impl ActivationStats {
    /// Statistics for Wanda (squared norms only).
    pub fn new(d_in: usize) -> Result<Self, PruneError> {
        Self::build(d_in, false)
    }

    /// Statistics for DSnoT (squared norms, token sums and variances).
    pub fn with_moments(d_in: usize) -> Result<Self, PruneError> {
        Self::build(d_in, true)
    }

    fn build(d_in: usize, moments: bool) -> Result<Self, PruneError> {
        if d_in == 0 {
            return Err(PruneError::Empty("input dimension"));
        }
        let m = if moments { d_in } else { 0 };
        Ok(Self {
            d_in,
            moments,
            nsamples: 0,
            ntokens: 0,
            sq_norm: vec![0.0; d_in],
            token_sum: vec![0.0; m],
            var: vec![0.0; m],
        })
    }

    /// Input dimension.
    pub fn d_in(&self) -> usize {
        self.d_in
    }

    /// Samples seen (the reference's `nsamples`).
    pub fn nsamples(&self) -> u64 {
        self.nsamples
    }

    /// Tokens seen.
    pub fn ntokens(&self) -> u64 {
        self.ntokens
    }

    /// Whether no batch has been added.
    pub fn is_empty(&self) -> bool {
        self.nsamples == 0
    }

    /// Whether token sums and variances are tracked.
    pub fn has_moments(&self) -> bool {
        self.moments
    }

    /// Adds a batch `x` (row-major `[n_tokens, d_in]`) counting as `n_samples` samples.
    pub fn add_batch(
        &mut self,
        x: &[f32],
        n_tokens: usize,
        n_samples: usize,
    ) -> Result<(), PruneError> {
        validate_batch(x, n_tokens, self.d_in, n_samples)?;
        let d_in = self.d_in;
        let moments = self.moments;
        let chunks: Vec<usize> = (0..d_in).step_by(CHUNK).collect();
        let run = |&j0: &usize| {
            let width = CHUNK.min(d_in - j0);
            (j0, batch_sums(x, n_tokens, d_in, j0, width, moments))
        };
        let parts: Vec<_> = if x.len() >= PAR_MIN {
            chunks.par_iter().map(run).collect()
        } else {
            chunks.iter().map(run).collect()
        };

        let b = n_samples as u64;
        let t = n_tokens as u64;
        let scale = self.nsamples as f64 / (self.nsamples + b) as f64;
        let new_n = (self.nsamples + b) as f64;
        let old_tok = self.ntokens as f64;
        for (j0, (s1, s2, sc)) in parts {
            for (k, j) in (j0..j0 + s1.len()).enumerate() {
                self.sq_norm[j] = self.sq_norm[j] * scale + s2[k] / new_n;
                if moments {
                    self.token_sum[j] = self.token_sum[j] * scale + s1[k] / new_n;
                    let vb = sc[k] / n_tokens as f64;
                    self.var[j] = if self.ntokens == 0 {
                        vb
                    } else {
                        (self.var[j] * old_tok + vb * t as f64) / (old_tok + t as f64)
                    };
                }
            }
        }
        self.nsamples += b;
        self.ntokens += t;
        Ok(())
    }

    /// `n_j`: running mean over samples of `Σ_t x_tj²` (the reference's `scaler_row`).
    pub fn sq_norms(&self) -> &[f64] {
        &self.sq_norm
    }

    /// `sqrt(n_j)`: the input norms Wanda multiplies `|W|` by (also OWL's activation norm).
    pub fn norms(&self) -> Vec<f64> {
        self.sq_norm.iter().map(|v| v.sqrt()).collect()
    }

    /// `μ_j`: running mean over samples of the token sum `Σ_t x_tj` (`sum_metric_row`).
    pub fn token_sums(&self) -> Option<&[f64]> {
        self.moments.then_some(&self.token_sum[..])
    }

    /// `v_j`: token-count-weighted average of per-batch population variances.
    pub fn variances(&self) -> Option<&[f64]> {
        self.moments.then_some(&self.var[..])
    }

    /// Errors with [`PruneError::EmptyStatistics`] when no batch was added.
    pub(crate) fn require_data(&self) -> Result<(), PruneError> {
        if self.is_empty() {
            Err(PruneError::EmptyStatistics)
        } else {
            Ok(())
        }
    }
}

/// Shape, emptiness and finiteness checks for one activation batch.
pub(crate) fn validate_batch(
    x: &[f32],
    n_tokens: usize,
    d_in: usize,
    n_samples: usize,
) -> Result<(), PruneError> {
    if n_tokens == 0 {
        return Err(PruneError::Empty("activation batch (0 tokens)"));
    }
    if n_samples == 0 {
        return Err(PruneError::Empty("activation batch (0 samples)"));
    }
    let expected = n_tokens.saturating_mul(d_in);
    if x.len() != expected {
        return Err(PruneError::ActivationShape {
            n_tokens,
            d_in,
            expected,
            got: x.len(),
        });
    }
    check_finite("activations", x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_closed_form() {
        // Two batches of one sample each: n_j = (Σ_b1 x² + Σ_b2 x²) / 2.
        let d = 3;
        let b1 = [1.0f32, 2.0, 0.0, 3.0, -1.0, 0.0];
        let b2 = [2.0f32, 0.0, 0.0];
        let mut s = ActivationStats::with_moments(d).unwrap();
        s.add_batch(&b1, 2, 1).unwrap();
        s.add_batch(&b2, 1, 1).unwrap();
        assert_eq!(s.nsamples(), 2);
        assert_eq!(s.ntokens(), 3);
        let n = s.sq_norms();
        assert!((n[0] - (1.0 + 9.0 + 4.0) / 2.0).abs() < 1e-12);
        assert!((n[1] - (4.0 + 1.0) / 2.0).abs() < 1e-12);
        assert_eq!(n[2], 0.0);
        let mu = s.token_sums().unwrap();
        assert!((mu[0] - (4.0 + 2.0) / 2.0).abs() < 1e-12);
        assert!((mu[1] - 1.0 / 2.0).abs() < 1e-12);
        // variances: batch 1 col 0: values 1,3 -> var 1; batch 2: single value -> 0;
        // weighted by tokens: (1*2 + 0*1)/3
        let v = s.variances().unwrap();
        assert!((v[0] - 2.0 / 3.0).abs() < 1e-12);
        assert!((v[1] - (2.25 * 2.0) / 3.0).abs() < 1e-12);
        assert_eq!(v[2], 0.0);
    }

    #[test]
    fn samples_weight_the_running_mean() {
        let d = 2;
        let x = [1.0f32, 1.0, 1.0, 1.0];
        let mut a = ActivationStats::new(d).unwrap();
        a.add_batch(&x, 2, 2).unwrap();
        assert_eq!(a.sq_norms(), &[1.0, 1.0]);
        assert!(a.token_sums().is_none());
        let mut big = ActivationStats::new(300).unwrap();
        let x: Vec<f32> = (0..300 * 300).map(|k| (k % 7) as f32 - 3.0).collect();
        big.add_batch(&x, 300, 1).unwrap();
        let mut col0 = 0.0;
        for t in 0..300 {
            col0 += (x[t * 300] as f64).powi(2);
        }
        assert!((big.sq_norms()[0] - col0).abs() < 1e-9);
    }

    #[test]
    fn rejects_bad_batches() {
        let mut s = ActivationStats::new(2).unwrap();
        assert!(s.require_data().is_err());
        assert!(matches!(
            s.add_batch(&[1.0; 3], 2, 1),
            Err(PruneError::ActivationShape { .. })
        ));
        assert!(s.add_batch(&[], 0, 1).is_err());
        assert!(s.add_batch(&[1.0; 2], 1, 0).is_err());
        assert!(matches!(
            s.add_batch(&[1.0, f32::INFINITY], 1, 1),
            Err(PruneError::NonFinite { index: 1, .. })
        ));
        assert!(s.is_empty());
        assert!(ActivationStats::new(0).is_err());
    }
}
