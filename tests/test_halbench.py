"""halbench.py: the word pipeline on hand-checked phrases (plurals, irregular plurals, two-word names,
CHAIR's own merges and quirks), ground truth from instances and from captions, every rate of a
small benchmark counted by hand, the intervals, --compare, the cache, and bad inputs in one line.
The fixtures are a tiny COCO 2014 annotation folder (instances and captions, train and val) that
the tests write. (tests/nltk_check.py compares the pipeline with nltk's itself, outside the suite.)"""
import json
import os

import pytest

import cli
import halbench
import stats

VOCAB = halbench.Vocabulary()


@pytest.mark.parametrize("text, want", [
    ("Two dogs and a cat.", [("dog", "dog"), ("cat", "cat")]),
    ("A hot dog on a bun.", [("hot dog", "hot dog")]),                    # not a dog
    ("Hot dogs and a dog.", [("hot dog", "hot dog"), ("dog", "dog")]),
    ("A baby elephant and adult elephants.", [("elephant", "elephant"), ("elephant", "elephant")]),
    ("A teddy bear.", [("teddy bear", "teddy bear")]),                    # not a bear
    ("The toilet seat is up.", [("toilet", "toilet")]),                   # not a chair
    ("The seat of the toilet.", [("toilet", "toilet")]),                  # "seat" dropped beside "toilet"
    ("A seat by the window.", [("seat", "chair")]),
    ("A fire hydrant, and another hydrant.", [("fire hydrant", "fire hydrant"), ("hydrant", "fire hydrant")]),
    ("Men, women, children and people.", [("woman", "person"), ("child", "person"), ("people", "person")]),
    ("Knives, mice, oxen, geese and sheep.", [("knife", "knife"), ("mouse", "mouse"), ("ox", "cow"),
                                              ("goose", "bird"), ("sheep", "sheep")]),
    ("Buses, benches, boxes, skis and scissors.", [("bus", "bus"), ("bench", "bench"), ("ski", "skis"),
                                                   ("scissors", "scissors")]),
    ("Two wine glasses.", [("wine glass", "wine glass")]),
    ("The dog's bone; the dogs' bowls.", [("dog", "dog"), ("dog", "dog"), ("bowl", "bowl")]),
    ('A (dog) and a "cat".', [("dog", "dog"), ("cat", "cat")]),
    ("A dog. A cat-like toy.", [("dog", "dog")]),                         # "cat-like" is one token
    ("A DOG!", [("dog", "dog")]),
    ("A passenger train on the train tracks.", [("train", "train")]),     # "train track" is no train
    ("An iPhone and a cell phone.", [("cell phone", "cell phone")]),      # the table's "iPhone" never matches
    ("The sky is blue.", []),
])
def test_mentions_follow_chairs_word_pipeline(text, want):
    """Lower case, Treebank tokens, WordNet noun lemmas (nltk's, "men" included: it stays "men",
    which the table lacks), two-word merges left to right, table words only."""
    assert VOCAB.mentions(text) == want


def test_tokens_as_nltk_splits_them():
    """Sentence ends split off a final period; possessives, quotes, brackets and colons are tokens;
    a period inside a sentence without a space after it stays in the word."""
    assert halbench.word_tokenize("a dog. the cat's toy (red): 'ball' and 3.5 kg.") == [
        "a", "dog", ".", "the", "cat", "'s", "toy", "(", "red", ")", ":", "'ball", "'", "and", "3.5", "kg", "."]


# ------------------------------------------------------------------------------ a tiny benchmark

CATEGORIES = {1: "person", 3: "car", 11: "fire hydrant", 18: "dog", 19: "horse", 20: "sheep", 21: "cow",
              22: "elephant", 49: "knife", 58: "hot dog", 62: "chair", 67: "dining table", 70: "toilet",
              72: "tv", 81: "sink", 88: "teddy bear"}
# image id: (instances file, instance categories, captions)
IMAGES = {
    1: ("val", [18, 1, 1], ["A man walks his dog in the park."]),
    2: ("val", [70], ["A white toilet with the seat up next to a sink."]),   # sink: captions only
    3: ("train", [22], ["A baby elephant walks through the grass."]),
    4: ("train", [58, 67], ["A hot dog on a plate on a table."]),
    5: ("val", [88, 62], ["Two teddy bears sitting on a chair."]),
    6: ("train", [11], ["A red fire hydrant on the sidewalk near some cars."]),  # car: captions only
    7: ("val", [20, 21, 49], ["Sheep and oxen in a field."]),
}
ANSWERS = {
    1: "Two men, women and children walk their dogs; a cat watches the dogs.",
    2: "A toilet seat and a sink in a small bathroom.",
    3: "A baby elephant stands next to an adult elephant and a bear.",
    4: "A hot dog with mustard on a table.",
    5: "Teddy bears on a chair.",
    6: "The sky is blue.",
    7: "Three sheep, two oxen and some knives.",
}
# by hand: the objects each answer names, and the image's ground truth (classes)
OBJECTS = {1: [("woman", "person"), ("child", "person"), ("dog", "dog"), ("cat", "cat"), ("dog", "dog")],
           2: [("toilet", "toilet"), ("sink", "sink")],
           3: [("elephant", "elephant"), ("elephant", "elephant"), ("bear", "bear")],
           4: [("hot dog", "hot dog"), ("table", "dining table")],
           5: [("teddy bear", "teddy bear"), ("chair", "chair")],
           6: [],
           7: [("sheep", "sheep"), ("ox", "cow"), ("knife", "knife")]}
TRUTH = {1: ["dog", "person"], 2: ["sink", "toilet"], 3: ["elephant"], 4: ["dining table", "hot dog"],
         5: ["chair", "teddy bear"], 6: ["car", "fire hydrant"], 7: ["cow", "knife", "sheep"]}


def write_coco(d):
    d.mkdir(exist_ok=True)
    cats = [{"id": i, "name": n, "supercategory": "x"} for i, n in CATEGORIES.items()]
    for split in ("train", "val"):
        ims = [i for i, (s, _, _) in IMAGES.items() if s == split]
        inst = [{"id": 100 * i + k, "image_id": i, "category_id": c, "bbox": [0, 0, 1, 1]}
                for i in ims for k, c in enumerate(IMAGES[i][1])]
        caps = [{"id": 100 * i + k, "image_id": i, "caption": c} for i in ims for k, c in enumerate(IMAGES[i][2])]
        images = [{"id": i, "file_name": f"COCO_{split}2014_{i:012d}.jpg"} for i in ims]
        (d / f"instances_{split}2014.json").write_text(json.dumps(
            {"info": {}, "licenses": [], "images": images, "annotations": inst, "categories": cats}))
        (d / f"captions_{split}2014.json").write_text(json.dumps(
            {"info": {}, "licenses": [], "images": images, "annotations": caps}))
    return d


def write_answers(path, answers):
    path.write_text("".join(json.dumps({"question_id": i - 1, "image_id": i, "question": "Describe the image.",
                                        "answer": a}) + "\n" for i, a in answers.items()))
    return path


@pytest.fixture
def bench(tmp_path):
    return write_coco(tmp_path / "coco"), write_answers(tmp_path / "answers.jsonl", ANSWERS)


def test_ground_truth_from_instances_and_captions(bench):
    """Instance categories of both files, plus the classes the captions name: the sink of image 2
    and the cars of image 6 are in captions only; "seat" beside "toilet" is no chair."""
    coco, _ = bench
    assert halbench.ground_truth(coco, IMAGES, VOCAB) == TRUTH


def test_every_rate_by_hand(bench):
    """7 answers, one per image. Hallucinated: the cat of 1 and the bear of 3 (2 answers, 2 mentions);
    image 6's answer names nothing (in CHAIRs' denominator, not in Response Hall's); "men" is no
    mention. Mentions 5+2+3+2+2+0+3 = 17; correct classes 2+2+1+2+2+0+3 = 12 of 2+2+1+2+2+2+3 = 14;
    words 13+10+12+8+5+4+7 = 59."""
    coco, answers = bench
    summary = halbench.main([f"--answers={answers}", f"--coco={coco}"])
    rates, ci = summary["rates"], summary["ci"]
    assert rates["CHAIRs"] == 2 / 7 and rates["Response Hall"] == 2 / 6
    assert rates["Object Hall (CHAIRi)"] == 2 / 17 and rates["Object recall"] == 12 / 14
    assert rates["Average length"] == 59 / 7
    assert ci["CHAIRs"] == stats.wilson(2, 7) and ci["Response Hall"] == stats.wilson(2, 6)
    for name in ("Object Hall (CHAIRi)", "Object recall", "Average length"):  # bootstrap over the 7 images
        assert ci[name][0] <= rates[name] <= ci[name][1] and ci[name][0] < ci[name][1]
    rows = [json.loads(line) for line in open(str(answers).removesuffix(".jsonl") + ".chair.jsonl")]
    assert [[tuple(o) for o in r["objects"]] for r in rows] == [OBJECTS[i] for i in ANSWERS]
    assert [r["hallucinated"] for r in rows] == [[["cat", "cat"]], [], [["bear", "bear"]], [], [], [], []]
    assert [r["ground_truth"] for r in rows] == [TRUTH[i] for i in ANSWERS]


def test_compare_is_paired_on_the_same_images(bench, tmp_path):
    """Identical files differ by exactly 0 with a zero-width interval; a file whose first answer
    lacks "; a cat watches the dogs" has one hallucinated answer fewer (CHAIRs 2/7 - 1/7) and two
    mentions fewer, one of them hallucinated (CHAIRi 2/17 - 1/15)."""
    coco, answers = bench
    same = halbench.main([f"--answers={answers}", f"--coco={coco}", f"--compare={answers}"])
    assert all(v == [0.0, 0.0, 0.0] for v in same["vs"].values())
    fixed = write_answers(tmp_path / "fixed.jsonl", {**ANSWERS, 1: ANSWERS[1].replace("; a cat watches the dogs", "")})
    vs = halbench.main([f"--answers={answers}", f"--coco={coco}", f"--compare={fixed}"])["vs"]
    assert vs["CHAIRs"][0] == pytest.approx(1 / 7) and vs["Object Hall (CHAIRi)"][0] == pytest.approx(2 / 17 - 1 / 15)
    assert vs["CHAIRs"][1] <= vs["CHAIRs"][0] <= vs["CHAIRs"][2]


def test_ground_truth_is_cached_until_the_annotations_change(bench, monkeypatch):
    """The second run reads halbench_gt.json beside the answers, not the annotation files; a changed
    annotation file (size and time) is read again."""
    coco, answers = bench
    halbench.main([f"--answers={answers}", f"--coco={coco}"])
    assert (answers.parent / "halbench_gt.json").exists()
    reads = []
    load = halbench.load_json
    monkeypatch.setattr(halbench, "load_json", lambda path, keys: reads.append(path) or load(path, keys))
    halbench.main([f"--answers={answers}", f"--coco={coco}"])
    assert reads == []
    doc = json.loads((coco / "captions_val2014.json").read_text())
    doc["info"] = {"edited": True}
    (coco / "captions_val2014.json").write_text(json.dumps(doc))
    halbench.main([f"--answers={answers}", f"--coco={coco}"])
    assert len(reads) == 4


@pytest.mark.parametrize("damage, message", [
    (lambda coco, a: os.remove(coco / "captions_train2014.json"), "captions_train2014.json: no such file"),
    (lambda coco, a: (coco / "instances_val2014.json").write_text("{"), "instances_val2014.json: not JSON"),
    (lambda coco, a: (coco / "captions_val2014.json").write_text("[]"), "captions_val2014.json: not a COCO"),
    (lambda coco, a: a.write_text(a.read_text() + '{"image_id": 999, "answer": "A dog."}\n'),
     "no annotations for image id 999"),
    (lambda coco, a: a.write_text(a.read_text() + '{"image_id": 1}\n'), "answers.jsonl:8: expected"),
])
def test_bad_inputs_are_one_line_errors(bench, damage, message, capsys):
    coco, answers = bench
    damage(coco, answers)
    with pytest.raises(cli.InputError) as e:  # cli.run prints it as one line, exit status 1
        halbench.main([f"--answers={answers}", f"--coco={coco}"])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_reads_rlhfvs_answer_layout(bench, tmp_path):
    """An answers file as RLHF-V's answering script and loader name the fields ("text", "prompt";
    "Assistant:" written by the model) scores as ours does."""
    coco, answers = bench
    theirs = tmp_path / "theirs.jsonl"
    theirs.write_text("".join(json.dumps({"question_id": i - 1, "image_id": i, "prompt": "Describe the image.",
                                          "text": f"Assistant: {a}", "model_id": "x"}) + "\n"
                              for i, a in ANSWERS.items()))
    ours = halbench.main([f"--answers={answers}", f"--coco={coco}"])
    assert halbench.main([f"--answers={theirs}", f"--coco={coco}"])["rates"] == ours["rates"]
