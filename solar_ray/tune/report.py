"""The sweep report: results.csv / results.md, plots, best.yaml and best.json.

One row per trial with its budget, held-out loss ± SE and the comparisons of
:mod:`solar_ray.tune.analysis`; the plots; and ``best.yaml``, the best choice as a
``solar-ray run`` recipe. Each file: docs/sweep.md, "Outputs".
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from solar_ray.checkpoint import write_json_atomic
from solar_ray.tune.analysis import PREDICTORS, analyse, curve_max
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
    "trial", "label", "method", "m", "mix", "reference", "num_layers", "num_params",
    "steps", "max_steps", "budget_tokens", "budget_flops", "flops_per_token", "tokens_seen",
    "flops", "stopped_early", "status", "diverged",
    "{metric}", "eval_loss_se", "eval_n", "eval_ppl",
    "loss_eq_tokens", "loss_eq_tokens_se", "loss_eq_tokens_n",
    "loss_eq_flops", "loss_eq_flops_se", "loss_eq_flops_n", "loss_all", "loss_all_se",
    "gain", "gain_se", "gain_at_flops", "gain_within_noise", "gain_tokens", "gain_tokens_se",
    "recover", "recover_tokens", "recover_flops",
    "seam_angular", "seam_angular_se", "seam_bi", "seam_bi_se",
    "vs_best", "vs_best_se", "vs_best_within_noise",
    "train_runtime_s", "checkpoint", "error",
)  # fmt: skip

#: what each predictor is, for the report
PREDICTOR_NAMES = {
    "seam_angular": "seam angular distance (Gromov et al. 2024)",
    "seam_bi": "block influence of the removed layers (ShortGPT)",
}


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a temporary sibling of ``path``, then rename it over ``path``."""
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_text(path: Path, text: str) -> None:
    _write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


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

    None when the curve does not reach ``x`` (an ``x`` a rounding error past its end is
    its end), or starts after it.
    """
    pts = sorted(
        (p[x_key], p[metric]) for p in curve if _finite(p.get(x_key)) and _finite(p.get(metric))
    )
    if not pts or x > pts[-1][0] + 1e-9 * max(1.0, abs(x)) or x < pts[0][0]:
        return None
    return float(np.interp(x, [p[0] for p in pts], [p[1] for p in pts]))


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


def _pm(value: Any, se: Any, n: Any = None) -> str:
    """``value ± se`` (and the sample size); ``-`` without a value."""
    if not _finite(value):
        return _fmt(value)
    text = f"{value:.4f}" + (f" ± {se:.4f}" if _finite(se) else "")
    return text + (f" (n={n})" if n else "")


def _gain(r: dict[str, Any]) -> str:
    if not _finite(r.get("gain")):
        return "-"
    text = f"{r['gain']:+.4f} ± {r['gain_se']:.4f}" if _finite(r.get("gain_se")) else f"{r['gain']:+.4f}"
    if r.get("gain_within_noise"):
        text += " (within noise)"
    if r.get("stopped_early") and _finite(r.get("gain_at_flops")):
        text += f" at {r['gain_at_flops']:.3g}"
    return text


def markdown_table(rows: Sequence[dict], metric: str, all_flops: float | None = None) -> str:
    """The results table in Markdown, one row per trial. ``all_flops``: also the loss at
    the largest FLOPs every searched trial reached (when some stopped before the budget)."""
    base = any(r["reference"] for r in rows)
    seam = any(_finite(r.get("seam_angular")) for r in rows)
    head = ["trial", "choice", "layers", "steps", "budget tokens", "budget FLOPs",
            f"{metric} (± SE)", "at equal tokens", "at equal FLOPs"]  # fmt: skip
    if all_flops is not None:
        head.append(f"at {all_flops:.4g} FLOPs (all)")
    if base:
        head += ["gain over base (FLOPs)", "tokens to recover"]
    else:
        head += ["vs best"]
    if seam:
        head += ["seam angular", "seam BI"]
    head += ["status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        choice = r["label"] + (" (reference)" if r["reference"] else "")
        cells = [
            r["trial"],
            choice,
            _fmt(r.get("num_layers")),
            f"{r['steps']}/{r.get('max_steps') or '-'}",
            _num(r.get("budget_tokens")),
            _num(r.get("budget_flops")),
            _pm(r.get(metric), r.get("eval_loss_se") if metric == "eval_loss" else None),
            _pm(r.get("loss_eq_tokens"), r.get("loss_eq_tokens_se")),
            _pm(r.get("loss_eq_flops"), r.get("loss_eq_flops_se")),
        ]
        if all_flops is not None:
            cells.append(_pm(r.get("loss_all"), r.get("loss_all_se")))
        if base:
            cells += ["(reference)" if r["reference"] else _gain(r), r.get("recover") or "-"]
        else:
            vs = r.get("vs_best")
            cells.append(
                "-" if not _finite(vs) else ("best" if vs == 0 else
                f"{vs:+.4f} ± {r['vs_best_se']:.4f}"
                + (" (within noise)" if r.get("vs_best_within_noise") else ""))
            )  # fmt: skip
        if seam:
            cells += [_pm(r.get("seam_angular"), r.get("seam_angular_se")),
                      _pm(r.get("seam_bi"), r.get("seam_bi_se"))]  # fmt: skip
        cells.append(r["status"] + (" (diverged)" if r.get("diverged") else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write_csv(path: Path, rows: Sequence[dict], metric: str) -> None:
    columns = [c.format(metric=metric) for c in CSV_COLUMNS]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    _write_text(path, buf.getvalue())


# --------------------------------------------------------------------------- plots


def _x_axis(rows: Sequence[dict]) -> tuple[list[float], list[str], str]:
    if all(r["method"] == "solar" and r["m"] is not None and not r["mix"] for r in rows):
        return (
            [float(r["m"]) for r in rows],
            [str(r["m"]) for r in rows],
            "m (layers removed per copy)",
        )
    return [float(i) for i in range(len(rows))], [r["label"] for r in rows], "choice"


def _points(r: dict, x_key: str, metric: str) -> tuple[list[float], list[float], list[float]]:
    pts = [p for p in r["curve"] if _finite(p.get(x_key)) and _finite(p.get(metric))]
    se = [float(p.get("eval_loss_se", math.nan)) for p in pts]
    return [p[x_key] for p in pts], [p[metric] for p in pts], se


def _save(fig: Any, path: Path) -> None:
    _write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110))


def _plot(out: Path, rows: Sequence[dict], metric: str, summary: dict[str, Any]) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: dict[str, Path] = {}
    searched = [r for r in rows if not r["reference"] and r["curve"]]
    reference = next((r for r in rows if r["reference"] and r["curve"]), None)
    if not searched:
        return files

    # learning curves against tokens and against FLOPs, +-1 SE shaded
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, x_key, x_label in (
        (axes[0], "tokens_seen", "training tokens"),
        (axes[1], "flops", "estimated training FLOPs"),
    ):
        for r in [*searched, *([reference] if reference else [])]:
            xs, ys, se = _points(r, x_key, metric)
            if not xs:
                continue
            style = (
                {"color": "black", "linestyle": "--"} if r["reference"] else {"marker": "o", "ms": 3}
            )
            label = r["label"] + (" (stopped)" if r["stopped_early"] else "")
            line = ax.plot(xs, ys, label=label, **style)[0]
            if all(_finite(s) for s in se):
                ax.fill_between(xs, [y - s for y, s in zip(ys, se, strict=True)],
                                [y + s for y, s in zip(ys, se, strict=True)],
                                color=line.get_color(), alpha=0.15, linewidth=0)  # fmt: skip
            if r["stopped_early"]:
                ax.plot(xs[-1], ys[-1], "x", color=line.get_color(), ms=9)
        start = summary.get("base_start")
        if start:
            ax.axhline(start["value"], color="grey", linestyle=":", linewidth=1,
                       label="base before training")  # fmt: skip
        for key, where in (("equal_tokens", "tokens_seen"), ("equal_flops", "flops")):
            if where == x_key and _finite(summary.get(key)):
                ax.axvline(summary[key], color="grey", linewidth=0.8, alpha=0.6)
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"held-out {metric} (± 1 SE)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    axes[0].set_title("held-out loss against tokens (x: stopped early)")
    axes[1].set_title("held-out loss against compute (grey: the equal-compute point)")
    fig.tight_layout()
    files["learning_curves"] = out / "learning_curves.png"
    _save(fig, files["learning_curves"])
    plt.close(fig)

    # the loss per choice at equal tokens, at equal FLOPs (trials that got there) and at the
    # largest FLOPs every trial reached, error bars 1 SE, the base model as a band
    xs, ticks, x_label = _x_axis(searched)
    panels = [
        ("loss_eq_tokens", f"at equal tokens ({_num(summary.get('equal_tokens'))})"),
        ("loss_eq_flops", f"at equal FLOPs ({_num(summary.get('equal_flops'))})"),
    ]
    if _finite(summary.get("all_trials_flops")) and summary["all_trials_flops"] != summary.get(
        "equal_flops"
    ):
        panels.append(
            ("loss_all", f"every trial at {_num(summary['all_trials_flops'])} FLOPs")
        )
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        keep = [(x, r) for x, r in zip(xs, searched, strict=True) if _finite(r.get(key))]
        if keep:
            ax.errorbar(
                [x for x, _ in keep], [r[key] for _, r in keep],
                yerr=[r.get(f"{key}_se") or 0.0 for _, r in keep],
                fmt="o" if x_label == "choice" else "o-", capsize=3, label="trials",
            )  # fmt: skip
        if reference is not None and _finite(reference.get(key)):
            value, se = reference[key], reference.get(f"{key}_se") or 0.0
            ax.axhline(value, color="black", linestyle="--", linewidth=1, label="base model")
            ax.axhspan(value - se, value + se, color="black", alpha=0.1, linewidth=0)
        ax.set_xticks(xs, ticks, rotation=30 if x_label == "choice" else 0)
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"held-out {metric} (± 1 SE)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.text(
        0.5, 0.005,
        "error bars: ±1 SE of each loss over the held-out rows; a difference between two models "
        "on the same rows has a much smaller, paired SE (gain over base in results.md)",
        ha="center", fontsize=8,
    )  # fmt: skip
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    files["metric_vs_choice"] = out / "metric_vs_choice.png"
    _save(fig, files["metric_vs_choice"])
    plt.close(fig)

    # the zero-training predictors against the outcome they try to predict
    ranked = summary.get("predictors") or {}
    if ranked:
        fig, axes = plt.subplots(1, len(PREDICTORS), figsize=(6.5 * len(PREDICTORS), 4.5))
        x_at = next(iter(ranked.values()))["at_flops"]
        for ax, key in zip(axes, PREDICTORS, strict=True):
            pts = [
                (r[key], r["loss_all"], r.get(f"{key}_se") or 0.0, r.get("loss_all_se") or 0.0,
                 r["label"])
                for r in searched if _finite(r.get(key)) and _finite(r.get("loss_all"))
            ]  # fmt: skip
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], xerr=[p[2] for p in pts],
                        yerr=[p[3] for p in pts], fmt="o", capsize=3)  # fmt: skip
            for x, y, _, _, label in pts:
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            rank = ranked.get(key)
            ax.set_title(
                PREDICTOR_NAMES[key]
                + (f"\nSpearman rho = {rank['rho']:.2f} (p = {rank['p_value']:.2f}, n = {rank['n']})"
                   if rank else "")
            )  # fmt: skip
            ax.set_xlabel(f"{key} of the base model (lower: predicted better)")
            ax.set_ylabel(f"held-out {metric} at {x_at:.3g} FLOPs")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        files["seam_plot"] = out / "seam.png"
        _save(fig, files["seam_plot"])
        plt.close(fig)
    return files


def _num(x: Any) -> str:
    """A token or FLOP count for a title."""
    return f"{x:.4g}" if _finite(x) else "-"


# --------------------------------------------------------------------------- best.yaml


def best_recipe(cfg: SweepConfig, spec: TrialSpec, steps: int | None = None) -> Any:
    """The ``solar-ray run`` recipe of the full run with ``spec``'s choice.

    ``spec`` is a trial as planned from the recipe (its ``"@stage"`` references kept), so
    the recipe is self-contained: it carries the sweep's ``stages`` too. Its training steps
    are ``best.steps``, else ``steps`` (the trial's own under a budget), else ``train.steps``.
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
    if cfg.best.steps or steps:
        train["steps"] = cfg.best.steps or steps
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


def _budget_line(cfg: SweepConfig, rows: Sequence[dict]) -> str:
    if cfg.budget is not None:
        return (
            f"Budget: {cfg.budget.amount:.4g} {cfg.budget.unit} per trial (each trial the whole "
            "steps that fit: a larger model gets fewer steps)."
        )
    if any(r["method"] != "none" for r in rows):
        return f"Budget: {cfg.train.get('steps')} steps per trial (equal tokens; FLOPs grow with depth)."
    return f"Budget: {cfg.train.get('steps')} steps per trial (equal examples; one model, so equal FLOPs per token)."


def _verdict(rows: Sequence[dict], best: dict | None, summary: dict[str, Any]) -> list[str]:
    """Plain sentences: which choice, does DUS pay off, what the predictors say."""
    lines: list[str] = []
    base = next((r for r in rows if r["reference"]), None)
    start = summary.get("base_start")
    if base is not None and start:
        lines.append(
            f"Base model before training: {_pm(start['value'], start['se'], start['n'])}; "
            f"after its budget: {_pm(base.get('eval_loss'), base.get('eval_loss_se'), base.get('eval_n'))}."
        )
    if best is not None and base is not None and _finite(best.get("gain")):
        g, se = best["gain"], best.get("gain_se") or math.nan
        if best.get("gain_within_noise"):
            says = "no better or worse than the base model: the difference is within noise"
        elif g > 0:
            says = "ahead of the base model: DUS pays off at this budget"
        else:
            says = "behind the base model: DUS does not pay off at this budget"
        lines.append(
            f"The best trial, {best['label']}, is {says} (gain {g:+.4f} ± {se:.4f} at "
            f"{best.get('gain_at_flops') or 0:.3g} FLOPs, paired over the held-out rows)."
        )
    for key, rank in (summary.get("predictors") or {}).items():
        lines.append(
            f"{PREDICTOR_NAMES[key]} vs held-out loss at {rank['at_flops']:.3g} FLOPs (the "
            f"largest every searched trial reached): Spearman rho = {rank['rho']:+.2f}, "
            f"p = {rank['p_value']:.3f} ({'exact' if rank['exact'] else 'approximate'}), "
            f"n = {rank['n']} trials."
            + (" With this few trials only |rho| = 1 is significant at 5%." if rank["n"] <= 5 else "")
        )
    return lines


def write_report(
    out: Path,
    cfg: SweepConfig,
    rows: list[dict[str, Any]],
    planned: Sequence[TrialSpec],
    echo: Callable[[str], None] = print,
    seam: dict[str, Any] | None = None,
) -> tuple[dict[str, Path], dict[str, Any] | None]:
    """Write every report file into ``out``; return the files and the best row.

    ``seam`` is the sweep's ``seam.json`` (the predictors of the searched ``m``), if any.
    """
    metric, mode = cfg.scheduler.metric, cfg.scheduler.mode
    analysis = analyse(rows, metric, mode, seam)
    files: dict[str, Path] = {"results_csv": out / "results.csv", "results_md": out / "results.md"}
    _write_csv(files["results_csv"], rows, metric)
    write_json_atomic(out / "curves.json", {r["trial"]: r["curve"] for r in rows})
    files["curves"] = out / "curves.json"
    try:
        files.update(_plot(out, rows, metric, analysis))
    except Exception as e:  # a plot must never lose the results
        log.warning("could not draw the sweep plots: %s", e)

    searched = [r for r in rows if not r["reference"]]
    steps_spent = sum(r["steps"] for r in searched)
    grid_steps = sum(int(r.get("max_steps") or 0) for r in searched) or None
    x_key = cfg.budget.result_key if cfg.budget is not None else None
    spent = sum(curve_max(r["curve"], x_key) or 0.0 for r in searched) if x_key else None
    best = select_best(rows, metric, mode)
    reference = next((r for r in rows if r["reference"]), None)
    summary: dict[str, Any] = {
        "name": cfg.name,
        "scheduler": cfg.scheduler.kind,
        "metric": metric,
        "mode": mode,
        "budget": cfg.budget.model_dump() if cfg.budget is not None else {"steps": cfg.train.get("steps")},
        "num_trials": len(searched),
        "num_stopped_early": sum(r["stopped_early"] for r in searched),
        "steps_spent": steps_spent,
        "steps_full_grid": grid_steps,
        "budget_spent": spent,
        "budget_full_grid": len(searched) * cfg.budget.amount if cfg.budget is not None else None,
        "analysis": analysis,
        "seam": seam,
        "best": None,
        "reference": None,
    }
    if reference is not None:
        summary["reference"] = {
            k: reference.get(k) for k in ("trial", "steps", metric, "eval_loss_se", "eval_n", "flops")
        }

    lines = [f"# Sweep {cfg.name} ({cfg.scheduler.kind})", "", _budget_line(cfg, rows), ""]
    if best is not None:
        spec = next(t for t in planned if t.name == best["trial"])
        recipe = best_recipe(cfg, spec, steps=best.get("max_steps"))
        check_recipe(recipe, out / "best-run")
        comments = [
            f"Written by `solar-ray sweep` ({cfg.name}, {cfg.scheduler.kind}): the best choice is "
            f"{best['label']} ({metric} {best[metric]:.4f} after {best['steps']} steps).",
            f"Best trial checkpoint: {best.get('checkpoint')}",
            "Run it with: solar-ray run best.yaml",
        ]
        files["best_yaml"] = out / "best.yaml"
        _write_text(files["best_yaml"], _recipe_yaml(recipe, comments))
        best_info = {
            k: best.get(k)
            for k in ("trial", "label", "method", "m", "mix", "steps", metric, "eval_loss_se",
                      "eval_n", "eval_ppl", "loss_eq_flops", "loss_eq_flops_se", "gain", "gain_se",
                      "gain_within_noise", "checkpoint", "model_path")  # fmt: skip
        }
        best_info["recipe"] = str(files["best_yaml"])
        write_json_atomic(out / "best.json", best_info)
        files["best_json"] = out / "best.json"
        summary["best"] = best_info
        lines += [
            f"**Best:** {best['label']} (`{best['trial']}`): {metric} = "
            f"{_pm(best[metric], best.get('eval_loss_se'), best.get('eval_n'))} after "
            f"{best['steps']} steps (the lowest among the trials that trained their whole budget).",
            f"Checkpoint: `{best.get('checkpoint')}`; full-run recipe: `best.yaml`.",
            "",
        ]
    else:
        lines += ["**No trial produced a finite metric.**", ""]
    verdict = _verdict(rows, best, analysis)
    if verdict:
        lines += [*(f"- {v}" for v in verdict), ""]
    eq_t, eq_f = analysis.get("equal_tokens"), analysis.get("equal_flops")
    sizes = sorted({int(r["eval_n"]) for r in rows if r.get("eval_n")})
    n_text = f"n = {', '.join(map(str, sizes))}" if sizes else "n"
    lines += [
        f"Equal tokens: {_num(eq_t)}; equal FLOPs: {_num(eq_f)} (the largest amount every trial "
        "that trained its whole budget reached). Values between held-out reports are linearly "
        f"interpolated, row by row; ± is one standard error over the held-out rows ({n_text}), "
        "gains are paired over the same rows and marked within noise inside 2 SE.",
        "",
        f"Training steps spent on the {len(searched)} searched trials: {steps_spent}"
        + (f" (a full grid: {grid_steps}, {steps_spent / grid_steps:.0%})." if grid_steps else ".")
        + (
            f" {'Tokens' if cfg.budget.unit == 'tokens' else 'FLOPs'}: {spent:.4g} of a full grid's "
            f"{summary['budget_full_grid']:.4g} ({spent / summary['budget_full_grid']:.0%})."
            if spent is not None and summary["budget_full_grid"]
            else ""
        ),
        "",
        markdown_table(
            rows,
            metric,
            all_flops=analysis["all_trials_flops"]
            if any(r["stopped_early"] for r in searched) and _finite(analysis["all_trials_flops"])
            else None,
        ),
        "",
    ]
    _write_text(files["results_md"], "\n".join(lines))
    write_json_atomic(out / "summary.json", summary)
    files["summary"] = out / "summary.json"
    echo("\n".join(lines))
    return files, best
