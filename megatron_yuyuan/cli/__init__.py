"""The command-line layer: every CLI is ``main(argv=None)`` in a module of this package, parsing
flags and calling the library. :func:`run_cli` gives them one behaviour on failure.

Users reach them through the ``yuyuan`` command (:mod:`.main`: ``yuyuan finetune ...``) or the
thin wrappers kept for scripts (``python -m megatron_yuyuan.finetune``, ``python
tools/preprocess_medquad.py``, ``python checkpoints_convert/to_hf.py`` ...).
"""

from __future__ import annotations

import argparse
import errno
import math
import sys
from collections.abc import Callable
from pathlib import Path

from megatron_yuyuan.errors import UserError
from megatron_yuyuan.files import directory_problem
from megatron_yuyuan.runtime import launch_rank


def describe_os_error(exc: OSError) -> str:
    """One line naming the path and what to do, for the OS errors users cause."""
    path = exc.filename or ""
    what = {
        errno.EACCES: "permission denied: choose a directory you can write to",
        errno.EPERM: "operation not permitted: choose a directory you can write to",
        errno.EROFS: "read-only file system: choose a writable location",
        errno.ENOTDIR: "a component of the path is a file, not a directory: choose another path",
        errno.EISDIR: "is a directory: give a file path",
        errno.ENOENT: "no such file or directory",
        errno.ENOSPC: "no space left on the device: free space or choose another location",
    }.get(exc.errno, exc.strerror or str(exc))
    return f"{path}: {what}" if path else what


def print_error(message: str) -> None:
    """``error: message`` on stderr, once per job (global rank 0 under torchrun)."""
    if launch_rank() == 0:
        print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)


_invoked_as: str | None = None  # "yuyuan finetune" while the yuyuan command runs a subcommand


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the CLIs' error format: one ``error:`` line (no usage block), exit 2. Its
    ``prog`` is how the user called the command (``yuyuan finetune`` or ``python -m ...``)."""

    def __init__(self, *args, **kwargs):
        if _invoked_as:
            kwargs["prog"] = _invoked_as
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print_error(f"{message} (see {self.prog} --help)")
        sys.exit(2)


def run_cli(body: Callable[[], int | None]) -> int:
    """Run a CLI body: a :class:`UserError` or an OS error becomes one ``error:`` line and exit 2;
    Ctrl-C exits 130. Process groups are torn down either way."""
    try:
        return body() or 0
    except UserError as exc:
        print_error(str(exc))
        return 2
    except OSError as exc:
        print_error(describe_os_error(exc))
        return 2
    except KeyboardInterrupt:
        print_error("interrupted")
        return 130
    finally:
        parallel = sys.modules.get("megatron_yuyuan.parallel")  # never import torch just for this
        if parallel is not None:
            parallel.destroy_distributed()


def add_lora_base_argument(p: argparse.ArgumentParser) -> None:
    """``--lora-base``: where a LoRA checkpoint's base has moved (the commands that load one)."""
    p.add_argument(
        "--lora-base",
        default=None,
        help="a LoRA checkpoint's base checkpoint, where it has moved since training (default: "
        "the recorded path; the fingerprint is checked either way)",
    )


def checkpoint_iteration(text: str) -> str | int:
    """``--iteration``: ``latest``, ``best`` or an iteration number."""
    if text in ("latest", "best"):
        return text
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"must be latest, best or an iteration number, got {text!r}")


def add_iteration_argument(p: argparse.ArgumentParser) -> None:
    """``--iteration``: which checkpoint of a ``--load`` folder (the commands that load one)."""
    p.add_argument(
        "--iteration",
        type=checkpoint_iteration,
        default="latest",
        help="which checkpoint of --load: latest (its pointer), best (the lowest validation "
        "loss, from a run with --save-best valid_loss) or an iteration number",
    )


def pick_iteration(args: argparse.Namespace) -> None:
    """Point ``args.load`` at the checkpoint ``--iteration`` names (``latest`` leaves it)."""
    if args.iteration == "latest":
        return
    if not getattr(args, "load", None):
        raise UserError(f"--iteration {args.iteration}: picks a checkpoint of --load; give --load")
    from megatron_yuyuan.checkpoint.storage import resolve

    args.load = str(resolve(args.load, args.iteration))


# --- argparse types: a bad number is refused at parse time, naming the flag ---------------------
def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def check_writable_file(path: str | Path, flag: str) -> Path:
    """Fail now, not after hours of work, if ``path`` cannot be written: create its directory and
    probe it with a temporary file (removed again)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a directory; give a file path")
    problem = directory_problem(path.parent)
    if problem:
        raise UserError(f"{flag} {path}: cannot write there ({problem})")
    return path


def check_writable_dir(path: str | Path, flag: str) -> Path:
    """Create ``path`` if needed and check that files can be written in it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: is a file; give a directory")
    problem = directory_problem(path)
    if problem:
        raise UserError(f"{flag} {path}: cannot write there ({problem})")
    return path
