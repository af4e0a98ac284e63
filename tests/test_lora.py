"""LoRA (lora.py) and LoRA DDPO (train.py --lora_rank): exactness at initialisation, what trains,
merging, adapter files in PEFT's layout, exact resumption, DDP, and the usage errors."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora
import sample
import train
from conftest import FP32_REL, assert_close_at_scale, ddpo_config as config, interrupted_then_resumed
from model import Muffin, sized

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_LINEARS = 7  # q, k, v, o, gate, up, down in each decoder block


def logits(model, tok, seed=0):
    """The model's logits on two rows of random ids around one image slot block, in eval mode."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    ids = torch.randint(5, tok.vocab_size - 4, (2, 12 + c.n_query), generator=g)
    ids[:, 4:4 + c.n_query] = c.im_patch_id
    images = torch.randn(1, 3, c.vision.img_size, c.vision.img_size, generator=g)
    model.eval()
    with torch.no_grad():
        return model(ids, images=images, image_index=torch.tensor([0, 0]))


def random_adapters(model, seed=1):
    """B as if trained (it starts at zero, which would hide any error of the update path)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.adapters(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)
    return model


def test_at_initialisation_the_model_is_its_base_exactly(init_ckpt, tok):
    """B = 0, so every adapter adds exactly 0: the logits are the base's bit for bit, with dropout on."""
    base = Muffin.from_pretrained(init_ckpt)
    want = logits(base, tok)
    model = lora.apply(base, rank=4, alpha=8, dropout=0.5)
    n_layers = model.llm_config.num_hidden_layers
    assert len(lora.adapters(model)) == N_LINEARS * n_layers
    assert torch.equal(logits(model, tok), want)
    model.train()  # dropout active: x A^T B^T is still exactly 0
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, tok.vocab_size - 4, (2, 9), generator=g)
    with torch.no_grad():
        assert torch.equal(model(ids), Muffin.from_pretrained(init_ckpt).train()(ids))


def test_only_adapters_train_and_only_they_are_in_the_optimizer(tmp_path, dataset, init_ckpt):
    """Four LoRA DDPO steps: every base weight (tower included) is bit for bit --init's, every B has
    moved off zero, and the optimizer's state in the checkpoint covers exactly the adapters (A and B
    of each targeted Linear, in their shapes)."""
    before = Muffin.from_pretrained(init_ckpt).state_dict()
    model = train.train(config(tmp_path, dataset, init_ckpt, lr=1e-3, lora_rank=4, save_every=4))
    sd = model.state_dict()
    for name, t in before.items():
        assert torch.equal(sd[name], t), name
    ad = lora.adapters(model)
    assert all(m.lora_B.abs().max() > 0 for m in ad.values())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"{n}.lora_{ab}" for n in ad for ab in "AB"}
    state = torch.load(tmp_path / "run" / "ckpt-4" / "state.pt", weights_only=True)["optimizer"]
    shapes = sorted(tuple(s["exp_avg"].shape) for s in state["state"].values())
    assert shapes == sorted(tuple(getattr(m, f"lora_{ab}").shape) for m in ad.values() for ab in "AB")
    # the checkpoint and the final output hold the adapters, not the base's weights
    for d in (tmp_path / "run" / "ckpt-4", tmp_path / "run"):
        assert (d / "adapter_model.safetensors").exists() and not (d / "model.safetensors").exists()


def test_merged_weights_give_the_unmerged_logits(init_ckpt, tok):
    """W + (alpha/r) B A in one Linear equals the two paths summed, up to fp32 rounding of the
    reordered sums (FP32_REL of the logits' scale); a wrong scale or a transposed product is O(1)."""
    model = random_adapters(lora.apply(Muffin.from_pretrained(init_ckpt), rank=4, alpha=8, dropout=0.0))
    unmerged = logits(model, tok)
    assert not torch.equal(unmerged, logits(Muffin.from_pretrained(init_ckpt), tok))
    merged = lora.merge(model)
    assert not lora.adapters(merged)
    assert set(merged.state_dict()) == set(Muffin.from_pretrained(init_ckpt).state_dict())
    assert_close_at_scale(logits(merged, tok), unmerged, rel=FP32_REL)


def test_adapter_save_then_load_is_exact(tmp_path, init_ckpt, tok):
    """save_pretrained -> apply on a fresh base -> load_adapter: the same tensors, the same logits."""
    model = random_adapters(lora.apply(Muffin.from_pretrained(init_ckpt), 4, 8.0, 0.0, base=str(init_ckpt)))
    lora.save_pretrained(model, tmp_path / "ad")
    s = lora.read_settings(tmp_path / "ad")
    again = lora.load_adapter(lora.apply(Muffin.from_pretrained(init_ckpt), s.r, s.lora_alpha, 0.0,
                                         s.target_modules), tmp_path / "ad")
    a, b = lora.state_dict(model), lora.state_dict(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(logits(again, tok), logits(model, tok))
    # from_pretrained finds the base the adapter names and merges: the merged model's logits
    assert torch.equal(logits(lora.from_pretrained(tmp_path / "ad"), tok), logits(lora.merge(again), tok))


def test_peft_layout_round_trip(tmp_path, init_ckpt, tok):
    """Keys and config as PEFT writes them: base_model.model.<module path>.lora_A.weight [r, in] and
    lora_B.weight [out, r]; adapter_config.json with peft_type LORA, r, lora_alpha, target_modules,
    base_model_name_or_path. A directory written that way by hand (fields we ignore included, target
    modules in another order) loads, and our own output has exactly that form."""
    base = Muffin.from_pretrained(init_ckpt)
    h = base.llm_config.hidden_size
    g = torch.Generator().manual_seed(3)
    sd = {}
    for i in range(base.llm_config.num_hidden_layers):
        for part, name in (("self_attn", "q_proj"), ("self_attn", "v_proj")):
            key = f"base_model.model.model.layers.{i}.{part}.{name}"
            sd[f"{key}.lora_A.weight"] = torch.randn(2, h, generator=g)
            sd[f"{key}.lora_B.weight"] = torch.randn(getattr(base.model.layers[i].self_attn, name).out_features,
                                                     2, generator=g)
    d = tmp_path / "peft"
    os.makedirs(d)
    save_file(sd, d / "adapter_model.safetensors", {"format": "pt"})
    (d / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 6, "lora_dropout": 0.05,
        "target_modules": ["v_proj", "q_proj"], "base_model_name_or_path": str(init_ckpt), "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None, "revision": None,
        "layers_to_transform": None, "layers_pattern": None, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}}))
    merged = lora.from_pretrained(d)
    q = merged.model.layers[1].self_attn.q_proj.weight
    key = "base_model.model.model.layers.1.self_attn.q_proj"
    w = base.model.layers[1].self_attn.q_proj.weight
    want = w + 3.0 * sd[f"{key}.lora_B.weight"] @ sd[f"{key}.lora_A.weight"]  # alpha / r = 6 / 2
    assert_close_at_scale(q.detach(), want.detach())
    assert torch.equal(merged.model.layers[1].self_attn.k_proj.weight, base.model.layers[1].self_attn.k_proj.weight)
    # and written back: the same keys, the same tensors, the config's fields
    model = lora.load_adapter(lora.apply(Muffin.from_pretrained(init_ckpt), 2, 6.0, 0.0, ["q_proj", "v_proj"],
                                         base=str(init_ckpt)), d)
    lora.save_pretrained(model, tmp_path / "ours")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert ours.keys() == sd.keys() and all(torch.equal(ours[k], sd[k]) for k in sd)
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert {k: cfg[k] for k in ("peft_type", "r", "lora_alpha", "target_modules", "base_model_name_or_path")} == \
        {"peft_type": "LORA", "r": 2, "lora_alpha": 6.0, "target_modules": ["q_proj", "v_proj"],
         "base_model_name_or_path": str(init_ckpt)}


def test_lora_vision_trains_the_tower_whole_beside_the_adapters(tmp_path, dataset, init_ckpt, tok):
    """--lora_vision: two LoRA DDPO steps move the tower and its queries (fp32) and every adapter,
    and nothing else; the optimizer holds exactly those. The output names them in modules_to_save
    and holds them whole under base_model.model.<name>; loaded back, or merged into the base, it
    gives the trained model's logits (merged: within fp32 rounding of the folded adapters)."""
    before = Muffin.from_pretrained(init_ckpt).state_dict()
    model = train.train(config(tmp_path, dataset, init_ckpt, lr=1e-3, steps=2, save_every=2, lora_rank=4,
                               lora_vision=True))
    tower = {n for n, _ in model.named_parameters() if n.startswith(lora.VISION)}
    adapters = {f"{n}.lora_{ab}" for n in lora.adapters(model) for ab in "AB"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == tower | adapters
    moved = {n for n, t in model.state_dict().items() if n in before and not torch.equal(t, before[n])}
    assert moved and moved <= tower and "model.query" in moved
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in tower)
    state = torch.load(tmp_path / "run" / "ckpt-2" / "state.pt", weights_only=True)["optimizer"]
    assert len(state["state"]) == len(tower | adapters)
    out = tmp_path / "run"
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == list(lora.VISION)
    saved = load_file(out / "adapter_model.safetensors")
    assert {k for k in saved if "lora_" not in k} == {lora.PREFIX + n for n in tower}
    s = lora.read_settings(out)
    again = lora.load_adapter(lora.apply(Muffin.from_pretrained(init_ckpt), s.r, s.lora_alpha, 0.0,
                                         s.target_modules, full=s.modules_to_save), out)
    want = logits(model, tok)
    assert torch.equal(logits(again, tok), want)
    assert_close_at_scale(logits(lora.from_pretrained(out), tok), want, rel=FP32_REL)


@pytest.mark.parametrize("vision", [False, True])
def test_lora_run_resumed_equals_the_uninterrupted_run(tmp_path, dataset, init_ckpt, monkeypatch, vision):
    """Interrupted right after its step-3 checkpoint (adapters, AdamW state, RNG: dropout is on) and
    resumed, a LoRA run logs the same losses and ends with the same adapters (and with
    --lora_vision the same tower) as an uninterrupted run."""
    opts = dict(steps=6, lora_rank=4, lora_dropout=0.1, lr=1e-3, lora_vision=vision)
    full = train.train(config(tmp_path / "full", dataset, init_ckpt, **opts))
    cut = interrupted_then_resumed(config(tmp_path / "cut", dataset, init_ckpt, save_every=3, **opts), 3, monkeypatch)
    assert not (tmp_path / "cut" / "run" / "ckpt-6" / "model.safetensors").exists()  # adapters only
    read = lambda d: [json.loads(line)["loss"] for line in open(d / "run" / "log.jsonl")]  # noqa: E731
    assert len(read(tmp_path / "cut")) == 6 and read(tmp_path / "cut")[3:] == read(tmp_path / "full")[3:]
    a, b = lora.state_dict(full), lora.state_dict(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("vision_tower" in k for k in a) == vision


def test_sample_and_merge_load_an_adapter_directory(tmp_path, dataset, init_ckpt, capsys):
    """The trained adapter directory (with its tokenizer) answers through sample.py exactly as the
    weights `python lora.py` merges from it, which Muffin.from_pretrained loads as any checkpoint."""
    train.train(config(tmp_path, dataset, init_ckpt, lr=1e-2, lora_rank=4))
    run, merged = tmp_path / "run", tmp_path / "merged"
    lora.main([f"--adapter={run}", f"--out={merged}"])
    assert Muffin.from_pretrained(merged).state_dict().keys() == Muffin.from_pretrained(init_ckpt).state_dict().keys()
    image = os.path.join(dataset, "images", "0.png")
    answers = []
    for ckpt in (run, merged):
        capsys.readouterr()
        sample.main([f"--ckpt={ckpt}", f"--image={image}", "--max_new_tokens=8", "--device=cpu"])
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] and answers[0].strip()


def test_ddp_with_lora_equals_one_process_with_the_combined_batch(tmp_path, dataset, init_ckpt):
    """2 ranks (gloo) x 1 pair x 2 micro-steps = 1 process x 4 pairs: the same losses and adapters
    (only they are reduced; the frozen base never moves)."""
    from test_distributed import ranks
    opts = dict(stage="ddpo", steps=4, lr=1e-3, warmup=0.0, average=False, log_every=1, save_every=100,
                device="cpu",
                data=str(dataset / "pairs.jsonl"), init=str(init_ckpt), lora_rank=4)
    single = train.train(config(tmp_path, dataset, init_ckpt, **{k: v for k, v in opts.items() if k != "stage"}))
    ranks(opts, str(tmp_path / "ddp"), batch_size=1, grad_accum=2)
    read = lambda d: [json.loads(line)["loss"] for line in open(d / "log.jsonl")]  # noqa: E731
    assert read(tmp_path / "ddp") == pytest.approx(read(tmp_path / "run"), rel=FP32_REL)
    a, b = lora.state_dict(single), load_file(tmp_path / "ddp" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    # as test_distributed.assert_same_weights: Adam moves a weight with a gradient of rounding size by ~lr
    assert (diff > 1e-5).float().mean() < 1e-3 and diff.max() < 4e-3


def cli_error(*argv):
    p = subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    return p.returncode, p.stderr.strip().splitlines()


def test_bad_lora_options_are_one_line_usage_errors(tmp_path, dataset, init_ckpt):
    for argv, words in ((["--lora_rank=-1"], "--lora_rank=-1"),
                        (["--lora_rank=4", "--lora_targets=q_proj,qkv"], "unknown qkv"),
                        (["--lora_rank=4", "--fsdp=True"], "not with --fsdp"),
                        (["--lora_vision=True"], "needs --lora_rank"),
                        (["--lora_rank=4", "--lora_vision=True", "--freeze_vision=True"], "not --freeze_vision")):
        rc, err = cli_error(*argv)
        assert rc == 2 and len(err) == 1 and words in err[0], err
    # a checkpoint holding a rank-4 adapter, resumed at rank 8 or without LoRA
    train.train(config(tmp_path, dataset, init_ckpt, steps=2, save_every=2, lora_rank=4))
    common = ["--stage=ddpo", f"--data={dataset / 'pairs.jsonl'}", f"--init={init_ckpt}",
              f"--out_dir={tmp_path / 'run'}", "--resume", "--steps=4", "--device=cpu"]
    for rank in (8, 0):
        rc, err = cli_error(*common, f"--lora_rank={rank}")
        assert rc == 2 and len(err) == 1 and "holds an adapter of rank 4" in err[0], err
    rc, err = cli_error(*common, "--lora_rank=4", "--lora_vision=True")  # the tower was frozen in it
    assert rc == 2 and len(err) == 1 and "trained with --lora_vision=False" in err[0], err
