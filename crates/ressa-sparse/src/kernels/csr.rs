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
