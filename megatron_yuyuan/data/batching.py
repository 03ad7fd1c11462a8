"""Which global samples each data-parallel rank reads, iteration after iteration."""

from __future__ import annotations

from typing import Iterator


def micro_batch_indices(
    *,
    start_iteration: int,
    global_batch_size: int,
    micro_batch_size: int,
    dp_size: int,
    dp_rank: int,
) -> Iterator[list[int]]:
    """Global sample indices of this DP rank's micro-batches, iteration after iteration.

    Iteration ``it`` covers samples ``[it * G, (it + 1) * G)``; DP rank ``r`` takes the contiguous
    ``G / dp`` of them starting at ``r * G / dp``.
    """
    per_rank = global_batch_size // dp_size
    iteration = start_iteration
    while True:
        first = iteration * global_batch_size + dp_rank * per_rank
        for m in range(0, per_rank, micro_batch_size):
            yield list(range(first + m, first + m + micro_batch_size))
        iteration += 1
