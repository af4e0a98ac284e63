"""Bad inputs, one test each: every one ends in an error that names the file, row or key, or in a
skip that is counted and reported at the end of the run; none in a crash elsewhere, a silent wrong
number, or a lost checkpoint. The catalogue is in README.md ("Robustness"); cases already pinned
elsewhere are listed there with their tests (test_data.py, test_model.py, test_vision.py,
test_train.py) and not repeated here."""
import base64
import dataclasses
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import warnings
import zlib

import pytest
import torch
from PIL import Image

import cli
import sample
import train
from data import Batcher, Records, load_image, prompt_ids
from checkpoint import atomic_write
from conftest import ddpo_config as config
from model import Muffin, sized

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def encoded(img, fmt="PNG", **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def pairs_file(path, dataset, rows):
    """A JSONL of pairs whose image paths point into the shared `dataset` fixture."""
    path.write_text("".join(json.dumps({"image": str(dataset / "images" / f"{i % 16}.png"), **r}) + "\n"
                            for i, r in enumerate(rows)))
    return path


def good_rows(dataset, n):
    with open(dataset / "pairs.jsonl") as f:
        return [{k: v for k, v in json.loads(line).items() if k != "image"} for line in f][:n]


# ------------------------------------------------------------------------------------- images

def test_corrupt_and_truncated_images_name_the_file(tmp_path):
    """Garbage, a PNG and a JPEG cut in half, a directory: a ValueError naming the file (from
    bytes: their length), never a half-decoded picture (PIL's LOAD_TRUNCATED_IMAGES stays off)."""
    noise = Image.effect_noise((64, 64), 50).convert("RGB")
    for name, blob in (("garbage.png", b"\x89PNG not really"), ("cut.png", encoded(noise)[:2000]),
                       ("cut.jpg", encoded(noise, "JPEG")[:1000])):
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ValueError, match=f"image {tmp_path / name}: "):
            load_image(str(tmp_path / name))
        with pytest.raises(ValueError, match=f"image <{len(blob)} bytes>"):
            load_image(blob)
    with pytest.raises(ValueError, match=f"image {tmp_path}: IsADirectoryError"):
        load_image(str(tmp_path))


def png_claiming(width, height):
    """A 1x1 PNG whose header claims width x height: a decompression bomb that costs nothing to make."""
    data = bytearray(encoded(Image.new("L", (1, 1))))
    ihdr = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:29], data[29:33] = ihdr, struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)


def test_decompression_bombs_are_errors_not_warnings(tmp_path, monkeypatch):
    """An image over Image.MAX_IMAGE_PIXELS is refused from its header, before any pixel is decoded,
    with an error naming the file: beyond 2x the limit PIL raises by itself; between 1x and 2x it
    only warns and would decode, so load_image turns that warning into the error, locally: the
    global warning filters are untouched. Setting the limit to None lifts it, as in PIL."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(100_000, 100_000))  # 10^10 pixels: 30 GB as RGB
    with pytest.raises(ValueError, match=f"image {bomb}: DecompressionBombError"):
        load_image(str(bomb))

    img = encoded(Image.new("RGB", (40, 40), (1, 2, 3)))  # 1600 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1x-2x: PIL's warning zone
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        filters = list(warnings.filters)
        with pytest.raises(ValueError, match="image <.* bytes>: DecompressionBombWarning"):
            load_image(img)
        assert warnings.filters == filters
    assert seen == []  # nothing escaped as a warning
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert load_image(img).getpixel((0, 0)) == (1, 2, 3)


def palette_image(transparent):
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 0, 128, 255] + [0] * 762)  # index 0 black, 1 a blue
    img.putpixel((1, 0), 1)
    return encoded(img, transparency=0) if transparent else encoded(img)


@pytest.mark.parametrize("blob, expected", [
    (encoded(Image.new("L", (2, 1), 100)), [(100, 100, 100)] * 2),
    (encoded(Image.new("1", (2, 1), 1)), [(255, 255, 255)] * 2),
    (encoded(Image.new("LA", (2, 1), (100, 0))), [(255, 255, 255)] * 2),
    (palette_image(transparent=False), [(0, 0, 0), (0, 128, 255)]),
    (palette_image(transparent=True), [(255, 255, 255), (0, 128, 255)]),
    (encoded(Image.new("L", (2, 1), 7), transparency=7), [(255, 255, 255)] * 2),
    (encoded(Image.new("RGB", (2, 1), (1, 2, 3)), transparency=(1, 2, 3)), [(255, 255, 255)] * 2),
    (encoded(Image.new("RGBA", (2, 1), (255, 0, 0, 128))), [(255, 127, 127)] * 2),
    (encoded(Image.new("CMYK", (2, 1), (0, 255, 255, 0)), "TIFF"), [(255, 0, 0)] * 2),
    (encoded(Image.new("I;16", (2, 1), 65535)), [(255, 255, 255)] * 2),
    (encoded(Image.new("I;16", (2, 1), 0)), [(0, 0, 0)] * 2),
], ids=["L", "1", "LA-transparent", "P", "P-transparency", "L-tRNS", "RGB-tRNS", "RGBA-half",
        "CMYK", "I16-max", "I16-zero"])
def test_every_mode_becomes_the_rgb_it_shows(blob, expected):
    """Grey is repeated, a palette looked up, CMYK converted; transparent pixels (alpha, or a
    palette/grey/colour key in tRNS) become white as they show on a page, half alpha blends with
    white; 16-bit grey is scaled to 8 bits, not clipped (32768 -> 128 is in test_data.py)."""
    img = load_image(blob)
    assert img.mode == "RGB" and [img.getpixel((x, 0)) for x in range(2)] == expected


# ------------------------------------------------------------------------------------ records

def test_bad_rows_name_file_row_and_key(tmp_path):
    """A TSV row with bad base64 (image or text column), a JSONL row with a number for its image or
    a number or null for a text field, and a byte-order mark before line 1 (read, not refused). A
    JSONL row without its image key is no error but a text-only row (test_data.py has it, with
    wrong TSV column counts, broken JSON lines and missing images)."""
    Image.new("RGB", (4, 4), (9, 9, 9)).save(tmp_path / "a.png")
    good = {"image": "a.png", "question": "Q?", "chosen": "C.", "rejected": "R."}
    lines = [good, {k: v for k, v in good.items() if k != "image"}, {**good, "chosen": 5},
             {**good, "rejected": None}, {**good, "image": 5}]
    (tmp_path / "d.jsonl").write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in lines).encode())
    rows = Records(tmp_path / "d.jsonl")
    assert rows[0]["image"].getpixel((0, 0)) == (9, 9, 9) and rows[0]["chosen"] == "C."
    where = f"{tmp_path / 'd.jsonl'}"
    assert rows[1]["image"] is None and rows[1]["chosen"] == "C." and "error" not in rows[1]
    assert rows[2]["error"] == f"{where}:3: TypeError: chosen is int, not text"
    assert rows[3]["error"] == f"{where}:4: TypeError: rejected is NoneType, not text"
    assert rows[4]["error"].startswith(f"{where}:5: TypeError: ")

    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    text = b64(json.dumps(["Q?", "C.", "R."]).encode())
    image = b64(encoded(Image.new("RGB", (4, 4))))
    tsv = [["x", "not*base64", text], ["x", image, "not*base64"], ["x", image, b64(b"[1, 2, 3]")]]
    (tmp_path / "h.tsv").write_text("".join("\t".join(c + ["vqa", "", "0", "x.jpg"]) + "\n" for c in tsv))
    rows = Records(tmp_path / "h.tsv")
    assert [rows[i]["error"].split(": ")[:2] for i in range(3)] == [
        [f"{tmp_path / 'h.tsv'}:1", "Error"], [f"{tmp_path / 'h.tsv'}:2", "Error"],
        [f"{tmp_path / 'h.tsv'}:3", "AttributeError"]]  # binascii.Error; a number for the question


def test_empty_answers_are_skipped_and_counted(tok, dataset):
    """Empty or blank chosen / rejected / answer: skipped and counted by reason (empty question,
    chosen == rejected, prompt > max_len and unreadable rows are in test_data.py)."""
    item = Records(dataset / "pairs.jsonl")[0]
    b = Batcher(tok, 8, 32, max_len=512, gamma=1.0)
    batch = b.pairs([item, {**item, "chosen": ""}, {**item, "rejected": " \n"},
                     {k: v for k, v in item.items() if k != "rejected"}])
    assert len(batch["sample_ids"]) == 1 and batch["skipped"] == {"empty chosen": 1, "empty rejected": 2}
    sft = {**item, "answer": item["chosen"]}
    assert b.sft([sft, {**sft, "answer": "  "}])["skipped"] == {"empty answer": 1}


def test_unusable_data_files_are_errors(tmp_path):
    """An empty file (or one with fewer rows than a batch) and an unknown extension: errors naming
    the file. (A parquet file without pyarrow installed: test_data.py.)"""
    (tmp_path / "empty.jsonl").write_text("\n")
    cfg = train.TrainConfig(batch_size=2)
    with pytest.raises(cli.InputError, match=f"{tmp_path / 'empty.jsonl'}: 0 rows, fewer than one batch"):
        next(train.batches(Records(tmp_path / "empty.jsonl"), list, cfg, 0))
    with pytest.raises(ValueError, match=f"{tmp_path / 'pairs.csv'}: unknown data format"):
        Records(tmp_path / "pairs.csv")


def test_records_keep_offsets_not_rows(tmp_path):
    """Records holds one byte offset per row and reads the row from disk when asked: an edit made
    after indexing is seen, and nothing of the rows' text sits in the object."""
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    rows = [{"image": "a.png", "question": f"Q{i}?", "chosen": "C.", "rejected": "R."} for i in range(3)]
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(r) + "\n" for r in rows]
    path.write_text("".join(lines))
    records = Records(path)
    offsets = [sum(map(len, lines[:i])) for i in range(3)]
    assert vars(records) == {"path": str(path), "kind": "jsonl", "offsets": offsets}
    path.write_text(path.read_text().replace("Q1?", "X1?"))  # same length: offsets stay valid
    assert records[1]["question"] == "X1?"


# ------------------------------------------------------------------------ tokens, options, files

def test_tokens_outside_the_vocabulary_are_refused_before_the_model(tmp_path, tok, dataset, init_ckpt):
    """A tokenizer that does not match the checkpoint (here the model has 8 more rows of
    embedding) is refused by train and sample naming the tokenizer file, so no id can reach an
    embedding it does not fit. The model itself does not check (a check there costs a host sync per
    forward and breaks the graph-captured decode step); on the CPU torch raises IndexError."""
    torch.manual_seed(0)
    other = Muffin(sized("tiny", tok.vocab_size + 8, tok.im_patch_id))
    other.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "tokenizer.model").write_bytes(tok.sp.serialized_model_proto())
    msg = f"{tmp_path / 'ckpt' / 'tokenizer.model'} does not match the model: {tok.vocab_size} tokens"
    with pytest.raises(cli.InputError, match=msg):
        train.train(config(tmp_path, dataset, tmp_path / "ckpt"))
    with pytest.raises(cli.InputError, match=msg):
        sample.main([f"--ckpt={tmp_path / 'ckpt'}", f"--image={dataset / 'images' / '0.png'}", "--device=cpu"])
    with pytest.raises(IndexError):
        Muffin.from_pretrained(init_ckpt)(torch.tensor([[tok.vocab_size]]))


@pytest.mark.parametrize("cls", [sample.SampleConfig, train.TrainConfig])
@pytest.mark.parametrize("arg, message", [
    ("--temprature=0.7", "unknown option '--temprature=0.7'; valid: "),
    ("seed=3", "unknown option 'seed=3'; valid: "),
    ("--seed=three", "--seed expects int, got 'three'"),
    ("--seed=1.5", "--seed expects int, got '1.5'"),
    ("--compile=maybe", "--compile expects true or false, got 'maybe'"),
])
def test_bad_options_exit_with_the_valid_ones(cls, arg, message):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(cls, [arg])
    assert str(e.value).startswith(message)
    if "valid" in message:
        assert "--seed" in str(e.value) and ("--steps" in str(e.value)) == (cls is train.TrainConfig)


def run_cli(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("program, cls", [("train.py", train.TrainConfig), ("sample.py", sample.SampleConfig),
                                          ("bench.py", None)])
def test_help_names_every_option_with_its_type_default_and_comment(program, cls, capsys):
    """--help (run as a program) and -h print the purpose, the docstring's example commands and one
    line per option (--name=type, default, the comment beside the field), and exit 0."""
    import bench
    cls = cls or bench.BenchConfig
    out = run_cli(program, "--help")
    assert out.returncode == 0 and out.stderr == "", out.stderr
    with pytest.raises(SystemExit) as e:
        cli.parse_args(cls, ["--seed=1", "-h"])
    assert e.value.code == 0 and capsys.readouterr().out == out.stdout
    assert f"python {program}" in out.stdout and "examples:" in out.stdout
    for f in dataclasses.fields(cls):
        line = next(line for line in out.stdout.splitlines() if line.strip().startswith(f"--{f.name}="))
        assert f"--{f.name}={type(getattr(cls(), f.name)).__name__}" in line
    assert ("weight of tokens in corrected segments" in out.stdout) == (program == "train.py")


@pytest.mark.parametrize("args, message", [
    (["train.py", "--stage=sft", "--data=missing.jsonl"], "train.py: --data=missing.jsonl: no such file or directory"),
    (["train.py", "--stage=ddpo", "--data=train.py", "--init=no/ckpt"], "train.py: --init=no/ckpt: no such file"),
    (["train.py", "--tokenizer=no.model"], "train.py: --tokenizer=no.model: no such file or directory"),
    (["sample.py", "--ckpt=no/ckpt", "--image=x.png"], "sample.py: --ckpt=no/ckpt: no such file or directory"),
    (["sample.py", "--ckpt=tests", "--image=x.png"], "sample.py: --image=x.png: no such file or directory"),
    (["sample.py", "--ckpt=tests"], "sample.py: --image is required"),
    (["train.py", "--lr=abc"], "train.py: --lr expects float, got 'abc'"),
    (["train.py", "--rounds=0"], "train.py: --rounds=0: must be at least 1 and at most --steps=200"),
    (["train.py", "--steps=2", "--rounds=3"], "train.py: --rounds=3: must be at least 1 and at most --steps=2"),
    (["bench.py", "--iters"], "bench.py: --iters expects int, got ''"),
    (["bench.py", "--shape=huge"], "bench.py: unknown --shape=huge; valid: "),
])
def test_command_line_mistakes_are_one_line_with_status_2(args, message, monkeypatch, capsys):
    """A path that does not exist or a bad value: one line naming the option, exit status 2, no
    traceback. In-process through cli.run, the programs' entry point; one case as a real process."""
    import bench
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(SystemExit) as e:
        cli.run({"train.py": train.main, "sample.py": sample.main, "bench.py": bench.main}[args[0]])
    out = capsys.readouterr()
    assert e.value.code == 2 and out.out == ""
    assert out.err.startswith(message) and out.err.count("\n") == 1, out.err
    if args[0] == "sample.py" and "--image=x.png" in args[-1]:
        proc = run_cli(*args)
        assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", out.err)


def test_a_reference_cache_from_another_max_len_is_refused(tmp_path, tok, dataset, init_ckpt):
    """Cached reference log-probs whose token counts differ from the data's now (computed with
    another max_len or tokenizer) are refused naming the cache and the sample; an edited sample
    is in test_train.py."""
    data = pairs_file(tmp_path / "d.jsonl", dataset, good_rows(dataset, 2))
    cfg = config(tmp_path, dataset, init_ckpt, data=str(data), batch_size=2)
    model = Muffin.from_pretrained(init_ckpt).eval()
    records = Records(data)
    n = model.config.n_query
    ref = train.reference_logps(model, records, Batcher(tok, n, 32, max_len=512, gamma=1.0), cfg)
    short = Batcher(tok, n, 32, max_len=len(prompt_ids(tok, records[0]["question"], n)) + 3, gamma=1.0)
    with pytest.raises(ValueError, match=rf"ref_logps.safetensors: sample {records[0]['id']} has \d+/\d+ "
                                         r"cached tokens but 3/3 now \(another tokenizer or max_len\?\)"):
        ref.logps(short.pairs([records[0]]))


# ---------------------------------------------------------------------------------- training

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_step_is_not_applied_and_the_checkpoint_survives(tmp_path, dataset, init_ckpt,
                                                                      monkeypatch, bad):
    """Step 2's loss becomes NaN (or inf): the run stops with FloatingPointError naming step 2, the
    weights in memory are those of step 1 (the update was not applied), and the step-1 checkpoint
    on disk is the one `latest` points at, bit for bit."""
    calls, saved = [], {}
    forward_loss, save_checkpoint = train.forward_loss, train.save_checkpoint

    def poisoned(model, batch, cfg):
        loss, metrics = forward_loss(model, batch, cfg)
        calls.append(1)
        return (loss * bad if len(calls) == 2 else loss), metrics

    def snapshot(model, opt, step, cfg, tok_file, **kw):
        saved.update(model=model, weights={k: v.clone() for k, v in model.state_dict().items()})
        save_checkpoint(model, opt, step, cfg, tok_file, **kw)

    monkeypatch.setattr(train, "forward_loss", poisoned)
    monkeypatch.setattr(train, "save_checkpoint", snapshot)
    data = pairs_file(tmp_path / "d.jsonl", dataset, good_rows(dataset, 1))
    with pytest.raises(FloatingPointError, match="step 2: non-finite loss or gradient"):
        train.train(config(tmp_path, dataset, init_ckpt, data=str(data), batch_size=1, steps=2,
                           save_every=1))
    run = tmp_path / "run"
    assert (run / "latest").read_text() == "ckpt-1"
    on_disk = Muffin.from_pretrained(run / "ckpt-1").state_dict()
    for name, t in saved["weights"].items():
        assert torch.equal(on_disk[name], t) and torch.equal(saved["model"].state_dict()[name], t), name


def test_an_interrupted_checkpoint_write_leaves_the_previous_one(tmp_path, tok, monkeypatch):
    """A crash half-way through writing a file (here: state.pt of the step-2 checkpoint) leaves no
    partial file: the old file, `latest` and the step-1 checkpoint are intact and resumable."""
    torch.manual_seed(0)
    m = Muffin(sized("tiny", tok.vocab_size, tok.im_patch_id)).init_weights()
    opt = torch.optim.AdamW(m.parameters())
    tok_file = tmp_path / "tok.model"
    tok_file.write_bytes(tok.sp.serialized_model_proto())
    cfg = train.TrainConfig(out_dir=str(tmp_path / "run"), resume=True)
    train.save_checkpoint(m, opt, 1, cfg, tok_file)
    weights = tmp_path / "run" / "ckpt-1" / "model.safetensors"
    before = weights.read_bytes()

    def half_then_crash(p):
        with open(p, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):  # the same file, rewritten
        atomic_write(str(weights), half_then_crash)
    assert weights.read_bytes() == before and sorted(os.listdir(weights.parent)) == [
        "config.json", "model.safetensors", "state.pt", "tokenizer.model"]

    real = train.atomic_write
    monkeypatch.setattr(train, "atomic_write", lambda path, content: real(
        path, half_then_crash if path.endswith("state.pt") else content))
    with torch.no_grad():
        m.lm_head.weight.add_(1.0)
    with pytest.raises(OSError, match="No space left"):  # a new checkpoint, cut short
        train.save_checkpoint(m, opt, 2, cfg, tok_file)
    assert (tmp_path / "run" / "latest").read_text() == "ckpt-1"
    assert not (tmp_path / "run" / "ckpt-2" / "state.pt").exists()
    _, state = train.load_model(cfg, tok)
    assert state["step"] == 1 and weights.read_bytes() == before


class RunsCode:
    """Unpickling this calls os.makedirs(path): a stand-in for any code a hostile file runs."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.makedirs, (self.path,)


def test_a_state_pt_that_would_run_code_is_refused(tmp_path, tok, init_ckpt):
    """Resuming reads state.pt with torch.load(weights_only=True): a pickle that would call a
    function is refused with an error naming the file, and the function never runs. (Weights are
    safetensors; .bin weights are refused the same way: test_vision.py.)"""
    ckpt = tmp_path / "run" / "ckpt-1"
    Muffin.from_pretrained(init_ckpt).save_pretrained(ckpt)
    marker = tmp_path / "ran"
    torch.save({"step": 1, "optimizer": RunsCode(str(marker))}, ckpt / "state.pt")
    (tmp_path / "run" / "latest").write_text("ckpt-1")
    cfg = train.TrainConfig(out_dir=str(tmp_path / "run"), resume=True)
    with pytest.raises(ValueError, match=f"{ckpt / 'state.pt'}: refused or unreadable"):
        train.load_model(cfg, tok)
    assert not marker.exists()


def test_sigkill_then_resume_logs_the_losses_of_an_uninterrupted_run(tmp_path, dataset, init_ckpt):
    """`python train.py` is killed with SIGKILL (no handler, no flush) once a checkpoint exists, and
    resumed with --resume (in this process, to save a second start-up of torch): the losses logged
    after the checkpoint are those of a run never stopped; log.jsonl keeps the lines of both."""
    data = pairs_file(tmp_path / "d.jsonl", dataset, good_rows(dataset, 2))
    full = tmp_path / "full"
    train.train(config(full, dataset, init_ckpt, data=str(data), batch_size=1, steps=6, save_every=2))
    with open(full / "run" / "log.jsonl") as f:
        expected = {r["step"]: r["loss"] for r in map(json.loads, f)}

    out = tmp_path / "cut"
    args = [sys.executable, "train.py", "--stage=ddpo", f"--data={data}", f"--init={init_ckpt}",
            f"--out_dir={out}", "--steps=6", "--batch_size=1", "--lr=1e-3", "--warmup=0",
            "--log_every=1", "--save_every=2", "--device=cpu", "--average=False"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "latest").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()
    proc.stderr.close()
    resumed_from = int((out / "latest").read_text().removeprefix("ckpt-"))
    assert resumed_from < 6 and not (out / "model.safetensors").exists()  # killed mid-run

    train.main(args[2:] + ["--resume"])
    with open(out / "log.jsonl") as f:
        logged = [json.loads(line) for line in f]
    after = logged[-(6 - resumed_from):]
    assert [r["step"] for r in logged[:resumed_from]] == list(range(1, resumed_from + 1))  # appended
    assert [r["step"] for r in after] == list(range(resumed_from + 1, 7))
    assert [r["loss"] for r in after] == [expected[r["step"]] for r in after]


# ------------------------------------------------------------------ wrong files, one line each

@pytest.fixture
def wrong(tmp_path, dataset, init_ckpt):
    """Files that are not what an option expects, beside the right ones: {name: path}."""
    notes, empty = tmp_path / "notes.txt", tmp_path / "empty"
    notes.write_text("milk, eggs\n")
    empty.mkdir()
    paths = dict(pairs=dataset / "pairs.jsonl", sft=dataset / "sft.jsonl", image=dataset / "images" / "0.png",
                 init=init_ckpt, notes=notes, empty=empty, csv=tmp_path / "pairs.csv", out=tmp_path / "run")
    paths["csv"].write_text("image,question\n")
    for name, damage in (("no_weights", "remove"), ("cut_weights", "truncate"), ("no_tokenizer", "no_tok")):
        ckpt = tmp_path / name
        shutil.copytree(init_ckpt, ckpt)
        weights = ckpt / "model.safetensors"
        if damage == "remove":
            weights.unlink()
        elif damage == "truncate":
            weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
        else:
            (ckpt / "tokenizer.model").unlink()
        paths[name] = ckpt
    blob = base64.b64encode(b"not an image").decode()  # RLHF-V-Hall's 7 columns, no image decodes
    text = base64.b64encode(json.dumps(["Describe.", "A cat.", "A dog."]).encode()).decode()
    paths["tsv"] = tmp_path / "hall.tsv"
    paths["tsv"].write_text("".join(f"{i}\t{blob}\t{text}\tx\tx\tx\tx\n" for i in range(8)))
    return paths


TRAIN = "train.py --steps=2 --batch_size=4 --device=cpu --out_dir={out} "
SAMPLE = "sample.py --device=cpu --max_new_tokens=2 "


@pytest.mark.parametrize("command, named, says", [
    # data whose rows do not fit the stage, or of which no row can be used
    (TRAIN + "--stage=sft --data={pairs} --init={init}", "pairs", "no usable row for --stage=sft in its 16 rows: "
     "16 empty answer; --stage=sft reads question/answer; these rows have chosen/rejected: DDPO pairs?"),
    (TRAIN + "--stage=ddpo --data={sft} --init={init}", "sft", "no usable row for --stage=ddpo in its 16 rows: "
     "16 empty chosen; --stage=ddpo reads question/chosen/rejected; these rows have answer: SFT data?"),
    (TRAIN + "--stage=ddpo --data={tsv} --init={init}", "tsv", "no usable row for --stage=ddpo in its 8 rows: "
     "8 unreadable row; the first: "),
    # a file that is not what the option expects
    (TRAIN + "--stage=ddpo --data={csv} --init={init}", "csv", "unknown data format"),
    (TRAIN + "--stage=ddpo --data={empty} --init={init}", "empty", "a directory; expected a data file"),
    (TRAIN + "--stage=ddpo --data={pairs} --init={empty}", "empty", "no config.json: not a checkpoint directory"),
    (TRAIN + "--stage=ddpo --data={pairs} --init={notes}", "notes", "not a directory; a checkpoint is a directory"),
    (TRAIN + "--stage=ddpo --data={pairs} --init={no_weights}", "no_weights", "no weights (model.safetensors"),
    (TRAIN + "--stage=ddpo --data={pairs} --init={cut_weights}", "cut_weights", "unreadable as safetensors"),
    (TRAIN + "--stage=ddpo --data={pairs} --init={no_tokenizer}", "no_tokenizer", "no tokenizer.model in the "
     "checkpoint; give --tokenizer"),
    (TRAIN + "--stage=ddpo --data={pairs} --init={init} --tokenizer={notes}", "notes", "not a SentencePiece model"),
    (SAMPLE + "--ckpt={empty} --image={image}", "empty", "no config.json: not a checkpoint directory"),
    (SAMPLE + "--ckpt={cut_weights} --image={image}", "cut_weights", "unreadable as safetensors"),
    (SAMPLE + "--ckpt={no_tokenizer} --image={image}", "no_tokenizer", "no tokenizer.model in the checkpoint"),
    (SAMPLE + "--ckpt={init} --image={notes}", "notes", "UnidentifiedImageError"),
    (SAMPLE + "--ckpt={init} --image={empty}", "empty", "IsADirectoryError"),
    (SAMPLE + "--ckpt={init} --image={image} --tokenizer={notes}", "notes", "not a SentencePiece model"),
])
def test_a_wrong_file_is_one_line_with_status_1_and_no_model(command, named, says, wrong, monkeypatch, capsys):
    """(program x wrong input): exit status 1, one line on stderr (no traceback) that names the file
    and says what was expected, nothing on stdout; a training run writes no model. In-process
    through cli.run, the programs' entry point; test_a_wrong_file_is_refused_as_a_real_process runs
    one of them as a process."""
    argv = command.format(**wrong).split()
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        cli.run({"train.py": train.main, "sample.py": sample.main}[argv[0]])
    out = capsys.readouterr()
    assert e.value.code == 1 and out.out == "", out.out
    assert out.err.startswith(f"{argv[0]}: ") and out.err.count("\n") == 1, out.err
    assert str(wrong[named]) in out.err and says in out.err, out.err
    assert not os.path.exists(wrong["out"] / "model.safetensors")


def test_a_wrong_file_is_refused_as_a_real_process(wrong):
    """The same as a program run at a terminal: status 1, one line, no "Traceback"."""
    proc = run_cli("train.py", "--stage=sft", f"--data={wrong['pairs']}", f"--init={wrong['init']}",
                   f"--out_dir={wrong['out']}", "--device=cpu", "--batch_size=4")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{wrong['pairs']}: no usable row for --stage=sft" in proc.stderr
    assert not os.path.exists(wrong["out"] / "model.safetensors")


def test_a_genuine_bug_keeps_its_traceback(monkeypatch):
    """cli.run turns only InputError and UsageError into one line: anything else is a bug in the
    program, and its traceback is what a report of it needs."""
    def broken(argv):
        raise KeyError("a bug")
    monkeypatch.setattr(sys, "argv", ["train.py"])
    with pytest.raises(KeyError):
        cli.run(broken)


def test_some_bad_rows_warn_before_training_and_an_empty_micro_batch_is_no_step(tmp_path, dataset, init_ckpt,
                                                                                capsys):
    """Half the rows unusable: said on stderr before the first step (the share, the reasons, the
    first bad row); with batch_size 1 a micro-batch whose row is skipped is passed over, so each of
    the 4 steps trains on a row and logs; the skips are counted at the end."""
    rows = good_rows(dataset, 2)
    data = pairs_file(tmp_path / "d.jsonl", dataset, rows + [{**rows[0], "rejected": rows[0]["chosen"]}])
    with open(data, "a") as f:
        f.write(json.dumps({**rows[1], "image": "missing.png"}) + "\n")
    train.train(config(tmp_path, dataset, init_ckpt, data=str(data), batch_size=1))
    out = capsys.readouterr()
    assert out.err.startswith(f"warning: {data}: 2 of its 4 rows will be skipped (1 chosen == rejected, "
                              f"1 unreadable row); the first: {data}:3") and out.err.count("\n") == 1, out.err
    assert "ddpo: skipped rows: " in out.out and "chosen == rejected" in out.out and "unreadable row" in out.out
    with open(tmp_path / "run" / "log.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]
    assert os.path.exists(tmp_path / "run" / "model.safetensors")


def test_a_second_init_into_the_same_out_dir_does_not_use_the_first_reference(tmp_path, dataset, init_ckpt,
                                                                             tok, capsys):
    """The reference cache records its inputs. A DDPO run from another --init into the first run's
    --out_dir computes the reference again, from its own model (the cache equals a fresh one's),
    saying which input changed; a resumed run cannot (its model is no longer the initial one) and
    stops in one line; another gamma (as the miniature's vanilla-DPO arm shares the cache) reuses it."""
    other = tmp_path / "other"
    torch.manual_seed(1)
    Muffin(sized("tiny", tok.vocab_size, tok.im_patch_id)).init_weights().save_pretrained(other)
    shutil.copy(init_ckpt / "tokenizer.model", other / "tokenizer.model")
    first = config(tmp_path, dataset, init_ckpt, steps=1)
    train.train(first)
    cache = tmp_path / "run" / "ref_logps.safetensors"
    second = dataclasses.replace(first, init=str(other))
    train.train(second)
    assert (f"{cache}: computed from another --init={other}, tokenizer {other / 'tokenizer.model'}: computing it "
            "again") in capsys.readouterr().out
    fresh = dataclasses.replace(second, out_dir=str(tmp_path / "fresh"))
    train.train(fresh)
    from safetensors.torch import load_file
    assert load_file(cache).keys() == load_file(tmp_path / "fresh" / "ref_logps.safetensors").keys()
    for k, v in load_file(tmp_path / "fresh" / "ref_logps.safetensors").items():
        torch.testing.assert_close(load_file(cache)[k], v, rtol=0, atol=0)
    stamp = os.stat(cache).st_mtime_ns
    train.train(dataclasses.replace(second, gamma=1.0))
    assert "computing it again" not in capsys.readouterr().out and os.stat(cache).st_mtime_ns == stamp
    with pytest.raises(cli.InputError, match=re.escape(f"{cache}: computed from another --init={init_ckpt}, ")
                       + ".*; a resumed run cannot compute it again"):
        train.train(dataclasses.replace(first, steps=2, resume=True))
