"""Tests of model.py: the LLaMA decoder, its KV cache, Muffin's splice, and checkpoint loading/saving.

Tiny random models on the CPU; numerical parity with transformers itself is in test_parity.py.
    python -m pytest tests/test_model.py
"""
import json
import math
import os
import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from cli import InputError
from conftest import assert_close_at_scale
from model import CONFIGS, Attention, LLaMA, Muffin, apply_rope, rope_tables
from vision import BEiT3Config

TINY = CONFIGS["tiny"]  # its LLaMA has 4 query heads sharing 2 key/value heads (GQA)


def tiny_llama(**overrides):
    torch.manual_seed(0)
    return LLaMA(replace(TINY.llm, **overrides)).init_weights(std=0.1).eval()


def tiny_muffin(config=TINY):
    torch.manual_seed(0)
    return Muffin(config).init_weights(std=0.1).eval()


def muffin_inputs(config):
    """Two token rows with the n_query <im_patch> slots after a few text tokens, and their images."""
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, config.im_patch_id, (2, 6), generator=g)
    slots = torch.full((2, config.n_query), config.im_patch_id)
    ids = torch.cat([text[:, :2], slots, text[:, 2:]], dim=1)
    images = torch.randn(2, 3, config.vision.img_size, config.vision.img_size, generator=g)
    return ids, images


def write_shards(path, sd, fmt):
    """Two shards and their index, named as transformers names them ("safetensors" or "bin")."""
    keys = sorted(sd)
    prefix, index = (("model", "model.safetensors.index.json") if fmt == "safetensors"
                     else ("pytorch_model", "pytorch_model.bin.index.json"))
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"{prefix}-0000{i + 1}-of-00002.{fmt}"
        shard = {k: sd[k].contiguous() for k in part}
        (save_file if fmt == "safetensors" else torch.save)(shard, os.path.join(path, name))
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in sd.values())
    with open(os.path.join(path, index), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)


# --- decoding ------------------------------------------------------------------------------------

@torch.no_grad()
def test_kv_cache_greedy_decode_equals_full_recomputation():
    """Prefill + one-token decode steps through the preallocated cache (setup_cache, input_pos) give,
    at every step, the logits of a full causal forward over the whole sequence, hence the same argmax."""
    model = tiny_llama()
    prompt, steps = torch.randint(0, TINY.llm.vocab_size, (1, 5)), 6
    model.setup_cache(1, prompt.shape[1] + steps)
    step_logits = [model(prompt, input_pos=torch.arange(prompt.shape[1]))[:, -1]]
    seq = prompt
    for _ in range(steps):
        token = step_logits[-1].argmax(-1, keepdim=True)
        step_logits.append(model(token, input_pos=torch.tensor([seq.shape[1]]))[:, -1])
        seq = torch.cat([seq, token], dim=1)
    model.clear_cache()
    full = model(seq)[0, prompt.shape[1] - 1:]  # full[i] predicts the token after prompt + i generated
    for i, logits in enumerate(step_logits):
        assert_close_at_scale(logits[0], full[i])
        assert logits.argmax() == full[i].argmax()


@torch.no_grad()
def test_left_padded_batch_gives_each_rows_own_logits():
    """Rows of different prompt lengths, left-padded into one cached batch, predict (prefill and each
    decode step) what each row predicts alone. The [B,1,T,S] boolean mask hides the pad slots of each
    row but lets a pad query attend to itself, so that no softmax row is empty (NaN in a plain
    softmax); RoPE is relative, so shifting a row by its padding leaves its attention scores alone."""
    model = tiny_llama()
    prompts = [torch.randint(0, TINY.llm.vocab_size, (n,)) for n in (7, 4, 1)]
    length, steps = 7, 3
    pads = torch.tensor([length - len(p) for p in prompts])
    ids = torch.stack([F.pad(p, (length - len(p), 0), value=0) for p in prompts])
    slots = torch.arange(length + steps)

    def mask(pos):
        causal = slots[None] <= pos[:, None]             # [T, S]
        real = slots[None] >= pads[:, None]              # [B, S]
        own = slots[None] == pos[:, None]                # [T, S]
        return ((causal[None] & real[:, None]) | own[None])[:, None]  # [B, 1, T, S]

    model.setup_cache(len(prompts), length + steps)
    pos = torch.arange(length)
    batch_logits = [model(ids, input_pos=pos, mask=mask(pos))[:, -1]]
    rows = [p.tolist() for p in prompts]
    for t in range(length, length + steps):
        token = batch_logits[-1].argmax(-1)
        for row, tok in zip(rows, token.tolist()):
            row.append(tok)
        pos = torch.tensor([t])
        batch_logits.append(model(token[:, None], input_pos=pos, mask=mask(pos))[:, -1])
    model.clear_cache()
    for b, row in enumerate(rows):
        alone = model(torch.tensor([row]))[0]
        for i, logits in enumerate(batch_logits):
            assert_close_at_scale(logits[b], alone[len(prompts[b]) - 1 + i])


@torch.no_grad()
def test_reorder_cache_moves_rows_and_keeps_the_buffers_of_a_same_size_batch():
    """reorder_cache(index): row r of every layer's keys and values becomes row index[r]. Growing the
    batch (one prompt row -> 3 beams) makes new buffers; a same-size reorder rewrites the buffers in
    place, so a decode step captured in a CUDA graph, which reads them by address, sees the change."""
    model = tiny_llama()
    model.setup_cache(2, 4)
    model(torch.randint(0, TINY.llm.vocab_size, (2, 3)), input_pos=torch.arange(3))
    caches = [layer.self_attn.kv_cache for layer in model.model.layers]
    before = [(c.k.clone(), c.v.clone()) for c in caches]
    grow = torch.tensor([1, 1, 0])
    model.reorder_cache(grow)
    for c, (k, v) in zip(caches, before):
        assert torch.equal(c.k, k[grow]) and torch.equal(c.v, v[grow])
    pointers = [(c.k.data_ptr(), c.v.data_ptr()) for c in caches]
    model.reorder_cache(torch.tensor([2, 0, 0]))  # old rows 0, 1, 1
    for c, (k, v), ptr in zip(caches, before, pointers):
        assert torch.equal(c.k, k[[0, 1, 1]]) and torch.equal(c.v, v[[0, 1, 1]])
        assert (c.k.data_ptr(), c.v.data_ptr()) == ptr


@pytest.mark.parametrize("explicit_mask", [False, True], ids=["is_causal", "bool-mask"])
@torch.no_grad()
def test_attention_equals_naive_softmax_reference(explicit_mask):
    """One Attention module (GQA: 4 query heads on 2 kv heads) through scaled_dot_product_attention,
    with is_causal or with an explicit boolean mask (the KV-cache path), equals
    o_proj(softmax(Q K^T / sqrt(d) + causal) V) written out, kv head h // 2 serving query head h."""
    c = TINY.llm
    torch.manual_seed(0)
    attn = Attention(c)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.2)
    B, T = 2, 9
    x = torch.randn(B, T, c.hidden_size)
    rope = rope_tables(torch.arange(T), c.head_dim, c.rope_theta, x.dtype)
    y = attn(x, rope, mask=torch.ones(T, T, dtype=torch.bool).tril() if explicit_mask else None)

    heads = lambda t, n: t.view(B, T, n, c.head_dim).transpose(1, 2)
    q = apply_rope(heads(x @ attn.q_proj.weight.T, c.num_attention_heads), *rope)
    k = apply_rope(heads(x @ attn.k_proj.weight.T, c.num_key_value_heads), *rope)
    v = heads(x @ attn.v_proj.weight.T, c.num_key_value_heads)
    group = c.num_attention_heads // c.num_key_value_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(c.head_dim)
    scores = scores + torch.full((T, T), float("-inf")).triu(1)
    expected = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1) @ attn.o_proj.weight.T
    assert_close_at_scale(y, expected)


@torch.no_grad()
def test_gqa_equals_mha_with_repeated_kv_heads():
    """A GQA model equals the MHA model whose k/v projections hold each kv head repeated for every
    query head of its group (query head h reads kv head h // group)."""
    gqa = tiny_llama()
    c = gqa.config
    group = c.num_attention_heads // c.num_key_value_heads
    assert group > 1
    mha = LLaMA(replace(c, num_key_value_heads=c.num_attention_heads)).eval()
    sd = dict(gqa.state_dict())
    for k in sd:
        if k.endswith(("k_proj.weight", "v_proj.weight")):
            w = sd[k].view(c.num_key_value_heads, c.head_dim, c.hidden_size)
            sd[k] = w.repeat_interleave(group, dim=0).reshape(-1, c.hidden_size)
    mha.load_state_dict(sd)
    ids = torch.randint(0, c.vocab_size, (2, 12))
    assert_close_at_scale(mha(ids), gqa(ids))


def test_activation_checkpointing_gives_same_loss_and_gradients():
    """grad_checkpointing recomputes each block in backward (so each block's forward is entered twice;
    a pre-hook, since the recomputation stops early, before post-forward hooks) and changes neither
    the loss nor any gradient."""
    ids = torch.randint(0, TINY.llm.vocab_size, (2, 16))
    results = []
    for checkpointing in (False, True):
        model = tiny_llama().train()
        model.grad_checkpointing = checkpointing
        calls = []
        model.model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        assert len(calls) == (2 if checkpointing else 1)
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss0, grads0), (loss1, grads1) = results
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    for name in grads0:
        assert_close_at_scale(grads1[name], grads0[name], msg=name)


# --- Muffin's splice -----------------------------------------------------------------------------

@torch.no_grad()
def test_splice_puts_each_query_feature_in_its_slot():
    """Row r's k-th <im_patch> slot receives feature k of image image_index[r], wherever the slots
    sit in the row; every other embedding is left as it was. Rows sharing an image get identical
    features at their slots."""
    m = tiny_muffin()
    n, patch = TINY.n_query, TINY.im_patch_id
    ids = torch.randint(0, patch, (3, 4 + n))
    starts = (1, 3, 4)
    for r, s in enumerate(starts):
        ids[r, s:s + n] = patch
    x = m.model.embed_tokens(ids)
    feats = torch.randn(2, n, TINY.llm.hidden_size)
    image_index = torch.tensor([0, 1, 0])
    out = m.splice(ids, x, feats, image_index)
    for r, s in enumerate(starts):
        torch.testing.assert_close(out[r, s:s + n], feats[image_index[r]], rtol=0, atol=0)
        keep = ids[r] != patch
        torch.testing.assert_close(out[r, keep], x[r, keep], rtol=0, atol=0)
    torch.testing.assert_close(out[0, 1:1 + n], out[2, 4:4 + n], rtol=0, atol=0)


def test_splice_rejects_a_row_with_the_wrong_number_of_slots():
    """A row whose <im_patch> count differs from n_query raises a ValueError that says so, instead of
    scattering features into the wrong positions."""
    m = tiny_muffin()
    n, patch = TINY.n_query, TINY.im_patch_id
    ids = torch.zeros(2, n + 2, dtype=torch.long)
    ids[0, 1:1 + n] = patch
    ids[1, 1:n] = patch  # one slot short
    feats = torch.randn(2, n, TINY.llm.hidden_size)
    with pytest.raises(ValueError, match=rf"rows have \[{n}, {n - 1}\] <im_patch> tokens"):
        m.splice(ids, m.model.embed_tokens(ids), feats)


@torch.no_grad()
def test_text_only_rows_pass_through_a_batch_with_images():
    """A text-only row (image_index -1, no <im_patch> slots) batched before two image rows: each
    image row gets the logits it gets alone with its image, and the text-only row those of the plain
    LLaMA forward on its ids. (Features gathered for every index, -1 included, would fill the image
    rows' slots with images 1 and 0, the text row's share first: both comparisons would fail.)"""
    m = tiny_muffin()
    ids, images = muffin_inputs(TINY)
    text = torch.randint(0, TINY.im_patch_id, (1, ids.shape[1]), generator=torch.Generator().manual_seed(1))
    rows = torch.cat([text, ids])
    logits = m(rows, images=images, image_index=torch.tensor([-1, 0, 1]))
    for r, i in ((1, 0), (2, 1)):
        torch.testing.assert_close(logits[r], m(rows[r:r + 1], images=images[i:i + 1])[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[0], LLaMA.forward(m, text)[0], rtol=1e-5, atol=1e-5)


def test_splice_names_the_rows_whose_slots_do_not_fit():
    """n_query slots in a row with an image, none in a text-only row: a text-only row with slots
    and an image row without are both refused, by row number."""
    m = tiny_muffin()
    n, patch = TINY.n_query, TINY.im_patch_id
    ids = torch.zeros(3, n + 2, dtype=torch.long)
    ids[0, 1:1 + n] = patch
    ids[1, 1:1 + n] = patch  # slots, but image_index -1
    feats = torch.randn(2, n, TINY.llm.hidden_size)
    with pytest.raises(ValueError, match=r"rows \[1, 2\] are wrong"):
        m.splice(ids, m.model.embed_tokens(ids), feats, torch.tensor([0, -1, 1]))


# --- checkpoints ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("cls", [LLaMA, Muffin])
@torch.no_grad()
def test_save_load_round_trip_is_exact(tmp_path, cls, tied, dtype):
    """save_pretrained -> from_pretrained gives back every tensor bit for bit, in its dtype, with the
    head still tied to the embedding exactly when the config says so; so the logits are identical."""
    if cls is LLaMA:
        src = tiny_llama(tie_word_embeddings=tied).to(dtype)
        args = (torch.randint(0, TINY.llm.vocab_size, (2, 10)),)
        kwargs = {}
    else:
        config = replace(TINY, llm=replace(TINY.llm, tie_word_embeddings=tied))
        src = tiny_muffin(config=config).to(dtype)
        ids, images = muffin_inputs(TINY)
        args, kwargs = (ids,), dict(images=images.to(dtype))
    src.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path).eval()
    assert loaded.config == src.config
    want, got = src.state_dict(), loaded.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == dtype and torch.equal(got[k], want[k]), k
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    assert torch.equal(loaded(*args, **kwargs), src(*args, **kwargs))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@torch.no_grad()
def test_loads_sharded_hf_checkpoint(tmp_path, fmt):
    """An HF directory of config.json + two shards + their index (model.safetensors.index.json, or
    pytorch_model.bin.index.json with torch.save shards) loads into the model it came from."""
    src = tiny_llama()
    write_json(tmp_path / "config.json", src.config_dict())
    write_shards(tmp_path, src.state_dict(), fmt)
    loaded = LLaMA.from_pretrained(tmp_path)
    want, got = src.state_dict(), loaded.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    ids = torch.randint(0, TINY.llm.vocab_size, (2, 10))
    assert torch.equal(loaded(ids), src(ids))


def write_release(path, src, added_tokens=True, **fields):
    """src in the openbmb/RLHF-V release layout: fp32 .bin shards with pytorch_model.bin.index.json,
    keys model.vision_tower.beit3.* / model.query / model.mm_projector.* / model.layers.* /
    lm_head.weight (plus the rotary inv_freq buffers transformers 4.28 saved), a transformers-4.28
    config.json with the mm_* fields (and `fields`), and added_tokens.json unless told not to."""
    c = src.config.llm
    sd = dict(src.state_dict())
    for i in range(c.num_hidden_layers):
        sd[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(c.head_dim // 2)
    write_shards(path, sd, "bin")
    write_json(path / "config.json", {
        "architectures": ["Beit3LlavaLlamaForCausalLM"], "model_type": "beit3_llava",
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_attention_heads, "num_hidden_layers": c.num_hidden_layers,
        "vocab_size": c.vocab_size, "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps, "max_sequence_length": 2048, "tie_word_embeddings": False,
        "mm_vision_tower": "beit3_large_patch16_448", "num_query": src.config.n_query, "use_mm_proj": True,
        "mm_use_im_start_end": True, "fully_tune": True, "torch_dtype": "float32",
        "transformers_version": "4.28.0.dev0", **fields})
    v = c.vocab_size
    if added_tokens:
        write_json(path / "added_tokens.json",
                   {"[PAD]": v - 4, "<im_patch>": v - 3, "<im_start>": v - 2, "<im_end>": v - 1})


RELEASE_LLM = replace(TINY.llm, num_key_value_heads=4, max_position_embeddings=2048)


@torch.no_grad()
def test_loads_official_muffin_release_layout(tmp_path):
    """The openbmb/RLHF-V release layout (write_release), added_tokens.json giving the <im_patch>
    id. The tower's shape is read off its weights (head dim 64 as in every BEiT-3 release), so this
    tower is 64 wide; the decoder is LLaMA-1-like (no GQA, 2048 positions), as the 4.28 config.json
    cannot say otherwise."""
    vision = BEiT3Config(img_size=32, patch_size=8, dim=64, depth=2, heads=1, ffn_dim=128)
    config = replace(TINY, llm=RELEASE_LLM, vision=vision)
    src = tiny_muffin(config=config)
    write_release(tmp_path, src)
    loaded = Muffin.from_pretrained(tmp_path).eval()
    assert loaded.config == config
    ids, images = muffin_inputs(config)
    assert torch.equal(loaded(ids, images=images), src(ids, images=images))


@torch.no_grad()
def test_release_im_patch_id_from_added_tokens_else_tokenizer_else_vocabulary(tmp_path, tok):
    """Without added_tokens.json the <im_patch> id of a release comes from its tokenizer.model (its
    size + 1: Muffin appends [PAD], <im_patch>, <im_start>, <im_end>), else from the embedding
    (size - 3), here 401 of a 404-token vocabulary either way, never LLaMA's 32001. When the model
    and the tokenizer disagree, check_tokenizer names the file the model's id came from."""
    from data import check_tokenizer
    config = replace(TINY, llm=replace(RELEASE_LLM, vocab_size=tok.vocab_size), im_patch_id=tok.im_patch_id)
    write_release(tmp_path, tiny_muffin(config=config), added_tokens=False)
    (tmp_path / "tokenizer.model").write_bytes(tok.sp.serialized_model_proto())
    loaded = Muffin.from_pretrained(tmp_path)
    assert loaded.config.im_patch_id == tok.sp.get_piece_size() + 1 == 401
    assert loaded.config.im_patch_source == str(tmp_path / "tokenizer.model")
    check_tokenizer(tok, loaded.config, "tok.model")  # agrees: no error
    os.remove(tmp_path / "tokenizer.model")
    loaded = Muffin.from_pretrained(tmp_path)
    assert loaded.config.im_patch_id == 401 and loaded.config.im_patch_source == str(tmp_path / "config.json")
    write_json(tmp_path / "added_tokens.json", {"[PAD]": 400, "<im_patch>": 402})
    loaded = Muffin.from_pretrained(tmp_path)
    assert loaded.config.im_patch_id == 402
    with pytest.raises(InputError, match=re.escape(f"402 (<im_patch> from {tmp_path / 'added_tokens.json'})")):
        check_tokenizer(tok, loaded.config, "tok.model")


@torch.no_grad()
def test_release_tower_heads_from_a_vision_config_field(tmp_path):
    """The weights cannot tell how a BEiT-3 splits into heads: without a config field the loader
    guesses dim // 64 (1 for this 64-wide tower), with `vision_config.num_attention_heads` it
    takes the field (2), and only then are the logits those of the 2-head model saved."""
    vision = BEiT3Config(img_size=32, patch_size=8, dim=64, depth=2, heads=2, ffn_dim=128)
    config = replace(TINY, llm=RELEASE_LLM, vision=vision)
    src = tiny_muffin(config=config)
    ids, images = muffin_inputs(config)
    write_release(tmp_path, src)
    guessed = Muffin.from_pretrained(tmp_path).eval()
    assert guessed.config.vision.heads == 1
    assert not torch.allclose(guessed(ids, images=images), src(ids, images=images))
    write_release(tmp_path, src, vision_config={"num_attention_heads": 2})
    loaded = Muffin.from_pretrained(tmp_path).eval()
    assert loaded.config == config
    assert torch.equal(loaded(ids, images=images), src(ids, images=images))


def test_loading_errors_name_every_offending_key(tmp_path):
    """A checkpoint that does not fit is refused with one error naming every missing, unexpected and
    mis-shaped key (with both shapes), not a bare 'size mismatch' or a silently random weight."""
    src = tiny_llama()
    sd = dict(src.state_dict())
    del sd["model.norm.weight"]
    sd["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 5)
    write_json(tmp_path / "config.json", src.config_dict())
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as e:
        LLaMA.from_pretrained(tmp_path)
    msg = str(e.value)
    assert re.search(r"missing keys \(1\): model\.norm\.weight", msg), msg
    assert re.search(r"unexpected keys \(1\): model\.layers\.0\.mlp\.extra\.weight", msg), msg
    expected_shape = (TINY.llm.intermediate_size, TINY.llm.hidden_size)
    assert f"model.layers.1.mlp.up_proj.weight: (3, 5) (expected {expected_shape})" in msg, msg
