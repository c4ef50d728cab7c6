"""Moved: the prepared-mix contract lives in :mod:`solar_ray.data.contract`, paths in
:mod:`solar_ray.fs`. These names stay importable from here only until ``train/common.py``
imports them from their owners (issue 15)."""

from solar_ray.data.contract import MixInfo, open_mix
from solar_ray.fs import arrow_filesystem

__all__ = ["MixInfo", "arrow_filesystem", "open_mix"]
