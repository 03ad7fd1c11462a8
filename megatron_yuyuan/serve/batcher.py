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
from typing import Optional

from megatron_yuyuan.generation import SamplingConfig
from megatron_yuyuan.serve.engine import Engine, Job


class QueueFull(Exception):
    """The request queue is at its limit."""


@dataclass
class Request:
    """One client request in flight: its events are ``("token", id)`` then ``("done", ids)``
    (or ``("error", message)``)."""

    prompt: list[int]
    sampling: SamplingConfig
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop generating for this request (client gone, or a stop string matched)."""
        self.cancelled.set()


def batch_key(cfg: SamplingConfig) -> tuple:
    """Requests batch together when these agree."""
    return dataclasses.astuple(dataclasses.replace(cfg, max_new_tokens=1))


class Batcher:
    def __init__(
        self, engine: Engine, max_batch_size: int = 8, wait_ms: float = 10.0, max_queue: int = 64
    ) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.wait_s = wait_ms / 1000.0
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=max_queue)
        self.pending: list[Request] = []  # taken from the queue, not yet run (other settings)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.task: Optional[asyncio.Task] = None
        self.batches = 0  # batches run, for /health

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=True)

    def submit(self, request: Request) -> None:
        try:
            self.queue.put_nowait(request)
        except asyncio.QueueFull:
            raise QueueFull from None

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
        key = batch_key(self.pending[0].sampling)
        batch = [r for r in self.pending if batch_key(r.sampling) == key][: self.max_batch_size]
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
                    loop.call_soon_threadsafe(request.events.put_nowait, ("token", token))
                    return not request.cancelled.is_set()

                return push

            jobs = [Job(r.prompt, r.sampling, on_token(r)) for r in batch]
            try:
                results = await loop.run_in_executor(self.executor, self.engine.run, jobs)
            except Exception as exc:  # a failed batch fails its requests, not the server
                for r in batch:
                    r.events.put_nowait(("error", f"{type(exc).__name__}: {exc}"))
                continue
            self.batches += 1
            for r, ids in zip(batch, results):
                r.events.put_nowait(("done", ids))
