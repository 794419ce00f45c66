//! The decoder-only (LLaMA) language model behind the pruning seam: its layers are one stack of
//! prunable blocks whose tapped runs reproduce the forward pass.

mod common;

use burn::prelude::*;
use common::{B, Dev, Reference, fixture};
use ressa_models::instructblip::BlipStack;
use ressa_models::linear::Linear;
use ressa_models::prunable::{BlockOptions, CalibrationSample, Prunable, Tower};
use ressa_models::vlm::logits;
use ressa_models::{InstructBlipLlama, Pretrained, VlmInputs};

fn sample(name: &str, device: &Dev) -> CalibrationSample<B> {
    let r = Reference::open(name);
    let qmask: Tensor<B, 2, Int> = r.int2("qformer_attention_mask", device);
    let mask: Tensor<B, 2, Int> = r.int2("attention_mask", device);
    CalibrationSample {
        inputs: VlmInputs {
            pixel_values: r.float("pixel_values", device),
            qformer_text: Some((r.int2("qformer_input_ids", device), qmask.float())),
            input_ids: r.int2("input_ids", device),
            attention_mask: mask.float(),
        },
        targets: Vec::new(),
    }
}

#[test]
fn llama_layers_are_a_prunable_stack_reproducing_the_logits() {
    let device = Default::default();
    for name in ["instructblip-llama-gqa", "instructblip-llama-mha"] {
        let model = Pretrained::<B, InstructBlipLlama<B>>::load(&fixture(name), &device)
            .unwrap()
            .model;
        let sample = sample(name, &device);
        let logits = logits(&model, &sample.inputs, None).unwrap();
        let stacks = model.stacks();
        assert_eq!(stacks.len(), 3, "{name}");
        let lm = &stacks[2];
        assert_eq!(
            (lm.tower, lm.name.as_str()),
            (Tower::Language, "language_model.model.layers")
        );
        assert!(matches!(lm.id, BlipStack::Language(_)));
        let mut ctx = model.context(&sample).unwrap();
        let options = BlockOptions::default();
        let mut last = None;
        for stack in &stacks {
            let mut input = model.stack_input(stack.id, &ctx).unwrap();
            let mut hidden = None;
            for b in 0..stack.blocks {
                let mut tapped: Vec<String> = Vec::new();
                let mut tap = |linears: &[&Linear<B>], _: &Tensor<B, 3>| {
                    tapped.extend(linears.iter().map(|l| l.key.to_string()))
                };
                let out = model
                    .run_block(stack.id, b, &input, options, &mut tap)
                    .unwrap();
                input = model.with_hidden(input, out.clone());
                hidden = Some(out);
                let mut linears: Vec<String> = model
                    .block_linears(stack.id, b)
                    .into_iter()
                    .map(|l| l.key.to_string())
                    .collect();
                tapped.sort();
                tapped.dedup();
                linears.sort();
                assert_eq!(tapped, linears, "{name} {:?} block {b}", stack.id);
                if stack.tower == Tower::Language {
                    assert_eq!(linears.len(), 7);
                }
            }
            let hidden = hidden.unwrap();
            model
                .end_stack(stack.id, hidden.clone(), &mut ctx, options)
                .unwrap();
            last = Some(hidden);
        }
        let llama = &model.language_model;
        let ours = llama.lm_logits(llama.norm.forward(last.unwrap()));
        let diff: f32 = (ours - logits).abs().max().into_scalar();
        assert!(diff < 1e-5, "{name}: {diff}");
    }
}
