//! The RESSA training loop: SparseLoRA adapters trained with `(1 − λ)·CE + λ·KL` against the
//! dense path of the same weights, AdamW, warm-up + cosine, gradient accumulation and global
//! norm clipping, a seeded data order, periodic validation and atomic checkpoints from which a
//! resumed run continues bit-identically (on a deterministic backend).
//!
//! Data order: epoch `e` visits the training examples in a permutation drawn from
//! `(seed, e)`; augmentation is seeded by `(seed, e, position)`. Both depend only on the
//! step, so a checkpoint needs no RNG state: `(step, epoch, position)` says where to go on.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use burn::module::{AutodiffModule, Param};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use rand::seq::SliceRandom;
use ressa_data::augment::TrainTransform;
use ressa_data::loader::{Batch, Example, ImageTransform, Loader, LoaderConfig};
use ressa_data::rng::item_rng;
use ressa_models::lm::TeacherForced;
use ressa_models::prunable::prunable_linears;
use ressa_models::vlm::teacher_forced;
use ressa_models::{Processor, VisionLanguageModel, VlmInputs};
use serde::{Deserialize, Serialize};

use crate::adamw::{AdamW, AdamWConfig, Moments};
use crate::checkpoint::{self, Checkpoint, HostTensor, TrainState};
use crate::distill::{DistillConfig, distill_loss};
use crate::error::{Result, TrainError};
use crate::sparse_lora::{AdapterConfig, dense_path, for_each_linear_mut};

/// Random stream of the epoch permutations (see `ressa_data::rng`).
const SHUFFLE_STREAM: u64 = 0x5348_5546;

/// Learning-rate schedule after the warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    Constant,
    #[default]
    Cosine,
}

/// Everything that shapes a RESSA run (the TOML `[train]` table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Optimizer steps; 0 = one epoch.
    pub steps: u64,
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub schedule: Schedule,
    /// Global gradient-norm clipping (`torch.nn.utils.clip_grad_norm_`); `None` = off.
    pub clip_grad_norm: Option<f64>,
    pub adamw: AdamWConfig,
    pub distill: DistillConfig,
    pub adapters: AdapterConfig,
    pub seed: u64,
    /// Random resized crop + flip on training images (the reference's `blip2_image_train`).
    pub augment: bool,
    /// Validate every N steps (and at the start and the end); 0 = start and end only.
    pub val_every: u64,
    /// Checkpoint every N steps (and at the end); 0 = at the end only.
    pub checkpoint_every: u64,
    pub keep_checkpoints: usize,
    /// Data-parallel peers (threads on one CPU backend, or one per device): each takes
    /// `batch_size / devices` rows of every batch, so `batch_size` stays the global batch.
    /// Left out of the serialized form when 1 (fingerprints and cache keys of one-device runs
    /// stay as they were).
    #[serde(skip_serializing_if = "is_one")]
    pub devices: usize,
    /// Several processes (nodes), each with `devices` peers: set by the command line
    /// (`--nodes`, `--node-rank`, `--coordinator`, `--node-address`), never serialized.
    #[serde(skip)]
    pub cluster: Option<crate::cluster::Cluster>,
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 0,
            batch_size: 8,
            grad_accum: 1,
            lr: 1e-4,
            min_lr: 0.0,
            warmup_steps: 0,
            schedule: Schedule::Cosine,
            clip_grad_norm: None,
            adamw: AdamWConfig::default(),
            distill: DistillConfig::default(),
            adapters: AdapterConfig::default(),
            seed: 0,
            augment: true,
            val_every: 0,
            checkpoint_every: 0,
            keep_checkpoints: 2,
            devices: 1,
            cluster: None,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, msg: String| Err(TrainError::config(field, msg));
        if self.batch_size == 0 {
            return bad("batch_size", "batch_size: expected at least 1".into());
        }
        if self.grad_accum == 0 {
            return bad("grad_accum", "grad_accum: expected at least 1".into());
        }
        if self.devices == 0 {
            return bad("devices", "devices: expected at least 1".into());
        }
        if !self.batch_size.is_multiple_of(self.devices) {
            return bad(
                "batch_size",
                format!(
                    "batch_size {} is not divisible by devices {} (the batch size is the global batch; every device takes an equal share)",
                    self.batch_size, self.devices
                ),
            );
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr", format!("lr {}: expected a positive number", self.lr));
        }
        if !(self.min_lr >= 0.0 && self.min_lr.is_finite()) {
            return bad(
                "min_lr",
                format!("min_lr {}: expected a non-negative number", self.min_lr),
            );
        }
        if let Some(c) = self.clip_grad_norm
            && !(c > 0.0 && c.is_finite())
        {
            return bad(
                "clip_grad_norm",
                format!("clip_grad_norm {c}: expected a positive number"),
            );
        }
        for (field, r) in [
            ("adapters.vision.rank", self.adapters.vision),
            ("adapters.qformer.rank", self.adapters.qformer),
            ("adapters.language.rank", self.adapters.language),
        ] {
            if !(r.alpha.is_finite() && r.alpha > 0.0) {
                return bad(
                    field,
                    format!("{field}: alpha {} must be positive", r.alpha),
                );
            }
        }
        self.adamw.validate()?;
        self.distill.validate()
    }

    /// Learning rate of optimizer step `step` (1-based): linear warm-up, then constant or
    /// cosine down to `min_lr` at `total`.
    pub fn lr_at(&self, step: u64, total: u64) -> f64 {
        if step <= self.warmup_steps && self.warmup_steps > 0 {
            return self.lr * step as f64 / self.warmup_steps as f64;
        }
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Cosine => {
                let span = total.saturating_sub(self.warmup_steps).max(1) as f64;
                let done = (step.saturating_sub(self.warmup_steps)).min(total) as f64 - 1.0;
                let progress = (done.max(0.0) / span).min(1.0);
                self.min_lr
                    + 0.5
                        * (self.lr - self.min_lr)
                        * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

/// The data of a run: examples, and the processor that turns them into model inputs.
pub struct TrainData {
    pub train: Vec<Example>,
    pub val: Vec<Example>,
    pub processor: Processor,
    /// Image decoding threads (0 = all CPUs).
    pub loader_threads: usize,
}

/// Validation results (means over target tokens).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Validation {
    pub step: u64,
    pub loss: f64,
    pub ce: f64,
    pub kl: f64,
    /// Fraction of target tokens the student predicts (teacher-forced argmax).
    pub token_accuracy: f64,
    pub tokens: usize,
}

/// What the loop reports as it goes.
#[derive(Debug, Clone)]
pub enum TrainEvent {
    Start {
        total_steps: u64,
        resumed_at: Option<u64>,
    },
    Step {
        step: u64,
        total_steps: u64,
        loss: f64,
        ce: f64,
        kl: f64,
        lr: f64,
        examples_per_s: f64,
    },
    Validation(Validation),
    Checkpoint {
        step: u64,
        path: std::path::PathBuf,
    },
}

/// Summary of a run.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    pub steps: u64,
    pub resumed_at: Option<u64>,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub validations: Vec<Validation>,
    pub seconds: f64,
    pub steps_per_s: f64,
}

/// FNV-1a of the settings and the data list: a resume must see the same run.
fn fingerprint(cfg: &TrainConfig, data: &TrainData) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    // Settings that do not change the trajectory may differ between the run and its resume.
    let mut c = cfg.clone();
    c.val_every = 0;
    c.checkpoint_every = 0;
    c.keep_checkpoints = 0;
    // The device count changes the float summation order only: a run may resume on another.
    c.devices = 1;
    eat(serde_json::to_string(&c).expect("json").as_bytes());
    for e in &data.train {
        eat(e.image.to_string_lossy().as_bytes());
        eat(e.text_input.as_bytes());
        eat(e.text_output.as_deref().unwrap_or("").as_bytes());
    }
    format!("{h:016x}")
}

pub(crate) fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut item_rng(seed, SHUFFLE_STREAM, epoch));
    order
}

pub(crate) fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
    t.into_scalar().elem::<f64>()
}

fn host2<B: Backend>(t: Tensor<B, 2>) -> HostTensor {
    (
        t.dims().to_vec(),
        t.into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .expect("f32 data"),
    )
}

pub(crate) fn device_tensor<B: Backend>(
    (shape, values): &HostTensor,
    expect: [usize; 2],
    name: &str,
    device: &B::Device,
) -> Result<Tensor<B, 2>> {
    if shape.as_slice() != expect {
        return Err(TrainError::Input(format!(
            "{name}: checkpoint shape {shape:?}, the model's adapter is {expect:?}"
        )));
    }
    if let Some(v) = values.iter().find(|v| !v.is_finite()) {
        return Err(TrainError::Input(format!(
            "{name}: the checkpoint holds the non-finite value {v}"
        )));
    }
    Ok(Tensor::from_data(
        TensorData::new(values.clone(), expect),
        device,
    ))
}

/// One batch as model inputs and the target rows teacher-forced after each prompt.
#[derive(Debug, Clone)]
pub struct TrainBatch<B: Backend> {
    pub inputs: VlmInputs<B>,
    pub targets: Vec<Vec<u32>>,
}

impl<B: Backend> TrainBatch<B> {
    /// A loader batch through the run's processor.
    pub fn new<M: VisionLanguageModel<B>>(
        processor: &Processor,
        model: &M,
        batch: &Batch,
        device: &B::Device,
    ) -> Result<Self> {
        let (inputs, targets) = processor.training_batch(model, batch, device)?;
        Ok(Self { inputs, targets })
    }

    /// The same batch without autodiff (teacher and validation passes).
    pub fn inner(&self) -> TrainBatch<B::InnerBackend>
    where
        B: AutodiffBackend,
    {
        let i = &self.inputs;
        TrainBatch {
            inputs: VlmInputs {
                pixel_values: i.pixel_values.clone().inner(),
                qformer_text: i
                    .qformer_text
                    .clone()
                    .map(|(ids, m)| (ids.inner(), m.inner())),
                input_ids: i.input_ids.clone().inner(),
                attention_mask: i.attention_mask.clone().inner(),
            },
            targets: self.targets.clone(),
        }
    }
}

/// Adapter tensors by name (`{linear}.lora_A` / `.lora_B`), host copies.
pub fn adapter_tensors<B: Backend, M: VisionLanguageModel<B>>(
    model: &M,
) -> BTreeMap<String, HostTensor> {
    let mut out = BTreeMap::new();
    for (_, linear) in prunable_linears(model) {
        if let Some(a) = &linear.adapter {
            out.insert(format!("{}.lora_A", linear.key), host2(a.lora_a.val()));
            out.insert(format!("{}.lora_B", linear.key), host2(a.lora_b.val()));
        }
    }
    out
}

/// Sets every adapter's values from `tensors` (all must be present, with matching shapes).
pub fn load_adapter_tensors<B: AutodiffBackend, M: VisionLanguageModel<B>>(
    model: &mut M,
    tensors: &BTreeMap<String, HostTensor>,
    device: &B::Device,
) -> Result<()> {
    let mut error = None;
    let mut used = 0;
    for_each_linear_mut(model, |name, _, linear| {
        let Some(a) = linear.adapter.as_mut() else {
            return;
        };
        for (suffix, param) in [("lora_A", &mut a.lora_a), ("lora_B", &mut a.lora_b)] {
            let key = format!("{name}.{suffix}");
            match tensors.get(&key) {
                None => {
                    error = error.take().or(Some(TrainError::Input(format!(
                        "{key}: missing from the checkpoint"
                    ))))
                }
                Some(t) => match device_tensor::<B>(t, param.dims(), &key, device) {
                    Ok(v) => {
                        used += 1;
                        *param = Param::initialized(param.id, v.require_grad());
                    }
                    Err(e) => error = error.take().or(Some(e)),
                },
            }
        }
    });
    if let Some(e) = error {
        return Err(e);
    }
    if used != tensors.len() {
        return Err(TrainError::Input(format!(
            "the checkpoint has {} adapter tensors, the model {used}",
            tensors.len()
        )));
    }
    Ok(())
}

/// Validation over `examples` (eval preprocessing, no augmentation).
pub fn validate<B: AutodiffBackend, M>(
    model: &M,
    data: &TrainData,
    cfg: &TrainConfig,
    step: u64,
    device: &B::Device,
) -> Result<Validation>
where
    M: VisionLanguageModel<B> + AutodiffModule<B>,
    M::InnerModule: VisionLanguageModel<B::InnerBackend>,
{
    let student = model.valid();
    let teacher = dense_path(model.valid());
    let loader = Loader::new(
        data.val.clone(),
        ImageTransform::Eval(data.processor.image.clone()),
        data.processor.texts(true),
        LoaderConfig {
            batch_size: cfg.batch_size,
            threads: data.loader_threads,
            ..Default::default()
        },
    )?;
    let (mut loss, mut ce, mut kl, mut correct, mut tokens) = (0.0, 0.0, 0.0, 0.0, 0usize);
    for batch in loader {
        let batch = batch?;
        let tb = TrainBatch::<B::InnerBackend>::new(&data.processor, &student, &batch, device)?;
        let s = teacher_forced(&student, &tb.inputs, &tb.targets)?;
        let t = teacher_forced(&teacher, &tb.inputs, &tb.targets)?;
        let parts = distill_loss(
            s.logits.clone(),
            t.logits,
            s.targets.clone(),
            s.mask.clone(),
            &cfg.distill,
        );
        let [b, l, _] = s.logits.dims();
        let hits = s
            .logits
            .argmax(2)
            .reshape([b, l])
            .equal(s.targets.clone())
            .float()
            * s.mask.clone();
        let n = s.tokens as f64;
        loss += scalar(parts.loss) * n;
        ce += scalar(parts.ce) * n;
        kl += scalar(parts.kl) * n;
        correct += scalar(hits.sum());
        tokens += s.tokens;
    }
    let n = tokens.max(1) as f64;
    Ok(Validation {
        step,
        loss: loss / n,
        ce: ce / n,
        kl: kl / n,
        token_accuracy: correct / n,
        tokens,
    })
}

/// Adapter gradients by name (`{linear}.lora_A` / `.lora_B`).
pub type AdapterGrads<B> = BTreeMap<String, Tensor<<B as AutodiffBackend>::InnerBackend, 2>>;

/// The student's teacher-forced output and the teacher's logits: the dense path of the same
/// model (no gradient) when distilling, else the student's own logits detached.
pub(crate) fn student_and_teacher<B: AutodiffBackend, M>(
    model: &M,
    batch: &TrainBatch<B>,
    cfg: &TrainConfig,
) -> Result<(TeacherForced<B>, Tensor<B, 3>)>
where
    M: VisionLanguageModel<B> + AutodiffModule<B>,
    M::InnerModule: VisionLanguageModel<B::InnerBackend>,
{
    let student = teacher_forced(model, &batch.inputs, &batch.targets)?;
    let teacher = if cfg.distill.lambda > 0.0 {
        let t = dense_path(model.valid());
        let inner = batch.inner();
        Tensor::from_inner(teacher_forced(&t, &inner.inputs, &inner.targets)?.logits)
    } else {
        student.logits.clone().detach()
    };
    Ok((student, teacher))
}

/// One micro-batch: student forward, teacher forward (dense path, no graph), the loss scaled
/// by `1 / grad_accum`, backward. Returns the adapter gradients and (loss, CE, KL).
pub fn forward_backward<B: AutodiffBackend, M>(
    model: &mut M,
    batch: &TrainBatch<B>,
    cfg: &TrainConfig,
) -> Result<(AdapterGrads<B>, (f64, f64, f64))>
where
    M: VisionLanguageModel<B> + AutodiffModule<B>,
    M::InnerModule: VisionLanguageModel<B::InnerBackend>,
{
    let (student, teacher) = student_and_teacher(&*model, batch, cfg)?;
    let parts = distill_loss(
        student.logits,
        teacher,
        student.targets,
        student.mask,
        &cfg.distill,
    );
    let values = (
        scalar(parts.loss.clone()),
        scalar(parts.ce.clone()),
        scalar(parts.kl.clone()),
    );
    let g = parts.loss.div_scalar(cfg.grad_accum as f64).backward();
    let mut grads = BTreeMap::new();
    for_each_linear_mut(model, |name, _, linear| {
        if let Some(a) = &linear.adapter {
            for (suffix, p) in [("lora_A", &a.lora_a), ("lora_B", &a.lora_b)] {
                if let Some(gr) = p.val().grad(&g) {
                    grads.insert(format!("{name}.{suffix}"), gr);
                }
            }
        }
    });
    Ok((grads, values))
}

/// One optimizer step on the adapters: global-norm clipping, then AdamW at `lr`. Consumes
/// `grads`. A non-finite gradient norm changes nothing and is an error naming `step`.
pub fn apply_update<B: AutodiffBackend, M: VisionLanguageModel<B>>(
    model: &mut M,
    grads: &mut AdapterGrads<B>,
    opt: &mut AdamW<B::InnerBackend>,
    lr: f64,
    clip_grad_norm: Option<f64>,
    step: u64,
) -> Result<()> {
    let sq: f64 = grads
        .values()
        .map(|g| scalar(g.clone().powi_scalar(2).sum()))
        .sum();
    let norm = sq.sqrt();
    if !norm.is_finite() {
        grads.clear();
        return Err(TrainError::NonFinite {
            step,
            what: "gradient norm",
            value: norm,
        });
    }
    if let Some(max) = clip_grad_norm
        && norm > max
    {
        let f = max / (norm + 1e-6);
        for g in grads.values_mut() {
            *g = g.clone().mul_scalar(f);
        }
    }
    opt.begin_step();
    for_each_linear_mut(model, |name, _, linear| {
        if let Some(a) = linear.adapter.as_mut() {
            for (suffix, p) in [("lora_A", &mut a.lora_a), ("lora_B", &mut a.lora_b)] {
                let key = format!("{name}.{suffix}");
                if let Some(gr) = grads.remove(&key) {
                    let new = opt.update(&key, p.val().inner(), gr, lr);
                    *p = Param::initialized(p.id, Tensor::from_inner(new).require_grad());
                }
            }
        }
    });
    grads.clear();
    Ok(())
}

/// Every adapter value finite (checked before a checkpoint or a model is written).
pub(crate) fn check_finite_adapters<B: Backend, M: VisionLanguageModel<B>>(
    model: &M,
    step: u64,
) -> Result<()> {
    for (_, linear) in prunable_linears(model) {
        if let Some(a) = &linear.adapter {
            for t in [a.lora_a.val(), a.lora_b.val()] {
                let bad: f64 = t.clone().is_nan().int().sum().into_scalar().elem::<f64>()
                    + t.is_inf().int().sum().into_scalar().elem::<f64>();
                if bad > 0.0 {
                    return Err(TrainError::NonFinite {
                        step,
                        what: "adapter",
                        value: f64::NAN,
                    });
                }
            }
        }
    }
    Ok(())
}

/// Optimizer steps of a run over `examples` training examples.
pub(crate) fn total_steps(cfg: &TrainConfig, examples: usize) -> u64 {
    let per_epoch = examples.div_ceil(cfg.batch_size * cfg.grad_accum) as u64;
    if cfg.steps == 0 { per_epoch } else { cfg.steps }
}

/// The image transform of epoch `epoch`.
pub(crate) fn epoch_transform(cfg: &TrainConfig, data: &TrainData, epoch: u64) -> ImageTransform {
    if cfg.augment {
        ImageTransform::Train {
            transform: TrainTransform::from_processor(&data.processor.image),
            seed: cfg.seed,
            epoch,
        }
    } else {
        ImageTransform::Eval(data.processor.image.clone())
    }
}

/// Where a run starts: its state and optimizer, and the step it resumed at. With `resume`,
/// the newest checkpoint in `checkpoints` (if any) is loaded into `model` and the optimizer.
pub(crate) fn start_state<B: AutodiffBackend, M>(
    model: &mut M,
    data: &TrainData,
    cfg: &TrainConfig,
    checkpoints: Option<&Path>,
    resume: bool,
    device: &B::Device,
) -> Result<(TrainState, AdamW<B::InnerBackend>, Option<u64>)>
where
    M: VisionLanguageModel<B> + AutodiffModule<B>,
{
    let fp = fingerprint(cfg, data);
    let mut opt = AdamW::<B::InnerBackend>::new(cfg.adamw);
    let mut state = TrainState {
        step: 0,
        epoch: 0,
        position: 0,
        fingerprint: fp.clone(),
    };
    let mut resumed_at = None;
    if resume {
        let dir = checkpoints
            .ok_or_else(|| TrainError::Input("resume needs a checkpoint directory".into()))?;
        if let Some(ckpt) = checkpoint::latest(dir)? {
            if ckpt.state.fingerprint != fp {
                return Err(TrainError::file(
                    dir,
                    format!(
                        "the checkpoint was written by a run with other settings or data (fingerprint {} vs {fp})",
                        ckpt.state.fingerprint
                    ),
                ));
            }
            let total = total_steps(cfg, data.train.len());
            if ckpt.state.step > total || ckpt.state.position > data.train.len() as u64 {
                return Err(TrainError::file(
                    dir,
                    format!(
                        "the checkpoint claims step {} and data position {}, but this run has {total} steps and {} examples",
                        ckpt.state.step,
                        ckpt.state.position,
                        data.train.len()
                    ),
                ));
            }
            // Tensor problems name the checkpoint they came from.
            let at = checkpoint::step_dir(dir, ckpt.state.step);
            let in_ckpt = |e: TrainError| match e {
                TrainError::Input(m) => TrainError::file(&at, m),
                e => e,
            };
            load_adapter_tensors(model, &ckpt.adapters, device).map_err(in_ckpt)?;
            opt.steps = ckpt.state.step;
            for (key, t) in &ckpt.adapters {
                let m = ckpt.moments.get(&format!("{key}.m"));
                let v = ckpt.moments.get(&format!("{key}.v"));
                if let (Some(m), Some(v)) = (m, v) {
                    let shape = [t.0[0], t.0[1]];
                    opt.moments.insert(
                        key.clone(),
                        Moments {
                            m: device_tensor(m, shape, key, device).map_err(in_ckpt)?,
                            v: device_tensor(v, shape, key, device).map_err(in_ckpt)?,
                        },
                    );
                }
            }
            resumed_at = Some(ckpt.state.step);
            state = ckpt.state;
        }
    }
    Ok((state, opt, resumed_at))
}

/// Writes a checkpoint of `model`'s adapters, the optimizer and `state` to `checkpoints`
/// (nothing without a directory); refuses non-finite adapters.
pub(crate) fn save_checkpoint<B: AutodiffBackend, M: VisionLanguageModel<B>>(
    checkpoints: Option<&Path>,
    model: &M,
    opt: &AdamW<B::InnerBackend>,
    state: &TrainState,
    cfg: &TrainConfig,
) -> Result<Option<std::path::PathBuf>> {
    let Some(dir) = checkpoints else {
        return Ok(None);
    };
    check_finite_adapters(model, state.step)?;
    let mut moments = BTreeMap::new();
    for (k, m) in &opt.moments {
        moments.insert(format!("{k}.m"), host2(m.m.clone()));
        moments.insert(format!("{k}.v"), host2(m.v.clone()));
    }
    let ckpt = Checkpoint {
        state: state.clone(),
        adapters: adapter_tensors(model),
        moments,
    };
    checkpoint::save(dir, &ckpt, cfg.keep_checkpoints).map(Some)
}

/// Trains the adapters already attached to `model` (see [`crate::sparse_lora::attach`]).
/// With `checkpoints`, writes checkpoints there; with `resume`, continues from the newest one.
/// With `cfg.devices` > 1, runs that many data-parallel peers on `device` (see
/// [`train_on`] for one peer per device).
pub fn train<B: AutodiffBackend, M>(
    model: M,
    data: &TrainData,
    cfg: &TrainConfig,
    checkpoints: Option<&Path>,
    resume: bool,
    device: &B::Device,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<(M, TrainReport)>
where
    M: VisionLanguageModel<B> + AutodiffModule<B>,
    M::InnerModule: VisionLanguageModel<B::InnerBackend>,
{
    if cfg.devices > 1 || cfg.cluster.is_some() {
        let devices = vec![device.clone(); cfg.devices];
        return crate::parallel::train_parallel(
            model,
            data,
            cfg,
            checkpoints,
            resume,
            &devices,
            on_event,
        );
    }
    train_one(model, data, cfg, checkpoints, resume, device, on_event)
}

/// [`train`] with one data-parallel peer per device of `devices` (`cfg.devices` of them; the
/// same device may repeat, as the threads of one CPU backend do). `model` lives on
/// `devices[0]`; the other peers get copies.
pub fn train_on<B: AutodiffBackend, M>(
    model: M,
    data: &TrainData,
    cfg: &TrainConfig,
    checkpoints: Option<&Path>,
    resume: bool,
    devices: &[B::Device],
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<(M, TrainReport)>
where
    M: VisionLanguageModel<B> + AutodiffModule<B>,
    M::InnerModule: VisionLanguageModel<B::InnerBackend>,
{
    if devices.len() != cfg.devices {
        return Err(TrainError::config(
            "devices",
            format!(
                "devices: the run is set up for {} devices but {} were given",
                cfg.devices,
                devices.len()
            ),
        ));
    }
    match devices {
        [device] if cfg.cluster.is_none() => {
            train_one(model, data, cfg, checkpoints, resume, device, on_event)
        }
        _ => crate::parallel::train_parallel(
            model,
            data,
            cfg,
            checkpoints,
            resume,
            devices,
            on_event,
        ),
    }
}

/// The one-device loop.
fn train_one<B: AutodiffBackend, M>(
    mut model: M,
    data: &TrainData,
    cfg: &TrainConfig,
    checkpoints: Option<&Path>,
    resume: bool,
    device: &B::Device,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<(M, TrainReport)>
where
    M: VisionLanguageModel<B> + AutodiffModule<B>,
    M::InnerModule: VisionLanguageModel<B::InnerBackend>,
{
    cfg.validate()?;
    if data.train.is_empty() {
        return Err(TrainError::Input("no training examples".into()));
    }
    let start = Instant::now();
    let (mut state, mut opt, resumed_at) =
        start_state(&mut model, data, cfg, checkpoints, resume, device)?;
    let total = total_steps(cfg, data.train.len());
    on_event(&TrainEvent::Start {
        total_steps: total,
        resumed_at,
    });
    let mut validations = Vec::new();
    let val = |model: &M, step| validate(model, data, cfg, step, device);
    if resumed_at.is_none() && !data.val.is_empty() {
        let v = val(&model, 0)?;
        on_event(&TrainEvent::Validation(v));
        validations.push(v);
    }
    let save = |model: &M, opt: &AdamW<B::InnerBackend>, state: &TrainState| {
        save_checkpoint(checkpoints, model, opt, state, cfg)
    };

    let (mut first_loss, mut last_loss) = (None, None);
    let steps_at_start = state.step;
    let mut grads: BTreeMap<String, Tensor<B::InnerBackend, 2>> = BTreeMap::new();
    let (mut micro, mut window_loss, mut window_ce, mut window_kl) = (0usize, 0.0, 0.0, 0.0);
    let mut window_start = Instant::now();
    let mut window_examples = 0usize;
    let mut last_saved = state.step;
    while state.step < total {
        let order = epoch_order(data.train.len(), cfg.seed, state.epoch);
        let examples: Vec<Example> = order.iter().map(|&i| data.train[i].clone()).collect();
        let transform = epoch_transform(cfg, data, state.epoch);
        let loader = Loader::starting_at(
            examples,
            transform,
            data.processor.texts(true),
            LoaderConfig {
                batch_size: cfg.batch_size,
                threads: data.loader_threads,
                ..Default::default()
            },
            state.position as usize,
        )?;
        let mut batches = loader.peekable();
        while let Some(batch) = batches.next() {
            let batch = batch?;
            let tb = TrainBatch::<B>::new(&data.processor, &model, &batch, device)?;
            let (g, parts) = forward_backward(&mut model, &tb, cfg)?;
            if !parts.0.is_finite() {
                return Err(TrainError::NonFinite {
                    step: state.step + 1,
                    what: "loss",
                    value: parts.0,
                });
            }
            window_loss += parts.0;
            window_ce += parts.1;
            window_kl += parts.2;
            for (key, gr) in g {
                let sum = match grads.remove(&key) {
                    Some(prev) => prev + gr,
                    None => gr,
                };
                grads.insert(key, sum);
            }
            micro += 1;
            window_examples += batch.len();
            state.position += batch.len() as u64;
            let epoch_done = batches.peek().is_none();
            if micro < cfg.grad_accum && !epoch_done {
                continue;
            }
            // One optimizer step.
            state.step += 1;
            let lr = cfg.lr_at(state.step, total);
            apply_update(
                &mut model,
                &mut grads,
                &mut opt,
                lr,
                cfg.clip_grad_norm,
                state.step,
            )?;
            grads.clear();
            let n = micro as f64;
            let loss = window_loss / n;
            first_loss.get_or_insert(loss);
            last_loss = Some(loss);
            let secs = window_start.elapsed().as_secs_f64().max(1e-9);
            on_event(&TrainEvent::Step {
                step: state.step,
                total_steps: total,
                loss,
                ce: window_ce / n,
                kl: window_kl / n,
                lr,
                examples_per_s: window_examples as f64 / secs,
            });
            (micro, window_loss, window_ce, window_kl, window_examples) = (0, 0.0, 0.0, 0.0, 0);
            window_start = Instant::now();
            if cfg.val_every > 0 && state.step.is_multiple_of(cfg.val_every) && state.step < total {
                let v = val(&model, state.step)?;
                on_event(&TrainEvent::Validation(v));
                validations.push(v);
            }
            if epoch_done {
                state.epoch += 1;
                state.position = 0;
            }
            if cfg.checkpoint_every > 0 && state.step.is_multiple_of(cfg.checkpoint_every) {
                if let Some(path) = save(&model, &opt, &state)? {
                    on_event(&TrainEvent::Checkpoint {
                        step: state.step,
                        path,
                    });
                }
                last_saved = state.step;
            }
            if state.step >= total {
                break;
            }
        }
        if state.position as usize >= data.train.len() {
            // An epoch that ended with no batch left (resumed at its very end).
            state.epoch += 1;
            state.position = 0;
        }
    }
    if last_saved != state.step
        && let Some(path) = save(&model, &opt, &state)?
    {
        on_event(&TrainEvent::Checkpoint {
            step: state.step,
            path,
        });
    }
    if !data.val.is_empty() {
        let v = val(&model, state.step)?;
        on_event(&TrainEvent::Validation(v));
        validations.push(v);
    }
    check_finite_adapters(&model, state.step)?;
    let seconds = start.elapsed().as_secs_f64();
    let done = state.step - steps_at_start;
    Ok((
        model,
        TrainReport {
            steps: state.step,
            resumed_at,
            first_loss,
            last_loss,
            validations,
            seconds,
            steps_per_s: done as f64 / seconds.max(1e-9),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_decay() {
        let cfg = TrainConfig {
            lr: 1.0,
            min_lr: 0.1,
            warmup_steps: 2,
            ..Default::default()
        };
        assert!((cfg.lr_at(1, 10) - 0.5).abs() < 1e-12);
        assert!((cfg.lr_at(2, 10) - 1.0).abs() < 1e-12);
        assert!((cfg.lr_at(3, 10) - 1.0).abs() < 1e-12);
        assert!(
            (cfg.lr_at(10, 10) - (0.1 + 0.45 * (1.0 + (std::f64::consts::PI * 7.0 / 8.0).cos())))
                .abs()
                < 1e-12
        );
        let lrs: Vec<f64> = (3..=10).map(|s| cfg.lr_at(s, 10)).collect();
        assert!(lrs.windows(2).all(|w| w[1] <= w[0]), "{lrs:?}");
    }

    #[test]
    fn epoch_orders_are_seeded_permutations() {
        let a = epoch_order(50, 3, 0);
        assert_eq!(a, epoch_order(50, 3, 0));
        assert_ne!(a, epoch_order(50, 3, 1));
        let mut s = a.clone();
        s.sort_unstable();
        assert_eq!(s, (0..50).collect::<Vec<_>>());
    }
}
