"""Checkpoint files: reading weights safely, loading them exactly, writing files atomically.

    from checkpoint import read_checkpoint, load_exact, atomic_write
    sd = read_checkpoint("RLHF-V")          # an HF-layout directory: one file or shards + index
    load_exact(model, sd, "RLHF-V")         # every missing, unexpected or mis-shaped key, in one error
    atomic_write("out/latest", "ckpt-100")  # the old file or the new one, never half of either

Weights load through safetensors or torch.load(weights_only=True): a pickle that would run code
is refused. A directory or file that is not what is expected (no config.json, no weights, a
truncated file, keys that do not fit) is a cli.InputError naming it.
Tests: python -m pytest tests/test_model.py tests/test_vision.py tests/test_robustness.py
"""
import json
import os
import pickle

import torch

from cli import InputError


def read_config(path):
    """The config.json of a checkpoint directory, as a dict."""
    file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise InputError(f"{path}: not a directory; a checkpoint is a directory with config.json and weights")
    if not os.path.isfile(file):
        raise InputError(f"{path}: no config.json: not a checkpoint directory (config.json + model.safetensors)")
    try:
        with open(file) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{file}: not JSON ({e})") from None


def read_checkpoint(path):
    """All tensors of a checkpoint directory: a shard index (safetensors or .bin) or one file."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if os.path.exists(os.path.join(path, index)):
            with open(os.path.join(path, index)) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            sd = {}
            for shard in shards:
                sd.update(read_weights(os.path.join(path, shard)))
            return sd
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.exists(os.path.join(path, name)):
            return read_weights(os.path.join(path, name))
    raise InputError(f"{path}: no weights (model.safetensors, pytorch_model.bin or a shard index)")


def atomic_write(path, content):
    """Write content (bytes, str, or a function that writes the file at the path it is given) to a
    temporary file, fsync it, then rename it over path: a crash leaves the old file or the new."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        if callable(content):
            content(tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(content.encode() if isinstance(content, str) else content)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # an error or Ctrl-C half-way: no partial file left behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_weights(path):
    """A flat {name: tensor} from .safetensors, or .pth/.bin/.pt through torch.load(weights_only=True),
    which refuses any pickle that would construct arbitrary objects (i.e. run code)."""
    path = str(path)
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such weight file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except Exception as e:  # SafetensorError (truncated, not safetensors), OSError
            raise InputError(f"{path}: unreadable as safetensors (truncated or another format?): {e}") from None
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # mmap needs the zip format; legacy files load without it
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise InputError(f"{path}: refused to load (weights_only=True): {e}") from None
    except (RuntimeError, EOFError, OSError) as e:  # truncated, or not a torch file
        raise InputError(f"{path}: unreadable by torch.load (truncated or another format?): "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    for wrapper in ("model", "module", "state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise InputError(f"{path}: not a flat state dict of tensors")
    return sd


def load_exact(module, sd, source, ignore=(), optional=()):
    """Load sd into module (built on the meta device; tensors are assigned, not copied).
    Any missing, unexpected or mis-shaped key raises one error that lists them all. Keys containing
    a string of `ignore` are dropped; keys in `optional` may be missing (e.g. a tied head)."""
    sd = {k: v for k, v in sd.items() if not any(s in k for s in ignore)}
    want = module.state_dict()
    missing = sorted(k for k in want if k not in sd and k not in optional)
    unexpected = sorted(k for k in sd if k not in want)
    shapes = sorted(f"{k}: {tuple(sd[k].shape)} (expected {tuple(want[k].shape)})"
                    for k in sd if k in want and sd[k].shape != want[k].shape)
    if missing or unexpected or shapes:
        lines = [f"{source}: checkpoint does not fit {type(module).__name__}"]
        for name, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                           ("mis-shaped keys", shapes)):
            if keys:
                lines.append(f"  {name} ({len(keys)}): " + ", ".join(keys[:20])
                             + (" ..." if len(keys) > 20 else ""))
        raise InputError("\n".join(lines))
    module.load_state_dict(sd, strict=False, assign=True)
