"""What only a GPU runs: bf16 autocast over fp32 master weights, fused AdamW, pinned-memory loading,
the bf16 KV-cache decode and its CUDA-graph compiled step. Skipped without CUDA (gpu_check.sh runs
them on a GPU machine). CUDA_TEST_DEVICE=cpu runs the same code paths on the CPU in fp32, to check
the tests themselves on a machine without a GPU.

    python -m pytest tests/test_cuda.py
"""
import json
import os

import pytest
import torch

import sample
import train
from conftest import ddpo_config
from data import STOP, Tokenizer, image_tensor, load_image, prompt_ids
from model import Muffin

DEVICE = os.environ.get("CUDA_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")
# bf16 keeps 8 significant bits: one rounding is within 2^-8 of the value, and a loss or a logit is
# the end of a chain of such roundings, so it may move by a few 2^-8 of its scale
BF16_REL = 4 * 2 ** -8


def log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("stage", ["sft", "ddpo"])
def test_training_steps_on_the_device_follow_the_cpu_run(stage, tmp_path, dataset, init_ckpt):
    """Two steps of SFT and of DDPO through train.train on the device (bf16 autocast on CUDA, fused
    AdamW, pinned batches) log the losses of the same steps run in fp32 on the CPU, within bf16's
    precision, and save a model that loads back in fp32 (the master weights)."""
    data = "sft.jsonl" if stage == "sft" else "pairs.jsonl"
    runs = {}
    for name, device in (("cpu", "cpu"), ("device", DEVICE)):
        cfg = ddpo_config(tmp_path / name, dataset, init_ckpt, stage=stage, data=str(dataset / data),
                          steps=2, lr=1e-4, device=device)
        train.train(cfg)
        runs[name] = [r["loss"] for r in log(cfg.out_dir)]
        model = Muffin.from_pretrained(cfg.out_dir)
        assert {p.dtype for p in model.parameters()} == {torch.float32}
    want, got = torch.tensor(runs["cpu"]), torch.tensor(runs["device"])
    assert len(got) == 2 and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=0, atol=BF16_REL * want.abs().max().item())


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_bf16_greedy_decoding_on_the_device_agrees_with_fp32_where_the_choice_is_clear(compile, dataset, init_ckpt):
    """sample.generate_ids in bf16 on the device, eager and with the compiled (CUDA-graph) decode step,
    gives fp32 CPU's greedy tokens wherever fp32's best two logits are further apart than bf16 can
    blur; the first token where they are not ends the comparison of that answer."""
    if compile and not DEVICE.startswith("cuda"):
        pytest.skip("the compiled decode step is captured in a CUDA graph")
    fp32 = Muffin.from_pretrained(init_ckpt).eval()
    dtype = torch.bfloat16 if DEVICE.startswith("cuda") else torch.float32
    dev = Muffin.from_pretrained(init_ckpt, dtype=dtype).to(DEVICE).eval()
    tok = Tokenizer.from_pretrained(os.path.join(init_ckpt, "tokenizer.model"))
    images = torch.stack([image_tensor(load_image(dataset / "images" / f"{i}.png"), 32) for i in range(3)])
    prompts = [prompt_ids(tok, q, fp32.config.n_query) for q in
               ("Describe this image in detail.", "What is in the image?", "Where is the largest object?")]
    never = torch.zeros(fp32.llm_config.vocab_size, dtype=torch.bool)
    want = sample.generate_ids(fp32, prompts, never, fp32.encode_images(images), max_new_tokens=12)
    got = sample.generate_ids(dev, prompts, never.to(DEVICE), dev.encode_images(images.to(DEVICE, dtype)),
                              max_new_tokens=12, compile=compile)
    compared = 0
    for p, w, g in zip(prompts, want, got):
        ids = torch.tensor([p + w])
        with torch.no_grad():
            z = fp32(ids, images=images[[prompts.index(p)]])[0, len(p) - 1:-1]
        top2 = z.topk(2).values
        for j, (a, b) in enumerate(zip(w, g)):
            if top2[j, 0] - top2[j, 1] <= BF16_REL * z[j].abs().max():
                break
            assert a == b, f"token {j}: {a} (fp32) != {b} ({DEVICE}, compile={compile})"
            compared += 1
    assert compared >= 8


def test_sample_cli_runs_on_the_device(tmp_path, dataset, init_ckpt, capsys):
    """python sample.py on the device, as README shows it, answers in one line."""
    sample.main([f"--ckpt={init_ckpt}", f"--image={dataset / 'images' / '0.png'}",
                 "--prompt=Describe this image in detail.", f"--device={DEVICE}", "--max_new_tokens=8"])
    out = capsys.readouterr().out
    assert out.strip() and STOP not in out
