"""Training time blocked by checkpoint saves: ``--async-save`` against synchronous saves, same run.

Two finetunes of the ``small`` preset at DP=2 (2 processes, mock data), identical but for
``--async-save``, each saving every ``--save-interval`` steps. Every save prints its size, its
seconds and the seconds training was blocked by it; the table shows the medians over the
interval saves (the run's last save is synchronous in both: the run ends with it) and the ratio
of blocked seconds, async / sync (target: at most 0.3).

    python -m benchmarks.bench_async_save
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

SAVED = re.compile(
    r"> saved checkpoint \S+/iter_(\d+) \(([\d.]+ \w+), ([\d.]+) s, training blocked ([\d.]+) s"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def run(
    save: Path, args: argparse.Namespace, background: bool
) -> list[tuple[int, str, float, float]]:
    """One finetune; returns (iteration, size, seconds, blocked seconds) per save."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), "-m", "megatron_yuyuan.finetune",
           "--config", "small", "--mock-data", "--seq-length", str(args.seq_length),
           "--micro-batch-size", str(args.micro_batch_size), "--train-iters", str(args.iters),
           "--lr-warmup-iters", "1", "--save", str(save), "--save-interval",
           str(args.save_interval), "--log-interval", "1000",
           *(["--async-save"] if background else [])]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"finetune failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    out = (proc.stdout + proc.stderr).replace("\r", "\n")
    return [(int(i), size, float(s), float(b)) for i, size, s, b in SAVED.findall(out)]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=48)
    p.add_argument("--save-interval", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--dir", default=None, help="where the checkpoints go (default: a temp dir)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench_async_save.") as tmp:
        results = {
            mode: run(Path(tmp) / mode, args, background=mode == "async")
            for mode in ("sync", "async")
        }
    rows = {}
    for mode, saves in results.items():
        interval = [s for s in saves if s[0] != args.iters]  # the last save is sync in both
        if not interval:
            raise SystemExit(f"{mode}: no interval saves printed (raise --iters)")
        rows[mode] = (
            len(interval),
            interval[0][1],
            statistics.median(s[2] for s in interval),
            statistics.median(s[3] for s in interval),
        )
    base = rows["sync"][3]
    print(
        f"\n`small` preset, DP=2 (2 CPU processes), {args.iters} steps, a save every "
        f"{args.save_interval}; baseline: synchronous saves in the same run"
    )
    print("| saves | count | size | median save s | median blocked s | blocked vs sync |")
    print("|---|---|---|---|---|---|")
    for mode, (count, size, seconds, blocked) in rows.items():
        name = "synchronous (baseline)" if mode == "sync" else "--async-save"
        print(
            f"| {name} | {count} | {size} | {seconds:.2f} | {blocked:.2f} | {blocked / base:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
