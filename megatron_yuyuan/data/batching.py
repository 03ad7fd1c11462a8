"""Which global samples each data-parallel rank reads, step after step."""

from __future__ import annotations

from collections.abc import Iterator


def micro_batch_indices(
    *,
    consumed_samples: int,
    global_batch_size: int,
    micro_batch_size: int,
    dp_size: int,
    dp_rank: int,
) -> Iterator[list[int]]:
    """Global sample indices of this DP rank's micro-batches, step after step.

    The step that starts after ``consumed_samples`` samples covers ``[c, c + G)``; DP rank ``r``
    takes the contiguous ``G / dp`` of them starting at ``c + r * G / dp``. Counting samples (not
    iterations) keeps the data position exact when a resumed run changes the global batch size.
    """
    per_rank = global_batch_size // dp_size
    start = consumed_samples
    while True:
        first = start + dp_rank * per_rank
        for m in range(0, per_rank, micro_batch_size):
            yield list(range(first + m, first + m + micro_batch_size))
        start += global_batch_size
