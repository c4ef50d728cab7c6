"""Ray Tune sweeps: planning and config errors (no Ray), then real sweeps on a tiny model.

The integration tests run real ``Tuner``s whose trials upscale a 4-layer Llama, train it
with a ``TorchTrainer`` (one gloo worker, DeepSpeed on CPU) on a small packed mix and
report held-out loss: a 3-value grid, ASHA over a FLOPs budget against a planted bad trial,
successive halving over steps and over a FLOPs budget (with the base reference and the seam
predictors), a sweep driver killed mid-way and rerun, and an SFT mix sweep.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from tiny_recipe import sft_mix_sweep

from solar_ray.config import ConfigError
from solar_ray.train.session import read_run_state
from solar_ray.tune import load_sweep, plan_trials
from solar_ray.tune.config import SweepConfig
from solar_ray.tune.report import select_best, value_at
from solar_ray.tune.sweep import experiment_name, fit_concurrency

REPO = Path(__file__).resolve().parents[1]
JOBS = sorted((REPO / "jobs").glob("sweep-*.yaml"))


def sweep_dict(**over) -> dict:
    base = {
        "name": "t",
        "base": "some/model",
        "search": {"m": [1, 2, 3]},
        "train": {
            "kind": "pretrain",
            "data": "/d",
            "val_data": "/v",
            "steps": 8,
            "eval_every": 2,
            "log_every": 2,
        },
        "scheduler": {"grace_period_steps": 2},
    }
    for key, value in over.items():
        base[key] = value
    return base


# --------------------------------------------------------------------------- no Ray


def test_plan_names_are_deterministic_and_cover_the_space():
    cfg = SweepConfig.model_validate(
        sweep_dict(
            search={
                "method": ["solar", "llama-pro"],
                "m": {"start": 4, "stop": 8, "step": 2},
                "expand_every": [2, 4],
                "trials": [{"name": "bad", "m": 1, "train": {"lr": 1.0}}],
            }
        )
    )
    names = [t.name for t in plan_trials(cfg)]
    assert names == [
        "solar-m04",
        "solar-m06",
        "solar-m08",
        "llama-pro-k2",
        "llama-pro-k4",
        "bad",
        "base",
    ]
    assert names == [t.name for t in plan_trials(cfg)]
    base = plan_trials(cfg)[-1]
    assert base.reference and base.upscale_args() is None
    assert plan_trials(cfg)[0].upscale_args() == {"method": "solar", "m": 4}
    assert plan_trials(cfg)[5].train == {"lr": 1.0}


def test_shuffled_order_is_seeded_and_keeps_names():
    given = SweepConfig.model_validate(sweep_dict(search={"m": [1, 2, 3, 4, 5, 6]}))
    names = [t.name for t in plan_trials(given)]

    def order(seed: int) -> list[str]:
        space = {"m": [1, 2, 3, 4, 5, 6], "order": "shuffle", "seed": seed}
        return [t.name for t in plan_trials(SweepConfig.model_validate(sweep_dict(search=space)))]

    assert order(0) == order(0) != names and sorted(order(0)) == sorted(names)
    assert order(0)[-1] == "base" and order(0) != order(1)


def test_mix_search_plans_one_trial_per_mix_without_baseline():
    cfg = SweepConfig.model_validate(
        sweep_dict(
            search={
                "method": "none",
                "mixes": [{"name": f"v{i}", "data": f"@data/sft_v{i}"} for i in range(1, 5)],
            },
            train={"kind": "sft", "val_data": "@data/sft_heldout", "steps": 8, "eval_every": 2},
        )
    )
    trials = plan_trials(cfg)
    assert [t.name for t in trials] == ["mix-v1", "mix-v2", "mix-v3", "mix-v4"]
    assert trials[2].data == "@data/sft_v3" and trials[2].upscale_args() is None


def test_inline_mix_choices_are_built_by_the_data_stage():
    data = {"kind": "data", "mixes": [{"name": "held", "kind": "sft", "sources": [{"path": "h"}]}]}
    mix = {"kind": "sft", "sources": [{"path": "a.json", "format": "alpaca", "max_samples": 9}]}
    cfg = SweepConfig.model_validate(
        sweep_dict(
            stages={"data": data},
            search={
                "method": "none",
                "mixes": [{"name": "a", "mix": mix}, {"name": "b", "data": "/prepared/b"}],
            },
            train={"kind": "sft", "val_data": "@data/held", "steps": 8, "eval_every": 2},
        )
    )
    assert [(t.name, t.data) for t in plan_trials(cfg)] == [
        ("mix-a", "@data/a"),
        ("mix-b", "/prepared/b"),
    ]
    built = cfg.effective_stages()["data"]["mixes"]
    assert [m["name"] for m in built] == ["held", "a"] and built[1]["sources"] == mix["sources"]
    assert cfg.stages["data"]["mixes"] == data["mixes"]  # the recipe itself is not changed
    assert [m["name"] for m in cfg.effective_stages(only={"b"})["data"]["mixes"]] == ["held"]
    with pytest.raises(ValueError, match="mix_stage"):
        SweepConfig.model_validate(
            sweep_dict(search={"method": "none", "mixes": [{"name": "a", "mix": mix}]})
        )
    with pytest.raises(ValueError, match="also a mix"):
        SweepConfig.model_validate(
            sweep_dict(
                stages={"data": data},
                search={"mixes": [{"name": "held", "mix": mix}]},
                train={"kind": "sft", "val_data": "/v", "steps": 8, "eval_every": 2},
            )
        )
    with pytest.raises(ValueError, match="exactly one of"):
        SweepConfig.model_validate(sweep_dict(search={"mixes": [{"name": "a"}]}))


@pytest.mark.parametrize(
    ("over", "expect"),
    [
        (
            {"train": {"kind": "pretrain", "data": "/d", "val_data": "/v", "steps": 8}},
            r"train\.eval_every",
        ),
        (
            {
                "train": {
                    "kind": "pretrain",
                    "data": "/d",
                    "steps": 8,
                    "eval_every": 2,
                    "log_every": 2,
                }
            },
            r"train\.val_data",
        ),
        (
            {"train": {"kind": "pretrain", "model": "x", "data": "/d", "val_data": "/v"}},
            r"train.*model: the sweep sets it",
        ),
        ({"train": {"kind": "dpo", "data": "/d"}}, r"train.*kind: expected one of"),
        ({"search": {"m": []}}, r"search\.m"),
        ({"search": {"m": {"start": 9, "stop": 4}}}, r"stop"),
        ({"search": {"m": [1], "trials": [{"name": "solar-m01", "m": 1}]}}, "appears twice"),
        ({"scheduler": {"grace_period_steps": 50}}, "grace_period_steps"),
        (
            {
                "train": {
                    "kind": "pretrain",
                    "data": "/d",
                    "val_data": "/v",
                    "steps": 8,
                    "eval_every": 3,
                    "log_every": 2,
                }
            },
            "multiple of train.log_every",
        ),
    ],
)
def test_config_mistakes_name_the_field(tmp_path, over, expect):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(sweep_dict(**over)))
    with pytest.raises(ConfigError, match=expect):
        load_sweep(path)


def test_overrides_and_experiment_names():
    a = SweepConfig.model_validate(sweep_dict())
    b = SweepConfig.model_validate(sweep_dict(scheduler={"kind": "grid"}))
    c = SweepConfig.model_validate(
        sweep_dict(max_concurrent_trials=1, description="x", seam=False, seam_sequences=4)
    )
    assert experiment_name(a).startswith("t-asha-") and experiment_name(b).startswith("t-grid-")
    assert experiment_name(a) == experiment_name(c)  # operational fields do not fork a sweep


def test_concurrency_follows_resources():
    assert fit_concurrency({"CPU": 2.0}, {"CPU": 1.0}, num_trials=5) == 2
    assert fit_concurrency({"CPU": 64.0, "GPU": 8.0}, {"CPU": 8.0, "GPU": 4.0}, 9) == 2
    assert fit_concurrency({"CPU": 64.0, "GPU": 8.0}, {"CPU": 1.0}, 3) == 3
    assert fit_concurrency({"CPU": 2.0}, {"CPU": 4.0}, 5) == 1  # not scaled up yet
    assert fit_concurrency({"CPU": 16.0}, {"CPU": 1.0}, 9, cap=4) == 4


def test_best_and_interpolation():
    rows = [
        {"trial": "a", "reference": False, "status": "stopped", "eval_loss": 1.0},
        {"trial": "b", "reference": False, "status": "done", "eval_loss": 2.0},
        {"trial": "c", "reference": False, "status": "done", "eval_loss": math.inf},
        {"trial": "base", "reference": True, "status": "done", "eval_loss": 0.5},
    ]
    # a stopped trial never beats one that trained the full budget; the reference never wins
    assert select_best(rows, "eval_loss", "min")["trial"] == "b"
    curve = [
        {"step": 4, "flops": 20.0, "eval_loss": 2.0},
        {"step": 2, "flops": 10.0, "eval_loss": 4.0},
        {"step": 3, "flops": math.nan, "eval_loss": 9.0},  # no FLOPs: not on the FLOPs curve
    ]
    assert value_at(curve, "flops", 12.5, "eval_loss") == pytest.approx(3.5)
    assert value_at(curve, "flops", 20.0, "eval_loss") == 2.0 and value_at(curve, "step", 3, "eval_loss") == 9.0
    assert value_at(curve, "step", 5, "eval_loss") is None
    # a rounding error past the end is the end; before the start is never interpolated
    assert value_at(curve, "step", 4 + 1e-12, "eval_loss") == 2.0
    assert value_at(curve, "step", 2 - 1e-12, "eval_loss") is None


def test_a_rung_score_is_interpolated_between_the_reports_around_it():
    from solar_ray.tune.hooks import score_at

    assert score_at(12.5, (10.0, 4.0), (20.0, 2.0)) == pytest.approx(3.5)
    assert score_at(20.0, (10.0, 4.0), (20.0, 2.0)) == 2.0  # reported at the rung itself
    assert score_at(15.0, None, (20.0, 2.0)) == 2.0  # no report before the rung
    assert score_at(15.0, (10.0, math.nan), (20.0, 2.0)) == 2.0  # a diverged run stays the worst
    assert score_at(15.0, (10.0, 4.0), (20.0, math.inf)) == math.inf


def test_worker_reports_forwarded_to_tune():
    from solar_ray.tune.trial import forwarded_metrics

    stats = {"flops_per_token": 10.0, "num_layers": 6, "num_params": 100}
    fwd = lambda raw: forwarded_metrics(raw, "eval_loss", "min", stats, 64, last_step=8)  # noqa: E731
    assert fwd({"step": 2, "loss": 3.0}) is None  # training loss only: Tune needs the metric
    assert fwd({"step": 8, "eval_loss": 2.0}) is None  # the driver reports the last step
    out = fwd({"step": 4, "eval_loss": 2.5, "eval_ppl": 12.2, "tokens_seen": 256})
    assert out["step"] == 4 and out["eval_loss"] == 2.5 and out["flops"] == 2560.0
    assert not out["final"] and not out["diverged"]
    # a diverged run is the worst value, which ASHA can compare (NaN it cannot)
    nan = fwd({"step": 2, "eval_loss": float("nan")})
    assert nan["eval_loss"] == math.inf and nan["diverged"] and nan["tokens_seen"] == 128


def test_rung_milestones():
    from solar_ray.tune.config import rung_milestones

    assert rung_milestones(2, 2, 18) == [2, 4, 8, 16]
    assert rung_milestones(2, 3, 18) == [2, 6]
    assert rung_milestones(1, 1.5, 6) == [1, 2, 3, 5]  # rounded, no step twice
    assert rung_milestones(8, 2, 8) == []


class _Trial:
    """The parts of a Tune ``Trial`` a scheduler reads."""

    def __init__(self, name: str) -> None:
        self.config = {"trial": name}
        self.trial_id = name
        self.status = "PENDING"
        self.is_saving = False


class _Controller:
    """The parts of Tune's controller a scheduler calls."""

    def __init__(self, trials: list[_Trial]) -> None:
        self.trials = trials
        self.stopped: list[str] = []

    def get_trials(self) -> list[_Trial]:
        return self.trials

    def stop_trial(self, trial: _Trial) -> None:
        self.stopped.append(trial.trial_id)
        trial.status = "TERMINATED"


def _sha(names, **over):
    from solar_ray.tune.config import rung_milestones
    from solar_ray.tune.hooks import SuccessiveHalving

    trials = [_Trial(n) for n in names]
    kwargs = dict(
        trials=names,
        reference={"base"},
        metric="eval_loss",
        mode="min",
        milestones=rung_milestones(2, 2, 18),
        reduction_factor=2,
    )
    sched = SuccessiveHalving(**{**kwargs, **over})
    tc = _Controller(trials)
    for t in trials:
        sched.on_trial_add(tc, t)
    return sched, tc, {t.trial_id: t for t in trials}


def _report(sched, tc, trial, step, loss, checkpointed=True):
    trial.status = "RUNNING"
    decision = sched.on_trial_result(
        tc, trial, {"step": step, "eval_loss": loss, "checkpointed": checkpointed}
    )
    if decision == "PAUSE":
        trial.status = "PAUSED"
    elif decision == "STOP":
        trial.status = "TERMINATED"
    return decision


def test_successive_halving_cuts_each_rung_over_all_trials():
    sched, tc, t = _sha(["a", "b", "c", "d", "e", "base"])
    # the first arrivals wait at step 2 (ASHA would let the first one go on), paused only
    # on a report that carried a checkpoint
    assert _report(sched, tc, t["a"], 2, 3.4) == "PAUSE"
    assert _report(sched, tc, t["b"], 2, 4.1, checkpointed=False) == "CONTINUE"
    assert _report(sched, tc, t["b"], 2, 4.1) == "PAUSE"
    assert _report(sched, tc, t["base"], 2, 3.0) == "CONTINUE"  # the reference never waits
    assert _report(sched, tc, t["c"], 2, 4.2) == "PAUSE"
    assert sched.choose_trial_to_run(tc) is t["d"]  # pending first; nobody paused is due
    assert _report(sched, tc, t["d"], 2, 3.1) == "PAUSE"
    assert sched.choose_trial_to_run(tc) is t["e"]
    # the last arrival cuts the rung: the best int(5 / 2) = 2 go on (d and e)
    assert _report(sched, tc, t["e"], 2, 3.2) == "CONTINUE"
    assert sorted(tc.stopped) == ["a", "b", "c"]
    assert sched.choose_trial_to_run(tc) is t["d"]  # the promoted paused trial resumes
    # rung 4: e arrives first and waits for d; of two, one goes on
    assert _report(sched, tc, t["e"], 4, 3.0) == "PAUSE"
    assert sched.choose_trial_to_run(tc) is t["d"]
    assert _report(sched, tc, t["d"], 4, 2.9) == "CONTINUE"
    assert tc.stopped[-1] == "e" and sched.choose_trial_to_run(tc) is None
    # alone in the race, d no longer waits at a rung
    assert _report(sched, tc, t["d"], 8, 2.8) == "CONTINUE"
    assert _report(sched, tc, t["d"], 16, 2.7) == "CONTINUE"
    assert "step 2: 5 in, 2 kept" in sched.debug_string()


def test_successive_halving_does_not_wait_for_a_trial_that_failed():
    sched, tc, t = _sha(["a", "b", "c"], reference=set())
    assert _report(sched, tc, t["a"], 2, 3.0) == "PAUSE"
    assert _report(sched, tc, t["b"], 2, 2.0) == "PAUSE"
    t["c"].status = "ERROR"
    sched.on_trial_error(tc, t["c"])  # the rung is complete without c: int(2 / 2) = 1 kept
    assert tc.stopped == ["a"] and sched.choose_trial_to_run(tc) is t["b"]
    # a result that jumps past a rung is recorded there too; a NaN loss is the worst score
    sched, tc, t = _sha(["a", "b"], reference=set())
    assert _report(sched, tc, t["a"], 4, float("nan")) == "PAUSE"
    assert _report(sched, tc, t["b"], 4, 5.0) == "CONTINUE"
    assert tc.stopped == ["a"]


def test_sha_config_needs_evaluations_at_the_rungs():
    raw = sweep_dict(scheduler={"kind": "sha", "grace_period_steps": 3, "reduction_factor": 2})
    with pytest.raises(ValueError, match=r"train\.eval_every.*\[3, 6\]"):
        SweepConfig.model_validate(raw)
    cfg = SweepConfig.model_validate(
        sweep_dict(scheduler={"kind": "sha", "grace_period_steps": 2, "reduction_factor": 2})
    )
    assert experiment_name(cfg).startswith("t-sha-")


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.name)
def test_sweep_jobs_validate(job, tmp_path, capsys):
    import re

    from solar_ray.cli import main as cli_main
    from solar_ray.tune.sweep import run_sweep

    cfg = load_sweep(job)
    trials = plan_trials(cfg)
    assert len({t.name for t in trials}) == len(trials) >= 2
    run_sweep(cfg, tmp_path, dry_run=True, echo=lambda s: None)  # best.yaml plans too
    # --scheduler replaces the recipe's: the experiment runs (and is named) with the flag's
    other = "asha" if cfg.scheduler.kind == "grid" else "grid"
    capsys.readouterr()
    argv = ["sweep", str(job), "--out", str(tmp_path), "--dry-run", "--scheduler", other]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert re.search(rf"^experiment: {re.escape(cfg.name)}-{other}-\S+ \({other}\)$", printed, re.M), printed
    if job.name == "sweep-m.yaml":
        assert cfg.base == "smollm2-135m" and cfg.search.m_values() == [3, 5, 7, 9, 11]


def test_sweep_dry_run_budgets_from_the_gguf_header_match_the_converted_model(
    smollm2_dir, tmp_path, monkeypatch
):
    """A dry run over the embedded GGUF plans the same budgets as over its dequantized
    directory, and writes nothing into an empty model cache (it used to dequantize: 50 s
    and 517 MB)."""
    from solar_ray.tune.sweep import _dry_run_budgets, plan_budgets

    cfg = load_sweep(REPO / "jobs" / "sweep-m.yaml")
    trials = plan_trials(cfg)
    out = tmp_path / "sweep"
    ctx = {"train_kind": cfg.train_kind, "train": cfg.train_fields(), "out": str(out),
           "storage_path": str(out / "ray_train"), "experiment": experiment_name(cfg)}  # fmt: skip
    converted = plan_budgets(cfg, trials, smollm2_dir, ctx)
    cache = tmp_path / "empty-cache"
    cache.mkdir()
    monkeypatch.setenv("SOLAR_RAY_CACHE", str(cache))
    assert _dry_run_budgets(cfg, trials, out) == converted
    assert len({b.flops for b in converted.values()}) == len(trials)  # m changes the FLOPs
    assert list(cache.iterdir()) == [] and not out.exists()


# --------------------------------------------------------------------------- tiny sweeps


@pytest.fixture(scope="module")
def tiny_mixes(tmp_path_factory, smollm2_tokenizer) -> dict[str, Path]:
    """Packed pretraining mixes (train / held-out) of CPython's reference-manual prose."""
    from stage_io import offline_prose, write_pretrain_mix

    d = tmp_path_factory.mktemp("mixes")
    docs = offline_prose(40)
    return {
        "train": write_pretrain_mix(d / "train", smollm2_tokenizer, docs[:30], seq_len=64),
        "heldout": write_pretrain_mix(d / "heldout", smollm2_tokenizer, docs[30:], seq_len=64),
    }


@pytest.fixture(scope="module")
def ray_module():
    """One private local Ray for this module's in-process sweeps (as ``ray_local``)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def tiny_sweep(base: str, mixes: dict[str, Path], **over) -> dict:
    train = {
        "kind": "pretrain",
        "data": str(mixes["train"]),
        "val_data": str(mixes["heldout"]),
        "num_workers": 1,
        "zero_stage": 0,
        "seq_len": 64,
        "micro_batch_size": 2,
        "steps": 4,
        "eval_every": 2,
        "log_every": 2,
        "eval_batches": 2,
        "lr": 1e-3,
        "warmup_steps": 0,
        "checkpoint_every": 100,
        "tracking": "none",
        "max_failures": 0,
    }
    cfg = {
        "name": "tiny",
        "base": base,
        "search": {"m": [1, 2, 3]},
        "train": train,
        "scheduler": {"kind": "grid"},
    }
    for key, value in over.items():
        if key == "train":
            cfg["train"] = {**train, **value}
        else:
            cfg[key] = value
    if "budget" in cfg:  # the budget sets each trial's steps
        cfg["train"].pop("steps", None)
    return cfg


#: two good trials and one whose learning rate makes it diverge
PLANTED_BAD = {"m": [1, 2], "trials": [{"name": "bad", "m": 1, "train": {"lr": 20.0}}]}


def _assert_cpus_given_back(ray_module) -> None:
    """Nothing holds the CPUs after a sweep: stopped trials' placement groups are gone."""
    deadline = time.monotonic() + 20
    while ray_module.available_resources().get("CPU") != 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray_module.available_resources().get("CPU") == 2


@pytest.mark.slow
def test_asha_over_a_flops_budget_stops_a_planted_bad_trial_but_not_the_reference(
    tmp_path, tiny_llama_dir, tiny_mixes, ray_module
):
    from solar_ray.tune.sweep import run_sweep

    # two good trials run first (2 at a time) and set the rungs; the planted one diverges.
    # Two CPUs fit two trials: the later ones start only if the stopped ones free theirs.
    # The budget is in FLOPs: 6-layer trials (m=1) get 24 steps of 128 tokens, the 4-layer
    # ones (m=2, the base) 36; ASHA's rungs are at 1/8, 1/4, 1/2 of the budget's FLOPs.
    budget = 24 * 128 * 1_627_008  # FLOPs per token of the 6-layer model (test_seam.py)
    raw = tiny_sweep(
        str(tiny_llama_dir),
        tiny_mixes,
        search=PLANTED_BAD,
        budget={"flops": budget},
        max_concurrent_trials=2,
        scheduler={"kind": "asha", "grace_period_fraction": 0.125, "reduction_factor": 2},
    )
    cfg = SweepConfig.model_validate(raw)
    result = run_sweep(cfg, tmp_path / "sw", echo=lambda s: None)
    rows = {r["trial"]: r for r in result.rows}
    # 4-layer models: 24 x 1,627,008 / 1,084,800 = 35.996 steps of theirs fit
    assert [rows[t]["max_steps"] for t in ("solar-m01", "solar-m02", "bad", "base")] == [
        24, 35, 24, 35
    ]
    assert rows["bad"]["stopped_early"] and rows["bad"]["steps"] < 24
    # stopping the trial stopped its training run: it never reached its final checkpoint
    run = tmp_path / "sw" / "ray_train" / f"{experiment_name(cfg)}-bad"
    assert run.is_dir() and not (run / "final").exists()
    assert rows["base"]["status"] == "done" and rows["base"]["steps"] == 35
    assert result.best["trial"] in ("solar-m01", "solar-m02")
    summary = json.loads((tmp_path / "sw" / "summary.json").read_text())
    assert summary["num_stopped_early"] >= 1
    assert summary["budget_spent"] < summary["budget_full_grid"] == 3 * budget
    for name in ("solar-m01", "solar-m02"):  # trained the budget, up to one step short
        if rows[name]["status"] == "done":
            assert budget - 128 * rows[name]["flops_per_token"] < rows[name]["flops"] <= budget
    # the stopped trials' workers were given back (the trials after them could start, and
    # nothing is held now): their placement groups do not outlive them
    _assert_cpus_given_back(ray_module)


@pytest.mark.slow
def test_successive_halving_pauses_at_the_rung_and_resumes_from_its_checkpoint(
    tmp_path, tiny_llama_dir, tiny_mixes, ray_module
):
    from solar_ray.train.session import FINAL_MARKER
    from solar_ray.tune.sweep import run_sweep

    # three trials on two CPUs, rungs at steps 2, 3 and 4 (reduction factor 1.5): step 2
    # keeps int(3 / 1.5) = 2, the two good ones (never the planted diverging one). Whatever
    # the order they arrive in, at most one of them is the last arrival that cuts the rung,
    # so at least one good trial waits there paused and is resumed. Step 3 keeps one.
    # Steps of ~0.5 s (8 x 64 tokens), so that a paused trial does not train far past its rung
    raw = tiny_sweep(
        str(tiny_llama_dir),
        tiny_mixes,
        search=PLANTED_BAD,
        train={"steps": 6, "micro_batch_size": 8, "eval_every": 1, "log_every": 1},
        scheduler={"kind": "sha", "grace_period_steps": 2, "reduction_factor": 1.5},
    )
    cfg = SweepConfig.model_validate(raw)
    out = tmp_path / "sw"
    result = run_sweep(cfg, out, echo=lambda s: None)
    rows = {r["trial"]: r for r in result.rows}
    best = result.best["trial"]
    good = ("solar-m01", "solar-m02")
    assert best in good
    assert rows[best]["status"] == "done" and rows[best]["steps"] == 6
    assert rows["bad"]["status"] == "stopped" and rows["bad"]["steps"] <= 4  # cut at step 2
    other = next(n for n in good if n != best)
    assert rows[other]["status"] == "stopped" and 3 <= rows[other]["steps"] < 6
    # the trials that waited were started again and continued from a rung's checkpoint
    # (their training state says which step they resumed from), not from scratch
    trials = out / "trials" / experiment_name(cfg)
    runs = out / "ray_train"
    resumed = [n for n in good if _attempts(trials / n).count("train") >= 2]
    assert resumed, "no trial waited at a rung"
    for name in resumed:
        run = runs / f"{experiment_name(cfg)}-{name}"
        if name == best:
            state = json.loads((run / "final" / FINAL_MARKER).read_text())
        else:
            last = sorted(run.glob("step_*"))[-1]
            state = read_run_state(last)
        assert state["resumed_from"] and set(state["resumed_from"]) <= {2, 3, 4}
        assert _attempts(trials / name).count("train") == 1 + len(state["resumed_from"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_stopped_early"] == 2
    assert summary["steps_spent"] < summary["steps_full_grid"] == 3 * 6
    assert rows["base"]["status"] == "done" and rows["base"]["steps"] == 6  # never waits
    _assert_cpus_given_back(ray_module)


@pytest.mark.slow
def test_successive_halving_over_a_flops_budget_against_the_base_model(
    tmp_path, tiny_llama_dir, tiny_mixes, ray_module
):
    """m = 0 (8 layers) and m = 1 (6) against the base (4) at equal FLOPs: each trial's steps
    follow from its depth, the rungs are FLOPs, the base's held-out loss before training is
    measured, and the report has every comparison with its error."""
    import csv

    from solar_ray.tune.sweep import run_sweep

    # 1.4e9 FLOPs = 5 steps of m=0 (277,659,648 a step), 6 of m=1 (208,257,024) and 10 of
    # the base (138,854,400); rungs at 1/4 and 1/2 of it, reports every step
    raw = tiny_sweep(
        str(tiny_llama_dir),
        tiny_mixes,
        search={"m": [0, 1]},
        budget={"flops": 1.4e9},
        train={"eval_every": 1, "log_every": 1},
        scheduler={"kind": "sha", "grace_period_fraction": 0.25, "reduction_factor": 2},
    )
    cfg = SweepConfig.model_validate(raw)
    out = tmp_path / "sw"
    result = run_sweep(cfg, out, echo=lambda s: None)
    rows = {r["trial"]: r for r in result.rows}
    assert [rows[t]["max_steps"] for t in ("solar-m00", "solar-m01", "base")] == [5, 6, 10]
    budgets = json.loads((out / "trials" / experiment_name(cfg) / "budgets.json").read_text())
    # the first report at or past 3.5e8 and 7e8 FLOPs: steps 2 and 3 of m=0, 2 and 4 of m=1
    assert budgets["solar-m00"]["rung_steps"] == [2, 3]
    assert budgets["solar-m01"]["rung_steps"] == [2, 4]
    assert budgets["base"]["rung_steps"] == []  # the reference never waits at a rung
    # of two trials at the first rung one goes on; the base trains its whole budget, and its
    # curve starts before training (step 0)
    assert sorted(r["status"] for r in result.rows if not r["reference"]) == ["done", "stopped"]
    base = rows["base"]
    assert base["status"] == "done" and base["steps"] == 10 and base["curve"][0]["step"] == 0
    assert base["curve"][0]["tokens_seen"] == 0 and base["curve"][0]["eval_n"] == 4
    summary = json.loads((out / "summary.json").read_text())
    start = summary["analysis"]["base_start"]
    assert start["n"] == 4 and start["se"] > 0 and start["value"] > base["eval_loss"]
    best = rows[result.best["trial"]]
    assert math.isfinite(best["gain"]) and best["gain_se"] >= 0 and best["loss_eq_flops_n"] == 4
    assert best["recover"] is not None and best["eval_n"] == 4 and best["eval_loss_se"] > 0
    # the seam predictors of m = 0 and 1 were scored on the held-out rows before training
    seam = json.loads((out / "trials" / experiment_name(cfg) / "seam.json").read_text())
    assert [s["m"] for s in seam["scores"]] == [0, 1] and seam["num_sequences"] >= 2
    assert all(math.isfinite(rows[t]["seam_angular"]) for t in ("solar-m00", "solar-m01"))
    with open(result.files["results_csv"]) as f:
        table = list(csv.DictReader(f))
    assert {"budget_flops", "loss_eq_flops_se", "gain", "recover", "seam_bi"} <= set(table[0])
    assert [r["trial"] for r in table] == ["solar-m00", "solar-m01", "base"]
    for key in ("learning_curves", "metric_vs_choice"):
        assert result.files[key].stat().st_size > 1000
    assert "gain over base" in result.files["results_md"].read_text()
    _assert_cpus_given_back(ray_module)


RESUME_SCRIPT = textwrap.dedent(
    """
    import sys, ray
    from solar_ray.tune import load_sweep, run_sweep
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    run_sweep(load_sweep(sys.argv[1]), sys.argv[2], echo=print)
    """
)


def _attempts(trial_dir: Path) -> list[str]:
    path = trial_dir / "attempts.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["event"] for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_three_m_sweep_killed_and_rerun_resumes_and_writes_a_runnable_best_recipe(
    tmp_path, tiny_llama_dir, tiny_mixes, ray_module
):
    """One sweep over m in {1, 2, 3} covers three checks: its driver is killed once two
    trials finished and the third is starting; the rerun finishes only the third; the
    3-row table and a best.yaml that `solar-ray run --dry-run` accepts come out."""
    from solar_ray.cli import main as cli_main
    from solar_ray.tune.sweep import run_sweep

    # the base model comes from a pre-stage, so best.yaml carries the stage and its reference
    raw = tiny_sweep(
        "@tiny",
        tiny_mixes,
        max_concurrent_trials=2,
        stages={"tiny": {"kind": "model", "source": str(tiny_llama_dir)}},
    )
    recipe = tmp_path / "sweep.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    out = tmp_path / "sw"
    cfg = load_sweep(recipe)
    trials = out / "trials" / experiment_name(cfg)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, "-c", RESUME_SCRIPT, str(recipe), str(out)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 400
        while not (
            (trials / "solar-m01" / "result.json").is_file()
            and (trials / "solar-m02" / "result.json").is_file()
            and _attempts(trials / "solar-m03")
        ):
            assert proc.poll() is None, "the sweep ended before it could be interrupted"
            assert time.monotonic() < deadline, "the sweep never got to its third trial"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
        proc.wait()
    assert not (trials / "solar-m03" / "result.json").is_file(), "killed too late"

    result = run_sweep(cfg, out, echo=lambda s: None)
    # the finished trials were not trained again; the interrupted one was
    assert [_attempts(trials / f"solar-m0{m}").count("train") for m in (1, 2, 3)] == [1, 1, 2]

    assert result.rows[-1]["trial"] == "base" and result.rows[-1]["status"] == "done"
    rows = result.rows[:-1]
    assert [r["m"] for r in rows] == [1, 2, 3]
    assert all(r["status"] == "done" and r["steps"] == 4 and not r["stopped_early"] for r in rows)
    assert all(math.isfinite(r["eval_loss"]) and r["eval_loss"] > 0 for r in rows)
    # DUS of the 4-layer model: s = 2(n - m); more layers, more FLOPs for the same tokens
    assert [r["num_layers"] for r in rows] == [6, 4, 2]
    assert rows[0]["flops"] > rows[1]["flops"] > rows[2]["flops"]
    with open(result.files["results_csv"]) as f:
        assert len(f.read().strip().splitlines()) == 1 + 4
    assert "| solar-m02 |" in result.files["results_md"].read_text()
    for key in ("learning_curves", "metric_vs_choice"):
        assert result.files[key].stat().st_size > 1000
    # the upscales are cached by (source, method, m): one each, the rerun made none
    assert len(list((out / "upscales").iterdir())) == 3

    best = result.best
    assert best["eval_loss"] == min(r["eval_loss"] for r in rows)
    export = Path(best["model_path"])
    assert json.loads((export / "config.json").read_text())["num_hidden_layers"] == 2 * (
        4 - best["m"]
    )
    recipe = yaml.safe_load(result.files["best_yaml"].read_text())
    assert recipe["stages"]["tiny"] == {"kind": "model", "source": str(tiny_llama_dir)}
    assert recipe["stages"]["upscaled"] == {
        "kind": "upscale",
        "source": "@tiny",
        "method": "solar",
        "m": best["m"],
    }
    assert recipe["stages"]["cpt"]["model"] == "@upscaled"
    assert (
        cli_main(
            ["run", str(result.files["best_yaml"]), "--dry-run", "--out", str(tmp_path / "full")]
        )
        == 0
    )


@pytest.mark.slow
def test_sft_mix_sweep_scores_every_mix_on_one_yardstick_with_its_error(
    tmp_path, tiny_llama_dir, smollm2_tokenizer, ray_module
):
    """Two SFT mixes, both scored on a held-out yardstick neither trains on: every score has
    n and SE, each mix is compared with the best (paired over the yardstick's rows), and
    best.yaml is the SFT run on the best mix. No base-model reference: nothing is upscaled."""
    from stage_io import arithmetic_pairs, write_sft_mix

    from solar_ray.tune.sweep import run_sweep

    pairs = [(q, a) for q, a, _ in arithmetic_pairs(40, seed=3)]
    data = {
        "a": write_sft_mix(tmp_path / "a", smollm2_tokenizer, pairs[:16]),
        "b": write_sft_mix(tmp_path / "b", smollm2_tokenizer, [(q, "I am not sure.") for q, _ in pairs[16:32]]),
        "yardstick": write_sft_mix(tmp_path / "y", smollm2_tokenizer, pairs[32:]),
    }
    mixes = {n: data[n] for n in "ab"}
    cfg = SweepConfig.model_validate(
        sft_mix_sweep("mix", tiny_llama_dir, mixes, data["yardstick"], steps=4, eval_every=3)
    )
    result = run_sweep(cfg, tmp_path / "sw", echo=lambda s: None)
    rows = {r["trial"]: r for r in result.rows}
    assert sorted(rows) == ["mix-a", "mix-b"]  # no reference without an upscale
    for r in rows.values():
        assert r["status"] == "done" and r["eval_n"] == 8 and r["eval_loss_se"] > 0
        assert [p["step"] for p in r["curve"]] == [3, 4]  # held-out at step 3 and the end
        assert len(r["curve"][-1]["eval_row_nll"]) == 8
    best = rows[result.best["trial"]]
    assert best["vs_best"] == 0
    other = rows["mix-b" if best["trial"] == "mix-a" else "mix-a"]
    assert other["vs_best"] > 0 and other["vs_best_se"] > 0  # behind the best, with its error
    assert "vs best" in result.files["results_md"].read_text()
    recipe = yaml.safe_load(result.files["best_yaml"].read_text())
    assert recipe["stages"]["cpt"]["data"] == str(data[best["mix"]])
    assert result.files["learning_curves"].stat().st_size > 1000
    _assert_cpus_given_back(ray_module)
