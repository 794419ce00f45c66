//! Elementwise `f32` functions in plain arithmetic (no libm calls), so loops over slices
//! vectorize; used by the Flex kernels for activations and softmax.
//!
//! - `exp`: `eˣ = 2ᵏ·eʳ` with `k = round(x·log₂e)`, `r = x − k·ln 2` (ln 2 split in two parts
//!   so `r` is exact), `eʳ` by its degree-7 Taylor polynomial (|r| ≤ ln2/2: truncation
//!   < 2e-8 relative), `2ᵏ` built in the exponent bits. Relative error < 3e-7 (tested).
//! - `erf`: Abramowitz & Stegun 7.1.26, `erf(x) = 1 − (a₁t + … + a₅t⁵)·e^{−x²}`,
//!   `t = 1/(1 + p·x)`: 1.5e-7 absolute in exact arithmetic, ≤ 6e-7 in f32 (tested against f64).
//! - `tanh(x) = 1 − 2/(e^{2x} + 1)`, `sigmoid(x) = 1/(1 + e^{−x})`.

use crate::config::Activation;

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 = LN2_HI + LN2_LO, LN2_HI with few mantissa bits so `k·LN2_HI` is exact.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5·2²³: adding and subtracting it rounds to the nearest integer.
const ROUND: f32 = 12_582_912.0;

/// `eˣ`; 0 below −87.3, clamped to e^88.3 above.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.3);
    let k = (x * LOG2E + ROUND) - ROUND;
    let r = x - k * LN2_HI - k * LN2_LO;
    // eʳ, Horner: 1 + r(1 + r/2(1 + r/3(1 + r/4(1 + r/5(1 + r/6(1 + r/7))))))
    let mut p = 1.0 + r * (1.0 / 7.0);
    p = 1.0 + r * (1.0 / 6.0) * p;
    p = 1.0 + r * (1.0 / 5.0) * p;
    p = 1.0 + r * (1.0 / 4.0) * p;
    p = 1.0 + r * (1.0 / 3.0) * p;
    p = 1.0 + r * 0.5 * p;
    p = 1.0 + r * p;
    // 2ᵏ for k in [−126, 127]
    let two_k = f32::from_bits(((k as i32 + 127) as u32) << 23);
    p * two_k
}

/// The error function (A&S 7.1.26).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_8,
        -1.453_152_1,
        1.061_405_4,
    ];
    let a = x.abs();
    let t = 1.0 / (1.0 + P * a);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let y = 1.0 - poly * exp(-a * a);
    y.copysign(x)
}

#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    // 1 − 2/(e^{2x} + 1) loses nothing for large |x|; near 0 its absolute error is ~1e-7
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
}

#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

const SQRT_1_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1/√(2π)
const INV_SQRT_2PI: f32 = 0.398_942_3;
/// √(2/π)
const SQRT_2_PI: f32 = 0.797_884_6;

/// `act(x)`.
#[inline(always)]
pub fn activation(x: f32, act: Activation) -> f32 {
    match act {
        Activation::Gelu => 0.5 * x * (1.0 + erf(x * SQRT_1_2)),
        Activation::GeluTanh => 0.5 * x * (1.0 + tanh(SQRT_2_PI * (x + 0.044715 * x * x * x))),
        Activation::Relu => x.max(0.0),
        Activation::Silu => x * sigmoid(x),
        Activation::QuickGelu => x * sigmoid(1.702 * x),
    }
}

/// `act'(x)` (the formulas of `ops::composed::derivative`).
#[inline(always)]
pub fn derivative(x: f32, act: Activation) -> f32 {
    match act {
        Activation::Gelu => 0.5 * (1.0 + erf(x * SQRT_1_2)) + x * exp(-0.5 * x * x) * INV_SQRT_2PI,
        Activation::GeluTanh => {
            let t = tanh(SQRT_2_PI * (x + 0.044715 * x * x * x));
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_PI * (1.0 + 3.0 * 0.044715 * x * x)
        }
        Activation::Relu => {
            if x > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        Activation::Silu => {
            let s = sigmoid(x);
            s * (1.0 + x * (1.0 - s))
        }
        Activation::QuickGelu => {
            let ax = 1.702 * x;
            let s = sigmoid(ax);
            s * (1.0 + ax * (1.0 - s))
        }
    }
}

/// `out[i] = act(src[i])`, vectorized where the CPU has AVX2 + FMA.
pub fn activate_slice(out: &mut [f32], src: &[f32], act: Activation) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { activate_avx2(out, src, act) };
    }
    activate_plain(out, src, act)
}

/// `out[i] = g[i]·act'(x[i])`, vectorized where the CPU has AVX2 + FMA.
pub fn derivative_slice(out: &mut [f32], x: &[f32], g: &[f32], act: Activation) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { derivative_avx2(out, x, g, act) };
    }
    derivative_plain(out, x, g, act)
}

/// Every arm its own loop, so each one vectorizes.
macro_rules! per_activation {
    ($act:expr, |$a:ident| $body:expr) => {
        match $act {
            Activation::Gelu => {
                let $a = Activation::Gelu;
                $body
            }
            Activation::GeluTanh => {
                let $a = Activation::GeluTanh;
                $body
            }
            Activation::Relu => {
                let $a = Activation::Relu;
                $body
            }
            Activation::Silu => {
                let $a = Activation::Silu;
                $body
            }
            Activation::QuickGelu => {
                let $a = Activation::QuickGelu;
                $body
            }
        }
    };
}

#[inline(always)]
fn activate_plain(out: &mut [f32], src: &[f32], act: Activation) {
    per_activation!(act, |a| out
        .iter_mut()
        .zip(src)
        .for_each(|(o, x)| *o = activation(*x, a)))
}

#[inline(always)]
fn derivative_plain(out: &mut [f32], x: &[f32], g: &[f32], act: Activation) {
    per_activation!(act, |a| out
        .iter_mut()
        .zip(x.iter().zip(g))
        .for_each(|(o, (x, g))| *o = g * derivative(*x, a)))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn activate_avx2(out: &mut [f32], src: &[f32], act: Activation) {
    activate_plain(out, src, act)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn derivative_avx2(out: &mut [f32], x: &[f32], g: &[f32], act: Activation) {
    derivative_plain(out, x, g, act)
}

/// Softmax of one row in place (max-subtracted).
#[inline(always)]
pub fn softmax_row(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for x in row.iter_mut() {
        *x = exp(*x - max);
        sum += *x;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|x| *x *= inv);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid() -> impl Iterator<Item = f32> {
        (-200_000..=200_000).map(|i| i as f32 * 1e-4)
    }

    #[test]
    fn exp_relative_error() {
        let mut worst = 0.0f64;
        for x in grid().map(|x| x * 4.0).chain([-87.0, -50.0, 50.0, 88.0]) {
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 3e-7, "exp: worst relative error {worst}");
        assert!(exp(-1000.0) < 1e-37);
        assert!(exp(1000.0).is_finite());
    }

    #[test]
    fn erf_tanh_sigmoid_absolute_error() {
        let (mut e, mut t, mut s) = (0.0f64, 0.0f64, 0.0f64);
        for x in grid() {
            let xd = x as f64;
            e = e.max((erf(x) as f64 - libm::erf(xd)).abs());
            t = t.max((tanh(x) as f64 - xd.tanh()).abs());
            s = s.max((sigmoid(x) as f64 - 1.0 / (1.0 + (-xd).exp())).abs());
        }
        assert!(e < 6e-7, "erf: {e}");
        assert!(t < 3e-7, "tanh: {t}");
        assert!(s < 2e-7, "sigmoid: {s}");
    }

    #[test]
    fn activations_against_f64_definitions() {
        let gelu = |x: f64| 0.5 * x * (1.0 + libm::erf(x / 2f64.sqrt()));
        for x in grid() {
            let xd = x as f64;
            let tol = 1e-6 * (1.0 + xd.abs());
            assert!(
                (activation(x, Activation::Gelu) as f64 - gelu(xd)).abs() <= tol,
                "{x}"
            );
            // derivative against a central difference of the f64 definition
            let h = 1e-5;
            let d = (gelu(xd + h) - gelu(xd - h)) / (2.0 * h);
            assert!(
                (derivative(x, Activation::Gelu) as f64 - d).abs() <= 1e-5,
                "{x}"
            );
        }
        let mut out = vec![0.0; 5];
        activate_slice(&mut out, &[-2.0, -0.5, 0.0, 0.5, 2.0], Activation::Relu);
        assert_eq!(out, [0.0, 0.0, 0.0, 0.5, 2.0]);
    }
}
