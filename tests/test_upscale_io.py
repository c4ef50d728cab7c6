"""The upscale writer's I/O: invalid safetensors refused as ``safetensors`` refuses them,
non-regular weight files, the copy fallbacks (EXDEV, small chunks, zero runs and holes)."""

from __future__ import annotations

import errno
import json
import os
import re
import struct
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model
from safetensors import safe_open
from safety_helpers import SMALL, assert_refused_before_output
from stage_io import model_weights
from transformers import LlamaConfig

import solar_ray.upscale as upscale
from solar_ray.upscale import UpscaleConfig, run_upscale


@pytest.fixture
def src(tmp_path) -> Path:
    return save_tiny_model(LlamaConfig(num_hidden_layers=4, **SMALL), tmp_path / "src", seed=3)




def _split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + hlen]), raw[8 + hlen :]


def _join(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _rejected_by_safetensors(path: Path) -> None:
    with pytest.raises(Exception):  # noqa: B017,PT011 - its own error types vary by version
        with safe_open(str(path), "pt") as f:
            for k in f.keys():
                f.get_tensor(k)


def _overlap(header: dict, data: bytes) -> tuple[dict, bytes, str]:
    # the final norm's bytes are taken to be the first layer's input norm (same size)
    header["model.norm.weight"]["data_offsets"] = header["model.layers.0.input_layernorm.weight"]["data_offsets"]
    return header, data, r"'model\.norm\.weight' overlaps|overlaps tensor 'model\.norm\.weight'"


def _trailing(header: dict, data: bytes) -> tuple[dict, bytes, str]:
    return header, data + bytes(24), r"24 trailing bytes"


def _shape(header: dict, data: bytes) -> tuple[dict, bytes, str]:
    header["model.norm.weight"]["shape"] = [16]  # 64 bytes of F32, but 128 in the file
    return header, data, r"'model\.norm\.weight' holds 128 bytes but .*F32 \[16\]\) need 64"


@pytest.mark.parametrize("corrupt", [_overlap, _trailing, _shape], ids=["overlap", "trailing", "shape"])
def test_invalid_safetensors_refused_like_safetensors(capsys, tmp_path, src, corrupt):
    f = src / "model.safetensors"
    header, data, expect = corrupt(*_split(f))
    _join(f, header, data)
    _rejected_by_safetensors(f)
    out = tmp_path / "out"
    assert_refused_before_output(capsys, ["upscale", "--source", str(src), "--out", str(out), "--m", "1"], out,
           rf"^solar-ray upscale: error: {re.escape(str(f))}: .*({expect})")


def test_invalid_safetensors_refused_by_merge_too(capsys, tmp_path, src):
    """merge reads headers through the same reader: two tensors on the same bytes are refused."""
    other = save_tiny_model(LlamaConfig(num_hidden_layers=4, **SMALL), tmp_path / "b", seed=4)
    f = other / "model.safetensors"
    _join(f, *_overlap(*_split(f))[:2])
    out = tmp_path / "merged"
    assert_refused_before_output(capsys, ["merge", "--models", str(src), str(other), "--out", str(out)], out, "overlaps")


@pytest.mark.parametrize("size", [0, 5, 12])
def test_short_file_message_names_it_once(capsys, tmp_path, src, size):
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:size])
    out = tmp_path / "out"
    err = assert_refused_before_output(capsys, ["upscale", "--source", str(src), "--out", str(out), "--m", "1"], out,
                 r"truncated|corrupt safetensors header \(length")
    assert err.count(str(f)) == 1, err
    assert err.count("safetensors") == 2 if size == 12 else err.count("truncated") == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["directory", "fifo", "dangling link"])
def test_non_regular_weights_file_is_named(capsys, tmp_path, src, kind):
    f = src / "model.safetensors"
    f.unlink()
    {"directory": f.mkdir, "fifo": lambda: os.mkfifo(f),
     "dangling link": lambda: f.symlink_to(src / "gone.safetensors.part")}[kind]()  # fmt: skip
    out = tmp_path / "out"
    err = assert_refused_before_output(capsys, ["upscale", "--source", str(src), "--out", str(out), "--m", "1"], out,
                 rf"{re.escape(str(f))}: not a regular file")
    assert "index" not in err


# --------------------------------------------------------------------------- copy fallbacks


def _assert_bitwise_plan(out: Path, src: Path, plan: list[int]) -> None:
    """Every output tensor is bitwise its planned source tensor, none is missing, and
    safetensors reads the output (contiguous ranges, no trailing bytes)."""
    a, b = model_weights(out), model_weights(src)
    layer = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
    assert len(a) == sum(1 for k in b if not layer.match(k)) + len(plan) * 9  # 9 per Llama layer
    for name, t in a.items():
        mt = layer.match(name)
        want = b[f"model.layers.{plan[int(mt.group(1))]}.{mt.group(2)}"] if mt else b[name]
        assert t.dtype == want.dtype and torch.equal(t, want), name


def _move_to_end(path: Path, prefix: str) -> None:
    """Rewrite a safetensors file with the tensors named ``prefix*`` last (still valid)."""
    header, data = _split(path)
    new: dict = {"__metadata__": header.pop("__metadata__", {})}
    chunks, at = [], 0
    for name in sorted(header, key=lambda n: (n.startswith(prefix), n)):
        start, end = header[name]["data_offsets"]
        chunks.append(data[start:end])
        new[name] = {**header[name], "data_offsets": [at, at + end - start]}
        at += end - start
    _join(path, new, b"".join(chunks))


def test_exdev_fallback_with_small_chunks_is_bitwise(tmp_path, src, monkeypatch):
    """Layer 3, which the plan drops, ends the source file: a copy reading past a tensor's
    end would leave bytes after the output's last tensor (safetensors refuses that)."""
    _move_to_end(src / "model.safetensors", "model.layers.3.")
    calls = []

    def exdev(*args):
        calls.append(args)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", exdev, raising=False)
    monkeypatch.setattr(upscale, "READ_CHUNK", 100)  # every tensor spans several reads
    res = run_upscale(UpscaleConfig(source=str(src), out=str(tmp_path / "o"), method="explicit",
                                    layers=[0, 1, 2, 1], hash_inputs=False))  # fmt: skip
    assert calls  # the fast path was tried, and fell back
    _assert_bitwise_plan(res.out, src, [0, 1, 2, 1])


def test_copy_file_range_copying_nothing_falls_back(tmp_path, src, monkeypatch):
    monkeypatch.setattr(os, "copy_file_range", lambda *a: 0, raising=False)
    res = run_upscale(UpscaleConfig(source=str(src), out=str(tmp_path / "o"), m=1, hash_inputs=False))
    _assert_bitwise_plan(res.out, src, [0, 1, 2, 1, 2, 3])


def test_small_kernel_copy_chunks_are_bitwise(tmp_path, src, monkeypatch):
    monkeypatch.setattr(upscale, "COPY_CHUNK", 60)  # several copy_file_range calls a tensor
    res = run_upscale(UpscaleConfig(source=str(src), out=str(tmp_path / "o"), m=1, hash_inputs=False))
    _assert_bitwise_plan(res.out, src, [0, 1, 2, 1, 2, 3])


def test_zero_runs_and_holes_are_bitwise(tmp_path, monkeypatch):
    """A source whose MLP weights are zero, stored as holes of a sparse file; identity
    blocks (llama-pro) larger than the writer's zero buffer."""
    from safetensors.torch import save_file

    cfg = LlamaConfig(num_hidden_layers=4, **{**SMALL, "hidden_size": 64, "intermediate_size": 256})
    src = save_tiny_model(cfg, tmp_path / "src", seed=5)
    tensors = model_weights(src)
    for k in tensors:
        if ".mlp." in k:
            tensors[k] = torch.zeros_like(tensors[k])  # 64 KiB zero runs
    f = src / "model.safetensors"
    save_file(tensors, f, metadata={"format": "pt"})
    raw = f.read_bytes()
    with open(f, "wb") as sparse:  # the same bytes, every all-zero 4 KiB block a hole
        for at in range(0, len(raw), 4096):
            block = raw[at : at + 4096]
            if block.count(0) != len(block):
                sparse.seek(at)
                sparse.write(block)
        sparse.truncate(len(raw))
    assert f.read_bytes() == raw
    monkeypatch.setattr(upscale, "_ZEROS", bytes(100))
    res = run_upscale(UpscaleConfig(source=str(src), out=str(tmp_path / "o"), method="llama-pro",
                                    expand_every=2, hash_inputs=False))
    assert res.plan == [0, 1, 1, 2, 3, 3]
    manifest = json.loads((res.out / "solar.json").read_text())
    assert manifest["identity_layers"] == [2, 5] and manifest["m"] is None and manifest["method"] == "llama-pro"
    assert f"from `{src}` with method `llama-pro`.\n" in (res.out / "README.md").read_text()
    out, base = model_weights(res.out), model_weights(src)
    for j, i in enumerate(res.plan):
        for k in [k for k in base if k.startswith(f"model.layers.{i}.")]:
            got = out[k.replace(f"layers.{i}.", f"layers.{j}.")]
            identity = j in (2, 5) and (".o_proj." in k or ".down_proj." in k)
            assert torch.equal(got, torch.zeros_like(got) if identity else base[k]), (j, k)
    assert all(torch.equal(out[k], base[k]) for k in base if not k.startswith("model.layers."))


# --------------------------------------------------------------------------- the index file


def _indexed(tmp_path: Path, index: str) -> Path:
    """A model directory with one shard (tensors ``a`` and ``b``) and the given index text."""
    from safetensors.torch import save_file

    d = tmp_path / "m"
    d.mkdir()
    save_file({"a": torch.zeros(2), "b": torch.ones(3)}, d / "model.safetensors")
    (d / "model.safetensors.index.json").write_text(index)
    return d


@pytest.mark.parametrize(
    ("index", "message"),
    [
        ('{"weight_map": ', "not valid JSON (Expecting value: line 1 column 16 (char 15))"),
        ("[1]", "no 'weight_map' mapping of tensor names to shard files"),
        ('{"weight_map": {}}', "no 'weight_map' mapping of tensor names to shard files"),
        ('{"weight_map": ["model.safetensors"]}', "no 'weight_map' mapping of tensor names to shard files"),
        ('{"weight_map": {"a": "model.safetensors", "zz": "model.safetensors"}}',
         "tensor 'zz' is in the index but not in model.safetensors (1 missing)"),
    ],
)  # fmt: skip
def test_bad_index_is_named(tmp_path, index, message):
    d = _indexed(tmp_path, index)
    with pytest.raises(upscale.SafetensorsError) as info:
        upscale.read_model_tensors(d)
    where = d if "missing" in message else d / "model.safetensors.index.json"
    assert str(info.value) == f"{where}: {message}"


@pytest.mark.parametrize("shard", ["", ".", "..", "../model.safetensors", "sub/model.safetensors",
                                   "sub\\model.safetensors", "model.safetensors\0", 7])  # fmt: skip
def test_index_never_points_out_of_the_directory(tmp_path, shard):
    d = _indexed(tmp_path, json.dumps({"weight_map": {"a": "model.safetensors", "b": shard}}))
    with pytest.raises(upscale.SafetensorsError) as info:
        upscale.read_model_tensors(d)
    assert str(info.value) == (
        f"{d / 'model.safetensors.index.json'}: tensor 'b' maps to {shard!r}, which is not a file "
        "name in the model directory (reads never leave it)"
    )


def test_shard_named_by_the_index_but_absent_is_named(tmp_path):
    d = _indexed(tmp_path, json.dumps({"weight_map": {"a": "model.safetensors", "b": "model-2.safetensors"}}))
    with pytest.raises(upscale.SafetensorsError) as info:
        upscale.read_model_tensors(d)
    assert str(info.value) == f"{d / 'model-2.safetensors'}: listed in model.safetensors.index.json but missing"


def test_index_decides_which_shard_holds_a_tensor(tmp_path):
    """A tensor in two shards is read from the one the index names."""
    from safetensors.torch import save_file

    d = _indexed(tmp_path, json.dumps({"weight_map": {"a": "model-2.safetensors", "b": "model.safetensors"}}))
    save_file({"a": torch.full((2,), 5.0)}, d / "model-2.safetensors")
    refs = upscale.read_model_tensors(d)
    assert sorted(refs) == ["a", "b"]
    with open(refs["a"].file, "rb") as f:
        f.seek(refs["a"].offset)
        assert f.read(refs["a"].nbytes) == struct.pack("<2f", 5.0, 5.0)


# --------------------------------------------------------------------------- shards


def test_shards_fill_to_the_cap_one_source_file_each():
    """Shards hold up to the cap (a tensor bigger than it stands alone); tensors of two
    source files never share one; zeros join the shard of the tensor before them."""
    mib = 1 << 20

    def t(name: str, nbytes: int, file: str | None) -> upscale.OutTensor:
        src = None if file is None else upscale.TensorRef(name, "F32", [nbytes // 4], Path(file), 8, nbytes)
        return upscale.OutTensor(name, "F32", [nbytes // 4], nbytes, src)

    def layout(tensors: list[upscale.OutTensor], cap: int) -> list[tuple[str, list[str]]]:
        return [(s.name, [x.name for x in s.tensors]) for s in upscale.shard_tensors(tensors, cap)]

    assert layout([t("a", mib, "x"), t("b", mib, "x")], 2 * mib) == [("model.safetensors", ["a", "b"])]
    assert layout([t("a", mib, "x"), t("b", mib, "x"), t("c", 1, "x"), t("big", 3 * mib, "x")], 2 * mib) == [
        ("model-00001-of-00003.safetensors", ["a", "b"]),
        ("model-00002-of-00003.safetensors", ["c"]),
        ("model-00003-of-00003.safetensors", ["big"]),
    ]
    assert layout([t("a", 8, "x"), t("b", 8, "y"), t("z", 8, None), t("c", 8, "x")], mib) == [
        ("model-00001-of-00002.safetensors", ["a", "c"]),
        ("model-00002-of-00002.safetensors", ["b", "z"]),
    ]
