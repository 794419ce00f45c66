#!/usr/bin/env python3
"""Reruns every generation setting of the committed InstructBLIP / BLIP-2 fixtures
(`tests/fixtures/models/*/reference.json`, made by `scripts/make_model_fixtures.py`, some with
transformers 5.24) under the installed transformers and says whether the tokens are the same.
Not run by CI.

    python scripts/check_generation_fixtures.py

Why: transformers 5.25 leaves a row's leading padding out of the repetition penalty
(`generate` passes `RepetitionPenaltyLogitsProcessor(prompt_ignore_length=(mask != 0).argmax(1))`
for decoder-only models; encoder-decoder ones pass `decoder_attention_mask`, usually None). The
InstructBLIP-LLaMA rows start with the query placeholders, so the first attended position is 0
and nothing is skipped; T5 rows are decoder tokens. Under 5.25 every setting (repetition penalty
1.5 included) gives the committed tokens, so those fixtures need no regeneration. The LLaVA
fixtures (`make_llava_fixtures.py`, 5.25) start with the padding and test the difference.
"""
import json
import os
import sys

import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoConfig, Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MODELS = os.path.join(ROOT, "tests", "fixtures", "models")


def main():
    print(f"transformers {transformers.__version__}")
    failures = 0
    for name in sorted(os.listdir(MODELS)):
        d = os.path.join(MODELS, name)
        if not os.path.exists(os.path.join(d, "reference.json")):
            continue
        js = json.load(open(os.path.join(d, "reference.json")))
        cfg = AutoConfig.from_pretrained(d)
        if cfg.model_type not in ("instructblip", "blip-2"):
            continue
        cls = InstructBlipForConditionalGeneration if cfg.model_type == "instructblip" else Blip2ForConditionalGeneration
        model, info = cls.from_pretrained(d, dtype=torch.float32, output_loading_info=True)
        model = model.eval()
        if info["missing_keys"]:
            # The hub's InstructBLIP layout stores the ViT qkv bias as `q_bias` + `v_bias` (k
            # bias zero); transformers 5.25 leaves `qkv.bias` missing (randomly initialised)
            # there, so it is rebuilt here as the fixture script built the model.
            stored = {}
            for f in os.listdir(d):
                if f.startswith("model") and f.endswith(".safetensors"):
                    stored.update(load_file(os.path.join(d, f)))
            params = dict(model.named_parameters())
            for key in info["missing_keys"]:
                base = key.removesuffix("qkv.bias")
                assert key.endswith("qkv.bias") and base + "q_bias" in stored, f"{name}: {key} missing"
                q, v = stored[base + "q_bias"], stored[base + "v_bias"]
                with torch.no_grad():
                    params[key].copy_(torch.cat([q, torch.zeros_like(q), v]))
            print(f"{name}: transformers {transformers.__version__} left {len(info['missing_keys'])} "
                  f"qkv biases missing (hub q_bias/v_bias layout); rebuilt from the stored ones")
        ref = load_file(os.path.join(d, "reference.safetensors"))
        b = ref["input_ids"].shape[0]
        image = torch.full((b, cfg.num_query_tokens), cfg.image_token_index, dtype=torch.long)
        ids = torch.cat([image, ref["input_ids"]], 1)
        mask = torch.cat([torch.ones_like(image), ref["attention_mask"]], 1)
        kwargs = {k: ref[k] for k in ("qformer_input_ids", "qformer_attention_mask") if k in ref}
        skipped = (mask != 0).int().argmax(dim=1).tolist()
        for g in js["generate"]:
            with torch.no_grad():
                out = model.generate(
                    pixel_values=ref["pixel_values"], input_ids=ids, attention_mask=mask,
                    num_beams=g["num_beams"], max_new_tokens=g["max_new_tokens"],
                    min_new_tokens=g["min_new_tokens"], length_penalty=g["length_penalty"],
                    repetition_penalty=g["repetition_penalty"], do_sample=False, early_stopping=False, **kwargs,
                )
            same = torch.equal(out, ref[g["key"]])
            failures += not same
            print(f"{name} (made by {js['transformers']}, penalty skips {skipped}): {g['key']}: "
                  f"{'same' if same else 'DIFFERENT'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
