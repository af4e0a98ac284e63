"""Text, images and preference data: everything between files on disk and a training batch.

In reading order, the path of a batch first, then what feeds it:
- The training template of RLHF-V (conv_v1_2): the image slots come right after "### Human: ";
  its evaluation prompt, which puts them after the question; the answer ids, stop tokens and text.
- Batcher: the collates. SFT rows, and DDPO batches of 2B rows (chosen rows, then rejected)
  sharing B images, with the token weights of the corrected segments; which rows are skipped.
- Tokenizer: SentencePiece plus the four tokens Muffin appends ([PAD], <im_patch>, <im_start>,
  <im_end>; ids 32000-32003 with LLaMA's tokenizer), with the BOS/EOS/pad a checkpoint's own files
  name (Tokenizer.from_pretrained), and `train_tokenizer` for our own world.
- Images: RGB, resized bicubic to a square, normalised with mean = std = 0.5 (Muffin's eval
  transform, used for both policy and reference: no random crops, which would make the reference
  log-probs disagree with training and flips, which would falsify left/right answers).
- Records: datasets with random access: our JSONL, RLHF-V-Hall TSV (+ .lineidx), RLHF-V-Dataset parquet.

Tests: python -m pytest tests/test_data.py
"""
import base64
import hashlib
import io
import json
import os
import re
import warnings

import sentencepiece as spm
import torch
from PIL import Image

import ddpo
from cli import InputError

SPECIAL = ("[PAD]", "<im_patch>", "<im_start>", "<im_end>")
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")
STOP = "###"  # answers end with "\n###"; generation stops when it appears
SFT_KEYS, PAIR_KEYS = ("question", "answer"), ("question", "chosen", "rejected")  # what each stage reads
TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json")  # name BOS/EOS/pad; the later wins

# ----------------------------------------------------------------------------------------- template

def prompt_ids(tok, question, n_query, history=()):
    """BOS + the template up to "### Assistant:", with n_query image slots; n_query 0: a text-only
    row, which has no image block at all (the original only expands an "<image>" placeholder, and
    a text-only conversation has none). The answer is encoded on its own (see answer_ids), so the
    boundary between prompt and labels is exact.
    history: the earlier (question, answer) turns of a conversation about the same image, as
    Muffin's multi-turn template writes them: "### Human: q\n### Assistant: a\n" each, the image
    slots in the first human turn only; each answer is encoded as answer_ids encodes it in training."""
    image = "<im_start>" + "<im_patch>" * n_query + "<im_end>\n" if n_query else ""
    questions = [q for q, _ in history] + [question]
    ids = tok.encode(f"{SYSTEM}\n\n### Human: {image}{questions[0].strip()}\n### Assistant:", bos=True)
    for (_, answer), q in zip(history, questions[1:]):
        ids += answer_ids(tok, answer) + tok.encode(f"Human: {q.strip()}\n### Assistant:")
    return ids


def eval_prompt_ids(tok, question, n_query):
    """The prompt of RLHF-V's evaluation, which is not the training template: Muffin's default
    conversation with sep "\\n###", so the image slots come after the question, "###Human" has no
    space, and no "Assistant:" follows: the model writes it (answer_text drops it, as the
    evaluation scripts did)."""
    image = "<im_start>" + "<im_patch>" * n_query + "<im_end>"
    return tok.encode(f"{SYSTEM}\n###Human: {question.strip()}\n{image}\n###", bos=True)


def answer_ids(tok, answer):
    """The labelled part: the answer and its terminator "\\n###" (RLHF-V appends no EOS)."""
    return tok.encode(answer.strip() + "\n" + STOP)


def stop_tokens(tok, device):
    """[V] bool: the tokens that end an answer: EOS and every piece that holds "###"."""
    stop = torch.zeros(tok.vocab_size, dtype=torch.bool, device=device)
    stop[[i for i in range(tok.sp.get_piece_size()) if STOP in tok.sp.id_to_piece(i)] + [tok.eos_id]] = True
    return stop


def answer_text(tok, ids, eval_prompt=False):
    """Generated ids -> the text before the first "###", stripped. After eval_prompt_ids the model
    writes "Assistant:" itself; RLHF-V's evaluation scripts deleted it, and so does this."""
    text = tok.decode(ids).split(STOP)[0]
    return (text.replace("Assistant:", "") if eval_prompt else text).strip()

# --------------------------------------------------------------------------------------- batches

class Batcher:
    """Collate functions for a DataLoader. Rows are BOS + prompt (with n_query image slots, none in
    a text-only row) + answer + "\\n###"; labels only on the answer and its terminator. Text-only
    rows batch with image rows: image_index[r] is -1 for a row without an image, and a batch with
    no image at all has images None. An answer too long for max_len is cut from its end (the image
    slots are never touched); a prompt too long on its own, an unreadable row, an empty field, or a
    pair whose chosen equals its rejected (zero gradient) is skipped and counted in
    batch["skipped"]. Padding to a multiple of 8 keeps tensor cores busy."""

    def __init__(self, tok, n_query, image_size, max_len, gamma, min_match=3):
        """gamma: the weight of corrected tokens (paper Eq. 5; TrainConfig.gamma), applied here, where
        the pairs are diffed, and carried to the loss in batch["weights"]."""
        self.tok, self.n_query, self.image_size, self.max_len = tok, n_query, image_size, max_len
        self.gamma, self.min_match = gamma, min_match

    @staticmethod
    def skip_reason(item, keys):
        """Why a row (of Records) cannot be trained on, or None. keys: the text fields the stage
        reads (SFT_KEYS or PAIR_KEYS)."""
        if "error" in item:
            return "unreadable row"
        for k in keys:
            if not str(item.get(k) or "").strip():
                return f"empty {k}"
        if "chosen" in keys and item["chosen"].strip() == item["rejected"].strip():
            return "chosen == rejected"
        return None

    def prompt(self, item, keys):
        """(prompt ids, None) for a usable item; (None, why) for one to skip."""
        reason = self.skip_reason(item, keys)
        if reason:
            return None, reason
        prompt = prompt_ids(self.tok, item["question"], 0 if item.get("image") is None else self.n_query)
        if len(prompt) >= self.max_len:
            return None, "prompt longer than max_len"
        return prompt, None

    def _pack(self, rows, images, image_index, skipped, sample_ids):
        """rows: (prompt, answer, answer weights) -> padded tensors; weights [N, T-1] align with
        ddpo.token_logps' logp, i.e. with the labels shifted by one."""
        T = -(-max(len(p) + len(a) for p, a, _ in rows) // 8) * 8
        input_ids = torch.full((len(rows), T), self.tok.pad_id)
        labels = torch.full((len(rows), T), ddpo.IGNORE_INDEX)
        weights = torch.zeros(len(rows), T - 1)
        for j, (p, a, w) in enumerate(rows):
            n = len(p) + len(a)
            input_ids[j, :n] = torch.tensor(p + a)
            labels[j, len(p):n] = torch.tensor(a)
            # token_logps scores token t at position t - 1 (the logits before it), so the weight of
            # answer token k (at len(p) + k) goes to len(p) - 1 + k, beside its log-prob
            weights[j, len(p) - 1:n - 1] = w
        return {"input_ids": input_ids, "labels": labels, "weights": weights,
                "images": torch.stack(images) if images else None,
                "image_index": torch.tensor(image_index), "skipped": skipped, "sample_ids": sample_ids}

    def _image(self, item, images):
        """Appends the item's image tensor to images -> its index there; -1 for a text-only item."""
        if item.get("image") is None:
            return -1
        images.append(image_tensor(item["image"], self.image_size))
        return len(images) - 1

    def sft(self, items):
        rows, images, index, skipped, sample_ids = [], [], [], {}, []
        for it in items:
            prompt, reason = self.prompt(it, SFT_KEYS)
            if reason:
                skipped[reason] = skipped.get(reason, 0) + 1
                continue
            a = answer_ids(self.tok, it["answer"])[:self.max_len - len(prompt)]
            rows.append((prompt, a, torch.ones(len(a))))
            index.append(self._image(it, images))
            sample_ids.append(it["id"])
        return self._pack(rows, images, index, skipped, sample_ids) if rows else {"skipped": skipped}

    def pairs(self, items):
        chosen, rejected, images, index, skipped, sample_ids = [], [], [], [], {}, []
        for it in items:
            prompt, reason = self.prompt(it, PAIR_KEYS)
            if reason:
                skipped[reason] = skipped.get(reason, 0) + 1
                continue
            room = self.max_len - len(prompt)
            c, r = answer_ids(self.tok, it["chosen"]), answer_ids(self.tok, it["rejected"])
            # diffed with the prompt in front, as RLHF-V diffs whole conversations: an edit in the
            # first tokens of an answer then sits after a long match, not after a dropped short one
            wc, wr = (w[len(prompt):] for w in ddpo.token_weights(prompt + c, prompt + r, self.gamma,
                                                                   self.min_match))
            chosen.append((prompt, c[:room], wc[:room]))
            rejected.append((prompt, r[:room], wr[:room]))
            index.append(self._image(it, images))
            sample_ids.append(it["id"])
        if not chosen:
            return {"skipped": skipped}
        return self._pack(chosen + rejected, images, index * 2, skipped, sample_ids)


# ---------------------------------------------------------------------------------------- tokenizer

class Tokenizer:
    def __init__(self, model_file, special_tokens=None):
        """special_tokens: {"bos_token": "</s>", ...}, the BOS, EOS and pad tokens as a saved
        transformers tokenizer names them (see from_pretrained); a role not named keeps its default:
        SentencePiece's BOS and EOS, and [PAD]."""
        if not os.path.isfile(model_file):
            raise InputError(f"{model_file}: no such tokenizer file (a SentencePiece tokenizer.model)")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError) as e:
            raise InputError(f"{model_file}: not a SentencePiece model ({str(e).strip()})") from None
        n = self.sp.get_piece_size()
        self.pad_id, self.im_patch_id, self.im_start_id, self.im_end_id = range(n, n + 4)
        self.special = dict(zip(SPECIAL, range(n, n + 4)))
        self.vocab_size = n + 4
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        for role in ("bos", "eos", "pad"):
            token = (special_tokens or {}).get(role + "_token")
            if token is not None:
                i = self.special.get(token, self.sp.piece_to_id(token))
                if i == self.sp.unk_id() and token != self.sp.id_to_piece(i):
                    raise InputError(f"{model_file}: {role}_token {token!r} is not in its vocabulary")
                setattr(self, role + "_id", i)
        self._split = re.compile("(" + "|".join(re.escape(s) for s in SPECIAL) + ")")

    @classmethod
    def from_pretrained(cls, path):
        """A tokenizer.model (or a directory holding one) with the BOS, EOS and pad tokens that the
        tokenizer_config.json and special_tokens_map.json beside it name, the latter winning, as
        transformers' slow LlamaTokenizer reads them. This matters: Muffin's training script sets
        BOS = EOS = "</s>" when its base model is a LLaMA, so such a checkpoint starts every prompt
        with id 2, not SentencePiece's <s> (1). The unk token is not read: the slow tokenizer maps
        unknown pieces through SentencePiece, to its own unk id, whatever the files say."""
        model_file = os.path.join(path, "tokenizer.model") if os.path.isdir(path) else str(path)
        named = {}
        for name in TOKEN_FILES:
            file = os.path.join(os.path.dirname(model_file), name)
            if os.path.exists(file):
                try:
                    with open(file) as f:
                        saved = json.load(f)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise InputError(f"{file}: not JSON ({e})") from None
                for role in ("bos_token", "eos_token", "pad_token"):
                    token = saved.get(role)  # a string, or an AddedToken saved as {"content": ...}
                    if token is not None:
                        named[role] = token["content"] if isinstance(token, dict) else token
        return cls(model_file, named)

    def encode(self, text, bos=False):
        """Text -> ids. Plain text encodes exactly as SentencePiece encodes it; the special tokens
        are matched literally, and only the white space next to them is dropped (a left neighbour's
        trailing spaces, a right neighbour's leading ones), as transformers' slow LLaMA tokenizer of
        the Muffin era did."""
        ids = [self.bos_id] if bos else []
        pieces = self._split.split(text)  # text, special, text, ..., text: specials at odd indices
        for i, piece in enumerate(pieces):
            if i % 2:
                ids.append(self.special[piece])
                continue
            piece = piece.lstrip() if i > 0 else piece
            piece = piece.rstrip() if i < len(pieces) - 1 else piece
            if piece:
                ids.extend(self.sp.encode(piece))
        return ids

    def decode(self, ids):
        n = self.sp.get_piece_size()  # the four added tokens never decode, nor does padding
        return self.sp.decode([i for i in ids if 0 <= i < n and i != self.pad_id])


def check_tokenizer(tok, config, tok_file):
    """Every id the tokenizer makes must fit the model (a MuffinConfig): a mismatch is refused here,
    not left to an index error (or a CUDA device-side assert) in the first forward."""
    if (config.llm.vocab_size, config.im_patch_id) != (tok.vocab_size, tok.im_patch_id):
        raise InputError(f"{tok_file} does not match the model: {tok.vocab_size} tokens and <im_patch> "
                         f"{tok.im_patch_id}, the model has {config.llm.vocab_size} and {config.im_patch_id} "
                         f"(<im_patch> from {getattr(config, 'im_patch_source', 'its config')})")


def train_tokenizer(lines, model_file, vocab_size, symbols=()):
    """Train a SentencePiece BPE model on an iterable of strings, written to model_file.
    LLaMA's conventions: unk 0, bos 1, eos 2, no pad, byte fallback, no normalisation.
    symbols: extra strings that are always one piece (spaces written as \u2581)."""
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(model_file).removesuffix(".model"),
        vocab_size=vocab_size, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2,
        user_defined_symbols=[STOP, *symbols])  # STOP one piece as in LLaMA: stopping is one id
    return Tokenizer(model_file)

# ---------------------------------------------------------------------------------------- images

def load_image(src):
    """A path or raw bytes -> an RGB PIL image. Raises ValueError naming the source when the file is
    missing, unreadable or truncated, or has more pixels than Image.MAX_IMAGE_PIXELS (a decompression
    bomb, refused from its header before anything is decoded; None lifts the limit)."""
    is_path = isinstance(src, (str, os.PathLike))
    name = os.fspath(src) if is_path else f"<{len(src)} bytes>"
    try:
        with warnings.catch_warnings():  # PIL only warns between 1x and 2x the limit: refuse (here only)
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(src if is_path else io.BytesIO(src))
            img.load()
        if img.mode.startswith("I"):  # 16-bit grey: scale to 8 bits (a plain convert would clip)
            img = img.convert("I").point(lambda v: v * (1 / 256)).convert("L")
        if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:  # also P, L, RGB with tRNS
            rgba = img.convert("RGBA")
            img = Image.new("RGB", rgba.size, (255, 255, 255))
            img.paste(rgba, mask=rgba.getchannel("A"))  # transparent areas become white, not black
        return img.convert("RGB")
    except Exception as e:  # decoders raise many kinds of error on malformed bytes
        raise InputError(f"image {name}: {type(e).__name__}: {e}") from None


def image_tensor(img, size):
    """PIL RGB -> [3, size, size] float: bicubic resize (no crop, no flip), (x - 0.5) / 0.5."""
    img = img.resize((size, size), Image.BICUBIC)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return x.permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)

# -------------------------------------------------------------------------------------- datasets

class Records:
    """Rows of a JSONL, TSV or parquet file by index, read from disk on demand (byte offsets for
    JSONL and TSV; a TSV's .lineidx is used when present). Row i -> dict with `id` (a hash of the
    content, which keys the reference cache), `image` (PIL RGB; None for a text-only row, a JSONL
    row without `image` or with null, as LLaVA-style SFT data mixes in), `question` and `chosen` +
    `rejected` (preference data) or `answer` (SFT data). A row that cannot be read comes back as
    {"error": "<file>:<row>: why"} so that a run skips and counts it instead of dying."""

    def __init__(self, path):
        self.path, self.kind = str(path), str(path).rsplit(".", 1)[-1]
        if os.path.isdir(path):
            raise InputError(f"{path}: a directory; expected a data file (.jsonl, .tsv or .parquet)")
        if self.kind == "parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise InputError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or "
                                 "convert it once to our JSONL: one {\"image\", \"question\", "
                                 "\"chosen\", \"rejected\"} object per line") from None
            try:
                self.pq = pq.ParquetFile(self.path)
            except Exception as e:  # pyarrow's ArrowInvalid, OSError
                raise InputError(f"{path}: not a readable parquet file ({e})") from None
            sizes = [self.pq.metadata.row_group(g).num_rows for g in range(self.pq.num_row_groups)]
            self.starts = [sum(sizes[:g]) for g in range(len(sizes) + 1)]
            self.group = (None, None)
        elif self.kind in ("jsonl", "tsv"):
            idx = self.path[:-4] + ".lineidx"
            if self.kind == "tsv" and os.path.exists(idx):
                with open(idx) as f:
                    try:
                        self.offsets = [int(line) for line in f if line.strip()]
                    except ValueError:
                        raise InputError(f"{idx}: expected one byte offset per line") from None
            else:
                self.offsets = line_offsets(self.path)
        else:
            raise InputError(f"{path}: unknown data format (expected .jsonl, .tsv or .parquet)")

    def __len__(self):
        return self.starts[-1] if self.kind == "parquet" else len(self.offsets)

    def __getitem__(self, i):
        where = f"{self.path}:{i + 1}"
        try:
            row = getattr(self, "_" + self.kind)(i)
            for k in ("question", "chosen", "rejected", "answer"):
                if not isinstance(row.get(k, ""), str):
                    raise TypeError(f"{k} is {type(row[k]).__name__}, not text")
            row["image"] = None if row["image"] is None else load_image(row["image"])
        except (ValueError, KeyError, IndexError, TypeError, AttributeError, json.JSONDecodeError) as e:
            return {"error": f"{where}: {e}" if isinstance(e, InputError) else f"{where}: {type(e).__name__}: {e}"}
        return row

    def _line(self, i):
        with open(self.path, "rb") as f:
            f.seek(self.offsets[i])
            return f.readline().decode("utf-8-sig")  # -sig: a byte-order mark on line 1 is dropped

    def _jsonl(self, i):
        r = json.loads(self._line(i))
        image = r.get("image")  # absent or null: a text-only row
        texts = {k: r[k] for k in ("question", "chosen", "rejected", "answer") if k in r}
        path = None if image is None else os.path.join(os.path.dirname(self.path), image)
        return {"id": content_id(image or "", texts), "image": path, **texts}

    def _tsv(self, i):
        cols = self._line(i).rstrip("\r\n").split("\t")
        if len(cols) != 7:
            raise ValueError(f"expected 7 tab-separated columns, found {len(cols)}")
        fields = json.loads(base64.b64decode(cols[2], validate=True))
        texts = dict(zip(("question", "chosen", "rejected"), fields[:3]))
        texts["question"] = texts["question"].replace("<image>", "").strip()
        return {"id": content_id(cols[1], texts), "image": base64.b64decode(cols[1], validate=True),
                **texts}

    def _parquet(self, i):
        g = next(g for g in range(len(self.starts) - 1) if i < self.starts[g + 1])
        if self.group[0] != g:  # keep one row group in memory, not the file
            self.group = (g, self.pq.read_row_group(g, columns=["image", "text"]).to_pylist())
        r = self.group[1][i - self.starts[g]]
        texts = json.loads(r["text"])
        texts = {k: texts[k] for k in ("question", "chosen", "rejected")}
        return {"id": content_id(r["image"]["bytes"], texts), "image": r["image"]["bytes"], **texts}


def line_offsets(path):
    """Byte offset of every non-blank line (one pass; the lines themselves are not kept)."""
    offsets, pos = [], 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                offsets.append(pos)
            pos += len(line)
    return offsets


def content_id(image, texts):
    h = hashlib.sha1(image if isinstance(image, bytes) else image.encode())
    h.update(json.dumps(texts, sort_keys=True).encode())
    return h.hexdigest()[:20]
