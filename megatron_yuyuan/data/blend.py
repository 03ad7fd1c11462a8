"""Training on several datasets at once: ``--data-prefix 0.7 P1 0.3 P2`` (Megatron-LM's syntax).

Global sample ``i`` of the blend is sample ``j`` of source ``k``, where ``(k, j)`` comes from
megatron-core's blending schedule (:func:`~megatron_yuyuan.data.indexed.blending_schedule`) and
each source is the usual seeded stream (:class:`~megatron_yuyuan.data.sft_dataset.QADataset`).
Both are pure functions of the weights, the seed and ``i``: a killed run resumed from its
checkpoint, at any TP/PP/DP, reads the identical sample sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from megatron_yuyuan.data.indexed import blending_schedule
from megatron_yuyuan.data.sft_dataset import QADataset, collate


class BlendedQA:
    """Samples drawn from several :class:`QADataset` by weight (the same interface)."""

    def __init__(self, datasets: Sequence[QADataset], weights: Sequence[float]) -> None:
        self.datasets = list(datasets)
        self.weights = list(weights)
        self.packing = datasets[0].packing
        self.seq_length = datasets[0].seq_length
        self._source = np.zeros(0, np.int16)
        self._sample = np.zeros(0, np.int64)

    def _grow(self, needed: int) -> None:
        if needed > len(self._source):  # the schedule's prefixes do not depend on its size
            size = max(needed, 2 * len(self._source), 4096)
            self._source, self._sample = blending_schedule(self.weights, size)

    def locate(self, index: int) -> tuple[int, int]:
        """(source, sample within it) of global sample ``index``."""
        self._grow(index + 1)
        return int(self._source[index]), int(self._sample[index])

    def consumed_per_source(self, consumed: int) -> list[int]:
        """Samples each source gave to the first ``consumed`` samples."""
        self._grow(consumed)
        return np.bincount(self._source[:consumed], minlength=len(self.datasets)).tolist()

    def micro_batch(self, indices: Sequence[int], thd: bool = False) -> dict[str, torch.Tensor]:
        parts = []
        for i in indices:
            k, j = self.locate(i)
            parts.append((self.datasets[k], self.datasets[k].sample_pairs(j)))
        return collate(parts, self.packing, self.seq_length, thd)
