"""The HTTP server around the app: uvicorn, hardened for a port that strangers can reach.

* **Request-head deadline**: a connection must send a complete request head within
  ``head_timeout_s`` of connecting (or of its previous response). uvicorn closes idle keep-alive
  connections only after a response, so a client that connects and says nothing, or drips a header
  byte a second (slowloris), would hold a descriptor forever; a thousand of them exhaust the
  process's open-files limit and nobody else is answered.
* **Descriptors**: the soft open-files limit is raised to the hard one at start (often 1,024 of
  1,048,576), and ``max_connections`` bounds the connections uvicorn serves (more get 503; 0:
  what the descriptors allow, at most 8,192).
* **A quiet log under attack**: asyncio logs every failed ``accept()`` (e.g. "Too many open
  files"); the same message is let through once per ``LOG_EVERY_S`` with a count of those held back.
* **Shutdown**: the first SIGTERM / Ctrl-C stops accepting, answers every queued request 503 at
  once, and lets the running batch finish within ``grace_s`` (then cancels it); a second signal
  stops waiting at once.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Callable

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

LOG_EVERY_S = 10.0


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def guarded_h11(head_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the request-head deadline (see the module docstring)."""

    class GuardedH11(H11Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_deadline()

        def _arm_head_deadline(self) -> None:
            armed = self.cycle  # a new request head replaces it; none came if it is still this

            def expire() -> None:
                if self.cycle is armed and not self.transport.is_closing():
                    self.transport.close()

            self.loop.call_later(head_timeout_s, expire)

    return GuardedH11


class _RepeatFilter(logging.Filter):
    """Lets one record of a given message through per ``every_s``, with a count of the rest."""

    def __init__(self, every_s: float = LOG_EVERY_S) -> None:
        super().__init__()
        self.every_s = every_s
        self.last: dict[str, tuple[float, int]] = {}  # message -> (time let through, held back)

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)
        now = time.monotonic()
        seen, held = self.last.get(key, (float("-inf"), 0))
        if now - seen < self.every_s:
            self.last[key] = (seen, held + 1)
            return False
        if held:
            record.msg = f"{record.msg} ({held} more like it in the last {now - seen:.0f} s)"
        self.last[key] = (now, 0)
        return True


class _Server(uvicorn.Server):
    """uvicorn's server; ``on_signal(first)`` runs on the event loop at each SIGINT/SIGTERM, and a
    second SIGTERM, like a second Ctrl-C, stops the graceful wait."""

    def __init__(self, config: uvicorn.Config, on_signal: Callable[[bool], None]) -> None:
        super().__init__(config)
        self.on_signal = on_signal

    def handle_exit(self, sig, frame) -> None:
        first = not self.should_exit
        super().handle_exit(sig, frame)
        if not first:
            self.force_exit = True
        try:
            asyncio.get_running_loop().call_soon(self.on_signal, first)
        except RuntimeError:  # before the loop runs: nothing is queued or running
            pass


def run_server(
    app,
    host: str,
    port: int,
    log_level: str,
    max_connections: int,
    keep_alive_s: float,
    head_timeout_s: float,
    grace_s: float,
    on_signal: Callable[[bool], None],
) -> None:
    """Serve ``app`` until SIGINT/SIGTERM (see the module docstring)."""
    files = raise_open_files_limit()
    if not max_connections:  # as many as the descriptors allow, keeping some for the process
        max_connections = max(64, min(8192, files - 128))
    asyncio_log = logging.getLogger("asyncio")
    log_filter = _RepeatFilter()
    asyncio_log.addFilter(log_filter)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=guarded_h11(head_timeout_s),
        limit_concurrency=max_connections,  # beyond it: 503, not exhausted descriptors
        timeout_keep_alive=keep_alive_s,
        timeout_graceful_shutdown=grace_s,
    )
    try:
        _Server(config, on_signal).run()
    finally:
        asyncio_log.removeFilter(log_filter)
