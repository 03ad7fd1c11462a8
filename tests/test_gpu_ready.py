"""GPU readiness: what a CPU can check of the GPU paths, plus ``cuda``-marked tests that run
wherever a GPU is (``bash benchmarks/gpu_check.sh`` runs them)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO, read_metrics

from megatron_yuyuan.finetune import main as finetune

TINY = ["--config", "tiny", "--mock-data", "--seq-length", "32", "--micro-batch-size", "2"]
TINY += ["--global-batch-size", "4", "--lr", "3e-3", "--train-iters", "3"]


def test_the_first_step_already_learns(tmp_path):
    """Warmup starts one ramp step above 0: step k of W trains at lr * k / (W + 1)."""
    metrics = tmp_path / "m.jsonl"
    assert finetune([*TINY, "--lr-warmup-iters", "2", "--metrics-file", str(metrics)]) == 0
    lrs = [m["lr"] for m in read_metrics(metrics)]
    # 1/3 and 2/3 of lr while warming up, then the cosine decay starts at lr
    assert lrs == pytest.approx([1e-3, 2e-3, 3e-3])


def test_gpu_check_dry_run_prints_the_plan():
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    for words in ("cuda-marked tests", "gpt2-1.3b", "yuyuan-3.5b", "TP=2 CPU gloo", "generation"):
        assert words in proc.stdout, proc.stdout


def test_peak_flops_use_the_exact_device_name(monkeypatch):
    from megatron_yuyuan import logging_utils

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, peak in (("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 80GB HBM3", 989e12)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, n=name: n)
        assert logging_utils.gpu_peak_flops() == (name, peak)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 Some New Variant")
    assert logging_utils.gpu_peak_flops() is None  # no guessed peak, no made-up MFU


@pytest.mark.cuda
def test_fp16_trains_from_the_first_step(tmp_path):
    metrics = tmp_path / "m.jsonl"
    args = [*TINY, "--fp16", "--lr-warmup-iters", "2", "--metrics-file", str(metrics)]
    assert finetune(args) == 0
    first = read_metrics(metrics)[0]
    assert not first["skipped"] and first["lr"] > 0, first


@pytest.mark.cuda
def test_convert_and_generate_in_fresh_processes_on_cuda(tmp_path):
    """No training RNG setup, megatron's explicit CUDA device: converters and generators still
    build, and both generators answer identically on the GPU."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from megatron_yuyuan.convert.hf_io import write_tokenizer_files

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(
        GPT2Config(vocab_size=50257, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    )
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    hf.save_pretrained(str(tmp_path / "hf"))
    write_tokenizer_files(tmp_path / "hf", 50257, None)

    def run(*args):
        proc = subprocess.run(
            [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    run("checkpoints_convert.to_megatron", "--hf-dir", str(tmp_path / "hf"), "--save",
        str(tmp_path / "mc"), "--verify")  # fmt: skip
    run("checkpoints_convert.to_hf", "--load", str(tmp_path / "mc"), "--out",
        str(tmp_path / "out"), "--verify")  # fmt: skip
    q = ["--question", "What causes glaucoma ?", "--max-new-tokens", "16"]
    ours = run("megatron_yuyuan.generate", "--load", str(tmp_path / "mc"), *q)
    theirs = run("megatron_yuyuan.generate", "--hf-dir", str(tmp_path / "out"), *q)
    assert ours == theirs
