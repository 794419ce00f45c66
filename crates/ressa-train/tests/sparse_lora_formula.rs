//! The SparseLoRA student against an independent host computation: one
//! `ressa_models::linear::Linear` with a SparseLoRA adapter computes
//! `y = x·((W + s·A·B) ⊙ M) + b` with `s = α / r` (`LoraConfig::init` sets `scale = alpha /
//! rank`; `A` is [d_in, r], `B` [r, d_out], `W` and `M` [d_in, d_out], burn orientation), and
//! the autodiff gradients of `A` and `B` through the KL term of `distill_loss` equal central
//! finite differences of a plain-f64 KL (token mean over the mask, times T²) on the host.

use burn::backend::Autodiff;
use burn::module::Param;
use burn::prelude::*;
use ressa_models::linear::{Linear, LoraConfig};
use ressa_train::distill::{DistillConfig, KlReduction, distill_loss};

/// Flex, or CUDA with the `test-cuda` feature (`scripts/gpu_check.sh`).
#[cfg(not(feature = "test-cuda"))]
type Inner = burn::backend::Flex;
#[cfg(feature = "test-cuda")]
type Inner = burn::backend::Cuda;
type AD = Autodiff<Inner>;

const D_IN: usize = 5;
const D_OUT: usize = 7; // the "vocabulary" of the logits
const RANK: usize = 2;
const ALPHA: f64 = 3.0; // s = 1.5
const TOKENS: usize = 4;
const TEMPERATURE: f64 = 2.0;

/// A small deterministic generator (values in [-1, 1)).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0) as f32
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

struct Setup {
    w: Vec<f32>,
    bias: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    keep: Vec<bool>,
    x: Vec<f32>,
    /// Position mask [1, TOKENS] (one padding position).
    pos: Vec<f32>,
}

fn setup() -> Setup {
    let mut g = Lcg(0x5EED_1234);
    let w = g.vec(D_IN * D_OUT, 0.8);
    let bias = g.vec(D_OUT, 0.3);
    let a = g.vec(D_IN * RANK, 0.6);
    let b = g.vec(RANK * D_OUT, 0.6);
    // About 40% kept, not a regular pattern.
    let keep: Vec<bool> = (0..D_IN * D_OUT).map(|_| g.next() > 0.2).collect();
    assert!(keep.iter().any(|k| !k) && keep.iter().any(|k| *k));
    let x = g.vec(TOKENS * D_IN, 1.0);
    let pos = vec![1.0, 1.0, 0.0, 1.0];
    Setup {
        w,
        bias,
        a,
        b,
        keep,
        x,
        pos,
    }
}

/// Host `x·((W + s·A·B) ⊙ M) + b` (with `adapter = false`: the dense `x·W + b`), f64.
fn host_logits(s: &Setup, a: &[f64], b: &[f64], adapter: bool) -> Vec<f64> {
    let scale = ALPHA / RANK as f64;
    let mut weff = vec![0f64; D_IN * D_OUT];
    for i in 0..D_IN {
        for j in 0..D_OUT {
            let mut v = s.w[i * D_OUT + j] as f64;
            if adapter {
                let mut ab = 0f64;
                for k in 0..RANK {
                    ab += a[i * RANK + k] * b[k * D_OUT + j];
                }
                v += scale * ab;
                if !s.keep[i * D_OUT + j] {
                    v = 0.0;
                }
            }
            weff[i * D_OUT + j] = v;
        }
    }
    let mut y = vec![0f64; TOKENS * D_OUT];
    for t in 0..TOKENS {
        for j in 0..D_OUT {
            let mut acc = s.bias[j] as f64;
            for i in 0..D_IN {
                acc += s.x[t * D_IN + i] as f64 * weff[i * D_OUT + j];
            }
            y[t * D_OUT + j] = acc;
        }
    }
    y
}

fn log_softmax(z: &[f64]) -> Vec<f64> {
    let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
    z.iter().map(|v| v - lse).collect()
}

/// Host KL(teacher ‖ student) at temperature T, mean over unmasked positions, times T².
fn host_kl(s: &Setup, student: &[f64], teacher: &[f64]) -> f64 {
    let mut sum = 0f64;
    let mut n = 0f64;
    for t in 0..TOKENS {
        let zs: Vec<f64> = student[t * D_OUT..(t + 1) * D_OUT]
            .iter()
            .map(|v| v / TEMPERATURE)
            .collect();
        let zt: Vec<f64> = teacher[t * D_OUT..(t + 1) * D_OUT]
            .iter()
            .map(|v| v / TEMPERATURE)
            .collect();
        let (ls, lt) = (log_softmax(&zs), log_softmax(&zt));
        let kl: f64 = lt
            .iter()
            .zip(&ls)
            .map(|(lt, ls)| lt.exp() * (lt - ls))
            .sum();
        sum += kl * s.pos[t] as f64;
        n += s.pos[t] as f64;
    }
    sum / n * TEMPERATURE * TEMPERATURE
}

fn tensor<const D: usize>(v: &[f32], shape: [usize; D]) -> Tensor<AD, D> {
    Tensor::from_data(TensorData::new(v.to_vec(), shape), &Default::default())
}

fn values<const D: usize, BB: Backend>(t: Tensor<BB, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

fn linear(s: &Setup) -> Linear<AD> {
    let device = Default::default();
    let mut l = Linear::new(tensor(&s.w, [D_IN, D_OUT]), Some(tensor(&s.bias, [D_OUT])));
    let mut adapter =
        LoraConfig::new(RANK)
            .with_alpha(ALPHA)
            .init::<AD>(D_IN, D_OUT, Some(&s.keep), &device);
    assert_eq!(adapter.scale, ALPHA / RANK as f64, "s = alpha / rank");
    adapter.lora_a = Param::from_tensor(tensor(&s.a, [D_IN, RANK]));
    adapter.lora_b = Param::from_tensor(tensor(&s.b, [RANK, D_OUT]));
    l.adapter = Some(adapter);
    l
}

#[test]
fn student_forward_is_masked_low_rank_update() {
    let s = setup();
    let l = linear(&s);
    let x = tensor(&s.x, [1, TOKENS, D_IN]);
    let got = values(l.forward(x.clone()));
    let a: Vec<f64> = s.a.iter().map(|v| *v as f64).collect();
    let b: Vec<f64> = s.b.iter().map(|v| *v as f64).collect();
    let want = host_logits(&s, &a, &b, true);
    assert_eq!(got.len(), want.len());
    for (k, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (*g as f64 - w).abs() < 1e-5,
            "student logit {k}: {g} vs host {w}"
        );
    }
    // The teacher (dense path) is x·W + b from the same W.
    let got = values(l.forward_dense(x));
    let want = host_logits(&s, &a, &b, false);
    for (k, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (*g as f64 - w).abs() < 1e-5,
            "teacher logit {k}: {g} vs host {w}"
        );
    }
    // The effective weight itself: exact zeros where M prunes.
    let weff = values(l.effective_weight());
    for (k, keep) in s.keep.iter().enumerate() {
        if !keep {
            assert_eq!(weff[k], 0.0, "pruned entry {k} must be exactly 0");
        }
    }
}

#[test]
fn kl_gradients_of_a_and_b_equal_finite_differences() {
    let s = setup();
    let l = linear(&s);
    let device = Default::default();
    let x = tensor(&s.x, [1, TOKENS, D_IN]);
    let student = l.forward(x.clone());
    let teacher = l.forward_dense(x);
    let targets =
        Tensor::<AD, 2, Int>::from_data(TensorData::new(vec![0i64, 3, 6, 2], [1, TOKENS]), &device);
    let mask = tensor(&s.pos, [1, TOKENS]);
    // λ = 1: the loss is the KL term alone.
    let cfg = DistillConfig {
        lambda: 1.0,
        temperature: TEMPERATURE,
        reduction: KlReduction::TokenMean,
    };
    let parts = distill_loss(student, teacher, targets, mask, &cfg);
    let loss: f32 = parts.loss.clone().into_scalar();
    let kl: f32 = parts.kl.into_scalar();

    let a0: Vec<f64> = s.a.iter().map(|v| *v as f64).collect();
    let b0: Vec<f64> = s.b.iter().map(|v| *v as f64).collect();
    let teacher_host = host_logits(&s, &a0, &b0, false);
    let host_loss = |a: &[f64], b: &[f64]| host_kl(&s, &host_logits(&s, a, b, true), &teacher_host);
    let want = host_loss(&a0, &b0);
    assert!(want > 1e-3, "a non-trivial KL ({want})");
    assert!(
        (kl as f64 - want).abs() < 1e-5 * want.max(1.0),
        "kl {kl} vs host {want}"
    );
    assert!(
        (loss as f64 - want).abs() < 1e-5 * want.max(1.0),
        "loss {loss} vs host {want}"
    );

    let grads = parts.loss.backward();
    let adapter = l.adapter.as_ref().unwrap();
    let ga = values(adapter.lora_a.val().grad(&grads).expect("grad of A"));
    let gb = values(adapter.lora_b.val().grad(&grads).expect("grad of B"));
    let h = 1e-5;
    let fd = |which: usize, k: usize| {
        let (mut a, mut b) = (a0.clone(), b0.clone());
        let v = if which == 0 { &mut a[k] } else { &mut b[k] };
        let orig = *v;
        *v = orig + h;
        let up = host_loss(&a, &b);
        let (mut a, mut b) = (a0.clone(), b0.clone());
        let v = if which == 0 { &mut a[k] } else { &mut b[k] };
        *v = orig - h;
        let down = host_loss(&a, &b);
        (up - down) / (2.0 * h)
    };
    let mut max_grad = 0f64;
    for (which, got, name) in [(0, &ga, "A"), (1, &gb, "B")] {
        for (k, g) in got.iter().enumerate() {
            let want = fd(which, k);
            max_grad = max_grad.max(want.abs());
            assert!(
                (*g as f64 - want).abs() <= 1e-4 + 1e-3 * want.abs(),
                "∂KL/∂{name}[{k}]: autodiff {g} vs finite difference {want}"
            );
        }
    }
    assert!(max_grad > 1e-3, "the gradients are not all ~0 ({max_grad})");
}
