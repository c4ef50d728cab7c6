"""The sweep report: results.csv / results.md, plots, best.yaml and best.json.

One row per trial: its choice (m and method, or mix), the steps it ran, whether the scheduler
stopped it early, the metric and the estimated training FLOPs. The plots compare the
choices fairly: an upscaled model with more layers takes fewer steps per second and more
FLOPs per step, so the metric is shown at equal steps *and* at equal FLOPs, and the base
model trained with the same budget is drawn as the reference line.

``best.yaml`` is the best choice written as a ``solar-ray run`` recipe for the full run:
the sweep's own ``stages`` (corpus, data), the upscale with the best ``m``, the training
stage (``best.steps`` steps) and any ``best.then`` stages after it.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from solar_ray.checkpoint import write_json_atomic
from solar_ray.tune.config import SweepConfig, TrialSpec

__all__ = [
    "best_recipe",
    "check_recipe",
    "markdown_table",
    "select_best",
    "value_at",
    "write_report",
]

log = logging.getLogger(__name__)

CSV_COLUMNS = (
    "trial",
    "label",
    "method",
    "m",
    "mix",
    "reference",
    "num_layers",
    "num_params",
    "steps",
    "max_steps",
    "stopped_early",
    "status",
    "diverged",
    "{metric}",
    "eval_ppl",
    "tokens_seen",
    "flops",
    "train_runtime_s",
    "checkpoint",
    "error",
)


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def select_best(rows: Sequence[dict], metric: str, mode: str) -> dict | None:
    """The best searched trial: among those that trained the full budget, else among all.

    The reference (baseline) trial is never the best: it is not a choice of the search.
    """
    searched = [r for r in rows if not r["reference"] and _finite(r.get(metric))]
    done = [r for r in searched if r["status"] == "done"]
    pool = done or searched
    if not pool:
        return None
    sign = 1 if mode == "min" else -1
    return min(pool, key=lambda r: sign * r[metric])


def value_at(curve: Sequence[dict], x_key: str, x: float, metric: str) -> float | None:
    """The metric of a learning curve at ``x`` (steps or FLOPs), linearly interpolated.

    None when the curve does not reach ``x``.
    """
    pts = sorted(
        (p[x_key], p[metric]) for p in curve if _finite(p.get(x_key)) and _finite(p.get(metric))
    )
    if not pts or x > pts[-1][0] + 1e-9 * max(1.0, abs(x)) or x < pts[0][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1]


# --------------------------------------------------------------------------- tables


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.3e}" if abs(v) >= 1e6 else f"{v:.4f}"
    return str(v)


def markdown_table(rows: Sequence[dict], metric: str) -> str:
    """The results table in Markdown, one row per trial."""
    head = [
        "trial",
        "choice",
        "layers",
        "steps",
        "stopped early",
        metric,
        "eval_ppl",
        "FLOPs",
        "status",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        choice = r["label"] + (" (reference)" if r["reference"] else "")
        cells = [
            r["trial"],
            choice,
            r.get("num_layers"),
            f"{r['steps']}/{r.get('max_steps') or '-'}",
            r["stopped_early"],
            r.get(metric),
            r.get("eval_ppl"),
            r.get("flops"),
            r["status"] + (" (diverged)" if r.get("diverged") else ""),
        ]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    return "\n".join(lines)


def _write_csv(path: Path, rows: Sequence[dict], metric: str) -> None:
    columns = [c.format(metric=metric) for c in CSV_COLUMNS]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})


# --------------------------------------------------------------------------- plots


def _x_axis(rows: Sequence[dict]) -> tuple[list[float], list[str], str]:
    if all(r["method"] == "solar" and r["m"] is not None and not r["mix"] for r in rows):
        return (
            [float(r["m"]) for r in rows],
            [str(r["m"]) for r in rows],
            "m (layers removed per copy)",
        )
    return [float(i) for i in range(len(rows))], [r["label"] for r in rows], "choice"


def _plot(out: Path, rows: Sequence[dict], metric: str) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: dict[str, Path] = {}
    searched = [r for r in rows if not r["reference"] and r["curve"]]
    reference = next((r for r in rows if r["reference"] and r["curve"]), None)
    if not searched:
        return files

    # learning curves, against steps and against FLOPs
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, x_key, x_label in (
        (axes[0], "step", "training steps"),
        (axes[1], "flops", "estimated training FLOPs"),
    ):
        for r in [*searched, *([reference] if reference else [])]:
            pts = [p for p in r["curve"] if _finite(p.get(x_key)) and _finite(p.get(metric))]
            if not pts:
                continue
            style = (
                {"color": "black", "linestyle": "--"}
                if r["reference"]
                else {"marker": "o", "ms": 3}
            )
            line = ax.plot(
                [p[x_key] for p in pts],
                [p[metric] for p in pts],
                label=r["label"] + (" (stopped)" if r["stopped_early"] else ""),
                **style,
            )
            if r["stopped_early"]:
                ax.plot(pts[-1][x_key], pts[-1][metric], "x", color=line[0].get_color(), ms=9)
        ax.set_xlabel(x_label)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[0].set_title("learning curves (x: stopped early)")
    axes[1].set_title("learning curves against compute")
    fig.tight_layout()
    files["learning_curves"] = out / "learning_curves.png"
    fig.savefig(files["learning_curves"], dpi=110)
    plt.close(fig)

    # the metric per choice at equal steps and at equal FLOPs
    xs, ticks, x_label = _x_axis(searched)
    style = "o" if x_label == "choice" else "o-"  # no lines between unordered choices
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    max_step = lambda r: max(p["step"] for p in r["curve"])  # noqa: E731
    max_flops = lambda r: max(p.get("flops", 0.0) for p in r["curve"])  # noqa: E731
    equal_steps = min(max_step(r) for r in searched)
    full_steps = max(max_step(r) for r in searched)
    equal_flops = min(max_flops(r) for r in searched)
    panels = (
        (
            axes[0],
            "step",
            [(equal_steps, f"at {equal_steps:.0f} steps (all trials)")]
            + (
                [(full_steps, f"at {full_steps:.0f} steps (trials that got there)")]
                if full_steps > equal_steps
                else []
            ),
            "equal steps",
        ),
        (axes[1], "flops", [(equal_flops, f"at {equal_flops:.3g} FLOPs")], "equal FLOPs"),
    )
    for ax, x_key, points, title in panels:
        for x_value, label in points:
            ys = [value_at(r["curve"], x_key, x_value, metric) for r in searched]
            keep = [
                (x, y) for x, y in zip(xs, ys, strict=True) if y is not None and math.isfinite(y)
            ]
            if keep:
                ax.plot([k[0] for k in keep], [k[1] for k in keep], style, label=label)
            if reference is not None:
                ref = value_at(reference["curve"], x_key, x_value, metric)
                ref_label = f"base model, {label}"
                if ref is None and x_key == "flops":
                    last = max(reference["curve"], key=lambda p: p.get("flops", 0.0))
                    ref, ref_label = last[metric], f"base model, all {last['step']:.0f} steps"
                if ref is not None:
                    ax.axhline(ref, color="black", linestyle="--", linewidth=1, label=ref_label)
        ax.set_xticks(xs, ticks, rotation=30 if x_label == "choice" else 0)
        ax.set_xlabel(x_label)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} at {title}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    files["metric_vs_choice"] = out / "metric_vs_choice.png"
    fig.savefig(files["metric_vs_choice"], dpi=110)
    plt.close(fig)
    return files


# --------------------------------------------------------------------------- best.yaml


def best_recipe(cfg: SweepConfig, spec: TrialSpec) -> Any:
    """The ``solar-ray run`` recipe of the full run with ``spec``'s choice.

    ``spec`` is a trial as planned from the recipe (its ``"@stage"`` references kept), so
    the recipe is self-contained: it carries the sweep's ``stages`` too.
    """
    from solar_ray.pipeline import Recipe

    stages = cfg.effective_stages(only={spec.mix} if spec.mix else set())
    model = cfg.base
    upscale = spec.upscale_args()
    if upscale is not None:
        stages[cfg.best.upscale_stage] = {"kind": "upscale", "source": cfg.base, **upscale}
        model = f"@{cfg.best.upscale_stage}"
    train: dict[str, Any] = {
        "kind": cfg.train_kind,
        "model": model,
        **cfg.train_fields(),
        **spec.train,
    }
    if spec.data:
        train["data"] = spec.data
    if spec.val_data:
        train["val_data"] = spec.val_data
        train.pop("val_fraction", None)
    if cfg.best.steps:
        train["steps"] = cfg.best.steps
    train.update(cfg.best.train)
    stages[cfg.best.train_stage] = train
    stages.update({k: dict(v) for k, v in cfg.best.then.items()})
    return Recipe(
        name=f"{cfg.name}-best",
        description=f"{cfg.description or cfg.name}: full run with the best choice ({spec.label()})",
        ray_address=cfg.ray_address,
        runtime_env=cfg.runtime_env,
        stages=stages,
    )


def check_recipe(recipe: Any, run_dir: Path) -> None:
    """Plan ``recipe`` as ``solar-ray run --dry-run`` does (every stage config validated)."""
    from solar_ray.pipeline import plan_recipe

    plan_recipe(recipe, run_dir)


def _recipe_yaml(recipe: Any, comments: Sequence[str]) -> str:
    data = recipe.model_dump(mode="json", exclude_defaults=True)
    data = {"name": recipe.name, **data}
    body = yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=100)
    return "".join(f"# {c}\n" for c in comments) + body


# --------------------------------------------------------------------------- write


def write_report(
    out: Path,
    cfg: SweepConfig,
    rows: list[dict[str, Any]],
    planned: Sequence[TrialSpec],
    echo: Callable[[str], None] = print,
) -> tuple[dict[str, Path], dict[str, Any] | None]:
    """Write every report file into ``out``; return the files and the best row."""
    metric, mode = cfg.scheduler.metric, cfg.scheduler.mode
    files: dict[str, Path] = {"results_csv": out / "results.csv", "results_md": out / "results.md"}
    _write_csv(files["results_csv"], rows, metric)
    write_json_atomic(out / "curves.json", {r["trial"]: r["curve"] for r in rows})
    files["curves"] = out / "curves.json"
    try:
        files.update(_plot(out, rows, metric))
    except Exception as e:  # a plot must never lose the results
        log.warning("could not draw the sweep plots: %s", e)

    searched = [r for r in rows if not r["reference"]]
    steps_spent = sum(r["steps"] for r in searched)
    max_steps = cfg.train.get("steps")
    grid_steps = len(searched) * int(max_steps) if max_steps else None
    best = select_best(rows, metric, mode)
    reference = next((r for r in rows if r["reference"]), None)
    summary: dict[str, Any] = {
        "name": cfg.name,
        "scheduler": cfg.scheduler.kind,
        "metric": metric,
        "mode": mode,
        "num_trials": len(searched),
        "num_stopped_early": sum(r["stopped_early"] for r in searched),
        "steps_spent": steps_spent,
        "steps_full_grid": grid_steps,
        "best": None,
        "reference": None,
    }
    if reference is not None:
        summary["reference"] = {k: reference.get(k) for k in ("trial", "steps", metric, "flops")}

    lines = [f"# Sweep {cfg.name} ({cfg.scheduler.kind})", ""]
    if best is not None:
        spec = next(t for t in planned if t.name == best["trial"])
        recipe = best_recipe(cfg, spec)
        check_recipe(recipe, out / "best-run")
        comments = [
            f"Written by `solar-ray sweep` ({cfg.name}, {cfg.scheduler.kind}): the best choice is "
            f"{best['label']} ({metric} {best[metric]:.4f} after {best['steps']} steps).",
            f"Best trial checkpoint: {best.get('checkpoint')}",
            "Run it with: solar-ray run best.yaml",
        ]
        files["best_yaml"] = out / "best.yaml"
        files["best_yaml"].write_text(_recipe_yaml(recipe, comments), encoding="utf-8")
        best_info = {
            k: best.get(k)
            for k in (
                "trial",
                "label",
                "method",
                "m",
                "mix",
                "steps",
                metric,
                "eval_ppl",
                "checkpoint",
                "model_path",
            )
        }
        best_info["recipe"] = str(files["best_yaml"])
        write_json_atomic(out / "best.json", best_info)
        files["best_json"] = out / "best.json"
        summary["best"] = best_info
        lines += [
            f"**Best:** {best['label']} (`{best['trial']}`): {metric} = {_fmt(best[metric])} "
            f"after {best['steps']} steps.",
            f"Checkpoint: `{best.get('checkpoint')}`; full-run recipe: `best.yaml`.",
            "",
        ]
    else:
        lines += ["**No trial produced a finite metric.**", ""]
    if reference is not None:
        lines += [
            f"Reference: the base model trained the same budget, {metric} = "
            f"{_fmt(reference.get(metric))} after {reference['steps']} steps.",
            "",
        ]
    lines += [
        f"Training steps spent on the {len(searched)} searched trials: {steps_spent}"
        + (f" (a full grid: {grid_steps}, {steps_spent / grid_steps:.0%})." if grid_steps else "."),
        "",
        markdown_table(rows, metric),
        "",
    ]
    files["results_md"].write_text("\n".join(lines), encoding="utf-8")
    write_json_atomic(out / "summary.json", summary)
    files["summary"] = out / "summary.json"
    echo("\n".join(lines))
    return files, best
