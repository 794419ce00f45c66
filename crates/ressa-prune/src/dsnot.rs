//! DSnoT: training-free prune-and-regrow on top of a Wanda or magnitude mask.
//!
//! Statistics per input `j` ([`ActivationStats::with_moments`]): `n_j`, the token-sum mean
//! `μ_j` and the streaming variance `v_j`. For output `o` (a burn column) and input `i`:
//! - `D_i = W_io · μ_i` (signed expected contribution);
//! - reconstruction error `e = Σ_{i pruned} D_i`;
//! - regrowth key `D_i / v_i^p` (`p` = `pow_of_var_regrowing`); error updates use plain `D`.
//!
//! **Unstructured** (per output, outputs are independent):
//! - initial mask: prune the `k` entries with the smallest initial score (stable sort),
//!   `k = round(d_in · s)` (the reference; Python `round`, ties to even) or `floor`;
//! - `R`: initially pruned inputs sorted ascending by key (stable, NaN last like `torch.sort`),
//!   pointers `lo` (front) and `hi` (back);
//! - `P`: initially kept inputs sorted ascending by Wanda score, reordered as negative-`D`
//!   entries (order kept), then zero-`D` entries (order kept), then positive-`D` entries
//!   (reversed); pointers `head` and `tail`;
//! - up to `max_cycle_time` steps while active: `g = e > 0 ? R[hi--] : R[lo++]`,
//!   `q = e < 0 ? P[tail--] : P[head++]`; stay active while `|e| > update_threshold`
//!   (error before the swap) and, if `same_sign`, `sign(e + D_q - D_g) == sign(e_initial)`;
//!   if active, prune `q`, regrow `g`, `e += D_q - D_g`. Inactive is final.
//!
//! **N:M**: the regrowth candidate is chosen as above; the prune candidate is the not yet
//! swapped-out kept entry with the lowest initial score in the regrown entry's group (ties:
//! lower index); the same-sign condition always applies.
//!
//! # Deviations from the reference (`zyxxmu/DSnoT` / `VLM-Compression` `dsnot_pruner.py`)
//! They only matter in corner cases the reference mishandles:
//! - `R` holds only initially pruned inputs. The reference sorts **all** inputs with kept
//!   ones keyed 0 (or NaN for `v = 0`), so once a pointer runs into them it "regrows" an entry
//!   that is already kept while still pruning `q`, which breaks the per-output count.
//! - The reference's reorder of `P` maps zero-`D` entries to a repeated `P[0]`; here they sit
//!   between the negative and positive entries.
//! - When a pointer pair is exhausted the output stops; the reference indexes out of range.
//!
//! The fixture tests (`tests/fixtures/pruners`, made by `scripts/make_pruner_fixtures.py`)
//! check these rules against an independent PyTorch implementation. The generator also runs
//! the reference's literal lists and stores their masks: of the 32 cases, 23 agree (every
//! Wanda-initialised unstructured case among them), 8 differ (N:M on these small layers, and
//! magnitude-initialised cases with dead inputs) and in 1 the reference indexes out of range;
//! every differing output is one whose prune count the literal lists change, i.e. where the
//! reference breaks its own sparsity (`dsnot_deviations_from_literal_reference`).

use ressa_sparse::{Mask, SparsityPattern};

use crate::select::{cmp_keyed, cmp_score, per_column};
use crate::stats::ActivationStats;
use crate::{Method, PruneError, PruneOutput, PruneSpec, Pruner, Result, Weights};

/// Score of the initial mask.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum InitialMethod {
    /// `|W| · sqrt(n_j)` (the reference's scripts).
    #[default]
    Wanda,
    /// `|W|`.
    Magnitude,
}

/// How the unstructured prune count per output is rounded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CountRounding {
    /// `round(d_in · s)`, ties to even (Python's `round`; the reference).
    #[default]
    Round,
    /// `floor(d_in · s)` (upstream DSnoT's `int`).
    Floor,
}

/// DSnoT configuration. Defaults are the reference's.
#[derive(Clone, Debug, PartialEq)]
pub struct DsnotConfig {
    /// Initial mask score.
    pub initial: InitialMethod,
    /// Maximum prune-and-regrow steps per output (reference 100, upstream 50).
    pub max_cycle_time: usize,
    /// Stop when `|e| <= update_threshold`.
    pub update_threshold: f64,
    /// Exponent `p` of the variance in the regrowth key (0 = no division).
    pub pow_of_var_regrowing: f64,
    /// Unstructured only: also require the error to keep its initial sign (the reference's
    /// `without_same_sign = True` leaves it off). N:M always applies it.
    pub same_sign: bool,
    /// Unstructured prune count rounding.
    pub count_rounding: CountRounding,
    /// `false` returns the initial mask (the reference's `without_DSnoT`).
    pub refine: bool,
}

impl Default for DsnotConfig {
    fn default() -> Self {
        Self {
            initial: InitialMethod::Wanda,
            max_cycle_time: 100,
            update_threshold: 0.1,
            pow_of_var_regrowing: 1.0,
            same_sign: false,
            count_rounding: CountRounding::Round,
            refine: true,
        }
    }
}

impl DsnotConfig {
    fn validate(&self) -> Result<()> {
        if !self.update_threshold.is_finite() || self.update_threshold < 0.0 {
            return Err(PruneError::InvalidConfig(format!(
                "DSnoT update_threshold {} must be finite and >= 0",
                self.update_threshold
            )));
        }
        if !self.pow_of_var_regrowing.is_finite() || self.pow_of_var_regrowing < 0.0 {
            return Err(PruneError::InvalidConfig(format!(
                "DSnoT pow_of_var_regrowing {} must be finite and >= 0",
                self.pow_of_var_regrowing
            )));
        }
        Ok(())
    }
}

#[inline]
fn sign(x: f64) -> i8 {
    if x > 0.0 {
        1
    } else if x < 0.0 {
        -1
    } else {
        0
    }
}

/// Per-layer quantities shared by all outputs.
struct Prepared<'a> {
    norms: Vec<f64>,
    mu: &'a [f64],
    var_p: Vec<f64>,
    divide: bool,
}

/// Per-task buffers, reused across outputs.
#[derive(Default)]
struct Scratch {
    d: Vec<f64>,
    initial: Vec<f64>,
    wanda: Vec<f64>,
    pairs: Vec<(f64, u32)>,
    regrow: Vec<u32>,
    kept: Vec<u32>,
    prune_list: Vec<u32>,
    keep: Vec<bool>,
}

fn refine_column(
    col: &[f32],
    prep: &Prepared<'_>,
    spec: &PruneSpec,
    cfg: &DsnotConfig,
    keep: &mut [bool],
    s: &mut Scratch,
) {
    let c = col.len();
    s.d.clear();
    s.d.extend(col.iter().zip(prep.mu).map(|(&w, &m)| w as f64 * m));
    s.wanda.clear();
    s.wanda.extend(
        col.iter()
            .zip(&prep.norms)
            .map(|(&w, &n)| (w as f64).abs() * n),
    );
    s.initial.clear();
    match cfg.initial {
        InitialMethod::Wanda => s.initial.extend_from_slice(&s.wanda),
        InitialMethod::Magnitude => s.initial.extend(col.iter().map(|&w| (w as f64).abs())),
    }

    // initial mask
    match spec.pattern() {
        SparsityPattern::Unstructured => {
            let raw = c as f64 * spec.sparsity();
            let k = match cfg.count_rounding {
                CountRounding::Round => raw.round_ties_even(),
                CountRounding::Floor => raw.floor(),
            };
            let k = (k as usize).min(c);
            s.pairs.clear();
            s.pairs
                .extend(s.initial.iter().enumerate().map(|(i, &v)| (v, i as u32)));
            s.pairs.sort_by(cmp_keyed);
            for &(_, i) in &s.pairs[..k] {
                keep[i as usize] = false;
            }
        }
        SparsityPattern::NM { n, m } => {
            for g0 in (0..c).step_by(m) {
                s.pairs.clear();
                s.pairs.extend(
                    s.initial[g0..g0 + m]
                        .iter()
                        .enumerate()
                        .map(|(a, &v)| (v, (g0 + a) as u32)),
                );
                s.pairs.sort_by(cmp_keyed);
                for &(_, i) in &s.pairs[..n] {
                    keep[i as usize] = false;
                }
            }
        }
    }
    if !cfg.refine || cfg.max_cycle_time == 0 {
        return;
    }

    // reconstruction error and regrowth candidates R (initially pruned, by key)
    let mut e = 0.0f64;
    s.pairs.clear();
    for (i, _) in keep.iter().enumerate().filter(|(_, k)| !**k) {
        e += s.d[i];
        let key = if prep.divide {
            s.d[i] / prep.var_p[i]
        } else {
            s.d[i]
        };
        s.pairs.push((key, i as u32));
    }
    if s.pairs.is_empty() {
        return;
    }
    s.pairs.sort_by(cmp_keyed);
    s.regrow.clear();
    s.regrow.extend(s.pairs.iter().map(|p| p.1));
    let sign0 = sign(e);
    let thr = cfg.update_threshold;
    let (mut lo, mut hi) = (0isize, s.regrow.len() as isize - 1);

    match spec.pattern() {
        SparsityPattern::Unstructured => {
            // P: kept entries by Wanda score, reordered negative / zero / reversed positive
            s.pairs.clear();
            s.pairs
                .extend((0..c).filter(|&i| keep[i]).map(|i| (s.wanda[i], i as u32)));
            s.pairs.sort_by(cmp_keyed);
            s.kept.clear();
            s.kept.extend(s.pairs.iter().map(|p| p.1));
            s.prune_list.clear();
            let d = &s.d;
            s.prune_list
                .extend(s.kept.iter().filter(|&&i| d[i as usize] < 0.0));
            s.prune_list
                .extend(s.kept.iter().filter(|&&i| d[i as usize] == 0.0));
            s.prune_list
                .extend(s.kept.iter().rev().filter(|&&i| d[i as usize] > 0.0));
            let (mut head, mut tail) = (0isize, s.prune_list.len() as isize - 1);
            for _ in 0..cfg.max_cycle_time {
                if lo > hi || head > tail {
                    break;
                }
                let g = if e > 0.0 {
                    hi -= 1;
                    s.regrow[(hi + 1) as usize]
                } else {
                    lo += 1;
                    s.regrow[(lo - 1) as usize]
                } as usize;
                let q = if e < 0.0 {
                    tail -= 1;
                    s.prune_list[(tail + 1) as usize]
                } else {
                    head += 1;
                    s.prune_list[(head - 1) as usize]
                } as usize;
                let after = e + d[q] - d[g];
                let active = e.abs() > thr && (!cfg.same_sign || sign(after) == sign0);
                if !active {
                    break;
                }
                keep[q] = false;
                keep[g] = true;
                e = after;
            }
        }
        SparsityPattern::NM { m, .. } => {
            // prune candidates: kept entries by initial score; pruned / swapped out = +inf
            for (x, _) in s.initial.iter_mut().zip(keep.iter()).filter(|(_, k)| !**k) {
                *x = f64::INFINITY;
            }
            let d = &s.d;
            for _ in 0..cfg.max_cycle_time {
                if lo > hi {
                    break;
                }
                let g = if e > 0.0 {
                    hi -= 1;
                    s.regrow[(hi + 1) as usize]
                } else {
                    lo += 1;
                    s.regrow[(lo - 1) as usize]
                } as usize;
                let g0 = g - g % m;
                let mut q = g0;
                for i in g0 + 1..g0 + m {
                    if cmp_score(s.initial[i], s.initial[q]).is_lt() {
                        q = i;
                    }
                }
                if s.initial[q] == f64::INFINITY {
                    break;
                }
                let after = e + d[q] - d[g];
                let active = sign(after) == sign0 && e.abs() > thr;
                if !active {
                    break;
                }
                keep[q] = false;
                keep[g] = true;
                s.initial[q] = f64::INFINITY;
                e = after;
            }
        }
    }
}

/// DSnoT mask of `weights` from statistics with moments.
pub fn dsnot_mask(
    weights: Weights<'_>,
    stats: &ActivationStats,
    spec: &PruneSpec,
    config: &DsnotConfig,
) -> Result<Mask> {
    config.validate()?;
    stats.require_data()?;
    if stats.d_in() != weights.d_in() {
        return Err(PruneError::DimMismatch {
            expected: stats.d_in(),
            got: weights.d_in(),
        });
    }
    spec.validate(weights.d_in())?;
    let (Some(mu), Some(var)) = (stats.token_sums(), stats.variances()) else {
        return Err(PruneError::InvalidConfig(
            "DSnoT needs ActivationStats::with_moments".into(),
        ));
    };
    let p = config.pow_of_var_regrowing;
    let prep = Prepared {
        norms: stats.norms(),
        mu,
        var_p: var.iter().map(|v| v.powf(p)).collect(),
        divide: p != 0.0,
    };
    per_column(weights, Scratch::default, |_, col, mask, scratch| {
        let mut keep = std::mem::take(&mut scratch.keep);
        keep.clear();
        keep.resize(col.len(), true);
        refine_column(col, &prep, spec, config, &mut keep, scratch);
        mask.set_from_bools(&keep);
        scratch.keep = keep;
    })
}

/// [`Pruner`] for DSnoT.
#[derive(Clone, Debug)]
pub struct DsnotPruner {
    stats: ActivationStats,
    config: DsnotConfig,
}

impl DsnotPruner {
    /// A pruner for a Linear with `d_in` inputs.
    pub fn new(d_in: usize, config: DsnotConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            stats: ActivationStats::with_moments(d_in)?,
            config,
        })
    }

    /// The accumulated statistics.
    pub fn stats(&self) -> &ActivationStats {
        &self.stats
    }
}

impl Pruner for DsnotPruner {
    fn method(&self) -> Method {
        Method::Dsnot
    }

    fn d_in(&self) -> usize {
        self.stats.d_in()
    }

    fn add_batch_samples(&mut self, x: &[f32], n_tokens: usize, n_samples: usize) -> Result<()> {
        self.stats.add_batch(x, n_tokens, n_samples)
    }

    fn nsamples(&self) -> u64 {
        self.stats.nsamples()
    }

    fn prune(&self, weights: Weights<'_>, spec: &PruneSpec) -> Result<PruneOutput> {
        Ok(PruneOutput {
            mask: dsnot_mask(weights, &self.stats, spec, &self.config)?,
            weights: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wanda::{WandaConfig, wanda_mask};
    use ressa_sparse::{column_sparsity, is_n_m};

    fn layer(d_in: usize, d_out: usize, tokens: usize) -> (Vec<f32>, Vec<f32>) {
        let mut seed = 12345u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f64 / (1u64 << 31) as f64) as f32 - 0.5
        };
        let w = (0..d_in * d_out).map(|_| next()).collect();
        let x = (0..tokens * d_in)
            .map(|k| next() + 0.3 * ((k % d_in) % 5) as f32)
            .collect();
        (w, x)
    }

    #[test]
    fn keeps_counts_and_patterns() {
        let (d_in, d_out) = (64, 24);
        let (w, x) = layer(d_in, d_out, 40);
        let mut p = DsnotPruner::new(d_in, DsnotConfig::default()).unwrap();
        p.add_batch(&x[..20 * d_in], 20).unwrap();
        p.add_batch(&x[20 * d_in..], 20).unwrap();
        let wt = Weights::new(&w, d_in, d_out).unwrap();
        for s in [0.5, 0.7] {
            let m = p
                .prune(wt, &PruneSpec::unstructured(s).unwrap())
                .unwrap()
                .mask;
            let k = (d_in as f64 * s).round_ties_even() / d_in as f64;
            assert!(column_sparsity(&m).iter().all(|&c| c == k));
        }
        for (n, mm) in [(2, 4), (4, 8)] {
            let m = p.prune(wt, &PruneSpec::n_m(n, mm).unwrap()).unwrap().mask;
            assert!(is_n_m(&m, n, mm));
        }
    }

    #[test]
    fn same_sign_refinement_reduces_the_error() {
        let (d_in, d_out) = (64, 24);
        let (w, x) = layer(d_in, d_out, 40);
        let cfg = DsnotConfig {
            same_sign: true,
            ..DsnotConfig::default()
        };
        let mut p = DsnotPruner::new(d_in, cfg).unwrap();
        p.add_batch(&x, 40).unwrap();
        let wt = Weights::new(&w, d_in, d_out).unwrap();
        let spec = PruneSpec::unstructured(0.5).unwrap();
        let refined = p.prune(wt, &spec).unwrap().mask;
        let base = wanda_mask(wt, p.stats().sq_norms(), &spec, &WandaConfig::default()).unwrap();
        let mu = p.stats().token_sums().unwrap();
        let err = |m: &Mask, j: usize| -> f64 {
            (0..d_in)
                .filter(|&i| !m.get(i, j).unwrap())
                .map(|i| w[i * d_out + j] as f64 * mu[i])
                .sum::<f64>()
        };
        assert_ne!(refined, base);
        for j in 0..d_out {
            let (e0, e1) = (err(&base, j), err(&refined, j));
            // the error keeps its sign and never grows
            assert!(e1.abs() <= e0.abs() + 1e-9, "column {j}: {e0} -> {e1}");
            assert!(e1 == e0 || e1.signum() == e0.signum());
        }
        // without_DSnoT reproduces the initial (Wanda) mask
        let plain = DsnotPruner {
            config: DsnotConfig {
                refine: false,
                ..DsnotConfig::default()
            },
            ..p.clone()
        };
        assert_eq!(plain.prune(wt, &spec).unwrap().mask, base);
    }

    #[test]
    fn rejects_bad_inputs() {
        let mut p = DsnotPruner::new(8, DsnotConfig::default()).unwrap();
        let w = vec![1.0f32; 16];
        let wt = Weights::new(&w, 8, 2).unwrap();
        assert!(matches!(
            p.prune(wt, &PruneSpec::unstructured(0.5).unwrap()),
            Err(PruneError::EmptyStatistics)
        ));
        assert!(p.add_batch(&[f32::NAN; 8], 1).is_err());
        p.add_batch(&[1.0; 8], 1).unwrap();
        assert!(p.prune(wt, &PruneSpec::n_m(2, 3).unwrap()).is_err());
        assert!(
            DsnotPruner::new(
                8,
                DsnotConfig {
                    update_threshold: f64::NAN,
                    ..Default::default()
                }
            )
            .is_err()
        );
        // dead inputs (zero variance, key 0/0) do not panic
        let out = p.prune(wt, &PruneSpec::unstructured(0.5).unwrap()).unwrap();
        assert_eq!(out.mask.count_pruned(), 8);
    }
}
