"""Where this process runs: its place in the job as the launcher (torchrun, Slurm via torchrun)
announced it, and the device it computes on.

The launcher facts are read from the environment only, so the command-line layer can ask them
(e.g. "print errors on rank 0") before torch is imported or any process group exists.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def launch_rank() -> int:
    """This process's global rank (0 for a plain process)."""
    return int(os.environ.get("RANK", "0"))


def launch_local_rank() -> int:
    """This process's rank on its machine: the GPU it drives (0 for a plain process)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def launch_world_size() -> int:
    """Processes in the job (1 for a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def device() -> torch.device:
    """The device this process computes on: its current CUDA device, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
