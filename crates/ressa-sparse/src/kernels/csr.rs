//! `y = x · W` for [`CsrWeight`]: one sparse dot product per output and token tile.

use crate::error::SparseError;
use crate::formats::{CsrIndices, CsrWeight, SparseFormat};
use crate::kernels::{BlockKernel, Idx, padded, run, run_alloc, sparse_dot};

impl BlockKernel for CsrWeight {
    fn d_in(&self) -> usize {
        self.shape().0
    }

    fn d_out(&self) -> usize {
        self.shape().1
    }

    fn work(&self) -> usize {
        self.nnz()
    }

    #[inline(always)]
    fn block<const T: usize>(
        &self,
        j0: usize,
        xp: &[[f32; T]],
        tiles: usize,
        out: &mut [[f32; T]],
    ) {
        let d_in = self.d_in();
        let blen = out.len() / tiles;
        let (rp, vals) = (self.row_ptr(), self.values());
        let chunk = input_chunk::<T>();
        if T > 1 && d_in > chunk {
            match self.indices() {
                CsrIndices::U16(ix) => self.block_by_inputs(j0, xp, tiles, out, ix, chunk),
                CsrIndices::U32(ix) => self.block_by_inputs(j0, xp, tiles, out, ix, chunk),
            }
            return;
        }
        for jj in 0..blen {
            let (a, b) = (rp[j0 + jj], rp[j0 + jj + 1]);
            let v = &vals[a..b];
            if let (CsrIndices::U16(ix), Some(xfull)) = (self.indices(), padded(xp)) {
                out[jj] = sparse_dot::<T, 8, u16, _>(v, &ix[a..b], xfull);
                continue;
            }
            for tile in 0..tiles {
                let xt = &xp[tile * d_in..][..d_in];
                out[tile * blen + jj] = match self.indices() {
                    CsrIndices::U16(ix) => row::<T, u16>(v, &ix[a..b], xt),
                    CsrIndices::U32(ix) => row::<T, u32>(v, &ix[a..b], xt),
                };
            }
        }
    }
}

impl CsrWeight {
    /// [`BlockKernel::block`] with the inputs split into chunks of `chunk`: every output of the
    /// block takes its kept entries of one chunk before the next chunk, so the packed `x` rows
    /// of the chunk stay in L1 while the block's weights stream past. Each output's indices
    /// are increasing, so a chunk's entries are a contiguous run found by a binary search.
    #[inline(always)]
    fn block_by_inputs<const T: usize, I: Idx>(
        &self,
        j0: usize,
        xp: &[[f32; T]],
        tiles: usize,
        out: &mut [[f32; T]],
        idx: &[I],
        chunk: usize,
    ) {
        let d_in = self.d_in();
        let blen = out.len() / tiles;
        let (rp, vals) = (self.row_ptr(), self.values());
        // next unread entry of each output of the block
        let mut next: Vec<usize> = rp[j0..j0 + blen].to_vec();
        for c1 in (chunk..d_in + chunk).step_by(chunk) {
            let c1 = c1.min(d_in);
            for (jj, a) in next.iter_mut().enumerate() {
                let end = rp[j0 + jj + 1];
                let b = *a + idx[*a..end].partition_point(|i| i.ix() < c1);
                let (v, ix) = (&vals[*a..b], &idx[*a..b]);
                *a = b;
                for tile in 0..tiles {
                    let xt = &xp[tile * d_in..][..d_in];
                    let o = &mut out[tile * blen + jj];
                    let r = row::<T, I>(v, ix, xt);
                    for t in 0..T {
                        o[t] += r[t];
                    }
                }
            }
        }
    }
}

/// Inputs per chunk of [`CsrWeight::block_by_inputs`]: the packed `x` rows of a chunk take
/// [`L1_X_BYTES`] (`chunk · T · 4` bytes).
#[inline(always)]
fn input_chunk<const T: usize>() -> usize {
    (L1_X_BYTES / (4 * T)).max(64)
}

/// Bytes of packed `x` kept hot per chunk: half of a 48 KiB L1d, the rest for the streamed
/// weights and the accumulators.
const L1_X_BYTES: usize = 24 << 10;

/// Accumulator count per tile width: enough independent chains to cover the add latency
/// without running out of registers (measured best: 8, 4, 4, 4, 2 for T = 1 … 16).
#[inline(always)]
fn row<const T: usize, I: Idx>(vals: &[f32], idx: &[I], xt: &[[f32; T]]) -> [f32; T] {
    match T {
        1 => sparse_dot::<T, 8, I, _>(vals, idx, xt),
        2..=8 => sparse_dot::<T, 4, I, _>(vals, idx, xt),
        _ => sparse_dot::<T, 2, I, _>(vals, idx, xt),
    }
}

/// `y = x · W` with `x` `[tokens, d_in]` and `W` in CSR; returns `y` `[tokens, d_out]`.
pub fn matmul_csr(x: &[f32], tokens: usize, w: &CsrWeight) -> Result<Vec<f32>, SparseError> {
    run_alloc(w, x, tokens)
}

/// [`matmul_csr`] into a caller's `[tokens, d_out]` buffer (overwritten).
pub fn matmul_csr_into(
    x: &[f32],
    tokens: usize,
    w: &CsrWeight,
    y: &mut [f32],
) -> Result<(), SparseError> {
    run(w, x, tokens, y)
}
