//! Data pipelines for ressa: images as HF image processors prepare them, and text through
//! `tokenizers`, each reading the files of an HF model directory.

pub mod error;
pub mod image;
pub mod lavis;
pub mod text;

pub use error::{DataError, Result};
