"""``solar-ray merge`` on bad inputs: broken GGUF files, pickle checkpoints, config keys it
does not know. Each is exit 2 with one line naming the problem, and nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model
from stage_io import model_weights

from solar_ray.cli import main
from solar_ray.models import find_embedded_gguf


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Conversions (GGUF, pickle) land in this test's cache, not the shared one."""
    monkeypatch.setenv("SOLAR_RAY_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return save_tiny_model(cfg, tmp_path_factory.mktemp("tiny"), seed=0)


def _refused(tmp_path: Path, capsys, *argv: str) -> str:
    """Run ``solar-ray merge ARGV --out OUT``; check the refusal; return its one line."""
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(["merge", *argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("solar-ray merge: error: "), err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert not out.exists()
    return err


def _truncated_gguf(path: Path) -> None:
    with open(find_embedded_gguf(), "rb") as f:
        path.write_bytes(f.read(64 << 10))  # the magic and part of the metadata


@pytest.mark.parametrize(
    "make",
    [
        lambda p: p.write_bytes(b""),
        lambda p: p.write_bytes(b"this is not a model\n" * 50),
        _truncated_gguf,
    ],
    ids=["empty", "garbage", "truncated"],
)
def test_broken_gguf_input_is_one_line_naming_the_file(tmp_path, tiny, capsys, make):
    bad = tmp_path / "model.gguf"
    make(bad)
    err = _refused(tmp_path, capsys, "--models", str(bad), str(tiny))
    assert str(bad) in err


def _pickle_dir(src: Path, out: Path, payload: bytes | None = None) -> Path:
    """``src``'s config with its weights as ``pytorch_model.bin`` (or ``payload`` bytes)."""
    out.mkdir()
    (out / "config.json").write_bytes((src / "config.json").read_bytes())
    if payload is None:
        torch.save(model_weights(src), out / "pytorch_model.bin")
    else:
        (out / "pytorch_model.bin").write_bytes(payload)
    return out


def test_pickle_input_is_refused_then_merged_with_allow_pickle(tmp_path, tiny, capsys):
    """The refusal names ``--allow-pickle``; merge accepts that flag and converts the file
    (weights (1, 0) then give the pickled tensors bit for bit)."""
    pickled = _pickle_dir(tiny, tmp_path / "pickled")
    err = _refused(tmp_path, capsys, "--models", str(pickled), str(tiny))
    assert "pytorch_model.bin" in err and "--allow-pickle" in err
    out = tmp_path / "out"
    argv = ["merge", "--models", str(pickled), str(tiny), "--weights", "1", "0", "--allow-pickle",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    merged, source = model_weights(out), model_weights(tiny)
    assert merged.keys() == source.keys()
    assert all(torch.equal(merged[k], source[k]) for k in source)


def test_garbage_pickle_under_allow_pickle_is_one_line_without_unsafe_advice(tmp_path, tiny, capsys):
    bad = _pickle_dir(tiny, tmp_path / "bad", payload=b"\x80\x04garbage" * 100)
    err = _refused(tmp_path, capsys, "--models", str(bad), str(tiny), "--allow-pickle")
    assert str(bad / "pytorch_model.bin") in err
    assert "weights_only=False" not in err


@pytest.mark.parametrize(
    ("text", "key"),
    [
        # a mergekit YAML, with a typo of merge_method: every key it has is named, none ignored
        ("merge_methd: ties\nbase_model: a\nmodels:\n  - model: b\n  - model: c\n", "merge_methd"),
        ("models: [a, b]\nmethod: ties\nbase_model: c\ndtpye: float32\n", "dtpye"),
        ("models: [a, b]\nbase_modle: c\n", "base_modle"),
        ("models: [a, b]\ntokenizer_source: base\n", "tokenizer_source"),
    ],
)
def test_config_file_with_an_unknown_key_is_refused_naming_it(tmp_path, capsys, text, key):
    cfg = tmp_path / "merge.yml"
    cfg.write_text(text)
    err = _refused(tmp_path, capsys, "--config", str(cfg))
    assert f"{key}: unknown field" in err


# --------------------------------------------------------------------------- the config


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"models": ["a", "b"], "method": "slerp", "weights": [1, 1]}, "weights: slerp takes t, not weights"),
        ({"models": ["a", "b"], "weights": [1.0, 2.0, 3.0]}, "weights: expected one weight per model (2), got 3"),
        ({"models": ["a", "b"], "base_model": "c"}, "base_model: method 'linear' does not use a base model"),
        ({"models": ["a", "b"], "method": "slerp", "base_model": "c"},
         "base_model: method 'slerp' does not use a base model"),
        ({"models": ["a", "b"], "density": 0.5}, "density: method 'linear' does not use density"),
        ({"models": ["a", "b"], "method": "model_stock", "base_model": "c", "density": 0.5},
         "density: method 'model_stock' does not use density"),
        ({"models": [], "method": "ties", "base_model": "c"}, "models: at least two models are needed, got 0"),
        ({"models": ["a"], "method": "slerp"}, "models: at least two models are needed, got 1"),
        ({"models": ["a", "b"], "method": "dare_linear"}, "base_model is required for method 'dare_linear'"),
    ],
)  # fmt: skip
def test_config_refusal_is_one_sentence(data, problem):
    from solar_ray.config import ConfigError, load_config
    from solar_ray.merge import MergeConfig

    with pytest.raises(ConfigError) as info:
        load_config(MergeConfig, data=data)
    assert str(info.value).splitlines()[-1].strip() == problem


@pytest.mark.parametrize(
    "data",
    [
        {"models": ["a"], "method": "ties", "base_model": "c"},  # one model against its base
        {"models": ["a", "b"], "weights": [1.0, -1.0], "normalize": False},  # a difference
        {"models": ["a", "b"], "method": "dare_ties", "base_model": "c", "density": 0.5},
        {"models": ["a", "b"], "method": "ties", "base_model": "c", "density": 1.0},
    ],
)
def test_config_accepted(data):
    from solar_ray.config import load_config
    from solar_ray.merge import MergeConfig

    cfg = load_config(MergeConfig, data=data)
    assert cfg.models == data["models"]


# --------------------------------------------------------------------------- models that differ


def _with(src: Path, out: Path, config: dict | None = None, tensors: dict | None = None, drop: str = "") -> Path:
    """A copy of ``src`` with ``config`` fields changed, ``tensors`` added and ``drop`` removed."""
    import json
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(src, out)
    if config:
        (out / "config.json").write_text(json.dumps({**json.loads((out / "config.json").read_text()), **config}))
    if tensors or drop:
        state = model_weights(out)
        state.pop(drop, None)
        save_file({**state, **(tensors or {})}, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_inputs_that_differ_are_refused_naming_the_difference(tmp_path, tiny, capsys):
    extra = _with(tiny, tmp_path / "extra", tensors={"model.extra": torch.zeros(2)})
    err = _refused(tmp_path, capsys, "--models", str(tiny), str(extra))
    assert f"tensor names differ: 'model.extra' is in {extra} but not in {tiny}" in err
    err = _refused(tmp_path, capsys, "--models", str(extra), str(tiny))
    assert f"tensor names differ: 'model.extra' is in {extra} but not in {tiny}" in err

    gelu = _with(tiny, tmp_path / "gelu", config={"hidden_act": "gelu"})
    err = _refused(tmp_path, capsys, "--models", str(tiny), str(gelu))
    assert f"config.json differs: hidden_act is 'silu' in {tiny} but 'gelu' in {gelu}" in err

    ints = _with(tiny, tmp_path / "ints", tensors={"model.extra": torch.zeros(2, dtype=torch.int64)})
    err = _refused(tmp_path, capsys, "--models", str(extra), str(ints))
    assert f"tensor dtypes differ: 'model.extra' is F32 in {extra} but I64 in {ints}" in err

    toks = _with(tiny, tmp_path / "toks")
    (toks / "tokenizer.json").write_text("{}")
    err = _refused(tmp_path, capsys, "--models", str(tiny), str(toks))
    assert f"tokenizers differ: {toks} has tokenizer files but {tiny} has none" in err
    err = _refused(tmp_path, capsys, "--models", str(toks), str(tiny))
    assert f"tokenizers differ: {toks} has tokenizer files but {tiny} has none" in err


def test_integer_tensors_are_kept_when_equal_and_refused_when_not(tmp_path, tiny, capsys):
    steps = torch.tensor([3, -1, 7], dtype=torch.int64)
    a = _with(tiny, tmp_path / "a", tensors={"model.steps": steps})
    b = _with(tiny, tmp_path / "b", tensors={"model.steps": steps.clone()})
    c = _with(tiny, tmp_path / "c", tensors={"model.steps": torch.tensor([3, -1, 8])})
    out = tmp_path / "merged"
    assert main(["merge", "--models", str(a), str(b), "--weights", "0.3", "0.7", "--out", str(out)]) == 0
    merged = model_weights(out)
    assert merged["model.steps"].dtype == torch.int64 and torch.equal(merged["model.steps"], steps)
    err = _refused(tmp_path, capsys, "--models", str(a), str(b), str(c))
    assert "tensor 'model.steps' (I64) differs between models and is not a float tensor" in err
