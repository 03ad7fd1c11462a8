"""What an issue report needs to know about this machine: the versions of the packages that decide
numerics and speed, the devices torch sees, and which optional GPU accelerators are installed.

Optional accelerators are looked up, never imported: a broken Apex or Transformer Engine build
must not break the report that is meant to diagnose it.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from importlib import metadata

# distributions that decide numerics, speed or file formats (name as pip knows it)
PACKAGES = (
    "megatron_yuyuan",
    "torch",
    "megatron-core",
    "transformers",
    "tokenizers",
    "safetensors",
    "numpy",
    "nltk",
    "sacrebleu",
    "datasets",
    "fastapi",
    "uvicorn",
)
# optional GPU accelerators: (import name, distribution names to read the version from)
ACCELERATORS = (
    ("apex", ("apex",)),
    ("transformer_engine", ("transformer-engine", "transformer_engine")),
    ("flash_attn", ("flash-attn", "flash_attn")),
)
ENV_VARS = ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "RANK", "WORLD_SIZE", "MASTER_ADDR")


def version(distribution: str) -> str:
    """The installed version of ``distribution``, or ``not installed``."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def accelerator(module: str, distributions: tuple[str, ...]) -> str:
    """``found <version>`` when ``module`` could be imported, else ``not found``."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return "not found"
    for dist in distributions:
        found = version(dist)
        if found != "not installed":
            return f"found {found}"
    return "found"


def devices() -> list[tuple[str, str]]:
    """torch's build and the devices it sees."""
    import torch

    rows = [
        ("torch CUDA build", torch.version.cuda or "none (CPU build)"),
        ("CUDA available", str(torch.cuda.is_available())),
    ]
    if torch.cuda.is_available():
        rows.append(("cuDNN", str(torch.backends.cudnn.version())))
        rows.append(("NCCL", ".".join(map(str, torch.cuda.nccl.version()))))
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            rows.append(
                (
                    f"GPU {i}",
                    f"{p.name}, {p.total_memory / 2**30:.1f} GiB, compute {p.major}.{p.minor}, "
                    f"bf16 {'yes' if p.major >= 8 else 'no'}",
                )
            )
    dist = torch.distributed
    backends = [b for b, ok in (("gloo", dist.is_gloo_available()),
                                 ("nccl", dist.is_nccl_available())) if ok]  # fmt: skip
    rows.append(("distributed backends", ", ".join(backends) or "none"))
    rows.append(("CPU cores", f"{os.cpu_count()} (torch uses {torch.get_num_threads()} threads)"))
    return rows


def report() -> list[tuple[str, list[tuple[str, str]]]]:
    """Sections of ``(name, value)`` rows."""
    system = [
        ("python", f"{sys.version.split()[0]} ({sys.executable})"),
        ("platform", platform.platform()),
    ]
    packages = [(name, version(name)) for name in PACKAGES]
    accelerators = [(module, accelerator(module, dists)) for module, dists in ACCELERATORS]
    env = [(name, os.environ[name]) for name in ENV_VARS if name in os.environ]
    sections = [
        ("system", system),
        ("packages", packages),
        ("devices", devices()),
        ("optional accelerators", accelerators),
    ]
    if env:
        sections.append(("environment", env))
    return sections
