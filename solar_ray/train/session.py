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
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from solar_ray.faults import hold_after_checkpoint

__all__ = [
    "FINAL_MARKER",
    "STATE_FILE",
    "LocalSession",
    "RaySession",
    "ReportCoalescer",
    "WorkerSession",
    "current_session",
    "init_local_process_group",
    "read_run_state",
    "write_run_state",
]

#: file in the final checkpoint that marks a finished run (holds the final metrics)
FINAL_MARKER = "final.json"
#: written by rank 0 into every checkpoint: the run's state across restarts (steps, tokens,
#: loss and held-out history, the steps it resumed from; a DeepSpeed run also its ``tag``)
STATE_FILE = "solar_state.json"


def read_run_state(checkpoint_dir: Path) -> dict[str, Any] | None:
    """The run state saved in a checkpoint (None when it has none)."""
    path = Path(checkpoint_dir) / STATE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_run_state(checkpoint_dir: Path, state: dict[str, Any]) -> None:
    """Save the run state into a checkpoint being written (rank 0 only)."""
    (Path(checkpoint_dir) / STATE_FILE).write_text(json.dumps(state) + "\n", encoding="utf-8")


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
        """Report metrics (and this rank's part of a checkpoint); every rank must call it.

        A checkpoint report passes the checkpoint's ``name`` on every rank, also on those
        that hold no part of it (``checkpoint_dir=None``).
        """
        ...

    def dataset_shard(self, name: str) -> Any | None:
        """This worker's shard of a Ray Dataset passed to the trainer, or None."""
        ...

    def preemption_notice(self) -> bool:
        """Whether a node of the run is being drained; every rank must call it alike."""
        ...


#: the least time between two asks for Ray Train's preemption notice (see RaySession)
PREEMPTION_CHECK_INTERVAL_S = 1.0

#: Ray Train V2's controller takes each worker's reports from a one-slot queue, polling every
#: ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (2 s by default)
POLL_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def _max_over_ranks(value: float) -> float:
    """``value``'s maximum over the ranks of the default process group (itself without one)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    device = (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    )
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


class ReportCoalescer:
    """Decides which metric reports reach Ray Train, so that reporting never stalls training.

    Ray Train V2 takes reports from a one-slot queue emptied once per poll (2 s), so a metrics-
    only report less than ``min_interval_s`` after the last one is held back and merged into
    the next (later keys winning). A report with a checkpoint or held-out metrics (``eval_*``)
    always goes out with what was held, so the run's final report loses nothing. ``report`` is
    a collective: the elapsed time is agreed over the ranks (``agree``) and every rank decides
    alike. See docs/train.md, "Metrics".
    """

    def __init__(
        self,
        min_interval_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        agree: Callable[[float], float] = _max_over_ranks,
    ) -> None:
        if min_interval_s is None:
            min_interval_s = float(os.environ.get(POLL_INTERVAL_ENV, "2.0"))
        self.min_interval_s = min_interval_s
        self._clock = clock
        self._agree = agree
        self._last: float | None = None
        self._held: dict[str, Any] = {}

    def offer(self, metrics: dict[str, Any], checkpoint: bool = False) -> dict[str, Any] | None:
        """The metrics to report now (held-back ones merged in), or None to hold them back."""
        urgent = checkpoint or any(str(k).startswith("eval_") for k in metrics)
        if not urgent and self._last is not None:
            if self._agree(self._clock() - self._last) < self.min_interval_s:
                self._held.update(metrics)
                return None
        out = {**self._held, **metrics}
        self._held = {}
        self._last = self._clock()
        return out


class RaySession:
    """A Ray Train worker (V2 API); metric reports coalesced by :class:`ReportCoalescer`."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.world_rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()
        self._reports = ReportCoalescer()
        self._last_preemption_check: float | None = None

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

        # a checkpoint report is one on every rank (``name`` is), whether or not this rank
        # holds a part: the ranks must take the same branch, the agreement is a collective
        metrics = self._reports.offer(
            metrics, checkpoint=checkpoint_dir is not None or name is not None
        )
        if metrics is None:
            return
        checkpoint = (
            ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        )
        ray.train.report(
            metrics, checkpoint=checkpoint, checkpoint_dir_name=name if checkpoint else None
        )
        if checkpoint_dir is not None or name is not None:
            hold_after_checkpoint(self.world_rank)

    def dataset_shard(self, name: str) -> Any | None:
        import ray.train

        try:
            return ray.train.get_dataset_shard(name)
        except KeyError:
            return None

    def preemption_notice(self) -> bool:
        """Ray Train V2's drain notice (``get_preemption_info``, a collective of all ranks).

        Ray's ``PreemptionWatcher`` polls the GCS for draining nodes (a cloud provider's
        reclaim notice reaches Ray as a drain with a deadline; ``ray drain-node`` makes
        one by hand) and marks the workers of the run; rank 0's view is broadcast. That
        broadcast is a Ray actor round trip (2.5 ms measured on 2 CPU workers, against
        0.25 ms for a gloo all-reduce), so it is asked at most every
        :data:`PREEMPTION_CHECK_INTERVAL_S` of agreed time; a reclaim notice gives 30 s
        (GCP) to 2 min (AWS).
        """
        import ray.train

        now = time.monotonic()
        if self._last_preemption_check is not None:
            if _max_over_ranks(now - self._last_preemption_check) < PREEMPTION_CHECK_INTERVAL_S:
                return False
        self._last_preemption_check = now
        return ray.train.get_preemption_info() is not None


class LocalSession:
    """One process, no Ray: checkpoints are directories under ``run_dir/checkpoints``."""

    world_rank = 0
    world_size = 1
    local_rank = 0

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.checkpoint_root = self.run_dir / "checkpoints"
        self.reports: list[dict[str, Any]] = []
        #: shows the steps reported (this process is the driver: a bar in a terminal)
        self.progress: Any = None

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
        if self.progress is not None and "step" in metrics:
            self.progress.set(int(metrics["step"]))
        if self.progress is not None and name == "final":
            self.progress.close()
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

    def preemption_notice(self) -> bool:
        return False  # one process, no nodes to lose

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


def init_local_process_group(use_gpu: bool = False) -> None:
    """A world-size-1 process group for a worker loop running without Ray.

    gloo for CPU tensors; with ``use_gpu`` also NCCL for CUDA tensors (DeepSpeed's ZeRO
    collectives and the loss all-reduce run on the GPU, which gloo does not cover for every
    collective).
    """
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
    dist.init_process_group(
        "cpu:gloo,cuda:nccl" if use_gpu else "gloo", rank=0, world_size=1
    )
