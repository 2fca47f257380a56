"""`pathways-lite up --ray-address`: the controller joins a multi-node Ray cluster it did not start.

A real Ray cluster on this machine (`ray start` processes, each in its own process group): a
head on 127.0.0.2 without islands and two worker nodes on 127.0.0.3 and 127.0.0.4, each
advertising one island through its Ray resources (workers/discovery.py's convention). The
controller is started by the CLI with `--ray-address`; it finds the islands, places their
hosts on those nodes, trains, and, when a node is stopped under a running job, marks that
island down (it cannot be restarted) and runs the job again on the other node's free island,
while it keeps serving. Nothing is left running after.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

from pathways_lite.client import ControllerClient, state_name
from pathways_lite.spec import load_spec_text
from pathways_lite.workers.discovery import (
    DiscoveryError,
    islands_from_nodes,
    node_resources,
)
from pathways_lite.workers.ray_cluster import LocalRayCluster, alive

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

NODES = {"127.0.0.3": "east", "127.0.0.4": "west"}

TINY = """
name: {name}
model: {{preset: palm-tiny}}
islands: 1
devices_per_island: 1
mesh: {{data: 1, model: 1}}
train: {{steps: {steps}, global_batch: 2, seq_len: 64, seed: 0}}
data: {{source: stdlib, vocab_size: 1024, max_bytes: 1000000}}
"""


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pathways_lite.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def joined():
    """(the Ray cluster, the controller's state dir) with the controller up via the CLI."""
    ray_dir = tempfile.mkdtemp(prefix="plj-", dir="/tmp")
    state_dir = tempfile.mkdtemp(prefix="plj-state-", dir="/tmp")
    cluster = LocalRayCluster(ray_dir, num_cpus=1)
    started: list[int] = []
    try:
        cluster.start()
        for ip, island in NODES.items():
            cluster.add_node(ip, node_resources(island, devices=1))
        up = _cli(
            "up",
            f"--ray-address={cluster.address}",
            f"--ray-token-file={cluster.token_path}",
            f"--state-dir={state_dir}",
            "--json",
        )
        assert up.returncode == 0, up.stderr
        assert json.loads(up.stdout)["controller"]
        yield cluster, state_dir
    finally:
        from pathways_lite.local import recorded_pids

        started = recorded_pids(state_dir) + cluster.pids()
        down = _cli("down", f"--state-dir={state_dir}", timeout=120)
        started_ray = cluster.pids()
        cluster.stop()
        shutil.rmtree(ray_dir, ignore_errors=True)
        shutil.rmtree(state_dir, ignore_errors=True)
    leftover = alive(sorted(set(started + started_ray)))
    assert not leftover, f"processes left behind: {leftover}"
    assert down.returncode == 0, down.stderr


@pytest.fixture(scope="module")
def client(joined):
    with ControllerClient(joined[1]) as c:
        yield c


def test_node_resources_round_trip_through_discovery() -> None:
    nodes = [
        {"Alive": True, "NodeManagerAddress": "10.0.0.1", "Resources": {"CPU": 8.0}},
        {
            "Alive": True,
            "NodeManagerAddress": "10.0.0.2",
            "Resources": {"CPU": 8.0, **node_resources("a", devices=4)},
        },
        {
            "Alive": True,
            "NodeManagerAddress": "10.0.0.3",
            "Resources": {"CPU": 8.0, "GPU": 8.0, **node_resources("b")},
        },
        {
            "Alive": True,
            "NodeManagerAddress": "10.0.0.4",
            "Resources": {"CPU": 8.0, "GPU": 8.0, **node_resources("b")},
        },
        {"Alive": True, "NodeManagerAddress": "10.0.0.5", "Resources": {"GPU": 2.0}},
        {"Alive": False, "NodeManagerAddress": "10.0.0.6", "Resources": node_resources("c")},
    ]
    found = {i.name: i for i in islands_from_nodes(nodes)}
    assert sorted(found) == ["a", "b", "gpu-10-0-0-5"]
    assert (found["a"].num_hosts, found["a"].devices_per_host, found["a"].platform) == (
        1,
        4,
        "cpu",
    )
    # One island over two GPU nodes: 2 hosts x 8 GPUs, each host placed by island_b.
    assert (found["b"].num_hosts, found["b"].devices_per_host, found["b"].platform) == (
        2,
        8,
        "gpu",
    )
    assert found["b"].resource == "island_b"
    # A GPU node without island resources is one island of its own, placed on that node.
    gpu = found["gpu-10-0-0-5"]
    assert (gpu.num_hosts, gpu.devices_per_host, gpu.platform) == (1, 2, "gpu")
    assert gpu.resource == "node:10.0.0.5"


def test_inconsistent_island_resources_are_refused_by_name() -> None:
    nodes = [
        {"NodeManagerAddress": "10.0.0.2", "Resources": node_resources("a", devices=2)},
        {"NodeManagerAddress": "10.0.0.3", "Resources": node_resources("a", devices=4)},
    ]
    with pytest.raises(DiscoveryError, match=r"island 'a' disagree on devices per host"):
        islands_from_nodes(nodes)
    with pytest.raises(DiscoveryError, match=r"10\.0\.0\.9 advertises island_x:devices=4"):
        islands_from_nodes(
            [
                {
                    "NodeManagerAddress": "10.0.0.9",
                    "Resources": {"GPU": 2.0, "island_x": 1.0, "island_x:devices": 4.0},
                }
            ]
        )


def test_islands_come_from_the_nodes_and_hosts_bind_to_their_node(joined) -> None:
    _, state_dir = joined
    listed = _cli("islands", f"--state-dir={state_dir}", "--json", timeout=60)
    assert listed.returncode == 0, listed.stderr
    islands = {i["id"]: i for i in json.loads(listed.stdout)}
    assert sorted(islands) == sorted(NODES.values())
    for ip, name in NODES.items():
        (host,) = islands[name]["hosts"]
        assert host["node"] == ip
        assert host["address"].startswith(f"{ip}:"), host
    health = _cli("health", f"--state-dir={state_dir}", timeout=60)
    assert health.returncode == 0 and "SERVING" in health.stdout, health.stderr


def test_two_island_job_trains_across_both_nodes_like_one_island(client) -> None:
    spec = load_spec_text(TINY.format(name="join-dp", steps=3).replace("islands: 1", "islands: 2"))
    one = client.wait(client.submit(load_spec_text(TINY.format(name="join-1", steps=3))).id, 240)
    two = client.wait(client.submit(spec).id, timeout_s=240)
    assert state_name(one.state) == "succeeded", one.message
    assert state_name(two.state) == "succeeded", two.message
    ran_on = {r.source.split("/")[0] for r in client.logs(two.id)} - {"controller"}
    assert ran_on == set(NODES.values())
    # The same global batch on 2 islands x 1 device and on 1 island: the same losses.
    worst = max(abs(a - b) / abs(b) for a, b in zip(two.losses, one.losses, strict=True))
    assert len(two.losses) == 3 and worst <= 1e-5, (list(two.losses), list(one.losses))


def test_one_island_jobs_train_on_each_island(client) -> None:
    # One job per island, at the same time.
    jobs = [client.submit(load_spec_text(TINY.format(name=f"join-{i}", steps=3))) for i in range(2)]
    done = [client.wait(j.id, timeout_s=240) for j in jobs]
    for job in done:
        assert state_name(job.state) == "succeeded", job.message
        assert len(job.losses) == 3
    # A finished job holds no islands: its hosts' log records say where its steps ran.
    ran_on = [
        {r.source.split("/")[0] for r in client.logs(job.id)} - {"controller"} for job in done
    ]
    assert sorted(i for islands in ran_on for i in islands) == sorted(NODES.values()), ran_on
    # The same spec on two nodes' islands: the same computation, bit for bit.
    assert list(done[0].losses) == list(done[1].losses)


def _dashboard(client: ControllerClient, path: str) -> dict:
    """A dashboard API reply (`api/jobs/<id>`, `api/overview`), fetched with the token."""
    url = client.dashboard_url(with_token=True)
    base, token = url.split("?token=")
    request = urllib.request.Request(f"{base}{path}", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read())


def test_losing_a_node_moves_its_job_to_a_free_island_and_the_controller_serves_on(
    joined, client
) -> None:
    cluster, state_dir = joined
    job = client.submit(load_spec_text(TINY.format(name="long", steps=100_000)))
    deadline = time.monotonic() + 180
    while client.get(job.id).steps_completed < 2:
        assert state_name(client.get(job.id).state) in ("queued", "running")
        assert time.monotonic() < deadline, "the long job did not start stepping"
        time.sleep(0.2)
    (island,) = client.get(job.id).islands
    (other,) = [name for name in NODES.values() if name != island]
    (node,) = [n for n in cluster.nodes if NODES.get(n.ip) == island]
    cluster.stop_node(node, patience_s=1.0)  # a failed machine: no wait for a clean exit
    # Its island cannot be restarted (the node is gone): the job rolls back and runs again on
    # the free island of the other node.
    deadline = time.monotonic() + 180
    while True:
        record = client.get(job.id)
        state = state_name(record.state)
        assert state in ("queued", "running"), record.message
        if list(record.islands) == [other] and state == "running" and record.steps_completed:
            break
        assert time.monotonic() < deadline, f"the job did not move to {other}: {record}"
        time.sleep(0.5)
    islands = {i.id: i for i in client.islands()}
    assert island in islands[island].down and "resource" in islands[island].down
    assert {h.state for h in islands[island].hosts} == {"dead"}
    assert not islands[other].down
    events = [e["message"] for e in _dashboard(client, f"api/jobs/{job.id}")["events"]]
    assert any(f"Island {island} is lost" in e for e in events), events
    shown = {i["id"]: i for i in _dashboard(client, "api/overview")["islands"]}
    assert shown[island]["down"] == islands[island].down and not shown[other]["down"]
    # The controller keeps serving: health, listing, cancel.
    health = _cli("health", f"--state-dir={state_dir}", timeout=60)
    assert health.returncode == 0, health.stderr
    assert job.id in {j.id for j in client.list()}
    assert client.info().epoch >= 1
    client.cancel(job.id)
    assert state_name(client.wait(job.id, timeout_s=120).state) == "cancelled"
