"""MedQuAD XML -> leakage-free QA splits -> JSONL + Megatron ``.bin/.idx``.

    python -m tools.preprocess_medquad --input MedQuAD --output-prefix data/medquad

Writes ``PREFIX_{train,valid,test}.{jsonl,bin,idx}`` and ``PREFIX_meta.json``; see
:mod:`megatron_yuyuan.data.preprocess`. Without ``--input`` it uses the MedQuAD sample shipped in
the package (CC BY 4.0).
"""

from __future__ import annotations

from collections.abc import Sequence

from megatron_yuyuan.cli import ArgumentParser, non_negative_int, positive_int, run_cli
from megatron_yuyuan.data.medquad import CLEANERS
from megatron_yuyuan.data.sample import SAMPLE_DIR


def add_dataset_arguments(p: ArgumentParser, workers: str, unit: str) -> None:
    """The flags every preprocessor shares: tokenizer, worker processes, split sizes and seed."""
    p.add_argument(
        "--tokenizer",
        default="gpt2",
        help="'gpt2' (built in, offline), an HF tokenizer dir, or a sentencepiece .model",
    )
    p.add_argument("--workers", type=positive_int, default=2, help=workers)
    for split, name in (("valid", "validation"), ("test", "test")):
        p.add_argument(
            f"--{split}-size",
            type=non_negative_int,
            default=None,
            help=f"{unit} in the {name} split (default: 500, at most 10%% of the {unit})",
        )
    p.add_argument("--seed", type=int, default=1234, help="split seed")


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(
        prog="python -m tools.preprocess_medquad", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--input", default=str(SAMPLE_DIR), help="MedQuAD directory (default: the embedded sample)"
    )
    p.add_argument("--output-prefix", required=True, help="output path prefix, e.g. data/medquad")
    add_dataset_arguments(p, workers="XML parser processes", unit="pairs")
    p.add_argument(
        "--clean",
        default="",
        help=f"comma-separated optional cleaners: {', '.join(sorted(CLEANERS))} (default: none)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)

    def body() -> int:
        # Imported here: spawned parser workers re-import this module and must stay light.
        from megatron_yuyuan.data.preprocess import preprocess_medquad

        report = preprocess_medquad(
            args.input,
            args.output_prefix,
            tokenizer=args.tokenizer,
            workers=args.workers,
            valid_size=args.valid_size,
            test_size=args.test_size,
            seed=args.seed,
            cleaners=[c for c in args.clean.split(",") if c],
            progress=not args.no_progress,
        )
        for line in report.lines():
            print(line)
        for path in report.outputs:
            print(f"> wrote {path}")
        return 0

    return run_cli(body)
