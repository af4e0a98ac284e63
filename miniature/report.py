"""What a run of the miniature shows, and how sure it is: the printed table, results.json,
report.png, report.html (one page to look at), and the summary of a sweep over seeds.

    python train.py                              # out/results.json, report.png, report.html
    python train.py --seeds=0,1,2,3,4 --ablation # + out/sweep.json, sweep.md, report.html
    python train.py --scaling=100,300,900 --seeds=0,1,2,3,4 --rounds=1 --steps=100
                                                 # out/scaling.json, scaling.md, scaling.svg, report.html
    python -m pytest tests/test_report.py tests/test_rlhfv.py

Uncertainty. Each rate is measured on one set of held-out scenes, and another set would give
another number, so every rate carries a 95% interval over scenes: Wilson's for the rates that are
proportions of answers (response level, per type), a percentile bootstrap over scenes for those
that are not (mention level counts several object words per answer, coverage is a mean of shares).
All models answer the same scenes, so two models are compared on paired resamples: each resample
draws scenes once and scores both models on them, and the easy and hard scenes it happens to draw
cancel out of the difference. Pooled over seeds, scenes are resampled within each seed, which keeps
each seed's own number of scenes in every resample. Every draw comes from a generator seeded with
the run's seed: the same run gives the same intervals.

results.json: {model: {the rates of world.score, "n",
                       "ci": {rate: [low, high]},
                       "vs": {other model: {rate: [difference, low, high]}}}}   (fractions, not %)
with "vs" under the first model of each pair (see pairs): an arm minus SFT, an earlier arm minus a
later one (DDPO - vanilla DPO).
"""
import base64
import html
import io
import itertools
import json
import math
import os
import random
import shlex
import sys

import torch
from PIL import Image, ImageDraw, ImageFont

import ddpo
from checkpoint import atomic_write
from data import Batcher, Records, Tokenizer
from miniature import world
from stats import interval, paired_difference, ratio_draws, resample, significant, wilson

WILSON = ("response_rate", *world.TYPES)  # proportions of answers; the others are bootstrapped
PAIRED = ("response_rate", "mention_rate", "coverage")
LABELS = {"sft": "SFT", "ddpo": "DDPO", "dpo": "vanilla DPO", "sft_corrected": "SFT on corrections",
          "dpo_rankings": "DPO on rankings"}
COLOURS = {"sft": "#787878", "ddpo": "#1f77b4", "dpo": "#ff7f0e", "sft_corrected": "#2ca02c",
           "dpo_rankings": "#d62728"}  # on every page


def colour(m):
    return COLOURS.get(m, "#9467bd")


def _label(m):
    return LABELS.get(m, m)


# ------------------------------------------------------------------------------------ statistics
# (the intervals themselves are stats.py's; here they are applied to world.RATES)

def rate_interval(strata, rate):
    """95% interval of a rate: Wilson's for a proportion of answers, else the bootstrap's."""
    num, den = world.RATES[rate]
    if rate in WILSON:
        per = [o for outcomes, _ in strata for o in outcomes]
        return wilson(sum(o[num] for o in per), sum(o[den] for o in per) if den else len(per))
    return interval(ratio_draws(strata, num, den))


def paired(strata_a, strata_b, rate):
    """[a - b, low, high] in a rate of world.RATES, on paired resamples (stats.paired_difference)."""
    return paired_difference(strata_a, strata_b, *world.RATES[rate])


def pairs(models):
    """Every pair (a, b) of models, compared as a - b: an arm minus SFT, else the earlier minus the
    later (so DDPO minus each ablation arm)."""
    return [(b, a) if a == "sft" else (a, b) for a, b in itertools.combinations(models, 2)]


def summarise(outcomes, seed):
    """{model: world.outcomes} of one run -> results.json's dict (module docstring)."""
    counts = resample(len(next(iter(outcomes.values()))), seed)
    strata = {m: [(per, counts)] for m, per in outcomes.items()}
    out = {m: {**{r: world.rate(per, r) for r in world.RATES}, "n": len(per),
               "ci": {r: list(rate_interval(strata[m], r)) for r in world.RATES}}
           for m, per in outcomes.items()}
    for a, b in pairs(list(outcomes)):
        out[a].setdefault("vs", {})[b] = {r: paired(strata[a], strata[b], r) for r in PAIRED}
    return out


# ------------------------------------------------------------------------------------- one run

def write(cfg, scenes, answers):
    """Everything a finished run reports, from {model: greedy answers to the held-out scenes}
    (None for a model that has none): the table, results.json, report.png and report.html."""
    outcomes = {m: world.outcomes(scenes, a) for m, a in answers.items() if a is not None}
    results = summarise(outcomes, cfg.seed)
    print("\n" + table(results))
    atomic_write(os.path.join(cfg.out_dir, "results.json"), json.dumps(results, indent=2))
    panels = curves(cfg.out_dir, list(answers))
    draw_png(os.path.join(cfg.out_dir, "report.png"), panels, results)
    page = html_page(cfg, scenes, answers, results, panels)
    atomic_write(os.path.join(cfg.out_dir, "report.html"), page)
    print(f"\nwrote {cfg.out_dir}/results.json, report.png and report.html")
    return results


def _pct(x):
    return f"{100 * x:.1f}"


def _ci(lo, hi):
    return f"[{100 * lo:.1f}, {100 * hi:.1f}]"


def change(results, m):
    """m's response rate relative to SFT's, as "-62.6%" ("" for SFT itself, or without SFT)."""
    sft = results.get("sft", {}).get("response_rate")
    return f"{100 * (results[m]['response_rate'] / sft - 1):+.1f}%" if sft and m != "sft" else ""


def table(results):
    """The printed table: a column per model, the rates in %, each with its 95% interval; then the
    paired differences in percentage points."""
    models, w = list(results), 22
    rows = [f"{'% of answers':<13}" + "".join(f"{m:>{w}}" for m in models)]
    for r in world.RATES:
        cells = [f"{_pct(results[m][r])} {_ci(*results[m]['ci'][r])}" for m in models]
        rows.append(f"{r.replace('_rate', ''):<13}" + "".join(f"{c:>{w}}" for c in cells))
    if "sft" in results and len(results) > 1:
        rows.append(f"{'resp. vs sft':<13}" + "".join(f"{change(results, m):>{w}}" for m in models))
    rows.append("95% intervals: Wilson for response level and types, bootstrap over scenes for "
                "mention level and coverage")
    diffs = [(a, b, d) for a in models for b, d in results[a].get("vs", {}).items()]
    if diffs:
        rows.append("\npaired differences, points (95% paired bootstrap):\n"
                    + f"{'':<27}" + "".join(f"{r.replace('_rate', ''):>{w}}" for r in PAIRED))
    for a, b, d in diffs:
        cells = [f"{100 * d[r][0]:+.1f} [{100 * d[r][1]:+.1f}, {100 * d[r][2]:+.1f}]" for r in PAIRED]
        rows.append(f"{a + ' - ' + b:<27}" + "".join(f"{c:>{w}}" for c in cells))
    return "\n".join(rows)


def curves(out_dir, models):
    """{panel title: (y label, {model: [(step, value)]})} from each model's log.jsonl: the SFT
    model's loss, then every arm's loss, reward margin and accuracy on shared axes. A model
    without a readable log is left out of the panels."""
    logs = {}
    for m in models:
        try:
            with open(os.path.join(out_dir, m, "log.jsonl")) as f:
                logs[m] = [json.loads(line) for line in f if line.strip()]
        except (OSError, ValueError):  # missing, or cut short by an interrupted run
            continue
    series = lambda key, names: {m: [(r["step"], r[key]) for r in logs[m] if key in r]
                                 for m in names if m in logs and any(key in r for r in logs[m])}
    arms = [m for m in models if m != "sft"]
    panels = {"SFT (the reference model): loss": ("loss per token", series("loss", ["sft"])),
              "Arms: training loss": ("loss", series("loss", arms)),
              "Arms: reward margin": ("chosen - rejected reward", series("rewards/margins", arms)),
              "Arms: reward accuracy": ("share of pairs", series("rewards/accuracies", arms))}
    return {title: panel for title, panel in panels.items() if panel[1]}


# ----------------------------------------------------------------------------------- report.png

def _ticks(lo, hi, n=5):
    """Round tick values covering [lo, hi], about n of them."""
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / n
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    first = math.floor(lo / step) * step
    return [round(first + k * step, 12) for k in range(int(math.ceil((hi - first) / step)) + 1)]


def _png_plot(img, draw, box, title, ylabel, lines, fonts):
    """One panel of report.png: {model: [(step, value)]} in the box (x0, y0, x1, y1) of its axes."""
    (x0, y0, x1, y1), (font, big) = box, fonts
    xs = [x for pts in lines.values() for x, _ in pts]
    ys = [y for pts in lines.values() for _, y in pts]
    xt, yt = _ticks(min(xs), max(xs)), _ticks(min(ys), max(ys))
    X = lambda x: x0 + (x1 - x0) * (x - xt[0]) / ((xt[-1] - xt[0]) or 1)
    Y = lambda y: y1 - (y1 - y0) * (y - yt[0]) / ((yt[-1] - yt[0]) or 1)
    draw.text((x0, y0 - 40), title, fill="black", font=big)
    at = x0  # the legend, a row between the title and the axes
    for name in lines:
        draw.line((at, y0 - 11, at + 18, y0 - 11), fill=colour(name), width=3)
        draw.text((at + 23, y0 - 11), _label(name), fill="black", font=font, anchor="lm")
        at += 23 + font.getlength(_label(name)) + 18
    for v in yt:
        draw.line((x0, Y(v), x1, Y(v)), fill=(235, 235, 235))
        draw.text((x0 - 6, Y(v)), f"{v:.4g}", fill=(80, 80, 80), font=font, anchor="rm")
    for v in xt:
        draw.text((X(v), y1 + 5), f"{v:.4g}", fill=(80, 80, 80), font=font, anchor="mt")
    draw.rectangle((x0, y0, x1, y1), outline=(150, 150, 150))
    draw.text(((x0 + x1) / 2, y1 + 22), "step", fill="black", font=font, anchor="mt")
    _vertical(img, (x0 - 52, (y0 + y1) / 2), ylabel, font)
    for name, pts in lines.items():
        if len(pts) > 1:
            draw.line([(X(x), Y(y)) for x, y in pts], fill=colour(name), width=2)


def _vertical(img, centre, text, font):
    """Text turned a quarter left, centred at `centre` (a y-axis label)."""
    w = int(font.getlength(text)) + 4
    label = Image.new("RGB", (w, 18), "white")
    ImageDraw.Draw(label).text((2, 9), text, fill="black", font=font, anchor="lm")
    label = label.rotate(90, expand=True)
    img.paste(label, (int(centre[0] - label.width / 2), int(centre[1] - label.height / 2)))


def draw_png(path, panels, results):
    """report.png, the page in one image: the training panels two to a row, then every model's
    rates as bars with their 95% intervals as whiskers."""
    fonts = ImageFont.load_default(size=13), ImageFont.load_default(size=16)
    width, pw, ph, rows = 1120, 560, 280, (len(panels) + 1) // 2
    img = Image.new("RGB", (width, rows * ph + 380), "white")
    draw = ImageDraw.Draw(img)
    for k, (title, (ylabel, lines)) in enumerate(panels.items()):
        x, y = (k % 2) * pw, (k // 2) * ph
        _png_plot(img, draw, (x + 76, y + 60, x + pw - 30, y + ph - 50), title, ylabel, lines, fonts)
    x0, y0, x1, y1 = 76, rows * ph + 90, width - 30, rows * ph + 330
    draw.text((x0, y0 - 66), "Hallucination rates with 95% intervals (coverage: higher is better)",
              fill="black", font=fonts[1])
    for a, m in enumerate(results):
        draw.rectangle((x0 + 170 * a, y0 - 42, x0 + 170 * a + 11, y0 - 31), fill=colour(m))
        draw.text((x0 + 170 * a + 16, y0 - 37), _label(m), fill="black", font=fonts[0], anchor="lm")
    for v in (0, 25, 50, 75, 100):
        y = y1 - (y1 - y0) * v / 100
        draw.line((x0, y, x1, y), fill=(235, 235, 235) if v else "black")
        draw.text((x0 - 6, y), f"{v}", fill=(80, 80, 80), font=fonts[0], anchor="rm")
    _vertical(img, (x0 - 50, (y0 + y1) / 2), "% of answers", fonts[0])
    step = (x1 - x0) / len(world.RATES)
    bar = 0.8 * step / max(len(results), 1)
    for g, key in enumerate(world.RATES):
        draw.text((x0 + (g + 0.5) * step, y1 + 6), key.replace("_rate", ""), fill="black", font=fonts[0],
                  anchor="mt")
        for a, (m, r) in enumerate(results.items()):
            left, mid = x0 + (g + 0.1) * step + a * bar, x0 + (g + 0.1) * step + (a + 0.5) * bar - 1
            lo, hi = (y1 - (y1 - y0) * v for v in r["ci"][key])
            draw.rectangle((left, y1 - (y1 - y0) * r[key], left + bar - 2, y1), fill=colour(m))
            draw.line((mid, lo, mid, hi), fill="black", width=1)
            draw.line((mid - 3, hi, mid + 3, hi), fill="black")
            draw.line((mid - 3, lo, mid + 3, lo), fill="black")
            draw.text((mid, hi - 3), f"{100 * r[key]:.0f}", fill="black", font=fonts[0], anchor="mb")
    img.save(path)


# ---------------------------------------------------------------------------------- report.html

CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#222;
 max-width:1240px;margin:0 auto;padding:20px 28px 40px;background:#fff}
h1{font-size:26px;margin:8px 0 2px}h2{font-size:20px;margin:40px 0 6px;padding-bottom:4px;
 border-bottom:1px solid #ddd}.sub{color:#666;margin:0 0 14px}.lead{font-size:19px;margin:14px 0}
.lead b{font-size:22px}p.note{color:#a33;font-style:italic;margin:6px 0}.small{font-size:13px;color:#666}
table{border-collapse:collapse;margin:8px 0}th,td{padding:5px 10px;text-align:right;vertical-align:top}
th{font-weight:600;border-bottom:2px solid #ccc}td{border-bottom:1px solid #eee}
th:first-child,td:first-child{text-align:left}.ci{display:block;color:#888;font-size:12px;white-space:nowrap}
.dot{display:inline-block;width:11px;height:11px;border-radius:50%;margin-right:6px}
.better,.worse,.same{display:block;font-size:12px}.better{color:#1a7f37}.worse{color:#c62828}.same{color:#888}
h3{font-size:16px;margin:22px 0 4px}
mark{background:#ffd6d6;color:#9b0000;border-bottom:2px solid #e53935;padding:0 2px;border-radius:2px}
mark sup{font-size:10px;color:#c62828;margin-left:2px;font-weight:600}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:14px}
.card{border:1px solid #ddd;border-radius:8px;padding:12px;display:flex;gap:14px}
.card img{image-rendering:pixelated;border:1px solid #ccc;flex:none}.card h3{font-size:14px;margin:0 0 6px}
.card p{margin:0 0 8px;font-size:14px}.tag{font-size:12px;padding:1px 7px;border-radius:9px;color:#fff}
.who{font-weight:600;font-size:12px;text-transform:uppercase;letter-spacing:.04em;color:#555;display:block}
.pair{border:1px solid #ddd;border-radius:8px;padding:12px;margin:10px 0;display:flex;gap:14px}
.pair img{image-rendering:pixelated;border:1px solid #ccc;flex:none}.row{margin:2px 0 8px}
.q{margin:0 0 6px;font-style:italic}
.t{display:inline-block;border:1px solid #ddd;border-radius:3px;margin:1px;padding:0 2px;white-space:pre;
 font:13px/1.6 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#fafafa}
.t.g{background:#ffcf40;border-color:#d9a400;font-weight:700}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(540px,1fr));gap:8px}
footer{margin-top:44px;border-top:1px solid #ddd;padding-top:10px;font-size:13px;color:#555}
footer code{background:#f4f4f4;padding:1px 4px;border-radius:3px}
"""

_e = html.escape


def _shell(title, body):
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def _section(title, build, *args):
    """A section of the page, or one line saying why it is left out: a missing or unreadable file
    at the end of a long run costs its section, never the report."""
    try:
        return f"<h2>{_e(title)}</h2>\n" + build(*args)
    except (OSError, ValueError, KeyError, IndexError) as e:
        return f'<h2>{_e(title)}</h2>\n<p class="note">Left out: {_e(type(e).__name__)}: {_e(str(e))}</p>'


def _dot(m):
    return f'<span class="dot" style="background:{colour(m)}"></span>'


def _img(img, scale, alt):
    """An <img> of a PIL image inlined as PNG, enlarged `scale` times with nearest neighbour so that
    its pixels stay crisp."""
    buf = io.BytesIO()
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(buf, "PNG")
    return (f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}" '
            f'width="{img.width * scale}" height="{img.height * scale}" alt="{_e(alt)}">')


def _cell(rate, ci):
    return f'{_pct(rate)}%<span class="ci">{_ci(*ci)}</span>'


def _points(d):
    return f"{100 * d[0]:+.1f} points [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}]"


def _diff(d, lower_is_better=True):
    """A paired difference [d, low, high] in points, its interval and what it says below it."""
    return (f'{100 * d[0]:+.1f} pts<span class="ci">[{100 * d[1]:+.1f}, {100 * d[2]:+.1f}]</span>'
            + _verdict(d, lower_is_better))


def _verdict(d, lower_is_better=True):
    if not significant(d):
        return '<span class="same">no significant difference</span>'
    good = (d[0] < 0) == lower_is_better
    return f'<span class="{"better" if good else "worse"}">{"better" if good else "worse"}</span>'


def html_page(cfg, scenes, answers, results, panels):
    """report.html: one self-contained page (images inlined, no scripts, no web fonts)."""
    models = list(results)
    main = next((m for m in models if m != "sft"), None)
    missing = [m for m, a in answers.items() if a is None]
    body = [f"<h1>RLHF-V in miniature</h1><p class=sub>seed {cfg.seed} &middot; {len(scenes)} "
            f"held-out scenes &middot; models: {', '.join(_e(_label(m)) for m in models)}</p>"]
    if "sft" in results and main:
        body.append(_lead(results, main))
    body.append(_section("Hallucination rates", _headline, results, missing))
    body.append(_section("Held-out scenes, side by side", _scenes, cfg, scenes, answers, main))
    body.append(_section("What DDPO learns from: the corrected segments weigh \u03b3", _pairs, cfg))
    body.append(_section("Training", _training, panels, models))
    body.append(_footer(cfg))
    return _shell(f"RLHF-V in miniature, seed {cfg.seed}", "\n".join(body))


def _lead(results, main):
    s, a = results["sft"], results[main]
    d = a["vs"]["sft"]["response_rate"]
    rel = change(results, main)
    said = _points(d) + ((f" ({rel})" if rel else "") if significant(d) else ", no significant difference")
    return (f'<p class="lead">{_e(_label(main))}: <b>{_pct(a["response_rate"])}%</b> of answers '
            f'hallucinate, against <b>{_pct(s["response_rate"])}%</b> after SFT: {said}. Coverage '
            f'{_pct(s["coverage"])}% &rarr; {_pct(a["coverage"])}%.</p>')


def _headline(results, missing):
    models, rates = list(results), list(world.RATES)
    head = "".join(f"<th>{_e(r.replace('_rate', '').replace('_', ' '))}</th>" for r in rates)
    rows = []
    for m in models:
        rows.append(f"<tr><td>{_dot(m)}{_e(_label(m))}</td>"
                    + "".join(f"<td>{_cell(results[m][k], results[m]['ci'][k])}</td>" for k in rates)
                    + f"<td>{change(results, m)}</td></tr>")
    out = [f'<table><tr><th>% of answers (95% interval)</th>{head}<th>response vs SFT</th></tr>'
           + "".join(rows) + "</table>",
           '<p class="small">response: answers with a hallucination among those that mention an object; '
           "mention: invented object words among object words; object &hellip; relation: answers with a "
           "hallucination of that type; coverage: share of each scene's objects described without error "
           "(higher is better). Intervals: Wilson for proportions of answers, a bootstrap over scenes "
           "for mention and coverage.</p>"]
    out += [f'<p class="note">{_e(_label(m))}: no evaluation, left out.</p>' for m in missing]
    diffs = [(a, b, d) for a in models for b, d in results[a].get("vs", {}).items()]
    if diffs:
        forest = svg_forest([(f"{_label(a)} \u2212 {_label(b)}", d["response_rate"]) for a, b, d in diffs])
        out.append("<h3>Paired differences (the same scenes, 95% paired bootstrap)</h3>" + forest
                   + '<p class="small">better / worse: the first model of the row, where the interval leaves '
                   "out zero (for coverage, higher is better).</p><table><tr><th></th>"
                   + "".join(f"<th>{r.replace('_rate', '')}</th>" for r in PAIRED) + "</tr>")
        for a, b, d in diffs:
            out.append(f"<tr><td>{_e(_label(a))} &minus; {_e(_label(b))}</td>" + "".join(
                f"<td>{_diff(d[r], r != 'coverage')}</td>" for r in PAIRED) + "</tr>")
        out.append("</table>")
    return "\n".join(out)


def _marked(scene, answer):
    """The answer as HTML, each claim the checker judged wrong in a <mark> with its type (and the
    truth, where a word can state it) on hover and in small print; right claims stay plain."""
    wrong = sorted((v for v in world.check(scene, answer) if not v.ok), key=lambda v: v.claim.start)
    out, at = [], 0
    for v in wrong:
        fix = next((t for s, e, t in v.edits if (s, e) == (v.claim.start, v.claim.end)), None)
        why = "not in the image" if v.type == "object" or not fix else f"the image says: {fix}"
        out.append(_e(answer[at:v.claim.start]) + f'<mark title="{_e(v.type)}: {_e(why)}">'
                   f"{_e(v.claim.text)}<sup>{_e(v.type)}</sup></mark>")
        at = v.claim.end
    return "".join(out) + _e(answer[at:])


KINDS = {"fixed": "#1a7f37", "not fixed": "#b26a00", "made worse": "#c62828", "right both times": "#666"}


def pick_scenes(wrong_sft, wrong_arm, seed, k=12):
    """[(scene index, kind)]: up to k scenes, chosen reproducibly: a scene the arm made worse (if
    any), then up to 7 it fixed and 4 it did not, the rest filled from what is left, in that order.
    wrong_*: the number of wrong claims in each model's answer to each scene."""
    kinds = {kind: [] for kind in KINDS}
    for i, (s, a) in enumerate(zip(wrong_sft, wrong_arm)):
        kinds[("right both times", "made worse", "fixed", "not fixed")[2 * bool(s) + bool(a)]].append(i)
    rng, chosen = random.Random(seed), {kind: [] for kind in KINDS}
    for kind, quota in (("made worse", 1), ("fixed", 7), ("not fixed", 4), *((kind, k) for kind in KINDS)):
        rest = [i for i in kinds[kind] if i not in chosen[kind]]
        chosen[kind] += rng.sample(rest, min(quota, k - sum(map(len, chosen.values())), len(rest)))
    return [(i, kind) for kind in KINDS for i in sorted(chosen[kind])]


def _scenes(cfg, scenes, answers, main):
    if main is None or answers.get(main) is None or answers.get("sft") is None:
        raise ValueError("needs the answers of SFT and of an arm")
    wrong = {m: [sum(not v.ok for v in world.check(s, a)) for s, a in zip(scenes, answers[m])]
             for m in ("sft", main)}
    scale = max(1, 192 // cfg.image_size)
    out = [f'<p class="small">Greedy answers of SFT and {_e(_label(main))} to the same held-out '
           "scenes. Every claim the checker judges wrong is <mark>marked<sup>type</sup></mark> (hover for "
           "what the image shows); the rest is right. Scenes drawn with the run's seed: some "
           f"{_e(_label(main))} fixed, some it did not, one it made worse if there is one.</p>",
           '<div class="cards">']
    for i, kind in pick_scenes(wrong["sft"], wrong[main], cfg.seed):
        with Image.open(os.path.join(cfg.out_dir, "world", "images", f"test{i}.png")) as img:
            picture = _img(img.convert("RGB"), scale, f"held-out scene {i}")
        texts = "".join(f'<span class="who">{_e(_label(m))} &middot; {wrong[m][i]} wrong</span>'
                        f'<p class="answer" data-scene="{i}" data-model="{_e(m)}">'
                        f"{_marked(scenes[i], answers[m][i])}</p>" for m in ("sft", main))
        out.append(f'<div class="card">{picture}<div><h3>scene {i} <span class="tag" '
                   f'style="background:{KINDS[kind]}">{kind}</span></h3>{texts}</div></div>')
    return "\n".join(out + ["</div>"])


def pair_tokens(cfg, item, tok, config):
    """[(piece, weight)] of the chosen and of the rejected answer of one pair (a Records row), from
    the very batch DDPO trains on (data.Batcher.pairs: diffed with the prompt in front)."""
    batcher = Batcher(tok, config["n_query"], config["vision"]["img_size"], 512, cfg.gamma, cfg.min_match)
    batch = batcher.pairs([item])  # max_len 512, as the arms train
    if "input_ids" not in batch:
        raise ValueError(f"pair skipped by the batcher: {batch['skipped']}")
    rows = []
    for j in range(2):  # chosen, then rejected
        mask = batch["labels"][j, 1:] != ddpo.IGNORE_INDEX
        ids, w = batch["labels"][j, 1:][mask].tolist(), batch["weights"][j][mask].tolist()
        rows.append([(tok.sp.id_to_piece(t), x) for t, x in zip(ids, w)])
    return rows


def _tokens(pieces, side):
    """One box per token (a newline shown as \u21b5, SentencePiece's \u2581 as the space it is),
    the up-weighted ones highlighted."""
    shown = lambda p: "\u21b5" if p == "<0x0A>" else p.replace("\u2581", " ")
    return "".join(f'<span class="t{" g" if w != 1 else ""}" data-side="{side}" data-i="{k}">'
                   f"{_e(shown(p))}</span>" for k, (p, w) in enumerate(pieces))


def _pairs(cfg, n=4):
    path = os.path.join(cfg.out_dir, "collect", "pairs.jsonl")
    records = Records(path)
    tok = Tokenizer(os.path.join(cfg.out_dir, "world", "tokenizer.model"))
    with open(os.path.join(cfg.out_dir, "sft", "config.json")) as f:
        config = json.load(f)
    picked = sorted(random.Random(cfg.seed).sample(range(len(records)), min(n, len(records))))
    out = [f'<p class="small">{len(records)} answers of the SFT model had a hallucination and were '
           "corrected by the annotator. Below, a few of them as DDPO reads them: each box is one token as "
           f"the tokenizer splits it; the <span class=\"t g\">highlighted</span> ones, the corrected "
           f"segments found by diffing the two answers, weigh \u03b3 = {cfg.gamma:g} in the scores of Eq. 5; "
           "every other token weighs 1.</p>"]
    if cfg.gamma == 1:
        out.append('<p class="note">\u03b3 = 1 in this run (vanilla DPO): every token weighs the same.</p>')
    for i in picked:
        item = records[i]
        if "error" in item:
            out.append(f'<p class="note">pair {i} left out: {_e(item["error"])}</p>')
            continue
        chosen, rejected = pair_tokens(cfg, item, tok, config)
        picture = _img(item["image"], max(1, 128 // item["image"].width), "training scene")
        out.append(f'<div class="pair" data-pair="{i}">{picture}<div><p class="q">&ldquo;'
                   f'{_e(item["question"])}&rdquo;</p><span class="who">rejected: the SFT model\'s answer'
                   f'</span><div class="row">{_tokens(rejected, "rejected")}</div><span class="who">chosen: '
                   f'the annotator\'s correction</span><div class="row">{_tokens(chosen, "chosen")}</div>'
                   "</div></div>")
    return "\n".join(out)


def svg_plot(title, ylabel, lines, width=540, height=280):
    """A line plot as inline SVG: {name: [(x, y)]}, axes with ticks, 'step' under the x axis, the
    y label beside its axis, and the legend in a row between the title and the axes."""
    left, right, top, bottom = 64, 24, 46, 44
    xs = [x for pts in lines.values() for x, _ in pts]
    ys = [y for pts in lines.values() for _, y in pts]
    xt, yt = _ticks(min(xs), max(xs)), _ticks(min(ys), max(ys))
    X = lambda x: left + (width - left - right) * (x - xt[0]) / ((xt[-1] - xt[0]) or 1)
    Y = lambda y: height - bottom - (height - top - bottom) * (y - yt[0]) / ((yt[-1] - yt[0]) or 1)
    fmt = lambda v: f"{v:.4g}"
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="system-ui,sans-serif" font-size="11">',
           f'<text x="{left}" y="16" font-size="14" font-weight="600">{_e(title)}</text>']
    for v in yt:
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{Y(v):.1f}" y2="{Y(v):.1f}" stroke="#eee"/>'
                   f'<text x="{left - 6}" y="{Y(v) + 4:.1f}" text-anchor="end" fill="#555">{fmt(v)}</text>')
    for v in xt:
        out.append(f'<text x="{X(v):.1f}" y="{height - bottom + 15}" text-anchor="middle" fill="#555">'
                   f"{fmt(v)}</text>")
    out.append(f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
               'fill="none" stroke="#999"/>'
               f'<text x="{(left + width - right) / 2}" y="{height - 8}" text-anchor="middle">step</text>'
               f'<text transform="translate(14 {(top + height - bottom) / 2}) rotate(-90)" '
               f'text-anchor="middle">{_e(ylabel)}</text>')
    at = left
    for name, pts in lines.items():
        path = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour(name)}" stroke-width="1.6"/>'
                   f'<line x1="{at}" x2="{at + 18}" y1="32" y2="32" stroke="{colour(name)}" '
                   f'stroke-width="3"/><text x="{at + 23}" y="36">{_e(_label(name))}</text>')
        at += 23 + 7 * len(_label(name)) + 16  # ~7 px a character at 11 px
    return "\n".join(out + ["</svg>"])


def svg_forest(rows, width=620):
    """[(label, [difference, low, high])] as points with their intervals, one row each, about a
    dashed zero line: where a bar crosses it, there is no significant difference."""
    left, right, top, h = 230, 20, 30, 26
    height = top + h * len(rows) + 40
    xt = _ticks(min(0, *(100 * d[1] for _, d in rows)), max(0, *(100 * d[2] for _, d in rows)))
    X = lambda v: left + (width - left - right) * (v - xt[0]) / ((xt[-1] - xt[0]) or 1)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="system-ui,sans-serif" font-size="12">',
           f'<text x="{left}" y="14" font-size="13" font-weight="600">response-level rate, difference '
           "in points</text>"]
    bottom = top + h * len(rows)
    for v in xt:
        line = 'stroke="#555" stroke-dasharray="4 3"' if v == 0 else 'stroke="#eee"'
        out.append(f'<line x1="{X(v):.1f}" x2="{X(v):.1f}" y1="{top - 6}" y2="{bottom}" {line}/><text '
                   f'x="{X(v):.1f}" y="{bottom + 16}" text-anchor="middle" fill="#555">{v:+g}</text>'
                   .replace(">+0<", ">0<"))
    for k, (label, d) in enumerate(rows):
        y, tint = top + h * k + h / 2, "#c62828" if d[1] > 0 else "#1a7f37" if d[2] < 0 else "#888"
        out.append(f'<text x="{left - 10}" y="{y + 4}" text-anchor="end">{_e(label)}</text><line '
                   f'x1="{X(100 * d[1]):.1f}" x2="{X(100 * d[2]):.1f}" y1="{y}" y2="{y}" stroke="{tint}" '
                   f'stroke-width="3"/><circle cx="{X(100 * d[0]):.1f}" cy="{y}" r="5" fill="{tint}"/>')
    return "\n".join(out + ["</svg>"])


def _training(panels, models):
    if not panels:
        raise FileNotFoundError("no log.jsonl in any model's directory")
    out = ['<div class="plots">'] + [svg_plot(t, y, lines) for t, (y, lines) in panels.items()]
    out.append("</div>")
    no_log = [m for m in models if not any(m in lines for _, lines in panels.values())]
    out += [f'<p class="note">{_e(_label(m))}: no readable training log, left out of the plots.</p>'
            for m in no_log]
    return "\n".join(out)


def _footer(cfg, seeds=None):
    """The command, seed(s), torch, device and each stage's wall time (from rlhfv's timings.json)."""
    path, times = os.path.join(cfg.out_dir, "timings.json"), "not recorded"
    if os.path.exists(path):
        with open(path) as f:
            times = ", ".join(f"{_e(k)} {v:.0f} s" for k, v in json.load(f).items())
    times = "on each seed's page" if seeds else times
    which = f"seeds {seeds}" if seeds else f"seed {cfg.seed}"
    return (f"<footer><code>{_e(shlex.join(['python', *sys.argv]))}</code><br>{_e(which)} &middot; "
            f"torch {_e(torch.__version__)} &middot; device {_e(cfg.device)}<br>wall time per stage (a "
            f"cached stage keeps the time of the run that made it): {times}</footer>")


# ---------------------------------------------------------------------------------------- sweep

# What the sweep reports: (rate of world.RATES, key of its values, key of its differences, title,
# interval, whether higher is better)
SWEEP_TABLES = (
    ("response_rate", "rate", "diff", "Response-level hallucination rate",
     "% of answers that mention an object, Wilson 95% interval", False),
    ("coverage", "coverage", "coverage_diff", "Coverage",
     "% of the scenes' objects described without error, bootstrap 95% interval", True))
SWEEP_NOTE = ("paired differences in points, 95% paired bootstrap over held-out scenes; pooled: scenes "
              "resampled within each seed")


def sweep_summary(runs):
    """{seed: {model: world.outcomes}} -> {"seeds", "per_seed": {seed: row}, "pooled": row}, a row
    being {"rate": {model: [rate, low, high]}, "diff": {"a - b": [difference, low, high]},
    "coverage": ..., "coverage_diff": ...}: the response-level rate of each model (Wilson), its
    coverage (bootstrap), and the paired differences of the first arm (DDPO) against every other
    model in each; pooled over all scenes of all seeds, resampled within each seed."""
    counts = {s: resample(len(next(iter(o.values()))), s) for s, o in runs.items()}
    models = [m for m in next(iter(runs.values())) if all(m in r for r in runs.values())]  # in every seed
    main = next((m for m in models if m != "sft"), None)

    def row(seeds):
        strata = {m: [(runs[s][m], counts[s]) for s in seeds] for m in models}
        out = {}
        for rate, values, diffs, *_ in SWEEP_TABLES:
            out[values] = {m: [world.rate([o for per, _ in strata[m] for o in per], rate),
                               *rate_interval(strata[m], rate)] for m in models}
            out[diffs] = {f"{main} - {b}": paired(strata[main], strata[b], rate) for b in models if b != main}
        return out

    return {"seeds": list(runs), "per_seed": {str(s): row([s]) for s in runs}, "pooled": row(list(runs))}


def sweep_markdown(summary):
    """The sweep summary as two markdown tables, rates and coverage (also what is printed)."""
    first, out = summary["pooled"], []
    cell = lambda v, signed: (f"{100 * v[0]:+.1f} [{100 * v[1]:+.1f}, {100 * v[2]:+.1f}]" if signed
                              else f"{100 * v[0]:.1f}% [{100 * v[1]:.1f}, {100 * v[2]:.1f}]")
    for _, values, diffs, title, interval, _ in SWEEP_TABLES:
        models, compared = list(first[values]), list(first[diffs])
        head = ["seed", *map(_label, models), *(" - ".join(map(_label, d.split(" - "))) for d in compared)]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, row in [*summary["per_seed"].items(), ("pooled", first)]:
            lines.append("| " + " | ".join([name, *(cell(row[values][m], False) for m in models),
                                            *(cell(row[diffs][d], True) for d in compared)]) + " |")
        out.append(f"{title} ({interval}) and {SWEEP_NOTE}.\n\n" + "\n".join(lines) + "\n")
    return "\n".join(out)


def sweep_page(cfg, summary):
    """The sweep's report.html: the rates, coverage and differences of every seed and pooled, as
    tables and the rate differences as intervals about zero, each seed linked to its own page."""
    pooled_row, seeds = summary["pooled"], list(summary["per_seed"])
    rows = [*summary["per_seed"].items(), ("pooled", pooled_row)]
    name = lambda d: " \u2212 ".join(map(_label, d.split(" - ")))
    tables = []
    for _, values, diffs, title, interval, higher in SWEEP_TABLES:
        head = "".join(f"<th>{_dot(m)}{_e(_label(m))}</th>" for m in pooled_row[values])
        head += "".join(f"<th>{_e(name(d))}</th>" for d in pooled_row[diffs])
        body = []
        for seed, row in rows:
            link = f'<a href="seed{seed}/report.html">seed {seed}</a>' if seed != "pooled" else "<b>pooled</b>"
            body.append(f"<tr><td>{link}</td>"
                        + "".join(f"<td>{_cell(v[0], v[1:])}</td>" for v in row[values].values())
                        + "".join(f"<td>{_diff(d, not higher)}</td>" for d in row[diffs].values()) + "</tr>")
        tables.append(f"<h2>{_e(title)}</h2><table><tr><th>seed</th>{head}</tr>" + "".join(body)
                      + f'</table><p class="small">{_e(interval)}; {_e(SWEEP_NOTE)}.</p>')
    forest = svg_forest([(f"{name(d)}, {'pooled' if seed == 'pooled' else 'seed ' + seed}", row["diff"][d])
                         for d in pooled_row["diff"] for seed, row in rows])
    title = f"RLHF-V in miniature, seeds {', '.join(seeds)}"
    return _shell(title, f"<h1>{_e(title)}</h1><p class=sub>each seed's own page is linked from its row</p>"
                  + tables[0] + forest + tables[1] + _footer(cfg, ",".join(seeds)))


def write_sweep(cfg, runs):
    """sweep.json, sweep.md (printed) and report.html in cfg.out_dir, from {seed: {model: answers}}
    and each seed's scenes: runs = {seed: (scenes, answers)}."""
    outcomes = {s: {m: world.outcomes(scenes, a) for m, a in answers.items() if a is not None}
                for s, (scenes, answers) in runs.items()}
    summary = sweep_summary(outcomes)
    md = sweep_markdown(summary)
    print("\n" + md)
    atomic_write(os.path.join(cfg.out_dir, "sweep.json"), json.dumps(summary, indent=2))
    atomic_write(os.path.join(cfg.out_dir, "sweep.md"), md)
    atomic_write(os.path.join(cfg.out_dir, "report.html"), sweep_page(cfg, summary))
    print(f"wrote {cfg.out_dir}/sweep.json, sweep.md and report.html")
    return summary


# -------------------------------------------------------------------------------- scaling sweep

SCALING_RATES = ("response_rate", "coverage")  # what the scaling sweep plots against the pairs


def scaling_summary(outcomes, pairs):
    """{(arm, size, seed): world.outcomes} (SFT as ("sft", 0, seed)) and {(arm, size, seed): pairs
    trained on} -> {"seeds", "sizes", "arms",
      "rows": [{"arm", "size", "seed", "pairs", rate: [value, low, high]}]  one per (arm, size, seed),
      "sft": {rate: [value, low, high]},                                     pooled over seeds,
      "pooled": [{"arm", "size", "pairs": [fewest, most], rate: [value, low, high]}],
      "vs": [{"corrections", "rankings", rate: [ddpo - rankings, low, high]}],
      "along": [{"arm", "from", "to", rate: [arm at `to` - arm at `from`, low, high]}]}   (fractions)
    for each rate of SCALING_RATES: Wilson (response level) or bootstrap (coverage) intervals;
    paired differences of DDPO at one size against DPO on rankings at each size at least as large,
    and along each arm's curve (each size against the one before, and the largest against the
    smallest), pooled over seeds with scenes resampled within each seed (as sweep_summary)."""
    seeds = sorted({s for _, _, s in outcomes})
    sizes = sorted({n for a, n, _ in outcomes if a != "sft"})
    arms = [a for a in ("ddpo", "dpo_rankings") if any(k[0] == a for k in outcomes)]
    counts = {s: resample(len(outcomes["sft", 0, s]), s) for s in seeds}
    strata = lambda arm, n, ss: [(outcomes[arm, n, s], counts[s]) for s in ss]
    values = lambda st: {r: [world.rate([o for per, _ in st for o in per], r), *rate_interval(st, r)]
                         for r in SCALING_RATES}
    rows = [{"arm": a, "size": n, "seed": s, "pairs": pairs[a, n, s], **values(strata(a, n, [s]))}
            for a in arms for n in sizes for s in seeds]
    pooled = [{"arm": a, "size": n, "pairs": [min(pairs[a, n, s] for s in seeds),
                                              max(pairs[a, n, s] for s in seeds)],
               **values(strata(a, n, seeds))} for a in arms for n in sizes]
    vs = [{"corrections": n, "rankings": m,
           **{r: paired(strata("ddpo", n, seeds), strata("dpo_rankings", m, seeds), r) for r in SCALING_RATES}}
          for n in sizes for m in sizes if m >= n and len(arms) == 2]
    steps = list(zip(sizes, sizes[1:])) + ([(sizes[0], sizes[-1])] if len(sizes) > 2 else [])
    along = [{"arm": a, "from": n, "to": m,
              **{r: paired(strata(a, m, seeds), strata(a, n, seeds), r) for r in SCALING_RATES}}
             for a in arms for n, m in steps]
    return {"seeds": seeds, "sizes": sizes, "arms": arms, "rows": rows,
            "sft": values(strata("sft", 0, seeds)), "pooled": pooled, "vs": vs, "along": along}


def scaling_markdown(summary):
    """The pooled table (each arm's rate and coverage at each size, and the paired difference at the
    same size), the matrix of DDPO at N corrections against rankings at M >= N, and one row per
    (arm, size, seed)."""
    cell = lambda v: f"{100 * v[0]:.1f}% [{100 * v[1]:.1f}, {100 * v[2]:.1f}]"
    sign = lambda v: f"{100 * v[0]:+.1f} [{100 * v[1]:+.1f}, {100 * v[2]:+.1f}]"
    pooled = {(p["arm"], p["size"]): p for p in summary["pooled"]}
    vs = {(d["corrections"], d["rankings"]): d for d in summary["vs"]}
    arms, sizes, seeds = summary["arms"], summary["sizes"], ", ".join(map(str, summary["seeds"]))
    head = ["annotated pairs"] + [f"{_label(a)}: {w}" for a in arms for w in ("rate", "coverage")]
    head += ["DDPO - rankings: rate", "coverage"] if len(arms) == 2 else []
    out = [f"Pooled over seeds {seeds}: response-level hallucination rate (Wilson 95%) and coverage "
           "(bootstrap 95%) of DDPO on corrected answers and vanilla DPO on rankings, trained on the "
           "same number of annotated pairs; paired differences in points (95% paired bootstrap over "
           "held-out scenes, resampled within each seed). SFT, the start of both: rate "
           f"{cell(summary['sft']['response_rate'])}, coverage {cell(summary['sft']['coverage'])}.\n",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in sizes:
        cells = [cell(pooled[a, n][r]) for a in arms for r in SCALING_RATES]
        cells += [sign(vs[n, n][r]) for r in SCALING_RATES] if (n, n) in vs else []
        out.append("| " + " | ".join([str(n), *cells]) + " |")
    if vs:
        out += ["", "Response-level rate, DDPO on N corrections minus DPO on M rankings (points, 95% paired "
                "bootstrap; negative: the corrections hallucinate less):", "",
                "| N \\ M | " + " | ".join(map(str, sizes)) + " |", "|" + "---|" * (len(sizes) + 1)]
        for n in sizes:
            out.append("| " + " | ".join([str(n), *(sign(vs[n, m]["response_rate"]) if (n, m) in vs else ""
                                                     for m in sizes)]) + " |")
    if summary["along"]:
        out += ["", "Along each curve: the larger number of pairs minus the smaller, same arm (points, 95% "
                "paired bootstrap; a negative rate: more pairs, fewer hallucinations):", "",
                "| arm | pairs | rate | coverage |", "|---|---|---|---|"]
        out += [f"| {_label(d['arm'])} | {d['from']} -> {d['to']} | {sign(d['response_rate'])} | "
                f"{sign(d['coverage'])} |" for d in summary["along"]]
    out += ["", "Each run (pairs: the annotated pairs it trained on):", "",
            "| arm | size | seed | pairs | rate | coverage |", "|---|---|---|---|---|---|"]
    out += [f"| {_label(r['arm'])} | {r['size']} | {r['seed']} | {r['pairs']} | {cell(r['response_rate'])} | "
            f"{cell(r['coverage'])} |" for r in summary["rows"]]
    return "\n".join(out) + "\n"


def svg_scaling(summary, rate, width=560, height=320):
    """One rate of the pooled summary against the annotated pairs (log scale), a line per arm with
    its 95% intervals as whiskers, SFT's rate as a dashed line."""
    left, right, top, bottom = 64, 24, 50, 46
    sizes, pooled = summary["sizes"], summary["pooled"]
    ys = [100 * v for p in pooled for v in p[rate][1:]] + [100 * v for v in summary["sft"][rate][1:]]
    yt = _ticks(min(ys), max(ys))
    lx = [math.log2(n) for n in sizes]
    span = (max(lx) - min(lx)) or 1
    X = lambda n, k=0: left + (width - left - right) * (0.06 + 0.88 * (math.log2(n) - min(lx)) / span) + 4 * k
    Y = lambda y: height - bottom - (height - top - bottom) * (y - yt[0]) / ((yt[-1] - yt[0]) or 1)
    title = {"response_rate": "Response-level hallucination rate (%)", "coverage": "Coverage (%)"}[rate]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="system-ui,sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="16" font-size="14" font-weight="600">{_e(title)}</text>']
    for v in yt:
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{Y(v):.1f}" y2="{Y(v):.1f}" stroke="#eee"/>'
                   f'<text x="{left - 6}" y="{Y(v) + 4:.1f}" text-anchor="end" fill="#555">{v:.4g}</text>')
    for n in sizes:
        out.append(f'<text x="{X(n):.1f}" y="{height - bottom + 15}" text-anchor="middle" fill="#555">{n}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
               'fill="none" stroke="#999"/>'
               f'<text x="{(left + width - right) / 2}" y="{height - 8}" text-anchor="middle">annotated '
               'pairs (log scale)</text>'
               f'<text transform="translate(14 {(top + height - bottom) / 2}) rotate(-90)" '
               f'text-anchor="middle">% (95% interval)</text>')
    sft = Y(100 * summary["sft"][rate][0])
    out.append(f'<line x1="{left}" x2="{width - right}" y1="{sft:.1f}" y2="{sft:.1f}" stroke="{colour("sft")}" '
               'stroke-dasharray="5 4"/>')
    at = left
    for k, arm in enumerate([*summary["arms"], "sft"]):
        points = [p for p in pooled if p["arm"] == arm]
        if points:
            path = " ".join(f"{X(p['size'], k):.1f},{Y(100 * p[rate][0]):.1f}" for p in points)
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour(arm)}" stroke-width="1.8"/>')
        for p in points:
            x, (v, lo, hi) = X(p["size"], k), (100 * v for v in p[rate])
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{Y(lo):.1f}" y2="{Y(hi):.1f}" '
                       f'stroke="{colour(arm)}"/><circle cx="{x:.1f}" cy="{Y(v):.1f}" r="3.5" fill="{colour(arm)}"/>')
        name = _label(arm) + (" (corrections)" if arm == "ddpo" else "")
        dash = ' stroke-dasharray="5 4"' if arm == "sft" else ""
        out.append(f'<line x1="{at}" x2="{at + 18}" y1="34" y2="34" stroke="{colour(arm)}" '
                   f'stroke-width="3"{dash}/><text x="{at + 23}" y="38">{_e(name)}</text>')
        at += 23 + 7 * len(name) + 16
    return "\n".join(out + ["</svg>"])


def write_scaling(cfg, outcomes, pairs):
    """scaling.json, scaling.md (printed), scaling.svg (both rates side by side) and report.html in
    cfg.out_dir, from the outcomes and pair counts of rlhfv.scaling. -> the summary"""
    summary = scaling_summary(outcomes, pairs)
    md = scaling_markdown(summary)
    print("\n" + md)
    plots = [svg_scaling(summary, r) for r in SCALING_RATES]
    svg = ('<svg xmlns="http://www.w3.org/2000/svg" width="1120" height="320">'
           + "".join(f'<g transform="translate({560 * k} 0)">{p}</g>' for k, p in enumerate(plots)) + "</svg>\n")
    atomic_write(os.path.join(cfg.out_dir, "scaling.json"), json.dumps(summary, indent=2))
    atomic_write(os.path.join(cfg.out_dir, "scaling.md"), md)
    atomic_write(os.path.join(cfg.out_dir, "scaling.svg"), svg)
    title = f"Corrections against rankings, seeds {', '.join(map(str, summary['seeds']))}"
    body = (f"<h1>{_e(title)}</h1><p class=sub>DDPO on corrected answers and vanilla DPO on preference "
            "rankings, from the same SFT model, at each number of annotated pairs; pooled over seeds</p>"
            f'<div class="plots">{"".join(plots)}</div><h2>Tables</h2><pre>{_e(md)}</pre>'
            + _footer(cfg, ",".join(map(str, summary["seeds"]))))
    atomic_write(os.path.join(cfg.out_dir, "report.html"), _shell(title, body))
    print(f"wrote {cfg.out_dir}/scaling.json, scaling.md, scaling.svg and report.html")
    return summary
