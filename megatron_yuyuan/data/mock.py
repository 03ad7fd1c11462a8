"""Deterministic synthetic token sequences for smoke tests and throughput runs.

Sample ``i`` is an arithmetic progression of token ids, ``(start + stride * k) mod V``, with start and
stride drawn from a generator seeded by ``(seed, i)``: every rank can build any sample by index (so
TP ranks agree and DP ranks split a global batch without communication), and the sequences are
learnable, so a working trainer shows a falling loss.
"""

from __future__ import annotations

from typing import Iterator

import torch


def mock_sample(index: int, seq_length: int, vocab_size: int, seed: int) -> torch.Tensor:
    """Token ids ``[seq_length + 1]`` of sample ``index`` (inputs plus the final label)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    start = int(torch.randint(vocab_size, (1,), generator=gen))
    stride = int(torch.randint(1, 3, (1,), generator=gen))
    return (start + stride * torch.arange(seq_length + 1)) % vocab_size


def mock_batches(*, start_iteration: int, global_batch_size: int, micro_batch_size: int,
                 dp_size: int, dp_rank: int, seq_length: int, vocab_size: int,
                 seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Micro-batches for this DP rank, iteration after iteration.

    Iteration ``it`` covers global samples ``[it * G, (it + 1) * G)``; DP rank ``r`` takes the
    contiguous ``G / dp`` of them starting at ``r * G / dp``, in micro-batches of ``micro_batch_size``.
    """
    per_rank = global_batch_size // dp_size
    iteration = start_iteration
    while True:
        first = iteration * global_batch_size + dp_rank * per_rank
        for m in range(0, per_rank, micro_batch_size):
            ids = torch.stack([mock_sample(first + m + j, seq_length, vocab_size, seed)
                               for j in range(micro_batch_size)])  # [b, s + 1]
            yield {
                "tokens": ids[:, :-1].contiguous(),                                   # [b, s]
                "labels": ids[:, 1:].contiguous(),                                    # [b, s]
                "loss_mask": torch.ones(micro_batch_size, seq_length),                # [b, s]
                "position_ids": torch.arange(seq_length).expand(micro_batch_size, -1),  # [b, s]
            }
        iteration += 1
