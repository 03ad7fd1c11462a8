"""Typed run configuration: one dataclass per section, named model presets, YAML load/save.

Field names are Megatron-LM's argument names (``tensor_model_parallel_size``, ``micro_batch_size``,
``train_iters``...), so every field is also a command-line flag with Megatron's spelling
(``--tensor-model-parallel-size``); see :mod:`megatron_yuyuan.cli.arguments`. Each field carries a
docstring (the string below it), which is the flag's ``--help`` text
(:func:`megatron_yuyuan.dataclass_fields.field_docs`).

A YAML file mirrors :class:`RunConfig`::

    model: small                # a preset name, or a mapping: {preset: small, num_layers: 4}
    parallel: {tensor_model_parallel_size: 2}
    train: {micro_batch_size: 4, global_batch_size: 8, train_iters: 100, lr: 1.0e-4}
    data: {seq_length: 512, mock_data: true}
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from megatron_yuyuan.dataclass_fields import check_field_types
from megatron_yuyuan.errors import ConfigError
from megatron_yuyuan.files import write_text_atomic
from megatron_yuyuan.sampling import SamplingConfig, SamplingLimitError


@dataclass(kw_only=True)
class ModelConfig:
    """GPT-2 architecture (Yuyuan): learned absolute positions, LayerNorm, biases, tied
    embeddings."""

    num_layers: int
    """Number of transformer layers."""
    hidden_size: int
    """Transformer hidden size (h)."""
    num_attention_heads: int
    """Number of attention heads; must be divisible by the tensor-parallel size."""
    ffn_hidden_size: int | None = None
    """MLP inner size; None means 4 * hidden_size (GPT-2's n_inner=None)."""
    max_position_embeddings: int = 1024
    """Number of learned absolute positions (the longest sequence the model accepts)."""
    vocab_size: int = 50257
    """True vocabulary size (GPT-2 BPE: 50257). The embedding is padded above this; see below."""
    make_vocab_size_divisible_by: int = 128
    """Pad the embedding rows to a multiple of this times the tensor-parallel size (as Megatron)."""
    layernorm_epsilon: float = 1e-5
    """LayerNorm epsilon (GPT-2: 1e-5)."""
    activation: Literal["gelu_tanh", "gelu"] = "gelu_tanh"
    """MLP activation: 'gelu_tanh' is GPT-2's gelu_new; 'gelu' is the exact erf GELU."""
    hidden_dropout: float = 0.1
    """Dropout on residual branches and embeddings."""
    attention_dropout: float = 0.1
    """Dropout on attention probabilities."""
    init_method_std: float = 0.02
    """Std of the normal init; output projections use std / sqrt(2 * num_layers)."""

    def __post_init__(self) -> None:
        check_field_types(self, "model")
        for name in (
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "max_position_embeddings",
            "vocab_size",
            "make_vocab_size_divisible_by",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by "
                f"model.num_attention_heads ({self.num_attention_heads})"
            )
        if self.activation not in ("gelu_tanh", "gelu"):
            raise ConfigError(
                f"model.activation must be 'gelu_tanh' or 'gelu', got {self.activation!r}"
            )
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def ffn_size(self) -> int:
        """The MLP inner size actually used."""
        return self.ffn_hidden_size or 4 * self.hidden_size

    def padded_vocab_size(self, tensor_model_parallel_size: int = 1) -> int:
        """Megatron's rule: round vocab_size up to a multiple of divisible_by * TP."""
        multiple = self.make_vocab_size_divisible_by * tensor_model_parallel_size
        return -(-self.vocab_size // multiple) * multiple


@dataclass(kw_only=True)
class ParallelConfig:
    """How the model is split; data parallel size is world_size / (TP * PP)."""

    tensor_model_parallel_size: int = 1
    """Tensor (intra-layer) parallel size; must divide the attention heads."""
    pipeline_model_parallel_size: int = 1
    """Pipeline (inter-layer) parallel size; must divide the number of layers."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state across data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool | None = None
    """Overlap the data-parallel gradient all-reduce / reduce-scatter with the backward pass,
    bucket by bucket. None: on with CUDA, off on CPU (gloo gains nothing from it)."""
    overlap_param_gather: bool | None = None
    """With the distributed optimizer: overlap the parameter all-gather after each step with the
    next forward pass. None: on with CUDA and --use-distributed-optimizer."""
    ddp_bucket_size: int | None = None
    """Elements per gradient-reduction bucket; None: megatron-core's default (max(40M, 1M x DP))."""

    def __post_init__(self) -> None:
        check_field_types(self, "parallel")
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(kw_only=True)
class TrainConfig:
    """Optimisation, precision and logging."""

    micro_batch_size: int = 1
    """Sequences per micro-batch per data-parallel rank."""
    global_batch_size: int | None = None
    """Sequences per optimizer step over all ranks; None means micro_batch_size * DP."""
    train_iters: int = 10
    """Number of optimizer steps."""
    lr: float = 1e-4
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of decay."""
    lr_warmup_iters: int = 0
    """Linear warmup steps to lr: step k (1-based) of W trains at lr * k / (W + 1), so the first
    step already learns (Megatron's ramp from 0 would waste it)."""
    lr_decay_style: Literal["constant", "linear", "cosine"] = "cosine"
    """Decay after warmup."""
    lr_decay_iters: int | None = None
    """Steps over which lr decays to min_lr; None means train_iters."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay (not applied to biases and LayerNorm)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    bf16: bool = False
    """bf16 mixed precision (GPU): bf16 weights and activations, fp32 master weights."""
    fp16: bool = False
    """fp16 mixed precision (GPU) with dynamic loss scaling."""
    initial_loss_scale: float = 2.0**12
    """fp16: starting loss scale. Our loss is a token *sum* (normalised later by the token count),
    so each token's logit gradient is ~scale: 2^12 keeps it far below fp16's 65504 and the first
    step trains, where Megatron's 2^32 (meant for a mean loss) would skip dozens of steps."""
    loss_scale_window: int = 1000
    """fp16: steps without overflow before the loss scale grows."""
    hysteresis: int = 2
    """fp16: overflows tolerated before the loss scale shrinks."""
    min_loss_scale: float = 1.0
    """fp16: smallest loss scale."""
    gradient_accumulation_fusion: bool | None = None
    """Accumulate each weight gradient straight into the fp32 ``main_grad`` inside its GEMM
    (Megatron-LM's flag) instead of a bf16 gradient plus an add per micro-batch. None: on with
    CUDA, through Apex/TE's kernel when installed, else one cuBLAS GEMM with fp32 output."""
    fused_adam: bool | None = None
    """Update all parameters in one fused AdamW kernel (torch's; Megatron uses Apex/TE's
    FusedAdam) instead of a chain of multi-tensor ops. None: on with CUDA."""
    recompute_granularity: Literal["full", "selective"] | None = None
    """Activation recompute: 'full' recomputes whole layers, 'selective' only core attention."""
    recompute_num_layers: int = 1
    """With 'full': layers per recompute chunk (uniform method)."""
    seed: int = 1234
    """Seed for weights (independent of the parallel layout), data order and dropout."""
    load: str | None = None
    """Resume from this checkpoint directory (any TP/PP; --config may then be omitted). A
    weights-only checkpoint, e.g. converted from HF, starts a finetune at iteration 0."""
    finetune: bool = False
    """With --load: take the weights only (fresh optimizer and schedule, iteration 0)."""
    pretrained_checkpoint: str | None = None
    """Weights to start from when --load holds no checkpoint yet (e.g. converted Yuyuan weights);
    with --load equal to --save, a restarted job then resumes its own latest checkpoint."""
    use_checkpoint_opt_param_scheduler: bool = False
    """On resume, keep the LR schedule saved in the checkpoint (its lr, warmup and decay lengths).
    Default: the config wins (Megatron-LM's --override-opt-param-scheduler): a resumed run with a
    larger --train-iters decays over the new length instead of training at --min-lr."""
    save: str | None = None
    """Save checkpoints here (model, optimizer, LR schedule, RNG, data position, config)."""
    save_interval: int | None = None
    """Save every this many iterations (and always at the end when --save is given)."""
    keep_last: int | None = None
    """Keep only the newest N checkpoints in --save: older ones are deleted once a new one and
    the ``latest`` pointer are complete (never the one a pointer names, nor the best). None: all."""
    save_best: Literal["valid_loss"] | None = None
    """Keep the checkpoint with the lowest validation loss (computed at each save when not at
    that step already) and name it in ``best_checkpointed_iteration.txt``: ``--iteration best``."""
    save_optim: bool = True
    """Save the optimizer state, LR schedule and RNG with the weights (resumable). Without it
    (--no-save-optim: a third of the bytes of fp32 AdamW training, a seventh in bf16) a
    checkpoint holds the weights only: it exports, generates and serves, and --finetune starts
    from it; it cannot be resumed."""
    async_save: bool = False
    """Write checkpoints in the background: training waits only while the tensors are copied
    (and for the previous save, if it is still being written when the next one is due). The
    ``latest`` pointer moves once every rank's files are complete; the run's last save and a
    stop's save are written before the run ends."""
    final_save: Literal["full", "weights"] = "full"
    """What the save at the end of the run holds: 'weights' drops the optimizer state (the run is
    over: the model is what is kept)."""
    exit_signal_handler: bool | None = None
    """On SIGTERM or SIGUSR1 (a preemption, Slurm's warning before the time limit): finish the
    step, save, exit 0; a second signal during that save stops at once, the earlier checkpoint
    kept. None: on under torchrun and Slurm."""
    exit_duration_in_mins: float | None = None
    """Save and exit 0 after the first step that ends this many minutes after the start."""
    eval_interval: int | None = None
    """Compute the validation loss every this many iterations (and at the end)."""
    eval_iters: int = 4
    """Global batches of the validation split per validation."""
    eval_bleu_samples: int = 0
    """After training, answer this many validation questions and score them next to the retrieval
    and echo baselines (report in SAVE/eval/)."""
    eval_max_new_tokens: int = 64
    """Generation length for --eval-bleu-samples."""
    eval_repetition_penalty: float = 1.0
    """Repetition penalty for --eval-bleu-samples (transformers' semantics; 1.0: off)."""
    eval_no_repeat_ngram_size: int = 0
    """Never repeat an n-gram of this size in --eval-bleu-samples answers (0: off)."""
    log_interval: int = 1
    """Print a Megatron-style log line every this many steps."""
    metrics_file: str | None = None
    """Write one JSON object per step (iteration, loss, lr, grad_norm, tokens_per_s[, mfu]) here."""
    tensorboard_dir: str | None = None
    """Write TensorBoard scalars here."""
    wandb_project: str | None = None
    """Also log the metrics, the run config and the loss-curve / report images to this Weights &
    Biases project (pip install -e ".[wandb]"; WANDB_MODE=offline keeps them local)."""
    wandb_exp_name: str | None = None
    """The run's name in W&B (and in MLflow)."""
    wandb_save_dir: str | None = None
    """Where W&B keeps its local files (default: --save)."""
    mlflow_tracking_uri: str | None = None
    """Also log them to MLflow at this tracking URI: a server (http://...) or a folder
    (file:./mlruns) (pip install -e ".[mlflow]")."""
    mlflow_experiment: str | None = None
    """The MLflow experiment the run goes to (default: megatron_yuyuan)."""

    def __post_init__(self) -> None:
        check_field_types(self, "train")
        if self.bf16 and self.fp16:
            raise ConfigError("train.bf16 and train.fp16 are mutually exclusive: choose one")
        for name in (
            "micro_batch_size",
            "train_iters",
            "log_interval",
            "recompute_num_layers",
            "eval_iters",
            "eval_max_new_tokens",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        try:  # the end-of-training answers' sampling values, by the generator's own bounds
            SamplingConfig(
                repetition_penalty=self.eval_repetition_penalty,
                no_repeat_ngram_size=self.eval_no_repeat_ngram_size,
            )
        except SamplingLimitError as exc:
            raise ConfigError(f"train.eval_{exc.field} {exc.problem}") from None
        for name in ("save_interval", "eval_interval", "keep_last"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.exit_duration_in_mins is not None and not self.exit_duration_in_mins > 0:
            raise ConfigError(
                f"train.exit_duration_in_mins must be > 0, got {self.exit_duration_in_mins}"
            )
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ConfigError(f"train.global_batch_size must be >= 1, got {self.global_batch_size}")
        if self.lr_decay_style not in ("constant", "linear", "cosine"):
            raise ConfigError(
                f"train.lr_decay_style must be constant|linear|cosine, got {self.lr_decay_style!r}"
            )
        if self.recompute_granularity not in (None, "full", "selective"):
            raise ConfigError(
                f"train.recompute_granularity must be full|selective, got "
                f"{self.recompute_granularity!r}"
            )
        decay_iters = self.lr_decay_iters or self.train_iters
        if self.lr_decay_style != "constant" and decay_iters <= self.lr_warmup_iters:
            raise ConfigError(
                f"--lr-decay-iters ({decay_iters}, default --train-iters) must exceed "
                f"--lr-warmup-iters ({self.lr_warmup_iters})"
            )
        if self.lr < 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"need 0 <= train.min_lr ({self.min_lr}) <= train.lr ({self.lr})")


def parse_blend(text: str, flag: str = "--data-prefix") -> list[tuple[float, str]]:
    """``"P"`` -> ``[(1.0, P)]``; ``"0.7 P1 0.3 P2"`` -> ``[(0.7, P1), (0.3, P2)]`` (weights as
    given; they are normalised when sampling). The command line joins its words with newlines,
    so prefixes may hold spaces; a YAML string is split on whitespace unless it has newlines."""
    words = text.split("\n") if "\n" in text else text.split()

    def number(word: str) -> bool:
        try:
            float(word)
        except ValueError:
            return False
        return True

    if len(words) < 2 or not number(words[0]):
        if len(words) > 1 and number(words[1]):
            raise ConfigError(
                f"{flag}: weights go before their prefixes: {flag} {words[1]} {words[0]} ..."
            )
        return [(1.0, text if "\n" not in text else words[0])]
    if len(words) % 2:
        raise ConfigError(
            f"{flag} {' '.join(words)!r}: a blend is WEIGHT PREFIX pairs (e.g. 0.7 data/a 0.3 "
            f"data/b); got {len(words)} words"
        )
    out = []
    for w, prefix in zip(words[::2], words[1::2]):
        weight = float(w) if number(w) else math.nan
        if not (math.isfinite(weight) and weight > 0):
            raise ConfigError(
                f"{flag}: weight {w!r} (before {prefix}) must be a positive finite number"
            )
        out.append((weight, prefix))
    same = [p for k, (_, p) in enumerate(out) if any(
        Path(p).resolve() == Path(q).resolve() for _, q in out[:k]
    )]  # fmt: skip
    if same:
        raise ConfigError(f"{flag}: the prefix {same[0]} appears twice; give each once")
    return out


@dataclass(kw_only=True)
class DataConfig:
    """Where training sequences come from."""

    seq_length: int | None = None
    """Tokens per training sequence; None means the model's max_position_embeddings."""
    mock_data: bool = False
    """Use deterministic synthetic token sequences (smoke tests, throughput)."""
    data_prefix: str | None = None
    """Preprocessed dataset prefix P (reads P_train.bin/.idx, P_meta.json; from tools.preprocess_qa
    or tools.preprocess_medquad), or a blend 'W1 P1 W2 P2 ...' (Megatron-LM's syntax: samples are
    drawn by weight with megatron-core's blending; validation loss is reported per prefix)."""
    packing: bool = True
    """Pack several QA pairs per sequence (block-diagonal attention, positions restart per pair);
    --no-packing pads each micro-batch to its longest pair instead."""
    train_on_prompt: bool = False
    """Also train on the question tokens (upstream behaviour); default is answer-only loss."""
    packed_format: Literal["auto", "thd", "mask"] = "auto"
    """How packed micro-batches reach attention: 'thd' lays them end to end with pair boundaries
    (megatron's THD format, flash varlen kernel on CUDA: no cross-pair work), 'mask' keeps
    ``[b, s]`` with a dense block-diagonal ``[b, 1, s, s]`` mask. 'auto': thd with --bf16/--fp16
    on an sm80+ GPU, mask elsewhere (on CPU thd is exact but slower)."""

    def __post_init__(self) -> None:
        check_field_types(self, "data")
        if self.seq_length is not None and self.seq_length < 1:
            raise ConfigError(f"data.seq_length must be >= 1, got {self.seq_length}")
        if self.packed_format not in ("auto", "thd", "mask"):
            raise ConfigError(
                f"data.packed_format must be auto|thd|mask, got {self.packed_format!r}"
            )
        if self.data_prefix is not None:
            self.blend()  # a malformed blend fails here, before anything starts

    def blend(self) -> list[tuple[float, str]]:
        """``[(weight, prefix), ...]`` of --data-prefix (one prefix: weight 1)."""
        return parse_blend(self.data_prefix)


LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclass(kw_only=True)
class LoraConfig:
    """Low-rank adapters (LoRA): train y = W x + (alpha / r) B A x with W frozen."""

    lora_rank: int = 0
    """Adapter rank r; 0 trains the whole model instead. With r > 0 every base parameter
    (embeddings and layer norms included) is frozen and only the adapters train."""
    lora_alpha: float = 16.0
    """Adapter scale numerator: the update is (alpha / r) B A x."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input (the base path is not affected)."""
    lora_target_modules: str = ",".join(LORA_TARGETS)
    """Comma-separated layers that get adapters: any of linear_qkv, linear_proj, linear_fc1,
    linear_fc2 (HF GPT-2: c_attn, attn.c_proj, c_fc, mlp.c_proj)."""

    def __post_init__(self) -> None:
        check_field_types(self, "lora")
        if self.lora_rank < 0:
            raise ConfigError(f"lora.lora_rank must be >= 0 (0: off), got {self.lora_rank}")
        if not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            raise ConfigError(f"lora.lora_alpha must be a finite number > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        targets = self.targets
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if unknown or not targets:
            raise ConfigError(
                f"lora.lora_target_modules: {', '.join(unknown) or 'empty'} is not a LoRA target;"
                f" use a comma-separated subset of {','.join(LORA_TARGETS)}"
            )

    @property
    def targets(self) -> tuple[str, ...]:
        """The target layer names, in the canonical order."""
        given = {t.strip() for t in self.lora_target_modules.split(",") if t.strip()}
        return tuple(t for t in LORA_TARGETS if t in given) + tuple(
            sorted(given - set(LORA_TARGETS))
        )

    @property
    def enabled(self) -> bool:
        return self.lora_rank > 0

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.lora_rank


PRESETS: dict[str, ModelConfig] = {
    # Tests. vocab 1100 is not a multiple of 128 * TP, so TP=1 and TP=2 pad differently
    # (1152 vs 1280 rows) and every TP-equivalence test also checks the pad-row masking.
    "tiny": ModelConfig(
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        max_position_embeddings=256,
        vocab_size=1100,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    ),
    # The CPU demo: GPT-2 vocabulary, about 29M parameters.
    "small": ModelConfig(num_layers=6, hidden_size=256, num_attention_heads=8),
    # Yuyuan-GPT2-3.5B (IDEA-CCNL): 3,556,125,696 parameters at vocab 50257.
    "yuyuan-3.5b": ModelConfig(
        num_layers=30,
        hidden_size=3072,
        num_attention_heads=32,
        ffn_hidden_size=12288,
        max_position_embeddings=1024,
    ),
}


def get_preset(name: str) -> ModelConfig:
    """Return a copy of the named model preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


@dataclass(kw_only=True)
class RunConfig:
    """Everything one training run needs."""

    model: ModelConfig = field(default_factory=lambda: get_preset("tiny"))
    """Model architecture."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation and logging."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Low-rank adapters (off unless lora_rank > 0)."""

    def __post_init__(self) -> None:
        if self.data.seq_length is None:
            self.data.seq_length = self.model.max_position_embeddings

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path) -> Path:
        """Write the resolved config as YAML (atomically) and return the path."""
        return write_text_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> RunConfig:
        unknown = set(raw) - set(SECTIONS)
        if unknown:
            raise ConfigError(
                f"{source}: unknown section(s) {sorted(unknown)}; expected {sorted(SECTIONS)}"
            )
        if "model" not in raw:
            raise ConfigError(
                f"{source}: missing section 'model': give a preset name "
                f"({', '.join(sorted(PRESETS))}) or a mapping of model fields"
            )
        for name, value in raw.items():
            if (
                value is not None
                and not isinstance(value, dict)
                and not (name == "model" and isinstance(value, str))
            ):
                raise ConfigError(
                    f"{source}: section {name!r} must be a mapping of fields, got {value!r}"
                )
        model_raw = raw["model"]
        if isinstance(model_raw, str):
            model_raw = {"preset": model_raw}
        model_raw = dict(model_raw or {})
        preset = model_raw.pop("preset", None)
        try:
            base = dataclasses.asdict(get_preset(preset)) if preset else {}
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from exc
        sections = {"model": _build(ModelConfig, {**base, **model_raw}, f"{source}: model")}
        for name in ("parallel", "train", "data", "lora"):
            sections[name] = _build(SECTIONS[name], raw.get(name) or {}, f"{source}: {name}")
        return cls(**sections)

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"--config {path}: is a directory; give a YAML file or a preset")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        data = path.read_bytes()
        if data.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in data[:200]:
            raise ConfigError(f"{path}: is UTF-16 text; save it as UTF-8")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{path}: not UTF-8 (byte {exc.start}: {data[exc.start : exc.start + 1]!r}, "
                f"e.g. a Latin-1 file); save it as UTF-8"
            ) from exc
        try:
            raw = yaml.load(text, Loader=_NoAliasLoader) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        except ConfigError as exc:  # an alias
            raise ConfigError(f"{path}: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
        return cls.from_dict(raw, source=str(path))


class _NoAliasLoader(yaml.SafeLoader):
    """safe_load without aliases: a run config never needs them, and nested aliases expand
    exponentially (a few hundred bytes can take all memory)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise ConfigError(
                f"line {event.start_mark.line + 1}: uses the YAML alias *{event.anchor}; run "
                f"configs take no aliases: write the value out"
            )
        return super().compose_node(parent, index)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "train": TrainConfig,
    "data": DataConfig,
    "lora": LoraConfig,
}


def _build(cls: type, values: dict[str, Any], where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(names)}")
    try:
        return cls(**values)
    except TypeError as exc:  # a missing required field
        raise ConfigError(f"{where}: {exc}") from exc
    except ConfigError as exc:
        raise ConfigError(f"{where.split(': ')[0]}: {exc}") from exc


def load_config(spec: str | None) -> RunConfig:
    """A preset name ('tiny', 'small', 'yuyuan-3.5b') or a YAML path."""
    if spec is None:
        raise ConfigError(
            f"no --config given: pass a preset ({', '.join(sorted(PRESETS))}) or a YAML run config"
        )
    if spec in PRESETS:
        return RunConfig(model=get_preset(spec))
    if spec.endswith((".yaml", ".yml")) or Path(spec).exists():
        return RunConfig.from_yaml(spec)
    raise ConfigError(
        f"--config {spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
        f"nor an existing YAML file"
    )


def validate_layout(cfg: RunConfig, world_size: int) -> int:
    """Check that the run fits ``world_size`` processes; returns the data-parallel size.

    Raises :class:`ConfigError` naming the offending values, before any process group exists.
    """
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    m, t = cfg.model, cfg.train
    if m.num_attention_heads % tp:
        raise ConfigError(
            f"--tensor-model-parallel-size {tp} does not divide "
            f"num_attention_heads {m.num_attention_heads}"
        )
    if m.ffn_size % tp:
        raise ConfigError(
            f"--tensor-model-parallel-size {tp} does not divide ffn size {m.ffn_size}"
        )
    if m.num_layers % pp:
        raise ConfigError(
            f"--pipeline-model-parallel-size {pp} does not divide num_layers {m.num_layers}"
        )
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by tensor x pipeline parallel "
            f"size {tp} x {pp} = {tp * pp}; launch a multiple of {tp * pp} processes"
        )
    dp = world_size // (tp * pp)
    gbs = t.global_batch_size or t.micro_batch_size * dp
    if gbs % (t.micro_batch_size * dp):
        raise ConfigError(
            f"--global-batch-size {gbs} is not divisible by --micro-batch-size "
            f"{t.micro_batch_size} x data-parallel size {dp} = {t.micro_batch_size * dp}"
        )
    if cfg.data.seq_length > m.max_position_embeddings:
        raise ConfigError(
            f"--seq-length {cfg.data.seq_length} exceeds max_position_embeddings "
            f"{m.max_position_embeddings}"
        )
    if pp > 1 and gbs // (t.micro_batch_size * dp) < 1:
        raise ConfigError("pipeline parallelism needs at least one micro-batch per step")
    if (t.bf16 or t.fp16) and not _cuda_available():
        raise ConfigError("--bf16/--fp16 mixed precision needs a CUDA GPU; run fp32 on CPU")
    return dp


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
