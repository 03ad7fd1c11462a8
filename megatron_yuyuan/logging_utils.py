"""Training metrics: Megatron-style log lines, a JSON-lines metrics file, TensorBoard scalars, MFU."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

# Dense bf16/fp16 tensor-core peak per GPU, FLOP/s (vendor datasheets), for MFU.
_PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10": 125e12,
    "L40S": 362e12,
    "V100": 125e12,
}


def gpu_peak_flops() -> Optional[float]:
    """Peak FLOP/s of this process's GPU, or None (CPU, or a GPU we do not know)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, flops in _PEAK_FLOPS.items():
        if key in name:
            return flops
    return None


@dataclass
class StepMetrics:
    """One optimizer step, as written to --metrics-file (one JSON object per line)."""

    iteration: int
    loss: float
    lr: float
    grad_norm: float
    tokens_per_s: float
    step_time_s: float
    skipped: bool = False
    loss_scale: Optional[float] = None
    mfu: Optional[float] = None

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None})


class MetricsLogger:
    """Writes each step to the metrics file and TensorBoard, and formats Megatron-style lines.

    Only the process that logs (global rank 0) creates one.
    """

    def __init__(self, metrics_file: Optional[str], tensorboard_dir: Optional[str]) -> None:
        self.metrics_path = Path(metrics_file) if metrics_file else None
        self._metrics = None
        if self.metrics_path:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            # Append: a resumed run continues the same file.
            self._metrics = self.metrics_path.open("a")
        self.tensorboard_dir = tensorboard_dir
        self._tb = None
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=tensorboard_dir)
        self.start = time.time()

    def log(self, m: StepMetrics) -> None:
        if self._metrics:
            self._metrics.write(m.to_json() + "\n")
            self._metrics.flush()
        if self._tb:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s", "loss_scale", "mfu"):
                value = getattr(m, key)
                if value is not None and math.isfinite(value):
                    self._tb.add_scalar(f"train/{key}", value, m.iteration)

    def log_validation(self, iteration: int, loss: float) -> None:
        if self._metrics:
            self._metrics.write(json.dumps({"iteration": iteration, "valid_loss": loss}) + "\n")
            self._metrics.flush()
        if self._tb:
            self._tb.add_scalar("valid/loss", loss, iteration)

    def close(self) -> list[str]:
        """Close the files; return a line per output written."""
        written = []
        if self._metrics:
            self._metrics.close()
            written.append(f"metrics: {self.metrics_path}")
        if self._tb:
            self._tb.close()
            written.append(f"tensorboard: {self.tensorboard_dir}")
        return written


def format_log_line(
    m: StepMetrics, train_iters: int, consumed_samples: int, global_batch_size: int
) -> str:
    """A log line in Megatron-LM's layout."""
    parts = [
        f" [{time.strftime('%Y-%m-%d %H:%M:%S')}] iteration {m.iteration:8d}/{train_iters:8d}",
        f"consumed samples: {consumed_samples:12d}",
        f"elapsed time per iteration (ms): {m.step_time_s * 1000:.1f}",
        f"throughput (tokens/s): {m.tokens_per_s:.1f}",
        f"learning rate: {m.lr:.6E}",
        f"global batch size: {global_batch_size:5d}",
        f"lm loss: {m.loss:.6E}",
    ]
    if m.loss_scale is not None:
        parts.append(f"loss scale: {m.loss_scale:.1f}")
    parts.append(f"grad norm: {m.grad_norm:.3f}")
    if m.mfu is not None:
        parts.append(f"MFU: {100 * m.mfu:.1f}%")
    parts.append(f"number of skipped iterations: {int(m.skipped):3d}")
    return " | ".join(parts) + " |"


def plot_loss_curve(history: list[StepMetrics], valid: list[tuple[int, float]], path: Path) -> Path:
    """Training loss per iteration (and validation loss points) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([m.iteration for m in history], [m.loss for m in history], label="train loss", lw=1)
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
