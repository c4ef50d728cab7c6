"""jobs/tiny.yaml with its run directory on a real S3 server: stopped and resubmitted.

``solar-ray run jobs/tiny.yaml --out s3://...`` as a user submits it: the job is stopped
(SIGTERM, as ``ray job stop`` does) once continued pretraining has a checkpoint in the
bucket, and resubmitted from a node with an empty cache: the finished stages are skipped
from the bucket's markers, ``cpt`` resumes from the checkpoint Ray Train reads back from
the bucket, and the run completes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from s3_server import objects, s3_server
from tiny_recipe import ALL, KINDS, SMALLER, sft_mix_sweep

from solar_ray.faults import HOLD_ENV

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BUCKET = "solar-runs"


def _cmd(uri: str) -> list[str]:
    sets = [a for s in SMALLER for a in ("--set", s)]
    return [sys.executable, "-m", "solar_ray.cli", "run", str(REPO / "jobs" / "tiny.yaml"), *sets,
            "--out", uri]  # fmt: skip


def test_tiny_recipe_on_s3_stops_and_resumes_from_the_bucket(tmp_path):
    uri = f"s3://{BUCKET}/runs/tiny"
    with s3_server(BUCKET) as s3:
        env = {**os.environ, **s3}
        log = tmp_path / "first.log"
        # cpt's workers wait right after their first checkpoint report (step 4 of 8) until
        # the job is stopped: the stop lands at a known step, never after cpt finished
        hold = tmp_path / "hold"
        hold.mkdir()
        (hold / "hold").touch()
        with log.open("w") as out:
            proc = subprocess.Popen(_cmd(uri), env={**env, HOLD_ENV: str(hold)}, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
            deadline = time.monotonic() + 900
            # stop the job once Ray Train has registered that checkpoint in the bucket
            while time.monotonic() < deadline and proc.poll() is None:
                if (hold / "held-0").exists() and _registered_checkpoints(s3, "cpt"):
                    break
                time.sleep(1)
            assert proc.poll() is None, log.read_text()[-5000:]
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=300)
            (hold / "hold").unlink()
        first = log.read_text()
        assert proc.returncode != 0 and "cpt (pretrain): running" in first, first[-5000:]
        stored = objects(s3, BUCKET, "runs/tiny/")
        assert "runs/tiny/cpt/.solar-ray-output" not in stored  # never taken as finished
        finished = {k.split("/")[2] for k in stored if k.endswith("/.solar-ray-output")}
        assert finished == {"corpus", "base", "upscaled", "data"}

        # resubmitted on a node with an empty cache (another mirror, nothing downloaded yet)
        env["SOLAR_RAY_CACHE"] = str(tmp_path / "other-node")
        second = subprocess.run(_cmd(uri), env=env, capture_output=True, text=True, timeout=1800)
        assert second.returncode == 0, second.stdout[-5000:] + second.stderr[-5000:]
        for stage in finished:
            assert f"{stage} ({KINDS[stage]}): done, skipped" in second.stdout
        assert f"(ran {len(ALL) - len(finished)}, skipped {len(finished)})" in second.stdout
        stored = objects(s3, BUCKET, "runs/tiny/")
        for stage in ALL:
            assert f"runs/tiny/{stage}/.solar-ray-output" in stored, stage
        cpt = json.loads(stored["runs/tiny/cpt/solar.json"])
        # the stopped run's checkpoint (step 4) was read back from the bucket
        assert cpt["metrics"]["resumed_from"] == [4] and cpt["metrics"]["steps"] == 8
        assert "runs/tiny/report/index.html" in stored and "runs/tiny/report/results.md" in stored


def _registered_checkpoints(s3: dict[str, str], stage: str) -> list:
    """The checkpoints Ray Train's checkpoint manager has recorded for ``stage``'s run."""
    for key, body in objects(s3, BUCKET, "runs/tiny/.ray/").items():
        if f"/{stage}-" in key and key.endswith("checkpoint_manager_snapshot.json"):
            return json.loads(body).get("checkpoint_results") or []
    return []


def test_a_sweep_into_s3_uploads_its_report(tmp_path, tiny_llama_dir, smollm2_tokenizer):
    """Two SFT mixes searched with ``--out s3://...``: the report lands in the bucket."""
    import ray
    from stage_io import arithmetic_pairs, write_sft_mix

    from solar_ray.tune import run_sweep
    from solar_ray.tune.config import SweepConfig

    pairs = [(q, a) for q, a, _ in arithmetic_pairs(24, seed=3)]
    data = {
        "a": write_sft_mix(tmp_path / "a", smollm2_tokenizer, pairs[:8]),
        "b": write_sft_mix(tmp_path / "b", smollm2_tokenizer, pairs[8:16]),
        "yardstick": write_sft_mix(tmp_path / "y", smollm2_tokenizer, pairs[16:]),
    }
    mixes = {n: data[n] for n in "ab"}
    cfg = SweepConfig.model_validate(
        sft_mix_sweep("mix-s3", tiny_llama_dir, mixes, data["yardstick"], steps=2, eval_every=2)
    )
    with s3_server(BUCKET) as s3, pytest.MonkeyPatch.context() as mp:
        for k, v in s3.items():
            mp.setenv(k, v)
        mp.setenv("SOLAR_RAY_CACHE", str(tmp_path / "cache"))
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            result = run_sweep(cfg, f"s3://{BUCKET}/sweeps/mix", echo=lambda s: None)
        finally:
            ray.shutdown()
        stored = objects(s3, BUCKET, "sweeps/mix/")
    assert sorted(r["trial"] for r in result.rows) == ["mix-a", "mix-b"]
    assert stored["sweeps/mix/results.md"] == result.files["results_md"].read_bytes()
    assert {"sweeps/mix/results.csv", "sweeps/mix/best.yaml", "sweeps/mix/learning_curves.png"} <= set(stored)
