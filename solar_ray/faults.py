"""Fault-injection points for the tests: environment variables a run reads, no-ops unset.

Only tests set them, to stop a worker or a node at a known step, or to count the rows a
run trained on, instead of racing the training loop. :data:`HOLD_ENV`: a directory; while
``<dir>/hold`` exists, a worker that has just reported a checkpoint writes
``<dir>/held-<rank>`` and waits (removing it when it goes on). :data:`ROW_LOG_ENV`: a
directory; each rank of a (non-streaming) pretrain run appends the rows of every step to
``<dir>/rows-<rank>-<pid>.jsonl``.
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
