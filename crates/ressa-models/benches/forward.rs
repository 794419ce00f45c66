//! Forward pass of the `configs/models/bench-small` InstructBLIP-T5 (random weights): batch 2,
//! 112 px images, 12 Q-Former tokens, 24 prompt tokens, 16 decoder tokens. The PyTorch side is
//! `scripts/bench_forward_torch.py` with the same shapes.

use std::path::Path;

use burn::backend::Flex;
use burn::prelude::*;
use criterion::{Criterion, criterion_group, criterion_main};
use ressa_models::instructblip::write_random_checkpoint;
use ressa_models::{ModelConfig, Pretrained, VlmInputs};

/// The forward on backend `B` (Flex always; NdArray with `--features ndarray`).
fn forward(c: &mut Criterion) {
    forward_on::<Flex>(c, "flex");
    #[cfg(feature = "ndarray")]
    forward_on::<burn::backend::NdArray>(c, "ndarray");
}

fn forward_on<B: Backend>(c: &mut Criterion, backend: &str) {
    let device = Default::default();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/models/bench-small");
    let cfg = ModelConfig::from_file(&root.join("config.json")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(root.join("config.json"), dir.path().join("config.json")).unwrap();
    write_random_checkpoint::<B>(&cfg, dir.path(), 0, 0.05, &device).unwrap();
    let model = Pretrained::<B>::load(dir.path(), &device).unwrap().model;
    let (b, lq, lp, ld) = (2, 12, 24, 16);
    let ids = |l: usize, v: usize| {
        let rows: Vec<Vec<u32>> = (0..b)
            .map(|r| {
                (0..l)
                    .map(|i| (4 + (7 * i + 13 * r) % (v - 8)) as u32)
                    .collect()
            })
            .collect();
        ressa_models::nn::ids_tensor::<B>(&rows, &device)
    };
    let size = cfg.vision.image_size;
    let inputs = VlmInputs {
        pixel_values: Tensor::<B, 4>::random(
            [b, 3, size, size],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &device,
        ),
        qformer_text: Some((
            ids(lq, cfg.qformer.vocab_size),
            Tensor::ones([b, lq], &device),
        )),
        input_ids: ids(lp, cfg.text.vocab_size),
        attention_mask: Tensor::ones([b, lp], &device),
    };
    let decoder = ids(ld, cfg.text.vocab_size);
    c.bench_function(
        &format!("instructblip_bench_small_forward_b2/{backend}"),
        |bench| {
            bench.iter(|| {
                let logits = model.forward(&inputs, decoder.clone());
                logits.into_data()
            })
        },
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = forward
}
criterion_main!(benches);
