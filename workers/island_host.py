"""Island hosts: detached, named Ray actors that own an island's devices and serve gRPC.

Ray places, starts and health-checks the hosts and nothing else: every job operation goes
over the worker service (workers/service.py) that each host runs on its node's address.
A simulated CPU island is a process started with
`XLA_FLAGS=--xla_force_host_platform_device_count=N`; a GPU island host asks Ray for
`num_gpus`. Hosts of one multi-host island join one JAX runtime (`jax.distributed`, host 0
coordinating); that runtime never spans islands.

How a host gets the cluster credential (workers/auth.py): as an argument of the `start` (and
`set_credential`) actor call the controller makes, never of the actor's constructor, its
runtime_env or a command line. Ray carries a method call's arguments from the caller to the
actor's worker process only: Ray's state API, dashboard and logs show an actor's class, name
and resources and a task's function name, never its arguments (tests/test_worker_auth.py
greps them), whereas constructor arguments are kept in the GCS to restart the actor. A file
in the controller's state directory would not do: a host on another node cannot read it,
and copying it there is one more place to keep secret. Handing it over Ray trusts nothing new:
whoever can call Ray (the cluster's Ray token, `RAY_AUTH_MODE=token`) can already run code in
the host process. On a real cluster, Ray's own traffic is encrypted only with Ray's TLS
(`RAY_USE_TLS`); README's security section says so.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray

from .auth import Credential
from .host import DeviceRecord, HostMetadata, default_memory_budget
from .ray_cluster import NAMESPACE, island_resource
from .service import WorkerServicer
from .serving import BackgroundServer
from .tls import TlsConfig

# How long the cluster may lack an island's resource while its hosts wait to be placed before
# the placement fails (rather than waiting out the whole placement timeout).
MISSING_RESOURCE_GRACE_S = 3.0

logger = logging.getLogger(__name__)

# A warm spare behind another (SPARE_DEPTH) runs at this nice value (the lowest priority) until
# it is next in line, every thread of its process: its imports and compile-ahead take the CPU
# its node's serving hosts leave rather than slowing their steps (bench/chaos.py). Next in
# line (the one a kill promotes: it must be ready soon) or promoted, it has its original
# priority. (Ray starts worker processes, the hosts included, at nice 15: its
# `worker_niceness`; a nice-15 host weighs 36 against a spare's 15 in Linux's scheduler.)
SPARE_NICE = 19
# Warm spares kept per host with `spares=True`: a second kill of an island soon after the first
# promotes the next one, compiled ahead long ago, while the replacement still warms up.
SPARE_DEPTH = 2


def _thread_ids() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # no procfs: the calling thread only
        return [0]


def process_niceness() -> int:
    """The highest nice value of this process's threads (Linux nices per thread)."""
    values = []
    for tid in _thread_ids():
        try:
            values.append(os.getpriority(os.PRIO_PROCESS, tid))
        except OSError:  # a thread that just ended
            continue
    return max(values, default=os.getpriority(os.PRIO_PROCESS, 0))


def renice_process(value: int) -> None:
    """Set every thread of this process to nice `value`; threads started later inherit their
    creator's. Raises OSError when not permitted (lowering needs CAP_SYS_NICE or RLIMIT_NICE)."""
    for tid in _thread_ids():
        try:
            os.setpriority(os.PRIO_PROCESS, tid, value)
        except ProcessLookupError:  # a thread that just ended
            continue


def _can_renice_back(base: int) -> bool:
    """Whether this process may return to nice `base` after raising it."""
    import resource

    if os.geteuid() == 0:
        return True
    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    return soft == resource.RLIM_INFINITY or 20 - soft <= base


class IslandPlacementError(RuntimeError):
    """An island host could not be placed on any node (the message names the resource)."""


@dataclass(frozen=True)
class IslandSpec:
    """One island: its name, hosts and devices.

    Attributes:
        name: Island name; hosts are placed on nodes advertising `island_<name>`.
        num_hosts: Hosts (machines) of the island; more than one joins them with
            jax.distributed.
        devices_per_host: Devices each host owns (simulated CPU devices, or GPUs).
        platform: "cpu" (simulated devices) or "gpu" (the node's GPUs through Ray).
        memory_budget_bytes_per_device: Budget jobs are checked against; None reads the
            device's limit (GPU) or, on CPU, half the host's RAM split over its devices.
        ray_resource: The Ray resource a host is placed with (one unit per host); empty
            means `island_<name>`. Islands discovered on a GPU node without an island
            resource use the node's own `node:<ip>` resource (workers/discovery.py).
    """

    name: str
    num_hosts: int = 1
    devices_per_host: int = 2
    platform: str = "cpu"
    memory_budget_bytes_per_device: int | None = None
    ray_resource: str = ""

    def __post_init__(self) -> None:
        if not self.name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"island name {self.name!r} must be letters, digits, '-' or '_'.")
        if self.num_hosts < 1 or self.devices_per_host < 1:
            raise ValueError(
                f"island {self.name!r}: num_hosts={self.num_hosts} and devices_per_host="
                f"{self.devices_per_host} must be positive."
            )
        if self.platform not in ("cpu", "gpu"):
            raise ValueError(f"island {self.name!r}: platform={self.platform!r} is not cpu/gpu.")

    @property
    def resource(self) -> str:
        return self.ray_resource or island_resource(self.name)

    def actor_name(self, host_index: int, incarnation: int = 0) -> str:
        """The named actor of host `host_index`; every restart (or promoted spare) of the
        island is a new incarnation with names of its own (no wait for a dead one's)."""
        base = f"island-{self.name}-host-{host_index}"
        return base if incarnation == 0 else f"{base}-r{incarnation}"

    def parse_actor_name(self, name: str) -> tuple[int, int] | None:
        """(host index, incarnation) of one of this island's actor names, else None."""
        prefix = f"island-{self.name}-host-"
        if not name.startswith(prefix):
            return None
        index, _, incarnation = name[len(prefix) :].partition("-r")
        if not index.isdigit() or (incarnation and not incarnation.isdigit()):
            return None
        return int(index), int(incarnation or 0)

    def env_vars(self) -> dict[str, str]:
        """Environment of a host process (set through Ray's runtime_env)."""
        if self.platform == "cpu":
            return {
                "JAX_PLATFORMS": "cpu",
                "XLA_FLAGS": f"--xla_force_host_platform_device_count={self.devices_per_host}",
            }
        return {"JAX_PLATFORMS": ""}  # let JAX pick the accelerator Ray assigned


class IslandHost:
    """The body of the island host actor (wrapped by `ray.remote` in `IslandHostGroup`).

    Construction only records where it landed; `start()` joins the island's JAX runtime,
    gathers the metadata once and starts the gRPC worker service.
    """

    def __init__(self, island: IslandSpec, host_index: int) -> None:
        self.island = island
        self.host_index = host_index
        self.node_ip = ray.util.get_node_ip_address()
        self.node_id = ray.get_runtime_context().get_node_id()
        self._metadata: HostMetadata | None = None
        self._server: BackgroundServer | None = None
        self._distributed = False
        self._credential: Credential | None = None
        # `warm` and `start` run on the actor's threads: one at a time.
        self._start_lock = threading.Lock()
        # A warm spare's jobs compiled ahead (workers/warm_spare.py), until it starts.
        self._precompiled: Any = None
        self._stop_precompile = threading.Event()
        # The host actor a warm spare stands in for (it compiles that host's jobs ahead).
        self._host: Any = None
        # A warm spare's nice value before `warm` lowered its priority (None: not lowered);
        # once `start` or `next_in_line` was called, it is never lowered again.
        self._base_nice: int | None = None
        self._keep_priority = False
        self._nice_lock = threading.Lock()

    def ready(self) -> tuple[str, int]:
        """(node IP, pid) once the actor is placed and constructed."""
        return self.node_ip, os.getpid()

    def warm(self, host: Any = None) -> None:
        """What a warm spare does before it is needed (`IslandHostGroup` spares): import JAX
        and the model code and, on a one-host CPU island, bring up the devices and compile
        ahead the training jobs its `host` (the actor it stands in for) holds
        (workers/warm_spare.py), so that a `start` after the host died only serves. All of
        it at nice SPARE_NICE (where the process may return to its priority when promoted)."""
        self._lower_priority()
        with self._start_lock:
            import jax

            import pathways_lite.model.data  # noqa: F401
            import pathways_lite.model.estimates  # noqa: F401
            import pathways_lite.model.train  # noqa: F401

            if self.island.num_hosts > 1:  # jax.distributed must come before the devices
                return
            _cache_every_compile(jax)
            devices = sorted(jax.devices(), key=lambda d: d.id)
            if host is None or self.island.platform != "cpu" or self._metadata is not None:
                return
            if self._host is None:  # `next_in_line` may have named a newer one already
                self._host = host
            from .warm_spare import PrecompiledRuntimes, precompile_loop

            self._precompiled = PrecompiledRuntimes(devices)
            threading.Thread(
                target=precompile_loop,
                args=(
                    self._precompiled,
                    lambda: ray.get(self._host.train_loads.remote(), timeout=30),
                    self._stop_precompile,
                ),
                name="warm-spare-precompile",
                daemon=True,
            ).start()

    def _lower_priority(self) -> None:
        with self._nice_lock:
            base = os.getpriority(os.PRIO_PROCESS, 0)
            if self._keep_priority or self._base_nice is not None or base >= SPARE_NICE:
                return
            if not _can_renice_back(base):
                return
            try:
                renice_process(SPARE_NICE)
            except OSError as e:
                logger.warning("warm spare: its priority stays (nice %d): %r", base, e)
                return
            self._base_nice = base

    def next_in_line(self, host: Any = None) -> None:
        """This spare is the next one its island promotes (none warm ahead of it): it warms
        up at the priority it had, so that it is ready soon; only spares behind it yield.
        With `host`, it stands in for that host now (the one promoted ahead of it): it
        compiles that host's jobs ahead."""
        if host is not None:
            self._host = host
        self._restore_priority()

    def _restore_priority(self) -> None:
        with self._nice_lock:
            self._keep_priority = True
            if self._base_nice is None:
                return
            try:
                renice_process(self._base_nice)
            except OSError as e:
                logger.warning("promoted spare: nice %d not restored: %r", self._base_nice, e)
            self._base_nice = None

    def niceness(self) -> int:
        """The highest nice value of this actor's process's threads."""
        return process_niceness()

    def compiled_ahead(self) -> list[str]:
        """The jobs a warm spare holds compiled ahead (workers/warm_spare.py)."""
        return [] if self._precompiled is None else self._precompiled.job_ids()

    def train_loads(self) -> list[bytes]:
        """The LoadJob requests of the training jobs this host holds (for its warm spare)."""
        return [] if self._server is None else self._server.servicer.train_loads()

    def started(self) -> bool:
        """Whether `start` ran (a host), or not (a spare)."""
        return self._metadata is not None

    def watch(self) -> None:
        """Never returns: the controller keeps one call pending, so Ray fails it the moment
        this actor's process or node dies (controller/islands.py's DeathWatch)."""
        threading.Event().wait()

    def coordinator_address(self) -> str:
        """A free `ip:port` on this node for the island's JAX coordinator (host 0 only)."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((self.node_ip, 0))
            return f"{self.node_ip}:{s.getsockname()[1]}"

    def set_credential(self, credential: Credential) -> None:
        """Take the controller's credential (a restarted controller attaching, a rotation)."""
        if self._credential is None:
            self._credential = credential
        else:  # the servicer and the peers hold this object: update it in place
            self._credential.update(credential)

    def start(
        self,
        coordinator: str | None,
        credential: Credential,
        tls: TlsConfig | None = None,
        init_timeout_s: int = 120,
    ) -> HostMetadata:
        """Join the island's JAX runtime, gather metadata, start serving with `credential`
        required on every call (TLS with `tls`'s certificate where it wants it, on this
        node's address); return metadata."""
        self.set_credential(credential)
        # A promoted spare: its priority back first (a `warm` still importing finishes sooner).
        self._restore_priority()
        with self._start_lock:
            return self._start(coordinator, tls, init_timeout_s)

    def _start(self, coordinator: str | None, tls: TlsConfig | None, init_timeout_s: int):
        if self._metadata is not None:
            return self._metadata
        import jax

        self._stop_precompile.set()
        _cache_every_compile(jax)

        if self.island.num_hosts > 1:
            if self.island.platform == "cpu":
                jax.config.update("jax_cpu_collectives_implementation", "gloo")
            kwargs = {}
            if self.host_index == 0:
                kwargs["coordinator_bind_address"] = coordinator  # stay on the node's address
            jax.distributed.initialize(
                coordinator_address=coordinator,
                num_processes=self.island.num_hosts,
                process_id=self.host_index,
                initialization_timeout=init_timeout_s,
                **kwargs,
            )
            self._distributed = True
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
        local = [d for d in devices if d.process_index == jax.process_index()]
        if len(local) != self.island.devices_per_host:
            raise RuntimeError(
                f"island {self.island.name!r} host {self.host_index} sees {len(local)} devices, "
                f"not devices_per_host={self.island.devices_per_host}."
            )
        budget = self.island.memory_budget_bytes_per_device or default_memory_budget(local)
        peak = 0.0
        if local[0].platform != "cpu":
            # The denominator of this island's MFU figures (the controller runs on CPU).
            from pathways_lite.model.estimates import measure_matmul_peak_flops

            peak = measure_matmul_peak_flops(local[0])
        metadata = HostMetadata(
            island=self.island.name,
            host_index=self.host_index,
            num_hosts=self.island.num_hosts,
            node_ip=self.node_ip,
            node_id=self.node_id,
            pid=os.getpid(),
            devices=tuple(
                DeviceRecord(d.id, d.platform, d.device_kind, d.process_index) for d in local
            ),
            island_device_count=len(devices),
            memory_budget_bytes_per_device=int(budget),
            peak_flops_per_device=peak,
        )
        factory = (
            {} if self._precompiled is None else {"runtime_factory": self._precompiled.factory}
        )
        servicer = WorkerServicer(
            metadata, devices, credential=self._credential, tls=tls, **factory
        )
        self._server = BackgroundServer(servicer, self.node_ip, 0)
        self._server.start()
        self._metadata = servicer.metadata
        logger.info("island host ready: %s", self._metadata)
        return self._metadata

    def metadata(self) -> HostMetadata:
        """The metadata gathered at start."""
        if self._metadata is None:
            raise RuntimeError(
                f"island host {self.island.actor_name(self.host_index)} not started."
            )
        return self._metadata

    def collective_check(self) -> dict[str, Any]:
        """psum of (global device index + 1) over every device of the island (all hosts)."""
        import jax
        import jax.numpy as jnp
        import numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
        mesh = Mesh(np.asarray(devices), ("island",))
        values_n = np.arange(1, len(devices) + 1, dtype=np.float32)
        sharding = NamedSharding(mesh, PartitionSpec("island"))
        x_n = jax.make_array_from_callback(values_n.shape, sharding, lambda i: values_n[i])
        total = jax.jit(
            jax.shard_map(
                lambda x: jax.lax.psum(jnp.sum(x), "island"),
                mesh=mesh,
                in_specs=PartitionSpec("island"),
                out_specs=PartitionSpec(),
            )
        )(x_n)
        return {
            "device_count": jax.device_count(),
            "local_device_count": jax.local_device_count(),
            "process_index": jax.process_index(),
            "process_count": jax.process_count(),
            "psum": float(np.asarray(total.addressable_shards[0].data)),
        }

    def job_param_layout(self, job_id: str) -> dict[str, dict[str, Any]]:
        """Each parameter's global shape, partition spec and this host's shards (diagnostics).

        Reads array metadata only; call it while no step of the job is running.

        Raises:
            KeyError: the job is not loaded here.
            TypeError: the job's runtime does not report a layout.
        """
        if self._server is None:
            name = self.island.actor_name(self.host_index)
            raise RuntimeError(f"island host {name} not started.")
        runtime = self._server.servicer.job_runtime(job_id)
        layout = getattr(runtime, "param_layout", None)
        if layout is None:
            raise TypeError(f"job {job_id!r} runs {type(runtime).__name__}, which has no layout.")
        return layout()

    def shutdown(self, grace_s: float = 5.0) -> None:
        """Stop the worker service (in-flight calls get `grace_s`) and leave jax.distributed."""
        if self._server is not None:
            self._server.stop(timeout_s=grace_s + 5)
            self._server = None
        if self._distributed:
            import jax

            try:
                jax.distributed.shutdown()
            except Exception:  # a peer that is already gone must not block our exit
                logger.exception("jax.distributed.shutdown failed")
            self._distributed = False


def _cache_every_compile(jax: Any) -> None:
    """A restarted host (or a spare) compiles its jobs again: every program from the
    persistent cache, not only those that took a second; a default cache folder where none
    is set (the per-machine cache, model/tokenizer.py's `default_cache_dir`)."""
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if not jax.config.jax_compilation_cache_dir:
        from pathways_lite.model.tokenizer import default_cache_dir

        jax.config.update("jax_compilation_cache_dir", str(default_cache_dir() / "jax"))


class IslandHostGroup:
    """The hosts of one island as Ray actors (after Ray's worker_group.py).

    Args:
        island: The island.
        credential: The cluster credential handed to each host at start (module docstring).
        issue_tls: Makes a host's TLS setting and certificate for its node's address (the
            cluster CA's `issue`, workers/tls.py); None: the hosts serve plaintext.
        placement_timeout_s: How long placing and constructing the hosts may take before
            start() fails with IslandPlacementError.
        start_timeout_s: How long joining the JAX runtime and starting the service may take.
        namespace: Ray namespace of the named actors.
        max_restarts: Ray restarts of a dead host actor (0: the controller decides).
        spares: keep warm spares per host (CPU islands; True: SPARE_DEPTH of them, or a
            number): processes started beside the host on its node, JAX and the model code
            imported, that `restart` promotes (the oldest first) when the island dies, so
            no new process starts on the way back. A GPU island has none (its host holds
            the node's GPUs).
    """

    def __init__(
        self,
        island: IslandSpec,
        credential: Credential,
        *,
        issue_tls: Callable[[str], TlsConfig] | None = None,
        placement_timeout_s: float = 60.0,
        start_timeout_s: float = 180.0,
        namespace: str = NAMESPACE,
        max_restarts: int = 0,
        spares: bool | int = False,
    ) -> None:
        self.island = island
        self.credential = credential
        self.issue_tls = issue_tls
        self.placement_timeout_s = placement_timeout_s
        self.start_timeout_s = start_timeout_s
        self.namespace = namespace
        self.max_restarts = max_restarts
        self.actors: list[Any] = []
        self.metadata: list[HostMetadata] = []
        depth = SPARE_DEPTH if spares is True else int(spares)
        self.spare_depth = depth if island.platform == "cpu" else 0
        self.spares_wanted = self.spare_depth > 0
        # Sets of not started hosts (one per host index), each an incarnation, the oldest
        # first: the next to promote (`promote_spares`).
        self.spare_sets: list[tuple[int, list[Any]]] = []
        # After a promotion: the jobs its spares had compiled ahead; None after a fresh start.
        self.promoted: list[str] | None = None
        # The incarnation of the current hosts; the next one a restart or spare takes.
        self.incarnation = 0
        self.next_incarnation = 0
        # Spares are prepared off the controller's loop while a restart may promote them.
        self._spares_lock = threading.Lock()

    @property
    def spares(self) -> list[Any]:
        """The spares the next restart promotes, one per host index ([]: none)."""
        return self.spare_sets[0][1] if self.spare_sets else []

    @property
    def spares_full(self) -> bool:
        return len(self.spare_sets) >= self.spare_depth

    def _options(self) -> dict[str, Any]:
        island = self.island
        options: dict[str, Any] = {
            "namespace": self.namespace,
            "lifetime": "detached",
            "resources": {island.resource: 1},
            "num_cpus": 0,
            "max_restarts": self.max_restarts,
            # Metadata and health calls answer while start() blocks; one thread is the
            # controller's pending `watch` call.
            "max_concurrency": 5,
            "runtime_env": {"env_vars": island.env_vars()},
        }
        if island.platform == "gpu":
            options["num_gpus"] = island.devices_per_host
        return options

    def start(self) -> list[HostMetadata]:
        """Place the hosts, start them, and return their metadata in host order.

        Raises:
            IslandPlacementError: a host was not placed within `placement_timeout_s`.
        """
        island = self.island
        actor_cls = ray.remote(IslandHost)
        options = self._options()
        incarnation = self.next_incarnation
        try:
            for i in range(island.num_hosts):
                name = island.actor_name(i, incarnation)
                actor = actor_cls.options(name=name, **options).remote(island, i)
                self.actors.append(actor)
            self.incarnation, self.next_incarnation = incarnation, incarnation + 1
            self.promoted = None
            return self._start_placed()
        except BaseException:
            self._kill()
            raise

    def prepare_spares(self) -> None:
        """Start warm spares for every host until it has `spare_depth` (nothing without
        `spares`): placed on the host's node, holding none of its resources, each imports
        JAX and the model code now (`IslandHost.warm`, at a low priority) and starts serving
        only when promoted."""
        with self._spares_lock:
            while self.spares_wanted and not self.spares_full and self.metadata:
                if not self._prepare_spares():
                    return

    def _prepare_spares(self) -> bool:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        island = self.island
        actor_cls = ray.remote(IslandHost)
        options = {**self._options(), "resources": {}}
        incarnation = self.next_incarnation
        spares = []
        try:
            for i, meta in enumerate(self.metadata):
                strategy = NodeAffinitySchedulingStrategy(node_id=meta.node_id, soft=False)
                spare = actor_cls.options(
                    name=island.actor_name(i, incarnation),
                    scheduling_strategy=strategy,
                    **options,
                ).remote(island, i)
                spares.append(spare)
                spare.warm.remote(self.actors[i])
        except Exception:
            logger.exception("island %s: no warm spares", island.name)
            _kill_actors(spares)
            return False
        self.spare_sets.append((incarnation, spares))
        self.next_incarnation = incarnation + 1
        if len(self.spare_sets) == 1:
            _next_in_line(spares, self.actors)
        return True

    def promote_spares(self) -> bool:
        """Replace the hosts with the warm spares and start those (the island restarts
        without a new process). False when there are none or they cannot start (they are
        gone then; the caller starts new hosts)."""
        with self._spares_lock:
            if not self.spare_sets:
                return False
            (incarnation, spares), *self.spare_sets = self.spare_sets
            old, self.actors = self.actors, spares
            if self.spare_sets:  # the next spares follow the hosts promoted now
                _next_in_line(self.spare_sets[0][1], spares)
        started = time.monotonic()
        # The old hosts are dead or about to be replaced: no graceful stop to wait for.
        _kill_actors(old)
        ahead = [a.compiled_ahead.remote() for a in self.actors]
        try:
            self.incarnation = incarnation
            # Each spare sits on its host's node (node affinity): no placement to wait for.
            self._start_placed([m.node_ip for m in self.metadata] or None)
        except Exception as e:  # noqa: BLE001 - e.g. the spare's node died too
            logger.warning("island %s: its spares did not start: %r", self.island.name, e)
            self._kill()
            return False
        try:
            self.promoted = sorted({j for jobs in ray.get(ahead, timeout=10) for j in jobs})
        except Exception:  # noqa: BLE001 - only a note
            self.promoted = []
        logger.info(
            "island %s: warm spares promoted in %.2f s",
            self.island.name,
            time.monotonic() - started,
        )
        return True

    def _start_placed(self, node_ips: list[str] | None = None) -> list[HostMetadata]:
        """Wait until `actors` are placed (unless their `node_ips` are known: spares placed
        beside the hosts long ago), start them (one JAX runtime), gather metadata."""
        island = self.island
        t0 = time.monotonic()
        try:
            placed = [(ip, 0) for ip in node_ips] if node_ips else self._wait_placed()
            t_placed = time.monotonic()
            tls = [self.issue_tls(ip) if self.issue_tls else None for ip, _ in placed]
            coordinator = None
            if island.num_hosts > 1:
                coordinator = ray.get(self.actors[0].coordinator_address.remote(), timeout=30)
            refs = [
                a.start.remote(coordinator, self.credential, t, int(self.start_timeout_s))
                for a, t in zip(self.actors, tls, strict=True)
            ]
            self.metadata = ray.get(refs, timeout=self.start_timeout_s + 10)
        except BaseException:
            self._kill()
            raise
        logger.info(
            "island %s: hosts placed in %.2f s, started in %.2f s",
            island.name,
            t_placed - t0,
            time.monotonic() - t_placed,
        )
        return self.metadata

    def _wait_placed(self) -> list[tuple[str, int]]:
        """(node IP, pid) of every host once placed.

        Fails before `placement_timeout_s` once the cluster has had too little of the
        island's resource for `MISSING_RESOURCE_GRACE_S` (its node is gone: Ray's view of the
        resources may lag a node's death by a moment, so a restart's check before placing
        can pass and the node's loss show only while the hosts wait).
        """
        refs = [a.ready.remote() for a in self.actors]
        name = self.island.resource
        started = time.monotonic()
        deadline = started + self.placement_timeout_s
        short_since: float | None = None
        while True:
            left = deadline - time.monotonic()
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=max(0.0, min(1.0, left)))
            if len(ready) == len(refs):
                return ray.get(refs)  # surfaces a constructor error
            now = time.monotonic()
            if now >= deadline:
                break
            if ray.cluster_resources().get(name, 0) >= self.island.num_hosts:
                short_since = None
            elif short_since is None:
                short_since = now
            elif now - short_since >= MISSING_RESOURCE_GRACE_S:
                break
        waited = time.monotonic() - started
        total = ray.cluster_resources().get(name, 0)
        if total < self.island.num_hosts:
            why = (
                f"no node advertises enough of the Ray resource {name!r} (island "
                f"{self.island.name!r} needs {self.island.num_hosts}, the cluster has "
                f"{total:g})"
            )
        else:
            why = (
                f"the cluster has {total:g} of the Ray resource {name!r} but "
                f"{len(refs) - len(ready)} host(s) did not start (busy, or runtime_env failed)"
            )
        raise IslandPlacementError(
            f"island {self.island.name!r} could not be placed (waited {waited:.0f} s of "
            f"{self.placement_timeout_s:g} s): {why}."
        )

    def execute_async(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Call `method` on every host; return the futures (ObjectRefs) in host order."""
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def execute(self, method: str, *args: Any, timeout_s: float | None = 120, **kwargs: Any):
        """Call `method` on every host and wait; results in host order."""
        return ray.get(self.execute_async(method, *args, **kwargs), timeout=timeout_s)

    def shutdown(self, patience_s: float = 10.0, *, spares: bool = True) -> None:
        """Stop every host's service gracefully, then kill the actors (they are detached),
        and the spares unless `spares` is False (a restart that promotes them)."""
        self.shutdown_actors(self.actors, patience_s)
        self._kill()
        if spares:
            with self._spares_lock:
                for _, spares in self.spare_sets:
                    _kill_actors(spares)
                self.spare_sets = []

    @staticmethod
    def shutdown_actors(actors: list[Any], patience_s: float = 1.0) -> None:
        """Stop `actors` gracefully (`patience_s`), then kill them."""
        if actors:
            refs = [a.shutdown.remote(min(5.0, patience_s)) for a in actors]
            ray.wait(refs, num_returns=len(refs), timeout=patience_s)
        _kill_actors(actors)

    def _kill(self) -> None:
        _kill_actors(self.actors)
        self.actors = []
        self.metadata = []


def _next_in_line(spares: list[Any], hosts: list[Any]) -> None:
    """Tell `spares` they are the next ones promoted, standing in for `hosts` (in host
    order; `IslandHost.next_in_line`; no wait)."""
    for spare, host in zip(spares, hosts, strict=True):
        try:
            spare.next_in_line.remote(host)
        except Exception:  # noqa: BLE001 - a dead spare: its promotion will say so
            logger.debug("spare gone", exc_info=True)


def _kill_actors(actors: list[Any]) -> None:
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # already dead
            logger.debug("actor already gone", exc_info=True)


def wait_for_resource(name: str, amount: float, timeout_s: float = 30.0) -> None:
    """Wait until the cluster advertises `amount` of resource `name` (a node just joined)."""
    deadline = time.monotonic() + timeout_s
    while ray.cluster_resources().get(name, 0) < amount:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the cluster did not advertise {amount:g} of {name!r} in time.")
        time.sleep(0.2)
