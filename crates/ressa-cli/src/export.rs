//! `ressa export`: writes a model directory in another storage format.
//!
//! - `dense`: every weight as a plain tensor (a `sparse-bitmask` input is decompressed).
//! - `bitmask`: compressed-tensors' `sparse-bitmask` layout (see
//!   `ressa_sparse::formats::bitmask`) for the pruned linears, everything else unchanged, and
//!   the `quantization_config` annotation in `config.json`, so `transformers` /
//!   compressed-tensors and `ressa` both read it back.
//!
//! Which weights are compressed: the keys of the model's `masks.safetensors` (written by
//! `ressa prune` / `ressa repair`; zero-valued kept weights stay stored), else the prunable
//! linears of the architecture whose weights hold zeros. Weights with nothing pruned stay
//! dense. The output is one `model.safetensors`, written tensor by tensor (one weight on the
//! host at a time) into a temporary directory that is renamed at the end.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use burn::prelude::*;
use clap::ValueEnum;
use ressa_models::prunable::prunable_linears;
use ressa_models::weights::{SINGLE_FILE, WeightStore, dtype_name};
use ressa_sparse::formats::{BitmaskConfig, BitmaskWeight};
use ressa_sparse::mask::Mask;
use safetensors::Dtype;

use ressa_models::{Pretrained, VisionLanguageModel};

use crate::backend::{BackendKind, ModelJob, run_model_job};
use crate::output::refuse_alias;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Plain tensors.
    Dense,
    /// compressed-tensors `sparse-bitmask` for the pruned linears.
    Bitmask,
}

#[derive(clap::Args)]
pub struct Args {
    /// Model directory (HF layout, dense or `sparse-bitmask`).
    pub model: PathBuf,
    /// Output directory (must not exist or be empty).
    #[arg(long)]
    pub out: PathBuf,
    /// Storage format of the output.
    #[arg(long, value_enum)]
    pub format: Format,
}

pub fn run(kind: BackendKind, mut args: Args) -> Result<()> {
    args.model = crate::backend::model_dir(&args.model)?;
    refuse_alias("--out", &args.out, &[("model directory", &args.model)])?;
    export(kind, &args)
}

/// The HF keys of the prunable linears' weights (the family's structure decides).
struct PrunableKeys<'a> {
    dir: &'a Path,
    keys: &'a mut Vec<String>,
}

impl ModelJob for PrunableKeys<'_> {
    fn run<B: Backend, M: VisionLanguageModel<B>>(
        self,
        config: M::Config,
        device: &B::Device,
    ) -> Result<()> {
        let pretrained = Pretrained::<B, M>::load_with(self.dir, config, device)?;
        *self.keys = prunable_linears(&pretrained.model)
            .into_iter()
            .map(|(_, l)| format!("{}.weight", l.key))
            .collect();
        Ok(())
    }
}

/// What one output tensor is made of.
enum Entry {
    /// A logical tensor of the source, in its on-disk dtype.
    Source(String),
    /// One of the four parts of a compressed weight (`<module>.weight`).
    Part { weight: String, part: Part },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Shape,
    Compressed,
    Bitmask,
    RowOffsets,
}

struct Spec {
    name: String,
    shape: Vec<usize>,
    dtype: Dtype,
    entry: Entry,
}

fn export(kind: BackendKind, args: &Args) -> Result<()> {
    let start = std::time::Instant::now();
    let store = WeightStore::open_dir(&args.model)?;
    let masks = read_masks(&args.model, &store)?;
    let mut keys: Vec<String> = store.keys().cloned().collect();
    keys.sort();

    // Compressed weights: the sidecar's masks, else the prunable linears holding zeros.
    let mut targets: BTreeMap<String, Option<Mask>> = BTreeMap::new();
    if args.format == Format::Bitmask {
        match &masks {
            Some(masks) => {
                for (key, mask) in masks {
                    if mask.count_pruned() > 0 {
                        targets.insert(key.clone(), Some(mask.clone()));
                    }
                }
            }
            None => {
                let mut prunable = Vec::new();
                run_model_job(
                    kind,
                    &args.model,
                    PrunableKeys {
                        dir: &args.model,
                        keys: &mut prunable,
                    },
                )?;
                for key in prunable {
                    let (shape, _) = store
                        .info(&key)
                        .ok_or_else(|| anyhow!("{}: no tensor {key}", args.model.display()))?;
                    let w = store.get(&key, &shape)?.data;
                    if w.contains(&0.0) {
                        targets.insert(key, None);
                    }
                }
            }
        }
    }

    // Per compressed weight: kept entries (for the header), dtype of its values.
    let mut kept: BTreeMap<String, usize> = BTreeMap::new();
    let mut specs = Vec::new();
    for key in &keys {
        let (shape, dtype) = store.info(key).expect("listed key");
        let Some(mask) = targets.get(key) else {
            specs.push(Spec {
                name: key.clone(),
                shape,
                dtype,
                entry: Entry::Source(key.clone()),
            });
            continue;
        };
        if !matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            bail!(
                "{}: {key} is {dtype:?}; sparse-bitmask stores F32, F16 or BF16 values",
                args.model.display()
            );
        }
        let [d_out, d_in] = shape[..] else {
            bail!(
                "{}: {key} has shape {shape:?}, expected a 2-D linear weight",
                args.model.display()
            );
        };
        let n = match mask {
            Some(m) => m.len() - m.count_pruned(),
            None => store
                .get(key, &shape)?
                .data
                .iter()
                .filter(|v| **v != 0.0)
                .count(),
        };
        kept.insert(key.clone(), n);
        let module = key.strip_suffix(".weight").expect("linear weight key");
        let row_bytes = d_in.div_ceil(8);
        for (part, suffix, shape, dtype) in [
            (Part::Bitmask, "bitmask", vec![d_out, row_bytes], Dtype::U8),
            (Part::Compressed, "compressed", vec![n], dtype),
            (Part::RowOffsets, "row_offsets", vec![d_out], Dtype::I64),
            (Part::Shape, "shape", vec![2], Dtype::I64),
        ] {
            specs.push(Spec {
                name: format!("{module}.{suffix}"),
                shape,
                dtype,
                entry: Entry::Part {
                    weight: key.clone(),
                    part,
                },
            });
        }
    }
    specs.sort_by(|a, b| a.name.cmp(&b.name));

    ressa_models::pretrained::write_dir_atomically(&args.out, |tmp: &Path| -> Result<()> {
        ressa_models::pretrained::copy_non_weight_files(&args.model, tmp)?;
        let config = tmp.join("config.json");
        ressa_models::pretrained::drop_sparsity_annotation(&config)?;
        if !targets.is_empty() {
            annotate(&config, &args.model, &store, &kept)?;
        }
        write_file(&tmp.join(SINGLE_FILE), &specs, &store, &targets)
    })?;

    let bytes = |dir: &Path| -> u64 {
        std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| {
                        let n = e.file_name().to_string_lossy().to_string();
                        n.starts_with("model") && n.ends_with(".safetensors")
                    })
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    };
    let (src_bytes, out_bytes) = (bytes(&args.model), bytes(&args.out));
    let summary = serde_json::json!({
        "format": match args.format { Format::Dense => "dense", Format::Bitmask => "sparse-bitmask" },
        "compressed_weights": targets.len(),
        "source_bytes": src_bytes,
        "bytes": out_bytes,
        "ratio": out_bytes as f64 / src_bytes.max(1) as f64,
        "seconds": start.elapsed().as_secs_f64(),
    });
    println!("{summary}");
    tracing::info!(out = %args.out.display(), "exported");
    Ok(())
}

/// The model's `masks.safetensors`, checked against the weights' shapes, if present.
fn read_masks(dir: &Path, store: &WeightStore) -> Result<Option<BTreeMap<String, Mask>>> {
    let path = dir.join("masks.safetensors");
    if !path.exists() {
        return Ok(None);
    }
    let masks =
        ressa_sparse::sidecar::read_masks(&path).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    for (key, mask) in &masks {
        let (shape, _) = store.info(key).ok_or_else(|| {
            anyhow!(
                "{}: mask `{key}` names no tensor of the model",
                path.display()
            )
        })?;
        if shape != [mask.d_out(), mask.d_in()] {
            bail!(
                "{}: mask `{key}` is [d_in, d_out] = [{}, {}], the weight is {shape:?} ([d_out, d_in])",
                path.display(),
                mask.d_in(),
                mask.d_out()
            );
        }
    }
    Ok(Some(masks))
}

/// Adds compressed-tensors' annotation: targets = the compressed modules, global sparsity
/// over them, structure from the pruner's `sparsity.json` when present.
fn annotate(
    config_path: &Path,
    src: &Path,
    store: &WeightStore,
    kept: &BTreeMap<String, usize>,
) -> Result<()> {
    let (mut total, mut nnz) = (0usize, 0usize);
    for (key, n) in kept {
        let (shape, _) = store.info(key).expect("listed key");
        total += shape.iter().product::<usize>();
        nnz += n;
    }
    let structure = std::fs::read_to_string(src.join("sparsity.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| {
            v.get("pattern")
                .and_then(|p| p.as_str())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unstructured".into());
    let annotation = BitmaskConfig {
        global_sparsity: (total - nnz) as f64 / total.max(1) as f64,
        sparsity_structure: structure,
        targets: kept
            .keys()
            .map(|k| k.strip_suffix(".weight").expect("weight key").to_string())
            .collect(),
        ignore: Vec::new(),
    };
    let text =
        std::fs::read_to_string(config_path).with_context(|| config_path.display().to_string())?;
    let mut config: serde_json::Value =
        serde_json::from_str(&text).with_context(|| config_path.display().to_string())?;
    annotation
        .annotate(&mut config)
        .map_err(|e| anyhow!("{}: {e}", config_path.display()))?;
    std::fs::write(config_path, serde_json::to_vec_pretty(&config)?)
        .with_context(|| config_path.display().to_string())
}

/// Writes the safetensors file in `specs` order, producing each tensor's bytes when due. The
/// four parts of a compressed weight are adjacent (sorted names), so its packed form is built
/// once and reused.
fn write_file(
    path: &Path,
    specs: &[Spec],
    store: &WeightStore,
    targets: &BTreeMap<String, Option<Mask>>,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0usize;
    for s in specs {
        let n = s.shape.iter().product::<usize>() * s.dtype.bitsize() / 8;
        header.insert(
            s.name.clone(),
            serde_json::json!({"dtype": dtype_name(s.dtype), "shape": s.shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let mut header_bytes = serde_json::to_vec(&header)?;
    while !header_bytes.len().is_multiple_of(8) {
        header_bytes.push(b' ');
    }
    let io = |e: std::io::Error| anyhow!("{}: {e}", path.display());
    let mut w = BufWriter::new(File::create(path).map_err(io)?);
    w.write_all(&(header_bytes.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&header_bytes).map_err(io)?;
    let mut packed: Option<(String, BitmaskWeight)> = None;
    for s in specs {
        let bytes: Cow<'_, [u8]> = match &s.entry {
            Entry::Source(key) => store.raw(key)?.2,
            Entry::Part { weight, part } => {
                if packed.as_ref().is_none_or(|(k, _)| k != weight) {
                    packed = Some((weight.clone(), pack(store, weight, &targets[weight])?));
                }
                let p = &packed.as_ref().expect("packed").1;
                let ints = |v: &mut dyn Iterator<Item = usize>| -> Vec<u8> {
                    v.flat_map(|x| (x as i64).to_le_bytes()).collect()
                };
                match part {
                    Part::Shape => {
                        let (d_in, d_out) = ressa_sparse::formats::SparseFormat::shape(p);
                        Cow::Owned(ints(&mut [d_out, d_in].into_iter()))
                    }
                    Part::RowOffsets => {
                        let rows = p.row_ptr();
                        Cow::Owned(ints(&mut rows[..rows.len() - 1].iter().copied()))
                    }
                    Part::Bitmask => Cow::Borrowed(p.bitmask()),
                    Part::Compressed => Cow::Owned(
                        ressa_models::weights::encode_f32(p.compressed(), s.dtype)
                            .expect("float dtype checked"),
                    ),
                }
            }
        };
        let expected = s.shape.iter().product::<usize>() * s.dtype.bitsize() / 8;
        if bytes.len() != expected {
            bail!(
                "{}: tensor `{}` has {} bytes, expected {expected}",
                path.display(),
                s.name,
                bytes.len()
            );
        }
        w.write_all(&bytes).map_err(io)?;
    }
    w.flush().map_err(io)?;
    Ok(())
}

/// The packed form of one weight: the mask's entries, or its non-zeros.
fn pack(store: &WeightStore, key: &str, mask: &Option<Mask>) -> Result<BitmaskWeight> {
    let (shape, _) = store.info(key).expect("listed key");
    let (d_out, d_in) = (shape[0], shape[1]);
    let w = store.get(key, &shape)?.data;
    // PyTorch [d_out, d_in] → burn [d_in, d_out].
    let mut burn_order = vec![0f32; d_in * d_out];
    for j in 0..d_out {
        for i in 0..d_in {
            burn_order[i * d_out + j] = w[j * d_in + i];
        }
    }
    let packed = match mask {
        Some(m) => BitmaskWeight::from_masked(&burn_order, m),
        None => BitmaskWeight::from_dense(&burn_order, d_in, d_out),
    };
    packed.map_err(|e| anyhow!("{key}: {e}"))
}
