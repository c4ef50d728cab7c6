"""Sweeps measured live: what each scheduler finds, what it spends, what the sweep says.

Runs one sweep recipe with ``--scheduler grid``, ``asha`` (Ray's asynchronous successive
halving) and ``sha`` (synchronous successive halving, :class:`solar_ray.tune.hooks.
SuccessiveHalving`) into ``OUT/<scheduler>`` (same upscale cache, warmed before any run is
timed, so wall times compare training only), and writes a Markdown summary: per scheduler
the best choice, its held-out loss (± SE, n rows), its gain over the base model at equal
FLOPs, the steps and the budget spent, the wall time and the machine's load; then each
run's own report (results.md)::

    .venv/bin/python bench/sweep.py                           # jobs/sweep-m.yaml, 2-core CPU
    .venv/bin/python bench/sweep.py --only sha                # reuse finished grid/asha runs
    .venv/bin/python bench/sweep.py --recipe jobs/sweep-mix.yaml --only grid \
        --results bench/results/sweep-mix.md                  # the embedded SFT mix sweep

Steps and budget count the searched trials only (the ``base`` reference trains the same
budget in every run). With a step budget (issue 6's recipe), an ASHA replay over every start
order is added (Ray's bracket on the grid's curves).
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
    max_t = int(cfg.train["steps"])  # a step budget (the caller checks)
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
    return ", ".join(f"{r:.3g}" for r in cfg.rungs()) or "-"


def _row(kind: str, result, seconds: float) -> dict:
    summary = json.loads((Path(result.out) / "summary.json").read_text())
    best = result.best or {}
    return {
        "scheduler": kind,
        "best": best.get("label"),
        "best_m": best.get("m"),
        "best_metric": best.get(summary["metric"]),
        "best_se": best.get("eval_loss_se"),
        "best_n": best.get("eval_n"),
        "gain": best.get("gain"),
        "gain_se": best.get("gain_se"),
        "gain_noise": best.get("gain_within_noise"),
        "steps": summary["steps_spent"],
        "grid_steps": summary["steps_full_grid"],
        "spent": summary.get("budget_spent"),
        "grid_spent": summary.get("budget_full_grid"),
        "stopped": summary["num_stopped_early"],
        "trials": summary["num_trials"],
        "seconds": seconds,
        "metric": summary["metric"],
        "table": (Path(result.out) / "results.md").read_text(),
        "out": str(result.out),
    }


def _cell_gain(r: dict) -> str:
    if r["gain"] is None:
        return "-"
    text = f"{r['gain']:+.4f} ± {r['gain_se']:.4f}"
    return text + (" (noise)" if r["gain_noise"] else "")


def _cell_spent(r: dict) -> str:
    share = f"{r['steps']} ({r['steps'] / r['grid_steps']:.0%})" if r["grid_steps"] else str(r["steps"])
    if r["spent"] is not None and r["grid_spent"]:
        share += f"; {r['spent'] / r['grid_spent']:.0%} of its budget"
    return share


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
        load = f"{os.getloadavg()[0]:.2f}"
        run_sweep(cfg, out / kind, echo=lambda s: None)
        timings[kind] = time.perf_counter() - t0
        timings[f"{kind}_load"] = f"{load} / {os.getloadavg()[0]:.2f}"
        timings[f"{kind}_rungs"] = _rungs(cfg)
        print(f"{kind}: {timings[kind]:.0f} s", flush=True)
        saved.write_text(json.dumps({"overrides": overrides, **timings}, indent=2))
    return timings


def report(recipe: str, out: Path, overrides: list[str], timings: dict) -> str:
    """The Markdown summary of the finished runs (``OUT/grid``, ``OUT/asha``, ``OUT/sha``)."""
    rel = Path(recipe).absolute().relative_to(REPO)
    cmd = " ".join(
        ["python bench/sweep.py"]
        + ([f"--recipe {rel}"] if str(rel) != "jobs/sweep-m.yaml" else [])
        + [f"--set '{o}'" for o in overrides]
    )
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
        rows[-1]["load"] = timings.get(f"{kind}_load")
    if not rows:
        raise SystemExit(f"no finished run in {out}")
    cfg = load_sweep(recipe, overrides)
    unit = cfg.budget.unit if cfg.budget is not None else "steps"
    grid = rows[0] if rows[0]["scheduler"] == "grid" else None
    lines = [
        f"## Sweep `{Path(recipe).name}`"
        + (f" (budget {cfg.budget.amount:.3g} {cfg.budget.unit})" if cfg.budget else "")
        + f": {cfg.description or cfg.name}",
        "",
        f"Command: `{cmd}` (recipe `{rel}`, each scheduler by "
        "`--set scheduler.kind=...`); machine: "
        f"{platform.machine()}, {os.cpu_count()} CPU cores.",
        (
            f"Upscales made once before any run ({timings['warm_s']:.0f} s), shared through "
            "the cache; wall times include each run's data preparation."
            if timings.get("warm_s") is not None
            else "Upscales made inside the run; wall time measured around the whole command "
            "(data preparation and upscales included)."
        ),
        "",
        f"| scheduler | rungs ({unit}) | best | {rows[0]['metric']} of best (± SE) "
        "| gain over base at equal FLOPs | training steps (searched trials) | stopped early "
        "| wall time | load (1-min avg, start/end) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        wall = f"{r['seconds'] / 60:.1f} min" if r["seconds"] == r["seconds"] else "not recorded"
        lines.append(
            f"| {r['scheduler']} | {r['rungs']} | {r['best']} "
            f"| {r['best_metric']:.4f} ± {r['best_se'] or float('nan'):.4f} (n={r['best_n']}) "
            f"| {_cell_gain(r)} | {_cell_spent(r)} | {r['stopped']}/{r['trials']} | {wall} "
            f"| {r['load'] or '-'} |"
        )
    lines.append("")
    if grid is not None:
        for r in rows[1:]:
            same = r["best"] == grid["best"]
            lines.append(
                f"{r['scheduler']} found {'the grid' if same else 'another'}'s best "
                f"({r['best']}; grid: {grid['best']}) with {r['steps']} of the grid's "
                f"{grid['steps']} steps ({r['steps'] / grid['steps']:.0%})."
            )
    if grid is not None and cfg.budget is None and cfg.search.m_values():
        replay = _replays(out / "grid", load_sweep(recipe, [*overrides, "scheduler.kind=grid"]))
        lines += [
            "",
            "ASHA is asynchronous, so what it spends depends on the order trials reach the "
            "rungs. Replaying Ray's ASHA bracket on the grid's learning curves, one trial after "
            f"another, in the recipe's order: {replay['given_share']:.0%} of the grid's steps, "
            f"best {'found' if replay['given_found'] else 'missed'}; over all "
            f"{replay['orders']} orders: median {replay['median_share']:.0%}, worst "
            f"{replay['max_share']:.0%}, grid's best found in {replay['found']}/{replay['orders']}.",
        ]
    lines.append("")
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
