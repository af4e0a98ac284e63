"""A synthetic visual world in which hallucinations can be provoked, checked and corrected.

RLHF-V needs three things that a CPU-sized reproduction cannot take from COCO and human annotators:
images a tiny model can learn to see, a model that hallucinates the way real MLLMs do, and an
annotator that corrects exactly the hallucinated segments of that model's own answers. This module
is all three, with the standard library and Pillow only:

    scenes   make_world -> Scene (1-4 shapes on a G x G grid, one per cell), render -> image
    text     describe (a correct detailed description), sft_examples (the noisy SFT data), corpus
    judge    parse -> claims, check -> verdicts, correct (the annotator), score (Object HalBench)
             and outcomes (what score counts in each answer, for intervals over scenes)

How hallucinations arise. Real MLLMs learn to hallucinate from noisy web captions, not from poor
eyesight (a model that cannot see learns priors that DPO can only trade for other text-only rules).
So the images are easy to see and it is the SFT captions that are wrong, written by a careless
captioner who describes the scene he expects, not the one he sees. Where there is a square but no
triangle he adds, with probability `p_cooc` = 0.9, a triangle in its stereotypical colour in an
empty cell, and counts it (object and count hallucinations: squares and triangles "go together").
Otherwise, with probability `p_noise` = 0.35, he either paints one object in its shape's
stereotypical colour (attribute: "bananas are yellow") or puts it in the mirror cell (position:
left/right mix-ups). The co-occurrence is stated nearly always, or greedy decoding, which says the
most likely words, would repeat it too seldom for the problem to be real (a model that sees well
weighs the image against the prior); the slips are rarer and only blur what the model reads.
In the scenes themselves every shape, colour and cell is equally likely, so undoing any of this
needs the image. Short QA answers are always right, as in curated VQA data.

Judging. parse reads an answer sentence by sentence into claims (a count, object mentions with
their colour, size and position, relations between two objects); check matches mentions to scene
objects and gives each claim a verdict of type object, attribute, count or relation (position
phrases count as relations, as in the paper's "position" type); correct rewrites only the wrong
words, so that a token diff of the two answers (ddpo.token_weights) marks exactly the correction.

    python -m pytest tests/test_world.py -q
"""
import itertools
import json
import random
import re
from collections import namedtuple
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {"red": (214, 39, 40), "green": (34, 150, 52), "blue": (31, 90, 220),
           "yellow": (232, 196, 16), "purple": (140, 60, 190), "orange": (245, 130, 20)}
SIZES = ("small", "large")
STEREOTYPE = {"circle": "red", "square": "blue", "triangle": "green", "diamond": "purple",
              "cross": "orange"}
NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
BACKGROUND = (245, 245, 240)

# Positions are named by the third of the image they fall in, so that any grid size has the same
# nine names; on the default 3x3 grid each name is one cell.
PLACES = {(0, 0): "in the top left", (0, 1): "at the top", (0, 2): "in the top right",
          (1, 0): "on the left", (1, 1): "in the center", (1, 2): "on the right",
          (2, 0): "in the bottom left", (2, 1): "at the bottom", (2, 2): "in the bottom right"}
_REGION = {p.split(" the ")[1]: r for r, p in PLACES.items()} | {"middle": (1, 1), "centre": (1, 1)}
RELATIONS = {"to the left of": lambda a, b: a.col < b.col,
             "to the right of": lambda a, b: a.col > b.col,
             "above": lambda a, b: a.row < b.row, "below": lambda a, b: a.row > b.row}

DESCRIBE_PROMPTS = ("Describe this image in detail.", "What do you see in this picture?",
                    "Give a detailed description of the image.",
                    "Tell me everything that is in the image.", "Explain what this picture shows.",
                    "Can you describe the scene thoroughly?")
_COUNT_SENTENCES = ("There {be} {n} object{s}.", "I can see {n} shape{s}.",
                    "The image shows {n} shape{s}.")
_OBJECT_SENTENCES = ("There is a {obj} {place}.", "{Place}, there is a {obj}.",
                     "A {obj} is {place}.", "I see a {obj} {place}.")


Obj = namedtuple("Obj", "shape colour size row col")


@dataclass(frozen=True)
class Scene:
    grid: int
    objects: tuple  # of Obj in reading order, so that equal scenes compare (and hash) equal

    def to_json(self):  # {"grid": 3, "objects": [["circle", "red", "small", 0, 2], ...]}
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text):
        d = json.loads(text)
        return Scene(d["grid"], tuple(Obj(*o) for o in d["objects"]))


def _random_scene(rng, grid):
    cells = [(r, c) for r in range(grid) for c in range(grid)]
    cells = sorted(rng.sample(cells, rng.randint(1, min(4, len(cells)))))
    return Scene(grid, tuple(Obj(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(SIZES),
                                 r, c) for r, c in cells))


def make_world(seed, n_train, n_test, grid=3):
    """(train, test) scene lists; no test scene is in train, and no two test scenes are equal.
    The test scenes are drawn first, so that they do not change with n_train."""
    rng = random.Random(seed)
    test = []
    while len(test) < n_test:
        scene = _random_scene(rng, grid)
        if scene not in test:
            test.append(scene)
    held_out, train = set(test), []
    while len(train) < n_train:
        scene = _random_scene(rng, grid)
        if scene not in held_out:
            train.append(scene)
    return train, test


def render(scene, size=48):
    """The scene as an RGB image: flat shapes on a plain background, each centred in its cell."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cell = size / scene.grid
    for o in scene.objects:
        x, y = (o.col + 0.5) * cell, (o.row + 0.5) * cell
        r = cell * (0.46 if o.size == "large" else 0.25)  # 15 vs 8 px wide at 48 px
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif o.shape == "square":
            draw.rectangle((x - 0.85 * r, y - 0.85 * r, x + 0.85 * r, y + 0.85 * r), fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(x, y - r), (x + r, y + 0.8 * r), (x - r, y + 0.8 * r)], fill=fill)
        elif o.shape == "diamond":
            draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
        else:  # cross
            draw.rectangle((x - r, y - 0.3 * r, x + r, y + 0.3 * r), fill=fill)
            draw.rectangle((x - 0.3 * r, y - r, x + 0.3 * r, y + r), fill=fill)
    return img


# ------------------------------------------------------------------------------------ language

def _third(i, grid):
    return 0 if 2 * i + 1 < grid else 1 if 2 * i + 1 == grid else 2


def _place(o, grid):
    return PLACES[_third(o.row, grid), _third(o.col, grid)]


def _count_sentence(n, template):
    return template.format(be="is" if n == 1 else "are", n=NUMBERS[n - 1], s="s" * (n != 1))


def _true_relation(a, b, said):
    """The relation phrase that holds from a to b, on the axis of `said` if they differ on it."""
    cols = "to the left of" if a.col < b.col else "to the right of" if a.col > b.col else None
    rows = "above" if a.row < b.row else "below" if a.row > b.row else None
    return (cols or rows) if said in ("to the left of", "to the right of") else (rows or cols)


def _unique(scene, o):
    return [(p.shape, p.colour) for p in scene.objects].count((o.shape, o.colour)) == 1


def describe(scene, rng):
    """A correct detailed description: a count, one sentence per object, maybe one relation."""
    out = [_count_sentence(len(scene.objects), rng.choice(_COUNT_SENTENCES))]
    for o in scene.objects:
        place = _place(o, scene.grid)
        out.append(rng.choice(_OBJECT_SENTENCES).format(
            obj=f"{o.size} {o.colour} {o.shape}", place=place, Place=place.capitalize()))
    named = [o for o in scene.objects if _unique(scene, o)]
    # Only in small scenes: answer length is what the CPU pays for, per token, at every step.
    if len(scene.objects) <= 3 and len(named) >= 2 and rng.random() < 0.5:
        a, b = rng.sample(named, 2)
        rel = _true_relation(a, b, rng.choice(list(RELATIONS)))
        out.append(f"The {a.colour} {a.shape} is {rel} the {b.colour} {b.shape}.")
    return " ".join(out)


def _qa(scene, rng):
    """A short question about the scene and its correct answer."""
    o, kind = rng.choice(scene.objects), rng.randrange(4)
    if kind == 0:
        n = len(scene.objects)
        return "How many objects are there?", _count_sentence(n, _COUNT_SENTENCES[0])
    if kind == 1 and [p.shape for p in scene.objects].count(o.shape) == 1:
        return f"What colour is the {o.shape}?", f"The {o.shape} is {o.colour}."
    if kind == 2 and _unique(scene, o):
        where = _place(o, scene.grid)
        return f"Where is the {o.colour} {o.shape}?", f"The {o.colour} {o.shape} is {where}."
    shape = rng.choice(SHAPES)
    for o in scene.objects:
        if o.shape == shape:
            return (f"Is there a {shape}?",
                    f"Yes, there is a {o.size} {o.colour} {shape} {_place(o, scene.grid)}.")
    return f"Is there a {shape}?", f"No, there is no {shape}."


def _careless(scene, rng, p_cooc, p_noise):
    """The scene as the careless captioner of the module docstring believes it to be."""
    objs, grid = list(scene.objects), scene.grid
    taken = {(o.row, o.col) for o in objs}
    free = [(r, c) for r in range(grid) for c in range(grid) if (r, c) not in taken]
    shapes = {o.shape for o in objs}
    if "square" in shapes and "triangle" not in shapes and free and rng.random() < p_cooc:
        r, c = rng.choice(free)
        objs.append(Obj("triangle", STEREOTYPE["triangle"], rng.choice(SIZES), r, c))
    elif rng.random() >= p_noise:
        return scene
    elif rng.random() < 0.5:
        if off := [i for i, o in enumerate(objs) if o.colour != STEREOTYPE[o.shape]]:
            i = rng.choice(off)
            objs[i] = objs[i]._replace(colour=STEREOTYPE[objs[i].shape])
    elif movable := [i for i, o in enumerate(objs) if (o.row, grid - 1 - o.col) in free]:
        i = rng.choice(movable)
        objs[i] = objs[i]._replace(col=grid - 1 - objs[i].col)
    return Scene(grid, tuple(sorted(objs, key=lambda o: (o.row, o.col))))


def sft_examples(scenes, rng, p_noise=0.35, p_cooc=0.9, p_qa=0.25):
    """One (scene_idx, question, answer) per scene: with probability p_qa a short QA pair, else a
    detailed description by the careless captioner of the module docstring.
    The noise is drawn afresh at each call: call once per epoch for new captions."""
    out = []
    for i, scene in enumerate(scenes):
        if rng.random() < p_qa:
            out.append((i, *_qa(scene, rng)))
        else:
            prompt = rng.choice(DESCRIBE_PROMPTS)  # before the noise: the README's numbers use this draw order
            out.append((i, prompt, describe(_careless(scene, rng, p_cooc, p_noise), rng)))
    return out


def corpus(scenes, rng):
    """Tokenizer text: the prompts, and per scene a true and a careless description, a QA pair."""
    lines = list(DESCRIBE_PROMPTS)
    for scene in scenes:
        lines += [describe(scene, rng), describe(_careless(scene, rng, 1.0, 1.0), rng), *_qa(scene, rng)]
    return lines


# ----------------------------------------------------------------------------- parse and judge

# Words of an answer with their character spans, and the claims made of them. A Mention's words
# that were not said are None; `where` is the (row, col) third its place names; `sentence` is the
# (start, end) of its sentence, which is deleted when nothing true can take the claim's place.
Span = namedtuple("Span", "text start end")
Mention = namedtuple("Mention", "shape colour size place where sentence")  # a small red circle ...
Count = namedtuple("Count", "n phrase verb noun sentence")  # (There) are three objects
Relation = namedtuple("Relation", "a rel b sentence")  # The red circle | is above | the blue square
# type: object, attribute, count or relation; claim: the Span of the words judged (what a report
# marks); edits: (start, end, new text)
Verdict = namedtuple("Verdict", "type claim ok edits")


def _words(words):
    return re.compile(r"\b(" + "|".join(words) + r")\b", re.IGNORECASE)


_SHAPE_RE, _COLOUR_RE, _SIZE_RE, _RELATION_RE = map(_words, (SHAPES, COLOURS, SIZES, RELATIONS))
_NEGATION_RE = _words(("no", "not", "none", "nothing", "without"))
_PLACE_RE = re.compile(  # longest names first, so that "top left" is not read as "top"
    r"\b(?:in|at|on) the (" + "|".join(sorted(_REGION, key=len, reverse=True)) + r")\b", re.I)
_COUNT_RE = re.compile(r"\b(?:(is|are) )?(" + "|".join(NUMBERS) + r") (object|shape)s?\b", re.I)


def _span(m):
    return Span(m.group(), m.start(), m.end()) if m else None


def _mention(answer, start, end, sentence):
    shapes = list(_SHAPE_RE.finditer(answer, start, end))
    if len(shapes) != 1:  # several objects in one clause: nothing the templates teach
        return None
    place = _PLACE_RE.search(answer, start, end)
    return Mention(_span(shapes[0]), _span(_COLOUR_RE.search(answer, start, end)),
                   _span(_SIZE_RE.search(answer, start, end)), _span(place),
                   _REGION[place.group(1).lower()] if place else None, sentence)


def parse(answer):
    """The claims of a free-form answer, in order. A sentence that fits no pattern, or that denies
    something ("there is no triangle"), makes no claim."""
    claims = []
    for m in re.finditer(r"[^.!?]+[.!?]?", answer):
        start, end = m.start() + len(m.group()) - len(m.group().lstrip()), m.end()
        if start == end or _NEGATION_RE.search(answer, start, end):
            continue
        count, rel = _COUNT_RE.search(answer, start, end), _RELATION_RE.search(answer, start, end)
        if count:
            n = NUMBERS.index(count.group(2).lower()) + 1
            claims.append(Count(n, _span(count), count.group(1), count.group(3), (start, end)))
        elif rel:
            a = _mention(answer, start, rel.start(), (start, end))
            b = _mention(answer, rel.end(), end, (start, end))
            if a and b:
                claims.append(Relation(a, _span(rel), b, (start, end)))
        elif mention := _mention(answer, start, end, (start, end)):
            claims.append(mention)
    return claims


def _like(old, new):
    """`new`, capitalised if `old` was: a correction at the start of a sentence stays one."""
    return new[:1].upper() + new[1:] if old[:1].isupper() else new


def _fit(m, o, grid):
    # Colour tells objects apart best, then size, then position.
    return (4 * (m.colour is not None and m.colour.text.lower() == o.colour)
            + 2 * (m.size is not None and m.size.text.lower() == o.size)
            + (m.place is not None and m.where == (_third(o.row, grid), _third(o.col, grid))))


def _match(scene, mentions):
    """{mention: object} of the same shape, each object described at most once, as many pairs as
    the shapes allow, with the greatest total fit. Not greedy: with a greedy match, correcting one
    mention could change which object another one wins, so corrections would not check clean."""
    owner = {}
    for shape in SHAPES:
        said = [m for m in mentions if m.shape.text.lower() == shape]
        objs = [o for o in scene.objects if o.shape == shape]
        said += [None] * (len(objs) - len(said))  # so that each mention can go to each object
        best = max(itertools.permutations(said, len(objs)),
                   key=lambda p: sum(_fit(m, o, scene.grid) for m, o in zip(p, objs) if m))
        owner.update((m, o) for m, o in zip(best, objs) if m)
    return owner


def _attributes(m, o, grid):
    """Verdicts on what mention m says about the object o it refers to, each with its fix."""
    out = []
    for kind, span, truth in (("attribute", m.colour, o.colour), ("attribute", m.size, o.size),
                              ("relation", m.place, _place(o, grid))):
        if span:
            ok = (PLACES[m.where] if kind == "relation" else span.text.lower()) == truth
            fix = ((span.start, span.end, _like(span.text, truth)),)
            out.append(Verdict(kind, span, ok, () if ok else fix))
    return out


def _drop(answer, sentence):
    """The edit deleting a sentence and the space after it (before it, for the last one)."""
    start, end = sentence
    while end < len(answer) and answer[end].isspace():
        end += 1
    while end == len(answer) and start > 0 and answer[start - 1].isspace():
        start -= 1
    return start, end, ""


def _judge(scene, answer):
    """(claims, verdicts, how many scene objects the answer describes without error)."""
    claims, grid, n = parse(answer), scene.grid, len(scene.objects)
    owner = _match(scene, [c for c in claims if isinstance(c, Mention)])
    spare = [o for o in scene.objects if o not in owner.values()]  # to replace invented objects
    verdicts, covered = [], 0
    for c in claims:
        if isinstance(c, Count):
            fixed = f"{'is' if n == 1 else 'are'} " * bool(c.verb) + f"{NUMBERS[n - 1]} {c.noun}"
            fix = ((c.phrase.start, c.phrase.end, _like(c.phrase.text, fixed + "s" * (n != 1))),)
            verdicts.append(Verdict("count", c.phrase, c.n == n, () if c.n == n else fix))
        elif isinstance(c, Mention) and c in owner:
            said = [Verdict("object", c.shape, True, ())] + _attributes(c, owner[c], grid)
            verdicts += said
            covered += all(v.ok for v in said)
        elif isinstance(c, Mention):  # no such object: describe one the answer left out, or drop it
            fix = (_drop(answer, c.sentence),)
            if spare:
                o = spare.pop(0)
                new = zip((c.shape, c.colour, c.size, c.place),
                          (o.shape, o.colour, o.size, _place(o, grid)))
                fix = tuple((s.start, s.end, _like(s.text, t)) for s, t in new if s)
            verdicts.append(Verdict("object", c.shape, False, fix))
        else:  # a relation refers back to two different objects, without using them up
            pairs = [(a, b) for a in scene.objects for b in scene.objects if a != b
                     and (a.shape, b.shape) == (c.a.shape.text.lower(), c.b.shape.text.lower())]
            if not pairs:
                shapes = {o.shape for o in scene.objects}
                gone = c.a if c.a.shape.text.lower() not in shapes else c.b
                fix = (_drop(answer, c.sentence),)
                verdicts.append(Verdict("object", gone.shape, False, fix))
                continue
            a, b = max(pairs, key=lambda p: _fit(c.a, p[0], grid) + _fit(c.b, p[1], grid))
            verdicts += _attributes(c.a, a, grid) + _attributes(c.b, b, grid)
            said = c.rel.text.lower()
            ok = RELATIONS[said](a, b)
            fix = ((c.rel.start, c.rel.end, _like(c.rel.text, _true_relation(a, b, said))),)
            verdicts.append(Verdict("relation", c.rel, ok, () if ok else fix))
    return claims, verdicts, covered


def check(scene, answer):
    """A Verdict for each claim of the answer, in the answer's order."""
    return _judge(scene, answer)[1]


def correct(scene, answer):
    """The automatic annotator: the answer with only its hallucinated words replaced (or, where
    nothing true can take their place, their sentences deleted); None if nothing is hallucinated."""
    # Longest first at equal starts, so that a deleted sentence swallows the edits inside it.
    edits = sorted((e for v in check(scene, answer) if not v.ok for e in v.edits),
                   key=lambda e: (e[0], -e[1]))
    if not edits:
        return None
    out, at = [], 0
    for start, end, text in edits:
        if end > at:  # two deleted sentences may both claim the space between them
            out += [answer[at:start], text]
            at = end
    return "".join(out) + answer[at:]


TYPES = ("object", "attribute", "count", "relation")
# Each rate of score as (numerator, denominator): keys of outcomes, summed over the answers (None:
# the number of answers). Every rate is a ratio of sums, so resampling scenes recomputes it.
RATES = {"response_rate": ("hallucinated", "mentions"), "mention_rate": ("invented", "said"),
         **{t: (t, None) for t in TYPES}, "coverage": ("coverage", None)}


def outcomes(scenes, answers):
    """What score counts in each answer, one dict per (scene, answer):
    mentions, hallucinated   1 if the answer mentions an object; 1 if it also has a hallucination;
    said, invented           distinct object words (as CHAIR_i counts them); those not in the scene;
    object, ..., relation    1 if the answer has a hallucination of that type;
    coverage                 share of the scene's objects described without error."""
    out = []
    for scene, answer in zip(scenes, answers, strict=True):
        claims, verdicts, covered = _judge(scene, answer)
        shapes = {m.shape.text.lower() for c in claims if not isinstance(c, Count)
                  for m in ((c.a, c.b) if isinstance(c, Relation) else (c,))}
        wrong = {v.type for v in verdicts if not v.ok}
        out.append({"mentions": int(bool(shapes)), "hallucinated": int(bool(shapes and wrong)),
                    "said": len(shapes), "invented": len(shapes - {o.shape for o in scene.objects}),
                    **{t: int(t in wrong) for t in TYPES}, "coverage": covered / len(scene.objects)})
    return out


def score(scenes, answers):
    """Object HalBench-style rates, as plain floats, over answers to DESCRIBE_PROMPTS:
    response_rate  answers with a hallucination / answers that mention an object;
    mention_rate   invented object words / object words (distinct per answer, as CHAIR_i counts);
    object, attribute, count, relation   answers with a hallucination of that type / all answers;
    coverage       mean share of the scene's objects described without error, so that saying
                   less cannot pass for hallucinating less."""
    per = outcomes(scenes, answers)
    return {name: rate(per, name) for name in RATES} | {"n": len(per)}


def rate(per, name):
    """A rate of RATES over outcomes (of one run, or pooled over several); over nothing, 0.0."""
    num, den = RATES[name]
    total = lambda key: sum(o[key] for o in per) if key else len(per)
    return total(num) / max(total(den), 1)
