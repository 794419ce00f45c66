//! Every pruner on a FlanT5-XL FFN-sized layer: burn weight `[2048, 5120]` (`d_in = 2048`,
//! `d_out = 5120`), 128 calibration samples of 64 tokens: the statistics pass (`stats_*`) and the
//! mask selection (`prune_*`) timed apart. The PyTorch side is `scripts/bench_pruners_torch.py`.
//!
//! `cargo bench -p ressa-prune --bench pruners`

use criterion::{Criterion, criterion_group, criterion_main};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ressa_prune::{
    DsnotConfig, DsnotPruner, MagnitudeConfig, MagnitudePruner, PruneSpec, Pruner, SparseGptConfig,
    SparseGptPruner, WandaConfig, WandaPruner, Weights,
};

const D_IN: usize = 2048;
const D_OUT: usize = 5120;
const SAMPLES: usize = 128;
const TOKENS: usize = 64;

fn data() -> (Vec<f32>, Vec<Vec<f32>>) {
    let mut rng = StdRng::seed_from_u64(0);
    let w = (0..D_IN * D_OUT)
        .map(|_| rng.random::<f32>() - 0.5)
        .collect();
    let xs = (0..SAMPLES)
        .map(|_| {
            (0..TOKENS * D_IN)
                .map(|_| rng.random::<f32>() * 2.0 - 1.0)
                .collect()
        })
        .collect();
    (w, xs)
}

fn feed(p: &mut dyn Pruner, xs: &[Vec<f32>]) {
    for x in xs {
        p.add_batch(x, TOKENS).unwrap();
    }
}

fn bench(c: &mut Criterion) {
    // As the binaries run (`ressa_sparse::fpenv`).
    ressa_sparse::fpenv::flush_subnormals();
    let (w, xs) = data();
    let weights = Weights::new(&w, D_IN, D_OUT).unwrap();
    let half = PruneSpec::unstructured(0.5).unwrap();
    let two_four = PruneSpec::n_m(2, 4).unwrap();

    let mut g = c.benchmark_group("magnitude_2048x5120");
    g.sample_size(10);
    let magnitude = MagnitudePruner::new(D_IN, MagnitudeConfig::default()).unwrap();
    g.bench_function("prune_unstructured_0.5", |b| {
        b.iter(|| magnitude.prune(weights, &half).unwrap())
    });
    g.bench_function("prune_2:4", |b| {
        b.iter(|| magnitude.prune(weights, &two_four).unwrap())
    });
    g.finish();

    let mut g = c.benchmark_group("wanda_2048x5120");
    g.sample_size(10);
    g.bench_function("stats_128x64", |b| {
        b.iter(|| {
            let mut p = WandaPruner::new(D_IN, WandaConfig::default()).unwrap();
            feed(&mut p, &xs);
            p
        })
    });
    let mut wanda = WandaPruner::new(D_IN, WandaConfig::default()).unwrap();
    feed(&mut wanda, &xs);
    g.bench_function("prune_unstructured_0.5", |b| {
        b.iter(|| wanda.prune(weights, &half).unwrap())
    });
    g.bench_function("prune_2:4", |b| {
        b.iter(|| wanda.prune(weights, &two_four).unwrap())
    });
    g.finish();

    let mut g = c.benchmark_group("sparsegpt_2048x5120");
    g.sample_size(10);
    g.bench_function("hessian_128x64", |b| {
        b.iter(|| {
            let mut p = SparseGptPruner::new(D_IN, SparseGptConfig::default()).unwrap();
            feed(&mut p, &xs);
            p
        })
    });
    let mut sgpt = SparseGptPruner::new(D_IN, SparseGptConfig::default()).unwrap();
    feed(&mut sgpt, &xs);
    g.bench_function("prune_unstructured_0.5", |b| {
        b.iter(|| sgpt.prune(weights, &half).unwrap())
    });
    g.bench_function("prune_2:4", |b| {
        b.iter(|| sgpt.prune(weights, &two_four).unwrap())
    });
    g.finish();

    let mut g = c.benchmark_group("dsnot_2048x5120");
    g.sample_size(10);
    g.bench_function("stats_128x64", |b| {
        b.iter(|| {
            let mut p = DsnotPruner::new(D_IN, DsnotConfig::default()).unwrap();
            feed(&mut p, &xs);
            p
        })
    });
    let mut dsnot = DsnotPruner::new(D_IN, DsnotConfig::default()).unwrap();
    feed(&mut dsnot, &xs);
    g.bench_function("prune_unstructured_0.5", |b| {
        b.iter(|| dsnot.prune(weights, &half).unwrap())
    });
    g.bench_function("prune_2:4", |b| {
        b.iter(|| dsnot.prune(weights, &two_four).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
