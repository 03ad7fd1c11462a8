"""GPT-2 / Yuyuan as a megatron-core ``GPTModel``.

The only module that imports ``megatron.core.models`` and ``megatron.core.transformer``. It turns a
:class:`~megatron_yuyuan.config.ModelConfig` into a ``TransformerConfig``, builds this pipeline
stage's ``GPTModel`` and initialises weights from the seed alone, so TP/PP/DP layouts start from
the same model.

The layer spec is megatron-core's *local* spec on every device, with core attention computed by
``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPUs). Transformer
Engine's spec is deliberately not used, even where TE is installed: its attention ignores
arbitrary masks (left-padded batched generation and packed sequences would attend to padding and
across pairs, so answers would differ from the HF export), and its fused layer-norm parameters
(``linear_qkv.layer_norm_weight``) would make checkpoints depend on what a machine has installed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import zlib

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import Float16Module

from megatron_yuyuan import parallel
from megatron_yuyuan.config import ModelConfig, RunConfig
from megatron_yuyuan.parallel import Layout


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's ``gelu_new``. A named function (not a lambda) so configs stay picklable."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"gelu_tanh": gelu_tanh, "gelu": F.gelu}


def _leave_uninitialized(tensor: torch.Tensor) -> torch.Tensor:
    """megatron init_method that draws nothing: weights come from initialize_weights()."""
    return tensor


def to_transformer_config(
    cfg: RunConfig, params_dtype: torch.dtype | None = None
) -> TransformerConfig:
    """megatron-core TransformerConfig for this run (GPT-2 shape, our parallel layout).

    Args:
        params_dtype: parameter dtype; default from --bf16/--fp16 (fp32 otherwise). The
            converters keep a checkpoint's own dtype this way.
    """
    m, t, p = cfg.model, cfg.train, cfg.parallel
    on_gpu = torch.cuda.is_available()
    # A template built under ``torch.device("meta")`` (the converters) must not allocate on the
    # GPU: megatron's GPU initialisation passes an explicit CUDA device, its CPU path does not.
    meta_template = torch.get_default_device().type == "meta"
    # megatron's fused bias-GELU *is* the tanh approximation (GPT-2's gelu_new), but megatron only
    # fuses when activation_func is F.gelu: name that function and let the fusion compute tanh.
    fuse_bias_gelu = on_gpu and m.activation == "gelu_tanh"
    dtype = params_dtype or (
        torch.bfloat16 if t.bf16 else torch.float16 if t.fp16 else torch.float32
    )
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        ffn_hidden_size=m.ffn_size,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        layernorm_epsilon=m.layernorm_epsilon,
        normalization="LayerNorm",
        add_bias_linear=True,
        activation_func=F.gelu if fuse_bias_gelu else ACTIVATIONS[m.activation],
        init_method_std=m.init_method_std,
        # megatron allocates the shards and tags them with their TP split (it skips the tagging
        # when perform_initialization=False); initialize_weights() then fills them.
        perform_initialization=True,
        init_method=_leave_uninitialized,
        output_layer_init_method=_leave_uninitialized,
        use_cpu_initialization=not on_gpu or meta_template,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        sequence_parallel=False,  # torch LayerNorm cannot do it; needs Apex/TE
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=t.bf16,
        fp16=t.fp16,
        attention_softmax_in_fp32=True,
        apply_query_key_layer_scaling=False,
        # main_grad += x^T dy inside the GEMM (megatron's layers; our kernel when no Apex/TE).
        gradient_accumulation_fusion=on_gpu
        and t.gradient_accumulation_fusion is not False
        and parallel.enable_wgrad_accumulation_fusion(),
        bias_activation_fusion=fuse_bias_gelu,
        masked_softmax_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        persist_layer_norm=False,
        recompute_granularity=t.recompute_granularity,
        recompute_method="uniform" if t.recompute_granularity == "full" else None,
        recompute_num_layers=t.recompute_num_layers if t.recompute_granularity == "full" else None,
        # Loss is summed over tokens and normalised by the global token count, so answer-only
        # masks and any DP/micro-batch split give the same gradient.
        calculate_per_token_loss=True,
        # Dynamically padded micro-batches differ in length: PP stages exchange shapes first.
        variable_seq_lengths=cfg.data.data_prefix is not None and not cfg.data.packing,
        moe_token_dispatcher_type="alltoall",  # dense model; megatron's check for variable lengths
    )


class SDPAttention(DotProductAttention):
    """megatron's local core attention, computed by ``F.scaled_dot_product_attention``.

    Same constructor, parameters (none) and checkpoint layout as ``DotProductAttention``; the
    fused kernel replaces baddbmm + masked softmax + bmm (fewer passes and copies: faster on CPU,
    flash/memory-efficient kernels on GPU). Masks follow megatron's convention (True = masked).

    Packed sequences in megatron's THD format (``packed_seq_params.qkv_format == "thd"``: the
    micro-batch flattened to ``[t, 1, h]``, pair boundaries in ``cu_seqlens``) run through the
    flash-attention *varlen* kernel on CUDA: each pair attends causally to itself only, and no
    ``[s, s]`` mask or cross-pair score is ever computed. Elsewhere (CPU, fp32, or a GPU the
    kernel does not support) the same block-diagonal causal attention runs through SDPA with a
    dense mask built from ``cu_seqlens``, so both paths compute the same function.
    """

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        assert attention_bias is None, "not supported by SDPAttention"
        p = self.attention_dropout.p if self.training else 0.0
        if packed_seq_params is not None:
            assert packed_seq_params.qkv_format == "thd", "SDPAttention packs THD only"
            return self._forward_thd(query, key, value, packed_seq_params, p)
        q, k, v = (
            t.permute(1, 2, 0, 3) for t in (query, key, value)
        )  # [s, b, np, hn] -> [b, np, s, hn]
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if attention_mask is None:
            mask, causal = None, mask_type == AttnMaskType.causal and q.size(2) > 1
        else:
            mask, causal = ~attention_mask, False  # SDPA's boolean mask is True = attend
        ctx = self._sdpa(q, k, v, mask, causal, p)  # [b, np, s, hn]
        b, heads, s, hn = ctx.shape
        return ctx.permute(2, 0, 1, 3).reshape(s, b, heads * hn)  # [s, b, hp]

    def _sdpa(self, q, k, v, mask, causal: bool, p: float) -> torch.Tensor:
        if p > 0:  # dropout in a TP region draws from the model-parallel RNG stream, as upstream
            with parallel.get_cuda_rng_tracker().fork():
                return F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal, scale=self.softmax_scale
                )
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=self.softmax_scale
        )

    def _forward_thd(self, query, key, value, params, p: float) -> torch.Tensor:
        """query/key/value ``[t, np, hn]`` (megatron squeezed the batch of one) -> ``[t, hp]``."""
        t, heads, hn = query.shape
        cu = params.cu_seqlens_q  # [n + 1] int32: pair i is rows cu[i]:cu[i + 1]
        if varlen_attention_supported(query):
            # The kernel torch's own nested-tensor SDPA calls; it is differentiable and takes
            # dropout, which the public torch.nn.attention.varlen wrapper does not.
            with parallel.get_cuda_rng_tracker().fork() if p > 0 else contextlib.nullcontext():
                ctx = torch.ops.aten._flash_attention_forward(
                    query,
                    key,
                    value,
                    cu,
                    params.cu_seqlens_kv,
                    params.max_seqlen_q,
                    params.max_seqlen_kv,
                    p,
                    True,  # causal within each pair
                    False,
                    scale=self.softmax_scale,
                )[0]  # [t, np, hn]
            return ctx.reshape(t, heads * hn)
        segment = torch.zeros(t, dtype=torch.int64, device=query.device)  # [t] pair index
        segment[cu[1:-1].long()] = 1
        segment = segment.cumsum(0)
        allowed = (segment[:, None] == segment[None, :]).tril()  # [t, t]
        q, k, v = (x.permute(1, 0, 2).unsqueeze(0) for x in (query, key, value))  # [1, np, t, hn]
        ctx = self._sdpa(q, k, v, allowed, False, p)  # [1, np, t, hn]
        return ctx[0].permute(1, 0, 2).reshape(t, heads * hn)


def thd_params(cu_seqlens: torch.Tensor, max_seqlen: int) -> PackedSeqParams:
    """megatron's description of a THD micro-batch (see ``data.sft_dataset.to_thd``): the same
    runs for queries and keys/values."""
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=max_seqlen,
        max_seqlen_kv=max_seqlen,
    )


def varlen_attention_supported(x: torch.Tensor) -> bool:
    """Whether the flash varlen kernel runs for ``x`` (CUDA, fp16/bf16, sm80+, head dim <= 256)."""
    return (
        x.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16)
        and x.shape[-1] % 8 == 0
        and x.shape[-1] <= 256
        and torch.cuda.get_device_capability(x.device) >= (8, 0)
        and hasattr(torch.ops.aten, "_flash_attention_forward")
    )


def layer_spec():
    """megatron-core's local spec with SDPA core attention (see the module docstring for why
    not Transformer Engine's)."""
    spec = get_gpt_layer_local_spec(normalization="LayerNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


class YuyuanGPTModel(GPTModel):
    """``GPTModel`` whose loss ignores the embedding's padding rows.

    Megatron pads the vocabulary to a multiple of 128 * TP, so the number of dummy rows depends on
    TP; excluding them from the softmax keeps the loss (and training) independent of the layout.
    """

    def __init__(self, *args, true_vocab_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.true_vocab_size = true_vocab_size

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor):
        """Per-token cross-entropy ``[b, s]`` from vocab-parallel logits ``[s, b, Vp / tp]``."""
        labels = labels.transpose(0, 1).contiguous()  # [b, s] -> [s, b]
        return language_model_loss(logits, labels, self.true_vocab_size).transpose(0, 1)


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int, tp_rank: int) -> torch.Tensor:
    """Set the logits of embedding pad rows (ids >= vocab_size) to -inf.

    Args:
        logits: this rank's vocab shard ``[..., Vp / tp]``.
    """
    local = logits.shape[-1]
    n_real = vocab_size - tp_rank * local  # real ids in this shard (may be <= 0 or >= local)
    if n_real >= local:
        return logits
    pad = torch.arange(local, device=logits.device) >= max(n_real, 0)  # [Vp / tp]
    return logits.masked_fill(pad, float("-inf"))


class _RealVocabCrossEntropy(torch.autograd.Function):
    """Cross-entropy over the first ``V`` columns of ``[N, Vp]`` logits, without copying them.

    ``F.cross_entropy(logits[:, :V])`` first copies the strided slice (and its gradient back),
    which cost ~15% of a training step of the 50k-vocabulary demo model; this reads the slice in
    place and writes the gradient straight into a full-width tensor (zeros for the pad columns).
    """

    @staticmethod
    def forward(ctx, logits, labels, vocab_size):
        lse = torch.logsumexp(logits[:, :vocab_size], dim=-1)  # [N]
        ctx.save_for_backward(logits, labels, lse)
        ctx.vocab_size = vocab_size
        return lse - logits.gather(1, labels[:, None]).squeeze(1)

    @staticmethod
    def backward(ctx, grad_loss):
        logits, labels, lse = ctx.saved_tensors
        v = ctx.vocab_size
        grad = torch.empty_like(logits)
        # softmax over the real columns, scaled by the incoming gradient; pad columns get 0
        grad[:, :v].copy_(logits[:, :v]).sub_(lse[:, None]).exp_().mul_(grad_loss[:, None])
        grad[:, v:] = 0
        grad.scatter_add_(1, labels[:, None], -grad_loss[:, None])
        return grad, None, None


def language_model_loss(
    logits: torch.Tensor, labels: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """Cross-entropy over the real vocabulary, per token.

    Args:
        logits: vocab-parallel logits ``[..., Vp / tp]``.
        labels: target ids ``[...]``.
        vocab_size: the true vocabulary size (pad ids above it are excluded).
    """
    layout = parallel.current_layout()
    if layout.tp == 1:
        flat = logits.float().reshape(-1, logits.shape[-1])  # [N, Vp], a view
        return _RealVocabCrossEntropy.apply(flat, labels.reshape(-1), vocab_size).view(labels.shape)
    logits = mask_padded_vocab(logits.float(), vocab_size, layout.tp_rank)
    return parallel.vocab_parallel_cross_entropy(logits, labels)


def build_model(
    cfg: RunConfig,
    layout: Layout,
    seed: int | None = None,
    padded_vocab_size: int | None = None,
    params_dtype: torch.dtype | None = None,
) -> GPTModel:
    """Build this rank's pipeline stage of the base model (LoRA adapters, if any, are added by
    :func:`megatron_yuyuan.lora.add_adapters`).

    Args:
        cfg: run config (model shape, precision, parallel sizes).
        layout: this process's TP/PP/DP position (from :func:`parallel.init_distributed`).
        seed: initialise weights from this seed; None leaves them uninitialised (for loading).
        padded_vocab_size: embedding rows; default Megatron's padding for this TP.
        params_dtype: parameter dtype (see :func:`to_transformer_config`).
    """
    # The layout that exists is the one to build for, whatever the config says.
    cfg = dataclasses.replace(
        cfg,
        parallel=dataclasses.replace(
            cfg.parallel,
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
        ),
    )
    tconfig = to_transformer_config(cfg, params_dtype)
    parallel.ensure_model_parallel_rng()
    model = YuyuanGPTModel(
        true_vocab_size=cfg.model.vocab_size,
        config=tconfig,
        transformer_layer_spec=layer_spec(),
        vocab_size=padded_vocab_size or cfg.model.padded_vocab_size(layout.tp),
        max_sequence_length=cfg.model.max_position_embeddings,
        pre_process=layout.is_first_stage,
        post_process=layout.is_last_stage,
        parallel_output=True,
        share_embeddings_and_output_weights=True,
        position_embedding_type="learned_absolute",
    )
    if torch.cuda.is_available() and torch.get_default_device().type != "meta":
        # megatron puts its parallel layers on the GPU, but plain torch modules inside (the
        # position embedding) stay on the CPU: move everything, once, here.
        model = model.cuda(torch.cuda.current_device())
    if seed is not None:
        initialize_weights(model, cfg.model, layout, seed)
    return model


def wrap_float16(model: GPTModel, cfg: RunConfig) -> torch.nn.Module:
    """bf16/fp16 runs cast inputs/outputs at the model boundary, as Megatron-LM does."""
    if cfg.train.bf16 or cfg.train.fp16:
        return Float16Module(model.config, model)
    return model


def global_param_name(model: GPTModel, name: str) -> str:
    """Stage-local parameter name -> name in the whole (PP=1) model.

    Every pipeline stage numbers its layers from 0; ``layer_number`` holds the global 1-based index.
    The tied output layer of the last stage is the word embedding.
    """
    if name.startswith("decoder.layers."):
        local, rest = name[len("decoder.layers.") :].split(".", 1)
        return f"decoder.layers.{model.decoder.layers[int(local)].layer_number - 1}.{rest}"
    if name == "output_layer.weight" and model.share_embeddings_and_output_weights:
        return "embedding.word_embeddings.weight"
    return name


def _is_norm(name: str) -> bool:
    return "layernorm" in name or "layer_norm" in name.rsplit(".", 1)[-1]


@torch.no_grad()
def initialize_weights(model: GPTModel, m: ModelConfig, layout: Layout, seed: int) -> None:
    """GPT-2 init that depends only on ``seed`` and each parameter's global name.

    Each full (unsharded, unpadded) tensor is drawn from its own generator seeded by
    ``crc32(seed:name)``, then this rank keeps its TP slice. So TP=1, TP=2, PP=2 and DP runs start
    from identical weights, and resharding a checkpoint is meaningful. Linear weights ~ N(0, std);
    the two residual output projections ~ N(0, std / sqrt(2L)) (GPT-2 / Megatron scaled init);
    biases 0; LayerNorm weight 1. Embedding rows past the true vocabulary are zero padding.
    """
    std_out = m.init_method_std / (2.0 * m.num_layers) ** 0.5
    for name, param in model.named_parameters():
        gname = global_param_name(model, name)
        if _is_norm(gname):
            param.fill_(1.0 if gname.endswith("weight") else 0.0)
            continue
        if gname.endswith("bias"):
            param.zero_()
            continue
        full_shape = list(param.shape)
        split_dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
        if split_dim is not None:
            full_shape[split_dim] *= layout.tp
        gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{gname}".encode()))
        std = (
            std_out
            if gname.endswith(("linear_proj.weight", "linear_fc2.weight"))
            else m.init_method_std
        )
        if gname == "embedding.word_embeddings.weight":
            full = torch.zeros(full_shape)
            full[: m.vocab_size] = torch.randn([m.vocab_size, *full_shape[1:]], generator=gen) * std
        else:
            full = torch.randn(full_shape, generator=gen) * std
        if split_dim is not None:
            full = full.chunk(layout.tp, dim=split_dim)[layout.tp_rank]
        param.copy_(full)


def count_parameters(m: ModelConfig, padded_vocab: int | None = None) -> int:
    """Analytic parameter count of the GPT-2 model (tied embeddings counted once).

    Per layer: QKV 3h^2+3h, projection h^2+h, fc1 fh+f, fc2 fh+h, two LayerNorms 4h.
    """
    h, f = m.hidden_size, m.ffn_size
    per_layer = 4 * h * h + 2 * f * h + f + 9 * h
    vocab = padded_vocab if padded_vocab is not None else m.vocab_size
    return m.num_layers * per_layer + vocab * h + m.max_position_embeddings * h + 2 * h


def count_model_parameters(model: torch.nn.Module) -> int:
    """Parameters held by this rank's module (shared output layer not counted twice)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def training_flops_per_token(m: ModelConfig, seq_length: int, padded_vocab: int) -> float:
    """Megatron-LM's model FLOPs per token for fwd+bwd: 72 l h^2 (1 + s/(6h) + V/(12 h l))."""
    h, layers = m.hidden_size, m.num_layers
    ffn_ratio = m.ffn_size / (4 * h)
    # 72 = 24 (fwd) * 3 (fwd + 2x bwd); attention and MLP terms, with a general ffn ratio.
    return (
        24
        * 3
        * layers
        * h
        * h
        * ((1 + 2 * ffn_ratio) / 3 + seq_length / (6 * h) + padded_vocab / (12 * h * layers))
    )
