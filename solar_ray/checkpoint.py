"""The one on-disk model format, atomic writes and the ``solar.json`` lineage manifest.

Every output directory goes through :func:`atomic_output_dir`: written into a ``flock``-ed
hidden sibling ``.NAME.tmp-<token>`` and swapped in with one ``renameat2(RENAME_EXCHANGE)``,
replacing only what a ``.solar-ray-output`` marker says solar-ray wrote (else
:class:`UnsafeOutputError`). Where the file system refuses the exchange (FUSE: bindfs
1.14.7 on Linux 6.18 answers EINVAL; NFS refuses rename flags), the old output is moved to
``.NAME.old-<token>`` first, which the next run puts back or drops. ``solar.json`` is
written last, so a directory without it is never a finished stage. The format and the
rules: README.md, "One model format" and "Your files are safe".
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import errno
import fcntl
import functools
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from solar_ray.errors import UserError
from solar_ray.fs import (
    CACHE_MODEL_AREAS,
    CACHE_STAGE_AREAS,
    cache_dir,
    expand_user,
    is_uri,
    output_path,
)

__all__ = [
    "MANIFEST_NAME",
    "OUTPUT_MARKER",
    "RUN_MARKERS",
    "OutputExistsError",
    "OutputWriteError",
    "UnsafeOutputError",
    "atomic_output_dir",
    "check_free_space",
    "check_output",
    "format_bytes",
    "is_solar_output",
    "library_version",
    "library_versions",
    "local_inputs",
    "read_json_file",
    "read_manifest",
    "unaccounted_entry",
    "write_json_atomic",
    "write_manifest",
    "write_model_card",
]

log = logging.getLogger(__name__)

MANIFEST_NAME = "solar.json"
MANIFEST_FORMAT = "solar-ray/1"
#: hidden file every directory written by :func:`atomic_output_dir` carries
OUTPUT_MARKER = ".solar-ray-output"
OUTPUT_MARKER_FORMAT = "solar-ray-output/1"
#: the directory of stage markers that makes a directory a pipeline run directory
RUN_MARKERS = ".pipeline"
_TOKEN_HEX = 12
#: ``.tmp-`` / ``.old-`` plus the token: what a sibling name adds to its prefix
_SUFFIX_LEN = 5 + _TOKEN_HEX
#: errors that mean "the disk is full", which a write reports without a file name
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class OutputExistsError(UserError, FileExistsError):
    """The output directory exists and is not empty; pass overwrite to replace it."""


class UnsafeOutputError(UserError):
    """Writing ``out`` would replace or change files that solar-ray did not write."""


class OutputWriteError(UserError):
    """The output cannot be written (no space, no permission, a name too long)."""


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


# --------------------------------------------------------------------------- ownership


def read_json_file(path: str | Path) -> dict[str, Any] | None:
    """A local JSON object; None for any failure to read or parse it, or another value.

    Deliberately not :func:`solar_ray.remote.read_json`, which raises on a storage error:
    the questions asked with it are "did solar-ray write this directory?" and "is this
    output finished?", and a file that cannot be read answers "no" to both, the side that
    neither replaces the directory nor takes it as done.
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def is_solar_output(path: str | Path) -> bool:
    """Did solar-ray write this directory? Yes when it carries the ``.solar-ray-output``
    marker :func:`atomic_output_dir` writes (what ``overwrite`` may replace:
    :func:`unaccounted_entry`)."""
    return (Path(path) / OUTPUT_MARKER).is_file()


def _entries(root: Path, rel: str = "") -> Iterator[str]:
    """Every entry under ``root`` as a relative POSIX path, each directory before its
    contents, in name order; symlinks are entries, never followed."""
    with os.scandir(root / rel if rel else root) as it:
        found = sorted(it, key=lambda e: e.name)
    for entry in found:
        yield rel + entry.name
        if entry.is_dir(follow_symlinks=False):
            yield from _entries(root, f"{rel}{entry.name}/")


#: ``.NAME.tmp-<8 hex>``: a :func:`write_json_atomic` temporary left by a crash
_JSON_TMP = re.compile(r"^(.*/)?\.([^/]+)\.tmp-[0-9a-f]{8}$")


def _accounted(out: Path) -> Callable[[str], bool]:
    """Whether the write of ``out`` made an entry, by the list in its marker."""
    listed = (read_json_file(out / OUTPUT_MARKER) or {}).get("files")
    known = {f for f in listed if isinstance(f, str)} if isinstance(listed, list) else set()
    known.add(OUTPUT_MARKER)

    def accounted(rel: str) -> bool:
        if rel in known:
            return True
        tmp = _JSON_TMP.match(rel)
        return bool(tmp) and f"{tmp.group(1) or ''}{tmp.group(2)}" in known

    return accounted


def unaccounted_entry(out: str | Path) -> str | None:
    """The first entry of the directory ``out`` its write did not make (a file a user
    added, or any entry where there is no marker), as a relative path; None: none."""
    out = Path(out)
    accounted = _accounted(out)
    try:
        return next((rel for rel in _entries(out) if not accounted(rel)), None)
    except OSError as e:
        return f"(an entry that cannot be read: {e.strerror})"


def _remove_accounted(old: Path) -> str | None:
    """Delete what the write of ``old`` made, deepest first; return the first entry left."""
    accounted = _accounted(old)
    for rel in reversed(list(_entries(old))):
        if not accounted(rel):
            continue
        p = old / rel
        with contextlib.suppress(FileNotFoundError):
            if p.is_dir() and not p.is_symlink():
                with contextlib.suppress(OSError):  # holds something unaccounted: kept
                    p.rmdir()
            else:
                p.unlink()
    with contextlib.suppress(OSError):
        old.rmdir()
    return next(_entries(old), None) if old.exists() else None


def local_inputs(*sources: str | os.PathLike | None) -> list[Path]:
    """The sources that are existing local paths (URIs, hub ids, aliases and None dropped).

    A glob pattern stands for the files it matches.
    """
    out = []
    for s in sources:
        if s is None or is_uri(s):
            continue
        text = os.path.expanduser(str(s))
        if any(c in text for c in "*?["):
            out.extend(Path(m) for m in sorted(glob.glob(text, recursive=True)))
        elif os.path.lexists(text):
            out.append(Path(text))
    return out


def _input_roots(inputs: Iterable[str | os.PathLike]) -> list[tuple[Path, Path]]:
    """(as given, real path) of every input, plus the real homes of a directory's symlinks.

    A pipeline ``model`` stage is a directory of symlinks into the model cache: the files
    it points at are inputs too.
    """
    roots: list[tuple[Path, Path]] = []
    for given in inputs:
        g = expand_user(given)
        roots.append((g, Path(os.path.realpath(g))))
        if g.is_dir():
            with contextlib.suppress(OSError):
                for entry in os.scandir(g):
                    if entry.is_symlink():
                        roots.append((g, Path(os.path.realpath(entry.path)).parent))
    return roots


def _name_max(directory: Path) -> int:
    try:
        return os.pathconf(_existing_ancestor(directory), "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _check_not_cwd_or_cache(out: Path, real_out: Path, first: bool) -> None:
    """Refuse the working directory (or a folder holding it) and solar-ray's cache.

    In the cache, outputs go only where solar-ray puts its own: a stage's staging or a
    remote run's mirror, or a converted model made once (an existing one is never replaced,
    or the alias resolving to it would name another model; ``first`` is the check before
    the write, the re-check before publication lets a concurrent converter's copy be).
    """
    with contextlib.suppress(OSError):  # a working directory that was removed
        cwd = Path(os.path.realpath(os.getcwd()))
        if cwd.is_relative_to(real_out):
            how = (
                "is the working directory"
                if cwd == real_out
                else f"contains the working directory {cwd}"
            )
            raise UnsafeOutputError(f"out: {out} {how}; choose another output directory")
    cache = Path(os.path.realpath(expand_user(cache_dir()).absolute()))
    if not real_out.is_relative_to(cache):
        return
    parts = real_out.relative_to(cache).parts
    area = parts[0] if parts else ""
    if area in CACHE_STAGE_AREAS and len(parts) > 2:
        return
    model = area in CACHE_MODEL_AREAS and len(parts) == 2 and re.search(r"-[0-9a-f]{16}$", parts[1])
    if model and not (first and os.path.lexists(real_out)):
        return
    raise UnsafeOutputError(
        f"out: {out} is inside solar-ray's cache {cache} (the models its aliases resolve "
        "to); choose an output directory outside it"
    )


def check_output(
    out: str | Path,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
    *,
    _first: bool = True,
) -> Path:
    """Check that ``out`` may be written; return it as an absolute path.

    ``out`` is a path or a ``file://`` URI (:func:`solar_ray.fs.output_path`). Refused (a
    :class:`UserError` naming the path): ``out`` is, contains or lies inside an input;
    ``out`` is or contains the working directory, or lies in solar-ray's cache; ``out`` is
    a symlink or a file; ``out`` is a non-empty directory and not ``overwrite``; ``out``
    holds an entry solar-ray's write of it did not make (:func:`unaccounted_entry`); its
    name is longer than the file system allows.
    """
    out = output_path(out)
    real_out = Path(os.path.realpath(out))
    for given, real in _input_roots(inputs):
        if real_out == real:
            how = "is"
        elif real.is_relative_to(real_out):
            how = "contains"
        elif real_out.is_relative_to(real):
            how = "lies inside"
        else:
            continue
        raise UnsafeOutputError(
            f"out: {out} {how} the input {given}"
            + (f" (really {real})" if str(real) != str(given) else "")
            + "; choose an output directory outside the inputs"
        )
    _check_not_cwd_or_cache(out, real_out, _first)
    if len(out.name.encode()) > _name_max(out.parent):
        raise OutputWriteError(
            f"out: the name {out.name[:40]!r}... is {len(out.name.encode())} bytes, longer "
            f"than the file system allows ({_name_max(out.parent)}); choose a shorter name"
        )
    if out.is_symlink():
        raise UnsafeOutputError(
            f"out: {out} is a symbolic link (to {os.path.realpath(out)}); give the real path"
        )
    if os.path.lexists(out) and not out.is_dir():
        raise OutputExistsError(f"output path exists and is not a directory: {out}")
    try:
        nonempty = out.is_dir() and any(out.iterdir())
    except OSError as e:
        raise OutputWriteError(f"out: cannot read {out} ({e.strerror})") from None
    if nonempty and not overwrite:
        raise OutputExistsError(
            f"output directory exists and is not empty: {out} (pass --overwrite to replace it)"
        )
    if nonempty and not is_solar_output(out):
        raise UnsafeOutputError(
            f"out: {out} is not a solar-ray output (no {OUTPUT_MARKER}); overwrite replaces "
            "only what solar-ray wrote: choose another output directory or move it away yourself"
        )
    stray = unaccounted_entry(out) if nonempty else None
    if stray is not None:
        raise UnsafeOutputError(
            f"out: {out} holds {stray}, which solar-ray did not write (its {OUTPUT_MARKER} "
            "does not list it); move it out, or choose another output directory"
        )
    if out.is_dir() and _immutable(out):
        raise OutputWriteError(
            f"out: {out} is immutable (chattr +i) and cannot be replaced; choose another output "
            "directory"
        )
    return out


#: ``FS_IOC_GETFLAGS`` and its immutable and append-only flags (linux/fs.h)
_FS_IOC_GETFLAGS = 0x80086601
_FS_NO_REPLACE_FL = 0x10 | 0x20


def _immutable(path: Path) -> bool:
    """Is the directory ``path`` immutable or append-only (so that it cannot be renamed)?"""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        flags = fcntl.ioctl(fd, _FS_IOC_GETFLAGS, b"\0" * 8)
        return bool(int.from_bytes(flags[:4], sys.byteorder) & _FS_NO_REPLACE_FL)
    except OSError:  # no such flags on this system or file system
        return False
    finally:
        os.close(fd)


def _existing_ancestor(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def format_bytes(nbytes: float) -> str:
    """``1536`` -> ``1.5 KiB``: sizes in messages."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(nbytes) < 1024 or unit == "PiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return f"{nbytes} B"  # pragma: no cover


def check_free_space(out: str | Path, nbytes: int, what: str = "the output") -> None:
    """Refuse (one line) when ``nbytes`` will not fit in the free space where ``out`` goes."""
    where = _existing_ancestor(output_path(out))
    try:
        usage = shutil.disk_usage(where)
    except OSError:
        return
    free = usage.free
    if usage.total == 0:  # /proc, /sys: no size to check; writing there fails with its reason
        return
    if nbytes > free:
        raise OutputWriteError(
            f"out: {what} needs about {format_bytes(nbytes)} but {where} has {format_bytes(free)} free; "
            "free some space or choose another output directory"
        )


# --------------------------------------------------------------------------- temporaries


def _sibling_prefix(name: str, name_max: int) -> str:
    """``.NAME``, hash-shortened so that ``.NAME.tmp-<token>`` fits in ``name_max`` bytes."""
    prefix = f".{name}"
    if len(prefix.encode()) + _SUFFIX_LEN <= name_max:
        return prefix
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    room = name_max - _SUFFIX_LEN - len(digest) - 2
    cut = name.encode()[:room].decode("utf-8", errors="ignore")
    return f".{cut}~{digest}"


def _siblings(parent: Path, prefix: str) -> Iterator[tuple[str, Path]]:
    """("tmp" | "old", path) of every temporary sibling of one output."""
    pat = re.compile(rf"^{re.escape(prefix)}\.(tmp|old)-[0-9a-f]{{{_TOKEN_HEX}}}$")
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        mt = pat.match(entry.name)
        if mt:
            yield mt.group(1), Path(entry.path)


def _try_lock(fd: int) -> bool | None:
    """Exclusive non-blocking flock: True got it, False someone holds it, None no locks here."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None


def _same_inode(path: Path, fd: int) -> bool:
    try:
        return os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
    except OSError:
        return False


def _clear_stale(out: Path, prefix: str) -> None:
    """Remove the temporary siblings of ``out`` whose writer is dead; restore a lost ``out``.

    A writer holds an exclusive ``flock`` on its temporary directory until it is done, and
    the kernel drops it when the process dies (kill -9 included), so a sibling that can be
    locked is garbage. An ``.old-`` sibling is a complete previous output moved aside by
    the fallback swap: put back when ``out`` is missing, else removed.
    """
    for kind, path in _siblings(out.parent, prefix):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            if not _try_lock(fd) or not _same_inode(path, fd):
                continue  # alive, vanished, or dead but unprovable (no locks on this fs)
            if kind == "old" and not os.path.lexists(out):
                os.rename(path, out)
                log.warning("restored %s from %s (a swap was interrupted)", out, path.name)
            else:
                shutil.rmtree(path, ignore_errors=True)
                log.info("removed %s, left by a writer that died", path)
        except OSError as e:  # not ours to fix (permissions): the write itself will say
            log.warning("could not clear %s: %s", path, e)
        finally:
            os.close(fd)


def _make_locked_tmp(parent: Path, prefix: str) -> tuple[Path, int]:
    """Create and lock a fresh temporary directory (retrying if a cleaner raced us)."""
    for _ in range(8):
        tmp = parent / f"{prefix}.tmp-{uuid.uuid4().hex[:_TOKEN_HEX]}"
        os.mkdir(tmp)
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except FileNotFoundError:
            continue
        got = _try_lock(fd)
        if got is False or not _same_inode(tmp, fd):
            os.close(fd)  # a cleaner took it between mkdir and lock: use another name
            continue
        return tmp, fd
    raise OutputWriteError(f"out: could not create a temporary directory in {parent}")


# --------------------------------------------------------------------------- publication

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
#: use renameat2 (Linux); tests turn it off to exercise the fallback
USE_RENAMEAT2 = sys.platform.startswith("linux")
_libc_renameat2: Any = None


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False when this system or file system lacks it."""
    global _libc_renameat2
    if not USE_RENAMEAT2:
        return False
    if _libc_renameat2 is None:
        try:
            _libc_renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
        except (AttributeError, OSError):
            _libc_renameat2 = False
    if _libc_renameat2 is False:
        return False
    rc = _libc_renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _publish(tmp: Path, out: Path, prefix: str) -> bool:
    """Make ``tmp`` appear at ``out``; True when ``out`` held something, now at ``tmp``."""
    if not os.path.lexists(out):
        try:
            if _renameat2(tmp, out, _RENAME_NOREPLACE):
                return False
            os.rename(tmp, out)  # no renameat2: replaces at most an empty directory
            return False
        except FileExistsError:
            pass  # another writer published first: swap with theirs
        except OSError as e:
            if e.errno != errno.ENOTEMPTY:
                raise
    _swap(tmp, out, prefix)
    return True


def _swap(tmp: Path, out: Path, prefix: str) -> None:
    """Exchange the directories ``tmp`` and ``out``: one ``renameat2``, else (a file system
    without ``RENAME_EXCHANGE``, see the module doc) three renames.

    In the fallback the directory leaving ``out`` waits, complete, at ``.old-<token>``
    (locked, by this call or by this writer, so no cleaner takes it) until the other is in
    place; a crash in between leaves it there and the next run at ``out`` puts it back.
    """
    if _renameat2(tmp, out, _RENAME_EXCHANGE):
        return
    old = out.parent / f"{prefix}.old-{uuid.uuid4().hex[:_TOKEN_HEX]}"
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        _try_lock(fd)  # held already when it is this writer's own directory (a swap back)
        os.rename(out, old)
        os.rename(tmp, out)
        os.rename(old, tmp)
    finally:
        os.close(fd)


def _retire(previous: Path, out: Path, prefix: str) -> None:
    """Remove the output ``out`` held before the swap (now at ``previous``).

    An entry its write did not make (a file a user created in it while the new output was
    written) is never deleted: the previous output is swapped back, complete, and the
    write refused. One created during the removal itself is kept under a visible name.
    """
    stray = unaccounted_entry(previous)
    if stray is not None:
        _swap(previous, out, prefix)
        raise UnsafeOutputError(
            f"out: {out}/{stray} appeared while the new output was written and solar-ray did "
            "not write it; the output was left as it was: move the file out and run again"
        )
    left = _remove_accounted(previous)
    if left is not None:
        kept = out.parent / f"{out.name}.kept-{uuid.uuid4().hex[:_TOKEN_HEX]}"
        os.rename(previous, kept)
        log.warning(
            "%s appeared in the previous output while it was removed; kept in %s", left, kept
        )


@contextlib.contextmanager
def atomic_output_dir(
    out: str | Path, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = ()
) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to write into; make it ``out`` on success.

    ``out`` is checked first (:func:`check_output` against ``inputs``: never an input,
    never a directory solar-ray did not write), then again before it is replaced. Stale
    temporaries of dead writers at the same ``out`` are removed. The marker records every
    entry written into the temporary directory; of the previous output, only those its own
    marker records are removed. On any exception before publication the temporary
    directory is removed and ``out`` is left as it was; a full disk becomes a one-line
    :class:`OutputWriteError`.
    """
    inputs = list(inputs)
    out = output_path(out)
    parent = out.parent
    prefix = _sibling_prefix(out.name, _name_max(parent))
    _clear_stale(out, prefix)  # first: it may put back an output a crashed swap moved away
    out = check_output(out, overwrite, inputs)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp, lock_fd = _make_locked_tmp(parent, prefix)
    except OSError as e:
        raise OutputWriteError(
            f"out: cannot write into {parent} ({e.strerror}); choose a writable output directory"
        ) from None
    swapped = False
    try:
        yield tmp
        check_output(out, overwrite, inputs, _first=False)  # nothing appeared at out meanwhile
        write_json_atomic(
            tmp / OUTPUT_MARKER,
            # "id" is new at every write: an output made again is a new artifact
            # (solar_ray.identity.artifact_id), even when its bytes are the same
            {
                "format": OUTPUT_MARKER_FORMAT,
                "written_by": f"solar-ray {library_version('solar-ray') or 'unknown'}",
                "id": uuid.uuid4().hex,
                "files": list(_entries(tmp)),  # what overwrite may remove later
            },
        )
        try:
            swapped = _publish(tmp, out, prefix)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EACCES, errno.EROFS, errno.EBUSY):
                raise
            raise OutputWriteError(
                f"out: cannot replace {out} ({e.strerror}); choose another output directory"
            ) from None
        if swapped:
            _retire(tmp, out, prefix)
    except BaseException as e:
        # tmp is ours (the new output) unless the swap put the previous output there
        if not swapped or isinstance(e, UnsafeOutputError):
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            raise OutputWriteError(
                f"no space left on the device while writing {out} ({e.strerror}); the partial "
                "output was removed: free some space or choose another output directory"
            ) from None
        raise
    finally:
        os.close(lock_fd)


# --------------------------------------------------------------------------- lineage


@functools.cache
def library_version(package: str) -> str | None:
    """The installed version of ``package`` (None: not installed), looked up once a process
    (each lookup scans the installed distributions)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


#: the libraries that shape an artifact, whose versions a manifest records
_LIBRARIES = (
    "solar-ray", "torch", "transformers", "safetensors", "ray", "deepspeed", "trl", "datasets", "pyarrow"
)


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape an artifact, for the manifest."""
    return {name: v for name in _LIBRARIES if (v := library_version(name))}


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

    ``parents`` are fingerprints (:func:`solar_ray.identity.model_fingerprint`) or other
    input descriptions (a data manifest's path and hash); ``extra`` holds stage-specific
    fields such as the upscale plan.
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
    """The directory's ``solar.json``, or None when it has none (not a finished output).

    A manifest that is not a JSON mapping (truncated, edited by hand) counts as none.
    """
    p = Path(model_dir) / MANIFEST_NAME
    if not p.is_file():
        return None
    manifest = read_json_file(p)
    if manifest is None:
        log.warning("%s is not a JSON mapping; the directory is not taken as finished", p)
        return None
    return manifest


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
