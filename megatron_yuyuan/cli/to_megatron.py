"""HF GPT-2 directory (or a legacy Megatron-LM checkpoint) -> megatron-core checkpoint.

    python -m checkpoints_convert.to_megatron --hf-dir Yuyuan-GPT2-3.5B --save ckpt/yuyuan \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --verify

The model config is read from config.json (or the Megatron-LM args); the result is what
``megatron_yuyuan.finetune --load`` starts from, at this or any other TP/PP. ``--save`` must hold
no checkpoint yet: a directory with checkpoints (e.g. a training run) is refused, since the
conversion's iteration 0 and ``latest`` pointer would replace them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from megatron_yuyuan.cli import ArgumentParser, positive_float, positive_int, run_cli
from megatron_yuyuan.errors import UserError


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(
        prog="python -m checkpoints_convert.to_megatron", description=__doc__.split("\n\n")[0]
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--hf-dir", help="HF GPT-2 directory: config.json + safetensors or pytorch_model.bin"
    )
    src.add_argument("--megatron-lm-dir", help="legacy Megatron-LM checkpoint (iter_*/mp_rank_*/)")
    p.add_argument(
        "--save", required=True, help="output checkpoint directory (holding no checkpoint yet)"
    )
    p.add_argument(
        "--tensor-model-parallel-size",
        type=positive_int,
        default=1,
        help="TP the checkpoint is padded for (vocab multiple of 128 x TP)",
    )
    p.add_argument(
        "--pipeline-model-parallel-size",
        type=positive_int,
        default=1,
        help="PP it will run at (checked against the layer count)",
    )
    p.add_argument(
        "--vocab-size",
        type=positive_int,
        default=None,
        help="legacy input only: true vocabulary size (default 50257 for GPT-2 BPE)",
    )
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="legacy input only: allow loading pickled objects beyond weights",
    )
    p.add_argument(
        "--allow-non-finite",
        action="store_true",
        help="convert weights holding NaN/Inf values (refused by default: a damaged download)",
    )
    p.add_argument("--verify", action="store_true", help="compare logits (needs --hf-dir)")
    p.add_argument(
        "--tolerance", type=positive_float, default=1e-3, help="max |logit diff| for --verify"
    )
    args = p.parse_args(argv)
    if args.verify and not args.hf_dir:
        p.error("--verify compares against --hf-dir")

    def body() -> int:
        from megatron_yuyuan import cpu_compat

        cpu_compat.apply_if_no_cuda()
        from megatron_yuyuan.checkpoint.storage import check_new_save_dir
        from megatron_yuyuan.convert.api import convert_hf_to_megatron, convert_legacy_to_megatron
        from megatron_yuyuan.convert.verify import report_verify

        check_new_save_dir(args.save)
        if args.hf_dir and Path(args.save).resolve() == Path(args.hf_dir).resolve():
            raise UserError(f"--save {args.save}: is the --hf-dir folder; choose a new directory")
        tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
        if args.hf_dir:
            out = convert_hf_to_megatron(
                args.hf_dir, args.save, tp, pp, allow_non_finite=args.allow_non_finite
            )
        else:
            out = convert_legacy_to_megatron(
                args.megatron_lm_dir, args.save, tp, pp, args.vocab_size, args.trust_pickle
            )
        print(f"> wrote megatron-core checkpoint {out} (padded for TP={tp}; PP={pp} checked)")
        return report_verify(args.hf_dir, args.save, args.tolerance) if args.verify else 0

    return run_cli(body)
