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
//!
//! # How it is computed
//! Nothing is fully sorted. The initial mask is a k-th-key selection (`kth.rs`) with the
//! stable sort's tie rule; `R` and `P` are gathered unsorted and read through lazily sorted
//! ends (`KeyedList`), since the loop reads at most `max_cycle_time` entries from their ends
//! (about 4 per end and output on a 2048 × 5120 layer). Orders are `(order_key, index)`
//! integers, i.e. exactly the stable sorts' orders; a unit test compares the masks with the
//! full-sort implementation on tie-heavy layers (`partial_selection_matches_full_sorts`).

use ressa_sparse::{Mask, SparsityPattern};

use crate::kth::{Kth, kth_key};
use crate::select::{cmp_keyed, cmp_score, order_key, per_column};
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
    wanda_keys: Vec<u64>,
    keys: Vec<u64>,
    sel: Vec<u64>,
    pairs: Vec<(f64, u32)>,
    pruned_d: Vec<f64>,
    /// R: initially pruned inputs by regrowth key
    regrow: KeyedList,
    /// P, by class of D: kept inputs by Wanda score
    negative: KeyedList,
    zero: KeyedList,
    positive: KeyedList,
    keep: Vec<bool>,
}

/// `(key, index)` as one integer, ordered as [`cmp_keyed`] orders `(score, index)`.
#[inline(always)]
fn composite(key: u64, i: u32) -> u128 {
    (key as u128) << 32 | i as u128
}

/// First batch size of [`KeyedList`]'s ends; each further batch of an end is twice as large.
const FIRST_BATCH: usize = 8;

/// `(key, index)` pairs gathered in index order, read in ascending `(key, index)` order from
/// the front and in descending order from the back, sorted lazily: each end is produced in
/// batches (8, 16, 32, ...) by one scan of the list when first asked for.
///
/// The prune-and-regrow loop reads at most `max_cycle_time` entries from the ends of its lists
/// together, and on the bench layer (2048 × 5120, 50 %) about 4 from each end per output: full
/// sorts of every pruned and every kept input were most of DSnoT's time, and sorting even the
/// 100 entries the loop could read was most of the rest.
#[derive(Default)]
struct KeyedList {
    keys: Vec<u64>,
    idx: Vec<u32>,
    len: usize,
    /// composites, ascending
    front: Vec<u128>,
    /// composites, descending
    back: Vec<u128>,
    batch_front: usize,
    batch_back: usize,
    scratch: Vec<u128>,
}

impl KeyedList {
    /// Empties the list and makes room for `cap` entries (gathered by index, see `gather`).
    fn reset(&mut self, cap: usize) {
        self.keys.resize(cap.max(self.keys.len()), 0);
        self.idx.resize(cap.max(self.idx.len()), 0);
        self.len = 0;
        self.front.clear();
        self.back.clear();
        self.batch_front = FIRST_BATCH;
        self.batch_back = FIRST_BATCH;
    }

    fn len(&self) -> usize {
        self.len
    }

    /// The index of the `p`-th smallest entry (`p < len`).
    fn front(&mut self, p: usize) -> u32 {
        debug_assert!(p < self.len);
        while p >= self.front.len() {
            // composites are integers: "greater than the last one taken" is ">= last + 1"
            let from = self.front.last().map_or(0, |&x| x + 1);
            smallest_from(
                &self.keys[..self.len],
                &self.idx[..self.len],
                from,
                self.batch_front,
                &mut self.scratch,
            );
            self.front.extend_from_slice(&self.scratch);
            self.batch_front *= 2;
        }
        self.front[p] as u32
    }

    /// The index of the `p`-th largest entry (`p < len`).
    fn back(&mut self, p: usize) -> u32 {
        debug_assert!(p < self.len);
        while p >= self.back.len() {
            let to = self.back.last().map_or(u128::MAX, |&x| x - 1);
            largest_to(
                &self.keys[..self.len],
                &self.idx[..self.len],
                to,
                self.batch_back,
                &mut self.scratch,
            );
            self.back.extend_from_slice(&self.scratch);
            self.batch_back *= 2;
        }
        self.back[p] as u32
    }
}

/// Bit `j` set for each `keys[j]` (`j < 8`) in `lo..=hi`.
#[inline(always)]
fn in_range8(keys: &[u64], lo: u64, hi: u64) -> u32 {
    let mut m = 0;
    for (j, &k) in keys[..8].iter().enumerate() {
        m |= (((k >= lo) & (k <= hi)) as u32) << j;
    }
    m
}

/// [`in_range8`] with AVX2: unsigned compares as signed ones on keys with the top bit flipped.
///
/// # Safety
/// AVX2 must be available and `keys.len() >= 8`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn in_range8_avx2(keys: &[u64], lo: u64, hi: u64) -> u32 {
    use std::arch::x86_64::*;
    debug_assert!(keys.len() >= 8);
    let flip = |x: u64| _mm256_set1_epi64x((x ^ (1 << 63)) as i64);
    let (lo, hi, sign) = (flip(lo), flip(hi), flip(0));
    // SAFETY: keys[0..8] are in bounds (the caller's contract).
    let (a, b) = unsafe {
        (
            _mm256_loadu_si256(keys.as_ptr().cast()),
            _mm256_loadu_si256(keys.as_ptr().add(4).cast()),
        )
    };
    let out = |v: __m256i| {
        let s = _mm256_xor_si256(v, sign);
        let o = _mm256_or_si256(_mm256_cmpgt_epi64(lo, s), _mm256_cmpgt_epi64(s, hi));
        !_mm256_movemask_pd(_mm256_castsi256_pd(o)) as u32 & 0xF
    };
    out(a) | out(b) << 4
}

/// Calls `visit(j)` for every `j` with `keys[j]` in `lo..=hi`, in order; `visit` returns the
/// new `(lo, hi)`. Blocks of 8 keys are tested at once and skipped when none is in range,
/// which is most of them once a scan's bound has tightened.
#[inline(always)]
fn for_in_range(
    keys: &[u64],
    mut lo: u64,
    mut hi: u64,
    mut visit: impl FnMut(usize) -> (u64, u64),
) {
    #[cfg(target_arch = "x86_64")]
    let avx2 = crate::simd::avx2();
    let blocks = keys.len() / 8;
    for blk in 0..blocks {
        let kb = &keys[8 * blk..8 * blk + 8];
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 is available when `avx2`; `kb` holds 8 keys.
        let mut m = if avx2 {
            unsafe { in_range8_avx2(kb, lo, hi) }
        } else {
            in_range8(kb, lo, hi)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let mut m = in_range8(kb, lo, hi);
        while m != 0 {
            let j = m.trailing_zeros() as usize;
            m &= m - 1;
            // the bounds may have tightened since the block was tested
            let k = kb[j];
            if k >= lo && k <= hi {
                (lo, hi) = visit(8 * blk + j);
            }
        }
    }
    for (j, &k) in keys.iter().enumerate().skip(8 * blocks) {
        if k >= lo && k <= hi {
            (lo, hi) = visit(j);
        }
    }
}

/// `out` := the (up to) `b` smallest composites of the pairs that are `>= from`, ascending.
fn smallest_from(keys: &[u64], idx: &[u32], from: u128, b: usize, out: &mut Vec<u128>) {
    out.clear();
    let from_key = (from >> 32) as u64;
    // once `out` is full, only keys up to its largest can enter
    for_in_range(keys, from_key, u64::MAX, |j| {
        let x = composite(keys[j], idx[j]);
        if x >= from && (out.len() < b || x < out[b - 1]) {
            let at = out.partition_point(|&y| y < x);
            if out.len() == b {
                out.pop();
            }
            out.insert(at, x);
        }
        let hi = if out.len() == b {
            (out[b - 1] >> 32) as u64
        } else {
            u64::MAX
        };
        (from_key, hi)
    });
}

/// `out` := the (up to) `b` largest composites of the pairs that are `<= to`, descending.
fn largest_to(keys: &[u64], idx: &[u32], to: u128, b: usize, out: &mut Vec<u128>) {
    out.clear();
    let to_key = (to >> 32) as u64;
    for_in_range(keys, 0, to_key, |j| {
        let x = composite(keys[j], idx[j]);
        if x <= to && (out.len() < b || x > out[b - 1]) {
            let at = out.partition_point(|&y| y > x);
            if out.len() == b {
                out.pop();
            }
            out.insert(at, x);
        }
        let lo = if out.len() == b {
            (out[b - 1] >> 32) as u64
        } else {
            0
        };
        (lo, to_key)
    });
}

/// Reads the regrowth list R from both ends, counting what each end has given (the
/// reference's pointers: `lo = front`, `hi = len - 1 - back`).
#[derive(Default)]
struct Ends {
    front: usize,
    back: usize,
}

impl Ends {
    /// Whether the two ends of a list of `len` have met (the reference's `lo > hi`).
    fn used_up(&self, len: usize) -> bool {
        self.front + self.back >= len
    }
}

/// The next regrowth candidate: R's largest key while `e > 0`, else its smallest.
fn take_regrow(r: &mut KeyedList, at: &mut Ends, e: f64) -> usize {
    let i = if e > 0.0 {
        at.back += 1;
        r.back(at.back - 1)
    } else {
        at.front += 1;
        r.front(at.front - 1)
    };
    i as usize
}

/// The next prune candidate from P = negative-D entries by ascending (Wanda, index), then
/// zero-D ones likewise, then positive-D ones descending: its back while `e < 0`, else its
/// front.
fn take_prune(
    neg: &mut KeyedList,
    zero: &mut KeyedList,
    pos: &mut KeyedList,
    at: &mut Ends,
    e: f64,
) -> usize {
    let (nn, nz, np) = (neg.len(), zero.len(), pos.len());
    let i = if e < 0.0 {
        // from P's end: the positive entries ascending, zero and negative ones descending
        let t = at.back;
        at.back += 1;
        if t < np {
            pos.front(t)
        } else if t < np + nz {
            zero.back(t - np)
        } else {
            neg.back(t - np - nz)
        }
    } else {
        let t = at.front;
        at.front += 1;
        if t < nn {
            neg.front(t)
        } else if t < nn + nz {
            zero.front(t - nn)
        } else {
            pos.back(t - nn - nz)
        }
    };
    i as usize
}

/// One output's DSnoT mask: `keep` (all `true` on entry) gets the refined flags. Compiled for
/// the CPU's widest vectors.
fn refine_column(
    col: &[f32],
    prep: &Prepared<'_>,
    spec: &PruneSpec,
    cfg: &DsnotConfig,
    keep: &mut [bool],
    s: &mut Scratch,
) {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn refine_avx2(
        col: &[f32],
        prep: &Prepared<'_>,
        spec: &PruneSpec,
        cfg: &DsnotConfig,
        keep: &mut [bool],
        s: &mut Scratch,
    ) {
        refine_body(col, prep, spec, cfg, keep, s)
    }
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx2() {
        // SAFETY: the CPU reports AVX2 and FMA.
        return unsafe { refine_avx2(col, prep, spec, cfg, keep, s) };
    }
    refine_body(col, prep, spec, cfg, keep, s)
}

/// Resizes `v` to `n` values (contents unspecified: every one is written next).
fn sized<T: Copy + Default>(v: &mut Vec<T>, n: usize) -> &mut [T] {
    v.resize(n, T::default());
    &mut v[..n]
}

#[inline(always)]
fn refine_body(
    col: &[f32],
    prep: &Prepared<'_>,
    spec: &PruneSpec,
    cfg: &DsnotConfig,
    keep: &mut [bool],
    s: &mut Scratch,
) {
    let c = col.len();
    for ((d, &w), &m) in sized(&mut s.d, c).iter_mut().zip(col).zip(prep.mu) {
        *d = w as f64 * m;
    }
    for ((x, &w), &n) in sized(&mut s.wanda, c).iter_mut().zip(col).zip(&prep.norms) {
        *x = (w as f64).abs() * n;
    }
    // the initial score; N:M also overwrites it, so it needs its own copy there
    let nm = spec.pattern() != SparsityPattern::Unstructured;
    // Wanda keys: the initial mask's (Wanda initial) and P's order
    for (key, &v) in sized(&mut s.wanda_keys, c).iter_mut().zip(s.wanda.iter()) {
        *key = order_key(v);
    }
    let initial: &[f64] = match cfg.initial {
        InitialMethod::Wanda if !nm => &s.wanda,
        InitialMethod::Wanda => {
            sized(&mut s.initial, c).copy_from_slice(&s.wanda);
            &s.initial
        }
        InitialMethod::Magnitude => {
            for (x, &w) in sized(&mut s.initial, c).iter_mut().zip(col) {
                *x = (w as f64).abs();
            }
            &s.initial
        }
    };

    // initial mask
    match spec.pattern() {
        SparsityPattern::Unstructured => {
            let raw = c as f64 * spec.sparsity();
            let k = match cfg.count_rounding {
                CountRounding::Round => raw.round_ties_even(),
                CountRounding::Floor => raw.floor(),
            };
            let k = (k as usize).min(c);
            // the k lowest (initial score, index), as a stable sort's first k: everything
            // below the k-th key, then its ties by index
            if k > 0 {
                let keys: &[u64] = match cfg.initial {
                    InitialMethod::Wanda => &s.wanda_keys,
                    InitialMethod::Magnitude => {
                        let keys = sized(&mut s.keys, c);
                        for (key, &v) in keys.iter_mut().zip(initial) {
                            *key = order_key(v);
                        }
                        keys
                    }
                };
                let Kth {
                    key: thr,
                    below,
                    equal,
                } = kth_key(keys, k - 1, &mut s.sel);
                if below + equal == k {
                    for (kp, &key) in keep.iter_mut().zip(keys.iter()) {
                        *kp = key > thr;
                    }
                } else {
                    let mut ties = k - below;
                    for (kp, &key) in keep.iter_mut().zip(keys.iter()) {
                        let tie = key == thr && ties > 0;
                        ties -= tie as usize;
                        *kp = !(key < thr || tie);
                    }
                }
            }
        }
        SparsityPattern::NM { n, m } => {
            for g0 in (0..c).step_by(m) {
                s.pairs.clear();
                s.pairs.extend(
                    initial[g0..g0 + m]
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

    // R: the initially pruned inputs by regrowth key D / v^p; P (unstructured): the kept ones
    // by Wanda score in three lists by the sign of D. All are gathered in index order in one
    // branch-free pass, as are the pruned D for the error.
    let keys = sized(&mut s.keys, c);
    if prep.divide {
        for ((key, &d), &v) in keys.iter_mut().zip(s.d.iter()).zip(&prep.var_p) {
            *key = order_key(d / v);
        }
    } else {
        for (key, &d) in keys.iter_mut().zip(s.d.iter()) {
            *key = order_key(d);
        }
    }
    let pruned_d = sized(&mut s.pruned_d, c);
    let lists = [&mut s.regrow, &mut s.negative, &mut s.zero, &mut s.positive];
    for l in lists {
        l.reset(c);
    }
    let mut n_r = 0usize;
    {
        let (rk, ri) = (&mut s.regrow.keys[..c], &mut s.regrow.idx[..c]);
        for (i, ((&kp, &d), &key)) in keep.iter().zip(s.d.iter()).zip(keys.iter()).enumerate() {
            rk[n_r] = key;
            ri[n_r] = i as u32;
            pruned_d[n_r] = d;
            n_r += !kp as usize;
        }
    }
    s.regrow.len = n_r;
    if !nm {
        let (nk, ni) = (&mut s.negative.keys[..c], &mut s.negative.idx[..c]);
        let (zk, zi) = (&mut s.zero.keys[..c], &mut s.zero.idx[..c]);
        let (pk, pi) = (&mut s.positive.keys[..c], &mut s.positive.idx[..c]);
        let (mut nn, mut nz, mut np) = (0usize, 0usize, 0usize);
        for (i, ((&kp, &d), &key)) in keep
            .iter()
            .zip(s.d.iter())
            .zip(s.wanda_keys.iter())
            .enumerate()
        {
            let i = i as u32;
            (nk[nn], ni[nn]) = (key, i);
            (zk[nz], zi[nz]) = (key, i);
            (pk[np], pi[np]) = (key, i);
            nn += (kp & (d < 0.0)) as usize;
            nz += (kp & (d == 0.0)) as usize;
            np += (kp & (d > 0.0)) as usize;
        }
        (s.negative.len, s.zero.len, s.positive.len) = (nn, nz, np);
    }
    if n_r == 0 {
        return;
    }
    // e = Σ D over the pruned inputs, in index order
    let mut e = 0.0f64;
    for &d in &pruned_d[..n_r] {
        e += d;
    }
    let sign0 = sign(e);
    let thr = cfg.update_threshold;
    let d = &s.d;
    let mut r_at = Ends::default();

    match spec.pattern() {
        SparsityPattern::Unstructured => {
            let n_p = s.negative.len() + s.zero.len() + s.positive.len();
            let mut p_at = Ends::default();
            for _ in 0..cfg.max_cycle_time {
                if r_at.used_up(n_r) || p_at.used_up(n_p) {
                    break;
                }
                let g = take_regrow(&mut s.regrow, &mut r_at, e);
                let q = take_prune(&mut s.negative, &mut s.zero, &mut s.positive, &mut p_at, e);
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
            let initial = &mut s.initial;
            for (x, _) in initial.iter_mut().zip(keep.iter()).filter(|(_, k)| !**k) {
                *x = f64::INFINITY;
            }
            for _ in 0..cfg.max_cycle_time {
                if r_at.used_up(n_r) {
                    break;
                }
                let g = take_regrow(&mut s.regrow, &mut r_at, e);
                let g0 = g - g % m;
                let mut q = g0;
                for i in g0 + 1..g0 + m {
                    if cmp_score(initial[i], initial[q]).is_lt() {
                        q = i;
                    }
                }
                if initial[q] == f64::INFINITY {
                    break;
                }
                let after = e + d[q] - d[g];
                let active = sign(after) == sign0 && e.abs() > thr;
                if !active {
                    break;
                }
                keep[q] = false;
                keep[g] = true;
                initial[q] = f64::INFINITY;
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

    /// Buffers of [`reference_refine`].
    #[derive(Default)]
    struct RefScratch {
        d: Vec<f64>,
        initial: Vec<f64>,
        wanda: Vec<f64>,
        pairs: Vec<(f64, u32)>,
        regrow: Vec<u32>,
        kept: Vec<u32>,
        prune_list: Vec<u32>,
    }

    /// The column refinement as first written (full stable sorts of the initial scores and
    /// of both candidate lists): the partial selections must reproduce its masks exactly.
    fn reference_refine(
        col: &[f32],
        prep: &Prepared<'_>,
        spec: &PruneSpec,
        cfg: &DsnotConfig,
        keep: &mut [bool],
        s: &mut RefScratch,
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

    #[test]
    fn partial_selection_matches_full_sorts() {
        let mut seed = 99u64;
        let mut next = move |m: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % m
        };
        for (d_in, d_out) in [(96, 7), (512, 9), (2048, 3)] {
            for levels in [5u64, 1 << 20] {
                // few distinct weights (ties in every score), dead inputs (mu = 0, var = 0,
                // norm = 0), zero weights (D = 0)
                let w: Vec<f32> = (0..d_in * d_out)
                    .map(|_| (next(levels) as f32 - (levels / 2) as f32) / levels as f32)
                    .collect();
                let dead = |i: usize| i % 17 == 3;
                let mu: Vec<f64> = (0..d_in)
                    .map(|i| if dead(i) { 0.0 } else { next(7) as f64 - 3.0 })
                    .collect();
                let var: Vec<f64> = (0..d_in)
                    .map(|i| if dead(i) { 0.0 } else { 0.5 + next(4) as f64 })
                    .collect();
                let norms: Vec<f64> = (0..d_in)
                    .map(|i| if dead(i) { 0.0 } else { 1.0 + next(3) as f64 })
                    .collect();
                let specs = [
                    PruneSpec::unstructured(0.5).unwrap(),
                    PruneSpec::unstructured(0.7).unwrap(),
                    PruneSpec::unstructured(0.02).unwrap(),
                    PruneSpec::n_m(2, 4).unwrap(),
                    PruneSpec::n_m(4, 8).unwrap(),
                ];
                for spec in &specs {
                    for (cycles, initial, same_sign, p, rounding, thr) in [
                        (
                            100,
                            InitialMethod::Wanda,
                            false,
                            1.0,
                            CountRounding::Round,
                            0.1,
                        ),
                        (
                            3,
                            InitialMethod::Wanda,
                            true,
                            1.0,
                            CountRounding::Floor,
                            0.0,
                        ),
                        (
                            40,
                            InitialMethod::Magnitude,
                            false,
                            0.0,
                            CountRounding::Round,
                            0.0,
                        ),
                        (
                            1000,
                            InitialMethod::Wanda,
                            true,
                            2.0,
                            CountRounding::Round,
                            0.01,
                        ),
                        (
                            1,
                            InitialMethod::Magnitude,
                            false,
                            1.0,
                            CountRounding::Floor,
                            0.1,
                        ),
                    ] {
                        let cfg = DsnotConfig {
                            initial,
                            max_cycle_time: cycles,
                            update_threshold: thr,
                            pow_of_var_regrowing: p,
                            same_sign,
                            count_rounding: rounding,
                            refine: true,
                        };
                        let prep = Prepared {
                            norms: norms.clone(),
                            mu: &mu,
                            var_p: var.iter().map(|v| v.powf(p)).collect(),
                            divide: p != 0.0,
                        };
                        let (mut a, mut b) = (Scratch::default(), RefScratch::default());
                        for j in 0..d_out {
                            let col: Vec<f32> = (0..d_in).map(|i| w[i * d_out + j]).collect();
                            let mut got = vec![true; d_in];
                            refine_column(&col, &prep, spec, &cfg, &mut got, &mut a);
                            let mut want = vec![true; d_in];
                            reference_refine(&col, &prep, spec, &cfg, &mut want, &mut b);
                            assert_eq!(got, want, "[{d_in}] {levels} {spec:?} {cfg:?} col {j}");
                        }
                    }
                }
            }
        }
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
