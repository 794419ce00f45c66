//! One error type for the model crate. Every message is one line and names the file and the
//! key or field it is about.

use std::path::PathBuf;

/// What can go wrong while reading, building, running or writing a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    // The cause is part of the message (not a `source`), so error chains print it once.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: invalid JSON: {error}")]
    Json {
        path: PathBuf,
        error: serde_json::Error,
    },
    #[error("{path}: field `{field}`: {message}")]
    Config {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("{path}: missing tensor `{key}`")]
    MissingKey { path: PathBuf, key: String },
    #[error("{path}: tensor `{key}` has shape {found:?}, expected {expected:?}")]
    Shape {
        path: PathBuf,
        key: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error(
        "{path}: tensor `{key}` has dtype {dtype}, expected a float type (F32, F16, BF16, F64)"
    )]
    Dtype {
        path: PathBuf,
        key: String,
        dtype: String,
    },
    #[error("{0}")]
    Input(String),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            error: source,
        }
    }

    pub(crate) fn config(
        path: impl Into<PathBuf>,
        field: &str,
        message: impl Into<String>,
    ) -> Self {
        ModelError::Config {
            path: path.into(),
            field: field.to_string(),
            message: message.into(),
        }
    }
}

/// Parses the JSON `text` of `path`; a type error names the field it is in.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(
    text: &str,
    path: &std::path::Path,
) -> Result<T> {
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| json_error(path, "", e))
}

/// A `serde_path_to_error` failure as an error naming `prefix` + the field path.
pub(crate) fn json_error(
    path: &std::path::Path,
    prefix: &str,
    e: serde_path_to_error::Error<serde_json::Error>,
) -> ModelError {
    let at = e.path().to_string();
    let error = e.into_inner();
    let field = match (prefix, at.as_str()) {
        (p, "" | ".") => p.to_string(),
        ("", a) => a.to_string(),
        (p, a) => format!("{p}.{a}"),
    };
    if field.is_empty() || error.is_syntax() || error.is_eof() {
        ModelError::Json {
            path: path.to_path_buf(),
            error,
        }
    } else {
        ModelError::Config {
            path: path.to_path_buf(),
            field,
            message: error.to_string(),
        }
    }
}
