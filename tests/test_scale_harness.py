"""The scale harness: the real controller (core, admission, scheduler, store, dispatcher, job
runners) drives simulated island hosts (workers/sim_host.py) over real gRPC, no JAX. It
shows EASY backfill end to end (a short job starts ahead of a waiting gang only when it ends
before the gang's reservation; `why` says so), strict order as the baseline, and the bus's
sequence numbers with a lagging watcher's dropped updates counted."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time

import grpc
import pytest

from pathways_lite.controller.bus import EventBus
from pathways_lite.controller.core import Controller
from pathways_lite.controller.resolved import DatasetRef
from pathways_lite.controller.states import CheckpointState, JobState
from pathways_lite.controller.store import JobRecord, JobStore
from pathways_lite.spec import load_spec_text
from pathways_lite.v1 import controller_pb2
from pathways_lite.workers.sim_host import SimCluster, SimIsland, connect_islands

pytestmark = pytest.mark.timeout(120)

STEP_S = 0.03


def _spec(name: str, islands: int, steps: int, priority: int = 0):
    spec = load_spec_text(f"""
name: {name}
model: {{preset: palm-tiny}}
islands: {islands}
devices_per_island: 1
mesh: {{data: 1, model: 1}}
train: {{steps: {steps}, global_batch: {8 * islands}, seq_len: 64}}
data: {{source: stdlib, vocab_size: 1024}}
""")
    spec.priority = priority
    return spec


def _prepare(record, job):
    return dataclasses.replace(job, dataset=DatasetRef("/sim", "sim", "sim", 1 << 20))


@contextlib.asynccontextmanager
async def _served(tmp_path, islands: int, step_s: float = 0.0, **island):
    """A controller over `islands` simulated islands of `step_s` steps (and `island`'s other
    SimIsland settings), its gRPC service on a thread of its own (controller/service.py
    `serve`): yields (the controller, its store, the service's address)."""
    from pathways_lite.controller.service import serve

    sim = SimCluster.uniform(islands, step_s=step_s, **island)
    hosts = await connect_islands(await sim.start())
    store = JobStore.open_controller(tmp_path / "state")
    c = Controller(store, hosts, prepare=_prepare, peak_flops=1e12)
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    server = asyncio.create_task(
        serve(c, "127.0.0.1", 0, started=port.set_result, stop=stop, grace_s=1.0)
    )
    try:
        yield c, store, f"127.0.0.1:{await port}"
    finally:
        stop.set()
        await server
        await sim.stop()
        store.close()


@contextlib.asynccontextmanager
async def _controller(sim: SimCluster, store: JobStore, addresses=None, **kwargs):
    """The real controller over `sim`'s hosts (started here unless `addresses` says they
    were), started; stopped after, with the hosts and the store."""
    hosts = await connect_islands(addresses or await sim.start())
    c = Controller(store, hosts, prepare=_prepare, peak_flops=1e12, **kwargs)
    await c.start()
    try:
        yield c
    finally:
        await c.stop()
        await sim.stop()
        store.close()


def _left_running(store: JobStore, spec, recorded: int):
    """A job an earlier controller left RUNNING, with its first `recorded` steps in the
    store; its record."""
    ((record, _),) = store.create_jobs([(spec, None)])
    store.transition(record.id, JobState.RUNNING, reason="scheduled")
    for step in range(recorded):
        store.record_metrics(record.id, step, 1.0 / (step + 1))
    return record


async def _hold_on_hosts(addresses, record, restore_from, checkpoint_dir=None) -> None:
    """The hosts at `addresses` hold `record`'s job as a dead controller left it: loaded in
    its generation from `restore_from` (the steps that checkpoint names)."""
    from pathways_lite.v1 import worker_pb2, worker_pb2_grpc

    for address in addresses:
        async with grpc.aio.insecure_channel(address) as channel:
            await worker_pb2_grpc.WorkerServiceStub(channel).LoadJob(
                worker_pb2.LoadJobRequest(
                    job_id=record.id,
                    generation=record.generation,
                    restore_from=str(restore_from),
                    checkpoint_dir="" if checkpoint_dir is None else str(checkpoint_dir),
                )
            )


def _finished_source(store: JobStore, folder) -> JobRecord:
    """A training job that ended with a committed checkpoint at step 5 (with its tokenizer):
    what a serve job's `init_from: {job: ...}` names."""
    from pathways_lite.controller.lineage import TOKENIZER_FILE

    ((source, _),) = store.create_jobs([(_spec("src", 1, 5), None)])
    src_dir = folder / "src"
    src_dir.mkdir()
    (src_dir / TOKENIZER_FILE).write_bytes(b"sim")
    store.register_checkpoint(source.id, source.generation, 5, str(src_dir / "g0-step5"))
    store.transition(source.id, JobState.RUNNING, reason="scheduled")
    store.transition(source.id, JobState.SUCCEEDED, reason="completed")
    return source


async def _until(predicate, timeout_s: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def _scenario(tmp_path, backfill: bool) -> dict:
    """4 islands; a 3-island job A runs; a 4-island gang H (same priority: no preemption)
    waits for it; a
    short 1-island job B (ends well before A) and a long one C (ends after it) queue behind H."""
    from pathways_lite.controller.resolved import ResolvedJob

    budget = max(ResolvedJob.resolve(_spec("x", k, 2)).bytes_per_device for k in (1, 3, 4))
    sim = SimCluster.uniform(4, step_s=STEP_S, budget=budget, job_bytes=budget)
    islands = await connect_islands(await sim.start())
    store = JobStore.open_controller(tmp_path / ("bf" if backfill else "strict"))
    c = Controller(store, islands, prepare=_prepare, peak_flops=1e12, backfill=backfill)
    await c.start()
    try:

        def submit(spec) -> str:
            return c.submit(controller_pb2.SubmitJobRequest(spec=spec)).id

        def done(*ids) -> bool:
            return all(store.get_job(j).state.terminal for j in ids)

        # Each kind runs once first, so the controller knows its seconds per step.
        warm = [submit(_spec(f"warm{k}", k, 4)) for k in (1, 3, 4)]
        await _until(lambda: done(*warm))
        a = submit(_spec("a", 3, 40))
        await _until(lambda: store.get_job(a).state == JobState.RUNNING)
        h = submit(_spec("h", 4, 4))
        b = submit(_spec("b", 1, 4))
        long = submit(_spec("c", 1, 80))
        await _until(lambda: store.get_job(b).state != JobState.QUEUED or done(a))
        seen = {
            "why_h": c.why(store.get_job(h)),
            "why_b": c.why(store.get_job(b)),
            "events_b": [e.message for e in store.events(b) if e.kind == "scheduler"],
            "why_c": c.why(store.get_job(long)),
            "b_running": store.get_job(b).state != JobState.QUEUED,
            "c_running": store.get_job(long).state != JobState.QUEUED,
        }
        await _until(lambda: done(a, h, b, long), 120)
        records = {j: store.get_job(j) for j in (a, h, b, long)}
        seen.update(
            states={j: r.state for j, r in records.items()},
            h_start=records[h].started_us,
            b_start=records[b].started_us,
            c_start=records[long].started_us,
        )
        return seen
    finally:
        await c.stop()
        await sim.stop()
        store.close()


def test_a_short_job_backfills_ahead_of_a_waiting_gang_without_delaying_it(tmp_path) -> None:
    seen = asyncio.run(_scenario(tmp_path, backfill=True))
    assert set(seen["states"].values()) == {JobState.SUCCEEDED}, seen
    assert "Holds a reservation" in seen["why_h"], seen["why_h"]
    assert seen["b_running"] and "Backfilled ahead of h" in seen["why_b"], seen["why_b"]
    assert any(m.startswith("Backfilled ahead of h") for m in seen["events_b"])
    assert not seen["c_running"], seen["why_c"]  # it would end after the reservation
    assert seen["b_start"] < seen["h_start"] < seen["c_start"]


def test_in_strict_order_nothing_starts_while_a_job_ahead_waits(tmp_path) -> None:
    seen = asyncio.run(_scenario(tmp_path, backfill=False))
    assert set(seen["states"].values()) == {JobState.SUCCEEDED}, seen
    assert not seen["b_running"] and not seen["c_running"]
    assert seen["h_start"] < seen["b_start"]


def test_a_lagging_follower_is_told_how_many_updates_it_lost_and_never_blocks() -> None:
    async def run() -> None:
        bus = EventBus(queue_size=4)
        slow = bus.subscribe("job")
        fast = bus.subscribe("job")
        seen = []
        for n in range(10):
            bus.publish("job", controller_pb2.WatchJobReply(event=controller_pb2.JobEvent()))
            seen.append(await fast.get())
            assert fast.last_seq == n + 1  # consecutive: nothing lost
        assert [u.seq for u in seen] == list(range(1, 11))
        first = await slow.get()
        assert first.seq == 7 and slow.last_seq == 7  # 1..6 were dropped, oldest first
        assert slow.take_dropped() == 6 and slow.take_dropped() == 0
        assert bus.dropped_total == 6

    asyncio.run(run())


@pytest.mark.parametrize("stop", ["drain", "cancel"])
def test_a_drain_or_cancel_while_a_job_is_being_suspended_ends_it(tmp_path, stop) -> None:
    """A drain (`pathways-lite down`) or a cancel that comes while a preempted job's Suspend
    is in flight on its hosts: the job is drained (back to the queue) or cancelled, not left
    suspended with the drain waiting for it for good (its wake-up was cleared after the
    Suspend returned), nor failed as an internal error."""
    from pathways_lite.controller.resolved import ResolvedJob
    from pathways_lite.workers.sim_host import SimIsland

    budget = ResolvedJob.resolve(_spec("x", 1, 2)).bytes_per_device

    async def run() -> None:
        sim = SimCluster([SimIsland("island-0", STEP_S, budget, budget, suspend_s=2.0)])
        islands = await connect_islands(await sim.start())
        store = JobStore.open_controller(tmp_path / "state")
        c = Controller(store, islands, prepare=_prepare, peak_flops=1e12)
        await c.start()
        try:
            low = c.submit(controller_pb2.SubmitJobRequest(spec=_spec("low", 1, 10_000))).id
            await _until(lambda: bool(store.metrics(low, from_step=3)))
            c.submit(controller_pb2.SubmitJobRequest(spec=_spec("high", 1, 4, priority=5)))
            await _until(lambda: low in c.runners and c.runners[low].suspend_requested)
            await asyncio.sleep(0.5)  # its slices end; the Suspend (2 s) is in flight
            assert store.get_job(low).state == JobState.RUNNING
            if stop == "drain":
                drained = await asyncio.wait_for(c.drain(), 20)
                assert [d.job_id for d in drained] == [low], drained
                assert store.get_job(low).state == JobState.QUEUED
            else:
                task = c.runners[low].task
                c.cancel(low, "while suspending")
                await asyncio.wait_for(asyncio.shield(task), 20)
                assert store.get_job(low).state == JobState.CANCELLED
            failures = [e.message for e in store.events(low) if e.kind == "failure"]
            assert not failures, failures
        finally:
            await c.stop()
            await sim.stop()
            store.close()

    asyncio.run(run())


def test_a_job_suspended_under_an_earlier_controller_runs_again_from_its_checkpoint(
    tmp_path,
) -> None:
    """A job the store shows SUSPENDED when the controller starts (the one that suspended it
    died: its copy in host memory is not adopted) runs again from its newest committed
    checkpoint, its steps before it kept and every step recorded once, in a new generation
    (hosts that still hold the old state drop it). Before, its metrics were forgotten from
    step 0 while it resumed from the checkpoint: steps 0..9 were lost for good."""

    async def run() -> None:
        sim = SimCluster.uniform(1, step_s=0.0)
        islands = await connect_islands(await sim.start())
        store = JobStore.open_controller(tmp_path / "state")
        record = _left_running(store, _spec("old", 1, 20), 12)
        path = str(tmp_path / "ckpt" / f"g{record.generation}-step10")
        store.register_checkpoint(record.id, record.generation, 10, path)
        store.transition(record.id, JobState.SUSPENDED, reason="preempted")
        c = Controller(store, islands, prepare=_prepare, peak_flops=1e12)
        await c.start()
        try:
            await _until(lambda: store.get_job(record.id).state.terminal, 30)
            assert store.get_job(record.id).state == JobState.SUCCEEDED
            assert [m.step for m in store.metrics(record.id)] == list(range(20))
            assert store.get_job(record.id).generation > record.generation
            messages = [e.message for e in store.events(record.id)]
            assert any("it runs again from step 10" in m for m in messages), messages
        finally:
            await c.stop()
            await sim.stop()
            store.close()

    asyncio.run(run())


def _ray_sim_actors(prefix: str, step_s: float, budget: int, job_bytes: int = 0):
    """Two simulated island hosts as Ray actors: (the actors, {island: address})."""
    import ray

    from pathways_lite.workers.sim_host import SimHostActor

    actor_cls = ray.remote(max_concurrency=4)(SimHostActor)
    actors = [actor_cls.remote(f"{prefix}{i}", step_s, budget, job_bytes) for i in range(2)]
    addresses = {
        f"{prefix}{i}": ray.get(a.address.remote(), timeout=60) for i, a in enumerate(actors)
    }
    return actors, addresses


@contextlib.asynccontextmanager
async def _ray_sim_controller(actors, addresses, state_dir):
    """A started controller over the actors' islands (each island knows its actor: Ray's
    death reports reach it): yields (the controller, its store)."""
    islands = await connect_islands(addresses)
    for island, actor in zip(islands, actors, strict=True):
        island.actors = [actor]
    store = JobStore.open_controller(state_dir)
    c = Controller(store, islands, prepare=_prepare, peak_flops=1e12)
    await c.start()
    try:
        yield c, store
    finally:
        await c.stop()
        store.close()


def _run_then_kill(main, actors) -> None:
    import ray

    try:
        asyncio.run(main())
    finally:
        for a in actors:
            ray.kill(a)


def test_a_job_suspended_on_an_island_whose_host_dies_runs_again_elsewhere(
    ray_cluster, tmp_path
) -> None:
    """Simulated hosts as Ray actors. A low-priority job is suspended (state in host memory)
    on island r0 for a 2-island job; r0's host process is killed: Ray's report marks r0
    down, and the suspended job, whose state died with the host, rolls back at once and
    runs on island r1, rather than waiting for good to resume on an island nothing is
    placed on; the 2-island job, which cannot run on the one island left, waits for the
    island to come back without holding the other job back."""
    import os
    import signal

    import ray

    from pathways_lite.controller.resolved import ResolvedJob

    budget = max(ResolvedJob.resolve(_spec("x", k, 2)).bytes_per_device for k in (1, 2))
    actors, addresses = _ray_sim_actors("island-s", STEP_S, budget, budget)

    async def run() -> None:
        async with _ray_sim_controller(actors, addresses, tmp_path / "state") as (c, store):
            low = c.submit(controller_pb2.SubmitJobRequest(spec=_spec("low", 1, 60))).id
            await _until(lambda: bool(store.metrics(low, from_step=3)))
            (first,) = c.scheduler.islands_of(low)
            high = c.submit(controller_pb2.SubmitJobRequest(spec=_spec("high", 2, 10_000, 5))).id
            await _until(lambda: store.get_job(low).state == JobState.SUSPENDED)
            await _until(lambda: bool(store.metrics(high, from_step=2)))
            victim = actors[int(first[-1])]
            os.kill(ray.get(victim.pid.remote(), timeout=30), signal.SIGKILL)
            await _until(lambda: store.get_job(low).state != JobState.SUSPENDED, 10)
            assert first in c.scheduler.down
            messages = [e.message for e in store.events(low)]
            assert any("was suspended in host memory" in m for m in messages), messages
            # The 2-island job cannot run on the one island left: it holds nobody back.
            await _until(lambda: store.get_job(low).state.terminal, 60)
            assert store.get_job(low).state == JobState.SUCCEEDED
            assert c.scheduler.islands_of(low) in ([], [f"island-s{1 - int(first[-1])}"])
            assert store.get_job(high).state == JobState.QUEUED
            why = c.why(store.get_job(high))
            assert "cannot run until islands that are down come back" in why, why

    _run_then_kill(run, actors)


def test_a_host_actor_death_reported_by_ray_starts_recovery_at_once_and_once(
    ray_cluster, tmp_path
) -> None:
    """Simulated hosts as Ray actors: a running job's island host process is killed; Ray's
    report closes the island's channels at once, the job's one recovery starts within a
    second (one failure event: the gRPC error and Ray's report are handled once), the island
    is marked down, and the job completes on the other island."""
    import os
    import signal
    import time

    import ray

    from pathways_lite.controller.resolved import ResolvedJob

    budget = ResolvedJob.resolve(_spec("x", 1, 2)).bytes_per_device
    actors, addresses = _ray_sim_actors("island-r", 0.02, budget)

    async def run() -> None:
        async with _ray_sim_controller(actors, addresses, tmp_path / "death") as (c, store):
            islands = list(c.islands.values())
            job = c.submit(controller_pb2.SubmitJobRequest(spec=_spec("victim", 1, 120))).id
            await _until(lambda: bool(store.metrics(job, from_step=3)))
            assert c.scheduler.islands_of(job) == ["island-r0"]
            killed_us = time.time() * 1e6
            os.kill(ray.get(actors[0].pid.remote(), timeout=30), signal.SIGKILL)
            await _until(lambda: store.get_job(job).state.terminal, 90)
            assert store.get_job(job).state == JobState.SUCCEEDED
            failures = [e for e in store.events(job) if e.kind == "failure"]
            assert len(failures) == 1, [e.message for e in failures]
            assert (failures[0].time_us - killed_us) / 1e6 < 1.0
            assert "Ray reports its host actor dead" in (islands[0].dead or "")
            assert "island-r0" in c.scheduler.down
            # A late report of the same death changes nothing.
            assert not await islands[0].host_died(islands[0].generation, "again")

    _run_then_kill(run, actors)


def test_up_with_simulated_islands_runs_a_gang_job_end_to_end(tmp_path) -> None:
    """`pathways-lite up --simulate-islands 8`: the controller process serves 8 simulated
    islands (no JAX, no Ray); an 8-island job submitted with the CLI completes; `down` stops
    it."""
    import subprocess
    import sys
    from pathlib import Path

    cli = [str(Path(sys.executable).with_name("pathways-lite"))]
    state = tmp_path / "state"
    spec = tmp_path / "job.yaml"
    spec.write_text(
        "name: simjob\nmodel: {preset: palm-tiny}\nislands: 8\ndevices_per_island: 1\n"
        "mesh: {data: 1, model: 1}\ntrain: {steps: 10, global_batch: 64, seq_len: 64}\n"
        "data: {source: stdlib, vocab_size: 1024}\n"
    )

    def run(*args: str) -> str:
        done = subprocess.run(
            [*cli, *args, f"--state-dir={state}"], capture_output=True, text=True, timeout=90
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    run("up", "--simulate-islands", "8")
    try:
        assert run("islands").count("island-") >= 8
        assert "is succeeded" in run("submit", str(spec), "--wait")
        # Closed as real hosts are: a simulated host refuses a call without the cluster
        # credential (before, any local process could load, abort or cut jobs on them).
        import grpc

        from pathways_lite.client import ControllerClient
        from pathways_lite.controller.auth import read_cluster_credential
        from pathways_lite.v1 import worker_pb2, worker_pb2_grpc
        from pathways_lite.workers.auth import host_channel

        with ControllerClient(state) as client:
            address = client.islands()[0].hosts[0].address
        for credential in (None, read_cluster_credential(state)):
            channel = host_channel(address, credential)
            try:
                info = worker_pb2_grpc.WorkerServiceStub(channel).Info
                if credential is None:
                    with pytest.raises(grpc.RpcError) as refused:
                        info(worker_pb2.InfoRequest(), timeout=10)
                    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
                else:
                    assert info(worker_pb2.InfoRequest(), timeout=10).island
            finally:
                channel.close()
    finally:
        run("down")


def test_a_simulated_hosts_slice_ends_at_a_failed_step_and_skips_the_rest() -> None:
    """RunSlice on a simulated host as on the real one: the steps' replies in order, the stream
    ends at the failed step with its status, and the island_seq numbers of the steps not run
    are skipped when due, so the next slice is not held up by them."""
    import grpc

    from pathways_lite.v1 import worker_pb2, worker_pb2_grpc
    from pathways_lite.workers.sim_host import SimIsland

    async def run() -> None:
        cluster = SimCluster(
            [SimIsland("island-0", fail_steps={("*", 1): grpc.StatusCode.DATA_LOSS})]
        )
        address = (await cluster.start())["island-0"]
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = worker_pb2_grpc.WorkerServiceStub(channel)
                await stub.LoadJob(worker_pb2.LoadJobRequest(job_id="j", generation=1, epoch=1))
                steps = []
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    async for message in stub.RunSlice(
                        worker_pb2.RunSliceRequest(
                            job_id="j", generation=1, epoch=1, first_step=0, count=3
                        ),
                        timeout=10,
                    ):
                        steps += [(r.step, r.island_seq) for r in message.steps]
                assert steps == [(0, 0)]
                assert failed.value.code() == grpc.StatusCode.DATA_LOSS
                after = [
                    (r.step, r.island_seq)
                    async for message in stub.RunSlice(
                        worker_pb2.RunSliceRequest(
                            job_id="j",
                            generation=1,
                            epoch=1,
                            first_step=1,
                            count=2,
                            first_island_seq=3,
                        ),
                        timeout=10,
                    )
                    for r in message.steps
                ]
                assert after == [(1, 3), (2, 4)]
                with pytest.raises(grpc.aio.AioRpcError) as bad:
                    async for _ in stub.RunSlice(
                        worker_pb2.RunSliceRequest(job_id="j", generation=1, epoch=1, count=0),
                        timeout=10,
                    ):
                        pass
                assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "count=0" in bad.value.details()
        finally:
            await cluster.stop()

    asyncio.run(run())


@pytest.mark.timeout(60)
def test_submissions_are_answered_and_stored_while_the_controller_loop_is_busy(
    tmp_path,
) -> None:
    """The gRPC server has a thread and loop of its own (controller/service.py): with the
    controller's loop blocked for 2 s, 20 SubmitJob calls are still answered well within it,
    every acknowledged job is in the store, and the jobs run once the loop is free again."""
    import threading
    import time

    import grpc

    from pathways_lite.v1 import controller_pb2_grpc

    async def main() -> None:
        async with _served(tmp_path, 1) as (_, store, address):
            latencies: list[float] = []
            ids: list[str] = []
            go = threading.Event()

            def submit_all() -> None:
                with grpc.insecure_channel(address) as channel:
                    stub = controller_pb2_grpc.ControllerServiceStub(channel)
                    # Connected, and the spec machinery imported (a first submission's
                    # one-off cost), before the loop is blocked.
                    warm = controller_pb2.SubmitJobRequest(spec=_spec("w", 1, 2))
                    ids.append(stub.SubmitJob(warm, timeout=30).job.id)
                    go.wait()
                    for n in range(20):
                        t = time.perf_counter()
                        request = controller_pb2.SubmitJobRequest(spec=_spec(f"s{n}", 1, 2))
                        ids.append(stub.SubmitJob(request, timeout=30).job.id)
                        latencies.append(time.perf_counter() - t)

            client = threading.Thread(target=submit_all)
            client.start()
            await _until(lambda: ids)
            go.set()
            time.sleep(2.0)  # the controller's loop (this one) is blocked meanwhile
            await asyncio.to_thread(client.join, 30)
            assert len(ids) == 21, ids
            assert max(latencies) < 1.0, latencies
            assert sum(latencies) < 2.0, latencies  # all answered while the loop was blocked
            assert {store.get_job(j).id for j in ids} == set(ids)  # acknowledged = stored
            await _until(lambda: all(store.get_job(j).state.terminal for j in ids))
            assert {store.get_job(j).state for j in ids} == {JobState.SUCCEEDED}

    asyncio.run(main())


def test_a_long_jobs_record_reaches_its_client_and_its_watchers_get_it_without_every_loss(
    tmp_path,
) -> None:
    """A job of 600,000 recorded steps: its full record (8 bytes of loss a step, past gRPC's
    default 4 MiB reply limit) reaches the client's GetJob; WatchJob's record of it carries
    no per-step losses (its followers get the steps), so a watcher opens on it."""
    from pathways_lite.client import ControllerClient

    steps = 600_000

    async def main() -> None:
        async with _served(tmp_path, 1) as (_, store, address):
            job_id = store.create_job(_spec("long", 1, steps)).id
            store.transition(job_id, JobState.CANCELLED, reason="test", message="kept")
            rows = [(n, 1.0 + n * 1e-6, 1.0, 0.001, None, None) for n in range(steps)]
            store.record_metrics_batch(job_id, rows)

            def client_side() -> tuple[int, int, int]:
                with ControllerClient(address=address, token="unused") as client:
                    full = client.get(job_id)
                    call = client._stub.WatchJob(
                        controller_pb2.WatchJobRequest(job_id=job_id, from_step=steps),
                        timeout=60,
                    )
                    first = next(iter(call))
                    call.cancel()
                return len(full.losses), len(first.job.losses), first.job.steps_completed

            full, watched, completed = await asyncio.to_thread(client_side)
            assert full == steps
            assert (watched, completed) == (0, steps)

    asyncio.run(main())


def test_submissions_are_answered_in_batches_and_a_failing_batch_fails_only_its_callers() -> None:
    """controller/service.py Submissions: the requests that come while a batch is handled
    make the next (each caller answered with its own outcome, in order); a batch that fails
    answers each of its callers with the error, and the next submission starts afresh."""
    from pathways_lite.controller.service import Submissions

    class Controller:
        def __init__(self) -> None:
            self.batches: list[list[str]] = []

        def submit_many(self, requests):
            names = [r.spec.name for r in requests]
            self.batches.append(names)
            if "boom" in names:
                raise RuntimeError("a batch that fails")
            time.sleep(0.05)  # the others arrive meanwhile
            return [controller_pb2.Job(name=n) for n in names]

    def request(name: str) -> controller_pb2.SubmitJobRequest:
        return controller_pb2.SubmitJobRequest(spec=controller_pb2.JobSpec(name=name))

    async def main() -> None:
        c = Controller()
        submissions = Submissions(c)
        first = asyncio.ensure_future(submissions.submit(request("a")))
        await asyncio.sleep(0.01)
        rest = [asyncio.ensure_future(submissions.submit(request(n))) for n in "bcd"]
        jobs = await asyncio.wait_for(asyncio.gather(first, *rest), 10)
        assert [j.name for j in jobs] == list("abcd")
        assert c.batches == [["a"], ["b", "c", "d"]]
        with pytest.raises(RuntimeError, match="a batch that fails"):
            await asyncio.wait_for(submissions.submit(request("boom")), 10)
        assert (await asyncio.wait_for(submissions.submit(request("e")), 10)).name == "e"
        # A failed batch of several: each caller its own exception (one object raised in
        # every caller's task gathered all their tracebacks), the same words.
        slow = asyncio.ensure_future(submissions.submit(request("f")))
        await asyncio.sleep(0.01)
        together = [asyncio.ensure_future(submissions.submit(request(n))) for n in ("boom", "g")]
        errors = await asyncio.gather(*together, return_exceptions=True)
        assert (await slow).name == "f" and c.batches[-1] == ["boom", "g"]
        assert all(isinstance(e, RuntimeError) for e in errors) and errors[0] is not errors[1]
        assert [str(e) for e in errors] == ["a batch that fails"] * 2

    asyncio.run(main())


def test_a_burst_of_submissions_is_each_answered_with_its_view_and_stored(tmp_path) -> None:
    """30 concurrent SubmitJob calls (5 retries: a request id and spec again) and a bad one:
    each answered with its new job's view as GetJob gives it (made without reading the store),
    a retry with the same job, the bad one refused alone; every job is stored and runs. A
    request id given again with another spec is refused (it was answered with the old job)."""
    import grpc

    from pathways_lite.v1 import controller_pb2_grpc

    async def main() -> None:
        async with _served(tmp_path, 2) as (_, store, address):
            async with grpc.aio.insecure_channel(address) as channel:
                stub = controller_pb2_grpc.ControllerServiceStub(channel)
                requests = [
                    controller_pb2.SubmitJobRequest(
                        spec=_spec(f"b{n % 25}", 1, 2), request_id=f"r{n % 25}"
                    )
                    for n in range(30)
                ]
                bad = controller_pb2.SubmitJobRequest(spec=_spec("bad", 1, 2))
                bad.spec.mesh.model = 3
                replies = await asyncio.gather(
                    *(stub.SubmitJob(r, timeout=30) for r in [*requests, bad]),
                    return_exceptions=True,
                )
                *answers, refused = replies
                assert isinstance(refused, grpc.aio.AioRpcError), refused
                assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused
                assert "mesh.model=3" in refused.details()
                jobs = [a.job for a in answers]
                for n, job in enumerate(jobs[25:]):
                    assert job.id == jobs[n].id  # the same request id: the same job
                assert len({job.id for job in jobs}) == 25
                assert [j.name for j in jobs] == [r.spec.name for r in requests]
                for first in jobs[:25]:
                    # The reply to the call that created the job: a retry may have come first
                    # (concurrent) and then seen it later, running.
                    same = [j for j in jobs if j.id == first.id]
                    job = min(
                        same,
                        key=lambda j: (j.state != controller_pb2.JOB_STATE_QUEUED, len(j.events)),
                    )
                    got = (await stub.GetJob(controller_pb2.GetJobRequest(job_id=job.id))).job
                    assert job.state == controller_pb2.JOB_STATE_QUEUED
                    assert [(e.kind, e.message) for e in job.events] == [("state", "Job queued.")]
                    assert job.events[0].time == got.events[0].time
                    assert (job.spec, job.created_at, job.steps_completed) == (
                        got.spec,
                        got.created_at,
                        0,
                    )
                    assert job.queue_position >= 1
                reused = controller_pb2.SubmitJobRequest(spec=_spec("other", 1, 2), request_id="r3")
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.SubmitJob(reused, timeout=30)
                assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
                assert f"request_id='r3' was given to job {jobs[3].id}" in refused.value.details()
            await _until(lambda: all(store.get_job(j.id).state.terminal for j in jobs))
            assert {store.get_job(j.id).state for j in jobs} == {JobState.SUCCEEDED}
            assert len(store.list_jobs()[0]) == 25

    asyncio.run(main())


def test_a_simulated_hosts_slice_is_cut_for_serving_as_on_a_real_host() -> None:
    """CutSlice on a simulated host (so the scale harness can serve): HOLD answers the first
    step not started, CUT before it ends the slice's stream there without an error, the
    numbers of the steps not run are skipped, and the slice sent after the cut runs."""
    import grpc

    from pathways_lite.v1 import worker_pb2, worker_pb2_grpc
    from pathways_lite.workers.sim_host import SimIsland

    phase = worker_pb2.CutSliceRequest

    async def run() -> None:
        cluster = SimCluster([SimIsland("island-0", step_s=0.02)])
        address = (await cluster.start())["island-0"]
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = worker_pb2_grpc.WorkerServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as unknown:
                    await stub.CutSlice(worker_pb2.CutSliceRequest(job_id="j", epoch=1))
                assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
                await stub.LoadJob(worker_pb2.LoadJobRequest(job_id="j", generation=1, epoch=1))
                call = stub.RunSlice(
                    worker_pb2.RunSliceRequest(
                        job_id="j", generation=1, epoch=1, first_step=0, count=50
                    ),
                    timeout=30,
                )
                steps = [r.step for r in (await call.read()).steps]

                def cut(kind: int, before: int = 0) -> worker_pb2.CutSliceRequest:
                    return worker_pb2.CutSliceRequest(
                        job_id="j",
                        generation=1,
                        epoch=1,
                        phase=kind,
                        before_step=before,
                        seq_below=50,
                        hold_s=5.0,
                    )

                held = await stub.CutSlice(cut(phase.HOLD))
                assert steps[-1] < held.next_step < 50
                await asyncio.sleep(0.1)  # held: no step past it starts meanwhile
                await stub.CutSlice(cut(phase.CUT, held.next_step))
                while (message := await call.read()) is not grpc.aio.EOF:
                    steps += [r.step for r in message.steps]
                assert steps == list(range(held.next_step)), (steps, held.next_step)
                assert await call.code() == grpc.StatusCode.OK
                after = [
                    (r.step, r.island_seq)
                    async for message in stub.RunSlice(
                        worker_pb2.RunSliceRequest(
                            job_id="j",
                            generation=1,
                            epoch=1,
                            first_step=held.next_step,
                            count=2,
                            first_island_seq=50,
                        ),
                        timeout=10,
                    )
                    for r in message.steps
                ]
                assert after == [(held.next_step, 50), (held.next_step + 1, 51)]
        finally:
            await cluster.stop()

    asyncio.run(run())


@pytest.mark.timeout(60)
def test_a_watcher_gets_the_steps_a_rollback_runs_again(tmp_path) -> None:
    """A step fails (UNAVAILABLE: retried) and the job rolls back (no checkpoint: to step 0)
    and runs its steps again: a WatchJob stream open across it gets the steps that run
    again, with their new values, after the ones it had (the record it gets first says how
    many steps remain recorded). Before, it skipped them until they passed the last step it
    had sent: a client drew the old attempt's values."""
    import threading

    import grpc

    from pathways_lite.client import unbatched
    from pathways_lite.v1 import controller_pb2_grpc

    async def main() -> None:
        fail = {("*", 15): grpc.StatusCode.UNAVAILABLE}
        async with _served(tmp_path, 1, step_s=0.02, fail_steps=fail) as (c, store, address):
            job_id = c.submit(controller_pb2.SubmitJobRequest(spec=_spec("rolled", 1, 20))).id
            seen: list[int] = []

            def watch() -> None:
                with grpc.insecure_channel(address) as channel:
                    stub = controller_pb2_grpc.ControllerServiceStub(channel)
                    request = controller_pb2.WatchJobRequest(job_id=job_id, batch_steps=True)
                    for reply in unbatched(stub.WatchJob(request, timeout=40)):
                        if reply.HasField("metrics"):
                            seen.append(reply.metrics.step)

            watcher = threading.Thread(target=watch)
            watcher.start()
            await _until(lambda: len(seen) >= 3, 20)  # open before the failure at step 15
            await _until(lambda: store.get_job(job_id).state.terminal, 30)
            await asyncio.to_thread(watcher.join, 20)
            assert not watcher.is_alive()
            assert store.get_job(job_id).state == JobState.SUCCEEDED
            assert [m.step for m in store.metrics(job_id)] == list(range(20))
            assert seen == list(range(15)) + list(range(20)), seen

    asyncio.run(main())


@pytest.mark.timeout(90)
def test_watchers_of_a_busy_job_get_every_update_in_order_and_leave_nothing_behind(
    tmp_path,
) -> None:
    """WatchJob streams are served from the controller's loop in batches
    (controller/service.py `_stream_on_controller`): watchers of a job stepping as fast as the
    controller dispatches get its live updates without a gap (or with the gap announced by a
    resync), one that stops reading for a while holds its pump back instead of losing
    updates, and a watcher that goes away leaves no follower on the controller's bus. Watchers
    that ask for `batch_steps` get the same steps, in order and numbered without a gap, in
    far fewer replies (several steps per reply)."""
    import threading
    import time

    import grpc

    from pathways_lite.client import unbatched
    from pathways_lite.controller.service import STREAM_AHEAD
    from pathways_lite.v1 import controller_pb2_grpc

    wanted = 4 * STREAM_AHEAD

    async def main() -> None:
        # 1 ms steps: at 0 ms the controller dispatches a job's steps faster (~40,000/s) than a
        # watcher reading one reply per step can follow: it lags, resyncs from the store, and
        # lags again while the replay runs (correct, never blocking, but never live).
        async with _served(tmp_path, 1, step_s=0.001) as (c, store, address):
            results: list[tuple[bool, int, int, int, int]] = []

            def watch(job_id: str, pause_s: float, batch: bool) -> None:
                with grpc.insecure_channel(address) as channel:
                    stub = controller_pb2_grpc.ControllerServiceStub(channel)
                    request = controller_pb2.WatchJobRequest(job_id=job_id, batch_steps=batch)
                    call = stub.WatchJob(request)
                    seen = gaps = resyncs = 0
                    last = last_step = None
                    messages = [0]

                    def counted(replies):
                        for reply in replies:
                            messages[0] += 1
                            yield reply

                    for reply in unbatched(counted(call)):
                        if reply.dropped:
                            resyncs += 1
                            last = None
                        if not reply.seq:
                            continue
                        if last is not None and reply.seq != last + 1:
                            gaps += 1
                        if last_step is not None and reply.metrics.step != last_step + 1:
                            gaps += 1
                        last, last_step, seen = reply.seq, reply.metrics.step, seen + 1
                        if seen == 10 and pause_s:
                            time.sleep(pause_s)  # not reading: the pump waits for room
                        if seen >= wanted:
                            break
                    call.cancel()
                    results.append((batch, seen, gaps, resyncs, messages[0]))

            job_id = c.submit(controller_pb2.SubmitJobRequest(spec=_spec("busy", 1, 10**7))).id
            await _until(lambda: store.steps_completed(job_id) > 10)
            # Unbatched and batched, each once pausing and once reading on.
            watchers = [
                threading.Thread(target=watch, args=(job_id, 1.0 if n % 2 else 0.0, n >= 2))
                for n in range(4)
            ]
            for t in watchers:
                t.start()
            await asyncio.to_thread(lambda: [t.join(60) for t in watchers])
            assert len(results) == 4, results
            for batch, seen, gaps, _resyncs, messages in results:
                assert seen >= wanted and gaps == 0, results
                if batch:
                    assert messages * 4 <= seen, results  # several steps per reply
            # Every watcher went away: none of their followers stays on the bus.
            await _until(lambda: not c.events.followed(job_id), 10)
            c.cancel(job_id, "done")

    asyncio.run(main())


def test_a_drain_its_caller_gives_up_on_is_undone_and_scheduling_goes_on(tmp_path) -> None:
    """`pathways-lite down` interrupted (or its Drain deadline passed) cancels the drain on
    the controller: the jobs it asked to drain still finish their drain (checkpointed and
    queued, not cut off by the cancel), and the controller schedules again, so they run on
    and a job submitted after is placed. Before, `draining` stayed set: every scheduling
    pass was skipped for good while the controller kept accepting jobs."""

    async def run() -> None:
        sim = SimCluster.uniform(1, step_s=STEP_S)
        store = JobStore.open_controller(tmp_path / "state")
        async with _controller(sim, store) as c:
            job = c.submit(controller_pb2.SubmitJobRequest(spec=_spec("long", 1, 60))).id
            await _until(lambda: bool(store.metrics(job, from_step=3)))
            drain = asyncio.create_task(c.drain())
            await asyncio.sleep(0)  # it asked the job to drain and waits for it
            assert c.runners[job].drain_requested
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain
            after = c.submit(controller_pb2.SubmitJobRequest(spec=_spec("after", 1, 5))).id
            await _until(lambda: store.get_job(after).state.terminal, 60)
            await _until(lambda: store.get_job(job).state.terminal, 60)
            assert store.get_job(after).state == JobState.SUCCEEDED
            assert store.get_job(job).state == JobState.SUCCEEDED
            messages = [e.message for e in store.events(job)]
            # Its drain was finished (not cut off: "The controller stopped; the job will run
            # again." is the message of a runner cancelled by the controller's stop).
            assert any("The controller stopped at step" in m for m in messages), messages
            assert [m.step for m in store.metrics(job)] == list(range(60))

    asyncio.run(run())


def test_what_an_earlier_controller_left_on_the_hosts_is_unloaded_unless_adopted(
    tmp_path,
) -> None:
    """Jobs the hosts still hold from an earlier controller (device memory the scheduler does
    not count) are unloaded at start, all but the RUNNING training job kept where it is (its
    state is adopted there); that one is unloaded when it is cancelled while still queued.
    Before, a cancelled job's copy, an unknown job's and a kept job's stayed loaded for
    good."""
    from pathways_lite.v1 import worker_pb2, worker_pb2_grpc

    async def run() -> None:
        sim = SimCluster.uniform(2, step_s=STEP_S)
        addresses = await sim.start()
        store = JobStore.open_controller(tmp_path / "state")
        (kept, _), (gone, _) = store.create_jobs(
            [(_spec("kept", 1, 20), None), (_spec("gone", 1, 20), None)]
        )
        store.transition(kept.id, JobState.RUNNING, reason="scheduled")
        store.transition(gone.id, JobState.CANCELLED, reason="user_cancelled")
        left = {"island-0": [gone.id, "ghost.sample-1"], "island-1": [kept.id, "ghost.sample-1"]}
        for island, jobs in left.items():
            async with grpc.aio.insecure_channel(addresses[island]) as channel:
                stub = worker_pb2_grpc.WorkerServiceStub(channel)
                for job_id in jobs:  # at the generation its record has, as a controller loads
                    await stub.LoadJob(worker_pb2.LoadJobRequest(job_id=job_id, generation=0))
        async with _controller(sim, store, addresses) as c:
            # No pass has run yet: the leftovers are gone, the kept job waits to be adopted.
            assert set(sim.hosts["island-0"].jobs) == set()
            assert set(sim.hosts["island-1"].jobs) == {kept.id}
            assert store.get_job(kept.id).state == JobState.QUEUED
            c.cancel(kept.id, "not wanted any more")
            await _until(lambda: not sim.hosts["island-1"].jobs, 10)

    asyncio.run(run())


def test_a_kept_job_placed_elsewhere_is_unloaded_where_it_was_kept(tmp_path) -> None:
    """Two jobs an earlier controller left running on one island that holds one: the first
    is adopted there, the second (its hint dropped: no room) starts on the other island and
    its copy on the first is unloaded (it stayed for good before)."""
    from pathways_lite.controller.resolved import ResolvedJob
    from pathways_lite.v1 import worker_pb2, worker_pb2_grpc
    from pathways_lite.workers.sim_host import SimIsland

    budget = ResolvedJob.resolve(_spec("x", 1, 2)).bytes_per_device

    async def run() -> None:
        sim = SimCluster([SimIsland(f"island-{i}", STEP_S, budget, budget) for i in range(2)])
        addresses = await sim.start()
        store = JobStore.open_controller(tmp_path / "state")
        records = store.create_jobs([(_spec(f"k{i}", 1, 1000), None) for i in range(2)])
        async with grpc.aio.insecure_channel(addresses["island-1"]) as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            for record, _ in records:
                store.transition(record.id, JobState.RUNNING, reason="scheduled")
                # At the generation its record has, as a controller loads it.
                await stub.LoadJob(worker_pb2.LoadJobRequest(job_id=record.id, generation=0))
        async with _controller(sim, store, addresses):
            ids = {r.id for r, _ in records}
            hosts = sim.hosts
            await _until(lambda: len(hosts["island-0"].jobs) == 1, 10)
            await _until(lambda: len(hosts["island-1"].jobs) == 1, 10)
            assert set(hosts["island-0"].jobs) | set(hosts["island-1"].jobs) == ids

    asyncio.run(run())


def test_a_job_drained_as_soon_as_its_hosts_state_is_adopted_is_checkpointed_there(
    tmp_path,
) -> None:
    """A job an earlier controller left running, adopted from its hosts' state at step 12
    (its newest checkpoint: step 10), then drained before it runs a step: the drain saves
    step 12 (the state held), so the next controller resumes there. Before, the drain saved
    nothing (no step run since the attempt began) and the job went back to step 10: the
    adopted steps were lost."""
    from pathways_lite.workers.sim_host import SimIsland

    async def run() -> None:
        sim = SimCluster([SimIsland("island-0", 1.0, load_s=0.5)])
        addresses = await sim.start()
        store = JobStore.open_controller(tmp_path / "state")
        record = _left_running(store, _spec("adopted", 1, 100), 12)
        old = tmp_path / "state" / "checkpoints" / record.id
        store.register_checkpoint(record.id, record.generation, 10, str(old / "g1-step10"))
        # The host holds 12 steps.
        await _hold_on_hosts(addresses.values(), record, old / "g1-step12", old)
        async with _controller(sim, store, addresses, state_dir=tmp_path / "state") as c:
            await _until(lambda: record.id in c.runners, 10)
            await asyncio.sleep(0.2)  # its adoption's load (0.5 s) is in flight
            (drained,) = await asyncio.wait_for(c.drain(), 20)
            messages = [e.message for e in store.events(record.id)]
            assert any("Resumed at step 12 from the state" in m for m in messages), messages
            assert (drained.step, drained.checkpointed) == (12, True), drained
            assert store.get_job(record.id).state == JobState.QUEUED
            assert [m.step for m in store.metrics(record.id)] == list(range(12))

    asyncio.run(run())


def test_an_adoption_that_fails_half_way_falls_back_to_the_checkpoint_without_a_retry(
    tmp_path,
) -> None:
    """A two-island job an earlier controller left running: one island takes the new
    generation with its state, the other's host cannot keep it. The job then restores its
    checkpoint, in that same generation, on both: the island that took the adoption's load
    has dropped it first, so the load is not refused as "a different spec" (which cost a
    retry before, and failed a job with no retries left)."""
    from pathways_lite.workers.sim_host import SimIsland

    async def run() -> None:
        sim = SimCluster(
            [SimIsland("island-0", STEP_S), SimIsland("island-1", STEP_S, keep_state_fails=True)]
        )
        addresses = await sim.start()
        store = JobStore.open_controller(tmp_path / "state")
        record = _left_running(store, _spec("two", 2, 30), 12)
        old = tmp_path / "state" / "checkpoints" / record.id
        store.register_checkpoint(record.id, record.generation, 10, str(old / "g1-step10"))
        await _hold_on_hosts(addresses.values(), record, old / "g1-step12")
        async with _controller(sim, store, addresses, state_dir=tmp_path / "state"):
            await _until(lambda: store.get_job(record.id).state.terminal, 30)
            events = [(e.kind, e.message) for e in store.events(record.id)]
            assert store.get_job(record.id).state == JobState.SUCCEEDED, events
            assert not [m for k, m in events if k == "failure"], events
            assert any("steps 10 to 29 run again" in m for _, m in events), events
            assert [m.step for m in store.metrics(record.id)] == list(range(30))

    asyncio.run(run())


def test_a_job_cancelled_while_its_drain_saves_ends_cancelled_with_its_steps_kept(
    tmp_path,
) -> None:
    """A cancel that comes while a drain's checkpoint is being written: the job ends
    CANCELLED with every step it ran recorded, no failure and no requeue. Before, the drain
    went on: the job was requeued (a new generation; the metrics after its newest checkpoint
    trimmed, all of them had the save failed) and its move back to QUEUED failed inside the
    runner."""

    async def run() -> None:
        sim = SimCluster([SimIsland("island-0", STEP_S, save_s=1.0)])
        store = JobStore.open_controller(tmp_path / "state")
        async with _controller(sim, store, state_dir=tmp_path / "state") as c:
            job = c.submit(controller_pb2.SubmitJobRequest(spec=_spec("long", 1, 1000))).id
            await _until(lambda: bool(store.metrics(job, from_step=5)))
            task = c.runners[job].task
            generation = store.get_job(job).generation
            drain = asyncio.create_task(c.drain())
            await asyncio.sleep(0.5)  # its checkpoint (1 s) is being written
            c.cancel(job, "while draining")
            drained = await asyncio.wait_for(drain, 20)
            await asyncio.wait_for(asyncio.shield(task), 20)
            assert store.get_job(job).state == JobState.CANCELLED
            assert job not in [d.job_id for d in drained], drained
            events = [(e.kind, e.message) for e in store.events(job)]
            assert not [m for k, m in events if k == "failure"], events
            steps = [m.step for m in store.metrics(job)]
            assert steps == list(range(len(steps))) and len(steps) >= 5, steps
            assert c.runners.get(job) is None
            assert store.get_job(job).generation == generation  # not requeued

    asyncio.run(run())


def test_a_serve_job_drained_while_preempted_goes_back_to_the_queue(tmp_path) -> None:
    """A serve job suspended for a higher-priority job, then the controller drained: the
    serve job is queued again and named in the drain's report (the next controller starts
    its service). Before, it stayed SUSPENDED in the store, missing from the report."""
    from pathways_lite.controller.resolved import ResolvedJob

    async def run() -> None:
        store = JobStore.open_controller(tmp_path / "state")
        source = _finished_source(store, tmp_path)
        serve = load_spec_text(f"""
name: srv
kind: serve
model: {{preset: palm-tiny}}
islands: 1
devices_per_island: 1
mesh: {{data: 1, model: 1}}
init_from: {{job: {source.id}}}
train: {{global_batch: 8, seq_len: 64}}
data: {{source: stdlib, vocab_size: 1024}}
serve: {{max_batch: 2, max_seq_len: 64}}
""")
        # Room for the service or the training job, not both (a loaded job measures 90%).
        budget = ResolvedJob.resolve(serve).bytes_per_device
        sim = SimCluster([SimIsland("island-0", STEP_S, budget, budget * 9 // 10)])
        async with _controller(sim, store) as c:
            srv = c.submit(controller_pb2.SubmitJobRequest(spec=serve)).id
            await _until(
                lambda: (
                    c.serving.jobs.get(srv) is not None and c.serving.jobs[srv].status == "serving"
                ),
                20,
            )
            high = _spec("high", 1, 10_000, priority=5)
            c.submit(controller_pb2.SubmitJobRequest(spec=high))
            await _until(lambda: store.get_job(srv).state == JobState.SUSPENDED, 20)
            drained = await asyncio.wait_for(c.drain(), 20)
            assert srv in [d.job_id for d in drained], drained
            assert store.get_job(srv).state == JobState.QUEUED

    asyncio.run(run())


def test_steps_whose_write_failed_are_written_with_the_next_flush(tmp_path) -> None:
    """The database locked past its timeout while a job runs (another process writing, a
    full disk): the batch of steps that could not be written stays pending and goes with
    the next flush, so the job succeeds with every step recorded once. Before, the batch
    was dropped and every later one was refused as out of order: the job's metrics stopped
    there for good (and the job failed as an internal error)."""
    import sqlite3

    async def run() -> None:
        sim = SimCluster.uniform(1, step_s=STEP_S)
        store = JobStore.open_controller(tmp_path / "state")
        store._conn.execute("PRAGMA busy_timeout = 50")  # fail fast while locked (10 s)
        async with _controller(sim, store) as c:
            other = sqlite3.connect(store.path, isolation_level=None)
            try:
                job = c.submit(controller_pb2.SubmitJobRequest(spec=_spec("locked", 1, 80))).id
                await _until(lambda: bool(store.metrics(job, from_step=10)))
                other.execute("BEGIN IMMEDIATE")  # another writer holds the database
                await asyncio.sleep(0.8)  # a few flushes fail meanwhile
                other.execute("ROLLBACK")
                await _until(lambda: store.get_job(job).state.terminal, 30)
                events = [(e.kind, e.message) for e in store.events(job)]
                assert store.get_job(job).state == JobState.SUCCEEDED, events
                assert [m.step for m in store.metrics(job)] == list(range(80))
            finally:
                other.close()

    asyncio.run(run())


@pytest.mark.timeout(60)
def test_while_the_database_is_locked_a_cancel_changes_nothing_and_watchers_stay(
    tmp_path,
) -> None:
    """Another writer holds the database: CancelJob answers UNAVAILABLE and the job runs on
    (before, its runner stopped while the store still said RUNNING: a job nothing ran), and a
    new WatchJob stream opens and follows it (before, the flush it starts with ended it with
    an error). Once the database is free, the cancel goes through."""
    import sqlite3
    import threading

    from pathways_lite.v1 import controller_pb2_grpc

    async def main() -> None:
        async with _served(tmp_path, 1, step_s=0.005) as (c, store, address):
            store._conn.execute("PRAGMA busy_timeout = 50")  # fail fast while locked (10 s)
            job = c.submit(controller_pb2.SubmitJobRequest(spec=_spec("held", 1, 10**6))).id
            await _until(lambda: store.steps_completed(job) > 5)
            other = sqlite3.connect(store.path, isolation_level=None)
            seen: list[int] = []

            def watch(stub) -> None:
                request = controller_pb2.WatchJobRequest(job_id=job, batch_steps=True)
                call = stub.WatchJob(request, timeout=20)
                for reply in call:
                    if reply.HasField("metrics"):
                        seen.append(reply.metrics.step)
                        if len(seen) >= 3:
                            break
                call.cancel()

            with grpc.insecure_channel(address) as channel:
                stub = controller_pb2_grpc.ControllerServiceStub(channel)
                try:
                    other.execute("BEGIN IMMEDIATE")  # another writer holds the database
                    with pytest.raises(grpc.RpcError) as refused:
                        await asyncio.to_thread(
                            stub.CancelJob, controller_pb2.CancelJobRequest(job_id=job)
                        )
                    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
                    assert "locked" in refused.value.details()
                    watcher = threading.Thread(target=watch, args=(stub,))
                    watcher.start()
                    await asyncio.to_thread(watcher.join, 15)
                    assert len(seen) >= 3, seen  # the stream opened and followed the job
                    assert not c.runners[job].cancel_requested
                finally:
                    other.execute("ROLLBACK")
                    other.close()
                ran = store.steps_completed(job)
                await _until(lambda: store.steps_completed(job) > ran + 5, 20)  # it runs on
                assert store.get_job(job).state == JobState.RUNNING
                reply = await asyncio.to_thread(
                    stub.CancelJob, controller_pb2.CancelJobRequest(job_id=job)
                )
                assert reply.job.state == controller_pb2.JOB_STATE_CANCELLED
            await _until(lambda: job not in c.runners, 20)

    asyncio.run(main())


def test_an_adoption_whose_replayed_steps_cannot_be_written_restores_the_checkpoint(
    tmp_path,
) -> None:
    """The steps a dead controller's hosts ran past the record are replayed and written
    before the adoption goes on; when that write fails (the database locked), the job restores
    its checkpoint and runs them again, every step recorded once. Before, the write's error
    failed the job as an internal error."""
    from pathways_lite.controller.states import StoreUnavailableError

    async def run() -> None:
        sim = SimCluster([SimIsland("island-0", STEP_S)])
        addresses = await sim.start()
        store = JobStore.open_controller(tmp_path / "state")
        record = _left_running(store, _spec("replayed", 1, 30), 12)
        old = tmp_path / "state" / "checkpoints" / record.id
        store.register_checkpoint(record.id, record.generation, 10, str(old / "g1-step10"))
        # 2 steps past the record.
        await _hold_on_hosts(addresses.values(), record, old / "g1-step14", old)
        async with _controller(sim, store, addresses, state_dir=tmp_path / "state") as c:
            flush = c.reporter.flush

            def locked_until_restored(job_id: str) -> None:
                # Every write of the job's steps fails until its restore is recorded.
                if not [e for e in store.events(job_id) if e.kind == "restore"]:
                    raise StoreUnavailableError(f"writing steps of job {job_id!r} failed")
                flush(job_id)

            c.reporter.flush = locked_until_restored
            await _until(lambda: store.get_job(record.id).state.terminal, 30)
            events = [(e.kind, e.message) for e in store.events(record.id)]
            assert store.get_job(record.id).state == JobState.SUCCEEDED, events
            assert not [m for k, m in events if k == "failure"], events
            assert not any("state its islands kept" in m for _, m in events), events
            assert any("steps 10 to 29 run again" in m for _, m in events), events
            assert [m.step for m in store.metrics(record.id)] == list(range(30))

    asyncio.run(run())


def test_steps_whose_write_failed_as_their_job_ended_are_written_after_it(tmp_path) -> None:
    """The write of a job's last steps fails (the database locked) and nothing else comes to
    flush the job (it ended: no step, no stream): the batch is tried again on its own until
    it is written. Before, those rows stayed in memory for good (lost at the next restart)."""
    import sqlite3

    from pathways_lite.controller.jobs import FLUSH_S

    async def run() -> None:
        sim = SimCluster.uniform(1, step_s=STEP_S)
        store = JobStore.open_controller(tmp_path / "state")
        write = store.record_metrics_batch
        locked = {"on": False, "refused": 0}

        def record_metrics_batch(job_id, rows):
            if locked["on"]:
                locked["refused"] += 1
                raise sqlite3.OperationalError("database is locked")
            return write(job_id, rows)

        store.record_metrics_batch = record_metrics_batch
        async with _controller(sim, store) as c:
            job = c.submit(controller_pb2.SubmitJobRequest(spec=_spec("ends", 1, 30))).id
            await _until(lambda: store.steps_completed(job) >= 20)
            locked["on"] = True  # the rest of its steps' writes fail until it has ended
            await _until(lambda: store.get_job(job).state.terminal, 30)
            await asyncio.sleep(2 * FLUSH_S)  # past its batch's own timer, which fails too
            locked["on"] = False
            assert store.get_job(job).state == JobState.SUCCEEDED
            assert locked["refused"] >= 2 and store.steps_completed(job) < 30
            await _until(lambda: store.steps_completed(job) == 30, 5)
            assert [m.step for m in store.metrics(job)] == list(range(30))

    asyncio.run(run())


def test_a_checkpoint_one_island_cannot_read_falls_back_without_a_retry(tmp_path) -> None:
    """A two-island job restoring its newest checkpoint, whose part one island cannot read
    (DATA_LOSS: marked corrupt): the other island had loaded it in the attempt's generation,
    and is unloaded before the previous checkpoint's load of that generation (it refused it
    before, "already loaded with a different spec": a retry charged, the job failed with
    none left)."""

    async def run() -> None:
        sim = SimCluster(
            [SimIsland("island-0", STEP_S), SimIsland("island-1", STEP_S, unreadable={20})]
        )
        store = JobStore.open_controller(tmp_path / "state")
        record = _left_running(store, _spec("two", 2, 30), 22)
        old = tmp_path / "state" / "checkpoints" / record.id
        for step in (10, 20):
            store.register_checkpoint(record.id, 0, step, str(old / f"g0-step{step}"))
        async with _controller(sim, store, state_dir=tmp_path / "state"):
            await _until(lambda: store.get_job(record.id).state.terminal, 30)
            events = [(e.kind, e.message) for e in store.events(record.id)]
            assert store.get_job(record.id).state == JobState.SUCCEEDED, events
            assert not [m for k, m in events if k == "failure"], events
            assert any("step 20" in m and "unreadable" in m for _, m in events), events
            assert any("steps 10 to 29 run again" in m for _, m in events), events
            assert [m.step for m in store.metrics(record.id)] == list(range(30))

    asyncio.run(run())


def test_a_checkpoint_the_hosts_cannot_find_but_the_controller_can_is_not_marked_corrupt(
    tmp_path,
) -> None:
    """The island's hosts do not find the newest checkpoint (step 20) that the controller
    finds committed (a state directory not shared with their node): the job fails its
    attempts as an infrastructure failure naming that, and the checkpoint stays committed.
    Before, it was marked corrupt, as was every older one the hosts could not find either,
    and the job started again from step 0. A checkpoint the controller does not find
    either is skipped as before (here step 20 of the second job: it resumes from 10)."""

    async def run() -> None:
        sim = SimCluster([SimIsland("island-0", STEP_S, unseen={20})])
        store = JobStore.open_controller(tmp_path / "state")
        kept = _left_running(store, _spec("kept", 1, 30), 22)
        gone = _left_running(store, _spec("gone", 1, 30), 22)
        root = tmp_path / "state" / "checkpoints"
        for record in (kept, gone):
            for step in (10, 20):
                path = root / record.id / f"g0-step{step}"
                if record is kept:
                    path.mkdir(parents=True)  # the controller finds them committed
                store.register_checkpoint(record.id, 0, step, str(path))
        async with _controller(sim, store, state_dir=tmp_path / "state"):
            await _until(lambda: store.get_job(kept.id).state.terminal, 60)
            await _until(lambda: store.get_job(gone.id).state.terminal, 60)
            events = [(e.kind, e.message) for e in store.events(kept.id)]
            assert store.get_job(kept.id).state == JobState.FAILED, events
            assert any(
                "cannot find the checkpoint at step 20" in m for k, m in events if k == "failure"
            ), events
            every = store.checkpoints(kept.id, list(CheckpointState))
            assert [(c.step, c.state) for c in every] == [
                (10, CheckpointState.COMMITTED),
                (20, CheckpointState.COMMITTED),
            ]
            events = [(e.kind, e.message) for e in store.events(gone.id)]
            assert store.get_job(gone.id).state == JobState.SUCCEEDED, events
            assert any("steps 10 to 29 run again" in m for _, m in events), events

    asyncio.run(run())


def test_a_scheduling_pass_that_fails_is_run_again_without_another_event(
    tmp_path, monkeypatch
) -> None:
    """The database is locked while a pass writes an event (here: that a 2-island job cannot
    run while island-1 is down): the pass fails, and the controller runs it again a moment
    later on its own, so the 1-island job behind it starts on the free island-0 (before:
    nothing looked at the queue until some unrelated event, here never), and the event whose
    write failed is written then."""
    import sqlite3

    async def run() -> None:
        sim = SimCluster.uniform(2, step_s=0.0)
        store = JobStore.open_controller(tmp_path / "state")
        async with _controller(sim, store) as c:
            add_event = store.add_event
            failed: list[str] = []

            def locked_once(job_id, kind, message):
                if kind == "scheduler" and not failed:
                    failed.append(message)
                    raise sqlite3.OperationalError("database is locked")
                return add_event(job_id, kind, message)

            monkeypatch.setattr(store, "add_event", locked_once)
            c.scheduler.mark_down("island-1", "its hosts are lost")
            gang = c.submit(controller_pb2.SubmitJobRequest(spec=_spec("gang", 2, 5))).id
            single = c.submit(controller_pb2.SubmitJobRequest(spec=_spec("single", 1, 5))).id
            await _until(lambda: bool(failed), 10)
            await _until(lambda: store.get_job(single).state.terminal, 10)
            assert store.get_job(single).state == JobState.SUCCEEDED
            assert c.scheduler.islands_of(single) == []
            messages = [e.message for e in store.events(gang) if e.kind == "scheduler"]
            # Written first on the next pass (then again when its measured demand replaces
            # the estimate in it).
            assert messages[:1] == failed, (messages, failed)
            assert "island-1 (its hosts are lost)" in c.why(store.get_job(gang))

    asyncio.run(run())


def test_a_sample_that_its_host_refuses_is_told_with_the_hosts_status_and_words(
    tmp_path,
) -> None:
    """A host's error other than a bad argument or a job not loaded reached the caller as
    INTERNAL "Sample failed: <AioRpcError ...>" (UNAVAILABLE of a dead island, a deadline, a
    host out of memory: nothing to tell whether to try again). A simulated host answers
    Sample UNIMPLEMENTED: that status and its words come back."""
    import grpc

    from pathways_lite.v1 import controller_pb2_grpc

    async def main() -> None:
        async with _served(tmp_path, 1, step_s=0.01) as (c, store, address):
            job_id = c.submit(controller_pb2.SubmitJobRequest(spec=_spec("s", 1, 10**7))).id
            await _until(lambda: store.steps_completed(job_id) > 0)
            async with grpc.aio.insecure_channel(address) as channel:
                stub = controller_pb2_grpc.ControllerServiceStub(channel)
                request = controller_pb2.SampleJobRequest(
                    job_id=job_id, prompt="x", max_new_tokens=1
                )
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Sample(request, timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED, refused.value
            details = refused.value.details()
            assert f"sampling job {job_id!r} on island" in details, details
            assert "a simulated host does not sample" in details and "AioRpc" not in details
            c.cancel(job_id, "done")

    asyncio.run(main())
