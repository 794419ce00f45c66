//! [`SparseLinear`]: a host-side linear layer `y = x · W + b` that stores `W` in the packed
//! format a measured cost model says is fastest for the expected token count, or densely (the
//! plain loop at one token, faer's gemm above) where no sparse kernel beats dense.
//!
//! # The cost model ([`Crossover`])
//! Times are predicted per call from constants measured on the project's 2-core AMD EPYC
//! (Zen 5, KVM) machine with both cores: `benches/kernels.rs` (criterion medians, minimum of
//! two runs with no other load) on a 2048 × 5120 weight at 50 / 70 / 90 % unstructured sparsity
//! and 2:4, tokens 1, 4, 8 and 64; the dense path also at 2, 16 and 32 tokens.
//! - **Sparse** kernels cost `nnz × tiles × c[T]`: `T` is the token tile (1, 2, 4, 8 or 16, see
//!   [`crate::kernels`]), `tiles = ceil(tokens / T)` and `c[T]` the measured nanoseconds per
//!   stored entry per tile (2-token tiles interpolated). The bitmask kernel adds
//!   `bitmask_decode` (0.027 ns) per dense entry for decoding each output's bitmask row.
//! - **Dense** costs `d_in × d_out × dense(tokens)`, `dense` interpolated linearly in a table of
//!   measured nanoseconds per weight (the plain loop at 1 token, faer's gemm above),
//!   extrapolated with its last slope past 64 tokens.
//!
//! Resulting crossovers (sparse faster below the density shown): CSR 0.71 at 1 token, 0.49 at
//! 2, 0.34 at 4, 0.37 at 8, 0.17 at 64; 2:4 (density 0.5) wins at 1 and 2 tokens. This dense
//! path is 1.2–7.3× faster than burn's Flex matmul (what the models run) at 1–64 tokens, so
//! against Flex the sparse kernels win far more often (table in [`crate::kernels`]). The
//! constants are machine-specific; [`Crossover`]'s fields are public so another machine can
//! supply its own.

use crate::error::SparseError;
use crate::formats::{BitmaskWeight, CsrWeight, NmWeight, SparseFormat, check_dense};
use crate::kernels::{bitmask, csr, dense, nm, tile_for};
use crate::mask::Mask;
use crate::pattern::SparsityPattern;

/// The product a [`SparseLinear`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelKind {
    /// Dense weight: the plain loop for one token, faer's gemm for more.
    Dense,
    /// [`CsrWeight`] kernel.
    Csr,
    /// [`BitmaskWeight`] kernel.
    Bitmask,
    /// [`NmWeight`] kernel.
    Nm,
}

/// Measured per-call cost constants (wall-clock nanoseconds, both cores); see the module docs.
#[derive(Clone, Debug, PartialEq)]
pub struct Crossover {
    /// `(tokens, ns per dense weight)` of the dense path, increasing in tokens.
    pub dense: Vec<(usize, f64)>,
    /// CSR: ns per stored entry per token tile, for tiles of 1, 2, 4, 8, 16 tokens.
    pub csr: [f64; 5],
    /// N:M (2:4 measured): same unit as `csr`.
    pub nm: [f64; 5],
    /// Bitmask: same unit as `csr`, plus `bitmask_decode` per dense entry and call.
    pub bitmask: [f64; 5],
    /// Bitmask row decoding, ns per dense entry per call.
    pub bitmask_decode: f64,
}

impl Crossover {
    /// Constants measured on the project's 2-core machine (module docs).
    pub fn measured() -> Self {
        Self {
            dense: vec![
                (1, 0.087),
                (2, 0.078),
                (4, 0.075),
                (8, 0.106),
                (16, 0.162),
                (32, 0.228),
                (64, 0.348),
            ],
            csr: [0.123, 0.16, 0.22, 0.29, 0.51],
            nm: [0.108, 0.14, 0.183, 0.255, 0.52],
            bitmask: [0.123, 0.16, 0.22, 0.29, 0.51],
            bitmask_decode: 0.027,
        }
    }

    /// Dense ns per weight at `tokens` (linear interpolation, linear extrapolation).
    fn dense_per_weight(&self, tokens: usize) -> f64 {
        let t = tokens.max(1) as f64;
        let pts = &self.dense;
        let Some(&(t0, c0)) = pts.first() else {
            return 0.0;
        };
        if pts.len() == 1 || t <= t0 as f64 {
            return c0 * (t / t0 as f64).max(1.0);
        }
        let seg = pts
            .windows(2)
            .find(|w| t <= w[1].0 as f64)
            .unwrap_or(&pts[pts.len() - 2..]);
        let ((ta, ca), (tb, cb)) = (seg[0], seg[1]);
        ca + (cb - ca) * (t - ta as f64) / (tb as f64 - ta as f64).max(1.0)
    }

    /// Predicted nanoseconds of one call.
    pub fn estimate_ns(
        &self,
        kind: KernelKind,
        d_in: usize,
        d_out: usize,
        nnz: usize,
        tokens: usize,
    ) -> f64 {
        let dense = d_in as f64 * d_out as f64;
        let tile = tile_for(tokens);
        let tiles = tokens.div_ceil(tile).max(1) as f64;
        let slot = tile.trailing_zeros() as usize; // 1, 2, 4, 8, 16 -> 0 .. 4
        let per_entry = |c: &[f64; 5]| nnz as f64 * tiles * c[slot.min(4)];
        match kind {
            KernelKind::Dense => dense * self.dense_per_weight(tokens),
            KernelKind::Csr => per_entry(&self.csr),
            KernelKind::Nm => per_entry(&self.nm),
            KernelKind::Bitmask => per_entry(&self.bitmask) + dense * self.bitmask_decode,
        }
    }

    /// The cheapest kind for a weight with `nnz` stored entries under `pattern` (N:M only when
    /// the pattern is N:M and fits the packed format).
    pub fn choose(
        &self,
        pattern: SparsityPattern,
        d_in: usize,
        d_out: usize,
        nnz: usize,
        tokens: usize,
    ) -> KernelKind {
        let nm_ok = matches!(pattern, SparsityPattern::NM { m, .. } if m <= 256)
            && pattern.validate(d_in).is_ok();
        let mut kinds = vec![KernelKind::Dense, KernelKind::Csr, KernelKind::Bitmask];
        if nm_ok {
            kinds.push(KernelKind::Nm);
        }
        kinds
            .into_iter()
            .map(|k| (k, self.estimate_ns(k, d_in, d_out, nnz, tokens)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map_or(KernelKind::Dense, |(k, _)| k)
    }
}

/// The stored weight.
#[derive(Clone, Debug)]
enum Weight {
    Dense(Vec<f32>),
    Csr(CsrWeight),
    Bitmask(BitmaskWeight),
    Nm(NmWeight),
}

/// A linear layer `y = x · W + b` on the host: `x` `[tokens, d_in]`, `W` `[d_in, d_out]`
/// (burn orientation), `b` `[d_out]`, one stored representation of `W`.
#[derive(Clone, Debug)]
pub struct SparseLinear {
    d_in: usize,
    d_out: usize,
    weight: Weight,
    bias: Option<Vec<f32>>,
}

impl SparseLinear {
    /// Stores `w ⊙ mask` in the representation [`Crossover::measured`] predicts fastest for calls
    /// of `tokens` tokens (decode: 1; prefill: the prompt length).
    pub fn new(
        w: &[f32],
        mask: &Mask,
        pattern: SparsityPattern,
        bias: Option<Vec<f32>>,
        tokens: usize,
    ) -> Result<Self, SparseError> {
        let kind = Crossover::measured().choose(
            pattern,
            mask.d_in(),
            mask.d_out(),
            mask.count_kept(),
            tokens,
        );
        Self::with_kind(w, mask, pattern, bias, kind)
    }

    /// Stores `w ⊙ mask` as `kind` (`Nm` needs an N:M `pattern` the mask satisfies).
    pub fn with_kind(
        w: &[f32],
        mask: &Mask,
        pattern: SparsityPattern,
        bias: Option<Vec<f32>>,
        kind: KernelKind,
    ) -> Result<Self, SparseError> {
        let (d_in, d_out) = mask.shape();
        check_dense(w, d_in, d_out)?;
        if let Some(b) = &bias
            && b.len() != d_out
        {
            return Err(SparseError::DimMismatch {
                what: "bias = [d_out]",
                expected: d_out,
                got: b.len(),
            });
        }
        let weight = match kind {
            KernelKind::Dense => {
                let mut dense = w.to_vec();
                mask.apply(&mut dense)?;
                Weight::Dense(dense)
            }
            KernelKind::Csr => Weight::Csr(CsrWeight::from_masked(w, mask)?),
            KernelKind::Bitmask => Weight::Bitmask(BitmaskWeight::from_masked(w, mask)?),
            KernelKind::Nm => Weight::Nm(NmWeight::from_masked(w, mask, pattern)?),
        };
        Ok(Self {
            d_in,
            d_out,
            weight,
            bias,
        })
    }

    /// The representation in use.
    pub fn kind(&self) -> KernelKind {
        match self.weight {
            Weight::Dense(_) => KernelKind::Dense,
            Weight::Csr(_) => KernelKind::Csr,
            Weight::Bitmask(_) => KernelKind::Bitmask,
            Weight::Nm(_) => KernelKind::Nm,
        }
    }

    /// `(d_in, d_out)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.d_in, self.d_out)
    }

    /// Bytes held by the weight representation (bias excluded).
    pub fn storage_bytes(&self) -> usize {
        match &self.weight {
            Weight::Dense(w) => w.len() * 4,
            Weight::Csr(w) => w.storage_bytes(),
            Weight::Bitmask(w) => w.storage_bytes(),
            Weight::Nm(w) => w.storage_bytes(),
        }
    }

    /// `y = x · W + b` for `x` `[tokens, d_in]`; returns `y` `[tokens, d_out]`.
    pub fn forward(&self, x: &[f32], tokens: usize) -> Result<Vec<f32>, SparseError> {
        let x_len = tokens.saturating_mul(self.d_in);
        if x.len() != x_len {
            return Err(SparseError::DimMismatch {
                what: "x = [tokens, d_in]",
                expected: x_len,
                got: x.len(),
            });
        }
        let mut y = vec![0.0f32; tokens * self.d_out];
        self.forward_into(x, tokens, &mut y)?;
        Ok(y)
    }

    /// [`SparseLinear::forward`] into a caller's `[tokens, d_out]` buffer (overwritten).
    pub fn forward_into(&self, x: &[f32], tokens: usize, y: &mut [f32]) -> Result<(), SparseError> {
        match &self.weight {
            // one token: the plain loop streams W faster than faer's gemv (0.92 vs 1.2 ms here)
            Weight::Dense(w) if tokens == 1 => {
                dense::matmul_dense_into(x, tokens, w, self.d_in, self.d_out, y)?
            }
            Weight::Dense(w) => dense_gemm(x, tokens, w, self.d_in, self.d_out, y)?,
            Weight::Csr(w) => csr::matmul_csr_into(x, tokens, w, y)?,
            Weight::Bitmask(w) => bitmask::matmul_bitmask_into(x, tokens, w, y)?,
            Weight::Nm(w) => nm::matmul_nm_into(x, tokens, w, y)?,
        }
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(self.d_out.max(1)) {
                for (v, bv) in row.iter_mut().zip(b) {
                    *v += bv;
                }
            }
        }
        Ok(())
    }
}

/// `y = x · W` by [`super::gemm::gemm`] (faer, column blocks over rayon). Measured against
/// faer's own `Par::rayon`: 0.76 / 1.02 / 3.6 vs 0.87 / 1.11 / 4.9 ms at 4 / 8 / 64 tokens; at
/// 1 token 1.03 vs 0.76 ms, where [`SparseLinear`] uses the plain loop (0.94 ms) instead.
fn dense_gemm(
    x: &[f32],
    tokens: usize,
    w: &[f32],
    d_in: usize,
    d_out: usize,
    y: &mut [f32],
) -> Result<(), SparseError> {
    crate::kernels::check_operands(x, tokens, d_in, d_out, y)?;
    super::gemm::gemm(
        y,
        super::gemm::MatRef::row_major(x, tokens, d_in),
        super::gemm::MatRef::row_major(w, d_in, d_out),
        false,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::test_util::{Lcg, masked_weight, nm_weight};
    use crate::kernels::test_ref::{assert_close, reference};

    #[test]
    fn every_kind_matches_the_reference() {
        let mut rng = Lcg(9);
        for (d_in, d_out, tokens) in [(64, 48, 1), (36, 70, 5), (128, 33, 20), (8, 1, 3)] {
            let (w, mask) = masked_weight(&mut rng, d_in, d_out, 0.6);
            let bias: Vec<f32> = (0..d_out).map(|_| rng.unit()).collect();
            let x: Vec<f32> = (0..tokens * d_in).map(|_| rng.unit()).collect();
            let (mut r, s) = reference(&x, tokens, &w, d_in, d_out);
            for (k, v) in r.iter_mut().enumerate() {
                *v += bias[k % d_out] as f64;
            }
            let s: Vec<f64> = s.iter().map(|v| v + 1.0).collect();
            for kind in [KernelKind::Dense, KernelKind::Csr, KernelKind::Bitmask] {
                let l = SparseLinear::with_kind(
                    &w,
                    &mask,
                    SparsityPattern::Unstructured,
                    Some(bias.clone()),
                    kind,
                )
                .unwrap();
                assert_eq!(l.kind(), kind);
                let y = l.forward(&x, tokens).unwrap();
                assert_close(&y, &(r.clone(), s.clone()), &format!("{kind:?}"));
            }
        }
        let (w, mask) = nm_weight(&mut rng, 32, 20, 2, 4);
        let x: Vec<f32> = (0..3 * 32).map(|_| rng.unit()).collect();
        let l = SparseLinear::with_kind(&w, &mask, SparsityPattern::TWO_FOUR, None, KernelKind::Nm)
            .unwrap();
        assert_close(
            &l.forward(&x, 3).unwrap(),
            &reference(&x, 3, &w, 32, 20),
            "nm",
        );
    }

    #[test]
    fn picks_by_crossover() {
        let c = Crossover::measured();
        let (d_in, d_out) = (2048, 5120);
        let n = d_in * d_out;
        let u = SparsityPattern::Unstructured;
        // 70 % unstructured: sparse for decode, dense for long prompts
        assert_eq!(c.choose(u, d_in, d_out, n * 3 / 10, 1), KernelKind::Csr);
        assert_eq!(c.choose(u, d_in, d_out, n * 3 / 10, 64), KernelKind::Dense);
        // 90 %: sparse throughout
        assert_eq!(c.choose(u, d_in, d_out, n / 10, 64), KernelKind::Csr);
        // dense weights stay dense
        assert_eq!(c.choose(u, d_in, d_out, n, 1), KernelKind::Dense);
        // 2:4 at one token: the N:M kernel
        assert_eq!(
            c.choose(SparsityPattern::TWO_FOUR, d_in, d_out, n / 2, 1),
            KernelKind::Nm
        );
        // sparse estimates grow with tokens (dense: faer at 4 tokens beats the 1-token loop)
        for k in [KernelKind::Csr, KernelKind::Bitmask, KernelKind::Nm] {
            let e: Vec<f64> = [1, 4, 8, 64, 200]
                .iter()
                .map(|&t| c.estimate_ns(k, d_in, d_out, n / 2, t))
                .collect();
            assert!(e.windows(2).all(|p| p[0] <= p[1]), "{k:?}: {e:?}");
        }
        let mask = Mask::from_fn(16, 8, |i, j| (i + j) % 5 == 0).unwrap();
        let l = SparseLinear::new(&[1.0; 128], &mask, u, None, 1).unwrap();
        assert_eq!(l.kind(), KernelKind::Csr);
        assert!(l.storage_bytes() < 128 * 4);
    }

    #[test]
    fn rejects_bad_inputs() {
        let mask = Mask::ones(4, 3).unwrap();
        let u = SparsityPattern::Unstructured;
        assert!(SparseLinear::new(&[1.0; 11], &mask, u, None, 1).is_err());
        assert!(SparseLinear::new(&[1.0; 12], &mask, u, Some(vec![0.0; 2]), 1).is_err());
        // N:M storage for a mask that is not 2:4
        assert!(
            SparseLinear::with_kind(
                &[1.0; 12],
                &mask,
                SparsityPattern::TWO_FOUR,
                None,
                KernelKind::Nm
            )
            .is_err()
        );
        for kind in [KernelKind::Dense, KernelKind::Csr] {
            let l = SparseLinear::with_kind(&[1.0; 12], &mask, u, None, kind).unwrap();
            assert!(l.forward(&[1.0; 5], 1).is_err());
            assert!(l.forward_into(&[1.0; 4], 1, &mut [0.0; 2]).is_err());
            assert_eq!(l.forward(&[], 0).unwrap(), Vec::<f32>::new());
        }
    }
}
