"""What a sweep's curves say: loss at equal tokens and FLOPs, gain over the base model, tokens
to recover, and how well the zero-training seam predictors rank the trials.

Between two held-out reports a curve is interpolated linearly, row by row, so comparisons
stay paired over the held-out rows. What each comparison means: docs/sweep.md, "How to
read an m sweep".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from solar_ray.stats import Estimate, interpolate_rows, paired_difference, ratio_estimate, spearman

__all__ = ["LossAt", "analyse", "curve_max", "gain_over", "loss_at", "tokens_to_recover"]

#: the x axes of a learning curve: budget unit -> result key
X_KEYS = {"steps": "step", "tokens": "tokens_seen", "flops": "flops"}

#: the seam predictors a report carries (solar_ray.seam)
PREDICTORS = ("seam_angular", "seam_bi")


@dataclass(frozen=True)
class LossAt:
    """A held-out loss at one point of a curve, with the rows it is the mean of."""

    x: float
    estimate: Estimate
    nll: np.ndarray | None = None  #: per-row summed NLL (None: the curve kept no rows)
    tokens: np.ndarray | None = None  #: per-row scored tokens


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def curve_max(curve: Sequence[Mapping[str, Any]], x_key: str) -> float | None:
    """The furthest ``x_key`` a curve reached (None for an empty curve)."""
    xs = [float(p[x_key]) for p in curve if _finite(p.get(x_key))]
    return max(xs) if xs else None


def loss_at(
    curve: Sequence[Mapping[str, Any]], x_key: str, x: float, metric: str = "eval_loss"
) -> LossAt | None:
    """The curve's held-out loss at ``x`` (see the module doc), or None outside it.

    With the rows on both sides the interpolated rows give the value and its SE; a curve
    without rows interpolates the value and its reported SE.
    """
    pts = [p for p in curve if _finite(p.get(x_key)) and _finite(p.get(metric))]
    if not pts:
        return None
    with_rows = [p for p in pts if p.get("eval_row_nll") and p.get("eval_row_tokens")]
    sizes = {len(p["eval_row_nll"]) for p in with_rows}
    if len(with_rows) == len(pts) and len(sizes) == 1:
        nll = interpolate_rows([(float(p[x_key]), np.asarray(p["eval_row_nll"])) for p in pts], x)
        if nll is None:
            return None
        tokens = np.asarray(pts[0]["eval_row_tokens"], dtype=np.float64)
        if metric == "eval_loss":
            return LossAt(x, ratio_estimate(nll, tokens), nll, tokens)
    value = interpolate_rows([(float(p[x_key]), np.asarray([p[metric]])) for p in pts], x)
    if value is None:
        return None
    se = interpolate_rows(
        [(float(p[x_key]), np.asarray([p.get("eval_loss_se", math.nan)])) for p in pts], x
    )
    n = min(int(p.get("eval_n") or 0) for p in pts)
    return LossAt(x, Estimate(float(value[0]), float(se[0]) if se is not None else math.nan, n))


def gain_over(reference: LossAt, trial: LossAt, mode: str = "min") -> Estimate:
    """How far ``trial`` is ahead of ``reference`` at the same point (positive: ahead).

    Paired over the held-out rows when both kept the same rows; else the difference of the
    two means with their errors combined (independent samples: an overestimate of the
    error when the rows are in fact shared).
    """
    sign = 1.0 if mode == "min" else -1.0
    if (
        reference.nll is not None
        and trial.nll is not None
        and reference.nll.shape == trial.nll.shape
        and reference.tokens is not None
        and np.array_equal(reference.tokens, trial.tokens)  # type: ignore[arg-type]
    ):
        diff = paired_difference(reference.nll, trial.nll, reference.tokens)
        return Estimate(sign * diff.value, diff.se, diff.n)
    a, b = reference.estimate, trial.estimate
    return Estimate(
        sign * (a.value - b.value), math.sqrt(a.se**2 + b.se**2), min(a.n, b.n)
    )


def tokens_to_recover(
    curve: Sequence[Mapping[str, Any]], target: float, metric: str = "eval_loss"
) -> dict[str, float] | None:
    """Tokens (and FLOPs) at which the curve first comes down to ``target``, interpolated
    linearly between the reports on either side; None if it never does."""
    pts = sorted(
        (p for p in curve if _finite(p.get(metric)) and _finite(p.get("tokens_seen"))),
        key=lambda p: p["tokens_seen"],
    )
    for i, p in enumerate(pts):
        if p[metric] > target:
            continue
        if i == 0:
            return {"tokens": float(p["tokens_seen"]), "flops": float(p.get("flops", math.nan))}
        q = pts[i - 1]
        w = (q[metric] - target) / (q[metric] - p[metric])
        out = {"tokens": q["tokens_seen"] + w * (p["tokens_seen"] - q["tokens_seen"])}
        if _finite(p.get("flops")) and _finite(q.get("flops")):
            out["flops"] = q["flops"] + w * (p["flops"] - q["flops"])
        return {k: float(v) for k, v in out.items()}
    return None


def _set_loss(row: dict[str, Any], prefix: str, at: LossAt | None) -> None:
    row[prefix] = at.estimate.value if at else None
    row[f"{prefix}_se"] = at.estimate.se if at else None
    row[f"{prefix}_n"] = at.estimate.n if at else None


def analyse(
    rows: list[dict[str, Any]],
    metric: str = "eval_loss",
    mode: str = "min",
    seam: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Add the comparisons to every row (in place) and return the sweep-level ones.

    Row keys added: ``loss_eq_tokens``/``loss_eq_flops`` (``_se``, ``_n``), ``loss_all`` (at
    the largest FLOPs every searched trial reached, the predictors' outcome), ``gain`` (over
    the base at equal FLOPs; ``gain_se``, ``gain_at_flops``, ``gain_within_noise``),
    ``gain_tokens`` (``_se``), ``recover_tokens``/``recover_flops``/``recover``, the
    predictors ``seam_angular``/``seam_bi`` (``_se``), and without a base model ``vs_best``
    (``_se``, ``_within_noise``): the loss minus the best trial's at equal tokens.
    """
    with_curve = [r for r in rows if r.get("curve")]
    finished = [r for r in with_curve if r["status"] == "done"] or with_curve
    searched = [r for r in with_curve if not r["reference"]]
    base = next((r for r in with_curve if r["reference"]), None)

    def common(pool: list[dict[str, Any]], x_key: str) -> float | None:
        tops = [curve_max(r["curve"], x_key) for r in pool]
        tops = [t for t in tops if t is not None]
        return min(tops) if tops else None

    eq_tokens = common(finished, "tokens_seen")
    eq_flops = common(finished, "flops")
    all_flops = common(searched, "flops")
    summary: dict[str, Any] = {
        "equal_tokens": eq_tokens,
        "equal_flops": eq_flops,
        "all_trials_flops": all_flops,
        "base_start": None,
        "predictors": {},
    }
    base_start = loss_at(base["curve"], "step", 0.0, metric) if base else None
    if base_start is not None:
        summary["base_start"] = {
            "value": base_start.estimate.value,
            "se": base_start.estimate.se,
            "n": base_start.estimate.n,
        }
    by_m = {s["m"]: s for s in (seam or {}).get("scores", [])}
    for r in rows:
        curve = r.get("curve") or []
        for key, x_key, x in (("loss_eq_tokens", "tokens_seen", eq_tokens),
                              ("loss_eq_flops", "flops", eq_flops),
                              ("loss_all", "flops", all_flops)):  # fmt: skip
            _set_loss(r, key, loss_at(curve, x_key, x, metric) if x is not None else None)
        for key in ("gain", "gain_se", "gain_at_flops", "gain_within_noise", "gain_tokens",
                    "gain_tokens_se", "recover_tokens", "recover_flops", "recover"):  # fmt: skip
            r.setdefault(key, None)
        score = by_m.get(r.get("m")) if r.get("method") == "solar" else None
        for key in PREDICTORS:
            r[key] = score.get(key) if score else None
            r[f"{key}_se"] = score.get(f"{key}_se") if score else None
        if base is None or r is base or not curve:
            continue
        for x_key, out_key in (("flops", "gain"), ("tokens_seen", "gain_tokens")):
            target = eq_flops if x_key == "flops" else eq_tokens
            tops = [curve_max(curve, x_key), curve_max(base["curve"], x_key), target]
            if any(t is None for t in tops):
                continue
            x = min(t for t in tops if t is not None)
            mine, ref = loss_at(curve, x_key, x, metric), loss_at(base["curve"], x_key, x, metric)
            if mine is None or ref is None:
                continue
            g = gain_over(ref, mine, mode)
            r[out_key], r[f"{out_key}_se"] = g.value, g.se
            if out_key == "gain":
                r["gain_at_flops"], r["gain_within_noise"] = x, g.within_noise()
        if base_start is not None and mode == "min":
            hit = tokens_to_recover(curve, base_start.estimate.value, metric)
            if hit is not None:
                r["recover_tokens"], r["recover_flops"] = hit["tokens"], hit.get("flops")
                r["recover"] = f"{hit['tokens']:.4g} tokens"
            elif r["status"] == "done":
                r["recover"] = "not within budget"
            else:
                tokens = curve_max(curve, "tokens_seen") or 0
                r["recover"] = f"not within its {tokens:.4g} tokens (stopped early)"
    if base is None and eq_tokens is not None:
        _versus_best(rows, mode, metric)
    summary["predictors"] = _rank_predictors(searched, all_flops)
    return summary


def _versus_best(rows: list[dict[str, Any]], mode: str, metric: str) -> None:
    """Without a base model: each trial against the best one at equal tokens, paired."""
    scored = [r for r in rows if r.get("loss_eq_tokens") is not None]
    if not scored:
        return
    sign = 1.0 if mode == "min" else -1.0
    best = min(scored, key=lambda r: sign * r["loss_eq_tokens"])
    x = min(curve_max(r["curve"], "tokens_seen") or 0.0 for r in scored)
    ref = loss_at(best["curve"], "tokens_seen", x, metric)
    for r in rows:
        r.setdefault("vs_best", None)
        r.setdefault("vs_best_se", None)
        r.setdefault("vs_best_within_noise", None)
        if r not in scored or ref is None:
            continue
        mine = loss_at(r["curve"], "tokens_seen", x, metric)
        if mine is None:
            continue
        d = gain_over(ref, mine, mode)  # >= 0 for the best itself; negative: behind it
        r["vs_best"], r["vs_best_se"] = -d.value, d.se
        r["vs_best_within_noise"] = d.within_noise() if r is not best else None


def _rank_predictors(searched: list[dict[str, Any]], x: float | None) -> dict[str, dict[str, Any]]:
    """Spearman of each predictor with the loss at ``x`` FLOPs (``loss_all``) over the
    searched trials."""
    out: dict[str, dict[str, Any]] = {}
    if x is None:
        return out
    outcome = {r["trial"]: r["loss_all"] for r in searched if _finite(r.get("loss_all"))}
    for key in PREDICTORS:
        pairs = [(r[key], outcome[r["trial"]]) for r in searched
                 if _finite(r.get(key)) and r["trial"] in outcome]  # fmt: skip
        if not pairs:
            continue
        rank = spearman([p[0] for p in pairs], [p[1] for p in pairs])
        out[key] = {"rho": rank.rho, "p_value": rank.p_value, "n": rank.n, "exact": rank.exact,
                    "at_flops": x}  # fmt: skip
    return out
