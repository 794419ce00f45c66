#!/usr/bin/env python3
"""Writes a tiny random LLaVA-1.5 checkpoint and `transformers` reference outputs for the Rust
parity tests (crates/ressa-models/tests/llava.rs).

Run from the repository root with a venv holding torch + transformers 5.x (+ pillow, safetensors):

    /root/venv/bin/python scripts/make_llava_fixtures.py

Output: tests/fixtures/models/llava-gqa/ with the HF model directory (config.json,
model.safetensors, tokenizer.json, preprocessor_config.json, generation_config.json), a
non-square test image, reference.safetensors (pixel_values, input_ids with `<image>` expanded to
the image token count as `LlavaProcessor` does, attention_mask, logits, greedy generations) and
reference.json (generation settings, versions).

The image processor is `CLIPImageProcessorPil` as LLaVA-1.5 configures it: `size.shortest_edge`
(bicubic, aspect kept), then the center `crop_size` square.
CI never runs this script: it only reads the committed files.
"""
import json
import os
import shutil
import sys

import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_model_fixtures import llama_tokenizer, randomize, test_image  # noqa: E402

try:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as ClipProc
except ImportError:  # older transformers: one (PIL) class
    from transformers import CLIPImageProcessor as ClipProc

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "models")


def make(name, vision, text, feature_layer, strategy, prompts, seed):
    print(f"== {name}")
    torch.manual_seed(seed)
    d = os.path.join(OUT, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    image_token = text.vocab_size - 1
    patches = (vision.image_size // vision.patch_size) ** 2
    image_seq = patches + (1 if strategy == "full" else 0)
    cfg = LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=image_token,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
        image_seq_length=image_seq,
    )
    model = LlavaForConditionalGeneration(cfg).eval()
    randomize(model, seed)
    model.save_pretrained(d)

    tok = llama_tokenizer(text.vocab_size, image_token)
    tok.save(os.path.join(d, "tokenizer.json"))
    size = vision.image_size
    proc = ClipProc(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_center_crop=True,
        do_convert_rgb=True,
    )
    proc.save_pretrained(d)
    batch = len(prompts)
    images = []
    for b in range(batch):
        p = os.path.join(d, f"image{b}.png")
        test_image(p, size * 2 + 5 * b, seed + b)
        img = Image.open(p).convert("RGB")
        # Non-square: crop the square test picture to a landscape (image0) or portrait (image1)
        # strip, so the shortest-edge resize and the center crop both matter.
        if b % 2 == 0:
            img = img.crop((0, 0, img.width, img.height * 2 // 3))
        else:
            img = img.crop((0, 0, img.width * 2 // 3, img.height))
        img.save(p)
        images.append(Image.open(p).convert("RGB"))
    pixel_values = proc(images=images, return_tensors="pt")["pixel_values"].float()
    assert pixel_values.shape[-2:] == (size, size), pixel_values.shape

    # `USER: <image>\n{q} ASSISTANT:` with word-level stand-ins; `<image>` expanded as the
    # processor does, rows LEFT-padded with pad 0 (decoder-only generation).
    rows = []
    for q in prompts:
        ids = tok.encode(f"<image> {q}").ids
        out = []
        for t in ids:
            out.extend([image_token] * image_seq if t == image_token else [t])
        rows.append(out)
    n = max(len(r) for r in rows)
    input_ids = torch.tensor([[0] * (n - len(r)) + r for r in rows], dtype=torch.long)
    attention_mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    assert not bool(attention_mask.all())
    ref = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}
    with torch.no_grad():
        out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
        ref["logits"] = out.logits
        feats = model.get_image_features(pixel_values=pixel_values).pooler_output
        ref["image_features"] = torch.stack(list(feats))
        gen_settings = []
        # No repetition penalty: transformers 5.25 leaves a row's left padding out of the
        # penalized tokens (`prompt_ignore_length`), 5.24 and ressa penalize it (the InstructBLIP
        # LLaMA fixtures, written by 5.24, pin that), so a padded batch has no single answer.
        for beams, max_new, min_new, lp, rep in [
            (1, 8, 0, 1.0, 1.0),
            (1, 6, 3, 1.0, 1.0),
            (3, 6, 2, 2.0, 1.0),
            (4, 7, 0, -1.0, 1.0),
        ]:
            ids = model.generate(
                pixel_values=pixel_values,
                input_ids=input_ids,
                attention_mask=attention_mask,
                num_beams=beams,
                max_new_tokens=max_new,
                min_new_tokens=min_new,
                length_penalty=lp,
                repetition_penalty=rep,
                do_sample=False,
                early_stopping=False,
            )
            key = f"generate_b{beams}_max{max_new}_min{min_new}_lp{lp:+.0f}_rep{rep:.1f}".replace("+", "p").replace("-", "m")
            ref[key] = ids
            gen_settings.append(
                {"key": key, "num_beams": beams, "max_new_tokens": max_new, "min_new_tokens": min_new,
                 "length_penalty": lp, "repetition_penalty": rep}
            )
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(d, "reference.safetensors"))
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump(
            {
                "transformers": transformers.__version__,
                "torch": torch.__version__,
                "kind": "llava",
                "padding_side": "left",
                "prompts": prompts,
                "image_seq_length": image_seq,
                "generate": gen_settings,
            },
            f,
            indent=2,
        )
    for f in os.listdir(d):
        os.chmod(os.path.join(d, f), 0o644)


def llava_7b_counts():
    """The llava-hf/llava-1.5-7b-hf dimensions (CLIP ViT-L/14-336, Vicuna-7B with 32064 tokens);
    per-tower parameter counts on the meta device, keyed by the saved checkpoint's top-level
    names (transformers 5.x names its modules `model.vision_tower`, `model.language_model`,
    `lm_head` and maps them back to `vision_tower`, `language_model.model`,
    `language_model.lm_head` on save)."""
    d = os.path.join(ROOT, "configs", "models", "llava-1.5-7b")
    os.makedirs(d, exist_ok=True)
    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
    )
    text = LlamaConfig(
        vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, hidden_act="silu",
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=32001,
    )
    cfg = LlavaConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=32000,
        projector_hidden_act="gelu", multimodal_projector_bias=True, vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=576,
    )
    cfg.save_pretrained(d)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
    counts = {}
    for n, p in model.named_parameters(remove_duplicate=True):
        if n.startswith("lm_head"):
            key = "language_model_lm_head_untied"
        else:
            key = n.removeprefix("model.").split(".")[0]
        counts[key] = counts.get(key, 0) + p.numel()
    with open(os.path.join(d, "param_counts.json"), "w") as f:
        json.dump({"transformers": transformers.__version__, "counts": counts}, f, indent=2)
    print(counts)


def main():
    # LLaVA-1.5 in miniature: CLIP tower (quick_gelu, 3 layers so feature layer -2 leaves one
    # layer unused as in the 7B), projector gelu with bias, LLaMA with grouped-query attention.
    make(
        "llava-gqa",
        CLIPVisionConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
                         image_size=28, patch_size=7, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                         projection_dim=16),
        LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=44, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=256),
        feature_layer=-2,
        strategy="default",
        prompts=["what is the color of the circle short answer:", "how many shape answer:"],
        seed=7,
    )
    llava_7b_counts()


if __name__ == "__main__":
    sys.exit(main())
