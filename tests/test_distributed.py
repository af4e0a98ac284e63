"""Data parallel training under torchrun: 2 CPU ranks (gloo) with batch b each against one process
with batch 2b, on the tiny model. DDP and FSDP2 must give one process's numbers, and a sharded
(DCP) checkpoint saved on 2 ranks must resume on 1 rank and on 2.

This file is also the program each rank runs (see the bottom): train.py's CLI, optionally stopped
right after a checkpoint, as if the job had been killed there."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402
from conftest import FP32_REL  # noqa: E402
from model import Muffin, sized  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed")
BASE = dict(stage="ddpo", steps=4, lr=1e-3, warmup=0.0, log_every=1, save_every=100, device="cpu")


@pytest.fixture(scope="module")
def setup(tok, dataset, tmp_path_factory):
    """An initial checkpoint and the reference: one process, batch 4, 4 steps."""
    d = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    Muffin(sized("tiny", tok.vocab_size, tok.im_patch_id)).init_weights().save_pretrained(d / "init")
    (d / "init" / "tokenizer.model").write_bytes(tok.sp.serialized_model_proto())
    opts = dict(BASE, data=str(dataset / "pairs.jsonl"), init=str(d / "init"))
    train.train(train.TrainConfig(**opts, batch_size=4, out_dir=str(d / "single")))
    return d, opts


TEARDOWN_ABORT = "terminate called without an active exception"


def ranks(opts, out_dir, stop_after=0, **kw):
    """torchrun --nproc_per_node=2 (a free port: --standalone); -> the process's return code.
    A rank can, rarely and on a loaded machine, abort in gloo's C++ teardown after its work is done
    (TEARDOWN_ABORT on stderr): that run is made once more from an empty out_dir, since the numbers
    under test do not depend on it; any other failure, or the abort twice, fails the test.
    Python's fault handler prints every thread's stack if a rank aborts."""
    argv = [f"--{k}={v}" for k, v in {**opts, **kw, "out_dir": out_dir}.items()]
    for attempt in range(2):
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            __file__, *argv], cwd=ROOT, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "STOP_AFTER": str(stop_after), "OMP_NUM_THREADS": "1",
                                "PYTHONFAULTHANDLER": "1"})
        if p.returncode == 0 or stop_after or TEARDOWN_ABORT not in p.stderr or attempt:
            break
        print(f"a rank aborted in teardown; run again:\n{p.stderr[-3000:]}")  # shown by pytest -rP
        shutil.rmtree(out_dir, ignore_errors=True)
    assert p.returncode == 0 or stop_after, p.stdout[-3000:] + p.stderr[-3000:]
    return p.returncode


def logged(run_dir, key="loss"):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line)[key] for line in f]


def weights(run_dir):
    from safetensors.torch import load_file
    return load_file(os.path.join(run_dir, "model.safetensors"))


def assert_same_weights(a, b):
    """Equal after 4 AdamW steps of lr 1e-3, but for a few weights in 100k. Adam moves a weight by
    ~lr whatever the size of its gradient, in the direction of its sign, so a gradient that is zero
    up to rounding moves its weight by up to ~lr on either side (seen: one weight per run, by 3e-5
    to 2e-4); a rank that trained on the wrong rows or skipped the average would move most weights."""
    a, b = weights(a), weights(b)
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert (diff > 1e-5).float().mean() < 1e-4 and diff.max() < 4e-3, (diff > 1e-5).sum()


def test_ddp_equals_one_process_with_the_combined_batch(setup):
    """2 ranks x 1 pair x 2 micro-steps (the first under no_sync) = 1 process x 4 pairs: same rows in
    every step (each rank its slice of the same order), gradients averaged, so the same weights."""
    d, opts = setup
    ranks(opts, str(d / "ddp"), batch_size=1, grad_accum=2)
    assert_same_weights(d / "ddp", d / "single")
    assert logged(d / "ddp") == pytest.approx(logged(d / "single"), rel=FP32_REL)


def test_fsdp2_equals_one_process(setup):
    """FSDP2 (per-block units, fp32 on the CPU): the same losses and gradient norms (so the clip is
    global), and the gathered final weights equal one process's."""
    d, opts = setup
    ranks(opts, str(d / "fsdp"), batch_size=2, fsdp=True)
    # rel 1e-4: the weights differ as assert_same_weights says; abs 1e-5: step 1's margin is 0 up to
    # the rounding of summed log-probs (~30 * 2^-23)
    for key in ("loss", "grad_norm", "rewards/margins"):
        assert logged(d / "fsdp", key) == pytest.approx(logged(d / "single", key), rel=1e-4, abs=1e-5)
    assert_same_weights(d / "fsdp", d / "single")


def test_sharded_checkpoint_resumes_on_1_and_on_2_ranks(setup):
    """Killed right after its step-2 checkpoint (sharded over 2 ranks), the run resumes on 1 rank
    (batch 4: the same global batch) and on 2, and logs the uninterrupted run's losses."""
    d, opts = setup
    cut = d / "cut"
    assert ranks(opts, str(cut), stop_after=2, batch_size=2, fsdp=True, save_every=2) != 0
    assert (cut / "latest").read_text() == "ckpt-2" and (cut / "ckpt-2" / ".metadata").exists()
    shutil.copytree(cut, d / "cut1")
    train.train(train.TrainConfig(**opts, batch_size=4, fsdp=True, resume=True, out_dir=str(d / "cut1")))
    ranks(opts, str(cut), batch_size=2, fsdp=True, resume=True)
    want = logged(d / "single")
    for run in (d / "cut1", cut):
        assert len(logged(run)) == 4
        assert logged(run)[2:] == pytest.approx(want[2:], rel=1e-4, abs=1e-6)
        assert_same_weights(run, d / "single")


if __name__ == "__main__":  # one rank, under torchrun
    stop_after, save = int(os.environ.get("STOP_AFTER", 0)), train.save_checkpoint

    def save_then_die(model, opt, step, cfg, tok_file, **kw):
        save(model, opt, step, cfg, tok_file, **kw)
        if step == stop_after:
            raise SystemExit(3)

    train.save_checkpoint = save_then_die
    train.main(sys.argv[1:])
