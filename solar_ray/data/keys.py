"""Stable row identities and hashes: what makes a mix independent of the Ray worker count.

Every input row gets a *position* ``_pos`` (uint64): ``source index << 48 | file index << 32 |
record index``. It is unique within a mix, orders rows as the config lists them, and does not
depend on how Ray splits the work. Sampling and shuffling use :func:`mix64` of the position
and the seed (SplitMix64, a bijection on 64-bit integers, so distinct positions never tie).
Content hashes use blake2b, never Python's per-process ``hash``.
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = [
    "MAX_FILES_PER_SOURCE",
    "MAX_RECORDS_PER_FILE",
    "hash64",
    "make_pos",
    "mix64",
    "row_ref",
    "split_pos",
]

MAX_FILES_PER_SOURCE = 1 << 16
MAX_RECORDS_PER_FILE = 1 << 32

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray | int, seed: int = 0) -> np.ndarray:
    """SplitMix64 finaliser of ``x + (seed + 1) * golden``: a seeded bijection on uint64."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = x + np.uint64((seed + 1) & 0xFFFFFFFFFFFFFFFF) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def make_pos(source_idx: int, file_idx: int, record_idx: np.ndarray | int) -> np.ndarray:
    """The position of records ``record_idx`` of file ``file_idx`` of source ``source_idx``."""
    rec = np.asarray(record_idx, dtype=np.uint64)
    return (np.uint64(source_idx) << np.uint64(48)) | (np.uint64(file_idx) << np.uint64(32)) | rec


def split_pos(pos: np.ndarray | int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`make_pos`: (source index, file index, record index) arrays."""
    p = np.asarray(pos, dtype=np.uint64)
    return (
        (p >> np.uint64(48)).astype(np.int64),
        ((p >> np.uint64(32)) & np.uint64(0xFFFF)).astype(np.int64),
        (p & np.uint64(0xFFFFFFFF)).astype(np.int64),
    )


def hash64(data: str | bytes) -> int:
    """A stable 64-bit hash (blake2b) of a string or bytes."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def row_ref(pos: int, files: list[list[str]], file_types: list[list[str]]) -> str:
    """Where a row came from: ``path:LINE`` (1-based) for JSONL, ``path#INDEX`` (0-based
    record) for JSON, Parquet and CSV, the path alone for a whole file."""
    s, f, r = (int(x) for x in split_pos(pos))
    path = files[s][f]
    if r == MAX_RECORDS_PER_FILE - 1:
        return path
    if file_types[s][f] == "jsonl":
        return f"{path}:{r + 1}"
    return f"{path}#{r}"
