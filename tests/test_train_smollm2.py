"""A short continued-pretraining run recovers the depth-upscaled SmolLM2-135M.

The embedded model is upscaled with the SOLAR plan at m=26 (8 of its 30 layers: source
layers 0-3 then 26-29, a heavily damaged but real DUS model, small enough for a CPU test),
then trained for a few steps on real prose that ships with CPython. The worker loop runs in
this process without Ray (``local: true``, world size 1), which is also what this test
covers. The held-out loss must go down and the lineage must chain back to the upscale.
"""

from __future__ import annotations

import json

import pytest
from stage_io import offline_prose, write_pretrain_mix

from solar_ray.train.config import PretrainConfig

pytestmark = pytest.mark.slow


def test_short_run_recovers_depth_upscaled_smollm2(tmp_path, smollm2_dir, smollm2_tokenizer):
    from solar_ray.train.pretrain import run_pretrain
    from solar_ray.upscale import UpscaleConfig, run_upscale

    upscaled = run_upscale(
        UpscaleConfig(source=str(smollm2_dir), out=str(tmp_path / "dus"), m=26, hash_inputs=False)
    )
    assert upscaled.plan == [0, 1, 2, 3, 26, 27, 28, 29]
    mix = write_pretrain_mix(
        tmp_path / "prose", smollm2_tokenizer, offline_prose(max_docs=40), seq_len=64
    )
    cfg = PretrainConfig(
        model=str(upscaled.out), data=str(mix), out=str(tmp_path / "cpt"), local=True,
        num_workers=1, zero_stage=2, steps=8, micro_batch_size=2, seq_len=64, lr=3e-4,
        warmup_steps=1, val_fraction=0.1, eval_batches=2, checkpoint_every=100, log_every=2,
    )  # fmt: skip
    result = run_pretrain(cfg)

    metrics = result.metrics
    assert metrics["steps"] == 8
    assert metrics["eval_loss"] < metrics["initial_eval_loss"] - 0.2, metrics["eval_history"]
    manifest = json.loads((result.out / "solar.json").read_text())
    parent = next(p for p in manifest["parents"] if p["role"] == "model")
    assert parent["path"] == str(upscaled.out)
    assert json.loads((upscaled.out / "solar.json").read_text())["stage"] == "upscale"
    assert json.loads((result.out / "config.json").read_text())["num_hidden_layers"] == 8
    # the local run kept its final checkpoint and TensorBoard logs in the run directory
    run_dir = tmp_path / "ray_train" / "cpt"
    assert [p.name for p in (run_dir / "local" / "checkpoints").iterdir()] == ["000000_final"]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
