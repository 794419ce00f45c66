//! Model-independent post-training pruning for RESSA: magnitude, Wanda, SparseGPT, DSnoT and
//! OWL layer-wise sparsity allocation.
//!
//! # Orientation
//! Weights are burn Linear weights: a row-major `[d_in, d_out]` `f32` buffer (the transpose of
//! PyTorch's `[d_out, d_in]`). PyTorch "output row" `j` is column `j` here. Activations are
//! row-major `[n_tokens, d_in]`. Masks are [`ressa_sparse::Mask`]s in the same orientation as
//! their weight (`true` = keep). N:M groups run along the input dimension (dim 0) of each column.
//!
//! # Workflow
//! One [`Pruner`] per Linear: feed every calibration batch that reaches the layer with
//! [`Pruner::add_batch`], then call [`Pruner::prune`] with the weight and a [`PruneSpec`].
//! [`PrunerConfig::build`] makes a boxed pruner for any method.
//!
//! # Tie-breaking (all methods)
//! Scores are ordered by `(score, index)` ascending, i.e. a stable ascending sort, and the
//! first entries in that order are pruned: among equal scores the entry with the **lower
//! index is pruned first**. The index is the input index `i` inside one output (per-output
//! groups and N:M groups) and the PyTorch flat index `j * d_in + i` (output-major) for groups
//! spanning several outputs (per-matrix selection, SparseGPT blocks). NaN never reaches a
//! selection (inputs are checked), except DSnoT's regrowth key `0 / 0` for dead inputs, which
//! sorts last as in `torch.sort`.
//!
//! # Counts
//! Unstructured selection prunes `k = floor(sparsity * group_size)` entries (the reference's
//! `int(...)`), except DSnoT, whose reference uses Python's `round` (ties to even) by default.
//! [`ThresholdRule`] reproduces the reference's value-threshold variants for groups spanning
//! several outputs.

mod activations;
pub mod calibrate;
pub mod dsnot;
pub mod error;
mod kth;
pub mod magnitude;
pub mod owl;
mod select;
mod simd;
pub mod sparsegpt;
pub mod stats;
pub mod stream;
pub mod wanda;

use ressa_sparse::{Mask, SparsityPattern};

pub use dsnot::{CountRounding, DsnotConfig, DsnotPruner, InitialMethod};
pub use error::PruneError;
pub use magnitude::{MagnitudeConfig, MagnitudePruner};
pub use owl::{OwlConfig, OwlLayer};
pub use sparsegpt::{SparseGptConfig, SparseGptPruner};
pub use stats::ActivationStats;
pub use wanda::{WandaConfig, WandaPruner};

/// Result alias of this crate.
pub type Result<T, E = PruneError> = std::result::Result<T, E>;

/// Which entries compete with each other in unstructured selection.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum ComparisonGroup {
    /// Each output (PyTorch row, burn column) prunes `floor(s * d_in)` of its own inputs.
    /// Upstream Wanda and the reference's T5 pruner.
    #[default]
    PerOutput,
    /// One selection over the whole matrix. The reference's ViT Wanda pruner and the
    /// magnitude baseline.
    PerMatrix,
}

/// How a selection spanning several outputs (per-matrix, SparseGPT block) turns the target
/// count `k = floor(s * numel)` into a mask. `thr` is the `k`-th smallest score (0-based
/// index `k` of the ascending sort).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ThresholdRule {
    /// Prune exactly `k` entries, ties broken by the crate's rule (lower PyTorch flat index
    /// first). Default: the achieved sparsity is exact.
    #[default]
    ExactCount,
    /// Prune `score < thr` (reference ViT Wanda). Equals `ExactCount` without ties at `thr`.
    BelowKth,
    /// Prune `score <= thr` (upstream SparseGPT and upstream Wanda's magnitude baseline):
    /// `k + 1` entries without ties.
    AtOrBelowKth,
}

/// What to prune: a pattern plus, for unstructured, a sparsity ratio.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PruneSpec {
    pattern: SparsityPattern,
    sparsity: f64,
}

impl PruneSpec {
    /// Unstructured sparsity `s` in `[0, 1)` (fraction pruned; the reference's `1 - keep`).
    pub fn unstructured(sparsity: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&sparsity) {
            return Err(PruneError::InvalidSparsity(sparsity));
        }
        Ok(Self {
            pattern: SparsityPattern::Unstructured,
            sparsity,
        })
    }

    /// N:M: prune `n` of every `m` consecutive inputs of each output.
    pub fn n_m(n: usize, m: usize) -> Result<Self> {
        let pattern = SparsityPattern::n_m(n, m)?;
        Ok(Self {
            pattern,
            sparsity: n as f64 / m as f64,
        })
    }

    /// From a pattern; `sparsity` is used for unstructured and ignored for N:M (as the
    /// reference ignores the ratio when `prune_n != 0`).
    pub fn new(pattern: SparsityPattern, sparsity: f64) -> Result<Self> {
        match pattern {
            SparsityPattern::Unstructured => Self::unstructured(sparsity),
            SparsityPattern::NM { n, m } => Self::n_m(n, m),
        }
    }

    /// The pattern.
    pub fn pattern(&self) -> SparsityPattern {
        self.pattern
    }

    /// Target sparsity (`n / m` for N:M).
    pub fn sparsity(&self) -> f64 {
        self.sparsity
    }

    /// Checks the spec against a layer with `d_in` inputs.
    pub fn validate(&self, d_in: usize) -> Result<()> {
        self.pattern.validate(d_in)?;
        Ok(())
    }
}

/// A borrowed burn-orientation weight, row-major `[d_in, d_out]`.
#[derive(Clone, Copy, Debug)]
pub struct Weights<'a> {
    data: &'a [f32],
    d_in: usize,
    d_out: usize,
}

impl<'a> Weights<'a> {
    /// Checks the shape (non-empty, `d_in * d_out` values) and that every value is finite.
    pub fn new(data: &'a [f32], d_in: usize, d_out: usize) -> Result<Self> {
        if d_in == 0 || d_out == 0 {
            return Err(PruneError::Empty("weight matrix"));
        }
        let expected = d_in
            .checked_mul(d_out)
            .ok_or(PruneError::Empty("weight matrix (shape overflows)"))?;
        if data.len() != expected {
            return Err(PruneError::WeightShape {
                d_in,
                d_out,
                expected,
                got: data.len(),
            });
        }
        error::check_finite("weights", data)?;
        Ok(Self { data, d_in, d_out })
    }

    /// Row-major values.
    pub fn data(&self) -> &'a [f32] {
        self.data
    }

    /// Input dimension (rows).
    pub fn d_in(&self) -> usize {
        self.d_in
    }

    /// Output dimension (columns).
    pub fn d_out(&self) -> usize {
        self.d_out
    }

    /// Entry `(i, j)`: input `i`, output `j`.
    pub fn get(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.d_out + j]
    }
}

/// The pruning method of a [`Pruner`] (`magnitude`, `wanda`, `sparsegpt`, `dsnot` in flags
/// and configs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Method {
    /// |W| baseline.
    #[serde(alias = "mag")]
    Magnitude,
    /// Wanda: |W| times the input's L2 norm.
    Wanda,
    /// SparseGPT: OBS reconstruction with the layer Hessian.
    #[cfg_attr(feature = "clap", value(name = "sparsegpt"))]
    SparseGpt,
    /// DSnoT: training-free prune-and-regrow on a Wanda or magnitude mask.
    Dsnot,
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Method::Magnitude => "magnitude",
            Method::Wanda => "wanda",
            Method::SparseGpt => "sparsegpt",
            Method::Dsnot => "dsnot",
        })
    }
}

impl std::str::FromStr for Method {
    type Err = PruneError;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "magnitude" | "mag" => Ok(Method::Magnitude),
            "wanda" => Ok(Method::Wanda),
            "sparsegpt" => Ok(Method::SparseGpt),
            "dsnot" => Ok(Method::Dsnot),
            _ => Err(PruneError::InvalidConfig(format!(
                "unknown pruning method {s:?} (magnitude, wanda, sparsegpt, dsnot)"
            ))),
        }
    }
}

/// What [`Pruner::prune`] produces.
#[derive(Clone, Debug)]
pub struct PruneOutput {
    /// Keep mask, `[d_in, d_out]`.
    pub mask: Mask,
    /// Reconstructed weights (SparseGPT only), row-major `[d_in, d_out]`, with every pruned
    /// entry exactly zero. `None`: the method does not change surviving weights.
    pub weights: Option<Vec<f32>>,
}

impl PruneOutput {
    /// Writes the pruned layer into `weights`: the reconstructed weights when present,
    /// otherwise `weights` with pruned entries zeroed.
    pub fn apply_to(&self, weights: &mut [f32]) -> Result<()> {
        match &self.weights {
            Some(w) => {
                if w.len() != weights.len() {
                    return Err(PruneError::WeightShape {
                        d_in: self.mask.d_in(),
                        d_out: self.mask.d_out(),
                        expected: w.len(),
                        got: weights.len(),
                    });
                }
                weights.copy_from_slice(w);
                Ok(())
            }
            None => Ok(self.mask.apply(weights)?),
        }
    }
}

/// One Linear layer's pruner: accumulates calibration statistics, then produces its mask.
pub trait Pruner: Send + Sync {
    /// The method.
    fn method(&self) -> Method;

    /// Input dimension the statistics are built for.
    fn d_in(&self) -> usize;

    /// Adds one calibration batch `x` (row-major `[n_tokens, d_in]`) that counts as
    /// `n_samples` samples in the reference's running means (the reference counts the
    /// leading batch dimension: a `[tokens, d_in]` input is one sample).
    fn add_batch_samples(&mut self, x: &[f32], n_tokens: usize, n_samples: usize) -> Result<()>;

    /// Adds one calibration sample `x` (row-major `[n_tokens, d_in]`).
    fn add_batch(&mut self, x: &[f32], n_tokens: usize) -> Result<()> {
        self.add_batch_samples(x, n_tokens, 1)
    }

    /// Number of samples seen so far.
    fn nsamples(&self) -> u64;

    /// Computes the mask (and, for SparseGPT, the reconstructed weights) of `weights`.
    fn prune(&self, weights: Weights<'_>, spec: &PruneSpec) -> Result<PruneOutput>;

    /// [`Pruner::prune`] by a pruner not needed afterwards, which may free its statistics as
    /// soon as it can (SparseGPT drops its `d_in²` Hessian sum once the Hessian is factorized).
    /// Same result as [`Pruner::prune`].
    fn prune_once(self: Box<Self>, weights: Weights<'_>, spec: &PruneSpec) -> Result<PruneOutput> {
        self.prune(weights, spec)
    }
}

/// Configuration of any method; [`PrunerConfig::build`] makes its [`Pruner`].
#[derive(Clone, Debug, PartialEq)]
pub enum PrunerConfig {
    /// Magnitude.
    Magnitude(MagnitudeConfig),
    /// Wanda.
    Wanda(WandaConfig),
    /// SparseGPT.
    SparseGpt(SparseGptConfig),
    /// DSnoT.
    Dsnot(DsnotConfig),
}

impl PrunerConfig {
    /// The default configuration of `method`.
    pub fn default_for(method: Method) -> Self {
        match method {
            Method::Magnitude => Self::Magnitude(MagnitudeConfig::default()),
            Method::Wanda => Self::Wanda(WandaConfig::default()),
            Method::SparseGpt => Self::SparseGpt(SparseGptConfig::default()),
            Method::Dsnot => Self::Dsnot(DsnotConfig::default()),
        }
    }

    /// The method.
    pub fn method(&self) -> Method {
        match self {
            Self::Magnitude(_) => Method::Magnitude,
            Self::Wanda(_) => Method::Wanda,
            Self::SparseGpt(_) => Method::SparseGpt,
            Self::Dsnot(_) => Method::Dsnot,
        }
    }

    /// A pruner for a Linear with `d_in` inputs.
    pub fn build(&self, d_in: usize) -> Result<Box<dyn Pruner>> {
        Ok(match self {
            Self::Magnitude(c) => Box::new(MagnitudePruner::new(d_in, c.clone())?),
            Self::Wanda(c) => Box::new(WandaPruner::new(d_in, c.clone())?),
            Self::SparseGpt(c) => Box::new(SparseGptPruner::new(d_in, c.clone())?),
            Self::Dsnot(c) => Box::new(DsnotPruner::new(d_in, c.clone())?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_validation() {
        assert!(PruneSpec::unstructured(0.0).is_ok());
        assert!(PruneSpec::unstructured(0.999).is_ok());
        for bad in [1.0, -0.1, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                PruneSpec::unstructured(bad),
                Err(PruneError::InvalidSparsity(_))
            ));
        }
        assert!(PruneSpec::n_m(2, 4).unwrap().validate(64).is_ok());
        assert!(PruneSpec::n_m(2, 4).unwrap().validate(66).is_err());
        assert!(PruneSpec::n_m(4, 4).is_err());
        assert_eq!(PruneSpec::n_m(4, 8).unwrap().sparsity(), 0.5);
        let s = PruneSpec::new(SparsityPattern::TWO_FOUR, 0.9).unwrap();
        assert_eq!(s.sparsity(), 0.5);
    }

    #[test]
    fn weights_validation() {
        assert!(Weights::new(&[0.0; 6], 2, 3).is_ok());
        assert!(matches!(
            Weights::new(&[0.0; 5], 2, 3),
            Err(PruneError::WeightShape { .. })
        ));
        assert!(Weights::new(&[], 0, 3).is_err());
        let e = Weights::new(&[0.0, f32::NAN, 0.0, 0.0], 2, 2).unwrap_err();
        assert!(matches!(e, PruneError::NonFinite { index: 1, .. }));
        assert!(!e.to_string().contains('\n'));
    }

    #[test]
    fn apply_output() {
        let mask = Mask::from_bools(2, 2, &[true, false, false, true]).unwrap();
        let mut w = vec![1.0f32, 2.0, 3.0, 4.0];
        let plain = PruneOutput {
            mask: mask.clone(),
            weights: None,
        };
        plain.apply_to(&mut w).unwrap();
        assert_eq!(w, vec![1.0, 0.0, 0.0, 4.0]);
        let recon = PruneOutput {
            mask,
            weights: Some(vec![0.5, 0.0, 0.0, 4.5]),
        };
        recon.apply_to(&mut w).unwrap();
        assert_eq!(w, vec![0.5, 0.0, 0.0, 4.5]);
        assert!(recon.apply_to(&mut [0.0; 3]).is_err());
    }

    #[test]
    fn method_parsing() {
        for m in [
            Method::Magnitude,
            Method::Wanda,
            Method::SparseGpt,
            Method::Dsnot,
        ] {
            assert_eq!(m.to_string().parse::<Method>().unwrap(), m);
            let p = PrunerConfig::default_for(m).build(8).unwrap();
            assert_eq!(p.method(), m);
            assert_eq!(p.d_in(), 8);
        }
        assert!("obs".parse::<Method>().is_err());
    }
}
