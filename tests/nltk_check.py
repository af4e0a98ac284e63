"""halbench.py's word pipeline against nltk's, and how halbench_lemmas.txt was made. Not part of the
suite (nltk is no dependency): run it in a separate venv that has nltk 3.8.1 and WordNet 3.0.

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install nltk==3.8.1 torch   # torch: halbench imports stats
    apt-get install wordnet-base       # WordNet 3.0 in /usr/share/wordnet; nltk also wants `lexnames`
    NLTK_DATA=DIR /tmp/ref/bin/python tests/nltk_check.py --lemmas   # rewrite halbench_lemmas.txt
    NLTK_DATA=DIR /tmp/ref/bin/python tests/nltk_check.py            # compare, print the counts

DIR/corpora/wordnet holds the files of /usr/share/wordnet and a lexnames file (the 45 lexicographer
files of WordNet's lexnames(5) manual page: number, name, syntactic category).

The lemma table: every word that can matter is a word of the synonym table or of a two-word merge
(R). nltk's lemmatiser (WordNet's morphy, the shortest of its candidates) reaches a word of R from a
word made of it by one of WordNet's noun suffix rules in reverse ("dog" <- "dogs", "bus" <-
"buses", "lady" <- "ladies"), or through WordNet's noun exception list ("oxen" -> "ox"). All those
forms, and R itself, are lemmatised by nltk; a line "form lemma" is kept where the two differ and
either is in R. A form two or more suffix rules away ("dogss", "buseses") is no English word; nltk
would still reach "dog" from it, while the table leaves it alone: the one place where the counts
could differ, on misspellings.

The comparison: nltk's pipeline (CHAIR's caption_to_words, with nltk's word_tokenize) against
halbench.Vocabulary.mentions on sentences built around every table word in singular and plural,
after punctuation, possessives, hyphens and quotes, and on random texts. nltk's pretrained Punkt
model cannot be downloaded here, so its sentence splitter runs untrained (Punkt's rules without the
English abbreviation list); the single-sentence cases need no splitter.
"""
import os
import random
import sys

import nltk
from nltk.corpus import wordnet as wn
from nltk.stem import WordNetLemmatizer
from nltk.tokenize.destructive import NLTKWordTokenizer
from nltk.tokenize.punkt import PunktSentenceTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

lemmatize = WordNetLemmatizer().lemmatize
RULES = wn.MORPHOLOGICAL_SUBSTITUTIONS[wn.NOUN]


def table_words():
    classes = {}
    for line in open(os.path.join(ROOT, "halbench_synonyms.txt")):
        if line.startswith("#") or not line.strip():
            continue
        names = [s.strip() for s in line.split(", ")]
        classes.update({n: names[0] for n in names})
    words = {w for w in classes if " " not in w}
    words |= {part for w in classes if " " in w for part in w.split()}
    extra = ["home plate", "train track", "passenger jet", "passenger train", "bow tie", "toilet seat",
             "wine glas"] + [f"{a} {b}" for a in ("baby", "adult") for b in
                             ("bird cat dog horse sheep cow elephant bear zebra giraffe animal cub".split())]
    words |= {part for w in extra for part in w.split()}
    return words


def candidate_forms(relevant, depth=1):
    forms, frontier = set(relevant), set(relevant)
    for _ in range(depth):
        frontier = {w[:len(w) - len(new)] + old for w in frontier for old, new in RULES if w.endswith(new)}
        forms |= frontier
    exceptions = wn._exception_map[wn.NOUN]
    forms |= {k for k, v in exceptions.items() if k in relevant or set(v) & relevant}
    return forms


def make_lemmas():
    relevant = table_words()
    rows = sorted((w, lemmatize(w)) for w in candidate_forms(relevant))
    rows = [(w, l) for w, l in rows if w != l and (w in relevant or l in relevant)]
    header = [
        "# nltk 3.8.1's WordNet noun lemma (WordNetLemmatizer().lemmatize(word)) of every word that can reach",
        "# a word of halbench_synonyms.txt or of a two-word merge, where the lemma differs from the word",
        "# (one \"word lemma\" a line; any other word is its own lemma). Made by tests/nltk_check.py --lemmas",
        "# from WordNet 3.0 (Princeton University, WordNet 3.0 licence: free use, copy and distribution",
        "# with this notice; Debian's wordnet-base). Note nltk's results are kept even where they",
        "# surprise (\"men\" stays \"men\", a WordNet noun of its own, while \"women\" -> \"woman\").",
    ]
    with open(os.path.join(ROOT, "halbench_lemmas.txt"), "w") as f:
        f.write("\n".join(header + [f"{w} {l}" for w, l in rows]) + "\n")
    print(f"{len(rows)} lemmas of {len(candidate_forms(relevant))} forms")


class Reference:
    """CHAIR's caption_to_words with nltk (tokeniser, lemmatiser), on halbench's tables."""

    def __init__(self, vocab, split_sentences=True):
        self.vocab, self.split = vocab, split_sentences
        self.punkt, self.treebank = PunktSentenceTokenizer(), NLTKWordTokenizer()

    def tokens(self, text):
        sents = self.punkt.tokenize(text) if self.split else [text]
        return [t for s in sents for t in self.treebank.tokenize(s)]

    def mentions(self, text):
        words = [lemmatize(w) for w in self.tokens(text.lower())]
        merged, i = [], 0
        while i < len(words):
            pair = " ".join(words[i:i + 2])
            if pair in self.vocab.pairs:
                merged.append(self.vocab.pairs[pair]); i += 2
            else:
                merged.append(words[i]); i += 1
        if "toilet" in merged and "seat" in merged:
            merged = [w for w in merged if w != "seat"]
        return [(w, self.vocab.classes[w]) for w in merged if w in self.vocab.classes]


def plurals(w):
    out = {w, w + "s", w + "es"}
    if w.endswith("y"):
        out.add(w[:-1] + "ies")
    if w.endswith("f"):
        out.add(w[:-1] + "ves")
    if w.endswith("fe"):
        out.add(w[:-2] + "ves")
    if w.endswith("man"):
        out.add(w[:-3] + "men")
    return out


CONTEXTS = ["{}", "a {}.", "the {}'s tail", "the {}' tails", "two {}, and", "({})", "[{}]", '"{}"', "'{}'",
            "'{} here", "{}-shaped", "a {}!", "a {}?", "{}: yes", "{};", "{}...", "{}--and", "a {}.) the",
            'a {}." the', "a {}.' the", "the {}. the end", "a {}.the", "{}'ll", "{}n't", "{}'re", "*{}*",
            "#{}", "{}&co", "«{}»", "“{}”", "the {} , a", "{}.,", "a {}.: b", "a {}.(b)", "{}. {}.",
            "hot {} dog", "baby {}", "a {}... and", "'{}' and", "``{}''", "{}$", "{},{}", "{}:{}"]
EXTRA = ["men", "women", "children", "people", "mice", "knives", "oxen", "geese", "sheep", "buses",
         "glasses", "wine glasses", "benches", "boxes", "skis", "scissors", "teeth", "feet", "ladies",
         "hot dogs", "baby elephants", "teddy bears", "toilet seats", "fire hydrants", "passenger trains"]


def main():
    if "--lemmas" in sys.argv:
        return make_lemmas()
    import halbench
    vocab = halbench.Vocabulary()
    relevant = table_words()
    forms = candidate_forms(relevant)
    bad = [w for w in sorted(forms) if (w in relevant or lemmatize(w) in relevant)
           and vocab.lemmas.get(w, w) != lemmatize(w)]
    print(f"lemmas: {len(forms)} forms compared, {len(bad)} differ {bad[:10]}")
    words = sorted({p for w in relevant for p in plurals(w)} | set(EXTRA))
    one = Reference(vocab, split_sentences=False)
    split = Reference(vocab)
    texts = [c.format(w, w) for w in words for c in CONTEXTS]
    rng = random.Random(0)
    pieces = words + ["the", "a", "is", "on", "of", "and", "there", "2", "dr", "it", "its"]
    punct = ["", "", "", ".", ",", "'s", "'", "!", "?", ":", ";", ")", "(", '"', "-", "...", ".)", "--"]
    for _ in range(20000):
        n = rng.randint(2, 14)
        texts.append(" ".join(rng.choice(["", "", "(", '"', "'"]) + rng.choice(pieces) + rng.choice(punct)
                              for _ in range(n)))
    diffs = {"one sentence": [], "punkt untrained": []}
    n_mentions, n_one = 0, 0
    for t in texts:
        ours = vocab.mentions(t)
        n_mentions += len(ours)
        if "." not in t[:-1] and "?" not in t and "!" not in t:
            n_one += 1
            if one.mentions(t) != ours:
                diffs["one sentence"].append(t)
        if split.mentions(t) != ours:
            diffs["punkt untrained"].append(t)
    print(f"pipelines: {len(texts)} texts ({len(words)} words x {len(CONTEXTS)} contexts + 20000 random), "
          f"{n_mentions} mentions found by halbench")
    for k, v in diffs.items():
        n = n_one if k == "one sentence" else len(texts)
        print(f"  vs nltk ({k}): {len(v)} of {n} texts differ", v[:8])


if __name__ == "__main__":
    main()
