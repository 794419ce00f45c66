//! BLEU-1..4 exactly as `pycocoevalcap` 1.2 computes it
//! (`bleu/bleu.py` + `bleu/bleu_scorer.py`, David Chiang's scorer as modified
//! for the COCO caption server).
//!
//! Inputs are the already tokenised strings (see [`crate::ptb`]); words are
//! obtained with Python's `str.split()`.
//!
//! Per image (`cook_refs` / `cook_test`):
//! * `guess[k] = max(0, len(hyp) - k)` for k = 0..3 (number of hypothesis k+1-grams);
//! * `correct[k] = Σ_g min(count_hyp(g), max_r count_ref_r(g))` over the
//!   hypothesis (k+1)-grams g (clipped counts against the *maximum* count in any
//!   single reference);
//! * the effective reference length is the `"closest"` one:
//!   `min((abs(l - testlen), l) for l in reflens)[1]` (ties go to the shorter
//!   reference).
//!
//! Scores (`compute_score(option='closest')`), with `tiny = 1e-15`,
//! `small = 1e-9`:
//! * the running product `bleu *= (correct[k] + tiny) / (guess[k] + small)` and
//!   `BLEU_k = bleu ** (1/(k+1))` (a geometric mean of the precisions 1..k);
//! * brevity penalty: `ratio = (testlen + tiny) / (reflen + small)`; if
//!   `ratio < 1` every BLEU_k is multiplied by `exp(1 - 1/ratio)`;
//! * the **corpus** score applies this to the sums of `correct`, `guess`,
//!   `testlen` and `reflen` over all images (it is *not* the mean of the
//!   per-image scores); the per-image list uses each image's own counts.

use std::collections::HashMap;

use crate::pystr::py_split;

const TINY: f64 = 1e-15;
const SMALL: f64 = 1e-9;
/// Maximum n-gram order.
pub const N: usize = 4;

/// The per-image statistics `cook_test` produces.
#[derive(Debug, Clone, PartialEq)]
struct Cooked {
    testlen: usize,
    reflen: usize,
    guess: [usize; N],
    correct: [usize; N],
}

fn ngram_counts<'a>(words: &'a [&'a str]) -> HashMap<&'a [&'a str], usize> {
    let mut counts = HashMap::new();
    for k in 1..=N {
        for w in words.windows(k) {
            *counts.entry(w).or_insert(0) += 1;
        }
    }
    counts
}

fn cook(hypothesis: &str, references: &[&str]) -> Cooked {
    let ref_words: Vec<Vec<&str>> = references.iter().map(|r| py_split(r).collect()).collect();
    let mut max_counts: HashMap<&[&str], usize> = HashMap::new();
    for words in &ref_words {
        for (g, c) in ngram_counts(words) {
            let e = max_counts.entry(g).or_insert(0);
            *e = (*e).max(c);
        }
    }
    let hyp_words: Vec<&str> = py_split(hypothesis).collect();
    let testlen = hyp_words.len();
    // min((abs(l-testlen), l) for l in reflen)[1]
    let reflen = ref_words
        .iter()
        .map(|w| w.len())
        .min_by_key(|&l| (l.abs_diff(testlen), l))
        .unwrap_or(0);
    let mut guess = [0; N];
    for (k, g) in guess.iter_mut().enumerate() {
        *g = (testlen + 1).saturating_sub(k + 1);
    }
    let mut correct = [0; N];
    for (g, c) in ngram_counts(&hyp_words) {
        correct[g.len() - 1] += c.min(max_counts.get(g).copied().unwrap_or(0));
    }
    Cooked {
        testlen,
        reflen,
        guess,
        correct,
    }
}

fn bleu_from_counts(
    correct: &[usize; N],
    guess: &[usize; N],
    testlen: f64,
    reflen: f64,
) -> [f64; N] {
    let mut out = [0.0; N];
    let mut bleu = 1.0f64;
    for k in 0..N {
        bleu *= (correct[k] as f64 + TINY) / (guess[k] as f64 + SMALL);
        out[k] = bleu.powf(1.0 / (k as f64 + 1.0));
    }
    let ratio = (testlen + TINY) / (reflen + SMALL);
    if ratio < 1.0 {
        let bp = (1.0 - 1.0 / ratio).exp();
        for v in &mut out {
            *v *= bp;
        }
    }
    out
}

/// BLEU scores of a set of images.
#[derive(Debug, Clone, PartialEq)]
pub struct BleuScores {
    /// Corpus `Bleu_1`..`Bleu_4`.
    pub corpus: [f64; N],
    /// Per image, `[Bleu_1, .., Bleu_4]`, in input order.
    pub per_image: Vec<[f64; N]>,
}

/// Compute BLEU-1..4 for `(hypothesis, references)` pairs of tokenised strings.
///
/// Every image needs at least one reference (pycocoevalcap asserts it); an
/// image without references is scored against an empty reference here.
pub fn bleu<S: AsRef<str>>(items: &[(S, Vec<S>)]) -> BleuScores {
    let mut per_image = Vec::with_capacity(items.len());
    let mut total_correct = [0usize; N];
    let mut total_guess = [0usize; N];
    let (mut total_test, mut total_ref) = (0usize, 0usize);
    for (hyp, refs) in items {
        let refs: Vec<&str> = refs.iter().map(AsRef::as_ref).collect();
        let c = cook(hyp.as_ref(), &refs);
        total_test += c.testlen;
        total_ref += c.reflen;
        for k in 0..N {
            total_correct[k] += c.correct[k];
            total_guess[k] += c.guess[k];
        }
        per_image.push(bleu_from_counts(
            &c.correct,
            &c.guess,
            c.testlen as f64,
            c.reflen as f64,
        ));
    }
    let corpus = bleu_from_counts(
        &total_correct,
        &total_guess,
        total_test as f64,
        total_ref as f64,
    );
    BleuScores { corpus, per_image }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_is_one() {
        let s = bleu(&[("a b c d e", vec!["a b c d e", "x y"])]);
        for v in s.corpus {
            assert!((v - 1.0).abs() < 1e-9);
        }
    }

    #[test]
    fn closest_reference_length_prefers_shorter_on_ties() {
        let c = cook("a b c", &["a b", "a b c d"]);
        assert_eq!(c.reflen, 2);
        assert_eq!(c.guess, [3, 2, 1, 0]);
    }

    #[test]
    fn clipping_uses_max_single_reference_count() {
        let c = cook("the the the", &["the cat", "the the dog"]);
        assert_eq!(c.correct[0], 2);
    }
}
