"""Generate answers for a test split with one model and score them: one command, end to end.

    torchrun --nproc-per-node 2 -m megatron_yuyuan.eval_qa --load ckpt --tensor-model-parallel-size 2 \\
        --references runs/data/medquad_test.jsonl --out runs/eval --name yuyuan-qa
    python -m megatron_yuyuan.eval_qa --hf-dir hf/yuyuan-qa --references ... --out runs/eval --name hf

Writes ``OUT/predictions_NAME.jsonl`` and the BLEU report (``OUT/report.md``, ``report.json``,
``bleu_by_qtype.png``) over every predictions file already in OUT, so successive runs of several
systems build one side-by-side table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from megatron_yuyuan import cpu_compat, parallel
from megatron_yuyuan.evaluate import evaluate, print_summary, read_jsonl
from megatron_yuyuan.generate import (
    add_model_arguments,
    add_sampling_arguments,
    build_generator,
    generate_file,
    sampling_from_args,
)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument(
        "--references", required=True, help="test split JSONL (question, answer, id, qtype)"
    )
    p.add_argument("--out", required=True, help="directory for predictions and the report")
    p.add_argument(
        "--name", default=None, help="system name in the report (default: from the path)"
    )
    p.add_argument("--limit", type=int, default=None, help="score only the first N questions")
    p.add_argument("--smoothing", default="method1", help="nltk SmoothingFunction method")
    add_sampling_arguments(p)
    args = p.parse_args(argv)
    cpu_compat.apply_if_no_cuda()
    out = Path(args.out)
    name = args.name or Path(args.load or args.hf_dir).name
    try:
        refs = Path(args.references)
        if not refs.is_file():
            raise ValueError(f"--references {refs} does not exist")
        generator = build_generator(args)
        written = generate_file(
            generator,
            refs,
            out / f"predictions_{name}.jsonl",
            sampling_from_args(args),
            args.batch_size,
            args.limit,
        )
        if written is None:  # not rank 0
            return 0
        print(f"> wrote {written}")
        scored_refs = refs
        if args.limit is not None:  # score against the same first N references
            scored_refs = out / f"references_first{args.limit}.jsonl"
            scored_refs.write_text(
                "".join(line + "\n" for line in refs.read_text().splitlines()[: args.limit])
            )
        systems = {
            f.stem.removeprefix("predictions_"): f
            for f in sorted(out.glob("predictions_*.jsonl"))
            if len(read_jsonl(f)) == len(read_jsonl(scored_refs))
        }
        report = evaluate(scored_refs, systems, out, args.smoothing)
        print_summary(report)
        for f in ("report.md", "report.json", "bleu_by_qtype.png"):
            print(f"> wrote {out / f}")
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        parallel.destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
