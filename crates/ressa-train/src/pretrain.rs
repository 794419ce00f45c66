//! Dense training of every parameter from scratch (the toy world's model, issue #6): token-mean
//! CE on the targets, burn's AdamW, linear warm-up then cosine. No teacher, no adapters.
//! An optional curriculum (issue #18) trains the first steps on the examples whose prompt
//! matches (e.g. "where is the" questions) before the mix.

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
    /// Curriculum: the first `warm_steps` steps draw only the examples whose prompt contains
    /// one of `warm_prompts` (e.g. `"where is the"`), the rest every example; the learning-rate
    /// schedule runs over all `steps`. 0 = none. (Left out of the serialized form when unset,
    /// so the runner's cache keys of recipes without it stay as they were.)
    #[serde(skip_serializing_if = "is_zero")]
    pub warm_steps: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warm_prompts: Vec<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
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
        }
    }
}

fn input(what: String) -> TrainError {
    TrainError::Input(format!("pretrain: {what}"))
}

impl PretrainConfig {
    /// Checks the warm-up settings alone, before any data is read: a warm-up as long as the
    /// run, steps without prompts or prompts without steps are refused.
    pub fn validate(&self) -> Result<()> {
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
    let warm = cfg.warm_examples(&data.train)?;
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
    fn recipes_without_a_warm_up_serialize_as_before() {
        let json = serde_json::to_string(&PretrainConfig::default()).unwrap();
        assert!(
            !json.contains("warm_steps") && !json.contains("warm_prompts"),
            "{json}"
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
