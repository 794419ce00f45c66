//! SparseGPT: mask selection with OBS reconstruction of the surviving weights.
//!
//! Burn orientation: the weight is `[d_in, d_out]`, so PyTorch's input column `k` is the
//! contiguous burn row `k`, and the Hessian is `d_in × d_in` in both layouts.
//!
//! 1. Hessian `H = (2/N) Σ_s X_sᵀ X_s` over the `N` calibration samples. The reference
//!    updates it per batch as `H ← H·k/(k+b); k ← k+b; H += (2/k)·XᵀX`, whose final value is
//!    exactly this; here the raw sum `Σ XᵀX` is accumulated (lower triangle, `f32`, via faer,
//!    batching small inputs) and scaled by `2/N` once.
//! 2. Dead inputs (`H_jj = 0`): `H_jj = 1` and burn row `j` of `W` (PyTorch column `j`) = 0.
//! 3. Damping `H += λ·mean(diag H)·I` (`percdamp` λ = 0.01); if the Cholesky factorization
//!    fails, the damping is added again, at most `max_dampings` times in total, then
//!    [`PruneError::HessianNotPositiveDefinite`].
//! 4. `U` = upper Cholesky factor of `H⁻¹` (Cholesky → inverse → Cholesky, `f64`, faer); a
//!    failing second factorization is retried likewise with `λ·mean(|diag H⁻¹|)`.
//! 5. Blocks of `block_size` inputs: unstructured selection over the whole block (all outputs
//!    together, "adaptive mask selection") on `W²/diag(U)²` with `k = floor(s·numel(block))`
//!    and the configured [`ThresholdRule`]; N:M selection on the updated block every `m`
//!    inputs; OBS updates inside the block; lazy update of the later inputs,
//!    `W[b1.., :] -= U[b0..b1, b1..]ᵀ · E`.
//!
//! Returns the selection mask and the reconstructed weights (pruned entries exactly zero).
//! A kept entry can be exactly zero too (a dead input at low sparsity), so the mask is the
//! selection, not `W != 0`.
//!
//! # Deviations
//! - Default [`ThresholdRule::ExactCount`] prunes exactly `k` per block; upstream prunes
//!   `score <= thr` (`k + 1` without ties): select it with [`ThresholdRule::AtOrBelowKth`].
//! - `VLM-Compression`'s `sparsegpt_pruner.py` first tries the Cholesky without damping and
//!   damps only on failure, retrying without bound, and clamps infinite Hessian entries to
//!   quantiles. Here damping is always applied first (upstream SparseGPT and the reference
//!   notes), retries are bounded, and non-finite inputs are rejected up front.
//! - The Cholesky/inverse steps run in `f64` (the reference uses `f32`).

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::cholesky::llt::inverse;
use faer::linalg::matmul::triangular::BlockStructure;
use faer::mat::AsMatMut;
use faer::prelude::{Reborrow, ReborrowMut};
use faer::{Accum, Mat, MatMut, MatRef, Par};
use rayon::prelude::*;
use ressa_sparse::{Mask, SparsityPattern};

use crate::error::check_finite;
use crate::select::{cmp_keyed, floor_count, select_matrix};
use crate::stats::validate_batch;
use crate::{Method, PruneError, PruneOutput, PruneSpec, Pruner, Result, ThresholdRule, Weights};

/// Tokens buffered before a Hessian update (larger products run faster).
const FLUSH_TOKENS: usize = 512;

/// SparseGPT configuration. Defaults are the reference's.
#[derive(Clone, Debug, PartialEq)]
pub struct SparseGptConfig {
    /// Inputs per block (reference 128). Must be a multiple of `m` for N:M.
    pub block_size: usize,
    /// Damping fraction λ of the mean Hessian diagonal (reference 0.01).
    pub percdamp: f64,
    /// Maximum number of dampings before giving up.
    pub max_dampings: usize,
    /// Count rule of the per-block unstructured selection.
    pub threshold_rule: ThresholdRule,
}

impl Default for SparseGptConfig {
    fn default() -> Self {
        Self {
            block_size: 128,
            percdamp: 0.01,
            max_dampings: 10,
            threshold_rule: ThresholdRule::ExactCount,
        }
    }
}

impl SparseGptConfig {
    fn validate(&self, spec: &PruneSpec, d_in: usize) -> Result<()> {
        if self.block_size == 0 {
            return Err(PruneError::InvalidConfig(
                "SparseGPT block_size must be > 0".into(),
            ));
        }
        if !(self.percdamp.is_finite() && self.percdamp > 0.0) {
            return Err(PruneError::InvalidConfig(format!(
                "SparseGPT percdamp {} must be finite and > 0",
                self.percdamp
            )));
        }
        if self.max_dampings == 0 {
            return Err(PruneError::InvalidConfig(
                "SparseGPT max_dampings must be > 0".into(),
            ));
        }
        spec.validate(d_in)?;
        if let SparsityPattern::NM { m, .. } = spec.pattern()
            && !self.block_size.is_multiple_of(m)
        {
            return Err(PruneError::InvalidConfig(format!(
                "SparseGPT block_size {} must be a multiple of m = {m}",
                self.block_size
            )));
        }
        Ok(())
    }
}

/// Adds `xᵀx` (x row-major `[t, d]`) to the lower triangle of the column-major `d × d` `h`.
fn accumulate_xtx(h: &mut [f32], d: usize, x: &[f32], t: usize) {
    let xm = MatRef::from_row_major_slice(x, t, d);
    let hm = MatMut::from_column_major_slice_mut(h, d, d);
    faer::linalg::matmul::triangular::matmul(
        hm,
        BlockStructure::TriangularLower,
        Accum::Add,
        xm.transpose(),
        BlockStructure::Rectangular,
        xm,
        BlockStructure::Rectangular,
        1.0f32,
        Par::rayon(0),
    );
}

/// In-place lower Cholesky of `a`; `Err` when a pivot is not positive.
fn cholesky_lower(a: &mut Mat<f64>) -> std::result::Result<(), ()> {
    use faer::dyn_stack::{MemBuffer, MemStack};
    use faer::linalg::cholesky::llt::factor;
    let n = a.nrows();
    let par = Par::rayon(0);
    let mut mem = MemBuffer::new(factor::cholesky_in_place_scratch::<f64>(
        n,
        par,
        Default::default(),
    ));
    let stack = MemStack::new(&mut mem);
    factor::cholesky_in_place(
        a.as_mut(),
        Default::default(),
        par,
        stack,
        Default::default(),
    )
    .map(|_| ())
    .map_err(|_| ())
}

/// An `n × n` matrix whose lower triangle (diagonal included) is `f(i, j)`. Its strict upper
/// triangle is never written, and never read: faer's Cholesky, triangular inverse and the
/// triangular product here read and write the lower triangle only (the copying reference in
/// the tests, on full symmetric matrices, gives the same bits). Left unwritten, those pages of
/// a fresh allocation never become resident: a `d_in²` `f64` matrix costs half its size in
/// RAM (SparseGPT's memory peak is two of them at 11008 inputs).
fn lower_mat(n: usize, f: impl Fn(usize, usize) -> f64 + Sync) -> Mat<f64> {
    let mut m = Mat::<f64>::with_capacity(n, n);
    // SAFETY: the capacity is n × n; only the lower triangle is written below, and nothing
    // reads the rest (see above).
    unsafe { m.set_dims(n, n) };
    let stride = m.col_stride();
    let base = m.as_ptr_mut() as usize;
    (0..n).into_par_iter().for_each(|j| {
        let col = base as *mut f64;
        for i in j..n {
            // SAFETY: (i, j) is inside the matrix; columns are written by one thread each.
            unsafe { col.offset(i as isize + j as isize * stride).write(f(i, j)) };
        }
    });
    m
}

/// In-place lower Cholesky of `a + applied·damp·I` (lower triangle only); `false` when it
/// fails, leaving `a` destroyed.
fn damped_cholesky_in_place(a: &mut Mat<f64>, applied: usize, damp: f64) -> bool {
    let n = a.nrows();
    for i in 0..n {
        a[(i, i)] += applied as f64 * damp;
    }
    cholesky_lower(a).is_ok() && (0..n).all(|i| a[(i, i)].is_finite())
}

/// `out = (L Lᵀ)⁻¹ = L⁻ᵀ L⁻¹` (lower triangle) from `l_inv` = L⁻¹ (lower triangle), as
/// faer's `llt::inverse` computes it.
fn square_inverse(out: &mut Mat<f64>, l_inv: MatRef<'_, f64>) {
    faer::linalg::matmul::triangular::matmul(
        out.as_mut(),
        BlockStructure::TriangularLower,
        Accum::Replace,
        l_inv.adjoint(),
        BlockStructure::TriangularUpper,
        l_inv,
        BlockStructure::TriangularLower,
        1.0f64,
        Par::rayon(0),
    );
}

/// SparseGPT on a given Hessian (`d_in × d_in`, symmetric, already scaled, `f32`
/// row-major). Returns the mask and the reconstructed weights.
pub fn sparsegpt_prune(
    weights: Weights<'_>,
    hessian: &[f32],
    spec: &PruneSpec,
    config: &SparseGptConfig,
) -> Result<PruneOutput> {
    let d_in = weights.d_in();
    if hessian.len() != d_in * d_in {
        return Err(PruneError::DimMismatch {
            expected: d_in,
            got: (hessian.len() as f64).sqrt() as usize,
        });
    }
    check_finite("hessian", hessian)?;
    let build = || lower_mat(d_in, |i, j| hessian[i * d_in + j] as f64);
    run(weights, &build, &mut || {}, spec, config)
}

/// The core. `hessian()` builds the `f64` Hessian (again when a factorization in place failed
/// and is retried with more damping); `release()` is called once it is no longer needed.
///
/// Memory: at most two `d_in²` `f64` matrices at a time (the factor and its inverse), each
/// factorization in place, of which only the lower triangles are ever touched ([`lower_mat`]);
/// the results are those of factorizing copies.
fn run(
    weights: Weights<'_>,
    hessian: &dyn Fn() -> Mat<f64>,
    release: &mut dyn FnMut(),
    spec: &PruneSpec,
    config: &SparseGptConfig,
) -> Result<PruneOutput> {
    let (d_in, d_out) = (weights.d_in(), weights.d_out());
    config.validate(spec, d_in)?;
    let mut h = hessian();
    // finite activations can still overflow f32 in Σ XᵀX (lower triangle: H is symmetric)
    if let Some((i, j)) = (0..d_in)
        .flat_map(|i| (0..=i).map(move |j| (i, j)))
        .find(|&(i, j)| !h[(i, j)].is_finite())
    {
        return Err(PruneError::NonFinite {
            what: "Hessian (activations too large for f32)",
            index: i * d_in + j,
            value: h[(i, j)] as f32,
        });
    }
    let mut w = weights.data().to_vec();

    // dead inputs
    let mut dead = Vec::new();
    for j in 0..d_in {
        if h[(j, j)] == 0.0 {
            h[(j, j)] = 1.0;
            w[j * d_out..(j + 1) * d_out].fill(0.0);
            dead.push(j);
        }
    }
    let mean_diag = (0..d_in).map(|i| h[(i, i)]).sum::<f64>() / d_in as f64;
    // L = chol(H + t·λ·mean(diag H)·I), t = 1, 2, … until it succeeds
    let damp = config.percdamp * mean_diag;
    let mut applied = 1usize;
    let mut l = h;
    while !damped_cholesky_in_place(&mut l, applied, damp) {
        if applied >= config.max_dampings {
            return Err(PruneError::HessianNotPositiveDefinite(applied));
        }
        applied += 1;
        l = hessian();
        for &j in &dead {
            l[(j, j)] = 1.0;
        }
    }
    release();

    // H⁻¹ = L⁻ᵀ L⁻¹ (as faer's `llt::inverse`), written over L's storage; L⁻¹ is kept to
    // rebuild H⁻¹ if its factorization has to be retried.
    let l2 = {
        let par = Par::rayon(0);
        let mut mem = MemBuffer::new(inverse::inverse_scratch::<f64>(d_in, par));
        let stack = MemStack::new(&mut mem);
        // SAFETY: every entry `square_inverse` reads (the lower part) is written by
        // `invert_lower_triangular` first.
        let (mut l_inv, _) =
            unsafe { faer::linalg::temp_mat_uninit::<f64, _, _>(d_in, d_in, stack) };
        let mut l_inv = l_inv.as_mat_mut();
        faer::linalg::triangular_inverse::invert_lower_triangular(l_inv.rb_mut(), l.as_ref(), par);
        let l_inv = l_inv.rb();
        let mut hinv = l;
        square_inverse(&mut hinv, l_inv);
        let mean_abs = (0..d_in).map(|i| hinv[(i, i)].abs()).sum::<f64>() / d_in as f64;
        // U = chol(H⁻¹ + t·λ·mean|diag H⁻¹|·I)ᵀ, t = 0, 1, …
        let damp = config.percdamp * mean_abs;
        let mut applied = 0usize;
        let mut l2 = hinv;
        while !damped_cholesky_in_place(&mut l2, applied, damp) {
            if applied >= config.max_dampings {
                return Err(PruneError::InverseHessianNotPositiveDefinite(applied));
            }
            applied += 1;
            square_inverse(&mut l2, l_inv);
        }
        l2
    };
    // U = L2ᵀ (upper), row-major f32
    let mut u = vec![0f32; d_in * d_in];
    u.par_chunks_mut(d_in).enumerate().for_each(|(r, row)| {
        for (c, x) in row.iter_mut().enumerate().skip(r) {
            *x = l2[(c, r)] as f32;
        }
    });
    drop(l2);

    let mut keep = vec![true; d_in * d_out];
    let bs = config.block_size;
    let nm = match spec.pattern() {
        SparsityPattern::NM { n, m } => Some((n, m)),
        SparsityPattern::Unstructured => None,
    };
    let threads = rayon::current_num_threads().max(1);
    let cw = (d_out / (2 * threads)).clamp(16, 256);
    let starts: Vec<usize> = (0..d_out).step_by(cw).collect();
    let mut err = vec![0f32; bs.min(d_in) * d_out];

    for b0 in (0..d_in).step_by(bs) {
        let b1 = (b0 + bs).min(d_in);
        let nb = b1 - b0;
        let ub: Vec<f32> = (b0..b1)
            .flat_map(|r| u[r * d_in + b0..r * d_in + b1].iter().copied())
            .collect();
        let udiag: Vec<f64> = (0..nb).map(|k| ub[k * nb + k] as f64).collect();
        let wblock = &mut w[b0 * d_out..b1 * d_out];
        let kblock = &mut keep[b0 * d_out..b1 * d_out];

        if nm.is_none() {
            let scores: Vec<f64> = wblock
                .par_chunks(d_out)
                .zip(&udiag)
                .flat_map_iter(|(row, &d)| row.iter().map(move |&x| (x as f64).powi(2) / (d * d)))
                .collect();
            let k = floor_count(nb * d_out, spec.sparsity());
            let sel = select_matrix(&scores, nb, d_out, k, config.threshold_rule);
            kblock.copy_from_slice(&sel);
        }

        // OBS inside the block, independent per output: parallel over column chunks
        let wref: &[f32] = wblock;
        let kref: &[bool] = kblock;
        let results: Vec<(Vec<f32>, Vec<f32>, Vec<bool>)> = starts
            .par_iter()
            .map(|&j0| {
                let ncols = cw.min(d_out - j0);
                let mut wl = vec![0f32; nb * ncols];
                let mut kl = vec![true; nb * ncols];
                for k in 0..nb {
                    wl[k * ncols..(k + 1) * ncols]
                        .copy_from_slice(&wref[k * d_out + j0..k * d_out + j0 + ncols]);
                    kl[k * ncols..(k + 1) * ncols]
                        .copy_from_slice(&kref[k * d_out + j0..k * d_out + j0 + ncols]);
                }
                let mut el = vec![0f32; nb * ncols];
                let mut pairs: Vec<(f64, u32)> = Vec::with_capacity(64);
                for k in 0..nb {
                    if let Some((n, m)) = nm
                        && k % m == 0
                    {
                        for c in 0..ncols {
                            pairs.clear();
                            pairs.extend((0..m).map(|g| {
                                let x = wl[(k + g) * ncols + c] as f64;
                                (x * x / (udiag[k + g] * udiag[k + g]), g as u32)
                            }));
                            pairs.sort_by(cmp_keyed);
                            for &(_, g) in &pairs[..n] {
                                kl[(k + g as usize) * ncols + c] = false;
                            }
                        }
                    }
                    let d = ub[k * nb + k];
                    let (head, tail) = wl.split_at_mut((k + 1) * ncols);
                    let row = &mut head[k * ncols..];
                    let e = &mut el[k * ncols..(k + 1) * ncols];
                    let kr = &kl[k * ncols..(k + 1) * ncols];
                    for ((x, ek), &kp) in row.iter_mut().zip(e.iter_mut()).zip(kr) {
                        let q = if kp { *x } else { 0.0 };
                        *ek = (*x - q) / d;
                        *x = q;
                    }
                    for (k2, row2) in tail.chunks_exact_mut(ncols).enumerate() {
                        let uk = ub[k * nb + k + 1 + k2];
                        if uk != 0.0 {
                            for (y, &ek) in row2.iter_mut().zip(e.iter()) {
                                *y -= ek * uk;
                            }
                        }
                    }
                }
                (wl, el, kl)
            })
            .collect();

        // write back the block, its errors and its mask
        let eblock = &mut err[..nb * d_out];
        wblock
            .par_chunks_mut(d_out)
            .zip(eblock.par_chunks_mut(d_out))
            .zip(kblock.par_chunks_mut(d_out))
            .enumerate()
            .for_each(|(k, ((wrow, erow), krow))| {
                for ((wl, el, kl), &j0) in results.iter().zip(&starts) {
                    let ncols = wl.len() / nb;
                    let src = k * ncols..(k + 1) * ncols;
                    wrow[j0..j0 + ncols].copy_from_slice(&wl[src.clone()]);
                    erow[j0..j0 + ncols].copy_from_slice(&el[src.clone()]);
                    krow[j0..j0 + ncols].copy_from_slice(&kl[src]);
                }
            });

        // lazy update of the later inputs
        if b1 < d_in {
            let rest = &mut w[b1 * d_out..];
            let dst = MatMut::from_row_major_slice_mut(rest, d_in - b1, d_out);
            let lhs = MatRef::from_row_major_slice(&u, d_in, d_in)
                .submatrix(b0, b1, nb, d_in - b1)
                .transpose();
            let rhs = MatRef::from_row_major_slice(&err[..nb * d_out], nb, d_out);
            faer::linalg::matmul::matmul(dst, Accum::Add, lhs, rhs, -1.0f32, Par::rayon(0));
        }
    }

    Ok(PruneOutput {
        mask: Mask::from_bools(d_in, d_out, &keep)?,
        weights: Some(w),
    })
}

/// [`Pruner`] for SparseGPT: accumulates the layer Hessian.
#[derive(Clone, Debug)]
pub struct SparseGptPruner {
    d_in: usize,
    config: SparseGptConfig,
    /// Σ XᵀX, column-major, lower triangle valid.
    hsum: Vec<f32>,
    nsamples: u64,
    pending: Vec<f32>,
    pending_tokens: usize,
}

impl SparseGptPruner {
    /// A pruner for a Linear with `d_in` inputs (allocates `d_in²` floats).
    pub fn new(d_in: usize, config: SparseGptConfig) -> Result<Self> {
        if d_in == 0 {
            return Err(PruneError::Empty("input dimension"));
        }
        let n = d_in.checked_mul(d_in).ok_or(PruneError::Empty(
            "input dimension (Hessian size overflows)",
        ))?;
        Ok(Self {
            d_in,
            config,
            hsum: vec![0.0; n],
            nsamples: 0,
            pending: Vec::new(),
            pending_tokens: 0,
        })
    }

    fn flush(&mut self) {
        if self.pending_tokens > 0 {
            accumulate_xtx(
                &mut self.hsum,
                self.d_in,
                &self.pending,
                self.pending_tokens,
            );
            self.pending.clear();
            self.pending_tokens = 0;
        }
    }

    /// The Hessian `H = (2/N) Σ XᵀX` (row-major, symmetric, `f32`).
    pub fn hessian(&self) -> Result<Vec<f32>> {
        if self.nsamples == 0 {
            return Err(PruneError::EmptyStatistics);
        }
        let d = self.d_in;
        let mut sum = self.hsum.clone();
        if self.pending_tokens > 0 {
            accumulate_xtx(&mut sum, d, &self.pending, self.pending_tokens);
        }
        let scale = 2.0 / self.nsamples as f64;
        let mut h = vec![0f32; d * d];
        h.par_chunks_mut(d).enumerate().for_each(|(i, row)| {
            for (j, x) in row.iter_mut().enumerate() {
                // column-major lower: element (r, c) with r >= c at c * d + r
                let (r, c) = if i >= j { (i, j) } else { (j, i) };
                *x = (sum[c * d + r] as f64 * scale) as f32;
            }
        });
        Ok(h)
    }

    /// `H = (2/N) Σ XᵀX` in `f64` from the column-major lower sum `src`.
    fn hessian_f64_of(&self, src: &[f32]) -> Mat<f64> {
        let d = self.d_in;
        let scale = 2.0 / self.nsamples as f64;
        // (i, j) with i >= j: the column-major lower sum's element at j * d + i
        lower_mat(d, |i, j| src[j * d + i] as f64 * scale)
    }

    fn hessian_f64(&self) -> Mat<f64> {
        if self.pending_tokens > 0 {
            let mut sum = self.hsum.clone();
            accumulate_xtx(&mut sum, self.d_in, &self.pending, self.pending_tokens);
            self.hessian_f64_of(&sum)
        } else {
            self.hessian_f64_of(&self.hsum)
        }
    }
}

impl Pruner for SparseGptPruner {
    fn method(&self) -> Method {
        Method::SparseGpt
    }

    fn d_in(&self) -> usize {
        self.d_in
    }

    fn add_batch_samples(&mut self, x: &[f32], n_tokens: usize, n_samples: usize) -> Result<()> {
        validate_batch(x, n_tokens, self.d_in, n_samples)?;
        self.pending.extend_from_slice(x);
        self.pending_tokens += n_tokens;
        self.nsamples += n_samples as u64;
        if self.pending_tokens >= FLUSH_TOKENS {
            self.flush();
        }
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
        self.config.validate(spec, self.d_in)?;
        if self.nsamples == 0 {
            return Err(PruneError::EmptyStatistics);
        }
        run(
            weights,
            &|| self.hessian_f64(),
            &mut || {},
            spec,
            &self.config,
        )
    }

    /// Drops the `d_in²` Hessian sum once the Hessian is factorized.
    fn prune_once(
        mut self: Box<Self>,
        weights: Weights<'_>,
        spec: &PruneSpec,
    ) -> Result<PruneOutput> {
        if weights.d_in() != self.d_in {
            return Err(PruneError::DimMismatch {
                expected: self.d_in,
                got: weights.d_in(),
            });
        }
        self.config.validate(spec, self.d_in)?;
        if self.nsamples == 0 {
            return Err(PruneError::EmptyStatistics);
        }
        self.flush();
        let hsum = std::cell::RefCell::new(Some(std::mem::take(&mut self.hsum)));
        let this = &*self;
        let build = || this.hessian_f64_of(hsum.borrow().as_deref().expect("held until released"));
        run(
            weights,
            &build,
            &mut || drop(hsum.borrow_mut().take()),
            spec,
            &self.config,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ressa_sparse::is_n_m;

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f64 / (1u64 << 31) as f64) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    /// The implementation before the in-place factorizations (each step on a copy), kept to
    /// check that the new one gives the same bits.
    mod reference {
        use super::super::*;

        /// `(L Lᵀ)⁻¹` from a lower factor, full symmetric result.
        fn inverse_from_lower_ref(l: &Mat<f64>) -> Mat<f64> {
            use faer::dyn_stack::{MemBuffer, MemStack};
            use faer::linalg::cholesky::llt::inverse;
            let n = l.nrows();
            let par = Par::rayon(0);
            let mut out = Mat::<f64>::zeros(n, n);
            let mut mem = MemBuffer::new(inverse::inverse_scratch::<f64>(n, par));
            let stack = MemStack::new(&mut mem);
            inverse::inverse(out.as_mut(), l.as_ref(), par, stack);
            symmetrize_from_lower_ref(&mut out);
            out
        }

        fn symmetrize_from_lower_ref(a: &mut Mat<f64>) {
            let n = a.nrows();
            for j in 0..n {
                for i in 0..j {
                    a[(i, j)] = a[(j, i)];
                }
            }
        }

        /// Cholesky of `a + t·damp·I` for `t = first, first+1, ...`, at most `max` dampings.
        /// Returns the lower factor (upper part zeroed) or the number of dampings tried.
        fn damped_cholesky_ref(
            a: &Mat<f64>,
            damp: f64,
            damp_first: bool,
            max: usize,
        ) -> std::result::Result<Mat<f64>, usize> {
            let n = a.nrows();
            let mut applied = 0usize;
            if damp_first {
                applied = 1;
            }
            loop {
                let mut l = a.clone();
                for i in 0..n {
                    l[(i, i)] += applied as f64 * damp;
                }
                if cholesky_lower(&mut l).is_ok() && (0..n).all(|i| l[(i, i)].is_finite()) {
                    for j in 0..n {
                        for i in 0..j {
                            l[(i, j)] = 0.0;
                        }
                    }
                    return Ok(l);
                }
                if applied >= max {
                    return Err(applied);
                }
                applied += 1;
            }
        }

        /// The core, with the (mutable) `f64` Hessian.
        pub(super) fn run_ref(
            weights: Weights<'_>,
            mut h: Mat<f64>,
            spec: &PruneSpec,
            config: &SparseGptConfig,
        ) -> Result<PruneOutput> {
            let (d_in, d_out) = (weights.d_in(), weights.d_out());
            config.validate(spec, d_in)?;
            // finite activations can still overflow f32 in Σ XᵀX
            if let Some(k) = (0..d_in * d_in).find(|&k| !h[(k / d_in, k % d_in)].is_finite()) {
                return Err(PruneError::NonFinite {
                    what: "Hessian (activations too large for f32)",
                    index: k,
                    value: h[(k / d_in, k % d_in)] as f32,
                });
            }
            let mut w = weights.data().to_vec();

            // dead inputs
            for j in 0..d_in {
                if h[(j, j)] == 0.0 {
                    h[(j, j)] = 1.0;
                    w[j * d_out..(j + 1) * d_out].fill(0.0);
                }
            }
            let mean_diag = (0..d_in).map(|i| h[(i, i)]).sum::<f64>() / d_in as f64;
            let l = damped_cholesky_ref(&h, config.percdamp * mean_diag, true, config.max_dampings)
                .map_err(PruneError::HessianNotPositiveDefinite)?;
            drop(h);
            let hinv = inverse_from_lower_ref(&l);
            drop(l);
            let mean_abs = (0..d_in).map(|i| hinv[(i, i)].abs()).sum::<f64>() / d_in as f64;
            let l2 = damped_cholesky_ref(
                &hinv,
                config.percdamp * mean_abs,
                false,
                config.max_dampings,
            )
            .map_err(PruneError::InverseHessianNotPositiveDefinite)?;
            drop(hinv);
            // U = L2ᵀ (upper), row-major f32
            let mut u = vec![0f32; d_in * d_in];
            u.par_chunks_mut(d_in).enumerate().for_each(|(r, row)| {
                for (c, x) in row.iter_mut().enumerate().skip(r) {
                    *x = l2[(c, r)] as f32;
                }
            });
            drop(l2);

            let mut keep = vec![true; d_in * d_out];
            let bs = config.block_size;
            let nm = match spec.pattern() {
                SparsityPattern::NM { n, m } => Some((n, m)),
                SparsityPattern::Unstructured => None,
            };
            let threads = rayon::current_num_threads().max(1);
            let cw = (d_out / (2 * threads)).clamp(16, 256);
            let starts: Vec<usize> = (0..d_out).step_by(cw).collect();
            let mut err = vec![0f32; bs.min(d_in) * d_out];

            for b0 in (0..d_in).step_by(bs) {
                let b1 = (b0 + bs).min(d_in);
                let nb = b1 - b0;
                let ub: Vec<f32> = (b0..b1)
                    .flat_map(|r| u[r * d_in + b0..r * d_in + b1].iter().copied())
                    .collect();
                let udiag: Vec<f64> = (0..nb).map(|k| ub[k * nb + k] as f64).collect();
                let wblock = &mut w[b0 * d_out..b1 * d_out];
                let kblock = &mut keep[b0 * d_out..b1 * d_out];

                if nm.is_none() {
                    let scores: Vec<f64> = wblock
                        .par_chunks(d_out)
                        .zip(&udiag)
                        .flat_map_iter(|(row, &d)| {
                            row.iter().map(move |&x| (x as f64).powi(2) / (d * d))
                        })
                        .collect();
                    let k = floor_count(nb * d_out, spec.sparsity());
                    let sel = select_matrix(&scores, nb, d_out, k, config.threshold_rule);
                    kblock.copy_from_slice(&sel);
                }

                // OBS inside the block, independent per output: parallel over column chunks
                let wref: &[f32] = wblock;
                let kref: &[bool] = kblock;
                let results: Vec<(Vec<f32>, Vec<f32>, Vec<bool>)> = starts
                    .par_iter()
                    .map(|&j0| {
                        let ncols = cw.min(d_out - j0);
                        let mut wl = vec![0f32; nb * ncols];
                        let mut kl = vec![true; nb * ncols];
                        for k in 0..nb {
                            wl[k * ncols..(k + 1) * ncols]
                                .copy_from_slice(&wref[k * d_out + j0..k * d_out + j0 + ncols]);
                            kl[k * ncols..(k + 1) * ncols]
                                .copy_from_slice(&kref[k * d_out + j0..k * d_out + j0 + ncols]);
                        }
                        let mut el = vec![0f32; nb * ncols];
                        let mut pairs: Vec<(f64, u32)> = Vec::with_capacity(64);
                        for k in 0..nb {
                            if let Some((n, m)) = nm
                                && k % m == 0
                            {
                                for c in 0..ncols {
                                    pairs.clear();
                                    pairs.extend((0..m).map(|g| {
                                        let x = wl[(k + g) * ncols + c] as f64;
                                        (x * x / (udiag[k + g] * udiag[k + g]), g as u32)
                                    }));
                                    pairs.sort_by(cmp_keyed);
                                    for &(_, g) in &pairs[..n] {
                                        kl[(k + g as usize) * ncols + c] = false;
                                    }
                                }
                            }
                            let d = ub[k * nb + k];
                            let (head, tail) = wl.split_at_mut((k + 1) * ncols);
                            let row = &mut head[k * ncols..];
                            let e = &mut el[k * ncols..(k + 1) * ncols];
                            let kr = &kl[k * ncols..(k + 1) * ncols];
                            for ((x, ek), &kp) in row.iter_mut().zip(e.iter_mut()).zip(kr) {
                                let q = if kp { *x } else { 0.0 };
                                *ek = (*x - q) / d;
                                *x = q;
                            }
                            for (k2, row2) in tail.chunks_exact_mut(ncols).enumerate() {
                                let uk = ub[k * nb + k + 1 + k2];
                                if uk != 0.0 {
                                    for (y, &ek) in row2.iter_mut().zip(e.iter()) {
                                        *y -= ek * uk;
                                    }
                                }
                            }
                        }
                        (wl, el, kl)
                    })
                    .collect();

                // write back the block, its errors and its mask
                let eblock = &mut err[..nb * d_out];
                wblock
                    .par_chunks_mut(d_out)
                    .zip(eblock.par_chunks_mut(d_out))
                    .zip(kblock.par_chunks_mut(d_out))
                    .enumerate()
                    .for_each(|(k, ((wrow, erow), krow))| {
                        for ((wl, el, kl), &j0) in results.iter().zip(&starts) {
                            let ncols = wl.len() / nb;
                            let src = k * ncols..(k + 1) * ncols;
                            wrow[j0..j0 + ncols].copy_from_slice(&wl[src.clone()]);
                            erow[j0..j0 + ncols].copy_from_slice(&el[src.clone()]);
                            krow[j0..j0 + ncols].copy_from_slice(&kl[src]);
                        }
                    });

                // lazy update of the later inputs
                if b1 < d_in {
                    let rest = &mut w[b1 * d_out..];
                    let dst = MatMut::from_row_major_slice_mut(rest, d_in - b1, d_out);
                    let lhs = MatRef::from_row_major_slice(&u, d_in, d_in)
                        .submatrix(b0, b1, nb, d_in - b1)
                        .transpose();
                    let rhs = MatRef::from_row_major_slice(&err[..nb * d_out], nb, d_out);
                    faer::linalg::matmul::matmul(dst, Accum::Add, lhs, rhs, -1.0f32, Par::rayon(0));
                }
            }

            Ok(PruneOutput {
                mask: Mask::from_bools(d_in, d_out, &keep)?,
                weights: Some(w),
            })
        }
    }

    #[test]
    fn in_place_factorizations_give_the_copying_implementations_bits() {
        for (d_in, d_out, t, seed, nm) in [
            (64, 24, 40, 11, false),
            (200, 16, 150, 12, false),
            (256, 32, 30, 13, false),
            (131, 9, 500, 14, false),
            (128, 20, 100, 15, true),
            (520, 40, 700, 16, false),
        ] {
            let w = rand_vec(d_in * d_out, seed);
            let mut x = rand_vec(t * d_in, seed + 100);
            // a dead input and a near-duplicate pair (damping retries)
            for r in 0..t {
                x[r * d_in + 3] = 0.0;
                x[r * d_in + 5] = x[r * d_in + 4];
            }
            let mut p = SparseGptPruner::new(d_in, SparseGptConfig::default()).unwrap();
            for chunk in x.chunks(d_in * 7) {
                p.add_batch(chunk, chunk.len() / d_in).unwrap();
            }
            let spec = if nm {
                PruneSpec::n_m(2, 4).unwrap()
            } else {
                PruneSpec::unstructured(0.6).unwrap()
            };
            let weights = Weights::new(&w, d_in, d_out).unwrap();
            // the reference factorizes full symmetric copies
            let lower = p.hessian_f64();
            let full = Mat::<f64>::from_fn(d_in, d_in, |i, j| lower[(i.max(j), i.min(j))]);
            let expected = reference::run_ref(weights, full, &spec, &p.config).unwrap();
            let got = p.prune(weights, &spec).unwrap();
            let once = Box::new(p.clone()).prune_once(weights, &spec).unwrap();
            for out in [&got, &once] {
                assert_eq!(out.mask, expected.mask, "{d_in}x{d_out}");
                let (a, b) = (
                    out.weights.as_ref().unwrap(),
                    expected.weights.as_ref().unwrap(),
                );
                assert!(
                    a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{d_in}x{d_out}: weights differ"
                );
            }
        }
    }

    #[test]
    fn damping_retries_give_the_copying_implementations_bits() {
        // H = I − 1.025·vvᵀ (v = 1/√n): one eigenvalue −0.025, so the Cholesky fails with
        // 1 and 2 dampings of 0.01·mean(diag) and succeeds with 3.
        let (d_in, d_out) = (40, 12);
        let c = 1.025 / d_in as f32;
        let h: Vec<f32> = (0..d_in * d_in)
            .map(|k| if k / d_in == k % d_in { 1.0 - c } else { -c })
            .collect();
        let w = rand_vec(d_in * d_out, 21);
        let spec = PruneSpec::unstructured(0.5).unwrap();
        let cfg = SparseGptConfig::default();
        let weights = Weights::new(&w, d_in, d_out).unwrap();
        let got = sparsegpt_prune(weights, &h, &spec, &cfg).unwrap();
        let hm = Mat::<f64>::from_fn(d_in, d_in, |i, j| h[i * d_in + j] as f64);
        let expected = reference::run_ref(weights, hm, &spec, &cfg).unwrap();
        assert_eq!(got.mask, expected.mask);
        let (a, b) = (got.weights.unwrap(), expected.weights.unwrap());
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
        // too few dampings: the same error
        let cfg2 = SparseGptConfig {
            max_dampings: 2,
            ..cfg
        };
        let e = sparsegpt_prune(weights, &h, &spec, &cfg2).unwrap_err();
        assert!(
            matches!(e, PruneError::HessianNotPositiveDefinite(2)),
            "{e}"
        );
    }

    #[test]
    fn hessian_is_two_over_n_xtx() {
        let d = 5;
        let x1 = rand_vec(3 * d, 1);
        let x2 = rand_vec(4 * d, 2);
        let mut p = SparseGptPruner::new(d, SparseGptConfig::default()).unwrap();
        p.add_batch(&x1, 3).unwrap();
        p.add_batch(&x2, 4).unwrap();
        let h = p.hessian().unwrap();
        for i in 0..d {
            for j in 0..d {
                let mut s = 0f64;
                for x in [&x1[..], &x2[..]] {
                    for t in 0..x.len() / d {
                        s += x[t * d + i] as f64 * x[t * d + j] as f64;
                    }
                }
                assert!((h[i * d + j] as f64 - s).abs() < 1e-5, "{i} {j}");
            }
        }
    }

    #[test]
    fn zero_error_when_nothing_pruned_and_patterns_hold() {
        let (d_in, d_out, t) = (48, 20, 96);
        let w = rand_vec(d_in * d_out, 3);
        let x = rand_vec(t * d_in, 4);
        let mut p = SparseGptPruner::new(
            d_in,
            SparseGptConfig {
                block_size: 16,
                ..Default::default()
            },
        )
        .unwrap();
        p.add_batch(&x, t).unwrap();
        let wt = Weights::new(&w, d_in, d_out).unwrap();
        let out = p.prune(wt, &PruneSpec::unstructured(0.0).unwrap()).unwrap();
        assert_eq!(out.mask.count_pruned(), 0);
        let w2 = out.weights.unwrap();
        for (a, b) in w.iter().zip(&w2) {
            assert!((a - b).abs() < 1e-5);
        }
        for spec in [PruneSpec::n_m(2, 4).unwrap(), PruneSpec::n_m(4, 8).unwrap()] {
            let out = p.prune(wt, &spec).unwrap();
            let SparsityPattern::NM { n, m } = spec.pattern() else {
                unreachable!()
            };
            assert!(is_n_m(&out.mask, n, m));
            assert!(out.mask.is_applied(out.weights.as_ref().unwrap()));
        }
        let out = p.prune(wt, &PruneSpec::unstructured(0.6).unwrap()).unwrap();
        // exact count per block of 16 rows
        assert_eq!(
            out.mask.count_pruned(),
            3 * ((0.6f64 * 16.0 * 20.0).floor() as usize)
        );
        assert!(out.mask.is_applied(out.weights.as_ref().unwrap()));
    }

    #[test]
    fn reconstruction_beats_plain_masking() {
        let (d_in, d_out, t) = (32, 16, 200);
        let w = rand_vec(d_in * d_out, 5);
        // correlated inputs: x = z · A with a random mixing matrix
        let z = rand_vec(t * d_in, 6);
        let a = rand_vec(d_in * d_in, 9);
        let mut x = vec![0f32; t * d_in];
        for tt in 0..t {
            for j in 0..d_in {
                x[tt * d_in + j] = (0..d_in).map(|k| z[tt * d_in + k] * a[k * d_in + j]).sum();
            }
        }
        let mut p = SparseGptPruner::new(d_in, SparseGptConfig::default()).unwrap();
        p.add_batch(&x, t).unwrap();
        let wt = Weights::new(&w, d_in, d_out).unwrap();
        let out = p.prune(wt, &PruneSpec::unstructured(0.5).unwrap()).unwrap();
        let mut masked = w.clone();
        out.mask.apply(&mut masked).unwrap();
        let recon = out.weights.unwrap();
        let err = |v: &[f32]| -> f64 {
            let mut s = 0.0;
            for tt in 0..t {
                for o in 0..d_out {
                    let mut y = 0.0f64;
                    for i in 0..d_in {
                        y += x[tt * d_in + i] as f64 * (w[i * d_out + o] - v[i * d_out + o]) as f64;
                    }
                    s += y * y;
                }
            }
            s
        };
        assert!(err(&recon) < 0.8 * err(&masked));
    }

    #[test]
    fn errors() {
        let d = 4;
        let w = vec![1.0f32; d * 2];
        let wt = Weights::new(&w, d, 2).unwrap();
        let p = SparseGptPruner::new(d, SparseGptConfig::default()).unwrap();
        assert!(matches!(
            p.prune(wt, &PruneSpec::unstructured(0.5).unwrap()),
            Err(PruneError::EmptyStatistics)
        ));
        // indefinite Hessian: bounded retries and a clear error
        let mut h = vec![0f32; d * d];
        for i in 0..d {
            h[i * d + i] = -1.0;
        }
        let e = sparsegpt_prune(
            wt,
            &h,
            &PruneSpec::unstructured(0.5).unwrap(),
            &SparseGptConfig::default(),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "Hessian not positive definite after 10 dampings"
        );
        let cfg = SparseGptConfig {
            block_size: 6,
            ..Default::default()
        };
        let mut p = SparseGptPruner::new(8, cfg).unwrap();
        p.add_batch(&[1.0; 8], 1).unwrap();
        let w = vec![1.0f32; 16];
        let e = p.prune(
            Weights::new(&w, 8, 2).unwrap(),
            &PruneSpec::n_m(2, 4).unwrap(),
        );
        assert!(matches!(e, Err(PruneError::InvalidConfig(_))));
    }

    #[test]
    fn overflowing_hessian_is_an_error() {
        let mut p = SparseGptPruner::new(2, SparseGptConfig::default()).unwrap();
        p.add_batch(&[3e30, 1.0], 1).unwrap();
        let w = [1.0f32; 4];
        let e = p
            .prune(
                Weights::new(&w, 2, 2).unwrap(),
                &PruneSpec::unstructured(0.5).unwrap(),
            )
            .unwrap_err();
        assert!(matches!(e, PruneError::NonFinite { .. }), "{e}");
    }

    #[test]
    fn dead_inputs_are_zeroed_and_pruned() {
        let (d_in, d_out, t) = (16, 8, 40);
        let w = rand_vec(d_in * d_out, 7);
        let mut x = rand_vec(t * d_in, 8);
        for tt in 0..t {
            x[tt * d_in + 3] = 0.0;
        }
        let mut p = SparseGptPruner::new(d_in, SparseGptConfig::default()).unwrap();
        p.add_batch(&x, t).unwrap();
        let out = p
            .prune(
                Weights::new(&w, d_in, d_out).unwrap(),
                &PruneSpec::unstructured(0.5).unwrap(),
            )
            .unwrap();
        let w2 = out.weights.unwrap();
        for o in 0..d_out {
            assert_eq!(w2[3 * d_out + o], 0.0);
            assert_eq!(out.mask.get(3, o), Some(false));
        }
    }
}
