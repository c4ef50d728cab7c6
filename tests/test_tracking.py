"""Experiment tracking: the same metrics reach TensorBoard, W&B (offline) and MLflow (a
local file store) from every training stage, under the recipe's names; missing backends
and bad names are one-line errors. The real libraries, offline, in-process runs."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from stage_io import (
    arithmetic_pairs,
    pattern_documents,
    write_pretrain_mix,
    write_sft_mix,
)

from solar_ray.config import ConfigError, load_config
from solar_ray.errors import MissingDependencyError
from solar_ray.train.config import PretrainConfig, SFTConfig


@pytest.fixture
def offline_trackers(tmp_path, monkeypatch) -> dict[str, Path]:
    dirs = {"wandb": tmp_path / "wandb", "mlflow": tmp_path / "mlruns"}
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(dirs["wandb"]))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dirs["mlflow"].as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps file stores opt-in
    return dirs


def _flat(points: list[list[float]]) -> list[float]:
    return [x for point in points for x in point]


def mlflow_history(tracking_uri: str, experiment: str, run_name: str, key: str) -> list[list[float]]:
    """``[[step, value], ...]`` of one metric of one MLflow run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    (run,) = client.search_runs([exp.experiment_id], f"tags.`mlflow.runName` = '{run_name}'")
    points = client.get_metric_history(run.info.run_id, key)
    return [[p.step, p.value] for p in sorted(points, key=lambda p: p.step)]


def _wandb_records(path: Path) -> list[bytes]:
    """The records of a W&B transaction log (``run-*.wandb``): LevelDB's log format, 32 KiB
    blocks of chunks ``crc32 (4) | length (2, LE) | type (1: full, 2: first, 3: middle,
    4: last)`` after a 7-byte file header (``:W&B``, magic, version)."""
    import struct

    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # the block's tail is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        chunk = raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 2):
            pending = chunk
        else:
            pending += chunk
        if kind in (1, 4):
            records.append(pending)
    return records


def wandb_history(wandb_dir: Path, key: str) -> tuple[dict, list[list[float]]]:
    """(the run's config, ``[[step, value], ...]`` of ``key``) from an offline W&B run."""
    import json

    from wandb.proto import wandb_internal_pb2

    (path,) = wandb_dir.rglob("run-*.wandb")  # one offline run under wandb_dir
    config: dict = {}
    points = []
    for data in _wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            if key in items:
                points.append([int(items["_step"]), float(items[key])])
        elif kind in ("config", "run"):  # the config comes with the run, and as updates
            updates = record.config.update if kind == "config" else record.run.config.update
            for item in updates:
                config[item.key] = json.loads(item.value_json)
    return config, points


@pytest.mark.slow
def test_pretrain_logs_its_history_to_every_backend(tmp_path, tiny_llama_dir, smollm2_tokenizer, offline_trackers):
    from solar_ray.train.pretrain import run_pretrain

    mix = write_pretrain_mix(tmp_path / "mix", smollm2_tokenizer, pattern_documents(120), seq_len=64)
    cfg = PretrainConfig(
        model=str(tiny_llama_dir), data=str(mix), out=str(tmp_path / "cpt"), local=True,
        num_workers=1, steps=8, micro_batch_size=2, seq_len=64, lr=3e-3, log_every=2,
        val_fraction=0.2, eval_every=4, tracking=["tensorboard", "wandb", "mlflow"],
        tracking_project="demo", tracking_name="demo-cpt",
    )  # fmt: skip
    result = run_pretrain(cfg)
    history = result.metrics["loss_history"]
    assert [s for s, _ in history] == [2, 4, 6, 8]

    logged = mlflow_history(offline_trackers["mlflow"].as_uri(), "demo", "demo-cpt", "loss")
    assert _flat(logged) == pytest.approx(_flat(history))
    evals = mlflow_history(offline_trackers["mlflow"].as_uri(), "demo", "demo-cpt", "eval_loss")
    assert _flat(evals) == pytest.approx(_flat(result.metrics["eval_history"]))
    assert [s for s, _ in mlflow_history(offline_trackers["mlflow"].as_uri(), "demo", "demo-cpt", "tokens_per_s")] == [2, 4, 6, 8]

    config, points = wandb_history(offline_trackers["wandb"], "loss")
    assert _flat(points) == pytest.approx(_flat(history))
    assert config["stage"] == "pretrain" and config["lr"] == 3e-3  # the resolved config

    run_dir = Path(result.manifest["run"]["storage_path"]) / result.manifest["run"]["name"]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_trl_stage_logs_the_same_metric_names(tmp_path, tiny_llama_dir, smollm2_tokenizer, offline_trackers):
    from solar_ray.train.sft import run_sft

    mix = write_sft_mix(tmp_path / "mix", smollm2_tokenizer, [(q, a) for q, a, _ in arithmetic_pairs(24)])
    cfg = SFTConfig(
        model=str(tiny_llama_dir), data=str(mix), out=str(tmp_path / "sft"), local=True,
        num_workers=1, steps=6, micro_batch_size=4, seq_len=128, lr=3e-3, log_every=2,
        tracking="mlflow", tracking_project="demo", tracking_name="demo-sft",
    )  # fmt: skip
    result = run_sft(cfg)
    uri = offline_trackers["mlflow"].as_uri()
    logged = mlflow_history(uri, "demo", "demo-sft", "loss")
    assert _flat(logged) == pytest.approx(_flat(result.metrics["loss_history"]))
    assert len(mlflow_history(uri, "demo", "demo-sft", "lr")) == 3
    assert not (Path(result.manifest["run"]["storage_path"]) / cfg.run_name / "tensorboard").exists()


def test_tracking_backends_are_checked(tmp_path, monkeypatch, capsys):
    from solar_ray.cli import main
    from solar_ray.tracking import check_backends

    base = {"model": "m", "data": "d", "out": str(tmp_path / "o"), "steps": 1}
    assert load_config(PretrainConfig, data=base).tracking == ["tensorboard"]
    assert load_config(PretrainConfig, data=base | {"tracking": "none"}).tracking == []
    assert load_config(SFTConfig, data=base | {"tracking": ["wandb", "mlflow"]}).tracking == ["wandb", "mlflow"]
    with pytest.raises(ConfigError, match="tracking: unknown backend 'neptune'"):
        load_config(PretrainConfig, data=base | {"tracking": ["neptune"]})
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(MissingDependencyError, match=r"tracking: wandb needs the package wandb.*solar-ray\[wandb\]"):
        check_backends(["tensorboard", "wandb"])
    code = main(["pretrain", "--model", "m", "--data", "d", "--out", str(tmp_path / "o"),
                 "--steps", "1", "--tracking", "wandb"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "pip install 'solar-ray[wandb]'" in err


def test_recipe_tracking_is_each_training_stage_default(tmp_path):
    from solar_ray.pipeline import Recipe, _stage_key, plan_recipe

    stages = {
        "sft": {"kind": "sft", "model": "m", "data": "d", "steps": 1},
        "dpo": {"kind": "dpo", "model": "@sft", "data": "d", "steps": 1, "tracking": "none"},
    }
    plans = {p.name: p for p in plan_recipe(Recipe(name="demo", tracking="mlflow", stages=stages), tmp_path, validate_configs=False)}
    sft, dpo = plans["sft"].config(), plans["dpo"].config()
    assert sft.tracking == ["mlflow"] and dpo.tracking == []
    assert (sft.tracking_project, sft.tracking_name) == ("demo", "demo-sft")
    # tracking changes no output: the stage's key is the same without it
    plain = plan_recipe(Recipe(name="demo", stages=stages), tmp_path, validate_configs=False)
    assert _stage_key(plain[0]) == _stage_key(plans["sft"])


def test_sweeps_attach_tunes_logger_callbacks():
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.air.integrations.wandb import WandbLoggerCallback

    from solar_ray.tracking import tune_callbacks
    from solar_ray.tune.config import SweepConfig

    wandb_cb, mlflow_cb = tune_callbacks(["wandb", "mlflow"], "sweep-m")
    assert isinstance(wandb_cb, WandbLoggerCallback) and wandb_cb.project == "sweep-m"
    assert isinstance(mlflow_cb, MLflowLoggerCallback) and mlflow_cb.experiment_name == "sweep-m"
    assert mlflow_cb.should_save_artifact is False  # trial checkpoints stay in storage, not in MLflow
    assert tune_callbacks([], "sweep-m") == []
    with pytest.raises(ValueError, match="tensorboard: Tune writes"):
        SweepConfig.model_validate({"name": "s", "base": "b", "search": {"m": [1]},
                                    "train": {"kind": "pretrain"}, "tracking": "tensorboard"})  # fmt: skip


# --------------------------------------------------------------------------- failures and restarts


def _writer(tmp_path: Path, backend: str, run_id: str = "abc123"):
    from solar_ray.tracking import TrackedRun
    from solar_ray.train.metrics import MetricsWriter

    run = TrackedRun(project="demo", name="demo-cpt", run_id=run_id, config={"lr": 0.1})
    return MetricsWriter(str(tmp_path / "storage"), "demo-cpt", True, [backend], run)


def test_a_failing_backend_is_a_warning_and_training_goes_on(tmp_path, offline_trackers, monkeypatch, caplog):
    """An MLflow server that goes away mid-run: the steps it missed are warned about, the
    training loop is never interrupted, and logging resumes when the server is back."""
    from mlflow.tracking import MlflowClient

    writer = _writer(tmp_path, "mlflow")
    writer.scalars(1, {"loss": 3.0})
    real = MlflowClient.log_batch

    def down(self, run_id, metrics=(), **kw):
        if metrics:
            raise ConnectionError("tracking server unreachable")
        return real(self, run_id, metrics=metrics, **kw)

    monkeypatch.setattr(MlflowClient, "log_batch", down)
    with caplog.at_level("WARNING", logger="solar_ray.tracking"):
        writer.scalars(2, {"loss": 2.0})  # must not raise
    assert "could not log metrics to _Mlflow: tracking server unreachable" in caplog.text
    monkeypatch.setattr(MlflowClient, "log_batch", real)
    writer.scalars(3, {"loss": 1.0})
    writer.close()
    uri = offline_trackers["mlflow"].as_uri()
    assert mlflow_history(uri, "demo", "demo-cpt", "loss") == [[1, 3.0], [3, 1.0]]


def _two_sessions(tmp_path, backend: str) -> None:
    """The same run (id ``abc123``) opened twice: loss 3.0 at step 1, then 2.0 at step 2."""
    for step, loss in ((1, 3.0), (2, 2.0)):
        writer = _writer(tmp_path, backend)
        writer.scalars(step, {"loss": loss})
        writer.close()


def test_a_restarted_run_continues_the_same_mlflow_run(tmp_path, offline_trackers):
    """A replaced worker (the same run id) logs into the run it left, not a new one."""
    from mlflow.tracking import MlflowClient

    _two_sessions(tmp_path, "mlflow")
    other = _writer(tmp_path, "mlflow", run_id="another")  # another run: its own MLflow run
    other.scalars(1, {"loss": 9.0})
    other.close()
    uri = offline_trackers["mlflow"].as_uri()
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    assert sorted(r.data.tags["solar_ray.run_id"] for r in runs) == ["abc123", "another"]
    (resumed,) = [r for r in runs if r.data.tags["solar_ray.run_id"] == "abc123"]
    points = client.get_metric_history(resumed.info.run_id, "loss")
    assert sorted((p.step, p.value) for p in points) == [(1, 3.0), (2, 2.0)]
    assert resumed.info.status == "FINISHED"


def test_a_restarted_run_continues_the_same_wandb_run(tmp_path, offline_trackers):
    """Both offline W&B sessions carry the run's stable id (``wandb sync`` then appends the
    second to the first): the id, not a fresh one, and each session's steps."""
    _two_sessions(tmp_path, "wandb")
    sessions = sorted(offline_trackers["wandb"].rglob("offline-run-*"))
    # two sessions started within one second: W&B numbers the second folder (``-abc123-1``)
    assert len(sessions) == 2 and all(re.search(r"-abc123(-\d+)?$", p.name) for p in sessions)
    steps = []
    for session in sessions:
        _, points = wandb_history(session, "loss")
        steps += points
    assert sorted(steps) == [[1, 3.0], [2, 2.0]]


# --------------------------------------------------------------------------- fast: no training


def test_backend_names_normalise():
    from solar_ray.tracking import normalize_backends

    assert normalize_backends(None) == [] and normalize_backends([]) == []
    assert normalize_backends("none") == [] and normalize_backends(["off"]) == []
    assert normalize_backends("mlflow") == ["mlflow"]
    # a list keeps its order, each name once
    assert normalize_backends(("wandb", "tensorboard", "wandb")) == ["wandb", "tensorboard"]
    with pytest.raises(ValueError) as err:
        normalize_backends(["mlflow", "none"])  # 'none' is not a backend beside others
    assert str(err.value) == "unknown backend 'none' (one of ['tensorboard', 'wandb', 'mlflow'], or none)"


def test_run_ids_are_stable_and_tell_runs_apart():
    from solar_ray.tracking import TrackedRun

    one = TrackedRun.stable_id("s3://b/runs", "demo-cpt", "cfg")
    assert one == TrackedRun.stable_id("s3://b/runs", "demo-cpt", "cfg")
    assert len(one) == 16 and int(one, 16) >= 0  # 8 bytes of hex: a W&B/MLflow-safe id
    assert one != TrackedRun.stable_id("s3://b/runs", "demo-cpt", "cfg2")
    # the parts are kept apart: moving a character between two parts is another run
    assert TrackedRun.stable_id("ab", "c") != TrackedRun.stable_id("a", "bc")
    assert TrackedRun.stable_id("a", "b") != TrackedRun.stable_id("b", "a")


def test_only_finite_numbers_are_logged_and_a_failing_backend_is_skipped(caplog):
    from solar_ray.tracking import log_scalars

    class Down:
        def log(self, step, metrics):
            raise ConnectionError("server gone")

    class Keep:
        def __init__(self):
            self.logged = []

        def log(self, step, metrics):
            self.logged.append((step, metrics))

    first, last = Keep(), Keep()
    metrics = {"loss": 2, "lr": 1e-4, "nan": float("nan"), "inf": float("-inf"), "done": True,
               "name": "x", "none": None, "items": [1.0]}  # fmt: skip
    with caplog.at_level("WARNING", logger="solar_ray.tracking"):
        log_scalars([first, Down(), last], 7, metrics)
    assert first.logged == last.logged == [(7, {"loss": 2.0, "lr": 1e-4})]
    assert isinstance(first.logged[0][1]["loss"], float)
    assert "could not log metrics to Down: server gone" in caplog.text
    log_scalars([first], 8, {"nan": float("nan"), "ok": False})  # nothing to log: no call
    assert len(first.logged) == 1


def test_mlflow_run_records_the_config_once(tmp_path, offline_trackers):
    """The config goes in as a JSON artifact and as flat params (nested values only in the
    artifact, long values cut at 500 characters), tagged with the stable id."""
    import json

    from mlflow.tracking import MlflowClient

    from solar_ray.tracking import TrackedRun, open_tracker

    config = {"lr": 0.1, "steps": 3, "note": "x" * 600, "data": {"mix": "a"}, "layers": [1, 2]}
    run = TrackedRun(project="proj", name="proj-sft", run_id="id1", config=config)
    tracker = open_tracker("mlflow", run, tmp_path)
    tracker.log(5, {"loss": 1.5})
    tracker.close()
    client = MlflowClient(offline_trackers["mlflow"].as_uri())
    (found,) = client.search_runs([client.get_experiment_by_name("proj").experiment_id])
    assert found.info.run_name == "proj-sft" and found.data.tags["solar_ray.run_id"] == "id1"
    assert found.data.params == {"lr": "0.1", "steps": "3", "note": "x" * 500}
    assert [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, "loss")] == [(5, 1.5)]
    path = client.download_artifacts(found.info.run_id, "solar_config.json", str(tmp_path))
    assert json.loads(Path(path).read_text()) == config
    assert found.info.status == "FINISHED"
    # reopened (a restarted worker): the same run, running again, its params untouched
    again = open_tracker("mlflow", run, tmp_path)
    (same,) = client.search_runs([client.get_experiment_by_name("proj").experiment_id])
    assert same.info.run_id == found.info.run_id and same.info.status == "RUNNING"
    again.close()


def test_tune_callbacks_carry_the_project(monkeypatch):
    from solar_ray.tracking import tune_callbacks

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///tmp/nowhere-mlruns")
    (mlflow_cb,) = tune_callbacks(["mlflow"], "sweep-x")
    assert mlflow_cb.tracking_uri == "file:///tmp/nowhere-mlruns"
    assert mlflow_cb.tags == {"solar_ray.sweep": "sweep-x"} and mlflow_cb.should_save_artifact is False
    (wandb_cb,) = tune_callbacks(["wandb"], "sweep-x")
    assert wandb_cb.project == "sweep-x" and wandb_cb.log_config is True
    assert tune_callbacks(["tensorboard"], "sweep-x") == []
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    with pytest.raises(MissingDependencyError, match=r"tracking: mlflow needs the package mlflow"):
        tune_callbacks(["mlflow"], "sweep-x")


def test_a_wandb_run_is_named_and_kept_where_asked(tmp_path, offline_trackers, monkeypatch):
    """The offline W&B run records the recipe's project, run name, stable id and config,
    resumes by that id, and lives under the run's own directory (made with its parents)
    when ``WANDB_DIR`` is not set."""
    from wandb.proto import wandb_internal_pb2

    from solar_ray.tracking import TrackedRun, open_tracker

    monkeypatch.delenv("WANDB_DIR")
    local = tmp_path / "run" / "not" / "there" / "yet"
    run = TrackedRun(project="demo", name="demo-cpt", run_id="abc123", config={"lr": 0.1})
    tracker = open_tracker("wandb", run, local)
    tracker.log(1, {"loss": 3.0})
    tracker.close()
    (path,) = local.rglob("run-*.wandb")
    records = [wandb_internal_pb2.Record.FromString(data) for data in _wandb_records(path)]
    (first,) = [r.run for r in records if r.WhichOneof("record_type") == "run"][:1]
    assert (first.project, first.display_name, first.run_id) == ("demo", "demo-cpt", "abc123")
    assert first.resume  # resume="allow": a restarted worker continues this id
    config, points = wandb_history(local, "loss")
    assert points == [[1, 3.0]] and config["lr"] == 0.1


def test_mlflow_metrics_carry_the_time_they_were_logged(tmp_path, offline_trackers):
    import time

    from mlflow.tracking import MlflowClient

    writer = _writer(tmp_path, "mlflow")
    before = int(time.time() * 1000)
    writer.scalars(1, {"loss": 3.0})
    after = int(time.time() * 1000)
    writer.close()
    client = MlflowClient(offline_trackers["mlflow"].as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    (point,) = client.get_metric_history(run.info.run_id, "loss")
    assert before - 1 <= point.timestamp <= after + 1


@pytest.mark.parametrize("backend", ["wandb", "mlflow"])
def test_a_worker_without_the_backend_package_names_it(tmp_path, monkeypatch, backend):
    """A worker node that lacks the package the driver had: the tracker's own one line."""
    from solar_ray.tracking import TrackedRun, open_tracker

    monkeypatch.setitem(sys.modules, backend, None)  # as if not installed on this node
    run = TrackedRun(project="demo", name="demo-cpt", run_id="abc123", config={})
    message = rf"^tracking: {backend} needs the package {backend}, which is not installed: pip install 'solar-ray\[{backend}\]'$"
    with pytest.raises(MissingDependencyError, match=message):
        open_tracker(backend, run, tmp_path)
