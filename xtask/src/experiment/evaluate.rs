//! Scoring a model on the data's test split: VQA accuracy (the official per-question formula)
//! from greedy answers, CIDEr-D and BLEU-4 from greedy captions. Captions of the toy world are
//! lower-case words without punctuation, so they are split on spaces instead of the PTB
//! tokenizer.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Result, anyhow};
use burn::prelude::*;
use ressa_data::lavis::{image_path, read_nocaps_eval, read_vqa_train};
use ressa_data::loader::{Example, ImageTransform, Loader, LoaderConfig};
use ressa_data::prompts::{CAPTION_PROMPT, MAX_WORDS, pre_question, vqa_prompt};
use ressa_eval::vqa::{GtAnswer, gqa_question_accuracy, vqa_question_accuracy};
use ressa_models::generate::{GenerationConfig, generate};
use ressa_models::parallel::map_replicas;
use ressa_models::{Pretrained, Processor, VisionLanguageModel};
use ressa_report::results::{Metrics, TaskMetrics, TypeScore};
use serde::Deserialize;

use super::config::{Eval, ResolvedTask, TaskKind};

/// One scored VQA question.
struct VqaItem {
    example: Example,
    answers: Answers,
    question_type: Option<String>,
    answer_type: Option<String>,
}

/// Human answers (VQA accuracy) or one answer (GQA: exact match after normalisation).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Answers {
    Many(Vec<String>),
    One(String),
}

impl Answers {
    fn accuracy(&self, prediction: &str) -> f64 {
        match self {
            Answers::Many(gt) => vqa_question_accuracy(prediction, &gt_answers(gt)).unwrap_or(0.0),
            Answers::One(gt) => gqa_question_accuracy(prediction, gt),
        }
    }
}

/// A VQA test item: LAVIS' train-list format (VQAv2, OK-VQA) or GQA's (one answer string);
/// question and answer types when the list carries them.
#[derive(Debug, Deserialize)]
struct VqaTestItem {
    question_id: serde_json::Value,
    question: String,
    image: String,
    answer: Answers,
    #[serde(default)]
    question_type: Option<String>,
    #[serde(default)]
    answer_type: Option<String>,
}

/// The types of the official VQAv2 annotations file.
#[derive(Debug, Deserialize)]
struct TypeFile {
    annotations: Vec<TypeEntry>,
}

#[derive(Debug, Deserialize)]
struct TypeEntry {
    question_id: serde_json::Value,
    #[serde(default)]
    question_type: Option<String>,
    #[serde(default)]
    answer_type: Option<String>,
}

/// A question id as a map key (ids are numbers in VQAv2, strings in GQA).
fn id_key(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path, key: &str, what: &str) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|e| anyhow!("{key}: {}: {e}", path.display()))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| anyhow!("{key}: {}: expected {what}: {e}", path.display()))
}

/// One task's items, read once per study.
pub struct LoadedTask {
    pub name: String,
    pub kind: TaskKind,
    pub file: std::path::PathBuf,
    vqa: Vec<VqaItem>,
    captions: Vec<(Example, Vec<String>)>,
}

impl LoadedTask {
    /// Items scored.
    pub fn len(&self) -> usize {
        self.vqa.len() + self.captions.len()
    }

    fn load(t: &ResolvedTask) -> Result<Self> {
        t.check_files()?;
        let images = t.images.as_path();
        let key = format!("{}.file", t.key);
        let mut vqa = Vec::new();
        let mut captions = Vec::new();
        match t.kind {
            TaskKind::Vqa => {
                let items: Vec<VqaTestItem> = read_json(
                    &t.file,
                    &key,
                    "a list of {question_id, question, image, answer}",
                )?;
                let types: BTreeMap<String, (Option<String>, Option<String>)> =
                    match &t.question_types {
                        None => BTreeMap::new(),
                        Some(p) => read_json::<TypeFile>(
                            p,
                            &format!("{}.question_types", t.key),
                            "VQAv2 annotations {\"annotations\": [{question_id, question_type, answer_type}]}",
                        )?
                        .annotations
                        .into_iter()
                        .map(|a| (id_key(&a.question_id), (a.question_type, a.answer_type)))
                        .collect(),
                    };
                for (i, it) in items.into_iter().take(t.items).enumerate() {
                    if matches!(&it.answer, Answers::Many(a) if a.is_empty()) {
                        return Err(anyhow!(
                            "{key}: {}: [{i}].answer is empty",
                            t.file.display()
                        ));
                    }
                    let (qt, at) = types
                        .get(&id_key(&it.question_id))
                        .cloned()
                        .unwrap_or_default();
                    vqa.push(VqaItem {
                        example: Example {
                            image: image_path(images, &it.image, &t.file)?,
                            text_input: vqa_prompt(&pre_question(&it.question, MAX_WORDS)),
                            text_output: None,
                        },
                        answers: it.answer,
                        question_type: it.question_type.or(qt),
                        answer_type: it.answer_type.or(at),
                    });
                }
            }
            TaskKind::Caption => {
                for it in read_nocaps_eval(&t.file)
                    .map_err(|e| anyhow!("{key}: {e}"))?
                    .into_iter()
                    .take(t.items)
                {
                    captions.push((
                        Example {
                            image: image_path(images, &it.image, &t.file)?,
                            text_input: CAPTION_PROMPT.to_string(),
                            text_output: None,
                        },
                        it.references,
                    ));
                }
            }
        }
        if vqa.is_empty() && captions.is_empty() {
            return Err(anyhow!("{key}: {} has no items", t.file.display()));
        }
        Ok(Self {
            name: t.name.clone(),
            kind: t.kind,
            file: t.file.clone(),
            vqa,
            captions,
        })
    }
}

/// The test tasks, read once per study.
pub struct TestSet {
    pub tasks: Vec<LoadedTask>,
}

impl TestSet {
    pub fn load(data: &Path, eval: &Eval) -> Result<Self> {
        let tasks = eval
            .resolved_tasks(data)?
            .iter()
            .map(LoadedTask::load)
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { tasks })
    }

    /// Accuracy of a blind model on every VQA task: for each test question, the most frequent
    /// training answer to the same (processed) question text, else the most frequent answer
    /// overall. The floor a model that does not read the image can reach ("chance" in the
    /// report).
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
        let mut m = Metrics::default();
        for task in self.tasks.iter().filter(|t| t.kind == TaskKind::Vqa) {
            let guesses: Vec<String> = task
                .vqa
                .iter()
                .map(|q| {
                    by_question
                        .get(&q.example.text_input)
                        .map(most)
                        .unwrap_or_else(|| fallback.clone())
                })
                .collect();
            let t = vqa_scores(task, &guesses);
            m.vqa_accuracy = m.vqa_accuracy.or(t.vqa_accuracy);
            m.tasks.insert(task.name.clone(), t);
        }
        Ok(m)
    }
}

/// Accuracy overall and per question / answer type.
fn vqa_scores(task: &LoadedTask, preds: &[String]) -> TaskMetrics {
    let acc: Vec<f64> = preds
        .iter()
        .zip(&task.vqa)
        .map(|(p, q)| q.answers.accuracy(p))
        .collect();
    let by = |ty: &dyn Fn(&VqaItem) -> Option<&String>| {
        let mut sums = BTreeMap::<String, (f64, usize)>::new();
        for (a, q) in acc.iter().zip(&task.vqa) {
            if let Some(t) = ty(q) {
                let e = sums.entry(t.clone()).or_default();
                e.0 += a;
                e.1 += 1;
            }
        }
        sums.into_iter()
            .map(|(t, (s, n))| {
                (
                    t,
                    TypeScore {
                        accuracy: s / n as f64,
                        items: n,
                    },
                )
            })
            .collect()
    };
    TaskMetrics {
        vqa_accuracy: Some(mean(acc.iter().copied())),
        by_question_type: by(&|q| q.question_type.as_ref()),
        by_answer_type: by(&|q| q.answer_type.as_ref()),
        ..Default::default()
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
fn answers<B: Backend, M: VisionLanguageModel<B>>(
    model: &Pretrained<B, M>,
    examples: Vec<Example>,
    max_new_tokens: usize,
    batch_size: usize,
    devices: usize,
    device: &B::Device,
) -> Result<Vec<String>> {
    let processor = Processor::for_model(&model.dir, &model.model)?;
    let loader = Loader::new(
        examples,
        ImageTransform::Eval(processor.image.clone()),
        processor.texts(false),
        LoaderConfig {
            batch_size,
            ..Default::default()
        },
    )?;
    let gen_cfg = GenerationConfig {
        max_new_tokens,
        ..Default::default()
    };
    // Whole batches to each copy of the model, results in batch order.
    let devices = vec![device.clone(); devices.max(1)];
    let batches = map_replicas::<B, _, _, Vec<String>, anyhow::Error, _>(
        &model.model,
        &devices,
        loader,
        |m, device, batch| {
            let batch = batch?;
            let inputs = processor.batch_inputs::<B>(&batch, device)?;
            let generated = generate(m, &inputs, &gen_cfg)?;
            (0..batch.len())
                .map(|r| Ok(processor.decode(&generated.answer(r))?.trim().to_string()))
                .collect()
        },
    )?;
    Ok(batches.into_iter().flatten().collect())
}

/// Every task's scores of `model`; the headline VQA accuracy is the first VQA task's, CIDEr-D
/// and BLEU-4 the first caption task's.
pub fn evaluate<B: Backend, M: VisionLanguageModel<B>>(
    model: &Pretrained<B, M>,
    test: &TestSet,
    eval: &Eval,
    device: &B::Device,
) -> Result<Metrics> {
    let mut m = Metrics::default();
    for task in &test.tasks {
        let t = match task.kind {
            TaskKind::Vqa => {
                let preds = answers(
                    model,
                    task.vqa.iter().map(|q| q.example.clone()).collect(),
                    eval.max_answer_tokens,
                    eval.batch_size,
                    eval.devices,
                    device,
                )?;
                for (p, q) in preds.iter().zip(&task.vqa).take(5) {
                    tracing::debug!(task = %task.name, prompt = %q.example.text_input, prediction = %p, answer = ?q.answers, "vqa sample");
                }
                let t = vqa_scores(task, &preds);
                m.vqa_accuracy = m.vqa_accuracy.or(t.vqa_accuracy);
                t
            }
            TaskKind::Caption => {
                let preds = answers(
                    model,
                    task.captions.iter().map(|(e, _)| e.clone()).collect(),
                    eval.max_caption_tokens,
                    eval.batch_size,
                    eval.devices,
                    device,
                )?;
                let items: Vec<(String, Vec<String>)> = preds
                    .into_iter()
                    .zip(&task.captions)
                    .map(|(p, (_, refs))| {
                        (
                            p.to_lowercase(),
                            refs.iter().map(|r| r.to_lowercase()).collect(),
                        )
                    })
                    .collect();
                for (p, r) in items.iter().take(3) {
                    tracing::debug!(task = %task.name, prediction = %p, reference = %r[0], "caption sample");
                }
                let t = TaskMetrics {
                    cider: Some(ressa_eval::cider::cider(&items).corpus),
                    bleu4: Some(ressa_eval::bleu::bleu(&items).corpus[3]),
                    ..Default::default()
                };
                if m.cider.is_none() {
                    m.cider = t.cider;
                    m.bleu4 = t.bleu4;
                }
                t
            }
        };
        m.tasks.insert(task.name.clone(), t);
    }
    Ok(m)
}
