"""Paired tests between two models judged on the same images: far more sensitive than comparing two accuracies'
intervals, because the images both get right or both get wrong cancel out.

McNemar's exact test looks only at the discordant images (one model right, the other wrong); the paired bootstrap
resamples images (the same draw for both models, and for every seed when runs are pooled) to give an interval for
the accuracy difference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

CHUNK = 250


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Exact two-sided McNemar test: under 'no difference' each discordant image is a fair coin."""
    a_arr, b_arr = np.asarray(a, bool), np.asarray(b, bool)
    only_a, only_b = int((a_arr & ~b_arr).sum()), int((~a_arr & b_arr).sum())
    n = only_a + only_b
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2**n if n else 1.0
    return {"only_a_right": only_a, "only_b_right": only_b, "p_value": min(1.0, 2 * tail)}


def paired_bootstrap(
    pairs: Sequence[tuple[Sequence[bool], Sequence[bool]]], draws: int = 10_000, seed: int = 0
) -> dict:
    """Accuracy difference (a - b, in points) pooled over pairs of runs on the same images, with a 95% interval
    and the share of draws where a is not better."""
    a = np.stack([np.asarray(p[0], np.float64) for p in pairs])  # [runs, images]
    b = np.stack([np.asarray(p[1], np.float64) for p in pairs])
    diff = (a - b).mean(axis=0)  # per image, averaged over seeds
    rng = np.random.default_rng(seed)
    chunks = [  # a few hundred draws at a time: memory stays at chunk x images whatever the number of draws
        diff[rng.integers(0, diff.size, size=(min(CHUNK, draws - start), diff.size))].mean(axis=1)
        for start in range(0, draws, CHUNK)
    ]
    means = np.concatenate(chunks) * 100
    return {
        "difference_points": float(diff.mean() * 100),
        "ci95_points": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))],
        "share_not_better": float((means <= 0).mean()),
        "runs": len(pairs),
        "images": int(diff.size),
    }
