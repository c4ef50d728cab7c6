"""A sweep's budget in steps and rung steps, worked out by hand from round numbers: the
one-step edge, amounts exactly on a step boundary, rungs at zero, repeated and past the
end, and the plain data written to ``budgets.json``. No model, no Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

from solar_ray.config import ConfigError
from solar_ray.tune.budget import budgets_path, rung_steps, steps_within, trial_budget
from solar_ray.tune.config import BudgetConfig

#: a trial's model: 1000 FLOPs a token, 3 layers, 50 parameters
STATS = {"flops_per_token": 1000, "num_layers": 3, "num_params": 50}


def test_one_whole_step_is_enough_and_less_is_refused_naming_the_trial():
    # 100 tokens a step: a budget of exactly one step trains one step
    assert steps_within(BudgetConfig(tokens=100), 100, 1000.0) == 1
    assert steps_within(BudgetConfig(flops=100 * 1000), 100, 1000.0) == 1
    assert steps_within(BudgetConfig(tokens=199), 100, 1000.0) == 1
    assert steps_within(BudgetConfig(flops=3e5), 100, 1000.0) == 3  # 3e5 / 1e5 exactly
    with pytest.raises(ConfigError) as err:
        steps_within(BudgetConfig(tokens=99), 100, 1000.0, trial="trial m=2")
    assert str(err.value) == (
        "budget.tokens: 99 is less than one training step of trial m=2 (100 tokens per step); "
        "raise the budget"
    )
    with pytest.raises(ConfigError, match=r"^budget\.flops: 9\.9e\+04 is less than one training "
                       r"step of a trial \(1e\+05 flops per step\)"):  # fmt: skip
        steps_within(BudgetConfig(flops=99_000), 100, 1000.0)


def test_rung_steps_by_hand():
    per_step = 100.0  # tokens a step
    # rungs exactly on steps 3 and 4, reports every step: steps 3 and 4, not one later
    assert rung_steps([300, 400], per_step, 1, 10) == (3, 4)
    # reports every 4 steps: 3 -> 4, 4 -> 4 (once), 4.01 -> 5 -> 8
    assert rung_steps([300, 400, 401], per_step, 4, 10) == (4, 8)
    # a rung at 0 is compared at the first report, never at step 0
    assert rung_steps([0], per_step, 3, 10) == (3,)
    # at or past the last step: no rung (the run's end is compared anyway)
    assert rung_steps([900, 1000, 5000], per_step, 1, 10) == (9,)
    assert rung_steps([], per_step, 1, 10) == ()


def test_trial_budget_and_its_plain_data():
    b = trial_budget(BudgetConfig(tokens=1050), STATS, 100, milestones=[300, 600], eval_every=2)
    assert (b.steps, b.tokens_per_step, b.flops_per_token) == (10, 100, 1000.0)
    assert (b.num_layers, b.num_params, b.rung_steps) == (3, 50, (4, 6))
    assert (b.tokens, b.flops) == (1000, 1_000_000.0)
    assert b.to_dict() == {
        "steps": 10, "tokens_per_step": 100, "flops_per_token": 1000.0, "num_layers": 3,
        "num_params": 50, "rung_steps": [4, 6], "tokens": 1000, "flops": 1_000_000.0,
    }  # fmt: skip
    # a FLOPs budget: 2.5e6 / (100 x 1000) = 25 steps; rungs at 1e6 and 2e6 FLOPs, every 5
    f = trial_budget(BudgetConfig(flops=2.5e6), STATS, 100, milestones=[1e6, 2e6], eval_every=5)
    assert (f.steps, f.tokens, f.flops, f.rung_steps) == (25, 2500, 2.5e6, (10, 20))
    # no scheduler milestones, or no held-out reports: no rungs
    assert trial_budget(BudgetConfig(tokens=1050), STATS, 100, milestones=[300]).rung_steps == ()
    assert trial_budget(BudgetConfig(tokens=1050), STATS, 100, eval_every=2).rung_steps == ()
    with pytest.raises(ConfigError, match="of trial x "):
        trial_budget(BudgetConfig(tokens=50), STATS, 100, trial="trial x")
    with pytest.raises(ConfigError, match=r"of a trial \(100 tokens per step\)"):
        trial_budget(BudgetConfig(tokens=50), STATS, 100)
    assert budgets_path("out/trials/exp") == Path("out/trials/exp/budgets.json")
