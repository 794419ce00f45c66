//! Selection primitives shared by the criteria, with the crate's tie-breaking rule:
//! order by `(score, index)` ascending (a stable ascending sort) and prune from the front.

use std::cmp::Ordering;

use rayon::prelude::*;
use ressa_sparse::{Mask, SparsityPattern};

use crate::kth::{Kth, kth_key, kth_key_par};
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
#[inline(always)]
pub(crate) fn order_key(x: f64) -> u64 {
    // negative: flip every bit; positive: set the sign bit (branch-free, so loops vectorise)
    let bits = (x + 0.0).to_bits();
    let flip = ((bits as i64) >> 63) as u64 | (1 << 63);
    if x.is_nan() { u64::MAX } else { bits ^ flip }
}

/// Prunes the `k` lowest scores `|col[i]| · scale[i]` of one column (`keys`, `sel`: scratch),
/// compiled for the CPU's widest vectors.
fn unstructured_column(
    col: &[f32],
    scale: &[f64],
    k: usize,
    keys: &mut [u64],
    sel: &mut Vec<u64>,
    mask: &mut ColumnMask<'_>,
) {
    #[inline(always)]
    fn body(
        col: &[f32],
        scale: &[f64],
        k: usize,
        keys: &mut [u64],
        sel: &mut Vec<u64>,
        mask: &mut ColumnMask<'_>,
    ) {
        for ((key, &v), &s) in keys.iter_mut().zip(col).zip(scale) {
            *key = order_key((v as f64).abs() * s);
        }
        prune_k_smallest_keys(keys, k, sel, mask);
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn body_avx2(
        col: &[f32],
        scale: &[f64],
        k: usize,
        keys: &mut [u64],
        sel: &mut Vec<u64>,
        mask: &mut ColumnMask<'_>,
    ) {
        body(col, scale, k, keys, sel, mask)
    }
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx2() {
        // SAFETY: the CPU reports AVX2 and FMA.
        return unsafe { body_avx2(col, scale, k, keys, sel, mask) };
    }
    body(col, scale, k, keys, sel, mask)
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

/// Marks the `k` smallest of `keys` ([`order_key`]s of scores), in `(key, index)` order, as
/// pruned in `mask`. `sel` is scratch space.
#[inline(always)]
pub(crate) fn prune_k_smallest_keys(
    keys: &[u64],
    k: usize,
    sel: &mut Vec<u64>,
    mask: &mut ColumnMask<'_>,
) {
    let n = keys.len();
    let s = mask.shift;
    if k == 0 {
        return;
    }
    if k >= n {
        mask.bits.iter_mut().for_each(|b| *b &= !(1 << s));
        return;
    }
    // the k-th smallest key: everything below it goes, and `k - below` of its ties
    let Kth {
        key: thr,
        below,
        equal,
    } = kth_key(keys, k - 1, sel);
    if below + equal == k {
        // no surplus ties (the usual case): one branch-free pass
        for (b, &key) in mask.bits.iter_mut().zip(keys) {
            *b &= !(((key <= thr) as u64) << s);
        }
        return;
    }
    // surplus ties at the threshold: the lowest indices go first
    let mut left = k - below;
    for (b, &key) in mask.bits.iter_mut().zip(keys) {
        let tie = key == thr && left > 0;
        left -= tie as usize;
        *b &= !((((key < thr) | tie) as u64) << s);
    }
}

/// Rows ahead of the one being copied whose cache lines [`per_column`] prefetches.
const PREFETCH_ROWS: usize = 8;

/// Hints the CPU to load the cache line holding `p`.
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint; it never faults, whatever the address.
    unsafe {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        _mm_prefetch::<_MM_HINT_T0>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Columns per task of [`per_column`]: one `u64` of keep bits per input row.
const CHUNK_COLS: usize = 64;

/// One output column's keep flags inside a [`per_column`] task: bit `shift` of `bits[i]` is
/// input `i`'s flag (set = keep); every flag starts set.
pub(crate) struct ColumnMask<'a> {
    pub(crate) bits: &'a mut [u64],
    pub(crate) shift: u32,
}

impl ColumnMask<'_> {
    /// Copies `keep` (one flag per input) into the column's bits.
    pub(crate) fn set_from_bools(&mut self, keep: &[bool]) {
        let s = self.shift;
        for (b, &k) in self.bits.iter_mut().zip(keep) {
            *b = (*b & !(1 << s)) | ((k as u64) << s);
        }
    }
}

/// Runs `f(j, column_weights, mask, state)` for every output column `j` in parallel and
/// assembles the mask. `column_weights` is column `j` (length `d_in`, contiguous); `mask`
/// starts all kept. `S` is per-task scratch state made by `scratch()`.
///
/// A task takes up to [`CHUNK_COLS`] columns: it copies them into a column-major tile
/// ([`transpose_chunk`]) and collects each input row's keep flags as the bits of one word.
pub(crate) fn per_column<S, F>(
    w: Weights<'_>,
    scratch: impl Fn() -> S + Sync + Send,
    f: F,
) -> Result<Mask>
where
    F: Fn(usize, &[f32], &mut ColumnMask<'_>, &mut S) + Sync,
{
    let (d_in, d_out) = (w.d_in(), w.d_out());
    let data = w.data();
    // columns padded by one cache line: `d_in` is often a multiple of 1024, and strides that
    // are multiples of 4 KiB map every column of the tile to the same L1 set
    let stride = d_in + 16;
    let starts: Vec<usize> = (0..d_out).step_by(CHUNK_COLS).collect();
    // a few tasks per thread, each with one tile and one scratch state for all its chunks
    let per_task = starts
        .len()
        .div_ceil(4 * rayon::current_num_threads().max(1));
    let chunks: Vec<Vec<u64>> = starts
        .par_chunks(per_task)
        .flat_map_iter(|group| {
            let mut tile = vec![0f32; CHUNK_COLS * stride];
            let mut state = scratch();
            let mut out = Vec::with_capacity(group.len());
            for &j0 in group {
                let ncols = CHUNK_COLS.min(d_out - j0);
                transpose_chunk(data, d_in, d_out, j0, ncols, &mut tile, stride);
                let mut bits = vec![u64::MAX >> (64 - ncols); d_in];
                for c in 0..ncols {
                    let mut mask = ColumnMask {
                        bits: &mut bits,
                        shift: c as u32,
                    };
                    f(
                        j0 + c,
                        &tile[c * stride..c * stride + d_in],
                        &mut mask,
                        &mut state,
                    );
                }
                out.push(bits);
            }
            out
        })
        .collect();
    let mut words = vec![0u64; (d_in * d_out).div_ceil(64)];
    for (&j0, bits) in starts.iter().zip(&chunks) {
        let ncols = CHUNK_COLS.min(d_out - j0);
        for (i, &b) in bits.iter().enumerate() {
            let pos = i * d_out + j0;
            let (wd, off) = (pos / 64, pos % 64);
            words[wd] |= b << off;
            if off + ncols > 64 {
                words[wd + 1] |= b >> (64 - off);
            }
        }
    }
    mask_from_words(d_in, d_out, &words)
}

/// Copies columns `j0..j0 + ncols` of the row-major `[d_in, d_out]` `data` into `tile`,
/// column-major with column stride `stride`: `tile[c * stride + i] = data[i * d_out + j0 + c]`.
///
/// Rows are far apart (a page or more each, typically), so the lines of the rows a few ahead
/// are prefetched; without that the copy waits on one row's cache misses at a time (it was
/// most of Wanda's per-output mask time). With AVX2 the copy moves 8 × 8 blocks through
/// registers (8 loads, 24 shuffles, 8 stores).
fn transpose_chunk(
    data: &[f32],
    d_in: usize,
    d_out: usize,
    j0: usize,
    ncols: usize,
    tile: &mut [f32],
    stride: usize,
) {
    assert!(j0 + ncols <= d_out && data.len() == d_in * d_out && tile.len() >= ncols * stride);
    assert!(stride >= d_in);
    let prefetch_row = |i: usize| {
        if i < d_in {
            for off in (0..ncols).step_by(16) {
                prefetch(data[i * d_out + j0 + off..].as_ptr());
            }
        }
    };
    let mut i0 = 0;
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx2() && ncols.is_multiple_of(8) {
        while i0 + 8 <= d_in {
            for r in 0..8 {
                prefetch_row(i0 + PREFETCH_ROWS + r);
            }
            for c0 in (0..ncols).step_by(8) {
                // SAFETY: AVX2 is available; rows i0..i0 + 8, columns j0 + c0..j0 + c0 + 8
                // lie inside `data` and tile columns c0..c0 + 8, rows i0..i0 + 8 inside `tile`
                // (both asserted above).
                unsafe {
                    transpose8x8_avx2(
                        data.as_ptr().add(i0 * d_out + j0 + c0),
                        d_out,
                        tile.as_mut_ptr().add(c0 * stride + i0),
                        stride,
                    )
                };
            }
            i0 += 8;
        }
    }
    for i in i0..d_in {
        prefetch_row(i + PREFETCH_ROWS);
        let row = &data[i * d_out + j0..i * d_out + j0 + ncols];
        for (c, &v) in row.iter().enumerate() {
            tile[c * stride + i] = v;
        }
    }
}

/// Transposes the 8 × 8 block at `src` (row stride `src_stride`) into `dst` (row stride
/// `dst_stride`): `dst[c * dst_stride + r] = src[r * src_stride + c]`.
///
/// # Safety
/// AVX2 must be available, and all 8 rows of 8 values at `src` and `dst` in bounds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn transpose8x8_avx2(src: *const f32, src_stride: usize, dst: *mut f32, dst_stride: usize) {
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees the 8 rows of 8 values at `src` and `dst`.
    unsafe {
        let r = |k: usize| _mm256_loadu_ps(src.add(k * src_stride));
        let (r0, r1, r2, r3, r4, r5, r6, r7) = (r(0), r(1), r(2), r(3), r(4), r(5), r(6), r(7));
        let t0 = _mm256_unpacklo_ps(r0, r1);
        let t1 = _mm256_unpackhi_ps(r0, r1);
        let t2 = _mm256_unpacklo_ps(r2, r3);
        let t3 = _mm256_unpackhi_ps(r2, r3);
        let t4 = _mm256_unpacklo_ps(r4, r5);
        let t5 = _mm256_unpackhi_ps(r4, r5);
        let t6 = _mm256_unpacklo_ps(r6, r7);
        let t7 = _mm256_unpackhi_ps(r6, r7);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        let w = |k: usize, v: __m256| _mm256_storeu_ps(dst.add(k * dst_stride), v);
        w(0, _mm256_permute2f128_ps::<0x20>(u0, u4));
        w(1, _mm256_permute2f128_ps::<0x20>(u1, u5));
        w(2, _mm256_permute2f128_ps::<0x20>(u2, u6));
        w(3, _mm256_permute2f128_ps::<0x20>(u3, u7));
        w(4, _mm256_permute2f128_ps::<0x31>(u0, u4));
        w(5, _mm256_permute2f128_ps::<0x31>(u1, u5));
        w(6, _mm256_permute2f128_ps::<0x31>(u2, u6));
        w(7, _mm256_permute2f128_ps::<0x31>(u3, u7));
    }
}

/// A [`Mask`] from its packed words (bit `i * d_out + j` of the little-endian stream).
pub(crate) fn mask_from_words(d_in: usize, d_out: usize, words: &[u64]) -> Result<Mask> {
    let mut bytes = Vec::with_capacity(words.len() * 8);
    for w in words {
        bytes.extend_from_slice(&w.to_le_bytes());
    }
    bytes.truncate((d_in * d_out).div_ceil(8));
    Ok(Mask::from_bytes(d_in, d_out, &bytes)?)
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
    debug_assert_eq!(scores.len(), rows * cols);
    let keys: Vec<u64> = if scores.len() >= PAR_MATRIX {
        scores.par_iter().map(|&s| order_key(s)).collect()
    } else {
        scores.iter().map(|&s| order_key(s)).collect()
    };
    select_matrix_keys(&keys, rows, cols, k, rule)
}

/// Matrices from this many entries are scored and selected on all threads.
const PAR_MATRIX: usize = 1 << 16;

/// [`select_matrix`] on the scores' [`order_key`]s.
pub(crate) fn select_matrix_keys(
    keys: &[u64],
    rows: usize,
    cols: usize,
    k: usize,
    rule: ThresholdRule,
) -> Vec<bool> {
    let numel = rows * cols;
    debug_assert_eq!(keys.len(), numel);
    if numel == 0 {
        return Vec::new();
    }
    if k == 0 && rule == ThresholdRule::ExactCount {
        return vec![true; numel];
    }
    let k = k.min(numel - 1);
    let par = numel >= PAR_MATRIX;
    // the k-th key (0-based: the (k+1)-th smallest) and how many keys lie below / at it
    let Kth {
        key: thr,
        below: n_below,
        equal: n_equal,
    } = if par {
        kth_key_par(keys, k)
    } else {
        kth_key(keys, k, &mut Vec::new())
    };
    let map = |f: &(dyn Fn(u64) -> bool + Sync)| -> Vec<bool> {
        if par {
            keys.par_iter().map(|&s| f(s)).collect()
        } else {
            keys.iter().map(|&s| f(s)).collect()
        }
    };
    match rule {
        ThresholdRule::BelowKth => map(&|key| key >= thr),
        ThresholdRule::AtOrBelowKth => map(&|key| key > thr),
        ThresholdRule::ExactCount => {
            let need = k - n_below.min(k);
            if n_equal <= need {
                return map(&|key| key > thr);
            }
            let mut keep = map(&|key| key >= thr);
            // ties at the threshold: lower PyTorch flat index (output-major, j * rows + i)
            // first; gathered in memory order, then ordered (a column-major walk of the
            // matrix touched a new cache line per entry)
            let mut ties: Vec<usize> = if par {
                keys.par_iter()
                    .enumerate()
                    .filter(|&(_, &key)| key == thr)
                    .map(|(x, _)| x)
                    .collect()
            } else {
                (0..numel).filter(|&x| keys[x] == thr).collect()
            };
            ties.sort_unstable_by_key(|&x| (x % cols) * rows + x / cols);
            for &x in &ties[..need] {
                keep[x] = false;
            }
            keep
        }
    }
}

/// Groups of this many columns are ranked together by [`nm_group`].
const NM_BLOCK: usize = 64;

/// N:M keep flags of one group of `m` input rows (`wg`, `kg`: row-major `[m, d_out]`):
/// in each column, the `n` lowest `(key, row)` are pruned. `keys` is scratch (`m * NM_BLOCK`).
#[inline(always)]
fn nm_group_body(
    kg: &mut [bool],
    wg: &[f32],
    scale: &[f64],
    n: usize,
    d_out: usize,
    keys: &mut [u64],
) {
    let m = scale.len();
    match m {
        4 => return nm_group_fixed::<4>(kg, wg, scale, n, d_out),
        8 => return nm_group_fixed::<8>(kg, wg, scale, n, d_out),
        _ => {}
    }
    for j0 in (0..d_out).step_by(NM_BLOCK) {
        let bw = NM_BLOCK.min(d_out - j0);
        for (a, &s) in scale.iter().enumerate() {
            let row = &wg[a * d_out + j0..a * d_out + j0 + bw];
            for (k, &v) in keys[a * NM_BLOCK..a * NM_BLOCK + bw].iter_mut().zip(row) {
                *k = order_key((v as f64).abs() * s);
            }
        }
        for a in 0..m {
            // rank of (key_a, a) among the group: lower rows win ties
            let mut rank = [0u8; NM_BLOCK];
            let ka = &keys[a * NM_BLOCK..a * NM_BLOCK + bw];
            for b in 0..m {
                let kb = &keys[b * NM_BLOCK..b * NM_BLOCK + bw];
                if b < a {
                    for ((r, &x), &y) in rank.iter_mut().zip(kb).zip(ka) {
                        *r += (x <= y) as u8;
                    }
                } else if b > a {
                    for ((r, &x), &y) in rank.iter_mut().zip(kb).zip(ka) {
                        *r += (x < y) as u8;
                    }
                }
            }
            let out = &mut kg[a * d_out + j0..a * d_out + j0 + bw];
            for (o, &r) in out.iter_mut().zip(&rank) {
                *o = r as usize >= n;
            }
        }
    }
}

/// [`nm_group_body`] for a group size known at compile time (2:4, 4:8): the ranks of one
/// column are straight-line code, vectorised across the columns.
#[inline(always)]
fn nm_group_fixed<const M: usize>(
    kg: &mut [bool],
    wg: &[f32],
    scale: &[f64],
    n: usize,
    d_out: usize,
) {
    let s: [f64; M] = std::array::from_fn(|a| scale[a]);
    let rows: [&[f32]; M] = std::array::from_fn(|a| &wg[a * d_out..(a + 1) * d_out]);
    let mut out_rows = kg.chunks_exact_mut(d_out);
    let outs: [&mut [bool]; M] = std::array::from_fn(|_| out_rows.next().unwrap());
    for j in 0..d_out {
        let k: [u64; M] = std::array::from_fn(|a| order_key((rows[a][j] as f64).abs() * s[a]));
        for a in 0..M {
            // rank of (key_a, a) among the group: lower rows win ties
            let mut rank = 0usize;
            for b in 0..M {
                rank += if b < a {
                    (k[b] <= k[a]) as usize
                } else {
                    (b > a && k[b] < k[a]) as usize
                };
            }
            outs[a][j] = rank >= n;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn nm_group_avx2(
    kg: &mut [bool],
    wg: &[f32],
    scale: &[f64],
    n: usize,
    d_out: usize,
    keys: &mut [u64],
) {
    nm_group_body(kg, wg, scale, n, d_out, keys)
}

/// [`nm_group_body`] for the CPU's widest vectors.
fn nm_group(kg: &mut [bool], wg: &[f32], scale: &[f64], n: usize, d_out: usize, keys: &mut [u64]) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx2() {
        // SAFETY: the CPU reports AVX2 and FMA.
        return unsafe { nm_group_avx2(kg, wg, scale, n, d_out, keys) };
    }
    nm_group_body(kg, wg, scale, n, d_out, keys)
}

/// Mask from the scores `S_ij = |w_ij| · scale_i` (Wanda: `scale` = input norms; magnitude:
/// ones, which is exactly `|w_ij|`) for any [`PruneSpec`]: N:M per column groups,
/// unstructured per output or per matrix. `scale` is finite and non-negative, `len == d_in`.
pub(crate) fn mask_from_scores(
    w: Weights<'_>,
    spec: &PruneSpec,
    group: ComparisonGroup,
    rule: ThresholdRule,
    scale: &[f64],
) -> Result<Mask> {
    spec.validate(w.d_in())?;
    let (d_in, d_out) = (w.d_in(), w.d_out());
    debug_assert_eq!(scale.len(), d_in);
    let keep = match (spec.pattern(), group) {
        (SparsityPattern::NM { n, m }, _) => {
            // a group is m consecutive rows: contiguous in burn layout, no transpose needed
            let data = w.data();
            let mut keep = vec![true; d_in * d_out];
            keep.par_chunks_mut(m * d_out)
                .zip(data.par_chunks(m * d_out))
                .enumerate()
                .for_each_init(
                    || vec![0u64; m * NM_BLOCK],
                    |keys, (g, (kg, wg))| {
                        nm_group(kg, wg, &scale[g * m..(g + 1) * m], n, d_out, keys)
                    },
                );
            keep
        }
        (SparsityPattern::Unstructured, ComparisonGroup::PerOutput) => {
            let k = floor_count(d_in, spec.sparsity());
            return per_column(
                w,
                || (vec![0u64; d_in], Vec::<u64>::with_capacity(d_in)),
                |_, col, mask, (keys, sel)| unstructured_column(col, scale, k, keys, sel, mask),
            );
        }
        (SparsityPattern::Unstructured, ComparisonGroup::PerMatrix) => {
            let k = floor_count(d_in * d_out, spec.sparsity());
            let data = w.data();
            let mut keys = vec![0u64; d_in * d_out];
            keys.par_chunks_mut(d_out)
                .zip(data.par_chunks(d_out))
                .zip(scale.par_iter())
                .for_each(|((s, row), &c)| {
                    for (x, &v) in s.iter_mut().zip(row) {
                        *x = order_key((v as f64).abs() * c);
                    }
                });
            select_matrix_keys(&keys, d_in, d_out, k, rule)
        }
    };
    Ok(Mask::from_bools(d_in, d_out, &keep)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`prune_k_smallest_keys`] on one column, as keep flags.
    fn k_smallest(keys: &[u64], k: usize) -> Vec<bool> {
        let mut bits = vec![u64::MAX; keys.len()];
        let mut sel = Vec::new();
        let mut mask = ColumnMask {
            bits: &mut bits,
            shift: 5,
        };
        prune_k_smallest_keys(keys, k, &mut sel, &mut mask);
        bits.iter().map(|b| b >> 5 & 1 == 1).collect()
    }

    #[test]
    fn k_smallest_breaks_ties_by_index() {
        let s: Vec<u64> = [3.0, 1.0, 1.0, 2.0, 1.0, 0.5].map(order_key).to_vec();
        // order: 0.5(5), 1.0(1), 1.0(2), 1.0(4), ...
        assert_eq!(
            k_smallest(&s, 3),
            vec![true, false, false, true, true, false]
        );
        assert!(k_smallest(&s, 0).iter().all(|k| *k));
        assert!(k_smallest(&s, 6).iter().all(|k| !*k));
        assert_eq!(
            k_smallest(&s, 4),
            vec![true, false, false, true, false, false]
        );
    }

    #[test]
    fn k_smallest_matches_a_stable_sort() {
        let mut seed = 3;
        for n in [7, 100, 2048, 3000] {
            for levels in [3, 50, u64::MAX] {
                let keys: Vec<u64> = (0..n).map(|_| splitmix(&mut seed) % levels).collect();
                let mut order: Vec<usize> = (0..n).collect();
                order.sort_by_key(|&i| keys[i]);
                for k in [1, n / 3, n / 2, n - 1] {
                    let mut want = vec![true; n];
                    for &i in &order[..k] {
                        want[i] = false;
                    }
                    assert_eq!(k_smallest(&keys, k), want, "n {n} levels {levels} k {k}");
                }
            }
        }
    }

    /// Deterministic pseudo-random `u64`s (SplitMix64).
    fn splitmix(seed: &mut u64) -> u64 {
        *seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// The selection as first written: a stable sort of `(score, index)` per output (or per
    /// N:M group), the first `k` pruned. Row-major keep flags.
    fn reference_mask(
        w: &[f32],
        d_in: usize,
        d_out: usize,
        scale: &[f64],
        spec: &PruneSpec,
    ) -> Vec<bool> {
        let mut keep = vec![true; d_in * d_out];
        let (n, m) = match spec.pattern() {
            SparsityPattern::NM { n, m } => (n, m),
            SparsityPattern::Unstructured => (floor_count(d_in, spec.sparsity()), d_in),
        };
        for j in 0..d_out {
            for g0 in (0..d_in).step_by(m) {
                let mut s: Vec<(f64, u32)> = (g0..g0 + m)
                    .map(|i| ((w[i * d_out + j] as f64).abs() * scale[i], i as u32))
                    .collect();
                s.sort_by(cmp_keyed);
                for &(_, i) in &s[..n] {
                    keep[i as usize * d_out + j] = false;
                }
            }
        }
        keep
    }

    #[test]
    fn per_output_and_n_m_masks_match_a_stable_sort() {
        let mut seed = 11;
        // odd shapes (tails of the 8 x 8 transpose and of the 64-column chunks), few distinct
        // values (ties everywhere, also across inputs through equal scales), zeros
        for (d_in, d_out) in [
            (8, 1),
            (13 * 4, 3),
            (64, 64),
            (1024, 65),
            (2048, 130),
            (24, 200),
        ] {
            for levels in [2u64, 9, 1 << 20] {
                let w: Vec<f32> = (0..d_in * d_out)
                    .map(|_| (splitmix(&mut seed) % levels) as f32 / 4.0 - 1.0)
                    .collect();
                let scale: Vec<f64> = (0..d_in)
                    .map(|_| (splitmix(&mut seed) % 3) as f64 * 0.5)
                    .collect();
                let wt = Weights::new(&w, d_in, d_out).unwrap();
                let mut specs = vec![
                    PruneSpec::unstructured(0.0).unwrap(),
                    PruneSpec::unstructured(0.3).unwrap(),
                    PruneSpec::unstructured(0.5).unwrap(),
                    PruneSpec::unstructured(0.9).unwrap(),
                ];
                if d_in % 4 == 0 {
                    specs.push(PruneSpec::n_m(2, 4).unwrap());
                    specs.push(PruneSpec::n_m(1, 4).unwrap());
                }
                if d_in % 8 == 0 {
                    specs.push(PruneSpec::n_m(4, 8).unwrap());
                }
                // group sizes without a compile-time specialisation
                if d_in % 16 == 0 {
                    specs.push(PruneSpec::n_m(1, 2).unwrap());
                    specs.push(PruneSpec::n_m(5, 16).unwrap());
                }
                for spec in specs {
                    let got = mask_from_scores(
                        wt,
                        &spec,
                        ComparisonGroup::PerOutput,
                        ThresholdRule::ExactCount,
                        &scale,
                    )
                    .unwrap();
                    let want = reference_mask(&w, d_in, d_out, &scale, &spec);
                    assert_eq!(got.to_bools(), want, "[{d_in}, {d_out}] {levels} {spec:?}");
                }
            }
        }
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
            &[1.0; 8],
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
    fn large_matrix_rules_match_a_sort() {
        // above kth_key_par's threshold, with ties at the cut
        let (rows, cols) = (1100, 1000);
        let mut seed = 21;
        let scores: Vec<f64> = (0..rows * cols)
            .map(|_| (splitmix(&mut seed) % 5000) as f64 * 0.25)
            .collect();
        let mut sorted = scores.clone();
        sorted.sort_by(|a, b| cmp_score(*a, *b));
        for k in [1, rows * cols / 2, rows * cols - 3] {
            let thr = sorted[k];
            let keep = select_matrix(&scores, rows, cols, k, ThresholdRule::BelowKth);
            assert!(keep.iter().zip(&scores).all(|(&kp, &s)| kp == (s >= thr)));
            let keep = select_matrix(&scores, rows, cols, k, ThresholdRule::AtOrBelowKth);
            assert!(keep.iter().zip(&scores).all(|(&kp, &s)| kp == (s > thr)));
            // exact count: the k lowest (score, PyTorch flat index j * rows + i)
            let mut order: Vec<usize> = (0..rows * cols).collect();
            let flat = |x: usize| (x % cols) * rows + x / cols;
            order.sort_by(|&a, &b| cmp_score(scores[a], scores[b]).then(flat(a).cmp(&flat(b))));
            let mut want = vec![true; rows * cols];
            for &x in &order[..k] {
                want[x] = false;
            }
            let keep = select_matrix(&scores, rows, cols, k, ThresholdRule::ExactCount);
            assert!(keep == want, "k {k}");
        }
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
