//! Sparsity patterns (unstructured or N:M) and sparsity measurements.
//!
//! N:M follows the reference's `--prune_n N --prune_m M`: in every group of `m` consecutive
//! **input** entries of each output, `n` entries are **pruned**. 2:4 and 4:8 are both 50%.
//! In burn orientation (`[d_in, d_out]`) a group is `m` consecutive rows of one column:
//! rows `g*m .. g*m + m` of column `j`.

use std::fmt;
use std::str::FromStr;

use crate::error::SparseError;
use crate::mask::Mask;

/// How a matrix is allowed to be sparse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SparsityPattern {
    /// Any entries may be pruned.
    Unstructured,
    /// Exactly `n` of every `m` consecutive inputs (per output) are pruned.
    NM {
        /// Entries pruned per group.
        n: usize,
        /// Group size along the input dimension.
        m: usize,
    },
}

impl SparsityPattern {
    /// 2:4 (50%).
    pub const TWO_FOUR: Self = Self::NM { n: 2, m: 4 };
    /// 4:8 (50%).
    pub const FOUR_EIGHT: Self = Self::NM { n: 4, m: 8 };

    /// An N:M pattern, checking `0 < n < m`.
    pub fn n_m(n: usize, m: usize) -> Result<Self, SparseError> {
        let p = Self::NM { n, m };
        p.check_nm()?;
        Ok(p)
    }

    fn check_nm(&self) -> Result<(), SparseError> {
        match *self {
            Self::Unstructured => Ok(()),
            Self::NM { n, m } if n == 0 || n >= m => Err(SparseError::InvalidNm { n, m }),
            Self::NM { .. } => Ok(()),
        }
    }

    /// Checks the pattern itself and that it fits a layer with `d_in` inputs.
    pub fn validate(&self, d_in: usize) -> Result<(), SparseError> {
        self.check_nm()?;
        match *self {
            Self::NM { m, .. } if !d_in.is_multiple_of(m) => {
                Err(SparseError::NmDoesNotDivide { m, d_in })
            }
            _ => Ok(()),
        }
    }

    /// The sparsity an N:M pattern implies (`n / m`); `None` for unstructured.
    pub fn implied_sparsity(&self) -> Option<f64> {
        match *self {
            Self::Unstructured => None,
            Self::NM { n, m } => Some(n as f64 / m as f64),
        }
    }

    /// Whether this is an N:M pattern.
    pub fn is_n_m(&self) -> bool {
        matches!(self, Self::NM { .. })
    }
}

impl fmt::Display for SparsityPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unstructured => f.write_str("unstructured"),
            Self::NM { n, m } => write!(f, "{n}:{m}"),
        }
    }
}

impl FromStr for SparsityPattern {
    type Err = SparseError;

    /// Parses `"unstructured"` (case-insensitive) or `"N:M"` such as `"2:4"`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("unstructured") {
            return Ok(Self::Unstructured);
        }
        let (a, b) = t
            .split_once(':')
            .ok_or_else(|| SparseError::ParsePattern(s.to_string()))?;
        let n: usize = a
            .trim()
            .parse()
            .map_err(|_| SparseError::ParsePattern(s.to_string()))?;
        let m: usize = b
            .trim()
            .parse()
            .map_err(|_| SparseError::ParsePattern(s.to_string()))?;
        Self::n_m(n, m)
    }
}

/// Checks that every group of `m` consecutive inputs of every output prunes exactly `n`
/// entries, reporting the first violation.
pub fn check_n_m(mask: &Mask, n: usize, m: usize) -> Result<(), SparseError> {
    SparsityPattern::n_m(n, m)?.validate(mask.d_in())?;
    let (d_in, d_out) = mask.shape();
    let bools = mask.to_bools();
    let mut pruned = vec![0usize; d_out];
    for g in 0..d_in / m {
        pruned.iter_mut().for_each(|c| *c = 0);
        for i in g * m..(g + 1) * m {
            let row = &bools[i * d_out..(i + 1) * d_out];
            for (c, &keep) in pruned.iter_mut().zip(row) {
                *c += (!keep) as usize;
            }
        }
        if let Some((column, &p)) = pruned.iter().enumerate().find(|(_, p)| **p != n) {
            return Err(SparseError::NmViolation {
                n,
                m,
                column,
                group_start: g * m,
                pruned: p,
            });
        }
    }
    Ok(())
}

/// Whether `mask` is exactly N:M (`n` pruned in every group of `m` inputs of every output).
/// `false` when `m` does not divide `d_in` or `n:m` is not a valid pattern.
pub fn is_n_m(mask: &Mask, n: usize, m: usize) -> bool {
    check_n_m(mask, n, m).is_ok()
}

/// Whether `mask` satisfies `pattern` (always true for unstructured).
pub fn satisfies(mask: &Mask, pattern: SparsityPattern) -> bool {
    match pattern {
        SparsityPattern::Unstructured => true,
        SparsityPattern::NM { n, m } => is_n_m(mask, n, m),
    }
}

/// Sparsity (pruned fraction) of each output column, length `d_out`.
pub fn column_sparsity(mask: &Mask) -> Vec<f64> {
    let d_in = mask.d_in();
    mask.kept_per_column()
        .into_iter()
        .map(|kept| {
            if d_in == 0 {
                0.0
            } else {
                (d_in - kept) as f64 / d_in as f64
            }
        })
        .collect()
}

/// Sparsity (pruned fraction) of the whole matrix.
pub fn matrix_sparsity(mask: &Mask) -> f64 {
    mask.sparsity()
}

/// Fraction of exactly-zero entries of a weight buffer (0 for an empty buffer).
pub fn weight_sparsity(weights: &[f32]) -> f64 {
    if weights.is_empty() {
        0.0
    } else {
        weights.iter().filter(|w| **w == 0.0).count() as f64 / weights.len() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display() {
        assert_eq!(
            "unstructured".parse::<SparsityPattern>().unwrap(),
            SparsityPattern::Unstructured
        );
        assert_eq!(
            " Unstructured ".parse::<SparsityPattern>().unwrap(),
            SparsityPattern::Unstructured
        );
        assert_eq!(
            "2:4".parse::<SparsityPattern>().unwrap(),
            SparsityPattern::TWO_FOUR
        );
        assert_eq!(
            "4:8".parse::<SparsityPattern>().unwrap(),
            SparsityPattern::FOUR_EIGHT
        );
        assert_eq!(SparsityPattern::TWO_FOUR.to_string(), "2:4");
        assert_eq!(SparsityPattern::Unstructured.to_string(), "unstructured");
        for bad in [
            "", "2", "2:", ":4", "4:2", "0:4", "4:4", "a:b", "2:4:8", "dense",
        ] {
            let e = bad.parse::<SparsityPattern>();
            assert!(e.is_err(), "{bad:?} parsed");
            assert!(!e.unwrap_err().to_string().contains('\n'));
        }
    }

    #[test]
    fn validation() {
        assert!(SparsityPattern::TWO_FOUR.validate(64).is_ok());
        assert!(SparsityPattern::FOUR_EIGHT.validate(12).is_err());
        assert!(SparsityPattern::Unstructured.validate(7).is_ok());
        assert!(SparsityPattern::NM { n: 4, m: 4 }.validate(8).is_err());
        assert_eq!(SparsityPattern::FOUR_EIGHT.implied_sparsity(), Some(0.5));
    }

    #[test]
    fn n_m_checker() {
        // 8 inputs, 3 outputs; column j prunes inputs {j, j+1} mod 4 in every group of 4
        let mask = Mask::from_fn(8, 3, |i, j| {
            let r = i % 4;
            r != j % 4 && r != (j + 1) % 4
        })
        .unwrap();
        assert!(is_n_m(&mask, 2, 4));
        assert!(!is_n_m(&mask, 1, 4));
        // every group of 8 holds two groups of 4, so 4:8 holds too
        assert!(is_n_m(&mask, 4, 8));
        let mut broken = mask.clone();
        broken.set(5, 2, !mask.get(5, 2).unwrap()).unwrap();
        let err = check_n_m(&broken, 2, 4).unwrap_err();
        assert!(matches!(
            err,
            SparseError::NmViolation {
                column: 2,
                group_start: 4,
                ..
            }
        ));
        assert!(!is_n_m(&mask, 2, 3)); // 3 does not divide 8
        assert_eq!(column_sparsity(&mask), vec![0.5; 3]);
        assert_eq!(matrix_sparsity(&mask), 0.5);
        assert!(satisfies(&mask, SparsityPattern::Unstructured));
    }
}
