"""Process groups: torch.distributed (NCCL on GPUs, gloo on CPU) + megatron-core parallel_state.

The only module that imports ``megatron.core.parallel_state`` and ``megatron.core.tensor_parallel``
(RNG tracker, vocab-parallel cross-entropy). Launch with ``torchrun``; a plain ``python`` run is a
world of one process.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import (  # noqa: F401 (re-exported for the model, LoRA)
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    get_cuda_rng_tracker,
    reduce_from_tensor_model_parallel_region,
    set_tensor_model_parallel_attributes,
    vocab_parallel_cross_entropy,
)

from megatron_yuyuan import cpu_compat
from megatron_yuyuan.errors import UserError
from megatron_yuyuan.runtime import launch_local_rank, launch_rank, launch_world_size


@dataclass(frozen=True)
class Layout:
    """This process's place in the TP x PP x DP grid."""

    world_size: int
    rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def init_distributed(tp: int = 1, pp: int = 1, timeout_s: int = 600) -> Layout:
    """Create the default process group and megatron's TP/PP/DP groups.

    Args:
        tp: tensor-model-parallel size.
        pp: pipeline-model-parallel size.
        timeout_s: collective timeout.
    """
    cpu_compat.apply_if_no_cuda()
    world_size = launch_world_size()
    if world_size % (tp * pp):
        raise UserError(
            f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp} needs a "
            f"multiple of {tp * pp} processes, but {world_size} run: launch with "
            f"torchrun --nproc-per-node {tp * pp}"
        )
    if not dist.is_initialized():
        backend = cpu_compat.distributed_backend()
        if backend == "nccl":
            local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            if local > torch.cuda.device_count():
                raise UserError(
                    f"{local} processes on this node but {torch.cuda.device_count()} GPU(s) "
                    f"visible: launch --nproc-per-node {torch.cuda.device_count()}, or set "
                    f"CUDA_VISIBLE_DEVICES= to run on CPU processes (gloo)"
                )
            torch.cuda.set_device(launch_local_rank())
        # A single process needs no rendezvous: an in-memory store, no port to collide on.
        store = dist.HashStore() if world_size == 1 and "MASTER_ADDR" not in os.environ else None
        dist.init_process_group(
            backend=backend,
            world_size=world_size,
            rank=launch_rank(),
            store=store,
            timeout=timedelta(seconds=timeout_s),
        )
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    return current_layout()


def current_layout() -> Layout:
    return Layout(
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
    )


def destroy_distributed() -> None:
    """Tear down megatron's groups and the default group (tests run several layouts per process)."""
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch, and megatron's tracker for TP-region dropout.

    As in Megatron-LM, each pipeline stage gets its own stream (seed + 100 * pp_rank); weights do
    not use these streams (see :func:`megatron_yuyuan.model.initialize_weights`).
    """
    seed = seed + 100 * ps.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def ensure_model_parallel_rng(seed: int = 1234) -> None:
    """Seed megatron's model-parallel RNG stream if nothing has (e.g. a converter or generator).

    On CUDA megatron allocates weights through the tracker's fork even when they are loaded
    afterwards, and raises "cuda rng state model-parallel-rng is not added" without it.
    """
    tracker = get_cuda_rng_tracker()
    if torch.cuda.is_available() and "model-parallel-rng" not in tracker.get_states():
        tensor_parallel.model_parallel_cuda_manual_seed(
            seed + 100 * ps.get_pipeline_model_parallel_rank()
        )


def dp_group():
    return ps.get_data_parallel_group()


def pp_group():
    return ps.get_pipeline_model_parallel_group()


def pp_last_rank() -> int:
    """Global rank of the last pipeline stage in this process's pipeline group."""
    return ps.get_pipeline_model_parallel_last_rank()


def send_next(tensor: torch.Tensor) -> None:
    """Send an activation to the next pipeline stage."""
    dist.send(tensor.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank(), group=pp_group())


def recv_prev(shape, dtype, device) -> torch.Tensor:
    """Receive an activation from the previous pipeline stage."""
    out = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(out, src=ps.get_pipeline_model_parallel_prev_rank(), group=pp_group())
    return out


def broadcast_from_last_stage(tensor: torch.Tensor) -> torch.Tensor:
    """Every stage of this pipeline gets the last stage's ``tensor`` (same shape and dtype)."""
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(tensor, src=pp_last_rank(), group=pp_group())
    return tensor


def all_reduce_model_parallel(tensor: torch.Tensor) -> None:
    """Sum ``tensor`` (a CPU tensor) over this rank's tensor x pipeline model-parallel group."""
    group = ps.get_model_parallel_group() if dist.is_initialized() else None
    if group is None or dist.get_world_size(group) == 1:
        return
    moved = tensor.cuda() if dist.get_backend() == "nccl" else tensor
    dist.all_reduce(moved, group=group)
    tensor.copy_(moved.cpu())


def is_rank_0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def max_over_ranks(value: int) -> int:
    """The largest of every rank's ``value`` (one small all-reduce; ``value`` itself without a
    process group): how ranks agree on a decision each made alone."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_ranks_true(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank (collective)."""
    return max_over_ranks(0 if flag else 1) == 0


def print_rank_0(*args, **kwargs) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def use_plain_linear_for_inference(model: torch.nn.Module) -> None:
    """Make megatron's column/row-parallel linears compute plain matmuls under
    ``torch.inference_mode`` (generation).

    Their forward goes through a custom ``autograd.Function`` (saving tensors for a backward that
    never comes) and adds the bias in a separate op; during decoding, with a handful of tokens per
    step, that bookkeeping costs as much as the matmul. ``F.linear`` is one fused ``addmm``, as in
    ``transformers``. On a CPU the vocabulary projection (the costliest matmul of a small model)
    multiplies by a cached contiguous ``[h, V]`` copy of the tied embedding instead: BLAS runs the
    skinny ``[b, h] @ [h, V]`` product about 25% faster than with the ``[V, h]`` layout. The
    tensor-parallel communication around the local matmul is unchanged, and outside inference
    mode (training, validation) the original path runs.
    """
    output_layer = getattr(model, "output_layer", None)

    def plain(original, transposed_cache: bool):
        cache: dict = {}

        def forward_impl(input, weight, *args, **kwargs):
            if not torch.is_inference_mode_enabled() or kwargs.get("sequence_parallel"):
                return original(input, weight, *args, **kwargs)
            bias = kwargs.get("bias")
            if not transposed_cache or weight.device.type != "cpu":
                return torch.nn.functional.linear(input, weight, bias)
            key = (weight.data_ptr(), weight._version, weight.shape)
            if cache.get("key") != key:  # weights changed (or first call): refresh the copy
                cache["key"], cache["t"] = key, weight.t().contiguous()  # [h, V]
            out = input @ cache["t"]
            return out if bias is None else out + bias

        return forward_impl

    for module in model.modules():
        if isinstance(
            module, (tensor_parallel.ColumnParallelLinear, tensor_parallel.RowParallelLinear)
        ) and not getattr(module, "_plain_inference_linear", False):
            module._forward_impl = plain(module._forward_impl, module is output_layer)
            module._plain_inference_linear = True


class _TorchWgradAccumulation:
    """Stand-in for Apex/TE's ``fused_weight_gradient_mlp_cuda`` with megatron's call signature:
    ``main_grad += grad_output^T @ input`` as one cuBLAS GEMM with beta = 1, reading bf16/fp16
    operands and accumulating in the fp32 ``main_grad`` (``addmm`` with ``out_dtype``), instead
    of a half-precision weight gradient, its allocation and a separate add per micro-batch."""

    @staticmethod
    def wgrad_gemm_accum_fp32(
        total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor
    ) -> None:
        x = total_input.reshape(-1, total_input.shape[-1])  # [tokens, in]
        dy = grad_output.reshape(-1, grad_output.shape[-1])  # [tokens, out]
        if x.dtype == main_grad.dtype:
            main_grad.addmm_(dy.t(), x)  # [out, in]
        else:
            torch.addmm(main_grad, dy.t(), x, out_dtype=main_grad.dtype, out=main_grad)

    # half-precision main_grad: the same call (its operands then share its dtype)
    wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp32


def _torch_wgrad_accumulation_works() -> bool:
    """Probe the fp32-output GEMM on this GPU once (it needs a recent torch and CUDA)."""
    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(64, 32, device="cuda", dtype=torch.bfloat16, generator=g)
        dy = torch.randn(64, 48, device="cuda", dtype=torch.bfloat16, generator=g)
        acc = torch.ones(48, 32, device="cuda")
        _TorchWgradAccumulation.wgrad_gemm_accum_fp32(x, dy, acc)
        want = 1 + dy.float().t() @ x.float()
        return bool(torch.allclose(acc, want, rtol=1e-3, atol=1e-3))
    except (RuntimeError, TypeError):
        return False


_WGRAD_FUSION: dict[str, bool] = {}


def enable_wgrad_accumulation_fusion() -> bool:
    """Make megatron's ``gradient_accumulation_fusion`` usable on this CUDA machine.

    Apex/TE's compiled kernel is used when importable; otherwise megatron's linear layers are
    given :class:`_TorchWgradAccumulation` (probed once). Returns False where neither works, and
    the config then leaves the fusion off.
    """
    if "ok" not in _WGRAD_FUSION:
        from megatron.core.tensor_parallel import layers

        ok = layers._grad_accum_fusion_available
        if not ok and torch.cuda.is_available() and _torch_wgrad_accumulation_works():
            layers.fused_weight_gradient_mlp_cuda = _TorchWgradAccumulation
            layers._grad_accum_fusion_available = True
            ok = True
        _WGRAD_FUSION["ok"] = ok
    return _WGRAD_FUSION["ok"]
