"""LoRA against full finetuning: step time on this machine, and memory for yuyuan-3.5b.

1. Step time, measured here: the ``small`` preset (fp32, mock data, TP=1) trained in full (the
   baseline) and with LoRA adapters on all four linears (``--lora-rank``), same batch, same
   process, alternating ``--rounds`` times; median over ``--steps`` optimizer steps after
   ``--warmup`` per run, then over the runs (each run's median is printed too).
2. yuyuan-3.5b built on the meta device (no memory): trainable parameters, optimizer state and an
   estimate of per-GPU memory at TP=1, DP=1, bf16, for full finetuning and for LoRA.

    python -m benchmarks.bench_lora --threads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Sequence

import torch

from megatron_yuyuan import cpu_compat, lora, parallel, training
from megatron_yuyuan.config import DataConfig, LoraConfig, RunConfig, TrainConfig, get_preset

GiB = 2**30


def step_ms(cfg: RunConfig, steps: int, warmup: int) -> tuple[float, int, int]:
    """Median step time (ms), trainable and total parameters of one run of ``cfg``."""
    state = training.setup(cfg)
    try:
        data = training.build_data_iterator(state)
        times = []
        for i in range(warmup + steps):
            start = time.perf_counter()
            training.train_step(state, data)
            if i >= warmup:
                times.append(time.perf_counter() - start)
        gpt = training.unwrap(state.model)
        trainable, total = lora.parameter_counts(gpt, state.layout)
        if cfg.train.save:
            training.save(state)
    finally:
        parallel.destroy_distributed()
    return 1000 * statistics.median(times), trainable, total


def activation_bytes(m, seq: int, micro_batch: int) -> float:
    """bf16 activations of one micro-batch without recompute (Korthikanti et al. 2022):
    s b h L (34 + 5 a s / h), plus the fp32 logits and their gradient."""
    h, layers, a = m.hidden_size, m.num_layers, m.num_attention_heads
    per_layer = seq * micro_batch * h * (34 + 5 * a * seq / h)
    logits = 2 * 4 * seq * micro_batch * m.padded_vocab_size(1)
    return layers * per_layer + logits


def memory_table(rank: int, seq: int, micro_batch: int) -> list[str]:
    """yuyuan-3.5b on the meta device: full vs LoRA at TP=1, bf16 (fp32 main weights + Adam)."""
    m = get_preset("yuyuan-3.5b")
    rows = []
    layout = parallel.init_distributed(1, 1)
    try:
        for name, adapters in (
            ("full", LoraConfig()),
            (f"LoRA r={rank}", LoraConfig(lora_rank=rank)),
        ):
            from megatron_yuyuan.model import build_model

            with torch.device("meta"):
                gpt = build_model(
                    RunConfig(model=m, lora=adapters), layout, params_dtype=torch.bfloat16
                )
            trainable, total = lora.parameter_counts(gpt, layout)
            weights = 2 * total  # bf16 model
            grads = 4 * trainable  # fp32 gradient buffer (grads reduced in fp32)
            optimizer = 12 * trainable  # fp32 main weights + 2 Adam moments
            acts = activation_bytes(m, seq, micro_batch)
            est = weights + grads + optimizer + acts
            rows.append(
                f"| {name} | {trainable:,} ({100 * trainable / total:.2f}%) | "
                f"{optimizer / GiB:.2f} GiB | {weights / GiB:.1f} GiB | {grads / GiB:.2f} GiB | "
                f"{acts / GiB:.1f} GiB | **{est / GiB:.1f} GiB** |"
            )
    finally:
        parallel.destroy_distributed()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, default=8, help="LoRA rank for the step-time runs")
    p.add_argument("--rank-3p5b", type=int, default=16, help="LoRA rank for the 3.5B table")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="alternating full / LoRA run pairs")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cpu_compat.apply_if_no_cuda()

    model = dataclasses.replace(get_preset("small"), hidden_dropout=0.0, attention_dropout=0.0)
    data = DataConfig(mock_data=True, seq_length=args.seq_length)
    full_ms, lora_ms = [], []
    with tempfile.TemporaryDirectory(prefix="bench_lora.") as tmp:
        train = TrainConfig(
            micro_batch_size=args.micro_batch_size, train_iters=args.warmup + args.steps
        )
        # the first full run also writes the base checkpoint the LoRA runs start from
        full = RunConfig(model=model, train=dataclasses.replace(train, save=tmp), data=data)
        adapted = RunConfig(
            model=model,
            train=dataclasses.replace(train, pretrained_checkpoint=tmp),
            data=data,
            lora=LoraConfig(lora_rank=args.rank),
        )
        for i in range(args.rounds):  # alternate, so drifts of this machine hit both alike
            ms, _, total = step_ms(
                full if i == 0 else RunConfig(model=model, train=train, data=data), **_n(args)
            )
            full_ms.append(ms)
            ms, trainable, _ = step_ms(adapted, **_n(args))
            lora_ms.append(ms)
    full_med, lora_med = statistics.median(full_ms), statistics.median(lora_ms)
    where = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU, {args.threads} threads"
    )
    print(
        f"\nstep time, small preset ({total:,} parameters), fp32, micro-batch "
        f"{args.micro_batch_size} x {args.seq_length} tokens, {where}; baseline: full finetuning"
    )
    print("| run | trainable parameters | median step (per run) | ratio |")
    print("|---|---|---|---|")
    runs = lambda xs: ", ".join(f"{x:.0f}" for x in xs)  # noqa: E731
    print(f"| full finetuning | {total:,} | {full_med:.0f} ms ({runs(full_ms)}) | 1.00x |")
    print(
        f"| LoRA r={args.rank}, all four linears | {trainable:,} | {lora_med:.0f} ms "
        f"({runs(lora_ms)}) | {full_med / lora_med:.2f}x |"
    )
    print(
        "\nyuyuan-3.5b at TP=1, DP=1, bf16, micro-batch 1 x 1024 tokens, no recompute "
        "(meta device; estimate = weights + grads + optimizer + activations)"
    )
    print("| run | trainable | optimizer state | weights | grads | activations | est. per GPU |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(memory_table(args.rank_3p5b, 1024, 1)))
    return 0


def _n(args) -> dict:
    return {"steps": args.steps, "warmup": args.warmup}


if __name__ == "__main__":
    raise SystemExit(main())
