"""Data mixes with Ray Data: sources, normalizers, filters, mixing, packing, synthetic math.

Public API (Ray is only used inside the functions that need it)::

    from solar_ray.data import DataConfig, MixConfig, build_mix, build_mix_dataset, run_data
    from solar_ray.data import read_prepared, load_table, pack_documents, tokenize_sft

See ``docs/data.md`` for the YAML schema and the on-disk contract.
"""

from __future__ import annotations

from typing import Any

from solar_ray.data.config import (
    DataConfig,
    DecontamConfig,
    MixConfig,
    PrepareConfig,
    RephraserConfig,
    SeedsConfig,
    SourceConfig,
    SynthMathConfig,
)

__all__ = [
    "DataConfig",
    "DecontamConfig",
    "MixConfig",
    "MixResult",
    "PrepareConfig",
    "RephraserConfig",
    "SeedsConfig",
    "SourceConfig",
    "SynthMathConfig",
    "build_mix",
    "build_mix_dataset",
    "build_mix_result",
    "load_table",
    "pack_documents",
    "read_prepared",
    "run_data",
    "run_synth_math",
    "tokenize_sft",
]

_LAZY = {
    "MixResult": "solar_ray.data.mix",
    "build_mix": "solar_ray.data.mix",
    "build_mix_dataset": "solar_ray.data.mix",
    "build_mix_result": "solar_ray.data.mix",
    "read_prepared": "solar_ray.data.mix",
    "run_data": "solar_ray.data.mix",
    "load_table": "solar_ray.data.contract",
    "pack_documents": "solar_ray.data.pack",
    "tokenize_sft": "solar_ray.data.templates",
    "run_synth_math": "solar_ray.data.synth_math",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'solar_ray.data' has no attribute {name!r}")
