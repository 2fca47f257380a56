"""The controller's gRPC service (grpc.aio): controller.proto's rpcs over a `Controller`.

`ControllerServicer` answers users' rpcs by handing them to the controller's roles
(controller/core.py) and its views; WatchJob and StreamLogs follow the event bus and the log
buffer (controller/bus.py), never the database. `serve` adds the standard health service and
reflection, and the access token (controller/auth.py) on every other call.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc

import pathways_lite
from pathways_lite.v1 import common_pb2, controller_pb2, controller_pb2_grpc
from pathways_lite.workers import rpc
from pathways_lite.workers.auth import STILL_ACCEPTED, STREAM_REVOKED

from . import spec as spec_lib
from .bus import Follower, dropped_logs_record, now
from .core import Controller
from .jobs import Following
from .sampling import NoRoomError
from .states import (
    IllegalTransitionError,
    JobNotFoundError,
    JobState,
    RequestReusedError,
    StoreError,
    StoreUnavailableError,
)
from .views import timestamp_us
from .wire import CONTROLLER_WIRE_VERSION

logger = logging.getLogger(__name__)

# Replies a stream served on the controller's loop may run ahead of its caller.
STREAM_AHEAD = 256
# WatchJob with batch_steps: a reply per update of the bus (a flush of the job's steps, passed
# on whole), sent at most every BATCH_STEPS_S while steps keep coming (the updates that came
# meanwhile go together), and at most BATCH_STEPS_MAX steps in one reply.
BATCH_STEPS_S = 0.1
BATCH_STEPS_MAX = 512
# Streams' replies made on the controller's loop are handed to the server's loop at most once
# per WAKE_EVERY_S, all streams' at once: each hand-off is a self-pipe write and a GIL hand-over
# from the controller's thread (done once per turn of its loop, it was 6% of it under 200
# watchers).
WAKE_EVERY_S = 0.01
# How often a stream served from the controller's loop checks its credential while it sends
# nothing (workers/auth.py STILL_ACCEPTED; the interceptor checks before each reply).
QUIET_RECHECK_S = 15.0
# SubmitJob requests handled together at most (`Submissions`).
SUBMIT_BATCH = 50
SERVICE_NAME = controller_pb2.DESCRIPTOR.services_by_name["ControllerService"].full_name
SERVER_OPTIONS = (
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    # Clients ping while a call is open (pathways_lite/client.py KEEPALIVE_S), also on a
    # quiet stream: by default, pings more often than every 5 minutes without data (every 2
    # hours between calls) were struck, and the third strike's GOAWAY ended the caller's
    # stream. Pings are accepted at any rate (they cost the server a reply frame).
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    # A watcher whose machine vanished is noticed too: its stream ends, its queue goes.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.max_pings_without_data", 0),
)


# ---- the servicer --------------------------------------------------------------------------


# What users' errors mean on the wire (a sentence naming the field or value goes with each).
_rpc = rpc.error_mapping(
    (
        (spec_lib.InfeasibleSpecError, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (spec_lib.SpecError, grpc.StatusCode.INVALID_ARGUMENT),
        (JobNotFoundError, grpc.StatusCode.NOT_FOUND),
        (IllegalTransitionError, grpc.StatusCode.FAILED_PRECONDITION),
        (RequestReusedError, grpc.StatusCode.ALREADY_EXISTS),
        (NoRoomError, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
        (StoreUnavailableError, grpc.StatusCode.UNAVAILABLE),
        (StoreError, grpc.StatusCode.FAILED_PRECONDITION),
        # The database locked past its timeout, or full: nothing was changed; try again.
        (sqlite3.OperationalError, grpc.StatusCode.UNAVAILABLE),
    ),
    log=logger,
)
# The streams (WatchJob, StreamLogs) fail only on an unknown job or a bad argument.
_stream = rpc.error_mapping(
    (
        (JobNotFoundError, grpc.StatusCode.NOT_FOUND),
        (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    ),
    log=logger,
)


class ControllerServicer(controller_pb2_grpc.ControllerServiceServicer):
    """controller.proto's ControllerService over a `Controller`.

    The server may run on a loop of its own (`serve`: a thread apart from the controller's
    loop, so a busy controller does not slow the acceptance of calls). SubmitJob, GetJob,
    ListJobs and Info are answered on the server's loop: they read what is safe to read from
    another thread (the store, which is thread-safe; the cluster's shape and budgets; dict
    lookups) and SubmitJob writes only the store, handing the rest to the controller's loop
    (`Controller.submit`). Every other rpc runs on the controller's loop (`_on_controller`;
    a stream is pulled from there one reply at a time, so a slow reader still slows only
    itself).

    Args:
        controller: the controller.
        loop: the controller's loop; None when the server shares it.
    """

    def __init__(
        self, controller: Controller, loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        self.controller = controller
        self.store = controller.store
        self.views = controller.views
        self._loop = loop
        # Streams' `ready` events to set on the server's loop, handed over together at most
        # every WAKE_EVERY_S (`_wake_soon`).
        self._to_wake: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._submissions = Submissions(controller)

    async def _on_controller(self, coro: Any) -> Any:
        """Await `coro` on the controller's loop (a cancel reaches it there)."""
        if self._loop is None or self._loop is asyncio.get_running_loop():
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    async def _stream_on_controller(self, stream: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """The replies of `stream`, which runs on the controller's loop, handed over in
        batches: a pump there reads them as they come into a buffer (at most STREAM_AHEAD
        ahead of this caller) and wakes this loop once per batch, not once per reply (200
        busy watchers cost the controller's loop a cross-thread hand-off per reply before)."""
        if self._loop is None or self._loop is asyncio.get_running_loop():
            async for reply in stream:
                yield reply
            return
        here = asyncio.get_running_loop()
        lock = threading.Lock()
        buffer: collections.deque[Any] = collections.deque()
        ended: list[BaseException | None] = []  # [None] or [the error] once it ended
        flags = {"woken": False, "full": False}
        ready = asyncio.Event()  # this loop's: replies (or the end) are waiting
        room = asyncio.Event()  # the controller loop's: the buffer has room again

        def wake() -> None:  # on the controller's loop, `lock` held
            if not flags["woken"]:
                flags["woken"] = True
                self._wake_soon(here, ready)

        async def pump() -> None:
            try:
                async for reply in stream:
                    while True:
                        with lock:
                            if len(buffer) < STREAM_AHEAD:
                                buffer.append(reply)
                                wake()
                                break
                            flags["full"] = True
                            room.clear()
                        await room.wait()
            except BaseException as e:  # its caller raises it (a cancel: it went away)
                with lock:
                    ended.append(e)
                    wake()
                # Cancelled while the buffer was full: `stream` waits at a yield; end it.
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    await aclose()
                return
            with lock:
                ended.append(None)
                wake()

        pumping = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        still_accepted = STILL_ACCEPTED.get()
        revoked: list[bool] = []
        quiet = None
        if still_accepted is not None:
            # A stream that sends nothing (a queued job's watch) checks its credential every
            # QUIET_RECHECK_S itself: the interceptor checks it only before a reply, and such
            # a stream opened with a rotated-away token stayed open for as long as it was quiet.
            async def recheck() -> None:
                while True:
                    await asyncio.sleep(QUIET_RECHECK_S)
                    if not still_accepted():
                        revoked.append(True)
                        ready.set()
                        return

            quiet = asyncio.ensure_future(recheck())
        try:
            while True:
                await ready.wait()
                if revoked:
                    raise rpc.RpcRejection(
                        grpc.StatusCode.UNAUTHENTICATED,
                        f"{STREAM_REVOKED} Open it again with the current token.",
                    )
                with lock:
                    ready.clear()
                    flags["woken"] = False
                    batch = list(buffer)
                    buffer.clear()
                    end = ended[0] if ended else False
                    if flags["full"]:
                        flags["full"] = False
                        self._loop.call_soon_threadsafe(room.set)
                for reply in batch:
                    yield reply
                if end is None:
                    return
                if end is not False:
                    raise end
        finally:
            # Cancelled on the controller's loop: `stream`'s `finally` (unsubscribing) runs
            # there; nobody waits.
            pumping.cancel()
            if quiet is not None:
                quiet.cancel()

    def _wake_soon(self, loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
        """Set `event` on `loop` (the server's) within WAKE_EVERY_S, in one cross-thread
        hand-off with every other stream woken meanwhile: a hand-off per stream cost the
        controller's loop a self-pipe write each (10% of it under 200 watchers)."""
        if not self._to_wake:
            asyncio.get_running_loop().call_later(WAKE_EVERY_S, self._hand_over_wakes)
        self._to_wake.append((loop, event))

    def _hand_over_wakes(self) -> None:
        """On the controller's loop: hand the events woken since the last hand-off to their
        loops."""
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Event]] = {}
        for loop, event in self._to_wake:
            by_loop.setdefault(loop, []).append(event)
        self._to_wake = []
        for loop, events in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop closed (the server stopped)
                loop.call_soon_threadsafe(_set_all, events)

    @_rpc
    async def SubmitJob(self, request: controller_pb2.SubmitJobRequest, context) -> Any:
        """Validate the spec (INVALID_ARGUMENT naming the field) and queue the job (in the
        store when the reply leaves)."""
        return controller_pb2.SubmitJobReply(job=await self._submissions.submit(request))

    @_rpc
    async def GetJob(self, request: controller_pb2.GetJobRequest, context) -> Any:
        """One job with its losses and events (named by id, unique name or unique id
        prefix); without them when the request asks for a summary."""
        record = self.store.find_job(request.job_id)
        return controller_pb2.GetJobReply(
            job=self.views.job(record, include_losses=not request.summary)
        )

    @_rpc
    async def ListJobs(self, request: controller_pb2.ListJobsRequest, context) -> Any:
        """A page of jobs, newest first."""
        states = [JobState.from_proto(s) for s in request.states]
        records, token = self.store.list_jobs(
            page_size=request.page_size,
            page_token=request.page_token,
            states=states,
            newest_first=True,
        )
        queued = self.store.jobs_in_states([JobState.QUEUED])  # once for the page
        jobs = [
            self.views.job(r, include_losses=request.include_losses, queued=queued) for r in records
        ]
        return controller_pb2.ListJobsReply(jobs=jobs, next_page_token=token)

    @_rpc
    async def Drain(self, request: controller_pb2.DrainRequest, context) -> Any:
        """Checkpoint and requeue every running and suspended job before a stop."""
        return controller_pb2.DrainReply(jobs=await self._on_controller(self.controller.drain()))

    @_rpc
    async def Trace(self, request: controller_pb2.TraceRequest, context) -> Any:
        """The execution logs of the hosts of a job's islands (`pathways-lite trace`)."""
        return await self._on_controller(self._trace(request))

    async def _trace(self, request: controller_pb2.TraceRequest) -> Any:
        from .trace import job_trace

        record = self.store.find_job(request.job_id)
        islands = self.controller.islands
        names = [n for n in self.views.job(record).islands if n in islands]
        return await job_trace(record.id, [islands[n] for n in names] or list(islands.values()))

    @_rpc
    async def CancelJob(self, request: controller_pb2.CancelJobRequest, context) -> Any:
        """Cancel a queued or running job."""
        job_id = self.store.find_job(request.job_id).id
        return controller_pb2.CancelJobReply(
            job=await self._on_controller(_call(self.controller.cancel, job_id, request.reason))
        )

    @_rpc
    async def UpdateJob(self, request: controller_pb2.UpdateJobRequest, context) -> Any:
        """Re-prioritise a queued, running or suspended job."""
        job_id = self.store.find_job(request.job_id).id
        return controller_pb2.UpdateJobReply(
            job=await self._on_controller(_call(self.controller.update, job_id, request.priority))
        )

    @_rpc
    async def Generate(
        self, request: controller_pb2.GenerateJobRequest, context
    ) -> AsyncIterator[controller_pb2.GenerateJobReply]:
        """Stream a generation from a serving job's least-loaded replica (issue 18)."""
        async for reply in self._stream_on_controller(self.controller.serving.generate(request)):
            yield reply

    @_stream
    async def WatchJob(
        self, request: controller_pb2.WatchJobRequest, context
    ) -> AsyncIterator[controller_pb2.WatchJobReply]:
        """The job's record, its recorded metrics from from_step, then live updates."""
        async for reply in self._stream_on_controller(self._watch(request)):
            yield reply

    def _flush(self, job_id: str) -> None:
        """Write the job's batched steps before a stream reads the store. A locked database
        does not end the stream (every watcher's would end while it is busy): the steps not
        written yet are missing from its replay (their live update reached it only if it had
        subscribed first), the live ones follow."""
        try:
            self.controller.reporter.flush(job_id)
        except StoreUnavailableError as e:
            logger.warning("%s", e)

    async def _watch(
        self, request: controller_pb2.WatchJobRequest
    ) -> AsyncIterator[controller_pb2.WatchJobReply]:
        if request.from_step < 0:
            raise ValueError(f"from_step={request.from_step} must be >= 0.")
        record = self.store.find_job(request.job_id)
        batch = request.batch_steps
        queue = self.controller.events.subscribe(record.id)
        follow = Following(self.controller.reporter, record.id, request.from_step - 1)
        try:
            # After subscribing, and with the batched steps written: nothing missed. An
            # update of the record queued before the one sent here would take the watcher
            # back (`Following.stale`).
            self._flush(record.id)
            follow.synced(self.controller.events.seq[record.id])
            record = self.store.get_job(record.id)
            view = self.controller.reporter.followed(record)
            yield controller_pb2.WatchJobReply(time=now(), job=view)
            replay_from = request.from_step
            if view.steps_completed < replay_from:
                # A caller back after a controller restart, with steps the job has since
                # lost and runs again: sent again from where it went back to.
                replay_from = self.store.restore_point(record.id, view.steps_completed)
            follow.last_step = replay_from - 1
            for reply in self._replay(record, replay_from, batch):
                follow.last_step = _last_step(reply)
                yield reply
            if record.state.terminal:
                return
            loop = asyncio.get_running_loop()
            sent_at = -BATCH_STEPS_S
            while True:
                update = await queue.get()
                dropped = queue.take_dropped()
                if dropped:
                    # It lagged and lost updates: the record again, then the steps it missed
                    # from the store (the live ones after them follow as usual), from where
                    # a rollback it may have missed went back to.
                    self._flush(record.id)
                    follow.lagged()
                    follow.synced(self.controller.events.seq[record.id])
                    record = self.store.get_job(record.id)
                    yield controller_pb2.WatchJobReply(
                        time=now(), job=self.controller.reporter.followed(record), dropped=dropped
                    )
                    for reply in self._replay(record, follow.last_step + 1, batch):
                        follow.last_step = _last_step(reply)
                        yield reply
                    if record.state.terminal:
                        return
                if follow.stale(update):
                    continue
                if update.HasField("metrics"):
                    # A bus update carries the steps of a batch (jobs.py's Reporter).
                    updates = [update]
                    if batch:
                        # Replies at most every BATCH_STEPS_S while steps keep coming: wait
                        # out the rest of it, then take the updates that came meanwhile.
                        wait = sent_at + BATCH_STEPS_S - loop.time()
                        if wait > 0:
                            await asyncio.sleep(wait)
                        updates += [
                            u for u in queue.take_steps(BATCH_STEPS_MAX) if not follow.stale(u)
                        ]
                        sent_at = loop.time()
                    for reply in _step_replies(updates, follow.last_step, batch):
                        follow.last_step = _last_step(reply)
                        yield reply
                    continue
                follow.told(update)
                yield update
                if update.HasField("job") and JobState.from_proto(update.job.state).terminal:
                    return
        finally:
            self.controller.events.unsubscribe(record.id, queue)

    def _replay(
        self, record: Any, from_step: int, batch: bool
    ) -> Iterator[controller_pb2.WatchJobReply]:
        """The job's recorded metrics from `from_step` (seq 0), one reply per step, or with
        `batch` up to BATCH_STEPS_MAX steps per reply."""
        steps = []
        for m in self.store.metrics(record.id, from_step=from_step):
            ts = timestamp_us(m.time_us)
            metrics = self.views.step_metrics(
                record, m.step, m.loss, m.tokens_per_s, m.step_time_s, ts, m.mfu, m.sources
            )
            if not batch:
                yield controller_pb2.WatchJobReply(time=ts, metrics=metrics)
                continue
            steps.append(metrics)
            if len(steps) == BATCH_STEPS_MAX:
                yield _batched_reply(steps)
                steps = []
        if steps:
            yield _batched_reply(steps)

    @_rpc
    async def ListIslands(self, request: controller_pb2.ListIslandsRequest, context) -> Any:
        """Every island and its hosts."""
        islands = await self._on_controller(
            _call(self.views.island_list, include_steps=request.include_steps)
        )
        return controller_pb2.ListIslandsReply(islands=islands)

    @_stream
    async def StreamLogs(
        self, request: controller_pb2.StreamLogsRequest, context
    ) -> AsyncIterator[controller_pb2.StreamLogsReply]:
        """The job's buffered records (the newest `tail`), then new ones with follow."""
        async for reply in self._stream_on_controller(self._logs(request)):
            yield reply

    async def _logs(
        self, request: controller_pb2.StreamLogsRequest
    ) -> AsyncIterator[controller_pb2.StreamLogsReply]:
        if request.tail < 0:
            raise ValueError(f"tail={request.tail} must be >= 0.")
        record = self.store.find_job(request.job_id)
        queue = self.controller.logs.followers.subscribe(record.id)
        try:
            for item in self.controller.logs.records(record.id, request.tail):
                yield controller_pb2.StreamLogsReply(record=item)
            if not request.follow:
                return
            events = self.controller.events.subscribe(record.id)
            try:
                while not self.store.get_job(record.id).state.terminal:
                    getter = asyncio.ensure_future(queue.get())
                    watcher = asyncio.ensure_future(events.get())
                    done, _ = await asyncio.wait(
                        {getter, watcher}, return_when=asyncio.FIRST_COMPLETED
                    )
                    for pending in (getter, watcher):
                        if pending not in done:
                            pending.cancel()
                    if getter in done:
                        for item in _with_dropped(queue, getter.result()):
                            yield controller_pb2.StreamLogsReply(record=item)
                while not queue.empty():
                    for item in _with_dropped(queue, queue.get_nowait()):
                        yield controller_pb2.StreamLogsReply(record=item)
            finally:
                self.controller.events.unsubscribe(record.id, events)
        finally:
            self.controller.logs.followers.unsubscribe(record.id, queue)

    @_rpc
    async def Sample(self, request: controller_pb2.SampleJobRequest, context) -> Any:
        """Text from a running job's current parameters."""
        request.job_id = self.store.find_job(request.job_id).id
        return await self._on_controller(self.controller.sample(request))

    @_rpc
    async def Info(self, request: controller_pb2.ControllerInfoRequest, context) -> Any:
        """Wire version, package version, epoch, state dir."""
        return controller_pb2.ControllerInfoReply(
            wire_version=common_pb2.WireVersion(version=CONTROLLER_WIRE_VERSION),
            version=pathways_lite.__version__,
            epoch=self.controller.epoch,
            state_dir=self.controller.state_dir,
            started_at=self.controller.started_at,
        )


async def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` as a coroutine (to run a plain call on the controller's loop)."""
    return fn(*args, **kwargs)


async def serve(
    controller: Controller,
    host: str,
    port: int = 0,
    *,
    started: Callable[[int], Any] | None = None,
    stop: asyncio.Event | None = None,
    grace_s: float = 5.0,
    token: str | None = None,
) -> None:
    """Serve the controller, grpc.health.v1 and reflection on host:port until `stop` is set.

    The controller runs on the calling loop; the gRPC server on a loop of its own in a thread
    ("controller-rpc"): grpc.aio accepts one new call per turn of its loop, and a turn of a
    controller loop busy dispatching steps lasts up to hundreds of milliseconds, so on the
    same loop a burst of submissions would wait seconds to be accepted.
    `ControllerServicer` says which rpcs are answered on the server's thread.

    Args:
        controller: the controller (started here, stopped on the way out).
        host: the address to bind (127.0.0.1 unless a user asks otherwise).
        port: the port; 0 picks a free one.
        started: called (on the calling loop) with the bound port once the server accepts
            calls.
        stop: set to stop serving; None serves until cancelled.
        grace_s: seconds in-flight calls get when stopping.
        token: the access token every call but health and reflection must carry
            (controller/auth.py); None serves without one (in-process tests only).

    Raises:
        OSError: host:port cannot be bound.
    """
    from .auth import TokenInterceptor

    loop = asyncio.get_running_loop()
    server_loop = asyncio.new_event_loop()
    server_stop = asyncio.Event()  # the server loop's (bound to it when first awaited)
    finished: asyncio.Future[BaseException | None] = loop.create_future()

    def on_controller(coro: Any) -> Any:
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))

    def on_started(bound: int) -> None:
        logger.info("controller on %s:%d (epoch %d)", host, bound, controller.epoch)
        if started is not None:
            loop.call_soon_threadsafe(started, bound)

    def register(server: grpc.aio.Server) -> None:
        servicer = ControllerServicer(controller, loop)
        controller_pb2_grpc.add_ControllerServiceServicer_to_server(servicer, server)

    def run() -> None:
        asyncio.set_event_loop(server_loop)
        error: BaseException | None = None
        try:
            server_loop.run_until_complete(
                rpc.serve(
                    "the controller service",
                    {SERVICE_NAME: register},
                    host,
                    port,
                    options=SERVER_OPTIONS,
                    interceptors=[TokenInterceptor(token)] if token is not None else (),
                    bound=lambda _: on_controller(controller.start()),
                    started=on_started,
                    stop=server_stop,
                    grace_s=grace_s,
                    stopped=lambda: on_controller(controller.stop()),
                )
            )
        except BaseException as e:  # noqa: BLE001 - raised again on the calling loop
            error = e
        finally:
            server_loop.run_until_complete(server_loop.shutdown_asyncgens())
            server_loop.close()
            loop.call_soon_threadsafe(_settle, finished, error)

    thread = threading.Thread(target=run, name="controller-rpc", daemon=True)
    thread.start()
    try:
        if stop is None:
            await asyncio.shield(finished)
        else:
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({stopping, finished}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
    finally:
        try:
            server_loop.call_soon_threadsafe(server_stop.set)
        except RuntimeError:  # its loop is closed: it stopped already
            pass
        # The server's `stopped` stops the controller on this loop: wait without blocking it.
        error = await asyncio.shield(finished)
        await asyncio.to_thread(thread.join)
    if error is not None:
        raise error


class Submissions:
    """SubmitJob requests handled in batches on one thread at a time
    (`Controller.submit_many`): the requests that come while a batch is handled make the
    next, resolved one after another and queued in one store transaction. A burst of
    concurrent submissions on a thread each (the default pool's) took the GIL from one
    another and from the controller's loop in turns, each thread's SQLite calls giving it
    away (bench/scale_load.py, 100 at once under load: p99 100-166 ms -> 70-94 ms). On a thread: the
    server's loop answers other calls (health checks too) while a deep model resolves."""

    def __init__(self, controller: Controller) -> None:
        self._controller = controller
        self._lock = threading.Lock()
        self._waiting: list[tuple[controller_pb2.SubmitJobRequest, asyncio.Future]] = []
        self._handling = False

    async def submit(self, request: controller_pb2.SubmitJobRequest) -> controller_pb2.Job:
        """`Controller.submit` of `request`, with whichever requests come meanwhile."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            self._waiting.append((request, future))
            start, self._handling = not self._handling, True
        if start:
            try:
                loop.run_in_executor(None, self._handle)
            except RuntimeError as e:  # the executor shut down: the server is stopping
                self._fail_waiting(e)
        return await future

    def _handle(self) -> None:
        """On a thread: the waiting requests, a batch at a time, until none waits."""
        batch: list[tuple[controller_pb2.SubmitJobRequest, asyncio.Future]] = []
        try:
            while True:
                with self._lock:
                    batch = self._waiting[:SUBMIT_BATCH]
                    del self._waiting[:SUBMIT_BATCH]
                    if not batch:
                        self._handling = False
                        return
                try:
                    outcomes = self._controller.submit_many([request for request, _ in batch])
                except Exception as e:  # each caller gets it (an INTERNAL error)
                    outcomes = [e] * len(batch)
                self._answer(list(zip((future for _, future in batch), outcomes, strict=True)))
        except BaseException as e:  # no caller waits for ever, whatever failed here
            logger.exception("SubmitJob's batches stopped")
            self._answer([(future, e) for _, future in batch])
            self._fail_waiting(e)
            raise

    def _fail_waiting(self, error: BaseException) -> None:
        """Answer every waiting request with `error`; the next request starts afresh."""
        with self._lock:
            waiting, self._waiting, self._handling = self._waiting, [], False
        self._answer([(future, error) for _, future in waiting])

    @staticmethod
    def _answer(settled: list[tuple[asyncio.Future, Any]]) -> None:
        """Hand each outcome to its caller's loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, Any]]] = {}
        for future, outcome in settled:
            by_loop.setdefault(future.get_loop(), []).append((future, outcome))
        for loop, answers in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop closed (the server stopped)
                loop.call_soon_threadsafe(_answer_submissions, answers)


def _answer_submissions(settled: list[tuple[asyncio.Future, Any]]) -> None:
    """Give each waiting SubmitJob its outcome (a caller gone has its future cancelled). An
    error several callers share (a batch that failed) goes to each as an exception of its
    own: raised in each caller's task, one object gathered every task's traceback."""
    given: set[int] = set()
    for future, outcome in settled:
        if future.done():
            continue
        if isinstance(outcome, BaseException):
            if id(outcome) in given:
                try:
                    outcome = _copy_of(outcome)
                except Exception:  # noqa: BLE001 - a type that cannot be copied: shared
                    pass
            given.add(id(outcome))
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


def _copy_of(error: BaseException) -> BaseException:
    """An exception of `error`'s type with its args, attributes and cause, not its traceback
    (made without its __init__, whose arguments may differ from its args)."""
    copy = type(error).__new__(type(error), *error.args)
    copy.args = error.args
    copy.__dict__.update(error.__dict__)
    copy.__cause__, copy.__context__ = error.__cause__, error.__context__
    copy.__suppress_context__ = error.__suppress_context__
    return copy


def _set_all(events: list[asyncio.Event]) -> None:
    for event in events:
        event.set()


def _with_dropped(queue: Follower, record: controller_pb2.LogRecord) -> list[Any]:
    """A log record just taken from `queue`, after a line saying how many records before it
    were dropped while its reader lagged (if any were)."""
    dropped = queue.take_dropped()
    return [dropped_logs_record(dropped), record] if dropped else [record]


def _batched_reply(steps: list[Any], seq: int = 0) -> controller_pb2.WatchJobReply:
    """One reply of consecutive steps: the first in `metrics` (its time the reply's), the
    others in `more_metrics`; `seq` the first step's sequence number (0: replayed)."""
    reply = controller_pb2.WatchJobReply(time=steps[0].time, seq=seq, metrics=steps[0])
    reply.more_metrics.extend(steps[1:])
    return reply


def _last_step(reply: controller_pb2.WatchJobReply) -> int:
    """The last step a reply of steps carries."""
    return (reply.more_metrics[-1] if reply.more_metrics else reply.metrics).step


def _step_replies(
    updates: list[Any], last_step: int, batch: bool
) -> list[controller_pb2.WatchJobReply]:
    """Live step updates of the bus as a watcher's replies: the steps after `last_step` (a step
    queued before the replay that sent it; a rollback lowers `last_step`), each step a reply
    of its own, or with `batch` a reply per update of the bus. An update whose steps are all
    new and follow each other is passed whole: the bus's own reply, shared by its followers
    (no copy: copying each step into a reply per watcher was a quarter of the controller
    under 200 watchers); another is cut into replies of consecutive new steps."""
    replies: list[controller_pb2.WatchJobReply] = []
    for update in updates:
        more = update.more_metrics
        whole = not more or (
            batch
            and len(more) < BATCH_STEPS_MAX
            and more[-1].step - update.metrics.step == len(more)
        )
        if whole and update.metrics.step > last_step:
            replies.append(update)
            last_step = _last_step(update)
            continue
        steps = [update.metrics, *more]
        if not batch:
            for i, m in enumerate(steps):
                if m.step > last_step:
                    seq = update.seq + i
                    replies.append(controller_pb2.WatchJobReply(time=m.time, metrics=m, seq=seq))
                    last_step = m.step
            continue
        run: list[Any] = []
        first_seq = last_i = 0
        for i, m in enumerate(steps):
            if m.step <= last_step:
                continue
            # A reply's steps are numbered on from its seq: a skipped step cuts it.
            if run and (i != last_i + 1 or m.step != last_step + 1 or len(run) == BATCH_STEPS_MAX):
                replies.append(_batched_reply(run, first_seq))
                run = []
            if not run:
                first_seq = update.seq + i
            run.append(m)
            last_step, last_i = m.step, i
        if run:
            replies.append(_batched_reply(run, first_seq))
    return replies


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if not future.done():
        future.set_result(error)
