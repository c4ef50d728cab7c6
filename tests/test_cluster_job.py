"""``ray job submit`` against a real two-node Ray cluster with token auth.

The cluster (:mod:`cluster_harness`) is two ``ray start`` processes on this machine: a head
advertising the custom resource ``solar_test_head`` and a worker advertising
``solar_test_worker``. A job is submitted with the ``ray`` CLI and ``--working-dir`` (this
checkout, as a user does from a fresh clone), waited for, and checked: it succeeded, its
outputs and their ``solar.json`` manifests exist, and, from Ray's State API rather than the
job's own account, its tasks ran on both nodes. The cluster is stopped by the processes the
harness started, even when a test fails.

The job is the tiny recipe (:mod:`tiny_recipe`), ``solar-ray run jobs/tiny.yaml``, as a
user submits it. Every test node advertises one unit of ``solar_test_node`` (and 2 logical
CPUs) and each training stage asks for two workers with one unit each, so its Ray Train
workers cannot share a node: the State API must show ``RayTrainWorker`` actors on both.
The job is stopped with ``ray job stop`` once continued pretraining has finished and
resubmitted with the same run directory; the second job must skip the finished stages,
resume the rest and succeed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_harness import LocalRayCluster, NodeSpec, node_env
from tiny_recipe import MODEL_STAGES, SMALLER, TRAINING

from solar_ray.cluster import (
    STORAGE_ENV,
    WORKING_DIR_EXCLUDES,
    job_runtime_env,
    resolve_path,
    storage_path,
)

REPO = Path(__file__).resolve().parents[1]
HEAD_RESOURCE = "solar_test_head"
WORKER_RESOURCE = "solar_test_worker"
NODE_RESOURCE = "solar_test_node"  # one unit on every node: one training worker per node


#: per training stage: two workers, one per node (each node has one ``solar_test_node``)
ONE_WORKER_PER_NODE = tuple(
    f"stages.{stage}.{field}"
    for stage in TRAINING
    for field in (
        "num_workers=2",
        "resources_per_worker.CPU=1",
        f"resources_per_worker.{NODE_RESOURCE}=1",
    )
)


def recipe_job(out: Path) -> list[str]:
    """The entrypoint a user types after ``ray job submit ... --``."""
    argv = ["solar-ray", "run", "jobs/tiny.yaml", "--out", str(out)]
    for override in (*SMALLER, *ONE_WORKER_PER_NODE):
        argv += ["--set", override]
    return argv


def _wait_for(path: Path, cluster: LocalRayCluster, submission_id: str, timeout_s: float) -> None:
    """Until ``path`` exists; fails early with the job's logs if the job ends first."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        status = cluster.job_status(submission_id)
        if status in ("SUCCEEDED", "FAILED", "STOPPED") or time.monotonic() > deadline:
            job = cluster.stop_job(submission_id)
            pytest.fail(f"{path.name} never appeared ({job.status}):\n{job.logs[-4000:]}")
        time.sleep(1.0)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRayCluster]:
    """A two-node token-auth cluster; stopped (by its own pids) however the tests end."""
    env = node_env()
    nodes = [
        NodeSpec(resources={HEAD_RESOURCE: 1, NODE_RESOURCE: 1}, num_cpus=2),
        NodeSpec(resources={WORKER_RESOURCE: 1, NODE_RESOURCE: 1}, num_cpus=2),
    ]
    c = LocalRayCluster(nodes, env=env)
    c.start()  # retried on a port taken meanwhile or a slow raylet
    try:
        yield c
    finally:
        c.stop()
        assert c.running_pids() == [], "cluster processes survived stop()"


# --------------------------------------------------------------------------- cluster tests


@pytest.mark.slow
def test_cluster_requires_the_token(cluster: LocalRayCluster) -> None:
    nodes = cluster.alive_nodes()
    assert len(nodes) == 2
    own = {r for n in nodes for r in n["resources_total"] if r in (HEAD_RESOURCE, WORKER_RESOURCE)}
    assert own == {HEAD_RESOURCE, WORKER_RESOURCE}
    assert all(n["resources_total"].get(NODE_RESOURCE) == 1 for n in nodes)
    assert cluster.http_status("/api/jobs/", token=None) == 401
    assert cluster.http_status("/api/jobs/", token="not-the-token") in (401, 403)
    assert cluster.http_status("/api/jobs/", token=cluster.token) == 200
    user_token = Path.home() / ".ray" / "auth_token"
    if user_token.is_file():  # the cluster's token stays in its private file
        assert user_token.read_text().strip() != cluster.token


@pytest.mark.slow
@pytest.mark.timeout(1800)  # its own waits allow 600 s + 900 s for the two jobs
def test_recipe_job_stopped_and_resubmitted_continues_on_both_nodes(
    cluster: LocalRayCluster, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    runtime_env = job_runtime_env(
        REPO, env_vars={"SOLAR_RAY_CACHE": str(REPO / ".cache" / "solar-ray")}
    )

    # the first job: stopped by the user once continued pretraining has finished
    first_id = cluster.submit(recipe_job(out), working_dir=REPO, runtime_env=runtime_env)
    _wait_for(out / ".pipeline" / "cpt.json", cluster, first_id, timeout_s=600)
    cpt_marker = (out / ".pipeline" / "cpt.json").read_text()
    first = cluster.stop_job(first_id)
    assert first.status == "STOPPED", f"{first.status}: {first.message[:500]}"
    assert not (out / "report" / "results.json").exists()

    # the same job again: finished stages are skipped, the rest resumes and completes
    second = cluster.wait_job(
        cluster.submit(recipe_job(out), working_dir=REPO, runtime_env=runtime_env),
        timeout_s=900,
    )
    assert second.status == "SUCCEEDED", (
        f"{second.status}: {second.message[:500]}\n{second.logs[-4000:]}"
    )
    for stage in ("corpus", "base", "upscaled", "data", "cpt"):
        assert any(
            line.split("] ", 1)[-1].startswith(f"{stage} (") and "done, skipped" in line
            for line in second.logs.splitlines()
        ), f"{stage} was not skipped:\n{second.logs[-4000:]}"
    assert (out / ".pipeline" / "cpt.json").read_text() == cpt_marker  # not redone
    assert "eval: finished in" in second.logs  # the job's logs show stage progress

    for stage in MODEL_STAGES:
        assert (out / stage / "solar.json").is_file(), f"{stage}/solar.json missing"
    report = json.loads((out / "report" / "results.json").read_text())
    assert {r["name"] for r in report["models"]} >= {"base", "cpt", "dpo", "final"}

    # from the State API, not the job's word: training workers ran on both nodes, both times
    all_node_ids = {n["node_id"] for n in cluster.alive_nodes()}
    for job in (first, second):
        assert job.job_id, "the Jobs API gave no Ray job id"
        workers = cluster.list_state("actors", f"job_id={job.job_id}", "class_name=RayTrainWorker")
        ran_on = {w["node_id"] for w in workers if w.get("node_id")}
        assert ran_on == all_node_ids, f"training workers ran on {ran_on}, nodes {all_node_ids}"


@pytest.mark.slow
def test_each_node_smoke_test_reaches_every_node(cluster: LocalRayCluster, tmp_path: Path) -> None:
    """The README's smoke test: one run pinned to each alive node, no custom resources."""
    summary = tmp_path / "nodes.json"
    argv = ["python", "-m", "solar_ray.cluster", "each-node", "--num-cpus", "0"]
    argv += ["--summary", str(summary), "--", "solar-ray", "upscale", "--help"]
    job = cluster.wait_job(cluster.submit(argv, working_dir=REPO), timeout_s=90)
    assert job.status == "SUCCEEDED", f"{job.status}: {job.message[:500]}\n{job.logs[-4000:]}"
    runs = json.loads(summary.read_text())
    assert {r["node_id"] for r in runs} == {n["node_id"] for n in cluster.alive_nodes()}
    assert all(r["returncode"] == 0 and "--source" in r["output_tail"] for r in runs), runs


# --------------------------------------------------------------------------- helpers (fast)


def test_resolve_path_keeps_uris_and_anchors_relative_paths(tmp_path: Path) -> None:
    assert resolve_path("s3://bucket/run/") == "s3://bucket/run/"
    assert resolve_path("jobs/tiny.yaml", base=tmp_path) == str(tmp_path / "jobs" / "tiny.yaml")
    assert resolve_path("/abs/x", base=tmp_path) == "/abs/x"
    assert resolve_path("~/x") == str(Path.home() / "x")


def test_storage_path_reads_the_cluster_root(tmp_path: Path) -> None:
    assert storage_path("runs", env={}) is None
    env = {STORAGE_ENV: "s3://bucket/solar-ray/"}
    assert storage_path("runs", "/tiny/", env=env) == "s3://bucket/solar-ray/runs/tiny"
    assert storage_path(env=env) == "s3://bucket/solar-ray"
    assert storage_path("r", env={STORAGE_ENV: str(tmp_path)}) == f"{tmp_path}/r"


def test_job_runtime_env_passes_settings_not_secrets(tmp_path: Path) -> None:
    environ = {"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_secret", STORAGE_ENV: "gs://b/p"}
    env = job_runtime_env(tmp_path, env_vars={"X": "1"}, environ=environ)
    assert env["env_vars"] == {"HF_HUB_OFFLINE": "1", STORAGE_ENV: "gs://b/p", "X": "1"}
    assert env["working_dir"] == str(tmp_path)
    assert set(WORKING_DIR_EXCLUDES) <= set(env["excludes"])
    assert job_runtime_env(environ={}) == {}
    # what Ray itself accepts (it checks the working dir exists, the env values are str)
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**env)
