//! A plain dense `y = x · W` over the same tiling as the sparse kernels: the reference the
//! sparse kernels must beat, and a dependency-free fallback.
//!
//! `W` is read in its burn layout `[d_in, d_out]`: a task owns up to `4096 / T` adjacent
//! outputs (16 KiB of accumulators, in L1) and walks down the `d_in` rows four at a time, each
//! row contributing a long contiguous stretch of weights times `T` tokens.

use crate::error::SparseError;
use crate::formats::check_dense;
use crate::kernels::{BlockKernel, run, run_alloc};

/// A borrowed dense weight `[d_in, d_out]` (row-major).
#[derive(Clone, Copy, Debug)]
pub struct DenseRef<'a> {
    w: &'a [f32],
    d_in: usize,
    d_out: usize,
}

impl<'a> DenseRef<'a> {
    /// Checks `w.len() == d_in * d_out`.
    pub fn new(w: &'a [f32], d_in: usize, d_out: usize) -> Result<Self, SparseError> {
        check_dense(w, d_in, d_out)?;
        Ok(Self { w, d_in, d_out })
    }
}

/// Adds four rows `i0 .. i0 + 4` of the panel starting at output `j0` into `acc` (one tile):
/// `acc[j][t] += Σ_r W[i0 + r, j0 + j] · x[r][t]`, so each accumulator is loaded and stored
/// once per four rows. Zipped iterators keep the loop free of bounds checks (vectorized).
#[inline(always)]
fn rows4<const T: usize>(
    w: &[f32],
    d_out: usize,
    j0: usize,
    i0: usize,
    x: &[[f32; T]; 4],
    acc: &mut [[f32; T]],
) {
    let n = acc.len();
    let row = |r: usize| &w[(i0 + r) * d_out + j0..][..n];
    let (w0, w1, w2, w3) = (row(0), row(1), row(2), row(3));
    for ((((a, &v0), &v1), &v2), &v3) in acc.iter_mut().zip(w0).zip(w1).zip(w2).zip(w3) {
        for t in 0..T {
            a[t] += v0 * x[0][t] + v1 * x[1][t] + v2 * x[2][t] + v3 * x[3][t];
        }
    }
}

/// One row (the `d_in % 4` tail).
#[inline(always)]
fn row1<const T: usize>(
    w: &[f32],
    d_out: usize,
    j0: usize,
    i: usize,
    x: &[f32; T],
    acc: &mut [[f32; T]],
) {
    let n = acc.len();
    for (a, &v) in acc.iter_mut().zip(&w[i * d_out + j0..][..n]) {
        for t in 0..T {
            a[t] += v * x[t];
        }
    }
}

impl BlockKernel for DenseRef<'_> {
    fn d_in(&self) -> usize {
        self.d_in
    }

    fn d_out(&self) -> usize {
        self.d_out
    }

    fn work(&self) -> usize {
        self.d_in * self.d_out
    }

    fn block_len(&self, tile: usize) -> usize {
        // accumulators ≤ 16 KiB (L1), at least one block per thread
        let per_thread = self
            .d_out
            .div_ceil(rayon::current_num_threads())
            .next_multiple_of(16);
        (4096 / tile).clamp(16, per_thread.max(16))
    }

    #[inline(always)]
    fn block<const T: usize>(
        &self,
        j0: usize,
        xp: &[[f32; T]],
        tiles: usize,
        out: &mut [[f32; T]],
    ) {
        let blen = out.len() / tiles;
        for tile in 0..tiles {
            let xt = &xp[tile * self.d_in..][..self.d_in];
            let acc = &mut out[tile * blen..][..blen];
            let (quads, rest) = xt.as_chunks::<4>();
            for (q, x4) in quads.iter().enumerate() {
                rows4::<T>(self.w, self.d_out, j0, 4 * q, x4, acc);
            }
            for (r, x1) in rest.iter().enumerate() {
                row1::<T>(self.w, self.d_out, j0, 4 * quads.len() + r, x1, acc);
            }
        }
    }
}

/// Dense `y = x · W` with `x` `[tokens, d_in]` and `W` `[d_in, d_out]` row-major; returns `y`
/// `[tokens, d_out]`.
pub fn matmul_dense(
    x: &[f32],
    tokens: usize,
    w: &[f32],
    d_in: usize,
    d_out: usize,
) -> Result<Vec<f32>, SparseError> {
    run_alloc(&DenseRef::new(w, d_in, d_out)?, x, tokens)
}

/// [`matmul_dense`] into a caller's `[tokens, d_out]` buffer (overwritten).
pub fn matmul_dense_into(
    x: &[f32],
    tokens: usize,
    w: &[f32],
    d_in: usize,
    d_out: usize,
    y: &mut [f32],
) -> Result<(), SparseError> {
    run(&DenseRef::new(w, d_in, d_out)?, x, tokens, y)
}
