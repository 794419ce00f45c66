"""Trains transformers' InstructBLIP (T5 or, with a decoder-only config, LLaMA) from scratch on the shapes world, as `cargo xtask
experiment` does with ressa, and reports VQA accuracy per question type.

An independent check of the toy world (issue #6): is the task learnable by the same
architecture and recipe in PyTorch, and what does the model learn from the image?

    python scripts/train_shapes_torch.py --data DIR --config configs/models/shapes-tiny/config.json

DIR is `cargo xtask shapes --out DIR ...`. Needs torch, transformers, tokenizers, pillow.
Diagnostics: `--only-type color` trains and tests one question type, `--vqa-only` drops the
captions, `--warm-types color --warm-steps 400` trains those types first.

What it showed (2 threads, 1500-8000 images, lr 1e-3): at 32×32 pixels (patch 8) the model
stays at the blind baseline on mixed data (colour 0.19, chance 0.17) though colour-only
training on one-shape images reaches 0.99; at 64×64 pixels with patch 8 and 8000 images it
reads the images (4000 steps: VQA 53 %, colour 0.69, size 0.80, count 0.62).

Issue #18 (configs/models/shapes-paper, 48×48 images in 16-pixel patches, 8000 images, batch
32): with initializer_range 0.02 the model stays at the blind level (39 % after 1500 steps);
`--init-range 0.1 --query-init-std 0.1` (ressa's init for that config: query tokens N(0, σ²)
as LAVIS, where transformers 5 writes zeros) and lr 1e-3 reach 64.8 % at 3000 steps (colour
0.73, count 0.83, yes/no 0.89, size 0.85; shape 0.30 and position 0.06: shapes not yet
recognised). lr 4e-3 learns nothing in 1000 steps.

Why position is not learned (stop 25; `--only-type position`, lr 1e-3, 2 threads, test
questions of that type): with the config's σ = 0.1 the ViT's position embeddings are ~50×
smaller than the patch embeddings' output at init (a 768-input conv at σ 0.1 on CLIP-normalised
pixels of ~1.7 gives ~5 per channel), and the model never learns where anything is — 0.117 at
700 steps on all images (chance 0.11), 0.0 at 600 steps on one-shape images (`--single-shape`,
where no binding is needed). `--pos-init-std 5` (position embeddings at the patch embeddings'
scale): 1.0 at 300 steps on one-shape images, 0.553 at 700 on all images; `--pos-init-std 1`:
0.096 at 700 (all images). Neither a 48-wide Q-Former (`hidden_size` 48, position 0.064 at 350)
nor a ViT pretrained on per-patch contents and cells (`--vision-pretrain-steps 600
[--vision-pretrain-cells]`: 97 % patch accuracy; then the mixed recipe: 0.62 at 1500 steps,
position 0.117 / 0.149) helps. In the mixed recipe (all question types and captions) σ = 5
alone gives 0.527 at 1000 steps with position 0.085: learnable alone, not yet in the mix.
With σ = 5 and 400 steps of "where is" questions first (`--warm-types position --warm-steps
400`, then the mix, 1500 steps in all): position 0.468 / 0.553 / 0.489 at 500 / 1000 / 1500
steps, kept in the mix, but colour 0.21 and shape 0.27 (VQA 0.507): not competent yet. The same
for 3000 steps: VQA 0.565, position 0.511, colour 0.298, shape 0.318, count 0.678, size 0.87 —
colour is worse than at σ 0.1 (0.73): position embeddings that large crowd out the content.
σ = 2 with the same curriculum (1500 steps) learns neither: VQA 0.352, position 0.064.

Stop 26 (1 thread each, two runs side by side; test questions of the 100 test images, so
±6 points per type): shape and colour are the types that need binding (find "the red object",
read its shape), and they are learned alone but not in the mix. `--only-type shape`: 0.33 /
0.49 / 0.58 / 0.67 at 250 / 500 / 750 / 1000 steps (all images), 0.90 at 1000 on one-shape
images (`--single-shape`, no binding). In the mix a type gets ~1/8 of the batches, and shape
after 2000 mixed steps (0.21-0.29) is where shape-only training is after ~250: the types share
little, so the mix learns each at its own dilute pace. Neither of these changes that (1500
steps unless said): no captions (`--vqa-only`: 0.45 at 1000, shape 0.32); 16 query tokens
instead of 8 (0.55, shape 0.33); a 600-step warm-up on one-shape images (`--warm-single`:
0.47 at 1000; with σ 5: 0.55); the per-patch ViT pretraining with cells plus the "where is"
warm-up (σ 0.1: 0.59 at 2000, shape 0.21, position 0.09; σ 5: position 0.57 but colour 0.16);
σ 5 position embeddings in 16 channels and the patch embedding in the other 32
(`--pos-channels 16`: position 0.11 after the 400 warm-up steps, where all-channel σ 5 has
0.47 — position is learned only when it dominates the token). Nor is it memorisation: with
40 000 training images (`xtask shapes --train 40000`, `--one-caption`, no image seen twice in
3000 steps) σ 0.1 gives VQA 0.648, shape 0.274, colour 0.69, position 0.08 (8000 images: 0.648,
0.30, 0.73, 0.06) and σ 5 with the "where is" warm-up 0.578, shape 0.22, colour 0.25, position
0.65 (8000: 0.565, 0.32, 0.30, 0.51). A 12 000-step cosine run (σ 0.1, 8000 images) stood at
0.575 / 0.623 after 2000 / 4000 steps, shape 0.23 / 0.30.
Binding-first curricula (1500 steps, `--warm-steps 600` then the mix): `--warm-types
shape,color` (σ 0.1) gives colour 0.75 but shape 0.33 after the warm-up and VQA 0.578 at the end
(shape 0.26, position 0.09); with σ 5 and `--warm-types position,shape,color` VQA 0.603,
position 0.53, colour 0.53, shape 0.29 — the best balance of position and colour so far at 1500
steps (position warm-up alone: 0.507, colour 0.21), shape still at chance.

Stop 27 (300 test images, ~1800 questions, so ±2-4 points per type; 1 thread each): the ViT
is what does not learn in the mix. A 48-wide Q-Former changes nothing (1500 steps: 0.60, shape
0.26), but training the ViT first on what each patch holds and which cell it is
(`--vision-pretrain-steps N --vision-pretrain-cells`, patch accuracy 0.97 / 0.98 / 0.995 at
600 / 1000 / 2000 steps) and keeping it frozen afterwards (`--freeze-vision`, as InstructBLIP
freezes its pretrained EVA ViT) does: 1500 steps 0.717 (shape 0.65); 3000 steps 0.754 (colour
0.75, shape 0.74, count 0.88, yes/no 0.88, position 0.35); 2000 vision steps then 6000 steps
0.893: colour 0.959, shape 0.964, count 0.952, yes/no 0.967, size 0.987, position 0.674,
relation 0.475 (chance: comparing two objects' cells is not learned). Without the freeze the
same pretraining is lost in the mix (stop 25: 0.59, shape 0.21). A position/shape/colour
warm-up (`--warm-types position,shape,color --warm-steps 500`) lifts position early (3000
steps: 0.558 against 0.353) at some cost elsewhere (colour 0.77, shape 0.72). Both together,
2000 vision steps and 6000 steps with the 500-step warm-up: 0.908 (colour 0.914, shape 0.951,
count 0.964, position 0.833, yes/no 0.956, relation 0.582); with 9000 steps (the recipe of
configs/shapes-paper-scratch.toml): 0.934 — colour 0.959, shape 0.960, count 0.956, position
0.921, size 0.978, yes/no 0.978, relation 0.603.

The decoder-only toy (configs/models/shapes-paper-llama: the same ViT and Q-Former, LLaMA 7 x 128,
InstructBLIP-Vicuna-7B's proportions), same recipe and data, 1 thread (1607 s): 0.880 / 0.929 /
0.949 at 3000 / 6000 / 9000 steps; at 9000 colour 0.990, shape 0.960, count 0.944, position
0.953, size 0.996, yes/no 0.976, relation 0.702.
"""

import argparse
import collections
import json
import math
import os
import random
import time

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer
from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

VQA_PROMPT = "Question: {} Short answer:"
CAPTION_PROMPT = "a photo of"


def pre_question(q):
    q = "".join(c for c in q.lower() if c not in '.!"()*#:;~')
    return q.rstrip(" ")


def qtype(q):
    w = q.split()
    if w[0] == "what" and w[1] in ("color", "colour"):
        return "color"
    if w[0] == "what" and w[1] == "shape":
        return "shape"
    if w[0] == "what" and w[1] == "size":
        return "size"
    if w[0] == "how":
        return "count"
    if w[0] == "where":
        return "position"
    if w[0] == "is" and ("left" in w or "right" in w or "above" in w or "below" in w):
        return "relation"
    if w[0] in ("is", "are"):
        return "yes/no"
    return "other"


def load_images(data, split, size, mean, std):
    cache = {}

    def get(rel):
        if rel not in cache:
            im = Image.open(os.path.join(data, "images", rel)).convert("RGB")
            im = im.resize((size, size), Image.BICUBIC)
            a = np.asarray(im, dtype=np.float32) / 255.0
            a = (a - mean) / std
            cache[rel] = torch.from_numpy(a.transpose(2, 0, 1).copy())
        return cache[rel]

    return get


CELLS = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]
SHAPES = ["circle", "square", "triangle", "diamond"]
COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]


def patch_labels(scene, grid):
    """Class of each of the grid×grid patches: 0 empty, else 1 + (shape, colour, size)."""
    lab = [0] * (grid * grid)
    for t in scene["shapes"]:
        c = CELLS.index(t["cell"])
        lab[c] = 1 + (SHAPES.index(t["shape"]) * len(COLORS) + COLORS.index(t["color"])) * 2 + (t["size"] == "large")
    return lab


def pretrain_vision(model, args, cfg, img_train):
    """Stage 0 (as InstructBLIP's ViT comes pretrained): the ViT plus a linear head learns what
    each patch holds (empty or shape × colour × size) from the scene files."""
    grid = cfg.vision_config.image_size // cfg.vision_config.patch_size
    assert grid == 3, "patch labels assume one patch per scene cell"
    scenes = json.load(open(os.path.join(args.data, "annotations", "scenes_train.json")))
    items = [(s["image"], patch_labels(s, grid)) for s in scenes]
    vis = model.vision_model
    head = torch.nn.Linear(cfg.vision_config.hidden_size, 1 + len(SHAPES) * len(COLORS) * 2)
    cell_head = torch.nn.Linear(cfg.vision_config.hidden_size, grid * grid)
    params = list(vis.parameters()) + list(head.parameters()) + list(cell_head.parameters())
    opt = torch.optim.AdamW(params, lr=args.vision_pretrain_lr, weight_decay=args.wd)
    step, t0, losses, accs = 0, time.time(), [], []
    while step < args.vision_pretrain_steps:
        random.shuffle(items)
        for i in range(0, len(items) - args.batch + 1, args.batch):
            b = items[i : i + args.batch]
            pix = torch.stack([img_train(x[0]) for x in b])
            y = torch.tensor([x[1] for x in b])
            h = vis(pixel_values=pix).last_hidden_state[:, 1:]
            logits = head(h)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            if args.vision_pretrain_cells:
                cells = torch.arange(grid * grid).repeat(len(b))
                loss = loss + torch.nn.functional.cross_entropy(cell_head(h).reshape(-1, grid * grid), cells)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            step += 1
            for g in opt.param_groups:
                g["lr"] = args.vision_pretrain_lr * min(1.0, step / 50)
            opt.step()
            losses.append(loss.item())
            accs.append((logits.argmax(-1) == y).float().mean().item())
            if step % 100 == 0:
                print(f"vision step {step} loss {np.mean(losses[-100:]):.3f} patch acc {np.mean(accs[-100:]):.3f} {time.time() - t0:.0f}s", flush=True)
            if step >= args.vision_pretrain_steps:
                break


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--wd", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vqa-only", action="store_true")
    ap.add_argument("--only-type", default=None, help="train and test on one question type")
    ap.add_argument("--warm-types", default=None, help="comma list: train only these question types first")
    ap.add_argument("--warm-steps", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--query-init-std", type=float, default=None, help="query tokens ~ N(0, std) (LAVIS) instead of transformers' zeros")
    ap.add_argument("--init-range", type=float, default=None, help="override initializer_range (vision, Q-Former, top level)")
    ap.add_argument("--vision-pretrain-steps", type=int, default=0, help="first train the ViT alone to classify each patch's contents (scene labels)")
    ap.add_argument("--vision-pretrain-lr", type=float, default=1e-3)
    ap.add_argument("--vision-pretrain-cells", action="store_true", help="the stage-0 head also names each patch's cell")
    ap.add_argument("--pos-init-std", type=float, default=None, help="ViT position embeddings ~ N(0, std²)")
    ap.add_argument("--single-shape", action="store_true", help="only images with one shape (train and test)")
    ap.add_argument("--pos-channels", type=int, default=None, help="position embeddings only in the first K channels, the patch embedding only in the others")
    ap.add_argument("--one-caption", action="store_true", help="train on the first caption of each image only")
    ap.add_argument("--freeze-vision", action="store_true", help="the ViT is frozen in the main training (after --vision-pretrain-steps, as InstructBLIP freezes its pretrained ViT)")
    ap.add_argument("--warm-single", action="store_true", help="the warm-up steps train on one-shape images only (all types, or --warm-types)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    cfg = InstructBlipConfig.from_pretrained(os.path.dirname(os.path.abspath(args.config)))
    if args.init_range is not None:
        cfg.initializer_range = cfg.vision_config.initializer_range = cfg.qformer_config.initializer_range = args.init_range
    model = InstructBlipForConditionalGeneration(cfg)
    if args.pos_init_std is not None:
        with torch.no_grad():
            model.vision_model.embeddings.position_embedding.normal_(0.0, args.pos_init_std)
    if args.pos_channels is not None:
        k = args.pos_channels
        with torch.no_grad():
            e = model.vision_model.embeddings
            e.position_embedding[..., k:] = 0.0
            e.patch_embedding.weight[:k] = 0.0
            e.patch_embedding.bias[:k] = 0.0
    if args.query_init_std is not None:
        with torch.no_grad():
            model.query_tokens.normal_(0.0, args.query_init_std)
    pp = json.load(open(os.path.join(args.data, "preprocessor_config.json")))
    mean = np.array(pp["image_mean"], dtype=np.float32)
    std = np.array(pp["image_std"], dtype=np.float32)
    size = cfg.vision_config.image_size
    tok = Tokenizer.from_file(os.path.join(args.data, "tokenizer.json"))
    qtok = Tokenizer.from_file(os.path.join(args.data, "qformer_tokenizer", "tokenizer.json"))
    nq = cfg.num_query_tokens
    image_token = cfg.image_token_index

    ann = os.path.join(args.data, "annotations")
    single = set()
    for split in ("train", "test"):
        for sc in json.load(open(os.path.join(ann, f"scenes_{split}.json"))):
            if len(sc["shapes"]) == 1:
                single.add(sc["image"])
    keep = (lambda im: im in single) if args.single_shape else (lambda im: True)
    train = []
    for it in json.load(open(os.path.join(ann, "vqa_train.json"))):
        if args.only_type and qtype(pre_question(it["question"])) != args.only_type:
            continue
        if not keep(it["image"]):
            continue
        train.append((it["image"], VQA_PROMPT.format(pre_question(it["question"])), it["answer"][0], qtype(pre_question(it["question"]))))
    if not (args.vqa_only or args.only_type):
        seen = set()
        for it in json.load(open(os.path.join(ann, "caption_train.json"))):
            if args.one_caption and it["image"] in seen:
                continue
            seen.add(it["image"])
            train.append((it["image"], CAPTION_PROMPT, it["caption"].lower(), "caption"))
    test = [
        (it["image"], VQA_PROMPT.format(pre_question(it["question"])), it["answer"][0], qtype(pre_question(it["question"])))
        for it in json.load(open(os.path.join(ann, "vqa_test.json")))
        if (not args.only_type or qtype(pre_question(it["question"])) == args.only_type) and keep(it["image"])
    ]
    img_train = load_images(args.data, "train", size, mean, std)

    def encode(batch, with_target=True):
        pix = torch.stack([img_train(b[0]) for b in batch])
        ids = [[image_token] * nq + tok.encode(b[1]).ids for b in batch]
        qids = [qtok.encode(b[1]).ids for b in batch]
        L = max(map(len, ids))
        Q = max(map(len, qids))
        input_ids = torch.tensor([x + [0] * (L - len(x)) for x in ids])
        attn = torch.tensor([[1] * len(x) + [0] * (L - len(x)) for x in ids])
        qf = torch.tensor([x + [0] * (Q - len(x)) for x in qids])
        qattn = torch.tensor([[1] * len(x) + [0] * (Q - len(x)) for x in qids])
        out = dict(pixel_values=pix, input_ids=input_ids, attention_mask=attn, qformer_input_ids=qf, qformer_attention_mask=qattn)
        if with_target:
            tg = [tok.encode(b[2]).ids for b in batch]
            T = max(map(len, tg))
            out["labels"] = torch.tensor([x + [-100] * (T - len(x)) for x in tg])
        return out

    def encode_decoder_only(batch, with_target=True):
        # One sequence per row: image tokens, prompt, then (training) the target, as ressa's
        # LLaMA path builds it; labels cover the whole row (transformers shifts them), -100 but
        # on the target. Training rows are padded on the right, generation rows on the left.
        pix = torch.stack([img_train(b[0]) for b in batch])
        ids = [[image_token] * nq + tok.encode(b[1]).ids for b in batch]
        qids = [qtok.encode(b[1]).ids for b in batch]
        labels = [[-100] * len(x) for x in ids]
        if with_target:
            for x, y, b in zip(ids, labels, batch):
                t = tok.encode(b[2]).ids
                x.extend(t)
                y.extend(t)
        L = max(map(len, ids))
        Q = max(map(len, qids))

        def pad(x, v):
            return x + [v] * (L - len(x)) if with_target else [v] * (L - len(x)) + x

        out = dict(
            pixel_values=pix,
            input_ids=torch.tensor([pad(x, 0) for x in ids]),
            attention_mask=torch.tensor([pad([1] * len(x), 0) for x in ids]),
            qformer_input_ids=torch.tensor([x + [0] * (Q - len(x)) for x in qids]),
            qformer_attention_mask=torch.tensor([[1] * len(x) + [0] * (Q - len(x)) for x in qids]),
        )
        if with_target:
            out["labels"] = torch.tensor([pad(y, -100) for y in labels])
        return out

    if cfg.use_decoder_only_language_model:
        encode = encode_decoder_only

    if args.vision_pretrain_steps:
        pretrain_vision(model, args, cfg, img_train)

    if args.freeze_vision:
        for p in model.vision_model.parameters():
            p.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.wd)

    def lr_at(step):
        if step <= args.warmup:
            return args.lr * step / max(1, args.warmup)
        p = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * 0.5 * (1 + math.cos(math.pi * p))

    def evaluate():
        model.eval()
        by = collections.defaultdict(lambda: [0, 0])
        with torch.no_grad():
            for i in range(0, len(test), 100):
                chunk = test[i : i + 100]
                enc = encode([(c[0], c[1], c[2]) for c in chunk], with_target=False)
                gen = model.generate(**enc, max_new_tokens=3, num_beams=1, do_sample=False)
                if cfg.use_decoder_only_language_model:
                    gen = gen[:, enc["input_ids"].shape[1] :]  # the prompt comes back first
                for c, g in zip(chunk, gen.tolist()):
                    g = [t for t in g if t > 1]
                    ans = tok.decode(g)
                    by[c[3]][0] += int(ans.strip() == c[2])
                    by[c[3]][1] += 1
        model.train()
        tot = sum(v[0] for v in by.values()) / sum(v[1] for v in by.values())
        return tot, {k: round(v[0] / v[1], 3) for k, v in sorted(by.items())}

    model.train()
    step = 0
    t0 = time.time()
    losses = []
    warm = [
        i
        for i, t in enumerate(train)
        if (not args.warm_types or t[3] in args.warm_types.split(","))
        and (not args.warm_single or t[0] in single)
    ]
    while step < args.steps:
        order = list(range(len(train))) if step >= args.warm_steps else list(warm)
        random.shuffle(order)
        for i in range(0, len(order) - args.batch + 1, args.batch):
            batch = [train[j] for j in order[i : i + args.batch]]
            enc = encode(batch)
            loss = model(**enc).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            step += 1
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            opt.step()
            losses.append(loss.item())
            if step % 100 == 0:
                print(f"step {step} loss {np.mean(losses[-100:]):.3f} {time.time() - t0:.0f}s", flush=True)
            if args.eval_every and step % args.eval_every == 0:
                print("  eval", evaluate(), flush=True)
            if step >= args.steps or step == args.warm_steps:
                break
    print("final", evaluate(), f"{time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
