//! One RESSA training step on the `configs/models/bench-small` InstructBLIP-T5 (random
//! weights, every vision/language linear at 50 % unstructured with SparseLoRA, Q-Former plain
//! LoRA): student forward, teacher forward on the dense path, CE + KL, backward, AdamW.
//! Batch 2, 112 px images, 12 Q-Former tokens, 24 prompt tokens, 16 target tokens. The PyTorch
//! side is `scripts/bench_train_torch.py` with the same shapes and adapters.
//!
//!
//! `pretrain_step_shapes_tiny_b32`: one step of the toy world's dense training from scratch
//! (`configs/models/shapes-tiny`, every parameter trainable, batch 32 of 64×64 images, 12
//! Q-Former tokens, 16 prompt tokens, 8 targets): forward, token-mean CE, backward, burn's AdamW.
//!
//! Backends: Flex always; Wgpu and Cuda with the crate features of those names.

use std::collections::BTreeMap;
use std::path::Path;

use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use criterion::{Criterion, criterion_group, criterion_main};
use ressa_models::pretrained::write_random_checkpoint;
use ressa_models::prunable::{Prunable, Tower};
use ressa_models::{InstructBlipT5, LanguageModel, Pretrained, VisionLanguageModel, VlmInputs};
use ressa_sparse::Mask;
use ressa_train::TrainConfig;
use ressa_train::adamw::AdamW;
use ressa_train::sparse_lora::attach;
use ressa_train::trainer::{TrainBatch, apply_update, forward_backward};

fn step(c: &mut Criterion) {
    // As the binaries run (`ressa_sparse::fpenv`).
    ressa_sparse::fpenv::flush_subnormals();
    step_on::<Flex>(c, "flex");
    pretrain_on::<Flex>(c, "flex");
    #[cfg(feature = "wgpu")]
    step_on::<burn::backend::Wgpu>(c, "wgpu");
    #[cfg(feature = "cuda")]
    step_on::<burn::backend::Cuda>(c, "cuda");
}

/// `b` rows of `l` deterministic ids below `vocab - 8` (offset `off`).
fn id_rows(b: usize, l: usize, vocab: usize, off: usize) -> Vec<Vec<u32>> {
    (0..b)
        .map(|r| {
            (0..l)
                .map(|i| (4 + (7 * i + 13 * r + off) % (vocab - 8)) as u32)
                .collect()
        })
        .collect()
}

fn pretrain_on<B: ressa_models::ops::DenseBackend>(c: &mut Criterion, backend: &str) {
    use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
    use ressa_models::vlm::teacher_forced;
    use ressa_train::distill::cross_entropy;

    let device = Default::default();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/models/shapes-tiny");
    type M<BB> = InstructBlipT5<BB>;
    let cfg =
        <M<B> as VisionLanguageModel<B>>::Config::from_file(&root.join("config.json")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(root.join("config.json"), dir.path().join("config.json")).unwrap();
    write_random_checkpoint::<B, M<B>>(&cfg, dir.path(), 0, 0.05, &device).unwrap();
    let mut model = Pretrained::<Autodiff<B>, M<Autodiff<B>>>::load(dir.path(), &device)
        .unwrap()
        .model;
    let (b, lq, lp, ld) = (32, 12, 16, 8);
    // the image placeholder id sits at the top of the toy vocabulary; stay below it
    let vocab = cfg
        .raw
        .image_token_index
        .map_or(cfg.text.vocab_size, |i| i as usize);
    let size = cfg.vision.image_size;
    let inputs = VlmInputs {
        pixel_values: Tensor::random(
            [b, 3, size, size],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &device,
        ),
        qformer_text: Some((
            ressa_models::nn::ids_tensor::<Autodiff<B>>(
                &id_rows(b, lq, cfg.qformer.vocab_size, 0),
                &device,
            ),
            Tensor::ones([b, lq], &device),
        )),
        input_ids: ressa_models::nn::ids_tensor::<Autodiff<B>>(&id_rows(b, lp, vocab, 0), &device),
        attention_mask: Tensor::ones([b, lp], &device),
    };
    let targets = id_rows(b, ld, vocab, 5);
    let mut optim = AdamWConfig::new()
        .with_weight_decay(0.01)
        .init::<Autodiff<B>, M<Autodiff<B>>>();
    c.bench_function(
        &format!("pretrain_step_shapes_tiny_b32/{backend}"),
        |bench| {
            bench.iter(|| {
                let tf = teacher_forced(&model, &inputs, &targets).unwrap();
                let loss = cross_entropy(tf.logits, tf.targets, tf.mask);
                let grads = GradientsParams::from_grads(loss.backward(), &model);
                model = optim.step(1e-3, model.clone(), grads);
            })
        },
    );
}

fn step_on<B: ressa_models::ops::DenseBackend>(c: &mut Criterion, backend: &str) {
    let device = Default::default();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/models/bench-small");
    type M<BB> = InstructBlipT5<BB>;
    let cfg =
        <M<B> as VisionLanguageModel<B>>::Config::from_file(&root.join("config.json")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(root.join("config.json"), dir.path().join("config.json")).unwrap();
    write_random_checkpoint::<B, M<B>>(&cfg, dir.path(), 0, 0.05, &device).unwrap();
    let model = Pretrained::<Autodiff<B>, M<Autodiff<B>>>::load(dir.path(), &device)
        .unwrap()
        .model;
    // 50 % unstructured masks on the vision and language towers.
    let mut masks = BTreeMap::new();
    for stack in model.stacks() {
        if stack.tower == Tower::QFormer {
            continue;
        }
        for b in 0..stack.blocks {
            for l in model.block_linears(stack.id, b) {
                let [d_in, d_out] = l.dims();
                let m = Mask::from_fn(d_in, d_out, |i, j| (i * 31 + j * 17 + b) % 2 == 0).unwrap();
                masks.insert(format!("{}.weight", l.key), m);
            }
        }
    }
    let train = TrainConfig::default();
    let (mut model, _) = attach(
        model,
        &train.adapters,
        &masks,
        &Default::default(),
        0,
        &device,
    )
    .unwrap();
    let (b, lq, lp, ld) = (2, 12, 24, 16);
    let ids = |l: usize, v: usize, off: usize| {
        ressa_models::nn::ids_tensor::<Autodiff<B>>(&id_rows(b, l, v, off), &device)
    };
    let size = cfg.vision.image_size;
    let vocab = model.language_model().vocab_size();
    let batch = TrainBatch {
        inputs: VlmInputs {
            pixel_values: Tensor::random(
                [b, 3, size, size],
                burn::tensor::Distribution::Normal(0.0, 1.0),
                &device,
            ),
            qformer_text: Some((
                ids(lq, cfg.qformer.vocab_size, 0),
                Tensor::ones([b, lq], &device),
            )),
            input_ids: ids(lp, vocab, 0),
            attention_mask: Tensor::ones([b, lp], &device),
        },
        targets: (0..b)
            .map(|r| {
                (0..ld)
                    .map(|i| (4 + (7 * i + 13 * r + 5) % (vocab - 8)) as u32)
                    .collect()
            })
            .collect(),
    };
    let mut opt = AdamW::new(train.adamw);
    c.bench_function(&format!("ressa_step_bench_small_b2/{backend}"), |bench| {
        bench.iter(|| {
            let (mut grads, loss) = forward_backward(&mut model, &batch, &train).unwrap();
            apply_update(&mut model, &mut grads, &mut opt, 1e-4, None, 1).unwrap();
            loss
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = step
}
criterion_main!(benches);
