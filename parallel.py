"""Data parallel training over torchrun's ranks, for train.py: the process group, FSDP2 sharding,
sharded (DCP) checkpoints and the few collectives the loop needs. One process per device; a plain
`python train.py` is rank 0 of 1 and never reaches a collective.

    torchrun --nproc_per_node=8 train.py --stage=ddpo ...              # DDP: a whole copy per rank
    torchrun --nproc_per_node=8 train.py --stage=ddpo ... --fsdp=True  # FSDP2: weights, grads, AdamW sharded
    python -m pytest tests/test_distributed.py                         # 2 CPU ranks (gloo) = 1 process
"""
import os

import torch
import torch.distributed as dist

from model import Muffin


def setup(cfg):
    """Join the process group when launched by torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK; nccl
    on CUDA, gloo on the CPU) and pick this rank's device; -> (rank, world size), (0, 1) otherwise."""
    if "RANK" not in os.environ:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
    if cfg.device.startswith("cuda"):
        cfg.device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(cfg.device)
    return dist.get_rank(), dist.get_world_size()


def shard(model, device):
    """FSDP2: every BEiT-3 block and every LLaMA decoder block is a unit whose weights are gathered
    just before it runs and freed after; the root holds the rest (embeddings, head, projector).
    On CUDA the gathered copies are bf16 and gradients are reduced in fp32 onto fp32 master shards.
    Also moves each rank's shards to its device."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if device.startswith("cuda") else MixedPrecisionPolicy()
    for block in [*model.model.vision_tower.beit3.encoder.layers, *model.model.layers]:
        fully_shard(block.float(), mp_policy=mp)  # fp32 master weights, whatever the checkpoint's dtype
    fully_shard(model.float(), mp_policy=mp)


def _sharded_state(model, opt, step=0):
    """Weights and AdamW state by name (this rank's shards), step and RNG."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    weights, optimizer = get_state_dict(model, opt)
    return {"model": weights, "optimizer": optimizer, "step": step, "rng": torch.get_rng_state()}


def save_sharded(model, opt, step, path):
    """Every rank writes its shards (DCP); returns once all are written. Loadable on any number of ranks."""
    import torch.distributed.checkpoint as dcp
    dcp.save(_sharded_state(model, opt, step), checkpoint_id=path)


def load_sharded(model, opt, path):
    """Into an already sharded model and its optimizer; -> the checkpoint's {step, rng}."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict
    state = _sharded_state(model, opt)
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return state


def unsharded(model):
    """The full weights gathered on rank 0's CPU, as a plain Muffin there (None on other ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"):
        plain = Muffin(model.config)
    plain.load_state_dict(weights, assign=True)
    return plain


def gather(obj, world):
    """Every rank's picklable obj, as a list on every rank ([obj] with one process)."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def sum_over_ranks(x, world):
    """A tensor summed over the ranks (itself with one process): one all_reduce."""
    if world > 1:
        dist.all_reduce(x)
    return x
