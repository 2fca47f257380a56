"""The cluster page's event streams under a busy bus (controller/dashboard_stream.py): many
pages open at once get every update in order, share one encoding of each update and one
overview per interval instead of computing an overview per update per page, and each page's
last overview, once the bus goes quiet, reflects its last update.

A real EventBus and real HTTP streams (aiohttp on a loopback port); the overview is a counting
function of the bus (the dashboard's own reads the store).
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp import web

from pathways_lite.controller.bus import ALL_JOBS, EventBus
from pathways_lite.controller.dashboard_stream import EventStreams
from pathways_lite.v1 import controller_pb2

pytestmark = pytest.mark.timeout(60)

PAGES = 20
JOBS = 5
UPDATES = 3000


async def _read_page(url: str, ready: asyncio.Event, opened: list, until_seq: int) -> dict:
    """One cluster page: the seqs of its step events, its resyncs, its last overview."""
    seqs, resyncs, last_overview, kind = [], 0, None, None
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        opened.append(1)
        if len(opened) == PAGES:
            ready.set()
        async for raw in response.content:
            line = raw.decode().strip()
            if line.startswith("event: "):
                kind = line[len("event: ") :]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: ") :])
                if kind == "step":
                    seqs.append(data["seq"])
                elif kind == "resync":
                    resyncs += 1
                elif kind == "overview":
                    last_overview = data
                    if data["bus_seq"] >= until_seq and seqs and seqs[-1] >= until_seq:
                        break
    return {"seqs": seqs, "resyncs": resyncs, "overview": last_overview}


def test_many_pages_get_every_update_and_share_the_overview() -> None:
    async def scenario() -> None:
        bus = EventBus(queue_size=UPDATES + 10)
        calls = []

        def overview() -> dict:
            calls.append(1)
            return {"bus_seq": bus.seq[ALL_JOBS], "computed": len(calls)}

        def translate(job_id: str, update: controller_pb2.WatchJobReply, latest: bool) -> list:
            return [("step", {"job": job_id, "step": update.metrics.step})]

        streams = EventStreams(
            bus,
            EventBus(),
            overview=overview,
            translate=translate,
            recorded=lambda job_id, from_step, first: (from_step, []),
            why=lambda job_id: "",
            log_dict=lambda record: {},
        )
        app = web.Application()
        app.router.add_get("/api/stream", streams.all_jobs)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}/api/stream"
        ready, opened = asyncio.Event(), []
        pages = [asyncio.create_task(_read_page(url, ready, opened, UPDATES)) for _ in range(PAGES)]
        await asyncio.wait_for(ready.wait(), 20)
        while len(bus._queues.get(ALL_JOBS, ())) < PAGES:  # every stream subscribed
            await asyncio.sleep(0.01)
        # Bursts of steps, as a busy controller publishes them between its loop's turns.
        for n in range(UPDATES):
            update = controller_pb2.WatchJobReply(metrics=controller_pb2.StepMetrics(step=n))
            bus.publish(f"job-{n % JOBS}", update)
            if n % 100 == 99:
                await asyncio.sleep(0.002)
        results = await asyncio.wait_for(asyncio.gather(*pages), 30)
        streams.close()
        await runner.cleanup()
        for page in results:
            assert page["resyncs"] == 0
            assert page["seqs"] == list(range(1, UPDATES + 1))  # every update, in order
            # Once the bus went quiet, the page's overview reflects its last update.
            assert page["overview"]["bus_seq"] == UPDATES
        # One overview per update per page would be PAGES x UPDATES computations: the pages
        # share them (at most one per interval while busy, plus the exact one at the end).
        assert len(calls) <= 40, len(calls)

    asyncio.run(scenario())


def test_a_job_page_back_after_a_rollback_it_did_not_hear_of_gets_the_steps_run_again() -> None:
    """A job page reconnects at step 500 (Last-Event-ID 499) after the job rolled back to its
    checkpoint at 400 under another controller: the store holds steps up to 399, its first
    replay starts at 400 and is empty; the steps that run again, 400 on, all reach the page
    (before, those up to 499 were taken for sent and dropped, with no resync)."""

    async def scenario() -> None:
        bus = EventBus()

        def recorded(job_id: str, from_step: int, first: bool) -> tuple[int, list]:
            return (400 if first and from_step > 400 else from_step), []

        def translate(job_id: str, update: controller_pb2.WatchJobReply, latest: bool) -> list:
            return [("metrics", {"step": update.metrics.step})]

        streams = EventStreams(
            bus,
            EventBus(),
            overview=dict,
            translate=translate,
            recorded=recorded,
            why=lambda job_id: "",
            log_dict=lambda record: {},
        )

        async def one_job(request: web.Request) -> web.StreamResponse:
            return await streams.one_job(request, "job", int(request.query["from_step"]))

        app = web.Application()
        app.router.add_get("/stream", one_job)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        steps: list[int] = []
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/stream?from_step=500") as response:
                while not bus._queues.get("job"):  # subscribed
                    await asyncio.sleep(0.01)
                for step in range(400, 505):
                    metrics = controller_pb2.StepMetrics(step=step)
                    bus.publish("job", controller_pb2.WatchJobReply(metrics=metrics))
                async for raw in response.content:
                    line = raw.decode().strip()
                    if line.startswith("data: "):
                        steps.append(json.loads(line[len("data: ") :])["step"])
                        if steps[-1] == 504:
                            break
        streams.close()
        await runner.cleanup()
        assert steps == list(range(400, 505))

    asyncio.run(scenario())
