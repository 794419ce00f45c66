#!/usr/bin/env python3
"""Checks `ressa repair`'s PEFT adapters with PEFT itself and records the PEFT-merged logits.

    /root/venv/bin/pip install torch transformers safetensors peft
    python3 scripts/check_peft_adapters.py REPAIRED_DIR DENSE_DIR [OUT_LOGITS]

REPAIRED_DIR is a `ressa repair --out` directory (or any directory holding `adapters/`, or the
adapters directory itself); DENSE_DIR is the dense HF model directory the repair started from
(its `reference.safetensors` holds the inputs). The script:

1. loads DENSE_DIR with `InstructBlipForConditionalGeneration.from_pretrained`;
2. attaches the adapters with `peft.PeftModel.from_pretrained(model, adapters_dir)` and fails
   on any PEFT warning, on any unexpected adapter key and on any missing `lora_` key
   (re-checked through `set_peft_model_state_dict`, which returns them);
3. checks that PEFT built a LoRA layer for every `target_modules` entry, with the rank of
   `rank_pattern` and the scaling `alpha_pattern / rank`, and holds the file's tensors;
4. merges (`merge_and_unload`) and writes the logits of the reference inputs to OUT_LOGITS
   (`logits`, F32) with the PEFT and transformers versions in the metadata.

PEFT's LoRA merges W + s·B·A; ressa's SparseLoRA output is (W + s·B·A) ⊙ M. The logits here are
PEFT's meaning of the adapter files (no mask): the Rust test `crates/ressa-train/tests/
peft_fixture.rs` recomputes W + s·B·A itself and compares with them.
CI never runs this script: it only reads the committed files.
"""
import json
import os
import sys
import warnings

import peft
import torch
import transformers
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import load_peft_weights, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import InstructBlipForConditionalGeneration


def main():
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    repaired, dense = sys.argv[1], sys.argv[2]
    out = sys.argv[3] if len(sys.argv) == 4 else None
    adapters = repaired
    if not os.path.exists(os.path.join(adapters, "adapter_config.json")):
        adapters = os.path.join(repaired, "adapters")
    cfg = json.load(open(os.path.join(adapters, "adapter_config.json")))
    file_tensors = load_file(os.path.join(adapters, "adapter_model.safetensors"))

    torch.manual_seed(0)
    model = InstructBlipForConditionalGeneration.from_pretrained(dense, torch_dtype=torch.float32)
    model.eval()
    ref = load_file(os.path.join(dense, "reference.safetensors"))
    # transformers 5.x places the query outputs at image placeholder tokens; put them first, as
    # scripts/make_model_fixtures.py does (and as ressa, LAVIS-style, prepends them).
    batch = ref["input_ids"].shape[0]
    image_ids = torch.full((batch, model.config.num_query_tokens), model.config.image_token_index,
                           dtype=torch.long)
    inputs = dict(
        pixel_values=ref["pixel_values"],
        qformer_input_ids=ref["qformer_input_ids"],
        qformer_attention_mask=ref["qformer_attention_mask"],
        input_ids=torch.cat([image_ids, ref["input_ids"]], dim=1),
        attention_mask=torch.cat([torch.ones_like(image_ids), ref["attention_mask"]], dim=1),
        decoder_input_ids=ref["decoder_input_ids"],
    )
    with torch.no_grad():
        dense_logits = model(**inputs).logits
    if "logits" in ref:
        d = (dense_logits - ref["logits"]).abs().max().item()
        print(f"dense model vs reference.safetensors logits: max abs diff {d:.2e}")
        assert d <= 1e-4, d

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(model, adapters)
    # The one tolerated warning: LoraConfig ignores ressa's own `ressa` field of
    # adapter_config.json ("Unexpected keyword arguments ['ressa'] for class LoraConfig").
    tolerated = "Unexpected keyword arguments ['ressa'] for class LoraConfig"
    problems = [str(w.message) for w in caught if not str(w.message).startswith(tolerated) and (
        "key" in str(w.message).lower() or "missing" in str(w.message).lower()
        or "unexpected" in str(w.message).lower())]
    for w in caught:
        print("warning:", w.category.__name__, str(w.message)[:300])
    assert not problems, problems

    # Re-load the same weights to get PEFT's own missing / unexpected key lists.
    res = set_peft_model_state_dict(pm, load_peft_weights(adapters), adapter_name="default")
    missing = [k for k in res.missing_keys if "lora_" in k]
    unexpected = list(res.unexpected_keys)
    assert not missing, f"missing adapter keys: {missing[:10]} ({len(missing)})"
    assert not unexpected, f"unexpected adapter keys: {unexpected[:10]} ({len(unexpected)})"

    # Every target module became a LoRA layer with the configured rank, scale and tensors.
    layers = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules()
              if isinstance(m, LoraLayer)}
    targets = cfg["target_modules"]
    assert sorted(layers) == sorted(targets), (sorted(set(layers) ^ set(targets)))[:10]
    for name in targets:
        m = layers[name]
        r = cfg["rank_pattern"].get(name, cfg["r"])
        alpha = cfg["alpha_pattern"].get(name, cfg["lora_alpha"])
        assert m.r["default"] == r, (name, m.r["default"], r)
        assert abs(m.scaling["default"] - alpha / r) < 1e-12, (name, m.scaling["default"])
        a = file_tensors[f"base_model.model.{name}.lora_A.weight"]
        b = file_tensors[f"base_model.model.{name}.lora_B.weight"]
        assert torch.equal(m.lora_A["default"].weight, a), name
        assert torch.equal(m.lora_B["default"].weight, b), name
        w = m.base_layer.weight
        assert a.shape == (r, w.shape[1]) and b.shape == (w.shape[0], r), (name, a.shape, b.shape)
    assert len(file_tensors) == 2 * len(targets), len(file_tensors)
    print(f"PEFT {peft.__version__}: {len(targets)} LoRA modules, no missing/unexpected keys")

    merged = pm.merge_and_unload()
    with torch.no_grad():
        logits = merged(**inputs).logits.float().contiguous()
    print("logits", tuple(logits.shape),
          f"max |PEFT-merged - dense| {(logits - dense_logits).abs().max().item():.3e}")
    if out:
        save_file({"logits": logits}, out, metadata={
            "peft": peft.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        })
        print("wrote", out)


if __name__ == "__main__":
    main()
