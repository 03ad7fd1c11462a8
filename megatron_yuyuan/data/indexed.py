"""QA documents in Megatron's ``.bin/.idx`` format, readable by megatron-core's ``IndexedDataset``.

The only module that imports ``megatron.core.datasets``. Each document is a QA pair stored as
**two sequences**: the prompt (``Question:{q} answer:`` by default) and the answer
`` {a}<|endoftext|>``, or a chat as prompt / answer sequences turn after turn, so the
prompt/answer boundaries (needed for answer-only loss) are recoverable from the files alone.

A ``{prefix}_meta.json`` next to them records the tokenizer, EOS id, template, the largest token id,
and the manifest of every file (:mod:`megatron_yuyuan.data.manifest`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

from megatron_yuyuan.data.manifest import (  # noqa: F401 - re-exported for readers
    SPLITS,
    file_digest,
    read_meta,
    rerun_advice,
    split_of,
    verify_files,
    verify_split,
)
from megatron_yuyuan.errors import DataError
from megatron_yuyuan.files import tmp_name


@dataclass
class QAPairTokens:
    """One document read back: prompt and answer ids alternating (each answer ends with EOS); a
    QA pair has two sequences, a chat two per turn."""

    sequences: list[np.ndarray]

    @property
    def prompt(self) -> np.ndarray:
        """The first prompt."""
        return self.sequences[0]

    @property
    def answer(self) -> np.ndarray:
        """The last answer (a QA pair's only one)."""
        return self.sequences[-1]


def write_qa_documents(
    prefix: Path,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    vocab_size: int,
) -> dict[str, Path]:
    """Write ``{prefix}.bin/.idx`` to temporary names; returns {final path: temporary path}.

    Args:
        prefix: output path prefix (e.g. ``data/medquad_train``).
        prompts: prompt token ids per document.
        answers: answer token ids per document, EOS included.
        vocab_size: chooses uint16 storage when every id fits.
    """
    docs = ((np.concatenate([p, a]), [len(p), len(a)]) for p, a in zip(prompts, answers))
    return write_documents(prefix, docs, vocab_size)


def dataset_exists(prefix: str | Path) -> bool:
    return Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()


def open_indexed(prefix: str | Path) -> IndexedDataset:
    """megatron-core's reader over ``{prefix}.bin/.idx``."""
    if not dataset_exists(prefix):
        raise DataError(
            f"no indexed dataset at {prefix}.bin/.idx; create it with "
            f"python -m tools.preprocess_qa (or tools.preprocess_medquad) --output-prefix ..."
        )
    try:
        ds = IndexedDataset(str(prefix))
        # megatron reads the index lazily: touch its last entry so truncation shows now
        if len(ds):
            ds[len(ds) - 1]
        return ds
    except (AssertionError, ValueError, IndexError, OSError) as exc:
        raise DataError(
            f"{prefix}.idx/.bin: not a readable indexed dataset ({type(exc).__name__}: {exc}); "
            f"the files are truncated or corrupt: {_advice(prefix)}"
        ) from exc


def _advice(split_prefix: str | Path) -> str:
    try:
        return rerun_advice(split_of(split_prefix)[0])
    except DataError:  # not a split's prefix
        return "recreate it with the preprocessing that wrote it"


def read_qa_documents(prefix: str | Path) -> list[QAPairTokens]:
    """Every document as alternating prompt / answer token arrays; checks the layout (an even
    number of sequences: two for a QA pair, two per turn for a chat)."""
    ds = open_indexed(prefix)
    docs = ds.document_indices
    out = []
    for d in range(len(docs) - 1):
        first, last = int(docs[d]), int(docs[d + 1])
        if last - first < 2 or (last - first) % 2:
            raise DataError(
                f"{prefix}: document {d} has {last - first} sequences; expected prompt/answer "
                f"pairs: was it written by tools.preprocess_qa or tools.preprocess_medquad?"
            )
        # Copy out of the memory map: the views die with the reader.
        out.append(QAPairTokens([np.array(ds[k], dtype=np.int64) for k in range(first, last)]))
    return out


def write_documents(
    prefix: Path, documents: Iterable[tuple[np.ndarray, Sequence[int]]], vocab_size: int
) -> dict[Path, Path]:
    """Stream documents ``(tokens, sequence lengths)`` into ``{prefix}.bin/.idx`` under
    temporary names; returns {final path: temporary path}. A QA pair is two sequences (prompt,
    answer); a chat is prompt, answer, prompt, answer, ... (answers end with EOS)."""
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    tmp_bin, tmp_idx = tmp_name(bin_path), tmp_name(idx_path)
    builder = IndexedDatasetBuilder(str(tmp_bin), dtype=DType.optimal_dtype(vocab_size))
    try:
        for tokens, lengths in documents:
            builder.add_document(tokens, list(lengths))
        builder.finalize(str(tmp_idx))
    except BaseException:
        builder.data_file.close()
        tmp_bin.unlink(missing_ok=True)
        tmp_idx.unlink(missing_ok=True)
        raise
    return {bin_path: tmp_bin, idx_path: tmp_idx}


def blending_schedule(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """megatron-core's blend of several datasets (``BlendedDataset``'s compiled helper):
    ``(source [size], sample within that source [size])``. Greedy and free of randomness: at
    every prefix of the sequence each source's share is the closest to its (normalised) weight,
    so the first ``n`` entries are the same whatever ``size`` is asked for."""
    from megatron.core.datasets import helpers  # the compiled helper ships in the wheel
    from megatron.core.datasets.utils import normalize

    source = np.zeros(size, dtype=np.int16)
    sample = np.zeros(size, dtype=np.int64)
    helpers.build_blending_indices(
        source, sample, normalize(list(weights)), len(weights), size, False
    )
    return source, sample
