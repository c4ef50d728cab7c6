"""``solar-ray pretrain|sft|dpo``: parse, validate, call the stage function, report.

Each command takes ``--config FILE`` (a stage YAML, e.g. ``jobs/pretrain-demo.yaml``),
``--set key=value`` overrides and one flag per field of the stage's config class
(``--num-workers 2 --steps 8 --local``), which checks them.
Submitting to a cluster is the same command under ``ray job submit``::

    ray job submit --working-dir . -- solar-ray pretrain --config jobs/pretrain-demo.yaml
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from solar_ray.config import add_config_args, add_field_flags, flag_values, load_config


def cli(command: str, parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Add the stage's arguments (one per config field) to ``parser``; return the runner."""
    from solar_ray.stages import stage

    add_config_args(parser)
    add_field_flags(parser, stage(command).config)

    def run(args: argparse.Namespace) -> int:
        return _run(command, args)

    return run


def _run(command: str, args: argparse.Namespace) -> int:
    from solar_ray.stages import stage

    entry = stage(command)
    cfg = load_config(entry.config, args.config, args.overrides, data=flag_values(args, entry.config))
    run = entry.run
    from solar_ray.remote import run_to_out

    result = run_to_out(run, cfg)  # type: ignore[arg-type]
    metrics = result.metrics
    summary = ", ".join(
        f"{k}={metrics[k]:.4g}" if isinstance(metrics.get(k), float) else f"{k}={metrics.get(k)}"
        for k in ("steps", "final_loss", "eval_loss", "eval_ppl")
        if metrics.get(k) is not None
    )
    state = "already done, not retrained" if result.skipped else "trained"
    print(f"{command}: {state} -> {result.out} ({summary})")
    return 0
