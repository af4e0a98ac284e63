"""Tests of vision.py: Multiway routing in BEiT-3, its weight loading and position-table resizing,
and the safe weight reader shared with model.py.

A tiny tower on the CPU; numerical parity with torchscale's BEiT3 is in test_parity.py.
    python -m pytest tests/test_vision.py
"""
import os

import pytest
import torch
from safetensors.torch import save_file

from conftest import assert_close_at_scale
from checkpoint import read_weights
from vision import BEiT3, BEiT3Config, Block

# head dim 64, as in every BEiT-3 release: from_pretrained reads the head count off the width
CFG = BEiT3Config(img_size=32, patch_size=8, dim=64, depth=2, heads=1, ffn_dim=128, text_positions=16)
SPLIT = 1 + CFG.n_patches  # [CLS] + patches go through expert A; what follows through B


def perturb(params, scale=0.1):
    """Add noise, so that LayerNorm gains/biases and the [CLS] token are not at their 1/0 init and
    every weight influences the output."""
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn_like(p))


def tiny_tower():
    torch.manual_seed(0)
    tower = BEiT3(CFG).eval()
    perturb(tower.parameters())
    return tower


def expert_params(module, expert, exclude=()):
    """Parameters of one expert ("A" or "B") of every Multiway pair in module."""
    return [p for n, p in module.named_parameters()
            if f".{expert}." in f".{n}" and not any(e in n for e in exclude)]


@torch.no_grad()
def test_multiway_routes_image_tokens_to_A_and_queries_to_B():
    """In one block, the image tokens (before the split) go through the A experts and the queries
    through B; a query reaches an image token only as a key/value of the shared softmax
    (self_attn_layer_norm.B, then k_proj.B / v_proj.B). So changing any other B weight leaves the
    image-token outputs bit for bit unchanged, while changing B's k_proj, or any A weight, changes
    them."""
    torch.manual_seed(0)
    block = Block(CFG).eval()
    perturb(block.parameters())
    x = torch.randn(2, SPLIT + 5, CFG.dim)
    before = block(x, SPLIT)

    perturb(expert_params(block, "B", exclude=("self_attn_layer_norm", "k_proj", "v_proj")))
    after = block(x, SPLIT)
    assert torch.equal(after[:, :SPLIT], before[:, :SPLIT])
    assert not torch.allclose(after[:, SPLIT:], before[:, SPLIT:])

    perturb(block.self_attn.k_proj.B.parameters())
    assert not torch.allclose(block(x, SPLIT)[:, :SPLIT], after[:, :SPLIT])

    for name, module in block.named_modules():
        if name.endswith(".A"):
            changed = block(x, SPLIT)
            perturb(module.parameters())
            assert not torch.allclose(block(x, SPLIT)[:, :SPLIT], changed[:, :SPLIT]), name


@torch.no_grad()
def test_images_alone_use_only_expert_A():
    """Without extra tokens every token is an image token: no B weight, including position table B,
    affects the output."""
    tower = tiny_tower()
    images = torch.randn(2, 3, CFG.img_size, CFG.img_size)
    before = tower(images)
    assert before.shape == (2, SPLIT, CFG.dim)
    perturb(expert_params(tower, "B"))
    assert torch.equal(tower(images), before)


@torch.no_grad()
def test_from_pretrained_loads_release_layouts(tmp_path):
    """The released BEiT-3 .pth ({"model": {"beit3.*": ...}} with the unused text embedding and
    mask token), and plain state dicts as .safetensors or .pth, load into the same tower."""
    tower = tiny_tower()
    sd = tower.state_dict()
    release = {f"beit3.{k}": v for k, v in sd.items()}
    release["beit3.text_embed.weight"] = torch.randn(10, CFG.dim)
    release["beit3.vision_embed.mask_token"] = torch.randn(1, 1, CFG.dim)
    torch.save({"model": release}, tmp_path / "beit3.pth")
    save_file(sd, tmp_path / "beit3.safetensors")
    torch.save(sd, tmp_path / "plain.pth")
    images, queries = torch.randn(2, 3, CFG.img_size, CFG.img_size), torch.randn(2, 4, CFG.dim)
    want = tower(images, extra=queries)
    for name in ("beit3.pth", "beit3.safetensors", "plain.pth"):
        loaded = BEiT3.from_pretrained(tmp_path / name)
        assert loaded.config == CFG, name
        assert torch.equal(loaded(images, extra=queries), want), name


@torch.no_grad()
def test_from_pretrained_resizes_position_table_A(tmp_path):
    """A new img_size resizes the patch part of position table A bicubically on its 2-D grid and
    keeps its first 3 rows (2 unused + [CLS]) as they are: a grid that varies only along x (one
    vector plus the column index) still varies only along x, so nothing is transposed; table B is
    untouched. At the saved size nothing is resized and the weights load exactly."""
    tower = tiny_tower()
    side = CFG.img_size // CFG.patch_size
    table = tower.encoder.embed_positions.A.weight
    table[3:] = torch.randn(CFG.dim)  # one vector for every patch
    table[3:] += torch.arange(side).repeat(side)[:, None].float()  # + its column index
    torch.save(tower.state_dict(), tmp_path / "beit3.pth")

    same = BEiT3.from_pretrained(tmp_path / "beit3.pth")
    for k, v in tower.state_dict().items():
        assert torch.equal(same.state_dict()[k], v), k

    big = BEiT3.from_pretrained(tmp_path / "beit3.pth", img_size=48)
    new_side = 48 // CFG.patch_size
    new_table = big.encoder.embed_positions.A.weight
    assert new_table.shape == (new_side ** 2 + 3, CFG.dim)
    assert torch.equal(new_table[:3], table[:3])
    grid = new_table[3:].view(new_side, new_side, CFG.dim)
    assert_close_at_scale(grid, grid[:1].expand_as(grid))  # rows alike, up to the interpolation's rounding
    assert not torch.allclose(grid[:, 0], grid[:, -1])  # columns differ
    assert torch.equal(big.encoder.embed_positions.B.weight, tower.encoder.embed_positions.B.weight)
    assert big(torch.randn(1, 3, 48, 48)).shape == (1, new_side ** 2 + 1, CFG.dim)


def test_loading_errors_name_the_offending_keys(tmp_path):
    """A BEiT-3 checkpoint that does not fit names the keys at fault: a missing expert weight, and
    for something that is not a BEiT-3 state dict at all, the key it lacks."""
    sd = tiny_tower().state_dict()
    del sd["encoder.layers.1.ffn.B.fc2.bias"]
    torch.save(sd, tmp_path / "beit3.pth")
    with pytest.raises(ValueError, match=r"missing keys \(1\): encoder\.layers\.1\.ffn\.B\.fc2\.bias"):
        BEiT3.from_pretrained(tmp_path / "beit3.pth")
    torch.save({"encoder.layers.0.ffn.A.fc1.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="vision_embed.proj.weight"):
        BEiT3.from_pretrained(tmp_path / "other.pth")


class RunsCode:
    """Unpickling this calls os.makedirs(path): a stand-in for any code a hostile checkpoint runs."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.makedirs, (self.path,)


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_read_weights_refuses_a_pickle_that_runs_code(tmp_path, zipfile):
    """A .bin (torch.save's zip format, or the legacy one) whose unpickling would call a function is
    refused with a ValueError and the function never runs; the control shows that an unrestricted
    torch.load would have run it."""
    marker = str(tmp_path / "ran")
    path = tmp_path / "pytorch_model.bin"
    payload = {"evil": RunsCode(marker), "model.norm.weight": torch.ones(2)}
    torch.save(payload, path, _use_new_zipfile_serialization=zipfile)
    with pytest.raises(ValueError, match="refused"):
        read_weights(path)
    assert not os.path.exists(marker)

    torch.load(path, weights_only=False)
    assert os.path.exists(marker)
