"""The pipeline runner on model-only stages (no Ray): graph, skip, rerun, failure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import save_tiny_model
from transformers import MistralConfig

from solar_ray import pipeline
from solar_ray.cli import main as cli_main
from solar_ray.config import ConfigError
from solar_ray.pipeline import PipelineError, Recipe, plan_recipe, run_recipe


@pytest.fixture
def tiny_src(tmp_path) -> Path:
    cfg = MistralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
    )
    return save_tiny_model(cfg, tmp_path / "src")


def recipe(src: Path) -> Recipe:
    return Recipe(
        name="g",
        stages={
            "up": {"kind": "upscale", "source": str(src), "m": 1},
            "up2": {"kind": "upscale", "source": "@up", "method": "stack", "repeat": 2},
            "other": {"kind": "upscale", "source": str(src), "method": "llama-pro", "expand_every": 2},
        },
    )


def test_plan_orders_by_dependencies(tmp_path, tiny_src):
    plans = plan_recipe(recipe(tiny_src), tmp_path / "run")
    names = [p.name for p in plans]
    assert names.index("up") < names.index("up2")
    up2 = next(p for p in plans if p.name == "up2")
    assert up2.deps == ["up"] and up2.data["source"] == str(tmp_path / "run" / "up")
    assert up2.config().out == str(tmp_path / "run" / "up2")


@pytest.mark.parametrize(
    ("stages", "expect"),
    [
        ({"a": {"kind": "upscale", "source": "@b", "m": 1}}, "unknown stage '@b'"),
        ({"a": {"kind": "upscale", "source": "@b", "m": 1},
          "b": {"kind": "upscale", "source": "@a", "m": 1}}, "cycle"),
        ({"a": {"kind": "nope"}}, r"stages\.a\.kind: unknown kind"),
        ({"a": {"source": "x"}}, r"stages\.a\.kind: field required"),
        ({"a": {"kind": "upscale", "source": "x"}}, r"stages\.a.*m is required"),
        ({"a": {"kind": "upscale", "source": "x", "m": 1, "mm": 2}}, r"stages\.a.*mm: unknown field"),
    ],
)
def test_bad_recipes_name_the_stage(tmp_path, stages, expect):
    with pytest.raises(ConfigError, match=expect):
        plan_recipe(Recipe(name="bad", stages=stages), tmp_path)


def test_skip_rerun_and_failure(tmp_path, tiny_src, monkeypatch):
    run_dir = tmp_path / "run"
    r = recipe(tiny_src)
    first = run_recipe(r, run_dir, echo=lambda s: None)
    assert sorted(first.ran) == ["other", "up", "up2"] and first.skipped == []
    assert json.loads((run_dir / "up2" / "solar.json").read_text())["plan"] == list(range(6)) * 2

    second = run_recipe(r, run_dir, echo=lambda s: None)
    assert second.ran == [] and sorted(second.skipped) == ["other", "up", "up2"]

    # deleting one stage's output reruns it and its dependents only
    import shutil

    shutil.rmtree(run_dir / "up")
    third = run_recipe(r, run_dir, echo=lambda s: None)
    assert third.ran == ["up", "up2"] and third.skipped == ["other"]

    # a changed config reruns that stage and its dependents
    r.stages["up"]["m"] = 2
    fourth = run_recipe(r, run_dir, echo=lambda s: None)
    assert fourth.ran == ["up", "up2"]

    # an injected failure in up2: up stays finished and reusable; the rerun continues there
    r.stages["up"]["m"] = 0
    real = pipeline.run_stage

    def failing(plan, key):
        if plan.name == "up2":
            raise RuntimeError("injected")
        return real(plan, key)

    monkeypatch.setattr(pipeline, "run_stage", failing)
    with pytest.raises(PipelineError, match="stage 'up2' failed: RuntimeError: injected") as exc:
        run_recipe(r, run_dir, echo=lambda s: None)
    assert exc.value.stage == "up2"
    assert (run_dir / "up" / "solar.json").is_file()
    assert not (run_dir / ".pipeline" / "up2.json").exists()
    monkeypatch.setattr(pipeline, "run_stage", real)
    fifth = run_recipe(r, run_dir, echo=lambda s: None)
    assert fifth.ran == ["up2"] and sorted(fifth.skipped) == ["other", "up"]


def test_cli_dry_run_prints_plan(tmp_path, tiny_src, capsys):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(tiny_src).to_dict()))
    assert cli_main(["run", str(path), "--out", str(tmp_path / "run"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "up2" in out and "after: up" in out and not (tmp_path / "run").exists()
    # --set reaches the stage config, and its errors name the stage's field
    assert cli_main(["run", str(path), "--dry-run", "--set", "stages.up.m=-3"]) == 2
    assert "stages.up" in capsys.readouterr().err
