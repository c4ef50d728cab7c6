"""Never lose a user's files, never crash on bad input (issue 14), one test per class.

Every refusal: exit 2, exactly one line on stderr naming the problem, no traceback, and the
user's input trees unchanged (hashed before and after). The crash, signal and memory-bound
cases run in subprocesses (``test_safety_crash.py``); the property-based test of the
loaders is ``test_safety_fuzz.py``.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import struct
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import flock_held
from safetensors import safe_open
from safety_helpers import assert_refused, siblings, tiny_model

from solar_ray import checkpoint
from solar_ray.checkpoint import atomic_output_dir, is_solar_output
from solar_ray.cli import main as cli_main
from solar_ray.errors import UserError


@pytest.fixture
def src(tmp_path) -> Path:
    return tiny_model(tmp_path / "src")


def upscale(src: Path, out: Path, *extra: str) -> list[str]:
    return ["upscale", "--source", str(src), "--out", str(out), "--m", "1", *extra]


def solar_plan(out: Path) -> list[int]:
    return json.loads((out / "solar.json").read_text())["plan"]


# --------------------------------------------------------------------------- 1. overwrite


def test_overwrite_keeps_a_directory_solar_ray_did_not_write(capsys, tmp_path, src):
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    (user / ".hidden").write_text("x")
    assert_refused(capsys, upscale(src, user, "--overwrite"), r"out: .*/user is not a solar-ray output",
                   [user, src])  # fmt: skip
    # its own output is replaced; an empty directory may be written into
    out = tmp_path / "out"
    out.mkdir()
    assert cli_main(upscale(src, out)) == 0
    assert cli_main([*upscale(src, out, "--overwrite")[:-2], "2", "--overwrite"]) == 0
    assert solar_plan(out) == [0, 1, 2, 3][:2] + [2, 3]
    assert siblings(out) == []


@pytest.mark.parametrize("where", ["is", "contains", "lies inside", "via a symlink"])
def test_out_is_never_an_input(capsys, tmp_path, src, where):
    (tmp_path / "alias").symlink_to(src)
    out = {
        "is": src,
        "contains": tmp_path,
        "lies inside": src / "sub",
        "via a symlink": tmp_path / "alias" / "sub",
    }[where]
    expect = {"via a symlink": "lies inside"}.get(where, where)
    # a solar-ray output as source: overwrite would otherwise be allowed to replace it
    assert cli_main(upscale(src, tmp_path / "made")) == 0
    made = tmp_path / "made"
    assert_refused(capsys, upscale(src, out, "--overwrite"), rf"out: .* {expect} the input",
                   [src, made])  # fmt: skip
    if where == "is":
        assert_refused(capsys, upscale(made, made, "--overwrite"), "is the input", [made])


def test_merge_and_contamination_never_write_over_their_inputs(capsys, tmp_path, src):
    other = tiny_model(tmp_path / "other", seed=1)
    assert_refused(
        capsys, ["merge", "--models", str(src), str(other), "--out", str(other), "--overwrite"],
        "is the input", [src, other],
    )  # fmt: skip
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("one two three four five six seven eight nine ten\n")
    assert_refused(
        capsys,
        ["contamination", "--train", str(texts), "--eval-sets", str(texts / "a.txt"),
         "--out", str(texts / "report")],
        "lies inside the input", [texts],
    )  # fmt: skip


def test_a_data_mix_is_never_written_over_or_into_its_sources(tmp_path):
    from solar_ray.data.config import MixConfig
    from solar_ray.data.mix import build_mix

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text('{"text": "one"}\n')
    mix = MixConfig(name="m", kind="pretrain", sources=[{"path": str(data)}])
    for out, how in ((data / "m", "lies inside"), (tmp_path, "contains")):
        with pytest.raises(UserError, match=f"{how} the input"):
            build_mix(mix, out, overwrite=True)  # refused before Ray is started
    files = MixConfig(name="m", kind="pretrain", sources=[{"path": str(data / "*.jsonl")}])
    with pytest.raises(UserError, match="is the input"):
        build_mix(files, data / "a.jsonl", overwrite=True)
    assert sorted(os.listdir(data)) == ["a.jsonl"]


@pytest.mark.parametrize(
    "look_alike",
    ["solar.json", "data manifest", "corpus manifest", "source.json", "run folder", "report"],
)
def test_only_the_marker_makes_a_directory_solar_rays(capsys, tmp_path, src, look_alike):
    """A manifest's shape (or a place in a run directory) is no licence to overwrite."""
    run = tmp_path / "run"
    d = {"run folder": run / "stage", "report": run / "report"}.get(look_alike, tmp_path / "out")
    d.mkdir(parents=True)
    (d / "thesis.tex").write_text("years of work")
    files = {
        "solar.json": ("solar.json", {"format": "solar-ray/1", "stage": "eval"}),
        "data manifest": ("manifest.json", {"format": "solar-ray-data/1"}),
        "corpus manifest": ("manifest.json", {"corpus": "python-docs"}),
        "source.json": ("source.json", {"source": "smollm2-135m"}),
    }
    if look_alike in files:
        name, body = files[look_alike]
        (d / name).write_text(json.dumps(body))
    else:  # a folder of a run directory whose recipe.json names it, but no stage wrote it
        (run / ".pipeline").mkdir()
        (run / "recipe.json").write_text(json.dumps({"name": "r", "stages": {"stage": {}}}))
    assert_refused(capsys, upscale(src, d, "--overwrite"), rf"out: {d} is not a solar-ray output",
                   [tmp_path])  # fmt: skip
    assert not is_solar_output(d)
    # what solar-ray wrote carries the marker, and is replaced
    assert cli_main(upscale(src, tmp_path / "made")) == 0
    assert is_solar_output(tmp_path / "made")
    assert cli_main(upscale(src, tmp_path / "made", "--overwrite")) == 0


def test_run_never_writes_into_a_directory_of_someone_else(capsys, tmp_path, src):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "r", "stages": {"up": {"kind": "upscale", "source": str(src), "m": 1}}}))
    home = tmp_path / "home"
    home.mkdir()
    (home / "recipe.json").write_text("my own file")
    (home / "up").mkdir()
    (home / "up" / "notes.txt").write_text("mine")
    for extra in (["--dry-run"], []):
        assert_refused(capsys, ["run", str(recipe), "--out", str(home), *extra],
                       r"not a solar-ray run directory", [home, src])  # fmt: skip
    # the run's own directory reruns a changed stage in place
    run = tmp_path / "run"
    assert cli_main(["run", str(recipe), "--out", str(run)]) == 0
    assert cli_main(["run", str(recipe), "--out", str(run), "--set", "stages.up.m=2"]) == 0
    assert solar_plan(run / "up") == [0, 1, 2, 3][:2] + [2, 3]


# --------------------------------------------------------------------------- 2. bounds


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("repeat", r"repeat: Input should be less than or equal to 1024"),
        ("layers", r"layers: List should have at most 1024 items"),
        ("claims", r"the plan has 1999999998 layers .* at most 1024"),
        ("mergekit", r"layer_range: the plan grows past 1024 layers"),
    ],
)
def test_huge_plans_are_refused_in_milliseconds(capsys, tmp_path, src, case, expect):
    out = tmp_path / "out"
    argv = {
        "repeat": ["upscale", "--source", str(src), "--out", str(out), "--method", "stack",
                   "--repeat", "100000000"],
        "layers": ["upscale", "--source", str(src), "--out", str(out), "--method", "explicit",
                   "--layers", *["0"] * 5000],
    }.get(case)  # fmt: skip
    if case == "claims":
        cfg = json.loads((src / "config.json").read_text())
        cfg["num_hidden_layers"] = 10**9
        (src / "config.json").write_text(json.dumps(cfg))
        argv = upscale(src, out)
    if case == "mergekit":
        spec = {"slices": [{"sources": [{"model": str(src), "layer_range": [0, 10**8]}]}]}
        (tmp_path / "mk.yaml").write_text(yaml.safe_dump(spec))
        argv = ["upscale", "--config", str(tmp_path / "mk.yaml"), "--out", str(out)]
    t0 = time.perf_counter()
    assert_refused(capsys, argv, expect, [src])
    assert time.perf_counter() - t0 < 1.0
    assert not out.exists()


def test_an_output_larger_than_the_free_space_is_refused_before_writing(
    capsys, tmp_path, src, monkeypatch
):
    real = shutil.disk_usage
    monkeypatch.setattr(
        checkpoint.shutil, "disk_usage", lambda p: real(p)._replace(free=50_000)
    )
    out = tmp_path / "out"
    assert_refused(capsys, upscale(src, out), r"needs about .* but .* has 48\.8 KiB free", [src])
    other = tiny_model(tmp_path / "other", seed=1)
    assert_refused(capsys, ["merge", "--models", str(src), str(other), "--out", str(out)],
                   r"the merged model needs about", [src, other])  # fmt: skip
    assert not out.exists() and siblings(out) == []


def test_data_mix_bounds(capsys, tmp_path, monkeypatch):
    import psutil

    from solar_ray.data.config import MixConfig
    from solar_ray.data.mix import check_selection_size

    mix = MixConfig(name="m", kind="pretrain", sources=[{"path": "x.jsonl", "weight": 1.0}],
                    rows_per_file=10)  # fmt: skip
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("M", (), {"available": 1 << 30})())
    check_selection_size(mix, 100_000)  # 6.4 MB of plan, 10,000 files: fine
    with pytest.raises(UserError, match=r"num_samples: the mix would select 1,000,000,000 rows"):
        check_selection_size(mix, 10**9)
    with pytest.raises(UserError, match=r"rows_per_file: 2,000,000 rows at 10 per file"):
        check_selection_size(mix, 2_000_000)
    recipe = tmp_path / "r.yaml"
    for key, value, expect in [
        ("seeds", {"generate": 10**10}, r"seeds\.generate: Input should be less than or equal"),
        ("prepare", {"tokenizer": "x", "seq_len": 10**12}, r"prepare\.seq_len: Input should be less"),
    ]:
        mixes = [{"name": "m", "kind": "pretrain", "sources": [{"path": "/x.jsonl"}]}]
        stage: dict = {"kind": "data", "mixes": mixes}
        if key == "seeds":
            stage["synth_math"] = {"seeds": value}
        else:
            mixes[0]["prepare"] = value
        recipe.write_text(yaml.safe_dump({"name": "r", "stages": {"d": stage}}))
        assert_refused(capsys, ["run", str(recipe), "--out", str(tmp_path / "run"), "--dry-run"],
                       expect, [])  # fmt: skip


# --------------------------------------------------------------------------- 3. shapes


def test_tensors_that_disagree_with_config_are_refused_before_writing(capsys, tmp_path, src):
    bad = tiny_model(tmp_path / "bad", seed=2)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 128  # the weights are 64 wide
    (bad / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    assert_refused(capsys, upscale(bad, out),
                   r"tensor 'model\.layers\.0\.mlp\.down_proj\.weight' has shape \[32, 64\] but "
                   r"config\.json implies \[32, 128\]", [bad])  # fmt: skip
    bad2 = tiny_model(tmp_path / "bad2", seed=3)
    (bad2 / "config.json").write_text(json.dumps(cfg))
    assert_refused(capsys, ["merge", "--models", str(bad), str(bad2), "--out", str(out)],
                   r"has shape .* but config\.json implies", [bad, bad2])  # fmt: skip
    assert not out.exists() and siblings(out) == []
    # a missing parameter would load as random weights: refused too
    from safetensors.torch import load_file, save_file

    tensors = load_file(src / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    assert_refused(capsys, upscale(src, out), r"'model\.norm\.weight' is missing", [src])


@pytest.mark.parametrize(
    ("model_type", "extra"),
    [("llama", {}), ("llama", {"attention_bias": True, "mlp_bias": True, "head_dim": 16}),
     ("mistral", {}), ("qwen2", {}), ("qwen2", {"tie_word_embeddings": True}), ("qwen3", {}),
     ("qwen3", {"attention_bias": True}), ("gemma", {}), ("gemma2", {}),
     ("phi3", {"pad_token_id": 0})],
)  # fmt: skip
def test_expected_shapes_are_the_ones_transformers_builds(model_type, extra):
    """The torch-free shape rules against transformers itself (on the meta device)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from solar_ray.models import ARCHITECTURES, check_tensor_shapes, expected_shapes

    cfg = CONFIG_MAPPING[model_type](
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, **extra,
    )  # fmt: skip
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    built = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    config = json.loads(cfg.to_json_string(use_diff=True))  # what save_pretrained writes
    spec = ARCHITECTURES[model_type]
    layer, top = expected_shapes(config, spec)
    for name, shape in built.items():
        suffix = name.split(".", 3)[3] if name.startswith(spec.layer_prefix) else None
        assert (layer[suffix] if suffix else top[name]) == shape, name
    check_tensor_shapes(config, built, "meta")  # complete and consistent
    if not extra.get("attention_bias"):  # biases are checked when present, not required
        params = dict(model.named_parameters())  # tied weights once
        for name in params:
            with pytest.raises(UserError, match=f"{re.escape(name)}' is missing"):
                check_tensor_shapes(config, {k: s for k, s in built.items() if k != name}, "m")


def test_mergekit_output_is_checked_before_it_is_published(tmp_path, src, monkeypatch):
    from solar_ray import merge
    from solar_ray.merge import MergeConfig, run_merge

    other = tiny_model(tmp_path / "other", seed=1)
    wrong = tiny_model(tmp_path / "wrong", num_layers=2)

    def fake_mergekit(cfg, model_dirs, base_dir, out_dir):  # writes a model whose config lies
        for p in wrong.iterdir():
            shutil.copy(p, out_dir / p.name)
        cfg_json = json.loads((out_dir / "config.json").read_text())
        cfg_json["hidden_size"] = 64
        (out_dir / "config.json").write_text(json.dumps(cfg_json))
        return {}

    monkeypatch.setattr(merge, "_run_mergekit", fake_mergekit)
    out = tmp_path / "out"
    with pytest.raises(UserError, match="mergekit's output: tensor .* has shape"):
        run_merge(MergeConfig(models=[str(src), str(other)], base_model=str(src),
                              method="task_arithmetic", out=str(out)))  # fmt: skip
    assert not out.exists() and siblings(out) == []


# --------------------------------------------------------------------------- 4. stale temporaries


def test_stale_temporaries_of_dead_writers_are_removed_live_ones_kept(tmp_path, src):
    out = tmp_path / "out"
    dead = tmp_path / ".out.tmp-0123456789ab"
    live = tmp_path / ".out.tmp-aaaaaaaaaaaa"
    for d in (dead, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"\0" * 1000)
    # a live writer: another process holds the lock of its temporary directory
    with flock_held(live):
        assert cli_main(upscale(src, out)) == 0
        assert siblings(out) == [live.name]  # the dead one is gone, the live one kept
    assert cli_main(upscale(src, out, "--overwrite")) == 0
    assert siblings(out) == []
    # unrelated hidden entries that merely look similar are never touched
    # (an 8-hex token is not a current writer's name)
    look_alike = (".out.tmp-notahexname", ".outer.tmp-0123456789ab", ".out.tmpfile", ".out.tmp-deadbeef")
    for name in look_alike:
        (tmp_path / name).mkdir()
    assert cli_main(upscale(src, out, "--overwrite")) == 0
    assert set(look_alike) <= {p.name for p in tmp_path.iterdir()}


def test_sigterm_is_one_line_even_after_ray_replaced_the_handler(capsys, monkeypatch):
    """ray.init() installs sys.exit(SIGTERM) as the handler; still one line, exit 143."""
    import signal

    import solar_ray.cli as cli

    def run(kind, args):
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))  # as Ray does
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
        pytest.fail("SIGTERM did not stop the command")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli, "run_stage_command", run)
    capsys.readouterr()
    assert cli_main(["upscale"]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err == "solar-ray upscale: stopped by SIGTERM; partial outputs were removed\n"
    assert signal.getsignal(signal.SIGTERM) is before  # the caller's handlers come back
    # an ordinary sys.exit is not taken for a signal
    monkeypatch.setattr(cli, "run_stage_command", lambda kind, args: sys.exit(15))
    with pytest.raises(SystemExit):
        cli_main(["upscale"])


# --------------------------------------------------------------------------- 5. atomic swap


def test_overwrite_swaps_in_one_exchange(tmp_path, monkeypatch):
    calls: list[int] = []
    real = checkpoint._renameat2

    def spy(src, dst, flags):
        calls.append(flags)
        return real(src, dst, flags)

    monkeypatch.setattr(checkpoint, "_renameat2", spy)
    monkeypatch.setattr(os, "rename", lambda *a: pytest.fail("a two-step rename was used"))
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "v").write_text("1")
    old_inode = out.stat().st_ino
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "v").write_text("2")
    assert calls == [checkpoint._RENAME_NOREPLACE, checkpoint._RENAME_EXCHANGE]
    assert (out / "v").read_text() == "2" and out.stat().st_ino != old_inode
    assert siblings(out) == []


def test_fallback_swap_and_a_failed_write_leave_the_old_output(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "USE_RENAMEAT2", False)
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "v").write_text("1")
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "v").write_text("2")
    assert (out / "v").read_text() == "2" and siblings(out) == []
    with pytest.raises(RuntimeError, match="boom"), atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "v").write_text("3")
        raise RuntimeError("boom")
    assert (out / "v").read_text() == "2" and siblings(out) == []


def test_a_file_system_without_the_exchange_publishes_through_the_fallback(tmp_path, monkeypatch):
    """A FUSE mount (bindfs) answers renameat2's flags with EINVAL: the three renames run."""
    calls: list[int] = []

    def refused(olddirfd, old, newdirfd, new, flags):
        calls.append(flags)
        ctypes.set_errno(errno.EINVAL)
        return -1

    monkeypatch.setattr(checkpoint, "_libc_renameat2", refused)
    out = tmp_path / "out"
    for v in "12":
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "v").write_text(v)
    assert calls == [checkpoint._RENAME_NOREPLACE, checkpoint._RENAME_EXCHANGE]
    assert (out / "v").read_text() == "2" and siblings(out) == []


def test_temporary_names_fit_when_the_final_name_does(capsys, tmp_path, src):
    out = tmp_path / ("x" * 255)  # legal; ".xxx...x.tmp-<token>" would not be
    seen: list[int] = []
    real = checkpoint._make_locked_tmp

    def spy(parent, prefix):
        tmp, fd = real(parent, prefix)
        seen.append(len(tmp.name.encode()))
        return tmp, fd

    checkpoint._make_locked_tmp, saved = spy, checkpoint._make_locked_tmp
    try:
        assert cli_main(upscale(src, out)) == 0
    finally:
        checkpoint._make_locked_tmp = saved
    assert seen and max(seen) <= 255 and (out / "solar.json").is_file()
    assert_refused(capsys, upscale(src, tmp_path / ("y" * 300)), r"300 bytes, longer than the file system allows", [src])


# --------------------------------------------------------------------------- 6. validation gaps


@pytest.mark.parametrize(
    ("stages", "raw", "expect"),
    [
        ({"t": {"kind": "pretrain", "model": "@up", "data": "/x", "steps": 5, "lr": float("inf")}},
         None, r"stages\.t\.lr: Input should be a finite number"),
        ({"t": {"kind": "pretrain", "model": "@up", "data": "/x", "steps": 5, "warmup_steps": 9}},
         None, r"warmup_steps: 9 is more than steps \(5\)"),
        (None, "name: r\nstages:\n  up: {kind: upscale, source: SRC, m: 1}\n  up: {kind: corpus}\n",
         r"line 4: the key 'up' is given twice \(first on line 3\)"),
        (None, "name: r\nstages:\n  up: {kind: upscale, source: SRC, m: 1, m: 2}\n",
         r"line 3: the key 'm' is given twice"),
        ({"c": {"kind": "corpus"},
          "d": {"kind": "data", "mixes": [{"name": "cpt", "kind": "pretrain",
                                            "sources": [{"path": "@c/python-doc/train.jsonl"}]}]}},
         None, r"'@c/python-doc/train\.jsonl' is not written by stage 'c' \(corpus\)"),
        ({"d": {"kind": "data", "mixes": [{"name": "cpt", "kind": "pretrain",
                                            "sources": [{"path": "/x.jsonl"}]}]},
          "t": {"kind": "sft", "model": "@up", "data": "@d/sft_v1", "steps": 5}},
         None, r"'@d/sft_v1' is not written by stage 'd' \(data\), which writes cpt"),
        ({"big": {"kind": "upscale", "source": "SRC", "m": 4}},
         None, r"stages\.big: m=4 must be smaller than the base model's 4 layers"),
    ],
    ids=["lr-inf", "warmup", "dup-stage", "dup-field", "corpus-sub", "data-sub", "m-beyond"],
)  # fmt: skip
def test_dry_run_catches_validation_gaps(capsys, tmp_path, src, stages, raw, expect):
    recipe = tmp_path / "r.yaml"
    if raw is None:
        stages = {"up": {"kind": "upscale", "source": str(src), "m": 1}, **stages}
        raw = yaml.safe_dump({"name": "r", "stages": stages})
    recipe.write_text(raw.replace("SRC", str(src)))
    assert_refused(capsys, ["run", str(recipe), "--out", str(tmp_path / "run"), "--dry-run"],
                   expect, [src, recipe])  # fmt: skip


# --------------------------------------------------------------------------- 7. one line


def _corrupt(src: Path, how: str, tmp_path: Path) -> list[str]:
    """Damage ``src`` (or make an input) as ``how`` says; return the CLI arguments."""
    out = str(tmp_path / "out")
    cfg = src / "config.json"
    if how == "config-not-json":
        cfg.write_text("{not json")
    elif how == "config-not-utf8":
        cfg.write_bytes(b"\xff\xfe{}")
    elif how == "config-no-layers":
        c = json.loads(cfg.read_text())
        del c["num_hidden_layers"]
        cfg.write_text(json.dumps(c))
    elif how.startswith("index-"):
        (src / "model.safetensors").rename(src / "model-00001-of-00001.safetensors")
        index = {"index-not-json": "nope", "index-no-map": '{"metadata": {}}',
                 "index-map-list": '{"weight_map": [1]}'}[how]  # fmt: skip
        (src / "model.safetensors.index.json").write_text(index)
    elif how.startswith("header-"):
        f = src / "model.safetensors"
        raw = f.read_bytes()
        (hlen,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + hlen])
        name = next(k for k in header if k != "__metadata__")
        header[name] = {"header-shape-str": {**header[name], "shape": ["a"]},
                        "header-dtype": {**header[name], "dtype": "Q7"},
                        "header-entry-str": "x"}[how]  # fmt: skip
        body = json.dumps(header).encode()
        f.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + hlen :])
    elif how == "out-below-file":
        (tmp_path / "f").write_text("x")
        out = str(tmp_path / "f" / "out")
    elif how == "recipe-not-utf8":
        (tmp_path / "r.yaml").write_bytes(b"name: r\nstages: {a: {kind: corpus, x: \xe9}}\n")
        return ["run", str(tmp_path / "r.yaml"), "--dry-run", "--out", out]
    elif how in ("kind-list", "kind-map"):
        kind = ["upscale"] if how == "kind-list" else {"upscale": 1}
        (tmp_path / "r.yaml").write_text(yaml.safe_dump({"name": "r", "stages": {"a": {"kind": kind}}}))
        return ["run", str(tmp_path / "r.yaml"), "--dry-run", "--out", out]
    elif how in ("mergekit-str", "mergekit-no-model"):
        source = "a-string" if how == "mergekit-str" else {"layer_range": [0, 2]}
        (tmp_path / "mk.yaml").write_text(yaml.safe_dump({"slices": [{"sources": [source]}]}))
        return ["upscale", "--config", str(tmp_path / "mk.yaml"), "--out", out]
    elif how in ("eval-no-tokenizer", "eval-broken-config"):
        if how == "eval-broken-config":
            cfg.write_text("[1, 2]")
        return ["eval", "--models", str(src), "--suite", "offline", "--limit", "1"]
    elif how == "contamination-not-utf8":
        (tmp_path / "t.txt").write_bytes(b"\xff\xfe bad")
        (tmp_path / "e.txt").write_text("one two three four five six seven eight nine\n")
        return ["contamination", "--train", str(tmp_path / "t.txt"), "--eval-sets", str(tmp_path / "e.txt")]
    return upscale(src, Path(out))


@pytest.mark.parametrize(
    ("how", "expect"),
    [
        ("config-not-json", r"config\.json: not valid JSON"),
        ("config-not-utf8", r"config\.json: not valid JSON \('utf-8' codec"),
        ("config-no-layers", r"config\.json: the field 'num_hidden_layers' is missing"),
        ("index-not-json", r"index\.json: not valid JSON"),
        ("index-no-map", r"index\.json: no 'weight_map'"),
        ("index-map-list", r"index\.json: no 'weight_map'"),
        ("header-shape-str", r"model\.safetensors: corrupt entry for tensor"),
        ("header-dtype", r"model\.safetensors: tensor .* has an unknown dtype 'Q7'"),
        ("header-entry-str", r"model\.safetensors: corrupt entry for tensor"),
        ("out-below-file", r"out: cannot write into .*/f"),
        ("recipe-not-utf8", r"r\.yaml: not UTF-8 text \(byte 38"),
        ("kind-list", r"stages\.a\.kind: expected one name .* got a list"),
        ("kind-map", r"stages\.a\.kind: expected one name .* got a dict"),
        ("mergekit-str", r"slices\.0\.sources\.0: expected a mapping"),
        ("mergekit-no-model", r"slices\.0\.sources\.0\.model: expected a model source"),
        ("eval-no-tokenizer", r"has no tokenizer \(none of tokenizer\.json"),
        ("eval-broken-config", r"config\.json: expected a JSON object, got list"),
        ("contamination-not-utf8", r"train: .*t\.txt: not UTF-8 text \(file is not UTF-8 at byte 0\)"),
    ],
)
def test_bad_input_is_one_line_not_a_traceback(capsys, tmp_path, src, how, expect):
    argv = _corrupt(src, how, tmp_path)
    assert_refused(capsys, argv, expect, [src])
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- 8. paths


def test_index_entries_never_leave_the_model_directory(capsys, tmp_path, src):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(src / "model.safetensors", elsewhere / "model.safetensors")
    with safe_open(str(src / "model.safetensors"), "pt") as st:
        names = list(st.keys())
    (src / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {n: "../elsewhere/model.safetensors" for n in names}})
    )
    assert_refused(capsys, upscale(src, tmp_path / "out"),
                   r"maps to '\.\./elsewhere/model\.safetensors', which is not a file name in the "
                   r"model directory", [src, elsewhere])  # fmt: skip


@pytest.mark.parametrize("kind", ["dangling", "loop"])
def test_broken_symlink_sources_are_broken_paths_not_hub_ids(capsys, tmp_path, monkeypatch, kind):
    from solar_ray import models

    monkeypatch.setattr(models, "_download_hub", lambda *a: pytest.fail("sent to the hub"))
    link = tmp_path / "org" / "model"  # looks like a hub id when given relative
    link.parent.mkdir()
    if kind == "dangling":
        link.symlink_to(tmp_path / "gone")
        expect = r"is a symbolic link to .*gone', which does not exist"
    else:
        (tmp_path / "org" / "other").symlink_to(link)
        link.symlink_to(tmp_path / "org" / "other")
        expect = r"is a symbolic link loop"
    monkeypatch.chdir(tmp_path)
    assert_refused(capsys, ["upscale", "--source", "org/model", "--out", "out", "--m", "1"],
                   rf"model source 'org/model' is a broken path: .*{expect}", [tmp_path / "org"])  # fmt: skip
