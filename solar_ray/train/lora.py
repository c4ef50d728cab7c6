"""LoRA / QLoRA for the TRL stages: the adapter config TRL gets, and the merged export.

:func:`peft_config` (and :func:`quantization_config` for ``load_in_4bit``, NF4, GPU only) go
to TRL; :func:`export_merged` gathers the adapters from every worker, merges them into a
fresh CPU copy of the base on rank 0 and writes the one model format. See docs/train.md,
"LoRA and QLoRA".
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from solar_ray.train.config import LoraSettings, TRLTrainConfig
from solar_ray.train.export import export_hf_model, is_zero3_param, torch_dtype

__all__ = ["ADAPTER_DIR", "export_merged", "is_peft_model", "peft_config", "quantization_config"]

#: where ``keep_adapter`` puts the adapter inside the stage's output
ADAPTER_DIR = "adapter"


def peft_config(settings: LoraSettings) -> Any:
    """``peft.LoraConfig`` of a stage's ``peft:`` settings."""
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type="CAUSAL_LM",
    )


def quantization_config(cfg: TRLTrainConfig) -> Any:
    """``BitsAndBytesConfig`` of a QLoRA base (4-bit NF4), or None."""
    if cfg.peft is None or not cfg.peft.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    from solar_ray.errors import require

    require("bitsandbytes", "peft.load_in_4bit", extra="qlora")
    dtype = cfg.model_kwargs()["dtype"]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,  # so that ZeRO-3 can shard the packed weights
    )


def is_peft_model(model: Any) -> bool:
    """True for a model wrapped with LoRA adapters (``peft.PeftModel``)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


@contextlib.contextmanager
def _without_zero3_init() -> Iterator[None]:
    """Load a whole model on CPU even while a ZeRO-3 Trainer is alive in this process.

    transformers partitions every model it loads (``deepspeed.zero.Init``) while the
    Trainer's DeepSpeed config is registered; the merge needs the full base weights.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def export_merged(
    model: Any,
    out_dir: Path | None,
    *,
    base_dir: str,
    tokenizer: Any,
    dtype: str,
    max_shard_bytes: int,
    is_writer: bool,
    keep_adapter: bool = False,
) -> None:
    """Merge the adapters of ``model`` (a trained ``PeftModel``) into the base in ``base_dir``
    and export the merged model into ``out_dir`` (collective: every rank calls it).

    With ``keep_adapter`` the adapter also goes to ``out_dir/adapter`` in PEFT's format.
    """
    import torch

    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    partitioned = [p for _, p in trained if is_zero3_param(p)]
    gather: contextlib.AbstractContextManager = contextlib.nullcontext()
    if partitioned:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)
    with gather, torch.no_grad():
        adapters = {n: p.detach().to("cpu", torch.float32).clone() for n, p in trained} if is_writer else {}
    if not is_writer:
        return
    assert out_dir is not None
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    with _without_zero3_init():
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch_dtype(dtype))
    wrapped = get_peft_model(base, copy.deepcopy(model.peft_config["default"]))
    result = wrapped.load_state_dict(adapters, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"adapter weights that the base does not have: {result.unexpected_keys[:3]}")
    if keep_adapter:
        wrapped.save_pretrained(Path(out_dir) / ADAPTER_DIR)
    merged = wrapped.merge_and_unload()
    export_hf_model(
        merged, out_dir, tokenizer=tokenizer, dtype=dtype, max_shard_bytes=max_shard_bytes
    )
