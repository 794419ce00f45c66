#!/usr/bin/env python3
"""PyTorch side of the model benchmarks (`crates/ressa-models/benches/forward.rs`), random
weights, on the CPU (or `--device cuda`), timed like the criterion benches with the same shapes:

- `instructblip_bench_small_forward_b2`, `instructblip_shapes_tiny_forward_b2`: one teacher-forced
  forward of `configs/models/bench-small` / `configs/models/shapes-tiny`, batch 2, 12 Q-Former
  tokens, 24 prompt tokens, 16 decoder tokens;
- `t5_xl_block_encode_l64`: one FlanT5-XL-width encoder block + final norm on [1, 64, 2048];
- `generate_bench_small_b1_16tok`: greedy generation of exactly 16 new tokens, batch 1.

Prints one JSON object: {"torch", "threads", "device", "times_ms": {name: median ms}}.

    python scripts/bench_forward_torch.py [--write-config] [--threads N] [--device cpu|cuda]
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
    T5EncoderModel,
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


def median_ms(f, iters, device, warmup=3):
    for _ in range(warmup):
        f()
    times = []
    for _ in range(iters):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        f()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    times.sort()
    return 1000 * times[len(times) // 2]


def vlm_inputs(cfg, b, device):
    lq, lp = 12, 24
    size = cfg.vision_config.image_size
    nq, image_token = cfg.num_query_tokens, cfg.image_token_index
    return dict(
        pixel_values=torch.randn(b, 3, size, size, device=device),
        qformer_input_ids=torch.randint(4, cfg.qformer_config.vocab_size - 4, (b, lq), device=device),
        input_ids=torch.cat([torch.full((b, nq), image_token, device=device),
                             torch.randint(4, image_token - 4, (b, lp), device=device)], dim=1),
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--write-config", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--device", default="cpu")
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
    dev = args.device
    times = {}
    models = {"bench_small": cfg,
              "shapes_tiny": InstructBlipConfig.from_pretrained(os.path.join(ROOT, "configs", "models", "shapes-tiny"))}
    with torch.no_grad():
        for name, c in models.items():
            model = InstructBlipForConditionalGeneration(c).eval().to(dev)
            inputs = vlm_inputs(c, 2, dev)
            dec = torch.randint(4, c.image_token_index - 4, (2, 16), device=dev)
            times[f"instructblip_{name}_forward_b2"] = median_ms(
                lambda: model(**inputs, decoder_input_ids=dec), args.iters, dev)
            if name == "bench_small":
                one = {k: v[:1] for k, v in inputs.items()}

                def gen():
                    out = model.generate(**one, max_new_tokens=16, min_new_tokens=16, num_beams=1, do_sample=False,
                                         decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
                    assert out.shape[1] == 17, out.shape

                times["generate_bench_small_b1_16tok"] = median_ms(gen, args.iters, dev)
            del model
        with open(os.path.join(ROOT, "configs", "models", "memory-flan-t5-xl-language", "config.json")) as f:
            text = json.load(f)["text_config"]
        text.update(num_layers=1, num_decoder_layers=1, vocab_size=512)
        block = T5EncoderModel(T5Config(**text)).eval().to(dev)
        x = torch.randn(1, 64, 2048, device=dev)
        times["t5_xl_block_encode_l64"] = median_ms(lambda: block(inputs_embeds=x), args.iters, dev)
    print(json.dumps({"torch": torch.__version__, "threads": args.threads, "device": dev, "times_ms": times}))


if __name__ == "__main__":
    main()
