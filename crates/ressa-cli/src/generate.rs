//! `ressa generate`: one image, one prompt, text on stdout.
//!
//! The prompt goes to the language model (and, for InstructBLIP, to the Q-Former unless
//! `--qformer-prompt` gives it another instruction). A T5 model decodes after its decoder start
//! token; a decoder-only (LLaMA / Vicuna) model continues `[query outputs ; prompt]`, as
//! `transformers`' InstructBLIP does with `image_token_index` repeated once per query before the
//! prompt. The answer printed is what was generated after the input, up to the first eos,
//! decoded with the model's tokenizer (special tokens skipped).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use burn::prelude::*;
use ressa_data::image::{ImageProcessorConfig, load_rgb};
use ressa_data::text::TextTokenizer;
use ressa_models::generate::{GenerationConfig, SpecialTokens, answer_tokens, generate, input_len};
use ressa_models::sparse_kernels::KernelRows;
use ressa_models::{InstructBlip, Pretrained, VlmInputs};

use crate::backend::BackendKind;
use crate::with_backend;

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

pub fn run(kind: BackendKind, args: Args) -> Result<()> {
    if args.prompt.trim().is_empty() {
        bail!(
            "--prompt is empty: give an instruction, e.g. \"Question: what is in the picture? Short answer:\""
        );
    }
    if args.beams == 0 || args.max_new_tokens == 0 {
        bail!("--beams and --max-new-tokens must be at least 1");
    }
    if args.sparse_kernels {
        kind.check_sparse_kernels()?;
    }
    with_backend!(kind, |device: B| run_on::<B>(&args, &device))
}

fn run_on<B: Backend>(args: &Args, device: &B::Device) -> Result<()> {
    let mut pretrained = Pretrained::<B>::load(&args.model, device)?;
    let processor = ImageProcessorConfig::from_file_for(
        &args.model.join("preprocessor_config.json"),
        pretrained.config.vision.image_size,
    )?;
    let tokenizer = TextTokenizer::from_file(&args.model.join("tokenizer.json"))?;
    let image = load_rgb(&args.image)?;
    let (h, w) = processor.output_size();
    let pixels = processor.preprocess(&image);
    let pixel_values = Tensor::<B, 4>::from_data(TensorData::new(pixels, [1, 3, h, w]), device);

    let ids = tokenizer.encode(&args.prompt)?;
    let n = ids.len();
    if args.sparse_kernels {
        use_sparse_kernels(
            &mut pretrained.model,
            KernelRows {
                images: 1,
                decode: args.beams,
                prompt: n,
            },
        )?;
    }
    let input_ids = ressa_models::nn::ids_tensor::<B>(&[ids], device);
    let qformer_text = if pretrained.model.qformer.reads_text() {
        let qtok =
            TextTokenizer::from_file(&args.model.join("qformer_tokenizer").join("tokenizer.json"))?;
        let (flag, qprompt) = match &args.qformer_prompt {
            Some(q) => ("--qformer-prompt", q),
            None => ("--prompt", &args.prompt),
        };
        let qids = qtok.encode(qprompt)?;
        let max = pretrained.config.qformer.max_position_embeddings;
        if qids.len() > max {
            bail!(
                "{flag}: {} Q-Former tokens, more than max_position_embeddings {max}",
                qids.len()
            );
        }
        let len = qids.len();
        Some((
            ressa_models::nn::ids_tensor::<B>(&[qids], device),
            Tensor::ones([1, len], device),
        ))
    } else {
        if args.qformer_prompt.is_some() {
            bail!("--qformer-prompt: this model's Q-Former reads no text (BLIP-2)");
        }
        None
    };
    let inputs = VlmInputs {
        pixel_values,
        qformer_text,
        input_ids,
        attention_mask: Tensor::ones([1, n], device),
    };
    let tokens = SpecialTokens::from_config(&pretrained.config.text);
    let cfg = GenerationConfig {
        num_beams: args.beams,
        max_new_tokens: args.max_new_tokens,
        min_new_tokens: args.min_new_tokens,
        length_penalty: args.length_penalty,
        early_stopping: false,
        repetition_penalty: args.repetition_penalty,
    };
    let start = std::time::Instant::now();
    let out = generate(&pretrained.model, &inputs, &cfg, tokens);
    tracing::info!(elapsed_ms = start.elapsed().as_millis() as u64, tokens = ?out[0], "generated");
    let answer = answer_tokens(&out[0], input_len(&pretrained.model, &inputs), tokens);
    let text = tokenizer
        .decode(&answer)
        .context("decoding the generated tokens")?;
    println!("{}", text.trim());
    Ok(())
}

/// `--sparse-kernels`: packs the model's pruned linears, frees their dense copies, and logs how
/// many got each kernel.
pub(crate) fn use_sparse_kernels<B: Backend>(
    model: &mut InstructBlip<B>,
    rows: KernelRows,
) -> Result<()> {
    let start = std::time::Instant::now();
    // The model error's message already carries its cause; `{e}` keeps the line single.
    let report = model
        // Inference only from here on: each packed layer's dense copy is freed.
        .use_sparse_kernels(rows, true)
        .map_err(|e| anyhow::anyhow!("--sparse-kernels: {e}"))?;
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
