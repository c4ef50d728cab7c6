"""``solar-ray data``: parse, validate, call :func:`solar_ray.data.mix.run_data`, report."""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable

from solar_ray.config import add_config_args, add_field_flags, flag_values, load_config


def cli(command: str, parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Add the data arguments (one per :class:`DataConfig` field) to ``parser``."""
    from solar_ray.data.config import DataConfig

    add_config_args(parser, config_required=True)
    add_field_flags(parser, DataConfig)
    parser.add_argument("--only", nargs="+", metavar="MIX", help="build only these mixes")
    return _run


def _run(args: argparse.Namespace) -> int:
    from solar_ray.data.config import DataConfig

    cfg = load_config(DataConfig, args.config, args.overrides, data=flag_values(args, DataConfig))

    from solar_ray.cluster import init_ray
    from solar_ray.data.mix import run_data
    from solar_ray.remote import run_to_out

    init_ray()  # joins the cluster RAY_ADDRESS names, else starts a local instance
    result = run_to_out(functools.partial(run_data, only=args.only), cfg)
    if result.synth_math is not None:
        sm = result.synth_math
        state = "reused" if sm.reused else "built"
        print(
            f"synth_math ({state}): {sm.num_seeds} seeds -> {sm.num_kept} kept, dropped {sm.dropped}"
        )
    for name, mix in result.mixes.items():
        m = mix.manifest
        prep = m.get("prepare") or {}
        extra = ""
        if prep.get("split") == "packed":
            extra = (
                f", {prep['num_rows']} packed blocks ({prep['packing_efficiency']:.2%} non-padding)"
            )
        elif prep:
            extra = f", {prep['num_rows']} tokenized rows"
        print(
            f"{name} ({m['kind']}): {mix.num_rows} rows, {m['rejects']['total']} rejects{extra} -> {mix.out}"
        )
    return 0
