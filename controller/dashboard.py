"""The controller's web dashboard (aiohttp, on the controller's own event loop): pages and API.

Pages: the cluster (islands with devices, resident jobs, memory used against the budget, a
timeline of which job's steps ran on each island recently with each job's measured share of
the island's time beside its weight; the jobs list with keyset pagination) and one page per
job (live loss, throughput and MFU charts, events, log tail, why it is pending, a cancel
button). The pages are static files (controller/dashboard_static/) that
render every value with `textContent`, so no user-supplied string is ever parsed as HTML; the
charts are plotly.js, served from the installed `plotly` Python package. A job's JSON is its
wire record (`Controller.job_proto`) turned into a dict by controller/views.py, so the pages
show what GetJob answers.

This module holds the routes, the JSON API and the history retention; access control is in
dashboard_auth.py, live updates (server-sent events) in dashboard_stream.py, and `/metrics`
(Prometheus) in prometheus.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sqlite3
import time
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web
from google.protobuf import json_format
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from pathways_lite.v1 import controller_pb2

from . import lineage
from . import spec as spec_lib
from .core import Controller
from .dashboard_auth import secure_every_response, token_middleware
from .dashboard_stream import EventStreams
from .prometheus import controller_registry
from .states import (
    IllegalTransitionError,
    JobNotFoundError,
    JobState,
    StoreError,
    StoreUnavailableError,
)
from .store import JobRecord
from .views import TimelineEntry, eval_json, eval_protos, job_summary, step_point

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "dashboard_static"
PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
# How far back the islands' timeline reaches, and how many log records a job page starts with.
TIMELINE_WINDOW_S = 120.0
# A job's steps closer than this on an island are one bar of the timeline (a pixel of the
# chart spans ~0.1 s of its window).
TIMELINE_MERGE_GAP_S = 0.005
LOG_TAIL = 200
# The job page lists the jobs that come after a job among this many newest jobs.
CHAIN_SCAN = 200
PRUNE_EVERY_S = 600.0
_STATIC_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


def plotly_js() -> Path:
    """plotly.min.js as shipped in the installed `plotly` package's data.

    Raises:
        FileNotFoundError: plotly is not installed.
    """
    path = Path(str(resources.files("plotly"))) / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise FileNotFoundError(f"plotly.min.js is not at {str(path)!r}; reinstall plotly.")
    return path


def island_timeline(
    entries: Iterable[TimelineEntry], since_ns: int, gap_s: float = TIMELINE_MERGE_GAP_S
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """An island's timeline since `since_ns` as the chart's bars, and each job's busy seconds.

    A job's steps that follow each other on the island within `gap_s` are one bar (`step` to
    `last_step`): finer than the chart shows, and it keeps the overview small at any step
    rate (50 islands of 600 sub-millisecond steps each made every overview event 2.4 MB).
    One pass over the entries, no object per step (the overview is built a few times a
    second while the cluster page is open)."""
    bars: list[dict[str, Any]] = []
    busy: dict[str, float] = {}
    gap_ns = gap_s * 1e9
    last: dict[str, Any] | None = None
    last_end_ns = 0
    for e in entries:
        if e.end_ns < since_ns:
            continue
        job_id = e.job_id
        busy[job_id] = busy.get(job_id, 0.0) + max(0, e.end_ns - e.start_ns) / 1e9
        if last is not None and last["job_id"] == job_id and e.start_ns - last_end_ns < gap_ns:
            last_end_ns = max(last_end_ns, e.end_ns)
            last["last_step"] = e.step
            continue
        if last is not None:
            last["end"] = last_end_ns / 1e9
        last = {"job_id": job_id, "step": e.step, "last_step": e.step, "start": e.start_ns / 1e9}
        last_end_ns = e.end_ns
        bars.append(last)
    if last is not None:
        last["end"] = last_end_ns / 1e9
    return bars, busy


def timeline_shares(busy: dict[str, float], weights: dict[str, float]) -> list[dict[str, Any]]:
    """Each job's measured share of an island's device time in its timeline window (`busy`:
    seconds per job, `island_timeline`'s), next to its weight and the share the weights ask
    for (the stripes alone do not show 1:2).

    Returns:
        One {job_id, weight, share, weight_share} per job, in order of first appearance;
        shares are fractions of the busy time (0..1).
    """
    total = sum(busy.values())
    total_weight = sum(weights.get(j, 1.0) for j in busy)
    return [
        {
            "job_id": job,
            "weight": weights.get(job, 1.0),
            "share": seconds / total if total else 0.0,
            "weight_share": weights.get(job, 1.0) / total_weight if total_weight else 0.0,
        }
        for job, seconds in busy.items()
    ]


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
        self.controller = controller
        self.token = token
        self.retention_s = retention_s
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._prune_task: asyncio.Task | None = None
        self.streams = EventStreams(
            controller.events,
            controller.logs.followers,
            overview=self.overview,
            translate=self._update,
            recorded=self._recorded_steps,
            why=lambda job_id: controller.why(controller.store.get_job(job_id)),
            log_dict=_log,
            rollbacks=controller.reporter,
        )
        self.registry = controller_registry(controller, self.islands, self.job_summary)

    # ---- serving -----------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[token_middleware(self.token)])
        secure_every_response(app)
        app.router.add_get("/", self._page("index.html"))
        app.router.add_get("/jobs/{job_id}", self._page("job.html"))
        app.router.add_get("/jobs/{job_id}/serve", self._page("serve.html"))
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/favicon.ico", lambda request: web.Response(status=204))
        app.router.add_get("/api/overview", self._api_overview)
        app.router.add_get("/api/jobs", self._api_jobs)
        app.router.add_get("/api/jobs/{job_id}", self._api_job)
        app.router.add_post("/api/jobs/{job_id}/cancel", self._api_cancel)
        app.router.add_get("/api/jobs/{job_id}/pipeline", self._api_pipeline)
        app.router.add_get("/api/stream", self.streams.all_jobs)
        app.router.add_get("/api/jobs/{job_id}/stream", self._api_stream_job)
        app.router.add_get("/api/jobs/{job_id}/generate", self._api_generate)
        app.router.add_get("/api/jobs/{job_id}/serve", self._api_serve)
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
        self.streams.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _prune_loop(self) -> None:
        assert self.retention_s is not None
        while True:
            try:
                cutoff = int((time.time() - self.retention_s) * 1e6)
                gone = self.controller.store.prune_finished(cutoff)
                if gone:
                    logger.info("history retention removed %d finished jobs", gone)
            except (StoreError, sqlite3.Error):  # (locked: it tries again at its next turn)
                logger.exception("history retention failed")
            await asyncio.sleep(PRUNE_EVERY_S)

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

    def _weights(self, job_ids: Iterable[str]) -> dict[str, float]:
        weights = {}
        for job_id in job_ids:
            try:
                weights[job_id] = spec_lib.weight(self.controller.store.get_job(job_id).spec)
            except StoreError:  # deleted by retention meanwhile
                continue
        return weights

    def islands(self) -> list[dict[str, Any]]:
        """Every island: devices, hosts, resident jobs, memory, and its recent timeline."""
        now_ns = time.time_ns()
        since_ns = now_ns - int(TIMELINE_WINDOW_S * 1e9)
        out = []
        for island in self.controller.islands_proto():
            budget = sum(h.memory_bytes for h in island.hosts)
            jobs = list(island.job_ids)
            per_device = sum(self.controller.job_memory.get(j, 0) for j in jobs)
            bars, busy = island_timeline(self.controller.timeline.get(island.id, ()), since_ns)
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
                    "peak_flops": island.peak_flops or None,
                    "peak_flops_source": island.peak_flops_source,
                    "timeline": bars,
                    "shares": timeline_shares(busy, self._weights(busy)),
                }
            )
        return out

    def job_proto(
        self, record: JobRecord, queued: list[JobRecord] | None = None
    ) -> controller_pb2.Job:
        """The job's wire record without losses, as GetJob answers it (controller/views.py);
        `queued`: the queued jobs, when a page of jobs is built at once."""
        return self.controller.views.job(record, include_losses=False, queued=queued)

    def job_summary(
        self, record: JobRecord, queued: list[JobRecord] | None = None
    ) -> dict[str, Any]:
        """One job as the jobs list and the job page show it (from its wire record)."""
        return job_summary(self.job_proto(record, queued))

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
        records, token = self.controller.store.list_jobs(
            page_size=limit, page_token=cursor, states=states, newest_first=True
        )
        queued = None
        if any(r.state == JobState.QUEUED for r in records):
            queued = self.controller.store.jobs_in_states([JobState.QUEUED])  # once for the page
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
        record = self.controller.store.get_job(job_id)
        metrics = self.controller.store.metrics(record.id)
        job = self.job_proto(record)
        return {
            "job": job_summary(job),
            # The peak FLOP/s its MFU is measured against (shown beside MFU).
            "peak_flops": self.controller.views.job_peak(record) or None,
            "why": self.controller.why(record),
            "jobs_ahead": list(job.jobs_ahead),
            "metrics": [
                self._metric(record, m.step, m.loss, m.tokens_per_s, m.time_us / 1e6, m.mfu)
                for m in metrics
            ],
            "events": [
                {"time": e.time_us / 1e6, "kind": e.kind, "message": e.message}
                for e in self.controller.store.events(record.id)
            ],
            "logs": [_log(r) for r in self.controller.logs.records(record.id, LOG_TAIL)],
            "spec": json.loads(
                json_format.MessageToJson(record.spec, preserving_proto_field_name=True)
            ),
            "evals": [eval_json(e) for e in eval_protos(self.controller.store.evals(record.id))],
            "chain": self.chain(record),
        }

    def chain(self, record: JobRecord) -> dict[str, Any]:
        """Where the job sits in its chain: the jobs it waits for, the checkpoint its
        parameters came from (init_from), and the newest jobs that come after it."""
        store = self.controller.store

        def brief(job_id: str) -> dict[str, Any]:
            try:
                other = store.get_job(job_id)
            except StoreError:
                return {"id": job_id, "name": "", "state": "pruned"}
            return {"id": other.id, "name": other.name, "state": other.state.value}

        init: dict[str, Any] | None = None
        spec = record.spec
        if spec.HasField("init_from"):
            init = {"job": None, "checkpoint": spec.init_from.checkpoint or None, "step": None}
            if spec.init_from.HasField("job"):
                init["job"] = brief(spec.init_from.job)
            if spec.init_from.HasField("step"):
                init["step"] = spec.init_from.step
            for event in store.events(record.id):
                if event.kind == "init":
                    init["checkpoint"] = lineage.init_path(event.message)
        later, _ = store.list_jobs(page_size=CHAIN_SCAN, newest_first=True)
        children = []
        for other in later:
            if record.id in lineage.dependencies(other.spec):
                how = "init_from" if other.spec.init_from.job == record.id else "after"
                children.append({**brief(other.id), "how": how})
        return {
            "after": [brief(j) for j in spec.after],
            "init_from": init,
            "children": children,
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
        return step_point(
            step, loss, tps, t, self.controller.mfu(record, tps) if mfu is None else mfu
        )

    def overview(self) -> dict[str, Any]:
        """The cluster page's data: islands, jobs per state, the controller's epoch."""
        counts = self.controller.store.count_by_state()
        return {
            "islands": self.islands(),
            "counts": {s.value: n for s, n in counts.items()},
            "epoch": self.controller.epoch,
            "state_dir": self.controller.state_dir,
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

    async def _api_pipeline(self, request: web.Request) -> web.Response:
        """A pipeline job's schedule from its hosts' execution logs (controller/trace.py)."""
        from .trace import job_trace, pipeline_gantt

        try:
            record = self.controller.store.get_job(request.match_info["job_id"])
        except JobNotFoundError as e:
            raise web.HTTPNotFound(text=str(e)) from None
        pipe = spec_lib.pipeline_settings(record.spec)
        if pipe is None:
            return web.json_response({"pipeline": None})
        islands = self.controller.islands
        names = [n for n in self.controller.views.job(record).islands if n in islands]
        if not names:
            return web.json_response({"pipeline": None})
        reply = await job_trace(record.id, [islands[n] for n in names])
        return web.json_response(
            {"pipeline": pipeline_gantt(reply, pipe.stages, pipe.microbatches)}
        )

    async def _api_cancel(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job_id"]
        try:
            self.controller.cancel(job_id, "from the dashboard")
        except JobNotFoundError as e:
            raise web.HTTPNotFound(text=str(e)) from None
        except IllegalTransitionError as e:
            raise web.HTTPConflict(text=str(e)) from None
        except sqlite3.OperationalError as e:  # the database locked: nothing was cancelled
            raise web.HTTPServiceUnavailable(
                text=f"the job database is busy ({e}); try again."
            ) from None
        return web.json_response(self.job_summary(self.controller.store.get_job(job_id)))

    # ---- server-sent events (dashboard_stream.py) ------------------------------------------

    async def _api_serve(self, request: web.Request) -> web.Response:
        """A serve job's requests/s, tokens/s, occupancy and latency percentiles (last 60 s)."""
        try:
            record = self.controller.store.find_job(request.match_info["job_id"])
        except JobNotFoundError as e:
            raise web.HTTPNotFound(text=str(e)) from None
        return web.json_response(self.controller.serving.stats(record.id))

    async def _api_generate(self, request: web.Request) -> web.StreamResponse:
        """A serving job's generation as server-sent events: `token` events ({text, token}),
        then `done` ({finish_reason, tokens, ttft_ms, ms_per_token, island}) or `error`
        ({code, message}). Query: prompt, max_tokens, temperature, top_k, top_p, seed, stop
        (repeatable). Errors before the first token are HTTP statuses."""
        try:
            wire = generate_request(request.match_info["job_id"], request.query)
        except ValueError as e:
            raise _bad(str(e)) from None
        replies = self.controller.serving.generate(wire)
        try:
            first = await replies.__anext__()
        except StopAsyncIteration:
            first = None
        except Exception as e:  # noqa: BLE001 - mapped to its status
            raise _generate_error(e) from None
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)

        async def send(event: str, data: dict[str, Any]) -> None:
            await response.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())

        async def reply_event(r: controller_pb2.GenerateJobReply) -> None:
            if r.done:
                await send(
                    "done",
                    {
                        "finish_reason": r.finish_reason,
                        "tokens": r.tokens,
                        "ttft_ms": r.ttft_ms,
                        "ms_per_token": r.ms_per_token,
                        "island": r.island,
                    },
                )
            else:
                await send("token", {"text": r.text, "token": r.token})

        try:
            if first is not None:
                await reply_event(first)
            async for r in replies:
                await reply_event(r)
        except (ConnectionResetError, asyncio.CancelledError):
            await replies.aclose()  # the client went away: its slot is freed
            raise
        except Exception as e:  # noqa: BLE001 - the stream's end, told to the client
            code = getattr(getattr(e, "code", None), "name", None) or type(e).__name__
            await send("error", {"code": code, "message": str(getattr(e, "message", e))})
        return response

    async def _api_stream_job(self, request: web.Request) -> web.StreamResponse:
        """One job's state changes, steps and log records (the job page). Query: from_step,
        the first step the page lacks (a reconnecting EventSource's Last-Event-ID, the last
        step it got, asks for the one after it, and wins: after a rollback the page's steps
        came again from below the from_step it loaded with)."""
        job_id = request.match_info["job_id"]
        try:
            self.controller.store.get_job(job_id)
        except JobNotFoundError as e:
            raise web.HTTPNotFound(text=str(e)) from None
        from_step = _step_number("query parameter from_step", request.query.get("from_step", "0"))
        last_id = request.headers.get("Last-Event-ID")
        if last_id:
            from_step = _step_number("header Last-Event-ID", last_id) + 1
        return await self.streams.one_job(request, job_id, from_step)

    def _recorded_steps(
        self, job_id: str, from_step: int, first: bool = False
    ) -> tuple[int, list[dict[str, Any]]]:
        """The step they start from and the job's recorded steps from there as the pages'
        `metrics` events: from `from_step`, its
        batched steps written first (as WatchJob does: a step batched before a stream
        subscribed was handed to no follower). A locked database leaves the steps not
        written yet out (see ControllerServicer._flush) rather than ending the stream.
        On a stream's `first` replay, a job with fewer steps than `from_step` rolled back
        since the page had them (under an earlier controller: this one tells the stream):
        its steps from the restore point come (the page replaces its own from there)."""
        try:
            self.controller.reporter.flush(job_id)
        except StoreUnavailableError as e:
            logger.warning("%s", e)
        store = self.controller.store
        try:
            record = store.get_job(job_id)
        except JobNotFoundError:
            return from_step, []
        if first:
            steps_completed = store.steps_completed(job_id)
            if steps_completed < from_step:
                from_step = store.restore_point(job_id, steps_completed)
        return from_step, [
            self._step_event(record, m.step, m.loss, m.tokens_per_s, m.time_us / 1e6, m.mfu)
            for m in store.metrics(job_id, from_step=from_step)
        ]

    def _step_event(
        self, record: JobRecord, step: int, loss: float, tps: float, t: float, mfu: float | None
    ) -> dict[str, Any]:
        return {
            "job_id": record.id,
            **self._metric(record, step, loss, tps, t, mfu),
            "steps": record.spec.train.steps,
        }

    def _update(
        self, job_id: str, update: controller_pb2.WatchJobReply, latest_only: bool = False
    ) -> list[tuple[str, dict[str, Any]]]:
        try:
            record = self.controller.store.get_job(job_id)
        except JobNotFoundError:
            return []
        if update.HasField("metrics"):  # a batch of steps: one event each, or its last
            return [
                (
                    "metrics",
                    self._step_event(
                        record, m.step, m.loss, m.tokens_per_s, m.time.ToNanoseconds() / 1e9, m.mfu
                    ),
                )
                for m in (
                    update.more_metrics[-1:] or [update.metrics]
                    if latest_only
                    else [update.metrics, *update.more_metrics]
                )
            ]
        if update.HasField("job") or update.HasField("rolled_back_to"):
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

    # ---- Prometheus (prometheus.py) --------------------------------------------------------

    def prometheus(self) -> str:
        """The controller's metrics in Prometheus' text exposition format."""
        return generate_latest(self.registry).decode()

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4}
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


# The generate endpoint's numeric query parameters: (parse, default, the range an integer's
# field holds as "[lo, hi)" bounds; None for a float).
_GENERATE_NUMBERS: dict[str, tuple[type, float, tuple[int, int] | None]] = {
    "max_tokens": (int, 0, (-(2**31), 2**31)),  # 0: up to 64, as the prompt leaves room
    "temperature": (float, 0.0, None),
    "top_k": (int, 0, (-(2**31), 2**31)),
    "top_p": (float, 0.0, None),
    "seed": (int, 0, (0, 2**64)),
}


def _power_of_two(n: int) -> str:
    """-2**31, 2**64: a bound as a reader knows it; other numbers as they are."""
    m = abs(n)
    if m > 1024 and m & (m - 1) == 0:
        return f"{'-' if n < 0 else ''}2**{m.bit_length() - 1}"
    return str(n)


def generate_request(job_id: str, query: Any) -> controller_pb2.GenerateJobRequest:
    """The generate endpoint's query as a GenerateJobRequest (the router checks the ranges).

    Raises:
        ValueError: a parameter that is not a number or does not fit its field, naming it.
    """
    numbers: dict[str, Any] = {}
    for name, (parse, default, bounds) in _GENERATE_NUMBERS.items():
        text = query.get(name)
        if text is None:
            numbers[name] = default
            continue
        kind = "an integer" if parse is int else "a number"
        try:
            value = parse(text)
        except ValueError:
            raise ValueError(f"query parameter {name}={text!r} is not {kind}.") from None
        if bounds and not bounds[0] <= value < bounds[1]:
            lo, hi = (_power_of_two(b) for b in bounds)
            raise ValueError(f"query parameter {name}={text} is out of range [{lo}, {hi}).")
        numbers[name] = value
    return controller_pb2.GenerateJobRequest(
        job_id=job_id, prompt=query.get("prompt", ""), stop=query.getall("stop", []), **numbers
    )


def _generate_error(e: Exception) -> web.HTTPException:
    """A Generate refusal as an HTTP status."""
    from pathways_lite.workers.rpc import RpcRejection

    if isinstance(e, JobNotFoundError):
        return web.HTTPNotFound(text=str(e) + "\n")
    if isinstance(e, IllegalTransitionError):
        return web.HTTPConflict(text=str(e) + "\n")
    if isinstance(e, ValueError):
        return _bad(str(e))
    if isinstance(e, RpcRejection):
        status = {
            "INVALID_ARGUMENT": web.HTTPBadRequest,
            "RESOURCE_EXHAUSTED": web.HTTPTooManyRequests,
            "FAILED_PRECONDITION": web.HTTPConflict,
            "NOT_FOUND": web.HTTPNotFound,
        }.get(e.code.name, web.HTTPServiceUnavailable)
        return status(text=e.message + "\n")
    return web.HTTPInternalServerError(text=f"{type(e).__name__}: {e}\n")


def _step_number(name: str, text: str) -> int:
    """A step number given as `name`.

    Raises:
        web.HTTPBadRequest: not an integer >= 0, quoting it.
    """
    try:
        step = int(text)
    except ValueError:
        raise _bad(f"{name}={text[:40]!r} is not an integer.") from None
    if step < 0:
        raise _bad(f"{name}={step} must be >= 0.")
    return step


def _bad(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=message + "\n")


def _log(record: controller_pb2.LogRecord) -> dict[str, Any]:
    """One log record as the job page shows it."""
    return {
        "time": record.time.ToNanoseconds() / 1e9,
        "source": record.source,
        "level": record.level,
        "message": record.message,
    }
