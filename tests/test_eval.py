"""The evaluation package against its reference libraries: ROUGE = rouge_score, chrF = sacrebleu,
BLEU = nltk; the baselines, the paired bootstrap and the rendered reports."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from megatron_yuyuan.eval.baselines import baseline_answers, nearest_training_rows
from megatron_yuyuan.eval.bleu import tokenize
from megatron_yuyuan.eval.bootstrap import paired_bootstrap
from megatron_yuyuan.eval.metrics import answer_statistics
from megatron_yuyuan.eval.scoring import EvalOptions, evaluate
from megatron_yuyuan.evaluate import main

REFS = [
    "Glaucoma is a group of eye diseases that damage the optic nerve.",
    "This condition is inherited in an autosomal recessive pattern.",
    "Treatment includes rest, fluids, and pain relievers.",
    "About 1 in 10,000 people are affected.",
    "Symptoms include fever, cough and a sore throat.",
    "Surgery may be needed to remove the tumor.",
]
HYPS = [
    "Glaucoma is an eye disease of the eye.",
    "It is inherited in an autosomal dominant pattern.",
    "Rest and fluids.",
    "It affects 1 in 5,000 people.",
    "Fever and cough are common symptoms.",
    "",
]
TRAIN = [
    {"question": "What is (are) Glaucoma ?", "answer": "Glaucoma damages the optic nerve."},
    {"question": "Is Bloom syndrome inherited ?", "answer": "This condition is inherited."},
    {"question": "What are the treatments for flu ?", "answer": "Rest and fluids help."},
    {"question": "How many people are affected by X ?", "answer": "It is rare."},
]


def stats(refs, hyps, eos=None, smoothing="method1"):
    return answer_statistics(refs, hyps, smoothing, eos)


def test_metrics_equal_their_reference_libraries():
    import sacrebleu
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_score import rouge_scorer

    got = {k: (s.value() if s else None) for k, s in stats(REFS, HYPS).items()}
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    for key in ("rouge1", "rouge2", "rougeL"):
        want = np.mean([scorer.score(r, h)[key].fmeasure for r, h in zip(REFS, HYPS)])
        assert got[key] == pytest.approx(want, abs=1e-9)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score / 100, abs=1e-9)
    for n in (1, 4):
        for key, fn in ((f"bleu{n}", "method1"), (f"bleu{n}_unsmoothed", "method0")):
            want = np.mean(
                [
                    sentence_bleu(
                        [tokenize(r)],
                        tokenize(h),
                        weights=(1 / n,) * n,
                        smoothing_function=getattr(SmoothingFunction(), fn),
                    )
                    for r, h in zip(REFS, HYPS)
                ]
            )
            assert got[key] == pytest.approx(want, abs=1e-12)
    want_len = sum(len(tokenize(h)) for h in HYPS) / sum(len(tokenize(r)) for r in REFS)
    assert got["length_ratio"] == pytest.approx(want_len)
    assert got["eos_rate"] is None  # no finish information given
    loop = "the signs and symptoms of the signs and symptoms of the signs"
    looped = stats([REFS[0], REFS[1]], [loop, "short"])  # "short" has no 4-gram: not counted
    assert looped["repetition_4gram"].value() == pytest.approx(1 - 5 / 9)  # 9 4-grams, 5 unique
    assert stats(REFS[:2], HYPS[:2], eos=[True, False])["eos_rate"].value() == 0.5


def test_perfect_predictions_score_one_everywhere():
    got = {k: s.value() for k, s in stats(REFS, REFS, eos=[True] * len(REFS)).items()}
    for key, value in got.items():
        want = 0.0 if key == "repetition_4gram" else 1.0
        assert value == pytest.approx(want, abs=1e-12), key


def test_retrieval_returns_the_training_answer_of_a_verbatim_question():
    questions = [TRAIN[2]["question"], "what is glaucoma", "Is Bloom syndrome inherited ?"]
    assert nearest_training_rows([t["question"] for t in TRAIN], questions) == [2, 0, 1]
    answers = baseline_answers("retrieval", questions, TRAIN)
    assert answers[0] == "Rest and fluids help." and answers[2] == "This condition is inherited."
    assert baseline_answers("echo", questions, TRAIN) == questions


def test_bootstrap_contains_the_point_estimate_and_is_reproducible():
    systems = {"base": stats(REFS, [r.split()[0] for r in REFS]), "ours": stats(REFS, HYPS)}
    ci, versus = paired_bootstrap(systems, 500, seed=7, baseline="base")
    again, _ = paired_bootstrap(systems, 500, seed=7, baseline="base")
    other, _ = paired_bootstrap(systems, 500, seed=8, baseline="base")
    assert ci == again and ci != other
    for name, per in systems.items():
        for metric, s in per.items():
            if s is None:
                continue
            lo, hi = ci[name][metric]
            assert lo - 1e-12 <= s.value() <= hi + 1e-12, (name, metric)
    v = versus["ours"]["rougeL"]
    assert v["delta"] == pytest.approx(
        systems["ours"]["rougeL"].value() - systems["base"]["rougeL"].value()
    )
    assert v["ci"][0] <= v["delta"] <= v["ci"][1] and 0 <= v["p"] <= 1


def test_a_perfect_system_is_significantly_above_echo():
    refs = REFS * 5  # 30 questions
    systems = {"perfect": stats(refs, refs), "echo": stats(refs, ["what is it ?"] * len(refs))}
    _, versus = paired_bootstrap(systems, 1000, seed=0, baseline="echo")
    assert versus["perfect"]["rougeL"]["significant"] and versus["perfect"]["rougeL"]["p"] == 0


@pytest.fixture
def files(tmp_path):
    refs = tmp_path / "refs.jsonl"
    qtypes = ["information", "inheritance", "treatment", "frequency", "symptoms", "treatment"]
    questions = [
        "What is glaucoma ?",
        "Is it inherited ?",
        "What are the treatments for flu ?",
        "How many people are affected ?",
        "What are the symptoms of flu ?",
        "What are the treatments for tumors ?",
    ]
    refs.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "qtype": t, "question": q, "answer": a}) + "\n"
            for i, (t, q, a) in enumerate(zip(qtypes, questions, REFS))
        )
    )
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(t) + "\n" for t in TRAIN))
    systems = {}
    for name, hyps in (("ours", HYPS), ("perfect", REFS), ("short", [h[:12] for h in HYPS])):
        systems[name] = tmp_path / f"{name}.jsonl"
        systems[name].write_text(
            "".join(
                json.dumps({"id": f"q{i}", "prediction": h, "finish_reason": "eos"}) + "\n"
                for i, h in enumerate(hyps)
            )
        )
    return refs, train, systems


def test_report_with_three_systems_and_two_baselines(files, tmp_path):
    refs, train, systems = files
    out = tmp_path / "out"
    opts = EvalOptions(baselines=("retrieval", "echo"), train_data=train, bootstrap=200, examples=4)
    report = evaluate(refs, systems, out, opts)
    assert list(report["systems"]) == ["ours", "perfect", "short", "retrieval", "echo"]
    assert report["baseline"] == "retrieval"
    perfect = report["systems"]["perfect"]
    assert perfect["metrics"]["rougeL"] == pytest.approx(1.0)
    assert perfect["metrics"]["eos_rate"] == 1.0
    assert report["systems"]["echo"]["metrics"]["eos_rate"] is None
    assert set(perfect["ci"]) >= {"bleu1", "bleu4", "rougeL", "chrf", "length_ratio"}
    assert "vs_baseline" in perfect and "vs_baseline" not in report["systems"]["retrieval"]
    assert report["systems"]["retrieval"]["baseline"] is True
    saved = json.loads((out / "report.json").read_text())
    assert saved["systems"]["ours"]["ci"]["rougeL"] == report["systems"]["ours"]["ci"]["rougeL"]
    md = (out / "report.md").read_text()
    for title in ("ROUGE F1", "chrF", "Answer behaviour", "By question type: ROUGE-L"):
        assert title in md
    assert "| *retrieval* (baseline) |" in md and "| short |" in md
    ex = (out / "examples.md").read_text()
    assert ex.count("| **reference** |") == 4
    assert all(f"| {name} |" in ex for name in ("ours", "perfect", "short", "retrieval", "echo"))
    retrieved = [json.loads(x) for x in (out / "baseline_retrieval.jsonl").read_text().splitlines()]
    assert retrieved[2]["prediction"] == "Rest and fluids help."  # verbatim training question


def test_cli_baselines_and_their_errors(files, tmp_path, capsys):
    refs, train, systems = files
    out = tmp_path / "cli"
    args = [
        "--references",
        str(refs),
        "--predictions",
        f"ours={systems['ours']}",
        "--out",
        str(out),
    ]
    assert main(args + ["--train-data", str(train), "--bootstrap", "200"]) == 0
    printed = capsys.readouterr().out
    assert "*retrieval* (baseline)" in printed and "baseline_echo.jsonl" in printed
    for extra, message in (
        (["--baselines", "retrieval"], "needs --train-data"),
        (["--baselines", "oracle"], "choose from retrieval, echo"),
        (["--bootstrap", "10"], "at least 100"),
        (["--train-data", str(tmp_path / "nope.jsonl")], "no such file"),
    ):
        assert main(args + extra) == 2
        assert message in capsys.readouterr().err
    clash = [
        "--references",
        str(refs),
        "--predictions",
        f"echo={systems['ours']}",
        "--out",
        str(out),
        "--baselines",
        "echo",
    ]
    assert main(clash) == 2
    assert "taken by a baseline" in capsys.readouterr().err


def test_inputs_that_used_to_crash_or_mislead(files, tmp_path, capsys):
    refs, train, systems = files
    out = tmp_path / "odd"
    rows = [json.loads(x) for x in refs.read_text().splitlines()]
    rows[0]["qtype"], rows[1]["qtype"] = "$\\bogus$", None  # math text, mixed types: plotted
    odd = tmp_path / "odd_refs.jsonl"
    odd.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--references", str(odd), "--predictions", f"ours={systems['ours']}", "--out", str(out)]
    assert main(args + ["--bootstrap", "100"]) == 0
    assert (out / "bleu_by_qtype.png").is_file()
    with pytest.raises(SystemExit) as exc:
        main(args + ["--bootstrap-seed", "-1"])
    assert exc.value.code == 2 and "--bootstrap-seed" in capsys.readouterr().err
    # a baseline must never overwrite an input file
    mine = out / "baseline_echo.jsonl"
    mine.write_bytes(systems["ours"].read_bytes())
    before = mine.read_bytes()
    assert (
        main(
            [
                "--references",
                str(refs),
                "--predictions",
                f"old={mine}",
                "--out",
                str(out),
                "--baselines",
                "echo",
            ]
        )
        == 2
    )
    assert "would be overwritten" in capsys.readouterr().err and mine.read_bytes() == before
    # ids on some rows only: refused instead of matching by position
    partial = tmp_path / "partial.jsonl"
    partial.write_text('{"prediction": "a"}\n' * 5 + '{"id": "q5", "prediction": "b"}\n')
    assert (
        main(["--references", str(refs), "--predictions", f"p={partial}", "--out", str(out)]) == 2
    )
    assert "rows have an 'id'" in capsys.readouterr().err
    # answers too long to score: one line, not minutes of ROUGE-L
    long = tmp_path / "long.jsonl"
    long.write_text(
        "".join(json.dumps({"id": f"q{i}", "prediction": "word " * 30000}) + "\n" for i in range(6))
    )
    huge_refs = tmp_path / "huge_refs.jsonl"
    huge_refs.write_text("".join(json.dumps({**r, "answer": "term " * 1000}) + "\n" for r in rows))
    assert (
        main(["--references", str(huge_refs), "--predictions", f"l={long}", "--out", str(out)]) == 2
    )
    assert "too long to score" in capsys.readouterr().err
    tiny = tmp_path / "one.jsonl"  # one question: no intervals, and the report says why
    tiny.write_text(refs.read_text().splitlines()[0] + "\n")
    one = tmp_path / "one"
    assert (
        main(
            [
                "--references",
                str(tiny),
                "--predictions",
                f"ours={systems['ours']}",
                "--out",
                str(one),
            ]
        )
        == 0
    )
    report = json.loads((one / "report.json").read_text())
    assert "skipped" in report["bootstrap"] and "ci" not in report["systems"]["ours"]
    assert "No intervals: 1 questions" in (one / "report.md").read_text()


def _random_pairs(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """Texts over a small vocabulary (so n-grams repeat and match), from empty to 600 words."""
    import random

    rng = random.Random(seed)
    words = "the a of cell gene is rare pain fever , . ( ) treatment may cause 5,000 people".split()
    lengths = [0, 1, 2, 3, 5, 40, 600]
    return [
        tuple(" ".join(rng.choices(words, k=rng.choice(lengths))) for _ in range(2))
        for _ in range(count)
    ]


def test_rouge_with_the_fast_lcs_equals_rouge_score():
    from rouge_score import rouge_scorer

    from megatron_yuyuan.eval.metrics import RougeF1

    for stem in (False, True):
        ours = RougeF1(stem)
        scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=stem)
        for ref, hyp in _random_pairs(150):
            want = scorer.score(ref, hyp)
            got = ours(ref, hyp)
            assert got == [want[k].fmeasure for k in ("rouge1", "rouge2", "rougeL")], (ref, hyp)


@pytest.mark.parametrize("method", [f"method{i}" for i in (0, 1, 2, 3, 4, 5, 7)])  # 6: see below
def test_bleu_from_counts_equals_nltk_for_every_smoothing(method):
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu, sentence_bleu

    from megatron_yuyuan.eval.bleu import VARIANTS, bleu_report, bleu_weights, pair_bleus
    from megatron_yuyuan.eval.bleu import pair_counts as counts_of

    fn = getattr(SmoothingFunction(), method)
    pairs = [(tokenize(r), tokenize(h)) for r, h in _random_pairs(60, seed=1)]
    counts = np.asarray([counts_of(r, h) for r, h in pairs], np.float64)
    sentence = np.asarray([pair_bleus(c, fn, r, h) for c, (r, h) in zip(counts, pairs)])
    report = bleu_report(sentence, counts, fn, pairs[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for col, (kind, n) in enumerate(VARIANTS):
            w = bleu_weights(n, kind)
            want = [sentence_bleu([r], h, weights=w, smoothing_function=fn) for r, h in pairs]
            assert sentence[:, col].tolist() == pytest.approx(want, abs=1e-12, rel=1e-12)
            corpus = corpus_bleu([[r] for r, _ in pairs], [h for _, h in pairs], w, fn)
            assert report["corpus"][kind][n] == pytest.approx(corpus, abs=1e-12, rel=1e-12)


def test_smoothing_method6_is_refused_in_one_line(tmp_path, capsys):
    # nltk's method6 indexes the trigram precision even for BLEU-1: it cannot score this report
    refs = tmp_path / "refs.jsonl"
    refs.write_text(json.dumps({"id": "1", "answer": "a b c"}) + "\n")
    args = ["--references", str(refs), "--predictions", f"x={refs}", "--out", str(tmp_path / "o")]
    assert main([*args, "--smoothing", "method6"]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "--smoothing method6" in err and "Traceback" not in err


def test_scoring_on_worker_processes_equals_scoring_in_process():
    from megatron_yuyuan.eval.metrics import score_system

    refs, hyps = zip(*_random_pairs(130, seed=2))
    one = score_system(list(refs), list(hyps), "method1", workers=1, chunk=40)
    two = score_system(list(refs), list(hyps), "method1", workers=2, chunk=40)
    assert one.bleu == two.bleu and one.sacrebleu == two.sacrebleu
    for key, stat in one.statistics.items():
        if stat is not None:
            assert np.array_equal(stat.stats, two.statistics[key].stats), key


def test_ctrl_c_while_workers_score_exits_130_and_leaves_no_process(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    refs, preds = tmp_path / "refs.jsonl", tmp_path / "preds.jsonl"
    pairs = [(r or "x", h) for r, h in _random_pairs(4000, seed=3)]  # references are never empty
    refs.write_text(
        "".join(json.dumps({"id": str(i), "answer": r}) + "\n" for i, (r, _) in enumerate(pairs))
    )
    preds.write_text(
        "".join(
            json.dumps({"id": str(i), "prediction": h}) + "\n" for i, (_, h) in enumerate(pairs)
        )
    )
    cmd = [sys.executable, "-m", "megatron_yuyuan.evaluate", "--references", str(refs)]
    cmd += ["--predictions", f"x={preds}", "--out", str(tmp_path / "out"), "--workers", "2"]
    run = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True)
    time.sleep(4)  # imports, reading, the workers started
    assert run.poll() is None, "finished before the interrupt: make the input larger"
    os.killpg(run.pid, signal.SIGINT)
    _, err = run.communicate(timeout=30)
    assert run.returncode == 130 and err.strip() == "error: interrupted", err[-2000:]
    ps = subprocess.run(["ps", "-e", "-o", "sid=,stat=,args="], capture_output=True, text=True)
    alive = [
        ln
        for ln in ps.stdout.splitlines()
        if ln.split()[0] == str(run.pid) and "Z" not in ln.split()[1]
    ]
    assert alive == []
    assert not (tmp_path / "out" / "report.json").exists()
