"""Train / finetune the GPT-2 (Yuyuan) model with megatron-core TP x PP x DP.

Launch under torchrun (gloo on CPU, NCCL on GPUs), e.g. TP=2 on two CPU processes::

    torchrun --nproc-per-node 2 -m megatron_yuyuan.finetune --config tiny --mock-data \\
        --tensor-model-parallel-size 2 --micro-batch-size 4 --global-batch-size 8 \\
        --seq-length 128 --train-iters 20 --metrics-file runs/tiny/metrics.jsonl

Flags follow Megatron-LM's names; ``--help`` lists them all with their meaning.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from megatron_yuyuan import cpu_compat
from megatron_yuyuan.arguments import parse_config
from megatron_yuyuan.checkpointing import (
    CheckpointError,
    check_compatible,
    has_checkpoint,
    read_info,
    resolve,
)
from megatron_yuyuan.config import ConfigError, RunConfig, validate_layout
from megatron_yuyuan.parallel import destroy_distributed, env_rank, env_world_size


def check_config(cfg: RunConfig, world_size: int) -> None:
    """Every check that needs no process group: fail before any work is done."""
    validate_layout(cfg, world_size)
    d = cfg.data
    if d.mock_data == (d.data_prefix is not None):
        raise ConfigError(
            "no training data: pass --data-prefix PREFIX (from "
            "tools/preprocess_medquad.py) or --mock-data (synthetic tokens)"
            if not d.mock_data
            else "--mock-data and --data-prefix exclude each other"
        )
    if d.data_prefix is not None:
        check_dataset(d.data_prefix, cfg.model.vocab_size)
    t = cfg.train
    if t.load and not has_checkpoint(t.load) and t.load != t.save and not t.pretrained_checkpoint:
        raise ConfigError(
            f"--load {t.load}: no checkpoint there (give --pretrained-checkpoint to "
            f"start from other weights, or --load equal to --save for a new run)"
        )
    for path in (t.load, t.pretrained_checkpoint):
        if path and has_checkpoint(path):
            ckpt = resolve(path)
            check_compatible(read_info(ckpt).model, cfg.model, ckpt)
        elif path and path == t.pretrained_checkpoint:
            raise ConfigError(f"--pretrained-checkpoint {path}: no checkpoint there")


def check_dataset(prefix: str, vocab_size: int) -> None:
    """The training split and its metadata exist and fit the model's vocabulary."""
    from megatron_yuyuan.data.indexed import dataset_exists, read_meta

    if not dataset_exists(f"{prefix}_train"):
        raise ConfigError(
            f"--data-prefix {prefix}: {prefix}_train.bin/.idx not found; create them "
            f"with: python -m tools.preprocess_medquad --output-prefix {prefix}"
        )
    try:
        meta = read_meta(prefix)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from exc
    if meta["vocab_size"] > vocab_size:
        raise ConfigError(
            f"--data-prefix {prefix}: tokenized with {meta['tokenizer']} "
            f"({meta['vocab_size']} ids) but the model vocabulary has {vocab_size}; "
            f"use a model with vocab_size >= {meta['vocab_size']}"
        )


def main(argv: Optional[Sequence[str]] = None) -> int:
    cpu_compat.apply_if_no_cuda()
    try:
        cfg = parse_config(argv, description=__doc__.split("\n\n")[0])
        check_config(cfg, env_world_size())
    except (ConfigError, CheckpointError) as exc:
        if env_rank() == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    from megatron_yuyuan.training import train  # heavy imports only once the config is valid

    try:
        train(cfg)
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
