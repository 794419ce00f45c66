#!/usr/bin/env python3
"""PyTorch side of the forward benchmark: the `configs/models/bench-small` InstructBLIP-T5 with
random weights, one teacher-forced forward (batch 2, 24 prompt tokens, 16 decoder tokens) on the
CPU, timed like the criterion bench `crates/ressa-models/benches/forward.rs`.

    python scripts/bench_forward_torch.py [--write-config] [--threads N]
"""
import argparse
import json
import os
import time

import torch
from transformers import (
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
    T5Config,
)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DIR = os.path.join(ROOT, "configs", "models", "bench-small")


def config():
    vision = InstructBlipVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                                      num_attention_heads=6, image_size=112, patch_size=14)
    qformer = InstructBlipQFormerConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                        intermediate_size=1024, cross_attention_frequency=2, encoder_hidden_size=384,
                                        max_position_embeddings=128)
    text = T5Config(vocab_size=2000, d_model=512, d_kv=64, num_heads=8, d_ff=1280, num_layers=4, num_decoder_layers=4,
                    feed_forward_proj="gated-gelu", dense_act_fn="gelu", tie_word_embeddings=False)
    return InstructBlipConfig(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                              text_config=text.to_dict(), num_query_tokens=32, image_token_index=1999)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--write-config", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    cfg = config()
    if args.write_config:
        os.makedirs(DIR, exist_ok=True)
        cfg.save_pretrained(DIR)
        path = os.path.join(DIR, "config.json")
        with open(path) as f:
            c = json.load(f)
        c["text_config"]["tie_word_embeddings"] = False
        with open(path, "w") as f:
            json.dump(c, f, indent=2, sort_keys=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = InstructBlipForConditionalGeneration(cfg).eval()
    b, lq, lp, ld = 2, 12, 24, 16
    pixel_values = torch.randn(b, 3, 112, 112)
    qids = torch.randint(4, 1000, (b, lq))
    ids = torch.cat([torch.full((b, 32), 1999), torch.randint(4, 1990, (b, lp))], dim=1)
    dec = torch.randint(4, 1990, (b, ld))
    with torch.no_grad():
        for _ in range(3):
            model(pixel_values=pixel_values, qformer_input_ids=qids, input_ids=ids, decoder_input_ids=dec)
        times = []
        for _ in range(args.iters):
            t = time.perf_counter()
            model(pixel_values=pixel_values, qformer_input_ids=qids, input_ids=ids, decoder_input_ids=dec)
            times.append(time.perf_counter() - t)
    times.sort()
    print(json.dumps({"torch": torch.__version__, "threads": args.threads, "median_ms": 1000 * times[len(times) // 2],
                      "min_ms": 1000 * times[0]}))


if __name__ == "__main__":
    main()
