//! One-line errors that name the file and the field.
//!
//! The underlying I/O and JSON errors are part of the message and deliberately not exposed as
//! `source()`: printing an error chain (`anyhow`'s `{:#}`) would otherwise repeat them.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {}", json_message(error))]
    Json {
        path: PathBuf,
        error: serde_json::Error,
    },
    #[error("{path}: field `{field}`: {message}")]
    Field {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("{path}: cannot decode image: {message}")]
    Image { path: PathBuf, message: String },
    #[error("{path}: cannot load tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("{0}")]
    Input(String),
}

/// serde_json's message (with line and column), prefixed with "invalid JSON" for syntax errors
/// and a premature end; a well-formed file with a missing or mistyped field reads as such.
fn json_message(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof => format!("invalid JSON: {e}"),
        Category::Data | Category::Io => e.to_string(),
    }
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;
