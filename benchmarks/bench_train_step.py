"""Training-step time: megatron_yuyuan (megatron-core GPTModel, TP=1) vs HF GPT2LMHeadModel.

Both models have the same shape, tied embeddings, tanh GELU, no dropout, fp32, the same token batch
and the same thread count, and are measured in the same process one after the other. A step is
forward + backward + gradient clipping (1.0) + AdamW. We report the median over ``--steps`` steps
after ``--warmup`` steps; ratio = HF time / our time (> 1 means we are faster).

    python -m benchmarks.bench_train_step --presets tiny,small --threads 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from megatron_yuyuan import cpu_compat, parallel
from megatron_yuyuan.config import DataConfig, RunConfig, TrainConfig, get_preset


def _median_ms(step: Callable[[], None], steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _batches(vocab: int, batch: int, seq: int, n: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(vocab, (batch, seq + 1), generator=gen) for _ in range(n)]


def hf_step_fn(cfg: RunConfig, batches: list[torch.Tensor]) -> Callable[[], None]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from megatron_yuyuan.convert.hf_io import hf_config_dict

    m = cfg.model
    # same shape, tanh GELU, tied embeddings; dropout 0 as set on the preset by run()
    hf = GPT2LMHeadModel(GPT2Config(**hf_config_dict(m, torch.float32)))
    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.01)
    cycle = itertools.cycle(batches)

    def step() -> None:
        ids = next(cycle)
        opt.zero_grad(set_to_none=True)
        out = hf(input_ids=ids[:, :-1], labels=ids[:, :-1])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()

    return step


def ours_step_fn(cfg: RunConfig, batches: list[torch.Tensor]) -> Callable[[], None]:
    from megatron_yuyuan.training import setup, train_step

    state = setup(cfg)
    seq = cfg.data.seq_length
    prepared = [
        {
            "tokens": ids[:, :-1].contiguous(),
            "labels": ids[:, 1:].contiguous(),
            "loss_mask": torch.ones(ids.shape[0], seq),
            "position_ids": torch.arange(seq).expand(ids.shape[0], -1),
        }
        for ids in batches
    ]
    cycle = itertools.cycle(prepared)

    def step() -> None:
        train_step(state, cycle)

    return step


def run(
    presets: Sequence[str],
    threads: int,
    batch: int,
    seq_lengths: dict[str, int],
    steps: int,
    warmup: int,
) -> list[dict]:
    cpu_compat.apply_if_no_cuda()
    torch.set_num_threads(threads)
    rows = []
    for name in presets:
        seq = seq_lengths.get(name, 128)
        model = get_preset(name)
        model.hidden_dropout = model.attention_dropout = 0.0
        cfg = RunConfig(
            model=model,
            data=DataConfig(seq_length=seq, mock_data=True),
            train=TrainConfig(
                micro_batch_size=batch,
                global_batch_size=batch,
                train_iters=steps + warmup,
                lr_decay_style="constant",
                clip_grad=1.0,
            ),
        )
        batches = _batches(model.vocab_size, batch, seq)
        torch.manual_seed(0)
        hf_ms = _median_ms(hf_step_fn(cfg, batches), steps, warmup)
        ours_ms = _median_ms(ours_step_fn(cfg, batches), steps, warmup)
        parallel.destroy_distributed()
        tokens = batch * seq
        rows.append(
            {
                "preset": name,
                "layers": model.num_layers,
                "hidden": model.hidden_size,
                "tokens_per_step": tokens,
                "threads": threads,
                "hf_ms": hf_ms,
                "ours_ms": ours_ms,
                "hf_tokens_per_s": tokens / hf_ms * 1000,
                "ours_tokens_per_s": tokens / ours_ms * 1000,
                "ratio": hf_ms / ours_ms,
            }
        )
    return rows


def print_table(rows: list[dict]) -> None:
    print(
        f"\ntrain step, fp32, TP=1, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, "
        f"baseline: transformers GPT2LMHeadModel (same shape, batch, threads)"
    )
    header = (
        f"| {'preset':8} | {'shape':10} | {'tokens':>6} | {'threads':>7} | {'HF ms':>8} | "
        f"{'ours ms':>8} | {'HF tok/s':>9} | {'ours tok/s':>10} | {'ratio':>6} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in rows:
        print(
            f"| {r['preset']:8} | {str(r['layers']) + 'L h' + str(r['hidden']):10} | "
            f"{r['tokens_per_step']:6d} | {r['threads']:7d} | {r['hf_ms']:8.1f} | "
            f"{r['ours_ms']:8.1f} | {r['hf_tokens_per_s']:9.0f} | {r['ours_tokens_per_s']:10.0f} | "
            f"{r['ratio']:5.2f}x |"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument(
        "--seq-length", type=int, default=None, help="default: 128 for tiny, 256 for small"
    )
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    presets = args.presets.split(",")
    seqs = {p: args.seq_length or {"tiny": 128, "small": 256}.get(p, 256) for p in presets}
    rows = run(presets, args.threads, args.micro_batch_size, seqs, args.steps, args.warmup)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"> wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
