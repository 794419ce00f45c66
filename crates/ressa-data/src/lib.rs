//! Data pipelines for ressa: images as HF image processors prepare them, and text through
//! `tokenizers`, each reading the files of an HF model directory; readers for the LAVIS
//! annotation formats, prompt templates, calibration sampling and the CC3M prefix split, the
//! training augmentation, a background batching loader, and the procedural `shapes` dataset.

pub mod augment;
pub mod calibration;
pub mod error;
pub mod image;
pub mod lavis;
pub mod loader;
pub mod prompts;
pub mod rng;
pub mod scenes;
pub mod shapes;
pub mod text;

pub use error::{DataError, Result};
