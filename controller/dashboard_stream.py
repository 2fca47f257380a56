"""The dashboard's live updates: server-sent event streams fed by the controller's event bus.

The streams follow the in-memory bus that WatchJob follows (every state change and completed
step is published there) and the log buffer's followers, never the database: a page that is
open costs nothing until something happens. The cluster page's stream carries every job's
updates and a fresh overview after each (at most one overview per half second); a job page's
stream carries that job's updates, a new "why" after each state change, and its log records.
A quiet stream sends a heartbeat every SSE_HEARTBEAT_S, so proxies keep it open and a closed
page is noticed. The cluster page's job updates carry the bus's sequence number (`seq`); a
page that lagged behind gets a `resync` event with the count of updates it lost and reloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from pathways_lite.v1 import controller_pb2

from .bus import ALL_JOBS
from .dashboard_auth import secure

SSE_HEARTBEAT_S = 15.0

# (event name, JSON-able data) pairs of one bus update, as the pages consume them.
Translate = Callable[[str, controller_pb2.WatchJobReply], list[tuple[str, dict[str, Any]]]]


class EventStreams:
    """The dashboard's event streams over one controller's bus.

    Args:
        events: the bus of job updates (`subscribe(key)` -> queue, `unsubscribe(key, queue)`).
        logs: the bus of log records, keyed by job id, with the same interface.
        overview: the cluster page's data now.
        translate: the page events of one job update (an empty list to skip it).
        why: one sentence on why a job is (not) running.
        log_dict: one log record as the job page shows it.
    """

    def __init__(
        self,
        events: Any,
        logs: Any,
        *,
        overview: Callable[[], dict[str, Any]],
        translate: Translate,
        why: Callable[[str], str],
        log_dict: Callable[[controller_pb2.LogRecord], dict[str, Any]],
    ) -> None:
        self._events = events
        self._logs = logs
        self._overview = overview
        self._translate = translate
        self._why = why
        self._log_dict = log_dict
        self._streams: set[asyncio.Task] = set()

    def close(self) -> None:
        """End every open stream (the server is stopping)."""
        for task in list(self._streams):
            task.cancel()

    async def all_jobs(self, request: web.Request) -> web.StreamResponse:
        """Every job's state changes and steps, and the overview (the cluster page)."""

        async def events() -> AsyncIterator[tuple[str, Any]]:
            queue = self._events.subscribe(ALL_JOBS)
            try:
                while True:
                    item = await _get(queue, SSE_HEARTBEAT_S)
                    dropped = queue.take_dropped() if hasattr(queue, "take_dropped") else 0
                    if dropped:  # it lagged: the page reloads what it shows
                        yield "resync", {"dropped": dropped, "seq": queue.last_seq}
                    if item is None:
                        yield "overview", self._overview()
                        continue
                    job_id, update = item
                    for kind, data in self._translate(job_id, update):
                        # The bus's sequence number: a gap proves lost updates.
                        yield kind, {**data, "seq": queue.last_seq}
                    if update.HasField("metrics") or update.HasField("job"):
                        yield "overview", self._overview()
            finally:
                self._events.unsubscribe(ALL_JOBS, queue)

        return await self._serve(request, _coalesce_overview(events()))

    async def one_job(self, request: web.Request, job_id: str) -> web.StreamResponse:
        """One job's state changes, steps and log records (the job page)."""

        async def events() -> AsyncIterator[tuple[str, Any]]:
            updates = self._events.subscribe(job_id)
            logs = self._logs.subscribe(job_id)
            try:
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
                        yield "ping", {"time": time.time()}
                        continue
                    for future in done:
                        if getters[future] == "log":
                            yield "log", self._log_dict(future.result())
                            continue
                        for kind, data in self._translate(job_id, future.result()):
                            yield kind, data
                            if kind == "job":
                                yield "why", {"why": self._why(job_id)}
            finally:
                self._events.unsubscribe(job_id, updates)
                self._logs.unsubscribe(job_id, logs)

        return await self._serve(request, events())

    async def _serve(
        self, request: web.Request, events: AsyncIterator[tuple[str, Any]]
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",
            }
        )
        secure(response)
        await response.prepare(request)
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        try:
            await response.write(b"retry: 2000\n\n")
            async for kind, data in events:
                payload = json.dumps(data, separators=(",", ":"), allow_nan=False)
                await response.write(f"event: {kind}\ndata: {payload}\n\n".encode())
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._streams.discard(task)
        return response


async def _get(queue: asyncio.Queue, timeout_s: float) -> Any:
    """The queue's next item, or None after `timeout_s` (a heartbeat)."""
    with contextlib.suppress(TimeoutError):
        return await asyncio.wait_for(queue.get(), timeout_s)
    return None


async def _coalesce_overview(
    events: AsyncIterator[tuple[str, Any]], min_interval_s: float = 0.5
) -> AsyncIterator[tuple[str, Any]]:
    """Pass events through, but at most one `overview` per `min_interval_s` (a busy cluster
    steps many times a second; the islands view needs no more)."""
    last = 0.0
    async for kind, data in events:
        if kind == "overview":
            now = time.monotonic()
            if now - last < min_interval_s:
                continue
            last = now
        yield kind, data
