"""``ray job submit`` against a real two-node Ray cluster with token auth.

The cluster (:mod:`cluster_harness`) is two ``ray start`` processes on this machine: a head
advertising the custom resource ``solar_test_head`` and a worker advertising
``solar_test_worker``. A job is submitted with the ``ray`` CLI and ``--working-dir`` (this
checkout, as a user does from a fresh clone), waited for, and checked: it succeeded, its
outputs and their ``solar.json`` manifests exist, and, from Ray's State API rather than the
job's own account, its tasks ran on both nodes. The cluster is stopped by the processes the
harness started, even when a test fails.

The job is :data:`JOB`. Today it is :data:`UPSCALE_ON_EACH_NODE`: one Ray task pinned to each
node's custom resource runs ``solar-ray upscale`` of a tiny model into a shared directory.
When ``solar-ray run`` exists, switch the test to the tiny recipe with one line::

    JOB = TINY_RECIPE

For the node check to hold, the recipe's training stages must put one worker on each node.
Every test node advertises one unit of ``solar_test_node`` (and 2 logical CPUs), so two
workers asking for it cannot share a node; add to TINY_RECIPE's entrypoint, per training
stage ``S`` of the recipe, ``--set stages.S.num_workers=2
--set stages.S.resources_per_worker.CPU=1 --set stages.S.resources_per_worker.solar_test_node=1``.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cluster_harness import JobResult, LocalRayCluster, NodeSpec

from solar_ray.cluster import (
    STORAGE_ENV,
    WORKING_DIR_EXCLUDES,
    is_uri,
    job_runtime_env,
    resolve_path,
    storage_path,
)

REPO = Path(__file__).resolve().parents[1]
HEAD_RESOURCE = "solar_test_head"
WORKER_RESOURCE = "solar_test_worker"
NODE_RESOURCE = "solar_test_node"  # one unit on every node: one training worker per node
BASE_NUM_LAYERS = 4
M = 1


@dataclass(frozen=True)
class JobCase:
    """A job to submit: its argv (``{out}``, ``{model}`` filled in) and what it must leave.

    ``manifest_dirs`` are directories under ``{out}`` that must each hold a ``solar.json``
    (empty: at least one anywhere under ``{out}``); ``check`` looks closer at the outputs.
    """

    entrypoint: tuple[str, ...]
    manifest_dirs: tuple[str, ...] = ()
    timeout_s: float = 150.0
    check: Callable[[Path, Path, JobResult, list[dict]], None] | None = None

    def argv(self, out: Path, model: Path) -> list[str]:
        return [
            a.replace("{out}", str(out)).replace("{model}", str(model)) for a in self.entrypoint
        ]


def check_upscale_on_each_node(out: Path, model: Path, job: JobResult, nodes: list[dict]) -> None:
    """Each node's run landed where its resource lives and wrote a bitwise-correct DUS model."""
    from safetensors.numpy import load_file

    head_id = next(n["node_id"] for n in nodes if n["is_head_node"])
    worker_id = next(n["node_id"] for n in nodes if not n["is_head_node"])
    runs = {r["label"]: r for r in json.loads((out / "nodes.json").read_text())}
    assert runs[HEAD_RESOURCE]["node_id"] == head_id
    assert runs[WORKER_RESOURCE]["node_id"] == worker_id
    assert all(r["returncode"] == 0 for r in runs.values()), runs
    assert f"[{HEAD_RESOURCE}] node {head_id[:12]}" in job.logs
    assert f"[{WORKER_RESOURCE}] node {worker_id[:12]}" in job.logs

    source = load_file(model / "model.safetensors")
    plan = list(range(BASE_NUM_LAYERS - M)) + list(range(M, BASE_NUM_LAYERS))  # s = 2(n - m)
    for label in (HEAD_RESOURCE, WORKER_RESOURCE):
        manifest = json.loads((out / label / "solar.json").read_text())
        assert manifest["stage"] == "upscale"
        config = json.loads((out / label / "config.json").read_text())
        assert config["num_hidden_layers"] == len(plan)
        upscaled = load_file(out / label / "model.safetensors")
        for k, src in enumerate(plan):
            name = "model.layers.{}.self_attn.q_proj.weight"
            assert upscaled[name.format(k)].tobytes() == source[name.format(src)].tobytes()


UPSCALE_ON_EACH_NODE = JobCase(
    entrypoint=tuple(
        shlex.split(
            "python -m solar_ray.cluster each-node"
            f" --resource {HEAD_RESOURCE} --resource {WORKER_RESOURCE}"
            " --summary {out}/nodes.json"
            f" -- solar-ray upscale --source {{model}} --out {{out}}/{{node}} --m {M}"
        )
    ),
    manifest_dirs=(HEAD_RESOURCE, WORKER_RESOURCE),
    check=check_upscale_on_each_node,
)
TINY_RECIPE = JobCase(entrypoint=tuple(shlex.split("solar-ray run jobs/tiny.yaml --out {out}")))

#: the job the cluster test submits
JOB = UPSCALE_ON_EACH_NODE


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRayCluster]:
    """A two-node token-auth cluster; stopped (by its own pids) however the tests end."""
    venv_bin = Path(sys.executable).parent
    env = {
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        "OMP_NUM_THREADS": "1",
    }
    nodes = [
        NodeSpec(resources={HEAD_RESOURCE: 1, NODE_RESOURCE: 1}, num_cpus=2),
        NodeSpec(resources={WORKER_RESOURCE: 1, NODE_RESOURCE: 1}, num_cpus=2),
    ]
    c = LocalRayCluster(nodes, env=env)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        assert c.running_pids() == [], "cluster processes survived stop()"


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer random Llama saved as safetensors (no tokenizer: upscale does not need one)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=BASE_NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("base_model")
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


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
def test_job_submit_runs_on_both_nodes(
    cluster: LocalRayCluster, base_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    runtime_env = job_runtime_env(
        REPO, env_vars={"SOLAR_RAY_CACHE": str(REPO / ".cache" / "solar-ray")}
    )
    submission_id = cluster.submit(
        JOB.argv(out, base_model), working_dir=REPO, runtime_env=runtime_env
    )
    job = cluster.wait_job(submission_id, timeout_s=JOB.timeout_s)
    assert job.status == "SUCCEEDED", f"{job.status}: {job.message[:500]}\n{job.logs[-4000:]}"

    manifests = sorted(out.rglob("solar.json"))
    assert manifests, f"no solar.json under {out}; job logs:\n{job.logs[-4000:]}"
    for d in JOB.manifest_dirs:
        assert (out / d / "solar.json").is_file(), f"{d}/solar.json missing"

    nodes = cluster.alive_nodes()
    all_node_ids = {n["node_id"] for n in nodes}
    assert job.job_id, "the Jobs API gave no Ray job id"
    ran_on = cluster.job_node_ids(job.job_id, expect=all_node_ids)
    assert ran_on == all_node_ids, f"job's tasks ran on {ran_on}, cluster has {all_node_ids}"
    if JOB.check is not None:
        JOB.check(out, base_model, job, nodes)


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
    assert is_uri("s3://bucket/run") and is_uri("gs://b/x") and is_uri("hf://datasets/x")
    assert not is_uri("jobs/tiny.yaml") and not is_uri("/abs/path") and not is_uri("C:x")
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
