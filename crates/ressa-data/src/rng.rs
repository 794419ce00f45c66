//! Per-item random streams: an item's randomness depends only on (seed, stream, index), never
//! on thread scheduling or on which items were drawn before, so a background loader with many
//! workers is as reproducible as a sequential one.

use rand::SeedableRng;
use rand::rngs::StdRng;

/// Streams, so that e.g. the crop of item 3 and the caption split of item 3 are independent.
pub mod stream {
    /// Random resized crop + flip ([`crate::augment`]).
    pub const AUGMENT: u64 = 1;
    /// CC3M prefix split ([`crate::calibration`]).
    pub const PREFIX_SPLIT: u64 = 2;
    /// Sampling N of M items ([`crate::calibration::Sampler`]).
    pub const SAMPLER: u64 = 3;
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A ChaCha12 generator (rand's `StdRng`) seeded from `(seed, stream, index)`.
pub fn item_rng(seed: u64, stream: u64, index: u64) -> StdRng {
    let mut state = seed;
    let mut key = [0u8; 32];
    let words = [
        splitmix64(&mut state),
        splitmix64(&mut state) ^ stream.wrapping_mul(0xD6E8_FEB8_6659_FD93),
        splitmix64(&mut state) ^ index,
        splitmix64(&mut state),
    ];
    for (chunk, w) in key.chunks_exact_mut(8).zip(words) {
        chunk.copy_from_slice(&w.to_le_bytes());
    }
    StdRng::from_seed(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a: u64 = item_rng(7, 1, 3).random();
        assert_eq!(a, item_rng(7, 1, 3).random::<u64>());
        assert_ne!(a, item_rng(7, 1, 4).random::<u64>());
        assert_ne!(a, item_rng(7, 2, 3).random::<u64>());
        assert_ne!(a, item_rng(8, 1, 3).random::<u64>());
    }
}
