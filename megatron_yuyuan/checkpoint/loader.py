"""The one way a checkpoint becomes a model: "checkpoint path -> model (+ adapters)".

Training, conversion, generation, serving and ``--verify`` all come through here, so a LoRA
checkpoint is handled once: its base checkpoint is found (the recorded path, or where the user says
it moved) and fingerprint-checked, the adapters it stores are checked against its recorded
settings, then the base weights come from the base and the adapters from the LoRA checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_yuyuan import lora
from megatron_yuyuan.checkpoint import adapters, storage
from megatron_yuyuan.checkpoint.storage import CheckpointError, CheckpointInfo
from megatron_yuyuan.config import LoraConfig, ModelConfig, RunConfig
from megatron_yuyuan.model import build_model
from megatron_yuyuan.parallel import Layout


@dataclass(frozen=True)
class Source:
    """A checkpoint opened for loading."""

    path: Path
    """The iteration folder (``SAVE/iter_N``) the ``latest`` pointer or the user named."""
    info: CheckpointInfo
    """Its ``model_config.yaml``."""
    base: Path | None
    """A LoRA checkpoint's base checkpoint, fingerprint-checked; None for a full checkpoint (or
    when the base was not asked for)."""

    @property
    def adapters(self) -> LoraConfig:
        """The LoRA settings it was trained with (disabled for a full checkpoint)."""
        return adapters.config_of(self.info)

    @property
    def weights(self) -> Path:
        """Where the base model's weights are read from."""
        return self.base or self.path


def open_checkpoint(
    load: str | Path, lora_base: str | Path | None = None, need_base: bool = True
) -> Source:
    """Resolve ``load`` (a save folder or one iteration) and, for a LoRA checkpoint, its base:
    ``lora_base`` where it has moved, else the recorded path (skipped when not ``need_base``,
    e.g. exporting the adapters alone).

    Raises:
        CheckpointError: no checkpoint, ``lora_base`` for a full checkpoint, a missing base or one
        whose fingerprint differs from the one the adapters were trained on.
    """
    ckpt = storage.resolve(load)
    info = storage.read_info(ckpt)
    if lora_base and not info.lora:
        raise CheckpointError(f"--lora-base: {ckpt} is not a LoRA checkpoint; drop --lora-base")
    base = adapters.check_base(info, ckpt, lora_base) if info.lora and need_base else None
    return Source(ckpt, info, base)


def build(
    source: Source,
    layout: Layout,
    params_dtype: torch.dtype | None = None,
    padded_vocab_size: int | None = None,
) -> torch.nn.Module:
    """This rank's stage of the model ``source`` describes, adapters included, weights not loaded
    (build it under ``torch.device("meta")`` for a template of names and shapes)."""
    model = build_model(
        RunConfig(model=source.info.model, lora=source.adapters),
        layout,
        padded_vocab_size=padded_vocab_size,
        params_dtype=params_dtype,
    )
    lora.add_adapters(model, source.adapters, layout)
    if source.info.lora:
        adapters.check_stored_adapters(source.path, model)
    return model


def load_weights(
    source: Source,
    model: torch.nn.Module,
    model_cfg: ModelConfig,
    layout: Layout,
    with_adapters: bool = True,
) -> dict[str, torch.Tensor]:
    """Load ``source``'s weights into this rank's ``model`` (every rank calls it), at any TP/PP.

    The base weights come from :attr:`Source.weights`; a LoRA checkpoint's adapters follow unless
    ``with_adapters`` is False (training resumes them together with their optimizer state).
    Adapters of ``model`` that ``source`` does not hold (a LoRA run starting from a full
    checkpoint) are left as they are. Returns this rank's base tensors in the checkpoint's dtype.
    """
    if source.info.lora:
        if source.base is None:
            raise ValueError("open the checkpoint with need_base=True to load its weights")
        adapters.check_stored_adapters(source.path, model)
    _, weights = storage.load_model(
        source.weights, model, model_cfg, layout, only=lora.is_base_weight
    )
    if source.info.lora and with_adapters:
        storage.load_model(source.path, model, model_cfg, layout, only=lora.is_adapter)
    return weights


def load_model(
    load: str | Path,
    layout: Layout,
    params_dtype: torch.dtype,
    merge_adapters: bool = True,
    lora_base: str | Path | None = None,
) -> tuple[torch.nn.Module, CheckpointInfo]:
    """The model a checkpoint describes, with its weights, at this process's layout.

    For a LoRA checkpoint: its base's weights plus the adapters, folded into the weights when
    ``merge_adapters`` (inference at the base model's speed), else kept as adapters.
    """
    source = open_checkpoint(load, lora_base)
    model = build(source, layout, params_dtype)
    load_weights(source, model, source.info.model, layout)
    if merge_adapters:
        lora.merge(model)
    return model, source.info


def load_full_state(
    source: Source, template: torch.nn.Module, with_base: bool = True
) -> tuple[dict[str, torch.Tensor], torch.dtype]:
    """Every weight of ``source`` as full (TP=1) tensors, named as in ``template``'s state dict
    (from :func:`build` at TP=1, PP=1 with the checkpoint's padded vocabulary; on the meta device is
    enough), and the dtype of its base weights. A LoRA checkpoint's adapters come unmerged next to
    the base weights (only the adapters without ``with_base``)."""
    if not source.info.lora:
        state, info = storage.load_full_state(source.path, template)
        return state, info.dtype
    state, _ = storage.load_full_state(source.path, template, only=lora.is_adapter)
    if not with_base:
        return state, source.info.dtype
    if source.base is None:
        raise ValueError("open the checkpoint with need_base=True to load its base weights")
    weights, base_info = storage.load_full_state(source.base, template, only=lora.is_base_weight)
    return {**weights, **state}, base_info.dtype
