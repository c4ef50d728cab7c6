"""Zero-training predictors of SOLAR's layer-removal count ``m``, from the base model alone.

One forward pass of the base model over held-out text scores every ``m``: ``seam_angular``
(the angular distance across the seam, after Gromov et al. 2024) and ``seam_bi`` (the block
influence of the layers DUS removes, after ShortGPT). Lower is better for both; the error
is the SE across sequences. ``solar-ray score-plans`` prints the table; ``--out`` writes it
as JSON marked :data:`SCORES_FORMAT`. Definitions: docs/sweep.md, "Zero-training predictors".
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from solar_ray.checkpoint import (
    OutputExistsError,
    OutputWriteError,
    UnsafeOutputError,
    check_output,
    local_inputs,
    write_json_atomic,
)
from solar_ray.config import StageConfig
from solar_ray.errors import UserError
from solar_ray.evaluate import load_model, load_texts
from solar_ray.fs import is_uri

__all__ = [
    "PlanScore",
    "ScorePlansConfig",
    "angular_distance",
    "check_scores_out",
    "cli",
    "heldout_rows",
    "removed_layers",
    "run_score_plans",
    "score_hidden_states",
    "seam_scores",
    "score_model",
    "upscaling_m_values",
]


#: the ``format`` of a ``score-plans --out`` file: what ``--overwrite`` may replace
SCORES_FORMAT = "solar-ray-scores/1"


class SeamError(UserError):
    """A bad ``m`` or held-out input for the seam predictors."""


class ScorePlansConfig(StageConfig):
    """``solar-ray score-plans``: the seam predictors of every ``m`` of a model."""

    source: str = Field(description="model source: HF dir, hub id, .gguf or 'smollm2-135m'")
    m: list[int] | None = Field(
        default=None, description="the m values to score (default: every m with 2(n-m) > n)"
    )
    data: str | None = Field(
        default=None,
        description="held-out text: a prepared pretrain mix (packed rows) or a .jsonl, "
        ".json, .parquet or .txt file (a document per row or paragraph; default: the "
        "offline python-docs held-out documents)",
    )
    num_sequences: int = Field(default=16, ge=2, description="held-out sequences scored")
    seq_len: int = Field(default=128, ge=8, description="tokens per sequence (text input)")
    batch_size: int = Field(default=8, ge=1)
    out: str | None = Field(default=None, description="also write the scores as JSON here")
    overwrite: bool = Field(
        default=False, description="replace an existing --out file that score-plans wrote"
    )


@dataclass(frozen=True)
class PlanScore:
    """The seam predictors of one ``m`` (mean and SE over ``num_sequences``)."""

    m: int
    num_layers: int  #: s = 2(n - m)
    seam_angular: float
    seam_angular_se: float
    seam_bi: float
    seam_bi_se: float
    num_sequences: int
    removed_a: tuple[int, ...]  #: layers copy A drops (its last m)
    removed_b: tuple[int, ...]  #: layers copy B drops (its first m)


def removed_layers(n: int, m: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The source layers DUS with ``m`` drops from copy A (``n-m..n-1``) and B (``0..m-1``)."""
    if not 0 <= m < n:
        raise SeamError(f"m: {m} must be in 0..{n - 1} for a model of {n} layers")
    return tuple(range(n - m, n)), tuple(range(m))


def upscaling_m_values(n: int) -> list[int]:
    """Every ``m`` whose DUS model is deeper than the base: ``2(n-m) > n``."""
    return [m for m in range(n) if 2 * (n - m) > n]


def _cosine(a: Any, b: Any) -> Any:
    """Cosine similarity over the last axis, in float64."""
    import torch

    a, b = a.double(), b.double()
    return torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12).clamp(-1.0, 1.0)


def angular_distance(a: Any, b: Any) -> Any:
    """``arccos(cos(a, b)) / pi`` over the last axis: 0 for parallel, 1 for opposite."""
    import torch

    return torch.arccos(_cosine(a, b)) / math.pi


def score_hidden_states(
    hidden: Sequence[Any], mask: Any, ms: Iterable[int]
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per-sequence ``(seam_angular, seam_bi)`` of every ``m`` from one batch.

    ``hidden`` holds ``n + 1`` tensors ``(batch, tokens, hidden)``: ``hidden[i]`` enters
    layer ``i``, ``hidden[n]`` leaves the last layer. ``mask`` ``(batch, tokens)`` marks the
    tokens scored. Returns, per ``m``, two arrays of one value per sequence.
    """
    import torch

    n = len(hidden) - 1
    weight = mask.double()
    count = weight.sum(-1).clamp(min=1.0)

    def per_sequence(token_values: Any) -> Any:
        return (token_values * weight).sum(-1) / count

    bi = torch.stack(
        [per_sequence(1.0 - _cosine(hidden[i], hidden[i + 1])) for i in range(n)], dim=-1
    )  # (batch, n): ShortGPT's BI of each layer, per sequence
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for m in ms:
        drop_a, drop_b = removed_layers(n, m)
        angular = per_sequence(angular_distance(hidden[m], hidden[n - m]))
        removed = bi[:, list(drop_a)].sum(-1) + bi[:, list(drop_b)].sum(-1)
        out[m] = (angular.cpu().numpy(), removed.cpu().numpy())
    return out


def _layer_states(model: Any, input_ids: Any, position_ids: Any) -> list[Any]:
    """``h[0..n]`` of one batch: ``output_hidden_states`` for the layers' inputs, and the
    last layer's raw output from a hook (transformers returns it after the final norm).
    Only the decoder runs: the LM head's logits are not needed."""
    import torch

    decoder = model.get_decoder()
    layers = decoder.layers
    captured: list[Any] = []

    def keep(_module: Any, _args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)

    handle = layers[-1].register_forward_hook(keep)
    try:
        with torch.no_grad():
            # no cache: with one, transformers ignores packed position_ids and attends
            # across the documents of a row
            out = decoder(
                input_ids=input_ids,
                position_ids=position_ids,
                output_hidden_states=True,
                use_cache=False,
            )
    finally:
        handle.remove()
    n = len(layers)
    return [*out.hidden_states[:n], captured[-1]]


def score_model(
    model: Any, input_ids: np.ndarray, position_ids: np.ndarray, ms: Iterable[int] | None = None,
    batch_size: int = 8,
) -> list[PlanScore]:
    """The seam predictors of every ``m`` in ``ms`` (default: the upscaling ones) for a
    loaded causal LM on held-out rows ``(num_sequences, tokens)``."""
    import torch

    n = int(model.config.get_text_config().num_hidden_layers)
    ms = sorted(set(upscaling_m_values(n) if ms is None else ms))
    for m in ms:
        removed_layers(n, m)  # checks the range
    if len(input_ids) < 2:
        raise SeamError("data: at least 2 held-out sequences are needed for an error bar")
    device = next(model.parameters()).device
    model.eval()
    parts: dict[int, tuple[list[np.ndarray], list[np.ndarray]]] = {m: ([], []) for m in ms}
    for start in range(0, len(input_ids), batch_size):
        ids = torch.as_tensor(input_ids[start : start + batch_size], device=device)
        pos = torch.as_tensor(position_ids[start : start + batch_size], device=device)
        hidden = _layer_states(model, ids, pos)
        for m, (ang, bi) in score_hidden_states(hidden, pos > 0, ms).items():
            parts[m][0].append(ang)
            parts[m][1].append(bi)
    scores = []
    for m in ms:
        ang, bi = np.concatenate(parts[m][0]), np.concatenate(parts[m][1])
        drop_a, drop_b = removed_layers(n, m)
        scores.append(
            PlanScore(
                m=m,
                num_layers=2 * (n - m),
                seam_angular=float(ang.mean()),
                seam_angular_se=float(ang.std(ddof=1) / math.sqrt(ang.size)),
                seam_bi=float(bi.mean()),
                seam_bi_se=float(bi.std(ddof=1) / math.sqrt(bi.size)),
                num_sequences=int(ang.size),
                removed_a=drop_a,
                removed_b=drop_b,
            )
        )
    return scores


# --------------------------------------------------------------------------- held-out rows


def heldout_rows(
    data: str | None, tokenizer: Any, num_sequences: int, seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, position_ids)`` of ``num_sequences`` held-out rows.

    ``data`` is a prepared pretrain mix (its packed rows as they are) or a text file
    (:func:`solar_ray.evaluate.load_texts`: a document per row, per ``.txt`` paragraph);
    None takes the offline python-docs held-out documents (the documents the ``corpus``
    stage holds out). Text is tokenized, joined with EOS and cut into rows of ``seq_len``
    tokens, positions restarting per document (as the data stage packs).
    """
    if data is not None and (Path(data).is_dir() or is_uri(data)):
        from solar_ray.data.contract import ids_and_positions, open_mix

        mix = open_mix(data, "pretrain", "data")
        table = mix.read(["input_ids", "position_ids"]).slice(0, num_sequences)
        width = len(table.column("input_ids")[0])
        return ids_and_positions(table, width)
    if data is None:
        from solar_ray.corpora import python_docs_documents

        texts = [text for _, text in python_docs_documents("heldout")]
    elif Path(data).is_file():
        texts = load_texts(data)
    else:
        raise SeamError(f"data: {data} is neither a prepared mix nor a text file")
    ids: list[int] = []
    pos: list[int] = []
    eos = tokenizer.eos_token_id
    for text in texts:
        doc = tokenizer(text, add_special_tokens=False)["input_ids"]
        doc = [*doc, eos] if eos is not None else doc
        ids += doc
        pos += list(range(len(doc)))
        if len(ids) >= num_sequences * seq_len:
            break
    rows = min(num_sequences, len(ids) // seq_len)
    if rows < 2:
        raise SeamError(f"data: the held-out text fills {rows} row(s) of {seq_len} tokens; need 2")
    shape = (rows, seq_len)
    return (
        np.asarray(ids[: rows * seq_len], dtype=np.int64).reshape(shape),
        np.asarray(pos[: rows * seq_len], dtype=np.int64).reshape(shape),
    )


def seam_scores(
    model_dir: str, ms: list[int], train: dict[str, Any], train_kind: str, num_sequences: int
) -> dict[str, Any]:
    """The seam predictors a sweep reports: ``ms`` scored on the trials' own held-out rows.

    ``train`` is a trial's resolved training config: a pretrain stage's ``val_data`` rows
    (or the rows its ``val_fraction`` holds out of ``data``); other stages, whose held-out
    rows are not plain text, use the offline python-docs held-out documents.
    """
    from solar_ray.data.contract import held_out_rows, ids_and_positions, open_mix

    model, tokenizer, _ = load_model(model_dir)
    seq_len = int(train.get("seq_len") or 128)
    if train_kind == "pretrain" and (train.get("val_data") or train.get("val_fraction")):
        path = train.get("val_data") or train["data"]
        table = open_mix(path, "pretrain", "val_data").read(["input_ids", "position_ids"])
        if not train.get("val_data"):
            table = table.filter(held_out_rows(table, train["val_fraction"]))
        ids, pos = ids_and_positions(table.slice(0, num_sequences), seq_len)
        held_out = f"{path} (the trials' held-out rows)"
    else:
        ids, pos = heldout_rows(None, tokenizer, num_sequences, seq_len)
        held_out = "offline python-docs held-out documents"
    scores = score_model(model, ids, pos, ms)
    return {
        "source": model_dir,
        "held_out": held_out,
        "num_sequences": int(len(ids)),
        "tokens_per_sequence": int(ids.shape[1]),
        "scores": [asdict(s) for s in scores],
    }


def _is_scores_file(path: Path) -> bool:
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and str(data.get("format", "")).startswith("solar-ray-scores/")


def check_scores_out(out: str, overwrite: bool, inputs: Sequence[str | os.PathLike]) -> Path:
    """The local JSON file ``out`` names, refused (:class:`UserError` naming ``out``) when
    it is a URI, a directory, a symlink, lies inside an input, sits where nothing can be
    written, or exists and is not a score-plans output that ``overwrite`` lets us replace."""
    if is_uri(out):
        raise SeamError(f"out: {out!r}: score-plans writes a local JSON file; give a local path")
    path = Path(out).expanduser().absolute()
    if path.is_dir() and not path.is_symlink():
        raise UnsafeOutputError(f"out: {path} is a directory; give a file name for the scores")
    try:
        check_output(path, inputs=inputs)  # inputs, symlinks, name length
    except OutputExistsError:  # a file is there
        if not overwrite:
            raise OutputExistsError(
                f"out: {path} exists (pass --overwrite to replace a score-plans output)"
            ) from None
        if not _is_scores_file(path):
            raise UnsafeOutputError(
                f"out: {path} is not a score-plans output (no \"format\": \"{SCORES_FORMAT}\"); "
                "--overwrite replaces only what solar-ray wrote: choose another path"
            ) from None
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputWriteError(f"out: cannot write under {parent}")
    return path


def run_score_plans(cfg: ScorePlansConfig) -> list[PlanScore]:
    """Load ``cfg.source``, score its ``m`` values on held-out rows; write JSON if asked.

    ``out`` is checked (:func:`check_scores_out`) before the model is loaded."""
    from solar_ray.models import resolve_model

    inputs = local_inputs(cfg.source, cfg.data)
    out = check_scores_out(cfg.out, cfg.overwrite, inputs) if cfg.out else None
    source = resolve_model(cfg.source)
    if out:  # an alias resolves into the model cache: that is an input too
        check_scores_out(cfg.out, cfg.overwrite, [*inputs, source])
    model, tokenizer, _ = load_model(str(source))
    ids, pos = heldout_rows(cfg.data, tokenizer, cfg.num_sequences, cfg.seq_len)
    scores = score_model(model, ids, pos, cfg.m, cfg.batch_size)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            out,
            {
                "format": SCORES_FORMAT,
                "source": cfg.source,
                "config": cfg.to_dict(),
                "scores": [asdict(s) for s in scores],
            },
        )
    return scores


def format_scores(scores: Sequence[PlanScore]) -> str:
    """The scores as a Markdown table, with each predictor's rank (1 = lowest = best)."""
    rank_a = {s.m: r for r, s in enumerate(sorted(scores, key=lambda s: s.seam_angular), 1)}
    rank_b = {s.m: r for r, s in enumerate(sorted(scores, key=lambda s: s.seam_bi), 1)}
    n = scores[0].num_sequences if scores else 0
    lines = [
        f"| m | layers | seam angular distance (± SE, n={n}) | rank "
        "| block influence removed (± SE) | rank |",
        "|---|---|---|---|---|---|",
    ]
    for s in scores:
        lines.append(
            f"| {s.m} | {s.num_layers} | {s.seam_angular:.4f} ± {s.seam_angular_se:.4f} "
            f"| {rank_a[s.m]} | {s.seam_bi:.4f} ± {s.seam_bi_se:.4f} | {rank_b[s.m]} |"
        )
    return "\n".join(lines)


def cli(command: str, parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """``solar-ray score-plans``: add the arguments; return the runner."""
    from solar_ray.config import add_config_args, add_field_flags

    add_config_args(parser)
    add_field_flags(parser, ScorePlansConfig)

    def run(args: argparse.Namespace) -> int:
        import time

        from solar_ray.config import flag_values, load_config

        cfg = load_config(ScorePlansConfig, args.config, args.overrides, data=flag_values(args, ScorePlansConfig))
        started = time.perf_counter()
        scores = run_score_plans(cfg)
        print(format_scores(scores))
        best_a = min(scores, key=lambda s: s.seam_angular)
        best_b = min(scores, key=lambda s: s.seam_bi)
        print(
            f"\nlowest seam angular distance: m={best_a.m}; lowest block influence removed: "
            f"m={best_b.m} ({time.perf_counter() - started:.1f} s)",
            file=sys.stderr,
        )
        return 0

    return run
