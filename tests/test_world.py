"""The synthetic world: generation, rendering, the bias of the SFT captions, and the judge.

The scorer is documented by hand-written answers about one scene, with the verdicts written out.
    python -m pytest tests/test_world.py -q
"""
import io
import random

import pytest
import sentencepiece as spm

import ddpo
from miniature import world
from miniature.world import Obj, Scene, check, correct, score

# o . .      o: small red circle in the top left
# . O .      O: large blue square in the center
# . . x      x: small yellow cross in the bottom right
SCENE = Scene(3, (Obj("circle", "red", "small", 0, 0), Obj("square", "blue", "large", 1, 1),
                  Obj("cross", "yellow", "small", 2, 2)))
TRUE = ("There are three objects. A small red circle is in the top left. There is a large blue "
        "square in the center. In the bottom right, there is a small yellow cross. The red circle "
        "is above the blue square.")


def judged(answer, scene=SCENE):
    return [(v.type, v.claim.text, v.ok) for v in check(scene, answer)]


def test_verdicts_of_a_true_answer():
    assert judged(TRUE) == [
        ("count", "are three objects", True),
        ("object", "circle", True), ("attribute", "red", True), ("attribute", "small", True),
        ("relation", "in the top left", True),
        ("object", "square", True), ("attribute", "blue", True), ("attribute", "large", True),
        ("relation", "in the center", True),
        ("object", "cross", True), ("attribute", "yellow", True), ("attribute", "small", True),
        ("relation", "In the bottom right", True),
        ("attribute", "red", True), ("attribute", "blue", True), ("relation", "above", True)]
    assert correct(SCENE, TRUE) is None


@pytest.mark.parametrize("answer, verdicts", [
    # object: there is no triangle (its colour, size and place are not judged)
    ("There is a small green triangle at the top.", [("object", "triangle", False)]),
    # attribute: the square exists, but no square is green
    ("A large green square is in the center.", [
        ("object", "square", True), ("attribute", "green", False), ("attribute", "large", True),
        ("relation", "in the center", True)]),
    # count
    ("I can see four shapes.", [("count", "four shapes", False)]),
    # position: the circle is in the top left
    ("There is a small red circle in the bottom left.", [
        ("object", "circle", True), ("attribute", "red", True), ("attribute", "small", True),
        ("relation", "in the bottom left", False)]),
    # spatial relation: the square is to the right of the circle
    ("The blue square is to the left of the red circle.", [("attribute", "blue", True),
     ("attribute", "red", True), ("relation", "to the left of", False)]),
    # a relation about an object that is not there is an object hallucination
    ("The green triangle is below the blue square.", [("object", "triangle", False)]),
    # denials and unparseable text make no claim
    ("There is no triangle.", []),
    ("circle circle square. the the the", []),
])
def test_one_verdict_per_hallucination_type(answer, verdicts):
    assert judged(answer) == verdicts


def test_score_by_hand():
    answers = [TRUE,
               # invents a triangle: 1 of its 2 object words; describes 1 of 3 objects
               "There are three objects. A small red circle is in the top left. There is a small "
               "green triangle at the top.",
               "A large green square is in the center.",  # attribute; describes nothing right
               "I can see four shapes."]  # count; mentions no object
    got = score([SCENE] * 4, answers)
    assert got == pytest.approx({"response_rate": 2 / 3, "mention_rate": 1 / 6, "object": 1 / 4,
                                 "attribute": 1 / 4, "count": 1 / 4, "relation": 0.0,
                                 "coverage": (1 + 1 / 3) / 4, "n": 4})
    assert all(type(v) is float for k, v in got.items() if k != "n")


def test_outcomes_are_what_score_counts_per_answer():
    """The answers of test_score_by_hand, one dict each; score's rates are ratios of their sums
    (response 2/3: two of the three answers that mention an object hallucinate)."""
    answers = [TRUE, "There are three objects. A small red circle is in the top left. There is a "
               "small green triangle at the top.", "A large green square is in the center.",
               "I can see four shapes."]
    zero = dict.fromkeys(("object", "attribute", "count", "relation"), 0)
    assert world.outcomes([SCENE] * 4, answers) == [
        {"mentions": 1, "hallucinated": 0, "said": 3, "invented": 0, **zero, "coverage": 1.0},
        {"mentions": 1, "hallucinated": 1, "said": 2, "invented": 1, **zero, "object": 1, "coverage": 1 / 3},
        {"mentions": 1, "hallucinated": 1, "said": 1, "invented": 0, **zero, "attribute": 1, "coverage": 0.0},
        {"mentions": 0, "hallucinated": 0, "said": 0, "invented": 0, **zero, "count": 1, "coverage": 0.0}]


def test_wrong_claims_carry_their_place_in_the_answer():
    answer = "There is a large blue square in the center. I see a small green triangle at the top."
    wrong = [v for v in check(SCENE, answer) if not v.ok]
    assert [(v.type, v.claim) for v in wrong] == [("object", ("triangle", 64, 72))]
    assert answer[64:72] == "triangle"


def test_true_descriptions_score_clean():
    train, test = world.make_world(1, 0, 300)
    rng = random.Random(0)
    got = score(test, [world.describe(s, rng) for s in test])
    assert got == {"response_rate": 0.0, "mention_rate": 0.0, "object": 0.0, "attribute": 0.0,
                   "count": 0.0, "relation": 0.0, "coverage": 1.0, "n": 300}


@pytest.mark.parametrize("rejected, chosen", [
    ("There are three objects. A small green circle is in the top left.",
     "There are three objects. A small red circle is in the top left."),
    ("I can see two shapes. On the right, there is a small yellow cross.",  # capital kept
     "I can see three shapes. In the bottom right, there is a small yellow cross."),
    ("The blue square is to the left of the red circle. There is one object.",
     "The blue square is to the right of the red circle. There are three objects."),
    # an invented object becomes the object the answer left out, in its words and place
    ("A small red circle is in the top left. There is a large blue square in the center. "
     "I see a large green triangle at the top.",
     "A small red circle is in the top left. There is a large blue square in the center. "
     "I see a small yellow cross in the bottom right."),
    # ... or, when nothing is left out, its sentence goes (with its relation)
    (TRUE.replace("There is a large", "There is a large green triangle on the left. There is a "
                  "large") + " The green triangle is above the red circle.", TRUE),
])
def test_correct_changes_only_the_hallucinated_words(rejected, chosen):
    assert correct(SCENE, rejected) == chosen
    assert all(v.ok for v in check(SCENE, chosen))
    assert correct(SCENE, chosen) is None


def test_count_correction_keeps_grammar():
    one = Scene(3, (Obj("diamond", "purple", "large", 2, 1),))
    assert correct(one, "There are two objects.") == "There is one object."
    assert correct(SCENE, "There is one object.") == "There are three objects."


def test_corrected_captions_check_clean():
    """The annotator on every kind of noise the SFT data has, and on word salad."""
    train, _ = world.make_world(2, 400, 0)
    rng = random.Random(0)
    noisy = world.sft_examples(train, rng, p_noise=1.0, p_qa=0.0)
    fixed = [(train[i], correct(train[i], a)) for i, _, a in noisy]
    assert sum(c is not None for _, c in fixed) > 300
    for scene, c in fixed:
        if c is not None:
            assert all(v.ok for v in check(scene, c)), c
            assert score([scene], [c])["coverage"] == 1.0
    words = " ".join(world.corpus(train[:20], rng)).split()
    for scene in train:
        salad = " ".join(rng.choice(words) for _ in range(rng.randint(0, 30)))
        c = correct(scene, salad)
        assert c is None or all(v.ok for v in check(scene, c)), (salad, c)
    for junk in ["", " ", "...", "There is a small red", "é🙂 circle? ?", "A the in the . ,"]:
        correct(SCENE, junk)


def test_world_is_deterministic_and_held_out():
    train, test = world.make_world(7, 500, 100)
    assert (train, test) == world.make_world(7, 500, 100)
    assert test == world.make_world(7, 50, 100)[1]  # the test set does not depend on n_train
    assert train != world.make_world(8, 500, 100)[0]
    assert len(set(test)) == 100 and not set(train) & set(test)
    assert all(1 <= len(s.objects) <= 4 for s in train + test)
    assert len({(o.row, o.col) for o in train[0].objects}) == len(train[0].objects)
    assert [Scene.from_json(s.to_json()) for s in test] == test


def test_render():
    train, _ = world.make_world(0, 2, 0)
    img = world.render(train[0])
    assert img.size == (48, 48) and img.mode == "RGB"
    assert img.tobytes() == world.render(train[0]).tobytes()
    assert img.getpixel((0, 0)) == world.BACKGROUND

    def ink(o):
        im = world.render(Scene(3, (o,)))
        inked = sum(im.getpixel((x, y)) != world.BACKGROUND for x in range(48) for y in range(48))
        return inked, im.getpixel((40, 40))
    for shape in world.SHAPES:
        (small, colour), (large, _) = (ink(Obj(shape, "blue", s, 2, 2)) for s in world.SIZES)
        assert colour == world.COLOURS["blue"] and large > 2.5 * small > 0


def test_the_sft_captions_carry_the_bias():
    rng = random.Random(0)
    train, _ = world.make_world(3, 1000, 0)
    # a square and no triangle: the careless captioner with p_cooc=1 always adds a triangle
    prone = [s for s in train
             if {o.shape for o in s.objects} & {"square", "triangle"} == {"square"}]
    answers = [a for _, _, a in world.sft_examples(prone, rng, p_noise=1.0, p_cooc=1.0, p_qa=0.0)]
    assert all(f"{world.STEREOTYPE['triangle']} triangle" in a for a in answers)
    assert score(prone, answers)["object"] == score(prone, answers)["count"] == 1.0
    # without noise, descriptions and short answers are all true
    clean = world.sft_examples(train, rng, p_noise=0.0, p_cooc=0.0, p_qa=0.5)
    assert {q in world.DESCRIBE_PROMPTS for _, q, _ in clean} == {True, False}
    assert all(v.ok for i, _, a in clean for v in check(train[i], a))
    # the default noise: 40% of the descriptions, with every type of hallucination
    noisy = [(train[i], a) for i, q, a in world.sft_examples(train, rng)
             if q in world.DESCRIBE_PROMPTS]
    got = score(*zip(*noisy))
    assert 0.3 < got["response_rate"] < 0.5
    assert min(got[t] for t in ("object", "attribute", "count", "relation")) > 0.03


def test_corrections_are_what_ddpo_weights():
    """The annotator meets ddpo.token_weights: only the corrected words get gamma."""
    train, _ = world.make_world(0, 300, 0)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(  # BPE as data.train_tokenizer, in memory
        sentence_iterator=iter(world.corpus(train, random.Random(0))), model_writer=model,
        vocab_size=1000, hard_vocab_limit=False, model_type="bpe", byte_fallback=True,
        minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    # (Not "There are four ...": a match of two tokens is below min_match, even at the start.)
    rejected = ("I can see four shapes. A small green circle is in the top left. There is a large "
                "blue square in the center. The blue square is to the left of the red circle.")
    chosen = correct(SCENE, rejected)
    assert chosen == ("I can see three shapes. A small red circle is in the top left. There is a "
                      "large blue square in the center. The blue square is to the right of the "
                      "red circle.")
    c, r = sp.encode(chosen), sp.encode(rejected)
    chosen_w, rejected_w = ddpo.token_weights(c, r, gamma=5.0)

    def weighted(ids, w):  # the decoded runs of up-weighted tokens
        runs, run = [], []
        for i, x in zip(ids, w.tolist()):
            if x == 5.0:
                run.append(i)
            elif run:
                runs, run = runs + [sp.decode(run)], []
        return runs + ([sp.decode(run)] if run else [])
    assert weighted(c, chosen_w) == ["three", "red", "right"]
    assert weighted(r, rejected_w) == ["four", "green", "left"]
