"""What a LoRA checkpoint records: the adapters' settings, the base checkpoint they were trained
on and a fingerprint of that base's weights (checked before the base is used again), and the check
that the adapters it stores are the ones those settings describe."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from megatron_yuyuan.checkpoint import storage
from megatron_yuyuan.checkpoint.storage import CheckpointError, CheckpointInfo
from megatron_yuyuan.config import LoraConfig
from megatron_yuyuan.lora import is_adapter

_SAMPLE = 1 << 20  # bytes read from each end of every data file by the fingerprint


def fingerprint(load: str | Path) -> str:
    """A fingerprint of a checkpoint's weights: SHA-256 over every file's name and size and its
    first and last MiB (all of the small config and metadata files). It reads ~2 MiB per file
    instead of 7 GB, and tells apart any two conversions or training steps in practice (their
    metadata and shards differ); it is not a proof that every byte in the middle is unchanged."""
    ckpt = storage.resolve(load)
    h = hashlib.sha256()
    for f in sorted(p for p in ckpt.iterdir() if p.is_file()):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}\n".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(_SAMPLE))
            if size > _SAMPLE:
                fh.seek(max(size - _SAMPLE, _SAMPLE))
                h.update(fh.read(_SAMPLE))
    return h.hexdigest()


def checkpoint_record(lora: LoraConfig, base: str | Path) -> dict:
    """What a LoRA checkpoint's ``model_config.yaml`` records under ``lora``."""
    ckpt = storage.resolve(base)
    return {
        "lora_rank": lora.lora_rank,
        "lora_alpha": lora.lora_alpha,
        "lora_dropout": lora.lora_dropout,
        "lora_target_modules": ",".join(lora.targets),
        "base": str(ckpt.resolve()),
        "base_fingerprint": fingerprint(ckpt),
    }


def config_of(info: CheckpointInfo) -> LoraConfig:
    """The LoRA settings a checkpoint was trained with (disabled for a full checkpoint)."""
    if not info.lora:
        return LoraConfig()
    return LoraConfig(**{k: v for k, v in info.lora.items() if k.startswith("lora_")})


def check_base(info: CheckpointInfo, where: Path, base: str | Path | None = None) -> Path:
    """The base checkpoint of a LoRA checkpoint (``base`` or the recorded path), after checking
    that it is the one the adapters were trained on.

    Raises:
        CheckpointError: the base is missing or its fingerprint differs.
    """
    recorded = info.lora["base"]
    path = Path(base) if base else Path(recorded)
    try:
        ckpt = storage.resolve(path)
    except CheckpointError as exc:
        if base:
            raise CheckpointError(f"--lora-base {base}: no checkpoint there") from exc
        raise CheckpointError(
            f"{where}: the LoRA adapters' base checkpoint {path} is gone; restore it there or "
            f"give its new place with --lora-base (training: --pretrained-checkpoint)"
        ) from exc
    if fingerprint(ckpt) != info.lora["base_fingerprint"]:
        raise CheckpointError(
            f"{where}: the adapters were trained on {recorded}, but {ckpt} holds other weights "
            f"(fingerprint mismatch); load them with the base they were trained on"
        )
    return ckpt


def check_stored_adapters(ckpt: Path, model: torch.nn.Module) -> None:
    """The adapters a LoRA checkpoint holds are exactly those of ``model`` (built from its
    recorded settings), shapes included: a hand-edited rank or target list is refused instead of
    silently dropping adapters.

    Raises:
        CheckpointError: naming what differs.
    """
    stored = {
        k: shape
        for k, shape in storage.stored_tensor_shapes(ckpt).items()
        if is_adapter(k) and not k.startswith("optimizer.")
    }
    wanted = {  # checkpoint keys stack the layers: [layers, ...] under one key per module
        sh.key: tuple(sh.global_shape)
        for k, sh in model.sharded_state_dict().items()
        if is_adapter(k) and hasattr(sh, "global_shape")
    }
    if stored != wanted:
        differ = sorted(k for k in stored.keys() | wanted.keys() if stored.get(k) != wanted.get(k))
        raise CheckpointError(
            f"{ckpt}: the adapters it holds do not match its model_config.yaml's lora settings "
            f"(first difference: {differ[0]}: stored {stored.get(differ[0])}, expected "
            f"{wanted.get(differ[0])}); the checkpoint is damaged: use another one"
        )
