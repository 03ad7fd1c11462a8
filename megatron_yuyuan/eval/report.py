"""The files a person reads: ``report.md`` (one table per metric family, rows = systems, 95%
intervals, significance against the first baseline), ``examples.md`` (questions with every
system's answer side by side), the per-question-type chart, and the console summary."""

from __future__ import annotations

import random
from pathlib import Path

from megatron_yuyuan.eval.bleu import KINDS, NS
from megatron_yuyuan.files import save_figure_atomic

# (title, [(metric key, column header)]) — the families of report.md's main tables
FAMILIES = (
    (
        "BLEU, sentence-average cumulative, smoothed ({sm})",
        [(f"bleu{n}", f"BLEU-{n}") for n in NS],
    ),
    (
        "BLEU, sentence-average cumulative, unsmoothed (method0)",
        [(f"bleu{n}_unsmoothed", f"BLEU-{n}") for n in NS],
    ),
    (
        "ROUGE F1 (rouge_score{stem})",
        [("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L")],
    ),
    ("chrF (sacrebleu, corpus)", [("chrf", "chrF")]),
    (
        "Answer behaviour",
        [
            ("length_ratio", "length / reference"),
            ("eos_rate", "ended at EOS"),
            ("repetition_4gram", "repeated 4-grams"),
        ],
    ),
)
BETTER, WORSE = "▲", "▼"


def _cell(entry: dict, key: str) -> str:
    value = entry["metrics"].get(key)
    if value is None:
        return "–"
    text = f"{value:.4f}"
    if key in entry.get("ci", {}):
        lo, hi = entry["ci"][key]
        text += f" ({lo:.4f}–{hi:.4f})"
    vs = entry.get("vs_baseline", {}).get(key)
    if vs and vs["significant"]:
        text += f" {BETTER if vs['delta'] > 0 else WORSE}"
    return text


def _name(name: str, entry: dict) -> str:
    return f"*{name}* (baseline)" if entry["baseline"] else name


def markdown(report: dict) -> str:
    sm = report["smoothing"]
    boot = report["bootstrap"]
    base = report["baseline"]
    out = [
        f"# Evaluation on {report['questions']} questions",
        "",
        f"References: `{report['references']}`. BLEU tokenisation: {report['tokenization']}; "
        f"smoothed = nltk `SmoothingFunction().{sm}`, unsmoothed = `method0`.",
        "",
    ]
    if boot.get("skipped"):
        out += [f"No intervals: {boot['skipped']}.", ""]
    elif boot["resamples"]:
        out += [
            f"Each cell: value (95% paired-bootstrap interval over questions, "
            f"{boot['resamples']} resamples, seed {boot['seed']})."
            + (
                f" {BETTER} / {WORSE}: significantly above / below the `{base}` baseline "
                f"(the paired difference's 95% interval excludes 0)."
                if base
                else ""
            ),
            "",
        ]
    stem = ", Porter stemming" if report["rouge_stem"] else ", no stemming"
    for title, columns in FAMILIES:
        out += [f"## {title.format(sm=sm, stem=stem)}", ""]
        out += ["| system | " + " | ".join(h for _, h in columns) + " |"]
        out += ["|---|" + "---|" * len(columns)]
        for name, entry in report["systems"].items():
            out.append(
                f"| {_name(name, entry)} | "
                + " | ".join(_cell(entry, k) for k, _ in columns)
                + " |"
            )
        out.append("")
    out += ["## Every BLEU variant (no intervals)", ""]
    for level, level_name in (("sentence", "Sentence-average"), ("corpus", "Corpus-level")):
        for kind in KINDS:
            for smooth in ("unsmoothed", "smoothed"):
                label = "unsmoothed" if smooth == "unsmoothed" else f"smoothed ({sm})"
                out += [f"### {level_name} {kind} BLEU, {label}", ""]
                out += ["| system | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 |", "|---|---|---|---|---|"]
                for name, e in report["systems"].items():
                    vals = e[smooth][level][kind]
                    out.append(f"| {name} | " + " | ".join(f"{vals[n]:.4f}" for n in NS) + " |")
                out.append("")
    out += ["### sacreBLEU (corpus, 13a)", "", "| system | sacreBLEU |", "|---|---|"]
    out += [f"| {n} | {e['sacrebleu']:.4f} |" for n, e in report["systems"].items()]
    names = list(report["systems"])
    qtypes = sorted({q for e in report["systems"].values() for q in e["by_qtype"]})
    for key, label in (("bleu4", f"cumulative BLEU-4, smoothed ({sm})"), ("rougeL", "ROUGE-L")):
        out += [
            "",
            f"## By question type: {label}",
            "",
            "| question type | n | " + " | ".join(names) + " |",
            "|---|---|" + "---|" * len(names),
        ]
        for q in qtypes:
            first = report["systems"][names[0]]["by_qtype"][q]
            out.append(
                f"| {q} | {first['n']} | "
                + " | ".join(f"{report['systems'][n]['by_qtype'][q][key]:.4f}" for n in names)
                + " |"
            )
    return "\n".join(out) + "\n"


def _md_cell(text: str, limit: int = 1500) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit] + f" … ({len(text) - limit} more chars)"


def example_rows(questions: int, n: int, seed: int) -> list[int]:
    """The ``n`` random questions (seeded) that ``examples.md`` shows."""
    return sorted(random.Random(seed).sample(range(questions), min(n, questions)))


def examples(
    refs: list[dict], answers: dict[str, dict[int, str]], picked: list[int], seed: int
) -> str:
    """The questions ``picked`` (:func:`example_rows`), each with the reference and every
    system's answer (``answers[system][question]``)."""
    out = [
        f"# {len(picked)} random questions of {len(refs)} (seed {seed}), answers side by side",
        "",
    ]
    for k, i in enumerate(picked, 1):
        r = refs[i]
        tags = ", ".join(str(r[t]) for t in ("qtype", "id") if t in r)
        out += [
            f"## {k}. {r.get('question', '(no question text)')}" + (f" ({tags})" if tags else "")
        ]
        out += [
            "",
            "| system | answer |",
            "|---|---|",
            f"| **reference** | {_md_cell(r['answer'])} |",
        ]
        out += [f"| {name} | {_md_cell(a[i]) or '(empty)'} |" for name, a in answers.items()]
        out.append("")
    return "\n".join(out) + "\n"


def plot_by_qtype(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # question types and system names are data, not LaTeX: "$x$" must not be parsed as math
    with matplotlib.rc_context({"text.parse_math": False}):
        _plot(report, path, plt)


def _plot(report: dict, path: Path, plt) -> None:
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
    save_figure_atomic(fig, path, dpi=110)


def print_summary(report: dict) -> None:
    """The headline numbers on the console (the full tables are in report.md)."""
    sm = report["smoothing"]
    print(
        f"{report['questions']} questions; sentence-average cumulative BLEU smoothed ({sm}) "
        f"and unsmoothed BLEU-4; ROUGE-L and chrF with 95% intervals when bootstrapped:"
    )
    print("| system | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | BLEU-4 unsmoothed | ROUGE-L | chrF |")
    print("|---|---|---|---|---|---|---|---|")
    for name, e in report["systems"].items():
        m = e["metrics"]
        print(
            f"| {_name(name, e)} | "
            + " | ".join(f"{m[f'bleu{n}']:.4f}" for n in NS)
            + f" | {m['bleu4_unsmoothed']:.4f} | {_cell(e, 'rougeL')} | {_cell(e, 'chrf')} |"
        )
