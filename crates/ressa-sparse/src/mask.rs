//! Bit-packed binary pruning masks.
//!
//! A [`Mask`] has burn's Linear orientation: shape `[d_in, d_out]`, row-major, so entry
//! `(i, j)` is input `i` of output `j` (PyTorch's `weight[j, i]`). `true` means **keep**.
//!
//! # Bit order
//! The flat index of entry `(i, j)` is `k = i * d_out + j` (row-major over `[d_in, d_out]`).
//! Bit `k` lives in byte `k / 8` at bit position `k % 8`, least significant bit first. This is
//! `numpy.packbits(mask.reshape(-1), bitorder="little")` of the row-major boolean array.
//! Padding bits after the last entry are zero. In memory the bits are held in `u64` words
//! (bit `k` in word `k / 64`, position `k % 64`), whose little-endian bytes are exactly the
//! byte layout above.

use rayon::prelude::*;

use crate::error::SparseError;

/// Number of entries below which packing and counting run on one thread.
const PAR_THRESHOLD_WORDS: usize = 1 << 14;

/// A binary mask of shape `[d_in, d_out]` (burn orientation), one bit per entry, `true` = keep.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Mask {
    d_in: usize,
    d_out: usize,
    words: Vec<u64>,
}

impl std::fmt::Debug for Mask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mask")
            .field("d_in", &self.d_in)
            .field("d_out", &self.d_out)
            .field("kept", &self.count_kept())
            .finish()
    }
}

fn checked_len(d_in: usize, d_out: usize) -> Result<usize, SparseError> {
    d_in.checked_mul(d_out)
        .filter(|n| n.checked_add(63).is_some())
        .ok_or(SparseError::ShapeOverflow { d_in, d_out })
}

impl Mask {
    /// A mask with every entry set to `keep`.
    pub fn full(d_in: usize, d_out: usize, keep: bool) -> Result<Self, SparseError> {
        let len = checked_len(d_in, d_out)?;
        let nwords = len.div_ceil(64);
        let mut words = vec![if keep { u64::MAX } else { 0 }; nwords];
        if keep
            && len % 64 != 0
            && let Some(last) = words.last_mut()
        {
            *last = (1u64 << (len % 64)) - 1;
        }
        Ok(Self { d_in, d_out, words })
    }

    /// A mask that keeps everything (dense).
    pub fn ones(d_in: usize, d_out: usize) -> Result<Self, SparseError> {
        Self::full(d_in, d_out, true)
    }

    /// A mask that prunes everything.
    pub fn zeros(d_in: usize, d_out: usize) -> Result<Self, SparseError> {
        Self::full(d_in, d_out, false)
    }

    /// Builds a mask from row-major booleans over `[d_in, d_out]` (`true` = keep).
    pub fn from_bools(d_in: usize, d_out: usize, keep: &[bool]) -> Result<Self, SparseError> {
        let len = checked_len(d_in, d_out)?;
        if keep.len() != len {
            return Err(SparseError::ShapeMismatch {
                d_in,
                d_out,
                expected: len,
                got: keep.len(),
            });
        }
        // SAFETY: `bool` has the size and alignment of `u8` and is stored as 0 or 1.
        let bytes: &[u8] = unsafe { std::slice::from_raw_parts(keep.as_ptr().cast(), keep.len()) };
        let pack = |(w, word): (usize, &mut u64)| {
            let start = w * 64;
            let end = (start + 64).min(len);
            let mut bits = 0u64;
            if end - start == 64 {
                // 8 bytes of 0/1 -> 8 bits, byte i to bit i
                for (g, c) in bytes[start..end].chunks_exact(8).enumerate() {
                    let x = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
                    bits |= (x.wrapping_mul(0x0102_0408_1020_4080) >> 56) << (8 * g);
                }
            } else {
                for (b, &k) in bytes[start..end].iter().enumerate() {
                    bits |= (k as u64) << b;
                }
            }
            *word = bits;
        };
        let mut words = vec![0u64; len.div_ceil(64)];
        if words.len() >= PAR_THRESHOLD_WORDS {
            words.par_iter_mut().enumerate().for_each(pack);
        } else {
            words.iter_mut().enumerate().for_each(pack);
        }
        Ok(Self { d_in, d_out, words })
    }

    /// Builds a mask from row-major bytes over `[d_in, d_out]`, non-zero = keep.
    pub fn from_u8(d_in: usize, d_out: usize, keep: &[u8]) -> Result<Self, SparseError> {
        let bools: Vec<bool> = keep.iter().map(|&b| b != 0).collect();
        Self::from_bools(d_in, d_out, &bools)
    }

    /// Builds a mask by evaluating `keep(i, j)` for every entry.
    pub fn from_fn(
        d_in: usize,
        d_out: usize,
        keep: impl Fn(usize, usize) -> bool + Sync,
    ) -> Result<Self, SparseError> {
        let len = checked_len(d_in, d_out)?;
        Ok(Self::build(d_in, d_out, len, keep))
    }

    /// `from_fn` for a shape already known to be valid (`len = d_in * d_out`).
    fn build(
        d_in: usize,
        d_out: usize,
        len: usize,
        keep: impl Fn(usize, usize) -> bool + Sync,
    ) -> Self {
        let mut words = vec![0u64; len.div_ceil(64)];
        let fill = |(w, word): (usize, &mut u64)| {
            let start = w * 64;
            let end = (start + 64).min(len);
            let mut bits = 0u64;
            for k in start..end {
                bits |= (keep(k / d_out, k % d_out) as u64) << (k - start);
            }
            *word = bits;
        };
        if words.len() >= PAR_THRESHOLD_WORDS {
            words.par_iter_mut().enumerate().for_each(fill);
        } else {
            words.iter_mut().enumerate().for_each(fill);
        }
        Self { d_in, d_out, words }
    }

    /// Builds a burn-orientation mask from a PyTorch-orientation boolean array `[d_out, d_in]`
    /// (row-major, `true` = keep), transposing it.
    pub fn from_pytorch_bools(
        d_out: usize,
        d_in: usize,
        keep: &[bool],
    ) -> Result<Self, SparseError> {
        let len = checked_len(d_in, d_out)?;
        if keep.len() != len {
            return Err(SparseError::ShapeMismatch {
                d_in,
                d_out,
                expected: len,
                got: keep.len(),
            });
        }
        Self::from_fn(d_in, d_out, |i, j| keep[j * d_in + i])
    }

    /// Row-major booleans over `[d_in, d_out]` (`true` = keep).
    pub fn to_bools(&self) -> Vec<bool> {
        (0..self.len()).map(|k| self.bit(k)).collect()
    }

    /// PyTorch-orientation booleans, row-major over `[d_out, d_in]` (`true` = keep).
    pub fn to_pytorch_bools(&self) -> Vec<bool> {
        let mut out = Vec::with_capacity(self.len());
        for j in 0..self.d_out {
            for i in 0..self.d_in {
                out.push(self.bit(i * self.d_out + j));
            }
        }
        out
    }

    /// The transposed mask, shape `[d_out, d_in]` (burn ↔ PyTorch orientation).
    pub fn transpose(&self) -> Self {
        let (d_in, d_out) = (self.d_in, self.d_out);
        // the shape was valid for `self`, so it is valid transposed
        Self::build(d_out, d_in, self.len(), |a, b| self.bit(b * d_out + a))
    }

    /// Input dimension (rows).
    pub fn d_in(&self) -> usize {
        self.d_in
    }

    /// Output dimension (columns).
    pub fn d_out(&self) -> usize {
        self.d_out
    }

    /// `(d_in, d_out)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.d_in, self.d_out)
    }

    /// Number of entries, `d_in * d_out`.
    pub fn len(&self) -> usize {
        self.d_in * self.d_out
    }

    /// Whether the mask has no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[inline]
    fn bit(&self, k: usize) -> bool {
        (self.words[k / 64] >> (k % 64)) & 1 == 1
    }

    /// Whether entry `(i, j)` is kept; `None` when out of bounds.
    pub fn get(&self, i: usize, j: usize) -> Option<bool> {
        (i < self.d_in && j < self.d_out).then(|| self.bit(i * self.d_out + j))
    }

    /// Sets entry `(i, j)` (`true` = keep).
    pub fn set(&mut self, i: usize, j: usize, keep: bool) -> Result<(), SparseError> {
        if i >= self.d_in || j >= self.d_out {
            return Err(SparseError::OutOfBounds {
                i,
                j,
                d_in: self.d_in,
                d_out: self.d_out,
            });
        }
        let k = i * self.d_out + j;
        if keep {
            self.words[k / 64] |= 1 << (k % 64);
        } else {
            self.words[k / 64] &= !(1 << (k % 64));
        }
        Ok(())
    }

    /// Number of kept entries (non-zeros after applying the mask).
    pub fn count_kept(&self) -> usize {
        if self.words.len() >= PAR_THRESHOLD_WORDS {
            self.words.par_iter().map(|w| w.count_ones() as usize).sum()
        } else {
            self.words.iter().map(|w| w.count_ones() as usize).sum()
        }
    }

    /// Alias of [`Mask::count_kept`].
    pub fn nnz(&self) -> usize {
        self.count_kept()
    }

    /// Number of pruned entries.
    pub fn count_pruned(&self) -> usize {
        self.len() - self.count_kept()
    }

    /// Fraction of pruned entries (0 for an empty mask).
    pub fn sparsity(&self) -> f64 {
        if self.is_empty() {
            0.0
        } else {
            self.count_pruned() as f64 / self.len() as f64
        }
    }

    /// Kept entries of each output column `j` (length `d_out`).
    pub fn kept_per_column(&self) -> Vec<usize> {
        let mut counts = vec![0usize; self.d_out];
        for i in 0..self.d_in {
            for (j, c) in counts.iter_mut().enumerate() {
                *c += self.bit(i * self.d_out + j) as usize;
            }
        }
        counts
    }

    /// Packed bytes in the documented bit order (`ceil(d_in * d_out / 8)` bytes).
    pub fn to_bytes(&self) -> Vec<u8> {
        let nbytes = self.len().div_ceil(8);
        let mut out = Vec::with_capacity(self.words.len() * 8);
        for w in &self.words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.truncate(nbytes);
        out
    }

    /// Unpacks bytes produced by [`Mask::to_bytes`]; rejects a wrong length or set padding bits.
    pub fn from_bytes(d_in: usize, d_out: usize, bytes: &[u8]) -> Result<Self, SparseError> {
        let len = checked_len(d_in, d_out)?;
        let nbytes = len.div_ceil(8);
        let err = |detail| SparseError::PackedBytes {
            d_in,
            d_out,
            expected: nbytes,
            got: bytes.len(),
            detail,
        };
        if bytes.len() != nbytes {
            return Err(err(""));
        }
        if len % 8 != 0 {
            let last = bytes[nbytes - 1];
            if last >> (len % 8) != 0 {
                return Err(err(" (padding bits are set)"));
            }
        }
        let words = bytes
            .chunks(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b[..c.len()].copy_from_slice(c);
                u64::from_le_bytes(b)
            })
            .collect();
        Ok(Self { d_in, d_out, words })
    }

    /// Zeroes the pruned entries of a row-major `[d_in, d_out]` weight buffer.
    pub fn apply(&self, weights: &mut [f32]) -> Result<(), SparseError> {
        if weights.len() != self.len() {
            return Err(SparseError::ShapeMismatch {
                d_in: self.d_in,
                d_out: self.d_out,
                expected: self.len(),
                got: weights.len(),
            });
        }
        let zero_word = |(word, chunk): (&u64, &mut [f32])| {
            if *word == u64::MAX {
                return;
            }
            for (b, w) in chunk.iter_mut().enumerate() {
                if (word >> b) & 1 == 0 {
                    *w = 0.0;
                }
            }
        };
        if self.words.len() >= PAR_THRESHOLD_WORDS {
            self.words
                .par_iter()
                .zip(weights.par_chunks_mut(64))
                .for_each(zero_word);
        } else {
            self.words
                .iter()
                .zip(weights.chunks_mut(64))
                .for_each(zero_word);
        }
        Ok(())
    }

    /// Whether every pruned entry of `weights` is exactly zero.
    pub fn is_applied(&self, weights: &[f32]) -> bool {
        weights.len() == self.len()
            && weights
                .iter()
                .enumerate()
                .all(|(k, &w)| self.bit(k) || w == 0.0)
    }

    /// Entry-wise AND (keep only what both keep). Shapes must match.
    pub fn and(&self, other: &Mask) -> Result<Mask, SparseError> {
        if self.shape() != other.shape() {
            return Err(SparseError::ShapeMismatch {
                d_in: self.d_in,
                d_out: self.d_out,
                expected: self.len(),
                got: other.len(),
            });
        }
        Ok(Mask {
            d_in: self.d_in,
            d_out: self.d_out,
            words: self
                .words
                .iter()
                .zip(&other.words)
                .map(|(a, b)| a & b)
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *seed >> 33
    }

    #[test]
    fn full_masks_count() {
        for (d_in, d_out) in [(1, 1), (3, 5), (8, 8), (7, 13), (64, 1), (65, 3)] {
            let ones = Mask::ones(d_in, d_out).unwrap();
            assert_eq!(ones.count_kept(), d_in * d_out);
            assert_eq!(ones.sparsity(), 0.0);
            let zeros = Mask::zeros(d_in, d_out).unwrap();
            assert_eq!(zeros.count_kept(), 0);
            assert_eq!(zeros.count_pruned(), d_in * d_out);
            // padding stays zero, so bytes round-trip
            assert_eq!(
                Mask::from_bytes(d_in, d_out, &ones.to_bytes()).unwrap(),
                ones
            );
        }
    }

    #[test]
    fn bool_and_byte_round_trips() {
        let mut seed = 7;
        for (d_in, d_out) in [
            (1, 1),
            (3, 5),
            (8, 8),
            (17, 9),
            (64, 40),
            (96, 56),
            (200, 333),
        ] {
            let bools: Vec<bool> = (0..d_in * d_out)
                .map(|_| !lcg(&mut seed).is_multiple_of(3))
                .collect();
            let m = Mask::from_bools(d_in, d_out, &bools).unwrap();
            assert_eq!(m.to_bools(), bools);
            assert_eq!(m.count_kept(), bools.iter().filter(|b| **b).count());
            let bytes = m.to_bytes();
            assert_eq!(bytes.len(), (d_in * d_out).div_ceil(8));
            assert_eq!(Mask::from_bytes(d_in, d_out, &bytes).unwrap(), m);
            let t = m.transpose();
            assert_eq!(t.shape(), (d_out, d_in));
            assert_eq!(t.transpose(), m);
            assert_eq!(
                Mask::from_pytorch_bools(d_out, d_in, &m.to_pytorch_bools()).unwrap(),
                m
            );
            for i in 0..d_in {
                for j in 0..d_out {
                    assert_eq!(m.get(i, j), Some(bools[i * d_out + j]));
                    assert_eq!(t.get(j, i), Some(bools[i * d_out + j]));
                }
            }
        }
    }

    #[test]
    fn documented_bit_order() {
        // entries (0,0) keep, (0,1) prune, (0,2) keep; (1,0) keep, (1,1) keep, (1,2) prune
        let m = Mask::from_bools(2, 3, &[true, false, true, true, true, false]).unwrap();
        // bits k = 0..6 LSB first: 1,0,1,1,1,0 -> 0b011101
        assert_eq!(m.to_bytes(), vec![0b0001_1101]);
        let big = Mask::from_fn(3, 5, |i, j| i == 2 && j == 4).unwrap();
        // k = 14 -> byte 1, bit 6
        assert_eq!(big.to_bytes(), vec![0, 1 << 6]);
    }

    #[test]
    fn set_get_and_bounds() {
        let mut m = Mask::ones(4, 3).unwrap();
        m.set(2, 1, false).unwrap();
        assert_eq!(m.get(2, 1), Some(false));
        assert_eq!(m.get(1, 2), Some(true));
        assert_eq!(m.count_pruned(), 1);
        assert_eq!(m.kept_per_column(), vec![4, 3, 4]);
        assert!(m.set(4, 0, true).is_err());
        assert_eq!(m.get(0, 3), None);
        m.set(2, 1, true).unwrap();
        assert_eq!(m, Mask::ones(4, 3).unwrap());
    }

    #[test]
    fn bad_bytes_are_rejected() {
        assert!(Mask::from_bytes(3, 3, &[0, 0]).is_ok());
        assert!(Mask::from_bytes(3, 3, &[0]).is_err());
        assert!(Mask::from_bytes(3, 3, &[0, 0, 0]).is_err());
        // 9 entries -> bit 0 of byte 1 valid, bit 1 is padding
        assert!(Mask::from_bytes(3, 3, &[0, 1]).is_ok());
        assert!(Mask::from_bytes(3, 3, &[0, 2]).is_err());
        assert!(Mask::from_bools(2, 2, &[true; 3]).is_err());
        assert!(Mask::ones(usize::MAX, 2).is_err());
    }

    #[test]
    fn apply_zeroes_pruned_only() {
        let mut seed = 3;
        let (d_in, d_out) = (37, 11);
        let bools: Vec<bool> = (0..d_in * d_out)
            .map(|_| lcg(&mut seed).is_multiple_of(2))
            .collect();
        let m = Mask::from_bools(d_in, d_out, &bools).unwrap();
        let mut w: Vec<f32> = (0..d_in * d_out).map(|k| k as f32 + 1.0).collect();
        m.apply(&mut w).unwrap();
        for (k, &x) in w.iter().enumerate() {
            assert_eq!(x == 0.0, !bools[k]);
        }
        assert!(m.is_applied(&w));
        assert!(m.apply(&mut [0.0; 3]).is_err());
        // parallel path
        let big = Mask::from_fn(1024, 1100, |i, j| (i + j) % 3 != 0).unwrap();
        let mut w = vec![1.0f32; 1024 * 1100];
        big.apply(&mut w).unwrap();
        assert_eq!(w.iter().filter(|x| **x != 0.0).count(), big.count_kept());
        assert_eq!(Mask::from_bools(1024, 1100, &big.to_bools()).unwrap(), big);
    }
}
