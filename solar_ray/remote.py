"""Outputs and run directories on object storage (``s3://``, ``gs://``).

A stage writes locally; :func:`publish` uploads the output with its marker last, so a
prefix without the marker is never a finished output (:func:`read_marker`), and refuses to
replace a prefix that is not solar-ray's. :func:`materialize` downloads an input once per
node into the cache, keyed by its write id; :func:`mirror_dir` is a remote run directory's
local mirror. Transfers are pyarrow's, bounded in time, and fail with one
:class:`StorageError` line. The rules: docs/pipeline.md, "A run directory on object storage".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock

from solar_ray.checkpoint import OUTPUT_MARKER, OUTPUT_MARKER_FORMAT, write_json_atomic
from solar_ray.errors import UserError, user_os_error
from solar_ray.fs import StorageError, arrow_filesystem, cache_dir, files_under, is_uri
from solar_ray.identity import output_marker

__all__ = [
    "SCHEMES",
    "UPLOAD_MARKER",
    "check_location",
    "check_owned",
    "download",
    "is_remote",
    "join",
    "list_files",
    "local_copy",
    "materialize",
    "mirror_dir",
    "publish",
    "read_json",
    "read_marker",
    "run_to_out",
    "upload_file",
]

log = logging.getLogger(__name__)
C = TypeVar("C")
R = TypeVar("R")

#: the object stores a run directory or a stage output may live in
SCHEMES = ("s3", "gs")
#: written first by an upload in progress, removed when the output marker is in place
UPLOAD_MARKER = ".solar-ray-upload"


def is_remote(path: str | os.PathLike[str] | None) -> bool:
    """True for ``s3://`` and ``gs://`` locations (``file://`` and plain paths are local)."""
    return path is not None and is_uri(path) and _scheme(os.fspath(path)) in SCHEMES


#: a bucket name as S3 and GCS allow them (letters, digits, dots, dashes, underscores)
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_location(path: str | os.PathLike[str], field: str = "out") -> None:
    """Refuse, in one line naming ``field``, an output location that is a URI of another scheme."""
    text = os.fspath(path)
    if is_uri(text) and not text.lower().startswith("file://") and not is_remote(text):
        raise StorageError(
            f"{field}: {text!r}: outputs go to a local or shared path, s3:// or gs:// "
            f"(not {_scheme(text)}://)"
        )
    if is_remote(text) and not _BUCKET.fullmatch(text.split("://", 1)[1].split("/", 1)[0]):
        raise StorageError(f"{field}: {text!r} names no bucket")


def join(uri: str, *parts: str) -> str:
    """``uri/part/...`` with single slashes."""
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts if p.strip("/"))])


def list_files(uri: str) -> list[str]:
    """The objects under ``uri``, as paths relative to it (none when there are none)."""

    def run() -> list[str]:
        fs, root = arrow_filesystem(uri)
        return [p[len(root.rstrip("/")) + 1 :] for p in files_under(fs, root)]

    return _interruptible(run, uri)


def read_json(uri: str) -> dict[str, Any] | None:
    """A small JSON object at ``uri`` (a local path or a URI).

    None when it is absent or is not a JSON object; any other failure to read it (no
    permission, an unreachable store) is a :class:`StorageError` naming ``uri``.
    """
    return _interruptible(lambda: _read_json(uri), uri)


def _read_json(uri: str) -> dict[str, Any] | None:
    fs, path = arrow_filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            data = json.loads(f.read().decode("utf-8"))
    except (FileNotFoundError, ValueError):
        return None
    except OSError as e:
        if "not found" in str(e).lower() or "does not exist" in str(e).lower():
            return None
        raise StorageError(f"cannot read {uri}: {e}") from None
    return data if isinstance(data, dict) else None


def read_marker(uri: str) -> dict[str, Any] | None:
    """The output marker of a finished output at ``uri``; None: not (or not yet) finished."""
    return read_json(join(uri, OUTPUT_MARKER))


def upload_file(local: str | os.PathLike[str], uri: str) -> None:
    """Copy one local file to ``uri`` (one object; a reader sees all of it or none)."""
    import pyarrow.fs as pafs

    def run() -> None:
        fs, path = arrow_filesystem(uri)
        pafs.copy_files(os.fspath(local), path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)  # fmt: skip

    _interruptible(run, uri)


def publish(local: str | os.PathLike[str], uri: str, **marker_fields: Any) -> dict[str, Any]:
    """Upload the finished output ``local`` to ``uri``; its marker goes last.

    What was at ``uri`` is replaced only when it is solar-ray's (a finished output or an
    interrupted upload); anything else is refused. ``marker_fields`` are added to the
    uploaded marker (the pipeline records the artifact id there). Returns that marker.
    """
    return _interruptible(lambda: _publish(local, uri, **marker_fields), uri)


def _publish(local: str | os.PathLike[str], uri: str, **marker_fields: Any) -> dict[str, Any]:
    import pyarrow.fs as pafs

    local = Path(local)
    marker = {"format": OUTPUT_MARKER_FORMAT, **output_marker(local), **marker_fields}
    if not marker.get("id"):  # every uploaded output has a write id (what copies are keyed by)
        marker["id"] = uuid.uuid4().hex
    check_owned(uri)
    fs, root = arrow_filesystem(uri)
    existing = files_under(fs, root)
    # from here on the prefix is not a finished output until the new marker is written
    _write(fs, f"{root}/{UPLOAD_MARKER}", {"id": marker.get("id")})
    for path in existing:
        if not path.endswith("/" + UPLOAD_MARKER):
            fs.delete_file(path)
    local_fs = pafs.LocalFileSystem()
    for f in sorted(_local_files(local)):
        rel = f.relative_to(local).as_posix()
        if rel in (OUTPUT_MARKER, UPLOAD_MARKER):
            continue
        pafs.copy_files(str(f), f"{root}/{rel}", source_filesystem=local_fs,
                        destination_filesystem=fs)  # fmt: skip
    _write(fs, f"{root}/{OUTPUT_MARKER}", marker)
    fs.delete_file(f"{root}/{UPLOAD_MARKER}")
    return marker


def check_owned(uri: str) -> None:
    """Refuse (one line) a prefix holding objects that are not a solar-ray output or upload."""
    names = set(list_files(uri))
    if names and not names & {OUTPUT_MARKER, UPLOAD_MARKER}:
        raise UserError(
            f"out: {uri} holds objects that solar-ray did not write; choose another location"
        )


def run_to_out(run: Callable[[C], R], cfg: C) -> R:
    """``run(cfg)``, publishing the output when ``cfg.out`` is on object storage.

    The stage runs into a local staging directory in this node's cache; what it makes is
    uploaded to ``cfg.out`` with its marker last. A training stage without its own
    ``storage_path`` keeps its Ray Train state beside the output (``.../ray_train``), so
    a stopped run resumes from the bucket. Other schemes are refused in one line.
    """
    out = getattr(cfg, "out", None)
    if out is None:
        return run(cfg)
    check_location(out)
    if not is_remote(out):
        return run(cfg)
    uri = out.rstrip("/")
    check_owned(uri)  # before the work, not after it
    name = uri.rsplit("/", 1)[-1]
    updates: dict[str, Any] = {"out": str(cache_dir() / "staging" / _digest(uri) / name)}
    if "storage_path" in type(cfg).model_fields and getattr(cfg, "storage_path", None) is None:
        updates["storage_path"] = join(uri.rsplit("/", 1)[0], "ray_train")
    if "overwrite" in type(cfg).model_fields:
        updates["overwrite"] = True  # the staging directory is solar-ray's own
    result = run(cfg.model_copy(update=updates))
    publish(updates["out"], uri)
    log.info("uploaded %s -> %s", updates["out"], uri)
    return result


def download(
    uri: str, dest: str | os.PathLike[str], names: Collection[str] | None = None
) -> Path:
    """Make ``dest`` a copy of the finished output at ``uri``, unless it already is one.

    With ``names``, only the files of those names (manifests, for a report) are copied.

    "Already is" means the local marker carries the remote marker's write id. Otherwise the
    output is downloaded into a temporary sibling and swapped in; ``dest`` must be a
    directory solar-ray owns (a cache or a run mirror). A prefix without a marker (an
    interrupted upload, or not an output) is an error naming it.
    """
    return _interruptible(lambda: _download(uri, Path(dest), names), uri)


def _download(uri: str, dest: Path, names: Collection[str] | None) -> Path:
    import pyarrow.fs as pafs

    marker = read_marker(uri)
    if marker is None:
        raise UserError(
            f"{uri} is not a finished solar-ray output (no {OUTPUT_MARKER}: an interrupted "
            "upload, or not an output)"
        )
    if _same_artifact(dest, marker):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(dest.parent / f".{dest.name}.lock"):
        if _same_artifact(dest, marker):
            return dest  # another process on this node downloaded it meanwhile
        fs, root = arrow_filesystem(uri)
        tmp = dest.parent / f".{dest.name}.download-{uuid.uuid4().hex[:8]}"
        try:
            for path in files_under(fs, root):
                rel = path[len(root) + 1 :]
                if rel in (OUTPUT_MARKER, UPLOAD_MARKER):
                    continue
                if names is not None and rel.rsplit("/", 1)[-1] not in names:
                    continue
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                pafs.copy_files(path, str(tmp / rel), source_filesystem=fs,
                                destination_filesystem=pafs.LocalFileSystem())  # fmt: skip
            tmp.mkdir(parents=True, exist_ok=True)
            # last: the copy is complete; "copy_of" makes it sign as the artifact it copies
            # (identity.dir_signature), not by its local files' times
            write_json_atomic(tmp / OUTPUT_MARKER, {**marker, "copy_of": uri})
            old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
            if dest.exists() or dest.is_symlink():
                os.rename(dest, old)
            os.rename(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def materialize(uri: str) -> Path:
    """A local copy of the finished output at ``uri`` in this node's cache (downloaded once)."""
    name = uri.rstrip("/").rsplit("/", 1)[-1] or "output"
    return download(uri, cache_dir() / "objects" / _digest(uri) / name)


def local_copy(path: str, uri: str | None) -> str:
    """``path`` when it exists on this node, else this node's copy of ``uri`` (if given).

    A model resolved on the driver's node is a path in its cache; a worker or actor on
    another node gets its own copy of the same artifact from object storage.
    """
    if uri and not os.path.isdir(path):
        return str(materialize(uri))
    return path


def mirror_dir(uri: str) -> Path:
    """This node's local mirror of the run directory at ``uri``."""
    name = uri.rstrip("/").rsplit("/", 1)[-1] or "run"
    return cache_dir() / "runs" / f"{name}-{_digest(uri)}"


# --------------------------------------------------------------------------- helpers


def _interruptible(run: Callable[[], R], uri: str) -> R:
    """``run()`` in a helper thread that the main thread waits on, so that a signal stops the
    wait at once (a hanging request is left to the exiting process); an object store's error
    is one StorageError line naming ``uri``."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = run()
        except BaseException as e:  # handed to the waiting thread
            box["error"] = e

    if threading.current_thread() is not threading.main_thread():
        target()  # already off the main thread (nested, or an embedding application)
    else:
        worker = threading.Thread(target=target, name="solar-ray-storage", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.1)
    error = box.get("error")
    if isinstance(error, OSError) and not isinstance(error, UserError) and user_os_error(error) is None:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        what = lines[0][:300] if lines else type(error).__name__
        raise StorageError(f"{uri}: the object store failed: {what}") from None
    if error is not None:
        raise error
    return box["result"]


def _same_artifact(dest: Path, marker: dict[str, Any]) -> bool:
    """``dest`` holds the artifact whose uploaded marker is ``marker`` (same write id)."""
    write_id = marker.get("id")
    return write_id is not None and output_marker(dest).get("id") == write_id


def _scheme(text: str) -> str:
    return text.split("://", 1)[0].lower()


def _digest(text: str) -> str:
    return hashlib.sha256(text.rstrip("/").encode()).hexdigest()[:16]


def _local_files(root: Path) -> list[Path]:
    """Every file under ``root``, following symbolic links (a ``model`` stage links its files)."""
    out = []
    for dirpath, _, filenames in os.walk(root, followlinks=True):
        out.extend(Path(dirpath) / n for n in filenames)
    return out


def _write(fs: Any, path: str, data: dict[str, Any]) -> None:
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(data, indent=2, sort_keys=True).encode("utf-8"))
