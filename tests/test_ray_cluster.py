"""LocalRayCluster: loopback addresses, token auth, and stopping only what it started."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import ray

from pathways_lite.workers.ray_cluster import LocalRayCluster, alive

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_session_cluster_nodes_sit_on_their_loopback_addresses(ray_cluster) -> None:
    assert ray_cluster.address.startswith("127.0.0.2:")
    alive_nodes = [n for n in ray.nodes() if n["Alive"]]
    assert sorted(n["NodeManagerAddress"] for n in alive_nodes) == [
        "127.0.0.2",
        "127.0.0.3",
        "127.0.0.4",
    ]
    for node in ray_cluster.nodes:
        assert node.temp_dir.is_relative_to(ray_cluster.state_dir)
    assert oct(ray_cluster.token_path.stat().st_mode & 0o777) == "0o600"


def test_a_wrong_token_cannot_join(ray_cluster) -> None:
    # Two connection tries, not Ray's twenty (one a second): a refused token is refused on
    # the first.
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": "0" * 64,
        "RAY_gcs_server_port_wait_time_s": "2",
    }
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    code = (
        f"import ray; ray.init(address={ray_cluster.address!r}, _node_ip_address='127.0.0.2',"
        " log_to_driver=False); print(ray.cluster_resources())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "auth" in (result.stderr + result.stdout).lower()


def test_stop_ends_only_its_own_processes(ray_cluster, tmp_path_factory) -> None:
    session_pids = ray_cluster.pids()
    state_dir = tmp_path_factory.mktemp("rc", numbered=True)
    if len(str(state_dir)) > 60:  # Ray's socket paths must stay short
        state_dir = tmp_path_factory.getbasetemp() / "rc"
    other = LocalRayCluster(state_dir, head_ip="127.0.0.5", num_cpus=1)
    try:
        address = other.start()
        assert address.startswith("127.0.0.5:")
        own = other.pids()
        assert own and not set(own) & set(session_pids)
    finally:
        other.stop()
    assert alive(own) == []
    assert other.pids() == []
    # The session cluster is untouched.
    leaders = [node.pid for node in ray_cluster.nodes]
    assert alive(leaders) == leaders
    assert ray.cluster_resources().get("island_east") == 1
