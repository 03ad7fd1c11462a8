"""Long runs on shared clusters: retention (--keep-last, --save-best), weights-only saves, picking
a checkpoint (--iteration), and preemption (SIGTERM / SIGUSR1 / --exit-duration-in-mins) with
real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from checkpoints_convert.to_hf import main as to_hf
from conftest import REPO, TORCHRUN_ENV, free_port, read_metrics
from megatron_yuyuan.finetune import main as finetune

TINY = ["--config", "tiny", "--mock-data", "--seq-length", "32", "--micro-batch-size", "2"]
TINY += ["--global-batch-size", "4", "--lr", "3e-3", "--lr-warmup-iters", "1"]
# a schedule that does not depend on --train-iters: a stopped run and an uninterrupted one of
# another length train the same steps
CONSTANT = [*TINY, "--lr-decay-style", "constant"]


def iterations(save: Path) -> list[int]:
    return sorted(int(d.name.removeprefix("iter_")) for d in save.glob("iter_[0-9]*[0-9]"))


def pointer(save: Path, name: str = "latest") -> int:
    return int((save / f"{name}_checkpointed_iteration.txt").read_text())


def one_error_line(err: str, *words: str) -> None:
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in errors[0], errors[0]


@pytest.fixture(scope="module")
def kept(tmp_path_factory):
    """Five saves with --keep-last 2 --save-best valid_loss."""
    root = tmp_path_factory.mktemp("kept")
    save, metrics = root / "ckpt", root / "metrics.jsonl"
    args = [*TINY, "--train-iters", "5", "--save", str(save), "--save-interval", "1"]
    args += ["--keep-last", "2", "--save-best", "valid_loss", "--eval-iters", "1"]
    assert finetune([*args, "--metrics-file", str(metrics)]) == 0
    return save, read_metrics(metrics)


def test_keep_last_two_over_five_saves_keeps_the_last_two_and_the_best(kept):
    save, metrics = kept
    valid = {m["iteration"]: m["valid_loss"] for m in metrics if "valid_loss" in m}
    assert sorted(valid) == [1, 2, 3, 4, 5]  # every save had its validation loss
    best = min(valid, key=valid.get)
    assert pointer(save) == 5 and pointer(save, "best") == best
    assert iterations(save) == sorted({4, 5, best})
    assert not list(save.glob("*.tmp"))


def test_to_hf_iteration_best_exports_the_lowest_validation_loss(kept, tmp_path):
    save, metrics = kept
    valid = {m["iteration"]: m["valid_loss"] for m in metrics if "valid_loss" in m}
    assert to_hf(["--load", str(save), "--iteration", "best", "--out", str(tmp_path / "hf")]) == 0
    marker = json.loads((tmp_path / "hf" / "megatron_yuyuan_export.json").read_text())
    assert marker["iteration"] == min(valid, key=valid.get)
    assert to_hf(["--load", str(save), "--iteration", "4", "--out", str(tmp_path / "hf4")]) == 0
    assert (
        json.loads((tmp_path / "hf4" / "megatron_yuyuan_export.json").read_text())["iteration"] == 4
    )


@pytest.mark.parametrize(
    "which, words",
    [("99", ["--iteration 99", "iterations"]), ("bogus", ["--iteration", "latest, best"])],
)
def test_a_checkpoint_that_is_not_there_is_one_error_line(kept, tmp_path, capsys, which, words):
    save, _ = kept
    try:  # a bad value stops in argparse (SystemExit), a missing checkpoint in the command
        code = to_hf(["--load", str(save), "--iteration", which, "--out", str(tmp_path / "x")])
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    one_error_line(capsys.readouterr().err, *words)
    assert not (tmp_path / "x").exists()


def test_a_kill_during_the_deletion_leaves_a_loadable_latest(tmp_path):
    """SIGKILL after the oldest checkpoint was renamed for deletion and half removed."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        textwrap.dedent("""
        import os, shutil, signal
        from pathlib import Path
        real = shutil.rmtree
        def rmtree(path, *args, **kwargs):
            if str(path).endswith(".deleting.tmp"):
                next(f for f in Path(path).rglob("*") if f.is_file()).unlink()
                os.kill(os.getpid(), signal.SIGKILL)
            return real(path, *args, **kwargs)
        shutil.rmtree = rmtree
        """)
    )
    save = tmp_path / "ckpt"
    args = [*TINY, "--train-iters", "3", "--save", str(save), "--save-interval", "1"]
    env = {**TORCHRUN_ENV, "PYTHONPATH": f"{hook}{os.pathsep}{REPO}"}
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_yuyuan.finetune", *args, "--keep-last", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert pointer(save) == 2 and list(save.glob("iter_0000001.deleting.tmp"))
    # the latest loads (export), and the next run finishes the deletion and resumes
    assert to_hf(["--load", str(save), "--out", str(tmp_path / "hf")]) == 0
    assert finetune([*args, "--load", str(save), "--keep-last", "1"]) == 0
    assert iterations(save) == [3] and not list(save.glob("*.tmp"))


def test_weights_only_saves_export_and_finetune_but_never_resume(tmp_path, capsys):
    save = tmp_path / "ckpt"
    args = [*TINY, "--train-iters", "2", "--save", str(save)]
    assert finetune([*args, "--save-interval", "1", "--final-save", "weights"]) == 0
    full, weights = (save / "iter_0000001"), (save / "iter_0000002")
    size = {d: sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) for d in (full, weights)}
    assert size[weights] < size[full] / 2  # AdamW's state and the fp32 copies are not in it
    assert to_hf(["--load", str(save), "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    # resuming it would restart the optimizer from nothing: refused, nothing written
    more = [*TINY, "--train-iters", "4", "--save", str(save), "--load", str(save)]
    assert finetune(more) == 2
    one_error_line(capsys.readouterr().err, "iteration 2", "weights only", "--finetune")
    assert iterations(save) == [1, 2]
    # a new run starts from its weights
    new = tmp_path / "new"
    assert finetune([*TINY, "--train-iters", "2", "--save", str(new), "--load", str(save),
                     "--finetune", "--no-save-optim"]) == 0  # fmt: skip
    assert pointer(new) == 2
    # and the flags that choose what to keep need a --save
    assert finetune([*TINY, "--train-iters", "2", "--no-save-optim"]) == 2
    one_error_line(capsys.readouterr().err, "--no-save-optim", "--save")


def test_exit_duration_saves_and_exits_0(tmp_path, capsys, monkeypatch):
    save, stop_file = tmp_path / "ckpt", tmp_path / "stopped"
    monkeypatch.setenv("MEGATRON_YUYUAN_STOP_FILE", str(stop_file))
    assert finetune([*TINY, "--train-iters", "2", "--save", str(tmp_path / "done")]) == 0
    assert not stop_file.exists()  # a run that reached its end asks for no requeue
    args = [*TINY, "--train-iters", "400", "--save", str(save), "--no-save-optim"]
    assert finetune([*args, "--exit-duration-in-mins", "0.001"]) == 0
    assert stop_file.is_file()
    # a stop's save holds the optimizer state even with --no-save-optim: the run resumes
    info = (save / f"iter_{pointer(save):07d}" / "model_config.yaml").read_text()
    assert "training_state: true" in info
    out = capsys.readouterr().out
    stopped = pointer(save)  # the first step that ended 0.06 s or more after the start
    assert stopped < 400 and f"stopped at iteration {stopped} of 400" in out
    assert "--exit-duration-in-mins 0.001 reached" in out


def _launch(save: Path, metrics: Path, train_iters: int, env: dict) -> subprocess.Popen:
    """``bash run/finetune_qa.sh`` at DP=2 (2 CPU processes), in a session of its own; its
    output goes to ``metrics`` with the suffix ``.log``."""
    args = [*CONSTANT, "--train-iters", str(train_iters), "--save", str(save), "--load", str(save)]
    args += ["--save-interval", "2", "--metrics-file", str(metrics), "--log-interval", "1000"]
    env = {**env, "NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port()), "PYTHON": sys.executable}
    with open(metrics.with_suffix(".log"), "w") as log:
        return subprocess.Popen(
            ["bash", "run/finetune_qa.sh", *args],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _output(run: subprocess.Popen, metrics: Path, timeout: float = 300) -> str:
    """Wait for ``run`` and return what it printed."""
    run.wait(timeout=timeout)
    return metrics.with_suffix(".log").read_text(errors="replace")


def _wait_for(check, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _steps(metrics: Path) -> int:
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


@pytest.mark.slow
def test_sigterm_at_dp2_saves_exits_0_and_resumes_the_same_losses(tmp_path):
    save, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    stop_file = tmp_path / "stopped"
    run = _launch(save, metrics, 300, {**TORCHRUN_ENV, "MEGATRON_YUYUAN_STOP_FILE": str(stop_file)})
    _wait_for(lambda: _steps(metrics) >= 3, "three steps")
    # every process of the job, as Slurm signals a job step: the launcher script, torchrun (in a
    # session of its own) and its workers
    (torchrun,) = subprocess.run(
        ["pgrep", "-P", str(run.pid)], capture_output=True, text=True
    ).stdout.split()
    os.killpg(run.pid, signal.SIGTERM)
    os.killpg(int(torchrun), signal.SIGTERM)
    out = _output(run, metrics, timeout=120)
    assert run.returncode == 0, out[-3000:]
    assert stop_file.read_text().strip() == str(save)  # the sbatch script requeues on this
    stopped = pointer(save)
    assert f"stopped at iteration {stopped} of 300" in out and "SIGTERM" in out
    assert stopped >= 3 and not list(save.glob("*.tmp"))
    # the same command resumes; its steps are those of a run that was never stopped
    resumed = tmp_path / "resumed.jsonl"
    again = _launch(save, resumed, stopped + 2, TORCHRUN_ENV)
    out = _output(again, resumed)
    assert again.returncode == 0 and f"resuming at iteration {stopped} " in out, out[-3000:]
    ref_save, ref = tmp_path / "ref", tmp_path / "ref.jsonl"
    straight = _launch(ref_save, ref, stopped + 2, TORCHRUN_ENV)
    assert straight.wait(timeout=300) == 0, _output(straight, ref)[-3000:]
    want = [(m["iteration"], m["loss"]) for m in read_metrics(ref)][-2:]
    got = [(m["iteration"], m["loss"]) for m in read_metrics(resumed)]
    assert [i for i, _ in got] == [i for i, _ in want] == [stopped + 1, stopped + 2]
    for (_, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, rel=1e-5)


@pytest.mark.slow
def test_a_second_sigterm_during_that_save_stops_at_once_and_nothing_partial_is_loaded(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        textwrap.dedent("""
        import os
        if os.environ.get("SLOW_SAVE_S") and os.environ.get("LOCAL_RANK") is not None:
            import time
            from megatron_yuyuan.checkpoint import storage
            real = storage._write_info
            def slow(*args, **kwargs):  # inside the save, before its rename
                time.sleep(float(os.environ["SLOW_SAVE_S"]))
                return real(*args, **kwargs)
            storage._write_info = slow
        """)
    )
    env = {**TORCHRUN_ENV, "PYTHONPATH": f"{hook}{os.pathsep}{REPO}", "SLOW_SAVE_S": "4"}
    save, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    log = metrics.with_suffix(".log")
    run = _launch(save, metrics, 300, env)
    _wait_for(lambda: (save / "latest_checkpointed_iteration.txt").is_file(), "a first save")
    previous = pointer(save)
    os.killpg(run.pid, signal.SIGTERM)
    _wait_for(lambda: "stopping after iteration" in log.read_text(errors="replace"), "the stop")
    time.sleep(1.5)  # into the stop's save (4 s), later than a forwarded copy of the first signal
    os.killpg(run.pid, signal.SIGTERM)
    out = _output(run, metrics, timeout=120)
    assert run.returncode != 0 and "interrupted" in out, out[-3000:]
    # the cut save is gone; the pointer still names the complete earlier one, which resumes
    assert not list(save.glob("*.tmp")) and pointer(save) == previous
    assert iterations(save) == [previous]
    resumed = tmp_path / "resumed.jsonl"
    again = _launch(save, resumed, previous + 1, TORCHRUN_ENV)
    out = _output(again, resumed)
    assert again.returncode == 0 and f"resuming at iteration {previous} " in out, out[-3000:]


def _same_files(a: Path, b: Path) -> None:
    """Every file of two checkpoints is byte-identical, except megatron-core's ``.metadata``
    (which records the folder and a fresh uuid) and the run's own config (its flags differ)."""

    def files(d: Path) -> dict[str, bytes]:
        skip = {".metadata", "run_config.yaml"}
        return {str(f.relative_to(d)): f.read_bytes() for f in d.rglob("*") if f.name not in skip}

    fa, fb = files(a), files(b)
    assert sorted(fa) == sorted(fb) and any(n.endswith(".distcp") for n in fa)
    assert [n for n in fa if fa[n] != fb[n]] == []


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2"], []], ids=["tp2", "dp2"])
def test_background_saves_are_the_synchronous_ones_byte_for_byte(tmp_path, layout):
    from conftest import run_torchrun

    for mode in ("sync", "async"):
        args = [*TINY, "--train-iters", "4", "--save", str(tmp_path / mode), "--save-interval"]
        args += ["2", *layout, *(["--async-save"] if mode == "async" else [])]
        run_torchrun(2, args, tmp_path)
    for iteration in (2, 4):
        name = f"iter_{iteration:07d}"
        _same_files(tmp_path / "sync" / name, tmp_path / "async" / name)
    assert pointer(tmp_path / "async") == 4


def test_a_kill_during_a_background_save_resumes_from_the_previous_checkpoint(tmp_path, capsys):
    """SIGKILL while iteration 4 is written in the background and training has gone on."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        textwrap.dedent("""
        import os
        if os.environ.get("SLOW_ITERATION"):
            import time
            from megatron_yuyuan.checkpoint import storage
            real = storage._write_buckets_in_threads
            def slow(transforms, rank, buckets, results, stop=None):
                if any(os.environ["SLOW_ITERATION"] in str(b[0]) for b in buckets):
                    time.sleep(60)
                return real(transforms, rank, buckets, results, stop)
            storage._write_buckets_in_threads = slow
        """)
    )
    save, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    args = [*CONSTANT, "--save", str(save), "--save-interval", "2", "--async-save"]
    env = {**TORCHRUN_ENV, "PYTHONPATH": f"{hook}{os.pathsep}{REPO}"}
    run = subprocess.Popen(
        [sys.executable, "-m", "megatron_yuyuan.finetune", *args, "--train-iters", "400",
         "--metrics-file", str(metrics)],
        env={**env, "SLOW_ITERATION": "iter_0000004.tmp"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        _wait_for(lambda: _steps(metrics) >= 5, "training to go on while iteration 4 is written")
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    assert pointer(save) == 2 and (save / "iter_0000004.tmp").is_dir()
    # the same command resumes from iteration 2, and trains as a run that was never killed
    resumed, ref = tmp_path / "resumed.jsonl", tmp_path / "ref.jsonl"
    more = [*args, "--train-iters", "6", "--load", str(save)]
    assert finetune([*more, "--metrics-file", str(resumed)]) == 0
    assert "resuming at iteration 2 " in capsys.readouterr().out
    fresh = [*CONSTANT, "--train-iters", "6", "--save", str(tmp_path / "ref")]
    assert finetune([*fresh, "--metrics-file", str(ref)]) == 0
    got = [(m["iteration"], m["loss"]) for m in read_metrics(resumed) if "loss" in m]
    want = [(m["iteration"], m["loss"]) for m in read_metrics(ref) if "loss" in m][2:]
    assert [i for i, _ in got] == [i for i, _ in want] == [3, 4, 5, 6]
    for (_, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, rel=1e-6)
    assert pointer(save) == 6 and not list(save.glob("*.tmp"))
