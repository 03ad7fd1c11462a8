"""Deterministic synthetic token sequences for smoke tests and throughput runs.

Sample ``i`` is an arithmetic progression of token ids, ``(start + stride * k) mod V``, with start
and stride drawn from a generator seeded by ``(seed, i)``: every rank can build any sample by index
(so TP ranks agree and DP ranks split a global batch without communication), and the sequences are
learnable, so a working trainer shows a falling loss.
"""

from __future__ import annotations

import torch


def mock_sample(index: int, seq_length: int, vocab_size: int, seed: int) -> torch.Tensor:
    """Token ids ``[seq_length + 1]`` of sample ``index`` (inputs plus the final label)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    start = int(torch.randint(vocab_size, (1,), generator=gen))
    stride = int(torch.randint(1, 3, (1,), generator=gen))
    return (start + stride * torch.arange(seq_length + 1)) % vocab_size


def mock_batch(
    indices: list[int], seq_length: int, vocab_size: int, seed: int
) -> dict[str, torch.Tensor]:
    """The micro-batch made of samples ``indices``: every token trained, plain causal attention."""
    ids = torch.stack([mock_sample(i, seq_length, vocab_size, seed) for i in indices])  # [b, s + 1]
    return {
        "tokens": ids[:, :-1].contiguous(),  # [b, s]
        "labels": ids[:, 1:].contiguous(),  # [b, s]
        "loss_mask": torch.ones(len(indices), seq_length),  # [b, s]
        "position_ids": torch.arange(seq_length).repeat(len(indices), 1),  # [b, s], own memory
    }
