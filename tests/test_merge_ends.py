"""Merging at the ends: weights (1, 0) and SLERP t=0/1 give an input's exact bytes (-0.0 and
inf included), native SLERP against mergekit's, and mergekit runs without a tokenizer."""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model
from safetensors.torch import load_file, save_file
from stage_io import model_weights

from solar_ray.cli import main

#: the tensor that gets the planted -0.0 / inf entries
PLANTED = "model.layers.0.mlp.down_proj.weight"


def _assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name].view(-1).view(torch.uint8), b[name].view(-1).view(torch.uint8)), name


def _tiny(out: Path, seed: int) -> Path:
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return save_tiny_model(cfg, out, seed=seed)


def _planted(src: Path, out: Path, values: dict[int, float]) -> Path:
    """A copy of ``src`` with ``PLANTED[flat index] = value`` for each entry of ``values``."""
    shutil.copytree(src, out)
    (f,) = out.glob("*.safetensors")
    state = load_file(f)
    flat = state[PLANTED].view(-1)
    for i, v in values.items():
        flat[i] = v
    save_file(state, f, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """(a, b): random tiny models; a holds -0.0 entries, b an inf and a -inf."""
    root = tmp_path_factory.mktemp("ends")
    a = _planted(_tiny(root / "a0", 0), root / "a", {0: -0.0, 5: -0.0})
    b = _planted(_tiny(root / "b0", 1), root / "b", {0: float("inf"), 7: float("-inf")})
    return a, b


def _cli_merge(tmp_path: Path, capsys, *args: str) -> dict[str, torch.Tensor]:
    out = tmp_path / "out"
    assert main(["merge", *args, "--out", str(out)]) == 0, capsys.readouterr().err
    return model_weights(out)


@pytest.mark.parametrize("normalize", [[], ["--no-normalize"]])
def test_linear_weight_1_gives_the_first_model_bytes_despite_an_inf_at_weight_0(tmp_path, models, capsys, normalize):
    a, b = models
    merged = _cli_merge(tmp_path, capsys, "--models", str(a), str(b), "--weights", "1", "0", *normalize)
    assert torch.signbit(merged[PLANTED].view(-1)[0])  # -0.0 kept, not turned into 0.0
    assert not any(t.isnan().any() for t in merged.values())  # 0 * inf never computed
    _assert_bitwise(merged, model_weights(a))


def test_linear_weight_1_on_the_model_with_inf_gives_its_bytes(tmp_path, models, capsys):
    a, b = models
    merged = _cli_merge(tmp_path, capsys, "--models", str(a), str(b), "--weights", "0", "2")
    assert merged[PLANTED].view(-1)[0] == float("inf")
    _assert_bitwise(merged, model_weights(b))


@pytest.mark.parametrize("t", ["0", "1"])
def test_slerp_ends_give_an_input_bytes_with_inf_and_negative_zero(tmp_path, models, capsys, t):
    """An inf makes the angle undefined; the ends still reproduce their input exactly."""
    a, b = models
    merged = _cli_merge(tmp_path, capsys, "--models", str(a), str(b), "--method", "slerp", "--t", t)
    _assert_bitwise(merged, model_weights(a if t == "0" else b))


# --------------------------------------------------------------------------- against mergekit


def _mergekit_slerp(out: Path, a: Path, b: Path, t: float) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mergekit_run_merge
    from mergekit.options import MergeOptions

    spec = {
        "merge_method": "slerp", "base_model": str(a),
        "models": [{"model": str(a)}, {"model": str(b)}],
        "parameters": {"t": t}, "dtype": "float32",
    }  # fmt: skip
    mergekit_run_merge(
        MergeConfiguration.model_validate(spec), str(out), MergeOptions(copy_tokenizer=False, quiet=True)
    )
    return model_weights(out)


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[Path, Path]:
    """Two random tiny models without planted values (mergekit's SLERP adds ``0 * b``)."""
    root = tmp_path_factory.mktemp("clean")
    return _tiny(root / "a", 0), _tiny(root / "b", 1)


@pytest.mark.parametrize("t", [0.0, 1.0])
def test_slerp_ends_equal_mergekit_bitwise(tmp_path, clean, capsys, t):
    a, b = clean
    ours = _cli_merge(tmp_path, capsys, "--models", str(a), str(b), "--method", "slerp", "--t", str(t))
    _assert_bitwise(ours, _mergekit_slerp(tmp_path / "mk", a, b, t))


def test_slerp_near_parallel_fallback_equals_mergekit_to_2_ulp(tmp_path, clean, capsys):
    """b = 1.001 a + 1% noise: every tensor and every row has cos theta near 0.99995, above
    the 0.9995 threshold, so both take the linear branch, ``0.7 a + 0.3 b``. mergekit works per row with
    float32 coefficients and rounds the two products separately; the results agree to
    2 float32 ulps of the terms' magnitude. The spherical formula would move them by far more."""
    a, _ = clean
    b = tmp_path / "b"
    shutil.copytree(a, b)
    (f,) = b.glob("*.safetensors")
    gen = torch.Generator().manual_seed(0)
    state = {k: v * 1.001 + 0.01 * v.std() * torch.randn(v.shape, generator=gen) for k, v in load_file(f).items()}
    save_file(state, f, metadata={"format": "pt"})
    ours = _cli_merge(tmp_path, capsys, "--models", str(a), str(b), "--method", "slerp", "--t", "0.3")
    reference = _mergekit_slerp(tmp_path / "mk", a, b, 0.3)
    wa, wb = model_weights(a), model_weights(b)
    for name, m in ours.items():
        # both round each term: the bound scales with the terms, not with their sum
        terms = 0.7 * wa[name].abs() + 0.3 * wb[name].abs()
        assert ((m - reference[name]).abs() <= 2 * torch.finfo(torch.float32).eps * terms).all(), name
        lerp = 0.7 * wa[name].double() + 0.3 * wb[name].double()
        torch.testing.assert_close(m.double(), lerp, rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------- tokenizer


def test_mergekit_method_without_tokenizer_logs_one_note_and_no_traceback(tmp_path, clean, capsys, caplog):
    a, b = clean
    c = _tiny(tmp_path / "c", 2)
    caplog.set_level(logging.INFO)
    argv = ["merge", "--method", "ties", "--base-model", str(a), "--models", str(b), str(c),
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    notes = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("no tokenizer files" in n and str(a) in n for n in notes), notes
    assert "Traceback" not in capsys.readouterr().err
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"- `{b}`\n- `{c}`\n\nBase model: `{a}` (merge computed by mergekit).\n" in card


# --------------------------------------------------------------------------- coefficients by hand


def test_slerp_coefficients_at_hand_worked_angles():
    """Orthogonal vectors (theta = pi/2) at t = 1/3: (sin(pi/3), sin(pi/6)); theta = pi/3 at
    t = 1/2: both 1/sqrt(3). At and past the 0.9995 threshold, non-finite: linear."""
    from solar_ray.merge import slerp_coefficients

    ca, cb = slerp_coefficients(1 / 3, 0.0)
    assert math.isclose(ca, math.sqrt(3) / 2, rel_tol=1e-12) and math.isclose(cb, 0.5, rel_tol=1e-12)
    ca, cb = slerp_coefficients(0.5, 0.5)
    assert math.isclose(ca, 1 / math.sqrt(3), rel_tol=1e-12) and math.isclose(cb, 1 / math.sqrt(3), rel_tol=1e-12)
    ca, cb = slerp_coefficients(0.5, -0.5)  # theta = 2 pi / 3: sin(pi/3) / sin(2 pi/3) = 1
    assert math.isclose(ca, 1.0, rel_tol=1e-12) and math.isclose(cb, 1.0, rel_tol=1e-12)
    # just below the threshold the spherical formula runs and differs from linear
    theta = math.acos(0.9994)
    ca, _ = slerp_coefficients(0.3, 0.9994)
    assert math.isclose(ca, math.sin(0.7 * theta) / math.sin(theta), rel_tol=1e-12) and ca != 0.7
    theta = math.acos(0.9995)
    assert math.isclose(slerp_coefficients(0.3, 0.9995)[0], math.sin(0.7 * theta) / math.sin(theta), rel_tol=1e-12)
    for dot in (0.99951, -0.99951, 1.0, -1.0, float("inf"), float("-inf"), float("nan")):
        assert slerp_coefficients(0.3, dot) == (0.7, 0.3), dot


def test_linear_coefficients_by_hand():
    from solar_ray.merge import linear_coefficients

    assert linear_coefficients(None, 4, True) == [0.25] * 4
    assert linear_coefficients(None, 2, False) == [1.0, 1.0]
    assert linear_coefficients([1.0, 3.0], 2, True) == [0.25, 0.75]
    assert linear_coefficients([1.0, 3.0], 2, False) == [1.0, 3.0]


# --------------------------------------------------------------------------- a zero tensor, the card


def test_slerp_with_a_zero_tensor_interpolates_linearly(tmp_path, clean, capsys):
    """A zero vector has no direction: ``0.7 * 0 + 0.3 b``, exactly ``0.3 b`` in float32."""
    a, b = clean
    zero = tmp_path / "zero"
    shutil.copytree(a, zero)
    (f,) = zero.glob("*.safetensors")
    state = load_file(f)
    state[PLANTED] = torch.zeros_like(state[PLANTED])
    save_file(state, f, metadata={"format": "pt"})
    merged = _cli_merge(tmp_path, capsys, "--models", str(zero), str(b), "--method", "slerp", "--t", "0.3")
    wb = model_weights(b)
    assert torch.equal(merged[PLANTED], torch.zeros_like(wb[PLANTED]).add_(wb[PLANTED], alpha=0.3))


def test_card_manifest_and_message_say_what_was_merged(tmp_path, clean, capsys):
    import json

    a, b = clean
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["merge", "--models", str(a), str(b), "--weights", "3", "1", "--out", str(out)]) == 0
    num_tensors = len(model_weights(a))
    assert capsys.readouterr().out.strip() == f"merged 2 models (linear, {num_tensors} tensors) -> {out}"
    card = (out / "README.md").read_text()
    assert f"# Merge of 2 models (linear)\n\nMade by `solar-ray merge` with method `linear` from:\n\n- `{a}` (weight 0.75)\n- `{b}` (weight 0.25)\n" in card
    manifest = json.loads((out / "solar.json").read_text())
    assert manifest["weights"] == [0.75, 0.25] and manifest["t"] is None
    assert manifest["num_tensors"] == num_tensors and manifest["base_model"] is None
    assert [(p["source"], p["role"]) for p in manifest["parents"]] == [(str(a), "model"), (str(b), "model")]

    out = tmp_path / "slerp"
    assert main(["merge", "--models", str(a), str(b), "--method", "slerp", "--t", "0.25", "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert f"- `{a}` (t = 0)\n- `{b}` (t = 1)\n\nSLERP factor t = 0.25." in card
    manifest = json.loads((out / "solar.json").read_text())
    assert manifest["t"] == 0.25 and manifest["weights"] is None and manifest["method"] == "slerp"
