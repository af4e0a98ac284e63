"""The training loop: DDPO steps, accumulation, the reference cache and exact resumption."""
import json
import math

import pytest
import torch

import ddpo
import train
from conftest import FP32_REL, assert_close_at_scale, ddpo_config as config, interrupted_then_resumed
from data import Batcher, Records, Tokenizer
from model import Muffin


def losses(run_dir):
    with open(run_dir / "log.jsonl") as f:
        return [json.loads(line)["loss"] for line in f]


def test_ddpo_steps_lower_the_loss_and_train_only_what_is_trainable(tmp_path, dataset, init_ckpt):
    """Eight steps on 16 pairs: the loss falls from ln 2, every trainable tensor moves, and the
    frozen vision tower and queries (requires_grad=False, not lr=0) stay bit for bit."""
    before = Muffin.from_pretrained(init_ckpt).state_dict()
    cfg = config(tmp_path, dataset, init_ckpt, steps=8, lr=2e-4, freeze_vision=True)
    after = train.train(cfg).state_dict()
    seen = losses(tmp_path / "run")
    assert seen[0] == pytest.approx(0.6931, abs=1e-3) and seen[-1] < seen[0] - 0.05
    for name, t in after.items():
        frozen = "vision_tower" in name or name == "model.query"
        assert torch.equal(t, before[name]) == frozen, name


def test_batch_4_equals_4_micro_batches_of_1(tmp_path, dataset, init_ckpt, monkeypatch):
    """The loss is a mean over pairs and each micro-batch is scaled by 1/grad_accum, so the gradient
    a step applies is the same however its batch is split (right padding does not change any real
    token). Compared where the loop clips it, before AdamW: Adam moves a weight whose gradient is
    zero up to rounding by ~lr, in a direction the rounding picks, so weights after a step could
    only be compared to ~lr, and a gradient 4x too large would not show in them at all."""
    grads, clip = [], torch.nn.utils.clip_grad_norm_

    def record(params, *args, **kw):
        grads.append([p.grad.clone() for p in params])
        return clip(params, *args, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", record)
    train.train(config(tmp_path / "a", dataset, init_ckpt, steps=1))
    train.train(config(tmp_path / "b", dataset, init_ckpt, steps=1, batch_size=1, grad_accum=4))
    assert len(grads) == 2 and len(grads[0]) > 10
    a, b = (torch.cat([g.flatten() for g in run]) for run in grads)
    assert (a - b).norm() / a.norm() < 1e-5  # float32 rounding; a wrong scale would be O(1)


def test_resume_reproduces_the_losses(tmp_path, dataset, init_ckpt, monkeypatch):
    """A run interrupted right after its step-3 checkpoint and resumed logs the same losses for
    steps 4-6 as an uninterrupted run: same weights, optimizer state, data order and schedule."""
    train.train(config(tmp_path / "full", dataset, init_ckpt, steps=6))
    interrupted_then_resumed(config(tmp_path / "cut", dataset, init_ckpt, steps=6, save_every=3), 3, monkeypatch)
    full, cut = losses(tmp_path / "full" / "run"), losses(tmp_path / "cut" / "run")
    assert len(cut) == 6 and cut[3:] == full[3:]


def test_ddpo_on_mixed_data_and_sft_on_text_only_data(tmp_path, dataset, init_ckpt):
    """DDPO on pairs of which every other one has no image (no `image` key, or null), and SFT on
    answers none of which has one (every batch then has images None): the reference pass caches
    the text-only pairs too, the losses are finite, and DDPO starts at ln 2."""
    rows = [json.loads(line) for line in open(dataset / "pairs.jsonl")]
    for i, r in enumerate(rows):
        r["image"] = str(dataset / r["image"]) if i % 2 else None
        if i % 4 == 0:
            del r["image"]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"question": r["question"], "answer": r["chosen"]})
                                                 + "\n" for r in rows))
    cfg = config(tmp_path, dataset, init_ckpt, data=str(tmp_path / "mixed.jsonl"), steps=2)
    train.train(cfg)
    seen = losses(tmp_path / "run")
    assert seen[0] == pytest.approx(0.6931, abs=1e-3) and all(math.isfinite(x) for x in seen)
    from safetensors.torch import load_file
    cached = load_file(tmp_path / "run" / "ref_logps.safetensors")
    records = Records(tmp_path / "mixed.jsonl")
    assert {f"{records[i]['id']}/chosen" for i in range(len(records))} <= cached.keys()
    cfg = config(tmp_path, dataset, init_ckpt, stage="sft", data=str(tmp_path / "text.jsonl"),
                 out_dir=str(tmp_path / "sft"), steps=2)
    train.train(cfg)
    seen = losses(tmp_path / "sft")
    assert len(seen) == 2 and all(math.isfinite(x) for x in seen)


def test_a_checkpoint_with_eos_as_bos_trains_and_saves_with_it(tmp_path, dataset, init_ckpt, monkeypatch):
    """A checkpoint whose special_tokens_map.json says BOS = EOS = "</s>" (what Muffin's v0 script
    saves): every row of the reference pass and of the steps starts with id 2, not <s> (1), and the
    checkpoint written carries the file, so the next stage or sample.py prepends 2 as well."""
    with open(init_ckpt / "special_tokens_map.json", "w") as f:
        json.dump({"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "[PAD]"}, f)
    firsts, forward = [], Muffin.forward
    monkeypatch.setattr(Muffin, "forward", lambda m, ids, **kw: firsts.append(ids[:, 0]) or forward(m, ids, **kw))
    train.train(config(tmp_path, dataset, init_ckpt, steps=1))
    assert len(firsts) > 1 and torch.cat(firsts).unique().tolist() == [2]
    assert Tokenizer.from_pretrained(tmp_path / "run").bos_id == 2


def test_cached_reference_equals_online_reference(tmp_path, dataset, init_ckpt, tok):
    """Reference scores from the cache equal the scores of a frozen copy of the initial model
    run online on the same batch; a sample whose text changed is refused, not silently used."""
    cfg = config(tmp_path, dataset, init_ckpt)
    model = Muffin.from_pretrained(init_ckpt).eval()
    records = Records(cfg.data)
    batcher = Batcher(tok, model.config.n_query, model.config.vision.img_size, 2048, gamma=5.0)
    ref = train.reference_logps(model, records, batcher, cfg)
    batch = batcher.pairs([records[i] for i in range(4)])
    batch["ref_logps"] = ref.logps(batch)
    with torch.no_grad():
        logp, mask = ddpo.token_logps(model(batch["input_ids"], images=batch["images"],
                                            image_index=batch["image_index"]), batch["labels"])
    online = ddpo.weighted_scores(logp, mask, batch["weights"])
    cached = ddpo.weighted_scores(batch["ref_logps"], mask, batch["weights"])
    assert_close_at_scale(cached, online)  # other batches, other padding: summed in another order
    edited = {**records[0], "chosen": records[0]["chosen"] + " Also a cat.", "id": "edited"}
    with pytest.raises(ValueError, match="ref_logps.safetensors: no reference log-probs for sample edited"):
        ref.logps(batcher.pairs([edited]))


def test_sft_stage_from_scratch(tmp_path, dataset, tok):
    """SFT builds a fresh model from a named size and the tokenizer, and its NLL falls."""
    tok_file = tmp_path / "tok.model"
    tok_file.write_bytes(tok.sp.serialized_model_proto())
    cfg = train.TrainConfig(stage="sft", data=str(dataset / "sft.jsonl"), tokenizer=str(tok_file),
                            model="tiny", out_dir=str(tmp_path / "sft"), steps=10, batch_size=8,
                            lr=3e-3, warmup=0.0, log_every=1, device="cpu")
    train.train(cfg)
    seen = losses(tmp_path / "sft")
    assert seen[-1] < seen[0] - 0.5
    assert Muffin.from_pretrained(tmp_path / "sft").config.llm.vocab_size == tok.vocab_size


def test_identical_chosen_and_rejected_give_zero_gradient(dataset, init_ckpt, tok):
    """When chosen == rejected, pi_w - pi_l = ref_w - ref_l = 0 whatever the weights: the loss is
    ln 2 and its gradient, beta/2 * (grad s_w - grad s_l), is zero (which is why the batcher skips
    such pairs). In floats both rows' scores round alike but not always identically, so both are
    bounded relative to what one row alone contributes: beta/2 * s_w and beta/2 * grad s_w."""
    model = Muffin.from_pretrained(init_ckpt)
    item = Records(dataset / "pairs.jsonl")[0]
    batcher = Batcher(tok, model.config.n_query, model.config.vision.img_size, 2048, gamma=5.0)
    batch = batcher.pairs([{**item, "rejected": item["rejected"] + " x"}])  # then made identical:
    batch["input_ids"][1], batch["labels"][1] = batch["input_ids"][0], batch["labels"][0]
    batch["weights"][1] = batch["weights"][0]
    batch["ref_logps"] = torch.zeros_like(batch["weights"])
    cfg = train.TrainConfig(stage="ddpo", device="cpu")
    logp, mask = ddpo.token_logps(model(batch["input_ids"], images=batch["images"],
                                        image_index=batch["image_index"]), batch["labels"])
    one_row = cfg.beta / 2 * ddpo.weighted_scores(logp, mask, batch["weights"], cfg.average)[0]
    one_row.backward()
    scale = max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None)
    model.zero_grad()
    loss, _ = train.forward_loss(model, batch, cfg)
    loss.backward()
    assert abs(loss.item() - math.log(2)) <= FP32_REL * abs(one_row.item())
    assert max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None) <= FP32_REL * scale
