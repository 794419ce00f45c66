#!/usr/bin/env python3
"""Reference fixtures for the `ressa-prune` crate.

PyTorch re-implementations, in float64, of the pruning criteria described in the RESSA
reference notes (section 7): magnitude (with abs), Wanda (`lib/prune.py` + `layerwrapper.py`
statistics), SparseGPT (`sparsegpt.py`) and DSnoT (`lib/prune.py`), run on a few small random
layers. Inputs and expected masks / reconstructed weights are written as safetensors under
`tests/fixtures/pruners/`; the Rust tests in `crates/ressa-prune/tests/` read only those files.

Orientation: the files use PyTorch's layout, `weight` is `[d_out, d_in]` and masks are
`[d_out, d_in]` (1 = keep). Activation batches are `[tokens, d_in]`; a batch with metadata
`x.<b>.samples = s` holds `s` samples whose tokens are flattened (the reference reshapes
`[s, L, d]` to `[s*L, d]` and counts `s` samples in its running means).

Tie-breaking (shared with the Rust crate): scores are sorted ascending with a stable sort and
pruned from the front, so among equal scores the lower index is pruned first. The index is the
input index inside one output row, or the PyTorch flat index (row-major over `[d_out, d_in]`)
for selections over a whole matrix / SparseGPT block.

DSnoT: `dsnot()` implements the candidate lists the Rust crate uses (regrowth candidates are
the initially pruned inputs only; zero-`D` kept entries sit between the negative and positive
ones). `dsnot_literal()` reproduces the reference's own lists and scatter writes (all inputs in
the regrowth order with kept ones keyed 0, the reorder quirk that maps zero-`D` entries to
`P[0]`, writes on inactive rows, out-of-range pointers); the generator records per case whether
the two agree (`dsnot_literal_agrees` in the case metadata) and, unless the literal code indexes
out of range, stores the literal mask (`literal_mask.<case>`, `[d_out, d_in]` u8) and the
outputs (PyTorch rows) where its prune count differs from the requested one
(`literal_broken_outputs.<case>`, int64 row indices, possibly empty).

Usage: python scripts/make_pruner_fixtures.py [--out tests/fixtures/pruners]
"""

import argparse
import json
import math
import os

import torch
from safetensors.torch import save_file

torch.set_default_dtype(torch.float64)

# ----------------------------------------------------------------------------- statistics


def wanda_dsnot_stats(batches):
    """Streaming statistics of the reference's WrappedGPT (DSnoT variant, which includes Wanda's).

    batches: list of (x [T, d] float64, n_samples).
    Returns scaler_row (n_j), sum_metric_row (mu_j), var (v_j).
    """
    d = batches[0][0].shape[1]
    scaler = torch.zeros(d)
    sum_metric = torch.zeros(d)
    var = torch.zeros(d)
    nsamples = 0
    ntokens = 0
    for x, b in batches:
        inp = x.t()  # [d, T]
        var_inp = torch.var(inp, dim=1, unbiased=False)
        num = inp.shape[1]
        var = var_inp if ntokens == 0 else (var * ntokens + var_inp * num) / (ntokens + num)
        ntokens += num
        scaler *= nsamples / (nsamples + b)
        sum_metric *= nsamples / (nsamples + b)
        nsamples += b
        scaler += torch.norm(inp, p=2, dim=1) ** 2 / nsamples
        sum_metric += torch.sum(inp, dim=1) / nsamples
    return scaler, sum_metric, var


def hessian(batches):
    """SparseGPT's streaming Hessian: H <- H*k/(k+b); k += b; H += (2/k) X^T X."""
    d = batches[0][0].shape[1]
    H = torch.zeros(d, d)
    n = 0
    for x, b in batches:
        H *= n / (n + b)
        n += b
        inp = math.sqrt(2 / n) * x.t()
        H += inp @ inp.t()
    return H


# ----------------------------------------------------------------------------- selection


def prune_rows_k_smallest(S, k):
    """Prune flags (True = prune) of the k smallest per row, stable."""
    mask = torch.zeros_like(S, dtype=torch.bool)
    if k > 0:
        idx = torch.sort(S, dim=1, stable=True)[1][:, :k]
        mask.scatter_(1, idx, True)
    return mask


def prune_n_m(S, n, m):
    mask = torch.zeros_like(S, dtype=torch.bool)
    for g in range(0, S.shape[1], m):
        idx = torch.sort(S[:, g : g + m], dim=1, stable=True)[1][:, :n] + g
        mask.scatter_(1, idx, True)
    return mask


def prune_matrix(S, k, rule):
    """Selection over a whole matrix (PyTorch layout, flat row-major order)."""
    flat = S.reshape(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    if rule == "exact":
        if k > 0:
            mask[torch.sort(flat, stable=True)[1][:k]] = True
    else:
        thr = torch.sort(flat)[0][min(k, flat.numel() - 1)]
        mask = flat < thr if rule == "lt" else flat <= thr
    return mask.reshape(S.shape)


def select(S, pattern, sparsity, group, rule):
    if pattern != "unstructured":
        n, m = map(int, pattern.split(":"))
        return prune_n_m(S, n, m)
    if group == "output":
        return prune_rows_k_smallest(S, int(S.shape[1] * sparsity))
    return prune_matrix(S, int(S.numel() * sparsity), rule)


# ----------------------------------------------------------------------------- criteria


def magnitude(W, pattern, sparsity, group="matrix", rule="exact"):
    return ~select(torch.abs(W), pattern, sparsity, group, rule)


def wanda(W, scaler, pattern, sparsity, group="output", rule="exact"):
    S = torch.abs(W) * torch.sqrt(scaler.reshape(1, -1))
    return ~select(S, pattern, sparsity, group, rule)


def sparsegpt(W, H, pattern, sparsity, blocksize=128, percdamp=0.01, rule="exact"):
    """SparseGPT fasterprune; returns (keep mask, reconstructed W)."""
    W = W.clone()
    H = H.clone()
    rows, cols = W.shape
    prune_n, prune_m = (0, 0) if pattern == "unstructured" else map(int, pattern.split(":"))
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    H[range(cols), range(cols)] += damp
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    Hinv = torch.linalg.cholesky(Hinv, upper=True)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prune_n == 0:
            tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            mask1 = prune_matrix(tmp, int(tmp.numel() * sparsity), rule)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prune_n != 0 and i % prune_m == 0:
                tmp = W1[:, i : i + prune_m] ** 2 / (torch.diag(Hinv1)[i : i + prune_m].reshape((1, -1))) ** 2
                idx = torch.sort(tmp, dim=1, stable=True)[1][:, :prune_n]
                mask1.scatter_(1, i + idx, True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return ~pruned, W


def _sign(x):
    return (x > 0) - (x < 0)


def _nan_last_key(v):
    return (1, 0.0) if math.isnan(v) else (0, v)


def dsnot_initial(W, scaler, pattern, sparsity, initial, rounding):
    wanda_metric = torch.abs(W) * torch.sqrt(scaler.reshape(1, -1))
    init = wanda_metric if initial == "wanda" else torch.abs(W)
    if pattern == "unstructured":
        c = W.shape[1]
        k = round(c * sparsity) if rounding == "round" else int(c * sparsity)
        return init, wanda_metric, prune_rows_k_smallest(init, k)
    n, m = map(int, pattern.split(":"))
    return init, wanda_metric, prune_n_m(init, n, m)


def dsnot(W, scaler, mu, var, pattern, sparsity, initial="wanda", max_cycle=100, thr=0.1, p=1.0,
          same_sign=False, rounding="round"):
    """DSnoT with the Rust crate's candidate lists. Returns the keep mask."""
    init, wanda_metric, prune = dsnot_initial(W, scaler, pattern, sparsity, initial, rounding)
    D = W * mu.reshape(1, -1)
    keyv = D / var.reshape(1, -1) ** p if p != 0 else D
    rows, c = W.shape
    prune = prune.clone()
    for r in range(rows):
        Dr = D[r].tolist()
        pr = prune[r].tolist()
        e = sum(Dr[i] for i in range(c) if pr[i])
        sign0 = _sign(e)
        R = sorted([i for i in range(c) if pr[i]], key=lambda i: (_nan_last_key(keyv[r, i].item()), i))
        lo, hi = 0, len(R) - 1
        if pattern == "unstructured":
            kept = sorted([i for i in range(c) if not pr[i]], key=lambda i: (wanda_metric[r, i].item(), i))
            P = [i for i in kept if Dr[i] < 0] + [i for i in kept if Dr[i] == 0] + [i for i in reversed(kept) if Dr[i] > 0]
            head, tail = 0, len(P) - 1
            for _ in range(max_cycle):
                if lo > hi or head > tail:
                    break
                if e > 0:
                    g = R[hi]
                    hi -= 1
                else:
                    g = R[lo]
                    lo += 1
                if e < 0:
                    q = P[tail]
                    tail -= 1
                else:
                    q = P[head]
                    head += 1
                after = e + Dr[q] - Dr[g]
                if not (abs(e) > thr and (not same_sign or _sign(after) == sign0)):
                    break
                pr[q] = True
                pr[g] = False
                e = after
        else:
            m = int(pattern.split(":")[1])
            im = [math.inf if pr[i] else init[r, i].item() for i in range(c)]
            for _ in range(max_cycle):
                if lo > hi:
                    break
                if e > 0:
                    g = R[hi]
                    hi -= 1
                else:
                    g = R[lo]
                    lo += 1
                g0 = g - g % m
                q = min(range(g0, g0 + m), key=lambda i: (im[i], i))
                if im[q] == math.inf:
                    break
                after = e + Dr[q] - Dr[g]
                if not (_sign(after) == sign0 and abs(e) > thr):
                    break
                pr[q] = True
                pr[g] = False
                im[q] = math.inf
                e = after
        prune[r] = torch.tensor(pr)
    return ~prune


class LiteralOutOfRange(Exception):
    pass


def dsnot_literal(W, scaler, mu, var, pattern, sparsity, initial="wanda", max_cycle=100, thr=0.1, p=1.0,
                  same_sign=False, rounding="round"):
    """DSnoT with the reference's own candidate lists, global loop and scatter writes."""
    init, wanda_metric, prune = dsnot_initial(W, scaler, pattern, sparsity, initial, rounding)
    D = W * mu.reshape(1, -1)
    rows, c = W.shape
    prune = prune.clone()
    regrow_metric = D.clone()
    regrow_metric[~prune] = 0
    if p:
        regrow_metric = regrow_metric / var.reshape(1, -1) ** p
    R = torch.sort(regrow_metric, dim=1, stable=True)[1].tolist()
    e = [sum(D[r, i].item() for i in range(c) if prune[r, i]) for r in range(rows)]
    sign0 = [_sign(v) for v in e]
    lo = [0] * rows
    hi = [c - 1] * rows
    active = [True] * rows
    pm = prune.tolist()
    Dl = D.tolist()

    def take(lst, idx):
        if idx < 0 or idx >= len(lst):
            raise LiteralOutOfRange()
        return lst[idx]

    if pattern == "unstructured":
        Ps = []
        for r in range(rows):
            kept = sorted([i for i in range(c) if not pm[r][i]], key=lambda i: (wanda_metric[r, i].item(), i))
            vals = [Dl[r][i] for i in kept]
            npos = sum(v > 0 for v in vals)
            nneg = sum(v < 0 for v in vals)
            pv = [0] * (len(kept) - npos) + sorted([t for t, v in enumerate(vals) if v > 0], reverse=True)
            nv = sorted([t for t, v in enumerate(vals) if v < 0]) + [0] * (len(kept) - nneg)
            Ps.append([kept[a + b] for a, b in zip(pv, nv)])
        head = [0] * rows
        tail = [len(P) - 1 for P in Ps]
        cycle = 0
        while any(active) and cycle < max_cycle:
            cycle += 1
            for r in range(rows):
                if e[r] > 0:
                    g = take(R[r], hi[r])
                    hi[r] -= 1
                else:
                    g = take(R[r], lo[r])
                    lo[r] += 1
                if e[r] < 0:
                    q = take(Ps[r], tail[r])
                    tail[r] -= 1
                else:
                    q = take(Ps[r], head[r])
                    head[r] += 1
                after = e[r] + Dl[r][q] - Dl[r][g]
                active[r] = active[r] and abs(e[r]) > thr and (not same_sign or _sign(after) == sign0[r])
                pm[r][q] = active[r]
                pm[r][g] = not active[r]
                if active[r]:
                    e[r] = e[r] + Dl[r][q] - Dl[r][g]
    else:
        m = int(pattern.split(":")[1])
        im = init.clone()
        im[prune] = math.inf
        maxv = (im.max(dim=1)[0] + 1).tolist()
        im = im.tolist()
        cycle = 1
        while any(active) and cycle <= max_cycle:
            cycle += 1
            for r in range(rows):
                from_hi = e[r] > 0
                g = take(R[r], hi[r] if from_hi else lo[r])
                g0 = g - g % m
                q = min(range(g0, g0 + m), key=lambda i: (im[r][i], i))
                after = e[r] + Dl[r][q] - Dl[r][g]
                active[r] = active[r] and sign0[r] == _sign(after) and abs(e[r]) > thr
                im[r][q] = maxv[r]
                pm[r][q] = active[r]
                pm[r][g] = not active[r]
                if active[r]:
                    e[r] = e[r] + Dl[r][q] - Dl[r][g]
                # the pointer used this cycle advances (chosen from the error before the swap)
                if from_hi:
                    hi[r] -= 1
                else:
                    lo[r] += 1
    return ~torch.tensor(pm)


def owl_allocation(blocks, m, lmbda, target):
    """llm-compressor's _infer_owl_layer_sparsity on (W, act_norm) pairs per block."""
    ratios = []
    for layers in blocks:
        z = torch.cat([(torch.abs(W) * a.reshape(1, -1)).flatten() for W, a in layers])
        thr = torch.mean(z) * m
        ratios.append(100 * (z > thr).sum().item() / z.numel())
    r = torch.tensor(ratios)
    if r.max() > r.min():
        rn = (r - r.min()) * (1 / (r.max() - r.min()) * lmbda * 2)
    else:
        rn = torch.zeros_like(r)
    return r, 1 - (rn - torch.mean(rn) + (1 - target))


# ----------------------------------------------------------------------------- fixtures

LAYERS = [
    # name, d_in, d_out, batches [(samples, tokens per sample)], dead inputs, SparseGPT block size
    dict(name="a", d_in=64, d_out=40, batches=[(1, 48), (1, 40), (1, 56)], dead=[], block=128, seed=11),
    dict(name="b", d_in=96, d_out=56, batches=[(1, 40), (2, 24), (1, 36), (1, 20)], dead=[5, 17, 90], block=32, seed=12),
    dict(name="c", d_in=64, d_out=56, batches=[(1, 20), (1, 24)], dead=[0, 33], block=16, seed=13),
    dict(name="d", d_in=96, d_out=40, batches=[(1, 64), (1, 56)], dead=[], block=128, seed=14),
]


def make_layer(spec):
    g = torch.Generator().manual_seed(spec["seed"])
    d_in, d_out = spec["d_in"], spec["d_out"]
    W = (torch.randn(d_out, d_in, generator=g) * 0.1).float()
    mix = torch.randn(d_in, d_in, generator=g) / math.sqrt(d_in)
    scale = torch.exp(torch.randn(d_in, generator=g) * 0.5)
    offset = torch.randn(d_in, generator=g) * 0.05
    xs = []
    for samples, tokens in spec["batches"]:
        z = torch.randn(samples * tokens, d_in, generator=g)
        x = (z @ mix) * scale * 0.2 + offset
        x[:, spec["dead"]] = 0
        xs.append((x.float(), samples))
    return W, xs


def cases():
    out = []
    for s in (0.5, 0.7):
        t = int(s * 100)
        out.append(dict(name=f"mag_u{t}", method="magnitude", pattern="unstructured", sparsity=s, group="matrix", rule="exact"))
    out.append(dict(name="mag_u50_row", method="magnitude", pattern="unstructured", sparsity=0.5, group="output", rule="exact"))
    out.append(dict(name="mag_u50_le", method="magnitude", pattern="unstructured", sparsity=0.5, group="matrix", rule="le"))
    for nm in ("2:4", "4:8"):
        out.append(dict(name=f"mag_{nm.replace(':', 'of')}", method="magnitude", pattern=nm, sparsity=0.5, group="matrix", rule="exact"))
    for s in (0.5, 0.7):
        t = int(s * 100)
        out.append(dict(name=f"wanda_u{t}", method="wanda", pattern="unstructured", sparsity=s, group="output", rule="exact"))
    out.append(dict(name="wanda_u50_mat", method="wanda", pattern="unstructured", sparsity=0.5, group="matrix", rule="exact"))
    out.append(dict(name="wanda_u70_mat_lt", method="wanda", pattern="unstructured", sparsity=0.7, group="matrix", rule="lt"))
    for nm in ("2:4", "4:8"):
        out.append(dict(name=f"wanda_{nm.replace(':', 'of')}", method="wanda", pattern=nm, sparsity=0.5, group="output", rule="exact"))
    for s in (0.5, 0.7):
        t = int(s * 100)
        out.append(dict(name=f"sgpt_u{t}", method="sparsegpt", pattern="unstructured", sparsity=s, rule="exact"))
    out.append(dict(name="sgpt_u50_le", method="sparsegpt", pattern="unstructured", sparsity=0.5, rule="le"))
    for nm in ("2:4", "4:8"):
        out.append(dict(name=f"sgpt_{nm.replace(':', 'of')}", method="sparsegpt", pattern=nm, sparsity=0.5, rule="exact"))
    base = dict(method="dsnot", initial="wanda", max_cycle=100, thr=0.1, p=1.0, same_sign=False, rounding="round")
    out.append(dict(base, name="dsnot_u50", pattern="unstructured", sparsity=0.5))
    out.append(dict(base, name="dsnot_u70", pattern="unstructured", sparsity=0.7))
    out.append(dict(base, name="dsnot_mag_u50", pattern="unstructured", sparsity=0.5, initial="magnitude"))
    out.append(dict(base, name="dsnot_u50_samesign", pattern="unstructured", sparsity=0.5, same_sign=True))
    out.append(dict(base, name="dsnot_u70_upstream", pattern="unstructured", sparsity=0.7, rounding="floor", max_cycle=50))
    out.append(dict(base, name="dsnot_u50_c8", pattern="unstructured", sparsity=0.5, max_cycle=8))
    for nm in ("2:4", "4:8"):
        out.append(dict(base, name=f"dsnot_{nm.replace(':', 'of')}", pattern=nm, sparsity=0.5))
    return out


def requested_prune_count(d_in, case):
    """Prune count per output that the case asks for (the crate's and `dsnot()`'s count)."""
    if case["pattern"] == "unstructured":
        x = d_in * case["sparsity"]
        return round(x) if case["rounding"] == "round" else int(x)
    n, m = map(int, case["pattern"].split(":"))
    return d_in // m * n


def literal_broken_outputs(lit, d_in, case):
    """Outputs (PyTorch rows) where the literal reference's prune count differs from the request."""
    counts = (~lit).sum(dim=1)
    return torch.nonzero(counts != requested_prune_count(d_in, case)).reshape(-1).to(torch.int64)


def run_case(case, W, stats, H, block):
    scaler, mu, var = stats
    if case["method"] == "magnitude":
        return magnitude(W, case["pattern"], case["sparsity"], case["group"], case["rule"]), None
    if case["method"] == "wanda":
        return wanda(W, scaler, case["pattern"], case["sparsity"], case["group"], case["rule"]), None
    if case["method"] == "sparsegpt":
        case["block_size"] = block
        return sparsegpt(W, H, case["pattern"], case["sparsity"], blocksize=block, rule=case["rule"])
    kw = dict(initial=case["initial"], max_cycle=case["max_cycle"], thr=case["thr"], p=case["p"],
              same_sign=case["same_sign"], rounding=case["rounding"])
    keep = dsnot(W, scaler, mu, var, case["pattern"], case["sparsity"], **kw)
    case.pop("_literal", None)
    try:
        lit = dsnot_literal(W, scaler, mu, var, case["pattern"], case["sparsity"], **kw)
        case["_literal"] = (lit, literal_broken_outputs(lit, W.shape[1], case))
        case["dsnot_literal_agrees"] = bool(torch.equal(lit, keep))
        # rows where the literal lists give another mask, and how many of those rows end with
        # a different prune count (i.e. the reference breaks its own sparsity / N:M there)
        differ = (lit != keep).any(dim=1)
        broken = differ & ((~lit).sum(dim=1) != (~keep).sum(dim=1))
        case["dsnot_literal_rows_differ"] = int(differ.sum())
        case["dsnot_literal_rows_count_changed"] = int(broken.sum())
    except LiteralOutOfRange:
        case["dsnot_literal_agrees"] = None  # the reference would index out of range
    return keep, None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "pruners"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    owl_inputs = {}
    for spec in LAYERS:
        W32, xs = make_layer(spec)
        W = W32.double()
        batches = [(x.double(), s) for x, s in xs]
        stats = wanda_dsnot_stats(batches)
        H = hessian(batches)
        owl_inputs[spec["name"]] = (W, torch.sqrt(stats[0]))
        tensors = {"weight": W32.contiguous()}
        meta = {"d_in": str(spec["d_in"]), "d_out": str(spec["d_out"]), "n_batches": str(len(xs))}
        for b, (x, s) in enumerate(xs):
            tensors[f"x.{b}"] = x.contiguous()
            meta[f"x.{b}.samples"] = str(s)
        tensors["stats.scaler_row"] = stats[0]
        tensors["stats.sum_metric_row"] = stats[1]
        tensors["stats.var"] = stats[2]
        tensors["hessian"] = H.float().contiguous()
        done = []
        for case in cases():
            keep, Wn = run_case(case, W, stats, H, spec["block"])
            tensors[f"mask.{case['name']}"] = keep.to(torch.uint8).contiguous()
            literal = case.pop("_literal", None)
            if literal is not None:
                # the reference's literal DSnoT lists: its mask and the outputs where its prune
                # count differs from the requested one (absent when it indexes out of range)
                tensors[f"literal_mask.{case['name']}"] = literal[0].to(torch.uint8).contiguous()
                tensors[f"literal_broken_outputs.{case['name']}"] = literal[1].contiguous()
            if Wn is not None:
                tensors[f"weight.{case['name']}"] = Wn.float().contiguous()
            done.append(case)
        meta["cases"] = json.dumps(done)
        path = os.path.join(args.out, f"layer_{spec['name']}.safetensors")
        save_file(tensors, path, metadata=meta)
        agree = [c["name"] for c in done if c.get("dsnot_literal_agrees") is True]
        differ = [c["name"] for c in done if c.get("dsnot_literal_agrees") is False]
        oor = [c["name"] for c in done if "dsnot_literal_agrees" in c and c["dsnot_literal_agrees"] is None]
        print(f"{path}: {len(done)} cases; DSnoT literal agrees {agree}, differs {differ}, out of range {oor}")
        for c in done:
            if c.get("dsnot_literal_agrees") is False:
                print(f"  {c['name']}: {c['dsnot_literal_rows_differ']} rows differ, "
                      f"{c['dsnot_literal_rows_count_changed']} of them with a changed prune count in the literal run")

    # OWL: blocks [a, b], [c], [d]
    groups = [["a", "b"], ["c"], ["d"]]
    blocks = [[owl_inputs[n] for n in grp] for grp in groups]
    tensors = {}
    for target in (0.5, 0.7):
        r, s = owl_allocation(blocks, m=3.0, lmbda=0.08, target=target)
        tensors["ratios"] = r
        tensors[f"sparsity_{int(target * 100)}"] = s
    path = os.path.join(args.out, "owl.safetensors")
    save_file(tensors, path, metadata={"blocks": json.dumps(groups), "m": "3.0", "lambda": "0.08",
                                       "norms": "sqrt(stats.scaler_row)"})
    print(f"{path}: ratios {tensors['ratios'].tolist()}")
    total = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"total fixture size {total} bytes")


if __name__ == "__main__":
    main()
