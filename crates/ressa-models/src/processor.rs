//! The processor: the counterpart of `transformers`' `InstructBlipProcessor` /
//! `LlavaProcessor`, opened from a model directory. It holds the image preprocessing and the
//! tokenizers, checks them against the model ([`InputSpec`]), and builds every kind of batch
//! the commands need — generation, teacher-forced training and calibration samples — for any
//! family. The CLI, the trainer and the experiment runner all go through it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::prelude::*;
use ressa_data::image::{ImageProcessorConfig, load_rgb};
use ressa_data::loader::{Batch, TextEncoder, Texts};
use ressa_data::text::{Batch as TokenBatch, TextTokenizer};

use crate::error::{ModelError, Result};
use crate::lm::{LanguageModel, Padding};
use crate::nn::ids_tensor;
use crate::prunable::CalibrationSample;
use crate::vlm::{InputSpec, VisionLanguageModel, VlmInputs};

/// LAVIS' `max_txt_len`: the Q-Former tokenizer truncates the instruction to this many tokens.
pub const QFORMER_MAX_TXT_LEN: usize = 128;

/// Image preprocessing and tokenizers of one model directory.
#[derive(Clone)]
pub struct Processor {
    pub dir: PathBuf,
    pub image: ImageProcessorConfig,
    pub tokenizer: Arc<TextTokenizer>,
    /// The Q-Former's tokenizer (InstructBLIP), truncating from the left as LAVIS does.
    pub qformer: Option<Arc<TextTokenizer>>,
    pub spec: InputSpec,
}

fn data_err(e: ressa_data::DataError) -> ModelError {
    ModelError::Input(e.to_string())
}

impl Processor {
    /// Opens `preprocessor_config.json`, `tokenizer.json` and (when the model's Q-Former reads
    /// text) `qformer_tokenizer/tokenizer.json` of `dir`, and checks them against `spec`: the
    /// image size, and every tokenizer id within the model's vocabulary.
    pub fn open(dir: &Path, spec: &InputSpec) -> Result<Self> {
        let image = ImageProcessorConfig::from_file_for(
            &dir.join("preprocessor_config.json"),
            spec.image_size,
        )
        .map_err(data_err)?;
        let path = dir.join("tokenizer.json");
        let tokenizer = TextTokenizer::from_file(&path).map_err(data_err)?;
        check_vocab(&tokenizer, spec.vocab_size, "text_config.vocab_size")?;
        let qformer = match spec.qformer_text {
            Some((vocab, positions)) => {
                let path = dir.join("qformer_tokenizer").join("tokenizer.json");
                let t = TextTokenizer::from_file(&path)
                    .and_then(|t| t.with_truncation(QFORMER_MAX_TXT_LEN.min(positions), true))
                    .map_err(data_err)?;
                check_vocab(&t, vocab, "qformer_config.vocab_size")?;
                Some(Arc::new(t))
            }
            None => None,
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            image,
            tokenizer: Arc::new(tokenizer),
            qformer,
            spec: spec.clone(),
        })
    }

    /// [`Processor::open`] for a loaded model.
    pub fn for_model<B: Backend, M: VisionLanguageModel<B>>(dir: &Path, model: &M) -> Result<Self> {
        Self::open(dir, &model.input_spec())
    }

    /// What the background loader tokenizes: the prompt, the Q-Former instruction (when read)
    /// and, with `targets`, the target text.
    pub fn texts(&self, targets: bool) -> Texts {
        let lm = TextEncoder {
            tokenizer: Arc::clone(&self.tokenizer),
            pad: self.spec.tokens.pad,
        };
        Texts {
            input: Some(lm.clone()),
            qformer: self.qformer.as_ref().map(|t| TextEncoder {
                tokenizer: Arc::clone(t),
                pad: t.pad_id().unwrap_or(0),
            }),
            output: targets.then_some(lm),
        }
    }

    /// Prompt ids as the model lays them out: `<image>` expanded into the placeholder count
    /// (LLaVA); a prompt without one gets it in front. An empty prompt is an error.
    fn prompt_ids(&self, ids: Vec<u32>) -> Result<Vec<u32>> {
        if ids.is_empty() {
            return Err(ModelError::Input(
                "the prompt is empty: give at least one token".into(),
            ));
        }
        let Some((image_id, count)) = self.spec.image_tokens else {
            return Ok(ids);
        };
        let n = ids.iter().filter(|&&t| t == image_id).count();
        if n > 1 {
            return Err(ModelError::Input(format!(
                "the prompt holds {n} image tokens; this model takes one image per prompt"
            )));
        }
        let mut out = Vec::with_capacity(ids.len() + count);
        if n == 0 {
            out.extend(std::iter::repeat_n(image_id, count));
            out.extend(ids);
        } else {
            for t in ids {
                if t == image_id {
                    out.extend(std::iter::repeat_n(image_id, count));
                } else {
                    out.push(t);
                }
            }
        }
        Ok(out)
    }

    /// Pads token rows (right), expanded per [`Processor::prompt_ids`], on `side`.
    fn pad_rows(&self, rows: Vec<Vec<u32>>, side: Padding) -> Result<TokenBatch> {
        let rows: Vec<Vec<u32>> = rows
            .into_iter()
            .map(|r| self.prompt_ids(r))
            .collect::<Result<_>>()?;
        let len = rows.iter().map(Vec::len).max().unwrap_or(0);
        let pad = self.spec.tokens.pad;
        let mut batch = TokenBatch {
            mask: rows
                .iter()
                .map(|r| (0..len).map(|i| u32::from(i < r.len())).collect())
                .collect(),
            ids: rows
                .into_iter()
                .map(|mut r| {
                    r.resize(len, pad);
                    r
                })
                .collect(),
        };
        if side == Padding::Left {
            batch = batch.left_padded();
        }
        Ok(batch)
    }

    /// Model inputs from decoded images and prompts (and the Q-Former's instructions; the
    /// prompts when `None`), padded for generation.
    pub fn inputs<B: Backend>(
        &self,
        pixels: &[Vec<f32>],
        prompts: &[&str],
        qformer_prompts: Option<&[&str]>,
        device: &B::Device,
    ) -> Result<VlmInputs<B>> {
        let ids: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| self.tokenizer.encode(p).map_err(data_err))
            .collect::<Result<_>>()?;
        let qformer = match &self.qformer {
            Some(t) => Some(
                qformer_prompts
                    .unwrap_or(prompts)
                    .iter()
                    .map(|p| t.encode(p).map_err(data_err))
                    .collect::<Result<Vec<_>>>()?,
            ),
            None => None,
        };
        let (h, w) = self.image.output_size();
        self.tensors(
            pixels.concat(),
            (h, w),
            ids,
            qformer,
            self.spec.padding,
            device,
        )
    }

    /// Inputs of `pixels` (one image file) and `prompt`, for `ressa generate`.
    pub fn image_inputs<B: Backend>(
        &self,
        image: &Path,
        prompt: &str,
        qformer_prompt: Option<&str>,
        device: &B::Device,
    ) -> Result<VlmInputs<B>> {
        let img = load_rgb(image).map_err(data_err)?;
        let pixels = self.image.preprocess(&img);
        let q = qformer_prompt.map(|q| vec![q]);
        self.inputs(&[pixels], &[prompt], q.as_deref(), device)
    }

    fn tensors<B: Backend>(
        &self,
        pixels: Vec<f32>,
        (h, w): (usize, usize),
        prompts: Vec<Vec<u32>>,
        qformer: Option<Vec<Vec<u32>>>,
        side: Padding,
        device: &B::Device,
    ) -> Result<VlmInputs<B>> {
        let b = prompts.len();
        if b == 0 {
            return Err(ModelError::Input("the batch is empty".into()));
        }
        let prompt = self.pad_rows(prompts, side)?;
        let qformer_text = match (qformer, &self.qformer) {
            (Some(rows), Some(t)) => {
                let pad = t.pad_id().unwrap_or(0);
                let len = rows.iter().map(Vec::len).max().unwrap_or(0);
                let mask: Vec<Vec<u32>> = rows
                    .iter()
                    .map(|r| (0..len).map(|i| u32::from(i < r.len())).collect())
                    .collect();
                let ids: Vec<Vec<u32>> = rows
                    .into_iter()
                    .map(|mut r| {
                        r.resize(len, pad);
                        r
                    })
                    .collect();
                Some((
                    ids_tensor::<B>(&ids, device),
                    mask_tensor::<B>(&mask, device),
                ))
            }
            _ => None,
        };
        Ok(VlmInputs {
            pixel_values: Tensor::from_data(TensorData::new(pixels, [b, 3, h, w]), device),
            qformer_text,
            input_ids: ids_tensor::<B>(&prompt.ids, device),
            attention_mask: mask_tensor::<B>(&prompt.mask, device),
        })
    }

    /// A loader batch (tokenized by [`Processor::texts`]) as generation inputs: the prompt
    /// padded on the language model's side.
    pub fn batch_inputs<B: Backend>(
        &self,
        batch: &Batch,
        device: &B::Device,
    ) -> Result<VlmInputs<B>> {
        self.batch_tensors(batch, self.spec.padding, device)
    }

    fn batch_tensors<B: Backend>(
        &self,
        batch: &Batch,
        side: Padding,
        device: &B::Device,
    ) -> Result<VlmInputs<B>> {
        let input = batch
            .input
            .as_ref()
            .ok_or_else(|| ModelError::Input("the batch has no prompt tokens".into()))?;
        let prompts = unpad(input);
        let qformer = batch.qformer.as_ref().map(unpad);
        self.tensors(
            batch.pixel_values.clone(),
            batch.image_size,
            prompts,
            qformer,
            side,
            device,
        )
    }

    /// A loader batch with targets as teacher-forcing inputs: the prompt right-padded (LAVIS
    /// concatenates input and output tokens) and each row's target as the model learns it.
    pub fn training_batch<B: Backend, M: VisionLanguageModel<B>>(
        &self,
        model: &M,
        batch: &Batch,
        device: &B::Device,
    ) -> Result<(VlmInputs<B>, Vec<Vec<u32>>)> {
        let output = batch
            .output
            .as_ref()
            .ok_or_else(|| ModelError::Input("the batch has no target tokens".into()))?;
        let lm = model.language_model();
        let targets: Vec<Vec<u32>> = unpad(output).iter().map(|t| lm.target_ids(t)).collect();
        Ok((self.batch_tensors(batch, Padding::Right, device)?, targets))
    }

    /// One calibration sample (batch 1, natural lengths as the reference): an image file, the
    /// prompt (the LM and the Q-Former read it) and the target teacher-forced after it.
    pub fn calibration_sample<B: Backend, M: VisionLanguageModel<B>>(
        &self,
        model: &M,
        image: &Path,
        prompt: &str,
        target: &str,
        device: &B::Device,
    ) -> Result<CalibrationSample<B>> {
        let inputs = self.image_inputs(image, prompt, None, device)?;
        let tokens = self.tokenizer.encode(target).map_err(data_err)?;
        Ok(CalibrationSample {
            inputs,
            targets: vec![model.language_model().target_ids(&tokens)],
        })
    }

    /// The text of generated ids, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids).map_err(data_err)
    }
}

/// The unpadded rows of a right-padded token batch.
fn unpad(t: &TokenBatch) -> Vec<Vec<u32>> {
    t.ids
        .iter()
        .zip(&t.mask)
        .map(|(ids, m)| {
            ids.iter()
                .zip(m)
                .filter(|(_, m)| **m != 0)
                .map(|(i, _)| *i)
                .collect()
        })
        .collect()
}

fn mask_tensor<B: Backend>(rows: &[Vec<u32>], device: &B::Device) -> Tensor<B, 2> {
    let n = rows.len();
    let l = rows.first().map_or(0, Vec::len);
    let flat: Vec<f32> = rows.iter().flatten().map(|&m| m as f32).collect();
    Tensor::from_data(TensorData::new(flat, [n, l]), device)
}

/// A tokenizer whose ids can exceed the model's vocabulary is refused at load, naming both.
fn check_vocab(t: &TextTokenizer, vocab: usize, field: &str) -> Result<()> {
    let n = t.vocab_size();
    if n > vocab {
        return Err(ModelError::Input(format!(
            "{}: the tokenizer has {n} ids, more than the model's {field} {vocab}",
            t.path().display()
        )));
    }
    Ok(())
}

/// A model directory given as a path, or as a repo id (`org/name`) found in the local Hugging
/// Face cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`), at
/// `revision` (a branch or tag under `refs/`, or a commit; default `main`).
pub fn resolve_model_dir(spec: &Path, revision: Option<&str>) -> Result<PathBuf> {
    if spec.exists() || revision.is_none() && !looks_like_repo_id(spec) {
        return Ok(spec.to_path_buf());
    }
    let id = spec.to_string_lossy();
    let cache = std::env::var_os("HF_HUB_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
        })
        .ok_or_else(|| ModelError::Input(format!("{id}: no such directory and no HF cache")))?;
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    if !repo.is_dir() {
        return Err(ModelError::Input(format!(
            "{id}: neither a directory nor a model in the Hugging Face cache ({} not found)",
            repo.display()
        )));
    }
    let rev = revision.unwrap_or("main");
    let commit = match std::fs::read_to_string(repo.join("refs").join(rev)) {
        Ok(c) => c.trim().to_string(),
        Err(_) => rev.to_string(),
    };
    let dir = repo.join("snapshots").join(&commit);
    if !dir.is_dir() {
        return Err(ModelError::Input(format!(
            "{id}: revision `{rev}` is not in the Hugging Face cache ({} not found)",
            dir.display()
        )));
    }
    Ok(dir)
}

fn looks_like_repo_id(p: &Path) -> bool {
    let s = p.to_string_lossy();
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts
            .iter()
            .all(|x| !x.is_empty() && *x != "." && *x != "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_resolve_in_the_hub_cache_layout() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp.path().join("models--org--tiny");
        std::fs::create_dir_all(repo.join("snapshots/abc123")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        // SAFETY: tests in this module do not read the variable concurrently.
        unsafe { std::env::set_var("HF_HUB_CACHE", tmp.path()) };
        let dir = resolve_model_dir(Path::new("org/tiny"), None).unwrap();
        assert_eq!(dir, repo.join("snapshots/abc123"));
        let dir = resolve_model_dir(Path::new("org/tiny"), Some("abc123")).unwrap();
        assert_eq!(dir, repo.join("snapshots/abc123"));
        let err = resolve_model_dir(Path::new("org/tiny"), Some("v2"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("revision `v2`"), "{err}");
        let err = resolve_model_dir(Path::new("org/other"), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("org/other") && err.contains("cache"), "{err}");
        // A plain relative path that does not exist is passed through (the loader names it).
        assert_eq!(
            resolve_model_dir(Path::new("no/such/dir"), None).unwrap(),
            PathBuf::from("no/such/dir")
        );
    }
}
