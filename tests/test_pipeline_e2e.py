"""jobs/tiny.yaml end to end on local Ray (CPU): every stage, skip, partial rerun, failure."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from tiny_recipe import ALL, KINDS, MODEL_STAGES, SMALLER

from solar_ray import pipeline
from solar_ray.pipeline import PipelineError, load_recipe, run_recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One full run of the tiny recipe, shared by the tests below (it is the slow part)."""
    import ray

    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    recipe = load_recipe(REPO / "jobs" / "tiny.yaml", list(SMALLER))
    result = run_recipe(recipe, run_dir, echo=lambda s: None)
    yield recipe, run_dir, result
    ray.shutdown()


@pytest.mark.slow
def test_every_stage_runs_and_reports(tiny_run):
    recipe, run_dir, result = tiny_run
    assert sorted(result.ran) == sorted(ALL) and result.skipped == []
    for stage in MODEL_STAGES:
        manifest = json.loads((run_dir / stage / "solar.json").read_text())
        assert manifest["stage"] == KINDS[stage], stage
    plan = json.loads((run_dir / "upscaled" / "solar.json").read_text())["plan"]
    assert plan == [0, 1, 2, 1, 2, 3]
    report = json.loads((run_dir / "report" / "results.json").read_text())
    rows = {r["name"]: r for r in report["models"]}
    assert set(rows) == {
        "base",
        "upscaled",
        "cpt",
        "sft_v1",
        "sft_v2",
        "sft_merged",
        "dpo",
        "final",
    }
    assert rows["base"]["stage"] == "base" and rows["cpt"]["stage"] == "pretrain"
    assert rows["final"]["stage"] == "merge" and rows["dpo"]["stage"] == "dpo"
    for r in rows.values():
        assert r["scores"] and all(0.0 <= v <= 1.0 for v in r["scores"].values())
        assert math.isfinite(r["ppl"]) and r["ppl_low"] < r["ppl"] < r["ppl_high"]
        # every score with its item count and standard error (real items, offline)
        assert set(r["scores"]) == {"arc_easy", "hellaswag", "piqa"} == set(r["num_items"])
        assert all(n == 4 for n in r["num_items"].values()) and all(se is not None for se in r["stderr"].values())
    table = (run_dir / "report" / "results.md").read_text()
    assert "| Model | Avg | ARC-E | HellaSwag | PIQA | PPL |" in table and "| n |  | 4 | 4 | 4 |" in table
    assert "| upscaled − base |" in table and "| final − base |" in table and "Resolution:" in table
    html = (run_dir / "report" / "index.html").read_text()
    assert "<th>Difference</th>" in html and "± " in html
    # continued pretraining recovers from the upscale: held-out perplexity goes down
    assert rows["cpt"]["ppl"] < rows["upscaled"]["ppl"]
    # the stages table: every stage with its kind; every plot shown, and a real picture
    for stage, kind in KINDS.items():
        assert f"<tr><td>{stage}</td><td>{kind}</td>" in html, stage
    for name in ("plan_upscaled.png", "training_curves.png", "perplexity.png", "evaluation.png"):
        assert f'<img src="{name}"' in html, name
        _assert_plot(run_dir / "report" / name)


def _assert_plot(path: Path) -> None:
    """A PNG of a real figure: its signature, a plausible size, more than one colour."""
    import matplotlib.image
    import numpy as np

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path.name
    pixels = matplotlib.image.imread(path)
    height, width = pixels.shape[:2]
    assert width >= 400 and height >= 250, (path.name, width, height)
    colours = np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)
    assert len(colours) > 16, path.name  # axes, labels and lines, not a blank canvas


@pytest.mark.slow
def test_contamination_stage_scores_the_final_model(tiny_run):
    _, run_dir, _ = tiny_run
    report = json.loads((run_dir / "contamination" / "contamination.json").read_text())
    entry = report["sets"]["arc_easy"]
    assert entry["num_items"] == len(entry["items"]) == 8
    for item in entry["items"]:
        assert math.isfinite(item["model"]) and math.isfinite(item["reference"])
        assert item["diff"] == pytest.approx(item["model"] - item["reference"])
    assert report["model"].endswith("/final") and report["reference"].endswith("/sft_merged")
    # Python-docs answers and arithmetic share no 13-gram with ARC-Easy's science questions
    assert report["train"]["num_texts"] > 0 and report["train"]["num_texts_overlapping"] == 0
    assert entry["ngram"]["num_checked"] > 0 and entry["ngram"]["contaminated"] == []


@pytest.mark.slow
# This test deletes and remakes a stage of the shared run, so it stays the module's last
# (a copy of the run directory is no cheaper: stage keys name their inputs' absolute paths,
# so a moved run directory is rerun in full). It leaves the run whole again when it passes.
def test_second_run_skips_and_deleted_stage_reruns_with_dependents(tiny_run, monkeypatch):
    recipe, run_dir, _ = tiny_run
    again = run_recipe(recipe, run_dir, echo=lambda s: None)
    assert again.ran == [] and sorted(again.skipped) == sorted(ALL)

    # an injected failure in `final` after deleting it: earlier stages stay finished
    shutil.rmtree(run_dir / "final")
    real = pipeline.run_stage

    def failing(plan, key):
        if plan.name == "final":
            raise RuntimeError("injected failure")
        return real(plan, key)

    monkeypatch.setattr(pipeline, "run_stage", failing)
    with pytest.raises(PipelineError, match="stage 'final' failed"):
        run_recipe(recipe, run_dir, echo=lambda s: None)
    assert (run_dir / "dpo" / "solar.json").is_file() and not (run_dir / "final").exists()

    # the rerun continues from the failed stage: final and its dependents (eval and the
    # contamination check of the final model), nothing else
    monkeypatch.setattr(pipeline, "run_stage", real)
    rerun = run_recipe(recipe, run_dir, echo=lambda s: None)
    assert rerun.ran == ["final", "eval", "contamination"]
    assert sorted(rerun.skipped) == sorted(set(ALL) - {"final", "eval", "contamination"})
