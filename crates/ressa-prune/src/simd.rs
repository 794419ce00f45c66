//! Run-time choice of the instruction set for the host loops.
//!
//! The build targets baseline x86-64 (SSE2). The hot loops of the statistics pass and of the
//! selections are written once as plain Rust (`#[inline(always)]` bodies) and instantiated
//! twice: for the baseline and inside a `#[target_feature(enable = "avx2,fma")]` function,
//! chosen here at run time, as `ressa-sparse`'s kernels do; a few use AVX2 intrinsics. No loop
//! relies on fused multiply-add for its result (Rust never contracts `a * b + c`), so both
//! instantiations give bit-identical results.

use std::sync::atomic::{AtomicU8, Ordering};

/// 0 = not decided, 1 = baseline, 2 = AVX2 + FMA.
static LEVEL: AtomicU8 = AtomicU8::new(0);

/// Whether the AVX2 loops run: the CPU has AVX2 and FMA and `RESSA_KERNELS_BASELINE=1` (the
/// switch `ressa-sparse`'s kernels read too) is not set.
#[inline]
pub(crate) fn avx2() -> bool {
    match LEVEL.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            let baseline = std::env::var_os("RESSA_KERNELS_BASELINE").is_some_and(|v| v == "1");
            let yes = !baseline && detected();
            LEVEL.store(if yes { 2 } else { 1 }, Ordering::Relaxed);
            yes
        }
    }
}

fn detected() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
