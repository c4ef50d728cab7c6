"""The cluster harness under a port race, with no other Ray cluster on the machine.

Kept apart from ``test_cluster_job.py``: that module keeps a two-node cluster up for all
its tests, and two clusters at once on one small machine make this test about them
instead of about the race (it failed there, in the full suite only).
"""

from __future__ import annotations

import os

import cluster_harness
import pytest
from cluster_harness import LocalRayCluster, NodeSpec


@pytest.mark.slow
def test_a_port_taken_after_it_was_picked_is_retried_on_others(monkeypatch) -> None:
    """The dashboard port is taken between its pick and ``ray start``: the start fails on
    the bind, and the harness starts the node again on other ports instead of failing."""
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    real = cluster_harness._free_port
    picks = iter([real(), taken.getsockname()[1]])  # the first gcs and dashboard ports
    monkeypatch.setattr(cluster_harness, "_free_port", lambda: next(picks, None) or real())
    c = LocalRayCluster([NodeSpec(num_cpus=1)], env={"PATH": os.environ.get("PATH", "")})
    try:
        c.start()
        assert c.dashboard_port != taken.getsockname()[1]
        assert list(c.root.glob("failed-1/node-0.log")), "the first start did not fail"
        assert len(c.alive_nodes()) == 1
    finally:
        c.stop()
        taken.close()
    assert c.running_pids() == []
