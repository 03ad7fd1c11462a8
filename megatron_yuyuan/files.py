"""Reading and writing the user's files safely: strict JSON / JSON-lines reading with errors that
name the file (and line), atomic writes with the umask's file mode, and writable-folder checks."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from megatron_yuyuan.errors import DataError, UserError


class DiskFullError(UserError):
    """An output that did not fit the disk; the unfinished output was removed."""


def read_json_object(path: str | Path, advice: str, error: type = DataError) -> dict:
    """A JSON file holding one object; otherwise ``error`` naming the file, then ``advice``."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc}); {advice}") from exc
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object; {advice}")
    return value


def directory_problem(path: str | Path) -> str | None:
    """Why files cannot be created in ``path`` (made if missing), or None when they can.

    Probes with a uniquely named temporary file: ranks on several nodes may share a PID and the
    folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        return f"{path} is a file, not a directory"
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write_probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTDIR):  # a file sits where a folder must be
            return "a component of the path is a file, not a directory"
        reason = exc.strerror or str(exc)
        return f"{exc.filename}: {reason}" if exc.filename else reason
    return None


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
            if "\\ud" in line.lower() and not is_valid_unicode(row):
                raise DataError(
                    f"{path}:{n}: holds an unpaired surrogate escape (\\udXXX), which is not "
                    f"text; fix or drop that line"
                )
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


def is_valid_unicode(value) -> bool:
    """Whether every string in a JSON value is real text (JSON's \\udXXX escapes can carry lone
    surrogates, which no tokenizer or file encoding accepts)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary file beside ``path`` for the block to write, renamed over ``path`` (with the
    umask's file mode) when the block succeeds and removed when it fails. A write error (a full
    disk) is an ``OSError`` naming ``path``, not the temporary."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, default_file_mode())  # mkstemp's 0600 would hide the file from others
        fsync_file(tmp)  # on disk before the name points at it: a power cut leaves old or new
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename in (None, name):
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise


def fsync_file(path: str | Path) -> None:
    """Flush a written file's data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (renames, new files) to the disk, where the OS allows it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a folder: their renames are durable anyway
    finally:
        os.close(fd)


def tmp_name(path: Path) -> Path:
    """Where one file of a *set* is written before the set is published together (the dataset's
    ``.bin/.idx/.jsonl`` files and their manifest, renamed all or nothing): beside it, so the
    rename is atomic, with this process's id, so a later run can tell a killed run's leftovers
    from a running one's. A single file uses :func:`atomic_path`."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write rows to a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def save_figure_atomic(fig, path: str | Path, dpi: int) -> Path:
    """Save a matplotlib figure beside ``path``, then rename it over ``path``; closes the figure."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic_path(path, suffix=f".tmp{path.suffix}") as tmp:  # the suffix picks the format
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
    return path


_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_WORDS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and everything it was raised from, with the per-rank failures that torch's
    checkpoint writer wraps."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        for failure in (getattr(e, "failures", None) or {}).values():
            todo += [f for f in (failure if isinstance(failure, tuple) else (failure,))]
        todo = [t for t in todo if isinstance(t, BaseException)]


def free_bytes(path: str | Path) -> int | None:
    """Bytes an unprivileged write may still use on the filesystem of ``path`` (or its nearest
    existing parent)."""
    path = Path(path).absolute()
    probe = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    try:
        st = os.statvfs(probe)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def disk_full_error(
    exc: BaseException, target: str | Path, needed: int, what: str
) -> DiskFullError | None:
    """When ``exc`` comes from a full disk (or quota), one error naming the file being written, the
    free space and about how much ``what`` needs, saying that ``target`` (the unfinished output)
    was removed; ``None`` for any other error. Call it *before* removing ``target``: the file that
    was being written is found there, and the free space is measured while the disk is still full.

    Libraries do not always say "no space": torch's zip writer reports a short write as
    "unexpected pos", safetensors as "os error 28". A write error is taken for a full disk when an
    ENOSPC/EDQUOT is among its causes, or its text says so, or less space is free than ``what``
    needs."""
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):  # Ctrl-C stays Ctrl-C
        return None
    target = Path(target)
    free = free_bytes(target)
    errors = list(_causes(exc))
    os_error = next(
        (e for e in errors if isinstance(e, OSError) and e.errno in _NO_SPACE_ERRNOS), None
    )
    said = any(word in str(e) for e in errors for word in _NO_SPACE_WORDS)
    if os_error is None and not said and not (free is not None and free < needed):
        return None
    where = Path(os_error.filename) if os_error is not None and os_error.filename else None
    if where is None and target.is_dir():  # the file written last is the one that did not fit
        files = [p for p in target.rglob("*") if p.is_file()]
        where = max(files, key=lambda p: p.stat().st_mtime_ns) if files else target
    where = where or target
    return DiskFullError(
        f"{where}: no space left on the device while writing {what} "
        f"({'unknown' if free is None else human_bytes(free)} free there when it failed, it "
        f"needs at least {human_bytes(needed)}); free space or choose another location (the "
        f"unfinished "
        f"{target.name} was removed)"
    )


def default_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


# --- outputs that may be replaced ---------------------------------------------------------------
OUTPUTS_MARKER = ".megatron_yuyuan_outputs.json"
"""In a report folder (``evaluate``/``eval_qa --out``): the files our runs wrote there, which a
later run may replace; any other file of the same name is the user's and is never overwritten."""


def claim_outputs(
    folder: Path, names: Iterable[str], flag: str, inputs: Iterable[str | Path] = ()
) -> None:
    """Refuse (one :class:`UserError`) before anything is written when an output ``folder/name``
    is one of this run's ``inputs``, or exists without an earlier run of ours having written it;
    then record ``names`` in the folder's marker."""
    from megatron_yuyuan.errors import UserError

    folder = Path(folder)
    names = sorted(set(names))
    marker = folder / OUTPUTS_MARKER
    ours: set[str] = set()
    if marker.is_file():
        try:
            listed = json.loads(marker.read_text(encoding="utf-8")).get("files", [])
            ours = {n for n in listed if isinstance(n, str) and n == Path(n).name}
        except (ValueError, AttributeError, UnicodeDecodeError):
            ours = set()  # a damaged marker vouches for nothing
    given = {Path(p).resolve() for p in inputs}
    for name in names:
        path = folder / name
        if path.resolve() in given:
            raise UserError(
                f"{flag} {folder}: {path} is one of this run's inputs and would be overwritten "
                f"by its {name}; choose another {flag} (or move the input)"
            )
        if path.exists() and name not in ours:
            raise UserError(
                f"{flag} {folder}: holds a {name} that this tool did not write, which this run "
                f"would replace; move it away or choose another {flag} (nothing was changed)"
            )
    write_text_atomic(marker, json.dumps({"files": sorted(ours | set(names))}, indent=1))


def is_predictions_file(path: Path) -> bool:
    """Whether ``path`` holds predictions written by ``generate`` (its first row's fields)."""
    try:
        with Path(path).open("rb") as f:
            first = json.loads(f.readline() or b"{}")
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and {"prediction", "generation", "finish_reason"} <= set(first)


def protected_reason(path: Path) -> str | None:
    """Why ``path`` must never be written by an output flag: it lies in a checkpoint folder, or
    it is a file of a preprocessed dataset (None when neither)."""
    path = Path(path).resolve()
    for folder in path.parents:
        if (folder / "latest_checkpointed_iteration.txt").is_file() or (
            folder / "model_config.yaml"
        ).is_file():
            return f"it is inside the checkpoint folder {folder}"
    name = path.name
    for suffix in (
        "_meta.json",
        *(f"_{s}.{e}" for s in ("train", "valid", "test") for e in ("jsonl", "bin", "idx")),
    ):
        if name.endswith(suffix) and name != suffix:
            meta = path.with_name(name[: -len(suffix)] + "_meta.json")
            if meta.is_file():
                return f"it is a file of the dataset {meta.with_name(name[: -len(suffix)])}"
    return None
