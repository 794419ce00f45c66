//! Models for ressa: the EVA ViT, the Q-Former and T5 or LLaMA, composed into InstructBLIP /
//! BLIP-2, loaded from and saved to HF checkpoint directories. Generic over the burn backend.

pub mod config;
pub mod error;
pub mod generate;
pub mod instructblip;
pub mod linear;
pub mod llama;
pub mod nn;
pub mod prunable;
pub mod qformer;
pub mod sparse_kernels;
pub mod t5;
pub mod vit;
pub mod weights;

pub use config::{Architecture, ModelConfig};
pub use error::{ModelError, Result};
pub use instructblip::{EncoderOutputs, InstructBlip, Pretrained, VlmInputs};
