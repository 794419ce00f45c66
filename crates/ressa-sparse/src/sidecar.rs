//! `masks.safetensors` sidecar files.
//!
//! Each mask is stored as a 1-D `U8` tensor holding [`Mask::to_bytes`] (bit order documented
//! in [`crate::mask`]: row-major over burn's `[d_in, d_out]`, LSB first). The file-level
//! metadata carries:
//! - `"format"`: `"ressa-bitmask-v1"`;
//! - `"bit_order"`: `"row-major-d_in-d_out-lsb0"`;
//! - `"shape.<tensor name>"`: the JSON array `[d_in, d_out]` of that mask.
//!
//! Tensor names are free-form (typically the weight key of the Linear).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::error::SparseError;
use crate::mask::Mask;

/// Value of the `format` metadata key.
pub const FORMAT: &str = "ressa-bitmask-v1";
/// Value of the `bit_order` metadata key.
pub const BIT_ORDER: &str = "row-major-d_in-d_out-lsb0";

fn format_err(e: impl std::fmt::Display) -> SparseError {
    SparseError::Format(e.to_string().replace('\n', " "))
}

/// Serializes named masks into safetensors bytes.
pub fn serialize_masks<'a, I>(masks: I) -> Result<Vec<u8>, SparseError>
where
    I: IntoIterator<Item = (&'a str, &'a Mask)>,
{
    let masks: Vec<(&str, &Mask)> = masks.into_iter().collect();
    let mut metadata = HashMap::new();
    metadata.insert("format".to_string(), FORMAT.to_string());
    metadata.insert("bit_order".to_string(), BIT_ORDER.to_string());
    let bytes: Vec<Vec<u8>> = masks.iter().map(|(_, m)| m.to_bytes()).collect();
    let mut views = Vec::with_capacity(masks.len());
    for ((name, mask), data) in masks.iter().zip(&bytes) {
        let key = format!("shape.{name}");
        if metadata.contains_key(&key) {
            return Err(SparseError::Format(format!("duplicate mask name {name:?}")));
        }
        metadata.insert(key, format!("[{},{}]", mask.d_in(), mask.d_out()));
        let view = TensorView::new(Dtype::U8, vec![data.len()], data).map_err(format_err)?;
        views.push((name.to_string(), view));
    }
    let bytes = safetensors::tensor::serialize(views, Some(metadata)).map_err(format_err)?;
    canonical_header(&bytes)
}

/// The same safetensors bytes with the JSON header's keys sorted: `safetensors` writes its
/// metadata map in hash order, so equal masks would give different files from run to run.
fn canonical_header(bytes: &[u8]) -> Result<Vec<u8>, SparseError> {
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8-byte length")) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).map_err(format_err)?;
    let mut text = String::new();
    write_sorted(&header, &mut text);
    // Keep the data 8-byte aligned, as `safetensors` does (padding with spaces).
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut out = Vec::with_capacity(8 + text.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    Ok(out)
}

/// Compact JSON with object keys in sorted order (independent of serde_json's map type).
fn write_sorted(v: &serde_json::Value, out: &mut String) {
    match v {
        serde_json::Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::String(k.clone()).to_string());
                out.push(':');
                write_sorted(&m[k], out);
            }
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// Parses safetensors bytes written by [`serialize_masks`].
pub fn deserialize_masks(bytes: &[u8]) -> Result<BTreeMap<String, Mask>, SparseError> {
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(format_err)?;
    let info = meta
        .metadata()
        .as_ref()
        .ok_or_else(|| SparseError::Format("missing metadata".into()))?;
    match info.get("format") {
        Some(f) if f == FORMAT => {}
        other => {
            return Err(SparseError::Format(format!(
                "format is {other:?}, expected {FORMAT:?}"
            )));
        }
    }
    let st = SafeTensors::deserialize(bytes).map_err(format_err)?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::U8 || view.shape().len() != 1 {
            return Err(SparseError::Format(format!(
                "tensor {name:?} must be 1-D U8, got {:?} {:?}",
                view.dtype(),
                view.shape()
            )));
        }
        let shape = info
            .get(&format!("shape.{name}"))
            .ok_or_else(|| SparseError::Format(format!("no shape metadata for {name:?}")))?;
        let dims: Vec<usize> = serde_json::from_str(shape).map_err(|e| {
            SparseError::Format(format!("bad shape metadata {shape:?} for {name:?}: {e}"))
        })?;
        let [d_in, d_out] = dims[..] else {
            return Err(SparseError::Format(format!(
                "shape metadata {shape:?} for {name:?} is not [d_in, d_out]"
            )));
        };
        out.insert(name.clone(), Mask::from_bytes(d_in, d_out, view.data())?);
    }
    Ok(out)
}

/// Writes named masks to a `masks.safetensors` file.
pub fn write_masks<'a, I>(path: impl AsRef<Path>, masks: I) -> Result<(), SparseError>
where
    I: IntoIterator<Item = (&'a str, &'a Mask)>,
{
    let path = path.as_ref();
    let bytes = serialize_masks(masks)?;
    std::fs::write(path, bytes).map_err(|e| SparseError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// Reads a `masks.safetensors` file.
pub fn read_masks(path: impl AsRef<Path>) -> Result<BTreeMap<String, Mask>, SparseError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| SparseError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    // Content errors name the file too.
    deserialize_masks(&bytes).map_err(|e| match e {
        SparseError::Io { .. } => e,
        e => SparseError::Format(format!("{}: {e}", path.display())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_round_trip() {
        let a = Mask::from_fn(13, 7, |i, j| (i * 7 + j) % 3 != 0).unwrap();
        let b = Mask::from_fn(64, 40, |i, j| (i ^ j) & 1 == 0).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("masks.safetensors");
        write_masks(&path, [("layer.a.weight", &a), ("layer.b.weight", &b)]).unwrap();
        let back = read_masks(&path).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back["layer.a.weight"], a);
        assert_eq!(back["layer.b.weight"], b);
    }

    #[test]
    fn rejects_foreign_files() {
        let data = [0u8; 4];
        let view = TensorView::new(Dtype::U8, vec![4], &data).unwrap();
        let bytes = safetensors::tensor::serialize([("x", view)], None).unwrap();
        assert!(deserialize_masks(&bytes).is_err());
        assert!(deserialize_masks(b"not a safetensors file").is_err());
        let m = Mask::ones(2, 2).unwrap();
        assert!(serialize_masks([("a", &m), ("a", &m)]).is_err());
        assert!(read_masks("/nonexistent/masks.safetensors").is_err());
    }
}

/// Builds a `masks.safetensors` file without holding every mask in memory: masks are appended
/// to a spill file as they are produced, and [`MaskSpill::finish`] writes the header and copies
/// the bytes. The spill file is removed when the value is dropped.
pub struct MaskSpill {
    spill_path: std::path::PathBuf,
    writer: Option<std::io::BufWriter<std::fs::File>>,
    /// (name, d_in, d_out, offset, length) in spill order.
    entries: Vec<(String, usize, usize, u64, usize)>,
    offset: u64,
}

fn io_err(path: &Path, e: std::io::Error) -> SparseError {
    SparseError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

impl MaskSpill {
    /// Starts a spill file at `spill_path` (created or truncated).
    pub fn create(spill_path: impl AsRef<Path>) -> Result<Self, SparseError> {
        let spill_path = spill_path.as_ref().to_path_buf();
        let file = std::fs::File::create(&spill_path).map_err(|e| io_err(&spill_path, e))?;
        Ok(Self {
            spill_path,
            writer: Some(std::io::BufWriter::new(file)),
            entries: Vec::new(),
            offset: 0,
        })
    }

    /// Appends one mask.
    pub fn push(&mut self, name: &str, mask: &Mask) -> Result<(), SparseError> {
        use std::io::Write;
        if self.entries.iter().any(|e| e.0 == name) {
            return Err(SparseError::Format(format!("duplicate mask name {name:?}")));
        }
        let bytes = mask.to_bytes();
        let w = self.writer.as_mut().expect("open until finish");
        w.write_all(&bytes)
            .map_err(|e| io_err(&self.spill_path, e))?;
        self.entries.push((
            name.to_string(),
            mask.d_in(),
            mask.d_out(),
            self.offset,
            bytes.len(),
        ));
        self.offset += bytes.len() as u64;
        Ok(())
    }

    /// Number of masks so far.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no mask was pushed.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes the masks as a `masks.safetensors` file at `path` (same format as
    /// [`serialize_masks`]), streaming from the spill file.
    pub fn finish(mut self, path: impl AsRef<Path>) -> Result<(), SparseError> {
        use std::io::{Read, Write};
        let path = path.as_ref();
        if let Some(mut w) = self.writer.take() {
            w.flush().map_err(|e| io_err(&self.spill_path, e))?;
        }
        let mut header = serde_json::Map::new();
        let mut meta = serde_json::Map::new();
        meta.insert("format".into(), FORMAT.into());
        meta.insert("bit_order".into(), BIT_ORDER.into());
        for (name, d_in, d_out, _, _) in &self.entries {
            meta.insert(format!("shape.{name}"), format!("[{d_in},{d_out}]").into());
        }
        header.insert("__metadata__".into(), serde_json::Value::Object(meta));
        for (name, _, _, offset, len) in &self.entries {
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": "U8", "shape": [len], "data_offsets": [offset, *offset + *len as u64]}),
            );
        }
        let mut header = serde_json::to_vec(&header).map_err(format_err)?;
        while header.len() % 8 != 0 {
            header.push(b' ');
        }
        let out = std::fs::File::create(path).map_err(|e| io_err(path, e))?;
        let mut out = std::io::BufWriter::new(out);
        out.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(|e| io_err(path, e))?;
        out.write_all(&header).map_err(|e| io_err(path, e))?;
        let mut spill =
            std::fs::File::open(&self.spill_path).map_err(|e| io_err(&self.spill_path, e))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = spill
                .read(&mut buf)
                .map_err(|e| io_err(&self.spill_path, e))?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n]).map_err(|e| io_err(path, e))?;
        }
        out.flush().map_err(|e| io_err(path, e))
    }
}

impl Drop for MaskSpill {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.spill_path);
    }
}

#[cfg(test)]
mod spill_tests {
    use super::*;

    #[test]
    fn spilled_masks_read_back_like_serialized_ones() {
        let dir = tempfile::tempdir().unwrap();
        let a = Mask::from_fn(5, 3, |i, j| (i + j) % 2 == 0).unwrap();
        let b = Mask::from_fn(8, 2, |i, _| i < 3).unwrap();
        let spill_path = dir.path().join("spill");
        let mut spill = MaskSpill::create(&spill_path).unwrap();
        spill.push("x.weight", &a).unwrap();
        spill.push("a.weight", &b).unwrap();
        assert!(spill.push("a.weight", &b).is_err());
        let out = dir.path().join("masks.safetensors");
        spill.finish(&out).unwrap();
        assert!(!spill_path.exists());
        let back = read_masks(&out).unwrap();
        assert_eq!(back["x.weight"], a);
        assert_eq!(back["a.weight"], b);
    }
}
