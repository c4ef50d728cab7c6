"""solar_ray.fs: one meaning of "URI", one way to open a location with either library."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
import pytest

from solar_ray.fs import (
    StorageError,
    arrow_filesystem,
    cache_dir,
    files_under,
    fsspec_filesystem,
    is_uri,
    local_path,
    output_path,
    parquet_files,
    qualify,
)


def test_is_uri_and_local_path(tmp_path: Path) -> None:
    assert is_uri("s3://bucket/run") and is_uri("gs://b/x") and is_uri("hf://datasets/x")
    assert is_uri("file:///abs/x") and is_uri("https://example.com/a.jsonl")
    assert not is_uri("jobs/tiny.yaml") and not is_uri("/abs/path") and not is_uri("C:x")
    assert local_path("file:///abs/x") == "/abs/x"
    assert local_path("~/x") == str(Path.home() / "x")
    assert local_path("rel") == str(Path("rel").absolute())
    assert local_path("s3://bucket/run") is None and local_path("hf://datasets/x") is None


def test_both_libraries_open_the_same_locations(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hi")
    for where in (str(tmp_path), f"file://{tmp_path}"):
        fs, root = arrow_filesystem(where)
        assert isinstance(fs, pafs.LocalFileSystem) and root == str(tmp_path)
        ffs, froot = fsspec_filesystem(where)
        assert ffs.cat_file(f"{froot}/a.txt") == b"hi"
        assert qualify(f"{root}/a.txt", where) == str(tmp_path / "a.txt")
    assert qualify("bucket/key/a.parquet", "s3://bucket/key") == "s3://bucket/key/a.parquet"
    assert qualify("https://h/a.jsonl", "https://h/a.jsonl") == "https://h/a.jsonl"
    with pytest.raises(StorageError, match="cannot open 'nope://x'"):
        arrow_filesystem("nope://x")


def test_one_listing_with_each_callers_filter(tmp_path: Path) -> None:
    for name in ("b/1.parquet", "a.parquet", ".hidden.parquet", "c/.x", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    fs, root = arrow_filesystem(str(tmp_path))
    every = (".hidden.parquet", "a.parquet", "b/1.parquet", "c/.x", "notes.txt")
    assert files_under(fs, root) == [f"{root}/{n}" for n in every]  # what an upload copies
    assert parquet_files(fs, root) == [f"{root}/a.parquet", f"{root}/b/1.parquet"]
    assert files_under(fs, f"{root}/missing") == parquet_files(fs, f"{root}/missing") == []


def test_output_paths_and_the_cache(tmp_path: Path, monkeypatch) -> None:
    assert output_path(f"file://{tmp_path}/x") == output_path(str(tmp_path / "x")) == tmp_path / "x"
    assert output_path("file:////abs//x") == Path("/abs/x")
    monkeypatch.chdir(tmp_path)
    assert output_path("rel") == tmp_path / "rel"
    for given, meant in (("S3:bucket/x", "s3://bucket/x"), ("gcs:/b", "gcs://b"), ("https:h/a", "https://h/a"),
                         ("file:/x", "file:///x")):  # fmt: skip
        with pytest.raises(StorageError, match=f"out: '{given}' is not a valid location; did you mean '{meant}'"):
            output_path(given)
    with pytest.raises(StorageError, match="'file://host/x' names a host"):
        output_path("file://host/x")
    with pytest.raises(StorageError, match="'s3://b/x' is not a local path"):
        output_path("s3://b/x")
    monkeypatch.setenv("SOLAR_RAY_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SOLAR_RAY_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "solar-ray"
