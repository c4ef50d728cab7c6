"""The prepared-mix contract: what a mix directory holds, and how every reader opens it.

``solar-ray data`` writes one directory per mix; training, evaluation, contamination and
the pipeline read it, all through this module. It holds ``manifest.json`` (written last:
without it a directory is not a mix; its ``kind`` is a key of :data:`LAYOUT`) and splits of
Parquet shards: ``data`` (the normalized rows, the only split of training text),
``rejects`` (:data:`REJECT_SCHEMA`) and the prepared split (``packed`` or ``tokenized``),
with the columns of :data:`LAYOUT`. Shard names carry the position of their first row in
the split (:func:`shard_name`), so the shards in name order hold the rows in mix order,
whatever number of Ray workers wrote them. Training reads the prepared split
(:func:`open_mix`; packed rows as arrays: :func:`ids_and_positions`); its held-out split of
``val_fraction`` is chosen per row by a hash of the row's content (:func:`held_out_rows`),
so a worker reading files and a Ray Data filter agree on it without coordination. Locations are local paths or URIs (:mod:`solar_ray.fs`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from solar_ray.errors import UserError
from solar_ray.fs import arrow_filesystem, parquet_files, qualify

__all__ = [
    "DATA_MANIFEST",
    "LAYOUT",
    "MESSAGE_TYPE",
    "REJECT_SCHEMA",
    "SPLITS",
    "TEXT_SPLIT",
    "DataError",
    "KindLayout",
    "MixInfo",
    "held_out_mask",
    "held_out_rows",
    "ids_and_positions",
    "is_finished",
    "load_table",
    "open_mix",
    "positions_for",
    "read_files",
    "read_mix_manifest",
    "shard_files",
    "shard_name",
    "write_shard",
]

DATA_MANIFEST = "manifest.json"
SPLITS = ("data", "rejects", "packed", "tokenized")
TEXT_SPLIT = "data"

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
_I32, _STR = pa.list_(pa.int32()), pa.string()
_SOURCE = pa.field("source", _STR)
REJECT_SCHEMA = pa.schema([(c, _STR) for c in ("source", "ref", "step", "reason", "detail", "raw")])


@dataclass(frozen=True)
class KindLayout:
    """A kind's ``data`` and prepared split, and what training reads: the first of
    ``train_parts`` present, which must have ``train_columns``."""

    data: pa.Schema
    prepared_split: str
    prepared: pa.Schema
    train_parts: tuple[str, ...]
    train_columns: tuple[str, ...]


LAYOUT: dict[str, KindLayout] = {
    # packed: every row exactly seq_len tokens, EOS after each document, positions restart
    "pretrain": KindLayout(
        pa.schema([("text", _STR), _SOURCE]),
        "packed", pa.schema([("input_ids", _I32), ("position_ids", _I32)]),
        ("packed",), ("input_ids",),
    ),
    # tokenized: assistant_masks 0/1, labels -100 off the assistant turns
    "sft": KindLayout(
        pa.schema([("messages", pa.list_(MESSAGE_TYPE)), _SOURCE]),
        "tokenized", pa.schema([("input_ids", _I32), ("assistant_masks", _I32), ("labels", _I32), _SOURCE]),
        ("tokenized",), ("input_ids", "labels"),
    ),
    # tokenized: the prompt chat-templated (generation prompt included); data/ keeps it raw
    "preference": KindLayout(
        pa.schema([("prompt", _STR), ("chosen", _STR), ("rejected", _STR), ("system", _STR), _SOURCE]),
        "tokenized", pa.schema([("prompt", _STR), ("chosen", _STR), ("rejected", _STR), _SOURCE]),
        ("tokenized", "data"), ("prompt", "chosen", "rejected"),
    ),
}  # fmt: skip


class DataError(UserError):
    """A mix is missing, unfinished, of the wrong kind or malformed; names the field and path."""


# --------------------------------------------------------------------------- writing


def shard_name(first_row: int) -> str:
    """The name of a shard whose first row is row ``first_row`` of its split."""
    return f"part-{first_row:012d}.parquet"


def write_shard(table: pa.Table, directory: str | os.PathLike, name: str) -> str:
    """Write ``table`` to ``directory/name`` (through a temporary file); return the path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / name
    tmp = d / f".{name}.tmp-{os.getpid()}"
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)
    return str(path)


# --------------------------------------------------------------------------- reading


def _is_dir(fs: Any, path: str) -> bool:
    import pyarrow.fs as pafs

    return fs.get_file_info(path).type == pafs.FileType.Directory


def read_mix_manifest(path: str | os.PathLike, field: str | None = None) -> dict[str, Any]:
    """The ``manifest.json`` of a mix (local path or URI); DataError naming ``field`` if none."""
    where = f"{field}: " if field else ""
    p = str(path).rstrip("/")
    fs, root = arrow_filesystem(p)
    if not _is_dir(fs, root):
        raise DataError(f"{where}prepared mix not found: {p} (make one with `solar-ray data`)")
    try:
        with fs.open_input_stream(f"{root}/{DATA_MANIFEST}") as f:
            return json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise DataError(
            f"{where}{p} has no {DATA_MANIFEST} (not a finished mix; make one with `solar-ray "
            "data`)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{where}{p}/{DATA_MANIFEST} is not valid JSON: {e}") from None


def is_finished(path: str | os.PathLike) -> bool:
    """Whether a local directory is a finished data output (its manifest exists)."""
    return (Path(path) / DATA_MANIFEST).is_file()


def shard_files(path: str | os.PathLike, split: str) -> list[str]:
    """The shards of a split, in order, named like ``path`` (URIs stay URIs)."""
    p = str(path).rstrip("/")
    fs, root = arrow_filesystem(f"{p}/{split}")
    if not _is_dir(fs, root):
        raise DataError(f"{p} has no {split!r} split")
    return [qualify(f, p) for f in parquet_files(fs, root)]


def read_files(files: list[str], where: str, columns: list[str] | None = None) -> pa.Table:
    """Shards (paths inside the filesystem of ``where``) as one Arrow table, in order."""
    fs, _ = arrow_filesystem(where)
    tables = [pq.read_table(f, columns=columns, filesystem=fs, memory_map=True) for f in files]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def load_table(path: str | os.PathLike, split: str = "data") -> pa.Table:
    """A whole split as one Arrow table, rows in mix order (no Ray; for small data and tests)."""
    read_mix_manifest(path)
    files = shard_files(path, split)
    if not files:
        raise DataError(f"{path}/{split} holds no shards")
    return read_files(files, str(path))


def _to_matrix(column: Any, seq_len: int) -> np.ndarray:
    arr = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    flat = arr.values.to_numpy(zero_copy_only=False)
    if len(flat) != len(arr) * seq_len:
        raise DataError(f"seq_len: packed rows are not all {seq_len} tokens long")
    return flat.reshape(len(arr), seq_len).astype(np.int64, copy=False)


def positions_for(input_ids: np.ndarray) -> np.ndarray:
    """Position ids of packed rows written without them: 0..seq_len-1 in every row."""
    return np.broadcast_to(np.arange(input_ids.shape[1]), input_ids.shape).copy()


def ids_and_positions(table: Any, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """A packed table's ``input_ids`` and ``position_ids`` (0..seq_len-1 when it has none)."""
    ids = _to_matrix(table.column("input_ids"), seq_len)
    if "position_ids" in table.column_names:
        return ids, _to_matrix(table.column("position_ids"), seq_len)
    return ids, positions_for(ids)


@dataclass(frozen=True)
class MixInfo:
    """A prepared mix found on storage: its manifest and the shard files of one part."""

    path: str
    kind: str
    part: str  # the split the shards are in (packed, tokenized, data)
    manifest: dict[str, Any]
    files: tuple[str, ...]  # absolute paths inside ``filesystem``
    num_rows: int
    fingerprint: str  # sha256 over the manifest and the shard names and sizes

    @property
    def filesystem(self) -> Any:
        """The ``pyarrow.fs`` filesystem ``files`` live on."""
        return arrow_filesystem(self.path)[0]

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """All rows of the part as one Arrow table, in mix order."""
        return read_files(list(self.files), self.path, columns)

    def lineage(self) -> dict[str, Any]:
        """What ``solar.json`` records about this input."""
        return {"kind": "data", "path": self.path, "mix_kind": self.kind, "sha256": self.fingerprint,
                "num_rows": self.num_rows}  # fmt: skip


def open_mix(
    path: str, expected_kind: str, field: str = "data", part: str | None = None
) -> MixInfo:
    """Open a prepared mix and check its kind, its shards and their columns.

    ``field`` names the config field in error messages; ``part`` overrides the split read
    (e.g. ``data`` for an SFT mix's raw messages).
    """
    manifest = read_mix_manifest(path, field)
    kind = manifest.get("kind")
    if kind != expected_kind:
        raise DataError(
            f"{field}: {path} is a {kind!r} mix; this stage needs a {expected_kind!r} mix"
        )
    layout = LAYOUT[expected_kind]
    parts = (part,) if part else layout.train_parts
    fs, root = arrow_filesystem(path)
    files: list[str] = []
    for sub in parts:
        files = parquet_files(fs, f"{root}/{sub}")
        if files:
            break
    if not files:
        where = " or ".join(f"{path}/{p}/" for p in parts)
        raise DataError(f"{field}: {where} has no Parquet shards")
    num_rows = 0
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode())
    for i, file in enumerate(files):
        with fs.open_input_file(file) as f:
            meta = pq.ParquetFile(f)
            num_rows += meta.metadata.num_rows
            names = set(meta.schema_arrow.names)
            if i == 0 and part is None and (missing := set(layout.train_columns) - names):
                raise DataError(
                    f"{field}: {file} lacks column(s) {sorted(missing)} of a prepared "
                    f"{expected_kind} mix (has {sorted(names)})"
                )
            size = f.size()
        digest.update(f"{file.rsplit('/', 1)[-1]}:{size}\n".encode())
    if num_rows == 0:
        raise DataError(f"{field}: {path}/{sub}/ holds no rows")
    return MixInfo(path, kind, sub, manifest, tuple(files), num_rows, digest.hexdigest())


# --------------------------------------------------------------------------- held-out split

#: the column whose content decides a row's side, the first one a table has
HELD_OUT_KEYS = ("input_ids", "prompt", "messages")


def _hash_fraction(raw: bytes) -> float:
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little") / 2**64


def held_out_mask(column: pa.ChunkedArray | pa.Array, fraction: float) -> np.ndarray:
    """Boolean mask of the rows in the held-out split: a hash of each row's content < fraction.

    A list-of-integers column (token ids) hashes its values as int64; any other column the
    ``str`` of each value. The choice is deterministic per row, so every reader (a worker
    reading files, a Ray Data ``filter``) puts the same rows on the same side.
    """
    n = len(column)
    if fraction <= 0 or n == 0:
        return np.zeros(n, dtype=bool)
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    out = np.empty(n, dtype=np.float64)
    t = arr.type
    if (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(t.value_type):
        offsets = arr.offsets.to_numpy()
        flat = arr.values.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        for i in range(n):
            out[i] = _hash_fraction(flat[offsets[i] : offsets[i + 1]].tobytes())
    else:
        for i, v in enumerate(arr.to_pylist()):
            out[i] = _hash_fraction(str(v).encode("utf-8"))
    return out < fraction


def held_out_rows(table: pa.Table, fraction: float, *, require: bool = False) -> np.ndarray:
    """The held-out rows of a mix table (``val_fraction``), keyed on its first
    :data:`HELD_OUT_KEYS` column; ``require``: a split that holds out no row is an error."""
    key = next((k for k in HELD_OUT_KEYS if k in table.column_names), None)
    if key is None:
        raise DataError(f"val_fraction: the rows have none of the columns {list(HELD_OUT_KEYS)}")
    mask = held_out_mask(table.column(key), fraction)
    if require and fraction > 0 and not mask.any():
        raise DataError(f"val_fraction: {fraction} of {len(mask)} rows holds out none")
    return mask
