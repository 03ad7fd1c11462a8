"""The training loop: megatron-core schedules (no-PP loop or 1F1B), mcore DDP, megatron optimizer.

The only module that imports ``megatron.core.distributed`` and ``megatron.core.pipeline_parallel``.
Entry point: ``python -m megatron_yuyuan.finetune`` (see there for the launch command).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.pipeline_parallel import get_forward_backward_func
from tqdm import tqdm

from megatron_yuyuan import checkpointing, parallel
from megatron_yuyuan.config import RunConfig
from megatron_yuyuan.data.batching import micro_batch_indices
from megatron_yuyuan.data.mock import mock_batch
from megatron_yuyuan.data.sft_dataset import QADataset
from megatron_yuyuan.logging_utils import (
    MetricsLogger,
    StepMetrics,
    format_log_line,
    gpu_peak_flops,
)
from megatron_yuyuan.model import build_model, training_flops_per_token, wrap_float16
from megatron_yuyuan.optim import build_optimizer, build_scheduler
from megatron_yuyuan.parallel import Layout


def loss_func(loss_mask: torch.Tensor, losses: torch.Tensor):
    """Sum the per-token losses under the mask, for megatron's schedules.

    Returns the 3-tuple form ``(loss_sum, num_tokens, report)``: with ``calculate_per_token_loss``
    megatron divides gradients by the token count over all micro-batches and DP ranks, so the
    gradient is a true per-token mean whatever the batch split or loss mask.

    Args:
        loss_mask: 1 where the token's loss counts ``[b, s]``.
        losses: per-token cross-entropy from the model's last stage ``[b, s]``.
    """
    mask = loss_mask.float()
    loss_sum = (losses.float() * mask).sum()
    num_tokens = mask.sum()
    # The schedule scales the returned loss in place; report a detached copy.
    positions = torch.tensor(float(mask.numel()), device=mask.device)
    report = torch.stack([loss_sum.detach().clone(), num_tokens.detach(), positions])
    return loss_sum, num_tokens.to(torch.int), {"lm loss": report}


def forward_step(data_iterator: Iterator[dict], model: torch.nn.Module, *, device: torch.device):
    """One micro-batch through this pipeline stage (megatron's forward_step_func contract)."""
    batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items()}
    # No attention_mask: plain causal attention. Packed batches carry a block-diagonal one.
    # The last stage returns per-token losses [b, s].
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                   labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


@dataclass
class TrainState:
    cfg: RunConfig
    layout: Layout
    model: DistributedDataParallel
    optimizer: object
    scheduler: object
    num_microbatches: int
    global_batch_size: int
    iteration: int = 0


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def setup(cfg: RunConfig) -> TrainState:
    """Process groups, seeded model, DDP wrapper, optimizer and LR schedule."""
    layout = parallel.init_distributed(cfg.parallel.tensor_model_parallel_size,
                                       cfg.parallel.pipeline_model_parallel_size)
    parallel.set_seed(cfg.train.seed)
    t = cfg.train
    model = build_model(cfg, layout, seed=None if t.load else t.seed)
    if t.load:
        info = checkpointing.load_model(t.load, model, cfg.model, layout)
        parallel.print_rank_0(f"> loaded weights from {t.load} (saved as {info.dtype}, "
                              f"vocab padded to {info.padded_vocab_size})")
    model = wrap_float16(model.to(device()), cfg)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    model = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    optimizer = build_optimizer(cfg, [model])
    scheduler = build_scheduler(cfg, optimizer)
    config = model.config
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    gbs = t.global_batch_size or t.micro_batch_size * layout.dp
    return TrainState(cfg=cfg, layout=layout, model=model, optimizer=optimizer, scheduler=scheduler,
                      num_microbatches=gbs // (t.micro_batch_size * layout.dp),
                      global_batch_size=gbs)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def build_data_iterator(state: TrainState) -> Iterator[dict]:
    """This rank's micro-batches from the current iteration on (mock or MedQuAD)."""
    cfg, layout, d = state.cfg, state.layout, state.cfg.data
    indices = micro_batch_indices(start_iteration=state.iteration,
                                  global_batch_size=state.global_batch_size,
                                  micro_batch_size=cfg.train.micro_batch_size,
                                  dp_size=layout.dp, dp_rank=layout.dp_rank)
    if d.mock_data:
        return (mock_batch(idx, d.seq_length, cfg.model.vocab_size, cfg.train.seed)
                for idx in indices)
    dataset = QADataset(f"{d.data_prefix}_train", d.seq_length, packing=d.packing,
                        train_on_prompt=d.train_on_prompt, seed=cfg.train.seed)
    parallel.print_rank_0(
        f"> {d.data_prefix}_train: {len(dataset.pairs)} pairs, "
        f"{dataset.samples_per_epoch()} {'packed sequences' if d.packing else 'samples'} per epoch "
        f"of <= {d.seq_length} tokens, {dataset.truncated} pair(s) truncated at the answer's end, "
        f"loss on {'prompt and answer' if d.train_on_prompt else 'answers only'}")
    return (dataset.micro_batch(idx) for idx in indices)


def _reduce_loss(losses: list[dict], layout: Layout) -> tuple[float, int]:
    """Token-weighted mean loss of the step and the positions processed, on every rank."""
    total = torch.zeros(3, dtype=torch.float64)  # loss sum, loss tokens, positions
    for item in losses:  # non-empty on the last stage only
        total += item["lm loss"].to(torch.float64).cpu()
    if dist.get_backend() == "nccl":
        total = total.cuda()
    dist.all_reduce(total, group=parallel.dp_group())
    dist.broadcast(total, src=parallel.pp_last_rank(), group=parallel.pp_group())
    return float(total[0] / total[1].clamp(min=1)), int(total[2])


def train_step(state: TrainState, data_iterator: Iterator[dict],
               forward_backward: Optional[Callable] = None) -> tuple[float, float, bool, int]:
    """One optimizer step over the global batch. Returns (loss, grad_norm, skipped, tokens)."""
    cfg = state.cfg
    forward_backward = forward_backward or get_forward_backward_func()
    state.model.zero_grad_buffer()
    state.optimizer.zero_grad()
    step_fn = partial(forward_step, device=device())
    losses = forward_backward(
        forward_step_func=step_fn, data_iterator=data_iterator, model=[state.model],
        num_microbatches=state.num_microbatches, seq_length=cfg.data.seq_length,
        micro_batch_size=cfg.train.micro_batch_size, forward_only=False)
    ok, grad_norm, _ = state.optimizer.step()
    if ok:
        state.scheduler.step(increment=1)
    state.iteration += 1
    loss, tokens = _reduce_loss(losses, state.layout)
    return loss, float(grad_norm or 0.0), not ok, tokens


def train(cfg: RunConfig) -> list[StepMetrics]:
    """Run ``cfg.train.train_iters`` steps; returns the per-step metrics (on every rank)."""
    state = setup(cfg)
    layout, t = state.layout, cfg.train
    is_logger = layout.rank == 0
    logger = MetricsLogger(t.metrics_file, t.tensorboard_dir) if is_logger else None
    flops_per_token = training_flops_per_token(
        cfg.model, cfg.data.seq_length, cfg.model.padded_vocab_size(layout.tp))
    peak = gpu_peak_flops()
    parallel.print_rank_0(
        f"> training {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size} on "
        f"{layout.world_size} process(es): TP={layout.tp} PP={layout.pp} DP={layout.dp}, "
        f"{state.num_microbatches} micro-batch(es) of {t.micro_batch_size} x {cfg.data.seq_length} "
        f"tokens per step, backend {dist.get_backend()}")
    data = build_data_iterator(state)
    forward_backward = get_forward_backward_func()
    history: list[StepMetrics] = []
    bar = tqdm(total=t.train_iters, desc="train", disable=not is_logger, file=sys.stderr,
               dynamic_ncols=True)
    while state.iteration < t.train_iters:
        parallel.barrier()
        lr = state.optimizer.param_groups[0]["lr"]  # the lr this step uses
        start = time.perf_counter()
        loss, grad_norm, skipped, tokens = train_step(state, data, forward_backward)
        elapsed = time.perf_counter() - start
        tokens_per_s = tokens / elapsed
        metrics = StepMetrics(
            iteration=state.iteration, loss=loss, lr=lr,
            grad_norm=grad_norm, tokens_per_s=tokens_per_s, step_time_s=elapsed, skipped=skipped,
            loss_scale=float(state.optimizer.get_loss_scale()) if t.fp16 else None,
            mfu=(tokens_per_s * flops_per_token / (peak * layout.world_size)) if peak else None)
        history.append(metrics)
        if logger:
            logger.log(metrics)
            if state.iteration % t.log_interval == 0:
                bar.write(format_log_line(metrics, t.train_iters,
                                          state.iteration * state.global_batch_size,
                                          state.global_batch_size))
        bar.set_postfix(loss=f"{loss:.4f}")
        bar.update(1)
    bar.close()
    if t.save:
        path = checkpointing.save_model(t.save, unwrap(state.model), cfg.model, state.iteration,
                                        cfg.model.padded_vocab_size(layout.tp))
        parallel.print_rank_0(f"> saved checkpoint {path}")
    if logger:
        for line in logger.close():
            print(f"> wrote {line}", flush=True)
    return history
