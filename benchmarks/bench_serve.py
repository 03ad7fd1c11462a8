"""Serving throughput and latency: real server processes (``python -m megatron_yuyuan.serve``,
megatron-core model at TP=1), continuous batching against the static scheduler (``--scheduler
static``), both in the same run, next to offline batched generation (the same generator, one batch
of ``--concurrency``, in this process).

    python -m benchmarks.bench_serve --preset small

Two workloads, the same for both schedulers:

* **equal lengths**: ``--concurrency`` closed-loop clients, every request greedy for
  ``--max-new-tokens`` tokens (today's case; compared with offline generation too);
* **mixed**: ``--requests`` requests arriving as a Poisson process of ``--rate`` per second (the
  same seeded arrival times for both), ``max_tokens`` drawn from 8..256, a quarter of them sampled
  with their own temperature / top-k / top-p / seed.

Random peaked weights: no early EOS, so every answer has its full length and tokens/s compare
like for like.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
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


async def closed_loop(url: str, questions: list[str], concurrency: int, requests: int, tokens: int):
    """(wall seconds, latencies, generated tokens): ``concurrency`` clients, each sending its next
    request when the last one is answered."""
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

    async with httpx.AsyncClient(timeout=3600) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return wall, latencies, generated


def mixed_requests(questions: list[str], n: int, rate: float, seed: int = 0) -> list[tuple]:
    """(arrival second, body) for ``n`` requests: Poisson arrivals, ``max_new_tokens`` uniform in
    8..256, every fourth sampled with its own settings."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        body = {"question": questions[i % len(questions)], "max_new_tokens": rng.randint(8, 256)}
        if rng.random() < 0.25:
            body |= {
                "temperature": rng.choice([0.7, 1.0, 1.3]),
                "top_k": rng.choice([0, 40]),
                "top_p": rng.choice([1.0, 0.9]),
                "seed": rng.randint(0, 10**9),
            }
        out.append((t, body))
    return out


async def open_loop(url: str, plan: list[tuple]):
    """(wall seconds from the first arrival to the last answer, [(max_new_tokens, latency)],
    generated tokens) for requests sent at their arrival times."""
    import httpx

    results: list[tuple[int, float]] = []
    generated = 0

    async def one(http, at: float, body: dict, start: float):
        nonlocal generated
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        sent = time.perf_counter()
        r = await http.post(url + "/api/answer", json=body)
        r.raise_for_status()
        results.append((body["max_new_tokens"], time.perf_counter() - sent))
        generated += r.json()["tokens"]

    # a connection per request: a pooled one that the server closes as idle just when a request
    # goes out would fail that request
    limits = httpx.Limits(max_connections=len(plan), max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(one(http, at, body, start) for at, body in plan))
        wall = time.perf_counter() - start - plan[0][0]
    return wall, results, generated


class ServerProcess:
    def __init__(self, mc_dir: Path, policy: str, slots: int, threads: int, log: Path) -> None:
        import httpx

        self.url = f"http://127.0.0.1:{free_port()}"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        cmd = [sys.executable, "-m", "megatron_yuyuan.serve", "--load", str(mc_dir)]
        cmd += ["--port", self.url.rsplit(":", 1)[1], "--max-batch-size", str(slots)]
        cmd += ["--scheduler", policy, "--max-queue", "4096"]
        self.log = log
        self.proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        for _ in range(600):
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        raise RuntimeError(f"the {policy} server did not start")

    def stop(self, failed: bool = False) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)
        if failed:
            print(self.log.read_text()[-3000:], file=sys.stderr)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--max-new-tokens", type=int, default=64, help="equal-lengths workload")
    p.add_argument("--concurrency", type=int, default=32, help="clients, and the batch size")
    p.add_argument("--requests", type=int, default=160, help="mixed workload")
    p.add_argument(
        "--rate",
        type=float,
        default=4.0,
        help="mixed arrivals per second (4: about 80%% of what continuous batching sustains on "
        "the 2-core CPU, more than the static scheduler does)",
    )
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    cpu_compat.apply_if_no_cuda()
    torch.set_num_threads(args.threads)
    records, _ = parse_medquad(SAMPLE_DIR)
    questions = [r.question for r in records[:64]]
    from megatron_yuyuan.generation import MegatronGenerator, SamplingConfig

    c = args.concurrency
    plan = mixed_requests(questions, args.requests, args.rate)
    equal, mixed = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        _, mc_dir = make_models(Path(tmp), args.preset)
        gen = MegatronGenerator.from_checkpoint(str(mc_dir))
        cfg = SamplingConfig(max_new_tokens=args.max_new_tokens)
        prompts = gen.tokenizer.encode_batch([format_prompt(q) for q in questions[:c]])
        gen.generate_ids(prompts[:2], cfg)  # warm-up
        start = time.perf_counter()
        offline = sum(map(len, gen.generate_ids(prompts, cfg)))
        offline_tps = offline / (time.perf_counter() - start)
        del gen
        for policy in ("continuous", "static"):
            server = ServerProcess(mc_dir, policy, c, args.threads, Path(tmp) / f"{policy}.log")
            failed = True
            try:
                asyncio.run(closed_loop(server.url, questions, 2, 2, 4))  # warm-up
                wall, lat, toks = asyncio.run(
                    closed_loop(server.url, questions, c, 2 * c, args.max_new_tokens)
                )
                equal[policy] = (len(lat) / wall, statistics.median(lat), toks / wall)
                wall, results, toks = asyncio.run(open_loop(server.url, plan))
                short = [s for n, s in results if n <= 32]
                every = [s for _, s in results]
                mixed[policy] = (
                    len(results) / wall,
                    toks / wall,
                    statistics.median(short),
                    statistics.median(every),
                    percentile(every, 0.95),
                )
                failed = False
            finally:
                server.stop(failed)
    where = device_label(args.threads)
    print(
        f"\nserving, {args.preset} preset (megatron-core, TP=1, fp32, {where}), up to {c} rows; "
        f"baselines in the same run: the static scheduler, and offline generate (batch {c}, "
        f"{args.max_new_tokens} new tokens): {offline_tps:.0f} tokens/s"
    )
    print(f"\nequal lengths: {c} clients, greedy, {args.max_new_tokens} new tokens each")
    print("| scheduler | requests/s | p50 latency s | tokens/s | vs static | vs offline |")
    print("|---|---|---|---|---|---|")
    for policy, (rps, p50, tps) in equal.items():
        print(
            f"| {policy} | {rps:.2f} | {p50:.2f} | {tps:.0f} | "
            f"{tps / equal['static'][2]:.2f}x | {tps / offline_tps:.2f}x |"
        )
    n_short = sum(1 for _, b in plan if b["max_new_tokens"] <= 32)
    print(
        f"\nmixed: {args.requests} requests, Poisson arrivals at {args.rate:g}/s (the same for "
        f"both), max_new_tokens 8..256, a quarter sampled with their own settings; {n_short} "
        f"requests of <= 32 tokens"
    )
    print(
        "| scheduler | requests/s | tokens/s | vs static | p50 latency, <= 32 tokens, s | "
        "vs static | p50 latency, all, s | p95 latency, all, s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for policy, (rps, tps, p50_short, p50, p95) in mixed.items():
        s = mixed["static"]
        print(
            f"| {policy} | {rps:.2f} | {tps:.0f} | {tps / s[1]:.2f}x | {p50_short:.2f} | "
            f"{p50_short / s[2]:.2f}x | {p50:.2f} | {p95:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
