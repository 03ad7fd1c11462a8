"""Low-rank adapters (LoRA) on megatron-core's tensor-parallel linears, at any TP/PP.

Each targeted linear ``y = W x`` gains ``(alpha / r) B A x`` with ``A [r, in]`` and ``B [out, r]``
(``A`` Kaiming-uniform as in PEFT, ``B`` zero: training starts exactly at the base model). The
adapters are two extra parameters on the base layer (``linear_qkv.lora_A``, ``linear_qkv.lora_B``),
sharded like it:

* column-parallel ``linear_qkv`` / ``linear_fc1`` (``W`` split on ``out``): ``A`` replicated,
  ``B`` split on ``out`` like ``W``, rows in ``W``'s order (per-head QKV interleave included), so
  ``B_local (A x)`` is this rank's slice of the update. ``A x`` passes
  ``copy_to_tensor_model_parallel_region``: identity forward, and the backward all-reduces its
  gradient, because each rank's ``B_local`` contributes only part of it.
* row-parallel ``linear_proj`` / ``linear_fc2`` (``W`` split on ``in``): ``A`` split on ``in``,
  ``B`` replicated. ``A_local x_local`` is a partial sum, all-reduced (``[s, b, r]``: tiny next
  to the base layer's ``[s, b, h]`` reduce, which megatron's layer does inside its forward where
  the adapter cannot join it), then every rank applies the same ``B``.

Split adapters carry megatron's tensor-parallel attributes (gradient-norm deduplication) and
checkpoint as TP-sharded tensors, so checkpoints reshard like the base model's. Every base
parameter is frozen. The init draws each full ``A`` from ``crc32(seed:global name)`` and slices it,
so TP/PP/DP layouts start from the same adapters.

What a LoRA checkpoint records (its settings, the base checkpoint and its fingerprint) and how it
loads is :mod:`megatron_yuyuan.checkpoint`'s; this module is the adapter math only.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from megatron.core.utils import make_tp_sharded_tensor_for_checkpoint

from megatron_yuyuan import parallel
from megatron_yuyuan.config import LoraConfig
from megatron_yuyuan.model import global_param_name
from megatron_yuyuan.parallel import Layout

ADAPTERS = ("lora_A", "lora_B")
_COLUMN = ("linear_qkv", "linear_fc1")  # W split on out: B split on out (dim 0)
_ROW = ("linear_proj", "linear_fc2")  # W split on in: A split on in (dim 1)


def is_adapter(name: str) -> bool:
    """Whether a parameter / state-dict name is a LoRA adapter's."""
    return name.rsplit(".", 1)[-1] in ADAPTERS


def is_base_weight(name: str) -> bool:
    """Whether a parameter / state-dict name belongs to the (frozen) base model."""
    return not is_adapter(name)


def adapted_layers(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """``(name, layer)`` of every linear that carries adapters."""
    for name, module in model.named_modules():
        if hasattr(module, "lora_A"):
            yield name, module


def attach(model: torch.nn.Module, lora: LoraConfig, full_recompute: bool = False) -> None:
    """Freeze every parameter of ``model`` and add (uninitialised) adapters to the targets."""
    for p in model.parameters():
        p.requires_grad_(False)
    if full_recompute and getattr(model, "embedding", None) is not None:
        # With the embedding frozen its output needs no gradient, and megatron's full recompute
        # (a reentrant checkpoint per layer chunk) would then cut the adapters off from the loss:
        # make the first stage's input differentiable, as transformers'
        # enable_input_require_grads does for gradient storage. Only then: it costs the
        # first layer's input-gradient GEMMs.
        model._lora_input_grads = model.embedding.register_forward_hook(_require_grad)
    r = lora.lora_rank
    for name, module in list(model.named_modules()):
        kind = name.rsplit(".", 1)[-1]
        if kind not in lora.targets:
            continue
        w = module.weight  # column: [out / tp, in]; row: [out, in / tp]
        out_features, in_features = w.shape
        a = torch.nn.Parameter(torch.empty(r, in_features, dtype=w.dtype, device=w.device))
        b = torch.nn.Parameter(torch.empty(out_features, r, dtype=w.dtype, device=w.device))
        split, dim = (b, 0) if kind in _COLUMN else (a, 1)
        parallel.set_tensor_model_parallel_attributes(split, True, dim, 1)
        module.register_parameter("lora_A", a)  # [r, in(/tp)]
        module.register_parameter("lora_B", b)  # [out(/tp), r]
        module.lora_dropout = torch.nn.Dropout(lora.lora_dropout)
        module.lora_scale = lora.scale
        module.forward = _adapted_forward(module, module.forward, kind in _COLUMN)
        module.sharded_state_dict = _adapted_sharded_state_dict(
            module, module.sharded_state_dict, "lora_B" if kind in _COLUMN else "lora_A", dim
        )


def add_adapters(
    model: torch.nn.Module,
    lora: LoraConfig,
    layout: Layout,
    seed: int | None = None,
    full_recompute: bool = False,
) -> torch.nn.Module:
    """``model`` (from :func:`megatron_yuyuan.model.build_model`) with ``lora``'s adapters, when
    enabled: attached, and initialised from ``seed`` when given (None: to be loaded)."""
    if lora.enabled:
        attach(model, lora, full_recompute=full_recompute)
        if seed is not None:
            init_adapters(model, layout, seed)
    return model


def _require_grad(_module, _inputs, output: torch.Tensor) -> torch.Tensor:
    return output.requires_grad_(True) if torch.is_grad_enabled() else output


def _adapted_forward(module, base_forward, column: bool):
    def forward(input_, *args, **kwargs):  # input_: [s, b, in] (column) or [s, b, in / tp] (row)
        out, bias = base_forward(input_, *args, **kwargs)  # out: [s, b, out(/tp)]
        x = input_
        if module.training and module.lora_dropout.p > 0:
            if column:  # a replicated activation: the same mask on every TP rank (default RNG)
                x = module.lora_dropout(input_)
            else:
                with parallel.get_cuda_rng_tracker().fork():  # a split activation: own masks
                    x = module.lora_dropout(input_)
        h = F.linear(x, module.lora_A)  # [s, b, r]
        if column:
            h = parallel.copy_to_tensor_model_parallel_region(h)
        else:
            h = parallel.reduce_from_tensor_model_parallel_region(h)
        # out + scale * h B^T as one GEMM accumulating into a copy of out: no [s, b, out]
        # temporaries for the product and its scaling
        updated = torch.addmm(
            out.reshape(-1, out.shape[-1]),
            h.reshape(-1, h.shape[-1]),
            module.lora_B.t(),
            alpha=module.lora_scale,
        )
        return updated.view(out.shape), bias

    return forward


def _adapted_sharded_state_dict(module, base_fn, split_name: str, dim: int):
    """megatron's layer saves unknown parameters as TP-replicated: mark the split adapter."""

    def sharded_state_dict(prefix="", sharded_offsets=(), metadata=None):
        sd = base_fn(prefix, sharded_offsets, metadata)
        key = f"{prefix}{split_name}"
        sd[key] = make_tp_sharded_tensor_for_checkpoint(
            getattr(module, split_name), key, dim, prepend_offsets=sharded_offsets
        )
        return sd

    return sharded_state_dict


@torch.no_grad()
def init_adapters(model: torch.nn.Module, layout: Layout, seed: int) -> None:
    """``A`` ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's Kaiming-uniform with a = sqrt(5)) from
    ``crc32(seed:global name)``, drawn whole and sliced; ``B`` = 0."""
    for name, module in adapted_layers(model):
        a = module.lora_A
        split = getattr(a, "tensor_model_parallel", False)
        full_in = a.shape[1] * (layout.tp if split else 1)
        gname = global_param_name(model, f"{name}.lora_A")
        gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{gname}".encode()))
        full = (torch.rand(a.shape[0], full_in, generator=gen) * 2 - 1) / math.sqrt(full_in)
        a.copy_(full.chunk(layout.tp, dim=1)[layout.tp_rank] if split else full)
        module.lora_B.zero_()


@torch.no_grad()
def merge(model: torch.nn.Module) -> None:
    """Fold every adapter into its base weight (``W += (alpha / r) B A`` per shard) and remove it:
    the model then runs at the base model's speed (generation, serving)."""
    for _, module in list(adapted_layers(model)):
        delta = module.lora_B.float() @ module.lora_A.float()  # [out(/tp), in(/tp)]
        # one rounding to the weight's dtype, as merged_weights (the HF export)
        module.weight.copy_(module.weight.float() + module.lora_scale * delta)
        del module.lora_A, module.lora_B, module.lora_dropout, module.lora_scale
        del module.forward, module.sharded_state_dict  # back to the class's methods
    hook = getattr(model, "_lora_input_grads", None)
    if hook is not None:
        hook.remove()
        del model._lora_input_grads


def merged_weights(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Full (TP=1) megatron tensors with the adapters folded into their base weights."""
    out = {k: v for k, v in state.items() if not is_adapter(k)}
    for key in [k for k in state if k.endswith(".lora_A")]:
        prefix = key[: -len("lora_A")]
        w = out[prefix + "weight"]
        delta = state[prefix + "lora_B"].float() @ state[key].float()  # [out, in]
        out[prefix + "weight"] = (w.float() + scale * delta).to(w.dtype)
    return out


def parameter_counts(model: torch.nn.Module, layout: Layout) -> tuple[int, int]:
    """(trainable, total) parameters of the whole model (every TP/PP rank's share, each once)."""
    counts = torch.zeros(2, dtype=torch.float64)
    for name, p in model.named_parameters():
        if global_param_name(model, name) != name and name == "output_layer.weight":
            continue  # the tied output layer of the last stage is the first stage's embedding
        if not getattr(p, "tensor_model_parallel", False) and layout.tp_rank != 0:
            continue  # replicated over TP: count it on TP rank 0 only
        counts += torch.tensor([p.numel() if p.requires_grad else 0, p.numel()])
    parallel.all_reduce_model_parallel(counts)
    return int(counts[0]), int(counts[1])
