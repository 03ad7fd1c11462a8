"""The training loop: megatron-core schedules (no-PP loop or 1F1B), mcore DDP, megatron optimizer.

The only module that imports ``megatron.core.distributed`` and ``megatron.core.pipeline_parallel``.
Entry point: ``python -m megatron_yuyuan.finetune`` (see there for the launch command).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.pipeline_parallel import get_forward_backward_func
from tqdm import tqdm

from megatron_yuyuan import lora, parallel, runtime
from megatron_yuyuan.checkpoint import adapters, loader, storage
from megatron_yuyuan.checkpoint.resume import load_training_checkpoint, save_training_checkpoint
from megatron_yuyuan.config import RunConfig
from megatron_yuyuan.data.batching import micro_batch_indices
from megatron_yuyuan.data.blend import BlendedQA
from megatron_yuyuan.data.indexed import read_meta, verify_split
from megatron_yuyuan.data.mock import mock_batch
from megatron_yuyuan.data.sft_dataset import QADataset
from megatron_yuyuan.errors import DataError, TrainingError
from megatron_yuyuan.files import human_bytes
from megatron_yuyuan.logging_utils import (
    MetricsLogger,
    StepMetrics,
    format_log_line,
    gpu_peak_flops,
    plot_loss_curve,
)
from megatron_yuyuan.model import build_model, thd_params, training_flops_per_token, wrap_float16
from megatron_yuyuan.optim import build_optimizer, build_scheduler, seed_main_params, use_fused_adam
from megatron_yuyuan.parallel import Layout
from megatron_yuyuan.preemption import ExitRequests, Stop, default_enabled, mark_stopped
from megatron_yuyuan.prompts import PromptTemplate

MAX_SKIPPED_IN_A_ROW = 30
"""fp16: a loss scale that halves every other skipped step reaches its floor from 2^12 in ~26
steps; more skips in a row mean NaNs that no scale fixes."""


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
    # torch.full, not torch.tensor: a host-to-device copy would wait for the GPU every micro-batch
    positions = torch.full((), float(mask.numel()), device=mask.device)
    report = torch.stack([loss_sum.detach().clone(), num_tokens.detach(), positions])
    return loss_sum, num_tokens.to(torch.int), {"lm loss": report}


def forward_step(data_iterator: Iterator[dict], model: torch.nn.Module, *, device: torch.device):
    """One micro-batch through this pipeline stage (megatron's forward_step_func contract)."""
    batch = next(data_iterator)
    max_seqlen = batch.pop("max_seqlen", None)  # THD batches; a CPU tensor: no GPU sync
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    # No attention_mask: plain causal attention. Packed batches carry a block-diagonal one, or
    # come flattened to [1, b * s] with pair boundaries (THD).
    packed = None
    if "cu_seqlens" in batch:
        packed = thd_params(batch.pop("cu_seqlens"), int(max_seqlen))
    # The last stage returns per-token losses [b, s].
    output = model(
        batch["tokens"],
        batch["position_ids"],
        batch.get("attention_mask"),
        labels=batch["labels"],
        packed_seq_params=packed,
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
    consumed_samples: int = 0
    """Training samples read so far: where the data stream continues."""
    skipped_in_a_row: int = 0
    """fp16 steps skipped for overflow since the last good one."""
    lora_record: dict | None = None
    """LoRA runs (rank 0): the adapters' settings and base checkpoint, saved with them."""
    train_data: object = None
    """The training split (a QADataset or a BlendedQA) once opened."""
    prompt_template: str | None = None
    """The data's prompt template, recorded in every checkpoint (None: mock data)."""


def setup(cfg: RunConfig) -> TrainState:
    """Process groups, seeded model, DDP wrapper, optimizer and LR schedule."""
    layout = parallel.init_distributed(
        cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    )
    parallel.set_seed(cfg.train.seed)
    t = cfg.train
    source = start_checkpoint(cfg)
    gpt = build_model(cfg, layout, seed=None if source else t.seed)
    lora.add_adapters(
        gpt, cfg.lora, layout, seed=t.seed, full_recompute=cfg.train.recompute_granularity == "full"
    )
    adapters_saved = False
    if cfg.lora.enabled:
        # The frozen base comes from its own checkpoint; the adapters start from the seed, or
        # come back (with their optimizer state) from the LoRA checkpoint being resumed.
        saved = loader.open_checkpoint(source, base_override(cfg, source))
        adapters_saved = saved.info.lora is not None  # resumed, or (--finetune) their weights only
        base = saved.weights
        loader.load_weights(saved, gpt, cfg.model, layout, with_adapters=False)
    model = wrap_float16(gpt.to(runtime.device()), cfg)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce(cfg),
        overlap_param_gather=overlap_param_gather(cfg),
        bucket_size=cfg.parallel.ddp_bucket_size,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        check_for_nan_in_grad=False,  # the loss and grad norm are checked every step instead
    )
    model = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    optimizer = build_optimizer(cfg, [model], overlap_param_gather(cfg))
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
        prompt_template=run_template(cfg),
    )
    if cfg.lora.enabled:
        trainable, total = lora.parameter_counts(gpt, layout)
        parallel.print_rank_0(
            f"> LoRA rank {cfg.lora.lora_rank}, alpha {cfg.lora.lora_alpha:g} on "
            f"{','.join(cfg.lora.targets)}: {trainable:,} trainable of {total:,} parameters "
            f"({100 * trainable / total:.2f}%), base {base}"
        )
        state.lora_record = (
            adapters.checkpoint_record(cfg.lora, base) if parallel.is_rank_0() else None
        )
    if cfg.lora.enabled and not adapters_saved:
        parallel.print_rank_0(f"> loaded base weights {base}; adapters initialised from the seed")
    elif source:
        resumed = load_training_checkpoint(
            source,
            gpt,
            optimizer,
            scheduler,
            cfg.model,
            layout,
            finetune=t.finetune or source != t.load,
            global_batch_size=gbs,
            adapters_only=cfg.lora.enabled,
        )
        state.iteration, state.consumed_samples = resumed.iteration, resumed.consumed_samples
        if resumed.weights is not None:  # weights only: seed the fp32 main weights from them
            seed_main_params(optimizer, gpt, resumed.weights)
        parallel.print_rank_0(
            f"> loaded {source}: "
            + (
                f"resuming at iteration {state.iteration} after {state.consumed_samples} samples"
                if state.iteration
                else "weights only, starting at iteration 0"
            )
        )
    if fused_adam(cfg):
        use_fused_adam(optimizer)
    return state


def run_template(cfg: RunConfig) -> str | None:
    """The prompt template this run's checkpoints record: the data's (every prefix of a blend has
    the same, checked up front), else the one of the checkpoint it starts from."""
    if cfg.data.data_prefix:
        prefix = cfg.data.blend()[0][1]
        return PromptTemplate.from_meta(read_meta(prefix), f"{prefix}_meta.json").text
    start = start_checkpoint(cfg)
    if start and storage.has_checkpoint(start):
        return storage.read_info(storage.resolve(start)).prompt_template
    return None


def base_override(cfg: RunConfig, source: str) -> str | None:
    """--pretrained-checkpoint as the base of the LoRA checkpoint ``source`` (a moved base), unless
    it is that checkpoint or another LoRA one (then the recorded base is used), or ``source`` is a
    full checkpoint (the base itself)."""
    pretrained = cfg.train.pretrained_checkpoint
    if not pretrained or Path(pretrained).resolve() == Path(source).resolve():
        return None
    if not storage.read_info(storage.resolve(source)).lora:
        return None
    if storage.read_info(storage.resolve(pretrained)).lora:
        return None
    return pretrained


def fused_adam(cfg: RunConfig) -> bool:
    """Resolve --fused-adam (None: on with CUDA)."""
    flag = cfg.train.fused_adam
    return torch.cuda.is_available() if flag is None else flag


def packed_thd(cfg: RunConfig) -> bool:
    """Whether packed micro-batches use the THD layout (resolves --packed-format auto)."""
    d, t = cfg.data, cfg.train
    if not (d.packing and d.data_prefix) or d.packed_format == "mask":
        return False
    if d.packed_format == "thd":
        return True
    return (
        (t.bf16 or t.fp16)
        and torch.cuda.is_available()
        and torch.cuda.get_device_capability() >= (8, 0)
    )


def overlap_grad_reduce(cfg: RunConfig) -> bool:
    """Resolve --overlap-grad-reduce (None: on with CUDA)."""
    flag = cfg.parallel.overlap_grad_reduce
    return torch.cuda.is_available() if flag is None else flag


def overlap_param_gather(cfg: RunConfig) -> bool:
    """Resolve --overlap-param-gather (None: on with CUDA and the distributed optimizer)."""
    flag = cfg.parallel.overlap_param_gather
    if flag is None:
        flag = torch.cuda.is_available()
    return flag and cfg.parallel.use_distributed_optimizer


def sync_params(state: TrainState) -> None:
    """Finish the overlapped parameter all-gather, so every rank's weights are the stepped ones
    (before saving them or handing the model to generation)."""
    if overlap_param_gather(state.cfg):
        state.model.start_param_sync(force_sync=True)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def start_checkpoint(cfg: RunConfig) -> str | None:
    """What to load: --load when it holds a checkpoint, else --pretrained-checkpoint, else None."""
    t = cfg.train
    if t.load and storage.has_checkpoint(t.load):
        return t.load
    return t.pretrained_checkpoint


def open_split(cfg: RunConfig, split: str, only: str | None = None):
    """A split of the preprocessed dataset (a :class:`BlendedQA` over a blend's prefixes, or the
    prefix ``only``), checked against its manifest and the model."""
    d = cfg.data
    blend = [(w, p) for w, p in d.blend() if only is None or p == only]
    sets = []
    for _, base in blend:
        prefix = f"{base}_{split}"
        verify_split(prefix)
        dataset = QADataset(
            prefix,
            d.seq_length,
            packing=d.packing,
            train_on_prompt=d.train_on_prompt,
            seed=cfg.train.seed,
        )
        if dataset.max_token_id >= cfg.model.vocab_size:
            raise DataError(
                f"{prefix}: token id {dataset.max_token_id} is outside the model's vocabulary "
                f"({cfg.model.vocab_size} ids): preprocess with the model's tokenizer or use a "
                f"model with a larger vocab_size"
            )
        sets.append(dataset)
    return sets[0] if len(sets) == 1 else BlendedQA(sets, [w for w, _ in blend])


def build_data_iterator(
    state: TrainState,
    split: str = "train",
    consumed_samples: int | None = None,
    only: str | None = None,
) -> Iterator[dict]:
    """This rank's micro-batches from ``consumed_samples`` (default: the run's position) on;
    ``only`` reads one prefix of a blend."""
    cfg, layout, d = state.cfg, state.layout, state.cfg.data
    start = state.consumed_samples if consumed_samples is None else consumed_samples
    indices = micro_batch_indices(
        consumed_samples=start,
        global_batch_size=state.global_batch_size,
        micro_batch_size=cfg.train.micro_batch_size,
        dp_size=layout.dp,
        dp_rank=layout.dp_rank,
    )
    if d.mock_data:
        seed = cfg.train.seed + (0 if split == "train" else 1)  # validation: other samples
        return _pinned(mock_batch(idx, d.seq_length, cfg.model.vocab_size, seed) for idx in indices)
    dataset = open_split(cfg, split, only)
    thd = packed_thd(cfg)
    if split != "train":
        return _pinned(dataset.micro_batch(idx, thd=thd) for idx in indices)
    state.train_data = dataset
    kind = f"packed sequences ({'THD' if thd else 'masks'})" if d.packing else "samples"
    for (weight, prefix), ds in zip(d.blend(), getattr(dataset, "datasets", [dataset])):
        share = f", weight {weight:g}" if isinstance(dataset, BlendedQA) else ""
        parallel.print_rank_0(
            f"> {prefix}_train: {len(ds.pairs)} examples, "
            f"{ds.samples_per_epoch()} {kind} per epoch of <= {d.seq_length} tokens, "
            f"{ds.truncated} example(s) truncated at an answer's end{share}"
        )
    parallel.print_rank_0(
        f"> loss on {'prompt and answer' if d.train_on_prompt else 'answers only'}"
    )
    return _pinned(dataset.micro_batch(idx, thd=thd) for idx in indices)


def samples_per_source(state: TrainState) -> str | None:
    """'P1 800 (80.0%), P2 200 (20.0%)': what a blend has drawn so far (None without a blend)."""
    data = getattr(state, "train_data", None)
    if not isinstance(data, BlendedQA) or not state.consumed_samples:
        return None
    counts = data.consumed_per_source(state.consumed_samples)
    return ", ".join(
        f"{p} {n:,} ({100 * n / state.consumed_samples:.1f}%)"
        for (_, p), n in zip(state.cfg.data.blend(), counts)
    )


def _pinned(batches: Iterator[dict]) -> Iterator[dict]:
    """On CUDA, page-locked batches, so forward_step's non_blocking copies really are async."""
    if not torch.cuda.is_available():
        return batches
    return ({k: v.contiguous().pin_memory() for k, v in b.items()} for b in batches)


def _reduce_loss(losses: list[dict], layout: Layout) -> tuple[float, int]:
    """Token-weighted mean loss and the positions processed, summed over micro-batches, DP ranks
    and (from the last stage) known on every pipeline stage."""
    total = torch.zeros(3, dtype=torch.float64)  # loss sum, loss tokens, positions
    if losses:  # on the last stage only; one device-to-host copy for all micro-batches
        total += torch.stack([item["lm loss"] for item in losses]).to(torch.float64).sum(0).cpu()
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
    thd = packed_thd(cfg)
    return forward_backward(
        forward_step_func=partial(forward_step, device=runtime.device()),
        data_iterator=data_iterator,
        model=[state.model],
        num_microbatches=state.num_microbatches,
        # THD micro-batches are one sequence of mbs * s positions: pipeline stages exchange
        # [mbs * s, 1, h] activations.
        seq_length=cfg.data.seq_length * (cfg.train.micro_batch_size if thd else 1),
        micro_batch_size=1 if thd else cfg.train.micro_batch_size,
        forward_only=forward_only,
    )


def train_step(
    state: TrainState, data_iterator: Iterator[dict], forward_backward: Callable | None = None
) -> tuple[float, float, bool, int]:
    """One optimizer step over the global batch. Returns (loss, grad_norm, skipped, tokens)."""
    state.model.zero_grad_buffer()
    state.optimizer.zero_grad()
    losses = _run_schedule(
        state, data_iterator, forward_backward or get_forward_backward_func(), forward_only=False
    )
    loss, tokens = _reduce_loss(losses, state.layout)
    fp16 = state.cfg.train.fp16
    if not math.isfinite(loss) and not fp16:  # fp16: an overflow skips the step below
        raise TrainingError(
            f"iteration {state.iteration + 1}: the loss is {loss}; stopping before the optimizer "
            f"step (nothing saved). Lower --lr, check the data, or resume from the last checkpoint"
        )
    ok, grad_norm, _ = state.optimizer.step()
    grad_norm = float(grad_norm if grad_norm is not None else 0.0)
    if ok and not math.isfinite(grad_norm):
        raise TrainingError(
            f"iteration {state.iteration + 1}: the gradient norm is {grad_norm}; stopping "
            f"(nothing saved). Lower --lr or set --clip-grad, or resume from the last checkpoint"
        )
    state.skipped_in_a_row = 0 if ok else state.skipped_in_a_row + 1
    if state.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
        raise TrainingError(
            f"iteration {state.iteration + 1}: {MAX_SKIPPED_IN_A_ROW} steps in a row skipped for "
            f"inf/NaN gradients (loss {loss}) although the loss scale fell to "
            f"{float(state.optimizer.get_loss_scale()):g}: the data or the model is broken"
        )
    if ok:
        state.scheduler.step(increment=1)
    state.iteration += 1
    state.consumed_samples += state.global_batch_size
    return loss, grad_norm, not ok, tokens


@torch.no_grad()
def validation_loss(
    state: TrainState, forward_backward: Callable
) -> tuple[float, dict[str, float]]:
    """Mean token loss over the first ``eval_iters`` global batches of the validation split: of
    each prefix of a blend (returned per prefix), and their weighted mean."""
    blend = state.cfg.data.blend() if state.cfg.data.data_prefix else [(1.0, None)]
    per_source = {}
    state.model.eval()
    for _, prefix in blend:
        data = build_data_iterator(state, "valid", consumed_samples=0, only=prefix)
        losses = []
        for _ in range(state.cfg.train.eval_iters):
            losses += _run_schedule(state, data, forward_backward, forward_only=True)
        per_source[prefix] = _reduce_loss(losses, state.layout)[0]
    state.model.train()
    total = sum(w for w, _ in blend)
    mean = sum(w * per_source[p] for w, p in blend) / total
    return mean, (per_source if len(blend) > 1 else {})


@dataclass
class Saving:
    """A save under way: what it holds and when it began (a background save completes later)."""

    started: float
    weights_only: bool
    valid_loss: float | None
    pending: storage.PendingSave | None = None
    path: Path | None = None
    """A synchronous save's folder, once written."""
    blocked_s: float = 0.0
    """Seconds training waited for this save: all of a synchronous one; for a background one,
    building the state dict, planning and copying the tensors, and waiting for its files."""


def save(
    state: TrainState,
    final: bool,
    valid_loss: float | None = None,
    background: bool = False,
    resumable: bool = False,
) -> Saving:
    """Save this iteration under ``--save``: the whole training state, or the weights only
    (``--no-save-optim``; the run's last save with ``--final-save weights``) unless the run must
    be ``resumable`` from it (a stop before the end). A ``background`` save returns while its
    files are written (:func:`complete` it); a synchronous one is complete when this returns
    (:func:`report_save` it)."""
    t = state.cfg.train
    started = time.perf_counter()
    sync_params(state)
    weights_only = not resumable and (not t.save_optim or (final and t.final_save == "weights"))
    saving = Saving(started, weights_only, valid_loss)
    result = save_training_checkpoint(
        t.save,
        unwrap(state.model),
        state.optimizer,
        state.scheduler,
        state.iteration,
        state.consumed_samples,
        state.cfg,
        state.layout,
        adapters_only=state.cfg.lora.enabled,
        lora=state.lora_record,
        prompt_template=state.prompt_template,
        with_optimizer=not weights_only,
        valid_loss=valid_loss,
        background=background,
    )
    if background:
        saving.pending = result
    else:
        saving.path = result
    saving.blocked_s = time.perf_counter() - started  # the state dict, the plan, the copy
    return saving


def complete(state: TrainState, saving: Saving) -> None:
    """Wait for a background save's files on every rank and complete it (collective)."""
    waited = time.perf_counter()
    path = saving.pending.finish()
    saving.blocked_s += time.perf_counter() - waited
    report_save(state, saving, path, time.perf_counter() - saving.started, saving.blocked_s)


def report_save(
    state: TrainState, saving: Saving, path: Path, seconds: float, blocked_s: float
) -> None:
    """After a save is complete (rank 0): move the best pointer when its validation loss beats
    the best so far (``--save-best``), delete checkpoints beyond ``--keep-last``, and print its
    size, its seconds and the seconds training was blocked by it."""
    t = state.cfg.train
    if parallel.is_rank_0():
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        notes = [human_bytes(size), f"{seconds:.2f} s", f"training blocked {blocked_s:.2f} s"]
        notes += ["weights only"] if saving.weights_only else []
        valid = saving.valid_loss
        if t.save_best and valid is not None:
            best = storage.best_valid_loss(t.save)
            if best is None or valid < best:
                storage.mark_best(t.save, int(path.name.removeprefix("iter_")))
                notes.append(f"best validation loss so far: {valid:.6E}")
        print(f"> saved checkpoint {path} ({', '.join(notes)})", flush=True)
        for old in storage.prune(t.save, t.keep_last) if t.keep_last else []:
            print(f"> deleted {old} (--keep-last {t.keep_last})", flush=True)
    parallel.barrier()


@dataclass
class TrainResult:
    """What a run leaves: its state (model in memory, layout) and the per-step metrics."""

    state: TrainState
    history: list[StepMetrics]
    stopped: Stop = Stop.NO
    """Why the run ended before --train-iters (a signal or --exit-duration-in-mins), if it did."""


def train(cfg: RunConfig, tracking=None) -> TrainResult:
    """Run ``cfg.train.train_iters`` steps; returns the state and per-step metrics (every rank).
    ``tracking`` (a :class:`megatron_yuyuan.tracking.Tracking`, rank 0) gets every metric too."""
    state = setup(cfg)
    layout, t = state.layout, cfg.train
    is_logger = layout.rank == 0
    logger = (
        MetricsLogger(
            t.metrics_file, t.tensorboard_dir, start_iteration=state.iteration, tracking=tracking
        )
        if is_logger
        else None
    )
    flops_per_token = training_flops_per_token(
        cfg.model, cfg.data.seq_length, cfg.model.padded_vocab_size(layout.tp)
    )
    peak = gpu_peak_flops()
    parallel.print_rank_0(
        f"> training {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size} on "
        f"{layout.world_size} process(es): TP={layout.tp} PP={layout.pp} DP={layout.dp}, "
        f"{state.num_microbatches} micro-batch(es) of {t.micro_batch_size} x {cfg.data.seq_length} "
        f"tokens per step, backend {dist.get_backend()}"
        + (", weight-gradient fusion" if state.model.config.gradient_accumulation_fusion else "")
        + (", fused AdamW" if fused_adam(cfg) else "")
        + (f", MFU against {peak[1] / 1e12:.0f} TFLOP/s bf16 ({peak[0]})" if peak else "")
    )
    data = build_data_iterator(state)
    forward_backward = get_forward_backward_func()
    history: list[StepMetrics] = []
    valid_history: list[tuple[int, float]] = []
    warned_lr0 = False
    bar = tqdm(
        total=t.train_iters,
        initial=state.iteration,
        desc="train",
        disable=not is_logger,
        file=sys.stderr,
        dynamic_ncols=True,
    )

    def validate() -> float:
        valid, per_source = validation_loss(state, forward_backward)
        valid_history.append((state.iteration, valid))
        if logger:
            logger.log_validation(state.iteration, valid, per_source)
            bar.write(
                f" validation loss at iteration {state.iteration}: {valid:.6E} | "
                f"ppl: {math.exp(min(valid, 50)):.3f}"
                + "".join(f" | {p}: {v:.6E}" for p, v in per_source.items())
            )
        return valid

    exits = ExitRequests(
        default_enabled() if t.exit_signal_handler is None else t.exit_signal_handler,
        t.exit_duration_in_mins,
    )
    stopped = Stop.NO
    writing: Saving | None = None  # a background save whose files are being written
    try:
        exits.install()
        while state.iteration < t.train_iters:
            lr = state.optimizer.param_groups[0]["lr"]  # the lr this step uses
            if lr == 0.0 and state.iteration >= t.lr_warmup_iters and not warned_lr0:
                warned_lr0 = True
                bar.write(
                    f"warning: iteration {state.iteration + 1} trains at learning rate 0 (the "
                    f"schedule has decayed to --min-lr 0): raise --lr-decay-iters or --min-lr",
                    file=sys.stderr,
                )
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
                consumed_samples=state.consumed_samples,
                peak_memory_gb=(torch.cuda.max_memory_allocated() / 2**30)
                if torch.cuda.is_available()
                else None,
                loss_scale=float(state.optimizer.get_loss_scale()) if t.fp16 else None,
                mfu=(tokens_per_s * flops_per_token / (peak[1] * layout.world_size))
                if peak
                else None,
            )
            history.append(metrics)
            if logger:
                logger.log(metrics)
                if state.iteration % t.log_interval == 0:
                    bar.write(
                        format_log_line(
                            metrics, t.train_iters, state.consumed_samples, state.global_batch_size
                        )
                    )
                    drawn = samples_per_source(state)
                    if drawn:
                        bar.write(f" samples per source: {drawn}")
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.update(1)
            last = state.iteration == t.train_iters
            if writing is not None and writing.pending.ready():
                complete(state, writing)
                writing = None
            stopped = exits.agreed()
            if stopped and is_logger:
                bar.write(
                    f"> {stopped.describe(t.exit_duration_in_mins)}: stopping after iteration "
                    f"{state.iteration}"
                    + (" (saving it first; a second signal stops at once)" if t.save else "")
                )
            if t.eval_interval and (state.iteration % t.eval_interval == 0 or last):
                validate()
            interval = t.save_interval and state.iteration % t.save_interval == 0
            if t.save and (interval or last or stopped):
                exits.saving = bool(stopped)  # from here a second signal means "now"
                valid = None
                if t.save_best:  # the loss of this very iteration
                    at_this_step = valid_history and valid_history[-1][0] == state.iteration
                    valid = valid_history[-1][1] if at_this_step else validate()
                if writing is not None:  # the previous one first: one save in flight at most
                    complete(state, writing)
                    writing = None
                background = t.async_save and not (last or stopped)  # the run goes on
                saving = save(
                    state,
                    final=last,
                    valid_loss=valid,
                    background=background,
                    resumable=bool(stopped) and not last,
                )
                exits.saving = False  # the checkpoint is complete (or being written)
                if background:
                    writing = saving
                else:
                    seconds = time.perf_counter() - saving.started
                    report_save(state, saving, saving.path, seconds, saving.blocked_s)
                if logger:
                    plot_loss_curve(history, valid_history, Path(t.save) / "loss_curve.png")
            if stopped:
                break
        if writing is not None:
            complete(state, writing)
            writing = None
    finally:
        if writing is not None:  # the run is failing: its unfinished save goes too
            writing.pending.abandon()
        exits.restore()
        bar.close()  # before any error line, so it starts a line of its own
    if stopped and last:
        stopped = Stop.NO  # the signal came with the last step: the run is complete
    if stopped and is_logger:
        mark_stopped(t.save)
        print(
            f"> stopped at iteration {state.iteration} of {t.train_iters} "
            f"({stopped.describe(t.exit_duration_in_mins)})"
            + (
                f"; the same command resumes from {t.save}"
                if t.save
                else "; nothing was saved (no --save)"
            ),
            flush=True,
        )
    sync_params(state)
    out_dir = Path(t.save) if t.save else Path(t.metrics_file).parent if t.metrics_file else None
    if logger and out_dir is not None and history:
        curve = plot_loss_curve(history, valid_history, out_dir / "loss_curve.png")
        print(f"> wrote {curve}", flush=True)
    if logger:
        for line in logger.close():
            print(f"> wrote {line}", flush=True)
    return TrainResult(state=state, history=history, stopped=stopped)
