//! `ressa eval`: zero-shot evaluation as the reference loops run it (reference §9). Reads a
//! LAVIS annotation list, generates answers or captions in batches (images decoded on a
//! background thread by `ressa_data::loader`), writes the predictions in the official result
//! format (`[{"question_id", "answer"}]` / `[{"image_id", "caption"}]`, to a temporary file
//! renamed at the end) and, given ground truth, prints one JSON object of metrics on stdout.
//!
//! Decoding defaults per task (LAVIS `predict_answers` / caption task):
//!
//! | Task | Prompt | Beams | Max new tokens | Min new tokens | Length penalty |
//! |---|---|---|---|---|---|
//! | vqav2, okvqa, gqa | `Question: {} Short answer:` | 5 | 10 | 0 (LAVIS `min_len=1`) | −1 |
//! | coco-caption, nocaps | empty | 5 | 30 | 7 (LAVIS `min_len=8`) | 1 |
//!
//! LAVIS passes `min_length=min_len` to `transformers`' `generate`, which for T5 counts the
//! decoder start token, so `min_len = L` is `--min-new-tokens L-1`. A decoder-only (Vicuna)
//! model generates from `inputs_embeds` there, so nothing else is counted and the default
//! minimum is LAVIS' `min_len` itself: 1 (VQA tasks) or 8 (captions).
//!
//! Decoder-only models get the prompt padded on the left after `[query outputs]` (as LAVIS'
//! `padding_side="left"` and `transformers`' InstructBLIP); the answer is what is generated
//! after the input, up to the first eos. As in `transformers` 5.25 (whose `input_ids` hold the
//! image placeholders and the prompt), the repetition penalty also counts the prompt tokens, all
//! but a row's leading padding (LLaVA's; InstructBLIP's rows start with the query placeholders,
//! so there nothing is left out); LAVIS' Vicuna generates from embeddings alone and counts only
//! the generated ones.
//!
//! Scoring: the ground truth is restricted to the items predicted (as pycocoevalcap scores
//! only the images in the results), so `--limit` and skipped images give subset scores; every
//! prediction must be in the ground truth. GQA's LAVIS list carries its answers and is used as
//! ground truth when `--ground-truth` is not given.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::prelude::*;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use ressa_data::lavis::{self, Id};
use ressa_data::loader::{BadImages, Example, ImageTransform, Loader, LoaderConfig};
use ressa_data::prompts;
use ressa_eval::Task;
use ressa_eval::formats::{self, CaptionPrediction, CocoCaptions, VqaPrediction};
use ressa_models::generate::{GenerationConfig, generate};
use ressa_models::parallel::{device_list, map_replicas};
use ressa_models::sparse_kernels::KernelRows;
use ressa_models::{LanguageModel, Pretrained, Processor, VisionLanguageModel};

use crate::backend::{BackendKind, ModelJob, run_model_job};
use crate::output::{refuse_alias, refuse_overwrite};

#[derive(clap::Args)]
pub struct Args {
    /// HF model directory (config.json, safetensors, tokenizers, preprocessor_config.json).
    #[arg(long)]
    model: PathBuf,
    /// vqav2 | okvqa | gqa | coco-caption | nocaps
    #[arg(long, value_parser = parse_task)]
    task: Task,
    /// LAVIS annotation list: vqa_val_eval.json / okvqa_val_eval.json, GQA
    /// testdev_balanced_questions.json, coco_karpathy_test.json, nocaps_val.json.
    #[arg(long)]
    annotations: PathBuf,
    /// Image root the annotations' `image` paths are relative to.
    #[arg(long)]
    images: PathBuf,
    /// Evaluate only the first N annotations.
    #[arg(long)]
    limit: Option<usize>,
    /// Beam width (1 = greedy). Default 5.
    #[arg(long)]
    beams: Option<usize>,
    /// Default 10 (VQA tasks) or 30 (captions).
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Tokens generated before end-of-sequence is allowed. Default 0 (VQA tasks; LAVIS
    /// `min_len=1`) or 7 (captions; LAVIS `min_len=8`) for T5; 1 or 8 for a decoder-only model.
    #[arg(long)]
    min_new_tokens: Option<usize>,
    /// Beam score = log-prob sum / length^penalty. Default -1 (VQA tasks) or 1 (captions).
    #[arg(long, allow_negative_numbers = true)]
    length_penalty: Option<f32>,
    /// Repetition penalty (LAVIS generates with 1.5; 1.0 disables it).
    #[arg(long, default_value_t = 1.5)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Prompt template; `{}` is replaced by the question (processed as LAVIS does). Default
    /// "Question: {} Short answer:" for VQA tasks, empty for captions.
    #[arg(long)]
    prompt: Option<String>,
    /// Where the predictions go (official result format).
    #[arg(long, default_value = "predictions.json")]
    out: PathBuf,
    /// Official ground truth to score against: VQA annotation (+ question) file, GQA list,
    /// COCO-format caption file.
    #[arg(long, num_args = 1..)]
    ground_truth: Vec<PathBuf>,
    /// Leave out images that are missing or cannot be decoded (counted and reported) instead
    /// of stopping.
    #[arg(long)]
    skip_bad_images: bool,
    /// Image decoding threads (0 = number of CPUs).
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// Run pruned linears with the packed sparse CPU kernels (CSR / bitmask / N:M, or dense
    /// where the cost model says so); flex and ndarray backends only.
    #[arg(long)]
    sparse_kernels: bool,
    /// Data-parallel generation: N copies of the model (threads on a CPU backend, or devices
    /// 0..N-1 of a GPU backend), each taking whole batches; the batches and predictions are
    /// those of one device.
    #[arg(long, default_value_t = 1)]
    devices: usize,
    /// Several machines: node r generates for the r-th contiguous share of the questions;
    /// node 0 gathers the predictions in the questions' order (through burn's all-reduce),
    /// writes `--out` and scores once.
    #[command(flatten)]
    nodes: crate::nodes::NodeArgs,
}

fn parse_task(s: &str) -> Result<Task, String> {
    s.parse::<Task>().map_err(|e| e.to_string())
}

fn is_vqa(task: Task) -> bool {
    !task.is_captioning()
}

/// One item to evaluate.
struct Entry {
    id: Id,
    image: PathBuf,
    prompt: String,
}

/// The prompt template after task defaults, checked against the task.
fn prompt_template(args: &Args) -> Result<String> {
    let vqa = is_vqa(args.task);
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let prompt = args.prompt.clone().unwrap_or_else(|| {
        if vqa {
            prompts::VQA_PROMPT.to_string()
        } else {
            prompts::NOCAPS_PROMPT.to_string()
        }
    });
    let holes = prompts::placeholders(&prompt);
    if vqa && holes != 1 {
        bail!("--prompt: a VQA template needs exactly one `{{}}` for the question, found {holes}");
    }
    if !vqa && holes != 0 {
        bail!("--prompt: a captioning prompt has no question to fill in; remove the `{{}}`");
    }
    Ok(prompt)
}

/// Decoding settings after task defaults; `encoder_decoder`: LAVIS' `min_len` counts the
/// decoder start token (T5), not for a decoder-only model.
fn generation(args: &Args, encoder_decoder: bool) -> Result<GenerationConfig> {
    let vqa = is_vqa(args.task);
    let min_len = if vqa { 1 } else { 8 };
    let max_new_tokens = args.max_new_tokens.unwrap_or(if vqa { 10 } else { 30 });
    let generation = GenerationConfig {
        num_beams: args.beams.unwrap_or(5),
        max_new_tokens,
        // The default minimum never exceeds a given maximum.
        min_new_tokens: args.min_new_tokens.unwrap_or(
            if encoder_decoder {
                min_len - 1
            } else {
                min_len
            }
            .min(max_new_tokens),
        ),
        length_penalty: args.length_penalty.unwrap_or(if vqa { -1.0 } else { 1.0 }),
        early_stopping: false,
        repetition_penalty: args.repetition_penalty,
    };
    crate::generate::check_flags(&generation)?;
    Ok(generation)
}

fn read_entries(args: &Args, template: &str) -> Result<Vec<Entry>> {
    let ann = &args.annotations;
    let path = |rel: &str| lavis::image_path(&args.images, rel, ann);
    let question = |q: &str| prompts::fill(template, &prompts::pre_question(q, prompts::MAX_WORDS));
    let caption_prompt = prompts::fill(template, "");
    let mut entries: Vec<Entry> = match args.task {
        Task::Vqav2 | Task::Okvqa => lavis::read_vqa_eval(ann)?
            .into_iter()
            .map(|q| {
                Ok(Entry {
                    image: path(&q.image)?,
                    prompt: question(&q.question),
                    id: q.question_id,
                })
            })
            .collect::<Result<_, ressa_data::DataError>>()?,
        Task::Gqa => lavis::read_gqa(ann)?
            .into_iter()
            .map(|q| {
                Ok(Entry {
                    image: path(&q.image)?,
                    prompt: question(&q.question),
                    id: q.question_id,
                })
            })
            .collect::<Result<_, ressa_data::DataError>>()?,
        Task::CocoCaption | Task::Nocaps => {
            let items = if args.task == Task::Nocaps {
                lavis::read_nocaps_eval(ann)?
            } else {
                lavis::read_coco_caption_eval(ann)?
            };
            items
                .into_iter()
                .map(|c| {
                    Ok(Entry {
                        image: path(&c.image)?,
                        prompt: caption_prompt.clone(),
                        id: Id::Int(c.image_id),
                    })
                })
                .collect::<Result<_, ressa_data::DataError>>()?
        }
    };
    if let Some(n) = args.limit {
        if n == 0 {
            bail!("--limit must be at least 1");
        }
        entries.truncate(n);
    }
    let mut seen = HashSet::new();
    for e in &entries {
        if !seen.insert(&e.id) {
            bail!(
                "{}: {} id {} appears twice; the result file could not tell the predictions apart",
                ann.display(),
                if is_vqa(args.task) {
                    "question"
                } else {
                    "image"
                },
                e.id
            );
        }
    }
    Ok(entries)
}

fn to_eval_id(id: &Id) -> ressa_eval::Id {
    match id {
        Id::Int(i) => ressa_eval::Id::Int(*i),
        Id::Str(s) => ressa_eval::Id::Str(s.clone()),
    }
}

pub fn run(kind: BackendKind, mut args: Args) -> Result<()> {
    args.model = crate::backend::model_dir(&args.model)?;
    if args.sparse_kernels {
        kind.check_sparse_kernels()?;
    }
    // Settings that do not need the model, checked before anything is read.
    generation(&args, true)?;
    const MAX_WORKERS: usize = 256;
    if args.workers > MAX_WORKERS {
        bail!(
            "--workers {}: at most {MAX_WORKERS} image decoding threads (0 = one per CPU)",
            args.workers
        );
    }
    let template = prompt_template(&args)?;
    if args.devices == 0 {
        bail!("--devices 0: expected at least 1");
    }
    if !args.images.is_dir() {
        bail!("--images {}: not a directory", args.images.display());
    }
    refuse_alias("--out", &args.out, &[("model directory", &args.model)])?;
    let mut inputs: Vec<(&str, &Path)> = vec![
        ("annotation list", &args.annotations),
        ("image directory", &args.images),
    ];
    inputs.extend(
        args.ground_truth
            .iter()
            .map(|p| ("ground-truth file", p.as_path())),
    );
    refuse_overwrite("--out", &args.out, &inputs)?;
    let entries = read_entries(&args, &template)?;
    let missing: Vec<&Entry> = entries.iter().filter(|e| !e.image.is_file()).collect();
    if let Some(first) = missing.first()
        && !args.skip_bad_images
    {
        bail!(
            "{}: {} of the {} images listed are missing under {} (first: {}); \
             pass --skip-bad-images to evaluate the rest",
            args.annotations.display(),
            missing.len(),
            entries.len(),
            args.images.display(),
            first.image.display()
        );
    }
    let cluster = args.nodes.cluster()?;
    let lead = cluster.as_ref().is_none_or(|c| c.node_rank == 0);
    let gt = ground_truth(&args)?;
    // Fail now, not after the generation, if the output cannot be written.
    let out = match lead {
        true => Some(OutputFile::create(&args.out)?),
        false => None,
    };
    // Joined before the model loads, so a node that cannot reach the others fails fast.
    let quiet = cluster
        .as_ref()
        .and_then(|_| crate::nodes::StdoutToStderr::new());
    let mut link = match &cluster {
        Some(c) => {
            tracing::info!(
                nodes = c.nodes,
                node_rank = c.node_rank,
                "joining the other nodes"
            );
            Some(
                ressa_train::cluster::NodeLink::<burn::backend::Flex>::connect(
                    c,
                    &Default::default(),
                )?,
            )
        }
        None => None,
    };
    let share = match &cluster {
        Some(c) => ressa_train::parallel::shard(entries.len(), c.node_rank, c.nodes),
        None => 0..entries.len(),
    };
    if args.task == Task::Okvqa {
        tracing::warn!(
            "OK-VQA predictions are not lemmatised (the reference lemmatises NOUN/VERB tokens with spaCy)"
        );
    }
    let dir = args.model.clone();
    let mut job = Job {
        args: &args,
        template: &template,
        entries: &entries[share],
        predictions: None,
    };
    run_model_job(kind, &dir, &mut job)?;
    let (mut predictions, mut skipped) = job.predictions.take().expect("the job predicted");
    if let (Some(link), Some(c)) = (link.as_mut(), &cluster) {
        let mine = serde_json::to_vec(&(&predictions, skipped))?;
        let all = link.gather_bytes(&mine)?;
        if c.node_rank > 0 {
            tracing::info!(
                node = c.node_rank,
                predictions = predictions.len(),
                "sent this node's predictions to node 0"
            );
            return Ok(());
        }
        (predictions, skipped) = (Vec::with_capacity(entries.len()), 0);
        for (node, bytes) in all.iter().enumerate() {
            let (p, s): (Vec<Option<String>>, usize) = serde_json::from_slice(bytes)
                .with_context(|| format!("the predictions of node {node}"))?;
            predictions.extend(p);
            skipped += s;
        }
    }
    drop(link);
    drop(quiet);
    let out = out.expect("node 0 writes the predictions");

    let kept: Vec<(&Entry, &String)> = entries
        .iter()
        .zip(&predictions)
        .filter_map(|(e, p)| p.as_ref().map(|p| (e, p)))
        .collect();
    if kept.is_empty() {
        bail!(
            "no image could be read: all {} items were skipped",
            entries.len()
        );
    }
    let json = if is_vqa(args.task) {
        serde_json::Value::Array(
            kept.iter()
                .map(|(e, p)| serde_json::json!({"question_id": e.id, "answer": p}))
                .collect(),
        )
    } else {
        serde_json::Value::Array(
            kept.iter()
                .map(|(e, p)| serde_json::json!({"image_id": e.id, "caption": p}))
                .collect(),
        )
    };
    out.commit(&serde_json::to_vec(&json)?)?;
    tracing::info!(path = %args.out.display(), predictions = kept.len(), skipped, "wrote predictions");

    let mut metrics = match &gt {
        Some(gt) => score(gt, &kept, &args.out)?,
        None => BTreeMap::new(),
    };
    metrics.insert("num_predictions".into(), kept.len() as f64);
    metrics.insert("num_skipped".into(), skipped as f64);
    println!("{}", serde_json::to_string(&metrics)?);
    Ok(())
}

struct Job<'a> {
    args: &'a Args,
    template: &'a str,
    entries: &'a [Entry],
    predictions: Option<(Vec<Option<String>>, usize)>,
}

impl ModelJob for &mut Job<'_> {
    fn run<B: Backend, M: VisionLanguageModel<B>>(
        self,
        config: M::Config,
        device: &B::Device,
    ) -> Result<()> {
        let pretrained = Pretrained::<B, M>::load_with(&self.args.model, config, device)?;
        self.predictions = Some(predict(
            self.args,
            self.template,
            pretrained,
            self.entries,
            device,
        )?);
        Ok(())
    }
}

/// Generates for every entry; `None` where the image was skipped. Returns the skip count.
fn predict<B: Backend, M: VisionLanguageModel<B>>(
    args: &Args,
    template: &str,
    mut pretrained: Pretrained<B, M>,
    entries: &[Entry],
    device: &B::Device,
) -> Result<(Vec<Option<String>>, usize)> {
    let generation = generation(args, pretrained.model.language_model().is_encoder_decoder())?;
    tracing::info!(
        task = %args.task,
        items = entries.len(),
        beams = generation.num_beams,
        max_new_tokens = generation.max_new_tokens,
        min_new_tokens = generation.min_new_tokens,
        length_penalty = generation.length_penalty,
        prompt = %template,
        "evaluating"
    );
    let processor = Processor::for_model(&args.model, &pretrained.model)?;
    if args.sparse_kernels {
        // kernels are chosen for a full batch and the mean prompt length of the first items
        let sample = &entries[..entries.len().min(64)];
        let mut prompt_tokens = 0;
        for e in sample {
            prompt_tokens += processor.tokenizer.encode(&e.prompt)?.len();
        }
        let batch = args.batch_size.min(entries.len()).max(1);
        crate::generate::use_sparse_kernels(
            &mut pretrained.model,
            KernelRows {
                images: batch,
                decode: batch * generation.num_beams,
                prompt: prompt_tokens.div_ceil(sample.len().max(1)),
            },
        )?;
    }
    let examples: Vec<Example> = entries
        .iter()
        .map(|e| Example {
            image: e.image.clone(),
            text_input: e.prompt.clone(),
            text_output: None,
        })
        .collect();
    let loader = Loader::new(
        examples,
        ImageTransform::Eval(processor.image.clone()),
        processor.texts(false),
        LoaderConfig {
            batch_size: args.batch_size,
            prefetch: 2,
            threads: args.workers,
            bad_images: if args.skip_bad_images {
                BadImages::Skip
            } else {
                BadImages::Fail
            },
        },
    )?;

    let bar =
        ProgressBar::with_draw_target(Some(entries.len() as u64), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {pos}/{len} [{elapsed_precise}] {wide_bar} {per_sec} eta {eta}",
        )
        .expect("valid template"),
    );
    let start = Instant::now();
    let mut predictions: Vec<Option<String>> = vec![None; entries.len()];
    let mut loader = loader;
    let devices = device_list::<B>(device, args.devices)?;
    if devices.len() > 1 {
        tracing::info!(devices = devices.len(), "data-parallel generation");
    }
    // Whole loader batches to each copy of the model: the batches (and so the predictions)
    // are those of one device.
    let batches = map_replicas::<B, _, _, _, anyhow::Error, _>(
        &pretrained.model,
        &devices,
        loader.by_ref(),
        |model, device, batch| {
            let batch = batch?;
            // Padded on the language model's side (a decoder-only model continues the
            // prompt: left).
            let inputs = processor.batch_inputs::<B>(&batch, device)?;
            let out = generate(model, &inputs, &generation)?;
            let mut texts = Vec::with_capacity(batch.len());
            for (r, &i) in batch.indices.iter().enumerate() {
                let text = processor
                    .decode(&out.answer(r))
                    .context("decoding the generated tokens")?;
                texts.push((i, text.trim().to_string()));
            }
            bar.inc(batch.len() as u64);
            Ok(texts)
        },
    )?;
    for (i, text) in batches.into_iter().flatten() {
        predictions[i] = Some(text);
    }
    let skipped = loader.skipped_items();
    bar.finish_and_clear();
    for s in skipped.iter().take(10) {
        tracing::warn!(index = s.index, reason = %s.reason, "skipped an image");
    }
    let done = entries.len() - skipped.len();
    let secs = start.elapsed().as_secs_f64();
    tracing::info!(
        items = done,
        skipped = skipped.len(),
        seconds = format!("{secs:.1}"),
        items_per_s = format!("{:.2}", done as f64 / secs.max(1e-9)),
        "generation done"
    );
    if !skipped.is_empty() {
        eprintln!(
            "skipped {} of {} items whose image could not be read (first: {})",
            skipped.len(),
            entries.len(),
            skipped[0].reason
        );
    }
    Ok((predictions, skipped.len()))
}

/// Ground truth read before generating, so a wrong file fails fast.
enum GroundTruth {
    Vqa {
        path: PathBuf,
        annotations: Vec<formats::VqaAnnotation>,
        questions: Option<(PathBuf, HashSet<ressa_eval::Id>)>,
    },
    Gqa {
        path: PathBuf,
        annotations: Vec<formats::GqaAnnotation>,
    },
    Captions {
        path: PathBuf,
        gt: CocoCaptions,
    },
}

fn eval_err(e: ressa_eval::EvalError) -> anyhow::Error {
    e.into()
}

fn ground_truth(args: &Args) -> Result<Option<GroundTruth>> {
    let files = if args.ground_truth.is_empty() && args.task == Task::Gqa {
        // The LAVIS GQA list carries the answers.
        vec![args.annotations.clone()]
    } else {
        args.ground_truth.clone()
    };
    if files.is_empty() {
        return Ok(None);
    }
    Ok(Some(match args.task {
        Task::Vqav2 | Task::Okvqa => {
            let mut annotations = None;
            let mut questions = None;
            for p in &files {
                let f = formats::read_vqa_file(p).map_err(eval_err)?;
                match (f.annotations, f.questions) {
                    (Some(a), _) if annotations.is_none() => annotations = Some((p.clone(), a)),
                    (None, Some(q)) if questions.is_none() => {
                        questions = Some((
                            p.clone(),
                            q.into_iter().map(|q| q.question_id).collect::<HashSet<_>>(),
                        ))
                    }
                    (None, None) => bail!(
                        "{}: neither an `annotations` nor a `questions` list: not an official VQA file",
                        p.display()
                    ),
                    _ => bail!(
                        "{}: a second VQA annotation or question file was given",
                        p.display()
                    ),
                }
            }
            let Some((path, annotations)) = annotations else {
                bail!(
                    "--ground-truth: VQA scoring needs the official annotation file (`annotations` list)"
                );
            };
            GroundTruth::Vqa {
                path,
                annotations,
                questions,
            }
        }
        Task::Gqa => {
            let [p] = files.as_slice() else {
                bail!("--ground-truth: gqa takes one file, got {}", files.len());
            };
            GroundTruth::Gqa {
                path: p.clone(),
                annotations: formats::read_gqa_annotations(p).map_err(eval_err)?,
            }
        }
        Task::CocoCaption | Task::Nocaps => {
            let [p] = files.as_slice() else {
                bail!(
                    "--ground-truth: {} takes one COCO-format file, got {}",
                    args.task,
                    files.len()
                );
            };
            GroundTruth::Captions {
                path: p.clone(),
                gt: formats::read_coco_captions(p).map_err(eval_err)?,
            }
        }
    }))
}

/// Metrics of the predictions against the ground truth restricted to the predicted ids.
fn score(
    gt: &GroundTruth,
    kept: &[(&Entry, &String)],
    pred_path: &Path,
) -> Result<BTreeMap<String, f64>> {
    let ids: HashSet<ressa_eval::Id> = kept.iter().map(|(e, _)| to_eval_id(&e.id)).collect();
    let log = |path: &Path, used: usize, total: usize| {
        tracing::info!(
            ground_truth = %path.display(),
            used,
            total,
            "scoring against the ground-truth items predicted"
        );
    };
    let vqa_predictions = || -> Vec<VqaPrediction> {
        kept.iter()
            .map(|(e, p)| VqaPrediction {
                question_id: to_eval_id(&e.id),
                answer: (*p).clone(),
            })
            .collect()
    };
    match gt {
        GroundTruth::Vqa {
            path,
            annotations,
            questions,
        } => {
            if let Some((qpath, qids)) = questions
                && let Some((e, _)) = kept
                    .iter()
                    .find(|(e, _)| !qids.contains(&to_eval_id(&e.id)))
            {
                bail!(
                    "{}: question id {} of the annotations is not in this question file",
                    qpath.display(),
                    e.id
                );
            }
            let subset: Vec<formats::VqaAnnotation> = annotations
                .iter()
                .filter(|a| ids.contains(&a.question_id))
                .cloned()
                .collect();
            log(path, subset.len(), annotations.len());
            let preds = vqa_predictions();
            let report = ressa_eval::evaluate_vqa(&subset, &preds, None, pred_path, path)
                .map_err(eval_err)?;
            Ok(report.metrics())
        }
        GroundTruth::Gqa { path, annotations } => {
            let subset: Vec<formats::GqaAnnotation> = annotations
                .iter()
                .filter(|a| ids.contains(&a.question_id))
                .cloned()
                .collect();
            log(path, subset.len(), annotations.len());
            let preds = vqa_predictions();
            let report =
                ressa_eval::evaluate_gqa(&subset, &preds, pred_path, path).map_err(eval_err)?;
            Ok(BTreeMap::from([("accuracy".to_string(), report.accuracy)]))
        }
        GroundTruth::Captions { path, gt } => {
            let subset = CocoCaptions {
                images: gt
                    .images
                    .iter()
                    .filter(|i| ids.contains(&i.id))
                    .cloned()
                    .collect(),
                annotations: gt
                    .annotations
                    .iter()
                    .filter(|a| ids.contains(&a.image_id))
                    .cloned()
                    .collect(),
            };
            log(path, subset.images.len(), gt.images.len());
            let preds: Vec<CaptionPrediction> = kept
                .iter()
                .map(|(e, p)| CaptionPrediction {
                    image_id: to_eval_id(&e.id),
                    caption: (*p).clone(),
                })
                .collect();
            let report = ressa_eval::evaluate_captions(&subset, &preds, pred_path, path)
                .map_err(eval_err)?;
            Ok(report.metrics())
        }
    }
}

/// The predictions file: a registered temporary beside the target (removed on failure or
/// interrupt), renamed over it on success.
struct OutputFile {
    tmp: ressa_scratch::Scratch,
    target: PathBuf,
}

impl OutputFile {
    fn create(target: &Path) -> Result<Self> {
        if target.file_name().is_none() {
            bail!("--out {}: not a file path", target.display());
        }
        if target.is_dir() {
            bail!(
                "--out {}: is a directory, expected a file path",
                target.display()
            );
        }
        if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
            ressa_scratch::sweep_stale(parent);
        }
        let tmp = ressa_scratch::Scratch::beside(target, "partial");
        std::fs::File::create(tmp.path()).with_context(|| {
            format!(
                "--out {}: cannot create {}",
                target.display(),
                tmp.path().display()
            )
        })?;
        Ok(Self {
            tmp,
            target: target.to_path_buf(),
        })
    }

    fn commit(self, bytes: &[u8]) -> Result<()> {
        let path = self.tmp.path();
        let mut f = std::fs::File::create(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("cannot write {}", path.display()))?;
        std::fs::rename(path, &self.target).with_context(|| {
            format!(
                "cannot rename {} to {}",
                path.display(),
                self.target.display()
            )
        })?;
        self.tmp.persist();
        Ok(())
    }
}
