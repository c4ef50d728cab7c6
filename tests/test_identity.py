"""Artifact identity (solar_ray.identity): what makes a key change, and what must not."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest

from solar_ray import identity
from solar_ray.checkpoint import OUTPUT_MARKER


def _sha(obj, length=16):
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def test_config_key_is_the_hash_of_the_canonical_config_without_the_ignored_fields():
    cfg = {"m": 8, "out": "/tmp/a", "nested": {"b": 2, "a": 1}, "workers": 4}
    # worked out independently: sorted keys, compact separators, top-level fields dropped
    assert identity.config_key(cfg, ignore=("out", "workers")) == _sha(
        {"m": 8, "nested": {"a": 1, "b": 2}}
    )
    assert identity.config_key(cfg) == _sha(cfg)
    assert identity.config_key(cfg, length=32) == _sha(cfg, 32)
    # values JSON lacks (paths) are keyed by their text
    assert identity.config_key({"out": Path("/tmp/a")}) == identity.config_key({"out": "/tmp/a"})
    # key order does not matter; values and nested fields do (ignore is top-level only)
    assert identity.config_key(dict(reversed(list(cfg.items())))) == identity.config_key(cfg)
    assert identity.config_key({**cfg, "m": 7}, ignore=("out",)) != identity.config_key(
        cfg, ignore=("out",)
    )
    assert identity.config_key({**cfg, "out": "/tmp/b"}, ignore=("out",)) == identity.config_key(
        cfg, ignore=("out",)
    )
    assert identity.config_key(
        {**cfg, "nested": {"a": 1, "b": 3}}, ignore=("nested.b",)
    ) != identity.config_key(cfg, ignore=("nested.b",))


def test_key_depends_on_every_part_and_their_order():
    assert identity.key("a", 1) == _sha(["a", 1])
    assert identity.key("a", 1) != identity.key(1, "a")
    assert identity.key("a") != identity.key("a", None)
    assert len(identity.key("a", length=8)) == 8


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_dir_signature_changes_with_signed_files_only(tmp_path):
    d = tmp_path / "model"
    cfg = _write(d / "config.json", "{}")
    _write(d / "model.safetensors", "x" * 10)
    readme = _write(d / "README.md", "hello")
    _write(d / "sub" / "data.parquet", "p")
    base = identity.dir_signature(d)
    assert identity.dir_signature(d) == base  # nothing is read or changed by signing

    readme.write_text("a changed model card")  # not a signed kind of file
    assert identity.dir_signature(d) == base

    st = cfg.stat()
    cfg.write_text("{ }")  # one byte more
    assert identity.dir_signature(d) != base
    cfg.write_text("{}")
    os.utime(cfg, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # same size, newer
    assert identity.dir_signature(d) != base
    os.utime(cfg, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert identity.dir_signature(d) == base

    _write(d / "tokenizer.json", "{}")  # an added file
    added = identity.dir_signature(d)
    assert added != base
    (d / "tokenizer.json").unlink()
    assert identity.dir_signature(d) == base

    # a nested file counts only when asked to recurse
    flat, deep = identity.dir_signature(d), identity.dir_signature(d, recursive=True)
    (d / "sub" / "data.parquet").write_text("pp")
    assert identity.dir_signature(d) == flat
    assert identity.dir_signature(d, recursive=True) != deep

    # a file moved or renamed, its size and mtime kept, is a different input
    deep = identity.dir_signature(d, recursive=True)
    (d / "sub2").mkdir()
    os.rename(d / "sub" / "data.parquet", d / "sub2" / "data.parquet")
    assert identity.dir_signature(d, recursive=True) != deep
    before = identity.dir_signature(d)
    os.rename(d / "model.safetensors", d / "model-00001.safetensors")
    assert identity.dir_signature(d) != before


def test_dir_signature_of_a_file_a_missing_path_and_a_downloaded_copy(tmp_path):
    f = _write(tmp_path / "a" / "data.jsonl", "{}\n")
    g = _write(tmp_path / "b" / "data.jsonl", "{}\n")
    os.utime(g, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns))
    # a file is signed by its own name, size and mtime: two equal files in two places agree
    assert identity.dir_signature(f) == identity.dir_signature(g)
    h = tmp_path / "b" / "other.jsonl"
    os.rename(g, h)
    assert identity.dir_signature(f) != identity.dir_signature(h)  # the name counts
    assert identity.dir_signature(tmp_path / "nope") != identity.dir_signature(tmp_path / "nope2")

    one, two = tmp_path / "copy1", tmp_path / "copy2"
    for d, mtime_file in ((one, "1"), (two, "22")):
        _write(d / "config.json", mtime_file)  # different local files...
        _write(d / OUTPUT_MARKER, json.dumps({"id": "w1", "copy_of": True, "artifact": "s3://b/x"}))
    # ...but copies of the same artifact sign alike
    assert identity.dir_signature(one) == identity.dir_signature(two)
    _write(two / OUTPUT_MARKER, json.dumps({"id": "w2", "copy_of": True, "artifact": "s3://b/x"}))
    assert identity.dir_signature(one) != identity.dir_signature(two)
    _write(two / OUTPUT_MARKER, json.dumps({"id": "w1", "copy_of": True, "artifact": "s3://b/y"}))
    assert identity.dir_signature(one) != identity.dir_signature(two)


def test_content_hash_follows_weights_and_config_not_the_card(tmp_path):
    d = tmp_path / "m"
    _write(d / "config.json", '{"a": 1}')
    w = _write(d / "model.safetensors", "weights")
    card = _write(d / "README.md", "card")
    h = identity.content_hash(d)
    card.write_text("another card")
    assert identity.content_hash(d) == h
    w.write_text("weightz")
    assert identity.content_hash(d) != h


def test_artifact_id_is_the_manifests_and_the_write_id(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    assert identity.artifact_id(d) is None  # no manifest: not a finished output
    assert identity.artifact_id(tmp_path / "missing") is None
    _write(d / "weights.bin", "w")
    assert identity.artifact_id(d) is None
    _write(d / "solar.json", '{"stage": "upscale"}')
    first = identity.artifact_id(d)
    assert first is not None and len(first) == 16
    _write(d / "weights.bin", "changed, but not a manifest")
    assert identity.artifact_id(d) == first
    _write(d / "rejects" / "manifest.json", "{}")  # rejects are not what the output is
    assert identity.artifact_id(d) == first
    _write(d / "mix" / "manifest.json", "{}")  # a nested manifest is
    nested = identity.artifact_id(d)
    assert nested != first
    os.rename(d / "mix", d / "mix2")  # where a manifest lies is part of what it says
    assert identity.artifact_id(d) not in (first, nested)
    os.rename(d / "mix2", d / "mix")
    assert identity.artifact_id(d) == nested
    _write(d / OUTPUT_MARKER, '{"id": "abc"}')  # made again: a new write id
    assert identity.artifact_id(d) != nested
    _write(d / "solar.json", '{"stage": "merge"}')
    assert identity.artifact_id(d) not in (first, nested)


def test_record_keeps_the_write_id_and_gives_one_when_missing(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    assert identity.recorded_key(d) is None
    identity.record(d, "k1")
    marker = identity.output_marker(d)
    assert marker["input_key"] == "k1" and len(marker["id"]) == 32
    identity.record(d, "k2")
    again = identity.output_marker(d)
    assert again["id"] == marker["id"] and identity.recorded_key(d) == "k2"
    _write(d / OUTPUT_MARKER, json.dumps({"id": "w", "format": "f", "input_key": 3}))
    assert identity.recorded_key(d) is None  # not a key
    identity.record(d, "k3")
    assert identity.output_marker(d) == {"id": "w", "format": "f", "input_key": "k3"}
    _write(d / OUTPUT_MARKER, "[1, 2]")  # not a mapping: as if none
    assert identity.output_marker(d) == {} and identity.recorded_key(d) is None


def test_in_background_runs_the_calls_in_turn_and_cancels_the_rest_on_leaving():
    with identity.in_background([lambda: 1, lambda: 1 / 0]) as (one, boom):
        assert one.result() == 1
        with pytest.raises(ZeroDivisionError):
            boom.result()
    started, release = threading.Event(), threading.Event()

    def running() -> str:
        started.set()
        release.wait(10)
        return "finished"

    with pytest.raises(KeyboardInterrupt), identity.in_background([running, lambda: "never"]) as (first, second):
        assert started.wait(10)
        threading.Timer(0.2, release.set).start()
        raise KeyboardInterrupt  # a stage stopped while its inputs are hashed
    # the running call was waited for; the next one, never started, is not run
    assert first.result(timeout=0) == "finished" and second.cancelled()
