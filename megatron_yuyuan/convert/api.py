"""Conversions between HF / legacy Megatron-LM checkpoints and megatron-core checkpoints.

All run in one process: torch_dist checkpoints hold global tensors, so the TP/PP a checkpoint is
"for" only decides the padded vocabulary (a multiple of 128 * TP); ``finetune --load`` reshards it
to any layout. Weights stay in the source dtype and are moved one tensor at a time.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from megatron_yuyuan import parallel
from megatron_yuyuan.checkpoint import storage
from megatron_yuyuan.config import ModelConfig, RunConfig, validate_layout
from megatron_yuyuan.convert.hf_io import (
    EXPORT_MARKER,
    ShardedSafetensorsWriter,
    hf_config_dict,
    iter_hf_weights,
    model_config_from_hf,
    save_safetensors,
    write_generation_config,
    write_tokenizer_files,
)
from megatron_yuyuan.convert.legacy import read_legacy_checkpoint
from megatron_yuyuan.convert.weight_map import (
    Shapes,
    expected_mcore_names,
    hf_to_mcore,
    mcore_to_hf,
)
from megatron_yuyuan.errors import ConversionError
from megatron_yuyuan.files import default_file_mode, disk_full_error, read_json_object
from megatron_yuyuan.model import build_model
from megatron_yuyuan.prompts import PromptTemplate

TOKENIZER_SUBDIR = "tokenizer"


def check_target_layout(m: ModelConfig, tp: int, pp: int) -> None:
    """The layout the checkpoint is meant for must fit the model (clear error otherwise)."""
    validate_layout(RunConfig(model=m, parallel=_parallel(tp, pp)), world_size=tp * pp)


def _parallel(tp: int, pp: int):
    from megatron_yuyuan.config import ParallelConfig

    return ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def _fill_and_save(
    model_cfg: ModelConfig,
    dtype: torch.dtype,
    padded_vocab: int,
    tensors: Iterable[tuple[str, Callable[[], torch.Tensor]]],
    save: Path,
    source: str,
    extra_files: Callable[[Path], None] | None = None,
) -> Path:
    """Place each named megatron-core tensor into the model's sharded state dict and save it.

    The model is built on the meta device, only for its checkpoint keys and shapes, so the weights
    exist once in memory, in the source dtype.
    """
    layout = parallel.init_distributed(1, 1)
    with torch.device("meta"):
        template = build_model(
            RunConfig(model=model_cfg), layout, padded_vocab_size=padded_vocab, params_dtype=dtype
        )
    sharded = template.sharded_state_dict()
    expected = expected_mcore_names(model_cfg.num_layers)
    seen = set()
    for name, load in tensors:
        if name not in expected or name not in sharded:
            raise ConversionError(
                f"{source}: weight {name!r} has no place in a {model_cfg.num_layers}-layer "
                f"model (unexpected key)"
            )
        tensor = load().to(dtype)
        want = tuple(sharded[name].local_shape)
        if tuple(tensor.shape) != want:
            raise ConversionError(
                f"{source}: {name} has shape {tuple(tensor.shape)}, the model expects "
                f"{want}: config.json and weights disagree"
            )
        sharded[name].data = tensor.contiguous()
        seen.add(name)
    missing = sorted(expected - seen)
    if missing:
        raise ConversionError(
            f"{source}: missing weights (megatron names) {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}"
        )
    return storage.save_sharded(
        save,
        sharded,
        model_cfg,
        iteration=0,
        padded_vocab_size=padded_vocab,
        dtype=dtype,
        extra_files=extra_files,
    )


def convert_hf_to_megatron(
    hf_dir: str | Path,
    save: str | Path,
    tp: int = 1,
    pp: int = 1,
    dtype: torch.dtype | None = None,
    allow_non_finite: bool = False,
) -> Path:
    """HF GPT-2 directory -> megatron-core checkpoint under ``save``; returns the iteration dir.
    Weights holding NaN/Inf are refused unless ``allow_non_finite``."""
    hf_dir = Path(hf_dir)
    model_cfg, src_dtype = model_config_from_hf(hf_dir)
    check_target_layout(model_cfg, tp, pp)
    padded = model_cfg.padded_vocab_size(tp)
    shapes = Shapes(
        model_cfg.hidden_size, model_cfg.num_attention_heads, model_cfg.vocab_size, padded
    )

    def mapped():
        for name, load in iter_hf_weights(hf_dir, allow_non_finite):
            out = hf_to_mcore(name, load(), shapes)  # loads lazily, one tensor at a time
            if out is not None:
                yield out[0], (lambda t=out[1]: t)

    def tokenizer(ckpt_dir: Path) -> None:  # the HF tokenizer travels with the checkpoint
        if (hf_dir / "vocab.json").is_file() or (hf_dir / "tokenizer.json").is_file():
            (ckpt_dir / TOKENIZER_SUBDIR).mkdir(exist_ok=True)
            write_tokenizer_files(ckpt_dir / TOKENIZER_SUBDIR, model_cfg.vocab_size, hf_dir)

    dtype = dtype or src_dtype
    return _fill_and_save(model_cfg, dtype, padded, mapped(), Path(save), str(hf_dir), tokenizer)


def convert_legacy_to_megatron(
    mlm_dir: str | Path,
    save: str | Path,
    tp: int = 1,
    pp: int = 1,
    vocab_size: int | None = None,
    trust_pickle: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Legacy Megatron-LM checkpoint -> megatron-core checkpoint; returns the iteration dir."""
    model_cfg, full = read_legacy_checkpoint(Path(mlm_dir), vocab_size, trust_pickle)
    check_target_layout(model_cfg, tp, pp)
    padded = model_cfg.padded_vocab_size(tp)
    emb = full["embedding.word_embeddings.weight"]
    if emb.shape[0] < model_cfg.vocab_size:
        raise ConversionError(
            f"--vocab-size {model_cfg.vocab_size} exceeds the {emb.shape[0]} embedding rows of "
            f"{mlm_dir}; give the tokenizer's true vocabulary size"
        )
    repadded = emb.new_zeros((padded, emb.shape[1]))
    repadded[: model_cfg.vocab_size] = emb[: model_cfg.vocab_size]
    full["embedding.word_embeddings.weight"] = repadded
    src_dtype = emb.dtype
    return _fill_and_save(
        model_cfg,
        dtype or src_dtype,
        padded,
        ((k, (lambda t=v: t)) for k, v in full.items()),
        Path(save),
        str(mlm_dir),
    )


def check_hf_out_dir(out: Path, load: Path) -> None:
    """``--out`` must be new, empty, or an earlier HF export of ours; never a checkpoint.

    Raises:
        CheckpointError: naming what is there and what to do.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise storage.CheckpointError(f"--out {out}: is a file; give a directory")
    if not out.exists():
        return
    if (
        out.resolve() == Path(load).resolve()
        or storage.holds_checkpoints(out)
        or any(out.resolve() == p.resolve() for p in Path(load).resolve().parents)
    ):
        raise storage.CheckpointError(
            f"--out {out}: holds (or is) the megatron-core checkpoint; write the export to a new "
            f"directory"
        )
    if any(out.iterdir()) and not (out / EXPORT_MARKER).is_file():
        raise storage.CheckpointError(
            f"--out {out}: is not empty and is not an earlier export of this tool; choose a new "
            f"or empty directory (nothing there is deleted)"
        )


EXPORT_FILE_PATTERNS = (
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "adapter_config.json",
    "adapter_model.safetensors",
)
"""The files an export may write (and so replace or remove in a later export)."""


def is_export_file_name(name: str) -> bool:
    """A plain file name (no folder, no '..') that an export writes."""
    return (
        name == Path(name).name
        and name not in (".", "..")
        and any(fnmatch.fnmatchcase(name, p) for p in EXPORT_FILE_PATTERNS)
    )


def _publish_export(tmp: Path, out: Path) -> None:
    """Move a complete export from ``tmp`` to ``out``.

    Into a new or empty ``out``: one rename. Over an earlier export: each new file replaces its
    namesake (one rename each), files only the earlier export wrote are removed, and the marker
    goes last. Files a user added there are never moved or deleted; one named like a new export
    file stops the export before anything changes.
    """
    if not out.exists() or not any(out.iterdir()):
        if out.exists():
            out.rmdir()  # empty
        tmp.rename(out)
        return
    marker = out / EXPORT_MARKER
    advice = "it is corrupt: export to a new directory"
    listed = read_json_object(marker, advice, storage.CheckpointError).get("files", [])
    # The marker is a file anyone can edit: only plain names of files an export writes count,
    # so an entry such as "../victim.txt" or "/etc/x" can never be replaced or deleted.
    earlier = {n for n in listed if isinstance(n, str) and is_export_file_name(n)}
    new = {p.name for p in tmp.iterdir()}
    clash = sorted(n for n in new if (out / n).exists() and n not in earlier and n != EXPORT_MARKER)
    if clash:
        raise storage.CheckpointError(
            f"--out {out}: holds your own {', '.join(clash)}, which this export would replace; "
            f"move them away or export to a new directory"
        )
    for name in sorted(new - {EXPORT_MARKER}):
        os.replace(tmp / name, out / name)
    for name in sorted(earlier - new):
        if (out / name).is_file():
            (out / name).unlink()  # a file the earlier export wrote (e.g. a stale shard)
    os.replace(tmp / EXPORT_MARKER, marker)
    tmp.rmdir()


PEFT_TARGETS = {
    "linear_qkv": "c_attn",
    "linear_proj": "attn.c_proj",
    "linear_fc1": "c_fc",
    "linear_fc2": "mlp.c_proj",
}
"""megatron LoRA target -> the PEFT target_modules entry for GPT-2 (PEFT matches name suffixes;
``c_proj`` alone would match both projections)."""


def convert_megatron_to_hf(
    load: str | Path,
    out: str | Path,
    tokenizer_dir: str | Path | None = None,
    adapter_only: bool = False,
    lora_base: str | Path | None = None,
) -> list[Path]:
    """megatron-core checkpoint (any TP/PP) -> HF directory; returns the files written.

    A LoRA checkpoint exports merged (its base's weights + (alpha / r) B A, one GPT2LMHeadModel)
    or, with ``adapter_only``, as a PEFT adapter folder for ``PeftModel.from_pretrained``.
    Written into a temporary directory beside ``out`` and moved to ``out`` when complete.
    ``out`` must be new, empty or an earlier export (see :func:`check_hf_out_dir`).
    """
    from megatron_yuyuan import lora
    from megatron_yuyuan.checkpoint import loader

    out = Path(out)
    check_hf_out_dir(out, Path(load))
    # the adapters alone need no base (a --lora-base is then not used)
    source = loader.open_checkpoint(
        load, None if adapter_only else lora_base, need_base=not adapter_only
    )
    info = source.info
    if adapter_only and not info.lora:
        raise storage.CheckpointError(
            f"--adapter-only: {source.path} holds no LoRA adapters (a full model); drop "
            f"--adapter-only"
        )
    layout = parallel.init_distributed(1, 1)
    with torch.device("meta"):  # a template for the keys only: no second copy of the weights
        template = loader.build(source, layout, info.dtype, info.padded_vocab_size)
    state, dtype = loader.load_full_state(source, template, with_base=not adapter_only)
    if info.lora and not adapter_only:
        state = lora.merged_weights(state, source.adapters.scale)
        info = dataclasses.replace(info, dtype=dtype)  # merged into the base's
    ckpt, adapters = source.path, source.adapters
    m = info.model
    shapes = Shapes(m.hidden_size, m.num_attention_heads, m.vocab_size, info.padded_vocab_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    needed = sum(t.numel() * t.element_size() for t in state.values())  # for a full disk
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp."))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the export from other users
    try:
        if adapter_only:
            files = [_write_peft_adapter(tmp, state, shapes, adapters, info)]
        else:
            files = _write_hf_model(tmp, state, shapes, info, ckpt, tokenizer_dir)
        (tmp / EXPORT_MARKER).write_text(
            json.dumps(
                {
                    "source": str(ckpt.resolve()),
                    "iteration": info.iteration,
                    "prompt_template": info.prompt_template or PromptTemplate().text,
                    # the run's evaluation decoding: a server's defaults
                    "decoding": storage.recorded_decoding(ckpt),
                    "files": sorted(p.name for p in tmp.iterdir()),
                },
                indent=1,
            )
        )
        for f in tmp.iterdir():  # some writers create files 0600: give them the umask's mode
            os.chmod(f, default_file_mode())
        _publish_export(tmp, out)
    except BaseException as exc:
        full = disk_full_error(exc, tmp, needed, "the export")
        shutil.rmtree(tmp, ignore_errors=True)  # made by mkdtemp above
        if full is not None:
            raise full from exc
        raise
    return [out / p.name for p in files] + sorted(
        p
        for p in out.iterdir()
        if p.suffix == ".json" and p.name not in ("model.safetensors.index.json", EXPORT_MARKER)
    )


def _write_hf_model(tmp: Path, state, shapes: Shapes, info, ckpt: Path, tokenizer_dir):
    """A GPT2LMHeadModel directory in ``tmp``; returns the weight files."""
    m = info.model
    writer = ShardedSafetensorsWriter(tmp)
    for name in list(state):
        mapped = mcore_to_hf(name, state.pop(name), shapes)
        if mapped is not None:
            writer.add(*mapped)
    files = writer.close()
    (tmp / "config.json").write_text(json.dumps(hf_config_dict(m, info.dtype), indent=1))
    tok_src = (
        Path(tokenizer_dir)
        if tokenizer_dir
        else (ckpt / TOKENIZER_SUBDIR if (ckpt / TOKENIZER_SUBDIR).is_dir() else None)
    )
    if not write_tokenizer_files(tmp, m.vocab_size, tok_src):
        print(
            f"> note: vocab_size {m.vocab_size} is not GPT-2's and no --tokenizer was given: "
            f"no tokenizer files written"
        )
    else:
        write_chat_template(tmp, PromptTemplate(info.prompt_template or PromptTemplate().text))
    write_generation_config(tmp, m.vocab_size)
    return files


def write_chat_template(folder: Path, template: PromptTemplate) -> None:
    """The training prompt as the tokenizer's ``chat_template``: ``apply_chat_template(messages,
    add_generation_prompt=True)`` renders exactly the prompt the model was trained on."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.chat_template = template.to_jinja()
    tok.save_pretrained(str(folder))


def _write_peft_adapter(tmp: Path, state, shapes: Shapes, adapters, info) -> Path:
    """``adapter_model.safetensors`` + ``adapter_config.json`` of a PEFT LoRA adapter for
    GPT2LMHeadModel in ``tmp``; returns the weights file."""
    tensors = {}
    for name in list(state):
        hname, tensor = mcore_to_hf(name, state.pop(name), shapes)
        tensors[f"base_model.model.{hname}"] = tensor.contiguous()
    path = tmp / "adapter_model.safetensors"
    save_safetensors(tensors, path)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": adapters.lora_rank,
        "lora_alpha": adapters.lora_alpha,
        "lora_dropout": adapters.lora_dropout,
        "target_modules": [PEFT_TARGETS[t] for t in adapters.targets],
        "fan_in_fan_out": True,  # GPT-2's Conv1D stores weights [in, out]
        "bias": "none",
        "inference_mode": True,
        "base_model_name_or_path": None,  # the HF export of info.lora["base"] (to_hf --load BASE)
    }
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return path
