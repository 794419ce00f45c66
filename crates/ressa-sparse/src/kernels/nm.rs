//! `y = x · W` for [`NmWeight`].
//!
//! 2:4 has a fast path: one byte of positions covers two groups (4 slots), so each step loads
//! one byte and four values and touches `x` rows `8q + p` with `p` decoded by shifts. Other N:M
//! patterns walk slot by slot (`slot_pos`).

use crate::error::SparseError;
use crate::formats::nm::slot_pos;
use crate::formats::{NmWeight, SparseFormat};
use crate::kernels::{BlockKernel, reduce, run, run_alloc};

/// One output row of a 2:4 weight for a tile: `vals` has `d_in / 2` slots, `pos` `d_in / 8`
/// bytes (rounded up), `xt` `d_in` rows. Inputs are taken 8 at a time (two groups, one byte of
/// positions), so each position indexes an 8-row chunk and needs no bounds check.
#[inline(always)]
fn row_2_4<const T: usize>(vals: &[f32], pos: &[u8], xt: &[[f32; T]]) -> [f32; T] {
    let mut acc = [[0.0f32; T]; 4];
    let (vc, vr) = vals.as_chunks::<4>();
    let (xc, xr) = xt.as_chunks::<8>();
    for ((v, &b), x8) in vc.iter().zip(pos).zip(xc) {
        let p = [b & 3, b >> 2 & 3, 4 | (b >> 4 & 3), 4 | b >> 6];
        for u in 0..4 {
            let xrow = &x8[p[u] as usize];
            for t in 0..T {
                acc[u][t] += v[u] * xrow[t];
            }
        }
    }
    // odd number of groups: the last byte holds one group in its low nibble
    if let (&[v0, v1], Some(&b), Some(x4)) = (vr, pos.get(vc.len()), xr.first_chunk::<4>()) {
        for (u, (v, p)) in [(v0, b & 3), (v1, b >> 2 & 3)].into_iter().enumerate() {
            for t in 0..T {
                acc[u][t] += v * x4[p as usize][t];
            }
        }
    }
    reduce(acc)
}

/// Any N:M: slot by slot.
#[inline(always)]
fn row_generic<const T: usize>(
    vals: &[f32],
    pos: &[u8],
    xt: &[[f32; T]],
    m: usize,
    k: usize,
    bits: usize,
) -> [f32; T] {
    let mut acc = [[0.0f32; T]; 2];
    let mut q = 0;
    for g in 0..vals.len() / k.max(1) {
        let base = g * m;
        for s in 0..k {
            let xr = &xt[base + slot_pos(pos, q, bits)];
            let v = vals[q];
            for t in 0..T {
                acc[s & 1][t] += v * xr[t];
            }
            q += 1;
        }
    }
    reduce(acc)
}

impl BlockKernel for NmWeight {
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
        let (n, m) = self.n_m();
        let (slots, rb, bits) = (self.slots_per_row(), self.row_bytes(), self.index_bits());
        let two_four = (n, m) == (2, 4);
        for jj in 0..blen {
            let j = j0 + jj;
            let vals = &self.values()[j * slots..(j + 1) * slots];
            let pos = &self.indices()[j * rb..(j + 1) * rb];
            for tile in 0..tiles {
                let xt = &xp[tile * d_in..][..d_in];
                out[tile * blen + jj] = if two_four {
                    row_2_4::<T>(vals, pos, xt)
                } else {
                    row_generic::<T>(vals, pos, xt, m, m - n, bits)
                };
            }
        }
    }
}

/// `y = x · W` with `x` `[tokens, d_in]` and `W` N:M-packed; returns `y` `[tokens, d_out]`.
pub fn matmul_nm(x: &[f32], tokens: usize, w: &NmWeight) -> Result<Vec<f32>, SparseError> {
    run_alloc(w, x, tokens)
}

/// [`matmul_nm`] into a caller's `[tokens, d_out]` buffer (overwritten).
pub fn matmul_nm_into(
    x: &[f32],
    tokens: usize,
    w: &NmWeight,
    y: &mut [f32],
) -> Result<(), SparseError> {
    run(w, x, tokens, y)
}
