#!/usr/bin/env python3
"""Writes tiny random HF checkpoints and `transformers` reference outputs for the Rust parity tests.

Run from the repository root with a venv holding torch + transformers (+ pillow, safetensors):

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install torch transformers safetensors pillow
    /tmp/venv/bin/python scripts/make_model_fixtures.py [NAME ...]

With fixture names (e.g. `instructblip-t5-untied`), only those directories are rewritten.

Output: tests/fixtures/models/<name>/ with the HF model directory files (config.json,
model.safetensors or shards, tokenizer.json, qformer_tokenizer/tokenizer.json,
preprocessor_config.json, generation_config.json) plus reference.safetensors (inputs and outputs)
and reference.json (generation settings, transformers version). Also writes the full-size
InstructBLIP-FlanT5-XL config with transformers' parameter counts per tower (meta device).
CI never runs this script: it only reads the committed files.
"""
import json
import os
import shutil
import sys

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    BlipImageProcessor,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
    LlamaConfig,
    T5Config,
)

ONLY = set(sys.argv[1:])
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "models")

WORDS = (
    "what is the color of shape a an red blue green yellow circle square triangle question: short "
    "answer: describe image there in on above below left right small large how many one two three "
    "yes no picture photo and with"
).split()


def t5_tokenizer(vocab_size: int, image_token: int) -> Tokenizer:
    """A word-level stand-in for the T5 SentencePiece tokenizer: pad 0, eos 1, unk 2, `</s>` appended."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in WORDS:
        vocab[w] = len(vocab)
    assert len(vocab) < image_token < vocab_size
    vocab["<image>"] = image_token
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tok.add_special_tokens(["<pad>", "</s>", "<unk>", "<image>"])
    return tok


def bert_tokenizer(vocab_size: int) -> Tokenizer:
    """A word-level stand-in for the Q-Former BERT tokenizer: `[CLS] text [SEP]`, lower-cased words."""
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    for w in WORDS:
        vocab[w] = len(vocab)
    assert len(vocab) <= vocab_size
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    return tok


def test_image(path: str, size: int, seed: int):
    """A small RGB picture with a few coloured blocks and noise (PNG)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    for _ in range(3):
        x0, y0 = rng.integers(0, size // 2, size=2)
        w, h = rng.integers(size // 6, size // 2, size=2)
        img[y0 : y0 + h, x0 : x0 + w] = rng.integers(80, 255, size=3, dtype=np.uint8)
    Image.fromarray(img).save(path)


def rewrite_hub_layout(model_dir: str, shards: int):
    """Rewrites `model.safetensors` as the hub's InstructBLIP checkpoints store it: the ViT qkv bias as
    separate `q_bias`/`v_bias` (k bias is zero), optionally split into shards with an index file."""
    tensors = load_file(os.path.join(model_dir, "model.safetensors"))
    out = {}
    for k, v in tensors.items():
        if k.endswith("self_attn.qkv.bias"):
            d = v.shape[0] // 3
            assert torch.all(v[d : 2 * d] == 0)
            base = k[: -len("qkv.bias")]
            out[base + "q_bias"] = v[:d].clone()
            out[base + "v_bias"] = v[2 * d :].clone()
        else:
            out[k] = v.contiguous()
    os.remove(os.path.join(model_dir, "model.safetensors"))
    if shards == 1:
        save_file(out, os.path.join(model_dir, "model.safetensors"), metadata={"format": "pt"})
        return
    keys = sorted(out)
    weight_map = {}
    total = 0
    for s in range(shards):
        part = keys[s::shards]
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: out[k] for k in part}, os.path.join(model_dir, name), metadata={"format": "pt"})
        for k in part:
            weight_map[k] = name
            total += out[k].numel() * out[k].element_size()
    with open(os.path.join(model_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def randomize(model, seed: int):
    """HF initializes many weights to 0/1 (biases, norms, query tokens); perturb every parameter so a
    wrong mapping cannot hide behind a constant."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("qkv.bias"):
                d = p.shape[0] // 3
                p[:d] = torch.randn(d, generator=g) * 0.1
                p[d : 2 * d] = 0.0
                p[2 * d :] = torch.randn(d, generator=g) * 0.1
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        # Make `</s>` (id 1) likely enough that generation finishes hypotheses early and the
        # beam-search bookkeeping of finished sequences is exercised.
        shared = model.get_input_embeddings().weight
        shared[1] *= 3.0


def untie_embeddings(model, seed: int):
    """Gives the T5's `shared`, `encoder.embed_tokens`, `decoder.embed_tokens` and `lm_head` each its
    own storage and its own noise, as after fine-tuning an untied checkpoint: `save_pretrained`
    (which drops aliases by storage pointer) then writes all four, and a reader that takes `shared`
    for the decoder or the head gives clearly different logits."""
    lm = model.language_model
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        base = lm.shared.weight.detach().clone()
        for module in (lm.shared, lm.encoder.embed_tokens, lm.decoder.embed_tokens, lm.lm_head):
            module.weight = torch.nn.Parameter(base + 0.3 * torch.randn(base.shape, generator=g))
    names = ["shared", "encoder.embed_tokens", "decoder.embed_tokens", "lm_head"]
    ws = [lm.get_parameter(f"{n}.weight") for n in names]
    assert len({w.data_ptr() for w in ws}) == 4
    for i in range(4):
        for j in range(i):
            assert not torch.equal(ws[i], ws[j]), (names[i], names[j])


UNTIED_KEYS = [
    f"language_model.{n}.weight" for n in ("shared", "encoder.embed_tokens", "decoder.embed_tokens", "lm_head")
]


def reload_untied(d: str, kind: str, model):
    """Checks the saved file holds the four embedding/head tensors, all different, and returns the
    model as `transformers` reads it back from `d` (each tensor used as stored)."""
    stored = load_file(os.path.join(d, "model.safetensors"))
    for k in UNTIED_KEYS:
        assert k in stored, f"{k} not written"
    for i in range(4):
        for j in range(i):
            diff = (stored[UNTIED_KEYS[i]] - stored[UNTIED_KEYS[j]]).abs().max().item()
            assert diff > 0.1, (UNTIED_KEYS[i], UNTIED_KEYS[j], diff)
    cls = InstructBlipForConditionalGeneration if kind == "instructblip" else Blip2ForConditionalGeneration
    loaded = cls.from_pretrained(d).eval()
    ours = dict(model.named_parameters(remove_duplicate=False))
    theirs = dict(loaded.named_parameters(remove_duplicate=False))
    for k in UNTIED_KEYS:
        assert torch.equal(theirs[k], stored[k]), f"{k} not used as stored"
        assert torch.equal(theirs[k], ours[k])
    assert len({theirs[k].data_ptr() for k in UNTIED_KEYS}) == 4, "transformers re-tied them"
    return loaded


def make(name, kind, vision, qformer, text, num_query, batch, prompts, qprompts, pad_prompts, shards, hub_layout, seed,
         untie=False):
    """`untie`: four different embedding/head tensors (`untie_embeddings`), `tie_word_embeddings:
    false` in the written config, references from the model as reloaded from disk."""
    if ONLY and name not in ONLY:
        return
    print(f"== {name}")
    torch.manual_seed(seed)
    d = os.path.join(OUT, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    image_token = text.vocab_size - 1
    if kind == "instructblip":
        cfg = InstructBlipConfig(
            vision_config=vision.to_dict(),
            qformer_config=qformer.to_dict(),
            text_config=text.to_dict(),
            num_query_tokens=num_query,
            image_token_index=image_token,
        )
        model = InstructBlipForConditionalGeneration(cfg).eval()
    else:
        cfg = Blip2Config(
            vision_config=vision.to_dict(),
            qformer_config=qformer.to_dict(),
            text_config=text.to_dict(),
            num_query_tokens=num_query,
            image_token_index=image_token,
        )
        model = Blip2ForConditionalGeneration(cfg).eval()
    randomize(model, seed)
    if untie:
        untie_embeddings(model, seed)
    model.save_pretrained(d)
    if untie:
        untie_text_config(d)
        model = reload_untied(d, kind, model)

    t5_tok = t5_tokenizer(text.vocab_size, image_token)
    t5_tok.save(os.path.join(d, "tokenizer.json"))
    if kind == "instructblip":
        os.makedirs(os.path.join(d, "qformer_tokenizer"))
        bert_tokenizer(qformer.vocab_size).save(os.path.join(d, "qformer_tokenizer", "tokenizer.json"))
    size = vision.image_size
    proc = BlipImageProcessor(size={"height": size, "width": size}, do_convert_rgb=True)
    proc.save_pretrained(d)

    # Inputs: images through the HF image processor (bicubic resize from a larger PNG).
    images = []
    for b in range(batch):
        p = os.path.join(d, f"image{b}.png")
        test_image(p, size * 2 + 5 * b, seed + b)
        images.append(Image.open(p).convert("RGB"))
    pixel_values = proc(images=images, return_tensors="pt")["pixel_values"].float()

    def encode(tok, texts):
        ids = [tok.encode(t).ids for t in texts]
        n = max(len(x) for x in ids)
        mask = [[1] * len(x) + [0] * (n - len(x)) for x in ids]
        ids = [x + [0] * (n - len(x)) for x in ids]
        return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)

    input_ids, attention_mask = encode(t5_tok, prompts)
    if not pad_prompts:
        assert bool(attention_mask.all())
    # HF 5.x places the query outputs at image placeholder tokens; put them first, as LAVIS does.
    image_ids = torch.full((batch, num_query), image_token, dtype=torch.long)
    hf_input_ids = torch.cat([image_ids, input_ids], dim=1)
    hf_attention_mask = torch.cat([torch.ones_like(image_ids), attention_mask], dim=1)
    decoder_input_ids = torch.tensor(
        [[0] + [(7 * b + 3 * i) % (text.vocab_size - 3) + 3 for i in range(5)] for b in range(batch)],
        dtype=torch.long,
    )
    ref = {
        "pixel_values": pixel_values,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "decoder_input_ids": decoder_input_ids,
    }
    kwargs = {}
    if kind == "instructblip":
        qformer_input_ids, qformer_attention_mask = encode(bert_tokenizer(qformer.vocab_size), qprompts)
        ref["qformer_input_ids"] = qformer_input_ids
        ref["qformer_attention_mask"] = qformer_attention_mask
        kwargs = {"qformer_input_ids": qformer_input_ids, "qformer_attention_mask": qformer_attention_mask}

    with torch.no_grad():
        out = model(
            pixel_values=pixel_values,
            input_ids=hf_input_ids,
            attention_mask=hf_attention_mask,
            decoder_input_ids=decoder_input_ids,
            **kwargs,
        )
        vision = out.vision_outputs.last_hidden_state
        qformer_out = out.qformer_outputs.last_hidden_state
        ref["vision_last_hidden_state"] = vision
        ref["qformer_last_hidden_state"] = qformer_out
        ref["language_model_inputs"] = model.language_projection(qformer_out[:, :num_query])
        ref["encoder_last_hidden_state"] = out.language_model_outputs.encoder_last_hidden_state
        ref["logits"] = out.logits

        gen_settings = []
        for beams, max_new, min_new, lp, rep in [
            (1, 8, 0, 1.0, 1.0),
            (5, 8, 0, 1.0, 1.0),
            (5, 7, 3, -1.0, 1.0),
            (3, 6, 2, 2.0, 1.0),
            (1, 8, 2, 1.0, 1.5),
            (5, 8, 1, -1.0, 1.5),
        ]:
            ids = model.generate(
                pixel_values=pixel_values,
                input_ids=hf_input_ids,
                attention_mask=hf_attention_mask,
                num_beams=beams,
                max_new_tokens=max_new,
                min_new_tokens=min_new,
                length_penalty=lp,
                repetition_penalty=rep,
                do_sample=False,
                early_stopping=False,
                **kwargs,
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
                "kind": kind,
                "prompts": prompts,
                "qformer_prompts": qprompts,
                "generate": gen_settings,
            },
            f,
            indent=2,
        )
    if hub_layout:
        rewrite_hub_layout(d, shards)


def llama_tokenizer(vocab_size: int, image_token: int) -> Tokenizer:
    """A word-level stand-in for the LLaMA SentencePiece tokenizer: unk 0 (also the pad), bos 1,
    eos 2, `<s>` prepended."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS:
        vocab[w] = len(vocab)
    assert len(vocab) < image_token < vocab_size
    vocab["<image>"] = image_token
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    tok.add_special_tokens(["<unk>", "<s>", "</s>", "<image>"])
    return tok


def make_llama(name, vision, qformer, text, num_query, prompts, qprompts, seed):
    """InstructBLIP with a LLaMA (decoder-only) language model. The language-model input is
    [query outputs ; prompt] as in LAVIS, the prompts LEFT-padded (what decoder-only generation
    expects); logits cover the whole sequence, generation continues after the prompt."""
    if ONLY and name not in ONLY:
        return
    print(f"== {name}")
    torch.manual_seed(seed)
    d = os.path.join(OUT, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    image_token = text.vocab_size - 1
    cfg = InstructBlipConfig(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=num_query,
        image_token_index=image_token,
    )
    model = InstructBlipForConditionalGeneration(cfg).eval()
    randomize(model, seed)
    with torch.no_grad():
        # Make `</s>` (id 2) likely enough that beams finish early.
        model.get_output_embeddings().weight[text.eos_token_id] *= 3.0
    model.save_pretrained(d)

    tok = llama_tokenizer(text.vocab_size, image_token)
    tok.save(os.path.join(d, "tokenizer.json"))
    os.makedirs(os.path.join(d, "qformer_tokenizer"))
    bert_tokenizer(qformer.vocab_size).save(os.path.join(d, "qformer_tokenizer", "tokenizer.json"))
    size = vision.image_size
    proc = BlipImageProcessor(size={"height": size, "width": size}, do_convert_rgb=True)
    proc.save_pretrained(d)
    batch = len(prompts)
    images = []
    for b in range(batch):
        p = os.path.join(d, f"image{b}.png")
        test_image(p, size * 2 + 5 * b, seed + b)
        images.append(Image.open(p).convert("RGB"))
    pixel_values = proc(images=images, return_tensors="pt")["pixel_values"].float()

    def encode(ids, left):
        n = max(len(x) for x in ids)
        pad = [[0] * (n - len(x)) for x in ids]
        if left:
            mask = [[0] * len(p) + [1] * len(x) for p, x in zip(pad, ids)]
            ids = [p + x for p, x in zip(pad, ids)]
        else:
            mask = [[1] * len(x) + [0] * len(p) for p, x in zip(pad, ids)]
            ids = [x + p for p, x in zip(pad, ids)]
        return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)

    input_ids, attention_mask = encode([tok.encode(t).ids for t in prompts], left=True)
    assert not bool(attention_mask.all())
    qformer_input_ids, qformer_attention_mask = encode(
        [bert_tokenizer(qformer.vocab_size).encode(t).ids for t in qprompts], left=False
    )
    image_ids = torch.full((batch, num_query), image_token, dtype=torch.long)
    hf_input_ids = torch.cat([image_ids, input_ids], dim=1)
    hf_attention_mask = torch.cat([torch.ones_like(image_ids), attention_mask], dim=1)
    ref = {
        "pixel_values": pixel_values,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "qformer_input_ids": qformer_input_ids,
        "qformer_attention_mask": qformer_attention_mask,
    }
    kwargs = {"qformer_input_ids": qformer_input_ids, "qformer_attention_mask": qformer_attention_mask}
    with torch.no_grad():
        out = model(pixel_values=pixel_values, input_ids=hf_input_ids, attention_mask=hf_attention_mask, **kwargs)
        qformer_out = out.qformer_outputs.last_hidden_state
        ref["vision_last_hidden_state"] = out.vision_outputs.last_hidden_state
        ref["qformer_last_hidden_state"] = qformer_out
        ref["language_model_inputs"] = model.language_projection(qformer_out[:, :num_query])
        ref["logits"] = out.logits
        gen_settings = []
        for beams, max_new, min_new, lp, rep in [
            (1, 8, 0, 1.0, 1.0),
            (5, 8, 0, 1.0, 1.0),
            (5, 7, 3, -1.0, 1.0),
            (3, 6, 2, 2.0, 1.0),
            (1, 8, 2, 1.0, 1.5),
            (5, 8, 1, -1.0, 1.5),
        ]:
            ids = model.generate(
                pixel_values=pixel_values,
                input_ids=hf_input_ids,
                attention_mask=hf_attention_mask,
                num_beams=beams,
                max_new_tokens=max_new,
                min_new_tokens=min_new,
                length_penalty=lp,
                repetition_penalty=rep,
                do_sample=False,
                early_stopping=False,
                **kwargs,
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
                "kind": "instructblip-llama",
                "padding_side": "left",
                "prompts": prompts,
                "qformer_prompts": qprompts,
                "generate": gen_settings,
            },
            f,
            indent=2,
        )


def untie_text_config(d: str):
    """transformers 5.x writes `tie_word_embeddings: true` for every T5 text config; the hub's
    InstructBLIP-FlanT5 configs say false (FlanT5 has its own `lm_head`). Restore that."""
    path = os.path.join(d, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["text_config"]["tie_word_embeddings"] = False
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def full_size_counts():
    """InstructBLIP-FlanT5-XL config from the reference dimensions; per-tower counts on the meta device."""
    d = os.path.join(ROOT, "configs", "models", "instructblip-flan-t5-xl")
    os.makedirs(d, exist_ok=True)
    vision = InstructBlipVisionConfig(
        hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
        image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu",
    )
    qformer = InstructBlipQFormerConfig(
        vocab_size=30523, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        cross_attention_frequency=2, encoder_hidden_size=1408, max_position_embeddings=512, layer_norm_eps=1e-12,
    )
    text = T5Config(
        vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_decoder_layers=24, num_heads=32,
        feed_forward_proj="gated-gelu", dense_act_fn="gelu", tie_word_embeddings=False, bos_token_id=1,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    cfg = InstructBlipConfig(
        vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
        num_query_tokens=32, image_token_index=32100,
    )
    cfg.save_pretrained(d)
    untie_text_config(d)
    with torch.device("meta"):
        model = InstructBlipForConditionalGeneration(cfg)
    counts = {}
    for n, p in model.named_parameters(remove_duplicate=True):
        tower = n.split(".")[0]
        counts[tower] = counts.get(tower, 0) + p.numel()
    # An untied FlanT5 lm_head: transformers 5.x ties it to `shared`; real checkpoints store it apart.
    counts["language_model_lm_head_untied"] = text.vocab_size * text.d_model
    with open(os.path.join(d, "param_counts.json"), "w") as f:
        json.dump({"transformers": transformers.__version__, "counts": counts}, f, indent=2)
    print(counts)


def vicuna_counts():
    """InstructBLIP-Vicuna-7B config (Vicuna-7B = LLaMA-7B dimensions, 32001 tokens with the added
    pad); per-tower counts on the meta device."""
    d = os.path.join(ROOT, "configs", "models", "instructblip-vicuna-7b")
    os.makedirs(d, exist_ok=True)
    vision = InstructBlipVisionConfig(
        hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
        image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu",
    )
    qformer = InstructBlipQFormerConfig(
        vocab_size=30523, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        cross_attention_frequency=2, encoder_hidden_size=1408, max_position_embeddings=512, layer_norm_eps=1e-12,
    )
    text = LlamaConfig(
        vocab_size=32001, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6, hidden_act="silu",
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    cfg = InstructBlipConfig(
        vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
        num_query_tokens=32, image_token_index=32000,
    )
    cfg.save_pretrained(d)
    with torch.device("meta"):
        model = InstructBlipForConditionalGeneration(cfg)
    counts = {}
    for n, p in model.named_parameters(remove_duplicate=True):
        key = "language_model_lm_head_untied" if n.startswith("language_model.lm_head") else n.split(".")[0]
        counts[key] = counts.get(key, 0) + p.numel()
    with open(os.path.join(d, "param_counts.json"), "w") as f:
        json.dump({"transformers": transformers.__version__, "counts": counts}, f, indent=2)
    print(counts)


def main():
    q_words = ["what is the color of the circle", "how many shapes"]
    prompts = ["question: what is the color of the circle short answer:", "question: how many shapes short answer:"]
    # A: InstructBLIP, cross-attention every 2nd layer, gated exact-erf GELU, untied-config T5, odd sizes.
    make(
        "instructblip-t5-a",
        "instructblip",
        InstructBlipVisionConfig(hidden_size=24, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=32, patch_size=8, qkv_bias=True),
        InstructBlipQFormerConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                  intermediate_size=48, cross_attention_frequency=2, encoder_hidden_size=24,
                                  max_position_embeddings=64),
        T5Config(vocab_size=60, d_model=40, d_kv=8, num_heads=4, d_ff=56, num_layers=2, num_decoder_layers=2,
                 feed_forward_proj="gated-gelu", dense_act_fn="gelu", tie_word_embeddings=False,
                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, bos_token_id=1),
        num_query=4, batch=2, prompts=prompts, qprompts=q_words, pad_prompts=True, shards=1, hub_layout=False,
        seed=1,
    )
    # B: cross-attention in every layer, plain ReLU FFN, tied embeddings with output scaling, hub qkv-bias
    # layout, two shards, one image.
    make(
        "instructblip-t5-b",
        "instructblip",
        InstructBlipVisionConfig(hidden_size=30, intermediate_size=41, num_hidden_layers=3, num_attention_heads=3,
                                 image_size=28, patch_size=7, qkv_bias=True, layer_norm_eps=1e-5),
        InstructBlipQFormerConfig(vocab_size=52, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=35, cross_attention_frequency=1, encoder_hidden_size=30,
                                  max_position_embeddings=40),
        T5Config(vocab_size=64, d_model=36, d_kv=10, num_heads=3, d_ff=44, num_layers=3, num_decoder_layers=3,
                 feed_forward_proj="relu", relative_attention_num_buckets=16, relative_attention_max_distance=20,
                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, bos_token_id=1),
        num_query=3, batch=1, prompts=prompts[:1], qprompts=q_words[:1], pad_prompts=False, shards=2,
        hub_layout=True, seed=2,
    )
    # C: BLIP-2 (Q-Former without instruction text) with a gated-silu T5.
    make(
        "blip2-t5",
        "blip2",
        Blip2VisionConfig(hidden_size=24, intermediate_size=33, num_hidden_layers=2, num_attention_heads=4,
                          image_size=32, patch_size=8, qkv_bias=True),
        Blip2QFormerConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=40, cross_attention_frequency=2, encoder_hidden_size=24,
                           max_position_embeddings=64, use_qformer_text_input=False),
        T5Config(vocab_size=60, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2, num_decoder_layers=2,
                 feed_forward_proj="gated-silu", tie_word_embeddings=False, decoder_start_token_id=0,
                 pad_token_id=0, eos_token_id=1, bos_token_id=1),
        num_query=4, batch=2, prompts=prompts, qprompts=q_words, pad_prompts=True, shards=1, hub_layout=False,
        seed=3,
    )
    # F: untied T5 as a fine-tuned FlanT5 checkpoint stores it: `shared`, `encoder.embed_tokens`,
    # `decoder.embed_tokens` and `lm_head` four different tensors, `tie_word_embeddings: false`;
    # gated-gelu without `dense_act_fn` (the tanh GELU, as FlanT5), right-padded batch of two.
    # Written with transformers 5.25.0 / torch 2.15.0 (reference.json records the versions):
    # T5Config forces `tie_word_embeddings` true, but `from_pretrained` keeps the four tensors
    # apart because the file stores them with different values (`reload_untied` checks it).
    make(
        "instructblip-t5-untied",
        "instructblip",
        InstructBlipVisionConfig(hidden_size=24, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=32, patch_size=8, qkv_bias=True),
        InstructBlipQFormerConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, cross_attention_frequency=2, encoder_hidden_size=24,
                                  max_position_embeddings=64),
        T5Config(vocab_size=60, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2, num_decoder_layers=2,
                 feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
                 pad_token_id=0, eos_token_id=1, bos_token_id=1),
        num_query=4, batch=2, prompts=prompts, qprompts=q_words, pad_prompts=True, shards=1, hub_layout=False,
        seed=6, untie=True,
    )
    llama_prompts = ["what is the color of the circle short answer:", "how many shapes answer:"]
    # D: LLaMA with grouped-query attention (4 query heads, 2 key/value heads), theta 5e5,
    # untied lm_head, left-padded batch of two.
    make_llama(
        "instructblip-llama-gqa",
        InstructBlipVisionConfig(hidden_size=24, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=32, patch_size=8, qkv_bias=True),
        InstructBlipQFormerConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, cross_attention_frequency=2, encoder_hidden_size=24,
                                  max_position_embeddings=64),
        LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=44, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0),
        num_query=4, prompts=llama_prompts, qprompts=q_words, seed=4,
    )
    # E: LLaMA without grouped-query attention (3 heads of 12), default theta, tied lm_head.
    make_llama(
        "instructblip-llama-mha",
        InstructBlipVisionConfig(hidden_size=30, intermediate_size=41, num_hidden_layers=2, num_attention_heads=3,
                                 image_size=28, patch_size=7, qkv_bias=True),
        InstructBlipQFormerConfig(vocab_size=52, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=35, cross_attention_frequency=1, encoder_hidden_size=30,
                                  max_position_embeddings=40),
        LlamaConfig(vocab_size=64, hidden_size=36, intermediate_size=50, num_hidden_layers=3, num_attention_heads=3,
                    num_key_value_heads=3, rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=1,
                    eos_token_id=2, pad_token_id=0),
        num_query=3, prompts=llama_prompts[::-1], qprompts=q_words[::-1], seed=5,
    )
    if ONLY:
        return
    full_size_counts()
    vicuna_counts()
    relative_buckets()


def relative_buckets():
    """HF's T5 relative-position buckets for distances -300..300 (float32 logarithm included)."""
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-300, 301)
    out = {"relative_position": rel.tolist()}
    for nb, md in [(32, 128), (16, 20), (8, 16)]:
        for bidir in (True, False):
            b = T5Attention._relative_position_bucket(rel, bidirectional=bidir, num_buckets=nb, max_distance=md)
            out[f"{nb}_{md}_{'bidirectional' if bidir else 'causal'}"] = b.tolist()
    with open(os.path.join(OUT, "t5_relative_buckets.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    sys.exit(main())
