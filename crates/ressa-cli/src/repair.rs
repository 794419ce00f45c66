//! `ressa repair`: RESSA on a pruned model — SparseLoRA trained with CE + KL from the dense
//! path, merged with exactly the pruned zeros. Flags, or a TOML file (`--config`) that flags
//! override.

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};
use indicatif::{ProgressBar, ProgressStyle};
use ressa_train::repair::{DataConfig, RepairConfig, repair_on};
use ressa_train::{KlReduction, TrainEvent};

use crate::backend::BackendKind;
use crate::output::{refuse_alias, refuse_overwrite};
use crate::with_backend;

#[derive(clap::Args)]
pub struct Args {
    /// TOML file with the whole run (see `ressa_train::repair`); flags below override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The pruned model directory (masks from its masks.safetensors, or its zeros).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The dense model directory: the teacher and the student's base weights.
    #[arg(long)]
    dense: Option<PathBuf>,
    /// Training list: LAVIS captions `[{"image", "caption"}]` or VQA `[{"question", "answer", "image", ...}]`.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Image root of the lists.
    #[arg(long)]
    images: Option<PathBuf>,
    /// Held-out list (validation loss and token accuracy).
    #[arg(long)]
    val: Option<PathBuf>,
    /// Output directory (must not exist or be empty).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Optimizer steps (0 = one epoch).
    #[arg(long)]
    steps: Option<u64>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    grad_accum: Option<usize>,
    #[arg(long)]
    lr: Option<f64>,
    /// LoRA rank of every tower (default: vision 4, Q-Former 2, language 8).
    #[arg(long)]
    rank: Option<usize>,
    /// Weight λ of the KL term (CE gets 1 − λ).
    #[arg(long)]
    lambda: Option<f64>,
    #[arg(long)]
    temperature: Option<f64>,
    /// token-mean (pad-masked, ×T²) | reference (batchmean over all positions)
    #[arg(long)]
    kl_reduction: Option<String>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    checkpoint_every: Option<u64>,
    #[arg(long)]
    val_every: Option<u64>,
    /// Checkpoint directory (default: OUT.checkpoints).
    #[arg(long)]
    checkpoints: Option<PathBuf>,
    /// Continue from the newest checkpoint.
    #[arg(long)]
    resume: bool,
    /// Turn off the training image augmentation.
    #[arg(long)]
    no_augment: bool,
    /// Data-parallel peers: threads on a CPU backend, or devices 0..N-1 of a GPU backend.
    /// `--batch-size` stays the global batch (each peer takes an equal share of it).
    #[arg(long)]
    devices: Option<usize>,
    /// Several machines: `--batch-size` is the global batch over all nodes' peers; node 0
    /// writes `--out` and the checkpoints; with `--resume` every node reads the checkpoint
    /// directory (`--checkpoints` on a shared file system, or a copy).
    #[command(flatten)]
    nodes: crate::nodes::NodeArgs,
}

fn config(args: Args) -> Result<(RepairConfig, bool)> {
    let mut cfg = match &args.config {
        Some(path) => RepairConfig::from_toml(path)?,
        None => {
            let need = |v: &Option<PathBuf>, flag: &str| {
                v.clone()
                    .ok_or_else(|| anyhow!("--{flag} is required (or give --config FILE.toml)"))
            };
            RepairConfig {
                pruned: need(&args.model, "model")?,
                dense: None,
                out: need(&args.out, "out")?,
                data: DataConfig {
                    train: need(&args.data, "data")?,
                    images: need(&args.images, "images")?,
                    val: None,
                    caption_prompt: None,
                    max_examples: None,
                },
                train: Default::default(),
                checkpoints: None,
            }
        }
    };
    if let Some(v) = args.model {
        cfg.pruned = v;
    }
    if let Some(v) = args.dense {
        cfg.dense = Some(v);
    }
    if let Some(v) = args.data {
        cfg.data.train = v;
    }
    if let Some(v) = args.images {
        cfg.data.images = v;
    }
    if let Some(v) = args.val {
        cfg.data.val = Some(v);
    }
    if let Some(v) = args.out {
        cfg.out = v;
    }
    if let Some(v) = args.checkpoints {
        cfg.checkpoints = Some(v);
    }
    let t = &mut cfg.train;
    if let Some(v) = args.steps {
        t.steps = v;
    }
    if let Some(v) = args.batch_size {
        t.batch_size = v;
    }
    if let Some(v) = args.grad_accum {
        t.grad_accum = v;
    }
    if let Some(v) = args.lr {
        t.lr = v;
    }
    if let Some(r) = args.rank {
        if r == 0 {
            bail!("--rank 0: expected at least 1 (a pruned tower's mask lives in its adapter)");
        }
        t.adapters.vision.rank = r;
        t.adapters.qformer.rank = r;
        t.adapters.language.rank = r;
    }
    if let Some(v) = args.lambda {
        t.distill.lambda = v;
    }
    if let Some(v) = args.temperature {
        t.distill.temperature = v;
    }
    if let Some(v) = args.kl_reduction {
        t.distill.reduction = v
            .parse::<KlReduction>()
            .map_err(|e| anyhow!("--kl-reduction {e}"))?;
    }
    if let Some(v) = args.seed {
        t.seed = v;
    }
    if let Some(v) = args.checkpoint_every {
        t.checkpoint_every = v;
    }
    if let Some(v) = args.val_every {
        t.val_every = v;
    }
    if args.no_augment {
        t.augment = false;
    }
    if let Some(n) = args.devices {
        if n == 0 {
            bail!("--devices 0: expected at least 1");
        }
        t.devices = n;
    }
    if let Some(c) = args.nodes.cluster()? {
        if !t.batch_size.is_multiple_of(t.devices * c.nodes) {
            bail!(
                "--batch-size {}: not divisible by --nodes {} × --devices {} (the batch size is the global batch; every device takes an equal share)",
                t.batch_size,
                c.nodes,
                t.devices
            );
        }
        t.cluster = Some(c);
    }
    if t.devices > 0 && !t.batch_size.is_multiple_of(t.devices) {
        bail!(
            "--batch-size {}: not divisible by --devices {} (the batch size is the global batch; every device takes an equal share)",
            t.batch_size,
            t.devices
        );
    }
    t.validate().context("train")?;
    Ok((cfg, args.resume))
}

pub fn run(kind: BackendKind, args: Args) -> Result<()> {
    let (mut cfg, resume) = config(args)?;
    cfg.pruned = crate::backend::model_dir(&cfg.pruned)?;
    if let Some(d) = &cfg.dense {
        cfg.dense = Some(crate::backend::model_dir(d)?);
    }
    let mut models: Vec<(&str, &std::path::Path)> = vec![("pruned model directory", &cfg.pruned)];
    if let Some(d) = &cfg.dense {
        models.push(("dense model directory", d));
    }
    refuse_alias("--out", &cfg.out, &models)?;
    let mut data: Vec<(&str, &std::path::Path)> = vec![
        ("training list", &cfg.data.train),
        ("image directory", &cfg.data.images),
    ];
    if let Some(v) = &cfg.data.val {
        data.push(("validation list", v));
    }
    refuse_overwrite("--out", &cfg.out, &data)?;
    if !resume
        && cfg.checkpoint_dir().exists()
        && !ressa_train::checkpoint::list(&cfg.checkpoint_dir())?.is_empty()
    {
        bail!(
            "{}: checkpoints of an earlier run exist; pass --resume to continue it or remove them",
            cfg.checkpoint_dir().display()
        );
    }
    with_backend!(kind, |device: B| {
        let devices = ressa_models::parallel::device_list::<B>(&device, cfg.train.devices)?;
        let _quiet = cfg
            .train
            .cluster
            .as_ref()
            .and_then(|_| crate::nodes::StdoutToStderr::new());
        run_on::<burn::backend::Autodiff<B>>(&cfg, resume, &devices)
    })
}

fn run_on<B: ressa_models::ops::AutodiffDenseBackend>(
    cfg: &RepairConfig,
    resume: bool,
    devices: &[B::Device],
) -> Result<()> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} repair [{bar:30}] {pos}/{len} steps {msg} ({elapsed}, eta {eta})",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    if let Some(c) = &cfg.train.cluster {
        tracing::info!(
            nodes = c.nodes,
            node_rank = c.node_rank,
            devices_per_node = devices.len(),
            global_batch = cfg.train.batch_size,
            "multi-node data-parallel repair"
        );
    } else if devices.len() > 1 {
        tracing::info!(
            devices = devices.len(),
            global_batch = cfg.train.batch_size,
            "data-parallel repair"
        );
    }
    let report = repair_on::<B>(cfg, resume, devices, &mut |e| match e {
        TrainEvent::Start {
            total_steps,
            resumed_at,
        } => {
            bar.set_length(*total_steps);
            if let Some(s) = resumed_at {
                bar.set_position(*s);
                tracing::info!(step = s, "resumed from checkpoint");
            }
        }
        TrainEvent::Step {
            step,
            loss,
            ce,
            kl,
            lr,
            examples_per_s,
            ..
        } => {
            bar.set_position(*step);
            bar.set_message(format!(
                "loss {loss:.4} (ce {ce:.4}, kl {kl:.4}) lr {lr:.2e} {examples_per_s:.1} ex/s"
            ));
            tracing::debug!(step, loss, ce, kl, lr, examples_per_s, "step");
        }
        TrainEvent::Validation(v) => bar.suspend(|| {
            tracing::info!(
                step = v.step,
                loss = v.loss,
                ce = v.ce,
                kl = v.kl,
                token_accuracy = v.token_accuracy,
                "validation"
            )
        }),
        TrainEvent::Checkpoint { step, path } => {
            tracing::debug!(step, path = %path.display(), "checkpoint")
        }
    });
    bar.finish_and_clear();
    let report = report.map_err(|e| {
        let dir = cfg.checkpoint_dir();
        match ressa_train::checkpoint::list(&dir) {
            Ok(kept) if !kept.is_empty() => anyhow::Error::from(e).context(format!(
                "checkpoints kept in {} (pass --resume to continue, or remove them)",
                dir.display()
            )),
            _ => e.into(),
        }
    })?;
    if let Some(c) = cfg.train.cluster.as_ref().filter(|c| c.node_rank > 0) {
        tracing::info!(
            node = c.node_rank,
            steps = report.train.steps,
            seconds = report.train.seconds,
            "trained; node 0 writes the repaired model"
        );
        return Ok(());
    }
    tracing::info!(
        out = %cfg.out.display(),
        steps = report.train.steps,
        seconds = report.train.seconds,
        steps_per_s = report.train.steps_per_s,
        sparse_adapters = report.sparse_adapters,
        exact_sparsity = report.exact_sparsity,
        "wrote repaired model, masks.safetensors, adapters/, repair.json"
    );
    Ok(())
}
