"""Input a user gives that used to hang or be ignored: YAML alias bombs and huge files, secrets
in a recipe under other names, a flag and a ``--set`` of one field that disagree, negative
list indices in ``--set``. Each is refused at load with exit 2 and one line, nothing written.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

RECIPE = """
name: mini
runtime_env: {{env_vars: {{OMP_NUM_THREADS: "2"{extra}}}}}
stages:
  base:
    kind: model
    random: {{model_type: llama, tokenizer: smollm2-135m, seed: 0, hidden_size: 64,
             intermediate_size: 128, num_hidden_layers: 4, num_attention_heads: 4,
             num_key_value_heads: 2, max_position_embeddings: 512, tie_word_embeddings: true}}
  upscaled: {{kind: upscale, source: "@base", m: 1}}
  merged: {{kind: merge, models: ["@upscaled", "@base"], method: linear, weights: [0.5, 0.5]}}
"""

#: nine levels of nine aliases: 9**9 (387 million) strings once expanded, 9 lines of text
BOMB = "a: &a [" + ", ".join(['"lol"'] * 9) + "]\n" + "".join(
    f"{b}: &{b} [" + ", ".join([f"*{a}"] * 9) + "]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True)
)


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "solar_ray.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ))  # fmt: skip


def _recipe(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "mini.yaml"
    path.write_text(RECIPE.format(extra=extra))
    return path


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --------------------------------------------------------------------------- YAML bounds


def test_an_alias_bomb_is_refused_at_once_by_every_loader(tmp_path):
    """``run --dry-run`` walked 387 million aliased strings (for ever); now the file is
    refused while it is parsed, in well under a second of work."""
    from solar_ray.config import ConfigError, load_yaml, parse_override

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"bomb.yaml: not valid YAML: more than 1000000 values"):
        load_yaml(bomb)
    with pytest.raises(ConfigError, match="more than 1000000 values"):
        parse_override("x=" + BOMB.replace("\n", ", ").join("{}"))
    assert time.monotonic() - start < 1.0
    for command in (["run", str(bomb), "--dry-run", "--out", str(tmp_path / "run")],
                    ["sweep", str(bomb), "--dry-run", "--out", str(tmp_path / "sw")]):  # fmt: skip
        r = _cli(*command, timeout=30)
        assert r.returncode == 2, r.stderr[-2000:]
        assert r.stderr.count("\n") == 1 and "more than 1000000 values" in r.stderr
    assert _tree(tmp_path) == ["bomb.yaml"]


def test_a_self_referring_alias_and_a_huge_file_are_refused(tmp_path):
    from solar_ray.config import MAX_YAML_CHARS, ConfigError, load_yaml

    loop = tmp_path / "loop.yaml"
    loop.write_text("a: &a [1, *a]\n")
    with pytest.raises(ConfigError, match=r"loop.yaml: not valid YAML: an alias refers to a node that contains it"):
        load_yaml(loop)
    huge = tmp_path / "huge.yaml"
    huge.write_text("x: '" + "y" * MAX_YAML_CHARS + "'\n")
    with pytest.raises(ConfigError, match=rf"huge.yaml: not valid YAML: longer than {MAX_YAML_CHARS}"):
        load_yaml(huge)
    # anchors and aliases a recipe really uses still load: 3 copies of a 2-item list
    ok = tmp_path / "ok.yaml"
    ok.write_text("w: &w [0.5, 0.5]\na: *w\nb: {<<: {x: 1}, y: *w}\n")
    assert load_yaml(ok) == {"w": [0.5, 0.5], "a": [0.5, 0.5], "b": {"x": 1, "y": [0.5, 0.5]}}


# --------------------------------------------------------------------------- secrets


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        (", WANDB_API_KEY: abc123", "runtime_env.env_vars.WANDB_API_KEY"),
        (", AWS_SECRET_ACCESS_KEY: abc123", "runtime_env.env_vars.AWS_SECRET_ACCESS_KEY"),
        (", HF_TOKEN: abc123", "runtime_env.env_vars.HF_TOKEN"),
        (", MY_SETTING: hf_" + "a1B2" * 9, "runtime_env.env_vars.MY_SETTING"),  # a key's shape
        (", KEY_ID: AKIAABCDEFGHIJKLMNOP", "runtime_env.env_vars.KEY_ID"),
    ],
)
def test_a_secret_in_a_recipe_is_refused_naming_its_key(tmp_path, extra, field):
    """An API key in ``runtime_env.env_vars`` would be stored in the run's recipe copy."""
    recipe = _recipe(tmp_path, extra)
    r = _cli("run", str(recipe), "--dry-run", "--out", str(tmp_path / "run"))
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("solar-ray run: error: invalid config")
    assert f"mini.yaml): {field}: " in r.stderr
    assert "environment" in r.stderr and "abc123" not in r.stderr
    assert _tree(tmp_path) == ["mini.yaml"]


def test_ordinary_settings_are_not_taken_for_secrets(tmp_path):
    """Environment variables without a secret's name, and token-named model fields outside
    ``env_vars`` (``pad_token``), are fine."""
    from solar_ray.hub import refuse_tokens

    recipe = _recipe(tmp_path, ", NCCL_DEBUG: INFO")
    r = _cli("run", str(recipe), "--dry-run", "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-2000:]
    refuse_tokens({"stages": {"s": {"pad_token": "<pad>", "max_tokens": 5, "revision": "a" * 40}}})


# --------------------------------------------------------------------------- --set and flags


def test_a_flag_and_a_set_of_the_same_field_must_agree(tmp_path):
    src = str(tmp_path / "src")
    r = _cli("upscale", "--source", src, "--m", "2", "--set", "m=3", "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert r.stderr == (
        "solar-ray upscale: error: --m 2 and --set 'm=3' disagree; give the field once\n"
    )
    # the same value twice is no disagreement: the command goes on (to the missing source)
    r = _cli("upscale", "--source", src, "--m", "2", "--set", "m=2", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "disagree" not in r.stderr and "src" in r.stderr
    assert _tree(tmp_path) == []


@pytest.mark.parametrize(
    ("command", "args", "line"),
    [
        ("run", ["--out", "{tmp}/a", "--set", "out={tmp}/b"],
         "--out '{tmp}/a' and --set 'out={tmp}/b' disagree"),
        ("sweep", ["--scheduler", "asha", "--set", "scheduler.kind=grid"],
         "--scheduler 'asha' and --set 'scheduler.kind=grid' disagree"),
    ],
)  # fmt: skip
def test_run_and_sweep_flags_must_agree_with_set(tmp_path, command, args, line):
    recipe = Path(__file__).resolve().parents[1] / "jobs" / ("tiny.yaml" if command == "run" else "sweep-m.yaml")
    args = [a.format(tmp=tmp_path) for a in args]
    r = _cli(command, str(recipe), "--dry-run", *args)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert line.format(tmp=tmp_path) in r.stderr
    assert _tree(tmp_path) == []


def test_set_refuses_negative_list_indices(tmp_path):
    """``--set models.-1=x`` picked the last item; indices are 0..len-1, nothing else."""
    from solar_ray.config import ConfigError, apply_overrides

    data = {"models": ["a", "b"]}
    assert apply_overrides(data, ["models.1=c"]) == {"models": ["a", "c"]}
    for bad in ("models.-1=c", "models.2=c", "models.x=c", "models.-0=c"):
        with pytest.raises(ConfigError, match=r"is not a valid index into a list of 2 \(0 to 1\)"):
            apply_overrides(data, [bad])
    recipe = _recipe(tmp_path)
    r = _cli("run", str(recipe), "--dry-run", "--set", "stages.merged.models.-1=@upscaled")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "'stages.merged.models.-1' is not a valid index" in r.stderr
