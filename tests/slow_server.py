"""A stand-in engine for the server tests, and a real HTTP server process over it (``STEP_S`` per
decoding step, every token 7) for the shutdown and connection tests: ``python tests/slow_server.py
PORT HEAD_TIMEOUT_S GRACE_S``. It wires ``megatron_yuyuan.serve.http.run_server`` exactly as
``python -m megatron_yuyuan.serve`` does."""

from __future__ import annotations

import signal
import sys
import time

from megatron_yuyuan.serve.app import ServedModel, create_app
from megatron_yuyuan.serve.http import run_server
from megatron_yuyuan.serve.scheduler import Scheduler
from megatron_yuyuan.slots import Emitted

STEP_S = 0.05


class StepEngine:
    """Each step takes ``step_s``; every live row emits ``token`` until its budget is spent (the
    scheduler's side of :class:`megatron_yuyuan.serve.engine.Engine`, without a model)."""

    eos = 0

    def __init__(self, step_s: float = STEP_S, token: int = 7, max_positions: int = 100_000):
        self.step_s, self.token, self.max_positions = step_s, token, max_positions
        self.rows: dict[int, list[int]] = {}  # slot -> [tokens so far, budget]
        self.prompts: list[list[int]] = []  # every admitted prompt, in order
        self.widths: list[int] = []  # rows computed per step (the last live slot + 1)

    def step(self, plan):
        if plan.reset:
            self.rows.clear()
        for slot in plan.release:
            self.rows.pop(slot, None)
        for src, dst in plan.moves:
            self.rows[dst] = self.rows.pop(src)
        out = []
        if self.rows:
            time.sleep(self.step_s)
            self.widths.append(max(self.rows) + 1)
        for slot, row in self.rows.items():
            row[0] += 1
            out.append(Emitted(slot, self.token, row[0] >= row[1] or self.token == self.eos))
        for a in plan.admit:
            self.prompts.append(list(a.prompt))
            self.rows[a.slot] = [1, a.sampling.max_new_tokens]
            ended = a.sampling.max_new_tokens <= 1 or self.token == self.eos
            out.append(Emitted(a.slot, self.token, ended))
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
    scheduler = Scheduler(StepEngine(), max_batch_size=1, max_queue=64)
    app = create_app(scheduler, WordTokenizer(), ServedModel("slow", "x"))
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    run_server(app, "127.0.0.1", port, "warning", 2048, 5, head_timeout_s, grace_s, scheduler.drain)
    print("> server stopped", flush=True)
