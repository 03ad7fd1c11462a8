"""Score several systems (and optional baselines) on the same references: the report's numbers.

Texts: the reference's ``answer`` field; the prediction's ``prediction`` field (or, for rows that
only carry a full ``generation``, the text after the first ``answer:`` up to EOS). Predictions are
matched to references by ``id`` (or by position when neither file has ids). The metric recipe is
in :mod:`.bleu` and :mod:`.metrics`, the intervals in :mod:`.bootstrap`, the files in
:mod:`.report`.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from megatron_yuyuan.data.manifest import check_member
from megatron_yuyuan.errors import DataError, UserError
from megatron_yuyuan.eval import report as render
from megatron_yuyuan.eval.baselines import BASELINES, baseline_answers
from megatron_yuyuan.eval.bleu import smoothing_function
from megatron_yuyuan.eval.bootstrap import paired_bootstrap
from megatron_yuyuan.eval.metrics import score_system
from megatron_yuyuan.files import claim_outputs, read_jsonl, write_jsonl, write_text_atomic
from megatron_yuyuan.prompts import extract_answer

REPORT_FILES = ("report.md", "report.json", "examples.md", "bleu_by_qtype.png")
MIN_BOOTSTRAP_QUESTIONS = 5  # fewer: every resample is nearly the same few answers
MAX_ROUGE_CELLS = 20_000_000  # ROUGE-L's LCS table is words(ref) x words(answer) Python ints


@dataclass
class EvalOptions:
    """How the systems are scored and what the report holds."""

    smoothing: str = "method1"
    """nltk ``SmoothingFunction`` method of the smoothed BLEU variants (``method0`` = none)."""
    rouge_stem: bool = False
    """Porter-stem words before ROUGE (rouge_score's ``use_stemmer``)."""
    baselines: Sequence[str] = ()
    """Model-free systems to add as rows: ``retrieval`` (needs ``train_data``), ``echo``."""
    train_data: Path | None = None
    """Training split JSONL (``question``, ``answer``) that the retrieval baseline searches."""
    bootstrap: int = 1000
    """Paired bootstrap resamples for the 95% intervals and significance (0: none)."""
    seed: int = 0
    """Seed of the bootstrap draws and of the example questions."""
    examples: int = 20
    """Random questions shown with every system's answer in ``examples.md`` (0: none)."""
    workers: int = 0
    """Processes that score the answers (0: one per CPU core, at most 8); inputs of
    500 questions or fewer are scored in this process."""

    def check(self) -> None:
        """Every option error before any work."""
        smoothing_function(self.smoothing)
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise UserError(f"--baselines {unknown[0]!r}: choose from {', '.join(BASELINES)}")
        if "retrieval" in self.baselines and self.train_data is None:
            raise UserError(
                "--baselines retrieval needs --train-data PREFIX_train.jsonl (the training split "
                "whose answers it retrieves)"
            )
        if self.train_data is not None and Path(self.train_data).is_dir():
            raise UserError(f"--train-data {self.train_data}: is a directory; give the JSONL file")
        if self.train_data is not None and not Path(self.train_data).is_file():
            raise UserError(f"--train-data {self.train_data}: no such file")
        for name, flag in (
            ("bootstrap", "--bootstrap"),
            ("examples", "--examples"),
            ("seed", "--bootstrap-seed"),
            ("workers", "--workers"),
        ):
            if getattr(self, name) < 0:
                raise UserError(f"{flag}: must be >= 0, got {getattr(self, name)}")
        if 0 < self.bootstrap < 100:
            raise UserError(f"--bootstrap {self.bootstrap}: use 0 (off) or at least 100 resamples")


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


def align(references: list[dict], predictions: list[dict], path: Path) -> list[dict]:
    """The prediction row of each reference, matched by ``id`` (or by position when neither file
    has ids)."""
    for rows, where in ((references, "references"), (predictions, str(path))):
        with_id = sum("id" in r for r in rows)
        if 0 < with_id < len(rows):
            raise DataError(
                f"{where}: {with_id} of {len(rows)} rows have an 'id'; give every row an id "
                f"(or none, to match by position)"
            )
    if all("id" in r for r in references) and all("id" in p for p in predictions):
        for rows, where in ((references, "references"), (predictions, str(path))):
            ids = [r["id"] for r in rows]
            odd = [i for i in ids if isinstance(i, bool) or not isinstance(i, (str, int))][:1]
            if odd:
                odd = odd[0]
                raise DataError(
                    f"{where}: id {odd!r} is a {type(odd).__name__}; ids must be strings or "
                    f"integers"
                )
            if len(set(map(repr, ids))) != len(ids):
                dup = next(i for i in ids if ids.count(i) > 1)
                raise DataError(f"{where}: id {dup!r} appears more than once; ids must be unique")
        by_id = {p["id"]: p for p in predictions}
        missing = [r["id"] for r in references if r["id"] not in by_id]
        if missing:
            raise DataError(
                f"{path}: no prediction for {len(missing)} reference id(s), e.g. {missing[:3]}"
            )
        return [by_id[r["id"]] for r in references]
    if any("id" in r for r in references + predictions):
        raise DataError(
            f"{path}: rows have no 'id' but the references do (or the other way round); "
            f"give both files ids to match rows by id"
        )
    if len(predictions) != len(references):
        raise DataError(
            f"{path}: {len(predictions)} predictions for {len(references)} references "
            f"and no ids to match them"
        )
    return predictions


def check_lengths(refs: list[str], hyps: list[str], path: Path) -> None:
    """Refuse pairs whose ROUGE-L table would take minutes and gigabytes (not real answers)."""
    for i, (r, h) in enumerate(zip(refs, hyps), 1):
        cells = len(r.split()) * len(h.split())
        if cells > MAX_ROUGE_CELLS:
            raise DataError(
                f"{path}: row {i}: {len(h.split())} answer words against {len(r.split())} "
                f"reference words is too long to score (ROUGE-L compares every pair of words); "
                f"generate shorter answers (--max-new-tokens)"
            )


def finished_at_eos(rows: list[dict]) -> list[bool] | None:
    """Whether each answer ended at EOS, when the generator recorded it (``finish_reason``)."""
    if not all(r.get("finish_reason") in ("eos", "length") for r in rows):
        return None
    return [r["finish_reason"] == "eos" for r in rows]


def write_baselines(
    refs: list[dict],
    references_path: Path,
    opts: EvalOptions,
    out_dir: Path,
    taken: Sequence[str],
    inputs: Sequence[Path],
) -> dict[str, Path]:
    """Answer the references with each baseline; write ``baseline_NAME.jsonl``; {name: path}."""
    if not opts.baselines:
        return {}
    clash = [b for b in opts.baselines if b in taken]
    if clash:
        raise UserError(f"system name {clash[0]!r} is taken by a baseline; rename the system")
    for i, r in enumerate(refs, 1):
        if not isinstance(r.get("question"), str):
            raise DataError(
                f"{references_path}:{i}: the baselines need a 'question' string in every row "
                f"(or pass --baselines none)"
            )
    train = (
        read_jsonl(Path(opts.train_data), required=("question", "answer"))
        if opts.train_data
        else []
    )
    if opts.train_data and not train:
        raise DataError(f"--train-data {opts.train_data}: no rows")
    questions = [r["question"] for r in refs]
    inputs = {Path(p).resolve() for p in inputs}
    for name in opts.baselines:
        target = (out_dir / f"baseline_{name}.jsonl").resolve()
        if target in inputs:
            raise UserError(
                f"{target} is one of the inputs and would be overwritten by the {name} baseline; "
                f"choose another --out"
            )
    paths = {}
    for name in opts.baselines:
        answers = baseline_answers(name, questions, train)
        rows = [
            {
                **{k: r[k] for k in ("id", "qtype") if k in r},
                "question": r["question"],
                "prediction": a,
            }
            for r, a in zip(refs, answers)
        ]
        paths[name] = write_jsonl(out_dir / f"baseline_{name}.jsonl", rows)
    return paths


def evaluate(
    references_path: Path,
    systems: dict[str, Path],
    out_dir: Path,
    opts: EvalOptions | None = None,
) -> dict:
    """Score every system and baseline; write the report files into ``out_dir``."""
    opts = opts or EvalOptions()
    opts.check()
    # a dataset's split file (beside its P_meta.json) must match the manifest: after an
    # interrupted preprocess, "training" data could hold the test questions
    for path in (references_path, opts.train_data):
        if path is not None:
            check_member(path)
    refs = read_jsonl(references_path, required=("answer",))
    if not refs:
        raise DataError(f"{references_path}: no references")
    predictions = {name: align(refs, read_jsonl(path), path) for name, path in systems.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = [references_path, *systems.values()] + ([opts.train_data] if opts.train_data else [])
    # never over the user's own files or this run's inputs: only what a run of ours wrote here
    written = [*REPORT_FILES, *(f"baseline_{b}.jsonl" for b in opts.baselines)]
    claim_outputs(out_dir, written, "--out", inputs)
    baselines = write_baselines(refs, references_path, opts, out_dir, list(systems), inputs)
    for name, path in baselines.items():
        predictions[name] = read_jsonl(path)
    paths = {**systems, **baselines}

    ref_text = [r["answer"] for r in refs]
    qtypes = [str(r.get("qtype", "all")) for r in refs]
    groups = defaultdict(list)
    for i, q in enumerate(qtypes):
        groups[q].append(i)
    report = {
        "references": str(references_path),
        "questions": len(refs),
        "smoothing": opts.smoothing,
        "rouge_stem": opts.rouge_stem,
        "tokenization": r"lowercase, re.findall(r'\w+|[^\w\s]')",
        "bootstrap": {"resamples": opts.bootstrap, "seed": opts.seed, "confidence": 0.95},
        "baseline": next(iter(baselines), None),
        "systems": {},
    }
    statistics = {}
    # examples.md shows a few questions: only their answers are kept once a system is scored
    shown = render.example_rows(len(refs), opts.examples, opts.seed)
    workers = opts.workers or min(8, os.cpu_count() or 1)
    answers = {}
    for name in list(predictions):
        rows = predictions.pop(name)  # scored, then dropped: one system's texts in memory
        hyps = [prediction_text(r, paths[name]) for r in rows]
        check_lengths(ref_text, hyps, paths[name])
        answers[name] = {i: hyps[i] for i in shown}
        scores = score_system(
            ref_text, hyps, opts.smoothing, finished_at_eos(rows), opts.rouge_stem, workers
        )
        del rows, hyps
        stats = statistics[name] = scores.statistics
        entry = {
            "predictions": str(paths[name]),
            "baseline": name in baselines,
            "metrics": {m: (None if s is None else s.value()) for m, s in stats.items()},
            "unsmoothed": scores.bleu["unsmoothed"],
            "smoothed": scores.bleu["smoothed"],
            "sacrebleu": scores.sacrebleu,
            "by_qtype": {},
        }
        for q, idx in sorted(groups.items()):
            entry["by_qtype"][q] = {
                "n": len(idx),
                "bleu4": stats["bleu4"].subset(idx),
                "rougeL": stats["rougeL"].subset(idx),
            }
        report["systems"][name] = entry
    if opts.bootstrap and len(refs) < MIN_BOOTSTRAP_QUESTIONS:
        report["bootstrap"]["skipped"] = (
            f"{len(refs)} questions: intervals need at least {MIN_BOOTSTRAP_QUESTIONS}"
        )
    elif opts.bootstrap:
        ci, versus = paired_bootstrap(statistics, opts.bootstrap, opts.seed, report["baseline"])
        for name, entry in report["systems"].items():
            entry["ci"] = ci[name]
            if name in versus:
                entry["vs_baseline"] = versus[name]
    write_text_atomic(out_dir / "report.json", json.dumps(report, indent=1))
    write_text_atomic(out_dir / "report.md", render.markdown(report))
    write_text_atomic(out_dir / "examples.md", render.examples(refs, answers, shown, opts.seed))
    render.plot_by_qtype(report, out_dir / "bleu_by_qtype.png")
    return report
