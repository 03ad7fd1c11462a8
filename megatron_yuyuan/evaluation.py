"""BLEU-1..4 for several systems on the same references, with every choice spelled out.

    python -m megatron_yuyuan.evaluate --references data/medquad_test.jsonl \\
        --predictions ours=runs/eval/pred.jsonl hf=runs/eval/pred_hf.jsonl --out runs/eval/report

Recipe (upstream never published its own):

* text: the reference ``answer`` field and the prediction's ``prediction`` field (or, for rows that
  only carry a full ``generation``, the text after the first ``answer:`` up to EOS);
* tokenisation: lower-case, then ``re.findall(r"\\w+|[^\\w\\s]", text)`` (words and single
  punctuation marks; needs no downloaded nltk data);
* BLEU-n **cumulative**: nltk weights ``(1/n,) * n``; **individual**: weight 1 on n-grams of size n;
* smoothing: none (nltk ``method0``) and one named ``SmoothingFunction`` method (``--smoothing``);
* **sentence**: mean of ``sentence_bleu`` over questions; **corpus**: ``corpus_bleu``;
* sacreBLEU: ``sacrebleu.corpus_bleu`` with its default 13a tokeniser, divided by 100.

Next to BLEU, ``report.json`` holds ``systems[NAME]["metrics"]``: ROUGE-1/2/L F1, chrF, length ratio
and 4-gram repetition (:mod:`megatron_yuyuan.eval.metrics`).

Writes ``report.md`` (rows = systems, columns = BLEU-1..4, one table per variant), ``report.json``,
and ``bleu_by_qtype.png`` (sentence-average cumulative BLEU-4, smoothed, per question type).
"""

from __future__ import annotations

import json
import re
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from megatron_yuyuan.errors import DataError, UserError
from megatron_yuyuan.eval.metrics import answer_metrics
from megatron_yuyuan.files import read_jsonl, write_text_atomic
from megatron_yuyuan.prompts import extract_answer

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


def bleu_scores(refs: Sequence[list[str]], hyps: Sequence[list[str]], smoothing: str) -> dict:
    """{level: {kind: {n: score}}} for tokenised references and hypotheses."""
    from nltk.translate.bleu_score import corpus_bleu, sentence_bleu

    fn = smoothing_function(smoothing)
    out: dict = {level: {kind: {} for kind in KINDS} for level in LEVELS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns on zero n-gram overlaps, which are expected
        for kind in KINDS:
            for n in NS:
                w = bleu_weights(n, kind)
                scores = [
                    sentence_bleu([r], h, weights=w, smoothing_function=fn)
                    for r, h in zip(refs, hyps)
                ]
                out["sentence"][kind][n] = sum(scores) / len(scores) if scores else 0.0
                out["corpus"][kind][n] = corpus_bleu(
                    [[r] for r in refs], list(hyps), weights=w, smoothing_function=fn
                )
    return out


def prediction_text(row: dict, path: Path) -> str:
    for key in ("prediction", "generation"):
        if key in row and not isinstance(row[key], str):
            raise DataError(
                f"{path}: row {row.get('id', '?')}: {key!r} must be a string, got {row[key]!r}"
            )
    if "prediction" in row:
        return row["prediction"]
    if "generation" in row:
        return extract_answer(row["generation"])
    raise DataError(f"{path}: row {row.get('id', '?')} has neither 'prediction' nor 'generation'")


def align(references: list[dict], predictions: list[dict], path: Path) -> list[str]:
    """Prediction text per reference, matched by ``id`` (or by position when ids are absent)."""
    if all("id" in r for r in references) and all("id" in p for p in predictions):
        for rows, where in ((references, "references"), (predictions, str(path))):
            ids = [r["id"] for r in rows]
            if len(set(map(repr, ids))) != len(ids):
                dup = next(i for i in ids if ids.count(i) > 1)
                raise DataError(f"{where}: id {dup!r} appears more than once; ids must be unique")
        by_id = {p["id"]: p for p in predictions}
        missing = [r["id"] for r in references if r["id"] not in by_id]
        if missing:
            raise DataError(
                f"{path}: no prediction for {len(missing)} reference id(s), e.g. {missing[:3]}"
            )
        return [prediction_text(by_id[r["id"]], path) for r in references]
    if len(predictions) != len(references):
        raise DataError(
            f"{path}: {len(predictions)} predictions for {len(references)} references "
            f"and no ids to match them"
        )
    return [prediction_text(p, path) for p in predictions]


def evaluate(
    references_path: Path, systems: dict[str, Path], out_dir: Path, smoothing: str = "method1"
) -> dict:
    """Score every system; write report.md, report.json and the per-qtype chart into ``out_dir``."""
    import sacrebleu

    smoothing_function(smoothing)  # fail early on a bad name
    refs = read_jsonl(references_path, required=("answer",))
    if not refs:
        raise DataError(f"{references_path}: no references")
    ref_text = [r["answer"] for r in refs]
    ref_tok = [tokenize(t) for t in ref_text]
    qtypes = [r.get("qtype", "all") for r in refs]
    report = {
        "references": str(references_path),
        "questions": len(refs),
        "smoothing": smoothing,
        "tokenization": r"lowercase, re.findall(r'\w+|[^\w\s]')",
        "systems": {},
    }
    for name, path in systems.items():
        hyps = align(refs, read_jsonl(path), path)
        hyp_tok = [tokenize(h) for h in hyps]
        entry = {
            "predictions": str(path),
            "unsmoothed": bleu_scores(ref_tok, hyp_tok, "method0"),
            "smoothed": bleu_scores(ref_tok, hyp_tok, smoothing),
            "sacrebleu": sacrebleu.corpus_bleu(hyps, [ref_text]).score / 100.0,
            # ROUGE-1/2/L F1, chrF, length ratio, 4-gram repetition (see eval.metrics)
            "metrics": answer_metrics(ref_text, hyps, ref_tok, hyp_tok),
            "by_qtype": {},
        }
        groups = defaultdict(list)
        for i, q in enumerate(qtypes):
            groups[q].append(i)
        for q, idx in sorted(groups.items()):
            scores = bleu_scores([ref_tok[i] for i in idx], [hyp_tok[i] for i in idx], smoothing)
            entry["by_qtype"][q] = {"n": len(idx), "bleu4": scores["sentence"]["cumulative"][4]}
        report["systems"][name] = entry
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "report.json", json.dumps(report, indent=1))
    write_text_atomic(out_dir / "report.md", render_markdown(report))
    plot_by_qtype(report, out_dir / "bleu_by_qtype.png")
    return report


def _table(report: dict, pick) -> list[str]:
    lines = ["| system | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 |", "|---|---|---|---|---|"]
    for name, entry in report["systems"].items():
        lines.append(f"| {name} | " + " | ".join(f"{pick(entry)[n]:.4f}" for n in NS) + " |")
    return lines


def render_markdown(report: dict) -> str:
    sm = report["smoothing"]
    out = [
        f"# BLEU on {report['questions']} questions",
        "",
        f"References: `{report['references']}`. Tokenisation: {report['tokenization']}. "
        f"Smoothed = nltk `SmoothingFunction().{sm}`; unsmoothed = `method0`.",
        "",
    ]
    for level, level_name in (("sentence", "Sentence-average"), ("corpus", "Corpus-level")):
        for kind in KINDS:
            for smooth in ("unsmoothed", "smoothed"):
                label = "unsmoothed" if smooth == "unsmoothed" else f"smoothed ({sm})"
                out += [f"## {level_name} {kind} BLEU, {label}", ""]
                out += _table(report, lambda e, s=smooth, lv=level, k=kind: e[s][lv][k])
                out.append("")
    out += ["## sacreBLEU (corpus, 13a)", "", "| system | sacreBLEU |", "|---|---|"]
    out += [f"| {n} | {e['sacrebleu']:.4f} |" for n, e in report["systems"].items()]
    out += [
        "",
        "## ROUGE F1 (rouge_score, no stemming), chrF (sacrebleu), length and repetition",
        "",
        "| system | ROUGE-1 | ROUGE-2 | ROUGE-L | chrF | length / reference | repeated 4-grams |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, e in report["systems"].items():
        m = e["metrics"]
        out.append(
            f"| {n} | {m['rouge1']:.4f} | {m['rouge2']:.4f} | {m['rougeL']:.4f} | "
            f"{m['chrf']:.4f} | {m['length_ratio']:.2f} | {m['repetition_4gram']:.3f} |"
        )
    names = list(report["systems"])
    qtypes = sorted({q for e in report["systems"].values() for q in e["by_qtype"]})
    out += [
        "",
        f"## By question type: sentence-average cumulative BLEU-4, smoothed ({sm})",
        "",
        "| question type | n | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for q in qtypes:
        first = report["systems"][names[0]]["by_qtype"][q]
        out.append(
            f"| {q} | {first['n']} | "
            + " | ".join(f"{report['systems'][n]['by_qtype'][q]['bleu4']:.4f}" for n in names)
            + " |"
        )
    return "\n".join(out) + "\n"


def plot_by_qtype(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["systems"])
    qtypes = sorted({q for e in report["systems"].values() for q in e["by_qtype"]})
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(qtypes) + 2), 4))
    for i, name in enumerate(names):
        vals = [report["systems"][name]["by_qtype"].get(q, {}).get("bleu4", 0.0) for q in qtypes]
        ax.bar([x + i * width for x in range(len(qtypes))], vals, width, label=name)
    ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(qtypes))])
    ax.set_xticklabels(qtypes, rotation=30, ha="right")
    ax.set_ylabel(f"BLEU-4 (cumulative, {report['smoothing']})")
    ax.set_title(f"BLEU-4 by question type ({report['questions']} questions)")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def print_summary(report: dict) -> None:
    print(
        f"sentence-average cumulative BLEU on {report['questions']} questions "
        f"(unsmoothed | smoothed {report['smoothing']}):"
    )
    print(
        "| system | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | smoothed BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, e in report["systems"].items():
        u, s = e["unsmoothed"]["sentence"]["cumulative"], e["smoothed"]["sentence"]["cumulative"]
        print(
            f"| {name} | "
            + " | ".join(f"{u[n]:.4f}" for n in NS)
            + " | "
            + " | ".join(f"{s[n]:.4f}" for n in NS)
            + " |"
        )
