//! The `r`-th smallest of a column of `u64` keys ([`crate::select::order_key`]s of scores),
//! with the counts the tie rule needs, in about one pass over the keys.

/// Sample size of [`kth_key`]'s bracket.
const SAMPLE: usize = 128;
/// Half-width of the bracket, in sample ranks (about 2.2 standard deviations of a sample rank
/// at the median).
const GAP: usize = 12;

/// The `r`-th smallest (0-based) of some keys, with how many keys are below and equal to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Kth {
    pub(crate) key: u64,
    pub(crate) below: usize,
    pub(crate) equal: usize,
}

/// The `r`-th smallest (0-based) of `keys`, which are left untouched; `sel` is scratch.
///
/// Floyd–Rivest style: two ranks of an evenly spaced sample of the keys bracket the answer;
/// one branch-free pass ([`bracket`]) counts the keys below the bracket and gathers those inside
/// it, and a quickselect over the gathered keys (typically a fifth of them) finishes. If the
/// answer falls outside the bracket (an unlucky sample), a quickselect over all keys does. The
/// result is the same either way: only the work differs. Every key equal to the answer lies in
/// the bracket, so `below` and `equal` are counted over the gathered keys only.
pub(crate) fn kth_key(keys: &[u64], r: usize, sel: &mut Vec<u64>) -> Kth {
    let n = keys.len();
    assert!(r < n, "rank {r} of {n} keys");
    if n >= 8 * SAMPLE {
        let stride = n / SAMPLE;
        let mut sample = [0u64; SAMPLE];
        for (s, i) in sample.iter_mut().zip((stride / 2..n).step_by(stride)) {
            *s = keys[i];
        }
        let pos = r * SAMPLE / n;
        let (a, b) = (pos.saturating_sub(GAP), pos + GAP);
        let lo = if pos >= GAP {
            *sample.select_nth_unstable(a).1
        } else {
            0
        };
        let hi = if b < SAMPLE {
            // ranks above `a` lie after it once `a` is selected
            *sample[a..].select_nth_unstable(b - a).1
        } else {
            u64::MAX
        };
        // room for the AVX2 pass's whole-vector stores past the last gathered key
        if sel.len() < n + 4 {
            sel.resize(n + 4, 0);
        }
        let (below_lo, len) = bracket(keys, lo, hi, sel);
        if below_lo <= r && r < below_lo + len {
            return finish(&mut sel[..len], r - below_lo, below_lo);
        }
    }
    sel.clear();
    sel.extend_from_slice(keys);
    finish(sel, r, 0)
}

/// Sample size of [`kth_key_par`]'s bracket.
const PAR_SAMPLE: usize = 1 << 14;
/// Half-width of [`kth_key_par`]'s bracket in sample ranks: 4 standard deviations of a sample
/// rank at the median (`2 · sqrt(PAR_SAMPLE)`), so about 3 % of the keys fall inside.
const PAR_GAP: usize = 256;
/// Keys per task of [`kth_key_par`]'s bracket pass.
const PAR_CHUNK: usize = 1 << 16;

/// [`kth_key`] for a whole matrix of keys: a larger sample (a narrower bracket) and the
/// bracket pass split over the rayon threads. Below `64 · PAR_SAMPLE` keys it is [`kth_key`].
pub(crate) fn kth_key_par(keys: &[u64], r: usize) -> Kth {
    use rayon::prelude::*;
    let n = keys.len();
    assert!(r < n, "rank {r} of {n} keys");
    let mut sel = Vec::new();
    if n < 64 * PAR_SAMPLE {
        return kth_key(keys, r, &mut sel);
    }
    let stride = n / PAR_SAMPLE;
    let mut sample: Vec<u64> = (stride / 2..n).step_by(stride).map(|i| keys[i]).collect();
    sample.truncate(PAR_SAMPLE);
    sample.sort_unstable();
    let pos = r * PAR_SAMPLE / n;
    let lo = if pos >= PAR_GAP {
        sample[pos - PAR_GAP]
    } else {
        0
    };
    let hi = if pos + PAR_GAP < PAR_SAMPLE {
        sample[pos + PAR_GAP]
    } else {
        u64::MAX
    };
    let parts: Vec<(usize, Vec<u64>)> = keys
        .par_chunks(PAR_CHUNK)
        .map(|chunk| {
            let mut buf = vec![0u64; chunk.len() + 4];
            let (below, len) = bracket(chunk, lo, hi, &mut buf);
            buf.truncate(len);
            (below, buf)
        })
        .collect();
    let below_lo: usize = parts.iter().map(|p| p.0).sum();
    let len: usize = parts.iter().map(|p| p.1.len()).sum();
    if below_lo <= r && r < below_lo + len {
        sel.reserve(len);
        for (_, p) in &parts {
            sel.extend_from_slice(p);
        }
        return finish(&mut sel, r - below_lo, below_lo);
    }
    drop(parts);
    sel.extend_from_slice(keys);
    finish(&mut sel, r, 0)
}

/// The `r`-th smallest of `sel` plus the counts, `offset` keys lying below all of `sel`.
fn finish(sel: &mut [u64], r: usize, offset: usize) -> Kth {
    let key = *sel.select_nth_unstable(r).1;
    let (mut below, mut equal) = (offset, 0usize);
    for &k in sel.iter() {
        below += (k < key) as usize;
        equal += (k == key) as usize;
    }
    Kth { key, below, equal }
}

/// Counts the keys below `lo` and gathers those in `lo..=hi` at the front of `sel` (which has
/// room for `keys.len() + 4`): returns `(below, gathered)`.
fn bracket(keys: &[u64], lo: u64, hi: u64, sel: &mut [u64]) -> (usize, usize) {
    assert!(sel.len() >= keys.len() + 4);
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx2() {
        // SAFETY: the CPU reports AVX2; `sel` has room for every key plus one vector.
        return unsafe { bracket_avx2(keys, lo, hi, sel) };
    }
    bracket_scalar(keys, lo, hi, sel)
}

#[inline(always)]
fn bracket_scalar(keys: &[u64], lo: u64, hi: u64, sel: &mut [u64]) -> (usize, usize) {
    let (mut below, mut len) = (0usize, 0usize);
    for &key in keys {
        below += (key < lo) as usize;
        sel[len] = key;
        len += (lo <= key && key <= hi) as usize;
    }
    (below, len)
}

/// [`bracket_scalar`] four keys at a time: unsigned compares as signed ones on keys with the
/// top bit flipped, and the gathered keys packed left by a permutation looked up from the
/// 4-bit compare mask, stored as a whole vector.
///
/// # Safety
/// AVX2 must be available and `sel.len() >= keys.len() + 4`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn bracket_avx2(keys: &[u64], lo: u64, hi: u64, sel: &mut [u64]) -> (usize, usize) {
    use std::arch::x86_64::*;
    /// Lane permutations (8 × i32) packing the u64 lanes set in a 4-bit mask to the front.
    const PACK: [[i32; 8]; 16] = {
        let mut t = [[0i32; 8]; 16];
        let mut m = 0;
        while m < 16 {
            let mut out = 0;
            let mut lane = 0i32;
            while lane < 4 {
                if m >> lane & 1 == 1 {
                    t[m][2 * out] = 2 * lane;
                    t[m][2 * out + 1] = 2 * lane + 1;
                    out += 1;
                }
                lane += 1;
            }
            m += 1;
        }
        t
    };
    let flip = |x: u64| (x ^ (1 << 63)) as i64;
    let n = keys.len();
    let mut below = 0usize;
    let mut len = 0usize;
    let lo_v = _mm256_set1_epi64x(flip(lo));
    let hi_v = _mm256_set1_epi64x(flip(hi));
    let sign = _mm256_set1_epi64x(i64::MIN);
    let mut below_v = _mm256_setzero_si256();
    let mut i = 0;
    // SAFETY: loads read keys[i..i + 4] with i + 4 <= n; stores write sel[len..len + 4] with
    // len <= i < n, inside `sel` (len n + 4).
    unsafe {
        while i + 4 <= n {
            let v = _mm256_loadu_si256(keys.as_ptr().add(i).cast());
            let s = _mm256_xor_si256(v, sign);
            let lt = _mm256_cmpgt_epi64(lo_v, s);
            let gt = _mm256_cmpgt_epi64(s, hi_v);
            below_v = _mm256_sub_epi64(below_v, lt);
            let out = _mm256_or_si256(lt, gt);
            let m = (!_mm256_movemask_pd(_mm256_castsi256_pd(out)) & 0xF) as usize;
            let perm = _mm256_loadu_si256(PACK[m].as_ptr().cast());
            let packed = _mm256_permutevar8x32_epi32(v, perm);
            _mm256_storeu_si256(sel.as_mut_ptr().add(len).cast(), packed);
            len += m.count_ones() as usize;
            i += 4;
        }
    }
    let mut lanes = [0u64; 4];
    // SAFETY: `lanes` holds exactly one vector.
    unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), below_v) };
    below += lanes.iter().sum::<u64>() as usize;
    for &key in &keys[i..] {
        below += (key < lo) as usize;
        sel[len] = key;
        len += (lo <= key && key <= hi) as usize;
    }
    (below, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random `u64`s (SplitMix64).
    fn splitmix(seed: &mut u64) -> u64 {
        *seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    #[test]
    fn kth_key_is_the_sorted_rank() {
        let mut seed = 1;
        let mut sel = Vec::new();
        for n in [1, 5, 1023, 1024, 2048, 3001, 5000] {
            // distinct, heavy ties, sorted, reverse sorted, outliers (the bracket misses),
            // keys on both sides of the top bit (signed compares)
            let random: Vec<u64> = (0..n).map(|_| splitmix(&mut seed)).collect();
            let ties: Vec<u64> = (0..n).map(|_| splitmix(&mut seed) % 7).collect();
            let sorted: Vec<u64> = (0..n as u64).collect();
            let reversed: Vec<u64> = (0..n as u64).rev().collect();
            let skewed: Vec<u64> = (0..n as u64)
                .map(|i| if i % 16 == 8 { 1000 + i } else { i % 3 })
                .collect();
            let top: Vec<u64> = (0..n as u64)
                .map(|i| (i % 5).wrapping_sub(2).rotate_right(1) ^ (i % 2))
                .collect();
            for keys in [random, ties, sorted, reversed, skewed, top] {
                let mut want = keys.clone();
                want.sort_unstable();
                for r in [0, n / 10, n / 2, n - 1 - n / 3, n - 1] {
                    let got = kth_key(&keys, r, &mut sel);
                    let below = want.iter().filter(|&&k| k < want[r]).count();
                    let equal = want.iter().filter(|&&k| k == want[r]).count();
                    let expected = Kth {
                        key: want[r],
                        below,
                        equal,
                    };
                    assert_eq!(got, expected, "n {n} r {r}");
                }
            }
        }
    }

    #[test]
    fn parallel_kth_key_is_the_sorted_rank() {
        let mut seed = 5;
        let n = 64 * PAR_SAMPLE + 12_345;
        let random: Vec<u64> = (0..n).map(|_| splitmix(&mut seed) >> 20).collect();
        // a block of equal keys around the median, and a sorted run (the sample misses)
        let mut ties = random.clone();
        ties[n / 3..n / 3 + n / 5].fill(1 << 43);
        let sorted: Vec<u64> = (0..n as u64).map(|i| i / 3).collect();
        for keys in [random, ties, sorted] {
            let mut want = keys.clone();
            want.sort_unstable();
            for r in [0, 17, n / 2, n / 2 + 1, n - 2] {
                let got = kth_key_par(&keys, r);
                let lo = want.partition_point(|&k| k < want[r]);
                let hi = want.partition_point(|&k| k <= want[r]);
                let expected = Kth {
                    key: want[r],
                    below: lo,
                    equal: hi - lo,
                };
                assert_eq!(got, expected, "r {r}");
            }
        }
    }

    #[test]
    fn vector_bracket_matches_the_scalar_one() {
        let mut seed = 9;
        for n in [0, 3, 4, 5, 64, 1001] {
            let keys: Vec<u64> = (0..n)
                .map(|_| splitmix(&mut seed) % 11 * (u64::MAX / 10))
                .collect();
            for (lo, hi) in [
                (0, u64::MAX),
                (u64::MAX / 10 * 3, u64::MAX / 10 * 7),
                (5, 4),
            ] {
                let mut a = vec![0; n + 4];
                let mut b = vec![0; n + 4];
                let ra = bracket(&keys, lo, hi, &mut a);
                let rb = bracket_scalar(&keys, lo, hi, &mut b);
                assert_eq!(ra, rb);
                assert_eq!(a[..ra.1], b[..rb.1]);
            }
        }
    }
}
