//! `InstructBlipForConditionalGeneration` (and `Blip2ForConditionalGeneration`, whose
//! checkpoints share the names): ViT → Q-Former (queries [+ instruction]) → `language_projection`
//! → T5 with the projected queries first in the encoder input, then the prompt tokens; or a
//! decoder-only LLaMA over the one sequence [projected queries ; prompt].

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::linear::Linear;
use burn::module::Param;
use burn::prelude::*;
use safetensors::Dtype;

use crate::config::{ModelConfig, TextConfig};
use crate::error::{ModelError, Result};
use crate::llama::{Llama, arange_positions};
use crate::qformer::QFormer;
use crate::t5::{DecoderCache, T5};
use crate::vit::VisionModel;
use crate::weights::{
    ExportTensor, Exporter, INDEX_FILE, Loader, SINGLE_FILE, WeightStore, write_safetensors,
    write_safetensors_stream,
};

/// The language model behind the projection: encoder-decoder T5 or decoder-only LLaMA.
#[derive(Module, Debug)]
pub enum LanguageModel<B: Backend> {
    T5(T5<B>),
    Llama(Llama<B>),
}

impl<B: Backend> LanguageModel<B> {
    fn load(cfg: &TextConfig, vb: &Loader<B>) -> Result<Self> {
        Ok(match cfg {
            TextConfig::T5(t) => LanguageModel::T5(T5::load(t, vb)?),
            TextConfig::Llama(l) => LanguageModel::Llama(Llama::load(l, vb)?),
        })
    }

    pub fn as_t5(&self) -> Option<&T5<B>> {
        match self {
            LanguageModel::T5(m) => Some(m),
            LanguageModel::Llama(_) => None,
        }
    }

    pub fn as_llama(&self) -> Option<&Llama<B>> {
        match self {
            LanguageModel::Llama(m) => Some(m),
            LanguageModel::T5(_) => None,
        }
    }

    pub fn is_decoder_only(&self) -> bool {
        matches!(self, LanguageModel::Llama(_))
    }

    /// Token embeddings [B, L, D] of `ids`.
    pub fn embed(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        match self {
            LanguageModel::T5(m) => m.embed(ids),
            LanguageModel::Llama(m) => m.embed(ids),
        }
    }

    fn export(&self, ex: &mut Exporter<B>) {
        match self {
            LanguageModel::T5(m) => m.export(ex),
            LanguageModel::Llama(m) => m.export(ex),
        }
    }
}

/// The T5 view for code written before decoder-only models existed. Panics on a LLaMA model:
/// such code must match on [`LanguageModel`] instead.
impl<B: Backend> std::ops::Deref for LanguageModel<B> {
    type Target = T5<B>;

    fn deref(&self) -> &T5<B> {
        match self {
            LanguageModel::T5(m) => m,
            LanguageModel::Llama(_) => {
                panic!("this code path supports T5 language models only; the model is LLaMA")
            }
        }
    }
}

impl<B: Backend> std::ops::DerefMut for LanguageModel<B> {
    fn deref_mut(&mut self) -> &mut T5<B> {
        match self {
            LanguageModel::T5(m) => m,
            LanguageModel::Llama(_) => {
                panic!("this code path supports T5 language models only; the model is LLaMA")
            }
        }
    }
}

/// The composite vision-language model.
#[derive(Module, Debug)]
pub struct InstructBlip<B: Backend> {
    pub vision_model: VisionModel<B>,
    pub query_tokens: Param<Tensor<B, 3>>,
    pub qformer: QFormer<B>,
    pub language_projection: Linear<B>,
    pub language_model: LanguageModel<B>,
    /// `image_token_index`: the placeholder id `transformers` puts in `input_ids` where the
    /// query outputs go (a decoder-only model's generated rows start with them).
    #[module(skip)]
    pub image_token_index: Option<u32>,
}

/// Token ids [B, T] and their 1/0 mask.
pub type TextInput<B> = (Tensor<B, 2, Int>, Tensor<B, 2>);

/// Model inputs for one batch; masks are 1 (token) / 0 (padding).
#[derive(Debug, Clone)]
pub struct VlmInputs<B: Backend> {
    /// Preprocessed images [B, 3, H, W].
    pub pixel_values: Tensor<B, 4>,
    /// Q-Former instruction tokens [B, T] and mask (InstructBLIP).
    pub qformer_text: Option<TextInput<B>>,
    /// Language-model prompt tokens [B, L] (without image placeholders) and mask.
    pub input_ids: Tensor<B, 2, Int>,
    pub attention_mask: Tensor<B, 2>,
}

/// Intermediate results of the encoding path, for parity checks and calibration.
#[derive(Debug, Clone)]
pub struct EncoderOutputs<B: Backend> {
    pub vision: Tensor<B, 3>,
    pub qformer: Tensor<B, 3>,
    pub language_model_inputs: Tensor<B, 3>,
    /// T5 encoder output [B, Q + L, D] and its mask [B, Q + L]; for a decoder-only language
    /// model, its input embeddings [projected queries ; prompt] and their mask.
    pub hidden: Tensor<B, 3>,
    pub mask: Tensor<B, 2>,
}

impl<B: Backend> InstructBlip<B> {
    /// Builds the model from a loader rooted at the checkpoint's top level.
    pub fn load(cfg: &ModelConfig, vb: &Loader<B>) -> Result<Self> {
        Ok(Self {
            vision_model: VisionModel::load(&cfg.vision, &vb.pp("vision_model"))?,
            query_tokens: vb.param(
                "query_tokens",
                [1, cfg.num_query_tokens, cfg.qformer.hidden_size],
            )?,
            qformer: QFormer::load(&cfg.qformer, cfg.qformer_reads_text(), &vb.pp("qformer"))?,
            language_projection: vb.linear(
                "language_projection",
                cfg.qformer.hidden_size,
                cfg.text.hidden_size(),
                true,
            )?,
            language_model: LanguageModel::load(&cfg.text, &vb.pp("language_model"))?,
            image_token_index: cfg.raw.image_token_index,
        })
    }

    /// Query tokens expanded to the batch, and the instruction text if the Q-Former reads it.
    pub(crate) fn qformer_queries(
        &self,
        batch: usize,
        qformer_text: Option<TextInput<B>>,
    ) -> (Tensor<B, 3>, Option<TextInput<B>>) {
        let [_, q, d] = self.query_tokens.dims();
        let queries = self.query_tokens.val().expand([batch, q, d]);
        let text = if self.qformer.reads_text() {
            qformer_text
        } else {
            None
        };
        (queries, text)
    }

    /// Language-model input: [projected queries ; prompt embeddings] and its mask (the T5
    /// encoder input, or the whole decoder-only sequence).
    pub(crate) fn encoder_embeds(
        &self,
        projected: Tensor<B, 3>,
        inputs: &VlmInputs<B>,
    ) -> (Tensor<B, 3>, Tensor<B, 2>) {
        let [b, q, _] = projected.dims();
        let prompt = self.language_model.embed(inputs.input_ids.clone());
        let embeds = Tensor::cat(vec![projected, prompt], 1);
        let device = embeds.device();
        let mask = Tensor::cat(
            vec![Tensor::ones([b, q], &device), inputs.attention_mask.clone()],
            1,
        );
        (embeds, mask)
    }

    /// Image → (vision output, Q-Former output, projected query outputs).
    pub fn image_features(
        &self,
        pixel_values: Tensor<B, 4>,
        qformer_text: Option<TextInput<B>>,
    ) -> (Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>) {
        let vision = self.vision_model.forward(pixel_values);
        let b = vision.dims()[0];
        let [_, q, d] = self.query_tokens.dims();
        let (queries, text) = self.qformer_queries(b, qformer_text);
        let qformer = self.qformer.forward(queries, text, vision.clone());
        let query_out = qformer.clone().slice([0..b, 0..q, 0..d]);
        let projected = self.language_projection.forward(query_out);
        (vision, qformer, projected)
    }

    /// The encoding path: image features, then the T5 encoder over [queries ; prompt] (a
    /// decoder-only model stops at the embedded sequence).
    pub fn encode(&self, inputs: &VlmInputs<B>) -> EncoderOutputs<B> {
        let (vision, qformer, projected) =
            self.image_features(inputs.pixel_values.clone(), inputs.qformer_text.clone());
        let (embeds, mask) = self.encoder_embeds(projected.clone(), inputs);
        let hidden = match &self.language_model {
            LanguageModel::T5(t5) => t5.encoder.encode(embeds, mask.clone()),
            LanguageModel::Llama(_) => embeds,
        };
        EncoderOutputs {
            vision,
            qformer,
            language_model_inputs: projected,
            hidden,
            mask,
        }
    }

    /// Teacher-forced logits [B, Ld, vocab] for `decoder_input_ids` [B, Ld] (T5; panics on a
    /// decoder-only model, see [`InstructBlip::decoder_only_logits`]).
    pub fn forward(
        &self,
        inputs: &VlmInputs<B>,
        decoder_input_ids: Tensor<B, 2, Int>,
    ) -> Tensor<B, 3> {
        let enc = self.encode(inputs);
        self.language_model
            .decode_logits(decoder_input_ids, &enc.hidden, enc.mask, None)
    }

    /// Decoder-only language model: logits [B, Q + L, vocab] over the whole sequence
    /// [projected queries ; prompt], positions 0.. as `transformers`' forward uses them.
    /// `None` for a T5 model.
    pub fn decoder_only_logits(&self, inputs: &VlmInputs<B>) -> Option<Tensor<B, 3>> {
        let llama = self.language_model.as_llama()?;
        let enc = self.encode(inputs);
        let [b, l, _] = enc.hidden.dims();
        let hidden = llama.forward(enc.hidden, enc.mask, &arange_positions(b, l), None);
        Some(llama.lm_logits(hidden))
    }

    /// A fresh T5 decoder KV cache (panics on a decoder-only model, see
    /// [`crate::llama::Llama::new_cache`]).
    pub fn new_cache(&self) -> DecoderCache<B> {
        DecoderCache::new(self.language_model.decoder.blocks.len())
    }

    /// Every tensor under its HF name, in PyTorch layout.
    pub fn export(&self) -> Vec<(String, ExportTensor<B>)> {
        let mut ex = Exporter::default();
        ex.scope("vision_model", |ex| self.vision_model.export(ex));
        ex.add("query_tokens", ExportTensor::D3(self.query_tokens.val()));
        ex.scope("qformer", |ex| self.qformer.export(ex));
        ex.linear("language_projection", &self.language_projection);
        ex.scope("language_model", |ex| self.language_model.export(ex));
        ex.into_entries()
    }
}

/// How the source checkpoint stored its tensors, so saving reproduces the layout.
#[derive(Debug, Clone, Default)]
pub struct SourceLayout {
    pub dtypes: HashMap<String, Dtype>,
    pub shards: Option<BTreeMap<String, String>>,
}

/// A model loaded from an HF directory, with what is needed to save it back.
#[derive(Debug)]
pub struct Pretrained<B: Backend> {
    pub model: InstructBlip<B>,
    pub config: ModelConfig,
    pub layout: SourceLayout,
    pub dir: PathBuf,
}

impl<B: Backend> Pretrained<B> {
    /// Loads `config.json` and the (possibly sharded) safetensors of an HF model directory.
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let store = WeightStore::open_dir(dir)?;
        let model = InstructBlip::load(&config, &Loader::new(&store, device))?;
        let dtypes = store
            .keys()
            .filter_map(|k| store.info(k).map(|(_, d)| (k.clone(), d)))
            .collect();
        tracing::info!(dir = %dir.display(), params = model.num_params(), "loaded model");
        Ok(Self {
            model,
            config,
            layout: SourceLayout {
                dtypes,
                shards: store.shard_map().cloned(),
            },
            dir: dir.to_path_buf(),
        })
    }

    /// Writes an HF model directory at `out`: the source directory's other files copied, the
    /// weights in the source's dtypes and shard layout. Written to a temporary directory
    /// beside `out` and renamed at the end, so a failure leaves no half-written output.
    pub fn save(&self, out: &Path) -> Result<()> {
        save_model_dir(&self.model, &self.layout, &self.dir, out)
    }
}

/// See [`Pretrained::save`].
pub fn save_model_dir<B: Backend>(
    model: &InstructBlip<B>,
    layout: &SourceLayout,
    src: &Path,
    out: &Path,
) -> Result<()> {
    save_model_dir_with(model, layout, src, out, &mut |_| Ok(()))
}

/// [`save_model_dir`] plus `extra`, which writes further files (mask sidecars, reports) into
/// the temporary directory before it is renamed to `out`.
pub fn save_model_dir_with<B: Backend>(
    model: &InstructBlip<B>,
    layout: &SourceLayout,
    src: &Path,
    out: &Path,
    extra: &mut dyn FnMut(&Path) -> Result<()>,
) -> Result<()> {
    write_dir_atomically(out, |tmp: &Path| -> Result<()> {
        copy_non_weight_files(src, tmp)?;
        drop_sparsity_annotation(&tmp.join("config.json"))?;
        write_weights(model, layout, tmp)?;
        extra(tmp)
    })
}

/// Fills a temporary sibling of `out` with `fill` and renames it to `out`, so a failed or
/// killed run leaves no half-written output; `out` must not exist or be empty.
pub fn write_dir_atomically<E: From<ModelError>>(
    out: &Path,
    fill: impl FnOnce(&Path) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    if out.exists()
        && std::fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(ModelError::io(
            out,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "output directory exists and is not empty",
            ),
        )
        .into());
    }
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| ModelError::io(parent, e))?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "model".into());
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = (|| {
        std::fs::create_dir_all(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
        fill(&tmp)?;
        if out.exists() {
            std::fs::remove_dir(out).map_err(|e| ModelError::io(out, e))?;
        }
        std::fs::rename(&tmp, out).map_err(|e| ModelError::io(out, e).into())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// The checkpoint's own weight files (`model.safetensors`, `model-0000N-of-0000M.safetensors`,
/// the index); other safetensors files in the directory are copied like any other file.
fn is_weight_file(name: &str) -> bool {
    name == INDEX_FILE || (name.starts_with("model") && name.ends_with(".safetensors"))
}

/// Weights are written dense: a `sparse-bitmask` annotation copied from a compressed source's
/// `config.json` (compressed-tensors' `quantization_config.sparsity_config`) no longer holds.
/// A quantization config without it is kept; one holding only sparsity is removed.
pub fn drop_sparsity_annotation(config_path: &Path) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(config_path) else {
        return Ok(());
    };
    let mut config: serde_json::Value =
        serde_json::from_str(&text).map_err(|error| ModelError::Json {
            path: config_path.to_path_buf(),
            error,
        })?;
    let Some(obj) = config.as_object_mut() else {
        return Ok(());
    };
    let Some(serde_json::Value::Object(q)) = obj.get_mut("quantization_config") else {
        return Ok(());
    };
    if q.remove("sparsity_config").is_none() {
        return Ok(());
    }
    if !q.contains_key("config_groups") {
        obj.remove("quantization_config");
    }
    std::fs::write(
        config_path,
        serde_json::to_vec_pretty(&config).expect("json"),
    )
    .map_err(|e| ModelError::io(config_path, e))
}

pub fn copy_non_weight_files(src: &Path, dst: &Path) -> Result<()> {
    let entries = std::fs::read_dir(src).map_err(|e| ModelError::io(src, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| ModelError::io(src, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        if path.is_dir() {
            let sub = dst.join(&name);
            std::fs::create_dir_all(&sub).map_err(|e| ModelError::io(&sub, e))?;
            copy_non_weight_files(&path, &sub)?;
        } else if !is_weight_file(&name) && !name.starts_with('.') {
            std::fs::copy(&path, dst.join(&name)).map_err(|e| ModelError::io(&path, e))?;
        }
    }
    Ok(())
}

fn write_weights<B: Backend>(
    model: &InstructBlip<B>,
    layout: &SourceLayout,
    dir: &Path,
) -> Result<()> {
    let entries = model.export();
    let dtype_of = |k: &str| *layout.dtypes.get(k).unwrap_or(&Dtype::F32);
    match &layout.shards {
        None => write_safetensors(&dir.join(SINGLE_FILE), &entries, &dtype_of),
        Some(shards) => {
            // Keys the source did not have (none for a plain round trip) go to the first shard.
            let first = shards
                .values()
                .min()
                .cloned()
                .unwrap_or_else(|| SINGLE_FILE.to_string());
            let mut groups: BTreeMap<String, Vec<(String, ExportTensor<B>)>> = BTreeMap::new();
            let mut weight_map = BTreeMap::new();
            let mut total = 0usize;
            for (k, t) in entries {
                let shard = shards.get(&k).cloned().unwrap_or_else(|| first.clone());
                total += t.shape().iter().product::<usize>() * dtype_of(&k).bitsize() / 8;
                weight_map.insert(k.clone(), shard.clone());
                groups.entry(shard).or_default().push((k, t));
            }
            for (shard, group) in &groups {
                write_safetensors(&dir.join(shard), group, &dtype_of)?;
            }
            let index =
                serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
            let path = dir.join(INDEX_FILE);
            std::fs::write(&path, serde_json::to_vec_pretty(&index).expect("json"))
                .map_err(|e| ModelError::io(&path, e))
        }
    }
}

/// Every tensor the model reads, with its HF name and shape, in construction order.
pub fn parameter_shapes<B: Backend>(
    cfg: &ModelConfig,
    device: &B::Device,
) -> Result<Vec<(String, Vec<usize>)>> {
    let shapes = RefCell::new(Vec::new());
    InstructBlip::<B>::load(cfg, &Loader::dry(&shapes, device))?;
    Ok(shapes.into_inner())
}

/// Writes `model.safetensors` with the initialisation `transformers` gives a fresh model, for
/// training from scratch: biases 0, norm weights 1; T5 as `T5PreTrainedModel._init_weights`
/// (embeddings N(0, 1), `q` N(0, (d_model·d_kv)^-½), `k`/`v`/`wi*`/relative bias/`lm_head`
/// N(0, d_model^-½), `o` N(0, (heads·d_kv)^-½), `wo` N(0, d_ff^-½)); everything else (ViT,
/// Q-Former, projection, query tokens) N(0, 0.02), the BERT/BLIP-2 `initializer_range`.
pub fn write_initial_checkpoint<B: Backend>(
    cfg: &ModelConfig,
    dir: &Path,
    seed: u64,
    device: &B::Device,
) -> Result<()> {
    let mut specs: Vec<(String, Vec<usize>, Dtype)> = parameter_shapes::<B>(cfg, device)?
        .into_iter()
        .map(|(k, s)| (k, s, Dtype::F32))
        .collect();
    specs.sort_by(|a, b| a.0.cmp(&b.0));
    let t5 = cfg.text.as_t5();
    let std_of = |name: &str| -> f32 {
        let leaf = name.rsplit('.').nth(1).unwrap_or("");
        if let (Some(t), true) = (t5, name.starts_with("language_model.")) {
            let (d, kv, h, ff) = (
                t.d_model as f32,
                t.d_kv as f32,
                t.num_heads as f32,
                t.d_ff as f32,
            );
            return match leaf {
                "shared" | "embed_tokens" => 1.0,
                "q" => (d * kv).powf(-0.5),
                "o" => (h * kv).powf(-0.5),
                "wo" => ff.powf(-0.5),
                _ => d.powf(-0.5),
            };
        }
        0.02
    };
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    };
    let names: Vec<String> = specs.iter().map(|s| s.0.clone()).collect();
    write_safetensors_stream(&dir.join(SINGLE_FILE), &specs, |i| {
        let n: usize = specs[i].1.iter().product();
        let name = &names[i];
        let lower = name.to_lowercase();
        let is_norm = lower.contains("norm");
        if name.ends_with("bias") && !name.ends_with("relative_attention_bias.weight") {
            return vec![0.0; n];
        }
        if is_norm {
            return vec![1.0; n];
        }
        let std = std_of(name);
        // Box–Muller.
        (0..n)
            .map(|_| {
                let (u1, u2) = (uniform(), uniform());
                std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
            })
            .collect()
    })
}

/// Writes `model.safetensors` with random weights for `cfg` into `dir` (benchmarks and memory
/// tests of full-width models without a download). Values ~ U(-scale, scale) from a seeded
/// xorshift generator; norm weights are 1. Written tensor by tensor.
pub fn write_random_checkpoint<B: Backend>(
    cfg: &ModelConfig,
    dir: &Path,
    seed: u64,
    scale: f32,
    device: &B::Device,
) -> Result<()> {
    let mut specs: Vec<(String, Vec<usize>, Dtype)> = parameter_shapes::<B>(cfg, device)?
        .into_iter()
        .map(|(k, s)| (k, s, Dtype::F32))
        .collect();
    specs.sort_by(|a, b| a.0.cmp(&b.0));
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    let names: Vec<String> = specs.iter().map(|s| s.0.clone()).collect();
    write_safetensors_stream(&dir.join(SINGLE_FILE), &specs, |i| {
        let n: usize = specs[i].1.iter().product();
        let is_norm = names[i].to_lowercase().contains("norm") && names[i].ends_with("weight");
        (0..n)
            .map(|_| if is_norm { 1.0 } else { next() * scale })
            .collect()
    })
}

/// Parameter counts per tower (`vision_model`, `query_tokens`, `qformer`,
/// `language_projection`, `language_model`, and an untied `language_model.lm_head` apart),
/// from the same construction code as loading but without allocating any weights.
pub fn parameter_counts<B: Backend>(
    cfg: &ModelConfig,
    device: &B::Device,
) -> Result<BTreeMap<String, usize>> {
    let shapes = RefCell::new(Vec::new());
    InstructBlip::<B>::load(cfg, &Loader::dry(&shapes, device))?;
    let mut counts = BTreeMap::new();
    for (key, shape) in shapes.into_inner() {
        let tower = if key.starts_with("language_model.lm_head") {
            "language_model_lm_head_untied".to_string()
        } else {
            key.split('.').next().unwrap_or("").to_string()
        };
        *counts.entry(tower).or_insert(0) += shape.iter().product::<usize>();
    }
    Ok(counts)
}
