"""BLEU-1..4 with nltk, every choice spelled out (upstream never published its own recipe).

* tokenisation: lower-case, then ``re.findall(r"\\w+|[^\\w\\s]", text)`` (words and single
  punctuation marks; needs no downloaded nltk data);
* BLEU-n **cumulative**: nltk weights ``(1/n,) * n``; **individual**: weight 1 on n-grams of size n;
* smoothing: none (nltk ``method0``) and one named ``SmoothingFunction`` method (``--smoothing``);
* **sentence**: mean of ``sentence_bleu`` over questions; **corpus**: ``corpus_bleu``.
"""

from __future__ import annotations

import re
import warnings
from typing import Optional, Sequence

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


def smoothing_function(name: str):
    from nltk.translate.bleu_score import SmoothingFunction

    fn = getattr(SmoothingFunction(), name, None)
    if fn is None or not name.startswith("method"):
        raise UserError(
            f"--smoothing {name!r}: use an nltk SmoothingFunction method (method0..method7)"
        )
    return fn


def sentence_bleus(
    refs: Sequence[list[str]], hyps: Sequence[list[str]], smoothing: str, kind: str = "cumulative"
) -> dict[int, list[float]]:
    """{n: [sentence BLEU-n of each pair]} for tokenised references and hypotheses."""
    from nltk.translate.bleu_score import sentence_bleu

    fn = smoothing_function(smoothing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns on zero n-gram overlaps, which are expected
        return {
            n: [
                sentence_bleu([r], h, weights=bleu_weights(n, kind), smoothing_function=fn)
                for r, h in zip(refs, hyps)
            ]
            for n in NS
        }


def bleu_scores(
    refs: Sequence[list[str]],
    hyps: Sequence[list[str]],
    smoothing: str,
    cumulative: Optional[dict[int, list[float]]] = None,
) -> dict:
    """{level: {kind: {n: score}}}: sentence averages and corpus BLEU, cumulative and individual.
    ``cumulative``: the per-pair cumulative sentence BLEU when already computed (not redone)."""
    from nltk.translate.bleu_score import corpus_bleu

    fn = smoothing_function(smoothing)
    out: dict = {level: {kind: {} for kind in KINDS} for level in LEVELS}
    for kind in KINDS:
        if kind == "cumulative" and cumulative is not None:
            per_pair = cumulative
        else:
            per_pair = sentence_bleus(refs, hyps, smoothing, kind)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for n in NS:
                scores = per_pair[n]
                out["sentence"][kind][n] = sum(scores) / len(scores) if scores else 0.0
                out["corpus"][kind][n] = corpus_bleu(
                    [[r] for r in refs],
                    list(hyps),
                    weights=bleu_weights(n, kind),
                    smoothing_function=fn,
                )
    return out
