"""Publishing to the Hub: what is uploaded, from where the token comes, what is refused.
``HfApi``'s network calls are replaced by a local stub (no network here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from solar_ray.cli import main
from solar_ray.config import ConfigError, validate
from solar_ray.pipeline import Recipe, plan_recipe, run_recipe


@pytest.fixture
def hub(monkeypatch) -> list[dict]:
    """Every create_repo / upload_folder call, with the files the upload would send."""
    from huggingface_hub import HfApi

    calls: list[dict] = []

    def create_repo(self, repo_id, **kw):
        calls.append({"call": "create_repo", "repo_id": repo_id, **kw, "token": self.token})

    def upload_folder(self, *, folder_path, repo_id, **kw):
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        calls.append({"call": "upload_folder", "repo_id": repo_id, "files": files, **kw, "token": self.token})
        return type("Commit", (), {"commit_url": f"https://hf.co/{repo_id}/commit/1"})()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def _recipe(src: Path, **push) -> Recipe:
    return Recipe(
        name="hubtest",
        stages={"up": {"kind": "upscale", "source": str(src), "m": 1,
                       "push_to_hub": {"repo_id": "me/tiny-up", **push}}},
    )  # fmt: skip


def test_recipe_pushes_a_finished_stage_once(tmp_path, tiny_llama_dir, hub):
    run_dir = tmp_path / "run"
    run_recipe(_recipe(tiny_llama_dir, private=True), run_dir, echo=lambda _: None)
    create, upload = hub
    assert create == {"call": "create_repo", "repo_id": "me/tiny-up", "repo_type": "model",
                      "private": True, "exist_ok": True, "token": None}  # fmt: skip
    assert upload["repo_id"] == "me/tiny-up" and upload["token"] is None
    assert {"README.md", "solar.json", "config.json", "model.safetensors"} <= set(upload["files"])
    assert upload["ignore_patterns"] == [".*"]  # solar-ray's own hidden markers stay home
    # a re-run skips the finished stage and does not push the same output again
    run_recipe(_recipe(tiny_llama_dir, private=True), run_dir, echo=lambda _: None)
    assert len(hub) == 2


def test_push_command_uploads_a_finished_model(tmp_path, tiny_llama_dir, hub, capsys):
    from solar_ray.upscale import UpscaleConfig, run_upscale

    out = tmp_path / "up"
    run_upscale(UpscaleConfig(source=str(tiny_llama_dir), m=1, out=str(out)))
    assert main(["push", str(out), "me/tiny"]) == 0
    assert [c["call"] for c in hub] == ["create_repo", "upload_folder"]
    assert hub[0]["private"] is False and "solar.json" in hub[1]["files"]
    # not a finished output, or a bad repository id: exit 2 and one line
    assert main(["push", str(tiny_llama_dir), "me/tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a finished solar-ray model" in err
    assert main(["push", str(out), "not a repo"]) == 2
    assert "repo_id" in capsys.readouterr().err
    assert len(hub) == 2


def test_a_recipe_never_holds_a_token(tmp_path, tiny_llama_dir):
    with pytest.raises(ConfigError, match=r"stages.up.push_to_hub.token: a recipe never holds a token"):
        validate(
            Recipe, {"name": "x", "stages": {"up": {"kind": "upscale", "source": "s", "m": 1,
                                            "push_to_hub": {"repo_id": "a/b", "token": "hf_secret"}}}}
        )  # fmt: skip
    with pytest.raises(ConfigError, match="hf_token"):
        validate(Recipe, {"name": "x", "hf_token": "hf_secret", "stages": {}})
    stages = {"ev": {"kind": "eval", "model": "m", "push_to_hub": {"repo_id": "a/b"}}}
    with pytest.raises(ConfigError, match="stages.ev.push_to_hub: a eval stage makes no model"):
        plan_recipe(Recipe(name="x", stages=stages), tmp_path, validate_configs=False)
