"""Stopping a run on a shared cluster without losing work: a preemption or Slurm's warning before
the time limit (SIGTERM or SIGUSR1), or a time budget (``--exit-duration-in-mins``), ends the run
after the current step with a checkpoint, and exit status 0 so a requeued job resumes by itself.

A signal reaches each process at its own moment (torchrun and Slurm also forward it), so every
rank reports what it has seen at each step end and all stop after the same step. Copies of the
signal that arrive within a second of the first are one request; a signal during the save that
follows means "now": it interrupts the save, whose unfinished folder is removed, and the earlier
checkpoint stays the one resumed.
"""

from __future__ import annotations

import enum
import os
import signal
import threading
import time
from pathlib import Path

from megatron_yuyuan import parallel

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STOP_FILE_ENV = "MEGATRON_YUYUAN_STOP_FILE"
"""A launcher (the Slurm script) names a file here: the run creates it when it stopped early with a
checkpoint, so the launcher requeues only then (not when the signal came with the last step)."""
_SAME_REQUEST_S = 1.0  # copies of one signal (torchrun and srun forward it) arrive within this


class Stop(enum.IntEnum):
    """Why a run stops early; the largest reason any rank saw wins."""

    NO = 0
    DURATION = 1
    SIGUSR1 = 2
    SIGTERM = 3

    def describe(self, minutes: float | None) -> str:
        if self is Stop.DURATION:
            return f"--exit-duration-in-mins {minutes:g} reached"
        return f"{self.name} received"


def mark_stopped(save: str | None) -> None:
    """Tell the launcher that the run stopped before its end (rank 0; see ``STOP_FILE_ENV``)."""
    path = os.environ.get(STOP_FILE_ENV)
    if path and save:
        Path(path).write_text(f"{save}\n")


def default_enabled() -> bool:
    """Whether to catch the signals when ``--exit-signal-handler`` is not given: under torchrun
    (which forwards a job's SIGTERM to its workers) and under Slurm."""
    return any(v in os.environ for v in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"))


class ExitRequests:
    """Catches SIGTERM / SIGUSR1 while the run trains (:meth:`install` .. :meth:`restore`, or a
    ``with`` block) and tells, at each step end, whether every rank should stop (:meth:`agreed`)."""

    def __init__(self, catch_signals: bool, duration_mins: float | None) -> None:
        self.catch_signals = catch_signals
        self.duration_mins = duration_mins
        self.started = time.monotonic()
        self.received = Stop.NO
        self.first_at: float | None = None
        self.saving = False
        self._previous: dict = {}

    def install(self) -> None:
        """Catch the signals (from the main thread; elsewhere Python cannot). Without the handler,
        signals the launcher ignored for torchrun's sake get their default action back."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNALS:
            if self.catch_signals:
                self._previous[sig] = signal.signal(sig, self._handle)
            elif signal.getsignal(sig) is signal.SIG_IGN:
                self._previous[sig] = signal.signal(sig, signal.SIG_DFL)

    def restore(self) -> None:
        """Give the signals back to the handlers they had; a caught SIGUSR1 (a warning before a
        time limit) is ignored from now on: the run's training is over, its ending must not be
        cut by the signal's default action."""
        for sig, handler in self._previous.items():
            keep_ignoring = self.catch_signals and sig == signal.SIGUSR1
            signal.signal(sig, signal.SIG_IGN if keep_ignoring else handler)
        self._previous.clear()

    def __enter__(self) -> ExitRequests:
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def _handle(self, signum: int, _frame) -> None:
        now = time.monotonic()
        if self.saving and self.first_at is not None and now - self.first_at > _SAME_REQUEST_S:
            raise KeyboardInterrupt  # a second request during the save: stop now
        if self.first_at is None:
            self.first_at = now
        self.received = max(self.received, Stop[signal.Signals(signum).name])

    @property
    def active(self) -> bool:
        """Whether :meth:`agreed` has anything to check (else it costs nothing)."""
        return self.catch_signals or self.duration_mins is not None

    def agreed(self) -> Stop:
        """Why the run stops after this step (``Stop.NO``: it goes on). Every rank calls it at
        the same step: one tiny all-reduce, so all stop together."""
        if not self.active:
            return Stop.NO
        mine = self.received
        if (
            self.duration_mins is not None
            and time.monotonic() - self.started >= 60 * self.duration_mins
        ):
            mine = max(mine, Stop.DURATION)
        return Stop(parallel.max_over_ranks(int(mine)))
