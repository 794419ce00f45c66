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

/// Parses the JSON `text` of `path`; a type error names the field it is in (`[3].question_id`).
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(
    text: &str,
    path: &std::path::Path,
) -> Result<T> {
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| json_error(path, e))
}

/// [`parse_json`] of an already parsed value.
pub(crate) fn from_value<T: serde::de::DeserializeOwned>(
    value: serde_json::Value,
    path: &std::path::Path,
) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| json_error(path, e))
}

fn json_error(
    path: &std::path::Path,
    e: serde_path_to_error::Error<serde_json::Error>,
) -> DataError {
    let field = e.path().to_string();
    let error = e.into_inner();
    if field.is_empty() || field == "." || error.is_syntax() || error.is_eof() {
        DataError::Json {
            path: path.to_path_buf(),
            error,
        }
    } else {
        DataError::Field {
            path: path.to_path_buf(),
            field,
            message: error.to_string(),
        }
    }
}
