//! The untied InstructBLIP-T5 fixture (`instructblip-t5-untied`, written by
//! `scripts/make_model_fixtures.py`): `shared`, `encoder.embed_tokens`, `decoder.embed_tokens`
//! and `lm_head` are four different tensors, as in a fine-tuned untied checkpoint, and
//! `transformers` uses each as stored. Logits and generation against `transformers` are in
//! `parity.rs` (the fixture is in its list); here: the fixture really is untied, ressa is
//! sensitive to which table it reads, the config's tie flag does not matter when all four are
//! stored, and a save writes every source tensor back byte for byte.

mod common;

use burn::prelude::*;
use common::{B, Dev, Reference, fixture, max_abs_diff, raw_tensors};
use ressa_models::vlm::logits;
use ressa_models::{InstructBlipT5, Pretrained, VlmInputs};

const NAME: &str = "instructblip-t5-untied";
const TABLES: [&str; 4] = [
    "language_model.shared.weight",
    "language_model.encoder.embed_tokens.weight",
    "language_model.decoder.embed_tokens.weight",
    "language_model.lm_head.weight",
];

fn inputs(r: &Reference, device: &Dev) -> VlmInputs<B> {
    let mask: Tensor<B, 2, Int> = r.int2("qformer_attention_mask", device);
    let qformer_text = Some((r.int2("qformer_input_ids", device), mask.float()));
    let mask: Tensor<B, 2, Int> = r.int2("attention_mask", device);
    VlmInputs {
        pixel_values: r.float("pixel_values", device),
        qformer_text,
        input_ids: r.int2("input_ids", device),
        attention_mask: mask.float(),
    }
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Guard against a vacuous pass: the four tables are stored, f32, of one shape, and pairwise
/// clearly different; the config says untied.
#[test]
fn fixture_stores_four_different_embedding_tables() {
    let tensors = raw_tensors(&fixture(NAME));
    let tables: Vec<&common::RawTensor> = TABLES
        .iter()
        .map(|k| tensors.get(*k).unwrap_or_else(|| panic!("{k} not stored")))
        .collect();
    for (i, a) in tables.iter().enumerate() {
        assert_eq!(a.1, safetensors::Dtype::F32, "{}", TABLES[i]);
        assert_eq!(a.2, tables[0].2, "{}", TABLES[i]);
        for (j, b) in tables.iter().enumerate().take(i) {
            let diff = f32s(&a.3)
                .iter()
                .zip(f32s(&b.3))
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(
                diff > 0.5,
                "{} vs {}: max abs diff {diff}",
                TABLES[i],
                TABLES[j]
            );
        }
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(NAME).join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["text_config"]["tie_word_embeddings"], false);
}

/// ressa reads `decoder.embed_tokens` and `lm_head` as stored: the logits match the
/// reference, and taking `shared` for either instead moves them far past the tolerance.
#[test]
fn decoder_table_and_head_are_read_as_stored() {
    let device = Default::default();
    let r = Reference::open(NAME);
    let inputs = inputs(&r, &device);
    let reference = r.f32("logits");
    let dec = || r.int2("decoder_input_ids", &device);
    let mut model = Pretrained::<B, InstructBlipT5<B>>::load(&fixture(NAME), &device)
        .unwrap()
        .model;
    assert!(model.language_model.decoder_embed_tokens.is_some());
    assert!(model.language_model.lm_head.is_some());
    let diff = max_abs_diff(logits(&model, &inputs, Some(dec())).unwrap(), &reference);
    eprintln!("{NAME}: logits max abs diff {diff:.2e}");
    assert!(diff <= 1e-4, "logits differ by {diff}");

    // The decoder embedding from `shared`, the head as stored.
    let table = model.language_model.decoder_embed_tokens.take();
    let diff = max_abs_diff(logits(&model, &inputs, Some(dec())).unwrap(), &reference);
    eprintln!("{NAME}: decoder embedding from `shared`: logits max abs diff {diff:.2e}");
    assert!(diff > 0.5, "decoder table not used: {diff}");
    // The head from `shared` (no decoder-output scaling in this config), the table as stored.
    model.language_model.decoder_embed_tokens = table;
    model.language_model.lm_head = None;
    let diff = max_abs_diff(logits(&model, &inputs, Some(dec())).unwrap(), &reference);
    eprintln!("{NAME}: lm_head from `shared`: logits max abs diff {diff:.2e}");
    assert!(diff > 0.5, "lm_head not used: {diff}");
}

/// transformers 5.x writes `tie_word_embeddings: true` for every T5 (its T5Config forces it) but
/// keeps stored tables apart when their values differ; ressa gives the same logits then.
#[test]
fn tie_flag_in_config_does_not_retie_stored_tables() {
    let device = Default::default();
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture(NAME)).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    let path = tmp.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["text_config"]["tie_word_embeddings"] = true.into();
    std::fs::write(&path, serde_json::to_string(&config).unwrap()).unwrap();
    let model = Pretrained::<B, InstructBlipT5<B>>::load(tmp.path(), &device)
        .unwrap()
        .model;
    let r = Reference::open(NAME);
    let ours = logits(
        &model,
        &inputs(&r, &device),
        Some(r.int2("decoder_input_ids", &device)),
    );
    let diff = max_abs_diff(ours.unwrap(), &r.f32("logits"));
    eprintln!("{NAME} with tie_word_embeddings: true: logits max abs diff {diff:.2e}");
    assert!(diff <= 1e-4, "logits differ by {diff}");
}

/// Load and save: the output holds exactly the source's keys, each tensor byte-identical
/// (dtype, shape and data), the four tables included.
#[test]
fn save_writes_every_table_back_byte_for_byte() {
    let src = fixture(NAME);
    let pretrained = Pretrained::<B, InstructBlipT5<B>>::load(&src, &Default::default()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("saved");
    pretrained.save(&out).unwrap();
    let (before, after) = (raw_tensors(&src), raw_tensors(&out));
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "key set"
    );
    for (k, t) in &before {
        assert!(&after[k] == t, "{k} differs after the round trip");
    }
    for k in TABLES {
        assert!(after.contains_key(k), "{k}");
    }
}
