"""Training: SFT and dense DPO (DDPO) of Muffin, and the miniature RLHF-V that runs by default.

    python train.py                                  # the whole miniature RLHF-V, offline (see README)
    python train.py --gamma=1                        # ... with vanilla DPO: the paper's Table 3 ablation
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
import sys
import time
from dataclasses import dataclass, replace

import torch
from torch.nn.parallel import DistributedDataParallel

import ddpo
import parallel
from data import Batcher, Records, Tokenizer
from model import Muffin, atomic_write, peak_flops, sized, train_flops
from sample import check_tokenizer, parse_args


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
    steps: int = 100         # the miniature's DDPO (seed 0: 9.7% hallucinated after 100, 9.2% after 150)
    batch_size: int = 32     # pairs (ddpo) or answers (sft) per micro-batch
    grad_accum: int = 1
    lr: float = 5e-6         # the miniature's DDPO (1e-5 for 300 steps over-corrects into undercounting)
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
    vision_steps: int = 800  # the tower learns to see first (rlhfv.pretrain_vision)
    vision_lr: float = 1e-3  # (2e-3: 95.7 / 86.4% of held-out cells right after 800 steps, seeds 1 / 2)
    sft_steps: int = 1000
    sft_lr: float = 2e-3     # (seed 0, same tower: 1e-3 -> 28.5% of answers hallucinated, 2e-3 -> 22.0%)
    ablation: bool = False   # also run vanilla DPO (gamma 1) and SFT on the corrected answers
    paper_decoding: bool = False  # evaluate every arm with RLHF-V's 3 beams, repetition penalty 1.1


def lr_at(step, cfg, lr):
    """Linear warm-up, then cosine decay to 0 at cfg.steps."""
    warm = max(1, int(cfg.warmup * cfg.steps))
    if step < warm:
        return lr * (step + 1) / warm
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, cfg.steps - warm)))


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


def forward_loss(model, batch, cfg, stage):
    """The loss of one micro-batch and its metrics (0-d tensors)."""
    logits = model(batch["input_ids"], images=batch["images"], image_index=batch["image_index"])
    logp, mask = ddpo.token_logps(logits, batch["labels"])
    if stage == "sft":
        nll = -logp.sum() / mask.sum()
        return nll, {"loss": nll.detach()}
    B = len(logp) // 2  # chosen rows, then rejected rows
    pi = ddpo.weighted_scores(logp, mask, batch["weights"], cfg.average)
    ref = ddpo.weighted_scores(batch["ref_logps"], mask, batch["weights"], cfg.average)
    losses, r_w, r_l = ddpo.ddpo_loss(pi[:B], pi[B:], ref[:B], ref[B:], cfg.beta)
    loss = losses.mean()
    if cfg.sft_weight:  # a per-token NLL anchor on the chosen answers, whatever the score mode
        loss = loss - cfg.sft_weight * logp[:B].sum() / mask[:B].sum()
    return loss, {"loss": loss.detach(), **ddpo.ddpo_metrics(r_w, r_l, pi[:B], pi[B:], ref[:B], ref[B:])}


class RefCache:
    """Per-token log-probs of every answer under the reference model, keyed "<sample id>/chosen"
    and "<sample id>/rejected". Sample ids hash the content, so edited data is not silently
    matched to stale numbers: a missing id or a different token count is an error."""

    def __init__(self, path, tensors):
        self.path, self.tensors = path, tensors

    def lookup(self, sid, n_chosen, n_rejected):
        c, r = self.tensors.get(f"{sid}/chosen"), self.tensors.get(f"{sid}/rejected")
        if c is None or r is None:
            raise ValueError(f"{self.path}: no reference log-probs for sample {sid}: the data changed "
                             "since the cache was computed; delete the file to recompute it")
        if (len(c), len(r)) != (n_chosen, n_rejected):
            raise ValueError(f"{self.path}: sample {sid} has {len(c)}/{len(r)} cached tokens but "
                             f"{n_chosen}/{n_rejected} now (another tokenizer or max_len?); delete the "
                             "file to recompute it")
        return c, r


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
        logp, mask, B = logp.cpu(), mask.cpu(), len(batch["ids"])
        for j, sid in enumerate(batch["ids"]):
            out[f"{sid}/chosen"], out[f"{sid}/rejected"] = logp[j][mask[j]], logp[B + j][mask[B + j]]
    out = {k: v for part in parallel.gather(out, world) for k, v in part.items()}
    if rank == 0:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        atomic_write(path, lambda p: save_file(out, p, {"init": cfg.init, "data": cfg.data}))
    model.train(was_training)
    return RefCache(path, out)


def autocast(device):
    """bf16 autocast on CUDA (fp32 master weights); plain fp32 on the CPU."""
    return torch.autocast("cuda", torch.bfloat16, enabled=str(device).startswith("cuda"))


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
    if state is not None:
        atomic_write(os.path.join(path, "state.pt"), lambda p: torch.save(state, p))


def train(cfg, stage):
    """SFT (teacher-forced NLL of the answers) or DDPO on cfg.data; returns the trained model.
    Under torchrun: data parallel over the ranks, with DDP, or with FSDP2 given --fsdp."""
    rank, world = parallel.setup(cfg)
    tok_file = cfg.tokenizer or os.path.join(cfg.init, "tokenizer.model")
    tok = Tokenizer(tok_file)
    model, state = load_model(cfg, tok)
    check_tokenizer(tok, model, tok_file)  # so no id the data makes can fall outside the embedding
    c = model.config
    for part in (model.model.vision_tower, model.model.query):  # before sharding: FSDP2 reads it
        part.requires_grad_(not cfg.freeze_vision)
    model.grad_checkpointing = cfg.grad_ckpt
    sharded, ddp = cfg.fsdp and world > 1, not cfg.fsdp and world > 1
    if sharded:
        parallel.shard(model, cfg.device)
    else:
        model.to(cfg.device)
    records = Records(cfg.data)
    batcher = Batcher(tok, c.n_query, c.vision.img_size, cfg.max_len, cfg.gamma, cfg.min_match)
    if stage == "ddpo":
        batcher.ref = reference_logps(model, records, batcher, cfg, rank, world)
    if sharded:
        model.reshard()  # FSDP2 leaves the root's gathered weights registered after a forward
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=cfg.weight_decay, fused=cfg.device.startswith("cuda"))
    step = 0
    if state is not None and "dcp" in state:  # a sharded checkpoint, saved on any number of ranks
        state = parallel.load_sharded(model, opt, state["dcp"])
    elif state is not None:
        opt.load_state_dict(state["optimizer"])
    if state is not None:
        torch.set_rng_state(state["rng"])
        step = state["step"]
    fwd = torch.compile(model) if cfg.compile else model
    fwd = DistributedDataParallel(fwd) if ddp else fwd  # `model` stays unwrapped, for saving
    data = batches(records, batcher.sft if stage == "sft" else batcher.pairs, cfg, step * cfg.grad_accum,
                   rank, world)
    os.makedirs(cfg.out_dir, exist_ok=True)
    log = open(os.path.join(cfg.out_dir, "log.jsonl"), "a") if rank == 0 else None
    peak, flops = peak_flops(cfg.device), 0.0
    per_token, per_image = train_flops(model, 1, 0), train_flops(model, 0, 1)  # for MFU
    skipped, window, t0, t_start, start_step = {}, {}, time.time(), time.time(), step
    model.train()
    while step < cfg.steps:
        lr = lr_at(step, cfg, cfg.lr)
        for group in opt.param_groups:
            group["lr"] = lr
        for micro in range(cfg.grad_accum):
            batch = next(data)
            for k, v in batch.pop("skipped").items():
                skipped[k] = skipped.get(k, 0) + v
            if "input_ids" not in batch and world > 1:  # the ranks would fall out of step
                raise RuntimeError(f"rank {rank}, step {step + 1}: every row of a micro-batch was skipped")
            if "input_ids" not in batch:
                continue  # every row of this micro-batch was skipped
            batch = to_device(batch, cfg.device)
            # DDP all-reduces gradients during backward; before the last micro-step that traffic
            # would be wasted (the sum is not finished), so no_sync() lets them accumulate locally
            with fwd.no_sync() if ddp and micro < cfg.grad_accum - 1 else contextlib.nullcontext():
                with autocast(cfg.device):
                    loss, metrics = forward_loss(fwd, batch, cfg, stage)
                (loss / cfg.grad_accum).backward()
            metrics["tokens"] = (batch["input_ids"] != tok.pad_id).sum()
            metrics["rows"] = torch.tensor(float(len(batch["input_ids"])))
            flops += per_token * batch["input_ids"].numel() + per_image * len(batch["images"])
            for k, v in metrics.items():  # summed on the device: no host sync per micro-step
                window[k] = window.get(k, 0) + v.float()
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
        window["grad_norm"] = window.get("grad_norm", 0) + norm
        if (step % cfg.log_every == 0 or step == cfg.steps) and "loss" not in window:
            window, t0, flops = {}, time.time(), 0.0  # every row since the last line was skipped (counted)
        elif step % cfg.log_every == 0 or step == cfg.steps:
            n, dt = cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every, time.time() - t0
            window = parallel.average(window, world)
            rec = {k: v.item() / (n * (1 if k in ("tokens", "rows", "grad_norm") else cfg.grad_accum))
                   for k, v in window.items()}
            tok_s = rec.pop("tokens") * n / dt
            rows_s = rec.pop("rows") * n / dt
            rec.update(step=step, lr=lr, tokens_per_s=tok_s, mfu=peak and flops / dt / peak)
            if stage == "ddpo":
                rec["pairs_per_s"] = rows_s / 2  # a pair is two rows
            else:
                rec["rows_per_s"] = rows_s
            elapsed = time.time() - t_start
            eta = elapsed / (step - start_step) * (cfg.steps - step)
            if rank == 0:
                log.write(json.dumps(rec) + "\n")
                log.flush()
                print(f"{stage} {step}/{cfg.steps} loss {rec['loss']:.4f}"
                      + (f" margin {rec['rewards/margins']:.3f} acc {rec['rewards/accuracies']:.2f}"
                         if stage == "ddpo" else "")
                      + f" lr {lr:.2e} | {tok_s:,.0f} tok/s"
                      + (f" mfu {rec['mfu']:.1%}" if peak else "")
                      + f" | {elapsed:.0f}s, eta {eta:.0f}s", flush=True)
            window, t0, flops = {}, time.time(), 0.0
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_checkpoint(model, opt, step, cfg, tok_file)
    model = parallel.unsharded(model) if sharded else model
    counts = parallel.gather(skipped, world)  # every rank's count of skipped rows
    skipped = {k: sum(part.get(k, 0) for part in counts) for part in counts for k in part}
    if rank == 0:
        save(model, tok_file, cfg.out_dir)
    if skipped and rank == 0:
        print(f"{stage}: skipped rows: " + ", ".join(f"{v} {k}" for k, v in sorted(skipped.items())))
    return model


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
    cfg = parse_args(TrainConfig, argv)
    if cfg.stage == "rlhfv":
        from rlhfv import run  # the miniature's stages, written on top of this file
        run(cfg)
    elif cfg.stage in ("sft", "ddpo"):
        if not cfg.data or (cfg.stage == "ddpo" and not cfg.init):
            raise SystemExit(f"--stage={cfg.stage} needs --data" + (" and --init" if cfg.stage == "ddpo" else ""))
        train(cfg, cfg.stage)
        if torch.distributed.is_initialized():
            # all ranks at once: a rank that tore gloo down while rank 0 was still saving once died
            # in the teardown (SIGABRT, "terminate called without an active exception")
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
    else:
        raise SystemExit(f"--stage must be rlhfv, sft or ddpo, not {cfg.stage!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
