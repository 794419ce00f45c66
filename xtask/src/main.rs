//! `cargo xtask <task>`: project chores that need no network.
//!
//! - `random-checkpoint --config CONFIG.json --out DIR [--like DIR] [--seed N] [--scale S]`:
//!   an HF model directory with random weights for `CONFIG.json` (benchmarks and memory tests
//!   of full-width models without a download); `--like` copies the tokenizers and
//!   preprocessor config of another model directory.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use ressa_models::ModelConfig;
use ressa_models::instructblip::write_random_checkpoint;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
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
        /// Values ~ U(-scale, scale).
        #[arg(long, default_value_t = 0.02)]
        scale: f32,
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

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::RandomCheckpoint {
            config,
            out,
            like,
            seed,
            scale,
        } => {
            let cfg = ModelConfig::from_file(&config)?;
            if out.exists() {
                bail!("{}: exists", out.display());
            }
            std::fs::create_dir_all(&out)?;
            std::fs::copy(&config, out.join("config.json")).context("copying config.json")?;
            if let Some(like) = like {
                for f in ["tokenizer.json", "preprocessor_config.json"] {
                    std::fs::copy(like.join(f), out.join(f))
                        .with_context(|| like.join(f).display().to_string())?;
                }
                if like.join("qformer_tokenizer").is_dir() {
                    copy_dir(
                        &like.join("qformer_tokenizer"),
                        &out.join("qformer_tokenizer"),
                    )?;
                }
            }
            let device = Default::default();
            write_random_checkpoint::<burn::backend::Flex>(&cfg, &out, seed, scale, &device)?;
            println!("wrote {}", out.display());
            Ok(())
        }
    }
}
