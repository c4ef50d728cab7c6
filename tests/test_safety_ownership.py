"""What ``--overwrite`` may replace, and where an output may go (issue 26).

An output is solar-ray's to replace only when its ``.solar-ray-output`` marker lists every
entry in it: a file a user added (before the write, or while it runs) is never deleted.
``--out`` is a path or a ``file://`` URI, never a ``s3:bucket`` look-alike, the working
directory or the model cache. Every refusal: exit 2, one line, the trees unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
from safety_helpers import assert_refused, siblings, tiny_model, tree_state

from solar_ray import checkpoint
from solar_ray.checkpoint import UnsafeOutputError, atomic_output_dir, check_free_space
from solar_ray.cli import main as cli_main


@pytest.fixture
def src(tmp_path) -> Path:
    return tiny_model(tmp_path / "src")


def upscale(src: Path | str, out: Path | str, *extra: str) -> list[str]:
    return ["upscale", "--source", str(src), "--out", str(out), "--m", "1", *extra]


# --------------------------------------------------------------------------- user files


@pytest.mark.parametrize("where", ["notes.txt", "backup/model.safetensors", ".hidden"])
def test_a_file_a_user_added_to_an_output_is_never_overwritten(capsys, tmp_path, src, where):
    out = tmp_path / "out"
    assert cli_main(upscale(src, out)) == 0
    (out / where).parent.mkdir(exist_ok=True)
    shutil.copy(out / "config.json", out / where)  # notes, a copy of the checkpoint
    first = where.split("/")[0]
    assert_refused(capsys, upscale(src, out, "--overwrite"),
                   rf"out: {out} holds {first}, which solar-ray did not write", [out, src])  # fmt: skip
    assert siblings(out) == []
    # moved away, the output is solar-ray's again
    shutil.move(out / first, tmp_path / first)
    assert cli_main([*upscale(src, out)[:-1], "2", "--overwrite"]) == 0
    assert (tmp_path / first).exists() and siblings(out) == []


def _late_file(monkeypatch, path: Path) -> None:
    """Create ``path`` (a user's file) just after the last check before publication."""
    real = checkpoint.check_output

    def check_then_write(*args, **kwargs):
        result = real(*args, **kwargs)
        if kwargs.get("_first") is False:
            path.parent.mkdir(exist_ok=True)
            path.write_text("written by the user meanwhile")
        return result

    monkeypatch.setattr(checkpoint, "check_output", check_then_write)


@pytest.mark.parametrize("swap", ["renameat2", "fallback"])
def test_a_file_created_in_the_output_during_the_write_survives(tmp_path, monkeypatch, swap):
    monkeypatch.setattr(checkpoint, "USE_RENAMEAT2", swap == "renameat2")
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "v").write_text("1")
    # created inside the body: the check before publication sees it
    with pytest.raises(UnsafeOutputError, match=r"holds mine\.txt"), \
            atomic_output_dir(out, overwrite=True) as tmp:  # fmt: skip
        (tmp / "v").write_text("2")
        (out / "mine.txt").write_text("mine")
    assert (out / "v").read_text() == "1" and (out / "mine.txt").read_text() == "mine"
    (out / "mine.txt").unlink()
    before = tree_state(out)
    # created after that check, before the swap: the old output comes back, whole
    _late_file(monkeypatch, out / "late" / "mine.txt")
    with pytest.raises(UnsafeOutputError, match=rf"{out}/late appeared while"), \
            atomic_output_dir(out, overwrite=True) as tmp:  # fmt: skip
        (tmp / "v").write_text("2")
    after = tree_state(out)
    assert after.pop("late") == "dir" and after.pop("late/mine.txt")
    assert after == before and siblings(out) == []


def test_a_directory_appearing_at_a_new_output_path_is_kept(tmp_path, monkeypatch):
    out = tmp_path / "new"
    _late_file(monkeypatch, out / "mine.txt")
    with pytest.raises(UnsafeOutputError, match=rf"{out}/mine\.txt appeared while"), \
            atomic_output_dir(out) as tmp:  # fmt: skip
        (tmp / "v").write_text("ours")
    assert os.listdir(out) == ["mine.txt"] and siblings(out) == []
    assert (out / "mine.txt").read_text() == "written by the user meanwhile"


def test_the_marker_lists_what_the_write_made(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "b").mkdir()
        (tmp / "b" / "x").write_text("1")
        (tmp / "a").symlink_to("b/x")
    marker = checkpoint.read_json_file(out / checkpoint.OUTPUT_MARKER)
    assert marker["files"] == ["a", "b", "b/x"]
    assert marker["written_by"] == f"solar-ray {metadata.version('solar-ray')}"
    assert checkpoint.library_version("solar-ray-no-such-package") is None
    (out / "b" / "y").write_text("mine")
    assert checkpoint.unaccounted_entry(out) == "b/y"


# --------------------------------------------------------------------------- where out may go


@pytest.mark.parametrize("kind", ["file-uri", "s3:bucket", "s3:/bucket", "gs:b", "hf:x", "file:/x"])
def test_out_uris_are_local_paths_or_refused(capsys, tmp_path, src, monkeypatch, kind):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    target = tmp_path / "x"
    if kind == "file-uri":
        assert cli_main(upscale(src, f"file://{target}")) == 0
        assert (target / "solar.json").is_file() and os.listdir(work) == []
        return
    given, meant = {
        "s3:bucket": ("s3:bucket/x", "s3://bucket/x"),
        "s3:/bucket": ("s3:/bucket/x", "s3://bucket/x"),
        "gs:b": ("gs:b", "gs://b"),
        "hf:x": ("hf:x", "hf://x"),
        "file:/x": (f"file:{target}", f"file://{target}"),
    }[kind]
    assert_refused(capsys, upscale(src, given), rf"out: '{given}' is not a valid location; did you mean '{meant}'",
                   [work, src])  # fmt: skip
    assert os.listdir(work) == [] and not target.exists()


@pytest.mark.parametrize("out", [".", "..", "work"])
def test_the_working_directory_is_never_an_output(capsys, tmp_path, src, monkeypatch, out):
    work = tmp_path / "a" / "work"  # ".." holds no input: only the cwd rule refuses
    assert cli_main(upscale(src, work)) == 0  # a solar-ray output, which overwrite may replace
    monkeypatch.chdir(work)
    given = work / out if out != "work" else work
    expect = "is the working directory" if out != ".." else f"contains the working directory {work}"
    assert_refused(capsys, upscale(src, out if out != "work" else work, "--overwrite"),
                   rf"out: {given} {expect}", [tmp_path])  # fmt: skip
    assert siblings(work) == []


def test_the_model_cache_is_never_an_output(capsys, tmp_path, src, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SOLAR_RAY_CACHE", str(cache))
    entry = cache / "gguf" / "SmolLM2-135M-0123456789abcdef"
    with atomic_output_dir(entry, overwrite=True) as tmp:  # what the model cache writes
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    for out in (entry, cache, cache / "gguf", cache / "mine", cache / "gguf" / "mine"):
        assert_refused(capsys, upscale(src, out, "--overwrite"), rf"out: {out} is inside solar-ray's cache",
                       [cache, src])  # fmt: skip
    # where solar-ray stages an output for object storage it may write
    assert cli_main(upscale(src, cache / "staging" / "0123" / "up")) == 0


def test_a_file_system_without_a_size_is_not_reported_as_full(capsys, src):
    check_free_space("/proc/solar-ray-out", 1 << 30)  # /proc reports 0 blocks, 0 free
    line = assert_refused(capsys, upscale(src, "/proc/solar-ray-out"), r"out: cannot write into /proc", [src])
    assert "free" not in line


def test_an_immutable_output_is_refused_before_the_write(capsys, tmp_path, src):
    out = tmp_path / "out"
    assert cli_main(upscale(src, out)) == 0
    if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i needs CAP_LINUX_IMMUTABLE and ext4/xfs/btrfs")
    try:
        assert_refused(capsys, upscale(src, out, "--overwrite"), rf"out: {out} is immutable", [out, src])
    finally:
        subprocess.run(["chattr", "-i", str(out)], check=True)
    assert siblings(out) == []


# --------------------------------------------------------------------------- inputs via symlinks


@pytest.mark.parametrize("out_is", ["the targets' folder", "beside the targets"])
def test_an_input_of_symlinks_protects_what_they_point_at(capsys, tmp_path, src, out_is):
    """A source that is a directory of symlinks (as a pipeline ``model`` stage is)."""
    made = tmp_path / "made"
    assert cli_main(upscale(src, made)) == 0  # a solar-ray output: overwrite alone would allow it
    links = tmp_path / "links"
    links.mkdir()
    for p in made.iterdir():
        (links / p.name).symlink_to(p)
    out, how = {
        "the targets' folder": (made, rf"is the input {links} \(really {made}\)"),
        "beside the targets": (made / "sub", rf"lies inside the input {links} \(really {made}\)"),
    }[out_is]
    assert_refused(capsys, upscale(links, out, "--overwrite"), rf"out: {out} {how}", [tmp_path])


def test_a_random_model_stage_stays_replaceable(tmp_path, tiny_llama_dir):
    """A random model (a pipeline ``model`` stage) writes its ``source.json`` inside its own
    write: made again at the same place, it replaces itself; a user's file there stops it."""
    from solar_ray.models import init_random_model

    out = tmp_path / "stage"
    args = {"model_type": "llama", "tokenizer": str(tiny_llama_dir), "hidden_size": 16,
            "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}  # fmt: skip
    init_random_model(out, **args)
    assert json.loads((out / "source.json").read_text()) == {"random": {**args, "seed": 0}}
    init_random_model(out, **args, seed=1)
    assert json.loads((out / "source.json").read_text())["random"]["seed"] == 1
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UnsafeOutputError, match="notes.txt"):
        init_random_model(out, **args)
    assert (out / "notes.txt").read_text() == "mine"
