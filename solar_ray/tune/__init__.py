"""Ray Tune sweeps over the layer-removal count ``m`` (and method) and the data-mix choices.

``solar-ray sweep RECIPE.yaml`` runs every choice as a Tune trial that upscales, trains and
reports held-out loss; successive halving stops weak trials early. From Python:
``run_sweep(load_sweep("jobs/sweep-m.yaml", ["search.m=[5,7]"]), "runs/sw")``. See
docs/sweep.md and :mod:`solar_ray.tune.sweep`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from solar_ray.config import (
    ConfigError,
    apply_overrides,
    check_flags_agree,
    load_yaml,
    parse_override,
    validate,
)
from solar_ray.tune.config import SweepConfig, TrialSpec, plan_trials

if TYPE_CHECKING:
    from solar_ray.tune.sweep import SweepResult

__all__ = ["SweepConfig", "TrialSpec", "cli", "load_sweep", "plan_trials", "run_sweep"]


def load_sweep(path: str | Path, overrides: Iterable[str] = ()) -> SweepConfig:
    """Read and validate a sweep recipe, applying ``--set`` overrides first."""
    data = apply_overrides(load_yaml(path), overrides)
    return validate(SweepConfig, data, str(path))


def run_sweep(cfg: SweepConfig, out: str | Path | None = None, **kwargs: Any) -> SweepResult:
    """Run (or resume) a sweep; see :func:`solar_ray.tune.sweep.run_sweep`.

    With ``out`` on object storage (``s3://``, ``gs://``) the sweep runs in this node's
    mirror of it (:func:`solar_ray.remote.mirror_dir`: Tune's and the trials' state stay
    there, so a sweep resumes on the same node) and its report files (results, curves,
    plots, ``best.yaml``) are uploaded to ``out`` when it ends.
    """
    from solar_ray import remote
    from solar_ray.tune.sweep import run_sweep as _run_sweep

    target = out if out is not None else cfg.out
    if target is None or not remote.is_remote(target):
        if target is not None:
            remote.check_location(target)
        return _run_sweep(cfg, out, **kwargs)
    uri = str(target).rstrip("/")
    local = remote.mirror_dir(uri)
    result = _run_sweep(cfg, local, **kwargs)
    for path in sorted(local.iterdir()):  # the report: results, curves, plots, best.*
        if path.is_file():
            remote.upload_file(path, remote.join(uri, path.name))
    return result


def cli(command: str, parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """``solar-ray sweep RECIPE``: add the arguments; return the runner."""
    from solar_ray.config import add_config_args

    parser.add_argument("recipe", nargs="?", help="sweep recipe YAML (see jobs/sweep-*.yaml)")
    add_config_args(parser)
    parser.add_argument("--out", help="sweep directory (default: the recipe's out, or runs/<name>)")
    parser.add_argument(
        "--scheduler",
        choices=["asha", "sha", "grid"],
        help="override scheduler.kind (sha: synchronous successive halving; grid: no early stop)",
    )
    parser.add_argument("--dry-run", action="store_true", help="list the trials, run nothing")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the report of the experiment as it stands, run nothing",
    )

    def run(args: argparse.Namespace) -> int:
        path = args.recipe or args.config
        if not path:
            raise ConfigError("give a sweep recipe: solar-ray sweep RECIPE.yaml")
        check_flags_agree({"out": args.out} if args.out else {}, args.overrides)
        for item in args.overrides if args.scheduler else ():  # the flag is scheduler.kind
            keys, value = parse_override(item)
            if keys == ["scheduler", "kind"] and value != args.scheduler:
                raise ConfigError(
                    f"--scheduler {args.scheduler!r} and --set {item!r} disagree; give the field once"
                )
        overrides = list(args.overrides)
        if args.scheduler:
            overrides.append(f"scheduler.kind={args.scheduler}")
        result = run_sweep(
            load_sweep(path, overrides),
            args.out,
            dry_run=args.dry_run,
            report_only=args.report_only,
        )
        if args.dry_run:
            return 0
        print(f"sweep directory: {result.out}")
        for key in ("results_md", "results_csv", "learning_curves", "metric_vs_choice"):
            if key in result.files:
                print(f"  {key}: {result.files[key]}")
        for row in result.rows:
            if row["status"] == "error":
                print(f"trial {row['trial']} failed: {row['error']}", file=sys.stderr)
        if result.best is None:
            print("no trial produced a finite metric: no best.yaml", file=sys.stderr)
            return 1
        print(f"  best_yaml: {result.files['best_yaml']}  (best: {result.best['label']})")
        print(f"  best checkpoint: {result.best['checkpoint']}")
        return 0

    return run
