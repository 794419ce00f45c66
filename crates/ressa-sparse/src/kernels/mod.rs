//! CPU products `y = x · W` for the packed formats, plus a dense reference loop.
//!
//! `x` is `[tokens, d_in]` row-major, `W` is `[d_in, d_out]` (burn orientation, stored in one
//! of the [`crate::formats`]), `y` is `[tokens, d_out]` row-major:
//! `y[t, j] = Σ_i x[t, i] · W[i, j]`.
//!
//! # How the work is laid out
//! - Tokens are processed in **tiles** of `T` (1, 2, 4, 8 or 16, from the token count; the last
//!   tile is zero-padded). `x` is repacked once per call as `xp[tile][i] = [x[tile·T + t, i]; T]`,
//!   so a kept weight `W[i, j]` costs one broadcast and `T` multiply-adds on a contiguous
//!   `[f32; T]`, which the compiler turns into SIMD multiplies and adds.
//! - Outputs are split into blocks of [`BLOCK`] for rayon. A block walks its outputs one by one;
//!   each output's kept weights (a few KiB) are read once and reused, from L1, for every tile.
//! - Each block writes `[tile][output][T]` into its own slice of a scratch buffer, scattered into
//!   `y` at the end (cheap next to the products).
//!
//! Sums run in a different order than a dense matmul, so results agree to rounding
//! (`≈ 1e-6` relative), not bit for bit.
//!
//! # Measured (`cargo bench -p ressa-sparse --bench kernels`)
//! The latest run, with AVX2 and PyTorch beside it, is in `docs/benchmarks.md`
//! (`cargo xtask bench`); the table below is the baseline (SSE2) build.
//! 2048 × 5120 weight, both cores of the project's 2-core Zen 5 VM, criterion medians in ms,
//! best of two runs with no other load; ratios against burn's Flex `matmul` / the fastest dense
//! (the plain loop at 1 token, faer's gemm above).
//!
//! | dense | 1 token | 4 | 8 | 64 |
//! |---|---|---|---|---|
//! | Flex `matmul` | 1.134 | 4.434 | 8.599 | 14.88 |
//! | `SparseLinear` dense (loop / faer) | 0.953 | 0.916 | 1.170 | 3.742 |
//! | plain loop ([`matmul_dense`]) | 0.938 | 1.988 | 3.213 | 27.05 |
//!
//! | weight | kernel | 1 token | 4 | 8 | 64 |
//! |---|---|---|---|---|---|
//! | 50 % | CSR | 0.640 (1.77 / 1.47) | 1.346 (3.29 / 0.68) | 1.627 (5.28 / 0.72) | 9.54 (1.56 / 0.39) |
//! | 50 % | bitmask | 0.871 (1.30 / 1.08) | 1.392 (3.19 / 0.66) | 1.787 (4.81 / 0.65) | 9.16 (1.62 / 0.41) |
//! | 70 % | CSR | 0.384 (2.95 / 2.44) | 0.608 (7.29 / 1.51) | 0.963 (8.93 / 1.22) | 6.49 (2.29 / 0.58) |
//! | 70 % | bitmask | 0.651 (1.74 / 1.44) | 0.891 (4.97 / 1.03) | 1.259 (6.83 / 0.93) | 6.02 (2.47 / 0.62) |
//! | 90 % | CSR | 0.126 (8.96 / 7.42) | 0.207 (21.4 / 4.42) | 0.294 (29.2 / 3.97) | 2.32 (6.41 / 1.61) |
//! | 90 % | bitmask | 0.448 (2.53 / 2.09) | 0.556 (7.98 / 1.65) | 0.648 (13.3 / 1.81) | 2.42 (6.16 / 1.55) |
//! | 2:4 | N:M | 0.671 (1.69 / 1.40) | 0.835 (5.31 / 1.10) | 1.363 (6.31 / 0.86) | 10.84 (1.37 / 0.35) |
//! | 2:4 | CSR | 0.604 (1.88 / 1.55) | 1.216 (3.65 / 0.75) | 1.682 (5.11 / 0.70) | 9.67 (1.54 / 0.39) |
//! | 2:4 | bitmask | 0.836 (1.36 / 1.12) | 1.332 (3.33 / 0.69) | 1.819 (4.73 / 0.64) | 9.15 (1.63 / 0.41) |
//!
//! Run-to-run spread on this shared VM is about ±10 %. The weights stay cache-warm between
//! iterations (a 70 % CSR weight is 18.9 MB, the L3 32 MiB), as in any criterion loop.
//!
//! # Where the time goes (2-core Zen 5 VM, one core, 2048 × 5120 at 70 %, 3.1 M kept entries)
//! - One token, CSR: 0.67 ms, about 4 instructions per kept entry: load the `u16` index, load
//!   `x[i]`, build vectors of 8 gathered `x` values (`movss` + `unpcklps`, the hottest
//!   instructions in a `perf` profile) and multiply-add against 8 contiguous values. The loop is
//!   bound by this software gather more than by memory: the 18.9 MB of values and indices
//!   stream in 0.45 ms on one core (42 GB/s measured for a plain sum over the dense weight).
//!   Removing the bounds check on `x[i]` (zero-padded `x`, see `XRows`) took it from 0.95 ms
//!   to 0.62–0.67 ms.
//! - More tokens amortize the index and value loads over a tile: per kept entry and token
//!   0.24 (1), 0.15 (2), 0.10 (4), 0.08 (8), 0.065 (16) ns.
//! - The build targets baseline x86-64 (SSE2); every kernel's block loop is also compiled for
//!   AVX2 (`#[target_feature]`, chosen at run time by [`simd_level`]), where a `[f32; 8]` tile
//!   is one vector. Measured in one run (both cores, 2048 × 5120), baseline → AVX2: 70 % CSR
//!   0.372 → 0.345 ms at 1 token, 0.755 → 0.760 at 4, 1.003 → 0.794 at 8; 2:4 N:M 0.692 →
//!   0.556, 0.914 → 0.920, 1.677 → 1.278. At 4 tokens a tile is one SSE vector already, so
//!   AVX2 cannot widen it.
//! - At 8 tokens the packed `x` (64 KiB) misses the 48 KiB L1. Splitting each CSR row's
//!   entries into L1-sized input chunks (a binary search per row and chunk, per call) was
//!   tried and measured: the searches cost more than the cache misses (70 % CSR at 4 tokens
//!   went from 0.76 to 1.18 ms). Chunk offsets precomputed once per weight are left for later.
//!

pub mod bitmask;
pub mod csr;
pub mod dense;
pub mod gemm;
#[cfg(feature = "gpu")]
pub mod gpu;
pub mod linear;
pub mod nm;

pub use bitmask::matmul_bitmask;
pub use csr::matmul_csr;
pub use dense::matmul_dense;
pub use linear::{Crossover, KernelKind, SparseLinear};
pub use nm::matmul_nm;

use std::sync::atomic::{AtomicU8, Ordering};

use rayon::prelude::*;

use crate::error::SparseError;

/// Outputs per parallel task.
pub const BLOCK: usize = 32;

/// Below this many multiply-adds a product stays on the calling thread (rayon's fork/join
/// costs a few microseconds).
const SERIAL_WORK: usize = 1 << 15;

/// One format's inner loops: a block of outputs for every token tile.
pub(crate) trait BlockKernel: Sync {
    /// Inputs.
    fn d_in(&self) -> usize;
    /// Outputs.
    fn d_out(&self) -> usize;
    /// Multiply-adds per token (stored entries), to decide on threading.
    fn work(&self) -> usize;
    /// Outputs per parallel task for a token tile of `tile`.
    fn block_len(&self, tile: usize) -> usize {
        let _ = tile;
        BLOCK
    }
    /// Computes outputs `j0 .. j0 + out.len() / tiles` for all tiles.
    /// `xp` is `[tiles][d_in]`, `out` is `[tiles][block length]`.
    fn block<const T: usize>(&self, j0: usize, xp: &[[f32; T]], tiles: usize, out: &mut [[f32; T]]);
}

/// Checks `x = [tokens, d_in]` and `y = [tokens, d_out]` (an overflowing product cannot match
/// any buffer length).
pub(crate) fn check_operands(
    x: &[f32],
    tokens: usize,
    d_in: usize,
    d_out: usize,
    y: &[f32],
) -> Result<(), SparseError> {
    let x_len = tokens.saturating_mul(d_in);
    let y_len = tokens.saturating_mul(d_out);
    if x.len() != x_len {
        return Err(SparseError::DimMismatch {
            what: "x = [tokens, d_in]",
            expected: x_len,
            got: x.len(),
        });
    }
    if y.len() != y_len {
        return Err(SparseError::DimMismatch {
            what: "y = [tokens, d_out]",
            expected: y_len,
            got: y.len(),
        });
    }
    Ok(())
}

/// Checks operand sizes, picks the token tile and runs `k`, overwriting `y`.
pub(crate) fn run<K: BlockKernel>(
    k: &K,
    x: &[f32],
    tokens: usize,
    y: &mut [f32],
) -> Result<(), SparseError> {
    check_operands(x, tokens, k.d_in(), k.d_out(), y)?;
    if y.is_empty() {
        return Ok(());
    }
    match tile_for(tokens) {
        1 => run_tiles::<K, 1>(k, x, tokens, y),
        2 => run_tiles::<K, 2>(k, x, tokens, y),
        4 => run_tiles::<K, 4>(k, x, tokens, y),
        8 => run_tiles::<K, 8>(k, x, tokens, y),
        _ => run_tiles::<K, 16>(k, x, tokens, y),
    }
    Ok(())
}

/// Checks `x` against `[tokens, d_in]`, then runs `k` into a fresh `[tokens, d_out]` buffer.
pub(crate) fn run_alloc<K: BlockKernel>(
    k: &K,
    x: &[f32],
    tokens: usize,
) -> Result<Vec<f32>, SparseError> {
    let x_len = tokens.saturating_mul(k.d_in());
    if x.len() != x_len {
        return Err(SparseError::DimMismatch {
            what: "x = [tokens, d_in]",
            expected: x_len,
            got: x.len(),
        });
    }
    let y_len = tokens
        .checked_mul(k.d_out())
        .ok_or(SparseError::DimMismatch {
            what: "y = [tokens, d_out]",
            expected: usize::MAX,
            got: 0,
        })?;
    let mut y = vec![0.0f32; y_len];
    run(k, x, tokens, &mut y)?;
    Ok(y)
}

/// Token tile for a token count: the smallest of 1, 2, 4, 8 that holds all tokens, else 16.
pub(crate) fn tile_for(tokens: usize) -> usize {
    match tokens {
        0 | 1 => 1,
        2 => 2,
        3 | 4 => 4,
        5..=8 => 8,
        _ => 16,
    }
}

fn run_tiles<K: BlockKernel, const T: usize>(k: &K, x: &[f32], tokens: usize, y: &mut [f32]) {
    let (d_in, d_out) = (k.d_in(), k.d_out());
    let tiles = tokens.div_ceil(T);
    // xp[tile * d_in + i][t] = x[tile * T + t, i]; one token is padded for `XRows`' u16 case
    // (only for enough work to hide zeroing 256 KiB)
    let rows = if T == 1 && d_in <= PAD_ROWS && k.work() >= PAD_ROWS {
        PAD_ROWS
    } else {
        tiles * d_in
    };
    let mut xp = vec![[0.0f32; T]; rows];
    for (t, row) in x.chunks_exact(d_in.max(1)).take(tokens).enumerate() {
        let dst = &mut xp[t / T * d_in..][..d_in];
        for (p, &v) in dst.iter_mut().zip(row) {
            p[t % T] = v;
        }
    }
    // block b owns out[b * bl * tiles ..][.. len * tiles], laid out [tile][output]
    let bl = k.block_len(T).max(1);
    let mut out = vec![[0.0f32; T]; tiles * d_out];
    let simd = simd_level();
    let body = |(b, chunk): (usize, &mut [[f32; T]])| {
        block_dispatch::<K, T>(simd, k, b * bl, &xp, tiles, chunk)
    };
    let parallel = k.work().saturating_mul(tokens) >= SERIAL_WORK && d_out > bl;
    if parallel {
        out.par_chunks_mut(bl * tiles).enumerate().for_each(body);
    } else {
        out.chunks_mut(bl * tiles).enumerate().for_each(body);
    }
    // y[t, j] = out[block(j)][tile(t)][j - j0][t % T]
    let scatter = |(t, yrow): (usize, &mut [f32])| {
        let (tile, tt) = (t / T, t % T);
        for (b, ychunk) in yrow.chunks_mut(bl).enumerate() {
            let blen = ychunk.len();
            let src = &out[b * bl * tiles + tile * blen..][..blen];
            for (yv, o) in ychunk.iter_mut().zip(src) {
                *yv = o[tt];
            }
        }
    };
    if parallel && tokens > 1 {
        y.par_chunks_mut(d_out).enumerate().for_each(scatter);
    } else {
        y.chunks_mut(d_out).enumerate().for_each(scatter);
    }
}

/// Instruction sets the kernels' loops are compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimdLevel {
    /// The build's target (baseline x86-64: SSE2, 4 floats per vector).
    Baseline,
    /// AVX2 (8 floats per vector), chosen at run time where the CPU has it.
    Avx2,
}

/// 0 = not decided, 1 = baseline, 2 = AVX2.
static SIMD: AtomicU8 = AtomicU8::new(0);

/// The instruction set the kernels use: AVX2 where the CPU has it, unless
/// `RESSA_KERNELS_BASELINE=1` is set or [`force_simd_level`] chose otherwise.
pub fn simd_level() -> SimdLevel {
    match SIMD.load(Ordering::Relaxed) {
        1 => SimdLevel::Baseline,
        2 => SimdLevel::Avx2,
        _ => {
            let baseline = std::env::var_os("RESSA_KERNELS_BASELINE").is_some_and(|v| v == "1");
            let level = if !baseline && avx2_available() {
                SimdLevel::Avx2
            } else {
                SimdLevel::Baseline
            };
            force_simd_level(level);
            level
        }
    }
}

/// Makes the kernels use `level` from now on (AVX2 only where the CPU has it); for benches and
/// tests that compare both.
pub fn force_simd_level(level: SimdLevel) {
    let code = match level {
        SimdLevel::Avx2 if avx2_available() => 2,
        _ => 1,
    };
    SIMD.store(code, Ordering::Relaxed);
}

fn avx2_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Runs `k.block` compiled for `simd`: the same loops, inlined into a function built with AVX2
/// (8-wide vectors for the `[f32; T]` multiply-adds) or for the baseline target. No fused
/// multiply-add: Rust does not contract `a * b + c`, so both round alike.
#[inline(always)]
fn block_dispatch<K: BlockKernel, const T: usize>(
    simd: SimdLevel,
    k: &K,
    j0: usize,
    xp: &[[f32; T]],
    tiles: usize,
    out: &mut [[f32; T]],
) {
    #[cfg(target_arch = "x86_64")]
    if simd == SimdLevel::Avx2 {
        // SAFETY: `SimdLevel::Avx2` is only set where the CPU reports AVX2 (`avx2_available`).
        unsafe { block_avx2::<K, T>(k, j0, xp, tiles, out) };
        return;
    }
    let _ = simd;
    k.block::<T>(j0, xp, tiles, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn block_avx2<K: BlockKernel, const T: usize>(
    k: &K,
    j0: usize,
    xp: &[[f32; T]],
    tiles: usize,
    out: &mut [[f32; T]],
) {
    k.block::<T>(j0, xp, tiles, out)
}

/// Index types of packed formats.
pub(crate) trait Idx: Copy + Send + Sync {
    fn ix(self) -> usize;
    /// Narrows an index the caller knows to fit.
    fn from_ix(i: usize) -> Self;
}

impl Idx for u16 {
    #[inline(always)]
    fn ix(self) -> usize {
        self as usize
    }
    #[inline(always)]
    fn from_ix(i: usize) -> Self {
        i as u16
    }
}

impl Idx for u32 {
    #[inline(always)]
    fn ix(self) -> usize {
        self as usize
    }
    #[inline(always)]
    fn from_ix(i: usize) -> Self {
        i as u32
    }
}

/// Rows of a packed `x` tile addressed by a format's indices.
pub(crate) trait XRows<const T: usize, I: Idx> {
    fn at(&self, i: I) -> &[f32; T];
}

/// Any tile: a bounds check per access.
impl<const T: usize, I: Idx> XRows<T, I> for [[f32; T]] {
    #[inline(always)]
    fn at(&self, i: I) -> &[f32; T] {
        &self[i.ix()]
    }
}

/// A tile zero-padded to 65536 rows: every `u16` index is in bounds, so the compiler drops the
/// check. Measured on the single-token CSR loop: 0.62 ms instead of 0.95 ms per 3.1 M kept
/// entries (one core), the check being a compare and branch next to three loads and a
/// multiply-add.
impl<const T: usize> XRows<T, u16> for [[f32; T]; 1 << 16] {
    #[inline(always)]
    fn at(&self, i: u16) -> &[f32; T] {
        &self[i as usize]
    }
}

/// Rows of a padded single-token tile, if `run` padded it (see [`PAD_ROWS`]).
#[inline(always)]
pub(crate) fn padded<const T: usize>(xp: &[[f32; T]]) -> Option<&[[f32; T]; PAD_ROWS]> {
    if T == 1 && xp.len() == PAD_ROWS {
        xp.first_chunk::<PAD_ROWS>()
    } else {
        None
    }
}

/// Single-token calls with `d_in ≤ PAD_ROWS` and at least `PAD_ROWS` stored entries get `x`
/// zero-padded to this many rows.
pub(crate) const PAD_ROWS: usize = 1 << 16;

/// `Σ_k vals[k] · xp[idx[k]]` for a tile of `T` tokens, with `U` independent accumulators so
/// consecutive multiply-adds do not wait on each other.
#[inline(always)]
pub(crate) fn sparse_dot<const T: usize, const U: usize, I: Idx, X: XRows<T, I> + ?Sized>(
    vals: &[f32],
    idx: &[I],
    xp: &X,
) -> [f32; T] {
    let mut acc = [[0.0f32; T]; U];
    let (vc, vr) = vals.as_chunks::<U>();
    let (ic, ir) = idx.as_chunks::<U>();
    for (v, i) in vc.iter().zip(ic) {
        for u in 0..U {
            let xr = xp.at(i[u]);
            for t in 0..T {
                acc[u][t] += v[u] * xr[t];
            }
        }
    }
    for (v, &i) in vr.iter().zip(ir) {
        let xr = xp.at(i);
        for t in 0..T {
            acc[0][t] += v * xr[t];
        }
    }
    reduce(acc)
}

/// Sums `U` accumulators pairwise.
#[inline(always)]
pub(crate) fn reduce<const T: usize, const U: usize>(acc: [[f32; T]; U]) -> [f32; T] {
    let mut out = [0.0f32; T];
    for a in acc {
        for t in 0..T {
            out[t] += a[t];
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod test_ref {
    //! Dense `f64` reference products and the tolerance check shared by the kernel tests.

    /// `y = x · W` in `f64`, plus `Σ_i |x[t, i]·W[i, j]|` per output (the error scale).
    pub fn reference(
        x: &[f32],
        tokens: usize,
        w: &[f32],
        d_in: usize,
        d_out: usize,
    ) -> (Vec<f64>, Vec<f64>) {
        let mut y = vec![0.0f64; tokens * d_out];
        let mut s = vec![0.0f64; tokens * d_out];
        for t in 0..tokens {
            for i in 0..d_in {
                let xv = x[t * d_in + i] as f64;
                for j in 0..d_out {
                    let p = xv * w[i * d_out + j] as f64;
                    y[t * d_out + j] += p;
                    s[t * d_out + j] += p.abs();
                }
            }
        }
        (y, s)
    }

    /// `|y - ref| ≤ 1e-5 · max(Σ|x·w|, 1e-30)` for every entry: 1e-5 relative to the size of
    /// the terms summed (a plain relative error is meaningless where terms cancel).
    pub fn assert_close(y: &[f32], reference: &(Vec<f64>, Vec<f64>), what: &str) {
        let (r, s) = reference;
        assert_eq!(y.len(), r.len(), "{what}: length");
        for (k, ((&a, &b), &sc)) in y.iter().zip(r).zip(s).enumerate() {
            let err = (a as f64 - b).abs();
            assert!(
                err <= 1e-5 * sc.max(1e-30),
                "{what}: entry {k}: {a} vs {b} (scale {sc})"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_ref::{assert_close, reference};
    use super::*;
    use crate::formats::test_util::{Lcg, masked_weight, nm_weight};
    use crate::formats::{BitmaskWeight, CsrWeight, NmWeight};
    use crate::mask::Mask;
    use crate::pattern::SparsityPattern;
    use proptest::prelude::*;

    #[test]
    fn tiles_cover_token_counts() {
        for t in 0..40 {
            let tile = tile_for(t);
            assert!(tile.is_power_of_two() && tile <= 16);
            if t <= 8 {
                assert!(tile >= t);
            }
        }
    }

    fn random_x(rng: &mut Lcg, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.unit()).collect()
    }

    /// Every unstructured kernel against the f64 reference of the same masked weight.
    fn check_unstructured(seed: u64, d_in: usize, d_out: usize, tokens: usize, sparsity: f64) {
        let mut rng = Lcg(seed);
        let (w, mask) = masked_weight(&mut rng, d_in, d_out, sparsity);
        let x = random_x(&mut rng, tokens * d_in);
        let r = reference(&x, tokens, &w, d_in, d_out);
        let what = format!("{d_in}x{d_out}, {tokens} tokens, sparsity {sparsity}");
        let csr = CsrWeight::from_masked(&w, &mask).unwrap();
        assert_close(
            &matmul_csr(&x, tokens, &csr).unwrap(),
            &r,
            &format!("csr {what}"),
        );
        let bm = BitmaskWeight::from_masked(&w, &mask).unwrap();
        assert_close(
            &matmul_bitmask(&x, tokens, &bm).unwrap(),
            &r,
            &format!("bitmask {what}"),
        );
        let dense = matmul_dense(&x, tokens, &w, d_in, d_out).unwrap();
        assert_close(&dense, &r, &format!("dense {what}"));
    }

    fn check_nm(seed: u64, groups: usize, d_out: usize, tokens: usize, n: usize, m: usize) {
        let mut rng = Lcg(seed);
        let d_in = groups * m;
        let (w, mask) = nm_weight(&mut rng, d_in, d_out, n, m);
        let x = random_x(&mut rng, tokens * d_in);
        let r = reference(&x, tokens, &w, d_in, d_out);
        let p = SparsityPattern::n_m(n, m).unwrap();
        let nm = NmWeight::from_masked(&w, &mask, p).unwrap();
        let what = format!("{n}:{m} {d_in}x{d_out}, {tokens} tokens");
        assert_close(&matmul_nm(&x, tokens, &nm).unwrap(), &r, &what);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn unstructured_kernels_match_dense(
            seed in any::<u64>(),
            d_in in 1usize..160,
            d_out in 1usize..130,
            tokens in 0usize..40,
            sparsity in prop_oneof![Just(0.0), Just(1.0), 0.0f64..1.0],
        ) {
            check_unstructured(seed, d_in, d_out, tokens, sparsity);
        }

        #[test]
        fn nm_kernels_match_dense(
            seed in any::<u64>(),
            groups in 1usize..40,
            d_out in 1usize..100,
            tokens in 0usize..24,
            nm in prop_oneof![Just((2usize, 4usize)), Just((1, 4)), Just((4, 8)), Just((3, 8)), Just((1, 2)), Just((5, 16))],
        ) {
            check_nm(seed, groups, d_out, tokens, nm.0, nm.1);
        }
    }

    #[test]
    fn fixed_shapes_and_edge_cases() {
        // ragged sizes around the tile and block widths, all token tiles
        for (k, &(d_in, d_out)) in [(1, 1), (3, 33), (65, 31), (64, 64), (129, 97), (300, 257)]
            .iter()
            .enumerate()
        {
            for tokens in [1, 2, 3, 5, 8, 9, 16, 17, 33] {
                for s in [0.0, 0.5, 0.9, 1.0] {
                    check_unstructured(k as u64 * 31 + tokens as u64, d_in, d_out, tokens, s);
                }
            }
        }
        // enough stored entries for the zero-padded single-token path
        for s in [0.0, 0.5, 0.8] {
            for tokens in [1, 3] {
                check_unstructured(7, 512, 300, tokens, s);
            }
        }
        for tokens in [1, 2, 4, 7, 16, 20] {
            check_nm(tokens as u64, 1, 40, tokens, 2, 4);
            check_nm(tokens as u64, 33, 70, tokens, 2, 4);
            check_nm(tokens as u64, 64, 65, tokens, 2, 4);
        }
    }

    /// Both instruction sets on wide layers (2 K inputs, every token tile, N:M and
    /// unstructured). The level is process-wide, so parallel tests may run at either level
    /// meanwhile; every level must be exact anyway.
    #[test]
    fn both_simd_levels_match_dense() {
        for level in [SimdLevel::Baseline, SimdLevel::Avx2] {
            force_simd_level(level);
            for (d_in, d_out) in [(1700, 37), (2049, 5)] {
                for tokens in [2, 3, 8, 13, 40] {
                    for s in [0.0, 0.5, 0.7, 1.0] {
                        check_unstructured(d_in as u64 + tokens as u64, d_in, d_out, tokens, s);
                    }
                }
            }
            for tokens in [1, 4, 8, 20] {
                check_nm(tokens as u64, 500, 9, tokens, 2, 4);
                check_nm(tokens as u64, 260, 7, tokens, 4, 8);
            }
        }
        force_simd_level(SimdLevel::Avx2);
        assert_eq!(
            simd_level() == SimdLevel::Avx2,
            avx2_available(),
            "AVX2 exactly where the CPU has it"
        );
    }

    #[test]
    fn wide_layers_use_u32_indices() {
        // d_in above the u16 range: no padded single-token path, u32 indices
        for d_in in [(1 << 16) - 1, 1 << 16, (1 << 16) + 5] {
            for tokens in [1, 2] {
                check_unstructured(d_in as u64, d_in, 3, tokens, 0.9);
            }
        }
    }

    #[test]
    fn empty_operands_and_bad_sizes() {
        let w = vec![1.0f32; 6];
        let csr = CsrWeight::from_dense(&w, 2, 3).unwrap();
        // no tokens
        assert!(matmul_csr(&[], 0, &csr).unwrap().is_empty());
        // d_in = 0: y is all zeros
        let empty = CsrWeight::from_dense(&[], 0, 3).unwrap();
        assert_eq!(matmul_csr(&[], 2, &empty).unwrap(), vec![0.0; 6]);
        let bm = BitmaskWeight::from_dense(&[], 0, 3).unwrap();
        assert_eq!(matmul_bitmask(&[], 2, &bm).unwrap(), vec![0.0; 6]);
        // all pruned
        let zeros = CsrWeight::from_masked(&w, &Mask::zeros(2, 3).unwrap()).unwrap();
        assert_eq!(matmul_csr(&[1.0, 2.0], 1, &zeros).unwrap(), vec![0.0; 3]);
        // wrong x or y length
        let e = matmul_csr(&[1.0; 3], 1, &csr).unwrap_err();
        assert!(
            matches!(
                e,
                SparseError::DimMismatch {
                    expected: 2,
                    got: 3,
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            matmul_bitmask(&[1.0; 3], 2, &BitmaskWeight::from_dense(&w, 2, 3).unwrap()).is_err()
        );
        let mut y = vec![0.0; 2];
        assert!(csr::matmul_csr_into(&[1.0; 2], 1, &csr, &mut y).is_err());
        assert!(matmul_dense(&[1.0; 2], 1, &w, 3, 3).is_err());
        assert!(matmul_csr(&[], usize::MAX, &csr).is_err());
    }
}
