"""What the training benchmarks set before they import anything of the project.

This checkout's ``solar_ray`` comes first, in the bench process, its children and Ray's
workers (an editable install may point at another checkout), and its ``tests/`` is on
``sys.path`` for the mix writers of ``tests/stage_io.py``; the model hub is offline and
the cache is the checkout's; one torch thread per process, so the figures are per core;
Ray's private local instances run without token auth.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

for _path in (REPO / "tests", REPO / "bench", REPO):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
for _key, _value in {
    "SOLAR_RAY_CACHE": str(REPO / ".cache" / "solar-ray"),
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "OMP_NUM_THREADS": "1",
}.items():
    os.environ.setdefault(_key, _value)
