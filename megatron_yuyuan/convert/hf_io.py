"""Reading and writing Hugging Face GPT-2 directories (config.json, weights, tokenizer files)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from megatron_yuyuan.config import ModelConfig
from megatron_yuyuan.errors import UserError
from megatron_yuyuan.files import read_json_object
from megatron_yuyuan.tokenizer import GPT2_VOCAB_SIZE, gpt2_bpe_files

EXPORT_MARKER = "megatron_yuyuan_export.json"
"""Written into every HF export: its source, files and prompt template, so a later export may
replace it and generation knows the template."""

_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_SHARD_BYTES = 2 * 1024**3


class HFFormatError(UserError):
    """An HF directory we cannot convert; the message names the file/field."""


def model_config_from_hf(hf_dir: Path) -> tuple[ModelConfig, torch.dtype]:
    """ModelConfig and weight dtype from ``config.json``, refusing what our GPT-2 cannot express."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise HFFormatError(f"{path} not found: --hf-dir must hold an HF GPT-2 model directory")
    c = read_json_object(path, "fix or re-download the GPT-2 config.json", HFFormatError)
    if c.get("model_type") not in ("gpt2", None):
        raise HFFormatError(f"{path}: model_type {c.get('model_type')!r} is not gpt2")
    act = c.get("activation_function", "gelu_new")
    if act not in (*_TANH_GELUS, "gelu"):
        raise HFFormatError(
            f"{path}: activation_function {act!r} is not supported "
            f"(gelu_new, gelu_pytorch_tanh, gelu_fast or gelu)"
        )
    for key, ok in (
        ("scale_attn_by_inverse_layer_idx", False),
        ("scale_attn_weights", True),
        ("tie_word_embeddings", True),
        ("add_cross_attention", False),
    ):
        if c.get(key, ok) != ok:
            raise HFFormatError(f"{path}: {key}={c[key]} is not supported (needs {ok})")
    try:
        model = ModelConfig(
            num_layers=c["n_layer"],
            hidden_size=c["n_embd"],
            num_attention_heads=c["n_head"],
            ffn_hidden_size=c.get("n_inner"),
            max_position_embeddings=c["n_positions"],
            vocab_size=c["vocab_size"],
            layernorm_epsilon=c.get("layer_norm_epsilon", 1e-5),
            activation="gelu" if act == "gelu" else "gelu_tanh",
            hidden_dropout=c.get("resid_pdrop", 0.1),
            attention_dropout=c.get("attn_pdrop", 0.1),
            init_method_std=c.get("initializer_range", 0.02),
        )
    except KeyError as exc:
        raise HFFormatError(f"{path}: missing field {exc}") from exc
    except (ValueError, TypeError) as exc:
        raise HFFormatError(f"{path}: {exc}") from exc
    named = str(c.get("torch_dtype") or c.get("dtype") or "float32")
    dtype = getattr(torch, named, None)
    if not isinstance(dtype, torch.dtype):  # e.g. "auto": no dtype named, convert as float32
        dtype = torch.float32
    if not dtype.is_floating_point:
        raise HFFormatError(
            f"{path}: torch_dtype {named!r} is not a floating-point type (quantized weights are "
            f"not supported); give float32, float16 or bfloat16 weights"
        )
    return model, dtype


def hf_config_dict(m: ModelConfig, dtype: torch.dtype) -> dict:
    """config.json for a GPT2LMHeadModel of this shape."""
    from transformers import GPT2Config

    cfg = GPT2Config(
        vocab_size=m.vocab_size,
        n_positions=m.max_position_embeddings,
        n_embd=m.hidden_size,
        n_layer=m.num_layers,
        n_head=m.num_attention_heads,
        n_inner=None if m.ffn_size == 4 * m.hidden_size else m.ffn_size,
        activation_function="gelu_new" if m.activation == "gelu_tanh" else "gelu",
        resid_pdrop=m.hidden_dropout,
        embd_pdrop=m.hidden_dropout,
        attn_pdrop=m.attention_dropout,
        layer_norm_epsilon=m.layernorm_epsilon,
        initializer_range=m.init_method_std,
        bos_token_id=min(m.vocab_size, GPT2_VOCAB_SIZE) - 1,
        eos_token_id=min(m.vocab_size, GPT2_VOCAB_SIZE) - 1,
        tie_word_embeddings=True,
        architectures=["GPT2LMHeadModel"],
    )
    out = cfg.to_dict()
    out["torch_dtype"] = str(dtype).removeprefix("torch.")
    return out


def iter_hf_weights(
    hf_dir: Path, allow_non_finite: bool = False
) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """(name, loader) for every tensor, loading lazily one at a time.

    Reads sharded or single safetensors, else ``pytorch_model.bin`` (sharded or not) with
    ``weights_only=True`` and ``mmap=True``. Loaders return tensors that own their memory: a tensor
    left pointing into the memory-mapped file would keep the whole file's pages resident. Every
    safetensors header is checked against its file before anything is read (a truncated file
    would otherwise read as zeros), and a weight holding NaN or Inf is refused unless
    ``allow_non_finite``.
    """
    hf_dir = Path(hf_dir)
    files = _weight_files(hf_dir, "model.safetensors", "model.safetensors.index.json")
    if files:
        headers = [(file, *_safetensors_header(file)) for file in files]  # all checked first
        for file, base, header in headers:
            yield from _finite(_read_safetensors(file, base, header), file, allow_non_finite)
        return
    files = _weight_files(hf_dir, "pytorch_model.bin", "pytorch_model.bin.index.json")
    if not files:
        raise HFFormatError(
            f"{hf_dir}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json) found"
        )
    for file in files:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001 - name the file whatever went wrong
            raise HFFormatError(
                f"{file}: cannot be read as a weights-only torch file ({exc})"
            ) from exc
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise HFFormatError(
                f"{file}: holds something other than a dict of named tensors; give a model "
                f"saved with save_pretrained"
            )
        tensors = ((name, _taken(state, name)) for name in list(state))
        yield from _finite(tensors, file, allow_non_finite)


def _taken(state: dict, name: str) -> Callable[[], torch.Tensor]:
    """Take tensor ``name`` out of ``state`` now (the dict stops holding it) and return a loader
    of a copy: once the copy is converted, nothing keeps the original alive."""
    tensor = state.pop(name)
    return lambda: tensor.clone()


def _finite(tensors, file: Path, allow: bool) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """The same loaders, refusing a floating-point weight that holds NaN or Inf."""
    for name, load in tensors:

        def checked(name=name, load=load) -> torch.Tensor:
            t = load()
            if not allow and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise HFFormatError(
                    f"{file}: tensor {name} holds {bad:,} NaN/Inf value(s); the weights are "
                    f"damaged (re-download them), or pass --allow-non-finite to convert anyway"
                )
            return t

        yield name, checked


_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 2**20  # the safetensors format's own limit on the JSON header


def _safetensors_header(file: Path) -> tuple[int, dict]:
    """(data start, header) of a safetensors file, every tensor's dtype, shape and byte range
    checked against the file's size."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        header_len = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if not 0 < header_len <= min(_MAX_HEADER, size - 8):
            raise HFFormatError(
                f"{file}: not a safetensors file (header length {header_len} for a file of "
                f"{size:,} bytes); the file is truncated or damaged: re-download it"
            )
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, UnicodeDecodeError) as exc:
            raise HFFormatError(f"{file}: not a safetensors file ({exc})") from exc
    if not isinstance(header, dict):
        raise HFFormatError(f"{file}: its safetensors header is not a JSON object")
    base = 8 + header_len
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        problem = None
        try:
            dtype = _ST_DTYPES.get(meta["dtype"])
            shape = [int(d) for d in meta["shape"]]
            start, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise HFFormatError(
                f"{file}: tensor {name} has no valid dtype, shape and data_offsets in the "
                f"header; the file is damaged: re-download it"
            ) from None
        if dtype is None:
            raise HFFormatError(f"{file}: tensor {name} has unsupported dtype {meta['dtype']}")
        numel = 1
        for d in shape:
            numel *= d
        if any(d < 0 for d in shape) or not 0 <= start <= end:
            problem = f"shape {shape} / byte range {start}-{end} is impossible"
        elif (end - start) != numel * dtype.itemsize:
            problem = (
                f"shape {shape} needs {numel * dtype.itemsize:,} bytes but its range holds "
                f"{end - start:,}"
            )
        elif base + end > size:
            problem = (
                f"its bytes end at {base + end:,} but the file has {size:,} (truncated: "
                f"re-download it)"
            )
        if problem:
            raise HFFormatError(f"{file}: tensor {name}: {problem}")
    return base, header


def _read_safetensors(
    file: Path, base: int, header: dict
) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """Tensors of one (checked) safetensors file, each read into its own buffer with plain file
    reads.

    No memory map: a mapped file keeps every page it has served resident, which would add the
    whole shard to the converter's peak memory.
    """
    for name, meta in header.items():
        if name == "__metadata__":
            continue

        def load(meta=meta, name=name) -> torch.Tensor:
            start, end = meta["data_offsets"]
            buf = bytearray(end - start)
            with open(file, "rb") as f:
                f.seek(base + start)
                if f.readinto(buf) != len(buf):
                    raise HFFormatError(f"{file}: ends inside tensor {name}; re-download it")
            if not buf:
                return torch.empty(meta["shape"], dtype=_ST_DTYPES[meta["dtype"]])
            return torch.frombuffer(buf, dtype=_ST_DTYPES[meta["dtype"]]).reshape(meta["shape"])

        yield name, load


def _weight_files(hf_dir: Path, single: str, index: str) -> list[Path]:
    if (hf_dir / index).is_file():
        data = read_json_object(hf_dir / index, "re-download the model", HFFormatError)
        weight_map = data.get("weight_map")
        if (
            not isinstance(weight_map, dict)
            or not weight_map
            or not all(isinstance(v, str) and v == Path(v).name for v in weight_map.values())
        ):
            raise HFFormatError(
                f"{hf_dir / index}: has no weight_map of tensor names to shard file names; "
                f"re-download the model"
            )
        files = [hf_dir / s for s in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise HFFormatError(f"{hf_dir / index} lists missing shard file(s): {missing}")
        return files
    return [hf_dir / single] if (hf_dir / single).is_file() else []


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``safetensors.torch.save_file``; its write errors (a Rust error that names no file) become
    an ``OSError`` naming ``path``, with ENOSPC when the disk is full."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except SafetensorError as exc:
        text = str(exc)
        if "os error" not in text and "I/O error" not in text:
            raise
        code = errno.ENOSPC if "os error 28" in text else errno.EIO
        raise OSError(code, os.strerror(code) if code == errno.ENOSPC else text, str(path)) from exc


class ShardedSafetensorsWriter:
    """Writes tensors into ~2 GB safetensors shards as they come, then the index (HF layout)."""

    def __init__(self, out_dir: Path, shard_bytes: int = _SHARD_BYTES) -> None:
        self.out_dir, self.shard_bytes = Path(out_dir), shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[dict[str, torch.Tensor]] = []
        self.files: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += tensor.numel() * tensor.element_size()
        self.total += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        path = self.out_dir / f"model-{len(self.files) + 1:05d}.safetensors"
        save_safetensors(self.pending, path)
        self.files.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[Path]:
        self._flush()
        if len(self.files) == 1:  # a single file takes the unsharded name
            single = self.out_dir / "model.safetensors"
            self.files[0][0].rename(single)
            return [single]
        n = len(self.files)
        weight_map = {}
        for i, (path, names) in enumerate(self.files):
            final = self.out_dir / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(final)
            weight_map.update({name: final.name for name in names})
        index = self.out_dir / "model.safetensors.index.json"
        index.write_text(
            json.dumps({"metadata": {"total_size": self.total}, "weight_map": weight_map}, indent=1)
        )
        return [self.out_dir / f for f in dict.fromkeys(weight_map.values())] + [index]


def write_tokenizer_files(out_dir: Path, vocab_size: int, tokenizer_dir: Path | None) -> bool:
    """Tokenizer files for AutoTokenizer: copied from ``tokenizer_dir``, or GPT-2's own when the
    vocabulary is GPT-2's. Returns False when neither applies."""
    from transformers import GPT2TokenizerFast

    if tokenizer_dir is not None:
        names = (
            "tokenizer.json",
            "vocab.json",
            "merges.txt",
            "tokenizer_config.json",
            "special_tokens_map.json",
        )
        found = [n for n in names if (Path(tokenizer_dir) / n).is_file()]
        if not ("tokenizer.json" in found or {"vocab.json", "merges.txt"} <= set(found)):
            raise HFFormatError(
                f"--tokenizer {tokenizer_dir}: no tokenizer there (needs tokenizer.json, or "
                f"vocab.json + merges.txt)"
            )
        for name in found:
            shutil.copy(Path(tokenizer_dir) / name, out_dir / name)
        return True
    if vocab_size != GPT2_VOCAB_SIZE:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = gpt2_bpe_files()
        shutil.copy(vocab, Path(tmp) / "vocab.json")
        shutil.copy(merges, Path(tmp) / "merges.txt")
        tok = GPT2TokenizerFast.from_pretrained(tmp)
        tok.save_pretrained(str(out_dir))
    return True


def write_generation_config(out_dir: Path, vocab_size: int) -> None:
    from transformers import GenerationConfig

    eos = min(vocab_size, GPT2_VOCAB_SIZE) - 1
    GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos).save_pretrained(
        str(out_dir)
    )
