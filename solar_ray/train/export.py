"""Consolidated Hugging Face export of a model trained under DeepSpeed (any ZeRO stage).

:func:`export_hf_model` gathers the model one module at a time
(``deepspeed.zero.GatheredParameters``); rank 0 copies each to CPU in the export dtype and
streams safetensors shards of ``max_shard_bytes``, so no rank holds a full copy. Tied
weights are written once, like ``save_pretrained``; the result loads with
``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

__all__ = ["export_hf_model", "is_zero3_param", "torch_dtype"]


def torch_dtype(name: str) -> Any:
    """``"bfloat16"`` -> ``torch.bfloat16`` (also float16, float32)."""
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def is_zero3_param(p: Any) -> bool:
    """True for a parameter that DeepSpeed ZeRO-3 partitions over the ranks."""
    return hasattr(p, "ds_id")


class _ShardWriter:
    """Accumulate tensors; write ``model-0000i.safetensors`` shards of bounded size."""

    def __init__(self, out_dir: Path, max_shard_bytes: int) -> None:
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self.current: dict[str, Any] = {}
        self.current_bytes = 0
        self.shards: list[list[str]] = []  # tensor names per written shard
        self.total_bytes = 0

    def add(self, name: str, tensor: Any) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.current and self.current_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self.current[name] = tensor
        self.current_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.current:
            return
        index = len(self.shards)
        save_file(self.current, self.out_dir / f"part-{index:05d}.tmp", metadata={"format": "pt"})
        self.shards.append(list(self.current))
        self.current, self.current_bytes = {}, 0

    def finish(self) -> None:
        """Name the shards HF-style and write the index when there are several."""
        self.flush()
        count = len(self.shards)
        weight_map: dict[str, str] = {}
        for i, names in enumerate(self.shards):
            final = (
                "model.safetensors"
                if count == 1
                else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            )
            (self.out_dir / f"part-{i:05d}.tmp").rename(self.out_dir / final)
            weight_map.update(dict.fromkeys(names, final))
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.out_dir / "model.safetensors.index.json").write_text(
                json.dumps(index, indent=2) + "\n", encoding="utf-8"
            )


def export_hf_model(
    model: Any,
    out_dir: str | Path | None,
    *,
    tokenizer: Any = None,
    dtype: str = "bfloat16",
    max_shard_bytes: int = 2 << 30,
    is_writer: bool = True,
) -> None:
    """Write ``model`` (a HF ``PreTrainedModel``, possibly ZeRO-3 partitioned) as a HF dir.

    Collective under ZeRO-3: every rank must call it; only the rank with ``is_writer``
    (rank 0) needs ``out_dir`` and writes anything.
    """
    import torch

    target = torch_dtype(dtype)
    writer = None
    if is_writer:
        if out_dir is None:
            raise ValueError("the writing rank needs an output directory")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        writer = _ShardWriter(out, max_shard_bytes)
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        params = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]
        buffers = [
            (n, b)
            for n, b in module.named_buffers(recurse=False)
            if n not in module._non_persistent_buffers_set
        ]
        if not params and not buffers:
            continue
        seen.update(id(p) for _, p in params)
        to_gather = [p for _, p in params if is_zero3_param(p)]
        gather: contextlib.AbstractContextManager = contextlib.nullcontext()
        if to_gather:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(to_gather, modifier_rank=None)
        with gather, torch.no_grad():
            if writer is not None:
                for name, tensor in [*params, *buffers]:
                    key = f"{prefix}.{name}" if prefix else name
                    t = tensor.detach().to("cpu")
                    if t.is_floating_point():
                        t = t.to(target)
                    writer.add(key, t.contiguous().clone())
    if writer is None:
        return
    writer.finish()
    config = model.config
    config.save_pretrained(out)
    # the exported weights' dtype, not the training one
    cfg_path = out / "config.json"
    data = json.loads(cfg_path.read_text(encoding="utf-8"))
    data["dtype"] = dtype
    data.pop("torch_dtype", None)
    data["use_cache"] = True
    cfg_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        with contextlib.suppress(Exception):  # an invalid generation config is not fatal
            gen.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


#: a fixed text whose next-token statistics fingerprint a model's function
PROBE_TEXT = "The quick brown fox jumps over the lazy dog, and depth up-scaling grows a model."


def probe_model(model: Any, tokenizer: Any, device: Any = "cpu") -> dict[str, list]:
    """Next-token statistics of :data:`PROBE_TEXT` under ``model``.

    Per position: log-prob of the actual next token, logsumexp of the logits and the
    argmax token. Recorded next to an export (``solar.json``), they let anyone check that
    the exported weights compute what the trained model computed. Collective under
    ZeRO-3 (every rank must call it).
    """
    import torch

    ids = tokenizer(PROBE_TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = ids[:, :32].to(device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()[0]
    if was_training:
        model.train()
    logps = torch.log_softmax(logits[:-1], dim=-1)
    next_ids = ids[0, 1:]
    return {
        "input_ids": ids[0].tolist(),
        "next_token_logps": logps.gather(-1, next_ids[:, None])[:, 0].tolist(),
        "logsumexp": torch.logsumexp(logits, dim=-1).tolist(),
        "argmax": logits.argmax(dim=-1).tolist(),
    }
