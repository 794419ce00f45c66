//! A whole RESSA repair, as `ressa repair` and experiment configs run it: the dense model (the
//! teacher's and the student's `W`), masks from the pruned model (its `masks.safetensors`
//! sidecar, or its zeros), SparseLoRA attached, trained, merged with exactly the pruned zeros
//! and written as an HF directory, plus the adapters alone in PEFT's layout.
//!
//! ```toml
//! pruned = "out/wanda-50"          # the pruned model directory
//! dense = "models/instructblip"    # the dense model (teacher); optional when lambda = 0
//! out = "out/wanda-50-ressa"
//! [data]
//! train = "data/cc3m/train.json"   # LAVIS caption list or VQA train list
//! images = "data/cc3m/images"
//! val = "data/cc3m/val.json"       # optional held-out list of the same format
//! [train]                          # see TrainConfig; all optional
//! steps = 390
//! batch_size = 8
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use ressa_data::lavis::{image_path, read_caption_list, read_vqa_train};
use ressa_data::loader::Example;
use ressa_data::prompts::{CAPTION_PROMPT, MAX_WORDS, pre_caption, pre_question, vqa_prompt};
use ressa_models::nn::host_f32;
use ressa_models::pretrained::save_model_dir_with;
use ressa_models::prunable::{Prunable, prunable_linears};
use ressa_models::weights::WeightStore;
use ressa_models::{
    AutodiffFamilyVisitor, ModelError, Pretrained, Processor, VisionLanguageModel,
    visit_family_autodiff,
};
use ressa_sparse::Mask;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::sparse_lora::{
    AdapterValues, AttachReport, StudentWeights, adapter_values, attach, merge, write_peft_adapters,
};
use crate::trainer::{TrainConfig, TrainData, TrainEvent, TrainReport, train_on};

/// Training data files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// LAVIS caption list `[{"image", "caption"}]` or VQA train list
    /// `[{"question_id", "question", "answer": [...], "image"}]`.
    pub train: PathBuf,
    /// Image root of the lists.
    pub images: PathBuf,
    /// Held-out list of the same format (validation loss and token accuracy).
    #[serde(default)]
    pub val: Option<PathBuf>,
    /// Prompt of caption items (default: LAVIS' "a photo of").
    #[serde(default)]
    pub caption_prompt: Option<String>,
    /// Use at most this many training examples (the first N).
    #[serde(default)]
    pub max_examples: Option<usize>,
}

/// One repair run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepairConfig {
    pub pruned: PathBuf,
    #[serde(default)]
    pub dense: Option<PathBuf>,
    pub out: PathBuf,
    pub data: DataConfig,
    #[serde(default)]
    pub train: TrainConfig,
    /// Checkpoint directory (default: `{out}.checkpoints`).
    #[serde(default)]
    pub checkpoints: Option<PathBuf>,
}

impl RepairConfig {
    /// Reads a TOML file; relative paths in it are relative to the file's directory.
    pub fn from_toml(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::file(path, e))?;
        let mut cfg: RepairConfig = toml::from_str(&text)
            .map_err(|e| TrainError::file(path, e.to_string().replace('\n', " ")))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut cfg.pruned);
        fix(&mut cfg.out);
        fix(&mut cfg.data.train);
        fix(&mut cfg.data.images);
        if let Some(p) = cfg.dense.as_mut() {
            fix(p);
        }
        if let Some(p) = cfg.data.val.as_mut() {
            fix(p);
        }
        if let Some(p) = cfg.checkpoints.as_mut() {
            fix(p);
        }
        Ok(cfg)
    }

    pub fn checkpoint_dir(&self) -> PathBuf {
        self.checkpoints.clone().unwrap_or_else(|| {
            let mut s = self.out.clone().into_os_string();
            s.push(".checkpoints");
            PathBuf::from(s)
        })
    }
}

/// Examples of a LAVIS caption or VQA train list (told apart by the first item's keys).
pub fn read_examples(
    annotations: &Path,
    images: &Path,
    caption_prompt: &str,
) -> Result<Vec<Example>> {
    let text =
        std::fs::read_to_string(annotations).map_err(|e| TrainError::file(annotations, e))?;
    let is_vqa = serde_json::from_str::<serde_json::Value>(&text)
        .map_err(|e| TrainError::file(annotations, e))?
        .get(0)
        .and_then(|v| v.get("question"))
        .is_some();
    if is_vqa {
        read_vqa_train(annotations)?
            .into_iter()
            .map(|it| {
                // The most frequent answer (first on ties), as LAVIS' single-answer targets.
                let answer = it
                    .answer_weights()
                    .into_iter()
                    .fold(None::<(String, f64)>, |best, (a, w)| match best {
                        Some((_, bw)) if bw >= w => best,
                        _ => Some((a, w)),
                    })
                    .map(|(a, _)| a)
                    .unwrap_or_default();
                Ok(Example {
                    image: image_path(images, &it.image, annotations)?,
                    text_input: vqa_prompt(&pre_question(&it.question, MAX_WORDS)),
                    text_output: Some(answer),
                })
            })
            .collect()
    } else {
        read_caption_list(annotations)?
            .into_iter()
            .map(|it| {
                Ok(Example {
                    image: image_path(images, &it.image, annotations)?,
                    text_input: caption_prompt.to_string(),
                    text_output: Some(pre_caption(&it.caption, MAX_WORDS)),
                })
            })
            .collect()
    }
}

/// Masks of the pruned model: its `masks.safetensors`, or the zeros of its prunable weights;
/// and the student's starting weights where the pruned kept values differ from the dense ones
/// (SparseGPT). The pruned model must be the dense one pruned: the same tensor keys and
/// shapes, every tensor outside the prunable linears bit-identical, masks that agree with its
/// zeros, and kept values equal to the dense ones unless its pruner rewrites them
/// (`sparsity.json` names SparseGPT, or it has no `sparsity.json`).
pub fn masks_and_student<B: Backend, M: VisionLanguageModel<B>>(
    pruned_dir: &Path,
    dense: &M,
    dense_dir: &Path,
) -> Result<(BTreeMap<String, Mask>, StudentWeights)> {
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same(pruned_dir, dense_dir) {
        return Err(TrainError::file(
            pruned_dir,
            "the pruned model and the dense teacher are the same directory (give the dense model to --dense)",
        ));
    }
    let sidecar = pruned_dir.join("masks.safetensors");
    let mut masks = if sidecar.exists() {
        ressa_sparse::sidecar::read_masks(&sidecar).map_err(|e| TrainError::file(&sidecar, e))?
    } else {
        BTreeMap::new()
    };
    let rewriting = match std::fs::read(pruned_dir.join("sparsity.json")) {
        Err(_) => true,
        Ok(bytes) => serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("method").and_then(|m| m.as_str()).map(str::to_string))
            .is_none_or(|m| m == "sparsegpt"),
    };
    let pruned = WeightStore::open_dir(pruned_dir)?;
    let dense_store = WeightStore::open_dir(dense_dir)?;
    // One architecture, one set of shapes.
    let mut pkeys: Vec<&String> = pruned.keys().collect();
    let mut dkeys: Vec<&String> = dense_store.keys().collect();
    pkeys.sort();
    dkeys.sort();
    if pkeys != dkeys {
        let extra = pkeys.iter().find(|k| !dkeys.contains(k));
        let missing = dkeys.iter().find(|k| !pkeys.contains(k));
        let what = match (extra, missing) {
            (Some(k), _) => format!("it has `{k}`, which the dense model has not"),
            (None, Some(k)) => format!("it lacks the dense model's `{k}`"),
            _ => "its tensors differ".into(),
        };
        return Err(TrainError::file(
            pruned_dir,
            format!("not a pruned copy of {}: {what}", dense_dir.display()),
        ));
    }
    let linears: Vec<(String, [usize; 2])> = prunable_linears(dense)
        .into_iter()
        .map(|(_, l)| (format!("{}.weight", l.key), l.dims()))
        .collect();
    for key in masks.keys() {
        if !linears.iter().any(|(k, _)| k == key) {
            return Err(TrainError::file(
                &sidecar,
                format!("`{key}` is not a prunable linear of the model"),
            ));
        }
    }
    for key in &dkeys {
        if linears.iter().any(|(k, _)| k == *key) {
            continue;
        }
        let (ps, pd, pb) = pruned.raw(key)?;
        let (ds, dd, db) = dense_store.raw(key)?;
        if ps != ds || pd != dd || pb != db {
            return Err(TrainError::file(
                pruned_dir,
                format!(
                    "`{key}` differs from the dense model's (pruning changes prunable linears only): not a pruned copy of {}",
                    dense_dir.display()
                ),
            ));
        }
    }
    let mut student = StudentWeights::new();
    for (key, [d_in, d_out]) in &linears {
        let (d_in, d_out) = (*d_in, *d_out);
        // PyTorch [d_out, d_in] on disk.
        let p = pruned.get(key, &[d_out, d_in])?.data;
        let mask = match masks.get(key) {
            Some(m) => {
                if m.shape() != (d_in, d_out) {
                    return Err(TrainError::file(
                        &sidecar,
                        format!(
                            "`{key}`: mask shape {:?}, the weight is [{d_in}, {d_out}] (burn orientation)",
                            m.shape()
                        ),
                    ));
                }
                if let Some((i, j)) = (0..d_in)
                    .flat_map(|i| (0..d_out).map(move |j| (i, j)))
                    .find(|&(i, j)| m.get(i, j) == Some(false) && p[j * d_in + i] != 0.0)
                {
                    return Err(TrainError::file(
                        &sidecar,
                        format!(
                            "`{key}`: the mask prunes input {i} of output {j}, but the pruned weight holds {} there",
                            p[j * d_in + i]
                        ),
                    ));
                }
                m.clone()
            }
            None => {
                let m = Mask::from_fn(d_in, d_out, |i, j| p[j * d_in + i] != 0.0)
                    .map_err(|e| TrainError::Input(format!("{key}: {e}")))?;
                if m.count_pruned() == 0 {
                    continue;
                }
                masks.insert(key.clone(), m.clone());
                m
            }
        };
        let w = dense_store.get(key, &[d_out, d_in])?.data;
        let mut differs = false;
        let mut burn_order = vec![0f32; d_in * d_out];
        for j in 0..d_out {
            for i in 0..d_in {
                let v = p[j * d_in + i];
                burn_order[i * d_out + j] = v;
                if mask.get(i, j) == Some(true) && v != w[j * d_in + i] {
                    differs = true;
                }
            }
        }
        if differs {
            if !rewriting {
                return Err(TrainError::file(
                    pruned_dir,
                    format!(
                        "`{key}`: kept weights differ from the dense model's, and its pruner (sparsity.json) does not rewrite them: not a pruned copy of {}",
                        dense_dir.display()
                    ),
                ));
            }
            let name = key.strip_suffix(".weight").unwrap_or(key).to_string();
            student.insert(name, burn_order);
        }
    }
    Ok((masks, student))
}

/// The training data of a run: examples from `data`, images and texts through `processor`.
pub fn train_data(processor: Processor, data: &DataConfig) -> Result<TrainData> {
    let prompt = data.caption_prompt.as_deref().unwrap_or(CAPTION_PROMPT);
    let mut train = read_examples(&data.train, &data.images, prompt)?;
    if let Some(n) = data.max_examples {
        train.truncate(n);
    }
    let val = match &data.val {
        Some(v) => read_examples(v, &data.images, prompt)?,
        None => Vec::new(),
    };
    Ok(TrainData {
        train,
        val,
        processor,
        loader_threads: 0,
    })
}

/// What a repair did (written to `repair.json`).
#[derive(Debug, Clone, Serialize)]
pub struct RepairReport {
    pub sparse_adapters: usize,
    pub plain_adapters: usize,
    pub trainable_parameters: usize,
    /// Linears whose pruned kept values differ from the dense ones (SparseGPT).
    pub rewritten_by_pruner: usize,
    pub train: TrainReport,
    /// Masked linears whose merged weight has exactly the mask's non-zeros (all of them).
    pub exact_sparsity: usize,
    /// The directory-based run's settings (`None` for an in-memory repair).
    pub config: Option<RepairConfig>,
}

/// A repaired model: adapters merged, with exactly the pruned zeros.
pub struct Repaired<M> {
    pub model: M,
    /// The adapters alone (before the merge), for PEFT export.
    pub adapters: Vec<AdapterValues>,
    pub report: RepairReport,
}

/// RESSA in memory: SparseLoRA on `dense` (the dense weights `W`, on an autodiff backend)
/// with `masks` and the pruner's rewritten kept values `student`, trained on `data`, merged.
/// The directory-based [`repair`] and the experiment runner both call it. With
/// `cfg.devices` > 1, that many data-parallel peers train on `device`.
#[allow(clippy::too_many_arguments)]
pub fn repair_model<B: AutodiffBackend, M>(
    dense: M,
    masks: &BTreeMap<String, Mask>,
    student: &StudentWeights,
    data: &TrainData,
    cfg: &TrainConfig,
    checkpoints: Option<&Path>,
    resume: bool,
    device: &B::Device,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<Repaired<M::InnerModule>>
where
    M: VisionLanguageModel<B> + AutodiffModule<B>,
    M::InnerModule: VisionLanguageModel<B::InnerBackend>,
{
    let devices = vec![device.clone(); cfg.devices.max(1)];
    repair_model_on::<B, M>(
        dense,
        masks,
        student,
        data,
        cfg,
        checkpoints,
        resume,
        &devices,
        on_event,
    )
}

/// [`repair_model`] with one data-parallel peer per device of `devices` (`cfg.devices` of
/// them); `dense` lives on `devices[0]`.
#[allow(clippy::too_many_arguments)]
pub fn repair_model_on<B: AutodiffBackend, M>(
    dense: M,
    masks: &BTreeMap<String, Mask>,
    student: &StudentWeights,
    data: &TrainData,
    cfg: &TrainConfig,
    checkpoints: Option<&Path>,
    resume: bool,
    devices: &[B::Device],
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<Repaired<M::InnerModule>>
where
    M: VisionLanguageModel<B> + AutodiffModule<B>,
    M::InnerModule: VisionLanguageModel<B::InnerBackend>,
{
    cfg.validate()?;
    let device = devices
        .first()
        .ok_or_else(|| TrainError::config("devices", "devices: expected at least one device"))?;
    if masks.is_empty() {
        tracing::warn!("no masks and no zeros found: every adapter is plain LoRA");
    }
    let (model, attached): (M, AttachReport) =
        attach(dense, &cfg.adapters, masks, student, cfg.seed, device)?;
    tracing::info!(
        sparse = attached.sparse,
        plain = attached.plain,
        trainable = attached.trainable,
        rewritten = student.len(),
        "adapters attached"
    );
    let (model, report) = train_on(model, data, cfg, checkpoints, resume, devices, on_event)?;
    let mut model = model.valid();
    let adapters = adapter_values(&model);
    merge(&mut model);
    // The guarantee: every masked weight keeps exactly its mask's zeros, and nothing written
    // is non-finite.
    let mut exact = 0;
    for (_, linear) in prunable_linears(&model) {
        let key = format!("{}.weight", linear.key);
        let w = host_f32(linear.weight.val());
        if let Some(v) = w.iter().find(|v| !v.is_finite()) {
            return Err(TrainError::NonFinite {
                step: report.steps,
                what: "merged weight",
                value: *v as f64,
            });
        }
        if let Some(m) = masks.get(&key) {
            let ok = m
                .to_bools()
                .iter()
                .zip(&w)
                .all(|(&keep, &v)| keep || v == 0.0);
            if !ok {
                return Err(TrainError::Input(format!(
                    "{key}: merged weight has non-zeros outside its mask (a bug)"
                )));
            }
            exact += 1;
        }
    }
    Ok(Repaired {
        model,
        adapters,
        report: RepairReport {
            sparse_adapters: attached.sparse,
            plain_adapters: attached.plain,
            trainable_parameters: attached.trainable,
            rewritten_by_pruner: student.len(),
            train: report,
            exact_sparsity: exact,
            config: None,
        },
    })
}

/// Runs a repair end to end on the autodiff backend `B`: loads the dense model (whatever its
/// family), reads the pruned model's masks, trains, writes the merged model. With
/// `cfg.train.devices` > 1, that many data-parallel peers train on `device`.
pub fn repair<B: ressa_models::ops::AutodiffDenseBackend>(
    cfg: &RepairConfig,
    resume: bool,
    device: &B::Device,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<RepairReport> {
    let devices = vec![device.clone(); cfg.train.devices.max(1)];
    repair_on::<B>(cfg, resume, &devices, on_event)
}

/// [`repair`] with one data-parallel peer per device of `devices` (`cfg.train.devices` of
/// them); the model is loaded on `devices[0]`.
pub fn repair_on<B: ressa_models::ops::AutodiffDenseBackend>(
    cfg: &RepairConfig,
    resume: bool,
    devices: &[B::Device],
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<RepairReport> {
    cfg.train.validate()?;
    if devices.is_empty() {
        return Err(TrainError::config(
            "devices",
            "devices: expected at least one device",
        ));
    }
    let dense_dir = match (&cfg.dense, cfg.train.distill.lambda) {
        (Some(d), _) => d.clone(),
        (None, 0.0) => cfg.pruned.clone(),
        (None, _) => {
            return Err(TrainError::config(
                "dense",
                "dense: the teacher's directory is required unless lambda = 0 (give --dense DIR)",
            ));
        }
    };
    // On several nodes, node 0 writes the model (every node ends with the same one).
    let writes = cfg.train.cluster.as_ref().is_none_or(|c| c.node_rank == 0);
    if writes {
        ressa_models::pretrained::check_output_dir(&cfg.out)?;
    }
    struct Job<'a, B: AutodiffBackend> {
        cfg: &'a RepairConfig,
        dense_dir: &'a Path,
        resume: bool,
        devices: &'a [B::Device],
        on_event: &'a mut dyn FnMut(&TrainEvent),
        writes: bool,
    }
    impl<B: AutodiffBackend> AutodiffFamilyVisitor<B> for Job<'_, B> {
        type Output = Result<RepairReport>;
        fn visit<M>(self, config: M::Config) -> Self::Output
        where
            M: VisionLanguageModel<B> + AutodiffModule<B>,
            M::InnerModule: VisionLanguageModel<B::InnerBackend, Config = M::Config>,
        {
            let Job {
                cfg,
                dense_dir,
                resume,
                devices,
                on_event,
                writes,
            } = self;
            let device = &devices[0];
            let pretrained = Pretrained::<B, M>::load_with(dense_dir, config, device)?;
            let (masks, student) = if cfg.dense.is_none() {
                masks_and_student_self(&cfg.pruned, &pretrained.model)?
            } else {
                masks_and_student(&cfg.pruned, &pretrained.model, dense_dir)?
            };
            let processor = Processor::for_model(dense_dir, &pretrained.model)?;
            let data = train_data(processor, &cfg.data)?;
            let ckpt_dir = cfg.checkpoint_dir();
            let layout = pretrained.layout.clone();
            let repaired = repair_model_on::<B, M>(
                pretrained.model,
                &masks,
                &student,
                &data,
                &cfg.train,
                Some(&ckpt_dir),
                resume,
                devices,
                on_event,
            )?;
            let mut report = repaired.report;
            report.config = Some(cfg.clone());
            if !writes {
                return Ok(report);
            }
            let base_name = dense_dir.display().to_string();
            let io =
                |p: &Path, e: std::io::Error| ModelError::Input(format!("{}: {e}", p.display()));
            save_model_dir_with(
                &repaired.model,
                &layout,
                dense_dir,
                &cfg.out,
                &mut |tmp: &Path| {
                    let masks_path = tmp.join("masks.safetensors");
                    ressa_sparse::sidecar::write_masks(
                        &masks_path,
                        masks.iter().map(|(k, m)| (k.as_str(), m)),
                    )
                    .map_err(|e| ModelError::Input(format!("{}: {e}", masks_path.display())))?;
                    let adir = tmp.join("adapters");
                    std::fs::create_dir_all(&adir).map_err(|e| io(&adir, e))?;
                    write_peft_adapters(&adir, &repaired.adapters, &base_name)
                        .map_err(|e| io(&adir, e))?;
                    let rp = tmp.join("repair.json");
                    std::fs::write(&rp, serde_json::to_vec_pretty(&report).expect("json"))
                        .map_err(|e| io(&rp, e))
                },
            )?;
            Ok(report)
        }
    }
    visit_family_autodiff::<B, _>(
        &dense_dir.join("config.json"),
        Job {
            cfg,
            dense_dir: &dense_dir,
            resume,
            devices,
            on_event,
            writes,
        },
    )?
}

/// The student's starting weights of an in-memory pruned model: where its kept values differ
/// from the dense model's (SparseGPT rewrites them), by linear key, in burn orientation. The
/// two models list the same prunable linears in the same order (one family, one config).
pub fn student_weights<B1: Backend, P: Prunable<B1>, B2: Backend, D: Prunable<B2>>(
    pruned: &P,
    dense: &D,
) -> Result<StudentWeights> {
    let (p, d) = (prunable_linears(pruned), prunable_linears(dense));
    if p.len() != d.len() {
        return Err(TrainError::Input(format!(
            "the pruned model has {} prunable linears, the dense one {}",
            p.len(),
            d.len()
        )));
    }
    let mut student = StudentWeights::new();
    for ((_, pl), (_, dl)) in p.iter().zip(&d) {
        if pl.key != dl.key || pl.dims() != dl.dims() {
            return Err(TrainError::Input(format!(
                "pruned linear `{}` {:?} does not match dense `{}` {:?}",
                pl.key,
                pl.dims(),
                dl.key,
                dl.dims()
            )));
        }
        let (pw, dw) = (host_f32(pl.weight.val()), host_f32(dl.weight.val()));
        if pw
            .iter()
            .zip(&dw)
            .any(|(a, b)| *a != 0.0 && a.to_bits() != b.to_bits())
        {
            student.insert(pl.key.to_string(), pw);
        }
    }
    Ok(student)
}

/// Masks of a pruned model repaired without a teacher (λ = 0): its sidecar or its zeros; its
/// weights are the student's start as they are.
fn masks_and_student_self<B: Backend, M: VisionLanguageModel<B>>(
    pruned_dir: &Path,
    model: &M,
) -> Result<(BTreeMap<String, Mask>, StudentWeights)> {
    let sidecar = pruned_dir.join("masks.safetensors");
    let mut masks = if sidecar.exists() {
        ressa_sparse::sidecar::read_masks(&sidecar).map_err(|e| TrainError::file(&sidecar, e))?
    } else {
        BTreeMap::new()
    };
    for (_, l) in prunable_linears(model) {
        let key = format!("{}.weight", l.key);
        let [d_in, d_out] = l.dims();
        let w = host_f32(l.weight.val());
        match masks.get(&key) {
            Some(m) => {
                if m.shape() != (d_in, d_out) {
                    return Err(TrainError::file(
                        &sidecar,
                        format!(
                            "`{key}`: mask shape {:?}, the weight is [{d_in}, {d_out}]",
                            m.shape()
                        ),
                    ));
                }
                if m.to_bools()
                    .iter()
                    .zip(&w)
                    .any(|(&keep, &v)| !keep && v != 0.0)
                {
                    return Err(TrainError::file(
                        &sidecar,
                        format!("`{key}`: the mask prunes entries that hold non-zero weights"),
                    ));
                }
            }
            None => {
                let m = Mask::from_bools(
                    d_in,
                    d_out,
                    &w.iter().map(|v| *v != 0.0).collect::<Vec<_>>(),
                )
                .map_err(|e| TrainError::Input(format!("{key}: {e}")))?;
                if m.count_pruned() > 0 {
                    masks.insert(key, m);
                }
            }
        }
    }
    Ok((masks, StudentWeights::new()))
}
