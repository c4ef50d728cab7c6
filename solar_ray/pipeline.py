"""``solar-ray run RECIPE.yaml``: the SOLAR recipe as a stage graph in one run directory.

A recipe names its stages, each a ``kind`` with that kind's config; ``"@name"`` refers to
stage ``name``'s output and gives the graph its edges. The runner validates every stage
first, then runs each once into ``RUN_DIR/<stage>/``, skipping a stage whose output is
finished and records the key the stage has now (:mod:`solar_ray.identity`). A run directory
on object storage is written through a local mirror (:mod:`solar_ray.remote`). Recipes and
what the runner guarantees: docs/pipeline.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from solar_ray import identity, remote
from solar_ray.checkpoint import RUN_MARKERS, write_json_atomic
from solar_ray.cluster import init_ray, storage_path
from solar_ray.config import (
    ConfigError,
    StageConfig,
    apply_overrides,
    check_flags_agree,
    load_yaml,
    validate,
)
from solar_ray.errors import UserError, user_os_error
from solar_ray.hub import PushToHub, push_model
from solar_ray.stages import KINDS, MODEL_KINDS, RAY_KINDS, TRAINING_KINDS, stage
from solar_ray.tracking import Backends

__all__ = [
    "PipelineError",
    "Recipe",
    "StagePlan",
    "plan_recipe",
    "run_recipe",
]

log = logging.getLogger(__name__)

REF = re.compile(r"^@([A-Za-z_][\w-]*)(/.*)?$")
MARKERS = RUN_MARKERS


class PipelineError(RuntimeError):
    """A stage failed; ``stage`` names it. Finished stages are left reusable."""

    def __init__(self, stage: str, cause: BaseException) -> None:
        super().__init__(f"stage {stage!r} failed: {type(cause).__name__}: {cause}")
        self.stage = stage
        self.cause = cause


class Recipe(StageConfig):
    """A recipe file: a name, the run directory, Ray settings and the stages."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    out: str | None = Field(
        default=None,
        description="run directory: a local or shared path, s3:// or gs:// (default runs/<name>)",
    )
    ray_address: str | None = Field(
        default=None, description="Ray address; default: RAY_ADDRESS, else a local instance"
    )
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    report: bool = True
    tracking: Backends | None = Field(
        default=None,
        description="the training stages' tracking backends unless a stage sets its own "
        "(tensorboard, wandb, mlflow, none)",
    )
    stages: dict[str, dict[str, Any]]

    @model_validator(mode="before")
    @classmethod
    def _no_tokens(cls, data: Any) -> Any:
        from solar_ray.hub import refuse_tokens

        refuse_tokens(data)
        return data


# --------------------------------------------------------------------------- runner fields


def _runner_fields(kind: str, data: dict, out: Path, name: str, root: str, key: str) -> dict:
    """The stage's config data with the fields the runner owns: ``out`` (a stage it
    decided to rerun replaces its old output) and a training stage's Ray Train storage."""
    if kind in TRAINING_KINDS:
        # Ray Train state is per stage *and* key: an interrupted run of the same config
        # resumes from its checkpoints; a changed config never resumes from the old one's.
        data = {
            # on clusters, checkpoints go to the bucket that SOLAR_RAY_STORAGE_PATH names
            "storage_path": storage_path(root.rstrip("/").rsplit("/", 1)[-1], "ray")
            or remote.join(root, ".ray"),
            "name": f"{name}-{key[:12]}",
            **data,
        }
    return {**data, "out": str(out), "overwrite": True}


# --------------------------------------------------------------------------- planning


def _ref_uses(value: Any) -> Iterator[tuple[str, str]]:
    """``(stage, sub-path)`` of every ``@stage[/sub]`` anywhere inside ``value``."""
    if isinstance(value, str):
        mt = REF.match(value)
        if mt:
            yield mt.group(1), (mt.group(2) or "").strip("/")
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _ref_uses(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _ref_uses(v)


def _refs(value: Any) -> set[str]:
    """Stage names referenced (``@name``) anywhere inside ``value``."""
    return {name for name, _ in _ref_uses(value)}


def _check_sub_paths(plans: list[StagePlan], configs: dict[str, Any]) -> None:
    """Every ``@stage/sub`` must name something that stage writes (when that is known)."""
    by_name = {p.name: p for p in plans}
    for p in plans:
        for target, sub in sorted(_ref_uses({k: v for k, v in p.raw.items() if k != "kind"})):
            kind = by_name[target].kind
            products = stage(kind).products
            if not sub or products is None or configs.get(target) is None:
                continue
            made = products(configs[target])
            if not any(m == sub or m.startswith(sub + "/") or sub.startswith(m + "/") for m in made):
                raise ConfigError(
                    f"stages.{p.name}: '@{target}/{sub}' is not written by stage {target!r} "
                    f"({kind}), which writes {', '.join(sorted(made)) or 'nothing'}"
                )


def _substitute(value: Any, run_dir: Path | str) -> Any:
    """Replace every ``@name[/sub]`` with ``RUN_DIR/name[/sub]`` (a path or a URI)."""
    if isinstance(value, str):
        mt = REF.match(value)
        if not mt:
            return value
        return remote.join(str(run_dir), mt.group(1)) + (mt.group(2) or "")
    if isinstance(value, Mapping):
        return {k: _substitute(v, run_dir) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_substitute(v, run_dir) for v in value]
    return value


@dataclass
class StagePlan:
    """One stage, resolved: its kind, dependencies, output dir and config data."""

    name: str
    kind: str
    deps: list[str]
    out: Path
    data: dict[str, Any]  # the stage's config data with references substituted
    run_dir: Path
    raw: dict[str, Any] = field(repr=False, default_factory=dict)
    #: the run directory on object storage (None: ``run_dir`` is the run directory)
    uri: str | None = None
    #: ``data`` with references to the run's location (what the stage's key hashes)
    key_data: dict[str, Any] = field(repr=False, default_factory=dict)
    #: recipe-level defaults of fields that do not change what the stage makes (tracking):
    #: under the stage's own values, and outside its key
    defaults: dict[str, Any] = field(default_factory=dict)
    #: where the finished output is published (``push_to_hub:``; not part of the key)
    push: PushToHub | None = None

    def config(self, key: str = "0" * 64) -> StageConfig | None:
        """The validated stage config with the runner's fields (None for ``model`` stages)."""
        cls = stage(self.kind).config
        if cls is None:
            return None
        data = {**self.defaults, **_runner_fields(self.kind, self.data, self.out, self.name, self.uri or str(self.run_dir), key)}
        return validate(cls, data, "recipe", prefix=f"stages.{self.name}")


def _toposort(deps: dict[str, list[str]]) -> list[str]:
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        if state.get(node) == 2:
            return
        if state.get(node) == 1:
            cycle = " -> ".join([*path[path.index(node):], node])
            raise ConfigError(f"stages: dependency cycle {cycle}")
        state[node] = 1
        for d in deps[node]:
            visit(d, [*path, node])
        state[node] = 2
        order.append(node)

    for node in deps:  # recipe order breaks ties
        visit(node, [])
    return order


def _push_target(raw: dict[str, Any], name: str) -> PushToHub | None:
    if raw.get("push_to_hub") is None:
        return None
    if raw["kind"] not in MODEL_KINDS:
        raise ConfigError(
            f"stages.{name}.push_to_hub: a {raw['kind']} stage makes no model to push "
            f"(only {', '.join(sorted(MODEL_KINDS))})"
        )
    return validate(PushToHub, raw["push_to_hub"], "recipe", prefix=f"stages.{name}.push_to_hub")


def _defaults(recipe: Recipe, name: str) -> dict[str, Any]:
    """What a training stage takes from its recipe: its tracking backends and names."""
    if recipe.stages[name].get("kind") not in TRAINING_KINDS:
        return {}
    tracked = {"tracking_project": recipe.name, "tracking_name": f"{recipe.name}-{name}"}
    return tracked | ({"tracking": recipe.tracking} if recipe.tracking is not None else {})


def plan_recipe(
    recipe: Recipe, run_dir: Path, validate_configs: bool = True, uri: str | None = None
) -> list[StagePlan]:
    """Resolve the stage graph into run order; validate every stage config up front.

    With ``uri`` (a run directory on object storage, ``run_dir`` its local mirror),
    training stages read their inputs from ``uri`` and the others from the mirror.
    """
    if not recipe.stages:
        raise ConfigError("stages: a recipe needs at least one stage")
    deps: dict[str, list[str]] = {}
    for name, raw in recipe.stages.items():
        if not re.match(r"^[A-Za-z_][\w-]*$", name):
            raise ConfigError(f"stages.{name}: stage names are letters, digits, '_' and '-'")
        if not isinstance(raw, dict) or "kind" not in raw:
            raise ConfigError(f"stages.{name}.kind: field required (one of {sorted(KINDS)})")
        if not isinstance(raw["kind"], str):
            raise ConfigError(
                f"stages.{name}.kind: expected one name (one of {sorted(KINDS)}), got a "
                f"{type(raw['kind']).__name__}"
            )
        if raw["kind"] not in KINDS:
            raise ConfigError(f"stages.{name}.kind: unknown kind {raw['kind']!r} (one of {sorted(KINDS)})")
        refs = sorted(_refs({k: v for k, v in raw.items() if k != "kind"}))
        unknown = [r for r in refs if r not in recipe.stages]
        if unknown:
            raise ConfigError(f"stages.{name}: refers to unknown stage '@{unknown[0]}'")
        if name in refs:
            raise ConfigError(f"stages.{name}: refers to itself")
        deps[name] = refs
    plans = []
    configs: dict[str, Any] = {}
    for name in _toposort(deps):
        raw = recipe.stages[name]
        kind = raw["kind"]
        out = run_dir / name
        fields = {k: v for k, v in raw.items() if k not in ("kind", "push_to_hub")}
        reads_from = uri if uri and kind in TRAINING_KINDS else run_dir
        data = _substitute(fields, reads_from)
        key_data = _substitute(fields, uri or run_dir)
        plan = StagePlan(name, kind, deps[name], out, data, run_dir, raw, uri=uri, key_data=key_data,
                         defaults=_defaults(recipe, name), push=_push_target(raw, name))  # fmt: skip
        if validate_configs:
            if kind == "model":
                validate(ModelStage, data, "recipe", prefix=f"stages.{name}")
            configs[name] = plan.config()
            # only on inputs outside the run: an earlier stage's output may be stale
            precheck = stage(kind).precheck
            if precheck and not plan.deps:
                try:
                    precheck(configs[name])
                except UserError as e:
                    raise ConfigError(f"stages.{name}: {e}") from None
        plans.append(plan)
    if validate_configs:
        _check_sub_paths(plans, configs)
    return plans


# --------------------------------------------------------------------------- running


def _stage_key(plan: StagePlan) -> str:
    """The key of what a stage would make now: its kind, its config and its inputs' identity.

    Inputs are the outputs of the stages it reads (:func:`solar_ray.identity.artifact_id`,
    which changes whenever one is made again; on object storage, the id their uploaded
    marker records).
    """
    inputs = {d: _artifact(plan, d) for d in plan.deps}
    return identity.key(plan.kind, plan.key_data, inputs, length=64)


def _artifact(plan: StagePlan, name: str) -> str | None:
    if plan.uri:
        return (remote.read_marker(remote.join(plan.uri, name)) or {}).get("artifact")
    return identity.artifact_id(plan.run_dir / name)


def _is_done(plan: StagePlan, key: str) -> bool:
    """The stage's output is finished and records ``key``, the key the stage has now."""
    if plan.uri:  # the uploaded marker is written last: it is there only when all is
        marker = remote.read_marker(remote.join(plan.uri, plan.name)) or {}
        return marker.get("input_key") == key
    return identity.recorded_key(plan.out) == key and stage(plan.kind).finished(plan.out)


def _fetch_inputs(plan: StagePlan) -> None:
    """Bring the outputs a stage reads from the run's object storage into the mirror.

    Training stages read theirs from object storage themselves; a copy already in the
    mirror is kept when it is the same artifact.
    """
    if plan.uri and plan.kind not in TRAINING_KINDS:
        for d in plan.deps:
            remote.download(remote.join(plan.uri, d), plan.run_dir / d)


class ModelStage(StageConfig):
    """A ``model`` stage: an existing model (``source``) or a random one (``random``)."""

    source: str | None = None
    random: dict[str, Any] | None = Field(
        default=None,
        description="model_type, tokenizer (a model source), seed and config fields",
    )

    @model_validator(mode="after")
    def _one(self) -> ModelStage:
        if (self.source is None) == (self.random is None):
            raise ValueError("give exactly one of 'source' or 'random'")
        if self.random is not None and not {"model_type", "tokenizer"} <= set(self.random):
            raise ValueError("random: needs model_type and tokenizer")
        return self


def _run_model_stage(plan: StagePlan) -> None:
    """A ``model`` stage: link a resolved source, or build a random model, as the output."""
    from solar_ray.checkpoint import atomic_output_dir
    from solar_ray.models import init_random_model, resolve_model

    cfg = validate(ModelStage, plan.data, "recipe", prefix=f"stages.{plan.name}")
    if cfg.random is not None:
        init_random_model(plan.out, **cfg.random)
        return
    assert cfg.source is not None
    src = resolve_model(cfg.source)
    with atomic_output_dir(plan.out, overwrite=True, inputs=[src]) as tmp:
        for p in src.iterdir():
            if p.is_file():
                os.symlink(p, tmp / p.name)
        write_json_atomic(tmp / "source.json", {"source": cfg.source, "path": str(src)})


def run_stage(plan: StagePlan, key: str) -> Any:
    """Run one planned stage into its output directory; return the stage's result."""
    run = stage(plan.kind).run
    if run is None:
        return _run_model_stage(plan)
    return run(plan.config(key))


def _push_if_asked(p: StagePlan, run_dir: Path, echo: Callable[[str], None]) -> None:
    """Publish a finished output its stage asks to publish, unless this very output already
    went to that repository (``.pipeline/<stage>.pushed.json``)."""
    if p.push is None:
        return
    if p.uri:  # finished in the bucket: this node pushes its copy of that artifact
        remote.download(remote.join(p.uri, p.name), p.out)
    marker = run_dir / MARKERS / f"{p.name}.pushed.json"
    pushed = {"repo_id": p.push.repo_id, "artifact": identity.artifact_id(p.out)}
    try:
        previous = json.loads(marker.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        previous = None
    if previous is not None and {k: previous.get(k) for k in pushed} == pushed:
        return
    try:
        url = push_model(p.out, p.push.repo_id, p.push.private)
    except UserError as e:
        raise UserError(f"stage {p.name!r}: push_to_hub: {e}") from e
    write_json_atomic(marker, {**pushed, "url": url})
    echo(f"  {p.name}: pushed to {p.push.repo_id}")


@dataclass
class RunResult:
    """What a run did: the stages run and skipped, in order."""

    run_dir: Path  #: the run directory, or its local mirror when ``uri`` is set
    ran: list[str]
    skipped: list[str]
    report: Path | None = None
    #: the run directory on object storage, if that is where it is
    uri: str | None = None


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read and validate a recipe file, applying ``--set`` overrides first."""
    data = apply_overrides(load_yaml(path), overrides)
    return validate(Recipe, data, str(path))


def resolve_run_dir(recipe: Recipe, out: str | Path | None) -> Path:
    """The run directory: ``--out``, else the recipe's ``out``, else ``runs/<name>``."""
    return Path(out or recipe.out or Path("runs") / recipe.name).absolute()


def _check_run_dir(run_dir: Path) -> None:
    """A run directory is new, empty, or one a run made (it has ``.pipeline/``).

    A run writes ``recipe.json`` and one directory per stage into it: never into a
    directory of someone else's files.
    """
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        raise UserError(f"run directory {run_dir} is a file or a symbolic link; give a directory")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not (run_dir / MARKERS).is_dir():
        raise UserError(
            f"run directory {run_dir} holds files and is not a solar-ray run directory (no "
            f"{MARKERS}/); choose a new or empty directory with --out"
        )


def _check_remote_run_dir(uri: str) -> None:
    """A run directory on object storage is empty or one a run made (it has ``.pipeline/``)."""
    names = remote.list_files(uri)
    if names and not any(n.startswith(MARKERS + "/") for n in names):
        raise UserError(
            f"run directory {uri} holds objects and is not a solar-ray run directory (no "
            f"{MARKERS}/); choose a new or empty prefix with --out"
        )


def run_recipe(
    recipe: Recipe,
    run_dir: str | Path | None = None,
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
) -> RunResult:
    """Run every stage of ``recipe`` that is not already done; see the module docstring."""
    target = str(run_dir or recipe.out or Path("runs") / recipe.name)
    remote.check_location(target, "out")
    uri = target.rstrip("/") if remote.is_remote(target) else None
    if uri:
        _check_remote_run_dir(uri)
        run_dir = remote.mirror_dir(uri)
    else:
        run_dir = resolve_run_dir(recipe, target)
    _check_run_dir(run_dir)
    plans = plan_recipe(recipe, run_dir, uri=uri)

    if dry_run:
        echo(f"run directory: {uri or run_dir}")
        for i, p in enumerate(plans, 1):
            status = "done (skip)" if _is_done(p, _stage_key(p)) else "run"
            deps = ", ".join(p.deps) or "-"
            echo(f"{i:>2}. {p.name:<16} {p.kind:<13} after: {deps:<28} {status}")
        return RunResult(run_dir, [], [], uri=uri)

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / MARKERS).mkdir(exist_ok=True)
    write_json_atomic(run_dir / "recipe.json", recipe.to_dict())
    if uri:  # what makes the prefix a run directory (object stores have no empty folders)
        remote.upload_file(run_dir / "recipe.json", remote.join(uri, MARKERS, "recipe.json"))
    if any(p.kind in RAY_KINDS for p in plans):
        init_ray(recipe.ray_address, recipe.runtime_env)
    ran, skipped = [], []
    for i, p in enumerate(plans, 1):
        # once per stage: on a bucket it reads every input's marker back from the bucket
        key = _stage_key(p)
        if _is_done(p, key):
            skipped.append(p.name)
            echo(f"[{i}/{len(plans)}] {p.name} ({p.kind}): done, skipped")
            _push_if_asked(p, run_dir, echo)
            continue
        echo(f"[{i}/{len(plans)}] {p.name} ({p.kind}): running -> {p.out}")
        # a stale log line must not survive a failed rerun
        (run_dir / MARKERS / f"{p.name}.json").unlink(missing_ok=True)
        t0 = time.perf_counter()
        try:
            _fetch_inputs(p)
            run_stage(p, key)
        except UserError as e:
            raise UserError(f"stage {p.name!r}: {e}") from e
        except OSError as e:
            if (line := user_os_error(e)) is None:
                raise PipelineError(p.name, e) from e
            raise UserError(f"stage {p.name!r}: {line}") from e
        except Exception as e:
            raise PipelineError(p.name, e) from e
        identity.record(p.out, key)
        if uri:  # the marker last: from now on the stage is finished for every node
            remote.publish(p.out, remote.join(uri, p.name), artifact=identity.artifact_id(p.out))
        marker = {
            "stage": p.name,
            "kind": p.kind,
            "out": str(p.out),
            "key": key,
            "artifact": identity.artifact_id(p.out),
            "seconds": round(time.perf_counter() - t0, 2),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        write_json_atomic(run_dir / MARKERS / f"{p.name}.json", marker)
        if uri:
            log_file = run_dir / MARKERS / f"{p.name}.json"
            remote.upload_file(log_file, remote.join(uri, MARKERS, log_file.name))
        ran.append(p.name)
        echo(f"[{i}/{len(plans)}] {p.name}: finished in {marker['seconds']} s")
        _push_if_asked(p, run_dir, echo)
    report = None
    if recipe.report and any(p.kind == "eval" for p in plans):
        from solar_ray.report import write_report

        if uri:  # the report reads the stages' manifests and results: only those come
            view = run_dir / ".report-inputs"
            plans = [
                dataclasses.replace(p, out=remote.download(
                    remote.join(uri, p.name), view / p.name, names=identity.MANIFEST_NAMES))
                for p in plans
            ]  # fmt: skip
        report = write_report(run_dir, plans)
        where = report / "index.html"
        if uri:
            remote.publish(report, remote.join(uri, "report"))
            where = remote.join(uri, "report", "index.html")
        echo(f"report: {where}")
    return RunResult(run_dir, ran, skipped, report, uri)


# --------------------------------------------------------------------------- CLI


def cli(command: str, parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """``solar-ray run RECIPE`` and ``solar-ray demo``."""
    from solar_ray.config import add_config_args

    if command == "run":
        parser.add_argument("recipe", help="recipe YAML (see jobs/)")
    add_config_args(parser)
    parser.add_argument("--out", help="run directory (default: the recipe's out, or runs/<name>)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")

    def run(args: argparse.Namespace) -> int:
        recipe_path = getattr(args, "recipe", None) or args.config or _demo_recipe()
        check_flags_agree({"out": args.out} if args.out else {}, args.overrides)
        recipe = load_recipe(recipe_path, args.overrides)
        try:
            result = run_recipe(recipe, args.out, dry_run=args.dry_run)
        except PipelineError as e:
            log.error("%s", e, exc_info=e.cause)
            print(f"solar-ray {command}: {e}; finished stages are kept, rerun to continue")
            return 1
        if not args.dry_run:
            where = result.uri or result.run_dir
            print(f"run directory: {where} (ran {len(result.ran)}, skipped {len(result.skipped)})")
            if result.report:
                if result.uri:
                    print(f"report: {remote.join(result.uri, 'report', 'index.html')}")
                print(f"report: {result.report / 'index.html'}")
                table = result.report / "results.md"
                if table.is_file():
                    print(table.read_text())
        return 0

    return run


def _demo_recipe() -> Path:
    path = Path(__file__).resolve().parents[1] / "jobs" / "demo.yaml"
    if not path.is_file():
        raise ConfigError(f"demo recipe not found at {path}; pass --config RECIPE")
    return path
