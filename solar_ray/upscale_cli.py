"""``solar-ray upscale``: parse, validate, call :func:`solar_ray.upscale.run_upscale`, report.

Accepts the flags, a stage YAML (``--config``), or a mergekit passthrough YAML (a file
with ``slices``), which runs as an explicit plan.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from solar_ray.cli import add_config_args
from solar_ray.config import load_config, load_yaml


def cli(command: str, parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Add the upscale arguments to ``parser``; return the runner."""
    add_config_args(parser)
    parser.add_argument("--source", help="HF dir, hub id, .gguf file or 'smollm2-135m'")
    parser.add_argument("--out", help="output directory")
    parser.add_argument("--method", choices=["solar", "llama-pro", "stack", "explicit"])
    parser.add_argument("--m", type=int, help="layers removed from each copy (solar)")
    parser.add_argument("--expand-every", type=int, help="llama-pro: a new block every K layers")
    parser.add_argument("--repeat", type=int, help="stack: copies of the stack (G)")
    parser.add_argument("--layers", type=int, nargs="+", help="explicit source layer list")
    parser.add_argument("--overwrite", action="store_true", default=None)
    parser.add_argument("--allow-pickle", action="store_true", default=None)
    parser.add_argument("--max-shard-size-mb", type=int)
    return _run


def _run(args: argparse.Namespace) -> int:
    from solar_ray.upscale import UpscaleConfig, plan_from_mergekit, run_upscale

    flags = {
        "source": args.source,
        "out": args.out,
        "method": args.method,
        "m": args.m,
        "expand_every": args.expand_every,
        "repeat": args.repeat,
        "layers": args.layers,
        "overwrite": args.overwrite,
        "allow_pickle": args.allow_pickle,
        "max_shard_size_mb": args.max_shard_size_mb,
    }
    path = args.config
    if path and "slices" in load_yaml(path):
        model, layers = plan_from_mergekit(load_yaml(path))
        flags = {"source": model, "method": "explicit", "layers": layers} | {
            k: v for k, v in flags.items() if v is not None
        }
        path = None
    cfg = load_config(UpscaleConfig, path, args.overrides, data=flags)
    result = run_upscale(cfg)
    print(
        f"upscaled {cfg.source} ({cfg.method}): {result.num_layers_in} -> "
        f"{result.num_layers_out} layers -> {result.out}"
    )
    return 0
