"""The GPU check: one command that tells whether this toolkit is correct and fast on this GPU.

    bash benchmarks/gpu_check.sh            # with an NVIDIA GPU (about 8 minutes on an H100/H200)
    bash benchmarks/gpu_check.sh --dry-run  # print the plan (any machine)

Each step runs in its own process (a failure is reported and the next step runs; GPU memory is
freed between steps) and the script ends with one table:

* environment: torch, CUDA, megatron-core, Transformer Engine, Apex, the GPU;
* the ``cuda``-marked tests;
* bf16 training throughput, MFU and peak memory of a 1.3B GPT-2 (24 layers, hidden 2048) and of
  yuyuan-3.5b on mock data (against the unfused baseline: no weight-gradient fusion, multi-tensor
  AdamW) and on packed MedQuAD (THD varlen attention against dense block-diagonal masks), median
  over the steps after warm-up;
* fp32 loss parity: TP=1 on the GPU against TP=2 on two CPU processes (gloo);
* conversion + greedy generation: tokens identical to ``transformers.generate`` on the GPU, and
  tokens/s against it (small preset in fp32; yuyuan-3.5b in bf16 at batch 8 and 32, 128 new
  tokens, where the target is 1.5x).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MOCK = ["--mock-data", "--hidden-dropout", "0", "--attention-dropout", "0"]
GPT2_1_3B = ["--config", "tiny", "--num-layers", "24", "--hidden-size", "2048"]
GPT2_1_3B += ["--num-attention-heads", "16", "--vocab-size", "50257"]
GPT2_1_3B += ["--max-position-embeddings", "1024"]
# The fp32 parity runs: the same tiny model and data on the GPU and on 2 CPU processes.
PARITY = ["--config", "tiny", "--mock-data", "--seq-length", "128", "--micro-batch-size", "4"]
PARITY += ["--global-batch-size", "8", "--train-iters", "6", "--lr", "3e-3"]


@dataclass
class Step:
    name: str
    """Row name in the table."""
    cmd: list[str] = field(default_factory=list)
    """Command (run from the repository root)."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment."""
    timeout: int = 300
    baseline: str | None = None
    """Name of an earlier training step whose tokens/s this one is compared with."""


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def train_cmd(model: list[str], metrics: Path, iters: int, mbs: int, extra: Sequence[str] = ()):
    # 8 micro-batches per step, as a finetune with a global batch of 8 x mbs accumulates: the
    # optimizer step is paid once per 8 micro-batches, as in real runs.
    return python(
        "-m", "megatron_yuyuan.finetune", *model, "--bf16", "--seq-length", "1024",
        "--micro-batch-size", str(mbs), "--global-batch-size", str(8 * mbs),
        "--train-iters", str(iters), "--lr", "1e-5", "--log-interval", "5",
        "--metrics-file", str(metrics), *extra,
    )  # fmt: skip


# Megatron-LM's defaults before this toolkit had its own GPU kernels: the named baseline.
UNFUSED = ["--no-gradient-accumulation-fusion", "--no-fused-adam"]
M35 = "train yuyuan-3.5b bf16 mock (mbs 2, gbs 16)"
M35_BASE = "train yuyuan-3.5b bf16 mock, unfused baseline (mbs 2, gbs 16)"
PACKED_MASK = "train yuyuan-3.5b bf16 packed MedQuAD, masks (mbs 2, gbs 16)"


def cuda_test_files() -> list[str]:
    """The test files that hold ``cuda``-marked tests: collecting only these keeps the check
    independent of the serving and evaluation test dependencies a GPU image may lack."""
    tests = sorted((REPO / "tests").glob("test_*.py"))
    return [str(f.relative_to(REPO)) for f in tests if "pytest.mark.cuda" in f.read_text()]


def plan(work: Path, iters: int) -> list[Step]:
    data = work / "mq"
    yuyuan = ["--config", "yuyuan-3.5b"]
    packed = [*yuyuan, "--data-prefix", str(data)]
    return [
        Step("cuda-marked tests", python("-m", "pytest", "-q", "-m", "cuda", *cuda_test_files())),
        Step(
            "train gpt2-1.3b bf16 mock (mbs 4, gbs 32)",
            train_cmd([*GPT2_1_3B, *MOCK], work / "m13.jsonl", iters, 4),
        ),
        Step(M35_BASE, train_cmd([*yuyuan, *MOCK, *UNFUSED], work / "m35b.jsonl", iters, 2)),
        Step(M35, train_cmd([*yuyuan, *MOCK], work / "m35.jsonl", iters, 2), baseline=M35_BASE),
        Step(
            "preprocess MedQuAD sample",
            python("-m", "tools.preprocess_medquad", "--output-prefix", str(data), "--no-progress"),
        ),
        Step(
            PACKED_MASK,
            train_cmd([*packed, "--packed-format", "mask"], work / "m35m.jsonl", iters, 2),
        ),
        Step(
            "train yuyuan-3.5b bf16 packed MedQuAD, THD varlen (mbs 2, gbs 16)",
            train_cmd([*packed, "--packed-format", "thd"], work / "m35t.jsonl", iters, 2),
            baseline=PACKED_MASK,
        ),
        Step(
            "fp32 loss: TP=1 GPU",
            python(
                "-m", "megatron_yuyuan.finetune", *PARITY, "--metrics-file", str(work / "gpu.jsonl")
            ),
        ),
        Step(
            "fp32 loss: TP=2 CPU gloo",
            python(
                *("-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533"),
                *("-m", "megatron_yuyuan.finetune", *PARITY, "--tensor-model-parallel-size", "2"),
                *("--metrics-file", str(work / "cpu.jsonl")),
            ),
            env={"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "2"},
        ),
        Step(
            "convert + greedy generation vs transformers (small, fp32, batch 8)",
            python("-m", "benchmarks.bench_generate", "--preset", "small", "--batch-size", "8"),
        ),
        *(
            Step(
                f"greedy generation vs transformers (yuyuan-3.5b, bf16, batch {b}, 128 tokens)",
                python(
                    *("-m", "benchmarks.bench_generate", "--preset", "yuyuan-3.5b"),
                    *("--batch-size", str(b), "--max-new-tokens", "128", "--dtype", "bfloat16"),
                    *("--repeats", "2", "--skip-no-cache"),
                ),
            )
            for b in (8, 32)
        ),
    ]


def median_tokens_per_s(path: Path, warmup: int) -> float | None:
    rows = _training_rows(path, warmup)
    return statistics.median(r["tokens_per_s"] for r in rows) if rows else None


def _training_rows(path: Path, warmup: int) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a run killed mid-line
            continue
    return [r for r in rows if "tokens_per_s" in r][warmup:]


def summarize_training(path: Path, warmup: int) -> str | None:
    rows = _training_rows(path, warmup)
    if not rows:
        return None
    tps = statistics.median(r["tokens_per_s"] for r in rows)
    mfu = statistics.median(r.get("mfu") or 0.0 for r in rows)
    mem = max(r.get("peak_memory_gb") or 0.0 for r in rows)
    loss = rows[-1]["loss"]
    return (
        f"{tps:,.0f} tokens/s, MFU {100 * mfu:.1f}%, peak {mem:.1f} GiB, "
        f"last loss {loss:.3f} (median of {len(rows)} steps)"
    )


def loss_parity(work: Path) -> str | None:
    try:
        gpu = [json.loads(x)["loss"] for x in (work / "gpu.jsonl").read_text().splitlines()]
        cpu = [json.loads(x)["loss"] for x in (work / "cpu.jsonl").read_text().splitlines()]
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return None
    if not gpu or not cpu:
        return None
    worst = max(abs(a - b) / abs(b) for a, b in zip(gpu, cpu))
    ok = len(gpu) == len(cpu) == 6 and worst < 1e-4
    return (
        f"{'OK' if ok else 'FAIL'}: max relative loss difference {worst:.2e} over {len(gpu)} steps"
    )


def metrics_path(step: Step) -> Path:
    return Path(step.cmd[step.cmd.index("--metrics-file") + 1])


def environment() -> list[tuple[str, str]]:
    import importlib.metadata as md

    import torch

    def version(dist: str) -> str:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return "not installed"

    gpu = "none"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs"
    return [
        ("GPU", gpu),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda})"),
        ("megatron-core", version("megatron-core")),
        ("transformer-engine", version("transformer-engine")),
        ("apex", version("apex")),
        ("python", sys.version.split()[0]),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="print the plan; run nothing")
    p.add_argument("--iters", type=int, default=12, help="training steps per throughput run")
    p.add_argument("--warmup", type=int, default=4, help="steps left out of the medians")
    p.add_argument("--skip", default="", help="comma-separated step numbers to skip")
    p.add_argument("--out", default=None, help="also write the table and logs into this folder")
    args = p.parse_args(argv)
    if args.out:
        work = Path(args.out)
    else:  # a dry run creates nothing
        work = Path("$WORK") if args.dry_run else Path(tempfile.mkdtemp(prefix="gpu_check."))
    steps = plan(work, args.iters)
    skip = {int(x) for x in args.skip.split(",") if x}
    if args.dry_run:
        print("GPU check plan (each step in its own process, from the repository root):")
        for i, s in enumerate(steps, 1):
            env = " ".join(f"{k}={v!r}" for k, v in s.env.items())
            print(f"{i}. {s.name}\n   {env + ' ' if env else ''}{' '.join(s.cmd)}")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("error: no CUDA GPU here; use --dry-run to see the plan", file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    results: list[tuple[str, str]] = list(environment())
    failed = 0
    for i, s in enumerate(steps, 1):
        if i in skip:
            results.append((s.name, "skipped"))
            continue
        print(f"== {i}/{len(steps)} {s.name}", flush=True)
        start = time.perf_counter()
        log = work / f"step{i}.log"
        if "--metrics-file" in s.cmd:  # this script's own file from an earlier run: start anew
            Path(s.cmd[s.cmd.index("--metrics-file") + 1]).unlink(missing_ok=True)
        try:
            proc = subprocess.run(
                s.cmd,
                cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **s.env},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=s.timeout,
            )
            out, rc = proc.stdout, proc.returncode
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
            rc = 124
        log.write_text(out)
        seconds = time.perf_counter() - start
        tail = [ln for ln in out.splitlines() if ln.strip()][-12:]
        print("\n".join(tail), flush=True)
        failed += rc != 0
        status = "OK" if rc == 0 else f"FAIL (exit {rc}, log {log})"
        detail = ""
        if s.name.startswith("train"):
            detail = summarize_training(metrics_path(s), args.warmup)
            base = next((b for b in steps if b.name == s.baseline), None)
            ours = median_tokens_per_s(metrics_path(s), args.warmup)
            theirs = base and median_tokens_per_s(metrics_path(base), args.warmup)
            if detail and ours and theirs:
                detail += f"; {ours / theirs:.2f}x the tokens/s of '{base.name}'"
        elif s.name.endswith("CPU gloo"):
            detail = loss_parity(work)
        elif s.name.startswith("convert"):
            detail = "; ".join(ln for ln in tail if ln.startswith(("|", "identical")))
        elif s.name.startswith("cuda"):
            detail = tail[-1] if tail else ""
        results.append((s.name, f"{status} in {seconds:.0f} s" + (f": {detail}" if detail else "")))
    table = ["| check | result |", "|---|---|"] + [f"| {k} | {v} |" for k, v in results]
    print("\n".join(["", *table]))
    (work / "gpu_check.md").write_text("\n".join(table) + "\n")
    print(f"> wrote {work / 'gpu_check.md'} (logs: {work}/step*.log)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
