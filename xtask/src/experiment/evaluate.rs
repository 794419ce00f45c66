//! Scoring a model on the data's test split: VQA accuracy (the official per-question formula)
//! from greedy answers, CIDEr-D and BLEU-4 from greedy captions. Captions of the toy world are
//! lower-case words without punctuation, so they are split on spaces instead of the PTB
//! tokenizer.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Result, anyhow};
use burn::prelude::*;
use ressa_data::image::ImageProcessorConfig;
use ressa_data::lavis::{image_path, read_nocaps_eval, read_vqa_train};
use ressa_data::loader::{Example, ImageTransform, Loader, LoaderConfig, TextEncoder, Texts};
use ressa_data::prompts::{CAPTION_PROMPT, MAX_WORDS, pre_question, vqa_prompt};
use ressa_data::text::TextTokenizer;
use ressa_eval::vqa::{GtAnswer, vqa_question_accuracy};
use ressa_models::generate::{GenerationConfig, SpecialTokens, generate, strip_special};
use ressa_models::nn::ids_tensor;
use ressa_models::{Pretrained, VlmInputs};
use ressa_report::results::Metrics;

use super::config::Eval;

/// The test questions and captions, read once per study.
pub struct TestSet {
    vqa: Vec<(Example, Vec<String>)>,
    captions: Vec<(Example, Vec<String>)>,
}

impl TestSet {
    pub fn load(data: &Path, eval: &Eval) -> Result<Self> {
        let ann = data.join("annotations");
        let images = data.join("images");
        let vqa_file = ann.join("vqa_test.json");
        let mut vqa = Vec::new();
        for it in read_vqa_train(&vqa_file)?.into_iter().take(eval.vqa_items) {
            vqa.push((
                Example {
                    image: image_path(&images, &it.image, &vqa_file)?,
                    text_input: vqa_prompt(&pre_question(&it.question, MAX_WORDS)),
                    text_output: None,
                },
                it.answer,
            ));
        }
        let mut captions = Vec::new();
        if eval.caption_items > 0 {
            let cap_file = ann.join("caption_test_eval.json");
            for it in read_nocaps_eval(&cap_file)?
                .into_iter()
                .take(eval.caption_items)
            {
                captions.push((
                    Example {
                        image: image_path(&images, &it.image, &cap_file)?,
                        text_input: CAPTION_PROMPT.to_string(),
                        text_output: None,
                    },
                    it.references,
                ));
            }
        }
        Ok(Self { vqa, captions })
    }

    /// Accuracy of a blind model: for each test question, the most frequent training answer
    /// to the same (processed) question text, else the most frequent answer overall. The floor
    /// a model that does not read the image can reach ("chance" in the report).
    pub fn blind_baseline(&self, data: &Path) -> Result<Metrics> {
        let train = read_vqa_train(&data.join("annotations/vqa_train.json"))?;
        let mut by_question = BTreeMap::<String, BTreeMap<&str, usize>>::new();
        let mut overall = BTreeMap::<&str, usize>::new();
        for it in &train {
            let a = it.answer[0].as_str();
            *overall.entry(a).or_default() += 1;
            *by_question
                .entry(vqa_prompt(&pre_question(&it.question, MAX_WORDS)))
                .or_default()
                .entry(a)
                .or_default() += 1;
        }
        let most = |counts: &BTreeMap<&str, usize>| {
            counts
                .iter()
                .max_by_key(|(_, n)| **n)
                .map(|(a, _)| a.to_string())
                .unwrap_or_default()
        };
        let fallback = most(&overall);
        let acc = mean(self.vqa.iter().map(|(ex, gt)| {
            let guess = by_question
                .get(&ex.text_input)
                .map(most)
                .unwrap_or_else(|| fallback.clone());
            vqa_question_accuracy(&guess, &gt_answers(gt)).unwrap_or(0.0)
        }));
        Ok(Metrics {
            vqa_accuracy: Some(acc),
            cider: None,
            bleu4: None,
        })
    }
}

/// The human answers as the official annotation dicts: each with its own `answer_id`, so the
/// leave-one-out comparison of the VQA script tells them apart.
fn gt_answers(answers: &[String]) -> Vec<GtAnswer> {
    answers
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let mut fields = serde_json::Map::new();
            fields.insert("answer_id".into(), serde_json::Value::from(i + 1));
            GtAnswer::with_fields(a, &fields)
        })
        .collect()
}

fn mean(it: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = it.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 { 0.0 } else { s / n as f64 }
}

/// Greedy generation for `examples`, decoded.
fn answers<B: Backend>(
    model: &Pretrained<B>,
    examples: Vec<Example>,
    max_new_tokens: usize,
    batch_size: usize,
    device: &B::Device,
) -> Result<Vec<String>> {
    let dir = &model.dir;
    let processor = ImageProcessorConfig::from_file(&dir.join("preprocessor_config.json"))?;
    let tok = Arc::new(TextTokenizer::from_file(&dir.join("tokenizer.json"))?);
    let qtok = Arc::new(
        TextTokenizer::from_file(&dir.join("qformer_tokenizer/tokenizer.json"))?
            .with_truncation(model.config.qformer.max_position_embeddings, true)?,
    );
    let t5 = model
        .config
        .text
        .as_t5()
        .ok_or_else(|| anyhow!("the experiment runner evaluates T5 models only"))?;
    let tokens = SpecialTokens {
        decoder_start: t5.decoder_start_token(),
        eos: t5.eos_token(),
        pad: t5.pad_token(),
    };
    let loader = Loader::new(
        examples,
        ImageTransform::Eval(processor),
        Texts {
            input: Some(TextEncoder {
                tokenizer: tok.clone(),
                pad: tokens.pad,
            }),
            qformer: Some(TextEncoder {
                tokenizer: qtok,
                pad: 0,
            }),
            output: None,
        },
        LoaderConfig {
            batch_size,
            ..Default::default()
        },
    )?;
    let gen_cfg = GenerationConfig {
        max_new_tokens,
        ..Default::default()
    };
    let mut out = Vec::new();
    for batch in loader {
        let batch = batch?;
        let b = batch.len();
        let (h, w) = batch.image_size;
        let input = batch.input.as_ref().expect("prompt tokens");
        let q = batch.qformer.as_ref().expect("Q-Former tokens");
        let mask = |rows: &Vec<Vec<u32>>| {
            let l = rows[0].len();
            let v: Vec<f32> = rows.iter().flatten().map(|&m| m as f32).collect();
            Tensor::<B, 2>::from_data(TensorData::new(v, [rows.len(), l]), device)
        };
        let inputs = VlmInputs {
            pixel_values: Tensor::from_data(
                TensorData::new(batch.pixel_values.clone(), [b, 3, h, w]),
                device,
            ),
            qformer_text: Some((ids_tensor::<B>(&q.ids, device), mask(&q.mask))),
            input_ids: ids_tensor::<B>(&input.ids, device),
            attention_mask: mask(&input.mask),
        };
        for seq in generate(&model.model, &inputs, &gen_cfg, tokens) {
            out.push(tok.decode(&strip_special(&seq, tokens))?.trim().to_string());
        }
    }
    Ok(out)
}

/// VQA accuracy, CIDEr-D and BLEU-4 of `model` on the test set.
pub fn evaluate<B: Backend>(
    model: &Pretrained<B>,
    test: &TestSet,
    eval: &Eval,
    device: &B::Device,
) -> Result<Metrics> {
    let mut m = Metrics {
        vqa_accuracy: None,
        cider: None,
        bleu4: None,
    };
    if !test.vqa.is_empty() {
        let preds = answers(
            model,
            test.vqa.iter().map(|(e, _)| e.clone()).collect(),
            eval.max_answer_tokens,
            eval.batch_size,
            device,
        )?;
        for (p, (e, gt)) in preds.iter().zip(&test.vqa).take(5) {
            tracing::debug!(prompt = %e.text_input, prediction = %p, answer = %gt[0], "vqa sample");
        }
        m.vqa_accuracy =
            Some(mean(preds.iter().zip(&test.vqa).map(|(p, (_, gt))| {
                vqa_question_accuracy(p, &gt_answers(gt)).unwrap_or(0.0)
            })));
    }
    if !test.captions.is_empty() {
        let preds = answers(
            model,
            test.captions.iter().map(|(e, _)| e.clone()).collect(),
            eval.max_caption_tokens,
            eval.batch_size,
            device,
        )?;
        let items: Vec<(String, Vec<String>)> = preds
            .into_iter()
            .zip(&test.captions)
            .map(|(p, (_, refs))| {
                (
                    p.to_lowercase(),
                    refs.iter().map(|r| r.to_lowercase()).collect(),
                )
            })
            .collect();
        for (p, r) in items.iter().take(3) {
            tracing::debug!(prediction = %p, reference = %r[0], "caption sample");
        }
        m.cider = Some(ressa_eval::cider::cider(&items).corpus);
        m.bleu4 = Some(ressa_eval::bleu::bleu(&items).corpus[3]);
    }
    Ok(m)
}
