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
    let partial = PartialDir::begin(out)?;
    fill(partial.path())?;
    partial.commit()?;
    Ok(())
}

/// A temporary sibling of an output directory, renamed to the output by
/// [`PartialDir::commit`]; removed if dropped before (or by the CLI's SIGINT/SIGTERM handler).
pub struct PartialDir {
    scratch: ressa_scratch::Scratch,
    out: PathBuf,
}

impl PartialDir {
    /// Checks `out` (absent or empty), sweeps temporaries of killed runs beside it and creates
    /// the temporary directory.
    pub fn begin(out: &Path) -> Result<Self> {
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
        Ok(Self {
            scratch,
            out: out.to_path_buf(),
        })
    }

    /// The temporary directory to fill.
    pub fn path(&self) -> &Path {
        self.scratch.path()
    }

    /// Renames the temporary directory to the output.
    pub fn commit(self) -> Result<()> {
        let (tmp, out) = (self.scratch.path(), &self.out);
        if out.exists() {
            std::fs::remove_dir(out).map_err(|e| ModelError::io(out, e))?;
        }
        std::fs::rename(tmp, out).map_err(|e| ModelError::io(out, e))?;
        self.scratch.persist();
        Ok(())
    }
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

/// The weight files of an output directory: each file's tensors `(key, shape, dtype)` sorted
/// by key (the order of their bytes), and the index of a sharded layout.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightPlan {
    pub files: BTreeMap<String, Vec<(String, Vec<usize>, Dtype)>>,
    pub index: Option<Vec<u8>>,
}

impl WeightPlan {
    /// Where every tensor goes: the source's shard (keys it did not have, none for a plain
    /// round trip, to the first shard), or `model.safetensors` for a single-file source.
    pub fn new(entries: Vec<(String, Vec<usize>, Dtype)>, layout: &SourceLayout) -> Self {
        let mut files: BTreeMap<String, Vec<(String, Vec<usize>, Dtype)>> = BTreeMap::new();
        let index = match &layout.shards {
            None => {
                files.insert(SINGLE_FILE.to_string(), entries);
                None
            }
            Some(shards) => {
                let first = shards
                    .values()
                    .min()
                    .cloned()
                    .unwrap_or_else(|| SINGLE_FILE.to_string());
                let mut weight_map = BTreeMap::new();
                let mut total = 0usize;
                for (k, shape, dtype) in entries {
                    let shard = shards.get(&k).cloned().unwrap_or_else(|| first.clone());
                    total += shape.iter().product::<usize>() * dtype.bitsize() / 8;
                    weight_map.insert(k.clone(), shard.clone());
                    files.entry(shard).or_default().push((k, shape, dtype));
                }
                let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
                Some(serde_json::to_vec_pretty(&index).expect("json"))
            }
        };
        for specs in files.values_mut() {
            specs.sort_by(|a, b| a.0.cmp(&b.0));
        }
        Self { files, index }
    }
}

fn write_weights<B: Backend, M: VisionLanguageModel<B>>(
    model: &M,
    layout: &SourceLayout,
    src: &Path,
    dir: &Path,
) -> Result<()> {
    let entries = model_tensors(model, layout, src)?;
    let dtype_of = |k: &str| *layout.dtypes.get(k).unwrap_or(&Dtype::F32);
    let specs = entries
        .iter()
        .map(|(k, t)| {
            let dtype = t.stored_dtype().unwrap_or_else(|| dtype_of(k));
            (k.clone(), t.shape(), dtype)
        })
        .collect();
    let plan = WeightPlan::new(specs, layout);
    let mut by_key: HashMap<String, ExportTensor<B>> = entries.into_iter().collect();
    for (file, specs) in &plan.files {
        let group: Vec<(String, ExportTensor<B>)> = specs
            .iter()
            .filter_map(|(k, _, _)| by_key.remove(k).map(|t| (k.clone(), t)))
            .collect();
        write_safetensors(&dir.join(file), &group, &dtype_of)?;
    }
    if let Some(index) = &plan.index {
        let path = dir.join(INDEX_FILE);
        std::fs::write(&path, index).map_err(|e| ModelError::io(&path, e))?;
    }
    Ok(())
}

/// An output model directory written tensor by tensor as its values become known, in the
/// layout [`save_model_dir`] gives the same model: the source's files copied, every weight
/// file created at its final size with its header, each tensor written at its offset. The
/// linears a streamed prune changed come through [`StreamedOutput::write_linear`];
/// [`StreamedOutput::finish`] copies every other tensor from the source (those the model
/// reads converted through f32 as saving a loaded model converts them, the others byte for
/// byte) and renames the temporary directory to the output.
pub struct StreamedOutput {
    partial: PartialDir,
    files: Vec<(PathBuf, std::fs::File)>,
    /// key → (file, offset, shape, dtype).
    slots: BTreeMap<String, (usize, u64, Vec<usize>, Dtype)>,
    written: std::collections::HashSet<String>,
    store: Arc<WeightStore>,
    model_keys: std::collections::HashSet<String>,
    index: Option<Vec<u8>>,
}

impl std::fmt::Debug for StreamedOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StreamedOutput({})", self.partial.path().display())
    }
}

/// Bytes per piece when copying or writing a tensor.
const PIECE_BYTES: usize = 32 << 20;

impl StreamedOutput {
    /// Starts the output `out` of a model read from `src` (its weights in `store`, laid out
    /// as `layout`); `model_keys` are the file keys the model reads ([`ParamKeys::file_keys`]).
    pub fn create<'k>(
        src: &Path,
        out: &Path,
        layout: &SourceLayout,
        store: Arc<WeightStore>,
        model_keys: impl IntoIterator<Item = &'k str>,
    ) -> Result<Self> {
        let model_keys: std::collections::HashSet<String> =
            model_keys.into_iter().map(str::to_string).collect();
        let partial = PartialDir::begin(out)?;
        let tmp = partial.path().to_path_buf();
        copy_non_weight_files(src, &tmp)?;
        drop_sparsity_annotation(&tmp.join("config.json"))?;
        let mut keys: Vec<&String> = layout.dtypes.keys().chain(model_keys.iter()).collect();
        keys.sort();
        keys.dedup();
        let mut specs = Vec::with_capacity(keys.len());
        for k in keys {
            let (shape, stored) = store.info(k).ok_or_else(|| ModelError::MissingKey {
                path: src.to_path_buf(),
                key: k.clone(),
            })?;
            let dtype = layout.dtypes.get(k).copied().unwrap_or(stored);
            specs.push((k.clone(), shape, dtype));
        }
        let plan = WeightPlan::new(specs, layout);
        let mut files = Vec::new();
        let mut slots = BTreeMap::new();
        for (name, specs) in &plan.files {
            let path = tmp.join(name);
            let (start, offsets) = crate::weights::safetensors_header(specs);
            let size = specs
                .last()
                .zip(offsets.last())
                .map(|((_, shape, dtype), o)| {
                    o + (shape.iter().product::<usize>() * dtype.bitsize() / 8) as u64
                })
                .unwrap_or(start.len() as u64);
            let mut file = std::fs::File::create(&path).map_err(|e| ModelError::io(&path, e))?;
            use std::io::Write;
            file.write_all(&start)
                .and_then(|()| file.set_len(size))
                .map_err(|e| ModelError::io(&path, e))?;
            for ((k, shape, dtype), o) in specs.iter().zip(offsets) {
                slots.insert(k.clone(), (files.len(), o, shape.clone(), *dtype));
            }
            files.push((path, file));
        }
        Ok(Self {
            partial,
            files,
            slots,
            written: Default::default(),
            store,
            model_keys,
            index: plan.index,
        })
    }

    fn slot(&mut self, key: &str) -> Result<(usize, u64, Vec<usize>, Dtype)> {
        let slot = self.slots.get(key).cloned().ok_or_else(|| {
            ModelError::Input(format!("{key}: not a tensor of the source checkpoint"))
        })?;
        if !self.written.insert(key.to_string()) {
            return Err(ModelError::Input(format!("{key}: written twice")));
        }
        Ok(slot)
    }

    fn write_at(&mut self, file: usize, offset: u64, bytes: &[u8]) -> Result<()> {
        use std::io::{Seek, SeekFrom, Write};
        let (path, f) = &mut self.files[file];
        f.seek(SeekFrom::Start(offset))
            .and_then(|_| f.write_all(bytes))
            .map_err(|e| ModelError::io(&*path, e))
    }

    /// The linear weight `key` (`….weight`) from its values in burn's layout `[d_in, d_out]`,
    /// written in PyTorch's `[d_out, d_in]` and the tensor's dtype.
    pub fn write_linear(
        &mut self,
        key: &str,
        values: &[f32],
        d_in: usize,
        d_out: usize,
    ) -> Result<()> {
        let (file, offset, shape, dtype) = self.slot(key)?;
        if shape != [d_out, d_in] || values.len() != d_in * d_out {
            return Err(ModelError::Shape {
                path: self.files[file].0.clone(),
                key: key.to_string(),
                found: vec![d_in, d_out],
                expected: shape,
            });
        }
        let elem = (dtype.bitsize() / 8) as u64;
        let rows = (PIECE_BYTES / 4 / d_in.max(1)).max(1);
        let (mut piece, mut bytes) = (Vec::new(), Vec::new());
        for j0 in (0..d_out).step_by(rows) {
            let j1 = (j0 + rows).min(d_out);
            piece.clear();
            for j in j0..j1 {
                piece.extend((0..d_in).map(|i| values[i * d_out + j]));
            }
            crate::weights::encode(&piece, dtype, &mut bytes);
            self.write_at(file, offset + (j0 * d_in) as u64 * elem, &bytes)?;
        }
        Ok(())
    }

    /// Copies every tensor not written yet from the source, writes the index, lets `extra`
    /// add files (masks, reports) and renames the directory to the output.
    pub fn finish(mut self, extra: &mut dyn FnMut(&Path) -> Result<()>) -> Result<()> {
        let rest: Vec<String> = self
            .slots
            .keys()
            .filter(|k| !self.written.contains(*k))
            .cloned()
            .collect();
        let store = Arc::clone(&self.store);
        let mut bytes = Vec::new();
        for key in rest {
            let (file, mut offset, _, dtype) = self.slot(&key)?;
            let convert = self.model_keys.contains(&key);
            let path = self.files[file].0.clone();
            store.for_each_stored_piece(&key, PIECE_BYTES, &mut |piece, stored| {
                let out: &[u8] = if convert || stored != dtype {
                    // What saving a loaded model writes: the values read as f32, encoded in
                    // the tensor's dtype.
                    let values = crate::weights::bytes_to_f32(piece, stored).ok_or_else(|| {
                        ModelError::Dtype {
                            path: path.clone(),
                            key: key.clone(),
                            dtype: format!("{stored:?}"),
                        }
                    })?;
                    crate::weights::encode(&values, dtype, &mut bytes);
                    &bytes
                } else {
                    piece
                };
                self.write_at(file, offset, out)?;
                offset += out.len() as u64;
                Ok(())
            })?;
        }
        for (path, f) in &mut self.files {
            use std::io::Write;
            f.flush().map_err(|e| ModelError::io(&*path, e))?;
        }
        let dir = self.partial.path().to_path_buf();
        if let Some(index) = &self.index {
            let path = dir.join(INDEX_FILE);
            std::fs::write(&path, index).map_err(|e| ModelError::io(&path, e))?;
        }
        extra(&dir)?;
        self.files.clear();
        self.partial.commit()
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
    write_initial_checkpoint_as::<B, M>(cfg, dir, seed, Dtype::F32, device)
}

/// [`write_initial_checkpoint`] with every tensor stored as `dtype` (F32, F16, BF16).
pub fn write_initial_checkpoint_as<B: Backend, M: VisionLanguageModel<B>>(
    cfg: &M::Config,
    dir: &Path,
    seed: u64,
    dtype: Dtype,
    device: &B::Device,
) -> Result<()> {
    write_initial_checkpoint_with::<B, M>(cfg, dir, seed, dtype, &BTreeMap::new(), device)
}

/// [`write_initial_checkpoint_as`] with the σ of some tensors set by name (HF key): a
/// training recipe's choice, e.g. position embeddings at the scale of the patch embeddings'
/// output. A name the model does not have is refused.
pub fn write_initial_checkpoint_with<B: Backend, M: VisionLanguageModel<B>>(
    cfg: &M::Config,
    dir: &Path,
    seed: u64,
    dtype: Dtype,
    init_std: &BTreeMap<String, f32>,
    device: &B::Device,
) -> Result<()> {
    let mut specs: Vec<(String, Vec<usize>, Dtype)> = parameter_shapes::<B, M>(cfg, device)?
        .into_iter()
        .map(|(k, s)| (k, s, dtype))
        .collect();
    specs.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, std) in init_std {
        if !specs.iter().any(|s| s.0 == *name) {
            return Err(ModelError::Input(format!(
                "init_std: the model has no tensor `{name}`"
            )));
        }
        if !(std.is_finite() && *std >= 0.0) {
            return Err(ModelError::Input(format!(
                "init_std `{name}` = {std}: expected a non-negative number"
            )));
        }
    }
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
        let std = match init_std.get(name) {
            Some(&std) => std,
            None if name.ends_with("bias") && !name.ends_with("relative_attention_bias.weight") => {
                return vec![0.0; n];
            }
            None if is_norm => return vec![1.0; n],
            None => cfg.init_std(name),
        };
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
    write_random_checkpoint_as::<B, M>(cfg, dir, seed, scale, Dtype::F32, device)
}

/// [`write_random_checkpoint`] with every tensor stored as `dtype` (F32, F16, BF16).
pub fn write_random_checkpoint_as<B: Backend, M: VisionLanguageModel<B>>(
    cfg: &M::Config,
    dir: &Path,
    seed: u64,
    scale: f32,
    dtype: Dtype,
    device: &B::Device,
) -> Result<()> {
    let mut specs: Vec<(String, Vec<usize>, Dtype)> = parameter_shapes::<B, M>(cfg, device)?
        .into_iter()
        .map(|(k, s)| (k, s, dtype))
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
