//! Sparse × dense products on a FlanT5-XL FFN-sized layer: burn weight `[2048, 5120]`
//! (`d_in = 2048`, `d_out = 5120`), `x` `[tokens, 2048]` with tokens 1, 4, 8 (decode-like) and
//! 64, at 50 / 70 / 90 % unstructured sparsity and 2:4.
//!
//! Dense baselines: burn's Flex backend `matmul` (what the models run), `SparseLinear`'s dense
//! path (`linear_dense`: the plain loop at 1 token, faer's gemm above) and this crate's plain
//! dense loop (`loop`). Sparse: CSR, bitmask
//! (compressed-tensors layout), N:M (2:4 only), and `SparseLinear` with its measured pick;
//! at 70 % and 2:4 also CSR and N:M compiled for the baseline target (`*_baseline`) next to
//! the AVX2 build the kernels pick at run time.
//! Weights stay cache-warm between iterations, as in a criterion loop.
//!
//! `cargo bench -p ressa-sparse --bench kernels`

mod common;

use std::hint::black_box;
use std::time::Duration;

use burn::backend::Flex;
use burn::tensor::{Tensor, TensorData};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ressa_sparse::formats::{
    BitmaskWeight, CsrWeight, NmWeight, SparseFormat, ValueDtype, serialize_bitmask,
};
use ressa_sparse::kernels::{
    SimdLevel, SparseLinear, force_simd_level, matmul_bitmask, matmul_csr, matmul_dense, matmul_nm,
    simd_level,
};
use ressa_sparse::{Mask, SparsityPattern};

use common::{D_IN, D_OUT, TOKENS, weight};

fn configure(g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1200));
}

fn bench(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(0);
    let xs: Vec<Vec<f32>> = TOKENS
        .iter()
        .map(|&t| (0..t * D_IN).map(|_| rng.random::<f32>() - 0.5).collect())
        .collect();

    // dense baselines (a masked weight multiplies at the same speed as any other)
    let (w, _) = weight(&mut rng, SparsityPattern::Unstructured, 0.0);
    let device = Default::default();
    let wt = Tensor::<Flex, 2>::from_data(TensorData::new(w.clone(), [D_IN, D_OUT]), &device);
    let dense_linear = SparseLinear::with_kind(
        &w,
        &Mask::ones(D_IN, D_OUT).unwrap(),
        SparsityPattern::Unstructured,
        None,
        ressa_sparse::kernels::KernelKind::Dense,
    )
    .unwrap();
    let mut g = c.benchmark_group("dense_2048x5120");
    configure(&mut g);
    for (&t, x) in TOKENS.iter().zip(&xs) {
        let xt = Tensor::<Flex, 2>::from_data(TensorData::new(x.clone(), [t, D_IN]), &device);
        g.bench_with_input(BenchmarkId::new("flex", t), &t, |b, _| {
            b.iter(|| black_box(xt.clone().matmul(wt.clone())))
        });
        g.bench_with_input(BenchmarkId::new("linear_dense", t), &t, |b, &t| {
            b.iter(|| black_box(dense_linear.forward(x, t).unwrap()))
        });
        g.bench_with_input(BenchmarkId::new("loop", t), &t, |b, &t| {
            b.iter(|| black_box(matmul_dense(x, t, &w, D_IN, D_OUT).unwrap()))
        });
    }
    g.finish();
    drop((w, wt, dense_linear));

    let cases = [
        ("unstructured_50", SparsityPattern::Unstructured, 0.5),
        ("unstructured_70", SparsityPattern::Unstructured, 0.7),
        ("unstructured_90", SparsityPattern::Unstructured, 0.9),
        ("2:4", SparsityPattern::TWO_FOUR, 0.5),
    ];
    for (name, pattern, sparsity) in cases {
        let (w, mask) = weight(&mut rng, pattern, sparsity);
        let csr = CsrWeight::from_masked(&w, &mask).unwrap();
        let bm = BitmaskWeight::from_masked(&w, &mask).unwrap();
        let nm = pattern
            .is_n_m()
            .then(|| NmWeight::from_masked(&w, &mask, pattern).unwrap());
        if name == "unstructured_50" {
            let sparse = serialize_bitmask([("w.weight", &bm)], ValueDtype::F32).unwrap();
            eprintln!(
                "bitmask safetensors at 50 %: {} bytes, dense f32 {} bytes (ratio {:.3}); CSR {} B, bitmask {} B in memory",
                sparse.len(),
                D_IN * D_OUT * 4,
                sparse.len() as f64 / (D_IN * D_OUT * 4) as f64,
                csr.storage_bytes(),
                bm.storage_bytes()
            );
        }
        let mut g = c.benchmark_group(format!("sparse_{name}"));
        configure(&mut g);
        for (&t, x) in TOKENS.iter().zip(&xs) {
            g.bench_with_input(BenchmarkId::new("csr", t), &t, |b, &t| {
                b.iter(|| black_box(matmul_csr(x, t, &csr).unwrap()))
            });
            g.bench_with_input(BenchmarkId::new("bitmask", t), &t, |b, &t| {
                b.iter(|| black_box(matmul_bitmask(x, t, &bm).unwrap()))
            });
            if let Some(nm) = &nm {
                g.bench_with_input(BenchmarkId::new("nm", t), &t, |b, &t| {
                    b.iter(|| black_box(matmul_nm(x, t, nm).unwrap()))
                });
            }
            // the same loops compiled for the baseline target instead of AVX2
            if matches!(name, "unstructured_70" | "2:4") && simd_level() == SimdLevel::Avx2 {
                force_simd_level(SimdLevel::Baseline);
                g.bench_with_input(BenchmarkId::new("csr_baseline", t), &t, |b, &t| {
                    b.iter(|| black_box(matmul_csr(x, t, &csr).unwrap()))
                });
                if let Some(nm) = &nm {
                    g.bench_with_input(BenchmarkId::new("nm_baseline", t), &t, |b, &t| {
                        b.iter(|| black_box(matmul_nm(x, t, nm).unwrap()))
                    });
                }
                force_simd_level(SimdLevel::Avx2);
            }
            let auto = SparseLinear::new(&w, &mask, pattern, None, t).unwrap();
            let id = format!("auto_{:?}", auto.kind()).to_lowercase();
            g.bench_with_input(BenchmarkId::new(id, t), &t, |b, &t| {
                b.iter(|| black_box(auto.forward(x, t).unwrap()))
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
