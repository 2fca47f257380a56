"""A standby controller: it waits on the state dir's lock while the controller lives (acting on
nothing) and takes over when the controller is SIGKILLed, adopting the job its islands hold;
the controller that took over keeps the next standby itself (`--keep-standby`).

Real processes, real kill: a local cluster (Ray on loopback, islands a, b of 1 host x 2 CPU
devices) with `standby_controller=True` trains palm-tiny data parallel on a + b; the controller
is SIGKILLed mid-training, then the controller that took over, then (its controller alive) the
standby the second one keeps.
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
from pathways_lite.controller.options import ADDRESS_FILE
from pathways_lite.controller.standby import read_standby_pid
from pathways_lite.controller.store import DB_NAME, JobStore
from pathways_lite.local import CLUSTER_FILE, LocalCluster, recorded_pids
from pathways_lite.spec import load_spec_text

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

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


def serving_pid(state_dir: Path) -> int:
    """The pid the address file names, if that process lives (a SIGKILLed controller leaves
    its address file behind)."""
    try:
        pid = json.loads((state_dir / ADDRESS_FILE).read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return 0
    return pid if alive(pid) else 0


def next_standby(state_dir: Path, *not_these: int) -> int:
    """The standby the serving controller recorded, once it is a new, live process."""
    return wait_for(
        lambda: (p := read_standby_pid(state_dir)) not in not_these and alive(p) and p,
        60,
        f"a standby other than {not_these}",
    )


def ready(log: Path, pid: int) -> bool:
    return f"pid {pid}: waiting for the state dir's lock" in log.read_text()


def test_standby_controllers_take_over_twice_in_a_row_and_keep_the_next_standby(monkeypatch):
    """The controller keeps its standby itself (`--keep-standby`): after each SIGKILL the
    standby takes over, adopting the job its islands hold, and starts the next standby; the
    takeovers are observed through the state dir only (what a `pathways-lite up` user gets),
    `restart_controller` then just catches up with them."""
    monkeypatch.setenv("PATHWAYS_LITE_SPARE_HOSTS", "off")  # not this test's subject: CPU
    state_dir = Path(tempfile.mkdtemp(prefix="plsb-", dir="/tmp"))
    log = state_dir / "controller.log"
    cluster = LocalCluster(
        state_dir=state_dir, island_specs=["a:1:2", "b:1:2"], standby_controller=True
    )
    seen: list[int] = []
    try:
        cluster.start()
        record = json.loads((state_dir / CLUSTER_FILE).read_text())
        primary, standby = record["controller_pid"], record["standby_pid"]
        seen += [primary, standby]
        assert primary == cluster.controller_pid and standby == read_standby_pid(state_dir)
        assert primary != standby and alive(standby)
        store = JobStore(state_dir / DB_NAME)
        client = ControllerClient(state_dir)
        job = client.submit(load_spec_text(SPEC)).id
        wait_for(lambda: store.steps_completed(job) >= 5, 180, "the first steps")
        wait_for(lambda: ready(log, standby), 120, "the standby")
        # The standby, ready, has acted on nothing: the controller's epoch is still the first.
        assert client.info().epoch == 1 and store.stored_epoch() == 1
        client.close()
        done_before = store.steps_completed(job)
        os.kill(primary, signal.SIGKILL)
        killed_us = time.time_ns() // 1000
        # The standby takes over (no new process) in the next epoch, and keeps a new standby.
        wait_for(lambda: serving_pid(state_dir) == standby, 60, "the first takeover")
        second = next_standby(state_dir, primary, standby)
        seen.append(second)
        client = ControllerClient(state_dir)
        assert client.info().epoch == 2
        cluster.restart_controller()  # the benches' call: finds the takeover done
        assert cluster.controller_pid == standby
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
        # The second takeover, by the standby the first one started.
        wait_for(lambda: ready(log, second), 120, "the second standby")
        os.kill(standby, signal.SIGKILL)
        wait_for(lambda: serving_pid(state_dir) == second, 60, "the second takeover")
        third = next_standby(state_dir, *seen)
        seen.append(third)
        with ControllerClient(state_dir) as client:
            assert client.info().epoch == 3
        assert store.stored_epoch() == 3
        cluster.restart_controller()
        assert cluster.controller_pid == second
        assert f"standby controller pid {second} took over" in log.read_text()
        # A standby that dies while its controller lives (it took nothing over) is replaced.
        os.kill(third, signal.SIGKILL)
        seen.append(next_standby(state_dir, *seen))
        assert f"standby controller pid {third} exited" in log.read_text()
        store.close()
        leftover = recorded_pids(state_dir)
        assert second in leftover and seen[-1] in leftover, (leftover, seen)
    finally:
        cluster.down()
        shutil.copy(log, Path(tempfile.gettempdir()) / "plsb-last.log")
        shutil.rmtree(state_dir, ignore_errors=True)
    # down stopped the controller and its standby (the standby first: it would take over).
    assert not any(alive(pid) for pid in [*leftover, *seen])
