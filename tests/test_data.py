"""Tokenizer, template, images, the official data formats and the DDPO batch layout."""
import base64
import io
import json

import pytest
import torch
from PIL import Image

import data
from cli import InputError
from data import STOP, Batcher, Records, Tokenizer, answer_ids, image_tensor, load_image, prompt_ids


def test_special_tokens_follow_the_sentencepiece_vocabulary(tok):
    """[PAD], <im_patch>, <im_start>, <im_end> get ids n..n+3 (32000-32003 with LLaMA's model),
    are matched literally in text with the white space around them dropped, and never decode."""
    n = tok.sp.get_piece_size()
    assert (tok.pad_id, tok.im_patch_id, tok.im_start_id, tok.im_end_id) == (n, n + 1, n + 2, n + 3)
    ids = tok.encode("red <im_start><im_patch><im_end>\nsquare", bos=True)
    assert ids == [tok.bos_id] + tok.encode("red") + [n + 2, n + 1, n + 3] + tok.encode("square")
    assert tok.decode(ids) == "red square"


TRICKY = ["", " ", "   ", "\t", "\n", "  two leading spaces", "trailing space ", "inner   run  of spaces",
          "tab\tand\nnewline\n\n", " \t mixed \n ", "unicode: caf\u00e9 \u00fcber \u4e2d\u6587 \U0001f600",
          "### Assistant:", "a red\u2009square"]


@pytest.mark.parametrize("text", TRICKY)
def test_plain_text_encodes_exactly_as_sentencepiece(tok, text):
    """Without special tokens our encode is SentencePiece's own, outer and inner white space
    included (its pieces for leading, trailing and lone spaces are kept)."""
    assert tok.encode(text) == tok.sp.encode(text)
    assert tok.encode(text, bos=True) == [tok.bos_id] + tok.sp.encode(text)


@pytest.mark.parametrize("left, right", [("red", "square"), ("red ", " square"), ("red  \n", "\t square  "),
                                         ("  red", "square  "), ("", ""), (" ", " ")])
def test_white_space_is_dropped_only_next_to_special_tokens(tok, left, right):
    """Around a special token the slow LLaMA tokenizer drops the left neighbour's trailing and the
    right neighbour's leading white space, nothing else: the outer ends stay as SentencePiece
    encodes them."""
    n = tok.sp.get_piece_size()
    want = tok.sp.encode(left.rstrip()) + [n + 2, n + 1] + tok.sp.encode(right.lstrip())
    assert tok.encode(f"{left}<im_start><im_patch>{right}") == want
    assert tok.encode(f"{left}<im_start> \n <im_patch>{right}") == want  # only spaces between: none left


def test_a_template_row_is_three_sentencepiece_runs_and_the_image_slots(tok):
    """The training template splits at the image slots into exactly: BOS, SentencePiece's ids of
    "<system>\\n\\n### Human:" (the space before the slots dropped), the slots, SentencePiece's ids
    of "<question>\\n### Assistant:" (the newline after them dropped). The answer is SentencePiece's
    ids of "<answer>\\n###". These are the rows the miniature trains on."""
    q, a = "How many squares are there?", "There are two squares."
    slots = [tok.im_start_id] + [tok.im_patch_id] * 3 + [tok.im_end_id]
    assert prompt_ids(tok, f" {q} ", 3) == ([tok.bos_id] + tok.sp.encode(f"{data.SYSTEM}\n\n### Human:") + slots
                                            + tok.sp.encode(f"{q}\n### Assistant:"))
    assert answer_ids(tok, f" {a}\n") == tok.sp.encode(f"{a}\n{STOP}")


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)


def added_token(text):
    """A token as transformers saves an AddedToken in tokenizer_config.json."""
    return {"__type": "AddedToken", "content": text, "lstrip": False, "normalized": True,
            "rstrip": False, "single_word": False}


def test_special_tokens_come_from_the_checkpoints_files(tok, tmp_path):
    """A checkpoint's tokenizer_config.json and special_tokens_map.json name its BOS, EOS and pad
    tokens, as strings or AddedToken dicts; special_tokens_map.json wins, as in transformers.
    Muffin's v0 script saved BOS = EOS = "</s>": its prompts start with id 2, not <s> (1). Without
    the files: SentencePiece's ids and [PAD], exactly as Tokenizer(model_file)."""
    n = tok.sp.get_piece_size()
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(tok.sp.serialized_model_proto())
    plain = Tokenizer.from_pretrained(d)
    assert (plain.bos_id, plain.eos_id, plain.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, n)
    write_json(d / "tokenizer_config.json", {"bos_token": added_token("</s>"), "eos_token": added_token("</s>"),
                                            "pad_token": added_token("<unk>"), "unk_token": added_token("</s>"),
                                            "model_max_length": 2048, "tokenizer_class": "LlamaTokenizer"})
    t = Tokenizer.from_pretrained(d / "tokenizer.model")  # the file, or its directory
    assert (t.bos_id, t.eos_id, t.pad_id) == (2, 2, 0)
    assert t.decode([0, 5, n + 1, 6]) == tok.decode([5, 6])  # pad and added tokens never decode
    write_json(d / "tokenizer_config.json", {"bos_token": added_token("<s>"), "pad_token": None})
    write_json(d / "special_tokens_map.json", {"bos_token": "</s>", "eos_token": "</s>",
                                               "unk_token": "</s>", "pad_token": "[PAD]"})
    t = Tokenizer.from_pretrained(d)
    assert (t.bos_id, t.eos_id, t.pad_id) == (2, 2, n)
    p, q = prompt_ids(t, "Q?", 8), prompt_ids(plain, "Q?", 8)
    assert p[0] == 2 and q[0] == 1 and p[1:] == q[1:]
    write_json(d / "special_tokens_map.json", {"bos_token": "<bos>"})
    with pytest.raises(ValueError, match="bos_token '<bos>' is not in its vocabulary"):
        Tokenizer.from_pretrained(d)


def test_template_places_the_image_after_human(tok):
    """RLHF-V's training template: system prompt, "### Human: ", the image slots, the question,
    "### Assistant:"; the answer is encoded on its own and ends with the stop string."""
    p = prompt_ids(tok, "What colour is the square?", n_query=8)
    start = p.index(tok.im_start_id)
    assert p[start + 1:start + 9] == [tok.im_patch_id] * 8 and p[start + 9] == tok.im_end_id
    assert tok.decode(p[:start]).endswith("### Human:") and tok.decode(p[:start]).startswith(data.SYSTEM)
    assert tok.decode(p[start:]) == "What colour is the square?\n### Assistant:"
    a = answer_ids(tok, " The square is red. ")
    assert tok.decode(a) == "The square is red.\n" + STOP and tok.sp.id_to_piece(a[-1]) == STOP


def test_eval_prompt_puts_the_image_after_the_question(tok):
    """RLHF-V's evaluation prompt: system prompt, "\n###Human: " (no space after ###), the
    question, the image slots, "###" and nothing after: the model writes " Assistant:" itself."""
    p = data.eval_prompt_ids(tok, " What colour is the square? ", n_query=8)
    start = p.index(tok.im_start_id)
    assert p[0] == tok.bos_id and p[start + 1:start + 9] == [tok.im_patch_id] * 8
    assert p[start + 9] == tok.im_end_id
    assert tok.decode(p[:start]) == data.SYSTEM + "\n###Human: What colour is the square?"
    assert p[start + 10:] == tok.encode(STOP) and tok.decode(p[start + 10:]) == STOP


def test_multi_turn_prompt_keeps_the_image_in_the_first_turn(tok):
    """Earlier turns go into the training template as Muffin's multi-turn chat writes them: each
    answer as answer_ids encodes it (ending "\n###"), then "Human: <question>\n### Assistant:";
    the image slots once, in the first human turn."""
    first = prompt_ids(tok, "How many?", 8)
    p = prompt_ids(tok, "And the square?", 8, history=[("How many?", "Two."), ("Colours?", "Red.")])
    tail = (answer_ids(tok, "Two.") + tok.encode("Human: Colours?\n### Assistant:")
            + answer_ids(tok, "Red.") + tok.encode("Human: And the square?\n### Assistant:"))
    assert p == first + tail and p.count(tok.im_patch_id) == 8
    assert tok.decode(p).endswith("How many?\n### Assistant: Two.\n### Human: Colours?\n### Assistant: Red.\n"
                                  "### Human: And the square?\n### Assistant:")


def test_pair_batch_layout(tok, dataset):
    """2B rows (chosen, then rejected) sharing B images; padded to a multiple of 8; labels only on
    the answers; weights aligned with the shifted labels, gamma exactly on the swapped colour."""
    rows = Records(dataset / "pairs.jsonl")
    items = [rows[i] for i in range(3)]
    batch = Batcher(tok, n_query=8, image_size=32, max_len=512, gamma=5.0).pairs(items)
    ids, labels, w = batch["input_ids"], batch["labels"], batch["weights"]
    assert ids.shape[0] == 6 and ids.shape[1] % 8 == 0 and batch["images"].shape == (3, 3, 32, 32)
    assert batch["image_index"].tolist() == [0, 1, 2, 0, 1, 2]
    assert torch.equal(w > 0, labels[:, 1:] != -100)
    for r, item in enumerate(items):
        chosen = [int(t) for t in labels[r] if t != -100]
        assert tok.decode(chosen) == item["chosen"] + "\n" + STOP
        heavy = [int(t) for t, x in zip(ids[r, 1:], w[r]) if x == 5.0]
        heavy_rejected = [int(t) for t, x in zip(ids[3 + r, 1:], w[3 + r]) if x == 5.0]
        [(was, swapped)] = [(a, b) for a, b in zip(item["chosen"].split(), item["rejected"].split()) if a != b]
        assert (tok.decode(heavy), tok.decode(heavy_rejected)) == (was, swapped)


def test_text_only_rows_batch_with_image_rows(tok, tmp_path):
    """A JSONL row without `image`, or with null, is a text-only row: image None, a prompt with no
    image block ("### Human: " then the question, as the original templates a conversation without
    "<image>"), image_index -1 in a batch with image rows; a batch with no image has images None."""
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "a.png")
    rows = [{"image": "a.png", "question": "Q?", "chosen": "C.", "rejected": "R."},
            {"question": "Q?", "chosen": "C.", "rejected": "R."},
            {"image": None, "question": "Q2?", "chosen": "C.", "rejected": "R."}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = [Records(tmp_path / "d.jsonl")[i] for i in range(3)]
    assert [it["image"] is None for it in items] == [False, True, True]
    assert len({it["id"] for it in items}) == 3  # the image is part of the id
    text = prompt_ids(tok, "Q?", 0)
    assert tok.decode(text) == f"{data.SYSTEM}\n\n### Human: Q?\n### Assistant:"
    assert not {tok.im_patch_id, tok.im_start_id, tok.im_end_id} & set(text)
    batch = Batcher(tok, n_query=8, image_size=16, max_len=512, gamma=1.0).pairs([items[1], items[0], items[2]])
    assert batch["image_index"].tolist() == [-1, 0, -1] * 2 and batch["images"].shape == (1, 3, 16, 16)
    assert batch["input_ids"][0, :len(text)].tolist() == text
    assert (batch["input_ids"] == tok.im_patch_id).sum(1).tolist() == [0, 8, 0] * 2
    batch = Batcher(tok, n_query=8, image_size=16, max_len=512, gamma=1.0).sft([{**items[2], "answer": "A."}])
    assert batch["images"] is None and batch["image_index"].tolist() == [-1]


def test_truncation_and_skips(tok, dataset, tmp_path):
    """An answer too long is cut from its end, the image slots intact; a prompt too long on its own,
    a pair whose chosen equals its rejected, an empty field and an unreadable row are skipped and
    counted by reason."""
    rows = Records(dataset / "pairs.jsonl")
    item = rows[0]
    limit = len(prompt_ids(tok, item["question"], 8)) + 5
    batch = Batcher(tok, 8, 32, max_len=limit, gamma=1.0).pairs([item])
    assert (batch["labels"][0] != -100).sum() == 5
    assert (batch["input_ids"][0] == tok.im_patch_id).sum() == 8
    bad = [{**item, "rejected": item["chosen"]}, {**item, "question": " "}, {"error": "x.jsonl:3: gone"}]
    batch = Batcher(tok, 8, 32, max_len=limit - 5, gamma=1.0).pairs([item] + bad)
    assert "input_ids" not in batch
    assert batch["skipped"] == {"prompt longer than max_len": 1, "chosen == rejected": 1,
                                "empty question": 1, "unreadable row": 1}


def tsv_row(image_bytes, fields, name="RLHF-V-Hall_v0"):
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    meta = b64(json.dumps({"model": "muffin", "type": "detailed description"}).encode())
    return "\t".join([name, b64(image_bytes), b64(json.dumps(fields).encode()), "vqa", meta, "0", "x.jpg"])


def png_bytes(colour=(255, 0, 0), mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_tsv_reader_official_layout(tmp_path):
    """RLHF-V-Hall_v0: 7 tab-separated columns, base64 image and base64 JSON [question, chosen,
    rejected, logps], the question prefixed by "<image>\\n"; random access through .lineidx."""
    lines = [tsv_row(png_bytes(), ["<image>\nWhat is it?", "A red square.", "A blue square.", [0.1]]),
             tsv_row(png_bytes((0, 255, 0)), ["Describe.", "Green.", "Blue."]),
             "only\tthree\tcolumns"]
    text = "".join(line + "\n" for line in lines)
    (tmp_path / "hall-3.tsv").write_text(text)
    offsets, pos = [], 0
    for line in lines:
        offsets.append(pos)
        pos += len(line) + 1
    (tmp_path / "hall-3.lineidx").write_text("".join(f"{o}\n" for o in offsets))
    rows = Records(tmp_path / "hall-3.tsv")
    assert len(rows) == 3
    r = rows[0]
    assert (r["question"], r["chosen"], r["rejected"]) == ("What is it?", "A red square.", "A blue square.")
    assert r["image"].getpixel((0, 0)) == (255, 0, 0)
    assert rows[1]["image"].getpixel((0, 0)) == (0, 255, 0) and rows[1]["id"] != r["id"]
    assert "hall-3.tsv:3" in rows[2]["error"] and "7 tab-separated columns" in rows[2]["error"]


def test_jsonl_reader(tmp_path):
    """Our format: one {"image", "question", "chosen", "rejected"} per line, image paths relative to
    the file; ids hash the content; a bad line or a missing image names file and line."""
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "a.png")
    good = {"image": "a.png", "question": "Q?", "chosen": "C.", "rejected": "R."}
    (tmp_path / "d.jsonl").write_text(json.dumps(good) + "\n\n{not json\n"
                                      + json.dumps({**good, "image": "missing.png"}) + "\n")
    rows = Records(tmp_path / "d.jsonl")
    assert len(rows) == 3 and rows[0]["image"].getpixel((0, 0)) == (0, 0, 255)
    assert rows[0]["id"] == Records(tmp_path / "d.jsonl")[0]["id"]
    assert rows[1]["error"].startswith(f"{tmp_path / 'd.jsonl'}:2: JSONDecodeError")
    assert "missing.png" in rows[2]["error"]


def test_parquet_without_pyarrow_says_how_to_convert(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "pyarrow", None)
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)
    with pytest.raises(InputError, match="pip install pyarrow"):
        Records(tmp_path / "RLHF-V-Dataset.parquet")


def test_images_rgb_and_normalised():
    """Transparent pixels become white (not black), 16-bit grey is scaled (not clipped), and the
    tensor is resized to a square and normalised to [-1, 1] with mean = std = 0.5."""
    rgba = load_image(png_bytes((255, 0, 0, 0), "RGBA"))
    assert rgba.mode == "RGB" and rgba.getpixel((0, 0)) == (255, 255, 255)
    buf = io.BytesIO()
    Image.new("I;16", (8, 8), 32768).save(buf, format="PNG")
    assert load_image(buf.getvalue()).getpixel((0, 0)) == (128, 128, 128)
    x = image_tensor(Image.new("RGB", (20, 10), (255, 0, 0)), 16)
    assert x.shape == (3, 16, 16) and x[0].min() == 1.0 and x[1].max() == -1.0
    with pytest.raises(ValueError, match="image <3 bytes>"):
        load_image(b"abc")


def test_parquet_reader_official_layout(tmp_path):
    """RLHF-V-Dataset: columns ds_name, image {bytes, path}, text (a JSON string with question,
    chosen, rejected), origin_dataset, origin_split, idx, image_path; read one row group at a time.
    Runs where pyarrow is installed (it is not a dependency)."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [{"ds_name": "RLHF-V", "image": {"bytes": png_bytes(c), "path": f"{i}.png"},
             "text": json.dumps({"question": f"Q{i}?", "chosen": "C.", "rejected": f"R{i}."}),
             "origin_dataset": "vqa", "origin_split": "{}", "idx": i, "image_path": f"{i}.png"}
            for i, c in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)])]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "RLHF-V-Dataset.parquet", row_group_size=2)
    data = Records(tmp_path / "RLHF-V-Dataset.parquet")
    assert len(data) == 3
    r = data[2]
    assert (r["question"], r["chosen"], r["rejected"]) == ("Q2?", "C.", "R2.")
    assert r["image"].getpixel((0, 0)) == (0, 0, 255) and data[0]["image"].getpixel((0, 0)) == (255, 0, 0)
