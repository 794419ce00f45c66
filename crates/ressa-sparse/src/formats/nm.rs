//! Packed N:M weights (2:4, 4:8, …): kept values plus their positions inside each group.
//!
//! Groups follow [`SparsityPattern`]: `m` consecutive **inputs** of one output, `n` of them
//! pruned, so each group stores `k = m - n` slots. Storage is one row per output:
//! - `values[j * S + g * k + s]` is slot `s` of group `g` of output `j` (`S = (d_in / m) * k`);
//! - the slot's position `p < m` inside its group (input `g * m + p`) is a `b`-bit field,
//!   `b = 2` for `m ≤ 4`, `4` for `m ≤ 16`, `8` for `m ≤ 256`; slot `q = g * k + s` of output `j`
//!   sits in byte `j * R + q * b / 8` at bit `q * b % 8`, least significant bits first, with
//!   `R = ceil(S * b / 8)` bytes per output (padding bits zero). Positions inside a group are
//!   strictly increasing.
//!
//! 2:4 thus costs 2 values + one byte of positions per two groups: 4.25 bytes per 4 inputs
//! instead of 16. A group with fewer than `k` kept entries is padded with zero-valued slots at
//! its lowest free positions, so any weight with at most `k` non-zeros per group fits.

use crate::error::SparseError;
use crate::formats::{Keep, SparseFormat, output_rows};
use crate::mask::Mask;
use crate::pattern::SparsityPattern;

/// An N:M sparse weight (see the module docs for the layout).
#[derive(Clone, Debug, PartialEq)]
pub struct NmWeight {
    d_in: usize,
    d_out: usize,
    n: usize,
    m: usize,
    bits: usize,
    row_bytes: usize,
    values: Vec<f32>,
    indices: Vec<u8>,
}

/// Bits per position for group size `m`.
fn index_bits(n: usize, m: usize) -> Result<usize, SparseError> {
    match m {
        0..=4 => Ok(2),
        5..=16 => Ok(4),
        17..=256 => Ok(8),
        _ => Err(SparseError::UnsupportedNm {
            n,
            m,
            reason: "group size m must be at most 256",
        }),
    }
}

/// Position of slot `q` in a row of packed `bits`-bit fields.
#[inline(always)]
pub(crate) fn slot_pos(row: &[u8], q: usize, bits: usize) -> usize {
    let bit = q * bits;
    ((row[bit / 8] >> (bit % 8)) as usize) & ((1 << bits) - 1)
}

impl NmWeight {
    /// Packs a dense `[d_in, d_out]` weight whose groups hold at most `m - n` non-zeros.
    pub fn from_dense(
        w: &[f32],
        d_in: usize,
        d_out: usize,
        pattern: SparsityPattern,
    ) -> Result<Self, SparseError> {
        Self::build(w, d_in, d_out, pattern, Keep::NonZero)
    }

    /// Packs the entries a mask keeps; every group may keep at most `m - n`.
    pub fn from_masked(
        w: &[f32],
        mask: &Mask,
        pattern: SparsityPattern,
    ) -> Result<Self, SparseError> {
        Self::build(w, mask.d_in(), mask.d_out(), pattern, Keep::Mask(mask))
    }

    fn layout(
        d_in: usize,
        pattern: SparsityPattern,
    ) -> Result<(usize, usize, usize, usize), SparseError> {
        let SparsityPattern::NM { n, m } = pattern else {
            return Err(SparseError::ParsePattern(format!(
                "{pattern} (the N:M format needs an N:M pattern)"
            )));
        };
        pattern.validate(d_in)?;
        let bits = index_bits(n, m)?;
        let slots = d_in / m * (m - n);
        Ok((n, m, bits, (slots * bits).div_ceil(8)))
    }

    fn build(
        w: &[f32],
        d_in: usize,
        d_out: usize,
        pattern: SparsityPattern,
        keep: Keep<'_>,
    ) -> Result<Self, SparseError> {
        let (n, m, bits, row_bytes) = Self::layout(d_in, pattern)?;
        let (rows, flags) = output_rows(w, d_in, d_out, keep)?;
        let k = m - n;
        let slots = d_in / m * k;
        let mut values = Vec::with_capacity(d_out * slots);
        let mut indices = vec![0u8; d_out * row_bytes];
        let mut pos = Vec::with_capacity(m);
        for j in 0..d_out {
            let row_idx = &mut indices[j * row_bytes..(j + 1) * row_bytes];
            for g in 0..d_in / m {
                let base = j * d_in + g * m;
                pos.clear();
                pos.extend((0..m).filter(|&p| flags[base + p]));
                if pos.len() > k {
                    return Err(SparseError::NmViolation {
                        n,
                        m,
                        column: j,
                        group_start: g * m,
                        pruned: m - pos.len(),
                    });
                }
                // pad with the lowest free positions (zero values), keep positions sorted
                let mut p = 0;
                while pos.len() < k {
                    if !flags[base + p] {
                        pos.push(p);
                    }
                    p += 1;
                }
                pos.sort_unstable();
                for (s, &p) in pos.iter().enumerate() {
                    let q = g * k + s;
                    let v = if flags[base + p] { rows[base + p] } else { 0.0 };
                    values.push(v);
                    row_idx[q * bits / 8] |= (p as u8) << (q * bits % 8);
                }
            }
        }
        Ok(Self {
            d_in,
            d_out,
            n,
            m,
            bits,
            row_bytes,
            values,
            indices,
        })
    }

    /// Builds from raw arrays in the documented layout, checking lengths and positions
    /// (`< m`, strictly increasing inside each group). Padding bits are cleared.
    pub fn from_parts(
        d_in: usize,
        d_out: usize,
        pattern: SparsityPattern,
        values: Vec<f32>,
        mut indices: Vec<u8>,
    ) -> Result<Self, SparseError> {
        d_in.checked_mul(d_out)
            .ok_or(SparseError::ShapeOverflow { d_in, d_out })?;
        let (n, m, bits, row_bytes) = Self::layout(d_in, pattern)?;
        let err = |field, message: String| SparseError::InvalidFormat {
            format: "N:M",
            field,
            message,
        };
        let k = m - n;
        let slots = d_in / m * k;
        if values.len() != d_out * slots {
            return Err(err(
                "values",
                format!(
                    "length {} != d_out * (d_in / m) * (m - n) = {}",
                    values.len(),
                    d_out * slots
                ),
            ));
        }
        if indices.len() != d_out * row_bytes {
            return Err(err(
                "indices",
                format!(
                    "length {} != d_out * {row_bytes} bytes = {}",
                    indices.len(),
                    d_out * row_bytes
                ),
            ));
        }
        let used_bits = slots * bits;
        for j in 0..d_out {
            let row = &mut indices[j * row_bytes..(j + 1) * row_bytes];
            if !used_bits.is_multiple_of(8)
                && let Some(last) = row.last_mut()
            {
                *last &= (1u8 << (used_bits % 8)) - 1;
            }
            for g in 0..d_in / m {
                let mut prev = None;
                for s in 0..k {
                    let p = slot_pos(row, g * k + s, bits);
                    if p >= m || prev.is_some_and(|q| q >= p) {
                        return Err(err(
                            "indices",
                            format!(
                                "output {j}, group at input {}: positions must be < {m} and strictly increasing",
                                g * m
                            ),
                        ));
                    }
                    prev = Some(p);
                }
            }
        }
        Ok(Self {
            d_in,
            d_out,
            n,
            m,
            bits,
            row_bytes,
            values,
            indices,
        })
    }

    /// The N:M pattern.
    pub fn pattern(&self) -> SparsityPattern {
        SparsityPattern::NM {
            n: self.n,
            m: self.m,
        }
    }

    /// `(n, m)`: pruned per group, group size.
    pub fn n_m(&self) -> (usize, usize) {
        (self.n, self.m)
    }

    /// Kept slots per group, `m - n`.
    pub fn kept_per_group(&self) -> usize {
        self.m - self.n
    }

    /// Bits per stored position (2, 4 or 8).
    pub fn index_bits(&self) -> usize {
        self.bits
    }

    /// Bytes of positions per output.
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    /// Slots per output, `(d_in / m) * (m - n)`.
    pub fn slots_per_row(&self) -> usize {
        self.d_in / self.m * (self.m - self.n)
    }

    /// Stored values, output by output.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Packed positions, `row_bytes` per output.
    pub fn indices(&self) -> &[u8] {
        &self.indices
    }

    /// Calls `f(i, j, value)` for every slot.
    fn for_each_slot(&self, mut f: impl FnMut(usize, usize, f32)) {
        let k = self.m - self.n;
        let slots = self.slots_per_row();
        for j in 0..self.d_out {
            let row = &self.indices[j * self.row_bytes..(j + 1) * self.row_bytes];
            for q in 0..slots {
                let i = q / k * self.m + slot_pos(row, q, self.bits);
                f(i, j, self.values[j * slots + q]);
            }
        }
    }
}

impl SparseFormat for NmWeight {
    fn shape(&self) -> (usize, usize) {
        (self.d_in, self.d_out)
    }

    fn nnz(&self) -> usize {
        self.values.len()
    }

    fn to_dense(&self) -> Vec<f32> {
        let mut w = vec![0.0f32; self.d_in * self.d_out];
        let d_out = self.d_out;
        self.for_each_slot(|i, j, v| w[i * d_out + j] = v);
        w
    }

    fn mask(&self) -> Mask {
        let mut mask = Mask::zeros(self.d_in, self.d_out).expect("shape was valid at construction");
        self.for_each_slot(|i, j, _| {
            let _ = mask.set(i, j, true);
        });
        mask
    }

    fn storage_bytes(&self) -> usize {
        self.values.len() * 4 + self.indices.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::test_util::{Lcg, nm_weight};
    use crate::pattern::is_n_m;

    #[test]
    fn round_trips_nm_patterns() {
        let mut rng = Lcg(5);
        for (n, m) in [
            (2, 4),
            (1, 4),
            (3, 4),
            (1, 2),
            (4, 8),
            (2, 8),
            (5, 8),
            (8, 16),
            (3, 20),
        ] {
            for (d_in, d_out) in [(m, 1), (2 * m, 3), (5 * m, 7), (8 * m, 13), (m, 0)] {
                let (w, mask) = nm_weight(&mut rng, d_in, d_out, n, m);
                let p = SparsityPattern::n_m(n, m).unwrap();
                let a = NmWeight::from_masked(&w, &mask, p).unwrap();
                assert_eq!(a.to_dense(), w, "{n}:{m} {d_in}x{d_out}");
                assert_eq!(a.mask(), mask);
                assert!(is_n_m(&a.mask(), n, m));
                assert_eq!(a.nnz(), d_out * d_in / m * (m - n));
                let b = NmWeight::from_dense(&w, d_in, d_out, p).unwrap();
                assert_eq!(b.to_dense(), w);
                let c =
                    NmWeight::from_parts(d_in, d_out, p, a.values().to_vec(), a.indices().to_vec())
                        .unwrap();
                assert_eq!(c, a);
            }
        }
    }

    #[test]
    fn two_four_layout_and_padding() {
        // one output, 8 inputs: group 0 keeps inputs 1, 3; group 1 keeps only input 6, so a
        // zero-valued slot is padded in at its lowest free position (input 4)
        let w = [0.0, 1.0, 0.0, 2.0, 0.0, 0.0, 3.0, 0.0];
        let a = NmWeight::from_dense(&w, 8, 1, SparsityPattern::TWO_FOUR).unwrap();
        assert_eq!(a.index_bits(), 2);
        assert_eq!(a.row_bytes(), 1);
        assert_eq!(a.values(), &[1.0, 2.0, 0.0, 3.0]);
        // positions 1, 3 | 0, 2 -> bits 01 11 00 10 (LSB first)
        assert_eq!(a.indices(), &[0b10_00_11_01]);
        assert_eq!(a.to_dense(), w);
    }

    #[test]
    fn all_zero_and_too_dense() {
        let p = SparsityPattern::TWO_FOUR;
        let z = vec![0.0f32; 8 * 3];
        let a = NmWeight::from_dense(&z, 8, 3, p).unwrap();
        assert_eq!(a.to_dense(), z);
        let mut w = z.clone();
        w[0] = 1.0;
        w[3] = 1.0;
        w[6] = 1.0; // inputs 0, 1, 2 of output 0: three kept in group 0
        let e = NmWeight::from_dense(&w, 8, 3, p).unwrap_err();
        assert!(matches!(
            e,
            SparseError::NmViolation {
                column: 0,
                group_start: 0,
                ..
            }
        ));
        assert!(NmWeight::from_dense(&z, 6, 4, p).is_err()); // 4 does not divide 6
        assert!(NmWeight::from_dense(&z, 8, 3, SparsityPattern::Unstructured).is_err());
        assert!(
            NmWeight::from_dense(&[0.0; 600], 300, 2, SparsityPattern::n_m(1, 300).unwrap())
                .is_err()
        );
    }

    #[test]
    fn rejects_bad_parts() {
        let p = SparsityPattern::TWO_FOUR;
        assert!(NmWeight::from_parts(8, 1, p, vec![0.0; 3], vec![0]).is_err());
        assert!(NmWeight::from_parts(8, 1, p, vec![0.0; 4], vec![]).is_err());
        // positions 1, 1: not increasing
        let e = NmWeight::from_parts(8, 1, p, vec![0.0; 4], vec![0b01_01]).unwrap_err();
        assert!(e.to_string().contains("strictly increasing"), "{e}");
        // 1:3 uses 2-bit fields; position 3 is out of range
        let p13 = SparsityPattern::n_m(1, 3).unwrap();
        assert!(NmWeight::from_parts(3, 1, p13, vec![0.0; 2], vec![0b11_00]).is_err());
        assert!(NmWeight::from_parts(3, 1, p13, vec![0.0; 2], vec![0b10_00]).is_ok());
    }
}
