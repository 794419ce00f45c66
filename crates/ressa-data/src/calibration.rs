//! Calibration data (reference §6): which annotations to use ([`Sampler`]) and the CC3M prefix
//! split of `PrefixLanguagePretrainingDataset` ([`prefix_split`], [`prefix_examples`]).
//!
//! The reference takes the **first** 128 annotations of the CC3M list in file order (no
//! shuffling; [`Sampler::First`]). [`Sampler::Random`] draws N distinct items with a seed for
//! the peer convention. The split position is `random.randint(1, len(caption) // 2)` over the
//! caption's characters after LAVIS' `blip_caption` processing; Python's global `random` state
//! cannot be reproduced, so positions come from a per-item seeded stream instead
//! ([`crate::rng::item_rng`]): the same seed gives the same splits on every run and every
//! thread count.

use std::path::Path;

use rand::Rng;

use crate::error::{DataError, Result};
use crate::lavis::{CaptionItem, image_path};
use crate::loader::Example;
use crate::prompts::{MAX_WORDS, pre_caption};
use crate::rng::{item_rng, stream};

/// Which N of the annotations to calibrate on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sampler {
    /// The first N in file order (the reference's behaviour).
    First(usize),
    /// N distinct items drawn uniformly with `seed`, in draw order.
    Random { n: usize, seed: u64 },
}

impl Sampler {
    /// How many items the sampler takes.
    pub fn n(&self) -> usize {
        match *self {
            Sampler::First(n) | Sampler::Random { n, .. } => n,
        }
    }

    /// Indices into a list of `len` items; asking for more than there are is an error.
    pub fn indices(&self, len: usize) -> Result<Vec<usize>> {
        let n = self.n();
        if n == 0 {
            return Err(DataError::Input(
                "the number of calibration samples must be at least 1".into(),
            ));
        }
        if n > len {
            return Err(DataError::Input(format!(
                "asked for {n} calibration samples but the annotation list has only {len}"
            )));
        }
        Ok(match *self {
            Sampler::First(n) => (0..n).collect(),
            Sampler::Random { n, seed } => {
                let mut rng = item_rng(seed, stream::SAMPLER, 0);
                rand::seq::index::sample(&mut rng, len, n).into_vec()
            }
        })
    }
}

/// Cuts `caption` at a character position `split ∈ [1, len/2]` drawn from `rng`: returns
/// (`caption[:split]`, `caption[split:]`). `None` when the caption has fewer than 2 characters
/// (Python's `randint(1, 0)` raises there).
pub fn prefix_split<R: Rng + ?Sized>(caption: &str, rng: &mut R) -> Option<(String, String)> {
    let len = caption.chars().count();
    if len < 2 {
        return None;
    }
    let split = rng.random_range(1..=len / 2);
    let byte = caption
        .char_indices()
        .nth(split)
        .map_or(caption.len(), |(b, _)| b);
    Some((caption[..byte].to_string(), caption[byte..].to_string()))
}

/// A caption that could not be split (too short after processing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedCaption {
    /// Index in the annotation list.
    pub index: usize,
    pub caption: String,
}

/// Calibration examples and the items left out.
#[derive(Debug, Clone)]
pub struct PrefixSet {
    pub examples: Vec<Example>,
    /// Annotation index of each example.
    pub indices: Vec<usize>,
    /// Captions shorter than 2 characters after processing: counted, reported, not fatal.
    pub skipped: Vec<SkippedCaption>,
}

/// The prefix calibration set of `items[indices]`: image path under `root`, caption processed
/// with `pre_caption` and split with the item's seeded stream (`seed`, annotation index).
/// `annotations` only labels errors.
pub fn prefix_examples(
    items: &[CaptionItem],
    indices: &[usize],
    root: &Path,
    annotations: &Path,
    seed: u64,
) -> Result<PrefixSet> {
    let mut set = PrefixSet {
        examples: Vec::with_capacity(indices.len()),
        indices: Vec::with_capacity(indices.len()),
        skipped: Vec::new(),
    };
    for &i in indices {
        let item = items.get(i).ok_or_else(|| {
            DataError::Input(format!(
                "calibration index {i} is outside the {} annotations",
                items.len()
            ))
        })?;
        let caption = pre_caption(&item.caption, MAX_WORDS);
        let mut rng = item_rng(seed, stream::PREFIX_SPLIT, i as u64);
        match prefix_split(&caption, &mut rng) {
            Some((input, output)) => {
                set.examples.push(Example {
                    image: image_path(root, &item.image, annotations)?,
                    text_input: input,
                    text_output: Some(output),
                });
                set.indices.push(i);
            }
            None => set.skipped.push(SkippedCaption { index: i, caption }),
        }
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_and_random_samplers() {
        assert_eq!(Sampler::First(3).indices(10).unwrap(), vec![0, 1, 2]);
        let r = Sampler::Random { n: 4, seed: 0 }.indices(10).unwrap();
        assert_eq!(r.len(), 4);
        let mut sorted = r.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 4, "distinct: {r:?}");
        assert!(r.iter().all(|&i| i < 10));
        assert_eq!(r, Sampler::Random { n: 4, seed: 0 }.indices(10).unwrap());
        assert_ne!(r, Sampler::Random { n: 4, seed: 1 }.indices(10).unwrap());
        let err = Sampler::First(128).indices(50).unwrap_err().to_string();
        assert!(err.contains("128") && err.contains("50"), "{err}");
        assert!(Sampler::First(0).indices(5).is_err());
    }

    #[test]
    fn split_positions_cover_one_to_half_the_length() {
        let caption = "a dog runs"; // 10 characters: split in 1..=5
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..200 {
            let mut rng = item_rng(1, stream::PREFIX_SPLIT, i);
            let (a, b) = prefix_split(caption, &mut rng).unwrap();
            assert_eq!(format!("{a}{b}"), caption);
            seen.insert(a.chars().count());
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
        let mut rng = item_rng(1, 2, 0);
        assert_eq!(prefix_split("ab", &mut rng), Some(("a".into(), "b".into())));
        assert_eq!(prefix_split("a", &mut rng), None);
        // Characters, not bytes.
        for i in 0..50 {
            let mut rng = item_rng(2, stream::PREFIX_SPLIT, i);
            let (a, b) = prefix_split("éèêëàâ", &mut rng).unwrap();
            assert!((1..=3).contains(&a.chars().count()));
            assert_eq!(a.chars().count() + b.chars().count(), 6);
        }
    }

    #[test]
    fn prefix_examples_are_seeded_and_skip_short_captions() {
        let items = vec![
            CaptionItem {
                image: "a.jpg".into(),
                caption: "A Red Circle.".into(),
            },
            CaptionItem {
                image: "b.jpg".into(),
                caption: "!".into(),
            },
            CaptionItem {
                image: "c.jpg".into(),
                caption: "two blue squares on grass".into(),
            },
        ];
        let root = Path::new("/data/cc3m");
        let ann = Path::new("cc3m.json");
        let set = prefix_examples(&items, &[0, 1, 2], root, ann, 5).unwrap();
        assert_eq!(set.indices, vec![0, 2]);
        assert_eq!(set.skipped.len(), 1);
        assert_eq!(set.skipped[0].index, 1);
        let ex = &set.examples[0];
        assert_eq!(ex.image, root.join("a.jpg"));
        let out = ex.text_output.clone().unwrap();
        assert_eq!(format!("{}{}", ex.text_input, out), "a red circle");
        let again = prefix_examples(&items, &[0, 1, 2], root, ann, 5).unwrap();
        assert_eq!(again.examples, set.examples);
    }
}
