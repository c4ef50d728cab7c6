"""``solar-ray merge`` on bad inputs: broken GGUF files, pickle checkpoints, config keys it
does not know. Each is exit 2 with one line naming the problem, and nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model

from solar_ray.cli import main
from solar_ray.models import find_embedded_gguf
from solar_ray.train.testing import model_weights


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
