//! Models for ressa: vision-language model families (InstructBLIP / BLIP-2 over T5 or LLaMA,
//! LLaVA-1.5),
//! loaded from and saved to HF checkpoint directories, generic over the burn backend.
//!
//! The seams: [`lm::LanguageModel`] (a language model behind the projection),
//! [`vlm::VisionLanguageModel`] (a family: what commands, trainer and runner use),
//! [`prunable::Prunable`] (stacks of blocks of linears, for calibration) and the registry in
//! [`family`] that maps a `config.json` to a family's type.

pub mod clip;
pub mod config;
pub mod error;
pub mod family;
pub mod generate;
pub mod instructblip;
pub mod linear;
pub mod llama;
pub mod llava;
pub mod lm;
pub mod nn;
pub mod ops;
pub mod parallel;
pub mod pretrained;
pub mod processor;
pub mod prunable;
pub mod qformer;
pub mod sparse_kernels;
pub mod streaming;
pub mod t5;
pub mod vit;
pub mod vlm;
pub mod weights;

pub use config::{Architecture, InstructBlipConfig, LlamaConfig, LmConfig, T5Config};
pub use error::{ModelError, Result};
pub use family::{AutodiffFamilyVisitor, FamilyVisitor, visit_family, visit_family_autodiff};
pub use instructblip::{EncoderOutputs, InstructBlip, InstructBlipLlama, InstructBlipT5};
pub use llava::{Llava, LlavaConfig};
pub use lm::{LanguageModel, LmInput, SpecialTokens, TeacherForced};
pub use pretrained::Pretrained;
pub use processor::{Processor, resolve_model_dir};
pub use vlm::{FamilyConfig, InputSpec, VisionLanguageModel, VlmInputs};
