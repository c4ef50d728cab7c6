"""Early stopping vs the full grid over one sweep space: the best m each finds, the steps spent.

Runs one sweep recipe with ``--scheduler grid``, ``asha`` (Ray's asynchronous successive
halving) and ``sha`` (synchronous successive halving, :class:`solar_ray.tune.hooks.
SuccessiveHalving`) into ``OUT/<scheduler>`` (same upscale cache, warmed before any run is
timed, so wall times compare training only), and writes a Markdown summary::

    .venv/bin/python bench/sweep.py                           # jobs/sweep-m.yaml, 2-core CPU
    .venv/bin/python bench/sweep.py --only sha                # reuse finished grid/asha runs
    .venv/bin/python bench/sweep.py --set train.steps=9 --set "search.m=[5,9]"   # smaller

Target (issue 6): early stopping finds the grid's best m with at most 50% of the grid's
training steps. Steps count the searched trials only (the ``base`` reference trains the
same budget in every run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KINDS = ("grid", "asha", "sha")


def _warm_upscales(cfg, cache: Path) -> float:
    """Make every trial's upscale once, before any timed run; return the seconds it took."""
    from solar_ray.models import resolve_model
    from solar_ray.tune import plan_trials
    from solar_ray.tune.trial import cached_upscale

    t0 = time.perf_counter()
    base = resolve_model(cfg.base)
    for spec in plan_trials(cfg):
        if spec.upscale_args():
            cached_upscale(base, spec.upscale_args(), cache)
    return time.perf_counter() - t0


def replay_asha(
    curves: dict[str, list[dict]],
    order: list[str],
    metric: str,
    grace: int,
    max_t: int,
    reduction_factor: float,
) -> tuple[int, str | None]:
    """Ray's ASHA bracket replayed on the grid's learning curves, trials one after another.

    Returns (steps the searched trials would have run, the trial ASHA would pick). Uses
    Ray's own rung bookkeeping, so it only assumes the curves a trial would have produced
    are the ones it produced in the grid run (training is seeded) and no concurrency.
    """
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler
    from ray.tune.schedulers.async_hyperband import _Bracket

    bracket = _Bracket(grace, max_t, reduction_factor, s=0)
    steps, finished = 0, {}
    for name in order:
        trial = SimpleNamespace(trial_id=name)
        ran = 0
        for point in sorted(curves[name], key=lambda p: p["step"]):
            ran = int(point["step"])
            if bracket.on_result(trial, ran, -point[metric]) == TrialScheduler.STOP:
                break
        steps += ran
        if ran >= max_t:
            finished[name] = curves[name][-1][metric]
    return steps, (min(finished, key=finished.get) if finished else None)


def _replays(grid_out: Path, cfg) -> dict:
    """ASHA replayed on the grid's curves for every order of the searched trials."""
    import itertools
    import statistics

    curves = json.loads((grid_out / "curves.json").read_text())
    searched = [t.name for t in _plan(cfg) if not t.reference]
    metric = cfg.scheduler.metric
    full = {n: curves[n][-1][metric] for n in searched}
    grid_best = min(full, key=full.get)
    max_t = int(cfg.train["steps"])
    shares, found = [], 0
    orders = list(itertools.permutations(searched))
    for order in orders:
        steps, best = replay_asha(
            curves,
            list(order),
            metric,
            cfg.scheduler.grace_period_steps,
            max_t,
            cfg.scheduler.reduction_factor,
        )
        shares.append(steps / (max_t * len(searched)))
        found += best == grid_best
    given, given_best = replay_asha(
        curves,
        searched,
        metric,
        cfg.scheduler.grace_period_steps,
        max_t,
        cfg.scheduler.reduction_factor,
    )
    return {
        "orders": len(orders),
        "found": found,
        "median_share": statistics.median(shares),
        "max_share": max(shares),
        "given_share": given / (max_t * len(searched)),
        "given_found": given_best == grid_best,
    }


def _plan(cfg):
    from solar_ray.tune import plan_trials

    return plan_trials(cfg)


def _rungs(cfg) -> str:
    """The rungs a run compared trials at (``-`` for the grid)."""
    return ", ".join(map(str, cfg.rungs())) or "-"


def _row(kind: str, result, seconds: float) -> dict:
    summary = json.loads((Path(result.out) / "summary.json").read_text())
    best = result.best or {}
    return {
        "scheduler": kind,
        "best": best.get("label"),
        "best_m": best.get("m"),
        "best_metric": best.get(summary["metric"]),
        "steps": summary["steps_spent"],
        "grid_steps": summary["steps_full_grid"],
        "stopped": summary["num_stopped_early"],
        "trials": summary["num_trials"],
        "seconds": seconds,
        "metric": summary["metric"],
        "table": (Path(result.out) / "results.md").read_text(),
        "out": str(result.out),
    }


def run(recipe: str, out: Path, overrides: list[str], kinds: list[str]) -> dict:
    """Warm the upscale cache, run each scheduler in turn; save and return the timings.

    Timings of a scheduler not run now are kept from ``OUT/bench.json`` (``--only sha``
    reuses a finished grid and ASHA run).
    """
    from solar_ray.cluster import init_ray
    from solar_ray.tune import load_sweep, run_sweep

    init_ray()
    cache = out / "upscales"
    overrides = [*overrides, f"upscale_cache={cache}"]
    saved = out / "bench.json"
    timings: dict = {"warm_s": None}
    if saved.is_file():
        timings.update({k: v for k, v in json.loads(saved.read_text()).items() if k != "overrides"})
        timings["warm_s"] = None
    for kind in kinds:
        cfg = load_sweep(recipe, [*overrides, f"scheduler.kind={kind}"])
        if timings["warm_s"] is None:
            timings["warm_s"] = _warm_upscales(cfg, cache)
        t0 = time.perf_counter()
        run_sweep(cfg, out / kind, echo=lambda s: None)
        timings[kind] = time.perf_counter() - t0
        timings[f"{kind}_rungs"] = _rungs(cfg)
        print(f"{kind}: {timings[kind]:.0f} s", flush=True)
        saved.write_text(json.dumps({"overrides": overrides, **timings}, indent=2))
    return timings


def report(recipe: str, out: Path, overrides: list[str], timings: dict) -> str:
    """The Markdown summary of the finished runs (``OUT/grid`` and ``OUT/asha``/``OUT/sha``)."""
    cmd = " ".join(["python bench/sweep.py", *[f"--set '{o}'" for o in overrides]])
    overrides = [*overrides, f"upscale_cache={out / 'upscales'}"]
    from solar_ray.tune import load_sweep, run_sweep

    rows = []
    for kind in KINDS:
        if not (out / kind / "tune").is_dir():
            continue
        cfg = load_sweep(recipe, [*overrides, f"scheduler.kind={kind}"])
        # the sweep's own report, rewritten from its Tune experiment
        result = run_sweep(cfg, out / kind, report_only=True, echo=lambda s: None)
        rows.append(_row(kind, result, timings.get(kind) or float("nan")))
        rows[-1]["rungs"] = timings.get(f"{kind}_rungs") or _rungs(cfg)
    if not rows or rows[0]["scheduler"] != "grid":
        raise SystemExit(f"no finished grid run in {out / 'grid'}: run --only grid first")
    grid = rows[0]
    lines = [
        "## Sweeps: early stopping vs the full grid (issue 6)",
        "",
        f"Command: `{cmd}` (recipe `{Path(recipe).relative_to(REPO)}`, each scheduler by "
        "`--set scheduler.kind=...`); machine: "
        f"{platform.machine()}, {os.cpu_count()} CPU cores.",
        f"Upscales made once before any run ({timings.get('warm_s') or 0:.0f} s), shared "
        "through the cache; wall times include each run's data preparation.",
        "",
        f"| scheduler | rungs (steps) | best | {grid['metric']} of best "
        "| training steps (searched trials) | share of grid | stopped early | wall time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scheduler']} | {r['rungs']} | {r['best']} | {r['best_metric']:.4f} "
            f"| {r['steps']} "
            f"| {r['steps'] / grid['steps']:.0%} | {r['stopped']}/{r['trials']} "
            + (
                f"| {r['seconds'] / 60:.1f} min |"
                if r["seconds"] == r["seconds"]
                else "| not recorded |"
            )
        )
    lines.append("")
    for r in rows[1:]:
        same = r["best"] == grid["best"]
        share = r["steps"] / grid["steps"] if grid["steps"] else float("nan")
        verdict = "met" if same and share <= 0.5 else "not met"
        lines.append(
            f"Target ({r['scheduler']} finds the grid's best with <= 50% of its steps): "
            f"**{verdict}** (same best: {'yes' if same else 'no'}; {share:.0%} of the grid's "
            "steps)."
        )
    replay = _replays(out / "grid", load_sweep(recipe, [*overrides, "scheduler.kind=grid"]))
    lines += [
        "",
        "ASHA is asynchronous, so what it spends depends on the order trials reach the rungs. "
        "Replaying Ray's ASHA bracket on the grid's learning curves, one trial after another, "
        f"in the recipe's order: {replay['given_share']:.0%} of the grid's steps, best "
        f"{'found' if replay['given_found'] else 'missed'}; over all {replay['orders']} orders: "
        f"median {replay['median_share']:.0%}, worst {replay['max_share']:.0%}, grid's best "
        f"found in {replay['found']}/{replay['orders']}. Synchronous successive halving cuts "
        "each rung over all the trials, so its choice does not depend on the order.",
        "",
    ]
    for r in rows:
        body = r["table"].split("\n", 2)[2]  # drop the results.md title
        lines += [f"### {r['scheduler']} (`{r['out']}`)", "", body.strip(), ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(REPO / "jobs" / "sweep-m.yaml"))
    parser.add_argument("--out", default=str(REPO / "bench" / "_work" / "sweep"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--results", default=str(REPO / "bench" / "results" / "sweep.md"))
    parser.add_argument(
        "--only",
        choices=list(KINDS),
        action="append",
        help="run only this scheduler (repeatable); the others' finished runs are reused",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the summary of a finished run"
    )
    args = parser.parse_args()

    out = Path(args.out).absolute()
    if args.report_only:
        timings = json.loads((out / "bench.json").read_text())
    else:
        timings = run(args.recipe, out, args.overrides, args.only or list(KINDS))
    text = report(args.recipe, out, args.overrides, timings)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
