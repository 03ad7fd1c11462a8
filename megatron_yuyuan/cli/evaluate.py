"""Score prediction files of several systems against the same references, next to baselines.

    python -m megatron_yuyuan.evaluate --references data/medquad_test.jsonl \\
        --predictions ours=runs/eval/pred.jsonl hf=runs/eval/pred_hf.jsonl \\
        --train-data data/medquad_train.jsonl --baselines retrieval,echo --out runs/eval/report

Writes ``report.md`` (BLEU-1..4 smoothed and unsmoothed, ROUGE-1/2/L, chrF, length, EOS and
repetition, each with a 95% paired-bootstrap interval and significance against the first
baseline), ``report.json``, ``examples.md`` and ``bleu_by_qtype.png``. The recipe is documented in
:mod:`megatron_yuyuan.eval`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from megatron_yuyuan.cli import ArgumentParser, check_writable_dir, non_negative_int, run_cli
from megatron_yuyuan.errors import UserError


def parse_systems(specs: Sequence[str]) -> dict[str, Path]:
    """``NAME=FILE.jsonl`` specs -> {name: path}; every file must exist."""
    systems = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--predictions {spec!r}: expected NAME=FILE.jsonl")
        if name in systems:
            raise UserError(f"--predictions: system name {name!r} given twice")
        if Path(path).is_dir():
            raise UserError(f"--predictions {name}: {path} is a directory; give a JSONL file")
        if not Path(path).is_file():
            raise UserError(f"--predictions {name}: {path} does not exist")
        systems[name] = Path(path)
    return systems


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """The scoring flags shared by ``evaluate`` and ``eval_qa``."""
    g = p.add_argument_group("scoring")
    g.add_argument("--smoothing", default="method1", help="nltk SmoothingFunction method")
    g.add_argument(
        "--train-data", default=None, help="training split JSONL for the retrieval baseline"
    )
    g.add_argument(
        "--baselines",
        default=None,
        help="comma-separated model-free systems: retrieval (needs --train-data), echo; default: "
        "retrieval,echo with --train-data, none without; 'none' for none",
    )
    g.add_argument(
        "--bootstrap",
        type=non_negative_int,
        default=1000,
        help="paired bootstrap resamples (0: no intervals)",
    )
    g.add_argument(
        "--bootstrap-seed",
        type=non_negative_int,
        default=0,
        help="seed of the bootstrap and of examples.md",
    )
    g.add_argument("--rouge-stem", action="store_true", help="Porter-stem words before ROUGE")
    g.add_argument(
        "--workers",
        type=non_negative_int,
        default=0,
        help="processes that score the answers (default 0: one per CPU core, at most 8)",
    )
    g.add_argument(
        "--examples",
        type=non_negative_int,
        default=20,
        help="questions shown side by side in examples.md",
    )


def eval_options_from_args(args: argparse.Namespace):
    from megatron_yuyuan.eval.scoring import EvalOptions

    if args.baselines is None:
        baselines = ["retrieval", "echo"] if args.train_data else []
    elif args.baselines.strip() == "none":
        baselines = []
    else:
        baselines = list(dict.fromkeys(b.strip() for b in args.baselines.split(",") if b.strip()))
        if not baselines:
            raise UserError("--baselines '': name retrieval and/or echo, or 'none'")
    opts = EvalOptions(
        smoothing=args.smoothing,
        rouge_stem=args.rouge_stem,
        baselines=baselines,
        train_data=Path(args.train_data) if args.train_data else None,
        bootstrap=args.bootstrap,
        seed=args.bootstrap_seed,
        examples=args.examples,
        workers=args.workers,
    )
    opts.check()
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(
        prog="python -m megatron_yuyuan.evaluate", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--references", required=True, help="JSONL with 'answer' (and 'id', 'qtype')")
    p.add_argument("--predictions", nargs="+", required=True, help="NAME=FILE.jsonl ...")
    p.add_argument("--out", required=True, help="report directory")
    add_eval_arguments(p)
    args = p.parse_args(argv)

    def body() -> int:
        from megatron_yuyuan.eval.report import print_summary
        from megatron_yuyuan.eval.scoring import REPORT_FILES, evaluate

        systems = parse_systems(args.predictions)
        opts = eval_options_from_args(args)
        out = check_writable_dir(args.out, "--out")
        report = evaluate(Path(args.references), systems, out, opts)
        print_summary(report)
        for name in opts.baselines:
            print(f"> wrote {out / f'baseline_{name}.jsonl'}")
        for name in REPORT_FILES:
            print(f"> wrote {out / name}")
        return 0

    return run_cli(body)
