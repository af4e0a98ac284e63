"""The report's statistics, by hand: Wilson intervals, paired and pooled bootstraps; the sweep's
files and report.png from made-up outcomes. The page of a real (toy) run is tested in test_rlhfv.py.
    python -m pytest tests/test_report.py -q
"""
import json
import random
from types import SimpleNamespace

import pytest
from PIL import Image

import stats
from miniature import report
from miniature import world


def test_wilson_by_hand():
    """20 of 100: p = 0.2, z = 1.959964, z^2/n = 0.0384146;
    centre = (p + z^2/2n) / (1 + z^2/n) = 0.2192073 / 1.0384146 = 0.2110980,
    half = z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2) = 1.8874445 * 0.0411826 = 0.0777311,
    so [0.1333669, 0.2888292]. 0 of 10: the lower end is 0 and the upper z^2 / (n + z^2)
    = 3.8414589 / 13.8414589 = 0.2775328. Nothing measured: [0, 1]."""
    assert stats.wilson(20, 100) == pytest.approx((0.1333669, 0.2888292), abs=1e-7)
    assert stats.wilson(0, 10) == pytest.approx((0.0, 0.2775328), abs=1e-7)
    assert stats.wilson(0, 0) == (0.0, 1.0)


def some_outcomes(seed, n=60):
    """Outcomes of true and careless descriptions of n held-out scenes."""
    _, scenes = world.make_world(seed, 0, n)
    rng = random.Random(seed)
    good = [world.describe(s, rng) for s in scenes]
    bad = [world.describe(world._careless(s, rng, 1.0, 1.0), rng) for s in scenes]
    return world.outcomes(scenes, good), world.outcomes(scenes, bad)


def test_identical_answers_differ_by_exactly_zero():
    good, bad = some_outcomes(0)
    results = report.summarise({"sft": bad, "ddpo": bad}, seed=0)
    assert results["ddpo"]["vs"]["sft"] == {r: [0.0, 0.0, 0.0] for r in report.PAIRED}
    assert "vs" not in results["sft"]  # each pair once: an arm minus SFT


def test_results_keep_the_scores_and_add_intervals():
    good, bad = some_outcomes(0)
    results = report.summarise({"sft": bad, "ddpo": good}, seed=0)
    for m, per in (("sft", bad), ("ddpo", good)):
        assert {k: results[m][k] for k in (*world.RATES, "n")} == pytest.approx(
            {**{r: world.rate(per, r) for r in world.RATES}, "n": 60})
        for r, (lo, hi) in results[m]["ci"].items():
            assert lo <= results[m][r] <= hi, (m, r)
    k, n = sum(o["hallucinated"] for o in bad), sum(o["mentions"] for o in bad)
    assert results["sft"]["ci"]["response_rate"] == list(stats.wilson(k, n))
    diff, lo, hi = results["ddpo"]["vs"]["sft"]["response_rate"]
    assert diff == -k / n and lo <= diff <= hi < 0  # true descriptions never hallucinate


def test_bootstrap_is_fixed_by_the_seed():
    good, bad = some_outcomes(1)
    rng = random.Random(1)
    mixed = [rng.choice(pair) for pair in zip(good, bad)]
    one = report.summarise({"sft": bad, "ddpo": mixed}, seed=3)
    assert one == report.summarise({"sft": bad, "ddpo": mixed}, seed=3)
    other = report.summarise({"sft": bad, "ddpo": mixed}, seed=4)
    assert one["ddpo"]["ci"]["coverage"] != other["ddpo"]["ci"]["coverage"]
    assert one["ddpo"]["ci"]["response_rate"] == other["ddpo"]["ci"]["response_rate"]  # Wilson's


def test_pooled_over_two_seeds_resamples_within_each_seed():
    """Seed 0: SFT hallucinates in both of its 2 scenes and describes half of each, DDPO neither and
    all; seed 1: both models in none of 3 scenes, describing all. Pooled: SFT 2/5 against 0/5, and
    coverage (0.5 + 0.5 + 1 + 1 + 1) / 5 = 0.8 against 1. Resampled within each seed, every resample
    keeps 2 scenes of seed 0 and 3 of seed 1, so the differences are -0.4 and +0.2 in all of them
    (resampling the 5 scenes together, the first would range from -1 to 0)."""
    h = lambda x: {"mentions": 1, "hallucinated": x, "coverage": 1 - x / 2}
    runs = {0: {"sft": [h(1), h(1)], "ddpo": [h(0), h(0)]},
            1: {"sft": [h(0)] * 3, "ddpo": [h(0)] * 3}}
    s = report.sweep_summary(runs)
    assert s["per_seed"]["0"]["diff"] == {"ddpo - sft": [-1.0, -1.0, -1.0]}
    assert s["per_seed"]["1"]["diff"] == {"ddpo - sft": [0.0, 0.0, 0.0]}
    assert s["pooled"]["diff"]["ddpo - sft"] == pytest.approx([-0.4, -0.4, -0.4])
    assert s["per_seed"]["0"]["coverage_diff"] == {"ddpo - sft": [0.5, 0.5, 0.5]}
    assert s["pooled"]["coverage_diff"]["ddpo - sft"] == pytest.approx([0.2, 0.2, 0.2])
    assert s["pooled"]["coverage"]["sft"] == pytest.approx([0.8, 0.8, 0.8])
    assert s["pooled"]["rate"]["sft"] == pytest.approx([0.4, *stats.wilson(2, 5)])
    assert stats.wilson(2, 5) == pytest.approx((0.1176208, 0.7692757), abs=1e-7)


def test_sweep_writes_its_table(tmp_path):
    runs = {}
    for seed in (0, 1):
        _, scenes = world.make_world(seed, 0, 30)
        rng = random.Random(seed)
        careless = [world.describe(world._careless(s, rng, 1.0, 1.0), rng) for s in scenes]
        runs[seed] = (scenes, {"sft": careless, "ddpo": [world.describe(s, rng) for s in scenes], "dpo": None})
    cfg = SimpleNamespace(out_dir=str(tmp_path), seed=0, seeds="0,1", device="cpu")
    report.write_sweep(cfg, runs)
    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert summary["seeds"] == [0, 1] and list(summary["pooled"]["diff"]) == ["ddpo - sft"]
    assert list(summary["pooled"]["coverage_diff"]) == ["ddpo - sft"]
    md = (tmp_path / "sweep.md").read_text().splitlines()
    assert md[0].startswith("Response-level hallucination rate") and md[8].startswith("Coverage")
    for table in (md[2:7], md[10:15]):  # header, rule, seeds 0 and 1, pooled
        assert table[0].startswith("| seed | SFT | DDPO | DDPO - SFT |")
        assert [line.split(" | ")[0] for line in table[2:]] == ["| 0", "| 1", "| pooled"]
    assert len(md) == 15
    page = (tmp_path / "report.html").read_text()
    assert 'href="seed0/report.html"' in page and "<script" not in page


def test_draw_png(tmp_path):
    scene = world.Scene(3, (world.Obj("circle", "red", "small", 0, 0),))
    results = report.summarise({"sft": world.outcomes([scene] * 2, ["There is a small green circle."] * 2),
                                "ddpo": world.outcomes([scene] * 2, ["There is a small red circle."] * 2)}, 0)
    panels = {"SFT: loss": ("loss per token", {"sft": [(s, 1 / (1 + s)) for s in range(50)]}),
              "Arms: reward margin": ("margin", {"ddpo": [(1, 0.0), (2, 0.3)], "dpo": [(1, 0.0)]})}
    report.draw_png(tmp_path / "report.png", panels, results)
    img = Image.open(tmp_path / "report.png")
    assert img.size == (1120, 280 + 380) and len(img.convert("RGB").getcolors(100_000)) > 3


def test_scenes_are_picked_reproducibly_worse_first():
    wrong_sft = [1, 1, 0, 2, 0, 3, 1, 0]
    wrong_arm = [0, 1, 1, 0, 0, 2, 0, 0]
    picked = report.pick_scenes(wrong_sft, wrong_arm, seed=0, k=6)
    assert picked == report.pick_scenes(wrong_sft, wrong_arm, seed=0, k=6)
    assert [kind for _, kind in picked] == ["fixed"] * 3 + ["not fixed"] * 2 + ["made worse"]
    assert sorted(i for i, _ in picked) == [0, 1, 2, 3, 5, 6]
