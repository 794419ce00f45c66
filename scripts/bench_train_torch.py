#!/usr/bin/env python3
"""PyTorch side of the RESSA step benchmark (`crates/ressa-train/benches/train_step.rs`): the
`configs/models/bench-small` InstructBLIP-T5 with random weights, SparseLoRA on every vision and
language linear (50 % unstructured masks, W_eff = (W + s·A·B) ⊙ M materialised per step, as the
reference does), plain LoRA on the Q-Former, all base weights frozen. One step = student forward,
teacher forward on the dense path under no_grad, (1 − λ)·CE + λ·KL, backward, AdamW.

Prints one JSON object: {"torch", "threads", "device", "times_ms": {"ressa_step_bench_small_b2": median ms}}.

    python scripts/bench_train_torch.py [--threads N] [--device cpu|cuda]
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F
from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

from bench_forward_torch import config


class SparseLora(torch.nn.Module):
    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float, mask):
        super().__init__()
        self.base = base
        self.lora_A = torch.nn.Parameter(torch.empty(rank, base.in_features).uniform_(-1, 1) / base.in_features ** 0.5)
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale = alpha / rank
        self.register_buffer("mask", mask)
        self.dense = False

    @property
    def weight(self):  # read by transformers (e.g. T5's dtype checks)
        return self.base.weight

    def forward(self, x):
        if self.dense:
            return F.linear(x, self.base.weight, self.base.bias)
        w = self.base.weight + self.scale * (self.lora_B @ self.lora_A)
        if self.mask is not None:
            w = w * self.mask
        return F.linear(x, w, self.base.bias)


def wrap(model):
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, torch.nn.Linear):
                continue
            full = f"{name}.{child_name}" if name else child_name
            if full.startswith("vision_model.encoder.layers."):
                rank, masked = 4, True
            elif full.startswith("language_model.encoder.block.") or full.startswith("language_model.decoder.block."):
                rank, masked = 8, True
            elif full.startswith("qformer.encoder.layer."):
                rank, masked = 2, False
            else:
                continue
            mask = None
            if masked:
                o, i = child.weight.shape
                mask = ((torch.arange(i)[None, :] * 31 + torch.arange(o)[:, None] * 17) % 2 == 0).float()
            lora = SparseLora(child, rank, 16.0, mask)
            setattr(module, child_name, lora)
            wrapped.append(lora)
    return wrapped


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    dev = args.device
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = InstructBlipForConditionalGeneration(config())
    for p in model.parameters():
        p.requires_grad_(False)
    loras = wrap(model)
    model.to(dev)
    params = [p for l in loras for p in (l.lora_A, l.lora_B)]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    b, lq, lp, ld = 2, 12, 24, 16
    pixel_values = torch.randn(b, 3, 112, 112, device=dev)
    qids = torch.randint(4, 1000, (b, lq), device=dev)
    ids = torch.cat([torch.full((b, 32), 1999, device=dev), torch.randint(4, 1990, (b, lp), device=dev)], dim=1)
    dec = torch.randint(4, 1990, (b, ld), device=dev)
    targets = torch.randint(4, 1990, (b, ld), device=dev)
    lam = 0.1

    def step():
        for l in loras:
            l.dense = True
        with torch.no_grad():
            t = model(pixel_values=pixel_values, qformer_input_ids=qids, input_ids=ids, decoder_input_ids=dec).logits
        for l in loras:
            l.dense = False
        s = model(pixel_values=pixel_values, qformer_input_ids=qids, input_ids=ids, decoder_input_ids=dec).logits
        ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), targets.reshape(-1))
        kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="batchmean", log_target=True)
        loss = (1 - lam) * ce + lam * kl
        opt.zero_grad()
        loss.backward()
        opt.step()

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    model.train()
    for _ in range(3):
        step()
    times = []
    for _ in range(args.iters):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    out = {"ressa_step_bench_small_b2": 1000 * times[len(times) // 2]}
    out["pretrain_step_shapes_tiny_b32"] = pretrain_step_ms(args.iters, dev)
    print(json.dumps({"torch": torch.__version__, "threads": args.threads, "device": dev,
                      "times_ms": out}))


def pretrain_step_ms(iters, dev):
    """The toy world's dense training step (`pretrain_step_shapes_tiny_b32` in train_step.rs):
    `configs/models/shapes-tiny` from scratch, every parameter trainable, batch 32, 12 Q-Former
    tokens, 16 prompt tokens, 8 targets; forward, token-mean CE, backward, AdamW."""
    import os
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "models", "shapes-tiny")
    cfg = InstructBlipConfig.from_pretrained(root)
    torch.manual_seed(0)
    model = InstructBlipForConditionalGeneration(cfg).to(dev)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    b, lq, lp, ld = 32, 12, 16, 8
    vocab = cfg.image_token_index
    size = cfg.vision_config.image_size
    q = cfg.num_query_tokens
    pixel_values = torch.randn(b, 3, size, size, device=dev)
    qids = torch.randint(4, cfg.qformer_config.vocab_size - 8, (b, lq), device=dev)
    ids = torch.cat([torch.full((b, q), cfg.image_token_index, device=dev),
                     torch.randint(4, vocab - 8, (b, lp), device=dev)], dim=1)
    labels = torch.randint(4, vocab - 8, (b, ld), device=dev)

    def step():
        out = model(pixel_values=pixel_values, qformer_input_ids=qids, input_ids=ids, labels=labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()

    for _ in range(3):
        step()
    times = []
    for _ in range(iters):
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if dev == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1000 * times[len(times) // 2]


if __name__ == "__main__":
    main()
