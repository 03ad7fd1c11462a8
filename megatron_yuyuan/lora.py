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

A LoRA checkpoint holds the adapters (and their optimizer state), plus the path and a fingerprint
of the base checkpoint; :func:`load_checkpoint_model` rebuilds base + adapters for inference and
conversion, refusing a base whose fingerprint changed.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from megatron.core.utils import make_tp_sharded_tensor_for_checkpoint

from megatron_yuyuan import checkpointing, parallel
from megatron_yuyuan.checkpointing import CheckpointError, CheckpointInfo
from megatron_yuyuan.config import LoraConfig, ModelConfig
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
        # enable_input_require_grads does for gradient checkpointing. Only then: it costs the
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
    from megatron_yuyuan.model import global_param_name

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
    from megatron_yuyuan.model import global_param_name

    counts = torch.zeros(2, dtype=torch.float64)
    for name, p in model.named_parameters():
        if global_param_name(model, name) != name and name == "output_layer.weight":
            continue  # the tied output layer of the last stage is the first stage's embedding
        if not getattr(p, "tensor_model_parallel", False) and layout.tp_rank != 0:
            continue  # replicated over TP: count it on TP rank 0 only
        counts += torch.tensor([p.numel() if p.requires_grad else 0, p.numel()])
    parallel.all_reduce_model_parallel(counts)
    return int(counts[0]), int(counts[1])


# -- checkpoints ------------------------------------------------------------------------------

_SAMPLE = 1 << 20  # bytes read from each end of every data file by the fingerprint


def fingerprint(load: str | Path) -> str:
    """A fingerprint of a checkpoint's weights: SHA-256 over every file's name and size and its
    first and last MiB (all of the small config and metadata files). It reads ~2 MiB per file
    instead of 7 GB, and tells apart any two conversions or training steps in practice (their
    metadata and shards differ); it is not a proof that every byte in the middle is unchanged."""
    ckpt = checkpointing.resolve(load)
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
    ckpt = checkpointing.resolve(base)
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


def check_base(info: CheckpointInfo, where: Path, base: Optional[str | Path] = None) -> Path:
    """The base checkpoint of a LoRA checkpoint (``base`` or the recorded path), after checking
    that it is the one the adapters were trained on.

    Raises:
        CheckpointError: the base is missing or its fingerprint differs.
    """
    recorded = info.lora["base"]
    path = Path(base) if base else Path(recorded)
    try:
        ckpt = checkpointing.resolve(path)
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
        for k, shape in checkpointing.stored_tensor_shapes(ckpt).items()
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


def load_adapters(ckpt: Path, model: torch.nn.Module, model_cfg: ModelConfig, layout: Layout):
    """Load a LoRA checkpoint's adapters into ``model`` (which must carry adapters)."""
    check_stored_adapters(ckpt, model)
    checkpointing.load_model(ckpt, model, model_cfg, layout, only=is_adapter)


def load_checkpoint_model(
    load: str | Path,
    layout: Layout,
    params_dtype: torch.dtype,
    merge_adapters: bool = True,
    base: Optional[str | Path] = None,
) -> tuple[torch.nn.Module, CheckpointInfo]:
    """The model a checkpoint describes, with its weights, at this process's layout.

    For a LoRA checkpoint: the base checkpoint's weights (the recorded path, or ``base`` where it
    has moved; fingerprint checked) plus the adapters, folded into the weights when
    ``merge_adapters`` (inference), else kept as adapters.
    """
    from megatron_yuyuan.config import RunConfig
    from megatron_yuyuan.model import build_model

    ckpt = checkpointing.resolve(load)
    info = checkpointing.read_info(ckpt)
    model = build_model(
        RunConfig(model=info.model, lora=config_of(info)), layout, params_dtype=params_dtype
    )
    if base and not info.lora:
        raise CheckpointError(f"--lora-base: {ckpt} is not a LoRA checkpoint; drop --lora-base")
    if not info.lora:
        checkpointing.load_model(ckpt, model, info.model, layout)
        return model, info
    base = check_base(info, ckpt, base)
    checkpointing.load_model(base, model, info.model, layout, only=is_base_weight)
    load_adapters(ckpt, model, info.model, layout)
    if merge_adapters:
        merge(model)
    return model, info
