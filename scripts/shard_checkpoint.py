"""Splits a model directory's `model.safetensors` into shards of at most `--max-mb` MB, as
`transformers` writes sharded checkpoints (`model-0000k-of-0000n.safetensors` plus
`model.safetensors.index.json`), keeping every tensor's bytes and dtype. The repository keeps
files under ~2 MB; this is how the committed dense toy models were written from the directories
that `cargo xtask experiment` trains: `configs/models/shapes-paper/dense` from
configs/shapes-paper-scratch.toml's, `configs/models/shapes-paper-llama/dense` from
configs/shapes-paper-llama-scratch.toml's.

    python scripts/shard_checkpoint.py --src DIR --out DIR [--max-mb 1.7]

Copies the other files (config, tokenizers, processor config) unchanged. Needs `safetensors`
and `torch`.
"""

import argparse
import json
import os
import shutil

from safetensors import safe_open
from safetensors.torch import save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-mb", type=float, default=1.7)
    args = ap.parse_args()
    if os.path.exists(args.out):
        raise SystemExit(f"{args.out}: exists; give a new directory")
    src = os.path.join(args.src, "model.safetensors")
    with safe_open(src, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in sorted(f.keys())}
    limit = int(args.max_mb * 1e6)
    shards, size = [[]], 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    tmp = args.out + ".tmp"
    shutil.copytree(args.src, tmp, ignore=shutil.ignore_patterns("model.safetensors", "*.safetensors.index.json"))
    weight_map = {}
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in keys}, os.path.join(tmp, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
        f.write("\n")
    os.rename(tmp, args.out)
    print(f"{args.out}: {len(tensors)} tensors, {total} bytes in {len(shards)} shards")


if __name__ == "__main__":
    main()
