"""The controller process's command line: its flags, deployment ports and value parsers.

Light on purpose (argparse and re only, no side effects): the CLI (`pathways-lite up`) and
`LocalCluster` read the ports, `--node-ip auto` and the size parser from here without
importing the controller's entry point, and the deployment files' tests check
docker-compose.yml against `build_parser()`.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
from pathlib import Path

# Where a running controller records its address, pid and dashboard URL for clients
# (`<state_dir>/controller.json`).
ADDRESS_FILE = "controller.json"
# The pid of the standby controller a `--keep-standby` controller keeps (controller/standby.py).
STANDBY_FILE = "standby.pid"
# Deployment ports (docker-compose.yml, README): the one place that names them. A local
# cluster (`pathways-lite up`) picks free ports instead.
CONTROLLER_PORT = 50051  # the ControllerService (gRPC, with grpc.health.v1)
DASHBOARD_PORT = 8080  # the controller's web dashboard (issue 9)
RAY_PORT = 6379  # the Ray head's GCS (Ray's own default)
RAY_NODE_MANAGER_PORT = 6380  # an island node's raylet (its grpc.health.v1 health check)
# `--node-ip auto`: let Ray pick this machine's address (a real cluster, a container).
AUTO_NODE_IP = "auto"
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes of a size such as `512M`, `2GiB`, `1.5G` or `1000000`.

    Raises:
        ValueError: the text is not a size.
    """
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"size {text!r} is not a number of bytes such as 512M or 2GiB.")
    number, unit, binary = match.groups()
    base = 1024 if binary or unit else 1000
    exponent = " KMGT".index(unit.upper() or " ")
    value = int(float(number) * base**exponent)
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive.")
    return value


def parse_flops(text: str) -> float:
    """A positive FLOP/s figure such as `1.5e11`."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(
            f"--peak-flops {text!r} must be a positive number of FLOP/s such as 1.5e11."
        )
    return value


@functools.lru_cache(maxsize=4096)  # the scheduler's sentences repeat a few sizes often
def format_size(nbytes: float) -> str:
    """A byte count for people, in binary units: `17.0 MiB`, `-1.97 MiB`, `512 B`."""
    magnitude = abs(nbytes)
    for factor, unit in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if magnitude >= factor:
            return f"{nbytes / factor:.{1 if magnitude >= 10 * factor else 2}f} {unit}"
    return f"{nbytes:.0f} B"


def parse_island(text: str):
    """An IslandSpec from `NAME:HOSTS:DEVICES_PER_HOST[:MEMORY_BYTES_PER_DEVICE]`."""
    from pathways_lite.workers.island_host import IslandSpec

    parts = text.split(":")
    if len(parts) not in (3, 4):
        raise argparse.ArgumentTypeError(
            f"--island {text!r} must be NAME:HOSTS:DEVICES_PER_HOST[:MEMORY_PER_DEVICE]."
        )
    try:
        memory = int(parts[3]) if len(parts) == 4 and parts[3] else None
        return IslandSpec(
            parts[0],
            num_hosts=int(parts[1]),
            devices_per_host=int(parts[2]),
            memory_budget_bytes_per_device=memory,
        )
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--island {text!r}: {e}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pathways_lite.controller")
    p.add_argument(
        "--state-dir",
        required=True,
        # Absolute: checkpoint folders under it are named to island hosts, whose working
        # directories are their own (a relative one was written relative to each host).
        type=lambda text: str(Path(text).expanduser().resolve()),
        help="the state directory (locked)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="the Ray cluster's GCS ip:port (required unless --simulate-islands)",
    )
    p.add_argument("--ray-token-file", default=None, help="the Ray cluster's auth token file")
    p.add_argument(
        "--node-ip",
        default="127.0.0.2",
        help=f"this driver's Ray node address; {AUTO_NODE_IP!r} lets Ray pick (real clusters)",
    )
    p.add_argument(
        "--join-ray-node",
        action="store_true",
        help="first start a Ray node here (no CPUs, no islands) joined to --ray-address, for "
        "a controller on a machine that runs no Ray node (a container); stopped on exit",
    )
    p.add_argument(
        "--discover",
        action="store_true",
        help="add the islands the Ray cluster's nodes advertise (workers/discovery.py)",
    )
    p.add_argument(
        "--min-islands",
        type=int,
        default=1,
        help="with --discover: wait until the cluster advertises this many islands",
    )
    p.add_argument(
        "--discover-timeout-s",
        type=float,
        default=120.0,
        help="with --discover: how long to wait for --min-islands islands",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to serve on")
    p.add_argument("--port", type=int, default=0, help="port to serve on (0 = pick one)")
    p.add_argument(
        "--island",
        action="append",
        type=parse_island,
        default=[],
        help="NAME:HOSTS:DEVICES_PER_HOST[:MEMORY_PER_DEVICE]; repeat for every island",
    )
    p.add_argument("--window", type=int, default=2, help="step slices in flight per job")
    p.add_argument(
        "--slice-ms",
        type=float,
        default=50.0,
        help="how long a job's slice of consecutive steps lasts (K = this / its step time)",
    )
    p.add_argument(
        "--peak-flops",
        type=parse_flops,
        default=None,
        help="peak FLOP/s that MFU is measured against on CPU islands (e.g. 1.5e11); default: "
        "this machine's, measured once and cached",
    )
    p.add_argument(
        "--token-file",
        default=None,
        help="the access token file (default <state-dir>/token; created with mode 0600)",
    )
    p.add_argument(
        "--dashboard-host", default=None, help="address of the web dashboard (default --host)"
    )
    p.add_argument(
        "--dashboard-port", type=int, default=0, help="port of the web dashboard (0 = pick one)"
    )
    p.add_argument(
        "--job-retention",
        default=None,
        help="delete finished jobs older than this from the history (e.g. 30d, 12h); "
        "default: keep them all",
    )
    p.add_argument(
        "--tls",
        choices=("on", "off", "auto"),
        default="auto",
        help="TLS between the controller and island hosts and between peers, with a "
        "per-cluster CA in <state-dir>/tls: on, off, or auto (on where an address is not "
        "loopback)",
    )
    p.add_argument(
        "--keep-hosts", action="store_true", help="leave the island hosts running on exit"
    )
    p.add_argument(
        "--standby",
        action="store_true",
        help="a standby controller: import everything (JAX too) and connect to Ray, then wait "
        "for the state dir's lock and take over the moment the controller holding it is gone "
        "(a restart without the process start and imports); it acts on nothing before",
    )
    p.add_argument(
        "--keep-standby",
        action="store_true",
        help="once serving, keep a standby controller (this command line plus --standby, in "
        "its own session, logging to <state-dir>/controller.log, its pid in "
        "<state-dir>/standby.pid), and start another when it dies; the standby keeps the next "
        "one in turn once it takes over. A clean stop kills the standby first",
    )
    p.add_argument(
        "--standby-after-s",
        type=float,
        default=5.0,
        help="with --keep-standby: a controller that took over (a standby) starts its own "
        "standby this many seconds after it serves, not at once: the new standby's imports "
        "(seconds of CPU) would slow the takeover's resumption of the jobs (default 5)",
    )
    p.add_argument(
        "--spare-hosts",
        choices=("on", "off", "1", "2", "3"),
        default=os.environ.get("PATHWAYS_LITE_SPARE_HOSTS", "on"),
        help="(default: $PATHWAYS_LITE_SPARE_HOSTS, else on) keep warm spare processes beside "
        "every host of a CPU island that holds a "
        "data-parallel job (JAX imported, the job compiled ahead, not serving, at nice 19) "
        "that a restart promotes when the host dies: the island is back without a process "
        "start or compile. on: 2 per host (a second kill soon after the first finds one "
        "ready), or how many",
    )
    p.add_argument(
        "--exchange-overlap",
        choices=("auto", "on", "off"),
        default=os.environ.get("PATHWAYS_LITE_EXCHANGE_OVERLAP", "auto"),
        help="(default: $PATHWAYS_LITE_EXCHANGE_OVERLAP, else auto) data-parallel jobs "
        "exchange gradient buckets during the backward pass: on, off, or auto (on only where "
        "every island of the job has accelerators; measured no gain on CPU islands, whose "
        "cores the exchange and the backward pass share)",
    )
    p.add_argument(
        "--simulate-islands",
        type=int,
        default=0,
        help="drive N simulated island hosts (workers/sim_host.py: worker.proto over gRPC, no "
        "JAX, no Ray) instead of real ones: the scale harness",
    )
    p.add_argument("--simulate-step-s", type=float, default=0.01, help="a simulated step's seconds")
    return p
