"""Outputs and run directories on object storage, against a real S3 server (moto's).

Fast tests here: publishing with the marker last, an upload killed midway never taken as
finished, foreign prefixes refused and left as they were, a recipe of non-Ray stages into
``s3://`` and back (skipped from the bucket alone, on a node with an empty cache), and the
stage commands writing to ``s3://``. The Ray recipe (training checkpoints in the bucket,
a stopped job resumed) is in ``test_remote_ray.py``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import waits_for_lock
from s3_server import objects, s3_server

from solar_ray import identity, remote
from solar_ray.checkpoint import (
    OUTPUT_MARKER,
    OUTPUT_MARKER_FORMAT,
    atomic_output_dir,
    check_output,
)
from solar_ray.config import StageConfig
from solar_ray.errors import UserError
from solar_ray.fs import StorageError

BUCKET = "solar-test"
RECIPE = """
name: mini
stages:
  base:
    kind: model
    random: {model_type: llama, tokenizer: smollm2-135m, seed: 0, hidden_size: 64,
             intermediate_size: 128, num_hidden_layers: 4, num_attention_heads: 4,
             num_key_value_heads: 2, max_position_embeddings: 512, tie_word_embeddings: true}
  upscaled: {kind: upscale, source: "@base", m: 1}
  merged: {kind: merge, models: ["@upscaled", "@upscaled"], method: linear, weights: [0.5, 0.5]}
"""


@pytest.fixture(scope="module")
def s3():
    with s3_server(BUCKET) as env, pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        yield env


def _output(path: Path, files: dict[str, bytes]) -> Path:
    with atomic_output_dir(path) as tmp:
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
    return path


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` but the output marker (relative path -> bytes)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and p.name != OUTPUT_MARKER}  # fmt: skip


def _stored(env: dict[str, str], prefix: str) -> dict[str, bytes]:
    """The objects under ``prefix/`` of the test bucket, by path relative to it."""
    return {k.removeprefix(prefix + "/"): v for k, v in objects(env, BUCKET, prefix + "/").items()}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh node cache (``$SOLAR_RAY_CACHE``)."""
    monkeypatch.setenv("SOLAR_RAY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _cli(*args: str, cache: Path | None = None, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if cache is not None:
        env["SOLAR_RAY_CACHE"] = str(cache)
    return subprocess.run([sys.executable, "-m", "solar_ray.cli", *args], env=env,
                          capture_output=True, text=True, timeout=600, **kw)  # fmt: skip


def test_publish_puts_the_marker_last_and_download_round_trips(s3, tmp_path):
    files = {"a.txt": b"a" * 10, "sub/b.bin": os.urandom(3000), "solar.json": b"{}"}
    out = _output(tmp_path / "out", files)
    uri = f"s3://{BUCKET}/pub/out"
    marker = remote.publish(out, uri, artifact="abc")
    stored = objects(s3, BUCKET, "pub/out/")
    assert {k.removeprefix("pub/out/"): v for k, v in stored.items() if not k.endswith(OUTPUT_MARKER)} == files
    assert remote.read_marker(uri) == marker and marker["artifact"] == "abc"
    assert remote.UPLOAD_MARKER not in {k.rsplit("/", 1)[-1] for k in stored}

    copy = remote.download(uri, tmp_path / "copy")
    assert {p.relative_to(copy).as_posix(): p.read_bytes() for p in copy.rglob("*")
            if p.is_file() and p.name != OUTPUT_MARKER} == files  # fmt: skip
    # the same artifact is not downloaded again; a republished one is
    mtime = (copy / "a.txt").stat().st_mtime_ns
    assert remote.download(uri, copy) == copy and (copy / "a.txt").stat().st_mtime_ns == mtime
    (out / "a.txt").write_bytes(b"new")
    remote.publish(_output(tmp_path / "out2", {"a.txt": b"new"}), uri)
    remote.download(uri, copy)
    assert (copy / "a.txt").read_bytes() == b"new" and not (copy / "sub").exists()


def test_a_download_waits_for_one_of_the_same_copy_in_another_process(s3, tmp_path):
    uri = f"s3://{BUCKET}/waits/out"
    remote.publish(_output(tmp_path / "out", {"a.txt": b"a"}), uri)
    copy = tmp_path / "copy"
    assert waits_for_lock(tmp_path / ".copy.lock", lambda: remote.download(uri, copy)) == copy
    assert (copy / "a.txt").read_bytes() == b"a"


_KILLED_UPLOAD = """
import sys, time
import pyarrow.fs as pafs
from solar_ray import remote
real, n = pafs.copy_files, [0]
def slow(*a, **k):
    n[0] += 1
    if n[0] == 2:
        print("uploading", flush=True)
        time.sleep(600)
    return real(*a, **k)
pafs.copy_files = slow
remote.publish(sys.argv[1], sys.argv[2])
"""


def test_an_output_without_a_write_id_gets_one_and_is_downloaded(s3, tmp_path):
    """A directory of several outputs (a data stage's mixes) has no write id of its own."""
    plain = tmp_path / "plain"
    (plain / "mix").mkdir(parents=True)
    (plain / "mix" / "rows.jsonl").write_text('{"text": "a"}\n')
    (plain / OUTPUT_MARKER).write_text('{"input_key": "k"}')
    uri = f"s3://{BUCKET}/plain"
    marker = remote.publish(plain, uri)
    assert marker["id"] and remote.read_marker(uri) == marker and marker["input_key"] == "k"
    assert marker["format"] == OUTPUT_MARKER_FORMAT
    copy = remote.download(uri, tmp_path / "copy")
    assert (copy / "mix" / "rows.jsonl").read_text() == '{"text": "a"}\n'


def test_an_upload_killed_midway_is_never_taken_as_finished(s3, tmp_path):
    uri = f"s3://{BUCKET}/killed/out"
    out = _output(tmp_path / "out", {f"f{i}.bin": os.urandom(1000) for i in range(4)})
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_UPLOAD, str(out), uri],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "uploading"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    names = {k.rsplit("/", 1)[-1] for k in objects(s3, BUCKET, "killed/out/")}
    assert "f0.bin" in names and remote.UPLOAD_MARKER in names and OUTPUT_MARKER not in names
    assert remote.read_marker(uri) is None
    with pytest.raises(UserError, match=r"not a finished solar-ray output .*interrupted upload"):
        remote.download(uri, tmp_path / "copy")
    assert not (tmp_path / "copy").exists()
    with pytest.raises(UserError, match="not a finished solar-ray output"):
        remote.materialize(uri)
    # the next upload replaces the interrupted one (it is solar-ray's)
    remote.publish(out, uri)
    names = {k.rsplit("/", 1)[-1] for k in objects(s3, BUCKET, "killed/out/")}
    assert names == {f"f{i}.bin" for i in range(4)} | {OUTPUT_MARKER}


def test_a_prefix_of_other_objects_is_refused_and_left_as_it_was(s3, tmp_path):
    import boto3

    client = boto3.client("s3")
    client.put_object(Bucket=BUCKET, Key="theirs/data.csv", Body=b"1,2,3")
    before = objects(s3, BUCKET, "theirs/")
    out = _output(tmp_path / "out", {"a.txt": b"a"})
    with pytest.raises(UserError, match=r"^out: s3://solar-test/theirs holds objects that solar-ray did not write"):
        remote.publish(out, f"s3://{BUCKET}/theirs")
    recipe = tmp_path / "mini.yaml"
    recipe.write_text(RECIPE)
    r = _cli("run", str(recipe), "--out", f"s3://{BUCKET}/theirs")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(
        "solar-ray run: error: run directory s3://solar-test/theirs holds objects and is not a solar-ray run"
    )
    r = _cli("merge", "--models", "a", "b", "--out", f"s3://{BUCKET}/theirs")
    assert r.returncode == 2 and "theirs" in r.stderr
    assert objects(s3, BUCKET, "theirs/") == before


def test_other_schemes_are_one_line_errors(s3, tmp_path):
    recipe = tmp_path / "mini.yaml"
    recipe.write_text(RECIPE)
    for out in ("http://example.com/run", "hf://datasets/x/run"):
        r = _cli("run", str(recipe), "--out", out, "--dry-run")
        assert r.returncode == 2
        assert r.stderr.strip() == (
            f"solar-ray run: error: out: {out!r}: outputs go to a local or shared path, "
            f"s3:// or gs:// (not {out.split(':')[0]}://)"
        )
    assert not any(Path.cwd().glob("http*")) and not any(Path.cwd().glob("hf:*"))


def test_a_recipe_runs_into_s3_and_is_skipped_from_the_bucket_alone(s3, tmp_path):
    recipe = tmp_path / "mini.yaml"
    recipe.write_text(RECIPE)
    uri = f"s3://{BUCKET}/runs/mini"
    r = _cli("run", str(recipe), "--out", uri)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"run directory: {uri} (ran 3, skipped 0)" in r.stdout
    stored = objects(s3, BUCKET, "runs/mini/")
    for stage in ("base", "upscaled", "merged"):
        assert f"runs/mini/{stage}/{OUTPUT_MARKER}" in stored
        assert f"runs/mini/{stage}/config.json" in stored and f"runs/mini/.pipeline/{stage}.json" in stored
    assert "runs/mini/upscaled/solar.json" in stored

    # another node: an empty cache, so another mirror; everything is skipped from the
    # markers in the bucket, and nothing is downloaded
    other = tmp_path / "other-node-cache"
    r = _cli("run", str(recipe), "--out", uri, cache=other)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"run directory: {uri} (ran 0, skipped 3)" in r.stdout
    assert not (other / "runs").exists() or not any((other / "runs").rglob("*.safetensors"))

    # a stage's output gone from the bucket: that stage reruns there, from the bucket's
    # copies of its inputs (downloaded into the new node's mirror), and nothing else
    import boto3

    client = boto3.client("s3")
    for key in stored:
        if key.startswith("runs/mini/merged/"):
            client.delete_object(Bucket=BUCKET, Key=key)
    r = _cli("run", str(recipe), "--out", uri, "--dry-run", cache=other)
    assert [ln.split()[-1] for ln in r.stdout.splitlines()[1:]] == ["(skip)", "(skip)", "run"]
    r = _cli("run", str(recipe), "--out", uri, cache=other)
    assert f"run directory: {uri} (ran 1, skipped 2)" in r.stdout, r.stderr[-3000:]
    again = objects(s3, BUCKET, "runs/mini/merged/")
    assert again["runs/mini/merged/model.safetensors"] == stored["runs/mini/merged/model.safetensors"]


def test_stage_commands_read_and_write_s3(s3, tmp_path):
    recipe = tmp_path / "mini.yaml"
    recipe.write_text(RECIPE)
    run = f"s3://{BUCKET}/runs/cmd"
    r = _cli("run", str(recipe), "--out", run)
    assert r.returncode == 0, r.stderr[-3000:]
    up = f"s3://{BUCKET}/models/up2"
    r = _cli("upscale", "--source", f"{run}/base", "--m", "2", "--out", up)
    assert r.returncode == 0, r.stderr[-3000:]
    stored = objects(s3, BUCKET, "models/up2/")
    assert f"models/up2/{OUTPUT_MARKER}" in stored and "models/up2/model.safetensors" in stored

    assert json.loads(stored["models/up2/config.json"])["num_hidden_layers"] == 4  # 2 * (4 - 2)
    # models read back from s3 (4 layers each) merge into s3
    r = _cli("merge", "--models", up, f"{run}/base", "--method", "linear", "--weights",
             "0.5", "0.5", "--out", f"s3://{BUCKET}/models/m")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    merged = objects(s3, BUCKET, "models/m/")
    assert json.loads(merged["models/m/solar.json"])["stage"] == "merge"
    assert f"models/m/{OUTPUT_MARKER}" in merged


def test_outputs_on_s3_need_a_finished_marker_to_be_read(s3, tmp_path):
    uri = f"s3://{BUCKET}/half/model"
    import boto3

    boto3.client("s3").put_object(Bucket=BUCKET, Key="half/model/config.json", Body=b"{}")
    r = _cli("upscale", "--source", uri, "--m", "1", "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert "not a finished solar-ray output" in r.stderr and not (tmp_path / "o").exists()


def test_check_location():
    remote.check_location("runs/x")
    remote.check_location("file:///tmp/x")
    remote.check_location("s3://b/x")
    with pytest.raises(UserError, match=r"^out: 's3://' names no bucket"):
        remote.check_location("s3://")
    with pytest.raises(UserError, match=r"^ppl: 'ftp://h/x'"):
        remote.check_location("ftp://h/x", "ppl")
    with pytest.raises(UserError, match=r"^out: 'gs:///' names no bucket"):
        remote.check_location("gs:///")
    for key in ("s3://b/pages/https://example.com/a", "s3://b/pages/https://"):
        remote.check_location(key)  # a key may hold "://"; the first one ends the scheme
    for bucketless in ("s3:///x", "s3://://x", "gs://:b/x", "s3://-b/x"):
        with pytest.raises(UserError, match=rf"^out: '{re.escape(bucketless)}' names no bucket$"):
            remote.check_location(bucketless)
    remote.check_location("gs://my_bucket.example-1/x")


@pytest.mark.parametrize(
    "uri, parts, joined",
    [
        ("s3://b/runs/x/", ("/base/", "", "/", "model.safetensors"), "s3://b/runs/x/base/model.safetensors"),
        ("gs://b/SFT-MIX", ("X",), "gs://b/SFT-MIX/X"),
    ],
)
def test_join_gives_single_slashes(uri, parts, joined):
    assert remote.join(uri, *parts) == joined


def test_a_remote_run_has_one_mirror_per_uri_where_stages_may_write(cache):
    uri = "s3://b/exp/SFT-MIX"
    mirror = remote.mirror_dir(uri + "/")
    assert mirror.parent == cache / "runs" and re.fullmatch(r"SFT-MIX-[0-9a-f]+", mirror.name)
    assert remote.mirror_dir(uri) == mirror
    others = ("gs://b/exp/SFT-MIX", "s3://b/exp2/SFT-MIX", "s3://b/X", "s3://b/X/X")
    assert len({mirror, *map(remote.mirror_dir, others)}) == 5
    check_output(mirror / "base")  # a stage may write into it; the rest of the cache is refused


def test_materialize_downloads_an_input_once_into_the_cache(s3, cache, tmp_path):
    files = {"config.json": b"{}", "sub/rows.jsonl": os.urandom(2000)}
    uri = f"s3://{BUCKET}/mat/SFT-MIX"
    remote.publish(_output(tmp_path / "out", files), uri)
    copy = remote.materialize(uri + "/")
    assert copy.parent.parent == cache / "objects" and copy.name == "SFT-MIX"
    assert _tree(copy) == files
    mtime = (copy / "config.json").stat().st_mtime_ns
    assert remote.materialize(uri) == copy and (copy / "config.json").stat().st_mtime_ns == mtime


def test_local_copy_is_the_path_on_its_node_else_a_copy_from_the_bucket(s3, cache, tmp_path):
    out = _output(tmp_path / "model", {"config.json": b'{"a": 1}'})
    uri = f"s3://{BUCKET}/lc/model"
    remote.publish(out, uri)
    assert remote.local_copy(str(out), uri) == str(out)
    assert remote.local_copy(str(out), None) == str(out)
    elsewhere = str(tmp_path / "other-node" / "model")  # the driver's path, absent on this node
    copy = remote.local_copy(elsewhere, uri)
    assert copy == str(remote.materialize(uri)) and _tree(Path(copy)) == {"config.json": b'{"a": 1}'}
    assert remote.local_copy(elsewhere, None) == elsewhere


def test_download_with_names_copies_only_those_files(s3, tmp_path):
    files = {"a.safetensors": b"w", "eval/x/results.json": b'{"acc": 1}', "manifest.json": b"{}",
             "solar.json": b"{}"}  # fmt: skip
    uri = f"s3://{BUCKET}/names/stage"
    remote.publish(_output(tmp_path / "out", files), uri)
    view = remote.download(uri, tmp_path / "view" / "stage", names={"manifest.json", "results.json"})
    assert _tree(view) == {k: files[k] for k in ("eval/x/results.json", "manifest.json")}


def test_copies_of_one_artifact_sign_alike_and_its_writer_is_not_sent_it_back(s3, tmp_path):
    out = _output(tmp_path / "out", {"config.json": b"{}", "model.safetensors": b"w"})
    uri = f"s3://{BUCKET}/sign/model"
    remote.publish(out, uri)
    # the node that published it (a run's mirror) already holds it: nothing is downloaded
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert remote.download(uri, out) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # two nodes' copies, made at different times, sign as the one artifact they copy
    a, b = remote.download(uri, tmp_path / "node-a"), remote.download(uri, tmp_path / "node-b")
    os.utime(b / "model.safetensors", ns=(0, 0))
    assert identity.dir_signature(a) == identity.dir_signature(b)


def test_publish_uploads_the_files_that_links_point_to(s3, tmp_path):
    """A ``model`` stage links its source's files; a linked folder is followed too."""
    src = tmp_path / "src"
    (src / "tok").mkdir(parents=True)
    (src / "config.json").write_bytes(b'{"n": 1}')
    (src / "tok" / "tokenizer.json").write_bytes(b"{}")
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "config.json").symlink_to(src / "config.json")
        (tmp / "tokenizer").symlink_to(src / "tok", target_is_directory=True)
    remote.publish(tmp_path / "out", f"s3://{BUCKET}/links/model")
    stored = _stored(s3, "links/model")
    assert {k: v for k, v in stored.items() if k != OUTPUT_MARKER} == {
        "config.json": b'{"n": 1}', "tokenizer/tokenizer.json": b"{}"}  # fmt: skip


def test_a_prefix_whose_marker_is_not_an_object_is_not_finished(s3, tmp_path):
    import boto3

    client = boto3.client("s3")
    client.put_object(Bucket=BUCKET, Key="listy/model/config.json", Body=b"{}")
    client.put_object(Bucket=BUCKET, Key=f"listy/model/{OUTPUT_MARKER}", Body=b'["id"]')
    uri = f"s3://{BUCKET}/listy/model"
    assert remote.read_marker(uri) is None
    with pytest.raises(UserError, match="not a finished solar-ray output"):
        remote.download(uri, tmp_path / "copy")


class _Store:
    """A store whose client reports every read as ``error`` (GCS's, older pyarrow's S3)."""

    def __init__(self, error: OSError) -> None:
        self.error = error

    def open_input_stream(self, path: str):
        raise self.error


@pytest.mark.parametrize(
    "message, missing",
    [("Path does not exist 'b/k'", True), ("GCS: object b/k Not Found", True), ("Access Denied", False)],
)
def test_read_json_tells_a_missing_object_from_a_failing_store(monkeypatch, message, missing):
    monkeypatch.setattr(remote, "arrow_filesystem", lambda uri: (_Store(OSError(message)), "b/k"))
    if missing:
        assert remote.read_json("gs://b/k") is None
    else:
        with pytest.raises(StorageError, match=r"^cannot read gs://b/k: Access Denied$"):
            remote.read_json("gs://b/k")


def _fail_second_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The store drops the connection on the second file transferred."""
    import pyarrow.fs as pafs

    real, calls = pafs.copy_files, []

    def copy(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise OSError("connection reset by peer")
        return real(*args, **kwargs)

    monkeypatch.setattr(pafs, "copy_files", copy)


def test_a_store_failing_midway_is_one_line_and_nothing_looks_finished(s3, tmp_path):
    uri = f"s3://{BUCKET}/midway/model"
    v1 = {"a.bin": b"1", "b.bin": b"1"}
    remote.publish(_output(tmp_path / "v1", v1), uri)
    copy = remote.download(uri, tmp_path / "copy")
    line = rf"^{uri}: the object store failed: connection reset by peer$"

    # an upload failing midway: the prefix is not finished (and stays solar-ray's to replace)
    v2 = _output(tmp_path / "v2", {"a.bin": b"2", "b.bin": b"2"})
    with pytest.MonkeyPatch.context() as mp:
        _fail_second_copy(mp)
        with pytest.raises(StorageError, match=line):
            remote.publish(v2, uri)
    assert remote.read_marker(uri) is None and remote.UPLOAD_MARKER in _stored(s3, "midway/model")
    with pytest.raises(UserError, match="not a finished solar-ray output"):
        remote.download(uri, copy)
    assert _tree(copy) == v1

    # a download failing midway: the previous copy is left whole, no partial one beside it
    remote.publish(v2, uri)
    with pytest.MonkeyPatch.context() as mp:
        _fail_second_copy(mp)
        with pytest.raises(StorageError, match=line):
            remote.download(uri, copy)
    assert _tree(copy) == v1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".copy")) == [".copy.lock"]
    remote.download(uri, copy)
    assert _tree(copy) == {"a.bin": b"2", "b.bin": b"2"}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".copy")) == [".copy.lock"]


@pytest.mark.parametrize(
    "error, what",
    [(OSError("timed out\n  retrying"), "timed out"), (ConnectionResetError(), "ConnectionResetError"),
     (OSError("x" * 400), "x" * 300)],
)  # fmt: skip
def test_a_failed_upload_is_one_line_naming_where_it_went(s3, monkeypatch, tmp_path, error, what):
    import pyarrow.fs as pafs

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(pafs, "copy_files", fail)
    log = tmp_path / "log.json"
    log.write_text("{}")
    with pytest.raises(StorageError) as e:
        remote.upload_file(log, f"s3://{BUCKET}/run/log.json")
    assert str(e.value) == f"s3://{BUCKET}/run/log.json: the object store failed: {what}"


def test_a_linked_file_gone_before_the_upload_is_named_as_a_local_error(s3, tmp_path):
    """A ``model`` stage's link whose source was removed: the local file is the problem."""
    (tmp_path / "src.json").write_text("{}")
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "config.json").symlink_to(tmp_path / "src.json")
    (tmp_path / "src.json").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "out" / "config.json"))):
        remote.publish(tmp_path / "out", f"s3://{BUCKET}/gone/model")
    assert remote.read_marker(f"s3://{BUCKET}/gone/model") is None


def test_upload_file_puts_one_object(s3, tmp_path):
    f = tmp_path / "recipe.json"
    f.write_bytes(b'{"name": "mini"}')
    remote.upload_file(f, remote.join(f"s3://{BUCKET}/up/run", ".pipeline", "recipe.json"))
    assert _stored(s3, "up") == {"run/.pipeline/recipe.json": b'{"name": "mini"}'}


# --------------------------------------------------------------------------- run_to_out


class _StageCfg(StageConfig):
    out: str | None = None
    overwrite: bool = False
    text: str = "v1"


class _TrainCfg(_StageCfg):
    storage_path: str | None = None


def _stage(cfg: _StageCfg, ran: list) -> str:
    """A stage as the commands run one: it checks its ``out`` and writes it atomically."""
    ran.append(cfg)
    with atomic_output_dir(cfg.out, cfg.overwrite) as tmp:
        (tmp / "data.txt").write_text(cfg.text)
        if cfg.text == "crash":
            raise RuntimeError("the stage crashed")
    return f"wrote {cfg.text}"


def test_run_to_out_runs_a_stage_in_the_cache_and_publishes_it(s3, cache, caplog):
    uri = f"s3://{BUCKET}/jobs/SFT-MIX"
    ran: list = []
    run = functools.partial(_stage, ran=ran)
    with caplog.at_level(logging.INFO, logger="solar_ray.remote"):
        assert remote.run_to_out(run, _TrainCfg(out=uri + "/")) == "wrote v1"
    staging = Path(ran[0].out)
    assert staging.parent.parent == cache / "staging" and staging.name == "SFT-MIX"
    assert ran[0].storage_path == f"s3://{BUCKET}/jobs/ray_train"  # Ray Train's state beside it
    stored = _stored(s3, "jobs/SFT-MIX")
    assert stored["data.txt"] == b"v1" and set(stored) == {"data.txt", OUTPUT_MARKER}
    assert f"uploaded {staging} -> {uri}" in caplog.messages
    # again (the staging directory is solar-ray's own to replace); a storage_path given stays
    cfg = _TrainCfg(out=uri, text="v2", storage_path="s3://other/ray")
    assert remote.run_to_out(run, cfg) == "wrote v2"
    assert ran[1].out == ran[0].out and ran[1].storage_path == "s3://other/ray"
    assert _stored(s3, "jobs/SFT-MIX")["data.txt"] == b"v2"


def test_run_to_out_publishes_nothing_when_the_stage_fails(s3, cache):
    run = functools.partial(_stage, ran=[])
    uri = f"s3://{BUCKET}/jobs/crashy"
    remote.run_to_out(run, _StageCfg(out=uri))
    before = _stored(s3, "jobs/crashy")
    with pytest.raises(RuntimeError, match="the stage crashed"):
        remote.run_to_out(run, _StageCfg(out=uri, text="crash"))
    assert _stored(s3, "jobs/crashy") == before  # the finished output stays as it was
    with pytest.raises(RuntimeError, match="the stage crashed"):
        remote.run_to_out(run, _StageCfg(out=f"s3://{BUCKET}/jobs/never", text="crash"))
    assert _stored(s3, "jobs/never") == {} and remote.read_marker(f"s3://{BUCKET}/jobs/never") is None


def test_run_to_out_refuses_before_the_stage_runs_and_leaves_local_outputs_alone(s3, cache, tmp_path):
    import boto3

    boto3.client("s3").put_object(Bucket=BUCKET, Key="theirs-rto/data.csv", Body=b"1,2")
    ran: list = []
    run = functools.partial(_stage, ran=ran)
    with pytest.raises(UserError, match=rf"^out: s3://{BUCKET}/theirs-rto holds objects that solar-ray"):
        remote.run_to_out(run, _StageCfg(out=f"s3://{BUCKET}/theirs-rto"))
    with pytest.raises(StorageError, match=r"^out: 'ftp://h/x': outputs go to a local or shared path"):
        remote.run_to_out(run, _StageCfg(out="ftp://h/x"))
    assert ran == [] and _stored(s3, "theirs-rto") == {"data.csv": b"1,2"} and not cache.exists()
    # a local output, no output, a config without one: the stage runs as it is
    local = _StageCfg(out=str(tmp_path / "local"))
    assert remote.run_to_out(run, local) == "wrote v1" and ran[0] is local
    assert (tmp_path / "local" / "data.txt").read_text() == "v1"
    none = _StageCfg()
    assert remote.run_to_out(lambda c: c, none) is none

    class _NoOut(StageConfig):
        n: int = 1

    assert remote.run_to_out(lambda c: c.n, _NoOut()) == 1


def test_publish_to_an_unreachable_store_is_one_line_naming_it(monkeypatch, tmp_path):
    out = _output(tmp_path / "out", {"a.txt": b"a"})
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(StorageError, match=r"^s3://bucket/up: the object store failed: .*connect"):
        remote.publish(out, "s3://bucket/up")
    assert _tree(out) == {"a.txt": b"a"}


# --------------------------------------------------------------------------- unreachable stores


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _offline_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No cloud credentials, every endpoint a closed loopback port (nothing leaves the host)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "GOOGLE_", "GCE_", "CLOUD_STORAGE_"))}  # fmt: skip
    port = _closed_port()
    env.update(HOME=str(tmp_path), SOLAR_RAY_CACHE=str(tmp_path / "cache"),
               GCE_METADATA_ROOT=f"127.0.0.1:{port}", AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
               AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y", AWS_EC2_METADATA_DISABLED="true",
               **extra)  # fmt: skip
    return env


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_an_unreachable_store_fails_in_bounded_time_with_one_line(tmp_path, scheme):
    """gs:// without credentials retried for 15 minutes (pyarrow's default); now the retries
    stop after SOLAR_RAY_STORAGE_RETRY_S and the command says so in one line."""
    import time

    env = _offline_env(tmp_path, SOLAR_RAY_STORAGE_RETRY_S="2")
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "solar_ray.cli", "upscale", "--source",
                        str(tmp_path / "src"), "--m", "1", "--out", f"{scheme}://bucket/up"],
                       env=env, capture_output=True, text=True, timeout=90)  # fmt: skip
    assert time.monotonic() - start < 60
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"solar-ray upscale: error: {scheme}://bucket/up: the object store failed")


def test_a_hanging_request_holds_off_no_signal(tmp_path, monkeypatch):
    """A request retrying for 30 s (gs:// without credentials) waits in a helper thread: a
    signal's handler runs at once, and a process stopped by one exits at once."""
    import threading
    import time

    class Stop(Exception):
        pass

    def stop(signum, frame):
        raise Stop

    env = _offline_env(tmp_path, SOLAR_RAY_STORAGE_RETRY_S="30")
    for k in [k for k in os.environ if k.startswith(("GOOGLE_", "GCE_", "CLOUD_STORAGE_"))]:
        monkeypatch.delenv(k)
    for k in ("HOME", "GCE_METADATA_ROOT", "SOLAR_RAY_STORAGE_RETRY_S"):
        monkeypatch.setenv(k, env[k])
    previous = signal.signal(signal.SIGUSR1, stop)
    try:
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        start = time.monotonic()
        with pytest.raises(Stop):
            remote.list_files("gs://bucket/x")
        assert time.monotonic() - start < 5
    finally:
        signal.signal(signal.SIGUSR1, previous)

    # a SIGTERM handler that exits as the CLI's does; the hanging request must not hold the exit
    code = ("import signal, sys\n"
            "signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))\n"
            "from solar_ray import remote\n"
            "print('listing', flush=True)\n"
            "remote.list_files('gs://bucket/x')")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout.readline() == "listing\n"
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert time.monotonic() - sent < 10 and proc.returncode == 143, err[-2000:]


def test_a_signal_stops_a_command_waiting_on_the_store(tmp_path):
    """SIGTERM while a request retries (for up to 10 minutes here) stops at once: one line, 143."""
    import time

    env = _offline_env(tmp_path, SOLAR_RAY_STORAGE_RETRY_S="600")
    proc = subprocess.Popen([sys.executable, "-m", "solar_ray.cli", "upscale", "--source",
                             str(tmp_path / "src"), "--m", "1", "--out", "gs://bucket/up"],
                            env=env, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        time.sleep(3)  # in the GCS client's retry loop by now
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert time.monotonic() - sent < 10
    assert proc.returncode == 128 + signal.SIGTERM
    assert err == "solar-ray upscale: stopped by SIGTERM; partial outputs were removed\n"
