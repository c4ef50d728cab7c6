"""The driver side of every training stage: validate, skip or resume, launch, export.

:func:`train_and_export` is what ``run_pretrain`` / ``run_sft`` / ``run_dpo`` share: return a
finished ``out`` as is, refuse another config under the same run name, run the worker loop
through :func:`solar_ray.train.launch.launch_ray` (or in this process with ``local: true``),
and publish the final checkpoint's export as ``out`` with ``solar.json`` lineage. The steps:
docs/train.md, "What happens".
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from solar_ray import identity
from solar_ray.checkpoint import (
    OutputExistsError,
    atomic_output_dir,
    check_output,
    local_inputs,
    read_manifest,
    write_manifest,
    write_model_card,
)
from solar_ray.config import ConfigError
from solar_ray.data.contract import open_mix
from solar_ray.errors import UserError, require
from solar_ray.fs import arrow_filesystem, is_uri
from solar_ray.models import resolve_model
from solar_ray.remote import read_json
from solar_ray.tracking import check_backends
from solar_ray.train.config import TrainConfig
from solar_ray.train.launch import StageInputs, WorkerSpec, launch_ray, worker_spec
from solar_ray.train.session import FINAL_MARKER, LocalSession

__all__ = [
    "TrainResult",
    "finished_result",
    "train_and_export",
    "validate_common",
    "validate_model",
]

log = logging.getLogger(__name__)

RUN_FILE = "solar_run.json"


@dataclass
class TrainResult:
    """What a training stage made: the HF model directory and how it got there."""

    out: Path
    stage: str
    metrics: dict[str, Any]
    manifest: dict[str, Any]
    #: True when ``out`` already held this run's result and nothing was trained
    skipped: bool = False
    #: the final Ray Train checkpoint (local path or URI) the export came from
    checkpoint: str | None = None


# --------------------------------------------------------------------------- validation


def validate_model(
    source: str, field_name: str, seq_len: int | None = None
) -> tuple[Path, dict[str, Any], int]:
    """Resolve a model source; check its tokenizer, vocabulary and positions.

    Returns (model dir, config.json as a dict, vocab_size). Errors name ``field_name``.
    """
    try:
        model_dir = resolve_model(source)
    except UserError as e:
        raise ConfigError(f"{field_name}: {e}") from None
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    text_config = config.get("text_config") or config
    vocab_size = int(text_config.get("vocab_size") or 0)
    if not any(
        (model_dir / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")
    ):
        raise ConfigError(
            f"{field_name}: {model_dir} has no tokenizer files (tokenizer.json, "
            "tokenizer.model or vocab.json); save the tokenizer next to the weights"
        )
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # any failure to load is the user's model directory
        raise ConfigError(f"{field_name}: cannot load the tokenizer of {model_dir}: {e}") from None
    if len(tokenizer) > vocab_size:
        raise ConfigError(
            f"{field_name}: the tokenizer has {len(tokenizer)} tokens but the model's "
            f"vocab_size is {vocab_size} (mismatched tokenizer and weights in {model_dir})"
        )
    max_pos = text_config.get("max_position_embeddings")
    if seq_len is not None and max_pos is not None and seq_len > int(max_pos):
        raise ConfigError(
            f"seq_len: {seq_len} exceeds the model's max_position_embeddings ({max_pos})"
        )
    return model_dir, config, vocab_size


def validate_common(cfg: TrainConfig, data_kind: str, data_part: str | None = None) -> StageInputs:
    """Checks every stage shares: model, tokenizer, positions, data mixes, storage."""
    if cfg.local and is_uri(cfg.resolved_storage_path):
        raise ConfigError("storage_path: local runs keep their state on a local path")
    if cfg.local and cfg.streaming:
        raise ConfigError("streaming: streaming from Ray Data needs Ray (set local: false)")
    if cfg.use_gpu and cfg.local:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("use_gpu: no CUDA device is visible to this process")
    if cfg.attn_implementation == "flash_attention_2":
        require("flash_attn", "attn_implementation: flash_attention_2", extra="flash")
    check_backends(cfg.tracking)
    peft = getattr(cfg, "peft", None)
    if peft is not None and peft.load_in_4bit:
        require("bitsandbytes", "peft.load_in_4bit", extra="qlora")
    model_dir, config, vocab_size = validate_model(cfg.model, "model", cfg.seq_len)
    data = open_mix(cfg.data, data_kind, "data", part=data_part)
    val = open_mix(cfg.val_data, data_kind, "val_data", part=data_part) if cfg.val_data else None
    return StageInputs(model_dir, config, vocab_size, data, val)


# --------------------------------------------------------------------------- skip / guard


def _run_fingerprint(cfg: TrainConfig, inputs: StageInputs) -> str:
    return identity.key(cfg.stage, cfg.result_fingerprint(), inputs.signature())


def finished_result(cfg: TrainConfig, inputs: StageInputs) -> TrainResult | None:
    """The existing result in ``cfg.out`` if it is this run's; refuse a foreign ``out``."""
    out = Path(cfg.out).expanduser().absolute()
    manifest = read_manifest(out) if out.is_dir() else None
    fingerprint = _run_fingerprint(cfg, inputs)
    if manifest is not None and manifest.get("run", {}).get("fingerprint") == fingerprint:
        if manifest.get("stage") == cfg.stage:
            return TrainResult(
                out, cfg.stage, dict(manifest.get("metrics", {})), manifest, skipped=True,
                checkpoint=manifest.get("run", {}).get("checkpoint"),
            )  # fmt: skip
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        what = (
            f"a {manifest.get('stage')!r} output made with another config or inputs"
            if manifest
            else "files that are not a finished stage output"
        )
        raise OutputExistsError(
            f"out: {out} holds {what}; choose another out or set overwrite: true"
        )
    # before training, not after it: never an input, never a directory solar-ray did not write
    check_output(out, cfg.overwrite, _input_paths(cfg, inputs))
    return None


def _input_paths(cfg: TrainConfig, inputs: StageInputs) -> list[Path]:
    """The local files and directories a training stage reads."""
    given = local_inputs(cfg.model, cfg.data, cfg.val_data, getattr(cfg, "ref_model", None))
    return given + [d for d in (inputs.model_dir, inputs.ref_model_dir) if d is not None]


def _read_run_file(storage: str, name: str) -> dict[str, Any] | None:
    """The run file of ``name`` in ``storage``; None when there is none (or it is unreadable
    JSON). A storage error (no permission, an unreachable bucket) is raised, never taken for
    "no run yet": that would write a new run file over the one that guards the checkpoints."""
    return read_json(f"{storage.rstrip('/')}/{name}/{RUN_FILE}")


def _write_run_file(storage: str, name: str, data: dict) -> None:
    fs, root = arrow_filesystem(f"{storage.rstrip('/')}/{name}")
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(f"{root}/{RUN_FILE}") as f:
        f.write((json.dumps(data, indent=2) + "\n").encode("utf-8"))


def _guard_run(cfg: TrainConfig, fingerprint: str, local_dir: str | None) -> None:
    """Refuse to resume a run in storage that another config or other inputs started."""
    storage = cfg.resolved_storage_path
    previous = _read_run_file(storage, cfg.run_name)
    if previous is not None and previous.get("fingerprint") != fingerprint and cfg.overwrite:
        fs, root = arrow_filesystem(f"{storage.rstrip('/')}/{cfg.run_name}")
        log.warning("overwrite: deleting the run %s/%s started with another config", storage,
                    cfg.run_name)  # fmt: skip
        fs.delete_dir(root)
        previous = None
    if previous is not None and previous.get("fingerprint") != fingerprint:
        raise ConfigError(
            f"name: the run {cfg.run_name!r} in {storage} was started with another config or "
            "other inputs, so its checkpoints cannot be resumed; choose another name, "
            "set overwrite: true to start over, or delete "
            f"{storage.rstrip('/')}/{cfg.run_name}"
        )
    if previous is None:
        _write_run_file(
            storage,
            cfg.run_name,
            {"stage": cfg.stage, "fingerprint": fingerprint, "config": cfg.to_dict(),
             "local": local_dir is not None},
        )  # fmt: skip


# --------------------------------------------------------------------------- launch


@contextlib.contextmanager
def _launch_local(worker_fn: Callable[[dict], None], spec: WorkerSpec) -> Iterator[tuple[Path, str]]:
    assert spec.local_run_dir is not None
    worker_fn(spec.config())
    final = LocalSession(spec.local_run_dir).latest_checkpoint_path
    if final is None or not (final / FINAL_MARKER).is_file():
        raise RuntimeError("the local training run ended without a final checkpoint")
    yield final, str(final)


def _link_or_copy_tree(src: Path, dst: Path) -> None:
    """Hard-link every file of ``src`` into ``dst`` (copy across filesystems)."""
    for p in src.rglob("*"):
        target = dst / p.relative_to(src)
        if p.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(p, target)
        except OSError:
            shutil.copy2(p, target)


def _lora_card_lines(cfg: TrainConfig) -> list[str]:
    peft = getattr(cfg, "peft", None)
    if peft is None:
        return []
    modules = peft.target_modules if isinstance(peft.target_modules, str) else ", ".join(peft.target_modules)
    return [
        f"Trained as LoRA adapters (r={peft.r}, alpha={peft.alpha:g}, modules: {modules}"
        f"{', 4-bit base' if peft.load_in_4bit else ''}), merged into the weights"
        f"{'; the adapter is kept in adapter/' if peft.keep_adapter else ''}.",
        "",
    ]


def train_and_export(
    cfg: TrainConfig,
    worker_fn: Callable[[dict], None],
    inputs: StageInputs,
    *,
    spec_values: dict[str, Any] | None = None,
    datasets: dict[str, Any] | None = None,
    card_lines: list[str] | None = None,
) -> TrainResult:
    """Skip if done, launch (Ray or local), export into ``cfg.out`` with lineage.

    ``spec_values`` are the stage-specific fields of the workers' :class:`WorkerSpec`.
    """
    done = finished_result(cfg, inputs)
    if done is not None:
        log.info("%s: %s is already this run's result; not training again", cfg.stage, done.out)
        return done
    fingerprint = _run_fingerprint(cfg, inputs)
    spec = worker_spec(cfg, inputs, **(spec_values or {}))
    _guard_run(cfg, fingerprint, spec.local_run_dir)
    # the parent models' content hashes, while the workers train
    models = [("model", inputs.model_dir, cfg.model)]
    if inputs.ref_model_dir is not None:
        models.append(("ref_model", inputs.ref_model_dir, getattr(cfg, "ref_model", "")))
    launch = (
        _launch_local(worker_fn, spec) if cfg.local else launch_ray(cfg, worker_fn, spec, datasets=datasets)
    )
    hashing = identity.in_background(functools.partial(identity.model_fingerprint, d) for _, d, _ in models)
    with hashing as hashes, launch as (final_dir, checkpoint_uri):
        metrics = json.loads((final_dir / FINAL_MARKER).read_text(encoding="utf-8"))
        probe = metrics.pop("probe", None)
        with atomic_output_dir(cfg.out, overwrite=True, inputs=_input_paths(cfg, inputs)) as tmp:
            _link_or_copy_tree(final_dir / "export", tmp)
            parents = [
                h.result() | {"kind": "model", "role": role, "source": source}
                for h, (role, _, source) in zip(hashes, models, strict=True)
            ]
            parents.append(inputs.data.lineage() | {"role": "data"})
            if inputs.val is not None:
                parents.append(inputs.val.lineage() | {"role": "val_data"})
            parents.extend(inputs.extra_parents)
            write_model_card(
                tmp,
                f"{Path(cfg.out).name}: {cfg.stage} of {Path(str(inputs.model_dir)).name}",
                [
                    f"Made by `solar-ray {cfg.stage}` from `{cfg.model}` on `{cfg.data}`: "
                    f"{metrics.get('steps')} steps, {metrics.get('world_size', cfg.max_workers)} "
                    f"worker(s) at the end, ZeRO-{cfg.zero_stage}.",
                    "",
                    *_lora_card_lines(cfg),
                    *(card_lines or []),
                    *[
                        f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}"
                        for k, v in metrics.items()
                        if not isinstance(v, list | dict)
                    ],
                ],
            )
            manifest = write_manifest(
                tmp,
                cfg.stage,
                parents=parents,
                config=cfg.to_dict(),
                metrics=metrics,
                run={
                    "name": cfg.run_name,
                    "storage_path": cfg.resolved_storage_path,
                    "checkpoint": checkpoint_uri,
                    "fingerprint": fingerprint,
                    "num_workers": cfg.max_workers,
                    "num_workers_range": [cfg.min_workers, cfg.max_workers],
                    "zero_stage": cfg.zero_stage,
                    "local": cfg.local,
                },
                export_probe=probe,
            )
    out = Path(cfg.out).expanduser().absolute()
    return TrainResult(out, cfg.stage, metrics, manifest, checkpoint=checkpoint_uri)
