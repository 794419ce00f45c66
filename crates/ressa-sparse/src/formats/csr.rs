//! Compressed sparse rows with **one row per output** (the CSR of PyTorch's `[d_out, d_in]`
//! weight, i.e. the CSC of burn's `[d_in, d_out]`).
//!
//! Output `j` keeps entries `row_ptr[j] .. row_ptr[j + 1]` of `indices` (input index `i`, strictly
//! increasing) and `values` (`W[i, j]`). Rows per output suit `y = x·W` on the host: every output
//! is one dot product over its kept inputs, gathering from `x`, and outputs split freely across
//! threads. Indices are `u16` when `d_in ≤ 65536` (6 bytes per kept entry), else `u32`.

use crate::error::SparseError;
use crate::formats::{Keep, SparseFormat, output_rows};
use crate::mask::Mask;

/// Input indices of a [`CsrWeight`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CsrIndices {
    /// `d_in ≤ 65536`.
    U16(Vec<u16>),
    /// Wider layers.
    U32(Vec<u32>),
}

impl CsrIndices {
    /// Number of indices.
    pub fn len(&self) -> usize {
        match self {
            Self::U16(v) => v.len(),
            Self::U32(v) => v.len(),
        }
    }

    /// Whether there are no indices.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Index `k` widened to `usize`.
    pub fn get(&self, k: usize) -> Option<usize> {
        match self {
            Self::U16(v) => v.get(k).map(|&i| i as usize),
            Self::U32(v) => v.get(k).map(|&i| i as usize),
        }
    }

    fn bytes_per_index(&self) -> usize {
        match self {
            Self::U16(_) => 2,
            Self::U32(_) => 4,
        }
    }
}

/// Sparse weight in CSR over outputs (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct CsrWeight {
    d_in: usize,
    d_out: usize,
    row_ptr: Vec<usize>,
    indices: CsrIndices,
    values: Vec<f32>,
}

impl CsrWeight {
    /// Keeps the non-zero entries of a dense `[d_in, d_out]` weight.
    pub fn from_dense(w: &[f32], d_in: usize, d_out: usize) -> Result<Self, SparseError> {
        Self::build(w, d_in, d_out, Keep::NonZero)
    }

    /// Keeps exactly the entries the mask keeps (zero values included).
    pub fn from_masked(w: &[f32], mask: &Mask) -> Result<Self, SparseError> {
        Self::build(w, mask.d_in(), mask.d_out(), Keep::Mask(mask))
    }

    fn build(w: &[f32], d_in: usize, d_out: usize, keep: Keep<'_>) -> Result<Self, SparseError> {
        let (rows, flags) = output_rows(w, d_in, d_out, keep)?;
        let nnz = flags.iter().filter(|k| **k).count();
        let mut row_ptr = Vec::with_capacity(d_out + 1);
        let mut idx = Vec::with_capacity(nnz);
        let mut values = Vec::with_capacity(nnz);
        row_ptr.push(0);
        for j in 0..d_out {
            let r = j * d_in..(j + 1) * d_in;
            for (i, (&v, &k)) in rows[r.clone()].iter().zip(&flags[r]).enumerate() {
                if k {
                    idx.push(i as u32);
                    values.push(v);
                }
            }
            row_ptr.push(values.len());
        }
        Ok(Self {
            d_in,
            d_out,
            row_ptr,
            indices: narrow(idx, d_in),
            values,
        })
    }

    /// Builds from raw arrays, checking `row_ptr` (length `d_out + 1`, from 0, non-decreasing,
    /// ending at `values.len()`), indices (`< d_in`, strictly increasing per row).
    pub fn from_parts(
        d_in: usize,
        d_out: usize,
        row_ptr: Vec<usize>,
        indices: Vec<u32>,
        values: Vec<f32>,
    ) -> Result<Self, SparseError> {
        let err = |field, message: String| SparseError::InvalidFormat {
            format: "CSR",
            field,
            message,
        };
        d_in.checked_mul(d_out)
            .ok_or(SparseError::ShapeOverflow { d_in, d_out })?;
        if row_ptr.len() != d_out + 1 {
            return Err(err(
                "row_ptr",
                format!("length {} != d_out + 1 = {}", row_ptr.len(), d_out + 1),
            ));
        }
        if indices.len() != values.len() {
            return Err(err(
                "indices",
                format!("length {} != values length {}", indices.len(), values.len()),
            ));
        }
        if row_ptr[0] != 0 || row_ptr[d_out] != values.len() {
            return Err(err(
                "row_ptr",
                format!(
                    "must start at 0 and end at {} (got {} .. {})",
                    values.len(),
                    row_ptr[0],
                    row_ptr[d_out]
                ),
            ));
        }
        for j in 0..d_out {
            let (a, b) = (row_ptr[j], row_ptr[j + 1]);
            if a > b || b > values.len() {
                return Err(err(
                    "row_ptr",
                    format!("decreases or exceeds {} at output {j}", values.len()),
                ));
            }
            let row = &indices[a..b];
            if let Some(&last) = row.last()
                && last as usize >= d_in
            {
                return Err(err(
                    "indices",
                    format!("output {j} has input index {last} >= d_in = {d_in}"),
                ));
            }
            if row.windows(2).any(|p| p[0] >= p[1]) {
                return Err(err(
                    "indices",
                    format!("indices of output {j} are not strictly increasing"),
                ));
            }
        }
        Ok(Self {
            d_in,
            d_out,
            row_ptr,
            indices: narrow(indices, d_in),
            values,
        })
    }

    /// Row pointers (length `d_out + 1`).
    pub fn row_ptr(&self) -> &[usize] {
        &self.row_ptr
    }

    /// Input indices of the kept entries, output by output.
    pub fn indices(&self) -> &CsrIndices {
        &self.indices
    }

    /// Kept values, output by output.
    pub fn values(&self) -> &[f32] {
        &self.values
    }
}

/// `u16` indices when every index fits.
fn narrow(idx: Vec<u32>, d_in: usize) -> CsrIndices {
    if d_in <= 1 << 16 {
        CsrIndices::U16(idx.into_iter().map(|i| i as u16).collect())
    } else {
        CsrIndices::U32(idx)
    }
}

impl SparseFormat for CsrWeight {
    fn shape(&self) -> (usize, usize) {
        (self.d_in, self.d_out)
    }

    fn nnz(&self) -> usize {
        self.values.len()
    }

    fn to_dense(&self) -> Vec<f32> {
        let mut w = vec![0.0f32; self.d_in * self.d_out];
        for j in 0..self.d_out {
            for k in self.row_ptr[j]..self.row_ptr[j + 1] {
                let i = self.indices.get(k).unwrap_or(0);
                w[i * self.d_out + j] = self.values[k];
            }
        }
        w
    }

    fn mask(&self) -> Mask {
        let mut m = Mask::zeros(self.d_in, self.d_out).expect("shape was valid at construction");
        for j in 0..self.d_out {
            for k in self.row_ptr[j]..self.row_ptr[j + 1] {
                let i = self.indices.get(k).unwrap_or(0);
                let _ = m.set(i, j, true);
            }
        }
        m
    }

    fn storage_bytes(&self) -> usize {
        self.values.len() * 4
            + self.indices.len() * self.indices.bytes_per_index()
            + self.row_ptr.len() * std::mem::size_of::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::test_util::{Lcg, masked_weight};

    #[test]
    fn round_trips_ragged_empty_full() {
        let mut rng = Lcg(11);
        for (d_in, d_out, s) in [
            (1, 1, 0.0),
            (3, 7, 0.5),
            (17, 5, 0.9),
            (64, 33, 0.7),
            (5, 4, 1.0),
            (9, 13, 0.0),
            (0, 4, 0.5),
            (4, 0, 0.5),
        ] {
            let (w, mask) = masked_weight(&mut rng, d_in, d_out, s);
            let a = CsrWeight::from_masked(&w, &mask).unwrap();
            assert_eq!(a.to_dense(), w);
            assert_eq!(a.mask(), mask);
            assert_eq!(a.nnz(), mask.count_kept());
            let b = CsrWeight::from_dense(&w, d_in, d_out).unwrap();
            assert_eq!(b.to_dense(), w);
            let c = CsrWeight::from_parts(
                d_in,
                d_out,
                a.row_ptr().to_vec(),
                (0..a.nnz())
                    .map(|k| a.indices().get(k).unwrap() as u32)
                    .collect(),
                a.values().to_vec(),
            )
            .unwrap();
            assert_eq!(c, a);
        }
    }

    #[test]
    fn empty_rows_and_explicit_zeros() {
        // output 1 keeps nothing; output 0 keeps a zero-valued entry through the mask
        let w = vec![0.0, 0.0, 2.0, 0.0, 0.0, 0.0];
        let mask = Mask::from_bools(3, 2, &[true, false, true, false, false, false]).unwrap();
        let a = CsrWeight::from_masked(&w, &mask).unwrap();
        assert_eq!(a.row_ptr(), &[0, 2, 2]);
        assert_eq!(a.values(), &[0.0, 2.0]);
        assert_eq!(a.mask(), mask);
        assert_eq!(a.to_dense(), w);
        let b = CsrWeight::from_dense(&w, 3, 2).unwrap();
        assert_eq!(b.nnz(), 1);
        assert_eq!(b.to_dense(), w);
    }

    #[test]
    fn wide_inputs_use_u32() {
        let d_in = (1 << 16) + 3;
        let mut w = vec![0.0f32; d_in];
        w[d_in - 1] = 1.5;
        let a = CsrWeight::from_dense(&w, d_in, 1).unwrap();
        assert!(matches!(a.indices(), CsrIndices::U32(_)));
        assert_eq!(a.to_dense(), w);
    }

    #[test]
    fn rejects_bad_parts_and_shapes() {
        assert!(CsrWeight::from_dense(&[1.0; 5], 2, 3).is_err());
        assert!(CsrWeight::from_masked(&[1.0; 6], &Mask::ones(3, 3).unwrap()).is_err());
        let bad = [
            (vec![0, 1], vec![0], vec![1.0]),          // row_ptr too short
            (vec![0, 1, 1], vec![3], vec![1.0]),       // index out of range
            (vec![0, 2, 2], vec![1, 1], vec![1.0; 2]), // not increasing
            (vec![0, 2, 1], vec![0, 1], vec![1.0; 2]), // decreasing row_ptr
            (vec![0, 1, 1], vec![0, 1], vec![1.0]),    // lengths differ
            (vec![1, 1, 1], vec![0], vec![1.0]),       // does not start at 0
            (vec![0, 5, 2], vec![0, 1], vec![1.0; 2]), // overshoots
        ];
        for (rp, idx, v) in bad {
            let e = CsrWeight::from_parts(3, 2, rp, idx, v).unwrap_err();
            assert!(e.to_string().starts_with("CSR field"), "{e}");
        }
    }
}
