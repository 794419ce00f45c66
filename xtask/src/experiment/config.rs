//! The study a TOML file describes (see `configs/shapes-tiny.toml`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ressa_data::shapes::ShapesConfig;
use ressa_train::TrainConfig;
use ressa_train::pretrain::PretrainConfig;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    pub name: String,
    /// Where artefacts and results go (default `target/experiments/<name>`).
    #[serde(default)]
    pub work_dir: Option<PathBuf>,
    pub model: ModelSource,
    pub data: DataSource,
    #[serde(default)]
    pub calibration: Calibration,
    #[serde(default)]
    pub grid: Option<Grid>,
    #[serde(default)]
    pub split: Option<Split>,
    #[serde(default)]
    pub towers: Option<Towers>,
    #[serde(default)]
    pub ressa: Option<TrainConfig>,
    #[serde(default)]
    pub eval: Eval,
}

/// A model directory, or the toy model trained from scratch.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSource {
    /// An HF model directory (the dense model).
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Train this `config.json` from scratch on the data's training split.
    #[serde(default)]
    pub train_config: Option<PathBuf>,
    #[serde(default)]
    pub pretrain: PretrainConfig,
    /// Initial weights ~ U(±init_scale) (norm weights 1); default: `transformers`'
    /// initialisation (`write_initial_checkpoint`).
    #[serde(default)]
    pub init_scale: Option<f32>,
}

/// Generated shapes data, or LAVIS files on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSource {
    #[serde(default)]
    pub shapes: Option<ShapesConfig>,
    /// A directory laid out like the shapes output (`annotations/vqa_{split}.json`, …,
    /// `images/`), for real data converted to that layout.
    #[serde(default)]
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Calibration {
    pub samples: usize,
}

impl Default for Calibration {
    fn default() -> Self {
        Self { samples: 32 }
    }
}

/// Methods × settings, vision and language pruned alike.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grid {
    pub methods: Vec<String>,
    /// "50%", "70%", "2:4", "4:8", …
    pub settings: Vec<String>,
    /// Run RESSA on every grid cell.
    #[serde(default = "yes")]
    pub ressa: bool,
}

fn yes() -> bool {
    true
}

/// Fixed-sum vision/language sweeps: for each sum, vision takes each value, language the rest.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Split {
    pub method: String,
    pub sums: Vec<f64>,
    pub vision: Vec<f64>,
}

/// Language-only and vision-only pruning at these sparsities.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Towers {
    pub method: String,
    pub sparsities: Vec<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Eval {
    /// Test questions scored (the first N).
    pub vqa_items: usize,
    /// Test images captioned (the first N; 0 = no captioning).
    pub caption_items: usize,
    pub batch_size: usize,
    pub max_answer_tokens: usize,
    pub max_caption_tokens: usize,
}

impl Default for Eval {
    fn default() -> Self {
        Self {
            vqa_items: 300,
            caption_items: 60,
            batch_size: 32,
            max_answer_tokens: 4,
            max_caption_tokens: 24,
        }
    }
}

impl ExperimentConfig {
    /// Reads the TOML; relative paths are relative to the current directory (the repository
    /// root under `cargo xtask`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
        let cfg: Self = toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!("{}: {}", path.display(), e.to_string().replace('\n', " "))
        })?;
        cfg.validate()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        match (&self.model.dir, &self.model.train_config) {
            (Some(_), None) | (None, Some(_)) => {}
            _ => bail!("model: give exactly one of `dir` or `train_config`"),
        }
        match (&self.data.shapes, &self.data.dir) {
            (Some(_), None) | (None, Some(_)) => {}
            _ => bail!("data: give exactly one of `shapes` or `dir`"),
        }
        if let Some(g) = &self.grid {
            for s in &g.settings {
                parse_setting(s).map_err(|e| anyhow::anyhow!("grid.settings: {e}"))?;
            }
        }
        if let Some(s) = &self.split {
            for sum in &s.sums {
                if !(0.0..2.0).contains(sum) {
                    bail!("split.sums: {sum} is not in [0, 2)");
                }
            }
        }
        if let Some(r) = &self.ressa {
            r.validate().map_err(|e| anyhow::anyhow!("ressa.{e}"))?;
        }
        Ok(())
    }

    pub fn work_dir(&self) -> PathBuf {
        self.work_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("target/experiments").join(&self.name))
    }
}

/// "50%" → (unstructured, 0.5); "2:4" → (2:4, 0.5).
pub fn parse_setting(s: &str) -> Result<(String, f64)> {
    if let Some(p) = s.strip_suffix('%') {
        let v: f64 = p
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("{s:?}: expected e.g. \"50%\" or \"2:4\""))?;
        if !(0.0..100.0).contains(&v) {
            bail!("{s:?}: a sparsity must be in [0 %, 100 %)");
        }
        return Ok(("unstructured".into(), v / 100.0));
    }
    let (n, m) = s
        .split_once(':')
        .ok_or_else(|| anyhow::anyhow!("{s:?}: expected e.g. \"50%\" or \"2:4\""))?;
    let (n, m): (usize, usize) = (
        n.trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("{s:?}: bad N"))?,
        m.trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("{s:?}: bad M"))?,
    );
    if n == 0 || n >= m {
        bail!("{s:?}: expected 0 < N < M");
    }
    Ok((format!("{n}:{m}"), n as f64 / m as f64))
}
