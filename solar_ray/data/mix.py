"""Mixes: read, normalize, filter, deduplicate, sample and order rows with Ray Data.

A mix is built in passes over Ray Data, with the driver planning between them on compact
columns only (positions, hashes, reasons: ~20 bytes a row):

1. **read** (one task per file): :func:`~solar_ray.data.normalize.normalize_file` reads,
   normalizes and applies the per-row filters (``max_chars``, ``deny_tasks``, the n-gram
   eval index); bad rows become reject rows, never errors.
2. **plan** (driver): counts per source after every step; exact-duplicate removal keeps the
   first occurrence in config order (smallest position); quotas from ``max_samples`` and
   weights; which rows (and how many copies) each quota takes, by ranking
   :func:`~solar_ray.data.keys.mix64` of the row position with the seed; and the global
   order of the mix, by the same hash of (position, copy). All of it depends on the config
   and the data only, never on how Ray split the work.
3. **select** (Ray): every task keeps its selected rows with their global rank, writing its
   quarantined rows to ``rejects/``; a sort on the rank with known boundaries puts the mix
   in order.
4. **write** ``data/`` shards, then the optional preparation
   (:mod:`solar_ray.data.prepare`), then ``manifest.json``, last, all inside a temporary
   sibling directory renamed into place.

:func:`build_mix` writes a mix; :func:`build_mix_dataset` returns it as a Ray Dataset (for
in-process use and ``get_dataset_shard`` in Ray Train); :func:`run_data` builds a whole
:class:`~solar_ray.data.config.DataConfig`; :func:`read_prepared` streams a written split.
"""

from __future__ import annotations

import concurrent.futures
import datetime as _dt
import logging
import math
import os
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
    sha256_file,
    write_json_atomic,
)
from solar_ray.data._ray import (
    collect,
    column_np,
    execute,
    fetch,
    ordered_context,
    share,
    sort_by_rank,
    task_pool,
)
from solar_ray.data.config import (
    SYNTH_MATH_DIR,
    DataConfig,
    MixConfig,
    config_hash,
)
from solar_ray.data.decontam import build_eval_index
from solar_ray.data.keys import MAX_FILES_PER_SOURCE, MAX_RECORDS_PER_FILE, mix64, split_pos
from solar_ray.data.normalize import (
    FORMAT_CODES,
    REJECT_REASONS,
    REJECT_SCHEMA,
    FilterOptions,
    data_schema,
    normalize_file,
)
from solar_ray.data.shards import DATA_MANIFEST, DataOutputError, read_data_manifest, write_shard
from solar_ray.data.sources import detect_file_type, expand_paths, filesystem_for
from solar_ray.errors import UserError

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


# ---------------------------------------------------------------- references


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
    idx = np.nonzero(mask)[0]
    pos = column_np(batch, "_pos", np.uint64)[idx]
    raws = (
        batch.column("_raw").take(pa.array(idx)).to_pylist()
        if "_raw" in batch.column_names
        else [None] * len(idx)
    )
    return pa.table(
        {
            "source": batch.column("source").take(pa.array(idx)),
            "ref": [row_ref(p, refs["files"], refs["file_types"]) for p in pos],
            "step": [REJECT_REASONS.get(r, "other") for r in reasons],
            "reason": reasons,
            "detail": details,
            "raw": raws,
        },
        schema=REJECT_SCHEMA,
    )


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


def write_ranked(batch: pa.Table, directory: str, rank_col: str, columns: list[str]) -> pa.Table:
    """Write a batch of ranked rows as one shard named by its first rank; return its stats."""
    if batch.num_rows == 0:
        return pa.table({"file": pa.array([], pa.string()), "num_rows": pa.array([], pa.int64())})
    batch = batch.take(pc.sort_indices(batch, [(rank_col, "ascending")]))
    first = int(batch.column(rank_col)[0].as_py())
    name = f"part-{first:012d}.parquet"
    write_shard(batch.select(columns), directory, name)
    return pa.table({"file": [name], "num_rows": pa.array([batch.num_rows], pa.int64())})


def write_split(
    ds: Any, directory: Path, rank_col: str, schema: pa.Schema, num_workers: int | None
) -> int:
    """Write a dataset of ranked rows as the shards of one split; return the rows written.

    Each block becomes a shard named by its first rank (blocks of a rank-sorted dataset hold
    consecutive ranks), so the shards in name order hold the rows in rank order.
    """
    with ordered_context():
        stats = execute(
            ds.map_batches(
                write_ranked,
                batch_size=None,
                batch_format="pyarrow",
                fn_kwargs={
                    "directory": str(directory),
                    "rank_col": rank_col,
                    "columns": schema.names,
                },
                compute=task_pool(num_workers),
            )
        )
    finish_split(directory, schema)
    return int(pc.sum(stats.column("num_rows")).as_py() or 0) if stats.num_rows else 0


def _num_files(directory: Path) -> int:
    return len(list(directory.glob("part-*.parquet")))


def finish_split(directory: Path, schema: pa.Schema) -> None:
    """Give an empty split one empty shard, so readers always find its schema."""
    directory.mkdir(parents=True, exist_ok=True)
    if not any(directory.glob("part-*.parquet")):
        write_shard(schema.empty_table(), directory, "part-000000000000.parquet")


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
    if "://" not in path or path.startswith("file://"):
        p = path.removeprefix("file://")
        return {"path": path, "bytes": os.path.getsize(p), "sha256": sha256_file(p)}
    try:
        fs, inner = filesystem_for(path)
        info = fs.info(inner)
        return {
            "path": path,
            "bytes": info.get("size"),
            "etag": info.get("ETag") or info.get("etag"),
        }
    except Exception:  # provenance is best effort for remote files
        return {"path": path}


# ---------------------------------------------------------------- the build


def _build(
    mix: MixConfig,
    sink: Path | None,
    synth_dir: str | os.PathLike | None,
    num_workers: int | None,
    prepared: bool,
) -> MixResult:
    import ray.data

    from solar_ray.data import prepare as prep

    kind = mix.kind
    sources = plan_sources(mix, synth_dir)
    decon = mix.decontaminate
    eval_index = None
    if decon is not None and decon.eval_sets:
        eval_index = build_eval_index(decon.eval_sets, decon.ngram, field="decontaminate.eval_sets")
    filters = FilterOptions(
        kind=kind,
        max_chars=mix.max_chars,
        deny_tasks=list(decon.deny_tasks) if decon else [],
        eval_index=eval_index,
    )
    job = share(
        {
            "kind": kind,
            "filters": filters,
            "sources": {
                s.idx: {
                    "label": s.label,
                    "fmt": s.fmt,
                    "file_type": s.file_type,
                    "text_field": s.text_field,
                    "task_field": s.task_field,
                }
                for s in sources
            },
        }
    )
    files_by_source = [s.files for s in sources]
    types_by_source = [
        [
            s.file_type if s.file_type != "auto" else (detect_file_type(f) or "jsonl")
            for f in s.files
        ]
        for s in sources
    ]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        info_futures = {s.idx: [pool.submit(_file_info, f) for f in s.files] for s in sources}
        items = [
            {"source_idx": s.idx, "file_idx": j, "path": f}
            for s in sources
            for j, f in enumerate(s.files)
        ]
        with ordered_context():
            stage_a = (
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

    compact = collect(
        stage_a,
        {"_pos": pa.uint64(), "_hash": pa.uint64(), "_fmt": pa.int8(), "_reason": pa.string()},
    )
    pos = column_np(compact, "_pos", np.uint64)
    hashes = column_np(compact, "_hash", np.uint64)
    reasons = compact.column("_reason").to_pylist()
    valid = pc.is_null(compact.column("_reason")).to_numpy(zero_copy_only=False)
    src = (pos >> np.uint64(48)).astype(np.int64)
    if mix.dedup:
        dup_pos, dup_of = plan_dedup(pos[valid], hashes[valid])
    else:
        dup_pos, dup_of = np.empty(0, np.uint64), np.empty(0, np.uint64)
    dup_src = (dup_pos >> np.uint64(48)).astype(np.int64)
    counts, rejects = _step_counts(src, reasons, sources, dup_src)
    available = {s.idx: counts[s.idx]["after_dedup"] for s in sources}
    quotas, warnings = compute_quotas(sources, available, mix.num_samples)
    check_selection_size(mix, sum(quotas.values()))
    keep_pos = pos[valid]
    if len(dup_pos):
        keep_pos = keep_pos[~np.isin(keep_pos, dup_pos)]
    selection = plan_selection(keep_pos, quotas, mix.seed)
    fmt_codes = column_np(compact, "_fmt", np.int64)
    del compact, hashes, reasons

    plan = share(
        {
            "dup_pos": dup_pos,
            "dup_of": dup_of,
            "sel_pos": selection.pos,
            "sel_rank": selection.rank,
            "files": files_by_source,
            "file_types": types_by_source,
        }
    )
    keep_cols = [*data_schema(kind).names, "_pos"]
    reject_dir = str(sink / "rejects") if sink is not None else None
    with ordered_context():
        selected = stage_a.map_batches(
            _select,
            batch_format="pyarrow",
            fn_kwargs={"plan": plan, "reject_dir": reject_dir, "keep": keep_cols},
            compute=task_pool(num_workers),
        )
        ordered = sort_by_rank(
            selected, "_rank", selection.num_rows, mix.rows_per_file
        ).materialize()
    del stage_a

    data_cols = data_schema(kind).names
    split_info: dict[str, Any] = {}
    if sink is not None:
        written = write_split(ordered, sink / "data", "_rank", data_schema(kind), num_workers)
        assert written == selection.num_rows, "written rows differ from the plan"
        finish_split(sink / "rejects", REJECT_SCHEMA)
        split_info["data"] = {"num_rows": written, "num_files": _num_files(sink / "data")}

    prep_info = None
    out_ds = ordered.select_columns(data_cols)
    if mix.prepare is not None and (sink is not None or prepared):
        prep_ds, prep_info = prep.prepare(
            ordered,
            mix,
            sink,
            num_workers,
            {"files": files_by_source, "file_types": types_by_source},
        )
        for reason, n in prep_info.get("rejects", {}).items():
            for s_label, k in n.items():
                idx = next(s.idx for s in sources if s.label == s_label)
                rejects[idx][reason] = rejects[idx].get(reason, 0) + k
        if prepared:
            out_ds = prep_ds
        if sink is not None:
            split = prep_info["split"]
            split_info[split] = {
                "num_rows": prep_info["num_rows"],
                "num_files": _num_files(sink / split),
            }

    sel_src = (selection.pos >> np.uint64(48)).astype(np.int64)
    selected_by_src = (
        dict(zip(*np.unique(sel_src, return_counts=True), strict=True)) if len(sel_src) else {}
    )
    by_reason: dict[str, int] = {}
    for r in rejects.values():
        for reason, n in r.items():
            by_reason[reason] = by_reason.get(reason, 0) + n
    source_entries = {}
    for s in sources:
        codes = fmt_codes[src == s.idx]
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
            "files": file_infos[s.idx],
            "counts": {**counts[s.idx], "selected": n_sel},
            "quota": quotas.get(s.idx, 0),
            "repeats": max(0, n_sel - available[s.idx]),
            "share": n_sel / selection.num_rows if selection.num_rows else 0.0,
            "rejects": dict(sorted(rejects[s.idx].items())),
        }
    manifest = {
        "format": MANIFEST_FORMAT,
        "stage": "data",
        "name": mix.name,
        "kind": kind,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "config": mix.to_dict(),
        "config_hash": config_hash(mix),
        "num_rows": selection.num_rows,
        "columns": data_cols,
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
            "eval_sets": {
                k: int(len(v)) for k, v in (eval_index.sets.items() if eval_index else [])
            },
        },
        "tokens": None
        if prep_info is None
        else {"total": prep_info["num_tokens"], "by_source": prep_info["tokens_by_source"]},
        "prepare": prep_info,
        "warnings": warnings,
        "versions": library_versions(),
    }
    if selection.num_rows == 0:
        log.warning("mix %r is empty: every row was rejected or none was asked for", mix.name)
    return MixResult(mix.name, kind, sink, selection.num_rows, manifest, out_ds)


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

    from solar_ray.data.shards import shard_files

    manifest = read_data_manifest(path)
    if split == "auto":
        split = (manifest.get("prepare") or {}).get("split", "data")
    if split not in manifest.get("splits", {}) and split != "rejects":
        raise DataOutputError(
            f"{path}: no {split!r} split (has {', '.join(manifest.get('splits', {}))})"
        )
    with ordered_context():
        return ray.data.read_parquet(shard_files(path, split), shuffle=None)


# ---------------------------------------------------------------- the whole config


def run_data(cfg: DataConfig, only: list[str] | None = None) -> DataResult:
    """Build everything a :class:`DataConfig` describes: the synthetic math, then each mix.

    ``only`` restricts to the named mixes. The synthetic math set is regenerated only when
    its config changed (its manifest records the config hash).
    """
    from solar_ray.data.synth_math import run_synth_math

    out = Path(cfg.out).absolute()
    names = [m.name for m in cfg.mixes]
    for n in only or []:
        if n not in names:
            raise UserError(f"--only {n!r}: no such mix (have {', '.join(names) or 'none'})")
    result = DataResult(out=out)
    synth_dir = out / SYNTH_MATH_DIR
    needs_synth = cfg.synth_math is not None and (
        not only or any(s.synth_math for m in cfg.mixes if m.name in only for s in m.sources)
    )
    if needs_synth:
        assert cfg.synth_math is not None
        result.synth_math = run_synth_math(cfg.synth_math, synth_dir)
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
    return result
