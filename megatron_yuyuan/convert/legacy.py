"""Reading legacy Megatron-LM GPT checkpoints (``language_model.*`` keys, fused
``query_key_value``).

Layout: ``[iter_N|release]/mp_rank_TT[_PPP]/model_optim_rng.pt``
with ``args``, ``checkpoint_version`` and ``model.language_model.{embedding,encoder|transformer}``.
TP shards are merged (column-parallel on dim 0, row-parallel on dim 1) and PP stages renumbered to
global layers, giving full tensors under megatron-core names.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from megatron_yuyuan.config import ModelConfig
from megatron_yuyuan.errors import UserError

# legacy name (after "layers.{}.") -> megatron-core name (after "decoder.layers.{}.")
LEGACY_LAYER_TO_MCORE = {
    "input_layernorm": "input_layernorm",
    "self_attention.query_key_value": "self_attention.linear_qkv",
    "self_attention.dense": "self_attention.linear_proj",
    "post_attention_layernorm": "pre_mlp_layernorm",
    "mlp.dense_h_to_4h": "mlp.linear_fc1",
    "mlp.dense_4h_to_h": "mlp.linear_fc2",
}
_COLUMN_PARALLEL = ("self_attention.query_key_value", "mlp.dense_h_to_4h")
_ROW_PARALLEL_WEIGHTS = ("self_attention.dense.weight", "mlp.dense_4h_to_h.weight")
_RANK_DIR = re.compile(r"mp_rank_(\d+)(?:_(\d+))?$")


class LegacyFormatError(UserError):
    """Not a legacy Megatron-LM checkpoint we can read; the message names the file."""


def find_iteration_dir(path: Path) -> Path:
    path = Path(path)
    latest = path / "latest_checkpointed_iteration.txt"
    if latest.is_file():
        it = latest.read_text().strip()
        return path / ("release" if it == "release" else f"iter_{int(it):07d}")
    if any(_RANK_DIR.match(p.name) for p in path.iterdir() if p.is_dir()):
        return path
    raise LegacyFormatError(
        f"{path}: no latest_checkpointed_iteration.txt and no mp_rank_* folders"
    )


def _load(file: Path, trust_pickle: bool) -> dict:
    if trust_pickle:
        return torch.load(file, map_location="cpu", weights_only=False)
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise LegacyFormatError(
                f"{file}: cannot be loaded with weights_only=True ({str(exc)[:200]}); if you trust "
                f"this file, pass --trust-pickle"
            ) from exc


def _qkv_to_mcore(t: torch.Tensor, version: float, local_heads: int) -> torch.Tensor:
    """One TP shard of query_key_value, re-ordered to megatron-core's [heads, 3, hn] rows."""
    rest = t.shape[1:]
    hn = t.shape[0] // (3 * local_heads)
    if version >= 2.0:  # already [heads, 3, hn]
        return t
    if version == 1.0:  # [heads, hn, 3]
        return t.view(local_heads, hn, 3, *rest).transpose(1, 2).reshape(t.shape).contiguous()
    return (
        t.view(3, local_heads, hn, *rest).transpose(0, 1).reshape(t.shape).contiguous()
    )  # [3, heads, hn]


def model_config_from_args(args: argparse.Namespace, vocab_size: int | None) -> ModelConfig:
    a = vars(args)
    if vocab_size is None:
        if a.get("tokenizer_type") in ("GPT2BPETokenizer", None):
            vocab_size = 50257
        else:
            raise LegacyFormatError(f"tokenizer_type {a.get('tokenizer_type')}: pass --vocab-size")
    gelu = "gelu_tanh" if a.get("openai_gelu") or a.get("bias_gelu_fusion", True) else "gelu"
    return ModelConfig(
        num_layers=a["num_layers"],
        hidden_size=a["hidden_size"],
        num_attention_heads=a["num_attention_heads"],
        ffn_hidden_size=a.get("ffn_hidden_size"),
        max_position_embeddings=a["max_position_embeddings"],
        vocab_size=vocab_size,
        layernorm_epsilon=a.get("layernorm_epsilon", 1e-5),
        activation=gelu,
        hidden_dropout=a.get("hidden_dropout", 0.1),
        attention_dropout=a.get("attention_dropout", 0.1),
    )


def read_legacy_checkpoint(
    path: Path, vocab_size: int | None = None, trust_pickle: bool = False
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, full tensors under megatron-core names; the embedding keeps the source's
    vocabulary padding, which the caller re-pads for its own TP)."""
    it_dir = find_iteration_dir(path)
    ranks: dict[tuple[int, int], Path] = {}
    for d in it_dir.iterdir():
        m = _RANK_DIR.match(d.name)
        if m and (d / "model_optim_rng.pt").is_file():
            ranks[(int(m.group(2) or 0), int(m.group(1)))] = d / "model_optim_rng.pt"
    if not ranks:
        raise LegacyFormatError(f"{it_dir}: no mp_rank_*/model_optim_rng.pt files")
    pp = max(p for p, _ in ranks) + 1
    tp = max(t for _, t in ranks) + 1
    missing = [(p, t) for p in range(pp) for t in range(tp) if (p, t) not in ranks]
    if missing:
        raise LegacyFormatError(
            f"{it_dir}: missing shard folders for (pipeline, tensor) ranks {missing}: copy the "
            f"whole checkpoint"
        )
    first = _load(ranks[(0, 0)], trust_pickle)
    if "args" not in first or "model" not in first:
        raise LegacyFormatError(
            f"{ranks[(0, 0)]}: no 'args'/'model' entries: not a Megatron-LM checkpoint"
        )
    model_cfg = model_config_from_args(first["args"], vocab_size)
    version = float(first.get("checkpoint_version", 0) or 0)
    layers_per_stage = model_cfg.num_layers // pp
    local_heads = model_cfg.num_attention_heads // tp
    shards: dict[str, list[torch.Tensor]] = {}
    for p in range(pp):
        for t in range(tp):
            ckpt = first if (p, t) == (0, 0) else _load(ranks[(p, t)], trust_pickle)
            lm = ckpt["model"]["language_model"]
            for name, tensor in lm.get("embedding", {}).get("word_embeddings", {}).items():
                shards.setdefault(f"embedding.word_embeddings.{name}", []).append(tensor)
            for name, tensor in lm.get("embedding", {}).get("position_embeddings", {}).items():
                shards.setdefault(f"embedding.position_embeddings.{name}", [tensor])
            encoder = lm.get("encoder", lm.get("transformer", {}))
            for name, tensor in encoder.items():
                name = name.replace(".attention.", ".self_attention.")
                if name.startswith("final_layernorm."):
                    shards.setdefault(f"decoder.{name}", [tensor])
                    continue
                m = re.match(r"layers\.(\d+)\.(.+)\.(weight|bias)$", name)
                if not m or m.group(2) not in LEGACY_LAYER_TO_MCORE:
                    raise LegacyFormatError(
                        f"{ranks[(p, t)]}: unexpected weight language_model.{name}"
                    )
                layer = int(m.group(1)) + p * layers_per_stage
                legacy = f"{m.group(2)}.{m.group(3)}"
                if m.group(2) == "self_attention.query_key_value":
                    tensor = _qkv_to_mcore(tensor, version, local_heads)
                key = f"decoder.layers.{layer}.{LEGACY_LAYER_TO_MCORE[m.group(2)]}.{m.group(3)}"
                if m.group(2).endswith(_COLUMN_PARALLEL) or legacy in _ROW_PARALLEL_WEIGHTS:
                    shards.setdefault(key, []).append(tensor)
                else:
                    shards.setdefault(key, [tensor])  # replicated: the first rank's copy
    full = {}
    for key, parts in shards.items():
        legacy_row = any(key.endswith(s) for s in ("linear_proj.weight", "linear_fc2.weight"))
        full[key] = torch.cat(parts, dim=1 if legacy_row else 0) if len(parts) > 1 else parts[0]
    return model_cfg, full
