"""Decoding rows that requests join and leave between steps: a KV cache of fixed rows ("slots") on
one shared timeline of columns.

Every row writes its next token's key and value at the same column, the cursor (what megatron-core's
``StaticInferenceContext`` and one batched forward need), but attends only to its own columns
``[start, cursor]``::

    slot 0:  . . [ prompt A  ] a1 a2 a3 a4 a5 |
    slot 1:  . . . . . . [ prompt B ] b1 b2   |   joined later: prompt right-aligned at the cursor
    slot 2:  (free)                           ^ cursor

A newcomer's prompt is written right-aligned at the cursor, as left padding would place it, so it
decodes with everyone else from the next step on; a row that ends frees its slot at once. When the
cursor reaches the last column the live columns move left (each row uses at most the model's
positions); a prompt longer than the cursor moves them right. Positions are per row, so a row's
numbers do not depend on where its columns are.

Each step is one forward of the live rows (``[W, 1]``), then the per-row choice of
:mod:`megatron_yuyuan.decoding`, all on the device; the host reads one packed tensor per step
(tokens, finished flags, log-probabilities). Under TP/PP every rank runs the same :class:`Plan`
(rank 0 decides it) and the last stage's tokens are broadcast, so all ranks hold the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from megatron_yuyuan.decoding import RowSettings, choose, top_logprobs
from megatron_yuyuan.sampling import SamplingConfig

EAGER_MOVE = 32
"""Move the timeline left once this many leading columns are unused: attention reads every column
up to the cursor at every step, a move copies the live ones once."""


@dataclass
class Admission:
    """A request joining the batch."""

    slot: int
    """The free row it takes."""
    prompt: list[int]
    """Its prompt token ids."""
    sampling: SamplingConfig
    """Its settings; ``max_new_tokens`` is its budget."""
    logprobs: int | None = None
    """Report each token's log-probability and this many top alternatives (None: none)."""
    history: list[int] | None = None
    """What the penalties count as the row's past (default: the prompt; batch generation passes
    the left-padded row, as ``transformers.generate`` sees it)."""


@dataclass
class Plan:
    """What one step does, in this order: forget ``release``, move rows (``src -> dst``, so the
    live rows stay in the lowest slots and a step computes no free rows), decode the live rows,
    prefill ``admit``. Rank 0 decides it; the other ranks of a TP/PP group run the same plan."""

    release: list[int] = field(default_factory=list)
    moves: list[tuple[int, int]] = field(default_factory=list)
    admit: list[Admission] = field(default_factory=list)
    reset: bool = False
    """Drop every row first (after a failed step)."""
    stop: bool = False
    """The server is shutting down: the followers leave their loop."""


@dataclass
class Emitted:
    """One row's new token."""

    slot: int
    token: int
    finished: bool
    """The row ended: the token is EOS (not part of the answer), or the budget is spent."""
    logprob: tuple[float, list[tuple[int, float]]] | None = None
    """The token's log-probability and the top alternatives (when asked for)."""


@dataclass
class _Row:
    start: int
    """Its first column."""
    length: int
    """Tokens in its history."""
    logprobs: int | None


class SlotBatch:
    """The rows and their timeline (see the module docstring).

    Args:
        stepper: the model's forward over cached columns (:class:`MegatronStepper`,
            :class:`HFStepper`).
        slots: rows at most.
        max_positions: the model's positions (a row's prompt plus budget fits them).
        eos: the end-of-text id.
        capacity: columns (default: the positions plus room to join before a move).
    """

    def __init__(
        self, stepper, slots: int, max_positions: int, eos: int, capacity: int | None = None
    ) -> None:
        self.stepper = stepper
        self.slots, self.max_positions, self.eos = slots, max_positions, eos
        self.capacity = capacity or max_positions + max(64, max_positions // 4)
        stepper.allocate(slots, self.capacity)
        device = self.device = stepper.device
        self.cursor = 0
        self.rows: dict[int, _Row] = {}
        self.moves = 0  # timeline moves (a test and a benchmark read it)
        zeros = lambda dtype=torch.long: torch.zeros(slots, dtype=dtype, device=device)  # noqa: E731
        self.last, self.pos, self.start = zeros(), zeros(), zeros()  # [S] each
        self.count, self.budget, self.live = zeros(), zeros(), zeros(torch.bool)
        self.history = torch.zeros(slots, max_positions + 1, dtype=torch.long, device=device)
        self.lengths = zeros()  # [S]: tokens of history per row
        self.settings = RowSettings(slots, device)

    # --- the plan -------------------------------------------------------------------------------
    def step(self, plan: Plan) -> list[Emitted]:
        if plan.reset:
            self.reset()
        self.release(plan.release)
        self.move_rows(plan.moves)
        out = self.decode() if self.rows else []
        if plan.admit:
            out += self.admit(plan.admit)
        return out

    def reset(self) -> None:
        self.release(list(self.rows))
        self.cursor = 0

    def release(self, slots: Sequence[int]) -> None:
        slots = [s for s in slots if s in self.rows]
        if not slots:
            return
        for s in slots:
            del self.rows[s]
        self.live[torch.as_tensor(slots, device=self.device)] = False
        self.settings.clear(slots)

    def move_rows(self, moves: Sequence[tuple[int, int]]) -> None:
        """Row ``src`` becomes row ``dst`` (a free one): its cached columns, state and settings."""
        if not moves:
            return
        src = [a for a, _ in moves]
        dst = [b for _, b in moves]
        lo = min(self.rows[a].start for a in src)
        self.stepper.move_rows(src, dst, lo, self.cursor)
        d = self.device
        i, j = torch.as_tensor(src, device=d), torch.as_tensor(dst, device=d)
        for name in ("last", "pos", "start", "count", "budget", "live", "history", "lengths"):
            t = getattr(self, name)
            t[j] = t[i]
        self.live[i] = False
        self.settings.move(src, dst)
        for a, b in moves:
            self.rows[b] = self.rows.pop(a)

    # --- decoding -------------------------------------------------------------------------------
    def decode(self) -> list[Emitted]:
        """One token for every live row."""
        # at the last column, or once leading columns nobody reads any more (they cost attention
        # every step) are many enough: move left
        first = min(r.start for r in self.rows.values())
        if self.cursor + 1 > self.capacity or first >= EAGER_MOVE:
            self._move(-first)
        slots = sorted(self.rows)
        width = slots[-1] + 1
        cols = torch.arange(self.cursor + 1, device=self.device)
        key_mask = (cols >= self.start[:width, None]) & self.live[:width, None]  # [W, k]
        key_mask |= cols == self.cursor  # a free row sees its own column: no empty softmax
        logits = self.stepper.forward(
            self.last[:width, None], self.pos[:width, None], key_mask, self.cursor, 0
        )  # [W, V] on the last pipeline stage
        self.cursor += 1
        return self._advance(slots, 0, width, logits)

    def admit(self, admissions: Sequence[Admission]) -> list[Emitted]:
        """Prefill newcomers (in runs of adjacent slots) right-aligned at the cursor, and choose
        their first tokens."""
        need = max(len(a.prompt) for a in admissions)
        if not self.rows:
            self.cursor = max(need, max(len(a.history or ()) for a in admissions))
        elif self.cursor < need:
            self._move(need - self.cursor)
        out: list[Emitted] = []
        for run in _adjacent_runs(sorted(admissions, key=lambda a: a.slot)):
            out += self._prefill(run)
        return out

    def _prefill(self, run: list[Admission]) -> list[Emitted]:
        first, n = run[0].slot, len(run)
        longest = max(len(a.prompt) for a in run)
        tokens, valid = left_pad([a.prompt for a in run], longest, self.eos)
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        key_mask = torch.zeros((n, self.cursor), dtype=torch.bool)
        key_mask[:, self.cursor - longest :] = valid
        d = self.device
        logits = self.stepper.forward(
            tokens.to(d), positions.to(d), key_mask.to(d), self.cursor - longest, first
        )
        rows = slice(first, first + n)
        histories = [a.history if a.history is not None else a.prompt for a in run]
        span = max(map(len, histories))
        hist = torch.zeros((n, span), dtype=torch.long)
        for i, h in enumerate(histories):
            hist[i, : len(h)] = torch.as_tensor(h)
        self.history[rows, :span] = hist.to(d)
        self.lengths[rows] = torch.tensor([len(h) for h in histories], device=d)
        self.start[rows] = torch.tensor([self.cursor - len(a.prompt) for a in run], device=d)
        self.pos[rows] = torch.tensor([len(a.prompt) - 1 for a in run], device=d)
        self.count[rows] = 0
        self.budget[rows] = torch.tensor([a.sampling.max_new_tokens for a in run], device=d)
        self.live[rows] = True
        self.settings.set([a.slot for a in run], [a.sampling for a in run])
        for a, h in zip(run, histories):
            self.rows[a.slot] = _Row(self.cursor - len(a.prompt), len(h), a.logprobs)
        return self._advance([a.slot for a in run], first, n, logits)

    def _advance(self, slots: list[int], first: int, width: int, logits) -> list[Emitted]:
        """Choose the next token of ``slots`` from ``logits`` (rows ``first .. first+width``),
        append it, and report it (the one host read of the step)."""
        d = self.device
        rows = slice(first, first + width)
        asks = [self.rows[s].logprobs for s in slots if self.rows[s].logprobs is not None]
        k = max(asks, default=-1)
        cols = 1 + (2 * k + 1 if k >= 0 else 0)
        if logits is not None:
            host_lengths = {s: self.rows[s].length for s in slots}
            nxt = choose(
                logits,
                slots,
                self.settings,
                self.history[rows],
                self.lengths[rows],
                host_lengths,
                first,
            )  # [width]
            packed = nxt.double()[:, None]
            if k >= 0:
                packed = torch.cat([packed, top_logprobs(logits, nxt, k)], dim=1)
        else:  # an earlier pipeline stage: the last one sends it
            packed = torch.zeros((width, cols), dtype=torch.float64, device=d)
        packed = self.stepper.share(packed)
        nxt = packed[:, 0].long()  # [width]
        idx = torch.as_tensor(slots, device=d)
        at = idx - first
        mine = nxt[at]
        self.history[idx, self.lengths[idx].clamp(max=self.max_positions)] = mine
        self.lengths[idx] += 1
        self.pos[idx] += 1
        self.last[idx] = mine
        self.count[idx] += 1
        done = (mine == self.eos) | (self.count[idx] >= self.budget[idx])
        report = torch.cat([packed[at], done.double()[:, None]], dim=1).tolist()  # one sync
        out = []
        for s, values in zip(slots, report):
            row = self.rows[s]
            row.length += 1
            lp = None
            if row.logprobs is not None:
                top = [(int(values[2 + i]), values[2 + k + i]) for i in range(row.logprobs)]
                lp = (values[1], top)
            out.append(Emitted(s, int(values[0]), bool(values[-1]), lp))
        return out

    def _move(self, delta: int) -> None:
        """Move every live row's columns by ``delta`` (left when negative)."""
        if delta == 0:
            return
        lo = min(r.start for r in self.rows.values())
        width = max(self.rows) + 1
        self.stepper.move(lo, self.cursor, delta, width)
        self.moves += 1
        for r in self.rows.values():
            r.start += delta
        self.start[:width] += delta
        self.cursor += delta


def left_pad(
    prompts: Sequence[Sequence[int]], total: int, pad: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``[b, total]``, each prompt right-aligned at ``max len``, and the validity mask."""
    longest = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), total), pad, dtype=torch.long)
    valid = torch.zeros((len(prompts), total), dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p) : longest] = torch.as_tensor(p)
        valid[i, longest - len(p) : longest] = True
    return tokens, valid


def _adjacent_runs(admissions: list[Admission]) -> list[list[Admission]]:
    runs: list[list[Admission]] = []
    for a in admissions:
        if runs and runs[-1][-1].slot + 1 == a.slot:
            runs[-1].append(a)
        else:
            runs.append([a])
    return runs


def generate_batch(
    stepper,
    prompts: Sequence[Sequence[int]],
    configs: Sequence[SamplingConfig],
    max_positions: int,
    eos: int,
) -> list[list[int]]:
    """Answer ``prompts`` together (left-padded, as ``transformers.generate`` batches them): new
    ids per prompt up to EOS. ``configs[i].max_new_tokens`` is row i's budget."""
    longest = max(map(len, prompts))
    budget = max(c.max_new_tokens for c in configs)
    core = SlotBatch(stepper, len(prompts), max_positions, eos, capacity=longest + budget)
    admissions = [
        Admission(i, list(p), c, history=[eos] * (longest - len(p)) + list(p))
        for i, (p, c) in enumerate(zip(prompts, configs))
    ]
    answers: list[list[int]] = [[] for _ in prompts]
    emitted = core.admit(admissions)
    while True:
        ended = []
        for e in emitted:
            if e.token != eos:
                answers[e.slot].append(e.token)
            if e.finished:
                ended.append(e.slot)
        core.release(ended)
        if not core.rows:
            return answers
        emitted = core.decode()
