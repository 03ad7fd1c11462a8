"""Answer questions with a megatron-core checkpoint (TP/PP under torchrun) or a transformers dir.

    torchrun --nproc-per-node 2 -m megatron_yuyuan.generate --load ckpt \\
        --tensor-model-parallel-size 2 --input runs/data/medquad_test.jsonl \\
        --output runs/eval/predictions.jsonl --max-new-tokens 128
    python -m megatron_yuyuan.generate --hf-dir hf/yuyuan-qa --question "What causes glaucoma ?"

Decoding is described in :mod:`megatron_yuyuan.generation`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from megatron_yuyuan.cli import (
    ArgumentParser,
    add_iteration_argument,
    add_lora_base_argument,
    check_writable_file,
    pick_iteration,
    positive_int,
    run_cli,
)
from megatron_yuyuan.errors import UserError


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Which model answers, at which layout and precision."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--load", help="megatron-core checkpoint (run under torchrun for TP/PP)")
    src.add_argument("--hf-dir", help="transformers model directory")
    p.add_argument("--tensor-model-parallel-size", type=positive_int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=positive_int, default=1)
    add_lora_base_argument(p)
    add_iteration_argument(p)
    p.add_argument("--tokenizer", default=None, help="tokenizer spec (default: the model's own)")
    p.add_argument(
        "--prompt-template",
        default=None,
        help="override the prompt template the model was trained with (recorded in its "
        "checkpoint or export; a warning is printed when they differ)",
    )
    p.add_argument("--batch-size", type=positive_int, default=8, help="prompts generated together")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--bf16", action="store_true", help="bf16 weights (GPU; halves memory)")
    prec.add_argument("--fp16", action="store_true", help="fp16 weights (GPU; halves memory)")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    # typed here, bounded once by SamplingConfig (sampling_from_args): one error naming the flag
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0: no limit")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="transformers' repetition penalty (1.0: off; 1.2 is common)",
    )
    p.add_argument(
        "--no-repeat-ngram-size",
        type=int,
        default=0,
        help="never repeat an n-gram of this size, prompt included (0: off)",
    )


def sampling_from_args(args):
    from megatron_yuyuan.sampling import SamplingConfig

    return SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
    )


def generator_from_args(args):
    """Build the generator the flags ask for (dtype and device included)."""
    import torch

    from megatron_yuyuan import cpu_compat
    from megatron_yuyuan.generation import build_generator

    cpu_compat.apply_if_no_cuda()
    override = None
    if args.prompt_template is not None:  # a bad template fails now, before the weights load
        from megatron_yuyuan.prompts import PromptTemplate

        override = PromptTemplate.parse(args.prompt_template)
    if args.tokenizer:  # a bad tokenizer fails now, not after the weights are loaded
        from megatron_yuyuan.tokenizer import load_tokenizer

        load_tokenizer(args.tokenizer)
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    if args.fp16 and not torch.cuda.is_available():
        raise UserError("--fp16 needs a CUDA GPU (CPUs lack fp16 matmuls); use --bf16 or fp32")
    gen = build_generator(
        load=args.load,
        hf_dir=args.hf_dir,
        tp=args.tensor_model_parallel_size,
        pp=args.pipeline_model_parallel_size,
        tokenizer=args.tokenizer,
        dtype=dtype,
        lora_base=args.lora_base,
    )
    if override is not None and override != gen.template:
        from megatron_yuyuan import parallel

        if parallel.is_rank_0():
            print(
                f"warning: --prompt-template {override.text!r} replaces the template the model "
                f"was trained with ({gen.template.text!r})",
                file=sys.stderr,
                flush=True,
            )
        gen.template = override
    return gen


def check_output_file(path: Path) -> None:
    """``--output`` may replace an earlier predictions file, nothing else: never a file of a
    checkpoint or a dataset, and no other existing file."""
    from megatron_yuyuan.files import is_predictions_file, protected_reason

    reason = protected_reason(path)
    if reason:
        raise UserError(f"--output {path}: {reason}; write predictions elsewhere")
    if path.exists() and path.is_file() and path.stat().st_size and not is_predictions_file(path):
        raise UserError(
            f"--output {path}: exists and is not a predictions file written by this tool; "
            f"choose another path (nothing was changed)"
        )


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(
        prog="python -m megatron_yuyuan.generate", description=__doc__.split("\n\n")[0]
    )
    add_model_arguments(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--question", help="answer one question and print it")
    what.add_argument("--input", help="JSONL with a 'question' field per line")
    p.add_argument("--output", help="predictions JSONL (with --input)")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N questions")
    add_sampling_arguments(p)
    args = p.parse_args(argv)
    if args.input and not args.output:
        p.error("--input needs --output")
    if args.output and not args.input:
        p.error("--output needs --input")

    def body() -> int:
        from megatron_yuyuan import parallel
        from megatron_yuyuan.files import is_valid_unicode
        from megatron_yuyuan.generation import answer_questions, generate_file, read_questions

        pick_iteration(args)
        # Every input is checked before the model is loaded and any token generated.
        if args.question is not None and not args.question.strip():
            raise UserError("--question is empty: give the question to answer")
        if args.question is not None and not is_valid_unicode(args.question):
            raise UserError(
                "--question: holds bytes that are not UTF-8 text (check the terminal's encoding)"
            )
        if args.input:
            if not read_questions(Path(args.input)):
                raise UserError(f"--input {args.input}: holds no questions")
            if Path(args.output).resolve() == Path(args.input).resolve():
                raise UserError(f"--output {args.output}: is the --input file; choose another path")
            check_output_file(Path(args.output))
            check_writable_file(args.output, "--output")
        cfg = sampling_from_args(args)
        gen = generator_from_args(args)
        if args.question is not None:
            (answer,) = answer_questions(gen, [args.question], cfg, progress=False)
            parallel.print_rank_0(answer["prediction"])
        else:
            out = generate_file(
                gen, Path(args.input), Path(args.output), cfg, args.batch_size, args.limit
            )
            if out:
                print(f"> wrote {out}")
        return 0

    return run_cli(body)
