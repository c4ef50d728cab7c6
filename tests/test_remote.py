"""Outputs and run directories on object storage, against a real S3 server (moto's).

Fast tests here: publishing with the marker last, an upload killed midway never taken as
finished, foreign prefixes refused and left as they were, a recipe of non-Ray stages into
``s3://`` and back (skipped from the bucket alone, on a node with an empty cache), and the
stage commands writing to ``s3://``. The Ray recipe (training checkpoints in the bucket,
a stopped job resumed) is in ``test_remote_ray.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import waits_for_lock
from s3_server import objects, s3_server

from solar_ray import remote
from solar_ray.checkpoint import OUTPUT_MARKER, atomic_output_dir
from solar_ray.errors import UserError

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
