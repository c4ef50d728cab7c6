"""The DeepSpeed config of a training stage, built from its :class:`TrainConfig`.

ZeRO stage 0-3, optional CPU offload of the optimizer state (and of the parameters under
ZeRO-3), bf16 on GPU and fp32 on CPU, gradient clipping and accumulation. Activation
checkpointing is the model's own (``gradient_checkpointing_enable``), which DeepSpeed
composes with every ZeRO stage. A user config (``deepspeed:`` in the recipe, a mapping or a
JSON file) is merged over the built one, key by key, so a full DeepSpeed JSON replaces it.

Under Hugging Face's Trainer (the TRL stages) the values the Trainer also owns are ``"auto"``
and filled from its arguments: Transformers refuses a DeepSpeed config whose batch size,
clipping or precision disagree with them.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from solar_ray.config import ConfigError
from solar_ray.train.config import TrainConfig

__all__ = ["build_deepspeed_config", "deep_merge", "zero_stage_of"]


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` merged in recursively (override wins on conflicts)."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _user_config(spec: Mapping[str, Any] | str | None) -> dict[str, Any]:
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        return dict(spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"deepspeed: DeepSpeed config file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed: {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"deepspeed: {path} must hold a JSON object")
    return data


def build_deepspeed_config(
    cfg: TrainConfig,
    *,
    for_hf_trainer: bool = False,
    world_size: int | None = None,
    load_universal: bool = False,
) -> dict[str, Any]:
    """The DeepSpeed config dict for ``cfg`` (``"auto"`` values where HF's Trainer fills them).

    ``world_size``: the workers actually running (an elastic run's count changes; the
    gradient accumulation follows it so that the global batch stays as configured).
    ``load_universal``: the run resumes from a universal checkpoint (one saved at another
    world size, converted by :func:`solar_ray.train.reshard.to_universal`).
    """
    accum = cfg.grad_accum_for(world_size) if world_size else cfg.grad_accum_steps
    precision = cfg.precision_resolved
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 1:
        zero.update(
            {
                "overlap_comm": cfg.use_gpu,
                "contiguous_gradients": True,
                "reduce_bucket_size": 5e7,
            }
        )
    if cfg.zero_stage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": 5e7,
                "stage3_param_persistence_threshold": 1e5,
                # solar_ray.train.export gathers the weights itself, layer by layer
                "stage3_gather_16bit_weights_on_model_save": False,
            }
        )
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.use_gpu}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.use_gpu}

    auto = "auto"
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": auto if for_hf_trainer else cfg.micro_batch_size,
        "gradient_accumulation_steps": auto if for_hf_trainer else accum,
        "gradient_clipping": auto if for_hf_trainer else cfg.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": auto if for_hf_trainer else precision == "bf16"},
        "fp16": {"enabled": auto if for_hf_trainer else precision == "fp16"},
        # the optimizer is torch's AdamW (built by us or by HF's Trainer); DeepSpeed's CPU
        # Adam is a compiled op this project does not require
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    merged = deep_merge(ds, _user_config(cfg.deepspeed))
    stage = zero_stage_of(merged)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_optimization.stage: expected 0-3, got {stage!r}")
    return merged


def zero_stage_of(ds_config: Mapping[str, Any]) -> int:
    """The ZeRO stage a DeepSpeed config asks for (0 when it has no ``zero_optimization``)."""
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))
