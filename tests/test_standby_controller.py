"""A standby controller: it waits on the state dir's lock while the controller lives (acting on
nothing) and takes over when the controller is SIGKILLed, adopting the job its islands hold.

Real processes, real kill: a local cluster (Ray on loopback, islands a, b of 1 host x 2 CPU
devices) with `standby_controller=True` trains palm-tiny data parallel on a + b; the controller
is SIGKILLed mid-training.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

from pathways_lite.client import ControllerClient
from pathways_lite.controller.store import DB_NAME, JobStore
from pathways_lite.local import CLUSTER_FILE, LocalCluster, recorded_pids
from pathways_lite.spec import load_spec_text

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SPEC = """
name: standby
model: {preset: palm-tiny}
islands: 2
devices_per_island: 2
mesh: {data: 2, model: 1}
train: {steps: 100000, global_batch: 4, seq_len: 64, seed: 0, checkpoint_every: 1000}
data: {source: stdlib, vocab_size: 1024, max_bytes: 1000000}
"""


def wait_for(predicate, timeout_s: float, what: str, every_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def test_a_standby_controller_takes_over_a_killed_controller_and_adopts_its_job(monkeypatch):
    monkeypatch.setenv("PATHWAYS_LITE_SPARE_HOSTS", "off")  # not this test's subject: CPU
    state_dir = Path(tempfile.mkdtemp(prefix="plsb-", dir="/tmp"))
    log = state_dir / "controller.log"
    cluster = LocalCluster(
        state_dir=state_dir, island_specs=["a:1:2", "b:1:2"], standby_controller=True
    )
    try:
        cluster.start()
        record = json.loads((state_dir / CLUSTER_FILE).read_text())
        primary, standby = record["controller_pid"], record["standby_pid"]
        assert primary != standby and alive(standby)
        store = JobStore(state_dir / DB_NAME)
        client = ControllerClient(state_dir)
        job = client.submit(load_spec_text(SPEC)).id
        wait_for(lambda: store.steps_completed(job) >= 5, 180, "the first steps")
        wait_for(lambda: "waiting for the state dir's lock" in log.read_text(), 120, "standby")
        # The standby, ready, has acted on nothing: the controller's epoch is still the first.
        assert client.info().epoch == 1 and store.stored_epoch() == 1
        client.close()
        done_before = store.steps_completed(job)
        os.kill(primary, signal.SIGKILL)
        killed_us = time.time_ns() // 1000
        cluster.restart_controller()
        # The standby took over (no new process) in the next epoch, and a new standby waits.
        assert cluster.controller_pid == standby
        client = ControllerClient(state_dir)
        assert client.info().epoch == 2
        record = json.loads((state_dir / CLUSTER_FILE).read_text())
        assert record["controller_pid"] == standby
        assert record["standby_pid"] not in (primary, standby) and alive(record["standby_pid"])
        # The job's state was adopted where its islands kept it: not a step run again.
        restore = wait_for(
            lambda: next(
                (e for e in store.events(job) if e.kind == "restore" and e.time_us > killed_us),
                None,
            ),
            60,
            "the adoption",
        )
        assert "islands kept" in restore.message, restore.message
        resumed = int(restore.message.split("step ")[1].split()[0])
        assert resumed >= done_before
        wait_for(lambda: store.steps_completed(job) >= resumed + 5, 60, "steps after it")
        client.cancel(job, reason="the test has what it needs")
        client.wait(job, timeout_s=60)
        steps = [m.step for m in store.metrics(job)]
        assert steps == list(range(len(steps)))  # every step's metrics exactly once
        client.close()
        store.close()
        leftover = recorded_pids(state_dir)
    finally:
        cluster.down()
        shutil.copy(log, Path(tempfile.gettempdir()) / "plsb-last.log")
        shutil.rmtree(state_dir, ignore_errors=True)
    # down stopped both controllers (the standby first: it would take over otherwise).
    assert not any(alive(pid) for pid in leftover)
