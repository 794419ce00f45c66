//! Prunes the crate's own `TinyMlp` with ressa's calibration (public API only) and checks the
//! result from the outside: exact sparsity and patterns, zeros exactly where masks prune, a
//! hand-computed Wanda selection, and SparseGPT's reconstruction beating magnitude.

use std::collections::BTreeMap;

use burn::backend::Flex;
use burn::prelude::*;
use burn::tensor::activation::gelu;
use ressa_example_prunable::{MlpStack, TinyMlp, TinyMlpConfig, gaussian};
use ressa_models::linear::Linear;
use ressa_models::prunable::{BlockOptions, Prunable, Tower, prunable_linears};
use ressa_prune::Method;
use ressa_prune::calibrate::{
    CalibrationConfig, CalibrationResult, TowerSparsity, calibrate_and_prune,
};
use ressa_sparse::{Mask, SparsityPattern, is_n_m};

type B = Flex;

const CONFIG: TinyMlpConfig = TinyMlpConfig {
    d: 32,
    hidden: 64,
    blocks: 3,
};
/// Input channels with a much larger scale than the rest (what makes Wanda differ from |W|).
const OUTLIERS: [usize; 3] = [3, 11, 26];
const OUTLIER_SCALE: f32 = 16.0;
/// Calibration samples, each `[BATCH, TOKENS, d]` (256 tokens in all, more than any `d_in`).
const SAMPLES: usize = 8;
const BATCH: usize = 2;
const TOKENS: usize = 16;

fn model() -> TinyMlp<B> {
    CONFIG.init_seeded(7, &Default::default())
}

/// `SAMPLES` batches of `N(0, 1)` inputs with the `OUTLIERS` channels scaled up.
fn data(seed: u64) -> Vec<Tensor<B, 3>> {
    (0..SAMPLES as u64)
        .map(|s| {
            let mut v = gaussian(seed * 1000 + s, BATCH * TOKENS * CONFIG.d);
            for (k, x) in v.iter_mut().enumerate() {
                if OUTLIERS.contains(&(k % CONFIG.d)) {
                    *x *= OUTLIER_SCALE;
                }
            }
            Tensor::from_data(
                TensorData::new(v, [BATCH, TOKENS, CONFIG.d]),
                &Default::default(),
            )
        })
        .collect()
}

fn config(method: Method, pattern: SparsityPattern) -> CalibrationConfig {
    CalibrationConfig::new(method, pattern, TowerSparsity::language(0.5))
}

fn two_four() -> SparsityPattern {
    SparsityPattern::n_m(2, 4).unwrap()
}

/// The model pruned by `method` on `samples`, with the calibration result.
fn pruned(
    method: Method,
    pattern: SparsityPattern,
    samples: &[Tensor<B, 3>],
) -> (TinyMlp<B>, CalibrationResult) {
    let mut m = model();
    let result = calibrate_and_prune(&mut m, samples, &config(method, pattern), &mut |_, _, _| {})
        .unwrap_or_else(|e| panic!("{method} {pattern:?}: {e}"));
    (m, result)
}

fn host<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

/// A linear's weight `[d_in, d_out]` and bias on the host, with its dims.
type HostLinear = (Vec<f32>, Vec<f32>, [usize; 2]);

/// Every linear by key.
fn linears(m: &TinyMlp<B>) -> BTreeMap<String, HostLinear> {
    prunable_linears::<B, _>(m)
        .into_iter()
        .map(|(tower, l)| {
            assert_eq!(tower, Tower::Language);
            let bias = host(l.bias.as_ref().unwrap().val());
            (l.key.to_string(), (host(l.weight.val()), bias, l.dims()))
        })
        .collect()
}

/// Pruned inputs of output `j` (column `j` of the `[d_in, d_out]` mask).
fn pruned_inputs(mask: &Mask, j: usize) -> Vec<usize> {
    (0..mask.d_in())
        .filter(|&i| mask.get(i, j) == Some(false))
        .collect()
}

/// The `k` inputs of output `j` with the lowest `score(i, j)`, ascending by index.
fn lowest(d_in: usize, j: usize, k: usize, score: impl Fn(usize, usize) -> f64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..d_in).collect();
    order.sort_by(|&a, &b| score(a, j).total_cmp(&score(b, j)));
    let mut out = order[..k].to_vec();
    out.sort_unstable();
    out
}

/// Chaining `run_block` reproduces `forward` exactly, and each block taps exactly its
/// `block_linears`, in order, each with an input of the linear's `d_in`.
#[test]
fn block_runs_reproduce_the_forward_and_tap_every_linear() {
    let m = model();
    let x = data(1).remove(0);
    let stacks = m.stacks();
    assert_eq!(stacks.len(), 1);
    assert_eq!(
        (stacks[0].id, stacks[0].tower, stacks[0].name.as_str()),
        (MlpStack, Tower::Language, "blocks")
    );
    let ctx = m.context(&x).unwrap();
    let mut h = m.stack_input(MlpStack, &ctx).unwrap();
    for b in 0..stacks[0].blocks {
        let mut tapped: Vec<(String, usize)> = Vec::new();
        let mut tap = |ls: &[&Linear<B>], x: &Tensor<B, 3>| {
            for l in ls {
                assert_eq!(x.dims()[2], l.dims()[0], "{} input width", l.key);
                tapped.push((l.key.to_string(), x.dims()[2]));
            }
        };
        let out = m
            .run_block(MlpStack, b, &h, BlockOptions::default(), &mut tap)
            .unwrap();
        let listed: Vec<(String, usize)> = m
            .block_linears(MlpStack, b)
            .iter()
            .map(|l| (l.key.to_string(), l.dims()[0]))
            .collect();
        assert_eq!(tapped, listed, "block {b}");
        h = m.with_hidden(h, out);
    }
    assert_eq!(host(h), host(m.forward(x)));
    assert!(
        m.run_block(MlpStack, 3, &ctx, BlockOptions::default(), &mut |_, _| {})
            .is_err()
    );
}

/// Wanda and SparseGPT, 50 % unstructured and 2:4: every linear has a mask of exactly the
/// requested sparsity (per output for Wanda and for N:M, per matrix for SparseGPT's
/// unstructured selection), the weights are zero exactly where the mask prunes, biases are
/// untouched, Wanda keeps the surviving weights and SparseGPT rewrites them.
#[test]
fn masks_have_the_requested_sparsity_and_zero_exactly_the_pruned_weights() {
    let samples = data(1);
    let dense = linears(&model());
    for method in [Method::Wanda, Method::SparseGpt] {
        for pattern in [SparsityPattern::Unstructured, two_four()] {
            let what = format!("{method} {pattern:?}");
            let (m, result) = pruned(method, pattern, &samples);
            let after = linears(&m);
            assert_eq!(result.masks.len(), 2 * CONFIG.blocks, "{what}");
            assert_eq!(result.layers.len(), 2 * CONFIG.blocks, "{what}");
            for r in &result.layers {
                assert_eq!((r.target, r.sparsity), (0.5, 0.5), "{what} {}", r.name);
            }
            let mut rewritten = 0;
            for (key, (w, bias, [d_in, d_out])) in &after {
                let at = format!("{what} {key}");
                let mask = &result.masks[&format!("{key}.weight")];
                assert_eq!(mask.shape(), (*d_in, *d_out), "{at}");
                assert_eq!(mask.count_pruned(), d_in * d_out / 2, "{at}");
                if method == Method::Wanda || pattern.is_n_m() {
                    assert!(
                        mask.kept_per_column().iter().all(|&k| k == d_in / 2),
                        "{at}: every output keeps half its inputs"
                    );
                }
                if pattern.is_n_m() {
                    assert!(is_n_m(mask, 2, 4), "{at}: not 2:4");
                }
                let (w0, b0, _) = &dense[key];
                assert_eq!(bias, b0, "{at}: bias changed");
                for (k, keep) in mask.to_bools().into_iter().enumerate() {
                    assert_eq!(w[k] != 0.0, keep, "{at}: entry {k}");
                    if keep && w[k] != w0[k] {
                        rewritten += 1;
                    }
                }
            }
            match method {
                Method::Wanda => assert_eq!(rewritten, 0, "{what} changed kept weights"),
                _ => assert!(rewritten > 0, "{what} reconstructed nothing"),
            }
        }
    }
}

/// Block 0's input is the calibration data itself, so its Wanda scores can be computed here:
/// `S_ij = |W_ij| · ‖X_i‖₂` over all calibration tokens (burn orientation: `i` input channel,
/// `j` output). For `up`, `X` is the data; for `down`, `gelu(up(X))` through the dense `up`
/// (a block's statistics are collected before any of its linears is pruned). Each output must
/// prune exactly its `d_in / 2` lowest scores; and with the outlier channels, Wanda keeps them
/// almost always, where per-output magnitude would prune half of them.
#[test]
fn wanda_block0_masks_are_the_lowest_half_of_hand_computed_scores() {
    let samples = data(1);
    let dense = model();
    let (_, result) = pruned(Method::Wanda, SparsityPattern::Unstructured, &samples);
    let up = &dense.blocks[0].up;
    let hidden: Vec<Tensor<B, 3>> = samples
        .iter()
        .map(|x| gelu(up.forward(x.clone())))
        .collect();
    for (l, inputs) in [(up, &samples), (&dense.blocks[0].down, &hidden)] {
        let [d_in, d_out] = l.dims();
        let w = host(l.weight.val());
        let mut sq = vec![0f64; d_in];
        for x in inputs {
            for (k, v) in host(x.clone()).into_iter().enumerate() {
                sq[k % d_in] += (v as f64).powi(2);
            }
        }
        let norm: Vec<f64> = sq.iter().map(|s| s.sqrt()).collect();
        let wanda = |i: usize, j: usize| (w[i * d_out + j] as f64).abs() * norm[i];
        let magnitude = |i: usize, j: usize| (w[i * d_out + j] as f64).abs();
        let mask = &result.masks[&format!("{}.weight", l.key)];
        let mut differ = 0;
        for j in 0..d_out {
            let want = lowest(d_in, j, d_in / 2, wanda);
            assert_eq!(pruned_inputs(mask, j), want, "{} output {j}", l.key);
            let by_magnitude = lowest(d_in, j, d_in / 2, magnitude);
            differ += want.iter().filter(|i| !by_magnitude.contains(i)).count();
        }
        let total = d_out * d_in / 2;
        println!(
            "{}: Wanda and magnitude disagree on {differ} / {total} pruned",
            l.key
        );
        if l.key.ends_with("up") {
            assert!(
                differ * 20 > total,
                "{}: Wanda ≈ magnitude ({differ})",
                l.key
            );
            for &c in &OUTLIERS {
                let kept = (0..d_out).filter(|&j| mask.get(c, j) == Some(true)).count();
                println!("  outlier channel {c}: kept in {kept} / {d_out} outputs");
                assert!(
                    kept * 10 >= d_out * 9,
                    "channel {c} kept in {kept} / {d_out}"
                );
            }
        }
    }
}

/// `‖f(X) − f_dense(X)‖_F / ‖f_dense(X)‖_F` over `samples`.
fn relative_error(m: &TinyMlp<B>, dense: &TinyMlp<B>, samples: &[Tensor<B, 3>]) -> f64 {
    let (mut err, mut norm) = (0f64, 0f64);
    for x in samples {
        let want = host(dense.forward(x.clone()));
        let got = host(m.forward(x.clone()));
        for (g, w) in got.iter().zip(&want) {
            err += ((g - w) as f64).powi(2);
            norm += (*w as f64).powi(2);
        }
    }
    (err / norm).sqrt()
}

/// SparseGPT reconstructs each layer's output on the calibration data, so the pruned model's
/// output is closer to the dense one than magnitude's, at 50 % and 2:4, on the calibration
/// data and on held-out data of the same distribution. Wanda, which sees the outlier
/// channels, also beats magnitude.
#[test]
fn sparsegpt_reconstructs_the_dense_output_better_than_magnitude() {
    let calibration = data(1);
    let held_out = data(2);
    let dense = model();
    for pattern in [SparsityPattern::Unstructured, two_four()] {
        let err = |method| {
            let (m, _) = pruned(method, pattern, &calibration);
            (
                relative_error(&m, &dense, &calibration),
                relative_error(&m, &dense, &held_out),
            )
        };
        let magnitude = err(Method::Magnitude);
        let wanda = err(Method::Wanda);
        let sparsegpt = err(Method::SparseGpt);
        println!(
            "{pattern:?} relative output error (calibration, held-out): magnitude {magnitude:.4?} \
             wanda {wanda:.4?} sparsegpt {sparsegpt:.4?}"
        );
        assert!(sparsegpt.0 < magnitude.0, "{pattern:?} calibration");
        assert!(sparsegpt.1 < magnitude.1, "{pattern:?} held-out");
        assert!(wanda.0 < magnitude.0, "{pattern:?} wanda calibration");
    }
}

/// A sample of the wrong width is refused with a message, not a panic inside a matmul.
#[test]
fn a_sample_of_the_wrong_width_is_refused() {
    let mut m = model();
    let bad = vec![Tensor::<B, 3>::zeros(
        [1, 4, CONFIG.d + 1],
        &Default::default(),
    )];
    let cfg = config(Method::Wanda, SparsityPattern::Unstructured);
    let err = calibrate_and_prune(&mut m, &bad, &cfg, &mut |_, _, _| {}).unwrap_err();
    assert!(err.to_string().contains("width 33"), "{err}");
}
