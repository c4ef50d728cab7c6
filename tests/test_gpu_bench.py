"""bench/gpu.py's CPU dry mode: the GPU check's whole sequence, tiny, without Ray.

The GPU check runs only on a briefly lent H200; this keeps it from rotting in between. The
dry mode builds a tiny random Llama, up-scales it (SOLAR), runs a few pretrain steps
(DeepSpeed ZeRO-2, ``local: true``), reloads the export against its recorded probe, and a
few SFT and DPO steps (TRL on DeepSpeed, in the same process after the pretrain run), with
``import ray`` refused throughout.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load_bench() -> object:
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "bench" / "gpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_dry_mode_runs_every_phase_without_ray(tmp_path: Path) -> None:
    bench = _load_bench()
    try:
        report = bench.main(["--dry", "--out-dir", str(tmp_path / "out"),  # type: ignore[attr-defined]
                             "--work-dir", str(tmp_path / "work")])  # fmt: skip
    finally:  # the check refuses `import ray` in its process; later tests may need Ray
        sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "_NoRay"]

    model = report["model"]
    assert model["s"] == 2 * (model["n"] - model["m"])
    phases = {row["phase"]: row for row in report["phases"]}
    assert set(phases) == {"pretrain", "sft", "dpo"}
    pretrain = phases["pretrain"]
    assert pretrain["steps"] == 3 and pretrain["loss_finite"]
    assert pretrain["tokens_per_s"] > 0 and pretrain["mfu"] is None  # no peak for a CPU
    # TRL's stages after the pretrain run, in the same process (DeepSpeed's process group
    # from the first run must not leak into the next)
    for stage in ("sft", "dpo"):
        row = phases[stage]
        assert "error" not in row and "skipped" not in row, row
        assert row["steps"] == 2, row
        assert row["final_loss"] is not None and math.isfinite(row["final_loss"]), row
        assert row["tokens_per_s"] > 0, row
    assert report["export"]["identical"], report["export"]
    saved = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert saved["model"]["num_params"] == model["num_params"]
    section = (tmp_path / "out" / "gpu.md").read_text()
    assert section.startswith("# GPU check") and "| pretrain | sdpa |" in section
    assert "| sft |" in section and "| dpo |" in section
