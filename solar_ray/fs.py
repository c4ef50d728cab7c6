"""Local paths and storage URIs: the one place that tells them apart and opens them.

:func:`is_uri` is True for ``scheme://...`` (``s3://``, ``gs://``, ``hf://``, ``https://``,
and ``file://``, a local path in URI form); :func:`local_path` gives the local path a plain
path or a ``file://`` URI names, None for remote storage. Data files open through fsspec
(:func:`fsspec_filesystem`: ``hf://``, ``http(s)://``, compression), Parquet shards, run
markers and what Ray reads through pyarrow (:func:`arrow_filesystem`); each falls back on
the other for schemes it lacks, so both open every location either can.
:func:`output_path` is the local directory an ``out`` names (``file://`` mapped, a
``s3:bucket`` look-alike refused); :func:`cache_dir` is solar-ray's cache.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from solar_ray.errors import UserError

__all__ = [
    "CACHE_MODEL_AREAS",
    "CACHE_STAGE_AREAS",
    "StorageError",
    "arrow_filesystem",
    "cache_dir",
    "files_under",
    "fsspec_filesystem",
    "is_uri",
    "local_path",
    "output_path",
    "parquet_files",
    "qualify",
]

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
#: schemes pyarrow opens natively, used when fsspec lacks the package for them
_ARROW_SCHEMES = ("s3", "s3a", "gs", "gcs", "hdfs", "viewfs")
#: seconds a GCS request may retry before it fails
STORAGE_RETRY_ENV = "SOLAR_RAY_STORAGE_RETRY_S"
#: ``s3:bucket/x``, ``gs:/b``, ``file:/x``: a URI with fewer than two slashes, which a plain
#: path would take for a relative ``s3:`` folder
_URI_LOOKALIKE = re.compile(r"^(s3|s3a|gs|gcs|hf|https?|file):(?!//)", re.IGNORECASE)
#: the folders of the cache solar-ray writes outputs into itself: the converted models
#: aliases resolve to (each made once, never replaced through an ``out``) ...
CACHE_MODEL_AREAS = ("converted", "gguf")
#: ... and the local staging of stages publishing to object storage, remote runs' mirrors
CACHE_STAGE_AREAS = ("staging", "runs")


class StorageError(UserError):
    """A location cannot be opened (unknown scheme, missing filesystem package)."""


def is_uri(path: str | os.PathLike[str]) -> bool:
    """True for ``scheme://...`` (s3, gs, hf, https, file, ...), False for plain paths."""
    return bool(_URI.match(os.fspath(path)))


def local_path(path: str | os.PathLike[str]) -> str | None:
    """The absolute local path a plain path or ``file://`` URI names; None for other URIs."""
    text = os.fspath(path)
    if is_uri(text):
        if not text.lower().startswith("file://"):
            return None
        text = text[len("file://") :]
    return str(expand_user(text).absolute())


def output_path(out: str | os.PathLike[str], field: str = "out") -> Path:
    """The absolute local directory ``out`` names: a plain path or a ``file://`` URI.

    ``s3:bucket/x``-like text (a scheme with fewer than two slashes) and URIs of other
    schemes are a one-line :class:`StorageError` naming ``field`` and the form meant.
    """
    text = os.fspath(out)
    bad = _URI_LOOKALIKE.match(text)
    if bad:
        scheme = bad.group(1).lower()
        rest = text[bad.end() :].lstrip("/")
        meant = f"file:///{rest}" if scheme == "file" else f"{scheme}://{rest}"
        raise StorageError(f"{field}: {text!r} is not a valid location; did you mean {meant!r}?")
    if text.lower().startswith("file://") and not text[7:].startswith("/"):
        raise StorageError(f"{field}: {text!r} names a host; a local path is file:///path")
    if text.lower().startswith("file://"):
        text = "/" + text[7:].lstrip("/")
    local = local_path(text)
    if local is None:
        raise StorageError(f"{field}: {text!r} is not a local path; give a path or file:///path")
    return Path(local)


def expand_user(path: str | os.PathLike[str]) -> Path:
    """``path`` with a leading ``~`` or ``~user`` expanded.

    A ``~user`` naming no user is a :class:`~solar_ray.errors.UserError` (pathlib raises
    RuntimeError; ``os.path.expanduser`` leaves a literal ``~user`` directory name).
    """
    text = os.fspath(path)
    expanded = os.path.expanduser(text)
    if expanded.startswith("~"):
        user = re.split(r"[/\\]", text, maxsplit=1)[0]
        raise UserError(
            f"{text}: {user!r} names no home directory on this machine (no such user, or no "
            "HOME); write the path in full"
        )
    return Path(expanded)


def cache_dir() -> Path:
    """solar-ray's cache (converted models, staging): ``$SOLAR_RAY_CACHE`` or ~/.cache."""
    root = os.environ.get("SOLAR_RAY_CACHE") or Path.home() / ".cache" / "solar-ray"
    return Path(root)


def qualify(path: str, like: str) -> str:
    """A path listed inside the filesystem of ``like``, named as the caller names ``like``.

    Remote paths get ``like``'s scheme back (``bucket/key`` -> ``s3://bucket/key``); local
    ones stay absolute paths.
    """
    if is_uri(path):  # filesystems of URLs (http) list full URLs
        return path
    if local_path(like) is not None:
        return os.path.abspath(path)
    return f"{like.split('://', 1)[0]}://{path}"


def fsspec_filesystem(url: str) -> tuple[Any, str]:
    """``(fsspec filesystem, path inside it)`` for a local path or a URI."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        protocol = url.split("://", 1)[0]
        if protocol in _ARROW_SCHEMES:  # s3/gs/hdfs without s3fs/gcsfs: pyarrow's own
            from fsspec.implementations.arrow import ArrowFSWrapper

            fs, path = arrow_filesystem(url)
            return ArrowFSWrapper(fs), path
        raise StorageError(
            f"cannot read {url!r}: the {protocol}:// filesystem needs a package that is not "
            f"installed ({e})"
        ) from None
    except ValueError as e:  # an unknown protocol
        raise StorageError(f"cannot open {url!r}: {e}") from None


def arrow_filesystem(url: str) -> tuple[Any, str]:
    """``(pyarrow.fs.FileSystem, path inside it)`` for a local path or a URI.

    Schemes pyarrow lacks (``hf://``, ``https://``) go through fsspec wrapped for pyarrow.
    """
    import pyarrow as pa
    import pyarrow.fs as pafs

    local = local_path(url)
    if local is not None:
        return pafs.LocalFileSystem(), local
    if url.split("://", 1)[0] in ("gs", "gcs") and "?" not in url:
        # GCS retries a failing request for 15 minutes by default: a missing credential
        # would hang a command that long
        url += f"?retry_limit_seconds={float(os.environ.get(STORAGE_RETRY_ENV) or 60):g}"
    try:
        return pafs.FileSystem.from_uri(url.replace("s3a://", "s3://", 1))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
        if isinstance(e, OSError) or url.split("://", 1)[0] in _ARROW_SCHEMES:
            raise StorageError(f"cannot open {url!r}: {e}") from None
    fs, path = fsspec_filesystem(url)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def files_under(
    fs: Any, root: str, *, suffix: str | None = None, include_hidden: bool = True
) -> list[str]:
    """The files under ``root`` of a pyarrow filesystem, recursively, in name order; none
    when ``root`` does not exist.

    ``suffix`` keeps only names ending in it; ``include_hidden=False`` leaves out files whose
    name starts with a dot.
    """
    import pyarrow.fs as pafs

    selector = pafs.FileSelector(root, allow_not_found=True, recursive=True)
    return sorted(
        fi.path for fi in fs.get_file_info(selector)
        if fi.type == pafs.FileType.File
        and (suffix is None or fi.path.endswith(suffix))
        and (include_hidden or not fi.base_name.startswith("."))
    )  # fmt: skip


def parquet_files(fs: Any, root: str) -> list[str]:
    """The Parquet files under ``root`` of a pyarrow filesystem (recursively, hidden ones
    left out; none when ``root`` does not exist), in name order."""
    return files_under(fs, root, suffix=".parquet", include_hidden=False)
