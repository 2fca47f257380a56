"""WatchJob and StreamLogs of a follower that lagged, on the real controller service
(controller/service.py `serve`, over real gRPC) over a simulated island (workers/sim_host.py,
no JAX): a watcher that lost updates gets the record again and no older record after it; a
log follower that lost records is told how many, in the stream, where they were.

The lag is made exact: the follower's queue is small and the updates come in one burst on the
controller's loop, as a busy controller publishes them between its loop's turns.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time

import grpc
import pytest
from test_scale_harness import _prepare
from test_scale_harness import _spec as sim_spec  # tests/ is on sys.path

from pathways_lite.client import ClientError, ControllerClient
from pathways_lite.controller.auth import read_token, token_path
from pathways_lite.controller.core import Controller
from pathways_lite.controller.states import JobState
from pathways_lite.controller.store import JobStore
from pathways_lite.local import LocalCluster
from pathways_lite.v1 import controller_pb2, controller_pb2_grpc
from pathways_lite.workers.sim_host import SimCluster, connect_islands

pytestmark = pytest.mark.timeout(60)


def _spec(name: str, steps: int) -> controller_pb2.JobSpec:
    return sim_spec(name, 1, steps)


@contextlib.asynccontextmanager
async def _waiting_job(tmp_path, token=None):
    """The controller's service over one simulated island, with a job running and one that
    waits for it (queued: its record changes only when the test changes it): yields (the
    controller, the service's address, the waiting job's id)."""
    from pathways_lite.controller.service import serve

    sim = SimCluster.uniform(1, step_s=0.01)
    hosts = await connect_islands(await sim.start())
    store = JobStore.open_controller(tmp_path / "state")
    c = Controller(store, hosts, prepare=_prepare, peak_flops=1e12)
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    server = asyncio.create_task(
        serve(c, "127.0.0.1", 0, started=port.set_result, stop=stop, grace_s=1.0, token=token)
    )
    try:
        address = f"127.0.0.1:{await port}"
        ahead = c.submit(controller_pb2.SubmitJobRequest(spec=_spec("ahead", 10**7))).id
        spec = _spec("waits", 10)
        spec.after.append(ahead)
        job_id = c.submit(controller_pb2.SubmitJobRequest(spec=spec)).id
        await _until(lambda: store.get_job(ahead).state == JobState.RUNNING)
        assert store.get_job(job_id).state == JobState.QUEUED
        yield c, address, job_id
    finally:
        stop.set()
        await server
        await sim.stop()
        store.close()


async def _until(predicate, timeout_s: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_a_watcher_that_lagged_gets_the_record_again_and_no_older_one_after_it(
    tmp_path,
) -> None:
    async def main() -> None:
        async with _waiting_job(tmp_path) as (c, address, job_id):
            replies: list[controller_pb2.WatchJobReply] = []
            resynced = threading.Event()

            def watch() -> None:
                with grpc.insecure_channel(address) as channel:
                    stub = controller_pb2_grpc.ControllerServiceStub(channel)
                    for reply in stub.WatchJob(controller_pb2.WatchJobRequest(job_id=job_id)):
                        replies.append(reply)
                        if reply.dropped:
                            resynced.set()

            c.events.queue_size = 4  # the watcher's, small
            watcher = threading.Thread(target=watch)
            watcher.start()
            await _until(lambda: len(replies) == 1)  # its record: it follows the bus
            # 20 updates of the record in one burst into a queue of 4: 16 are lost (UpdateJob
            # and a phase change each publish the record).
            for n in range(10):
                c.update(job_id, n)
                c.reporter.phase(job_id, f"phase-{n}")
            await _until(resynced.is_set)
            await asyncio.sleep(0.2)  # what it would send after the record, it sends now
            c.cancel(job_id, "done")
            await asyncio.to_thread(watcher.join, 30)
            assert not watcher.is_alive()
            (resync,) = [n for n, r in enumerate(replies) if r.dropped]
            assert replies[resync].dropped == 16
            assert replies[resync].job.spec.priority == 9  # the record as it is now
            # After it: the job's end only (the updates queued before it are older).
            after = [(r.job.state, r.job.spec.priority) for r in replies[resync + 1 :]]
            assert after == [(controller_pb2.JOB_STATE_CANCELLED, 9)], after

    asyncio.run(main())


def test_a_log_follower_that_lagged_is_told_how_many_records_it_lost(tmp_path) -> None:
    async def main() -> None:
        async with _waiting_job(tmp_path) as (c, address, job_id):
            messages: list[str] = []
            followed = threading.Event()

            def follow() -> None:
                with grpc.insecure_channel(address) as channel:
                    stub = controller_pb2_grpc.ControllerServiceStub(channel)
                    request = controller_pb2.StreamLogsRequest(job_id=job_id, follow=True)
                    call = stub.StreamLogs(request)
                    followed.set()
                    for reply in call:
                        if reply.record.source == "test" or "dropped" in reply.record.message:
                            messages.append(reply.record.message)
                        if reply.record.message == "line 9":
                            break
                    call.cancel()

            c.logs.followers.queue_size = 4  # the follower's, small
            reader = threading.Thread(target=follow)
            reader.start()
            await _until(lambda: followed.is_set() and job_id in c.logs.followers._queues)
            # 10 records in one burst into a queue of 4: 6 are lost.
            for n in range(10):
                c.logs.add(job_id, controller_pb2.LogRecord(source="test", message=f"line {n}"))
            await asyncio.to_thread(reader.join, 30)
            assert not reader.is_alive()
            lost = "... 6 log records dropped (the reader was too slow) ..."
            assert messages == [lost, "line 6", "line 7", "line 8", "line 9"], messages

    asyncio.run(main())


def test_a_new_job_and_a_new_priority_are_told_to_the_cluster_pages_followers(tmp_path) -> None:
    """SubmitJob and UpdateJob publish the job's record on the bus (the cluster page follows
    every job there): a job queued behind others appeared on an open page only at its first
    state change, and a new priority not at all."""
    from pathways_lite.controller.bus import ALL_JOBS

    async def main() -> None:
        async with _waiting_job(tmp_path) as (c, address, job_id):
            queue = c.events.subscribe(ALL_JOBS)
            async with grpc.aio.insecure_channel(address) as channel:
                stub = controller_pb2_grpc.ControllerServiceStub(channel)
                request = controller_pb2.SubmitJobRequest(spec=_spec("new", 10))
                new = (await stub.SubmitJob(request, timeout=30)).job
                update = controller_pb2.UpdateJobRequest(job_id=job_id, priority=7)
                await stub.UpdateJob(update, timeout=30)
            records = {}
            async with asyncio.timeout(15):  # (steps keep coming: a bound on the whole wait)
                while new.id not in records or job_id not in records:
                    got_id, reply = await queue.get()
                    if reply.HasField("job"):
                        records.setdefault(got_id, reply.job)  # (the new job may start)
            assert records[new.id].state == controller_pb2.JOB_STATE_QUEUED
            assert records[new.id].queue_position >= 1
            assert records[job_id].spec.priority == 7

    asyncio.run(main())


def test_a_watch_opened_with_a_token_rotated_away_ends_when_its_grace_ends(tmp_path) -> None:
    """The access token is checked when a call opens; a WatchJob opened with the old token of
    a rotation now ends UNAUTHENTICATED at its first reply after the grace (it served on for
    as long as it stayed open), while one opened with the new token goes on."""
    from pathways_lite.workers.auth import Credential, bearer

    credential = Credential("old-token")

    async def main() -> None:
        async with _waiting_job(tmp_path, token=credential) as (c, address, job_id):
            outcome: dict[str, object] = {}
            got: dict[str, int] = {"old-token": 0, "new-token": 0}

            def watch(token: str) -> None:
                with grpc.insecure_channel(address) as channel:
                    stub = controller_pb2_grpc.ControllerServiceStub(channel)
                    call = stub.WatchJob(
                        controller_pb2.WatchJobRequest(job_id=job_id),
                        metadata=(("authorization", bearer(token)),),
                        timeout=30,
                    )
                    try:
                        for _ in call:
                            got[token] += 1
                            if token == "new-token" and outcome.get("old-token"):
                                call.cancel()
                        outcome[token] = "ended"
                    except grpc.RpcError as e:
                        outcome[token] = e.code()

            old = threading.Thread(target=watch, args=("old-token",))
            old.start()
            await _until(lambda: got["old-token"] == 1)
            credential.rotate("new-token", grace_s=0.5)
            new = threading.Thread(target=watch, args=("new-token",))
            new.start()
            await _until(lambda: got["new-token"] == 1)
            n = 0
            while "old-token" not in outcome:  # updates of the record, one every 0.1 s
                assert n < 100, outcome
                c.update(job_id, n % 10)
                n += 1
                await asyncio.sleep(0.1)
            c.update(job_id, 3)  # one more for the new-token watcher to see the old's end
            await asyncio.to_thread(old.join, 30)
            await asyncio.to_thread(new.join, 30)
            assert outcome["old-token"] == grpc.StatusCode.UNAUTHENTICATED, outcome
            assert outcome["new-token"] == grpc.StatusCode.CANCELLED, outcome  # its own cancel
            assert got["new-token"] > 1

    asyncio.run(main())


def test_a_quiet_watch_opened_with_a_token_rotated_away_ends_too(tmp_path, monkeypatch) -> None:
    """A watch of a job that changes nothing sends nothing: the interceptor's check before a
    reply never ran, and one opened with a rotated-away token stayed open for as long as the
    job stayed quiet. The stream checks its credential itself every QUIET_RECHECK_S."""
    from pathways_lite.controller import service
    from pathways_lite.workers.auth import Credential, bearer

    monkeypatch.setattr(service, "QUIET_RECHECK_S", 0.3)
    credential = Credential("old-token")

    async def main() -> None:
        async with _waiting_job(tmp_path, token=credential) as (c, address, job_id):
            outcome: dict[str, object] = {}
            got: list = []

            def watch() -> None:
                with grpc.insecure_channel(address) as channel:
                    stub = controller_pb2_grpc.ControllerServiceStub(channel)
                    call = stub.WatchJob(
                        controller_pb2.WatchJobRequest(job_id=job_id),
                        metadata=(("authorization", bearer("old-token")),),
                        timeout=30,
                    )
                    try:
                        for reply in call:
                            got.append(reply)
                        outcome["end"] = "ended"
                    except grpc.RpcError as e:
                        outcome["end"] = e.code()
                        outcome["details"] = e.details()

            thread = threading.Thread(target=watch)
            thread.start()
            await _until(lambda: len(got) == 1)
            credential.rotate("new-token", grace_s=0.5)
            await asyncio.to_thread(thread.join, 20)
            assert not thread.is_alive(), "the quiet watch is still open"
            assert outcome["end"] == grpc.StatusCode.UNAUTHENTICATED, outcome
            assert "no longer accepted" in outcome["details"] and len(got) == 1

    asyncio.run(main())


@pytest.mark.timeout(90)
def test_a_watch_of_a_controller_that_stops_answering_fails_and_a_quiet_one_stays_open(
    tmp_path,
) -> None:
    """A controller whose machine vanished sends no FIN: its followers waited on a quiet
    stream for ever. The client's keepalive pings end the call UNAVAILABLE once they go
    unanswered (here a stopped process); while the controller answers them, a quiet stream
    stays open however often the client pings (the server's default answered pings more
    often than every 5 minutes without data with GOAWAY)."""
    cluster = LocalCluster(state_dir=tmp_path, simulate_islands=1, standby_controller=False)
    cluster.start()
    stopped = False
    try:
        client = ControllerClient(
            address=cluster.address, token=read_token(token_path(tmp_path)), keepalive_s=1.5
        )
        ahead = client.submit(_spec("ahead", 10**8)).id
        spec = _spec("waits", 10)
        spec.after.append(ahead)
        waits = client.submit(spec).id
        got: list = []
        outcome: dict[str, object] = {}

        def watch() -> None:
            try:
                for reply in client.watch(waits):
                    got.append(reply)
                outcome["end"] = "ended"
            except ClientError as e:
                outcome["end"] = e.code
                outcome["at"] = time.monotonic()

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got and got[0].job.state == controller_pb2.JOB_STATE_QUEUED, got
        time.sleep(5.0)  # three pings on a quiet stream
        assert thread.is_alive() and len(got) == 1, (outcome, got[1:])
        os.kill(cluster.controller_pid, signal.SIGSTOP)
        stopped, since = True, time.monotonic()
        thread.join(20)
        assert not thread.is_alive(), "the watch still waits on a controller that stopped"
        assert outcome["end"] == grpc.StatusCode.UNAVAILABLE, outcome
        assert outcome["at"] - since < 10
    finally:
        if stopped:
            os.kill(cluster.controller_pid, signal.SIGCONT)
        cluster.down()
