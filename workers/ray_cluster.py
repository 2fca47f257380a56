"""A local Ray cluster pinned to loopback addresses, with token auth, that stops only itself.

The head runs on 127.0.0.2 and simulated extra nodes on 127.0.0.3, 127.0.0.4, ...; each node
is one `ray start --block` process in its own session (process group), with its own temp
dir under the cluster's state dir, advertising island resources (`{"island_a": 1}`). All nodes
share one token file (`RAY_AUTH_MODE=token`, `RAY_AUTH_TOKEN_PATH`). `stop()` signals only
the process groups this object started; it never runs `ray stop`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

HEAD_IP = "127.0.0.2"
NAMESPACE = "pathways_lite"
# Ray's object store is allocated lazily but sized at start; islands pass tensors over gRPC,
# so a small store per simulated node keeps /dev/shm free.
OBJECT_STORE_BYTES = 128 * 1024 * 1024
_ADDRESS_RE = re.compile(r"ray start --address='([0-9.]+:[0-9]+)'")
_STARTED = "Ray runtime started."


def island_resource(island: str) -> str:
    """The Ray resource a node advertises to host island `island`."""
    return f"island_{island}"


def free_port(ip: str) -> int:
    """A port that is free on `ip` right now (for Ray options that do not accept 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def auth_env(token_path: Path | str) -> dict[str, str]:
    """Environment variables that make a Ray process use token auth with `token_path`."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}


@dataclass
class RayNode:
    """One `ray start` node this cluster started."""

    ip: str
    resources: dict[str, float]
    temp_dir: Path
    log_path: Path
    process: subprocess.Popen = field(repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid


class LocalRayCluster:
    """Start and stop a Ray cluster on loopback addresses of this machine.

    Args:
        state_dir: Directory for the token file, the nodes' temp dirs and their logs. Keep
            it short: Ray's unix socket paths live below it (limit ~107 characters).
        head_ip: Loopback address of the head node.
        head_resources: Custom resources the head advertises (e.g. `{"island_a": 1}`).
        num_cpus: Logical CPUs each node advertises (placement only; not a limit).
        start_timeout_s: How long one node may take to start.
    """

    def __init__(
        self,
        state_dir: Path | str,
        *,
        head_ip: str = HEAD_IP,
        head_resources: dict[str, float] | None = None,
        num_cpus: int = 4,
        start_timeout_s: float = 90.0,
    ) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.head_ip = head_ip
        self.head_resources = dict(head_resources or {})
        self.num_cpus = num_cpus
        self.start_timeout_s = start_timeout_s
        self.token_path: Path | None = self.state_dir / "auth_token"
        self.address: str | None = None
        self.nodes: list[RayNode] = []

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> str:
        """Start the head node; return the cluster address (GCS `ip:port`)."""
        if self.address is not None:
            raise RuntimeError(f"cluster at {self.address} is already started.")
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_private(self.token_path, secrets.token_hex(32))
        args = [
            "--head",
            "--port=0",
            f"--ray-client-server-port={free_port(self.head_ip)}",
            "--include-dashboard=false",
            f"--dashboard-host={self.head_ip}",
            f"--dashboard-port={free_port(self.head_ip)}",
        ]
        try:
            node = self._start_node(self.head_ip, self.head_resources, args, "head")
            self.address = _ADDRESS_RE.search(node.log_path.read_text()).group(1)
        except BaseException:
            self.stop()
            raise
        logger.info("Ray head at %s (state in %s)", self.address, self.state_dir)
        return self.address

    def add_node(
        self, ip: str, resources: dict[str, float] | None = None, num_cpus: int | None = None
    ) -> RayNode:
        """Start a worker node on loopback address `ip` joined to the head.

        Args:
            ip: Its node IP (127.0.0.3, 127.0.0.4, ...).
            resources: Custom resources it advertises.
            num_cpus: Logical CPUs it advertises (default: the cluster's).
        """
        if self.address is None:
            raise RuntimeError("start() the head before adding nodes.")
        args = [f"--address={self.address}"]
        name = f"node-{ip.replace('.', '_')}"
        return self._start_node(ip, dict(resources or {}), args, name, num_cpus=num_cpus)

    def _start_node(
        self,
        ip: str,
        resources: dict[str, float],
        args: list[str],
        name: str,
        num_cpus: int | None = None,
    ) -> RayNode:
        temp_dir = self.state_dir / name
        temp_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.state_dir / f"{name}.log"
        cmd = [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--block",
            f"--node-ip-address={ip}",
            f"--temp-dir={temp_dir}",
            f"--num-cpus={self.num_cpus if num_cpus is None else num_cpus}",
            f"--resources={json.dumps(resources)}",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            f"--dashboard-agent-listen-port={free_port(ip)}",
            "--disable-usage-stats",
            "--log-style=record",
            "--log-color=false",
            *args,
        ]
        env = {**os.environ, **self.env(), "RAY_USAGE_STATS_ENABLED": "0"}
        with open(log_path, "wb") as log:
            # A new session per node: stop() signals exactly this process group.
            process = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        node = RayNode(ip, resources, temp_dir, log_path, process)
        self.nodes.append(node)
        deadline = time.monotonic() + self.start_timeout_s
        while _STARTED not in log_path.read_text(errors="replace"):
            if process.poll() is not None:
                raise RuntimeError(
                    f"ray start for node {ip} exited with {process.returncode}; "
                    f"log {log_path}:\n{log_path.read_text(errors='replace')[-2000:]}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"ray node {ip} did not start within {self.start_timeout_s} s; see {log_path}."
                )
            time.sleep(0.2)
        logger.info("Ray node %s started (pid %d, resources %s)", ip, process.pid, resources)
        return node

    def stop(self, patience_s: float = 20.0) -> None:
        """Stop every node this cluster started: worker nodes first, then the head.

        Each `ray start --block` gets SIGTERM (it stops its own children); whatever is left
        of its process group after `patience_s` gets SIGKILL.
        """
        # Ray's workers move to their own process groups: remember every descendant now.
        tracked = set(self.pids())
        for node in reversed(self.nodes):
            if node.process.poll() is None:
                _signal_group(node.pid, signal.SIGTERM, only_leader=True)
        deadline = time.monotonic() + patience_s
        for node in reversed(self.nodes):
            try:
                node.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("ray node %s ignored SIGTERM for %.0f s", node.ip, patience_s)
        for node in self.nodes:
            # Children outlive their leader when it is killed: sweep the whole group.
            _signal_group(node.pid, signal.SIGKILL)
            try:
                node.process.wait(5)
            except subprocess.TimeoutExpired:
                logger.error("ray node %s (pid %d) did not exit", node.ip, node.pid)
        for pid in tracked & {pid for pid, _, _ in _process_table()}:
            logger.warning("killing leftover Ray process %d", pid)
            _signal_group(pid, signal.SIGKILL, only_leader=True)
        self.nodes = []
        self.address = None

    def stop_node(self, node: RayNode, patience_s: float = 20.0) -> None:
        """Stop one node this cluster started (a simulated machine failure), as `stop()` does.

        The rest of the cluster keeps running; Ray marks the node dead.
        """
        tracked = set(live_processes_of([node.pid]))
        if node.process.poll() is None:
            _signal_group(node.pid, signal.SIGTERM, only_leader=True)
        try:
            node.process.wait(patience_s)
        except subprocess.TimeoutExpired:
            logger.warning("ray node %s ignored SIGTERM for %.0f s", node.ip, patience_s)
        _signal_group(node.pid, signal.SIGKILL)
        node.process.wait(5)
        for pid in tracked & {pid for pid, _, _ in _process_table()}:
            _signal_group(pid, signal.SIGKILL, only_leader=True)
        self.nodes.remove(node)
        logger.info("Ray node %s stopped", node.ip)

    def pids(self) -> list[int]:
        """Live processes this cluster started: its nodes' process groups and descendants."""
        return live_processes_of([node.pid for node in self.nodes])

    def env(self) -> dict[str, str]:
        """Environment that processes joining this cluster need (token auth, if any)."""
        return {} if self.token_path is None else auth_env(self.token_path)

    @classmethod
    def joining(
        cls,
        address: str,
        state_dir: Path | str,
        *,
        token_path: Path | str | None = None,
        num_cpus: int = 0,
    ) -> LocalRayCluster:
        """An object that adds nodes on this machine to a cluster someone else started.

        Its `stop()` stops only the nodes it added; the head and other nodes are left alone.
        A controller running where no Ray node runs (a container) joins this way, because a
        Ray driver needs a node on its own machine.

        Args:
            address: The cluster's GCS address (`host:port`).
            state_dir: Directory for the added nodes' temp dirs and logs (keep it short).
            token_path: The cluster's token file; None for a cluster without token auth.
            num_cpus: Logical CPUs each added node advertises (0: schedule no tasks there).
        """
        cluster = cls(state_dir, num_cpus=num_cpus)
        cluster.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        cluster.address = address
        cluster.token_path = None if token_path is None else Path(token_path)
        return cluster

    def __enter__(self) -> LocalRayCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _write_private(path: Path, text: str) -> None:
    """Replace `path` with `text`, readable by its owner only from the moment it exists
    (created aside with mode 0600, then renamed; never world-readable in between)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _signal_group(pgid: int, sig: signal.Signals, *, only_leader: bool = False) -> None:
    try:
        if only_leader:
            os.kill(pgid, sig)
        else:
            os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _process_table() -> list[tuple[int, int, int]]:
    """(pid, ppid, pgid) of every live, non-zombie process visible in /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the command (which may hold spaces) start after the last ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] == "Z":
            continue
        out.append((int(entry.name), int(fields[1]), int(fields[2])))
    return out


def alive(pids: list[int]) -> list[int]:
    """The processes of `pids` that are still running (zombies count as gone)."""
    live = {pid for pid, _, _ in _process_table()}
    return [pid for pid in pids if pid in live]


def live_processes_of(leaders: list[int]) -> list[int]:
    """Live processes in the process groups led by `leaders`, or descended from them."""
    table = _process_table()
    found = {pid for pid, _, pgid in table if pgid in set(leaders)}
    found |= {pid for pid, _, _ in table if pid in set(leaders)}
    children: dict[int, list[int]] = {}
    for pid, ppid, _ in table:
        children.setdefault(ppid, []).append(pid)
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return sorted(found)


def connect(
    address: str,
    *,
    node_ip: str | None = HEAD_IP,
    token_path: Path | str | None = None,
    namespace: str = NAMESPACE,
    **init_kwargs: Any,
) -> Any:
    """Connect this process to a Ray cluster as a driver, on loopback address `node_ip`.

    Args:
        address: The cluster's GCS address (`ip:port`).
        node_ip: The address this driver uses; Ray otherwise picks the machine's interface
            (None: let it, as on a real cluster).
        token_path: The cluster's token file (sets `RAY_AUTH_MODE=token` for this process).
        namespace: Ray namespace of named actors.
        **init_kwargs: Passed to `ray.init`.

    Returns:
        Ray's context object.
    """
    import ray

    if token_path is not None:
        os.environ.update(auth_env(token_path))
        from ray._raylet import Config  # re-read RAY_AUTH_MODE, as `ray start` does

        Config.initialize("")
    init_kwargs.setdefault("log_to_driver", False)
    if node_ip is not None:
        init_kwargs["_node_ip_address"] = node_ip
    return ray.init(address=address, namespace=namespace, **init_kwargs)
