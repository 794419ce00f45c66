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

/// Below this many values a batch is processed on one thread (with moments).
const PAR_MIN: usize = 1 << 16;
/// The same for squared norms alone (Wanda), a pure memory stream: one core reads a batch
/// about as fast as two, and a split batch waits for its slower half. Measured on the bench's
/// 128 batches of [64, 2048] on the shared 2-core VM (load ~5): one thread 6.3 ms (median
/// 10.6), two threads 11.7 ms (median 15.0). DSnoT's sums do more arithmetic per value and
/// gain from the split at that size (min 13.7 vs 15.5 ms).
const PAR_MIN_NORMS: usize = 1 << 20;
/// Fewest columns of one parallel task (a quarter of a 4 KiB page of `f32` per token row).
const MIN_COLS: usize = 256;
/// With moments, a task's `[n_tokens, width]` slab is read twice (sums, then the centred
/// squares); tasks are narrowed until the slab fits this budget, so the second read hits L2.
const SLAB_BYTES: usize = 256 << 10;

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

/// Per-column sums of one column range `j0..j0 + s2.len()` of a batch, in one pass over the
/// tokens: `s2 = Σ_t x²` and, with `s1`/`sc`, `s1 = Σ_t x` and `sc = Σ_t (x - s1/T)²` (the
/// two-pass population variance's numerator, as `torch.var(unbiased=False)`).
///
/// Every column sums its tokens in token order from `0.0`, in `f64`, one rounding per add:
/// the vectorised loop runs along the columns of a token row, never reassociating a column's
/// sum. `x²` of an `f32` is exact in `f64`, so `Σ x²` is the same with or without FMA.
#[inline(always)]
fn column_sums(
    x: &[f32],
    n_tokens: usize,
    d_in: usize,
    j0: usize,
    s2: &mut [f64],
    moments: Option<(&mut [f64], &mut [f64])>,
) {
    let w = s2.len();
    match moments {
        None => {
            for t in 0..n_tokens {
                let row = &x[t * d_in + j0..t * d_in + j0 + w];
                for (b, &v) in s2.iter_mut().zip(row) {
                    let v = v as f64;
                    *b += v * v;
                }
            }
        }
        Some((s1, sc)) => {
            for t in 0..n_tokens {
                let row = &x[t * d_in + j0..t * d_in + j0 + w];
                for ((a, b), &v) in s1.iter_mut().zip(s2.iter_mut()).zip(row) {
                    let v = v as f64;
                    *a += v;
                    *b += v * v;
                }
            }
            let mean: Vec<f64> = s1.iter().map(|s| s / n_tokens as f64).collect();
            for t in 0..n_tokens {
                let row = &x[t * d_in + j0..t * d_in + j0 + w];
                for ((c, &mu), &v) in sc.iter_mut().zip(&mean).zip(row) {
                    let d = v as f64 - mu;
                    *c += d * d;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn column_sums_avx2(
    x: &[f32],
    n_tokens: usize,
    d_in: usize,
    j0: usize,
    s2: &mut [f64],
    moments: Option<(&mut [f64], &mut [f64])>,
) {
    column_sums(x, n_tokens, d_in, j0, s2, moments)
}

/// [`column_sums`] for the CPU's widest supported vectors.
fn column_sums_dispatch(
    x: &[f32],
    n_tokens: usize,
    d_in: usize,
    j0: usize,
    s2: &mut [f64],
    moments: Option<(&mut [f64], &mut [f64])>,
) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx2() {
        // SAFETY: the CPU reports AVX2 and FMA.
        return unsafe { column_sums_avx2(x, n_tokens, d_in, j0, s2, moments) };
    }
    column_sums(x, n_tokens, d_in, j0, s2, moments)
}

/// Column width of one task: a multiple of 8, at least [`MIN_COLS`] (or all of `d_in`),
/// about `d_in / threads` wide, narrower with moments until its slab fits [`SLAB_BYTES`].
fn task_width(d_in: usize, n_tokens: usize, moments: bool) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let mut w = d_in.div_ceil(threads).next_multiple_of(8);
    if moments {
        let fit = (SLAB_BYTES / (4 * n_tokens)).max(8) / 8 * 8;
        w = w.min(fit);
    }
    w.max(MIN_COLS).min(d_in)
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
        validate_shape(x, n_tokens, self.d_in, n_samples)?;
        let d_in = self.d_in;
        let moments = self.moments;
        // s2 | s1 | sc, each `d_in` long
        let mut sums = vec![0f64; if moments { 3 * d_in } else { d_in }];
        let (s2, rest) = sums.split_at_mut(d_in);
        let (s1, sc) = rest.split_at_mut(if moments { d_in } else { 0 });
        let par_min = if moments { PAR_MIN } else { PAR_MIN_NORMS };
        let width = if x.len() >= par_min {
            task_width(d_in, n_tokens, moments)
        } else {
            d_in
        };
        let par = width < d_in;
        if moments && par {
            s2.par_chunks_mut(width)
                .zip(s1.par_chunks_mut(width))
                .zip(sc.par_chunks_mut(width))
                .enumerate()
                .for_each(|(k, ((b, a), c))| {
                    column_sums_dispatch(x, n_tokens, d_in, k * width, b, Some((a, c)));
                });
        } else if moments {
            column_sums_dispatch(x, n_tokens, d_in, 0, s2, Some((s1, sc)));
        } else if par {
            s2.par_chunks_mut(width)
                .enumerate()
                .for_each(|(k, b)| column_sums_dispatch(x, n_tokens, d_in, k * width, b, None));
        } else {
            column_sums_dispatch(x, n_tokens, d_in, 0, s2, None);
        }
        // Σx² of finite f32 values cannot overflow f64, so a non-finite sum means a non-finite
        // activation: only then is the batch scanned for the first offender.
        if !s2.iter().all(|v| v.is_finite()) {
            check_finite("activations", x)?;
        }

        let b = n_samples as u64;
        let t = n_tokens as u64;
        let scale = self.nsamples as f64 / (self.nsamples + b) as f64;
        let new_n = (self.nsamples + b) as f64;
        let old_tok = self.ntokens as f64;
        for (n, &s) in self.sq_norm.iter_mut().zip(s2.iter()) {
            *n = *n * scale + s / new_n;
        }
        if moments {
            for (mu, &s) in self.token_sum.iter_mut().zip(s1.iter()) {
                *mu = *mu * scale + s / new_n;
            }
            for (v, &c) in self.var.iter_mut().zip(sc.iter()) {
                let vb = c / n_tokens as f64;
                *v = if self.ntokens == 0 {
                    vb
                } else {
                    (*v * old_tok + vb * t as f64) / (old_tok + t as f64)
                };
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
    validate_shape(x, n_tokens, d_in, n_samples)?;
    check_finite("activations", x)
}

/// Shape and emptiness checks for one activation batch.
fn validate_shape(
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
    Ok(())
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

    /// The statistics as first written (per-column `f64` sums in token order, 256-column
    /// chunks, separate finiteness scan): the fused pass must reproduce them bit for bit.
    fn reference_stats(batches: &[(Vec<f32>, usize, usize)], d_in: usize) -> [Vec<f64>; 3] {
        let (mut n, mut mu, mut var) = (vec![0f64; d_in], vec![0f64; d_in], vec![0f64; d_in]);
        let (mut ns, mut nt) = (0u64, 0u64);
        for (x, t, b) in batches {
            let (t, b) = (*t, *b as u64);
            let scale = ns as f64 / (ns + b) as f64;
            let new_n = (ns + b) as f64;
            for j in 0..d_in {
                let (mut s1, mut s2) = (0f64, 0f64);
                for r in 0..t {
                    let v = x[r * d_in + j] as f64;
                    s1 += v;
                    s2 += v * v;
                }
                let m = s1 / t as f64;
                let mut sc = 0f64;
                for r in 0..t {
                    let d = x[r * d_in + j] as f64 - m;
                    sc += d * d;
                }
                n[j] = n[j] * scale + s2 / new_n;
                mu[j] = mu[j] * scale + s1 / new_n;
                let vb = sc / t as f64;
                var[j] = if nt == 0 {
                    vb
                } else {
                    (var[j] * nt as f64 + vb * t as f64) / (nt as f64 + t as f64)
                };
            }
            ns += b;
            nt += t as u64;
        }
        [n, mu, var]
    }

    #[test]
    fn fused_pass_is_bit_identical_to_per_column_sums() {
        let mut seed = 7u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 40) as f32 / (1u64 << 24) as f32 * 6.0 - 3.0
        };
        // serial and parallel sizes (with and without moments), widths that split into
        // uneven tasks
        for (d_in, tokens) in [
            (3, 5),
            (300, 7),
            (1000, 70),
            (2051, 64),
            (700, 400),
            (2048, 520),
        ] {
            let batches: Vec<(Vec<f32>, usize, usize)> = (0..3)
                .map(|b| {
                    let t = tokens + b;
                    ((0..t * d_in).map(|_| next()).collect(), t, 1 + b % 2)
                })
                .collect();
            let mut a = ActivationStats::with_moments(d_in).unwrap();
            let mut w = ActivationStats::new(d_in).unwrap();
            for (x, t, b) in &batches {
                a.add_batch(x, *t, *b).unwrap();
                w.add_batch(x, *t, *b).unwrap();
            }
            let [n, mu, var] = reference_stats(&batches, d_in);
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(a.sq_norms()), bits(&n), "n, d_in {d_in}");
            assert_eq!(bits(w.sq_norms()), bits(&n), "n (Wanda), d_in {d_in}");
            assert_eq!(bits(a.token_sums().unwrap()), bits(&mu), "mu, d_in {d_in}");
            assert_eq!(bits(a.variances().unwrap()), bits(&var), "var, d_in {d_in}");
        }
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
        // the first offender of a large (parallel) batch, the statistics left untouched
        let mut big = ActivationStats::with_moments(512).unwrap();
        let mut x = vec![0.5f32; 512 * 200];
        x[512 * 150 + 7] = f32::NEG_INFINITY;
        x[512 * 160 + 3] = f32::NAN;
        assert!(matches!(
            big.add_batch(&x, 200, 1),
            Err(PruneError::NonFinite { index, .. }) if index == 512 * 150 + 7
        ));
        assert!(big.is_empty() && big.sq_norms().iter().all(|&v| v == 0.0));
        assert!(s.is_empty());
        assert!(ActivationStats::new(0).is_err());
    }
}
