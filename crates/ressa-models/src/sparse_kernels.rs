//! Sparse CPU inference: packs every pruned linear of a vision-language model for
//! `ressa_sparse`'s kernels ([`crate::linear::Linear::pack`]), each with the kernel the cost
//! model predicts fastest for the rows that layer sees per call.

use burn::prelude::*;
use ressa_sparse::KernelKind;

use crate::vlm::VisionLanguageModel;
use crate::{ModelError, Result};

/// What one forward call feeds the model, to size each stack's calls for the cost model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelRows {
    /// Images per call (the batch size).
    pub images: usize,
    /// Rows of one decoding step: batch × beams.
    pub decode: usize,
    /// Language-model prompt tokens per image.
    pub prompt: usize,
}

/// One packed linear.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedLayer {
    /// HF module name, e.g. `language_model.decoder.block.0.layer.0.SelfAttention.q`.
    pub name: String,
    pub kind: KernelKind,
    /// Rows per call the kernel was chosen for.
    pub rows: usize,
    /// Fraction of the weight that is zero.
    pub sparsity: f64,
}

/// What [`use_sparse_kernels`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SparseKernelReport {
    /// The packed linears, in calibration order.
    pub layers: Vec<PackedLayer>,
    /// Prunable linears left on burn's matmul (no zeros, or an adapter attached).
    pub unpacked: usize,
}

impl SparseKernelReport {
    /// Packed layers per kernel, in the order dense, CSR, bitmask, N:M.
    pub fn counts(&self) -> [(KernelKind, usize); 4] {
        [
            KernelKind::Dense,
            KernelKind::Csr,
            KernelKind::Bitmask,
            KernelKind::Nm,
        ]
        .map(|k| (k, self.layers.iter().filter(|l| l.kind == k).count()))
    }
}

/// Packs every prunable linear whose weight has zeros for the sparse host kernels (see
/// [`crate::linear::Linear::pack`]); the others keep burn's matmul. Each kernel is chosen for
/// the rows its stack sees per call ([`VisionLanguageModel::kernel_rows`]: vision
/// `images × patches`, Q-Former `images × queries`, T5 encoder `images × (queries + prompt)`,
/// decoder stacks `decode`, one decoding step; the prefill is a single call).
///
/// For CPU inference (flex, ndarray): every packed layer then round-trips its input through
/// host memory. Call it after the weights are final; it reads each weight to the host once.
///
/// With `release_dense`, each layer's dense copy is freed as soon as it is packed
/// ([`crate::linear::Linear::release_dense`]), so memory never holds both forms of the model;
/// the model is then for inference only.
pub fn use_sparse_kernels<B: Backend, M: VisionLanguageModel<B>>(
    model: &mut M,
    rows: KernelRows,
    release_dense: bool,
) -> Result<SparseKernelReport> {
    let mut report = SparseKernelReport::default();
    for stack in model.stacks() {
        let stack_rows = model.kernel_rows(stack.id, &rows).max(1);
        for b in 0..stack.blocks {
            for linear in model.block_linears_mut(stack.id, b) {
                let name = linear.key.to_string();
                let kind = linear
                    .pack(stack_rows)
                    .map_err(|e| ModelError::Input(format!("{name}: {e}")))?;
                match kind {
                    Some((kind, zeros)) => {
                        if release_dense {
                            linear.release_dense();
                        }
                        let [d_in, d_out] = linear.dims();
                        report.layers.push(PackedLayer {
                            name,
                            kind,
                            rows: stack_rows,
                            sparsity: zeros as f64 / (d_in * d_out).max(1) as f64,
                        });
                    }
                    None => report.unpacked += 1,
                }
            }
        }
    }
    Ok(report)
}

/// Drops every packed weight ([`use_sparse_kernels`] undone; layers whose dense weight was
/// released stay packed).
pub fn drop_sparse_kernels<B: Backend, M: VisionLanguageModel<B>>(model: &mut M) {
    crate::prunable::for_each_prunable_mut(model, |_, linear| linear.unpack());
}
