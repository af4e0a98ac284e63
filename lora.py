"""LoRA (Hu et al. 2021, arXiv 2106.09685): low-rank adapters on chosen Linear layers, the base frozen,
saved in PEFT's own layout (an adapter trained here loads with `peft` onto transformers' model, and
one trained with `peft` loads here). What makes DDPO of Muffin-13B fit one GPU (docs/one-gpu.md).

    python train.py --stage=ddpo --init=sft --data=pairs.jsonl --lora_rank=64 --out_dir=out/lora
    python sample.py --ckpt=out/lora --image=a.png            # loads the base it names, applies it
    python lora.py --adapter=out/lora --out=out/merged        # full merged weights, in the base's dtype
    python -m pytest tests/test_lora.py

    import lora
    lora.apply(model, rank=64, alpha=16, dropout=0.05, targets=lora.TARGETS, base="sft")
    lora.save_pretrained(model, "out/lora")   # adapter_model.safetensors + adapter_config.json
    model = lora.from_pretrained("out/lora")  # a plain Muffin: the base with the adapter merged

A targeted Linear computes y = x W^T + b + (alpha / r) dropout(x) A^T B^T with A [r, in] random and
B [out, r] zero, so that before the first update the model is exactly its base.
"""
import json
import math
import os
import shutil
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
from cli import InputError
from checkpoint import atomic_write
from data import TOKEN_FILES
from model import Muffin

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # in every decoder block
OPT_IN = ("mm_projector",)  # the projector from the queries into the decoder
VISION = ("model.vision_tower", "model.query")  # --lora_vision: trained in full beside the adapters
PREFIX = "base_model.model."  # PEFT's names: its wrappers' attribute path in front of the model's own


class LoRALinear(nn.Linear):
    """A Linear with an adapter. It shares the wrapped layer's weight and bias (nothing is copied),
    so the model's own state-dict keys stay as they were; A and B are fp32 whatever W's dtype."""

    def __init__(self, base: nn.Linear, rank, alpha, dropout):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default, as nn.Linear's weight
        self.scale = alpha / rank
        # dropout saves a mask and a dropped-out copy of the input for every adapter: skip it at 0
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        h = self.dropout(x)
        if not torch.is_autocast_enabled(h.device.type):  # bf16 weights decoding without autocast
            h = h.to(self.lora_A.dtype)
        return y + (self.scale * F.linear(F.linear(h, self.lora_A), self.lora_B)).to(y.dtype)

    def merged(self):
        """A plain Linear holding W + (alpha / r) B A, computed in fp32, in W's dtype."""
        out = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            w = self.weight.float() + self.scale * (self.lora_B.float() @ self.lora_A.float())
            out.weight.copy_(w)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


@dataclass
class Settings:
    """What adapter_config.json records (PEFT's field names)."""
    r: int
    lora_alpha: float
    lora_dropout: float
    target_modules: list
    base_model_name_or_path: str
    modules_to_save: tuple = ()  # parts trained in full (VISION or nothing), saved whole


def parse_targets(text):
    """'q_proj,v_proj' -> the names, each checked: an unknown name is a usage error listing the valid ones."""
    names = [t for t in text.split(",") if t]
    bad = [t for t in names if t not in TARGETS + OPT_IN]
    if bad or not names:
        raise cli.UsageError(f"--lora_targets: unknown {','.join(bad) or '(none given)'}; valid: "
                             + ",".join(TARGETS + OPT_IN))
    return names


def targeted(model, targets):
    """(module path, Linear) of every layer the adapters go on: the named projections of each decoder
    block, and the projector when 'mm_projector' is named."""
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        in_block = name.startswith("model.layers.")
        if isinstance(module, nn.Linear) and leaf in targets and (in_block or leaf in OPT_IN):
            yield name, module


def apply(model, rank, alpha, dropout, targets=TARGETS, base="", full=()):
    """Freeze every weight of `model` and put a fresh adapter on each targeted Linear (in place);
    `base` is the checkpoint the adapter is trained on, recorded in adapter_config.json. The parts
    named in `full` (VISION, or nothing) train whole instead, in fp32 whatever the base's dtype
    (AdamW needs master weights), as PEFT's modules_to_save."""
    if rank < 1:
        raise cli.UsageError(f"--lora_rank={rank}: must be a positive rank (0 turns LoRA off)")
    model.requires_grad_(False)
    for name, linear in list(targeted(model, targets)):
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, LoRALinear(linear, rank, alpha, dropout))
    model.lora = Settings(rank, alpha, dropout, sorted(set(targets)), base, tuple(full))
    for _, p in trained_in_full(model):
        p.data = p.data.float()
        p.requires_grad_(True)
    return model


def trained_in_full(model):
    """(name, parameter) of every weight in the parts the adapter's settings train whole."""
    parts = model.lora.modules_to_save
    return [(n, p) for n, p in model.named_parameters() if any(n == m or n.startswith(m + ".") for m in parts)]


def adapters(model):
    """{module path: LoRALinear} of a model with adapters."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge(model):
    """Fold every adapter into its weight and restore plain Linears (in place): the model's own layout."""
    for name, m in adapters(model).items():
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, m.merged())
    dtype = model.lm_head.weight.dtype
    for _, p in trained_in_full(model):  # back to the base's dtype, as the rest
        p.data = p.data.to(dtype)
    model.__dict__.pop("lora", None)
    return model


def state_dict(model):
    """The adapter weights under PEFT's key names: base_model.model.<module path>.lora_A.weight, and
    the weights trained in full under their own: base_model.model.<parameter name>."""
    return {**{f"{PREFIX}{name}.lora_{ab}.weight": getattr(m, f"lora_{ab}").detach().contiguous()
               for name, m in adapters(model).items() for ab in "AB"},
            **{PREFIX + name: p.detach().contiguous() for name, p in trained_in_full(model)}}


def save_pretrained(model, path):
    """adapter_model.safetensors and adapter_config.json, as PEFT's save_pretrained writes them."""
    from safetensors.torch import save_file
    s = model.lora
    os.makedirs(path, exist_ok=True)
    atomic_write(os.path.join(path, "adapter_model.safetensors"),
                 lambda p: save_file(state_dict(model), p, {"format": "pt"}))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": s.r, "lora_alpha": s.lora_alpha,
              "lora_dropout": s.lora_dropout, "target_modules": s.target_modules,
              "base_model_name_or_path": s.base_model_name_or_path, "bias": "none", "fan_in_fan_out": False,
              "inference_mode": True, "init_lora_weights": True,
              "modules_to_save": list(s.modules_to_save) or None,
              "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}}
    atomic_write(os.path.join(path, "adapter_config.json"), json.dumps(config, indent=2))


def is_adapter(path):
    return os.path.exists(os.path.join(path, "adapter_config.json"))


def read_settings(path):
    """The Settings of an adapter directory; a config PEFT features we do not implement is refused."""
    file = os.path.join(path, "adapter_config.json")
    with open(file) as f:
        d = json.load(f)
    for key, plain in (("peft_type", "LORA"), ("bias", "none"), ("use_dora", False), ("use_rslora", False),
                       ("fan_in_fan_out", False), ("rank_pattern", {}), ("alpha_pattern", {}),
                       ("lora_bias", False)):
        if d.get(key) not in (plain, None):
            raise InputError(f"{file}: {key}={d[key]!r} is not supported (expected {plain!r})")
    targets = d["target_modules"]
    targets = [targets] if isinstance(targets, str) else targets
    full = tuple(d.get("modules_to_save") or ())
    if full and sorted(full) != sorted(VISION):
        raise InputError(f"{file}: modules_to_save={list(full)} is not supported (expected {list(VISION)} or none)")
    return Settings(int(d["r"]), float(d["lora_alpha"]), float(d.get("lora_dropout", 0.0)), sorted(targets),
                    d.get("base_model_name_or_path") or "", full)


def load_adapter(model, path):
    """An adapter directory's weights into a model with adapters of the same rank and targets (exact)."""
    from safetensors.torch import load_file
    file = os.path.join(path, "adapter_model.safetensors")
    sd, want = load_file(file), state_dict(model)
    missing, unexpected = sorted(want.keys() - sd.keys()), sorted(sd.keys() - want.keys())
    shapes = [k for k in want.keys() & sd.keys() if want[k].shape != sd[k].shape]
    if missing or unexpected or shapes:
        raise InputError(f"{file}: adapter does not fit the model: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}, mis-shaped {shapes[:3]}")
    with torch.no_grad():
        for name, m in adapters(model).items():
            m.lora_A.copy_(sd[f"{PREFIX}{name}.lora_A.weight"])
            m.lora_B.copy_(sd[f"{PREFIX}{name}.lora_B.weight"])
        for name, p in trained_in_full(model):
            p.copy_(sd[PREFIX + name])
    return model


def base_path(path, settings):
    """The base an adapter names: as written (a path from where it was trained), else relative to
    the adapter directory."""
    base = settings.base_model_name_or_path
    for candidate in (base, os.path.join(path, base)):
        if base and (os.path.exists(os.path.join(candidate, "config.json")) or is_adapter(candidate)):
            return candidate
    raise InputError(f"{os.path.join(path, 'adapter_config.json')}: base model {base!r} not found "
                     "(as written, or relative to the adapter directory)")


def from_pretrained(path, dtype=None):
    """A checkpoint directory as a plain Muffin: full weights (Muffin.from_pretrained), or an adapter
    directory, whose base (full weights or itself an adapter) is loaded and the adapter merged in."""
    if not is_adapter(path):
        return Muffin.from_pretrained(path, dtype)
    s = read_settings(path)
    model = from_pretrained(base_path(path, s))
    model = merge(load_adapter(apply(model, s.r, s.lora_alpha, 0.0, s.target_modules, full=s.modules_to_save), path))
    return model.requires_grad_(True).to(dtype) if dtype else model.requires_grad_(True)


@dataclass
class MergeConfig:
    adapter: str = ""        # an adapter directory (train.py --lora_rank's output)
    out: str = ""            # where the merged weights go: config.json, model.safetensors, tokenizer


def main(argv):
    cfg = cli.parse_args(MergeConfig, argv, paths=("adapter",))
    if not cfg.adapter or not cfg.out or not is_adapter(cfg.adapter):
        raise cli.UsageError("needs --adapter=<adapter directory> and --out=<directory>")
    from_pretrained(cfg.adapter).save_pretrained(cfg.out)
    for name in ("tokenizer.model", *TOKEN_FILES):  # the tokenizer and its BOS/EOS/pad go with it
        if os.path.exists(os.path.join(cfg.adapter, name)):
            shutil.copy(os.path.join(cfg.adapter, name), os.path.join(cfg.out, name))
    print(f"{cfg.out}: the base of {cfg.adapter} with the adapter merged")


if __name__ == "__main__":
    cli.run(main)
