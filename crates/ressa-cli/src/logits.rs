//! `ressa logits`: teacher-forced logits for inputs given in a safetensors file.
//!
//! - T5: `logits` [B, Ld, vocab] at the decoder positions of `decoder_input_ids` (position `t`
//!   predicts decoder token `t + 1`).
//! - Decoder-only (LLaMA / Vicuna): `logits` [B, Q + L, vocab] over the whole language-model
//!   sequence `[query outputs ; prompt]` as `transformers`' InstructBLIP forward returns them
//!   (its `input_ids` holding `image_token_index` Q times before the prompt): positions
//!   `0..Q` are the queries, `Q..Q+L` the prompt tokens, position `t` predicts token `t + 1`.
//!   `decoder_input_ids`, when given, continue the sequence (logits [B, Q + L + Ld, vocab]).
//! - LLaVA: `input_ids` as `LlavaProcessor` makes them, `<image>` expanded into the image token
//!   count (the features replace those positions); logits [B, L, vocab] over them.
//!
//! `attention_mask` / `qformer_attention_mask` (1 token, 0 padding) are optional (all ones when
//! absent); a decoder-only prompt is padded on the left.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use burn::prelude::*;
use ressa_models::{Pretrained, VisionLanguageModel, VlmInputs};
use safetensors::{Dtype, SafeTensors};

use crate::backend::{BackendKind, ModelJob, run_model_job};
use crate::output::{refuse_alias, write_file_atomically};

#[derive(clap::Args)]
pub struct Args {
    /// HF model directory.
    #[arg(long)]
    model: PathBuf,
    /// Inputs: `pixel_values` f32 [B,3,H,W], `input_ids` i64 [B,L] (InstructBLIP / BLIP-2: the
    /// prompt alone, without image placeholders; LLaVA: with them), `decoder_input_ids` i64 [B,Ld] (T5; a continuation for a
    /// decoder-only model), `qformer_input_ids` i64 [B,Lq] for InstructBLIP, and optionally
    /// `attention_mask` i64 [B,L] and `qformer_attention_mask` i64 [B,Lq].
    #[arg(long)]
    inputs: PathBuf,
    /// Output safetensors with `logits` f32: [B,Ld,vocab] (T5) or [B,Q+L(+Ld),vocab] over
    /// [queries ; prompt (; continuation)] (decoder-only).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(kind: BackendKind, mut args: Args) -> Result<()> {
    args.model = crate::backend::model_dir(&args.model)?;
    refuse_alias(
        "--out",
        &args.out,
        &[
            ("model directory", &args.model),
            ("inputs file", &args.inputs),
        ],
    )?;
    let dir = args.model.clone();
    run_model_job(kind, &dir, args)
}

struct Input {
    shape: Vec<usize>,
    f32: Vec<f32>,
    i64: Vec<i64>,
}

fn read(st: &SafeTensors, path: &Path, key: &str, dtype: Dtype, rank: usize) -> Result<Input> {
    let t = st
        .tensor(key)
        .map_err(|_| anyhow!("{}: missing tensor `{key}`", path.display()))?;
    if t.dtype() != dtype {
        bail!(
            "{}: tensor `{key}` has dtype {:?}, expected {dtype:?}",
            path.display(),
            t.dtype()
        );
    }
    if t.shape().len() != rank {
        bail!(
            "{}: tensor `{key}` has shape {:?}, expected rank {rank}",
            path.display(),
            t.shape()
        );
    }
    let data = t.data();
    Ok(Input {
        shape: t.shape().to_vec(),
        f32: if dtype == Dtype::F32 {
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        } else {
            Vec::new()
        },
        i64: if dtype == Dtype::I64 {
            data.chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect()
        } else {
            Vec::new()
        },
    })
}

/// An optional 1/0 mask `key` of the same shape as `ids`; `None` when the file has none.
fn read_mask(
    st: &SafeTensors,
    path: &Path,
    key: &str,
    ids: &Input,
    ids_key: &str,
) -> Result<Option<Vec<f32>>> {
    if !st.names().contains(&key) {
        return Ok(None);
    }
    let m = read(st, path, key, Dtype::I64, 2)?;
    if m.shape != ids.shape {
        bail!(
            "{}: `{key}` has shape {:?}, `{ids_key}` has {:?}",
            path.display(),
            m.shape,
            ids.shape
        );
    }
    if let Some(bad) = m.i64.iter().find(|&&x| x != 0 && x != 1) {
        bail!(
            "{}: `{key}` holds {bad}; a mask holds 1 (token) or 0 (padding)",
            path.display()
        );
    }
    Ok(Some(m.i64.iter().map(|&x| x as f32).collect()))
}

impl ModelJob for Args {
    fn run<B: Backend, M: VisionLanguageModel<B>>(
        self,
        config: M::Config,
        device: &B::Device,
    ) -> Result<()> {
        let bytes =
            std::fs::read(&self.inputs).with_context(|| self.inputs.display().to_string())?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| {
            anyhow!(
                "{}: not a valid safetensors file: {e:?}",
                self.inputs.display()
            )
        })?;
        let pretrained = Pretrained::<B, M>::load_with(&self.model, config, device)?;
        let model = &pretrained.model;
        let spec = model.input_spec();
        let p = &self.inputs;
        let pixels = read(&st, p, "pixel_values", Dtype::F32, 4)?;
        let input_ids = read(&st, p, "input_ids", Dtype::I64, 2)?;
        let decoder = if st.names().contains(&"decoder_input_ids") {
            Some(read(&st, p, "decoder_input_ids", Dtype::I64, 2)?)
        } else {
            None
        };
        let qformer_ids = if spec.qformer_text.is_some() {
            Some(read(&st, p, "qformer_input_ids", Dtype::I64, 2)?)
        } else {
            None
        };
        let b = pixels.shape[0];
        for (name, t) in [("input_ids", &input_ids)]
            .into_iter()
            .chain(decoder.as_ref().map(|d| ("decoder_input_ids", d)))
            .chain(qformer_ids.as_ref().map(|q| ("qformer_input_ids", q)))
        {
            if t.shape[0] != b {
                bail!(
                    "{}: `{name}` has batch {}, pixel_values has {b}",
                    p.display(),
                    t.shape[0]
                );
            }
        }
        // Image placeholders are checked by the model: InstructBLIP refuses them in the prompt,
        // LLaVA needs exactly its image token count per row.
        let mask = |values: Option<Vec<f32>>, shape: &[usize]| -> Tensor<B, 2> {
            let shape = [shape[0], shape[1]];
            match values {
                Some(v) => Tensor::from_data(TensorData::new(v, shape), device),
                None => Tensor::ones(shape, device),
            }
        };
        let attention_mask = mask(
            read_mask(&st, p, "attention_mask", &input_ids, "input_ids")?,
            &input_ids.shape,
        );
        let int =
            |t: Input| Tensor::<B, 2, Int>::from_data(TensorData::new(t.i64, t.shape), device);
        let qformer_text = match qformer_ids {
            Some(q) => {
                let m = read_mask(&st, p, "qformer_attention_mask", &q, "qformer_input_ids")?;
                let m = mask(m, &q.shape);
                Some((int(q), m))
            }
            None => None,
        };
        let inputs = VlmInputs {
            pixel_values: Tensor::from_data(TensorData::new(pixels.f32, pixels.shape), device),
            qformer_text,
            input_ids: int(input_ids),
            attention_mask,
        };
        let logits = ressa_models::vlm::logits(model, &inputs, decoder.map(int))
            .with_context(|| p.display().to_string())?;
        let shape = logits.dims().to_vec();
        let values = logits
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| anyhow!("{e:?}"))?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(Dtype::F32, shape, &bytes)?;
        let file = safetensors::serialize([("logits", view)], None)?;
        write_file_atomically(&self.out, &file)?;
        tracing::info!(out = %self.out.display(), "wrote logits");
        Ok(())
    }
}
