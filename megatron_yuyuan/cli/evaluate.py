"""Score prediction files of several systems against the same references: the BLEU report.

    python -m megatron_yuyuan.evaluate --references data/medquad_test.jsonl \\
        --predictions ours=runs/eval/pred.jsonl hf=runs/eval/pred_hf.jsonl --out runs/eval/report

The recipe is documented in :mod:`megatron_yuyuan.evaluation`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from megatron_yuyuan.cli import ArgumentParser, check_writable_dir, run_cli
from megatron_yuyuan.errors import UserError

REPORT_FILES = ("report.md", "report.json", "bleu_by_qtype.png")


def parse_systems(specs: Sequence[str]) -> dict[str, Path]:
    """``NAME=FILE.jsonl`` specs -> {name: path}; every file must exist."""
    systems = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--predictions {spec!r}: expected NAME=FILE.jsonl")
        if name in systems:
            raise UserError(f"--predictions: system name {name!r} given twice")
        if not Path(path).is_file():
            raise UserError(f"--predictions {name}: {path} does not exist")
        systems[name] = Path(path)
    return systems


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = ArgumentParser(
        prog="python -m megatron_yuyuan.evaluate", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--references", required=True, help="JSONL with 'answer' (and 'id', 'qtype')")
    p.add_argument("--predictions", nargs="+", required=True, help="NAME=FILE.jsonl ...")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--smoothing", default="method1", help="nltk SmoothingFunction method")
    args = p.parse_args(argv)

    def body() -> int:
        from megatron_yuyuan.evaluation import evaluate, print_summary

        systems = parse_systems(args.predictions)
        out = check_writable_dir(args.out, "--out")
        report = evaluate(Path(args.references), systems, out, args.smoothing)
        print_summary(report)
        for name in REPORT_FILES:
            print(f"> wrote {out / name}")
        return 0

    return run_cli(body)
