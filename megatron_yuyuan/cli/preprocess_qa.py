"""Your own QA data (JSONL, JSON, upstream literal lines, CSV/TSV, Parquet, a save_to_disk folder,
a MedQuAD tree, hf:NAME, chats) -> leakage-free splits -> JSONL + ``.bin/.idx``.

    python -m tools.preprocess_qa --input faq.csv --input chats.jsonl --output-prefix data/mine

Writes ``PREFIX_{train,valid,test}.{jsonl,bin,idx}`` and ``PREFIX_meta.json`` (with the prompt
template, which every checkpoint trained on it carries on); see
:mod:`megatron_yuyuan.data.qa_preprocess`.
"""

from __future__ import annotations

from collections.abc import Sequence

from megatron_yuyuan.cli import ArgumentParser, run_cli
from megatron_yuyuan.cli.preprocess import add_dataset_arguments
from megatron_yuyuan.prompts import PROMPT_TEMPLATE


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m tools.preprocess_qa", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--input",
        action="append",
        required=True,
        help="a file, a folder or hf:NAME[:CONFIG][@SPLIT]; repeat for several sources",
    )
    p.add_argument("--output-prefix", required=True, help="output path prefix, e.g. data/mine")
    p.add_argument(
        "--valid-input",
        action="append",
        default=[],
        help="your own validation set (kept as is; training rows repeating it are removed)",
    )
    p.add_argument(
        "--test-input",
        action="append",
        default=[],
        help="your own test set (kept as is; training rows repeating it are removed)",
    )
    p.add_argument(
        "--format",
        choices=("jsonl", "json", "csv", "tsv", "parquet", "arrow", "medquad", "hf"),
        help="the inputs' format (default: detected from each input's content)",
    )
    p.add_argument("--question-field", help="the question's field (default: recognised)")
    p.add_argument("--answer-field", help="the answer's field (default: recognised)")
    p.add_argument("--id-field", help="a unique id per row (default: INPUT_NO:ROW_NO)")
    p.add_argument(
        "--group-field", help="rows with the same value here share a split (e.g. a document id)"
    )
    p.add_argument(
        "--prompt-template",
        default=PROMPT_TEMPLATE,
        help=f"the prompt, with {{question}} and any other {{field}} of the row (default: "
        f"{PROMPT_TEMPLATE!r}); for chats, the template of each user turn",
    )
    add_dataset_arguments(p, workers="tokenizer processes", unit="examples")
    p.add_argument(
        "--strict", action="store_true", help="a row that would be dropped is an error instead"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        # Imported here: spawned tokenizer workers re-import this module and must stay light.
        from megatron_yuyuan.data.qa_preprocess import QAOptions, preprocess_qa

        report = preprocess_qa(
            QAOptions(
                inputs=args.input,
                output_prefix=args.output_prefix,
                valid_inputs=args.valid_input,
                test_inputs=args.test_input,
                format=args.format,
                question_field=args.question_field,
                answer_field=args.answer_field,
                id_field=args.id_field,
                group_field=args.group_field,
                prompt_template=args.prompt_template,
                tokenizer=args.tokenizer,
                workers=args.workers,
                valid_size=args.valid_size,
                test_size=args.test_size,
                seed=args.seed,
                strict=args.strict,
                progress=not args.no_progress,
            )
        )
        for line in report.lines():
            print(line)
        for path in report.outputs:
            print(f"> wrote {path}")
        return 0

    return run_cli(body)
