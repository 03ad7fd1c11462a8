"""Checkpoint save time: our threaded writer against megatron-core's default writer, same run.

* baseline: ``dist_checkpointing.save`` with megatron-core's default ``torch_dist`` strategy, which
  forks a writer process per shard file on every save (and starts a Manager process once).
* ours: :func:`megatron_yuyuan.checkpoint.storage.save_sharded`, whose writer threads live in the
  trainer's process (no fork: no deadlock on Ctrl-C, nothing outlives a killed run).

Both write the same state (``--gib`` of fp32 tensors in 64 MiB pieces plus a small object) to
``--dir`` (default: a temporary folder), alternating, ``--repeats`` times each; the table shows the
median seconds, GiB/s and the ratio ours / baseline.

    python -m benchmarks.bench_checkpoint_save --gib 2
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch


def sharded_state(gib: float) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    rows = 64 * 2**20 // (4 * 4096)  # 64 MiB fp32 pieces of 4096 columns
    pieces = max(1, round(gib * 16))
    generator = torch.Generator().manual_seed(0)
    return {
        f"w{i}": ShardedTensor.from_rank_offsets(
            f"w{i}", torch.randn(rows, 4096, generator=generator), replica_id=0
        )
        for i in range(pieces)
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="state size in GiB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: /tmp)")
    args = parser.parse_args(argv)

    from megatron.core import dist_checkpointing

    from megatron_yuyuan import parallel
    from megatron_yuyuan.checkpoint import storage
    from megatron_yuyuan.config import get_preset

    parallel.init_distributed()
    state = sharded_state(args.gib)
    size = sum(v.data.numel() * 4 for v in state.values()) / 2**30
    root = Path(tempfile.mkdtemp(prefix="bench_ckpt_", dir=args.dir))
    times: dict[str, list[float]] = {"baseline": [], "ours": []}
    try:
        for i in range(args.repeats):
            out = root / f"baseline_{i}"
            out.mkdir()
            start = time.perf_counter()
            dist_checkpointing.save(state, str(out))
            times["baseline"].append(time.perf_counter() - start)
            start = time.perf_counter()
            storage.save_sharded(root / f"ours_{i}", state, get_preset("tiny"), 1, 1, torch.float32)
            times["ours"].append(time.perf_counter() - start)
            shutil.rmtree(out)
            shutil.rmtree(root / f"ours_{i}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
        parallel.destroy_distributed()
    base = statistics.median(times["baseline"])
    print(f"checkpoint save of {size:.2f} GiB, median of {args.repeats} (CPU, {torch.__version__})")
    print(f"{'writer':<44} {'seconds':>8} {'GiB/s':>7} {'ratio':>6}")
    for name, label in (
        ("baseline", "megatron-core default (forked writers)"),
        ("ours", "save_sharded (writer threads)"),
    ):
        t = statistics.median(times[name])
        print(f"{label:<44} {t:>8.2f} {size / t:>7.2f} {t / base:>5.2f}x")


if __name__ == "__main__":
    main()
