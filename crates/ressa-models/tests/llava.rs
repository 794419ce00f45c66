//! LLaVA-1.5 parity with HF `transformers` on the tiny random checkpoint written by
//! `scripts/make_llava_fixtures.py`: image features and logits to 1e-4, generation token for
//! token, the registry, the prunable stacks and the processor's `<image>` expansion.

mod common;

use burn::prelude::*;
use common::{B, Dev, Reference, fixture, max_abs_diff};
use ressa_models::generate::{GenerationConfig, generate};
use ressa_models::prunable::{Prunable, Tower, prunable_linears};
use ressa_models::vlm::logits;
use ressa_models::{FamilyConfig, Llava, Pretrained, Processor, VlmInputs};

const NAME: &str = "llava-gqa";
const TOL: f32 = 1e-4;

fn inputs(r: &Reference, device: &Dev) -> VlmInputs<B> {
    let mask: Tensor<B, 2, Int> = r.int2("attention_mask", device);
    VlmInputs {
        pixel_values: r.float("pixel_values", device),
        qformer_text: None,
        input_ids: r.int2("input_ids", device),
        attention_mask: mask.float(),
    }
}

/// Max |a − b| over the positions a row attends to. A left-padded position attends to no key
/// at all; its logits are unspecified (ressa's softmax over fully masked scores and PyTorch's
/// SDPA differ there) and nothing reads them.
fn attended_diff(ours: Tensor<B, 3>, reference: &(Vec<usize>, Vec<f32>), mask: &[Vec<u32>]) -> f32 {
    assert_eq!(ours.dims().to_vec(), reference.0, "shape");
    let [_, l, v] = ours.dims();
    let ours: Vec<f32> = ours.into_data().convert::<f32>().into_vec().unwrap();
    let mut max = 0f32;
    for (b, row) in mask.iter().enumerate() {
        for (p, _) in row.iter().enumerate().filter(|(_, m)| **m != 0) {
            let s = (b * l + p) * v;
            for (a, b) in ours[s..s + v].iter().zip(&reference.1[s..s + v]) {
                max = max.max((a - b).abs());
            }
        }
    }
    max
}

fn load() -> Pretrained<B, Llava<B>> {
    Pretrained::<B, Llava<B>>::load(&fixture(NAME), &Default::default()).unwrap()
}

#[test]
fn image_features_and_logits_match_transformers() {
    let device = Default::default();
    let model = load().model;
    let r = Reference::open(NAME);
    let inputs = inputs(&r, &device);
    let checks = [
        (
            "image_features",
            max_abs_diff(
                model.image_features(&inputs).unwrap(),
                &r.f32("image_features"),
            ),
        ),
        (
            "logits",
            attended_diff(
                logits(&model, &inputs, None).unwrap(),
                &r.f32("logits"),
                &r.rows("attention_mask"),
            ),
        ),
    ];
    for (what, diff) in checks {
        eprintln!("{NAME}: {what} max abs diff {diff:.2e}");
        assert!(diff <= TOL, "{NAME}: {what} differs by {diff}");
    }
}

#[test]
fn generation_matches_transformers() {
    let device = Default::default();
    let model = load().model;
    let r = Reference::open(NAME);
    let inputs = inputs(&r, &device);
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture(NAME).join("reference.json")).unwrap(),
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
        let ours = generate(&model, &inputs, &cfg).unwrap().rows;
        eprintln!("{NAME}: {key} -> {ours:?}");
        assert_eq!(ours, r.rows(key), "{NAME}: {key}");
    }
}

#[test]
fn placeholder_count_must_match_the_image() {
    let device = Default::default();
    let model = load().model;
    let r = Reference::open(NAME);
    let mut inputs = inputs(&r, &device);
    // One placeholder short in every row: the first one replaced by a word.
    let mut rows = r.rows("input_ids");
    for row in &mut rows {
        let p = row.iter().position(|&t| t == 59).unwrap();
        row[p] = 3;
    }
    inputs.input_ids = ressa_models::nn::ids_tensor::<B>(&rows, &device);
    let err = logits(&model, &inputs, None).unwrap_err().to_string();
    assert!(
        err.contains("15 image tokens") && err.contains("16 features"),
        "{err}"
    );
}

#[test]
fn stacks_cover_the_used_clip_layers_and_the_llama() {
    let model = load().model;
    let stacks = model.stacks();
    let names: Vec<(&str, Tower, usize)> = stacks
        .iter()
        .map(|s| (s.name.as_str(), s.tower, s.blocks))
        .collect();
    // vision_feature_layer -2 of 3 layers: the output of layer 1, so layer 2 is unused.
    assert_eq!(
        names,
        vec![
            ("vision_tower.encoder.layers", Tower::Vision, 2),
            ("language_model.model.layers", Tower::Language, 2),
        ]
    );
    let linears = prunable_linears(&model);
    assert_eq!(linears.len(), 2 * 6 + 2 * 7);
    assert!(
        linears
            .iter()
            .all(|(_, l)| !l.key.starts_with("multi_modal_projector"))
    );
    assert_eq!(
        &*linears[0].1.key,
        "vision_tower.encoder.layers.0.self_attn.q_proj"
    );
}

#[test]
fn processor_expands_the_image_token_as_transformers() {
    let device: Dev = Default::default();
    let model = load().model;
    let processor = Processor::for_model(&fixture(NAME), &model).unwrap();
    let r = Reference::open(NAME);
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture(NAME).join("reference.json")).unwrap(),
    )
    .unwrap();
    let prompts: Vec<String> = json["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| format!("<image> {}", p.as_str().unwrap()))
        .collect();
    let images: Vec<Vec<f32>> = (0..2)
        .map(|i| {
            let img =
                ressa_data::image::load_rgb(&fixture(NAME).join(format!("image{i}.png"))).unwrap();
            processor.image.preprocess(&img)
        })
        .collect();
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let ours: VlmInputs<B> = processor.inputs(&images, &refs, None, &device).unwrap();
    let ids = ressa_models::nn::host_ids(ours.input_ids.clone());
    assert_eq!(ids, r.rows("input_ids"));
    assert_eq!(
        ressa_models::nn::host_mask(ours.attention_mask.clone()),
        r.rows("attention_mask")
    );
    // CLIPImageProcessor (PIL): shortest edge to 28, center crop 28×28, on a landscape and a
    // portrait image.
    let diff = max_abs_diff(ours.pixel_values, &r.f32("pixel_values"));
    eprintln!("{NAME}: pixel_values max abs diff {diff:.2e}");
    assert!(diff <= 1e-5, "pixel_values differ by {diff}");
}

/// The fixture rewritten in the older hub layout (`vision_tower.vision_model.*`, as
/// llava-hf/llava-1.5-7b-hf stores it) in a temporary directory.
fn hub_layout_copy(dir: &std::path::Path) {
    let src = fixture(NAME);
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let views: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| match name.strip_prefix("vision_tower.") {
            Some(rest) => (format!("vision_tower.vision_model.{rest}"), view),
            None => (name, view),
        })
        .collect();
    let out = safetensors::serialize(views, None).unwrap();
    std::fs::write(dir.join("model.safetensors"), out).unwrap();
}

#[test]
fn hub_layout_loads_and_saves_back_in_its_layout() {
    let device = Default::default();
    let tmp = tempfile::tempdir().unwrap();
    let hub = tmp.path().join("hub");
    std::fs::create_dir(&hub).unwrap();
    hub_layout_copy(&hub);
    let pretrained = Pretrained::<B, Llava<B>>::load(&hub, &device).unwrap();
    let r = Reference::open(NAME);
    let inputs = inputs(&r, &device);
    let diff = attended_diff(
        logits(&pretrained.model, &inputs, None).unwrap(),
        &r.f32("logits"),
        &r.rows("attention_mask"),
    );
    assert!(diff <= TOL, "hub layout: logits differ by {diff}");
    let out = tmp.path().join("saved");
    pretrained.save(&out).unwrap();
    let (before, after) = (common::raw_tensors(&hub), common::raw_tensors(&out));
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    assert!(after.contains_key("vision_tower.vision_model.pre_layrnorm.weight"));
    for (k, t) in &before {
        assert!(&after[k] == t, "{k} not byte-identical");
    }
}

#[test]
fn full_size_llava_1_5_7b_counts_match_transformers() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/models/llava-1.5-7b");
    let cfg =
        <ressa_models::LlavaConfig as FamilyConfig>::from_file(&dir.join("config.json")).unwrap();
    assert_eq!(
        (
            cfg.feature_layers,
            cfg.image_seq_length(),
            cfg.image_token_index
        ),
        (23, 576, 32000)
    );
    let ours = ressa_models::pretrained::parameter_counts::<B, Llava<B>>(&cfg, &Default::default())
        .unwrap();
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("param_counts.json")).unwrap())
            .unwrap();
    let expected: std::collections::BTreeMap<String, usize> =
        serde_json::from_value(reference["counts"].clone()).unwrap();
    assert_eq!(ours, expected);
    let total: usize = ours.values().sum();
    assert!((7_000_000_000..7_100_000_000).contains(&total), "{total}");
}
