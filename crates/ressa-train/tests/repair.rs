//! RESSA end to end on the tiny InstructBLIP-T5 fixture: magnitude pruning at 70 %, SparseLoRA
//! trained against the dense path, merged, saved. The "task" is the dense model's own greedy
//! answers to held-in / held-out questions, so the pruned model has something to recover.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use ressa_data::image::{ImageProcessorConfig, load_rgb};
use ressa_data::prompts::{MAX_WORDS, pre_question, vqa_prompt};
use ressa_data::text::TextTokenizer;
use ressa_models::generate::{GenerationConfig, SpecialTokens, generate, strip_special};
use ressa_models::instructblip::save_model_dir_with;
use ressa_models::nn::ids_tensor;
use ressa_models::prunable::BlockOptions;
use ressa_models::{Pretrained, VlmInputs};
use ressa_prune::Method;
use ressa_prune::calibrate::{
    Allocation, CalibrationConfig, Propagation, TowerSparsity, calibrate_and_prune,
};
use ressa_sparse::SparsityPattern;
use ressa_train::batch::{logits, to_tensors};
use ressa_train::checkpoint;
use ressa_train::repair::train_data;
use ressa_train::repair::{DataConfig, RepairConfig, read_examples, repair};
use ressa_train::sparse_lora::{attach, for_each_linear_mut};
use ressa_train::trainer::load_adapter_tensors;
use ressa_train::{TrainConfig, train};

type B = Flex;
type AD = Autodiff<Flex>;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/instructblip-t5-a")
}

const QUESTIONS: [&str; 8] = [
    "what is in the picture",
    "what color is the circle",
    "is there a square",
    "how many shapes are there",
    "where is the triangle",
    "what is above the circle",
    "is the square red",
    "what shape is blue",
];

/// Writes a VQA train list whose answers are the dense model's greedy outputs: questions 0..6
/// for training, 6..8 held out.
fn write_data(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let cal =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/calibration/images");
    let mut names = Vec::new();
    for (src, name) in [
        (fixture().join("image0.png"), "0.png"),
        (fixture().join("image1.png"), "1.png"),
        (cal.join("a.png"), "a.png"),
        (cal.join("b.png"), "b.png"),
        (cal.join("c.png"), "c.png"),
    ] {
        std::fs::copy(src, images.join(name)).unwrap();
        names.push(name);
    }
    let device = Default::default();
    let dense = Pretrained::<B>::load(&fixture(), &device).unwrap();
    let processor =
        ImageProcessorConfig::from_file(&fixture().join("preprocessor_config.json")).unwrap();
    let tok = TextTokenizer::from_file(&fixture().join("tokenizer.json")).unwrap();
    let qtok =
        TextTokenizer::from_file(&fixture().join("qformer_tokenizer/tokenizer.json")).unwrap();
    let t5 = dense.config.text.as_t5().unwrap();
    let special = SpecialTokens {
        decoder_start: t5.decoder_start_token(),
        eos: t5.eos_token(),
        pad: t5.pad_token(),
    };
    let (h, w) = processor.output_size();
    let mut train = Vec::new();
    let mut val = Vec::new();
    let mut qid = 0;
    for name in &names {
        let pixels = processor.preprocess(&load_rgb(&images.join(name)).unwrap());
        for (qi, q) in QUESTIONS.iter().enumerate() {
            let prompt = vqa_prompt(&pre_question(q, MAX_WORDS));
            let ids = tok.encode(&prompt).unwrap();
            let qids = qtok.encode(&prompt).unwrap();
            let inputs = VlmInputs {
                pixel_values: Tensor::from_data(
                    TensorData::new(pixels.clone(), [1, 3, h, w]),
                    &device,
                ),
                qformer_text: Some((
                    ids_tensor::<B>(std::slice::from_ref(&qids), &device),
                    Tensor::ones([1, qids.len()], &device),
                )),
                input_ids: ids_tensor::<B>(std::slice::from_ref(&ids), &device),
                attention_mask: Tensor::ones([1, ids.len()], &device),
            };
            let cfg = GenerationConfig {
                max_new_tokens: 5,
                min_new_tokens: 3,
                ..Default::default()
            };
            let out = generate(&dense.model, &inputs, &cfg, special);
            let answer = tok.decode(&strip_special(&out[0], special)).unwrap();
            let item = serde_json::json!({
                "question_id": qid, "question": q, "answer": [answer.trim()], "image": name,
            });
            qid += 1;
            if qi < 6 {
                train.push(item)
            } else {
                val.push(item)
            }
        }
    }
    let train_path = dir.join("train.json");
    let val_path = dir.join("val.json");
    std::fs::write(&train_path, serde_json::to_vec(&train).unwrap()).unwrap();
    std::fs::write(&val_path, serde_json::to_vec(&val).unwrap()).unwrap();
    (train_path, val_path, images)
}

/// Magnitude pruning at 70 % of the vision and language towers, saved with its masks.
fn prune(out: &Path) -> BTreeMap<String, ressa_sparse::Mask> {
    let mut pretrained = Pretrained::<B>::load(&fixture(), &Default::default()).unwrap();
    let cfg = CalibrationConfig {
        method: Method::Magnitude,
        pattern: SparsityPattern::Unstructured,
        sparsity: TowerSparsity {
            vision: 0.7,
            qformer: 0.0,
            language: 0.7,
        },
        allocation: Allocation::Uniform,
        propagation: Propagation::Pruned,
        wanda_group: None,
        dsnot: None,
        block: BlockOptions::default(),
    };
    let result = calibrate_and_prune(&mut pretrained.model, &[], &cfg, &mut |_, _, _| {}).unwrap();
    let masks = result.masks.clone();
    save_model_dir_with(
        &pretrained.model,
        &pretrained.layout,
        &fixture(),
        out,
        &mut |dir| {
            ressa_sparse::sidecar::write_masks(
                dir.join("masks.safetensors"),
                masks.iter().map(|(k, m)| (k.as_str(), m)),
            )
            .map_err(|e| ressa_models::ModelError::Input(e.to_string()))
        },
    )
    .unwrap();
    result.masks
}

fn host<const D: usize, BB: Backend>(t: Tensor<BB, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

#[test]
fn ressa_recovers_a_70_percent_pruned_model_and_merges_with_exact_sparsity() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, val, images) = write_data(tmp.path());
    let pruned_dir = tmp.path().join("pruned");
    let masks = prune(&pruned_dir);
    let out = tmp.path().join("repaired");
    let cfg = RepairConfig {
        pruned: pruned_dir.clone(),
        dense: Some(fixture()),
        out: out.clone(),
        data: DataConfig {
            train,
            images: images.clone(),
            val: Some(val.clone()),
            caption_prompt: None,
            max_examples: None,
        },
        train: TrainConfig {
            steps: 40,
            batch_size: 6,
            lr: 1e-3,
            warmup_steps: 2,
            augment: false,
            checkpoint_every: 10,
            ..Default::default()
        },
        checkpoints: None,
    };
    let device = Default::default();
    let report = repair::<AD>(&cfg, false, &device, &mut |e| {
        if let ressa_train::TrainEvent::Step { step, loss, .. } = e
            && step % 5 == 0
        {
            eprintln!("step {step}: train loss {loss:.4}");
        }
    })
    .unwrap();
    let first = report.train.validations.first().unwrap();
    let last = report.train.validations.last().unwrap();
    eprintln!(
        "validation before {first:?}\nafter {last:?}\nsteps/s {:.2}",
        report.train.steps_per_s
    );
    assert!(
        last.loss < 0.9 * first.loss,
        "held-out loss {} → {}",
        first.loss,
        last.loss
    );
    assert!(
        last.token_accuracy > first.token_accuracy + 0.1,
        "held-out token accuracy {} → {}",
        first.token_accuracy,
        last.token_accuracy
    );
    assert_eq!(report.exact_sparsity, masks.len());
    assert!(report.sparse_adapters == masks.len() && report.plain_adapters > 0);

    // The written model: exactly the mask's non-zeros in every pruned weight.
    let merged = Pretrained::<B>::load(&out, &device).unwrap();
    let mut merged_model = merged.model;
    let mut checked = 0;
    for_each_linear_mut(&mut merged_model, |name, _, linear| {
        if let Some(m) = masks.get(&format!("{name}.weight")) {
            let nz: Vec<bool> = host(linear.weight.val())
                .iter()
                .map(|v| *v != 0.0)
                .collect();
            assert_eq!(
                nz,
                m.to_bools(),
                "{name}: merged zeros differ from the mask"
            );
            checked += 1;
        }
    });
    assert_eq!(checked, masks.len());
    assert!(out.join("adapters/adapter_model.safetensors").exists());
    assert!(out.join("adapters/adapter_config.json").exists());
    assert!(out.join("masks.safetensors").exists());

    // Merged logits equal the unmerged student's (adapters from the last checkpoint).
    let ckpt = checkpoint::latest(&cfg.checkpoint_dir()).unwrap().unwrap();
    assert_eq!(ckpt.state.step, 40);
    let dense = Pretrained::<AD>::load(&fixture(), &device).unwrap();
    let (mut student, _) = attach(
        dense.model,
        &cfg.train.adapters,
        &masks,
        &Default::default(),
        0,
        &device,
    )
    .unwrap();
    load_adapter_tensors(&mut student, &ckpt.adapters, &device).unwrap();
    let examples = read_examples(&val, &images, "").unwrap();
    let tok =
        std::sync::Arc::new(TextTokenizer::from_file(&fixture().join("tokenizer.json")).unwrap());
    let qtok = std::sync::Arc::new(
        TextTokenizer::from_file(&fixture().join("qformer_tokenizer/tokenizer.json")).unwrap(),
    );
    let enc = |t: &std::sync::Arc<TextTokenizer>| ressa_data::loader::TextEncoder {
        tokenizer: t.clone(),
        pad: 0,
    };
    let loader = ressa_data::loader::Loader::new(
        examples,
        ressa_data::loader::ImageTransform::Eval(
            ImageProcessorConfig::from_file(&fixture().join("preprocessor_config.json")).unwrap(),
        ),
        ressa_data::loader::Texts {
            input: Some(enc(&tok)),
            qformer: Some(enc(&qtok)),
            output: Some(enc(&tok)),
        },
        ressa_data::loader::LoaderConfig {
            batch_size: 4,
            ..Default::default()
        },
    )
    .unwrap();
    let ids = ressa_train::batch::TokenIds {
        pad: 0,
        decoder_start: 0,
        bos: None,
        eos: None,
    };
    let mut compared = 0;
    for batch in loader {
        let batch = batch.unwrap();
        let a = logits(
            &student,
            &to_tensors::<AD>(&batch, &student, ids, &device).unwrap(),
        );
        let b = logits(
            &merged_model,
            &to_tensors::<B>(&batch, &merged_model, ids, &device).unwrap(),
        );
        let d = host(a.inner())
            .iter()
            .zip(host(b))
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(d <= 1e-5, "merged vs unmerged logits differ by {d}");
        compared += 1;
    }
    assert!(compared > 0);
}

#[test]
fn training_changes_only_the_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    let (train_path, _, images) = write_data(tmp.path());
    let masks = prune(&tmp.path().join("pruned"));
    let device = Default::default();
    let dense = Pretrained::<AD>::load(&fixture(), &device).unwrap();
    let data_cfg = DataConfig {
        train: train_path,
        images,
        val: None,
        caption_prompt: None,
        max_examples: Some(12),
    };
    let data = train_data(&fixture(), &dense.config, &dense.model, &data_cfg).unwrap();
    let cfg = TrainConfig {
        steps: 4,
        batch_size: 3,
        lr: 1e-2,
        augment: true,
        ..Default::default()
    };
    let (model, _) = attach(
        dense.model,
        &cfg.adapters,
        &masks,
        &Default::default(),
        1,
        &device,
    )
    .unwrap();
    let snapshot = |m: &ressa_models::InstructBlip<AD>| -> Vec<(String, Vec<f32>)> {
        m.export()
            .into_iter()
            .map(|(k, t)| (k, t.to_f32()))
            .collect()
    };
    let mut model = model;
    let before = snapshot(&model);
    let adapters_before = ressa_train::trainer::adapter_tensors(&mut model);
    let (mut model, report) = train(model, &data, &cfg, None, false, &device, &mut |_| {}).unwrap();
    assert_eq!(report.steps, 4);
    let after = snapshot(&model);
    assert_eq!(before.len(), after.len());
    for ((k, a), (_, b)) in before.iter().zip(&after) {
        assert!(
            a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{k} changed"
        );
    }
    let adapters_after = ressa_train::trainer::adapter_tensors(&mut model);
    let unchanged: Vec<&String> = adapters_before
        .iter()
        .filter(|(k, v)| adapters_after[*k].1 == v.1)
        .map(|(k, _)| k)
        .collect();
    // Every adapter on the path to the logits trains; the last Q-Former layer's text-token FFN
    // (`intermediate` / `output`, not `*_query`) cannot influence the query outputs.
    let last = dense_last_qformer_layer();
    let expected: Vec<String> = ["intermediate.dense", "output.dense"]
        .iter()
        .flat_map(|l| ["lora_A", "lora_B"].map(|s| format!("qformer.encoder.layer.{last}.{l}.{s}")))
        .collect();
    let mut unchanged: Vec<String> = unchanged.into_iter().cloned().collect();
    unchanged.sort();
    let mut expected = expected;
    expected.sort();
    assert_eq!(unchanged, expected);
}

fn dense_last_qformer_layer() -> usize {
    let cfg = ressa_models::ModelConfig::from_file(&fixture().join("config.json")).unwrap();
    cfg.qformer.num_hidden_layers - 1
}

fn prune_llama(out: &Path, pattern: SparsityPattern) -> BTreeMap<String, ressa_sparse::Mask> {
    let dir = fixture().join("../instructblip-llama-gqa");
    let mut pretrained = Pretrained::<B>::load(&dir, &Default::default()).unwrap();
    let cfg = CalibrationConfig {
        method: Method::Magnitude,
        pattern,
        // The fixture's ViT MLP width (37) does not divide into groups of 4: language only.
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
    let result = calibrate_and_prune(&mut pretrained.model, &[], &cfg, &mut |_, _, _| {}).unwrap();
    let masks = result.masks.clone();
    save_model_dir_with(&pretrained.model, &pretrained.layout, &dir, out, &mut |d| {
        ressa_sparse::sidecar::write_masks(
            d.join("masks.safetensors"),
            masks.iter().map(|(k, m)| (k.as_str(), m)),
        )
        .map_err(|e| ressa_models::ModelError::Input(e.to_string()))
    })
    .unwrap();
    result.masks
}

#[test]
fn llama_repair_learns_only_target_tokens_and_keeps_the_zeros() {
    let tmp = tempfile::tempdir().unwrap();
    let dense_dir = fixture().join("../instructblip-llama-gqa");
    let pruned_dir = tmp.path().join("pruned");
    let masks = prune_llama(&pruned_dir, SparsityPattern::TWO_FOUR);
    let cal = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/calibration");
    let data = DataConfig {
        train: cal.join("captions.json"),
        images: cal.clone(),
        val: Some(cal.join("captions.json")),
        caption_prompt: None,
        max_examples: None,
    };

    // Loss positions: the caption and its eos only, right after the prompt.
    let device = Default::default();
    let dense = Pretrained::<B>::load(&dense_dir, &device).unwrap();
    let td = train_data(&dense_dir, &dense.config, &dense.model, &data).unwrap();
    let loader = ressa_data::loader::Loader::new(
        td.train.clone(),
        ressa_data::loader::ImageTransform::Eval(td.processor.clone()),
        td.texts.clone(),
        ressa_data::loader::LoaderConfig {
            batch_size: 3,
            ..Default::default()
        },
    )
    .unwrap();
    let batch = loader.into_iter().next().unwrap().unwrap();
    let tb = to_tensors::<B>(&batch, &dense.model, td.ids, &device).unwrap();
    let q = dense.model.query_tokens.dims()[1];
    let tok = TextTokenizer::from_file(&dense_dir.join("tokenizer.json")).unwrap();
    let mask = host(tb.mask.clone());
    let targets = host(tb.targets.clone().float());
    let width = tb.mask.dims()[1];
    for (r, &i) in batch.indices.iter().enumerate() {
        let ex = &td.train[i];
        let prompt = tok.encode(&ex.text_input).unwrap();
        let mut caption = tok.encode(ex.text_output.as_ref().unwrap()).unwrap();
        assert_eq!(caption[0], 1, "the fixture tokenizer adds <s>");
        caption.remove(0);
        caption.push(2);
        let start = q + prompt.len() - 1;
        let row = &mask[r * width..(r + 1) * width];
        let expect: Vec<f32> = (0..width)
            .map(|p| {
                if p >= start && p < start + caption.len() {
                    1.0
                } else {
                    0.0
                }
            })
            .collect();
        assert_eq!(
            row,
            expect.as_slice(),
            "row {r}: loss must cover the caption + eos only"
        );
        let got: Vec<u32> = targets[r * width + start..r * width + start + caption.len()]
            .iter()
            .map(|&v| v as u32)
            .collect();
        assert_eq!(got, caption);
    }

    let cfg = RepairConfig {
        pruned: pruned_dir,
        dense: Some(dense_dir.clone()),
        out: tmp.path().join("repaired"),
        data,
        train: TrainConfig {
            steps: 12,
            batch_size: 3,
            lr: 3e-3,
            augment: false,
            ..Default::default()
        },
        checkpoints: None,
    };
    let report = repair::<AD>(&cfg, false, &device, &mut |_| {}).unwrap();
    let (first, last) = (
        report.train.validations.first().unwrap(),
        report.train.validations.last().unwrap(),
    );
    assert!(
        last.loss < first.loss,
        "loss {} → {}",
        first.loss,
        last.loss
    );
    assert_eq!(report.exact_sparsity, masks.len());
    let merged = Pretrained::<B>::load(&cfg.out, &device).unwrap();
    let mut model = merged.model;
    let mut checked = 0;
    for_each_linear_mut(&mut model, |name, _, linear| {
        if let Some(m) = masks.get(&format!("{name}.weight")) {
            let nz: Vec<bool> = host(linear.weight.val())
                .iter()
                .map(|v| *v != 0.0)
                .collect();
            assert_eq!(nz, m.to_bools(), "{name}");
            let merged_mask = ressa_sparse::Mask::from_bools(m.d_in(), m.d_out(), &nz).unwrap();
            if name.starts_with("language_model") {
                assert!(ressa_sparse::is_n_m(&merged_mask, 2, 4), "{name}: 2:4 kept");
            }
            checked += 1;
        }
    });
    assert_eq!(checked, masks.len());
}
