//! GPU kernels (`ressa_sparse::kernels::gpu`) on a FlanT5-XL FFN-sized layer: burn weight
//! `[2048, 5120]` (`d_in = 2048`, `d_out = 5120`), `x` `[tokens, 2048]` with tokens 1, 4, 8
//! (decode-like) and 64, at 50 / 70 / 90 % unstructured sparsity and 2:4.
//!
//! Per runtime compiled in (`wgpu`, `cuda`), group `gpu_kernels_<runtime>`, ids
//! `<kernel>/<setting>/t<tokens>`:
//! - `dense_cubecl`: the dense CubeCL kernel of the same style on the masked weight (zeros
//!   stored), always measured;
//! - `dense_burn`: burn's own `matmul` on the same device (the honest dense baseline: it is what
//!   the models run), with `--features burn-baseline-wgpu` / `burn-baseline-cuda`;
//! - `csr` (unstructured and 2:4) and `nm` (2:4 only): the packed kernels.
//!
//! Timing: each criterion batch queues its iterations back to back and waits for the device
//! (`client.sync()` / `Backend::sync`) before the clock stops, so the time is device time per
//! product, launch overhead included, without a host round trip per product.
//!
//! `cargo bench -p ressa-sparse --features burn-baseline-cuda --bench gpu_kernels`
//! (on Mesa: `--features wgpu -- --quick 'nm/2:4/t1'`; llvmpipe is slow).

#![cfg_attr(
    not(any(feature = "wgpu", feature = "cuda")),
    allow(dead_code, unused_imports)
)]

mod common;

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use cubecl::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ressa_sparse::SparsityPattern;
use ressa_sparse::formats::{CsrWeight, NmWeight, SparseFormat};
use ressa_sparse::kernels::gpu::{GpuMatrix, GpuSparseWeight};

use common::{D_IN, D_OUT, TOKENS, weight};

fn configure(g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1500));
}

/// `iters` products queued back to back, then one wait for the device.
fn time_kernel<R: Runtime>(
    client: &ComputeClient<R>,
    w: &GpuSparseWeight<R>,
    x: &GpuMatrix<R>,
    iters: u64,
) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        std::hint::black_box(w.matmul(client, x).unwrap());
    }
    cubecl::future::block_on(client.sync()).unwrap();
    start.elapsed()
}

/// Dense burn `matmul` on the same device, if the runtime's `burn-baseline-*` feature is on.
trait BurnBaseline {
    fn bench(
        &self,
        g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
        setting: &str,
        w: &[f32],
        xs: &[Vec<f32>],
    );
}

#[cfg(any(
    all(feature = "wgpu", not(feature = "burn-baseline-wgpu")),
    all(feature = "cuda", not(feature = "burn-baseline-cuda"))
))]
struct NoBurn;

#[cfg(any(
    all(feature = "wgpu", not(feature = "burn-baseline-wgpu")),
    all(feature = "cuda", not(feature = "burn-baseline-cuda"))
))]
impl BurnBaseline for NoBurn {
    fn bench(
        &self,
        _: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
        _: &str,
        _: &[f32],
        _: &[Vec<f32>],
    ) {
    }
}

#[cfg(any(feature = "burn-baseline-wgpu", feature = "burn-baseline-cuda"))]
struct Burn<B: burn::tensor::backend::Backend>(B::Device);

#[cfg(any(feature = "burn-baseline-wgpu", feature = "burn-baseline-cuda"))]
impl<B: burn::tensor::backend::Backend> BurnBaseline for Burn<B> {
    fn bench(
        &self,
        g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
        setting: &str,
        w: &[f32],
        xs: &[Vec<f32>],
    ) {
        use burn::tensor::{Tensor, TensorData};
        let device = &self.0;
        let wt = Tensor::<B, 2>::from_data(TensorData::new(w.to_vec(), [D_IN, D_OUT]), device);
        for (&t, x) in TOKENS.iter().zip(xs) {
            let xt = Tensor::<B, 2>::from_data(TensorData::new(x.clone(), [t, D_IN]), device);
            let id = BenchmarkId::new(format!("dense_burn/{setting}"), format!("t{t}"));
            g.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    for _ in 0..iters {
                        std::hint::black_box(xt.clone().matmul(wt.clone()));
                    }
                    B::sync(device).unwrap();
                    start.elapsed()
                })
            });
        }
    }
}

fn bench_runtime<R: Runtime>(
    c: &mut Criterion,
    name: &str,
    client: ComputeClient<R>,
    burn: &dyn BurnBaseline,
) {
    let mut rng = StdRng::seed_from_u64(0);
    let xs: Vec<Vec<f32>> = TOKENS
        .iter()
        .map(|&t| (0..t * D_IN).map(|_| rng.random::<f32>() - 0.5).collect())
        .collect();
    let xg: Vec<GpuMatrix<R>> = TOKENS
        .iter()
        .zip(&xs)
        .map(|(&t, x)| GpuMatrix::upload(&client, x, t, D_IN).unwrap())
        .collect();
    let cases = [
        ("u50", SparsityPattern::Unstructured, 0.5),
        ("u70", SparsityPattern::Unstructured, 0.7),
        ("u90", SparsityPattern::Unstructured, 0.9),
        ("2:4", SparsityPattern::TWO_FOUR, 0.5),
    ];
    let mut g = c.benchmark_group(format!("gpu_kernels_{name}"));
    configure(&mut g);
    for (setting, pattern, sparsity) in cases {
        let (w, mask) = weight(&mut rng, pattern, sparsity);
        let mut kernels = vec![(
            "dense_cubecl",
            GpuSparseWeight::from_dense(&client, &w, D_IN, D_OUT).unwrap(),
        )];
        let csr = CsrWeight::from_masked(&w, &mask).unwrap();
        kernels.push(("csr", GpuSparseWeight::from_csr(&client, &csr).unwrap()));
        if pattern.is_n_m() {
            let nm = NmWeight::from_masked(&w, &mask, pattern).unwrap();
            kernels.push(("nm", GpuSparseWeight::from_nm(&client, &nm).unwrap()));
        }
        for (k, gw) in &kernels {
            eprintln!(
                "{name} {setting} {k}: {} device bytes (dense {}), {} kept",
                gw.storage_bytes(),
                D_IN * D_OUT * 4,
                csr.nnz()
            );
        }
        burn.bench(&mut g, setting, &w, &xs);
        for (k, gw) in &kernels {
            for (&t, x) in TOKENS.iter().zip(&xg) {
                let id = BenchmarkId::new(format!("{k}/{setting}"), format!("t{t}"));
                g.bench_function(id, |b| {
                    b.iter_custom(|iters| time_kernel(&client, gw, x, iters))
                });
            }
        }
    }
    g.finish();
}

fn bench(c: &mut Criterion) {
    #[cfg(feature = "wgpu")]
    match ressa_sparse::kernels::gpu::wgpu_client() {
        Ok(client) => {
            #[cfg(feature = "burn-baseline-wgpu")]
            let burn = Burn::<burn::backend::Wgpu>(Default::default());
            #[cfg(not(feature = "burn-baseline-wgpu"))]
            let burn = NoBurn;
            bench_runtime(c, "wgpu", client, &burn);
        }
        Err(e) => eprintln!("gpu_kernels: skipping wgpu: {e}"),
    }
    #[cfg(feature = "cuda")]
    {
        // cubecl-cuda panics in a device thread when the driver is missing: look first
        if std::path::Path::new("/proc/driver/nvidia/version").exists() {
            let client = cubecl::cuda::CudaRuntime::client(&Default::default());
            #[cfg(feature = "burn-baseline-cuda")]
            let burn = Burn::<burn::backend::Cuda>(Default::default());
            #[cfg(not(feature = "burn-baseline-cuda"))]
            let burn = NoBurn;
            bench_runtime(c, "cuda", client, &burn);
        } else {
            eprintln!("gpu_kernels: skipping cuda: no NVIDIA driver (/proc/driver/nvidia/version)");
        }
    }
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    {
        let _ = c;
        eprintln!("gpu_kernels: no runtime compiled in (features wgpu, cuda)");
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
