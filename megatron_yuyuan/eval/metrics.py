"""Answer metrics next to BLEU, each from the library that defines it.

* ROUGE-1/2/L F1: ``rouge_score`` (Google's reference implementation; its own tokeniser, no
  stemming unless asked), averaged over questions.
* chrF: ``sacrebleu.corpus_chrf`` (character 6-grams, beta 2), divided by 100.
* length ratio: mean answer length / mean reference length, in BLEU-recipe tokens.
* repetition: per answer, the share of its word 4-grams that already occurred earlier in the same
  answer (small models loop: "the signs and symptoms of the signs and symptoms of ..."), averaged
  over answers that have at least one 4-gram.
"""

from __future__ import annotations

from typing import Sequence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge_f1(refs: Sequence[str], hyps: Sequence[str], stem: bool = False) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 over the pairs."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=stem)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for ref, hyp in zip(refs, hyps):
        scores = scorer.score(ref, hyp)  # (target, prediction)
        for key in ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    n = max(len(refs), 1)
    return {key: value / n for key, value in totals.items()}


def chrf(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus chrF in [0, 1]."""
    import sacrebleu

    return sacrebleu.corpus_chrf(list(hyps), [list(refs)]).score / 100.0


def length_ratio(ref_tokens: Sequence[list[str]], hyp_tokens: Sequence[list[str]]) -> float:
    """Mean answer length over mean reference length (1.0: as long as the references)."""
    ref = sum(map(len, ref_tokens))
    return sum(map(len, hyp_tokens)) / ref if ref else 0.0


def repetition_rate(hyp_tokens: Sequence[list[str]], n: int = 4) -> float:
    """Mean share of an answer's n-grams that repeat an earlier n-gram of the same answer."""
    rates = []
    for tokens in hyp_tokens:
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        if grams:
            rates.append(1.0 - len(set(grams)) / len(grams))
    return sum(rates) / len(rates) if rates else 0.0


def answer_metrics(
    refs: Sequence[str],
    hyps: Sequence[str],
    ref_tokens: Sequence[list[str]],
    hyp_tokens: Sequence[list[str]],
    stem: bool = False,
) -> dict[str, float]:
    """Every metric above for one system: keys rouge1, rouge2, rougeL, chrf, length_ratio,
    repetition_4gram."""
    return {
        **rouge_f1(refs, hyps, stem),
        "chrf": chrf(refs, hyps),
        "length_ratio": length_ratio(ref_tokens, hyp_tokens),
        "repetition_4gram": repetition_rate(hyp_tokens),
    }
