"""``solar-ray pretrain|sft|dpo``: parse, validate, call the stage function, report.

Each command takes ``--config FILE`` (a stage YAML, e.g. ``jobs/pretrain-demo.yaml``),
``--set key=value`` overrides and a few common flags; the stage's config class checks them.
Submitting to a cluster is the same command under ``ray job submit``::

    ray job submit --working-dir . -- solar-ray pretrain --config jobs/pretrain-demo.yaml
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from solar_ray.cli import add_config_args
from solar_ray.config import load_config


def cli(command: str, parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Add the training arguments to ``parser``; return the runner for ``command``."""
    add_config_args(parser)
    parser.add_argument("--model", help="model source: HF dir, hub id, .gguf or 'smollm2-135m'")
    parser.add_argument("--data", help="prepared mix directory or URI")
    parser.add_argument("--out", help="output model directory")
    parser.add_argument("--name", help="Ray Train run name (default: the out directory's name)")
    parser.add_argument("--storage-path", help="Ray Train storage: local dir, s3:// or gs://")
    parser.add_argument("--num-workers", type=int, help="training workers")
    parser.add_argument("--steps", type=int, help="optimizer steps")
    parser.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3])
    parser.add_argument("--use-gpu", action="store_true", default=None)
    parser.add_argument("--local", action="store_true", default=None,
                        help="run one worker in this process, without Ray")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", default=None)

    def run(args: argparse.Namespace) -> int:
        return _run(command, args)

    return run


def _run(command: str, args: argparse.Namespace) -> int:
    from solar_ray.train.config import DPOConfig, PretrainConfig, SFTConfig

    stages = {"pretrain": PretrainConfig, "sft": SFTConfig, "dpo": DPOConfig}
    flags = {
        "model": args.model,
        "data": args.data,
        "out": args.out,
        "name": args.name,
        "storage_path": args.storage_path,
        "num_workers": args.num_workers,
        "steps": args.steps,
        "zero_stage": args.zero_stage,
        "use_gpu": args.use_gpu,
        "local": args.local,
        "overwrite": args.overwrite,
    }
    cfg = load_config(stages[command], args.config, args.overrides, data=flags)
    if command == "pretrain":
        from solar_ray.train.pretrain import run_pretrain as run
    elif command == "sft":
        from solar_ray.train.sft import run_sft as run
    else:
        from solar_ray.train.dpo import run_dpo as run
    result = run(cfg)  # type: ignore[arg-type]
    metrics = result.metrics
    summary = ", ".join(
        f"{k}={metrics[k]:.4g}" if isinstance(metrics.get(k), float) else f"{k}={metrics.get(k)}"
        for k in ("steps", "final_loss", "eval_loss", "eval_ppl")
        if metrics.get(k) is not None
    )
    state = "already done, not retrained" if result.skipped else "trained"
    print(f"{command}: {state} -> {result.out} ({summary})")
    return 0
