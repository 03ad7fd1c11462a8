"""``yuyuan``: one command for the whole path, from your QA data to an answer service.

    yuyuan preprocess --input faq.jsonl --output-prefix data/mine
    yuyuan finetune --config tiny --data-prefix data/mine --save ckpt/mine
    yuyuan to-hf --load ckpt/mine --out hf/mine --verify
    yuyuan generate --load ckpt/mine --question "What causes glaucoma ?"
    yuyuan serve --hf-dir hf/mine

``yuyuan COMMAND --help`` shows a command's flags. Multi-process runs go through torchrun:
``torchrun --nproc-per-node 4 -m megatron_yuyuan.finetune ...`` (or ``run/finetune_qa.sh``).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from megatron_yuyuan import cli

# name -> (module with main(argv), one line for the listing)
COMMANDS: dict[str, tuple[str, str]] = {
    "preprocess": (
        "preprocess_qa",
        "your QA data (JSONL, JSON, CSV/TSV, Parquet, HF datasets, chats, MedQuAD XML) -> splits",
    ),
    "preprocess-medquad": ("preprocess", "the MedQuAD XML release -> splits, the upstream way"),
    "finetune": ("finetune", "finetune (full or LoRA) at any TP/PP; torchrun for several ranks"),
    "generate": ("generate", "answer questions with a checkpoint or an HF folder"),
    "eval": ("eval_qa", "generate answers for a test split with one model and score them"),
    "evaluate": ("evaluate", "score several systems' answer files, next to baselines"),
    "serve": ("serve", "the HTTP / web answer service"),
    "to-hf": ("to_hf", "megatron-core checkpoint -> Hugging Face GPT-2 folder (or PEFT adapter)"),
    "to-megatron": (
        "to_megatron",
        "Hugging Face GPT-2 folder (or a Megatron-LM checkpoint) -> megatron-core checkpoint",
    ),
    "verify": ("verify", "logit parity of an HF folder and a checkpoint, at any TP"),
    "env": ("env", "versions, devices and optional accelerators: paste it into an issue"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: yuyuan COMMAND [flags]   (yuyuan COMMAND --help for its flags)",
        "",
        __doc__.split("\n\n")[0].split(": ", 1)[1],
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if args[0] == "--version":
        from importlib.metadata import version

        print(f"yuyuan (megatron_yuyuan) {version('megatron_yuyuan')}")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        cli.print_error(
            f"unknown command {name!r}; one of: {', '.join(COMMANDS)} (see yuyuan --help)"
        )
        return 2
    module = importlib.import_module(f"megatron_yuyuan.cli.{COMMANDS[name][0]}")
    cli._invoked_as = f"yuyuan {name}"
    try:
        return module.main(rest)
    finally:
        cli._invoked_as = None


if __name__ == "__main__":
    sys.exit(main())
