"""What `down` and `up` may signal, checked with processes these tests start themselves.

A cluster record's pids may be stale (a reboot, a crashed Ray head): nothing is signalled
before it is verified, a record whose processes still run is refused rather than cleared, one
start at a time holds the state dir, and a start that fails stops only its own. Also the
private files (the Ray token, the state dirs) and the controller's SIGTERM during its start.
Every process signalled here is a `sleep` (or a controller) started by the test, each in a
session of its own, so a group signal reaches nothing else.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pathways_lite.client import ClientError
from pathways_lite.local import (
    CLUSTER_FILE,
    START_LOCK,
    ClusterError,
    LocalCluster,
    process_start,
    stop_recorded,
)
from pathways_lite.workers.ray_cluster import LocalRayCluster, live_processes_of

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def spawn():
    """Start `sleep 300` (or `argv`) in a session of its own; whatever is left is killed."""
    started: list[subprocess.Popen] = []

    def start(argv: list[str] | None = None) -> subprocess.Popen:
        process = subprocess.Popen(argv or ["sleep", "300"], start_new_session=True)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def write_record(state_dir: Path, **record) -> None:
    (state_dir / CLUSTER_FILE).write_text(json.dumps(record))


def test_down_signals_no_process_that_now_has_a_recorded_pid(tmp_path, spawn) -> None:
    bystander = spawn()
    # A record from before a reboot: its Ray node and its controller had the pid that is
    # the bystander's now.
    write_record(
        tmp_path,
        ray_dir=str(tmp_path / "ray"),
        ray_pids=[bystander.pid],
        process_starts={str(bystander.pid): "an-earlier-boot:4242"},
        controller_pid=bystander.pid,
    )
    assert stop_recorded(tmp_path, patience_s=1.0)
    # A record written before starts were recorded: the Ray temp dir is not in its command.
    write_record(tmp_path, ray_dir=str(tmp_path / "ray"), ray_pids=[bystander.pid])
    assert stop_recorded(tmp_path, patience_s=1.0)
    time.sleep(0.3)
    assert bystander.poll() is None
    assert not (tmp_path / CLUSTER_FILE).exists()


def test_down_stops_a_verified_ray_node_and_its_children(tmp_path, spawn) -> None:
    node = spawn(["sh", "-c", "sleep 300 & wait"])
    time.sleep(0.2)
    (child,) = [p for p in live_processes_of([node.pid]) if p != node.pid]
    write_record(
        tmp_path,
        ray_dir=str(tmp_path / "ray"),
        ray_pids=[node.pid],
        process_starts={str(node.pid): process_start(node.pid)},
    )
    assert stop_recorded(tmp_path, patience_s=5.0)
    assert node.wait(10) is not None
    assert process_start(child) == ""
    assert not (tmp_path / CLUSTER_FILE).exists()


def test_up_refuses_a_cluster_still_starting_and_its_down_leaves_it_alone(tmp_path, spawn) -> None:
    # The first `up`'s Ray head runs; its controller has not written controller.json yet.
    head = spawn()
    write_record(
        tmp_path,
        ray_dir=str(tmp_path / "ray"),
        ray_pids=[head.pid],
        process_starts={str(head.pid): process_start(head.pid)},
    )
    second = LocalCluster(state_dir=tmp_path, simulate_islands=1, start_timeout_s=10)
    try:
        with pytest.raises(ClusterError, match=rf"already runs.*no controller serving.*{head.pid}"):
            second.start()
    finally:
        second.down()  # as a caller's `finally` does: it started nothing, so it stops nothing
    time.sleep(0.3)
    assert head.poll() is None and (tmp_path / CLUSTER_FILE).exists()


def test_a_second_up_while_one_is_starting_is_refused(tmp_path) -> None:
    fd = os.open(tmp_path / START_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # the first `up`, in the middle of its start
        os.write(fd, f"{os.getpid()}\n".encode())
        second = LocalCluster(state_dir=tmp_path, simulate_islands=1, start_timeout_s=10)
        try:
            with pytest.raises(ClusterError, match=rf"is starting.*pid {os.getpid()}"):
                second.start()
        finally:
            second.down()
        assert not (tmp_path / CLUSTER_FILE).exists()
    finally:
        os.close(fd)


def test_up_refuses_a_state_dir_whose_lock_a_live_controller_holds(tmp_path) -> None:
    # A controller started by hand on the state dir (no cluster.json): a stand-in that holds
    # the lock, serves an address, and has a controller's command line for this state dir.
    stand_in_code = (
        "import json, os, sys, time\n"
        "from pathways_lite.controller.statedir import StateDirLock\n"
        "lock = StateDirLock(sys.argv[3]); lock.acquire()\n"
        "info = {'address': '127.0.0.1:1', 'pid': os.getpid()}\n"
        "open(os.path.join(sys.argv[3], 'controller.json'), 'w').write(json.dumps(info))\n"
        "print('locked', flush=True)\n"
        "time.sleep(300)\n"
    )
    stand_in = subprocess.Popen(
        [sys.executable, "-c", stand_in_code, "pathways_lite.controller", "--state-dir", tmp_path],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert stand_in.stdout.readline() == "locked\n"
        cluster = LocalCluster(state_dir=tmp_path, simulate_islands=1, start_timeout_s=30)
        try:
            with pytest.raises(
                ClusterError, match=rf"already runs.*127\.0\.0\.1:1.*pid {stand_in.pid} holds"
            ):
                cluster.start()
        finally:
            cluster.down()
        time.sleep(0.3)
        assert stand_in.poll() is None
        assert json.loads((tmp_path / "controller.json").read_text())["pid"] == stand_in.pid
        assert not (tmp_path / CLUSTER_FILE).exists()
    finally:
        if stand_in.poll() is None:
            os.killpg(stand_in.pid, signal.SIGKILL)
        stand_in.wait(10)


def test_down_with_checkpoint_stops_the_cluster_even_when_the_drain_fails(tmp_path, spawn) -> None:
    head = spawn()
    cluster = LocalCluster(state_dir=tmp_path)
    # What start() records for its Ray head; the controller is gone (no controller.json),
    # so the drain fails.
    cluster._write_record(
        {"ray_pids": [head.pid], "process_starts": {str(head.pid): process_start(head.pid)}}
    )
    cluster.address = "127.0.0.1:1"
    with pytest.raises(ClientError, match="no controller is running"):
        cluster.down(checkpoint=True)
    assert head.wait(10) is not None
    assert not (tmp_path / CLUSTER_FILE).exists()


def test_the_ray_token_file_and_state_dir_are_private_from_their_creation(
    tmp_path, monkeypatch
) -> None:
    # No chmod after the fact: the mode the file is created with is the one anyone can see.
    monkeypatch.setattr(Path, "chmod", lambda self, mode, **kw: None)
    seen = {}

    def no_node(self, ip, resources, args, name, num_cpus=None):
        seen["token"] = stat.S_IMODE(self.token_path.stat().st_mode)
        seen["dir"] = stat.S_IMODE(self.state_dir.stat().st_mode)
        raise RuntimeError("no Ray node in this test")

    monkeypatch.setattr(LocalRayCluster, "_start_node", no_node)
    umask = os.umask(0)
    try:
        with pytest.raises(RuntimeError, match="no Ray node"):
            LocalRayCluster(tmp_path / "ray").start()
    finally:
        os.umask(umask)
    assert seen == {"token": 0o600, "dir": 0o700}


def test_a_sigterm_while_the_controller_starts_unwinds_its_start(tmp_path) -> None:
    # A Ray "head" that accepts and never answers: the controller's start hangs connecting.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        cmd = [
            sys.executable,
            "-m",
            "pathways_lite.controller",
            f"--state-dir={tmp_path}",
            f"--ray-address=127.0.0.1:{silent.getsockname()[1]}",
        ]
        log = tmp_path / "controller.log"
        with open(log, "wb") as out:
            controller = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            deadline = time.monotonic() + 40
            while b"starting" not in log.read_bytes() and time.monotonic() < deadline:
                assert controller.poll() is None, log.read_text()
                time.sleep(0.05)
            controller.send_signal(signal.SIGTERM)
            code = controller.wait(20)
        finally:
            if controller.poll() is None:
                os.killpg(controller.pid, signal.SIGKILL)
                controller.wait(10)
    # Not killed by the signal: it ran its `finally` (islands shut down, store closed).
    assert code == 128 + signal.SIGTERM, (code, log.read_text()[-2000:])
    assert "SIGTERM while starting" in log.read_text()


@pytest.mark.timeout(150)
def test_a_controller_that_ray_refuses_while_starting_gets_a_fresh_ray_cluster_once(
    tmp_path, monkeypatch, caplog
) -> None:
    # A CI run saw `up`'s controller exit as Ray's node closed its registration on a Ray
    # cluster just started. The first controller here exits as that one did.
    from pathways_lite import local

    real_spawn = local.spawn_controller
    spawned = []
    said = (
        "[2026-12-01 00:00:00,000 E 1 1] core_worker_process.cc:223: Failed to register "
        "worker to Raylet: IOError: Failed to read data from the socket: End of file"
    )

    def refused_once(cmd, state_dir):
        spawned.append(cmd)
        if len(spawned) == 1:
            return real_spawn(
                [sys.executable, "-c", f"print({said!r}); raise SystemExit(1)"], state_dir
            )
        return real_spawn(cmd, state_dir)

    monkeypatch.setattr(local, "spawn_controller", refused_once)
    cluster = LocalCluster(
        state_dir=tmp_path, islands=1, devices_per_island=1, standby_controller=False
    )
    first_ray, first_dir = [], []
    real_write = cluster._write_record

    def remember(record):
        if not first_ray and record.get("ray_pids"):
            first_ray.extend(live_processes_of(record["ray_pids"]))
            first_dir.append(record["ray_dir"])
        real_write(record)

    monkeypatch.setattr(cluster, "_write_record", remember)
    with caplog.at_level("WARNING", logger="pathways_lite.local"):
        cluster.start()
    try:
        assert len(spawned) == 2 and cluster.client().islands()
        assert "Starting a new Ray cluster and controller once more" in caplog.text
        # The first start's logs are kept (its head's log renamed if the next shares its dir).
        logs = {p.name for p in Path(first_dir[0]).iterdir()}
        assert {"head.log", "head-refused.log"} & logs, logs
        assert first_dir[0] in caplog.text
        # The first Ray cluster is gone: the second is a new one.
        assert first_ray and not [p for p in first_ray if p in cluster.pids()]
        assert not [p for p in first_ray if _alive(p)]
    finally:
        cluster.down()
        if first_dir and first_dir[0].startswith("/tmp/plray-"):
            shutil.rmtree(first_dir[0], ignore_errors=True)
    assert not (tmp_path / CLUSTER_FILE).exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
