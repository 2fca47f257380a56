"""A controller's own standby (`--keep-standby`): spawn it, record it, replace it, stop it first.

Once the controller serves (it holds the state dir's lock and its gRPC server is up),
`StandbyKeeper.start` spawns the controller's own command line plus `--standby`
(controller/__main__.py: imports done, Ray connected, blocked on the state dir's lock) in a
session of its own, so a SIGKILL of the controller or of its process group leaves it alive,
logging to `<state_dir>/controller.log`. Its pid goes to `<state_dir>/standby.pid` (written
to a temporary file, then renamed: a reader sees the old pid or the new one, never half),
which is how `down` (pathways_lite/local.py `stop_recorded`) and
`LocalCluster.restart_controller` find it: the controller, not whoever started the cluster,
spawned it. The standby keeps `--keep-standby`, so once it takes over and serves it keeps
the next standby in turn; before it holds the lock it spawns nothing (the keeper starts only
in a serving controller).

A thread polls the standby every `poll_s`. While the controller lives it holds the lock, so a
standby that exits has not taken over: it died, and the keeper spawns another, waiting longer
(doubling, up to `MAX_DELAY_S`) after each standby that died young, so a standby that cannot
start does not cost a process start every few seconds forever.

`stop` (the controller's clean stop: SIGTERM, SIGINT, a failed start) SIGKILLs the standby
(it holds nothing and wrote nothing) and waits for it before the controller releases the
lock; otherwise the standby would take the state dir over the moment the lock drops.

Whoever stops or waits on a cluster from outside (pathways_lite/local.py) finds its processes
with `read_standby_pid`, `lock_holder` (a standby that took over wrote its pid there) and
`controller_of`, which checks that a pid read from a file is still a controller of this
state dir before anything signals it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .options import STANDBY_FILE
from .statedir import LOCK_NAME

logger = logging.getLogger(__name__)

LOG_NAME = "controller.log"
# A standby that exits sooner than this after its start died young (a bad flag, no Ray).
YOUNG_S = 60.0
MAX_DELAY_S = 60.0


def controller_env() -> dict[str, str]:
    """The environment of a controller process (or standby) started in the background."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "RAY_USAGE_STATS_ENABLED": "0"}


def spawn_controller(cmd: list[str], state_dir: str | Path) -> subprocess.Popen:
    """Start a controller process (or standby) in a session of its own, logging to
    `<state_dir>/controller.log`."""
    with open(Path(state_dir) / LOG_NAME, "ab") as log:
        return subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=controller_env(),
            start_new_session=True,
        )


def read_standby_pid(state_dir: str | Path) -> int:
    """The pid in `<state_dir>/standby.pid` (the standby its controller spawned last; it may
    have died, or taken over since), else 0."""
    try:
        return int((Path(state_dir) / STANDBY_FILE).read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def controller_of(pid: int, state_dir: str | Path) -> bool:
    """Whether `pid` is a live controller (or standby) process of `state_dir`: a pid read
    from a file of the state dir may be stale and, by now, another process's."""
    if not alive(pid):
        return False
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return False
    if "pathways_lite.controller" not in args:
        return False
    for i, arg in enumerate(args):
        value = arg.removeprefix("--state-dir=") if arg.startswith("--state-dir=") else None
        if arg == "--state-dir" and i + 1 < len(args):
            value = args[i + 1]
        if value is not None:
            return (cwd / value).resolve() == Path(state_dir).resolve()
    return False


def lock_holder(state_dir: str | Path) -> int:
    """The pid the state dir's lock names (the controller that took it last; it may have
    died since), else 0."""
    try:
        return int((Path(state_dir) / LOCK_NAME).read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def standby_command(argv: list[str]) -> list[str]:
    """The standby of a controller started with the flags `argv`: the same flags plus
    `--standby` (`--keep-standby` stays, so it keeps the next standby once it serves)."""
    flags = [*argv, "--standby"] if "--standby" not in argv else list(argv)
    return [sys.executable, "-m", "pathways_lite.controller", *flags]


class StandbyKeeper:
    """Keeps one standby controller beside this (serving) controller; see the module's
    docstring.

    Args:
        state_dir: the controller's state directory (log, standby.pid).
        argv: the controller's own flags (`sys.argv[1:]` of `python -m
            pathways_lite.controller`).
        poll_s: how often the standby's liveness is checked.
    """

    def __init__(self, state_dir: str | Path, argv: list[str], *, poll_s: float = 2.0):
        self.state_dir = Path(state_dir)
        self.command = standby_command(argv)
        self.poll_s = poll_s
        self._standby: subprocess.Popen | None = None
        self._started = 0.0  # time.monotonic() of the last spawn
        self._lock = threading.Lock()  # no spawn once stop has begun
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        """The standby's pid (None before `start` and after `stop`)."""
        standby = self._standby
        return None if standby is None else standby.pid

    def start(self, after_s: float = 0.0) -> None:
        """Spawn the standby `after_s` from now and watch it, on a thread of its own (the
        caller, the serving controller's event loop, does not wait for the fork); call once
        this controller serves."""
        self._thread = threading.Thread(
            target=self._watch, args=(after_s,), name="standby-keeper", daemon=True
        )
        self._thread.start()

    def _spawn(self) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            self._standby = spawn_controller(self.command, self.state_dir)
            path = self.state_dir / STANDBY_FILE
            tmp = path.with_suffix(".tmp")
            tmp.write_text(f"{self._standby.pid}\n")
            os.replace(tmp, path)
            self._started = time.monotonic()
        logger.info("standby controller pid %d started", self._standby.pid)

    def _watch(self, after_s: float) -> None:
        if self._stopping.wait(after_s):
            return
        self._spawn()
        delay_s = self.poll_s
        while not self._stopping.wait(self.poll_s):
            standby = self._standby
            if standby is None or standby.poll() is None:
                continue
            young = time.monotonic() - self._started < YOUNG_S
            delay_s = min(MAX_DELAY_S, delay_s * 2) if young else self.poll_s
            logger.warning(
                "standby controller pid %d exited with %s; starting another in %.0f s",
                standby.pid,
                standby.returncode,
                delay_s,
            )
            if self._stopping.wait(delay_s):
                return
            self._spawn()

    def stop(self) -> None:
        """Kill the standby and wait for it (before this controller releases the state dir's
        lock); no standby is spawned after this."""
        with self._lock:
            self._stopping.set()
            standby, self._standby = self._standby, None
        if self._thread is not None:
            self._thread.join(5)
        if standby is None:
            return
        if standby.poll() is None:
            try:
                os.killpg(standby.pid, signal.SIGKILL)  # its session: its Ray driver's children
            except (ProcessLookupError, PermissionError):
                standby.kill()
            try:
                standby.wait(10)
            except subprocess.TimeoutExpired:
                logger.error("standby controller pid %d did not exit", standby.pid)
        if read_standby_pid(self.state_dir) == standby.pid:
            (self.state_dir / STANDBY_FILE).unlink(missing_ok=True)
        logger.info("standby controller pid %d stopped", standby.pid)
