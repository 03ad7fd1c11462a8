"""The MedQuAD preprocessing pipeline: XML -> records -> splits -> JSONL + ``.bin/.idx``.

Outputs for ``--output-prefix P``. Every file is written under a temporary name; when all are
complete the data files are renamed into place and ``P_meta.json`` last: its manifest (size and
SHA-256 of every file) lets each reader check that the set comes from one complete run. Temporary
files of a killed run are removed by the next run.

* ``P_{train,valid,test}.jsonl`` - one JSON object per pair: id, question, answer, qtype, source,
  focus
* ``P_{train,valid,test}.bin/.idx`` - the same pairs, tokenised, two sequences per document
* ``P_meta.json`` - tokenizer, EOS id, template, seed, cleaners and the report below
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megatron_yuyuan.data.indexed import SPLITS, write_qa_documents
from megatron_yuyuan.data.manifest import publish_dataset
from megatron_yuyuan.data.medquad import (
    ParseStats,
    clean_records,
    drop_exact_duplicates,
    find_xml_files,
    split_records,
)
from megatron_yuyuan.data.workers import ChunkResult, init_worker, process_files
from megatron_yuyuan.errors import UserError
from megatron_yuyuan.files import directory_problem, tmp_name
from megatron_yuyuan.prompts import PROMPT_TEMPLATE
from megatron_yuyuan.tokenizer import load_tokenizer


@dataclass
class PreprocessReport:
    """What the run read, dropped and wrote."""

    files: int = 0
    pairs_read: int = 0
    dropped_empty_answer: dict[str, int] = field(default_factory=dict)
    dropped_empty_question: int = 0
    dropped_by_cleaners: int = 0
    duplicates_dropped: int = 0
    split_pairs: dict[str, int] = field(default_factory=dict)
    split_tokens: dict[str, int] = field(default_factory=dict)
    longer_than: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)

    @property
    def answered_pairs(self) -> int:
        return (
            self.pairs_read - sum(self.dropped_empty_answer.values()) - self.dropped_empty_question
        )

    def lines(self) -> list[str]:
        total_tokens = sum(self.split_tokens.values())
        written = sum(self.split_pairs.values())
        empties = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped_empty_answer.items()))
        return [
            f"files parsed            {self.files:>10,}",
            f"pairs read              {self.pairs_read:>10,}",
            f"  dropped: empty answer {sum(self.dropped_empty_answer.values()):>10,}  ({empties})",
            f"  dropped: empty question {self.dropped_empty_question:>8,}",
            f"  dropped: emptied by cleaners {self.dropped_by_cleaners:>3,}",
            f"  exact duplicates      {self.duplicates_dropped:>10,}",
            f"answered pairs          {self.answered_pairs:>10,}",
            "splits                  "
            + "  ".join(
                f"{s} {self.split_pairs[s]:,} pairs / {self.split_tokens[s]:,} tokens"
                for s in SPLITS
            ),
            "pairs longer than       "
            + "  ".join(f"{k}: {v:,}" for k, v in self.longer_than.items())
            + "  (truncated at the answer's end when training at that --seq-length)",
            f"throughput              {written / self.seconds:,.0f} docs/s, "
            f"{total_tokens / self.seconds:,.0f} tokens/s ({self.seconds:.2f} s)",
        ]

    def to_dict(self) -> dict:
        """Counts only (no timings or paths), so the same inputs give a byte-identical meta file."""
        return {k: v for k, v in self.__dict__.items() if k not in ("outputs", "seconds")}


def process_all(
    files: Sequence[Path], cleaners: Sequence[str], tokenizer: str, workers: int, progress: bool
) -> ChunkResult:
    """Run :func:`process_files` over chunks of files in ``workers`` processes, in file order."""
    chunks = [files[i : i + 128] for i in range(0, len(files), 128)]
    total = ChunkResult([], [], [], ParseStats(), 0)
    with tqdm(total=len(files), desc="parse+tokenize", unit="file", disable=not progress) as bar:
        if workers > 1:
            # spawn, not fork: the caller may hold threads (torch, gloo), and a forked child can
            # deadlock on a lock one of them held. The worker module imports no torch.
            ctx = get_context("spawn")
            with ctx.Pool(workers, initializer=init_worker, initargs=(tokenizer,)) as pool:
                results = pool.imap(partial(process_files, cleaners=cleaners), chunks)
                for chunk, res in zip(chunks, results):
                    _merge(total, res)
                    bar.update(len(chunk))
        else:
            tok = load_tokenizer(tokenizer)
            for chunk in chunks:
                _merge(total, process_files(chunk, cleaners, tok))
                bar.update(len(chunk))
    return total


def _merge(total: ChunkResult, part: ChunkResult) -> None:
    total.records += part.records
    total.prompts += part.prompts
    total.answers += part.answers
    total.stats.merge(part.stats)
    total.emptied += part.emptied


def preprocess_medquad(
    input_dir: Path,
    output_prefix: str,
    tokenizer: str = "gpt2",
    workers: int = 2,
    valid_size: int | None = None,
    test_size: int | None = None,
    seed: int = 1234,
    cleaners: Sequence[str] = (),
    progress: bool = True,
) -> PreprocessReport:
    """Run the whole pipeline; see the module docstring for the outputs."""
    start = time.perf_counter()
    report = PreprocessReport()
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    for flag, size in (("--valid-size", valid_size), ("--test-size", test_size)):
        if size is not None and size < 0:
            raise UserError(f"{flag} must be >= 0, got {size}")
    out = Path(output_prefix)
    if not out.name or str(output_prefix).endswith(("/", os.sep)) or out.is_dir():
        raise UserError(
            f"--output-prefix {output_prefix}: is a directory; give a path prefix inside it, "
            f"e.g. {out / 'medquad'} (files are named PREFIX_train.jsonl, ...)"
        )
    check_output_dir(out.parent)
    remove_stale_temporaries(out)
    files = find_xml_files(Path(input_dir))  # fail fast on a bad --input
    tok = load_tokenizer(tokenizer)  # fail fast on a bad --tokenizer
    clean_records([], cleaners)  # fail fast on an unknown cleaner
    res = process_all(files, cleaners, tokenizer, workers, progress)
    report.files = sum(res.stats.files.values())
    report.pairs_read = sum(res.stats.pairs.values())
    report.dropped_empty_answer = dict(res.stats.empty_answers)
    report.dropped_empty_question = sum(res.stats.empty_questions.values())
    report.dropped_by_cleaners = res.emptied
    tokens_of = {r.id: (p, a) for r, p, a in zip(res.records, res.prompts, res.answers)}
    records = sorted(res.records, key=lambda r: r.id)
    records, report.duplicates_dropped = drop_exact_duplicates(records)
    # Default split sizes: 500 pairs each (MedQuAD's usual), at most 10% of a smaller input each.
    valid_size = default_split_size(len(records)) if valid_size is None else valid_size
    test_size = default_split_size(len(records)) if test_size is None else test_size
    if valid_size + test_size >= len(records):
        raise UserError(
            f"--valid-size {valid_size} + --test-size {test_size} = {valid_size + test_size} "
            f"leaves no training pairs: {input_dir} has {len(records)} distinct answered pairs; "
            f"choose sizes that add up to less than that"
        )
    splits = split_records(records, valid_size=valid_size, test_size=test_size, seed=seed)

    ordered = [rec for name in SPLITS for rec in splits[name]]
    prompts = [tokens_of[r.id][0] for r in ordered]
    answers = [tokens_of[r.id][1] for r in ordered]
    lengths = np.array([len(p) + len(a) for p, a in zip(prompts, answers)])
    report.longer_than = {str(n): int((lengths > n).sum()) for n in (512, 1024)}

    pending: dict[Path, Path] = {}
    try:
        offset = 0
        for name in SPLITS:
            recs = splits[name]
            sl = slice(offset, offset + len(recs))
            offset += len(recs)
            jsonl = Path(f"{output_prefix}_{name}.jsonl")
            pending[jsonl] = tmp_name(jsonl)
            with pending[jsonl].open("w") as f:
                for rec in recs:
                    f.write(json.dumps(rec.to_json(), ensure_ascii=False) + "\n")
            pending.update(
                write_qa_documents(
                    Path(f"{output_prefix}_{name}"), prompts[sl], answers[sl], tok.vocab_size
                )
            )
            report.split_pairs[name] = len(recs)
            report.split_tokens[name] = int(lengths[sl].sum())
        max_token_id = max(
            (int(max(p.max(initial=0), a.max(initial=0))) for p, a in zip(prompts, answers)),
            default=0,
        )
        # All complete: publish the data files, then the manifest that vouches for them.
        publish_dataset(
            output_prefix,
            pending,
            {
                "tokenizer": tok.name,
                "vocab_size": tok.vocab_size,
                "max_token_id": max_token_id,
                "eod": tok.eod,
                "template": PROMPT_TEMPLATE + " {answer}<eod>",
                "seed": seed,
                "cleaners": list(cleaners),
                "report": report.to_dict(),
            },
        )
    except BaseException:
        for tmp in pending.values():
            tmp.unlink(missing_ok=True)
        raise
    report.outputs = [str(p) for p in pending]
    report.seconds = time.perf_counter() - start
    return report


def default_split_size(pairs: int) -> int:
    """Validation and test pairs when not given: 500, or 10% of the pairs if that is fewer."""
    return min(500, pairs // 10)


def check_output_dir(folder: Path) -> None:
    """Create the output directory and check that it takes files, before any parsing."""
    problem = directory_problem(folder)
    if problem:
        raise UserError(
            f"--output-prefix: cannot write in {folder} ({problem}); choose a writable directory"
        )


def remove_stale_temporaries(prefix: Path) -> list[Path]:
    """Delete temporary files that a killed run with this prefix left (their process is gone)."""
    removed = []
    for tmp in prefix.parent.glob(f".{prefix.name}_*.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
