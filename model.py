"""LLaMA and Muffin, the multimodal model of RLHF-V (Yu et al. 2023, arXiv 2310.00653).

Muffin = BEiT-3 (vision.py) whose 64 learned query tokens, appended after the image patches and
routed through the language expert, are projected by one Linear into a LLaMA decoder, where they
replace the embeddings of the <im_patch> slots between <im_start> and <im_end>.

Module names mirror transformers' LlamaForCausalLM and the Muffin/RLHF-V release, so checkpoints
load key for key: `model.layers.*`, `lm_head.*`, `model.vision_tower.beit3.*`, `model.query`,
`model.mm_projector.*`.

    from model import LLaMA, Muffin, CONFIGS
    llm = LLaMA.from_pretrained("TinyLlama-1.1B")     # HF dir: config.json + (sharded) weights
    m = Muffin.from_pretrained("RLHF-V")               # ours, or the official release layout
    logits = m(input_ids, images=images, image_index=image_index)   # [R, T, V]
    m.save_pretrained("out/ckpt")                      # config.json + model.safetensors

Tests: python -m pytest tests/test_model.py
"""
import json
import os
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from checkpoint import atomic_write, load_exact, read_checkpoint, read_config
from vision import BEiT3, BEiT3Config, config_from_weights


@dataclass
class LLaMAConfig:  # field names are those of transformers' config.json, so the file round-trips
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 0   # 0: as many as query heads (MHA); fewer: grouped-query attention
    head_dim: int = 0              # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, d):
        """From a transformers 4.x or 5.x config.json dict (5.x nests rope_theta in rope_parameters)."""
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"config.json: RoPE scaling {rope} is not supported (plain RoPE only)")
        if d.get("hidden_act", "silu") != "silu" or d.get("attention_bias") or d.get("mlp_bias"):
            raise ValueError("config.json: only SiLU MLPs without biases are supported (LLaMA)")
        known = {f.name for f in fields(cls)}
        args = {k: v for k, v in d.items() if k in known and v is not None}
        args["rope_theta"] = d.get("rope_theta") or rope.get("rope_theta") or 10000.0
        return cls(**args)


@dataclass
class MuffinConfig:
    llm: LLaMAConfig
    vision: BEiT3Config
    n_query: int = 64           # learned queries: image tokens per image in the decoder
    im_patch_id: int = 32001    # the tokenizer's <im_patch> id (LLaMA 32000 + 1)

    @classmethod
    def from_dict(cls, d):
        return cls(LLaMAConfig(**d["llm"]), BEiT3Config(**d["vision"]), d["n_query"], d["im_patch_id"])


# Named sizes. vocab_size and im_patch_id of the small ones are set from the tokenizer at run time.
CONFIGS = {
    # CPU tests: seconds. GQA on, so the tests exercise it; 9 queries, one per cell of a 3x3 world.
    "tiny": MuffinConfig(
        LLaMAConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
        BEiT3Config(img_size=32, patch_size=8, dim=32, depth=2, heads=2, ffn_dim=64),
        n_query=9, im_patch_id=509),
    # the miniature RLHF-V of train.py: 48 px scenes of 3 x 3 cells, one 16 px patch and one query per cell
    "mini": MuffinConfig(
        LLaMAConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
        BEiT3Config(img_size=48, patch_size=16, dim=96, depth=3, heads=3, ffn_dim=256),
        n_query=9, im_patch_id=509),
    # speed benchmarks: TinyLlama-1.1B's decoder, with a BEiT-3 base tower at 224 px
    "llama-1.1b": MuffinConfig(
        LLaMAConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                    num_attention_heads=32, num_key_value_heads=4),
        BEiT3Config()),
    # the paper's model: BEiT-3 L/16 at 448 px + Vicuna-13B (LLaMA's 32000 tokens + Muffin's 4)
    "muffin-13b": MuffinConfig(
        LLaMAConfig(vocab_size=32004, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                    num_attention_heads=40),
        BEiT3Config(img_size=448, patch_size=16, dim=1024, depth=24, heads=16, ffn_dim=4096)),
}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(pos, head_dim, theta, dtype):
    """cos, sin [T, head_dim] for positions pos [T], computed in fp32 (then cast) like transformers."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=pos.device).float() / head_dim)
    angles = pos.float()[:, None] * inv_freq[None]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotary embedding in the rotate-half layout of transformers' LLaMA checkpoints (whose q/k
    weights are permuted for it), not the interleaved pairs of Meta's original code."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache(nn.Module):
    """Preallocated keys and values [B, kv_heads, max_len, head_dim], written at positions in place
    (a static shape, so the decode step can be captured in a CUDA graph)."""

    def __init__(self, batch, max_len, kv_heads, head_dim, dtype, device):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos, k, v):
        self.k.index_copy_(2, pos, k)
        self.v.index_copy_(2, pos, v)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, c: LLaMAConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, c.hidden_size, bias=False)
        self.kv_cache = None

    def forward(self, x, rope, mask=None, input_pos=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.kv_heads != self.heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, c: LLaMAConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: LLaMAConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, rope, mask=None, input_pos=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class LLaMA(nn.Module):
    def __init__(self, config: LLaMAConfig):
        super().__init__()
        # config: the whole model's (a Muffin's is its MuffinConfig); llm_config: the decoder's
        # LLaMAConfig, on both, so that code for any decoder reads one name
        self.config = self.llm_config = c = config
        self.model = nn.Module()  # transformers' LlamaModel: the names of the checkpoint keys
        self.model.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.model.layers = nn.ModuleList(Block(c) for _ in range(c.num_hidden_layers))
        self.model.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.tie_weights()
        self.grad_checkpointing = False  # recompute each block's activations in backward

    @property
    def cache_len(self):
        """Slots of the KV cache set up by setup_cache; None without one."""
        cache = self.model.layers[0].self_attn.kv_cache
        return None if cache is None else cache.k.shape[2]

    def tie_weights(self):
        self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, input_pos=None, mask=None):
        """input_ids [B, T] -> logits [B, T, vocab]."""
        return self.lm_head(self.hidden_states(self.model.embed_tokens(input_ids), input_pos, mask))

    def hidden_states(self, x, input_pos=None, mask=None):
        """Input embeddings [B, T, d] -> final normalised hidden states [B, T, d].
        Without a KV cache: causal attention over x. With one (setup_cache): x sits at cache slots
        input_pos [T]; mask [T or B, 1, T, slots] (bool, True = attend) defaults to causal."""
        c = self.llm_config
        pos = torch.arange(x.shape[1], device=x.device) if input_pos is None else input_pos
        rope = rope_tables(pos, c.head_dim, c.rope_theta, x.dtype)
        if self.cache_len is not None and mask is None:
            mask = torch.arange(self.cache_len, device=x.device)[None] <= pos[:, None]
        for layer in self.model.layers:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, rope, mask, input_pos, use_reentrant=False)
            else:
                x = layer(x, rope, mask, input_pos)
        return self.model.norm(x)

    def setup_cache(self, batch, max_len, dtype=None, device=None):
        p = self.lm_head.weight
        for layer in self.model.layers:
            a = layer.self_attn
            a.kv_cache = KVCache(batch, max_len, a.kv_heads, a.head_dim, dtype or p.dtype, device or p.device)

    def clear_cache(self):
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None

    def reorder_cache(self, index):
        """Row r of every layer's KV cache becomes row index[r] (beam search: the beams that survive a
        step). Rewritten in place while the batch keeps its size, so that a decode step captured in a
        CUDA graph keeps reading the same buffers; a new size (prompt rows -> beam rows) needs new ones."""
        for layer in self.model.layers:
            cache = layer.self_attn.kv_cache
            k, v = cache.k.index_select(0, index), cache.v.index_select(0, index)
            if k.shape == cache.k.shape:
                cache.k.copy_(k)
                cache.v.copy_(v)
            else:
                cache.k, cache.v = k, v

    def num_params(self, embeddings=True):
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings else n - self.model.embed_tokens.weight.numel()

    def init_weights(self, std=0.02):
        """Fresh initialisation for training from scratch (GPT-2/LLaMA style normal(0, 0.02))."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        return self

    @classmethod
    def from_pretrained(cls, path, dtype=None):
        """An HF-layout directory: config.json + model.safetensors, or shards with their index
        (*.safetensors, or *.bin read with weights_only=True). Built on the meta device and the
        loaded tensors assigned, so the weights are in memory once."""
        d = read_config(path)
        return cls._build(LLaMAConfig.from_hf(d), read_checkpoint(path), path, dtype)

    @classmethod
    def _build(cls, config, sd, source, dtype):
        with torch.device("meta"):
            model = cls(config)
        tied = ("lm_head.weight",) if model.llm_config.tie_word_embeddings else ()
        # transformers 4.2x saved RoPE's inv_freq; Muffin's BEiT-3 may keep its unused text embedding
        load_exact(model, sd, str(source), ignore=("rotary_emb.inv_freq", "text_embed.", "mask_token"),
                   optional=tied)
        if model.llm_config.tie_word_embeddings:
            model.tie_weights()  # assign=True replaced the embedding the head shared
        return model.to(dtype) if dtype else model

    def config_dict(self):
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **asdict(self.llm_config)}

    def save_pretrained(self, path):
        """config.json + model.safetensors (transformers reads both), each written atomically."""
        from safetensors.torch import save_file
        os.makedirs(path, exist_ok=True)
        sd = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if self.llm_config.tie_word_embeddings:
            sd.pop("lm_head.weight")  # shared with the embedding; safetensors stores it once
        atomic_write(os.path.join(path, "model.safetensors"), lambda p: save_file(sd, p, {"format": "pt"}))
        atomic_write(os.path.join(path, "config.json"), json.dumps(self.config_dict(), indent=2))


class Muffin(LLaMA):
    def __init__(self, config: MuffinConfig):
        super().__init__(config.llm)
        self.config = config  # the MuffinConfig; self.llm_config stays the decoder's (config.llm)
        self.model.vision_tower = nn.Module()
        self.model.vision_tower.beit3 = BEiT3(config.vision)
        self.model.query = nn.Parameter(torch.zeros(config.n_query, config.vision.dim))
        self.model.mm_projector = nn.Linear(config.vision.dim, config.llm.hidden_size)

    def forward(self, input_ids, images=None, image_index=None, input_pos=None, mask=None):
        """input_ids [R, T]; images [B, 3, H, W]; image_index [R] (which image row r shows, -1 for
        none: a text-only row; default r): each image is encoded once however many rows share it.
        -> logits [R, T, vocab]."""
        x = self.model.embed_tokens(input_ids)
        if images is not None:
            x = self.splice(input_ids, x, self.encode_images(images), image_index)
        return self.lm_head(self.hidden_states(x, input_pos, mask))

    def encode_images(self, images):
        """images [B, 3, H, W] -> projected query features [B, n_query, d_llm]."""
        queries = self.model.query.to(images.dtype).expand(images.shape[0], -1, -1)
        h = self.model.vision_tower.beit3(images, extra=queries)
        return self.model.mm_projector(h[:, -self.config.n_query:])

    def splice(self, input_ids, x, feats, image_index=None):
        """Replace the embeddings of each row's <im_patch> slots, in order, by its image's features.
        A row with image_index -1 has no image and must have no slots: it passes through unchanged."""
        n = self.config.n_query
        index = torch.arange(len(input_ids), device=x.device) if image_index is None else image_index
        slots = input_ids == self.config.im_patch_id
        if feats.shape[1] != n or len(index) != len(input_ids):
            raise ValueError(f"each image gives {feats.shape[1]} features (expected {n}); "
                             f"{len(index)} image indices for {len(input_ids)} rows")
        counts = slots.sum(1)
        wrong = (counts != n * (index >= 0)).nonzero()[:, 0].tolist()
        if wrong:
            raise ValueError(f"image slots do not match the features: rows have {counts.tolist()} "
                             f"<im_patch> tokens; rows {wrong} are wrong (a row with an image needs "
                             f"{n}, a text-only row none)")
        return x.masked_scatter(slots.unsqueeze(-1), feats[index[index >= 0]].to(x.dtype))

    def init_weights(self, std=0.02):
        super().init_weights(std)
        nn.init.trunc_normal_(self.model.query, std=std)
        tower = self.model.vision_tower.beit3
        nn.init.trunc_normal_(tower.vision_embed.cls_token, std=std)
        # At small widths normal(0.02) q/k weights make every attention uniform (logit std
        # 0.02^2 * dim), so each query starts as the image's average, and position rows of std 0.02
        # vanish under the patch content: the queries would be slow to learn where to look. Logits
        # of std ~4 (q/k std 2/sqrt(dim)) and position rows of std 0.3 break that symmetry.
        for layer in tower.encoder.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                for expert in (proj.A, proj.B):
                    nn.init.normal_(expert.weight, std=2 * tower.config.dim ** -0.5)
        for table in (tower.encoder.embed_positions.A, tower.encoder.embed_positions.B):
            nn.init.normal_(table.weight, std=0.3)
        return self

    @classmethod
    def from_pretrained(cls, path, dtype=None):
        """Ours (config.json with "llm" and "vision") or the official release: a LLaMA config.json
        plus mm_* fields, the tower's shape read off its weights (its head count from a
        vision_config field where there is one), the <im_patch> id from release_im_patch_id.
        Weights as LLaMA.from_pretrained reads them."""
        d = read_config(path)
        sd = read_checkpoint(path)
        if "llm" in d:
            config, source = MuffinConfig.from_dict(d), os.path.join(path, "config.json")
        else:
            prefix = "model.vision_tower.beit3."
            vision = config_from_weights({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
            vision["heads"] = (d.get("vision_config") or {}).get("num_attention_heads") or vision["heads"]
            llm = LLaMAConfig.from_hf(d)
            patch_id, source = release_im_patch_id(path, llm.vocab_size)
            config = MuffinConfig(llm, BEiT3Config(**vision), d.get("num_query", sd["model.query"].shape[0]),
                                  patch_id)
        config.im_patch_source = source  # not a field, never saved: named by data.check_tokenizer
        return cls._build(config, sd, path, dtype)

    def config_dict(self):
        return {"model_type": "nanorlhfv-muffin", **asdict(self.config)}


def release_im_patch_id(path, vocab_size):
    """The <im_patch> id of a checkpoint in the official layout, and the file it came from: its
    added_tokens.json; else its tokenizer.model, whose size + 1 it is (Muffin appends [PAD],
    <im_patch>, <im_start>, <im_end> to the SentencePiece vocabulary, in that order); else the
    embedding's size - 3 (those four are its last rows)."""
    added, spm_file = os.path.join(path, "added_tokens.json"), os.path.join(path, "tokenizer.model")
    if os.path.exists(added):
        with open(added) as f:
            tokens = json.load(f)
        if "<im_patch>" in tokens:
            return tokens["<im_patch>"], added
    if os.path.exists(spm_file):
        import sentencepiece  # a dependency of data.py; here only for the size of the vocabulary
        return sentencepiece.SentencePieceProcessor(model_file=spm_file).get_piece_size() + 1, spm_file
    return vocab_size - 3, os.path.join(path, "config.json")


def train_flops(model, n_tokens, n_images=0):
    """Forward + backward FLOPs of a step: 6 per weight per token (the quadratic attention term left
    out), the decoder over n_tokens, the vision tower once per image over its own tokens."""
    tower = getattr(model.model, "vision_tower", None)  # None: a plain LLaMA
    vision = sum(p.numel() for p in tower.parameters()) if tower else 0
    decoder = model.num_params(embeddings=False) - vision
    if not vision:
        return 6 * decoder * n_tokens
    v = model.config.vision
    return 6 * decoder * n_tokens + 6 * vision * n_images * (v.n_patches + 1 + model.config.n_query)


PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
              "L4": 121e12, "4090": 165e12, "3090": 71e12}  # dense bf16 tensor-core peaks


def peak_flops(device):
    if not str(device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def autocast(device):
    """bf16 autocast on CUDA (over fp32 master weights); plain fp32 on the CPU."""
    return torch.autocast("cuda", torch.bfloat16, enabled=str(device).startswith("cuda"))


def sized(name, vocab_size=None, im_patch_id=None):
    """A named config, with the vocabulary of a tokenizer (its size and <im_patch> id)."""
    c = CONFIGS[name]
    return replace(c, llm=replace(c.llm, vocab_size=vocab_size or c.llm.vocab_size),
                   im_patch_id=im_patch_id or c.im_patch_id)
