"""The dashboard in real headless Chromium (Playwright driving Debian's /usr/bin/chromium).

The cluster page shows the islands; a job submitted from the CLI appears without a reload; its
page's loss chart gains points while it trains, without a navigation; the cancel button ends
it. A cancel reason full of markup is shown as text (the spec's name validation refuses markup
in job names, so the reason is the user string that reaches the page). A fast job's chart holds
every step once. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
XSS = "<script>alert(1)</script><img src=x onerror=alert(2)>"
SPEC = """\
name: {name}
model: {{preset: palm-tiny}}
islands: 1
devices_per_island: 2
mesh: {{data: 1, model: 2}}
train: {{steps: 100000, global_batch: 4, seq_len: 64, seed: 3}}
data: {{source: stdlib, vocab_size: 1024, max_bytes: 1000000}}
"""


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pathways_lite.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        from ensure_tools import ensure_chromium  # tests/ is on sys.path under pytest

        ensure_chromium()
    if not os.path.exists(CHROMIUM):
        message = f"{CHROMIUM} is missing (apt-get install chromium); the browser test needs it."
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


def _wait(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def test_dashboard_live_job_chart_and_cancel_in_chromium(local_cluster, browser, tmp_path) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    state = str(local_cluster.state_dir)
    url = json.loads(cli("dashboard", "--json", "--state-dir", state).stdout)["url_with_token"]
    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    dialogs: list[str] = []

    def on_dialog(dialog) -> None:
        dialogs.append(f"{dialog.type}:{dialog.message}")
        dialog.accept()

    page.on("dialog", on_dialog)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    assert "token=" not in page.url  # traded for a cookie
    page.wait_for_selector('.island[data-island="island-0"]', timeout=30_000)
    assert "2 × cpu" in page.inner_text('.island[data-island="island-0"]')
    # The Metrics link says what it serves; the epoch says what it counts.
    assert "Prometheus" in page.inner_text("nav")
    assert "controller starts" in page.inner_text("#summary")
    page.evaluate("window.__sameDocument = true")

    spec = tmp_path / "live.yaml"
    spec.write_text(SPEC.format(name="browser-live"))
    submitted = cli("submit", str(spec), "--json", "--state-dir", state)
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["id"]
    try:
        row = f'tr[data-job="{job_id}"]'
        page.wait_for_selector(row, timeout=60_000)  # arrived over the event stream
        page.wait_for_selector(f'{row}[data-state="running"]', timeout=120_000)
        assert page.evaluate("window.__sameDocument") is True
        # Its measured share of the island's device time, beside its weight.
        share = f'#shares [data-job="{job_id}"]'
        page.wait_for_selector(share, timeout=60_000)
        assert "measured" in page.inner_text(share) and "weight 1" in page.inner_text(share)
        page.screenshot(path=str(ARTIFACTS / "dashboard-cluster.png"), full_page=True)

        # The row re-renders as steps arrive: follow its link's address.
        href = page.get_attribute(f"{row} a.job-link", "href")
        assert href == f"/jobs/{job_id}"
        page.goto(url.split("?")[0] + href.lstrip("/"))
        page.wait_for_function(
            "document.getElementById('loss-chart').data !== undefined", timeout=30_000
        )
        page.evaluate("window.__sameDocument = true")
        points = "document.getElementById('loss-chart').data[0].x.length"
        first = _wait(lambda: page.evaluate(points), 60, "the first chart points")
        later = _wait(
            lambda: (n := page.evaluate(points)) >= first + 3 and n, 60, "more chart points"
        )
        assert later > first and page.evaluate("window.__sameDocument") is True
        assert page.evaluate("document.getElementById('mfu-chart').data[0].x.length") >= first
        assert "no steps yet" not in page.inner_text("#loss-chart")
        assert page.text_content("#job-state") == "running"
        page.screenshot(path=str(ARTIFACTS / "dashboard-job-running.png"), full_page=True)

        # A user string full of markup (the cancel reason), on a job that waits for this one
        # (`after`): it never steps, whatever the timing (cancelled at once, as the first
        # job still runs).
        spec.write_text(SPEC.format(name="browser-xss") + f"after: [{job_id}]\n")
        xss = cli("submit", str(spec), "--json", "--state-dir", state)
        assert xss.returncode == 0, xss.stderr
        xss_id = json.loads(xss.stdout)["id"]
        cancelled = cli("cancel", xss_id, "--reason", XSS, "--state-dir", state)
        assert cancelled.returncode == 0, cancelled.stderr

        page.click("#cancel")
        page.wait_for_function(
            "document.getElementById('job-state').textContent === 'cancelled'", timeout=30_000
        )
        assert any(d.startswith("confirm:") for d in dialogs)
        status = json.loads(cli("status", job_id, "--json", "--state-dir", state).stdout)
        assert status["state"] == "cancelled" and status["reason"] == "user_cancelled"
        page.screenshot(path=str(ARTIFACTS / "dashboard-job-cancelled.png"), full_page=True)
    finally:
        cli("cancel", job_id, "--state-dir", state)

    # The cancel reason full of markup is shown as text and never runs.
    dialogs.clear()
    page.goto(url.split("?")[0] + f"jobs/{xss_id}")
    page.wait_for_selector("#events tbody tr", timeout=30_000)
    assert XSS in page.inner_text("#message")
    assert XSS in page.inner_text("#events")
    assert page.locator("#message script, #message img, #events img").count() == 0
    # A job without steps: its charts say so instead of drawing empty axes.
    for chart in ("#loss-chart", "#tps-chart", "#mfu-chart"):
        assert "no steps yet" in page.inner_text(chart), chart
    time.sleep(0.5)
    assert dialogs == [] and errors == []
    page.screenshot(path=str(ARTIFACTS / "dashboard-escaping.png"), full_page=True)
    page.close()


def test_a_job_pages_chart_holds_every_step_once_in_chromium(browser, tmp_path) -> None:
    """A fast job (simulated island: no JAX) whose page opens while it runs, and which rolls
    back once (a failed step, retried: its steps run again from 0): once it ends, its charts
    hold every step, once, in order (the steps the controller had batched but not written
    when the page loaded its detail reach it too), with the values of the run that counts:
    the page replaced the steps it had from the rolled-back run (before, it kept them and
    skipped their new values)."""
    import grpc
    from test_dashboard_job_stream import _dashboard, _spec  # tests/ is on sys.path

    from pathways_lite.v1 import controller_pb2

    steps, fails_at = 1000, 700
    served: dict = {}
    ready = threading.Event()

    async def serve() -> None:
        served["loop"], served["stop"] = asyncio.get_running_loop(), asyncio.Event()
        fail = {("*", fails_at): grpc.StatusCode.UNAVAILABLE}
        async with _dashboard(tmp_path, step_s=0.003, fail_steps=fail) as (c, url):
            served["controller"], served["url"] = c, url
            ready.set()
            await served["stop"].wait()

    def on_loop(fn, *args):
        async def call():
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(call(), served["loop"]).result(30)

    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="controller")
    thread.start()
    try:
        assert ready.wait(60), "the controller did not start"
        c = served["controller"]
        request = controller_pb2.SubmitJobRequest(spec=_spec("chart", steps))
        job_id = on_loop(c.submit, request).id
        _wait(lambda: on_loop(c.store.steps_completed, job_id) > 50, 30, "the job's steps")
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{served['url']}jobs/{job_id}")
        points = "document.getElementById('loss-chart').data[0].x"
        drawn_yet = "(document.getElementById('loss-chart').data || [{x: []}])[0].x.length"
        _wait(lambda: page.evaluate(drawn_yet) > 0, 30, "the chart drawn")
        # The page is live before the failure, so it sees the rollback.
        assert on_loop(c.store.steps_completed, job_id) < fails_at
        page.wait_for_function(
            "document.getElementById('job-state').textContent === 'succeeded'", timeout=60_000
        )
        with contextlib.suppress(AssertionError):  # (the page draws twice a second)
            _wait(lambda: page.evaluate(f"{points}.length") >= steps, 3, "every step drawn")
        charted = page.evaluate(f"Array.from({points})")
        missing = sorted(set(range(steps)) - set(charted))
        assert charted == list(range(steps)), f"{len(charted)} points, missing {missing[:20]}"
        # Measured throughput differs from run to run: the chart's is the final run's.
        recorded = [m.tokens_per_s for m in on_loop(c.store.metrics, job_id)]
        drawn = page.evaluate("Array.from(document.getElementById('tps-chart').data[0].y)")
        stale = [i for i, (a, b) in enumerate(zip(drawn, recorded, strict=True)) if a != b]
        assert not stale, f"{len(stale)} steps drawn with the rolled-back run's: {stale[:10]}"
        events = [e.kind for e in on_loop(c.store.events, job_id)]
        assert "failure" in events or "retry" in events, events
        assert errors == []
        page.close()
    finally:
        if "stop" in served:
            served["loop"].call_soon_threadsafe(served["stop"].set)
        thread.join(30)
