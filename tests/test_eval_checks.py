"""What ``solar-ray eval`` refuses before any work, and what it says about a broken model:
an empty task list, a stride past the window, ``NAME=PATH`` only for plain names, a dry
run that checks the models, texts and output, and NaN weights marked in the results."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from solar_ray.config import ConfigError, load_config
from solar_ray.evaluate import EvalConfig


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_an_empty_task_list_is_refused(tmp_path, capsys):
    from solar_ray.cli import main

    out = tmp_path / "out"
    for extra in ([], ["--dry-run"]):
        assert main(["eval", "--models", str(tmp_path), "--suite", ",", "--out", str(out), *extra]) == 2
        assert "suite: no task names given" in _one_error(capsys)
    assert not out.exists()


def test_a_stride_past_the_window_is_refused():
    with pytest.raises(ConfigError, match="ppl_stride: 65 is more than the window"):
        load_config(EvalConfig, data={"models": ["/x"], "ppl_seq_len": 64, "ppl_stride": 65})
    assert load_config(EvalConfig, data={"models": ["/x"], "ppl_seq_len": 64, "ppl_stride": 64}).ppl_stride == 64


def test_name_equals_path_splits_only_a_plain_name(tmp_path):
    odd = tmp_path / "run=1"
    odd.mkdir()
    cfg = EvalConfig(models=[str(odd), "base=/m/a", "./a=b", "tuned=" + str(odd)])
    assert [(m.name, m.path) for m in cfg.models] == [
        ("run=1", str(odd)),  # an existing path is a path, whatever it holds
        ("base", "/m/a"),
        ("a=b", "./a=b"),  # "./a" is not a plain name
        ("tuned", str(odd)),
    ]


def test_dry_run_checks_models_texts_and_output(tmp_path, tiny_llama_dir, capsys):
    from solar_ray.cli import main

    base = ["eval", "--suite", "piqa", "--dry-run"]
    missing = tmp_path / "nowhere"
    assert main([*base, "--models", str(missing)]) == 2
    assert str(missing) in _one_error(capsys)
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama_dir / name, bare / name)
    assert main([*base, "--models", str(bare)]) == 2
    assert "has no tokenizer" in _one_error(capsys)
    assert main([*base, "--models", str(tiny_llama_dir), "--ppl-data", str(missing)]) == 2
    assert "text data not found" in _one_error(capsys)
    assert main([*base, "--models", str(tiny_llama_dir), "--out", str(tiny_llama_dir / "res")]) == 2
    assert "lies inside the input" in _one_error(capsys)
    assert main([*base, "--models", f"tiny={tiny_llama_dir}", "org/hub-model"]) == 0
    out = capsys.readouterr().out
    assert f"model tiny: {tiny_llama_dir}\n" in out and "org/hub-model (hub or remote: not fetched)" in out


def test_nan_weights_are_marked_in_the_results(tmp_path, tiny_llama_dir, caplog):
    import torch
    from safetensors.torch import load_file, save_file

    from solar_ray.evaluate import run_eval

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    weights = load_file(broken / "model.safetensors")
    name = next(k for k in sorted(weights) if k.endswith("mlp.down_proj.weight"))
    weights[name][0, 0] = torch.nan
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    cfg = EvalConfig(models=[f"ok={tiny_llama_dir}", f"broken={broken}"], suite="none",
                     ppl_data=["A short held-out text to score, with a few words."],
                     hash_models=False, out=str(tmp_path / "out"))  # fmt: skip
    results = run_eval(cfg)
    marks = {m["name"]: m["nonfinite_weights"] for m in results["models"]}
    assert marks == {"ok": [], "broken": [name]}
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["models"][1]["nonfinite_weights"] == [name]
    table = (tmp_path / "out" / "results.md").read_text()
    assert "WARNING: broken has NaN or infinite weights in 1 tensors" in table and "WARNING: ok" not in table
    assert any("broken: 1 weight tensors hold NaN" in r.getMessage() for r in caplog.records)


def test_perplexity_stride_is_clamped_to_a_shorter_model_window_and_said(tmp_path, tiny_llama_dir, caplog):
    from solar_ray.evaluate import run_eval

    small = tmp_path / "small"
    shutil.copytree(tiny_llama_dir, small)
    config = json.loads((small / "config.json").read_text())
    config["max_position_embeddings"] = 16
    (small / "config.json").write_text(json.dumps(config))
    text = " ".join(f"word{i}" for i in range(40))
    cfg = EvalConfig(models=[str(small)], suite="none", ppl_data=[text], ppl_seq_len=64,
                     ppl_stride=32, hash_models=False)  # fmt: skip
    result = run_eval(cfg)["models"][0]
    assert any("ppl_stride 32 is more than its 16-token window" in r.getMessage() for r in caplog.records)
    assert result["ppl_tokens"] == sum(n for _, n in result["ppl_windows"])
    assert Path(small).is_dir()
