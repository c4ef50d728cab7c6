"""Training stages on a private local Ray (2 CPU workers, gloo, DeepSpeed), tiny models.

Each Ray Train run is a module-scoped fixture shared by the tests that check it, so the
module runs eight short jobs: continued pretraining under ZeRO-3, under ZeRO-2 with a
worker killed mid-run and on 3 workers that do not divide its batch, a re-run of the finished job from storage, SFT under ZeRO-2 and
ZeRO-3 (packed), DPO under ZeRO-2 with reference log-probs precomputed by Ray Data and
under ZeRO-3 with a live (sharded) reference model.
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
from stage_io import (
    arithmetic_pairs,
    export_matches_probe,
    pattern_documents,
    write_preference_mix,
    write_pretrain_mix,
    write_sft_mix,
)

from solar_ray.config import ConfigError
from solar_ray.train.config import DPOConfig, PretrainConfig, SFTConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hold_dir(tmp_path_factory) -> Path:
    """The directory of the workers' hold-at-checkpoint hook (see ``_run_killing_a_worker``)."""
    return tmp_path_factory.mktemp("hold")


@pytest.fixture(scope="module")
def ray_module(hold_dir):
    """One private local Ray for the module (never joins another cluster); its workers
    inherit the hold-at-checkpoint hook's directory from this process's environment."""
    import ray

    from solar_ray.faults import HOLD_ENV

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(HOLD_ENV, str(hold_dir))
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        yield ray
        ray.shutdown()


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_llama_dir, smollm2_tokenizer) -> dict[str, Path]:
    """Tiny policy + a different tiny reference model, and one mix of each kind."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("train")
    tok = smollm2_tokenizer
    ref = root / "ref_model"
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_llama_dir)).save_pretrained(ref)
    tok.save_pretrained(ref)
    return {
        "root": root,
        "model": tiny_llama_dir,
        "ref_model": ref,
        "pretrain": write_pretrain_mix(root / "mix_pre", tok, pattern_documents(400), seq_len=64),
        "sft": write_sft_mix(root / "mix_sft", tok, [(q, a) for q, a, _ in arithmetic_pairs(64)]),
        "pref": write_preference_mix(
            root / "mix_pref", tok, arithmetic_pairs(64, seed=1, rejected="refusal")
        ),
    }


def _pretrain_cfg(work: dict, out: str, **kw) -> PretrainConfig:
    fields = dict(
        model=str(work["model"]), data=str(work["pretrain"]), out=str(work["root"] / out),
        val_fraction=0.1, num_workers=2, steps=24, micro_batch_size=2, global_batch_size=8,
        seq_len=64, lr=3e-3, warmup_steps=2, checkpoint_every=8, log_every=4, eval_every=12,
        max_failures=1,
    )  # fmt: skip
    return PretrainConfig(**(fields | kw))


def _losses(result) -> list[float]:
    return [loss for _, loss in result.metrics["loss_history"]]


def _assert_export_reproduces_probe(out: Path) -> None:
    """The exported model loads with AutoModelForCausalLM and computes what training did."""
    assert export_matches_probe(out) == []


def _ray_worker_pids() -> list:
    """This test process's own Ray Train worker processes (children of our raylet)."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.name().startswith("ray::RayTrainWorker"):
                found.append(proc)
        except psutil.NoSuchProcess:
            continue
    return found


# --------------------------------------------------------------------------- pretrain


@pytest.fixture(scope="module")
def pretrain_zero3(ray_module, work):
    from solar_ray.train.pretrain import run_pretrain

    return run_pretrain(_pretrain_cfg(work, "pre_z3", zero_stage=3))


def _run_killing_a_worker(run, cfg, hold_dir: Path):
    """Run a stage in a thread; SIGKILL one Ray Train worker at its first checkpoint.

    The workers are held right after reporting it (``solar_ray.faults.HOLD_ENV``):
    the kill lands once both wait there and Ray Train has registered the checkpoint, so
    the run resumes from exactly that checkpoint, however fast or slow the machine is.
    """
    snapshot = Path(cfg.resolved_storage_path) / cfg.run_name / "checkpoint_manager_snapshot.json"
    hold = hold_dir / "hold"
    for old in hold_dir.glob("held-*"):
        old.unlink()
    hold.touch()
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["result"] = run(cfg)
        except BaseException as e:  # surfaced in the main thread
            outcome["error"] = e

    def registered() -> int:
        try:
            return len(json.loads(snapshot.read_text())["checkpoint_results"])
        except (OSError, ValueError, KeyError):
            return 0

    thread = threading.Thread(target=target)
    thread.start()
    try:
        deadline = time.monotonic() + 600
        while len(list(hold_dir.glob("held-*"))) < 2 or registered() == 0:
            assert thread.is_alive(), f"run ended before its first checkpoint: {outcome}"
            assert time.monotonic() < deadline, "no held checkpoint within 600 s"
            time.sleep(0.05)
        assert registered() == 1  # held at the first checkpoint: no second one can exist
        workers = _ray_worker_pids()
        assert len(workers) == 2
        workers[-1].send_signal(signal.SIGKILL)
        workers[-1].wait(timeout=60)
    finally:
        hold.unlink()  # the replacement workers (and a failed test's) run on
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


@pytest.fixture(scope="module")
def pretrain_zero2_killed(ray_module, work, hold_dir):
    """The same run under ZeRO-2; one worker process is SIGKILLed at the first checkpoint."""
    from solar_ray.train.pretrain import run_pretrain

    cfg = _pretrain_cfg(work, "pre_z2", zero_stage=2)
    return cfg, _run_killing_a_worker(run_pretrain, cfg, hold_dir)


def test_pretrain_zero3_loss_decreases_and_export_matches(pretrain_zero3, work):
    result = pretrain_zero3
    losses = _losses(result)
    assert len(losses) == 6 and losses[-1] < 0.7 * losses[0], losses
    metrics = result.metrics
    assert metrics["steps"] == 24 and metrics["resumed_from"] == []
    assert metrics["eval_loss"] < 0.8 * metrics["initial_eval_loss"]
    assert [s for s, _ in metrics["eval_history"]] == [0, 12, 24]
    assert metrics["eval_ppl"] == pytest.approx(2.718281828 ** metrics["eval_loss"], rel=1e-6)

    manifest = json.loads((result.out / "solar.json").read_text())
    assert manifest["stage"] == "pretrain" and manifest["config"]["zero_stage"] == 3
    roles = {p["role"]: p for p in manifest["parents"]}
    assert len(roles["model"]["sha256"]) == 64 and roles["data"]["mix_kind"] == "pretrain"
    assert manifest["run"]["checkpoint"].endswith("final")
    assert (result.out / "README.md").is_file() and (result.out / "tokenizer.json").is_file()
    _assert_export_reproduces_probe(result.out)
    # the trained weights differ from the starting ones
    assert manifest["export_probe"]["logsumexp"] != _probe_of(work["model"])["logsumexp"]

    tensorboard = Path(result.manifest["run"]["storage_path"]) / "pre_z3" / "tensorboard"
    assert list(tensorboard.glob("events.out.tfevents.*"))


def _probe_of(model_dir: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from solar_ray.train.export import probe_model

    return probe_model(
        AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    )


def test_killed_worker_resumes_from_checkpoint_on_the_same_curve(
    pretrain_zero2_killed, pretrain_zero3
):
    cfg, result = pretrain_zero2_killed
    metrics = result.metrics
    assert metrics["steps"] == 24
    # the replaced worker group started from the checkpoint the kill was held at (step 8)
    assert metrics["resumed_from"] == [8]
    # ... and continued the same data order and optimizer state: the loss curve is the one
    # of the uninterrupted ZeRO-3 run, step for step
    assert [s for s, _ in metrics["loss_history"]] == [4, 8, 12, 16, 20, 24]
    assert _losses(result) == pytest.approx(_losses(pretrain_zero3), rel=1e-4)
    assert metrics["eval_loss"] == pytest.approx(pretrain_zero3.metrics["eval_loss"], rel=1e-4)
    _assert_export_reproduces_probe(result.out)


def test_three_workers_train_on_a_batch_they_do_not_divide(ray_module, work, pretrain_zero3):
    """An elastic range whose count does not divide the global batch (3 workers, 8 rows of
    2 per micro-batch: 12 slots, 4 of them filler weighted 0) trains on the same batches,
    to the same curve, as the 2-worker run."""
    from solar_ray.train.pretrain import run_pretrain

    cfg = _pretrain_cfg(work, "pre_3w", num_workers=[1, 3], cpus_per_worker=0.5)
    result = run_pretrain(cfg)
    assert result.metrics["world_size"] == 3 and result.metrics["resizes"] == []
    assert result.metrics["tokens_seen"] == pretrain_zero3.metrics["tokens_seen"]
    assert _losses(result) == pytest.approx(_losses(pretrain_zero3), rel=1e-4)
    assert result.metrics["eval_loss"] == pytest.approx(
        pretrain_zero3.metrics["eval_loss"], rel=1e-4
    )


def test_rerunning_a_finished_job_does_not_start_over(pretrain_zero2_killed, work):
    from solar_ray.train.pretrain import run_pretrain

    cfg, first = pretrain_zero2_killed
    manifest_before = (first.out / "solar.json").read_text()

    # 1. the output is there: returned as is, without starting any worker
    started = time.monotonic()
    again = run_pretrain(cfg)
    assert again.skipped and time.monotonic() - started < 30
    assert (first.out / "solar.json").read_text() == manifest_before

    # 2. the output is gone but the run is finished in storage: Ray Train restores it,
    #    the workers find the final checkpoint and train nothing; the export is re-made
    run_dir = Path(cfg.resolved_storage_path) / cfg.run_name
    checkpoints_before = sorted(p.name for p in run_dir.iterdir())
    shutil.rmtree(first.out)
    restored = run_pretrain(cfg)
    assert not restored.skipped
    assert restored.metrics["train_runtime_s"] == first.metrics["train_runtime_s"]
    assert restored.metrics["loss_history"] == first.metrics["loss_history"]
    assert sorted(p.name for p in run_dir.iterdir()) == checkpoints_before
    _assert_export_reproduces_probe(restored.out)

    # 3. another config under the same run name is refused before anything starts
    with pytest.raises(ConfigError, match=r"^name: the run 'pre_z2' .* another config"):
        run_pretrain(cfg.model_copy(update={"lr": 1e-4, "out": str(work["root"] / "x"), "name": "pre_z2"}))


@pytest.fixture(scope="module")
def pretrain_streaming(ray_module, work):
    from solar_ray.train.pretrain import run_pretrain

    # half a CPU per worker leaves one of the two CPUs to Ray Data's read and filter tasks
    cfg = _pretrain_cfg(work, "pre_stream", zero_stage=2, streaming=True, steps=6,
                        global_batch_size=None, log_every=2, eval_every=None,
                        checkpoint_every=100, cpus_per_worker=0.5)  # fmt: skip
    return run_pretrain(cfg)


def test_pretrain_streams_from_ray_data(pretrain_streaming):
    metrics = pretrain_streaming.metrics
    assert metrics["steps"] == 6 and metrics["tokens_seen"] == 6 * 2 * 2 * 64
    assert _losses(pretrain_streaming)[-1] < _losses(pretrain_streaming)[0]
    assert metrics["eval_loss"] < metrics["initial_eval_loss"]
    assert pretrain_streaming.manifest["config"]["streaming"] is True


# --------------------------------------------------------------------------- sft


def _sft_cfg(work: dict, out: str, **kw) -> SFTConfig:
    fields = dict(
        model=str(work["model"]), data=str(work["sft"]), out=str(work["root"] / out),
        val_fraction=0.15, num_workers=2, steps=20, micro_batch_size=4, seq_len=128, lr=3e-3,
        warmup_steps=2, checkpoint_every=10, log_every=5, max_failures=0,
    )  # fmt: skip
    return SFTConfig(**(fields | kw))


@pytest.fixture(scope="module")
def sft_zero3(ray_module, work):
    from solar_ray.train.sft import run_sft

    return run_sft(_sft_cfg(work, "sft_z3", zero_stage=3))


@pytest.fixture(scope="module")
def sft_zero2_killed(ray_module, work, hold_dir):
    """The same SFT run under ZeRO-2, one worker killed at the Trainer's first checkpoint."""
    from solar_ray.train.sft import run_sft

    cfg = _sft_cfg(work, "sft_z2", zero_stage=2, max_failures=1)
    return _run_killing_a_worker(run_sft, cfg, hold_dir)


@pytest.mark.parametrize("run", ["sft_zero3", "sft_zero2_killed"])
def test_sft_loss_decreases_and_export_loads(run, request):
    result = request.getfixturevalue(run)
    losses = _losses(result)
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0], losses
    assert losses == sorted(losses, reverse=True), losses
    assert result.metrics["steps"] == 20 and result.metrics["eval_loss"] < losses[0]
    manifest = json.loads((result.out / "solar.json").read_text())
    assert manifest["stage"] == "sft" and manifest["config"]["assistant_only_loss"] is True
    _assert_export_reproduces_probe(result.out)


def test_sft_killed_worker_resumes_the_trainer_checkpoint(sft_zero2_killed, sft_zero3):
    # TRL/Transformers resumed DeepSpeed's state, the scheduler and the data position from
    # the checkpoint RayTrainReportCallback reported: the curve is the uninterrupted one
    assert sft_zero2_killed.metrics["resumed_from"] == [10]
    assert _losses(sft_zero2_killed) == pytest.approx(_losses(sft_zero3), rel=1e-3)


# --------------------------------------------------------------------------- dpo


def _dpo_cfg(work: dict, out: str, **kw) -> DPOConfig:
    fields = dict(
        model=str(work["model"]), ref_model=str(work["ref_model"]), data=str(work["pref"]),
        out=str(work["root"] / out), num_workers=2, steps=16, micro_batch_size=2, seq_len=128,
        lr=1e-3, warmup_steps=1, beta=0.5, checkpoint_every=8, log_every=1, max_failures=0,
    )  # fmt: skip
    return DPOConfig(**(fields | kw))


@pytest.fixture(scope="module")
def dpo_zero2_precomputed(ray_module, work):
    from solar_ray.train.dpo import run_dpo

    return run_dpo(_dpo_cfg(work, "dpo_pre", zero_stage=2, precompute_ref_logps=True))


@pytest.fixture(scope="module")
def dpo_zero3_live(ray_module, work):
    from solar_ray.train.dpo import run_dpo

    return run_dpo(_dpo_cfg(work, "dpo_live", zero_stage=3))


def test_dpo_precomputed_reference_matches_live_reference(dpo_zero2_precomputed, dpo_zero3_live):
    pre, live = dpo_zero2_precomputed, dpo_zero3_live
    assert pre.metrics["precomputed_ref_logps"] is True
    assert live.metrics["precomputed_ref_logps"] is False
    # a reference model unlike the policy: the first loss is not log(2)
    assert abs(live.metrics["loss_history"][0][1] - 0.6931) > 1e-3
    assert _losses(pre)[0] == pytest.approx(_losses(live)[0], abs=1e-4)
    assert _losses(pre) == pytest.approx(_losses(live), abs=1e-3)  # and the whole run after
    ref_dir = Path(pre.manifest["run"]["storage_path"]) / "dpo_pre" / "ref_logps"
    assert list(ref_dir.glob("*.parquet"))
    assert "ref_logps" in {p["role"] for p in pre.manifest["parents"]}


@pytest.mark.parametrize("run", ["dpo_zero2_precomputed", "dpo_zero3_live"])
def test_dpo_loss_decreases_and_export_loads(run, request):
    result = request.getfixturevalue(run)
    losses = _losses(result)
    assert len(losses) == 16 and result.metrics["steps"] == 16
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
    assert json.loads((result.out / "solar.json").read_text())["stage"] == "dpo"
    _assert_export_reproduces_probe(result.out)


# --------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize("command", ["pretrain", "sft", "dpo"])
def test_cli_trains_exports_and_then_skips(command, ray_module, work, capsys):
    """``solar-ray pretrain|sft|dpo`` with flags only: trains, exports a model that loads,
    prints one summary line; the same command again finds the output done."""
    from transformers import AutoModelForCausalLM

    from solar_ray.cli import main

    out = work["root"] / f"cli_{command}"
    data = {"pretrain": work["pretrain"], "sft": work["sft"], "dpo": work["pref"]}[command]
    argv = [command, "--model", str(work["model"]), "--data", str(data), "--out", str(out),
            "--num-workers", "1", "--steps", "2", "--micro-batch-size", "2",
            "--seq-len", "64" if command == "pretrain" else "128", "--log-every", "1",
            "--checkpoint-every", "2", "--tracking", "none"]  # fmt: skip
    if command == "dpo":
        argv += ["--ref-model", str(work["ref_model"])]
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith(f"{command}: trained -> {out} (steps=2, final_loss="), printed
    manifest = json.loads((out / "solar.json").read_text())
    assert manifest["stage"] == command
    assert manifest["config"]["steps"] == 2 and manifest["config"]["num_workers"] == 1
    assert [s for s, _ in manifest["metrics"]["loss_history"]] == [1, 2]
    AutoModelForCausalLM.from_pretrained(out)
    assert main(argv) == 0
    assert capsys.readouterr().out.strip().startswith(f"{command}: already done, not retrained -> {out}")
