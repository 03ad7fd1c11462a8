"""Any QA source -> checked examples -> leakage-free splits -> JSONL + ``.bin/.idx`` (streaming).

    python -m tools.preprocess_qa --input faq.jsonl --input chats.jsonl --output-prefix data/mine

Pass 1 reads every input as a stream of row batches (:mod:`.sources`); worker processes decode,
check, format with the prompt template and tokenise them (:mod:`.rows`) and the parent spools the
JSON records and token ids to two temporary files, keeping per row only offsets and 63-bit keys
(memory stays flat in the data's size). Pass 2 chooses the splits from the keys and copies each
split's rows from the spool into its files. Outputs, as ``tools.preprocess_medquad`` writes them
(a dataset prefix ``P`` that ``finetune --data-prefix`` takes):

* ``P_{train,valid,test}.jsonl`` — one object per example: id, question, answer, the template's
  other fields; chats also their ``messages`` (question/answer are the last turn's).
* ``P_{train,valid,test}.bin/.idx`` — per example, alternating prompt / answer sequences (one
  pair for a QA row, one per turn for a chat); answers end with EOS.
* ``P_meta.json`` — tokenizer, EOS, template, inputs and field mappings, the report, and the
  manifest of every file (published last, so readers can tell a complete set).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import time
from array import array
from collections import defaultdict, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megatron_yuyuan.data import rows as rowlib
from megatron_yuyuan.data import sources
from megatron_yuyuan.data.indexed import SPLITS, write_documents
from megatron_yuyuan.data.manifest import publish_dataset
from megatron_yuyuan.data.preprocess import (
    check_output_dir,
    default_split_size,
    remove_stale_temporaries,
)
from megatron_yuyuan.errors import UserError
from megatron_yuyuan.files import tmp_name
from megatron_yuyuan.prompts import PromptTemplate, check_split_point
from megatron_yuyuan.tokenizer import load_tokenizer

EXAMPLES_PER_REASON = 3  # file:line examples the report keeps per drop reason
ROLES = ("train", "valid", "test")  # what an input is for: split by us, or the user's own split


@dataclass
class QAOptions:
    """What ``tools.preprocess_qa`` was asked to do."""

    inputs: Sequence[str]
    """Training sources (files, folders, ``hf:NAME``); split into train/valid/test unless the
    user's own validation/test sources are given."""
    output_prefix: str
    valid_inputs: Sequence[str] = ()
    """The user's validation set: kept untouched; training rows repeating it are removed."""
    test_inputs: Sequence[str] = ()
    """The user's test set: kept untouched; training rows repeating it are removed."""
    format: str | None = None
    """Force a format (``jsonl``, ``json``, ``csv``, ...) instead of detecting it."""
    question_field: str | None = None
    answer_field: str | None = None
    id_field: str | None = None
    group_field: str | None = None
    """Rows sharing this field's value go to one split (e.g. one source document)."""
    prompt_template: str = PromptTemplate().text
    tokenizer: str = "gpt2"
    workers: int = 2
    valid_size: int | None = None
    test_size: int | None = None
    seed: int = 1234
    strict: bool = False
    """Any dropped row is an error (nothing is written)."""
    progress: bool = True
    batch_rows: int = 1000


@dataclass
class QAReport:
    """What the run read, dropped and wrote."""

    inputs: list[dict] = field(default_factory=list)
    rows_read: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    """Rows dropped per reason."""
    examples: dict[str, list[str]] = field(default_factory=dict)
    """The first ``file:line`` locations per reason."""
    duplicates_dropped: int = 0
    overlap_removed: int = 0
    """Training rows removed because they repeat a question or answer of the user's valid/test."""
    chats: int = 0
    warnings: list[str] = field(default_factory=list)
    split_pairs: dict[str, int] = field(default_factory=dict)
    split_tokens: dict[str, int] = field(default_factory=dict)
    longer_than: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [
            f"input {i['input']} ({i['format']}): {i['rows']:,} rows; {i['fields']}"
            for i in self.inputs
        ]
        out.append(f"rows read               {self.rows_read:>10,}")
        for reason, n in sorted(self.dropped.items(), key=lambda kv: -kv[1]):
            out.append(f"  dropped: {reason}: {n:,} (e.g. {', '.join(self.examples[reason])})")
        out.append(f"  exact duplicates      {self.duplicates_dropped:>10,}")
        if self.overlap_removed:
            out.append(
                f"  training rows repeating a valid/test question or answer: "
                f"{self.overlap_removed:,} removed"
            )
        written = sum(self.split_pairs.values())
        tokens = sum(self.split_tokens.values())
        out.append(
            "splits                  "
            + "  ".join(
                f"{s} {self.split_pairs[s]:,} examples / {self.split_tokens[s]:,} tokens"
                for s in SPLITS
            )
            + (f"  ({self.chats:,} chats)" if self.chats else "")
        )
        out.append(
            "longer than             "
            + "  ".join(f"{k}: {v:,}" for k, v in self.longer_than.items())
            + "  (cut at an answer's end when training at that --seq-length)"
        )
        out += [f"warning: {w}" for w in self.warnings]
        secs = max(self.seconds, 1e-9)
        out.append(
            f"throughput              {written / secs:,.0f} examples/s, {tokens / secs:,.0f} "
            f"tokens/s ({self.seconds:.2f} s)"
        )
        return out

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("outputs", "seconds")}


def detect_fields(
    source: sources.Source, opts: QAOptions, template: PromptTemplate
) -> rowlib.FieldMap:
    """Recognise (or check the named) fields of one input before anything is read in full."""
    sample, columns = sources.columns_of(source)
    if not columns:
        raise UserError(f"--input {source.spec}: holds no rows (or none that is an object)")
    cols = set(columns)
    shown = ", ".join(columns[:12]) + (", ..." if len(columns) > 12 else "")

    def need(name: str, flag: str) -> str:
        if name not in cols:
            raise UserError(
                f"--input {source.spec}: has no field '{name}' ({flag}); its fields: {shown}"
            )
        return name

    extra = tuple(need(f, "--prompt-template") for f in template.extra_fields)
    id_field = need(opts.id_field, "--id-field") if opts.id_field else None
    if source.format == "medquad" and not opts.id_field:
        id_field = "id"
    group = need(opts.group_field, "--group-field") if opts.group_field else None
    common = dict(id=id_field, group=group, extra=extra)
    if opts.question_field or opts.answer_field:
        q = need(opts.question_field or "question", "--question-field")
        a = need(opts.answer_field or "answer", "--answer-field")
        return rowlib.FieldMap(question=q, answer=a, **common)
    for chat in rowlib.CHAT_FIELDS:
        if chat in cols and not {"question", "answer"} <= cols:
            return rowlib.FieldMap(chat=chat, **common)
    for q, a in rowlib.KNOWN_SHAPES:
        if q in cols and a in cols:
            alpaca = "input" if (q, a) == ("instruction", "output") and "input" in cols else None
            return rowlib.FieldMap(question=q, answer=a, alpaca_input=alpaca, **common)
    raise UserError(
        f"--input {source.spec}: cannot tell which fields hold the question and the answer "
        f"(its fields: {shown}); name them with --question-field and --answer-field"
    )


@dataclass
class _Spool:
    """Pass 1's output: records and tokens on disk, offsets and keys in flat arrays."""

    prefix: Path
    """The output prefix: the spool files sit beside the outputs, named as its temporaries."""
    rec_off: array = field(default_factory=lambda: array("q", [0]))
    tok_off: array = field(default_factory=lambda: array("q", [0]))
    seq_off: array = field(default_factory=lambda: array("q", [0]))
    seq_lengths: array = field(default_factory=lambda: array("q"))
    qkey: array = field(default_factory=lambda: array("q"))
    akey: array = field(default_factory=lambda: array("q"))
    dkey: array = field(default_factory=lambda: array("q"))
    gkey: array = field(default_factory=lambda: array("q"))
    role: array = field(default_factory=lambda: array("b"))
    ids: list[str] = field(default_factory=list)
    max_token: int = 0

    def __post_init__(self) -> None:
        at, pid = self.prefix, os.getpid()
        self.records_path = at.parent / f".{at.name}_records.tmp{pid}"
        self.tokens_path = at.parent / f".{at.name}_tokens.tmp{pid}"

    def __len__(self) -> int:
        return len(self.ids)


def preprocess_qa(opts: QAOptions) -> QAReport:
    """Run the whole pipeline; see the module docstring for the outputs."""
    start = time.perf_counter()
    report = QAReport()
    if opts.workers < 1:
        raise UserError(f"--workers must be >= 1, got {opts.workers}")
    for flag, size in (("--valid-size", opts.valid_size), ("--test-size", opts.test_size)):
        if size is not None and size < 0:
            raise UserError(f"{flag} must be >= 0, got {size}")
    if not opts.inputs:
        raise UserError("--input: give at least one QA source (file, folder or hf:NAME)")
    out = Path(opts.output_prefix)
    if not out.name or opts.output_prefix.endswith(("/", os.sep)) or out.is_dir():
        raise UserError(
            f"--output-prefix {opts.output_prefix}: is a directory; give a path prefix inside it, "
            f"e.g. {out / 'qa'} (files are named PREFIX_train.jsonl, ...)"
        )
    if opts.question_field and opts.question_field == opts.answer_field:
        raise UserError(
            f"--question-field and --answer-field both name '{opts.question_field}': the model "
            f"would learn to copy its input; name the answer's own field"
        )
    template = PromptTemplate.parse(opts.prompt_template)
    tok = load_tokenizer(opts.tokenizer)
    check_split_point(template, tok)
    planned = [(s, "train") for s in opts.inputs]
    planned += [(s, "valid") for s in opts.valid_inputs]
    planned += [(s, "test") for s in opts.test_inputs]
    flags = {"train": "--input", "valid": "--valid-input", "test": "--test-input"}
    resolved = [(sources.resolve(s, opts.format, flags[r]), r) for s, r in planned]
    check_inputs_apart(resolved, out, flags)
    fields = {n: detect_fields(src, opts, template) for n, (src, _) in enumerate(resolved)}
    check_output_dir(out.parent)
    remove_stale_temporaries(out)
    spool = _Spool(out)
    try:
        _read_all(resolved, fields, template, tok, opts, spool, report)
        return _split_and_write(spool, template, tok, opts, report, start)
    finally:
        spool.records_path.unlink(missing_ok=True)
        spool.tokens_path.unlink(missing_ok=True)


def check_inputs_apart(resolved, out: Path, flags: dict[str, str]) -> None:
    """No input is read twice (as training data and as the user's test set, say), and no output
    lands on an input or inside an input folder (a rerun would read its own outputs)."""
    outputs = [Path(f"{out}_{s}.{e}") for s in SPLITS for e in ("jsonl", "bin", "idx")]
    outputs.append(Path(f"{out}_meta.json"))
    seen: dict[Path, str] = {}
    for src, role in resolved:
        folder = Path(src.spec) if src.format != "hf" and Path(src.spec).is_dir() else None
        for output in outputs if folder else ():
            if folder.resolve() in output.resolve().parents:
                raise UserError(
                    f"--output-prefix {out}: would write {output.name} inside the input folder "
                    f"{src.spec}; choose an output prefix outside the inputs"
                )
        for path in src.files:
            where = path.resolve()
            if where in seen:
                raise UserError(
                    f"{flags[role]} {src.spec}: is also given as {seen[where]}; each source "
                    f"belongs to one split (training rows repeating your test set are removed "
                    f"anyway)"
                )
            seen[where] = f"{flags[role]} {src.spec}"
            for output in outputs:
                if output.resolve() == where:
                    raise UserError(
                        f"--output-prefix {out}: would write {output.name} over the input "
                        f"{src.spec}; choose an output prefix outside the inputs"
                    )


def _jobs(resolved, opts: QAOptions, counts: list[int]) -> Iterator[tuple]:
    for n, (src, _) in enumerate(resolved):
        for kind, items, where in sources.iter_batches(src, opts.batch_rows):
            yield (n, kind, items, where, counts[n] + 1)
            counts[n] += len(items)


def _results(resolved, fields, template, tok, opts: QAOptions, counts) -> Iterator[tuple]:
    """(input no, result) per batch, in input order; at most 2 batches per worker in flight, so
    a multi-GB input is never queued whole."""
    jobs = _jobs(resolved, opts, counts)
    if opts.workers == 1:
        for job in jobs:
            yield job[0], rowlib.process_rows(job, tok, fields, template)
        return
    # spawn, not fork: the caller may hold threads, and the worker module imports no torch.
    ctx = get_context("spawn")
    with ctx.Pool(
        opts.workers,
        initializer=rowlib.init_worker,
        initargs=(opts.tokenizer, fields, template.text),
    ) as pool:
        pending: deque = deque()
        for job in jobs:
            pending.append((job[0], pool.apply_async(rowlib.process_rows, (job,))))
            while len(pending) >= 2 * opts.workers:
                n, res = pending.popleft()
                yield n, res.get()
        while pending:
            n, res = pending.popleft()
            yield n, res.get()


def _read_all(resolved, fields, template, tok, opts, spool: _Spool, report: QAReport) -> None:
    counts = [0] * len(resolved)
    role_of = {n: ROLES.index(r) for n, (_, r) in enumerate(resolved)}
    bar = tqdm(desc="read+tokenize", unit=" rows", disable=not opts.progress, unit_scale=True)
    with spool.records_path.open("wb") as rec_f, spool.tokens_path.open("wb") as tok_f, bar:
        for n, res in _results(resolved, fields, template, tok, opts, counts):
            for reason, where in res.bad:
                if opts.strict:
                    raise UserError(
                        f"{where}: {reason} (--strict: nothing was written); fix the row or drop "
                        f"--strict to skip such rows"
                    )
                report.dropped[reason] = report.dropped.get(reason, 0) + 1
                shown = report.examples.setdefault(reason, [])
                if len(shown) < EXAMPLES_PER_REASON:
                    shown.append(where)
            for line in res.records:
                rec_f.write(line)
                spool.rec_off.append(spool.rec_off[-1] + len(line))
            tok_f.write(res.tokens.astype(np.int32, copy=False).tobytes())
            if len(res.tokens):
                spool.max_token = max(spool.max_token, int(res.tokens.max()))
            spool.seq_lengths.extend(res.seq_lengths)
            for count in res.seq_counts:
                spool.seq_off.append(spool.seq_off[-1] + count)
            first = len(spool.tok_off) - 1
            for k, count in enumerate(res.seq_counts):
                lo, hi = spool.seq_off[first + k], spool.seq_off[first + k + 1]
                spool.tok_off.append(spool.tok_off[-1] + sum(spool.seq_lengths[lo:hi]))
                report.chats += count > 2
            for q, a, d, g in res.keys:
                spool.qkey.append(q)
                spool.akey.append(a)
                spool.dkey.append(d)
                spool.gkey.append(g)
            spool.ids.extend(res.ids)
            spool.role.extend([role_of[n]] * len(res.ids))
            bar.update(len(res.records) + len(res.bad))
    report.rows_read = sum(counts)
    for n, (src, role) in enumerate(resolved):
        report.inputs.append(
            {
                "input": src.spec,
                "format": src.format,
                "role": role,
                "rows": counts[n],
                "fields": fields[n].describe(),
            }
        )


def _groups(members: Sequence[int], spool: _Spool) -> list[list[int]]:
    """Connected components of rows sharing a normalised question, answer or group value."""
    parent = {i: i for i in members}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_with: dict[tuple[int, int], int] = {}
    for i in members:
        keys = [(0, spool.qkey[i]), (1, spool.akey[i])]
        if spool.gkey[i]:
            keys.append((2, spool.gkey[i]))
        for k in keys:
            j = first_with.setdefault(k, i)
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in members:
        groups[find(i)].append(i)
    return list(groups.values())


def choose_splits(spool: _Spool, opts: QAOptions, report: QAReport) -> dict[str, list[int]]:
    """Row indices per split: duplicates and repeats of the user's valid/test removed, the rest
    split by leakage groups visited in a seeded hash order (as MedQuAD's splits are)."""
    seen_dup: set[int] = set()
    seen_id: dict[str, int] = {}
    fixed: dict[str, list[int]] = {"valid": [], "test": []}
    pool: list[int] = []
    for i in range(len(spool)):
        role = ROLES[spool.role[i]]
        if role != "train":
            fixed[role].append(i)
            continue
        if spool.dkey[i] in seen_dup:
            report.duplicates_dropped += 1
            continue
        seen_dup.add(spool.dkey[i])
        pool.append(i)
    del seen_dup
    if fixed["valid"] or fixed["test"]:
        held = {spool.qkey[i] for s in fixed.values() for i in s}
        held |= {-1 - spool.akey[i] for s in fixed.values() for i in s}  # answers apart
        kept = [i for i in pool if spool.qkey[i] not in held and -1 - spool.akey[i] not in held]
        report.overlap_removed = len(pool) - len(kept)
        pool = kept
    for i in [*pool, *fixed["valid"], *fixed["test"]]:
        if spool.ids[i] in seen_id:
            raise UserError(
                f"id {spool.ids[i]!r} (--id-field {opts.id_field}) names two different rows; "
                f"ids must be unique: fix the data or drop --id-field (ids are then generated)"
            )
        seen_id[spool.ids[i]] = i
    del seen_id
    want = {
        "valid": 0 if opts.valid_inputs else opts.valid_size,
        "test": 0 if opts.test_inputs else opts.test_size,
    }
    for name in want:
        if want[name] is None:
            want[name] = default_split_size(len(pool))
    if pool and want["valid"] + want["test"] >= len(pool):
        raise UserError(
            f"--valid-size {want['valid']} + --test-size {want['test']} leaves no training "
            f"examples: the input has {len(pool)} distinct usable rows; choose smaller sizes"
        )
    if not pool:
        why = "; ".join(
            f"{reason}: {n:,} (e.g. {report.examples[reason][0]})"
            for reason, n in sorted(report.dropped.items(), key=lambda kv: -kv[1])[:3]
        )
        raise UserError(
            f"no usable training rows in {', '.join(opts.inputs)}: "
            + (f"rows dropped as {why}" if why else "no rows were read")
            + (
                f"; {report.overlap_removed:,} repeat the validation/test set"
                if report.overlap_removed
                else ""
            )
        )
    order = sorted(
        _groups(pool, spool),
        key=lambda g: hashlib.sha256(f"{opts.seed}:{spool.ids[g[0]]}".encode()).hexdigest(),
    )
    splits: dict[str, list[int]] = {"train": [], **fixed}
    for group in order:
        target = next(
            (s for s in ("test", "valid") if want[s] and len(splits[s]) + len(group) <= want[s]),
            "train",
        )
        splits[target].extend(group)
    for name in ("train",) + tuple(n for n in want if want[n]):
        splits[name].sort()
    for name in ("valid", "test"):
        if want[name] and len(splits[name]) < want[name]:
            report.warnings.append(
                f"the {name} split has {len(splits[name]):,} of the {want[name]:,} examples "
                f"asked for: the rest are in groups (rows sharing a question, an answer or a "
                f"--group-field value) too large to fit, which stay in train"
            )
    return splits


def _split_and_write(spool: _Spool, template, tok, opts, report: QAReport, start: float):
    splits = choose_splits(spool, opts, report)
    prefix = opts.output_prefix
    pending: dict[Path, Path] = {}
    lengths_all = []
    try:
        with spool.records_path.open("rb") as rf:
            rec_mm = (
                mmap.mmap(rf.fileno(), 0, access=mmap.ACCESS_READ) if spool.rec_off[-1] else b""
            )
            tokens = (
                np.memmap(spool.tokens_path, dtype=np.int32, mode="r")
                if spool.tok_off[-1]
                else np.zeros(0, np.int32)
            )
            for name in SPLITS:
                rows = splits[name]
                jsonl = Path(f"{prefix}_{name}.jsonl")
                pending[jsonl] = tmp_name(jsonl)
                with pending[jsonl].open("wb") as f:
                    for i in rows:
                        f.write(rec_mm[spool.rec_off[i] : spool.rec_off[i + 1]])
                sizes = np.array([spool.tok_off[i + 1] - spool.tok_off[i] for i in rows], np.int64)
                lengths_all.append(sizes)

                def docs(rows=rows, tokens=tokens):
                    for i in rows:
                        lo, hi = spool.seq_off[i], spool.seq_off[i + 1]
                        yield (
                            tokens[spool.tok_off[i] : spool.tok_off[i + 1]],
                            spool.seq_lengths[lo:hi],
                        )

                pending.update(write_documents(Path(f"{prefix}_{name}"), docs(), tok.vocab_size))
                report.split_pairs[name] = len(rows)
                report.split_tokens[name] = int(sizes.sum())
            del tokens
            if isinstance(rec_mm, mmap.mmap):
                rec_mm.close()
        every = np.concatenate(lengths_all)
        report.longer_than = {str(n): int((every > n).sum()) for n in (512, 1024)}
        publish_dataset(
            prefix,
            pending,
            {
                "tokenizer": tok.name,
                "vocab_size": tok.vocab_size,
                "max_token_id": spool.max_token,
                "eod": tok.eod,
                "template": template.to_meta(),
                "seed": opts.seed,
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
