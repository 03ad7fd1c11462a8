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
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from megatron_yuyuan import parallel
from megatron_yuyuan.config import ConfigError, ModelConfig

LATEST = "latest_checkpointed_iteration.txt"
MODEL_CONFIG = "model_config.yaml"
_VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says why and what to do."""


def iteration_dir(save: Path, iteration: int) -> Path:
    return Path(save) / f"iter_{iteration:07d}"


def resolve(load: str | Path) -> Path:
    """A checkpoint directory: ``SAVE`` (follows the latest pointer) or ``SAVE/iter_N`` itself."""
    path = Path(load)
    if (path / MODEL_CONFIG).is_file():
        return path
    latest = path / LATEST
    if latest.is_file():
        return iteration_dir(path, int(latest.read_text().strip()))
    raise CheckpointError(f"--load {path}: no checkpoint there (neither {LATEST} nor {MODEL_CONFIG})")


@dataclasses.dataclass
class CheckpointInfo:
    """What ``model_config.yaml`` records."""

    model: ModelConfig
    dtype: torch.dtype
    padded_vocab_size: int
    iteration: int


def read_info(ckpt_dir: Path) -> CheckpointInfo:
    raw = yaml.safe_load((Path(ckpt_dir) / MODEL_CONFIG).read_text())
    return CheckpointInfo(model=ModelConfig(**raw["model"]), dtype=_DTYPES[raw["dtype"]],
                          padded_vocab_size=raw["padded_vocab_size"], iteration=raw["iteration"])


def _write_info(ckpt_dir: Path, info: CheckpointInfo) -> None:
    (ckpt_dir / MODEL_CONFIG).write_text(yaml.safe_dump({
        "model": dataclasses.asdict(info.model),
        "dtype": str(info.dtype).removeprefix("torch."),
        "padded_vocab_size": info.padded_vocab_size,
        "iteration": info.iteration,
    }, sort_keys=False))


def save_model(save: str | Path, model: torch.nn.Module, model_cfg: ModelConfig, iteration: int,
               padded_vocab_size: int) -> Path:
    """Save this rank's part of ``model`` (every rank calls it); returns the iteration directory."""
    dtype = next(model.parameters()).dtype
    return save_sharded(save, model.sharded_state_dict(), model_cfg, iteration, padded_vocab_size,
                        dtype)


def save_sharded(save: str | Path, sharded: dict, model_cfg: ModelConfig, iteration: int,
                 padded_vocab_size: int, dtype: torch.dtype) -> Path:
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
        _write_info(tmp, CheckpointInfo(model_cfg, dtype, padded_vocab_size, iteration))
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
    shape = ("num_layers", "hidden_size", "num_attention_heads", "ffn_size",
             "max_position_embeddings", "vocab_size")
    diffs = [f"{name}: checkpoint {getattr(saved, name)} vs config {getattr(model_cfg, name)}"
             for name in shape if getattr(saved, name) != getattr(model_cfg, name)]
    if diffs:
        raise CheckpointError(f"{where}: the checkpoint's model does not match the config ("
                              + "; ".join(diffs) + "); pass the matching --config")


def load_model(load: str | Path, model: torch.nn.Module, model_cfg: ModelConfig,
               layout: parallel.Layout) -> CheckpointInfo:
    """Load weights into this rank's ``model`` at any TP/PP (every rank calls it)."""
    ckpt = resolve(load)
    info = read_info(ckpt)
    check_compatible(info.model, model_cfg, ckpt)
    sharded = model.sharded_state_dict()
    repad = {}
    for name, sh in list(sharded.items()):
        if (isinstance(sh, ShardedTensor) and sh.key in _VOCAB_KEYS
                and sh.global_shape[0] != info.padded_vocab_size):
            # Saved at another TP, hence another padding: read the vocab rows whole, re-pad below.
            full = torch.empty((info.padded_vocab_size, *sh.global_shape[1:]), dtype=sh.data.dtype)
            # Every TP rank now reads the whole tensor: only one of them may be the main replica.
            rid = sh.replica_id if isinstance(sh.replica_id, tuple) else (sh.replica_id,)
            rid = (int(rid[0] != 0 or layout.tp_rank != 0), *rid[1:])
            repad[name] = ShardedTensor.from_rank_offsets(sh.key, full, replica_id=rid)
            sharded[name] = repad[name]
    loaded = dist_checkpointing.load(sharded, str(ckpt))
    state = {k: v for k, v in loaded.items() if not k.endswith("_extra_state")}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, full in ((n, loaded[n]) for n in repad):
            local = params[name]
            rows = local.shape[0]
            start = layout.tp_rank * rows
            local.zero_()
            real = max(0, min(rows, model_cfg.vocab_size - start))
            local[:real].copy_(full[start:start + real])
            state.pop(name)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state") and k not in repad]
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}: missing keys {missing}, unexpected keys {unexpected}")
    return info


def load_full_state(load: str | Path, template: torch.nn.Module) -> tuple[dict[str, torch.Tensor],
                                                                           CheckpointInfo]:
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
