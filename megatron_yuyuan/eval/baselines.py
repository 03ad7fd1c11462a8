"""Answers that need no model, scored next to ours so a number has a floor to stand on.

* ``retrieval``: the answer of the training question most similar to the test question (TF-IDF
  cosine over the BLEU-recipe tokens; ties go to the earlier training row). MedQuAD is full of
  templated answers ("This condition is inherited in an autosomal recessive pattern ..."), so
  copying a neighbour's answer scores well on n-gram metrics without any medical knowledge.
* ``echo``: the question itself (a lower bound for anything that reads the question).

TF-IDF: raw term counts times ``idf = ln((1 + N) / (1 + df)) + 1`` (scikit-learn's smoothed idf),
rows L2-normalised, so a dot product is the cosine.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch

from megatron_yuyuan.eval.bleu import tokenize

BASELINES = ("retrieval", "echo")


def _tfidf(docs: Sequence[list[str]], vocab: dict[str, int], idf: torch.Tensor) -> torch.Tensor:
    """Sparse [len(docs), len(vocab)] L2-normalised TF-IDF rows (unknown terms are dropped)."""
    rows, cols, vals = [], [], []
    for i, doc in enumerate(docs):
        counts = Counter(t for t in doc if t in vocab)
        weights = {vocab[t]: c * float(idf[vocab[t]]) for t, c in counts.items()}
        norm = math.sqrt(sum(w * w for w in weights.values())) or 1.0
        for j, w in weights.items():
            rows.append(i)
            cols.append(j)
            vals.append(w / norm)
    index = torch.tensor([rows, cols], dtype=torch.int64).reshape(2, -1)
    return torch.sparse_coo_tensor(
        index,
        torch.tensor(vals, dtype=torch.float64),
        (len(docs), len(vocab)),
        check_invariants=True,
    ).coalesce()


def nearest_training_rows(
    train_questions: Sequence[str], questions: Sequence[str], chunk: int = 256
) -> list[int]:
    """Index of the most TF-IDF-similar training question for each question."""
    train_tok = [tokenize(q) for q in train_questions]
    vocab: dict[str, int] = {}
    df: Counter = Counter()
    for doc in train_tok:
        for t in set(doc):
            vocab.setdefault(t, len(vocab))
            df[t] += 1
    n = len(train_tok)
    idf = torch.zeros(len(vocab), dtype=torch.float64)
    for t, j in vocab.items():
        idf[j] = math.log((1 + n) / (1 + df[t])) + 1.0
    train = _tfidf(train_tok, vocab, idf)  # sparse [N, V]
    best: list[int] = []
    for start in range(0, len(questions), chunk):
        test = _tfidf([tokenize(q) for q in questions[start : start + chunk]], vocab, idf)
        sims = torch.sparse.mm(train, test.to_dense().T).T  # [c, N] cosines
        # argmax returns the first maximum: ties go to the earlier training row
        best += sims.argmax(dim=1).tolist()
    return best


def baseline_answers(name: str, questions: Sequence[str], train_rows: Sequence[dict]) -> list[str]:
    """The named baseline's answer to every question."""
    if name == "echo":
        return list(questions)
    if name == "retrieval":
        idx = nearest_training_rows([r["question"] for r in train_rows], questions)
        return [train_rows[i]["answer"] for i in idx]
    raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
