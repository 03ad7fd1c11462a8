"""Logit parity between an HF GPT-2 directory and a megatron-core checkpoint of the same weights,
with the megatron model split over N tensor-parallel ranks.

    torchrun --nproc-per-node N -m megatron_yuyuan.convert.verify --hf-dir H --load C \\
        --tensor-model-parallel-size N

Exit status 0 when every logit is within ``--tolerance`` and the top-1 tokens all agree, 1 when
not, 2 on bad input.
"""

from __future__ import annotations

from collections.abc import Sequence

from megatron_yuyuan.cli import (
    ArgumentParser,
    add_lora_base_argument,
    positive_float,
    positive_int,
    run_cli,
)


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(
        prog="python -m megatron_yuyuan.convert.verify", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--hf-dir", required=True, help="HF directory (e.g. written by to_hf)")
    p.add_argument("--load", required=True, help="checkpoint directory (SAVE or SAVE/iter_N)")
    p.add_argument(
        "--tensor-model-parallel-size",
        type=positive_int,
        default=1,
        help="TP ranks the megatron model is split over (launch that many processes)",
    )
    add_lora_base_argument(p)
    p.add_argument("--tolerance", type=positive_float, default=1e-4, help="max |logit diff|")
    args = p.parse_args(argv)

    def body() -> int:
        from megatron_yuyuan import cpu_compat, parallel
        from megatron_yuyuan.convert.verify import verify

        cpu_compat.apply_if_no_cuda()
        tp = args.tensor_model_parallel_size
        parity, ok = verify(args.hf_dir, args.load, args.tolerance, tp, args.lora_base)
        parallel.print_rank_0(
            f"> TP={tp} {parity.line()} [{'OK' if ok else 'FAIL'}, tolerance {args.tolerance:g}]"
        )
        return 0 if ok else 1

    return run_cli(body)
