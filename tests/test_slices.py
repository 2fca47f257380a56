"""Step slices: K steps per RunSlice stream, sized by measured step time, cut at checkpoints,
stopped within one slice plus the lead, and the island_seq numbers of steps not run skipped.

A real grpc.aio worker service runs in this process (the probe job on one CPU device); the
controller's Dispatcher drives it over gRPC exactly as the controller does. The store's batch
of step rows and the scheduler's slice slots are exercised on their own objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import jax
import pytest

from pathways_lite.controller.dispatch import Dispatcher, DispatchError, _HostStream, _Slice
from pathways_lite.controller.islands import Island, connect_host
from pathways_lite.controller.program import HostLoad, StepProgram, placement_request
from pathways_lite.controller.scheduler import Scheduler
from pathways_lite.controller.store import JobStore
from pathways_lite.controller.store_progress import MetricConflictError
from pathways_lite.v1 import common_pb2, controller_pb2, worker_pb2
from pathways_lite.workers.host import HostMetadata
from pathways_lite.workers.ordering import SEQ_GAP_WAIT_S
from pathways_lite.workers.probe_runtime import PROBE_DATA_HASH, PROBE_PRESET
from pathways_lite.workers.service import WorkerServicer
from pathways_lite.workers.serving import BackgroundServer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def host():
    devices = jax.devices()[:1]
    meta = HostMetadata.in_process("slices", devices, 256 * 1024 * 1024)
    server = BackgroundServer(WorkerServicer(meta, devices), "127.0.0.1", 0)
    port = server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop()


def program(job_id: str, steps: int, d: int = 8, **kw) -> StepProgram:
    def load(at: HostLoad) -> worker_pb2.LoadJobRequest:
        request = placement_request(at)
        request.model.CopyFrom(common_pb2.ModelConfig(preset=PROBE_PRESET))
        request.mesh.CopyFrom(common_pb2.MeshShape(data=1, model=1))
        request.data_hash = PROBE_DATA_HASH
        request.global_batch = 8
        request.seq_len = 1
        request.model.overrides.update({"d_in": d, "d_out": d, "learning_rate": 1e-3})
        return request

    return StepProgram(job_id=job_id, generation=0, steps=steps, tokens_per_step=8, load=load, **kw)


async def run(address: str, job_id: str, epoch: int, steps: int, **dispatcher_kw):
    island = Island("slices", [await connect_host(address)])
    try:
        dispatcher = Dispatcher(epoch, **dispatcher_kw)
        prog = program(job_id, steps)
        await dispatcher.load(prog, [island])
        reports = []
        await dispatcher.run(prog, [island], on_step=reports.append)
        await dispatcher.unload(job_id, [island])
        return reports
    finally:
        await island.close()


def slices_of(reports) -> list[list[int]]:
    """The steps each RunSlice carried (a slice's steps share the time it was received)."""
    groups: dict[int, list[int]] = {}
    for r in reports:
        groups.setdefault(r.hosts[0].reply.timings.received_unix_ns, []).append(r.step)
    return [groups[k] for k in sorted(groups)]


@contextlib.asynccontextmanager
async def _sim_island(**spec):
    """One simulated island host (workers/sim_host.py, real gRPC), connected; stopped after."""
    from pathways_lite.workers.sim_host import SimCluster, SimIsland, connect_islands

    sims = SimCluster([SimIsland(**spec)])
    (island,) = await connect_islands(await sims.start())
    try:
        yield sims, island
    finally:
        await island.close()
        await sims.stop()


@contextlib.asynccontextmanager
async def _running(dispatcher: Dispatcher, prog: StepProgram, island: Island, **run_kw):
    """`dispatcher.run` as a task, cancelled on the way out if it still runs."""
    run = asyncio.ensure_future(dispatcher.run(prog, [island], **run_kw))
    try:
        yield run
    finally:
        if not run.done():
            run.cancel()
        await asyncio.gather(run, return_exceptions=True)


@contextlib.asynccontextmanager
async def _cut_for_serving_at_5(island: Island, job_id: str, epoch: int):
    """A 30-step job running on `island` under a stride scheduler (shares by steps) that,
    when its step 5 is read, holds the island for serving and starts a cut of the job (as
    controller/serve_router.py's ServeArbiter.enter does). Yields (scheduler, the run, the
    steps read, the cut) once the cut has started."""
    scheduler = Scheduler([island.id], slots=2, share_by="steps")
    scheduler.join(job_id, [island.id], 1.0)
    dispatcher = Dispatcher(epoch, slice_s=0.1)
    prog = program(job_id, 30)
    await dispatcher.load(prog, [island])
    reports: list[int] = []
    cuts: list[asyncio.Future] = []

    def on_step(report) -> None:
        reports.append(report.step)
        if report.step == 5:
            scheduler.hold_for_serving(island.id, True)
            cuts.append(asyncio.ensure_future(dispatcher.cut(job_id)))

    async with _running(dispatcher, prog, island, on_step=on_step, gate=scheduler) as run:
        while not cuts:
            assert not run.done()
            await asyncio.sleep(0.01)
        yield scheduler, run, reports, cuts[0]


def test_trivial_steps_go_in_slices_of_many_steps_with_the_losses_of_one_step_each(host):
    sliced = asyncio.run(run(host, "sliced", 1, 300))
    one_by_one = asyncio.run(run(host, "single", 2, 300, slice_s=0.0))
    assert [r.step for r in sliced] == list(range(300))
    assert [r.hosts[0].reply.island_seq for r in sliced] == list(range(300))
    groups = slices_of(sliced)
    # The first slice has one step (the step time is not measured yet), then they grow.
    assert groups[0] == [0]
    assert max(len(g) for g in groups) >= 10, [len(g) for g in groups]
    assert all(g == list(range(g[0], g[0] + len(g))) for g in groups)
    assert all(len(g) == 1 for g in slices_of(one_by_one))
    # Per-step semantics are unchanged: the same losses step by step.
    assert [r.loss for r in sliced] == [r.loss for r in one_by_one]
    # One step at a time on the host, in order.
    timings = [r.hosts[0].reply.timings for r in sliced]
    assert all(timings[k + 1].start_unix_ns >= timings[k].end_unix_ns for k in range(299))


def test_a_slice_ends_at_the_next_checkpoint_and_at_the_end():
    dispatcher = Dispatcher(1, slice_s=0.05)
    dispatcher._learn("j", 0.001)  # 1 ms steps: 50 a slice
    prog = program("j", 120, checkpoint_every=30, checkpoint_dir="/nowhere")
    assert dispatcher.slice_steps(prog, 0, 0.0) == 30  # steps 0..29, checkpoint after 29
    assert dispatcher.slice_steps(prog, 30, 0.0) == 30
    assert dispatcher.slice_steps(prog, 100, 0.0) == 20  # to the end
    no_checkpoints = program("j", 120)
    assert dispatcher.slice_steps(no_checkpoints, 0, 0.0) == 50
    assert dispatcher.slice_steps(no_checkpoints, 100, 0.0) == 20
    # train.eval_every: a slice ends after every eval_every-th step (the evaluation runs
    # between the exact steps).
    evaluated = program("j", 120, eval_every=40)
    assert dispatcher.slice_steps(evaluated, 0, 0.0) == 40
    assert dispatcher.slice_steps(evaluated, 35, 0.0) == 5
    assert dispatcher.slice_steps(evaluated, 40, 0.0) == 40
    dispatcher._learn("k", 0.2)  # steps longer than a slice: one step each
    assert dispatcher.slice_steps(program("k", 120), 0, 0.0) == 1


def test_a_stop_takes_effect_within_one_slice_plus_the_lead(host):
    async def main() -> tuple[int, int, float]:
        island = Island("slices", [await connect_host(host)])
        dispatcher = Dispatcher(3, slice_s=0.05)
        prog = program("stopped", 1_000_000)
        await dispatcher.load(prog, [island])
        stop_at: list[float] = []
        ends: list[int] = []

        def on_step(report) -> None:
            ends.append(report.hosts[0].reply.timings.end_unix_ns)
            if len(ends) == 400:
                stop_at.append(time.time_ns())

        completed = await dispatcher.run(
            prog, [island], on_step=on_step, should_stop=lambda: bool(stop_at)
        )
        step_s = dispatcher._step_s["stopped"]
        await dispatcher.unload("stopped", [island])
        await island.close()
        # A slice is K = slice_s / step_s steps of the host's measured step time; the host
        # here shares this process's GIL, so a step takes longer on the wall than that.
        wall_per_step = (ends[-1] - ends[0]) / 1e9 / (len(ends) - 1)
        slice_and_lead_s = (dispatcher.slice_s + dispatcher.lead_s) * max(1, wall_per_step / step_s)
        return completed, (max(ends) - stop_at[0]), step_s, slice_and_lead_s

    completed, latency_ns, step_s, slice_and_lead_s = asyncio.run(main())
    assert 400 <= completed < 1_000_000
    # Within one slice plus the lead plus a step, with room for a slow machine.
    assert latency_ns / 1e9 <= slice_and_lead_s + step_s + 0.1, (
        latency_ns,
        step_s,
        slice_and_lead_s,
    )


def test_a_cancelled_slice_skips_the_island_seq_of_its_steps_not_run(host):
    async def main() -> None:
        island = Island("slices", [await connect_host(host)])
        stub = island.hosts[0].stub
        heavy = program("cut", 1000, d=512)
        await Dispatcher(4).load(heavy, [island])
        call = stub.RunSlice(
            worker_pb2.RunSliceRequest(
                job_id="cut", generation=0, epoch=4, first_step=0, count=200, first_island_seq=0
            ),
            timeout=60,
        )
        first = await _HostStream(call).next()
        assert first.step == 0
        call.cancel()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            info = await stub.Info(worker_pb2.InfoRequest())
            if info.next_island_seq == 200:
                break
            await asyncio.sleep(0.05)
        assert info.next_island_seq == 200
        ran = [
            e
            for e in (await stub.ExecutionLog(worker_pb2.ExecutionLogRequest())).entries
            if e.job_id == "cut" and e.epoch == 4
        ]
        assert 1 <= len(ran) < 200
        # The island goes on at the next number.
        after = stub.RunSlice(
            worker_pb2.RunSliceRequest(
                job_id="cut",
                generation=0,
                epoch=4,
                first_step=len(ran),
                count=2,
                first_island_seq=200,
            ),
            timeout=60,
        )
        replies = [r async for m in after for r in m.steps]
        assert [r.island_seq for r in replies] == [200, 201]
        await Dispatcher(4).unload("cut", [island])
        await island.close()

    asyncio.run(main())


def test_a_slice_with_a_bad_count_or_mismatched_steps_names_the_field(host):
    async def main() -> None:
        island = Island("slices", [await connect_host(host)])
        stub = island.hosts[0].stub
        for request, field in (
            (worker_pb2.RunSliceRequest(job_id="x", epoch=5, count=0), "count=0"),
            (
                worker_pb2.RunSliceRequest(
                    job_id="x",
                    epoch=5,
                    steps=[worker_pb2.RunStepRequest(job_id="y", epoch=5)],
                ),
                "steps[].job_id='y'",
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.RunSlice(request, timeout=10):
                    pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field in err.value.details()
        await island.close()

    asyncio.run(main())


def test_a_batch_of_step_rows_is_one_transaction_and_replays_are_no_ops(tmp_path):
    with JobStore(tmp_path / "jobs.db") as store:
        job = store.create_job(controller_pb2.JobSpec(name="b"), job_id="b")
        rows = [(k, 1.0 / (k + 1), 10.0, 0.001, None, None) for k in range(5)]
        assert store.record_metrics_batch(job.id, rows) == 5
        # The same steps again (a replayed slice) insert nothing; new ones after them do.
        assert (
            store.record_metrics_batch(job.id, rows[3:] + [(5, 0.1, 10.0, 0.001, 0.5, "{}")]) == 1
        )
        assert [m.step for m in store.metrics(job.id)] == list(range(6))
        with pytest.raises(MetricConflictError, match="out of order"):
            store.record_metrics_batch(job.id, [(7, 0.1, 1.0, 0.001, None, None)])
        with pytest.raises(MetricConflictError, match="recorded with loss"):
            store.record_metrics_batch(job.id, [(5, 0.2, 1.0, 0.001, None, None)])
        assert len(store.metrics(job.id)) == 6  # a refused batch writes nothing


def test_a_slot_granted_to_a_cancelled_asker_is_freed():
    async def main() -> None:
        sched = Scheduler(["island-0"], slots=1, share_by="steps")
        sched.join("a", ["island-0"], 1.0)
        sched.join("b", ["island-0"], 1.0)
        assert await sched.acquire("a", 10)  # a holds the only slot
        waiting = asyncio.ensure_future(sched.acquire("b", 10))
        await asyncio.sleep(0)
        sched.done("a", ["island-0"], 0.01, 10)  # granted to b ...
        waiting.cancel()  # ... which gave up before it ran
        with pytest.raises(asyncio.CancelledError):
            await waiting
        # The slot is free again: a gets it at once.
        assert await asyncio.wait_for(sched.acquire("a", 10), 1.0)
        # Slices are charged by their steps: a's pass advanced 10 per slice of 10.
        assert sched.passes()["a"] == pytest.approx(20.0)

    asyncio.run(main())


def test_an_abandoned_run_stops_within_a_step_and_leaves_no_gap(host):
    async def main() -> None:
        island = Island("slices", [await connect_host(host)])
        stub = island.hosts[0].stub
        # Long slices (1 s, well over the 0.2 s of slack below): cutting them short shows.
        dispatcher = Dispatcher(6, slice_s=1.0)
        prog = program("abandoned", 1_000_000, d=256)
        await dispatcher.load(prog, [island])
        cancel: list[int] = []
        reports = []

        def on_step(report) -> None:
            reports.append(report)
            if len(reports) == 150:
                cancel.append(time.time_ns())

        completed = await dispatcher.run(
            prog,
            [island],
            on_step=on_step,
            should_stop=lambda: bool(cancel),
            abandon=lambda: bool(cancel),
        )
        assert completed == 150
        assert max(len(g) for g in slices_of(reports)) > 10
        # Every island_seq handed out was run or skipped: the island's next job is not held.
        deadline = time.monotonic() + 10
        while (await stub.Info(worker_pb2.InfoRequest())).next_island_seq != island.next_seq:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        ran = [
            e
            for e in (await stub.ExecutionLog(worker_pb2.ExecutionLogRequest())).entries
            if e.job_id == "abandoned" and e.epoch == 6
        ]
        last_end = max(e.end_unix_ns for e in ran)
        step_s = dispatcher._step_s["abandoned"]
        # The host stopped after the step it was running (and one more at most in flight).
        # (+0.2 s: the host shares this process's GIL, on a busy 2-core machine.)
        assert (last_end - cancel[0]) / 1e9 <= 3 * step_s + 0.2, (last_end - cancel[0], step_s)
        # The job goes on from the host's last step (a few past the 150 the dispatcher had
        # read when it stopped: replies come coalesced, REPLY_HOLD_S).
        after = program("abandoned", len(ran) + 3, d=256, start_step=len(ran))
        assert await dispatcher.run(after, [island]) == 3
        await dispatcher.unload("abandoned", [island])
        await island.close()

    asyncio.run(main())


async def run_and_cancel(dispatcher, prog, islands, after: int):
    """Load and run `prog`, cancelling it (`Dispatcher.abandon`, as the controller's cancel
    does) 10 ms after its `after`-th step is read; returns (steps completed, steps read when
    the cancel came, the cancel's time, the run's end), times in ns."""
    await dispatcher.load(prog, islands)
    loop = asyncio.get_running_loop()
    reports: list = []
    cancel: list[tuple[int, int]] = []

    def cancel_now() -> None:
        cancel.append((len(reports), time.time_ns()))
        dispatcher.abandon(prog.job_id)

    def on_step(report) -> None:
        reports.append(report)
        if len(reports) == after:
            loop.call_later(0.01, cancel_now)

    completed = await dispatcher.run(
        prog,
        islands,
        on_step=on_step,
        should_stop=lambda: bool(cancel),
        abandon=lambda: bool(cancel),
    )
    assert completed == len(reports)
    return completed, *cancel[0], time.time_ns()


def test_an_abandon_stops_every_host_of_a_two_host_island_at_one_step():
    """The hosts of a multi-host island run each step as one XLA program: an abandon (a
    cancel) must stop them at the same step, whichever is ahead, or one is left in a
    collective its peer never joins. Cancelled streams reach each host at its own moment;
    the cut (two CutSlice phases) stops both at one step. Two simulated hosts form the
    island, one twice as fast as the other (magnifying the up-to-a-step skew of real
    hosts): with the streams cancelled, each stopped where it was and their steps differ."""
    from pathways_lite.workers.sim_host import SimCluster, SimIsland

    async def main() -> None:
        sims = SimCluster([SimIsland("fast", step_s=0.04), SimIsland("slow", step_s=0.08)])
        addresses = await sims.start()
        hosts = [await connect_host(addresses[name]) for name in ("fast", "slow")]
        island = Island("two-host", hosts)
        try:
            dispatcher = Dispatcher(4, slice_s=0.25)
            prog = program("one-program", 1000)
            # A few slices in: the fast host is ahead.
            completed, _, cancel_ns, returned_ns = await run_and_cancel(
                dispatcher, prog, [island], 12
            )
            await asyncio.sleep(0.3)  # a step a host might (wrongly) still run ends
            ran = []
            for host in hosts:
                log = await host.stub.ExecutionLog(worker_pb2.ExecutionLogRequest())
                ran.append([e for e in log.entries if e.job_id == "one-program"])
                info = await host.stub.Info(worker_pb2.InfoRequest())
                # Every island_seq handed out was run or skipped: the island is not held.
                assert info.next_island_seq == island.next_seq, (info, island.next_seq)
            fast, slow = ([e.step for e in entries] for entries in ran)
            # Both hosts ran the same steps, and the controller read every one of them.
            assert fast == slow == list(range(completed)), (fast, slow, completed)
            assert completed > 12
            # Within the window's slices (two of 0.25 s at the slow host's pace) and margin.
            assert (returned_ns - cancel_ns) / 1e9 < 1.5, returned_ns - cancel_ns
            assert max(e.start_unix_ns for entries in ran for e in entries) < returned_ns
        finally:
            await island.close()
            await sims.stop()

    asyncio.run(main())


def test_an_abandon_by_cut_gives_up_on_hosts_that_stop_answering(monkeypatch):
    """A cut's hosts answer CutSlice on their event loops even while a step is stuck; a run
    abandoned by a cut that then reads nothing for ABANDON_GRACE_S cancels its streams and
    ends, rather than keeping the cancelled job on its islands until the streams' deadline
    (here a step of 60 s stands for a wedged collective)."""
    from pathways_lite.controller import dispatch
    from pathways_lite.workers.sim_host import SimCluster, SimIsland

    monkeypatch.setattr(dispatch, "ABANDON_GRACE_S", 0.5)

    async def main() -> None:
        sims = SimCluster([SimIsland("a", step_s=60.0), SimIsland("b", step_s=60.0)])
        addresses = await sims.start()
        island = Island("stuck", [await connect_host(a) for a in addresses.values()])
        try:
            dispatcher = Dispatcher(5)
            prog = program("stuck", 10)
            await dispatcher.load(prog, [island])
            cancel: list[float] = []

            def cancel_now() -> None:
                cancel.append(time.monotonic())
                dispatcher.abandon("stuck")

            asyncio.get_running_loop().call_later(0.3, cancel_now)
            completed = await asyncio.wait_for(
                dispatcher.run(
                    prog,
                    [island],
                    should_stop=lambda: bool(cancel),
                    abandon=lambda: bool(cancel),
                ),
                30,
            )
            assert completed == 0
            assert time.monotonic() - cancel[0] < 5
        finally:
            await island.close()
            await sims.stop()

    asyncio.run(main())


class _FailingGate:
    """A gate whose grant raises (a scheduler bug, a store error)."""

    async def acquire(self, job_id: str, steps: int = 1) -> bool:
        raise RuntimeError("the scheduler broke")

    def done(self, job_id, islands, step_s, steps=1) -> None:
        pass

    def refund(self, job_id, islands) -> None:
        pass


def test_an_abandon_cuts_the_slices_in_flight_at_once_not_at_the_next_reply():
    """`Dispatcher.abandon` (a cancel) cancels the streams while the run waits for a reply:
    no step after it is read, and the host stops after the step it was running (before, the
    cut waited for the next reply: up to two REPLY_HOLD_S, 50-60 ms, on trivial steps)."""

    step_s = 0.3

    async def main() -> None:
        async with _sim_island(name="abandon", step_s=step_s) as (_, island):
            dispatcher = Dispatcher(3, slice_s=10.0)
            prog = program("abandon-now", 1000)
            # Mid-step: the next reply is ~0.29 s away.
            completed, read, cancel_ns, returned_ns = await run_and_cancel(
                dispatcher, prog, [island], 4
            )
            assert completed == read == 4
            # The run ended before the step in progress did (it did not wait for its reply).
            assert (returned_ns - cancel_ns) / 1e9 < step_s / 2, returned_ns - cancel_ns
            stub = island.hosts[0].stub
            deadline = time.monotonic() + 10
            while (await stub.Info(worker_pb2.InfoRequest())).next_island_seq != island.next_seq:
                assert time.monotonic() < deadline, "a number of the cut slice was not skipped"
                await asyncio.sleep(0.02)
            await asyncio.sleep(2 * step_s)  # the step in progress ends
            ran = [
                e
                for e in (await stub.ExecutionLog(worker_pb2.ExecutionLogRequest())).entries
                if e.job_id == "abandon-now"
            ]
            # The step in progress completed; none started after the abandon.
            assert len(ran) == 5, [e.step for e in ran]
            assert max(e.start_unix_ns for e in ran) < cancel_ns

    asyncio.run(main())


def test_an_error_of_the_gate_fails_the_run_rather_than_ending_it_as_completed(host):
    async def main() -> None:
        island = Island("slices", [await connect_host(host)])
        try:
            with pytest.raises(RuntimeError, match="the scheduler broke"):
                await Dispatcher(7).run(program("gate-error", 10), [island], gate=_FailingGate())
        finally:
            await island.close()

    asyncio.run(main())


def test_a_dead_island_fails_the_step_as_unavailable_and_frees_its_slot(host):
    """DeathWatch closes a dead island's channels: the reads in flight fail UNAVAILABLE (not
    a controller stop), and a slice granted afterwards is not sent and frees its slot."""

    async def main() -> None:
        island = Island("slices", [await connect_host(host)])
        dispatcher = Dispatcher(8, slice_s=0.05)
        prog = program("dies", 1_000_000)
        await dispatcher.load(prog, [island])
        scheduler = Scheduler(["slices"], slots=2, share_by="steps")
        scheduler.join("dies", ["slices"], 1.0)
        reports = []

        async def on_step(report) -> None:
            reports.append(report)
            if len(reports) == 50:
                await island.host_died(island.generation, "test: the host died")

        with pytest.raises(DispatchError) as failed:
            await dispatcher.run(prog, [island], on_step=on_step, gate=scheduler)
        assert failed.value.code == grpc.StatusCode.UNAVAILABLE, failed.value
        # Every slot was freed: another job on the island gets them at once.
        scheduler.leave("dies")
        assert scheduler._inflight["slices"] == 0
        scheduler.join("next", ["slices"], 1.0)
        assert await asyncio.wait_for(scheduler.acquire("next", 1), 5)
        assert await asyncio.wait_for(scheduler.acquire("next", 1), 5)

    asyncio.run(main())


def test_a_slice_queued_behind_another_waits_longer_than_the_gap_wait(host):
    """A slice whose island_seq numbers come after a slice still queued (another job's, an
    Evaluate holding the device) waits while its stream lives, not SEQ_GAP_WAIT_S."""

    async def main() -> None:
        island = Island("slices", [await connect_host(host)])
        stub = island.hosts[0].stub
        await Dispatcher(9).load(program("queued", 10), [island])
        await stub.Info(worker_pb2.InfoRequest())
        call = stub.RunSlice(
            worker_pb2.RunSliceRequest(
                job_id="queued", generation=0, epoch=9, first_step=0, count=2, first_island_seq=1
            ),
            timeout=60,
        )
        await asyncio.sleep(SEQ_GAP_WAIT_S + 1.0)  # island_seq 0 is late
        await stub.SkipSeq(worker_pb2.SkipSeqRequest(island_seq=0, epoch=9, reason="late"))
        replies = [r async for m in call for r in m.steps]
        assert [(r.step, r.island_seq) for r in replies] == [(0, 1), (1, 2)]
        await Dispatcher(9).unload("queued", [island])
        await island.close()

    asyncio.run(main())


def test_a_cancelled_slice_skips_only_its_own_numbers_behind_another_jobs_slice(host):
    """Job a's slice holds island_seq 0..29 and runs them one at a time; job b's slice
    (30..39) was cancelled before it arrived. Filling b's gap skips 30..39 when their turn
    comes, never a's numbers still to run."""

    async def main() -> None:
        island = Island("slices", [await connect_host(host)])
        stub = island.hosts[0].stub
        dispatcher = Dispatcher(10)
        await dispatcher.load(program("a", 100, d=512), [island])
        a = stub.RunSlice(
            worker_pb2.RunSliceRequest(
                job_id="a", generation=0, epoch=10, first_step=0, count=30, first_island_seq=0
            ),
            timeout=60,
        )
        a_steps = _HostStream(a)
        assert (await a_steps.next()).island_seq == 0
        b = _Slice(0, 10, [])
        b.seqs.append((island, 30, 10, island.generation))
        island.next_seq = 40
        await dispatcher.fill_gaps([b])
        replies = [await a_steps.next() for _ in range(29)]
        assert [r.island_seq for r in replies] == list(range(1, 30))
        deadline = time.monotonic() + 10
        while (await stub.Info(worker_pb2.InfoRequest())).next_island_seq != 40:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        after = stub.RunSlice(
            worker_pb2.RunSliceRequest(
                job_id="a", generation=0, epoch=10, first_step=30, count=2, first_island_seq=40
            ),
            timeout=60,
        )
        assert [r.island_seq async for m in after for r in m.steps] == [40, 41]
        await dispatcher.unload("a", [island])
        await island.close()

    asyncio.run(main())


def test_a_slice_run_back_to_back_keeps_run_steps_replays_and_stops_at_an_unload(host):
    """The host runs a slice's steps back to back on its runtime thread (workers/slices.py):
    a RunStep retry of a step of the slice, run or still to run, gets its recorded reply
    (replayed); an UnloadJob in the middle of a slice stops it at the next step boundary
    with NOT_FOUND, and the island goes on at the next number."""

    async def main() -> None:
        island = Island("slices", [await connect_host(host)])
        stub = island.hosts[0].stub
        dispatcher = Dispatcher(30)
        await dispatcher.load(program("b2b", 100_000, d=512), [island])

        def slice_request(first_step: int, count: int, first_seq: int):
            return worker_pb2.RunSliceRequest(
                job_id="b2b",
                generation=0,
                epoch=30,
                first_step=first_step,
                count=count,
                first_island_seq=first_seq,
            )

        call = stub.RunSlice(slice_request(0, 300, 0), timeout=60)
        stream = _HostStream(call)
        first = await stream.next()

        def retry(step: int):
            return stub.RunStep(
                worker_pb2.RunStepRequest(
                    job_id="b2b", generation=0, step=step, island_seq=step, epoch=30
                ),
                timeout=60,
            )

        # Step 299 has not run yet: its retry waits for it and gets its reply.
        late = asyncio.ensure_future(retry(299))
        early = await retry(0)
        assert early.replayed and early.loss == first.loss and early.island_seq == 0
        replies = [first] + [await stream.next() for _ in range(299)]
        assert [r.step for r in replies] == list(range(300))
        assert not any(r.replayed for r in replies)
        assert (await late).replayed and (await late).loss == replies[-1].loss
        assert (await stub.Info(worker_pb2.InfoRequest())).next_island_seq == 300

        # An unload in the middle of a long slice stops it at a step boundary.
        call = stub.RunSlice(slice_request(300, 50_000, 300), timeout=60)
        stream = _HostStream(call)
        assert (await stream.next()).step == 300
        await dispatcher.unload("b2b", [island])
        unloaded = time.time_ns()
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            while True:
                await stream.next()
        assert failed.value.code() == grpc.StatusCode.NOT_FOUND
        assert "unloaded" in failed.value.details()
        ran = [
            e
            for e in (await stub.ExecutionLog(worker_pb2.ExecutionLogRequest())).entries
            if e.job_id == "b2b" and e.epoch == 30
        ]
        assert 301 <= len(ran) < 300 + 50_000
        assert max(e.start_unix_ns for e in ran) < unloaded
        # Every number of the slice was used: the island's next job is not held up.
        assert (await stub.Info(worker_pb2.InfoRequest())).next_island_seq == 300 + 50_000
        await dispatcher.load(program("next", 10), [island])
        island.next_seq = 300 + 50_000  # the raw RunSlices above were not the dispatcher's
        assert await dispatcher.run(program("next", 10), [island]) == 10
        await dispatcher.unload("next", [island])
        await island.close()

    asyncio.run(main())


def test_a_slice_held_by_a_serving_cut_keeps_the_island_order(host):
    """A cut's HOLD reaches a slice running back to back: the slice's steps after it wait
    under the device lock, so another job's slice, whose numbers come after, does not run
    while they are held; after the CUT the steps before it run, the slice ends there, and
    the other job's slice runs. The island's steps ran in island_seq order throughout."""

    async def main() -> None:
        island = Island("slices", [await connect_host(host)])
        stub = island.hosts[0].stub
        dispatcher = Dispatcher(31)
        for job_id in ("held", "other"):
            await dispatcher.load(program(job_id, 100_000, d=512), [island])

        def slice_request(job_id: str, count: int, first_seq: int):
            return worker_pb2.RunSliceRequest(
                job_id=job_id,
                generation=0,
                epoch=31,
                first_step=0,
                count=count,
                first_island_seq=first_seq,
            )

        def cut(phase, **kw):
            return stub.CutSlice(
                worker_pb2.CutSliceRequest(
                    job_id="held", generation=0, epoch=31, phase=phase, seq_below=100_000, **kw
                ),
                timeout=10,
            )

        held = _HostStream(stub.RunSlice(slice_request("held", 100_000, 0), timeout=60))
        assert (await held.next()).step == 0
        other_call = stub.RunSlice(slice_request("other", 5, 100_000), timeout=60)
        other_read = asyncio.ensure_future(_HostStream(other_call).next())
        phase = worker_pb2.CutSliceRequest
        started = (await cut(phase.HOLD, hold_s=30)).next_step
        await asyncio.sleep(0.5)
        assert not other_read.done()  # the held slice's numbers come first
        log = (await stub.ExecutionLog(worker_pb2.ExecutionLogRequest())).entries
        assert not [e for e in log if e.job_id == "other" and e.epoch == 31]
        await cut(phase.CUT, before_step=started + 3)
        replies = []
        with pytest.raises(grpc.aio.AioRpcError) as ended:  # the held slice ends at the cut...
            while True:
                replies.append(await held.next())
        assert "ended the slice's stream before its last step" in ended.value.details()
        assert replies[-1].step == started + 2
        assert (await other_read).step == 0  # ...and the other job's slice runs after it
        other_call.cancel()
        log = [
            e
            for e in (await stub.ExecutionLog(worker_pb2.ExecutionLogRequest())).entries
            if e.epoch == 31
        ]
        by_start = sorted(log, key=lambda e: e.start_unix_ns)
        assert [e.island_seq for e in by_start] == sorted(e.island_seq for e in log)
        assert max(e.step for e in log if e.job_id == "held") == started + 2
        for job_id in ("held", "other"):
            await dispatcher.unload(job_id, [island])
        await island.close()

    asyncio.run(main())


def test_a_slices_steps_already_run_are_replayed_and_their_numbers_skipped(host):
    """A slice that repeats steps this host already ran (sent again from a cut whose second
    phase never reached the host: its hold lapsed and it ran on) gets their recorded
    replies, and their island_seq numbers are skipped when due: the slice's later steps and
    the island's next ones are not held up until the stream's deadline."""

    async def main() -> None:
        island = Island("slices", [await connect_host(host)])
        stub = island.hosts[0].stub
        dispatcher = Dispatcher(32)
        await dispatcher.load(program("again", 100), [island])

        async def run_slice(first_step: int, count: int, first_seq: int) -> list:
            request = worker_pb2.RunSliceRequest(
                job_id="again",
                generation=0,
                epoch=32,
                first_step=first_step,
                count=count,
                first_island_seq=first_seq,
            )
            return [r async for m in stub.RunSlice(request, timeout=20) for r in m.steps]

        assert [r.step for r in await run_slice(0, 5, 0)] == [0, 1, 2, 3, 4]
        started = time.monotonic()
        replies = await run_slice(3, 5, 5)
        assert time.monotonic() - started < 5
        assert [(r.step, r.replayed) for r in replies] == [
            (3, True),
            (4, True),
            (5, False),
            (6, False),
            (7, False),
        ]
        assert (await stub.Info(worker_pb2.InfoRequest())).next_island_seq == 10
        await dispatcher.unload("again", [island])
        await island.close()

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_a_cut_answered_past_the_steps_sent_ends_and_the_job_runs_every_step_once():
    """A host whose earlier hold lapsed ran on past that cut and answers the next HOLD with
    a step beyond any the run has sent since (`hold_ahead`). The cut is capped at the steps
    sent: before, it waited for steps the run never sends, and the serving request that
    asked for it hung, holding the island."""

    async def main() -> None:
        async with (
            _sim_island(name="ahead", step_s=0.02, hold_ahead=1000) as (sims, island),
            _cut_for_serving_at_5(island, "ahead", 40) as (scheduler, run, reports, cut),
        ):
            at = await asyncio.wait_for(cut, 5)
            assert at is not None and 6 <= at <= 30, at
            scheduler.hold_for_serving("ahead", False)  # the request was served
            assert await asyncio.wait_for(run, 10) == 30
            assert reports == list(range(30))
            assert [e.step for e in sims.hosts["ahead"].log] == list(range(30))

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_a_slice_granted_after_a_cut_still_ends_at_the_next_checkpoint():
    """One slot: the next slice's slot is asked for while the current slice (4-7) runs,
    sized from the step after it (8-11, to the checkpoint after step 11). A serving cut
    made as it asks takes the run back to step 7 (the host is in step 6), and the grant
    comes once the island is released: the slice sent from step 7 is sized again and ends
    at the checkpoint after step 7. Before, it kept the size asked for (7-10) and step 7's
    checkpoint was never written. (A host already past step 7 when the cut reaches it
    makes the cut land at 8: nothing to size again, the checkpoints all written too.)"""

    async def main() -> None:
        async with _sim_island(name="ckpt", step_s=0.2) as (sims, island):
            scheduler = Scheduler(["ckpt"], slots=1, share_by="steps")
            scheduler.join("ckpt", ["ckpt"], 1.0)
            dispatcher = Dispatcher(45, slice_s=0.9, lead_s=0.5)
            prog = program("ckpt", 12, checkpoint_dir="/sim/ckpt", checkpoint_every=4)
            await dispatcher.load(prog, [island])
            cuts: list[asyncio.Future] = []
            acquire = scheduler.acquire

            async def asked(job_id: str, steps: int = 1) -> bool:
                if not cuts and dispatcher._runs[job_id].state.next_step == 8:
                    assert steps == 4  # sized from step 8 to the checkpoint after 11
                    scheduler.hold_for_serving("ckpt", True)
                    cuts.append(asyncio.ensure_future(dispatcher.cut("ckpt")))
                return await acquire(job_id, steps)

            scheduler.acquire = asked
            async with _running(dispatcher, prog, island, gate=scheduler) as run:
                while not cuts:
                    await asyncio.sleep(0.01)
                assert await asyncio.wait_for(cuts[0], 5) in (7, 8)
                scheduler.hold_for_serving("ckpt", False)
                assert await asyncio.wait_for(run, 10) == 12
            committed = sims.hosts["ckpt"].jobs["ckpt"].committed
            assert sorted(set(committed)) == [4, 8, 12], committed
            # Shares by steps: the job paid for the steps it ran, not for those asked.
            assert scheduler.passes()["ckpt"] == 12

    asyncio.run(main())


def test_a_checkpoint_by_time_that_a_cut_trimmed_away_is_due_again_at_the_cut():
    """A checkpoint every 0.8 s, 0.2 s steps, one step a slice: the slice of the step a
    checkpoint by time is due after is sent ahead (while the host runs a step well before
    it), and a cut made as it is sent trims it away. That checkpoint was never written, so
    the first slice from the cut carries it. Before, the clock restarted when the trimmed
    slice was sent stayed restarted: the checkpoint came an interval after that send (a
    run cut at step 5 first checkpointed after step 12, not after step 5)."""

    async def main() -> None:
        async with _sim_island(name="tck", step_s=0.2) as (sims, island):
            # Five slices in flight: the checkpoint's is sent steps ahead of the host.
            dispatcher = Dispatcher(46, window=5, slice_s=0.2, lead_s=1.0)
            prog = program("tck", 14, checkpoint_dir="/sim/tck", checkpoint_every_s=0.8)
            await dispatcher.load(prog, [island])
            asked: list[int] = []
            cuts: list[asyncio.Future] = []
            send = dispatcher._send

            def sent(program, sent, islands, checkpoint):
                send(program, sent, islands, checkpoint)
                if checkpoint >= 0 and not cuts and checkpoint < prog.steps - 1:
                    asked.append(checkpoint)
                    cuts.append(asyncio.ensure_future(dispatcher.cut("tck")))

            dispatcher._send = sent
            async with _running(dispatcher, prog, island) as run:
                while not cuts:
                    await asyncio.sleep(0.01)
                cut = await asyncio.wait_for(cuts[0], 5)
                assert await asyncio.wait_for(run, 10) == 14
            assert cut is not None and cut <= asked[0], (cut, asked)
            committed = sorted(set(sims.hosts["tck"].jobs["tck"].committed))
            # The checkpoint after the cut step (cut + 1 steps done), not a later one.
            assert committed[0] == cut + 1, (cut, asked, committed)

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_no_slot_is_asked_for_while_a_cut_is_in_progress():
    """A serving request that went away while its cut was in progress released the island:
    the run, its steps all read, asked for a slot, was granted one, gave it back (a cut in
    progress) and asked again at once, over and over, each grant charged to its pass (share
    by steps: one per step granted). A slow HOLD (`hold_delay_s`) keeps the cut in progress."""

    async def main() -> None:
        async with (
            _sim_island(name="slow-hold", step_s=0.02, hold_delay_s=0.5) as (_, island),
            _cut_for_serving_at_5(island, "spin", 41) as (scheduler, run, reports, cut),
        ):
            await asyncio.sleep(0.05)
            scheduler.hold_for_serving("slow-hold", False)  # the request went away
            assert await asyncio.wait_for(cut, 5) is not None
            assert await asyncio.wait_for(run, 10) == 30
            assert reports == list(range(30))
            # 30 steps granted, and at most one slice granted as the cut began given back.
            assert scheduler.passes()["spin"] <= 2 * 30, scheduler.passes()

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_a_cut_stops_waiting_for_a_wedged_step(monkeypatch):
    """A cut waits for the run to read the steps before it; a step that never ends (here
    one of 60 s) must not hang the serving request waiting for the cut: after CUT_STALL_S
    without a step read, the cut returns."""
    from pathways_lite.controller import dispatch

    monkeypatch.setattr(dispatch, "CUT_STALL_S", 0.3, raising=False)

    async def main() -> None:
        async with _sim_island(name="wedged", step_s=60.0) as (_, island):
            dispatcher = Dispatcher(42)
            prog = program("wedged", 10)
            await dispatcher.load(prog, [island])
            async with _running(dispatcher, prog, island):
                await asyncio.sleep(0.3)  # step 0 runs (for 60 s)
                started = time.monotonic()
                # Before step 1 or 2 (the simulated host marks the next step started as it
                # queues for the device).
                assert await asyncio.wait_for(dispatcher.cut("wedged"), 5) in (1, 2)
                assert time.monotonic() - started < 3

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_a_failed_skip_seq_is_tried_again_and_leaves_no_hole():
    """A slice cancelled before its stream reached the host leaves its island_seq numbers
    to `fill_gaps`; a SkipSeq lost on the way (`fail_skips`: UNAVAILABLE once) is tried
    again, so the island's next steps run at once. Before, it was logged and dropped: the
    host waited for those numbers and every later step on the island waited behind them."""

    async def main() -> None:
        async with _sim_island(name="flaky", fail_skips=1) as (sims, island):
            dispatcher = Dispatcher(43)
            prog = program("after-hole", 3)
            await dispatcher.load(prog, [island])
            lost = _Slice(0, 10, [])
            lost.seqs.append((island, island.take_seqs(10, 43), 10, island.generation))
            await asyncio.wait_for(dispatcher.fill_gaps([lost]), 5)
            assert sims.specs[0].fail_skips == 0  # the fault was met
            # The next slice (island_seq 10..12) runs at once.
            assert await asyncio.wait_for(dispatcher.run(prog, [island]), 5) == 3
            log = sims.hosts["flaky"].log
            assert [(e.step, e.island_seq) for e in log] == [(0, 10), (1, 11), (2, 12)]

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_a_cancelled_slices_numbers_are_not_skipped_on_a_restarted_islands_new_hosts():
    """The island_seq numbers of a slice cancelled before its island restarted belong to
    the old hosts' sequence: its SkipSeq is not sent to the new hosts, whose sequence starts
    again at 0 (they would skip those numbers of their own steps)."""

    async def main() -> None:
        async with _sim_island(name="restarted") as (sims, island):
            dispatcher = Dispatcher(46)
            lost = _Slice(0, 10, [])
            lost.seqs.append((island, island.take_seqs(10, 46), 10, island.generation))
            # Restarted meanwhile (`Island.restart`): new hosts, numbered from 0.
            island.generation += 1
            island.next_seq, island.seq_epoch = 0, None
            await asyncio.wait_for(dispatcher.fill_gaps([lost]), 5)
            prog = program("after-restart", 3)
            await dispatcher.load(prog, [island])
            assert await asyncio.wait_for(dispatcher.run(prog, [island]), 5) == 3
            log = sims.hosts["restarted"].log
            assert [(e.step, e.island_seq) for e in log] == [(0, 0), (1, 1), (2, 2)]

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_a_two_host_run_that_fails_on_the_controller_stops_both_hosts_at_one_step():
    """A run on an island of several hosts (one XLA program across them) that fails with no
    host failing (here its `on_step` raises) ends its slices in flight by a cut, as an
    abandon does: cancelled streams reach each host at its own moment, and the host ahead
    would run a step inside a collective its peer never joins. Two simulated hosts, one
    twice as fast (magnifying the skew of real hosts), as in the abandon test above."""
    from pathways_lite.workers.sim_host import SimCluster, SimIsland

    class Broke(Exception):
        pass

    async def main() -> None:
        sims = SimCluster([SimIsland("fast", step_s=0.04), SimIsland("slow", step_s=0.08)])
        addresses = await sims.start()
        hosts = [await connect_host(addresses[name]) for name in ("fast", "slow")]
        island = Island("two-host", hosts)
        try:
            dispatcher = Dispatcher(44, slice_s=1.0)
            prog = program("broke", 1000)
            await dispatcher.load(prog, [island])
            reports: list[int] = []

            def on_step(report) -> None:
                reports.append(report.step)
                if len(reports) == 6:  # in the second slice: the fast host is ahead
                    raise Broke("the step's report could not be handled")

            with pytest.raises(Broke):
                await asyncio.wait_for(dispatcher.run(prog, [island], on_step=on_step), 20)
            await asyncio.sleep(0.3)  # a step a host might (wrongly) still run ends
            ran = []
            for host in hosts:
                log = await host.stub.ExecutionLog(worker_pb2.ExecutionLogRequest())
                ran.append([e.step for e in log.entries if e.job_id == "broke"])
                info = await host.stub.Info(worker_pb2.InfoRequest())
                # Every island_seq handed out was run or skipped: the island is not held.
                assert info.next_island_seq == island.next_seq, (info, island.next_seq)
            fast, slow = ran
            assert fast == slow and fast == list(range(len(fast))), (fast, slow)
            assert len(fast) >= 6
        finally:
            await island.close()
            await sims.stop()

    asyncio.run(main())
