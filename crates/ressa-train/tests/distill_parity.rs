//! RESSA's loss terms against PyTorch's `cross_entropy` / `kl_div` on fixture logits
//! (`scripts/make_train_fixtures.py`): CE, the reference's batchmean KL over all positions and
//! our pad-masked token-mean KL·T², at T = 1 and 2, within 1e-6 relative.

use std::path::PathBuf;

use burn::prelude::*;
use ressa_train::distill::{cross_entropy, distill_loss, kl_divergence};
use ressa_train::{DistillConfig, KlReduction};
use safetensors::SafeTensors;

/// Flex, or CUDA with the `test-cuda` feature (`scripts/gpu_check.sh`).
#[cfg(not(feature = "test-cuda"))]
type B = burn::backend::Flex;
#[cfg(feature = "test-cuda")]
type B = burn::backend::Cuda;

fn read(st: &SafeTensors, key: &str) -> (Vec<usize>, Vec<f64>) {
    let t = st.tensor(key).unwrap();
    let v = match t.dtype() {
        safetensors::Dtype::F32 => t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        safetensors::Dtype::F64 => t
            .data()
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        safetensors::Dtype::I64 => t
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        d => panic!("{key}: {d:?}"),
    };
    (t.shape().to_vec(), v)
}

fn close(name: &str, got: f32, want: f64) {
    let rel = (got as f64 - want).abs() / want.abs().max(1e-12);
    assert!(
        rel <= 1e-6,
        "{name}: {got} vs PyTorch {want} (relative {rel:e})"
    );
}

#[test]
fn loss_terms_match_pytorch() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/train/distill.safetensors");
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let device = Default::default();
    let f3 = |k: &str| {
        let (s, v) = read(&st, k);
        let v: Vec<f32> = v.into_iter().map(|x| x as f32).collect();
        Tensor::<B, 3>::from_data(TensorData::new(v, [s[0], s[1], s[2]]), &device)
    };
    let student = f3("student");
    let teacher = f3("teacher");
    let (s, t) = read(&st, "targets");
    let targets = Tensor::<B, 2, Int>::from_data(
        TensorData::new(
            t.iter().map(|&x| x as i64).collect::<Vec<_>>(),
            [s[0], s[1]],
        ),
        &device,
    );
    let (s, m) = read(&st, "mask");
    let mask = Tensor::<B, 2>::from_data(
        TensorData::new(
            m.iter().map(|&x| x as f32).collect::<Vec<_>>(),
            [s[0], s[1]],
        ),
        &device,
    );
    let want = |k: &str| read(&st, k).1[0];
    let ce: f32 = cross_entropy(student.clone(), targets.clone(), mask.clone()).into_scalar();
    close("ce", ce, want("ce"));
    for t in [1.0, 2.0] {
        for (reduction, key) in [
            (
                KlReduction::Reference,
                format!("kl_reference_t{}", t as i32),
            ),
            (
                KlReduction::TokenMean,
                format!("kl_token_mean_t{}", t as i32),
            ),
        ] {
            let cfg = DistillConfig {
                lambda: 0.1,
                temperature: t,
                reduction,
            };
            let kl: f32 =
                kl_divergence(student.clone(), teacher.clone(), mask.clone(), &cfg).into_scalar();
            close(&key, kl, want(&key));
            let loss: f32 = distill_loss(
                student.clone(),
                teacher.clone(),
                targets.clone(),
                mask.clone(),
                &cfg,
            )
            .loss
            .into_scalar();
            close(
                &format!("loss {key}"),
                loss,
                0.9 * want("ce") + 0.1 * want(&key),
            );
        }
    }
}
