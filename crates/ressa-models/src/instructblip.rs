//! `InstructBlipForConditionalGeneration` (and `Blip2ForConditionalGeneration`, whose
//! checkpoints share the names): ViT → Q-Former (queries [+ instruction]) → `language_projection`
//! → any [`LanguageModel`], whose input is [projected queries ; prompt embeddings] (the T5
//! encoder's input, or a decoder-only model's whole prefix).

use std::path::Path;
use std::sync::Arc;

use burn::module::Param;
use burn::prelude::*;

use crate::config::{InstructBlipConfig, LmConfig};
use crate::error::{ModelError, Result};
use crate::linear::Linear;
use crate::llama::Llama;
use crate::lm::{LanguageModel, LmInput, LmSample};
use crate::nn::{Tap, host_ids, host_mask};
use crate::ops::DenseBackend;
use crate::prunable::{
    BlockOptions, CalibrationSample, Prunable, StackInfo, Tower, empty_hidden, mismatch, not_ready,
    stack_name,
};
use crate::qformer::QFormer;
use crate::sparse_kernels::KernelRows;
use crate::t5::T5;
use crate::vit::VisionModel;
use crate::vlm::{
    FamilyConfig, InputSpec, TextInput, VisionLanguageModel, VlmInputs, check_inputs, check_pixels,
};
use crate::weights::{Loader, ParamKeys};

/// The composite vision-language model over the language model `L`.
#[derive(Module, Debug)]
pub struct InstructBlip<B: Backend, L> {
    pub vision_model: VisionModel<B>,
    pub query_tokens: Param<Tensor<B, 3>>,
    pub qformer: QFormer<B>,
    pub language_projection: Linear<B>,
    pub language_model: L,
    /// `image_token_index`: the placeholder id `transformers` puts in `input_ids` where the
    /// query outputs go (a decoder-only model's generated rows start with them).
    #[module(skip)]
    pub image_token_index: Option<u32>,
    /// The Q-Former's vocabulary and positions (what its tokenizer must stay within).
    #[module(skip)]
    pub qformer_limits: (usize, usize),
    #[module(skip)]
    pub keys: Arc<ParamKeys>,
}

/// InstructBLIP / BLIP-2 with FlanT5.
pub type InstructBlipT5<B> = InstructBlip<B, T5<B>>;
/// InstructBLIP with a LLaMA-family (Vicuna) decoder.
pub type InstructBlipLlama<B> = InstructBlip<B, Llama<B>>;

/// Intermediate results of the encoding path, for parity checks.
#[derive(Debug, Clone)]
pub struct EncoderOutputs<B: Backend> {
    pub vision: Tensor<B, 3>,
    pub qformer: Tensor<B, 3>,
    pub language_model_inputs: Tensor<B, 3>,
}

impl<T: LmConfig> FamilyConfig for InstructBlipConfig<T> {
    fn from_json(text: &str, path: &Path) -> Result<Self> {
        InstructBlipConfig::from_json(text, path)
    }

    fn image_size(&self) -> usize {
        self.vision.image_size
    }

    fn init_std(&self, key: &str) -> f32 {
        let leaf = key.rsplit('.').nth(1).unwrap_or("");
        if key.starts_with("language_model.")
            && let Some(s) = self.text.init_std(leaf)
        {
            return s;
        }
        // Each sub-model's own `initializer_range` (transformers initialises the vision model
        // and the Q-Former with their configs'), the composite's for the query tokens (N(0, σ²)
        // as LAVIS; transformers 5 writes zeros) and the language projection.
        if key.starts_with("vision_model.") {
            self.vision.initializer_range
        } else if key.starts_with("qformer.") {
            self.qformer.initializer_range
        } else {
            self.raw.initializer_range
        }
    }
}

impl<B: DenseBackend, L: LanguageModel<B>> InstructBlip<B, L> {
    /// Query tokens expanded to the batch, and the instruction text if the Q-Former reads it.
    fn qformer_queries(
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

    fn num_queries(&self) -> usize {
        self.query_tokens.dims()[1]
    }

    /// Q-Former output → projected query outputs [B, Q, D_lm].
    fn project(&self, qformer: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, _, d] = qformer.dims();
        let q = self.num_queries();
        self.language_projection
            .forward(qformer.slice([0..b, 0..q, 0..d]))
    }

    /// Image → (vision output, Q-Former output, projected query outputs).
    pub fn encode(&self, inputs: &VlmInputs<B>) -> Result<EncoderOutputs<B>> {
        check_inputs(inputs, &self.input_spec())?;
        if let Some(t) = self.image_token_index
            && crate::nn::host_ids(inputs.input_ids.clone())
                .iter()
                .flatten()
                .any(|&id| id == t)
        {
            return Err(ModelError::Input(format!(
                "input_ids hold image_token_index {t}: give the prompt alone, the query outputs go before it"
            )));
        }
        let vision = self.vision_model.forward(inputs.pixel_values.clone());
        let b = vision.dims()[0];
        let (queries, text) = self.qformer_queries(b, inputs.qformer_text.clone());
        let qformer = self.qformer.forward(queries, text, vision.clone());
        let projected = self.project(qformer.clone());
        Ok(EncoderOutputs {
            vision,
            qformer,
            language_model_inputs: projected,
        })
    }

    /// [projected queries ; prompt embeddings] and its mask; the host ids start with the
    /// image placeholder once per query (none when the config names no placeholder id).
    fn merge(&self, projected: Tensor<B, 3>, inputs: &VlmInputs<B>) -> LmInput<B> {
        let [b, q, _] = projected.dims();
        let prompt = self.language_model.embed(inputs.input_ids.clone());
        let embeds = Tensor::cat(vec![projected, prompt], 1);
        let device = embeds.device();
        let mask = Tensor::cat(
            vec![Tensor::ones([b, q], &device), inputs.attention_mask.clone()],
            1,
        );
        let prompt_ids = host_ids(inputs.input_ids.clone());
        let ids = prompt_ids
            .into_iter()
            .map(|p| {
                let mut row = match self.image_token_index {
                    Some(t) => vec![t; q],
                    None => Vec::new(),
                };
                row.extend(p);
                row
            })
            .collect();
        let host_mask = host_mask(mask.clone());
        LmInput {
            embeds,
            mask,
            ids,
            host_mask,
        }
    }
}

impl<B: DenseBackend, L: LanguageModel<B>> VisionLanguageModel<B> for InstructBlip<B, L> {
    type Lm = L;
    type Config = InstructBlipConfig<L::Config>;

    fn load(cfg: &Self::Config, vb: &Loader<B>) -> Result<Self> {
        let model = Self {
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
            language_model: L::load(&cfg.text, &vb.pp("language_model"))?,
            image_token_index: cfg.raw.image_token_index,
            qformer_limits: (cfg.qformer.vocab_size, cfg.qformer.max_position_embeddings),
            keys: Arc::new(ParamKeys::default()),
        };
        Ok(Self {
            keys: Arc::new(vb.keys()),
            ..model
        })
    }

    fn language_model(&self) -> &L {
        &self.language_model
    }

    fn param_keys(&self) -> &ParamKeys {
        &self.keys
    }

    fn input_spec(&self) -> InputSpec {
        let lm = &self.language_model;
        InputSpec {
            image_size: self.vision_model.image_size(),
            qformer_text: self.qformer.reads_text().then_some(self.qformer_limits),
            image_tokens: None,
            tokens: lm.special_tokens(),
            padding: lm.padding(),
            vocab_size: lm.vocab_size(),
            context_window: lm.context_window(),
            image_positions: self.num_queries(),
        }
    }

    fn lm_input(&self, inputs: &VlmInputs<B>) -> Result<LmInput<B>> {
        let enc = self.encode(inputs)?;
        Ok(self.merge(enc.language_model_inputs, inputs))
    }

    fn kernel_rows(&self, stack: BlipStack<L::Stack>, rows: &KernelRows) -> usize {
        let images = rows.images.max(1);
        match stack {
            BlipStack::Vision => images * self.vision_model.num_positions(),
            BlipStack::QFormer => images * self.num_queries(),
            BlipStack::Language(s) => self.language_model.kernel_rows(s, rows, self.num_queries()),
        }
        .max(1)
    }

    /// The ViT's last hidden state (post-layernorm, what the Q-Former cross-attends to)
    /// without its class token.
    fn vision_patches(&self, pixel_values: Tensor<B, 4>) -> Result<Tensor<B, 3>> {
        check_pixels(&pixel_values, self.vision_model.image_size())?;
        let h = self.vision_model.forward(pixel_values);
        let [b, n, d] = h.dims();
        Ok(h.slice([0..b, 1..n, 0..d]))
    }

    fn freeze_vision(mut self) -> Self {
        self.vision_model = self.vision_model.no_grad();
        self
    }
}

/// The stacks of the composite: the ViT's layers, the Q-Former's, then the language model's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlipStack<S> {
    Vision,
    QFormer,
    Language(S),
}

/// A block input of one of the composite's stacks.
#[derive(Debug, Clone)]
pub enum BlipBlockInput<B: Backend, I> {
    Vision(Tensor<B, 3>),
    QFormer {
        x: Tensor<B, 3>,
        bias: Option<Tensor<B, 4>>,
        image: Tensor<B, 3>,
        queries: usize,
    },
    Language(I),
}

/// A sample's calibration state: its inputs, the vision features once the vision stack ended,
/// and the language model's state once the Q-Former's did.
pub struct BlipContext<B: Backend, C> {
    sample: CalibrationSample<B>,
    vision: Option<Tensor<B, 3>>,
    lm: Option<C>,
}

impl<B: DenseBackend, L: LanguageModel<B>> Prunable<B> for InstructBlip<B, L> {
    type Sample = CalibrationSample<B>;
    type Stack = BlipStack<L::Stack>;
    type BlockInput = BlipBlockInput<B, L::BlockInput>;
    type Context = BlipContext<B, L::Context>;

    fn stacks(&self) -> Vec<StackInfo<Self::Stack>> {
        let first = |l: Option<&Linear<B>>| stack_name(l.map(|l| &*l.key));
        let mut out = vec![
            StackInfo {
                id: BlipStack::Vision,
                tower: Tower::Vision,
                name: first(self.vision_model.layers.first().map(|l| &l.fc1)),
                blocks: self.vision_model.layers.len(),
            },
            StackInfo {
                id: BlipStack::QFormer,
                tower: Tower::QFormer,
                name: first(self.qformer.layers.first().map(|l| &l.attention.query)),
                blocks: self.qformer.layers.len(),
            },
        ];
        out.extend(self.language_model.stacks().into_iter().map(|s| StackInfo {
            id: BlipStack::Language(s.id),
            tower: s.tower,
            name: s.name,
            blocks: s.blocks,
        }));
        out
    }

    fn context(&self, sample: &CalibrationSample<B>) -> Result<Self::Context> {
        check_inputs(&sample.inputs, &self.input_spec())?;
        Ok(BlipContext {
            sample: sample.clone(),
            vision: None,
            lm: None,
        })
    }

    fn stack_input(&self, stack: Self::Stack, ctx: &Self::Context) -> Result<Self::BlockInput> {
        let inputs = &ctx.sample.inputs;
        Ok(match stack {
            BlipStack::Vision => BlipBlockInput::Vision(
                self.vision_model
                    .embeddings
                    .forward(inputs.pixel_values.clone()),
            ),
            BlipStack::QFormer => {
                let image = ctx
                    .vision
                    .clone()
                    .ok_or_else(|| not_ready(stack, "the vision features"))?;
                let (queries, text) =
                    self.qformer_queries(image.dims()[0], inputs.qformer_text.clone());
                let q = queries.dims()[1];
                let (x, bias) = self.qformer.embed(queries, text);
                BlipBlockInput::QFormer {
                    x,
                    bias,
                    image,
                    queries: q,
                }
            }
            BlipStack::Language(s) => {
                let lm = ctx
                    .lm
                    .as_ref()
                    .ok_or_else(|| not_ready(stack, "the Q-Former output"))?;
                BlipBlockInput::Language(self.language_model.stack_input(s, lm)?)
            }
        })
    }

    fn run_block(
        &self,
        stack: Self::Stack,
        block: usize,
        input: &Self::BlockInput,
        options: BlockOptions,
        tap: Tap<B>,
    ) -> Result<Tensor<B, 3>> {
        let missing = || ModelError::Input(format!("{stack:?} has no block {block}"));
        match (stack, input) {
            (BlipStack::Vision, BlipBlockInput::Vision(x)) => Ok(self
                .vision_model
                .layers
                .get(block)
                .ok_or_else(missing)?
                .forward_tapped(x.clone(), tap)),
            (
                BlipStack::QFormer,
                BlipBlockInput::QFormer {
                    x,
                    bias,
                    image,
                    queries,
                },
            ) => Ok(self.qformer.layers.get(block).ok_or_else(missing)?.forward(
                x.clone(),
                bias.clone(),
                image.clone(),
                *queries,
                tap,
            )),
            (BlipStack::Language(s), BlipBlockInput::Language(i)) => {
                self.language_model.run_block(s, block, i, options, tap)
            }
            _ => Err(mismatch(stack)),
        }
    }

    fn with_hidden(&self, input: Self::BlockInput, hidden: Tensor<B, 3>) -> Self::BlockInput {
        match input {
            BlipBlockInput::Vision(_) => BlipBlockInput::Vision(hidden),
            BlipBlockInput::QFormer {
                bias,
                image,
                queries,
                ..
            } => BlipBlockInput::QFormer {
                x: hidden,
                bias,
                image,
                queries,
            },
            BlipBlockInput::Language(i) => {
                BlipBlockInput::Language(self.language_model.with_hidden(i, hidden))
            }
        }
    }

    fn end_stack(
        &self,
        stack: Self::Stack,
        hidden: Tensor<B, 3>,
        ctx: &mut Self::Context,
        options: BlockOptions,
    ) -> Result<()> {
        match stack {
            BlipStack::Vision => {
                ctx.vision = Some(self.vision_model.post_layernorm.forward(hidden));
            }
            BlipStack::QFormer => {
                let input = self.merge(self.project(hidden), &ctx.sample.inputs);
                ctx.lm = Some(self.language_model.context(&LmSample {
                    input,
                    targets: ctx.sample.targets.clone(),
                })?);
            }
            BlipStack::Language(s) => {
                let lm = ctx
                    .lm
                    .as_mut()
                    .ok_or_else(|| not_ready(stack, "the Q-Former output"))?;
                self.language_model.end_stack(s, hidden, lm, options)?;
            }
        }
        Ok(())
    }

    fn block_linears(&self, stack: Self::Stack, block: usize) -> Vec<&Linear<B>> {
        match stack {
            BlipStack::Vision => self
                .vision_model
                .layers
                .get(block)
                .map(|l| l.linears())
                .unwrap_or_default(),
            BlipStack::QFormer => self
                .qformer
                .layers
                .get(block)
                .map(|l| l.linears())
                .unwrap_or_default(),
            BlipStack::Language(s) => self.language_model.block_linears(s, block),
        }
    }

    fn block_linears_mut(&mut self, stack: Self::Stack, block: usize) -> Vec<&mut Linear<B>> {
        match stack {
            BlipStack::Vision => self
                .vision_model
                .layers
                .get_mut(block)
                .map(|l| l.linears_mut())
                .unwrap_or_default(),
            BlipStack::QFormer => self
                .qformer
                .layers
                .get_mut(block)
                .map(|l| l.linears_mut())
                .unwrap_or_default(),
            BlipStack::Language(s) => self.language_model.block_linears_mut(s, block),
        }
    }

    fn output_options(&self, stack: Self::Stack, options: BlockOptions) -> Option<BlockOptions> {
        match stack {
            BlipStack::Language(s) => self.language_model.output_options(s, options),
            _ => None,
        }
    }

    fn split_hidden(
        &self,
        input: Self::BlockInput,
    ) -> std::result::Result<(Self::BlockInput, Tensor<B, 3>), Self::BlockInput> {
        match input {
            BlipBlockInput::Vision(x) => {
                let empty = empty_hidden(&x.device());
                Ok((BlipBlockInput::Vision(empty), x))
            }
            BlipBlockInput::QFormer {
                x,
                bias,
                image,
                queries,
            } => Ok((
                BlipBlockInput::QFormer {
                    x: empty_hidden(&image.device()),
                    bias,
                    image,
                    queries,
                },
                x,
            )),
            BlipBlockInput::Language(i) => match self.language_model.split_hidden(i) {
                Ok((frame, x)) => Ok((BlipBlockInput::Language(frame), x)),
                Err(i) => Err(BlipBlockInput::Language(i)),
            },
        }
    }

    fn join_hidden(&self, frame: Self::BlockInput, hidden: Tensor<B, 3>) -> Self::BlockInput {
        match frame {
            BlipBlockInput::Language(i) => {
                BlipBlockInput::Language(self.language_model.join_hidden(i, hidden))
            }
            other => self.with_hidden(other, hidden),
        }
    }

    fn idle_linears(&self) -> Vec<&Linear<B>> {
        self.language_model.idle_linears()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::T5Config;

    /// The initialisation σ of each part comes from its own config: vision and Q-Former from
    /// their `initializer_range`, query tokens and projection from the top level, T5 by its
    /// own rule (d_model^-½ for a feed-forward input).
    #[test]
    fn init_std_follows_each_sub_config() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../configs/models/shapes-tiny/config.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        v["initializer_range"] = 0.3.into();
        v["vision_config"]["initializer_range"] = 0.1.into();
        v["qformer_config"]["initializer_range"] = 0.2.into();
        let cfg = InstructBlipConfig::<T5Config>::from_json(&v.to_string(), &path).unwrap();
        let d_model = cfg.text.d_model as f32;
        for (key, want) in [
            ("vision_model.encoder.layers.0.mlp.fc1.weight", 0.1),
            ("vision_model.embeddings.position_embedding", 0.1),
            (
                "qformer.encoder.layer.0.attention.attention.query.weight",
                0.2,
            ),
            ("query_tokens", 0.3),
            ("language_projection.weight", 0.3),
            (
                "language_model.encoder.block.0.layer.1.DenseReluDense.wi_0.weight",
                d_model.powf(-0.5),
            ),
        ] {
            assert_eq!(cfg.init_std(key), want, "{key}");
        }
        // Absent fields: transformers' default 0.02.
        for part in ["vision_config", "qformer_config"] {
            v[part].as_object_mut().unwrap().remove("initializer_range");
        }
        v.as_object_mut().unwrap().remove("initializer_range");
        let cfg = InstructBlipConfig::<T5Config>::from_json(&v.to_string(), &path).unwrap();
        for key in ["vision_model.x.weight", "qformer.x.weight", "query_tokens"] {
            assert_eq!(cfg.init_std(key), 0.02, "{key}");
        }
    }
}
