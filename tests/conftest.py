"""Test-wide settings: CPU devices, JAX's persistent compilation cache, shared fixtures.

The environment is set before anything imports JAX, and it is inherited by every process a
test starts (island hosts, Ray workers), so they share the same compilation cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache"

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Four virtual CPU devices in the test process: enough for every in-process mesh we test.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(CACHE / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("PATHWAYS_LITE_CACHE", str(CACHE / "pathways_lite"))
# Our test processes stay on loopback and never phone home.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# The Ray heads the tests start mark a stopped node dead after 3 failed health checks a
# second apart (Ray's default: 5, 3 s apart), so a lost node's job moves in seconds. A live
# node under load still answers: each check waits Ray's default 10 s.
os.environ.setdefault("RAY_health_check_period_ms", "1000")
os.environ.setdefault("RAY_health_check_failure_threshold", "3")
# Controllers the tests start keep no warm spare hosts (two cores: a spare process per host
# imports JAX and compiles ahead); the tests of spares and the durability story turn them on.
os.environ.setdefault("PATHWAYS_LITE_SPARE_HOSTS", "off")


# --- Data fixtures (tokenizer and data pipeline) -------------------------------------------
# One small tokenizer and dataset on a capped stdlib corpus, shared by every test session and
# cached under PATHWAYS_LITE_CACHE: the first build takes about a second, later ones read it.
TEST_VOCAB_SIZE = 1024
TEST_MAX_BYTES = 1_000_000
TEST_SEQ_LEN = 64


@pytest.fixture(scope="session")
def stdlib_dataset():
    """The default (stdlib) corpus, capped at 1 MB, vocabulary 1024, seq_len 64."""
    from pathways_lite.model.data import DataSpec, prepare_dataset

    spec = DataSpec(source="stdlib", vocab_size=TEST_VOCAB_SIZE, max_bytes=TEST_MAX_BYTES)
    return prepare_dataset(spec, seq_len=TEST_SEQ_LEN)


@pytest.fixture(scope="session")
def tokenizer(stdlib_dataset):
    """The tokenizer of `stdlib_dataset`."""
    return stdlib_dataset.tokenizer


# --- end of data fixtures ------------------------------------------------------------------


# --- Ray cluster fixture (island hosts) ----------------------------------------------------
# ONE local Ray cluster for the whole session, on loopback with token auth: the head on
# 127.0.0.2 and two nodes on 127.0.0.3 / 127.0.0.4, each node advertising island resources.
# Starting it costs ~15 s, so tests share it; teardown checks that no Ray process is left.
RAY_HEAD_RESOURCES = {"island_duo": 2, "island_solo": 1}
RAY_NODE_RESOURCES = {"127.0.0.3": {"island_east": 1}, "127.0.0.4": {"island_west": 1}}


@pytest.fixture(scope="session")
def ray_cluster():
    """A started LocalRayCluster this test process is connected to (as a Ray driver)."""
    import shutil
    import tempfile

    import ray

    from pathways_lite.workers.island_host import wait_for_resource
    from pathways_lite.workers.ray_cluster import LocalRayCluster, alive, connect

    # Short path: Ray's unix sockets live below it.
    state_dir = tempfile.mkdtemp(prefix="plray-", dir="/tmp")
    cluster = LocalRayCluster(state_dir, head_resources=RAY_HEAD_RESOURCES, num_cpus=2)
    started: list[int] = []
    try:
        cluster.start()
        for ip, resources in RAY_NODE_RESOURCES.items():
            cluster.add_node(ip, resources)
        connect(cluster.address, token_path=cluster.token_path)
        for resources in RAY_NODE_RESOURCES.values():
            for name, amount in resources.items():
                wait_for_resource(name, amount)
        yield cluster
    finally:
        started = cluster.pids()
        ray.shutdown()
        cluster.stop()
        shutil.rmtree(state_dir, ignore_errors=True)
    leftover = alive(started)
    assert not leftover, f"Ray processes left behind: {leftover}"


# --- end of Ray cluster fixture ------------------------------------------------------------


# --- Local pathways_lite cluster fixture (controller tests) --------------------------------
# ONE LocalCluster (Ray on loopback, 1 island of 2 CPU devices, the controller process) for
# the controller and CLI tests; teardown checks that `down` left no process behind.


@pytest.fixture(scope="session")
def local_cluster():
    """A started pathways_lite.local.LocalCluster: 1 island x 2 devices."""
    import shutil
    import tempfile

    from pathways_lite.local import LocalCluster
    from pathways_lite.workers.ray_cluster import alive

    state_dir = tempfile.mkdtemp(prefix="plc-", dir="/tmp")
    cluster = LocalCluster(islands=1, devices_per_island=2, state_dir=state_dir)
    started: list[int] = []
    try:
        cluster.start()
        yield cluster
    finally:
        started = cluster.pids()
        cluster.down()
        shutil.rmtree(state_dir, ignore_errors=True)
    leftover = alive(started)
    assert not leftover, f"processes left behind by LocalCluster.down(): {leftover}"


# --- end of local cluster fixture ----------------------------------------------------------
