"""LoRA: adapters on megatron-core's parallel linears (fp32 CPU, real processes).

One base model (a random HF GPT-2 converted to megatron-core) and one set of LoRA runs, shared by
the tests: TP=1 in this process, TP=2 / PP=2 / DP=2 (distributed optimizer) under torchrun.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from checkpoints_convert.to_hf import main as to_hf
from checkpoints_convert.to_megatron import main as to_megatron
from conftest import (
    REPO,
    TORCHRUN_ENV,
    read_metrics,
    run_torchrun,
    torchrun_cmd,
    write_gpt2,
)
from megatron_yuyuan.finetune import main as finetune

# real multi-process runs (torchrun, servers): the slow tier (`-m "not slow"` skips it)
pytestmark = pytest.mark.slow

LORA = ["--lora-rank", "4", "--lora-alpha", "8", "--lora-target-modules"]
LORA += ["linear_qkv,linear_proj,linear_fc1,linear_fc2"]
RUN = ["--mock-data", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4"]
RUN += ["--lr", "1e-2", "--hidden-dropout", "0", "--attention-dropout", "0", "--seed", "7"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A megatron-core checkpoint of a random GPT-2 (2 layers, hidden 64, GPT-2 vocabulary)."""
    root = tmp_path_factory.mktemp("lora_base")
    write_gpt2(root / "hf", peaked=True)
    assert to_megatron(["--hf-dir", str(root / "hf"), "--save", str(root / "mc")]) == 0
    return root / "mc"


@pytest.fixture(scope="module")
def runs(base, tmp_path_factory):
    """Four-step LoRA runs: metrics per layout, and the TP=1 and TP=2 checkpoints."""
    root = tmp_path_factory.mktemp("lora_runs")
    args = [*RUN, *LORA, "--pretrained-checkpoint", str(base), "--train-iters", "4"]
    ref = root / "tp1.jsonl"
    assert finetune([*args, "--save", str(root / "tp1"), "--metrics-file", str(ref)]) == 0
    out = {"tp1": read_metrics(ref), "ckpt_tp1": root / "tp1"}
    tp2 = [*args, "--tensor-model-parallel-size", "2", "--save", str(root / "tp2")]
    cmd = torchrun_cmd(2, "megatron_yuyuan.finetune", *tp2, "--metrics-file", root / "tp2.jsonl")
    proc = subprocess.run(cmd, cwd=root, env=TORCHRUN_ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out.update(tp2=read_metrics(root / "tp2.jsonl"), ckpt_tp2=root / "tp2", log_tp2=proc.stdout)
    out["pp2"] = run_torchrun(2, [*args, "--pipeline-model-parallel-size", "2"], root)
    out["dp2"] = run_torchrun(2, [*args, "--use-distributed-optimizer"], root)
    return out


@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_lora_layouts_reproduce_tp1(runs, layout):
    ref, got = runs["tp1"], runs[layout]
    assert len(got) == len(ref) == 4
    for g, r in zip(got, ref):
        assert g["loss"] == pytest.approx(r["loss"], rel=1e-5), (layout, g, r)
    assert ref[-1]["loss"] < ref[0]["loss"]  # the adapters learn


def test_lora_log_counts_trainable_parameters(runs):
    # 2 layers x rank 4 x (qkv 64 + 192, proj 64 + 64, fc1 64 + 256, fc2 256 + 64)
    trainable = 2 * 4 * (256 + 128 + 320 + 320)
    line = next(ln for ln in runs["log_tp2"].splitlines() if ln.startswith("> LoRA rank 4"))
    assert f"{trainable:,} trainable of " in line, line


def test_base_weights_stay_bit_identical(base, tmp_path):
    from megatron_yuyuan import lora, training
    from megatron_yuyuan.checkpoint import storage
    from megatron_yuyuan.cli.arguments import parse_config
    from megatron_yuyuan.parallel import destroy_distributed

    cfg = parse_config([*RUN, *LORA, "--pretrained-checkpoint", str(base), "--train-iters", "3"])
    try:
        result = training.train(cfg)
        gpt = training.unwrap(result.state.model)
        trained = {n: p.detach().clone() for n, p in gpt.named_parameters()}
        assert result.history[-1].loss < result.history[0].loss
        _, loaded = storage.load_model(
            base, gpt, cfg.model, result.state.layout, only=lora.is_base_weight
        )
    finally:
        destroy_distributed()
    frozen = [n for n in trained if not lora.is_adapter(n)]
    assert len(frozen) > 10 and all(torch.equal(trained[n], loaded[n]) for n in frozen)
    assert any(trained[n].abs().sum() > 0 for n in trained if n.endswith("lora_B"))


@pytest.mark.parametrize("which", ["ckpt_tp1", "ckpt_tp2"])
def test_merged_and_peft_exports_match_the_lora_model(runs, base, tmp_path, which):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    from megatron_yuyuan.convert.verify import megatron_logits, sample_ids

    ckpt = runs[which]
    merged, adapter, hf_base = tmp_path / "merged", tmp_path / "adapter", tmp_path / "base"
    assert to_hf(["--load", str(ckpt), "--out", str(merged)]) == 0
    assert to_hf(["--load", str(ckpt), "--out", str(adapter), "--adapter-only"]) == 0
    assert to_hf(["--load", str(base), "--out", str(hf_base)]) == 0
    assert sorted(
        p.name for p in adapter.iterdir() if p.suffix != ".json" or "adapter" in p.name
    ) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    ids = sample_ids(50257, 40)
    ours = megatron_logits(ckpt, ids)  # base + unmerged adapters, TP=1
    hf = GPT2LMHeadModel.from_pretrained(str(merged)).eval()
    plain = GPT2LMHeadModel.from_pretrained(str(hf_base)).eval()
    with torch.no_grad():
        theirs, before = hf(ids).logits, plain(ids).logits
        wrapped = PeftModel.from_pretrained(plain, str(adapter)).eval()
        peft = wrapped(ids).logits
    assert (ours - theirs).abs().max() <= 1e-4 and torch.equal(ours.argmax(-1), theirs.argmax(-1))
    assert (peft - theirs).abs().max() <= 1e-4 and torch.equal(peft.argmax(-1), theirs.argmax(-1))
    assert (theirs - before).abs().max() > 1e-2  # the adapters changed the model


def test_tp2_lora_model_matches_the_merged_export(runs, tmp_path):
    """The megatron LoRA model split over 2 ranks (adapters sharded) against the HF export."""
    merged = tmp_path / "merged"
    assert to_hf(["--load", str(runs["ckpt_tp2"]), "--out", str(merged)]) == 0
    cmd = torchrun_cmd(2, "megatron_yuyuan.convert.verify", "--hf-dir", merged, "--load",
                       runs["ckpt_tp2"], "--tensor-model-parallel-size", "2")  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=TORCHRUN_ENV, capture_output=True, text=True)
    assert proc.returncode == 0 and "TP=2" in proc.stdout and "[OK" in proc.stdout, proc.stdout


def test_generate_and_eval_load_a_lora_checkpoint(runs, tmp_path):
    merged = tmp_path / "merged"
    assert to_hf(["--load", str(runs["ckpt_tp1"]), "--out", str(merged)]) == 0

    def generate(*source):
        cmd = [sys.executable, "-m", "megatron_yuyuan.generate", *source,
               "--question", "What causes glaucoma ?", "--max-new-tokens", "12"]  # fmt: skip
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    assert generate("--load", str(runs["ckpt_tp1"])) == generate("--hf-dir", str(merged))


def test_lora_checkpoint_is_20x_smaller_than_a_full_one(tmp_path):
    small = ["--config", "small", *RUN, "--train-iters", "1"]
    assert finetune([*small, "--save", str(tmp_path / "full")]) == 0
    assert finetune([*small, "--lora-rank", "8", "--pretrained-checkpoint", str(tmp_path / "full"),
                     "--save", str(tmp_path / "lora")]) == 0  # fmt: skip

    def size(path):
        return sum(f.stat().st_size for f in (path / "iter_0000001").rglob("*") if f.is_file())

    ratio = size(tmp_path / "full") / size(tmp_path / "lora")
    assert ratio >= 20, ratio


def test_resuming_a_lora_run_continues_exactly(runs, base, tmp_path):
    args = [*RUN, *LORA, "--pretrained-checkpoint", str(base), "--save", str(tmp_path / "r")]
    args += ["--lr-decay-iters", "4"]  # the reference's schedule, also in the first half
    metrics = str(tmp_path / "m.jsonl")
    assert finetune([*args, "--train-iters", "2", "--metrics-file", metrics]) == 0
    assert finetune([*args, "--train-iters", "4", "--load", str(tmp_path / "r"),
                     "--metrics-file", metrics]) == 0  # fmt: skip
    got = [m["loss"] for m in read_metrics(metrics)]
    assert got == pytest.approx([m["loss"] for m in runs["tp1"]], rel=1e-6)


def test_a_lora_checkpoint_refuses_another_base(runs, base, tmp_path, capsys):
    other = tmp_path / "other"
    write_gpt2(tmp_path / "hf2", peaked=False)
    assert to_megatron(["--hf-dir", str(tmp_path / "hf2"), "--save", str(other)]) == 0
    moved = tmp_path / "lora"
    shutil.copytree(runs["ckpt_tp1"], moved)
    cfg_file = next(moved.glob("iter_*")) / "model_config.yaml"
    info = yaml.safe_load(cfg_file.read_text())
    info["lora"]["base"] = str(next(other.glob("iter_*")))
    cfg_file.write_text(yaml.safe_dump(info))
    capsys.readouterr()
    assert to_hf(["--load", str(moved), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "fingerprint mismatch" in err and not (tmp_path / "x").exists(), err
    # the base it was trained on, given where it is now: accepted
    assert (
        to_hf(["--load", str(moved), "--out", str(tmp_path / "x"), "--lora-base", str(base)]) == 0
    )
    # resuming it with another --pretrained-checkpoint: refused the same way
    code = finetune([*RUN, *LORA, "--pretrained-checkpoint", str(other), "--load",
                     str(runs["ckpt_tp1"]), "--train-iters", "5"])  # fmt: skip
    assert code == 2 and "fingerprint mismatch" in capsys.readouterr().err


@pytest.mark.parametrize(
    "edit, words",
    [
        ({"lora_target_modules": "linear_qkv"}, "do not match its model_config.yaml"),
        ({"lora_rank": 8}, "do not match its model_config.yaml"),
        ({"lora_rank": 0}, "lora block is damaged"),
        ({"base_fingerprint": None}, "lora block is damaged"),
        ({"extra": 1}, "lora block is damaged"),
    ],
    ids=["fewer-targets", "other-rank", "rank-0", "no-fingerprint", "unknown-field"],
)
def test_a_damaged_lora_record_is_refused_everywhere(runs, tmp_path, capsys, edit, words):
    damaged = tmp_path / "lora"
    shutil.copytree(runs["ckpt_tp1"], damaged)
    cfg_file = next(damaged.glob("iter_*")) / "model_config.yaml"
    info = yaml.safe_load(cfg_file.read_text())
    info["lora"].update(edit)
    info["lora"] = {k: v for k, v in info["lora"].items() if v is not None}
    cfg_file.write_text(yaml.safe_dump(info))
    capsys.readouterr()
    assert to_hf(["--load", str(damaged), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and not (tmp_path / "x").exists(), err
    # resuming it with its recorded settings: refused before any training
    saved = yaml.safe_load(cfg_file.read_text())["lora"]
    flags = ["--lora-rank", str(saved.get("lora_rank", 4)), "--lora-alpha", "8"]
    flags += ["--lora-target-modules", saved.get("lora_target_modules", LORA[-1])]
    code = finetune([*RUN, *flags, "--load", str(damaged), "--train-iters", "5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:"), err


def test_lora_never_saves_into_a_full_checkpoint_run(base, capsys):
    """--load BASE --save BASE would move BASE's latest pointer to the adapters."""
    args = [*RUN, *LORA, "--pretrained-checkpoint", str(base), "--load", str(base)]
    assert finetune([*args, "--save", str(base), "--train-iters", "2"]) == 2
    assert "holds a full (non-LoRA) checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, words",
    [
        ([*LORA], "--pretrained-checkpoint BASE"),
        (["--lora-rank", "4", "--lora-alpha", "inf"], "finite number > 0"),
        (["--lora-rank", "4", "--lora-target-modules", "c_attn"], "c_attn is not a LoRA target"),
        (["--lora-rank", "-1"], "lora_rank must be >= 0"),
    ],
)
def test_bad_lora_flags_get_one_error_line(args, words, capsys):
    # (a rank not below the hidden size: see test_lora_rank_must_be_low)
    assert finetune(["--config", "tiny", "--mock-data", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and words in err[0], err


def test_a_lora_checkpoint_needs_its_lora_flags_to_continue(runs, tmp_path, capsys):
    code = finetune([*RUN, "--load", str(runs["ckpt_tp1"]), "--train-iters", "5"])
    err = capsys.readouterr().err
    assert code == 2 and "--lora-rank 4 --lora-alpha 8" in err, err
    other_alpha = ["--lora-rank", "4", "--lora-alpha", "16"]  # would rescale the update mid-run
    code = finetune([*RUN, *other_alpha, "--load", str(runs["ckpt_tp1"]), "--train-iters", "5"])
    err = capsys.readouterr().err
    assert code == 2 and "alpha 8" in err, err


def test_a_tp2_lora_checkpoint_resumes_at_tp1(runs, tmp_path):
    """Adapters and their optimizer state reshard: TP=2's step 5 at TP=1 = TP=1's own step 5."""
    losses = []
    for which in ("ckpt_tp1", "ckpt_tp2"):
        metrics = tmp_path / f"{which}.jsonl"
        args = [*RUN, *LORA, "--load", str(runs[which]), "--save", str(tmp_path / which)]
        assert finetune([*args, "--train-iters", "5", "--metrics-file", str(metrics)]) == 0
        (row,) = read_metrics(metrics)
        assert row["iteration"] == 5
        losses.append(row["loss"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_lora_with_full_recompute_trains_as_without(runs, base, tmp_path):
    metrics = tmp_path / "m.jsonl"
    args = [*RUN, *LORA, "--pretrained-checkpoint", str(base), "--train-iters", "4"]
    args += ["--recompute-granularity", "full", "--metrics-file", str(metrics)]
    assert finetune(args) == 0
    got = [m["loss"] for m in read_metrics(metrics)]
    assert got == pytest.approx([m["loss"] for m in runs["tp1"]], rel=1e-6)


def test_finetune_from_lora_adapters_keeps_them(runs, base, tmp_path):
    """--finetune --load LORA: a new run (iteration 0) that starts from the trained adapters."""
    metrics = tmp_path / "m.jsonl"
    args = [*RUN, *LORA, "--load", str(runs["ckpt_tp1"]), "--finetune", "--train-iters", "1"]
    assert finetune([*args, "--metrics-file", str(metrics)]) == 0
    (first,) = read_metrics(metrics)
    assert first["iteration"] == 1
    assert first["loss"] < runs["tp1"][0]["loss"] - 0.05  # same batch, trained adapters


def test_peft_adapter_config_names_gpt2_modules(runs, tmp_path):
    out = tmp_path / "adapter"
    assert to_hf(["--load", str(runs["ckpt_tp1"]), "--out", str(out), "--adapter-only"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]
    assert config["fan_in_fan_out"] is True and config["r"] == 4 and config["lora_alpha"] == 8
    from safetensors.torch import load_file

    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert tensors["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"].shape == (192, 4)
    assert tensors["base_model.model.transformer.h.0.mlp.c_proj.lora_A.weight"].shape == (4, 256)


def test_lora_rank_must_be_low(base, capsys):
    args = [*RUN, "--pretrained-checkpoint", str(base), "--lora-rank", "64", "--train-iters", "1"]
    assert finetune(args) == 2  # hidden size 64
    assert "not below the hidden size 64" in capsys.readouterr().err
