#!/usr/bin/env python3
"""Checks a `ressa prune` output directory with `transformers` (not run by CI):
it loads as `InstructBlipForConditionalGeneration` / `Blip2ForConditionalGeneration`, every
weight named in `masks.safetensors` is zero exactly where its mask says pruned, the sparsity in
`sparsity.json` matches the weights, and the model generates.

    python scripts/check_pruned_with_transformers.py PRUNED_DIR IMAGE PROMPT
"""
import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from transformers import (
    AutoConfig,
    Blip2ForConditionalGeneration,
    BlipImageProcessor,
    InstructBlipForConditionalGeneration,
)
from tokenizers import Tokenizer


def main():
    d, image, prompt = sys.argv[1], sys.argv[2], sys.argv[3]
    cfg = AutoConfig.from_pretrained(d)
    cls = InstructBlipForConditionalGeneration if cfg.model_type == "instructblip" else Blip2ForConditionalGeneration
    model = cls.from_pretrained(d).eval()
    params = dict(model.named_parameters())
    report = json.load(open(os.path.join(d, "sparsity.json")))
    with safe_open(os.path.join(d, "masks.safetensors"), "np") as f:
        meta = f.metadata()
        for name in f.keys():
            d_in, d_out = json.loads(meta[f"shape.{name}"])
            bits = np.unpackbits(f.get_tensor(name), bitorder="little")[: d_in * d_out]
            keep = torch.from_numpy(bits.reshape(d_in, d_out).T.astype(bool))  # PyTorch [out, in]
            w = params[name].detach()
            assert torch.all(w[~keep] == 0), f"{name}: pruned entries are not zero"
            layer = next(l for l in report["layers"] if l["name"] == name)
            got = float((~keep).sum()) / keep.numel()
            assert abs(got - layer["sparsity"]) < 1e-9, (name, got, layer["sparsity"])
    print(f"{len(report['layers'])} pruned weights verified; towers: {report['towers']}")
    proc = BlipImageProcessor.from_pretrained(d)
    tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    pixel_values = proc(images=[Image.open(image).convert("RGB")], return_tensors="pt")["pixel_values"]
    ids = tok.encode(prompt).ids
    image_ids = [cfg.image_token_index] * cfg.num_query_tokens
    input_ids = torch.tensor([image_ids + ids])
    kwargs = {}
    if cfg.model_type == "instructblip":
        qtok = Tokenizer.from_file(os.path.join(d, "qformer_tokenizer", "tokenizer.json"))
        kwargs["qformer_input_ids"] = torch.tensor([qtok.encode(prompt).ids])
    out = model.generate(pixel_values=pixel_values, input_ids=input_ids, num_beams=3, max_new_tokens=8, **kwargs)
    print("generated:", tok.decode(out[0].tolist(), skip_special_tokens=True))


if __name__ == "__main__":
    main()
