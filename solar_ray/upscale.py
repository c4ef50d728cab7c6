"""Depth up-scaling: layer plans and a streaming safetensors writer.

Layer plans (``solar``, ``llama-pro``, ``stack``, ``explicit``, a mergekit passthrough YAML
with :data:`MERGEKIT_KEYS`) are pure functions from the layer count to :class:`LayerSlot`
lists. The writer never loads the model and nothing here imports torch: it reads the
safetensors headers, checks every planned shape against the re-planned ``config.json``
(:func:`solar_ray.models.check_tensor_shapes`) and copies byte ranges with
``os.copy_file_range``, :data:`COPY_THREADS` shards at once, page-aligned as in the source
(:func:`aligned_layout`). The plans and the writer: README.md, "Concepts" and "CLI".
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import shutil
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from solar_ray.checkpoint import (
    atomic_output_dir,
    check_free_space,
    check_output,
    library_versions,
    local_inputs,
    write_json_atomic,
    write_manifest,
    write_model_card,
)
from solar_ray.config import StageConfig
from solar_ray.errors import UserError
from solar_ray.fs import expand_user
from solar_ray.identity import in_background, model_fingerprint, recorded_sha256
from solar_ray.models import (
    ArchSpec,
    ModelSourceError,
    arch_for_config,
    read_config,
)
from solar_ray.progress import Progress

__all__ = [
    "MAX_LAYERS",
    "MERGEKIT_KEYS",
    "LayerSlot",
    "SafetensorsError",
    "UpscaleConfig",
    "UpscaleError",
    "check_source_plan",
    "plan_explicit",
    "plan_from_mergekit",
    "plan_layers",
    "plan_llama_pro",
    "plan_solar",
    "plan_stack",
    "planned_num_layers",
    "replan_config",
    "run_upscale",
]

log = logging.getLogger(__name__)

#: tokenizer and generation files copied unchanged from the source model
AUX_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)

#: bits per element of each safetensors dtype (F4 and F6 are packed below a byte)
_DTYPE_BITS = {
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8,
    "U8": 8, "U16": 16, "U32": 32, "U64": 64, "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8,
    "F8_E8M0": 8, "C64": 64, "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4,
}  # fmt: skip


#: the most decoder layers a plan may produce. The largest open models have about 128; a
#: bigger plan is a typo (``--repeat 100000000``) and is refused before anything is built.
MAX_LAYERS = 1024


class UpscaleError(UserError):
    """Bad input to the upscale stage (plan, model files); the message says what and where."""


class SafetensorsError(UpscaleError):
    """A safetensors file is truncated or corrupt; the message names the file."""


# --------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class LayerSlot:
    """One output layer: the source layer it copies; ``identity`` zeroes its residual writers."""

    source: int
    identity: bool = False


def plan_solar(n: int, m: int) -> list[LayerSlot]:
    """The paper's DUS: layers ``0..n-m-1`` then ``m..n-1``; ``s = 2(n-m)``."""
    if not isinstance(m, int) or m < 0:
        raise UpscaleError(f"m must be a non-negative integer, got {m!r}")
    if m >= n:
        raise UpscaleError(f"m={m} must be smaller than the base model's {n} layers")
    if 2 * (n - m) < n:
        log.warning(
            "m=%d on %d layers keeps %d layers, fewer than the base model: this prunes it "
            "(depth up-scaling takes m <= %d)", m, n, 2 * (n - m), n // 2,
        )
    return [LayerSlot(i) for i in range(n - m)] + [LayerSlot(i) for i in range(m, n)]


def plan_llama_pro(n: int, expand_every: int = 4) -> list[LayerSlot]:
    """LLaMA-Pro: after every ``expand_every``-th layer, an identity copy of it (32 -> 40)."""
    if expand_every < 1 or expand_every > n:
        raise UpscaleError(f"expand_every must be in 1..{n}, got {expand_every}")
    plan: list[LayerSlot] = []
    for i in range(n):
        plan.append(LayerSlot(i))
        if (i + 1) % expand_every == 0:
            plan.append(LayerSlot(i, identity=True))
    return plan


def plan_stack(n: int, repeat: int = 2) -> list[LayerSlot]:
    """G_stack: the whole stack repeated ``repeat`` times."""
    if repeat < 1:
        raise UpscaleError(f"repeat must be >= 1, got {repeat}")
    return [LayerSlot(i) for _ in range(repeat) for i in range(n)]


def plan_explicit(n: int, layers: Iterable[int]) -> list[LayerSlot]:
    """An explicit list of source layer indices, each in ``0..n-1``."""
    plan = [LayerSlot(int(i)) for i in layers]
    if not plan:
        raise UpscaleError("layers: the explicit plan is empty")
    bad = [s.source for s in plan if not 0 <= s.source < n]
    if bad:
        raise UpscaleError(f"layers: indices {bad} are outside the base model's 0..{n - 1}")
    return plan


#: mergekit keys a passthrough plan honours (``dtype``/``out_dtype`` are accepted and
#: ignored, with a warning: the layers are copied byte for byte in the source's dtype)
MERGEKIT_KEYS = ("merge_method", "slices", "base_model", "tokenizer_source", "dtype", "out_dtype")
#: mergekit keys that would change the output in ways the byte-copying writer cannot
_MERGEKIT_UNSUPPORTED = ("models", "parameters", "tokenizer", "chat_template")


def _check_keys(where: str, given: dict[str, Any], known: Iterable[str]) -> None:
    """Refuse keys of a mergekit mapping outside ``known``, naming them."""
    unknown = [k for k in given if k not in known]
    if not unknown:
        return
    unsupported = [k for k in unknown if k in _MERGEKIT_UNSUPPORTED]
    what = (
        f"mergekit's {unsupported} not supported by solar-ray upscale (a passthrough of one "
        "model's layers, copied unchanged)"
        if unsupported
        else f"unknown keys {unknown}"
    )
    raise UpscaleError(f"{where}{what}; accepted here: {', '.join(known)}")


def plan_from_mergekit(spec: dict[str, Any]) -> tuple[str, list[int]]:
    """Read a mergekit passthrough config (``slices`` / ``layer_range``): (model, layers).

    All slices must come from one model; ranges are half-open like mergekit's. Keys outside
    :data:`MERGEKIT_KEYS` (and ``sources``/``model``/``layer_range`` below ``slices``) are
    refused; ``base_model`` and ``tokenizer_source`` must name that model (or ``base``).
    """
    _check_keys("", spec, MERGEKIT_KEYS)
    method = spec.get("merge_method", "passthrough")
    if method != "passthrough":
        raise UpscaleError(f"merge_method: only 'passthrough' is a layer plan, got {method!r}")
    slices = spec.get("slices")
    if not isinstance(slices, list) or not slices:
        raise UpscaleError("slices: expected a non-empty list of {sources: [...]}")
    models: set[str] = set()
    layers: list[int] = []
    for i, sl in enumerate(slices):
        if isinstance(sl, dict):
            _check_keys(f"slices.{i}: ", sl, ("sources",))
        sources = sl.get("sources") if isinstance(sl, dict) else None
        if not isinstance(sources, list) or len(sources) != 1:
            raise UpscaleError(f"slices.{i}.sources: passthrough takes exactly one source")
        src = sources[0]
        if not isinstance(src, dict):
            raise UpscaleError(
                f"slices.{i}.sources.0: expected a mapping {{model: ..., layer_range: [start, end]}}, "
                f"got {type(src).__name__}"
            )
        _check_keys(f"slices.{i}.sources.0: ", src, ("model", "layer_range"))
        rng = src.get("layer_range")
        if not (
            isinstance(rng, list)
            and len(rng) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in rng)
        ):
            raise UpscaleError(f"slices.{i}.sources.0.layer_range: expected [start, end]")
        if rng[0] >= rng[1]:
            raise UpscaleError(f"slices.{i}.sources.0.layer_range: empty range {rng}")
        if len(layers) + rng[1] - rng[0] > MAX_LAYERS:
            raise UpscaleError(
                f"slices.{i}.sources.0.layer_range: the plan grows past {MAX_LAYERS} layers"
            )
        model = src.get("model")
        if not isinstance(model, str) or not model.strip():
            raise UpscaleError(f"slices.{i}.sources.0.model: expected a model source (a string)")
        models.add(model)
        layers.extend(range(rng[0], rng[1]))
    if len(models) != 1:
        raise UpscaleError(f"slices: all slices must use one model, got {sorted(models)}")
    model = models.pop()
    for key, allowed in (("base_model", (model,)), ("tokenizer_source", (model, "base"))):
        if key in spec and spec[key] not in allowed:
            raise UpscaleError(
                f"{key}: {spec[key]!r} must be the slices' model {model!r}"
                + (" or 'base' (the tokenizer is copied from it)" if key == "tokenizer_source" else "")
            )
    for key in ("dtype", "out_dtype"):
        if key in spec:
            log.warning("%s: %r ignored; the layers are copied unchanged in the source's dtype", key, spec[key])
    return model, layers


# --------------------------------------------------------------------------- config


class UpscaleConfig(StageConfig):
    """The ``upscale`` stage: a source model, a layer plan and an output directory."""

    source: str = Field(description="model source: HF dir, hub id, .gguf or 'smollm2-135m'")
    out: str | None = Field(default=None, description="output directory")
    method: Literal["solar", "llama-pro", "stack", "explicit"] = "solar"
    m: int | None = Field(default=None, description="layers removed per copy (solar)")
    expand_every: int = Field(default=4, ge=1, description="llama-pro: new block every k layers")
    repeat: int = Field(
        default=2, ge=1, le=MAX_LAYERS, description="stack: number of copies of the stack"
    )
    layers: list[int] | None = Field(
        default=None, max_length=MAX_LAYERS, description="explicit: source layer list"
    )
    overwrite: bool = False
    max_shard_size_mb: int = Field(default=2048, ge=1)
    hash_inputs: bool = Field(default=True, description="record sha256 of the source files")
    durable: bool = Field(
        default=False, description="fsync every shard before the rename (power-loss safety)"
    )
    allow_pickle: bool = False

    @field_validator("m", "expand_every", "repeat", "layers", "max_shard_size_mb", mode="before")
    @classmethod
    def _no_booleans(cls, value: Any) -> Any:
        # pydantic reads ``true`` as 1: a boolean is never a layer index or a count
        if isinstance(value, bool) or (
            isinstance(value, list) and any(isinstance(x, bool) for x in value)
        ):
            raise ValueError(f"expected integers, got a boolean in {value!r}")
        return value

    @field_validator("source", "out")
    @classmethod
    def _home_known(cls, value: str | None) -> str | None:
        if value is not None:
            expand_user(value)
        return value

    @model_validator(mode="after")
    def _check_method_args(self) -> UpscaleConfig:
        if self.method == "solar" and self.m is None:
            raise ValueError("m is required for method 'solar' (e.g. m: 8 as in SOLAR 10.7B)")
        if self.m is not None and self.m < 0:
            raise ValueError(f"m must be >= 0, got {self.m}")
        if self.method == "explicit" and not self.layers:
            raise ValueError("layers is required for method 'explicit'")
        if self.layers is not None and self.method != "explicit":
            raise ValueError(
                f"layers: a layer list goes only with method 'explicit', not {self.method!r} "
                "(pass --method explicit, or drop --layers)"
            )
        return self


def planned_num_layers(cfg: UpscaleConfig, n: int) -> int:
    """How many layers the plan will have, computed without building it."""
    if cfg.method == "solar":
        return 2 * (n - (cfg.m or 0))
    if cfg.method == "llama-pro":
        return n + n // cfg.expand_every
    if cfg.method == "stack":
        return n * cfg.repeat
    return len(cfg.layers or [])


def plan_layers(cfg: UpscaleConfig, n: int) -> list[LayerSlot]:
    """The layer plan a config asks for, for a base model of ``n`` layers.

    A plan beyond :data:`MAX_LAYERS` is refused before it is built.
    """
    num = planned_num_layers(cfg, n)
    if num > MAX_LAYERS:
        raise UpscaleError(
            f"{cfg.method}: the plan has {num} layers (from the base model's {n}); at most "
            f"{MAX_LAYERS} are allowed (the largest open models have about 128)"
        )
    if cfg.method == "solar":
        assert cfg.m is not None
        return plan_solar(n, cfg.m)
    if cfg.method == "llama-pro":
        return plan_llama_pro(n, cfg.expand_every)
    if cfg.method == "stack":
        return plan_stack(n, cfg.repeat)
    assert cfg.layers is not None
    return plan_explicit(n, cfg.layers)


# --------------------------------------------------------------------------- config.json


def replan_config(config: dict, spec: ArchSpec, plan: list[LayerSlot]) -> dict:
    """A copy of ``config`` for the planned model: layer count and per-layer fields."""
    n = int(config["num_hidden_layers"])
    out = json.loads(json.dumps(config))
    out["num_hidden_layers"] = len(plan)
    sources = [s.source for s in plan]
    for name in spec.per_layer_fields:
        values = config.get(name)
        if values is None:
            continue
        if not isinstance(values, list) or len(values) != n:
            raise UpscaleError(
                f"config.json: {name} should list one value per layer ({n}), got {values!r}"
            )
        out[name] = [values[i] for i in sources]
    for name in spec.layer_threshold_fields:
        threshold = config.get(name)
        if threshold is None:
            continue
        # Layers at index >= threshold behave differently (Qwen: sliding window). Keep each
        # output layer's behaviour: the threshold survives when the planned flags are still
        # "all below, then all at/above"; otherwise the per-layer list carries it.
        flags = [src >= threshold for src in sources]
        first = flags.index(True) if True in flags else len(flags)
        if all(flags[first:]):
            out[name] = first
        elif "layer_types" in out:
            out[name] = len(plan)  # layer_types (already re-planned) is authoritative
        else:
            raise UpscaleError(
                f"config.json: {name}={threshold} cannot express this plan's layer order; "
                "add an explicit layer_types list to the source config"
            )
    for key, value in config.items():
        if (
            isinstance(value, list)
            and len(value) == n
            and key not in spec.per_layer_fields
            and n > 1
        ):
            log.warning("config.json: %s has %d entries (one per layer?) and was kept as is", key, n)
    return out


# --------------------------------------------------------------------------- safetensors


@dataclass
class TensorRef:
    """Where one tensor's bytes live in a source shard."""

    name: str
    dtype: str
    shape: list[int]
    file: Path
    offset: int  # absolute byte offset in the file
    nbytes: int


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_safetensors_header(path: Path) -> dict[str, TensorRef]:
    """Parse a safetensors header and check it as ``safetensors`` does.

    The tensors' byte ranges must tile the data section exactly (no gap, no overlap, no
    trailing bytes) and each must hold ``numel * dtype size`` bytes. Anything else is a
    :class:`SafetensorsError` naming the file and, where there is one, the tensor.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            hlen = struct.unpack("<Q", raw)[0] if len(raw) == 8 else None
            ok = hlen is not None and hlen <= min(size - 8, 100 << 20)
            text = f.read(hlen) if ok else b""
    except OSError as e:
        raise SafetensorsError(f"{path}: cannot read it ({e.strerror})") from None
    if hlen is None:
        raise SafetensorsError(f"{path}: truncated safetensors file ({size} bytes)")
    if not ok:
        raise SafetensorsError(f"{path}: corrupt safetensors header (length {hlen}, file {size} bytes)")
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nesting
        raise SafetensorsError(f"{path}: corrupt safetensors header ({str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: corrupt safetensors header (not a mapping)")
    base = 8 + hlen
    refs: dict[str, TensorRef] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            dtype, shape = info["dtype"], list(info["shape"])
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: corrupt entry for tensor {name!r}") from None
        if not (isinstance(dtype, str) and all(map(_is_count, shape)) and _is_count(start)
                and _is_count(end) and start <= end):  # fmt: skip
            raise SafetensorsError(
                f"{path}: corrupt entry for tensor {name!r} (dtype, shape or offsets)"
            )
        bits = _DTYPE_BITS.get(dtype)
        if bits is None:
            raise SafetensorsError(f"{path}: tensor {name!r} has an unknown dtype {dtype[:20]!r}")
        need = math.prod(shape) * bits  # in bits
        if need % 8 or end - start != need // 8:
            raise SafetensorsError(
                f"{path}: tensor {name!r} holds {end - start} bytes but its dtype and shape "
                f"({dtype} {shape}) need " + (f"{need // 8}" if need % 8 == 0 else f"{need} bits")
            )
        if base + end > size:
            raise SafetensorsError(
                f"{path}: truncated safetensors file: tensor {name!r} ends at byte "
                f"{base + end} but the file has {size}"
            )
        refs[name] = TensorRef(name, dtype, shape, path, base + start, end - start)
    # the byte ranges must tile the data section (a tensor never reads another's bytes)
    at, prev = base, None
    for ref in sorted(refs.values(), key=lambda r: (r.offset, r.nbytes)):
        if ref.offset < at:
            raise SafetensorsError(
                f"{path}: tensor {ref.name!r} overlaps tensor {prev!r} (not a valid safetensors file)"
            )
        if ref.offset > at:
            raise SafetensorsError(
                f"{path}: bytes {at - base}..{ref.offset - base} of the data section belong to no "
                f"tensor (a gap before tensor {ref.name!r}; not a valid safetensors file)"
            )
        at, prev = ref.offset + ref.nbytes, ref.name
    if at != size:
        raise SafetensorsError(
            f"{path}: {size - at} trailing bytes after the last tensor"
            + (f" {prev!r}" if prev else "") + " (not a valid safetensors file)"
        )
    return refs


def _read_weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` of an index file: tensor name -> a shard file *in* the directory."""
    try:
        with open(index, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise SafetensorsError(f"{index}: cannot read it ({e.strerror})") from None
    except (ValueError, RecursionError) as e:
        raise SafetensorsError(f"{index}: not valid JSON ({str(e)[:200]})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise SafetensorsError(f"{index}: no 'weight_map' mapping of tensor names to shard files")
    for tensor, shard in weight_map.items():
        # shards are plain file names beside the index; never a path out of the directory
        if (
            not isinstance(shard, str)
            or shard in ("", ".", "..")
            or "/" in shard
            or "\\" in shard
            or "\0" in shard
        ):
            raise SafetensorsError(
                f"{index}: tensor {tensor!r} maps to {shard!r}, which is not a file name in "
                "the model directory (reads never leave it)"
            )
    return weight_map


def read_model_tensors(model_dir: Path) -> dict[str, TensorRef]:
    """Every tensor of a safetensors model directory (sharded with an index, or single)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_weight_map(index)
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
        weight_map = {}
    if not files:
        raise ModelSourceError(f"{model_dir}: no safetensors weights")
    refs: dict[str, TensorRef] = {}
    for name in files:
        path = model_dir / name
        if not path.is_file():
            if weight_map and not os.path.lexists(path):
                raise SafetensorsError(f"{path}: listed in {index.name} but missing")
            raise SafetensorsError(
                f"{path}: not a regular file (a directory, a pipe, a device or a dangling "
                "symbolic link); the weights must be safetensors files"
            )
        for tname, ref in read_safetensors_header(path).items():
            if weight_map and weight_map.get(tname) != name:
                continue
            refs[tname] = ref
    missing = [t for t in weight_map if t not in refs]
    if missing:
        raise SafetensorsError(
            f"{model_dir}: tensor {missing[0]!r} is in the index but not in "
            f"{weight_map[missing[0]]} ({len(missing)} missing)"
        )
    return refs


@dataclass
class OutTensor:
    """One planned output tensor: its source bytes, or zeros."""

    name: str
    dtype: str
    shape: list[int]
    nbytes: int
    src: TensorRef | None  # None: write zeros


@dataclass
class OutShard:
    """One planned output shard."""

    name: str
    tensors: list[OutTensor] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_tensors(
    refs: dict[str, TensorRef], spec: ArchSpec, n: int, plan: list[LayerSlot]
) -> list[OutTensor]:
    """Every output tensor, in order: non-layer tensors around the planned layers."""
    pat = re.compile(rf"^{re.escape(spec.layer_prefix)}(\d+)\.(.+)$")
    by_layer: dict[int, dict[str, TensorRef]] = {}
    head: list[TensorRef] = []
    tail: list[TensorRef] = []
    for name, ref in refs.items():
        mt = pat.match(name)
        if mt:
            by_layer.setdefault(int(mt.group(1)), {})[mt.group(2)] = ref
        elif "embed" in name:
            head.append(ref)
        else:
            tail.append(ref)
    suffixes = sorted({s for layer in by_layer.values() for s in layer})
    for i in sorted({slot.source for slot in plan}):
        layer = by_layer.get(i, {})
        for suffix in suffixes:
            if suffix not in layer:
                raise UpscaleError(f"missing tensor {spec.layer_prefix}{i}.{suffix} in the source model")
    extra = [i for i in by_layer if i >= n]
    if extra:
        raise UpscaleError(f"source has tensors for layer {max(extra)} but num_hidden_layers={n}")
    zeroed = tuple(f"{w}." for w in spec.residual_writers)
    out: list[OutTensor] = [OutTensor(r.name, r.dtype, r.shape, r.nbytes, r) for r in head]
    for j, slot in enumerate(plan):
        for suffix in suffixes:
            ref = by_layer[slot.source][suffix]
            zero = slot.identity and suffix.startswith(zeroed)
            out.append(
                OutTensor(
                    f"{spec.layer_prefix}{j}.{suffix}", ref.dtype, ref.shape, ref.nbytes,
                    None if zero else ref,
                )
            )
    out.extend(OutTensor(r.name, r.dtype, r.shape, r.nbytes, r) for r in tail)
    return out


def shard_tensors(tensors: list[OutTensor], max_shard_bytes: int) -> list[OutShard]:
    """Shards of at most ``max_shard_bytes`` (one tensor may exceed it), HF-style names
    ``model-0000i-of-0000N.safetensors``.

    Each shard holds tensors of one source file (zeros join the shard of the tensor before
    them), in plan order, so that its bytes can be laid out at their source's page offsets
    (:func:`aligned_layout`); a source file's tensors fill a new shard when the cap is
    reached. The shards come in the order of their first tensor.
    """
    shards: list[OutShard] = []
    open_for: dict[Path | None, OutShard] = {}  # source file -> the shard it fills now
    filled: dict[Path | None, int] = {}  # ... and that shard's bytes so far
    last: Path | None = None
    for t in tensors:
        key = t.src.file if t.src is not None else last
        shard = open_for.get(key)
        if shard is None or (shard.tensors and filled[key] + t.nbytes > max_shard_bytes):
            shard = open_for[key] = OutShard("")
            shards.append(shard)
            filled[key] = 0
        shard.tensors.append(t)
        filled[key] += t.nbytes
        last = key
    if len(shards) == 1:
        shards[0].name = "model.safetensors"
    else:
        for i, sh in enumerate(shards):
            sh.name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    return shards


#: the kernel copies a byte range between files fastest when source and destination start
#: at the same offset within a page (``bench/dus.py --probe``, bench/results/dus.md: the
#: 0.79 GiB of the 0.43B model's shards in 0.26 s at equal page offsets, 0.30 s at unequal)
PAGE = 4096


def aligned_layout(tensors: list[OutTensor]) -> tuple[list[OutTensor], int | None]:
    """(write order, page offset of the data section) for one shard's tensors.

    safetensors stores a shard's tensors back to back after a JSON header that may be
    padded with spaces, so the header's length sets the page offset of the first tensor
    and the order sets the rest. The page-sized tensors (size a multiple of :data:`PAGE`)
    are grouped by their source's page offset; a group goes out at its offset, then the
    fewest small tensors (e.g. 2 KiB norm weights) whose sizes move the running offset to
    another group's, then that group, and so on, from the start group that aligns the
    most bytes (of the four largest). What stays unreached, the other small tensors and
    the zeros follow in plan order. Loaders find a shard's tensors by the offsets in its
    header, so the order is free; the bytes of every tensor are unchanged. The offset is
    None when nothing is worth aligning.
    """
    groups: dict[int, list[OutTensor]] = {}
    for t in tensors:
        if t.src is not None and t.nbytes % PAGE == 0 and t.src.offset % 8 == 0:
            groups.setdefault(t.src.offset % PAGE, []).append(t)
    if not groups:
        return tensors, None
    size = {k: sum(t.nbytes for t in g) for k, g in groups.items()}
    grouped = {id(t) for g in groups.values() for t in g}
    small = [t for t in tensors if id(t) not in grouped]
    best: tuple[int, list[OutTensor], int] | None = None
    for start in sorted(size, key=lambda k: (-size[k], k))[:4]:
        order, aligned = _layout_from(start, groups, small)
        if best is None or aligned > best[0]:
            best = (aligned, order, start)
    assert best is not None
    placed = {id(t) for t in best[1]}
    return best[1] + [t for t in tensors if id(t) not in placed], best[2]


def _layout_from(
    start: int, groups: dict[int, list[OutTensor]], small: list[OutTensor]
) -> tuple[list[OutTensor], int]:
    """:func:`aligned_layout` from one start group: (order so far, bytes aligned)."""
    left = dict(groups)
    spare = list(small)
    at, order, aligned = start, [], 0
    while True:
        aligned += sum(t.nbytes for t in left[at])
        order += left.pop(at)
        path = _shortest_shift(at, set(left), [t.nbytes for t in spare])
        if path is None:
            return order, aligned
        for nbytes in path:
            order.append(spare.pop(next(i for i, t in enumerate(spare) if t.nbytes == nbytes)))
            at = (at + nbytes) % PAGE


def _shortest_shift(at: int, targets: set[int], sizes: list[int]) -> list[int] | None:
    """The fewest of ``sizes`` (each used at most as often as listed) that move page offset
    ``at`` to one in ``targets`` (breadth-first over the offsets); None if none do."""
    if not targets:
        return None
    have: dict[int, int] = {}
    for n in sizes:
        if n % PAGE:
            have[n] = have.get(n, 0) + 1
    came: dict[int, tuple[int, int] | None] = {at: None}
    frontier = [at]
    while frontier:
        nxt = []
        for r in frontier:
            for n in have:
                q = (r + n) % PAGE
                if q in came:
                    continue
                came[q] = (r, n)
                if q in targets:
                    path: list[int] = []
                    while came[q] is not None:
                        q, n = came[q]  # type: ignore[misc]
                        path.append(n)
                    path.reverse()
                    uses = {n: path.count(n) for n in path}
                    return path if all(uses[n] <= have[n] for n in uses) else None
                nxt.append(q)
        frontier = nxt
    return None


def _header_bytes(shard: OutShard, data_at: int | None = None) -> bytes:
    """The shard's header (length prefix and JSON), padded with spaces so that the data
    section starts at page offset ``data_at`` (a multiple of 8), else at a multiple of 8
    (as safetensors aligns it)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in shard.tensors:
        header[t.name] = {"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-8 - len(raw)) % 8 if data_at is None else (data_at - 8 - len(raw)) % PAGE)
    return struct.pack("<Q", len(raw)) + raw


_ZEROS = bytes(1 << 20)
#: the most bytes one ``copy_file_range`` call asks for, and one ``pread`` buffer's size
COPY_CHUNK = 1 << 30
READ_CHUNK = 16 << 20


def _copy_range(src_fd: int, dst_fd: int, src_off: int, dst_off: int, count: int) -> None:
    """Copy ``count`` bytes at ``src_off`` of ``src_fd`` to ``dst_off`` of ``dst_fd``.

    ``os.copy_file_range`` first; where it fails (``EXDEV`` across file systems on older
    kernels, ``ENOSYS``, ...) or copies nothing (some file systems), ``pread``/``pwrite``.
    """
    done = 0
    use_cfr = hasattr(os, "copy_file_range")
    while done < count:
        n = 0
        if use_cfr:
            try:
                n = os.copy_file_range(
                    src_fd, dst_fd, min(count - done, COPY_CHUNK), src_off + done, dst_off + done
                )
            except OSError:
                n = 0
            use_cfr = n > 0
        if not use_cfr:
            buf = os.pread(src_fd, min(count - done, READ_CHUNK), src_off + done)
            n = os.pwrite(dst_fd, buf, dst_off + done) if buf else 0
        if n <= 0:
            raise SafetensorsError(f"short read at byte {src_off + done} of a source shard")
        done += n


#: shards written at once: the kernel's copy runs on as many cores (memory bandwidth and
#: NVMe queues scale past one), one source file per shard (:func:`shard_tensors`)
COPY_THREADS = 4


def write_shards(shards: list[OutShard], out_dir: Path, fsync: bool = False) -> dict[str, str]:
    """Write the planned shards into ``out_dir``, up to :data:`COPY_THREADS` at once;
    return the index's weight map.

    ``fsync`` flushes every shard to disk before returning (power-loss durability; the
    atomic rename already covers a crashed process). Shows its progress in bytes.
    """
    from concurrent.futures import ThreadPoolExecutor

    total = sum(t.nbytes for shard in shards for t in shard.tensors)
    lock = threading.Lock()
    with Progress("upscale", total, "B") as progress:

        def advance(nbytes: int) -> None:
            with lock:
                progress.update(nbytes)

        threads = max(1, min(len(shards), COPY_THREADS, os.cpu_count() or 1))
        with ThreadPoolExecutor(threads, thread_name_prefix="upscale-copy") as pool:
            jobs = [pool.submit(_write_shard, sh, out_dir, fsync, advance) for sh in shards]
            try:
                for job in jobs:
                    job.result()
            except BaseException:
                pool.shutdown(cancel_futures=True)  # shards not started are not written
                raise
    return {t.name: shard.name for shard in shards for t in shard.tensors}


def _write_shard(
    shard: OutShard, out_dir: Path, fsync: bool, advance: Callable[[int], None]
) -> None:
    """One shard: its header, then each tensor at its source's page offset."""
    order, data_at = aligned_layout(shard.tensors)
    header = _header_bytes(OutShard(shard.name, order), data_at)
    src_fds: dict[Path, int] = {}
    fd = os.open(out_dir / shard.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.pwrite(fd, header, 0)
        at = len(header)
        for t in order:
            if t.src is None:
                left = t.nbytes
                while left:
                    left -= os.pwrite(fd, _ZEROS[: min(left, len(_ZEROS))], at + t.nbytes - left)
            else:
                if t.src.file not in src_fds:
                    src_fds[t.src.file] = os.open(t.src.file, os.O_RDONLY)
                _copy_range(src_fds[t.src.file], fd, t.src.offset, at, t.nbytes)
            at += t.nbytes
            advance(t.nbytes)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
        for sfd in src_fds.values():
            os.close(sfd)


# --------------------------------------------------------------------------- stage


@dataclass
class UpscaleResult:
    """What :func:`run_upscale` made."""

    out: Path
    plan: list[int]
    num_layers_in: int
    num_layers_out: int
    manifest: dict


def check_source_plan(cfg: UpscaleConfig) -> None:
    """Check the plan against the source's layer count when its config is readable now.

    For ``--dry-run``: a local source directory (or a finished stage output) with a
    ``config.json``; other sources (hub ids, GGUF, outputs not made yet) are checked when
    the stage runs.
    """
    src = expand_user(cfg.source)
    if (src / "config.json").is_file():
        config = read_config(src, required=("model_type", "num_hidden_layers"))
        plan_layers(cfg, int(config["num_hidden_layers"]))


def run_upscale(cfg: UpscaleConfig) -> UpscaleResult:
    """Depth-upscale ``cfg.source`` into ``cfg.out`` (atomically) and return the result.

    Everything is checked before a byte is written: the output path (never an input, never
    a directory solar-ray did not write), the plan's size, every output tensor's shape
    against the re-planned ``config.json``, and the free space at ``out``.
    """
    if not cfg.out:
        raise UpscaleError("out: an output directory is required")
    from solar_ray.models import check_tensor_shapes, resolve_model

    inputs = local_inputs(cfg.source)
    check_output(cfg.out, cfg.overwrite, inputs)
    src_dir = resolve_model(cfg.source, allow_pickle=cfg.allow_pickle)
    inputs.append(src_dir)
    config = read_config(src_dir, required=("model_type", "num_hidden_layers"))
    spec = arch_for_config(config)
    n = int(config["num_hidden_layers"])
    plan = plan_layers(cfg, n)
    refs = read_model_tensors(src_dir)
    tensors = plan_tensors(refs, spec, n, plan)
    shards = shard_tensors(tensors, cfg.max_shard_size_mb << 20)
    new_config = replan_config(config, spec, plan)
    check_tensor_shapes(new_config, {t.name: t.shape for t in tensors}, f"{cfg.source} upscaled")
    aux = [src_dir / name for name in AUX_FILES if (src_dir / name).is_file()]
    check_free_space(
        cfg.out,
        sum(t.nbytes for t in tensors) + sum(p.stat().st_size for p in aux) + (1 << 20),
        f"the upscaled model ({len(plan)} layers)",
    )

    # the source's hashes (and the manifest's library versions) while the copy runs
    hashed = [*sorted({r.file for r in refs.values()}), src_dir / "config.json"] if cfg.hash_inputs else []
    calls = [*(functools.partial(recorded_sha256, p) for p in hashed), library_versions]
    with (
        in_background(calls) as hashes,
        atomic_output_dir(cfg.out, overwrite=cfg.overwrite, inputs=inputs) as tmp,
    ):
        weight_map = write_shards(shards, tmp, fsync=cfg.durable)
        if len(shards) > 1:
            total = sum(t.nbytes for t in tensors)
            write_json_atomic(
                tmp / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": weight_map},
            )
        write_json_atomic(tmp / "config.json", new_config)
        for path in aux:
            shutil.copyfile(path, tmp / path.name)
        plan_ids = [s.source for s in plan]
        identity = [j for j, s in enumerate(plan) if s.identity]
        write_model_card(
            tmp,
            f"{src_dir.name} depth-upscaled ({cfg.method}, {n} -> {len(plan)} layers)",
            [
                f"Made by `solar-ray upscale` from `{cfg.source}` with method `{cfg.method}`"
                + (f", m={cfg.m}" if cfg.method == "solar" else "")
                + ".",
                "",
                f"Source layer of each output layer: {plan_ids}",
            ],
        )
        file_hashes = {p.name: h.result() for p, h in zip(hashed, hashes, strict=False)}
        parent = model_fingerprint(src_dir, file_hashes) if hashed else {"path": str(src_dir)}
        parent["source"] = cfg.source
        manifest = write_manifest(
            tmp,
            "upscale",
            parents=[parent],
            config=cfg.to_dict(),
            method=cfg.method,
            m=cfg.m if cfg.method == "solar" else None,
            plan=plan_ids,
            identity_layers=identity,
            num_layers_in=n,
            num_layers_out=len(plan),
        )
    return UpscaleResult(Path(cfg.out).absolute(), plan_ids, n, len(plan), manifest)
