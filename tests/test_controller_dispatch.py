"""The controller's dispatcher: slices of steps streamed with a real window in flight, proven
by the hosts' clocks.

A real grpc.aio worker service runs in this process (the probe job on 2 of the test process's
CPU devices); the dispatcher drives it over gRPC exactly as the controller does.
"""

from __future__ import annotations

import asyncio

import grpc
import jax
import pytest

from pathways_lite.controller.dispatch import Dispatcher, DispatchError
from pathways_lite.controller.islands import Island, WireVersionError, connect_host
from pathways_lite.controller.program import HostLoad, StepProgram, placement_request
from pathways_lite.v1 import common_pb2, worker_pb2
from pathways_lite.workers.host import HostMetadata
from pathways_lite.workers.probe_runtime import PROBE_DATA_HASH, PROBE_PRESET
from pathways_lite.workers.service import BackgroundServer, WorkerServicer

pytestmark = pytest.mark.timeout(120)

DEVICES = 2
STEPS = 12


@pytest.fixture
def host():
    devices = jax.devices()[:DEVICES]
    meta = HostMetadata.in_process("probe", devices, 256 * 1024 * 1024)
    server = BackgroundServer(WorkerServicer(meta, devices), "127.0.0.1", 0)
    port = server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop()


def probe_program(job_id: str, steps: int = STEPS, d: int = 1024, batch: int = 128) -> StepProgram:
    """A probe job heavy enough (tens of ms a step) for the network to be faster than a step."""

    def load(at: HostLoad) -> worker_pb2.LoadJobRequest:
        request = placement_request(at)
        request.model.CopyFrom(common_pb2.ModelConfig(preset=PROBE_PRESET))
        request.mesh.CopyFrom(common_pb2.MeshShape(data=1, model=DEVICES))
        request.data_hash = PROBE_DATA_HASH
        request.global_batch = batch
        request.seq_len = 1
        request.model.overrides.update({"d_in": d, "d_out": d, "learning_rate": 1e-4})
        return request

    return StepProgram(job_id=job_id, generation=0, steps=steps, tokens_per_step=batch, load=load)


async def run_probe(address: str, window: int, job_id: str, epoch: int):
    island = Island("probe", [await connect_host(address)])
    try:
        dispatcher = Dispatcher(epoch, window=window)
        program = probe_program(job_id)
        await dispatcher.load(program, [island])
        reports = []
        await dispatcher.run(program, [island], on_step=reports.append)
        await dispatcher.unload(job_id, [island])
        return reports
    finally:
        await island.close()


def test_window_sends_the_next_step_before_the_previous_one_ends(host: str) -> None:
    reports = asyncio.run(run_probe(host, window=2, job_id="windowed", epoch=1))
    assert [r.step for r in reports] == list(range(STEPS))
    timings = [r.hosts[0].reply.timings for r in reports]
    # The host's own clock: RunStep(k + 1) was received before step k's compute ended.
    overlapped = [
        k for k in range(STEPS - 1) if timings[k + 1].received_unix_ns < timings[k].end_unix_ns
    ]
    assert len(overlapped) >= STEPS - 2, (overlapped, timings)
    # ... and it still ran after step k: one step at a time, in order.
    for k in range(STEPS - 1):
        assert timings[k + 1].start_unix_ns >= timings[k].end_unix_ns
    assert [r.hosts[0].reply.island_seq for r in reports] == list(range(STEPS))


def test_window_of_one_is_synchronous_and_gives_the_same_losses(host: str) -> None:
    windowed = asyncio.run(run_probe(host, window=2, job_id="a", epoch=1))
    synchronous = asyncio.run(run_probe(host, window=1, job_id="b", epoch=2))
    timings = [r.hosts[0].reply.timings for r in synchronous]
    # One slice at a time: a slice (its steps share the time it was received) arrives only
    # after the previous slice's last step ended.
    for k in range(STEPS - 1):
        if timings[k + 1].received_unix_ns != timings[k].received_unix_ns:
            assert timings[k + 1].received_unix_ns >= timings[k].end_unix_ns
    assert [r.loss for r in windowed] == [r.loss for r in synchronous]


def test_a_seq_ahead_waits_for_the_missing_one_and_a_true_gap_is_rejected(host: str) -> None:
    async def main() -> None:
        island = Island("probe", [await connect_host(host)])
        stub = island.hosts[0].stub
        program = probe_program("gap", steps=3)
        await Dispatcher(1).load(program, [island])

        def step(k: int, seq: int):
            return stub.RunStep(
                worker_pb2.RunStepRequest(job_id="gap", step=k, island_seq=seq, epoch=1),
                timeout=30,
            )

        # seq 1 arrives first; seq 0 a moment later: both run, in seq order.
        ahead = asyncio.ensure_future(step(1, 1))
        await asyncio.sleep(0.3)
        first = await step(0, 0)
        second = await ahead
        assert second.timings.start_unix_ns >= first.timings.end_unix_ns
        assert second.timings.received_unix_ns < first.timings.received_unix_ns
        # seq 3 while seq 2 never comes: rejected after the short wait.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await step(2, 3)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "island_seq=3" in err.value.details()
        await island.close()

    asyncio.run(main())


def test_a_failing_step_raises_dispatch_error_and_fills_the_gap(host: str) -> None:
    async def main() -> None:
        island = Island("probe", [await connect_host(host)])
        dispatcher = Dispatcher(1, window=2)
        program = probe_program("fails", steps=4)
        # Never loaded: every RunStep is NOT_FOUND.
        with pytest.raises(DispatchError) as err:
            await dispatcher.run(program, [island])
        assert err.value.reason == "step_failed"
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        info = await island.hosts[0].stub.Info(worker_pb2.InfoRequest())
        assert info.next_island_seq == island.next_seq  # every number taken was used or filled
        await island.close()

    asyncio.run(main())


def test_wire_version_mismatch_is_a_clear_error(host: str) -> None:
    async def main() -> None:
        with pytest.raises(WireVersionError, match="wire version"):
            await connect_host(host, wire_version=999)

    asyncio.run(main())


def test_exchange_overlap_auto_is_on_only_where_every_island_has_accelerators(host: str) -> None:
    from pathways_lite.controller.dispatch import overlap_for

    async def cpu_islands() -> list[Island]:
        return [Island("cpu", [await connect_host(host)])]

    islands = asyncio.run(cpu_islands())
    try:
        # A real host of this process: CPU devices, so "auto" keeps the exchange after the
        # backward pass; "on" and "off" are what they say.
        assert {d.platform for d in islands[0].hosts[0].info.devices} == {"cpu"}
        assert not overlap_for("auto", islands)
        assert overlap_for("on", islands) and not overlap_for("off", islands)
        assert not overlap_for("auto", [])
    finally:
        asyncio.run(islands[0].close())
    with pytest.raises(ValueError, match=r"exchange_overlap='sometimes' must be one of auto"):
        Dispatcher(1, exchange_overlap="sometimes")
