"""Readers: JSONL, JSON, Parquet and CSV from local paths and URIs, record by record.

Paths go through fsspec (:func:`solar_ray.fs.fsspec_filesystem`), so ``s3://``, ``gs://``,
``hf://datasets/...`` (huggingface_hub's filesystem) and ``file://`` work wherever their
filesystem package is installed (s3/gs/hdfs also without s3fs/gcsfs, through pyarrow).
Compressed files (``.gz``, ``.bz2``, ``.xz``) are read through fsspec's
``compression="infer"``, ``.zst`` (every frame) through ``zstandard`` directly. Besides the data stage's file types, ``text`` reads a plain text
file as one record per blank-line-separated paragraph (evaluation's ``.txt``/``.md``).

:func:`iter_records` never raises on a bad *row*: it yields a :class:`Record` whose
``reason`` says why the row is unusable (``invalid_json``, ``undecodable_text``,
``malformed_csv_row``), and a file that cannot be read at all yields one ``unreadable_file``
record. Only a bad *path* in the config (:func:`expand_paths`) is an error.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from solar_ray.errors import UserError
from solar_ray.fs import fsspec_filesystem, qualify

__all__ = [
    "FILE_TYPES",
    "Record",
    "SourceError",
    "TEXT_FILE_TYPES",
    "detect_file_type",
    "expand_paths",
    "iter_records",
]

#: file extensions each file type is recognised by (after a compression suffix)
FILE_TYPES: dict[str, tuple[str, ...]] = {
    "jsonl": (".jsonl", ".ndjson", ".jsonlines"),
    "json": (".json",),
    "parquet": (".parquet", ".pq"),
    "csv": (".csv",),
}
#: what evaluation reads: those and plain text (``text``, a record per paragraph)
TEXT_FILE_TYPES: dict[str, tuple[str, ...]] = {**FILE_TYPES, "text": (".txt", ".md")}
_COMPRESSION = (".gz", ".zst", ".bz2", ".xz")
_GLOB_CHARS = "*?["
RAW_PREVIEW_CHARS = 1000
_PARQUET_BATCH = 2048


class SourceError(UserError):
    """A configured path cannot be read; the message names the config field and the path."""


@dataclass(frozen=True)
class Record:
    """One row of a file: its index, the parsed mapping, or why it could not be parsed."""

    index: int
    """0-based record index (for JSONL/CSV: the line/record number minus one)"""
    data: dict[str, Any] | None
    reason: str | None = None
    detail: str | None = None
    raw: str | None = None


def _strip_compression(name: str) -> str:
    low = name.lower()
    for suffix in _COMPRESSION:
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return name


def detect_file_type(path: str, types: dict[str, tuple[str, ...]] = FILE_TYPES) -> str | None:
    """The file type (a key of ``types``) from the extension, or None when unknown."""
    name = _strip_compression(path.rsplit("/", 1)[-1]).lower()
    for file_type, exts in types.items():
        if name.endswith(exts):
            return file_type
    return None


def expand_paths(
    patterns: list[str], field: str = "path", types: dict[str, tuple[str, ...]] = FILE_TYPES
) -> list[str]:
    """Expand paths, globs and directories into a sorted list of files.

    A directory contributes every file inside it (recursively) of one of ``types``. A
    pattern that matches nothing is a :class:`SourceError` naming ``field``.
    """
    out: list[str] = []
    for pattern in patterns:
        fs, path = fsspec_filesystem(pattern)
        try:
            if any(c in path for c in _GLOB_CHARS):
                found = sorted(p for p in fs.glob(path) if fs.isfile(p))
            elif fs.isdir(path):
                found = sorted(p for p in fs.find(path) if detect_file_type(p, types) is not None)
            elif fs.exists(path):
                found = [path]
            else:
                found = []
        except Exception as e:
            raise SourceError(
                f"{field}: cannot list {pattern!r}: {type(e).__name__}: {e}"
            ) from None
        if not found:
            raise SourceError(f"{field}: {pattern!r} matches no files")
        out.extend(qualify(p, pattern) for p in found)
    seen: set[str] = set()
    return [p for p in out if not (p in seen or seen.add(p))]


def _preview(raw: bytes | str) -> str:
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    return raw[:RAW_PREVIEW_CHARS]


def _record(index: int, obj: Any, text_key: str | None, raw: bytes | str | None = None) -> Record:
    """A parsed JSON value as a record: an object, or a string under ``text_key`` when set."""
    if isinstance(obj, dict):
        return Record(index, obj)
    if isinstance(obj, str) and text_key:
        return Record(index, {text_key: obj})
    if raw is None:
        raw = json.dumps(obj, default=str)
    return Record(
        index, None, "invalid_json", f"a {type(obj).__name__}, not an object", _preview(raw)
    )


def _parse_object(text: str, index: int, raw: bytes | str, text_key: str | None) -> Record:
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        return Record(index, None, "invalid_json", str(e)[:200], _preview(raw))
    return _record(index, obj, text_key, raw)


def _iter_jsonl(f: Any, text_key: str | None = None) -> Iterator[Record]:
    for index, line in enumerate(f):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield Record(
                index, None, "undecodable_text", f"not UTF-8 at byte {e.start}", _preview(line)
            )
            continue
        yield _parse_object(text, index, line, text_key)


def _iter_json(f: Any, text_key: str | None = None) -> Iterator[Record]:
    blob = f.read()
    try:
        text = blob.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        yield Record(
            -1,
            None,
            "undecodable_text",
            f"file is not UTF-8 at byte {e.start}",
            _preview(blob[:200]),
        )
        return
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        # many ".json" files are JSON Lines
        yield from _iter_jsonl(io.BytesIO(blob), text_key)
        return
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(obj) == 1 and len(lists) == 1:  # {"data": [...]}
            obj = lists[0]
        else:
            obj = [obj]
    if not isinstance(obj, list):
        yield Record(
            -1, None, "invalid_json", f"top level is a {type(obj).__name__}", _preview(text[:200])
        )
        return
    for index, item in enumerate(obj):
        yield _record(index, item, text_key)


def _iter_parquet(f: Any, text_key: str | None = None) -> Iterator[Record]:
    import pyarrow.parquet as pq

    index = 0
    for batch in pq.ParquetFile(f).iter_batches(batch_size=_PARQUET_BATCH):
        for row in batch.to_pylist():
            yield Record(index, row)
            index += 1


def _has_surrogates(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _iter_csv(f: Any, text_key: str | None = None) -> Iterator[Record]:
    text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.DictReader(text)
    index = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield Record(index, None, "malformed_csv_row", str(e)[:200])
            index += 1
            continue
        raw = ",".join(str(v) for v in row.values())
        if None in row or any(v is None for v in row.values()):
            yield Record(
                index,
                None,
                "malformed_csv_row",
                "wrong number of fields",
                _preview(raw.encode("utf-8", "replace")),
            )
        elif any(isinstance(v, str) and _has_surrogates(v) for v in row.values()):
            yield Record(
                index,
                None,
                "undecodable_text",
                "not UTF-8",
                _preview(raw.encode("utf-8", "surrogateescape")),
            )
        else:
            yield Record(index, dict(row))
        index += 1


def _iter_text(f: Any, text_key: str | None = None) -> Iterator[Record]:
    """Plain text: one record ``{text_key: paragraph}`` per blank-line-separated paragraph."""
    blob = f.read()
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as e:
        yield Record(-1, None, "undecodable_text", f"file is not UTF-8 at byte {e.start}",
                     _preview(blob[:200]))  # fmt: skip
        return
    paragraphs = (p.strip() for p in text.replace("\r\n", "\n").replace("\r", "\n").split("\n\n"))
    for index, paragraph in enumerate(p for p in paragraphs if p):
        yield Record(index, {text_key or "text": paragraph})


_READERS = {"jsonl": _iter_jsonl, "json": _iter_json, "parquet": _iter_parquet, "csv": _iter_csv,
            "text": _iter_text}  # fmt: skip


def _open(fs: Any, inner: str, file_type: str) -> Any:
    """A binary file object of ``inner``, decompressed by its suffix (parquet: as is)."""
    if file_type != "parquet" and inner.lower().endswith(".zst"):
        # fsspec's zstandard reader cannot iterate lines and stops after the first frame
        # (``zstd`` writes one per block in streaming mode): decompress every frame, buffered
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(
            fs.open(inner, "rb"), read_across_frames=True, closefd=True
        )
        return io.BufferedReader(reader)
    return fs.open(inner, "rb", compression=None if file_type == "parquet" else "infer")


def iter_records(path: str, file_type: str = "auto", text_key: str | None = None) -> Iterator[Record]:
    """Yield every record of one file; bad rows and unreadable files become reasons, not errors.

    ``file_type`` is one of :data:`FILE_TYPES` or ``text`` (paragraphs); ``auto`` tells it
    from the extension. ``text_key``: a JSON string where a record is expected becomes the
    record ``{text_key: string}`` (evaluation's text lists) instead of an ``invalid_json`` row.
    """
    if file_type == "auto":
        file_type = detect_file_type(path) or "jsonl"
    reader = _READERS[file_type]
    try:
        fs, inner = fsspec_filesystem(path)
        with _open(fs, inner, file_type) as f:
            yield from reader(f, text_key)
    except Exception as e:  # a corrupt or vanished file: one quarantined record, the job goes on
        yield Record(-1, None, "unreadable_file", f"{type(e).__name__}: {str(e)[:200]}")
