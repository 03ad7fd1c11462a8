"""Serving throughput and latency: a real server process (``python -m megatron_yuyuan.serve``,
megatron-core model at TP=1) under 1, 8 and 32 concurrent clients, next to offline batched
generation (the same generator, batch 32, in this process) measured in the same run.

    python -m benchmarks.bench_serve --preset small --max-new-tokens 64

Every request asks a MedQuAD question greedily for ``--max-new-tokens`` tokens (random peaked
weights: no early EOS, so every answer has the full length and tokens/s compare like for like).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.bench_generate import device_label, make_models
from megatron_yuyuan import cpu_compat
from megatron_yuyuan.data.medquad import parse_medquad
from megatron_yuyuan.data.sample import SAMPLE_DIR
from megatron_yuyuan.prompts import format_prompt


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def load(url: str, questions: list[str], concurrency: int, requests: int, tokens: int):
    """(wall seconds, latencies, generated tokens) for ``requests`` requests, ``concurrency``
    at a time."""
    import httpx

    latencies: list[float] = []
    generated = 0
    todo = iter(range(requests))

    async def client(http):
        nonlocal generated
        for i in todo:
            start = time.perf_counter()
            r = await http.post(
                url + "/api/answer",
                json={"question": questions[i % len(questions)], "max_new_tokens": tokens},
            )
            r.raise_for_status()
            latencies.append(time.perf_counter() - start)
            generated += r.json()["tokens"]

    async with httpx.AsyncClient(timeout=600) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return wall, latencies, generated


def main(argv: Sequence[str] | None = None) -> int:
    import httpx

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    cpu_compat.apply_if_no_cuda()
    torch.set_num_threads(args.threads)
    levels = [int(c) for c in args.concurrency.split(",")]
    biggest = max(levels)
    records, _ = parse_medquad(SAMPLE_DIR)
    questions = [r.question for r in records[:64]]
    from megatron_yuyuan.generation import MegatronGenerator, SamplingConfig

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        _, mc_dir = make_models(Path(tmp), args.preset)
        gen = MegatronGenerator.from_checkpoint(str(mc_dir))
        cfg = SamplingConfig(max_new_tokens=args.max_new_tokens)
        prompts = gen.tokenizer.encode_batch([format_prompt(q) for q in questions[:biggest]])
        gen.generate_ids(prompts[:2], cfg)  # warm-up
        start = time.perf_counter()
        offline = sum(map(len, gen.generate_ids(prompts, cfg)))
        offline_tps = offline / (time.perf_counter() - start)
        del gen

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "megatron_yuyuan.serve",
                "--load",
                str(mc_dir),
                "--port",
                str(port),
                "--max-batch-size",
                str(biggest),
                "--batch-wait-ms",
                "20",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(600):
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            asyncio.run(load(url, questions, 2, 2, 4))  # warm-up
            for c in levels:
                wall, lat, toks = asyncio.run(
                    load(url, questions, c, max(2 * c, 8), args.max_new_tokens)
                )
                lat.sort()
                rows.append(
                    (
                        c,
                        len(lat) / wall,
                        statistics.median(lat),
                        lat[min(len(lat) - 1, int(0.95 * len(lat)))],
                        toks / wall,
                    )
                )
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    where = device_label(args.threads)
    print(
        f"\nserving, {args.preset} preset (megatron-core, TP=1), greedy, {args.max_new_tokens} new "
        f"tokens per request, fp32, {where}; baseline: offline batched generate, batch {biggest}, "
        f"same run: {offline_tps:.0f} tokens/s"
    )
    print("| concurrency | requests/s | p50 latency s | p95 latency s | tokens/s | vs offline |")
    print("|---|---|---|---|---|---|")
    for c, rps, p50, p95, tps in rows:
        print(f"| {c} | {rps:.2f} | {p50:.2f} | {p95:.2f} | {tps:.0f} | {tps / offline_tps:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
