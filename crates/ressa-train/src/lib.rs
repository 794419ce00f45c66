//! RESSA repair (arXiv 2404.02424): SparseLoRA, whose update is multiplied by the pruned weight's
//! binary mask so that merging keeps exactly the pruned zeros.

pub mod sparse_lora;

pub use sparse_lora::{SparseLoraConfig, SparseLoraLinear};
