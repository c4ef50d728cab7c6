"""The one on-disk model format, atomic writes and the ``solar.json`` lineage manifest.

Every model solar-ray writes is a Hugging Face directory (safetensors shards + index,
``config.json``, tokenizer files, ``generation_config.json``, a ``README.md`` model card)
plus ``solar.json``: the stage that made it, its parents with content hashes, the resolved
config, metrics and library versions. It loads with ``AutoModelForCausalLM.from_pretrained``
unchanged.

Every output directory (models, evaluation results, contamination reports, data mixes,
reports) goes through :func:`atomic_output_dir`, which keeps a user's files safe:

* **What may be replaced.** ``out`` is refused when it is, contains or lies inside one of
  the stage's inputs (real paths, symlinks resolved), and ``overwrite`` replaces only a
  directory solar-ray wrote (:func:`is_solar_output`: the ``.solar-ray-output`` marker every
  output gets, or a solar-ray manifest); anything else is a one-line :class:`UserError`.
* **Atomic publication.** The output is written into a hidden temporary sibling
  ``.NAME.tmp-<token>`` (names longer than the file system allows are hash-shortened),
  whose directory is ``flock``-ed for the whole write. It appears at ``out`` with one
  ``renameat2(RENAME_EXCHANGE)`` (Linux), so ``out`` is always the old complete output or
  the new one. Where the exchange is not supported, the fallback moves the old output to
  ``.NAME.old-<token>`` first; a crash between the two renames leaves that complete old
  copy, which the next run at the same ``out`` puts back (or drops, once ``out`` exists).
* **Stale siblings.** A temporary sibling whose lock nobody holds belongs to a dead writer
  (kill -9, power loss); the next run at the same ``out`` removes it.

The manifest is written last inside the temporary directory, so a directory without
``solar.json`` is never a finished stage.
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
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from solar_ray.errors import UserError
from solar_ray.fs import is_uri

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
    "library_versions",
    "local_inputs",
    "model_fingerprint",
    "read_manifest",
    "recorded_sha256",
    "sha256_file",
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
_HASH_CHUNK = 8 << 20
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


def _read_json(path: Path) -> Any:
    """A local JSON file's value; None for any failure to read or parse it.

    Deliberately not :func:`solar_ray.remote.read_json`, which raises on a storage error:
    the questions asked here are "did solar-ray write this directory?" and "is this output
    finished?", and a file that cannot be read answers "no" to both, the side that neither
    replaces the directory nor takes it as done.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError):
        return None


def is_solar_output(path: str | Path) -> bool:
    """Did solar-ray write this directory (so that ``overwrite`` may replace it)?

    Yes when it carries the marker :func:`atomic_output_dir` writes, or (outputs of older
    versions) a solar-ray manifest: ``solar.json`` (models, evaluation results,
    contamination reports), a data ``manifest.json`` (mixes, synthetic math, corpora), a
    model stage's ``source.json``; or when it is a stage's directory (or the report) inside
    a pipeline run directory.
    """
    p = Path(path)
    if (p / OUTPUT_MARKER).is_file():
        return True
    manifest = _read_json(p / MANIFEST_NAME)
    if isinstance(manifest, dict) and str(manifest.get("format", "")).startswith("solar-ray/"):
        return True
    data = _read_json(p / "manifest.json")
    if isinstance(data, dict) and (
        str(data.get("format", "")).startswith("solar-ray-") or "corpus" in data
    ):
        return True
    source = _read_json(p / "source.json")
    if isinstance(source, dict) and source.keys() & {"source", "random", "gguf"}:
        return True
    parent = p.absolute().parent
    if (parent / RUN_MARKERS).is_dir():
        recipe = _read_json(parent / "recipe.json")
        stages = recipe.get("stages") if isinstance(recipe, dict) else None
        return p.name == "report" or (isinstance(stages, dict) and p.name in stages)
    return False


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
        g = Path(given).expanduser()
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


def check_output(
    out: str | Path, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = ()
) -> Path:
    """Check that ``out`` may be written; return it as an absolute path.

    Refused (a :class:`UserError` naming the path): ``out`` is, contains or lies inside an
    input; ``out`` is a symlink or a file; ``out`` is a non-empty directory and not
    ``overwrite``; ``out`` is a non-empty directory solar-ray did not write; its name is
    longer than the file system allows.
    """
    out = Path(out).expanduser().absolute()
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
            f"out: {out} is not a solar-ray output (no {MANIFEST_NAME} or {OUTPUT_MARKER}); "
            "overwrite replaces only what solar-ray wrote: choose another output directory "
            "or move it away yourself"
        )
    return out


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
    where = _existing_ancestor(Path(out).expanduser().absolute())
    try:
        free = shutil.disk_usage(where).free
    except OSError:
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
    """("tmp" | "old", path) of every temporary sibling of one output (any version's)."""
    pat = re.compile(rf"^{re.escape(prefix)}\.(tmp|old)-([0-9a-f]{{8}}|[0-9a-f]{{{_TOKEN_HEX}}})$")
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


def _publish(tmp: Path, out: Path, prefix: str) -> None:
    """Make ``tmp`` appear at ``out``; whatever ``out`` held is removed after the swap."""
    if not os.path.lexists(out):
        try:
            if _renameat2(tmp, out, _RENAME_NOREPLACE):
                return
            os.rename(tmp, out)  # no renameat2: replaces at most an empty directory
            return
        except FileExistsError:
            pass  # another writer published first: swap with theirs
        except OSError as e:
            if e.errno != errno.ENOTEMPTY:
                raise
    if _renameat2(tmp, out, _RENAME_EXCHANGE):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now names the previous output
        return
    # Fallback, two renames. The previous output waits, complete, at .old-<token> (locked,
    # so no cleaner takes it) until the new one is in place; a crash in between leaves it
    # there and the next run at ``out`` puts it back.
    old = out.parent / f"{prefix}.old-{uuid.uuid4().hex[:_TOKEN_HEX]}"
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(out, old)
        os.rename(tmp, out)
        os.rename(old, tmp)
    finally:
        os.close(fd)
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(
    out: str | Path, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = ()
) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to write into; make it ``out`` on success.

    ``out`` is checked first (:func:`check_output` against ``inputs``: never an input,
    never a directory solar-ray did not write), then again before it is replaced. Stale
    temporaries of dead writers at the same ``out`` are removed. On any exception the
    temporary directory is removed and ``out`` is left as it was; a full disk becomes a
    one-line :class:`OutputWriteError`.
    """
    inputs = list(inputs)
    out = Path(out).expanduser().absolute()
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
    try:
        yield tmp
        check_output(out, overwrite, inputs)  # nothing appeared at out meanwhile
        write_json_atomic(
            tmp / OUTPUT_MARKER,
            # "id" is new at every write: an output made again is a new artifact
            # (solar_ray.identity.artifact_id), even when its bytes are the same
            {"format": OUTPUT_MARKER_FORMAT, "written_by": f"solar-ray {_version()}",
             "id": uuid.uuid4().hex},  # fmt: skip
        )
        _publish(tmp, out, prefix)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            raise OutputWriteError(
                f"no space left on the device while writing {out} ({e.strerror}); the partial "
                "output was removed: free some space or choose another output directory"
            ) from None
        raise
    finally:
        os.close(lock_fd)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("solar-ray")
    except metadata.PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------- hashes, lineage


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
    from solar_ray.models import cache_dir

    real = os.path.realpath(path)
    record = cache_dir() / "sha256" / (hashlib.sha256(real.encode()).hexdigest()[:32] + ".json")
    before = _file_state(os.stat(real))
    try:
        saved = json.loads(record.read_text())
        if saved.get("path") == real and saved.get("state") == before:
            return saved["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    digest = sha256_file(real)
    if _file_state(os.stat(real)) == before:
        with contextlib.suppress(OSError):  # a cache: no fsync, a lost record costs a re-read
            record.parent.mkdir(parents=True, exist_ok=True)
            tmp = record.with_name(f".{record.name}.tmp-{uuid.uuid4().hex[:8]}")
            tmp.write_text(json.dumps({"path": real, "state": before, "sha256": digest}))
            os.replace(tmp, record)
    return digest


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
        files[p.name] = (file_hashes or {}).get(p.name) or recorded_sha256(p)
    combined = hashlib.sha256(
        "".join(f"{k}:{v}\n" for k, v in sorted(files.items())).encode()
    ).hexdigest()
    return {"path": str(model_dir), "sha256": combined, "files": files}


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape an artifact, for the manifest."""
    return dict(_library_versions())


@functools.cache
def _library_versions() -> dict[str, str]:
    # once per process: each lookup scans the installed distributions (about 25 ms for
    # the nine, which the upscale writer looks up while its copy runs)
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
    """The directory's ``solar.json``, or None when it has none (not a finished output).

    A manifest that is not a JSON mapping (truncated, edited by hand) counts as none.
    """
    p = Path(model_dir) / MANIFEST_NAME
    if not p.is_file():
        return None
    manifest = _read_json(p)
    if not isinstance(manifest, dict):
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
