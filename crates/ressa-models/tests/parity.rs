//! Parity with HF `transformers` on tiny random checkpoints written by
//! `scripts/make_model_fixtures.py`: vision, Q-Former, projection, encoder and logits to 1e-4,
//! and greedy / beam generation token for token.

mod common;

use burn::prelude::*;
use common::{B, Dev, Reference, fixture, max_abs_diff};
use ressa_models::generate::{GenerationConfig, generate};
use ressa_models::vlm::logits;
use ressa_models::{InstructBlipLlama, InstructBlipT5, Pretrained, VisionLanguageModel, VlmInputs};

const FIXTURES: [&str; 4] = [
    "instructblip-t5-a",
    "instructblip-t5-b",
    "blip2-t5",
    // `shared`, both `embed_tokens` and `lm_head` stored apart, all different.
    "instructblip-t5-untied",
];
/// InstructBLIP with a LLaMA language model, with and without grouped-query attention.
const LLAMA_FIXTURES: [&str; 2] = ["instructblip-llama-gqa", "instructblip-llama-mha"];
const TOL: f32 = 1e-4;

fn inputs(r: &Reference, device: &Dev) -> VlmInputs<B> {
    let qformer_text = r.has("qformer_input_ids").then(|| {
        let mask: Tensor<B, 2, Int> = r.int2("qformer_attention_mask", device);
        (r.int2("qformer_input_ids", device), mask.float())
    });
    let mask: Tensor<B, 2, Int> = r.int2("attention_mask", device);
    VlmInputs {
        pixel_values: r.float("pixel_values", device),
        qformer_text,
        input_ids: r.int2("input_ids", device),
        attention_mask: mask.float(),
    }
}

#[test]
fn intermediate_outputs_and_logits_match_transformers() {
    let device = Default::default();
    for name in FIXTURES {
        let model = Pretrained::<B, InstructBlipT5<B>>::load(&fixture(name), &device)
            .unwrap()
            .model;
        let r = Reference::open(name);
        let inputs = inputs(&r, &device);
        let enc = model.encode(&inputs).unwrap();
        let lm_input = model.lm_input(&inputs).unwrap();
        let hidden = model
            .language_model
            .encoder
            .encode(lm_input.embeds, lm_input.mask);
        let q = model.query_tokens.dims()[1];
        let checks = [
            (
                "vision_last_hidden_state",
                max_abs_diff(enc.vision.clone(), &r.f32("vision_last_hidden_state")),
            ),
            (
                "qformer_last_hidden_state",
                max_abs_diff(enc.qformer.clone(), &r.f32("qformer_last_hidden_state")),
            ),
            (
                "language_model_inputs",
                max_abs_diff(
                    enc.language_model_inputs.clone(),
                    &r.f32("language_model_inputs"),
                ),
            ),
            (
                "encoder_last_hidden_state",
                max_abs_diff(hidden, &r.f32("encoder_last_hidden_state")),
            ),
        ];
        for (what, diff) in checks {
            eprintln!("{name}: {what} max abs diff {diff:.2e}");
            assert!(diff <= TOL, "{name}: {what} differs by {diff}");
        }
        let logits = logits(&model, &inputs, Some(r.int2("decoder_input_ids", &device))).unwrap();
        let diff = max_abs_diff(logits, &r.f32("logits"));
        eprintln!("{name}: logits max abs diff {diff:.2e}");
        assert!(diff <= TOL, "{name}: logits differ by {diff}");
        assert!(q > 0);
    }
}

#[test]
fn decoder_only_logits_match_transformers() {
    let device = Default::default();
    for name in LLAMA_FIXTURES {
        let model = Pretrained::<B, InstructBlipLlama<B>>::load(&fixture(name), &device)
            .unwrap()
            .model;
        let r = Reference::open(name);
        let inputs = inputs(&r, &device);
        let enc = model.encode(&inputs).unwrap();
        let checks = [
            (
                "vision_last_hidden_state",
                max_abs_diff(enc.vision.clone(), &r.f32("vision_last_hidden_state")),
            ),
            (
                "qformer_last_hidden_state",
                max_abs_diff(enc.qformer.clone(), &r.f32("qformer_last_hidden_state")),
            ),
            (
                "language_model_inputs",
                max_abs_diff(
                    enc.language_model_inputs.clone(),
                    &r.f32("language_model_inputs"),
                ),
            ),
            (
                "logits",
                max_abs_diff(logits(&model, &inputs, None).unwrap(), &r.f32("logits")),
            ),
        ];
        for (what, diff) in checks {
            eprintln!("{name}: {what} max abs diff {diff:.2e}");
            assert!(diff <= TOL, "{name}: {what} differs by {diff}");
        }
    }
}

#[test]
fn decoder_only_generation_matches_transformers() {
    let device = Default::default();
    for name in LLAMA_FIXTURES {
        let pretrained =
            Pretrained::<B, InstructBlipLlama<B>>::load(&fixture(name), &device).unwrap();
        let r = Reference::open(name);
        let inputs = inputs(&r, &device);
        for cfg in generation_settings(name) {
            let (key, cfg) = cfg;
            let ours = generate(&pretrained.model, &inputs, &cfg).unwrap().rows;
            eprintln!("{name}: {key} -> {ours:?}");
            assert_eq!(ours, r.rows(&key), "{name}: {key}");
        }
    }
}

/// The `generate` settings a fixture's `reference.json` lists, keyed by reference tensor.
fn generation_settings(name: &str) -> Vec<(String, GenerationConfig)> {
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture(name).join("reference.json")).unwrap(),
    )
    .unwrap();
    json["generate"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["key"].as_str().unwrap().to_string(),
                GenerationConfig {
                    num_beams: g["num_beams"].as_u64().unwrap() as usize,
                    max_new_tokens: g["max_new_tokens"].as_u64().unwrap() as usize,
                    min_new_tokens: g["min_new_tokens"].as_u64().unwrap() as usize,
                    length_penalty: g["length_penalty"].as_f64().unwrap() as f32,
                    early_stopping: false,
                    repetition_penalty: g["repetition_penalty"].as_f64().unwrap() as f32,
                },
            )
        })
        .collect()
}

#[test]
fn generation_matches_transformers() {
    let device = Default::default();
    for name in FIXTURES {
        let pretrained = Pretrained::<B, InstructBlipT5<B>>::load(&fixture(name), &device).unwrap();
        let r = Reference::open(name);
        let inputs = inputs(&r, &device);
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture(name).join("reference.json")).unwrap(),
        )
        .unwrap();
        for g in json["generate"].as_array().unwrap() {
            let cfg = GenerationConfig {
                num_beams: g["num_beams"].as_u64().unwrap() as usize,
                max_new_tokens: g["max_new_tokens"].as_u64().unwrap() as usize,
                min_new_tokens: g["min_new_tokens"].as_u64().unwrap() as usize,
                length_penalty: g["length_penalty"].as_f64().unwrap() as f32,
                early_stopping: false,
                repetition_penalty: g["repetition_penalty"].as_f64().unwrap() as f32,
            };
            let key = g["key"].as_str().unwrap();
            let ours = generate(&pretrained.model, &inputs, &cfg).unwrap().rows;
            eprintln!("{name}: {key} -> {ours:?}");
            assert_eq!(ours, r.rows(key), "{name}: {key}");
        }
    }
}
