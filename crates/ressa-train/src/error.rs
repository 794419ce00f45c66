//! One error type for the training crate; every message is one line naming the file, the
//! field or the step it is about. Errors of the model and data crates are kept as the cause.

use std::path::PathBuf;

/// What can go wrong while setting up, running or saving a repair.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A setting out of range; the message starts with the field's name.
    #[error("{message}")]
    Config { field: String, message: String },
    /// A file that cannot be read or written, or holds something else than expected.
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    /// Training diverged: nothing non-finite is ever written.
    #[error(
        "step {step}: the {what} is {value}; training stopped (the last good checkpoint is kept, no model was written)"
    )]
    NonFinite {
        step: u64,
        what: &'static str,
        value: f64,
    },
    #[error(transparent)]
    Model(#[from] ressa_models::ModelError),
    #[error(transparent)]
    Data(#[from] ressa_data::DataError),
    #[error("{0}")]
    Input(String),
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;

impl TrainError {
    pub(crate) fn config(field: &str, message: impl Into<String>) -> Self {
        TrainError::Config {
            field: field.to_string(),
            message: message.into(),
        }
    }

    pub(crate) fn file(path: &std::path::Path, message: impl std::fmt::Display) -> Self {
        TrainError::File {
            path: path.to_path_buf(),
            message: message.to_string(),
        }
    }
}
