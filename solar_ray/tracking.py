"""Experiment tracking backends: TensorBoard (default), Weights & Biases, MLflow.

A stage's ``tracking:`` names its backends; rank 0 logs through them
(:class:`solar_ray.train.metrics.MetricsWriter`), one run per recipe stage carrying the
resolved config, and a restarted run logs into the same W&B or MLflow run. Sweeps attach
Ray Tune's logger callbacks (:func:`tune_callbacks`). Environment variables and failure
handling: docs/train.md, "Metrics".
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator

from solar_ray.errors import require

__all__ = [
    "BACKENDS",
    "Backends",
    "TrackedRun",
    "check_backends",
    "normalize_backends",
    "open_tracker",
    "tune_callbacks",
]

log = logging.getLogger(__name__)

#: every backend name, in the order a list is shown
BACKENDS = ("tensorboard", "wandb", "mlflow")
#: backend -> (module to import, the solar-ray extra that installs it)
_OPTIONAL = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}


def normalize_backends(value: Any) -> list[str]:
    """``tracking:`` as a list of backend names (a name, a list, ``none`` or ``[]``)."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    if items in (["none"], ["off"]):
        return []
    unknown = [b for b in items if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend {unknown[0]!r} (one of {list(BACKENDS)}, or none)")
    return list(dict.fromkeys(items))


#: a config field of backends: a name, a list of names, or ``none``
Backends = Annotated[list[str], BeforeValidator(lambda v: normalize_backends(v))]


def check_backends(backends: list[str], field_name: str = "tracking") -> None:
    """Fail with one line naming the extra when a chosen backend is not installed."""
    for backend in backends:
        if backend in _OPTIONAL:
            module, extra = _OPTIONAL[backend]
            require(module, f"{field_name}: {backend}", extra=extra)


@dataclass(frozen=True)
class TrackedRun:
    """What a tracker names and records: project, run name, a stable id, the config."""

    project: str
    name: str
    #: stable over restarts of the same run: a restarted worker logs into the same run
    run_id: str
    config: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def stable_id(*parts: str) -> str:
        """A W&B/MLflow-safe run id from the run's identity."""
        return hashlib.blake2b("\x00".join(parts).encode(), digest_size=8).hexdigest()


def _finite_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
    }


class _Wandb:
    def __init__(self, run: TrackedRun, local_dir: Path) -> None:
        import os

        wandb = require("wandb", "tracking: wandb", extra="wandb")
        directory = Path(os.environ.get("WANDB_DIR") or local_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            project=run.project, name=run.name, id=run.run_id, resume="allow",
            config=run.config, dir=str(directory), reinit="create_new",
        )  # fmt: skip

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._run.log(metrics, step=step)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self._run.finish()


class _Mlflow:
    def __init__(self, run: TrackedRun, local_dir: Path) -> None:
        require("mlflow", "tracking: mlflow", extra="mlflow")
        from mlflow.tracking import MlflowClient

        self._client = client = MlflowClient()  # MLFLOW_TRACKING_URI
        experiment = client.get_experiment_by_name(run.project)
        exp_id = experiment.experiment_id if experiment else client.create_experiment(run.project)
        found = client.search_runs(
            [exp_id], filter_string=f"tags.`solar_ray.run_id` = '{run.run_id}'", max_results=1
        )
        if found:
            self.run_id = found[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
            return
        created = client.create_run(
            exp_id, run_name=run.name, tags={"solar_ray.run_id": run.run_id}
        )
        self.run_id = created.info.run_id
        client.log_dict(self.run_id, run.config, "solar_config.json")
        params = {k: str(v)[:500] for k, v in run.config.items() if not isinstance(v, dict | list)}
        from mlflow.entities import Param

        client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(
            self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()]
        )

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self._client.set_terminated(self.run_id)


def open_tracker(backend: str, run: TrackedRun, local_dir: Path) -> Any:
    """A W&B or MLflow run to log into (``log(step, metrics)``, ``flush()``, ``close()``)."""
    return {"wandb": _Wandb, "mlflow": _Mlflow}[backend](run, local_dir)


def log_scalars(trackers: list[Any], step: int, metrics: dict[str, Any]) -> None:
    """Log the finite numbers of ``metrics`` at ``step`` into every tracker; a failing
    backend is logged, never fatal to training."""
    scalars = _finite_scalars(metrics)
    if not scalars:
        return
    for tracker in trackers:
        try:
            tracker.log(step, scalars)
        except Exception as e:  # tracking must never kill a training run
            log.warning("could not log metrics to %s: %s", type(tracker).__name__, e)


def tune_callbacks(backends: list[str], project: str) -> list[Any]:
    """Ray Tune's own logger callbacks for a sweep: one W&B / MLflow run per trial."""
    check_backends(backends)
    callbacks: list[Any] = []
    if "wandb" in backends:
        from ray.air.integrations.wandb import WandbLoggerCallback

        callbacks.append(WandbLoggerCallback(project=project, log_config=True))
    if "mlflow" in backends:
        import os

        from ray.air.integrations.mlflow import MLflowLoggerCallback

        callbacks.append(
            MLflowLoggerCallback(
                tracking_uri=os.environ.get("MLFLOW_TRACKING_URI"),
                experiment_name=project,
                tags={"solar_ray.sweep": project},
                save_artifact=False,
            )
        )
    return callbacks
