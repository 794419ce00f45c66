//! The crate's error type; every message is one line and names the file or field.

use std::path::PathBuf;

use crate::results::ValidationError;

/// A report error.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `results.json` is not valid JSON or does not match the schema.
    #[error("{}: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// serde_json's error, with line and column.
        source: serde_json::Error,
    },
    /// The results parsed but break the schema's rules.
    #[error("results: {0}")]
    Invalid(#[from] ValidationError),
    /// A plot could not be drawn or encoded.
    #[error("{}: {message}", path.display())]
    Plot {
        /// The PNG it was meant for.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}
