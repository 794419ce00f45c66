//! The registry of model families: the one place that maps a `config.json` to a Rust type.
//! Commands are written once, generic over [`VisionLanguageModel`], as a visitor; the registry
//! reads the config's `model_type` (and `text_config.model_type`) and calls the visitor with
//! the family's type. Adding a family is its own file plus a line in [`families!`].

use std::path::Path;

use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use crate::config::peek_model_types;
use crate::error::{ModelError, Result};
use crate::instructblip::{InstructBlipLlama, InstructBlipT5};
use crate::llava::Llava;
use crate::ops::{AutodiffDenseBackend, DenseBackend};
use crate::vlm::VisionLanguageModel;

/// A job generic over the model family.
pub trait FamilyVisitor<B: Backend> {
    type Output;
    fn visit<M: VisionLanguageModel<B>>(self, config: M::Config) -> Self::Output;
}

/// A job that trains: the family's autodiff type and its inner (inference) type.
pub trait AutodiffFamilyVisitor<B: AutodiffBackend> {
    type Output;
    fn visit<M>(self, config: M::Config) -> Self::Output
    where
        M: VisionLanguageModel<B> + AutodiffModule<B>,
        M::InnerModule: VisionLanguageModel<B::InnerBackend, Config = M::Config>;
}

/// The registered families: (`model_type`s, `text_config.model_type`, type, description).
macro_rules! families {
    ($top:expr, $text:expr, $path:expr, |$m:ident| $call:expr) => {{
        match ($top, $text) {
            ("instructblip" | "blip-2" | "blip_2", "t5") => {
                type $m<B> = InstructBlipT5<B>;
                $call
            }
            ("instructblip" | "blip-2" | "blip_2", "llama") => {
                type $m<B> = InstructBlipLlama<B>;
                $call
            }
            ("llava", "llama") => {
                type $m<B> = Llava<B>;
                $call
            }
            (top, text) => Err(unknown(top, text, $path)),
        }
    }};
}

/// The `(model_type, text_config.model_type)` pairs ressa reads, for messages and docs.
pub const FAMILIES: &[(&str, &str, &str)] = &[
    (
        "instructblip / blip-2",
        "t5",
        "InstructBLIP / BLIP-2 with FlanT5",
    ),
    (
        "instructblip",
        "llama",
        "InstructBLIP with a LLaMA-family (Vicuna) decoder",
    ),
    (
        "llava",
        "llama",
        "LLaVA-1.5: CLIP vision tower, MLP projector, LLaMA-family (Vicuna) decoder",
    ),
];

fn unknown(top: &str, text: &str, path: &Path) -> ModelError {
    let known: Vec<String> = FAMILIES
        .iter()
        .map(|(t, l, _)| format!("{t} + {l}"))
        .collect();
    ModelError::config(
        path,
        "model_type",
        format!(
            "`{top}` with text_config.model_type `{text}` is not a supported family ({})",
            known.join(", ")
        ),
    )
}

fn read(path: &Path) -> Result<(String, String, String)> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    let (top, lm) = peek_model_types(&text, path)?;
    Ok((text, top, lm))
}

/// Reads `config_path`, finds its family and runs `visitor` with the family's type and
/// parsed configuration.
pub fn visit_family<B: DenseBackend, V: FamilyVisitor<B>>(
    config_path: &Path,
    visitor: V,
) -> Result<V::Output> {
    let (text, top, lm) = read(config_path)?;
    families!(top.as_str(), lm.as_str(), config_path, |M| {
        let cfg = <M<B> as VisionLanguageModel<B>>::Config::from_json(&text, config_path)?;
        Ok(visitor.visit::<M<B>>(cfg))
    })
}

/// [`visit_family`] for jobs that train on an autodiff backend.
pub fn visit_family_autodiff<B: AutodiffDenseBackend, V: AutodiffFamilyVisitor<B>>(
    config_path: &Path,
    visitor: V,
) -> Result<V::Output> {
    let (text, top, lm) = read(config_path)?;
    families!(top.as_str(), lm.as_str(), config_path, |M| {
        let cfg = <M<B> as VisionLanguageModel<B>>::Config::from_json(&text, config_path)?;
        Ok(visitor.visit::<M<B>>(cfg))
    })
}

/// The family's description (`inspect`), or an error naming what is supported.
pub fn describe(config_path: &Path) -> Result<&'static str> {
    let (_, top, lm) = read(config_path)?;
    let found = FAMILIES
        .iter()
        .find(|(t, l, _)| t.split(" / ").any(|t| t == top) && *l == lm);
    match (found, top.as_str()) {
        (Some((_, _, d)), _) => Ok(d),
        (None, "blip_2") if lm == "t5" => Ok(FAMILIES[0].2),
        _ => Err(unknown(&top, &lm, config_path)),
    }
}
