"""Normalizers: every source format into one of three schemas, bad rows into reasons.

The rows land in the ``data`` split of :mod:`solar_ray.data.contract`'s layout. A row that
cannot be normalized raises :class:`RowError` with a reason from :data:`REJECT_REASONS`;
:func:`normalize_file` turns those into reject rows, so no bad row ever stops a job. The
formats and their columns: docs/data.md, "Formats".
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, get_args

import numpy as np
import pyarrow as pa

from solar_ray.data.config import FORMATS_BY_KIND, Format
from solar_ray.data.contract import LAYOUT, REJECT_SCHEMA
from solar_ray.data.decontam import EvalIndex, deny_match
from solar_ray.data.keys import MAX_RECORDS_PER_FILE, hash64, make_pos, row_ref
from solar_ray.data.sources import Record, iter_records

__all__ = [
    "FORMAT_CODES",
    "INTERNAL_FIELDS",
    "REJECT_REASONS",
    "FilterOptions",
    "RowError",
    "detect_format",
    "internal_schema",
    "normalize_file",
    "normalize_record",
    "normalized_row_hash",
    "reject_table",
    "row_texts",
]

#: every reason a row can be quarantined for, and the step that decides it
REJECT_REASONS: dict[str, str] = {
    "unreadable_file": "read",
    "invalid_json": "read",
    "undecodable_text": "read",
    "malformed_csv_row": "read",
    "unknown_format": "normalize",
    "missing_field": "normalize",
    "empty_field": "normalize",
    "wrong_type": "normalize",
    "unknown_role": "normalize",
    "bad_conversation": "normalize",
    "multi_turn_prompt": "normalize",
    "prompt_mismatch": "normalize",
    "identical_pair": "normalize",
    "too_long": "length",
    "denied_task": "deny_tasks",
    "contaminated": "decontaminate",
    "duplicate": "dedup",
    "too_long_tokens": "prepare",
    "no_assistant_tokens": "prepare",
    "template_error": "prepare",
}

INTERNAL_FIELDS: list[pa.Field] = [
    pa.field("_pos", pa.uint64()),
    pa.field("_hash", pa.uint64()),
    pa.field("_fmt", pa.int8()),
    pa.field("_nchars", pa.int64()),
    pa.field("_reason", pa.string()),
    pa.field("_detail", pa.string()),
    pa.field("_raw", pa.string()),
]

#: small integer codes of the formats (the ``_fmt`` column), for per-file format counts
FORMAT_CODES: tuple[str, ...] = get_args(Format)[1:]  # all but "auto"

_ROLE_MAP = {
    "system": "system",
    "user": "user",
    "human": "user",
    "prompter": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "bot": "assistant",
}
_CHUNK_ROWS = 4096
_DETECT_ROWS = 100
_WS = re.compile(r"\s+")


def reject_table(
    sources: Any, positions: Any, reasons: list, details: list, refs: dict, raws: Any = None
) -> pa.Table:
    """Rows of the ``rejects`` split: each row's source, where it came from (``row_ref`` of
    its position), the step and reason it was quarantined for, and its raw preview."""
    return pa.table(
        {
            "source": sources,
            "ref": [row_ref(int(p), refs["files"], refs["file_types"]) for p in positions],
            "step": [REJECT_REASONS.get(r, "other") for r in reasons],
            "reason": reasons,
            "detail": details,
            "raw": pa.nulls(len(reasons), pa.string()) if raws is None else raws,
        },
        schema=REJECT_SCHEMA,
    )


def internal_schema(kind: str) -> pa.Schema:
    """The kind's ``data`` schema plus the internal columns carried between passes."""
    return pa.schema([*LAYOUT[kind].data, *INTERNAL_FIELDS])


class RowError(Exception):
    """A row cannot be normalized: ``reason`` is a key of :data:`REJECT_REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------- field helpers


def _check_str(value: Any, where: str, allow_empty: bool = False) -> str:
    if value is None:
        raise RowError("missing_field", where)
    if not isinstance(value, str):
        raise RowError("wrong_type", f"{where}: expected a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RowError("undecodable_text", where) from None
    if not allow_empty and not value.strip():
        raise RowError("empty_field", where)
    return value


def _req(rec: dict, key: str) -> str:
    return _check_str(rec.get(key), key)


def _opt(rec: dict, key: str) -> str:
    value = rec.get(key)
    return "" if value is None else _check_str(value, key, allow_empty=True)


def _messages(items: Any, where: str, role_key: str, content_key: str) -> list[dict[str, str]]:
    """Validate a conversation: known roles, non-empty text, system first, ends with assistant."""
    if items is None:
        raise RowError("missing_field", where)
    if isinstance(items, np.ndarray):
        items = items.tolist()
    if not isinstance(items, list):
        raise RowError("wrong_type", f"{where}: expected a list, got {type(items).__name__}")
    if not items:
        raise RowError("empty_field", where)
    out: list[dict[str, str]] = []
    for i, m in enumerate(items):
        if not isinstance(m, dict):
            raise RowError("wrong_type", f"{where}.{i}: expected an object")
        rk = role_key if role_key in m else ("role" if "role" in m else role_key)
        ck = content_key if content_key in m else ("content" if "content" in m else content_key)
        raw_role = m.get(rk)
        if not isinstance(raw_role, str):
            raise RowError(
                "missing_field" if raw_role is None else "wrong_type", f"{where}.{i}.{rk}"
            )
        role = _ROLE_MAP.get(raw_role.strip().lower())
        if role is None:
            raise RowError("unknown_role", f"{where}.{i}.{rk}={raw_role!r}")
        content = _check_str(m.get(ck), f"{where}.{i}.{ck}")
        if role == "system" and i > 0:
            raise RowError("bad_conversation", f"{where}.{i}: system message after the first turn")
        out.append({"role": role, "content": content})
    roles = [m["role"] for m in out]
    if "user" not in roles or "assistant" not in roles:
        raise RowError("bad_conversation", f"{where}: needs a user and an assistant turn")
    if roles[-1] != "assistant":
        raise RowError("bad_conversation", f"{where}: the last turn is not the assistant's")
    return out


def _pair(system: str, user: str) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system.strip() else []) + [
        {"role": "user", "content": user}
    ]


# ---------------------------------------------------------------- normalizers


def _norm_text(rec: dict, text_field: str) -> dict:
    return {"text": _req(rec, text_field)}


def _norm_alpaca(rec: dict) -> dict:
    instruction, inp, output = _req(rec, "instruction"), _opt(rec, "input"), _req(rec, "output")
    user = f"{instruction}\n\n{inp}" if inp.strip() else instruction
    return {"messages": [*_pair("", user), {"role": "assistant", "content": output}]}


def _norm_openorca(rec: dict) -> dict:
    system, question, response = (
        _opt(rec, "system_prompt"),
        _req(rec, "question"),
        _req(rec, "response"),
    )
    return {"messages": [*_pair(system, question), {"role": "assistant", "content": response}]}


def _norm_qa(rec: dict, q: str, a: str) -> dict:
    return {"messages": [*_pair("", _req(rec, q)), {"role": "assistant", "content": _req(rec, a)}]}


def _norm_sharegpt(rec: dict) -> dict:
    return {"messages": _messages(rec.get("conversations"), "conversations", "from", "value")}


def _norm_messages(rec: dict) -> dict:
    return {"messages": _messages(rec.get("messages"), "messages", "role", "content")}


def _answer_side(value: Any, where: str) -> tuple[str | None, str, str]:
    """(prompt or None, system, answer) of one side of a preference pair."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list):
        msgs = _messages(value, where, "role", "content")
        system = msgs[0]["content"] if msgs[0]["role"] == "system" else ""
        history = [m for m in msgs[:-1] if m["role"] != "system"]
        if len(history) != 1 or history[0]["role"] != "user":
            raise RowError("multi_turn_prompt", f"{where}: {len(history)} turns before the answer")
        return history[0]["content"], system, msgs[-1]["content"]
    return None, "", _check_str(value, where)


def _norm_preference(rec: dict) -> dict:
    c_prompt, c_system, chosen = _answer_side(rec.get("chosen"), "chosen")
    r_prompt, r_system, rejected = _answer_side(rec.get("rejected"), "rejected")
    if c_prompt is not None and r_prompt is not None and c_prompt != r_prompt:
        raise RowError("prompt_mismatch", "chosen and rejected answer different prompts")
    prompt = rec.get("prompt")
    from_messages = c_prompt if c_prompt is not None else r_prompt
    if (prompt is None or (isinstance(prompt, str) and not prompt.strip())) and from_messages:
        prompt = from_messages
    prompt = _check_str(prompt, "prompt")
    system = _opt(rec, "system") or c_system or r_system
    if chosen.strip() == rejected.strip():
        raise RowError("identical_pair", "chosen == rejected")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "system": system}


def _norm_orca_dpo(rec: dict) -> dict:
    out = {
        "prompt": _req(rec, "question"),
        "chosen": _req(rec, "chosen"),
        "rejected": _req(rec, "rejected"),
        "system": _opt(rec, "system"),
    }
    if out["chosen"].strip() == out["rejected"].strip():
        raise RowError("identical_pair", "chosen == rejected")
    return out


def normalize_record(rec: dict, fmt: str, text_field: str = "text") -> dict:
    """One raw record in ``fmt`` -> the kind's columns (without ``source``); RowError if bad."""
    if fmt == "text":
        return _norm_text(rec, text_field)
    if fmt == "alpaca":
        return _norm_alpaca(rec)
    if fmt == "openorca":
        return _norm_openorca(rec)
    if fmt == "sharegpt":
        return _norm_sharegpt(rec)
    if fmt == "messages":
        return _norm_messages(rec)
    if fmt == "gsm8k":
        return _norm_qa(rec, "question", "answer")
    if fmt == "math":
        return _norm_qa(rec, "problem", "solution")
    if fmt in ("preference", "ultrafeedback"):
        return _norm_preference(rec)
    if fmt == "orca_dpo":
        return _norm_orca_dpo(rec)
    raise ValueError(f"unknown format {fmt!r}")


# ---------------------------------------------------------------- detection


def _signature(rec: dict, fmt: str, text_field: str) -> bool:
    has = rec.__contains__
    if fmt == "messages":
        return has("messages")
    if fmt == "sharegpt":
        return has("conversations")
    if fmt == "orca_dpo":
        return has("question") and has("chosen") and has("rejected")
    if fmt == "ultrafeedback":
        return has("chosen") and has("rejected") and isinstance(rec["chosen"], (list, np.ndarray))
    if fmt == "preference":
        return has("chosen") and has("rejected")
    if fmt == "alpaca":
        return has("instruction") and has("output")
    if fmt == "openorca":
        return has("question") and has("response")
    if fmt == "gsm8k":
        return has("question") and has("answer")
    if fmt == "math":
        return has("problem") and has("solution")
    if fmt == "text":
        return has(text_field)
    return False


_DETECT_ORDER = (
    "messages",
    "sharegpt",
    "orca_dpo",
    "ultrafeedback",
    "preference",
    "alpaca",
    "openorca",
    "gsm8k",
    "math",
    "text",
)


def detect_format(
    records: list[dict], allowed: tuple[str, ...], text_field: str = "text"
) -> str | None:
    """The format most of ``records`` match among ``allowed`` (most specific wins a row)."""
    votes: Counter[str] = Counter()
    for rec in records:
        for fmt in _DETECT_ORDER:
            if fmt in allowed and _signature(rec, fmt, text_field):
                votes[fmt] += 1
                break
    if not votes:
        return None
    best = max(votes.values())
    return next(f for f in _DETECT_ORDER if votes.get(f) == best)


# ---------------------------------------------------------------- content


def row_texts(kind: str, row: dict) -> list[str]:
    """The texts of a normalized row (what decontamination and length limits look at)."""
    if kind == "pretrain":
        return [row["text"]]
    if kind == "sft":
        return [m["content"] for m in row["messages"]]
    return [row["system"], row["prompt"], row["chosen"], row["rejected"]]


def normalized_row_hash(kind: str, row: dict) -> int:
    """64-bit hash of the whitespace-normalised content: equal for exact duplicates."""
    if kind == "sft":
        parts: Any = [[m["role"], _WS.sub(" ", m["content"]).strip()] for m in row["messages"]]
    else:
        parts = [_WS.sub(" ", t).strip() for t in row_texts(kind, row)]
    return hash64(json.dumps(parts, ensure_ascii=False))


# ---------------------------------------------------------------- one file -> Arrow


@dataclass
class FilterOptions:
    """The per-row filters applied while normalizing (those that need no global view)."""

    kind: str
    max_chars: int | None = None
    deny_tasks: list[str] = field(default_factory=list)
    eval_index: EvalIndex | None = None


def _record_pos(source_idx: int, file_idx: int, index: int) -> int:
    rec_idx = MAX_RECORDS_PER_FILE - 1 if index < 0 else index
    if rec_idx >= MAX_RECORDS_PER_FILE:
        raise ValueError(f"more than {MAX_RECORDS_PER_FILE - 1} records in one file")
    return int(make_pos(source_idx, file_idx, rec_idx))


def _raw_preview(rec: Record) -> str | None:
    if rec.raw is not None:
        return rec.raw
    if rec.data is None:
        return None
    try:
        return json.dumps(rec.data, ensure_ascii=False, default=str)[:1000]
    except (TypeError, ValueError):
        return str(rec.data)[:1000]


def normalize_file(
    path: str,
    *,
    kind: str,
    source_idx: int,
    file_idx: int,
    source: str,
    fmt: str = "auto",
    file_type: str = "auto",
    text_field: str = "text",
    task_field: str | None = None,
    filters: FilterOptions | None = None,
    chunk_rows: int = _CHUNK_ROWS,
) -> Iterator[pa.Table]:
    """Read, normalize and filter one file; yield tables in :func:`internal_schema`.

    Accepted rows carry the kind's columns, ``_pos``, the content ``_hash``, ``_fmt`` and
    ``_nchars``; quarantined rows carry ``_reason``/``_detail``/``_raw`` and nulls. Plain
    Python: the Ray pipeline calls it once per file inside a task.
    """
    filters = filters or FilterOptions(kind=kind)
    schema = internal_schema(kind)
    allowed = FORMATS_BY_KIND[kind]
    records = iter_records(path, file_type)
    if fmt == "auto":
        head = list(itertools.islice(records, _DETECT_ROWS))
        fmt_used = detect_format([r.data for r in head if r.data is not None], allowed, text_field)
        records = itertools.chain(head, records)
    else:
        fmt_used = fmt
    fmt_code = FORMAT_CODES.index(fmt_used) if fmt_used else -1
    if task_field is None and fmt_used == "openorca":
        task_field = "id"  # OpenOrca ids read like "flan.2136716" / "niv.242" / "cot.85"

    kind_cols = [name for name in LAYOUT[kind].data.names if name != "source"]

    def empty_cols() -> dict[str, list]:
        return {name: [] for name in schema.names}

    cols = empty_cols()
    for rec in records:
        row: dict | None = None
        reason = detail = None
        if rec.data is None:
            reason, detail = rec.reason, rec.detail
        elif fmt_used is None:
            reason, detail = "unknown_format", f"no {kind} format matches the file's columns"
        else:
            try:
                row = normalize_record(rec.data, fmt_used, text_field)
                texts = row_texts(kind, row)
                nchars = sum(len(t) for t in texts)
                if filters.max_chars is not None and nchars > filters.max_chars:
                    raise RowError("too_long", f"{nchars} chars > max_chars {filters.max_chars}")
                if task_field is not None and filters.deny_tasks:
                    tag = rec.data.get(task_field)
                    hit = deny_match(tag if isinstance(tag, str) else None, filters.deny_tasks)
                    if hit:
                        raise RowError("denied_task", f"{task_field}={tag!r} matches {hit!r}")
                if filters.eval_index is not None:
                    hit = filters.eval_index.match(texts)
                    if hit:
                        raise RowError(
                            "contaminated", f"shares a {filters.eval_index.ngram}-gram with {hit}"
                        )
            except RowError as e:
                row, reason, detail = None, e.reason, e.detail
        cols["_pos"].append(_record_pos(source_idx, file_idx, rec.index))
        cols["source"].append(source)
        cols["_fmt"].append(fmt_code)
        if row is None:
            for name in kind_cols:
                cols[name].append(None)
            cols["_hash"].append(0)
            cols["_nchars"].append(0)
            cols["_reason"].append(reason)
            cols["_detail"].append(detail)
            cols["_raw"].append(_raw_preview(rec))
        else:
            for name in kind_cols:
                cols[name].append(row[name])
            cols["_hash"].append(normalized_row_hash(kind, row))
            cols["_nchars"].append(nchars)
            cols["_reason"].append(None)
            cols["_detail"].append(None)
            cols["_raw"].append(None)
        if len(cols["_pos"]) >= chunk_rows:
            yield pa.Table.from_pydict(cols, schema=schema)
            cols = empty_cols()
    if cols["_pos"]:
        yield pa.Table.from_pydict(cols, schema=schema)
