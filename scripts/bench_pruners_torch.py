#!/usr/bin/env python3
"""PyTorch side of the pruner benchmark (`crates/ressa-prune/benches/pruners.rs`): magnitude,
Wanda, SparseGPT and DSnoT as the reference implementations do them (locuslab/wanda
`prune_magnitude` / `prune_wanda` per-output sort and `WrappedGPT` statistics;
IST-DASLab/sparsegpt `fasterprune`; zyxxmu/DSnoT's row-parallel prune-and-regrow loop, written here
from the reference notes §7.5, unstructured only), on a burn-[2048, 5120] layer (PyTorch weight
[5120, 2048]) with 128 samples x 64 tokens, on the CPU.

Prints one JSON object: {"torch", "threads", "device", "times_ms": {criterion id: best ms}}.

    python scripts/bench_pruners_torch.py [--threads 2]
"""
import argparse
import json
import math
import time

import torch

D_IN, D_OUT, SAMPLES, TOKENS = 2048, 5120, 128, 64


def wanda_stats(xs):
    scaler = torch.zeros(D_IN)
    n = 0
    for x in xs:  # layerwrapper.add_batch, one sample [tokens, d_in]
        scaler *= n / (n + 1)
        n += 1
        scaler += torch.norm(x.t().float(), p=2, dim=1) ** 2 / n
    return scaler


def wanda_prune(w, scaler, sparsity=0.5, prune_n=0, prune_m=0):
    metric = w.abs() * torch.sqrt(scaler.reshape(1, -1))
    mask = torch.zeros_like(metric, dtype=torch.bool)
    if prune_n:
        for ii in range(0, metric.shape[1], prune_m):
            tmp = metric[:, ii:ii + prune_m].float()
            mask.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
    else:
        idx = torch.sort(metric, dim=-1, stable=True)[1]
        mask.scatter_(1, idx[:, : int(metric.shape[1] * sparsity)], True)
    out = w.clone()
    out[mask] = 0
    return out


def magnitude_prune(w, sparsity=0.5, prune_n=0, prune_m=0):
    metric = w.abs()
    if prune_n:
        mask = torch.zeros_like(metric, dtype=torch.bool)
        for ii in range(0, metric.shape[1], prune_m):
            tmp = metric[:, ii:ii + prune_m].float()
            mask.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
    else:
        thresh = torch.sort(metric.flatten())[0][int(metric.numel() * sparsity)]
        mask = metric <= thresh
    out = w.clone()
    out[mask] = 0
    return out


def dsnot_stats(xs):
    """Wanda's column norms plus DSnoT's per-input token-sum mean and streaming variance."""
    scaler, mean, var = torch.zeros(D_IN), torch.zeros(D_IN), torch.zeros(D_IN)
    n = 0
    for x in xs:
        scaler *= n / (n + 1)
        mean *= n / (n + 1)
        var *= n / (n + 1)
        n += 1
        scaler += torch.norm(x.t().float(), p=2, dim=1) ** 2 / n
        mean += x.sum(0) / n
        var += x.var(0, unbiased=False) / n
    return scaler, mean, var


def dsnot_prune(w, scaler, mean, var, sparsity=0.5, max_cycle=100, thr=0.1):
    """Unstructured DSnoT, all rows at once (reference notes §7.5)."""
    rows, c = w.shape
    wanda = w.abs() * torch.sqrt(scaler.reshape(1, -1))
    k = round(c * sparsity)
    order = torch.sort(wanda, dim=1, stable=True)[1]
    prune = torch.zeros_like(w, dtype=torch.bool)
    prune.scatter_(1, order[:, :k], True)
    d = w * mean.reshape(1, -1)
    regrow = torch.where(prune, d, torch.zeros_like(d)) / var.reshape(1, -1)
    r = torch.sort(regrow, dim=1, stable=True)[1]
    e = (d * prune).sum(1, keepdim=True)
    kept = order[:, k:]
    vals = d.gather(1, kept)
    t = torch.arange(c - k).expand_as(vals)
    key = torch.where(vals < 0, t, torch.where(vals == 0, (c - k) + t, 3 * (c - k) - t))
    p = kept.gather(1, torch.sort(key, dim=1)[1])
    lo, hi = torch.zeros(rows, 1, dtype=torch.long), torch.full((rows, 1), c - 1)
    head, tail = torch.zeros(rows, 1, dtype=torch.long), torch.full((rows, 1), c - k - 1)
    active = torch.ones(rows, 1, dtype=torch.bool)
    for _ in range(max_cycle):
        if not active.any():
            break
        pos, neg = e > 0, e < 0
        g = r.gather(1, torch.where(pos, hi, lo).clamp(0, c - 1))
        hi, lo = hi - pos.long(), lo + (~pos).long()
        q = p.gather(1, torch.where(neg, tail, head).clamp(0, c - k - 1))
        tail, head = tail - neg.long(), head + (~neg).long()
        active &= (e.abs() > thr) & (lo <= hi) & (head <= tail)
        dq, dg = d.gather(1, q), d.gather(1, g)
        prune.scatter_(1, q, prune.gather(1, q) | active)
        prune.scatter_(1, g, prune.gather(1, g) & ~active)
        e += torch.where(active, dq - dg, torch.zeros_like(e))
    out = w.clone()
    out[prune] = 0
    return out


def sparsegpt_stats(xs):
    h = torch.zeros(D_IN, D_IN)
    n = 0
    for x in xs:
        h *= n / (n + 1)
        n += 1
        inp = math.sqrt(2 / n) * x.t().float()
        h += inp.matmul(inp.t())
    return h


def sparsegpt_prune(w, h, sparsity=0.5, prune_n=0, prune_m=0, blocksize=128, percdamp=0.01):
    w = w.clone().float()
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(h))
    diag = torch.arange(D_IN)
    h[diag, diag] += damp
    h = torch.linalg.cholesky(h)
    h = torch.cholesky_inverse(h)
    hinv = torch.linalg.cholesky(h, upper=True)
    for i1 in range(0, D_IN, blocksize):
        i2 = min(i1 + blocksize, D_IN)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        if prune_n == 0:
            tmp = w1 ** 2 / (torch.diag(hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(count):
            wcol = w1[:, i]
            d = hinv1[i, i]
            if prune_n != 0 and i % prune_m == 0:
                tmp = w1[:, i:(i + prune_m)] ** 2 / (torch.diag(hinv1)[i:(i + prune_m)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
            q = wcol.clone()
            q[mask1[:, i]] = 0
            q1[:, i] = q
            err = (wcol - q) / d
            w1[:, i:] -= err.unsqueeze(1).matmul(hinv1[i, i:].unsqueeze(0))
            err1[:, i] = err
        w[:, i1:i2] = q1
        w[:, i2:] -= err1.matmul(hinv[i1:i2, i2:])
    return w


def timed(f, reps):
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    w = torch.rand(D_OUT, D_IN, generator=g) - 0.5
    xs = [torch.rand(TOKENS, D_IN, generator=g) * 2 - 1 for _ in range(SAMPLES)]
    scaler = wanda_stats(xs)
    h = sparsegpt_stats(xs)
    _, mean, var = dsnot_stats(xs)
    reps = args.reps
    times_s = {
        "magnitude_2048x5120/prune_unstructured_0.5": timed(lambda: magnitude_prune(w), reps),
        "magnitude_2048x5120/prune_2:4": timed(lambda: magnitude_prune(w, prune_n=2, prune_m=4), reps),
        "wanda_2048x5120/stats_128x64": timed(lambda: wanda_stats(xs), reps),
        "wanda_2048x5120/prune_unstructured_0.5": timed(lambda: wanda_prune(w, scaler), reps),
        "wanda_2048x5120/prune_2:4": timed(lambda: wanda_prune(w, scaler, prune_n=2, prune_m=4), reps),
        "sparsegpt_2048x5120/hessian_128x64": timed(lambda: sparsegpt_stats(xs), reps),
        "sparsegpt_2048x5120/prune_unstructured_0.5": timed(lambda: sparsegpt_prune(w, h), 1),
        "sparsegpt_2048x5120/prune_2:4": timed(lambda: sparsegpt_prune(w, h, prune_n=2, prune_m=4), 1),
        "dsnot_2048x5120/stats_128x64": timed(lambda: dsnot_stats(xs), reps),
        "dsnot_2048x5120/prune_unstructured_0.5": timed(lambda: dsnot_prune(w, scaler, mean, var), reps),
    }
    print(json.dumps({"torch": torch.__version__, "threads": args.threads, "device": "cpu",
                      "times_ms": {k: 1000 * v for k, v in times_s.items()}}))


if __name__ == "__main__":
    main()
