"""``solar-ray sweep``: run a sweep recipe as one Ray Tune experiment and report it.

:func:`run_sweep` does, in order:

1. plan the trials (:func:`~solar_ray.tune.config.plan_trials`) and check, before anything
   runs, that the training config validates and that ``best.yaml`` will be a valid recipe;
2. run the recipe's ``stages`` once into ``OUT/prepare`` with the pipeline runner (skipped
   when done), and resolve ``"@stage"`` references and the base model;
3. run the trials as a ``Tuner`` over a grid of the choices, with successive halving
   (synchronous, or ASHA; over training steps) or without early stopping
   (``scheduler.kind: grid``). The experiment lives in
   ``OUT/tune/<name>-<scheduler>-<hash of the recipe>``; when it exists it is restored with
   ``Tuner.restore``, so an interrupted sweep continues: finished trials are kept, the
   others restart and their training runs resume from their latest checkpoints;
4. write the report (:mod:`solar_ray.tune.report`): ``results.csv``, ``results.md``, the
   plots, ``best.yaml`` and ``best.json``.

``max_concurrent_trials`` defaults to the number of trials whose training workers fit in
the cluster's resources at the start (at least 1); a trial's driver itself holds no CPU.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from solar_ray.config import ConfigError
from solar_ray.tune.config import SweepConfig, TrialSpec, plan_trials
from solar_ray.tune.trial import (
    TRIALS_DIR,
    run_trial,
    train_config_for,
    train_stage,
    worker_resources,
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


def _check_up_front(cfg: SweepConfig, out: Path) -> None:
    """Fail before any compute: the training config validates and best.yaml will plan."""
    from solar_ray.tune.report import best_recipe, check_recipe

    trials = plan_trials(cfg)
    ctx = {
        "train_kind": cfg.train_kind,
        "train": cfg.train_fields(),
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
    check_recipe(best_recipe(cfg, trials[0]), out / "best-run")


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
        for i, t in enumerate(trials, 1):
            echo(f"{i:>3}. {t.name:<24} {t.label()}{' (reference)' if t.reference else ''}")
        return SweepResult(out, out / "tune" / name, [], None)

    import ray
    from ray import tune

    from solar_ray.models import resolve_model
    from solar_ray.pipeline import init_ray
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
        "trials": {t.name: t.to_dict() for t in resolved},
        # successive halving pauses trials at its rungs: they must resume from there
        "checkpoint_at": cfg.rungs() if cfg.scheduler.kind == "sha" else [],
    }
    # the inputs (model, tokenizer, data) are checked once here, not in every trial
    first = train_config_for(ctx, resolved[0], base_dir)
    train_stage(cfg.train_kind)[2](first)
    per_trial = {k: v * first.num_workers for k, v in worker_resources(first).items()}
    concurrency = fit_concurrency(
        ray.cluster_resources(), per_trial, len(resolved), cfg.max_concurrent_trials
    )
    echo(f"sweep {name}: {len(resolved)} trials, {concurrency} at a time -> {out}")

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
                callbacks=[PlacementGroupReaper(name)],
                verbose=1,
            ),
        )
    try:
        grid = tuner.fit()
    finally:
        ray.kill(registry)
    rows = collect_rows(grid, resolved, cfg, out)
    files, best = write_report(out, cfg, rows, trials, echo=echo)
    return SweepResult(out, path, rows, best, files, concurrency)


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
    rows = collect_rows(ResultGrid(ExperimentAnalysis(str(path))), trials, cfg, out)
    files, best = write_report(out, cfg, rows, trials, echo=echo)
    return SweepResult(out, path, rows, best, files)


def _scheduler(cfg: SweepConfig, trials: list[TrialSpec]) -> Any:
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
            time_attr="step",
            milestones=cfg.rungs(),
            reduction_factor=cfg.scheduler.reduction_factor,
        )
    return ReferenceExemptASHA(
        reference=reference,
        time_attr="step",
        max_t=int(cfg.train["steps"]),
        grace_period=cfg.scheduler.grace_period_steps,
        reduction_factor=cfg.scheduler.reduction_factor,
        brackets=1,
    )


def _curve(result: Any, metric: str) -> list[dict[str, float]]:
    """The trial's held-out curve by step; a retried trial's later report of a step wins."""
    df = result.metrics_dataframe
    if df is None or "step" not in df or metric not in df:
        return []
    cols = [c for c in ("step", metric, "flops", "tokens_seen") if c in df]
    by_step = {}
    for r in df[cols].dropna(subset=["step"]).to_dict("records"):
        by_step[int(r["step"])] = {k: float(v) for k, v in r.items()}
    return [by_step[k] for k in sorted(by_step)]


def collect_rows(
    grid: Any, trials: list[TrialSpec], cfg: SweepConfig, out: Path
) -> list[dict[str, Any]]:
    """One row per trial, in plan order, from a Tune ``ResultGrid``."""
    metric = cfg.scheduler.metric
    by_name: dict[str, Any] = {}
    for result in grid:
        by_name[result.config["trial"]] = result
    max_steps = cfg.train.get("steps")
    rows = []
    for spec in trials:
        result = by_name.get(spec.name)
        last = dict(result.metrics or {}) if result is not None else {}
        error = getattr(result, "error", None) if result is not None else None
        final = bool(last.get("final"))
        status = "error" if error else ("done" if final else ("stopped" if last else "not run"))
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
                "eval_ppl": last.get("eval_ppl"),
                "tokens_seen": last.get("tokens_seen"),
                "flops": last.get("flops"),
                "train_runtime_s": last.get("train_runtime_s"),
                "checkpoint": last.get("checkpoint_path"),
                "model_path": last.get("model_path"),
                "error": str(error).splitlines()[0][:300] if error else None,
                "curve": _curve(result, metric) if result is not None else [],
                "trial_dir": str(out / TRIALS_DIR / experiment_name(cfg) / spec.name),
            }
        )
    return rows
