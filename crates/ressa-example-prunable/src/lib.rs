//! A model that is not one of ressa's, made prunable from outside the library: a residual MLP
//! stack implementing [`Prunable`], so `ressa_prune::calibrate::calibrate_and_prune` can run
//! magnitude, Wanda, SparseGPT or DSnoT on it. Only public API of `ressa-models` is used.

use burn::prelude::*;
use burn::tensor::activation::gelu;
use ressa_models::linear::Linear;
use ressa_models::nn::{Tap, no_tap};
use ressa_models::ops::DenseBackend;
use ressa_models::prunable::{BlockOptions, Prunable, StackInfo, Tower, stack_name};
use ressa_models::{ModelError, Result};

/// One residual block: `y = x + down(gelu(up(x)))`, `up: d → h`, `down: h → d`.
#[derive(Module, Debug)]
pub struct MlpBlock<B: Backend> {
    pub up: Linear<B>,
    pub down: Linear<B>,
}

impl<B: DenseBackend> MlpBlock<B> {
    /// `x + down(gelu(up(x)))` over `x: [b, t, d]`, reporting `x` (the input of `up`) and
    /// `gelu(up(x))` (the input of `down`) to `tap` before each product.
    pub fn forward_tapped(&self, x: Tensor<B, 3>, tap: Tap<B>) -> Tensor<B, 3> {
        tap(&[&self.up], &x);
        let h = gelu(self.up.forward(x.clone()));
        tap(&[&self.down], &h);
        x + self.down.forward(h)
    }
}

/// A stack of [`MlpBlock`]s; the linears are keyed `blocks.{i}.up` / `blocks.{i}.down`.
#[derive(Module, Debug)]
pub struct TinyMlp<B: Backend> {
    pub blocks: Vec<MlpBlock<B>>,
}

impl<B: DenseBackend> TinyMlp<B> {
    /// `x_{i+1} = x_i + down_i(gelu(up_i(x_i)))` for every block, `x: [b, t, d]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.blocks
            .iter()
            .fold(x, |x, b| b.forward_tapped(x, &mut no_tap))
    }

    /// Model width `d` (0 without blocks).
    pub fn d_model(&self) -> usize {
        self.blocks.first().map_or(0, |b| b.up.dims()[0])
    }
}

/// Shape of a [`TinyMlp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TinyMlpConfig {
    /// Model width.
    pub d: usize,
    /// Hidden width of each block.
    pub hidden: usize,
    pub blocks: usize,
}

impl TinyMlpConfig {
    /// Random init with seed 0 ([`TinyMlpConfig::init_seeded`]).
    pub fn init<B: Backend>(&self, device: &B::Device) -> TinyMlp<B> {
        self.init_seeded(0, device)
    }

    /// Weights `~ N(0, 1/d_in)`, biases `~ N(0, 0.02²)`, drawn on the host from `seed`, so
    /// the same seed gives the same model on every backend and in every thread.
    pub fn init_seeded<B: Backend>(&self, seed: u64, device: &B::Device) -> TinyMlp<B> {
        let mut rng = Normal::new(seed);
        let mut linear = |d_in: usize, d_out: usize, key: String| {
            let std = (d_in as f32).sqrt().recip();
            let w = rng.take(d_in * d_out, std);
            let b = rng.take(d_out, 0.02);
            Linear::new(
                Tensor::from_data(TensorData::new(w, [d_in, d_out]), device),
                Some(Tensor::from_data(TensorData::new(b, [d_out]), device)),
            )
            .with_key(key)
        };
        let blocks = (0..self.blocks)
            .map(|i| MlpBlock {
                up: linear(self.d, self.hidden, format!("blocks.{i}.up")),
                down: linear(self.hidden, self.d, format!("blocks.{i}.down")),
            })
            .collect();
        TinyMlp { blocks }
    }
}

/// `n` samples of `N(0, 1)` from `seed`; deterministic.
pub fn gaussian(seed: u64, n: usize) -> Vec<f32> {
    Normal::new(seed).take(n, 1.0)
}

/// Normal samples by Box–Muller over SplitMix64 uniforms.
struct Normal {
    state: u64,
}

impl Normal {
    fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// Uniform in `(0, 1]`.
    fn uniform(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    /// `n` samples of `N(0, std²)`.
    fn take(&mut self, n: usize, std: f32) -> Vec<f32> {
        let mut out = Vec::with_capacity(n + 1);
        while out.len() < n {
            let r = (-2.0 * self.uniform().ln()).sqrt();
            let a = std::f64::consts::TAU * self.uniform();
            out.push((r * a.cos()) as f32 * std);
            out.push((r * a.sin()) as f32 * std);
        }
        out.truncate(n);
        out
    }
}

/// The one stack of a [`TinyMlp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlpStack;

fn no_block(block: usize, blocks: usize) -> ModelError {
    ModelError::Input(format!(
        "calibration: block {block} asked of a TinyMlp with {blocks} blocks"
    ))
}

/// Calibration sees the model as one language-tower stack; a sample is an input batch
/// `[b, t, d]`, and a block's input (and the context) is just the hidden state.
impl<B: DenseBackend> Prunable<B> for TinyMlp<B> {
    type Sample = Tensor<B, 3>;
    type Stack = MlpStack;
    type BlockInput = Tensor<B, 3>;
    type Context = Tensor<B, 3>;

    fn stacks(&self) -> Vec<StackInfo<MlpStack>> {
        vec![StackInfo {
            id: MlpStack,
            tower: Tower::Language,
            name: stack_name(self.blocks.first().map(|b| &*b.up.key)),
            blocks: self.blocks.len(),
        }]
    }

    fn context(&self, sample: &Tensor<B, 3>) -> Result<Tensor<B, 3>> {
        let [_, _, d] = sample.dims();
        if d != self.d_model() {
            return Err(ModelError::Input(format!(
                "calibration: a sample of width {d} for a TinyMlp of width {}",
                self.d_model()
            )));
        }
        Ok(sample.clone())
    }

    fn stack_input(&self, _: MlpStack, ctx: &Tensor<B, 3>) -> Result<Tensor<B, 3>> {
        Ok(ctx.clone())
    }

    fn run_block(
        &self,
        _: MlpStack,
        block: usize,
        input: &Tensor<B, 3>,
        _: BlockOptions,
        tap: Tap<B>,
    ) -> Result<Tensor<B, 3>> {
        let b = self
            .blocks
            .get(block)
            .ok_or_else(|| no_block(block, self.blocks.len()))?;
        Ok(b.forward_tapped(input.clone(), tap))
    }

    fn with_hidden(&self, _: Tensor<B, 3>, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        hidden
    }

    fn end_stack(
        &self,
        _: MlpStack,
        hidden: Tensor<B, 3>,
        ctx: &mut Tensor<B, 3>,
        _: BlockOptions,
    ) -> Result<()> {
        *ctx = hidden;
        Ok(())
    }

    fn block_linears(&self, _: MlpStack, block: usize) -> Vec<&Linear<B>> {
        self.blocks
            .get(block)
            .map(|b| vec![&b.up, &b.down])
            .unwrap_or_default()
    }

    fn block_linears_mut(&mut self, _: MlpStack, block: usize) -> Vec<&mut Linear<B>> {
        self.blocks
            .get_mut(block)
            .map(|b| vec![&mut b.up, &mut b.down])
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn init_is_deterministic_per_seed_and_keys_every_linear() {
        let cfg = TinyMlpConfig {
            d: 8,
            hidden: 16,
            blocks: 2,
        };
        let device = Default::default();
        let weights = |seed| -> Vec<Vec<f32>> {
            let m = cfg.init_seeded::<Flex>(seed, &device);
            m.block_linears(MlpStack, 0)
                .into_iter()
                .chain(m.block_linears(MlpStack, 1))
                .map(|l| l.weight.val().into_data().to_vec::<f32>().unwrap())
                .collect()
        };
        assert_eq!(weights(3), weights(3));
        assert_ne!(weights(3), weights(4));
        let m = cfg.init::<Flex>(&device);
        let keys: Vec<&str> = (0..2)
            .flat_map(|b| m.block_linears(MlpStack, b))
            .map(|l| &*l.key)
            .collect();
        assert_eq!(
            keys,
            [
                "blocks.0.up",
                "blocks.0.down",
                "blocks.1.up",
                "blocks.1.down"
            ]
        );
        let [d_in, d_out] = m.blocks[1].down.dims();
        assert_eq!((d_in, d_out), (16, 8));
    }

    #[test]
    fn gaussian_has_unit_moments() {
        let v = gaussian(11, 20_001);
        assert_eq!(v.len(), 20_001);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "{mean} {var}"
        );
    }
}
