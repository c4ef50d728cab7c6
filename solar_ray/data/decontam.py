"""Decontamination: long word n-gram overlap with evaluation sets, and task deny lists.

A training row is contaminated when it shares a word n-gram (lower-cased ``\\w+`` words,
default 13) with an evaluation text; a text shorter than ``n`` words has no n-gram (the one
short-text rule, here only). Words are hashed once (blake2b, 64 bits) and n-gram hashes
computed with numpy. :func:`build_eval_index` builds the index on the driver; the
contamination report queries the same index (:meth:`EvalIndex.find`), so report and filter
agree by construction. See docs/data.md, "Mixing".
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from solar_ray.data.keys import hash64

__all__ = [
    "EvalIndex",
    "build_eval_index",
    "deny_match",
    "iter_strings",
    "ngram_hashes",
    "words",
]

_WORD = re.compile(r"\w+")
_BASE = np.uint64(0x100000001B3)  # FNV prime: the polynomial's base
_CACHE_LIMIT = 1 << 20


def words(text: str) -> list[str]:
    """The lower-cased word tokens n-grams are made of."""
    return _WORD.findall(text.lower())


class _WordHasher:
    """blake2b of each word, cached (words repeat a lot)."""

    def __init__(self) -> None:
        self.cache: dict[str, int] = {}

    def __call__(self, toks: list[str]) -> np.ndarray:
        if len(self.cache) > _CACHE_LIMIT:
            self.cache.clear()
        get = self.cache.get
        out = np.empty(len(toks), dtype=np.uint64)
        for i, t in enumerate(toks):
            h = get(t)
            if h is None:
                h = self.cache[t] = hash64(t)
            out[i] = h
        return out


_HASHER = _WordHasher()


def _windows(text: str, n: int) -> tuple[list[str], np.ndarray]:
    """The text's words and the uint64 hash of each n-word window, in text order.

    No window when the text has fewer than ``n`` words: the short-text rule.
    """
    toks = words(text)
    if len(toks) < n:
        return toks, np.empty(0, dtype=np.uint64)
    h = _HASHER(toks)
    windows = np.lib.stride_tricks.sliding_window_view(h, n)
    powers = np.ones(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n - 2, -1, -1):
            powers[j] = powers[j + 1] * _BASE
        return toks, (windows * powers).sum(axis=1, dtype=np.uint64)


def ngram_hashes(text: str, n: int) -> np.ndarray:
    """Sorted unique uint64 hashes of the text's word n-grams (empty when fewer than n words)."""
    return np.unique(_windows(text, n)[1])


def iter_strings(obj: Any) -> Iterator[str]:
    """Every string inside a record (nested lists and mappings included)."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from iter_strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from iter_strings(v)


@dataclass
class EvalIndex:
    """N-gram hashes of each evaluation set, sorted for binary search."""

    ngram: int
    sets: dict[str, np.ndarray] = field(default_factory=dict)
    """each set's sorted unique n-gram hashes"""
    num_texts: dict[str, int] = field(default_factory=dict)
    """each set's texts with at least one n-gram (the shorter ones are not checked)"""
    owners: dict[str, tuple[np.ndarray, np.ndarray, list[str]]] = field(default_factory=dict)
    """with ``owners=True``, per set: all hashes sorted, the index of each one's text, the ids"""

    @classmethod
    def build(
        cls, sets: Mapping[str, Iterable[tuple[str, str]]], ngram: int, *, owners: bool = False
    ) -> EvalIndex:
        """Index ``{set name: [(text id, text), ...]}``; ``owners`` keeps which text has
        which n-gram, for :meth:`find`."""
        index = cls(ngram=ngram)
        for name, texts in sets.items():
            chunks: list[np.ndarray] = []
            ids: list[str] = []
            for text_id, text in texts:
                h = ngram_hashes(text, ngram)
                if len(h):
                    chunks.append(h)
                    ids.append(text_id)
            flat = np.concatenate(chunks) if chunks else np.empty(0, np.uint64)
            index.sets[name] = np.unique(flat)
            index.num_texts[name] = len(ids)
            if owners:
                which = np.repeat(np.arange(len(ids)), [len(c) for c in chunks])
                order = np.argsort(flat, kind="stable")
                index.owners[name] = (flat[order], which[order], ids)
        return index

    def match(self, texts: Iterable[str]) -> str | None:
        """Name of the first eval set sharing an n-gram with any of ``texts``, else None."""
        if not self.sets:
            return None
        for text in texts:
            h = ngram_hashes(text, self.ngram)
            if not len(h):
                continue
            for name, ref in self.sets.items():
                if not len(ref):
                    continue
                idx = np.minimum(np.searchsorted(ref, h), len(ref) - 1)
                if bool(np.any(ref[idx] == h)):
                    return name
        return None

    def find(self, text: str) -> Iterator[tuple[str, str, str]]:
        """``(set, text id, n-gram)`` for each indexed n-gram of ``text``, in text order.

        Needs an index built with ``owners=True``; ``text`` has a hit exactly when
        :meth:`match` finds one.
        """
        toks, h = _windows(text, self.ngram)
        if not len(h):
            return
        for name, (keys, which, ids) in self.owners.items():
            lo, hi = np.searchsorted(keys, h, "left"), np.searchsorted(keys, h, "right")
            for i in np.flatnonzero(hi > lo):
                gram = " ".join(toks[i : i + self.ngram])
                for k in range(lo[i], hi[i]):
                    yield name, ids[which[k]], gram


def _record_strings(path: str) -> Iterator[tuple[str, str]]:
    """Every string of every readable record of an eval file, each its own text."""
    from solar_ray.data.sources import iter_records

    for rec in iter_records(path):
        if rec.data is not None:
            yield from ((path, s) for s in iter_strings(rec.data))


def build_eval_index(paths: list[str], ngram: int, field: str = "eval_sets") -> EvalIndex:
    """Read every eval set into an :class:`EvalIndex`.

    A file in any readable format (globs allowed; every string of each record is a text),
    or ``offline`` / ``offline:<task>``: the real benchmark items of
    :mod:`solar_ray.evalsets.benchmarks` (prompt + correct answer), so a mix can filter out
    exactly what the evaluation scores.
    """
    from solar_ray.data.sources import expand_paths
    from solar_ray.errors import UserError

    sets: dict[str, Iterable[tuple[str, str]]] = {}
    for i, pattern in enumerate(paths):
        if pattern == "offline" or pattern.startswith("offline:"):
            from solar_ray.evalsets.benchmarks import offline_sets

            try:
                offline = offline_sets(pattern) or {}
            except UserError as e:
                raise UserError(f"{field}.{i}: {e}") from None
            sets.update((f"offline:{name}", items) for name, items in offline.items())
            continue
        for path in expand_paths([pattern], field=f"{field}.{i}"):
            sets[path] = _record_strings(path)
    return EvalIndex.build(sets, ngram)


def deny_match(tag: str | None, patterns: list[str]) -> str | None:
    """The first deny pattern matching a task tag (or, for a bare word, its prefix), else None."""
    if not tag or not patterns:
        return None
    prefix = tag.split(".", 1)[0]
    for p in patterns:
        if fnmatch.fnmatchcase(tag, p) or fnmatch.fnmatchcase(prefix, p):
            return p
    return None
