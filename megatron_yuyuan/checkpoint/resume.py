"""Resumable training checkpoints: what a run adds to the model weights of
:mod:`megatron_yuyuan.checkpoint.storage` (the file format) so that a killed job continues exactly:
optimizer state (fully reshardable), LR schedule, RNG states, the iteration and the number of
samples consumed (the data position, independent of the batch size)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron_yuyuan import parallel
from megatron_yuyuan.checkpoint import storage
from megatron_yuyuan.checkpoint.storage import CheckpointError
from megatron_yuyuan.config import ModelConfig
from megatron_yuyuan.lora import is_adapter

_OPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


@dataclass
class Resumed:
    """Where a loaded run continues."""

    iteration: int
    """Optimizer steps already taken (0 for a weights-only start)."""
    consumed_samples: int
    """Training samples already read: the data position."""
    weights: dict[str, torch.Tensor] | None = None
    """A weights-only start: this rank's tensors in the checkpoint's own dtype (they seed the
    fp32 main weights of mixed precision, which the bf16 copy in the model would round)."""


def _rng_state() -> dict:
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
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _training_sharded_dict(
    model,
    optimizer,
    layout: parallel.Layout,
    loading: bool,
    rng: dict | None = None,
    adapters_only: bool = False,
) -> dict:
    model_sd = model.sharded_state_dict()
    if adapters_only:  # LoRA: the frozen base stays in its own checkpoint
        model_sd = {k: v for k, v in model_sd.items() if is_adapter(k)}
    return {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(
            model_sd, is_loading=loading, metadata=_OPT_METADATA
        ),
        "rng_state": storage.rank_object("rng_state", rng, layout),
    }


def save_training_checkpoint(
    save: str | Path,
    model,
    optimizer,
    scheduler,
    iteration: int,
    consumed_samples: int,
    run_config,
    layout: parallel.Layout,
    adapters_only: bool = False,
    lora: dict | None = None,
    prompt_template: str | None = None,
    with_optimizer: bool = True,
    valid_loss: float | None = None,
    background: bool = False,
) -> Path | storage.PendingSave:
    """Model, optimizer, LR schedule, RNG states and the data position. A LoRA run saves only
    the model's adapters (``adapters_only``, every rank) and rank 0 records ``lora`` (see
    ``adapters.checkpoint_record``) beside them. Without ``with_optimizer`` the checkpoint holds
    the weights only (exported, generated from and finetuned from; never resumed). With
    ``background`` the files are written while training goes on (see
    :func:`storage.save_sharded`)."""
    if with_optimizer:
        sharded = _training_sharded_dict(
            model, optimizer, layout, loading=False, rng=_rng_state(), adapters_only=adapters_only
        )
        sharded["scheduler"] = scheduler.state_dict()
        sharded["iteration"] = iteration
        sharded["consumed_samples"] = consumed_samples
    else:
        model_sd = model.sharded_state_dict()
        sharded = {
            "model": {k: v for k, v in model_sd.items() if is_adapter(k) or not adapters_only}
        }
    dtype = next(model.parameters()).dtype
    return storage.save_sharded(
        save,
        sharded,
        run_config.model,
        iteration,
        run_config.model.padded_vocab_size(layout.tp),
        dtype,
        training_state=with_optimizer,
        layout=(layout.tp, layout.pp, layout.dp),
        run_config=run_config.to_dict(),
        lora=lora,
        prompt_template=prompt_template,
        valid_loss=valid_loss,
        background=background,
    )


def check_resumable(info: storage.CheckpointInfo, ckpt: Path) -> None:
    """A run's weights-only save (``--no-save-optim``, ``--final-save weights``) cannot continue
    that run: its optimizer state is gone. Weights from elsewhere (iteration 0, e.g. converted
    from HF) start a finetune as before."""
    if not info.training_state and info.iteration > 0:
        raise CheckpointError(
            f"--load {ckpt}: iteration {info.iteration} was saved with the weights only "
            f"(--no-save-optim or --final-save weights), so the run cannot be resumed from it; "
            f"start a new run from these weights with --finetune, or --load a full checkpoint"
        )


def load_training_checkpoint(
    load: str | Path,
    model,
    optimizer,
    scheduler,
    model_cfg: ModelConfig,
    layout: parallel.Layout,
    finetune: bool = False,
    global_batch_size: int | None = None,
    adapters_only: bool = False,
) -> Resumed:
    """Restore a run; returns where it continues.

    A weights-only checkpoint (e.g. converted from HF), or ``finetune=True``, loads the weights and
    starts at iteration 0 with a fresh optimizer. RNG states are restored only at the layout they
    were saved at (they are per rank). Checkpoints from before ``consumed_samples`` was saved
    derive it from the iteration and ``global_batch_size`` (which must then be unchanged).
    """
    ckpt = storage.resolve(load)
    info = storage.read_info(ckpt)
    storage.check_compatible(info.model, model_cfg, ckpt)
    if adapters_only and not info.lora:
        raise CheckpointError(f"{ckpt}: holds no LoRA adapters to resume")
    if not finetune:
        check_resumable(info, ckpt)
    if finetune or not info.training_state:
        only = is_adapter if adapters_only else None
        _, weights = storage.load_model(ckpt, model, model_cfg, layout, only=only)
        return Resumed(iteration=0, consumed_samples=0, weights=weights)
    same_layout = tuple(info.layout) == (layout.tp, layout.pp, layout.dp)
    from megatron_yuyuan.optim import finish_optimizer_loading, prepare_optimizer_for_loading

    prepare_optimizer_for_loading(optimizer)
    sharded = _training_sharded_dict(
        model, optimizer, layout, loading=True, adapters_only=adapters_only
    )
    if not same_layout:
        sharded.pop("rng_state")
    for key in ("scheduler", "iteration", "consumed_samples"):
        sharded[key] = None
    loaded = storage.load_sharded(sharded, ckpt)
    model_state = {k: v for k, v in loaded["model"].items() if not k.endswith("_extra_state")}
    missing, unexpected = model.load_state_dict(model_state, strict=False)
    missing = [
        k
        for k in missing
        if not k.endswith("_extra_state") and (is_adapter(k) or not adapters_only)
    ]
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}: missing keys {missing}, unexpected keys {unexpected}")
    optimizer.load_state_dict(loaded["optimizer"])
    finish_optimizer_loading(optimizer)
    scheduler.load_state_dict(loaded["scheduler"])
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    iteration = int(loaded["iteration"])
    consumed = loaded.get("consumed_samples")
    if consumed is None:  # saved before the data position was recorded
        if global_batch_size is None:
            raise CheckpointError(f"{ckpt}: no consumed_samples recorded")
        consumed = iteration * global_batch_size
    return Resumed(iteration=iteration, consumed_samples=int(consumed))
