//! Model forward and generation, random weights. The PyTorch side is
//! `scripts/bench_forward_torch.py` with the same shapes; `cargo xtask bench` runs both.
//!
//! - `instructblip_<model>_forward_b2/<backend>`: one teacher-forced forward of
//!   `configs/models/bench-small` and of the toy `configs/models/shapes-tiny`, batch 2, 12
//!   Q-Former tokens, 24 prompt tokens, 16 decoder tokens.
//! - `t5_xl_block_encode_l64/<backend>`: one FlanT5-XL-width encoder block (d_model 2048, d_ff
//!   5120, 32 heads, gated-GELU) plus the final norm on `[1, 64, 2048]`.
//! - `generate_bench_small_b1_16tok/<backend>`: greedy decoding of exactly 16 new tokens
//!   (batch 1), prefill included; tokens/s = 16 / time.
//!
//! Backends: Flex always; NdArray, Wgpu and Cuda with the crate features of those names.

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::prelude::*;
use criterion::{Criterion, criterion_group, criterion_main};
use ressa_models::generate::{GenerationConfig, generate};
use ressa_models::pretrained::write_random_checkpoint;
use ressa_models::vlm::logits;
use ressa_models::{InstructBlipConfig, InstructBlipT5, Pretrained, T5Config, VlmInputs};

type Config = InstructBlipConfig<T5Config>;

fn bench(c: &mut Criterion) {
    // As the binaries run (`ressa_sparse::fpenv`).
    ressa_sparse::fpenv::flush_subnormals();
    on_backend::<Flex>(c, "flex");
    #[cfg(feature = "ndarray")]
    on_backend::<burn::backend::NdArray>(c, "ndarray");
    #[cfg(feature = "wgpu")]
    on_backend::<burn::backend::Wgpu>(c, "wgpu");
    #[cfg(feature = "cuda")]
    on_backend::<burn::backend::Cuda>(c, "cuda");
}

fn configs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/models")
}

/// A random checkpoint for `config` (a JSON value) in a temporary directory, loaded.
fn random_model<B: ressa_models::ops::DenseBackend>(
    config: &serde_json::Value,
    device: &B::Device,
) -> (Config, Pretrained<B, InstructBlipT5<B>>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, serde_json::to_vec_pretty(config).unwrap()).unwrap();
    let cfg = Config::from_file(&path).unwrap();
    write_random_checkpoint::<B, InstructBlipT5<B>>(&cfg, dir.path(), 0, 0.05, device).unwrap();
    let model = Pretrained::load(dir.path(), device).unwrap();
    (cfg, model, dir)
}

fn read_config(name: &str) -> serde_json::Value {
    let path = configs_dir().join(name).join("config.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// `b` rows of `l` deterministic token ids below `vocab - 4`.
fn ids<B: ressa_models::ops::DenseBackend>(
    b: usize,
    l: usize,
    vocab: usize,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let rows: Vec<Vec<u32>> = (0..b)
        .map(|r| {
            (0..l)
                .map(|i| (4 + (7 * i + 13 * r) % (vocab - 8)) as u32)
                .collect()
        })
        .collect();
    ressa_models::nn::ids_tensor::<B>(&rows, device)
}

fn inputs<B: ressa_models::ops::DenseBackend>(
    cfg: &Config,
    b: usize,
    device: &B::Device,
) -> VlmInputs<B> {
    let (lq, lp) = (12, 24);
    let size = cfg.vision.image_size;
    let vocab = cfg.text.vocab_size;
    // The image placeholder id sits at the top of the toy vocabularies; stay below it.
    let text_vocab = cfg.raw.image_token_index.map_or(vocab, |i| i as usize);
    VlmInputs {
        pixel_values: Tensor::<B, 4>::random(
            [b, 3, size, size],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            device,
        ),
        qformer_text: Some((
            ids(b, lq, cfg.qformer.vocab_size, device),
            Tensor::ones([b, lq], device),
        )),
        input_ids: ids(b, lp, text_vocab, device),
        attention_mask: Tensor::ones([b, lp], device),
    }
}

fn on_backend<B: ressa_models::ops::DenseBackend>(c: &mut Criterion, backend: &str) {
    let device = Default::default();
    for model_name in ["bench-small", "shapes-tiny"] {
        let (cfg, model, _dir) = random_model::<B>(&read_config(model_name), &device);
        let model = model.model;
        let inputs = inputs::<B>(&cfg, 2, &device);
        let vocab = cfg.text.vocab_size;
        let decoder = ids(2, 16, vocab, &device);
        let id = model_name.replace('-', "_");
        c.bench_function(
            &format!("instructblip_{id}_forward_b2/{backend}"),
            |bench| {
                bench.iter(|| {
                    logits(&model, &inputs, Some(decoder.clone()))
                        .unwrap()
                        .into_data()
                })
            },
        );
        if model_name == "bench-small" {
            let inputs = inputs_b1(&inputs);
            let gen_cfg = GenerationConfig {
                max_new_tokens: 16,
                min_new_tokens: 16,
                ..Default::default()
            };
            c.bench_function(
                &format!("generate_bench_small_b1_16tok/{backend}"),
                |bench| {
                    bench.iter(|| {
                        let out = generate(&model, &inputs, &gen_cfg).unwrap();
                        assert_eq!(out.rows[0].len(), 17, "16 new tokens after the start token");
                        out
                    })
                },
            );
        }
    }

    // FlanT5-XL widths, one encoder and one decoder block, a small vocabulary.
    let mut xl = read_config("memory-flan-t5-xl-language");
    let text = &mut xl["text_config"];
    text["num_layers"] = 1.into();
    text["num_decoder_layers"] = 1.into();
    text["vocab_size"] = 512.into();
    let (_, model, _dir) = random_model::<B>(&xl, &device);
    let t5 = &model.model.language_model;
    let x = Tensor::<B, 3>::random(
        [1, 64, 2048],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &device,
    );
    let mask = Tensor::<B, 2>::ones([1, 64], &device);
    c.bench_function(&format!("t5_xl_block_encode_l64/{backend}"), |bench| {
        bench.iter(|| t5.encoder.encode(x.clone(), mask.clone()).into_data())
    });
}

/// The first row of a batch.
fn inputs_b1<B: Backend>(inputs: &VlmInputs<B>) -> VlmInputs<B> {
    let (q, qm) = inputs.qformer_text.clone().unwrap();
    VlmInputs {
        pixel_values: inputs.pixel_values.clone().narrow(0, 0, 1),
        qformer_text: Some((q.narrow(0, 0, 1), qm.narrow(0, 0, 1))),
        input_ids: inputs.input_ids.clone().narrow(0, 0, 1),
        attention_mask: inputs.attention_mask.clone().narrow(0, 0, 1),
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = bench
}
criterion_main!(benches);
