"""sample.py: batched, left-padded, KV-cached decoding (greedy, and beam search) equals naive
recomputation; beam search follows transformers' rules on distributions built by hand (its parity
with transformers itself is in test_parity.py); bf16; the command line: presets, --interactive, bad
options."""
import base64
import io
import json
import math
import os

import pytest
import torch
from PIL import Image

import data
import sample
from data import STOP, image_tensor, prompt_ids
from model import Muffin, sized


def naive_greedy(model, tok, image, question, n):
    """One row, no cache, no padding: the whole sequence recomputed for every new token."""
    ids = prompt_ids(tok, question, model.config.n_query)
    out = []
    for _ in range(n):
        logits = model(torch.tensor([ids + out]), images=image[None])[0, -1]
        out.append(int(logits.argmax()))
    return out


def test_batched_cached_generation_equals_recomputation(tok, dataset):
    """Prompts of different lengths in one batch (left-padded, pad slots masked, KV cache, decode
    steps of one token) give each row exactly the greedy tokens of a naive loop over that row alone,
    cut at the first stop token."""
    torch.manual_seed(0)
    model = Muffin(sized("tiny", tok.vocab_size, tok.im_patch_id)).init_weights().eval()
    images = torch.stack([image_tensor(Image.open(dataset / "images" / f"{i}.png").convert("RGB"), 32)
                          for i in range(3)])
    questions = ["Describe this image in detail.", "What colour is the square?", "How many?"]
    answers = sample.generate(model, tok, images, questions, max_new_tokens=12)
    for image, q, a in zip(images, questions, answers):
        with torch.no_grad():
            want = tok.decode(naive_greedy(model, tok, image, q, 12)).split(STOP)[0].strip()
        assert a == want


def test_sampling_respects_top_p_and_repetition_penalty():
    """top_p keeps the smallest set reaching p (here the top token alone); the repetition penalty
    divides a seen token's positive logit, which can flip the greedy choice."""
    logits = torch.tensor([[3.0, 2.9, -5.0]])
    seen = torch.tensor([[True, False, False]])
    assert sample.next_token(logits, seen, 0.0, 1.0, 1.0).item() == 0
    assert sample.next_token(logits, seen, 0.0, 1.0, 1.1).item() == 1  # 3.0 / 1.1 < 2.9
    torch.manual_seed(0)
    draws = {sample.next_token(logits, ~seen, 1.0, 0.4, 1.0).item() for _ in range(50)}
    assert draws == {0}
    draws = {sample.next_token(logits, ~seen, 1.0, 1.0, 1.0).item() for _ in range(200)}
    assert draws == {0, 1}


def test_main_prompts_with_the_bos_the_checkpoints_files_name(tok, dataset, init_ckpt, monkeypatch):
    """sample.py reads the checkpoint's special_tokens_map.json: with BOS = "</s>" (Muffin's v0
    script) the prompt starts with id 2, as in training; without the file with <s> (1)."""
    firsts, splice = [], Muffin.splice  # the prefill splices the image into the prompt's embeddings
    monkeypatch.setattr(Muffin, "splice", lambda m, ids, *a, **kw: firsts.append(int(ids[0, 0])) or splice(m, ids, *a, **kw))
    args = [f"--ckpt={init_ckpt}", f"--image={dataset / 'images' / '0.png'}", "--device=cpu", "--max_new_tokens=1"]
    sample.main(args)
    with open(init_ckpt / "special_tokens_map.json", "w") as f:
        json.dump({"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "[PAD]"}, f)
    sample.main(args)
    assert firsts == [1, 2]  # one prefill each: a single new token needs no decode step


# ----------------------------------------------------------------------------------- beam search

def recompute(model, prompts, images):
    """(first logits, advance, reorder) for sample.beam_search without a KV cache: each row's whole
    sequence, with its image, recomputed alone at every step."""
    rows = [(list(p), i) for i, p in enumerate(prompts)]

    def last_logits():
        return torch.stack([model(torch.tensor([ids]), images=images[i][None])[0, -1]
                            for ids, i in rows]).float()

    def advance(tokens, _):
        rows[:] = [(ids + [t], i) for (ids, i), t in zip(rows, tokens.tolist())]
        return last_logits()

    def reorder(index):
        rows[:] = [rows[j] for j in index.tolist()]

    return last_logits(), advance, reorder


def cut(ids, stop):
    """ids up to and including the first stop token, as sample.generate_ids returns them."""
    return ids[:next((j + 1 for j, t in enumerate(ids) if stop[t]), len(ids))]


def tiny_setup(tok, dataset):
    torch.manual_seed(0)
    model = Muffin(sized("tiny", tok.vocab_size, tok.im_patch_id)).init_weights().eval()
    images = torch.stack([image_tensor(Image.open(dataset / "images" / f"{i}.png").convert("RGB"), 32)
                          for i in range(3)])
    questions = ["Describe this image in detail.", "What colour is the square?", "How many?"]
    return model, images, [prompt_ids(tok, q, model.config.n_query) for q in questions]


@torch.no_grad()
def test_batched_cached_beam_search_equals_recomputation(tok, dataset):
    """Three prompts of different lengths, 3 beams each as rows of one batch (left-padded, prefilled
    once, cache rows copied to the beams and reordered after every step), give each prompt the
    answer of the same search recomputing every beam's whole sequence alone, without a cache."""
    model, images, prompts = tiny_setup(tok, dataset)
    stop = data.stop_tokens(tok, "cpu")
    got = sample.generate_ids(model, prompts, stop, model.encode_images(images), max_new_tokens=10, num_beams=3,
                        repetition_penalty=1.1)
    seen = torch.zeros(3, tok.vocab_size, dtype=torch.bool)
    for row, p in zip(seen, prompts):
        row[p] = True
    want = sample.beam_search(*recompute(model, prompts, images), seen, stop, 10, 3, repetition_penalty=1.1)
    assert got == [cut(w, stop) for w in want.tolist()]


@torch.no_grad()
def test_one_beam_is_greedy(tok, dataset):
    """Beam search with one beam is greedy decoding: the one running beam takes the most likely
    token that does not stop, and when the most likely token stops, that hypothesis is finished and
    no running beam can beat it (its log-prob is below the stop token's). The stop token here is
    the greedy answer's 6th, so the answer ends there, not at max_new_tokens."""
    model, images, prompts = tiny_setup(tok, dataset)
    greedy = naive_greedy(model, tok, images[0], "Describe this image in detail.", 12)
    stop = torch.zeros(tok.vocab_size, dtype=torch.bool)
    stop[greedy[5]] = True
    seen = torch.zeros(1, tok.vocab_size, dtype=torch.bool)
    got = sample.beam_search(*recompute(model, prompts[:1], images), seen, stop, 12, 1)
    assert cut(got[0].tolist(), stop) == cut(greedy, stop) and len(cut(greedy, stop)) <= 6


def controlled(probs, vocab, offset=0.0):
    """(first logits, advance, reorder) for sample.beam_search from a model whose next-token
    probabilities after each history are given: probs[history] = {token: p}; the logits are
    log p + offset, tokens left out (and every token after a history left out) ~e^-30."""
    rows = [()]

    def logits(history):
        z = torch.full((vocab,), -30.0)
        for t, p in probs.get(history, {}).items():
            z[t] = math.log(p) + offset
        return z

    def advance(tokens, _):
        rows[:] = [h + (t,) for h, t in zip(rows, tokens.tolist())]
        return torch.stack([logits(h) for h in rows])

    def reorder(index):
        rows[:] = [rows[j] for j in index.tolist()]

    return logits(())[None], advance, reorder


def test_beam_search_finds_a_likelier_answer_than_greedy():
    """Tokens a=0, b=1 and the stop token 2. First token: a 0.6, b 0.4; after a: a 0.3, b 0.3,
    stop 0.4; after b: stop 0.9 (a, b 0.05). Greedy takes a, then stop: p = 0.6 * 0.4 = 0.24.
    Two beams: a (ln 0.6 = -0.511) and b (ln 0.4 = -0.916); then the best two extensions are
    b stop (-0.916 + ln 0.9 = -1.022) and a stop (-0.511 + ln 0.4 = -1.427), both finished, scored
    per token: -0.511 and -0.714. The best running beam, a a (-0.511 + ln 0.3 = -1.715, -0.857
    per token), cannot beat the worse of them, so the search ends: b stop, p = 0.36."""
    probs = {(): {0: 0.6, 1: 0.4}, (0,): {0: 0.3, 1: 0.3, 2: 0.4}, (1,): {0: 0.05, 1: 0.05, 2: 0.9}}
    stop = torch.tensor([False, False, True])
    logits, advance, _ = controlled(probs, 3)
    greedy = [int(logits.argmax())]
    greedy.append(int(advance(torch.tensor(greedy), 0).argmax()))
    assert greedy == [0, 2]
    seen = torch.zeros(1, 3, dtype=torch.bool)
    best = sample.beam_search(*controlled(probs, 3), seen, stop, 6, 2)
    assert best[0, :2].tolist() == [1, 2]


def test_repetition_penalty_multiplies_each_beams_own_log_probs():
    """Tokens a=0, b=1, stop=3, penalty 2, two tokens. First token: a 0.55, b 0.45; after either:
    a 0.6, stop 0.4. Logits are log p + 3, so a penalty on the logits (positive: divided) would
    differ from one on the log-probs (multiplied), which is what transformers' beam search does.
    Beams a (ln 0.55 = -0.598) and b (ln 0.45 = -0.799). Beam a has seen a: a a = -0.598 + 2 ln 0.6
    = -1.619, a stop = -0.598 + ln 0.4 = -1.514; beam b has not: b a = -0.799 + ln 0.6 = -1.310,
    b stop = -1.715. At the last token the best two, b a and a stop, finish: -0.655 and -0.757 per
    token, so b a wins. Without the penalty a a (-1.109) would; penalising the logits gives a stop
    (-0.956, as ln softmax(1.245, 2.084) makes stop -0.358); a penalty on tokens any beam has seen
    gives a stop (b a = -1.820)."""
    probs = {(): {0: 0.55, 1: 0.45}, (0,): {0: 0.6, 3: 0.4}, (1,): {0: 0.6, 3: 0.4}}
    stop = torch.tensor([False, False, False, True])
    seen = torch.zeros(1, 4, dtype=torch.bool)
    best = sample.beam_search(*controlled(probs, 4, offset=3.0), seen, stop, 2, 2, repetition_penalty=2.0)
    assert best[0].tolist() == [1, 0]


@pytest.mark.parametrize("beams, early_stopping, answer", [(2, True, [3]), (2, False, [0, 2, 3]),
                                                           (1, False, [3])])
def test_when_beam_search_stops(beams, early_stopping, answer):
    """transformers' stopping rule. Tokens a=0, b=1, c=2, stop=3. First token: stop 0.5, a 0.45,
    b 0.05; after a: c 0.9, stop 0.1; after b: stop; after a c: stop 0.55, c 0.45.
    Two beams: "stop" finishes (ln 0.5 = -0.693), a (-0.799) and b (-2.996) run; then the best two
    extensions are a c (-0.799 + ln 0.9 = -0.904) and b stop (-2.996), which finishes (-1.498 per
    token): two hypotheses. early_stopping=True: done, "stop" is the answer. False: the running a c
    scores -0.452 per token, above the worse finished one, so the search goes on, and a c stop
    (-0.904 + ln 0.55 = -1.502, -0.501 per token) beats "stop" (had the length counted one token
    more, -0.375 would not beat -0.347). One beam: "stop" finishes first, and the running a (-0.799
    per token) cannot beat it, so the search ends there, though a c stop would have won."""
    probs = {(): {3: 0.5, 0: 0.45, 1: 0.05}, (0,): {2: 0.9, 3: 0.1}, (1,): {3: 1.0},
             (0, 2): {3: 0.55, 2: 0.45}}
    stop = torch.tensor([False, False, False, True])
    seen = torch.zeros(1, 4, dtype=torch.bool)
    best = sample.beam_search(*controlled(probs, 4), seen, stop, 6, beams, early_stopping=early_stopping)
    assert cut(best[0].tolist(), stop) == answer


# ------------------------------------------------------------------------- dtype, CLI, presets

@torch.no_grad()
def test_bfloat16_decoding_agrees_with_float32_where_the_choice_is_clear(tok, dataset, init_ckpt):
    """Loaded in bf16 (BEiT-3 tower included), the tiny model gives greedy tokens equal to fp32's for
    as long as fp32's best two logits are further apart than bf16 can blur. bf16 keeps 8 significant
    bits: every weight, activation and cache entry it rounds moves by up to 2^-8 of its size, and
    each logit comes out of a chain of such roundings; a bf16 logit is allowed 4 x 2^-8 of the
    largest |logit| away from fp32's, so where the top-2 gap is above twice that, both argmaxes
    agree. Compared: each answer's tokens up to the first step with a narrower gap, at least 8 in
    all (a fresh model's gaps are narrow at places that depend on its initialisation and tokenizer)."""
    fp32 = Muffin.from_pretrained(init_ckpt).eval()
    bf16 = Muffin.from_pretrained(init_ckpt, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    _, images, prompts = tiny_setup(tok, dataset)
    none = torch.zeros(tok.vocab_size, dtype=torch.bool)
    want = sample.generate_ids(fp32, prompts, none, fp32.encode_images(images), max_new_tokens=12)
    got = sample.generate_ids(bf16, prompts, none, bf16.encode_images(images.bfloat16()), max_new_tokens=12)
    compared = 0
    for p, image, w, g in zip(prompts, images, want, got):
        ids = torch.tensor([p + w])
        z = fp32(ids, images=image[None])[0, len(p) - 1:-1]  # fp32's logits for each token of w
        zb = bf16(ids, images=image[None].bfloat16())[0, len(p) - 1:-1].float()
        bound = 4 * 2**-8 * z.abs().max()
        assert (zb - z).abs().max() <= bound
        top2 = z.topk(2).values
        clear = ((top2[:, 0] - top2[:, 1]) > 2 * bound).tolist() + [False]
        n = clear.index(False)
        assert g[:n] == w[:n]
        compared += n
    assert compared >= 8


def fake_stdin(monkeypatch, text):
    monkeypatch.setattr(sample.sys, "stdin", io.StringIO(text))


def test_interactive_answers_each_line_with_the_conversation_so_far(tok, dataset, init_ckpt, monkeypatch,
                                                                   capsys):
    """--interactive: a line of standard input is a question (blank lines skipped), answered in the
    training template with the earlier turns before it; the image is encoded once for all of them."""
    calls = []
    encode = Muffin.encode_images
    monkeypatch.setattr(Muffin, "encode_images", lambda self, x: calls.append(x) or encode(self, x))
    fake_stdin(monkeypatch, "What colour is the square?\n\nHow many?\n")
    sample.main([f"--ckpt={init_ckpt}", f"--image={dataset / 'images' / '0.png'}", "--interactive",
                 "--max_new_tokens=6", "--device=cpu"])
    answers = capsys.readouterr().out.split("\n")[:-1]
    assert len(answers) == 2 and len(calls) == 1
    model = Muffin.from_pretrained(init_ckpt).eval()
    image = image_tensor(Image.open(dataset / "images" / "0.png").convert("RGB"), 32)[None]
    history = []
    with torch.no_grad():
        for q, got in zip(["What colour is the square?", "How many?"], answers):
            ids = prompt_ids(tok, q, model.config.n_query, history)
            new = sample.generate_ids(model, [ids], data.stop_tokens(tok, "cpu"), model.encode_images(image), 6)[0]
            assert got == data.answer_text(tok, new)
            history.append((q, got))


def test_rlhfv_preset_decodes_as_the_papers_evaluation(tok, dataset, init_ckpt, monkeypatch, capsys):
    """--preset=rlhfv: 3 beams, repetition penalty 1.1, 1,024 new tokens (an option given on the
    command line wins over the preset's), the evaluation prompt (eval_prompt_ids) for the first
    question, the training template for the ones after (as Muffin's multi-turn chat), and
    "Assistant:" deleted from the answer. --dtype casts the weights and the image."""
    seen = []

    def fake_generate_ids(model, prompts, stop, feats, **options):
        seen.append((prompts, options, feats.dtype, {p.dtype for p in model.parameters()}))
        return [tok.encode(" Assistant: a red square\n###")]

    monkeypatch.setattr(sample, "generate_ids", fake_generate_ids)
    fake_stdin(monkeypatch, "Describe the image.\nAnd the colour?\n")
    sample.main([f"--ckpt={init_ckpt}", f"--image={dataset / 'images' / '0.png'}", "--interactive",
                 "--preset=rlhfv", "--repetition_penalty=1.2", "--dtype=bfloat16", "--device=cpu"])
    assert capsys.readouterr().out == "a red square\na red square\n"
    (first, options, dtype, weights), (second, _, _, _) = seen
    assert first == [data.eval_prompt_ids(tok, "Describe the image.", 9)]
    assert second == [prompt_ids(tok, "And the colour?", 9, [("Describe the image.", "a red square")])]
    assert (options["num_beams"], options["repetition_penalty"], options["max_new_tokens"]) == (3, 1.2, 1024)
    assert options["early_stopping"] is False and dtype == torch.bfloat16 and weights == {torch.bfloat16}


def test_rlhfv_preset_says_its_prompt_is_not_the_template_and_template_train_keeps_it(
        tok, dataset, init_ckpt, monkeypatch, capsys):
    """The preset's prompt is not the one train.py's models learnt: a line on stderr says so (the
    answer alone goes to stdout); --template=train keeps the preset's decoding with the template,
    and then nothing needs saying."""
    seen = []
    monkeypatch.setattr(sample, "generate_ids", lambda model, prompts, stop, feats, **options:
                        seen.append((prompts, options)) or [tok.encode(" a red square\n###")])
    argv = [f"--ckpt={init_ckpt}", f"--image={dataset / 'images' / '0.png'}", "--preset=rlhfv", "--device=cpu"]
    sample.main(argv)
    out = capsys.readouterr()
    assert out.out == "a red square\n" and "--template=train" in out.err and len(out.err.splitlines()) == 1
    sample.main(argv + ["--template=train"])
    out = capsys.readouterr()
    assert out.out == "a red square\n" and out.err == ""
    assert seen[1][0] == [prompt_ids(tok, "Describe the image in detail.", 9)]
    assert seen[1][1]["num_beams"] == 3


@pytest.mark.parametrize("arg, message", [
    ("--num_beams=0", "--num_beams=0: valid: 1 (greedy or sampled) or more (beams)"),
    ("--repetition_penalty=-1.1", "--repetition_penalty=-1.1: valid: > 0 (1: none)"),
    ("--dtype=fp8", "--dtype=fp8: valid: bfloat16 float16 float32"),
    ("--preset=llava", "--preset=llava: valid: rlhfv (or none)"),
    ("--template=chat", "--template=chat: valid: train eval"),
    ("--max_new_tokens=0", "--max_new_tokens=0: valid: 1 or more"),
    ("--top_p=0", "--top_p=0.0: valid: > 0 and <= 1"),
])
def test_bad_decoding_options_exit_naming_the_valid_values(arg, message, dataset):
    with pytest.raises(SystemExit) as e:  # checked before any checkpoint is read
        sample.main([arg, f"--ckpt={dataset}", f"--image={dataset / 'images' / '0.png'}"])
    assert str(e.value) == message


def test_beam_search_does_not_sample(dataset):
    with pytest.raises(SystemExit, match=r"--temperature=0.7: valid with --num_beams=3: 0 "):
        sample.main(["--preset=rlhfv", "--temperature=0.7", f"--ckpt={dataset}", f"--image={dataset / 'images' / '0.png'}"])


# ------------------------------------------------------------------------- answering a question file

def question_file(dataset, path):
    """Six questions on the dataset's images, of different lengths (so batches are left-padded): our
    layout (image paths relative to the file) and RLHF-V's (the image in base64, an image_id); and
    three bad rows: not JSON, no question, an image that is neither a file nor a picture."""
    qs = ["Describe this image in detail.", "What colour is the square?", "How many?",
          "Is there anything on the left side of the picture?", "What is it?", "Where?"]
    rows = [{"image": os.path.relpath(dataset / "images" / f"{i}.png", path.parent), "question": q, "image_id": i}
            for i, q in enumerate(qs[:4])]
    rows.insert(2, '{"image": "images/0.png", "quest')
    for i, q in ((4, qs[4]), (5, qs[5])):
        rows.append({"image": base64.b64encode((dataset / "images" / f"{i}.png").read_bytes()).decode(),
                     "question": q, "image_id": i})
    rows.insert(5, {"image": os.path.relpath(dataset / "images" / "1.png", path.parent), "image_id": 1})
    rows.append({"image": base64.b64encode(b"not a picture").decode(), "question": "Why?", "image_id": 7})
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_answers(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture
def varied_ckpt(tok, tmp_path):
    """A tiny Muffin whose weights are perturbed (seeded) so that each question and image gets an
    answer of its own: a batch that mixed up its rows would show."""
    torch.manual_seed(0)
    model = Muffin(sized("tiny", tok.vocab_size, tok.im_patch_id)).init_weights()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "varied")
    (tmp_path / "varied" / "tokenizer.model").write_bytes(tok.sp.serialized_model_proto())
    return tmp_path / "varied"


@pytest.mark.parametrize("beams", [1, 3])
def test_question_file_answers_batched_equal_one_at_a_time(beams, dataset, varied_ckpt, tmp_path, capsys):
    """Answered 4 at a time (left-padded prompts, fp32 on the CPU), greedy and with 3 beams, each
    question gets exactly the answer it gets alone; RLHF-V's base64 rows and ours are read alike; the
    three bad rows are skipped and named by line, not fatal."""
    qfile = question_file(dataset, tmp_path / "q.jsonl")
    common = [f"--ckpt={varied_ckpt}", f"--questions={qfile}", "--device=cpu", "--max_new_tokens=12",
              f"--num_beams={beams}", "--repetition_penalty=1.1"]
    bad = sample.main(common + [f"--out={tmp_path / 'batched.jsonl'}", "--batch_size=4"])
    sample.main(common + [f"--out={tmp_path / 'alone.jsonl'}", "--batch_size=1"])
    batched, alone = read_answers(tmp_path / "batched.jsonl"), read_answers(tmp_path / "alone.jsonl")
    assert batched == alone and len(batched) == 6
    assert len({r["answer"] for r in batched}) >= 5  # answers of their own: a mix-up would show
    assert [r["image_id"] for r in batched] == [0, 1, 2, 3, 4, 5]
    assert [r["question_id"] for r in batched] == [0, 1, 3, 4, 6, 7]  # the row's index where none is given
    assert [n for n, _ in bad] == [3, 6, 9]
    out = capsys.readouterr().out
    assert "3 bad rows skipped: line 3: " in out and "line 6: expected a JSON object" in out
    assert "line 9: " in out


def test_question_file_resumes_where_it_stopped(dataset, varied_ckpt, tmp_path):
    """A run cut short (two answers written, the third half-written) is finished by running the same
    command again: the half line is dropped, only the missing answers are added, and the file ends
    as an uninterrupted run's does."""
    qfile = question_file(dataset, tmp_path / "q.jsonl")
    args = lambda out: [f"--ckpt={varied_ckpt}", f"--questions={qfile}", "--device=cpu", "--max_new_tokens=8",
                        f"--out={out}", "--batch_size=3"]
    sample.main(args(tmp_path / "full.jsonl"))
    lines = (tmp_path / "full.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "cut.jsonl").write_text("".join(lines[:2]) + lines[2][:20])
    sample.main(args(tmp_path / "cut.jsonl"))
    assert read_answers(tmp_path / "cut.jsonl") == read_answers(tmp_path / "full.jsonl")
    sample.main(args(tmp_path / "cut.jsonl"))  # nothing left to answer: nothing added
    assert read_answers(tmp_path / "cut.jsonl") == read_answers(tmp_path / "full.jsonl")


def test_question_file_errors_are_one_line(dataset, init_ckpt, tmp_path):
    """A missing question file, or no --out, is a one-line usage error."""
    with pytest.raises(SystemExit, match="no such file"):
        sample.main([f"--ckpt={init_ckpt}", f"--questions={tmp_path / 'none.jsonl'}", f"--out={tmp_path / 'a'}"])
    with pytest.raises(SystemExit, match="--out"):
        sample.main([f"--ckpt={init_ckpt}", f"--questions={question_file(dataset, tmp_path / 'q.jsonl')}"])
