"""Depth up-scaling: plans, the streaming writer, lineage, bad input, the real SmolLM2."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch
import yaml
from conftest import save_tiny_model
from stage_io import model_weights
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    MistralConfig,
    Qwen2Config,
)

from solar_ray.cli import main as cli_main
from solar_ray.upscale import (
    LayerSlot,
    UpscaleConfig,
    UpscaleError,
    plan_explicit,
    plan_from_mergekit,
    plan_llama_pro,
    plan_solar,
    plan_stack,
    run_upscale,
)

LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# --------------------------------------------------------------------------- tiny models

SMALL = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def mistral_config(n: int = 6) -> MistralConfig:
    return MistralConfig(num_hidden_layers=n, **SMALL)


def qwen2_config(n: int = 6) -> Qwen2Config:
    # tied embeddings + qkv bias; sliding window on the upper layers
    return Qwen2Config(
        num_hidden_layers=n,
        tie_word_embeddings=True,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=4,
        **SMALL,
    )


def gemma2_config(n: int = 6) -> Gemma2Config:
    return Gemma2Config(num_hidden_layers=n, head_dim=8, sliding_window=8, **SMALL)


CONFIGS = {"mistral": mistral_config, "qwen2": qwen2_config, "gemma2": gemma2_config}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny(request, tmp_path_factory) -> tuple[str, Path]:
    name = request.param
    out = tmp_path_factory.mktemp(f"tiny_{name}")
    return name, save_tiny_model(CONFIGS[name](), out, seed=1)


def logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[1, 5, 9, 17, 33, 2, 70, 11, 4, 90, 3, 8]])

# --------------------------------------------------------------------------- plans


def test_plan_solar_is_the_papers():
    plan = plan_solar(32, 8)
    assert len(plan) == 48
    assert [s.source for s in plan] == list(range(24)) + list(range(8, 32))
    # source layers 8..23 appear twice, the others once
    counts = {i: [s.source for s in plan].count(i) for i in range(32)}
    assert all(counts[i] == (2 if 8 <= i < 24 else 1) for i in range(32))
    assert plan_solar(30, 7)[-1] == LayerSlot(29) and len(plan_solar(30, 7)) == 46


@pytest.mark.parametrize("m", [-1, 32, 40])
def test_plan_solar_rejects_bad_m(m):
    with pytest.raises(UpscaleError, match="m"):
        plan_solar(32, m)


def test_plan_llama_pro_32_to_40():
    plan = plan_llama_pro(32, 4)
    assert len(plan) == 40
    identity = [j for j, s in enumerate(plan) if s.identity]
    assert identity == [4, 9, 14, 19, 24, 29, 34, 39]
    assert all(plan[j].source == plan[j - 1].source for j in identity)


def test_plan_stack_and_explicit():
    assert [s.source for s in plan_stack(3, 3)] == [0, 1, 2] * 3
    assert [s.source for s in plan_explicit(4, [0, 0, 3])] == [0, 0, 3]
    with pytest.raises(UpscaleError, match="outside"):
        plan_explicit(4, [0, 4])
    with pytest.raises(UpscaleError, match="empty"):
        plan_explicit(4, [])


def test_plan_from_mergekit_slices():
    spec = {
        "slices": [
            {"sources": [{"model": "m", "layer_range": [0, 24]}]},
            {"sources": [{"model": "m", "layer_range": [8, 32]}]},
        ],
        "merge_method": "passthrough",
        "dtype": "bfloat16",
    }
    model, layers = plan_from_mergekit(spec)
    assert model == "m" and layers == [s.source for s in plan_solar(32, 8)]
    spec["slices"][1]["sources"][0]["model"] = "other"
    with pytest.raises(UpscaleError, match="one model"):
        plan_from_mergekit(spec)


def test_config_requires_m_for_solar():
    from solar_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="m is required"):
        load_config(UpscaleConfig, data={"source": "x", "out": "y"})
    with pytest.raises(ConfigError, match="unknown field"):
        load_config(UpscaleConfig, data={"source": "x", "m": 1, "typo_field": 3})


# --------------------------------------------------------------------------- writer


def test_solar_output_is_bitwise_its_plan(tiny, tmp_path):
    arch, src = tiny
    res = run_upscale(UpscaleConfig(source=str(src), out=str(tmp_path / "up"), m=2))
    assert res.plan == [0, 1, 2, 3, 2, 3, 4, 5]
    out, base = model_weights(res.out), model_weights(src)
    num_layer_tensors = sum(1 for k in base if LAYER.match(k)) // 6
    assert len(out) == len(base) - 6 * num_layer_tensors + 8 * num_layer_tensors
    for name, t in out.items():
        mt = LAYER.match(name)
        src_name = f"model.layers.{res.plan[int(mt.group(1))]}.{mt.group(2)}" if mt else name
        ref = base[src_name]
        assert t.dtype == ref.dtype and t.shape == ref.shape
        assert torch.equal(t, ref), name
    cfg = json.loads((res.out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 8
    if arch == "gemma2":
        base_types = json.loads((src / "config.json").read_text())["layer_types"]
        assert cfg["layer_types"] == [base_types[i] for i in res.plan]
    if arch == "qwen2":
        assert "lm_head.weight" not in out  # tied embeddings stay tied
        assert any(k.endswith("q_proj.bias") for k in out)
    # loads with transformers unchanged; finite logits
    lg = logits(res.out, IDS)
    assert lg.shape == (1, IDS.shape[1], 96) and torch.isfinite(lg).all()
    manifest = json.loads((res.out / "solar.json").read_text())
    assert manifest["stage"] == "upscale" and manifest["method"] == "solar"
    assert manifest["m"] == 2 and manifest["plan"] == res.plan
    assert len(manifest["parents"][0]["sha256"]) == 64
    assert set(manifest["parents"][0]["files"]) == {"config.json", "model.safetensors"}
    for f in ("README.md", "generation_config.json", "config.json"):
        assert (res.out / f).is_file()


def test_qwen2_sliding_window_layers_follow_the_plan(tmp_path):
    src = save_tiny_model(qwen2_config(6), tmp_path / "q")
    base = json.loads((src / "config.json").read_text())
    res = run_upscale(UpscaleConfig(source=str(src), out=str(tmp_path / "up"), m=2))
    cfg = json.loads((res.out / "config.json").read_text())
    assert cfg["layer_types"] == [base["layer_types"][i] for i in res.plan]
    # transformers derives the same per-layer attention from the written config
    model = AutoModelForCausalLM.from_pretrained(res.out)
    assert model.config.layer_types == cfg["layer_types"]


def test_llama_pro_computes_the_base_function(tiny, tmp_path):
    _, src = tiny
    res = run_upscale(
        UpscaleConfig(source=str(src), out=str(tmp_path / "pro"), method="llama-pro", expand_every=2)
    )
    assert res.num_layers_out == 9
    assert res.manifest["identity_layers"] == [2, 5, 8]
    out = model_weights(res.out)
    assert not out["model.layers.2.self_attn.o_proj.weight"].any()
    assert not out["model.layers.2.mlp.down_proj.weight"].any()
    assert torch.equal(out["model.layers.2.mlp.up_proj.weight"], out["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(logits(res.out, IDS), logits(src, IDS))


def test_stack_and_sharded_output(tmp_path):
    src = save_tiny_model(mistral_config(3), tmp_path / "m")
    res = run_upscale(
        UpscaleConfig(
            source=str(src), out=str(tmp_path / "st"), method="stack", repeat=3, max_shard_size_mb=1
        )
    )
    assert res.plan == [0, 1, 2] * 3
    # tiny tensors (~25 KB a layer) under a 1 MiB cap: one shard; force several with a
    # bigger model below
    big = save_tiny_model(
        MistralConfig(num_hidden_layers=4, **{**SMALL, "hidden_size": 256, "intermediate_size": 512}),
        tmp_path / "big",
    )
    res = run_upscale(UpscaleConfig(source=str(big), out=str(tmp_path / "sh"), m=1, max_shard_size_mb=1))
    shards = sorted(res.out.glob("*.safetensors"))
    assert len(shards) > 1
    index = json.loads((res.out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in model_weights(res.out).values())
    # the sharded output itself is a valid source: upscale it again
    again = run_upscale(UpscaleConfig(source=str(res.out), out=str(tmp_path / "again"), m=0))
    assert again.plan == [0, 1, 2, 3, 4, 5] * 2
    assert torch.isfinite(logits(again.out, IDS)).all()


def test_solar_matches_mergekit_passthrough(tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    src = save_tiny_model(mistral_config(6), tmp_path / "m")
    mk_yaml = {
        "slices": [
            {"sources": [{"model": str(src), "layer_range": [0, 4]}]},
            {"sources": [{"model": str(src), "layer_range": [2, 6]}]},
        ],
        "merge_method": "passthrough",
        "dtype": "float32",
    }
    run_merge(
        MergeConfiguration.model_validate(mk_yaml),
        str(tmp_path / "mk"),
        MergeOptions(copy_tokenizer=False, lazy_unpickle=False, quiet=True),
    )
    ours = run_upscale(UpscaleConfig(source=str(src), out=str(tmp_path / "ours"), m=2))
    a, b = model_weights(ours.out), model_weights(tmp_path / "mk")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the same mergekit YAML runs through our CLI as an explicit plan
    (tmp_path / "mk.yaml").write_text(yaml.safe_dump(mk_yaml))
    assert cli_main(["upscale", "--config", str(tmp_path / "mk.yaml"), "--out", str(tmp_path / "c")]) == 0
    c = model_weights(tmp_path / "c")
    assert all(torch.equal(c[k], a[k]) for k in a)


# --------------------------------------------------------------------------- bad input


def _cli_fails(capsys, argv: list[str], out: Path, expect: str) -> None:
    capsys.readouterr()  # drop what fixtures printed
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert re.search(expect, err), err
    assert not out.exists()
    leftovers = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers


@pytest.fixture
def mistral_src(tmp_path) -> Path:
    return save_tiny_model(mistral_config(6), tmp_path / "src")


@pytest.mark.parametrize(("m", "expect"), [("-1", "m must be"), ("6", "m=6 must be smaller"), ("9", "m=9")])
def test_cli_rejects_bad_m(capsys, tmp_path, mistral_src, m, expect):
    out = tmp_path / "out"
    _cli_fails(capsys, ["upscale", "--source", str(mistral_src), "--out", str(out), "--m", m], out, expect)


def test_cli_rejects_truncated_safetensors(capsys, tmp_path, mistral_src):
    f = mistral_src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    out = tmp_path / "out"
    _cli_fails(capsys, ["upscale", "--source", str(mistral_src), "--out", str(out), "--m", "1"], out,
               r"model\.safetensors.*truncated")


def test_cli_rejects_corrupt_header(capsys, tmp_path, mistral_src):
    f = mistral_src / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[8:20] = b"garbage!!!!!"
    f.write_bytes(bytes(raw))
    out = tmp_path / "out"
    _cli_fails(capsys, ["upscale", "--source", str(mistral_src), "--out", str(out), "--m", "1"], out,
               r"model\.safetensors.*corrupt")


def test_cli_rejects_missing_tensor(capsys, tmp_path, mistral_src):
    from safetensors.torch import save_file

    tensors = model_weights(mistral_src)
    del tensors["model.layers.3.mlp.up_proj.weight"]
    save_file(tensors, mistral_src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    _cli_fails(capsys, ["upscale", "--source", str(mistral_src), "--out", str(out), "--m", "1"], out,
               r"missing tensor model\.layers\.3\.mlp\.up_proj\.weight")


def test_cli_rejects_unknown_architecture(capsys, tmp_path, mistral_src):
    cfg = json.loads((mistral_src / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (mistral_src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    _cli_fails(capsys, ["upscale", "--source", str(mistral_src), "--out", str(out), "--m", "1"], out,
               r"unsupported architecture.*mamba.*supported: gemma, gemma2, llama, mistral")


def test_cli_refuses_existing_output_unless_overwrite(capsys, tmp_path, mistral_src):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    argv = ["upscale", "--source", str(mistral_src), "--out", str(out), "--m", "1"]
    assert cli_main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").exists()
    # --overwrite replaces only what solar-ray wrote: a foreign directory is kept
    assert cli_main([*argv, "--overwrite"]) == 2
    assert "not a solar-ray output" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "x"
    (out / "keep.txt").unlink()
    assert cli_main(argv) == 0  # an empty directory is fine to write into
    assert json.loads((out / "solar.json").read_text())["m"] == 1
    assert cli_main([*argv[:-1], "2", "--overwrite"]) == 0  # its own output: replaced
    assert json.loads((out / "solar.json").read_text())["m"] == 2


def test_cli_set_overrides_yaml(tmp_path, mistral_src):
    (tmp_path / "up.yaml").write_text(yaml.safe_dump({"source": str(mistral_src), "m": 1, "out": str(tmp_path / "o")}))
    assert cli_main(["upscale", "--config", str(tmp_path / "up.yaml"), "--set", "m=3"]) == 0
    assert json.loads((tmp_path / "o" / "solar.json").read_text())["plan"] == [0, 1, 2, 3, 4, 5][:3] + [3, 4, 5]


def test_pickle_checkpoint_refused_then_converted(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SOLAR_RAY_CACHE", str(tmp_path / "cache"))
    src = save_tiny_model(mistral_config(2), tmp_path / "pkl")
    tensors = model_weights(src)
    (src / "model.safetensors").unlink()
    torch.save(tensors, src / "pytorch_model.bin")
    out = tmp_path / "out"
    _cli_fails(capsys, ["upscale", "--source", str(src), "--out", str(out), "--m", "0"], out,
               r"pickle checkpoint.*allow-pickle")
    assert cli_main(["upscale", "--source", str(src), "--out", str(out), "--m", "0", "--allow-pickle"]) == 0
    up = model_weights(out)
    assert torch.equal(up["model.layers.3.mlp.up_proj.weight"], tensors["model.layers.1.mlp.up_proj.weight"])


def test_missing_source_is_named(capsys, tmp_path):
    out = tmp_path / "out"
    _cli_fails(capsys, ["upscale", "--source", str(tmp_path / "nope"), "--out", str(out), "--m", "1"], out,
               "nope.*not found")


def test_offline_hub_id_is_named(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    _cli_fails(capsys, ["upscale", "--source", "no-such-org/no-such-model", "--out", str(out), "--m", "1"],
               out, "no-such-org/no-such-model")


def test_header_alignment_matches_safetensors(tmp_path, mistral_src):
    res = run_upscale(UpscaleConfig(source=str(mistral_src), out=str(tmp_path / "o"), m=1))
    raw = (res.out / "model.safetensors").read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    assert (8 + hlen) % 8 == 0


# --------------------------------------------------------------------------- the embedded model


@pytest.mark.slow
def test_smollm2_upscale_hurts_before_training(smollm2_dir, tmp_path):
    """DUS of the real SmolLM2-135M (30 -> 46 layers): held-out perplexity rises (paper)."""
    import pydoc_data.topics

    from transformers import AutoTokenizer

    res = run_upscale(UpscaleConfig(source="smollm2-135m", out=str(tmp_path / "up"), m=7))
    assert res.num_layers_in == 30 and res.num_layers_out == 46
    tok = AutoTokenizer.from_pretrained(res.out)
    text = pydoc_data.topics.topics["assert"] + pydoc_data.topics.topics["pass"]
    ids = tok(text, return_tensors="pt").input_ids[:, :256]

    def ppl(model_dir: Path) -> float:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            return float(torch.exp(model(ids, labels=ids).loss))

    base, up = ppl(smollm2_dir), ppl(res.out)
    assert 1 < base < 100, base  # the real model reads Python's docs well
    assert torch.isfinite(torch.tensor(up)) and up > base


def test_recorded_input_hash_is_reused_only_for_an_unchanged_file(tmp_path, monkeypatch):
    """The upscale's input hashes come from the record of an unchanged file; a file changed
    in place (same size, mtime set back) is read again, and the lineage stays exact."""
    import hashlib
    import os

    from solar_ray import identity

    monkeypatch.setenv("SOLAR_RAY_CACHE", str(tmp_path / "cache"))
    src = save_tiny_model(mistral_config(), tmp_path / "src")
    weights = src / "model.safetensors"
    reads = []
    real_sha256_file = identity.sha256_file
    monkeypatch.setattr(identity, "sha256_file", lambda p: reads.append(Path(p).name) or real_sha256_file(p))

    def parent_files(out: str) -> dict:
        res = run_upscale(UpscaleConfig(source=str(src), out=str(tmp_path / out), m=2))
        return json.loads((res.out / "solar.json").read_text())["parents"][0]["files"]

    first = parent_files("a")
    assert sorted(reads) == ["config.json", "model.safetensors"]
    assert first["model.safetensors"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    reads.clear()
    assert parent_files("b") == first and reads == []  # nothing read again

    # flip one byte of a tensor, keep the size and put the mtime back
    st = os.stat(weights)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    third = parent_files("c")
    assert reads == ["model.safetensors"]
    assert third["model.safetensors"] == hashlib.sha256(bytes(data)).hexdigest() != first["model.safetensors"]


def _data_offsets(model_dir: Path) -> dict[str, tuple[str, int, int]]:
    """tensor name -> (file name, absolute byte offset, size) from the shards' headers."""
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        raw = f.read_bytes()
        (hlen,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + hlen])
        header.pop("__metadata__", None)
        for name, info in header.items():
            start, end = info["data_offsets"]
            out[name] = (f.name, 8 + hlen + start, end - start)
    return out


def test_output_tensors_sit_at_their_sources_page_offsets(tmp_path):
    """The kernel copies fastest between equal page offsets (bench/results/dus.md): every
    page-sized tensor of a sharded source lands at its source's offset within a page, the
    output loads bitwise equal, and each output shard draws on one source file."""
    cfg = MistralConfig(num_hidden_layers=6, **{**SMALL, "hidden_size": 64, "intermediate_size": 128})
    src = tmp_path / "src"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(src, max_shard_size="60KB")
    src_files = sorted(src.glob("*.safetensors"))
    assert len(src_files) >= 4
    # the source headers put the shards' data sections at different page offsets
    starts = {8 + struct.unpack("<Q", f.read_bytes()[:8])[0] % 4096 for f in src_files}
    assert len(starts) > 1

    res = run_upscale(UpscaleConfig(source=str(src), out=str(tmp_path / "up"), m=2))
    assert res.plan == [0, 1, 2, 3, 2, 3, 4, 5]
    before, after = _data_offsets(src), _data_offsets(res.out)
    page_sized = 0
    files_of_shard: dict[str, set[str]] = {}
    for name, (file, at, size) in after.items():
        m = LAYER.match(name)
        src_name = f"model.layers.{res.plan[int(m[1])]}.{m[2]}" if m else name
        src_file, src_at, src_size = before[src_name]
        assert size == src_size
        files_of_shard.setdefault(file, set()).add(src_file)
        assert at % 8 == 0
        if size % 4096 == 0:
            page_sized += 1
            assert at % 4096 == src_at % 4096, name
    assert page_sized >= 40
    assert all(len(files) == 1 for files in files_of_shard.values())
    src_t, out_t = model_weights(src), model_weights(res.out)
    for name, t in out_t.items():
        m = LAYER.match(name)
        src_name = f"model.layers.{res.plan[int(m[1])]}.{m[2]}" if m else name
        assert torch.equal(t, src_t[src_name]), name
    index = json.loads((res.out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(out_t)
    _, info = AutoModelForCausalLM.from_pretrained(res.out, output_loading_info=True)
    assert not any(info.values()), info
