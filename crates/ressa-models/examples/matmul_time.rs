//! Times Flex's dense matmul at a FlanT5-XL FFN shape (64 tokens × 2048 → 5120), the op the
//! dense-speed issue measured (`cargo run -p ressa-models --example matmul_time`).

use burn::backend::Flex;
use burn::prelude::*;

fn main() {
    let device = Default::default();
    let x = Tensor::<Flex, 2>::random([64, 2048], burn::tensor::Distribution::Default, &device);
    let w = Tensor::<Flex, 2>::random([2048, 5120], burn::tensor::Distribution::Default, &device);
    for _ in 0..3 {
        let _ = x.clone().matmul(w.clone()).into_data();
    }
    let n = 20;
    let mut best = f64::INFINITY;
    let mut total = 0.0;
    for _ in 0..n {
        let t = std::time::Instant::now();
        let _ = x.clone().matmul(w.clone()).into_data();
        let s = t.elapsed().as_secs_f64();
        best = best.min(s);
        total += s;
    }
    println!(
        "matmul [64, 2048] x [2048, 5120]: best {:.2} ms, mean {:.2} ms",
        best * 1e3,
        total / n as f64 * 1e3
    );
}
