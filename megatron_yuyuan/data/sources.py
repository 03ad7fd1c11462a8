"""Where the user's QA rows come from: a file, a folder or a Hugging Face hub name, read as a
stream of row batches (no source is ever held whole as Python objects).

Formats, detected from the content (``--format`` overrides):

* ``jsonl`` — one JSON object per line, or the upstream Yuyuan-QA's single-quoted Python-literal
  dicts (read with ``ast.literal_eval``, which never runs code). Read line by line by our own
  reader: a bad line is dropped and counted with its ``file:line`` instead of failing the file
  (Hugging Face's JSON loader stops at the first bad line and cannot read literal lines).
* ``json`` — one JSON array of objects, parsed object by object.
* ``csv`` / ``tsv`` — Python's ``csv`` module (UTF-8 with or without BOM, quoted newlines): every
  cell stays the exact string the user wrote (the pandas reader behind ``datasets``' CSV loader
  infers types, so ``007`` became ``7`` and an empty cell NaN), and bad rows keep line numbers.
* ``parquet``, ``arrow`` (a ``datasets.Dataset.save_to_disk`` folder) and
  ``hf:NAME[:CONFIG][@SPLIT]`` — through Hugging Face ``datasets``: memory-mapped Arrow, read in
  batches.
* ``medquad`` — a MedQuAD XML tree.
"""

from __future__ import annotations

import csv
import json
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from megatron_yuyuan.errors import UserError

FORMATS = ("jsonl", "json", "csv", "tsv", "parquet", "arrow", "medquad", "hf")
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv"}
_EXTENSIONS |= {".tsv": "tsv", ".parquet": "parquet", ".txt": "jsonl"}

Batch = tuple[str, list, list[str]]
"""(kind, items, locations): kind ``lines`` (raw bytes) or ``rows`` (dicts); ``file:line`` each."""


@dataclass
class Source:
    """One ``--input``: what it is and how to read it."""

    spec: str
    format: str
    files: list[Path]
    """The files to read in order (a folder of JSONL files is several)."""


def resolve(spec: str, fmt: str | None = None, flag: str = "--input") -> Source:
    """Check that ``spec`` exists and find its format; one :class:`UserError` if not."""
    if fmt is not None and fmt not in FORMATS:
        raise UserError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if spec.startswith("hf:") or fmt == "hf":
        name = spec.removeprefix("hf:")
        if not name or name.startswith(("@", ":")) or name.endswith(("@", ":")):
            raise UserError(f"{flag} {spec}: give hf:NAME[:CONFIG][@SPLIT], e.g. hf:user/faq@train")
        return Source(spec, "hf", [])
    path = Path(spec)
    if not path.exists():
        raise UserError(f"{flag} {spec}: no such file or folder")
    if path.is_dir():
        if fmt in ("arrow", None) and (path / "state.json").is_file():
            return Source(spec, "arrow", [path])
        if fmt in ("medquad", None) and next(path.rglob("*.xml"), None) is not None:
            return Source(spec, "medquad", [path])
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _EXTENSIONS)
        if fmt is not None:
            files = [p for p in files if _EXTENSIONS[p.suffix] == fmt or fmt == "jsonl"]
        if not files:
            raise UserError(
                f"{flag} {spec}: a folder with no data files (.jsonl, .json, .csv, .tsv, "
                f".parquet), no MedQuAD .xml and no datasets save_to_disk state.json"
            )
        formats = {fmt or detect_file(p) for p in files}
        if len(formats) > 1:
            raise UserError(
                f"{flag} {spec}: holds files of several formats ({', '.join(sorted(formats))}); "
                f"give each as its own --input"
            )
        return Source(spec, formats.pop(), files)
    return Source(spec, fmt or detect_file(path), [path])


def detect_file(path: Path) -> str:
    """A file's format from its first bytes (its extension only where the content is ambiguous)."""
    try:
        with path.open("rb") as f:
            head = f.read(4096)
    except OSError as exc:
        raise UserError(f"--input {path}: cannot be read ({exc.strerror})") from exc
    if head.startswith(b"PAR1"):
        return "parquet"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if path.suffix in (".jsonl", ".ndjson"):  # one value per line, whatever the first holds
        return "jsonl"
    if text.startswith(b"["):
        return "json"
    if path.suffix in (".csv", ".tsv"):
        return path.suffix[1:]
    if text.startswith(b"{"):
        return "jsonl"
    if path.suffix in _EXTENSIONS and _EXTENSIONS[path.suffix] != "parquet":
        return _EXTENSIONS[path.suffix]
    raise UserError(
        f"--input {path}: cannot tell its format from its content; give --format "
        f"({', '.join(f for f in FORMATS if f not in ('medquad', 'hf'))})"
    )


def first_row(source: Source) -> tuple[dict | None, list[str]]:
    """The first decodable row (to recognise the field names) and the columns, where known."""
    from megatron_yuyuan.data.rows import BadRow, decode_line

    for kind, items, _ in iter_batches(source, batch_rows=64):
        for item in items:
            try:
                row = decode_line(item) if kind == "lines" else item
            except BadRow:
                continue
            if isinstance(row, dict):
                return row, list(row)
    return None, []


def iter_batches(source: Source, batch_rows: int = 1000) -> Iterator[Batch]:
    """Batches of at most ``batch_rows`` rows, in the source's order."""
    readers = {
        "jsonl": _jsonl,
        "json": _json_array,
        "csv": _csv,
        "tsv": _csv,
        "parquet": _hf,
        "arrow": _hf,
        "hf": _hf,
        "medquad": _medquad,
    }
    reader = readers[source.format]
    if source.format in ("parquet", "arrow", "hf", "medquad"):
        yield from reader(source, batch_rows)
        return
    for path in source.files:
        yield from reader(path, batch_rows, delimiter="\t" if source.format == "tsv" else ",")


def _jsonl(path: Path, batch_rows: int, **_) -> Iterator[Batch]:
    items, where = [], []
    with _open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            items.append(line)
            where.append(f"{path}:{n}")
            if len(items) == batch_rows:
                yield "lines", items, where
                items, where = [], []
    if items:
        yield "lines", items, where


def _json_array(path: Path, batch_rows: int, **_) -> Iterator[Batch]:
    """A JSON array read element by element with ``raw_decode`` over 1 MiB blocks."""
    decoder = json.JSONDecoder()
    items, where = [], []
    with _open(path, "r", encoding="utf-8-sig") as f:
        buf, pos, eof, n = "", 0, False, 0

        def more() -> bool:
            nonlocal buf, pos, eof
            block = f.read(1 << 20)
            buf, pos, eof = buf[pos:] + block, 0, not block
            return bool(block)

        def skip(chars: str) -> str:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in chars:
                    pos += 1
                if pos < len(buf) or not more():
                    return buf[pos] if pos < len(buf) else ""

        try:
            if skip(" \t\r\n") != "[":
                raise ValueError("does not start with '['")
            pos += 1
            while True:
                c = skip(" \t\r\n,")
                if c == "]":
                    break
                if not c:
                    raise ValueError("ends before its closing ']'")
                while True:
                    try:
                        value, end = decoder.raw_decode(buf, pos)
                        if end == len(buf) and not eof and more():
                            continue  # a number may go on in the next block
                        break
                    except json.JSONDecodeError:
                        if eof or not more():
                            raise
                n += 1
                pos = end
                items.append(value)
                where.append(f"{path}:item {n}")
                if len(items) == batch_rows:
                    yield "rows", items, where
                    items, where = [], []
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise UserError(
                f"--input {path}: not a JSON array of objects ({str(exc)[:120]}); fix the file, "
                f"or give one object per line (JSONL), where a bad line only drops that line"
            ) from exc
    if items:
        yield "rows", items, where


def _csv(path: Path, batch_rows: int, delimiter: str = ",") -> Iterator[Batch]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long answers are legitimate cells
    items, where = [], []
    with _open(path, "r", encoding="utf-8-sig", newline="") as f:
        try:
            reader = csv.DictReader(f, delimiter=delimiter)
            for row in reader:
                row.pop(None, None)  # cells beyond the header
                items.append(row)
                where.append(f"{path}:{reader.line_num}")
                if len(items) == batch_rows:
                    yield "rows", items, where
                    items, where = [], []
        except UnicodeDecodeError as exc:
            raise _not_utf8(path, f"near line {reader.line_num + 1}") from exc
        except csv.Error as exc:
            raise UserError(f"--input {path}:{reader.line_num}: {exc}; fix the file") from exc
    if items:
        yield "rows", items, where


def _not_utf8(path: Path, where: str) -> UserError:
    return UserError(
        f"--input {path}: not UTF-8 text ({where}); save it as UTF-8 (a spreadsheet's 'CSV "
        f"UTF-8' export)"
    )


def csv_columns(path: Path, delimiter: str) -> list[str]:
    """The header's column names, checked: readable as UTF-8, no name twice."""
    with _open(path, "r", encoding="utf-8-sig", newline="") as f:
        try:
            columns = next(csv.reader(f, delimiter=delimiter), [])
        except UnicodeDecodeError as exc:
            raise _not_utf8(path, f"byte {exc.start} of the first block read") from exc
        except csv.Error as exc:
            raise UserError(f"--input {path}: its header cannot be read ({exc})") from exc
    twice = sorted({c for c in columns if columns.count(c) > 1})
    if twice:
        raise UserError(
            f"--input {path}: the column(s) {', '.join(map(repr, twice))} appear more than once "
            f"in the header; rename them so each field is read"
        )
    other = "\t" if delimiter == "," else ","
    if len(columns) == 1 and other in columns[0]:
        fmt = "tsv" if other == "\t" else "csv"
        raise UserError(
            f"--input {path}: its header is one column {columns[0]!r}; the file looks "
            f"{'tab' if fmt == 'tsv' else 'comma'}-separated: pass --format {fmt}"
        )
    return columns


def _open(path: Path, mode: str, **kwargs):
    try:
        return path.open(mode, **kwargs)
    except OSError as exc:
        raise UserError(f"--input {path}: cannot be read ({exc.strerror})") from exc


def open_hf(source: Source, cache_dir: str | None = None):
    """The ``datasets.Dataset`` behind a parquet file, an Arrow folder or a hub name."""
    import logging

    import datasets

    datasets.disable_progress_bars()
    # the hub client logs every retry (a dozen lines offline): the error line says it once
    for name in ("huggingface_hub", "datasets", "fsspec"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        if source.format == "arrow":
            ds = datasets.load_from_disk(str(source.files[0]))
            if isinstance(ds, datasets.DatasetDict):
                raise UserError(
                    f"--input {source.spec}: a DatasetDict ({', '.join(ds)}); give one split's "
                    f"folder, e.g. {Path(source.spec) / next(iter(ds))}"
                )
            return ds
        if source.format == "parquet":
            return datasets.load_dataset(
                "parquet",
                data_files=[str(p) for p in source.files],
                split="train",
                cache_dir=cache_dir,
            )
        name, _, split = source.spec.removeprefix("hf:").partition("@")
        name, _, config = name.partition(":")
        return datasets.load_dataset(name, config or None, split=split or "train")
    except UserError:
        raise
    except Exception as exc:  # datasets reports a missing hub/network in many exception types
        reason = " ".join(str(exc).split())[:240]
        if source.format == "hf":
            raise UserError(
                f"--input {source.spec}: cannot be loaded from the Hugging Face hub "
                f"({type(exc).__name__}: {reason}); check the name and that the hub is "
                f"reachable (offline, save it elsewhere with save_to_disk and pass that folder)"
            ) from exc
        raise UserError(
            f"--input {source.spec}: cannot be read as {source.format} ({type(exc).__name__}: "
            f"{reason})"
        ) from exc


def _hf(source: Source, batch_rows: int) -> Iterator[Batch]:
    with tempfile.TemporaryDirectory(prefix="yuyuan-datasets-") as cache:
        ds = open_hf(source, cache_dir=cache)
        where = f"{source.spec}:row "
        n = 0
        for batch in ds.iter(batch_size=batch_rows):
            columns = list(batch)
            size = len(batch[columns[0]]) if columns else 0
            rows = [{c: batch[c][i] for c in columns} for i in range(size)]
            yield "rows", rows, [f"{where}{n + i + 1}" for i in range(size)]
            n += size
        del ds


def hf_columns(source: Source) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="yuyuan-datasets-") as cache:
        return list(open_hf(source, cache_dir=cache).column_names)


def _medquad(source: Source, batch_rows: int) -> Iterator[Batch]:
    from megatron_yuyuan.data.medquad import find_xml_files, parse_file

    for path in find_xml_files(source.files[0]):
        records, _ = parse_file(path)
        rows = [r.to_json() for r in records]
        for i in range(0, len(rows), batch_rows):
            yield "rows", rows[i : i + batch_rows], [str(path)] * len(rows[i : i + batch_rows])


def columns_of(source: Source) -> tuple[dict | None, list[str]]:
    """(a sample row, the column names) used to recognise the fields before reading."""
    if source.format in ("csv", "tsv"):
        cols = csv_columns(source.files[0], "\t" if source.format == "tsv" else ",")
        return None, cols
    if source.format == "parquet":
        import pyarrow.parquet as pq

        try:
            return None, list(pq.read_schema(source.files[0]).names)
        except Exception as exc:  # pyarrow's errors: ArrowInvalid, OSError, ...
            raise UserError(
                f"--input {source.files[0]}: not a readable Parquet file ({exc})"
            ) from exc
    if source.format in ("arrow", "hf"):
        return None, hf_columns(source)
    if source.format == "medquad":
        return None, ["id", "question", "answer", "qtype", "source", "focus"]
    return first_row(source)
