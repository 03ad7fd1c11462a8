"""Dynamic batching: concurrent requests become one batched KV-cache generation.

Requests wait in a bounded queue (full: the app answers 503 with ``Retry-After``). The batch loop
takes the first waiting request, gathers more for up to ``wait_ms`` or until ``max_batch_size``,
and runs those with identical sampling settings (every field but ``max_new_tokens``, which is per
row) as one batch in a worker thread, so the event loop keeps streaming tokens meanwhile. Each new
token goes to its request's event queue; a request whose client left is stopped at the next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from megatron_yuyuan.sampling import SamplingConfig
from megatron_yuyuan.serve.engine import Engine, Job

SHUTTING_DOWN = "the server is shutting down; retry shortly"


class QueueFull(Exception):
    """The request queue is at its limit."""


@dataclass(eq=False)  # each request is itself: batches are formed and removed by identity
class Request:
    """One client request in flight: its events are ``("token", id)`` (only with ``tokens``)
    then ``("done", ids)`` (or ``("error", message)``)."""

    prompt: list[int]
    sampling: SamplingConfig
    tokens: bool = True
    """Deliver every token as it comes (streams, stop strings); otherwise only the result,
    which keeps the event loop (and the GIL) free for the generation thread."""
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop generating for this request (client gone, or a stop string matched)."""
        self.cancelled.set()


def batch_key(request: Request) -> tuple:
    """Requests batch together when these agree: the sampling settings but the budget; and, with
    a repetition penalty or n-gram ban (whose history includes the left padding, as in
    transformers), the prompt length, so that no row is padded and the answer is the one the
    request would get alone."""
    cfg = request.sampling
    key = dataclasses.astuple(dataclasses.replace(cfg, max_new_tokens=1))
    if cfg.repetition_penalty != 1.0 or cfg.no_repeat_ngram_size > 0:
        key += (len(request.prompt),)
    return key


class Batcher:
    def __init__(
        self, engine: Engine, max_batch_size: int = 8, wait_ms: float = 10.0, max_queue: int = 64
    ) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.wait_s = wait_ms / 1000.0
        self.queue: asyncio.Queue = asyncio.Queue()  # bounded by room(): queue + pending
        self.pending: list[Request] = []  # taken from the queue, not yet run (other settings)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.task: asyncio.Task | None = None
        self.max_queue = max_queue
        self.batches = 0  # batches run, for /health
        self.running: list[Request] = []
        self.draining = False  # shutting down: no new requests, the waiting ones were refused

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Cancel everything in flight; wait (off the event loop) for the running batch."""
        for r in self.running + self.pending:
            r.cancel()
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        await asyncio.get_running_loop().run_in_executor(None, self.executor.shutdown, True)

    def drain(self, first: bool = True) -> None:
        """Shutting down: refuse new requests and answer every waiting one ``("unavailable",
        message)`` at once; the running batch goes on (the server's grace period bounds it),
        unless this is not the ``first`` call (a second signal): then it stops at its next step."""
        self.draining = True
        if not first:
            for r in self.running:
                r.cancel()
        waiting = self.pending + [self.queue.get_nowait() for _ in range(self.queue.qsize())]
        self.pending = []
        for r in waiting:
            r.cancel()
            r.events.put_nowait(("unavailable", SHUTTING_DOWN))

    def waiting(self) -> int:
        """Requests accepted and not yet running."""
        return self.queue.qsize() + len(self.pending)

    def room(self) -> int:
        """How many more requests may wait."""
        return 0 if self.draining else max(self.max_queue - self.waiting(), 0)

    def submit(self, request: Request) -> None:
        if self.room() < 1:
            raise QueueFull
        self.queue.put_nowait(request)

    async def _gather(self) -> list[Request]:
        """Up to max_batch_size requests with the first one's settings."""
        loop = asyncio.get_running_loop()
        if not self.pending:
            self.pending.append(await self.queue.get())
        deadline = loop.time() + self.wait_s
        while len(self.pending) < self.max_batch_size:
            timeout = deadline - loop.time()
            if timeout <= 0:
                break
            try:
                self.pending.append(await asyncio.wait_for(self.queue.get(), timeout))
            except asyncio.TimeoutError:
                break
        while len(self.pending) < 4 * self.max_batch_size and not self.queue.empty():
            self.pending.append(self.queue.get_nowait())  # look further for same-key requests
        # Same settings, and room for every row: a batch runs to its longest prompt plus its
        # largest budget, which must fit the model's positions (each request alone does).
        key = batch_key(self.pending[0])
        batch: list[Request] = []
        longest = budget = 0
        for r in self.pending:
            if len(batch) == self.max_batch_size:
                break
            if batch_key(r) != key:
                continue
            fits = max(longest, len(r.prompt)) + max(budget, r.sampling.max_new_tokens)
            if batch and fits > self.engine.max_positions:
                continue
            batch.append(r)
            longest, budget = max(longest, len(r.prompt)), max(budget, r.sampling.max_new_tokens)
        self.pending = [r for r in self.pending if r not in batch]
        return [r for r in batch if not r.cancelled.is_set()]

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            if not batch:
                continue

            def on_token(request: Request):
                def push(token: int) -> bool:
                    if request.tokens:
                        loop.call_soon_threadsafe(request.events.put_nowait, ("token", token))
                    return not request.cancelled.is_set()

                return push

            jobs = [Job(r.prompt, r.sampling, on_token(r)) for r in batch]
            self.running = batch
            try:
                results = await loop.run_in_executor(self.executor, self.engine.run, jobs)
            except Exception as exc:  # a failed batch fails its requests, not the server
                for r in batch:
                    r.events.put_nowait(("error", f"{type(exc).__name__}: {exc}"))
                continue
            finally:
                self.running = []
            self.batches += 1
            for r, ids in zip(batch, results):
                r.events.put_nowait(("done", ids))
