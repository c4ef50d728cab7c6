"""A sweep's budget in tokens or FLOPs, turned into each trial's steps and rung steps.

Each trial gets the whole steps that fit the budget (``tokens_per_step`` = global batch x
``seq_len``; FLOPs per token from :func:`solar_ray.tune.trial.model_stats`, computed for an
upscale from its plan). Rungs are amounts of the budget, checkpointed at the first held-out
report at or past each. See docs/sweep.md, "Scheduling and the comparison".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from solar_ray.config import ConfigError
from solar_ray.tune.config import BudgetConfig

__all__ = ["TrialBudget", "rung_steps", "steps_within", "trial_budget"]

#: relative slack for amounts that land on a step boundary up to float rounding
_EPS = 1e-9


@dataclass(frozen=True)
class TrialBudget:
    """What a budget means for one trial's model."""

    steps: int
    tokens_per_step: int
    flops_per_token: float
    num_layers: int
    num_params: int
    rung_steps: tuple[int, ...] = ()

    @property
    def tokens(self) -> int:
        """Training tokens of the whole run."""
        return self.steps * self.tokens_per_step

    @property
    def flops(self) -> float:
        """Estimated training FLOPs of the whole run."""
        return self.tokens * self.flops_per_token

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for ``budgets.json`` and the report)."""
        return {**asdict(self), "rung_steps": list(self.rung_steps), "tokens": self.tokens,
                "flops": self.flops}  # fmt: skip


def _per_step(budget: BudgetConfig, tokens_per_step: int, flops_per_token: float) -> float:
    """The budget's unit consumed by one training step."""
    if budget.unit == "tokens":
        return float(tokens_per_step)
    return float(tokens_per_step) * float(flops_per_token)


def steps_within(
    budget: BudgetConfig, tokens_per_step: int, flops_per_token: float, trial: str = "a trial"
) -> int:
    """The whole training steps that fit in ``budget`` (at least one, or a ConfigError)."""
    per_step = _per_step(budget, tokens_per_step, flops_per_token)
    steps = math.floor(budget.amount / per_step * (1 + _EPS))
    if steps < 1:
        raise ConfigError(
            f"budget.{budget.unit}: {budget.amount:.4g} is less than one training step of "
            f"{trial} ({per_step:.4g} {budget.unit} per step); raise the budget"
        )
    return steps


def rung_steps(
    milestones: list[int] | list[float], per_step: float, eval_every: int, steps: int
) -> tuple[int, ...]:
    """The step of the first held-out report at or past each rung (below ``steps``).

    Held-out reports come every ``eval_every`` steps, so the step that first reaches a rung
    ``r`` is ``ceil(r / per_step)`` rounded up to a multiple of ``eval_every``.
    """
    out: list[int] = []
    for milestone in milestones:
        first = math.ceil(float(milestone) / per_step * (1 - _EPS))
        step = max(eval_every, math.ceil(first / eval_every) * eval_every)
        if step < steps and step not in out:
            out.append(step)
    return tuple(out)


def trial_budget(
    budget: BudgetConfig,
    stats: Mapping[str, Any],
    tokens_per_step: int,
    milestones: list[int] | list[float] = (),  # type: ignore[assignment]
    eval_every: int | None = None,
    trial: str = "a trial",
) -> TrialBudget:
    """One trial's steps (and rung steps, given the scheduler's ``milestones``) from its
    model's ``stats`` (:func:`solar_ray.tune.trial.model_stats`)."""
    fpt = float(stats["flops_per_token"])
    steps = steps_within(budget, tokens_per_step, fpt, trial)
    rungs: tuple[int, ...] = ()
    if milestones and eval_every:
        rungs = rung_steps(list(milestones), _per_step(budget, tokens_per_step, fpt), eval_every, steps)
    return TrialBudget(
        steps=steps,
        tokens_per_step=int(tokens_per_step),
        flops_per_token=fpt,
        num_layers=int(stats["num_layers"]),
        num_params=int(stats["num_params"]),
        rung_steps=rungs,
    )


def budgets_path(trials_root: str | Path) -> Path:
    """``OUT/trials/<experiment>/budgets.json``: every trial's budget, for the report."""
    return Path(trials_root) / "budgets.json"
