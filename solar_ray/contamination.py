"""Contamination checks: Min-K% Prob against a reference model, and n-gram overlap.

Min-K% Prob (Shi et al. 2023) scores each evaluation item under the model and a reference
and flags the items whose difference is a robust outlier. The n-gram overlap uses the data
stage's decontamination index and matching (:class:`solar_ray.data.decontam.EvalIndex`),
so an item is reported exactly when the filter would drop the training row holding it.
Evaluation sets, training inputs and the report: docs/merge-eval.md.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from solar_ray.checkpoint import (
    atomic_output_dir,
    check_output,
    local_inputs,
    write_json_atomic,
    write_manifest,
)
from solar_ray.config import StageConfig
from solar_ray.data.decontam import EvalIndex
from solar_ray.errors import UserError

__all__ = [
    "ContaminationConfig",
    "ContaminationError",
    "load_eval_sets",
    "min_k_prob",
    "min_k_scores",
    "ngram_overlap",
    "run_contamination",
]

log = logging.getLogger(__name__)

_MAD_SCALE = 1.4826  # MAD -> standard deviation for normal data


class ContaminationError(UserError):
    """Bad input to a contamination check; the message names it."""


class ContaminationConfig(StageConfig):
    """The ``contamination`` check: a model (and reference) and/or a training mix."""

    model: str | None = Field(default=None, description="model scored with Min-K% Prob")
    reference: str | None = Field(default=None, description="reference model (e.g. the base)")
    eval_sets: list[str] = Field(default_factory=lambda: ["offline"], min_length=1)
    k_percent: float = Field(default=20.0, gt=0.0, le=100.0, description="Min-K%: k")
    outlier_z: float = Field(default=3.5, gt=0.0, description="robust z above which an item is flagged")
    max_items: int | None = Field(default=None, ge=1, description="per evaluation set")
    train: str | None = Field(default=None, description="training mix: directory, manifest or file")
    ngram: int = Field(default=13, ge=1, description="n of the n-gram overlap; shorter items are not checked")
    seq_len: int = Field(default=512, ge=8, le=1 << 20)
    batch_size: int = Field(default=8, ge=1)
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    out: str | None = None
    overwrite: bool = False

    @model_validator(mode="after")
    def _check(self) -> ContaminationConfig:
        if self.model is None and self.train is None:
            raise ValueError("model or train is required (Min-K% needs a model, n-gram overlap a training mix)")
        if self.reference is not None and self.model is None:
            raise ValueError("reference: given without model")
        return self


# --------------------------------------------------------------------------- eval sets


def load_eval_sets(specs: Sequence[str], max_items: int | None = None) -> dict[str, list[tuple[str, str]]]:
    """``{set name: [(item id, text), ...]}`` for ``offline``, ``offline:<task>`` or paths.

    ``offline`` is the offline suite (the H6 tasks of :mod:`solar_ray.evalsets.benchmarks`),
    ``offline:<task>`` any offline benchmark; an item's text is its prompt and correct
    answer (:func:`solar_ray.evalsets.benchmarks.item_texts`).
    """
    from solar_ray.evalsets.benchmarks import offline_sets
    from solar_ray.evaluate import iter_texts

    sets: dict[str, list[tuple[str, str]]] = {}
    for spec in specs:
        try:
            offline = offline_sets(spec)
        except UserError as e:
            raise ContaminationError(f"eval_sets: {e}") from None
        if offline is not None:
            sets.update(offline)
            continue
        path = Path(spec)
        if not path.exists():
            raise ContaminationError(f"eval_sets: {spec!r} is neither 'offline' nor an existing path")
        sets[path.stem if path.is_file() else path.name] = list(iter_texts(path))
    for name, items in sets.items():
        if not items:
            raise ContaminationError(f"eval set {name!r} has no items")
        if max_items is not None:
            sets[name] = items[:max_items]
    return sets


# --------------------------------------------------------------------------- Min-K% Prob


def min_k_prob(logprobs: Any, k_percent: float = 20.0) -> float:
    """Mean of the lowest ``k`` % token log-probabilities (at least one token).

    Higher (closer to 0) means the text is more familiar to the model; Shi et al. report
    the negation. NaN for a text with no scored token.
    """
    import torch

    lp = torch.as_tensor(logprobs, dtype=torch.float64).flatten()
    if lp.numel() == 0:
        return float("nan")
    n = max(1, int(lp.numel() * k_percent / 100.0))
    return float(torch.sort(lp).values[:n].mean())


def min_k_scores(
    model_source: str,
    texts: Sequence[str],
    *,
    k_percent: float = 20.0,
    seq_len: int = 512,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
) -> list[float]:
    """Min-K% Prob of every text under one model (loaded, scored, released)."""
    from solar_ray.evaluate import load_model, token_logprobs

    model, tokenizer, _ = load_model(model_source, device, dtype)
    try:
        lps = token_logprobs(model, tokenizer, texts, seq_len=seq_len, batch_size=batch_size)
    finally:
        del model
    return [min_k_prob(lp, k_percent) for lp in lps]


def _robust_z(values: Sequence[float]) -> list[float]:
    finite = [v for v in values if v == v]
    if len(finite) < 3:
        return [0.0] * len(values)
    med = statistics.median(finite)
    mad = statistics.median(abs(v - med) for v in finite) * _MAD_SCALE
    if mad == 0:
        mad = statistics.pstdev(finite) or 1.0
    return [(v - med) / mad if v == v else 0.0 for v in values]


# --------------------------------------------------------------------------- n-grams


def ngram_overlap(
    eval_sets: dict[str, list[tuple[str, str]]],
    train_texts: Iterable[tuple[str, str | Sequence[str]]],
    *,
    n: int = 13,
) -> dict[str, Any]:
    """Which evaluation items share a word n-gram with a training text.

    ``train_texts`` holds ``(ref, text)`` or ``(ref, [texts])``: n-grams never span two
    texts of a row. Returns ``{"num_train_texts", "num_train_texts_overlapping", "sets":
    {name: {"num_items", "num_checked", "num_contaminated", "fraction", "items": {id:
    {"ngram", "train_ref"}}}}}`` where ``items`` lists the contaminated items with the first
    match found.
    """
    index = EvalIndex.build(eval_sets, n, owners=True)
    found: dict[str, dict[str, dict[str, str]]] = {name: {} for name in eval_sets}
    num_texts = num_overlapping = 0
    for ref, texts in train_texts:
        num_texts += 1
        hit = False
        for text in [texts] if isinstance(texts, str) else texts:
            for set_name, item_id, gram in index.find(text):
                hit = True
                found[set_name].setdefault(item_id, {"ngram": gram, "train_ref": ref})
        num_overlapping += hit
    sets = {}
    for name, items in eval_sets.items():
        checked = index.num_texts[name]
        sets[name] = {
            "num_items": len(items),
            "num_checked": checked,
            "num_contaminated": len(found[name]),
            "fraction": len(found[name]) / checked if checked else 0.0,
            "items": found[name],
        }
    return {"num_train_texts": num_texts, "num_train_texts_overlapping": num_overlapping, "sets": sets}


def train_rows(source: str) -> Iterator[tuple[str, list[str]]]:
    """Every row of a training source with the texts the decontamination filter checks in
    it: a mix's rows by their kind's fields, any other row every string it holds."""
    from solar_ray.data.contract import LAYOUT
    from solar_ray.data.decontam import iter_strings
    from solar_ray.data.normalize import row_texts
    from solar_ray.evaluate import iter_rows

    for ref, row, kind in iter_rows(source):
        yield ref, row_texts(kind, row) if kind in LAYOUT else list(iter_strings(row))


# --------------------------------------------------------------------------- stage


def run_contamination(cfg: ContaminationConfig) -> dict[str, Any]:
    """Run the configured checks; return the report (and write it to ``cfg.out``).

    Report: ``{"k_percent", "ngram", "model", "reference", "train", "sets": {name: {
    "num_items", "min_k": {"model_mean", "reference_mean", "diff_mean", "num_outliers"},
    "ngram": {...}, "items": [{"id", "text", "model", "reference", "diff", "z", "outlier",
    "ngram"}]}}}`` (``min_k``/``ngram`` are null when that check did not run).
    """
    inputs = local_inputs(cfg.model, cfg.reference, cfg.train, *cfg.eval_sets)
    if cfg.out:  # before scoring, not after it
        check_output(cfg.out, cfg.overwrite, inputs)
    with _text_errors("eval_sets"):
        sets = load_eval_sets(cfg.eval_sets, cfg.max_items)
    report: dict[str, Any] = {
        "k_percent": cfg.k_percent,
        "ngram": cfg.ngram if cfg.train else None,
        "model": cfg.model,
        "reference": cfg.reference,
        "train": None,
        "sets": {},
        "config": cfg.to_dict(),
    }
    flat = [(name, item_id, text) for name, items in sets.items() for item_id, text in items]
    texts = [t for _, _, t in flat]
    scores: dict[str, list[float]] = {}
    kw = dict(k_percent=cfg.k_percent, seq_len=cfg.seq_len, batch_size=cfg.batch_size, device=cfg.device, dtype=cfg.dtype)  # fmt: skip
    if cfg.model:
        log.info("Min-K%% Prob (k=%g%%) of %d items under %s", cfg.k_percent, len(texts), cfg.model)
        scores["model"] = min_k_scores(cfg.model, texts, **kw)
    if cfg.reference:
        log.info("Min-K%% Prob of %d items under the reference %s", len(texts), cfg.reference)
        scores["reference"] = min_k_scores(cfg.reference, texts, **kw)
    overlap = None
    if cfg.train:
        log.info("%d-gram overlap of %d items with %s", cfg.ngram, len(texts), cfg.train)
        with _text_errors("train"):
            overlap = ngram_overlap(sets, train_rows(cfg.train), n=cfg.ngram)
        report["train"] = {
            "source": cfg.train,
            "num_texts": overlap["num_train_texts"],
            "num_texts_overlapping": overlap["num_train_texts_overlapping"],
        }
    pos = 0
    for name, items in sets.items():
        rows = []
        model_s = scores.get("model", [])[pos : pos + len(items)]
        ref_s = scores.get("reference", [])[pos : pos + len(items)]
        diffs = [m - r for m, r in zip(model_s, ref_s, strict=True)] if ref_s else []
        zs = _robust_z(diffs if diffs else model_s) if model_s else []
        hits = overlap["sets"][name]["items"] if overlap else {}
        for i, (item_id, text) in enumerate(items):
            row: dict[str, Any] = {"id": item_id, "text": text[:200]}
            if model_s:
                row["model"] = model_s[i]
                if ref_s:
                    row["reference"] = ref_s[i]
                    row["diff"] = diffs[i]
                row["z"] = zs[i]
                row["outlier"] = zs[i] > cfg.outlier_z
            if overlap:
                row["ngram"] = hits.get(item_id)
            rows.append(row)
        entry: dict[str, Any] = {"num_items": len(items), "min_k": None, "ngram": None, "items": rows}
        if model_s:
            entry["min_k"] = {
                "model_mean": _mean(model_s),
                "reference_mean": _mean(ref_s) if ref_s else None,
                "diff_mean": _mean(diffs) if diffs else None,
                "num_outliers": sum(1 for r in rows if r["outlier"]),
                "outliers": [r["id"] for r in rows if r["outlier"]],
            }
        if overlap:
            o = overlap["sets"][name]
            entry["ngram"] = {k: o[k] for k in ("num_checked", "num_contaminated", "fraction")}
            entry["ngram"]["contaminated"] = sorted(o["items"])
        report["sets"][name] = entry
        pos += len(items)
    if cfg.out:
        with atomic_output_dir(cfg.out, overwrite=cfg.overwrite, inputs=inputs) as tmp:
            write_json_atomic(tmp / "contamination.json", report)
            (tmp / "contamination.md").write_text(report_table(report), encoding="utf-8")
            write_manifest(
                tmp,
                "contamination",
                parents=[p for p in ({"path": cfg.model}, {"path": cfg.reference}, {"path": cfg.train}) if p["path"]],
                config=cfg.to_dict(),
                metrics={name: {"min_k": e["min_k"] and {k: v for k, v in e["min_k"].items() if k != "outliers"},
                                "ngram": e["ngram"] and {k: v for k, v in e["ngram"].items() if k != "contaminated"}}
                         for name, e in report["sets"].items()},
            )  # fmt: skip
    return report


@contextlib.contextmanager
def _text_errors(field: str) -> Iterator[None]:
    """A text source that cannot be read (not UTF-8, not JSON) is one line naming the field."""
    from solar_ray.evaluate import EvalError

    try:
        yield
    except EvalError as e:
        raise ContaminationError(f"{field}: {e}") from None


def _mean(values: Sequence[float]) -> float | None:
    finite = [v for v in values if v == v]
    return sum(finite) / len(finite) if finite else None


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "–" if x is None else format(x, spec)


def report_table(report: dict[str, Any]) -> str:
    """A markdown summary: one row per evaluation set."""
    lines = [
        f"| Eval set | Items | Min-{report['k_percent']:g}% model | reference | diff | outliers "
        f"| {report['ngram'] or 'n'}-gram contaminated |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, e in report["sets"].items():
        mk, ng = e["min_k"] or {}, e["ngram"]
        ngram = f"{ng['num_contaminated']}/{ng['num_checked']}" if ng else "–"
        lines.append(
            f"| {name} | {e['num_items']} | {_fmt(mk.get('model_mean'))} | "
            f"{_fmt(mk.get('reference_mean'))} | {_fmt(mk.get('diff_mean'), '+.3f')} | "
            f"{mk.get('num_outliers', '–')} | {ngram} |"
        )
    return "\n".join(lines) + "\n"
