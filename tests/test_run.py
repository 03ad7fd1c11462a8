"""run/finetune_qa.sh and resumable training: SIGKILL + resume, interrupted saves, resharding on
resume, two-node launch, bad layouts, and a shortened README demo."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TORCHRUN_ENV, free_port, read_metrics, run_torchrun, torchrun_cmd
from megatron_yuyuan.finetune import main

# real multi-process runs (torchrun, servers): the slow tier (`-m "not slow"` skips it)
pytestmark = pytest.mark.slow

ARGS = [
    "--config",
    "tiny",
    "--mock-data",
    "--seq-length",
    "64",
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "4",
    "--seed",
    "5",
    "--lr",
    "3e-3",
    "--lr-warmup-iters",
    "2",
    "--hidden-dropout",
    "0.1",
]  # dropout on: the RNG state must resume too
ITERS = 12


def launch(nproc, args, cwd, **kw):
    return subprocess.Popen(
        torchrun_cmd(nproc, "megatron_yuyuan.finetune", *args),
        cwd=cwd,
        env=TORCHRUN_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kw,
    )


def losses(metrics):
    return {m["iteration"]: m["loss"] for m in metrics if "loss" in m}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """TP=2, checkpoints every 2 iterations; the reference for every resume below."""
    root = tmp_path_factory.mktemp("ref")
    metrics = run_torchrun(
        2,
        [
            *ARGS,
            "--tensor-model-parallel-size",
            "2",
            "--train-iters",
            str(ITERS),
            "--save",
            str(root / "ckpt"),
            "--save-interval",
            "2",
        ],
        root,
    )
    return root / "ckpt", losses(metrics)


def copy_checkpoint(src: Path, iteration: int, dst: Path) -> Path:
    dst.mkdir(parents=True)
    shutil.copytree(src / f"iter_{iteration:07d}", dst / f"iter_{iteration:07d}")
    (dst / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return dst


def test_sigkill_then_resume_reproduces_the_uninterrupted_run(uninterrupted, tmp_path):
    _, want = uninterrupted
    ckpt = tmp_path / "ckpt"
    args = [
        *ARGS,
        "--tensor-model-parallel-size",
        "2",
        "--train-iters",
        str(ITERS),
        "--save",
        str(ckpt),
        "--load",
        str(ckpt),
        "--save-interval",
        "2",
    ]
    proc = launch(2, [*args, "--metrics-file", str(tmp_path / "killed.jsonl")], tmp_path)
    latest = ckpt / "latest_checkpointed_iteration.txt"
    deadline = time.time() + 240
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    # SIGKILL the launcher and both ranks mid-run (torchrun puts workers in their own sessions).
    import psutil

    victims = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for v in victims:
        v.send_signal(signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(victims, timeout=30)
    resumed_from = int(latest.read_text())
    assert resumed_from < ITERS, "the run finished before it could be killed"
    metrics = run_torchrun(2, args, tmp_path)
    got = losses(metrics)
    assert sorted(got) == list(range(resumed_from + 1, ITERS + 1))
    for it, loss in got.items():
        assert loss == want[it], (it, loss, want[it])  # exact on CPU


def test_a_save_killed_midway_leaves_the_previous_checkpoint(uninterrupted, tmp_path, monkeypatch):
    from megatron_yuyuan.checkpoint import storage

    ckpt = copy_checkpoint(uninterrupted[0], 2, tmp_path / "ckpt")
    real_save = storage.dist_checkpointing.save

    def dying_save(sharded, directory, **kwargs):
        Path(directory, "__0_0.distcp").write_bytes(b"half a shard")
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(storage.dist_checkpointing, "save", dying_save)
    # Ctrl-C ends the CLI with exit 130 and no traceback
    assert 130 == main(
        [
            *ARGS,
            "--tensor-model-parallel-size",
            "1",
            "--train-iters",
            "4",
            "--load",
            str(ckpt),
            "--save",
            str(ckpt),
            "--save-interval",
            "2",
        ]
    )
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "2"
    # the interrupted save's half-written iter_0000004.tmp is removed (a SIGKILL would leave it:
    # the next run removes it, see test_faults.py)
    assert not (ckpt / "iter_0000004.tmp").exists() and not (ckpt / "iter_0000004").exists()
    monkeypatch.setattr(storage.dist_checkpointing, "save", real_save)
    assert (
        main(
            [
                *ARGS,
                "--train-iters",
                "4",
                "--load",
                str(ckpt),
                "--save",
                str(ckpt),
                "--metrics-file",
                str(tmp_path / "m.jsonl"),
            ]
        )
        == 0
    )
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "4"
    assert not (ckpt / "iter_0000004.tmp").exists()


NO_DROPOUT = ["--hidden-dropout", "0"]  # dropout masks differ between layouts by design


@pytest.fixture(scope="module")
def resumed_at_tp2(uninterrupted, tmp_path_factory):
    """Iterations 5-7 resumed at the layout the checkpoint was saved at (TP=2), dropout off."""
    root = tmp_path_factory.mktemp("tp2")
    ckpt = copy_checkpoint(uninterrupted[0], 4, root / "ckpt")
    return losses(
        run_torchrun(
            2,
            [
                *ARGS,
                *NO_DROPOUT,
                "--train-iters",
                "7",
                "--load",
                str(ckpt),
                "--tensor-model-parallel-size",
                "2",
            ],
            root,
        )
    )


@pytest.mark.parametrize(
    "nproc, layout", [(1, []), (2, ["--pipeline-model-parallel-size", "2"])], ids=["tp1", "pp2"]
)
def test_resume_a_tp2_checkpoint_at_another_layout(
    uninterrupted, resumed_at_tp2, tmp_path, nproc, layout
):
    want = resumed_at_tp2
    assert sorted(want) == [5, 6, 7]
    ckpt = copy_checkpoint(uninterrupted[0], 4, tmp_path / "ckpt")
    args = [*ARGS, *NO_DROPOUT, "--train-iters", "7", "--load", str(ckpt), *layout]
    if nproc == 1:
        assert main([*args, "--metrics-file", str(tmp_path / "m.jsonl")]) == 0
        got = losses(read_metrics(tmp_path / "m.jsonl"))
    else:
        got = losses(run_torchrun(nproc, args, tmp_path))
    assert sorted(got) == [5, 6, 7]
    for it, loss in got.items():
        assert loss == pytest.approx(want[it], rel=1e-5), (it, loss, want[it])


def test_two_nodes_on_localhost_train_together(tmp_path):
    port = free_port()
    args = [
        *ARGS,
        "--hidden-dropout",
        "0",
        "--train-iters",
        "3",
        "--metrics-file",
        str(tmp_path / "m.jsonl"),
    ]
    procs = []
    for node in (0, 1):
        env = {
            **os.environ,
            "NNODES": "2",
            "NODE_RANK": str(node),
            "NPROC_PER_NODE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "PYTHON": sys.executable,
        }
        # Node 0 uses the wrapper (bash run/finetune_qa.sh), node 1 the torchrun form
        # (torchrun ... run/finetune_qa.sh): the same file works both ways.
        launch = (
            ["bash", str(REPO / "run" / "finetune_qa.sh"), *args]
            if node == 0
            else [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node-rank",
                "1",
                "--nproc-per-node",
                "1",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                str(REPO / "run" / "finetune_qa.sh"),
                *args,
            ]  # fmt: skip
        )
        procs.append(
            subprocess.Popen(
                launch,
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    assert "+ " in outs[0] and "--nnodes 2 --node-rank 0" in outs[0]
    got = losses(read_metrics(tmp_path / "m.jsonl"))
    assert "DP=2" in outs[0] and sorted(got) == [1, 2, 3]
    assert main([*args[:-2], "--metrics-file", str(tmp_path / "single.jsonl")]) == 0
    single = losses(read_metrics(tmp_path / "single.jsonl"))
    for it in got:
        assert got[it] == pytest.approx(single[it], rel=1e-5)


def test_launcher_reports_a_world_that_does_not_fit(tmp_path):
    env = {
        **os.environ,
        "NPROC_PER_NODE": "1",
        "MASTER_PORT": str(free_port()),
        "PYTHON": sys.executable,
    }
    proc = subprocess.run(
        [
            "bash",
            str(REPO / "run" / "finetune_qa.sh"),
            *ARGS,
            "--train-iters",
            "3",
            "--tensor-model-parallel-size",
            "2",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "world size 1 is not divisible by tensor x pipeline parallel size 2 x 1" in proc.stderr


def test_launcher_environment_rules(tmp_path):
    """NNODES > 1 without MASTER_ADDR is refused (not a hang on 127.0.0.1); GPUs are counted from
    CUDA_VISIBLE_DEVICES; the Slurm script hands each node its rank and the first node's address."""
    script = str(REPO / "run" / "finetune_qa.sh")
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "NPROC_PER_NODE")}
    proc = subprocess.run(
        ["bash", script], env={**env, "NNODES": "2"}, capture_output=True, text=True
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: NNODES=2 needs MASTER_ADDR")
    dry = {**env, "FINETUNE_DRY_RUN": "1"}
    for visible, n in (("0,1,3", 3), ("", 2)):  # none visible: 2 CPU processes
        proc = subprocess.run(["bash", script, "--x"], env={**dry, "CUDA_VISIBLE_DEVICES": visible},
                              capture_output=True, text=True)  # fmt: skip
        assert proc.returncode == 0 and f"--nproc-per-node {n} " in proc.stdout, proc.stdout
    bin_dir = tmp_path / "bin"  # stand-ins for Slurm's commands: 2 nodes, one task each
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-a\\ngpu-b\\n'\n")
    (bin_dir / "srun").write_text(
        '#!/bin/bash\nshift 2\nfor n in 0 1; do SLURM_NODEID=$n "$@"; done\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    slurm = {**dry, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-[a-b]",
             "SLURM_JOB_NUM_NODES": "2", "SLURM_SUBMIT_DIR": str(REPO)}  # fmt: skip
    proc = subprocess.run(["bash", str(REPO / "run" / "slurm" / "finetune_qa.sbatch"), "--config",
                           "tiny"], env=slurm, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for rank in (0, 1):
        assert (
            f"--nnodes 2 --node-rank {rank} --nproc-per-node 2 --master-addr gpu-a "
            "--master-port 29500 -m megatron_yuyuan.finetune --config tiny" in proc.stdout
        ), proc.stdout


def test_readme_demo_shortened(tmp_path):
    """The README's demo script with 4 iterations: every stage runs, and the megatron-core
    checkpoint at TP=2 and its HF export answer identically."""
    env = {
        **os.environ,
        "DEMO_OUT": str(tmp_path / "demo"),
        "DEMO_ITERS": "4",
        "DEMO_NEW_TOKENS": "8",
        "MASTER_PORT": str(free_port()),
        "PYTHON": sys.executable,
    }
    proc = subprocess.run(
        ["bash", str(REPO / "run" / "demo_cpu.sh")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "demo"
    report = (out / "eval" / "report.md").read_text()
    assert "| megatron-tp2 |" in report and "| hf-export |" in report
    assert (out / "checkpoints" / "loss_curve.png").is_file()
    a = [
        json.loads(line)["generation"]
        for line in (out / "eval" / "predictions_megatron-tp2.jsonl").open()
    ]
    b = [
        json.loads(line)["generation"]
        for line in (out / "eval" / "predictions_hf-export.jsonl").open()
    ]
    assert a == b and len(a) == 10
    assert "top-1 agreement = 100.00%" in proc.stdout
    assert any("valid_loss" in json.loads(line) for line in (out / "metrics.jsonl").open())


def test_validation_loss_and_end_of_run_bleu(sample_dataset, tmp_path):
    """--eval-interval logs validation losses; --eval-bleu-samples answers N validation questions
    with the trained model and writes the BLEU report next to the checkpoints."""
    args = [
        "--config",
        "tiny",
        "--vocab-size",
        "50257",
        "--data-prefix",
        sample_dataset,
        "--seq-length",
        "128",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "4",
        "--train-iters",
        "4",
        "--lr-warmup-iters",
        "1",
        "--eval-interval",
        "2",
        "--eval-iters",
        "1",
        "--eval-bleu-samples",
        "5",
        "--eval-max-new-tokens",
        "4",
        "--eval-no-repeat-ngram-size",
        "2",
        "--save",
        str(tmp_path / "ckpt"),
        "--metrics-file",
        str(tmp_path / "m.jsonl"),
    ]
    assert main(args) == 0
    valid = [m for m in read_metrics(tmp_path / "m.jsonl") if "valid_loss" in m]
    assert [m["iteration"] for m in valid] == [2, 4] and all(m["valid_loss"] > 0 for m in valid)
    report = json.loads((tmp_path / "ckpt" / "eval" / "report.json").read_text())
    assert report["questions"] == 5
    assert list(report["systems"]) == ["finetuned", "retrieval", "echo"]  # baselines from train
    assert set(report["systems"]["finetuned"]["ci"]) >= {"bleu4", "rougeL", "chrf", "eos_rate"}
    preds = (tmp_path / "ckpt" / "eval" / "predictions_valid.jsonl").read_text().splitlines()
    preds = [json.loads(p) for p in preds]
    assert len(preds) == 5 and all(p["new_tokens"] <= 4 for p in preds)
    assert all((p["finish_reason"] == "eos") == (p["new_tokens"] < 4) for p in preds)
    eos_share = sum(p["finish_reason"] == "eos" for p in preds) / 5
    assert report["systems"]["finetuned"]["metrics"]["eos_rate"] == pytest.approx(eos_share)
    assert (tmp_path / "ckpt" / "loss_curve.png").is_file()
