"""Artifact identity: "is this output done, and made from these inputs?", one rule set.

Everything that skips work already done asks here. :func:`config_key` hashes what a config
computes (leaving out the caller's operational fields), :func:`dir_signature` is a cheap
identity of a directory of inputs (names, sizes, mtimes), :func:`content_hash` the sha256 of
a model's weights and config, and :func:`key` combines them. A finished artifact is named
by its manifests (:func:`artifact_id`) and records its input key inside itself
(:func:`record`, :func:`recorded_key`), which keeps working when it moves or lives in
object storage.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from solar_ray.checkpoint import OUTPUT_MARKER, model_fingerprint, write_json_atomic

__all__ = [
    "MANIFEST_NAMES",
    "artifact_id",
    "config_key",
    "content_hash",
    "dir_signature",
    "key",
    "output_marker",
    "record",
    "recorded_key",
]

#: the files that say what an output is (model, data mix, corpus, results, report, source)
MANIFEST_NAMES = ("solar.json", "manifest.json", "results.json", "contamination.json", "source.json")
#: the files a directory signature looks at
_SIGNED = ("*.safetensors", "*.parquet", "*.json", "*.jsonl", "*.model", "*.txt")
_KEY_LEN = 16


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
    copy = _read(p / OUTPUT_MARKER) if p.is_dir() else {}
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
    """sha256 of a model directory's weights and config (:func:`~solar_ray.checkpoint.model_fingerprint`)."""
    return model_fingerprint(path)["sha256"]


def artifact_id(path: str | Path) -> str | None:
    """The identity of a finished output: a hash of its manifests; None when it has none.

    With the write id every output's marker carries, an output that is made again gets a
    new identity (even when a deterministic stage writes the same bytes), and everything
    made from it is made again too.
    """
    p = Path(path)
    if not p.is_dir():
        return None
    h = hashlib.sha256(str(_read(p / OUTPUT_MARKER).get("id", "")).encode())
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
    marker = Path(out) / OUTPUT_MARKER
    data = _read(marker)
    write_json_atomic(marker, {**data, "id": data.get("id") or uuid.uuid4().hex, "input_key": input_key})


def recorded_key(out: str | Path) -> str | None:
    """The input key a finished output recorded (None: none, or not an output)."""
    value = _read(Path(out) / OUTPUT_MARKER).get("input_key")
    return value if isinstance(value, str) else None


def output_marker(out: str | Path) -> dict[str, Any]:
    """The ``.solar-ray-output`` marker of a local output as a mapping (empty: none)."""
    return _read(Path(out) / OUTPUT_MARKER)


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
