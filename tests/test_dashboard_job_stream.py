"""The job page's event stream and the dashboard's security headers, on a real controller
over simulated islands (workers/sim_host.py: real gRPC, no JAX) with its dashboard on a
loopback port: the page's chart gets every step once (the steps after its detail, those the
controller batched before the stream began, and after a reconnect those after the last event
id), a page that lagged is told to resync, gets no older state than it refetches and is told
of the log records it lost, and every response (a refusal, a redirect, an error, a stream)
carries the headers that forbid framing and foreign scripts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from test_scale_harness import _prepare
from test_scale_harness import _spec as sim_spec  # tests/ is on sys.path

from pathways_lite.controller import auth
from pathways_lite.controller.core import Controller
from pathways_lite.controller.dashboard import Dashboard
from pathways_lite.controller.states import JobState
from pathways_lite.controller.store import JobStore
from pathways_lite.v1 import controller_pb2
from pathways_lite.workers.sim_host import SimCluster, connect_islands

pytestmark = pytest.mark.timeout(60)

TOKEN = "job-stream-test-token"


def _spec(name: str, steps: int) -> controller_pb2.JobSpec:
    return sim_spec(name, 1, steps)


@contextlib.asynccontextmanager
async def _dashboard(tmp_path, *, token: str | None = None, step_s: float = 0.001, **island):
    """A started controller over one simulated island of `step_s` steps (and `island`'s other
    SimIsland settings) and its dashboard: yields (the controller, the dashboard's URL)."""
    sim = SimCluster.uniform(1, step_s=step_s, **island)
    hosts = await connect_islands(await sim.start())
    store = JobStore.open_controller(tmp_path / "state")
    c = Controller(store, hosts, prepare=_prepare, peak_flops=1e12)
    await c.start()
    dashboard = Dashboard(c, token=token)
    port = await dashboard.start()
    try:
        yield c, f"http://127.0.0.1:{port}/"
    finally:
        await dashboard.stop()
        await c.stop()
        await sim.stop()
        store.close()


async def _until(predicate, timeout_s: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def _events(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, str, Any]]:
    """A server-sent event stream's (id, event, data) triples."""
    event_id = kind = ""
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("id: "):
            event_id = line[len("id: ") :]
        elif line.startswith("event: "):
            kind = line[len("event: ") :]
        elif line.startswith("data: "):
            yield event_id, kind, json.loads(line[len("data: ") :])


def test_a_job_pages_stream_gives_every_step_once_after_its_detail_and_a_reconnect(
    tmp_path,
) -> None:
    async def main() -> None:
        async with _dashboard(tmp_path) as (c, url), aiohttp.ClientSession() as http:
            job_id = c.submit(controller_pb2.SubmitJobRequest(spec=_spec("fast", 10**7))).id
            await _until(lambda: c.store.steps_completed(job_id) > 20)
            # As the page does: its detail (the steps written so far), then its stream from
            # the step after them; steps go on meanwhile, some batched, none written yet.
            async with http.get(f"{url}api/jobs/{job_id}") as response:
                steps = [m["step"] for m in (await response.json())["metrics"]]
            assert steps
            last_id = ""

            async def read(headers: dict[str, str], how_many: int) -> None:
                nonlocal last_id
                stream = f"{url}api/jobs/{job_id}/stream?from_step={steps[-1] + 1}"
                async with http.get(stream, headers=headers) as response:
                    assert response.headers["Content-Type"] == "text/event-stream"
                    read = 0
                    async for event_id, kind, data in _events(response):
                        if kind == "metrics":
                            assert event_id == str(data["step"])  # what a reconnect sends
                            steps.append(data["step"])
                            last_id, read = event_id, read + 1
                            if read == how_many:
                                return

            await read({}, 300)
            await asyncio.sleep(0.3)  # steps with no page following the job
            # An EventSource reconnects to the same address, with the last event id it got.
            await read({"Last-Event-ID": last_id}, 300)
            assert steps == list(range(steps[-1] + 1))  # every step, once, in order
            c.cancel(job_id, "done")

    asyncio.run(main())


def test_a_lagging_job_page_is_told_to_resync_and_gets_no_older_state(tmp_path) -> None:
    async def main() -> None:
        async with _dashboard(tmp_path) as (c, url), aiohttp.ClientSession() as http:
            # A job that waits for another: queued, its record updated only by this test.
            ahead = c.submit(controller_pb2.SubmitJobRequest(spec=_spec("ahead", 10**7))).id
            spec = _spec("waits", 10)
            spec.after.append(ahead)
            job_id = c.submit(controller_pb2.SubmitJobRequest(spec=spec)).id
            await _until(lambda: c.store.get_job(ahead).state == JobState.RUNNING)
            assert c.store.get_job(job_id).state == JobState.QUEUED
            c.events.queue_size = c.logs.followers.queue_size = 4  # the page's, small
            async with http.get(f"{url}api/jobs/{job_id}/stream") as response:
                await _until(lambda: job_id in c.events._queues)
                # A burst while the page's stream waits: 10 updates of its record and 10 log
                # records, into queues of 4.
                for n in range(10):
                    c.reporter.phase(job_id, f"phase-{n}")
                for n in range(10):
                    c.logs.add(job_id, controller_pb2.LogRecord(source="test", message=f"line {n}"))
                seen: list[tuple[str, Any]] = []
                async for _, kind, data in _events(response):
                    seen.append((kind, data))
                    if kind == "log" and data["message"] == "line 9":
                        break
            assert [d for k, d in seen if k == "resync"] == [{"dropped": 6}], seen
            # The record it refetches reflects the newest phase: no older one follows.
            assert [k for k, _ in seen if k in ("job", "why")] == [], seen
            logs = [d["message"] for k, d in seen if k == "log"]
            lost = "... 6 log records dropped (the reader was too slow) ..."
            assert logs == [lost, "line 6", "line 7", "line 8", "line 9"], seen

    asyncio.run(main())


def test_a_generation_with_the_dashboards_cookie_alone_needs_the_csrf_header(tmp_path) -> None:
    """A generation is a GET that takes a serving slot: authorized by the session cookie
    alone (which a browser also sends for a page of another port of this host), it needs the
    CSRF header as a state change does; the bearer token needs none."""
    from pathways_lite.controller.dashboard_auth import CSRF_HEADER

    async def main() -> None:
        async with (
            _dashboard(tmp_path, token=TOKEN) as (_, url),
            aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http,
        ):
            async with http.get(f"{url}?token={TOKEN}") as response:
                assert response.status == 200  # the token traded for the cookie
            async with http.get(f"{url}api/overview") as response:
                assert response.status == 200  # the cookie opens the dashboard
            generate = f"{url}api/jobs/no-such-job/generate?prompt=hi"
            async with http.get(generate) as response:
                assert response.status == 403 and CSRF_HEADER in await response.text()
            async with http.get(generate, headers={CSRF_HEADER: "1"}) as response:
                assert response.status == 404  # past the check: no such job
        async with (
            _dashboard(tmp_path, token=TOKEN) as (_, url),
            aiohttp.ClientSession() as http,
        ):
            bearer = {"Authorization": auth.bearer(TOKEN)}
            async with http.get(f"{url}api/jobs/x/generate?prompt=hi", headers=bearer) as response:
                assert response.status == 404

    asyncio.run(main())


def test_every_dashboard_response_carries_the_security_headers(tmp_path) -> None:
    """A refusal (401), the token traded for a cookie (302), an error a handler raises (404)
    and an event stream: each forbids framing, sniffing and scripts from other origins."""

    def assert_secured(response: aiohttp.ClientResponse) -> None:
        headers = response.headers
        assert "frame-ancestors 'none'" in headers.get("Content-Security-Policy", ""), headers
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        assert headers.get("X-Frame-Options") == "DENY", headers
        assert headers.get("X-Content-Type-Options") == "nosniff", headers
        assert headers.get("Referrer-Policy") == "no-referrer", headers

    async def main() -> None:
        async with (
            _dashboard(tmp_path, token=TOKEN) as (c, url),
            aiohttp.ClientSession() as http,
        ):
            job_id = c.submit(controller_pb2.SubmitJobRequest(spec=_spec("shown", 10))).id
            bearer = {"Authorization": auth.bearer(TOKEN)}
            async with http.get(f"{url}api/overview") as response:
                assert response.status == 401
                assert_secured(response)
            async with http.get(f"{url}?token={TOKEN}", allow_redirects=False) as response:
                assert response.status == 302
                assert_secured(response)
            async with http.get(f"{url}api/jobs/no-such-job", headers=bearer) as response:
                assert response.status == 404
                assert_secured(response)
            async with http.get(
                f"{url}api/jobs/no-such-job/generate?prompt=hi", headers=bearer
            ) as response:
                assert response.status == 404
                assert_secured(response)
            async with http.get(f"{url}api/jobs/{job_id}/stream", headers=bearer) as response:
                assert response.status == 200
                assert response.headers["Content-Type"] == "text/event-stream"
                assert_secured(response)
            async with http.get(f"{url}api/overview", headers=bearer) as response:
                assert response.status == 200
                assert_secured(response)

    asyncio.run(main())


def test_a_job_pages_stream_opened_with_a_token_rotated_away_ends_with_its_grace(
    tmp_path,
) -> None:
    """A stream is authorised when it opens; one opened with the old token of a rotation
    now ends once the grace is over (it served on for as long as the page stayed open), and
    the page's reconnect with it is refused; the new token's stream goes on."""
    from pathways_lite.workers.auth import Credential, bearer

    credential = Credential("old-page-token")

    async def main() -> None:
        async with _dashboard(tmp_path, token=credential) as (c, url):
            job_id = c.submit(controller_pb2.SubmitJobRequest(spec=_spec("fast", 10**7))).id
            await _until(lambda: c.store.steps_completed(job_id) > 5)
            stream = f"{url}api/jobs/{job_id}/stream?from_step=0"
            old = {"Authorization": bearer("old-page-token")}
            new = {"Authorization": bearer("new-page-token")}
            async with aiohttp.ClientSession() as http:
                async with http.get(stream, headers=old) as response:
                    assert response.status == 200
                    events = _events(response)
                    await events.__anext__()
                    credential.rotate("new-page-token", grace_s=0.3)
                    rotated = asyncio.get_running_loop().time()
                    async with asyncio.timeout(10):
                        async for _ in events:  # steps keep coming: it ends by itself
                            pass
                    assert asyncio.get_running_loop().time() - rotated >= 0.3
                async with http.get(stream, headers=old) as response:
                    assert response.status == 401
                async with http.get(stream, headers=new) as response:
                    assert response.status == 200
                    opened = asyncio.get_running_loop().time()
                    async with asyncio.timeout(10):
                        async for _ in _events(response):
                            if asyncio.get_running_loop().time() - opened > 1.5:
                                break  # past a recheck of its credential, still open

    asyncio.run(main())
