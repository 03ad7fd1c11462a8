"""megatron-core checkpoint (saved at any TP/PP) -> HF GPT-2 directory.

    python -m checkpoints_convert.to_hf --load ckpt/yuyuan --out hf/yuyuan-qa --verify

Writes config.json, safetensors (sharded above 2 GB), tokenizer files and generation_config.json;
``transformers.AutoModelForCausalLM`` / ``AutoTokenizer`` load the result. A LoRA checkpoint
exports merged into its base (one GPT2LMHeadModel), or with ``--adapter-only`` as a PEFT adapter
folder: ``PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(HF_BASE), OUT)``, where
HF_BASE is the base checkpoint exported by this command. ``--out`` must be a new
or empty directory, or an earlier export of this tool (replaced; files you added are kept);
anything else is refused and nothing is deleted.
"""

from __future__ import annotations

from collections.abc import Sequence

from megatron_yuyuan.cli import (
    ArgumentParser,
    add_iteration_argument,
    add_lora_base_argument,
    pick_iteration,
    positive_float,
    run_cli,
)


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(
        prog="python -m checkpoints_convert.to_hf", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--load", required=True, help="checkpoint directory (SAVE or SAVE/iter_N)")
    p.add_argument("--out", required=True, help="HF output directory (new, empty or an export)")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="copy tokenizer files from this directory (default: the checkpoint's, "
        "else GPT-2's when the vocabulary is GPT-2's)",
    )
    p.add_argument(
        "--adapter-only",
        action="store_true",
        help="LoRA checkpoint: write a PEFT adapter folder (adapter_config.json + "
        "adapter_model.safetensors) instead of the merged model",
    )
    add_lora_base_argument(p)
    add_iteration_argument(p)
    p.add_argument("--verify", action="store_true", help="compare logits of both models")
    p.add_argument(
        "--tolerance", type=positive_float, default=1e-3, help="max |logit diff| for --verify"
    )
    args = p.parse_args(argv)
    if args.adapter_only and args.verify:
        p.error(
            "--verify compares a merged export with the checkpoint; export without "
            "--adapter-only to verify (the adapter folder needs the HF base model to run)"
        )

    def body() -> int:
        from megatron_yuyuan import cpu_compat

        cpu_compat.apply_if_no_cuda()
        pick_iteration(args)
        from megatron_yuyuan.convert.api import convert_megatron_to_hf
        from megatron_yuyuan.convert.verify import report_verify

        files = convert_megatron_to_hf(
            args.load, args.out, args.tokenizer, args.adapter_only, args.lora_base
        )
        for f in files:
            print(f"> wrote {f}")
        if not args.verify:
            return 0
        return report_verify(args.out, args.load, args.tolerance, args.lora_base)

    return run_cli(body)
