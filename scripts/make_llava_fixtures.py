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
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_model_fixtures import llama_tokenizer, randomize, test_image  # noqa: E402

try:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as ClipProc
except ImportError:  # older transformers: one (PIL) class
    from transformers import CLIPImageProcessor as ClipProc

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "models")


def llava_tokenizer(vocab_size: int, image_token: int, pad: int, extra=()) -> Tokenizer:
    """`llama_tokenizer` (unk 0, bos 1, eos 2, `<s>` prepended) plus the `extra` words, with `<pad>`
    at its own id when the model's pad is not unk (as llava-hf's checkpoints, whose pad is 32001)."""
    tok = llama_tokenizer(vocab_size, image_token)
    if pad == 0 and not extra:
        return tok
    vocab = tok.get_vocab()
    for w in extra:
        vocab[w] = max(i for i in vocab.values() if i < image_token) + 1
    if pad != 0:
        assert pad < vocab_size and pad not in vocab.values(), pad
        vocab["<pad>"] = pad
    assert len(set(vocab.values())) == len(vocab) and max(vocab.values()) < vocab_size
    out = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    out.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    out.add_special_tokens(["<unk>", "<s>", "</s>", "<image>"] + (["<pad>"] if pad != 0 else []))
    return out


def to_hub_layout(d: str):
    """Rewrites the checkpoint transformers 5.x saved (`vision_tower.*`, one file or shards) in the
    layout of the llava-hf hub checkpoints: the CLIP tower nested as `vision_tower.vision_model.*`
    (`language_model.model.*`, `language_model.lm_head` and `multi_modal_projector.*` are
    already as the hub stores them)."""
    index = os.path.join(d, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else ["model.safetensors"]
    rename = lambda k: "vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k
    for f in files:
        p = os.path.join(d, f)
        tensors = load_file(p)
        save_file({rename(k): v.contiguous() for k, v in tensors.items()}, p, metadata={"format": "pt"})
    if os.path.exists(index):
        js = json.load(open(index))
        js["weight_map"] = {rename(k): v for k, v in sorted(js["weight_map"].items())}
        with open(index, "w") as fh:
            json.dump(js, fh, indent=2)


# (num_beams, max_new_tokens, min_new_tokens, length_penalty, repetition_penalty). With a
# repetition penalty, transformers 5.25 leaves each row's left padding out of the penalized tokens
# (`generate` passes `prompt_ignore_length` = the first attended position of the attention mask);
# those settings are also run with the padding penalized (5.24's behaviour, a
# `RepetitionPenaltyLogitsProcessor` without `prompt_ignore_length`) and stored as `<key>_padding`,
# so the tests can show that the fixture tells the two apart.
GENERATE = [
    (1, 8, 0, 1.0, 1.0),
    (1, 6, 3, 1.0, 1.0),
    (3, 6, 2, 2.0, 1.0),
    (4, 7, 0, -1.0, 1.0),
    (1, 8, 0, 1.0, 1.5),
    (1, 8, 2, 1.0, 0.5),
    (3, 7, 1, -1.0, 1.5),
    (3, 6, 0, 1.0, 0.5),
]


def make(name, vision, text, feature_layer, strategy, prompts, seed, crops, template="<image> {}", words=(),
         hub=False, dtype=torch.float32, shard_size=None):
    """`crops`: per image, the (left, top, right, bottom) fractions of the square test picture kept,
    so the images have other aspect ratios than the model's square input. `hub`: the checkpoint
    rewritten in the hub key layout (`to_hub_layout`) and the references computed by the model
    `transformers` reads back from that directory."""
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
    model = model.to(dtype)
    if shard_size:
        model.save_pretrained(d, max_shard_size=shard_size)
    else:
        model.save_pretrained(d)
    if hub:
        to_hub_layout(d)
        stored = {}
        for f in os.listdir(d):
            if f.endswith(".safetensors"):
                stored.update(load_file(os.path.join(d, f)))
        assert any(k.startswith("vision_tower.vision_model.") for k in stored)
        assert not any(k.startswith("vision_tower.encoder") for k in stored)
    # The reference model: as transformers reads the directory back, computing in float32.
    loaded, info = LlavaForConditionalGeneration.from_pretrained(d, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    model = loaded.eval()
    assert model.generation_config.pad_token_id == text.pad_token_id

    tok = llava_tokenizer(text.vocab_size, image_token, text.pad_token_id, extra=words)
    tok.save(os.path.join(d, "tokenizer.json"))
    size = vision.image_size
    proc = ClipProc(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_center_crop=True,
        do_convert_rgb=True,
    )
    proc.save_pretrained(d)
    images = []
    for b, (l, t, r, btm) in enumerate(crops):
        p = os.path.join(d, f"image{b}.png")
        test_image(p, size * 2 + 5 * b, seed + b)
        img = Image.open(p).convert("RGB")
        w, h = img.size
        img = img.crop((int(l * w), int(t * h), int(r * w), int(btm * h)))
        assert img.width != img.height
        img.save(p)
        images.append(Image.open(p).convert("RGB"))
    pixel_values = proc(images=images, return_tensors="pt")["pixel_values"].float()
    assert pixel_values.shape[-2:] == (size, size), pixel_values.shape

    # The prompt template with `<image>` expanded as the processor does, rows LEFT-padded with
    # the model's pad (decoder-only generation).
    pad = text.pad_token_id
    rows = []
    for q in prompts:
        ids = tok.encode(template.format(q)).ids
        out = []
        for t in ids:
            out.extend([image_token] * image_seq if t == image_token else [t])
        assert out.count(image_token) == image_seq
        rows.append(out)
    n = max(len(r) for r in rows)
    input_ids = torch.tensor([[pad] * (n - len(r)) + r for r in rows], dtype=torch.long)
    attention_mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    assert not bool(attention_mask.all())
    ref = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}
    differs = 0
    with torch.no_grad():
        out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
        ref["logits"] = out.logits
        feats = model.get_image_features(pixel_values=pixel_values).pooler_output
        ref["image_features"] = torch.stack(list(feats))
        gen_settings = []
        for beams, max_new, min_new, lp, rep in GENERATE:
            common = dict(
                pixel_values=pixel_values,
                input_ids=input_ids,
                attention_mask=attention_mask,
                num_beams=beams,
                max_new_tokens=max_new,
                min_new_tokens=min_new,
                length_penalty=lp,
                do_sample=False,
                early_stopping=False,
            )
            ids = model.generate(repetition_penalty=rep, **common)
            key = f"generate_b{beams}_max{max_new}_min{min_new}_lp{lp:+.0f}_rep{rep:.1f}".replace("+", "p").replace("-", "m")
            ref[key] = ids
            entry = {"key": key, "num_beams": beams, "max_new_tokens": max_new, "min_new_tokens": min_new,
                     "length_penalty": lp, "repetition_penalty": rep}
            if rep != 1.0:
                padded = model.generate(
                    repetition_penalty=1.0,
                    logits_processor=LogitsProcessorList([RepetitionPenaltyLogitsProcessor(rep)]),
                    **common,
                )
                ref[key + "_padding"] = padded
                entry["padding_penalized_differs"] = not torch.equal(padded, ids)
                differs += entry["padding_penalized_differs"]
            gen_settings.append(entry)
    # The fixture must tell 5.25's repetition penalty from 5.24's.
    assert differs > 0, f"{name}: no setting separates the two repetition penalties"
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(d, "reference.safetensors"))
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump(
            {
                "transformers": transformers.__version__,
                "torch": torch.__version__,
                "kind": "llava",
                "layout": "hub (vision_tower.vision_model.*)" if hub else "transformers 5.x (vision_tower.*)",
                "dtype": str(dtype).removeprefix("torch."),
                "padding_side": "left",
                "template": template,
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


def init_stds():
    """The standard deviation of every tensor of a freshly constructed `LlavaForConditionalGeneration`
    (transformers' `_init_weights`: CLIP's own for the vision tower, `initializer_range` for the
    projector and the LLaMA), measured on one wide enough model, keyed by the saved names;
    `tests/fixtures/models/llava-init-stds.json`, which `write_initial_checkpoint` is checked
    against."""
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                              image_size=64, patch_size=8, initializer_factor=1.5)
    text = LlamaConfig(vocab_size=300, hidden_size=192, intermediate_size=384, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, initializer_range=0.03)
    cfg = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=299,
                      vision_feature_layer=-1)
    d = os.path.join(OUT, "llava-init")
    shutil.rmtree(d, ignore_errors=True)
    model = LlavaForConditionalGeneration(cfg)
    model.save_pretrained(d)
    stds = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            for k, v in load_file(os.path.join(d, f)).items():
                stds[k] = {"std": v.float().std().item(), "mean": v.float().mean().item(), "numel": v.numel()}
    with open(os.path.join(d, "config.json")) as fh:
        config = json.load(fh)
    shutil.rmtree(d)
    with open(os.path.join(OUT, "llava-init-stds.json"), "w") as fh:
        json.dump({"transformers": transformers.__version__, "config": config, "tensors": stds}, fh, indent=1,
                  sort_keys=True)


def main():
    # LLaVA-1.5 in miniature: CLIP tower (quick_gelu, 3 layers so feature layer -2 leaves one
    # layer unused as in the 7B), projector gelu with bias, LLaMA with grouped-query attention,
    # landscape and portrait images, `<image>` first.
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
        crops=[(0, 0, 1, 2 / 3), (0, 0, 2 / 3, 1)],
    )
    # The hub's layout (`vision_tower.vision_model.*`, float16, two shards and an index, as
    # llava-hf/llava-1.5-7b-hf is stored) with other sizes: CLIP 4 layers × 3 heads with the
    # features of layers 1 and 3 concatenated (`vision_feature_layer` [-4, -2]) and the CLS kept
    # (`full`), a multi-head (not grouped) LLaMA of 3 layers × 5 heads with its own pad id,
    # `<image>` inside the prompt, a 5:2 landscape, a 1:2 portrait and a 4:3 picture.
    make(
        "llava-hub",
        CLIPVisionConfig(hidden_size=24, intermediate_size=36, num_hidden_layers=4, num_attention_heads=3,
                         image_size=30, patch_size=6, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                         projection_dim=16),
        LlamaConfig(vocab_size=70, hidden_size=40, intermediate_size=56, num_hidden_layers=3, num_attention_heads=5,
                    num_key_value_heads=5, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                    bos_token_id=1, eos_token_id=2, pad_token_id=68, max_position_embeddings=256),
        feature_layer=[-4, -2],
        strategy="full",
        prompts=["what is the color of the square", "how many", "describe the picture in one short answer:"],
        seed=11,
        crops=[(0, 0.3, 1, 0.7), (0.25, 0, 0.75, 1), (0, 0, 1, 0.75)],
        template="USER: <image> {} ASSISTANT:",
        words=("USER:", "ASSISTANT:"),
        hub=True,
        dtype=torch.float16,
        shard_size="64KB",
    )
    init_stds()
    llava_7b_counts()


if __name__ == "__main__":
    sys.exit(main())
