#!/usr/bin/env python3
"""PyTorch side of the sparse-kernel benchmark (`crates/ressa-sparse/benches/kernels.rs`): a
FlanT5-XL FFN-sized weight (PyTorch [5120, 2048], burn [2048, 5120]) times x [tokens, 2048] for
tokens 1, 4, 8 and 64, on the CPU:

- `dense_2048x5120/torch/<t>`: `F.linear` on the dense (masked) weight, what a pruned model runs;
- `sparse_<setting>/torch_csr/<t>`: the same weight as a `torch.sparse_csr_tensor`, times x^T,
  at 50 / 70 / 90 % unstructured (PyTorch's CPU has no 2:4 kernel).

Prints one JSON object: {"torch", "threads", "device", "times_ms": {criterion-like id: median ms}}.

    python scripts/bench_kernels_torch.py [--threads 2]
"""
import argparse
import warnings
import json
import time

import torch
import torch.nn.functional as F

D_IN, D_OUT = 2048, 5120
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
TOKENS = [1, 4, 8, 64]


def median_ms(f, min_time=0.5):
    for _ in range(3):
        f()
    times = []
    start = time.perf_counter()
    while len(times) < 10 or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
        if len(times) >= 2000:
            break
    times.sort()
    return 1000 * times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    w = torch.rand(D_OUT, D_IN, generator=g) - 0.5
    xs = {t: torch.rand(t, D_IN, generator=g) - 0.5 for t in TOKENS}
    times = {}
    with torch.no_grad():
        for t, x in xs.items():
            times[f"dense_2048x5120/torch/{t}"] = median_ms(lambda: F.linear(x, w))
        for pct in (50, 70, 90):
            keep = torch.rand(D_OUT, D_IN, generator=g) >= pct / 100
            csr = (w * keep).to_sparse_csr()
            for t, x in xs.items():
                xt = x.t().contiguous()
                times[f"sparse_unstructured_{pct}/torch_csr/{t}"] = median_ms(lambda: csr @ xt)
    print(json.dumps({"torch": torch.__version__, "threads": args.threads, "device": "cpu", "times_ms": times}))


if __name__ == "__main__":
    main()
