//! Shared helpers for the parity tests: the fixture directories and their reference tensors.
#![allow(dead_code)]

use std::path::PathBuf;

#[cfg(not(any(feature = "test-ndarray", feature = "test-cuda")))]
use burn::backend::Flex;
use burn::prelude::*;
use safetensors::{Dtype, SafeTensors};

/// The backend the parity tests run on: Flex, burn-ndarray with the `test-ndarray` feature, or
/// CUDA with `test-cuda` (`scripts/gpu_check.sh`).
#[cfg(not(any(feature = "test-ndarray", feature = "test-cuda")))]
pub type B = Flex;
#[cfg(not(any(feature = "test-ndarray", feature = "test-cuda")))]
pub type Dev = burn::backend::flex::FlexDevice;
#[cfg(all(feature = "test-ndarray", not(feature = "test-cuda")))]
pub type B = burn::backend::NdArray;
#[cfg(all(feature = "test-ndarray", not(feature = "test-cuda")))]
pub type Dev = burn::backend::ndarray::NdArrayDevice;
#[cfg(feature = "test-cuda")]
pub type B = burn::backend::Cuda;
#[cfg(feature = "test-cuda")]
pub type Dev = burn::backend::cuda::CudaDevice;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

/// `reference.safetensors` of a fixture, read eagerly (it is small).
pub struct Reference {
    bytes: Vec<u8>,
}

impl Reference {
    pub fn open(name: &str) -> Self {
        let path = fixture(name).join("reference.safetensors");
        Self {
            bytes: std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        }
    }

    pub fn has(&self, key: &str) -> bool {
        SafeTensors::deserialize(&self.bytes)
            .unwrap()
            .tensor(key)
            .is_ok()
    }

    pub fn shape(&self, key: &str) -> Vec<usize> {
        SafeTensors::deserialize(&self.bytes)
            .unwrap()
            .tensor(key)
            .unwrap()
            .shape()
            .to_vec()
    }

    pub fn f32(&self, key: &str) -> (Vec<usize>, Vec<f32>) {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st
            .tensor(key)
            .unwrap_or_else(|_| panic!("reference has no `{key}`"));
        assert_eq!(t.dtype(), Dtype::F32, "{key}");
        let data = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        (t.shape().to_vec(), data)
    }

    pub fn i64(&self, key: &str) -> (Vec<usize>, Vec<i64>) {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st
            .tensor(key)
            .unwrap_or_else(|_| panic!("reference has no `{key}`"));
        assert_eq!(t.dtype(), Dtype::I64, "{key}");
        let data = t
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        (t.shape().to_vec(), data)
    }

    pub fn float<const D: usize>(&self, key: &str, device: &Dev) -> Tensor<B, D> {
        let (shape, data) = self.f32(key);
        Tensor::from_data(TensorData::new(data, shape), device)
    }

    pub fn int2(&self, key: &str, device: &Dev) -> Tensor<B, 2, Int> {
        let (shape, data) = self.i64(key);
        Tensor::from_data(TensorData::new(data, shape), device)
    }

    /// Rows of an i64 [B, L] tensor.
    pub fn rows(&self, key: &str) -> Vec<Vec<u32>> {
        let (shape, data) = self.i64(key);
        data.chunks(shape[1])
            .map(|r| r.iter().map(|&x| x as u32).collect())
            .collect()
    }
}

/// Max |a - b| between a burn tensor and reference values, with a shape check.
pub fn max_abs_diff<const D: usize>(ours: Tensor<B, D>, reference: &(Vec<usize>, Vec<f32>)) -> f32 {
    assert_eq!(ours.dims().to_vec(), reference.0, "shape");
    let ours = ours.into_data().convert::<f32>().into_vec::<f32>().unwrap();
    ours.iter()
        .zip(&reference.1)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

/// One stored tensor exactly as a checkpoint holds it: the file, dtype, shape and raw bytes.
pub type RawTensor = (String, Dtype, Vec<usize>, Vec<u8>);

/// Every tensor of an HF model directory (`model.safetensors`, or the shards its index names),
/// read with the `safetensors` crate alone, so a comparison does not go through ressa's reader.
pub fn raw_tensors(dir: &std::path::Path) -> std::collections::BTreeMap<String, RawTensor> {
    let index = dir.join("model.safetensors.index.json");
    let files: std::collections::BTreeSet<String> = if index.exists() {
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
        json["weight_map"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    } else {
        ["model.safetensors".to_string()].into()
    };
    let mut out = std::collections::BTreeMap::new();
    for file in files {
        let path = dir.join(&file);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for (name, t) in st.tensors() {
            let entry = (
                file.clone(),
                t.dtype(),
                t.shape().to_vec(),
                t.data().to_vec(),
            );
            assert!(
                out.insert(name.clone(), entry).is_none(),
                "{name} stored twice"
            );
        }
    }
    out
}
