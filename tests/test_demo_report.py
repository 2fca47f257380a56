"""The demo's failure paths, against a stand-in controller on a real gRPC port
(tests/fake_controller.py): a broken job stream reaches `run()` instead of dying in its
thread, and an island with no step of one job gives a line naming it, not a crash."""

from __future__ import annotations

import io

import pytest
from fake_controller import serve_fake
from rich.console import Console

from pathways_lite import demo
from pathways_lite.client import ClientError, ControllerClient
from pathways_lite.v1 import controller_pb2

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def fake(tmp_path):
    fake, server = serve_fake(tmp_path)
    yield fake
    server.stop(0)


def test_a_broken_job_stream_reaches_the_caller(fake, tmp_path) -> None:
    fake.break_watch = True
    specs = {name: demo.demo_spec(name, d, w, steps=20) for name, d, w in demo.DEMO_JOBS}
    console = Console(file=io.StringIO())
    with ControllerClient(tmp_path) as client:
        with pytest.raises(ClientError, match="the stream broke"):
            demo._train(client, specs, 20, 0, console)


def test_an_island_without_a_step_of_one_job_is_reported_naming_it(fake, tmp_path) -> None:
    steps = [
        controller_pb2.IslandStep(job_id="job-1", step=i, start_unix_ns=i, end_unix_ns=i + 1)
        for i in range(3)
    ]
    fake.islands = [controller_pb2.Island(id="island-0", recent_steps=steps)]
    jobs = {
        name: {"job_id": f"job-{k}", "weight": w, "losses": [], "sample": {}}
        for k, (name, _, w) in enumerate(demo.DEMO_JOBS, 1)
    }
    with ControllerClient(tmp_path) as client:
        timeline = demo._timeline(client, jobs)
    assert timeline["island-0"]["order"] == "SSS"
    assert "large (job-2)" in timeline["island-0"]["missing"]
    out = io.StringIO()
    demo._report(Console(file=out, width=200), {"jobs": jobs, "timeline": timeline, "wall_s": 1})
    assert "no step of large (job-2) in island-0" in out.getvalue()
