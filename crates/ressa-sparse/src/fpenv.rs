//! The floating-point environment of ressa's compute threads: subnormals flushed to zero.
//!
//! A subnormal (|x| < 1.18e-38 in f32) operand or result makes an x86 multiply-add take a
//! micro-code assist of ~100 cycles instead of one. Training the toy T5 produces such values
//! in its gradients, and the products that read them ran at 1.5–3 GFLOP/s instead of
//! 80–150 (`T5` weight gradients `Xᵀ·dY`, 64 × 736 × 64): one step of the shapes model took
//! 0.75 s with them and 0.20 s flushed, with the same losses to every printed digit. Deep
//! learning frameworks do the same on CPUs (TensorFlow flushes on its threads; PyTorch has
//! `torch.set_flush_denormal`).
//!
//! [`flush_subnormals`] sets MXCSR's FTZ (results) and DAZ (inputs) bits on the calling
//! thread and on every thread of rayon's global pool; the binaries (`ressa`, `xtask`, the
//! benches) call it at start and threads they spawn for compute call
//! [`flush_subnormals_on_this_thread`]. On other architectures both are no-ops.

/// MXCSR bit 15 (flush to zero) and bit 6 (denormals are zero).
#[cfg(target_arch = "x86_64")]
const FTZ_DAZ: u32 = 0x8040;

/// Flushes subnormal f32/f64 inputs and results to zero on the calling thread.
pub fn flush_subnormals_on_this_thread() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of x86_64; setting FTZ/DAZ only changes how subnormals round (to
    // zero), never traps and leaves the other control bits as they were.
    #[allow(deprecated)]
    unsafe {
        use std::arch::x86_64::{_mm_getcsr, _mm_setcsr};
        _mm_setcsr(_mm_getcsr() | FTZ_DAZ);
    }
}

/// Whether the calling thread flushes subnormals (always false off x86_64).
pub fn flushes_subnormals() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: reading MXCSR has no side effects.
        #[allow(deprecated)]
        let csr = unsafe { std::arch::x86_64::_mm_getcsr() };
        csr & FTZ_DAZ == FTZ_DAZ
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// [`flush_subnormals_on_this_thread`] on the calling thread and on every thread of rayon's
/// global pool (which lives as long as the process, so once is enough).
pub fn flush_subnormals() {
    flush_subnormals_on_this_thread();
    rayon::broadcast(|_| flush_subnormals_on_this_thread());
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    #[test]
    fn subnormal_products_become_zero_on_every_pool_thread() {
        // A thread and a pool of their own: the harness's threads and the global pool (other
        // tests) keep their environment.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        std::thread::spawn(move || {
            let tiny = std::hint::black_box(1e-20f32);
            assert!(
                tiny * tiny > 0.0,
                "the default environment keeps subnormals"
            );
            assert!(!flushes_subnormals());
            // Inside the pool, `flush_subnormals` covers every thread of that pool.
            pool.install(flush_subnormals);
            assert!(!flushes_subnormals(), "a thread outside the pool");
            flush_subnormals_on_this_thread();
            assert!(flushes_subnormals());
            assert_eq!(std::hint::black_box(tiny) * tiny, 0.0);
            // Normal results are untouched.
            assert!(std::hint::black_box(1e-18f32) * 1e-18 > 0.0);
            let on_pool: Vec<bool> = pool.broadcast(|_| {
                let t = std::hint::black_box(1e-20f32);
                flushes_subnormals() && t * t == 0.0
            });
            assert_eq!(on_pool, [true; 3]);
        })
        .join()
        .unwrap();
    }
}
