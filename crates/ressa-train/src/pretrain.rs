//! Dense training of every parameter from scratch (the toy world's model, issue #6): token-mean
//! CE on the targets, burn's AdamW, linear warm-up then cosine. No teacher, no adapters.

use std::time::Instant;

use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use rand::seq::SliceRandom;
use ressa_data::loader::{Example, ImageTransform, Loader, LoaderConfig};
use ressa_data::rng::item_rng;
use ressa_models::VisionLanguageModel;
use ressa_models::vlm::teacher_forced;
use serde::{Deserialize, Serialize};

use crate::distill::cross_entropy;
use crate::error::{Result, TrainError};
use crate::trainer::{Schedule, TrainBatch, TrainData, TrainEvent};

/// Settings of a from-scratch run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PretrainConfig {
    pub steps: u64,
    pub batch_size: usize,
    pub lr: f64,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    pub clip_grad_norm: Option<f64>,
    pub seed: u64,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        Self {
            steps: 1000,
            batch_size: 32,
            lr: 2e-3,
            warmup_steps: 50,
            weight_decay: 0.01,
            clip_grad_norm: Some(1.0),
            seed: 0,
        }
    }
}

/// Trains all parameters of `model` on `data.train` (eval preprocessing: the toy world's
/// answers depend on left/right, which a flip would swap). Returns the model and the mean
/// training loss of the last 10 % of steps.
pub fn pretrain<B: AutodiffBackend, M>(
    mut model: M,
    data: &TrainData,
    cfg: &PretrainConfig,
    device: &B::Device,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<(M, f64)>
where
    M: VisionLanguageModel<B> + burn::module::AutodiffModule<B>,
{
    if data.train.is_empty() || cfg.batch_size == 0 || cfg.steps == 0 {
        return Err(TrainError::Input(
            "pretraining needs examples, batch_size ≥ 1 and steps ≥ 1".into(),
        ));
    }
    let mut adamw = AdamWConfig::new().with_weight_decay(cfg.weight_decay as f32);
    if let Some(c) = cfg.clip_grad_norm {
        adamw = adamw.with_grad_clipping(Some(burn::grad_clipping::GradientClippingConfig::Norm(
            c as f32,
        )));
    }
    let mut optim = adamw.init::<B, M>();
    let schedule = crate::trainer::TrainConfig {
        lr: cfg.lr,
        warmup_steps: cfg.warmup_steps,
        schedule: Schedule::Cosine,
        ..Default::default()
    };
    let on_event_start = TrainEvent::Start {
        total_steps: cfg.steps,
        resumed_at: None,
    };
    on_event(&on_event_start);
    let mut step = 0u64;
    let mut epoch = 0u64;
    let tail_from = cfg.steps - (cfg.steps / 10).max(1);
    let (mut tail_loss, mut tail_n) = (0.0, 0usize);
    let mut t = Instant::now();
    while step < cfg.steps {
        let mut order: Vec<usize> = (0..data.train.len()).collect();
        order.shuffle(&mut item_rng(cfg.seed, 0x5052_4554, epoch));
        let examples: Vec<Example> = order.iter().map(|&i| data.train[i].clone()).collect();
        let loader = Loader::new(
            examples,
            ImageTransform::Eval(data.processor.image.clone()),
            data.processor.texts(true),
            LoaderConfig {
                batch_size: cfg.batch_size,
                threads: data.loader_threads,
                ..Default::default()
            },
        )?;
        for batch in loader {
            let batch = batch?;
            let tb = TrainBatch::<B>::new(&data.processor, &model, &batch, device)?;
            let tf = teacher_forced(&model, &tb.inputs, &tb.targets)?;
            let loss = cross_entropy(tf.logits, tf.targets, tf.mask);
            let value: f64 = loss.clone().into_scalar().elem();
            if !value.is_finite() {
                return Err(TrainError::NonFinite {
                    step: step + 1,
                    what: "loss",
                    value,
                });
            }
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            step += 1;
            let lr = schedule.lr_at(step, cfg.steps);
            model = optim.step(lr, model, grads);
            if step > tail_from {
                tail_loss += value;
                tail_n += 1;
            }
            on_event(&TrainEvent::Step {
                step,
                total_steps: cfg.steps,
                loss: value,
                ce: value,
                kl: 0.0,
                lr,
                examples_per_s: batch.len() as f64 / t.elapsed().as_secs_f64().max(1e-9),
            });
            t = Instant::now();
            if step >= cfg.steps {
                break;
            }
        }
        epoch += 1;
    }
    Ok((model, tail_loss / tail_n.max(1) as f64))
}
