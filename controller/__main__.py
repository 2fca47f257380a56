"""The controller process: `python -m pathways_lite.controller --state-dir DIR ...`.

It locks the state directory (one controller per directory) and starts a new epoch, connects
to Ray on loopback, starts (or attaches to) the island hosts it is told about, checks their
wire versions over gRPC, serves the ControllerService, and writes its address to
`<state_dir>/controller.json`. SIGTERM or SIGINT stops it: running jobs go back to the queue,
and the island hosts it started are shut down.
"""

from __future__ import annotations

import os

# The controller runs JAX on CPU only (estimates); set before anything imports JAX.
os.environ["JAX_PLATFORMS"] = "cpu"

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

logger = logging.getLogger("pathways_lite.controller.main")

ADDRESS_FILE = "controller.json"
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
    p.add_argument("--state-dir", required=True, help="the state directory (locked)")
    p.add_argument("--ray-address", required=True, help="the Ray cluster's GCS ip:port")
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
    p.add_argument("--window", type=int, default=2, help="steps in flight per job")
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
        "--keep-hosts", action="store_true", help="leave the island hosts running on exit"
    )
    return p


def _start_islands(specs):
    """Attach to each island's named host actors if they all answer, else (re)start the
    island as a unit (controller/recovery.py)."""
    from .islands import attach_or_start

    groups, started = [], []
    for spec in specs:
        group, fresh = attach_or_start(spec)
        if fresh:
            started.append(group)
            logger.info("started island %s", spec.name)
        groups.append(group)
    return groups, started


async def _serve(args, store, groups) -> None:
    from .core import Controller
    from .islands import Island, connect_host
    from .service import serve

    islands = []
    for group in groups:
        hosts = [await connect_host(m.address) for m in group.metadata]
        islands.append(Island(group.island.name, hosts, group=group))
    controller = Controller(store, islands, state_dir=args.state_dir, window=args.window)
    from .auth import ensure_token, token_path
    from .dashboard import Dashboard, parse_duration

    token_file = Path(args.token_file or token_path(args.state_dir)).resolve()
    token = ensure_token(token_file)
    retention = parse_duration(args.job_retention) if args.job_retention else None
    dashboard = Dashboard(controller, token=token, retention_s=retention)
    await dashboard.start(args.dashboard_host or args.host, args.dashboard_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    address_file = Path(args.state_dir) / ADDRESS_FILE

    def started(port: int) -> None:
        info = {
            "address": f"{args.host}:{port}",
            "host": args.host,
            "port": port,
            "pid": os.getpid(),
            "epoch": store.epoch,
            "dashboard": dashboard.url,
            "token_file": str(token_file),
        }
        tmp = address_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, address_file)

    try:
        await serve(controller, args.host, args.port, started=started, stop=stop, token=token)
    finally:
        address_file.unlink(missing_ok=True)
        await dashboard.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from pathways_lite.workers.ray_cluster import connect

    from .store import JobStore, StoreError

    Path(args.state_dir).mkdir(parents=True, exist_ok=True)
    try:
        store = JobStore.open_controller(args.state_dir)
    except StoreError as e:
        print(f"controller: error: {e}", file=sys.stderr)
        return 2
    started = []
    ray_node = None
    try:
        node_ip = None if args.node_ip == AUTO_NODE_IP else args.node_ip
        if args.join_ray_node:
            ray_node, node_ip = _join_ray_node(args, node_ip)
        connect(args.ray_address, node_ip=node_ip, token_path=args.ray_token_file)
        islands = list(args.island)
        if args.discover:
            from pathways_lite.workers.discovery import discover_islands

            given = {i.name for i in islands}
            found = discover_islands(
                min_islands=args.min_islands, timeout_s=args.discover_timeout_s
            )
            islands += [i for i in found if i.name not in given]
        groups, started = _start_islands(islands)
        asyncio.run(_serve(args, store, groups))
        return 0
    except Exception as e:
        logger.exception("controller failed")
        print(f"controller: error: {e}", file=sys.stderr)
        return 1
    finally:
        if not args.keep_hosts:
            for group in started:
                group.shutdown()
        if ray_node is not None:
            import ray

            ray.shutdown()
            ray_node.stop()
            shutil.rmtree(ray_node.state_dir, ignore_errors=True)
        store.close()


def _join_ray_node(args, node_ip: str | None):
    """Start a Ray node on this machine joined to the cluster; (its cluster object, its IP)."""
    from pathways_lite.workers.discovery import address_towards
    from pathways_lite.workers.ray_cluster import LocalRayCluster

    ip = node_ip or address_towards(args.ray_address)
    # Ray's unix sockets live below the node's temp dir: a short local path, not the state dir.
    node = LocalRayCluster.joining(
        args.ray_address,
        tempfile.mkdtemp(prefix="plnode-", dir="/tmp"),
        token_path=args.ray_token_file,
    )
    try:
        node.add_node(ip, {})
    except BaseException:
        node.stop()
        raise
    logger.info("joined the Ray cluster %s as node %s", args.ray_address, ip)
    return node, ip


if __name__ == "__main__":
    sys.exit(main())
