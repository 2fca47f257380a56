"""A whole pathways_lite cluster on this machine: Ray on loopback, island hosts, the controller.

`LocalCluster` starts a LocalRayCluster (head on 127.0.0.2, token auth) whose head advertises
every island's resource, then the controller process in the background, which starts the
island hosts. With `ray_address` it joins an existing Ray cluster instead: it starts only the
controller, whose islands are the ones the cluster's nodes advertise (workers/discovery.py).
What it started is written to `<state_dir>/cluster.json`, so `down` (this object, or
`pathways-lite down` from another process) stops exactly those processes and no others; a
controller that keeps its own standby (`standby_controller`, the controller's `--keep-standby`)
records it in `<state_dir>/standby.pid`, and `down` finds it and the controller that took
over there (and through the state dir's lock).

A pid read from a file may be stale (a reboot, a crashed Ray head) and, by now, another
process's, so nothing is signalled before it is verified: a controller or standby by
`controller_of` (its command line names this state dir), a Ray node by its start (boot id and
start time, `process_start`) recorded beside its pid. One `start` at a time holds
`<state_dir>/up.lock` (an flock, dropped by the kernel if the starter dies); a record whose
verified processes still run, finished or still starting, is refused, never cleared, and so is
a state dir whose controller lock a live process holds (a controller started by hand, or one
whose cluster.json was lost); and a start that fails stops only what it started: until its
controller serves, only the controller process it spawned, never a pid read from a file.

This is the SDK's `pathways_lite.LocalCluster` (its `client()` is a `pathways_lite.Client`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pathways_lite.controller.options import ADDRESS_FILE, AUTO_NODE_IP, STANDBY_FILE
from pathways_lite.controller.standby import (
    alive,
    controller_of,
    lock_holder,
    read_standby_pid,
    spawn_controller,
)
from pathways_lite.controller.statedir import LOCK_NAME, StateDirLock, StateDirLockedError

if TYPE_CHECKING:
    from pathways_lite.sdk import Client

logger = logging.getLogger(__name__)

CLUSTER_FILE = "cluster.json"
# Held (flock) by the `start` in progress, so two `up`s never act on one state dir at once.
START_LOCK = "up.lock"
STATE_ENV = "PATHWAYS_LITE_STATE"
# Ray's unix socket paths live below its temp dir and must stay under ~107 characters.
_RAY_DIR_MAX = 48


class ClusterError(RuntimeError):
    """The local cluster could not be started or found; the message says why."""


class RayRefusedController(ClusterError):
    """The controller exited while starting because the Ray node it joined closed its
    registration ("Failed to register worker to Raylet ... End of file"): seen, rarely, on a
    Ray cluster that had just started; a fresh Ray cluster takes it."""


# What Ray's core worker logs (then exits) when its node's raylet refuses or drops it.
_RAYLET_REFUSED = "Failed to register worker to Raylet"


def default_state_dir() -> Path:
    """$PATHWAYS_LITE_STATE, else ~/.pathways_lite."""
    return Path(os.environ.get(STATE_ENV) or Path.home() / ".pathways_lite").expanduser()


def read_address(state_dir: str | Path) -> str:
    """The controller address recorded in a state directory.

    Raises:
        ClusterError: no controller is running there.
    """
    path = Path(state_dir) / ADDRESS_FILE
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ClusterError(
            f"no controller is running for state dir {str(state_dir)!r} (no {ADDRESS_FILE}); "
            "start one with `pathways-lite up`."
        ) from None
    if not alive(int(info.get("pid", 0))):
        raise ClusterError(
            f"the controller of state dir {str(state_dir)!r} (pid {info.get('pid')}) is not "
            "running; start one with `pathways-lite up`."
        )
    return str(info["address"])


class LocalCluster:
    """A whole cluster on this machine (Ray on loopback, island hosts, the controller); use it
    as a context manager, or call `start()` and `down()`.

    Example::

        from pathways_lite import LocalCluster
        with LocalCluster(islands=2, devices_per_island=2) as cluster:
            print(cluster.dashboard_url)
            client = cluster.client()

    Args:
        islands: number of islands.
        devices_per_island: simulated CPU devices per island.
        hosts_per_island: island hosts (processes) per island; must divide the devices.
        island_memory: memory budget of one island in bytes (split over its devices); None
            lets the hosts pick (half the RAM over their devices).
        state_dir: the cluster's state directory; None means `default_state_dir()`.
        start_timeout_s: how long the controller and its island hosts may take to start.
        ray_address: join this running Ray cluster (`host:port` of its head) instead of
            starting one; the islands then come from the cluster's node resources and
            `islands`, `devices_per_island`, `hosts_per_island` and `island_memory` are not
            used. `down` stops only the controller (and its island hosts).
        ray_token_file: the joined cluster's Ray auth token file (None: no token auth).
        node_ip: the controller's Ray node address when joining; None takes the head's
            address for a loopback cluster and lets Ray pick otherwise.
        min_islands: when joining, wait until the cluster advertises this many islands.
        simulate_islands: run this many simulated islands instead (workers/sim_host.py: no
            JAX, no Ray; the scale harness); the island shape arguments are not used.
        island_specs: islands of any shapes, as `NAME:HOSTS:DEVICES_PER_HOST[:MEMORY]` (the
            controller's --island); when given, `islands`, `devices_per_island` and
            `hosts_per_island` are not used. With `ray_address`, these islands' hosts go to
            the nodes that advertise their `island_NAME` resource (no discovery).
        tls: TLS between the controller and island hosts and between peers (the
            controller's `--tls`): "on", "off", or "auto" (on where an address is not
            loopback; a local cluster stays on loopback, so plaintext).
        standby_controller: start the controller with `--keep-standby`: it keeps a standby
            controller beside itself (`--standby`: imports done, Ray connected, waiting on the
            state dir's lock; its pid in `<state_dir>/standby.pid`), which takes over the
            moment the controller dies and then keeps the next standby itself, so takeovers
            follow one another without this object. `restart_controller` then waits for the
            takeover instead of starting a process. It costs a process with JAX imported
            (~0.3 GB) and its start-up's CPU.
    """

    def __init__(
        self,
        islands: int = 2,
        devices_per_island: int = 2,
        hosts_per_island: int = 1,
        island_memory: int | None = None,
        state_dir: str | Path | None = None,
        *,
        start_timeout_s: float = 300.0,
        ray_address: str | None = None,
        ray_token_file: str | Path | None = None,
        node_ip: str | None = None,
        min_islands: int = 1,
        island_specs: list[str] | None = None,
        tls: str = "auto",
        simulate_islands: int = 0,
        standby_controller: bool = False,
    ) -> None:
        for name, value in (
            ("islands", islands),
            ("devices_per_island", devices_per_island),
            ("hosts_per_island", hosts_per_island),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer.")
        if devices_per_island % hosts_per_island:
            raise ValueError(
                f"devices_per_island={devices_per_island} is not divisible by "
                f"hosts_per_island={hosts_per_island}."
            )
        if island_memory is not None and island_memory < devices_per_island:
            raise ValueError(f"island_memory={island_memory!r} bytes is too small.")
        self.islands = islands
        self.devices_per_island = devices_per_island
        self.hosts_per_island = hosts_per_island
        self.island_memory = island_memory
        self.state_dir = Path(state_dir or default_state_dir()).expanduser().resolve()
        self.start_timeout_s = start_timeout_s
        self.ray_address = ray_address
        self.ray_token_file = None if ray_token_file is None else Path(ray_token_file).resolve()
        self.node_ip = node_ip
        self.min_islands = min_islands
        self.island_specs = list(island_specs or [])
        if tls not in ("on", "off", "auto"):
            raise ValueError(f"tls={tls!r} must be 'on', 'off' or 'auto'.")
        self.tls = tls
        if simulate_islands < 0:
            raise ValueError(f"simulate_islands={simulate_islands!r} must be >= 0.")
        self.simulate_islands = simulate_islands
        self.standby_controller = standby_controller
        self.address: str | None = None
        self._ray: Any = None
        self._controller: subprocess.Popen | None = None  # the controller it spawned last
        self._controller_pid: int | None = None  # the controller serving (a standby, later)
        self._recorded = False  # cluster.json is this object's (its `down` may act on it)
        self._temp_ray_dir: Path | None = None  # a /tmp Ray dir of its own (a long state dir)

    def island_names(self) -> list[str]:
        return [f"island-{i}" for i in range(self.islands)]

    def start(self) -> LocalCluster:
        """Start Ray, then the controller (which starts the island hosts); wait until it
        serves. If it fails, what it started is stopped (and nothing else).

        Raises:
            ClusterError: a cluster runs or is starting in this state dir, or something
                failed to start (the message points at its log).
        """
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _start_lock(self.state_dir):
            self._refuse_a_running_cluster()
            try:
                self._start()
            except BaseException:
                # Until its controller served, the state dir was not this cluster's: whatever
                # else holds its lock or is named in its files (a controller started by hand,
                # one that won the lock in a race) is not ours to stop.
                self._stop(own_only=self.address is None)
                raise
        return self

    def _refuse_a_running_cluster(self) -> None:
        """Raise if cluster.json records processes that still run (verified), or a live
        process holds the state dir's controller lock (a controller started by hand, or one
        whose cluster.json was lost); else clear the stale record."""
        recorded = (self.state_dir / CLUSTER_FILE).exists()
        running = recorded_pids(self.state_dir) if recorded else []
        if running:
            try:
                where = f"(controller {read_address(self.state_dir)})"
            except ClusterError:
                running_pids = ", ".join(map(str, running))
                where = f"with no controller serving (processes {running_pids} run)"
            raise ClusterError(
                f"a cluster already runs in state dir {str(self.state_dir)!r} {where}; use "
                "another --state-dir or `pathways-lite down` first."
            )
        with _controller_lock_free(self.state_dir):
            pass
        if recorded:
            logger.info("clearing a stale cluster record in %s", self.state_dir)
            stop_recorded(self.state_dir)

    def _start(self) -> None:
        from pathways_lite.workers.ray_cluster import LocalRayCluster, island_resource

        if self.simulate_islands:  # no Ray: the controller serves simulated hosts itself
            record: dict[str, Any] = {"simulated_islands": self.simulate_islands}
            self._write_record(record)
            self._start_controller(record)
            return
        if self.ray_address is not None:
            record = {"ray_address": self.ray_address, "joined": True}
            self._write_record(record)
            self._start_controller(record)
            return
        resources = {island_resource(n): self.hosts_per_island for n in self.island_names()}
        if self.island_specs:
            resources = {
                island_resource(s.split(":")[0]): int(s.split(":")[1]) for s in self.island_specs
            }
        for attempt in (1, 2):
            ray_dir = self.state_dir / "ray"
            own_tmp = len(str(ray_dir)) > _RAY_DIR_MAX
            if own_tmp:
                ray_dir = Path(tempfile.mkdtemp(prefix="plray-", dir="/tmp"))
            self._ray = LocalRayCluster(ray_dir, head_resources=resources, num_cpus=2)
            # Removed by a stop before the record is written (it names it after).
            self._temp_ray_dir = ray_dir if own_tmp else None
            record = {"ray_dir": str(ray_dir), "ray_dir_is_temp": own_tmp}
            self._ray.start()
            record["ray_address"] = self._ray.address
            record["ray_pids"] = [n.pid for n in self._ray.nodes]
            record["process_starts"] = {str(p): process_start(p) for p in record["ray_pids"]}
            self._write_record(record)
            try:
                self._start_controller(record)
                return
            except RayRefusedController as error:
                if attempt == 2:
                    raise
                # Ours, started a moment ago, with nothing on it yet: start both afresh once,
                # its logs kept (what the raylet said is there).
                logger.warning(
                    "%s Ray's logs of that start are in %s. Starting a new Ray cluster and "
                    "controller once more.",
                    error,
                    self._keep_ray_logs(record),
                )
                self._stop(own_only=True)

    def _keep_ray_logs(self, record: dict[str, Any]) -> Path:
        """Keep the logs of a Ray cluster about to be stopped for another start: its /tmp
        dir is not removed with it, or its head's log (the next start writes one of its own
        there) is renamed head-refused.log. Returns where they are."""
        ray_dir = Path(record["ray_dir"])
        if record.get("ray_dir_is_temp"):
            record["ray_dir_is_temp"] = False
            self._write_record(record)
            self._temp_ray_dir = None
        else:
            head_log = ray_dir / "head.log"
            if head_log.exists():
                head_log.replace(ray_dir / "head-refused.log")
        return ray_dir

    def _write_record(self, record: dict[str, Any]) -> None:
        path = self.state_dir / CLUSTER_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, path)
        self._recorded = True

    def _start_controller(self, record: dict[str, Any]) -> None:
        """Start the controller process and wait until it serves (with `standby_controller`,
        until its standby is recorded too)."""
        # Checked again, and the files cleared, while holding the lock: they are another live
        # controller's if it holds the lock.
        with _controller_lock_free(self.state_dir):
            (self.state_dir / ADDRESS_FILE).unlink(missing_ok=True)
            (self.state_dir / STANDBY_FILE).unlink(missing_ok=True)
        cmd = self._controller_command(record)
        if self.standby_controller:
            cmd.append("--keep-standby")
        self._controller = spawn_controller(cmd, self.state_dir)
        self._controller_pid = self._controller.pid
        record["controller_pid"] = self._controller.pid
        record.pop("standby_pid", None)
        self._write_record(record)
        self._wait_serving(self._controller.pid, self._controller)
        self._record_standby(record)

    def _record_standby(self, record: dict[str, Any]) -> None:
        """Wait for the serving controller's standby (`standby_controller`) and copy its pid
        into cluster.json as `standby_pid` (a view: `<state_dir>/standby.pid`, which the
        controller writes, is the truth)."""
        if not self.standby_controller:
            return
        pid = _wait_for(
            lambda: (p := read_standby_pid(self.state_dir)) != self._controller_pid and p,
            10.0,
        )
        if not pid:
            raise ClusterError(
                f"the controller (pid {self._controller_pid}) recorded no standby in "
                f"{self.state_dir / STANDBY_FILE} within 10 s; see "
                f"{self.state_dir / 'controller.log'}."
            )
        record["standby_pid"] = pid
        self._write_record(record)

    def _controller_command(self, record: dict[str, Any]) -> list[str]:
        cmd = [sys.executable, "-m", "pathways_lite.controller", f"--state-dir={self.state_dir}"]
        cmd.append(f"--tls={self.tls}")
        if self.simulate_islands:
            cmd.append(f"--simulate-islands={self.simulate_islands}")
        elif self.ray_address is not None:
            from pathways_lite.workers.discovery import driver_node_ip

            node_ip = self.node_ip or driver_node_ip(self.ray_address) or AUTO_NODE_IP
            cmd += [f"--ray-address={self.ray_address}", f"--node-ip={node_ip}"]
            if self.island_specs:  # these islands, on the nodes that advertise their resource
                cmd += [f"--island={spec}" for spec in self.island_specs]
            else:
                cmd += ["--discover", f"--min-islands={self.min_islands}"]
            if self.ray_token_file is not None:
                cmd.append(f"--ray-token-file={self.ray_token_file}")
        else:
            cmd += [
                f"--ray-address={self._ray.address}",
                f"--ray-token-file={self._ray.token_path}",
            ]
            per_host = self.devices_per_island // self.hosts_per_island
            memory = ""
            if self.island_memory is not None:
                memory = f":{self.island_memory // self.devices_per_island}"
            for name in [] if self.island_specs else self.island_names():
                cmd.append(f"--island={name}:{self.hosts_per_island}:{per_host}{memory}")
            cmd += [f"--island={spec}" for spec in self.island_specs]
        return cmd

    def _wait_serving(self, pid: int, process: subprocess.Popen | None = None) -> None:
        """Wait until controller `pid` (our child `process`, if it is one) has written its
        address to the state dir."""
        log_path = self.state_dir / "controller.log"
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if _serving_pid(self.state_dir) == pid:
                self.address = read_address(self.state_dir)
                return
            if (process.poll() is not None) if process is not None else not alive(pid):
                tail = log_path.read_text(errors="replace").strip().splitlines()[-1:]
                code = process.returncode if process is not None else "?"
                said = tail[0] if tail else "no output"
                failure = RayRefusedController if _RAYLET_REFUSED in said else ClusterError
                raise failure(
                    f"the controller (pid {pid}) exited with {code} while starting: "
                    f"{said} (log {log_path})."
                )
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"the controller did not start within {self.start_timeout_s:g} s; see "
                    f"{log_path}."
                )
            time.sleep(0.05)

    @property
    def controller_pid(self) -> int | None:
        """The pid of the controller process serving (the standby that took over, after
        `restart_controller`)."""
        return self._controller_pid

    def restart_controller(self) -> None:
        """After the controller died: with `standby_controller`, wait until the standby it
        kept has taken over and serves (that controller keeps the next standby itself);
        otherwise, or when no standby lives, start a new controller on the same state dir and
        Ray cluster. Either way it attaches to the live island hosts and resumes every job."""
        dead = self._controller_pid
        if self._controller is not None and self._controller.pid == dead:
            try:
                self._controller.wait(10)  # reap our child
            except subprocess.TimeoutExpired:
                pass
        if dead is not None and not _wait_for(lambda: not alive(dead), 10.0):
            raise ClusterError(f"the controller (pid {dead}) is still running.")
        record = json.loads((self.state_dir / CLUSTER_FILE).read_text())
        successor = self._successor(dead) if self.standby_controller else 0
        if not successor:
            self._start_controller(record)
            return
        self._controller_pid = successor
        record["controller_pid"] = successor
        record.pop("standby_pid", None)
        self._write_record(record)
        self._wait_serving(successor)
        # Not waited for (the benches time this call): the view catches up if it is there.
        standby = read_standby_pid(self.state_dir)
        if standby != successor and controller_of(standby, self.state_dir):
            record["standby_pid"] = standby
            self._write_record(record)

    def _successor(self, dead: int | None) -> int:
        """The controller that took over from `dead`, or the live standby about to, else 0:
        the lock's holder (a standby that took over), then the standby `dead` recorded (or
        the next one, if the successor recorded its own already)."""
        for pid in (lock_holder(self.state_dir), read_standby_pid(self.state_dir)):
            if pid and pid != dead and controller_of(pid, self.state_dir):
                return pid
        return 0

    def pids(self) -> list[int]:
        """Live processes this cluster started (Ray nodes and their children, controller)."""
        return recorded_pids(self.state_dir)

    def down(self, *, checkpoint: bool = False) -> list[Any]:
        """Stop the controller and the Ray nodes this cluster started; nothing else.

        Args:
            checkpoint: first checkpoint every running and suspended job and queue it again
                (`pathways-lite down` does; the next `start` resumes them from there).

        Returns:
            With `checkpoint`, what was done to each job (DrainedJob); else [].
        """
        return self._stop(checkpoint=checkpoint)

    def _stop(self, *, checkpoint: bool = False, own_only: bool = False) -> list[Any]:
        """`down`; with `own_only` (a start whose controller never served), signal only the
        controller process this object spawned (and a standby that one spawned), never one
        found through the state dir's lock or files."""
        try:
            drained = drain(self.state_dir) if checkpoint and self.address else []
        finally:
            if self._recorded:
                stop_recorded(
                    self.state_dir, ray=self._ray, controller=self._controller, own_only=own_only
                )
            elif self._ray is not None:  # a start that failed before it wrote its record
                self._ray.stop()
                if self._temp_ray_dir is not None:  # (its Ray token and logs)
                    shutil.rmtree(self._temp_ray_dir, ignore_errors=True)
            self._ray = None
            self._temp_ray_dir = None
            self._controller = None
            self._controller_pid = None
            self._recorded = False
            self.address = None
        return drained

    def client(self) -> Client:
        """A `pathways_lite.Client` of this cluster's controller."""
        from pathways_lite.sdk import Client

        return Client(self.state_dir)

    @property
    def dashboard_url(self) -> str:
        """The dashboard URL, with the access token."""
        with self.client() as c:
            return c.dashboard_url(with_token=True)

    @property
    def token_file(self) -> Path:
        """The access token file (mode 0600)."""
        from pathways_lite.controller.auth import token_path

        return token_path(self.state_dir)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.down()


def drain(state_dir: str | Path) -> list[Any]:
    """Ask the controller of a state dir to checkpoint and requeue its running and suspended
    jobs before a stop (the Drain rpc); returns a DrainedJob per job."""
    from pathways_lite.client import ControllerClient

    with ControllerClient(state_dir) as client:
        return client.drain()


def recorded_pids(state_dir: str | Path) -> list[int]:
    """Live processes recorded in a state dir's cluster.json, with their descendants."""
    from pathways_lite.workers.ray_cluster import live_processes_of

    try:
        record = json.loads((Path(state_dir) / CLUSTER_FILE).read_text())
    except (OSError, ValueError):
        return []
    leaders = _ray_leaders(record)
    leaders += _controllers_of(Path(state_dir), record)
    return live_processes_of(leaders)


def process_start(pid: int) -> str:
    """`<boot id>:<start time>` of live process `pid` (its start in clock ticks since boot),
    else "": with the pid, it tells this process from any later one given the same pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""
    fields = stat[stat.rindex(")") + 2 :].split()  # after the command, which may hold spaces
    return "" if fields[0] == "Z" else f"{boot}:{fields[19]}"


def _ray_leaders(record: dict[str, Any]) -> list[int]:
    """The Ray node processes cluster.json records that are still the processes it recorded:
    the same start (a record written before starts were recorded: the cluster's Ray temp dir
    in the command line)."""
    starts = record.get("process_starts")
    found = []
    for pid in record.get("ray_pids", []):
        now = process_start(pid)
        if not now:
            continue
        if starts is not None:
            if starts.get(str(pid)) == now:
                found.append(pid)
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if record.get("ray_dir") and f"--temp-dir={record['ray_dir']}/" in cmdline:
            found.append(pid)
    return found


@contextlib.contextmanager
def _controller_lock_free(state_dir: Path):
    """Hold the state dir's controller lock (`controller.lock`) for the body, then give it
    up: no controller may take the state dir meanwhile.

    Raises:
        ClusterError: a live process holds it (a controller started by hand on this state
            dir, or one whose cluster.json was lost).
    """
    lock = StateDirLock(state_dir)
    try:
        lock.acquire()
    except StateDirLockedError:
        holder = lock_holder(state_dir)
        pid = str(holder) if alive(holder) else "unknown"
        try:
            where = f" (controller {read_address(state_dir)})"
        except ClusterError:
            where = ""
        raise ClusterError(
            f"a controller already runs in state dir {str(state_dir)!r}{where}: pid {pid} "
            f"holds {state_dir / LOCK_NAME}; stop it first or use another --state-dir."
        ) from None
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def _start_lock(state_dir: Path):
    """Hold `<state_dir>/up.lock` for a `start`.

    Raises:
        ClusterError: another start holds it.
    """
    fd = os.open(state_dir / START_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            raise ClusterError(
                f"a cluster is starting in state dir {str(state_dir)!r} (`pathways-lite up` "
                f"pid {holder}); wait for it, or use another --state-dir."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield
    finally:
        os.close(fd)  # drops the lock


def _wait_for(predicate, timeout_s: float) -> Any:
    """Poll `predicate` every 50 ms until it returns something true (returned) or
    `timeout_s` passes (returns what it returned last)."""
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def _controllers_of(state_dir: Path, record: dict[str, Any]) -> list[int]:
    """The live controller and standby processes of a state dir: the one cluster.json
    records, the lock's holder and the address file's (a standby that took over since), and
    the standby the serving controller recorded in standby.pid."""
    candidates = [record.get("controller_pid", 0), record.get("standby_pid", 0)]
    candidates += [lock_holder(state_dir), _serving_pid(state_dir), read_standby_pid(state_dir)]
    found = []
    for pid in candidates:
        if pid and pid not in found and controller_of(pid, state_dir):
            found.append(pid)
    return found


def _serving_pid(state_dir: Path) -> int:
    """The pid in the state dir's address file (the controller serving), else 0."""
    try:
        return int(json.loads((state_dir / ADDRESS_FILE).read_text()).get("pid", 0))
    except (OSError, ValueError):
        return 0


def _signal_and_wait(
    pid: int, sig: int, process: subprocess.Popen | None, patience_s: float
) -> None:
    """Send `sig` to `pid`'s process group; wait up to `patience_s` for `pid` to exit
    (reaping it when it is our child, `process`)."""
    _killpg(pid, sig)
    deadline = time.monotonic() + patience_s
    while alive(pid) and time.monotonic() < deadline:
        if process is not None:
            process.poll()
        time.sleep(0.05)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_recorded(
    state_dir: str | Path,
    *,
    ray: Any = None,
    controller: subprocess.Popen | None = None,
    patience_s: float = 30.0,
    own_only: bool = False,
) -> bool:
    """Stop what a state dir's cluster.json says its cluster started; returns whether there
    was anything to stop.

    The controller is the one serving now: the lock's holder, which is a standby that took
    over when the recorded one died. Its standby (`<state_dir>/standby.pid`, read now: the
    controller spawned it) is killed first, else it would take over from the stopping
    controller; the controller kills it on a clean stop too, and this also covers one that
    does not stop cleanly. The controller gets SIGTERM first (it shuts its island hosts down),
    then the Ray nodes; whatever remains of their process groups and descendants after
    `patience_s` is killed.

    Args:
        state_dir: the cluster's state directory.
        ray: the LocalRayCluster this process started (else cluster.json's Ray pids).
        controller: the controller process this process spawned, to reap it.
        patience_s: how long each stop may take before its processes are killed.
        own_only: signal only `controller` (while it runs) and a standby it spawned, not the
            controllers found through the state dir's lock and files: a start whose
            controller never served (it may have failed on another controller's lock).
    """
    from pathways_lite.workers.ray_cluster import alive as alive_of
    from pathways_lite.workers.ray_cluster import live_processes_of

    state_dir = Path(state_dir)
    path = state_dir / CLUSTER_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        record = None
    if record is None and ray is None and controller is None:
        return False
    record = record or {}
    ray_leaders = _ray_leaders(record)
    # Our own child, not reaped yet, cannot have handed its pid on.
    own = controller.pid if controller is not None and controller.poll() is None else 0
    if own_only:
        pid = own
        standby_pid = read_standby_pid(state_dir)
        if not own or _parent_of(standby_pid) != own:  # not our controller's standby
            standby_pid = 0
        controllers = [p for p in (pid, standby_pid) if p]
        tracked_pids = live_processes_of(ray_leaders + controllers)
    else:
        pid = next(
            (
                p
                for p in (
                    lock_holder(state_dir),
                    _serving_pid(state_dir),
                    record.get("controller_pid"),
                )
                if p and controller_of(p, state_dir)
            ),
            own,
        )
        standby_pid = read_standby_pid(state_dir)
        controllers = []  # found again after the stop (`_controllers_of`)
        tracked_pids = recorded_pids(state_dir)
    # Each with its start, checked again before the final SIGKILL (the stop takes a while).
    tracked = {p: process_start(p) for p in tracked_pids}
    if ray is not None:
        tracked |= {p: process_start(p) for p in ray.pids()}
    process = controller if controller is not None and controller.pid == pid else None
    if standby_pid != pid and controller_of(standby_pid, state_dir):  # holds nothing
        _signal_and_wait(standby_pid, signal.SIGKILL, None, patience_s)
    # Whether a controller stopped by itself (it stops its island hosts).
    stopped_cleanly = False
    if pid and alive(pid):
        _signal_and_wait(pid, signal.SIGTERM, process, patience_s)
        stopped_cleanly = not alive(pid)
        _killpg(pid, signal.SIGKILL)
    if record.get("joined") and not stopped_cleanly:
        # Detached actors on a Ray cluster this process did not start: only a controller
        # that stops cleanly stops them.
        logger.warning(
            "the controller of %s was not running or did not stop by itself: its island "
            "hosts may still run on the Ray cluster at %s (detached actors in namespace %r: "
            "`ray list actors --filter state=ALIVE` lists them; a new `up` on this state dir "
            "attaches to them, `ray.kill` stops them).",
            state_dir,
            record.get("ray_address"),
            "pathways_lite",
        )
    if controller is not None:
        try:
            controller.wait(5)
        except subprocess.TimeoutExpired:
            logger.error("controller pid %d did not exit", controller.pid)
    # A controller killed before it stopped its standby (or one that spawned another after
    # the kill above) leaves a standby that takes the state dir over: kill what is left.
    leftovers = (
        [p for p in controllers if controller_of(p, state_dir)]
        if own_only
        else _controllers_of(state_dir, record)
    )
    for leftover in leftovers:
        logger.warning("killing controller process %d left running", leftover)
        _killpg(leftover, signal.SIGKILL)
    if ray is not None:
        ray.stop()
    else:
        for leader in ray_leaders:
            try:
                os.kill(leader, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + patience_s
        while any(alive(p) for p in ray_leaders) and time.monotonic() < deadline:
            time.sleep(0.1)
        for leader in ray_leaders:
            _killpg(leader, signal.SIGKILL)
    time.sleep(0.2)
    for leftover in alive_of(sorted(tracked)):
        if process_start(leftover) != tracked[leftover]:  # gone, and its pid given again
            continue
        logger.warning("killing leftover process %d", leftover)
        try:
            os.kill(leftover, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if record.get("ray_dir_is_temp"):
        shutil.rmtree(record["ray_dir"], ignore_errors=True)
    path.unlink(missing_ok=True)
    # With `own_only`, not the files of another controller that still runs.
    if not (own_only and controller_of(_serving_pid(state_dir), state_dir)):
        (state_dir / ADDRESS_FILE).unlink(missing_ok=True)
    if not (own_only and controller_of(read_standby_pid(state_dir), state_dir)):
        (state_dir / STANDBY_FILE).unlink(missing_ok=True)
    return True


def _parent_of(pid: int) -> int:
    """The parent pid of live process `pid`, else 0."""
    if pid <= 0:
        return 0
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat[stat.rindex(")") + 2 :].split()[1])
