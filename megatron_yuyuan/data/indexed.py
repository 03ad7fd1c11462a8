"""QA documents in Megatron's ``.bin/.idx`` format, readable by megatron-core's ``IndexedDataset``.

The only module that imports ``megatron.core.datasets``. Each document is one QA pair stored as
**two sequences**: the prompt ``Question:{q} answer:`` and the answer `` {a}<|endoftext|>``, so
the prompt/answer boundary (needed for answer-only loss) is recoverable from the files alone.
A ``{prefix}_meta.json`` next to them records the tokenizer, EOS id and template.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder


@dataclass
class QAPairTokens:
    """One document read back: prompt ids and answer ids (the latter ends with EOS)."""

    prompt: np.ndarray
    answer: np.ndarray


def tmp_name(path: Path) -> Path:
    """Where a file is written before the final rename (same directory, so rename is atomic)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


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
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    tmp_bin, tmp_idx = tmp_name(bin_path), tmp_name(idx_path)
    builder = IndexedDatasetBuilder(str(tmp_bin), dtype=DType.optimal_dtype(vocab_size))
    for prompt, answer in zip(prompts, answers):
        builder.add_document(np.concatenate([prompt, answer]), [len(prompt), len(answer)])
    builder.finalize(str(tmp_idx))
    return {bin_path: tmp_bin, idx_path: tmp_idx}


def dataset_exists(prefix: str | Path) -> bool:
    return Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()


def open_indexed(prefix: str | Path) -> IndexedDataset:
    """megatron-core's reader over ``{prefix}.bin/.idx``."""
    if not dataset_exists(prefix):
        raise FileNotFoundError(
            f"no indexed dataset at {prefix}.bin/.idx; create it with "
            f"python -m tools.preprocess_medquad --output-prefix ..."
        )
    return IndexedDataset(str(prefix))


def read_qa_documents(prefix: str | Path) -> list[QAPairTokens]:
    """Every document as (prompt, answer) token arrays; checks the two-sequence layout."""
    ds = open_indexed(prefix)
    docs = ds.document_indices
    out = []
    for d in range(len(docs) - 1):
        first, last = int(docs[d]), int(docs[d + 1])
        if last - first != 2:
            raise ValueError(
                f"{prefix}: document {d} has {last - first} sequences; expected 2 "
                f"(prompt, answer): was it written by tools/preprocess_medquad.py?"
            )
        # Copy out of the memory map: the views die with the reader.
        out.append(
            QAPairTokens(
                prompt=np.array(ds[first], dtype=np.int64),
                answer=np.array(ds[first + 1], dtype=np.int64),
            )
        )
    return out


def read_meta(prefix: str | Path) -> dict:
    """The ``{prefix}_meta.json`` written beside the splits (tokenizer, EOS id, vocab size)."""
    path = Path(f"{prefix}_meta.json")
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: it is written by tools/preprocess_medquad.py "
            f"next to the {prefix}_{{train,valid,test}} files"
        )
    return json.loads(path.read_text())
