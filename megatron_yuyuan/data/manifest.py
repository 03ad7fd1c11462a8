"""A dataset prefix's manifest: ``{prefix}_meta.json`` lists the size and SHA-256 of every file
of the dataset, and is published last by the preprocessors, so a reader that finds every file
matching it knows they come from one complete run; a run killed while publishing leaves a
mismatch that every reader reports instead of mixing two runs' splits. Light (no torch or
megatron imports): evaluation checks the JSONL files it reads too."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from megatron_yuyuan.errors import DataError
from megatron_yuyuan.files import read_json_object, tmp_name

SPLITS = ("train", "valid", "test")


def file_digest(path: Path) -> dict:
    """Size and SHA-256 of a file (the manifest entry)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"bytes": Path(path).stat().st_size, "sha256": h.hexdigest()}


def split_of(split_prefix: str | Path) -> tuple[str, str]:
    """``data/mq_train`` -> (``data/mq``, ``train``); the prefix and split a file prefix names."""
    text = str(split_prefix)
    for split in SPLITS:
        if text.endswith(f"_{split}"):
            return text[: -len(split) - 1], split
    raise DataError(
        f"{split_prefix}: not a split of a preprocessed dataset (expected PREFIX_train, "
        f"PREFIX_valid or PREFIX_test, as written by tools.preprocess_qa or "
        f"tools.preprocess_medquad)"
    )


def verify_files(prefix: str | Path, names: Sequence[str]) -> dict:
    """Check that files ``names`` (relative to the dataset's directory) match the manifest in
    ``{prefix}_meta.json``; returns the meta.

    Raises:
        DataError: the meta file is missing or unreadable, or a file is missing, truncated or from
            another preprocessing run.
    """
    meta = read_meta(prefix)
    manifest = meta.get("files")
    if not isinstance(manifest, dict):
        raise DataError(
            f"{prefix}_meta.json has no file manifest (written by an older version): "
            f"{rerun_advice(prefix)}"
        )
    folder = Path(f"{prefix}_meta.json").parent
    for name in names:
        path = folder / name
        want = manifest.get(name)
        if want is None:
            raise DataError(f"{path}: not listed in {prefix}_meta.json")
        if not path.is_file():
            raise DataError(f"{path} is missing; {rerun_advice(prefix)}")
        got = file_digest(path)
        if got != want:
            what = (
                f"has {got['bytes']} bytes, the manifest says {want['bytes']} (truncated?)"
                if got["bytes"] != want["bytes"]
                else "differs from the run that wrote the manifest"
            )
            raise DataError(
                f"{path} {what}: the dataset's files come from different or interrupted runs; "
                f"{rerun_advice(prefix)}"
            )
    return meta


def verify_split(split_prefix: str | Path) -> dict:
    """Check ``{split_prefix}.bin/.idx`` against the dataset's manifest; returns the meta."""
    prefix, _ = split_of(split_prefix)
    name = Path(split_prefix).name
    return verify_files(prefix, [f"{name}.bin", f"{name}.idx"])


def read_meta(prefix: str | Path) -> dict:
    """The ``{prefix}_meta.json`` written beside the splits (tokenizer, EOS id, vocab size)."""
    path = Path(f"{prefix}_meta.json")
    if not path.is_file():
        raise DataError(
            f"{path} not found: it is written next to the {prefix}_{{train,valid,test}} files "
            f"by the preprocessing; {rerun_advice(prefix)}"
        )
    return read_json_object(path, rerun_advice(prefix))


def publish(pending: dict[Path, Path], last: Path) -> None:
    """Rename each temporary file of ``pending`` ({final: temporary}) over its final name, the
    manifest ``last`` at the end: all or nothing. Earlier files are moved aside first and put
    back if any rename fails (a folder or an immutable file in the way, Ctrl-C), so a failed
    publish leaves the earlier set as it was, never a mix of two runs."""
    for final in pending:
        if final.is_dir():
            raise DataError(
                f"{final}: is a directory where the dataset's file goes; move it away (nothing "
                f"was changed)"
            )
    order = [f for f in pending if f != last] + [last]
    aside: dict[Path, Path] = {}
    placed: list[Path] = []
    try:
        for final in order:
            if final.exists():
                backup = final.with_name(f".{final.name}.old.tmp{os.getpid()}")
                final.replace(backup)
                aside[final] = backup
            pending[final].replace(final)
            placed.append(final)
    except BaseException as exc:
        for final in placed:
            final.unlink(missing_ok=True)
        for final, backup in aside.items():
            backup.replace(final)
        if isinstance(exc, OSError):
            where = next((f for f in order if f not in placed), last)
            raise DataError(
                f"{where}: cannot be replaced ({exc.strerror or exc}); nothing was changed: "
                f"fix its permissions or choose another --output-prefix"
            ) from exc
        raise
    for backup in aside.values():
        backup.unlink(missing_ok=True)


def publish_dataset(prefix: str | Path, pending: dict[Path, Path], meta: dict) -> None:
    """Write ``{prefix}_meta.json`` (``meta`` plus the manifest of every file in ``pending``)
    to its temporary name, added to ``pending``, then :func:`publish` the whole set."""
    manifest = {final.name: file_digest(tmp) for final, tmp in pending.items()}
    path = Path(f"{prefix}_meta.json")
    pending[path] = tmp_name(path)
    pending[path].write_text(json.dumps({**meta, "files": manifest}, indent=1))
    publish(pending, path)


def rerun_advice(prefix: str | Path) -> str:
    """What recreates dataset ``prefix``: the tool that wrote it, when its meta says so."""
    report = {}
    try:
        report = json.loads(Path(f"{prefix}_meta.json").read_text(encoding="utf-8"))["report"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if isinstance(report, dict) and "inputs" in report:
        return f"rerun python -m tools.preprocess_qa (same --input flags) --output-prefix {prefix}"
    if isinstance(report, dict) and "files" in report:
        return f"rerun python -m tools.preprocess_medquad --output-prefix {prefix}"
    return (
        f"rerun the preprocessing that wrote it with --output-prefix {prefix} (python -m "
        f"tools.preprocess_qa, or tools.preprocess_medquad for MedQuAD)"
    )


def check_member(path: str | Path) -> dict | None:
    """When ``path`` is a file of a preprocessed dataset (``P_train.jsonl`` beside
    ``P_meta.json``...), check it against the manifest; returns the meta, or None for a file
    that belongs to no dataset."""
    path = Path(path)
    for split in SPLITS:
        for ext in (".jsonl", ".bin", ".idx"):
            suffix = f"_{split}{ext}"
            if path.name.endswith(suffix) and path.name != suffix:
                prefix = path.with_name(path.name[: -len(suffix)])
                if Path(f"{prefix}_meta.json").is_file():
                    return verify_files(prefix, [path.name])
    return None
