//! LLaVA-1.5 parity with HF `transformers` on the tiny random checkpoints written by
//! `scripts/make_llava_fixtures.py`: image features and logits to 1e-4, generation token for
//! token (repetition penalty as transformers 5.25: left padding not penalized), the registry,
//! the prunable stacks, calibration's features, the processor's `<image>` expansion and saving
//! in the layout read. `llava-gqa`: transformers 5.x's key layout, a grouped-query LLaMA, one
//! feature layer without CLS. `llava-hub`: the hub's `vision_tower.vision_model.*` layout in
//! float16 shards, a multi-head LLaMA with its own pad id, two feature layers concatenated with
//! CLS kept (`full`).

mod common;

use burn::prelude::*;
use common::{B, Dev, Reference, fixture, max_abs_diff};
use ressa_models::generate::{GenerationConfig, generate};
use ressa_models::llava::{LlavaBlockInput, LlavaStack};
use ressa_models::nn::no_tap;
use ressa_models::prunable::{CalibrationSample, Prunable, Tower, prunable_linears};
use ressa_models::vlm::{VisionLanguageModel, logits};
use ressa_models::{FamilyConfig, Llava, Pretrained, Processor, VlmInputs};

const FIXTURES: [&str; 2] = ["llava-gqa", "llava-hub"];
const TOL: f32 = 1e-4;

fn reference_json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join("reference.json")).unwrap())
        .unwrap()
}

fn config_json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join("config.json")).unwrap())
        .unwrap()
}

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

fn load(name: &str) -> Pretrained<B, Llava<B>> {
    Pretrained::<B, Llava<B>>::load(&fixture(name), &Default::default()).unwrap()
}

#[test]
fn image_features_and_logits_match_transformers() {
    for name in FIXTURES {
        image_features_and_logits(name);
    }
}

fn image_features_and_logits(name: &str) {
    let device = Default::default();
    let model = load(name).model;
    let r = Reference::open(name);
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
        eprintln!("{name}: {what} max abs diff {diff:.2e}");
        assert!(diff <= TOL, "{name}: {what} differs by {diff}");
    }
}

/// Every setting token for token. Where a repetition penalty is set, the fixture also holds
/// transformers' output with the left padding penalized (`<key>_padding`, 5.24's behaviour);
/// on the settings where that differs, ressa must give the 5.25 tokens, not those.
#[test]
fn generation_matches_transformers() {
    for name in FIXTURES {
        generation(name);
    }
}

fn generation(name: &str) {
    let device = Default::default();
    let model = load(name).model;
    let r = Reference::open(name);
    let inputs = inputs(&r, &device);
    let json = reference_json(name);
    let mut separating = 0;
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
        eprintln!("{name}: {key} -> {ours:?}");
        assert_eq!(ours, r.rows(key), "{name}: {key}");
        if g["padding_penalized_differs"] == true {
            let old = r.rows(&format!("{key}_padding"));
            assert_ne!(old, r.rows(key), "{name}: {key}");
            separating += 1;
        }
    }
    // The fixture tells the two repetition penalties apart.
    assert!(separating > 0, "{name}: no setting separates them");
}

#[test]
fn placeholder_count_must_match_the_image() {
    for name in FIXTURES {
        let device = Default::default();
        let model = load(name).model;
        let r = Reference::open(name);
        let mut inputs = inputs(&r, &device);
        let image = config_json(name)["image_token_index"].as_u64().unwrap() as u32;
        let count = reference_json(name)["image_seq_length"].as_u64().unwrap();
        assert_eq!(model.image_seq_length() as u64, count);
        // One placeholder short in every row: the first one replaced by a word.
        let mut rows = r.rows("input_ids");
        for row in &mut rows {
            let p = row.iter().position(|&t| t == image).unwrap();
            row[p] = 3;
        }
        inputs.input_ids = ressa_models::nn::ids_tensor::<B>(&rows, &device);
        let err = logits(&model, &inputs, None).unwrap_err().to_string();
        assert!(
            err.contains(&format!("{} image tokens", count - 1))
                && err.contains(&format!("{count} features")),
            "{err}"
        );
    }
}

#[test]
fn stacks_cover_the_used_clip_layers_and_the_llama() {
    let model = load("llava-gqa").model;
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

    // Hub layout, `vision_feature_layer` [-4, -2] of 4 layers: hidden states 1 and 3, so layers
    // 0..3 feed the features and layer 3 does not.
    let model = load("llava-hub").model;
    assert_eq!(model.feature_layers, vec![1, 3]);
    let names: Vec<(String, Tower, usize)> = model
        .stacks()
        .into_iter()
        .map(|s| (s.name, s.tower, s.blocks))
        .collect();
    assert_eq!(
        names,
        vec![
            (
                "vision_tower.vision_model.encoder.layers".into(),
                Tower::Vision,
                3
            ),
            ("language_model.model.layers".into(), Tower::Language, 3),
        ]
    );
    assert_eq!(prunable_linears(&model).len(), 3 * 6 + 3 * 7);
}

/// Calibration's path to the language model — CLIP layer by layer through `run_block` and
/// `with_hidden`, then `end_stack` — builds the same merged embeddings as the forward pass,
/// also when the features concatenate two layers (only the deepest reaches `end_stack`). A
/// statistics-only pass first (OWL's, on clones of the inputs) must not leave its states behind.
#[test]
fn calibration_reaches_the_language_model_with_the_forward_features() {
    for name in FIXTURES {
        let device = Default::default();
        let model = load(name).model;
        let r = Reference::open(name);
        let inputs = inputs(&r, &device);
        let expected = model.lm_input(&inputs).unwrap().embeds;
        let sample = CalibrationSample {
            inputs,
            targets: Vec::new(),
        };
        let mut ctx = model.context(&sample).unwrap();
        let blocks = model.stacks()[0].blocks;
        let first = model.stack_input(LlavaStack::Vision, &ctx).unwrap();
        // A pass on clones with other hidden states (as a statistics pass would produce).
        let mut other = first.clone();
        for b in 0..blocks {
            let h = model
                .run_block(
                    LlavaStack::Vision,
                    b,
                    &other,
                    Default::default(),
                    &mut no_tap,
                )
                .unwrap();
            other = model.with_hidden(other, h.mul_scalar(3.0));
        }
        let mut input = first;
        let mut last = None;
        for b in 0..blocks {
            let h = model
                .run_block(
                    LlavaStack::Vision,
                    b,
                    &input,
                    Default::default(),
                    &mut no_tap,
                )
                .unwrap();
            input = model.with_hidden(input, h.clone());
            last = Some(h);
        }
        model
            .end_stack(
                LlavaStack::Vision,
                last.unwrap(),
                &mut ctx,
                Default::default(),
            )
            .unwrap();
        let language = model.stacks()[1].id;
        let LlavaBlockInput::Language(lm) = model.stack_input(language, &ctx).unwrap() else {
            panic!("{name}: not a language input");
        };
        let diff = max_abs_diff(lm.x, &{
            let d = expected.dims().to_vec();
            (d, expected.into_data().convert::<f32>().into_vec().unwrap())
        });
        eprintln!("{name}: calibration embeddings vs forward {diff:.2e}");
        assert!(diff <= 1e-6, "{name}: {diff}");
    }
}

#[test]
fn processor_expands_the_image_token_as_transformers() {
    for name in FIXTURES {
        processor_inputs(name);
    }
}

fn processor_inputs(name: &str) {
    let device: Dev = Default::default();
    let model = load(name).model;
    let processor = Processor::for_model(&fixture(name), &model).unwrap();
    let r = Reference::open(name);
    let json = reference_json(name);
    let template = json["template"].as_str().unwrap();
    let prompts: Vec<String> = json["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| template.replace("{}", p.as_str().unwrap()))
        .collect();
    let images: Vec<Vec<f32>> = (0..prompts.len())
        .map(|i| {
            let path = fixture(name).join(format!("image{i}.png"));
            let img = ressa_data::image::load_rgb(&path).unwrap();
            assert_ne!(img.width(), img.height(), "{name}: image{i} is square");
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
    // CLIPImageProcessor (PIL): shortest edge to the model's size, then the center square, on
    // landscape and portrait images.
    let diff = max_abs_diff(ours.pixel_values, &r.f32("pixel_values"));
    eprintln!("{name}: pixel_values max abs diff {diff:.2e}");
    assert!(diff <= 1e-5, "{name}: pixel_values differ by {diff}");
}

/// The fixture rewritten in the older hub layout (`vision_tower.vision_model.*`, as
/// llava-hf/llava-1.5-7b-hf stores it) in a temporary directory.
fn hub_layout_copy(dir: &std::path::Path) {
    let src = fixture("llava-gqa");
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
    let r = Reference::open("llava-gqa");
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

/// Saving writes every source tensor back in the file, dtype and bytes it was read from: the
/// 5.x layout in one float32 file, and the hub layout in three float16 shards with its index.
#[test]
fn save_writes_every_tensor_back_as_read() {
    for name in FIXTURES {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("saved");
        load(name).save(&out).unwrap();
        let (before, after) = (
            common::raw_tensors(&fixture(name)),
            common::raw_tensors(&out),
        );
        assert_eq!(
            before.keys().collect::<Vec<_>>(),
            after.keys().collect::<Vec<_>>(),
            "{name}"
        );
        for (k, t) in &before {
            assert!(&after[k] == t, "{name}: {k} not written back as read");
        }
    }
    let hub = common::raw_tensors(&fixture("llava-hub"));
    let files: std::collections::BTreeSet<&str> = hub.values().map(|t| t.0.as_str()).collect();
    assert_eq!(files.len(), 3);
    assert!(hub.values().all(|t| t.1 == safetensors::Dtype::F16));
    assert!(hub.contains_key("vision_tower.vision_model.encoder.layers.3.mlp.fc2.weight"));
}

#[test]
fn full_size_llava_1_5_7b_counts_match_transformers() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/models/llava-1.5-7b");
    let cfg =
        <ressa_models::LlavaConfig as FamilyConfig>::from_file(&dir.join("config.json")).unwrap();
    assert_eq!(
        (
            cfg.feature_layers.clone(),
            cfg.image_seq_length(),
            cfg.image_token_index
        ),
        (vec![23], 576, 32000)
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

/// A from-scratch LLaVA starts as transformers initialises one (`_init_weights`): the CLIP
/// tower by CLIP's own rule (class embedding E^-½, q/k/v/fc2 E^-½·(2L)^-½, out_proj E^-½, fc1
/// (2E)^-½, times `initializer_factor`), the projector and the LLaMA at the text config's
/// `initializer_range`, biases 0, norms 1. `llava-init-stds.json` holds every tensor's std as a
/// fresh `LlavaForConditionalGeneration` has it (a model wide enough for tight estimates).
#[test]
fn initial_checkpoint_has_the_transformers_init() {
    let path = fixture("llava-init-stds.json");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("config.json");
    std::fs::write(&config, reference["config"].to_string()).unwrap();
    let cfg = <ressa_models::LlavaConfig as FamilyConfig>::from_file(&config).unwrap();
    ressa_models::pretrained::write_initial_checkpoint::<B, Llava<B>>(
        &cfg,
        tmp.path(),
        3,
        &Default::default(),
    )
    .unwrap();
    let ours = common::raw_tensors(tmp.path());
    let theirs = reference["tensors"].as_object().unwrap();
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>()
    );
    for (key, (_, _, _, bytes)) in &ours {
        let v: Vec<f64> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect();
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
        let (want_std, want_mean) = (
            theirs[key]["std"].as_f64().unwrap(),
            theirs[key]["mean"].as_f64().unwrap(),
        );
        if want_std == 0.0 {
            assert!(std == 0.0 && mean == want_mean, "{key}: {mean} ± {std}");
            continue;
        }
        // Two independent samples of the same σ: ≤ 5 % apart on tensors of ≥ 10⁴ values, the
        // class embedding (E values) within 25 %.
        let tol = if n >= 1e4 { 0.05 } else { 0.25 };
        let rel = (std - want_std).abs() / want_std;
        assert!(
            rel <= tol,
            "{key}: std {std:.5}, transformers {want_std:.5}"
        );
        assert!(mean.abs() <= 5.0 * std / n.sqrt(), "{key}: mean {mean}");
    }
}
