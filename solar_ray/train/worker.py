"""Pieces every per-worker training loop shares: setup, resume detection, the final report.

A worker loop receives ``{"spec": WorkerSpec}`` (``TorchTrainer``'s ``train_loop_config``,
made by :func:`solar_ray.train.launch.worker_spec`): the stage config, the resolved model
and data paths, the run's storage and the stage's own values. :func:`setup_worker`
validates the config with the stage's class (named in the spec), joins (or, without Ray,
creates) the process group and returns a :class:`WorkerEnv`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from solar_ray.train.config import TrainConfig
from solar_ray.train.launch import WorkerSpec
from solar_ray.train.metrics import MetricsWriter
from solar_ray.train.session import (
    FINAL_MARKER,
    LocalSession,
    WorkerSession,
    current_session,
    init_local_process_group,
)

__all__ = ["WorkerEnv", "finish_run", "run_worker", "setup_worker"]

log = logging.getLogger(__name__)

@dataclass
class WorkerEnv:
    """What a worker loop knows about itself and its run."""

    cfg: TrainConfig
    session: WorkerSession
    spec: WorkerSpec
    metrics: MetricsWriter | None = None

    @property
    def model_dir(self) -> str:
        """The model the run starts from (a local HF directory).

        On a node without the driver's copy of a model from object storage, the copy in
        this node's cache (downloaded once).
        """
        from solar_ray.remote import local_copy

        return local_copy(self.spec.model_dir, self.spec.model_uri)

    @property
    def data_files(self) -> list[str]:
        """The training mix's files."""
        return self.spec.data_files

    @property
    def val_files(self) -> list[str]:
        """The held-out mix's files (empty without ``val_data``)."""
        return self.spec.val_files

    @property
    def storage_path(self) -> str:
        """The run's Ray Train storage (local path or URI)."""
        return self.spec.storage_path

    @property
    def run_name(self) -> str:
        """The run's name in its storage."""
        return self.spec.run_name

    @property
    def rank(self) -> int:
        """This worker's global rank."""
        return self.session.world_rank

    @property
    def world_size(self) -> int:
        """Number of workers."""
        return self.session.world_size

    @property
    def is_rank0(self) -> bool:
        """True on the worker that writes logs and the export."""
        return self.session.world_rank == 0

    @property
    def device(self) -> Any:
        """The torch device this worker trains on."""
        import torch

        if self.cfg.use_gpu:
            return torch.device("cuda", self.session.local_rank)
        return torch.device("cpu")


def _quiet_libraries() -> None:
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "accelerate", "datasets"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")


def setup_worker(config: dict[str, Any]) -> WorkerEnv:
    """Typed worker state from ``{"spec": WorkerSpec}``; joins or creates the process group."""
    spec: WorkerSpec = config["spec"]
    cfg = spec.config_class.model_validate(spec.cfg)
    if not cfg.use_gpu:
        # DeepSpeed picks its accelerator at import: CPU workers on a GPU node stay on CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _quiet_libraries()
    session = current_session(Path(spec.local_run_dir) if cfg.local and spec.local_run_dir else None)
    if isinstance(session, LocalSession):
        from solar_ray.progress import Progress

        init_local_process_group(use_gpu=cfg.use_gpu)
        session.progress = Progress(cfg.stage, cfg.steps, "steps")
    import torch

    if cfg.use_gpu:
        torch.cuda.set_device(session.local_rank)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    env = WorkerEnv(cfg=cfg, session=session, spec=spec)
    from solar_ray.tracking import TrackedRun

    run_id = TrackedRun.stable_id(env.storage_path, env.run_name, cfg.result_fingerprint())
    env.metrics = MetricsWriter(
        env.storage_path, env.run_name, enabled=env.is_rank0, backends=cfg.tracking,
        run=cfg.tracked_run(run_id),
    )  # fmt: skip
    return env


def is_finished(checkpoint_dir: Path | None) -> bool:
    """True when the checkpoint is a run's final one (its export is done)."""
    return checkpoint_dir is not None and (checkpoint_dir / FINAL_MARKER).is_file()


def finish_run(env: WorkerEnv, model: Any, tokenizer: Any, final_metrics: dict[str, Any]) -> None:
    """Export the model (collective), then report it with the final metrics as ``final``.

    The final metrics get ``probe`` (:func:`~solar_ray.train.export.probe_model`: what the
    trained model computes on a fixed text, to check the export against). Rank 0 writes ``export/`` (the HF model) and ``final.json`` into the final checkpoint;
    the other ranks take part in the gather and report no checkpoint.
    """
    from solar_ray.train.export import export_hf_model, probe_model

    cfg = env.cfg
    final_metrics = {**final_metrics, "probe": probe_model(model, tokenizer, env.device)}
    with tempfile.TemporaryDirectory(prefix="solar-final-") as tmp:
        export_dir = Path(tmp) / "export" if env.is_rank0 else None
        options = {
            "tokenizer": tokenizer,
            "dtype": cfg.export_dtype_resolved,
            "max_shard_bytes": cfg.max_shard_size_mb << 20,
            "is_writer": env.is_rank0,
        }
        peft = getattr(cfg, "peft", None)
        if peft is not None:
            from solar_ray.train.lora import export_merged

            export_merged(model, export_dir, base_dir=env.model_dir, keep_adapter=peft.keep_adapter, **options)
        else:
            export_hf_model(model, export_dir, **options)
        if env.is_rank0:
            (Path(tmp) / FINAL_MARKER).write_text(
                json.dumps(final_metrics, indent=2, default=float) + "\n", encoding="utf-8"
            )
        if env.metrics is not None:
            env.metrics.close()
        reported = {k: v for k, v in final_metrics.items() if not isinstance(v, list | dict)}
        env.session.report(
            reported, checkpoint_dir=Path(tmp) if env.is_rank0 else None, name="final"
        )


def run_worker(config: dict[str, Any], body: Callable[[WorkerEnv, Path | None], None]) -> None:
    """Set up, then ``body(env, checkpoint_to_resume_from)`` unless the run is finished.

    A worker group restored from storage after its final checkpoint (a re-run of a finished
    job) returns here without loading a model.
    """
    env = setup_worker(config)
    try:
        with env.session.latest_checkpoint() as ckpt:
            if is_finished(ckpt):
                return
            body(env, ckpt)
    finally:
        teardown_worker(env)


def teardown_worker(env: WorkerEnv) -> None:
    """Close logs; without Ray, also destroy the process group this process created."""
    if env.metrics is not None:
        env.metrics.close()
    if isinstance(env.session, LocalSession):
        import torch.distributed as dist
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        # a ZeRO-3 Trainer registers its config process-wide: later loads in this process
        # would come out partitioned
        unset_hf_deepspeed_config()
        if not dist.is_initialized():
            return
        import deepspeed.comm as ds_comm

        if ds_comm.is_initialized():
            # also drops DeepSpeed's cached groups (its clone of the world group), which a
            # later run in this process would otherwise use after they were destroyed
            ds_comm.destroy_process_group()
        else:
            dist.destroy_process_group()
