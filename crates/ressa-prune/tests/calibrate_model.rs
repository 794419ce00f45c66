//! Calibration on the tiny InstructBLIP fixtures: the block-by-block seam reproduces the model's
//! forward, every pruned linear gets exactly the requested sparsity, everything else is left
//! bit-identical, and bad settings fail with the layer named.

use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::backend::Flex;
use burn::prelude::*;
use ressa_models::instructblip::BlipStack;
use ressa_models::linear::Linear;
use ressa_models::nn::{host_ids, no_tap};
use ressa_models::prunable::{BlockOptions, CalibrationSample, Prunable};
use ressa_models::t5::T5StackId;
use ressa_models::vlm::logits;
use ressa_models::weights::export_tensors;
use ressa_models::{InstructBlipT5, Pretrained, VisionLanguageModel, VlmInputs};
use ressa_prune::calibrate::{
    Allocation, CalibrationConfig, Propagation, TowerSparsity, calibrate_and_prune,
};
use ressa_prune::{Method, OwlConfig};
use ressa_sparse::SparsityPattern;
use safetensors::SafeTensors;

type B = Flex;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

fn tensor_f32<const D: usize>(st: &SafeTensors, key: &str) -> Tensor<B, D> {
    let t = st.tensor(key).unwrap();
    let v: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    Tensor::from_data(TensorData::new(v, t.shape().to_vec()), &Default::default())
}

fn tensor_i64(st: &SafeTensors, key: &str) -> Tensor<B, 2, Int> {
    let t = st.tensor(key).unwrap();
    let v: Vec<i64> = t
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    Tensor::from_data(TensorData::new(v, t.shape().to_vec()), &Default::default())
}

/// Targets whose teacher forcing `[start] + target[..-1]` is the fixture's
/// `decoder_input_ids` (the last target token is never read; eos stands in).
fn targets_of(decoder_input_ids: Tensor<B, 2, Int>) -> Vec<Vec<u32>> {
    host_ids(decoder_input_ids)
        .into_iter()
        .map(|r| {
            let mut t = r[1..].to_vec();
            t.push(1);
            t
        })
        .collect()
}

/// The fixture's reference inputs as one calibration sample (batch 2, with padding).
fn load(name: &str) -> (InstructBlipT5<B>, Vec<CalibrationSample<B>>) {
    let model = Pretrained::<B, InstructBlipT5<B>>::load(&fixture(name), &Default::default())
        .unwrap()
        .model;
    let bytes = std::fs::read(fixture(name).join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let qformer_text = st.tensor("qformer_input_ids").ok().map(|_| {
        (
            tensor_i64(&st, "qformer_input_ids"),
            tensor_i64(&st, "qformer_attention_mask").float(),
        )
    });
    let sample = CalibrationSample {
        inputs: VlmInputs {
            pixel_values: tensor_f32(&st, "pixel_values"),
            qformer_text,
            input_ids: tensor_i64(&st, "input_ids"),
            attention_mask: tensor_i64(&st, "attention_mask").float(),
        },
        targets: targets_of(tensor_i64(&st, "decoder_input_ids")),
    };
    (model, vec![sample])
}

fn max_diff<const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
    (a - b).abs().max().into_scalar()
}

#[test]
fn block_by_block_runs_reproduce_the_forward_and_tap_every_linear() {
    for name in ["instructblip-t5-a", "instructblip-t5-b", "blip2-t5"] {
        let (model, samples) = load(name);
        let sample = &samples[0];
        let enc = model.encode(&sample.inputs).unwrap();
        let lm_input = model.lm_input(&sample.inputs).unwrap();
        let hidden = model
            .language_model
            .encoder
            .encode(lm_input.embeds, lm_input.mask);
        let bytes = std::fs::read(fixture(name).join("reference.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let decoder_ids = tensor_i64(&st, "decoder_input_ids");
        let logits = logits(&model, &sample.inputs, Some(decoder_ids)).unwrap();
        let options = BlockOptions::default();
        let mut ctx = model.context(sample).unwrap();
        for stack in model.stacks() {
            let mut input = model.stack_input(stack.id, &ctx).unwrap();
            let mut x = None;
            for b in 0..stack.blocks {
                let mut tapped: Vec<String> = Vec::new();
                let mut tap = |linears: &[&Linear<B>], _: &Tensor<B, 3>| {
                    tapped.extend(linears.iter().map(|l| l.key.to_string()))
                };
                let out = model
                    .run_block(stack.id, b, &input, options, &mut tap)
                    .unwrap();
                input = model.with_hidden(input, out.clone());
                x = Some(out);
                let linears: Vec<String> = model
                    .block_linears(stack.id, b)
                    .into_iter()
                    .map(|l| l.key.to_string())
                    .collect();
                tapped.sort();
                let mut expected = linears.clone();
                expected.sort();
                // The BLIP-2 Q-Former has no text, so its text FFN (if stored) sees nothing.
                expected.retain(|n| {
                    tapped.contains(n)
                        || !(n.ends_with(".intermediate.dense") || n.ends_with(".output.dense"))
                });
                assert_eq!(tapped, expected, "{name} {} block {b}", stack.name);
            }
            let x = x.unwrap();
            let diff = match stack.id {
                BlipStack::Vision => max_diff(
                    model.vision_model.post_layernorm.forward(x.clone()),
                    enc.vision.clone(),
                ),
                BlipStack::QFormer => {
                    let q = model.query_tokens.dims()[1];
                    let [bsz, _, d] = x.dims();
                    max_diff(
                        x.clone().slice([0..bsz, 0..q, 0..d]),
                        enc.qformer.clone().slice([0..bsz, 0..q, 0..d]),
                    )
                }
                BlipStack::Language(T5StackId::Encoder) => max_diff(
                    model
                        .language_model
                        .encoder
                        .final_layer_norm
                        .forward(x.clone()),
                    hidden.clone(),
                ),
                BlipStack::Language(T5StackId::Decoder) => max_diff(
                    model.language_model.lm_logits(
                        model
                            .language_model
                            .decoder
                            .final_layer_norm
                            .forward(x.clone()),
                    ),
                    logits.clone(),
                ),
            };
            assert!(diff < 1e-5, "{name} stack {}: {diff}", stack.name);
            model.end_stack(stack.id, x, &mut ctx, options).unwrap();
        }
    }
}

fn all_tensors(model: &InstructBlipT5<B>) -> BTreeMap<String, Vec<f32>> {
    export_tensors(model, model.param_keys())
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.to_f32()))
        .collect()
}

fn config(method: Method, pattern: SparsityPattern, s: TowerSparsity) -> CalibrationConfig {
    CalibrationConfig {
        method,
        pattern,
        sparsity: s,
        allocation: Allocation::Uniform,
        propagation: Propagation::Pruned,
        wanda_group: None,
        dsnot: None,
        block: BlockOptions::default(),
    }
}

/// Checks exact sparsity of every mask, zeros in the weights, and untouched tensors.
fn check(
    before: &BTreeMap<String, Vec<f32>>,
    model: &InstructBlipT5<B>,
    masks: &BTreeMap<String, ressa_sparse::Mask>,
    pattern: SparsityPattern,
    sparsity: f64,
    what: &str,
) {
    let after = all_tensors(model);
    for (name, values) in &after {
        match masks.get(name) {
            None => assert_eq!(values, &before[name], "{what}: {name} must be untouched"),
            Some(mask) => {
                // Exported weights are PyTorch [d_out, d_in]; masks are burn [d_in, d_out].
                let (d_in, d_out) = mask.shape();
                for i in 0..d_in {
                    for o in 0..d_out {
                        if !mask.get(i, o).unwrap() {
                            assert_eq!(
                                values[o * d_in + i],
                                0.0,
                                "{what}: {name} pruned entry not zero"
                            );
                        }
                    }
                }
                match pattern {
                    SparsityPattern::NM { n, m } => {
                        assert!(
                            ressa_sparse::is_n_m(mask, n, m),
                            "{what}: {name} is not {n}:{m}"
                        )
                    }
                    SparsityPattern::Unstructured => {
                        let expected = (sparsity * mask.len() as f64).floor() as usize;
                        let per_output = (sparsity * d_in as f64).floor() as usize * d_out;
                        let pruned = mask.count_pruned();
                        assert!(
                            pruned == expected || pruned == per_output,
                            "{what}: {name} pruned {pruned}, expected {expected} or {per_output}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn every_method_prunes_exactly_and_leaves_the_rest_bit_identical() {
    let unstructured = TowerSparsity {
        vision: 0.5,
        qformer: 0.3,
        language: 0.7,
    };
    let language_only = TowerSparsity {
        vision: 0.0,
        qformer: 0.0,
        language: 0.5,
    };
    for method in [
        Method::Magnitude,
        Method::Wanda,
        Method::SparseGpt,
        Method::Dsnot,
    ] {
        for (pattern, s) in [
            (SparsityPattern::Unstructured, unstructured),
            (SparsityPattern::TWO_FOUR, language_only),
            (SparsityPattern::NM { n: 4, m: 8 }, language_only),
        ] {
            let (mut model, samples) = load("instructblip-t5-a");
            let before = all_tensors(&model);
            let cfg = config(method, pattern, s);
            let result =
                calibrate_and_prune(&mut model, &samples, &cfg, &mut |_, _, _| {}).unwrap();
            let what = format!("{method} {pattern:?}");
            // vision 2 blocks × 4, qformer 3 layers (2 with cross-attention), T5 2+2 blocks.
            let expected_layers = if s.vision > 0.0 {
                8 + 8 * 3 + 4 * 2 + 7 * 2 + 11 * 2
            } else {
                7 * 2 + 11 * 2
            };
            assert_eq!(result.masks.len(), expected_layers, "{what}");
            for layer in &result.layers {
                assert_eq!(
                    layer.target,
                    if pattern == SparsityPattern::Unstructured {
                        s.of(layer.tower)
                    } else {
                        0.5
                    }
                );
            }
            // Unstructured targets differ per tower; check each mask against its own tower.
            let by_target: BTreeMap<String, f64> = result
                .layers
                .iter()
                .map(|l| (l.name.clone(), l.target))
                .collect();
            for (name, target) in &by_target {
                let one: BTreeMap<String, ressa_sparse::Mask> =
                    [(name.clone(), result.masks[name].clone())].into();
                let mut subset_before = before.clone();
                let after = all_tensors(&model);
                // Only check the mask condition for this layer: treat others as changed-allowed.
                for (k, v) in &after {
                    if result.masks.contains_key(k) && k != name {
                        subset_before.insert(k.clone(), v.clone());
                    }
                }
                check(&subset_before, &model, &one, pattern, *target, &what);
            }
        }
    }
}

#[test]
fn dense_propagation_and_reference_bias_mode_change_only_later_blocks() {
    let s = TowerSparsity {
        vision: 0.0,
        qformer: 0.0,
        language: 0.5,
    };
    let run = |propagation, bias| {
        let (mut model, samples) = load("instructblip-t5-a");
        let mut cfg = config(Method::Wanda, SparsityPattern::Unstructured, s);
        cfg.propagation = propagation;
        cfg.block.t5_position_bias_after_block0 = bias;
        calibrate_and_prune(&mut model, &samples, &cfg, &mut |_, _, _| {})
            .unwrap()
            .masks
    };
    let pruned = run(Propagation::Pruned, true);
    let dense = run(Propagation::Dense, true);
    let faithful = run(Propagation::Pruned, false);
    let block0 = "language_model.encoder.block.0.layer.1.DenseReluDense.wo.weight";
    assert_eq!(pruned[block0].to_bools(), dense[block0].to_bools());
    assert_eq!(pruned[block0].to_bools(), faithful[block0].to_bools());
    let differs = |a: &BTreeMap<String, ressa_sparse::Mask>,
                   b: &BTreeMap<String, ressa_sparse::Mask>| {
        a.iter().any(|(k, m)| m.to_bools() != b[k].to_bools())
    };
    assert!(
        differs(&pruned, &dense),
        "dense propagation must change some later mask"
    );
    assert!(
        differs(&pruned, &faithful),
        "dropping the position bias must change some later mask"
    );
}

#[test]
fn owl_allocates_nonuniform_block_sparsities_with_the_right_mean() {
    let (mut model, samples) = load("instructblip-t5-a");
    let mut cfg = config(
        Method::Wanda,
        SparsityPattern::Unstructured,
        TowerSparsity {
            vision: 0.0,
            qformer: 0.0,
            language: 0.5,
        },
    );
    cfg.allocation = Allocation::Owl(OwlConfig {
        m: 3.0,
        lambda: 0.08,
    });
    let result = calibrate_and_prune(&mut model, &samples, &cfg, &mut |_, _, _| {}).unwrap();
    let mut per_block: BTreeMap<String, f64> = BTreeMap::new();
    for l in &result.layers {
        let block = l.name.split(".layer.").next().unwrap().to_string();
        per_block.insert(block, l.target);
    }
    let enc: Vec<f64> = per_block
        .iter()
        .filter(|(k, _)| k.contains("encoder"))
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(enc.len(), 2);
    assert!(((enc[0] + enc[1]) / 2.0 - 0.5).abs() < 1e-9, "{enc:?}");
    assert!(
        per_block
            .values()
            .all(|&v| (0.42 - 1e-9..=0.58 + 1e-9).contains(&v)),
        "{per_block:?}"
    );
}

#[test]
fn bad_settings_fail_with_the_layer_named() {
    let (mut model, samples) = load("instructblip-t5-a");
    let cfg = config(
        Method::Wanda,
        SparsityPattern::TWO_FOUR,
        TowerSparsity {
            vision: 0.5,
            qformer: 0.0,
            language: 0.0,
        },
    );
    let err = calibrate_and_prune(&mut model, &samples, &cfg, &mut |_, _, _| {})
        .unwrap_err()
        .to_string();
    // The ViT MLP has 37 hidden units: 2:4 cannot tile fc2's input.
    assert!(
        err.contains("vision_model.encoder.layers.0.mlp.fc2.weight"),
        "{err}"
    );
    let cfg = config(
        Method::Wanda,
        SparsityPattern::Unstructured,
        TowerSparsity {
            vision: 1.0,
            qformer: 0.0,
            language: 0.0,
        },
    );
    assert!(
        calibrate_and_prune(&mut model, &samples, &cfg, &mut |_, _, _| {})
            .unwrap_err()
            .to_string()
            .contains("vision sparsity 1")
    );
    let cfg = config(
        Method::SparseGpt,
        SparsityPattern::Unstructured,
        TowerSparsity {
            vision: 0.5,
            qformer: 0.0,
            language: 0.0,
        },
    );
    assert!(
        calibrate_and_prune(&mut model, &[], &cfg, &mut |_, _, _| {})
            .unwrap_err()
            .to_string()
            .contains("needs calibration samples")
    );
    // NaN pixels poison the first linear input.
    let mut bad = samples.clone();
    bad[0].inputs.pixel_values = bad[0].inputs.pixel_values.clone().mul_scalar(f32::NAN);
    let err = calibrate_and_prune(&mut model, &bad, &cfg, &mut |_, _, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("vision_model.encoder.layers.0") && err.contains("non-finite"),
        "{err}"
    );
    let _ = no_tap::<B>;
}
