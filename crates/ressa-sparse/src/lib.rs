//! Binary sparsity masks, patterns, packed sparse weights and CPU sparse kernels for RESSA,
//! independent of any tensor framework.
//!
//! Orientation: masks follow burn's Linear layout `[d_in, d_out]` (row-major), the transpose
//! of PyTorch's `[d_out, d_in]`. A PyTorch "output row" `j` is column `j` here, and N:M groups
//! run along the input dimension (dim 0) inside each column.
//!
//! - [`Mask`]: bit-packed keep/prune mask (`true` = keep), with a documented byte layout.
//! - [`SparsityPattern`]: unstructured or N:M (`n` pruned per group of `m`), [`is_n_m`],
//!   per-column and per-matrix sparsity.
//! - [`sidecar`]: `masks.safetensors` files holding named masks.
//! - [`formats`]: packed sparse weights — compressed-tensors' `sparse-bitmask` (with its
//!   safetensors tensors and `config.json` annotation), CSR over outputs, packed N:M (2:4).
//! - [`kernels`]: multi-threaded CPU products `y = x · W` for each format, and
//!   [`SparseLinear`], which picks a format (or dense) by a measured
//!   cost model.
//! - `kernels::gpu` (feature `gpu`, with `wgpu` or `cuda`): CubeCL kernels for the packed
//!   N:M and CSR formats (and a dense one of the same style) on a device, generic over
//!   `cubecl::Runtime`.

pub mod error;
pub mod formats;
pub mod fpenv;
pub mod kernels;
pub mod mask;
pub mod pattern;
pub mod sidecar;

pub use error::SparseError;
pub use formats::{BitmaskWeight, CsrWeight, NmWeight, SparseFormat};
pub use kernels::{KernelKind, SparseLinear};
pub use mask::Mask;
pub use pattern::{
    SparsityPattern, check_n_m, column_sparsity, is_n_m, matrix_sparsity, satisfies,
    weight_sparsity,
};
