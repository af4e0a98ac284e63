"""bench.py: the tiny shape runs every benchmark once with finite positive numbers, its batch has the
layout train.forward_loss expects, and GB/s counts exactly the bytes a decode step reads. No timing
is asserted, and transformers is not needed (--compare is a development tool; see bench.py).
    python -m pytest tests/test_bench.py
"""
import math

import pytest
import torch

import bench
from ddpo import IGNORE_INDEX
from model import CONFIGS, LLaMA


def test_tiny_runs_every_benchmark_once():
    cfg = bench.BenchConfig(shape="tiny", rows=4, seq=48, prompt=12, new_tokens=48, warmup=1, iters=3,
                            grad_ckpt=True, device="cpu")
    table = bench.run_shape(cfg, set())
    assert [label for label, _ in table] == ["ours tiny", "ours tiny +grad_ckpt"]
    (_, full), (_, ckpt) = table
    for k in ("step tok/s", "pairs/s", "ref tok/s", "dec@1 tok/s", "dec@1 GB/s", "dec@8 tok/s", "dec@8 GB/s",
              "beam3@1 tok/s"):
        assert math.isfinite(full[k]) and full[k] > 0, k
    assert full["step tok/s"] / full["pairs/s"] == pytest.approx(2 * 48)  # a pair is a chosen and a rejected row
    assert full["MFU"] is None and full["step GiB"] is None  # no peak FLOP/s nor allocator on a CPU
    assert ckpt["step tok/s"] > 0 and "ref tok/s" not in ckpt  # checkpointing changes the step only
    text = bench.format_table(table)
    assert "ours tiny +grad_ckpt" in text and "n/a" in text and len(text.splitlines()) == 3


def test_ddpo_batch_layout():
    c = CONFIGS["tiny"]
    b = bench.ddpo_batch(c, True, 6, 48, "cpu")
    assert b["images"].shape[0] == 3 and b["image_index"].tolist() == [0, 1, 2, 0, 1, 2]
    assert ((b["input_ids"] == c.im_patch_id).sum(1) == c.n_query).all()
    labelled = b["labels"][:, 1:] != IGNORE_INDEX  # the targets of logp [T-1]
    assert labelled.any(1).all() and not labelled[:, :11].any()  # the prompt (12 tokens) has no labels
    assert torch.equal(b["weights"] != 0, labelled) and torch.equal(b["ref_logps"] != 0, labelled)


def test_decode_bytes_are_the_weights_but_the_embedding_and_the_whole_cache():
    c = CONFIGS["tiny"].llm
    model = LLaMA(c)
    model.setup_cache(3, 20)
    cache = sum(t.numel() for layer in model.model.layers for t in (layer.self_attn.kv_cache.k,
                                                                     layer.self_attn.kv_cache.v))
    assert bench.decode_bytes(c, 3, 20, 4) == 4 * (model.num_params(embeddings=False) + cache)


def test_lora_row_counts_the_states_of_what_trains():
    """--lora_rank adds the step with adapters: its states are every weight once (fp32 on a CPU)
    plus gradient and two AdamW moments of the adapters alone, 4 P + 12 A bytes, against 16 P for
    full training; autograd saves less than for the full step (no weight-gradient inputs of the tower)."""
    cfg = bench.BenchConfig(shape="tiny", rows=4, seq=48, prompt=12, new_tokens=8, warmup=0, iters=1,
                            lora_rank=4, device="cpu")
    table = dict(bench.run_shape(cfg, set()))
    full, adapted = table["ours tiny"], table["ours tiny +lora4"]
    c = CONFIGS["tiny"]
    P = sum(p.numel() for p in bench.Muffin(c).parameters())
    per_block = sum(4 * (i + o) for i, o in ((64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)))
    A = c.llm.num_hidden_layers * per_block  # rank 4: A [4, in] and B [out, 4] on the 7 Linears of a block
    assert full["states MiB"] * 2**20 == 16 * P
    assert adapted["states MiB"] * 2**20 == 4 * (P + A) + 12 * A
    assert 0 < adapted["saved MiB"] < full["saved MiB"]


def test_plan_per_block_bytes_of_lora_dropout():
    """--plan measures what autograd saves per token and decoder block. LoRA's dropout adds, for each
    of the 7 adapted Linears, its input's dropped-out bf16 copy and the bool mask (3 bytes per
    element): inputs of width h for q, k, v, o, gate, up and i for down, so 3 (6h + i) bytes."""
    out = bench.plan(bench.BenchConfig(plan="tiny", lora_rank=4))
    h, i = CONFIGS["tiny"].llm.hidden_size, CONFIGS["tiny"].llm.intermediate_size
    a = {k: v["a (B/token/block)"] for k, v in out.items()}
    assert a["lora4 dropout 0.05"] - a["lora4"] == 3 * (6 * h + i)
    assert 0 < a["lora4"] < a["full"]
