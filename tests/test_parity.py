"""Numerical parity with the trusted implementations: transformers' LlamaForCausalLM for model.LLaMA,
torchscale's BEiT3 (the code Muffin runs) for vision.BEiT3. Random small models in fp32, loaded from
the files the reference writes; the maximum relative error max|ours - ref| / max|ref| must be <= 1e-5.
sample.py's beam search returns the tokens of transformers' generate(num_beams=3, ...).

A development check: transformers and torchscale are not dependencies of this project, so these tests
skip wherever they are missing (CI). With a venv that has them (and pytest):
    /path/to/refvenv/bin/python -m pytest tests/test_parity.py -s    # -s prints the measured errors
"""
import json
import os
import sys
import types

import pytest
import torch

import sample
from model import LLaMA, LLaMAConfig
from vision import BEiT3

MAX_REL_ERR = 1e-5


def rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def randomize(module, seed):
    """Weights far from their init (norm gains around 1 but not 1, biases non-zero), so that every
    weight, and any mistake in how it is used, shows in the output."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            is_norm = isinstance(m, torch.nn.LayerNorm) or type(m).__name__.endswith("RMSNorm")
            for name, p in m.named_parameters(recurse=False):
                p.normal_(1.0 if is_norm and name == "weight" else 0.0, 0.1)
    return module


# --- LLaMA vs transformers -----------------------------------------------------------------------

LLAMA_CASES = {  # 4 query heads of dim 16
    "mha-theta1e4-untied": dict(num_key_value_heads=4, rope_theta=1e4, tie_word_embeddings=False),
    "gqa-theta1e4-untied": dict(num_key_value_heads=2, rope_theta=1e4, tie_word_embeddings=False),
    "mha-theta5e5-tied": dict(num_key_value_heads=4, rope_theta=5e5, tie_word_embeddings=True),
    "mqa-theta5e5-untied": dict(num_key_value_heads=1, rope_theta=5e5, tie_word_embeddings=False),
}


def hf_llama(case):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      max_position_embeddings=128, **LLAMA_CASES[case])
    return randomize(transformers.LlamaForCausalLM(config), seed=0).eval()


def save_bin_shards(ref, path):
    """pytorch_model-0000i-of-00002.bin + pytorch_model.bin.index.json, as transformers 4.x wrote
    them (transformers 5 writes safetensors only, whatever safe_serialization says)."""
    sd = ref.state_dict()
    keys = sorted(sd)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: sd[k] for k in part}, os.path.join(path, name))
        weight_map.update(dict.fromkeys(part, name))
    with open(os.path.join(path, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


SAVES = {  # layout -> (how the reference writes it, a file that proves the layout)
    "safetensors": (lambda ref, d: ref.save_pretrained(d), "model.safetensors"),
    "sharded-safetensors": (lambda ref, d: ref.save_pretrained(d, max_shard_size="40KB"),
                            "model.safetensors.index.json"),
    "bin": (lambda ref, d: torch.save(ref.state_dict(), os.path.join(d, "pytorch_model.bin")),
            "pytorch_model.bin"),
    "sharded-bin": (save_bin_shards, "pytorch_model.bin.index.json"),
}


@pytest.mark.parametrize("layout", SAVES)
@pytest.mark.parametrize("case", LLAMA_CASES)
@torch.no_grad()
def test_llama_logits_match_transformers(tmp_path, case, layout):
    """LLaMA.from_pretrained on a directory transformers wrote gives transformers' logits (MHA and
    GQA/MQA, RoPE base 1e4 and 5e5, tied and untied head; one file, shards, .bin)."""
    ref = hf_llama(case)
    ref.config.save_pretrained(tmp_path)
    write, proof = SAVES[layout]
    write(ref, tmp_path)
    assert os.path.exists(tmp_path / proof)
    ours = LLaMA.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 256, (2, 48))
    err = rel_err(ours(ids), ref(ids).logits)
    print(f"\nLLaMA {case} {layout}: max relative error {err:.2e}")
    assert err <= MAX_REL_ERR


@pytest.mark.parametrize("style", ["4.x", "4.28"])
@torch.no_grad()
def test_llama_reads_transformers_4_config_json(tmp_path, style):
    """transformers 4.3x wrote rope_theta at the top level (5.x nests it in rope_parameters); 4.28,
    the version of the RLHF-V release, wrote neither it (LLaMA's 10000) nor num_key_value_heads
    (LLaMA-1 has none). Ours reads the config it reads from the 5.x file, and gives the logits that
    transformers gives reading the rewritten file."""
    ref = hf_llama("mqa-theta5e5-untied" if style == "4.x" else "mha-theta1e4-untied")
    ref.save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    want = LLaMAConfig.from_hf(d)
    theta = d.pop("rope_parameters")["rope_theta"]
    d.pop("head_dim")
    if style == "4.x":
        d.update(rope_theta=theta, rope_scaling=None, transformers_version="4.40.0")
    else:
        d.pop("num_key_value_heads")
        d.update(max_sequence_length=2048, transformers_version="4.28.0.dev0")
    (tmp_path / "config.json").write_text(json.dumps(d))
    ours = LLaMA.from_pretrained(tmp_path).eval()
    assert ours.config == want
    ref = type(ref).from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 256, (2, 48))
    err = rel_err(ours(ids), ref(ids).logits)
    print(f"\nLLaMA config.json {style}: max relative error {err:.2e}")
    assert err <= MAX_REL_ERR


# --- beam search vs transformers' generate ---------------------------------------------------------

BEAM_CASES = {  # name: (init std, seed, early_stopping); seeds on which every rule of the search
    # (the early-stop comparison, each beam's own repetition penalty on its log-probs, the length
    # normalisation, the cache following the beams) decides at least one answer
    "early_stopping=False": (0.05, 5, False),  # as RLHF-V's evaluation left it
    "early_stopping=True": (0.02, 1, True),
}


@pytest.mark.parametrize("case", BEAM_CASES)
@torch.no_grad()
def test_beam_search_matches_transformers(tmp_path, case):
    """sample.generate_ids with 3 beams and repetition penalty 1.1, on a batch of two prompts, returns the
    ids that transformers' generate(num_beams=3, repetition_penalty=1.1, length_penalty=1.0) returns
    from the same weights (ours saved, theirs loaded), each cut after its first stop token. The stop
    tokens are the greedy answers' 5th and 8th tokens (transformers: eos_token_id), so that
    hypotheses finish before max_new_tokens and the stopping rule decides."""
    transformers = pytest.importorskip("transformers")
    std, seed, early_stopping = BEAM_CASES[case]
    torch.manual_seed(seed)
    ours = LLaMA(LLaMAConfig(256, 64, 160, 2, 4, 2, max_position_embeddings=128)).init_weights(std).eval()
    ours.save_pretrained(tmp_path)
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(seed))
    greedy = sample.generate_ids(ours, ids.tolist(), torch.zeros(256, dtype=torch.bool), max_new_tokens=20)
    stops = sorted({greedy[0][4], greedy[1][7]})
    stop = torch.zeros(256, dtype=torch.bool)
    stop[stops] = True
    got = sample.generate_ids(ours, ids.tolist(), stop, max_new_tokens=20, num_beams=3, repetition_penalty=1.1,
                        early_stopping=early_stopping)
    out = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=3,
                       repetition_penalty=1.1, length_penalty=1.0, early_stopping=early_stopping,
                       max_new_tokens=20, eos_token_id=stops, pad_token_id=stops[0])
    want = [r[:next((j + 1 for j, t in enumerate(r) if t in stops), len(r))] for r in out[:, 10:].tolist()]
    print(f"\nbeam search {case}, transformers {transformers.__version__}: {want}")
    assert got == want
    assert any(len(w) < 20 for w in want)  # a hypothesis ended at a stop token


# --- BEiT-3 vs torchscale ------------------------------------------------------------------------

def torchscale_beit3():
    """torchscale's BEiT3 built as Muffin builds it (beit3.py: _get_large_config), at a tiny size with
    head dim 64 as in every release. torchscale imports timm only for DropPath's drop_path, which a
    drop-path rate of 0 never calls; timm 0.4.12 itself needs torchvision at import, so where it
    cannot be imported a stand-in module provides the name."""
    pytest.importorskip("torchscale")
    try:
        import timm.models.layers  # noqa: F401
    except ImportError:
        layers = types.ModuleType("timm.models.layers")
        layers.drop_path = None
        sys.modules.update({"timm": types.ModuleType("timm"), "timm.models.layers": layers,
                            "timm.models": types.ModuleType("timm.models")})
    from torchscale.architecture.config import EncoderConfig
    from torchscale.model.BEiT3 import BEiT3 as RefBEiT3
    args = EncoderConfig(img_size=32, patch_size=8, vocab_size=100, multiway=True,
                         layernorm_embedding=False, normalize_output=True, no_output_layer=True,
                         drop_path_rate=0, encoder_embed_dim=128, encoder_attention_heads=2,
                         encoder_ffn_embed_dim=256, encoder_layers=3)
    return randomize(RefBEiT3(args), seed=0).eval()


def muffin_reference_forward(ref, images, queries):
    """Muffin's BEiT3Wrapper.forward: the queries are appended to the image tokens as token
    embeddings, multiway_split_position = number of image tokens (so they use expert B and position
    table B from row 2); the final hidden states of every token."""
    tokens = ref.vision_embed(images)
    out = ref.encoder(src_tokens=None, token_embeddings=torch.cat([tokens, queries], dim=1),
                      multiway_split_position=tokens.shape[1])
    return out["encoder_out"]


def save_state_dict(sd, path):
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        torch.save(sd, path)


@pytest.mark.parametrize("layout", ["plain.pth", "release.pth", "plain.safetensors",
                                    "prefixed.safetensors"])
@torch.no_grad()
def test_beit3_matches_torchscale(tmp_path, layout):
    """BEiT3.from_pretrained on torchscale's state dict (with the text embedding and mask token that
    Muffin leaves unused) gives torchscale's final hidden states, for images alone (all tokens in
    expert A) and for images + 5 query tokens (Muffin's path). "release" is the layout of the
    official .pth: {"model": {"beit3.<key>": ...}}."""
    ref = torchscale_beit3()
    sd = ref.state_dict()
    if not layout.startswith("plain"):
        sd = {f"beit3.{k}": v for k, v in sd.items()}
    if layout == "release.pth":
        sd = {"model": sd}
    save_state_dict(sd, tmp_path / layout)
    ours = BEiT3.from_pretrained(tmp_path / layout).eval()

    images, queries = torch.randn(2, 3, 32, 32), torch.randn(2, 5, 128)
    err_images = rel_err(ours(images), ref(visual_tokens=images)["encoder_out"])
    err_queries = rel_err(ours(images, extra=queries), muffin_reference_forward(ref, images, queries))
    print(f"\nBEiT-3 {layout}: max relative error {err_images:.2e} (images), "
          f"{err_queries:.2e} (images + queries)")
    assert err_images <= MAX_REL_ERR and err_queries <= MAX_REL_ERR


def test_lora_adapter_files_match_peft_both_ways(tmp_path):
    """An adapter peft writes (get_peft_model on transformers' LLaMA, random B) loads with
    lora.load_adapter and gives peft's logits; ours, written by lora.save_pretrained, loads with
    PeftModel.from_pretrained and gives ours. Same keys, same scale alpha / r."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    import lora
    torch.manual_seed(0)
    hc = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(hc).save_pretrained(tmp_path / "base")
    ids = torch.randint(0, 128, (2, 10))
    theirs = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                                 peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(lora.TARGETS),
                                                 init_lora_weights=False)).eval()
    theirs.save_pretrained(tmp_path / "peft")
    s = lora.read_settings(tmp_path / "peft")
    ours = lora.apply(LLaMA.from_pretrained(tmp_path / "base"), s.r, s.lora_alpha, 0.0, s.target_modules,
                      base=str(tmp_path / "base"))
    lora.load_adapter(ours, tmp_path / "peft").eval()
    with torch.no_grad():
        err = rel_err(ours(ids), theirs(input_ids=ids).logits)
        for m in lora.adapters(ours).values():
            m.lora_B.normal_(0, 0.1)
    print(f"\npeft {peft.__version__} adapter loaded here: max relative error {err:.1e}")
    assert err <= MAX_REL_ERR
    lora.save_pretrained(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                                          tmp_path / "ours").eval()
    with torch.no_grad():
        err = rel_err(back(input_ids=ids).logits, ours(ids))
    print(f"ours loaded by peft: max relative error {err:.1e}")
    assert err <= MAX_REL_ERR
