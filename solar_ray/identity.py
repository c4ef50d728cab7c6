"""Artifact identity: "is this output done, and made from these inputs?", one rule set.

Everything that skips work already done asks here. :func:`config_key` hashes what a config
computes (leaving out the caller's operational fields), :func:`dir_signature` is a cheap
identity of a directory of inputs (names, sizes, mtimes), :func:`content_hash` the sha256 of
a model's weights and config (from its files' hashes: :func:`sha256_file`,
:func:`recorded_sha256`, :func:`model_fingerprint`; hashed off the critical path with
:func:`in_background`), and :func:`key` combines them. A finished artifact is named by its
manifests (:func:`artifact_id`) and records its input key inside itself (:func:`record`,
:func:`recorded_key`), which keeps working when it moves or lives in object storage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from solar_ray.checkpoint import OUTPUT_MARKER, read_json_file, write_json_atomic
from solar_ray.fs import cache_dir

__all__ = [
    "MANIFEST_NAMES",
    "artifact_id",
    "config_key",
    "content_hash",
    "dir_signature",
    "in_background",
    "key",
    "model_fingerprint",
    "output_marker",
    "record",
    "recorded_key",
    "recorded_sha256",
    "sha256_file",
]

#: the files that say what an output is (model, data mix, corpus, results, report, source)
MANIFEST_NAMES = ("solar.json", "manifest.json", "results.json", "contamination.json", "source.json")
#: the files a directory signature looks at
_SIGNED = ("*.safetensors", "*.parquet", "*.json", "*.jsonl", "*.model", "*.txt")
_KEY_LEN = 16
_HASH_CHUNK = 8 << 20
T = TypeVar("T")


def _digest(data: Any, length: int = _KEY_LEN) -> str:
    blob = json.dumps(data, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def config_key(data: Mapping[str, Any], ignore: Iterable[str] = (), length: int = _KEY_LEN) -> str:
    """sha256 of ``data``'s canonical JSON without the top-level fields in ``ignore``."""
    skip = set(ignore)
    return _digest({k: v for k, v in data.items() if k not in skip}, length)


def key(*parts: Any, length: int = _KEY_LEN) -> str:
    """One key from several JSON-able parts (config keys, signatures, values)."""
    return _digest(list(parts), length)


def dir_signature(path: str | Path, recursive: bool = False) -> str:
    """Names, sizes and mtimes of the weight, config, tokenizer and data files of ``path``.

    Cheap (nothing is read): a changed, added or removed file changes it. A file path is
    signed alone; a missing path signs as missing. A copy of an output downloaded from
    object storage (:mod:`solar_ray.remote`) signs as the artifact it copies, so every
    node's copy of it has the same signature.
    """
    p = Path(path)
    copy = output_marker(p) if p.is_dir() else {}
    if copy.get("copy_of"):
        return key("copy", copy.get("id"), copy.get("artifact"))
    if p.is_file():
        files = [p]
    elif p.is_dir():
        globber = p.rglob if recursive else p.glob
        files = sorted({f for pattern in _SIGNED for f in globber(pattern) if f.is_file()})
    else:
        return key("missing", str(p))
    lines = []
    for f in files:
        st = f.stat()
        name = f.name if f == p else str(f.relative_to(p))
        lines.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    return key(lines)


def content_hash(path: str | Path) -> str:
    """sha256 of a model directory's weights and config (:func:`model_fingerprint`)."""
    return model_fingerprint(path)["sha256"]


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks (hashlib releases the GIL on them)."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _file_state(st: os.stat_result) -> list[int]:
    # ctime moves on every write and cannot be set back (unlike mtime), so a file rewritten
    # in place with its size and mtime restored is still seen as changed
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def recorded_sha256(path: str | Path) -> str:
    """:func:`sha256_file`, reusing the hash recorded for an unchanged file.

    The hash of each file hashed here is recorded in ``$SOLAR_RAY_CACHE/sha256/`` under its
    real path with its device, inode, size, mtime and ctime; a file whose five still match
    is not read again. A file that changed while it was read is not recorded. A cache that
    cannot be written is skipped.
    """
    real = os.path.realpath(path)
    record = cache_dir() / "sha256" / (hashlib.sha256(real.encode()).hexdigest()[:32] + ".json")
    before = _file_state(os.stat(real))
    saved = read_json_file(record) or {}
    if saved.get("path") == real and saved.get("state") == before and "sha256" in saved:
        return saved["sha256"]
    digest = sha256_file(real)
    if _file_state(os.stat(real)) == before:
        with contextlib.suppress(OSError):  # a cache: no fsync, a lost record costs a re-read
            record.parent.mkdir(parents=True, exist_ok=True)
            tmp = record.with_name(f".{record.name}.tmp-{uuid.uuid4().hex[:8]}")
            tmp.write_text(json.dumps({"path": real, "state": before, "sha256": digest}))
            os.replace(tmp, record)
    return digest


def model_fingerprint(model_dir: str | Path, file_hashes: Mapping[str, str] | None = None) -> dict:
    """Content hash of a model directory: sha256 of every weight file and of config.json.

    ``file_hashes`` supplies hashes already computed (e.g. by a writer that hashed while it
    read). Returns ``{"path", "sha256", "files": {name: sha256}}`` where ``sha256`` is the
    hash of the sorted ``name:hash`` lines, so it changes when any file changes.
    """
    model_dir = Path(model_dir)
    files: dict[str, str] = {}
    for p in sorted(model_dir.iterdir()):
        if p.is_file() and (p.suffix == ".safetensors" or p.name == "config.json"):
            files[p.name] = (file_hashes or {}).get(p.name) or recorded_sha256(p)
    combined = hashlib.sha256(
        "".join(f"{k}:{v}\n" for k, v in sorted(files.items())).encode()
    ).hexdigest()
    return {"path": str(model_dir), "sha256": combined, "files": files}


@contextlib.contextmanager
def in_background(calls: Iterable[Callable[[], T]]) -> Iterator[list[Future[T]]]:
    """Run ``calls`` one after another on a thread while the block runs (input hashes
    while a stage writes); yield their futures. Leaving the block cancels those not started
    and waits for the one running."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="solar-ray-hash")
    try:
        yield [pool.submit(call) for call in calls]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def artifact_id(path: str | Path) -> str | None:
    """The identity of a finished output: a hash of its manifests; None when it has none.

    With the write id every output's marker carries, an output that is made again gets a
    new identity (even when a deterministic stage writes the same bytes), and everything
    made from it is made again too.
    """
    p = Path(path)
    if not p.is_dir():
        return None
    h = hashlib.sha256(str(output_marker(p).get("id", "")).encode())
    found = False
    for f in sorted(p.rglob("*")):
        if f.name in MANIFEST_NAMES and f.is_file() and "rejects" not in f.parts:
            h.update(str(f.relative_to(p)).encode())
            h.update(f.read_bytes())
            found = True
    return h.hexdigest()[:_KEY_LEN] if found else None


def record(out: str | Path, input_key: str) -> None:
    """Record inside a finished output the key of the inputs it was made from.

    An output whose writer gave it no write id (a directory of several outputs, such as a
    data stage's mixes) gets one here, so that it too is a new artifact when made again.
    """
    data = output_marker(out)
    write_json_atomic(
        Path(out) / OUTPUT_MARKER, {**data, "id": data.get("id") or uuid.uuid4().hex, "input_key": input_key}
    )


def recorded_key(out: str | Path) -> str | None:
    """The input key a finished output recorded (None: none, or not an output)."""
    value = output_marker(out).get("input_key")
    return value if isinstance(value, str) else None


def output_marker(out: str | Path) -> dict[str, Any]:
    """The ``.solar-ray-output`` marker of a local output as a mapping (empty: none)."""
    return read_json_file(Path(out) / OUTPUT_MARKER) or {}
