"""GPU readiness: what a CPU can check of the GPU paths, plus ``cuda``-marked tests that run
wherever a GPU is (``bash benchmarks/gpu_check.sh`` runs them)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import REPO, read_metrics, write_gpt2
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
    write_gpt2(tmp_path / "hf", peaked=True)

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


class _FakeFloat16Optimizer:
    """The two attributes of megatron's Float16OptimizerWithFloat16Params that seeding uses."""

    def __init__(self, model):
        self.float16_groups = [[p for p in model.parameters()]]
        self.fp32_from_float16_groups = [[p.detach().float().clone() for p in model.parameters()]]


def test_main_weights_are_seeded_from_the_checkpoint_dtype():
    """fp16 values that bf16 cannot hold reach the fp32 main weights unrounded."""
    from megatron_yuyuan.optim import seed_main_params

    model = torch.nn.Linear(4, 3).to(torch.bfloat16)
    weights = {
        n: (torch.randn_like(p, dtype=torch.float32) / 3).half()
        for n, p in model.named_parameters()
    }
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(weights[n])  # what load_state_dict does: rounds to bf16
    opt = _FakeFloat16Optimizer(model)
    seed_main_params(opt, model, weights)
    for (n, _), main in zip(model.named_parameters(), opt.fp32_from_float16_groups[0]):
        assert torch.equal(main, weights[n].float())
        assert not torch.equal(main, weights[n].to(torch.bfloat16).float())


@pytest.mark.cuda
@pytest.mark.parametrize("distopt", [False, True], ids=["float16-optimizer", "distributed"])
def test_bf16_finetune_from_fp16_weights_keeps_their_precision(tmp_path, distopt):
    from checkpoints_convert.to_megatron import main as to_megatron
    from megatron_yuyuan import training
    from megatron_yuyuan.checkpoint import storage
    from megatron_yuyuan.config import RunConfig
    from megatron_yuyuan.parallel import destroy_distributed

    write_gpt2(tmp_path / "hf", vocab=1100, dtype=torch.float16)
    assert to_megatron(["--hf-dir", str(tmp_path / "hf"), "--save", str(tmp_path / "mc")]) == 0
    cfg = RunConfig.from_dict(
        {
            "model": {"preset": "tiny", "num_layers": 2, "max_position_embeddings": 64},
            "parallel": {"use_distributed_optimizer": distopt},
            "train": {"bf16": True, "pretrained_checkpoint": str(tmp_path / "mc")},
            "data": {"mock_data": True, "seq_length": 32},
        }
    )
    try:
        state = training.setup(cfg)
        gpt = training.unwrap(state.model)
        _, fp16 = storage.load_model(tmp_path / "mc", gpt, cfg.model, state.layout)
        inner = getattr(state.optimizer, "chained_optimizers", [state.optimizer])[0]
        mains = [p for g in inner.optimizer.param_groups for p in g["params"]]
        assert all(m.dtype == torch.float32 for m in mains)
        want = torch.cat([fp16[n].float().flatten() for n, _ in gpt.named_parameters()])
        got = torch.cat([m.detach().flatten().cpu() for m in mains])
        # every main weight is one of the fp16 values (order differs with bucketing): compare sorted
        assert torch.equal(got.sort().values, want.sort().values.cpu())
        assert torch.isin(got, want.cpu()).all()
    finally:
        destroy_distributed()


@pytest.mark.cuda
def test_weight_gradient_fusion_and_fused_adam_match_the_plain_path(tmp_path):
    """Megatron's gradient-accumulation fusion through our cuBLAS fp32-output GEMM and torch's
    fused AdamW train as the unfused path does (bf16 rounding apart); a checkpoint written by
    multi-tensor Adam (step counters on the CPU) resumes under the fused kernel."""
    from megatron_yuyuan import parallel

    assert parallel.enable_wgrad_accumulation_fusion()
    x = torch.randn(3, 5, 32, device="cuda", dtype=torch.bfloat16)  # [s, b, in]
    dy = torch.randn(3, 5, 48, device="cuda", dtype=torch.bfloat16)  # [s, b, out]
    acc = torch.full((48, 32), 0.5, device="cuda")
    parallel._TorchWgradAccumulation.wgrad_gemm_accum_fp32(x, dy, acc)
    want = 0.5 + dy.reshape(15, 48).float().t() @ x.reshape(15, 32).float()
    torch.testing.assert_close(acc, want, rtol=1e-5, atol=1e-4)

    def run(name, *extra):
        metrics = tmp_path / f"{name}.jsonl"
        args = [*TINY, "--bf16", "--train-iters", "4", "--metrics-file", str(metrics), *extra]
        assert finetune(args) == 0
        return [m["loss"] for m in read_metrics(metrics)]

    plain = run("plain", "--no-gradient-accumulation-fusion", "--no-fused-adam")
    fused = run("fused")
    assert fused == pytest.approx(plain, rel=5e-3)
    ckpt = str(tmp_path / "ckpt")
    run("first", "--no-fused-adam", "--train-iters", "2", "--save", ckpt)
    resumed = run("resumed", "--load", ckpt)  # fused AdamW from iteration 3
    assert resumed == pytest.approx(plain[2:], rel=5e-3)


@pytest.mark.cuda
def test_thd_packing_uses_the_varlen_kernel_and_matches_masks(sample_dataset, tmp_path):
    from megatron_yuyuan.model import varlen_attention_supported

    assert varlen_attention_supported(torch.zeros(4, 2, 16, device="cuda", dtype=torch.bfloat16))
    base = ["--config", "tiny", "--vocab-size", "50257", "--data-prefix", sample_dataset]
    base += ["--seq-length", "256", "--micro-batch-size", "2", "--global-batch-size", "4"]
    base += ["--train-iters", "3", "--lr", "1e-3", "--bf16"]

    def run(name, *extra):
        metrics = tmp_path / f"{name}.jsonl"
        assert finetune([*base, "--metrics-file", str(metrics), *extra]) == 0
        return [m["loss"] for m in read_metrics(metrics)]

    mask = run("mask", "--packed-format", "mask")
    thd = run("thd")  # auto: THD on this GPU with --bf16
    assert thd == pytest.approx(mask, rel=1e-2)
    dropout = run("dropout", "--attention-dropout", "0.1")  # the kernel's own dropout
    assert all(0 < x < 20 for x in dropout) and dropout != thd
