//! Every pruner through the calibration seam on the tiny InstructBLIP-LLaMA fixtures (with and
//! without grouped-query attention): exact sparsity or exact N:M on every LLaMA linear, nothing
//! else changed, embeddings and `lm_head` never pruned.

use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::backend::Flex;
use burn::prelude::*;
use ressa_models::prunable::{BlockOptions, CalibrationSample};
use ressa_models::weights::export_tensors;
use ressa_models::{InstructBlipLlama, Pretrained, VisionLanguageModel, VlmInputs};
use ressa_prune::Method;
use ressa_prune::calibrate::{
    Allocation, CalibrationConfig, Propagation, TowerSparsity, calibrate_and_prune,
};
use ressa_sparse::SparsityPattern;
use safetensors::SafeTensors;

type B = Flex;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

fn int2(st: &SafeTensors, key: &str) -> Tensor<B, 2, Int> {
    let t = st.tensor(key).unwrap();
    let v: Vec<i64> = t
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    Tensor::from_data(TensorData::new(v, t.shape().to_vec()), &Default::default())
}

fn load(name: &str) -> (InstructBlipLlama<B>, Vec<CalibrationSample<B>>) {
    let model = Pretrained::<B, InstructBlipLlama<B>>::load(&fixture(name), &Default::default())
        .unwrap()
        .model;
    let bytes = std::fs::read(fixture(name).join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("pixel_values").unwrap();
    let px: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let input_ids = int2(&st, "input_ids");
    let sample = CalibrationSample {
        inputs: VlmInputs {
            pixel_values: Tensor::from_data(
                TensorData::new(px, t.shape().to_vec()),
                &Default::default(),
            ),
            qformer_text: Some((
                int2(&st, "qformer_input_ids"),
                int2(&st, "qformer_attention_mask").float(),
            )),
            input_ids,
            attention_mask: int2(&st, "attention_mask").float(),
        },
        targets: Vec::new(),
    };
    (model, vec![sample])
}

fn tensors(model: &InstructBlipLlama<B>) -> BTreeMap<String, Vec<f32>> {
    export_tensors(model, model.param_keys())
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.to_f32()))
        .collect()
}

#[test]
fn every_pruner_runs_on_llama_with_exact_sparsity() {
    for (name, patterns) in [
        (
            "instructblip-llama-gqa",
            vec![SparsityPattern::Unstructured, SparsityPattern::TWO_FOUR],
        ),
        (
            "instructblip-llama-mha",
            vec![SparsityPattern::Unstructured],
        ),
    ] {
        for method in [
            Method::Magnitude,
            Method::Wanda,
            Method::SparseGpt,
            Method::Dsnot,
        ] {
            for &pattern in &patterns {
                let (mut model, samples) = load(name);
                let before = tensors(&model);
                let cfg = CalibrationConfig {
                    method,
                    pattern,
                    sparsity: TowerSparsity {
                        vision: 0.0,
                        qformer: 0.0,
                        language: 0.5,
                    },
                    allocation: Allocation::Uniform,
                    propagation: Propagation::Pruned,
                    wanda_group: None,
                    dsnot: None,
                    block: BlockOptions::default(),
                };
                let result =
                    calibrate_and_prune(&mut model, &samples, &cfg, &mut |_, _, _| {}).unwrap();
                let what = format!("{name} {method} {pattern}");
                let layers = model.language_model.layers.len();
                assert_eq!(result.masks.len(), 7 * layers, "{what}");
                let after = tensors(&model);
                for (key, values) in &after {
                    match result.masks.get(key) {
                        None => assert_eq!(values, &before[key], "{what}: {key} must be untouched"),
                        Some(mask) => {
                            assert!(
                                key.starts_with("language_model.model.layers."),
                                "{what}: {key}"
                            );
                            let (d_in, d_out) = mask.shape();
                            for o in 0..d_out {
                                for i in 0..d_in {
                                    if !mask.get(i, o).unwrap() {
                                        assert_eq!(values[o * d_in + i], 0.0, "{what}: {key}");
                                    }
                                }
                            }
                            match pattern {
                                SparsityPattern::NM { n, m } => {
                                    assert!(ressa_sparse::is_n_m(mask, n, m), "{what}: {key}")
                                }
                                SparsityPattern::Unstructured => {
                                    assert_eq!(
                                        mask.count_pruned(),
                                        d_in / 2 * d_out,
                                        "{what}: {key}"
                                    )
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
