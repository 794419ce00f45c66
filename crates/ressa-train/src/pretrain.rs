//! Dense training of every parameter from scratch (the toy world's model, issue #6): token-mean
//! CE on the targets, burn's AdamW, linear warm-up then cosine. No teacher, no adapters.
//! An optional curriculum (issue #18) trains the first steps on the examples whose prompt
//! matches (e.g. "where is the" questions) before the mix. An optional stage 0
//! ([`pretrain_vision`]) first teaches the vision tower what each patch shows, and the main run
//! may then keep the tower frozen, as InstructBLIP trains on a frozen pretrained ViT.

use std::path::Path;
use std::time::Instant;

use burn::module::Param;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use rand::Rng;
use rand::seq::SliceRandom;
use ressa_data::loader::{Example, ImageTransform, Loader, LoaderConfig, Texts};
use ressa_data::rng::item_rng;
use ressa_data::scenes::{CELL_CLASSES, CONTENT_CLASSES, PatchLabels, read_patch_labels};
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
    /// Curriculum: the first `warm_steps` steps draw only the examples whose prompt contains
    /// one of `warm_prompts` (e.g. `"where is the"`), the rest every example; the learning-rate
    /// schedule runs over all `steps`. 0 = none. (Left out of the serialized form when unset,
    /// so the runner's cache keys of recipes without it stay as they were.)
    #[serde(skip_serializing_if = "is_zero")]
    pub warm_steps: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warm_prompts: Vec<String>,
    /// Stage 0 ([`pretrain_vision`]): steps of per-patch classification (content and cell)
    /// before the main run, at `vision_lr` (default `lr`) after `warmup_steps`. 0 = none.
    #[serde(skip_serializing_if = "is_zero")]
    pub vision_steps: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vision_lr: Option<f64>,
    /// The main run leaves the vision tower as it is (stage 0's, or the initial one).
    #[serde(skip_serializing_if = "is_false")]
    pub freeze_vision: bool,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
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
            warm_steps: 0,
            warm_prompts: Vec::new(),
            vision_steps: 0,
            vision_lr: None,
            freeze_vision: false,
        }
    }
}

fn input(what: String) -> TrainError {
    TrainError::Input(format!("pretrain: {what}"))
}

impl PretrainConfig {
    /// Checks the warm-up and stage-0 settings alone, before any data is read: a warm-up as
    /// long as the run, steps without prompts or prompts without steps, a `vision_lr` without
    /// `vision_steps` or one that is not a positive number are refused.
    pub fn validate(&self) -> Result<()> {
        if let Some(lr) = self.vision_lr {
            if self.vision_steps == 0 {
                return Err(input("`vision_lr` is set but `vision_steps` is 0".into()));
            }
            if !(lr.is_finite() && lr > 0.0) {
                return Err(input(format!(
                    "`vision_lr` is {lr}, expected a positive number"
                )));
            }
        }
        match (self.warm_steps, self.warm_prompts.is_empty()) {
            (0, true) => Ok(()),
            (0, false) => Err(input("`warm_prompts` is set but `warm_steps` is 0".into())),
            (_, true) => Err(input(
                "`warm_steps` is set but `warm_prompts` is empty".into(),
            )),
            (w, false) if w >= self.steps => Err(input(format!(
                "`warm_steps` is {w}, expected fewer than `steps` ({})",
                self.steps
            ))),
            _ => Ok(()),
        }
    }

    /// AdamW with the run's weight decay and gradient clipping.
    fn adamw(&self) -> AdamWConfig {
        let adamw = AdamWConfig::new().with_weight_decay(self.weight_decay as f32);
        match self.clip_grad_norm {
            Some(c) => adamw.with_grad_clipping(Some(
                burn::grad_clipping::GradientClippingConfig::Norm(c as f32),
            )),
            None => adamw,
        }
    }

    /// The indices of `examples` the warm-up steps draw from (empty without a warm-up).
    /// Refuses what [`Self::validate`] refuses, and prompts that match fewer than a batch.
    pub fn warm_examples(&self, examples: &[Example]) -> Result<Vec<usize>> {
        self.validate()?;
        if self.warm_steps == 0 {
            return Ok(Vec::new());
        }
        let warm: Vec<usize> = (0..examples.len())
            .filter(|&i| {
                let prompt = &examples[i].text_input;
                self.warm_prompts
                    .iter()
                    .any(|w| prompt.contains(w.as_str()))
            })
            .collect();
        if warm.len() < self.batch_size {
            return Err(input(format!(
                "`warm_prompts` {:?} match {} training examples, expected at least a batch ({})",
                self.warm_prompts,
                warm.len(),
                self.batch_size
            )));
        }
        Ok(warm)
    }
}

/// One pass over `examples` in their order, eval preprocessing (the toy world's answers depend
/// on left/right, which a flip would swap), batches of `cfg.batch_size`.
fn epoch_loader(
    examples: Vec<Example>,
    texts: Texts,
    data: &TrainData,
    cfg: &PretrainConfig,
) -> Result<Loader> {
    Ok(Loader::new(
        examples,
        ImageTransform::Eval(data.processor.image.clone()),
        texts,
        LoaderConfig {
            batch_size: cfg.batch_size,
            threads: data.loader_threads,
            ..Default::default()
        },
    )?)
}

/// The loss as a number; a non-finite one stops the run (nothing non-finite is written).
fn finite_loss<B: AutodiffBackend>(
    loss: &Tensor<B, 1>,
    step: u64,
    what: &'static str,
) -> Result<f64> {
    let value: f64 = loss.clone().into_scalar().elem();
    if !value.is_finite() {
        return Err(TrainError::NonFinite { step, what, value });
    }
    Ok(value)
}

/// Linear heads over the vision tower's patch features: what the patch's scene cell holds and
/// which cell it is (stage 0 of [`PretrainConfig`]; dropped after it).
#[derive(Module, Debug)]
pub struct PatchHeads<B: Backend> {
    content: Param<Tensor<B, 2>>,
    content_bias: Param<Tensor<B, 1>>,
    cell: Param<Tensor<B, 2>>,
    cell_bias: Param<Tensor<B, 1>>,
}

impl<B: Backend> PatchHeads<B> {
    /// Weights and biases U(-1/√d, 1/√d) as torch's `nn.Linear`, drawn from `seed`.
    pub fn init(d: usize, seed: u64, device: &B::Device) -> Self {
        let mut rng = item_rng(seed, 0x4845_4144, 0);
        let bound = 1.0 / (d as f32).sqrt();
        let mut param = |shape: Vec<usize>| {
            let n = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| rng.random_range(-bound..bound)).collect();
            TensorData::new(v, shape)
        };
        Self {
            content: Param::from_data(param(vec![d, CONTENT_CLASSES]), device),
            content_bias: Param::from_data(param(vec![CONTENT_CLASSES]), device),
            cell: Param::from_data(param(vec![d, CELL_CLASSES]), device),
            cell_bias: Param::from_data(param(vec![CELL_CLASSES]), device),
        }
    }

    /// Content and cell logits [B, P, classes] of patch features [B, P, d].
    pub fn forward(&self, h: Tensor<B, 3>) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let [b, p, d] = h.dims();
        let flat = h.reshape([b * p, d]);
        let head = |w: &Param<Tensor<B, 2>>, bias: &Param<Tensor<B, 1>>, n: usize| {
            (flat.clone().matmul(w.val()) + bias.val().unsqueeze_dim(0)).reshape([b, p, n])
        };
        (
            head(&self.content, &self.content_bias, CONTENT_CLASSES),
            head(&self.cell, &self.cell_bias, CELL_CLASSES),
        )
    }
}

/// Stage 0 (issue #18): the vision tower and [`PatchHeads`] learn, for every patch, what its
/// scene cell holds (empty, or shape × colour × size) and which cell it is, from the shapes
/// world's `scenes` annotations (images under `images`) — cross-entropy of both heads, AdamW,
/// `vision_steps` steps of `batch_size` at `vision_lr` (default `lr`) after a linear warm-up
/// of `warmup_steps`. Only the tower gets gradients; the rest of `model` is left as it is.
/// InstructBLIP's ViT comes pretrained (EVA-CLIP) and stays frozen while the Q-Former learns to
/// read it; a toy trained from scratch gets the same split of work this way. Returns the model
/// and the content accuracy over the patches of the last 10 % of steps.
pub fn pretrain_vision<B: AutodiffBackend, M>(
    model: M,
    data: &TrainData,
    scenes: &Path,
    images: &Path,
    cfg: &PretrainConfig,
    device: &B::Device,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<(M, f64)>
where
    M: VisionLanguageModel<B> + burn::module::AutodiffModule<B>,
{
    cfg.validate()?;
    if cfg.vision_steps == 0 || cfg.batch_size == 0 {
        return Err(input(
            "stage 0 needs `vision_steps` ≥ 1 and `batch_size` ≥ 1".into(),
        ));
    }
    let size = data.processor.spec.image_size;
    let [_, p, d] = model
        .vision_patches(Tensor::zeros([1, 3, size, size], device))?
        .dims();
    let grid = (p as f64).sqrt().round() as usize;
    if grid * grid != p {
        return Err(input(format!(
            "the vision tower gives {p} patch features, expected a square grid"
        )));
    }
    let labels = read_patch_labels(scenes, images, grid)?;
    if labels.len() < cfg.batch_size {
        return Err(input(format!(
            "{}: {} scenes, expected at least a batch ({})",
            scenes.display(),
            labels.len(),
            cfg.batch_size
        )));
    }
    let adamw = cfg.adamw();
    let mut optim = adamw.init::<B, (M, PatchHeads<B>)>();
    let mut pair = (model, PatchHeads::init(d, cfg.seed, device));
    let lr0 = cfg.vision_lr.unwrap_or(cfg.lr);
    let total = cfg.vision_steps;
    on_event(&TrainEvent::Start {
        total_steps: total,
        resumed_at: None,
    });
    let tail_from = total - (total / 10).max(1);
    let (mut right, mut seen) = (0usize, 0usize);
    let (mut step, mut epoch) = (0u64, 0u64);
    let mut t = Instant::now();
    let targets = |rows: &[&PatchLabels], f: fn(&PatchLabels) -> &Vec<u32>| {
        let v: Vec<i64> = rows
            .iter()
            .flat_map(|l| f(l).iter().map(|&c| c as i64))
            .collect();
        Tensor::<B, 2, Int>::from_data(TensorData::new(v, [rows.len(), p]), device)
    };
    while step < total {
        let mut order: Vec<usize> = (0..labels.len()).collect();
        order.shuffle(&mut item_rng(cfg.seed, 0x5649_5349, epoch));
        let examples = order
            .iter()
            .map(|&i| Example {
                image: labels[i].image.clone(),
                text_input: String::new(),
                text_output: None,
            })
            .collect();
        let loader = epoch_loader(examples, Texts::default(), data, cfg)?;
        for batch in loader {
            let batch = batch?;
            let rows: Vec<&PatchLabels> =
                batch.indices.iter().map(|&k| &labels[order[k]]).collect();
            let (h, w) = batch.image_size;
            let pixels = Tensor::<B, 4>::from_data(
                TensorData::new(batch.pixel_values, [rows.len(), 3, h, w]),
                device,
            );
            let (content, cell) = pair.1.forward(pair.0.vision_patches(pixels)?);
            let want = targets(&rows, |l| &l.content);
            let ones = Tensor::<B, 2>::ones([rows.len(), p], device);
            let loss = cross_entropy(content.clone(), want.clone(), ones.clone())
                + cross_entropy(cell, targets(&rows, |l| &l.cell), ones);
            let value = finite_loss(&loss, step + 1, "vision pretraining loss")?;
            step += 1;
            if step > tail_from {
                let hits: i64 = content
                    .inner()
                    .argmax(2)
                    .reshape([rows.len(), p])
                    .equal(want.inner())
                    .int()
                    .sum()
                    .into_scalar()
                    .elem();
                right += hits as usize;
                seen += rows.len() * p;
            }
            let grads = GradientsParams::from_grads(loss.backward(), &pair);
            let lr = lr0 * (step as f64 / cfg.warmup_steps.max(1) as f64).min(1.0);
            pair = optim.step(lr, pair, grads);
            on_event(&TrainEvent::Step {
                step,
                total_steps: total,
                loss: value,
                ce: value,
                kl: 0.0,
                lr,
                examples_per_s: rows.len() as f64 / t.elapsed().as_secs_f64().max(1e-9),
            });
            t = Instant::now();
            if step >= total {
                break;
            }
        }
        epoch += 1;
    }
    Ok((pair.0, right as f64 / seen.max(1) as f64))
}

/// Trains the parameters of `model` on `data.train` (eval preprocessing: the toy world's
/// answers depend on left/right, which a flip would swap) — all of them, or all but the vision
/// tower's under `freeze_vision`. Returns the model and the mean training loss of the last
/// 10 % of steps.
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
    let adamw = cfg.adamw();
    let warm = cfg.warm_examples(&data.train)?;
    if cfg.freeze_vision {
        model = model.freeze_vision();
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
        let warming = step < cfg.warm_steps;
        let mut order: Vec<usize> = if warming {
            warm.clone()
        } else {
            (0..data.train.len()).collect()
        };
        order.shuffle(&mut item_rng(cfg.seed, 0x5052_4554, epoch));
        let examples: Vec<Example> = order.iter().map(|&i| data.train[i].clone()).collect();
        let loader = epoch_loader(examples, data.processor.texts(true), data, cfg)?;
        for batch in loader {
            let batch = batch?;
            let tb = TrainBatch::<B>::new(&data.processor, &model, &batch, device)?;
            let tf = teacher_forced(&model, &tb.inputs, &tb.targets)?;
            let loss = cross_entropy(tf.logits, tf.targets, tf.mask);
            let value = finite_loss(&loss, step + 1, "loss")?;
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
            if step >= cfg.steps || (warming && step == cfg.warm_steps) {
                break;
            }
        }
        epoch += 1;
    }
    Ok((model, tail_loss / tail_n.max(1) as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(prompt: &str) -> Example {
        Example {
            image: "a.png".into(),
            text_input: prompt.into(),
            text_output: Some("x".into()),
        }
    }

    #[test]
    fn warm_examples_are_the_prompts_that_match() {
        let examples = [
            example("Question: where is the red circle? Short answer:"),
            example("a photo of"),
            example("Question: what color is the circle? Short answer:"),
            example("Question: where is the square? Short answer:"),
        ];
        let mut cfg = PretrainConfig {
            steps: 100,
            batch_size: 2,
            ..Default::default()
        };
        assert!(cfg.warm_examples(&examples).unwrap().is_empty());
        cfg.warm_steps = 10;
        cfg.warm_prompts = vec!["where is the".into()];
        assert_eq!(cfg.warm_examples(&examples).unwrap(), vec![0, 3]);
        cfg.warm_prompts.push("what color".into());
        assert_eq!(cfg.warm_examples(&examples).unwrap(), vec![0, 2, 3]);
    }

    #[test]
    fn a_warm_up_that_cannot_run_is_refused() {
        let examples = [example("a photo of"), example("where is the x")];
        let base = PretrainConfig {
            steps: 100,
            batch_size: 1,
            warm_steps: 10,
            warm_prompts: vec!["where is the".into()],
            ..Default::default()
        };
        let err = |cfg: PretrainConfig| cfg.warm_examples(&examples).unwrap_err().to_string();
        assert!(
            err(PretrainConfig {
                warm_steps: 100,
                ..base.clone()
            })
            .contains("`warm_steps`")
        );
        assert!(
            err(PretrainConfig {
                warm_prompts: vec![],
                ..base.clone()
            })
            .contains("empty")
        );
        assert!(
            err(PretrainConfig {
                warm_prompts: vec!["how many".into()],
                ..base.clone()
            })
            .contains("match 0 training examples")
        );
        assert!(
            err(PretrainConfig {
                batch_size: 2,
                ..base
            })
            .contains("at least a batch (2)")
        );
    }

    #[test]
    fn a_stage_zero_that_cannot_run_is_refused() {
        let lr_alone = PretrainConfig {
            vision_lr: Some(1e-3),
            ..Default::default()
        };
        let err = lr_alone.validate().unwrap_err().to_string();
        assert!(
            err.contains("`vision_lr` is set but `vision_steps` is 0"),
            "{err}"
        );
        for bad in [0.0, -1.0, f64::NAN] {
            let cfg = PretrainConfig {
                vision_steps: 10,
                vision_lr: Some(bad),
                ..Default::default()
            };
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains("`vision_lr` is"), "{err}");
        }
        let ok = PretrainConfig {
            vision_steps: 10,
            vision_lr: Some(1e-3),
            freeze_vision: true,
            ..Default::default()
        };
        ok.validate().unwrap();
    }

    #[test]
    fn recipes_without_a_warm_up_serialize_as_before() {
        let json = serde_json::to_string(&PretrainConfig::default()).unwrap();
        for field in [
            "warm_steps",
            "warm_prompts",
            "vision_steps",
            "vision_lr",
            "freeze_vision",
        ] {
            assert!(!json.contains(field), "{json}");
        }
        let staged = PretrainConfig {
            vision_steps: 600,
            vision_lr: Some(1e-3),
            freeze_vision: true,
            ..Default::default()
        };
        let json = serde_json::to_string(&staged).unwrap();
        assert_eq!(
            serde_json::from_str::<PretrainConfig>(&json).unwrap(),
            staged
        );
        let warm = PretrainConfig {
            warm_steps: 5,
            warm_prompts: vec!["where is the".into()],
            ..Default::default()
        };
        let json = serde_json::to_string(&warm).unwrap();
        assert_eq!(serde_json::from_str::<PretrainConfig>(&json).unwrap(), warm);
    }
}
