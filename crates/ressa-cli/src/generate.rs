//! `ressa generate`: one image, one prompt, text on stdout.
//!
//! The prompt goes to the language model (and, for InstructBLIP, to the Q-Former unless
//! `--qformer-prompt` gives it another instruction), laid out by the family's processor. The
//! answer printed is what was generated after the input, up to the first eos, decoded with the
//! model's tokenizer (special tokens skipped).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use burn::prelude::*;
use ressa_models::generate::{GenerationConfig, generate};
use ressa_models::sparse_kernels::KernelRows;
use ressa_models::{Pretrained, Processor, VisionLanguageModel};

use crate::backend::{BackendKind, ModelJob, run_model_job};

#[derive(clap::Args)]
pub struct Args {
    /// HF model directory (config.json, safetensors, tokenizers, preprocessor_config.json).
    #[arg(long)]
    model: PathBuf,
    /// Image file (PNG or JPEG).
    #[arg(long)]
    image: PathBuf,
    /// Instruction / prompt, e.g. "Question: what is shown? Short answer:".
    #[arg(long)]
    prompt: String,
    /// The Q-Former's instruction (InstructBLIP), when it differs from `--prompt`.
    #[arg(long)]
    qformer_prompt: Option<String>,
    /// Beam width (1 = greedy).
    #[arg(long, default_value_t = 5)]
    beams: usize,
    #[arg(long, default_value_t = 30)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 1)]
    min_new_tokens: usize,
    /// Beam score = log-prob sum / length^penalty.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    length_penalty: f32,
    /// Repetition penalty (HF `repetition_penalty`; LAVIS uses 1.5). 1.0 disables it.
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Run pruned linears with the packed sparse CPU kernels (CSR / bitmask / N:M, or dense
    /// where the cost model says so); flex and ndarray backends only.
    #[arg(long)]
    sparse_kernels: bool,
}

impl Args {
    fn generation(&self) -> GenerationConfig {
        GenerationConfig {
            num_beams: self.beams,
            max_new_tokens: self.max_new_tokens,
            min_new_tokens: self.min_new_tokens,
            length_penalty: self.length_penalty,
            early_stopping: false,
            repetition_penalty: self.repetition_penalty,
        }
    }
}

/// The generation settings checked under their flag names (then as the library checks them).
pub(crate) fn check_flags(g: &GenerationConfig) -> Result<()> {
    if g.num_beams == 0 {
        bail!("--beams 0: expected at least 1 (1 = greedy)");
    }
    if g.max_new_tokens == 0 {
        bail!("--max-new-tokens 0: expected at least 1");
    }
    if g.min_new_tokens > g.max_new_tokens {
        bail!(
            "--min-new-tokens {} exceeds --max-new-tokens {}",
            g.min_new_tokens,
            g.max_new_tokens
        );
    }
    if !(g.repetition_penalty.is_finite() && g.repetition_penalty > 0.0) {
        bail!(
            "--repetition-penalty {}: expected a positive finite number (1 = off)",
            g.repetition_penalty
        );
    }
    if !g.length_penalty.is_finite() {
        bail!(
            "--length-penalty {}: expected a finite number",
            g.length_penalty
        );
    }
    Ok(g.validate()?)
}

pub fn run(kind: BackendKind, mut args: Args) -> Result<()> {
    args.model = crate::backend::model_dir(&args.model)?;
    if args.prompt.trim().is_empty() {
        bail!(
            "--prompt is empty: give an instruction, e.g. \"Question: what is in the picture? Short answer:\""
        );
    }
    if args
        .qformer_prompt
        .as_deref()
        .is_some_and(|q| q.trim().is_empty())
    {
        bail!("--qformer-prompt is empty: give the Q-Former's instruction, or leave the flag out");
    }
    check_flags(&args.generation())?;
    if args.sparse_kernels {
        kind.check_sparse_kernels()?;
    }
    let dir = args.model.clone();
    run_model_job(kind, &dir, args)
}

impl ModelJob for Args {
    fn run<B: Backend, M: VisionLanguageModel<B>>(
        self,
        config: M::Config,
        device: &B::Device,
    ) -> Result<()> {
        let mut pretrained = Pretrained::<B, M>::load_with(&self.model, config, device)?;
        let processor = Processor::for_model(&self.model, &pretrained.model)?;
        if self.qformer_prompt.is_some() && processor.qformer.is_none() {
            bail!("--qformer-prompt: this model's Q-Former reads no text (BLIP-2)");
        }
        let inputs = processor.image_inputs::<B>(
            &self.image,
            &self.prompt,
            self.qformer_prompt.as_deref(),
            device,
        )?;
        if self.sparse_kernels {
            use_sparse_kernels(
                &mut pretrained.model,
                KernelRows {
                    images: 1,
                    decode: self.beams,
                    prompt: inputs.input_ids.dims()[1],
                },
            )?;
        }
        let start = std::time::Instant::now();
        let out = generate(&pretrained.model, &inputs, &self.generation())?;
        tracing::info!(elapsed_ms = start.elapsed().as_millis() as u64, tokens = ?out.rows[0], "generated");
        let text = processor
            .decode(&out.answer(0))
            .context("decoding the generated tokens")?;
        println!("{}", text.trim());
        Ok(())
    }
}

/// `--sparse-kernels`: packs the model's pruned linears, frees their dense copies, and logs how
/// many got each kernel.
pub(crate) fn use_sparse_kernels<B: Backend, M: VisionLanguageModel<B>>(
    model: &mut M,
    rows: KernelRows,
) -> Result<()> {
    let start = std::time::Instant::now();
    // Inference only from here on: each packed layer's dense copy is freed.
    let report = ressa_models::sparse_kernels::use_sparse_kernels(model, rows, true)
        .context("--sparse-kernels")?;
    let counts = report.counts().map(|(_, n)| n);
    tracing::info!(
        dense = counts[0],
        csr = counts[1],
        bitmask = counts[2],
        nm = counts[3],
        unpacked = report.unpacked,
        ms = start.elapsed().as_millis() as u64,
        "sparse kernels"
    );
    for l in &report.layers {
        tracing::debug!(layer = %l.name, kernel = ?l.kind, rows = l.rows, sparsity = l.sparsity, "packed");
    }
    if report.layers.is_empty() {
        tracing::warn!("--sparse-kernels: no pruned linear (no weight has zeros); nothing packed");
    }
    Ok(())
}
