"""Model merging: weighted linear averages and SLERP, streamed tensor by tensor.

:func:`run_merge` never holds a model: it reads the safetensors headers, ``pread``-s
fixed-size element ranges of each tensor from every input, combines them in float32 (float64
for a float64 input) and appends to the output shard, so peak memory is about
``(num_models + 2) * chunk_mb``. ``ties``, ``dare_*``, ``task_arithmetic`` and
``model_stock`` are delegated to mergekit. Inputs that disagree raise :class:`MergeError`.
Methods, what is refused and the output: docs/merge-eval.md.
"""

from __future__ import annotations

import filecmp
import functools
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from solar_ray.checkpoint import (
    atomic_output_dir,
    check_free_space,
    check_output,
    library_version,
    local_inputs,
    write_json_atomic,
    write_manifest,
    write_model_card,
)
from solar_ray.config import StageConfig
from solar_ray.errors import UserError
from solar_ray.identity import in_background, model_fingerprint
from solar_ray.models import check_tensor_shapes, read_config, resolve_model
from solar_ray.progress import Progress
from solar_ray.upscale import (
    AUX_FILES,
    OutTensor,
    TensorRef,
    _header_bytes,
    read_model_tensors,
    shard_tensors,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "MERGEKIT_METHODS",
    "MergeConfig",
    "MergeError",
    "MergeResult",
    "check_compatible",
    "linear_coefficients",
    "run_merge",
    "slerp_coefficients",
]

log = logging.getLogger(__name__)

NATIVE_METHODS = ("linear", "slerp")
#: methods run by mergekit; the value says whether the method needs ``base_model``
MERGEKIT_METHODS: dict[str, bool] = {
    "ties": True,
    "dare_ties": True,
    "dare_linear": True,
    "task_arithmetic": True,
    "model_stock": True,
}
MergeMethod = Literal["linear", "slerp", "ties", "dare_ties", "dare_linear", "task_arithmetic", "model_stock"]  # fmt: skip

#: config.json fields that must agree for a merge to make sense (equal shapes are not
#: enough: the same weights under a different head count compute something else)
STRUCTURAL_FIELDS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
    "hidden_act",
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "special_tokens_map.json",
    "tokenizer_config.json",
)
#: the SLERP fallback to linear interpolation above this |cos theta| (as in mergekit)
DOT_THRESHOLD = 0.9995
_NORM_EPS = 1e-8
_DOT_CHUNK_ELEMS = 4 << 20
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


class MergeError(UserError):
    """The models cannot be merged as asked; the message names the first mismatch."""


# --------------------------------------------------------------------------- config


class MergeConfig(StageConfig):
    """The ``merge`` stage: input models, a method and its parameters, an output directory."""

    models: list[str] = Field(description="model sources: HF dirs, hub ids, .gguf, aliases")
    method: MergeMethod = "linear"
    weights: list[float] | None = Field(
        default=None, description="one weight per model (linear, mergekit); default equal"
    )
    normalize: bool | None = Field(
        default=None,
        description="divide weights by their sum; default: true for linear, mergekit's own "
        "default for ties (true), dare_ties, dare_linear, task_arithmetic (false)",
    )
    t: float = Field(default=0.5, ge=0.0, le=1.0, description="slerp: 0 -> models[0], 1 -> models[1]")
    base_model: str | None = Field(
        default=None, description="ties/dare/task_arithmetic/model_stock: the common base"
    )
    density: float | None = Field(
        default=None, gt=0.0, le=1.0,
        description="ties/dare: fraction of deltas kept; default mergekit's (1.0: all)",
    )  # fmt: skip
    out: str | None = Field(default=None, description="output directory")
    out_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        default=None, description="output dtype; default: each tensor keeps models[0]'s dtype"
    )
    chunk_mb: int = Field(default=64, ge=1, description="elements read per model per step (MiB)")
    max_shard_size_mb: int = Field(default=2048, ge=1)
    seed: int = Field(default=0, description="mergekit random seed (dare_* drop masks)")
    allow_pickle: bool = Field(
        default=False, description="convert a pickle .bin input (torch.load weights_only=True)"
    )
    overwrite: bool = False
    hash_inputs: bool = Field(default=True, description="record sha256 of the input files")

    @model_validator(mode="after")
    def _check_method_args(self) -> MergeConfig:
        n = len(self.models)
        if n < 2 and not (self.method in MERGEKIT_METHODS and self.base_model and n >= 1):
            raise ValueError(f"models: at least two models are needed, got {n}")
        if self.method == "slerp" and n != 2:
            raise ValueError(f"models: slerp interpolates exactly two models, got {n}")
        if self.weights is not None:
            if self.method == "slerp":
                raise ValueError("weights: slerp takes t, not weights")
            if len(self.weights) != n:
                raise ValueError(f"weights: expected one weight per model ({n}), got {len(self.weights)}")
            if not all(math.isfinite(w) for w in self.weights):
                raise ValueError("weights: every weight must be a finite number")
            if self.method == "linear" and self.normalize is not False and sum(self.weights) == 0:
                raise ValueError("weights: they sum to 0 and cannot be normalized")
        if self.method in MERGEKIT_METHODS and not self.base_model:
            raise ValueError(f"base_model is required for method {self.method!r}")
        if self.method in NATIVE_METHODS and self.base_model:
            raise ValueError(f"base_model: method {self.method!r} does not use a base model")
        if self.density is not None and self.method not in ("ties", "dare_ties", "dare_linear"):
            raise ValueError(f"density: method {self.method!r} does not use density")
        if self.normalize is not None and self.method in ("slerp", "model_stock"):
            raise ValueError(f"normalize: method {self.method!r} does not use normalize")
        return self

    @property
    def linear_normalize(self) -> bool:
        """Whether ``linear`` divides the weights by their sum (unless told not to)."""
        return self.normalize is not False


@dataclass
class MergeResult:
    """What :func:`run_merge` made."""

    out: Path
    method: str
    num_tensors: int
    manifest: dict


# --------------------------------------------------------------------------- math


def linear_coefficients(weights: Sequence[float] | None, num_models: int, normalize: bool) -> list[float]:
    """The per-model coefficients of a weighted average (equal weights by default)."""
    ws = list(weights) if weights is not None else [1.0] * num_models
    if normalize:
        total = sum(ws)
        ws = [w / total for w in ws]
    return ws


def slerp_coefficients(t: float, dot: float) -> tuple[float, float]:
    """Coefficients ``(c_a, c_b)`` of ``c_a a + c_b b`` for SLERP at ``t`` given cos(theta).

    Falls back to linear interpolation when the vectors are nearly (anti)parallel, where
    ``sin(theta)`` vanishes. At ``t=0`` the result is exactly ``(1, 0)``; at ``t=1``
    exactly ``(0, 1)``. A non-finite ``dot`` (an inf in a tensor) has no angle: linear too.
    """
    if not math.isfinite(dot) or abs(dot) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(max(-1.0, min(1.0, dot)))
    sin_theta = math.sin(theta)
    return math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    table = {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
        "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
        "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
        "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    }  # fmt: skip
    if name not in table:
        raise MergeError(f"unsupported safetensors dtype {name!r}")
    return table[name]


_OUT_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


class _Reader:
    """``pread`` of element ranges from source shards into reused buffers.

    One open descriptor per file and one read buffer per input ``slot`` (model index), plus
    named scratch tensors, all reused from chunk to chunk: a fresh 64 MiB allocation per
    chunk costs more in page faults than the arithmetic does.
    """

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._bufs: dict[int, bytearray] = {}
        self._scratch: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def read(self, ref: TensorRef, start: int, count: int, slot: int) -> torch.Tensor:
        """Elements ``[start, start + count)`` of ``ref`` as a flat tensor of its dtype.

        The tensor views ``slot``'s buffer: it is valid until the next read into that slot.
        """
        import torch

        dtype = _torch_dtype(ref.dtype)
        itemsize = dtype.itemsize
        nbytes = count * itemsize
        if nbytes == 0:
            return torch.empty(0, dtype=dtype)
        fd = self._fds.get(ref.file)
        if fd is None:
            fd = self._fds[ref.file] = os.open(ref.file, os.O_RDONLY)
        buf = self._bufs.get(slot)
        if buf is None or len(buf) < nbytes:
            buf = self._bufs[slot] = bytearray(nbytes)
        view = memoryview(buf)
        done = 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:nbytes]], ref.offset + start * itemsize + done)
            if n <= 0:
                raise MergeError(f"{ref.file}: short read in tensor {ref.name!r} (file truncated?)")
            done += n
        return torch.frombuffer(buf, dtype=dtype, count=count)

    def scratch(self, name: str, dtype: torch.dtype, count: int) -> torch.Tensor:
        """A reused 1-D tensor of ``count`` elements (contents undefined)."""
        import torch

        t = self._scratch.get((name, dtype))
        if t is None or t.numel() < count:
            t = self._scratch[(name, dtype)] = torch.empty(count, dtype=dtype)
        return t[:count]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._bufs.clear()
        self._scratch.clear()


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape) if shape else 1


def _chunks(numel: int, chunk_elems: int) -> Iterator[tuple[int, int]]:
    for start in range(0, numel, chunk_elems):
        yield start, min(chunk_elems, numel - start)
    if numel == 0:
        yield 0, 0


def _combine_into(acc: torch.Tensor, parts: Sequence[torch.Tensor], coefs: Sequence[float]) -> None:
    """``acc = sum coef_i * part_i`` (in ``acc``'s dtype), skipping zero coefficients.

    Skipping keeps the ends exact: weights (1, 0) give ``1.0 * a``, bit for bit ``a``
    (adding ``0.0 * b`` would turn ``-0.0`` into ``0.0``). Mixed-dtype ``add_`` converts the
    bf16/fp16 input inside the kernel: the same math as converting first, one pass fewer.
    """
    first = True
    for x, c in zip(parts, coefs, strict=True):
        if c == 0.0:
            continue
        if first:
            acc.copy_(x)
            if c != 1.0:
                acc.mul_(c)
            first = False
        else:
            acc.add_(x, alpha=c)
    if first:  # every coefficient zero: the zero tensor
        acc.zero_()


def _slerp_dot(reader: _Reader, a: TensorRef, b: TensorRef, numel: int, chunk: int) -> float:
    """cos(theta) between two tensors as flat vectors, accumulated in float64 by chunks."""
    import torch

    aa = bb = ab = 0.0
    chunk = min(chunk, _DOT_CHUNK_ELEMS)  # float64 copies: keep them small
    for start, count in _chunks(numel, chunk):
        x = reader.scratch("dot_a", torch.float64, count)
        y = reader.scratch("dot_b", torch.float64, count)
        x.copy_(reader.read(a, start, count, 0))
        y.copy_(reader.read(b, start, count, 1))
        aa += float(torch.dot(x, x))
        bb += float(torch.dot(y, y))
        ab += float(torch.dot(x, y))
    norm_a, norm_b = math.sqrt(aa), math.sqrt(bb)
    if norm_a < _NORM_EPS or norm_b < _NORM_EPS:
        return 1.0  # a zero vector has no direction: interpolate linearly
    return ab / (norm_a * norm_b)


# --------------------------------------------------------------------------- checks


def _tokenizer_files(model_dir: Path) -> list[str]:
    return [n for n in TOKENIZER_FILES if (model_dir / n).is_file()]


def _tokenizer_mismatch(a_dir: Path, b_dir: Path) -> str | None:
    """A description of the first difference between two tokenizers, or None."""
    a_files, b_files = _tokenizer_files(a_dir), _tokenizer_files(b_dir)
    if not a_files and not b_files:
        return None
    if not a_files or not b_files:
        which, other = (a_dir, b_dir) if a_files else (b_dir, a_dir)
        return f"{which} has tokenizer files but {other} has none"
    if a_files == b_files and all(
        filecmp.cmp(a_dir / n, b_dir / n, shallow=False) for n in a_files
    ):
        return None
    from transformers import AutoTokenizer

    toks = []
    for d in (a_dir, b_dir):
        try:
            toks.append(AutoTokenizer.from_pretrained(str(d)))
        except Exception as e:  # a broken tokenizer is the user's file, not our bug
            raise MergeError(f"{d}: cannot load the tokenizer ({type(e).__name__}: {e})") from None
    ta, tb = toks
    va = {i: t for t, i in ta.get_vocab().items()}
    vb = {i: t for t, i in tb.get_vocab().items()}
    for i in sorted(set(va) | set(vb)):
        if va.get(i) != vb.get(i):
            return (
                f"token id {i} is {va.get(i, '<absent>')!r} in {a_dir} but "
                f"{vb.get(i, '<absent>')!r} in {b_dir}"
            )
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        sa, sb = getattr(ta, key, None), getattr(tb, key, None)
        if str(sa) != str(sb):
            return f"{key} is {sa!r} in {a_dir} but {sb!r} in {b_dir}"
    return None


def check_compatible(model_dirs: Sequence[Path]) -> dict[str, list[TensorRef]]:
    """Check that the models can be merged; return each tensor's refs, in models[0]'s order.

    Compared against the first model, in this order: tensor names, tensor shapes, the
    structural ``config.json`` fields (:data:`STRUCTURAL_FIELDS`) and the tokenizer. The
    first mismatch raises :class:`MergeError` naming the tensor, field or token.
    """
    first = model_dirs[0]
    all_refs = [read_model_tensors(d) for d in model_dirs]
    ref0 = all_refs[0]
    order = sorted(ref0, key=lambda k: (str(ref0[k].file), ref0[k].offset))
    for d, refs in zip(model_dirs[1:], all_refs[1:], strict=True):
        for name in order:
            if name not in refs:
                raise MergeError(f"tensor names differ: {name!r} is in {first} but not in {d}")
        for name in refs:
            if name not in ref0:
                raise MergeError(f"tensor names differ: {name!r} is in {d} but not in {first}")
        for name in order:
            if ref0[name].shape != refs[name].shape:
                raise MergeError(
                    f"tensor shapes differ: {name!r} is {ref0[name].shape} in {first} "
                    f"but {refs[name].shape} in {d}"
                )
            float0, float1 = ref0[name].dtype in _FLOAT_DTYPES, refs[name].dtype in _FLOAT_DTYPES
            if float0 != float1:
                raise MergeError(
                    f"tensor dtypes differ: {name!r} is {ref0[name].dtype} in {first} "
                    f"but {refs[name].dtype} in {d}"
                )
    config0 = read_config(first)
    for d in model_dirs[1:]:
        config = read_config(d)
        for key in STRUCTURAL_FIELDS:
            if config0.get(key) != config.get(key):
                raise MergeError(
                    f"config.json differs: {key} is {config0.get(key)!r} in {first} "
                    f"but {config.get(key)!r} in {d}"
                )
        mismatch = _tokenizer_mismatch(first, d)
        if mismatch:
            raise MergeError(f"tokenizers differ: {mismatch}")
    return {name: [refs[name] for refs in all_refs] for name in order}


# --------------------------------------------------------------------------- native writer


def _write_merged_shards(
    cfg: MergeConfig,
    tensors: dict[str, list[TensorRef]],
    out_dir: Path,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, str], int]:
    """Compute and write every merged tensor into ``out_dir``; return (weight map, bytes)."""
    import torch

    coefs = (
        linear_coefficients(cfg.weights, len(cfg.models), cfg.linear_normalize)
        if cfg.method == "linear"
        else None
    )
    planned: list[OutTensor] = []
    for name, refs in tensors.items():
        dtype = refs[0].dtype
        if cfg.out_dtype and dtype in _FLOAT_DTYPES:
            dtype = _OUT_DTYPES[cfg.out_dtype]
        itemsize = torch.empty((), dtype=_torch_dtype(dtype)).element_size()
        planned.append(OutTensor(name, dtype, refs[0].shape, _numel(refs[0].shape) * itemsize, None))
    shards = shard_tensors(planned, cfg.max_shard_size_mb << 20)
    chunk_elems = max(1, (cfg.chunk_mb << 20) // 4)
    reader = _Reader()
    weight_map: dict[str, str] = {}
    done = 0
    shown = Progress("merge", len(planned), "tensors")
    try:
        for shard in shards:
            with open(out_dir / shard.name, "wb") as f:
                f.write(_header_bytes(shard))
                for t in shard.tensors:
                    weight_map[t.name] = shard.name
                    refs = tensors[t.name]
                    numel = _numel(t.shape)
                    out_dtype = _torch_dtype(t.dtype)
                    if refs[0].dtype not in _FLOAT_DTYPES:
                        # integer buffers cannot be averaged: they must agree exactly
                        data = reader.read(refs[0], 0, numel, 0)
                        for r in refs[1:]:
                            if not torch.equal(data, reader.read(r, 0, numel, 1)):
                                raise MergeError(
                                    f"tensor {t.name!r} ({r.dtype}) differs between models "
                                    "and is not a float tensor, so it cannot be merged"
                                )
                        f.write(data.view(torch.uint8).numpy().data)
                    else:
                        _write_float_tensor(f, reader, cfg, refs, numel, out_dtype, coefs, chunk_elems)
                    done += 1
                    shown.update()
                    if progress:
                        progress(done, len(planned))
                f.flush()
                os.fsync(f.fileno())
    finally:
        reader.close()
        shown.close()
    return weight_map, sum(t.nbytes for t in planned)


def _write_float_tensor(
    f: Any,
    reader: _Reader,
    cfg: MergeConfig,
    refs: Sequence[TensorRef],
    numel: int,
    out_dtype: torch.dtype,
    coefs: Sequence[float] | None,
    chunk_elems: int,
) -> None:
    """Merge one float tensor chunk by chunk and append its bytes to ``f``."""
    import torch

    compute = (
        torch.float64
        if any(r.dtype == "F64" for r in refs) or out_dtype == torch.float64
        else torch.float32
    )
    if cfg.method == "slerp":
        dot = _slerp_dot(reader, refs[0], refs[1], numel, chunk_elems)
        tensor_coefs: Sequence[float] = slerp_coefficients(cfg.t, dot)
    else:
        assert coefs is not None
        tensor_coefs = coefs
    for start, count in _chunks(numel, chunk_elems):
        parts = [reader.read(r, start, count, i) for i, r in enumerate(refs)]
        acc = reader.scratch("acc", compute, count)
        _combine_into(acc, parts, tensor_coefs)
        if out_dtype == compute:
            merged = acc
        else:
            merged = reader.scratch("out", out_dtype, count)
            merged.copy_(acc)
        f.write(merged.view(torch.uint8).numpy().data)


# --------------------------------------------------------------------------- mergekit


def mergekit_config(cfg: MergeConfig, model_dirs: Sequence[Path], base_dir: Path) -> dict[str, Any]:
    """The mergekit YAML (as a dict) for a delegated method, on resolved local paths."""
    weights = cfg.weights if cfg.weights is not None else [1.0] * len(model_dirs)
    models = []
    for d, w in zip(model_dirs, weights, strict=True):
        params: dict[str, Any] = {}
        if cfg.method != "model_stock":
            params["weight"] = w
        if cfg.density is not None:
            params["density"] = cfg.density
        models.append({"model": str(d), **({"parameters": params} if params else {})})
    out: dict[str, Any] = {
        "merge_method": cfg.method,
        "base_model": str(base_dir),
        "models": models,
    }
    if cfg.normalize is not None:  # else mergekit's default for the method, as in its YAML
        out["parameters"] = {"normalize": cfg.normalize}
    out["dtype"] = cfg.out_dtype or _mergekit_dtype(base_dir)
    return out


def _mergekit_dtype(model_dir: Path) -> str:
    refs = read_model_tensors(model_dir)
    name = next(iter(refs.values())).dtype
    return {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(name, "float32")


def _run_mergekit(cfg: MergeConfig, model_dirs: Sequence[Path], base_dir: Path, out_dir: Path) -> dict:
    """Run a mergekit method into ``out_dir`` (the atomic temporary directory)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions
    from mergekit.merge import run_merge as mergekit_run_merge

    spec = mergekit_config(cfg, model_dirs, base_dir)
    try:
        merge_config = MergeConfiguration.model_validate(spec)
    except Exception as e:  # mergekit's own validation names the bad field
        raise MergeError(f"mergekit rejected the generated config: {e}") from None
    bytes_per_param = 4 if spec["dtype"] == "float32" else 2
    options = MergeOptions(
        # run_merge copies the base's tokenizer files itself: mergekit's fallback (load and
        # re-save) logs a traceback when the base has none, on a merge that succeeded
        copy_tokenizer=False,
        random_seed=cfg.seed,
        out_shard_size=(cfg.max_shard_size_mb << 20) // bytes_per_param,  # mergekit counts params
        safe_serialization=True,
        quiet=True,
        write_model_card=True,
    )
    mergekit_run_merge(merge_config, str(out_dir), options=options)
    return spec


# --------------------------------------------------------------------------- stage


def run_merge(cfg: MergeConfig, progress: Callable[[int, int], None] | None = None) -> MergeResult:
    """Merge ``cfg.models`` into ``cfg.out`` (atomically) and return the result.

    ``progress(done, total)`` is called after each tensor of a native merge.
    """
    if not cfg.out:
        raise MergeError("out: an output directory is required")
    inputs = local_inputs(*cfg.models, cfg.base_model)
    check_output(cfg.out, cfg.overwrite, inputs)
    model_dirs = [resolve_model(m, allow_pickle=cfg.allow_pickle) for m in cfg.models]
    base_dir = resolve_model(cfg.base_model, allow_pickle=cfg.allow_pickle) if cfg.base_model else None
    check_dirs = [base_dir, *model_dirs] if base_dir else model_dirs
    inputs.extend(check_dirs)
    tensors = check_compatible(check_dirs)
    lead = check_dirs[0]
    lead_config = read_config(lead)
    check_tensor_shapes(
        lead_config, {name: refs[0].shape for name, refs in tensors.items()}, f"merge of {lead}"
    )
    check_free_space(cfg.out, _merged_nbytes(cfg, tensors) + (1 << 20), "the merged model")

    jobs = [functools.partial(model_fingerprint, d) for d in check_dirs] if cfg.hash_inputs else []
    with in_background(jobs) as hashes:  # the inputs' content hashes, while the merge runs
        with atomic_output_dir(cfg.out, overwrite=cfg.overwrite, inputs=inputs) as tmp:
            extra: dict[str, Any] = {}
            if cfg.method in NATIVE_METHODS:
                weight_map, total = _write_merged_shards(cfg, tensors, tmp, progress)
                if len(set(weight_map.values())) > 1:
                    write_json_atomic(
                        tmp / "model.safetensors.index.json",
                        {"metadata": {"total_size": total}, "weight_map": weight_map},
                    )
                config = dict(lead_config)
                if cfg.out_dtype:
                    config["torch_dtype"] = cfg.out_dtype
                    config["dtype"] = cfg.out_dtype
                write_json_atomic(tmp / "config.json", config)
                for name in AUX_FILES:
                    if (lead / name).is_file():
                        shutil.copyfile(lead / name, tmp / name)
            else:
                assert base_dir is not None
                extra["mergekit_config"] = _run_mergekit(cfg, model_dirs, base_dir, tmp)
                written = read_model_tensors(tmp)  # mergekit wrote it: check before publishing
                check_tensor_shapes(
                    read_config(tmp), {n: r.shape for n, r in written.items()}, "mergekit's output"
                )
                for name in AUX_FILES:
                    if (lead / name).is_file() and not (tmp / name).is_file():
                        shutil.copyfile(lead / name, tmp / name)
                if not _tokenizer_files(tmp):
                    log.warning("the base model %s has no tokenizer files: the merged model has none", lead)
                extra["mergekit_version"] = library_version("mergekit")
            weights = (
                linear_coefficients(cfg.weights, len(cfg.models), cfg.linear_normalize)
                if cfg.method == "linear"
                else cfg.weights
            )
            write_model_card(tmp, f"Merge of {len(cfg.models)} models ({cfg.method})", _card_lines(cfg, weights))
            parents = []
            for i, d in enumerate(check_dirs):
                fp = hashes[i].result() if hashes else {"path": str(d)}
                is_base = base_dir is not None and i == 0
                fp["source"] = cfg.base_model if is_base else cfg.models[i - (1 if base_dir else 0)]
                fp["role"] = "base" if is_base else "model"
                parents.append(fp)
            manifest = write_manifest(
                tmp,
                "merge",
                parents=parents,
                config=cfg.to_dict(),
                method=cfg.method,
                weights=weights,
                t=cfg.t if cfg.method == "slerp" else None,
                base_model=cfg.base_model,
                num_tensors=len(tensors),
                **extra,
            )
    log.info("merged %d models (%s) into %s", len(cfg.models), cfg.method, cfg.out)
    return MergeResult(Path(cfg.out).absolute(), cfg.method, len(tensors), manifest)


def _merged_nbytes(cfg: MergeConfig, tensors: dict[str, list[TensorRef]]) -> int:
    """Bytes of the merged weights (each tensor in models[0]'s dtype, or ``out_dtype``)."""
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}
    total = 0
    for refs in tensors.values():
        if cfg.out_dtype and refs[0].dtype in _FLOAT_DTYPES:
            total += _numel(refs[0].shape) * itemsize[cfg.out_dtype]
        else:
            total += refs[0].nbytes
    return total


def _card_lines(cfg: MergeConfig, weights: Sequence[float] | None) -> list[str]:
    lines = [f"Made by `solar-ray merge` with method `{cfg.method}` from:", ""]
    for i, m in enumerate(cfg.models):
        detail = ""
        if weights is not None:
            detail = f" (weight {weights[i]:g})"
        elif cfg.method == "slerp":
            detail = f" (t = {0 if i == 0 else 1})"
        lines.append(f"- `{m}`{detail}")
    if cfg.method == "slerp":
        lines += ["", f"SLERP factor t = {cfg.t:g}."]
    if cfg.base_model:
        lines += ["", f"Base model: `{cfg.base_model}` (merge computed by mergekit)."]
    return lines
