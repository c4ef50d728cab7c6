"""Fault-injection points for the tests: environment variables a run reads, no-ops unset.

Only tests set them (``tests/test_train_ray.py``, ``tests/test_elastic.py``,
``tests/test_remote_ray.py``), so that they can kill a worker or a node at a known step, or
count the rows a run trained on, instead of racing the training loop.

:data:`HOLD_ENV` (``SOLAR_RAY_TEST_HOLD_AT_CHECKPOINT``): a directory. While ``<dir>/hold``
exists, a worker that has just reported a checkpoint writes ``<dir>/held-<rank>`` and waits
(removing it when it goes on). Called by :class:`solar_ray.train.session.RaySession` and the
Hugging Face stages' save callback (:mod:`solar_ray.train.hf`).

:data:`ROW_LOG_ENV` (``SOLAR_RAY_TEST_ROW_LOG``): a directory. Each rank of a pretrain run
(not streaming) appends the rows it trains on at every step to
``<dir>/rows-<rank>-<pid>.jsonl``. Called by :mod:`solar_ray.train.pretrain`'s loop.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["HOLD_ENV", "ROW_LOG_ENV", "hold_after_checkpoint", "row_logger"]

HOLD_ENV = "SOLAR_RAY_TEST_HOLD_AT_CHECKPOINT"
ROW_LOG_ENV = "SOLAR_RAY_TEST_ROW_LOG"


def hold_after_checkpoint(rank: int) -> None:
    """Wait while :data:`HOLD_ENV`'s ``hold`` file exists (a no-op without it)."""
    hold_dir = os.environ.get(HOLD_ENV)
    if not hold_dir:
        return
    hold = Path(hold_dir) / "hold"
    if not hold.exists():
        return
    held = Path(hold_dir) / f"held-{rank}"
    held.touch()
    while hold.exists():
        time.sleep(0.05)
    held.unlink(missing_ok=True)  # gone: this worker went on


def row_logger(rank: int, world_size: int, start_step: int) -> Callable[[int, list[int]], None] | None:
    """``log(step, rows)`` appending ``step``'s rows under :data:`ROW_LOG_ENV` (None without it)."""
    directory = os.environ.get(ROW_LOG_ENV)
    if not directory:
        return None
    path = Path(directory) / f"rows-{rank}-{os.getpid()}.jsonl"

    def log_rows(step: int, rows: list[int]) -> None:
        line = {"step": step, "start": start_step, "rank": rank, "world": world_size,
                "t": time.time(), "rows": rows}  # fmt: skip
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    return log_rows
