"""Every metric in ``report.json``'s ``systems[NAME]["metrics"]``, kept as per-question statistics
so that the paired bootstrap (:mod:`.bootstrap`) can resample questions.

Keys (all in [0, 1] except ``length_ratio``):

* ``bleu1`` .. ``bleu4``: sentence-average cumulative BLEU-n, smoothed (``--smoothing``, nltk);
  ``bleu1_unsmoothed`` .. ``bleu4_unsmoothed``: the same with nltk ``method0``;
* ``rouge1``, ``rouge2``, ``rougeL``: mean ROUGE F1 from ``rouge_score`` (Google's reference
  implementation; its own tokeniser, no stemming unless ``--rouge-stem``);
* ``chrf``: corpus chrF from ``sacrebleu`` (character 6-grams, beta 2), divided by 100;
* ``length_ratio``: total answer length / total reference length, in BLEU-recipe tokens;
* ``eos_rate``: share of answers that ended at EOS rather than at the token budget (only for
  systems whose predictions carry ``finish_reason``; ``null`` otherwise, e.g. baselines);
* ``repetition_4gram``: per answer, the share of its word 4-grams that already occurred earlier
  in the same answer (small models loop: "the signs and symptoms of the signs and symptoms of ..."),
  averaged over answers with at least one 4-gram.

Each metric is ``reduce(sum over questions of stats[i])``: a mean is ``(value, 1)`` summed, a ratio
is ``(numerator, denominator)`` summed, chrF sums sacrebleu's character n-gram counts exactly as
``corpus_chrf`` does. Summing a resample's rows gives the resample's metric.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from megatron_yuyuan.eval.bleu import (
    NS,
    VARIANTS,
    bleu_report,
    pair_bleus,
    pair_counts,
    smoothing_function,
    tokenize,
)

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@dataclass
class Statistic:
    """One metric of one system as summable per-question statistics."""

    stats: np.ndarray
    """[questions, k] float64: question i's contribution."""
    reduce: Callable[[np.ndarray], np.ndarray]
    """Summed statistics [..., k] -> metric values [...]."""

    def value(self) -> float:
        return float(self.reduce(self.stats.sum(axis=0)))

    def subset(self, rows: Sequence[int]) -> float:
        """The metric over these questions only (e.g. one question type)."""
        return float(self.reduce(self.stats[list(rows)].sum(axis=0)))

    def per_question(self) -> list[float]:
        """Each question's value, for a metric that is a plain mean (weights all 1)."""
        return (self.stats[:, 0] / self.stats[:, 1]).tolist()


def _ratio(sums: np.ndarray) -> np.ndarray:
    num, den = sums[..., 0], sums[..., 1]
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den != 0)


def mean_statistic(values: Sequence[float], weights: Sequence[float] | None = None) -> Statistic:
    """Mean of ``values`` (over the questions whose weight is 1)."""
    v = np.asarray(values, dtype=np.float64)
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=np.float64)
    return Statistic(np.stack([v * w, w], axis=1), _ratio)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists: the value at the corner of
    rouge_score's ``len(a) x len(b)`` table, computed bit-parallel (Crochemore et al. 2001): one
    big-integer step per token of ``a``, the positions of ``b`` as bits. A 500 x 500-word pair
    takes microseconds instead of the table's quarter-million Python steps."""
    if not a or not b:
        return 0
    where: dict[str, int] = {}
    for i, token in enumerate(b):
        where[token] = where.get(token, 0) | (1 << i)
    full = (1 << len(b)) - 1
    v = full  # a 0 bit marks a column where the LCS grew
    for token in a:
        u = v & where.get(token, 0)
        v = ((v + u) | (v - u)) & full
    return len(b) - v.bit_count()


class RougeF1:
    """ROUGE-1/2/L F1 of rouge_score (Google's reference implementation): its tokeniser (and
    stemmer), its n-gram scoring; ROUGE-L's LCS by :func:`lcs_length`."""

    def __init__(self, stem: bool = False) -> None:
        from rouge_score import tokenizers

        self.tokenizer = tokenizers.DefaultTokenizer(use_stemmer=stem)

    def __call__(self, ref: str, hyp: str) -> list[float]:
        """[rouge1, rouge2, rougeL] F1 of one pair."""
        from rouge_score import rouge_scorer, scoring

        target, prediction = self.tokenizer.tokenize(ref), self.tokenizer.tokenize(hyp)
        out = [
            rouge_scorer._score_ngrams(
                rouge_scorer._create_ngrams(target, n), rouge_scorer._create_ngrams(prediction, n)
            ).fmeasure
            for n in (1, 2)
        ]
        if not target or not prediction:
            return [*out, 0.0]
        lcs = lcs_length(target, prediction)
        return [*out, scoring.fmeasure(lcs / len(prediction), lcs / len(target))]


def _chrf():
    from sacrebleu.metrics import CHRF

    return CHRF()


def _chrf_reduce(sums: np.ndarray) -> np.ndarray:
    """Corpus chrF of summed sacrebleu chrF statistics [..., k] -> [...]."""
    metric = _chrf()
    flat = sums.reshape(-1, sums.shape[-1])
    scores = [metric._compute_score_from_stats(list(row)).score / 100.0 for row in flat]
    return np.asarray(scores).reshape(sums.shape[:-1])


def repetition(tokens: list[str], n: int = 4) -> float | None:
    """Share of the answer's n-grams that repeat an earlier one (None: shorter than n)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else None


def pair_statistics(
    refs: Sequence[str], hyps: Sequence[str], smoothing: str, stem: bool = False
) -> dict[str, np.ndarray]:
    """Every per-question statistic of these pairs (one chunk of the questions), by kind:
    ``[pairs, k]`` arrays; the texts are not kept."""
    from sacrebleu.metrics import BLEU

    smoothed, unsmoothed = smoothing_function(smoothing), smoothing_function("method0")
    rouge = RougeF1(stem)
    kinds = ("bleu", "bleu_unsmoothed", "bleu_counts", "rouge", "lengths", "repetition")
    rows: dict[str, list] = {k: [] for k in kinds}
    for ref, hyp in zip(refs, hyps):
        r, h = tokenize(ref), tokenize(hyp)
        counts = pair_counts(r, h)
        rows["bleu_counts"].append(counts)
        rows["bleu"].append(pair_bleus(counts, smoothed, r, h))
        rows["bleu_unsmoothed"].append(pair_bleus(counts, unsmoothed, r, h))
        rows["rouge"].append(rouge(ref, hyp))
        rows["lengths"].append((len(h), len(r)))
        rep = repetition(h)
        rows["repetition"].append((rep or 0.0, float(rep is not None)))
    out = {k: np.asarray(v, np.float64).reshape(len(refs), -1) for k, v in rows.items()}
    for key, metric in (("chrf", _chrf()), ("sacrebleu", BLEU())):
        stats = metric._extract_corpus_statistics(list(hyps), [list(refs)])
        out[key] = np.asarray(stats, np.float64).reshape(len(refs), -1)
    return out


def _pair_statistics_job(job: tuple) -> dict[str, np.ndarray]:
    return pair_statistics(*job)


def _worker_setup() -> None:
    """In a scoring worker: Ctrl-C is the parent's to handle (one line, exit 130; it then
    terminates the workers), and on Linux the worker dies with its parent (a parent killed by
    SIGTERM/SIGKILL leaves no worker behind)."""
    import signal
    import sys

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked while it started
    if sys.platform == "linux":
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _run_jobs(jobs: list[tuple], workers: int) -> Iterator[dict[str, np.ndarray]]:
    """:func:`pair_statistics` of each job, in order; on a pool of fresh (spawned) processes when
    ``workers > 1``. Leaving early (Ctrl-C, an error) terminates the workers at once."""
    if workers <= 1 or len(jobs) < 2:
        yield from map(_pair_statistics_job, jobs)
        return
    import multiprocessing
    import signal

    context = multiprocessing.get_context("spawn")  # no fork of a process that may run threads
    # The workers start with SIGINT blocked (the mask survives exec): a Ctrl-C while one is still
    # importing would print its traceback. A Ctrl-C meanwhile reaches this process when unblocked.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        pool = context.Pool(min(workers, len(jobs)), initializer=_worker_setup)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    with pool:
        yield from pool.imap(_pair_statistics_job, jobs)


@dataclass
class SystemScores:
    """One system's scores: the bootstrappable statistics and the BLEU tables of the report."""

    statistics: dict[str, Statistic | None]
    """Every metric of ``report.json``'s ``metrics``, as per-question statistics."""
    bleu: dict
    """``{"smoothed" | "unsmoothed": {level: {kind: {n: score}}}}``."""
    sacrebleu: float
    """sacreBLEU's corpus BLEU (its own tokeniser), divided by 100."""


def score_system(
    refs: Sequence[str],
    hyps: Sequence[str],
    smoothing: str,
    finished_at_eos: Sequence[bool] | None = None,
    stem: bool = False,
    workers: int = 1,
    chunk: int = 500,
) -> SystemScores:
    """Score one system's answers ``chunk`` pairs at a time, on ``workers`` processes when there
    is more than one chunk: memory holds the per-question statistics (a few dozen numbers each),
    never every pair's tokens."""
    from sacrebleu.metrics import BLEU

    jobs = [
        (refs[i : i + chunk], hyps[i : i + chunk], smoothing, stem)
        for i in range(0, len(refs), chunk)
    ]
    parts = list(_run_jobs(jobs, workers))
    arr = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    out: dict[str, Statistic | None] = {}
    for suffix, key in (("", "bleu"), ("_unsmoothed", "bleu_unsmoothed")):
        for n in NS:
            out[f"bleu{n}{suffix}"] = mean_statistic(arr[key][:, VARIANTS.index(("cumulative", n))])
    for col, key in enumerate(ROUGE_TYPES):
        out[key] = mean_statistic(arr["rouge"][:, col])
    out["chrf"] = Statistic(arr["chrf"], _chrf_reduce)
    out["length_ratio"] = Statistic(arr["lengths"], _ratio)
    out["eos_rate"] = None if finished_at_eos is None else mean_statistic(finished_at_eos)
    out["repetition_4gram"] = mean_statistic(arr["repetition"][:, 0], arr["repetition"][:, 1])
    last = (tokenize(refs[-1]), tokenize(hyps[-1]))
    bleu = {
        label: bleu_report(arr[key], arr["bleu_counts"], smoothing_function(method), last)
        for label, key, method in (
            ("unsmoothed", "bleu_unsmoothed", "method0"),
            ("smoothed", "bleu", smoothing),
        )
    }
    sacre = BLEU()._compute_score_from_stats(list(arr["sacrebleu"].sum(axis=0))).score / 100.0
    return SystemScores(out, bleu, sacre)


def answer_statistics(
    refs: Sequence[str],
    hyps: Sequence[str],
    smoothing: str,
    finished_at_eos: Sequence[bool] | None = None,
    stem: bool = False,
) -> dict[str, Statistic | None]:
    """Every metric above for one system, keyed as in ``report.json`` (in this process)."""
    return score_system(refs, hyps, smoothing, finished_at_eos, stem).statistics
