//! The crate's error type. Every message is one line and names the file
//! involved; JSON errors carry serde_json's line and column.

use std::path::{Path, PathBuf};

/// An evaluation error.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A file could not be read.
    // The cause is part of the message (not a `source`), so error chains print it once.
    #[error("{}: cannot read: {error}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        error: std::io::Error,
    },
    /// A file is not valid JSON or does not have the expected shape.
    #[error("{}: {error}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// serde_json's error, which includes line and column.
        error: serde_json::Error,
    },
    /// A file parsed but its content is unusable (missing ids, empty lists, ...).
    #[error("{}: {message}", path.display())]
    Invalid {
        /// The file the problem was found in.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The inputs given do not fit the task (wrong number or kind of files).
    #[error("{0}")]
    Usage(String),
}

impl EvalError {
    pub(crate) fn invalid(path: &Path, message: impl Into<String>) -> Self {
        let message: String = message.into();
        Self::Invalid {
            path: path.to_path_buf(),
            // Keep errors on one line whatever ids or strings they quote.
            message: message.replace(['\n', '\r'], " "),
        }
    }
}
