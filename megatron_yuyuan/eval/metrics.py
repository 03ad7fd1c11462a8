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

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from megatron_yuyuan.eval.bleu import NS, sentence_bleus

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


def mean_statistic(values: Sequence[float], weights: Optional[Sequence[float]] = None) -> Statistic:
    """Mean of ``values`` (over the questions whose weight is 1)."""
    v = np.asarray(values, dtype=np.float64)
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=np.float64)
    return Statistic(np.stack([v * w, w], axis=1), _ratio)


def rouge_f1s(refs: Sequence[str], hyps: Sequence[str], stem: bool = False) -> dict[str, list]:
    """{rouge type: [F1 of each pair]}."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=stem)
    out: dict[str, list] = {key: [] for key in ROUGE_TYPES}
    for ref, hyp in zip(refs, hyps):
        scores = scorer.score(ref, hyp)  # (target, prediction)
        for key in ROUGE_TYPES:
            out[key].append(scores[key].fmeasure)
    return out


def chrf_statistic(refs: Sequence[str], hyps: Sequence[str]) -> Statistic:
    """Corpus chrF from sacrebleu's own per-sentence counts (what its paired bootstrap sums)."""
    from sacrebleu.metrics import CHRF

    metric = CHRF()
    stats = np.asarray(metric._extract_corpus_statistics(list(hyps), [list(refs)]), np.float64)

    def reduce(sums: np.ndarray) -> np.ndarray:
        flat = sums.reshape(-1, sums.shape[-1])
        scores = [metric._compute_score_from_stats(list(row)).score / 100.0 for row in flat]
        return np.asarray(scores).reshape(sums.shape[:-1])

    return Statistic(stats, reduce)


def repetition(tokens: list[str], n: int = 4) -> Optional[float]:
    """Share of the answer's n-grams that repeat an earlier one (None: shorter than n)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else None


def answer_statistics(
    refs: Sequence[str],
    hyps: Sequence[str],
    ref_tokens: Sequence[list[str]],
    hyp_tokens: Sequence[list[str]],
    smoothing: str,
    finished_at_eos: Optional[Sequence[bool]] = None,
    stem: bool = False,
) -> dict[str, Optional[Statistic]]:
    """Every metric above for one system, keyed as in ``report.json``."""
    out: dict[str, Optional[Statistic]] = {}
    for suffix, method in (("", smoothing), ("_unsmoothed", "method0")):
        per_pair = sentence_bleus(ref_tokens, hyp_tokens, method)
        for n in NS:
            out[f"bleu{n}{suffix}"] = mean_statistic(per_pair[n])
    for key, values in rouge_f1s(refs, hyps, stem).items():
        out[key] = mean_statistic(values)
    out["chrf"] = chrf_statistic(refs, hyps)
    lengths = [(len(h), len(r)) for h, r in zip(hyp_tokens, ref_tokens)]
    out["length_ratio"] = Statistic(np.asarray(lengths, np.float64).reshape(-1, 2), _ratio)
    out["eos_rate"] = None if finished_at_eos is None else mean_statistic(finished_at_eos)
    reps = [repetition(t) for t in hyp_tokens]
    out["repetition_4gram"] = mean_statistic(
        [r or 0.0 for r in reps], [r is not None for r in reps]
    )
    return out
