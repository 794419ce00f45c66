#!/usr/bin/env python3
"""Writes tests/fixtures/resize/: PIL bicubic references for upscaling and non-integer ratios.

    /root/venv/bin/pip install transformers pillow numpy safetensors torch
    python3 scripts/make_resize_fixtures.py

For each case, `src<i>.png` (a deterministic RGB picture: full-range noise plus flat blocks, so
bicubic overshoot is clipped at 0 and 255) and, in `resize.safetensors`:
- `pil<i>`: U8 [H, W, 3], `Image.resize((W, H), Image.BICUBIC)` — the resize
  `BlipImageProcessor` does (resample=3);
- `pixel_values<i>`: F32 [3, H, W], `transformers`' PIL-backend `BlipImageProcessorPil` with
  `size={"height": H, "width": W}`, default rescale 1/255 and CLIP mean/std normalisation.
`cases.json` lists the sizes and the versions used. (In transformers 5 the default
`BlipImageProcessor` resizes with torchvision when that is installed; ressa follows the PIL
backend, which is what this script pins.) CI never runs this script.
"""
import json
import os

import numpy as np
import PIL
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "resize")
# (in_w, in_h, out_w, out_h)
CASES = [
    (20, 13, 32, 32),  # upscale, non-integer ratios 1.6 and 2.46
    (7, 11, 48, 48),  # upscale by 6.86 and 4.36
    (50, 37, 32, 32),  # downscale by non-integer 1.5625 and 1.156
    (16, 16, 48, 48),  # upscale by exactly 3
    (45, 10, 32, 32),  # one axis down (1.41), the other up (3.2)
    (13, 9, 40, 24),  # non-square output, upscale
    (33, 33, 32, 32),  # downscale by 1.03
    # Pillow ≥ 13 runs the vertical pass first when the height shrinks by more than twice what
    # the width shrinks (`ImagingResampleInner`); the 8-bit rounding between the passes differs.
    (32, 65, 30, 60),  # both down, the height by 5 > 2·2
    (12, 40, 30, 20),  # width up, height down
    (61, 90, 57, 31),  # both down, the height much more
]


def picture(w, h, seed):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    for _ in range(2):
        x0, y0 = rng.integers(0, max(w // 2, 1)), rng.integers(0, max(h // 2, 1))
        bw, bh = rng.integers(1, max(w // 2, 2)), rng.integers(1, max(h // 2, 2))
        img[y0 : y0 + bh, x0 : x0 + bw] = rng.choice([0, 255], size=3).astype(np.uint8)
    return img


def main():
    os.makedirs(OUT, exist_ok=True)
    tensors, cases = {}, []
    for i, (iw, ih, ow, oh) in enumerate(CASES):
        path = os.path.join(OUT, f"src{i}.png")
        Image.fromarray(picture(iw, ih, 100 + i)).save(path)
        img = Image.open(path).convert("RGB")
        pil = np.asarray(img.resize((ow, oh), Image.BICUBIC))
        proc = BlipImageProcessorPil(size={"height": oh, "width": ow}, do_convert_rgb=True)
        assert proc.resample == 3
        pv = proc(images=[img], return_tensors="pt")["pixel_values"][0].float()
        assert tuple(pv.shape) == (3, oh, ow)
        # The processor's resize is exactly this PIL call.
        mean = np.array(proc.image_mean, dtype=np.float32)[:, None, None]
        std = np.array(proc.image_std, dtype=np.float32)[:, None, None]
        again = ((pil.transpose(2, 0, 1) * proc.rescale_factor).astype(np.float32) - mean) / std
        assert np.abs(again - pv.numpy()).max() <= 1e-6
        tensors[f"pil{i}"] = torch.from_numpy(pil.copy())
        tensors[f"pixel_values{i}"] = pv.contiguous()
        cases.append({"src": f"src{i}.png", "in": [iw, ih], "out": [ow, oh]})
    save_file(tensors, os.path.join(OUT, "resize.safetensors"))
    json.dump({"cases": cases, "pillow": PIL.__version__, "transformers": transformers.__version__,
               "sizes": "[width, height]"}, open(os.path.join(OUT, "cases.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
