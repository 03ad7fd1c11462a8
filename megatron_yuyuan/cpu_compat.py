"""Every CPU workaround megatron-core 0.16 needs, in one place, applied only when CUDA is absent.

megatron-core assumes CUDA in a handful of spots:
``torch.cuda.current_device()`` as an allocation device, string literals ``device="cuda"`` in the
schedules / optimizer / causal mask, ``Tensor.cuda()``, ``param.type() == 'torch.cuda.FloatTensor'``
checks and a CUDA-only RNG tracker. We patch exactly those spots and nothing else:

* no global ``TorchFunctionMode``: the literal ``device="cuda"`` calls are rewritten by a thin
  ``torch`` proxy installed only in the megatron modules that contain them, so model code runs
  with zero per-op overhead;
* the ``.type()`` spoof is active only while the three megatron functions that check it run;
* on a machine with CUDA, :func:`apply_if_no_cuda` returns at once and megatron-core runs untouched.

Call :func:`apply_if_no_cuda` first in every entry point (and in the test conftest); it is
idempotent.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types
import warnings

import torch

_APPLIED = False

# megatron modules that allocate with a literal ``device="cuda"`` on the paths we use.
_MODULES_WITH_CUDA_LITERALS = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.optimizer",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.transformer.utils",
    "megatron.core.utils",
    "megatron.core.tensor_parallel.data",
)
_FACTORIES = frozenset(
    {
        "zeros",
        "ones",
        "empty",
        "full",
        "tensor",
        "arange",
        "randn",
        "rand",
        "zeros_like",
        "ones_like",
    }
)


def silence_optional_accelerator_warnings() -> None:
    """Hide the 'Apex / Transformer Engine not installed' warnings: both are optional here."""
    warnings.filterwarnings(
        "ignore", message=".*(Apex|Transformer Engine|apex|TransformerEngine).*"
    )
    warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")
    warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")
    # torch.distributed.checkpoint deprecation notices emitted on every dist_checkpointing call.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\..*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"megatron\.core\..*")


def _to_cpu(device):
    """Map any CUDA device spec ("cuda", "cuda:1", torch.device("cuda"), an index) to CPU."""
    if isinstance(device, int) or (isinstance(device, torch.device) and device.type == "cuda"):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    return device


class _CpuTorch(types.ModuleType):
    """A stand-in for the ``torch`` module inside one megatron module: tensor factories called
    with a CUDA device allocate on CPU; every other attribute is torch's own."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name):
        # Called only on the first lookup of a name: the result is cached as an attribute.
        attr = getattr(torch, name)
        if name in _FACTORIES:
            attr = _cpu_factory(attr)
        setattr(self, name, attr)
        return attr


def _cpu_factory(fn):
    @functools.wraps(fn)
    def factory(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu(kwargs["device"])
        kwargs.pop("pin_memory", None)  # pinned memory needs CUDA
        return fn(*args, **kwargs)

    return factory


@contextlib.contextmanager
def _cuda_type_names():
    """While active, ``Tensor.type()`` names CPU float tensors ``torch.cuda.*``.

    megatron's optimizer asserts ``param.type() == 'torch.cuda.FloatTensor'``; the spoof is scoped
    to those calls so no other code ever sees it.
    """
    original = torch.Tensor.type

    def spoofed(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and not self.is_cuda:
            return original(self).replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = spoofed
    try:
        yield
    finally:
        torch.Tensor.type = original


def _with_cuda_type_names(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cuda_type_names():
            return fn(*args, **kwargs)

    return wrapper


def _patch_type_checks() -> None:
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    wrapped = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = wrapped
    optimizer.clip_grad_by_total_norm_fp32 = wrapped  # imported by name there
    dist_opt = distrib_optimizer.DistributedOptimizer
    dist_opt._build_model_and_main_param_groups = staticmethod(
        _with_cuda_type_names(dist_opt._build_model_and_main_param_groups)
    )


def _patch_rng() -> None:
    """Make megatron's 'CUDA' RNG tracker drive the CPU generator.

    Dropout inside tensor-parallel regions forks the tracker, and activation recompute saves and
    restores RNG state through two module-level helpers; both now use ``torch.get_rng_state``.
    Seeds stay upstream's (data parallel = seed, model parallel = seed + 2718 + tp_rank).
    """
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)

    def add(self, name, seed):
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
        # Upstream's fork, minus its "CPU RNG state changed" warning: on CPU the tracked stream
        # *is* the CPU generator, so the state always changes inside the fork.
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)

    mrandom.CudaRNGStatesTracker.add = add
    mrandom.CudaRNGStatesTracker.fork = fork


def _patch_dist_checkpointing() -> None:
    """The async filesystem writer calls ``torch.cuda.synchronize`` (stubbed below) and needs
    psutil, which megatron-core does not declare; without it the writer subprocess dies and the
    save hangs."""
    try:
        import psutil  # noqa: F401
    except ImportError:
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        filesystem_async._process_memory = lambda: 0


def apply_if_no_cuda() -> bool:
    """Apply the CPU patches when CUDA is unavailable. Returns True when they are in force."""
    global _APPLIED
    silence_optional_accelerator_warnings()
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    # Allocation sites that ask for the "current CUDA device" get the CPU instead.
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None
    # Only ever reached on CPU tensors here, where the real method would raise.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    cpu_torch = _CpuTorch()
    for name in _MODULES_WITH_CUDA_LITERALS:
        importlib.import_module(name).torch = cpu_torch
    _patch_type_checks()
    _patch_rng()
    _patch_dist_checkpointing()
    _APPLIED = True
    return True


def distributed_backend() -> str:
    """NCCL on GPUs, gloo on CPU."""
    return "nccl" if torch.cuda.is_available() else "gloo"
