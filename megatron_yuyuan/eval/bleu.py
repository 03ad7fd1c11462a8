"""BLEU-1..4 with nltk, every choice spelled out (upstream never published its own recipe).

* tokenisation: lower-case, then ``re.findall(r"\\w+|[^\\w\\s]", text)`` (words and single
  punctuation marks; needs no downloaded nltk data);
* BLEU-n **cumulative**: nltk weights ``(1/n,) * n``; **individual**: weight 1 on n-grams of size n;
* smoothing: none (nltk ``method0``) and one named ``SmoothingFunction`` method (``--smoothing``);
* **sentence**: mean of ``sentence_bleu`` over questions; **corpus**: ``corpus_bleu``.

Speed without a second implementation: each pair's n-gram counts are taken once with nltk's own
``modified_precision`` and ``closest_ref_length`` (:func:`pair_counts`); every variant is then
nltk's ``corpus_bleu`` final step (its smoothing function, ``brevity_penalty``, the weighted log
sum) on those counts (:func:`bleu_from_counts`), which is what ``sentence_bleu`` (a one-pair
``corpus_bleu``) and ``corpus_bleu`` (summed counts) compute. One variant costs a few Fraction
operations instead of a pass over the n-grams; memory holds counts, not texts.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence

import numpy as np

from megatron_yuyuan.errors import UserError

_TOKEN = re.compile(r"\w+|[^\w\s]")
NS = (1, 2, 3, 4)
KINDS = ("cumulative", "individual")
LEVELS = ("sentence", "corpus")


def tokenize(text: str) -> list[str]:
    """The documented BLEU tokenisation."""
    return _TOKEN.findall(text.lower())


def bleu_weights(n: int, kind: str) -> tuple[float, ...]:
    if kind == "cumulative":
        return (1.0 / n,) * n
    return tuple(1.0 if i == n - 1 else 0.0 for i in range(n))


VARIANTS = tuple((kind, n) for kind in KINDS for n in NS)
"""The per-pair BLEU columns, in this order: cumulative 1..4, individual 1..4."""


def pair_counts(ref: list[str], hyp: list[str]) -> list[int]:
    """nltk's BLEU counts of one tokenised pair: n-gram matches (n = 1..4), n-grams of the answer
    (n = 1..4, at least 1 each, as nltk counts them), answer length, closest reference length."""
    from nltk.translate.bleu_score import closest_ref_length, modified_precision

    p = [modified_precision([ref], hyp, n) for n in NS]
    lengths = [len(hyp), closest_ref_length([ref], len(hyp))]
    return [x.numerator for x in p] + [x.denominator for x in p] + lengths


def bleu_from_counts(
    counts: Sequence[int], weights: tuple[float, ...], fn, ref: list[str], hyp: list[str]
) -> float:
    """nltk ``corpus_bleu(..., weights)``'s score from (summed) :func:`pair_counts`, exactly as a
    call with these weights alone computes it: precisions up to ``len(weights)``, smoothed by
    ``fn``, which nltk hands the last pair's reference and answer (``ref``, ``hyp``)."""
    from nltk.translate.bleu_score import Fraction, brevity_penalty

    k, half = len(weights), len(NS)
    if counts[0] == 0:  # no unigram matches: nltk returns 0 before smoothing
        return 0.0
    p_n = [Fraction(int(counts[i]), int(counts[half + i]), _normalize=False) for i in range(k)]
    hyp_len, ref_len = int(counts[2 * half]), int(counts[2 * half + 1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns on zero n-gram overlaps, which are expected
        p_n = fn(p_n, references=[ref], hypothesis=hyp, hyp_len=hyp_len)
    bp = brevity_penalty(ref_len, hyp_len)
    return bp * math.exp(math.fsum(w * math.log(p) for w, p in zip(weights, p_n) if p > 0))


def pair_bleus(counts: Sequence[int], fn, ref: list[str], hyp: list[str]) -> list[float]:
    """Sentence BLEU of one pair for every :data:`VARIANTS` column."""
    return [bleu_from_counts(counts, bleu_weights(n, kind), fn, ref, hyp) for kind, n in VARIANTS]


def bleu_report(
    sentence: np.ndarray, counts: np.ndarray, fn, last: tuple[list[str], list[str]]
) -> dict:
    """{level: {kind: {n: score}}} from per-pair sentence BLEUs ``[questions, len(VARIANTS)]`` and
    BLEU counts ``[questions, 10]`` (:func:`pair_counts`); ``last``: the last pair's tokens (nltk's
    corpus smoothing sees them)."""
    total = counts.sum(axis=0)
    out: dict = {level: {kind: {} for kind in KINDS} for level in LEVELS}
    for col, (kind, n) in enumerate(VARIANTS):
        scores = sentence[:, col].tolist()
        out["sentence"][kind][n] = sum(scores) / len(scores)
        out["corpus"][kind][n] = bleu_from_counts(total, bleu_weights(n, kind), fn, *last)
    return out


def smoothing_function(name: str):
    from nltk.translate.bleu_score import SmoothingFunction

    fn = getattr(SmoothingFunction(), name, None)
    if fn is None or not name.startswith("method"):
        raise UserError(
            f"--smoothing {name!r}: use an nltk SmoothingFunction method (method0..method7)"
        )
    if name == "method6":  # nltk's method6 reads p_3: IndexError on BLEU-1 and BLEU-2
        raise UserError(
            "--smoothing method6: nltk's method6 needs trigram precisions and fails on BLEU-1 "
            "and BLEU-2; choose another method (method1 is the usual one)"
        )
    return fn
