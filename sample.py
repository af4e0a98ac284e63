"""Generation with Muffin: batched prefill, then one token at a time from a preallocated KV cache.

    python sample.py --ckpt=out/ddpo --image=scene.png --prompt="Describe the image in detail."
    python sample.py --ckpt=out/ddpo --image=a.png --temperature=0.7 --top_p=0.9
    python sample.py --ckpt=RLHF-V --image=a.png --preset=rlhfv    # RLHF-V's evaluation decoding and prompt
    python sample.py --ckpt=out/ddpo --image=a.png --preset=rlhfv --template=train  # its decoding, our template
    python sample.py --ckpt=out/ddpo --image=a.png --interactive < questions.txt
    python sample.py --ckpt=RLHF-V --questions=obj_halbench_300_with_image.jsonl --out=answers.jsonl --preset=rlhfv

Prompts of different lengths are left-padded: RoPE only sees position differences, so a row
shifted right by its padding computes the same attention as alone, once its pad slots are masked.
Beam search keeps num_beams rows per prompt in the batch: each prompt is prefilled once, its cache
row copied to its beams, and after every step each layer's cache rows follow the beams that survive
(LLaMA.reorder_cache). The decode step has static shapes and no host synchronisation (sampling uses
the exponential trick instead of torch.multinomial; finished rows are tracked on the device and
checked every `check_every` tokens), so with --compile it is captured in a CUDA graph.
A question file (--questions, JSON lines: image, question, image_id) is answered --batch_size
questions at a time into --out, one JSON line per question; a rerun appends only the missing ones.
Tests: python -m pytest tests/test_sample.py
"""
import base64
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch

import cli
import lora
from checkpoint import atomic_write
from data import (Tokenizer, answer_text, check_tokenizer, eval_prompt_ids, image_tensor, load_image, prompt_ids,
                  stop_tokens)


@dataclass
class SampleConfig:
    ckpt: str = "out/ddpo"        # a Muffin checkpoint directory (ours, the official release, an adapter)
    tokenizer: str = ""           # default: <ckpt>/tokenizer.model
    image: str = ""                # the picture to ask about (required)
    prompt: str = "Describe the image in detail."
    interactive: bool = False     # questions about the image from standard input, one a line, until EOF
    questions: str = ""           # JSON lines (image: base64 or a path relative to the file, question, image_id)
    out: str = ""                 # with --questions: the answers, JSON lines (appended to: a rerun resumes)
    batch_size: int = 8           # with --questions: questions answered together (left-padded prompts)
    preset: str = ""              # rlhfv: RLHF-V's evaluation decoding and prompt (PRESETS)
    template: str = "train"       # train: the training template; eval: RLHF-V's evaluation prompt (eval_prompt_ids)
    max_new_tokens: int = 128
    temperature: float = 0.0      # 0: greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the row (prompt included)
    num_beams: int = 1            # > 1: beam search (RLHF-V's evaluation: 3)
    length_penalty: float = 1.0   # beams: a finished hypothesis scores sum(log-probs) / length ** this
    early_stopping: bool = False  # beams: done at num_beams finished (False, RLHF-V's: once none can improve)
    dtype: str = ""               # bfloat16 | float16 | float32; default bfloat16 on CUDA, float32 on a CPU
    seed: int = 0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    compile: bool = False


# RLHF-V's evaluation (spec 6.1); options given on the command line win. Its transformers (4.28)
# stopped beam search only once every beam's text held "###"; here a beam ends at its own stop token,
# as transformers' stop strings end beams now (test_parity.py compares with that).
# Its prompt is not the training template: the released model answers both, a model trained only on
# the template (as train.py's are, the miniature's above all) may not, hence the note in main().
PRESETS = {"rlhfv": dict(num_beams=3, repetition_penalty=1.1, max_new_tokens=1024, template="eval")}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def next_token(logits, seen, temperature, top_p, repetition_penalty):
    """logits [B, V] fp32 -> token ids [B]. seen [B, V] bool marks tokens already in the row, whose
    logits are divided (if positive) or multiplied by the penalty, as transformers does."""
    if repetition_penalty != 1.0:
        logits = torch.where(seen, torch.where(logits > 0, logits / repetition_penalty,
                                               logits * repetition_penalty), logits)
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:  # keep the smallest set of tokens whose probability reaches top_p
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    # argmax(p / Exp(1)) samples from p without the host sync of torch.multinomial
    return (probs / torch.empty_like(probs).exponential_(1)).argmax(-1)


def forward_step(model, tokens, pos, pad):
    """Logits [B, V] (fp32) of one new token per row: tokens [B] at cache slot pos (a 1-element tensor)."""
    slots = torch.arange(model.cache_len, device=tokens.device)
    mask = ((slots <= pos) & (slots >= pad[:, None]))[:, None, None, :]
    return model(tokens[:, None], input_pos=pos, mask=mask)[:, -1].float()


def decode_step(model, tokens, pos, pad, seen, settings):
    """One token for every row: tokens [B] at cache slot pos (a 1-element tensor)."""
    return next_token(forward_step(model, tokens, pos, pad), seen, *settings)


def beam_search(logits, advance, reorder, seen, stop, n, num_beams, repetition_penalty=1.0,
                length_penalty=1.0, early_stopping=False, check_every=16):
    """transformers' beam search for B prompts, K rows each. logits [B, V]: each prompt's first token;
    advance(tokens [B*K], i) -> logits [B*K, V] after token i of each beam; reorder(index [B*K]): row
    r of the model's cache becomes row index[r]; seen [B, V]: the prompts' tokens. -> [B, n] ids.
    Each step: every beam grows by every token (grow_beams); of the best K of those, the ones ending
    in a stop token (all, at n tokens) join the finished hypotheses (finish_hypotheses); the best K
    that do not stop run on (advance_beams). A prompt is done with K finished once (unless
    early_stopping) the best running beam's sum / length cannot beat the worst of them."""
    B, V = logits.shape
    K, dev, rows = num_beams, logits.device, torch.arange(B, device=logits.device)[:, None]
    run = torch.zeros(B, 1, device=dev)                        # running beams: summed log-probs [B, k]
    seqs = torch.zeros(B, 1, n, dtype=torch.long, device=dev)  # and their tokens [B, k, n]
    fin = torch.full((B, K), -math.inf, device=dev)            # finished: scores, best first [B, K]
    fin_seqs = torch.zeros(B, K, n, dtype=torch.long, device=dev)
    open_ = torch.ones(B, dtype=torch.bool, device=dev)        # may still take finished hypotheses
    for i in range(n):  # k running beams per prompt: 1 at the first step, K after
        total = grow_beams(logits, seen, run, repetition_penalty)  # [B, k*V]
        takes = open_ & ~((fin[:, -1] > -math.inf) & early_stopping)
        fin, fin_seqs = finish_hypotheses(fin, fin_seqs, total, seqs, i, stop, takes, length_penalty)
        if i == n - 1:
            break
        parent = rows * seqs.shape[1]  # each prompt's first cache row, with k rows per prompt
        run, seqs, idx = advance_beams(total, seqs, stop, i, K)
        index = (parent + idx // V).flatten()  # the cache row each new beam grows from
        reorder(index)
        seen = seen[index].scatter_(1, (idx % V).view(-1, 1), True)
        full = fin[:, -1] > -math.inf
        open_ &= ~full | (run[:, 0] / (i + 1) ** length_penalty > fin[:, -1])
        if (i + 1) % check_every == 0 and bool((~open_ | (full & early_stopping)).all()):
            break
        logits = advance((idx % V).flatten(), i)
    return fin_seqs[:, 0]


def grow_beams(logits, seen, run, repetition_penalty):
    """Every running beam grown by every token: logits [B*k, V], seen [B*k, V], run [B, k] (summed
    log-probs) -> [B, k*V] summed log-probs of the candidates, beam-major. The penalty multiplies the
    log-probs of each beam's seen tokens (transformers' processors act after log_softmax here)."""
    B, V = run.shape[0], logits.shape[-1]
    logp = torch.log_softmax(logits, -1)
    logp = torch.where(seen, logp * repetition_penalty, logp)  # log-probs are <= 0: more negative
    return (logp.view(B, -1, V) + run[..., None]).view(B, -1)


def extend(seqs, idx, V, i):
    """seqs [B, k, n], idx [B, K] (candidates in [0, k*V)) -> [B, K, n]: the tokens of beam idx // V
    with token idx % V at step i."""
    out = seqs.gather(1, (idx // V)[..., None].expand(-1, -1, seqs.shape[-1]))
    out[:, :, i] = idx % V
    return out


def finish_hypotheses(fin, fin_seqs, total, seqs, i, stop, takes, length_penalty):
    """Of the best K candidates total [B, k*V], those ending in a stop token (all at the last step)
    of prompts that take them (takes [B]) are finished, scored sum / length ** length_penalty; the
    best K finished are kept. fin [B, K], fin_seqs [B, K, n] -> the same, updated."""
    K, V, n = fin.shape[1], stop.shape[0], seqs.shape[-1]
    top, idx = total.topk(K)                                                  # [B, K]
    ends = (stop[idx % V] | (i == n - 1)) & takes[:, None]
    score = (top / (i + 1) ** length_penalty).masked_fill(~ends, -math.inf)
    fin, best = torch.cat([fin, score], 1).topk(K)                           # [B, K] of 2K
    fin_seqs = torch.cat([fin_seqs, extend(seqs, idx, V, i)], 1).gather(1, best[..., None].expand(-1, -1, n))
    return fin, fin_seqs


def advance_beams(total, seqs, stop, i, K):
    """The best K candidates of total [B, k*V] that do not end in a stop token run on: -> run [B, K]
    (their summed log-probs, best first), seqs [B, K, n], idx [B, K] (each one's candidate index)."""
    B, V = total.shape[0], stop.shape[0]
    run, idx = total.view(B, -1, V).masked_fill(stop, -math.inf).view(B, -1).topk(K)
    return run, extend(seqs, idx, V, i), idx


@torch.no_grad()
def generate_ids(model, prompts, stop, feats=None, max_new_tokens=128, temperature=0.0, top_p=1.0,
           repetition_penalty=1.0, num_beams=1, length_penalty=1.0, early_stopping=False,
           check_every=16, compile=False):
    """B prompts (lists of ids) -> B lists of new ids, each up to and including its first stop token.
    stop [V] bool: the tokens that end an answer; feats [B, n_query, d]: Muffin.encode_images of the
    prompts' images (None: a plain LLaMA). One beam: greedy (temperature 0) or sampled."""
    device, n = stop.device, max_new_tokens
    B, P = len(prompts), max(len(p) for p in prompts)
    pad = torch.tensor([P - len(p) for p in prompts], device=device)
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts], device=device)  # pad ids: masked
    # the prompts' own tokens, for the repetition penalty: a pad slot marks the spare column V, dropped
    real = torch.arange(P, device=device) >= pad[:, None]
    seen = torch.zeros(B, len(stop) + 1, dtype=torch.bool, device=device)
    seen = seen.scatter_(1, torch.where(real, ids, len(stop)), True)[:, :-1]
    model.setup_cache(B, P + n)
    try:
        slots = torch.arange(P + n, device=device)
        t = torch.arange(P, device=device)
        # causal over the prompt, pad slots hidden; a pad query sees itself so no row is all -inf
        mask = (slots[None, :] <= t[:, None]) & ((slots[None, :] >= pad[:, None, None]) | (slots == t[:, None]))
        x = model.model.embed_tokens(ids)
        x = x if feats is None else model.splice(ids, x, feats)
        logits = model.lm_head(model.hidden_states(x, t, mask[:, None]))[:, -1].float()
        step = forward_step if num_beams > 1 else decode_step
        step = torch.compile(step, mode="reduce-overhead", fullgraph=True) if compile else step
        pos = torch.tensor([P], device=device)
        if num_beams > 1:
            pad = pad.repeat_interleave(num_beams)
            advance = lambda tokens, i: step(model, tokens, pos + i, pad)
            rows = beam_search(logits, advance, model.reorder_cache, seen, stop, n, num_beams,
                               repetition_penalty, length_penalty, early_stopping, check_every)
        else:
            settings = (temperature, top_p, repetition_penalty)
            token = next_token(logits, seen, *settings)
            out, done = [token], stop[token]
            for i in range(1, n):
                if i % check_every == 0 and bool(done.all()):
                    break
                seen.scatter_(1, token[:, None], True)
                token = step(model, token, pos, pad, seen, settings)
                pos = pos + 1
                out.append(token)
                done = done | stop[token]
            rows = torch.stack(out, 1)
    finally:
        model.clear_cache()
    is_stop = stop.tolist()
    return [r[:next((j + 1 for j, token in enumerate(r) if is_stop[token]), len(r))] for r in rows.tolist()]


@torch.no_grad()
def generate(model, tok, images, questions, max_new_tokens=128, **options):
    """images [B, 3, H, W] (one per question), questions: list of B strings -> B answers (text
    before the first "###", stripped), in the training template. options: those of generate_ids
    (temperature, top_p, repetition_penalty, num_beams, length_penalty, early_stopping, ...)."""
    prompts = [prompt_ids(tok, q, model.config.n_query) for q in questions]
    rows = generate_ids(model, prompts, stop_tokens(tok, images.device), model.encode_images(images),
                  max_new_tokens, **options)
    return [answer_text(tok, r) for r in rows]


def settle(cfg, argv):
    """cfg with its preset's values under the options that argv gives; a bad value exits in one
    line naming the option and its valid values."""
    if cfg.preset and cfg.preset not in PRESETS:
        raise cli.UsageError(f"--preset={cfg.preset}: valid: {' '.join(PRESETS)} (or none)")
    given = cli.given(argv)
    for key, value in PRESETS.get(cfg.preset, {}).items():
        if key not in given:
            setattr(cfg, key, value)
    for bad, message in [
        (cfg.template not in ("train", "eval"), f"--template={cfg.template}: valid: train eval"),
        (cfg.dtype not in ("", *DTYPES), f"--dtype={cfg.dtype}: valid: {' '.join(DTYPES)}"),
        (cfg.num_beams < 1, f"--num_beams={cfg.num_beams}: valid: 1 (greedy or sampled) or more (beams)"),
        (cfg.repetition_penalty <= 0, f"--repetition_penalty={cfg.repetition_penalty}: valid: > 0 (1: none)"),
        (cfg.max_new_tokens < 1, f"--max_new_tokens={cfg.max_new_tokens}: valid: 1 or more"),
        (not 0 < cfg.top_p <= 1, f"--top_p={cfg.top_p}: valid: > 0 and <= 1"),
        (cfg.num_beams > 1 and cfg.temperature > 0,
         f"--temperature={cfg.temperature}: valid with --num_beams={cfg.num_beams}: 0 (beams do not sample)"),
    ]:
        if bad:
            raise cli.UsageError(message)
    return cfg


def main(argv):
    cfg = settle(cli.parse_args(SampleConfig, argv, paths=("ckpt", "tokenizer", "image", "questions")), argv)
    if not cfg.image and not cfg.questions:
        raise cli.UsageError("--image is required: the picture to ask about (or --questions=FILE)")
    if cfg.template == "eval" and "template" not in cli.given(argv):
        print(f"sample.py: --preset={cfg.preset} asks in RLHF-V's evaluation prompt, not the training "
              "template; a model trained only on the template (e.g. train.py's) may answer it badly: "
              "--template=train keeps the preset's decoding with the template", file=sys.stderr)
    if cfg.questions:
        return answer_file(cfg)
    model, tok = load_model(cfg)
    image = image_tensor(load_image(cfg.image), model.config.vision.img_size)[None]
    image = image.to(cfg.device, model.lm_head.weight.dtype)
    with torch.no_grad():
        feats = model.encode_images(image)  # once, however many questions are asked about the image
    stop, n_query, history, options = stop_tokens(tok, cfg.device), model.config.n_query, [], decoding(cfg)
    for question in (line.strip() for line in sys.stdin) if cfg.interactive else [cfg.prompt]:
        if not question:
            continue
        # as Muffin's multi-turn chat: RLHF-V's evaluation prompt opens, the training template goes on
        ids = (eval_prompt_ids(tok, question, n_query) if cfg.template == "eval" and not history
               else prompt_ids(tok, question, n_query, history))
        answer = answer_text(tok, generate_ids(model, [ids], stop, feats, **options)[0], cfg.template == "eval")
        print(answer, flush=True)
        history.append((question, answer))


# ------------------------------------------------------------------------- answering a question file

def read_questions(path):
    """The rows of a question file -> ([(line number, row)], [(line number, why it is bad)]). A row:
    question_id (given, or the row's index in the file), image_id (None if absent), question, and the
    image: PIL RGB from base64 (RLHF-V's Object HalBench file) or from a path relative to the file."""
    rows, bad, where = [], [], os.path.dirname(os.path.abspath(path))
    for n, line in cli.json_lines(path, "questions as JSON lines"):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("question"), str) or "image" not in row:
                raise ValueError("expected a JSON object with image and question")
            rows.append((n, {"question_id": row.get("question_id", n - 1), "image_id": row.get("image_id"),
                             "question": row["question"], "image": question_image(row["image"], where)}))
        except ValueError as e:
            bad.append((n, str(e).splitlines()[0]))
    return rows, bad


def question_image(image, where):
    """A question file's image field: a path relative to the file, or the picture in base64."""
    if not isinstance(image, str):
        raise ValueError("image: expected a string (base64, or a path relative to the file)")
    path = os.path.join(where, image)
    if len(image) < 4096 and os.path.isfile(path):
        return load_image(path)
    try:
        raw = base64.b64decode(image, validate=True)
    except ValueError:
        raise ValueError(f"image: neither a file beside the question file nor base64 ({image[:40]!r})") from None
    return load_image(raw)


def answered(path):
    """The question ids already in an answers file. A last line cut short by an interrupted run is
    dropped from the file, so that what is appended starts on a line of its own."""
    if not os.path.isfile(path):
        return set()
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    done, keep = set(), []
    for line in lines:
        try:
            done.add(json.loads(line)["question_id"])
            keep.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    if keep != lines:
        atomic_write(path, "".join(keep))
    return done


def answer_file(cfg):
    """Answer every question of cfg.questions not yet in cfg.out, cfg.batch_size at a time, with a
    progress line; bad rows are counted and named by line, not fatal."""
    if not cfg.out:
        raise cli.UsageError("--questions needs --out=answers.jsonl (where the answers go)")
    if cfg.batch_size < 1:
        raise cli.UsageError(f"--batch_size={cfg.batch_size}: valid: 1 or more")
    rows, bad = read_questions(cfg.questions)
    done = answered(cfg.out)
    todo = [r for _, r in rows if r["question_id"] not in done]
    model, tok = load_model(cfg)
    options = decoding(cfg)
    start, total, end = time.time(), len(todo), "" if sys.stderr.isatty() else "\n"
    with open(cfg.out, "a", encoding="utf-8") as out:
        for b in range(0, total, cfg.batch_size):
            batch = todo[b:b + cfg.batch_size]
            answers = answer_batch(model, tok, [r["image"] for r in batch], [r["question"] for r in batch],
                                   cfg.template == "eval", **options)
            out.writelines(json.dumps({"question_id": r["question_id"], "image_id": r["image_id"],
                                       "question": r["question"], "answer": a}) + "\n" for r, a in zip(batch, answers))
            out.flush()
            k, elapsed = b + len(batch), time.time() - start
            print(f"\ranswered {k}/{total} ({len(done)} before, {len(bad)} bad rows) {k / elapsed:.2f}/s, "
                  f"ETA {(total - k) * elapsed / k:.0f} s", end=end, file=sys.stderr, flush=True)
    if total and not end:
        print(file=sys.stderr)
    print(f"{cfg.out}: {len(done) + total} answers ({total} new)"
          + (f"; {len(bad)} bad rows skipped: " + "; ".join(f"line {n}: {why}" for n, why in bad) if bad else ""))
    return bad


@torch.no_grad()
def answer_batch(model, tok, images, questions, eval_prompt=False, **options):
    """PIL images and their questions -> answers, one left-padded batch (generate_ids); eval_prompt:
    RLHF-V's evaluation prompt (eval_prompt_ids) rather than the training template."""
    dev, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    x = torch.stack([image_tensor(im, model.config.vision.img_size) for im in images]).to(dev, dtype)
    make = eval_prompt_ids if eval_prompt else prompt_ids
    # an "<image>" placeholder in a question is dropped, as Muffin's answering script drops it
    prompts = [make(tok, q.replace("<image>", ""), model.config.n_query) for q in questions]
    rows = generate_ids(model, prompts, stop_tokens(tok, dev), model.encode_images(x), **options)
    return [answer_text(tok, r, eval_prompt) for r in rows]


def load_model(cfg):
    """The checkpoint's Muffin (eval mode, cfg's device and dtype; an adapter directory: its base with
    the adapter merged) and its tokenizer."""
    torch.manual_seed(cfg.seed)
    dtype = DTYPES[cfg.dtype or ("bfloat16" if cfg.device.startswith("cuda") else "float32")]
    model = lora.from_pretrained(cfg.ckpt, dtype=dtype).to(cfg.device).eval()
    tok_file = cfg.tokenizer or f"{cfg.ckpt}/tokenizer.model"
    if not cfg.tokenizer and not os.path.exists(tok_file):
        raise cli.InputError(f"{cfg.ckpt}: no tokenizer.model in the checkpoint; give --tokenizer")
    tok = Tokenizer.from_pretrained(tok_file)
    check_tokenizer(tok, model.config, tok_file)
    return model, tok


def decoding(cfg):
    """The options of generate_ids that the command line sets."""
    return {k: getattr(cfg, k) for k in ("max_new_tokens", "temperature", "top_p", "repetition_penalty",
                                         "num_beams", "length_penalty", "early_stopping", "compile")}


if __name__ == "__main__":
    cli.run(main)
