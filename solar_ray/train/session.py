"""The worker's view of its run: rank, checkpoints, reports; under Ray Train or without it.

The per-worker training loops talk to a :class:`WorkerSession` only, so the same loop runs
as a Ray Train worker (:class:`RaySession`: ``ray.train.report`` / ``get_checkpoint``) and
in a plain process with world size 1 (:class:`LocalSession`: checkpoints in a directory),
which is how the loops are unit-tested and benchmarked alone.

A checkpoint is a directory; every rank passes its own (DeepSpeed writes one shard per
rank) and Ray Train merges them into one directory in storage. The final checkpoint of a
run holds the exported model in ``export/`` and ``final.json``; a worker that starts from it
knows the run is finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "FINAL_MARKER",
    "LocalSession",
    "RaySession",
    "WorkerSession",
    "current_session",
    "init_local_process_group",
]

#: file in the final checkpoint that marks a finished run (holds the final metrics)
FINAL_MARKER = "final.json"


class WorkerSession(Protocol):
    """What a training loop needs from its surroundings."""

    world_rank: int
    world_size: int
    local_rank: int

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        """The checkpoint to resume from, as a local directory (None on a fresh start)."""
        ...

    def report(
        self, metrics: dict[str, Any], checkpoint_dir: Path | None = None, name: str | None = None
    ) -> None:
        """Report metrics (and this rank's part of a checkpoint); every rank must call it."""
        ...

    def dataset_shard(self, name: str) -> Any | None:
        """This worker's shard of a Ray Dataset passed to the trainer, or None."""
        ...


class RaySession:
    """A Ray Train worker (V2 API)."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.world_rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield Path(d)

    def report(
        self, metrics: dict[str, Any], checkpoint_dir: Path | None = None, name: str | None = None
    ) -> None:
        import ray.train

        checkpoint = (
            ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        )
        ray.train.report(
            metrics, checkpoint=checkpoint, checkpoint_dir_name=name if checkpoint else None
        )

    def dataset_shard(self, name: str) -> Any | None:
        import ray.train

        try:
            return ray.train.get_dataset_shard(name)
        except KeyError:
            return None


class LocalSession:
    """One process, no Ray: checkpoints are directories under ``run_dir/checkpoints``."""

    world_rank = 0
    world_size = 1
    local_rank = 0

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.checkpoint_root = self.run_dir / "checkpoints"
        self.reports: list[dict[str, Any]] = []

    def _checkpoints(self) -> list[Path]:
        if not self.checkpoint_root.is_dir():
            return []
        return sorted(p for p in self.checkpoint_root.iterdir() if (p / ".complete").exists())

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        found = self._checkpoints()
        yield found[-1] if found else None

    def report(
        self, metrics: dict[str, Any], checkpoint_dir: Path | None = None, name: str | None = None
    ) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is None:
            return
        # a sequence prefix keeps the directories in report order ("final" sorts last)
        seq = len(list(self.checkpoint_root.glob("*"))) if self.checkpoint_root.is_dir() else 0
        dest = self.checkpoint_root / f"{seq:06d}_{name or 'checkpoint'}"
        dest.mkdir(parents=True)
        # the caller's directory is temporary: move its contents (a rename on one filesystem)
        for child in Path(checkpoint_dir).iterdir():
            shutil.move(str(child), dest / child.name)
        (dest / ".complete").write_text(json.dumps(metrics, default=str))

    def dataset_shard(self, name: str) -> Any | None:
        return None

    @property
    def latest_checkpoint_path(self) -> Path | None:
        """The newest complete checkpoint directory (the run's result)."""
        found = self._checkpoints()
        return found[-1] if found else None


def current_session(run_dir: str | Path | None = None) -> WorkerSession:
    """A :class:`RaySession` inside a Ray Train worker, else a :class:`LocalSession`."""
    try:
        import ray.train

        ray.train.get_context()
        in_ray = True
    except Exception:  # not in a Ray Train worker (RuntimeError, or Ray not importable)
        in_ray = False
    if in_ray:
        return RaySession()
    if run_dir is None:
        raise ValueError("a local (non-Ray) session needs a run directory")
    return LocalSession(run_dir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_local_process_group() -> None:
    """A world-size-1 gloo process group for a worker loop running without Ray."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
    dist.init_process_group("gloo", rank=0, world_size=1)
