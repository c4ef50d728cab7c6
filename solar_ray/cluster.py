"""Running solar-ray on a Ray cluster: paths inside jobs, the job runtime env, per-node checks.

:func:`resolve_path` resolves relative inputs against the job's working directory (an
unpacked copy on every node); :func:`storage_path` reads the cluster's storage root
(``SOLAR_RAY_STORAGE_PATH``). ``python -m solar_ray.cluster each-node -- CMD ...`` runs a
command once on every node (``{node}``: the node's label) to smoke-test a cluster. See
docs/pipeline.md, "On a cluster", and cluster/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from solar_ray.fs import is_uri

__all__ = [
    "STORAGE_ENV",
    "NodeRun",
    "init_ray",
    "job_runtime_env",
    "main",
    "resolve_path",
    "run_on_each_node",
    "storage_path",
]

#: environment variable naming the cluster's shared storage root (s3://bucket/prefix, gs://...)
STORAGE_ENV = "SOLAR_RAY_STORAGE_PATH"

#: non-secret settings a job passes on to its workers when they are set where it is submitted
PASSTHROUGH_ENV = (
    STORAGE_ENV,
    "SOLAR_RAY_CACHE",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TOKENIZERS_PARALLELISM",
)

#: never uploaded with the working dir, even from a checkout whose .gitignore lacks them
WORKING_DIR_EXCLUDES = (".git/", ".venv/", ".cache/", "runs/", "out/", "bench/_work/")

_OUTPUT_TAIL_CHARS = 4000


def resolve_path(path: str | os.PathLike[str], base: str | os.PathLike[str] | None = None) -> str:
    """A path as a job should use it: URIs unchanged, ``~`` expanded, relative paths absolute.

    Relative paths resolve against ``base``, by default the current directory, which inside
    a Ray job is the unpacked ``--working-dir`` (the same copy on every node).
    """
    text = os.fspath(path)
    if is_uri(text):
        return text
    p = Path(text).expanduser()
    if not p.is_absolute():
        p = Path(base if base is not None else os.getcwd()) / p
    return str(p.resolve())


def storage_path(*parts: str, env: Mapping[str, str] | None = None) -> str | None:
    """The cluster's storage root (``$SOLAR_RAY_STORAGE_PATH``) joined with ``parts``.

    None when the variable is unset (a laptop run keeps its outputs local). A root that is
    not a URI is resolved like any other path.
    """
    root = (os.environ if env is None else env).get(STORAGE_ENV, "").strip()
    if not root:
        return None
    root = root.rstrip("/") if is_uri(root) else resolve_path(root)
    return "/".join([root, *(p.strip("/") for p in parts if p.strip("/"))])


def init_ray(address: str | None = None, runtime_env: dict | None = None) -> None:
    """Start or join Ray once, at an entry point: RAY_ADDRESS/``address`` joins a cluster."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"runtime_env": runtime_env or None, "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # the dashboard process serves the State API, which Ray Train V2's placement-group
        # cleaner polls (without it, it logs a warning every few seconds); loopback only
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", **kwargs)


def job_runtime_env(
    working_dir: str | os.PathLike[str] | None = None,
    *,
    env_vars: Mapping[str, str] | None = None,
    pip: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The runtime env for ``ray job submit --runtime-env-json`` (or ``ray.init``).

    Carries the non-secret settings of :data:`PASSTHROUGH_ENV` that are set in ``environ``
    (default: this process) plus ``env_vars``. Secrets (hub token, cloud keys) never go
    here: a runtime env is stored in the cluster and shown by the dashboard and
    ``ray job status``; nodes get secrets from their own environment instead (Kubernetes
    Secrets, instance roles). ``pip`` installs extra packages per job, which needs network.
    """
    source = os.environ if environ is None else environ
    env = {k: source[k] for k in PASSTHROUGH_ENV if source.get(k)}
    env.update({k: str(v) for k, v in (env_vars or {}).items()})
    runtime_env: dict[str, Any] = {"env_vars": env} if env else {}
    if working_dir is not None:
        runtime_env["working_dir"] = resolve_path(working_dir)
        runtime_env["excludes"] = list(WORKING_DIR_EXCLUDES)
    if pip:
        runtime_env["pip"] = list(pip)
    return runtime_env


@dataclass(frozen=True)
class NodeRun:
    """One command run on one node: where it ran and how it ended."""

    label: str
    node_id: str
    hostname: str
    returncode: int
    output_tail: str


def _run_command(argv: list[str], label: str) -> NodeRun:
    import ray

    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    output = (proc.stdout + proc.stderr)[-_OUTPUT_TAIL_CHARS:]
    return NodeRun(
        label=label,
        node_id=ray.get_runtime_context().get_node_id(),
        hostname=socket.gethostname(),
        returncode=proc.returncode,
        output_tail=output,
    )


def run_on_each_node(
    argv: Sequence[str],
    *,
    resources: Sequence[str] = (),
    num_cpus: float = 1,
    timeout_s: float | None = None,
) -> list[NodeRun]:
    """Run ``argv`` once per alive node, or once per custom resource in ``resources``.

    With ``resources``, each run asks for one unit of its resource, so a node that
    advertises ``{"r": 1}`` gets exactly the run for ``r`` (a resource no node that is up
    advertises is a ValueError); without, each alive node gets one run pinned to it.
    ``{node}`` in ``argv`` becomes the run's label. Needs a connected Ray (``ray.init()``);
    returns the runs in target order.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not argv:
        raise ValueError("argv: the command to run is empty")
    targets: list[tuple[str, dict[str, Any]]]
    if resources:
        missing = sorted(set(resources) - set(ray.cluster_resources()))
        if missing:
            raise ValueError(f"resources: no node advertises {missing}; runs would never start")
        targets = [(r, {"resources": {r: 1}}) for r in resources]
    else:
        alive = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))
        targets = [
            (
                node_id[:12],
                {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)},
            )
            for node_id in alive
        ]
    remote = ray.remote(_run_command)
    refs = [
        remote.options(num_cpus=num_cpus, **options).remote(
            [a.replace("{node}", label) for a in argv], label
        )
        for label, options in targets
    ]
    return list(ray.get(refs, timeout=timeout_s))


def _each_node(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        print("each-node: give the command after --", file=sys.stderr)
        return 2
    init_ray()  # joins the cluster of the job (RAY_ADDRESS) or starts a local one
    runs = run_on_each_node(
        command, resources=args.resource, num_cpus=args.num_cpus, timeout_s=args.timeout_s
    )
    for run in runs:
        state = "ok" if run.returncode == 0 else f"FAILED (exit {run.returncode})"
        print(f"[{run.label}] node {run.node_id[:12]} on {run.hostname}: {state}", flush=True)
        if run.returncode != 0:
            print(run.output_tail, file=sys.stderr)
    if args.summary:
        summary = Path(resolve_path(args.summary))
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text(json.dumps([asdict(r) for r in runs], indent=2) + "\n")
    return 0 if all(r.returncode == 0 for r in runs) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m solar_ray.cluster each-node [--resource R ...] -- CMD ...``."""
    parser = argparse.ArgumentParser(prog="python -m solar_ray.cluster")
    sub = parser.add_subparsers(dest="action", required=True)
    each = sub.add_parser("each-node", help="run a command once on every node of the cluster")
    each.add_argument(
        "--resource",
        action="append",
        default=[],
        help="run once per custom resource (repeatable) instead of once per alive node",
    )
    each.add_argument("--num-cpus", type=float, default=1, help="CPUs each run reserves")
    each.add_argument("--timeout-s", type=float, default=None, help="give up after this long")
    each.add_argument("--summary", help="write the runs as JSON here (node ids, exit codes)")
    each.add_argument("command", nargs=argparse.REMAINDER, help="-- the command to run")
    args = parser.parse_args(argv)
    return _each_node(args)


if __name__ == "__main__":
    sys.exit(main())
