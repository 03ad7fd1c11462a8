"""Training metrics: Megatron-style log lines, a JSON-lines metrics file, TensorBoard scalars,
MFU."""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from megatron_yuyuan.files import save_figure_atomic, write_text_atomic

# Dense bf16 tensor-core peak per GPU, FLOP/s, from the vendors' datasheets, keyed by the exact
# name CUDA reports: PCIe, NVL and SXM parts of one chip differ (H100 SXM 989, NVL 835, PCIe 756).
PEAK_BF16_FLOPS = {
    "NVIDIA H200": 989e12,
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H800": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A10": 125e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA L4": 121e12,
    "NVIDIA GH200 480GB": 989e12,
}


def gpu_peak_flops() -> tuple[str, float] | None:
    """(GPU name, dense bf16 peak FLOP/s) of this process's GPU; None on a CPU or an unknown GPU
    (then no MFU is reported rather than a guessed one). ``MEGATRON_YUYUAN_PEAK_TFLOPS``
    overrides."""
    if not torch.cuda.is_available():
        return None
    import os

    name = torch.cuda.get_device_name()
    override = os.environ.get("MEGATRON_YUYUAN_PEAK_TFLOPS")
    if override:
        return name, float(override) * 1e12
    flops = PEAK_BF16_FLOPS.get(name)
    return (name, flops) if flops else None


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
    consumed_samples: int | None = None
    peak_memory_gb: float | None = None
    loss_scale: float | None = None
    mfu: float | None = None

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None})


class MetricsLogger:
    """Writes each step to the metrics file and TensorBoard, and formats Megatron-style lines.

    Only the process that logs (global rank 0) creates one.
    """

    def __init__(
        self,
        metrics_file: str | None,
        tensorboard_dir: str | None,
        start_iteration: int = 0,
        tracking=None,
    ) -> None:
        self.tracking = tracking  # a megatron_yuyuan.tracking.Tracking: W&B / MLflow
        self.metrics_path = Path(metrics_file) if metrics_file else None
        self._metrics = None
        if self.metrics_path:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            # A resumed run continues the same file: rows that a killed run wrote after the
            # checkpoint it resumes from are dropped, so each iteration has one row.
            keep_rows_through(self.metrics_path, start_iteration)
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
        if self.tracking:
            keys = ("loss", "lr", "grad_norm", "tokens_per_s", "loss_scale", "mfu")
            self.tracking.log(m.iteration, {k: getattr(m, k) for k in keys})

    def log_validation(
        self, iteration: int, loss: float, per_source: dict[str, float] | None = None
    ) -> None:
        """The validation loss, and a blend's loss per prefix (``valid_loss[PREFIX]``)."""
        row = {"iteration": iteration, "valid_loss": loss}
        row.update({f"valid_loss[{p}]": v for p, v in (per_source or {}).items()})
        if self._metrics:
            self._metrics.write(json.dumps(row) + "\n")
            self._metrics.flush()
        if self._tb:
            self._tb.add_scalar("valid/loss", loss, iteration)
            for p, v in (per_source or {}).items():
                self._tb.add_scalar(f"valid/loss/{Path(p).name}", v, iteration)
        if self.tracking:
            # trackers take letters, digits and _-. /: a prefix's name is cut to those
            named = {
                "valid_loss/" + re.sub(r"[^\w.\- /]", "_", Path(p).name): v
                for p, v in (per_source or {}).items()
            }
            self.tracking.log(iteration, {"valid_loss": loss, **named})

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


def keep_rows_through(path: Path, iteration: int) -> int:
    """Rewrite a metrics file (atomically) without rows after ``iteration``; returns the rows
    dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if isinstance(row, dict) and row.get("iteration", 0) <= iteration:
            kept.append(line)
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(line + "\n" for line in kept))
    return len(lines) - len(kept)


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
    return save_figure_atomic(fig, path, dpi=100)
