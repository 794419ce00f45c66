//! `cargo xtask experiment <config.toml>`: a whole pruning study. Data (generated shapes or a
//! directory), the dense model (a directory or trained from scratch), then every cell —
//! prune, score, RESSA, score — then `results.json`, `report.md` and plots.
//!
//! Every artefact lives in `work_dir/cache/` under a content hash of everything that
//! produced it (settings, the hashes of its inputs), written atomically; a rerun reuses what
//! exists, and a killed run loses at most the cell in progress.

mod config;
mod evaluate;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use indicatif::{ProgressBar, ProgressStyle};
use ressa_data::shapes;
use ressa_models::pretrained::{
    save_model_dir, write_initial_checkpoint_with, write_random_checkpoint,
};
use ressa_models::prunable::{BlockOptions, CalibrationSample};
use ressa_models::{
    AutodiffFamilyVisitor, FamilyConfig, Pretrained, Processor, VisionLanguageModel,
    visit_family_autodiff,
};
use ressa_prune::calibrate::{
    Allocation, AllocationKind, CalibrationConfig, Propagation, TowerSparsity, calibrate_and_prune,
};
use ressa_prune::{Method, OwlConfig};
use ressa_report::results::{Cell, Group, Metrics, OwlParams, Ressa, Results, Task};
use ressa_sparse::SparsityPattern;
use ressa_train::TrainEvent;
use ressa_train::repair::{DataConfig, read_examples, repair_model, student_weights, train_data};
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use crate::copy_dir;
use config::{Eval, ExperimentConfig, parse_setting};
use evaluate::{TestSet, evaluate};

/// Bumped when scoring changes, so cached scores are not reused across versions.
/// eval-3: per-task scores and per-question-type accuracy.
const EVAL_VERSION: &[u8] = b"eval-3";

type B = Flex;
type AD = Autodiff<Flex>;

/// FNV-1a over the parts, as 16 hex digits.
fn hash(parts: &[&[u8]]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in p.iter().chain(&[0xff]) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("json")
}

/// Writes `bytes` to `path` through a temporary file and a rename (`ressa_report::write_atomic`).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(ressa_report::write_atomic(path, bytes)?)
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let b = ProgressBar::new(len);
    b.set_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} {what} [{{bar:30}}] {{pos}}/{{len}} {{msg}} ({{elapsed}}, eta {{eta}})"
        ))
        .expect("template")
        .progress_chars("=> "),
    );
    b
}

/// One cell to run. Its JSON is part of the cell's cache key; `owl` is left out for uniform
/// cells, so their keys are those of the runner before allocations existed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CellSpec {
    group: Group,
    method: Method,
    pattern: String,
    vision: f64,
    language: f64,
    ressa: bool,
    /// OWL's per-block allocation; `None` = uniform.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owl: Option<OwlParams>,
}

/// Grid cells: methods × settings × allocations (OWL at unstructured settings only), then
/// splits and one-tower cells. A cell listed by two grids runs once.
fn cells(cfg: &ExperimentConfig) -> Result<Vec<CellSpec>> {
    let mut out: Vec<CellSpec> = Vec::new();
    for g in &cfg.grid {
        for m in &g.methods {
            for s in &g.settings {
                let (pattern, sparsity) = parse_setting(s)?;
                for a in &g.allocations {
                    let owl = match a {
                        AllocationKind::Uniform => None,
                        AllocationKind::Owl if pattern == "unstructured" => Some(OwlParams {
                            m: g.owl_m,
                            lambda: g.owl_lambda,
                        }),
                        AllocationKind::Owl => continue,
                    };
                    let spec = CellSpec {
                        group: Group::Grid,
                        method: *m,
                        pattern: pattern.clone(),
                        vision: sparsity,
                        language: sparsity,
                        ressa: g.ressa && cfg.ressa.is_some(),
                        owl,
                    };
                    if !out.contains(&spec) {
                        out.push(spec);
                    }
                }
            }
        }
    }
    if let Some(s) = &cfg.split {
        for &sum in &s.sums {
            for &v in &s.vision {
                let l = sum - v;
                if !(0.0..1.0).contains(&v) || !(0.0..1.0).contains(&l) {
                    continue;
                }
                out.push(CellSpec {
                    group: Group::Split,
                    method: s.method,
                    pattern: "unstructured".into(),
                    vision: v,
                    language: l,
                    ressa: false,
                    owl: None,
                });
            }
        }
    }
    if let Some(t) = &cfg.towers {
        for &s in &t.sparsities {
            for (group, v, l) in [(Group::LanguageOnly, 0.0, s), (Group::VisionOnly, s, 0.0)] {
                out.push(CellSpec {
                    group,
                    method: t.method,
                    pattern: "unstructured".into(),
                    vision: v,
                    language: l,
                    ressa: false,
                    owl: None,
                });
            }
        }
    }
    Ok(out)
}

/// The generated (or given) data directory and its hash.
fn data(cfg: &ExperimentConfig, cache: &Path) -> Result<(PathBuf, String)> {
    if let Some(dir) = &cfg.data.dir {
        return Ok((dir.clone(), hash(&[dir.to_string_lossy().as_bytes()])));
    }
    let s = cfg.data.shapes.as_ref().expect("validated");
    let key = hash(&[b"shapes", &json(s)]);
    let dir = cache.join(format!("data-{key}"));
    if !dir.join("shapes.json").exists() {
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        let t = Instant::now();
        let summary = shapes::generate(s, &dir)?;
        tracing::info!(dir = %dir.display(), seconds = t.elapsed().as_secs_f64(), vocab = summary.vocab_size, "generated the shapes data");
    }
    Ok((dir, key))
}

/// The dense model's `config.json` (given, or the one it is trained from).
fn dense_config_path(cfg: &ExperimentConfig) -> PathBuf {
    match &cfg.model.dir {
        Some(dir) => dir.join("config.json"),
        None => cfg.model.train_config.clone().expect("validated"),
    }
}

/// The cache key of a given model directory: its path, its `config.json` and every weight
/// file's name, size and modification time (as make does), so that cells computed from an
/// earlier model in the same place are not reused (the committed toy model may be retrained).
fn model_dir_key(dir: &Path) -> Result<String> {
    let mut parts: Vec<Vec<u8>> = vec![dir.to_string_lossy().as_bytes().to_vec()];
    let config = dir.join("config.json");
    parts.push(std::fs::read(&config).with_context(|| config.display().to_string())?);
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| dir.display().to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.ends_with(".safetensors") || name.ends_with(".safetensors.index.json")
        })
        .collect();
    files.sort();
    for f in files {
        let meta = std::fs::metadata(&f).with_context(|| f.display().to_string())?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        parts.push(
            format!(
                "{}:{}:{mtime}",
                f.file_name().unwrap_or_default().to_string_lossy(),
                meta.len()
            )
            .into_bytes(),
        );
    }
    let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    Ok(hash(&refs))
}

/// The dense model directory (trained from scratch if asked) and its hash.
fn dense<M>(
    cfg: &ExperimentConfig,
    data: &Path,
    data_key: &str,
    cache: &Path,
) -> Result<(PathBuf, String)>
where
    M: VisionLanguageModel<AD> + AutodiffModule<AD>,
    M::InnerModule: VisionLanguageModel<B, Config = M::Config>,
{
    if let Some(dir) = &cfg.model.dir {
        return Ok((dir.clone(), model_dir_key(dir)?));
    }
    let config_path = cfg.model.train_config.as_ref().expect("validated");
    let config_bytes =
        std::fs::read(config_path).with_context(|| config_path.display().to_string())?;
    let (pretrain, init_scale, init_std) = (
        json(&cfg.model.pretrain),
        json(&cfg.model.init_scale),
        json(&cfg.model.init_std),
    );
    let mut parts: Vec<&[u8]> = vec![b"dense", &config_bytes, &pretrain, &init_scale];
    // (only when set: the cache keys of studies without it stay as they were)
    if !cfg.model.init_std.is_empty() {
        parts.push(&init_std);
    }
    parts.push(data_key.as_bytes());
    let key = hash(&parts);
    let dir = cache.join(format!("dense-{key}"));
    if dir.join("model.safetensors").exists() {
        return Ok((dir, key));
    }
    let init = cache.join(format!(".init-{key}"));
    if init.exists() {
        std::fs::remove_dir_all(&init)?;
    }
    std::fs::create_dir_all(&init)?;
    std::fs::write(init.join("config.json"), &config_bytes)?;
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
    ] {
        if data.join(f).exists() {
            std::fs::copy(data.join(f), init.join(f))?;
        }
    }
    if data.join("qformer_tokenizer").is_dir() {
        copy_dir(
            &data.join("qformer_tokenizer"),
            &init.join("qformer_tokenizer"),
        )?;
    }
    let model_cfg = M::Config::from_file(&init.join("config.json"))?;
    let device = Default::default();
    match cfg.model.init_scale {
        Some(scale) => write_random_checkpoint::<B, M::InnerModule>(
            &model_cfg,
            &init,
            cfg.model.pretrain.seed,
            scale,
            &device,
        )?,
        None => write_initial_checkpoint_with::<B, M::InnerModule>(
            &model_cfg,
            &init,
            cfg.model.pretrain.seed,
            Dtype::F32,
            &cfg.model.init_std,
            &device,
        )?,
    }
    let pretrained = Pretrained::<AD, M>::load_with(&init, model_cfg, &device)?;
    let ann = data.join("annotations");
    let images = data.join("images");
    let processor = Processor::for_model(&init, &pretrained.model)?;
    let mut td = train_data(
        processor,
        &DataConfig {
            train: ann.join("vqa_train.json"),
            images: images.clone(),
            val: None,
            caption_prompt: None,
            max_examples: None,
        },
    )?;
    // Captions and VQA mixed, as InstructBLIP's instruction tuning.
    td.train.extend(read_examples(
        &ann.join("caption_train.json"),
        &images,
        ressa_data::prompts::CAPTION_PROMPT,
    )?);
    let mut model = pretrained.model;
    if cfg.model.pretrain.vision_steps > 0 {
        let total = cfg.model.pretrain.vision_steps;
        let p = bar(total, "pretraining the vision tower");
        let t = Instant::now();
        let (m, accuracy) = ressa_train::pretrain::pretrain_vision(
            model,
            &td,
            &ann.join("scenes_train.json"),
            &images,
            &cfg.model.pretrain,
            &device,
            &mut progress(&p, total, "pretraining the vision tower", t),
        )?;
        p.finish_and_clear();
        tracing::info!(
            seconds = t.elapsed().as_secs_f64(),
            patch_accuracy = accuracy,
            "pretrained the vision tower"
        );
        model = m;
    }
    let p = bar(cfg.model.pretrain.steps, "training the dense model");
    let t = Instant::now();
    let (model, tail) = ressa_train::pretrain::pretrain(
        model,
        &td,
        &cfg.model.pretrain,
        &device,
        &mut progress(&p, cfg.model.pretrain.steps, "training the dense model", t),
    )?;
    p.finish_and_clear();
    tracing::info!(
        seconds = t.elapsed().as_secs_f64(),
        final_loss = tail,
        "trained the dense model"
    );
    save_model_dir(&model, &pretrained.layout, &init, &dir)?;
    std::fs::remove_dir_all(&init)?;
    Ok((dir, key))
}

/// A training run's progress: the bar's position and loss, and a log line every 10 % of
/// `total` steps (the bar is hidden off a terminal).
fn progress<'a>(
    p: &'a ProgressBar,
    total: u64,
    what: &'static str,
    t: Instant,
) -> impl FnMut(&TrainEvent) + 'a {
    move |e| {
        if let TrainEvent::Step {
            step,
            loss,
            examples_per_s,
            ..
        } = e
        {
            p.set_position(*step);
            p.set_message(format!("loss {loss:.3} {examples_per_s:.0} ex/s"));
            if *step % (total / 10).max(1) == 0 {
                let seconds = t.elapsed().as_secs_f64();
                tracing::info!(step, total, loss, seconds, "{what}");
            }
        }
    }
}

/// The first `n` training questions as calibration samples (the prompt → the language model
/// and the Q-Former; the answer teacher-forced after it).
fn calibration<M: VisionLanguageModel<B>>(
    dense: &Pretrained<B, M>,
    data: &Path,
    n: usize,
) -> Result<Vec<CalibrationSample<B>>> {
    let device = Default::default();
    let ann = data.join("annotations/vqa_train.json");
    let examples = read_examples(&ann, &data.join("images"), "")?;
    let processor = Processor::for_model(&dense.dir, &dense.model)?;
    let mut out = Vec::new();
    for ex in examples.iter().take(n) {
        out.push(processor.calibration_sample(
            &dense.model,
            &ex.image,
            &ex.text_input,
            ex.text_output.as_deref().unwrap_or(""),
            &device,
        )?);
    }
    Ok(out)
}

/// Runs one cell: prune, score, optionally RESSA and score again.
#[allow(clippy::too_many_arguments)]
fn run_cell<M>(
    spec: &CellSpec,
    id: &str,
    cfg: &ExperimentConfig,
    dense_dir: &Path,
    data: &Path,
    samples: &[CalibrationSample<B>],
    test: &TestSet,
    scratch: &Path,
) -> Result<Cell>
where
    M: VisionLanguageModel<AD> + AutodiffModule<AD>,
    M::InnerModule: VisionLanguageModel<B, Config = M::Config>,
{
    let t = Instant::now();
    let device = Default::default();
    if scratch.exists() {
        std::fs::remove_dir_all(scratch)?;
    }
    let method = spec.method;
    let pattern: SparsityPattern = spec
        .pattern
        .parse()
        .map_err(|e| anyhow!("pattern {}: {e}", spec.pattern))?;
    let mut pretrained = Pretrained::<B, M::InnerModule>::load(dense_dir, &device)?;
    let calib = CalibrationConfig {
        method,
        pattern,
        sparsity: TowerSparsity {
            vision: spec.vision,
            qformer: 0.0,
            language: spec.language,
        },
        allocation: match spec.owl {
            None => Allocation::Uniform,
            Some(p) => Allocation::Owl(OwlConfig {
                m: p.m,
                lambda: p.lambda,
            }),
        },
        propagation: Propagation::Pruned,
        wanda_group: None,
        dsnot: None,
        block: BlockOptions::default(),
    };
    let result = calibrate_and_prune(&mut pretrained.model, samples, &calib, &mut |_, _, _| {})?;
    let pruned_metrics = evaluate(&pretrained, test, &cfg.eval, &device)?;
    let mut ressa = None;
    if spec.ressa {
        // RESSA in memory: the dense weights (autodiff), the masks and the pruner's rewritten
        // kept values straight from calibration; nothing is saved or reloaded.
        let train = cfg.ressa.clone().expect("checked");
        let dense = Pretrained::<AD, M>::load(dense_dir, &device)?;
        let student = student_weights(&pretrained.model, &dense.model)?;
        let processor = Processor::for_model(dense_dir, &dense.model)?;
        let data = train_data(
            processor,
            &DataConfig {
                train: data.join("annotations/vqa_train.json"),
                images: data.join("images"),
                val: Some(data.join("annotations/vqa_val.json")),
                caption_prompt: None,
                max_examples: None,
            },
        )?;
        let r0 = Instant::now();
        let (config, layout) = (dense.config.clone(), dense.layout.clone());
        let repaired = repair_model::<AD, M>(
            dense.model,
            &result.masks,
            &student,
            &data,
            &train,
            None,
            false,
            &device,
            &mut |_| {},
        )?;
        let report = repaired.report;
        let repaired = Pretrained::from_parts(repaired.model, config, layout, dense_dir);
        let metrics = evaluate(&repaired, test, &cfg.eval, &device)?;
        let v = &report.train.validations;
        ressa = Some(Ressa {
            metrics,
            loss_before: v.first().map_or(f64::NAN, |v| v.loss),
            loss_after: v.last().map_or(f64::NAN, |v| v.loss),
            steps: report.train.steps,
            seconds: r0.elapsed().as_secs_f64(),
        });
    }
    if scratch.exists() {
        std::fs::remove_dir_all(scratch)?;
    }
    Ok(Cell {
        id: id.to_string(),
        group: spec.group,
        method: spec.method.to_string(),
        pattern: spec.pattern.clone(),
        vision: spec.vision,
        language: spec.language,
        qformer: 0.0,
        allocation: if spec.owl.is_some() { "owl" } else { "uniform" }.into(),
        owl: spec.owl,
        pruned: pruned_metrics,
        ressa,
        seconds: t.elapsed().as_secs_f64(),
    })
}

/// The study's model-dependent part, for the dense model's family.
struct Study<'a> {
    cfg: &'a ExperimentConfig,
    data_dir: &'a Path,
    data_key: &'a str,
    cache: &'a Path,
    test: &'a TestSet,
    specs: &'a [CellSpec],
    timings: &'a mut BTreeMap<String, f64>,
}

impl AutodiffFamilyVisitor<AD> for Study<'_> {
    type Output = Result<(Metrics, Metrics, Vec<Cell>)>;

    fn visit<M>(self, _config: M::Config) -> Self::Output
    where
        M: VisionLanguageModel<AD> + AutodiffModule<AD>,
        M::InnerModule: VisionLanguageModel<B, Config = M::Config>,
    {
        let Study {
            cfg,
            data_dir,
            data_key,
            cache,
            test,
            specs,
            timings,
        } = self;
        let (data_dir, data_key) = (data_dir.to_path_buf(), data_key.to_string());
        let t = Instant::now();
        let (dense_dir, dense_key) = dense::<M>(cfg, &data_dir, &data_key, cache)?;
        timings.insert("dense_model_s".to_string(), t.elapsed().as_secs_f64());

        let device = Default::default();
        // Predictions are the same on any number of devices: the key leaves the count out.
        let eval_key = hash(&[
            EVAL_VERSION,
            &json(&Eval {
                devices: 1,
                ..cfg.eval.clone()
            }),
            data_key.as_bytes(),
        ]);
        let dense_metrics_path = cache.join(format!("dense-{dense_key}-eval-{eval_key}.json"));
        let t = Instant::now();
        let dense_model = Pretrained::<B, M::InnerModule>::load(&dense_dir, &device)?;
        let dense_metrics: Metrics = match std::fs::read(&dense_metrics_path) {
            Ok(b) => serde_json::from_slice(&b)?,
            Err(_) => {
                let m = evaluate(&dense_model, test, &cfg.eval, &device)?;
                write_atomic(&dense_metrics_path, &json(&m))?;
                m
            }
        };
        timings.insert("dense_eval_s".to_string(), t.elapsed().as_secs_f64());
        tracing::info!(?dense_metrics, "dense model");
        let chance = test.blind_baseline(&data_dir)?;
        let samples = calibration(&dense_model, &data_dir, cfg.calibration.samples)?;
        drop(dense_model);

        let progress = bar(specs.len() as u64, "cells");
        let mut done = Vec::new();
        let t = Instant::now();
        let (mut reused, mut ran) = (0, 0);
        for spec in specs {
            let ressa_json = if spec.ressa {
                json(&cfg.ressa)
            } else {
                Vec::new()
            };
            let id = hash(&[
                b"cell",
                dense_key.as_bytes(),
                eval_key.as_bytes(),
                &json(spec),
                &json(&cfg.calibration),
                &ressa_json,
            ]);
            let path = cache.join(format!("cell-{id}.json"));
            progress.set_message(format!(
                "{} {} v{:.2} l{:.2}",
                spec.method, spec.pattern, spec.vision, spec.language
            ));
            let cell: Cell = match std::fs::read(&path) {
                Ok(b) => {
                    reused += 1;
                    serde_json::from_slice(&b).with_context(|| path.display().to_string())?
                }
                Err(_) => {
                    let scratch = cache.join(format!("cell-{id}"));
                    let cell = run_cell::<M>(
                        spec, &id, cfg, &dense_dir, &data_dir, &samples, test, &scratch,
                    )?;
                    write_atomic(&path, &json(&cell))?;
                    ran += 1;
                    cell
                }
            };
            progress.inc(1);
            done.push(cell);
        }
        progress.finish_and_clear();
        timings.insert("cells_s".to_string(), t.elapsed().as_secs_f64());
        tracing::info!(ran, reused, "cells");

        Ok((dense_metrics, chance, done))
    }
}

pub fn run(config_path: &Path, work_dir: Option<PathBuf>) -> Result<()> {
    let start = Instant::now();
    let mut cfg = ExperimentConfig::from_file(config_path)?;
    if work_dir.is_some() {
        cfg.work_dir = work_dir;
    }
    // A study without cells would fail only after training the dense model.
    let specs = cells(&cfg)?;
    if specs.is_empty() {
        anyhow::bail!(
            "{}: no cells to run (give a [grid], [split] or [towers] table)",
            config_path.display()
        );
    }
    let work = cfg.work_dir();
    let cache = work.join("cache");
    std::fs::create_dir_all(&cache).with_context(|| cache.display().to_string())?;
    let mut timings = BTreeMap::new();

    let t = Instant::now();
    let (data_dir, data_key) = data(&cfg, &cache)?;
    timings.insert("data_s".to_string(), t.elapsed().as_secs_f64());
    // The tasks are read before the dense model is trained: a bad task fails in seconds.
    let test = TestSet::load(&data_dir, &cfg.eval)
        .map_err(|e| anyhow!("{}: {e}", config_path.display()))?;
    let study = Study {
        cfg: &cfg,
        data_dir: &data_dir,
        data_key: &data_key,
        cache: &cache,
        test: &test,
        specs: &specs,
        timings: &mut timings,
    };
    let (dense_metrics, chance, done) =
        visit_family_autodiff::<AD, _>(&dense_config_path(&cfg), study)??;
    timings.insert("total_s".to_string(), start.elapsed().as_secs_f64());

    let results = Results {
        schema: "ressa-experiment/1".into(),
        name: cfg.name.clone(),
        created: utc_now(),
        machine: machine(),
        dense: dense_metrics,
        chance,
        cells: done,
        timings,
        tasks: test
            .tasks
            .iter()
            .map(|t| Task {
                name: t.name.clone(),
                kind: t.kind.as_str().into(),
                file: t.file.display().to_string(),
                items: t.len(),
            })
            .collect(),
    };
    results.validate()?;
    write_atomic(
        &work.join("results.json"),
        &serde_json::to_vec_pretty(&results)?,
    )?;
    let files = ressa_report::write_report(&results, &work)?;
    tracing::info!(?files, "report written");
    println!("{}", work.join("report.md").display());
    Ok(())
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{model}, {cpus} threads, burn Flex (CPU)")
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days, proleptic Gregorian).
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_model_directory_is_keyed_by_its_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("dense");
        std::fs::create_dir(&dir).unwrap();
        assert!(
            model_dir_key(&dir)
                .unwrap_err()
                .to_string()
                .contains("config.json")
        );
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        std::fs::write(dir.join("model.safetensors"), [0u8; 8]).unwrap();
        std::fs::write(dir.join("README.md"), "notes").unwrap();
        let first = model_dir_key(&dir).unwrap();
        assert_eq!(model_dir_key(&dir).unwrap(), first, "stable");
        std::fs::write(dir.join("README.md"), "other notes").unwrap();
        assert_eq!(
            model_dir_key(&dir).unwrap(),
            first,
            "only weights and config count"
        );
        std::fs::write(dir.join("model.safetensors"), [0u8; 16]).unwrap();
        let retrained = model_dir_key(&dir).unwrap();
        assert_ne!(retrained, first, "new weights");
        std::fs::write(dir.join("config.json"), "{\"a\": 1}").unwrap();
        assert_ne!(model_dir_key(&dir).unwrap(), retrained, "new config");
    }
}
