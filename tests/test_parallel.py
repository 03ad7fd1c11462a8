"""TP / PP / DP runs under torchrun + gloo reproduce the single-process loss sequence.

Every layout starts from the same weights (seeded per parameter name, not per rank) and sees the
same global batches, so in fp32 the losses may differ only by reduction order (~1e-7).
"""

from __future__ import annotations

import pytest

from conftest import read_metrics, run_torchrun
from megatron_yuyuan.finetune import main

# real multi-process runs (torchrun, servers): the slow tier (`-m "not slow"` skips it)
pytestmark = pytest.mark.slow

COMMON = [
    "--config",
    "tiny",
    "--mock-data",
    "--seq-length",
    "64",
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "8",
    "--train-iters",
    "5",
    "--seed",
    "3",
    "--lr",
    "1e-3",
    "--lr-warmup-iters",
    "1",
]


def run_in_process(tmp_path, extra=(), name="ref"):
    path = tmp_path / f"{name}.jsonl"
    assert main([*COMMON, *extra, "--metrics-file", str(path)]) == 0
    return read_metrics(path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run_in_process(tmp_path_factory.mktemp("tp1"))


def assert_same_losses(got, ref, rtol=1e-5):
    assert [m["iteration"] for m in got] == [m["iteration"] for m in ref] == [1, 2, 3, 4, 5]
    for g, r in zip(got, ref):
        assert g["loss"] == pytest.approx(r["loss"], rel=rtol), (g, r)
        assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-4), (g, r)
        assert g["lr"] == pytest.approx(r["lr"], rel=1e-12)


def test_reference_run_learns(reference):
    assert all(m["tokens_per_s"] > 0 for m in reference)
    assert reference[-1]["loss"] < reference[0]["loss"]


@pytest.mark.parametrize(
    "nproc, layout",
    [
        (2, ["--tensor-model-parallel-size", "2"]),
        (2, ["--pipeline-model-parallel-size", "2"]),  # 4 micro-batches through 1F1B
        # DP=2, ZeRO-1, with gradient reduce and parameter gather overlapped (the GPU defaults)
        (2, ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"]),
        (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
    ],
    ids=["tp2", "pp2", "dp2-distopt", "tp2pp2"],
)
def test_layout_matches_single_process(reference, tmp_path, nproc, layout):
    assert_same_losses(run_torchrun(nproc, [*COMMON, *layout], tmp_path), reference)


def test_activation_recompute_replays_dropout_exactly(tmp_path):
    """Full recompute must restore the RNG so the replayed dropout masks equal the first pass."""
    dropout = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1"]
    plain = run_in_process(tmp_path, dropout, "plain")
    recompute = run_in_process(tmp_path, [*dropout, "--recompute-granularity", "full"], "rc")
    assert [m["loss"] for m in recompute] == [m["loss"] for m in plain]
    assert [m["grad_norm"] for m in recompute] == [m["grad_norm"] for m in plain]


def test_training_reduces_loss_on_learnable_data(tmp_path):
    metrics = run_in_process(
        tmp_path,
        ["--train-iters", "60", "--lr", "1e-2", "--lr-warmup-iters", "5", "--seq-length", "32"],
        "learn",
    )
    last = sum(m["loss"] for m in metrics[-5:]) / 5
    assert last < 0.85 * metrics[0]["loss"], [m["loss"] for m in metrics]


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["--bf16", "--fp16"])
def test_mixed_precision_trains_on_gpu(tmp_path, precision):
    metrics = run_in_process(tmp_path, [precision, "--train-iters", "20", "--lr", "3e-3"], "mp")
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    if precision == "--fp16":
        assert all("loss_scale" in m for m in metrics)


QA = [
    "--config",
    "tiny",
    "--vocab-size",
    "50257",
    "--seq-length",
    "128",
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "4",
    "--train-iters",
    "3",
    "--seed",
    "3",
    "--lr",
    "1e-3",
]


@pytest.mark.parametrize(
    "nproc, extra",
    [
        (2, ["--tensor-model-parallel-size", "2"]),  # packed, block-diagonal masks
        (
            2,
            ["--pipeline-model-parallel-size", "2", "--no-packing"],
        ),  # variable-length micro-batches
        # THD: each micro-batch one [1, b * s] sequence; the stages exchange [b * s, 1, h]
        (2, ["--pipeline-model-parallel-size", "2", "--packed-format", "thd"]),
    ],
    ids=["tp2-packed", "pp2-padded", "pp2-thd"],
)
def test_medquad_training_matches_across_layouts(sample_dataset, tmp_path, nproc, extra):
    data = ["--data-prefix", sample_dataset, *[f for f in extra if f == "--no-packing"]]
    path = tmp_path / "ref.jsonl"
    assert main([*QA, *data, "--metrics-file", str(path)]) == 0
    ref = read_metrics(path)
    got = run_torchrun(nproc, [*QA, "--data-prefix", sample_dataset, *extra], tmp_path)
    assert len(got) == len(ref) == 3
    for g, r in zip(got, ref):
        assert g["loss"] == pytest.approx(r["loss"], rel=1e-5), (g, r)
        assert g["tokens_per_s"] > 0
