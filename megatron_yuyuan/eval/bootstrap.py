"""Paired bootstrap over questions: confidence intervals and significance against a baseline.

Each of ``n`` resamples draws the questions with replacement (one seeded generator, the same draws
for every system: that is what makes the comparison *paired*) and recomputes every metric from its
summed per-question statistics. The 95% interval is the 2.5th..97.5th percentile of the resampled
values; a system differs significantly from the baseline when the interval of the paired
differences excludes 0 (two-sided, alpha = 0.05), as in Koehn (2004) and sacreBLEU's
``--paired-bs``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from megatron_yuyuan.eval.metrics import Statistic

ALPHA = 0.05


RESAMPLES_PER_BLOCK = 64
"""Resamples drawn at once: their [block, questions] count matrix is the bootstrap's memory
(64 x 50,000 questions: 25 MB), whatever ``resamples`` is."""


def resample_blocks(questions: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """[block, questions] arrays: how often each question is drawn in each resample, for
    ``resamples`` resamples in blocks of :data:`RESAMPLES_PER_BLOCK`. One seeded generator draws
    the questions in order, so the draws are those of a single ``[resamples, questions]`` call."""
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, RESAMPLES_PER_BLOCK):
        block = min(RESAMPLES_PER_BLOCK, resamples - start)
        idx = rng.integers(0, questions, size=(block, questions))  # [b, n]
        yield np.stack([np.bincount(row, minlength=questions) for row in idx]).astype(np.float64)


def resampled(stat: Statistic, counts: np.ndarray) -> np.ndarray:
    """[b] metric values, one per resample of ``counts`` [b, n]."""
    return stat.reduce(counts @ stat.stats)  # [b, n] @ [n, k] -> [b, k] -> [b]


def interval(values: np.ndarray) -> list[float]:
    lo, hi = np.percentile(values, [100 * ALPHA / 2, 100 * (1 - ALPHA / 2)])
    return [float(lo), float(hi)]


def paired_bootstrap(
    systems: dict[str, dict[str, Statistic | None]],
    resamples: int,
    seed: int,
    baseline: str | None = None,
) -> tuple[dict, dict]:
    """(ci, versus): ``ci[system][metric] = [lo, hi]``; ``versus[system][metric] = {"delta",
    "ci", "p", "significant"}`` against ``baseline`` (every other system), with ``p`` the
    two-sided bootstrap p-value."""
    first = next(iter(systems.values()))
    questions = next(s for s in first.values() if s is not None).stats.shape[0]
    parts: dict[str, dict[str, list[np.ndarray]]] = {
        name: {m: [] for m, s in stats.items() if s is not None} for name, stats in systems.items()
    }
    for counts in resample_blocks(questions, resamples, seed):
        for name, stats in systems.items():
            for m, values in parts[name].items():
                values.append(resampled(stats[m], counts))
    samples = {name: {m: np.concatenate(v) for m, v in per.items()} for name, per in parts.items()}
    ci = {name: {m: interval(v) for m, v in per.items()} for name, per in samples.items()}
    versus: dict = {}
    if baseline is not None:
        base = samples[baseline]
        for name, per in samples.items():
            if name == baseline:
                continue
            versus[name] = {}
            for m, values in per.items():
                if m not in base:
                    continue
                diff = values - base[m]
                lo, hi = interval(diff)
                p = min(1.0, 2 * min(np.mean(diff <= 0), np.mean(diff >= 0)))
                versus[name][m] = {
                    "delta": float(systems[name][m].value() - systems[baseline][m].value()),
                    "ci": [lo, hi],
                    "p": float(p),
                    "significant": bool(lo > 0 or hi < 0),
                }
    return ci, versus
