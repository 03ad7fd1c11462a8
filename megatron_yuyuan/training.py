"""The training loop: megatron-core schedules (no-PP loop or 1F1B), mcore DDP, megatron optimizer.

The only module that imports ``megatron.core.distributed`` and ``megatron.core.pipeline_parallel``.
Entry point: ``python -m megatron_yuyuan.finetune`` (see there for the launch command).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
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
    plot_loss_curve,
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
    output = model(
        batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"]
    )
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
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def setup(cfg: RunConfig) -> TrainState:
    """Process groups, seeded model, DDP wrapper, optimizer and LR schedule."""
    layout = parallel.init_distributed(
        cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    )
    parallel.set_seed(cfg.train.seed)
    t = cfg.train
    source = start_checkpoint(cfg)
    gpt = build_model(cfg, layout, seed=None if source else t.seed)
    model = wrap_float16(gpt.to(device()), cfg)
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
    state = TrainState(
        cfg=cfg,
        layout=layout,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        num_microbatches=gbs // (t.micro_batch_size * layout.dp),
        global_batch_size=gbs,
    )
    if source:
        state.iteration = checkpointing.load_training_checkpoint(
            source,
            gpt,
            optimizer,
            scheduler,
            cfg.model,
            layout,
            finetune=t.finetune or source != t.load,
        )
        if state.iteration == 0:  # weights only: mixed precision's fp32 main weights follow them
            optimizer.reload_model_params()
        parallel.print_rank_0(
            f"> loaded {source}: "
            + (
                f"resuming at iteration {state.iteration}"
                if state.iteration
                else "weights only, starting at iteration 0"
            )
        )
    return state


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def start_checkpoint(cfg: RunConfig) -> Optional[str]:
    """What to load: --load when it holds a checkpoint, else --pretrained-checkpoint, else None."""
    t = cfg.train
    if t.load and checkpointing.has_checkpoint(t.load):
        return t.load
    return t.pretrained_checkpoint


def build_data_iterator(
    state: TrainState, split: str = "train", start_iteration: Optional[int] = None
) -> Iterator[dict]:
    """This rank's micro-batches from ``start_iteration`` (default: the current one) on."""
    cfg, layout, d = state.cfg, state.layout, state.cfg.data
    start = state.iteration if start_iteration is None else start_iteration
    indices = micro_batch_indices(
        start_iteration=start,
        global_batch_size=state.global_batch_size,
        micro_batch_size=cfg.train.micro_batch_size,
        dp_size=layout.dp,
        dp_rank=layout.dp_rank,
    )
    if d.mock_data:
        seed = cfg.train.seed + (0 if split == "train" else 1)  # validation: other samples
        return (mock_batch(idx, d.seq_length, cfg.model.vocab_size, seed) for idx in indices)
    dataset = QADataset(
        f"{d.data_prefix}_{split}",
        d.seq_length,
        packing=d.packing,
        train_on_prompt=d.train_on_prompt,
        seed=cfg.train.seed,
    )
    if split != "train":
        return (dataset.micro_batch(idx) for idx in indices)
    parallel.print_rank_0(
        f"> {d.data_prefix}_train: {len(dataset.pairs)} pairs, "
        f"{dataset.samples_per_epoch()} {'packed sequences' if d.packing else 'samples'} per epoch "
        f"of <= {d.seq_length} tokens, {dataset.truncated} pair(s) truncated at the answer's end, "
        f"loss on {'prompt and answer' if d.train_on_prompt else 'answers only'}"
    )
    return (dataset.micro_batch(idx) for idx in indices)


def _reduce_loss(losses: list[dict], layout: Layout) -> tuple[float, int]:
    """Token-weighted mean loss and the positions processed, summed over micro-batches, DP ranks
    and (from the last stage) known on every pipeline stage."""
    total = torch.zeros(3, dtype=torch.float64)  # loss sum, loss tokens, positions
    for item in losses:  # non-empty on the last stage only
        total += item["lm loss"].to(torch.float64).cpu()
    if layout.dp > 1 or layout.pp > 1:  # collectives on one-rank groups only cost time
        if dist.get_backend() == "nccl":
            total = total.cuda()
        dist.all_reduce(total, group=parallel.dp_group())
        dist.broadcast(total, src=parallel.pp_last_rank(), group=parallel.pp_group())
    return float(total[0] / total[1].clamp(min=1)), int(total[2])


def _run_schedule(
    state: TrainState, data_iterator: Iterator[dict], forward_backward: Callable, forward_only: bool
) -> list[dict]:
    """One global batch through megatron's schedule; the last stage's per-micro-batch reports."""
    cfg = state.cfg
    return forward_backward(
        forward_step_func=partial(forward_step, device=device()),
        data_iterator=data_iterator,
        model=[state.model],
        num_microbatches=state.num_microbatches,
        seq_length=cfg.data.seq_length,
        micro_batch_size=cfg.train.micro_batch_size,
        forward_only=forward_only,
    )


def train_step(
    state: TrainState, data_iterator: Iterator[dict], forward_backward: Optional[Callable] = None
) -> tuple[float, float, bool, int]:
    """One optimizer step over the global batch. Returns (loss, grad_norm, skipped, tokens)."""
    state.model.zero_grad_buffer()
    state.optimizer.zero_grad()
    losses = _run_schedule(
        state, data_iterator, forward_backward or get_forward_backward_func(), forward_only=False
    )
    ok, grad_norm, _ = state.optimizer.step()
    if ok:
        state.scheduler.step(increment=1)
    state.iteration += 1
    loss, tokens = _reduce_loss(losses, state.layout)
    return loss, float(grad_norm or 0.0), not ok, tokens


@torch.no_grad()
def validation_loss(state: TrainState, forward_backward: Callable) -> float:
    """Mean token loss over the first ``eval_iters`` global batches of the validation split."""
    data = build_data_iterator(state, "valid", start_iteration=0)
    state.model.eval()
    losses = []
    for _ in range(state.cfg.train.eval_iters):
        losses += _run_schedule(state, data, forward_backward, forward_only=True)
    state.model.train()
    return _reduce_loss(losses, state.layout)[0]


def save(state: TrainState) -> None:
    path = checkpointing.save_training_checkpoint(
        state.cfg.train.save,
        unwrap(state.model),
        state.optimizer,
        state.scheduler,
        state.iteration,
        state.cfg,
        state.layout,
    )
    parallel.print_rank_0(f"> saved checkpoint {path}")


def score_validation_answers(state: TrainState, out_dir: Path) -> None:
    """Generate answers for the first N validation questions with the trained model; BLEU table."""
    from megatron_yuyuan.data.indexed import read_meta
    from megatron_yuyuan.evaluate import evaluate, print_summary
    from megatron_yuyuan.generate import MegatronGenerator, SamplingConfig, generate_file
    from megatron_yuyuan.tokenizer import load_tokenizer

    cfg = state.cfg
    prefix = cfg.data.data_prefix
    tokenizer = load_tokenizer(read_meta(prefix)["tokenizer"])
    gen = MegatronGenerator(unwrap(state.model), state.layout, cfg.model, tokenizer)
    n = cfg.train.eval_bleu_samples
    preds = out_dir / "predictions_valid.jsonl"
    written = generate_file(
        gen,
        Path(f"{prefix}_valid.jsonl"),
        preds,
        SamplingConfig(max_new_tokens=cfg.train.eval_max_new_tokens),
        batch_size=8,
        limit=n,
    )
    state.model.train()
    if written is None:
        return
    refs = out_dir / "references_valid.jsonl"
    refs.write_text(
        "".join(line + "\n" for line in Path(f"{prefix}_valid.jsonl").read_text().splitlines()[:n])
    )
    report = evaluate(refs, {"finetuned": preds}, out_dir)
    print_summary(report)
    print(f"> wrote {preds} and {out_dir / 'report.md'}", flush=True)


def train(cfg: RunConfig) -> list[StepMetrics]:
    """Run ``cfg.train.train_iters`` steps; returns the per-step metrics (on every rank)."""
    state = setup(cfg)
    layout, t = state.layout, cfg.train
    is_logger = layout.rank == 0
    logger = MetricsLogger(t.metrics_file, t.tensorboard_dir) if is_logger else None
    flops_per_token = training_flops_per_token(
        cfg.model, cfg.data.seq_length, cfg.model.padded_vocab_size(layout.tp)
    )
    peak = gpu_peak_flops()
    parallel.print_rank_0(
        f"> training {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size} on "
        f"{layout.world_size} process(es): TP={layout.tp} PP={layout.pp} DP={layout.dp}, "
        f"{state.num_microbatches} micro-batch(es) of {t.micro_batch_size} x {cfg.data.seq_length} "
        f"tokens per step, backend {dist.get_backend()}"
    )
    data = build_data_iterator(state)
    forward_backward = get_forward_backward_func()
    history: list[StepMetrics] = []
    valid_history: list[tuple[int, float]] = []
    out_dir = Path(t.save) if t.save else Path(t.metrics_file).parent if t.metrics_file else None
    bar = tqdm(
        total=t.train_iters,
        initial=state.iteration,
        desc="train",
        disable=not is_logger,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    while state.iteration < t.train_iters:
        parallel.barrier()
        lr = state.optimizer.param_groups[0]["lr"]  # the lr this step uses
        start = time.perf_counter()
        loss, grad_norm, skipped, tokens = train_step(state, data, forward_backward)
        elapsed = time.perf_counter() - start
        tokens_per_s = tokens / elapsed
        metrics = StepMetrics(
            iteration=state.iteration,
            loss=loss,
            lr=lr,
            grad_norm=grad_norm,
            tokens_per_s=tokens_per_s,
            step_time_s=elapsed,
            skipped=skipped,
            loss_scale=float(state.optimizer.get_loss_scale()) if t.fp16 else None,
            mfu=(tokens_per_s * flops_per_token / (peak * layout.world_size)) if peak else None,
        )
        history.append(metrics)
        if logger:
            logger.log(metrics)
            if state.iteration % t.log_interval == 0:
                bar.write(
                    format_log_line(
                        metrics,
                        t.train_iters,
                        state.iteration * state.global_batch_size,
                        state.global_batch_size,
                    )
                )
        bar.set_postfix(loss=f"{loss:.4f}")
        bar.update(1)
        last = state.iteration == t.train_iters
        if t.eval_interval and (state.iteration % t.eval_interval == 0 or last):
            valid = validation_loss(state, forward_backward)
            valid_history.append((state.iteration, valid))
            if logger:
                logger.log_validation(state.iteration, valid)
                bar.write(
                    f" validation loss at iteration {state.iteration}: {valid:.6E} | "
                    f"ppl: {math.exp(min(valid, 50)):.3f}"
                )
        if t.save and ((t.save_interval and state.iteration % t.save_interval == 0) or last):
            save(state)
            if logger:
                plot_loss_curve(history, valid_history, Path(t.save) / "loss_curve.png")
    bar.close()
    if t.eval_bleu_samples and cfg.data.data_prefix and out_dir is not None:
        score_validation_answers(state, out_dir / "eval")
    if logger and out_dir is not None and history:
        curve = plot_loss_curve(history, valid_history, out_dir / "loss_curve.png")
        print(f"> wrote {curve}", flush=True)
    if logger:
        for line in logger.close():
            print(f"> wrote {line}", flush=True)
    return history
