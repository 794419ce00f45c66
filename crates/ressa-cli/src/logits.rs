//! `ressa logits`: teacher-forced logits for inputs given in a safetensors file.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use burn::prelude::*;
use ressa_models::{Pretrained, VlmInputs};
use safetensors::{Dtype, SafeTensors};

use crate::backend::BackendKind;
use crate::with_backend;

#[derive(clap::Args)]
pub struct Args {
    /// HF model directory.
    #[arg(long)]
    model: PathBuf,
    /// Inputs: `pixel_values` f32 [B,3,H,W], `input_ids` i64 [B,L] (prompt only),
    /// `decoder_input_ids` i64 [B,Ld], and `qformer_input_ids` i64 [B,Lq] for InstructBLIP.
    #[arg(long)]
    inputs: PathBuf,
    /// Output safetensors with `logits` f32 [B,Ld,vocab].
    #[arg(long)]
    out: PathBuf,
}

pub fn run(kind: BackendKind, args: Args) -> Result<()> {
    with_backend!(kind, |device: B| run_on::<B>(&args, &device))
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

fn run_on<B: Backend>(args: &Args, device: &B::Device) -> Result<()> {
    let pretrained = Pretrained::<B>::load(&args.model, device)?;
    crate::require_t5(&pretrained)?;
    let bytes = std::fs::read(&args.inputs).with_context(|| args.inputs.display().to_string())?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| {
        anyhow!(
            "{}: not a valid safetensors file: {e:?}",
            args.inputs.display()
        )
    })?;
    let p = &args.inputs;
    let pixels = read(&st, p, "pixel_values", Dtype::F32, 4)?;
    let input_ids = read(&st, p, "input_ids", Dtype::I64, 2)?;
    let decoder = read(&st, p, "decoder_input_ids", Dtype::I64, 2)?;
    let b = pixels.shape[0];
    let vocab = pretrained.config.text.vocab_size as i64;
    for (name, t) in [("input_ids", &input_ids), ("decoder_input_ids", &decoder)] {
        if t.shape[0] != b {
            bail!(
                "{}: `{name}` has batch {}, pixel_values has {b}",
                p.display(),
                t.shape[0]
            );
        }
        if let Some(bad) = t.i64.iter().find(|&&x| x < 0 || x >= vocab) {
            bail!(
                "{}: `{name}` holds token id {bad}, outside the vocabulary of {vocab}",
                p.display()
            );
        }
    }
    let (_, _, h, w) = (
        pixels.shape[0],
        pixels.shape[1],
        pixels.shape[2],
        pixels.shape[3],
    );
    let vc = &pretrained.config.vision;
    if pixels.shape[1] != 3 || h != vc.image_size || w != vc.image_size {
        bail!(
            "{}: `pixel_values` has shape {:?}, expected [B, 3, {}, {}]",
            p.display(),
            pixels.shape,
            vc.image_size,
            vc.image_size
        );
    }
    let int = |t: Input| Tensor::<B, 2, Int>::from_data(TensorData::new(t.i64, t.shape), device);
    let qformer_text = if pretrained.model.qformer.reads_text() {
        let q = read(&st, p, "qformer_input_ids", Dtype::I64, 2)?;
        let shape = [q.shape[0], q.shape[1]];
        Some((int(q), Tensor::ones(shape, device)))
    } else {
        None
    };
    let l = input_ids.shape[1];
    let inputs = VlmInputs {
        pixel_values: Tensor::from_data(TensorData::new(pixels.f32, pixels.shape), device),
        qformer_text,
        input_ids: int(input_ids),
        attention_mask: Tensor::ones([b, l], device),
    };
    let logits = pretrained.model.forward(&inputs, int(decoder));
    let shape = logits.dims().to_vec();
    let values = logits
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| anyhow!("{e:?}"))?;
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(Dtype::F32, shape, &bytes)?;
    let tmp = args.out.with_extension("safetensors.tmp");
    safetensors::serialize_to_file([("logits", view)], None, &tmp)
        .with_context(|| tmp.display().to_string())?;
    std::fs::rename(&tmp, &args.out).with_context(|| args.out.display().to_string())?;
    tracing::info!(out = %args.out.display(), "wrote logits");
    Ok(())
}
