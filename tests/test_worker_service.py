"""The worker gRPC service: status codes, ordering rules, idempotency, health, reflection, fuzz.

Each test gets a fresh in-process server (real grpc.aio on loopback, real JAX on the test
process's 4 CPU devices) running the linear probe job.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator

import grpc
import jax
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from pathways_lite.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from pathways_lite.workers.exchange_service import SERVICE_NAME as EXCHANGE_SERVICE_NAME
from pathways_lite.workers.host import WORKER_WIRE_VERSION, HostMetadata
from pathways_lite.workers.probe_runtime import PROBE_DATA_HASH, PROBE_PRESET
from pathways_lite.workers.service import SERVICE_NAME, BackgroundServer, WorkerServicer

pytestmark = pytest.mark.timeout(120)

BUDGET = 16 * 1024 * 1024


class Host:
    """A running in-process worker service and a stub to it."""

    def __init__(self) -> None:
        devices = jax.devices()
        meta = HostMetadata.in_process("test", devices, BUDGET)
        self.server = BackgroundServer(WorkerServicer(meta, devices), "127.0.0.1", 0)
        self.port = self.server.start()
        self.address = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = worker_pb2_grpc.WorkerServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.server.stop()


@pytest.fixture
def host() -> Iterator[Host]:
    h = Host()
    try:
        yield h
    finally:
        h.close()


def load_request(job_id: str = "job-a", **kw) -> worker_pb2.LoadJobRequest:
    req = worker_pb2.LoadJobRequest(
        job_id=job_id,
        generation=kw.pop("generation", 0),
        epoch=kw.pop("epoch", 1),
        model=common_pb2.ModelConfig(preset=kw.pop("preset", PROBE_PRESET)),
        mesh=common_pb2.MeshShape(**kw.pop("mesh", {"data": 2, "model": 2})),
        data=common_pb2.DataSpec(source="synthetic"),
        data_hash=kw.pop("data_hash", PROBE_DATA_HASH),
        seed=kw.pop("seed", 3),
        global_batch=kw.pop("global_batch", 8),
        seq_len=1,
        island_index=kw.pop("island_index", 0),
        num_islands=kw.pop("num_islands", 1),
        dry_run=kw.pop("dry_run", False),
    )
    req.model.overrides.update(kw.pop("overrides", {"d_in": 8, "d_out": 8}))
    assert not kw, kw
    return req


def step(stub, job_id: str, step_: int, seq: int, epoch: int = 1, generation: int = 0):
    return stub.RunStep(
        worker_pb2.RunStepRequest(
            job_id=job_id, generation=generation, step=step_, island_seq=seq, epoch=epoch
        ),
        timeout=60,
    )


def code_and_message(call, *args) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call(*args, timeout=60)
    return err.value.code(), err.value.details()


def test_info_reports_metadata_and_wire_version(host: Host) -> None:
    info = host.stub.Info(worker_pb2.InfoRequest(), timeout=10)
    assert info.port == host.port and info.address == host.address
    assert info.pid == os.getpid()
    assert info.wire_version.version == WORKER_WIRE_VERSION
    assert len(info.devices) == info.island_device_count == 4
    assert info.memory_budget_bytes_per_device == BUDGET
    assert info.peak_flops_per_device == 0  # CPU devices: the controller measures the machine


def test_dry_run_returns_memory_analysis_and_keeps_nothing(host: Host) -> None:
    reply = host.stub.LoadJob(load_request(dry_run=True), timeout=60)
    assert not reply.loaded
    assert reply.memory.argument_bytes > 0
    assert reply.memory.total_bytes > 0
    assert 0 < reply.estimate_bytes_per_device <= reply.budget_bytes_per_device == BUDGET
    assert host.stub.Info(worker_pb2.InfoRequest()).loaded_jobs == []
    code, _ = code_and_message(
        host.stub.RunStep, worker_pb2.RunStepRequest(job_id="job-a", epoch=1)
    )
    assert code == grpc.StatusCode.NOT_FOUND


def test_bad_loads_get_their_status_and_the_host_keeps_serving(host: Host) -> None:
    cases = [
        (load_request(mesh={"data": 3, "model": 1}), grpc.StatusCode.INVALID_ARGUMENT, "3"),
        (load_request(job_id="bad id!"), grpc.StatusCode.INVALID_ARGUMENT, "bad id!"),
        (load_request(global_batch=7, num_islands=2), grpc.StatusCode.INVALID_ARGUMENT, "7"),
        (
            load_request(overrides={"d_in": 4096, "d_out": 4096}),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            str(BUDGET),
        ),
        (load_request(data_hash="deadbeef"), grpc.StatusCode.FAILED_PRECONDITION, "deadbeef"),
        # A PaLM preset is served now, and the probe's overrides are not PalmConfig fields.
        (load_request(preset="palm-tiny"), grpc.StatusCode.INVALID_ARGUMENT, "d_in"),
        (load_request(preset="gpt-9"), grpc.StatusCode.INVALID_ARGUMENT, "gpt-9"),
        (load_request(overrides={"width": 3}), grpc.StatusCode.INVALID_ARGUMENT, "width"),
    ]
    for request, want, named in cases:
        code, message = code_and_message(host.stub.LoadJob, request)
        assert code == want, (request, message)
        assert named in message, message
    info = host.stub.Info(worker_pb2.InfoRequest(), timeout=10)
    assert info.loaded_jobs == []  # nothing was allocated for a refused job
    assert host.stub.LoadJob(load_request(), timeout=60).loaded


def test_unknown_job_is_not_found(host: Host) -> None:
    code, message = code_and_message(
        host.stub.RunStep, worker_pb2.RunStepRequest(job_id="nope", epoch=1)
    )
    assert code == grpc.StatusCode.NOT_FOUND and "'nope'" in message
    code, _ = code_and_message(host.stub.ParamDigest, worker_pb2.ParamDigestRequest(job_id="x"))
    assert code == grpc.StatusCode.NOT_FOUND
    assert not host.stub.UnloadJob(worker_pb2.UnloadJobRequest(job_id="x", epoch=1)).unloaded


def test_an_unload_of_an_older_generation_leaves_a_newer_load(host: Host) -> None:
    """An unload naming a generation (sent for state an earlier controller left) drops only
    that generation or an older one: a newer load of the job (placed back on the island
    meanwhile) stays loaded and steps. An unload naming none drops whatever is loaded."""
    host.stub.LoadJob(load_request(generation=2), timeout=60)
    older = worker_pb2.UnloadJobRequest(job_id="job-a", epoch=1, generation=1)
    assert not host.stub.UnloadJob(older, timeout=30).unloaded
    assert list(host.stub.Info(worker_pb2.InfoRequest(), timeout=10).loaded_jobs) == ["job-a"]
    assert step(host.stub, "job-a", 0, 0, generation=2).loss > 0
    same = worker_pb2.UnloadJobRequest(job_id="job-a", epoch=1, generation=2)
    assert host.stub.UnloadJob(same, timeout=30).unloaded
    host.stub.LoadJob(load_request(generation=3), timeout=60)
    assert host.stub.UnloadJob(worker_pb2.UnloadJobRequest(job_id="job-a", epoch=1)).unloaded
    assert list(host.stub.Info(worker_pb2.InfoRequest(), timeout=10).loaded_jobs) == []


def test_run_step_is_idempotent_on_job_generation_step(host: Host) -> None:
    host.stub.LoadJob(load_request(), timeout=60)
    first = step(host.stub, "job-a", 0, 0)
    assert not first.replayed
    digest = host.stub.ParamDigest(worker_pb2.ParamDigestRequest(job_id="job-a"))
    retry = step(host.stub, "job-a", 0, 0)
    assert retry.replayed
    assert retry.loss == first.loss and retry.timings == first.timings
    # A retry does not run the step again: the parameters are untouched.
    again = host.stub.ParamDigest(worker_pb2.ParamDigestRequest(job_id="job-a"))
    assert again.sha256 == digest.sha256 and again.steps_applied == 1
    second = step(host.stub, "job-a", 1, 1)
    after = host.stub.ParamDigest(worker_pb2.ParamDigestRequest(job_id="job-a"))
    assert after.sha256 != digest.sha256 and after.steps_applied == 2
    assert list(second.example_ids) == list(range(8, 16))
    t = second.timings
    assert t.received_unix_ns <= t.start_unix_ns <= t.end_unix_ns


def test_island_slice_of_example_ids(host: Host) -> None:
    host.stub.LoadJob(load_request(global_batch=8, num_islands=2, island_index=1), timeout=60)
    reply = step(host.stub, "job-a", 3, 0)
    assert list(reply.example_ids) == [28, 29, 30, 31]  # step 3, second half of 8


def test_sequence_gap_is_rejected_until_skipped(host: Host) -> None:
    host.stub.LoadJob(load_request(), timeout=60)
    step(host.stub, "job-a", 0, 0)
    code, message = code_and_message(
        host.stub.RunStep,
        worker_pb2.RunStepRequest(job_id="job-a", step=2, island_seq=2, epoch=1),
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "island_seq=2" in message and "expected island_seq=1" in message
    skip = host.stub.SkipSeq(worker_pb2.SkipSeqRequest(island_seq=1, epoch=1, reason="test"))
    assert skip.next_island_seq == 2 and not skip.already_filled
    assert host.stub.SkipSeq(worker_pb2.SkipSeqRequest(island_seq=1, epoch=1)).already_filled
    code, _ = code_and_message(host.stub.SkipSeq, worker_pb2.SkipSeqRequest(island_seq=5, epoch=1))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert step(host.stub, "job-a", 2, 2).step == 2
    # A used number with a new step is refused, not silently re-run.
    code, message = code_and_message(
        host.stub.RunStep,
        worker_pb2.RunStepRequest(job_id="job-a", step=7, island_seq=1, epoch=1),
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "already used" in message


def test_stale_epoch_is_rejected_and_a_new_epoch_restarts_the_sequence(host: Host) -> None:
    host.stub.LoadJob(load_request(epoch=5), timeout=60)
    step(host.stub, "job-a", 0, 0, epoch=5)
    for call, request in [
        (host.stub.RunStep, worker_pb2.RunStepRequest(job_id="job-a", step=1, epoch=4)),
        (host.stub.SkipSeq, worker_pb2.SkipSeqRequest(island_seq=1, epoch=4)),
        (host.stub.UnloadJob, worker_pb2.UnloadJobRequest(job_id="job-a", epoch=4)),
        (host.stub.LoadJob, load_request(job_id="job-b", epoch=4)),
    ]:
        code, message = code_and_message(call, request)
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "epoch=4" in message and "5" in message
    reply = step(host.stub, "job-a", 1, 0, epoch=6)  # new controller epoch: sequence from 0
    assert reply.island_seq == 0
    info = host.stub.Info(worker_pb2.InfoRequest())
    assert info.newest_epoch == 6 and info.next_island_seq == 1


def test_meshes_give_the_same_losses(host: Host) -> None:
    losses = {}
    for i, (d, m) in enumerate([(1, 4), (2, 2), (4, 1)]):
        job = f"mesh-{d}x{m}"
        host.stub.LoadJob(load_request(job, mesh={"data": d, "model": m}, epoch=10 + i), timeout=60)
        losses[(d, m)] = [step(host.stub, job, k, k, epoch=10 + i).loss for k in range(4)]
        assert host.stub.UnloadJob(worker_pb2.UnloadJobRequest(job_id=job, epoch=10 + i))
    ref = losses[(1, 4)]
    for got in losses.values():
        assert max(abs(a - b) / abs(b) for a, b in zip(got, ref, strict=True)) <= 1e-5


def test_info_and_health_answer_while_a_step_runs(host: Host) -> None:
    big = {"d_in": 512, "d_out": 512}
    host.stub.LoadJob(load_request(overrides=big, global_batch=4096), timeout=60)
    health = health_pb2_grpc.HealthStub(host.channel)
    future = host.stub.RunStep.future(
        worker_pb2.RunStepRequest(job_id="job-a", step=0, island_seq=0, epoch=1), timeout=60
    )
    seen_running = False
    while not future.done():
        info = host.stub.Info(worker_pb2.InfoRequest(), timeout=5)
        seen_running |= info.running_job == "job-a"
        status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    assert future.result().loss > 0
    assert seen_running, "Info never observed the running step"


def test_health_and_reflection_with_standard_clients(host: Host) -> None:
    health = health_pb2_grpc.HealthStub(host.channel)
    for service in ("", SERVICE_NAME, EXCHANGE_SERVICE_NAME):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection_db = ProtoReflectionDescriptorDatabase(host.channel)
    assert {SERVICE_NAME, EXCHANGE_SERVICE_NAME} <= set(reflection_db.get_services())
    pool = descriptor_pool.DescriptorPool(reflection_db)
    service = pool.FindServiceByName(SERVICE_NAME)
    assert {m.name for m in service.methods} >= {"LoadJob", "RunStep", "SkipSeq", "Info"}


def test_random_bytes_to_every_rpc_never_crash_the_host(host: Host) -> None:
    host.stub.LoadJob(load_request(), timeout=60)
    rng = random.Random(0)
    # Both services the host serves: the controller's WorkerService and the peers'
    # ExchangeService.
    methods = [
        (service.full_name, method.name)
        for service in worker_pb2.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    ]
    assert (SERVICE_NAME, "RunStep") in methods and (
        EXCHANGE_SERVICE_NAME,
        "ExchangeGradients",
    ) in methods
    codes = set()
    for service_name, method_name in methods:
        call = host.channel.unary_unary(f"/{service_name}/{method_name}")
        for _ in range(40):
            payload = rng.randbytes(rng.randint(0, 200))
            try:
                call(payload, timeout=30)
                codes.add(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                codes.add(e.code())
                assert e.code() != grpc.StatusCode.UNAVAILABLE, e.details()
    assert grpc.StatusCode.INTERNAL in codes or grpc.StatusCode.INVALID_ARGUMENT in codes
    start = time.monotonic()
    info = host.stub.Info(worker_pb2.InfoRequest(), timeout=10)
    assert info.port == host.port and time.monotonic() - start < 10
