"""The per-chunk preprocessing step run in worker processes: parse + clean + tokenise.

Kept free of torch and megatron imports so that spawned workers start in a fraction of a second.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_yuyuan.data.medquad import ParseStats, QARecord, clean_records, parse_files
from megatron_yuyuan.prompts import format_answer, format_prompt
from megatron_yuyuan.tokenizer import Tokenizer, load_tokenizer


@dataclass
class ChunkResult:
    """Parsed, cleaned and tokenised pairs of a group of files (what a worker sends back)."""

    records: list[QARecord]
    prompts: list[np.ndarray]
    answers: list[np.ndarray]
    stats: ParseStats
    emptied: int


_worker_tokenizer: Tokenizer | None = None


def init_worker(tokenizer_spec: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_spec)


def process_files(
    paths: Sequence[Path], cleaners: Sequence[str], tokenizer: Tokenizer | None = None
) -> ChunkResult:
    """Parse + clean + tokenise: prompt ids, and answer ids followed by EOS, per pair."""
    tok = tokenizer or _worker_tokenizer
    records, stats = parse_files(paths)
    records, emptied = clean_records(records, cleaners)
    ids = tok.encode_batch(
        [format_prompt(r.question) for r in records] + [format_answer(r.answer) for r in records]
    )
    n = len(records)
    prompts = [np.asarray(p, dtype=np.int32) for p in ids[:n]]
    answers = [np.asarray(a + [tok.eod], dtype=np.int32) for a in ids[n:]]
    return ChunkResult(records, prompts, answers, stats, emptied)
