"""Training: SFT and dense DPO (DDPO) of Muffin, and the miniature RLHF-V that runs by default.

    python train.py                                  # the whole miniature RLHF-V, offline (see README)
    python train.py --gamma=1                        # ... with vanilla DPO: the paper's Table 3 ablation
    python train.py --scaling=100,300,900 --seeds=0,1,2,3,4 --rounds=1 --steps=100   # corrections vs rankings
    python train.py --stage=ddpo --data=pairs.jsonl --init=sft_ckpt --out_dir=out/run
    python train.py --stage=sft --data=sft.jsonl --model=mini --tokenizer=tok.model
    python train.py --stage=ddpo ... --resume        # continue an interrupted run exactly
    torchrun --nproc_per_node=8 train.py --stage=ddpo ... [--fsdp=True]   # data parallel (DDP/FSDP2)
    python train.py --stage=ddpo ... --lora_rank=64 --grad_ckpt=True     # LoRA: Muffin-13B on one GPU

A DDPO step (paper Sec. 3.2): chosen and rejected rows share their image, which is encoded once;
one forward gives the policy's token log-probs, Eq. 5 weighs them into sequence scores, Eq. 4 turns
the scores and the cached reference scores into the loss. The reference is the model training
starts from: its per-token log-probs are computed once, before the first update, with the training
collate (same tokens, template, truncation and image transform), and cached on disk by sample id.
"""
import contextlib
import json
import math
import os
import pickle
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace

import torch
from torch.nn.parallel import DistributedDataParallel

import cli
import ddpo
import lora
import parallel
from checkpoint import atomic_write, read_config
from cli import InputError
from data import PAIR_KEYS, SFT_KEYS, TOKEN_FILES, Batcher, Records, Tokenizer, check_tokenizer
from model import Muffin, autocast, peak_flops, sized, train_flops


@dataclass
class TrainConfig:
    # defaults: the paper's recipe (sft, ddpo); "miniature: X" is what --stage=rlhfv uses unless given
    stage: str = "rlhfv"     # rlhfv: the miniature end to end; sft; ddpo
    out_dir: str = "out"
    seed: int = 0            # picks the synthetic world, the initialisation and the data order
    data: str = ""           # sft/ddpo: .jsonl, RLHF-V-Hall .tsv or RLHF-V-Dataset .parquet
    init: str = ""           # checkpoint to start from; ddpo: the SFT model, also the reference
    tokenizer: str = ""      # default: <init>/tokenizer.model
    model: str = "mini"      # named size (model.CONFIGS) when training from scratch
    resume: bool = False     # continue from <out_dir>/latest
    # DDPO (paper: gamma 5, beta 0.5, averaged scores)
    gamma: float = 5.0       # weight of tokens in corrected segments; 1 = vanilla DPO
    beta: float = 0.5
    average: bool = True     # True: paper Eq. 5 (mean over weighted tokens); False: weighted sum; miniature: False
    min_match: int = 3       # diff: shorter matching blocks do not split a corrected segment
    sft_weight: float = 0.0  # + weight * NLL of the chosen answer (0 in the paper)
    ref_cache: str = ""      # default: <out_dir>/ref_logps.safetensors
    # optimisation (paper: AdamW lr 5e-7, global batch 32, 320 steps, warm-up 10%, cosine, clip 1, all params trained)
    steps: int = 320         # ~7 epochs of the paper's 1,401 pairs; miniature: 200 (DDPO; its SFT: sft_steps)
    batch_size: int = 32     # pairs (ddpo) or answers (sft) per micro-batch, per rank (global: x grad_accum x ranks)
    grad_accum: int = 1
    lr: float = 5e-7         # miniature: 1.5e-5 (faster rates teach it "say fewer objects")
    warmup: float = 0.1      # fraction of steps; then cosine to 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_len: int = 2048      # tokens per row; answers are cut from the end to fit
    freeze_vision: bool = False  # requires_grad=False on the BEiT-3 tower and its queries
    grad_ckpt: bool = False  # recompute decoder blocks in backward (less memory, ~30% slower)
    compile: bool = False
    fsdp: bool = False       # under torchrun: FSDP2 (sharded weights, grads, AdamW state; DCP checkpoints)
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    workers: int = 0         # DataLoader processes
    log_every: int = 10
    save_every: int = 100
    # the miniature RLHF-V (stage rlhfv)
    n_train: int = 6000      # training scenes: SFT captions, then answers to collect and correct
    n_test: int = 1000       # held-out scenes for evaluation
    image_size: int = 48
    vision_steps: int = 1300  # at most; the tower learns to see first (rlhfv.pretrain_vision)
    vision_lr: float = 1e-3  # the tower's own rate: at SFT's it learns to see less reliably
    sft_steps: int = 900
    sft_lr: float = 2e-3     # above the tower's rate: the fresh decoder learns to read the queries better
    rounds: int = 2          # collect, correct, DDPO (steps // rounds) from the latest model; paper: 1
    ablation: bool = False   # also run vanilla DPO (gamma 1) and SFT on the corrected answers
    seeds: str = ""          # "0,1,2": the miniature once per seed (<out_dir>/seed<S>) and a summary
    paper_decoding: bool = False  # evaluate every arm with RLHF-V's 3 beams, repetition penalty 1.1
    ranking: bool = False    # + vanilla DPO on rankings: of two sampled answers, the one with fewer errors wins
    rank_temperature: float = 1.0  # sampling of the two answers a ranking compares
    rank_top_p: float = 1.0
    rank_lr: float = 0.0     # the ranking arm's DPO rate (0: --lr)
    n_pairs: int = 0         # train every arm on this many annotated pairs (a fixed, seeded subset); 0: all
    scaling: str = ""        # "100,200,400": corrections vs rankings at each --n_pairs, each seed of --seeds
    # LoRA (lora.py): rank-r adapters train, every base weight is frozen (bf16 on CUDA)
    lora_rank: int = 0       # 0: no adapters, every weight trains (the paper)
    lora_alpha: float = 16.0  # the adapters' output is scaled by alpha / rank
    lora_dropout: float = 0.0  # on the adapters' input (each keeps a mask and a copy of it for backward)
    lora_targets: str = ",".join(lora.TARGETS)  # Linears of every decoder block; + mm_projector: the projector
    lora_vision: bool = False  # with --lora_rank: the tower and its queries train in full too (fp32, AdamW)


def lr_at(step, cfg):
    """Linear warm-up, then cosine decay to 0 at cfg.steps."""
    warm = max(1, int(cfg.warmup * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, cfg.steps - warm)))


def batches(records, collate, cfg, start, rank=0, world=1):
    """Micro-batches without end, in an order fixed by (seed, epoch), from micro-batch `start` on:
    a resumed run sees exactly the batches the uninterrupted run would have seen. With `world`
    ranks, each global micro-batch has batch_size * world rows and rank r takes its r-th slice:
    together the ranks see what one process with that batch size sees."""
    per_epoch = len(records) // (cfg.batch_size * world)
    if per_epoch == 0:
        raise InputError(f"{records.path}: {len(records)} rows, fewer than one batch of {cfg.batch_size * world}")
    epoch, skip = divmod(start, per_epoch)
    while True:
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
        order = order[:per_epoch * cfg.batch_size * world].view(per_epoch, world, cfg.batch_size)
        order = order[skip:, rank].tolist()
        # a generator of its own: the loader would otherwise draw its seed from the global RNG, which
        # LoRA's dropout uses, and a resumed run (a new loader) would then drop other units
        yield from torch.utils.data.DataLoader(records, batch_sampler=order, collate_fn=collate,
                                               num_workers=cfg.workers, pin_memory=cfg.device.startswith("cuda"),
                                               generator=torch.Generator())
        epoch, skip = epoch + 1, 0


PREFLIGHT_ROWS = 256  # rows looked at before the first step: all of a smaller file, else this many
SKIP_WARN = 0.05      # a larger share of skipped rows is said before training, not only at its end


def preflight(records, batcher, cfg, rank=0):
    """Look at the rows the stage will read before any work: all of a small file, else
    PREFLIGHT_ROWS spread over it. None usable: stop with one line naming the commonest reason and
    its likely cause. More than SKIP_WARN of them skipped: say so now, on stderr."""
    n, keys = len(records), SFT_KEYS if cfg.stage == "sft" else PAIR_KEYS
    picked = range(n) if n <= PREFLIGHT_ROWS else sorted({i * n // PREFLIGHT_ROWS for i in range(PREFLIGHT_ROWS)})
    reasons, first, fields = Counter(), {}, Counter()
    for i in picked:
        row = records[i]
        fields.update(k for k in ("answer", "chosen", "rejected") if row.get(k))
        reason = batcher.prompt(row, keys)[1]
        if reason:
            reasons[reason] += 1
            first.setdefault(reason, row.get("error", f"{records.path}:{i + 1}"))
    if not reasons:
        return
    counts = ", ".join(f"{v} {k}" for k, v in reasons.most_common())
    looked = f"its {n} rows" if len(picked) == n else f"{len(picked)} of its {n} rows (spread over it)"
    if sum(reasons.values()) == len(picked):
        top = reasons.most_common(1)[0][0]
        raise InputError(f"{records.path}: no usable row for --stage={cfg.stage} in {looked}: {counts}; "
                         + likely_cause(cfg, top, fields, first[top]))
    if sum(reasons.values()) > SKIP_WARN * len(picked) and rank == 0:
        print(f"warning: {records.path}: {sum(reasons.values())} of {looked} will be skipped ({counts}); "
              f"the first: {first[reasons.most_common(1)[0][0]]}", file=sys.stderr, flush=True)


def likely_cause(cfg, reason, fields, first):
    """What most likely makes rows fail for `reason`, from the fields the rows do have."""
    if reason == "empty answer" and fields["chosen"]:
        return "--stage=sft reads question/answer; these rows have chosen/rejected: DDPO pairs? (--stage=ddpo)"
    if reason in ("empty chosen", "empty rejected") and fields["answer"]:
        return "--stage=ddpo reads question/chosen/rejected; these rows have answer: SFT data? (--stage=sft)"
    if reason == "prompt longer than max_len":
        return f"--max_len={cfg.max_len} leaves no room for an answer"
    if reason == "chosen == rejected":
        return "every pair's two answers are the same, so there is nothing to learn"
    if reason == "unreadable row":
        return f"the first: {first}"
    return f"the rows have no {reason.removeprefix('empty ')} (the first: {first})"


def forward_loss(model, batch, cfg):
    """The loss of one micro-batch and its metrics (0-d tensors)."""
    logits = model(batch["input_ids"], images=batch["images"], image_index=batch["image_index"])
    logp, mask = ddpo.token_logps(logits, batch["labels"])
    if cfg.stage == "sft":
        nll = -logp.sum() / mask.sum()
        return nll, {"loss": nll.detach()}
    B = len(logp) // 2  # chosen rows, then rejected rows
    policy_scores = ddpo.weighted_scores(logp, mask, batch["weights"], cfg.average)
    ref_scores = ddpo.weighted_scores(batch["ref_logps"], mask, batch["weights"], cfg.average)
    losses, r_w, r_l = ddpo.ddpo_loss(policy_scores[:B], policy_scores[B:], ref_scores[:B], ref_scores[B:], cfg.beta)
    loss = losses.mean()
    if cfg.sft_weight:  # a per-token NLL anchor on the chosen answers, whatever the score mode
        loss = loss - cfg.sft_weight * logp[:B].sum() / mask[:B].sum()
    return loss, {"loss": loss.detach(), **ddpo.ddpo_metrics(r_w, r_l, policy_scores[:B], policy_scores[B:],
                                                                ref_scores[:B], ref_scores[B:])}


class RefCache:
    """Per-token log-probs of every answer under the reference model, keyed "<sample id>/chosen"
    and "<sample id>/rejected". Sample ids hash the content, so edited data is not silently
    matched to stale numbers: a missing id or a different token count is an error."""

    def __init__(self, path, tensors):
        self.path, self.tensors = path, tensors

    def logps(self, batch):
        """The reference log-probs of a pairs batch, [2B, T-1] like the policy's token_logps: row j's
        cached tokens go where its labels are (chosen rows, then rejected rows)."""
        mask = batch["labels"][:, 1:] != ddpo.IGNORE_INDEX
        out, B = torch.zeros(mask.shape), len(batch["sample_ids"])
        for j, sid in enumerate(batch["sample_ids"]):
            c, r = self.tensors.get(f"{sid}/chosen"), self.tensors.get(f"{sid}/rejected")
            if c is None or r is None:
                raise InputError(f"{self.path}: no reference log-probs for sample {sid}: the data changed "
                                 "since the cache was computed; delete the file to recompute it")
            now = (int(mask[j].sum()), int(mask[B + j].sum()))
            if (len(c), len(r)) != now:
                raise InputError(f"{self.path}: sample {sid} has {len(c)}/{len(r)} cached tokens but "
                                 f"{now[0]}/{now[1]} now (another tokenizer or max_len?); delete the "
                                 "file to recompute it")
            out[j][mask[j]], out[B + j][mask[B + j]] = c, r
        return out


def tokenizer_file(cfg):
    return cfg.tokenizer or os.path.join(cfg.init, "tokenizer.model")


def reference_inputs(cfg):
    """What the reference log-probs are computed from, by name: the --init checkpoint's config and
    weight files, the data file and the tokenizer's files (each by size and modification time: a
    rewritten file is another input), max_len, and the device type (its precision enters)."""
    def stamp(path):
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]

    tok_file = tokenizer_file(cfg)
    tok_files = [tok_file, *(os.path.join(os.path.dirname(tok_file), name) for name in TOKEN_FILES)]
    return {"init": {f: stamp(os.path.join(cfg.init, f)) for f in sorted(os.listdir(cfg.init) if cfg.init else ())
                     if f == "config.json" or f.endswith((".safetensors", ".bin", ".index.json"))},
            "data": {os.path.basename(cfg.data): stamp(cfg.data)},
            "tokenizer": {os.path.basename(f): stamp(f) for f in tok_files if os.path.exists(f)},
            "max_len": cfg.max_len, "device": torch.device(cfg.device).type}


@torch.no_grad()
def reference_logps(model, records, batcher, cfg, rank=0, world=1, resumed=False):
    """Compute (once) or load the reference cache. Run before the first update, so the policy is
    still the initial model: the reference never sits beside the policy in memory. With `world`
    ranks, rank r computes records r, r + world, ... (wrapping round, so that all run as many
    forwards, as FSDP's collectives need); every rank receives them all and rank 0 writes the file.
    The file records its inputs (reference_inputs); a cache from other inputs is computed again,
    except in a resumed run, whose model is no longer the initial one: that stops, naming them."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    path = cfg.ref_cache or os.path.join(cfg.out_dir, "ref_logps.safetensors")
    inputs = reference_inputs(cfg)
    if os.path.exists(path):
        with safe_open(path, "pt") as f:
            saved = json.loads((f.metadata() or {}).get("inputs", "{}"))
        changed = [k for k in inputs if saved.get(k) != inputs[k]]
        if not changed:
            return RefCache(path, load_file(path))
        names = {"init": f"--init={cfg.init}", "data": f"--data={cfg.data}", "max_len": f"--max_len={cfg.max_len}",
                 "tokenizer": f"tokenizer {tokenizer_file(cfg)}", "device": f"--device={cfg.device}"}
        why = (f"{path}: computed from another " + ", ".join(names[k] for k in changed) if saved
               else f"{path}: holds no record of its inputs")
        if resumed:
            raise InputError(why + "; a resumed run cannot compute it again (its model is no longer the "
                             "initial one): start afresh, or give --ref_cache a new path")
        if rank == 0:
            print(why + ": computing it again", flush=True)
    was_training, out = model.training, {}
    model.eval()
    mine = [(rank + world * k) % len(records) for k in range(-(-len(records) // world))]
    for i in range(0, len(mine), cfg.batch_size):
        batch = batcher.pairs([records[j] for j in mine[i:i + cfg.batch_size]])
        if "input_ids" not in batch:
            continue
        batch = to_device(batch, cfg.device)
        with autocast(cfg.device):
            logp, mask = ddpo.token_logps(model(batch["input_ids"], images=batch["images"],
                                                image_index=batch["image_index"]), batch["labels"])
        logp, mask, B = logp.cpu(), mask.cpu(), len(batch["sample_ids"])
        for j, sid in enumerate(batch["sample_ids"]):
            out[f"{sid}/chosen"], out[f"{sid}/rejected"] = logp[j][mask[j]], logp[B + j][mask[B + j]]
    out = {k: v for part in parallel.gather(out, world) for k, v in part.items()}
    if rank == 0:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        atomic_write(path, lambda p: save_file(out, p, {"init": cfg.init, "data": cfg.data,
                                                        "inputs": json.dumps(inputs)}))
    model.train(was_training)
    return RefCache(path, out)


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def load_model(cfg, tok):
    """The model to train: the latest checkpoint when resuming, else --init, else a fresh one."""
    latest = os.path.join(cfg.out_dir, "latest")
    if cfg.resume and os.path.exists(latest):
        with open(latest) as f:
            ckpt = os.path.join(cfg.out_dir, f.read().strip())
        path = os.path.join(ckpt, "state.pt")
        if cfg.lora_rank or lora.is_adapter(ckpt):  # adapters only: the base is --init's
            check_adapter_rank(cfg, ckpt)
            return load_model(replace(cfg, resume=False), tok)[0], {**torch.load(path, weights_only=True),
                                                                    "adapter": ckpt}
        if os.path.exists(os.path.join(ckpt, ".metadata")):  # sharded (DCP): loaded in train(), once sharded
            return load_model(replace(cfg, resume=False), tok)[0], {"dcp": ckpt}
        try:  # weights_only: tensors and plain containers, never a pickle that runs code
            state = torch.load(path, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
            raise InputError(f"{path}: refused or unreadable (torch.load weights_only=True): {e}") from None
        return Muffin.from_pretrained(ckpt), state
    if cfg.init:  # full weights, or an adapter directory: its base with the adapter merged
        bf16 = cfg.lora_rank and cfg.device.startswith("cuda")  # a frozen base needs no fp32 master copy
        return lora.from_pretrained(cfg.init, torch.bfloat16 if bf16 else None), None
    torch.manual_seed(cfg.seed)
    return Muffin(sized(cfg.model, tok.vocab_size, tok.im_patch_id)).init_weights(), None


def check_adapter_rank(cfg, ckpt):
    """A LoRA run resumes only with the rank (and --lora_vision) its checkpoint's adapter has, and a
    full run only from full weights."""
    settings = lora.read_settings(ckpt) if lora.is_adapter(ckpt) else None
    saved = settings.r if settings else 0
    if saved != cfg.lora_rank:
        holds = f"an adapter of rank {saved}" if saved else "full weights, no adapter"
        raise cli.UsageError(f"--lora_rank={cfg.lora_rank}: {ckpt} holds {holds}; resume with "
                             f"--lora_rank={saved} or use another --out_dir")
    if settings and bool(settings.modules_to_save) != cfg.lora_vision:
        raise cli.UsageError(f"--lora_vision={cfg.lora_vision}: {ckpt} was trained with "
                             f"--lora_vision={not cfg.lora_vision}; resume with that or use another --out_dir")


def check_lora_options(cfg):
    """The LoRA options as one-line usage errors, before anything is loaded."""
    if cfg.lora_rank < 0:
        raise cli.UsageError(f"--lora_rank={cfg.lora_rank}: must be 0 (off) or a positive rank")
    if not 0 <= cfg.lora_dropout < 1:
        raise cli.UsageError(f"--lora_dropout={cfg.lora_dropout}: must be in [0, 1)")
    lora.parse_targets(cfg.lora_targets)
    if cfg.lora_rank and cfg.fsdp:
        raise cli.UsageError("--lora_rank runs in one process or with DDP under torchrun, not with --fsdp "
                             "(FSDP2 shards full training; a LoRA step's states fit one GPU)")
    if cfg.lora_vision and (not cfg.lora_rank or cfg.freeze_vision):
        raise cli.UsageError("--lora_vision trains the tower beside the adapters: it needs --lora_rank "
                             "and not --freeze_vision")


def save(model, tok_file, path, state=None):
    """Weights + config + tokenizer in `path` (a directory sample.py can load); with `state`, also
    the optimizer, step and RNG. Every file is written atomically. A model with adapters saves only
    them (PEFT's layout), naming the base they go on."""
    if hasattr(model, "lora"):
        lora.save_pretrained(model, path)
    else:
        model.save_pretrained(path)
    with open(tok_file, "rb") as f:
        blob = f.read()
    atomic_write(os.path.join(path, "tokenizer.model"), blob)
    for name in TOKEN_FILES:  # the BOS/EOS/pad it was trained with go with it
        src = os.path.join(os.path.dirname(tok_file), name)
        if os.path.exists(src):
            with open(src, "rb") as f:
                atomic_write(os.path.join(path, name), f.read())
    if state is not None:
        atomic_write(os.path.join(path, "state.pt"), lambda p: torch.save(state, p))


def train(cfg):
    """SFT (teacher-forced NLL of the answers) or DDPO on cfg.data, as cfg.stage says; returns the
    trained model. Under torchrun: data parallel over the ranks, with DDP, or with FSDP2 given --fsdp."""
    check_lora_options(cfg)
    rank, world = parallel.setup(cfg)
    if cfg.init and not lora.is_adapter(cfg.init):
        read_config(cfg.init)  # a directory that is not a checkpoint is refused before anything else
    tok_file = tokenizer_file(cfg)
    if not cfg.tokenizer and not os.path.exists(tok_file):
        raise InputError(f"{cfg.init}: no tokenizer.model in the checkpoint; give --tokenizer")
    tok = Tokenizer.from_pretrained(tok_file)  # with the BOS/EOS/pad the JSON files beside it name
    model, state = load_model(cfg, tok)
    check_tokenizer(tok, model.config, tok_file)  # so no id the data makes can fall outside the embedding
    sharded, ddp = cfg.fsdp and world > 1, not cfg.fsdp and world > 1
    if cfg.lora_rank:
        torch.manual_seed(cfg.seed)  # the adapters' A: the same on every rank and in every run of this seed
        lora.apply(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, lora.parse_targets(cfg.lora_targets),
                   base=cfg.init, full=lora.VISION if cfg.lora_vision else ())
        if state is not None:
            lora.load_adapter(model, state["adapter"])
    records = Records(cfg.data)
    batcher = Batcher(tok, model.config.n_query, model.config.vision.img_size, cfg.max_len, cfg.gamma,
                      cfg.min_match)
    preflight(records, batcher, cfg, rank)  # before any work: data no row of which can be used stops here
    place(model, cfg, sharded)
    ref_cache = (reference_logps(model, records, batcher, cfg, rank, world, resumed=state is not None)
                 if cfg.stage == "ddpo" else None)
    if sharded:
        model.reshard()  # FSDP2 leaves the root's gathered weights registered after a forward
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=cfg.weight_decay, fused=cfg.device.startswith("cuda"))
    step, drawn = restore(state, model, opt, cfg)
    fwd = torch.compile(model) if cfg.compile else model
    fwd = DistributedDataParallel(fwd) if ddp else fwd  # `model` stays unwrapped, for saving
    data = batches(records, batcher.sft if cfg.stage == "sft" else batcher.pairs, cfg, drawn, rank, world)
    per_epoch = len(records) // (cfg.batch_size * world)
    window, skipped = LogWindow(cfg, model, tok.pad_id, rank, world, step), Counter()
    model.train()
    while step < cfg.steps:
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        for micro in range(cfg.grad_accum):
            # a micro-batch whose every row is skipped is counted and passed over: it is no step
            for empty in range(per_epoch + 1):
                if empty == per_epoch:
                    raise InputError(f"{cfg.data}: no usable row in a whole epoch ({per_epoch} micro-batches): "
                                     + ", ".join(f"{v} {k}" for k, v in sorted(skipped.items())))
                batch, drawn = next(data), drawn + 1
                skipped.update(batch.pop("skipped"))
                if "input_ids" in batch:
                    break
                if world > 1:  # the ranks would fall out of step
                    raise RuntimeError(f"rank {rank}, step {step + 1}: every row of a micro-batch was skipped")
            if ref_cache is not None:
                batch["ref_logps"] = ref_cache.logps(batch)
            batch = to_device(batch, cfg.device)
            # DDP all-reduces gradients during backward; before the last micro-step that traffic
            # would be wasted (the sum is not finished), so no_sync() lets them accumulate locally
            with fwd.no_sync() if ddp and micro < cfg.grad_accum - 1 else contextlib.nullcontext():
                with autocast(cfg.device):
                    loss, metrics = forward_loss(fwd, batch, cfg)
                (loss / cfg.grad_accum).backward()
            window.add(batch, metrics)
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
        norm = norm.full_tensor() if sharded else norm  # FSDP2: a DTensor, reduced over the shards
        # one host sync per step, so a NaN never reaches the weights; the norm is global (after DDP's
        # sync, or reduced over FSDP2's shards), so every rank takes the same branch
        if not torch.isfinite(norm):
            raise FloatingPointError(f"step {step + 1}: non-finite loss or gradient (norm {norm.item()}); "
                                     f"update not applied; the last checkpoint in {cfg.out_dir} is intact")
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        window.step(step, lr, norm)
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_checkpoint(model, opt, step, cfg, tok_file, drawn=drawn)
    model = parallel.unsharded(model) if sharded else model
    skipped = sum(parallel.gather(skipped, world), Counter())  # every rank's skipped rows
    if rank == 0:
        if step:  # else it saw no row (--steps=0): nothing was trained, nothing is written
            save(model, tok_file, cfg.out_dir)
        if skipped:
            print(f"{cfg.stage}: skipped rows: " + ", ".join(f"{v} {k}" for k, v in sorted(skipped.items())))
    return model


def place(model, cfg, sharded):
    """What trains (the tower and its queries unless --freeze_vision, or --lora_rank without
    --lora_vision; set before sharding, which reads it), activation checkpointing, and where the
    weights live: FSDP2 shards or cfg.device."""
    for part in (model.model.vision_tower, model.model.query):
        part.requires_grad_(not cfg.freeze_vision and (not cfg.lora_rank or cfg.lora_vision))
    model.grad_checkpointing = cfg.grad_ckpt
    if sharded:
        parallel.shard(model, cfg.device)
    else:
        model.to(cfg.device)


def restore(state, model, opt, cfg):
    """Optimizer state and RNG of a resumed run into `opt`; -> the step to continue from and the
    micro-batches drawn until then (0, 0 when new)."""
    if state is None:
        return 0, 0
    if "dcp" in state:  # a sharded checkpoint, saved on any number of ranks
        state = parallel.load_sharded(model, opt, state["dcp"])
    else:
        opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    # more than step * grad_accum when micro-batches with no usable row were passed over
    return state["step"], state.get("drawn", state["step"] * cfg.grad_accum)


class LogWindow:
    """The metrics of the steps since the last log line, summed on the device (no host sync per
    micro-step), written to <out_dir>/log.jsonl and printed every cfg.log_every steps, averaged
    over the micro-steps and the ranks; tokens/s and MFU over the window's wall time."""

    def __init__(self, cfg, model, pad_id, rank, world, step):
        self.cfg, self.pad_id, self.rank, self.world = cfg, pad_id, rank, world
        self.peak, self.t_start, self.start_step = peak_flops(cfg.device), time.time(), step
        self.per_token, self.per_image = train_flops(model, 1, 0), train_flops(model, 0, 1)
        if hasattr(model, "lora"):  # no weight gradients: 4 FLOPs per frozen weight per token
            self.per_token *= 2 / 3
            if not model.lora.modules_to_save:  # a frozen tower runs forward only
                self.per_image /= 3
        os.makedirs(cfg.out_dir, exist_ok=True)
        self.file = open(os.path.join(cfg.out_dir, "log.jsonl"), "a") if rank == 0 else None
        self.reset()

    def reset(self):
        self.sums, self.grad_norm, self.tokens, self.rows, self.micro = {}, 0, 0, 0, 0
        self.flops, self.t0 = 0.0, time.time()

    def add(self, batch, metrics):
        """One micro-step's metrics (0-d tensors) and the size of its batch."""
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0) + v.float()
        self.tokens = self.tokens + (batch["input_ids"] != self.pad_id).sum()
        self.rows, self.micro = self.rows + len(batch["input_ids"]), self.micro + 1
        n_images = 0 if batch["images"] is None else len(batch["images"])  # None: only text-only rows
        self.flops += self.per_token * batch["input_ids"].numel() + self.per_image * n_images

    def step(self, step, lr, grad_norm):
        cfg = self.cfg
        self.grad_norm = self.grad_norm + grad_norm
        if step % cfg.log_every and step != cfg.steps:
            return
        if self.micro:  # else every row since the last line was skipped (and counted)
            self.write(step, lr, cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every)
        self.reset()

    def write(self, step, lr, n_steps):
        cfg, dt, ddpo_stage = self.cfg, time.time() - self.t0, self.cfg.stage == "ddpo"
        rows = torch.tensor(float(self.rows), device=self.tokens.device)
        sums = torch.stack([*self.sums.values(), self.tokens.float(), rows])
        *means, tokens, rows = parallel.sum_over_ranks(sums, self.world).tolist()  # one host sync
        rec = {k: v / (self.micro * self.world) for k, v in zip(self.sums, means)}
        rec.update(grad_norm=self.grad_norm.item() / n_steps, step=step, lr=lr, tokens_per_s=tokens / dt,
                   mfu=self.peak and self.flops / dt / self.peak)
        rec["pairs_per_s" if ddpo_stage else "rows_per_s"] = rows / dt / (2 if ddpo_stage else 1)
        if self.rank != 0:
            return
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        elapsed = time.time() - self.t_start
        eta = elapsed / (step - self.start_step) * (cfg.steps - step)
        print(f"{cfg.stage} {step}/{cfg.steps} loss {rec['loss']:.4f}"
              + (f" margin {rec['rewards/margins']:.3f} acc {rec['rewards/accuracies']:.2f}" if ddpo_stage else "")
              + f" lr {lr:.2e} | {tokens / dt:,.0f} tok/s" + (f" mfu {rec['mfu']:.1%}" if self.peak else "")
              + f" | {elapsed:.0f}s, eta {eta:.0f}s", flush=True)


def save_checkpoint(model, opt, step, cfg, tok_file, drawn=None):
    """<out_dir>/ckpt-<step>/, then the one-line file `latest` points at it (atomically), then
    older checkpoints go: an interruption at any moment leaves a complete checkpoint to resume.
    With --fsdp every rank writes its shards (DCP; dcp.save returns once all are written);
    otherwise rank 0 writes the weights and state.pt."""
    name = f"ckpt-{step}"
    if cfg.fsdp:
        parallel.save_sharded(model, opt, step, os.path.join(cfg.out_dir, name))
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    if not cfg.fsdp:
        save(model, tok_file, os.path.join(cfg.out_dir, name),
             {"optimizer": opt.state_dict(), "step": step, "rng": torch.get_rng_state(),
              "drawn": step * cfg.grad_accum if drawn is None else drawn})
    atomic_write(os.path.join(cfg.out_dir, "latest"), name)
    for old in os.listdir(cfg.out_dir):
        if old.startswith("ckpt-") and old != name:
            shutil.rmtree(os.path.join(cfg.out_dir, old))


def main(argv):
    cfg = cli.parse_args(TrainConfig, argv, paths=("data", "init", "tokenizer"))
    check_lora_options(cfg)
    if cfg.stage == "rlhfv":
        from miniature import rlhfv  # the one place the library reaches into the demonstration
        cfg = rlhfv.settle(cfg, cli.given(argv))  # its own lr, steps, ... under the options given
        (rlhfv.scaling if cfg.scaling else rlhfv.sweep if cfg.seeds else rlhfv.run)(cfg, train)
    elif cfg.stage in ("sft", "ddpo"):
        if not cfg.data or (cfg.stage == "ddpo" and not cfg.init):
            raise cli.UsageError(f"--stage={cfg.stage} needs --data" + (" and --init" if cfg.stage == "ddpo" else ""))
        if not cfg.init and not cfg.tokenizer:
            raise cli.UsageError(f"--stage={cfg.stage} from scratch (no --init) needs --tokenizer")
        train(cfg)
        if torch.distributed.is_initialized():
            # all ranks at once: a rank that tears gloo down while rank 0 is still saving can die
            # in the teardown
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
    else:
        raise cli.UsageError(f"--stage must be rlhfv, sft or ddpo, not {cfg.stage!r}")


if __name__ == "__main__":
    cli.run(main)
