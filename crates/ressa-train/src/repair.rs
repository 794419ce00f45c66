//! A whole RESSA repair, as `ressa repair` and experiment configs run it: the dense model (the
//! teacher's and the student's `W`), masks from the pruned model (its `masks.safetensors`
//! sidecar, or its zeros), SparseLoRA attached, trained, merged with exactly the pruned zeros
//! and written as an HF directory, plus the adapters alone in PEFT's layout.
//!
//! ```toml
//! pruned = "out/wanda-50"          # the pruned model directory
//! dense = "models/instructblip"    # the dense model (teacher); optional when lambda = 0
//! out = "out/wanda-50-ressa"
//! [data]
//! train = "data/cc3m/train.json"   # LAVIS caption list or VQA train list
//! images = "data/cc3m/images"
//! val = "data/cc3m/val.json"       # optional held-out list of the same format
//! [train]                          # see TrainConfig; all optional
//! steps = 390
//! batch_size = 8
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use ressa_data::image::ImageProcessorConfig;
use ressa_data::lavis::{image_path, read_caption_list, read_vqa_train};
use ressa_data::loader::{Example, TextEncoder, Texts};
use ressa_data::prompts::{CAPTION_PROMPT, MAX_WORDS, pre_caption, pre_question, vqa_prompt};
use ressa_data::text::TextTokenizer;
use ressa_models::instructblip::save_model_dir_with;
use ressa_models::weights::WeightStore;
use ressa_models::{ModelError, Pretrained};
use ressa_sparse::Mask;
use serde::{Deserialize, Serialize};

use crate::batch::TokenIds;
use crate::sparse_lora::{
    StudentWeights, adapter_values, attach, for_each_linear_mut, merge, write_peft_adapters,
};
use crate::trainer::{TrainConfig, TrainData, TrainEvent, TrainReport, train};

/// Training data files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// LAVIS caption list `[{"image", "caption"}]` or VQA train list
    /// `[{"question_id", "question", "answer": [...], "image"}]`.
    pub train: PathBuf,
    /// Image root of the lists.
    pub images: PathBuf,
    /// Held-out list of the same format (validation loss and token accuracy).
    #[serde(default)]
    pub val: Option<PathBuf>,
    /// Prompt of caption items (default: LAVIS' "a photo of").
    #[serde(default)]
    pub caption_prompt: Option<String>,
    /// Use at most this many training examples (the first N).
    #[serde(default)]
    pub max_examples: Option<usize>,
}

/// One repair run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepairConfig {
    pub pruned: PathBuf,
    #[serde(default)]
    pub dense: Option<PathBuf>,
    pub out: PathBuf,
    pub data: DataConfig,
    #[serde(default)]
    pub train: TrainConfig,
    /// Checkpoint directory (default: `{out}.checkpoints`).
    #[serde(default)]
    pub checkpoints: Option<PathBuf>,
}

impl RepairConfig {
    /// Reads a TOML file; relative paths in it are relative to the file's directory.
    pub fn from_toml(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut cfg: RepairConfig = toml::from_str(&text)
            .map_err(|e| format!("{}: {}", path.display(), e.to_string().replace('\n', " ")))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut cfg.pruned);
        fix(&mut cfg.out);
        fix(&mut cfg.data.train);
        fix(&mut cfg.data.images);
        if let Some(p) = cfg.dense.as_mut() {
            fix(p);
        }
        if let Some(p) = cfg.data.val.as_mut() {
            fix(p);
        }
        if let Some(p) = cfg.checkpoints.as_mut() {
            fix(p);
        }
        Ok(cfg)
    }

    pub fn checkpoint_dir(&self) -> PathBuf {
        self.checkpoints.clone().unwrap_or_else(|| {
            let mut s = self.out.clone().into_os_string();
            s.push(".checkpoints");
            PathBuf::from(s)
        })
    }
}

/// Examples of a LAVIS caption or VQA train list (told apart by the first item's keys).
pub fn read_examples(
    annotations: &Path,
    images: &Path,
    caption_prompt: &str,
) -> Result<Vec<Example>, String> {
    let text = std::fs::read_to_string(annotations)
        .map_err(|e| format!("{}: {e}", annotations.display()))?;
    let is_vqa = serde_json::from_str::<serde_json::Value>(&text)
        .map_err(|e| format!("{}: {e}", annotations.display()))?
        .get(0)
        .and_then(|v| v.get("question"))
        .is_some();
    let s = |e: ressa_data::DataError| e.to_string();
    if is_vqa {
        read_vqa_train(annotations)
            .map_err(s)?
            .into_iter()
            .map(|it| {
                // The most frequent answer (first on ties), as LAVIS' single-answer targets.
                let answer = it
                    .answer_weights()
                    .into_iter()
                    .fold(None::<(String, f64)>, |best, (a, w)| match best {
                        Some((_, bw)) if bw >= w => best,
                        _ => Some((a, w)),
                    })
                    .map(|(a, _)| a)
                    .unwrap_or_default();
                Ok(Example {
                    image: image_path(images, &it.image, annotations).map_err(s)?,
                    text_input: vqa_prompt(&pre_question(&it.question, MAX_WORDS)),
                    text_output: Some(answer),
                })
            })
            .collect()
    } else {
        read_caption_list(annotations)
            .map_err(s)?
            .into_iter()
            .map(|it| {
                Ok(Example {
                    image: image_path(images, &it.image, annotations).map_err(s)?,
                    text_input: caption_prompt.to_string(),
                    text_output: Some(pre_caption(&it.caption, MAX_WORDS)),
                })
            })
            .collect()
    }
}

/// Masks of the pruned model: its `masks.safetensors`, or the zeros of its prunable weights.
/// Also the student's starting weights where the pruned kept values differ from the dense
/// ones (SparseGPT).
fn masks_and_student(
    pruned_dir: &Path,
    dense: &Pretrained<impl Backend>,
    linears: &[(String, [usize; 2])],
) -> Result<(BTreeMap<String, Mask>, StudentWeights), String> {
    let sidecar = pruned_dir.join("masks.safetensors");
    let mut masks = if sidecar.exists() {
        ressa_sparse::sidecar::read_masks(&sidecar).map_err(|e| e.to_string())?
    } else {
        BTreeMap::new()
    };
    let me = |e: ModelError| e.to_string();
    let pruned = WeightStore::open_dir(pruned_dir).map_err(me)?;
    let dense_store = WeightStore::open_dir(&dense.dir).map_err(me)?;
    let mut student = StudentWeights::new();
    for (name, [d_in, d_out]) in linears {
        let key = format!("{name}.weight");
        // PyTorch [d_out, d_in] on disk.
        let p = pruned.get(&key, &[*d_out, *d_in]).map_err(me)?.data;
        let mask = match masks.get(&key) {
            Some(m) => m.clone(),
            None => {
                let m = Mask::from_fn(*d_in, *d_out, |i, j| p[j * d_in + i] != 0.0)
                    .map_err(|e| format!("{key}: {e}"))?;
                if m.count_pruned() == 0 {
                    continue;
                }
                masks.insert(key.clone(), m.clone());
                m
            }
        };
        let w = dense_store.get(&key, &[*d_out, *d_in]).map_err(me)?.data;
        let mut differs = false;
        let mut burn_order = vec![0f32; d_in * d_out];
        for j in 0..*d_out {
            for i in 0..*d_in {
                let v = p[j * d_in + i];
                burn_order[i * d_out + j] = v;
                if mask.get(i, j) == Some(true) && v != w[j * d_in + i] {
                    differs = true;
                }
            }
        }
        if differs {
            student.insert(name.clone(), burn_order);
        }
    }
    Ok((masks, student))
}

/// The training data of a run: examples from `data`, tokenizers and image processing from
/// the model directory `dir`.
pub fn train_data<B: Backend>(
    dir: &Path,
    config: &ressa_models::ModelConfig,
    model: &ressa_models::InstructBlip<B>,
    data: &DataConfig,
) -> Result<TrainData, String> {
    let processor = ImageProcessorConfig::from_file_for(
        &dir.join("preprocessor_config.json"),
        config.vision.image_size,
    )
    .map_err(|e| e.to_string())?;
    let text_cfg = &config.text;
    let tok = tokenizer(dir.join("tokenizer.json"))?;
    let decoder_only = model.language_model.is_decoder_only();
    let pad = if decoder_only {
        text_cfg
            .as_llama()
            .and_then(|l| l.pad_token_id)
            .unwrap_or(0)
    } else {
        text_cfg.as_t5().map(|t| t.pad_token()).unwrap_or(0)
    };
    let encoder = TextEncoder {
        tokenizer: tok.clone(),
        pad,
    };
    let qformer = if model.qformer.reads_text() {
        let t = TextTokenizer::from_file(&dir.join("qformer_tokenizer").join("tokenizer.json"))
            .and_then(|t| t.with_truncation(config.qformer.max_position_embeddings, true))
            .map_err(|e| e.to_string())?;
        Some(TextEncoder {
            tokenizer: Arc::new(t),
            pad: 0,
        })
    } else {
        None
    };
    let ids = match (text_cfg.as_t5(), text_cfg.as_llama()) {
        (Some(t5), _) => TokenIds {
            pad,
            decoder_start: t5.decoder_start_token(),
            bos: None,
            eos: None,
        },
        (None, Some(l)) => TokenIds {
            pad,
            decoder_start: 0,
            bos: l.bos_token_id,
            eos: l.eos_token_id,
        },
        _ => unreachable!("a language model is T5 or LLaMA"),
    };
    let prompt = data.caption_prompt.as_deref().unwrap_or(CAPTION_PROMPT);
    let mut train = read_examples(&data.train, &data.images, prompt)?;
    if let Some(n) = data.max_examples {
        train.truncate(n);
    }
    let val = match &data.val {
        Some(v) => read_examples(v, &data.images, prompt)?,
        None => Vec::new(),
    };
    Ok(TrainData {
        train,
        val,
        processor,
        texts: Texts {
            input: Some(encoder.clone()),
            qformer,
            output: Some(encoder),
        },
        ids,
        loader_threads: 0,
    })
}

/// What a repair did (written to `repair.json`).
#[derive(Debug, Clone, Serialize)]
pub struct RepairReport {
    pub sparse_adapters: usize,
    pub plain_adapters: usize,
    pub trainable_parameters: usize,
    /// Linears whose pruned kept values differ from the dense ones (SparseGPT).
    pub rewritten_by_pruner: usize,
    pub train: TrainReport,
    /// Masked linears whose merged weight has exactly the mask's non-zeros (all of them).
    pub exact_sparsity: usize,
    pub config: RepairConfig,
}

fn tokenizer(path: PathBuf) -> Result<Arc<TextTokenizer>, String> {
    TextTokenizer::from_file(&path)
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

/// Runs a repair end to end on the autodiff backend `B`.
pub fn repair<B: AutodiffBackend>(
    cfg: &RepairConfig,
    resume: bool,
    device: &B::Device,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<RepairReport, String> {
    cfg.train.validate()?;
    let dense_dir = match (&cfg.dense, cfg.train.distill.lambda) {
        (Some(d), _) => d.clone(),
        (None, 0.0) => cfg.pruned.clone(),
        (None, _) => {
            return Err(
                "dense: the teacher's directory is required unless lambda = 0 (give --dense DIR)"
                    .into(),
            );
        }
    };
    if cfg.out.exists()
        && std::fs::read_dir(&cfg.out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(format!(
            "{}: output directory exists and is not empty",
            cfg.out.display()
        ));
    }
    let me = |e: ModelError| e.to_string();
    let mut pretrained = Pretrained::<B>::load(&dense_dir, device).map_err(me)?;
    let mut linears = Vec::new();
    for_each_linear_mut(&mut pretrained.model, |name, _, l| {
        linears.push((name.to_string(), l.dims()))
    });
    let (masks, student) = masks_and_student(&cfg.pruned, &pretrained, &linears)?;
    if masks.is_empty() {
        tracing::warn!(pruned = %cfg.pruned.display(), "no masks and no zeros found: every adapter is plain LoRA");
    }
    let (model, attached) = attach(
        pretrained.model,
        &cfg.train.adapters,
        &masks,
        &student,
        cfg.train.seed,
        device,
    )?;
    tracing::info!(
        sparse = attached.sparse,
        plain = attached.plain,
        trainable = attached.trainable,
        rewritten = student.len(),
        "adapters attached"
    );

    let data = train_data(&dense_dir, &pretrained.config, &model, &cfg.data)?;
    let ckpt_dir = cfg.checkpoint_dir();
    let (mut model, report) = train(
        model,
        &data,
        &cfg.train,
        Some(&ckpt_dir),
        resume,
        device,
        on_event,
    )?;

    let adapters = adapter_values(&mut model);
    merge(&mut model);
    // The guarantee: every masked weight keeps exactly its mask's zeros.
    let mut exact = 0;
    let mut violation = None;
    for_each_linear_mut(&mut model, |name, _, linear| {
        let key = format!("{name}.weight");
        if let Some(m) = masks.get(&key) {
            let w = linear
                .weight
                .val()
                .into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .expect("f32");
            let ok = m
                .to_bools()
                .iter()
                .zip(&w)
                .all(|(&keep, &v)| keep || v == 0.0);
            if ok {
                exact += 1;
            } else if violation.is_none() {
                violation = Some(key);
            }
        }
    });
    if let Some(key) = violation {
        return Err(format!(
            "{key}: merged weight has non-zeros outside its mask (a bug)"
        ));
    }
    let out_report = RepairReport {
        sparse_adapters: attached.sparse,
        plain_adapters: attached.plain,
        trainable_parameters: attached.trainable,
        rewritten_by_pruner: student.len(),
        train: report,
        exact_sparsity: exact,
        config: cfg.clone(),
    };
    let base_name = dense_dir.display().to_string();
    let io = |p: &Path, e: std::io::Error| ModelError::Input(format!("{}: {e}", p.display()));
    save_model_dir_with(
        &model,
        &pretrained.layout,
        &dense_dir,
        &cfg.out,
        &mut |tmp: &Path| {
            let masks_path = tmp.join("masks.safetensors");
            ressa_sparse::sidecar::write_masks(
                &masks_path,
                masks.iter().map(|(k, m)| (k.as_str(), m)),
            )
            .map_err(|e| ModelError::Input(format!("{}: {e}", masks_path.display())))?;
            let adir = tmp.join("adapters");
            std::fs::create_dir_all(&adir).map_err(|e| io(&adir, e))?;
            write_peft_adapters(&adir, &adapters, &base_name).map_err(|e| io(&adir, e))?;
            let rp = tmp.join("repair.json");
            std::fs::write(&rp, serde_json::to_vec_pretty(&out_report).expect("json"))
                .map_err(|e| io(&rp, e))
        },
    )
    .map_err(me)?;
    Ok(out_report)
}
