//! CIDEr-D exactly as `pycocoevalcap` 1.2 computes it (the metric it reports as
//! `"CIDEr"`; `cider/cider.py` + `cider/cider_scorer.py`, Vedantam et al. 2015).
//!
//! Inputs are tokenised strings (see [`crate::ptb`]); words come from Python's
//! `str.split()`. With n-gram orders 1..=4 and σ = 6:
//!
//! * **Document frequency** `df(g)` = number of images whose *reference set*
//!   contains n-gram `g` (hypotheses do not count). `N` = number of images
//!   scored together, so the score of an image depends on the whole set.
//! * **TF-IDF vector** of a sentence, per order n: `v_n[g] = tf(g) · (ln N −
//!   ln max(1, df(g)))`; n-grams unseen in the references get `df = 0`, hence
//!   the full weight `ln N`.
//! * **Similarity** with one reference, per order n:
//!   `Σ_{g ∈ hyp} min(v_hyp[g], v_ref[g]) · v_ref[g]`, divided by
//!   `‖v_hyp‖·‖v_ref‖` unless one of the norms is zero (then the sum is left
//!   as is, which is 0 whenever the hypothesis norm is 0), times the Gaussian
//!   length penalty `exp(−δ²/(2σ²))`. **Quirk kept:** δ is the difference of
//!   the *bigram* counts (`length` is accumulated where the 0-based order index
//!   `n == 1`), i.e. `max(0, len−1)` of each sentence, not the word counts.
//! * **Image score** = mean over the 4 orders of the similarities summed over
//!   the references, divided by the number of references, times 10.
//! * **Corpus score** = mean of the image scores.
//!
//! Summation orders follow the Python code (insertion order of the n-gram
//! dictionaries), so results agree to the last few ulps.

use std::collections::HashMap;

use crate::pystr::py_split;

/// Maximum n-gram order.
pub const N: usize = 4;
/// Standard deviation of the length penalty.
pub const SIGMA: f64 = 6.0;

/// Interns n-grams (as word slices) to dense ids.
#[derive(Default)]
struct Interner<'a> {
    ids: HashMap<Vec<&'a str>, u32>,
}

impl<'a> Interner<'a> {
    fn id(&mut self, gram: &[&'a str]) -> u32 {
        if let Some(&id) = self.ids.get(gram) {
            return id;
        }
        let id = u32::try_from(self.ids.len()).expect("fewer than 2^32 distinct n-grams");
        self.ids.insert(gram.to_vec(), id);
        id
    }
}

/// `precook`: counts of the 1..=4-grams of a sentence, as `(id, order index,
/// count)` in first-occurrence order (orders 1..=4, each left to right), which
/// is the iteration order of the Python `defaultdict`.
fn precook<'a>(sentence: &'a str, interner: &mut Interner<'a>) -> Vec<(u32, usize, usize)> {
    let words: Vec<&str> = py_split(sentence).collect();
    let mut index: HashMap<u32, usize> = HashMap::new();
    let mut out: Vec<(u32, usize, usize)> = Vec::new();
    for k in 1..=N {
        for w in words.windows(k) {
            let id = interner.id(w);
            match index.get(&id) {
                Some(&i) => out[i].2 += 1,
                None => {
                    index.insert(id, out.len());
                    out.push((id, k - 1, 1));
                }
            }
        }
    }
    out
}

/// A TF-IDF vector per order (in insertion order), its norms and the bigram count.
struct Vector {
    weights: [Vec<(u32, f64)>; N],
    norm: [f64; N],
    /// `length` in the Python code: the number of bigrams.
    length: usize,
}

impl Vector {
    /// `vec[n][ngram]` of a `defaultdict(float)`: 0 when absent.
    fn get(&self, n: usize, id: u32) -> f64 {
        self.weights[n]
            .iter()
            .find(|(g, _)| *g == id)
            .map_or(0.0, |(_, w)| *w)
    }
}

fn counts_to_vec(counts: &[(u32, usize, usize)], df: &[f64], ref_len: f64) -> Vector {
    let mut v = Vector {
        weights: Default::default(),
        norm: [0.0; N],
        length: 0,
    };
    for &(id, n, tf) in counts {
        // df = np.log(max(1.0, self.document_frequency[ngram]))
        let log_df = df[id as usize].max(1.0).ln();
        let w = tf as f64 * (ref_len - log_df);
        v.weights[n].push((id, w));
        v.norm[n] += w.powi(2);
        if n == 1 {
            v.length += tf;
        }
    }
    for x in &mut v.norm {
        *x = x.sqrt();
    }
    v
}

fn sim(hyp: &Vector, reference: &Vector) -> [f64; N] {
    let delta = hyp.length as f64 - reference.length as f64;
    let mut val = [0.0; N];
    for (n, v) in val.iter_mut().enumerate() {
        for &(id, h) in &hyp.weights[n] {
            let r = reference.get(n, id);
            *v += h.min(r) * r;
        }
        if hyp.norm[n] != 0.0 && reference.norm[n] != 0.0 {
            *v /= hyp.norm[n] * reference.norm[n];
        }
        // np.e ** (-(delta**2) / (2 * sigma**2))
        *v *= std::f64::consts::E.powf(-(delta * delta) / (2.0 * SIGMA * SIGMA));
    }
    val
}

/// CIDEr-D scores of a set of images.
#[derive(Debug, Clone, PartialEq)]
pub struct CiderScores {
    /// Mean of the per-image scores (`"CIDEr"`).
    pub corpus: f64,
    /// Per-image scores, in input order.
    pub per_image: Vec<f64>,
}

/// Compute CIDEr-D for `(hypothesis, references)` pairs of tokenised strings.
///
/// pycocoevalcap asserts that each image has at least one reference; an image
/// without references scores `NaN` here (the Python code would divide by zero).
pub fn cider<S: AsRef<str>>(items: &[(S, Vec<S>)]) -> CiderScores {
    let mut interner = Interner::default();
    let tests: Vec<_> = items
        .iter()
        .map(|(h, _)| precook(h.as_ref(), &mut interner))
        .collect();
    let refs: Vec<Vec<_>> = items
        .iter()
        .map(|(_, rs)| {
            rs.iter()
                .map(|r| precook(r.as_ref(), &mut interner))
                .collect()
        })
        .collect();

    // compute_doc_freq: each image adds 1 for every distinct n-gram of its refs.
    let mut df = vec![0.0f64; interner.ids.len()];
    let mut last_image = vec![usize::MAX; interner.ids.len()];
    for (image, image_refs) in refs.iter().enumerate() {
        for r in image_refs {
            for &(id, _, _) in r {
                if last_image[id as usize] != image {
                    last_image[id as usize] = image;
                    df[id as usize] += 1.0;
                }
            }
        }
    }
    // self.ref_len = np.log(float(len(self.crefs)))
    let ref_len = (items.len() as f64).ln();

    let mut per_image = Vec::with_capacity(items.len());
    for (test, image_refs) in tests.iter().zip(&refs) {
        let v = counts_to_vec(test, &df, ref_len);
        let mut score = [0.0; N];
        for r in image_refs {
            let vr = counts_to_vec(r, &df, ref_len);
            let s = sim(&v, &vr);
            for n in 0..N {
                score[n] += s[n];
            }
        }
        // np.mean(score) / len(refs) * 10
        let mut avg = score.iter().sum::<f64>() / N as f64;
        avg /= image_refs.len() as f64;
        avg *= 10.0;
        per_image.push(avg);
    }
    let corpus = if per_image.is_empty() {
        f64::NAN
    } else {
        per_image.iter().sum::<f64>() / per_image.len() as f64
    };
    CiderScores { corpus, per_image }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_image_scores_zero() {
        // N = 1 gives ln N = 0: every weight is 0.
        let s = cider(&[("a b", vec!["a b"])]);
        assert_eq!(s.per_image, vec![0.0]);
    }

    #[test]
    fn bigram_length_penalty() {
        // Two images so that idf is non-zero; identical hyp/ref gives 10 minus
        // nothing (delta = 0) for the n-gram orders present.
        let s = cider(&[("a b c", vec!["a b c"]), ("x y", vec!["z w"])]);
        assert!(s.per_image[0] > 0.0);
        assert_eq!(s.per_image[1], 0.0);
    }
}
