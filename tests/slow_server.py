"""A real HTTP server process over a stand-in engine (``STEP_S`` per token, every token 7), for the
shutdown and connection tests: ``python tests/slow_server.py PORT HEAD_TIMEOUT_S GRACE_S``. It
wires ``megatron_yuyuan.serve.http.run_server`` exactly as ``python -m megatron_yuyuan.serve``
does."""

from __future__ import annotations

import signal
import sys
import time

from megatron_yuyuan.serve.app import ServedModel, create_app
from megatron_yuyuan.serve.batcher import Batcher
from megatron_yuyuan.serve.http import run_server

STEP_S = 0.05


class StepEngine:
    max_positions = 100_000

    def run(self, jobs):
        out = [[] for _ in jobs]
        live = set(range(len(jobs)))
        for _ in range(max(j.sampling.max_new_tokens for j in jobs)):
            time.sleep(STEP_S)
            for i in sorted(live):
                if len(out[i]) < jobs[i].sampling.max_new_tokens and jobs[i].on_token(7):
                    out[i].append(7)
                else:
                    live.discard(i)
            if not live:
                break
        return out


class WordTokenizer:
    """One token per word; every token decodes to " x"."""

    eod = 0

    def encode(self, text):
        return [1] * len(text.split())

    def decode(self, ids):
        return " x" * len(ids)


if __name__ == "__main__":
    port, head_timeout_s, grace_s = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
    batcher = Batcher(StepEngine(), max_batch_size=1, wait_ms=0, max_queue=64)
    app = create_app(batcher, WordTokenizer(), ServedModel("slow", "x"))
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    run_server(app, "127.0.0.1", port, "warning", 2048, 5, head_timeout_s, grace_s, batcher.drain)
    print("> server stopped", flush=True)
