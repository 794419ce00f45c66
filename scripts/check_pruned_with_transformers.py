#!/usr/bin/env python3
"""Checks `ressa prune` / `ressa repair` outputs with `transformers` (not run by CI).

One directory (InstructBLIP, BLIP-2 or LLaVA):

    python scripts/check_pruned_with_transformers.py PRUNED_DIR IMAGE PROMPT

loads it with no missing, unexpected or mismatched key, checks every weight named in
`masks.safetensors` is zero exactly where its mask says pruned (and, for a prune output, the
sparsity in `sparsity.json`), and generates (LLaVA: `<image>` in PROMPT is expanded, or put first).

The committed LLaVA fixture (`tests/fixtures/llava-outputs/`, read by
`crates/ressa-cli/tests/llava.rs`):

    python scripts/check_pruned_with_transformers.py --llava-fixtures target/debug/ressa

runs, for each tiny LLaVA fixture (`llava-gqa`: transformers 5.x layout, float32;
`llava-hub`: the hub layout, float16 shards), `ressa prune --method magnitude --vision 0.5
--language 0.5` and `ressa repair` (4 steps) on the committed calibration captions; then loads
both outputs in transformers and asserts that it reads every stored tensor as stored (its own
re-save equals the files, keys mapped from the hub layout), that every tensor of the source
checkpoint is in the output with its dtype, shape and file, and that the pruned weights are
zero where the masks say. It writes `<fixture>/{pruned,repaired}/` (ressa's output without the
copies of the fixture's test files), `<fixture>/transformers.safetensors` (`logits_pruned`,
`logits_repaired`: transformers' logits on the fixture's reference inputs) and
`<fixture>/transformers.json` (versions, commands, loading info).
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from transformers import (
    AutoConfig,
    Blip2ForConditionalGeneration,
    BlipImageProcessor,
    InstructBlipForConditionalGeneration,
    LlavaForConditionalGeneration,
)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MODELS = os.path.join(ROOT, "tests", "fixtures", "models")
OUT = os.path.join(ROOT, "tests", "fixtures", "llava-outputs")
CALIBRATION = os.path.join(ROOT, "tests", "fixtures", "calibration")
# Copies of the source fixture's test files that ressa carries into its outputs; not model files.
TEST_FILES = ("reference.json", "reference.safetensors", "image0.png", "image1.png", "image2.png")


def model_class(cfg):
    return {
        "instructblip": InstructBlipForConditionalGeneration,
        "blip-2": Blip2ForConditionalGeneration,
        "llava": LlavaForConditionalGeneration,
    }[cfg.model_type]


def stored_tensors(d):
    """Every stored tensor of an HF directory: name -> (file, tensor)."""
    index = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(index):
        files = sorted(set(json.load(open(index))["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for f in files:
        for k, v in load_file(os.path.join(d, f)).items():
            assert k not in out, k
            out[k] = (f, v)
    return out


def load_checked(d):
    """The model as transformers reads `d` (float32), with no missing, unexpected or mismatched
    key, and the loading info."""
    cfg = AutoConfig.from_pretrained(d)
    model, info = model_class(cfg).from_pretrained(d, dtype=torch.float32, output_loading_info=True)
    info = {k: sorted(map(str, v)) for k, v in info.items()}
    assert not any(info.values()), f"{d}: {info}"
    return model.eval(), info


def check_masks(d, stored):
    """Weights named in masks.safetensors are zero exactly where pruned; returns how many."""
    report = None
    if os.path.exists(os.path.join(d, "sparsity.json")):
        report = {l["name"]: l for l in json.load(open(os.path.join(d, "sparsity.json")))["layers"]}
    with safe_open(os.path.join(d, "masks.safetensors"), "np") as f:
        meta = f.metadata()
        names = list(f.keys())
        for name in names:
            d_in, d_out = json.loads(meta[f"shape.{name}"])
            bits = np.unpackbits(f.get_tensor(name), bitorder="little")[: d_in * d_out]
            keep = torch.from_numpy(bits.reshape(d_in, d_out).T.astype(bool))  # PyTorch [out, in]
            w = stored[name][1].float()
            assert torch.all(w[~keep] == 0), f"{name}: pruned entries are not zero"
            if report is not None:
                got = float((~keep).sum()) / keep.numel()
                assert abs(got - report[name]["sparsity"]) < 1e-9, (name, got)
    return len(names)


def reads_every_tensor(model, stored):
    """transformers' own re-save equals the stored tensors (keys compared with the hub's
    `vision_tower.vision_model.` read as `vision_tower.`: 5.25 writes back the layout it read)."""
    norm = lambda k: k.replace("vision_tower.vision_model.", "vision_tower.", 1)
    with tempfile.TemporaryDirectory() as t:
        model.save_pretrained(t)
        saved = {norm(k): v for k, (_, v) in stored_tensors(t).items()}
    mapped = {norm(k): v for k, (_, v) in stored.items()}
    assert sorted(saved) == sorted(mapped), sorted(set(saved) ^ set(mapped))
    for k, v in mapped.items():
        assert torch.equal(saved[k], v.float()), f"{k} not read as stored"


def check_one(d, image, prompt):
    model, info = load_checked(d)
    cfg = model.config
    stored = stored_tensors(d)
    n = check_masks(d, stored)
    print(f"{d}: loads with {info}; {n} pruned weights verified")
    tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    img = Image.open(image).convert("RGB")
    if cfg.model_type == "llava":
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        pixel_values = CLIPImageProcessorPil.from_pretrained(d)(images=[img], return_tensors="pt")["pixel_values"]
        seq = cfg.image_seq_length
        ids = tok.encode(prompt if "<image>" in prompt else "<image> " + prompt).ids
        ids = [t for i in ids for t in ([i] * seq if i == cfg.image_token_index else [i])]
        out = model.generate(pixel_values=pixel_values, input_ids=torch.tensor([ids]), num_beams=3, max_new_tokens=8)
        print("generated:", tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True))
        return
    pixel_values = BlipImageProcessor.from_pretrained(d)(images=[img], return_tensors="pt")["pixel_values"]
    ids = tok.encode(prompt).ids
    input_ids = torch.tensor([[cfg.image_token_index] * cfg.num_query_tokens + ids])
    kwargs = {}
    if cfg.model_type == "instructblip":
        qtok = Tokenizer.from_file(os.path.join(d, "qformer_tokenizer", "tokenizer.json"))
        kwargs["qformer_input_ids"] = torch.tensor([qtok.encode(prompt).ids])
    out = model.generate(pixel_values=pixel_values, input_ids=input_ids, num_beams=3, max_new_tokens=8, **kwargs)
    print("generated:", tok.decode(out[0].tolist(), skip_special_tokens=True))


def llava_fixtures(ressa):
    ressa = os.path.abspath(ressa)
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    cal = os.path.join(CALIBRATION, "captions.json")
    for name in ["llava-gqa", "llava-hub"]:
        src = os.path.join(MODELS, name)
        d = os.path.join(OUT, name)
        os.makedirs(d)
        pruned, repaired = os.path.join(d, "pruned"), os.path.join(d, "repaired")
        commands = {
            "pruned": ["prune", "--model", src, "--method", "magnitude", "--vision", "0.5", "--language", "0.5",
                       "--out", pruned],
            "repaired": ["repair", "--model", pruned, "--dense", src, "--data", cal, "--images", CALIBRATION,
                         "--out", repaired, "--steps", "4", "--batch-size", "2", "--lr", "1e-3"],
        }
        for cmd in commands.values():
            subprocess.run([ressa] + cmd, check=True, env={**os.environ, "RUST_LOG": "warn"})
        shutil.rmtree(repaired + ".checkpoints", ignore_errors=True)
        source = stored_tensors(src)
        ref = load_file(os.path.join(src, "reference.safetensors"))
        logits, record = {}, {}
        for kind, out in [("pruned", pruned), ("repaired", repaired)]:
            for f in TEST_FILES:
                if os.path.exists(os.path.join(out, f)):
                    os.remove(os.path.join(out, f))
            stored = stored_tensors(out)
            # Every source tensor is in the output, in its file, dtype and shape.
            assert sorted(stored) == sorted(source), sorted(set(stored) ^ set(source))
            for k, (f, v) in source.items():
                assert stored[k][0] == f and stored[k][1].dtype == v.dtype and stored[k][1].shape == v.shape, k
            n = check_masks(out, stored)
            model, info = load_checked(out)
            reads_every_tensor(model, stored)
            with torch.no_grad():
                logits[f"logits_{kind}"] = model(
                    pixel_values=ref["pixel_values"], input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]
                ).logits.contiguous()
            record[kind] = {
                "command": ["ressa"] + [os.path.relpath(a, ROOT) if os.path.isabs(a) else a for a in commands[kind]],
                "loading_info": info,
                "tensors": len(stored),
                "pruned_weights_verified": n,
                "dtypes": sorted({str(v.dtype).removeprefix("torch.") for _, v in stored.values()}),
            }
            print(f"{name}/{kind}: {len(stored)} tensors, {n} pruned weights, loads with {info}")
        save_file(logits, os.path.join(d, "transformers.safetensors"))
        with open(os.path.join(d, "transformers.json"), "w") as f:
            json.dump({"transformers": transformers.__version__, "torch": torch.__version__,
                       "source": os.path.relpath(src, ROOT), "outputs": record}, f, indent=2)


def main():
    if sys.argv[1:2] == ["--llava-fixtures"]:
        return llava_fixtures(sys.argv[2])
    check_one(*sys.argv[1:4])


if __name__ == "__main__":
    main()
