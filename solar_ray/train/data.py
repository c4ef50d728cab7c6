"""Reading prepared data mixes (local paths or URIs) for the training stages.

A prepared mix (made by ``solar-ray data``) is a directory with ``manifest.json`` (its
``kind`` is ``pretrain``, ``sft`` or ``preference``) and Parquet shards:

- pretrain: ``packed/part-*.parquet`` with ``input_ids`` and ``position_ids``, every row
  exactly ``seq_len`` long (EOS between documents, positions restarting per document);
- sft: ``tokenized/part-*.parquet`` with ``input_ids``, ``assistant_masks`` and ``labels``
  (-100 outside assistant turns), and ``data/*.parquet`` with ``messages``;
- preference: ``prompt`` (chat-templated, ending in the generation prompt), ``chosen`` and
  ``rejected``, read from ``tokenized/`` when the mix has it (``solar-ray data`` keeps the
  untemplated prompts in ``data/``), else from ``data/``.

Paths go through ``pyarrow.fs`` so ``s3://`` and ``gs://`` work like local directories.
The held-out split is chosen per row by a hash of the row's content, so the file readers
and the Ray Data stream agree on it without coordination.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from solar_ray.errors import UserError

__all__ = [
    "DataError",
    "MixInfo",
    "arrow_filesystem",
    "held_out_mask",
    "open_mix",
    "read_rows",
]

#: the Parquet subdirectories (first one present wins) and required columns per mix kind
LAYOUT: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "pretrain": (("packed",), ("input_ids",)),
    "sft": (("tokenized",), ("input_ids", "labels")),
    "preference": (("tokenized", "data"), ("prompt", "chosen", "rejected")),
}


class DataError(UserError):
    """A prepared mix is missing, of the wrong kind or malformed; names the field and path."""


def arrow_filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and in-filesystem path of a local path or URI.

    Training reads shards and writes run markers through pyarrow (what Ray Train's own
    storage uses); :func:`solar_ray.data.sources.filesystem_for` is the data stage's fsspec
    counterpart, which also reads hf:// and http(s):// sources.
    """
    if "://" not in path:
        from pathlib import Path

        return pafs.LocalFileSystem(), str(Path(path).expanduser().absolute())
    try:
        return pafs.FileSystem.from_uri(path)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
        raise DataError(f"cannot open {path!r}: {e}") from None


@dataclass(frozen=True)
class MixInfo:
    """A prepared mix found on storage: its manifest and the shard files of one part."""

    path: str
    kind: str
    part: str  # the subdirectory the shards are in (packed, tokenized, data)
    manifest: dict[str, Any]
    files: tuple[str, ...]  # absolute paths inside ``filesystem``
    num_rows: int
    fingerprint: str  # sha256 over the manifest and the shard names and sizes

    @property
    def filesystem(self) -> pafs.FileSystem:
        """The filesystem ``files`` live on."""
        return arrow_filesystem(self.path)[0]

    def lineage(self) -> dict[str, Any]:
        """What ``solar.json`` records about this input."""
        return {"kind": "data", "path": self.path, "mix_kind": self.kind, "sha256": self.fingerprint,
                "num_rows": self.num_rows}  # fmt: skip


def open_mix(
    path: str, expected_kind: str, field: str = "data", part: str | None = None
) -> MixInfo:
    """Open a prepared mix and check its kind, its shards and their columns.

    ``field`` names the config field in error messages; ``part`` overrides the Parquet
    subdirectory (e.g. ``data`` for an SFT mix's raw messages).
    """
    fs, root = arrow_filesystem(path)
    info = fs.get_file_info(root)
    if info.type != pafs.FileType.Directory:
        raise DataError(f"{field}: prepared mix not found: {path} (make one with `solar-ray data`)")
    try:
        with fs.open_input_stream(f"{root}/manifest.json") as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise DataError(f"{field}: {path} has no manifest.json (not a prepared mix)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{field}: {path}/manifest.json is not valid JSON: {e}") from None
    kind = manifest.get("kind")
    if kind != expected_kind:
        raise DataError(
            f"{field}: {path} is a {kind!r} mix; this stage needs a {expected_kind!r} mix"
        )
    parts, columns = LAYOUT[expected_kind]
    files: list[str] = []
    for sub in (part,) if part else parts:
        selector = pafs.FileSelector(f"{root}/{sub}", allow_not_found=True, recursive=True)
        files = sorted(
            fi.path for fi in fs.get_file_info(selector)
            if fi.type == pafs.FileType.File and fi.path.endswith(".parquet")
        )  # fmt: skip
        if files:
            break
    if not files:
        where = " or ".join(f"{path}/{p}/" for p in ((part,) if part else parts))
        raise DataError(f"{field}: {where} has no Parquet shards")
    num_rows = 0
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode())
    for i, file in enumerate(files):
        with fs.open_input_file(file) as f:
            meta = pq.ParquetFile(f)
            num_rows += meta.metadata.num_rows
            if i == 0:
                names = set(meta.schema_arrow.names)
                missing = [c for c in columns if c not in names]
                if part is None and missing:
                    raise DataError(
                        f"{field}: {file} lacks column(s) {missing} of a prepared "
                        f"{expected_kind} mix (has {sorted(names)})"
                    )
            size = f.size()
        digest.update(f"{file.rsplit('/', 1)[-1]}:{size}\n".encode())
    if num_rows == 0:
        raise DataError(f"{field}: {path}/{sub}/ holds no rows")
    return MixInfo(path, kind, sub, manifest, tuple(files), num_rows, digest.hexdigest())


def read_rows(mix: MixInfo, columns: list[str] | None = None) -> pa.Table:
    """All rows of a mix part as one Arrow table (memory-mapped where the filesystem allows)."""
    fs = mix.filesystem
    tables = [pq.read_table(f, columns=columns, filesystem=fs) for f in mix.files]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def _hash_fraction(raw: bytes) -> float:
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little") / 2**64


def held_out_mask(column: pa.ChunkedArray | pa.Array, fraction: float) -> np.ndarray:
    """Boolean mask of the rows in the held-out split: a hash of each row's content < fraction.

    ``column`` is a list-of-integers column (token ids) or a string column. The choice is
    deterministic per row, so every reader (a worker reading files, a Ray Data ``filter``)
    puts the same rows on the same side.
    """
    n = len(column)
    if fraction <= 0 or n == 0:
        return np.zeros(n, dtype=bool)
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    out = np.empty(n, dtype=np.float64)
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        offsets = arr.offsets.to_numpy()
        flat = arr.values.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        for i in range(n):
            out[i] = _hash_fraction(flat[offsets[i] : offsets[i + 1]].tobytes())
    else:
        for i, v in enumerate(arr.to_pylist()):
            out[i] = _hash_fraction(str(v).encode("utf-8"))
    return out < fraction
