//! Error type of `ressa-prune`. Every message is one line.

use ressa_sparse::SparseError;
use thiserror::Error;

/// Errors raised while collecting statistics or computing masks.
#[derive(Debug, Error)]
pub enum PruneError {
    /// Unstructured sparsity outside `[0, 1)` or not finite.
    #[error("sparsity {0} is outside [0, 1)")]
    InvalidSparsity(f64),
    /// Pattern or mask problem (bad N:M, `m` not dividing `d_in`, ...).
    #[error(transparent)]
    Sparse(#[from] SparseError),
    /// A weight buffer does not match its declared shape.
    #[error("weight buffer has {got} values, expected [{d_in}, {d_out}] = {expected}")]
    WeightShape {
        d_in: usize,
        d_out: usize,
        expected: usize,
        got: usize,
    },
    /// An activation batch does not match `[n_tokens, d_in]`.
    #[error("activation batch has {got} values, expected [{n_tokens}, {d_in}] = {expected}")]
    ActivationShape {
        n_tokens: usize,
        d_in: usize,
        expected: usize,
        got: usize,
    },
    /// A layer's input dimension differs from the one the statistics were built for.
    #[error("input dimension {got} does not match the statistics' d_in = {expected}")]
    DimMismatch { expected: usize, got: usize },
    /// A zero-sized dimension, batch or sample count.
    #[error("empty {0}")]
    Empty(&'static str),
    /// NaN or infinity in an input.
    #[error("non-finite value {value} in {what} at flat index {index}")]
    NonFinite {
        what: &'static str,
        index: usize,
        value: f32,
    },
    /// `prune` was called before any calibration batch was added.
    #[error("no calibration statistics: add at least one activation batch before pruning")]
    EmptyStatistics,
    /// Damped Cholesky of the Hessian kept failing.
    #[error("Hessian not positive definite after {0} dampings")]
    HessianNotPositiveDefinite(usize),
    /// Damped Cholesky of the inverse Hessian kept failing.
    #[error("inverse Hessian not positive definite after {0} dampings")]
    InverseHessianNotPositiveDefinite(usize),
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// An OWL allocation left `[0, 1)`.
    #[error("OWL sparsity {value} for block {block} is outside [0, 1); reduce lambda")]
    OwlOutOfRange { block: usize, value: f64 },
}

/// Checks that every value is finite, naming the first offender.
pub(crate) fn check_finite(what: &'static str, values: &[f32]) -> Result<(), PruneError> {
    // a branch-free test per block (it vectorises), the position only for a failing block
    const BLOCK: usize = 1024;
    for (b, block) in values.chunks(BLOCK).enumerate() {
        if !block.iter().fold(true, |ok, v| ok & v.is_finite()) {
            let at = block.iter().position(|v| !v.is_finite()).unwrap_or(0);
            let index = b * BLOCK + at;
            return Err(PruneError::NonFinite {
                what,
                index,
                value: values[index],
            });
        }
    }
    Ok(())
}
