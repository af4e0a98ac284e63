"""Training: SFT and dense DPO (DDPO) of Muffin, and the miniature RLHF-V that runs by default.

    python train.py                                  # the whole miniature RLHF-V, offline (see README)
    python train.py --gamma=1                        # ... with vanilla DPO: the paper's Table 3 ablation
    python train.py --scaling=100,300,900 --seeds=0,1,2,3,4 --rounds=1 --steps=100   # corrections vs rankings
    python train.py --stage=ddpo --data=pairs.jsonl --init=sft_ckpt --out_dir=out/run
    python train.py --stage=sft --data=sft.jsonl --model=mini --tokenizer=tok.model
    python train.py --stage=ddpo ... --resume        # continue an interrupted run exactly
    torchrun --nproc_per_node=8 train.py --stage=ddpo ... [--fsdp=True]   # data parallel (DDP/FSDP2)

A DDPO step (paper Sec. 3.2): chosen and rejected rows share their image, which is encoded once;
one forward gives the policy's token log-probs, Eq. 5 weighs them into sequence scores, Eq. 4 turns
the scores and the cached reference scores into the loss. The reference is the initial model: its
per-token log-probs are computed once, before the first update, with the very batches of training
(same tokens, template and image transform), and cached on disk by sample id.
"""
import contextlib
import json
import math
import os
import pickle
import shutil
import time
from collections import Counter
from dataclasses import dataclass, replace

import torch
from torch.nn.parallel import DistributedDataParallel

import cli
import ddpo
import parallel
from checkpoint import atomic_write
from data import TOKEN_FILES, Batcher, Records, Tokenizer, check_tokenizer
from model import Muffin, autocast, peak_flops, sized, train_flops


@dataclass
class TrainConfig:
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
    average: bool = False    # True: paper Eq. 5 (mean over weighted tokens); False: weighted sum
    min_match: int = 3       # diff: shorter matching blocks do not split a corrected segment
    sft_weight: float = 0.0  # + weight * NLL of the chosen answer (0 in the paper)
    ref_cache: str = ""      # default: <out_dir>/ref_logps.safetensors
    # optimisation (paper: lr 5e-7, batch 32, 320 steps, warm-up 10%, clip 1, all params trained)
    steps: int = 200         # the miniature's DDPO; SFT stages of the miniature use sft_steps
    batch_size: int = 32     # pairs (ddpo) or answers (sft) per micro-batch
    grad_accum: int = 1
    lr: float = 1.5e-5       # the miniature's DDPO: faster rates start to teach "say fewer objects"
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
        raise SystemExit(f"{records.path}: {len(records)} rows, fewer than one batch of {cfg.batch_size * world}")
    epoch, skip = divmod(start, per_epoch)
    while True:
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
        order = order[:per_epoch * cfg.batch_size * world].view(per_epoch, world, cfg.batch_size)
        order = order[skip:, rank].tolist()
        yield from torch.utils.data.DataLoader(records, batch_sampler=order, collate_fn=collate,
                                               num_workers=cfg.workers, pin_memory=cfg.device.startswith("cuda"))
        epoch, skip = epoch + 1, 0


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
                raise ValueError(f"{self.path}: no reference log-probs for sample {sid}: the data changed "
                                 "since the cache was computed; delete the file to recompute it")
            now = (int(mask[j].sum()), int(mask[B + j].sum()))
            if (len(c), len(r)) != now:
                raise ValueError(f"{self.path}: sample {sid} has {len(c)}/{len(r)} cached tokens but "
                                 f"{now[0]}/{now[1]} now (another tokenizer or max_len?); delete the "
                                 "file to recompute it")
            out[j][mask[j]], out[B + j][mask[B + j]] = c, r
        return out


@torch.no_grad()
def reference_logps(model, records, batcher, cfg, rank=0, world=1):
    """Compute (once) or load the reference cache. Run before the first update, so the policy is
    still the initial model: the reference never sits beside the policy in memory. With `world`
    ranks, rank r computes records r, r + world, ... (wrapping round, so that all run as many
    forwards, as FSDP's collectives need); every rank receives them all and rank 0 writes the file."""
    from safetensors.torch import load_file, save_file
    path = cfg.ref_cache or os.path.join(cfg.out_dir, "ref_logps.safetensors")
    if os.path.exists(path):
        return RefCache(path, load_file(path))
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
        atomic_write(path, lambda p: save_file(out, p, {"init": cfg.init, "data": cfg.data}))
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
        if os.path.exists(os.path.join(ckpt, ".metadata")):  # sharded (DCP): loaded in train(), once sharded
            return load_model(replace(cfg, resume=False), tok)[0], {"dcp": ckpt}
        try:  # weights_only: tensors and plain containers, never a pickle that runs code
            state = torch.load(path, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
            raise ValueError(f"{path}: refused or unreadable (torch.load weights_only=True): {e}") from None
        return Muffin.from_pretrained(ckpt), state
    if cfg.init:
        return Muffin.from_pretrained(cfg.init), None
    torch.manual_seed(cfg.seed)
    return Muffin(sized(cfg.model, tok.vocab_size, tok.im_patch_id)).init_weights(), None


def save(model, tok_file, path, state=None):
    """Weights + config + tokenizer in `path` (a directory sample.py can load); with `state`, also
    the optimizer, step and RNG. Every file is written atomically."""
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
    rank, world = parallel.setup(cfg)
    tok_file = cfg.tokenizer or os.path.join(cfg.init, "tokenizer.model")
    tok = Tokenizer.from_pretrained(tok_file)  # with the BOS/EOS/pad the JSON files beside it name
    model, state = load_model(cfg, tok)
    check_tokenizer(tok, model.config, tok_file)  # so no id the data makes can fall outside the embedding
    sharded, ddp = cfg.fsdp and world > 1, not cfg.fsdp and world > 1
    place(model, cfg, sharded)
    records = Records(cfg.data)
    batcher = Batcher(tok, model.config.n_query, model.config.vision.img_size, cfg.max_len, cfg.gamma,
                      cfg.min_match)
    ref_cache = reference_logps(model, records, batcher, cfg, rank, world) if cfg.stage == "ddpo" else None
    if sharded:
        model.reshard()  # FSDP2 leaves the root's gathered weights registered after a forward
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=cfg.weight_decay, fused=cfg.device.startswith("cuda"))
    step = restore(state, model, opt)
    fwd = torch.compile(model) if cfg.compile else model
    fwd = DistributedDataParallel(fwd) if ddp else fwd  # `model` stays unwrapped, for saving
    data = batches(records, batcher.sft if cfg.stage == "sft" else batcher.pairs, cfg,
                   step * cfg.grad_accum, rank, world)
    window, skipped = LogWindow(cfg, model, tok.pad_id, rank, world, step), Counter()
    model.train()
    while step < cfg.steps:
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        for micro in range(cfg.grad_accum):
            batch = next(data)
            skipped.update(batch.pop("skipped"))
            if "input_ids" not in batch:  # every row of this micro-batch was skipped
                if world > 1:  # the ranks would fall out of step
                    raise RuntimeError(f"rank {rank}, step {step + 1}: every row of a micro-batch was skipped")
                continue
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
            save_checkpoint(model, opt, step, cfg, tok_file)
    model = parallel.unsharded(model) if sharded else model
    skipped = sum(parallel.gather(skipped, world), Counter())  # every rank's skipped rows
    if rank == 0:
        save(model, tok_file, cfg.out_dir)
        if skipped:
            print(f"{cfg.stage}: skipped rows: " + ", ".join(f"{v} {k}" for k, v in sorted(skipped.items())))
    return model


def place(model, cfg, sharded):
    """What trains (the tower and its queries only without --freeze_vision; set before sharding,
    which reads it), activation checkpointing, and where the weights live: FSDP2 shards or cfg.device."""
    for part in (model.model.vision_tower, model.model.query):
        part.requires_grad_(not cfg.freeze_vision)
    model.grad_checkpointing = cfg.grad_ckpt
    if sharded:
        parallel.shard(model, cfg.device)
    else:
        model.to(cfg.device)


def restore(state, model, opt):
    """Optimizer state and RNG of a resumed run into `opt`; -> the step to continue from (0 when new)."""
    if state is None:
        return 0
    if "dcp" in state:  # a sharded checkpoint, saved on any number of ranks
        state = parallel.load_sharded(model, opt, state["dcp"])
    else:
        opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return state["step"]


class LogWindow:
    """The metrics of the steps since the last log line, summed on the device (no host sync per
    micro-step), written to <out_dir>/log.jsonl and printed every cfg.log_every steps, averaged
    over the micro-steps and the ranks; tokens/s and MFU over the window's wall time."""

    def __init__(self, cfg, model, pad_id, rank, world, step):
        self.cfg, self.pad_id, self.rank, self.world = cfg, pad_id, rank, world
        self.peak, self.t_start, self.start_step = peak_flops(cfg.device), time.time(), step
        self.per_token, self.per_image = train_flops(model, 1, 0), train_flops(model, 0, 1)
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


def save_checkpoint(model, opt, step, cfg, tok_file):
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
             {"optimizer": opt.state_dict(), "step": step, "rng": torch.get_rng_state()})
    atomic_write(os.path.join(cfg.out_dir, "latest"), name)
    for old in os.listdir(cfg.out_dir):
        if old.startswith("ckpt-") and old != name:
            shutil.rmtree(os.path.join(cfg.out_dir, old))


def main(argv):
    cfg = cli.parse_args(TrainConfig, argv, paths=("data", "init", "tokenizer"))
    if cfg.stage == "rlhfv":
        from miniature import rlhfv  # the one place the library reaches into the demonstration
        (rlhfv.scaling if cfg.scaling else rlhfv.sweep if cfg.seeds else rlhfv.run)(cfg, train)
    elif cfg.stage in ("sft", "ddpo"):
        if not cfg.data or (cfg.stage == "ddpo" and not cfg.init):
            raise cli.UsageError(f"--stage={cfg.stage} needs --data" + (" and --init" if cfg.stage == "ddpo" else ""))
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
