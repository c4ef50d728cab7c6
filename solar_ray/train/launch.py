"""The one place a training run is launched: inputs, worker spec, resources, the ``TorchTrainer``.

Every Ray Train run of solar-ray starts here, whoever asks for it: a training stage
(:func:`solar_ray.train.common.train_and_export`, behind ``solar-ray pretrain|sft|dpo``, the
pipeline and ``ray job submit``) and a Ray Tune trial (:func:`solar_ray.tune.trial.run_trial`).
So the worker resources, the storage and run name, the failure and checkpoint policy and the
worker's environment are decided once; a feature added to launching (elastic worker counts,
object storage) is added for both.

A worker receives a typed :class:`WorkerSpec` (``train_loop_config={"spec": spec}``): the
stage's resolved config, its model and data files, the run's storage, and the few values a
stage computes on the driver for its workers (the SFT part to read, the streamed row count,
the DPO reference log-probabilities).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from solar_ray import identity
from solar_ray.cluster import init_ray
from solar_ray.data.contract import MixInfo
from solar_ray.fs import qualify
from solar_ray.remote import is_remote
from solar_ray.train.config import TrainConfig
from solar_ray.train.session import FINAL_MARKER

__all__ = ["StageInputs", "WorkerSpec", "checkpoint_uri", "launch_ray", "worker_resources", "worker_spec"]

log = logging.getLogger(__name__)


@dataclass
class StageInputs:
    """The validated inputs of a stage run (what its workers are launched on)."""

    model_dir: Path
    model_config: dict[str, Any]
    vocab_size: int
    data: MixInfo
    val: MixInfo | None = None
    ref_model_dir: Path | None = None
    extra_parents: list[dict[str, Any]] = field(default_factory=list)

    def signature(self) -> str:
        """A cheap identity of the inputs: the models' directory signatures and the mixes'
        fingerprints (:mod:`solar_ray.identity`)."""
        return identity.key(
            [identity.dir_signature(d) for d in (self.model_dir, self.ref_model_dir) if d is not None],
            [mix.fingerprint for mix in (self.data, self.val) if mix is not None],
        )


@dataclass(frozen=True)
class WorkerSpec:
    """What every training worker is told about its run (picklable, typed)."""

    config_class: type[TrainConfig]  #: the stage's config class: workers validate ``cfg`` with it
    cfg: dict[str, Any]  #: the stage config, resolved (``TrainConfig.to_dict()``)
    model_dir: str  #: the model, resolved on the driver's node
    data_files: list[str]
    val_files: list[str]
    storage_path: str
    run_name: str
    #: the run's directory without Ray (``local: true``), else None
    local_run_dir: str | None = None
    #: sft: which part of the mix to read (``tokenized`` rows, or raw ``data`` rows)
    part: str = "tokenized"
    #: pretrain with streaming: rows of the training split (the workers see only a shard)
    num_train_rows: int | None = None
    #: dpo: precomputed reference log-probabilities, one file per data file
    ref_logps_files: list[str] = field(default_factory=list)
    #: dpo: a separate reference model (None: the policy's own initial weights)
    ref_model_dir: str | None = None
    #: the model source when it is on object storage: a worker on a node without the
    #: driver's copy downloads it into its own cache (:func:`solar_ray.remote.materialize`)
    model_uri: str | None = None
    #: dpo: the same for a separate reference model
    ref_model_uri: str | None = None

    def config(self) -> dict[str, Any]:
        """``train_loop_config`` for Ray Train (a dict is what it passes on)."""
        return {"spec": self}


def worker_spec(cfg: TrainConfig, inputs: StageInputs, **stage_values: Any) -> WorkerSpec:
    """The spec of ``cfg``'s workers; ``stage_values`` are the stage-specific fields."""
    storage = cfg.resolved_storage_path
    return WorkerSpec(
        config_class=type(cfg),
        cfg=cfg.to_dict(),
        model_dir=str(inputs.model_dir),
        model_uri=cfg.model if is_remote(cfg.model) else None,
        data_files=list(inputs.data.files),
        val_files=list(inputs.val.files) if inputs.val else [],
        storage_path=storage,
        run_name=cfg.run_name,
        local_run_dir=str(Path(storage) / cfg.run_name / "local") if cfg.local else None,
        **stage_values,
    )


def worker_resources(cfg: TrainConfig) -> dict[str, float]:
    """Ray resources of one training worker: ``resources_per_worker``, else CPUs (+1 GPU)."""
    resources = dict(cfg.resources_per_worker or {"CPU": cfg.cpus_per_worker})
    if cfg.use_gpu and cfg.resources_per_worker is None:
        resources["GPU"] = 1
    return resources


def checkpoint_uri(storage_path: str, path: str) -> str:
    """A Ray Train checkpoint's location as a URI (``s3://...``) or a local path."""
    return qualify(path, storage_path)


def step_progress(cfg: TrainConfig) -> Any:
    """A Ray Train callback that logs the run's steps, rate and ETA as workers report.

    It runs in the Train controller (an actor), whose log lines reach the driver's output,
    so it writes plain periodic lines rather than a bar.
    """
    from ray.train import UserCallback

    from solar_ray.progress import Progress

    class StepProgress(UserCallback):
        def __init__(self) -> None:
            self.progress: Progress | None = None

        def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
            step = metrics[0].get("step") if metrics else None
            if step is None:
                return
            if self.progress is None:  # created here: the callback is pickled to the controller
                self.progress = Progress(
                    f"{cfg.stage} {cfg.run_name}", cfg.steps, "steps", terminal=False,
                    initial=int(step), emit=lambda text: print(text, flush=True),
                )  # the controller's stdout reaches the driver; its log level may not
            self.progress.set(int(step))

    return StepProgress()


def _warn_if_data_starved(cfg: TrainConfig, resources: dict[str, float]) -> None:
    import ray

    spare = ray.cluster_resources().get("CPU", 0) - cfg.max_workers * resources.get("CPU", 1)
    if spare < 1:
        log.warning(
            "streaming: the workers take all %s CPUs of the cluster, so Ray Data has none "
            "to read with and training will wait until the cluster grows; lower "
            "cpus_per_worker or add CPU nodes",
            ray.cluster_resources().get("CPU", 0),
        )


@contextlib.contextmanager
def launch_ray(
    cfg: TrainConfig,
    worker_fn: Callable[[dict], None],
    spec: WorkerSpec,
    *,
    datasets: dict[str, Any] | None = None,
    callbacks: Sequence[Any] = (),
) -> Iterator[tuple[Path, str]]:
    """Run ``worker_fn`` on ``cfg.num_workers`` Ray Train workers; yield the final checkpoint.

    Yields ``(local directory of the final checkpoint, its URI)`` while the directory
    exists. The run is ``RunConfig(name=cfg.run_name, storage_path=...)``, so a run that is
    launched again with the same name continues from its latest checkpoint. Ray is started
    (or joined, under ``RAY_ADDRESS``) when it is not running yet.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    init_ray()  # joins the cluster in RAY_ADDRESS (ray job submit), else starts one
    resources = worker_resources(cfg)
    if datasets:
        _warn_if_data_starved(cfg, resources)
    callbacks = [*callbacks, step_progress(cfg)]
    trainer = TorchTrainer(
        worker_fn,
        train_loop_config=spec.config(),
        scaling_config=ScalingConfig(
            # an elastic (min, max): Ray Train starts with as many workers as fit, restarts
            # with fewer when a node goes and grows the group when room appears
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources,
            elastic_resize_monitor_interval_s=cfg.elastic_resize_interval_s,
        ),  # fmt: skip
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=cfg.resolved_storage_path,
            callbacks=callbacks,
            # a preempted node (its drain seen by Ray) is counted apart from max_failures,
            # and without a limit: spot capacity comes and goes
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_checkpoints_to_keep),
            # Ray Train sends print() to its logger, including prints into a redirected
            # sys.stdout: dill's disassembly while datasets fingerprints TRL's map functions
            # would flood the logs
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
        datasets=datasets,
    )
    result = trainer.fit()
    checkpoint = result.checkpoint
    if checkpoint is None:
        raise RuntimeError(f"the run {cfg.run_name!r} ended without a checkpoint")
    with checkpoint.as_directory() as d:
        if not (Path(d) / FINAL_MARKER).is_file():
            raise RuntimeError(
                f"the run {cfg.run_name!r} ended before its final export ({checkpoint.path})"
            )
        yield Path(d), checkpoint_uri(cfg.resolved_storage_path, checkpoint.path)
