"""Small Ray Data helpers shared by the mix and preparation passes, and the split writer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from solar_ray.data.contract import shard_name, write_shard

_CACHE: dict[str, Any] = {}
_CACHE_LIMIT = 16


@contextlib.contextmanager
def ordered_context() -> Iterator[None]:
    """Datasets created inside keep row order through every operator (``preserve_order``).

    The sorts of the pipeline (by a rank with known boundaries) run as Ray's task-based
    pull sort shuffle rather than the default actor-based one, which costs seconds of actor
    start-up per sort on small clusters; a strategy the caller set explicitly (anything but
    the default) is kept. Each Dataset snapshots the DataContext when it is created, so the
    settings stick to the datasets made here; the global context is restored afterwards.
    """
    import ray.data
    from ray.data.context import ShuffleStrategy

    ctx = ray.data.DataContext.get_current()
    before = (ctx.execution_options.preserve_order, ctx.shuffle_strategy)
    ctx.execution_options.preserve_order = True
    if ctx.shuffle_strategy == ShuffleStrategy.SHUFFLE_V2:
        ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.shuffle_strategy = before


def task_pool(num_workers: int | None) -> Any:
    """``compute=`` for a task-based ``map_batches``: at most ``num_workers`` at a time."""
    if num_workers is None:
        return None
    from ray.data import TaskPoolStrategy

    return TaskPoolStrategy(size=num_workers)


def share(obj: Any) -> list:
    """Put ``obj`` in the object store; the returned holder goes into ``fn_kwargs``."""
    import ray

    return [ray.put(obj)]


def fetch(holder: list) -> Any:
    """The object behind a :func:`share` holder, fetched once per worker process."""
    import ray

    ref = holder[0]
    key = ref.hex()
    if key not in _CACHE:
        if len(_CACHE) >= _CACHE_LIMIT:
            _CACHE.clear()
        _CACHE[key] = ray.get(ref)
    return _CACHE[key]


def collect(ds: Any, columns: dict[str, pa.DataType]) -> pa.Table:
    """Some columns of a dataset as one Arrow table on the driver (block order kept).

    ``columns`` maps names to types, so an empty dataset still gives typed columns.
    """
    import ray

    schema = pa.schema(list(columns.items()))
    refs = ds.select_columns(list(columns)).to_arrow_refs()
    tables = [t.select(list(columns)).cast(schema) for t in ray.get(refs) if t.num_rows]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def execute(ds: Any) -> pa.Table:
    """Run a (small-output) dataset to the end and return its rows as one Arrow table."""
    import ray

    tables = [t for t in ray.get(ds.materialize().to_arrow_refs()) if t.num_rows]
    return pa.concat_tables(tables) if tables else pa.table({})


def sort_by_rank(ds: Any, column: str, total: int, rows_per_part: int) -> Any:
    """Sort by an integer rank column ``0..total-1`` into parts of ``rows_per_part`` rows.

    The boundaries are known, so Ray skips its sampling pass and the partitioning does not
    depend on the number of workers.
    """
    parts = max(1, -(-total // rows_per_part))
    boundaries = [rows_per_part * k for k in range(1, parts)] or [max(total, 1)]
    return ds.sort(column, boundaries=boundaries)


def column_np(table: pa.Table, name: str, dtype: Any) -> np.ndarray:
    """A column as a numpy array of ``dtype`` (nulls are not expected)."""
    col = table.column(name)
    if col.num_chunks == 0:
        return np.empty(0, dtype=dtype)
    return col.to_numpy().astype(dtype, copy=False)


def write_ranked(batch: pa.Table, directory: str, rank_col: str, columns: list[str]) -> pa.Table:
    """Write a batch of ranked rows as one shard named by its first rank; return its stats."""
    if batch.num_rows == 0:
        return pa.table({"file": pa.array([], pa.string()), "num_rows": pa.array([], pa.int64())})
    batch = batch.take(pc.sort_indices(batch, [(rank_col, "ascending")]))
    name = shard_name(int(batch.column(rank_col)[0].as_py()))
    write_shard(batch.select(columns), directory, name)
    return pa.table({"file": [name], "num_rows": pa.array([batch.num_rows], pa.int64())})


def write_split(
    ds: Any, directory: Path, rank_col: str, schema: pa.Schema, num_workers: int | None
) -> int:
    """Write a dataset of ranked rows as the shards of one split; return the rows written.

    Each block becomes a shard named by its first rank (blocks of a rank-sorted dataset hold
    consecutive ranks), so the shards in name order hold the rows in rank order.
    """
    with ordered_context():
        stats = execute(
            ds.map_batches(
                write_ranked,
                batch_size=None,
                batch_format="pyarrow",
                fn_kwargs={
                    "directory": str(directory),
                    "rank_col": rank_col,
                    "columns": schema.names,
                },
                compute=task_pool(num_workers),
            )
        )
    finish_split(directory, schema)
    return int(pc.sum(stats.column("num_rows")).as_py() or 0) if stats.num_rows else 0


def num_files(directory: Path) -> int:
    """The shards of a split written on this machine."""
    return len(list(directory.glob("part-*.parquet")))


def finish_split(directory: Path, schema: pa.Schema) -> None:
    """Give an empty split one empty shard, so readers always find its schema."""
    directory.mkdir(parents=True, exist_ok=True)
    if not any(directory.glob("part-*.parquet")):
        write_shard(schema.empty_table(), directory, shard_name(0))
