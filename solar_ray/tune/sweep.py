"""``solar-ray sweep``: run a sweep recipe as one Ray Tune experiment and report it.

:func:`run_sweep` plans the trials and checks the recipe before anything runs, runs the
recipe's ``stages`` once into ``OUT/prepare``, runs the trials as a ``Tuner`` (restored
with ``Tuner.restore`` when the experiment exists, so an interrupted sweep continues), and
writes the report (:mod:`solar_ray.tune.report`). Outputs and resuming: docs/sweep.md.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from solar_ray.checkpoint import write_json_atomic
from solar_ray.config import ConfigError
from solar_ray.train.launch import worker_resources
from solar_ray.tune.budget import TrialBudget, budgets_path, trial_budget
from solar_ray.tune.config import SweepConfig, TrialSpec, plan_trials
from solar_ray.tune.trial import (
    ROW_KEYS,
    TRIALS_DIR,
    model_stats,
    run_trial,
    train_config_for,
    train_stage,
)

__all__ = ["SweepResult", "experiment_name", "fit_concurrency", "run_sweep", "sweep_dir"]

log = logging.getLogger(__name__)

#: the Tune trial driver holds (almost) nothing; its TorchTrainer requests the workers.
#: Tune refuses an empty request, so the driver asks for one MiB of memory.
DRIVER_RESOURCES = {"cpu": 0, "memory": 1 << 20}


@dataclass
class SweepResult:
    """What a sweep made: one row per trial, the best trial and the report files."""

    out: Path
    experiment: Path
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    files: dict[str, Path] = field(default_factory=dict)
    max_concurrent_trials: int = 1


def sweep_dir(cfg: SweepConfig, out: str | Path | None = None) -> Path:
    """The sweep directory: ``--out``, else the recipe's ``out``, else ``runs/<name>``."""
    return Path(out or cfg.out or Path("runs") / cfg.name).absolute()


def experiment_name(cfg: SweepConfig) -> str:
    """``<name>-<scheduler>-<recipe hash>``: the same recipe resumes, a changed one does not."""
    return f"{cfg.name}-{cfg.scheduler.kind}-{cfg.fingerprint()}"


def fit_concurrency(
    cluster: Mapping[str, float],
    per_trial: Mapping[str, float],
    num_trials: int,
    cap: int | None = None,
) -> int:
    """How many trials' workers fit in ``cluster`` at once (1..num_trials, at most ``cap``).

    A cluster smaller than one trial (an autoscaler that has not scaled up yet) gives 1.
    """
    fits = num_trials
    for key, need in per_trial.items():
        if need > 0:
            fits = min(fits, int(math.floor(float(cluster.get(key, 0.0)) / need + 1e-9)))
    fits = max(1, min(fits, num_trials))
    return min(fits, cap) if cap else fits


def _trial_name(trial: Any) -> str:
    return str(trial.config["trial"])


def _substitute(value: Any, run_dir: Path) -> Any:
    from solar_ray.pipeline import _substitute as substitute

    return substitute(value, run_dir)


def _prepare(cfg: SweepConfig, out: Path, echo: Callable[[str], None]) -> Path:
    """Run the recipe's ``stages`` into ``OUT/prepare`` (each skipped when done)."""
    from solar_ray.pipeline import run_recipe

    prepare = out / "prepare"
    if cfg.stages:
        run_recipe(_prepare_recipe(cfg), prepare, echo=echo)
    return prepare


def _prepare_recipe(cfg: SweepConfig) -> Any:
    from solar_ray.pipeline import Recipe

    return Recipe(
        name=f"{cfg.name}-prepare",
        ray_address=cfg.ray_address,
        runtime_env=cfg.runtime_env,
        report=False,
        stages=cfg.effective_stages(),
    )


def _resolved_trials(trials: list[TrialSpec], prepare: Path) -> list[TrialSpec]:
    out = []
    for t in trials:
        data = _substitute(t.to_dict(), prepare)
        out.append(TrialSpec.model_validate(data))
    return out


def _placeholder_steps(train: Mapping[str, Any]) -> int:
    """Steps to validate a budgeted trial's config with before its real steps are known
    (no fewer than its warmup, which the config refuses to exceed)."""
    return max(1, int(train.get("warmup_steps") or 0))


def _check_up_front(cfg: SweepConfig, out: Path) -> None:
    """Fail before any compute: the training config validates and best.yaml will plan."""
    from solar_ray.tune.report import best_recipe, check_recipe

    trials = plan_trials(cfg)
    train = cfg.train_fields()
    if cfg.budget is not None:
        # each trial's steps come from the budget when the models are known
        train["steps"] = _placeholder_steps(train)
    ctx = {
        "train_kind": cfg.train_kind,
        "train": train,
        "out": str(out),
        "storage_path": str(out / "ray_train"),
        "experiment": experiment_name(cfg),
    }
    for spec in trials:
        train_config_for(ctx, spec, "model")
    if cfg.train_kind == "pretrain" and cfg.train.get("streaming"):
        raise ConfigError("train.streaming: not supported in sweeps yet (trials read the shards)")
    if cfg.stages:
        check_recipe(_prepare_recipe(cfg), out / "prepare")
    check_recipe(best_recipe(cfg, trials[0], steps=_placeholder_steps(train)), out / "best-run")


def run_sweep(
    cfg: SweepConfig,
    out: str | Path | None = None,
    *,
    dry_run: bool = False,
    report_only: bool = False,
    echo: Callable[[str], None] = print,
) -> SweepResult:
    """Run (or resume) the sweep and write its report; see the module docstring.

    ``report_only`` rewrites the report of the experiment as it stands (finished or not)
    without running anything.
    """
    out = sweep_dir(cfg, out)
    name = experiment_name(cfg)
    trials = plan_trials(cfg)
    if report_only:
        return _report_only(cfg, out, name, trials, echo)
    _check_up_front(cfg, out)
    if dry_run:
        echo(f"sweep directory: {out}\nexperiment: {name} ({cfg.scheduler.kind})")
        budgets = _dry_run_budgets(cfg, trials, out)
        for i, t in enumerate(trials, 1):
            b = budgets.get(t.name)
            echo(
                f"{i:>3}. {t.name:<24} {t.label()}{' (reference)' if t.reference else ''}"
                + (f"  {_budget_text(b)}" if b else "")
            )
        return SweepResult(out, out / "tune" / name, [], None)

    import ray
    from ray import tune

    from solar_ray.cluster import init_ray
    from solar_ray.models import resolve_model
    from solar_ray.tune.report import write_report

    init_ray(cfg.ray_address, cfg.runtime_env)
    out.mkdir(parents=True, exist_ok=True)
    prepare = _prepare(cfg, out, echo)
    resolved = _resolved_trials(trials, prepare)
    base_dir = resolve_model(_substitute(cfg.base, prepare))
    ctx: dict[str, Any] = {
        "base_dir": str(base_dir),
        "train_kind": cfg.train_kind,
        "train": _substitute(cfg.train_fields(), prepare),
        "out": str(out),
        "storage_path": str(out / "ray_train"),
        "upscale_cache": str(Path(cfg.upscale_cache or out / "upscales").absolute()),
        "metric": cfg.scheduler.metric,
        "mode": cfg.scheduler.mode,
        "experiment": name,
        # successive halving pauses trials at its rungs: they must resume from there (with a
        # budget the rungs are amounts of it, and each trial's steps are its own)
        "checkpoint_at": cfg.rungs() if cfg.scheduler.kind == "sha" and not cfg.budget else [],
    }
    budgets = plan_budgets(cfg, resolved, base_dir, ctx)
    if cfg.budget is not None:
        resolved = [_with_budget(t, budgets[t.name]) for t in resolved]
    ctx["trials"] = {t.name: t.to_dict() for t in resolved}
    trials_root = Path(out) / TRIALS_DIR / name
    trials_root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(budgets_path(trials_root), {k: b.to_dict() for k, b in budgets.items()})
    # the inputs (model, tokenizer, data) are checked once here, not in every trial
    first = train_config_for(ctx, resolved[0], base_dir)
    prepare = train_stage(cfg.train_kind).prepare
    assert prepare is not None
    prepare(first)
    if cfg.seam:
        _score_seam(cfg, resolved, base_dir, first, trials_root, echo)
    per_trial = {k: v * first.min_workers for k, v in worker_resources(first).items()}
    concurrency = fit_concurrency(
        ray.cluster_resources(), per_trial, len(resolved), cfg.max_concurrent_trials
    )
    echo(f"sweep {name}: {len(resolved)} trials, {concurrency} at a time -> {out}")
    for t in resolved:
        echo(f"  {t.name:<14} {_budget_text(budgets[t.name])}")

    from solar_ray.tracking import tune_callbacks
    from solar_ray.tune.hooks import PlacementGroupReaper, get_registry

    registry = get_registry(name, create=True)
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), DRIVER_RESOURCES)
    path = out / "tune" / name
    if tune.Tuner.can_restore(str(path)):
        echo(f"resuming {path}")
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search([t.name for t in resolved])},
            tune_config=tune.TuneConfig(
                metric=cfg.scheduler.metric,
                mode=cfg.scheduler.mode,
                scheduler=_scheduler(cfg, resolved),
                # Tune bounds concurrency with a ConcurrencyLimiter that counts a paused
                # trial as live: under successive halving the trials waiting at a rung would
                # keep the last ones from ever being created. There, the trials' drivers
                # (which hold no resources) all start and their Train runs queue for workers
                max_concurrent_trials=None if cfg.scheduler.kind == "sha" else concurrency,
                trial_name_creator=_trial_name,
                trial_dirname_creator=_trial_name,
                reuse_actors=False,  # a stopped trial's driver must exit (its trainer with it)
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=str(out / "tune"),
                failure_config=tune.FailureConfig(max_failures=cfg.trial_max_failures),
                callbacks=[PlacementGroupReaper(name), *tune_callbacks(cfg.tracking, name)],
                verbose=1,
            ),
        )
    try:
        grid = tuner.fit()
    finally:
        ray.kill(registry)
    rows = collect_rows(grid, resolved, cfg, out)
    files, best = write_report(out, cfg, rows, trials, echo=echo, seam=read_seam(out, name))
    return SweepResult(out, path, rows, best, files, concurrency)


def plan_budgets(
    cfg: SweepConfig, trials: list[TrialSpec], base_dir: Path, ctx: Mapping[str, Any]
) -> dict[str, TrialBudget]:
    """Every trial's budget: its steps (from ``budget``, else ``train.steps``), tokens,
    estimated FLOPs and, under successive halving with a budget, its rung steps."""
    from solar_ray.tune.config import BudgetConfig

    out: dict[str, TrialBudget] = {}
    stats_by_choice: dict[str, dict[str, Any]] = {}
    for spec in trials:
        train = {**ctx["train"]}
        if cfg.budget is not None:
            train["steps"] = _placeholder_steps(train)
        tc = train_config_for({**ctx, "train": train}, spec, base_dir)
        key = str(spec.upscale_args())
        if key not in stats_by_choice:
            stats_by_choice[key] = model_stats(base_dir, tc.seq_len, spec.upscale_args())
        stats = stats_by_choice[key]
        tokens_per_step = tc.effective_global_batch_size * tc.seq_len
        if cfg.budget is not None:
            sha = cfg.scheduler.kind == "sha"
            out[spec.name] = trial_budget(
                cfg.budget,
                stats,
                tokens_per_step,
                milestones=cfg.rungs() if sha and not spec.reference else [],
                eval_every=int(cfg.train.get("eval_every") or 0),
                trial=spec.name,
            )
        else:
            steps = int(spec.train.get("steps") or cfg.train.get("steps") or 0)
            out[spec.name] = trial_budget(
                BudgetConfig(tokens=max(1, steps) * tokens_per_step), stats, tokens_per_step
            )
    return out


def _budget_text(b: TrialBudget) -> str:
    return f"{b.num_layers:>3} layers  {b.steps:>5} steps  {b.tokens:.3g} tokens  {b.flops:.3g} FLOPs"


def _dry_run_budgets(cfg: SweepConfig, trials: list[TrialSpec], out: Path) -> dict[str, TrialBudget]:
    """The trials' budgets when the base model is on this machine already (a local
    directory or .gguf file, or the embedded alias); a dry run never downloads a model, and
    reads a GGUF file's header instead of dequantizing it into the cache."""
    from solar_ray.models import gguf_source, resolve_model

    base = gguf_source(cfg.base)
    if base is None:
        if not Path(cfg.base).exists():
            return {}
        base = resolve_model(cfg.base)
    ctx = {"train_kind": cfg.train_kind, "train": cfg.train_fields(), "out": str(out),
           "storage_path": str(out / "ray_train"), "experiment": experiment_name(cfg)}  # fmt: skip
    return plan_budgets(cfg, trials, base, ctx)


def _with_budget(spec: TrialSpec, budget: TrialBudget) -> TrialSpec:
    """The trial with its budget's steps (and rung checkpoints) as training overrides."""
    train = {**spec.train, "steps": budget.steps}
    if budget.rung_steps:
        train["checkpoint_at"] = sorted({*train.get("checkpoint_at", []), *budget.rung_steps})
    return spec.model_copy(update={"train": train})


def _score_seam(
    cfg: SweepConfig,
    trials: list[TrialSpec],
    base_dir: Path,
    train_cfg: Any,
    trials_root: Path,
    echo: Callable[[str], None],
) -> None:
    """The seam predictors of every searched m, on the held-out rows, as one Ray task with
    a training worker's resources (a GPU where the trials get one); ``seam.json``."""
    import ray

    from solar_ray.seam import seam_scores

    ms = sorted({t.m for t in trials if t.method == "solar" and t.m is not None})
    target = trials_root / "seam.json"
    if not ms or target.is_file():
        return
    resources = worker_resources(train_cfg)
    task = ray.remote(seam_scores).options(
        num_cpus=resources.get("CPU", 1),
        num_gpus=resources.get("GPU", 0),
        resources={k: v for k, v in resources.items() if k not in ("CPU", "GPU")},
    )
    scores = ray.get(
        task.remote(str(base_dir), ms, train_cfg.to_dict(), cfg.train_kind, cfg.seam_sequences)
    )
    write_json_atomic(target, scores)
    echo(f"seam predictors of m in {ms} on {scores['num_sequences']} held-out rows")


def _report_only(
    cfg: SweepConfig, out: Path, name: str, trials: list[TrialSpec], echo: Callable[[str], None]
) -> SweepResult:
    from ray.tune import ExperimentAnalysis, ResultGrid

    from solar_ray.tune.report import write_report

    path = out / "tune" / name
    if not path.is_dir():
        # the recipe's hash may have changed with the code: one experiment of this name and
        # scheduler is still unambiguous
        found = sorted((out / "tune").glob(f"{cfg.name}-{cfg.scheduler.kind}-*"))
        if len(found) != 1:
            raise ConfigError(f"--report-only: no experiment {name} in {out / 'tune'}")
        log.warning("reporting %s (this recipe now hashes to %s)", found[0].name, name)
        path = found[0]
    grid = ResultGrid(ExperimentAnalysis(str(path)))
    rows = collect_rows(grid, trials, cfg, out, path.name)
    files, best = write_report(out, cfg, rows, trials, echo=echo, seam=read_seam(out, path.name))
    return SweepResult(out, path, rows, best, files)


def _scheduler(cfg: SweepConfig, trials: list[TrialSpec]) -> Any:
    """The Tune scheduler of ``scheduler.kind``, over steps or the budget's unit."""
    from ray.tune.schedulers import FIFOScheduler

    from solar_ray.tune.hooks import ReferenceExemptASHA, SuccessiveHalving

    reference = {t.name for t in trials if t.reference}
    if cfg.scheduler.kind == "grid":
        return FIFOScheduler()
    if cfg.scheduler.kind == "sha":
        return SuccessiveHalving(
            trials=[t.name for t in trials],
            reference=reference,
            metric=cfg.scheduler.metric,
            mode=cfg.scheduler.mode,
            time_attr=cfg.time_attr,
            milestones=cfg.rungs(),
            reduction_factor=cfg.scheduler.reduction_factor,
        )
    if cfg.budget is not None:
        max_t: float = cfg.budget.amount
        grace: float = float(cfg.scheduler.grace_period_fraction or 0) * max_t
    else:
        max_t, grace = int(cfg.train["steps"]), cfg.scheduler.grace_period_steps
    return ReferenceExemptASHA(
        reference=reference,
        time_attr=cfg.time_attr,
        max_t=max_t,
        grace_period=grace,
        reduction_factor=cfg.scheduler.reduction_factor,
        brackets=1,
    )


#: what a learning-curve point keeps of a trial's result
CURVE_KEYS = ("step", "tokens_seen", "flops", "eval_loss_se", "eval_n")


def _curve(result: Any, metric: str) -> list[dict[str, Any]]:
    """The trial's held-out curve by step (with each report's held-out rows); a retried
    trial's later report of a step wins. Read from the trial's ``result.json`` (the rows are
    lists, which the progress table does not keep), else from the metrics table."""
    records: list[dict[str, Any]] = []
    path = Path(str(getattr(result, "path", "") or "")) / "result.json"
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a crash
    else:
        df = result.metrics_dataframe
        if df is not None:
            records = df.to_dict("records")
    by_step: dict[int, dict[str, Any]] = {}
    for r in records:
        if r.get("step") is None or r.get(metric) is None:
            continue
        point: dict[str, Any] = {
            k: float(r[k]) for k in (*CURVE_KEYS, metric) if _is_number(r.get(k))
        }
        point.update({k: r[k] for k in ROW_KEYS if isinstance(r.get(k), list)})
        by_step[int(r["step"])] = point
    return [by_step[k] for k in sorted(by_step)]


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def read_budgets(out: Path, experiment: str) -> dict[str, dict[str, Any]]:
    """``budgets.json`` of the experiment (empty when the sweep never got that far)."""
    path = budgets_path(out / TRIALS_DIR / experiment)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def read_seam(out: Path, experiment: str) -> dict[str, Any] | None:
    """``seam.json`` of the experiment: the seam predictors of its m values, if scored."""
    path = out / TRIALS_DIR / experiment / "seam.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def collect_rows(
    grid: Any, trials: list[TrialSpec], cfg: SweepConfig, out: Path, experiment: str | None = None
) -> list[dict[str, Any]]:
    """One row per trial, in plan order, from a Tune ``ResultGrid`` (of ``experiment``,
    default the recipe's)."""
    experiment = experiment or experiment_name(cfg)
    metric = cfg.scheduler.metric
    by_name: dict[str, Any] = {}
    for result in grid:
        by_name[result.config["trial"]] = result
    budgets = read_budgets(out, experiment)
    rows = []
    for spec in trials:
        result = by_name.get(spec.name)
        last = dict(result.metrics or {}) if result is not None else {}
        error = getattr(result, "error", None) if result is not None else None
        final = bool(last.get("final"))
        status = "error" if error else ("done" if final else ("stopped" if last else "not run"))
        budget = budgets.get(spec.name, {})
        max_steps = budget.get("steps") or spec.train.get("steps") or cfg.train.get("steps")
        rows.append(
            {
                "trial": spec.name,
                "label": spec.label(),
                "method": spec.method,
                "m": spec.m,
                "mix": spec.mix,
                "reference": spec.reference,
                "num_layers": last.get("num_layers"),
                "num_params": last.get("num_params"),
                "steps": int(last.get("step") or 0),
                "max_steps": max_steps,
                "stopped_early": status == "stopped",
                "status": status,
                "diverged": bool(last.get("diverged")),
                metric: last.get(metric),
                "eval_loss_se": last.get("eval_loss_se"),
                "eval_n": last.get("eval_n"),
                "eval_ppl": last.get("eval_ppl"),
                "budget_tokens": budget.get("tokens"),
                "budget_flops": budget.get("flops"),
                "flops_per_token": budget.get("flops_per_token"),
                "tokens_seen": last.get("tokens_seen"),
                "flops": last.get("flops"),
                "train_runtime_s": last.get("train_runtime_s"),
                "checkpoint": last.get("checkpoint_path"),
                "model_path": last.get("model_path"),
                "error": str(error).splitlines()[0][:300] if error else None,
                "curve": _curve(result, metric) if result is not None else [],
                "trial_dir": str(out / TRIALS_DIR / experiment / spec.name),
            }
        )
    return rows
