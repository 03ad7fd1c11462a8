"""The checkpoint *file format*: megatron-core ``dist_checkpointing`` (torch_dist) directories.

The only module that imports ``megatron.core.dist_checkpointing``. It knows paths, the ``latest``
pointer, the saved model config, atomic saves and loading weights; what a *training* checkpoint
adds (optimizer, schedule, RNG, data position) is :mod:`megatron_yuyuan.checkpoint.resume`.
Layout, as in Megatron-LM::

    SAVE/latest_checkpointed_iteration.txt      "100"
    SAVE/iter_0000100/                          dist_checkpointing shards + metadata
    SAVE/iter_0000100/model_config.yaml         its ModelConfig, dtype and padded vocabulary

torch_dist stores global (unsharded) tensors, so a checkpoint saved at one TP/PP loads at another.
The one layout-dependent shape is the embedding's padded vocabulary (a multiple of 128 * TP): when
it differs, the vocabulary rows are loaded whole and re-padded. Saves go to a temporary directory
that is renamed when complete, then the ``latest`` pointer is replaced atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import pickle
import queue
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import yaml
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
from torch.distributed.checkpoint.api import CheckpointException as DCPReadError  # a BaseException

from megatron_yuyuan import parallel
from megatron_yuyuan.config import ModelConfig
from megatron_yuyuan.errors import UserError
from megatron_yuyuan.files import disk_full_error, fsync_dir, fsync_file, write_text_atomic

LATEST = "latest_checkpointed_iteration.txt"
BEST = "best_checkpointed_iteration.txt"
"""Names the iteration with the lowest validation loss (``--save-best valid_loss``)."""
MODEL_CONFIG = "model_config.yaml"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message says why and what to do."""


def iteration_dir(save: Path, iteration: int) -> Path:
    return Path(save) / f"iter_{iteration:07d}"


def has_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / MODEL_CONFIG).is_file() or (path / LATEST).is_file()


def holds_checkpoints(path: str | Path) -> bool:
    """Whether ``path`` holds any checkpoint: a pointer, a config or an ``iter_*`` directory (a
    save's unfinished ``iter_N.tmp`` is no checkpoint)."""
    path = Path(path)
    return has_checkpoint(path) or any(not p.name.endswith(".tmp") for p in path.glob("iter_*"))


def remove_partial_saves(save: str | Path) -> list[Path]:
    """Delete the ``iter_N.tmp`` folders that a killed save left in ``save`` (call while holding
    :func:`save_dir_lock`: no live run is writing them); returns what was removed."""
    removed = []
    for tmp in Path(save).glob("iter_[0-9]*.tmp"):
        if tmp.is_dir():
            shutil.rmtree(tmp)
            removed.append(tmp)
    return removed


def complete_iterations(path: Path) -> list[Path]:
    """The complete ``iter_N`` checkpoints under ``path``, oldest first."""
    return sorted(
        d
        for d in Path(path).glob("iter_[0-9]*")
        if d.is_dir() and not d.name.endswith(".tmp") and (d / MODEL_CONFIG).is_file()
    )


def _pointer_advice(path: Path) -> str:
    found = complete_iterations(path)
    if not found:
        return f"no complete checkpoint is in {path}: remove {LATEST} to start a new run there"
    names = ", ".join(d.name for d in found[-3:])
    return (
        f"complete checkpoints there: {names}; write the iteration number of one of them "
        f"(e.g. {int(found[-1].name.removeprefix('iter_'))}) into {LATEST}"
    )


def _follow(pointer: Path) -> Path:
    """The complete iteration a pointer file names."""
    path = pointer.parent
    text = pointer.read_bytes().decode("utf-8", "replace").strip()
    if not text.isdigit():
        what = "empty" if not text else f"corrupt ({text[:40]!r} is not an iteration number)"
        raise CheckpointError(f"{pointer} is {what}; {_pointer_advice(path)}")
    target = iteration_dir(path, int(text))
    if not (target / MODEL_CONFIG).is_file():
        raise CheckpointError(
            f"{pointer} points to {target.name}, which is missing or incomplete; "
            f"{_pointer_advice(path)}"
        )
    return target


def resolve(load: str | Path, iteration: str | int | None = None) -> Path:
    """A checkpoint directory: ``SAVE`` (follows the latest pointer) or ``SAVE/iter_N`` itself.
    ``iteration`` picks another one of ``SAVE``: ``best`` (the ``--save-best`` pointer) or a
    number (``latest``/None: the latest pointer).

    Raises:
        CheckpointError: no checkpoint, or a pointer that is empty, corrupt or dangling (the
            message lists the complete checkpoints that are there).
    """
    path = Path(load)
    if (path / MODEL_CONFIG).is_file():
        if iteration not in (None, "latest"):
            raise CheckpointError(
                f"--iteration {iteration}: {path} is one checkpoint already; give the folder "
                f"that holds the iterations ({path.parent})"
            )
        return path
    if iteration == "best":
        if not (path / BEST).is_file():
            raise CheckpointError(
                f"--iteration best: {path} has no {BEST} (the run was saved without --save-best "
                f"valid_loss); use --iteration latest or a number: {_pointer_advice(path)}"
            )
        return _follow(path / BEST)
    if isinstance(iteration, int):
        target = iteration_dir(path, iteration)
        if not (target / MODEL_CONFIG).is_file():
            found = [int(d.name.removeprefix("iter_")) for d in complete_iterations(path)]
            raise CheckpointError(
                f"--iteration {iteration}: {path} holds no complete {target.name}; "
                + (
                    f"its checkpoints are the iterations {', '.join(map(str, found))}"
                    if found
                    else "it holds no complete checkpoint"
                )
            )
        return target
    if (path / LATEST).is_file():
        return _follow(path / LATEST)
    raise CheckpointError(
        f"--load {path}: no checkpoint there (neither {LATEST} nor {MODEL_CONFIG})"
    )


def pointed(save: str | Path) -> set[Path]:
    """The iterations the ``latest`` and ``best`` pointers of ``save`` name (those that parse)."""
    found = set()
    for name in (LATEST, BEST):
        value = _pointer_value(Path(save) / name)
        if value is not None:
            found.add(iteration_dir(Path(save), value))
    return found


def prune(save: str | Path, keep_last: int) -> list[Path]:
    """Delete the complete checkpoints of ``save`` older than its newest ``keep_last``, except
    those a pointer names (rank 0, after the new checkpoint and its pointer are complete).
    Each is renamed to ``iter_N.deleting.tmp`` before it is removed: a kill in the middle leaves
    a folder no loader takes for a checkpoint (:func:`remove_partial_saves` finishes it)."""
    keep = pointed(save)
    removed = []
    for ckpt in complete_iterations(Path(save))[:-keep_last]:
        if ckpt in keep:
            continue
        doomed = ckpt.with_name(ckpt.name + ".deleting.tmp")
        ckpt.rename(doomed)
        shutil.rmtree(doomed)
        removed.append(ckpt)
    return removed


def best_valid_loss(save: str | Path) -> float | None:
    """The validation loss of the checkpoint ``best_checkpointed_iteration.txt`` names."""
    if not (Path(save) / BEST).is_file():
        return None
    try:
        return read_info(_follow(Path(save) / BEST)).valid_loss
    except CheckpointError:
        return None  # a damaged or dangling best pointer: the next save replaces it


def mark_best(save: str | Path, iteration: int) -> None:
    """Point ``best_checkpointed_iteration.txt`` at ``iteration`` (rank 0)."""
    write_text_atomic(Path(save) / BEST, str(iteration))


@dataclasses.dataclass
class CheckpointInfo:
    """What ``model_config.yaml`` records."""

    model: ModelConfig
    dtype: torch.dtype
    padded_vocab_size: int
    iteration: int
    training_state: bool = False
    """Optimizer, LR schedule and RNG states are saved too (a resumable training checkpoint)."""
    layout: tuple[int, int, int] = (1, 1, 1)
    """(TP, PP, DP) it was saved at."""
    lora: dict | None = None
    """A LoRA checkpoint (adapters only): its settings, base checkpoint and base fingerprint."""
    prompt_template: str | None = None
    """The prompt template of the data it was trained on (None: the default, or unknown)."""
    valid_loss: float | None = None
    """The validation loss at this iteration, when the run computed one for the save."""


LORA_KEYS = {"lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "base"}
LORA_KEYS |= {"base_fingerprint"}


def _check_lora_record(record, path: Path) -> dict | None:
    """A LoRA checkpoint's ``lora`` block, checked for what the loaders rely on."""
    from megatron_yuyuan.config import LoraConfig
    from megatron_yuyuan.errors import ConfigError

    problem = None
    if not isinstance(record, dict) or set(record) != LORA_KEYS:
        problem = f"needs exactly the fields {sorted(LORA_KEYS)}"
    elif not all(isinstance(record[k], str) and record[k] for k in ("base", "base_fingerprint")):
        problem = "base and base_fingerprint must be non-empty strings"
    else:
        try:
            settings = LoraConfig(**{k: v for k, v in record.items() if k.startswith("lora_")})
            if not settings.enabled:
                problem = "lora_rank must be >= 1"
        except (ConfigError, TypeError) as exc:
            problem = str(exc)
    if problem:
        raise CheckpointError(
            f"{path}: its lora block is damaged ({problem}); use another checkpoint"
        )
    return record


def recorded_decoding(ckpt_dir: Path) -> dict:
    """The decoding settings the run's end-of-training evaluation used (``max_new_tokens``,
    ``repetition_penalty``, ``no_repeat_ngram_size``), from the iteration's ``run_config.yaml``;
    empty when it records none (a converted checkpoint) or cannot be read."""
    path = Path(ckpt_dir) / "run_config.yaml"
    try:
        train = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("train") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return {}
    kinds = {"max_new_tokens": int, "repetition_penalty": float, "no_repeat_ngram_size": int}
    out = {}
    for name, kind in kinds.items():
        value = train.get(f"eval_{name}")
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = kind(value)
    return out


def read_info(ckpt_dir: Path) -> CheckpointInfo:
    path = Path(ckpt_dir) / MODEL_CONFIG
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        info = CheckpointInfo(
            model=ModelConfig(**raw["model"]),
            dtype=_DTYPES[raw["dtype"]],
            padded_vocab_size=int(raw["padded_vocab_size"]),
            iteration=int(raw["iteration"]),
            training_state=bool(raw.get("training_state", False)),
            layout=tuple(raw.get("layout", (1, 1, 1))),
            valid_loss=None if raw.get("valid_loss") is None else float(raw["valid_loss"]),
        )
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} not found: {ckpt_dir} is not a checkpoint") from exc
    except (yaml.YAMLError, UnicodeDecodeError, TypeError, KeyError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is corrupt ({type(exc).__name__}: {exc}); use another checkpoint"
        ) from exc
    if "lora" in raw:
        info.lora = _check_lora_record(raw["lora"], path)
    if raw.get("prompt_template") is not None:
        from megatron_yuyuan.prompts import PromptTemplate

        try:
            info.prompt_template = PromptTemplate.parse(raw["prompt_template"]).text
        except UserError as exc:
            raise CheckpointError(
                f"{path}: its prompt_template is damaged ({exc}); fix or remove that line"
            ) from exc
    return info


def _write_info(ckpt_dir: Path, info: CheckpointInfo) -> None:
    (ckpt_dir / MODEL_CONFIG).write_text(
        yaml.safe_dump(
            {
                "model": dataclasses.asdict(info.model),
                "dtype": str(info.dtype).removeprefix("torch."),
                "padded_vocab_size": info.padded_vocab_size,
                "iteration": info.iteration,
                "training_state": info.training_state,
                "layout": list(info.layout),
                **({"lora": info.lora} if info.lora else {}),
                **({"prompt_template": info.prompt_template} if info.prompt_template else {}),
                **({"valid_loss": info.valid_loss} if info.valid_loss is not None else {}),
            },
            sort_keys=False,
        )
    )


class _SaveCancelled(Exception):
    """Raised inside a writer thread, between two items, once the save is abandoned."""


class _CancellableItems(list):
    """A bucket's item list whose iteration raises :class:`_SaveCancelled` once ``stop`` is set,
    so that a writer thread ends between two tensors instead of writing gigabytes more."""

    def __init__(self, items: list, stop: threading.Event) -> None:
        super().__init__(items)
        self.stop = stop

    def __iter__(self):
        for item in list.__iter__(self):
            if self.stop.is_set():
                raise _SaveCancelled("checkpoint save abandoned")
            yield item


def _write_buckets_in_threads(
    transforms: list,
    rank: int,
    write_buckets: list,
    results_queue: queue.Queue,
    stop: threading.Event | None = None,
) -> None:
    """Write megatron-core's planned shard files, a thread per file, and hand the results back the
    way its own multi-process writer does (a dict ``{bucket: [WriteResult]}`` or the exception).
    File writes release the GIL, so the threads still write in parallel.

    On Ctrl-C (or a writer's error) the other writers stop after the item they are writing and are
    joined before the exception leaves: a thread still inside torch's C++ code when the interpreter
    exits aborts the process ("terminate called without an active exception")."""
    del rank  # part of megatron-core's calling convention
    stop = stop or threading.Event()  # a background save's owner may set it to abandon it
    local: queue.Queue = queue.Queue()
    done: queue.Queue = queue.Queue()
    threads = []
    try:
        for index, (path, key, (byte_items, tensor_items)) in enumerate(write_buckets):
            bucket = (
                path,
                key,
                (_CancellableItems(byte_items, stop), _CancellableItems(tensor_items, stop)),
            )
            done.put(index)  # the writer takes one item and marks it done when it finishes
            write = functools.partial(
                filesystem_async.FileSystemWriterAsync.write_preloaded_data,
                transforms,
                index,
                bucket,
                local,
                done,
                True,  # fsync: a checkpoint that survives a power cut
            )
            threads.append(threading.Thread(target=write, name=f"ckpt-writer-{index}", daemon=True))
            threads[-1].start()
        results: dict | Exception = {}
        for _ in threads:
            index, result = local.get()  # a writer puts its exception here too, never raises
            if isinstance(result, Exception):
                results = result
                break
            results[index] = result
        results_queue.put(results)
    finally:
        stop.set()  # a no-op for writers that are done
        for thread in threads:
            thread.join()


def _bytes_to_write(sharded: dict) -> int:
    """Bytes of the tensors this rank writes (its main replicas), for a full disk's message."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import is_main_replica

    return sum(
        v.data.numel() * v.data.element_size()
        for v in nested_values(sharded)
        if isinstance(v, ShardedTensor) and v.data is not None and is_main_replica(v.replica_id)
    )


class _ThreadedSave(TorchDistSaveShardedStrategy):
    """megatron-core's ``torch_dist`` save with the shard files written by threads of this process.

    megatron-core forks a writer process per file for every save and collects their results through
    a ``multiprocessing`` Manager (a spawned server process). A fork from a process that runs
    threads can deadlock (a save then hangs for good); Ctrl-C during a save left the trainer
    blocked on the writers' queue; a killed trainer left the writers and the Manager running with
    hundreds of MiB each. Threads have none of these: they die with the process. The files are
    identical.
    """

    def __init__(self) -> None:
        super().__init__("torch_dist", 1)
        # megatron-core's writer returns results through this module-level queue, which it would
        # create as a Manager queue on first use: one in-process queue serves our threads.
        if filesystem_async._results_queue is None:
            filesystem_async._results_queue = queue.Queue()

    def _get_save_and_finalize_callbacks(self, writer, save_state_dict_ret):
        request = super()._get_save_and_finalize_callbacks(writer, save_state_dict_ret)
        if request.async_fn is None:  # nothing to write on this rank
            return request
        transforms = [writer.transforms] if hasattr(writer, "transforms") else []
        return request._replace(async_fn=functools.partial(_write_buckets_in_threads, transforms))


class _Transaction:
    """One checkpoint's way from ``iter_N.tmp`` to ``iter_N`` named by the ``latest`` pointer,
    and its undoing when anything fails on the way (Ctrl-C, a full disk, a failed rank): no half
    checkpoint stays and the previous one remains the one ``latest`` names."""

    def __init__(self, save: Path, iteration: int, info: CheckpointInfo, nbytes: int) -> None:
        self.final = iteration_dir(save, iteration)
        self.tmp = self.final.with_name(self.final.name + ".tmp")
        self.pointer = save / LATEST
        self.iteration, self.info, self.nbytes = iteration, info, nbytes
        self.rank0 = parallel.is_rank_0()
        self.renamed = False

    def begin(self) -> None:
        if self.rank0:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir(parents=True)
        parallel.barrier()

    def commit(self, run_config: dict | None, extra_files: Callable[[Path], None] | None) -> None:
        """Once every rank's shards are written: the config files, the rename, the pointer."""
        parallel.barrier()
        if not self.rank0:
            return
        _write_info(self.tmp, self.info)
        if extra_files is not None:  # e.g. tokenizer files: inside before the rename, too
            extra_files(self.tmp)
        if run_config is not None:
            (self.tmp / "run_config.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))
        for small in (p for p in self.tmp.iterdir() if p.is_file() and p.suffix != ".distcp"):
            fsync_file(small)  # the shards were; the configs and metadata too, then the folder
        fsync_dir(self.tmp)
        # An iteration saved again (a resume from an older one) is moved aside, not deleted
        # first: the pointer may name it until the new one is in place.
        replaced = self.final.with_name(self.final.name + ".replaced.tmp")
        if self.final.exists():
            self.final.rename(replaced)
        self.tmp.rename(self.final)
        self.renamed = True
        fsync_dir(self.final.parent)
        shutil.rmtree(replaced, ignore_errors=True)
        write_text_atomic(self.pointer, str(self.iteration))

    def undo(self, exc: BaseException) -> None:
        """Remove what this save left and re-raise ``exc`` (a full disk as one clear error)."""
        unfinished = self.final if self.renamed else self.tmp
        full = disk_full_error(exc, unfinished, self.nbytes, "the checkpoint")
        if self.rank0:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if self.renamed and _pointer_value(self.pointer) != self.iteration:  # not moved
                shutil.rmtree(self.final, ignore_errors=True)
        if full is not None:
            raise full from exc
        raise exc


def _snapshot(write_buckets: list) -> list:
    """Copies of the tensors a background save writes: training goes on changing the originals
    (megatron-core's preload copies GPU tensors to host memory but leaves CPU tensors shared)."""
    return [
        (path, key, (byte_items, [(item, t.detach().to("cpu", copy=True)) for item, t in tensors]))
        for path, key, (byte_items, tensors) in write_buckets
    ]


class PendingSave:
    """A checkpoint whose shard files background threads write while training goes on. Every
    rank calls :meth:`ready` (cheap: one all-reduce) and, once it is true or a save must be
    complete, :meth:`finish`; :meth:`abandon` stops the writers when the run ends in an error."""

    def __init__(self, transaction: _Transaction, request, commit_args: tuple):
        self.transaction, self.request, self.commit_args = transaction, request, commit_args
        self.error: BaseException | None = None
        self.stop = threading.Event()
        args = list(request.async_fn_args)
        self.thread = None
        if request.async_fn is not None:  # this rank has shards to write
            args[1] = _snapshot(args[1])
            self.thread = threading.Thread(
                target=self._write, args=(args,), name="ckpt-background", daemon=True
            )
            self.thread.start()

    @property
    def final(self) -> Path:
        return self.transaction.final

    def _write(self, args: list) -> None:
        try:
            self.request.async_fn(*args, stop=self.stop)
        except BaseException as exc:  # handed to finish(), on the training thread
            self.error = exc

    def ready(self) -> bool:
        """Whether every rank's writers are done (collective)."""
        mine = self.thread is None or not self.thread.is_alive()
        return bool(parallel.all_ranks_true(mine))

    def finish(self) -> Path:
        """Wait for the writers, then complete the checkpoint as a synchronous save does
        (collective). Returns its folder."""
        try:
            if self.thread is not None:
                self.thread.join()
            if not parallel.all_ranks_true(self.error is None):
                raise self.error or CheckpointError(
                    f"{self.transaction.tmp}: another rank failed to write its part"
                )
            for fn in self.request.finalize_fns:  # megatron-core's metadata (collective)
                fn()
            self.transaction.commit(*self.commit_args)
        except BaseException as exc:
            self.transaction.undo(exc)
        parallel.barrier()
        return self.final

    def abandon(self) -> None:
        """Stop the writers between two tensors and remove the unfinished folder (this rank's
        part: called while the run is failing, without collectives)."""
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        while True:  # the writers' result must not reach the next save
            try:
                filesystem_async._results_queue.get_nowait()
            except (queue.Empty, AttributeError):
                break
        if self.transaction.rank0:
            shutil.rmtree(self.transaction.tmp, ignore_errors=True)


def save_sharded(
    save: str | Path,
    sharded: dict,
    model_cfg: ModelConfig,
    iteration: int,
    padded_vocab_size: int,
    dtype: torch.dtype,
    training_state: bool = False,
    layout: tuple[int, int, int] = (1, 1, 1),
    run_config: dict | None = None,
    extra_files: Callable[[Path], None] | None = None,
    lora: dict | None = None,
    prompt_template: str | None = None,
    valid_loss: float | None = None,
    background: bool = False,
) -> Path | PendingSave:
    """Save a sharded state dict as checkpoint ``iteration`` under ``save``.

    Written to ``iter_N.tmp`` first, renamed when complete, then ``latest`` is updated. An
    interrupt or an error during the write removes the temporary: the previous checkpoint stays the
    one ``latest`` names. With ``background``, the tensors are copied and a :class:`PendingSave`
    is returned at once: the files are written while the caller goes on, and the rename and the
    pointer wait for :meth:`PendingSave.finish` on every rank.
    """
    info = CheckpointInfo(
        model_cfg,
        dtype,
        padded_vocab_size,
        iteration,
        training_state,
        layout,
        lora,
        prompt_template,
        valid_loss,
    )
    transaction = _Transaction(Path(save), iteration, info, _bytes_to_write(sharded))
    try:
        transaction.begin()
        if background:
            request = dist_checkpointing.save(
                sharded,
                str(transaction.tmp),
                sharded_strategy=_ThreadedSave(),
                async_sharded_save=True,
            )
            return PendingSave(transaction, request, (run_config, extra_files))
        dist_checkpointing.save(
            sharded,
            str(transaction.tmp),
            sharded_strategy=_ThreadedSave(),
        )
        transaction.commit(run_config, extra_files)
    except BaseException as exc:
        transaction.undo(exc)
    parallel.barrier()
    return transaction.final


def _pointer_value(pointer: Path) -> int | None:
    try:
        return int(pointer.read_text(encoding="utf-8").strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


LOCK_FILE = ".megatron_yuyuan.lock"
"""Inside a --save folder while a run holds it: who holds it (the lock itself is on the folder)."""


@contextlib.contextmanager
def save_dir_lock(save: str | Path | None) -> Iterator[Callable[[], None]]:
    """Hold an exclusive ``flock`` on the folder ``save`` (when given) while the block runs, so
    that two runs can never write one checkpoint folder. The lock dies with its process: a run
    killed by SIGKILL leaves no stale lock. Yields ``announce()``, which writes who holds it into
    the folder (once the run has passed its checks). Raises :class:`CheckpointError` naming the
    holder. A folder that cannot be opened is left to the caller's own checks."""
    import fcntl
    import socket

    folder = Path(save) if save else None
    try:
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY) if folder is not None else None
    except OSError:
        fd = None
    if fd is None:
        yield lambda: None
        return
    info = folder / LOCK_FILE
    announced = False

    def announce() -> None:
        nonlocal announced
        write_text_atomic(info, f"PID {os.getpid()} on {socket.gethostname()}\n")
        announced = True

    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = info.read_text(encoding="utf-8").strip()
            except OSError:
                holder = "another process"
            raise CheckpointError(
                f"--save {save}: another run ({holder}) is writing checkpoints there; wait for "
                f"it to finish or choose another --save"
            ) from None
        except OSError as exc:  # a filesystem without locks (some NFS/Lustre mounts): go on
            print(
                f"warning: --save {save}: the filesystem refuses locks ({exc.strerror}); nothing "
                f"stops a second run from writing there at the same time",
                file=sys.stderr,
                flush=True,
            )
        yield announce
    finally:
        if announced:
            info.unlink(missing_ok=True)
        os.close(fd)  # releases the lock


def check_new_save_dir(save: Path, flag: str = "--save") -> None:
    """A conversion writes iteration 0 and the ``latest`` pointer: never into a directory that
    already holds checkpoints (a training run there would silently restart from iteration 0)."""
    save = Path(save)
    if save.exists() and not save.is_dir():
        raise CheckpointError(f"{flag} {save}: is a file; give a directory")
    if holds_checkpoints(save):
        raise CheckpointError(
            f"{flag} {save}: already holds checkpoints (its {LATEST} would be rewound to the "
            f"converted weights); choose a new directory"
        )


def _load(sharded: dict, ckpt: Path) -> dict:
    """``dist_checkpointing.load``; a checkpoint whose tensors do not fit the request (shapes,
    missing keys) is one CheckpointError, not megatron's traceback."""
    try:
        return dist_checkpointing.load(sharded, str(ckpt))
    except CheckpointingException as exc:
        first = " ".join(str(exc).split())[:300]
        if not (Path(ckpt) / ".metadata").is_file():
            raise damaged(ckpt, exc) from exc
        raise CheckpointError(
            f"{ckpt}: its tensors do not fit the model its model_config.yaml describes ({first}); "
            f"the checkpoint is damaged or incomplete: use another one"
        ) from exc
    except _READ_ERRORS as exc:
        raise damaged(ckpt, exc) from exc


_READ_ERRORS = (EOFError, AssertionError, RuntimeError, OSError, ValueError, KeyError)
_READ_ERRORS += (pickle.UnpicklingError, TypeError, IndexError, DCPReadError)
"""What reading a damaged checkpoint raises from torch / megatron (a truncated shard: EOFError,
a zeroed one: UnpicklingError, a missing .metadata: AssertionError, a bad common.pt:
RuntimeError)."""


def damaged(ckpt: Path, exc: BaseException) -> CheckpointError:
    """One error naming the damaged file of ``ckpt`` where it can be told, and an older complete
    iteration of the same run to fall back to."""
    ckpt = Path(ckpt)
    culprit = None
    if not (ckpt / ".metadata").is_file():
        culprit = f"{ckpt / '.metadata'} is missing"
    elif (ckpt / "common.pt").is_file() and not _is_zip(ckpt / "common.pt"):
        culprit = f"{ckpt / 'common.pt'} is not a torch file"
    else:
        culprit = _short_shard(ckpt)
    if isinstance(exc, DCPReadError):  # torch wraps each rank's error: show the first one
        failures = list(getattr(exc, "failures", {}).values())
        inner = failures[0][0] if failures and isinstance(failures[0], tuple) else None
        exc = inner if isinstance(inner, BaseException) else exc
    what = " ".join(str(exc).split())[:120] if not isinstance(exc, DCPReadError) else ""
    reason = culprit or (
        f"one of its shard files (__*.distcp) holds damaged bytes ({type(exc).__name__}"
        f"{': ' + what if what else ''})"
    )
    older = [
        d.name
        for d in complete_iterations(ckpt.parent)
        if d.name < ckpt.name and d.name[5:].isdigit()
    ]
    advice = (
        f"the older complete checkpoint {older[-1]} is there: write {int(older[-1][5:])} into "
        f"{ckpt.parent / LATEST} (or --load {ckpt.parent / older[-1]}) to use it"
        if older
        else "no older complete checkpoint is beside it: use another checkpoint"
    )
    return CheckpointError(f"{ckpt.name} of {ckpt.parent} is damaged: {reason}; {advice}")


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04" and path.stat().st_size > 22


def _short_shard(ckpt: Path) -> str | None:
    """A shard file shorter than the byte ranges its ``.metadata`` records (truncated)."""
    try:
        from torch.distributed.checkpoint import FileSystemReader

        storage = FileSystemReader(str(ckpt)).read_metadata().storage_data
        need: dict[str, int] = {}
        for info in storage.values():
            need[info.relative_path] = max(
                need.get(info.relative_path, 0), info.offset + info.length
            )
    except Exception:  # noqa: BLE001 - an unreadable .metadata: say what we know
        return f"{ckpt / '.metadata'} cannot be read"
    for rel, size in sorted(need.items()):
        path = ckpt / rel
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size < size:
            return f"{path} is truncated ({path.stat().st_size:,} of {size:,} bytes)"
    return None


def load_sharded(sharded: dict, ckpt: Path) -> dict:
    """megatron's ``dist_checkpointing.load`` of a sharded state dict from ``ckpt``."""
    return _load(sharded, ckpt)


def stored_tensor_shapes(ckpt: Path) -> dict[str, tuple[int, ...]]:
    """Global shape of every tensor a checkpoint holds, by key (metadata only, nothing loaded)."""
    try:
        meta = dist_checkpointing.load_tensors_metadata(str(ckpt))
    except (CheckpointingException, *_READ_ERRORS) as exc:
        raise damaged(ckpt, exc) from exc
    return {k: tuple(v.global_shape) for k, v in meta.items() if isinstance(v, ShardedTensor)}


def rank_object(key: str, data, layout: parallel.Layout) -> ShardedObject:
    """A per-rank object in a checkpoint, placed by the rank's (PP, TP, DP) coordinates."""
    return ShardedObject(
        key,
        data,
        (layout.pp, layout.tp, layout.dp),
        (layout.pp_rank, layout.tp_rank, layout.dp_rank),
        replica_id=0,
    )


def check_compatible(saved: ModelConfig, model_cfg: ModelConfig, where: Path) -> None:
    """The checkpoint's architecture must equal the model's (dropout and init may differ)."""
    shape = (
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "ffn_size",
        "max_position_embeddings",
        "vocab_size",
    )
    diffs = [
        f"{name}: checkpoint {getattr(saved, name)} vs config {getattr(model_cfg, name)}"
        for name in shape
        if getattr(saved, name) != getattr(model_cfg, name)
    ]
    if diffs:
        raise CheckpointError(
            f"{where}: the checkpoint's model does not match the config ("
            + "; ".join(diffs)
            + "); pass the matching --config"
        )


def load_model(
    load: str | Path,
    model: torch.nn.Module,
    model_cfg: ModelConfig,
    layout: parallel.Layout,
    only: Callable[[str], bool] | None = None,
) -> tuple[CheckpointInfo, dict[str, torch.Tensor]]:
    """Load weights into this rank's ``model`` at any TP/PP (every rank calls it).

    Returns the checkpoint's info and this rank's tensors *in the checkpoint's dtype* (an fp16 or
    fp32 checkpoint loaded into a bf16 model keeps its precision there, for the fp32 main weights).
    ``only`` restricts loading to the state-dict keys it accepts (LoRA: base weights from one
    checkpoint, adapters from another).
    """
    ckpt = resolve(load)
    info = read_info(ckpt)
    check_compatible(info.model, model_cfg, ckpt)
    # Embedding rows are padded to a multiple of 128 * TP, so a checkpoint saved at another TP
    # has another row count: megatron marks those tensors allow_shape_mismatch and copies the
    # overlapping rows (the pad rows beyond the real vocabulary are zeros either way).
    request = model.sharded_state_dict()
    if only is not None:
        request = {k: v for k, v in request.items() if only(k)}
    for sh in request.values():
        if isinstance(sh, ShardedTensor) and sh.data.dtype != info.dtype:
            sh.data = torch.empty(sh.local_shape, dtype=info.dtype, device=sh.data.device)
    loaded = _load(request, ckpt)
    # The result also carries the checkpoint's common (non-tensor) state, e.g. the optimizer's.
    state = {k: loaded[k] for k in request if not k.endswith("_extra_state")}
    missing, unexpected = model.load_state_dict(state, strict=False)  # casts to the model dtype
    missing = [k for k in missing if not k.endswith("_extra_state") and (only is None or only(k))]
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}: missing keys {missing}, unexpected keys {unexpected}")
    return info, state


def load_full_state(
    load: str | Path, template: torch.nn.Module, only: Callable[[str], bool] | None = None
) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """Every weight of a checkpoint as full tensors, named as in ``template``'s state dict.

    ``template`` is a model built (on the meta device is enough) at TP=1, PP=1 with the
    checkpoint's padded vocabulary; only its sharded-state-dict keys are used (those ``only``
    accepts), so memory is one copy of the weights in the checkpoint's dtype.
    """
    ckpt = resolve(load)
    info = read_info(ckpt)
    sharded = {}
    for name, sh in template.sharded_state_dict().items():
        if isinstance(sh, ShardedTensor) and (only is None or only(name)):
            sh.data = torch.empty(sh.local_shape, dtype=info.dtype)
            sharded[name] = sh
    loaded = _load(sharded, ckpt)
    return {name: loaded[name] for name in sharded}, info
