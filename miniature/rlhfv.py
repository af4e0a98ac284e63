"""The miniature RLHF-V: the paper's whole loop on the synthetic world of world.py, offline.

    python train.py                  # runs this (stage rlhfv), every stage cached under --out_dir
    python train.py --ablation       # + vanilla DPO (gamma 1) and SFT on the corrected answers
    python train.py --seeds=0,1,2    # each seed in <out_dir>/seed<S>, then a summary over seeds
    python train.py --ranking        # + vanilla DPO on rankings of two sampled answers
    python train.py --scaling=100,300,900 --seeds=0,1,2,3,4 --rounds=1 --steps=100
                                     # corrections against rankings per annotated pair (scaling.md)
    python -m pytest tests/test_rlhfv.py

world + tokenizer -> the tower learns to see (BEiT-3's pre-training, in miniature) -> SFT on noisy
captions -> --rounds times: the latest model's answers on new scenes, corrected segment by segment
-> DDPO from that model, with it as the reference (the ablation arms alike) -> evaluation on
held-out scenes -> report.py: table, results.json, report.png, report.html. The training stages are calls of
train.train, which train.py hands to `run`, and of sample.generate.
"""
import contextlib
import itertools
import json
import os
import random
import time
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
import lora
from miniature import report
from miniature import world
from checkpoint import atomic_write
from data import SYSTEM, Tokenizer, image_tensor, load_image, train_tokenizer
from model import Muffin, autocast, sized
from sample import PRESETS, generate


# The miniature's own values of options whose defaults (TrainConfig's) are the paper's recipe for
# real models: a model of a few million parameters, trained from SFT for minutes, needs a far larger
# rate, and its answers are short enough for summed scores. Kept in step with the "miniature: X" of
# TrainConfig's comments (tests/test_rlhfv.py checks).
MINIATURE = dict(lr=1.5e-5, average=False, steps=200)


def settle(cfg, given=()):
    """cfg with the miniature's values (MINIATURE) for every option not in `given` (the names given
    on the command line: cli.given)."""
    if cfg.lora_vision:
        raise cli.UsageError("--lora_vision: the miniature's tower learns in a stage of its own and is "
                             "frozen in every later one")
    return replace(cfg, **{k: v for k, v in MINIATURE.items() if k not in given})


def run(cfg, train):
    """Every stage of the module docstring, each skipped when its output is already on disk.
    cfg: train.py's TrainConfig; train: train.py's training loop, called with one config a stage."""
    tok, (train_scenes, test_scenes), n_sft, sft_dir = prepare(cfg, train)
    arms = {"ddpo" if cfg.gamma != 1 else "dpo": ("ddpo", cfg.gamma)}
    if cfg.ablation:
        arms.update(dpo=("ddpo", 1.0), sft_corrected=("sft", cfg.gamma))
    if cfg.ranking:
        arms.update(dpo_rankings=("rank", 1.0))
    arms = {name + (f"_n{cfg.n_pairs}" if cfg.n_pairs else ""): arm for name, arm in arms.items()}
    for name, (kind, gamma) in arms.items():
        train_arm(cfg, tok, train, name, kind, gamma, sft_dir, train_scenes[n_sft:], n_sft)
    answers = {name: evaluate(cfg, tok, os.path.join(cfg.out_dir, name), test_scenes) for name in ["sft", *arms]}
    report.write(cfg, test_scenes, answers)
    return test_scenes, answers


def prepare(cfg, train):
    """The stages every arm starts from: world + tokenizer, the tower, SFT.
    -> (tokenizer, (train scenes, test scenes), number of SFT scenes, the SFT model's dir)"""
    if not 1 <= cfg.rounds <= cfg.steps:
        raise cli.UsageError(f"--rounds={cfg.rounds}: must be at least 1 and at most --steps={cfg.steps}")
    out, wdir = cfg.out_dir, os.path.join(cfg.out_dir, "world")
    n_sft = cfg.n_train // 2  # the first half teaches (SFT), the second is described and corrected
    train_scenes, test_scenes = world.make_world(cfg.seed, cfg.n_train, cfg.n_test)
    tok_file = os.path.join(wdir, "tokenizer.model")
    if not os.path.exists(tok_file):
        with timed(out, "world"):
            build_world(cfg, wdir, train_scenes[:n_sft], train_scenes, test_scenes)
    tok = Tokenizer(tok_file)
    vision_dir, sft_dir = os.path.join(out, "vision"), os.path.join(out, "sft")
    if not finished(vision_dir):
        with timed(out, "vision"):
            pretrain_vision(cfg, tok, train_scenes[:n_sft], train_scenes[n_sft:n_sft + 250], vision_dir)
    if not finished(sft_dir):
        with timed(out, "sft"):
            train(stage_config(cfg, "sft", stage="sft", data=os.path.join(wdir, "sft.jsonl"),
                               tokenizer=tok_file, init=vision_dir, steps=cfg.sft_steps, lr=cfg.sft_lr,
                               max_len=512, lora_rank=0))  # a fresh decoder: all of it learns
    return tok, (train_scenes, test_scenes), n_sft, sft_dir


def stage_config(cfg, name, **kw):
    """A stage's training config: its own out dir, resumed where it stopped, the tower frozen."""
    return replace(cfg, resume=True, out_dir=os.path.join(cfg.out_dir, name), freeze_vision=True, **kw)


def train_arm(cfg, tok, train, name, kind, gamma, sft_dir, scenes, offset):
    """cfg.rounds on-policy rounds of one arm (RLHF-V's loop of collecting and correcting answers,
    run again on the improved model): each round's model describes `scenes`, its hallucinated answers
    are corrected, and the next model trains cfg.steps // cfg.rounds steps on them from it, with it as
    the reference. Round 1 starts from SFT, whose collection (<out_dir>/collect; the ranking arm's
    kind "rank": collect_rankings) the arms share; round r > 1 collects into
    collect_<name>_round<r>; the last round's model is <out_dir>/<name>, the earlier ones
    <name>_round<r>. With --n_pairs each round trains on that many of its pairs (`capped`)."""
    model, first = sft_dir, "collect_rankings" if kind == "rank" else "collect"
    for r in range(1, cfg.rounds + 1):
        data_dir = os.path.join(cfg.out_dir, first if r == 1 else f"collect_{name}_round{r}")
        if not os.path.exists(os.path.join(data_dir, "pairs.jsonl")):
            with timed(cfg.out_dir, os.path.basename(data_dir)):
                (collect_rankings if kind == "rank" else collect)(cfg, tok, model, scenes, offset, data_dir)
        stage = name if r == cfg.rounds else f"{name}_round{r}"
        if not finished(os.path.join(cfg.out_dir, stage)):
            with timed(cfg.out_dir, stage):
                data, ref = capped(cfg, data_dir, "pairs_sft" if kind == "sft" else "pairs")
                lr = cfg.rank_lr or cfg.lr if kind == "rank" else cfg.lr
                train(stage_config(cfg, stage, stage="sft" if kind == "sft" else "ddpo", data=data, init=model,
                                   gamma=gamma, lr=lr, steps=cfg.steps // cfg.rounds, max_len=512, ref_cache=ref))
        model = os.path.join(cfg.out_dir, stage)


def sweep(cfg, train):
    """`run` once per seed of --seeds, each in <out_dir>/seed<S> (its stages cached as usual), then
    the summary over seeds: sweep.json, sweep.md and report.html in out_dir."""
    runs = {}
    for s in (int(s) for s in cfg.seeds.split(",")):
        runs[s] = run(replace(cfg, seed=s, seeds="", out_dir=os.path.join(cfg.out_dir, f"seed{s}")), train)
    report.write_sweep(cfg, runs)


def scaling(cfg, train):
    """The data claim of RLHF-V: corrected answers against preference rankings, per annotated pair.
    On each seed of --seeds (<out_dir>/seed<S>, the stages before the arms cached as usual), DDPO on
    corrections and vanilla DPO on rankings train on each size of --scaling (nested subsets of
    their round-1 collections, see `capped`; arms <arm>_n<size>), and are evaluated on the held-out
    scenes; then report.write_scaling: scaling.json, scaling.md, scaling.svg and report.html."""
    sizes = [int(n) for n in cfg.scaling.split(",")]
    outcomes, pairs = {}, {}
    for s in (int(s) for s in (cfg.seeds or str(cfg.seed)).split(",")):
        scfg = replace(cfg, seed=s, seeds="", scaling="", out_dir=os.path.join(cfg.out_dir, f"seed{s}"))
        tok, (train_scenes, test_scenes), n_sft, sft_dir = prepare(scfg, train)
        outcomes["sft", 0, s] = world.outcomes(test_scenes, evaluate(scfg, tok, sft_dir, test_scenes))
        for n in sizes:
            ncfg = replace(scfg, n_pairs=n)
            for arm, kind, gamma in (("ddpo", "ddpo", cfg.gamma), ("dpo_rankings", "rank", 1.0)):
                name = f"{arm}_n{n}"
                train_arm(ncfg, tok, train, name, kind, gamma, sft_dir, train_scenes[n_sft:], n_sft)
                answers = evaluate(ncfg, tok, os.path.join(scfg.out_dir, name), test_scenes)
                outcomes[arm, n, s] = world.outcomes(test_scenes, answers)
                data = os.path.join(scfg.out_dir, "collect_rankings" if kind == "rank" else "collect")
                with open(capped(ncfg, data, "pairs")[0]) as f:
                    pairs[arm, n, s] = sum(1 for line in f if line.strip())
    return report.write_scaling(cfg, outcomes, pairs)


def nested_subset(n_rows, n, seed):
    """Indices (ascending) of n of n_rows rows, fixed by the seed and nested: the first n of one
    seeded permutation, so the 500 of a collection contain its 250. n 0 or >= n_rows: all."""
    if not n or n >= n_rows:
        return list(range(n_rows))
    order = list(range(n_rows))
    random.Random(seed).shuffle(order)
    return sorted(order[:n])


def capped(cfg, data_dir, name):
    """(<data_dir>/<name>.jsonl, its reference cache), or with --n_pairs the file of that many of
    its rows (nested_subset) and a cache of its own, written once: pairs.jsonl and pairs_sft.jsonl
    keep the same rows."""
    if not cfg.n_pairs:
        return os.path.join(data_dir, name + ".jsonl"), os.path.join(data_dir, "ref_logps.safetensors")
    path = os.path.join(data_dir, f"{name}_n{cfg.n_pairs}.jsonl")
    if not os.path.exists(path):
        with open(os.path.join(data_dir, name + ".jsonl")) as f:
            rows = [line for line in f if line.strip()]
        keep = nested_subset(len(rows), cfg.n_pairs, cfg.seed)
        if len(keep) < cfg.n_pairs:
            print(f"--n_pairs={cfg.n_pairs}: {data_dir} has only {len(rows)} pairs; training on all of them")
        atomic_write(path, "".join(rows[i] for i in keep))
    return path, os.path.join(data_dir, f"ref_logps_n{cfg.n_pairs}.safetensors")


def finished(run_dir):
    return any(os.path.exists(os.path.join(run_dir, f)) for f in ("config.json", "adapter_config.json"))


@contextlib.contextmanager
def timed(out_dir, stage):
    """Records the stage's wall time in <out_dir>/timings.json when it finishes; a stage found
    finished on disk is not run again and keeps the time of the run that made it."""
    t0 = time.time()
    yield
    path = os.path.join(out_dir, "timings.json")
    times = {}
    if os.path.exists(path):
        with open(path) as f:
            times = json.load(f)
    atomic_write(path, json.dumps({**times, stage: round(time.time() - t0, 1)}, indent=1))


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


KINDS = list(itertools.product(world.SHAPES, world.COLOURS, world.SIZES))  # what a cell can hold


def vision_targets(scenes, size):
    """What pretrain_vision teaches each query: images [N, 3, size, size] and [N, cells, 3] holding,
    for cell i of the grid in reading order, what is in it (0 empty, else 1 + its index in KINDS),
    which cell it is (i), and which object of the scene it holds (0 empty, 1 the first, ...)."""
    images = torch.stack([image_tensor(world.render(s, size), size) for s in scenes])
    out = torch.zeros(len(scenes), scenes[0].grid ** 2, 3, dtype=torch.long)
    out[:, :, 1] = torch.arange(scenes[0].grid ** 2)
    for i, s in enumerate(scenes):
        for k, o in enumerate(s.objects):
            out[i, o.row * s.grid + o.col, ::2] = torch.tensor([1 + KINDS.index(o[:3]), 1 + k])
    return images, out


def pretrain_vision(cfg, tok, scenes, check, path, batch=64):
    """Muffin starts from a pre-trained BEiT-3; ours starts from nothing, and trained through the
    queries by captions alone it would learn to see far slower than the decoder learns the
    captions' prior (the SFT model would describe the scene it expects, not the one it sees). So the
    tower and its queries first learn the scenes directly, through a linear head that is then
    dropped: query i says what is in cell i of the grid (empty, or one shape x colour x size), which
    cell it is looking at, and which object of the scene it is in reading order. The last spares the
    decoder a search it does unreliably: describing its k-th object, it looks the object up by
    number instead of finding the next occupied cell, where it would mix two objects of one colour.
    Without a warm-up, clipping and Adam's shorter second-moment memory (beta2 0.95), its loss
    spikes and on some seeds it has not learnt to see after vision_steps. How long it takes still
    varies with the seed, so it is checked every 100 steps on scenes it never trains on, stops once
    it reads them right, and keeps its best check (at most vision_steps). The decoder stays fresh;
    the whole model is saved for SFT to start from, which keeps the tower and queries frozen (a fresh
    decoder's early gradients would scramble what the tower learnt, and frozen queries spare SFT the
    backward pass through the tower)."""
    torch.manual_seed(cfg.seed)
    model = Muffin(sized(cfg.model, tok.vocab_size, tok.im_patch_id)).init_weights().to(cfg.device)
    tower, query, size = model.model.vision_tower.beit3, model.model.query, cfg.image_size
    cells = scenes[0].grid ** 2
    if len(query) < cells or model.config.vision.img_size != size:
        raise ValueError(f"--model={cfg.model}: needs >= {cells} queries and {size} px images")
    n_what, n_rank = 1 + len(KINDS), 1 + max(len(s.objects) for s in scenes + check)
    head = nn.Linear(query.shape[1], n_what + cells + n_rank).to(cfg.device)

    def logits(images):  # [N, cells, what | where | rank]
        with autocast(cfg.device):
            h = tower(images, extra=query.expand(len(images), -1, -1))[:, -len(query):][:, :cells]
            return head(h).float().split([n_what, cells, n_rank], -1)

    images, labels = (t.to(cfg.device) for t in vision_targets(scenes, size))
    check_images, check_labels = (t.to(cfg.device) for t in vision_targets(check, size))
    params = [*tower.parameters(), query, *head.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.vision_lr, betas=(0.9, 0.95))
    g, best = torch.Generator().manual_seed(cfg.seed), (-1.0, None)
    for step in range(1, cfg.vision_steps + 1):
        for group in opt.param_groups:
            group["lr"] = cfg.vision_lr * min(1.0, step / 100)
        idx = torch.randint(len(scenes), (batch,), generator=g).to(cfg.device)
        loss = sum(F.cross_entropy(z.flatten(0, 1), y.flatten())
                   for z, y in zip(logits(images[idx]), labels[idx].unbind(-1)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == cfg.vision_steps:
            with torch.no_grad():
                what, _, rank = (z.argmax(-1) for z in logits(check_images))
            right = [(what == check_labels[..., 0]).float().mean().item(),
                     (rank == check_labels[..., 2]).float().mean().item()]
            print(f"vision {step}/{cfg.vision_steps} loss {loss.item():.4f} | check scenes: cells "
                  f"{100 * right[0]:.1f}%, object numbers {100 * right[1]:.1f}% right")
            if min(right) > best[0]:
                best = min(right), {k: v.clone() for k, v in model.state_dict().items()}
            if right[0] >= 0.995 and right[1] >= 0.985:  # numbering needs the whole scene
                break
    if best[1] is not None:
        model.load_state_dict(best[1])
    model.save_pretrained(path)


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


def describe_all(model_dir, tok, image_paths, prompts, cfg, **decoding):
    """Answers of a checkpoint, one per (image, prompt), in batches of 250: greedy, or with the
    options of sample.generate_ids in `decoding` (num_beams, repetition_penalty, ...)."""
    model = lora.from_pretrained(model_dir).to(cfg.device).eval()  # an adapter directory: merged
    size, answers = model.config.vision.img_size, []
    for i in range(0, len(prompts), 250):
        images = torch.stack([image_tensor(load_image(p), size) for p in image_paths[i:i + 250]])
        with autocast(cfg.device):
            answers += generate(model, tok, images.to(cfg.device), prompts[i:i + 250], max_new_tokens=96,
                                **decoding)
    return answers


def collect(cfg, tok, model_dir, scenes, offset, data_dir):
    """A model (SFT, or an arm after a round) describes training scenes it never captioned; the
    annotator corrects each answer that has a hallucination (chosen = corrected, rejected = original);
    answers without one are dropped. -> <data_dir>/pairs.jsonl, and pairs_sft.jsonl (the corrected
    answers as SFT rows) for the ablation."""
    prompts = [world.DESCRIBE_PROMPTS[i % len(world.DESCRIBE_PROMPTS)] for i in range(len(scenes))]
    images = [f"images/train{offset + i}.png" for i in range(len(scenes))]
    wdir = os.path.join(cfg.out_dir, "world")
    answers = describe_all(model_dir, tok, [os.path.join(wdir, p) for p in images], prompts, cfg)
    pairs = [{"image": f"../world/{images[i]}", "question": prompts[i], "chosen": fixed, "rejected": a}
             for i, a in enumerate(answers) if (fixed := world.correct(scenes[i], a)) is not None]
    print(f"collect: {len(pairs)} of {len(scenes)} answers had a hallucination and were corrected")
    write_jsonl(os.path.join(data_dir, "pairs_sft.jsonl"), [{**p, "answer": p["chosen"]} for p in pairs])
    write_jsonl(os.path.join(data_dir, "pairs.jsonl"), pairs)  # last: it marks the collection complete


def wrong_claims(scene, answer):
    return sum(not v.ok for v in world.check(scene, answer))


def rank(scene, a, b):
    """The ranking annotator: of two answers, (chosen, rejected) by their number of wrong claims,
    fewer wins; None on a tie (a ranking has no preference there, whatever the errors)."""
    wa, wb = wrong_claims(scene, a), wrong_claims(scene, b)
    return None if wa == wb else (a, b) if wa < wb else (b, a)


def collect_rankings(cfg, tok, model_dir, scenes, offset, data_dir):
    """Preference rankings, as LLaVA-RLHF's annotators give them: the model answers each training
    scene twice, sampled (--rank_temperature, --rank_top_p; greedy would answer the same twice), and
    the answer with fewer wrong claims is chosen (`rank`); ties give no pair. Nothing is corrected,
    so DPO learns from whole answers (gamma 1). -> <data_dir>/pairs.jsonl"""
    prompts = [world.DESCRIBE_PROMPTS[i % len(world.DESCRIBE_PROMPTS)] for i in range(len(scenes))]
    images = [f"images/train{offset + i}.png" for i in range(len(scenes))]
    paths = [os.path.join(cfg.out_dir, "world", p) for p in images]
    torch.manual_seed(cfg.seed)
    answers = describe_all(model_dir, tok, paths * 2, prompts * 2, cfg, temperature=cfg.rank_temperature,
                           top_p=cfg.rank_top_p)
    pairs = []
    for i, (a, b) in enumerate(zip(answers[:len(scenes)], answers[len(scenes):])):
        if (ranked := rank(scenes[i], a, b)) is not None:
            pairs.append({"image": f"../world/{images[i]}", "question": prompts[i], "chosen": ranked[0],
                          "rejected": ranked[1]})
    print(f"collect_rankings: {len(pairs)} of {len(scenes)} answer pairs ranked (the others tied)")
    write_jsonl(os.path.join(data_dir, "pairs.jsonl"), pairs)


def evaluate(cfg, tok, model_dir, scenes):
    """Answers to every held-out scene (greedy, or as RLHF-V's evaluation decoded with
    --paper_decoding), cached in eval.json (eval_paper_decoding.json) with their scores; the report
    scores them again, per scene, from the answers."""
    path = os.path.join(model_dir, "eval_paper_decoding.json" if cfg.paper_decoding else "eval.json")
    if os.path.exists(path):
        with open(path) as f:
            answers = json.load(f)["answers"]
        if len(answers) == len(scenes):  # else written for another --n_test
            return answers
    prompts = [world.DESCRIBE_PROMPTS[i % len(world.DESCRIBE_PROMPTS)] for i in range(len(scenes))]
    images = [os.path.join(cfg.out_dir, "world", "images", f"test{i}.png") for i in range(len(scenes))]
    # the paper's beams and repetition penalty; its 1,024 tokens and prompt belong to the real model
    paper = {k: PRESETS["rlhfv"][k] for k in ("num_beams", "repetition_penalty")}
    with timed(cfg.out_dir, f"evaluate {os.path.basename(model_dir)}"):
        answers = describe_all(model_dir, tok, images, prompts, cfg, **(paper if cfg.paper_decoding else {}))
    atomic_write(path, json.dumps({"scores": world.score(scenes, answers), "answers": answers}, indent=1))
    return answers
