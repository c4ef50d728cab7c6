"""One sweep trial: a Ray Tune driver function that upscales, trains and reports.

:func:`run_trial` is the Tune trainable: it takes its upscale from the cache, launches the
training stage's per-worker loop through :func:`solar_ray.train.launch.launch_ray`, and
:class:`~solar_ray.tune.hooks.SweepReportCallback` forwards rank 0's held-out reports to
Tune as they happen. The Train run is named after the experiment and trial, so a restarted
trial resumes from its latest checkpoint. See docs/sweep.md, "What a trial does".
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from solar_ray import identity
from solar_ray.checkpoint import OutputExistsError, read_manifest, write_json_atomic
from solar_ray.config import ConfigError, StageConfig, validate
from solar_ray.tune.config import TrialSpec

if TYPE_CHECKING:
    from solar_ray.stages import Stage

__all__ = [
    "cached_upscale",
    "forwarded_metrics",
    "model_stats",
    "run_trial",
    "trial_path",
    "traced_worker",
    "train_config_for",
    "train_stage",
    "trial_metrics",
]

log = logging.getLogger(__name__)

#: where each trial keeps its own small files under the sweep directory
TRIALS_DIR = "trials"

#: the per-row held-out losses a held-out report carries (solar_ray.train.metrics.eval_metrics)
ROW_KEYS = ("eval_row_nll", "eval_row_tokens")


# --------------------------------------------------------------------------- upscale cache


def cached_upscale(base_dir: str | Path, args: Mapping[str, Any], cache_dir: str | Path) -> Path:
    """The upscale of ``base_dir`` with ``args`` (method and its parameter), made once.

    The cache key is (source, method, parameter): ``cache_dir/<method>-<param><value>-<source
    hash>``. A finished entry has its ``solar.json``; two trials making the same entry at
    once both succeed (the writer is atomic and the second rename replaces the first).
    """
    from solar_ray.upscale import UpscaleConfig, run_upscale

    base_dir = Path(base_dir)
    method = args["method"]
    params = "".join(f"-{k.replace('_', '')}{v}" for k, v in sorted(args.items()) if k != "method")
    out = Path(cache_dir) / f"{method}{params}-{identity.dir_signature(base_dir)[:10]}"
    if read_manifest(out) is not None:
        return out
    cfg = UpscaleConfig(source=str(base_dir), out=str(out), overwrite=True, **dict(args))
    try:
        run_upscale(cfg)
    except OutputExistsError:
        if read_manifest(out) is None:
            raise
    return out


def model_stats(
    model_dir: str | Path, seq_len: int, upscale: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Layers, parameters and estimated training FLOPs per token of a model directory, or of
    its upscale with ``upscale`` (method and parameter) as planned, without writing it.

    Parameters are counted from the safetensors headers (nothing is loaded; an upscale's
    from the tensors the DUS writer would write, :func:`solar_ray.upscale.plan_tensors`),
    or, for a ``.gguf`` file, from the model its header describes
    (:func:`solar_ray.models.gguf_layout`: nothing dequantized);
    FLOPs per token follow :func:`solar_ray.train.metrics.flops_per_token` (``6N`` +
    attention), the estimate the training stages report MFU with.
    """
    from solar_ray.models import arch_for_config, gguf_layout, read_config
    from solar_ray.train.metrics import flops_per_token
    from solar_ray.upscale import (
        TensorRef,
        UpscaleConfig,
        plan_layers,
        plan_tensors,
        read_model_tensors,
        replan_config,
    )

    model_dir = Path(model_dir)
    if model_dir.suffix == ".gguf":
        config, layout = gguf_layout(model_dir)
        refs = {
            name: TensorRef(name, "F32", shape, model_dir, 0, 4 * math.prod(shape))
            for name, shape in layout.items()
        }
    else:
        config = read_config(model_dir)
        refs = read_model_tensors(model_dir)
    shapes = [ref.shape for ref in refs.values()]
    if upscale:
        spec = arch_for_config(config)
        n = int((config.get("text_config") or config)["num_hidden_layers"])
        plan = plan_layers(UpscaleConfig(source=str(model_dir), **dict(upscale)), n)
        shapes = [t.shape for t in plan_tensors(refs, spec, n, plan)]
        config = replan_config(config, spec, plan)
    text = config.get("text_config") or config
    num_params = sum(math.prod(shape) for shape in shapes)
    ns = SimpleNamespace(
        **{
            k: text.get(k)
            for k in (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "vocab_size",
                "head_dim",
            )
        }
    )
    return {
        "num_layers": int(text["num_hidden_layers"]),
        "num_params": num_params,
        "flops_per_token": flops_per_token(ns, num_params, seq_len),
    }


# --------------------------------------------------------------------------- train config


def train_stage(kind: str) -> Stage:
    """The registry entry of a training kind a sweep can train (pretrain or sft)."""
    from solar_ray.stages import stage

    if kind not in ("pretrain", "sft"):
        raise ConfigError(f"train.kind: expected pretrain or sft, got {kind!r}")
    try:
        return stage(kind)
    except ImportError as e:
        raise ConfigError(f"train.kind: the {kind} stage is not available ({e})") from None


def train_config_for(ctx: Mapping[str, Any], spec: TrialSpec, model_dir: str | Path) -> StageConfig:
    """The validated training config of one trial: shared fields, its data and overrides."""
    cls = train_stage(ctx["train_kind"]).config
    data = {**ctx["train"], **spec.train}
    if spec.data:
        data["data"] = spec.data
    if spec.val_data:
        data["val_data"] = spec.val_data
        data.pop("val_fraction", None)
    if ctx.get("checkpoint_at"):
        data["checkpoint_at"] = sorted({*data.get("checkpoint_at", []), *ctx["checkpoint_at"]})
    data.update(
        model=str(model_dir),
        out=str(trial_path(ctx, spec.name) / "model"),
        storage_path=ctx["storage_path"],
        name=f"{ctx['experiment']}-{spec.name}",
        overwrite=True,
    )
    return validate(cls, data, "sweep recipe", prefix="train")


# --------------------------------------------------------------------------- reporting


def trial_metrics(
    raw: Mapping[str, Any], metric: str, mode: str, stats: Mapping[str, Any], tokens_per_step: int
) -> dict[str, Any]:
    """What a trial reports to Tune for one held-out report of its training run.

    A non-finite metric (a diverged run) becomes the worst value (``inf`` when minimising),
    so ASHA stops the trial instead of comparing NaN, which it cannot.
    """
    step = int(raw["step"])
    value = float(raw[metric])
    diverged = not math.isfinite(value)
    if diverged:
        value = math.inf if mode == "min" else -math.inf
    tokens = int(raw.get("tokens_seen") or step * tokens_per_step)
    out = {
        "step": step,
        metric: value,
        "diverged": diverged,
        "tokens_seen": tokens,
        "flops": float(stats["flops_per_token"]) * tokens,
        "num_layers": stats["num_layers"],
        "num_params": stats["num_params"],
        "final": False,
    }
    for key in ("eval_loss", "eval_ppl", "loss", "eval_loss_se"):
        if key in raw and key != metric:
            out[key] = float(raw[key])
    if "eval_n" in raw:
        out["eval_n"] = int(raw["eval_n"])
    for key in ROW_KEYS:  # the held-out rows: paired comparisons and interpolated errors
        if key in raw:
            out[key] = [float(x) for x in raw[key]]
    return out


def forwarded_metrics(
    raw: Mapping[str, Any],
    metric: str,
    mode: str,
    stats: Mapping[str, Any],
    tokens_per_step: int,
    last_step: int | None = None,
) -> dict[str, Any] | None:
    """A worker report as a Tune result, or None when it is not forwarded.

    Reports without a held-out metric are dropped (Tune requires the metric in every
    result), and so are reports at the run's last step: the driver reports the final
    result with its checkpoint, and ASHA stops a trial at ``max_t`` on the first report
    there, which must not be one the driver has yet to follow.
    """
    if "step" not in raw or metric not in raw:
        return None
    if last_step is not None and int(raw["step"]) >= last_step:
        return None
    return trial_metrics(raw, metric, mode, stats, tokens_per_step)


def traced_worker(
    config: dict[str, Any],
    *,
    worker_fn: Callable[[dict], None],
    experiment: str,
    trial: str,
    attempt: str,
) -> None:
    """The training stage's per-worker loop, after rank 0 registered its placement group.

    The sweep frees the group itself when the trial is stopped early (see
    :mod:`solar_ray.tune.hooks`); a run outside a sweep (no registry) just trains.
    """
    import ray
    import ray.train

    from solar_ray.tune.hooks import get_registry

    if ray.train.get_context().get_world_rank() == 0:
        pg = ray.util.get_current_placement_group()
        registry = get_registry(experiment)
        if pg is not None and registry is not None:
            ray.get(registry.add.remote(trial, attempt, pg))
    worker_fn(config)


# --------------------------------------------------------------------------- the trainable


def trial_path(ctx: Mapping[str, Any], name: str) -> Path:
    """``OUT/trials/<experiment>/<trial>``: the trial's own files (attempts, result)."""
    return Path(ctx["out"]) / TRIALS_DIR / ctx["experiment"] / name


def _log_attempt(trial_dir: Path, event: str) -> None:
    """Append one line to ``attempts.jsonl``: ``train`` when training is launched."""
    with open(trial_dir / "attempts.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"event": event, "time": time.time(), "pid": os.getpid()}) + "\n")


def run_trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """The Tune trainable: upscale (cached), train with a TorchTrainer, report to Tune.

    ``config["trial"]`` is the trial's name; ``ctx`` the sweep's resolved settings with
    every trial's :class:`TrialSpec` (see :func:`solar_ray.tune.sweep.run_sweep`).
    """
    import ray.tune

    from solar_ray.train.launch import launch_ray, worker_spec
    from solar_ray.train.session import FINAL_MARKER
    from solar_ray.tune.hooks import SweepReportCallback

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    spec = TrialSpec.model_validate(ctx["trials"][config["trial"]])
    trial_dir = trial_path(ctx, spec.name)
    trial_dir.mkdir(parents=True, exist_ok=True)
    done = trial_dir / "result.json"
    trial_key = identity.key(
        ctx["train_kind"], ctx["train"], spec.to_dict(), identity.dir_signature(ctx["base_dir"])
    )
    previous = json.loads(done.read_text(encoding="utf-8")) if done.is_file() else None
    if previous is not None and previous.get("key") == trial_key:
        # finished before the sweep was interrupted (and before Tune saved that): report it
        _log_attempt(trial_dir, "finished-before")
        ray.tune.report(previous)
        return
    _log_attempt(trial_dir, "train")

    upscale = spec.upscale_args()
    model_dir = (
        cached_upscale(ctx["base_dir"], upscale, ctx["upscale_cache"])
        if upscale
        else Path(ctx["base_dir"])
    )
    cfg = train_config_for(ctx, spec, model_dir)
    entry = train_stage(ctx["train_kind"])
    assert entry.prepare is not None and entry.worker is not None
    inputs, spec_values = entry.prepare(cfg)
    stats = model_stats(model_dir, cfg.seq_len)
    tokens_per_step = cfg.effective_global_batch_size * cfg.seq_len
    metric, mode = ctx["metric"], ctx["mode"]
    write_json_atomic(
        trial_dir / "trial.json",
        {
            "trial": spec.to_dict(),
            "model": str(model_dir),
            "run_name": cfg.run_name,
            "storage_path": cfg.resolved_storage_path,
            **stats,
        },
    )

    worker = partial(
        traced_worker,
        worker_fn=entry.worker,
        experiment=ctx["experiment"],
        trial=spec.name,
        attempt=uuid.uuid4().hex,
    )
    forward = partial(
        forwarded_metrics,
        metric=metric,
        mode=mode,
        stats=stats,
        tokens_per_step=tokens_per_step,
        last_step=cfg.steps,
    )
    launch = launch_ray(
        cfg, worker, worker_spec(cfg, inputs, **spec_values), callbacks=[SweepReportCallback(forward)]
    )
    with launch as (final_dir, checkpoint):
        final = json.loads((final_dir / FINAL_MARKER).read_text(encoding="utf-8"))
    if metric not in final:
        raise ConfigError(
            f"scheduler.metric: the {ctx['train_kind']} stage did not report {metric!r} "
            f"(it reported {sorted(k for k in final if not isinstance(final[k], list | dict))})"
        )
    report = trial_metrics(
        {**final, "step": final["steps"], "loss": final.get("final_loss") or math.nan},
        metric,
        mode,
        stats,
        tokens_per_step,
    )
    report.update(
        key=trial_key,
        final=True,
        checkpoint_path=checkpoint,
        model_path=f"{checkpoint.rstrip('/')}/export",
        train_runtime_s=float(final.get("train_runtime_s") or 0.0),
    )
    write_json_atomic(done, report)
    ray.tune.report(report)
