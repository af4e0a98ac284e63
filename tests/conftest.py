"""Shared fixtures: a SentencePiece tokenizer and a small preference dataset, made by the tests."""
import json
import os
import random
import sys
from dataclasses import replace

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402
from miniature import world  # noqa: E402
from data import SYSTEM, train_tokenizer  # noqa: E402
from model import Muffin, sized  # noqa: E402

# Relative tolerance for fp32 results that should agree but are computed in another order (another
# batch layout, kernel, SIMD width or thread count): a sum of n terms rounds by up to about
# n * 2^-24 of its largest term, and the reductions here have up to a few hundred terms, so 1e-4
# of the scale of the compared quantity (~800 units in the last place) holds on any CPU, while a
# real bug shows at O(1) of that scale.
FP32_REL = 1e-4


def assert_close_at_scale(actual, expected, rel=FP32_REL, msg=None):
    """|actual - expected| <= rel * max|expected|, element-wise: the tolerance follows the size of
    the whole compared tensor, so that entries near 0 are not held to a tighter bound than rounding
    of the large ones allows."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * expected.abs().max().item(), msg=msg)


def interrupted_then_resumed(cfg, stop_at, monkeypatch):
    """train.train(cfg) killed right after its step-`stop_at` checkpoint, as a job killed there, then
    run again with --resume; -> the resumed run's model."""
    save = train.save_checkpoint

    def save_then_die(model, opt, step, cfg, tok_file, **kw):
        save(model, opt, step, cfg, tok_file, **kw)
        if step == stop_at:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg)
    monkeypatch.setattr(train, "save_checkpoint", save)
    return train.train(replace(cfg, resume=True))


def ddpo_config(tmp_path, dataset, init_ckpt, **kw):
    """A short DDPO run of the tiny model on the `dataset` pairs, in <tmp_path>/run; kw overrides."""
    base = dict(stage="ddpo", data=str(dataset / "pairs.jsonl"), init=str(init_ckpt),
                out_dir=str(tmp_path / "run"), steps=4, batch_size=4, lr=1e-3, warmup=0.0, average=False,
                log_every=1, save_every=100, device="cpu")
    return train.TrainConfig(**{**base, **kw})


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    rng = random.Random(0)
    scenes, _ = world.make_world(0, 200, 0)
    text = [f"{SYSTEM}\n\n### Human: \n{q}\n### Assistant: {a}\n###"
            for _, q, a in world.sft_examples(scenes, rng)] + world.corpus(scenes, rng)
    return train_tokenizer(text, tmp_path_factory.mktemp("tok") / "tok.model", 400)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """16 scenes at 32 px; pairs.jsonl (chosen = a correct description, rejected = the same with one
    colour swapped) and sft.jsonl (the correct descriptions), in our JSONL format."""
    d = tmp_path_factory.mktemp("data")
    rng = random.Random(1)
    scenes, _ = world.make_world(1, 16, 0)
    os.makedirs(d / "images")
    pairs, sft = [], []
    for i, scene in enumerate(scenes):
        world.render(scene, 32).save(d / "images" / f"{i}.png")
        good = world.describe(scene, rng)
        colour = scene.objects[0].colour
        bad = good.replace(colour, next(c for c in world.COLOURS if c != colour), 1)
        pairs.append({"image": f"images/{i}.png", "question": "Describe this image in detail.",
                      "chosen": good, "rejected": bad})
        sft.append({"image": f"images/{i}.png", "question": "Describe this image in detail.", "answer": good})
    for name, rows in (("pairs.jsonl", pairs), ("sft.jsonl", sft)):
        with open(d / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return d


@pytest.fixture
def init_ckpt(tok, tmp_path):
    """A freshly initialised tiny Muffin saved with its tokenizer: a checkpoint to --init from."""
    torch.manual_seed(0)
    model = Muffin(sized("tiny", tok.vocab_size, tok.im_patch_id)).init_weights()
    path = tmp_path / "init"
    model.save_pretrained(path)
    with open(path / "tokenizer.model", "wb") as f:
        f.write(tok.sp.serialized_model_proto())
    return path
