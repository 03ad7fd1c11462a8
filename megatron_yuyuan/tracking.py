"""Experiment tracking: a run's metrics, its config and its images in Weights & Biases and/or
MLflow, next to the metrics file and TensorBoard (``--wandb-project``, ``--mlflow-tracking-uri``).

Both are optional extras (``pip install -e ".[wandb]"`` / ``".[mlflow]"``); a flag given without
its package stops the run before any work, naming the extra. Only global rank 0 tracks. A run
that resumes in the same ``--save`` folder continues the same tracked run: its id is kept there
(``wandb_run_id.txt``, ``mlflow_run_id.txt``).
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterable
from pathlib import Path

from megatron_yuyuan.config import RunConfig
from megatron_yuyuan.errors import ConfigError

# flag -> (module that must be importable, the extra that installs it)
_NEEDS = {
    "--wandb-project": ("wandb", "wandb"),
    "--mlflow-tracking-uri": ("mlflow", "mlflow"),
}


def _missing(flag: str) -> str:
    module, extra = _NEEDS[flag]
    package = "mlflow-skinny" if extra == "mlflow" else extra
    return (
        f'{flag} needs the {module} package: pip install -e ".[{extra}]" (or pip install {package})'
    )


def check_available(cfg: RunConfig) -> None:
    """A tracking flag whose package is missing: one line naming the extra to install."""
    t = cfg.train
    for flag, given in (("--wandb-project", t.wandb_project), ("--mlflow-tracking-uri",
                                                               t.mlflow_tracking_uri)):  # fmt: skip
        if given and importlib.util.find_spec(_NEEDS[flag][0]) is None:
            raise ConfigError(_missing(flag))
    if t.mlflow_experiment and not t.mlflow_tracking_uri:
        raise ConfigError("--mlflow-experiment needs --mlflow-tracking-uri (where runs are kept)")
    for flag, value in (("--wandb-exp-name", t.wandb_exp_name),
                        ("--wandb-save-dir", t.wandb_save_dir)):  # fmt: skip
        if value and not t.wandb_project:
            raise ConfigError(f"{flag} needs --wandb-project")


def _flat(config: dict, prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 1e-4}}`` -> ``{"train.lr": "0.0001"}`` (MLflow parameters)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def _run_id(run_dir: Path | None, name: str, resuming: bool) -> tuple[Path | None, str | None]:
    """Where a tracked run's id is kept in ``run_dir``, and, when this run resumes the one that
    saved there, the id it left (a new run in that folder starts a new tracked run)."""
    if run_dir is None:
        return None, None
    path = Path(run_dir) / name
    if not resuming or not path.is_file():
        return path, None
    return path, path.read_text().strip() or None


class _WandB:
    def __init__(self, cfg: RunConfig, run_dir: Path | None, resuming: bool) -> None:
        try:  # an optional extra
            import wandb
        except ImportError as exc:
            raise ConfigError(_missing("--wandb-project")) from exc

        self.wandb = wandb
        t = cfg.train
        self.id_file, run_id = _run_id(run_dir, "wandb_run_id.txt", resuming)
        save_dir = t.wandb_save_dir or (str(run_dir) if run_dir else None)
        if save_dir:
            Path(save_dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=t.wandb_project,
            name=t.wandb_exp_name,
            dir=save_dir,
            config=cfg.to_dict(),
            id=run_id,
            resume="allow" if run_id else None,
        )
        if self.id_file is not None:
            self.id_file.write_text(self.run.id)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def summary(self, values: dict[str, float]) -> None:
        self.run.summary.update(values)

    def files(self, paths: list[Path]) -> None:
        for path in paths:
            if path.suffix == ".png":
                self.run.log({f"images/{path.stem}": self.wandb.Image(str(path))})
            self.run.save(str(path), base_path=str(path.parent), policy="now")

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class _MLflow:
    def __init__(self, cfg: RunConfig, run_dir: Path | None, resuming: bool) -> None:
        try:  # an optional extra
            from mlflow.entities import Metric, Param
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise ConfigError(_missing("--mlflow-tracking-uri")) from exc

        self.Metric = Metric
        t = cfg.train
        self.client = MlflowClient(tracking_uri=t.mlflow_tracking_uri)
        self.id_file, run_id = _run_id(run_dir, "mlflow_run_id.txt", resuming)
        name = t.mlflow_experiment or "megatron_yuyuan"
        experiment = self.client.get_experiment_by_name(name)
        exp_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        if run_id is None:
            run_id = self.client.create_run(exp_id, run_name=t.wandb_exp_name).info.run_id
            params = _flat(cfg.to_dict())
            items = [Param(k, v[:6000]) for k, v in params.items()]
            for i in range(0, len(items), 100):  # MLflow takes at most 100 per batch
                self.client.log_batch(run_id, params=items[i : i + 100])
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        if self.id_file is not None:
            self.id_file.write_text(run_id)

    def log(self, step: int, values: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        metrics = [self.Metric(k, float(v), now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def summary(self, values: dict[str, float]) -> None:
        self.log(0, values)

    def files(self, paths: list[Path]) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, str(path))

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def _start(
    backend: type, cfg: RunConfig, run_dir: Path | None, resuming: bool, flag: str, advice: str
):
    """A tracker that cannot start stops the run before training, in one line."""
    try:
        return backend(cfg, run_dir, resuming)
    except Exception as exc:  # the libraries' own error types too (wandb.Error, MlflowException)
        why = " ".join(str(exc).split())[:400]
        raise ConfigError(f"{flag}: cannot start ({why}); {advice}") from exc


class Tracking:
    """The trackers a run asked for (none: every call is a no-op). Once started, a tracker that
    fails (a server gone, a rejected name) is reported once and dropped: a long run never dies
    of its tracking; the metrics file and TensorBoard still have everything."""

    def __init__(self, backends: list) -> None:
        self.backends = backends

    @classmethod
    def open(cls, cfg: RunConfig, resuming: bool = False) -> Tracking:
        """Start the tracked runs ``cfg`` asks for (call on global rank 0 only); ``resuming``
        (this run continues the one that saved in ``--save``) continues its tracked runs."""
        t, backends = cfg.train, []
        run_dir = Path(t.save) if t.save else None
        started = cls(backends)
        wandb_advice = "log in with `wandb login`, or set WANDB_MODE=offline"
        mlflow_advice = (
            "check the URI: a server, sqlite:///mlflow.db, or a folder with "
            "MLFLOW_ALLOW_FILE_STORE=true"
        )
        try:
            if t.wandb_project:
                flag = f"--wandb-project {t.wandb_project}"
                backends.append(_start(_WandB, cfg, run_dir, resuming, flag, wandb_advice))
            if t.mlflow_tracking_uri:
                flag = f"--mlflow-tracking-uri {t.mlflow_tracking_uri}"
                backends.append(_start(_MLflow, cfg, run_dir, resuming, flag, mlflow_advice))
        except BaseException:
            started.close(failed=True)
            raise
        return started

    def _each(self, call) -> None:
        for backend in list(self.backends):
            try:
                call(backend)
            except Exception as exc:
                name = type(backend).__name__.strip("_")
                why = " ".join(str(exc).split())[:300]
                print(
                    f"warning: {name} tracking failed ({why}); it is off for this run", flush=True
                )
                self.backends.remove(backend)

    def log(self, step: int, values: dict[str, float | None]) -> None:
        """Scalars at a training step (None values are left out)."""
        kept = {k: float(v) for k, v in values.items() if v is not None}
        self._each(lambda b: b.log(step, kept))

    def summary(self, values: dict[str, float]) -> None:
        """End-of-run scores."""
        self._each(lambda b: b.summary(values))

    def files(self, paths: Iterable[Path]) -> None:
        """Images and reports, as artifacts (those that exist)."""
        found = [Path(p) for p in paths if Path(p).is_file()]
        self._each(lambda b: b.files(found))

    def close(self, failed: bool = False) -> None:
        self._each(lambda b: b.close(failed))
        self.backends = []
