//! Error type of `ressa-sparse`. Every message is one line.

use thiserror::Error;

/// Errors raised by masks, sparsity patterns and mask sidecar files.
#[derive(Debug, Error)]
pub enum SparseError {
    /// A buffer does not hold `d_in * d_out` entries.
    #[error("buffer of {got} entries does not match shape [{d_in}, {d_out}] ({expected} entries)")]
    ShapeMismatch {
        d_in: usize,
        d_out: usize,
        expected: usize,
        got: usize,
    },
    /// `d_in * d_out` overflows `usize`.
    #[error("mask shape [{d_in}, {d_out}] is too large")]
    ShapeOverflow { d_in: usize, d_out: usize },
    /// A packed byte buffer has the wrong length or non-zero padding bits.
    #[error(
        "packed mask for shape [{d_in}, {d_out}] needs {expected} bytes with zero padding bits, got {got} bytes{detail}"
    )]
    PackedBytes {
        d_in: usize,
        d_out: usize,
        expected: usize,
        got: usize,
        detail: &'static str,
    },
    /// An index is outside the mask.
    #[error("index ({i}, {j}) is outside mask shape [{d_in}, {d_out}]")]
    OutOfBounds {
        i: usize,
        j: usize,
        d_in: usize,
        d_out: usize,
    },
    /// A sparsity pattern string could not be parsed.
    #[error("invalid sparsity pattern {0:?}: expected \"unstructured\" or \"N:M\" such as \"2:4\"")]
    ParsePattern(String),
    /// N:M with `n == 0` or `n >= m`.
    #[error("invalid N:M pattern {n}:{m}: need 0 < n < m (n = entries pruned per group of m)")]
    InvalidNm { n: usize, m: usize },
    /// The group size does not divide the input dimension.
    #[error("N:M group size m = {m} does not divide d_in = {d_in}")]
    NmDoesNotDivide { m: usize, d_in: usize },
    /// A mask violates an N:M pattern.
    #[error(
        "mask is not {n}:{m}: column {column}, group starting at input {group_start} prunes {pruned} entries"
    )]
    NmViolation {
        n: usize,
        m: usize,
        column: usize,
        group_start: usize,
        pruned: usize,
    },
    /// Reading or writing a sidecar file failed.
    #[error("mask file {path}: {message}")]
    Io { path: String, message: String },
    /// A sidecar file is not in the expected format.
    #[error("invalid mask sidecar: {0}")]
    Format(String),
    /// A tensor of a sparse-format safetensors file is missing or malformed.
    #[error("tensor {name:?}: {message}")]
    Tensor { name: String, message: String },
    /// A field of an in-memory sparse format is inconsistent (wrong length, index out of range…).
    #[error("{format} field {field}: {message}")]
    InvalidFormat {
        format: &'static str,
        field: &'static str,
        message: String,
    },
    /// An operand of a sparse product has the wrong size.
    #[error("{what}: expected {expected} entries, got {got}")]
    DimMismatch {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    /// An N:M pattern the packed N:M format cannot hold.
    #[error("N:M format {n}:{m} unsupported: {reason}")]
    UnsupportedNm {
        n: usize,
        m: usize,
        reason: &'static str,
    },
    /// A GPU device, upload or kernel launch failed, or a size exceeds what the GPU kernels
    /// address.
    #[error("GPU kernels: {0}")]
    Gpu(String),
}
