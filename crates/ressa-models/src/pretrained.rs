//! Loading a model directory into a family's type, and writing it back: every tensor of the
//! source (those the model changed in their source dtype and shard, the others byte for byte),
//! the other files copied, through a temporary directory renamed at the end.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::prelude::*;
use safetensors::Dtype;

use crate::error::{ModelError, Result};
use crate::vlm::{FamilyConfig, VisionLanguageModel};
use crate::weights::{
    ExportTensor, INDEX_FILE, Loader, SINGLE_FILE, WeightStore, export_tensors, write_safetensors,
    write_safetensors_stream,
};

/// How the source checkpoint stored its tensors, so saving reproduces the layout.
#[derive(Debug, Clone, Default)]
pub struct SourceLayout {
    pub dtypes: HashMap<String, Dtype>,
    pub shards: Option<BTreeMap<String, String>>,
}

/// A model loaded from an HF directory, with what is needed to save it back.
#[derive(Debug)]
pub struct Pretrained<B: Backend, M: VisionLanguageModel<B>> {
    pub model: M,
    pub config: M::Config,
    pub layout: SourceLayout,
    pub dir: PathBuf,
    _backend: std::marker::PhantomData<B>,
}

impl<B: Backend, M: VisionLanguageModel<B>> Pretrained<B, M> {
    /// Loads `config.json` and the (possibly sharded) safetensors of an HF model directory.
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self> {
        let config = M::Config::from_file(&dir.join("config.json"))?;
        Self::load_with(dir, config, device)
    }

    /// [`Pretrained::load`] with the configuration already read.
    pub fn load_with(dir: &Path, config: M::Config, device: &B::Device) -> Result<Self> {
        let store = WeightStore::open_dir(dir)?;
        let model = M::load(&config, &Loader::new(&store, device))?;
        let dtypes = store
            .keys()
            .filter_map(|k| store.info(k).map(|(_, d)| (k.clone(), d)))
            .collect();
        tracing::info!(dir = %dir.display(), params = model.num_params(), "loaded model");
        Ok(Self {
            model,
            config,
            layout: SourceLayout {
                dtypes,
                shards: store.shard_map().cloned(),
            },
            dir: dir.to_path_buf(),
            _backend: std::marker::PhantomData,
        })
    }

    /// A model already built (e.g. trained) with the directory it came from.
    pub fn from_parts(model: M, config: M::Config, layout: SourceLayout, dir: &Path) -> Self {
        Self {
            model,
            config,
            layout,
            dir: dir.to_path_buf(),
            _backend: std::marker::PhantomData,
        }
    }

    /// Writes an HF model directory at `out`: the source directory's other files copied, the
    /// weights in the source's dtypes and shard layout. Written to a temporary directory
    /// beside `out` and renamed at the end, so a failure leaves no half-written output.
    pub fn save(&self, out: &Path) -> Result<()> {
        save_model_dir(&self.model, &self.layout, &self.dir, out)
    }
}

/// See [`Pretrained::save`].
pub fn save_model_dir<B: Backend, M: VisionLanguageModel<B>>(
    model: &M,
    layout: &SourceLayout,
    src: &Path,
    out: &Path,
) -> Result<()> {
    save_model_dir_with(model, layout, src, out, &mut |_| Ok(()))
}

/// [`save_model_dir`] plus `extra`, which writes further files (mask sidecars, reports) into
/// the temporary directory before it is renamed to `out`.
pub fn save_model_dir_with<B: Backend, M: VisionLanguageModel<B>>(
    model: &M,
    layout: &SourceLayout,
    src: &Path,
    out: &Path,
    extra: &mut dyn FnMut(&Path) -> Result<()>,
) -> Result<()> {
    write_dir_atomically(out, |tmp: &Path| -> Result<()> {
        copy_non_weight_files(src, tmp)?;
        drop_sparsity_annotation(&tmp.join("config.json"))?;
        write_weights(model, layout, src, tmp)?;
        extra(tmp)
    })
}

/// An output directory: absent or empty (a file is not one).
pub fn check_output_dir(out: &Path) -> Result<()> {
    let refuse = |message: &str| {
        Err(ModelError::io(
            out,
            std::io::Error::new(std::io::ErrorKind::AlreadyExists, message.to_string()),
        ))
    };
    if out.is_file() {
        return refuse("is a file; the output is a directory (give a new path)");
    }
    if out.exists()
        && std::fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return refuse("output directory exists and is not empty");
    }
    Ok(())
}

/// Fills a temporary sibling of `out` with `fill` and renames it to `out`, so a failed or
/// killed run leaves no half-written output; `out` must not exist or be empty.
pub fn write_dir_atomically<E: From<ModelError>>(
    out: &Path,
    fill: impl FnOnce(&Path) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    check_output_dir(out)?;
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| ModelError::io(parent, e))?;
    // Partial outputs of killed runs (their process gone) go first.
    let swept = ressa_scratch::sweep_stale(parent);
    if swept > 0 {
        tracing::info!(dir = %parent.display(), swept, "removed temporaries of earlier runs");
    }
    // Registered while it lives: removed on error, on SIGINT/SIGTERM (the CLI's handler).
    let scratch = ressa_scratch::Scratch::beside(
        &parent.join(out.file_name().unwrap_or_default()),
        "partial",
    );
    let tmp = scratch.path().to_path_buf();
    std::fs::create_dir_all(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
    fill(&tmp)?;
    if out.exists() {
        std::fs::remove_dir(out).map_err(|e| ModelError::io(out, e))?;
    }
    std::fs::rename(&tmp, out).map_err(|e| ModelError::io(out, e))?;
    scratch.persist();
    Ok(())
}

/// The checkpoint's own weight files (`model.safetensors`, `model-0000N-of-0000M.safetensors`,
/// the index); other safetensors files in the directory are copied like any other file.
fn is_weight_file(name: &str) -> bool {
    name == INDEX_FILE || (name.starts_with("model") && name.ends_with(".safetensors"))
}

/// Weights are written dense: a `sparse-bitmask` annotation copied from a compressed source's
/// `config.json` (compressed-tensors' `quantization_config.sparsity_config`) no longer holds.
/// A quantization config without it is kept; one holding only sparsity is removed.
pub fn drop_sparsity_annotation(config_path: &Path) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(config_path) else {
        return Ok(());
    };
    let mut config: serde_json::Value =
        serde_json::from_str(&text).map_err(|error| ModelError::Json {
            path: config_path.to_path_buf(),
            error,
        })?;
    let Some(obj) = config.as_object_mut() else {
        return Ok(());
    };
    let Some(serde_json::Value::Object(q)) = obj.get_mut("quantization_config") else {
        return Ok(());
    };
    if q.remove("sparsity_config").is_none() {
        return Ok(());
    }
    if !q.contains_key("config_groups") {
        obj.remove("quantization_config");
    }
    std::fs::write(
        config_path,
        serde_json::to_vec_pretty(&config).expect("json"),
    )
    .map_err(|e| ModelError::io(config_path, e))
}

pub fn copy_non_weight_files(src: &Path, dst: &Path) -> Result<()> {
    let entries = std::fs::read_dir(src).map_err(|e| ModelError::io(src, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| ModelError::io(src, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        if path.is_dir() {
            let sub = dst.join(&name);
            std::fs::create_dir_all(&sub).map_err(|e| ModelError::io(&sub, e))?;
            copy_non_weight_files(&path, &sub)?;
        } else if !is_weight_file(&name) && !name.starts_with('.') {
            std::fs::copy(&path, dst.join(&name)).map_err(|e| ModelError::io(&path, e))?;
        }
    }
    Ok(())
}

/// Every tensor of the model under its HF name, plus the source's tensors the model did not
/// read (copied byte for byte), so no key of the source is lost.
pub fn model_tensors<B: Backend, M: VisionLanguageModel<B>>(
    model: &M,
    layout: &SourceLayout,
    src: &Path,
) -> Result<Vec<(String, ExportTensor<B>)>> {
    let mut entries = export_tensors(model, model.param_keys())?;
    let have: std::collections::HashSet<String> = entries.iter().map(|(k, _)| k.clone()).collect();
    let mut rest: Vec<&String> = layout
        .dtypes
        .keys()
        .filter(|k| !have.contains(*k))
        .collect();
    if !rest.is_empty() {
        rest.sort();
        let store = Arc::new(WeightStore::open_dir(src)?);
        for key in rest {
            entries.push((
                key.clone(),
                ExportTensor::Stored {
                    store: Arc::clone(&store),
                    key: key.clone(),
                },
            ));
        }
    }
    Ok(entries)
}

fn write_weights<B: Backend, M: VisionLanguageModel<B>>(
    model: &M,
    layout: &SourceLayout,
    src: &Path,
    dir: &Path,
) -> Result<()> {
    let entries = model_tensors(model, layout, src)?;
    let dtype_of = |k: &str| *layout.dtypes.get(k).unwrap_or(&Dtype::F32);
    match &layout.shards {
        None => write_safetensors(&dir.join(SINGLE_FILE), &entries, &dtype_of),
        Some(shards) => {
            // Keys the source did not have (none for a plain round trip) go to the first shard.
            let first = shards
                .values()
                .min()
                .cloned()
                .unwrap_or_else(|| SINGLE_FILE.to_string());
            let mut groups: BTreeMap<String, Vec<(String, ExportTensor<B>)>> = BTreeMap::new();
            let mut weight_map = BTreeMap::new();
            let mut total = 0usize;
            for (k, t) in entries {
                let shard = shards.get(&k).cloned().unwrap_or_else(|| first.clone());
                let dtype = t.stored_dtype().unwrap_or_else(|| dtype_of(&k));
                total += t.shape().iter().product::<usize>() * dtype.bitsize() / 8;
                weight_map.insert(k.clone(), shard.clone());
                groups.entry(shard).or_default().push((k, t));
            }
            for (shard, group) in &groups {
                write_safetensors(&dir.join(shard), group, &dtype_of)?;
            }
            let index =
                serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
            let path = dir.join(INDEX_FILE);
            std::fs::write(&path, serde_json::to_vec_pretty(&index).expect("json"))
                .map_err(|e| ModelError::io(&path, e))
        }
    }
}

/// Every tensor the model reads, with its HF name and shape, in construction order.
pub fn parameter_shapes<B: Backend, M: VisionLanguageModel<B>>(
    cfg: &M::Config,
    device: &B::Device,
) -> Result<Vec<(String, Vec<usize>)>> {
    let shapes = RefCell::new(Vec::new());
    M::load(cfg, &Loader::dry(&shapes, device))?;
    Ok(shapes.into_inner())
}

/// Writes `model.safetensors` with the initialisation `transformers` gives a fresh model, for
/// training from scratch: biases 0, norm weights 1, every other weight N(0, σ²) with the
/// family's σ ([`FamilyConfig::init_std`]: T5 as `T5PreTrainedModel._init_weights`, a LLaVA's
/// CLIP tower as `CLIPPreTrainedModel._init_weights`, the rest the `initializer_range`).
pub fn write_initial_checkpoint<B: Backend, M: VisionLanguageModel<B>>(
    cfg: &M::Config,
    dir: &Path,
    seed: u64,
    device: &B::Device,
) -> Result<()> {
    let mut specs: Vec<(String, Vec<usize>, Dtype)> = parameter_shapes::<B, M>(cfg, device)?
        .into_iter()
        .map(|(k, s)| (k, s, Dtype::F32))
        .collect();
    specs.sort_by(|a, b| a.0.cmp(&b.0));
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    };
    let names: Vec<String> = specs.iter().map(|s| s.0.clone()).collect();
    write_safetensors_stream(&dir.join(SINGLE_FILE), &specs, |i| {
        let n: usize = specs[i].1.iter().product();
        let name = &names[i];
        let lower = name.to_lowercase();
        let is_norm = lower.contains("norm");
        if name.ends_with("bias") && !name.ends_with("relative_attention_bias.weight") {
            return vec![0.0; n];
        }
        if is_norm {
            return vec![1.0; n];
        }
        let std = cfg.init_std(name);
        // Box–Muller.
        (0..n)
            .map(|_| {
                let (u1, u2) = (uniform(), uniform());
                std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
            })
            .collect()
    })
}

/// Writes `model.safetensors` with random weights for `cfg` into `dir` (benchmarks and memory
/// tests of full-width models without a download). Values ~ U(-scale, scale) from a seeded
/// xorshift generator; norm weights are 1. Written tensor by tensor.
pub fn write_random_checkpoint<B: Backend, M: VisionLanguageModel<B>>(
    cfg: &M::Config,
    dir: &Path,
    seed: u64,
    scale: f32,
    device: &B::Device,
) -> Result<()> {
    let mut specs: Vec<(String, Vec<usize>, Dtype)> = parameter_shapes::<B, M>(cfg, device)?
        .into_iter()
        .map(|(k, s)| (k, s, Dtype::F32))
        .collect();
    specs.sort_by(|a, b| a.0.cmp(&b.0));
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    let names: Vec<String> = specs.iter().map(|s| s.0.clone()).collect();
    write_safetensors_stream(&dir.join(SINGLE_FILE), &specs, |i| {
        let n: usize = specs[i].1.iter().product();
        let is_norm = names[i].to_lowercase().contains("norm") && names[i].ends_with("weight");
        (0..n)
            .map(|_| if is_norm { 1.0 } else { next() * scale })
            .collect()
    })
}

/// Parameter counts per tower (`vision_model`, `query_tokens`, `qformer`,
/// `language_projection`, `language_model`, and an untied `language_model.lm_head` apart),
/// from the same construction code as loading but without allocating any weights.
pub fn parameter_counts<B: Backend, M: VisionLanguageModel<B>>(
    cfg: &M::Config,
    device: &B::Device,
) -> Result<BTreeMap<String, usize>> {
    let mut counts = BTreeMap::new();
    for (key, shape) in parameter_shapes::<B, M>(cfg, device)? {
        let tower = if key.starts_with("language_model.lm_head") {
            "language_model_lm_head_untied".to_string()
        } else {
            key.split('.').next().unwrap_or("").to_string()
        };
        *counts.entry(tower).or_insert(0) += shape.iter().product::<usize>();
    }
    Ok(counts)
}
