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
