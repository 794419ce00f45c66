//! Training correctness independent of any framework: the autodiff gradients of the task loss
//! on the tiny InstructBLIP-T5 fixture equal central finite differences, along the whole path
//! from the image to the logits (ViT, Q-Former cross-attention, projection, T5).

use std::path::PathBuf;

use burn::backend::Autodiff;
use burn::module::Param;
use burn::prelude::*;
use ressa_models::vlm::teacher_forced;
use ressa_models::{InstructBlipT5, Pretrained, VlmInputs};
use ressa_train::distill::cross_entropy;
use safetensors::SafeTensors;

/// Flex, or CUDA with the `test-cuda` feature (`scripts/gpu_check.sh`).
#[cfg(not(feature = "test-cuda"))]
type Inner = burn::backend::Flex;
#[cfg(feature = "test-cuda")]
type Inner = burn::backend::Cuda;
type AD = Autodiff<Inner>;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/instructblip-t5-a")
}

fn read<const D: usize, K: burn::tensor::TensorKind<AD> + burn::tensor::BasicOps<AD>>(
    st: &SafeTensors,
    key: &str,
) -> Tensor<AD, D, K> {
    let t = st.tensor(key).unwrap();
    let data = match t.dtype() {
        safetensors::Dtype::F32 => TensorData::new(
            t.data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect::<Vec<_>>(),
            t.shape().to_vec(),
        ),
        _ => TensorData::new(
            t.data()
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect::<Vec<_>>(),
            t.shape().to_vec(),
        ),
    };
    Tensor::from_data(data, &Default::default())
}

type Model = InstructBlipT5<AD>;
type Get = fn(&Model) -> Tensor<AD, 2>;
type Set = fn(&mut Model, Tensor<AD, 2>);

#[test]
fn autodiff_gradients_equal_finite_differences() {
    let device = Default::default();
    let model = Pretrained::<AD, Model>::load(&fixture(), &device)
        .unwrap()
        .model;
    let bytes = std::fs::read(fixture().join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let inputs = VlmInputs {
        pixel_values: read::<4, burn::tensor::Float>(&st, "pixel_values"),
        qformer_text: Some((
            read::<2, Int>(&st, "qformer_input_ids"),
            read::<2, Int>(&st, "qformer_attention_mask").float(),
        )),
        input_ids: read::<2, Int>(&st, "input_ids"),
        attention_mask: read::<2, Int>(&st, "attention_mask").float(),
    };
    let dec: Tensor<AD, 2, Int> = read::<2, Int>(&st, "decoder_input_ids");
    // Targets: the reference's decoder ids (any valid ids will do); the model shifts them
    // right behind the decoder start token.
    let [b, t] = dec.dims();
    let flat: Vec<i64> = dec.into_data().convert::<i64>().into_vec().unwrap();
    let targets: Vec<Vec<u32>> = (0..b)
        .map(|r| flat[r * t..(r + 1) * t].iter().map(|&v| v as u32).collect())
        .collect();
    let loss_of = |m: &Model| -> f64 {
        let tf = teacher_forced(m, &inputs, &targets).unwrap();
        let l: f32 = cross_entropy(tf.logits, tf.targets, tf.mask).into_scalar();
        l as f64
    };
    let tf = teacher_forced(&model, &inputs, &targets).unwrap();
    let grads = cross_entropy(tf.logits, tf.targets, tf.mask).backward();
    let weights: [(&str, Get, Set); 4] = [
        (
            "vision qkv",
            |m| m.vision_model.layers[0].self_attn.qkv.weight.val(),
            |m, w| m.vision_model.layers[0].self_attn.qkv.weight = Param::from_tensor(w),
        ),
        (
            "Q-Former cross-attention value",
            |m| {
                m.qformer.layers[0]
                    .crossattention
                    .as_ref()
                    .unwrap()
                    .value
                    .weight
                    .val()
            },
            |m, w| {
                m.qformer.layers[0]
                    .crossattention
                    .as_mut()
                    .unwrap()
                    .value
                    .weight = Param::from_tensor(w)
            },
        ),
        (
            "language projection",
            |m| m.language_projection.weight.val(),
            |m, w| m.language_projection.weight = Param::from_tensor(w),
        ),
        (
            "T5 encoder q",
            |m| {
                m.language_model.encoder.blocks[0]
                    .self_attention
                    .q
                    .weight
                    .val()
            },
            |m, w| {
                m.language_model.encoder.blocks[0].self_attention.q.weight = Param::from_tensor(w)
            },
        ),
    ];
    for (name, get, set) in weights {
        let w = get(&model);
        let g: Vec<f32> = w.grad(&grads).unwrap().into_data().into_vec().unwrap();
        let values: Vec<f32> = w.clone().inner().into_data().into_vec().unwrap();
        let dims = w.dims();
        let mut order: Vec<usize> = (0..g.len()).collect();
        order.sort_by(|a, b| g[*b].abs().total_cmp(&g[*a].abs()));
        for &i in order.iter().take(3) {
            let eps = 1e-2f32;
            let shifted = |d: f32| {
                let mut v = values.clone();
                v[i] += d;
                let mut m = model.clone();
                set(&mut m, Tensor::from_data(TensorData::new(v, dims), &device));
                loss_of(&m)
            };
            let fd = (shifted(eps) - shifted(-eps)) / (2.0 * eps as f64);
            let rel = (g[i] as f64 - fd).abs() / fd.abs().max(1e-3);
            assert!(
                rel < 0.05,
                "{name}[{i}]: autodiff {} vs finite difference {fd} ({rel:.3} relative)",
                g[i]
            );
        }
    }
}
