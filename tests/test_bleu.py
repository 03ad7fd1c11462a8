"""BLEU report values against a direct nltk / sacreBLEU computation, and answer extraction."""

from __future__ import annotations

import json
import re

import pytest
import sacrebleu
from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu, sentence_bleu

from megatron_yuyuan.eval.scoring import EvalOptions, evaluate
from megatron_yuyuan.evaluate import main
from megatron_yuyuan.prompts import answer_from_continuation, extract_answer

REFS = [
    {"id": "a", "qtype": "symptoms", "answer": "Fever, cough and a sore throat are common."},
    {"id": "b", "qtype": "symptoms", "answer": "Most people have no symptoms at all."},
    {
        "id": "c",
        "qtype": "treatment",
        "answer": "Treatment includes rest, fluids, and pain relievers.",
    },
    {"id": "d", "qtype": "treatment", "answer": "Surgery may be needed."},
]
PREDS = {
    "a": "Fever and cough are common symptoms.",
    "b": "Most people have no symptoms.",
    "c": "Rest and fluids.",
    "d": "",
}


def recipe_tokens(text):  # the documented recipe, written out independently
    return re.findall(r"\w+|[^\w\s]", text.lower())


@pytest.fixture
def files(tmp_path):
    refs, preds = tmp_path / "refs.jsonl", tmp_path / "preds.jsonl"
    refs.write_text("".join(json.dumps(r) + "\n" for r in REFS))
    # one system gives 'prediction', the same answers through full generations work too
    preds.write_text(
        "".join(json.dumps({"id": k, "prediction": v}) + "\n" for k, v in PREDS.items())
    )
    gens = tmp_path / "gens.jsonl"
    gens.write_text(
        "".join(
            json.dumps({"id": k, "generation": f"Question:x answer: {v}<|endoftext|>junk"}) + "\n"
            for k, v in PREDS.items()
        )
    )
    return refs, preds, gens


@pytest.mark.parametrize("smoothing", ["method1", "method4", "method7"])
def test_every_variant_equals_direct_nltk(files, tmp_path, smoothing):
    refs, preds, gens = files
    report = evaluate(
        refs, {"ours": preds, "gen": gens}, tmp_path / "out", EvalOptions(smoothing=smoothing)
    )
    r = [recipe_tokens(x["answer"]) for x in REFS]
    h = [recipe_tokens(PREDS[x["id"]]) for x in REFS]
    for system in ("ours", "gen"):
        entry = report["systems"][system]
        for label, fn in (
            ("unsmoothed", SmoothingFunction().method0),
            ("smoothed", getattr(SmoothingFunction(), smoothing)),
        ):
            for n in (1, 2, 3, 4):
                for kind, w in (
                    ("cumulative", (1 / n,) * n),
                    ("individual", tuple(float(i == n - 1) for i in range(n))),
                ):
                    sent = sum(
                        sentence_bleu([a], b, weights=w, smoothing_function=fn)
                        for a, b in zip(r, h)
                    ) / len(r)
                    corp = corpus_bleu([[a] for a in r], h, weights=w, smoothing_function=fn)
                    assert entry[label]["sentence"][kind][n] == pytest.approx(sent, abs=1e-12)
                    assert entry[label]["corpus"][kind][n] == pytest.approx(corp, abs=1e-12)
        want = sacrebleu.corpus_bleu([PREDS[x["id"]] for x in REFS], [[x["answer"] for x in REFS]])
        assert entry["sacrebleu"] == pytest.approx(want.score / 100, abs=1e-12)
    assert set(report["systems"]["ours"]["by_qtype"]) == {"symptoms", "treatment"}
    assert report["systems"]["ours"]["smoothed"]["sentence"]["cumulative"][1] > 0.3


def test_report_files_and_cli(files, tmp_path, capsys):
    refs, preds, _ = files
    out = tmp_path / "report"
    assert (
        main(["--references", str(refs), "--predictions", f"ours={preds}", "--out", str(out)]) == 0
    )
    md = (out / "report.md").read_text()
    assert "## BLEU, sentence-average cumulative, unsmoothed" in md
    assert "### Corpus-level individual BLEU, smoothed (method1)" in md
    assert "| ours |" in md and "By question type" in md
    assert (out / "bleu_by_qtype.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "report.json").read_text())["questions"] == 4
    assert "| ours |" in capsys.readouterr().out


def test_cli_errors_are_clear(files, tmp_path, capsys):
    refs, preds, _ = files
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"id": "a", "prediction": "x"}) + "\n")
    assert (
        main(["--references", str(refs), "--predictions", f"s={short}", "--out", str(tmp_path)])
        == 2
    )
    assert "no prediction for 3 reference id(s)" in capsys.readouterr().err
    assert (
        main(
            [
                "--references",
                str(refs),
                "--predictions",
                f"s={preds}",
                "--out",
                str(tmp_path),
                "--smoothing",
                "laplace",
            ]
        )
        == 2
    )
    assert "SmoothingFunction method" in capsys.readouterr().err
    assert (
        main(["--references", str(refs), "--predictions", "nofile.jsonl", "--out", str(tmp_path)])
        == 2
    )
    assert "NAME=FILE.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text, answer",
    [
        (
            "Question:What is X ? answer: X is a disease.<|endoftext|>Question: more",
            "X is a disease.",
        ),
        ("Question:What is X ? Answer: capital marker", "capital marker"),
        ("Question:Is the answer: known ? answer: yes", "known ? answer: yes"),  # first marker wins
        ("no marker at all<|endoftext|>tail", "no marker at all"),
        ("Question:q answer: never stops", "never stops"),
        ("", ""),
        ("<|endoftext|>", ""),
    ],
)
def test_extract_answer_edge_cases(text, answer):
    assert extract_answer(text) == answer


def test_answer_from_continuation():
    assert answer_from_continuation(" Rest and fluids.<|endoftext|> junk") == "Rest and fluids."
    assert answer_from_continuation(" no eos") == "no eos"
    assert answer_from_continuation("") == ""
