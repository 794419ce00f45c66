//! `ressa prune`: layer-wise post-training pruning of an HF model directory (any registered
//! family).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use burn::prelude::*;
use indicatif::{ProgressBar, ProgressStyle};
use ressa_data::calibration::{Sampler, prefix_examples};
use ressa_data::lavis::read_caption_list;
use ressa_models::pretrained::save_model_dir_with;
use ressa_models::prunable::{BlockOptions, CalibrationSample, Tower};
use ressa_models::streaming::Streamed;
use ressa_models::{Pretrained, Processor, VisionLanguageModel};
use ressa_prune::calibrate::{
    ActivationBudget, Allocation, AllocationKind, CalibrateError, CalibrationConfig, LayerReport,
    Propagation, TowerSparsity, calibrate_and_prune_with,
};
use ressa_prune::stream::{memory_plan, parse_size, prune_streamed};
use ressa_prune::{ComparisonGroup, Method, OwlConfig};
use ressa_sparse::SparsityPattern;

use crate::backend::{BackendKind, ModelJob, run_model_job};
use crate::output::{refuse_alias, refuse_overwrite};

#[derive(clap::Args)]
pub struct Args {
    /// HF model directory to prune.
    #[arg(long)]
    model: PathBuf,
    #[arg(long, value_enum)]
    method: Method,
    /// Fraction of weights removed in the vision and language towers (the paper's V+L);
    /// the Q-Former stays dense unless --qformer is given.
    #[arg(long)]
    sparsity: Option<f64>,
    /// unstructured, or N:M (prune N of every M consecutive inputs), e.g. 2:4, 4:8.
    #[arg(long, default_value = "unstructured")]
    pattern: String,
    /// Vision tower sparsity (overrides --sparsity; 0 leaves it dense).
    #[arg(long)]
    vision: Option<f64>,
    /// Q-Former sparsity (default 0: dense, as in the paper).
    #[arg(long)]
    qformer: Option<f64>,
    /// Language model sparsity (overrides --sparsity; 0 leaves it dense).
    #[arg(long)]
    language: Option<f64>,
    /// How a tower's sparsity is spread over its blocks.
    #[arg(long, value_enum, default_value_t = AllocationKind::Uniform)]
    allocation: AllocationKind,
    /// OWL outlier threshold M.
    #[arg(long, default_value_t = 5.0)]
    owl_m: f64,
    /// OWL spread λ.
    #[arg(long, default_value_t = 0.08)]
    owl_lambda: f64,
    /// LAVIS caption list `[{"image", "caption"}]` (optional for magnitude).
    #[arg(long)]
    calibration: Option<PathBuf>,
    /// Image root of the calibration list.
    #[arg(long)]
    images: Option<PathBuf>,
    /// Number of calibration samples (the first N of the list).
    #[arg(long, default_value_t = 128)]
    samples: usize,
    /// Draw the samples at random with this seed instead of taking the first N.
    #[arg(long)]
    shuffle_seed: Option<u64>,
    /// Seed of the caption prefix split.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Inputs of later blocks from the pruned blocks, or from the dense ones (RESSA path).
    #[arg(long, value_enum, default_value_t = Propagation::Pruned)]
    propagation: Propagation,
    /// Wanda's comparison group for every tower (default: per matrix for the vision tower, per
    /// output elsewhere, as the reference).
    #[arg(long, value_enum)]
    wanda_group: Option<ComparisonGroup>,
    /// Reproduce the reference's calibration of T5 blocks ≥ 1 without relative position bias.
    #[arg(long)]
    reference_t5_bias: bool,
    /// Cap on this process's resident memory, e.g. 4GiB, 512MiB, 3GB: checked against what
    /// pruning the model needs at once before any work; what is left holds the calibration
    /// activations, the rest of them go to disk beside --out.
    #[arg(long, value_parser = parse_size)]
    memory_budget: Option<u64>,
    /// Cap on the calibration activations held in memory (default: what --memory-budget
    /// leaves; without it, no cap); the rest go to disk beside --out.
    #[arg(long, value_parser = parse_size)]
    activation_budget: Option<u64>,
    /// Load the whole model and prune it in memory (the path before streaming; for checks).
    #[arg(long, hide = true)]
    in_memory: bool,
    /// Output directory (must not exist or be empty).
    #[arg(long)]
    out: PathBuf,
}

/// A size for messages, in MiB or GiB.
fn size(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.0} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

fn check_ratio(name: &str, v: f64) -> Result<f64> {
    if !(0.0..1.0).contains(&v) {
        bail!("--{name} {v}: a sparsity must be in [0, 1)");
    }
    Ok(v)
}

fn settings(args: &Args) -> Result<CalibrationConfig> {
    let method = args.method;
    let pattern: SparsityPattern = args
        .pattern
        .parse()
        .map_err(|e| anyhow!("--pattern: {e}"))?;
    let nm = matches!(pattern, SparsityPattern::NM { .. });
    let base = match (args.sparsity, nm) {
        (Some(s), _) => check_ratio("sparsity", s)?,
        (None, true) => pattern_sparsity(pattern),
        (None, false)
            if args.vision.is_none() && args.language.is_none() && args.qformer.is_none() =>
        {
            bail!(
                "give --sparsity S (vision and language) or per-tower --vision/--qformer/--language"
            )
        }
        (None, false) => 0.0,
    };
    let tower = |name: &str, v: Option<f64>, default: f64| -> Result<f64> {
        // A tower without its own flag takes --sparsity, and is named so.
        let name = if v.is_none() && args.sparsity.is_some() && name != "qformer" {
            "sparsity"
        } else {
            name
        };
        let v = check_ratio(name, v.unwrap_or(default))?;
        // With N:M a tower is either pruned N:M or dense.
        let nm_sparsity = pattern_sparsity(pattern);
        if nm && v > 0.0 && (v - nm_sparsity).abs() > 1e-9 {
            bail!(
                "--{name} {v}: the pattern {pattern} prunes exactly {nm_sparsity}; give {nm_sparsity}, 0 (dense) or leave it out"
            );
        }
        Ok(v)
    };
    let sparsity = TowerSparsity {
        vision: tower("vision", args.vision, base)?,
        qformer: tower("qformer", args.qformer, 0.0)?,
        language: tower("language", args.language, base)?,
    };
    if sparsity.vision == 0.0 && sparsity.qformer == 0.0 && sparsity.language == 0.0 {
        bail!(
            "--sparsity / --vision / --qformer / --language: every tower has sparsity 0, nothing to prune"
        );
    }
    if args.samples == 0 {
        bail!("--samples 0: expected at least 1 calibration sample");
    }
    if args.memory_budget == Some(0) {
        bail!("--memory-budget 0: expected a positive size such as 4GiB");
    }
    if args.in_memory && (args.memory_budget.is_some() || args.activation_budget.is_some()) {
        bail!("--memory-budget / --activation-budget: the in-memory path holds the whole model");
    }
    if !(args.owl_m.is_finite() && args.owl_m > 0.0) {
        bail!("--owl-m {}: expected a positive number", args.owl_m);
    }
    if !(0.0..1.0).contains(&args.owl_lambda) {
        bail!(
            "--owl-lambda {}: expected a number in [0, 1)",
            args.owl_lambda
        );
    }
    let allocation = args.allocation.with(OwlConfig {
        m: args.owl_m,
        lambda: args.owl_lambda,
    });
    Ok(CalibrationConfig {
        method,
        pattern,
        sparsity,
        allocation,
        propagation: args.propagation,
        wanda_group: args.wanda_group,
        dsnot: None,
        block: BlockOptions {
            t5_position_bias_after_block0: !args.reference_t5_bias,
        },
    })
}

fn pattern_sparsity(p: SparsityPattern) -> f64 {
    match p {
        SparsityPattern::NM { n, m } => n as f64 / m as f64,
        SparsityPattern::Unstructured => 0.0,
    }
}

pub fn run(kind: BackendKind, mut args: Args) -> Result<()> {
    args.model = crate::backend::model_dir(&args.model)?;
    let cfg = settings(&args)?;
    refuse_alias("--out", &args.out, &[("model directory", &args.model)])?;
    ressa_models::pretrained::check_output_dir(&args.out)?;
    // Validated before the model is read: what needs calibration data has it.
    let needs = if cfg.method != Method::Magnitude {
        Some(format!("--method {}", cfg.method))
    } else if matches!(cfg.allocation, Allocation::Owl(_)) {
        Some("--allocation owl".to_string())
    } else {
        None
    };
    if let Some(what) = needs
        && (args.calibration.is_none() || args.images.is_none())
    {
        bail!(
            "{what} needs calibration data: give --calibration ANNOTATIONS.json and --images DIR"
        );
    }
    if let Some(c) = &args.calibration {
        refuse_overwrite("--out", &args.out, &[("calibration list", c)])?;
    }
    if let Some(i) = &args.images {
        refuse_overwrite("--out", &args.out, &[("image directory", i)])?;
    }
    let dir = args.model.clone();
    run_model_job(kind, &dir, Job { args, cfg })
}

struct Job {
    args: Args,
    cfg: CalibrationConfig,
}

impl ModelJob for Job {
    fn run<B: Backend, M: VisionLanguageModel<B>>(
        self,
        config: M::Config,
        device: &B::Device,
    ) -> Result<()> {
        run_on::<B, M>(&self.args, &self.cfg, config, device)
    }
}

/// Calibration samples: caption prefix → the prompt (language model and Q-Former), the rest →
/// the target teacher-forced after it; one image each, batch 1 (natural lengths, as the
/// reference).
fn samples<B: Backend, M: VisionLanguageModel<B>>(
    args: &Args,
    dir: &Path,
    model: &M,
    device: &B::Device,
) -> Result<(Vec<CalibrationSample<B>>, usize)> {
    let (Some(annotations), Some(images)) = (&args.calibration, &args.images) else {
        bail!("--calibration ANNOTATIONS.json and --images DIR are required together");
    };
    let items = read_caption_list(annotations)?;
    let sampler = match args.shuffle_seed {
        Some(seed) => Sampler::Random {
            n: args.samples,
            seed,
        },
        None => Sampler::First(args.samples),
    };
    let indices = sampler
        .indices(items.len())
        .with_context(|| annotations.display().to_string())?;
    let set = prefix_examples(&items, &indices, images, annotations, args.seed)?;
    if set.examples.is_empty() {
        bail!(
            "{}: no usable calibration caption (all shorter than 2 characters)",
            annotations.display()
        );
    }
    let processor = Processor::for_model(dir, model)?;
    let mut out = Vec::with_capacity(set.examples.len());
    for ex in &set.examples {
        out.push(
            processor
                .calibration_sample(
                    model,
                    &ex.image,
                    &ex.text_input,
                    ex.text_output.as_deref().unwrap_or(""),
                    device,
                )
                .with_context(|| format!("calibration sample {}", ex.image.display()))?,
        );
    }
    Ok((out, set.skipped.len()))
}

fn run_on<B: Backend, M: VisionLanguageModel<B>>(
    args: &Args,
    cfg: &CalibrationConfig,
    config: M::Config,
    device: &B::Device,
) -> Result<()> {
    if args.in_memory {
        run_in_memory::<B, M>(args, cfg, config, device)
    } else {
        run_streamed::<B, M>(args, cfg, config, device)
    }
}

/// Memory a prune holds besides what the estimate names (allocator slack, thread stacks,
/// transient tensors of a block's forward).
const HEADROOM: u64 = 48 << 20;

fn needs_data(cfg: &CalibrationConfig) -> bool {
    cfg.method != Method::Magnitude || matches!(cfg.allocation, Allocation::Owl(_))
}

/// Calibration samples when needed (or given), with the number of captions skipped.
fn calibration<B: Backend, M: VisionLanguageModel<B>>(
    args: &Args,
    cfg: &CalibrationConfig,
    dir: &Path,
    model: &M,
    device: &B::Device,
) -> Result<(Vec<CalibrationSample<B>>, usize)> {
    let (calibration, skipped) = if needs_data(cfg) || args.calibration.is_some() {
        samples(args, dir, model, device)?
    } else {
        (Vec::new(), 0)
    };
    if skipped > 0 {
        tracing::warn!(
            skipped,
            "calibration captions too short to split were skipped"
        );
    }
    Ok((calibration, skipped))
}

fn progress_bar<B: Backend, M: VisionLanguageModel<B>>(
    model: &M,
    cfg: &CalibrationConfig,
) -> ProgressBar {
    let total_blocks: usize = model
        .stacks()
        .iter()
        .filter(|s| cfg.sparsity.of(s.tower) > 0.0)
        .map(|s| s.blocks)
        .sum();
    let bar = ProgressBar::new(total_blocks as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} pruning [{bar:30}] {pos}/{len} blocks {msg} ({elapsed})",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    bar
}

/// The mask spill file beside the output: masks go there as they are produced (one bit per
/// weight would otherwise add 1/32 of the checkpoint to the resident set).
fn mask_spill(args: &Args) -> Result<(ressa_scratch::Scratch, ressa_sparse::sidecar::MaskSpill)> {
    let parent = args
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| parent.display().to_string())?;
    ressa_scratch::sweep_stale(parent);
    let scratch = ressa_scratch::Scratch::beside(&args.out, "masks");
    let spill = ressa_sparse::sidecar::MaskSpill::create(scratch.path())
        .map_err(|e| anyhow!("--out {}: cannot write beside it: {e}", args.out.display()))?;
    Ok((scratch, spill))
}

fn spill_error(path: &Path, e: impl std::fmt::Display) -> CalibrateError {
    CalibrateError::Input(format!("{}: {e}", path.display()))
}

/// `sparsity.json` and the per-tower totals.
fn report(
    args: &Args,
    cfg: &CalibrationConfig,
    layers: &[LayerReport],
    samples: usize,
    skipped: usize,
    elapsed: f64,
) -> (serde_json::Value, BTreeMap<&'static str, (usize, usize)>) {
    let mut towers: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for l in layers {
        let e = towers.entry(l.tower.name()).or_default();
        e.0 += l.pruned;
        e.1 += l.d_in * l.d_out;
    }
    let report = serde_json::json!({
        "method": cfg.method.to_string(),
        "pattern": cfg.pattern.to_string(),
        "target": {
            "vision": cfg.sparsity.of(Tower::Vision),
            "qformer": cfg.sparsity.of(Tower::QFormer),
            "language": cfg.sparsity.of(Tower::Language),
        },
        "allocation": args.allocation,
        "propagation": args.propagation,
        "reference_t5_bias": args.reference_t5_bias,
        "calibration_samples": samples,
        "skipped_captions": skipped,
        "seed": args.seed,
        "time_s": elapsed,
        "towers": towers.iter().map(|(t, (p, n))| (t.to_string(), serde_json::json!({
            "pruned": p, "weights": n, "sparsity": *p as f64 / (*n).max(1) as f64,
        }))).collect::<BTreeMap<_, _>>(),
        "layers": layers.iter().map(|l| serde_json::json!({
            "name": l.name, "tower": l.tower.name(), "shape": [l.d_in, l.d_out],
            "target": l.target, "sparsity": l.sparsity,
        })).collect::<Vec<_>>(),
    });
    (report, towers)
}

/// Writes `masks.safetensors` and `sparsity.json` into the output's temporary directory.
fn write_extras(
    dir: &Path,
    spill: &mut Option<ressa_sparse::sidecar::MaskSpill>,
    report: &serde_json::Value,
) -> ressa_models::Result<()> {
    let path = dir.join("masks.safetensors");
    spill
        .take()
        .expect("masks are written once")
        .finish(&path)
        .map_err(|e| ressa_models::ModelError::Input(format!("{}: {e}", path.display())))?;
    let path = dir.join("sparsity.json");
    std::fs::write(&path, serde_json::to_vec_pretty(report).expect("json"))
        .map_err(|e| ressa_models::ModelError::Input(format!("{}: {e}", path.display())))
}

fn log_done(args: &Args, towers: &BTreeMap<&str, (usize, usize)>, elapsed: f64) {
    for (tower, (p, n)) in towers {
        tracing::info!(tower, sparsity = *p as f64 / (*n).max(1) as f64, "pruned");
    }
    tracing::info!(
        out = %args.out.display(),
        seconds = elapsed,
        peak_rss_mib = rss_bytes("VmHWM").map(|b| b >> 20),
        "wrote pruned model, masks.safetensors, sparsity.json"
    );
}

/// Layer-streamed pruning: the model's parts outside the blocks in memory, each block read
/// from the mapped checkpoint when calibration reaches it, pruned, written and dropped.
fn run_streamed<B: Backend, M: VisionLanguageModel<B>>(
    args: &Args,
    cfg: &CalibrationConfig,
    config: M::Config,
    device: &B::Device,
) -> Result<()> {
    let start = Instant::now();
    let mut streamed = Streamed::<B, M>::open(&args.model, config, device)?;
    let plan = memory_plan(&streamed, cfg);
    let in_use = rss_bytes("VmRSS").unwrap_or(0);
    let need = in_use + plan.peak_block() + HEADROOM;
    tracing::info!(
        in_use_mib = in_use >> 20,
        outside_blocks_mib = plan.resident >> 20,
        largest_block_mib = plan.block >> 20,
        workspace_mib = plan.workspace >> 20,
        "memory plan"
    );
    let left = match args.memory_budget {
        Some(budget) if need > budget => bail!(
            "--memory-budget {}: pruning this model holds about {} at once ({} in use with the weights outside the blocks, {} for the largest block, {} to prune it, {} headroom); give at least that",
            size(budget),
            size(need),
            size(in_use),
            size(plan.block),
            size(plan.workspace),
            size(HEADROOM),
        ),
        Some(budget) => Some(budget - need),
        None => None,
    };
    let (calibration, skipped) = calibration(args, cfg, &args.model, &streamed.model, device)?;
    let bar = progress_bar(&streamed.model, cfg);
    let activations = args.activation_budget.or(left);
    tracing::info!(
        method = %cfg.method,
        samples = calibration.len(),
        activation_budget_mib = activations.map(|b| b >> 20),
        rss_mib = rss_bytes("VmRSS").map(|b| b >> 20),
        "pruning, one block at a time"
    );
    let (spill_scratch, spill) = mask_spill(args)?;
    let spill_path = spill_scratch.path().to_path_buf();
    let mut spill = Some(spill);
    let activation_scratch = ressa_scratch::Scratch::beside(&args.out, "activations");
    let budget = ActivationBudget {
        bytes: activations,
        spill_dir: Some(activation_scratch.path().to_path_buf()),
    };
    let mut output = streamed.output(&args.out)?;
    let layers = prune_streamed(
        &mut streamed,
        &mut output,
        &calibration,
        cfg,
        &budget,
        &mut |prefix, b, _| {
            bar.set_message(format!("{prefix}.{b}"));
            bar.inc(1);
        },
        &mut |name, mask| {
            spill
                .as_mut()
                .expect("open until the end")
                .push(name, &mask)
                .map_err(|e| spill_error(&spill_path, e))
        },
    )?;
    drop(activation_scratch);
    bar.finish_and_clear();
    tracing::info!(
        rss_mib = rss_bytes("VmRSS").map(|b| b >> 20),
        peak_rss_mib = rss_bytes("VmHWM").map(|b| b >> 20),
        "calibrated"
    );
    let elapsed = start.elapsed().as_secs_f64();
    let (report, towers) = report(args, cfg, &layers, calibration.len(), skipped, elapsed);
    output.finish(&mut |dir: &Path| write_extras(dir, &mut spill, &report))?;
    log_done(args, &towers, elapsed);
    Ok(())
}

/// The whole model loaded and pruned in memory (`--in-memory`).
fn run_in_memory<B: Backend, M: VisionLanguageModel<B>>(
    args: &Args,
    cfg: &CalibrationConfig,
    config: M::Config,
    device: &B::Device,
) -> Result<()> {
    let start = Instant::now();
    let mut pretrained = Pretrained::<B, M>::load_with(&args.model, config, device)?;
    let (calibration, skipped) = calibration(args, cfg, &args.model, &pretrained.model, device)?;
    let bar = progress_bar(&pretrained.model, cfg);
    tracing::info!(
        method = %cfg.method,
        samples = calibration.len(),
        rss_mib = rss_bytes("VmRSS").map(|b| b >> 20),
        "pruning"
    );
    let (spill_scratch, spill) = mask_spill(args)?;
    let spill_path = spill_scratch.path().to_path_buf();
    let mut spill = Some(spill);
    let layers = calibrate_and_prune_with(
        &mut pretrained.model,
        &calibration,
        cfg,
        &mut |prefix, b, _| {
            bar.set_message(format!("{prefix}.{b}"));
            bar.inc(1);
        },
        &mut |name, mask| {
            spill
                .as_mut()
                .expect("open until the end")
                .push(name, &mask)
                .map_err(|e| spill_error(&spill_path, e))
        },
    )?;
    bar.finish_and_clear();
    tracing::info!(
        rss_mib = rss_bytes("VmRSS").map(|b| b >> 20),
        peak_rss_mib = rss_bytes("VmHWM").map(|b| b >> 20),
        "calibrated"
    );
    let elapsed = start.elapsed().as_secs_f64();
    let (report, towers) = report(args, cfg, &layers, calibration.len(), skipped, elapsed);
    save_model_dir_with(
        &pretrained.model,
        &pretrained.layout,
        &args.model,
        &args.out,
        &mut |dir: &Path| write_extras(dir, &mut spill, &report),
    )?;
    log_done(args, &towers, elapsed);
    Ok(())
}

/// Resident set size of this process from Linux `/proc/self/status` (`VmRSS` now, `VmHWM`
/// peak), if known.
fn rss_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
