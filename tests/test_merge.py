"""Merging: the math (bitwise ends, averages, SLERP), the format, refusals, mergekit methods."""

from __future__ import annotations

import json
import math
import re
import shutil
from importlib import metadata
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model
from safetensors.torch import load_file, save_file
from stage_io import model_weights

from solar_ray.checkpoint import read_manifest
from solar_ray.config import ConfigError, load_config
from solar_ray.merge import TOKENIZER_FILES, MergeConfig, MergeError, run_merge, slerp_coefficients


def _assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        # compare the raw bits: equal values with different bits (-0.0 vs 0.0) must fail
        assert torch.equal(a[name].view(-1).view(torch.uint8), b[name].view(-1).view(torch.uint8)), name


def _variant(src: Path, out: Path, seed: int, tokenizer, **changes) -> Path:
    """A model with ``src``'s config (plus ``changes``), other random weights."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(src)
    for k, v in changes.items():
        setattr(cfg, k, v)
    return save_tiny_model(cfg, out, seed=seed, tokenizer=tokenizer)


def _to_bf16(src: Path, out: Path) -> Path:
    shutil.copytree(src, out)
    for f in out.glob("*.safetensors"):
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def model_a(tiny_llama_dir: Path) -> Path:
    return tiny_llama_dir


@pytest.fixture(scope="module")
def model_b(tmp_path_factory, tiny_llama_dir: Path, smollm2_tokenizer) -> Path:
    return _variant(tiny_llama_dir, tmp_path_factory.mktemp("b"), 1, smollm2_tokenizer)


@pytest.fixture(scope="module")
def model_c(tmp_path_factory, tiny_llama_dir: Path, smollm2_tokenizer) -> Path:
    return _variant(tiny_llama_dir, tmp_path_factory.mktemp("c"), 2, smollm2_tokenizer)


def _merge(tmp_path: Path, **kw) -> Path:
    out = tmp_path / "merged"
    run_merge(MergeConfig(out=str(out), **kw))
    return out


# --------------------------------------------------------------------------- math


def test_linear_weights_1_0_reproduce_first_model_bitwise(tmp_path, model_a, model_b):
    out = _merge(tmp_path, models=[str(model_a), str(model_b)], weights=[1.0, 0.0])
    _assert_bitwise(model_weights(out), model_weights(model_a))


def test_linear_weights_0_1_bf16_reproduce_second_model_bitwise(tmp_path, model_a, model_b):
    a16, b16 = _to_bf16(model_a, tmp_path / "a16"), _to_bf16(model_b, tmp_path / "b16")
    out = _merge(tmp_path, models=[str(a16), str(b16)], weights=[0, 3])  # normalized to (0, 1)
    merged = model_weights(out)
    assert next(iter(merged.values())).dtype == torch.bfloat16
    _assert_bitwise(merged, model_weights(b16))


def test_linear_average_of_three_is_the_weighted_mean(tmp_path, model_a, model_b, model_c):
    out = _merge(
        tmp_path,
        models=[str(model_a), str(model_b), str(model_c)],
        weights=[0.5, 0.3, 0.2],
        chunk_mb=1,  # the 49152x64 embedding spans several chunks
    )
    wa, wb, wc, wm = (model_weights(d) for d in (model_a, model_b, model_c, out))
    for name, m in wm.items():
        expected = 0.5 * wa[name].double() + 0.3 * wb[name].double() + 0.2 * wc[name].double()
        torch.testing.assert_close(m.double(), expected, rtol=1e-6, atol=1e-7)
    # a tensor that really differs between the inputs moved
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(wm[name], wa[name])


def test_chunking_does_not_change_a_linear_merge(tmp_path, model_a, model_b):
    whole = _merge(tmp_path / "whole", models=[str(model_a), str(model_b)], weights=[0.4, 0.6])
    chunked = _merge(
        tmp_path / "chunked", models=[str(model_a), str(model_b)], weights=[0.4, 0.6], chunk_mb=1
    )
    _assert_bitwise(model_weights(whole), model_weights(chunked))


@pytest.mark.parametrize("t", [0.0, 1.0])
def test_slerp_ends_reproduce_the_inputs_bitwise(tmp_path, model_a, model_b, t):
    out = _merge(tmp_path, models=[str(model_a), str(model_b)], method="slerp", t=t)
    _assert_bitwise(model_weights(out), model_weights(model_a if t == 0 else model_b))


def test_slerp_midpoint_matches_reference_formula(tmp_path, model_a, model_b):
    out = _merge(tmp_path, models=[str(model_a), str(model_b)], method="slerp", t=0.3, chunk_mb=1)
    wa, wb, wm = model_weights(model_a), model_weights(model_b), model_weights(out)
    checked = 0
    for name, m in wm.items():
        a, b = wa[name].double().flatten(), wb[name].double().flatten()
        cos = float(a @ b / (a.norm() * b.norm()))
        if abs(cos) > 0.9995:  # collinear (e.g. identical norm weights): lerp
            expected = 0.7 * a + 0.3 * b
        else:
            theta = math.acos(cos)
            expected = (math.sin(0.7 * theta) * a + math.sin(0.3 * theta) * b) / math.sin(theta)
            checked += 1
        torch.testing.assert_close(m.double().flatten(), expected, rtol=1e-5, atol=1e-6)
    assert checked > 10  # the spherical branch really ran
    # SLERP of two (nearly) orthogonal random vectors of similar norm keeps the norm; LERP shrinks it
    name = "model.layers.0.mlp.up_proj.weight"
    assert wm[name].norm() > 0.95 * min(wa[name].norm(), wb[name].norm())


def test_slerp_coefficients_ends_are_exact():
    for dot in (-0.9, 0.0, 0.3, 0.99999):
        assert slerp_coefficients(0.0, dot) == (1.0, 0.0)
        assert slerp_coefficients(1.0, dot) == (0.0, 1.0)


# --------------------------------------------------------------------------- format


def test_output_is_the_project_model_format(tmp_path, model_a, model_b):
    from transformers import AutoModelForCausalLM

    out = _merge(
        tmp_path, models=[str(model_a), str(model_b)], weights=[0.6, 0.4], max_shard_size_mb=1
    )
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in names
    assert len([n for n in names if n.endswith(".safetensors")]) > 1
    for f in ("config.json", "tokenizer.json", "generation_config.json", "README.md", "solar.json"):
        assert f in names
    assert not list(tmp_path.glob(".merged.tmp-*"))
    manifest = read_manifest(out)
    assert manifest["stage"] == "merge"
    assert manifest["method"] == "linear"
    assert manifest["weights"] == [0.6, 0.4]
    assert [len(p["sha256"]) for p in manifest["parents"]] == [64, 64]
    assert manifest["parents"][0]["source"] == str(model_a)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    merged = model_weights(out)
    assert set(index["weight_map"]) == set(model_weights(model_a))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(model(ids).logits).all()


def test_failed_merge_leaves_nothing(tmp_path, model_a, model_b, monkeypatch):
    import solar_ray.merge as merge_mod

    calls = {"n": 0}
    real = merge_mod._combine_into

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(merge_mod, "_combine_into", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        _merge(tmp_path, models=[str(model_a), str(model_b)])
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- refusals


def test_different_tensor_names_are_refused(tmp_path, model_a, smollm2_tokenizer):
    fewer = _variant(model_a, tmp_path / "three", 1, smollm2_tokenizer, num_hidden_layers=3)
    with pytest.raises(MergeError, match=r"'model\.layers\.3\.[\w.]+' is in .* but not in"):
        _merge(tmp_path, models=[str(model_a), str(fewer)])
    assert not (tmp_path / "merged").exists()


def test_different_shapes_are_refused_naming_the_tensor(tmp_path, model_a, smollm2_tokenizer):
    wide = _variant(model_a, tmp_path / "wide", 1, smollm2_tokenizer, intermediate_size=96)
    with pytest.raises(MergeError, match=r"shapes differ: 'model\.layers\.0\.mlp\.\w+\.weight' is \[\d+, \d+\]"):
        _merge(tmp_path, models=[str(model_a), str(wide)])


def test_different_tokenizers_are_refused_naming_the_token(tmp_path, model_a, smollm2_tokenizer):
    other = tmp_path / "other_tok"
    shutil.copytree(model_a, other)
    tok = type(smollm2_tokenizer).from_pretrained(model_a)
    tok.add_tokens(["<planted-token>"])
    tok.save_pretrained(other)
    with pytest.raises(MergeError, match=r"token id \d+ is '<absent>' in .* but '<planted-token>'"):
        _merge(tmp_path, models=[str(model_a), str(other)])


def test_different_special_tokens_are_refused_naming_them(tmp_path, model_a, smollm2_tokenizer):
    """The same vocabulary with another end-of-sequence token is another tokenizer."""
    other = tmp_path / "other_eos"
    shutil.copytree(model_a, other)
    tok = type(smollm2_tokenizer).from_pretrained(model_a, eos_token="<|endoftext|>")
    tok.save_pretrained(other)
    eos = type(smollm2_tokenizer).from_pretrained(model_a).eos_token
    assert eos != "<|endoftext|>"
    with pytest.raises(MergeError) as info:
        _merge(tmp_path, models=[str(model_a), str(other)])
    assert str(info.value) == f"tokenizers differ: eos_token is {eos!r} in {model_a} but '<|endoftext|>' in {other}"


def test_identical_tokenizer_files_are_not_loaded_and_unloadable_ones_are_named(tmp_path, model_a, model_b):
    """Byte-identical tokenizer files agree without loading them; files that differ are
    loaded, and one that cannot be is named."""
    a, b = tmp_path / "a", tmp_path / "b"
    for src, dst in ((model_a, a), (model_b, b)):
        shutil.copytree(src, dst)
        for f in TOKENIZER_FILES:
            (dst / f).unlink(missing_ok=True)
        (dst / "tokenizer.json").write_text("{}")
    out = _merge(tmp_path / "same", models=[str(a), str(b)])
    assert (out / "tokenizer.json").read_text() == "{}"
    (b / "tokenizer.json").write_text('{"version": "1.0"}')
    with pytest.raises(MergeError, match=rf"^{re.escape(str(a))}: cannot load the tokenizer \("):
        _merge(tmp_path / "differ", models=[str(a), str(b)])


def test_cli_refusal_exits_2_with_the_mismatch(tmp_path, model_a, smollm2_tokenizer, capsys):
    from solar_ray.cli import main

    wide = _variant(model_a, tmp_path / "wide", 1, smollm2_tokenizer, intermediate_size=96)
    capsys.readouterr()
    rc = main(["merge", "--models", str(model_a), str(wide), "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "model.layers.0.mlp." in err and "shapes differ" in err
    assert err.startswith("solar-ray merge: error: tensor shapes differ")
    assert len(err.strip().splitlines()) == 1


def test_cli_slerp_runs(tmp_path, model_a, model_b, capsys):
    from solar_ray.cli import main

    out = tmp_path / "m"
    rc = main(["merge", "--models", str(model_a), str(model_b), "--method", "slerp", "--t", "1", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    _assert_bitwise(model_weights(out), model_weights(model_b))
    assert read_manifest(out)["t"] == 1.0


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"models": ["a", "b", "c"], "method": "slerp"}, "slerp interpolates exactly two"),
        ({"models": ["a", "b"], "weights": [1.0]}, "one weight per model"),
        ({"models": ["a", "b"], "weights": [1.0, -1.0]}, "sum to 0"),
        ({"models": ["a", "b"], "method": "ties"}, "base_model is required"),
        ({"models": ["a"]}, "at least two models"),
        ({"models": ["a", "b"], "t": 1.5}, "t:"),
        ({"models": ["a", "b"], "method": "slerp", "normalize": False}, "normalize: method 'slerp'"),
        ({"models": ["a", "b"], "method": "model_stock", "base_model": "c", "normalize": True},
         "normalize: method 'model_stock'"),
    ],
)
def test_config_errors_name_the_field(data, field):
    with pytest.raises(ConfigError, match=field):
        load_config(MergeConfig, data=data)


# --------------------------------------------------------------------------- mergekit


def _mergekit(out: Path, spec: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """mergekit itself, run on a YAML written by hand: the reference for a delegated merge."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mergekit_run_merge
    from mergekit.options import MergeOptions

    mergekit_run_merge(
        MergeConfiguration.model_validate(spec), str(out),
        MergeOptions(random_seed=seed, copy_tokenizer=False, quiet=True),
    )  # fmt: skip
    return model_weights(out)


#: (method, our CLI flags after the models, the mergekit YAML's per-model parameters, its
#: global parameters, dtype, seed): each delegated method, each merge option in use, and
#: each method with no option at all against a YAML that gives none (mergekit's defaults:
#: density 1.0, normalize true for ties only)
MERGEKIT_CASES = {
    "ties": (
        "ties",
        ["--weights", "0.7", "0.3", "--density", "0.5"],
        [{"weight": 0.7, "density": 0.5}, {"weight": 0.3, "density": 0.5}],
        {"normalize": True}, "float32", 0,
    ),
    "dare_ties": (
        "dare_ties",
        ["--density", "0.6", "--normalize", "--seed", "7"],
        [{"weight": 1.0, "density": 0.6}, {"weight": 1.0, "density": 0.6}],
        {"normalize": True}, "float32", 7,
    ),
    "dare_linear": (
        "dare_linear",
        ["--weights", "0.5", "0.25", "--density", "0.4", "--no-normalize", "--seed", "3"],
        [{"weight": 0.5, "density": 0.4}, {"weight": 0.25, "density": 0.4}],
        {"normalize": False}, "float32", 3,
    ),
    "task_arithmetic": (
        "task_arithmetic",
        ["--weights", "0.6", "0.9", "--no-normalize", "--out-dtype", "bfloat16"],
        [{"weight": 0.6}, {"weight": 0.9}],
        {"normalize": False}, "bfloat16", 0,
    ),
    "model_stock": ("model_stock", [], [None, None], None, "float32", 0),
    **{
        f"{method}-defaults": (method, [], [{"weight": 1.0}] * 2, None, "float32", 0)
        for method in ("ties", "dare_ties", "dare_linear", "task_arithmetic")
    },
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MERGEKIT_CASES))
def test_delegated_method_equals_mergekit_tensor_for_tensor(tmp_path, model_a, model_b, model_c, case, capsys):
    """``solar-ray merge --method M --base-model ...`` is mergekit's merge of the same YAML,
    bit for bit (the same seed where the method drops deltas at random)."""
    from transformers import AutoModelForCausalLM

    from solar_ray.cli import main

    method, flags, params, global_params, dtype, seed = MERGEKIT_CASES[case]
    out = tmp_path / "ours"
    argv = ["merge", "--models", str(model_b), str(model_c), "--base-model", str(model_a),
            "--method", method, *flags, "--out", str(out)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    spec = {
        "merge_method": method,
        "base_model": str(model_a),
        "models": [
            {"model": str(m), **({"parameters": p} if p else {})}
            for m, p in zip((model_b, model_c), params, strict=True)
        ],
        "dtype": dtype,
        **({"parameters": global_params} if global_params else {}),
    }
    reference = _mergekit(tmp_path / "mergekit", spec, seed)
    merged, base = model_weights(out), model_weights(model_a)
    _assert_bitwise(merged, reference)
    name = "model.layers.1.mlp.down_proj.weight"
    assert merged[name].dtype == getattr(torch, dtype)
    assert not torch.equal(merged[name].float(), base[name].float())  # the merge did something

    manifest = read_manifest(out)
    assert manifest["stage"] == "merge" and manifest["method"] == method
    assert [p["role"] for p in manifest["parents"]] == ["base", "model", "model"]
    assert manifest["mergekit_version"] == metadata.version("mergekit")
    assert manifest["versions"]["torch"] == metadata.version("torch")
    assert (out / "tokenizer.json").is_file() and (out / "README.md").is_file()
    AutoModelForCausalLM.from_pretrained(out)


def test_cli_linear_weights_unnormalized_in_bfloat16(tmp_path, model_a, model_b, capsys):
    """``--weights 0.5 0.25 --no-normalize --out-dtype bfloat16``: 0.5 a + 0.25 b (no division
    by 0.75), rounded once to bf16. Powers of two make the float32 sum exact before the cast."""
    from solar_ray.cli import main

    out = tmp_path / "m"
    argv = ["merge", "--models", str(model_a), str(model_b), "--weights", "0.5", "0.25",
            "--no-normalize", "--out-dtype", "bfloat16", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    wa, wb = model_weights(model_a), model_weights(model_b)
    expected = {k: (0.5 * wa[k].float() + 0.25 * wb[k].float()).to(torch.bfloat16) for k in wa}
    _assert_bitwise(model_weights(out), expected)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert read_manifest(out)["weights"] == [0.5, 0.25]
