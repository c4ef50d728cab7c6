"""The one on-disk model format, atomic writes and the ``solar.json`` lineage manifest.

Every model solar-ray writes is a Hugging Face directory (safetensors shards + index,
``config.json``, tokenizer files, ``generation_config.json``, a ``README.md`` model card)
plus ``solar.json``: the stage that made it, its parents with content hashes, the resolved
config, metrics and library versions. It loads with ``AutoModelForCausalLM.from_pretrained``
unchanged.

Outputs are written into a hidden temporary sibling and renamed into place when complete;
the manifest is written last inside the temporary directory, so a directory without
``solar.json`` is never a finished stage, and a crash never leaves something that looks
finished at the final path.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from solar_ray.errors import UserError

__all__ = [
    "MANIFEST_NAME",
    "OutputExistsError",
    "atomic_output_dir",
    "library_versions",
    "model_fingerprint",
    "read_manifest",
    "sha256_file",
    "write_json_atomic",
    "write_manifest",
    "write_model_card",
]

MANIFEST_NAME = "solar.json"
MANIFEST_FORMAT = "solar-ray/1"
_HASH_CHUNK = 8 << 20


class OutputExistsError(UserError, FileExistsError):
    """The output directory exists and is not empty; pass overwrite to replace it."""


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _is_nonempty_dir(p: Path) -> bool:
    return p.is_dir() and any(p.iterdir())


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to write into; rename it to ``out`` on success.

    An existing non-empty ``out`` is refused unless ``overwrite``. On any exception the
    temporary directory is removed and ``out`` is left as it was.
    """
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path exists and is not a directory: {out}")
    if _is_nonempty_dir(out) and not overwrite:
        raise OutputExistsError(
            f"output directory exists and is not empty: {out} (pass --overwrite to replace it)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, trash)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks (hashlib releases the GIL on them)."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _weight_and_config_files(model_dir: Path) -> list[Path]:
    names = sorted(
        p
        for p in model_dir.iterdir()
        if p.is_file() and (p.suffix == ".safetensors" or p.name == "config.json")
    )
    return names


def model_fingerprint(model_dir: str | Path, file_hashes: Mapping[str, str] | None = None) -> dict:
    """Content hash of a model directory: sha256 of every weight file and of config.json.

    ``file_hashes`` supplies hashes already computed (e.g. by a writer that hashed while it
    read). Returns ``{"path", "sha256", "files": {name: sha256}}`` where ``sha256`` is the
    hash of the sorted ``name:hash`` lines, so it changes when any file changes.
    """
    model_dir = Path(model_dir)
    files: dict[str, str] = {}
    for p in _weight_and_config_files(model_dir):
        files[p.name] = (file_hashes or {}).get(p.name) or sha256_file(p)
    combined = hashlib.sha256(
        "".join(f"{k}:{v}\n" for k, v in sorted(files.items())).encode()
    ).hexdigest()
    return {"path": str(model_dir), "sha256": combined, "files": files}


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape an artifact, for the manifest."""
    from importlib import metadata

    out = {}
    for name in (
        "solar-ray",
        "torch",
        "transformers",
        "safetensors",
        "ray",
        "deepspeed",
        "trl",
        "datasets",
        "pyarrow",
    ):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def write_manifest(
    model_dir: str | Path,
    stage: str,
    *,
    parents: list[dict] | None = None,
    config: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict:
    """Write ``solar.json`` (last, atomically) and return it.

    ``parents`` are fingerprints (:func:`model_fingerprint`) or other input descriptions
    (a data manifest's path and hash); ``extra`` holds stage-specific fields such as the
    upscale plan.
    """
    manifest = {
        "format": MANIFEST_FORMAT,
        "stage": stage,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "parents": list(parents or []),
        "config": dict(config or {}),
        "metrics": dict(metrics or {}),
        **extra,
        "versions": library_versions(),
    }
    write_json_atomic(Path(model_dir) / MANIFEST_NAME, manifest)
    return manifest


def read_manifest(model_dir: str | Path) -> dict | None:
    """The directory's ``solar.json``, or None when it has none (not a finished output)."""
    p = Path(model_dir) / MANIFEST_NAME
    if not p.is_file():
        return None
    with open(p, encoding="utf-8") as f:
        return json.load(f)


def write_model_card(model_dir: str | Path, title: str, lines: list[str]) -> None:
    """A short README.md model card: what the model is and how it was made."""
    body = "\n".join(
        [
            "---",
            "library_name: transformers",
            "tags: [solar-ray, depth-up-scaling]",
            "---",
            f"# {title}",
            "",
            *lines,
            "",
            "Lineage (parents, resolved config, hashes, versions) is in `solar.json`.",
            "",
        ]
    )
    (Path(model_dir) / "README.md").write_text(body, encoding="utf-8")
