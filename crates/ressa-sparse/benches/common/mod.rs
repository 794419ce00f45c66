//! What both kernel benches share: the FlanT5-XL FFN-sized weight and its random masks.

use rand::Rng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use ressa_sparse::{Mask, SparsityPattern};

/// Inputs of the benched weight (burn `[d_in, d_out]`).
pub const D_IN: usize = 2048;
/// Outputs of the benched weight.
pub const D_OUT: usize = 5120;
/// Tokens per product: decode-like 1, 4, 8 and a prefill-like 64.
pub const TOKENS: [usize; 4] = [1, 4, 8, 64];

/// Random `[D_IN, D_OUT]` weight and a random mask of the pattern, applied.
pub fn weight(rng: &mut StdRng, pattern: SparsityPattern, sparsity: f64) -> (Vec<f32>, Mask) {
    let keep: Vec<bool> = match pattern {
        SparsityPattern::Unstructured => (0..D_IN * D_OUT)
            .map(|_| rng.random::<f64>() >= sparsity)
            .collect(),
        SparsityPattern::NM { n, m } => {
            let mut keep = vec![true; D_IN * D_OUT];
            let mut pos: Vec<usize> = (0..m).collect();
            for j in 0..D_OUT {
                for g in 0..D_IN / m {
                    pos.shuffle(rng);
                    for &p in &pos[..n] {
                        keep[(g * m + p) * D_OUT + j] = false;
                    }
                }
            }
            keep
        }
    };
    let mask = Mask::from_bools(D_IN, D_OUT, &keep).unwrap();
    let mut w: Vec<f32> = (0..D_IN * D_OUT)
        .map(|_| rng.random::<f32>() - 0.5)
        .collect();
    mask.apply(&mut w).unwrap();
    (w, mask)
}
