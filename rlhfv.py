"""The miniature RLHF-V: the paper's whole loop on the synthetic world of world.py, offline.

    python train.py                  # runs this (stage rlhfv), every stage cached under --out_dir
    python train.py --ablation       # + vanilla DPO (gamma 1) and SFT on the corrected answers
    python -m pytest tests/test_rlhfv.py

world + tokenizer -> the tower learns to see (BEiT-3's pre-training, in miniature) -> SFT on noisy
captions (the reference model) -> its answers on new scenes, corrected segment by segment -> DDPO
(and the ablation arms) -> evaluation on held-out scenes -> table, results.json, report.png. The
training stages are calls into train.py (train, autocast) and sample.py.
"""
import itertools
import json
import os
import random
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

import world
from data import SYSTEM, Tokenizer, image_tensor, load_image, train_tokenizer
from model import Muffin, atomic_write, sized
from sample import PRESETS, generate
from train import TrainConfig, autocast, train


def run(cfg):
    """Every stage of the module docstring, each skipped when its output is already on disk."""
    out, wdir = cfg.out_dir, os.path.join(cfg.out_dir, "world")
    n_sft = cfg.n_train // 2  # the first half teaches (SFT), the second is described and corrected
    train_scenes, test_scenes = world.make_world(cfg.seed, cfg.n_train, cfg.n_test)
    tok_file = os.path.join(wdir, "tokenizer.model")
    if not os.path.exists(tok_file):
        build_world(cfg, wdir, train_scenes[:n_sft], train_scenes, test_scenes)
    tok = Tokenizer(tok_file)
    stage = lambda name, **kw: TrainConfig(**{**asdict(cfg), "resume": True, "out_dir": os.path.join(out, name),
                                              "freeze_vision": True, **kw})
    vision_dir, sft_dir = os.path.join(out, "vision"), os.path.join(out, "sft")
    if not finished(vision_dir):
        pretrain_vision(cfg, tok, train_scenes[:n_sft], vision_dir)
    if not finished(sft_dir):
        train(stage("sft", data=os.path.join(wdir, "sft.jsonl"), tokenizer=tok_file, init=vision_dir,
                    steps=cfg.sft_steps, lr=cfg.sft_lr, max_len=512), "sft")
    pairs = os.path.join(out, "collect", "pairs.jsonl")
    if not os.path.exists(pairs):
        collect(cfg, tok, sft_dir, train_scenes[n_sft:], n_sft, pairs)
    arms = {"ddpo" if cfg.gamma != 1 else "dpo": ("ddpo", pairs, cfg.gamma)}
    if cfg.ablation:
        arms.update(dpo=("ddpo", pairs, 1.0), sft_corrected=("sft", pairs[:-6] + "_sft.jsonl", cfg.gamma))
    for name, (kind, data, gamma) in arms.items():
        if not finished(os.path.join(out, name)):
            train(stage(name, data=data, init=sft_dir, gamma=gamma, max_len=512,
                        ref_cache=os.path.join(out, "collect", "ref_logps.safetensors")), kind)
    results = {name: evaluate(cfg, tok, os.path.join(out, name), test_scenes)
               for name in ["sft", *arms]}
    report(cfg, results, arms)


def finished(run_dir):
    return os.path.exists(os.path.join(run_dir, "config.json"))


def build_world(cfg, wdir, sft_scenes, train_scenes, test_scenes):
    """Images of every scene, the SFT data (fresh caption noise for each pass over the scenes) and a
    SentencePiece tokenizer trained on all the text the models will meet."""
    os.makedirs(os.path.join(wdir, "images"), exist_ok=True)
    for split, scenes in (("train", train_scenes), ("test", test_scenes)):
        for i, scene in enumerate(scenes):
            world.render(scene, cfg.image_size).save(os.path.join(wdir, "images", f"{split}{i}.png"))
    rng = random.Random(cfg.seed)
    passes = -(-cfg.sft_steps * cfg.batch_size // len(sft_scenes))
    rows = [ex for _ in range(passes) for ex in world.sft_examples(sft_scenes, rng)]
    write_jsonl(os.path.join(wdir, "sft.jsonl"),
                [{"image": f"images/train{i}.png", "question": q, "answer": a} for i, q, a in rows])
    # whole prompts, so that the template merges into few tokens; the system prompt is one piece
    # (a third of every row's tokens otherwise, paid at every step)
    text = [f"{SYSTEM}\n\n### Human: \n{q}\n### Assistant: {a}\n###" for _, q, a in rows[:20000]]
    train_tokenizer(text + world.corpus(train_scenes, rng), os.path.join(wdir, "tokenizer.model"),
                    sized(cfg.model).llm.vocab_size - 4, symbols=["\u2581" + SYSTEM.replace(" ", "\u2581")])


def pretrain_vision(cfg, tok, scenes, path, batch=64):
    """Muffin starts from a pre-trained BEiT-3; ours starts from nothing, and trained through the
    queries by captions alone it learns to see far slower than the decoder learns the captions'
    prior (the SFT model then describes the scene it expects, not the one it sees). So the tower and
    its queries first learn the scenes directly: query i says what is in cell i of the grid (empty,
    or one shape x colour x size) and which cell it is looking at, through a linear head that is
    then dropped. The decoder stays fresh; the whole model is saved for SFT to start from, and the
    tower and queries stay frozen from then on (trained on, the tower is scrambled by the fresh
    decoder's early gradients: SFT loss 0.42 after 1,000 steps, against 0.36 after 600 frozen;
    frozen queries spare SFT the backward pass through the tower, 0.37 against 0.39 s a step)."""
    torch.manual_seed(cfg.seed)
    model = Muffin(sized(cfg.model, tok.vocab_size, tok.im_patch_id)).init_weights().to(cfg.device)
    tower, query, size = model.model.vision_tower.beit3, model.model.query, cfg.image_size
    cells, kinds = scenes[0].grid ** 2, list(itertools.product(world.SHAPES, world.COLOURS, world.SIZES))
    if len(query) < cells or model.config.vision.img_size != size:
        raise ValueError(f"--model={cfg.model}: needs >= {cells} queries and {size} px images")
    images = torch.stack([image_tensor(world.render(s, size), size) for s in scenes]).to(cfg.device)
    labels = torch.zeros(len(scenes), cells, dtype=torch.long)
    for i, s in enumerate(scenes):
        for o in s.objects:
            labels[i, o.row * s.grid + o.col] = 1 + kinds.index((o.shape, o.colour, o.size))
    labels = labels.to(cfg.device)
    head = nn.Linear(query.shape[1], 1 + len(kinds) + cells).to(cfg.device)  # what | where
    where = torch.arange(cells, device=cfg.device).repeat(batch)
    opt = torch.optim.AdamW([*tower.parameters(), query, *head.parameters()], lr=cfg.vision_lr)
    g = torch.Generator().manual_seed(cfg.seed)
    for step in range(1, cfg.vision_steps + 1):
        idx = torch.randint(len(scenes), (batch,), generator=g).to(cfg.device)
        what = labels[idx].flatten()
        with autocast(cfg.device):
            h = tower(images[idx], extra=query.expand(batch, -1, -1))[:, -len(query):][:, :cells]
            logits = head(h).float().flatten(0, 1)
        loss = F.cross_entropy(logits[:, :-cells], what) + F.cross_entropy(logits[:, -cells:], where)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == cfg.vision_steps:
            acc = (logits[:, :-cells].argmax(-1) == what).float().mean().item()  # a sync per 100 steps
            print(f"vision {step}/{cfg.vision_steps} loss {loss.item():.4f} cells right {100 * acc:.1f}%")
    model.save_pretrained(path)


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


def describe_all(model_dir, tok, image_paths, prompts, cfg, **decoding):
    """Answers of a checkpoint, one per (image, prompt), in batches of 250: greedy, or with the
    options of sample.decode in `decoding` (num_beams, repetition_penalty, ...)."""
    model = Muffin.from_pretrained(model_dir).to(cfg.device).eval()
    size, answers = model.config.vision.img_size, []
    for i in range(0, len(prompts), 250):
        images = torch.stack([image_tensor(load_image(p), size) for p in image_paths[i:i + 250]])
        with autocast(cfg.device):
            answers += generate(model, tok, images.to(cfg.device), prompts[i:i + 250], max_new_tokens=96,
                                **decoding)
    return answers


def collect(cfg, tok, sft_dir, scenes, offset, path):
    """The SFT model describes new training scenes; the annotator corrects each answer that has a
    hallucination (chosen = corrected, rejected = original); answers without one are dropped."""
    prompts = [world.DESCRIBE_PROMPTS[i % len(world.DESCRIBE_PROMPTS)] for i in range(len(scenes))]
    images = [f"images/train{offset + i}.png" for i in range(len(scenes))]
    wdir = os.path.join(cfg.out_dir, "world")
    answers = describe_all(sft_dir, tok, [os.path.join(wdir, p) for p in images], prompts, cfg)
    pairs = [{"image": f"../world/{images[i]}", "question": prompts[i], "chosen": fixed, "rejected": a}
             for i, a in enumerate(answers) if (fixed := world.correct(scenes[i], a)) is not None]
    print(f"collect: {len(pairs)} of {len(scenes)} answers had a hallucination and were corrected")
    write_jsonl(path, pairs)
    write_jsonl(path[:-6] + "_sft.jsonl", [{**p, "answer": p["chosen"]} for p in pairs])


def evaluate(cfg, tok, model_dir, scenes):
    """Describe every held-out scene once (greedy, or as RLHF-V's evaluation decoded with
    --paper_decoding) and score the answers; cached in eval.json (eval_paper_decoding.json)."""
    path = os.path.join(model_dir, "eval_paper_decoding.json" if cfg.paper_decoding else "eval.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)["scores"]
    prompts = [world.DESCRIBE_PROMPTS[i % len(world.DESCRIBE_PROMPTS)] for i in range(len(scenes))]
    images = [os.path.join(cfg.out_dir, "world", "images", f"test{i}.png") for i in range(len(scenes))]
    # the paper's beams and repetition penalty; its 1,024 tokens and prompt belong to the real model
    paper = {k: PRESETS["rlhfv"][k] for k in ("num_beams", "repetition_penalty")}
    decoding = paper if cfg.paper_decoding else {}
    answers = describe_all(model_dir, tok, images, prompts, cfg, **decoding)
    scores = world.score(scenes, answers)
    atomic_write(path, json.dumps({"scores": scores, "answers": answers}, indent=1))
    return scores


def report(cfg, results, arms):
    """Print the table, write results.json and draw report.png (curves of the first DDPO arm)."""
    cols = ("response_rate", "mention_rate", "object", "attribute", "count", "relation", "coverage")
    print(f"\n{'model':<14}" + "".join(f"{c.replace('_rate', ''):>11}" for c in cols) + f"{'resp. vs sft':>14}")
    for name, r in results.items():
        change = (r["response_rate"] / results["sft"]["response_rate"] - 1) if results["sft"]["response_rate"] else 0
        print(f"{name:<14}" + "".join(f"{100 * r[c]:>10.1f}%" for c in cols)
              + (f"{100 * change:>+13.1f}%" if name != "sft" else ""))
    atomic_write(os.path.join(cfg.out_dir, "results.json"), json.dumps(results, indent=2))
    curves = {}
    for name, key in (("sft", "loss"), (next(iter(arms)), "loss"), (next(iter(arms)), "rewards/margins"),
                      (next(iter(arms)), "rewards/accuracies")):
        with open(os.path.join(cfg.out_dir, name, "log.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        curves[f"{name} {key.split('/')[-1]}"] = [(r["step"], r[key]) for r in rows if key in r]
    world.draw_report(os.path.join(cfg.out_dir, "report.png"), curves, results)
    print(f"\nwrote {cfg.out_dir}/results.json and {cfg.out_dir}/report.png")
