"""``solar-ray upscale``: parse, validate, call :func:`solar_ray.upscale.run_upscale`, report.

Accepts the flags, a stage YAML (``--config``), or a mergekit passthrough YAML (a file
with ``slices``), which runs as an explicit plan.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from solar_ray.config import add_config_args, add_field_flags, flag_values, load_config, load_yaml


def cli(command: str, parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Add the upscale arguments (one per :class:`UpscaleConfig` field) to ``parser``."""
    from solar_ray.upscale import UpscaleConfig

    add_config_args(parser)
    add_field_flags(parser, UpscaleConfig)
    return _run


def _run(args: argparse.Namespace) -> int:
    from solar_ray.upscale import UpscaleConfig, UpscaleError, plan_from_mergekit, run_upscale

    flags = flag_values(args, UpscaleConfig)
    path = args.config
    spec = load_yaml(path) if path else {}
    if "slices" in spec:
        try:
            model, layers = plan_from_mergekit(spec)
        except UpscaleError as e:
            raise UpscaleError(f"{path}: {e}") from None
        flags = {"source": model, "method": "explicit", "layers": layers} | flags
        path = None
    cfg = load_config(UpscaleConfig, path, args.overrides, data=flags)
    from solar_ray.remote import run_to_out

    result = run_to_out(run_upscale, cfg)
    print(
        f"upscaled {cfg.source} ({cfg.method}): {result.num_layers_in} -> "
        f"{result.num_layers_out} layers -> {result.out}"
    )
    return 0
