"""Comparing evaluated models: paired differences with standard errors, and the results table.

Reads the results dict :func:`solar_ray.evaluate.run_eval` writes (``results.json``); the
run report (:mod:`solar_ray.report`) shows each eval stage's table as this module writes it.
Two models are paired over the same items only when their item ids match.
"""

from __future__ import annotations

import math
from typing import Any

from solar_ray.stats import Estimate, paired_mean_difference, ratio_estimate

__all__ = ["compare_models", "pm", "results_table"]


def pm(x: float | None, se: float | None) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.2f} ± {100 * se:.2f}" if se is not None else f"{100 * x:.2f}"


def compare_models(results: dict[str, Any], a: str, b: str) -> dict[str, Estimate]:
    """``a - b`` per task (and ``average``, ``nll`` per token) with standard errors.

    Paired over the same items when both models have per-item results for the same item
    ids, in the same order (a model's own ``item_ids``, else the results' top-level ones;
    then ``n`` is the number of items), else the two standard errors combined as
    independent. ``nll`` is paired over perplexity windows when both scored the same
    windows (same tokenizer), ``-`` means ``a`` has the lower held-out loss.
    """
    models = {m["name"]: m for m in results["models"]}
    ma, mb = models[a], models[b]
    out: dict[str, Estimate] = {}
    for task in results["tasks"]:
        name = task["name"]
        if name not in ma["scores"] or name not in mb["scores"]:
            continue
        ia, ib = (ma.get("items") or {}).get(name), (mb.get("items") or {}).get(name)
        ids_a, ids_b = _item_ids(results, ma, name), _item_ids(results, mb, name)
        if ia and ib and ids_a and ids_a == ids_b and len(ia) == len(ib) == len(ids_a):
            out[name] = paired_mean_difference(ia, ib)
        else:
            sa, sb = ma["stderr"].get(name), mb["stderr"].get(name)
            se = math.sqrt(sa * sa + sb * sb) if sa is not None and sb is not None else math.nan
            out[name] = Estimate(
                ma["scores"][name] - mb["scores"][name], se, ma["num_items"].get(name) or 0
            )
    if out and len(out) == len(results["tasks"]):
        k = len(out)
        ses = [e.se for e in out.values()]
        out["average"] = Estimate(
            sum(e.value for e in out.values()) / k, math.sqrt(sum(s * s for s in ses)) / k, k
        )
    wa, wb = ma.get("ppl_windows"), mb.get("ppl_windows")
    if wa and wb:
        if len(wa) == len(wb) and all(x[1] == y[1] for x, y in zip(wa, wb, strict=True)):
            out["nll"] = ratio_estimate(
                [x[0] - y[0] for x, y in zip(wa, wb, strict=True)], [x[1] for x in wa]
            )
        else:
            ea = ratio_estimate([w[0] for w in wa], [w[1] for w in wa])
            eb = ratio_estimate([w[0] for w in wb], [w[1] for w in wb])
            out["nll"] = Estimate(ea.value - eb.value, math.hypot(ea.se, eb.se), min(ea.n, eb.n))
    return out


def _item_ids(results: dict[str, Any], model: dict[str, Any], task: str) -> list[str] | None:
    """The ids of a model's per-item results of ``task``: its own, else the results' ones."""
    own = (model.get("item_ids") or {}).get(task)
    return own if own is not None else (results.get("item_ids") or {}).get(task)


def _comparisons(names: list[str]) -> list[tuple[str, str]]:
    """Each model against the one before it, and the last against the first."""
    pairs = [(names[i], names[i - 1]) for i in range(1, len(names))]
    if len(names) > 2:
        pairs.append((names[-1], names[0]))
    return pairs


def _diff_cell(e: Estimate | None, scale: float = 100.0, digits: int = 2) -> str:
    if e is None:
        return "–"
    sign = "+" if e.value >= 0 else "−"
    cell = f"{sign}{abs(scale * e.value):.{digits}f} ± {scale * e.se:.{digits}f}"
    return f"~ {cell}" if e.within_noise() else f"**{cell}**"


def results_table(results: dict[str, Any]) -> str:
    """Markdown: scores ± standard error per model and task, item counts, paired differences.

    One row per model (the paper's layout, Avg first), a row of item counts, then each
    model against the one before it (and the last against the first): a difference within
    noise (|diff| < 2 SE) is marked ``~``, a resolved one is bold. The notes say how small
    a difference these item counts can resolve.
    """
    tasks = results["tasks"]
    models = results["models"]
    has_tasks = bool(tasks)
    has_ppl = any(m.get("ppl") is not None for m in models)
    header = ["Model"] + (["Avg"] if has_tasks else []) + [t["display"] for t in tasks]
    header += ["PPL"] if has_ppl else []
    align = "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"
    lines = ["| " + " | ".join(header) + " |", align]
    for m in models:
        row = [m["name"]]
        if has_tasks:
            row.append(pm(m.get("average"), m.get("average_stderr")))
            row += [
                pm(m["scores"].get(t["name"]), (m.get("stderr") or {}).get(t["name"]))
                for t in tasks
            ]
        if has_ppl:
            if m.get("ppl") is None:
                row.append("–")
            elif m.get("ppl_low") is not None:
                row.append(f"{m['ppl']:.2f} ({m['ppl_low']:.2f}–{m['ppl_high']:.2f})")
            else:
                row.append(f"{m['ppl']:.2f}")
        lines.append("| " + " | ".join(row) + " |")
    if models:
        first = models[0]
        counts = ["n"] + ([""] if has_tasks else [])
        counts += [str((first.get("num_items") or {}).get(t["name"], "–")) for t in tasks]
        if has_ppl:
            windows = first.get("ppl_windows")
            counts.append(f"{len(windows)} windows" if windows else "–")
        lines.append("| " + " | ".join(counts) + " |")
    out = "\n".join(lines) + "\n"

    names = [m["name"] for m in models]
    resolution: dict[str, list[float]] = {}
    if len(names) >= 2 and (has_tasks or has_ppl):
        dhead = ["Difference"] + (["Avg"] if has_tasks else []) + [t["display"] for t in tasks]
        dhead += ["NLL/token"] if has_ppl else []
        dlines = [
            "| " + " | ".join(dhead) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(dhead) - 1)) + "|",
        ]
        for a, b in _comparisons(names):
            diff = compare_models(results, a, b)
            for key, e in diff.items():
                if math.isfinite(e.se):
                    resolution.setdefault(key, []).append(2 * e.se)
            row = [f"{a} − {b}"]
            if has_tasks:
                row.append(_diff_cell(diff.get("average")))
                row += [_diff_cell(diff.get(t["name"])) for t in tasks]
            if has_ppl:
                row.append(_diff_cell(diff.get("nll"), scale=1.0, digits=3))
            dlines.append("| " + " | ".join(row) + " |")
        out += (
            "\nDifferences (points; paired over the same items, ± one standard error; "
            "`~` within noise: |diff| < 2 SE; **bold**: resolved):\n\n" + "\n".join(dlines) + "\n"
        )

    metrics = ", ".join(f"{t['display']}: {t['metric']} ({t['num_fewshot']}-shot)" for t in tasks)
    notes = [
        f"Scores in %, ± one standard error. Suite `{results['suite']}`"
        + (f"; {metrics}." if metrics else ".")
    ]
    if results.get("limit"):
        notes.append(f"The first {results['limit']} scored items of each task (of each subtask).")
    if has_ppl:
        notes.append(
            "PPL: held-out token-level perplexity (95% range over windows); NLL/token differences in nats."
        )
    if resolution:
        parts = [
            f"{next((t['display'] for t in tasks if t['name'] == k), 'NLL/token' if k == 'nll' else 'Avg')} "
            f"{(100 if k != 'nll' else 1) * sorted(v)[len(v) // 2]:.{2 if k != 'nll' else 3}f}"
            for k, v in resolution.items()
        ]
        notes.append(
            "Resolution: at these item counts a difference smaller than about "
            + ", ".join(parts)
            + " (2 SE of a paired difference, median over the comparisons) cannot be told from noise."
        )
    for task, why in (results.get("unavailable") or {}).items():
        notes.append(f"Not evaluated: {task} ({why}).")
    for m in models:
        if m.get("nonfinite_weights"):
            notes.append(
                f"WARNING: {m['name']} has NaN or infinite weights in "
                f"{len(m['nonfinite_weights'])} tensors; its scores mean nothing."
            )
    if results.get("note"):
        notes.append(str(results["note"]))
    return out + "\n" + " ".join(notes) + "\n"
