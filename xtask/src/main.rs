//! `cargo xtask <task>`: project chores that need no network.
//!
//! - `random-checkpoint --config CONFIG.json --out DIR [--like DIR] [--seed N] [--scale S]
//!   [--dtype f32|f16|bf16]`: an HF model directory with random weights for `CONFIG.json`
//!   (benchmarks and memory tests of full-width models without a download): the
//!   initialisation `transformers` gives a fresh model of that family (`_init_weights`: e.g.
//!   CLIP's own σ per layer for a LLaVA), or with `--scale S` every weight ~ U(−S, S), stored in
//!   `--dtype` (default f32); `--like` copies the tokenizers and preprocessor config of another
//!   model directory (the image size set to the config's).
//! - `prune-memory (--model DIR | --model-config configs/models/NAME [--dtype bf16]) --method M
//!   [--method M2 …] [--samples N] [--memory-budget SIZE] [--max-rss SIZE] [--time-limit S]
//!   [--min-free-disk SIZE] [-- ARGS]`: `ressa prune` (release) once per method as a child
//!   process on a model or a random checkpoint of a config (written once under `--work-dir`),
//!   with its peak resident set (`wait4`), wall and CPU time and the machine's load while it
//!   ran; appends to `docs/prune-memory.json` and rewrites `docs/prune-memory.md`.
//! - `bench [--backend cpu|cuda|wgpu]... [--quick] [--filter REGEX] [--python PY] [--no-torch]`:
//!   the criterion benches of every crate per backend plus the PyTorch scripts for the same
//!   work; writes `docs/benchmarks.md` and `docs/benchmarks.json` (`--render JSON` rewrites the
//!   markdown from a saved run without measuring).
//! - `experiment CONFIG.toml`: a whole pruning study (data, dense model, pruning grid, RESSA,
//!   evaluation), cached by content hash, with `results.json`, `report.md` and plots.
//! - `shapes --out DIR [--seed N] [--train N --val N --test N] [--image-size N]
//!   [--model-image-size N] [--noise N] [--max-shapes N]`: the procedural shapes dataset
//!   (images, LAVIS annotations, tokenizers, preprocessor config; see `ressa_data::shapes`).

mod bench;
mod experiment;
mod prune_memory;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use ressa_data::shapes::{self, ShapesConfig};
use ressa_models::pretrained::{write_initial_checkpoint_as, write_random_checkpoint_as};
use ressa_models::{FamilyVisitor, VisionLanguageModel, visit_family};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Run the benchmarks and write docs/benchmarks.md (ratios measured in one run).
    Bench(bench::BenchArgs),
    /// Run a pruning study described by a TOML file (e.g. configs/shapes-tiny.toml).
    Experiment {
        /// The study's TOML file.
        config: PathBuf,
        /// Overrides the file's `work_dir`.
        #[arg(long)]
        work_dir: Option<PathBuf>,
    },
    /// Write an HF directory with random weights for a config.
    RandomCheckpoint {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Copy tokenizer.json, qformer_tokenizer/ and preprocessor_config.json from here.
        #[arg(long)]
        like: Option<PathBuf>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Values ~ U(-scale, scale) (norm weights 1); default: the family's `transformers`
        /// initialisation (biases 0, norms 1, each weight N(0, σ²) with σ as `_init_weights`).
        #[arg(long)]
        scale: Option<f32>,
        /// Stored dtype of every tensor: f32, f16 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// Prune a model with `ressa prune` (release) per method, measuring peak RSS and time.
    PruneMemory(Box<prune_memory::PruneMemoryArgs>),
    /// Generate the shapes dataset (defaults: seed 0, 2000/200/200 images of 64×64).
    Shapes {
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long)]
        train: Option<usize>,
        #[arg(long)]
        val: Option<usize>,
        #[arg(long)]
        test: Option<usize>,
        /// Side of the generated images.
        #[arg(long)]
        image_size: Option<u32>,
        /// preprocessor_config.json size (the vision model's image_size); default --image-size.
        #[arg(long)]
        model_image_size: Option<u32>,
        /// Per-channel pixel noise amplitude (0 = none).
        #[arg(long)]
        noise: Option<u8>,
        /// At most this many shapes per image (1 to 9).
        #[arg(long)]
        max_shapes: Option<usize>,
    },
}

fn copy_dir(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst)?;
    for e in std::fs::read_dir(src)? {
        let p = e?.path();
        let to = dst.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &to)?;
        } else {
            std::fs::copy(&p, &to)?;
        }
    }
    Ok(())
}

/// Random weights for a config of any registered family.
struct RandomCheckpoint<'a> {
    config: &'a Path,
    out: &'a Path,
    like: Option<&'a Path>,
    seed: u64,
    scale: Option<f32>,
    dtype: safetensors::Dtype,
}

/// Sets the image size of a copied `preprocessor_config.json` to the model's (BLIP's
/// `size.{height,width}`, CLIP's `size.shortest_edge` and `crop_size`).
fn fit_preprocessor(path: &Path, image_size: usize) -> Result<()> {
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(path)?)?;
    let n = serde_json::json!(image_size);
    if let Some(size) = v.get_mut("size").and_then(|s| s.as_object_mut()) {
        for k in ["height", "width", "shortest_edge"] {
            if size.contains_key(k) {
                size.insert(k.into(), n.clone());
            }
        }
    }
    if let Some(crop) = v.get_mut("crop_size").and_then(|s| s.as_object_mut()) {
        for k in ["height", "width"] {
            if crop.contains_key(k) {
                crop.insert(k.into(), n.clone());
            }
        }
    }
    std::fs::write(path, serde_json::to_vec_pretty(&v)?)?;
    Ok(())
}

impl FamilyVisitor<burn::backend::Flex> for RandomCheckpoint<'_> {
    type Output = Result<()>;
    fn visit<M: VisionLanguageModel<burn::backend::Flex>>(self, config: M::Config) -> Result<()> {
        let out = self.out;
        if out.exists() {
            bail!("{}: exists", out.display());
        }
        std::fs::create_dir_all(out)?;
        std::fs::copy(self.config, out.join("config.json")).context("copying config.json")?;
        if let Some(like) = self.like {
            for f in ["tokenizer.json", "preprocessor_config.json"] {
                std::fs::copy(like.join(f), out.join(f))
                    .with_context(|| like.join(f).display().to_string())?;
            }
            use ressa_models::FamilyConfig;
            fit_preprocessor(&out.join("preprocessor_config.json"), config.image_size())?;
            if like.join("qformer_tokenizer").is_dir() {
                copy_dir(
                    &like.join("qformer_tokenizer"),
                    &out.join("qformer_tokenizer"),
                )?;
            }
        }
        let device = Default::default();
        match self.scale {
            Some(scale) => write_random_checkpoint_as::<burn::backend::Flex, M>(
                &config, out, self.seed, scale, self.dtype, &device,
            )?,
            None => write_initial_checkpoint_as::<burn::backend::Flex, M>(
                &config, out, self.seed, self.dtype, &device,
            )?,
        }
        Ok(())
    }
}

/// `--dtype` of `random-checkpoint` and `prune-memory`.
pub(crate) fn parse_dtype(text: &str) -> Result<safetensors::Dtype> {
    Ok(match text.to_ascii_lowercase().as_str() {
        "f32" | "float32" => safetensors::Dtype::F32,
        "f16" | "float16" => safetensors::Dtype::F16,
        "bf16" | "bfloat16" => safetensors::Dtype::BF16,
        other => bail!("--dtype {other}: expected f32, f16 or bf16"),
    })
}

/// Writes a random model directory for `config` into `out` (see `random-checkpoint`).
pub(crate) fn random_checkpoint(
    config: &Path,
    out: &Path,
    like: Option<&Path>,
    seed: u64,
    scale: Option<f32>,
    dtype: safetensors::Dtype,
) -> Result<()> {
    // The config is parsed (and its family found) before anything is written.
    visit_family::<burn::backend::Flex, _>(
        config,
        RandomCheckpoint {
            config,
            out,
            like,
            seed,
            scale,
            dtype,
        },
    )?
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,ressa_models=warn,ressa_train=warn".into()),
        )
        .init();
    // Subnormal floats cost ~100 cycles per operation on x86 (see `ressa_sparse::fpenv`).
    ressa_sparse::fpenv::flush_subnormals();
    match Cli::parse().task {
        Task::Bench(args) => bench::run(args),
        Task::Experiment { config, work_dir } => experiment::run(&config, work_dir),
        Task::PruneMemory(args) => prune_memory::run(*args),
        Task::RandomCheckpoint {
            config,
            out,
            like,
            seed,
            scale,
            dtype,
        } => {
            random_checkpoint(
                &config,
                &out,
                like.as_deref(),
                seed,
                scale,
                parse_dtype(&dtype)?,
            )?;
            println!("wrote {}", out.display());
            Ok(())
        }
        Task::Shapes {
            out,
            seed,
            train,
            val,
            test,
            image_size,
            model_image_size,
            noise,
            max_shapes,
        } => {
            let d = ShapesConfig::default();
            let cfg = ShapesConfig {
                seed: seed.unwrap_or(d.seed),
                train: train.unwrap_or(d.train),
                val: val.unwrap_or(d.val),
                test: test.unwrap_or(d.test),
                image_size: image_size.unwrap_or(d.image_size),
                model_image_size: model_image_size.or(d.model_image_size),
                noise: noise.unwrap_or(d.noise),
                max_shapes: max_shapes.unwrap_or(d.max_shapes),
                ..d
            };
            let start = std::time::Instant::now();
            let s = shapes::generate(&cfg, &out)?;
            let splits: Vec<String> = s
                .splits
                .iter()
                .map(|p| {
                    format!(
                        "{} {} images, {} captions, {} questions",
                        p.name, p.images, p.captions, p.questions
                    )
                })
                .collect();
            println!(
                "wrote {} in {:.1} s: {}; vocabulary {} (<image> = {})",
                out.display(),
                start.elapsed().as_secs_f64(),
                splits.join("; "),
                s.vocab_size,
                s.image_token_id
            );
            Ok(())
        }
    }
}
