"""The controller process: `python -m pathways_lite.controller --state-dir DIR ...`.

It locks the state directory (one controller per directory) and starts a new epoch, connects
to Ray on loopback, starts (or attaches to) the island hosts it is told about, handing them
the cluster credential of `<state_dir>/cluster_secret` (controller/auth.py) and, where TLS
is wanted (`--tls`), a certificate of the cluster CA in `<state_dir>/tls`, checks their
wire versions over gRPC, serves the ControllerService, and writes its address to
`<state_dir>/controller.json`. SIGTERM or SIGINT stops it: running jobs go back to the queue,
and its island hosts are shut down, those it attached to at start (a restarted controller's)
as well as those it started (`--keep-hosts` leaves them all). A SIGTERM before it serves
(importing, connecting to Ray, starting islands) unwinds the start the same way, so the
island hosts started so far (named, detached Ray actors) do not outlive it. Its flags are in
controller/options.py.

With `--standby` it is a standby controller: it imports everything a controller runs (JAX,
the model's estimators, the controller's modules) and connects to Ray, then waits for the
state directory's lock (controller/statedir.py) and goes on as above the moment the
controller holding it is gone: a restart that skips the ~3 s of process start and imports
(kill -> first log line alone was 1.3 s under load). Until it holds the lock it reads and
writes nothing of the state directory and calls no island host, so two controllers never
act on one state directory at once. With `--keep-standby` a serving controller keeps such a
standby itself (controller/standby.py): it spawns it, records its pid in
`<state_dir>/standby.pid`, replaces it when it dies, and kills it first on a clean stop; the
standby carries the flag too, so after a takeover it keeps the next one.
`pathways_lite.LocalCluster(standby_controller=True)` and `pathways-lite up
--standby-controller` start the controller with it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from .options import ADDRESS_FILE, AUTO_NODE_IP, build_parser

logger = logging.getLogger("pathways_lite.controller.main")

# Seconds after serving starts that the heap of the controller's imports is frozen out of the
# garbage collector (controller/core.py `settle_heap`).
SETTLE_HEAP_AFTER_S = 10.0


def _import_jax_ahead() -> threading.Thread:
    """Import JAX and the model's estimators on a thread of their own, started first thing:
    the controller's first scheduling pass resolves each job's spec with them (a restarted
    controller: the jobs its islands kept), and the import (~3 s of a 2-core machine's time)
    then overlaps the store's opening, the Ray connection, the attaching of the island hosts
    and the gRPC connections (all waiting on sockets) instead of following them. Nothing else
    imports JAX until `_serve` joins this thread (two threads importing it at once can meet a
    half-initialised module); a failure here is left to that later import to raise."""

    def run() -> None:
        began = time.monotonic()
        try:
            # estimates: jax, flax, optax; train: the configs spec_configs resolves into.
            from pathways_lite.model import estimates, train  # noqa: F401
        except Exception as e:  # the later import in Controller.start raises it
            logger.warning("importing JAX ahead failed: %s", e)
            return
        logger.info("JAX imported ahead in %.2f s", time.monotonic() - began)

    thread = threading.Thread(target=run, name="import-jax", daemon=True)
    thread.start()
    return thread


def _import_serving_modules(imports: threading.Thread) -> None:
    """A standby's head start: join the JAX import and import what a controller's start-up
    and its first steps import (the islands' and the controller's modules, the dashboard,
    the data pipeline a resumed job prepares), so the takeover imports nothing."""
    began = time.monotonic()
    imports.join()
    from pathways_lite.model import data, tokenizer  # noqa: F401
    from pathways_lite.workers import island_host  # noqa: F401

    from . import auth, core, dashboard, islands, resolved, service, spec, trace  # noqa: F401

    logger.info("standby: everything imported in %.2f s", time.monotonic() - began)


def _spare_depth(value: str) -> bool | int:
    """--spare-hosts: on (the default depth), off, or how many spares per host."""
    return {"on": True, "off": False}[value] if value in ("on", "off") else int(value)


def _start_islands(specs, credential, issue_tls, spares: bool | int, groups: list) -> None:
    """Attach to each island's named host actors if they all answer, else (re)start the
    island as a unit (controller/recovery.py); either way the hosts get `credential`. Each
    group joins `groups` as soon as it is up, so a stop part way shuts down those started.
    With `spares`, a CPU island keeps warm spares per host once it holds a data-parallel job
    (controller/islands.py, workers/island_host.py)."""
    from .islands import attach_or_start

    for spec in specs:
        group, fresh = attach_or_start(spec, credential, issue_tls, spares=spares)
        if fresh:
            logger.info("started island %s", spec.name)
        groups.append(group)


def _resolve_ahead(store, imports: threading.Thread) -> threading.Thread:
    """Once `imports` (JAX) is done, resolve the specs of the training jobs a previous
    controller left running, on a thread of their own: their memory estimate traces the
    optimizer's state shapes (0.1-0.4 s per model, then cached), which the first scheduling
    pass of a restarted controller would otherwise do before it adopts them. Started once the
    main thread has imported the controller's modules (the threads import nothing in common);
    a spec that does not resolve is left to the scheduling pass to report."""

    def run() -> None:
        imports.join()
        from .resolved import ResolvedJob
        from .spec import SpecError, job_kind
        from .states import JobState

        for record in store.jobs_in_states([JobState.RUNNING]):
            if job_kind(record.spec) == "train":
                try:
                    ResolvedJob.resolve(record.spec)
                except (SpecError, ValueError):
                    pass
                except Exception:  # noqa: BLE001 - only a head start
                    logger.debug("resolving job %s ahead", record.id, exc_info=True)

    thread = threading.Thread(target=run, name="resolve-ahead", daemon=True)
    thread.start()
    return thread


async def _serve(args, store, groups, credential, tls, imports: threading.Thread, keeper) -> None:
    from .auth import (
        Credential,
        answer_rotation,
        cluster_secret_path,
        ensure_token,
        rotate_secrets,
        token_path,
    )
    from .core import Controller, settle_heap
    from .dashboard import Dashboard, parse_duration
    from .islands import Island, connect_host
    from .service import serve

    resolving = _resolve_ahead(store, imports)
    islands = []
    if args.simulate_islands:
        from pathways_lite.workers.sim_host import SimCluster, connect_islands

        if args.tls == "on":
            logger.warning("--tls on: simulated islands are served unencrypted on loopback")
        # Closed as real hosts are: the hosts refuse calls without the cluster credential.
        simulated = SimCluster.uniform(
            args.simulate_islands, step_s=args.simulate_step_s, credential=credential
        )
        islands = await connect_islands(await simulated.start(), credential)
    for group in groups:
        hosts = [
            await connect_host(m.address, credential=credential, tls=tls) for m in group.metadata
        ]
        islands.append(
            Island(group.island.name, hosts, group=group, credential=credential, tls=tls)
        )
    controller = Controller(
        store,
        islands,
        state_dir=args.state_dir,
        window=args.window,
        slice_s=args.slice_ms / 1e3,
        exchange_overlap=args.exchange_overlap,
        peak_flops=args.peak_flops or (1e12 if args.simulate_islands else None),
        **({"prepare": _simulated_data} if args.simulate_islands else {}),
    )
    token_file = Path(args.token_file or token_path(args.state_dir)).resolve()
    # A Credential, not a str: `pathways-lite rotate-secret` replaces it in place (SIGHUP).
    token = Credential(ensure_token(token_file))
    retention = parse_duration(args.job_retention) if args.job_retention else None
    dashboard = Dashboard(controller, token=token, retention_s=retention)
    await dashboard.start(args.dashboard_host or args.host, args.dashboard_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    rotations: set[asyncio.Task] = set()

    def rotate(grace_s: float) -> None:
        secret_file = cluster_secret_path(args.state_dir)
        rotate_secrets(token_file, secret_file, token, credential, groups, grace_s)

    def on_sighup() -> None:
        task = asyncio.ensure_future(asyncio.to_thread(answer_rotation, args.state_dir, rotate))
        rotations.add(task)
        task.add_done_callback(rotations.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
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
        # Once the jobs have resumed (a takeover's first seconds): its full collection holds
        # the GIL ~100 ms.
        asyncio.get_running_loop().call_later(SETTLE_HEAP_AFTER_S, settle_heap)
        if keeper is not None:  # serving, the lock held: now the next standby may wait on it
            # After a takeover, the jobs' resumption first: the standby's imports take CPU.
            keeper.start(args.standby_after_s if args.standby else 0.0)

    try:
        # Controller.start (in serve) resolves jobs: JAX must be whole before it imports it.
        await asyncio.to_thread(resolving.join)
        await serve(controller, args.host, args.port, started=started, stop=stop, token=token)
    finally:
        address_file.unlink(missing_ok=True)
        await dashboard.stop()


def _simulated_data(record, job):
    """Simulated islands read no data: a stand-in dataset reference."""
    import dataclasses

    from .resolved import DatasetRef

    return dataclasses.replace(job, dataset=DatasetRef("/simulated", "sim", "sim", 1 << 20))


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """Until `_serve` takes SIGTERM over: unwind the start (its `finally` shuts down the
    islands started so far) instead of dying at once, as SIGTERM's default action would."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the unwinding is not interrupted
    logger.warning("SIGTERM while starting: stopping")
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run a controller until SIGTERM or SIGINT; returns the process's exit status."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    # This process runs JAX on CPU only (estimates), whatever accelerators the machine has;
    # set before anything imports JAX, and only here, when a controller process starts.
    os.environ["JAX_PLATFORMS"] = "cpu"
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.simulate_islands < 0:
        parser.error(f"--simulate-islands={args.simulate_islands} must be >= 0.")
    if not args.simulate_islands and args.ray_address is None:
        parser.error("--ray-address is required unless --simulate-islands is given.")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logger.info(
        "controller process %d starting%s", os.getpid(), " (standby)" if args.standby else ""
    )
    # Started after parse_args, which imports Ray and the island host's modules (--island):
    # started before it, the two threads' imports share the GIL and the restart is no faster
    # (measured: kill -> next step 3.65-4.24 s at load 7-11 vs 3.78-3.94 s at load ~8).
    imports = _import_jax_ahead()
    from pathways_lite.workers.ray_cluster import connect

    from .states import StoreError
    from .store import JobStore

    Path(args.state_dir).mkdir(parents=True, exist_ok=True)
    ray_node = None
    node_ip = None if args.node_ip == AUTO_NODE_IP else args.node_ip
    try:
        if args.standby:
            # Nothing here touches the state dir or an island host: a Ray driver that owns
            # nothing, and imports.
            if not args.simulate_islands:
                if args.join_ray_node:
                    ray_node, node_ip = _join_ray_node(args, node_ip)
                connect(args.ray_address, node_ip=node_ip, token_path=args.ray_token_file)
            _import_serving_modules(imports)
            logger.info("standby controller pid %d: waiting for the state dir's lock", os.getpid())
        store = JobStore.open_controller(args.state_dir, wait=args.standby)
    except BaseException as e:
        if ray_node is not None:
            _leave_ray_node(ray_node)
        if isinstance(e, StoreError):
            print(f"controller: error: {e}", file=sys.stderr)
            return 2
        raise
    if args.standby:
        logger.info("standby controller pid %d took over the state dir", os.getpid())
    groups = []
    keeper = None
    if args.keep_standby:
        from .standby import StandbyKeeper

        keeper = StandbyKeeper(args.state_dir, argv)
    try:
        if args.simulate_islands:  # no Ray: the simulated hosts live in this process
            from .auth import cluster_credential

            credential = cluster_credential(args.state_dir)
            asyncio.run(_serve(args, store, [], credential, None, imports, keeper))
            return 0
        if not args.standby:  # a standby is connected already
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
        from .auth import cluster_credential

        credential = cluster_credential(args.state_dir)
        tls, issue_tls = _cluster_tls(args)
        _start_islands(
            islands, credential, issue_tls, spares=_spare_depth(args.spare_hosts), groups=groups
        )
        asyncio.run(_serve(args, store, groups, credential, tls, imports, keeper))
        return 0
    except Exception as e:
        logger.exception("controller failed")
        print(f"controller: error: {e}", file=sys.stderr)
        return 1
    finally:
        # The loop put SIGTERM's default action back when it closed: a second SIGTERM must
        # not cut the islands' shutdown short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if keeper is not None:  # first: it would take the state dir over once the lock drops
            keeper.stop()
        if not args.keep_hosts:
            # Every island's hosts, attached ones too: left running, a restarted controller's
            # hosts would outlive it (a `down` after a restart then waited ~20 s for Ray to
            # give up on them).
            for group in groups:
                group.shutdown()
        if ray_node is not None:
            _leave_ray_node(ray_node)
        store.close()


def _cluster_tls(args):
    """(the controller's TLS setting, the hosts' certificate issuer); the cluster CA lives in
    `<state_dir>/tls` (workers/tls.py). `--tls off` makes neither."""
    if args.tls == "off":
        return None, None
    from pathways_lite.workers.tls import ClusterCA

    ca = ClusterCA(Path(args.state_dir) / "tls")
    return ca.client(args.tls), lambda host: ca.issue(host, args.tls)


def _leave_ray_node(node) -> None:
    """Disconnect from Ray and stop the node `_join_ray_node` started."""
    import ray

    ray.shutdown()
    node.stop()
    shutil.rmtree(node.state_dir, ignore_errors=True)


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
