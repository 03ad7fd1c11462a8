"""Answer-only-loss QA samples from the ``.bin/.idx`` files, packed or dynamically padded.

A pair's tokens ``x_0 .. x_{n-1}`` (prompt, answer, EOS) give ``n - 1`` training positions: input
``x_t``, label ``x_{t+1}``. A label counts in the loss when it is an answer token (EOS included),
or always with ``train_on_prompt``. A chat is prompt, answer, prompt, answer, ...: every
assistant answer (with its EOS) carries loss, user turns and template text none. Pairs longer than
``seq_length + 1`` tokens are cut at the answer's end (they then have no EOS) and counted.

* **packing** (default): pairs are first-fit packed into sequences of exactly ``seq_length``
  positions; position ids restart at 0 for every pair and attention is block-diagonal causal, so a
  pair inside a pack sees exactly what it would see alone.
* **padding**: one pair per sample, each micro-batch right-padded to its longest pair (rounded up
  to a multiple of 8); plain causal attention.

Sample ``i`` of the stream is a pure function of ``(seed, i)``: epochs are reshuffled with
``seed + epoch``, every rank can build any sample, and resuming at a sample index is exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from megatron_yuyuan.data.indexed import QAPairTokens, read_qa_documents
from megatron_yuyuan.errors import UserError

_OPEN_BINS = 64  # first-fit considers this many partly filled sequences


@dataclass
class Pair:
    """One QA pair, already cut to the sequence budget."""

    tokens: np.ndarray
    """Prompt + answer (+ EOS unless truncated) ids; a chat's turns one after another."""
    prompt_len: int
    """Tokens of the first prompt."""
    truncated: bool
    is_answer: np.ndarray
    """Per token: part of an answer (bool); label ``t`` trains when token ``t + 1`` is."""


def prepare_pairs(docs: Sequence[QAPairTokens], seq_length: int) -> list[Pair]:
    """Concatenate each document and cut it to at most ``seq_length + 1`` tokens."""
    pairs = []
    for doc in docs:
        tokens = np.concatenate(doc.sequences)
        is_answer = np.concatenate(
            [np.full(len(seq), k % 2 == 1) for k, seq in enumerate(doc.sequences)]
        )
        truncated = len(tokens) > seq_length + 1
        pairs.append(
            Pair(
                tokens=tokens[: seq_length + 1],
                prompt_len=len(doc.prompt),
                truncated=truncated,
                is_answer=is_answer[: seq_length + 1],
            )
        )
    return pairs


def pack_first_fit(lengths: Sequence[int], capacity: int, order: np.ndarray) -> list[list[int]]:
    """Pack items (visited in ``order``) into bins of ``capacity`` by first fit over the open bins.

    Returns bins of item indices in creation order. At most ``_OPEN_BINS`` bins stay open; when
    more are needed the fullest is closed, which keeps packing O(n) and nearly as dense as full
    first-fit.
    """
    open_bins: list[list[int]] = []
    room: list[int] = []
    closed: list[list[int]] = []
    for i in order:
        n = lengths[i]
        for b, r in enumerate(room):
            if n <= r:
                open_bins[b].append(int(i))
                room[b] -= n
                break
        else:
            if len(open_bins) == _OPEN_BINS:
                fullest = min(range(len(room)), key=room.__getitem__)
                closed.append(open_bins.pop(fullest))
                room.pop(fullest)
            open_bins.append([int(i)])
            room.append(capacity - n)
    return closed + open_bins


class QADataset:
    """The infinite, seeded stream of training samples over one split.

    Args:
        prefix: ``{output-prefix}_{split}`` of the preprocessed files.
        seq_length: positions per sample (packing) or the cap (padding).
        packing: pack several pairs per sample (else one pair per sample).
        train_on_prompt: also train on prompt tokens (upstream behaviour).
        seed: shuffling seed.
    """

    def __init__(
        self,
        prefix: str,
        seq_length: int,
        packing: bool = True,
        train_on_prompt: bool = False,
        seed: int = 1234,
    ) -> None:
        self.prefix = prefix
        self.seq_length = seq_length
        self.packing = packing
        self.train_on_prompt = train_on_prompt
        self.seed = seed
        self.pairs = prepare_pairs(read_qa_documents(prefix), seq_length)
        if not self.pairs:
            raise UserError(f"{prefix}: the dataset holds no documents")
        self.truncated = sum(p.truncated for p in self.pairs)
        self.max_token_id = max(int(p.tokens.max()) for p in self.pairs)
        self._epochs: list[list[list[int]]] = []
        self._epoch_starts = [0]

    def _epoch(self, epoch: int) -> list[list[int]]:
        while len(self._epochs) <= epoch:
            e = len(self._epochs)
            order = np.random.default_rng(self.seed + e).permutation(len(self.pairs))
            if self.packing:
                lengths = [len(p.tokens) - 1 for p in self.pairs]
                samples = pack_first_fit(lengths, self.seq_length, order)
            else:
                samples = [[int(i)] for i in order]
            self._epochs.append(samples)
            self._epoch_starts.append(self._epoch_starts[-1] + len(samples))
        return self._epochs[epoch]

    def samples_per_epoch(self, epoch: int = 0) -> int:
        return len(self._epoch(epoch))

    def sample_pairs(self, index: int) -> list[int]:
        """Pair indices of global sample ``index`` (epochs follow each other)."""
        epoch = 0
        while True:
            samples = self._epoch(epoch)
            if index < self._epoch_starts[epoch + 1]:
                return samples[index - self._epoch_starts[epoch]]
            epoch += 1

    def build_sample(self, pair_ids: Sequence[int], length: int) -> dict[str, torch.Tensor]:
        """Tensors of one sample of ``length`` positions (pairs laid out one after another)."""
        tokens = np.zeros(length, dtype=np.int64)
        labels = np.zeros(length, dtype=np.int64)
        loss_mask = np.zeros(length, dtype=np.float32)
        position_ids = np.zeros(length, dtype=np.int64)
        segment = np.full(length, -1, dtype=np.int64)  # pair id per position; -1 = padding
        pos = 0
        for k, i in enumerate(pair_ids):
            pair = self.pairs[i]
            n = len(pair.tokens) - 1  # positions this pair occupies
            tokens[pos : pos + n] = pair.tokens[:-1]
            labels[pos : pos + n] = pair.tokens[1:]
            # label t is tokens[t + 1]: trained when that is an answer token.
            loss_mask[pos : pos + n] = 1.0 if self.train_on_prompt else pair.is_answer[1:]
            position_ids[pos : pos + n] = np.arange(n)
            segment[pos : pos + n] = k
            pos += n
        position_ids[pos:] = np.arange(length - pos)  # padding: harmless, masked positions
        return {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.from_numpy(position_ids),
            "segment_ids": torch.from_numpy(segment),
        }

    def micro_batch(self, indices: Sequence[int], thd: bool = False) -> dict[str, torch.Tensor]:
        """Collate samples ``indices`` into one micro-batch ``[b, s]``; packed samples carry a
        block-diagonal ``attention_mask``, or with ``thd`` come in megatron's THD layout
        (:func:`to_thd`)."""
        parts = [(self, self.sample_pairs(i)) for i in indices]
        return collate(parts, self.packing, self.seq_length, thd)


def collate(
    parts: Sequence[tuple[QADataset, list[int]]], packing: bool, seq_length: int, thd: bool
) -> dict[str, torch.Tensor]:
    """One micro-batch from ``(dataset, pair ids)`` per sample (a blend mixes datasets)."""
    if packing:
        length = seq_length
    else:
        longest = max(len(ds.pairs[g[0]].tokens) - 1 for ds, g in parts)
        length = min(-(-longest // 8) * 8, seq_length)
    samples = [ds.build_sample(g, length) for ds, g in parts]
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    segments = batch.pop("segment_ids")  # [b, s]
    if packing and thd:
        return to_thd(batch, segments)
    if packing:
        batch["attention_mask"] = block_causal_mask(segments)
    return batch


def to_thd(batch: dict[str, torch.Tensor], segment_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """A packed micro-batch in megatron's THD layout, for variable-length attention kernels.

    The ``b`` rows of ``s`` positions are laid end to end as one sequence ``[1, b * s]``;
    ``cu_seqlens`` ``[n + 1]`` (int32) holds where each of the ``n`` runs starts (a pair, or a
    row's padding tail) and the total, and ``max_seqlen`` (a 0-d CPU tensor, so reading it never
    waits for the GPU) the longest run. Attention within each run is causal, as with
    :func:`block_causal_mask`, at no ``[s, s]`` cost.
    """
    b, s = segment_ids.shape
    flat = segment_ids.reshape(-1)  # [b * s]
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::s] = True  # a row's first pair never continues the previous row's last one
    cu = torch.cat([starts.nonzero().flatten(), torch.tensor([b * s])]).to(torch.int32)  # [n + 1]
    out = {k: v.reshape(1, b * s) for k, v in batch.items()}
    out["cu_seqlens"] = cu
    out["max_seqlen"] = (cu[1:] - cu[:-1]).max().to(torch.int64)
    return out


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """megatron-style boolean mask ``[b, 1, s, s]``, True = masked: a position attends only to
    earlier positions of its own pair (padding, segment -1, attends within the padding run)."""
    s = segment_ids.shape[-1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [b, s, s]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    return ~(same & causal).unsqueeze(1)
