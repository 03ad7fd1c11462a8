"""Experiment tracking: W&B (offline) and MLflow (a folder) receive the same loss series as
--metrics-file, the run config and the loss curve; a missing package is one error line."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from conftest import read_metrics
from megatron_yuyuan.finetune import main as finetune

TINY = ["--config", "tiny", "--mock-data", "--seq-length", "32", "--micro-batch-size", "2"]
TINY += ["--global-batch-size", "4", "--lr", "3e-3", "--lr-warmup-iters", "1"]


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline W&B run file (a LevelDB-style log of protobuf records:
    a 7-byte header, then 32 KiB blocks of records with a 7-byte header each)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    rows, pos, block, parts = [], 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # the rest of a block is padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        parts = chunk if kind in (1, 2) else parts + chunk  # full / first, or middle / last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in items}
                rows.append(row)
    return rows


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("tracked")
    save = root / "ckpt"
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"file:{root / 'mlruns'}"
    args = [*TINY, "--train-iters", "4", "--save", str(save), "--eval-interval", "2"]
    args += ["--eval-iters", "1", "--metrics-file", str(root / "metrics.jsonl")]
    args += ["--wandb-project", "yuyuan-test", "--wandb-exp-name", "tiny"]
    args += ["--mlflow-tracking-uri", uri, "--mlflow-experiment", "tests"]
    try:
        assert finetune(args) == 0
    finally:
        mp.undo()
    return root, save, uri, read_metrics(root / "metrics.jsonl")


def series(rows: list[dict], key: str, step: str) -> list[tuple[int, float]]:
    return [(r[step], r[key]) for r in rows if key in r]


def test_wandb_offline_holds_the_metrics_file_series(tracked):
    _, save, _, metrics = tracked
    (run_file,) = save.glob("wandb/offline-run-*/run-*.wandb")
    history = wandb_history(run_file)
    for key in ("loss", "valid_loss", "lr", "grad_norm"):
        assert series(history, key, "_step") == series(metrics, key, "iteration"), key
    assert len(series(metrics, "loss", "iteration")) == 4
    assert (save / "wandb_run_id.txt").read_text() in run_file.name


def test_mlflow_holds_the_same_series_the_config_and_the_loss_curve(tracked):
    from mlflow.tracking import MlflowClient

    _, save, uri, metrics = tracked
    client = MlflowClient(tracking_uri=uri)
    run_id = (save / "mlflow_run_id.txt").read_text()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "tests"
    for key in ("loss", "valid_loss", "lr"):
        got = [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        assert sorted(got) == series(metrics, key, "iteration"), key
    assert run.data.params["train.train_iters"] == "4"
    assert run.data.params["model.num_layers"] == "4"
    assert "loss_curve.png" in [a.path for a in client.list_artifacts(run_id)]


def test_a_tracking_flag_without_its_package_is_one_error_line(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    args = [*TINY, "--train-iters", "2", "--save", str(tmp_path / "ckpt")]
    assert finetune([*args, "--wandb-project", "p"]) == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and '".[wandb]"' in errors[0] and "--wandb-project" in errors[0], err
    assert not list((tmp_path / "ckpt").glob("iter_*"))
