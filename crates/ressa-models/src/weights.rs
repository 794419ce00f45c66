//! Reading and writing HF safetensors checkpoints.
//!
//! Files are memory-mapped: a tensor is converted to f32 straight from the mapped bytes into the
//! buffer that becomes the burn tensor, so loading never holds two owned copies of the weights.
//! Construction is loading (as in candle's `VarBuilder`): modules ask a [`Loader`] for tensors by
//! their HF names and shapes, so the HF key layout is visible in the model code.
//!
//! A checkpoint written in compressed-tensors' `sparse-bitmask` format (`ressa export --format
//! bitmask`) reads like a dense one: each `<m>.{shape,compressed,bitmask,row_offsets}` group is
//! listed as the logical key `<m>.weight` and decompressed on [`WeightStore::get`].

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use crate::nn::LayerNorm;
use burn::module::{ModuleVisitor, Param, ParamId};

use crate::linear::Linear;
use burn::prelude::*;
use memmap2::Mmap;
use ressa_sparse::formats::{BitmaskWeight, SparseFormat};
use safetensors::Dtype;
use safetensors::tensor::Metadata;

use crate::error::{ModelError, Result};

/// The single-file and the sharded checkpoint names `transformers` writes.
pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    metadata: Metadata,
}

impl MappedFile {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: the map is read-only; the file is not modified while the model is loading.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        let (header_len, metadata) =
            safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| {
                ModelError::Safetensors {
                    path: path.to_path_buf(),
                    message: describe_safetensors_error(&e),
                }
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            data_start: 8 + header_len,
            metadata,
        })
    }
}

fn describe_safetensors_error(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::MetadataIncompleteBuffer => {
            "file is truncated (header announces more data than present)".into()
        }
        E::HeaderTooSmall => "file is shorter than the 8-byte header length".into(),
        other => format!("{other:?}"),
    }
}

/// A tensor copied to host memory as f32, with the dtype it had on disk.
#[derive(Debug, Clone)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
    pub dtype: Dtype,
}

/// The parts of one compressed-tensors `sparse-bitmask` weight.
const BITMASK_PARTS: [&str; 4] = ["shape", "compressed", "bitmask", "row_offsets"];

/// All safetensors files of one checkpoint, memory-mapped, with a key → file index.
pub struct WeightStore {
    root: PathBuf,
    files: Vec<MappedFile>,
    /// Stored tensors, minus the parts of bitmask-compressed weights.
    index: HashMap<String, usize>,
    /// Logical `<m>.weight` key → `<m>` of each bitmask-compressed weight.
    compressed: BTreeMap<String, String>,
    /// The parts hidden from `index`, by their stored key.
    parts: HashMap<String, usize>,
    /// Shard file name per key when the checkpoint came with an index (kept for saving).
    shard_of: Option<BTreeMap<String, String>>,
}

impl std::fmt::Debug for WeightStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WeightStore({})", self.root.display())
    }
}

impl WeightStore {
    /// Opens `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join(SINGLE_FILE);
        let index_path = dir.join(INDEX_FILE);
        if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
            #[derive(serde::Deserialize)]
            struct Index {
                weight_map: BTreeMap<String, String>,
            }
            let index: Index = crate::error::parse_json(&text, &index_path)?;
            let mut names: Vec<&String> = index.weight_map.values().collect();
            names.sort();
            names.dedup();
            let mut files = Vec::new();
            let mut file_of_name = HashMap::new();
            for name in names {
                // A shard is a file of the model directory itself: no `..`, no absolute path,
                // no subdirectory (transformers writes `model-0000i-of-0000n.safetensors`).
                let plain = Path::new(name)
                    .file_name()
                    .is_some_and(|f| f == std::ffi::OsStr::new(name.as_str()));
                if !plain || name == ".." || name == "." {
                    return Err(ModelError::config(
                        &index_path,
                        "weight_map",
                        format!("shard `{name}` is not a file name inside the model directory"),
                    ));
                }
                file_of_name.insert(name.clone(), files.len());
                files.push(MappedFile::open(&dir.join(name))?);
            }
            let mut store = Self::from_files(dir, files)?;
            for (key, shard) in &index.weight_map {
                let f = file_of_name[shard];
                if store.index.get(key) != Some(&f) {
                    return Err(ModelError::MissingKey {
                        path: dir.join(shard),
                        key: key.clone(),
                    });
                }
            }
            store.shard_of = Some(index.weight_map);
            Ok(store)
        } else if single.exists() {
            Self::from_files(dir, vec![MappedFile::open(&single)?])
        } else {
            Err(ModelError::io(
                &single,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no {SINGLE_FILE} or {INDEX_FILE} in this directory"),
                ),
            ))
        }
    }

    /// Opens one safetensors file.
    pub fn open_file(path: &Path) -> Result<Self> {
        let root = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        Self::from_files(&root, vec![MappedFile::open(path)?])
    }

    fn from_files(root: &Path, files: Vec<MappedFile>) -> Result<Self> {
        let mut index = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            for name in f.metadata.tensors().keys() {
                index.insert(name.clone(), i);
            }
        }
        // A module with a `.bitmask` tensor is a compressed weight: all four parts must exist.
        let modules: BTreeSet<String> = index
            .keys()
            .filter_map(|k| k.strip_suffix(".bitmask"))
            .map(str::to_string)
            .collect();
        let mut compressed = BTreeMap::new();
        let mut parts = HashMap::new();
        for m in modules {
            for part in BITMASK_PARTS {
                let key = format!("{m}.{part}");
                let f = index.remove(&key).ok_or_else(|| ModelError::MissingKey {
                    path: root.to_path_buf(),
                    key: key.clone(),
                })?;
                parts.insert(key, f);
            }
            let weight = format!("{m}.weight");
            if index.contains_key(&weight) {
                return Err(ModelError::Input(format!(
                    "{}: {weight} is stored both dense and as sparse-bitmask parts",
                    root.display()
                )));
            }
            compressed.insert(weight, m);
        }
        Ok(Self {
            root: root.to_path_buf(),
            files,
            index,
            compressed,
            parts,
            shard_of: None,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn contains(&self, key: &str) -> bool {
        self.index.contains_key(key) || self.compressed.contains_key(key)
    }

    /// Every logical key: stored tensors and the `<m>.weight` of compressed weights.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.index.keys().chain(self.compressed.keys())
    }

    /// Whether `key` is stored compressed (`sparse-bitmask`).
    pub fn is_compressed(&self, key: &str) -> bool {
        self.compressed.contains_key(key)
    }

    /// The shard assignment of the source checkpoint, if it was sharded.
    pub fn shard_map(&self) -> Option<&BTreeMap<String, String>> {
        self.shard_of.as_ref()
    }

    /// Shape and dtype on disk (a compressed weight: its dense shape, its values' dtype).
    pub fn info(&self, key: &str) -> Option<(Vec<usize>, Dtype)> {
        if let Some(m) = self.compressed.get(key) {
            let shape = self.part_ints(&format!("{m}.shape")).ok()?;
            let (_, dtype, _) = self.part(&format!("{m}.compressed")).ok()?;
            return Some((shape, dtype));
        }
        let f = &self.files[*self.index.get(key)?];
        let info = f.metadata.info(key)?;
        Some((info.shape.clone(), info.dtype))
    }

    /// A stored tensor's shape, dtype and bytes, looked up in `index` or `parts`.
    fn stored(&self, key: &str, file: usize) -> Result<(Vec<usize>, Dtype, &[u8])> {
        let f = &self.files[file];
        let info = f.metadata.info(key).ok_or_else(|| self.missing(key))?;
        let (start, end) = (
            f.data_start + info.data_offsets.0,
            f.data_start + info.data_offsets.1,
        );
        Ok((info.shape.clone(), info.dtype, &f.mmap[start..end]))
    }

    fn part(&self, key: &str) -> Result<(Vec<usize>, Dtype, &[u8])> {
        let &f = self.parts.get(key).ok_or_else(|| self.missing(key))?;
        self.stored(key, f)
    }

    /// An integer part (`shape`, `row_offsets`: I64 or I32) as `usize`s.
    fn part_ints(&self, key: &str) -> Result<Vec<usize>> {
        let (_, dtype, bytes) = self.part(key)?;
        let bad = |what: &str| {
            ModelError::Input(format!(
                "{}: {key}: {what}",
                self.files[self.parts[key]].path.display()
            ))
        };
        let ints: Vec<i64> = match dtype {
            Dtype::I64 => bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
            Dtype::I32 => bytes
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64)
                .collect(),
            other => return Err(bad(&format!("expected I64 or I32, found {other:?}"))),
        };
        ints.into_iter()
            .map(|v| usize::try_from(v).map_err(|_| bad(&format!("negative entry {v}"))))
            .collect()
    }

    /// Decompresses a `sparse-bitmask` weight into PyTorch order `[d_out, d_in]`.
    fn decompress(&self, key: &str, module: &str) -> Result<HostTensor> {
        let shape = self.part_ints(&format!("{module}.shape"))?;
        let path = || {
            self.files[self.parts[&format!("{module}.shape")]]
                .path
                .clone()
        };
        let [d_out, d_in] = shape[..] else {
            return Err(ModelError::Input(format!(
                "{}: {module}.shape: expected [d_out, d_in], found {shape:?}",
                path().display()
            )));
        };
        let (_, dtype, values) = self.part(&format!("{module}.compressed"))?;
        let values = bytes_to_f32(values, dtype).ok_or_else(|| ModelError::Dtype {
            path: path(),
            key: format!("{module}.compressed"),
            dtype: format!("{dtype:?}"),
        })?;
        let (_, _, bitmask) = self.part(&format!("{module}.bitmask"))?;
        let offsets: Vec<i64> = self
            .part_ints(&format!("{module}.row_offsets"))?
            .into_iter()
            .map(|v| v as i64)
            .collect();
        let weight = BitmaskWeight::from_parts(d_in, d_out, values, bitmask.to_vec(), &offsets)
            .map_err(|e| ModelError::Input(format!("{}: {key}: {e}", path().display())))?;
        // burn order [d_in, d_out] → PyTorch order [d_out, d_in].
        let burn_order = weight.to_dense();
        let mut data = vec![0f32; d_in * d_out];
        for i in 0..d_in {
            for j in 0..d_out {
                data[j * d_in + i] = burn_order[i * d_out + j];
            }
        }
        Ok(HostTensor {
            shape: vec![d_out, d_in],
            data,
            dtype,
        })
    }

    /// A tensor's bytes in its on-disk dtype: borrowed from the map, or (a compressed weight)
    /// decompressed and encoded in its values' dtype.
    pub fn raw(&self, key: &str) -> Result<(Vec<usize>, Dtype, Cow<'_, [u8]>)> {
        if let Some(m) = self.compressed.get(key) {
            let t = self.decompress(key, m)?;
            let bytes = encode_f32(&t.data, t.dtype).ok_or_else(|| ModelError::Dtype {
                path: self.root.clone(),
                key: key.to_string(),
                dtype: format!("{:?}", t.dtype),
            })?;
            return Ok((t.shape, t.dtype, Cow::Owned(bytes)));
        }
        let &f = self.index.get(key).ok_or_else(|| self.missing(key))?;
        let (shape, dtype, bytes) = self.stored(key, f)?;
        Ok((shape, dtype, Cow::Borrowed(bytes)))
    }

    fn missing(&self, key: &str) -> ModelError {
        let path = if self.files.len() == 1 {
            self.files[0].path.clone()
        } else {
            self.root.join(INDEX_FILE)
        };
        ModelError::MissingKey {
            path,
            key: key.to_string(),
        }
    }

    /// Checks, without reading its values, what [`WeightStore::get`] checks: `key` is stored,
    /// with shape `expected` and a float dtype.
    pub fn check(&self, key: &str, expected: &[usize]) -> Result<()> {
        let (path, shape, dtype) = if let Some(m) = self.compressed.get(key) {
            let shape = self.part_ints(&format!("{m}.shape"))?;
            let (_, dtype, _) = self.part(&format!("{m}.compressed"))?;
            (self.root.clone(), shape, dtype)
        } else {
            let &i = self.index.get(key).ok_or_else(|| self.missing(key))?;
            let f = &self.files[i];
            let info = f.metadata.info(key).ok_or_else(|| self.missing(key))?;
            (f.path.clone(), info.shape.clone(), info.dtype)
        };
        if shape != expected {
            return Err(ModelError::Shape {
                path,
                key: key.to_string(),
                found: shape,
                expected: expected.to_vec(),
            });
        }
        if !matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64) {
            return Err(ModelError::Dtype {
                path,
                key: key.to_string(),
                dtype: format!("{dtype:?}"),
            });
        }
        Ok(())
    }

    /// Calls `f` with consecutive pieces (at most ~`max_bytes`, whole elements) of a tensor's
    /// bytes in its on-disk dtype; each piece's pages are dropped from the mapping once `f`
    /// returns, so copying a checkpoint never holds it in the resident set.
    pub fn for_each_stored_piece(
        &self,
        key: &str,
        max_bytes: usize,
        f: &mut dyn FnMut(&[u8], Dtype) -> Result<()>,
    ) -> Result<()> {
        if self.compressed.contains_key(key) {
            let (_, dtype, bytes) = self.raw(key)?;
            return f(&bytes, dtype);
        }
        let &i = self.index.get(key).ok_or_else(|| self.missing(key))?;
        let file = &self.files[i];
        let info = file.metadata.info(key).ok_or_else(|| self.missing(key))?;
        let (start, end) = (
            file.data_start + info.data_offsets.0,
            file.data_start + info.data_offsets.1,
        );
        let elem = (info.dtype.bitsize() / 8).max(1);
        let step = (max_bytes / elem).max(1) * elem;
        let mut at = start;
        while at < end {
            let to = (at + step).min(end);
            f(&file.mmap[at..to], info.dtype)?;
            #[cfg(unix)]
            // SAFETY: as in `get`: a read-only file-backed map; dropped pages are re-read from
            // the file if touched again.
            unsafe {
                let _ = file.mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    at,
                    to - at,
                );
            }
            at = to;
        }
        Ok(())
    }

    /// Reads a float tensor as f32, checking its shape.
    pub fn get(&self, key: &str, expected: &[usize]) -> Result<HostTensor> {
        if let Some(m) = self.compressed.get(key) {
            let t = self.decompress(key, m)?;
            if t.shape != expected {
                return Err(ModelError::Shape {
                    path: self.root.clone(),
                    key: key.to_string(),
                    found: t.shape,
                    expected: expected.to_vec(),
                });
            }
            return Ok(t);
        }
        let &i = self.index.get(key).ok_or_else(|| self.missing(key))?;
        let f = &self.files[i];
        let info = f.metadata.info(key).ok_or_else(|| self.missing(key))?;
        if info.shape != expected {
            return Err(ModelError::Shape {
                path: f.path.clone(),
                key: key.to_string(),
                found: info.shape.clone(),
                expected: expected.to_vec(),
            });
        }
        let (start, end) = (
            f.data_start + info.data_offsets.0,
            f.data_start + info.data_offsets.1,
        );
        let data =
            bytes_to_f32(&f.mmap[start..end], info.dtype).ok_or_else(|| ModelError::Dtype {
                path: f.path.clone(),
                key: key.to_string(),
                dtype: format!("{:?}", info.dtype),
            })?;
        // The bytes are converted: drop their pages from this mapping so the resident set holds
        // the loaded weights once, not the weights plus the mapped file.
        #[cfg(unix)]
        // SAFETY: the map is read-only and file-backed; dropped pages are re-read from the file
        // if touched again, so no data is lost.
        unsafe {
            let _ = f.mmap.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                start,
                end - start,
            );
        }
        Ok(HostTensor {
            shape: info.shape.clone(),
            data,
            dtype: info.dtype,
        })
    }
}

/// f32 values as little-endian bytes of a float dtype (round to nearest even); `None` for a
/// non-float dtype.
pub fn encode_f32(values: &[f32], dtype: Dtype) -> Option<Vec<u8>> {
    if !matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64) {
        return None;
    }
    let mut out = Vec::new();
    encode(values, dtype, &mut out);
    Some(out)
}

pub(crate) fn bytes_to_f32(bytes: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        _ => return None,
    })
}

/// (HF name, shape) pairs a dry [`Loader`] records.
pub type ShapeLog = RefCell<Vec<(String, Vec<usize>)>>;

/// How a parameter is laid out in the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// As is, under its key.
    Plain,
    /// An `nn.Linear` weight: burn holds `[d_in, d_out]`, the file `[d_out, d_in]`.
    Transposed,
    /// The ViT's fused qkv bias, stored as `q_bias` and `v_bias` (the k part is zero).
    QkvBias { q: String, v: String },
}

/// The HF key of every parameter a model read, by parameter id: recorded once by the
/// [`Loader`] at construction, so saving walks the module tree instead of naming every tensor
/// a second time. Adapters and other parameters added later have no key and are not saved.
#[derive(Debug, Clone, Default)]
pub struct ParamKeys {
    map: BTreeMap<ParamId, (String, Stored)>,
}

impl ParamKeys {
    pub fn insert(&mut self, id: ParamId, key: String, stored: Stored) {
        self.map.insert(id, (key, stored));
    }

    pub fn get(&self, id: &ParamId) -> Option<&(String, Stored)> {
        self.map.get(id)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Every key, in the file's naming (`q_bias` and `v_bias` for a split qkv bias).
    pub fn file_keys(&self) -> impl Iterator<Item = &str> {
        self.map.values().flat_map(|(k, s)| match s {
            Stored::QkvBias { q, v } => vec![q.as_str(), v.as_str()],
            _ => vec![k.as_str()],
        })
    }
}

/// Hands out tensors by HF name under a key prefix. Without a store it runs "dry": it only
/// records the requested shapes (for parameter counts of full-size configs) and returns
/// 1-element placeholders, so nothing the size of the model is allocated. Every parameter it
/// makes is recorded with its key ([`Loader::keys`]).
pub struct Loader<'a, B: Backend> {
    store: Option<&'a WeightStore>,
    device: B::Device,
    prefix: String,
    shapes: Option<&'a ShapeLog>,
    keys: Rc<RefCell<ParamKeys>>,
    lazy: Option<Rc<Lazy>>,
}

/// What a lazy [`Loader`] leaves on disk: every tensor (the model's structure only), or the
/// weights of the named linears (their module keys), each checked against the file.
struct Lazy {
    all: bool,
    linears: HashSet<String>,
    /// The linear weights left on disk: module key → `[d_in, d_out]`.
    deferred: RefCell<BTreeMap<String, [usize; 2]>>,
}

/// The `[0, 0]` weight a linear holds while its values are on disk (see
/// [`Loader::deferring`]).
pub fn deferred_weight<B: Backend>(device: &B::Device) -> Tensor<B, 2> {
    Tensor::zeros([0, 0], device)
}

impl<'a, B: Backend> Loader<'a, B> {
    pub fn new(store: &'a WeightStore, device: &B::Device) -> Self {
        Self {
            store: Some(store),
            device: device.clone(),
            prefix: String::new(),
            shapes: None,
            keys: Rc::default(),
            lazy: None,
        }
    }

    /// A loader that reads no tensor data: every tensor is checked against the checkpoint
    /// (present, of the expected shape, a float dtype) and made a placeholder, so the model's
    /// structure (its stacks, blocks and keys) is known without loading it.
    pub fn structure(store: &'a WeightStore, device: &B::Device) -> Self {
        Self {
            lazy: Some(Rc::new(Lazy {
                all: true,
                linears: HashSet::new(),
                deferred: RefCell::default(),
            })),
            ..Self::new(store, device)
        }
    }

    /// A loader that reads everything except the weights of the linears named in `linears`
    /// (module keys, as [`Linear::key`]): those are checked against the checkpoint and left
    /// on disk, the layer holding [`deferred_weight`] until [`Loader::linear_weight`] reads it.
    pub fn deferring(store: &'a WeightStore, device: &B::Device, linears: HashSet<String>) -> Self {
        Self {
            lazy: Some(Rc::new(Lazy {
                all: false,
                linears,
                deferred: RefCell::default(),
            })),
            ..Self::new(store, device)
        }
    }

    /// The linear weights left on disk so far: module key → `[d_in, d_out]`.
    pub fn deferred(&self) -> BTreeMap<String, [usize; 2]> {
        self.lazy
            .as_ref()
            .map(|l| l.deferred.borrow().clone())
            .unwrap_or_default()
    }

    /// A loader that records shapes instead of reading data.
    pub fn dry(shapes: &'a ShapeLog, device: &B::Device) -> Self {
        Self {
            store: None,
            device: device.clone(),
            prefix: String::new(),
            shapes: Some(shapes),
            keys: Rc::default(),
            lazy: None,
        }
    }

    /// The loader for a sub-module: `pp("encoder").pp("layers.0")` reads `encoder.layers.0.*`.
    pub fn pp(&self, name: impl AsRef<str>) -> Self {
        let name = name.as_ref();
        Self {
            store: self.store,
            device: self.device.clone(),
            prefix: self.key(name),
            shapes: self.shapes,
            keys: Rc::clone(&self.keys),
            lazy: self.lazy.clone(),
        }
    }

    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// The checkpoint being read (`None` for a dry loader).
    pub fn store(&self) -> Option<&'a WeightStore> {
        self.store
    }

    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    /// The keys of every parameter made so far (by this loader and its `pp` children).
    pub fn keys(&self) -> ParamKeys {
        self.keys.borrow().clone()
    }

    /// Records that parameter `id` is stored under `name` (relative to this loader) as `stored`.
    pub fn record(&self, id: ParamId, name: &str, stored: Stored) {
        self.keys.borrow_mut().insert(id, self.key(name), stored);
    }

    /// Whether the checkpoint has `name` (a dry loader answers `default`).
    pub fn contains_or(&self, name: &str, default: bool) -> bool {
        match self.store {
            Some(s) => s.contains(&self.key(name)),
            None => default,
        }
    }

    /// A tensor by name; not recorded as a parameter (see [`Loader::param`]).
    pub fn tensor<const D: usize>(&self, name: &str, shape: [usize; D]) -> Result<Tensor<B, D>> {
        let key = self.key(name);
        match self.store {
            Some(store) if self.lazy.as_ref().is_some_and(|l| l.all) => {
                store.check(&key, &shape)?;
                Ok(Tensor::zeros([1; D], &self.device))
            }
            Some(store) => {
                let host = store.get(&key, &shape)?;
                Ok(Tensor::from_data(
                    TensorData::new(host.data, shape),
                    &self.device,
                ))
            }
            None => {
                if let Some(shapes) = self.shapes {
                    shapes.borrow_mut().push((key, shape.to_vec()));
                }
                Ok(Tensor::zeros([1; D], &self.device))
            }
        }
    }

    /// A parameter stored as is under `name`.
    pub fn param<const D: usize>(
        &self,
        name: &str,
        shape: [usize; D],
    ) -> Result<Param<Tensor<B, D>>> {
        let p = Param::from_tensor(self.tensor(name, shape)?);
        self.record(p.id, name, Stored::Plain);
        Ok(p)
    }

    /// An `nn.Linear` stored as `{name}.weight` [d_out, d_in] (+ `{name}.bias`), transposed to
    /// burn's [d_in, d_out]; the layer keeps its HF name.
    pub fn linear(&self, name: &str, d_in: usize, d_out: usize, bias: bool) -> Result<Linear<B>> {
        let wname = format!("{name}.weight");
        let module = self.key(name);
        let weight = match (&self.lazy, self.store) {
            (Some(lazy), Some(store)) if lazy.all || lazy.linears.contains(&module) => {
                store.check(&self.key(&wname), &[d_out, d_in])?;
                lazy.deferred.borrow_mut().insert(module, [d_in, d_out]);
                deferred_weight(&self.device)
            }
            _ => self.linear_weight(name, d_in, d_out)?,
        };
        let weight = Param::from_tensor(weight);
        self.record(weight.id, &wname, Stored::Transposed);
        let bias = if bias {
            Some(self.param(&format!("{name}.bias"), [d_out])?)
        } else {
            None
        };
        Ok(Linear {
            weight,
            bias,
            adapter: None,
            packed: None,
            key: self.key(name).into(),
        })
    }

    /// The weight of the `nn.Linear` `name` (`{name}.weight`, [d_out, d_in]) in burn's layout
    /// [d_in, d_out], without recording a parameter (what [`Loader::linear`] holds; a lazy
    /// loader's deferred weights are read with it later).
    pub fn linear_weight(&self, name: &str, d_in: usize, d_out: usize) -> Result<Tensor<B, 2>> {
        let wname = format!("{name}.weight");
        // burn layout [d_in, d_out], laid out contiguously once here: with the transposed view
        // of the PyTorch tensor, Flex's `linear` re-laid the weight out on every call (a
        // 2048×5120 layer at 64 tokens: 65 ms instead of 22 ms).
        let weight = self.tensor(&wname, [d_out, d_in])?.transpose();
        // (a dry loader's placeholders have other shapes and stay as they are)
        Ok(if weight.dims() == [d_in, d_out] {
            weight.reshape([d_in * d_out]).reshape([d_in, d_out])
        } else {
            weight
        })
    }

    /// An `nn.LayerNorm` stored as `{name}.weight` / `{name}.bias`.
    pub fn layer_norm(&self, name: &str, d: usize, eps: f64) -> Result<LayerNorm<B>> {
        Ok(LayerNorm {
            gamma: self.param(&format!("{name}.weight"), [d])?,
            beta: Some(self.param(&format!("{name}.bias"), [d])?),
            epsilon: eps,
        })
    }
}

/// One tensor to write under its HF name, in PyTorch layout.
#[derive(Debug, Clone)]
pub enum ExportTensor<B: Backend> {
    /// Values of a model tensor, as `[dim 0, rest]` rows (row-major order of `shape`).
    Values {
        shape: Vec<usize>,
        rows: Tensor<B, 2>,
    },
    /// A tensor the model did not read, copied byte for byte from the source checkpoint.
    Stored {
        store: Arc<WeightStore>,
        key: String,
    },
}

impl<B: Backend> ExportTensor<B> {
    /// A model tensor of any rank.
    pub fn of<const D: usize>(t: Tensor<B, D>) -> Self {
        let shape = t.dims().to_vec();
        let n: usize = shape.iter().product();
        let rows_n = shape.first().copied().unwrap_or(1).max(1);
        Self::Values {
            rows: t.reshape([rows_n, n / rows_n]),
            shape,
        }
    }

    pub fn shape(&self) -> Vec<usize> {
        match self {
            ExportTensor::Values { shape, .. } => shape.clone(),
            ExportTensor::Stored { store, key } => {
                store.info(key).map(|(s, _)| s).unwrap_or_default()
            }
        }
    }

    /// The on-disk dtype of a copied tensor (`None`: the caller decides).
    pub fn stored_dtype(&self) -> Option<Dtype> {
        match self {
            ExportTensor::Values { .. } => None,
            ExportTensor::Stored { store, key } => store.info(key).map(|(_, d)| d),
        }
    }

    /// Calls `f` with consecutive row-major pieces of the values (rows of dim 0, at most
    /// ~`max_values` values a piece), so writing a large table never copies it whole.
    fn for_each_chunk(
        &self,
        max_values: usize,
        f: &mut dyn FnMut(&[f32]) -> Result<()>,
    ) -> Result<()> {
        let ExportTensor::Values { rows: t, .. } = self else {
            return Err(ModelError::Input(
                "a stored tensor has no f32 values".into(),
            ));
        };
        let [rows, cols] = t.dims();
        let step = (max_values / cols.max(1)).max(1);
        let mut r = 0;
        while r < rows {
            let end = (r + step).min(rows);
            let piece = t
                .clone()
                .slice([r..end, 0..cols])
                .into_data()
                .convert::<f32>();
            f(piece.as_slice::<f32>().expect("f32 data"))?;
            r = end;
        }
        Ok(())
    }

    /// The values as f32 (a copied tensor is decoded from its stored dtype).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            ExportTensor::Values { rows, .. } => rows
                .to_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .expect("float tensor"),
            ExportTensor::Stored { store, key } => store
                .raw(key)
                .ok()
                .and_then(|(_, d, b)| bytes_to_f32(&b, d))
                .unwrap_or_default(),
        }
    }
}

/// Every parameter of `module` that has a key in `keys`, in PyTorch layout under its HF name
/// (burn's module tree walked, nothing named twice). Fails if a keyed parameter is no longer
/// in the module (it was replaced under a new id: its tensor would be lost) or is a released
/// sparse-inference placeholder.
pub fn export_tensors<B: Backend, M: Module<B>>(
    module: &M,
    keys: &ParamKeys,
) -> Result<Vec<(String, ExportTensor<B>)>> {
    struct Collect<'k, B: Backend> {
        keys: &'k ParamKeys,
        out: Vec<(String, ExportTensor<B>)>,
        seen: BTreeSet<ParamId>,
        error: Option<ModelError>,
    }
    impl<B: Backend> ModuleVisitor<B> for Collect<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let Some((key, stored)) = self.keys.get(&param.id) else {
                return;
            };
            if !self.seen.insert(param.id) {
                return;
            }
            let t = param.val();
            if t.dims().iter().product::<usize>() == 0 {
                self.error.get_or_insert(ModelError::Input(format!(
                    "{key}: the dense weight was released for sparse inference and cannot be saved"
                )));
                return;
            }
            match stored {
                Stored::Plain => self.out.push((key.clone(), ExportTensor::of(t))),
                Stored::Transposed if D == 2 => self
                    .out
                    .push((key.clone(), ExportTensor::of(t.swap_dims(0, 1)))),
                Stored::Transposed => {
                    self.error.get_or_insert(ModelError::Input(format!(
                        "{key}: a {D}-d tensor recorded as a linear weight"
                    )));
                }
                Stored::QkvBias { q, v } => {
                    let e = t.dims()[0] / 3;
                    let t = t.reshape([3, e]);
                    self.out.push((
                        q.clone(),
                        ExportTensor::of(t.clone().narrow(0, 0, 1).reshape([e])),
                    ));
                    self.out
                        .push((v.clone(), ExportTensor::of(t.narrow(0, 2, 1).reshape([e]))));
                }
            }
        }
    }
    let mut c = Collect {
        keys,
        out: Vec::new(),
        seen: BTreeSet::new(),
        error: None,
    };
    module.visit(&mut c);
    if let Some(e) = c.error {
        return Err(e);
    }
    if c.seen.len() != keys.len() {
        let lost = keys
            .map
            .iter()
            .find(|(id, _)| !c.seen.contains(id))
            .map(|(_, (k, _))| k.clone())
            .unwrap_or_default();
        return Err(ModelError::Input(format!(
            "{lost}: the parameter read at load is no longer in the model (replaced without keeping its id); its tensor would be lost"
        )));
    }
    Ok(c.out)
}

/// The safetensors header name of a dtype.
pub fn dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::F16 => "F16",
        Dtype::BF16 => "BF16",
        Dtype::F64 => "F64",
        Dtype::I64 => "I64",
        Dtype::I32 => "I32",
        Dtype::I16 => "I16",
        Dtype::I8 => "I8",
        Dtype::U8 => "U8",
        Dtype::BOOL => "BOOL",
        _ => "F32",
    }
}

pub(crate) fn encode(values: &[f32], dtype: Dtype, out: &mut Vec<u8>) {
    out.clear();
    match dtype {
        Dtype::F16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
        Dtype::BF16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
        Dtype::F64 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&(*v as f64).to_le_bytes())),
        _ => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
    }
}

/// Writes one safetensors file, streaming tensor by tensor (one host copy at a time).
/// `dtype_of` picks each model tensor's on-disk dtype (F32 when absent); a tensor copied from
/// the source keeps its stored dtype and bytes.
pub fn write_safetensors<B: Backend>(
    path: &Path,
    entries: &[(String, ExportTensor<B>)],
    dtype_of: &dyn Fn(&str) -> Dtype,
) -> Result<()> {
    let mut sorted: Vec<&(String, ExportTensor<B>)> = entries.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let specs: Vec<(String, Vec<usize>, Dtype)> = sorted
        .iter()
        .map(|(k, t)| {
            (
                k.clone(),
                t.shape(),
                t.stored_dtype().unwrap_or_else(|| dtype_of(k)),
            )
        })
        .collect();
    write_safetensors_pieces(path, &specs, &mut |i, sink| match &sorted[i].1 {
        ExportTensor::Stored { store, key } => {
            let (_, _, bytes) = store.raw(key)?;
            sink(Piece::Bytes(&bytes))
        }
        t => t.for_each_chunk(CHUNK_VALUES, &mut |v| sink(Piece::F32(v))),
    })
}

/// Receives row-major pieces of one tensor's values.
pub type ValueSink<'a> = &'a mut dyn FnMut(&[f32]) -> Result<()>;

/// A piece of one tensor: f32 values (encoded in the tensor's dtype) or bytes already encoded.
pub enum Piece<'a> {
    F32(&'a [f32]),
    Bytes(&'a [u8]),
}

/// Values per piece when streaming a tensor to disk (16 Mi values = 64 MiB as f32).
const CHUNK_VALUES: usize = 16 << 20;

/// Writes a safetensors file from `(name, shape, dtype)` specs; `data(i)` yields tensor i's
/// values as f32 when its bytes are due, so only one tensor is on the host at a time.
pub fn write_safetensors_stream(
    path: &Path,
    specs: &[(String, Vec<usize>, Dtype)],
    mut data: impl FnMut(usize) -> Vec<f32>,
) -> Result<()> {
    write_safetensors_chunked(path, specs, &mut |i, sink| sink(&data(i)))
}

/// Piece-wise form of [`write_safetensors_stream`]: `data(i, sink)` feeds tensor i's values to
/// `sink` in row-major pieces.
pub fn write_safetensors_chunked(
    path: &Path,
    specs: &[(String, Vec<usize>, Dtype)],
    data: &mut dyn FnMut(usize, ValueSink) -> Result<()>,
) -> Result<()> {
    write_safetensors_pieces(path, specs, &mut |i, sink| {
        data(i, &mut |v: &[f32]| sink(Piece::F32(v)))
    })
}

/// Where a tensor's pieces go, one after another.
type PieceSink<'a> = &'a mut dyn FnMut(Piece) -> Result<()>;

/// The writer behind the others: pieces of f32 values or of encoded bytes.
/// The start of a safetensors file holding `specs` (name, shape, dtype) in this order: the
/// 8-byte header length and the header; and each tensor's byte offset in the file.
pub fn safetensors_header(specs: &[(String, Vec<usize>, Dtype)]) -> (Vec<u8>, Vec<u64>) {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0usize;
    let mut offsets = Vec::with_capacity(specs.len());
    for (name, shape, dtype) in specs {
        let n: usize = shape.iter().product::<usize>() * dtype.bitsize() / 8;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype_name(*dtype), "shape": shape, "data_offsets": [offset, offset + n]}),
        );
        offsets.push(offset as u64);
        offset += n;
    }
    let mut header_bytes = serde_json::to_vec(&header).expect("json");
    while !header_bytes.len().is_multiple_of(8) {
        header_bytes.push(b' ');
    }
    let mut start = (header_bytes.len() as u64).to_le_bytes().to_vec();
    start.extend_from_slice(&header_bytes);
    let base = start.len() as u64;
    (start, offsets.into_iter().map(|o| o + base).collect())
}

fn write_safetensors_pieces(
    path: &Path,
    specs: &[(String, Vec<usize>, Dtype)],
    data: &mut dyn FnMut(usize, PieceSink) -> Result<()>,
) -> Result<()> {
    let (start, _) = safetensors_header(specs);
    let file = File::create(path).map_err(|e| ModelError::io(path, e))?;
    let mut w = BufWriter::new(file);
    let io = |e| ModelError::io(path, e);
    w.write_all(&start).map_err(io)?;
    let mut buf = Vec::new();
    for (i, (name, shape, dtype)) in specs.iter().enumerate() {
        // bytes written for this tensor
        let mut written = 0usize;
        data(i, &mut |piece: Piece| {
            let bytes: &[u8] = match piece {
                Piece::F32(values) => {
                    encode(values, *dtype, &mut buf);
                    &buf
                }
                Piece::Bytes(b) => b,
            };
            written += bytes.len();
            w.write_all(bytes).map_err(|e| ModelError::io(path, e))
        })?;
        let expected = shape.iter().product::<usize>() * dtype.bitsize() / 8;
        if written != expected {
            return Err(ModelError::Input(format!(
                "{}: tensor `{name}` produced {written} bytes, expected {expected}",
                path.display()
            )));
        }
    }
    w.flush().map_err(io)?;
    Ok(())
}
