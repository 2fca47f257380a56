"""Island hosts on a real multi-node Ray cluster: placement, multi-host JAX, gRPC service.

All tests share the session cluster of tests/conftest.py: head 127.0.0.2 (island_duo: 2,
island_solo: 1), node 127.0.0.3 (island_east: 1), node 127.0.0.4 (island_west: 1).
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time

import grpc
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pathways_lite.controller.islands import attach_or_start, restart_group
from pathways_lite.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from pathways_lite.workers.auth import Credential, host_channel
from pathways_lite.workers.host import WORKER_WIRE_VERSION
from pathways_lite.workers.island_host import (
    SPARE_DEPTH,
    SPARE_NICE,
    IslandHostGroup,
    IslandPlacementError,
    IslandSpec,
)
from pathways_lite.workers.probe_runtime import PROBE_DATA_HASH, PROBE_PRESET
from pathways_lite.workers.service import SERVICE_NAME

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

CREDENTIAL = Credential("island-hosts-test-secret")


@pytest.fixture(scope="module")
def duo(ray_cluster):
    """A 2-host island (2 simulated CPU devices per host) on the head node."""
    group = IslandHostGroup(IslandSpec("duo", num_hosts=2, devices_per_host=2), CREDENTIAL)
    group.start()
    try:
        yield group
    finally:
        group.shutdown()


def test_each_island_host_lands_on_the_node_that_advertises_it(ray_cluster) -> None:
    groups = [
        IslandHostGroup(IslandSpec(name, devices_per_host=1), CREDENTIAL)
        for name in ("east", "west")
    ]
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            metas = list(pool.map(lambda g: g.start()[0], groups))
        assert [m.node_ip for m in metas] == ["127.0.0.3", "127.0.0.4"]
        nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
        for meta, name in zip(metas, ("east", "west"), strict=True):
            assert nodes[meta.node_id]["NodeManagerAddress"] == meta.node_ip
            assert nodes[meta.node_id]["Resources"].get(f"island_{name}") == 1
            # The service binds the node's address, and answers there.
            with host_channel(meta.address, CREDENTIAL) as channel:
                info = worker_pb2_grpc.WorkerServiceStub(channel).Info(
                    worker_pb2.InfoRequest(), timeout=10
                )
            assert info.node_ip == meta.node_ip and info.pid == meta.pid
            assert info.island == name
        # Detached and named: a fresh handle finds the host by name in our namespace.
        handle = ray.get_actor("island-east-host-0", namespace="pathways_lite")
        assert ray.get(handle.metadata.remote(), timeout=30) == metas[0]
    finally:
        for g in groups:
            g.shutdown()


def wait_nice(actor, value: int, timeout_s: float = 30.0) -> None:
    """Wait until every thread of `actor`'s process is at nice `value` (at most)."""
    deadline = time.monotonic() + timeout_s
    while (nice := ray.get(actor.niceness.remote(), timeout=30)) != value:
        assert time.monotonic() < deadline, f"nice {nice}, not {value}"
        time.sleep(0.1)


def test_a_warm_spare_replaces_a_killed_host_and_a_new_controller_attaches_to_it(
    ray_cluster,
) -> None:
    """A CPU island's warm spares (on its host's node, JAX imported at nice 19, not serving,
    SPARE_DEPTH of them): the oldest is promoted when the host is SIGKILLed and serves at the
    host's priority: the island is back without a new process, under that incarnation's
    name, the next spare in line; a restarted controller finds them by name and keeps them."""
    spec = IslandSpec("west", devices_per_host=1)
    group = IslandHostGroup(spec, CREDENTIAL, spares=True)
    try:
        (meta,) = group.start()
        group.prepare_spares()
        assert SPARE_DEPTH == 2 and [k for k, _ in group.spare_sets] == [1, 2]
        (spare,) = group.spares
        (second,) = group.spare_sets[1][1]
        spare_ip, spare_pid = ray.get(spare.ready.remote(), timeout=60)
        assert spare_ip == "127.0.0.4" and spare_pid != meta.pid  # on the host's node
        assert ray.get(spare.started.remote(), timeout=30) is False  # not serving
        # The spare behind the next one warms up at a low priority; the next one (it must be
        # ready soon) at the host's own.
        host_nice = ray.get(group.actors[0].niceness.remote(), timeout=30)
        assert host_nice < SPARE_NICE
        wait_nice(second, SPARE_NICE)
        wait_nice(spare, host_nice)
        os.kill(meta.pid, signal.SIGKILL)
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(group.actors[0].ready.remote(), timeout=60)
        restart_group(group)
        (new,) = group.metadata
        assert new.pid == spare_pid and group.incarnation == 1 and group.spares == [second]
        with host_channel(new.address, CREDENTIAL) as channel:
            info = worker_pb2_grpc.WorkerServiceStub(channel).Info(
                worker_pb2.InfoRequest(), timeout=10
            )
        assert info.pid == spare_pid and info.island == "west"
        # Promoted, it serves at the priority the killed host had (every thread); the spare
        # behind it is next in line now.
        assert ray.get(group.actors[0].niceness.remote(), timeout=30) == host_nice
        wait_nice(second, host_nice)
        group.prepare_spares()  # the next one, behind `second`
        assert [k for k, _ in group.spare_sets] == [2, 3]
        attached, fresh = attach_or_start(spec, CREDENTIAL, spares=True)
        assert not fresh and attached.metadata == group.metadata
        assert [k for k, _ in attached.spare_sets] == [2, 3] and attached.next_incarnation == 4
    finally:
        group.shutdown()


def test_unplaceable_island_fails_fast_naming_the_resource(ray_cluster) -> None:
    group = IslandHostGroup(IslandSpec("nowhere"), CREDENTIAL, placement_timeout_s=3)
    started = time.monotonic()
    with pytest.raises(IslandPlacementError, match="island_nowhere"):
        group.start()
    assert time.monotonic() - started < 20
    assert group.actors == []
    with pytest.raises(ValueError):  # the failed host's name is free again
        ray.get_actor("island-nowhere-host-0", namespace="pathways_lite")


def test_two_host_island_joins_one_jax_runtime(duo: IslandHostGroup) -> None:
    checks = duo.execute("collective_check")
    assert [c["process_index"] for c in checks] == [0, 1]
    for c in checks:
        assert c["device_count"] == 4 and c["local_device_count"] == 2
        assert c["process_count"] == 2
        assert c["psum"] == 1 + 2 + 3 + 4  # each device contributes its global index + 1
    metas = duo.metadata
    assert [m.island_device_count for m in metas] == [4, 4]
    assert {d.process_index for d in metas[1].devices} == {1}
    assert metas[0].pid != metas[1].pid


def test_island_host_serves_health_info_and_a_sharded_step(duo: IslandHostGroup) -> None:
    channels = [host_channel(m.address, CREDENTIAL) for m in duo.metadata]
    try:
        for channel, meta in zip(channels, duo.metadata, strict=True):
            health = health_pb2_grpc.HealthStub(channel)
            reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            info = worker_pb2_grpc.WorkerServiceStub(channel).Info(worker_pb2.InfoRequest())
            assert info.wire_version.version == WORKER_WIRE_VERSION
            assert (info.port, info.host_index, info.num_hosts) == (meta.port, meta.host_index, 2)
        stubs = [worker_pb2_grpc.WorkerServiceStub(c) for c in channels]
        request = worker_pb2.LoadJobRequest(
            job_id="probe",
            epoch=1,
            model=common_pb2.ModelConfig(preset=PROBE_PRESET),
            mesh=common_pb2.MeshShape(data=2, model=2),
            data_hash=PROBE_DATA_HASH,
            global_batch=8,
            seq_len=1,
            num_islands=1,
        )
        bad = worker_pb2.LoadJobRequest()
        bad.CopyFrom(request)
        bad.mesh.model = 1  # 2 x 1 does not cover the island's 4 devices
        with pytest.raises(grpc.RpcError) as err:
            stubs[0].LoadJob(bad, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        # Every host of the island runs the same SPMD program: send to all at once.
        def on_all(method: str, req):
            futures = [getattr(s, method).future(req, timeout=120) for s in stubs]
            return [f.result() for f in futures]

        assert all(r.loaded for r in on_all("LoadJob", request))
        for k in range(2):
            replies = on_all(
                "RunStep",
                worker_pb2.RunStepRequest(job_id="probe", step=k, island_seq=k, epoch=1),
            )
            assert replies[0].loss == replies[1].loss > 0
            assert list(replies[0].example_ids) == list(range(8 * k, 8 * k + 8))
        digests = on_all("ParamDigest", worker_pb2.ParamDigestRequest(job_id="probe"))
        assert digests[0].sha256 == digests[1].sha256 and digests[0].steps_applied == 2
        assert all(
            r.unloaded
            for r in on_all("UnloadJob", worker_pb2.UnloadJobRequest(job_id="probe", epoch=1))
        )
    finally:
        for c in channels:
            c.close()
