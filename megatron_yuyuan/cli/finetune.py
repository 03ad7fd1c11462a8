"""Train / finetune the GPT-2 (Yuyuan) model with megatron-core TP x PP x DP.

Launch under torchrun (gloo on CPU, NCCL on GPUs), e.g. TP=2 on two CPU processes::

    torchrun --nproc-per-node 2 -m megatron_yuyuan.finetune --config tiny --mock-data \\
        --tensor-model-parallel-size 2 --micro-batch-size 4 --global-batch-size 8 \\
        --seq-length 128 --train-iters 20 --metrics-file runs/tiny/metrics.jsonl

Flags follow Megatron-LM's names; ``--help`` lists them all with their meaning. Every input is
checked before any work: a bad flag, dataset, checkpoint or output path stops with one ``error:``
line (exit 2).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from megatron_yuyuan.cli import check_writable_dir, check_writable_file, run_cli
from megatron_yuyuan.config import RunConfig, validate_layout
from megatron_yuyuan.errors import ConfigError
from megatron_yuyuan.runtime import launch_rank


def check_config(cfg: RunConfig, world_size: int) -> None:
    """Every check that needs no process group: fail before any work is done."""
    from megatron_yuyuan.checkpoint.storage import (
        check_compatible,
        has_checkpoint,
        holds_checkpoints,
        read_info,
        resolve,
    )

    validate_layout(cfg, world_size)
    d, t = cfg.data, cfg.train
    if d.mock_data == (d.data_prefix is not None):
        raise ConfigError(
            "no training data: pass --data-prefix PREFIX (from "
            "python -m tools.preprocess_qa or tools.preprocess_medquad) or --mock-data "
            "(synthetic tokens)"
            if not d.mock_data
            else "--mock-data and --data-prefix exclude each other"
        )
    if d.data_prefix is not None:
        validates = t.eval_interval or t.eval_bleu_samples or t.save_best
        splits = ["train"] + (["valid"] if validates else [])
        for _, prefix in d.blend():
            check_dataset(prefix, cfg.model.vocab_size, splits)
        check_blend_agrees([p for _, p in d.blend()])
    if (
        t.load
        and not has_checkpoint(t.load)
        and not same_run(t.load, t.save)
        and not (t.pretrained_checkpoint)
    ):
        raise ConfigError(
            f"--load {t.load}: no checkpoint there (give --pretrained-checkpoint to "
            f"start from other weights, or --load equal to --save for a new run)"
        )
    for path in (t.load, t.pretrained_checkpoint):
        if path and has_checkpoint(path):
            ckpt = resolve(path)  # an empty, corrupt or dangling pointer stops here
            check_compatible(read_info(ckpt).model, cfg.model, ckpt)
        elif path and path == t.pretrained_checkpoint:
            raise ConfigError(f"--pretrained-checkpoint {path}: no checkpoint there")
    check_lora(cfg)
    check_save_options(cfg)
    from megatron_yuyuan.tracking import check_available

    check_available(cfg)
    # Outputs: found unwritable now, not after hours of training, and never over another run.
    resuming = bool(t.load and has_checkpoint(t.load) and not t.finetune)
    if resuming:
        from megatron_yuyuan.checkpoint.resume import check_resumable

        check_resumable(read_info(resolve(t.load)), resolve(t.load))
    if t.save:
        if holds_checkpoints(t.save) and not (resuming and same_run(t.load, t.save)):
            raise ConfigError(
                f"--save {t.save}: already holds checkpoints of another run, which this run "
                f"would overwrite (--finetune restarts at iteration 0); resume it with "
                f"--load {t.save}, or choose a new directory"
            )
        check_writable_dir(t.save, "--save")
    if t.save and resuming and same_run(t.load, t.save):
        warn_replaced_iterations(Path(t.load), Path(t.save))
    if t.metrics_file:
        check_writable_file(t.metrics_file, "--metrics-file")
        check_metrics_file(Path(t.metrics_file), resuming)
    if t.tensorboard_dir:
        check_writable_dir(t.tensorboard_dir, "--tensorboard-dir")


def check_save_options(cfg: RunConfig) -> None:
    """What to keep of a run's checkpoints is said together with where they go."""
    t = cfg.train
    asked = [
        ("--keep-last", t.keep_last is not None),
        ("--save-best", t.save_best is not None),
        ("--no-save-optim", not t.save_optim),
        ("--final-save weights", t.final_save == "weights"),
        ("--async-save", t.async_save),
    ]
    flags = [flag for flag, given in asked if given]
    if flags and not t.save:
        raise ConfigError(f"{flags[0]} decides which checkpoints to keep: it needs --save")


def check_lora(cfg: RunConfig) -> None:
    """LoRA needs a base checkpoint, and a LoRA checkpoint is continued with its own settings."""
    from megatron_yuyuan.checkpoint.adapters import config_of
    from megatron_yuyuan.checkpoint.storage import has_checkpoint, read_info, resolve

    t, want = cfg.train, cfg.lora
    flags = {"--load": t.load, "--pretrained-checkpoint": t.pretrained_checkpoint}
    found = {f: read_info(resolve(p)) for f, p in flags.items() if p and has_checkpoint(p)}
    for flag, info in found.items():
        if not info.lora:
            continue
        saved = config_of(info)
        what = (
            f"LoRA adapters of rank {saved.lora_rank}, alpha {saved.lora_alpha:g} on "
            f"{','.join(saved.targets)}"
        )
        same = f"--lora-rank {saved.lora_rank} --lora-alpha {saved.lora_alpha:g} "
        same += f"--lora-target-modules {','.join(saved.targets)}"
        if not want.enabled:
            raise ConfigError(
                f"{flag} {flags[flag]}: holds {what}; continue them with {same}, or export a "
                f"merged model with python -m checkpoints_convert.to_hf"
            )
        if (saved.lora_rank, saved.lora_alpha, saved.targets) != (
            want.lora_rank,
            want.lora_alpha,
            want.targets,
        ):
            raise ConfigError(
                f"{flag} {flags[flag]}: holds {what}, but this run asks for rank "
                f"{want.lora_rank}, alpha {want.lora_alpha:g} on {','.join(want.targets)}; "
                f"continue with {same}"
            )
    if want.enabled and want.lora_rank >= cfg.model.hidden_size:
        raise ConfigError(
            f"--lora-rank {want.lora_rank} is not below the hidden size "
            f"{cfg.model.hidden_size}: the adapters would not be low-rank; use a small rank "
            f"(8-64) or full finetuning (--lora-rank 0)"
        )
    if want.enabled and t.save and has_checkpoint(t.save) and not read_info(resolve(t.save)).lora:
        raise ConfigError(
            f"--save {t.save}: holds a full (non-LoRA) checkpoint, e.g. the base; LoRA adapters "
            f"go to a new directory (--save NEW, with --load NEW to resume there)"
        )
    if want.enabled and not found:
        raise ConfigError(
            "--lora-rank trains adapters on a base model's weights: give "
            "--pretrained-checkpoint BASE (e.g. HF weights converted with "
            "python -m checkpoints_convert.to_megatron)"
        )


def warn_replaced_iterations(load: Path, save: Path) -> None:
    """Resuming ``save`` from one of its older iterations: say which later checkpoints the run
    will replace (the ``latest`` pointer moves back at its first save)."""
    import sys

    from megatron_yuyuan.checkpoint.storage import complete_iterations, read_info, resolve

    start = read_info(resolve(load)).iteration
    later = [
        p.name
        for p in complete_iterations(save)
        if p.name[5:].isdigit() and int(p.name[5:]) > start  # iter_0000004
    ]
    if later and launch_rank() == 0:
        print(
            f"warning: --load {load} resumes {save} at iteration {start}; its later "
            f"checkpoint(s) {', '.join(later)} will be replaced as this run saves (and the latest "
            f"pointer moves back to this run's first save); stop now and copy them away to keep "
            f"them",
            file=sys.stderr,
            flush=True,
        )


def same_run(load: str | None, save: str | None) -> bool:
    """Whether --load names --save's run: the same folder, or one of its ``iter_N`` folders."""
    if not load or not save:
        return False
    loaded, saved = Path(load).resolve(), Path(save).resolve()
    return loaded == saved or (loaded.parent == saved and loaded.name.startswith("iter_"))


def check_metrics_file(path: Path, resuming: bool) -> None:
    """A run resumed from a checkpoint continues its metrics file; any other run needs a new
    (or empty) one, so neither another run's history nor an unrelated file is touched."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    if not resuming:
        raise ConfigError(
            f"--metrics-file {path}: exists and this run does not resume from a checkpoint "
            f"(--load); choose a new file so its rows are not lost"
        )
    with path.open("rb") as f:
        first = f.readline()
    try:
        row = json.loads(first)
        if isinstance(row, dict) and "iteration" in row:
            return
    except (UnicodeDecodeError, json.JSONDecodeError):
        pass
    raise ConfigError(
        f"--metrics-file {path}: exists and is not a metrics file of this tool (its first line "
        f"has no 'iteration'); choose another path"
    )


def check_dataset(prefix: str, vocab_size: int, splits: Sequence[str] = ("train",)) -> None:
    """The splits exist, match the dataset's manifest, hold pairs and fit the vocabulary."""
    from megatron_yuyuan.data.indexed import dataset_exists, read_meta, verify_split
    from megatron_yuyuan.data.manifest import rerun_advice

    for suffix in ("_train", "_valid", "_test", "_meta"):
        for ext in ("", ".jsonl", ".bin", ".idx", ".json"):
            if prefix.endswith(suffix + ext) and not dataset_exists(f"{prefix}_train"):
                raise ConfigError(
                    f"--data-prefix {prefix}: names one file of a dataset; give the prefix "
                    f"itself: --data-prefix {prefix[: -len(suffix + ext)]}"
                )
    for split in splits:
        if not dataset_exists(f"{prefix}_{split}"):
            advice = (
                rerun_advice(prefix)
                if Path(f"{prefix}_meta.json").is_file()
                else f"create them with python -m tools.preprocess_qa --input YOUR_DATA "
                f"--output-prefix {prefix} (or tools.preprocess_medquad for MedQuAD)"
            )
            raise ConfigError(
                f"--data-prefix {prefix}: {prefix}_{split}.bin/.idx not found; {advice}"
            )
        verify_split(f"{prefix}_{split}")
    meta = read_meta(prefix)
    pairs = meta.get("report", {}).get("split_pairs", {})
    for split in splits:
        if pairs.get(split) == 0 and split == "train":
            raise ConfigError(f"--data-prefix {prefix}: the train split is empty")
        if pairs.get(split) == 0:
            raise ConfigError(
                f"--data-prefix {prefix}: the {split} split is empty, but --eval-interval / "
                f"--eval-bleu-samples need it; preprocess with --valid-size > 0 or drop them"
            )
    largest = meta.get("max_token_id", meta.get("vocab_size", 0) - 1)
    if largest >= vocab_size:
        raise ConfigError(
            f"--data-prefix {prefix}: tokenized with {meta.get('tokenizer')} (ids up to {largest}) "
            f"but the model vocabulary has {vocab_size} ids; use a model with vocab_size > "
            f"{largest} or the model's own tokenizer"
        )


def check_blend_agrees(prefixes: Sequence[str]) -> None:
    """Every prefix of a blend was written with the same tokenizer, vocabulary, EOS and prompt
    template: otherwise one model would learn two incompatible token streams."""
    from megatron_yuyuan.data.indexed import read_meta
    from megatron_yuyuan.prompts import PromptTemplate

    first = None
    for prefix in prefixes:
        meta = read_meta(prefix)
        seen = {
            "tokenizer": meta.get("tokenizer"),
            "vocab_size": meta.get("vocab_size"),
            "EOS id": meta.get("eod"),
            "prompt template": PromptTemplate.from_meta(meta, f"{prefix}_meta.json").text,
        }
        if first is None:
            first = (prefix, seen)
            continue
        for what, value in seen.items():
            if value != first[1][what]:
                raise ConfigError(
                    f"--data-prefix: {prefix} was preprocessed with {what} {value!r} but "
                    f"{first[0]} with {first[1][what]!r}; preprocess every prefix of a blend "
                    f"with the same --tokenizer and --prompt-template"
                )


def score_validation_answers(result, out_dir: Path) -> None:
    """Answer the first ``--eval-bleu-samples`` validation questions with the model just trained
    (still in memory, at its TP/PP layout) and write their report, next to the retrieval and echo
    baselines from the training split."""
    from megatron_yuyuan.data.indexed import read_meta
    from megatron_yuyuan.eval.report import print_summary
    from megatron_yuyuan.eval.scoring import EvalOptions, evaluate
    from megatron_yuyuan.files import read_jsonl, write_jsonl
    from megatron_yuyuan.generation import MegatronGenerator, generate_file
    from megatron_yuyuan.prompts import PromptTemplate
    from megatron_yuyuan.sampling import SamplingConfig
    from megatron_yuyuan.tokenizer import load_tokenizer
    from megatron_yuyuan.training import unwrap

    state = result.state
    cfg = state.cfg
    t = cfg.train
    prefix = cfg.data.blend()[0][1]  # a blend: its first prefix's validation questions
    n = t.eval_bleu_samples
    gen = MegatronGenerator(
        unwrap(state.model),
        state.layout,
        cfg.model,
        load_tokenizer(read_meta(prefix)["tokenizer"]),
        PromptTemplate(state.prompt_template) if state.prompt_template else None,
    )
    preds = out_dir / "predictions_valid.jsonl"
    sampling = SamplingConfig(
        max_new_tokens=t.eval_max_new_tokens,
        repetition_penalty=t.eval_repetition_penalty,
        no_repeat_ngram_size=t.eval_no_repeat_ngram_size,
    )
    written = generate_file(
        gen, Path(f"{prefix}_valid.jsonl"), preds, sampling, batch_size=8, limit=n
    )
    if written is None:  # not rank 0
        return
    refs = write_jsonl(out_dir / "references_valid.jsonl", read_jsonl(f"{prefix}_valid.jsonl")[:n])
    train = Path(f"{prefix}_train.jsonl")
    opts = EvalOptions(
        baselines=("retrieval", "echo") if train.is_file() else ("echo",),
        train_data=train if train.is_file() else None,
    )
    report = evaluate(refs, {"finetuned": preds}, out_dir, opts)
    print_summary(report)
    print(f"> wrote {preds} and {out_dir / 'report.md'}", flush=True)


def track_outputs(cfg: RunConfig, result, tracking) -> None:
    """After training: the validation answers' report (``--eval-bleu-samples``), then the
    end-of-run scores and the images and reports as tracked artifacts."""
    t = cfg.train
    out_dir = Path(t.save) if t.save else Path(t.metrics_file).parent if t.metrics_file else None
    if out_dir is None:
        return
    eval_dir = out_dir / "eval"
    if t.eval_bleu_samples and cfg.data.data_prefix and not result.stopped:
        score_validation_answers(result, eval_dir)
        report = eval_dir / "report.json"
        if report.is_file():
            metrics = json.loads(report.read_text())["systems"]["finetuned"]["metrics"]
            scores = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            tracking.summary({f"eval/{k}": v for k, v in scores.items()})
    names = ["loss_curve.png", "eval/report.md", "eval/bleu_by_qtype.png"]
    tracking.files(out_dir / name for name in names)


def main(argv: Sequence[str] | None = None) -> int:
    from megatron_yuyuan import cpu_compat
    from megatron_yuyuan.cli.arguments import parse_config
    from megatron_yuyuan.runtime import launch_world_size

    cpu_compat.apply_if_no_cuda()

    def body() -> int:
        cfg = parse_config(argv, description=__doc__.split("\n\n")[0])
        from megatron_yuyuan.checkpoint.storage import remove_partial_saves, save_dir_lock

        # One lock per job, held by its rank 0 from before the checks to the end of the run.
        locked = cfg.train.save if launch_rank() == 0 else None
        with save_dir_lock(locked) as announce:
            check_config(cfg, launch_world_size())
            announce()
            if locked:
                for tmp in remove_partial_saves(locked):  # a save killed before its rename
                    print(f"> removed the unfinished save {tmp}", flush=True)
            from megatron_yuyuan.tracking import Tracking
            from megatron_yuyuan.training import train  # heavy imports once the config is valid

            t = cfg.train
            from megatron_yuyuan.checkpoint.storage import has_checkpoint

            resuming = bool(t.load and has_checkpoint(t.load) and not t.finetune)
            resuming = resuming and same_run(t.load, t.save)  # continue its tracked runs too
            tracking = Tracking.open(cfg, resuming) if launch_rank() == 0 else Tracking([])
            failed = True
            try:
                result = train(cfg, tracking)
                track_outputs(cfg, result, tracking)
                failed = False
            finally:
                tracking.close(failed)
        return 0

    return run_cli(body)
