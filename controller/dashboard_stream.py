"""The dashboard's live updates: server-sent event streams fed by the controller's event bus.

The streams follow the in-memory bus that WatchJob follows (every state change and completed
step is published there) and the log buffer's followers, never the database: a page that is
open costs nothing until something happens. The cluster page's stream carries every job's
updates and a fresh overview after each (at most one overview per half second), in one
write per tenth of a second at most while the bus is busy; a job page's
stream carries that job's updates, a new "why" after each state change, and its log records.
A quiet stream sends a heartbeat every SSE_HEARTBEAT_S, so proxies keep it open and a closed
page is noticed. The cluster page's job updates carry the bus's sequence number (`seq`); a
page that lagged behind gets a `resync` event with the count of updates it lost and reloads.

A job page charts every step once, as WatchJob sends them: its stream subscribes, then has the
job's batched steps written (a step batched before it subscribed was handed to no follower)
and sends the recorded steps from the page's `from_step` (the step after the last one its
chart holds; each step event carries its step as the event id, so a reconnecting EventSource
asks from there itself); the live steps follow, each after the last one sent. A page that
lagged gets a `resync` event, the steps it lost from the store, and no update older than
what it refetches; a log record it lost is told as a line in the log.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from pathways_lite.v1 import controller_pb2

from .auth import RECHECK_STREAMS_S as RECHECK_S
from .bus import ALL_JOBS, dropped_logs_record
from .dashboard_auth import STILL_AUTHORIZED
from .jobs import Following

logger = logging.getLogger(__name__)

SSE_HEARTBEAT_S = 15.0
# A cluster page's stream sends at most one overview per OVERVIEW_EVERY_S (a busy cluster steps
# many times a second; the islands view needs no more) and one, exact, once its bus goes quiet;
# its streams share one overview computed at most once per OVERVIEW_SHARED_S while busy.
OVERVIEW_EVERY_S = 0.5
OVERVIEW_SHARED_S = 0.5
# Updates one write of a cluster page's stream carries at most (a busy bus is read in batches).
BATCH_MAX = 512
# A cluster page's stream writes at most once per WRITE_EVERY_S: what comes meanwhile waits
# in its queue and goes in one write (50 busy jobs are 200 bus updates a second: one wake and
# one write each, for each of 20 pages, cost the controller's thread more than a quarter of
# its step dispatch).
WRITE_EVERY_S = 0.1
# Encoded updates kept for the cluster page's streams (each is encoded once for all of them).
ENCODED_KEPT = 4096

# (event name, JSON-able data) pairs of one bus update, as the pages consume them.
# (job id, bus update, latest_only) -> the page's events; latest_only: of a batch of steps,
# only the last (the cluster page shows each job's latest step; a job page charts every one).
Translate = Callable[[str, controller_pb2.WatchJobReply, bool], list[tuple[str, dict[str, Any]]]]
# (job id, from_step, first) -> (the step they start from, the job's `metrics` events of its
# recorded steps from there), its batched steps written first (`first`: the stream's first
# replay, which starts lower than from_step when the job rolled back under an earlier
# controller: see Dashboard).
Recorded = Callable[[str, int, bool], tuple[int, list[dict[str, Any]]]]


class EventStreams:
    """The dashboard's event streams over one controller's bus.

    Args:
        events: the bus of job updates (`subscribe(key)` -> queue, `unsubscribe(key, queue)`).
        logs: the bus of log records, keyed by job id, with the same interface.
        overview: the cluster page's data now.
        translate: the page events of one job update (an empty list to skip it).
        recorded: a job's recorded steps from a step on, as a job page's `metrics` events.
        why: one sentence on why a job is (not) running.
        log_dict: one log record as the job page shows it.
        rollbacks: the rollbacks told to followers (the Reporter's `rollback_mark`,
            `rolled_back_since(job_id, mark)` and `old_run(job_id, update, synced)`); None: none
            are known.
    """

    def __init__(
        self,
        events: Any,
        logs: Any,
        *,
        overview: Callable[[], dict[str, Any]],
        translate: Translate,
        recorded: Recorded,
        why: Callable[[str], str],
        log_dict: Callable[[controller_pb2.LogRecord], dict[str, Any]],
        rollbacks: Any = None,
    ) -> None:
        self._events = events
        self._logs = logs
        self._overview = overview
        self._translate = translate
        self._recorded = recorded
        self._why = why
        self._log_dict = log_dict
        self._rollbacks = rollbacks
        self._streams: set[asyncio.Task] = set()
        # Shared by the cluster page's streams: each bus update's events encoded once, and the
        # overview last computed as (monotonic time, the bus update it reflects, its event).
        self._encoded: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._overview_cache: tuple[float, int, bytes] = (-math.inf, -1, b"")

    def close(self) -> None:
        """End every open stream (the server is stopping)."""
        for task in list(self._streams):
            task.cancel()

    async def all_jobs(self, request: web.Request) -> web.StreamResponse:
        """Every job's state changes and steps, and the overview (the cluster page)."""

        async def chunks() -> AsyncIterator[bytes]:
            queue = self._events.subscribe(ALL_JOBS)
            owed = 0  # the newest update read whose overview is not sent yet (0: none)
            sent_at = written_at = -math.inf
            try:
                while True:
                    now = time.monotonic()
                    if written_at == -math.inf:
                        await asyncio.sleep(0)  # a backlog: the loop's other work between batches
                    elif now < written_at + WRITE_EVERY_S:
                        await asyncio.sleep(written_at + WRITE_EVERY_S - now)
                        now = time.monotonic()
                    wait_s = max(0.0, sent_at + OVERVIEW_EVERY_S - now) if owed else None
                    item = await _get(queue, SSE_HEARTBEAT_S if wait_s is None else wait_s)
                    if item is None:  # quiet: the overview owed, exact, or a heartbeat's
                        yield self._overview_bytes(owed)
                        owed, sent_at = 0, time.monotonic()
                        continue
                    # A busy bus is read in batches: one write per batch, not per update.
                    parts = []
                    for n in range(BATCH_MAX):
                        if n:  # (taken only when it goes in this batch)
                            if queue.empty():
                                break
                            item = queue.get_nowait()
                        seq = queue.last_seq
                        dropped = queue.take_dropped()
                        if dropped:  # it lagged: the page reloads what it shows
                            parts.append(_sse("resync", {"dropped": dropped, "seq": seq}))
                        job_id, update = item
                        parts.append(self._update_bytes(seq, job_id, update))
                        if update.HasField("metrics") or update.HasField("job"):
                            owed = seq
                    if owed and time.monotonic() - sent_at >= OVERVIEW_EVERY_S:
                        parts.append(self._overview_bytes(0))
                        sent_at = time.monotonic()
                        # A shared overview older than the newest update stays owed: the
                        # stream's next quiet moment sends an exact one.
                        owed = 0 if self._overview_cache[1] >= owed else owed
                    # A batch cut at BATCH_MAX leaves a backlog: the next one goes at once.
                    written_at = time.monotonic() if queue.empty() else -math.inf
                    yield b"".join(parts)
            finally:
                self._events.unsubscribe(ALL_JOBS, queue)

        return await self._serve(request, chunks())

    def _update_bytes(self, seq: int, job_id: str, update: Any) -> bytes:
        """The cluster page's events of the bus update `seq`, encoded once for every stream
        (the bus numbers ALL_JOBS updates alike for all of its followers)."""
        encoded = self._encoded.get(seq)
        if encoded is None:
            encoded = b"".join(
                # The bus's sequence number: a gap proves lost updates.
                _sse(kind, {**data, "seq": seq})
                for kind, data in self._translate(job_id, update, True)
            )
            self._encoded[seq] = encoded
            if len(self._encoded) > ENCODED_KEPT:
                self._encoded.popitem(last=False)
        return encoded

    def _overview_bytes(self, owed: int) -> bytes:
        """The overview event, shared by every stream: the one computed last if it reflects
        bus update `owed` or later (0: if it is younger than OVERVIEW_SHARED_S), else one
        computed now."""
        at, reflects, encoded = self._overview_cache
        young = time.monotonic() - at < OVERVIEW_SHARED_S
        if encoded and (reflects >= owed if owed else young):
            return encoded
        reflects = self._events.seq[ALL_JOBS]
        encoded = _sse("overview", self._overview())
        self._overview_cache = (time.monotonic(), reflects, encoded)
        return encoded

    async def one_job(
        self, request: web.Request, job_id: str, from_step: int
    ) -> web.StreamResponse:
        """One job's state changes, steps from `from_step`, and log records (the job page)."""

        async def chunks() -> AsyncIterator[bytes]:
            updates = self._events.subscribe(job_id)
            logs = self._logs.subscribe(job_id)
            # The page's last step, and the bus's update that its refetch after a resync
            # reflects at least (an update queued before it would take the page back).
            follow = Following(self._rollbacks, job_id, from_step - 1)

            def replay(first: bool = False) -> bytes:  # subscribed: none missed
                start, events = self._recorded(job_id, follow.last_step + 1, first)
                # Back at the restore point (its steps from there run again): the live ones
                # up to where the page was are sent too, not taken for sent.
                follow.last_step = min(follow.last_step, start - 1)
                if events:
                    follow.last_step = events[-1]["step"]
                return b"".join(_sse("metrics", data, data["step"]) for data in events)

            try:
                replayed = replay(first=True)
                if replayed:
                    yield replayed
                while True:
                    getters = {
                        asyncio.ensure_future(updates.get()): "update",
                        asyncio.ensure_future(logs.get()): "log",
                    }
                    done, pending = await asyncio.wait(
                        getters, timeout=SSE_HEARTBEAT_S, return_when=asyncio.FIRST_COMPLETED
                    )
                    for future in pending:
                        future.cancel()
                    if not done:
                        yield _sse("ping", {"time": time.time()})
                        continue
                    for future in done:
                        if getters[future] == "log":
                            dropped = logs.take_dropped()
                            if dropped:
                                yield _sse("log", self._log_dict(dropped_logs_record(dropped)))
                            yield _sse("log", self._log_dict(future.result()))
                            continue
                        update = future.result()
                        dropped = updates.take_dropped()
                        if dropped:  # it lagged: the page refetches, the steps come from here
                            # (from where a rollback it may have missed went back to)
                            follow.lagged()
                            replayed = replay()
                            follow.synced(self._events.seq[job_id])
                            yield _sse("resync", {"dropped": dropped}) + replayed
                        if follow.stale(update):
                            continue
                        for kind, data in self._translate(job_id, update, False):
                            if kind == "metrics":
                                if data["step"] > follow.last_step:  # not sent already
                                    follow.last_step = data["step"]
                                    yield _sse(kind, data, follow.last_step)
                                continue
                            if kind == "job" and update.HasField("rolled_back_to"):
                                # Its steps from there run again: they come again as they
                                # run, and the page drops its own from there.
                                follow.told(update)
                                data = {**data, "rolled_back_to": update.rolled_back_to}
                            yield _sse(kind, data)
                            if kind == "job":
                                yield _sse("why", {"why": self._why(job_id)})
            finally:
                self._events.unsubscribe(job_id, updates)
                self._logs.unsubscribe(job_id, logs)

        return await self._serve(request, chunks())

    async def _serve(
        self, request: web.Request, chunks: AsyncIterator[bytes]
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        # Its credential asked again as it goes (controller/dashboard_auth.py): a stream
        # opened with a token rotated away ends with the rotation's grace (the page's
        # reconnect is then refused); the heartbeats make a quiet stream ask too.
        authorized = request.get(STILL_AUTHORIZED)
        checked = time.monotonic()
        try:
            await response.write(b"retry: 2000\n\n")
            async for chunk in chunks:
                if authorized is not None and time.monotonic() - checked >= RECHECK_S:
                    checked = time.monotonic()
                    if not authorized():
                        logger.warning("ended %s: its credential is no longer valid", request.path)
                        break
                await response.write(chunk)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._streams.discard(task)
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
        return response


async def _get(queue: asyncio.Queue, timeout_s: float) -> Any:
    """The queue's next item, or None after `timeout_s` (a heartbeat)."""
    if not queue.empty():
        return queue.get_nowait()  # no task, no timer
    with contextlib.suppress(TimeoutError):
        return await asyncio.wait_for(queue.get(), timeout_s)
    return None


def _sse(kind: str, data: Any, event_id: int | None = None) -> bytes:
    """One server-sent event (with `event_id`: the id a reconnecting EventSource sends back
    as Last-Event-ID)."""
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False)
    head = "" if event_id is None else f"id: {event_id}\n"
    return f"{head}event: {kind}\ndata: {payload}\n\n".encode()
