//! Packed formats for a sparse `f32` weight.
//!
//! Every format is built from a dense weight in burn orientation `[d_in, d_out]` (row-major,
//! entry `(i, j)` = input `i` of output `j`) and turns back into exactly that buffer
//! ([`SparseFormat::to_dense`]). Internally all three store **one row per output** (PyTorch
//! orientation `[d_out, d_in]`): a product `y[t, j] = Σ_i x[t, i]·W[i, j]` then reads each
//! output's kept weights contiguously and gathers from the small, cache-resident `x`.
//!
//! | format | per kept entry | extra | use |
//! |---|---|---|---|
//! | [`BitmaskWeight`] | value | 1 bit per entry + 8 B per output | compressed-tensors `sparse-bitmask` files; smaller than CSR below 94 % sparsity |
//! | [`CsrWeight`] | value + `u16` (or `u32`) input index | 8 B per output | fastest unstructured kernel |
//! | [`NmWeight`] | value + 2/4/8-bit position in its group | none | N:M (2:4, 4:8, …) |
//!
//! Which entries are stored: `from_dense` keeps the non-zeros (as compressed-tensors does);
//! `from_masked` keeps exactly the mask's kept entries, zero-valued ones included, so the mask
//! survives a round trip.

pub mod bitmask;
pub mod csr;
pub mod nm;

pub use bitmask::{
    BitmaskConfig, BitmaskWeight, COMPRESSED_TENSORS_VERSION, OwnedTensor, ValueDtype,
    deserialize_bitmask, read_bitmask_file, read_bitmask_safetensors, serialize_bitmask,
    write_bitmask_file,
};
pub use csr::{CsrIndices, CsrWeight};
pub use nm::NmWeight;

use rayon::prelude::*;

use crate::error::SparseError;
use crate::mask::Mask;

/// What every packed format offers.
pub trait SparseFormat {
    /// `(d_in, d_out)` of the dense weight (burn orientation).
    fn shape(&self) -> (usize, usize);
    /// Number of stored entries (kept values, explicit zeros included).
    fn nnz(&self) -> usize;
    /// The dense weight, row-major `[d_in, d_out]`; pruned entries are `0.0`.
    fn to_dense(&self) -> Vec<f32>;
    /// Which entries are stored (`true` = stored), burn orientation.
    fn mask(&self) -> Mask;
    /// Bytes held by the packed arrays (values, indices, bitmasks, offsets).
    fn storage_bytes(&self) -> usize;
    /// Fraction of entries not stored (0 for an empty weight).
    fn sparsity(&self) -> f64 {
        let (d_in, d_out) = self.shape();
        let len = d_in * d_out;
        if len == 0 {
            0.0
        } else {
            1.0 - self.nnz() as f64 / len as f64
        }
    }
}

/// Checks that `w` holds `d_in * d_out` entries.
pub(crate) fn check_dense(w: &[f32], d_in: usize, d_out: usize) -> Result<(), SparseError> {
    let len = d_in
        .checked_mul(d_out)
        .ok_or(SparseError::ShapeOverflow { d_in, d_out })?;
    if w.len() != len {
        return Err(SparseError::ShapeMismatch {
            d_in,
            d_out,
            expected: len,
            got: w.len(),
        });
    }
    Ok(())
}

/// Which entries a builder keeps.
#[derive(Clone, Copy)]
pub(crate) enum Keep<'a> {
    /// `w != 0` (compressed-tensors' rule; `-0.0` counts as zero, NaN is kept).
    NonZero,
    /// The mask's kept entries, whatever their value.
    Mask(&'a Mask),
}

/// Dense weight and keep flags as output rows: `rows[j * d_in + i] = w[i * d_out + j]`.
pub(crate) fn output_rows(
    w: &[f32],
    d_in: usize,
    d_out: usize,
    keep: Keep<'_>,
) -> Result<(Vec<f32>, Vec<bool>), SparseError> {
    check_dense(w, d_in, d_out)?;
    let rows = transpose(w, d_in, d_out);
    let flags = match keep {
        Keep::NonZero => rows.par_iter().map(|v| *v != 0.0).collect(),
        Keep::Mask(m) => {
            if m.shape() != (d_in, d_out) {
                return Err(SparseError::ShapeMismatch {
                    d_in,
                    d_out,
                    expected: d_in * d_out,
                    got: m.len(),
                });
            }
            m.transpose().to_bools()
        }
    };
    Ok((rows, flags))
}

/// Blocked transpose of a row-major `[rows, cols]` buffer into `[cols, rows]`.
pub(crate) fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const B: usize = 32;
    let mut dst = vec![0.0f32; rows * cols];
    if rows == 0 || cols == 0 {
        return dst;
    }
    // each task owns B destination rows (= B source columns)
    dst.par_chunks_mut(B * rows)
        .enumerate()
        .for_each(|(cb, block)| {
            let c0 = cb * B;
            let nc = block.len() / rows;
            for r0 in (0..rows).step_by(B) {
                for r in r0..(r0 + B).min(rows) {
                    let s = &src[r * cols + c0..r * cols + c0 + nc];
                    for (c, &v) in s.iter().enumerate() {
                        block[c * rows + r] = v;
                    }
                }
            }
        });
    dst
}

#[cfg(test)]
pub(crate) mod test_util {
    //! Seeded random weights and masks shared by the format and kernel tests.

    use crate::mask::Mask;

    /// A small 64-bit LCG (tests need determinism, not quality).
    pub struct Lcg(pub u64);

    impl Lcg {
        pub fn next_u32(&mut self) -> u32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) as u32
        }
        /// Uniform in `[-1, 1)`.
        pub fn unit(&mut self) -> f32 {
            self.next_u32() as f32 / (1u64 << 30) as f32 - 1.0
        }
        pub fn below(&mut self, n: usize) -> usize {
            (self.next_u32() as usize) % n.max(1)
        }
    }

    /// A random `[d_in, d_out]` weight with an unstructured mask of the given sparsity applied.
    pub fn masked_weight(
        rng: &mut Lcg,
        d_in: usize,
        d_out: usize,
        sparsity: f64,
    ) -> (Vec<f32>, Mask) {
        let keep: Vec<bool> = (0..d_in * d_out)
            .map(|_| (rng.next_u32() as f64 / (1u64 << 31) as f64) >= sparsity)
            .collect();
        let mask = Mask::from_bools(d_in, d_out, &keep).unwrap();
        let mut w: Vec<f32> = (0..d_in * d_out).map(|_| rng.unit()).collect();
        mask.apply(&mut w).unwrap();
        (w, mask)
    }

    /// A random N:M mask (`n` pruned per group of `m` inputs of every output) and weight.
    pub fn nm_weight(
        rng: &mut Lcg,
        d_in: usize,
        d_out: usize,
        n: usize,
        m: usize,
    ) -> (Vec<f32>, Mask) {
        let mut keep = vec![true; d_in * d_out];
        for j in 0..d_out {
            for g in 0..d_in / m {
                let mut pos: Vec<usize> = (0..m).collect();
                for s in 0..n {
                    let r = s + rng.below(m - s);
                    pos.swap(s, r);
                    keep[(g * m + pos[s]) * d_out + j] = false;
                }
            }
        }
        let mask = Mask::from_bools(d_in, d_out, &keep).unwrap();
        let mut w: Vec<f32> = (0..d_in * d_out).map(|_| rng.unit()).collect();
        mask.apply(&mut w).unwrap();
        (w, mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_round_trip() {
        for (r, c) in [(0, 3), (3, 0), (1, 1), (5, 7), (33, 65), (64, 31)] {
            let src: Vec<f32> = (0..r * c).map(|k| k as f32).collect();
            let t = transpose(&src, r, c);
            for i in 0..r {
                for j in 0..c {
                    assert_eq!(t[j * r + i], src[i * c + j]);
                }
            }
            assert_eq!(transpose(&t, c, r), src);
        }
    }
}
