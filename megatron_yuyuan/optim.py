"""Optimizer (megatron AdamW, optional distributed optimizer, fp16 loss scaling) and LR schedule.

The only module that imports ``megatron.core.optimizer`` and its param scheduler.
"""

from __future__ import annotations

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_yuyuan.config import RunConfig


def build_optimizer(
    cfg: RunConfig, model_chunks: list[torch.nn.Module], overlap_param_gather: bool = False
):
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
        # must agree with the DDP wrapper's setting (training.overlap_param_gather)
        overlap_param_gather=overlap_param_gather,
    )
    return get_megatron_optimizer(ocfg, model_chunks)


def use_fused_adam(optimizer) -> None:
    """Switch megatron's torch AdamW (its choice without Apex/TE) to torch's fused kernel: one
    launch per dtype/device group reads and writes each parameter, gradient and moment once,
    where the default multi-tensor path makes several passes. Same update rule (torch documents
    fused as numerically equivalent up to rounding). Call after loading a checkpoint too: loading
    restores the saved param-group flags."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue  # Apex/TE FusedAdam already
        params = [p for g in inner.param_groups for p in g["params"]]
        if not params or not all(p.is_cuda for p in params):
            continue
        for group in inner.param_groups:
            group["fused"], group["foreach"] = True, False
        for state in inner.state.values():
            # multi-tensor Adam keeps "step" on the CPU; the fused kernel reads it on the GPU
            if torch.is_tensor(state.get("step")) and not state["step"].is_cuda:
                state["step"] = state["step"].to(params[0].device, torch.float32)


def seed_main_params(optimizer, model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Set mixed precision's fp32 main weights from ``weights`` (this rank's tensors by parameter
    name, in the checkpoint's dtype) rather than from the model's rounded bf16/fp16 copy: fp16
    Yuyuan weights loaded under --bf16 keep their 10-bit mantissas in the optimizer."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    by_param = {p: weights[n] for n, p in model.named_parameters() if n in weights}
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer):
            # megatron matches state-dict names to parameters and copies each rank's shard
            opt.reload_model_params(state_dict={n: w for n, w in weights.items()})
        elif hasattr(opt, "fp32_from_float16_groups"):  # Float16OptimizerWithFloat16Params
            for model_group, main_group in zip(opt.float16_groups, opt.fp32_from_float16_groups):
                for model_param, main_param in zip(model_group, main_group):
                    if model_param in by_param:
                        main_param.data.copy_(by_param[model_param].to(main_param.device))
        # fp32 training: the model parameters are the main weights, already loaded


def build_scheduler(cfg: RunConfig, optimizer) -> OptimizerParamScheduler:
    """Linear warmup to lr (see TrainConfig.lr_warmup_iters), then constant/linear/cosine decay to
    min_lr (per iteration)."""
    t = cfg.train
    decay_iters = t.lr_decay_iters or t.train_iters  # > lr_warmup_iters (TrainConfig checks)
    return OptimizerParamScheduler(
        optimizer,
        # Megatron ramps from init_lr at step 0: start one ramp step above 0 (see lr_warmup_iters).
        init_lr=t.lr / (t.lr_warmup_iters + 1) if t.lr_warmup_iters else t.lr,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.lr_warmup_iters,
        lr_decay_steps=max(decay_iters, t.lr_warmup_iters + 1),
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=t.train_iters,
        wd_incr_style="constant",
        # Which schedule a resumed run follows: see TrainConfig.use_checkpoint_opt_param_scheduler.
        use_checkpoint_opt_param_scheduler=t.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=not t.use_checkpoint_opt_param_scheduler,
    )


# --- megatron-core 0.16 DistributedOptimizer over torch AdamW (no Apex/TE): three load bugs ---
# each fixed below where it bites. Not CPU-specific: they hit any run without Apex/TE.
def _inner_optimizers(optimizer) -> list:
    return [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]


def _uses_torch_adam_fallback(optimizer) -> bool:
    from megatron.core.optimizer import distrib_optimizer

    return _has_distributed_optimizer(optimizer) and not distrib_optimizer.HAVE_APEX_OR_TE


def _has_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(
        isinstance(o, DistributedOptimizer)
        for o in getattr(optimizer, "chained_optimizers", [optimizer])
    )


def prepare_optimizer_for_loading(optimizer) -> None:
    """Give never-stepped params an Adam state, or state_dict() asserts on the missing 'step'."""
    if not _uses_torch_adam_fallback(optimizer):
        return
    _patch_set_states_once()
    for inner in _inner_optimizers(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p] = {
                        "step": torch.tensor(0.0),
                        "exp_avg": torch.zeros_like(p),
                        "exp_avg_sq": torch.zeros_like(p),
                    }


def finish_optimizer_loading(optimizer) -> None:
    """load_state_dict hands every param one shared 'step' tensor; torch AdamW would then bump it
    once per param per step (a silently wrong resume). Give each param its own."""
    if not _uses_torch_adam_fallback(optimizer):
        return
    for inner in _inner_optimizers(optimizer):
        for st in inner.state.values():
            if "step" in st:
                st["step"] = st["step"].clone()


_PATCHED = False


def _patch_set_states_once() -> None:
    """_set_main_param_and_optimizer_states copies every state key, 'step' included, from a dict
    that has no 'step': hide it during the call."""
    global _PATCHED
    if _PATCHED:
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state[main_param]
        step = state.pop("step", None) if "step" not in tensors else None
        try:
            original(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states
    _PATCHED = True
