"""Mixes: read, normalize, filter, deduplicate, sample and order rows with Ray Data.

A mix is built in four passes (read, plan on the driver, select, write) whose result
depends on the config and the data only, never on how Ray split the work; see
docs/data.md ("Mixing", "Scale notes"). :func:`build_mix` writes a mix;
:func:`build_mix_dataset` returns it as a Ray Dataset; :func:`run_data` builds a whole
:class:`~solar_ray.data.config.DataConfig`; :func:`read_prepared` streams a written split.
"""

from __future__ import annotations

import concurrent.futures
import datetime as _dt
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from solar_ray.checkpoint import (
    atomic_output_dir,
    format_bytes,
    library_versions,
    local_inputs,
    write_json_atomic,
)
from solar_ray.cluster import init_ray
from solar_ray.data import prepare as prep
from solar_ray.data._ray import (
    collect,
    column_np,
    fetch,
    finish_split,
    num_files,
    ordered_context,
    share,
    sort_by_rank,
    task_pool,
    write_split,
)
from solar_ray.data.config import (
    SYNTH_MATH_DIR,
    DataConfig,
    MixConfig,
    config_hash,
)
from solar_ray.data.contract import (
    DATA_MANIFEST,
    LAYOUT,
    REJECT_SCHEMA,
    DataError,
    read_mix_manifest,
    shard_files,
    write_shard,
)
from solar_ray.data.decontam import EvalIndex, build_eval_index
from solar_ray.data.keys import MAX_FILES_PER_SOURCE, mix64, row_ref
from solar_ray.data.normalize import (
    FORMAT_CODES,
    REJECT_REASONS,
    FilterOptions,
    normalize_file,
    reject_table,
)
from solar_ray.data.sources import detect_file_type, expand_paths
from solar_ray.errors import UserError
from solar_ray.fs import fsspec_filesystem, local_path
from solar_ray.identity import sha256_file
from solar_ray.progress import Progress

__all__ = [
    "DataResult",
    "MixResult",
    "Selection",
    "SourcePlan",
    "build_mix",
    "build_mix_dataset",
    "build_mix_result",
    "compute_quotas",
    "plan_selection",
    "plan_sources",
    "read_prepared",
    "run_data",
]

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "solar-ray-data/1"
#: the steps a row goes through, in order; manifest counts are "rows left after" each
STEPS = ("read", "normalize", "length", "deny_tasks", "decontaminate", "dedup")
_ORDER_SALT = 0x5EED


@dataclass
class SourcePlan:
    """A source with its files resolved (on the driver)."""

    idx: int
    label: str
    files: list[str]
    fmt: str
    file_type: str
    text_field: str
    task_field: str | None
    weight: float | None
    max_samples: int | None


@dataclass
class MixResult:
    """What building a mix produced."""

    name: str
    kind: str
    out: Path | None
    """the mix directory (None for :func:`build_mix_dataset`)"""
    num_rows: int
    manifest: dict[str, Any]
    dataset: Any = None
    """the mix (or its prepared split) as a Ray Dataset, for :func:`build_mix_dataset`"""


@dataclass
class DataResult:
    """What :func:`run_data` produced: one :class:`MixResult` per mix, and the synth data."""

    out: Path
    mixes: dict[str, MixResult] = field(default_factory=dict)
    synth_math: Any = None


@dataclass
class Selection:
    """Which rows a mix takes, how many times, and where each copy lands in the mix."""

    pos: np.ndarray
    """uint64 positions, sorted, one entry per copy"""
    rank: np.ndarray
    """int64 rank in the mix of each entry of ``pos``"""

    @property
    def num_rows(self) -> int:
        """Rows in the mix (copies included)."""
        return len(self.pos)


# ---------------------------------------------------------------- planning (no Ray)


def plan_sources(
    mix: MixConfig, synth_dir: str | os.PathLike | None = None, field: str = "sources"
) -> list[SourcePlan]:
    """Resolve every source's files; a path that matches nothing names its config field."""
    plans = []
    for i, src in enumerate(mix.sources):
        if src.synth_math:
            if synth_dir is None:
                raise UserError(f"{field}.{i}.synth_math: no synthetic math directory was given")
            split = "instruct" if src.synth_math == "instruct" else "alignment"
            files = expand_paths(
                [str(Path(synth_dir) / split / "*.parquet")], f"{field}.{i}.synth_math"
            )
            fmt = "messages" if split == "instruct" else "preference"
        else:
            files = expand_paths(src.paths(), f"{field}.{i}.path")
            fmt = src.format
        if len(files) > MAX_FILES_PER_SOURCE:
            raise UserError(
                f"{field}.{i}.path: {len(files)} files; at most {MAX_FILES_PER_SOURCE} per source"
            )
        file_type = src.file_type
        if file_type == "auto":
            unknown = [f for f in files if detect_file_type(f) is None]
            if unknown:
                raise UserError(
                    f"{field}.{i}.file_type: cannot tell the type of {unknown[0]!r} from its "
                    "extension; set file_type (jsonl, json, parquet, csv)"
                )
        plans.append(
            SourcePlan(
                idx=i,
                label=src.label(),
                files=files,
                fmt=fmt,
                file_type=file_type,
                text_field=src.text_field,
                task_field=src.task_field,
                weight=src.weight,
                max_samples=src.max_samples,
            )
        )
    return plans


def compute_quotas(
    sources: list[SourcePlan], available: dict[int, int], num_samples: int | None
) -> tuple[dict[int, int], list[str]]:
    """Rows each source contributes, and warnings.

    ``max_samples`` sources take ``min(max_samples, available)``; sources with neither
    weight nor max_samples take everything; weighted sources split ``num_samples`` (or, unset,
    the largest total no source must repeat) by largest remainder, so the shares are exact
    to one row.
    """
    quotas: dict[int, int] = {}
    warnings: list[str] = []
    weighted = []
    for s in sources:
        a = available.get(s.idx, 0)
        if s.weight is None:
            quotas[s.idx] = a if s.max_samples is None else min(a, s.max_samples)
            if s.max_samples is not None and a < s.max_samples:
                warnings.append(
                    f"source {s.label!r}: max_samples {s.max_samples} > {a} rows available"
                )
        elif a == 0:
            quotas[s.idx] = 0
            warnings.append(f"source {s.label!r} has no rows left; its weight is ignored")
        else:
            weighted.append(s)
    if weighted:
        total_w = sum(s.weight for s in weighted)  # type: ignore[misc]
        if num_samples is None:
            total = min(math.floor(available[s.idx] * total_w / s.weight + 1e-9) for s in weighted)  # type: ignore[operator]
        else:
            total = num_samples
        exact = [total * s.weight / total_w for s in weighted]  # type: ignore[operator]
        base = [math.floor(x + 1e-9) for x in exact]
        left = total - sum(base)
        order = sorted(range(len(weighted)), key=lambda k: (-(exact[k] - base[k]), k))
        for k in order[:left]:
            base[k] += 1
        for s, q in zip(weighted, base, strict=True):
            quotas[s.idx] = q
            if q > available[s.idx]:
                warnings.append(
                    f"source {s.label!r}: {q} rows asked, {available[s.idx]} available; rows repeat"
                )
    return quotas, warnings


#: bytes the selection plan holds per selected row (positions, ranks, copies, sort keys)
_PLAN_BYTES_PER_ROW = 64
#: the most Parquet files one split of a mix may be written as
MAX_SHARD_FILES = 100_000


def check_selection_size(mix: MixConfig, num_rows: int) -> None:
    """Refuse a mix whose selection would not fit in memory or would make too many files.

    Only weighted sources with ``num_samples`` can ask for more rows than the sources hold
    (rows repeat); this runs before the plan is allocated.
    """
    import psutil

    need = num_rows * _PLAN_BYTES_PER_ROW
    available = psutil.virtual_memory().available
    if need > available // 2:
        raise UserError(
            f"num_samples: the mix would select {num_rows:,} rows, whose plan alone needs "
            f"about {format_bytes(need)} of memory ({format_bytes(available)} available); "
            "lower num_samples"
        )
    num_files = -(-num_rows // mix.rows_per_file)
    if num_files > MAX_SHARD_FILES:
        raise UserError(
            f"rows_per_file: {num_rows:,} rows at {mix.rows_per_file:,} per file would make "
            f"{num_files:,} Parquet files (at most {MAX_SHARD_FILES:,}); raise rows_per_file"
        )


def plan_selection(pos: np.ndarray, quotas: dict[int, int], seed: int) -> Selection:
    """Pick ``quotas[source]`` copies from each source's positions and rank all of them.

    Within a source, rows are taken in order of ``mix64(pos, seed)`` (a seeded random
    sample without replacement); a quota above the rows available repeats every row
    ``quota // available`` times and samples the rest. The mix order sorts the copies by
    a second hash of (position, copy). Positions only: no dependence on worker count.
    """
    pos = np.asarray(pos, dtype=np.uint64)
    src = (pos >> np.uint64(48)).astype(np.int64)
    chosen: list[np.ndarray] = []
    copies: list[np.ndarray] = []
    for s, q in sorted(quotas.items()):
        rows = np.sort(pos[src == s])
        a = len(rows)
        if q <= 0 or a == 0:
            continue
        reps, rem = divmod(q, a)
        count = np.full(a, reps, dtype=np.int64)
        if rem:
            keys = mix64(rows, seed)
            take = np.argpartition(keys, rem - 1)[:rem]
            count[take] += 1
        nz = count > 0
        rows, count = rows[nz], count[nz]
        rep_rows = np.repeat(rows, count)
        starts = np.cumsum(count) - count
        copy_idx = np.arange(len(rep_rows), dtype=np.int64) - np.repeat(starts, count)
        chosen.append(rep_rows)
        copies.append(copy_idx)
    if not chosen:
        return Selection(np.empty(0, np.uint64), np.empty(0, np.int64))
    sel = np.concatenate(chosen)
    cp = np.concatenate(copies).astype(np.uint64)
    with np.errstate(over="ignore"):
        order_key = mix64(mix64(sel, seed + _ORDER_SALT) + cp, seed)
    rank = np.empty(len(sel), dtype=np.int64)
    rank[np.argsort(order_key, kind="stable")] = np.arange(len(sel), dtype=np.int64)
    by_pos = np.lexsort((cp, sel))
    return Selection(sel[by_pos], rank[by_pos])


def plan_dedup(pos: np.ndarray, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact duplicates: (positions to drop, sorted; the position each duplicates).

    The kept copy of every content hash is the one with the smallest position (first in
    config order: source, file, record).
    """
    order = np.lexsort((pos, hashes))
    h, p = hashes[order], pos[order]
    dup = np.zeros(len(h), dtype=bool)
    dup[1:] = h[1:] == h[:-1]
    group_start = np.maximum.accumulate(np.where(~dup, np.arange(len(h)), 0))
    drop, kept = p[dup], p[group_start[dup]]
    o = np.argsort(drop)
    return drop[o], kept[o]


# ---------------------------------------------------------------- Ray passes


def _read_files(batch: pa.Table, job: list) -> Any:
    spec = fetch(job)
    for row in batch.to_pylist():
        s = spec["sources"][row["source_idx"]]
        yield from normalize_file(
            row["path"],
            kind=spec["kind"],
            source_idx=row["source_idx"],
            file_idx=row["file_idx"],
            source=s["label"],
            fmt=s["fmt"],
            file_type=s["file_type"],
            text_field=s["text_field"],
            task_field=s["task_field"],
            filters=spec["filters"],
        )


def _reject_table(
    batch: pa.Table, mask: np.ndarray, reasons: list, details: list, refs: dict
) -> pa.Table:
    idx = pa.array(np.nonzero(mask)[0])
    pos = column_np(batch, "_pos", np.uint64)[idx.to_numpy()]
    raws = batch.column("_raw").take(idx).to_pylist() if "_raw" in batch.column_names else None
    return reject_table(batch.column("source").take(idx), pos, reasons, details, refs, raws)


def _select(batch: pa.Table, plan: list, reject_dir: str | None, keep: list[str]) -> pa.Table:
    p = fetch(plan)
    pos = column_np(batch, "_pos", np.uint64)
    valid = pc.is_null(batch.column("_reason")).to_numpy(zero_copy_only=False)
    dup = np.zeros(len(pos), dtype=bool)
    if len(p["dup_pos"]):
        i = np.minimum(np.searchsorted(p["dup_pos"], pos), len(p["dup_pos"]) - 1)
        dup = valid & (p["dup_pos"][i] == pos)
    if reject_dir is not None and len(pos) and (not valid.all() or dup.any()):
        bad = ~valid | dup
        reasons = batch.column("_reason").to_pylist()
        details = batch.column("_detail").to_pylist()
        dup_of = {}
        if dup.any():
            i = np.searchsorted(p["dup_pos"], pos[dup])
            dup_of = dict(zip(pos[dup].tolist(), p["dup_of"][i].tolist(), strict=True))
        r_out, d_out = [], []
        for k in np.nonzero(bad)[0]:
            if dup[k]:
                r_out.append("duplicate")
                d_out.append(
                    "duplicate of " + row_ref(dup_of[int(pos[k])], p["files"], p["file_types"])
                )
            else:
                r_out.append(reasons[k])
                d_out.append(details[k])
        table = _reject_table(batch, bad, r_out, d_out, p)
        write_shard(table, reject_dir, f"part-0-{int(pos.min()):016x}.parquet")
    keep_mask = valid & ~dup
    kept = np.nonzero(keep_mask)[0]
    sel_pos, sel_rank = p["sel_pos"], p["sel_rank"]
    left = np.searchsorted(sel_pos, pos[kept], "left")
    right = np.searchsorted(sel_pos, pos[kept], "right")
    counts = right - left
    take = np.repeat(kept, counts)
    starts = np.repeat(left, counts)
    within = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(
        np.cumsum(counts) - counts, counts
    )
    ranks = sel_rank[starts + within]
    out = batch.select(keep).take(pa.array(take, pa.int64()))
    return out.append_column("_rank", pa.array(ranks, pa.int64()))


# ---------------------------------------------------------------- counting


def _step_counts(
    src: np.ndarray, reasons: list, sources: list[SourcePlan], dup_src: np.ndarray
) -> tuple[dict, dict]:
    """Rows left after every step per source, and rejects by reason per source."""
    table = pa.table({"src": pa.array(src, pa.int64()), "reason": pa.array(reasons, pa.string())})
    grouped = table.group_by(["src", "reason"], use_threads=False).aggregate([("src", "count")])
    rejects: dict[int, dict[str, int]] = {s.idx: {} for s in sources}
    for s_idx, reason, n in zip(
        *(grouped.column(c).to_pylist() for c in ("src", "reason", "src_count")), strict=True
    ):
        if reason is not None:
            rejects[s_idx][reason] = n
    for s_idx, n in zip(*np.unique(dup_src, return_counts=True), strict=True):
        rejects[int(s_idx)]["duplicate"] = int(n)
    totals = dict(zip(*np.unique(src, return_counts=True), strict=True)) if len(src) else {}
    counts: dict[int, dict[str, int]] = {}
    for s in sources:
        left = int(totals.get(s.idx, 0))
        c = {"records": left}
        for step in STEPS:
            left -= sum(n for r, n in rejects[s.idx].items() if REJECT_REASONS.get(r) == step)
            c[f"after_{step}"] = left
        counts[s.idx] = c
    return counts, rejects


def _file_info(path: str) -> dict[str, Any]:
    local = local_path(path)
    if local is not None:
        return {"path": path, "bytes": os.path.getsize(local), "sha256": sha256_file(local)}
    try:
        fs, inner = fsspec_filesystem(path)
        info = fs.info(inner)
        return {
            "path": path,
            "bytes": info.get("size"),
            "etag": info.get("ETag") or info.get("etag"),
        }
    except Exception:  # provenance is best effort for remote files
        return {"path": path}


# ---------------------------------------------------------------- the build


@dataclass
class _Read:
    """What the read pass produced: the rows (on Ray) and where they came from."""

    rows: Any  # every row read, normalized and filtered (a Ray Dataset)
    refs: dict[str, list[list[str]]]  # ``files`` and ``file_types`` per source, for row_ref
    file_infos: dict[int, list[dict[str, Any]]]
    eval_index: EvalIndex | None


@dataclass
class _Plan:
    """The driver's plan over the compact columns: counts, duplicates, quotas, selection."""

    src: np.ndarray  # the source index of every row read
    fmt_codes: np.ndarray
    dup_pos: np.ndarray
    dup_of: np.ndarray
    counts: dict[int, dict[str, int]]
    rejects: dict[int, dict[str, int]]
    available: dict[int, int]
    quotas: dict[int, int]
    warnings: list[str]
    selection: Selection


def _read_pass(mix: MixConfig, sources: list[SourcePlan], num_workers: int | None) -> _Read:
    """1. read: one Ray task per file normalizes it and applies the per-row filters."""
    import ray.data

    decon = mix.decontaminate
    eval_index = None
    if decon is not None and decon.eval_sets:
        eval_index = build_eval_index(decon.eval_sets, decon.ngram, field="decontaminate.eval_sets")
    filters = FilterOptions(
        kind=mix.kind,
        max_chars=mix.max_chars,
        deny_tasks=list(decon.deny_tasks) if decon else [],
        eval_index=eval_index,
    )
    keys = ("label", "fmt", "file_type", "text_field", "task_field")
    job = share(
        {
            "kind": mix.kind,
            "filters": filters,
            "sources": {s.idx: {k: getattr(s, k) for k in keys} for s in sources},
        }
    )
    refs = {
        "files": [s.files for s in sources],
        "file_types": [
            [s.file_type if s.file_type != "auto" else (detect_file_type(f) or "jsonl")
             for f in s.files]
            for s in sources
        ],
    }  # fmt: skip
    items = [
        {"source_idx": s.idx, "file_idx": j, "path": f}
        for s in sources
        for j, f in enumerate(s.files)
    ]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        info_futures = {s.idx: [pool.submit(_file_info, f) for f in s.files] for s in sources}
        with ordered_context():
            rows = (
                ray.data.from_items(items, override_num_blocks=len(items))
                .map_batches(
                    _read_files,
                    batch_size=1,
                    batch_format="pyarrow",
                    fn_kwargs={"job": job},
                    compute=task_pool(num_workers),
                )
                .materialize()
            )
        file_infos = {i: [f.result() for f in fs] for i, fs in info_futures.items()}
    return _Read(rows, refs, file_infos, eval_index)


def _plan(mix: MixConfig, sources: list[SourcePlan], rows: Any) -> _Plan:
    """2. plan, on the driver: counts, exact duplicates, quotas and the selection."""
    compact = collect(
        rows, {"_pos": pa.uint64(), "_hash": pa.uint64(), "_fmt": pa.int8(), "_reason": pa.string()}
    )
    pos = column_np(compact, "_pos", np.uint64)
    valid = pc.is_null(compact.column("_reason")).to_numpy(zero_copy_only=False)
    src = (pos >> np.uint64(48)).astype(np.int64)
    if mix.dedup:
        dup_pos, dup_of = plan_dedup(pos[valid], column_np(compact, "_hash", np.uint64)[valid])
    else:
        dup_pos, dup_of = np.empty(0, np.uint64), np.empty(0, np.uint64)
    dup_src = (dup_pos >> np.uint64(48)).astype(np.int64)
    counts, rejects = _step_counts(src, compact.column("_reason").to_pylist(), sources, dup_src)
    available = {s.idx: counts[s.idx]["after_dedup"] for s in sources}
    quotas, warnings = compute_quotas(sources, available, mix.num_samples)
    check_selection_size(mix, sum(quotas.values()))
    keep_pos = pos[valid]
    if len(dup_pos):
        keep_pos = keep_pos[~np.isin(keep_pos, dup_pos)]
    selection = plan_selection(keep_pos, quotas, mix.seed)
    fmt_codes = column_np(compact, "_fmt", np.int64)
    return _Plan(src, fmt_codes, dup_pos, dup_of, counts, rejects, available, quotas, warnings,
                 selection)  # fmt: skip


def _select_pass(
    mix: MixConfig, read: _Read, plan: _Plan, sink: Path | None, num_workers: int | None
) -> Any:
    """3. select: keep the selected rows with their rank (quarantined ones to ``rejects/``)
    and sort them into mix order; returns the ordered, materialized Dataset."""
    shared = share(
        {
            "dup_pos": plan.dup_pos,
            "dup_of": plan.dup_of,
            "sel_pos": plan.selection.pos,
            "sel_rank": plan.selection.rank,
            **read.refs,
        }
    )
    keep_cols = [*LAYOUT[mix.kind].data.names, "_pos"]
    reject_dir = str(sink / "rejects") if sink is not None else None
    with ordered_context():
        selected = read.rows.map_batches(
            _select,
            batch_format="pyarrow",
            fn_kwargs={"plan": shared, "reject_dir": reject_dir, "keep": keep_cols},
            compute=task_pool(num_workers),
        )
        return sort_by_rank(
            selected, "_rank", plan.selection.num_rows, mix.rows_per_file
        ).materialize()


def _write_pass(
    mix: MixConfig,
    ordered: Any,
    plan: _Plan,
    sources: list[SourcePlan],
    sink: Path | None,
    num_workers: int | None,
    prepared: bool,
    refs: dict[str, list[list[str]]],
) -> tuple[dict[str, Any], dict[str, Any] | None, Any]:
    """4. write ``data/`` and ``rejects/`` and prepare (into ``sink``, or as a Dataset).

    Returns ``(splits of the manifest, preparation entry or None, the output Dataset)``;
    the preparation's rejects are added to ``plan.rejects``.
    """
    schema = LAYOUT[mix.kind].data
    split_info: dict[str, Any] = {}
    if sink is not None:
        written = write_split(ordered, sink / "data", "_rank", schema, num_workers)
        assert written == plan.selection.num_rows, "written rows differ from the plan"
        finish_split(sink / "rejects", REJECT_SCHEMA)
        split_info["data"] = {"num_rows": written, "num_files": num_files(sink / "data")}
    out_ds = ordered.select_columns(schema.names)
    if mix.prepare is None or (sink is None and not prepared):
        return split_info, None, out_ds
    prep_ds, prep_info = prep.prepare(ordered, mix, sink, num_workers, refs)
    for reason, n in prep_info.get("rejects", {}).items():
        for s_label, k in n.items():
            idx = next(s.idx for s in sources if s.label == s_label)
            plan.rejects[idx][reason] = plan.rejects[idx].get(reason, 0) + k
    if sink is not None:
        split = prep_info["split"]
        split_info[split] = {"num_rows": prep_info["num_rows"], "num_files": num_files(sink / split)}
    return split_info, prep_info, prep_ds if prepared else out_ds


def _manifest(
    mix: MixConfig,
    sources: list[SourcePlan],
    read: _Read,
    plan: _Plan,
    split_info: dict[str, Any],
    prep_info: dict[str, Any] | None,
) -> dict[str, Any]:
    """The mix's ``manifest.json``: counts per source after every step, rejects, tokens."""
    selection, decon = plan.selection, mix.decontaminate
    sel_src = (selection.pos >> np.uint64(48)).astype(np.int64)
    selected_by_src = (
        dict(zip(*np.unique(sel_src, return_counts=True), strict=True)) if len(sel_src) else {}
    )
    by_reason: dict[str, int] = {}
    for r in plan.rejects.values():
        for reason, n in r.items():
            by_reason[reason] = by_reason.get(reason, 0) + n
    source_entries = {}
    for s in sources:
        codes = plan.fmt_codes[plan.src == s.idx]
        fmts = {
            FORMAT_CODES[c] if c >= 0 else "unknown": int(n)
            for c, n in zip(*np.unique(codes, return_counts=True), strict=True)
        }
        n_sel = int(selected_by_src.get(s.idx, 0))
        source_entries[s.label] = {
            "format": s.fmt,
            "detected_formats": fmts,
            "weight": s.weight,
            "max_samples": s.max_samples,
            "files": read.file_infos[s.idx],
            "counts": {**plan.counts[s.idx], "selected": n_sel},
            "quota": plan.quotas.get(s.idx, 0),
            "repeats": max(0, n_sel - plan.available[s.idx]),
            "share": n_sel / selection.num_rows if selection.num_rows else 0.0,
            "rejects": dict(sorted(plan.rejects[s.idx].items())),
        }
    eval_sets = read.eval_index.sets.items() if read.eval_index else []
    return {
        "format": MANIFEST_FORMAT,
        "stage": "data",
        "name": mix.name,
        "kind": mix.kind,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "config": mix.to_dict(),
        "config_hash": config_hash(mix),
        "num_rows": selection.num_rows,
        "columns": LAYOUT[mix.kind].data.names,
        "splits": split_info,
        "steps": list(STEPS),
        "sources": source_entries,
        "rejects": {
            "total": int(sum(by_reason.values())),
            "by_reason": dict(sorted(by_reason.items())),
        },
        "decontaminate": None
        if decon is None
        else {
            "ngram": decon.ngram,
            "deny_tasks": decon.deny_tasks,
            "eval_sets": {k: int(len(v)) for k, v in eval_sets},
        },
        "tokens": None
        if prep_info is None
        else {"total": prep_info["num_tokens"], "by_source": prep_info["tokens_by_source"]},
        "prepare": prep_info,
        "warnings": plan.warnings,
        "versions": library_versions(),
    }


def _build(
    mix: MixConfig,
    sink: Path | None,
    synth_dir: str | os.PathLike | None,
    num_workers: int | None,
    prepared: bool,
) -> MixResult:
    """Build one mix in the four passes of the module docstring."""
    sources = plan_sources(mix, synth_dir)
    read = _read_pass(mix, sources, num_workers)
    plan = _plan(mix, sources, read.rows)
    ordered = _select_pass(mix, read, plan, sink, num_workers)
    read.rows = None  # the read rows are in ``ordered`` now; free the object store
    split_info, prep_info, out_ds = _write_pass(
        mix, ordered, plan, sources, sink, num_workers, prepared, read.refs
    )
    manifest = _manifest(mix, sources, read, plan, split_info, prep_info)
    if plan.selection.num_rows == 0:
        log.warning("mix %r is empty: every row was rejected or none was asked for", mix.name)
    return MixResult(mix.name, mix.kind, sink, plan.selection.num_rows, manifest, out_ds)


def build_mix(
    mix: MixConfig,
    out_dir: str | os.PathLike,
    *,
    synth_dir: str | os.PathLike | None = None,
    num_workers: int | None = None,
    overwrite: bool = False,
) -> MixResult:
    """Build one mix into ``out_dir`` (``data/``, ``rejects/``, prepared split, manifest).

    Written atomically: into a temporary sibling renamed into place, ``manifest.json``
    last. ``synth_dir`` is where the ``synth_math`` block wrote (for ``synth_math``
    sources). Needs Ray initialised (or lets Ray Data start a local instance).
    """
    inputs = local_inputs(*(p for s in mix.sources for p in s.paths()))
    if mix.prepare is not None:
        inputs += local_inputs(mix.prepare.tokenizer)
    with atomic_output_dir(out_dir, overwrite=overwrite, inputs=inputs) as tmp:
        result = _build(mix, Path(tmp), synth_dir, num_workers, prepared=False)
        result.manifest["path"] = str(Path(out_dir).absolute())
        write_json_atomic(Path(tmp) / DATA_MANIFEST, result.manifest)
    result.out = Path(out_dir).absolute()
    result.dataset = None
    return result


def build_mix_dataset(
    mix: MixConfig,
    *,
    synth_dir: str | os.PathLike | None = None,
    num_workers: int | None = None,
    prepared: bool = False,
) -> Any:
    """The mix as a Ray Dataset in mix order, without writing anything.

    Columns as in ``data/``; with ``prepared=True`` (and a ``prepare:`` block) the packed
    or tokenized rows instead. Suitable for ``ray.train.get_dataset_shard``. For the
    manifest too (counts, rejects, tokens), call :func:`build_mix_result`.
    """
    return build_mix_result(
        mix, synth_dir=synth_dir, num_workers=num_workers, prepared=prepared
    ).dataset


def build_mix_result(
    mix: MixConfig,
    *,
    synth_dir: str | os.PathLike | None = None,
    num_workers: int | None = None,
    prepared: bool = False,
) -> MixResult:
    """Like :func:`build_mix_dataset`, returning the :class:`MixResult` (dataset + manifest)."""
    if prepared and mix.prepare is None:
        raise UserError(f"mix {mix.name!r}: prepared=True needs a 'prepare:' block")
    return _build(mix, None, synth_dir, num_workers, prepared=prepared)


def read_prepared(path: str | os.PathLike, split: str = "auto") -> Any:
    """Stream a written split of a mix as a Ray Dataset, rows in mix order.

    ``split``: ``data``, ``packed`` (pretrain), ``tokenized`` (sft, preference) or ``auto``
    (the prepared split when the mix has one, else ``data``). ``path`` is the mix directory
    (local or a URI); it must hold a manifest.
    """
    import ray.data

    manifest = read_mix_manifest(path)
    if split == "auto":
        split = (manifest.get("prepare") or {}).get("split", "data")
    if split not in manifest.get("splits", {}) and split != "rejects":
        raise DataError(
            f"{path}: no {split!r} split (has {', '.join(manifest.get('splits', {}))})"
        )
    with ordered_context():
        return ray.data.read_parquet(shard_files(path, split), shuffle=None)


# ---------------------------------------------------------------- the whole config


def run_data(cfg: DataConfig, only: list[str] | None = None) -> DataResult:
    """Build everything a :class:`DataConfig` describes: the synthetic math, then each mix.

    ``only`` restricts to the named mixes. The synthetic math set is regenerated only when
    its config changed (its manifest records the config hash). Starts or joins Ray first.
    """
    from solar_ray.data.synth_math import run_synth_math

    out = Path(cfg.out).absolute()
    names = [m.name for m in cfg.mixes]
    for n in only or []:
        if n not in names:
            raise UserError(f"--only {n!r}: no such mix (have {', '.join(names) or 'none'})")
    init_ray()  # joins the cluster RAY_ADDRESS names, else starts a local instance
    result = DataResult(out=out)
    synth_dir = out / SYNTH_MATH_DIR
    needs_synth = cfg.synth_math is not None and (
        not only or any(s.synth_math for m in cfg.mixes if m.name in only for s in m.sources)
    )
    if needs_synth:
        assert cfg.synth_math is not None
        result.synth_math = run_synth_math(cfg.synth_math, synth_dir)
    # Ray Data draws its own per-operator row bars in a terminal; elsewhere they would
    # flood the log, so each mix's row count is logged as it finishes
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    shown = Progress("data", None, "rows", terminal=False, interval_s=0)
    for i, mix in enumerate(cfg.mixes):
        if only and mix.name not in only:
            continue
        try:
            res = build_mix(
                mix,
                out / mix.name,
                synth_dir=synth_dir if cfg.synth_math is not None else None,
                num_workers=cfg.num_workers,
                overwrite=cfg.overwrite,
            )
        except UserError as e:
            raise type(e)(f"mixes.{i} ({mix.name}): {e}") from None
        result.mixes[mix.name] = res
        log.info("mix %s: %d rows -> %s", mix.name, res.num_rows, res.out)
        shown.update(res.num_rows)
    shown.close()
    return result
