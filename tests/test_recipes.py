"""Every recipe in jobs/ loads and validates (torchtune's test_configs, litgpt's config hub).

Pipeline recipes (with ``stages``) are planned with every stage config validated; sweep
recipes with the sweep loader; single-stage configs with their stage's config class, chosen
by the file name's prefix. A new kind of file in jobs/ without a loader fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from solar_ray.config import load_config

JOBS = sorted((Path(__file__).resolve().parents[1] / "jobs").glob("*.yaml"))


def _stage_class(name: str):
    from solar_ray.data.config import DataConfig
    from solar_ray.train.config import DPOConfig, PretrainConfig, SFTConfig
    from solar_ray.upscale import UpscaleConfig

    prefixes = {"data-": DataConfig, "pretrain-": PretrainConfig, "sft-": SFTConfig,
                "dpo-": DPOConfig, "upscale-": UpscaleConfig}  # fmt: skip
    for prefix, cls in prefixes.items():
        if name.startswith(prefix):
            return cls
    return None


def test_the_promised_recipes_exist():
    names = {p.name for p in JOBS}
    assert {"tiny.yaml", "demo.yaml", "solar-10.7b.yaml", "sweep-m.yaml"} <= names


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_recipe_validates(path, tmp_path):
    data = yaml.safe_load(path.read_text())
    if path.name.startswith("sweep-"):
        from solar_ray.tune import load_sweep

        load_sweep(path)
    elif "stages" in data:
        from solar_ray.pipeline import load_recipe, plan_recipe

        plans = plan_recipe(load_recipe(path), tmp_path / "run")
        assert plans, path
    else:
        cls = _stage_class(path.name)
        assert cls is not None, f"no loader for {path.name}: name it <stage>-*.yaml"
        load_config(cls, path)


def test_demo_dry_run_prints_the_plan_and_runs_nothing(tmp_path, capsys):
    """``solar-ray demo --dry-run``: jobs/demo.yaml's stages in order with their kinds, every
    stage to run, nothing written and no Ray started."""
    import re

    import ray

    from solar_ray.cli import main

    out = tmp_path / "demo"
    capsys.readouterr()
    assert main(["demo", "--dry-run", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"run directory: {out}"
    plan = [re.match(r"^\s*(\d+)\. (\S+)\s+(\S+)\s+after: (.*?)\s+(run|done \(skip\))$", line)
            for line in printed[1:]]  # fmt: skip
    assert all(plan), printed
    assert [(m[2], m[3], m[5]) for m in plan] == [
        ("corpus", "corpus", "run"), ("base", "model", "run"), ("upscaled", "upscale", "run"),
        ("data", "data", "run"), ("cpt", "pretrain", "run"), ("sft_v1", "sft", "run"),
        ("sft_v4", "sft", "run"), ("sft_merged", "merge", "run"), ("dpo", "dpo", "run"),
        ("final", "merge", "run"), ("eval", "eval", "run"),
    ]  # fmt: skip
    deps = {m[2]: m[4].strip() for m in plan}
    assert deps["upscaled"] == "base" and deps["final"] == "dpo, sft_merged"  # sorted
    assert not out.exists() and not ray.is_initialized()
