"""The miniature RLHF-V end to end, at toy sizes: every stage runs and writes its artefacts, the
report shows what the scorer and the DDPO loss see, and the evaluation decodes greedily unless told
to decode as RLHF-V did."""
import json
import os
import re
import shutil
from dataclasses import replace
from html.parser import HTMLParser

import pytest
from safetensors import safe_open

import cli
import ddpo
from miniature import report
from miniature import rlhfv
import train
from miniature import world
from data import Tokenizer, answer_ids, prompt_ids


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """One toy run, through the sweep (--seeds=0): the run itself is in <out_dir>/seed0."""
    out = tmp_path_factory.mktemp("toy")
    given = dict(out_dir=str(out), model="tiny", image_size=32, n_train=64, n_test=12, vision_steps=20,
                 sft_steps=150, sft_lr=3e-3, steps=2, batch_size=4, log_every=1, device="cpu", ablation=True,
                 seeds="0")
    cfg = rlhfv.settle(train.TrainConfig(**given), given)  # as train.py's main does for stage rlhfv
    rlhfv.sweep(cfg, train.train)
    return replace(cfg, out_dir=str(out / "seed0"), seeds="")


def test_the_miniature_sets_its_own_values_under_the_options_given():
    """TrainConfig's defaults are the paper's; stage rlhfv takes MINIATURE's for the options not on
    the command line, and --help names the miniature's value beside each default it changes."""
    assert (train.TrainConfig.lr, train.TrainConfig.average, train.TrainConfig.steps) == (5e-7, True, 320)
    argv = ["--lr=1e-4", "--seed=3"]
    cfg = rlhfv.settle(cli.parse_args(train.TrainConfig, argv), cli.given(argv))
    assert (cfg.lr, cfg.average, cfg.steps, cfg.seed) == (1e-4, False, 200, 3)
    help_lines = cli.help_text(train.TrainConfig).splitlines()
    for key, value in rlhfv.MINIATURE.items():
        line = next(line for line in help_lines if line.strip().startswith(f"--{key}="))
        named = re.search(r"miniature: ([\w.+-]+)", line)
        assert named and (named.group(1) == str(value) if type(value) is bool
                          else type(value)(named.group(1)) == value), line


def test_each_query_learns_what_its_cell_holds_which_cell_and_which_object():
    """A red small circle at (0, 2) and a blue large square at (1, 0). KINDS is shape x colour x
    size (5 x 6 x 2), so the circle is kind 0 and the square 1 * 12 + 2 * 2 + 1 = 17 (what = 1 + kind);
    in reading order the circle (cell 2) is object 1 and the square (cell 3) object 2."""
    circle, square = world.Obj("circle", "red", "small", 0, 2), world.Obj("square", "blue", "large", 1, 0)
    images, targets = rlhfv.vision_targets([world.Scene(3, (circle, square))], 48)
    assert images.shape == (1, 3, 48, 48) and targets.shape == (1, 9, 3)
    what, where, number = targets[0].T.tolist()
    assert what == [0, 0, 1, 18, 0, 0, 0, 0, 0]
    assert where == list(range(9))
    assert number == [0, 0, 1, 2, 0, 0, 0, 0, 0]


def test_miniature_runs_every_stage_and_writes_every_artefact(toy):
    """world + tokenizer -> vision pre-training -> SFT -> collect + correct -> DDPO, vanilla DPO and SFT on
    the corrected answers, twice (--rounds) -> evaluation -> results.json, report.png and report.html;
    a second call finds every stage finished and only rewrites the report."""
    out = os.path.dirname(toy.out_dir)
    for f in ("world/tokenizer.model", "world/sft.jsonl", "world/images/test11.png", "vision/config.json",
              "sft/config.json",
              "collect/pairs.jsonl", "collect/ref_logps.safetensors", "ddpo/model.safetensors",
              "dpo/model.safetensors", "sft_corrected/model.safetensors", "ddpo/eval.json",
              "report.png", "report.html", "timings.json"):
        assert os.path.exists(os.path.join(toy.out_dir, f)), f
    for f in ("sweep.json", "sweep.md", "report.html"):
        assert os.path.exists(os.path.join(out, f)), f
    with open(os.path.join(toy.out_dir, "results.json")) as f:
        results = json.load(f)
    assert set(results) == {"sft", "ddpo", "dpo", "sft_corrected"}
    assert {"response_rate", "mention_rate", "coverage", "object", "attribute", "count",
            "relation"} <= set(results["ddpo"]) and results["ddpo"]["n"] == 12
    assert set(results["ddpo"]["ci"]) == set(world.RATES)
    assert set(results["ddpo"]["vs"]) == {"sft", "dpo", "sft_corrected"}
    with open(os.path.join(toy.out_dir, "timings.json")) as f:
        stages = set(json.load(f))
    assert {"world", "vision", "sft", "collect", "ddpo", "dpo", "sft_corrected", "evaluate sft"} <= stages
    # two rounds (the default): each arm's second round collects from, starts from and is referenced
    # to its own first-round model
    for arm in ("ddpo", "dpo", "sft_corrected"):
        assert {f"{arm}_round1", f"collect_{arm}_round2"} <= stages
        assert os.path.exists(os.path.join(toy.out_dir, f"collect_{arm}_round2", "pairs.jsonl"))
    for arm in ("ddpo", "dpo"):
        with safe_open(os.path.join(toy.out_dir, f"collect_{arm}_round2", "ref_logps.safetensors"), "pt") as f:
            assert f.metadata()["init"] == os.path.join(toy.out_dir, f"{arm}_round1")
    with safe_open(os.path.join(toy.out_dir, "collect", "ref_logps.safetensors"), "pt") as f:
        assert f.metadata()["init"] == os.path.join(toy.out_dir, "sft")
    stamp = os.stat(os.path.join(toy.out_dir, "ddpo", "model.safetensors")).st_mtime_ns
    rlhfv.run(toy, train.train)
    assert os.stat(os.path.join(toy.out_dir, "ddpo", "model.safetensors")).st_mtime_ns == stamp


class Page(HTMLParser):
    """What the tests read of report.html: section titles, notes, the marks in each answer
    {(scene, model): n} and the tokens of each pair {(pair, side): [highlighted?, ...]}."""

    def __init__(self, path):
        super().__init__()
        self.sections, self.notes, self.marks, self.tokens, self.images = [], [], {}, {}, 0
        self.text, self.answer, self.pair = None, None, None
        with open(path) as f:
            self.feed(f.read())

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "h2" or (tag == "p" and a.get("class") == "note"):
            self.text = self.sections if tag == "h2" else self.notes
            self.text.append("")
        elif tag == "p" and a.get("class") == "answer":
            self.answer = (int(a["data-scene"]), a["data-model"])
            self.marks[self.answer] = 0
        elif tag == "mark" and self.answer:
            self.marks[self.answer] += 1
        elif tag == "div" and "data-pair" in a:
            self.pair = int(a["data-pair"])
        elif tag == "span" and "data-side" in a:
            self.tokens.setdefault((self.pair, a["data-side"]), []).append("g" in a["class"].split())
        elif tag == "img":
            assert a["src"].startswith("data:image/png;base64,")
            self.images += 1

    def handle_endtag(self, tag):
        if tag in ("h2", "p"):
            self.text = self.answer = None

    def handle_data(self, data):
        if self.text is not None:
            self.text[-1] += data


def test_report_page_marks_what_the_scorer_counts_and_weighs_what_ddpo_weighs(toy):
    page = Page(os.path.join(toy.out_dir, "report.html"))
    assert page.sections == ["Hallucination rates", "Held-out scenes, side by side",
                             "What DDPO learns from: the corrected segments weigh \u03b3", "Training"]
    assert page.notes == []
    # 12 held-out scenes, each with the SFT and the DDPO answer, marks = the checker's wrong claims
    _, scenes = world.make_world(toy.seed, toy.n_train, toy.n_test)
    assert len({scene for scene, _ in page.marks}) == 12
    for (i, model), marks in page.marks.items():
        with open(os.path.join(toy.out_dir, model, "eval.json")) as f:
            answer = json.load(f)["answers"][i]
        assert marks == sum(not v.ok for v in world.check(scenes[i], answer)), (i, model)
    assert sum(page.marks.values()) > 0
    # the highlighted tokens of each pair are those token_weights gives gamma, prompt in front
    tok = Tokenizer(os.path.join(toy.out_dir, "world", "tokenizer.model"))
    with open(os.path.join(toy.out_dir, "collect", "pairs.jsonl")) as f:
        pairs = [json.loads(line) for line in f]
    with open(os.path.join(toy.out_dir, "sft", "config.json")) as f:
        n_query = json.load(f)["n_query"]
    shown = sorted({p for p, _ in page.tokens})
    assert len(shown) == 4
    for i in shown:
        prompt = prompt_ids(tok, pairs[i]["question"], n_query)
        c, r = answer_ids(tok, pairs[i]["chosen"]), answer_ids(tok, pairs[i]["rejected"])
        wc, wr = ddpo.token_weights(prompt + c, prompt + r, toy.gamma, toy.min_match)
        assert page.tokens[i, "chosen"] == [w == toy.gamma for w in wc[len(prompt):].tolist()]
        assert page.tokens[i, "rejected"] == [w == toy.gamma for w in wr[len(prompt):].tolist()]
    assert page.images == 12 + 4


def test_report_leaves_out_what_is_missing_with_a_note(toy, tmp_path):
    """A missing arm, log or pairs file at the end of a long run costs its part of the page, not the run."""
    out = tmp_path / "run"
    shutil.copytree(toy.out_dir, out, ignore=shutil.ignore_patterns("*.safetensors", "ckpt-*"))
    os.remove(out / "ddpo" / "log.jsonl")
    os.remove(out / "collect" / "pairs.jsonl")
    cfg = replace(toy, out_dir=str(out))
    _, scenes = world.make_world(cfg.seed, cfg.n_train, cfg.n_test)
    answers = {}
    for m in ("sft", "ddpo", "sft_corrected"):
        with open(out / m / "eval.json") as f:
            answers[m] = json.load(f)["answers"]
    results = report.write(cfg, scenes, {**answers, "dpo": None})
    assert list(results) == ["sft", "ddpo", "sft_corrected"]
    page = Page(out / "report.html")
    assert len(page.sections) == 4
    assert page.notes[0] == "vanilla DPO: no evaluation, left out."
    assert page.notes[1].startswith("Left out: FileNotFoundError:") and "pairs.jsonl" in page.notes[1]
    assert page.notes[2] == "DDPO: no readable training log, left out of the plots."
    # without SFT's answers there is nothing to put side by side
    report.write(cfg, scenes, {"sft": None, "ddpo": answers["ddpo"]})
    assert Page(out / "report.html").notes[:2] == [
        "SFT: no evaluation, left out.", "Left out: ValueError: needs the answers of SFT and of an arm"]


def test_paper_decoding_evaluates_with_rlhfvs_beams(tmp_path, tok, init_ckpt, monkeypatch):
    """Held-out answers are greedy by default; --paper_decoding (one option, for every arm) gives
    them by RLHF-V's 3 beams and repetition penalty 1.1, cached apart from the greedy ones."""
    _, scenes = world.make_world(0, 0, 2)
    os.makedirs(tmp_path / "world" / "images")
    for i, scene in enumerate(scenes):
        world.render(scene, 32).save(tmp_path / "world" / "images" / f"test{i}.png")
    calls, generate = [], rlhfv.generate
    monkeypatch.setattr(rlhfv, "generate", lambda *args, **kw: calls.append(kw) or generate(*args, **kw))
    for paper in (False, True):
        rlhfv.evaluate(train.TrainConfig(out_dir=str(tmp_path), device="cpu", paper_decoding=paper), tok,
                       str(init_ckpt), scenes)
    assert calls == [{"max_new_tokens": 96},
                     {"max_new_tokens": 96, "num_beams": 3, "repetition_penalty": 1.1}]
    assert (init_ckpt / "eval.json").exists() and (init_ckpt / "eval_paper_decoding.json").exists()


def test_ranking_annotator_prefers_fewer_wrong_claims_and_drops_ties():
    """A red small circle top right and a blue large square on the left. `right` makes no wrong claim,
    `green` one (the square's colour), `green3` two (also the count), `left` one (the circle's
    place): fewer wins in either order; one error against another of another kind is a tie."""
    scene = world.Scene(3, (world.Obj("circle", "red", "small", 0, 2), world.Obj("square", "blue", "large", 1, 0)))
    right = ("There are two objects. There is a small red circle in the top right. "
             "There is a large blue square on the left.")
    green = right.replace("blue", "green")
    green3 = green.replace("two", "three")
    left = right.replace("top right", "top left")
    assert [rlhfv.wrong_claims(scene, a) for a in (right, green, green3, left)] == [0, 1, 2, 1]
    assert rlhfv.rank(scene, right, green) == rlhfv.rank(scene, green, right) == (right, green)
    assert rlhfv.rank(scene, green3, green) == (green, green3)
    assert rlhfv.rank(scene, green, left) is None
    assert rlhfv.rank(scene, right, right) is None


def test_n_pairs_takes_a_fixed_seeded_nested_subset(tmp_path):
    a, b = rlhfv.nested_subset(1000, 250, 0), rlhfv.nested_subset(1000, 500, 0)
    assert len(a) == 250 and len(b) == 500 and set(a) < set(b) and a == sorted(a)
    assert rlhfv.nested_subset(1000, 250, 0) == a and rlhfv.nested_subset(1000, 250, 1) != a
    assert rlhfv.nested_subset(10, 0, 0) == rlhfv.nested_subset(10, 20, 0) == list(range(10))
    # the capped files of a collection: the same rows of pairs.jsonl and pairs_sft.jsonl
    rows = [{"image": f"i{i}.png", "question": "q", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(10)]
    rlhfv.write_jsonl(str(tmp_path / "pairs.jsonl"), rows)
    rlhfv.write_jsonl(str(tmp_path / "pairs_sft.jsonl"), [{**r, "answer": r["chosen"]} for r in rows])
    cfg = train.TrainConfig(seed=3)
    assert rlhfv.capped(cfg, str(tmp_path), "pairs") == (str(tmp_path / "pairs.jsonl"),
                                                         str(tmp_path / "ref_logps.safetensors"))
    kept = {}
    for n in (4, 8):
        for name in ("pairs", "pairs_sft"):
            path, ref = rlhfv.capped(replace(cfg, n_pairs=n), str(tmp_path), name)
            assert ref == str(tmp_path / f"ref_logps_n{n}.safetensors")
            with open(path) as f:
                kept[n, name] = [json.loads(line)["chosen"] for line in f]
        assert kept[n, "pairs"] == kept[n, "pairs_sft"] == [f"c{i}" for i in rlhfv.nested_subset(10, n, 3)]
    assert set(kept[4, "pairs"]) < set(kept[8, "pairs"])


def test_scaling_summary_pools_over_seeds_with_a_row_per_arm_size_and_seed():
    """Two seeds of 4 scenes; an answer either mentions nothing, or hallucinates or not. Pooled DDPO
    at 1 pair: 1 + 0 hallucinated of 3 + 4 mentioning = 1/7; rankings at 1: 2 + 2 of 4 + 4 = 4/8."""
    def per(hallucinated, mentions, coverage=1.0):
        return [{"mentions": int(i < mentions), "hallucinated": int(i < hallucinated), "coverage": coverage}
                for i in range(4)]
    outcomes = {("sft", 0, 0): per(3, 4), ("sft", 0, 1): per(3, 4),
                ("ddpo", 1, 0): per(1, 3), ("ddpo", 1, 1): per(0, 4), ("ddpo", 2, 0): per(0, 4),
                ("ddpo", 2, 1): per(0, 4), ("dpo_rankings", 1, 0): per(2, 4, 0.5),
                ("dpo_rankings", 1, 1): per(2, 4, 0.5), ("dpo_rankings", 2, 0): per(1, 4),
                ("dpo_rankings", 2, 1): per(1, 4)}
    pairs = {k: k[1] for k in outcomes if k[0] != "sft"}
    summary = report.scaling_summary(outcomes, pairs)
    assert sorted((r["arm"], r["size"], r["seed"]) for r in summary["rows"]) == sorted(pairs)
    pooled = {(p["arm"], p["size"]): p for p in summary["pooled"]}
    assert pooled["ddpo", 1]["response_rate"][0] == pytest.approx(1 / 7)
    assert pooled["dpo_rankings", 1]["response_rate"][0] == pytest.approx(4 / 8)
    assert pooled["dpo_rankings", 1]["coverage"][0] == pytest.approx(0.5)
    assert summary["sft"]["response_rate"][0] == pytest.approx(6 / 8)
    assert [(d["corrections"], d["rankings"]) for d in summary["vs"]] == [(1, 1), (1, 2), (2, 2)]
    assert summary["vs"][0]["response_rate"][0] == pytest.approx(1 / 7 - 4 / 8)
    assert summary["vs"][0]["coverage"][0] == pytest.approx(0.5)
    # along a curve, the larger size minus the smaller: DDPO 0/8 - 1/7, rankings 2/8 - 4/8
    along = {(d["arm"], d["from"], d["to"]): d for d in summary["along"]}
    assert along.keys() == {("ddpo", 1, 2), ("dpo_rankings", 1, 2)}  # two sizes: no extra largest-smallest row
    assert along["ddpo", 1, 2]["response_rate"][0] == pytest.approx(0 - 1 / 7)
    assert along["dpo_rankings", 1, 2]["response_rate"][0] == pytest.approx(2 / 8 - 4 / 8)
    assert along["dpo_rankings", 1, 2]["coverage"][0] == pytest.approx(0.5)
    assert "| DPO on rankings | 1 -> 2 | -25.0 [" in report.scaling_markdown(summary)


def test_scaling_sweep_trains_both_arms_at_each_size(toy, tmp_path):
    """--scaling on the toy run's cached stages (world, tower, SFT, corrections): the rankings are
    collected once, each arm trains at each size on that many pairs, and the summary has one row
    per (arm, size, seed)."""
    for d in ("world", "vision", "sft", "collect"):
        shutil.copytree(os.path.join(toy.out_dir, d), tmp_path / "seed0" / d)
    cfg = replace(toy, out_dir=str(tmp_path), seeds="0", scaling="4,8", rounds=1)
    summary = rlhfv.scaling(cfg, train.train)
    assert sorted((r["arm"], r["size"], r["seed"]) for r in summary["rows"]) == [
        ("ddpo", 4, 0), ("ddpo", 8, 0), ("dpo_rankings", 4, 0), ("dpo_rankings", 8, 0)]
    with open(tmp_path / "seed0" / "collect_rankings" / "pairs.jsonl") as f:
        ranked = [json.loads(line) for line in f]
    scenes, _ = world.make_world(0, cfg.n_train, cfg.n_test)
    for row in summary["rows"]:
        data = "collect_rankings" if row["arm"] == "dpo_rankings" else "collect"
        with open(tmp_path / "seed0" / data / f"pairs_n{row['size']}.jsonl") as f:
            assert sum(1 for _ in f) == row["pairs"] <= row["size"]
        assert os.path.exists(tmp_path / "seed0" / f"{row['arm']}_n{row['size']}" / "eval.json")
    for p in ranked:  # the chosen answer has fewer wrong claims than the rejected one
        i = int(p["image"].split("train")[1].split(".")[0])
        assert rlhfv.wrong_claims(scenes[i], p["chosen"]) < rlhfv.wrong_claims(scenes[i], p["rejected"])
    for f in ("scaling.json", "scaling.md", "scaling.svg", "report.html"):
        assert os.path.exists(tmp_path / f), f
    with open(tmp_path / "report.html") as f:
        assert f.read().count("<svg") == 2
