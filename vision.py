"""BEiT-3, the Multiway vision transformer of Muffin (Wang et al. 2022; torchscale v0.2.0 layout).

Every Linear and LayerNorm is a pair of experts {A, B}: tokens before the split position (the
[CLS] token and the image patches) go through A, the tokens appended after them (Muffin's 64 learned
queries) through B, while attention is one softmax over the whole sequence. Pre-LN blocks with
Sub-LN: a LayerNorm before the attention output projection and another before fc2.

    from vision import BEiT3
    tower = BEiT3.from_pretrained("beit3_large_patch16_224.pth", img_size=448)
    h = tower(images, extra=queries)   # [B, 1 + patches + N, D]

Tests: python -m pytest tests/test_vision.py
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import load_exact, read_weights


@dataclass
class BEiT3Config:
    img_size: int = 224      # input resolution; the image position table has (img/patch)^2 + 3 rows
    patch_size: int = 16
    dim: int = 768           # 768 base, 1024 large
    depth: int = 12          # 12 base, 24 large
    heads: int = 12          # head dim 64 in every released size
    ffn_dim: int = 3072
    text_positions: int = 1024  # rows of position table B (queries use rows 2..N+1)
    eps: float = 1e-5

    @property
    def n_patches(self):
        return (self.img_size // self.patch_size) ** 2


class Multiway(nn.Module):
    """Two copies of a module: A for the first `split` tokens, B for the rest."""

    def __init__(self, make):
        super().__init__()
        self.A, self.B = make(), make()

    def forward(self, x, split):
        if split >= x.shape[1]:
            return self.A(x)
        return torch.cat([self.A(x[:, :split]), self.B(x[:, split:])], dim=1)


class FFN(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.ffn_dim)
        self.ffn_layernorm = nn.LayerNorm(cfg.ffn_dim, eps=cfg.eps)  # Sub-LN
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.dim)

    def forward(self, x):
        h = self.fc1(x)
        h = F.gelu(h.float()).type_as(h)  # exact (erf) GELU in fp32, as torchscale computes it
        return self.fc2(self.ffn_layernorm(h))


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.heads = cfg.heads
        linear = lambda: nn.Linear(cfg.dim, cfg.dim)
        self.q_proj, self.k_proj, self.v_proj = Multiway(linear), Multiway(linear), Multiway(linear)
        self.inner_attn_ln = Multiway(lambda: nn.LayerNorm(cfg.dim, eps=cfg.eps))  # Sub-LN
        self.out_proj = Multiway(linear)

    def forward(self, x, split):
        B, T, D = x.shape
        q, k, v = (p(x, split).view(B, T, self.heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)  # bidirectional: no mask
        y = y.transpose(1, 2).reshape(B, T, D)
        return self.out_proj(self.inner_attn_ln(y, split), split)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.self_attn_layer_norm = Multiway(lambda: nn.LayerNorm(cfg.dim, eps=cfg.eps))
        self.self_attn = Attention(cfg)
        self.final_layer_norm = Multiway(lambda: nn.LayerNorm(cfg.dim, eps=cfg.eps))
        self.ffn = Multiway(lambda: FFN(cfg))

    def forward(self, x, split):
        x = x + self.self_attn(self.self_attn_layer_norm(x, split), split)
        return x + self.ffn(self.final_layer_norm(x, split), split)


class PatchEmbed(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))

    def forward(self, images):
        x = self.proj(images).flatten(2).transpose(1, 2)  # [B, patches, D]
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_positions = nn.Module()
        self.embed_positions.A = nn.Embedding(cfg.n_patches + 3, cfg.dim)  # 2 unused + cls + patches
        self.embed_positions.B = nn.Embedding(cfg.text_positions, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.layer_norm = Multiway(lambda: nn.LayerNorm(cfg.dim, eps=cfg.eps))

    def forward(self, x, split):
        """x [B, T, D]: `split` image tokens, then the extra tokens. Positions start at 2 (fairseq's
        convention), counted separately in each expert's table."""
        pos_a = self.embed_positions.A.weight[2:2 + split]
        pos_b = self.embed_positions.B.weight[2:2 + x.shape[1] - split]
        x = x + torch.cat([pos_a, pos_b])
        for layer in self.layers:
            x = layer(x, split)
        return self.layer_norm(x, split)


class BEiT3(nn.Module):
    def __init__(self, cfg: BEiT3Config):
        super().__init__()
        self.config = cfg
        self.vision_embed = PatchEmbed(cfg)
        self.encoder = Encoder(cfg)

    def forward(self, images, extra=None):
        """images [B, 3, H, W] normalised; extra [B, N, D] token embeddings routed through expert B.
        Returns the final hidden states [B, 1 + patches + N, D]."""
        x = self.vision_embed(images)
        split = x.shape[1]
        if extra is not None:
            x = torch.cat([x, extra], dim=1)
        return self.encoder(x, split)

    @classmethod
    def from_pretrained(cls, path, **overrides):
        """Load official BEiT-3 weights (keys with or without `beit3.`) from .safetensors or .pth.
        The shape comes from the weights; keyword arguments override BEiT3Config fields, and a new
        img_size resizes position table A bicubically, as Muffin does when it changes resolution."""
        sd = read_weights(path)
        if any(k.startswith("beit3.") for k in sd):
            sd = {k[len("beit3."):]: v for k, v in sd.items() if k.startswith("beit3.")}
        cfg = BEiT3Config(**{**config_from_weights(sd), **overrides})
        sd = resize_positions(sd, cfg)
        with torch.device("meta"):
            model = cls(cfg)
        load_exact(model, sd, str(path), ignore=BEIT3_IGNORED)
        return model


# Parts of the released BEiT-3 that Muffin never uses: the text embedding (Muffin feeds its queries
# as embeddings) and the masked-image-modelling token. Present or not, they are skipped.
BEIT3_IGNORED = ("text_embed.", "vision_embed.mask_token")


def config_from_weights(sd):
    """BEiT3Config fields read off a state dict. All but one: the head count is a guess, dim // 64,
    since the weights cannot tell it (q, k, v are dim x dim however they split into heads); it holds
    for every released BEiT-3 (base 768 / 12, large 1024 / 16). BEiT3.from_pretrained(path, heads=)
    overrides it, and Muffin.from_pretrained reads it from config.json's vision_config when present."""
    try:
        dim, _, patch, _ = sd["vision_embed.proj.weight"].shape
        depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
        ffn = sd["encoder.layers.0.ffn.A.fc1.weight"].shape[0]
        rows = sd["encoder.embed_positions.A.weight"].shape[0]
        text = sd["encoder.embed_positions.B.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise ValueError(f"not a BEiT-3 state dict: missing or malformed {e}") from None
    side = math.isqrt(rows - 3)
    return dict(img_size=side * patch, patch_size=patch, dim=dim, depth=depth, heads=dim // 64,
                ffn_dim=ffn, text_positions=text)


def resize_positions(sd, cfg):
    """Bicubically resize the image position table to cfg.img_size (keeping the first 3 rows)."""
    table = sd["encoder.embed_positions.A.weight"]
    if table.shape[0] == cfg.n_patches + 3:
        return sd
    old, new = math.isqrt(table.shape[0] - 3), cfg.img_size // cfg.patch_size
    grid = table[3:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new * new, -1).to(table.dtype)
    return {**sd, "encoder.embed_positions.A.weight": torch.cat([table[:3], grid])}
