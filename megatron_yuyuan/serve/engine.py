"""Runs each scheduler step on every rank of a TP/PP group.

Rank 0 serves HTTP and decides every step's :class:`~megatron_yuyuan.slots.Plan` (who leaves, who
joins); it broadcasts the plan to the other ranks (``torch.distributed.broadcast_object_list``) and
all ranks run the same step on their own :class:`~megatron_yuyuan.slots.SlotBatch`:
megatron-core's tensor/pipeline collectives need every rank in every step, and the last stage's
tokens reach every rank inside the step. A plan with ``stop`` ends the followers' loop when rank 0
shuts down.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_yuyuan.slots import Emitted, Plan


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class Engine:
    """Rank 0's side: runs each plan here and tells the followers to run it too.

    Args:
        generator: a :class:`~megatron_yuyuan.generation.MegatronGenerator` or
            :class:`~megatron_yuyuan.generation.HFGenerator`.
        slots: rows decoded together.
    """

    def __init__(self, generator, slots: int) -> None:
        self.core = generator.slot_batch(slots)
        self.eos = generator.tokenizer.eod
        self.max_positions = generator.max_positions
        self.distributed = world_size() > 1

    @torch.inference_mode()
    def step(self, plan: Plan) -> list[Emitted]:
        if self.distributed:
            dist.broadcast_object_list([plan], src=0)
        return self.core.step(plan)

    def shutdown(self) -> None:
        if self.distributed:
            dist.broadcast_object_list([Plan(stop=True)], src=0)


@torch.inference_mode()
def follow(generator, slots: int) -> None:
    """The other ranks' loop: run every plan rank 0 announces, until it says stop."""
    core = generator.slot_batch(slots)
    while True:
        message: list[Plan | None] = [None]
        dist.broadcast_object_list(message, src=0)
        plan = message[0]
        if plan.stop:
            return
        try:
            core.step(plan)
        except Exception as exc:  # rank 0 fails the same step, answers its clients, resets
            print(f"rank {dist.get_rank()}: step failed: {exc}", flush=True)
