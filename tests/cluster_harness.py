"""A real multi-node Ray cluster on this machine, for tests of the ``ray job submit`` path.

Each node is one ``ray start --block`` process (the head first, then workers that join it
with ``--address``), so the cluster is what a user gets from ``ray start`` on several
machines: a GCS, a raylet per node, the dashboard and its Jobs API, token authentication.
Everything is private to one :class:`LocalRayCluster`:

- ports are picked free (nothing on Ray's defaults, so a user's or another test's Ray is
  untouched); the dashboard binds 127.0.0.1 only;
- ``--temp-dir`` is a fresh short directory (Unix socket paths must stay < 108 bytes);
- the token lives in a 0600 file in that directory, named by ``RAY_AUTH_TOKEN_PATH`` in
  the environment of the processes this harness starts, never in ``~/.ray/auth_token``,
  and never in the test process's own environment.

:meth:`LocalRayCluster.stop` ends only what this harness started: it signals each
``ray start --block`` process (which takes its node's processes down with it), then kills
whatever is left of the process trees recorded from those pids, and, in case a tree was
orphaned, processes whose command line names this cluster's unique temp dir. It never runs
``ray stop``, which would stop every Ray on the machine. Should the test process itself be
killed, each ``ray start`` gets SIGTERM from the kernel (``PR_SET_PDEATHSIG``) and its node
goes down with it.

Talking to the cluster goes through the same doors a user uses: the ``ray`` CLI
(``ray job submit``, ``ray list``) and the Jobs REST API, each with the token.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

#: environment variables that would point the cluster or the CLI somewhere else
_SCRUBBED_ENV = (
    "RAY_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "RAY_AUTH_MODE",
    "RAY_NAMESPACE",
    "RAY_JOB_CONFIG_JSON_ENV_VAR",
)
_TERMINAL_JOB_STATES = ("SUCCEEDED", "FAILED", "STOPPED")


class ClusterError(RuntimeError):
    """The cluster did not start, or a command against it failed; the message has logs."""


@dataclass(frozen=True)
class NodeSpec:
    """One node: logical CPUs and custom resources (``{"name": 1}`` labels a node)."""

    resources: Mapping[str, float] = field(default_factory=dict)
    num_cpus: int = 1
    object_store_bytes: int = 100 * 1024 * 1024


@dataclass(frozen=True)
class JobResult:
    """How a submitted job ended, with its Ray job id and driver logs."""

    submission_id: str
    status: str
    job_id: str | None
    driver_node_id: str | None
    message: str
    logs: str


#: ports this process handed out (two clusters, or two picks, never get the same one)
_HANDED_OUT: set[int] = set()
#: picked below the kernel's ephemeral range, so no outgoing connection can take a port
#: between its pick and ``ray start`` binding it
_PORTS = (20000, 30000)
_WORKER_PORTS = (10000, 20000)
#: what a node's logs say when a port was taken after all; ``start`` then retries
_BIND_FAILURE = re.compile(r"(?i)address already in use|already occupied|failed to bind|bind failed|port \d+ is (already )?in use")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port_range(size: int, low: int, high: int) -> tuple[int, int]:
    """A run of ``size`` ports, free now and never handed out by this process before."""
    rng = secrets.SystemRandom()
    for _ in range(200):
        start = rng.randrange(low, high - size)
        ports = range(start, start + size)
        if _HANDED_OUT.isdisjoint(ports) and all(_bindable(p) for p in ports):
            _HANDED_OUT.update(ports)
            return start, start + size - 1
    raise ClusterError(f"no run of {size} free ports in {low}..{high}")


def _free_port() -> int:
    return _free_port_range(1, *_PORTS)[0]


def _die_with_parent() -> None:
    """In the child: SIGTERM when the test process dies, even by SIGKILL (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _kill(*procs: psutil.Process, wait_s: float) -> None:
    """SIGKILL ``procs`` (those already gone are skipped) and wait up to ``wait_s`` for them."""
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(list(procs), timeout=wait_s)


def node_env(**extra: str) -> dict[str, str]:
    """The environment test nodes run with: this venv's ``bin`` first on ``PATH`` (how
    ``solar-ray`` resolves inside a job), offline hub, one thread per process; ``extra``
    added."""
    venv_bin = Path(sys.executable).parent
    return {
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def _tail(path: Path, num_chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-num_chars:]
    except OSError:
        return "(no log)"


class LocalRayCluster:
    """A Ray cluster of ``nodes`` on this machine; ``nodes[0]`` is the head.

    Use as a context manager, or call :meth:`start` and, in a ``finally`` or fixture
    finalizer, :meth:`stop`. ``env`` is added to every node's environment (and so to every
    job's driver and workers): put the venv's ``bin`` first on ``PATH`` there, which is
    how ``solar-ray`` resolves inside a job.
    """

    def __init__(
        self,
        nodes: Sequence[NodeSpec],
        *,
        env: Mapping[str, str] | None = None,
        ray_executable: str | os.PathLike[str] | None = None,
        startup_timeout_s: float = 180.0,
    ) -> None:
        if not nodes:
            raise ValueError("nodes: a cluster needs at least a head node")
        self.nodes = list(nodes)
        self.ray = str(ray_executable or Path(sys.executable).with_name("ray"))
        self.startup_timeout_s = startup_timeout_s
        self.root = Path(tempfile.mkdtemp(prefix="srray-", dir="/tmp"))
        self.temp_dir = self.root / "ray"  # the head's; node i > 0 uses ray-<i> beside it
        self.token_path = self.root / "auth_token"
        self.token = secrets.token_hex(32)
        fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.token)
        self._pick_head_ports()
        base = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
        self.env: dict[str, str] = {
            **base,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "RAY_USAGE_STATS_ENABLED": "0",
            **dict(env or {}),
        }
        self._procs: list[subprocess.Popen[bytes]] = []
        self._trees: list[psutil.Process] = []
        self._killed: set[int] = set()  # nodes ended by kill_node

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> LocalRayCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _pick_head_ports(self) -> None:
        self.gcs_port = _free_port()
        self.dashboard_port = _free_port()
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"

    def _node_args(self, index: int, spec: NodeSpec) -> list[str]:
        low, high = _free_port_range(64, *_WORKER_PORTS)
        args = [
            self.ray,
            "start",
            "--block",
            "--disable-usage-stats",
            f"--temp-dir={self.node_temp_dir(index)}",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={spec.num_cpus}",
            "--num-gpus=0",
            f"--object-store-memory={spec.object_store_bytes}",
            f"--resources={json.dumps(dict(spec.resources))}",
            f"--node-manager-port={_free_port()}",
            f"--object-manager-port={_free_port()}",
            f"--min-worker-port={low}",
            f"--max-worker-port={high}",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
        ]
        if index == 0:
            args += [
                "--head",
                f"--port={self.gcs_port}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={_free_port()}",
            ]
        else:
            args.append(f"--address={self.gcs_address}")
        return args

    def node_temp_dir(self, index: int) -> Path:
        """Each node's own Ray temp dir, as on separate machines.

        Shared, the nodes' runtime-env agents would manage one ``runtime_resources``
        directory: the worker node re-extracting a job's ``working_dir`` package there
        deletes the directory the job's driver runs in on the head (seen as oneMKL's
        "Cannot load libtorch_cpu.so" when torch is first imported with a vanished cwd).
        """
        return self.temp_dir if index == 0 else self.root / f"ray-{index}"

    def _spawn(self, index: int, spec: NodeSpec) -> None:
        log = open(self.root / f"node-{index}.log", "wb")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            self._node_args(index, spec),
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # a killed test run does not leave a cluster behind
        )
        log.close()
        self._procs.append(proc)
        self._trees.append(psutil.Process(proc.pid))


    def start(self, attempts: int = 3) -> None:
        """Start the head, wait for its Jobs API, then the workers; wait until all are alive.

        Two failures are retried, each by stopping what started and starting again on other
        ports: a port picked free but taken before ``ray start`` bound it (a node's logs
        say so), and a raylet that missed ``ray start``'s fixed 30 s registration wait
        (hard-coded in ``ray._private.node``; a loaded 2-core machine sometimes needs more).
        """
        for attempt in range(1, attempts + 1):
            try:
                self._spawn(0, self.nodes[0])
                self._wait(lambda: self._http("GET", "/api/jobs/") is not None, "the head's Jobs API")
                for i, spec in enumerate(self.nodes[1:], start=1):
                    self._spawn(i, spec)
                self._wait(lambda: len(self.alive_nodes()) == len(self.nodes), "all nodes alive")
                return
            except ClusterError as e:
                self._stop_processes()
                retry = "timed out during startup" in str(e) or self._bind_failed()
                if attempt == attempts or not retry:
                    self.stop()
                    raise
                # keep the failed attempt's files for a later failure message, out of the way
                kept = self.root / f"failed-{attempt}"
                kept.mkdir()
                for path in list(self.root.iterdir()):
                    if path != self.token_path and not path.name.startswith("failed-"):
                        path.rename(kept / path.name)
                self._pick_head_ports()
            except BaseException:
                self.stop()
                raise

    def _bind_failed(self) -> bool:
        """Whether a node's log (or a log of its Ray processes) reports a port taken."""
        for log in self.root.rglob("*"):
            if (
                log.is_file()
                and log.suffix in (".log", ".out", ".err")
                and not log.relative_to(self.root).parts[0].startswith("failed-")
                and _BIND_FAILURE.search(log.read_text(errors="replace"))
            ):
                return True
        return False

    def _wait(self, ready: Any, what: str) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                if ready():
                    return
            except (ClusterError, OSError, ValueError):
                pass
            if self._bind_failed():  # a node runs on without the part that could not bind
                raise ClusterError(f"a port was taken while waiting for {what}")
            time.sleep(1.0)
        raise ClusterError(
            f"timed out after {self.startup_timeout_s:.0f}s waiting for {what}:\n"
            + "\n".join(_tail(self.root / f"node-{i}.log") for i in range(len(self._procs)))
        )

    def kill_node(self, index: int) -> None:
        """End node ``index`` as a preempted VM vanishes: SIGKILL to all its processes at once.

        Its ``ray start`` process and every process below it (raylet, its workers, the
        agents) are killed by pid, with no shutdown; the GCS learns of the loss by its
        health checks, as it would of a machine gone from the network.
        """
        if index == 0:
            raise ValueError("index: the head node cannot be lost in these tests")
        root = self._trees[index]
        _kill(root, *root.children(recursive=True), wait_s=10)
        self._procs[index].wait(timeout=10)
        self._killed.add(index)

    def add_node(self, spec: NodeSpec) -> int:
        """Start one more worker node joining the head (a VM the autoscaler brought back).

        Waits until the cluster counts it alive; returns its index.
        """
        index = len(self._procs)
        before = len(self.alive_nodes())
        self.nodes.append(spec)
        self._spawn(index, spec)
        self._wait(lambda: len(self.alive_nodes()) > before, f"node {index} alive")
        return index

    def _check_alive(self) -> None:
        for i, proc in enumerate(self._procs):
            if proc.poll() is not None and i not in self._killed:
                raise ClusterError(
                    f"ray start for node {i} exited with {proc.returncode}:\n"
                    + _tail(self.root / f"node-{i}.log")
                )

    def _descendants(self) -> list[psutil.Process]:
        found: list[psutil.Process] = []
        for root in self._trees:
            try:
                if root.is_running():
                    found.append(root)
                    found.extend(root.children(recursive=True))
            except psutil.Error:
                continue
        return found

    def _orphans(self) -> list[psutil.Process]:
        """Processes naming this cluster's unique temp dir whose ``ray start`` is gone."""
        marker = str(self.root)
        me = os.getpid()
        found = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                cmdline = " ".join(proc.info["cmdline"] or [])
            except psutil.Error:
                continue
            if proc.info["pid"] != me and marker in cmdline:
                found.append(proc)
        return found

    def stop(self, grace_s: float = 20.0) -> None:
        """Stop every process this cluster started (and nothing else); remove its files."""
        self._stop_processes(grace_s)
        if os.environ.get("SOLAR_RAY_KEEP_CLUSTER_LOGS"):
            print(f"cluster logs kept in {self.root}", file=sys.stderr)
        else:
            shutil.rmtree(self.root, ignore_errors=True)

    def _stop_processes(self, grace_s: float = 20.0) -> None:
        tracked = {p.pid: p for p in self._descendants()}
        for proc in reversed(self._procs):  # workers first, the head last
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self._procs:
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        # What is left: processes of the recorded trees that ignored SIGTERM, and any that
        # were orphaned (they still name our temp dir). psutil checks create times, so a
        # recycled pid is never signalled.
        leftovers = {**tracked, **{p.pid: p for p in self._orphans()}}
        _gone, alive = psutil.wait_procs(list(leftovers.values()), timeout=5)
        _kill(*alive, wait_s=5)
        self._procs.clear()
        self._trees.clear()
        self._killed.clear()

    def running_pids(self) -> list[int]:
        """Pids of this cluster's processes still running (empty after :meth:`stop`)."""
        return sorted({p.pid for p in self._descendants() + self._orphans()})

    # ------------------------------------------------------------------ talking to it

    def _http(
        self, method: str, path: str, *, token: str | None = "__own__", timeout_s: float = 10.0
    ) -> Any:
        """JSON from the dashboard, with this cluster's token (``token=None``: without)."""
        request = urllib.request.Request(self.dashboard_url + path, method=method)
        bearer = self.token if token == "__own__" else token
        if bearer is not None:
            request.add_header("Authorization", f"Bearer {bearer}")
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            body = resp.read()
        return json.loads(body) if body else {}

    def http_status(self, path: str, *, token: str | None) -> int:
        """The HTTP status of ``GET path`` with ``token`` (None: no Authorization header)."""
        try:
            self._http("GET", path, token=token)
        except urllib.error.HTTPError as e:
            return e.code
        return 200

    def cli(self, *args: str, timeout_s: float = 120.0) -> str:
        """Run ``ray <args>`` as a user would, with the token; stdout, or ClusterError."""
        proc = subprocess.run(
            [self.ray, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if proc.returncode != 0:
            raise ClusterError(
                f"ray {shlex.join(args)} exited with {proc.returncode}:\n"
                f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
        return proc.stdout

    def list_state(self, resource: str, *filters: str) -> list[dict[str, Any]]:
        """``ray list <resource> --detail --format json [--filter ...]`` as dicts."""
        args = ["list", resource, "--detail", "--format", "json", "--limit", "10000"]
        args += ["--address", self.dashboard_url]
        for f in filters:
            args += ["--filter", f]
        out = self.cli(*args)
        start = out.find("[")
        return json.loads(out[start:]) if start >= 0 else []

    def alive_nodes(self) -> list[dict[str, Any]]:
        """The cluster's alive nodes (node_id, is_head_node, resources_total, ...)."""
        return [n for n in self.list_state("nodes") if n.get("state") == "ALIVE"]

    def submit(
        self,
        entrypoint: Sequence[str],
        *,
        working_dir: str | os.PathLike[str] | None = None,
        runtime_env: Mapping[str, Any] | None = None,
        submission_id: str | None = None,
    ) -> str:
        """``ray job submit --no-wait -- <entrypoint argv>``; returns the submission id."""
        submission_id = submission_id or f"srray-{secrets.token_hex(6)}"
        args = ["job", "submit", "--address", self.dashboard_url, "--no-wait"]
        args += ["--submission-id", submission_id]
        if working_dir is not None:
            args += ["--working-dir", str(working_dir)]
        env = {k: v for k, v in dict(runtime_env or {}).items() if k != "working_dir"}
        if env:
            args += ["--runtime-env-json", json.dumps(env)]
        args += ["--", *entrypoint]
        self.cli(*args)
        return submission_id

    def job_status(self, submission_id: str) -> str:
        """The job's status now (``UNKNOWN`` while the dashboard does not answer)."""
        try:
            return str(self._http("GET", f"/api/jobs/{submission_id}").get("status", "UNKNOWN"))
        except (OSError, ValueError):
            return "UNKNOWN"

    def stop_job(self, submission_id: str, timeout_s: float = 60.0) -> JobResult:
        """``ray job stop`` as a user does, then wait until the job has ended."""
        self.cli("job", "stop", "--address", self.dashboard_url, "--no-wait", submission_id)
        return self.wait_job(submission_id, timeout_s=timeout_s)

    def wait_job(self, submission_id: str, timeout_s: float) -> JobResult:
        """Poll the Jobs API until the job ends (or ``timeout_s``; then stop it)."""
        deadline = time.monotonic() + timeout_s
        info: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                info = self._http("GET", f"/api/jobs/{submission_id}")
            except (OSError, ValueError):  # a slow or restarting dashboard: ask again
                info = {}
            if info.get("status") in _TERMINAL_JOB_STATES:
                break
            time.sleep(2.0)
        else:
            self._http("POST", f"/api/jobs/{submission_id}/stop")
        logs = self._http("GET", f"/api/jobs/{submission_id}/logs").get("logs", "")
        return JobResult(
            submission_id=submission_id,
            status=str(info.get("status", "UNKNOWN")),
            job_id=info.get("job_id"),
            driver_node_id=info.get("driver_node_id"),
            message=str(info.get("message", "")),
            logs=logs,
        )

    def job_node_ids(
        self, job_id: str, *, expect: Iterable[str] = (), timeout_s: float = 30.0
    ) -> set[str]:
        """Nodes that ran the job's tasks and actors, from the State API (not the job's word).

        Task events reach the GCS asynchronously, so this polls until every node in
        ``expect`` is seen or ``timeout_s`` passes.
        """
        wanted = set(expect)
        deadline = time.monotonic() + timeout_s
        seen: set[str] = set()
        while True:
            rows = self.list_state("tasks", f"job_id={job_id}")
            rows += self.list_state("actors", f"job_id={job_id}")
            seen = {r["node_id"] for r in rows if r.get("node_id")}
            if wanted <= seen or time.monotonic() > deadline:
                return seen
            time.sleep(2.0)
