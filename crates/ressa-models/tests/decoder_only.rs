//! The decoder-only (LLaMA) language model behind the pruning seam: its layers are one stack of
//! prunable blocks whose tapped runs reproduce the forward pass.

mod common;

use burn::prelude::*;
use common::{B, Dev, Reference, fixture};
use ressa_models::prunable::{BlockOptions, CalibrationSample, Prunable, Tower};
use ressa_models::{Pretrained, VlmInputs};

fn sample(name: &str, device: &Dev) -> CalibrationSample<B> {
    let r = Reference::open(name);
    let qmask: Tensor<B, 2, Int> = r.int2("qformer_attention_mask", device);
    let mask: Tensor<B, 2, Int> = r.int2("attention_mask", device);
    let input_ids = r.int2("input_ids", device);
    CalibrationSample {
        inputs: VlmInputs {
            pixel_values: r.float("pixel_values", device),
            qformer_text: Some((r.int2("qformer_input_ids", device), qmask.float())),
            input_ids: input_ids.clone(),
            attention_mask: mask.float(),
        },
        decoder_input_ids: input_ids,
    }
}

#[test]
fn llama_layers_are_a_prunable_stack_reproducing_the_logits() {
    let device = Default::default();
    for name in ["instructblip-llama-gqa", "instructblip-llama-mha"] {
        let mut model = Pretrained::<B>::load(&fixture(name), &device)
            .unwrap()
            .model;
        let sample = sample(name, &device);
        let logits = model.decoder_only_logits(&sample.inputs).unwrap();
        let stacks = model.stacks();
        assert_eq!(stacks.len(), 3, "{name}");
        let lm = &stacks[2];
        assert_eq!(
            (lm.tower, lm.prefix),
            (Tower::Language, "language_model.model.layers")
        );
        let mut input = model.stack_input(2, &sample);
        for b in 0..lm.blocks {
            let mut tapped: Vec<String> = Vec::new();
            let mut tap = |names: &[&str], _: &Tensor<B, 3>| {
                tapped.extend(names.iter().map(|s| s.to_string()))
            };
            let out = model.run_block(2, b, &input, BlockOptions::default(), &mut tap);
            input = input.with_hidden(out);
            let mut linears: Vec<String> = model
                .block_linears_mut(2, b)
                .into_iter()
                .map(|(n, _)| n)
                .collect();
            tapped.sort();
            linears.sort();
            assert_eq!(tapped, linears, "{name} layer {b}");
            assert_eq!(linears.len(), 7);
        }
        let llama = model.language_model.as_llama().unwrap();
        let ours = llama.lm_logits(llama.norm.forward(input.hidden().clone()));
        let diff: f32 = (ours - logits).abs().max().into_scalar();
        assert!(diff < 1e-5, "{name}: {diff}");
    }
}
