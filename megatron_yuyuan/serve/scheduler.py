"""Iteration-level scheduling: requests join the running batch at the next decoding step and leave
the moment they end.

A generation thread runs steps while anything is live or waiting. Before each step it frees the
rows that ended (EOS, their ``max_tokens``, a stop string, a client gone: :meth:`Request.cancel`)
and gives free rows to waiting requests, whatever their sampling settings (the choice is per row);
the step decodes the live rows and prefills the newcomers (:class:`megatron_yuyuan.slots.Plan`).
``static`` is the older batcher, kept to compare against: a batch of requests with identical
sampling settings (but the budget) is admitted only when the previous one has ended entirely,
after its first request has waited up to ``wait_ms`` for others; a row whose answer ended runs on
with its batch and every answer is delivered when the batch ends.

Requests wait in a bounded queue (full: the app answers 503 with ``Retry-After``). Each token goes
to its request's asyncio queue as ``("token", id, logprob)`` (only when it streams), then
``("done", ids, logprobs)`` (or ``("error", message)``), one hand-over to the event loop per step.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time
from dataclasses import dataclass, field

from megatron_yuyuan.sampling import SamplingConfig
from megatron_yuyuan.slots import Admission, Plan

SHUTTING_DOWN = "the server is shutting down; retry shortly"
POLICIES = ("continuous", "static")


class QueueFull(Exception):
    """The request queue is at its limit."""


@dataclass(eq=False)  # each request is itself
class Request:
    """One prompt in flight."""

    prompt: list[int]
    sampling: SamplingConfig
    tokens: bool = True
    """Deliver every token as it comes (streams, stop strings); otherwise only the result."""
    logprobs: int | None = None
    """Report each token's log-probability and this many alternatives (None: none)."""
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    ids: list[int] = field(default_factory=list)
    logprob_list: list = field(default_factory=list)

    def cancel(self) -> None:
        """Stop generating for this request (client gone, or a stop string matched)."""
        self.cancelled.set()


class Scheduler:
    """Rank 0's scheduler over an engine whose ``step(plan)`` returns the emitted tokens.

    Args:
        engine: ``step(Plan) -> list[Emitted]`` and ``max_positions``.
        max_batch_size: rows decoded together (the engine's slots).
        max_queue: requests waiting at most.
        policy: ``continuous`` or ``static``.
        metrics: a :class:`megatron_yuyuan.serve.metrics.Metrics` (or None).
        wait_ms: ``static`` only: how long a batch's first request waits for more.
    """

    def __init__(
        self,
        engine,
        max_batch_size: int = 8,
        max_queue: int = 64,
        policy: str = "continuous",
        metrics=None,
        wait_ms: float = 10.0,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.engine, self.max_batch_size, self.max_queue = engine, max_batch_size, max_queue
        self.policy, self.metrics, self.wait_s = policy, metrics, wait_ms / 1000.0
        self.waiting_q: collections.deque[Request] = collections.deque()
        self.cond = threading.Condition()
        self.live: dict[int, Request] = {}
        self.steps = 0  # for /health
        self.draining = False
        self.stopped = False
        self.thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    # --- the event loop's side ------------------------------------------------------------------
    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.thread = threading.Thread(target=self._run, name="generate", daemon=True)
        self.thread.start()

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    async def stop(self) -> None:
        """Cancel everything in flight; wait (off the event loop) for the step in progress."""
        with self.cond:
            self.stopped = True
            for r in list(self.live.values()) + list(self.waiting_q):
                r.cancel()
            self.cond.notify_all()
        if self.thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.thread.join)

    def drain(self, first: bool = True) -> None:
        """Shutting down: refuse new requests and answer every waiting one ``("unavailable",
        message)`` at once; the running rows go on (the server's grace period bounds them),
        unless this is not the ``first`` call (a second signal): then they stop at the next step."""
        with self.cond:
            self.draining = True
            if not first:
                for r in self.live.values():
                    r.cancel()
            waiting = list(self.waiting_q)
            self.waiting_q.clear()
            self.cond.notify_all()
        for r in waiting:
            r.cancel()
            r.events.put_nowait(("unavailable", SHUTTING_DOWN))
        self._gauges()

    def waiting(self) -> int:
        """Requests accepted and not yet running."""
        return len(self.waiting_q)

    def running(self) -> int:
        return len(self.live)

    def room(self) -> int:
        """How many more requests may wait."""
        return 0 if self.draining else max(self.max_queue - self.waiting(), 0)

    def submit(self, request: Request) -> None:
        with self.cond:
            if self.room() < 1:
                raise QueueFull
            self.waiting_q.append(request)
            self.cond.notify_all()
        self._gauges()

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue.set(self.waiting())
            self.metrics.running.set(self.running())

    # --- the generation thread ------------------------------------------------------------------
    def _run(self) -> None:
        free = list(range(self.max_batch_size))
        ended: list[int] = []
        held: set[int] = set()  # static: rows whose request ended, running on with the batch
        deferred: list[Request] = []  # static: their answers, delivered when the batch ends
        reset = False
        while True:
            with self.cond:
                while not (self.live or self.waiting_q or self.stopped):
                    self.cond.wait()
                if self.stopped:
                    return
                if self.policy == "static" and not self.live and not ended:
                    # the older batcher's gathering: the first request waits for company
                    until = self.waiting_q[0].submitted + self.wait_s
                    while (
                        not self.stopped
                        and 0 < len(self.waiting_q) < self.max_batch_size
                        and time.monotonic() < until
                    ):
                        self.cond.wait(until - time.monotonic())
                    if self.stopped:
                        return
                    if not self.waiting_q:
                        continue
                release, done = list(ended), []
                for slot, r in list(self.live.items()):
                    if slot in release or slot in held or not r.cancelled.is_set():
                        continue
                    if self.policy == "static":  # its row runs on with the batch
                        held.add(slot)
                        deferred.append(r)
                    else:
                        release.append(slot)
                        done.append(r)  # its answer so far (a stop string waits for it)
                if held and held == set(self.live):  # static: the whole batch has ended
                    release += sorted(held)
                    done += deferred
                    held, deferred = set(), []
                for slot in release:
                    del self.live[slot]
                    free.append(slot)
                free.sort()
                # the live rows move down into free slots: a step computes rows 0..max live
                moves = []
                while self.live and free and free[0] < max(self.live) and not held:
                    src, dst = max(self.live), free.pop(0)
                    self.live[dst] = self.live.pop(src)
                    moves.append((src, dst))
                    free.append(src)
                    free.sort()
                admitted: list[Admission] = []
                if self.policy == "continuous":
                    while free and self.waiting_q:
                        r = self.waiting_q.popleft()
                        if r.cancelled.is_set():
                            continue
                        slot = free.pop(0)
                        self.live[slot] = r
                        admitted.append(Admission(slot, r.prompt, r.sampling, r.logprobs))
                elif not (self.live or release):  # static: a batch in a step of its own
                    for r in self._static_batch():
                        slot = free.pop(0)
                        self.live[slot] = r
                        admitted.append(Admission(slot, r.prompt, r.sampling, r.logprobs))
            ended = []
            events: list[tuple[Request, tuple]] = [(r, self._done(r)) for r in done]
            try:
                plan = Plan(release=release, moves=moves, admit=admitted, reset=reset)
                busy = self.live or release or reset
                emitted = self.engine.step(plan) if busy else []
                reset = False
            except Exception as exc:  # a failed step fails its requests, not the server
                message = f"{type(exc).__name__}: {exc}"
                with self.cond:
                    failed = list(self.live.items())
                    self.live.clear()
                for slot, r in failed:
                    free.append(slot)
                    ended_before = r in deferred  # static: its answer was complete already
                    events.append((r, self._done(r) if ended_before else ("error", message)))
                held, deferred = set(), []
                reset = True
                self._hand_over(events)
                continue
            self.steps += 1
            now = time.monotonic()
            for e in emitted:
                r = self.live.get(e.slot)
                if r is None or e.slot in held:
                    continue
                if r.first_token is None:
                    r.first_token = now
                    if self.metrics is not None:
                        self.metrics.first_token(now - r.submitted, len(r.prompt))
                if e.token != self.engine.eos:  # EOS ends a row; it is not part of the answer
                    r.ids.append(e.token)
                    if e.logprob is not None:
                        r.logprob_list.append((e.token, *e.logprob))
                    if r.tokens:
                        events.append((r, ("token", e.token, e.logprob)))
                if e.finished and self.policy == "static":
                    held.add(e.slot)
                    deferred.append(r)
                elif e.finished:
                    ended.append(e.slot)
                    events.append((r, self._done(r)))
            self._hand_over(events)
            self._gauges()

    def _static_batch(self) -> list[Request]:
        """The older batcher's batch: the first waiting request and up to ``max_batch_size - 1``
        more with identical sampling settings but the budget (looking 4 batches deep), whose
        rows all fit the positions until the longest ends (an ended row runs on)."""
        first = None
        batch: list[Request] = []
        longest = budget = 0
        for r in list(self.waiting_q)[: 4 * self.max_batch_size]:
            if r.cancelled.is_set():
                self.waiting_q.remove(r)
                continue
            key = dataclasses.replace(r.sampling, max_new_tokens=1)
            first = first or key
            span = max(longest, len(r.prompt)) + max(budget, r.sampling.max_new_tokens)
            if batch and span > self.engine.max_positions:
                continue
            if key == first and len(batch) < self.max_batch_size:
                batch.append(r)
                self.waiting_q.remove(r)
                longest = max(longest, len(r.prompt))
                budget = max(budget, r.sampling.max_new_tokens)
        return batch

    def _done(self, r: Request) -> tuple:
        if self.metrics is not None:
            self.metrics.finished(r, time.monotonic())
        return ("done", list(r.ids), list(r.logprob_list))

    def _hand_over(self, events: list[tuple[Request, tuple]]) -> None:
        """One call into the event loop per step for all of its events."""
        if events and self.loop is not None and not self.loop.is_closed():

            def deliver():
                for r, ev in events:
                    r.events.put_nowait(ev)

            try:
                self.loop.call_soon_threadsafe(deliver)
            except RuntimeError:  # the loop closed meanwhile: nobody is listening
                pass
