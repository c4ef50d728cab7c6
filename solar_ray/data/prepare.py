"""Preparation for training, on Ray Data: pack (pretrain), tokenize (sft), template (preference).

Each kind's prepared split and its columns are :data:`solar_ray.data.contract.LAYOUT`'s:
``packed`` (pretrain: ``input_ids``, ``position_ids``, exactly ``seq_len`` each, EOS after
every document), ``tokenized`` (sft: ``input_ids``, ``assistant_masks``, ``labels``;
preference: the chat-templated ``prompt``, ``chosen``, ``rejected``).

The per-row work is the plain functions of :mod:`solar_ray.data.pack` and
:mod:`solar_ray.data.templates`; this module runs them over Ray Data batches. The tokenizer
is loaded once on the driver (:func:`load_tokenizer`) and shipped through the object store.
Rows the preparation refuses (over ``seq_len`` with ``overflow: reject``, no assistant token
left, a template error) go to ``rejects/`` and are counted in the manifest.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from solar_ray.config import ConfigError
from solar_ray.data._ray import (
    collect,
    column_np,
    fetch,
    ordered_context,
    share,
    sort_by_rank,
    task_pool,
    write_split,
)
from solar_ray.data.config import MixConfig, PrepareConfig
from solar_ray.data.contract import LAYOUT, write_shard
from solar_ray.data.normalize import RowError, reject_table
from solar_ray.data.pack import Fragment, pack_span_flat, stitch_fragments
from solar_ray.data.templates import ensure_chat_template, template_prompt, tokenize_sft
from solar_ray.errors import UserError

__all__ = ["load_tokenizer", "pack_pretrain", "prepare"]

log = logging.getLogger(__name__)

#: tokens per packed shard (about 256 MiB of int32 ids + positions)
PACKED_TOKENS_PER_FILE = 1 << 25


def load_tokenizer(cfg: PrepareConfig, kind: str, field: str = "prepare") -> tuple[Any, Path]:
    """The tokenizer ``cfg.tokenizer`` names (and its directory), ready for ``kind``."""
    from transformers import AutoTokenizer

    from solar_ray.models import resolve_model

    try:
        model_dir = resolve_model(cfg.tokenizer)
    except UserError as e:
        raise ConfigError(f"{field}.tokenizer: {e}") from None
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if kind in ("sft", "preference"):
        ensure_chat_template(tokenizer, cfg.chat_template, f"{field}.chat_template")
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"{field}.tokenizer: {cfg.tokenizer!r} has no EOS token")
    if kind == "pretrain" and getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ConfigError(f"{field}.tokenizer: {cfg.tokenizer!r} has no fast (tokenizers) backend")
    return tokenizer, model_dir


def _matrix_array(mat: np.ndarray) -> pa.Array:
    n, width = mat.shape
    offsets = np.arange(0, n * width + 1, width, dtype=np.int32)
    return pa.ListArray.from_arrays(
        pa.array(offsets), pa.array(mat.reshape(-1).astype(np.int32, copy=False))
    )


def _list_array(lists: list[list[int]] | list[np.ndarray]) -> pa.Array:
    lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
    offsets = np.zeros(len(lists) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = (
        np.concatenate([np.asarray(x, dtype=np.int32) for x in lists])
        if lists
        else np.empty(0, np.int32)
    )
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.int32()))


def _by_source_reason(table: pa.Table) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    bad = table.filter(pc.is_valid(table.column("_reason")))
    for s, r in zip(
        bad.column("source").to_pylist(), bad.column("_reason").to_pylist(), strict=True
    ):
        out.setdefault(r, {})
        out[r][s] = out[r].get(s, 0) + 1
    return out


def _sum_by_source(sources: list[str], values: np.ndarray) -> dict[str, int]:
    out: dict[str, int] = {}
    for s, v in zip(sources, values.tolist(), strict=True):
        out[s] = out.get(s, 0) + int(v)
    return dict(sorted(out.items()))


def _write_rejects(
    rows: list[tuple[str, int, str, str]], reject_dir: str | None, refs: dict, first_rank: int
) -> None:
    if not rows or reject_dir is None:
        return
    sources, positions, reasons, details = (list(col) for col in zip(*rows, strict=True))
    table = reject_table(sources, positions, reasons, details, refs)
    write_shard(table, reject_dir, f"part-1-{first_rank:012d}.parquet")


def _keep_valid(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_null(batch.column("_reason"))).drop_columns(["_reason"])


def _write_or_keep(
    ds: Any,
    sink: Path | None,
    split: str,
    rank_col: str,
    schema: pa.Schema,
    num_workers: int | None,
) -> Any:
    if sink is None:
        return ds.select_columns(schema.names)
    write_split(ds, sink / split, rank_col, schema, num_workers)
    return None


# ---------------------------------------------------------------- pretrain


def _tokenize_docs(batch: pa.Table, tok: list, add_special_tokens: bool) -> pa.Table:
    tokenizer = fetch(tok)
    encs = tokenizer.encode_batch_fast(
        batch.column("text").to_pylist(), add_special_tokens=add_special_tokens
    )
    ids = _list_array([e.ids for e in encs])
    lens = pc.add(pc.list_value_length(ids).cast(pa.int64()), 1)  # + EOS
    return pa.table(
        {
            "_rank": batch.column("_rank"),
            "source": batch.column("source"),
            "_ids": ids,
            "_len": lens,
        }
    )


def _pack(batch: pa.Table, offsets: list, seq_len: int, eos_id: int) -> pa.Table:
    starts_all = fetch(offsets)
    batch = batch.take(pc.sort_indices(batch, [("_rank", "ascending")]))
    ranks = column_np(batch, "_rank", np.int64)
    ids_col = batch.column("_ids").combine_chunks()
    flat = ids_col.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    doc_lens = pc.list_value_length(ids_col).to_numpy(zero_copy_only=False).astype(np.int64)
    cut = np.nonzero(np.diff(ranks) != 1)[0] + 1
    runs = np.split(np.arange(len(ranks)), cut) if len(ranks) else []
    doc_off = np.zeros(len(doc_lens) + 1, dtype=np.int64)
    np.cumsum(doc_lens, out=doc_off[1:])
    blocks, frag_rows = [], []
    for run in runs:
        a, b = int(run[0]), int(run[-1]) + 1
        full, frags = pack_span_flat(
            flat[doc_off[a] : doc_off[b]], doc_lens[a:b], int(starts_all[ranks[a]]), eos_id, seq_len
        )
        if full.num_blocks:
            blocks.append(full)
        frag_rows.extend(frags)
    block_idx = (
        np.concatenate([np.arange(p.first_block, p.first_block + p.num_blocks) for p in blocks])
        if blocks
        else np.empty(0, np.int64)
    )
    ids_mat = (
        np.concatenate([p.input_ids for p in blocks])
        if blocks
        else np.empty((0, seq_len), np.int32)
    )
    pos_mat = (
        np.concatenate([p.position_ids for p in blocks])
        if blocks
        else np.empty((0, seq_len), np.int32)
    )
    n_full = len(block_idx)
    return pa.table(
        {
            "_block": pa.array(
                np.concatenate([block_idx, np.array([f.block for f in frag_rows], np.int64)]),
                pa.int64(),
            ),
            "_start": pa.array([0] * n_full + [f.start for f in frag_rows], pa.int32()),
            "_frag": pa.array([False] * n_full + [True] * len(frag_rows)),
            "input_ids": pa.concat_arrays(
                [_matrix_array(ids_mat), _list_array([f.input_ids for f in frag_rows])]
            ),
            "position_ids": pa.concat_arrays(
                [_matrix_array(pos_mat), _list_array([f.position_ids for f in frag_rows])]
            ),
        }
    )


def _only(batch: pa.Table, frag: bool) -> pa.Table:
    mask = batch.column("_frag")
    cols = (
        ["_block", "_start", "input_ids", "position_ids"]
        if frag
        else ["_block", "input_ids", "position_ids"]
    )
    return batch.filter(mask if frag else pc.invert(mask)).select(cols)


def pack_pretrain(
    ordered: Any,
    cfg: PrepareConfig,
    tokenizer: Any,
    sink: Path | None = None,
    num_workers: int | None = None,
) -> tuple[Any, dict]:
    """Tokenize and pack a ranked text dataset; write ``sink/packed`` or return the Dataset.

    ``ordered`` has ``text``, ``source`` and ``_rank`` (the row's place in the mix,
    ``0..N-1``); the packed stream follows ``_rank``, whatever the block layout. Returns
    ``(dataset or None, manifest entry)``.
    """
    import ray
    import ray.data

    eos = int(tokenizer.eos_token_id)
    seq_len = cfg.seq_len
    tok = share(tokenizer.backend_tokenizer)
    with ordered_context():
        tokenized = ordered.map_batches(
            _tokenize_docs,
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
            fn_kwargs={"tok": tok, "add_special_tokens": cfg.add_special_tokens},
            compute=task_pool(num_workers),
        ).materialize()
    meta = collect(tokenized, {"_rank": pa.int64(), "_len": pa.int64(), "source": pa.string()})
    ranks = column_np(meta, "_rank", np.int64)
    lens = np.zeros(len(ranks), dtype=np.int64)
    lens[ranks] = column_np(meta, "_len", np.int64)
    starts = np.zeros(len(ranks), dtype=np.int64)
    if len(ranks):
        starts[1:] = np.cumsum(lens)[:-1]
    total = int(lens.sum())
    tokens_by_source = _sum_by_source(
        meta.column("source").to_pylist(), column_np(meta, "_len", np.int64)
    )
    with ordered_context():
        pieces = tokenized.map_batches(
            _pack,
            batch_size=None,
            batch_format="pyarrow",
            fn_kwargs={"offsets": share(starts), "seq_len": seq_len, "eos_id": eos},
            compute=task_pool(num_workers),
        ).materialize()
        frags_table = pieces.map_batches(
            _only, batch_format="pyarrow", fn_kwargs={"frag": True}
        ).to_arrow_refs()
    frag_tables = [t for t in ray.get(frags_table) if t.num_rows]
    fragments: list[Fragment] = []
    if frag_tables:
        ft = pa.concat_tables(frag_tables)
        for blk, start, ids, pos in zip(
            *(ft.column(c).to_pylist() for c in ("_block", "_start", "input_ids", "position_ids")),
            strict=True,
        ):
            fragments.append(
                Fragment(blk, start, np.asarray(ids, np.int32), np.asarray(pos, np.int32))
            )
    stitched, stitched_blocks = stitch_fragments(fragments, seq_len, total, eos, cfg.pad_last)
    num_blocks = total // seq_len + (1 if cfg.pad_last and total % seq_len else 0)
    with ordered_context():
        extra = ray.data.from_arrow(
            pa.table(
                {
                    "_block": pa.array(stitched_blocks, pa.int64()),
                    "input_ids": _matrix_array(stitched.input_ids),
                    "position_ids": _matrix_array(stitched.position_ids),
                }
            )
        )
    full = pieces.map_batches(_only, batch_format="pyarrow", fn_kwargs={"frag": False})
    blocks_per_file = max(1, PACKED_TOKENS_PER_FILE // seq_len)
    packed = sort_by_rank(full.union(extra), "_block", num_blocks, blocks_per_file)
    layout = LAYOUT["pretrain"]
    out = _write_or_keep(packed, sink, layout.prepared_split, "_block", layout.prepared, num_workers)
    dropped = total - (num_blocks * seq_len - stitched.num_padding)
    info = {
        "split": layout.prepared_split,
        "seq_len": seq_len,
        "eos_id": eos,
        "add_special_tokens": cfg.add_special_tokens,
        "pad_last": cfg.pad_last,
        "num_rows": num_blocks,
        "num_documents": len(ranks),
        "num_tokens": total,
        "num_padding_tokens": stitched.num_padding,
        "num_dropped_tokens": dropped,
        "packing_efficiency": (total - dropped) / (num_blocks * seq_len) if num_blocks else 1.0,
        "tokens_by_source": tokens_by_source,
        "rejects": {},
    }
    return out, info


# ---------------------------------------------------------------- sft and preference


def _tokenize_sft_batch(
    batch: pa.Table, tok: list, seq_len: int, overflow: str, reject_dir: str | None, refs: dict
) -> pa.Table:
    tokenizer = fetch(tok)
    msgs = batch.column("messages").to_pylist()
    sources = batch.column("source").to_pylist()
    pos = column_np(batch, "_pos", np.uint64).tolist()
    ranks = column_np(batch, "_rank", np.int64)
    ids, masks, labels, reasons, ntok, nasst = [], [], [], [], [], []
    rejects = []
    for m, s, p in zip(msgs, sources, pos, strict=True):
        try:
            r = tokenize_sft(m, tokenizer, seq_len, overflow)
        except RowError as e:
            rejects.append((s, p, e.reason, e.detail))
            ids.append([])
            masks.append([])
            labels.append([])
            reasons.append(e.reason)
            ntok.append(0)
            nasst.append(0)
            continue
        ids.append(r["input_ids"])
        masks.append(r["assistant_masks"])
        labels.append(r["labels"])
        reasons.append(None)
        ntok.append(len(r["input_ids"]))
        nasst.append(sum(r["assistant_masks"]))
    _write_rejects(rejects, reject_dir, refs, int(ranks.min()) if len(ranks) else 0)
    return pa.table(
        {
            "input_ids": _list_array(ids),
            "assistant_masks": _list_array(masks),
            "labels": _list_array(labels),
            "source": pa.array(sources, pa.string()),
            "_rank": pa.array(ranks, pa.int64()),
            "_ntok": pa.array(ntok, pa.int64()),
            "_nasst": pa.array(nasst, pa.int64()),
            "_reason": pa.array(reasons, pa.string()),
        }
    )


def _template_batch(
    batch: pa.Table, tok: list, seq_len: int, overflow: str, reject_dir: str | None, refs: dict
) -> pa.Table:
    tokenizer = fetch(tok)
    prompts = batch.column("prompt").to_pylist()
    systems = batch.column("system").to_pylist()
    sources = batch.column("source").to_pylist()
    pos = column_np(batch, "_pos", np.uint64).tolist()
    ranks = column_np(batch, "_rank", np.int64)
    chosen = batch.column("chosen").to_pylist()
    rejected = batch.column("rejected").to_pylist()
    templated, reasons, rejects = [], [], []
    for p, sy, s, ps in zip(prompts, systems, sources, pos, strict=True):
        try:
            templated.append(template_prompt(p, tokenizer, sy or ""))
            reasons.append(None)
        except RowError as e:
            templated.append("")
            reasons.append(e.reason)
            rejects.append((s, ps, e.reason, e.detail))
    n = len(prompts)
    lens = (
        tokenizer(templated + chosen + rejected, add_special_tokens=False)["input_ids"] if n else []
    )
    lp = np.array([len(x) for x in lens[:n]], dtype=np.int64)
    lc = np.array([len(x) for x in lens[n : 2 * n]], dtype=np.int64)
    lr = np.array([len(x) for x in lens[2 * n :]], dtype=np.int64)
    for k in range(n):
        longest = int(lp[k] + max(lc[k], lr[k]))
        if reasons[k] is None and overflow == "reject" and longest > seq_len:
            reasons[k] = "too_long_tokens"
            rejects.append(
                (sources[k], pos[k], "too_long_tokens", f"{longest} tokens > seq_len {seq_len}")
            )
    _write_rejects(rejects, reject_dir, refs, int(ranks.min()) if n else 0)
    return pa.table(
        {
            "prompt": pa.array(templated, pa.string()),
            "chosen": pa.array(chosen, pa.string()),
            "rejected": pa.array(rejected, pa.string()),
            "source": pa.array(sources, pa.string()),
            "_rank": pa.array(ranks, pa.int64()),
            "_ntok": pa.array(lp + lc + lr if n else [], pa.int64()),
            "_reason": pa.array(reasons, pa.string()),
        }
    )


def _prepare_rows(
    ordered: Any,
    mix: MixConfig,
    tokenizer: Any,
    sink: Path | None,
    num_workers: int | None,
    refs: dict,
) -> tuple[Any, dict]:
    cfg = mix.prepare
    assert cfg is not None
    layout = LAYOUT[mix.kind]
    fn = _tokenize_sft_batch if mix.kind == "sft" else _template_batch
    with ordered_context():
        done = ordered.map_batches(
            fn,
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
            fn_kwargs={
                "tok": share(tokenizer),
                "seq_len": cfg.seq_len,
                "overflow": cfg.overflow,
                "reject_dir": str(sink / "rejects") if sink is not None else None,
                "refs": refs,
            },
            compute=task_pool(num_workers),
        ).materialize()
    cols = {"source": pa.string(), "_reason": pa.string(), "_ntok": pa.int64()}
    if mix.kind == "sft":
        cols["_nasst"] = pa.int64()
    meta = collect(done, cols)
    ok = pc.is_null(meta.column("_reason"))
    good = meta.filter(ok)
    ntok = column_np(good, "_ntok", np.int64)
    info: dict[str, Any] = {
        "split": layout.prepared_split,
        "seq_len": cfg.seq_len,
        "overflow": cfg.overflow,
        "chat_template": cfg.chat_template or "tokenizer",
        "num_rows": good.num_rows,
        "num_tokens": int(ntok.sum()),
        "tokens_by_source": _sum_by_source(good.column("source").to_pylist(), ntok),
        "rejects": _by_source_reason(meta),
    }
    if mix.kind == "sft":
        info["num_assistant_tokens"] = int(column_np(good, "_nasst", np.int64).sum())
    valid = done.map_batches(_keep_valid, batch_format="pyarrow")
    out = _write_or_keep(valid, sink, layout.prepared_split, "_rank", layout.prepared, num_workers)
    return out, info


def prepare(
    ordered: Any, mix: MixConfig, sink: Path | None, num_workers: int | None, refs: dict
) -> tuple[Any, dict]:
    """Prepare an ordered mix (rows with ``_rank`` and ``_pos``) for training.

    Writes the prepared split under ``sink`` (or returns it as a Dataset when ``sink`` is
    None) and returns ``(dataset or None, manifest entry)``.
    """
    cfg = mix.prepare
    assert cfg is not None
    tokenizer, model_dir = load_tokenizer(cfg, mix.kind)
    if mix.kind == "pretrain":
        out, info = pack_pretrain(ordered, cfg, tokenizer, sink, num_workers)
    else:
        out, info = _prepare_rows(ordered, mix, tokenizer, sink, num_workers, refs)
    info = {"tokenizer": cfg.tokenizer, "tokenizer_dir": str(model_dir), **info}
    return out, info
