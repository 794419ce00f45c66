//! Selection primitives shared by the criteria, with the crate's tie-breaking rule:
//! order by `(score, index)` ascending (a stable ascending sort) and prune from the front.

use std::cmp::Ordering;

use rayon::prelude::*;
use ressa_sparse::{Mask, SparsityPattern};

use crate::{ComparisonGroup, PruneSpec, Result, ThresholdRule, Weights};

/// Total order on scores: NaN after everything (as `torch.sort`), `-0.0 == 0.0`.
#[inline]
pub(crate) fn cmp_score(a: f64, b: f64) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (false, false) => a.partial_cmp(&b).unwrap_or(Ordering::Equal),
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
    }
}

/// Order-preserving integer key of a score under [`cmp_score`]: `key(a) < key(b)` iff
/// `cmp_score(a, b)` is `Less` (`-0.0` and `0.0` map to one key, every NaN to the largest).
#[inline]
pub(crate) fn order_key(x: f64) -> u64 {
    if x.is_nan() {
        return u64::MAX;
    }
    let bits = (x + 0.0).to_bits();
    if bits >> 63 == 1 {
        !bits
    } else {
        bits | (1 << 63)
    }
}

/// `(score, index)` lexicographic order.
#[inline]
pub(crate) fn cmp_keyed(a: &(f64, u32), b: &(f64, u32)) -> Ordering {
    cmp_score(a.0, b.0).then(a.1.cmp(&b.1))
}

/// Number pruned out of `n` at `sparsity`: `floor(n * s)` like Python's `int(n * s)`.
#[inline]
pub(crate) fn floor_count(n: usize, sparsity: f64) -> usize {
    ((n as f64 * sparsity).floor() as usize).min(n)
}

/// Marks the `k` smallest of `scores` (by `(score, index)`) as pruned in `keep`.
/// `buf` is scratch space.
pub(crate) fn prune_k_smallest(scores: &[f64], k: usize, buf: &mut Vec<u64>, keep: &mut [bool]) {
    let n = scores.len();
    if k == 0 {
        return;
    }
    if k >= n {
        keep.iter_mut().for_each(|x| *x = false);
        return;
    }
    // the k-th smallest key, then everything below it plus the lowest-index ties
    buf.clear();
    buf.extend(scores.iter().map(|&s| order_key(s)));
    let (_, &mut thr, _) = buf.select_nth_unstable(k - 1);
    let mut left = k;
    for (kp, &s) in keep.iter_mut().zip(scores) {
        if order_key(s) < thr {
            *kp = false;
            left -= 1;
        }
    }
    for (kp, &s) in keep.iter_mut().zip(scores) {
        if left == 0 {
            break;
        }
        if order_key(s) == thr {
            *kp = false;
            left -= 1;
        }
    }
}

/// Width of the column chunks processed by one task.
pub(crate) fn column_chunk(d_out: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    (d_out / (4 * threads)).clamp(16, 128)
}

/// Runs `f(j, column_weights, keep)` for every output column `j` in parallel and assembles the
/// row-major keep matrix. `column_weights` is column `j` (length `d_in`); `keep` starts all
/// `true`. `S` is per-task scratch state made by `scratch()`.
pub(crate) fn per_column<S, F>(w: Weights<'_>, scratch: impl Fn() -> S + Sync, f: F) -> Vec<bool>
where
    F: Fn(usize, &[f32], &mut [bool], &mut S) + Sync,
{
    let (d_in, d_out) = (w.d_in(), w.d_out());
    let data = w.data();
    let cw = column_chunk(d_out);
    let starts: Vec<usize> = (0..d_out).step_by(cw).collect();
    let tiles: Vec<Vec<bool>> = starts
        .par_iter()
        .map(|&j0| {
            let ncols = cw.min(d_out - j0);
            // transpose the chunk: tile[c * d_in + i] = w[i, j0 + c]
            let mut tile = vec![0f32; ncols * d_in];
            // blocked transpose: 32 rows at a time keep both sides in cache
            for i0 in (0..d_in).step_by(32) {
                let i1 = (i0 + 32).min(d_in);
                for c in 0..ncols {
                    let dst = &mut tile[c * d_in + i0..c * d_in + i1];
                    for (x, i) in dst.iter_mut().zip(i0..i1) {
                        *x = data[i * d_out + j0 + c];
                    }
                }
            }
            let mut keep = vec![true; ncols * d_in];
            let mut state = scratch();
            for c in 0..ncols {
                f(
                    j0 + c,
                    &tile[c * d_in..(c + 1) * d_in],
                    &mut keep[c * d_in..(c + 1) * d_in],
                    &mut state,
                );
            }
            keep
        })
        .collect();
    let mut out = vec![true; d_in * d_out];
    // blocked transpose back, 32 rows per task
    out.par_chunks_mut(32 * d_out)
        .enumerate()
        .for_each(|(blk, rows)| {
            let i0 = blk * 32;
            let nrows = rows.len() / d_out;
            for (t, &j0) in tiles.iter().zip(&starts) {
                let ncols = t.len() / d_in;
                for c in 0..ncols {
                    let src = &t[c * d_in + i0..c * d_in + i0 + nrows];
                    for (r, &k) in src.iter().enumerate() {
                        rows[r * d_out + j0 + c] = k;
                    }
                }
            }
        });
    out
}

/// Selection over a whole score matrix (row-major `[rows, cols]`, burn orientation, so
/// the PyTorch flat index of `(i, j)` is `j * rows + i`). Prunes per `rule` with
/// `k = floor(s * numel)`; returns row-major keep flags.
pub(crate) fn select_matrix(
    scores: &[f64],
    rows: usize,
    cols: usize,
    k: usize,
    rule: ThresholdRule,
) -> Vec<bool> {
    let numel = rows * cols;
    debug_assert_eq!(scores.len(), numel);
    if numel == 0 {
        return Vec::new();
    }
    if k == 0 && rule == ThresholdRule::ExactCount {
        return vec![true; numel];
    }
    let k = k.min(numel - 1);
    let mut tmp: Vec<u64> = if numel >= 1 << 16 {
        scores.par_iter().map(|&s| order_key(s)).collect()
    } else {
        scores.iter().map(|&s| order_key(s)).collect()
    };
    let (_, &mut thr, _) = tmp.select_nth_unstable(k);
    drop(tmp);
    let below = |s: f64| order_key(s) < thr;
    let equal = |s: f64| order_key(s) == thr;
    let par = numel >= 1 << 16;
    let map = |f: &(dyn Fn(f64) -> bool + Sync)| -> Vec<bool> {
        if par {
            scores.par_iter().map(|&s| !f(s)).collect()
        } else {
            scores.iter().map(|&s| !f(s)).collect()
        }
    };
    match rule {
        ThresholdRule::BelowKth => map(&below),
        ThresholdRule::AtOrBelowKth => map(&|s| below(s) || equal(s)),
        ThresholdRule::ExactCount => {
            let mut keep = map(&below);
            let n_below = keep.iter().filter(|x| !**x).count();
            let mut need = k - n_below.min(k);
            let n_equal = scores.iter().filter(|&&s| equal(s)).count();
            if n_equal <= need {
                for (kp, &s) in keep.iter_mut().zip(scores) {
                    if equal(s) {
                        *kp = false;
                    }
                }
            } else {
                // ties at the threshold: lower PyTorch flat index (output-major) first
                'outer: for j in 0..cols {
                    for i in 0..rows {
                        if need == 0 {
                            break 'outer;
                        }
                        if equal(scores[i * cols + j]) {
                            keep[i * cols + j] = false;
                            need -= 1;
                        }
                    }
                }
            }
            keep
        }
    }
}

/// Mask from a per-entry score `score(i, w_ij)` for any [`PruneSpec`]: N:M per column
/// groups, unstructured per output or per matrix.
pub(crate) fn mask_from_scores<F>(
    w: Weights<'_>,
    spec: &PruneSpec,
    group: ComparisonGroup,
    rule: ThresholdRule,
    score: F,
) -> Result<Mask>
where
    F: Fn(usize, f32) -> f64 + Sync,
{
    spec.validate(w.d_in())?;
    let (d_in, d_out) = (w.d_in(), w.d_out());
    let keep = match (spec.pattern(), group) {
        (SparsityPattern::NM { n, m }, _) => {
            // a group is m consecutive rows: contiguous in burn layout, no transpose needed
            let data = w.data();
            let mut keep = vec![true; d_in * d_out];
            keep.par_chunks_mut(m * d_out)
                .zip(data.par_chunks(m * d_out))
                .enumerate()
                .for_each(|(g, (kg, wg))| {
                    let keys: Vec<u64> = wg
                        .iter()
                        .enumerate()
                        .map(|(k, &v)| order_key(score(g * m + k / d_out, v)))
                        .collect();
                    let mut small = [0u64; 16];
                    let mut large = Vec::new();
                    let col: &mut [u64] = if m <= 16 {
                        &mut small[..m]
                    } else {
                        large.resize(m, 0);
                        &mut large[..]
                    };
                    for j in 0..d_out {
                        for (a, c) in col.iter_mut().enumerate() {
                            *c = keys[a * d_out + j];
                        }
                        for (a, &ka) in col.iter().enumerate() {
                            // rank in the (score, index) order; the n lowest are pruned
                            let rank: usize = col
                                .iter()
                                .enumerate()
                                .map(|(b, &kb)| (kb < ka || (kb == ka && b < a)) as usize)
                                .sum();
                            if rank < n {
                                kg[a * d_out + j] = false;
                            }
                        }
                    }
                });
            keep
        }
        (SparsityPattern::Unstructured, ComparisonGroup::PerOutput) => {
            let k = floor_count(d_in, spec.sparsity());
            per_column(
                w,
                || (vec![0f64; d_in], Vec::<u64>::with_capacity(d_in)),
                |_, col, keep, (buf, pairs)| {
                    for (i, (b, &v)) in buf.iter_mut().zip(col).enumerate() {
                        *b = score(i, v);
                    }
                    prune_k_smallest(buf, k, pairs, keep);
                },
            )
        }
        (SparsityPattern::Unstructured, ComparisonGroup::PerMatrix) => {
            let k = floor_count(d_in * d_out, spec.sparsity());
            let data = w.data();
            let mut scores = vec![0f64; d_in * d_out];
            scores
                .par_chunks_mut(d_out)
                .zip(data.par_chunks(d_out))
                .enumerate()
                .for_each(|(i, (s, row))| {
                    for (x, &v) in s.iter_mut().zip(row) {
                        *x = score(i, v);
                    }
                });
            select_matrix(&scores, d_in, d_out, k, rule)
        }
    };
    Ok(Mask::from_bools(d_in, d_out, &keep)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k_smallest_breaks_ties_by_index() {
        let s = [3.0, 1.0, 1.0, 2.0, 1.0, 0.5];
        let mut keep = vec![true; 6];
        let mut buf = Vec::new();
        prune_k_smallest(&s, 3, &mut buf, &mut keep);
        // order: 0.5(5), 1.0(1), 1.0(2), 1.0(4), ...
        assert_eq!(keep, vec![true, false, false, true, true, false]);
        let mut keep = vec![true; 6];
        prune_k_smallest(&s, 0, &mut buf, &mut keep);
        assert!(keep.iter().all(|k| *k));
    }

    #[test]
    fn n_m_groups_break_ties_by_index() {
        // burn [8, 2]: column 0 = [4, 1, 1, 3, 0, 0, 0, 0], column 1 = its negation
        let col = [4.0f32, 1.0, 1.0, 3.0, 0.0, 0.0, 0.0, 0.0];
        let w: Vec<f32> = col.iter().flat_map(|&v| [v, -v]).collect();
        let wt = Weights::new(&w, 8, 2).unwrap();
        let spec = PruneSpec::n_m(2, 4).unwrap();
        let m = mask_from_scores(
            wt,
            &spec,
            ComparisonGroup::PerOutput,
            ThresholdRule::ExactCount,
            |_, v| (v as f64).abs(),
        )
        .unwrap();
        let expected = [true, false, false, true, false, false, true, true];
        for (i, &e) in expected.iter().enumerate() {
            assert_eq!(m.get(i, 0), Some(e));
            assert_eq!(m.get(i, 1), Some(e));
        }
    }

    #[test]
    fn matrix_rules() {
        // rows=2, cols=3 (burn), scores row-major
        let s = [1.0, 0.0, 1.0, 2.0, 1.0, 0.0];
        // PyTorch flat order: (j=0: i0=1.0, i1=2.0), (j=1: 0.0, 1.0), (j=2: 1.0, 0.0)
        let keep = select_matrix(&s, 2, 3, 3, ThresholdRule::ExactCount);
        // prune the two zeros and the first 1.0 in PyTorch order: (0,0)
        assert_eq!(keep, vec![false, false, true, true, true, false]);
        let keep = select_matrix(&s, 2, 3, 3, ThresholdRule::BelowKth);
        assert_eq!(keep, vec![true, false, true, true, true, false]);
        let keep = select_matrix(&s, 2, 3, 3, ThresholdRule::AtOrBelowKth);
        assert_eq!(keep, vec![false, false, false, true, false, false]);
        let keep = select_matrix(&s, 2, 3, 0, ThresholdRule::ExactCount);
        assert!(keep.iter().all(|k| *k));
    }

    #[test]
    fn order_key_matches_cmp_score() {
        let v = [
            f64::NEG_INFINITY,
            -3.5,
            -1e-300,
            -0.0,
            0.0,
            1e-300,
            2.0,
            f64::INFINITY,
            f64::NAN,
            -f64::NAN,
        ];
        for &a in &v {
            for &b in &v {
                assert_eq!(order_key(a).cmp(&order_key(b)), cmp_score(a, b), "{a} {b}");
            }
        }
    }

    #[test]
    fn nan_sorts_last() {
        assert_eq!(cmp_score(f64::NAN, f64::INFINITY), Ordering::Greater);
        assert_eq!(cmp_score(-0.0, 0.0), Ordering::Equal);
        assert_eq!(cmp_score(-f64::NAN, 1.0), Ordering::Greater);
    }
}
