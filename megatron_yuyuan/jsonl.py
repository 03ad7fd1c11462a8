"""JSON-lines files (questions, references, predictions): strict reading with errors that name the
file and line, and atomic writing."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

from megatron_yuyuan.errors import DataError


def read_jsonl(path: str | Path, required: Sequence[str] = ()) -> list[dict]:
    """Every non-blank line of ``path`` as a JSON object.

    Args:
        required: fields every row must have as a non-empty string (e.g. ``("question",)``).

    Raises:
        DataError: naming ``path:line`` for a missing file, bytes that are not UTF-8, a line that
            is not a JSON object, or a missing field.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory; give a JSON-lines file")
    if not path.is_file():
        raise DataError(f"{path}: not found")
    rows = []
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{path}:{n}: not UTF-8 (byte {exc.start} of the line); save the file as UTF-8"
                ) from exc
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not JSON ({exc.msg}, column {exc.colno})") from exc
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            for field in required:
                value = row.get(field)
                if field not in row:
                    problem = f"no {field!r} field"
                elif not isinstance(value, str):
                    problem = f"{field!r} is {type(value).__name__} {value!r}, not a string"
                elif not value.strip():
                    problem = f"empty {field!r} field"
                else:
                    continue
                raise DataError(f"{path}:{n}: {problem} (every row needs a non-empty string)")
            rows.append(row)
    return rows


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write rows to a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.chmod(tmp, default_file_mode())  # mkstemp's 0600 would hide the file from others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def default_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
