"""Evaluation: real benchmarks through lm-evaluation-harness, held-out perplexity, error bars.

:func:`run_eval` loads each model once, wraps it in lm-eval's ``HFLM`` and runs all its
tasks through one ``lm_eval.evaluator.evaluate`` call (:func:`evaluate_lm`); the same model
then scores held-out perplexity over sliding windows. Every score keeps its item count,
standard error and per-item values, so two models compare paired (:mod:`solar_ray.stats`,
:mod:`solar_ray.compare`). Suites, fields and the ``results.json`` schema: docs/merge-eval.md.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from solar_ray.checkpoint import (
    atomic_output_dir,
    check_output,
    library_version,
    library_versions,
    local_inputs,
    read_manifest,
    write_json_atomic,
    write_manifest,
)
from solar_ray.compare import pm as _pm
from solar_ray.compare import results_table
from solar_ray.config import StageConfig
from solar_ray.errors import UserError
from solar_ray.identity import content_hash
from solar_ray.stats import Estimate, mean_se, ratio_estimate

if TYPE_CHECKING:
    import torch

__all__ = [
    "H6_TASKS",
    "EvalConfig",
    "EvalError",
    "EvalModel",
    "TaskSpec",
    "TaskEntry",
    "check_model_source",
    "iter_rows",
    "iter_texts",
    "load_texts",
    "nonfinite_weights",
    "perplexity",
    "plan_tasks",
    "run_eval",
    "token_logprobs",
]

log = logging.getLogger(__name__)


class EvalError(UserError):
    """Bad input to an evaluation (suite, task, data, unreachable hub)."""


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class TaskSpec:
    """One evaluated task: its lm-eval name, shots and headline metric."""

    name: str  #: result key and lm-eval task (or group) name
    display: str  #: table column
    metric: str | None  #: lm-eval metric key (``acc_norm,none``); None: pick after the run
    num_fewshot: int | None  #: None: the task's own default
    offline: bool = False  #: items from the offline benchmark data, not the hub


#: The Open LLM Leaderboard (v1) settings of the paper's H6 average.
H6_TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("arc_challenge", "ARC", "acc_norm,none", 25, offline=True),
    TaskSpec("hellaswag", "HellaSwag", "acc_norm,none", 10, offline=True),
    TaskSpec("mmlu", "MMLU", "acc,none", 5, offline=True),
    TaskSpec("truthfulqa_mc2", "TruthfulQA", "acc,none", 0),
    TaskSpec("winogrande", "Winogrande", "acc,none", 5, offline=True),
    TaskSpec("gsm8k", "GSM8K", "exact_match,strict-match", 5),
)
#: lm-eval task directories holding the hub-only H6 tasks
_H6_HUB_DIRS = ("truthfulqa", "gsm8k")
_METRIC_PREFERENCE = ("acc_norm,none", "acc,none", "exact_match,strict-match", "exact_match,none")


class TaskEntry(BaseModel):
    """A task in a custom suite list: a name, optional shots and headline metric."""

    model_config = ConfigDict(extra="forbid")
    task: str
    num_fewshot: int | None = Field(default=None, ge=0)
    metric: str | None = Field(default=None, description="lm-eval metric key, e.g. acc,none")


class EvalModel(BaseModel):
    """A model to evaluate: a table name and a source (HF dir, hub id, .gguf, alias)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    path: str
    stage: str | None = Field(default=None, description="recorded in the results (e.g. base)")


class EvalConfig(StageConfig):
    """The ``eval`` stage."""

    models: list[EvalModel] = Field(min_length=1)
    suite: Literal["offline", "h6", "none"] | list[str | TaskEntry] = "offline"
    num_fewshot: dict[str, int] = Field(
        default_factory=dict, description="per-task shot overrides: {task: n}"
    )
    limit: int | None = Field(
        default=None, ge=1, description="score the first N items of each task (of each subtask)"
    )
    ppl_data: str | list[str] | None = Field(
        default=None, description="held-out texts: a list, a file or a directory"
    )
    ppl_max_texts: int | None = Field(default=None, ge=1)
    ppl_seq_len: int = Field(default=512, ge=8, description="tokens per perplexity window")
    ppl_stride: int | None = Field(
        default=None,
        ge=1,
        description="tokens a window advances (default: half the window, so each scored "
        "token sees at least ppl_seq_len/2 tokens of context; = ppl_seq_len: disjoint "
        "blocks, half the compute)",
    )
    batch_size: int = Field(default=8, ge=1)
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    apply_chat_template: bool = False
    seed: int = 1234
    hash_models: bool = Field(default=True, description="record each model's sha256")
    note: str | None = Field(
        default=None, description="a sentence for the results: what this evaluation can show"
    )
    out: str | None = Field(default=None, description="directory for results.json/results.md")
    overwrite: bool = False

    @field_validator("models", mode="before")
    @classmethod
    def _models_from_strings(cls, value: Any) -> Any:
        """``"name=path"`` or ``"path"`` strings are accepted for models; a string is split
        at its first ``=`` only when what precedes it is a plain name (letters, digits,
        ``._-``) and the whole string is not an existing path."""
        if not isinstance(value, list):
            return value
        out = []
        for item in value:
            if isinstance(item, str):
                name, sep, path = item.partition("=")
                named = sep and _PLAIN_NAME.fullmatch(name) and not os.path.lexists(os.path.expanduser(item))
                out.append({"name": name, "path": path} if named else {"name": _default_name(item), "path": item})
            else:
                out.append(item)
        return out

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"models: names must be unique, {dupes} repeat")
        if self.suite == "none" and self.ppl_data is None:
            raise ValueError("suite: 'none' evaluates nothing unless ppl_data is given")
        if isinstance(self.suite, list) and not self.suite:
            raise ValueError("suite: no task names given; name tasks, or use 'none' with ppl_data")
        if self.ppl_stride is not None and self.ppl_stride > self.ppl_seq_len:
            raise ValueError(
                f"ppl_stride: {self.ppl_stride} is more than the window (ppl_seq_len "
                f"{self.ppl_seq_len}); a window advances by at most its length"
            )
        return self


#: what ``NAME=PATH`` may have before the ``=``
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _default_name(path: str) -> str:
    p = Path(path)
    return p.name or str(path)


def _offline_spec(name: str) -> TaskSpec:
    from solar_ray.evalsets.benchmarks import BENCHMARKS

    b = BENCHMARKS[name]
    h6 = {t.name: t for t in H6_TASKS}
    return TaskSpec(name, h6[name].display if name in h6 else b.display, b.metric, b.num_fewshot, offline=True)


def plan_tasks(cfg: EvalConfig) -> list[TaskSpec]:
    """The tasks a config evaluates, with shots and headline metrics resolved."""
    from solar_ray.evalsets.benchmarks import BENCHMARKS

    known = {t.name: t for t in H6_TASKS}
    if cfg.suite == "none":
        specs: list[TaskSpec] = []
    elif cfg.suite == "h6":
        specs = list(H6_TASKS)
    elif cfg.suite == "offline":
        specs = [_offline_spec(t.name) for t in H6_TASKS if t.name in BENCHMARKS]
    else:
        specs = []
        for entry in cfg.suite:
            e = TaskEntry(task=entry) if isinstance(entry, str) else entry
            if e.task in BENCHMARKS:
                base = _offline_spec(e.task)
            else:
                base = known.get(e.task) or TaskSpec(e.task, e.task, None, None)
            specs.append(
                TaskSpec(
                    base.name,
                    base.display,
                    e.metric or base.metric,
                    e.num_fewshot if e.num_fewshot is not None else base.num_fewshot,
                    base.offline,
                )
            )
    names = [s.name for s in specs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise EvalError(f"suite: {repeated} listed more than once")
    unknown = sorted(set(cfg.num_fewshot) - set(names))
    if unknown:
        raise EvalError(f"num_fewshot: {unknown} are not tasks of this suite ({names})")
    specs = [
        TaskSpec(s.name, s.display, s.metric, cfg.num_fewshot.get(s.name, s.num_fewshot), s.offline)
        for s in specs
    ]
    for s in specs:
        pool = BENCHMARKS[s.name].fewshot_pool if s.offline else 0
        if pool and (s.num_fewshot or 0) > pool:
            raise EvalError(f"num_fewshot: {s.name} has {pool} few-shot examples, {s.num_fewshot} asked")
    return specs


def _task_manager(specs: Sequence[TaskSpec]) -> Any:
    """An lm-eval TaskManager indexing only what the tasks need (seconds saved per run)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from solar_ray.evalsets.benchmarks import lm_eval_task_dirs

    hub = [s.name for s in specs if not s.offline]
    paths = lm_eval_task_dirs()
    if all(s in {t.name for t in H6_TASKS} for s in hub):
        root = Path(lm_eval.__file__).parent / "tasks"
        return TaskManager(include_path=paths + [str(root / d) for d in _H6_HUB_DIRS], include_defaults=False)
    return TaskManager()


def _load_task(spec: TaskSpec, task_manager: Any) -> dict[str, Any]:
    """lm-eval's ``{tasks, groups, group_map}`` of one task: offline data or the hub."""
    if spec.offline:
        from solar_ray.evalsets.benchmarks import load_task

        return task_manager.load([load_task(spec.name, task_manager)])
    return task_manager.load([spec.name])


def _hub_offline() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _is_unreachable(exc: BaseException) -> bool:
    """Does the exception chain say the hub (or the network) could not be reached?"""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ConnectionError | TimeoutError):
            return True
        if type(e).__name__ in ("OfflineModeIsEnabled", "LocalEntryNotFoundError", "DatasetNotFoundError"):
            return True
        e = e.__cause__ or e.__context__
    return False


def check_tasks(
    specs: Sequence[TaskSpec], task_manager: Any = None, *, skip_unreachable: bool = False
) -> dict[str, str]:
    """Fail early, before any model is loaded: unknown tasks, unreachable hub datasets.

    With ``skip_unreachable`` (the ``h6`` preset) a hub task whose data cannot be fetched
    is not an error: it is returned as ``{task: reason}`` and left out of the run.
    """
    from solar_ray.evalsets.benchmarks import BENCHMARKS, ensure_benchmarks

    if any(s.offline for s in specs):
        ensure_benchmarks()
    hub = [s for s in specs if not s.offline]
    if not hub:
        return {}
    tm = task_manager or _task_manager(specs)
    missing = [s.name for s in hub if s.name not in tm.all_tasks]
    if missing:
        raise EvalError(f"suite: lm-eval has no task named {missing}; offline tasks: {sorted(BENCHMARKS)}")
    hint = "use suite: offline (or offline task names, see `solar-ray benchmarks list`) without a network"
    unavailable: dict[str, str] = {}
    for spec in hub:
        if _hub_offline():
            reason = "needs the Hugging Face hub, and offline mode is set (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)"
        else:
            try:
                tm.load([spec.name])  # downloads (or finds cached) the dataset
                continue
            except Exception as e:
                if not _is_unreachable(e):
                    raise
                reason = f"needs the Hugging Face hub, which could not be reached ({type(e).__name__})"
        if not skip_unreachable:
            raise EvalError(f"task {spec.name!r} {reason}; {hint}")
        unavailable[spec.name] = reason
    return unavailable


# --------------------------------------------------------------------------- texts


def row_text(row: dict[str, Any]) -> str | None:
    """The text of a data row in any of the project's schemas (None when it has none).

    ``text``; ``messages``/``conversations`` (contents joined by newlines); ``prompt`` with
    ``chosen``/``response``/``completion``; ``question`` with ``answer``; Alpaca
    ``instruction``/``input``/``output``; ``sentence``.
    """
    if isinstance(row.get("text"), str):
        return row["text"]
    for key in ("messages", "conversations"):
        if isinstance(row.get(key), list) and row[key]:
            return _as_text(row[key])
    for first, seconds in (
        ("prompt", ("chosen", "response", "completion", "answer")),
        ("question", ("answer", "response")),
        ("instruction", ("input", "output")),
    ):
        if isinstance(row.get(first), str):
            parts = [row[first], *(_as_text(row[k]) for k in seconds if row.get(k) not in (None, ""))]
            return "\n".join(p for p in parts if p)
    return row["sentence"] if isinstance(row.get("sentence"), str) else None


def _as_text(value: Any) -> str:
    """A value, or a message list's contents (``content``; ShareGPT's ``value``) a line each."""
    if not isinstance(value, list):
        return str(value)
    parts = (str(m.get("content", m.get("value", ""))) if isinstance(m, dict) else str(m) for m in value)
    return "\n".join(p for p in parts if p)


_READ_ERRORS = {"invalid_json": "not valid JSON", "undecodable_text": "not UTF-8 text",
                "unreadable_file": "cannot be read", "malformed_csv_row": "a malformed CSV row"}  # fmt: skip


def iter_rows(source: str | os.PathLike) -> Iterator[tuple[str, dict[str, Any], str | None]]:
    """``(file:row, row, mix kind or None)`` of every row of a text source.

    Read by the data package's readers (:mod:`solar_ray.data.sources`, ``TEXT_FILE_TYPES``:
    a ``.txt``/``.md`` paragraph is a row ``{"text"}``, so is a bare JSON string): a file; a
    directory of them (but those in hidden directories or in a mix's ``rejects``, ``packed``
    or ``tokenized``); a data mix written by ``solar-ray data`` or its ``manifest.json`` (its
    ``data`` split). A file that cannot be read or parsed is an :class:`EvalError` naming it.
    """
    from solar_ray.data import contract, sources

    path = Path(source).expanduser().absolute()
    if not path.exists():
        raise EvalError(f"text data not found: {path}")
    if path.name == contract.DATA_MANIFEST and path.is_file():  # a mix's manifest: read the mix
        path = path.parent
    kind = None
    if contract.is_finished(path) and (path / contract.TEXT_SPLIT).is_dir():
        files = contract.shard_files(path, contract.TEXT_SPLIT)
        kind = contract.read_mix_manifest(path).get("kind")
    else:
        try:
            files = sources.expand_paths([str(path)], "text data", sources.TEXT_FILE_TYPES)
        except sources.SourceError as e:
            raise EvalError(str(e)) from None
        skip = set(contract.SPLITS) - {contract.TEXT_SPLIT}
        files = [f for f in files if not any(part.startswith(".") or part in skip
                                             for part in Path(f).relative_to(path).parts)]  # fmt: skip
    for f in files:
        file_type = sources.detect_file_type(f, sources.TEXT_FILE_TYPES)
        if file_type is None:
            exts = ", ".join(e for types in sources.TEXT_FILE_TYPES.values() for e in types)
            raise EvalError(f"{f}: unsupported text file type (use one of {exts})")
        for i, rec in enumerate(sources.iter_records(f, file_type, text_key="text")):
            if rec.data is None:
                where = f"{f}:{rec.index + 1}" if rec.index >= 0 else f
                raise EvalError(f"{where}: {_READ_ERRORS.get(rec.reason, rec.reason)} ({rec.detail})")
            if i == 0 and file_type == "parquet" and row_text(rec.data) is None:
                raise EvalError(
                    f"{f}: no text column (expected text, messages or prompt; has {sorted(rec.data)})"
                )
            yield f"{f}:{rec.index}", rec.data, kind


def iter_texts(source: str | os.PathLike | Sequence[str]) -> Iterator[tuple[str, str]]:
    """``(reference, text)`` of every row of a text source: a list of strings, or any source
    :func:`iter_rows` reads, each row's text by :func:`row_text` (rows without one skipped)."""
    if isinstance(source, list | tuple):
        for i, text in enumerate(source):
            yield f"<list>:{i}", str(text)
        return
    for ref, row, _ in iter_rows(source):
        text = row_text(row)
        if text:
            yield ref, text


def load_texts(source: str | os.PathLike | Sequence[str], max_texts: int | None = None) -> list[str]:
    """The texts of :func:`iter_texts`, at most ``max_texts``."""
    out = []
    for _, text in iter_texts(source):
        out.append(text)
        if max_texts is not None and len(out) >= max_texts:
            break
    if not out:
        raise EvalError(f"no texts in {source!r}")
    return out


# --------------------------------------------------------------------------- scoring


def _windows(num_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows ``(begin, end, first_scored)`` covering every token after the first.

    Each target position ``p >= 1`` is scored exactly once, in the first window that has
    it with at least ``seq_len - stride`` tokens of context (all of it in window one).
    ``1 <= stride <= seq_len``.
    """
    if not 1 <= stride <= seq_len:
        raise EvalError(f"ppl_stride: {stride} must be in 1..{seq_len} (the window)")
    out: list[tuple[int, int, int]] = []
    scored_to = 1
    begin = 0
    while scored_to < num_tokens:
        end = min(begin + seq_len, num_tokens)
        out.append((begin, end, scored_to))
        scored_to = end
        begin = max(begin + stride, end - seq_len + 1) if end < num_tokens else end
        begin = min(begin, scored_to - 1)
    return out


def window_logprobs(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    seq_len: int = 512,
    stride: int | None = None,
    batch_size: int = 8,
) -> list[list[torch.Tensor]]:
    """Per text, per window: ``log p(token_i | context)`` of the tokens the window scores.

    Texts longer than ``seq_len`` tokens are scored with sliding windows advancing by
    ``stride`` (default ``seq_len // 2``), each token once (:func:`_windows`). Windows are
    batched by length with right padding; memory is about ``batch_size * seq_len * vocab``
    floats.
    """
    import torch

    stride = stride or max(1, seq_len // 2)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
    jobs = []  # (text index, window ids, number of leading positions not scored)
    for i, ids in enumerate(encoded):
        for begin, end, first in _windows(len(ids), seq_len, stride):
            jobs.append((i, ids[begin:end], first - begin))
    order = sorted(range(len(jobs)), key=lambda j: (-len(jobs[j][1]), j))
    pieces: dict[int, torch.Tensor] = {}
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = [jobs[j] for j in order[start : start + batch_size]]
            width = max(len(ids) for _, ids, _ in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, (_, ids, _) in enumerate(batch):
                input_ids[r, : len(ids)] = torch.tensor(ids)
                mask[r, : len(ids)] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
            for r, (_, ids, skip) in enumerate(batch):
                n = len(ids)
                lp = torch.log_softmax(logits[r, : n - 1].float(), dim=-1)
                target = input_ids[r, 1:n].to(lp.device)
                got = lp.gather(-1, target[:, None])[:, 0]
                pieces[order[start + r]] = got[skip - 1 :].double().cpu()
            del logits
    out: list[list[torch.Tensor]] = [[] for _ in texts]
    for j, (i, _, _) in enumerate(jobs):
        out[i].append(pieces[j])
    return out


def token_logprobs(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    seq_len: int = 512,
    stride: int | None = None,
    batch_size: int = 8,
) -> list[torch.Tensor]:
    """``log p(token_i | tokens_<i)`` of every token after the first, per text (float64).

    The windows of :func:`window_logprobs`, concatenated per text.
    """
    import torch

    per_window = window_logprobs(model, tokenizer, texts, seq_len=seq_len, stride=stride, batch_size=batch_size)
    return [torch.cat(p) if p else torch.zeros(0, dtype=torch.float64) for p in per_window]


def perplexity(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    seq_len: int = 512,
    stride: int | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Token-level perplexity over all texts, ``exp(total NLL / scored tokens)``, with its spread.

    ``stride`` as in :func:`token_logprobs`. The standard error of the NLL per token treats
    windows as the units (:func:`solar_ray.stats.ratio_estimate`); ``ppl_low``/``ppl_high`` are
    ``exp(nll -/+ 2 SE)``. ``windows`` lists ``[nll sum, tokens]`` per window, in a fixed
    order (texts, then windows), for paired comparisons between models that share a
    tokenizer.
    """
    per_window = window_logprobs(
        model, tokenizer, texts, seq_len=seq_len, stride=stride, batch_size=batch_size
    )
    windows = [[-float(w.sum()), int(w.numel())] for text in per_window for w in text if w.numel()]
    num_tokens = sum(n for _, n in windows)
    if num_tokens == 0:
        raise EvalError("perplexity: the texts have no tokens to score (each needs two or more)")
    est = ratio_estimate([s for s, _ in windows], [n for _, n in windows])
    nll, se = est.value, est.se
    spread = 2 * se if math.isfinite(se) else math.nan
    return {
        "ppl": math.exp(nll),
        "nll_per_token": nll,
        "nll_se": se,
        "ppl_low": math.exp(nll - spread) if math.isfinite(spread) else None,
        "ppl_high": math.exp(nll + spread) if math.isfinite(spread) else None,
        "num_tokens": num_tokens,
        "num_texts": len(texts),
        "num_windows": len(windows),
        "windows": windows,
    }


# --------------------------------------------------------------------------- models


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _dtype(name: str, device: str) -> torch.dtype:
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def _check_model_dir(local: Path) -> Path:
    """``local`` when its ``config.json`` and tokenizer files are there (weights not read)."""
    from solar_ray.models import TOKENIZER_VOCAB_FILES, read_config

    read_config(local, required=("model_type",))
    if not any((local / name).is_file() for name in TOKENIZER_VOCAB_FILES):
        raise EvalError(
            f"{local} has no tokenizer (none of {', '.join(TOKENIZER_VOCAB_FILES)}); copy "
            "the tokenizer files of the model it was made from into it"
        )
    return local


def check_model_source(source: str) -> Path | None:
    """Without loading weights: the local directory of a model source, its config and
    tokenizer checked (a one-line :class:`UserError` otherwise); None for a hub id or an
    object-store URI, which a dry run does not download."""
    from solar_ray.models import EMBEDDED_ALIASES, resolve_model
    from solar_ray.remote import is_remote

    local = os.path.lexists(os.path.expanduser(source)) or source in EMBEDDED_ALIASES
    if is_remote(source) or (not local and "/" in source and not source.startswith((".", "/", "~"))):
        return None
    return _check_model_dir(resolve_model(source))


def load_model(source: str, device: str = "auto", dtype: str = "auto") -> tuple[Any, Any, Path]:
    """``(model, tokenizer, local_dir)`` of any model source, in eval mode on ``device``.

    A model without tokenizer files, with a ``config.json`` that is not JSON, or that
    transformers refuses to load is an :class:`EvalError` naming the directory.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from solar_ray.models import resolve_model

    local = _check_model_dir(resolve_model(source))
    dev = _device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(local), dtype=_dtype(dtype, dev)).to(dev)
        tokenizer = AutoTokenizer.from_pretrained(str(local))
    except Exception as e:  # transformers' verdict on the user's files
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise EvalError(
            f"{local}: transformers cannot load this model ({type(e).__name__}: {first})"
        ) from e
    model.eval()
    return model, tokenizer, local



def nonfinite_weights(model: Any) -> list[str]:
    """Names of the model's parameters that hold a NaN or an infinity."""
    import torch

    return [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]


def _headline(spec: TaskSpec, metrics: dict[str, Any]) -> tuple[str, float]:
    if spec.metric is not None:
        if spec.metric not in metrics:
            have = sorted(k for k in metrics if "stderr" not in k and k not in ("alias", "name", "sample_len"))
            raise EvalError(f"task {spec.name!r}: metric {spec.metric!r} not in its results {have}")
        return spec.metric, float(metrics[spec.metric])
    for key in _METRIC_PREFERENCE:
        if key in metrics:
            return key, float(metrics[key])
    for key, value in metrics.items():
        if isinstance(value, int | float) and "stderr" not in key and key != "sample_len":
            return key, float(value)
    raise EvalError(f"task {spec.name!r}: no numeric metric in its results")


def _leaves(name: str, group_map: dict[str, list[str]]) -> list[str]:
    if name not in group_map:
        return [name]
    return sorted(leaf for child in group_map[name] for leaf in _leaves(child, group_map))


def _per_item(
    res: dict[str, Any], name: str, metric_key: str, group_map: dict[str, list[str]]
) -> tuple[list[str], list[float]]:
    """``(ids, values)`` of the headline metric per scored item, leaf tasks in name order."""
    metric, _, filt = metric_key.partition(",")
    ids: list[str] = []
    values: list[float] = []
    for leaf in _leaves(name, group_map):
        samples = sorted(
            (s for s in res.get("samples", {}).get(leaf, []) if s.get("filter", "none") == (filt or "none")),
            key=lambda s: s["doc_id"],
        )
        for s in samples:
            value = s.get(metric)
            if not isinstance(value, int | float):
                return [], []
            ids.append(f"{leaf}/{s['doc_id']}")
            values.append(float(value))
    return ids, values


def evaluate_lm(
    lm: Any,
    specs: Sequence[TaskSpec],
    *,
    limit: int | None = None,
    seed: int = 1234,
    task_manager: Any = None,
    apply_chat_template: bool = False,
    label: str = "model",
) -> dict[str, dict[str, Any]]:
    """Run every task on an lm-eval ``LM``.

    Returns ``{task: {score, metric, metrics, num_items, stderr, item_ids, items}}``:
    ``score`` is lm-eval's aggregate of the headline metric; ``items`` its per-item
    values (for a group, every subtask's items, in ``item_ids`` order) and ``stderr`` the
    standard error of their mean. A metric that is not a mean over items keeps lm-eval's
    own stderr and no ``items``.

    Does what ``lm_eval.simple_evaluate`` does (seeds, per-task shots, few-shot seed) and
    then one ``lm_eval.evaluator.evaluate`` over all tasks, so requests of every task are
    batched together and the environment report that ``simple_evaluate`` gathers on every
    call (a few seconds of subprocesses) is skipped. Deterministic for a deterministic model.
    """
    import random

    import numpy as np
    import torch
    from lm_eval.evaluator import evaluate

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    task_manager = task_manager or _task_manager(specs)
    merged: dict[str, dict[str, Any]] = {"tasks": {}, "groups": {}, "group_map": {}}
    for spec in specs:
        try:
            loaded = _load_task(spec, task_manager)
        except Exception as e:
            if _is_unreachable(e):
                raise EvalError(
                    f"task {spec.name!r}: the Hugging Face hub could not be reached "
                    f"({type(e).__name__}); use suite: offline to evaluate without a network"
                ) from None
            raise
        for task in loaded["tasks"].values():
            if spec.num_fewshot is not None:
                task.set_config(key="num_fewshot", value=spec.num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=seed)
        for key in merged:
            merged[key].update(loaded.get(key) or {})
    log.info("%s: %s", label, ", ".join(f"{s.name} ({s.num_fewshot}-shot)" for s in specs))
    res = evaluate(
        lm=lm,
        task_dict=merged,
        limit=limit,
        bootstrap_iters=1000,
        log_samples=True,
        apply_chat_template=apply_chat_template,
        fewshot_as_multiturn=apply_chat_template,
    )
    assert res is not None, "lm-eval returned no results (not rank 0?)"
    out: dict[str, dict[str, Any]] = {}
    for spec in specs:
        metrics = res["results"][spec.name]
        key, value = _headline(spec, metrics)
        numeric = {k: v for k, v in metrics.items() if isinstance(v, int | float) and k != "sample_len"}
        ids, items = _per_item(res, spec.name, key, merged["group_map"])
        est = mean_se(items)
        if not items or not math.isclose(est.value, value, rel_tol=1e-9, abs_tol=1e-12):
            lm_se = metrics.get(key.replace(",", "_stderr,", 1))
            ids, items = [], []
            est = Estimate(value, float(lm_se) if isinstance(lm_se, int | float) else math.nan, _num_items(res, spec.name, merged["group_map"]) or 0)
        out[spec.name] = {
            "score": value,
            "metric": key,
            "metrics": numeric,
            "num_items": est.n,
            "stderr": est.se if math.isfinite(est.se) else None,
            "item_ids": ids,
            "items": items,
        }
    return out


def _num_items(res: dict[str, Any], name: str, group_map: dict[str, list[str]]) -> int | None:
    """Items evaluated in a task, or in all leaf tasks of a group (MMLU)."""
    samples = res.get("n-samples", {})
    if name in samples:
        return samples[name].get("effective")
    if name in group_map:
        counts = [_num_items(res, child, group_map) for child in group_map[name]]
        return sum(c for c in counts if c is not None)
    return None


def _evaluate_model(
    cfg: EvalConfig,
    entry: EvalModel,
    specs: Sequence[TaskSpec],
    task_manager: Any,
    ppl_texts: list[str] | None,
) -> dict[str, Any]:
    """Every task and the perplexity of one model."""
    t0 = time.monotonic()
    model, tokenizer, local = load_model(entry.path, cfg.device, cfg.dtype)
    bad = nonfinite_weights(model)
    if bad:
        log.warning(
            "%s: %d weight tensors hold NaN or inf (%s): its scores mean nothing",
            entry.name, len(bad), ", ".join(bad[:3]),
        )  # fmt: skip
    manifest = read_manifest(local) or {}
    result: dict[str, Any] = {
        "name": entry.name,
        "path": str(local),
        "source": entry.path,
        "stage": entry.stage or manifest.get("stage"),
        "scores": {},
        "stderr": {},
        "num_items": {},
        "items": {},
        "average": None,
        "average_stderr": None,
        "ppl": None,
        "ppl_low": None,
        "ppl_high": None,
        "ppl_tokens": None,
        "ppl_texts": None,
        "ppl_windows": None,
        "metrics": {},
        "fingerprint": None,
        "nonfinite_weights": bad,
    }
    if specs:
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
        per_task = evaluate_lm(
            lm,
            specs,
            limit=cfg.limit,
            seed=cfg.seed,
            task_manager=task_manager,
            apply_chat_template=cfg.apply_chat_template,
            label=entry.name,
        )
        for name, r in per_task.items():
            result["metric_keys"] = {**result.get("metric_keys", {}), name: r["metric"]}
            result["item_ids"] = {**result.get("item_ids", {}), name: r["item_ids"]}
            result["scores"][name] = r["score"]
            result["stderr"][name] = r["stderr"]
            result["metrics"][name] = r["metrics"]
            result["num_items"][name] = r["num_items"]
            result["items"][name] = [int(v) if float(v).is_integer() else v for v in r["items"]]
        result["average"], result["average_stderr"] = _average(result["scores"], result["stderr"])
    if ppl_texts:
        seq_len = _ppl_seq_len(cfg, model)
        stride = cfg.ppl_stride
        if stride and stride > seq_len:
            log.warning(
                "%s: ppl_stride %d is more than its %d-token window (max_position_embeddings); "
                "using %d", entry.name, stride, seq_len, seq_len,
            )  # fmt: skip
            stride = seq_len
        ppl = perplexity(
            model, tokenizer, ppl_texts, seq_len=seq_len, stride=stride, batch_size=cfg.batch_size
        )
        result["ppl"] = ppl["ppl"]
        result["ppl_low"], result["ppl_high"] = ppl["ppl_low"], ppl["ppl_high"]
        result["ppl_tokens"] = ppl["num_tokens"]
        result["ppl_texts"] = ppl["num_texts"]
        result["ppl_windows"] = ppl["windows"]
    if cfg.hash_models:
        result["fingerprint"] = content_hash(local)
    result["eval_seconds"] = round(time.monotonic() - t0, 2)
    del model
    return result


def _average(scores: dict[str, float], stderr: dict[str, float | None]) -> tuple[float | None, float | None]:
    """The unweighted mean of the task scores and its standard error (tasks independent)."""
    if not scores:
        return None, None
    k = len(scores)
    mean = sum(scores.values()) / k
    ses = [stderr.get(t) for t in scores]
    if any(s is None for s in ses):
        return mean, None
    return mean, math.sqrt(sum(s * s for s in ses)) / k  # type: ignore[operator]


def _ppl_seq_len(cfg: EvalConfig, model: Any) -> int:
    limit = getattr(model.config, "max_position_embeddings", None)
    return min(cfg.ppl_seq_len, limit) if limit else cfg.ppl_seq_len


# --------------------------------------------------------------------------- results


def run_eval(
    cfg: EvalConfig, on_model: Callable[[dict[str, Any]], None] | None = None, dry_run: bool = False
) -> dict[str, Any]:
    """Evaluate every model of ``cfg``; return the results dict (and write it to ``cfg.out``).

    ``on_model(result)`` is called after each model (progress reporting). ``dry_run``: check
    the models, tasks, texts and output, print the plan, evaluate nothing (returns ``{}``).
    """
    specs = plan_tasks(cfg)
    if dry_run:
        _print_plan(cfg, specs)
        return {}
    ppl_sources = cfg.ppl_data if isinstance(cfg.ppl_data, str) else None
    inputs = local_inputs(*(m.path for m in cfg.models), ppl_sources)
    if cfg.out:  # refused before any work, not after an hour of evaluation
        check_output(cfg.out, cfg.overwrite, inputs)
    task_manager = _task_manager(specs) if specs else None
    unavailable = check_tasks(specs, task_manager, skip_unreachable=cfg.suite == "h6")  # before any model
    specs = [s for s in specs if s.name not in unavailable]
    for name, why in unavailable.items():
        log.warning("%s not evaluated: %s", name, why)
    ppl_texts = load_texts(cfg.ppl_data, cfg.ppl_max_texts) if cfg.ppl_data is not None else None
    from solar_ray.evalsets.benchmarks import data_identity

    results: dict[str, Any] = {
        "suite": cfg.suite if isinstance(cfg.suite, str) else "custom",
        "tasks": [{**asdict(s), "metric": s.metric or "auto"} for s in specs],
        "unavailable": unavailable,
        "item_ids": {},
        "models": [],
        "limit": cfg.limit,
        "note": cfg.note,
        "benchmark_data": data_identity() if any(s.offline for s in specs) else None,
        "config": cfg.to_dict(),
        "versions": {**library_versions(), "lm_eval": library_version("lm_eval")},
    }
    for entry in cfg.models:
        model_result = _evaluate_model(cfg, entry, specs, task_manager, ppl_texts)
        for task in results["tasks"]:  # tasks without a fixed metric: the one picked
            if task["metric"] == "auto":
                task["metric"] = model_result.get("metric_keys", {}).get(task["name"], "auto")
        model_result.pop("metric_keys", None)
        for task, ids in model_result.pop("item_ids", {}).items():
            if results["item_ids"].setdefault(task, ids) != ids:  # not the same items: own ids
                model_result.setdefault("item_ids", {})[task] = ids
        results["models"].append(model_result)
        log.info(
            "%s: average %s, ppl %s", entry.name, _pm(model_result["average"], model_result["average_stderr"]),
            model_result["ppl"] and f"{model_result['ppl']:.2f}",
        )
        if on_model:
            on_model(model_result)
    if cfg.out:
        write_results(results, cfg.out, overwrite=cfg.overwrite, inputs=inputs)
    return results


def _print_plan(cfg: EvalConfig, specs: list[TaskSpec]) -> None:
    """``--dry-run``: check the models, tasks, texts and output; print what would run."""
    print(f"suite {cfg.suite if isinstance(cfg.suite, str) else 'custom'}: {len(specs)} tasks")
    for s in specs:
        shots_ = "default" if s.num_fewshot is None else f"{s.num_fewshot}-shot"
        where = "offline" if s.offline else "hub"
        print(f"  {s.name:16s} {shots_:>9s}  {s.metric or 'auto'}  ({s.display}, {where})")
    hub = [s.name for s in specs if not s.offline]
    if hub:
        tm = _task_manager(specs)
        missing = [n for n in hub if n not in tm.all_tasks]
        if missing:
            raise EvalError(f"suite: lm-eval has no task named {missing}")
    for m in cfg.models:
        checked = check_model_source(m.path)
        print(f"  model {m.name}: {m.path}" + ("" if checked else " (hub or remote: not fetched)"))
    if cfg.ppl_data is not None:
        load_texts(cfg.ppl_data, 1)  # exists and holds text
        print(f"  perplexity on {cfg.ppl_data!r} (windows of {cfg.ppl_seq_len} tokens)")
    if cfg.out:
        ppl_sources = cfg.ppl_data if isinstance(cfg.ppl_data, str) else None
        check_output(cfg.out, cfg.overwrite, local_inputs(*(m.path for m in cfg.models), ppl_sources))
    if cfg.limit:
        print(f"  the first {cfg.limit} items of each task")


def write_results(
    results: dict[str, Any],
    out: str | os.PathLike,
    overwrite: bool = False,
    inputs: Sequence[str | os.PathLike] = (),
) -> Path:
    """Write ``results.json``, ``results.md`` and ``solar.json`` into ``out`` atomically.

    ``out`` is never one of ``inputs`` (the evaluated models, the held-out texts) nor a
    directory solar-ray did not write (:func:`solar_ray.checkpoint.check_output`).
    """
    with atomic_output_dir(out, overwrite=overwrite, inputs=inputs) as tmp:
        write_json_atomic(tmp / "results.json", results)
        (tmp / "results.md").write_text(results_table(results), encoding="utf-8")
        write_manifest(
            tmp,
            "eval",
            parents=[
                {"name": m["name"], "path": m["path"], "sha256": m.get("fingerprint")}
                for m in results["models"]
            ],
            config=results["config"],
            metrics={
                m["name"]: {
                    "average": m["average"],
                    "ppl": m["ppl"],
                    **m["scores"],
                    **{f"{t}_stderr": se for t, se in m["stderr"].items()},
                    **{f"{t}_n": n for t, n in m["num_items"].items()},
                }
                for m in results["models"]
            },
        )
    return Path(out)

