"""The one table between HF GPT-2 names and megatron-core (local spec) names.

Each entry names its transform; the megatron -> HF direction is the same table inverted in code.
``{}`` stands for the layer index. HF GPT-2 stores Conv1D weights ``[in, out]`` (megatron:
``[out, in]``) and QKV as ``[Q; K; V]`` (megatron: interleaved per head).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_yuyuan.errors import ConversionError

# HF GPT2LMHeadModel name -> (megatron-core name, transform)
HF_TO_MCORE: dict[str, tuple[str, str]] = {
    "transformer.wte.weight": ("embedding.word_embeddings.weight", "pad_vocab"),
    "transformer.wpe.weight": ("embedding.position_embeddings.weight", "copy"),
    "transformer.h.{}.ln_1.weight": ("decoder.layers.{}.input_layernorm.weight", "copy"),
    "transformer.h.{}.ln_1.bias": ("decoder.layers.{}.input_layernorm.bias", "copy"),
    "transformer.h.{}.attn.c_attn.weight": (
        "decoder.layers.{}.self_attention.linear_qkv.weight",
        "qkv_weight",
    ),
    "transformer.h.{}.attn.c_attn.bias": (
        "decoder.layers.{}.self_attention.linear_qkv.bias",
        "qkv_bias",
    ),
    "transformer.h.{}.attn.c_proj.weight": (
        "decoder.layers.{}.self_attention.linear_proj.weight",
        "transpose",
    ),
    "transformer.h.{}.attn.c_proj.bias": (
        "decoder.layers.{}.self_attention.linear_proj.bias",
        "copy",
    ),
    "transformer.h.{}.ln_2.weight": ("decoder.layers.{}.pre_mlp_layernorm.weight", "copy"),
    "transformer.h.{}.ln_2.bias": ("decoder.layers.{}.pre_mlp_layernorm.bias", "copy"),
    "transformer.h.{}.mlp.c_fc.weight": ("decoder.layers.{}.mlp.linear_fc1.weight", "transpose"),
    "transformer.h.{}.mlp.c_fc.bias": ("decoder.layers.{}.mlp.linear_fc1.bias", "copy"),
    "transformer.h.{}.mlp.c_proj.weight": ("decoder.layers.{}.mlp.linear_fc2.weight", "transpose"),
    "transformer.h.{}.mlp.c_proj.bias": ("decoder.layers.{}.mlp.linear_fc2.bias", "copy"),
    "transformer.ln_f.weight": ("decoder.final_layernorm.weight", "copy"),
    "transformer.ln_f.bias": ("decoder.final_layernorm.bias", "copy"),
    # LoRA adapters (megatron_yuyuan.lora) as named in a PEFT adapter for GPT2LMHeadModel (PEFT
    # prefixes "base_model.model."). A is [r, in] and B [out, r] on both sides, even for GPT-2's
    # Conv1D; only c_attn's B rows need megatron's per-head QKV interleave undone.
    "transformer.h.{}.attn.c_attn.lora_A.weight": (
        "decoder.layers.{}.self_attention.linear_qkv.lora_A",
        "copy",
    ),
    "transformer.h.{}.attn.c_attn.lora_B.weight": (
        "decoder.layers.{}.self_attention.linear_qkv.lora_B",
        "qkv_rows",
    ),
    "transformer.h.{}.attn.c_proj.lora_A.weight": (
        "decoder.layers.{}.self_attention.linear_proj.lora_A",
        "copy",
    ),
    "transformer.h.{}.attn.c_proj.lora_B.weight": (
        "decoder.layers.{}.self_attention.linear_proj.lora_B",
        "copy",
    ),
    "transformer.h.{}.mlp.c_fc.lora_A.weight": ("decoder.layers.{}.mlp.linear_fc1.lora_A", "copy"),
    "transformer.h.{}.mlp.c_fc.lora_B.weight": ("decoder.layers.{}.mlp.linear_fc1.lora_B", "copy"),
    "transformer.h.{}.mlp.c_proj.lora_A.weight": (
        "decoder.layers.{}.mlp.linear_fc2.lora_A",
        "copy",
    ),
    "transformer.h.{}.mlp.c_proj.lora_B.weight": (
        "decoder.layers.{}.mlp.linear_fc2.lora_B",
        "copy",
    ),
}
MCORE_TO_HF: dict[str, tuple[str, str]] = {m: (h, t) for h, (m, t) in HF_TO_MCORE.items()}

# HF keys that carry no weights of their own: causal-mask buffers of older checkpoints and the
# lm_head tied to wte.
HF_IGNORED = ("transformer.h.{}.attn.bias", "transformer.h.{}.attn.masked_bias", "lm_head.weight")
# megatron keys with no HF counterpart (extra state of local linears; tied output layer).
MCORE_IGNORED_SUFFIXES = ("._extra_state",)

_LAYER = re.compile(r"\.(\d+)\.")


def template(name: str) -> tuple[str, int | None]:
    """``transformer.h.7.ln_1.weight`` -> (``transformer.h.{}.ln_1.weight``, 7)."""
    m = _LAYER.search(name)
    if not m:
        return name, None
    return name[: m.start()] + ".{}." + name[m.end() :], int(m.group(1))


def normalize_hf_name(name: str) -> str:
    """Accept GPT2Model checkpoints (no ``transformer.`` prefix) as well as GPT2LMHeadModel ones."""
    if name.startswith(("transformer.", "lm_head.")):
        return name
    return "transformer." + name


@dataclass(frozen=True)
class Shapes:
    """What the transforms need to know about the model."""

    hidden_size: int
    num_heads: int
    vocab_size: int
    padded_vocab_size: int


def _qkv_to_mcore(w: torch.Tensor, s: Shapes) -> torch.Tensor:
    """HF c_attn [H, 3H] ([Q|K|V] columns) -> mcore linear_qkv [3H, H] (per-head [q;k;v] rows)."""
    h, n = s.hidden_size, s.num_heads
    q, k, v = w.t().split(h, dim=0)  # each [n * d, H]
    return torch.stack([t.reshape(n, h // n, h) for t in (q, k, v)], dim=1).reshape(3 * h, h)


def _qkv_to_hf(w: torch.Tensor, s: Shapes) -> torch.Tensor:
    h, n = s.hidden_size, s.num_heads
    return w.reshape(n, 3, h // n, h).transpose(0, 1).reshape(3 * h, h).t().contiguous()


def _qkv_bias_to_mcore(b: torch.Tensor, s: Shapes) -> torch.Tensor:
    h, n = s.hidden_size, s.num_heads
    return torch.stack([t.reshape(n, h // n) for t in b.split(h)], dim=1).reshape(3 * h)


def _qkv_bias_to_hf(b: torch.Tensor, s: Shapes) -> torch.Tensor:
    h, n = s.hidden_size, s.num_heads
    return b.reshape(n, 3, h // n).transpose(0, 1).reshape(3 * h).contiguous()


def _qkv_rows_to_mcore(t: torch.Tensor, s: Shapes) -> torch.Tensor:
    """Rows in HF's [Q; K; V] order ``[3H, k]`` -> megatron's per-head [q; k; v] rows."""
    h, n = s.hidden_size, s.num_heads
    return torch.stack([x.reshape(n, h // n, -1) for x in t.split(h)], dim=1).reshape(3 * h, -1)


def _qkv_rows_to_hf(t: torch.Tensor, s: Shapes) -> torch.Tensor:
    h, n = s.hidden_size, s.num_heads
    return t.reshape(n, 3, h // n, -1).transpose(0, 1).reshape(3 * h, -1).contiguous()


def _pad_vocab(w: torch.Tensor, s: Shapes) -> torch.Tensor:
    """Zero rows up to the padded vocabulary (the loss masks them out)."""
    if w.shape[0] != s.vocab_size:
        raise ConversionError(
            f"word embeddings have {w.shape[0]} rows, config vocab_size is {s.vocab_size}"
        )
    out = w.new_zeros((s.padded_vocab_size, w.shape[1]))
    out[: s.vocab_size] = w
    return out


def _unpad_vocab(w: torch.Tensor, s: Shapes) -> torch.Tensor:
    return w[: s.vocab_size].contiguous()


# transform name -> (HF -> mcore, mcore -> HF)
TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    "copy": (lambda t, s: t, lambda t, s: t),
    "transpose": (lambda t, s: t.t().contiguous(), lambda t, s: t.t().contiguous()),
    "qkv_weight": (_qkv_to_mcore, _qkv_to_hf),
    "qkv_bias": (_qkv_bias_to_mcore, _qkv_bias_to_hf),
    "qkv_rows": (_qkv_rows_to_mcore, _qkv_rows_to_hf),
    "pad_vocab": (_pad_vocab, _unpad_vocab),
}


def hf_to_mcore(name: str, tensor: torch.Tensor, shapes: Shapes) -> tuple[str, torch.Tensor] | None:
    """Map one HF tensor; None for keys that carry nothing (see HF_IGNORED). Unknown keys raise."""
    name = normalize_hf_name(name)
    tmpl, layer = template(name)
    if tmpl in HF_IGNORED:
        return None
    if tmpl not in HF_TO_MCORE:
        raise ConversionError(f"unexpected HF weight {name!r}: not in the GPT-2 name table")
    mname, transform = HF_TO_MCORE[tmpl]
    try:
        return mname.format(layer), TRANSFORMS[transform][0](tensor, shapes)
    except RuntimeError as exc:  # a reshape that cannot fit: config.json and weights disagree
        raise ConversionError(
            f"HF weight {name} has shape {tuple(tensor.shape)}, which does not fit "
            f"config.json (hidden {shapes.hidden_size}, heads {shapes.num_heads}, "
            f"vocab {shapes.vocab_size})"
        ) from exc


def mcore_to_hf(name: str, tensor: torch.Tensor, shapes: Shapes) -> tuple[str, torch.Tensor] | None:
    """Map one megatron-core tensor; None for keys without an HF counterpart. Unknown keys raise."""
    if name.endswith(MCORE_IGNORED_SUFFIXES):
        return None
    tmpl, layer = template(name)
    if tmpl not in MCORE_TO_HF:
        raise ConversionError(f"unexpected megatron weight {name!r}: not in the GPT-2 name table")
    hname, transform = MCORE_TO_HF[tmpl]
    return hname.format(layer), TRANSFORMS[transform][1](tensor, shapes)


def is_lora_name(name: str) -> bool:
    """Whether a (HF or megatron) name is a LoRA adapter's."""
    return ".lora_A" in name or ".lora_B" in name


def expected_mcore_names(num_layers: int) -> set[str]:
    """Every megatron-core weight name a full (PP=1) model without adapters has."""
    return {
        m.format(i)
        for m, _ in HF_TO_MCORE.values()
        for i in range(num_layers)
        if not is_lora_name(m)
    }
