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
use ressa_models::{Pretrained, Processor, VisionLanguageModel};
use ressa_prune::calibrate::{
    Allocation, AllocationKind, CalibrationConfig, Propagation, TowerSparsity,
    calibrate_and_prune_with,
};
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
    /// Output directory (must not exist or be empty).
    #[arg(long)]
    out: PathBuf,
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
    pretrained: &Pretrained<B, M>,
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
    let processor = Processor::for_model(&pretrained.dir, &pretrained.model)?;
    let mut out = Vec::with_capacity(set.examples.len());
    for ex in &set.examples {
        out.push(
            processor
                .calibration_sample(
                    &pretrained.model,
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
    let start = Instant::now();
    let mut pretrained = Pretrained::<B, M>::load_with(&args.model, config, device)?;
    let needs_data =
        cfg.method != Method::Magnitude || matches!(cfg.allocation, Allocation::Owl(_));
    let (calibration, skipped) = if needs_data || args.calibration.is_some() {
        samples(args, &pretrained, device)?
    } else {
        (Vec::new(), 0)
    };
    if skipped > 0 {
        tracing::warn!(
            skipped,
            "calibration captions too short to split were skipped"
        );
    }
    let total_blocks: usize = pretrained
        .model
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
    tracing::info!(
        method = %cfg.method,
        samples = calibration.len(),
        rss_mib = rss_bytes("VmRSS").map(|b| b >> 20),
        "pruning"
    );
    // Masks go to a spill file beside the output as they are produced (one bit per weight
    // would otherwise add 1/32 of the checkpoint to the resident set).
    let parent = args
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| parent.display().to_string())?;
    ressa_scratch::sweep_stale(parent);
    let spill_scratch = ressa_scratch::Scratch::beside(&args.out, "masks");
    let spill_path = spill_scratch.path().to_path_buf();
    let mut spill = ressa_sparse::sidecar::MaskSpill::create(&spill_path)
        .map_err(|e| anyhow!("--out {}: cannot write beside it: {e}", args.out.display()))?;
    let layers = calibrate_and_prune_with(
        &mut pretrained.model,
        &calibration,
        cfg,
        &mut |prefix, b, _| {
            bar.set_message(format!("{prefix}.{b}"));
            bar.inc(1);
        },
        &mut |name, mask| {
            spill.push(name, &mask).map_err(|e| {
                ressa_prune::calibrate::CalibrateError::Input(format!(
                    "{}: {e}",
                    spill_path.display()
                ))
            })
        },
    )?;
    bar.finish_and_clear();
    tracing::info!(
        rss_mib = rss_bytes("VmRSS").map(|b| b >> 20),
        peak_rss_mib = rss_bytes("VmHWM").map(|b| b >> 20),
        "calibrated"
    );
    let elapsed = start.elapsed().as_secs_f64();

    let mut towers: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for l in &layers {
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
        "calibration_samples": calibration.len(),
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
    let mut spill = Some(spill);
    save_model_dir_with(
        &pretrained.model,
        &pretrained.layout,
        &args.model,
        &args.out,
        &mut |dir: &Path| {
            let path = dir.join("masks.safetensors");
            spill
                .take()
                .expect("masks are written once")
                .finish(&path)
                .map_err(|e| ressa_models::ModelError::Input(format!("{}: {e}", path.display())))?;
            let path = dir.join("sparsity.json");
            std::fs::write(&path, serde_json::to_vec_pretty(&report).expect("json"))
                .map_err(|e| ressa_models::ModelError::Input(format!("{}: {e}", path.display())))
        },
    )?;
    for (tower, (p, n)) in &towers {
        tracing::info!(tower, sparsity = *p as f64 / (*n).max(1) as f64, "pruned");
    }
    tracing::info!(
        out = %args.out.display(),
        seconds = elapsed,
        peak_rss_mib = rss_bytes("VmHWM").map(|b| b >> 20),
        "wrote pruned model, masks.safetensors, sparsity.json"
    );
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
