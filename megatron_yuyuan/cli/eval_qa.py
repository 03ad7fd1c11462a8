"""Generate answers for a test split with one model and score them: one command, end to end.

    torchrun --nproc-per-node 2 -m megatron_yuyuan.eval_qa --load ckpt \\
        --tensor-model-parallel-size 2 --references runs/data/medquad_test.jsonl \\
        --out runs/eval --name yuyuan-qa
    yuyuan eval --hf-dir hf/yuyuan-qa --references ... --out runs/eval --name hf

Writes ``OUT/predictions_NAME.jsonl`` and the report (``OUT/report.md``, ``report.json``,
``examples.md``, ``bleu_by_qtype.png``; see ``python -m megatron_yuyuan.evaluate``) over every
predictions file already in OUT, so successive runs of several systems build one side-by-side
table. ``--train-data PREFIX_train.jsonl`` adds the retrieval and echo baselines.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from megatron_yuyuan.cli import (
    ArgumentParser,
    check_writable_dir,
    pick_iteration,
    positive_int,
    run_cli,
)
from megatron_yuyuan.cli.evaluate import add_eval_arguments, eval_options_from_args
from megatron_yuyuan.cli.generate import (
    add_model_arguments,
    add_sampling_arguments,
    generator_from_args,
    sampling_from_args,
)
from megatron_yuyuan.errors import UserError


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(
        prog="python -m megatron_yuyuan.eval_qa", description=__doc__.split("\n\n")[0]
    )
    add_model_arguments(p)
    p.add_argument(
        "--references", required=True, help="test split JSONL (question, answer, id, qtype)"
    )
    p.add_argument("--out", required=True, help="directory for predictions and the report")
    p.add_argument(
        "--name", default=None, help="system name in the report (default: from the path)"
    )
    p.add_argument("--limit", type=positive_int, default=None, help="score the first N questions")
    add_sampling_arguments(p)
    add_eval_arguments(p)
    args = p.parse_args(argv)

    def body() -> int:
        from megatron_yuyuan.eval.report import print_summary
        from megatron_yuyuan.eval.scoring import REPORT_FILES, evaluate
        from megatron_yuyuan.files import claim_outputs, read_jsonl, write_jsonl
        from megatron_yuyuan.generation import generate_file

        name = args.name or Path(args.load or args.hf_dir).name
        if not args.name and args.load and args.iteration != "latest":
            name += f"-{args.iteration}"  # a report's rows for two checkpoints stay apart
        if not re.fullmatch(r"[\w.+-]+", name):
            raise UserError(f"--name {name!r}: use letters, digits, '.', '_', '+' or '-'")
        pick_iteration(args)
        # Check every input before generating anything: references need question and answer.
        refs_path = Path(args.references)
        refs = read_jsonl(refs_path, required=("question", "answer"))[: args.limit]
        if not refs:
            raise UserError(f"--references {refs_path}: no rows")
        opts = eval_options_from_args(args)
        sampling = sampling_from_args(args)  # bad sampling values stop before the model loads
        if name in opts.baselines:
            raise UserError(f"--name {name!r} is a baseline's name; choose another")
        out = check_writable_dir(args.out, "--out")
        mine = [f"predictions_{name}.jsonl"]
        mine += [f"references_first{args.limit}.jsonl"] if args.limit is not None else []
        claim_outputs(out, [*mine, *REPORT_FILES], "--out", [refs_path])
        written = generate_file(
            generator_from_args(args),
            refs_path,
            out / f"predictions_{name}.jsonl",
            sampling,
            args.batch_size,
            args.limit,
        )
        if written is None:  # not rank 0
            return 0
        print(f"> wrote {written}")
        scored_refs = refs_path
        if args.limit is not None:  # score against the same first N references
            scored_refs = write_jsonl(out / f"references_first{args.limit}.jsonl", refs)
        systems = {}
        ref_ids = [r.get("id") for r in refs]
        for f in sorted(out.glob("predictions_*.jsonl")):
            rows = read_jsonl(f)
            if [r.get("id") for r in rows] == ref_ids:
                systems[f.stem.removeprefix("predictions_")] = f
            else:  # another split's or another --limit's answers: not comparable
                print(f"> skipped {f}: its questions are not these references'")
        report = evaluate(scored_refs, systems, out, opts)
        print_summary(report)
        for f in [f"baseline_{b}.jsonl" for b in opts.baselines] + list(REPORT_FILES):
            print(f"> wrote {out / f}")
        return 0

    return run_cli(body)
