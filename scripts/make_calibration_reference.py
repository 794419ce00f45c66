#!/usr/bin/env python3
"""Independent reference for ressa's dense-propagation Wanda calibration.

On tests/fixtures/models/instructblip-t5-a, row 0 of reference.safetensors, ONE dense forward
with forward hooks on every prunable linear (ViT qkv/projection/fc1/fc2; T5 q/k/v/o of self-
and cross-attention, wi_0/wi_1/wo) accumulates Wanda's statistic n_j = sum over tokens of x_j^2
(batch 1, no padding in row 0; the prompt is prefixed with the image tokens transformers
replaces by the projected queries, and the forward is checked against the fixture's logits). Masks at 50 %: per output (floor(d_in/2) per PyTorch row) for
the language model, per matrix (floor(numel/2), PyTorch flat order) for the vision tower; ties
broken by lower index (a stable ascending sort), as ressa's select.rs does.

Writes, per linear `{name}.weight`: the keep mask (u8, PyTorch [d_out, d_in], 1 = kept) and
`{name}.weight.margin` (f64 [d_out]): the relative score gap (first kept - last pruned) /
max(|first kept|, 1e-30) of each output's cut (the matrix's single cut for the vision tower).

dense.safetensors: the model as it is (relative position bias shared by every T5 block).
reference_bias.safetensors: T5 blocks >= 1 of both stacks get `position_bias=None` (a forward
pre-hook), so they attend with the attention mask only, as the reference's catcher replays.
Like ressa (`end_stack`), the decoder still cross-attends to the REAL encoder output: encoder
statistics come from a forward with the encoder's blocks >= 1 bias-less, decoder statistics from
a second forward with only the decoder's blocks >= 1 bias-less.

Run: /root/venv/bin/python scripts/make_calibration_reference.py
"""

from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from safetensors.torch import load_file
from transformers import InstructBlipForConditionalGeneration

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests/fixtures/models/instructblip-t5-a"
OUT = ROOT / "tests/fixtures/calibration_reference"
SPARSITY = 0.5
VISION_SUFFIXES = ("self_attn.qkv", "self_attn.projection", "mlp.fc1", "mlp.fc2")
T5_SUFFIXES = tuple(
    f"{a}.{p}" for a in ("SelfAttention", "EncDecAttention") for p in "qkvo"
) + tuple(f"DenseReluDense.{p}" for p in ("wi", "wi_0", "wi_1", "wo"))


def ressa_name(name: str) -> str:
    """HF module name -> checkpoint / ressa key (drop the `model.` wrapper if any)."""
    return name[len("model."):] if name.startswith("model.") else name


def prunable(model):
    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        key = ressa_name(name)
        if key.startswith("vision_model.encoder.layers.") and key.endswith(VISION_SUFFIXES):
            out[key] = ("vision", mod)
        elif key.startswith("language_model.") and ".block." in key and key.endswith(T5_SUFFIXES):
            out[key] = ("language", mod)
    return out


def t5_blocks(model):
    lm = model.language_model
    # transformers 5 may wrap the T5 in a `.model`; find the stacks either way
    enc = getattr(lm, "encoder", None) or lm.get_encoder()
    dec = getattr(lm, "decoder", None) or lm.get_decoder()
    return enc.block, dec.block


def statistics(model, inputs, linears, bias_less=()):
    """Sum over tokens of x^2 per input channel (f64) of every linear, one forward."""
    stats, handles = {}, []
    for key, (_, mod) in linears.items():
        def hook(m, args, out, key=key):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            stats[key] = stats.get(key, 0) + (x * x).sum(0)
        handles.append(mod.register_forward_hook(hook))

    def no_bias(m, args, kwargs):
        args = list(args)
        if len(args) > 2:
            args[2] = None
        kwargs.pop("position_bias", None)
        return tuple(args), kwargs

    for blocks in bias_less:
        for i, blk in enumerate(blocks):
            if i >= 1:
                handles.append(blk.register_forward_pre_hook(no_bias, with_kwargs=True))
    with torch.no_grad():
        model(**inputs)
    for h in handles:
        h.remove()
    return stats


def masks(linears, stats):
    out = {}
    for key, (tower, mod) in linears.items():
        w = mod.weight.detach().double()  # [d_out, d_in]
        d_out, d_in = w.shape
        s = (w.abs() * stats[key].sqrt()[None, :]).numpy()
        keep = np.ones((d_out, d_in), dtype=np.uint8)
        if tower == "language":
            k = int(d_in * SPARSITY)
            order = np.argsort(s, axis=1, kind="stable")
            ss = np.take_along_axis(s, order, axis=1)
            np.put_along_axis(keep, order[:, :k], 0, axis=1)
            margin = (ss[:, k] - ss[:, k - 1]) / np.maximum(np.abs(ss[:, k]), 1e-30)
        else:
            flat = s.reshape(-1)
            k = int(flat.size * SPARSITY)
            order = np.argsort(flat, kind="stable")
            keep.reshape(-1)[order[:k]] = 0
            gap = (flat[order[k]] - flat[order[k - 1]]) / max(abs(flat[order[k]]), 1e-30)
            margin = np.full(d_out, gap)
        out[f"{key}.weight"] = keep
        out[f"{key}.weight.margin"] = margin.astype(np.float64)
    return out


def main():
    model = InstructBlipForConditionalGeneration.from_pretrained(
        MODEL, attn_implementation="eager"
    ).eval()
    ref = load_file(MODEL / "reference.safetensors")
    keys = [
        "pixel_values",
        "input_ids",
        "attention_mask",
        "qformer_input_ids",
        "qformer_attention_mask",
        "decoder_input_ids",
    ]
    inputs = {k: ref[k][:1] for k in keys}
    assert int(inputs["attention_mask"].min()) == 1, "row 0 is expected unpadded"
    # transformers places the projected queries at image tokens: prepend them to the prompt
    # (ressa's VlmInputs carry the prompt alone, as the fixture's reference does)
    q = model.config.num_query_tokens
    image = torch.full((1, q), model.config.image_token_index, dtype=torch.long)
    inputs["input_ids"] = torch.cat([image, inputs["input_ids"]], dim=1)
    inputs["attention_mask"] = torch.cat([torch.ones_like(image), inputs["attention_mask"]], dim=1)
    with torch.no_grad():
        logits = model(**inputs).logits
    err = (logits - ref["logits"][:1]).abs().max().item()
    assert err < 1e-4, f"the forward does not reproduce the fixture's logits ({err})"
    linears = prunable(model)
    print(f"{len(linears)} prunable linears")
    enc, dec = t5_blocks(model)

    dense = masks(linears, statistics(model, inputs, linears))
    save_file(dense, OUT / "dense.safetensors")

    s_enc = statistics(model, inputs, linears, bias_less=(enc,))
    s_dec = statistics(model, inputs, linears, bias_less=(dec,))
    mixed = {k: (s_dec[k] if ".decoder." in k else s_enc[k]) for k in linears}
    bias = masks(linears, mixed)
    save_file(bias, OUT / "reference_bias.safetensors")

    for name, m in (("dense", dense), ("reference_bias", bias)):
        margins = np.concatenate([v for k, v in m.items() if k.endswith(".margin")])
        print(f"{name}: {len(m) // 2} masks, min relative margin {margins.min():.3e}, "
              f"{(margins < 1e-6).sum()} outputs below 1e-6")
    differ = [k for k in dense if not k.endswith(".margin") and not (dense[k] == bias[k]).all()]
    print(f"{len(differ)} masks differ between the references: {differ}")


if __name__ == "__main__":
    main()
