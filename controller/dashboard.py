"""The controller's web dashboard (aiohttp, on the controller's own event loop).

Pages: the cluster (islands with devices, resident jobs, memory used against the budget and a
timeline of which job's steps ran on each island recently; the jobs list with keyset
pagination) and one page per job (live loss and throughput charts, events, log tail, why it
is pending, a cancel button). The pages are static files (controller/dashboard_static/) that
render every value with `textContent`, so no user-supplied string is ever parsed as HTML; the
charts are plotly.js, served from the installed `plotly` Python package.

Live updates are server-sent events fed by the controller's in-memory bus, the one WatchJob
follows (`Controller.events`, `Controller.logs.followers`), never by polling the database.
`/metrics` serves Prometheus' text format. Every route needs the controller's access token
(controller/auth.py): `Authorization: Bearer <token>`, or `?token=` once, which sets an
HttpOnly, SameSite=Strict cookie and redirects to the same page without it. State-changing
requests (cancel) also need the header `X-Pathways-Lite: 1`, which a cross-site form cannot
send.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web

from pathways_lite.v1 import controller_pb2

from . import auth
from .bus import ALL_JOBS
from .core import Controller
from .store import (
    IllegalTransitionError,
    JobNotFoundError,
    JobRecord,
    JobState,
    StoreError,
)

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "dashboard_static"
COOKIE = "pathways_lite_token"
CSRF_HEADER = "X-Pathways-Lite"
PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
# How far back the islands' timeline reaches, and how many log records a job page starts with.
TIMELINE_WINDOW_S = 120.0
LOG_TAIL = 200
SSE_HEARTBEAT_S = 15.0
PRUNE_EVERY_S = 600.0
_STATIC_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # Scripts only from this origin (no inline script): an injected <script> would not run.
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self' 'unsafe-eval'; style-src 'self' "
        "'unsafe-inline'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'"
    ),
}


def plotly_js() -> Path:
    """plotly.min.js as shipped in the installed `plotly` package's data.

    Raises:
        FileNotFoundError: plotly is not installed.
    """
    path = Path(str(resources.files("plotly"))) / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise FileNotFoundError(f"plotly.min.js is not at {str(path)!r}; reinstall plotly.")
    return path


def _time_s(us: int | None) -> float | None:
    return None if us is None else us / 1e6


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


class Dashboard:
    """The dashboard of one controller.

    Args:
        controller: the controller whose jobs and islands are shown.
        token: the access token every request must carry; None serves without one (tests
            of pages only; the controller process always passes one).
        retention_s: finished jobs submitted longer ago than this are deleted from the history
            (checked at start and every 10 minutes); None keeps them all.
    """

    def __init__(
        self, controller: Controller, *, token: str | None, retention_s: float | None = None
    ) -> None:
        if retention_s is not None and retention_s <= 0:
            raise ValueError(f"retention_s={retention_s!r} must be positive (or None).")
        self.c = controller
        self.token = token
        self.retention_s = retention_s
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._streams: set[asyncio.Task] = set()
        self._prune_task: asyncio.Task | None = None

    # ---- serving -----------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth_middleware])
        app.router.add_get("/", self._page("index.html"))
        app.router.add_get("/jobs/{job_id}", self._page("job.html"))
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/favicon.ico", lambda request: web.Response(status=204))
        app.router.add_get("/api/overview", self._api_overview)
        app.router.add_get("/api/jobs", self._api_jobs)
        app.router.add_get("/api/jobs/{job_id}", self._api_job)
        app.router.add_post("/api/jobs/{job_id}/cancel", self._api_cancel)
        app.router.add_get("/api/stream", self._api_stream_all)
        app.router.add_get("/api/jobs/{job_id}/stream", self._api_stream_job)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve on host:port (0 picks a free port); returns the bound port."""
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, shutdown_timeout=2.0)
        await site.start()
        bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{bound}/"
        if self.retention_s is not None:
            self._prune_task = asyncio.create_task(self._prune_loop(), name="history-retention")
        logger.info("dashboard on %s", self.url)
        return bound

    async def stop(self) -> None:
        """Close the event streams, then the server."""
        if self._prune_task is not None:
            self._prune_task.cancel()
        for task in list(self._streams):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _prune_loop(self) -> None:
        assert self.retention_s is not None
        while True:
            try:
                cutoff = int((time.time() - self.retention_s) * 1e6)
                gone = self.c.store.prune_finished(cutoff)
                if gone:
                    logger.info("history retention removed %d finished jobs", gone)
            except StoreError:
                logger.exception("history retention failed")
            await asyncio.sleep(PRUNE_EVERY_S)

    # ---- access ------------------------------------------------------------------------

    @web.middleware
    async def _auth_middleware(self, request: web.Request, handler) -> web.StreamResponse:
        if self.token is None:
            return self._secure(await handler(request))
        query_token = request.query.get("token")
        if query_token is not None and request.method == "GET":
            if not auth.matches(auth.bearer(query_token), self.token):
                raise self._unauthorized(request)
            # Trade the token in the URL for a cookie, and drop it from the address bar.
            kept = [(k, v) for k, v in request.rel_url.query.items() if k != "token"]
            location = request.rel_url.with_query(kept)
            response = web.HTTPFound(str(location))
            response.set_cookie(
                COOKIE, self.token, httponly=True, samesite="Strict", path="/", max_age=86400 * 30
            )
            raise response
        presented = request.headers.get("Authorization")
        cookie = request.cookies.get(COOKIE)
        if not (
            auth.matches(presented, self.token)
            or (cookie is not None and auth.matches(auth.bearer(cookie), self.token))
        ):
            raise self._unauthorized(request)
        if request.method != "GET" and request.headers.get(CSRF_HEADER) != "1":
            raise web.HTTPForbidden(
                text=f"state-changing requests need the header '{CSRF_HEADER}: 1'.\n"
            )
        return self._secure(await handler(request))

    @staticmethod
    def _secure(response: web.StreamResponse) -> web.StreamResponse:
        for name, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    @staticmethod
    def _unauthorized(request: web.Request) -> web.HTTPUnauthorized:
        return web.HTTPUnauthorized(
            text=(
                "401 Unauthorized: this dashboard needs the controller's access token. Open "
                "the URL that `pathways-lite dashboard` prints, or send 'Authorization: Bearer "
                "<token>' (the token is in <state_dir>/token).\n"
            ),
            headers={"WWW-Authenticate": 'Bearer realm="pathways-lite"'},
        )

    # ---- static files ------------------------------------------------------------------

    def _page(self, name: str):
        async def handler(request: web.Request) -> web.StreamResponse:
            return web.FileResponse(STATIC_DIR / name, headers={"Cache-Control": "no-store"})

        return handler

    async def _static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name == "plotly.min.js":
            return web.FileResponse(plotly_js(), headers={"Cache-Control": "max-age=3600"})
        path = STATIC_DIR / name
        if "/" in name or name.startswith(".") or path.suffix not in _STATIC_TYPES:
            raise web.HTTPNotFound()
        if not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})

    # ---- data --------------------------------------------------------------------------

    def islands(self) -> list[dict[str, Any]]:
        """Every island: devices, hosts, resident jobs, memory, and its recent timeline."""
        now_ns = time.time_ns()
        since_ns = now_ns - int(TIMELINE_WINDOW_S * 1e9)
        out = []
        for island in self.c.islands_proto():
            budget = sum(h.memory_bytes for h in island.hosts)
            jobs = list(island.job_ids)
            per_device = sum(self.c.job_memory.get(j, 0) for j in jobs)
            timeline = [
                {
                    "job_id": e.job_id,
                    "step": e.step,
                    "start": e.start_ns / 1e9,
                    "end": e.end_ns / 1e9,
                }
                for e in self.c.timeline.get(island.id, ())
                if e.end_ns >= since_ns
            ]
            out.append(
                {
                    "id": island.id,
                    "devices": island.devices,
                    "down": island.down,
                    "device_kind": island.hosts[0].device_kind if island.hosts else "",
                    "hosts": [
                        {
                            "node": h.node,
                            "address": h.address,
                            "pid": h.pid,
                            "devices": h.devices,
                            "state": h.state,
                        }
                        for h in island.hosts
                    ],
                    "jobs": jobs,
                    "memory_used_bytes": per_device * island.devices,
                    "memory_budget_bytes": budget,
                    "timeline": timeline,
                }
            )
        return out

    def job_summary(self, record: JobRecord, queued: list[str] | None = None) -> dict[str, Any]:
        """One job as the jobs list and the job page show it."""
        store = self.c.store
        steps_done = store.steps_completed(record.id)
        last = store.metrics(record.id, from_step=steps_done - 1)[-1:] if steps_done else []
        if queued is None and record.state == JobState.QUEUED:
            queued = [r.id for r in store.jobs_in_states([JobState.QUEUED])]
        position = 0
        if record.state == JobState.QUEUED and queued is not None and record.id in queued:
            position = queued.index(record.id) + 1
        spec = record.spec
        summary: dict[str, Any] = {
            "id": record.id,
            "name": record.name,
            "state": record.state.value,
            "steps_completed": steps_done,
            "steps": spec.train.steps,
            "loss": _finite(last[0].loss) if last else None,
            "tokens_per_s": last[0].tokens_per_s if last else None,
            "mfu": self.c.mfu(record, last[0].tokens_per_s) if last else None,
            "priority": record.priority,
            "weight": record.weight,
            "queue_position": position,
            "islands": self.c.scheduler.islands_of(record.id),
            "model": spec.model.preset,
            "reason": record.reason,
            "message": record.message,
            "created": _time_s(record.created_us),
            "started": _time_s(record.started_us),
            "finished": _time_s(record.finished_us),
        }
        return summary

    def jobs_page(
        self, *, limit: int = PAGE_SIZE, cursor: str = "", state: str = ""
    ) -> dict[str, Any]:
        """A page of the jobs history, newest first (keyset pagination on (created, id)).

        Raises:
            ValueError: a bad limit, cursor or state, quoting it.
        """
        if not 1 <= limit <= MAX_PAGE_SIZE:
            raise ValueError(f"limit={limit} must be between 1 and {MAX_PAGE_SIZE}.")
        states = []
        if state:
            try:
                states = [JobState(state)]
            except ValueError:
                raise ValueError(
                    f"state={state[:40]!r} is not one of {', '.join(s.value for s in JobState)}."
                ) from None
        records, token = self.c.store.list_jobs(
            page_size=limit, page_token=cursor, states=states, newest_first=True
        )
        queued = None
        if any(r.state == JobState.QUEUED for r in records):
            queued = [r.id for r in self.c.store.jobs_in_states([JobState.QUEUED])]
        return {
            "jobs": [self.job_summary(r, queued) for r in records],
            "next_cursor": token,
            "retention_s": self.retention_s,
        }

    def job_detail(self, job_id: str) -> dict[str, Any]:
        """Everything the job page starts from (then it follows the job's event stream).

        Raises:
            JobNotFoundError: no such job.
        """
        record = self.c.store.get_job(job_id)
        metrics = self.c.store.metrics(record.id)
        return {
            "job": self.job_summary(record),
            "why": self.c.why(record),
            "jobs_ahead": list(self.c.job_proto(record, include_losses=False).jobs_ahead),
            "metrics": [
                self._metric(record, m.step, m.loss, m.tokens_per_s, m.time_us / 1e6)
                for m in metrics
            ],
            "events": [
                {"time": e.time_us / 1e6, "kind": e.kind, "message": e.message}
                for e in self.c.store.events(record.id)
            ],
            "logs": [self._log(r) for r in self.c.logs.records(record.id, LOG_TAIL)],
            "spec": json.loads(
                _json_format().MessageToJson(record.spec, preserving_proto_field_name=True)
            ),
        }

    def _metric(
        self,
        record: JobRecord,
        step: int,
        loss: float,
        tps: float,
        t: float,
        mfu: float | None = None,
    ) -> dict[str, Any]:
        return {
            "step": step,
            "loss": _finite(loss),
            "tokens_per_s": tps,
            "mfu": self.c.mfu(record, tps) if mfu is None else mfu,
            "time": t,
        }

    @staticmethod
    def _log(record: controller_pb2.LogRecord) -> dict[str, Any]:
        return {
            "time": record.time.ToNanoseconds() / 1e9,
            "source": record.source,
            "level": record.level,
            "message": record.message,
        }

    def overview(self) -> dict[str, Any]:
        counts = self.c.store.count_by_state()
        return {
            "islands": self.islands(),
            "counts": {s.value: n for s, n in counts.items()},
            "epoch": self.c.epoch,
            "state_dir": self.c.state_dir,
            "retention_s": self.retention_s,
            "timeline_window_s": TIMELINE_WINDOW_S,
            "now": time.time(),
        }

    # ---- JSON API ----------------------------------------------------------------------

    async def _api_overview(self, request: web.Request) -> web.Response:
        return web.json_response(self.overview())

    async def _api_jobs(self, request: web.Request) -> web.Response:
        try:
            limit = int(request.query.get("limit", PAGE_SIZE))
        except ValueError:
            raise _bad(
                f"limit={request.query.get('limit', '')[:40]!r} is not an integer."
            ) from None
        try:
            page = self.jobs_page(
                limit=limit,
                cursor=request.query.get("cursor", ""),
                state=request.query.get("state", ""),
            )
        except ValueError as e:
            raise _bad(str(e)) from None
        return web.json_response(page)

    async def _api_job(self, request: web.Request) -> web.Response:
        try:
            return web.json_response(self.job_detail(request.match_info["job_id"]))
        except JobNotFoundError as e:
            raise web.HTTPNotFound(text=str(e)) from None

    async def _api_cancel(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job_id"]
        try:
            self.c.cancel(job_id, "from the dashboard")
        except JobNotFoundError as e:
            raise web.HTTPNotFound(text=str(e)) from None
        except IllegalTransitionError as e:
            raise web.HTTPConflict(text=str(e)) from None
        return web.json_response(self.job_summary(self.c.store.get_job(job_id)))

    # ---- server-sent events ------------------------------------------------------------

    async def _sse(
        self, request: web.Request, events: AsyncIterator[tuple[str, Any]]
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",
            }
        )
        self._secure(response)
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

    async def _api_stream_all(self, request: web.Request) -> web.StreamResponse:
        """Every job's state changes and steps (the cluster page)."""

        async def events() -> AsyncIterator[tuple[str, Any]]:
            queue = self.c.events.subscribe(ALL_JOBS)
            try:
                while True:
                    item = await _get(queue, SSE_HEARTBEAT_S)
                    if item is None:
                        yield "overview", self.overview()
                        continue
                    job_id, update = item
                    for kind, data in self._update(job_id, update):
                        yield kind, data
                    if update.HasField("metrics") or update.HasField("job"):
                        yield "overview", self.overview()
            finally:
                self.c.events.unsubscribe(ALL_JOBS, queue)

        return await self._sse(request, _coalesce_overview(events()))

    async def _api_stream_job(self, request: web.Request) -> web.StreamResponse:
        """One job's state changes, steps and log records (the job page)."""
        job_id = request.match_info["job_id"]
        try:
            self.c.store.get_job(job_id)
        except JobNotFoundError as e:
            raise web.HTTPNotFound(text=str(e)) from None

        async def events() -> AsyncIterator[tuple[str, Any]]:
            updates = self.c.events.subscribe(job_id)
            logs = self.c.logs.followers.subscribe(job_id)
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
                            yield "log", self._log(future.result())
                        else:
                            for kind, data in self._update(job_id, future.result()):
                                yield kind, data
                                if kind == "job":
                                    yield "why", {"why": self.c.why(self.c.store.get_job(job_id))}
            finally:
                self.c.events.unsubscribe(job_id, updates)
                self.c.logs.followers.unsubscribe(job_id, logs)

        return await self._sse(request, events())

    def _update(
        self, job_id: str, update: controller_pb2.WatchJobReply
    ) -> list[tuple[str, dict[str, Any]]]:
        try:
            record = self.c.store.get_job(job_id)
        except JobNotFoundError:
            return []
        if update.HasField("metrics"):
            m = update.metrics
            data = self._metric(
                record, m.step, m.loss, m.tokens_per_s, m.time.ToNanoseconds() / 1e9, m.mfu
            )
            return [("metrics", {"job_id": job_id, **data, "steps": record.spec.train.steps})]
        if update.HasField("job"):
            return [("job", self.job_summary(record))]
        if update.HasField("event"):
            e = update.event
            return [
                (
                    "event",
                    {
                        "job_id": job_id,
                        "time": e.time.ToNanoseconds() / 1e9,
                        "kind": e.kind,
                        "message": e.message,
                    },
                )
            ]
        return []

    # ---- Prometheus --------------------------------------------------------------------

    def prometheus(self) -> str:
        """The controller's metrics in Prometheus' text exposition format."""
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str, samples) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
                lines.append(
                    f"{name}{{{text}}} {_number(value)}" if text else f"{name} {_number(value)}"
                )

        counts = self.c.store.count_by_state()
        family(
            "pathways_lite_jobs",
            "gauge",
            "Jobs in the controller's store by state.",
            [({"state": s.value}, n) for s, n in counts.items()],
        )
        family(
            "pathways_lite_steps_total",
            "counter",
            "Training steps completed since this controller started.",
            [({}, self.c.steps_total)],
        )
        family(
            "pathways_lite_job_failures_total",
            "counter",
            "Jobs that failed since this controller started.",
            [({}, self.c.failures_total)],
        )
        running = self.c.store.jobs_in_states([JobState.RUNNING])
        per_job = [(r, self.job_summary(r)) for r in running]
        family(
            "pathways_lite_job_steps_completed",
            "gauge",
            "Completed steps of each running job.",
            [({"job": r.id, "name": r.name}, s["steps_completed"]) for r, s in per_job],
        )
        family(
            "pathways_lite_job_tokens_per_second",
            "gauge",
            "Training throughput of each running job's latest step.",
            [({"job": r.id, "name": r.name}, s["tokens_per_s"] or 0.0) for r, s in per_job],
        )
        family(
            "pathways_lite_job_loss",
            "gauge",
            "Training loss of each running job's latest step.",
            [
                ({"job": r.id, "name": r.name}, s["loss"])
                for r, s in per_job
                if s["loss"] is not None
            ],
        )
        islands = self.islands()
        family(
            "pathways_lite_island_memory_used_bytes",
            "gauge",
            "Device memory the resident jobs' compiled steps use on each island.",
            [({"island": i["id"]}, i["memory_used_bytes"]) for i in islands],
        )
        family(
            "pathways_lite_island_memory_budget_bytes",
            "gauge",
            "Device memory budget of each island.",
            [({"island": i["id"]}, i["memory_budget_bytes"]) for i in islands],
        )
        family(
            "pathways_lite_island_devices",
            "gauge",
            "Devices of each island.",
            [({"island": i["id"]}, i["devices"]) for i in islands],
        )
        family(
            "pathways_lite_island_resident_jobs",
            "gauge",
            "Jobs resident on each island.",
            [({"island": i["id"]}, len(i["jobs"])) for i in islands],
        )
        return "\n".join(lines) + "\n"

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            text=self.prometheus(),
            content_type="text/plain",
            charset="utf-8",
            headers={"X-Prometheus-Format": "0.0.4"},
        )


_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str) -> float:
    """Seconds of a duration such as `30d`, `12h`, `90m`, `3600s` or `3600`.

    Raises:
        ValueError: not a positive duration, quoting the text.
    """
    value = text.strip().lower()
    unit = _DURATION_UNITS.get(value[-1:], None)
    number = value[:-1] if unit is not None else value
    try:
        seconds = float(number) * (unit or 1.0)
    except ValueError:
        raise ValueError(
            f"duration {text!r} is not a number with a unit such as 30d or 12h."
        ) from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"duration {text!r} must be positive.")
    return seconds


def _bad(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=message + "\n")


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float | int) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _json_format():
    from google.protobuf import json_format

    return json_format


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
