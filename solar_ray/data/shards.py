"""Parquet shards on disk: deterministic names, atomic-friendly writes, ordered reads.

A mix directory holds ``data/``, ``rejects/`` and, when prepared, ``packed/`` or
``tokenized/``, each a set of ``part-*.parquet`` shards, and ``manifest.json`` (written
last). Shard names carry the position of their first row in the split, zero-padded, so
reading the shards in name order gives the rows in mix order, whatever number of Ray
workers wrote them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from solar_ray.errors import UserError

__all__ = [
    "DATA_MANIFEST",
    "SPLITS",
    "DataOutputError",
    "load_table",
    "read_data_manifest",
    "shard_files",
    "write_shard",
]

DATA_MANIFEST = "manifest.json"
#: the splits a mix directory can hold
SPLITS = ("data", "rejects", "packed", "tokenized")


class DataOutputError(UserError):
    """A path is not a finished data output (no manifest) or lacks the split asked for."""


def write_shard(table: pa.Table, directory: str | os.PathLike, name: str) -> str:
    """Write ``table`` to ``directory/name`` (through a temporary file); return the path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / name
    tmp = d / f".{name}.tmp-{os.getpid()}"
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)
    return str(path)


def read_data_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The ``manifest.json`` of a mix directory (local path or URI); DataOutputError if none."""
    import fsspec

    p = str(path).rstrip("/")
    try:
        with fsspec.open(f"{p}/{DATA_MANIFEST}", "r", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataOutputError(
            f"{p} is not a finished data output (no {DATA_MANIFEST}); build it with "
            "`solar-ray data`"
        ) from None


def shard_files(path: str | os.PathLike, split: str) -> list[str]:
    """The ``part-*.parquet`` files of a split, in order."""
    from solar_ray.data.sources import filesystem_for

    fs, root = filesystem_for(f"{str(path).rstrip('/')}/{split}")
    if not fs.isdir(root):
        raise DataOutputError(f"{path} has no {split!r} split")
    files = sorted(
        p
        for p in fs.ls(root, detail=False)
        if p.rsplit("/", 1)[-1].startswith("part-") and p.endswith(".parquet")
    )
    if "://" in str(path) and not str(path).startswith("file://"):
        return [fs.unstrip_protocol(p) for p in files]
    return files


def load_table(path: str | os.PathLike, split: str = "data") -> pa.Table:
    """A whole split as one Arrow table, rows in mix order (no Ray; for small data and tests)."""
    import fsspec

    read_data_manifest(path)
    files = shard_files(path, split)
    tables = []
    for f in files:
        with fsspec.open(f, "rb") as fh:
            tables.append(pq.read_table(fh))
    if not tables:
        raise DataOutputError(f"{path}/{split} holds no shards")
    return pa.concat_tables(tables)
