"""How sure a measured rate is: 95% intervals and paired differences, for the miniature's report
and for halbench.py alike.

    from stats import wilson, resample, ratio_draws, interval, paired_difference
    wilson(20, 100)                                   # (0.133, 0.289): a proportion of answers
    counts = resample(len(items), seed=0)             # [draws, n]: the same resamples for every model
    interval(ratio_draws([(items, counts)], "hallucinated", "mentions"))
    paired_difference([(a, counts)], [(b, counts)], "said_wrong", "said")   # [a - b, low, high]

A rate is a ratio of sums over items (answers, scenes): sum(num) / sum(den), with den None meaning
the number of items. Each item is a dict of counts. Wilson's interval serves the rates that are
proportions of items; the others (several mentions per answer, a mean of shares) are bootstrapped
over items. Models that answered the same items are compared on paired resamples: each resample
draws the items once and scores both models on them, so the easy and hard items it happens to draw
cancel out of the difference. Pooled over several runs (strata), items are resampled within each
stratum. Every draw comes from a generator seeded by the caller: the same run, the same intervals.
Tests: python -m pytest tests/test_report.py tests/test_halbench.py
"""
import math

import torch

DRAWS = 2000  # bootstrap resamples; a 95% interval runs from the 50th to the 1950th smallest
Z = 1.959964  # the normal quantile of 97.5%


def wilson(k, n):
    """Wilson's 95% interval of a proportion k/n ((0, 1) when n is 0: nothing was measured)."""
    if n == 0:
        return 0.0, 1.0
    p, z2 = k / n, Z * Z / n
    centre, half = (p + z2 / 2) / (1 + z2), Z / (1 + z2) * math.sqrt(p * (1 - p) / n + z2 / (4 * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def resample(n, seed, draws=DRAWS):
    """[draws, n]: how many times each of n items is drawn in each of `draws` resamples of n
    items with replacement, fixed by the seed (so a sum over a resample is a matrix product)."""
    idx = torch.randint(n, (draws, n), generator=torch.Generator().manual_seed(seed))
    ones = torch.ones(draws, n, dtype=torch.float64)
    return torch.zeros(draws, n, dtype=torch.float64).scatter_add_(1, idx, ones)


def ratio(items, num, den):
    """sum(item[num]) / sum(item[den]) over items (den None: the number of items); over nothing, 0.0."""
    total = lambda key: sum(o[key] for o in items) if key else len(items)
    return total(num) / max(total(den), 1)


def ratio_draws(strata, num, den):
    """The ratio on every resample: strata is [(items, resample counts)], one per stratum (a seed),
    the sums of the numerator and denominator pooled over them. -> [draws] float64."""
    total = lambda key: sum(counts @ torch.tensor([o[key] if key else 1 for o in items], dtype=torch.float64)
                            for items, counts in strata)
    return total(num) / total(den).clamp_min(1)


def interval(draws):
    """The 2.5% and 97.5% percentiles of bootstrap draws."""
    lo, hi = torch.quantile(draws, torch.tensor([0.025, 0.975], dtype=draws.dtype)).tolist()
    return lo, hi


def paired_difference(strata_a, strata_b, num, den):
    """[a - b, low, high]: the difference in a ratio between two models that answered the same
    items, and its paired-bootstrap 95% interval (strata_a and strata_b share their resamples)."""
    diff = (ratio([o for items, _ in strata_a for o in items], num, den)
            - ratio([o for items, _ in strata_b for o in items], num, den))
    return [diff, *interval(ratio_draws(strata_a, num, den) - ratio_draws(strata_b, num, den))]


def significant(diff):
    """Whether a [difference, low, high] interval leaves out zero."""
    return diff[1] > 0 or diff[2] < 0
