"""Object HalBench offline: how often a model's answers name COCO objects that are not in the image
(CHAIR), computed as RLHF-V's eval/eval_gpt_obj_halbench.py computes it without --use_gpt.

    python sample.py --ckpt=RLHF-V --questions=obj_halbench_300_with_image.jsonl --out=answers.jsonl --preset=rlhfv
    python halbench.py --answers=answers.jsonl --coco=coco2014/annotations
    python halbench.py --answers=answers.jsonl --coco=coco2014/annotations --compare=sft_answers.jsonl

Ground truth of an image: the COCO 2014 instance categories annotated on it (train and val files),
plus the objects that its five reference captions name. An answer's objects: its words through the
pipeline below, kept when the synonym table (halbench_synonyms.txt) knows them, each mapped to its
class. The rates, as RLHF-V's summary prints them:
  CHAIRs         answers naming at least one object not in the ground truth / all answers
  Response Hall  the same / answers naming at least one COCO object (the paper's "Resp.")
  Object Hall    CHAIRi: hallucinated mentions / all mentions, every mention counted ("Mention")
  Object recall  correct distinct classes per answer, summed / ground-truth classes, summed
  Length         words per answer (split on spaces)
Each with a 95% interval: Wilson's for the two proportions of answers, a bootstrap over images for
the rest (stats.py); with --compare, paired differences on the same images (this file - the other).

Word pipeline (CHAIR's): lower case; nltk's word_tokenize (sentences, then Penn Treebank rules);
WordNet's noun lemma (nltk's WordNetLemmatizer); two-word names merged left to right ("hot dog",
"baby elephant" -> elephant, "toilet seat" -> toilet); "seat" dropped when "toilet" is there; words
outside the table dropped. nltk is not needed: the tokeniser is written here, and the lemmas of
every word that can reach the table are in halbench_lemmas.txt (tests/nltk_check.py made it from
WordNet 3.0 with nltk 3.8.1 and compares this pipeline with nltk's).
Writes <answers>.chair.jsonl (per answer: objects, classes, which are hallucinated) and
<answers>.chair.json (the table), and caches the ground truth of the images asked about in
<answers dir>/halbench_gt.json, keyed by the annotation files' sizes and times.
Tests: python -m pytest tests/test_halbench.py
"""
import hashlib
import json
import os
import re
from dataclasses import dataclass

import cli
from cli import InputError
from checkpoint import atomic_write
from stats import interval, paired_difference, ratio_draws, resample, wilson

HERE = os.path.dirname(os.path.abspath(__file__))
COCO_FILES = ("instances_train2014.json", "instances_val2014.json", "captions_train2014.json",
              "captions_val2014.json")


@dataclass
class HalbenchConfig:
    answers: str = ""        # JSON lines: image_id, answer (or text), question (or prompt)
    coco: str = ""           # the folder of COCO 2014's instances_* and captions_* {train,val}2014.json
    compare: str = ""        # another model's answers on the same images: paired differences
    out: str = ""            # default: <answers without .jsonl>.chair.jsonl and .chair.json
    seed: int = 0            # of the bootstrap resamples


# ------------------------------------------------------------------------------ the word pipeline

def read_table(name):
    """The lines of a data file beside this one, without its "#" header."""
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip() and not line.startswith("#")]


class Vocabulary:
    """The synonym table (word -> class: the first name of its line; no word is on two lines), the
    two-word merges, and the noun lemmas."""

    def __init__(self):
        self.classes = {}
        for line in read_table("halbench_synonyms.txt"):
            names = [s.strip() for s in line.split(", ")]
            self.classes.update({name: names[0] for name in names})
        # every multi-word name, and CHAIR's own merges; only two-word keys can match a pair
        self.pairs = {w: w for w in self.classes if " " in w}
        self.pairs.update({"home plate": "home plate", "train track": "train track"})
        for animal in ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
                       "animal", "cub"):
            self.pairs.update({f"baby {animal}": animal, f"adult {animal}": animal})
        self.pairs.update({"passenger jet": "jet", "passenger train": "train", "bow tie": "tie",
                           "toilet seat": "toilet", "wine glas": "wine glass"})
        # nltk's WordNet noun lemma of every word that can reach the table (tests/nltk_check.py);
        # any other word is its own lemma, which differs from nltk's only where neither is a table
        # word, or on non-words two suffix rules from one ("dogss", which nltk reads as "dog")
        self.lemmas = dict(line.split() for line in read_table("halbench_lemmas.txt"))
        digest = hashlib.sha256()
        for name in ("halbench_synonyms.txt", "halbench_lemmas.txt"):
            with open(os.path.join(HERE, name), "rb") as f:
                digest.update(f.read())
        self.digest = digest.hexdigest()[:16]  # part of the ground-truth cache's key

    def mentions(self, text):
        """text -> [(word, class)] of every COCO object it names, in order, one per mention."""
        words = [self.lemmas.get(t, t) for t in word_tokenize(text.lower())]
        merged, i = [], 0
        while i < len(words):  # greedy, left to right: "baby dog" consumes "dog"
            pair = " ".join(words[i:i + 2])
            if pair in self.pairs:
                merged.append(self.pairs[pair])
                i += 2
            else:
                merged.append(words[i])
                i += 1
        if "toilet" in merged and "seat" in merged:  # "the seat of the toilet" is no chair
            merged = [w for w in merged if w != "seat"]
        return [(w, self.classes[w]) for w in merged if w in self.classes]


# Sentence ends as nltk's Punkt finds them in lower-cased text: after "?" or "!", or after a "."
# that does not continue an ellipsis, when whitespace or one of Punkt's non-word characters follows;
# closing quotes and brackets followed by whitespace stay with the sentence they close. Punkt may
# keep a sentence going after an initial or a number ("j.", "3."), which are no table words: whether
# such a token is split only decides whether its own period stands apart, so no count changes. Its
# pretrained English model also does so after the abbreviations it learnt ("dr."); that list could
# not be checked here, and a table word on it, followed by a period, would keep the period there.
SENTENCE_END = re.compile(r"""(?:[?!]|(?<!\.)\.)(?=[)";}\]*:@'({\[!?]|\s+\S)""")
CLOSERS = re.compile(r"""["')\]}]+?(?:\s+|(?=--)|$)""")


def sentences(text):
    start, out = 0, []
    for m in SENTENCE_END.finditer(text):
        end = m.end()
        closers = CLOSERS.match(text, end)
        end = closers.end() if closers and closers.group().strip() else end
        if end > start:
            out.append(text[start:end].lstrip())
            start = end
    return out + [text[start:].lstrip()]


# The Penn Treebank conventions as nltk's word tokenizer applies them to a sentence, for lower-cased
# text: (pattern, replacement) in order; spaces in the replacement split tokens. Its contraction
# rules ("cannot" -> "can not", "gonna") are left out: they split words that hold no table word
# into other non-table words, which cannot change what is next to a table word.
TREEBANK = [(re.compile(p), r) for p, r in [
    # opening quotes
    (r"([«“‘„]|`+)", r" \1 "), (r'^"', "``"), (r"(``)", r" \1 "), (r"""([ (\[{<])("|'')""", r"\1 `` "),
    (r"(')(?!re|ve|ll|m|t|s|d|n)(\w)\b", r"\1 \2"),
    # punctuation: the sentence's final period, commas and colons not before a digit, the rest
    (r"""([^.])(\.)([\]\)}>"'»”’ ]*)\s*$""", r"\1 \2 \3 "), (r"([:,])([^\d])", r" \1 \2"),
    (r"([:,])$", r" \1 "), (r"\.{2,}", r" \g<0> "), (r"[;@#$%&]", r" \g<0> "), (r"[?!]", r" \g<0> "),
    (r"([^'])' ", r"\1 ' "), (r"[*]", r" \g<0> "),
    (r"[\]\[(){}<>]", r" \g<0> "), (r"--", r" -- "),
]]
# then, on the sentence padded with a space at both ends: closing quotes, possessives, contractions
TREEBANK_END = [(re.compile(p), r) for p, r in [
    (r"([»”’])", r" \1 "), (r"''", " '' "), (r'"', " '' "),
    (r"([^' ])('s|'m|'d|') ", r"\1 \2 "), (r"([^' ])('ll|'re|'ve|n't) ", r"\1 \2 "),
]]


def word_tokenize(text):
    """Lower-cased text -> tokens, as nltk.word_tokenize gives them on every token that can hold a
    table word (tests/nltk_check.py compares the two)."""
    tokens = []
    for sentence in sentences(text):
        for pattern, repl in TREEBANK:
            sentence = pattern.sub(repl, sentence)
        sentence = f" {sentence} "
        for pattern, repl in TREEBANK_END:
            sentence = pattern.sub(repl, sentence)
        tokens += sentence.split()
    return tokens


# ---------------------------------------------------------------------------------- ground truth

def load_json(path, keys):
    """A COCO annotation file, checked for the lists it must hold; one-line errors naming it."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file (--coco needs COCO 2014's {', '.join(COCO_FILES)})")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not JSON ({e})") from None
    missing = [k for k in keys if not isinstance(doc, dict) or not isinstance(doc.get(k), list)]
    if missing:
        raise InputError(f"{path}: not a COCO annotation file (no list {missing[0]!r})")
    return doc


def ground_truth(coco, image_ids, vocab, cache=None):
    """{image id: sorted classes}: instance categories plus the objects the captions name, for the
    image ids asked about. cache: a JSON file reused while the annotation files' sizes and times
    and the vocabulary are unchanged, and while it holds every image asked about."""
    paths = [os.path.join(coco, name) for name in COCO_FILES]
    key = {"files": {p: [os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in paths if os.path.isfile(p)},
           "vocabulary": vocab.digest}
    wanted = {int(i) for i in image_ids}
    if cache and os.path.isfile(cache):
        try:
            with open(cache, encoding="utf-8") as f:
                kept = json.load(f)
            objects = {int(i): v for i, v in kept["objects"].items()}
            if kept["key"] == key and wanted <= objects.keys():
                return {i: objects[i] for i in wanted}
        except (ValueError, KeyError, TypeError, AttributeError):
            pass  # unreadable: computed again and overwritten
    objects, annotated = {i: set() for i in wanted}, set()
    for path in paths[:2]:
        doc = load_json(path, ("annotations", "categories"))
        try:
            names = {c["id"]: vocab.classes[c["name"]] for c in doc["categories"]}
            for a in doc["annotations"]:
                if a["image_id"] in objects:
                    objects[a["image_id"]].add(names[a["category_id"]])
                    annotated.add(a["image_id"])
        except (KeyError, TypeError) as e:
            raise InputError(f"{path}: not a COCO instances file ({type(e).__name__}: {e})") from None
        del doc
    for path in paths[2:]:
        doc = load_json(path, ("annotations",))
        try:
            for a in doc["annotations"]:
                if a["image_id"] in objects:
                    objects[a["image_id"]].update(c for _, c in vocab.mentions(a["caption"]))
                    annotated.add(a["image_id"])
        except (KeyError, TypeError, AttributeError) as e:
            raise InputError(f"{path}: not a COCO captions file ({type(e).__name__}: {e})") from None
        del doc
    unknown = sorted(wanted - annotated)
    if unknown:
        raise InputError(f"{coco}: no annotations for image id {unknown[0]}"
                         + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
                         + ": not a COCO 2014 image?")
    objects = {i: sorted(v) for i, v in objects.items()}
    if cache:
        atomic_write(cache, json.dumps({"key": key, "objects": objects}))
    return objects


# ---------------------------------------------------------------------------------------- scoring

def read_answers(path):
    """[{question_id, image_id, question, answer}] of an answers file, in RLHF-V's field names or
    ours ("text" else "answer", "prompt" else "question"); "Assistant:" deleted as RLHF-V's loader
    did."""
    rows = []
    for n, line in cli.json_lines(path, "answers as JSON lines"):
        try:
            row = json.loads(line)
            answer = row["text"] if "text" in row else row["answer"]  # RLHF-V's loader's order
            rows.append({"question_id": row.get("question_id", n - 1), "image_id": int(row["image_id"]),
                         "question": row["prompt"] if "prompt" in row else row.get("question", ""),
                         "answer": answer.replace("Assistant:", "").strip()})
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise InputError(f"{path}:{n}: expected a JSON object with image_id and answer (or text) "
                             f"({type(e).__name__}: {e})") from None
    if not rows:
        raise InputError(f"{path}: no answers")
    return rows


def score(row, truth, vocab):
    """One answer against its image's ground truth: the per-answer record and its counts."""
    found = vocab.mentions(row["answer"])
    wrong = [[w, c] for w, c in found if c not in truth]
    correct = {c for _, c in found if c in truth}
    return {**row, "objects": [[w, c] for w, c in found], "hallucinated": wrong, "ground_truth": truth,
            "counts": {"answers": 1, "hallucinated": int(bool(wrong)), "with_objects": int(bool(found)),
                       "hall_mentions": len(wrong), "mentions": len(found), "correct": len(correct),
                       "gt": len(truth), "words": len(row["answer"].strip().split(" "))}}


# name: (numerator, denominator, Wilson's interval (a proportion of answers) or a bootstrap's)
RATES = {"CHAIRs": ("hallucinated", "answers", True),
         "Response Hall": ("hallucinated", "with_objects", True),
         "Object Hall (CHAIRi)": ("hall_mentions", "mentions", False),
         "Object recall": ("correct", "gt", False),
         "Average length": ("words", "answers", False)}


def per_image(records, images):
    """The counts summed over each image's answers, in the order of `images`: the bootstrap's items."""
    totals = {i: {} for i in images}
    for r in records:
        for k, v in r["counts"].items():
            totals[r["image_id"]][k] = totals[r["image_id"]].get(k, 0) + v
    return [totals[i] for i in images]


def summarize(records, seed=0, other=None):
    """The rates with their 95% intervals; with other (records of another model on the same images),
    each rate's paired difference [this - other, low, high]."""
    images = sorted({r["image_id"] for r in records})
    items, counts = per_image(records, images), resample(len(images), seed)
    total = lambda key: sum(o[key] for o in items)
    out = {"answers": len(records), "images": len(images), "rates": {}, "ci": {}, "interval": {},
           "totals": {k: total(k) for k in items[0]}}
    for name, (num, den, proportion) in RATES.items():
        out["rates"][name] = total(num) / max(total(den), 1)
        out["ci"][name] = (wilson(total(num), total(den)) if proportion
                           else interval(ratio_draws([(items, counts)], num, den)))
        out["interval"][name] = "Wilson" if proportion else "bootstrap over images"
    if other is not None:
        theirs = {r["image_id"] for r in other}
        if theirs != set(images):
            odd = sorted(theirs ^ set(images))[0]
            raise InputError(f"--compare: the two answer files are not on the same images (image id {odd})")
        b = per_image(other, images)
        out["vs"] = {name: paired_difference([(items, counts)], [(b, counts)], num, den)
                     for name, (num, den, _) in RATES.items()}
    return out


def table(summary):
    """The summary as the lines to print (percentages, length in words)."""
    pct = lambda name, x: f"{x:.2f}" if name == "Average length" else f"{100 * x:.1f}"
    lines = [f"Object HalBench offline (CHAIR): {summary['answers']} answers on {summary['images']} images, "
             f"95% intervals" + (", minus --compare's (paired bootstrap)" if "vs" in summary else "")]
    for name, value in summary["rates"].items():
        lo, hi = summary["ci"][name]
        line = f"  {name:<22} {pct(name, value):>6} {f'[{pct(name, lo)}, {pct(name, hi)}]':<15}"
        if "vs" in summary:
            d, dlo, dhi = summary["vs"][name]
            line += f" {('+' if d >= 0 else '') + pct(name, d):>6} {f'[{pct(name, dlo)}, {pct(name, dhi)}]':<15}"
        lines.append(f"{line} {summary['interval'][name]}")
    return lines


def main(argv):
    cfg = cli.parse_args(HalbenchConfig, argv, paths=("answers", "coco", "compare"))
    if not cfg.answers or not cfg.coco:
        raise cli.UsageError("--answers and --coco are required (--help explains them)")
    vocab = Vocabulary()
    rows = read_answers(cfg.answers)
    other = read_answers(cfg.compare) if cfg.compare else []
    cache = os.path.join(os.path.dirname(os.path.abspath(cfg.answers)), "halbench_gt.json")
    truth = ground_truth(cfg.coco, {r["image_id"] for r in rows + other}, vocab, cache)
    records = [score(r, truth[r["image_id"]], vocab) for r in rows]
    summary = summarize(records, cfg.seed,
                        [score(r, truth[r["image_id"]], vocab) for r in other] if cfg.compare else None)
    out = cfg.out or cfg.answers.removesuffix(".jsonl")
    with open(out + ".chair.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with open(out + ".chair.json", "w", encoding="utf-8") as f:
        json.dump({**summary, "answers_file": cfg.answers, "compare": cfg.compare}, f, indent=1)
    print("\n".join(table(summary)))
    print(f"per answer: {out}.chair.jsonl; table: {out}.chair.json")
    return summary


if __name__ == "__main__":
    cli.run(main)
