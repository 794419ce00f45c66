#!/usr/bin/env python3
"""Writes tests/fixtures/bitmask/: a few layers of a `ressa export --format bitmask` checkpoint
and what compressed-tensors' own `BitmaskCompressor` decompresses them to.

compressed-tensors dropped its sparse compressors after 0.13 (0.20.1 has only the
`sparse-bitmask` config class and `ModelCompressor.from_compression_config` rejects a dict), so
this needs compressed-tensors 0.13.0, the release ressa's writer follows:

    /root/venv/bin/pip install --no-deps --target /tmp/ct013 compressed-tensors==0.13.0
    cargo build -p ressa-cli
    target/debug/ressa prune --model tests/fixtures/models/instructblip-t5-a --method magnitude \
        --sparsity 0.5 --out /tmp/rw/pruned
    target/debug/ressa export /tmp/rw/pruned --format bitmask --out /tmp/rw/bm
    PYTHONPATH=/tmp/ct013 /root/venv/bin/python scripts/make_bitmask_fixtures.py /tmp/rw/bm /tmp/rw/pruned

Writes `bitmask.safetensors` (the export's `shape`, `compressed`, `bitmask` and `row_offsets`
tensors of LAYERS, unchanged) and `decompressed.safetensors` (`<module>.weight`, what
`BitmaskCompressor(config).decompress` yields for that file), after checking the decompressed
weights equal the pruned model's dense ones. CI never runs this script.
"""
import json
import os
import sys

import compressed_tensors
import torch
from compressed_tensors.compressors import BaseCompressor, ModelCompressor
from compressed_tensors.config import SparsityCompressionConfig
from safetensors.torch import load_file, save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "bitmask")
LAYERS = [
    # d_in = 37: each output row's last bitmask byte has 3 padding bits.
    "vision_model.encoder.layers.0.mlp.fc2",
    "vision_model.encoder.layers.0.self_attn.qkv",
    "language_model.decoder.block.0.layer.2.DenseReluDense.wo",
]
PARTS = ["shape", "compressed", "bitmask", "row_offsets"]


def main():
    bm, pruned = sys.argv[1], sys.argv[2]
    cfg = json.load(open(os.path.join(bm, "config.json")))["quantization_config"]
    sc = SparsityCompressionConfig.load_from_registry(cfg["sparsity_config"]["format"],
                                                      **cfg["sparsity_config"])
    compressor = BaseCompressor.load_from_registry(sc.format, config=sc)
    print("compressed-tensors", compressed_tensors.__version__, type(compressor).__name__)

    exported = load_file(os.path.join(bm, "model.safetensors"))
    subset = {f"{m}.{p}": exported[f"{m}.{p}"].contiguous() for m in LAYERS for p in PARTS}
    os.makedirs(OUT, exist_ok=True)
    subset_path = os.path.join(OUT, "bitmask.safetensors")
    save_file(subset, subset_path, metadata={"format": "pt"})

    out = {k: v.contiguous() for k, v in compressor.decompress(subset_path)}
    assert sorted(out) == sorted(f"{m}.weight" for m in LAYERS), sorted(out)
    dense = load_file(os.path.join(pruned, "model.safetensors"))
    for k, v in out.items():
        assert torch.equal(v, dense[k]), k
        print(k, tuple(v.shape), v.dtype, "zeros", int((v == 0).sum()), "of", v.numel())
    save_file(out, os.path.join(OUT, "decompressed.safetensors"),
              metadata={"compressed_tensors": compressed_tensors.__version__,
                        "torch": torch.__version__})
    # The whole export decompresses too (ModelCompressor path, as scripts/check_bitmask_export.py).
    mc = ModelCompressor.from_compression_config(cfg)
    n = sum(1 for _ in mc.sparsity_compressor.decompress(os.path.join(bm, "model.safetensors")))
    print("ModelCompressor decompressed", n, "tensors of the full export")


if __name__ == "__main__":
    main()
