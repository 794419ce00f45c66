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
    safetensors::tensor::serialize(views, Some(metadata)).map_err(format_err)
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
    deserialize_masks(&bytes)
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
