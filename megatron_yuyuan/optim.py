"""Optimizer (megatron AdamW, optional distributed optimizer, fp16 loss scaling) and LR schedule.

The only module that imports ``megatron.core.optimizer`` and its param scheduler.
"""

from __future__ import annotations

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_yuyuan.config import ConfigError, RunConfig


def build_optimizer(cfg: RunConfig, model_chunks: list[torch.nn.Module]):
    """AdamW over the DDP-wrapped model chunks (no weight decay on biases and LayerNorms).

    Returns the megatron optimizer; its ``step()`` gives ``(ok, grad_norm, num_zeros)``.
    """
    t = cfg.train
    ocfg = OptimizerConfig(
        optimizer="adam",  # decoupled weight decay: torch AdamW without Apex/TE
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=t.bf16,
        fp16=t.fp16,
        params_dtype=torch.bfloat16 if t.bf16 else torch.float16 if t.fp16 else torch.float32,
        initial_loss_scale=t.initial_loss_scale if t.fp16 else None,
        min_loss_scale=t.min_loss_scale,
        loss_scale_window=t.loss_scale_window,
        hysteresis=t.hysteresis,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    return get_megatron_optimizer(ocfg, model_chunks)


def build_scheduler(cfg: RunConfig, optimizer) -> OptimizerParamScheduler:
    """Linear warmup from 0 to lr, then constant/linear/cosine decay to min_lr (per iteration)."""
    t = cfg.train
    decay_iters = t.lr_decay_iters or t.train_iters
    if t.lr_decay_style != "constant" and decay_iters <= t.lr_warmup_iters:
        raise ConfigError(f"--lr-decay-iters ({decay_iters}) must exceed --lr-warmup-iters "
                          f"({t.lr_warmup_iters})")
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.lr_warmup_iters,
        lr_decay_steps=max(decay_iters, t.lr_warmup_iters + 1),
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=t.train_iters,
        wd_incr_style="constant",
    )
