"""Runs one batch of requests through the shared generator on every rank of a TP/PP group.

Rank 0 serves HTTP. For each batch it broadcasts ``(prompts, sampling, budgets)`` to the other
ranks (``torch.distributed.broadcast_object_list``), and all ranks run the same
``generate_ids`` call: megatron-core's tensor/pipeline collectives need every rank in every step.
Rank 0's per-step stop decisions (a client left, a stop string matched) are broadcast inside
``generate_ids`` (``sync_stops``), so every rank stops the same rows. A ``stop`` message ends the
followers' loop when rank 0 shuts down.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch.distributed as dist

from megatron_yuyuan.sampling import SamplingConfig


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@dataclass
class Job:
    """One request's share of a batch."""

    prompt: list[int]
    """Prompt token ids."""
    sampling: SamplingConfig
    """Its sampling settings; ``max_new_tokens`` is its own budget."""
    on_token: Callable[[int], bool] = field(default=lambda token: True)
    """Called (in the engine thread) with each new token before EOS; False stops the row."""


class Engine:
    """Rank 0's side: runs batches; tells the followers to run them too."""

    def __init__(self, generator) -> None:
        self.generator = generator
        self.eos = generator.tokenizer.eod
        self.max_positions = generator.max_positions
        self.distributed = world_size() > 1

    def run(self, jobs: list[Job]) -> list[list[int]]:
        """New token ids per job (up to EOS). Jobs of one batch share sampling settings except
        ``max_new_tokens``."""
        prompts = [j.prompt for j in jobs]
        cfg = jobs[0].sampling
        budgets = [j.sampling.max_new_tokens for j in jobs]
        if self.distributed:
            dist.broadcast_object_list([("generate", prompts, cfg, budgets)], src=0)

        def hook(tokens: list[int], active: list[bool]) -> list[int]:
            return [
                i
                for i, (t, a) in enumerate(zip(tokens, active))
                if a and t != self.eos and not jobs[i].on_token(t)
            ]

        return self.generator.generate_ids(
            prompts, cfg, budgets=budgets, on_step=hook, sync_stops=self.distributed
        )

    def shutdown(self) -> None:
        if self.distributed:
            dist.broadcast_object_list([("stop",)], src=0)


def follow(generator) -> None:
    """The other ranks' loop: run every batch rank 0 announces, until it says stop."""
    while True:
        message: list[tuple | None] = [None]
        dist.broadcast_object_list(message, src=0)
        if message[0][0] == "stop":
            return
        _, prompts, cfg, budgets = message[0]
        try:
            generator.generate_ids(prompts, cfg, budgets=budgets, sync_stops=True)
        except Exception as exc:  # rank 0 fails the same batch and answers its clients
            print(f"rank {dist.get_rank()}: batch failed: {exc}", flush=True)
