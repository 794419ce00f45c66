//! Training checkpoints: adapters, optimizer moments and the data position, in
//! `{dir}/step-NNNNNNNN/`, each written to a `.tmp` directory and renamed when complete, so a
//! run killed at any moment leaves only whole checkpoints. Values are stored as f32 bits, so
//! a resumed run continues bit-identically.
//!
//! - `adapters.safetensors`: `{linear}.lora_A` [d_in, r], `{linear}.lora_B` [r, d_out];
//! - `optimizer.safetensors`: `{tensor}.m`, `{tensor}.v` (AdamW moments);
//! - `state.json`: [`TrainState`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};

use crate::error::{Result, TrainError};
use serde::{Deserialize, Serialize};

/// Where training stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: u64,
    /// Epoch of the next batch.
    pub epoch: u64,
    /// Examples of `epoch` already consumed.
    pub position: u64,
    /// Fingerprint of the settings and data the run was started with; a resume with other
    /// settings is refused.
    pub fingerprint: String,
}

/// A host tensor: shape and f32 values.
pub type HostTensor = (Vec<usize>, Vec<f32>);

/// A checkpoint's contents.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub state: TrainState,
    pub adapters: BTreeMap<String, HostTensor>,
    pub moments: BTreeMap<String, HostTensor>,
}

fn err(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::file(path, e)
}

fn write_tensors(path: &Path, tensors: &BTreeMap<String, HostTensor>) -> Result<()> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, (s, v))| {
            (
                n.clone(),
                s.clone(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(n, s, b)| {
            TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| err(path, format!("{n}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let data = safetensors::serialize(views, None).map_err(|e| err(path, e))?;
    std::fs::write(path, data).map_err(|e| err(path, e))
}

fn read_tensors(path: &Path) -> Result<BTreeMap<String, HostTensor>> {
    let data = std::fs::read(path).map_err(|e| err(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&data).map_err(|e| err(path, e))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(err(
                path,
                format!("{name}: dtype {:?}, expected F32", view.dtype()),
            ));
        }
        let values = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.insert(name, (view.shape().to_vec(), values));
    }
    Ok(out)
}

/// The directory of the checkpoint at `step` under `dir`.
pub fn step_dir(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("step-{step:08}"))
}

/// Writes checkpoint `step` atomically and keeps the newest `keep` (≥ 1) checkpoints.
pub fn save(dir: &Path, ckpt: &Checkpoint, keep: usize) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| err(dir, e))?;
    let final_dir = step_dir(dir, ckpt.state.step);
    let tmp = dir.join(format!("step-{:08}.tmp", ckpt.state.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| err(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| err(&tmp, e))?;
    write_tensors(&tmp.join("adapters.safetensors"), &ckpt.adapters)?;
    write_tensors(&tmp.join("optimizer.safetensors"), &ckpt.moments)?;
    let state = tmp.join("state.json");
    std::fs::write(
        &state,
        serde_json::to_vec_pretty(&ckpt.state).expect("json"),
    )
    .map_err(|e| err(&state, e))?;
    // Make the files durable before the rename publishes them.
    for f in [
        "adapters.safetensors",
        "optimizer.safetensors",
        "state.json",
    ] {
        let p = tmp.join(f);
        std::fs::File::open(&p)
            .and_then(|f| f.sync_all())
            .map_err(|e| err(&p, e))?;
    }
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| err(&final_dir, e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| err(&final_dir, e))?;
    let steps = list(dir)?;
    for &old in steps.iter().rev().skip(keep.max(1)) {
        let p = step_dir(dir, old);
        std::fs::remove_dir_all(&p).map_err(|e| err(&p, e))?;
    }
    Ok(final_dir)
}

/// Steps of the complete checkpoints in `dir`, ascending.
pub fn list(dir: &Path) -> Result<Vec<u64>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut steps = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| err(dir, e))? {
        let name = e.map_err(|e| err(dir, e))?.file_name();
        let name = name.to_string_lossy();
        if let Some(n) = name.strip_prefix("step-")
            && let Ok(step) = n.parse::<u64>()
        {
            steps.push(step);
        }
    }
    steps.sort_unstable();
    Ok(steps)
}

/// The newest complete checkpoint in `dir`, if any.
pub fn latest(dir: &Path) -> Result<Option<Checkpoint>> {
    let Some(&step) = list(dir)?.last() else {
        return Ok(None);
    };
    load(&step_dir(dir, step)).map(Some)
}

/// Reads one checkpoint directory.
pub fn load(path: &Path) -> Result<Checkpoint> {
    let state_path = path.join("state.json");
    let state: TrainState =
        serde_json::from_slice(&std::fs::read(&state_path).map_err(|e| err(&state_path, e))?)
            .map_err(|e| err(&state_path, e))?;
    Ok(Checkpoint {
        state,
        adapters: read_tensors(&path.join("adapters.safetensors"))?,
        moments: read_tensors(&path.join("optimizer.safetensors"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ckpt(step: u64) -> Checkpoint {
        let t = |v: f32| (vec![2, 2], vec![v, -v, f32::MIN_POSITIVE, 1.0 / 3.0]);
        Checkpoint {
            state: TrainState {
                step,
                epoch: 1,
                position: 8,
                fingerprint: "abc".into(),
            },
            adapters: BTreeMap::from([("x.lora_A".into(), t(step as f32))]),
            moments: BTreeMap::from([("x.lora_A.m".into(), t(0.5))]),
        }
    }

    #[test]
    fn round_trips_bit_exactly_and_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        for step in 1..=4 {
            save(dir.path(), &ckpt(step), 2).unwrap();
        }
        // A half-written checkpoint is ignored.
        std::fs::create_dir_all(dir.path().join("step-00000009.tmp")).unwrap();
        assert_eq!(list(dir.path()).unwrap(), vec![3, 4]);
        assert_eq!(latest(dir.path()).unwrap().unwrap(), ckpt(4));
    }

    #[test]
    fn a_missing_file_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), &ckpt(1), 1).unwrap();
        std::fs::remove_file(dir.path().join("step-00000001/optimizer.safetensors")).unwrap();
        let e = latest(dir.path()).unwrap_err().to_string();
        assert!(e.contains("optimizer.safetensors"), "{e}");
    }
}
