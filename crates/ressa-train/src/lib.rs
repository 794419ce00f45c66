//! RESSA repair (arXiv 2404.02424): SparseLoRA adapters on a pruned model, trained with task
//! loss plus KL distillation from the dense path of the same weights, merged back with exactly
//! the pruned zeros.
//!
//! - [`sparse_lora`]: which linears get adapters (per tower), attach / merge / PEFT export.
//! - [`distill`]: `(1 − λ)·CE + λ·KL(teacher ‖ student)`.
//! - [`adamw`], [`checkpoint`], [`trainer`]: the loop, exact resume.
//! - [`parallel`]: data-parallel training over N peers on burn's collective all-reduce.
//! - [`repair`]: a whole run from directories and a TOML config (`ressa repair`).

pub mod adamw;
pub mod checkpoint;
pub mod cluster;
pub mod distill;
pub mod error;
pub mod parallel;
pub mod pretrain;
pub mod repair;
pub mod sparse_lora;
pub mod trainer;

pub use cluster::Cluster;
pub use distill::{DistillConfig, KlReduction};
pub use error::TrainError;
pub use sparse_lora::{AdapterConfig, TowerLora};
pub use trainer::{TrainConfig, TrainData, TrainEvent, TrainReport, train, train_on};
