//! The `sparse-bitmask` format of vllm-project/compressed-tensors (`BitmaskCompressor`,
//! `BitmaskConfig`), in memory and as safetensors tensors.
//!
//! compressed-tensors works on PyTorch's Linear weight `[d_out, d_in]`. For a weight key
//! `<module>.weight` it writes four tensors and drops the weight:
//! - `<module>.shape`: `I64 [2]`, the dense shape `[d_out, d_in]`;
//! - `<module>.compressed`: `[nnz]` in the weight's dtype, the kept values in row-major order
//!   over `[d_out, d_in]` (output by output, inputs increasing);
//! - `<module>.bitmask`: `U8 [d_out, ceil(d_in / 8)]`, each output row packed on its own by
//!   `numpy.packbits(..., axis=-1, bitorder="little")`: input `i` of output `j` is bit `i % 8`
//!   (least significant first) of byte `[j, i / 8]`; padding bits of a row's last byte are 0;
//! - `<module>.row_offsets`: `I64 [d_out]`, index in `compressed` of each output's first value
//!   (exclusive prefix sum of the per-row counts).
//!
//! compressed-tensors keeps `w != 0`; [`BitmaskWeight::from_masked`] keeps the mask's entries
//! instead, writing explicit zeros where a kept weight is zero. Its decompressor scatters
//! `compressed` into the bitmask's set bits, so both read back identically.
//!
//! The `config.json` annotation ([`BitmaskConfig`]) is what `ModelCompressor.update_config`
//! writes for a sparsity-only model: `quantization_config = {"quant_method":
//! "compressed-tensors", "version", "sparsity_config": {"format": "sparse-bitmask",
//! "global_sparsity", "sparsity_structure", "targets", "ignore", …}, "transform_config": {}}`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::{Value, json};

use crate::error::SparseError;
use crate::formats::{Keep, SparseFormat, output_rows};
use crate::mask::Mask;
use crate::pattern::SparsityPattern;

/// The compressed-tensors release whose layout and config schema this module follows; written
/// as `quantization_config.version` (compressed-tensors reads and discards it).
pub const COMPRESSED_TENSORS_VERSION: &str = "0.13.0";
/// `sparsity_config.format`.
pub const FORMAT: &str = "sparse-bitmask";
/// `quantization_config.quant_method`.
pub const QUANT_METHOD: &str = "compressed-tensors";

/// A sparse weight in compressed-tensors' bitmask layout (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct BitmaskWeight {
    d_in: usize,
    d_out: usize,
    compressed: Vec<f32>,
    bitmask: Vec<u8>,
    /// `row_offsets` plus a final `nnz` (length `d_out + 1`).
    row_ptr: Vec<usize>,
}

impl BitmaskWeight {
    /// Keeps the non-zeros of a dense burn-orientation `[d_in, d_out]` weight, like
    /// compressed-tensors (`-0.0` is dropped and reads back as `0.0`; NaN is kept).
    pub fn from_dense(w: &[f32], d_in: usize, d_out: usize) -> Result<Self, SparseError> {
        Self::build(w, d_in, d_out, Keep::NonZero)
    }

    /// Keeps exactly the mask's entries (zero values included), so [`SparseFormat::mask`]
    /// returns `mask`.
    pub fn from_masked(w: &[f32], mask: &Mask) -> Result<Self, SparseError> {
        Self::build(w, mask.d_in(), mask.d_out(), Keep::Mask(mask))
    }

    fn build(w: &[f32], d_in: usize, d_out: usize, keep: Keep<'_>) -> Result<Self, SparseError> {
        let (rows, flags) = output_rows(w, d_in, d_out, keep)?;
        let row_bytes = d_in.div_ceil(8);
        let mut bitmask = vec![0u8; d_out * row_bytes];
        let mut compressed = Vec::with_capacity(flags.iter().filter(|k| **k).count());
        let mut row_ptr = Vec::with_capacity(d_out + 1);
        row_ptr.push(0);
        for j in 0..d_out {
            let bits = &mut bitmask[j * row_bytes..(j + 1) * row_bytes];
            for i in 0..d_in {
                if flags[j * d_in + i] {
                    bits[i / 8] |= 1 << (i % 8);
                    compressed.push(rows[j * d_in + i]);
                }
            }
            row_ptr.push(compressed.len());
        }
        Ok(Self {
            d_in,
            d_out,
            compressed,
            bitmask,
            row_ptr,
        })
    }

    /// Builds from the three arrays of the file format. Checks the bitmask length
    /// (`d_out * ceil(d_in / 8)`), that `compressed` holds one value per set bit and that
    /// `row_offsets` is the exclusive prefix sum of the per-row counts. Padding bits are
    /// ignored (cleared), as compressed-tensors' `unpackbits(count=d_in)` does.
    pub fn from_parts(
        d_in: usize,
        d_out: usize,
        compressed: Vec<f32>,
        mut bitmask: Vec<u8>,
        row_offsets: &[i64],
    ) -> Result<Self, SparseError> {
        d_in.checked_mul(d_out)
            .ok_or(SparseError::ShapeOverflow { d_in, d_out })?;
        let err = |field, message: String| SparseError::InvalidFormat {
            format: "sparse-bitmask",
            field,
            message,
        };
        let row_bytes = d_in.div_ceil(8);
        if bitmask.len() != d_out * row_bytes {
            return Err(err(
                "bitmask",
                format!(
                    "{} bytes, expected d_out * ceil(d_in / 8) = {d_out} * {row_bytes}",
                    bitmask.len()
                ),
            ));
        }
        if row_offsets.len() != d_out {
            return Err(err(
                "row_offsets",
                format!("{} entries, expected d_out = {d_out}", row_offsets.len()),
            ));
        }
        let mut row_ptr = Vec::with_capacity(d_out + 1);
        let mut total = 0usize;
        for (j, row) in bitmask.chunks_mut(row_bytes.max(1)).take(d_out).enumerate() {
            if !d_in.is_multiple_of(8)
                && let Some(last) = row.last_mut()
            {
                *last &= (1u8 << (d_in % 8)) - 1;
            }
            if row_offsets[j] != total as i64 {
                return Err(err(
                    "row_offsets",
                    format!(
                        "entry {j} is {}, expected {total} (kept entries before output {j})",
                        row_offsets[j]
                    ),
                ));
            }
            row_ptr.push(total);
            total += row.iter().map(|b| b.count_ones() as usize).sum::<usize>();
        }
        if row_bytes == 0 {
            row_ptr.resize(d_out, 0);
            if let Some((j, &o)) = row_offsets.iter().enumerate().find(|(_, o)| **o != 0) {
                return Err(err(
                    "row_offsets",
                    format!("entry {j} is {o}, expected 0 (d_in = 0)"),
                ));
            }
        }
        row_ptr.push(total);
        if compressed.len() != total {
            return Err(err(
                "compressed",
                format!(
                    "{} values, expected {total} (one per set bit of the bitmask)",
                    compressed.len()
                ),
            ));
        }
        Ok(Self {
            d_in,
            d_out,
            compressed,
            bitmask,
            row_ptr,
        })
    }

    /// Kept values in compressed-tensors order (output by output).
    pub fn compressed(&self) -> &[f32] {
        &self.compressed
    }

    /// Packed bits, `ceil(d_in / 8)` bytes per output.
    pub fn bitmask(&self) -> &[u8] {
        &self.bitmask
    }

    /// Bytes per output row of the bitmask, `ceil(d_in / 8)`.
    pub fn row_bytes(&self) -> usize {
        self.d_in.div_ceil(8)
    }

    /// First value of each output, plus `nnz` at the end (length `d_out + 1`).
    pub fn row_ptr(&self) -> &[usize] {
        &self.row_ptr
    }

    /// The four compressed-tensors tensors of weight `name` (`<module>.weight`), values in
    /// `dtype`.
    pub fn to_tensors(
        &self,
        name: &str,
        dtype: ValueDtype,
    ) -> Result<Vec<OwnedTensor>, SparseError> {
        let module = module_name(name)?;
        let i64s = |v: &mut dyn Iterator<Item = i64>| -> Vec<u8> {
            v.flat_map(|x| x.to_le_bytes()).collect()
        };
        let shape = i64s(&mut [self.d_out as i64, self.d_in as i64].into_iter());
        let offsets = i64s(&mut self.row_ptr[..self.d_out].iter().map(|&o| o as i64));
        Ok(vec![
            OwnedTensor {
                name: format!("{module}.shape"),
                dtype: Dtype::I64,
                shape: vec![2],
                data: shape,
            },
            OwnedTensor {
                name: format!("{module}.compressed"),
                dtype: dtype.dtype(),
                shape: vec![self.compressed.len()],
                data: dtype.encode(&self.compressed),
            },
            OwnedTensor {
                name: format!("{module}.bitmask"),
                dtype: Dtype::U8,
                shape: vec![self.d_out, self.row_bytes()],
                data: self.bitmask.clone(),
            },
            OwnedTensor {
                name: format!("{module}.row_offsets"),
                dtype: Dtype::I64,
                shape: vec![self.d_out],
                data: offsets,
            },
        ])
    }
}

impl SparseFormat for BitmaskWeight {
    fn shape(&self) -> (usize, usize) {
        (self.d_in, self.d_out)
    }

    fn nnz(&self) -> usize {
        self.compressed.len()
    }

    fn to_dense(&self) -> Vec<f32> {
        let mut w = vec![0.0f32; self.d_in * self.d_out];
        let row_bytes = self.row_bytes();
        for j in 0..self.d_out {
            let mut k = self.row_ptr[j];
            for i in 0..self.d_in {
                if self.bitmask[j * row_bytes + i / 8] >> (i % 8) & 1 == 1 {
                    w[i * self.d_out + j] = self.compressed[k];
                    k += 1;
                }
            }
        }
        w
    }

    fn mask(&self) -> Mask {
        let row_bytes = self.row_bytes();
        Mask::from_fn(self.d_in, self.d_out, |i, j| {
            self.bitmask[j * row_bytes + i / 8] >> (i % 8) & 1 == 1
        })
        .expect("shape was valid at construction")
    }

    fn storage_bytes(&self) -> usize {
        self.compressed.len() * 4 + self.bitmask.len() + self.d_out * 8 + 16
    }
}

/// `<module>.weight` → `<module>`; compressed-tensors only compresses `.weight` keys.
fn module_name(name: &str) -> Result<&str, SparseError> {
    name.strip_suffix(".weight")
        .filter(|m| !m.is_empty())
        .ok_or_else(|| SparseError::Tensor {
            name: name.to_string(),
            message: "compressed-tensors compresses only keys of the form <module>.weight".into(),
        })
}

/// Dtype of the `compressed` values in a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ValueDtype {
    /// Lossless for `f32` weights.
    #[default]
    F32,
    /// IEEE half (round to nearest even).
    F16,
    /// bfloat16 (round to nearest even), the usual dtype of HF checkpoints.
    BF16,
}

impl ValueDtype {
    fn dtype(self) -> Dtype {
        match self {
            Self::F32 => Dtype::F32,
            Self::F16 => Dtype::F16,
            Self::BF16 => Dtype::BF16,
        }
    }

    fn encode(self, v: &[f32]) -> Vec<u8> {
        match self {
            Self::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Self::F16 => v
                .iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect(),
            Self::BF16 => v
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                .collect(),
        }
    }
}

/// One tensor ready for a safetensors writer.
#[derive(Clone, Debug, PartialEq)]
pub struct OwnedTensor {
    /// Tensor key.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Little-endian element bytes.
    pub data: Vec<u8>,
}

fn st_err(name: &str, e: impl std::fmt::Display) -> SparseError {
    SparseError::Tensor {
        name: name.to_string(),
        message: e.to_string().replace('\n', " "),
    }
}

/// Serializes named weights (`<module>.weight` keys) as compressed-tensors bitmask tensors in
/// one safetensors buffer (metadata `{"format": "pt"}`, as `save_pretrained` writes).
pub fn serialize_bitmask<'a, I>(weights: I, dtype: ValueDtype) -> Result<Vec<u8>, SparseError>
where
    I: IntoIterator<Item = (&'a str, &'a BitmaskWeight)>,
{
    let mut tensors = Vec::new();
    let mut seen = BTreeSet::new();
    for (name, w) in weights {
        if !seen.insert(name) {
            return Err(SparseError::Tensor {
                name: name.to_string(),
                message: "duplicate weight name".into(),
            });
        }
        tensors.extend(w.to_tensors(name, dtype)?);
    }
    let mut views = Vec::with_capacity(tensors.len());
    for t in &tensors {
        let view =
            TensorView::new(t.dtype, t.shape.clone(), &t.data).map_err(|e| st_err(&t.name, e))?;
        views.push((t.name.clone(), view));
    }
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::tensor::serialize(views, Some(metadata)).map_err(|e| st_err("<file>", e))
}

/// Parses the bitmask-compressed weights of a safetensors buffer; see
/// [`read_bitmask_safetensors`].
pub fn deserialize_bitmask(bytes: &[u8]) -> Result<BTreeMap<String, BitmaskWeight>, SparseError> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| st_err("<file>", e))?;
    read_bitmask_safetensors(&st)
}

/// Collects every `<module>.{shape,compressed,bitmask,row_offsets}` group of an opened
/// safetensors file into `<module>.weight` → weight. Other tensors are ignored; a group with
/// a missing or malformed member is an error naming that tensor. Accepts `F32`, `F16` and
/// `BF16` values and `I64` or `I32` shape / offsets.
pub fn read_bitmask_safetensors(
    st: &SafeTensors<'_>,
) -> Result<BTreeMap<String, BitmaskWeight>, SparseError> {
    let modules: BTreeSet<&str> = st
        .names()
        .into_iter()
        .filter_map(|n| {
            n.strip_suffix(".bitmask")
                .or_else(|| n.strip_suffix(".compressed"))
                .or_else(|| n.strip_suffix(".row_offsets"))
        })
        .collect();
    let mut out = BTreeMap::new();
    for module in modules {
        let get = |part: &str| {
            let name = format!("{module}.{part}");
            st.tensor(&name).map_err(|_| SparseError::Tensor {
                name: name.clone(),
                message: "missing: a sparse-bitmask weight needs shape, compressed, bitmask and row_offsets".into(),
            }).map(|v| (name, v))
        };
        let (name, shape) = get("shape")?;
        let dims = read_ints(&name, &shape)?;
        let [d_out, d_in] = dims[..] else {
            return Err(SparseError::Tensor {
                name,
                message: format!("expected 2 entries [d_out, d_in], got {dims:?}"),
            });
        };
        let (name, bitmask) = get("bitmask")?;
        let row_bytes = d_in.div_ceil(8);
        if bitmask.dtype() != Dtype::U8 || bitmask.shape() != [d_out, row_bytes] {
            return Err(SparseError::Tensor {
                name,
                message: format!(
                    "expected U8 [{d_out}, {row_bytes}], got {:?} {:?}",
                    bitmask.dtype(),
                    bitmask.shape()
                ),
            });
        }
        let (name, offsets) = get("row_offsets")?;
        let offsets = read_ints(&name, &offsets)?;
        let (name, values) = get("compressed")?;
        let values = read_floats(&name, &values)?;
        let offsets: Vec<i64> = offsets.into_iter().map(|o| o as i64).collect();
        let w = BitmaskWeight::from_parts(d_in, d_out, values, bitmask.data().to_vec(), &offsets)
            .map_err(|e| SparseError::Tensor {
            name: module.to_string(),
            message: e.to_string(),
        })?;
        out.insert(format!("{module}.weight"), w);
    }
    Ok(out)
}

/// A 1-D `I64`/`I32` tensor of non-negative integers.
fn read_ints(name: &str, v: &TensorView<'_>) -> Result<Vec<usize>, SparseError> {
    let bad = |message: String| SparseError::Tensor {
        name: name.to_string(),
        message,
    };
    if v.shape().len() != 1 {
        return Err(bad(format!(
            "expected a 1-D tensor, got shape {:?}",
            v.shape()
        )));
    }
    let vals: Vec<i64> = match v.dtype() {
        Dtype::I64 => v
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
        Dtype::I32 => v
            .data()
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64)
            .collect(),
        d => return Err(bad(format!("expected I64 (or I32), got {d:?}"))),
    };
    vals.into_iter()
        .map(|x| usize::try_from(x).map_err(|_| bad(format!("negative entry {x}"))))
        .collect()
}

/// A 1-D `F32`/`F16`/`BF16` tensor as `f32`.
fn read_floats(name: &str, v: &TensorView<'_>) -> Result<Vec<f32>, SparseError> {
    if v.shape().len() != 1 {
        return Err(SparseError::Tensor {
            name: name.to_string(),
            message: format!("expected a 1-D tensor, got shape {:?}", v.shape()),
        });
    }
    let d = v.data();
    Ok(match v.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(SparseError::Tensor {
                name: name.to_string(),
                message: format!("expected F32, F16 or BF16 values, got {other:?}"),
            });
        }
    })
}

fn io_err(path: &Path, e: std::io::Error) -> SparseError {
    SparseError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// Writes [`serialize_bitmask`] to a file.
pub fn write_bitmask_file<'a, I>(
    path: impl AsRef<Path>,
    weights: I,
    dtype: ValueDtype,
) -> Result<(), SparseError>
where
    I: IntoIterator<Item = (&'a str, &'a BitmaskWeight)>,
{
    let path = path.as_ref();
    let bytes = serialize_bitmask(weights, dtype)?;
    std::fs::write(path, bytes).map_err(|e| io_err(path, e))
}

/// Reads the bitmask weights of a safetensors file ([`read_bitmask_safetensors`]).
pub fn read_bitmask_file(
    path: impl AsRef<Path>,
) -> Result<BTreeMap<String, BitmaskWeight>, SparseError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| io_err(path, e))?;
    deserialize_bitmask(&bytes).map_err(|e| SparseError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// The `config.json` annotation of a `sparse-bitmask` checkpoint (compressed-tensors'
/// `BitmaskConfig` inside `quantization_config.sparsity_config`).
#[derive(Clone, Debug, PartialEq)]
pub struct BitmaskConfig {
    /// Fraction (0–1) of zero weights; llm-compressor measures it over all parameters.
    pub global_sparsity: f64,
    /// `"unstructured"` or `"n:m"` with `n` zeros per `m` (compressed-tensors' convention,
    /// the same as [`SparsityPattern`]'s).
    pub sparsity_structure: String,
    /// Modules stored compressed: exact module names, `re:`-prefixed regexes or class names.
    pub targets: Vec<String>,
    /// Modules excluded from `targets`.
    pub ignore: Vec<String>,
}

impl BitmaskConfig {
    /// Targets the modules of the given `<module>.weight` keys (sorted, exact names), with the
    /// global sparsity measured over those weights.
    pub fn for_weights<'a, I>(weights: I, pattern: SparsityPattern) -> Result<Self, SparseError>
    where
        I: IntoIterator<Item = (&'a str, &'a BitmaskWeight)>,
    {
        let mut targets = Vec::new();
        let (mut total, mut kept) = (0usize, 0usize);
        for (name, w) in weights {
            targets.push(module_name(name)?.to_string());
            total += w.d_in * w.d_out;
            kept += w.nnz();
        }
        targets.sort();
        targets.dedup();
        let global_sparsity = if total == 0 {
            0.0
        } else {
            (total - kept) as f64 / total as f64
        };
        Ok(Self {
            global_sparsity,
            sparsity_structure: pattern.to_string(),
            targets,
            ignore: Vec::new(),
        })
    }

    /// `sparsity_config`, as pydantic's `model_dump()` of compressed-tensors' `BitmaskConfig`.
    pub fn sparsity_config(&self) -> Value {
        json!({
            "format": FORMAT,
            "global_sparsity": self.global_sparsity,
            "ignore": self.ignore,
            "registry_requires_subclass": false,
            "sparsity_structure": self.sparsity_structure,
            "targets": self.targets,
        })
    }

    /// The whole `quantization_config` entry of a sparsity-only model.
    pub fn quantization_config(&self) -> Value {
        json!({
            "quant_method": QUANT_METHOD,
            "sparsity_config": self.sparsity_config(),
            "transform_config": {},
            "version": COMPRESSED_TENSORS_VERSION,
        })
    }

    /// Adds the annotation to a parsed `config.json`. An existing compressed-tensors
    /// `quantization_config` (a quantized model) keeps its fields and gets `sparsity_config`;
    /// any other existing `quantization_config` is an error.
    pub fn annotate(&self, config: &mut Value) -> Result<(), SparseError> {
        let bad = |message: String| SparseError::Tensor {
            name: "config.json".into(),
            message,
        };
        let obj = config
            .as_object_mut()
            .ok_or_else(|| bad("is not a JSON object".into()))?;
        match obj.get_mut("quantization_config") {
            None | Some(Value::Null) => {
                obj.insert("quantization_config".into(), self.quantization_config());
            }
            Some(Value::Object(q)) => {
                let method = q.get("quant_method").and_then(Value::as_str);
                if method != Some(QUANT_METHOD) {
                    return Err(bad(format!(
                        "quantization_config.quant_method is {method:?}, cannot add a {QUANT_METHOD} sparsity_config"
                    )));
                }
                q.insert("sparsity_config".into(), self.sparsity_config());
            }
            Some(other) => {
                return Err(bad(format!(
                    "quantization_config is {other}, expected an object"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::test_util::{Lcg, masked_weight};

    #[test]
    fn layout_matches_compressed_tensors() {
        // burn [d_in = 10, d_out = 2]; output 0 keeps inputs 0, 3, 9; output 1 keeps nothing
        let mut w = vec![0.0f32; 20];
        w[0] = 1.0; // (0, 0)
        w[3 * 2] = 2.0; // (3, 0)
        w[9 * 2] = 3.0; // (9, 0)
        let b = BitmaskWeight::from_dense(&w, 10, 2).unwrap();
        // numpy.packbits([1,0,0,1,0,0,0,0,0,1], bitorder="little") == [0b1001, 0b10]
        assert_eq!(b.bitmask(), &[0b0000_1001, 0b0000_0010, 0, 0]);
        assert_eq!(b.compressed(), &[1.0, 2.0, 3.0]);
        assert_eq!(b.row_ptr(), &[0, 3, 3]);
        let t = b.to_tensors("layer.fc.weight", ValueDtype::F32).unwrap();
        let names: Vec<&str> = t.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "layer.fc.shape",
                "layer.fc.compressed",
                "layer.fc.bitmask",
                "layer.fc.row_offsets"
            ]
        );
        assert_eq!((t[0].dtype, &t[0].shape[..]), (Dtype::I64, &[2][..]));
        assert_eq!(
            t[0].data,
            [2i64, 10]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect::<Vec<_>>()
        );
        assert_eq!((t[1].dtype, &t[1].shape[..]), (Dtype::F32, &[3][..]));
        assert_eq!((t[2].dtype, &t[2].shape[..]), (Dtype::U8, &[2, 2][..]));
        assert_eq!((t[3].dtype, &t[3].shape[..]), (Dtype::I64, &[2][..]));
        assert_eq!(
            t[3].data,
            [0i64, 3]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect::<Vec<_>>()
        );
        assert!(b.to_tensors("layer.fc.bias", ValueDtype::F32).is_err());
    }

    #[test]
    fn round_trips_through_safetensors() {
        let mut rng = Lcg(3);
        let mut weights = Vec::new();
        for (k, (d_in, d_out, s)) in [
            (1, 1, 0.0),
            (7, 3, 0.5),
            (16, 9, 0.9),
            (33, 17, 0.7),
            (8, 5, 1.0),
            (13, 6, 0.0),
            (0, 3, 0.5),
            (5, 0, 0.5),
        ]
        .into_iter()
        .enumerate()
        {
            let (w, mask) = masked_weight(&mut rng, d_in, d_out, s);
            let b = BitmaskWeight::from_masked(&w, &mask).unwrap();
            assert_eq!(b.to_dense(), w);
            assert_eq!(b.mask(), mask);
            assert_eq!(
                BitmaskWeight::from_dense(&w, d_in, d_out)
                    .unwrap()
                    .to_dense(),
                w
            );
            weights.push((format!("m.{k}.weight"), b, w));
        }
        let bytes = serialize_bitmask(
            weights.iter().map(|(n, b, _)| (n.as_str(), b)),
            ValueDtype::F32,
        )
        .unwrap();
        let back = deserialize_bitmask(&bytes).unwrap();
        assert_eq!(back.len(), weights.len());
        for (n, b, w) in &weights {
            assert_eq!(&back[n], b);
            assert_eq!(&back[n].to_dense(), w);
        }
        // bf16 values: lossless for bf16-representable weights
        let w: Vec<f32> = [0.5f32, 0.0, -1.25, 3.0, 0.0, 0.0].to_vec();
        let b = BitmaskWeight::from_dense(&w, 3, 2).unwrap();
        for dt in [ValueDtype::BF16, ValueDtype::F16] {
            let bytes = serialize_bitmask([("x.weight", &b)], dt).unwrap();
            assert_eq!(
                deserialize_bitmask(&bytes).unwrap()["x.weight"].to_dense(),
                w
            );
        }
    }

    #[test]
    fn rejects_malformed_groups() {
        let b = BitmaskWeight::from_dense(&[1.0, 0.0, 2.0, 0.0, 0.0, 3.0], 3, 2).unwrap();
        let good = b.to_tensors("a.weight", ValueDtype::F32).unwrap();
        let write = |ts: &[OwnedTensor]| {
            let views: Vec<_> = ts
                .iter()
                .map(|t| {
                    (
                        t.name.clone(),
                        TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap(),
                    )
                })
                .collect();
            safetensors::tensor::serialize(views, None).unwrap()
        };
        assert!(deserialize_bitmask(&write(&good)).is_ok());
        // missing member
        let e = deserialize_bitmask(&write(&good[1..])).unwrap_err();
        assert!(e.to_string().contains("a.shape"), "{e}");
        // wrong offsets
        let mut bad = good.clone();
        bad[3].data = [0i64, 1].iter().flat_map(|x| x.to_le_bytes()).collect();
        let e = deserialize_bitmask(&write(&bad)).unwrap_err();
        assert!(e.to_string().contains("row_offsets"), "{e}");
        // one value too few
        let mut bad = good.clone();
        bad[1].shape = vec![2];
        bad[1].data.truncate(8);
        assert!(deserialize_bitmask(&write(&bad)).is_err());
        // bitmask of the wrong shape
        let mut bad = good.clone();
        bad[2].shape = vec![1, 2];
        let e = deserialize_bitmask(&write(&bad)).unwrap_err();
        assert!(e.to_string().contains("a.bitmask"), "{e}");
        // bool dtype for the shape
        let mut bad = good.clone();
        bad[0].dtype = Dtype::U8;
        bad[0].data.truncate(2);
        assert!(deserialize_bitmask(&write(&bad)).is_err());
        // padding bits are ignored like numpy.unpackbits(count=d_in)
        let mut padded = good.clone();
        padded[2].data[0] |= 0b1000_0000;
        assert_eq!(deserialize_bitmask(&write(&padded)).unwrap()["a.weight"], b);
        assert!(deserialize_bitmask(b"junk").is_err());
        assert!(serialize_bitmask([("a.weight", &b), ("a.weight", &b)], ValueDtype::F32).is_err());
        assert!(read_bitmask_file("/nonexistent/x.safetensors").is_err());
    }

    #[test]
    fn half_sparse_file_is_at_most_0_6_of_dense() {
        // FlanT5-XL FFN shape, 50 % unstructured
        let (d_in, d_out) = (2048, 5120);
        let (w, mask) = masked_weight(&mut Lcg(1), d_in, d_out, 0.5);
        let b = BitmaskWeight::from_masked(&w, &mask).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let sparse = dir.path().join("sparse.safetensors");
        write_bitmask_file(&sparse, [("w.weight", &b)], ValueDtype::F32).unwrap();
        // the dense file as save_pretrained writes it: one F32 [d_out, d_in] tensor
        let rows: Vec<u8> = crate::formats::transpose(&w, d_in, d_out)
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let view = TensorView::new(Dtype::F32, vec![d_out, d_in], &rows).unwrap();
        let dense = dir.path().join("dense.safetensors");
        std::fs::write(
            &dense,
            safetensors::tensor::serialize([("w.weight", view)], None).unwrap(),
        )
        .unwrap();
        let len = |p: &std::path::Path| std::fs::metadata(p).unwrap().len() as f64;
        let ratio = len(&sparse) / len(&dense);
        assert!(ratio <= 0.6, "bitmask / dense file size = {ratio}");
        assert!(ratio > 0.5, "{ratio}"); // values alone are half the dense bytes
        assert_eq!(read_bitmask_file(&sparse).unwrap()["w.weight"], b);
    }

    #[test]
    fn config_annotation() {
        let b = BitmaskWeight::from_dense(&[1.0, 0.0, 0.0, 0.0], 2, 2).unwrap();
        let cfg = BitmaskConfig::for_weights(
            [("enc.q.weight", &b), ("enc.k.weight", &b)],
            SparsityPattern::Unstructured,
        )
        .unwrap();
        assert_eq!(cfg.targets, ["enc.k", "enc.q"]);
        assert_eq!(cfg.global_sparsity, 0.75);
        let mut config = json!({"model_type": "t5"});
        cfg.annotate(&mut config).unwrap();
        let q = &config["quantization_config"];
        assert_eq!(q["quant_method"], "compressed-tensors");
        assert_eq!(q["sparsity_config"]["format"], "sparse-bitmask");
        assert_eq!(q["sparsity_config"]["sparsity_structure"], "unstructured");
        assert_eq!(q["sparsity_config"]["targets"], json!(["enc.k", "enc.q"]));
        assert_eq!(q["transform_config"], json!({}));
        // a quantized compressed-tensors model keeps its quantization fields
        let mut quantized = json!({"quantization_config": {"quant_method": "compressed-tensors", "format": "int-quantized"}});
        cfg.annotate(&mut quantized).unwrap();
        assert_eq!(quantized["quantization_config"]["format"], "int-quantized");
        assert_eq!(
            quantized["quantization_config"]["sparsity_config"]["format"],
            "sparse-bitmask"
        );
        let mut gptq = json!({"quantization_config": {"quant_method": "gptq"}});
        assert!(cfg.annotate(&mut gptq).is_err());
        assert!(cfg.annotate(&mut json!([1])).is_err());
        let two_four =
            BitmaskConfig::for_weights([("x.weight", &b)], SparsityPattern::TWO_FOUR).unwrap();
        assert_eq!(two_four.sparsity_config()["sparsity_structure"], "2:4");
    }
}
