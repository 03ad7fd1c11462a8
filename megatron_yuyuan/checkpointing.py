"""Model checkpoints in megatron-core ``dist_checkpointing`` (torch_dist) format.

The only module that imports ``megatron.core.dist_checkpointing``. Layout, as in Megatron-LM::

    SAVE/latest_checkpointed_iteration.txt      "100"
    SAVE/iter_0000100/                          dist_checkpointing shards + metadata
    SAVE/iter_0000100/model_config.yaml         the ModelConfig, dtype and padded vocab it was saved with

torch_dist stores global (unsharded) tensors, so a checkpoint saved at one TP/PP loads at another.
The one layout-dependent shape is the embedding's padded vocabulary (a multiple of 128 * TP): when it
differs, the vocabulary rows are loaded whole and re-padded. Saves go to a temporary directory that
is renamed when complete, then the ``latest`` pointer is replaced atomically.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import yaml
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

from megatron_yuyuan import parallel
from megatron_yuyuan.config import ModelConfig
from megatron_yuyuan.errors import UserError

LATEST = "latest_checkpointed_iteration.txt"
MODEL_CONFIG = "model_config.yaml"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message says why and what to do."""


def iteration_dir(save: Path, iteration: int) -> Path:
    return Path(save) / f"iter_{iteration:07d}"


def has_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / MODEL_CONFIG).is_file() or (path / LATEST).is_file()


def resolve(load: str | Path) -> Path:
    """A checkpoint directory: ``SAVE`` (follows the latest pointer) or ``SAVE/iter_N`` itself."""
    path = Path(load)
    if (path / MODEL_CONFIG).is_file():
        return path
    latest = path / LATEST
    if latest.is_file():
        return iteration_dir(path, int(latest.read_text().strip()))
    raise CheckpointError(
        f"--load {path}: no checkpoint there (neither {LATEST} nor {MODEL_CONFIG})"
    )


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


def read_info(ckpt_dir: Path) -> CheckpointInfo:
    raw = yaml.safe_load((Path(ckpt_dir) / MODEL_CONFIG).read_text())
    return CheckpointInfo(
        model=ModelConfig(**raw["model"]),
        dtype=_DTYPES[raw["dtype"]],
        padded_vocab_size=raw["padded_vocab_size"],
        iteration=raw["iteration"],
        training_state=raw.get("training_state", False),
        layout=tuple(raw.get("layout", (1, 1, 1))),
    )


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
            },
            sort_keys=False,
        )
    )


def save_model(
    save: str | Path,
    model: torch.nn.Module,
    model_cfg: ModelConfig,
    iteration: int,
    padded_vocab_size: int,
) -> Path:
    """Save this rank's part of ``model`` (every rank calls it); returns the iteration directory."""
    dtype = next(model.parameters()).dtype
    return save_sharded(
        save, model.sharded_state_dict(), model_cfg, iteration, padded_vocab_size, dtype
    )


def save_sharded(
    save: str | Path,
    sharded: dict,
    model_cfg: ModelConfig,
    iteration: int,
    padded_vocab_size: int,
    dtype: torch.dtype,
    training_state: bool = False,
    layout: tuple[int, int, int] = (1, 1, 1),
    run_config: Optional[dict] = None,
) -> Path:
    """Save a sharded state dict as checkpoint ``iteration`` under ``save``.

    Written to ``iter_N.tmp`` first, renamed when complete, then ``latest`` is updated.
    """
    save = Path(save)
    final = iteration_dir(save, iteration)
    tmp = final.with_name(final.name + ".tmp")
    rank0 = parallel.is_rank_0()
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    parallel.barrier()
    dist_checkpointing.save(sharded, str(tmp))
    parallel.barrier()
    if rank0:
        _write_info(
            tmp,
            CheckpointInfo(model_cfg, dtype, padded_vocab_size, iteration, training_state, layout),
        )
        if run_config is not None:
            (tmp / "run_config.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        pointer = save / LATEST
        pointer_tmp = save / (LATEST + ".tmp")
        pointer_tmp.write_text(str(iteration))
        os.replace(pointer_tmp, pointer)
    parallel.barrier()
    return final


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
    load: str | Path, model: torch.nn.Module, model_cfg: ModelConfig, layout: parallel.Layout
) -> CheckpointInfo:
    """Load weights into this rank's ``model`` at any TP/PP (every rank calls it)."""
    ckpt = resolve(load)
    info = read_info(ckpt)
    check_compatible(info.model, model_cfg, ckpt)
    # Embedding rows are padded to a multiple of 128 * TP, so a checkpoint saved at another TP
    # has another row count: megatron marks those tensors allow_shape_mismatch and copies the
    # overlapping rows (the pad rows beyond the real vocabulary are zeros either way).
    request = model.sharded_state_dict()
    loaded = dist_checkpointing.load(request, str(ckpt))
    # The result also carries the checkpoint's common (non-tensor) state, e.g. the optimizer's.
    state = {k: loaded[k] for k in request if not k.endswith("_extra_state")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}: missing keys {missing}, unexpected keys {unexpected}")
    return info


def load_full_state(
    load: str | Path, template: torch.nn.Module
) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """Every weight of a checkpoint as full tensors, named as in ``template``'s state dict.

    ``template`` is a model built (on the meta device is enough) at TP=1, PP=1 with the
    checkpoint's padded vocabulary; only its sharded-state-dict keys are used, so memory is one copy
    of the weights in the checkpoint's dtype.
    """
    ckpt = resolve(load)
    info = read_info(ckpt)
    sharded = {}
    for name, sh in template.sharded_state_dict().items():
        if isinstance(sh, ShardedTensor):
            sh.data = torch.empty(sh.local_shape, dtype=info.dtype)
            sharded[name] = sh
    loaded = dist_checkpointing.load(sharded, str(ckpt))
    return {name: loaded[name] for name in sharded}, info


# --- resumable training checkpoints -----------------------------------------------------------
_OPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _rng_state() -> dict:
    import random

    import numpy as np

    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_object(layout: parallel.Layout, data) -> ShardedObject:
    """One RNG state per rank, placed by its (PP, TP, DP) coordinates."""
    return ShardedObject(
        "rng_state",
        data,
        (layout.pp, layout.tp, layout.dp),
        (layout.pp_rank, layout.tp_rank, layout.dp_rank),
        replica_id=0,
    )


def _training_sharded_dict(
    model, optimizer, layout: parallel.Layout, loading: bool, rng: Optional[dict] = None
) -> dict:
    model_sd = model.sharded_state_dict()
    return {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(
            model_sd, is_loading=loading, metadata=_OPT_METADATA
        ),
        "rng_state": _rng_object(layout, rng),
    }


def save_training_checkpoint(
    save: str | Path,
    model,
    optimizer,
    scheduler,
    iteration: int,
    run_config,
    layout: parallel.Layout,
) -> Path:
    """Model, optimizer, LR schedule, RNG states and the data position (= iteration)."""
    sharded = _training_sharded_dict(model, optimizer, layout, loading=False, rng=_rng_state())
    sharded["scheduler"] = scheduler.state_dict()
    sharded["iteration"] = iteration
    dtype = next(model.parameters()).dtype
    return save_sharded(
        save,
        sharded,
        run_config.model,
        iteration,
        run_config.model.padded_vocab_size(layout.tp),
        dtype,
        training_state=True,
        layout=(layout.tp, layout.pp, layout.dp),
        run_config=run_config.to_dict(),
    )


def load_training_checkpoint(
    load: str | Path,
    model,
    optimizer,
    scheduler,
    model_cfg: ModelConfig,
    layout: parallel.Layout,
    finetune: bool = False,
) -> int:
    """Restore a run; returns the iteration to continue from.

    A weights-only checkpoint (e.g. converted from HF), or ``finetune=True``, loads the weights and
    starts at iteration 0 with a fresh optimizer. RNG states are restored only at the layout they
    were saved at (they are per rank).
    """
    ckpt = resolve(load)
    info = read_info(ckpt)
    check_compatible(info.model, model_cfg, ckpt)
    if finetune or not info.training_state:
        load_model(ckpt, model, model_cfg, layout)
        return 0
    same_layout = tuple(info.layout) == (layout.tp, layout.pp, layout.dp)
    from megatron_yuyuan.optim import finish_optimizer_loading, prepare_optimizer_for_loading

    prepare_optimizer_for_loading(optimizer)
    sharded = _training_sharded_dict(model, optimizer, layout, loading=True)
    if not same_layout:
        sharded.pop("rng_state")
    sharded["scheduler"] = None
    sharded["iteration"] = None
    loaded = dist_checkpointing.load(sharded, str(ckpt))
    model_state = {k: v for k, v in loaded["model"].items() if not k.endswith("_extra_state")}
    missing, unexpected = model.load_state_dict(model_state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}: missing keys {missing}, unexpected keys {unexpected}")
    optimizer.load_state_dict(loaded["optimizer"])
    finish_optimizer_loading(optimizer)
    scheduler.load_state_dict(loaded["scheduler"])
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    return int(loaded["iteration"])
