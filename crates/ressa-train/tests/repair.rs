//! RESSA end to end on the tiny InstructBLIP-T5 fixture: magnitude pruning at 70 %, SparseLoRA
//! trained against the dense path, merged, saved. The "task" is the dense model's own greedy
//! answers to held-in / held-out questions, so the pruned model has something to recover.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use ressa_data::image::load_rgb;
use ressa_data::prompts::{MAX_WORDS, pre_question, vqa_prompt};
use ressa_data::text::TextTokenizer;
use ressa_models::generate::{GenerationConfig, generate};
use ressa_models::pretrained::save_model_dir_with;
use ressa_models::prunable::BlockOptions;
use ressa_models::vlm::{logits, teacher_forced};
use ressa_models::weights::export_tensors;
use ressa_models::{
    InstructBlipLlama, InstructBlipT5, LanguageModel, Pretrained, Processor, VisionLanguageModel,
};
use ressa_prune::Method;
use ressa_prune::calibrate::{
    Allocation, CalibrationConfig, Propagation, TowerSparsity, calibrate_and_prune,
};
use ressa_sparse::SparsityPattern;
use ressa_train::checkpoint;
use ressa_train::repair::train_data;
use ressa_train::repair::{DataConfig, RepairConfig, read_examples, repair};
use ressa_train::sparse_lora::{attach, for_each_linear_mut};
use ressa_train::trainer::TrainBatch;
use ressa_train::trainer::load_adapter_tensors;
use ressa_train::{TrainConfig, train};

type B = Flex;
type AD = Autodiff<Flex>;
type T5<BB> = InstructBlipT5<BB>;
type Llama<BB> = InstructBlipLlama<BB>;

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
    let dense = Pretrained::<B, T5<B>>::load(&fixture(), &device).unwrap();
    let processor = Processor::for_model(&fixture(), &dense.model).unwrap();
    let mut train = Vec::new();
    let mut val = Vec::new();
    let mut qid = 0;
    for name in &names {
        let pixels = processor
            .image
            .preprocess(&load_rgb(&images.join(name)).unwrap());
        for (qi, q) in QUESTIONS.iter().enumerate() {
            let prompt = vqa_prompt(&pre_question(q, MAX_WORDS));
            let inputs = processor
                .inputs::<B>(std::slice::from_ref(&pixels), &[&prompt], None, &device)
                .unwrap();
            let cfg = GenerationConfig {
                max_new_tokens: 5,
                min_new_tokens: 3,
                ..Default::default()
            };
            let out = generate(&dense.model, &inputs, &cfg).unwrap();
            let answer = processor.decode(&out.answer(0)).unwrap();
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
    let mut pretrained = Pretrained::<B, T5<B>>::load(&fixture(), &Default::default()).unwrap();
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
    let merged = Pretrained::<B, T5<B>>::load(&out, &device).unwrap();
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
    let dense = Pretrained::<AD, T5<AD>>::load(&fixture(), &device).unwrap();
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
    let processor = Processor::for_model(&fixture(), &merged_model).unwrap();
    let loader = ressa_data::loader::Loader::new(
        examples,
        ressa_data::loader::ImageTransform::Eval(processor.image.clone()),
        processor.texts(true),
        ressa_data::loader::LoaderConfig {
            batch_size: 4,
            ..Default::default()
        },
    )
    .unwrap();
    let mut compared = 0;
    for batch in loader {
        let batch = batch.unwrap();
        let sb = TrainBatch::<AD>::new(&processor, &student, &batch, &device).unwrap();
        let mb = TrainBatch::<B>::new(&processor, &merged_model, &batch, &device).unwrap();
        let a = teacher_forced(&student, &sb.inputs, &sb.targets)
            .unwrap()
            .logits;
        let b = teacher_forced(&merged_model, &mb.inputs, &mb.targets)
            .unwrap()
            .logits;
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
    let dense = Pretrained::<AD, T5<AD>>::load(&fixture(), &device).unwrap();
    let data_cfg = DataConfig {
        train: train_path,
        images,
        val: None,
        caption_prompt: None,
        max_examples: Some(12),
    };
    let processor = Processor::for_model(&fixture(), &dense.model).unwrap();
    let data = train_data(processor, &data_cfg).unwrap();
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
    let snapshot = |m: &T5<AD>| -> Vec<(String, Vec<f32>)> {
        export_tensors(m, m.param_keys())
            .unwrap()
            .into_iter()
            .map(|(k, t)| (k, t.to_f32()))
            .collect()
    };
    let model = model;
    let before = snapshot(&model);
    let adapters_before = ressa_train::trainer::adapter_tensors(&model);
    let (model, report) = train(model, &data, &cfg, None, false, &device, &mut |_| {}).unwrap();
    assert_eq!(report.steps, 4);
    let after = snapshot(&model);
    assert_eq!(before.len(), after.len());
    for ((k, a), (_, b)) in before.iter().zip(&after) {
        assert!(
            a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{k} changed"
        );
    }
    let adapters_after = ressa_train::trainer::adapter_tensors(&model);
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
    let cfg = <T5<B> as VisionLanguageModel<B>>::Config::from_file(&fixture().join("config.json"))
        .unwrap();
    cfg.qformer.num_hidden_layers - 1
}

fn prune_llama(out: &Path, pattern: SparsityPattern) -> BTreeMap<String, ressa_sparse::Mask> {
    let dir = fixture().join("../instructblip-llama-gqa");
    let mut pretrained = Pretrained::<B, Llama<B>>::load(&dir, &Default::default()).unwrap();
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

    // Targets: the caption and its eos only (no bos), teacher-forced right after the prompt.
    let device = Default::default();
    let dense = Pretrained::<B, Llama<B>>::load(&dense_dir, &device).unwrap();
    let processor = Processor::for_model(&dense_dir, &dense.model).unwrap();
    let td = train_data(processor.clone(), &data).unwrap();
    let loader = ressa_data::loader::Loader::new(
        td.train.clone(),
        ressa_data::loader::ImageTransform::Eval(processor.image.clone()),
        processor.texts(true),
        ressa_data::loader::LoaderConfig {
            batch_size: 3,
            ..Default::default()
        },
    )
    .unwrap();
    let batch = loader.into_iter().next().unwrap().unwrap();
    let tb = TrainBatch::<B>::new(&processor, &dense.model, &batch, &device).unwrap();
    let tok = TextTokenizer::from_file(&dense_dir.join("tokenizer.json")).unwrap();
    let forced = teacher_forced(&dense.model, &tb.inputs, &tb.targets).unwrap();
    let [_, t, vocab] = forced.logits.dims();
    let forced_logits = host(forced.logits);
    let forced_mask = host(forced.mask);
    let eos = dense.model.language_model().special_tokens().eos;
    for (r, &i) in batch.indices.iter().enumerate() {
        let ex = &td.train[i];
        let mut caption = tok.encode(ex.text_output.as_ref().unwrap()).unwrap();
        assert_eq!(caption[0], 1, "the fixture tokenizer adds <s>");
        caption.remove(0);
        caption.push(eos);
        assert_eq!(
            tb.targets[r], caption,
            "row {r}: loss must cover the caption + eos only"
        );
        let ones = forced_mask[r * t..(r + 1) * t]
            .iter()
            .filter(|&&m| m == 1.0)
            .count();
        assert_eq!(ones, caption.len(), "row {r}: loss positions");
        // Position j of the forced logits is the plain forward's logit right before
        // target token j, with the prompt and the caption's first j tokens before it.
        let row_inputs = processor
            .training_batch::<B, _>(&dense.model, &batch, &device)
            .unwrap()
            .0;
        let ids = row_inputs.input_ids.clone().narrow(0, r, 1);
        let m = row_inputs.attention_mask.clone().narrow(0, r, 1);
        let len = host(m.clone()).iter().filter(|&&v| v == 1.0).count();
        let single = ressa_models::VlmInputs {
            pixel_values: row_inputs.pixel_values.clone().narrow(0, r, 1),
            qformer_text: row_inputs
                .qformer_text
                .clone()
                .map(|(q, qm)| (q.narrow(0, r, 1), qm.narrow(0, r, 1))),
            input_ids: ids.slice([0..1, 0..len]),
            attention_mask: m.slice([0..1, 0..len]),
        };
        let cont = ressa_models::nn::ids_tensor::<B>(&[caption.clone()], &device);
        let full = host(logits(&dense.model, &single, Some(cont)).unwrap());
        let total = full.len() / vocab;
        for j in 0..caption.len() {
            let p = total - caption.len() - 1 + j;
            let a = &full[p * vocab..(p + 1) * vocab];
            let b = &forced_logits[(r * t + j) * vocab..(r * t + j + 1) * vocab];
            let d = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(
                d < 1e-4,
                "row {r} target {j}: forced vs plain logits differ by {d}"
            );
        }
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
    let merged = Pretrained::<B, Llama<B>>::load(&cfg.out, &device).unwrap();
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

/// The fixture on the autodiff backend and the VQA list `train` (images under `images`) as
/// its training data.
fn fixture_training(
    train: &Path,
    images: &Path,
) -> (Pretrained<AD, T5<AD>>, ressa_train::trainer::TrainData) {
    let dense = Pretrained::<AD, T5<AD>>::load(&fixture(), &Default::default()).unwrap();
    let processor = Processor::for_model(&fixture(), &dense.model).unwrap();
    let data_cfg = DataConfig {
        train: train.to_path_buf(),
        images: images.to_path_buf(),
        val: None,
        caption_prompt: None,
        max_examples: None,
    };
    let data = train_data(processor, &data_cfg).unwrap();
    (dense, data)
}

/// The pretraining curriculum (`warm_steps`, `warm_prompts`): the warm-up steps see exactly the
/// matching examples, in the order a run on those examples alone sees them, and the steps after
/// it draw from every example.
#[test]
fn a_pretraining_warm_up_draws_only_the_matching_examples() {
    use ressa_train::pretrain::{PretrainConfig, pretrain};
    use ressa_train::trainer::TrainEvent;

    let tmp = tempfile::tempdir().unwrap();
    let (train, _, images) = write_data(tmp.path());
    let device = Default::default();
    let losses = |only_warm: bool, warm_steps: u64| -> Vec<f64> {
        let (dense, mut data) = fixture_training(&train, &images);
        if only_warm {
            data.train.retain(|e| e.text_input.contains("where is the"));
        }
        let cfg = PretrainConfig {
            steps: 4,
            batch_size: 1,
            lr: 1e-3,
            warmup_steps: 0,
            warm_steps,
            warm_prompts: if warm_steps > 0 {
                vec!["where is the".into()]
            } else {
                Vec::new()
            },
            ..Default::default()
        };
        let mut out = Vec::new();
        pretrain(dense.model, &data, &cfg, &device, &mut |e| {
            if let TrainEvent::Step { loss, .. } = e {
                out.push(*loss)
            }
        })
        .unwrap();
        out
    };
    let warm = losses(false, 2);
    let alone = losses(true, 2);
    let plain = losses(false, 0);
    assert_eq!(warm.len(), 4);
    assert_eq!(
        warm[..2],
        alone[..2],
        "warm-up steps: the matching examples, same order"
    );
    assert_ne!(warm[2..], alone[2..], "after the warm-up: every example");
    assert_ne!(
        warm[..2],
        plain[..2],
        "without a warm-up the first steps draw from all"
    );
}

/// Every parameter of `m` by HF key, as f32.
fn params_by_key<M: VisionLanguageModel<AD>>(m: &M) -> BTreeMap<String, Vec<f32>> {
    export_tensors(m, m.param_keys())
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.to_f32()))
        .collect()
}

/// Which tensors a run changed (bit for bit), split into the vision tower's and the rest's.
fn changed(
    before: &BTreeMap<String, Vec<f32>>,
    after: &BTreeMap<String, Vec<f32>>,
) -> (Vec<bool>, Vec<bool>) {
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    let (mut vision, mut rest) = (Vec::new(), Vec::new());
    for (k, a) in before {
        let moved = a
            .iter()
            .zip(&after[k])
            .any(|(x, y)| x.to_bits() != y.to_bits());
        if k.starts_with("vision_model.") {
            vision.push(moved);
        } else {
            rest.push(moved);
        }
    }
    (vision, rest)
}

/// `freeze_vision`: the main run leaves every tensor of the vision tower as it was and trains
/// every other one; without it the tower is trained too.
#[test]
fn a_frozen_vision_tower_is_left_as_it_is() {
    use ressa_train::pretrain::{PretrainConfig, pretrain};

    let tmp = tempfile::tempdir().unwrap();
    let (train, _, images) = write_data(tmp.path());
    let device = Default::default();
    for freeze in [true, false] {
        let (dense, data) = fixture_training(&train, &images);
        let before = params_by_key(&dense.model);
        let cfg = PretrainConfig {
            steps: 3,
            batch_size: 2,
            lr: 1e-2,
            warmup_steps: 0,
            freeze_vision: freeze,
            ..Default::default()
        };
        let (model, _) = pretrain(dense.model, &data, &cfg, &device, &mut |_| {}).unwrap();
        let (vision, rest) = changed(&before, &params_by_key(&model));
        assert!(!vision.is_empty() && !rest.is_empty());
        assert!(
            vision.iter().all(|&c| c != freeze),
            "freeze_vision = {freeze}: vision tensors changed: {vision:?}"
        );
        assert!(rest.iter().all(|&c| c), "the rest is trained: {rest:?}");
    }
}

/// Stage 0 on the shapes world with the shapes-paper architecture: the vision tower learns
/// what each patch holds (the content head beats always answering "empty" and the loss falls),
/// nothing outside the tower moves, and a tower whose patches do not tile the 3×3 cells is
/// refused in one line.
#[test]
fn vision_pretraining_learns_the_patches_and_trains_only_the_tower() {
    use ressa_data::scenes::read_patch_labels;
    use ressa_data::shapes::{ShapesConfig, generate};
    use ressa_models::pretrained::write_initial_checkpoint_with;
    use ressa_train::pretrain::{PretrainConfig, pretrain_vision};
    use ressa_train::trainer::{TrainData, TrainEvent};

    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let shapes = ShapesConfig {
        train: 96,
        val: 0,
        test: 0,
        image_size: 48,
        ..Default::default()
    };
    generate(&shapes, &data_dir).unwrap();
    let model_dir = tmp.path().join("model");
    std::fs::create_dir_all(model_dir.join("qformer_tokenizer")).unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::fs::copy(
        root.join("configs/models/shapes-paper/config.json"),
        model_dir.join("config.json"),
    )
    .unwrap();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "qformer_tokenizer/tokenizer.json",
        "qformer_tokenizer/tokenizer_config.json",
    ] {
        std::fs::copy(data_dir.join(f), model_dir.join(f)).unwrap();
    }
    let device = Default::default();
    let config =
        <T5<B> as VisionLanguageModel<B>>::Config::from_file(&model_dir.join("config.json"))
            .unwrap();
    write_initial_checkpoint_with::<B, T5<B>>(
        &config,
        &model_dir,
        0,
        safetensors::Dtype::F32,
        &BTreeMap::new(),
        &device,
    )
    .unwrap();
    let scenes = data_dir.join("annotations/scenes_train.json");
    let images = data_dir.join("images");
    let cfg = PretrainConfig {
        vision_steps: 120,
        vision_lr: Some(3e-3),
        batch_size: 16,
        warmup_steps: 4,
        ..Default::default()
    };
    let dense = Pretrained::<AD, T5<AD>>::load(&model_dir, &device).unwrap();
    let data = TrainData {
        train: Vec::new(),
        val: Vec::new(),
        processor: Processor::for_model(&model_dir, &dense.model).unwrap(),
        loader_threads: 1,
    };
    let before = params_by_key(&dense.model);
    let mut losses = Vec::new();
    let (model, accuracy) = pretrain_vision(
        dense.model,
        &data,
        &scenes,
        &images,
        &cfg,
        &device,
        &mut |e| {
            if let TrainEvent::Step { loss, .. } = e {
                losses.push(*loss)
            }
        },
    )
    .unwrap();
    assert_eq!(losses.len(), 120);
    let tail = losses[110..].iter().sum::<f64>() / 10.0;
    assert!(tail < 0.3 * losses[0], "loss {} → {tail}", losses[0]);
    let labels = read_patch_labels(&scenes, &images, 3).unwrap();
    let empty = labels
        .iter()
        .flat_map(|l| &l.content)
        .filter(|&&c| c == 0)
        .count() as f64
        / (labels.len() * 9) as f64;
    assert!(
        accuracy > empty + 0.1,
        "patch accuracy {accuracy} vs {empty} empty"
    );
    let (vision, rest) = changed(&before, &params_by_key(&model));
    assert!(
        vision.iter().all(|&c| c),
        "the tower is trained: {vision:?}"
    );
    assert!(rest.iter().all(|&c| !c), "nothing else moves: {rest:?}");

    // The fixture's tower has 4×4 patches: they do not tile 3×3 cells.
    let fixture_model = Pretrained::<AD, T5<AD>>::load(&fixture(), &device).unwrap();
    let data = TrainData {
        processor: Processor::for_model(&fixture(), &fixture_model.model).unwrap(),
        ..data
    };
    let err = pretrain_vision(
        fixture_model.model,
        &data,
        &scenes,
        &images,
        &cfg,
        &device,
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("4×4 patches") && err.contains("scenes_train.json") && !err.contains('\n'),
        "{err}"
    );
}

/// A committed dense toy model (`configs/models/<name>/dense`, sharded) loads, shares the
/// generated data's tokenizers and reads the images: on held-out scenes it answers most
/// questions right, and far fewer when each question is asked of another image.
fn committed_model_reads_the_images<M: VisionLanguageModel<B>>(name: &str) {
    use ressa_data::shapes::{ShapesConfig, generate as generate_shapes};

    let tmp = tempfile::tempdir().unwrap();
    let shapes = ShapesConfig {
        train: 0,
        val: 0,
        test: 30,
        image_size: 48,
        captions_per_image: 1,
        ..Default::default()
    };
    generate_shapes(&shapes, tmp.path()).unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = root.join("configs/models").join(name).join("dense");
    for f in ["tokenizer.json", "qformer_tokenizer/tokenizer.json"] {
        assert_eq!(
            std::fs::read(dir.join(f)).unwrap(),
            std::fs::read(tmp.path().join(f)).unwrap(),
            "{f}"
        );
    }
    let device = Default::default();
    let dense = Pretrained::<B, M>::load(&dir, &device).unwrap();
    let processor = Processor::for_model(&dir, &dense.model).unwrap();
    let items: Vec<serde_json::Value> = serde_json::from_slice(
        &std::fs::read(tmp.path().join("annotations/vqa_test.json")).unwrap(),
    )
    .unwrap();
    let mut images: Vec<&str> = items
        .iter()
        .map(|it| it["image"].as_str().unwrap())
        .collect();
    images.dedup();
    let accuracy = |other: bool| -> f64 {
        let mut right = 0;
        for it in &items {
            // `other`: the question is asked of the next image instead of its own.
            let own = images.iter().position(|&m| m == it["image"]).unwrap();
            let image = images[(own + usize::from(other)) % images.len()];
            let pixels = processor
                .image
                .preprocess(&load_rgb(&tmp.path().join("images").join(image)).unwrap());
            let prompt = vqa_prompt(&pre_question(it["question"].as_str().unwrap(), MAX_WORDS));
            let inputs = processor
                .inputs::<B>(&[pixels], &[&prompt], None, &device)
                .unwrap();
            let cfg = GenerationConfig {
                max_new_tokens: 3,
                ..Default::default()
            };
            let out = generate(&dense.model, &inputs, &cfg).unwrap();
            let answer = processor.decode(&out.answer(0)).unwrap();
            right += usize::from(answer.trim() == it["answer"][0].as_str().unwrap());
        }
        right as f64 / items.len() as f64
    };
    let (seeing, other_image) = (accuracy(false), accuracy(true));
    assert!(
        seeing >= 0.8,
        "{name}: accuracy {seeing} on {} questions",
        items.len()
    );
    assert!(
        other_image < seeing - 0.25,
        "{name}: {other_image} with another image's pixels vs {seeing}"
    );
}

/// The default study's dense model (InstructBLIP-FlanT5-XL's proportions, two shards).
#[test]
fn the_committed_shapes_paper_model_reads_the_images() {
    committed_model_reads_the_images::<T5<B>>("shapes-paper");
}

/// The decoder-only toy's dense model (InstructBLIP-Vicuna-7B's proportions, untied lm_head,
/// five shards).
#[test]
fn the_committed_shapes_paper_llama_model_reads_the_images() {
    committed_model_reads_the_images::<Llama<B>>("shapes-paper-llama");
}

/// Issue #18's first criterion, checked on the committed checkpoints: each toy's parameters
/// split between vision / Q-Former (query tokens included) / language (projection and lm_head
/// included) within 3 points of the paper model it stands for, whose counts
/// (`configs/models/<model>/param_counts.json`, transformers on the meta device) have the real
/// checkpoints' untied lm_head added.
#[test]
fn the_committed_toys_keep_the_paper_models_proportions() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let split = |c: [u64; 3]| c.map(|x| 100.0 * x as f64 / c.iter().sum::<u64>() as f64);
    for (toy, paper) in [
        ("shapes-paper", "instructblip-flan-t5-xl"),
        ("shapes-paper-llama", "instructblip-vicuna-7b"),
    ] {
        let mut toy_counts = [0u64; 3];
        let dir = root.join("configs/models").join(toy).join("dense");
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
            for (key, v) in header.as_object().unwrap() {
                if key == "__metadata__" {
                    continue;
                }
                let numel: u64 = v["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap())
                    .product();
                let tower = if key.starts_with("vision_model.") {
                    0
                } else if key.starts_with("qformer.") || key == "query_tokens" {
                    1
                } else {
                    2
                };
                toy_counts[tower] += numel;
            }
        }
        let counts: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                root.join("configs/models")
                    .join(paper)
                    .join("param_counts.json"),
            )
            .unwrap(),
        )
        .unwrap();
        let c = |k: &str| counts["counts"][k].as_u64().unwrap();
        let paper_counts = [
            c("vision_model"),
            c("qformer") + c("query_tokens"),
            c("language_model") + c("language_projection") + c("language_model_lm_head_untied"),
        ];
        let (toy_split, paper_split) = (split(toy_counts), split(paper_counts));
        for t in 0..3 {
            assert!(
                (toy_split[t] - paper_split[t]).abs() <= 3.0,
                "{toy}: {toy_split:?} against {paper}'s {paper_split:?}"
            );
        }
    }
}
