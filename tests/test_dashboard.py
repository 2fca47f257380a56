"""The dashboard's data without a browser: keyset pages over 10,000 jobs use the index,
retention prunes finished jobs only, /metrics is Prometheus text, the live stream carries steps.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request

import pytest

from pathways_lite.controller import auth
from pathways_lite.controller.core import Controller
from pathways_lite.controller.dashboard import Dashboard, parse_duration, plotly_js
from pathways_lite.controller.states import JobState
from pathways_lite.controller.store import JobStore
from pathways_lite.controller.views import job_summary
from pathways_lite.v1 import controller_pb2

N_JOBS = 10_000


def _spec(i: int) -> controller_pb2.JobSpec:
    spec = controller_pb2.JobSpec(name=f"job-{i}", islands=1, devices_per_island=1)
    spec.model.preset = "palm-tiny"
    spec.train.steps = 10
    return spec


@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
    """A store holding 10,000 jobs (every 7th still queued, the rest succeeded)."""
    clock = iter(range(1_000_000, 10**12, 1000))
    store = JobStore(
        tmp_path_factory.mktemp("store") / "controller.db", clock_us=lambda: next(clock)
    )
    for i in range(N_JOBS):
        record = store.create_job(_spec(i))
        if i % 7:
            store.transition(record.id, JobState.RUNNING)
            store.transition(record.id, JobState.SUCCEEDED, reason="completed")
    yield store
    store.close()


def test_ten_thousand_jobs_pages_respect_size_and_use_the_index(big_store) -> None:
    dashboard = Dashboard(Controller(big_store, []), token=None)
    statements: list[str] = []
    big_store._conn.set_trace_callback(statements.append)
    try:
        first = dashboard.jobs_page(limit=50)
    finally:
        big_store._conn.set_trace_callback(None)
    assert len(first["jobs"]) == 50 and first["next_cursor"]
    assert first["jobs"][0]["name"] == f"job-{N_JOBS - 1}"  # newest first
    second = dashboard.jobs_page(limit=50, cursor=first["next_cursor"])
    assert len(second["jobs"]) == 50
    assert second["jobs"][0]["name"] == f"job-{N_JOBS - 51}"
    assert not {j["id"] for j in first["jobs"]} & {j["id"] for j in second["jobs"]}
    queued = dashboard.jobs_page(limit=200, state="queued")
    assert len(queued["jobs"]) == 200 and {j["state"] for j in queued["jobs"]} == {"queued"}
    assert queued["jobs"][0]["queue_position"] > 0
    with pytest.raises(ValueError, match="limit=1000"):
        dashboard.jobs_page(limit=1000)

    # The page query the dashboard actually ran, explained with its bound values inlined.
    (page_sql,) = [s for s in statements if "FROM jobs" in s and "ORDER BY created_us" in s]
    plan = " ".join(
        str(row[-1]) for row in big_store._conn.execute("EXPLAIN QUERY PLAN " + page_sql)
    )
    assert "USING INDEX jobs_by_created" in plan or "USING COVERING INDEX" in plan, plan
    assert "TEMP B-TREE" not in plan, plan  # no sort of the whole table
    statements.clear()
    big_store._conn.set_trace_callback(statements.append)
    try:
        dashboard.jobs_page(limit=50, cursor=first["next_cursor"])
    finally:
        big_store._conn.set_trace_callback(None)
    (page_sql,) = [s for s in statements if "FROM jobs" in s and "ORDER BY created_us" in s]
    plan = " ".join(
        str(row[-1]) for row in big_store._conn.execute("EXPLAIN QUERY PLAN " + page_sql)
    )
    assert "SEARCH jobs USING INDEX jobs_by_created" in plan, plan


def test_retention_prunes_old_finished_jobs_only(tmp_path) -> None:
    clock = iter(range(1_000_000, 10**12, 1_000_000))
    store = JobStore(tmp_path / "controller.db", clock_us=lambda: next(clock))
    old_done = store.create_job(_spec(0))
    store.transition(old_done.id, JobState.CANCELLED)
    old_queued = store.create_job(_spec(1))
    new_done = store.create_job(_spec(2))
    store.transition(new_done.id, JobState.CANCELLED)
    assert store.prune_finished(new_done.created_us) == 1
    remaining = {r.id for r in store.list_jobs()[0]}
    assert remaining == {old_queued.id, new_done.id}
    assert store.events(old_done.id) == []  # its events went with it
    store.close()
    assert parse_duration("30d") == 30 * 86400 and parse_duration("90m") == 5400
    with pytest.raises(ValueError, match="'soon'"):
        parse_duration("soon")


def test_job_json_is_the_controllers_job_record(tmp_path) -> None:
    store = JobStore(tmp_path / "controller.db")
    running, first, second = (store.create_job(_spec(i)) for i in range(3))
    store.transition(running.id, JobState.RUNNING)
    store.record_metrics(running.id, 0, 3.5, tokens_per_s=100.0)
    controller = Controller(store, [])
    dashboard = Dashboard(controller, token=None)
    page = {j["id"]: j for j in dashboard.jobs_page(limit=10)["jobs"]}
    for record in store.list_jobs()[0]:
        wire = job_summary(controller.job_proto(record, include_losses=False))
        assert page[record.id] == wire == dashboard.job_detail(record.id)["job"]
    assert page[running.id]["loss"] == 3.5 and page[running.id]["tokens_per_s"] == 100.0
    assert [page[first.id]["queue_position"], page[second.id]["queue_position"]] == [1, 2]
    assert dashboard.job_detail(second.id)["jobs_ahead"] == [first.id]
    store.close()


def test_the_time_multiplexing_shares_are_measured_beside_the_weights() -> None:
    from pathways_lite.controller.dashboard import island_timeline, timeline_shares
    from pathways_lite.controller.views import TimelineEntry

    sec = 10**9
    timeline = [
        TimelineEntry("a", n, t * sec, t * sec + sec) for n, t in enumerate(range(0, 20, 3))
    ]
    timeline += [
        TimelineEntry("b", n, t * sec + sec, t * sec + 3 * sec)
        for n, t in enumerate(range(0, 20, 3))
    ]
    timeline.sort(key=lambda e: e.start_ns)
    bars, busy = island_timeline(timeline, since_ns=0)
    assert busy == {"a": 7.0, "b": 14.0}
    shares = {s["job_id"]: s for s in timeline_shares(busy, {"a": 1.0, "b": 2.0})}
    assert shares["a"]["share"] == pytest.approx(1 / 3) and shares["a"]["weight"] == 1.0
    assert shares["b"]["share"] == pytest.approx(2 / 3) and shares["b"]["weight"] == 2.0
    assert shares["b"]["weight_share"] == pytest.approx(2 / 3)
    assert timeline_shares({}, {}) == []
    # Only the window counts: the steps ended before `since_ns` are left out.
    assert island_timeline(timeline, since_ns=19 * sec)[1] == {"a": 1.0, "b": 2.0}


def test_a_jobs_back_to_back_steps_are_one_bar_of_the_timeline() -> None:
    from pathways_lite.controller.dashboard import island_timeline
    from pathways_lite.controller.views import TimelineEntry

    ms = 10**6
    steps = [TimelineEntry("a", n, n * ms, (n + 1) * ms) for n in range(600)]
    steps += [TimelineEntry("b", 0, 700 * ms, 800 * ms)]
    steps += [TimelineEntry("a", 600, 800 * ms, 900 * ms)]  # after b: a bar again
    steps += [TimelineEntry("a", 601, 1500 * ms, 1600 * ms)]  # a pause: a bar again
    bars, busy = island_timeline(steps, since_ns=0)
    assert [(b["job_id"], b["step"], b["last_step"], b["start"], b["end"]) for b in bars] == [
        ("a", 0, 599, 0.0, 0.6),
        ("b", 0, 0, 0.7, 0.8),
        ("a", 600, 600, 0.8, 0.9),
        ("a", 601, 601, 1.5, 1.6),
    ]
    assert busy == pytest.approx({"a": 0.8, "b": 0.1})


def test_metrics_are_read_from_the_store_at_each_scrape_never_accumulated(tmp_path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    store = JobStore(tmp_path / "controller.db")
    running = store.create_job(_spec(0))
    store.create_job(_spec(1))
    store.transition(running.id, JobState.RUNNING)
    store.record_metrics(running.id, 0, 3.5, tokens_per_s=100.0)
    controller = Controller(store, [])
    dashboards = [Dashboard(controller, token=None) for _ in range(2)]  # no registry clash

    def scrape(dashboard: Dashboard) -> dict[tuple, float]:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(dashboard.prometheus())
            for s in family.samples
        }

    first = scrape(dashboards[0])
    assert first == scrape(dashboards[0]) == scrape(dashboards[1])
    assert first[("pathways_lite_jobs", (("state", "running"),))] == 1
    assert first[("pathways_lite_jobs", (("state", "queued"),))] == 1
    labels = (("job", running.id), ("name", "job-0"))
    assert first[("pathways_lite_job_loss", labels)] == 3.5
    assert first[("pathways_lite_job_tokens_per_second", labels)] == 100.0
    assert first[("pathways_lite_job_steps_completed", labels)] == 1
    assert first[("pathways_lite_steps_total", ())] == controller.steps_total
    store.close()


def test_plotly_is_served_from_the_installed_package() -> None:
    path = plotly_js()
    assert path.stat().st_size > 1_000_000 and b"plotly" in path.read_bytes()[:2000].lower()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_metrics_and_live_stream_on_a_running_cluster(local_cluster, tmp_path) -> None:
    from pathways_lite.sdk import Client

    base = json.loads((local_cluster.state_dir / "controller.json").read_text())["dashboard"]
    headers = {"Authorization": auth.bearer(auth.read_token(local_cluster.state_dir / "token"))}
    client = Client(local_cluster.state_dir)
    job = client.submit(
        {
            "name": "dash-stream",
            "model": {"preset": "palm-tiny"},
            "islands": 1,
            "devices_per_island": 2,
            "mesh": {"data": 1, "model": 2},
            "train": {"steps": 100000, "global_batch": 4, "seq_len": 64},
            "data": {"source": "stdlib", "vocab_size": 1024, "max_bytes": 1000000},
        }
    )
    try:
        request = urllib.request.Request(f"{base}api/jobs/{job.id}/stream", headers=headers)
        steps = []
        with urllib.request.urlopen(request, timeout=120) as stream:
            deadline = time.monotonic() + 120
            event = None
            while len(steps) < 3 and time.monotonic() < deadline:
                line = stream.readline().decode().strip()
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event == "metrics":
                    steps.append(json.loads(line[6:])["step"])
        assert len(steps) == 3 and steps == sorted(steps)

        request = urllib.request.Request(base + "metrics", headers=headers)
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read().decode()
        assert response.headers["Content-Type"].startswith("text/plain")
        name = r"[a-z_][a-z0-9_]*"  # Prometheus names may hold digits (`..._token_f1`)
        sample = re.compile(
            rf'^{name}(\{{([a-z_]+="[^"]*",?)*\}})? -?[0-9.e+-]+$|^{name}\{{.*\}} NaN$'
        )
        for line in text.splitlines():
            assert line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line)
        # The session cluster may run other tests' jobs too: at least this one is counted.
        running = re.search(r'^pathways_lite_jobs\{state="running"\} ([0-9.e+]+)$', text, re.M)
        assert running and float(running.group(1)) >= 1, text
        assert re.search(r"^pathways_lite_steps_total [1-9]", text, re.M)
        assert f'pathways_lite_job_tokens_per_second{{job="{job.id}"' in text
        used = re.search(
            r'^pathways_lite_island_memory_used_bytes\{island="island-0"\} ([0-9.e+]+)$', text, re.M
        )
        assert used and float(used.group(1)) > 0, text
        assert "pathways_lite_job_failures_total" in text
    finally:
        job.cancel()


def test_a_batch_of_steps_is_every_step_for_a_job_page_and_the_last_for_the_cluster_page(
    tmp_path,
) -> None:
    store = JobStore(tmp_path / "controller.db")
    record = store.create_job(_spec(0))
    dashboard = Dashboard(Controller(store, []), token=None)
    batch = controller_pb2.WatchJobReply(metrics=controller_pb2.StepMetrics(step=4, loss=2.0))
    batch.more_metrics.extend(controller_pb2.StepMetrics(step=n, loss=1.0 / n) for n in range(5, 8))
    every = dashboard._update(record.id, batch)
    assert [(kind, data["step"]) for kind, data in every] == [("metrics", n) for n in range(4, 8)]
    (latest,) = dashboard._update(record.id, batch, latest_only=True)
    assert latest[1]["step"] == 7 and latest[1]["loss"] == pytest.approx(1 / 7)
    store.close()
