"""The island handle: every worker RPC the controller makes goes through an `Island`.

An `Island` owns the connections to its hosts (one `HostHandle` each, gathered with their
`InfoReply` once at connect), the island_seq counter its steps are numbered with, and, on a
Ray cluster, the island's host group (workers/island_host.py) through which it restarts as a
unit. Its fan-out is the worker-group pattern: `call_async` issues one rpc on every host and
returns the futures in host order, `call` waits for them; `call_all` does the same over several
islands, island by island, host by host. The dispatcher, recovery, suspend/resume, sampling and
checkpoints never touch a stub themselves.

Channels count their RPC bytes (`RPC_BYTES`), which do not grow with the model: the controller
sends step numbers and grants, never tensors.

Death from Ray. A `DeathWatch` keeps one never-returning call (`watch`) pending on every host
actor of every island; Ray fails it the moment the actor's process or node dies, and the
controller acts at once (`Island.host_died`: the island is marked dead for its generation and
its channels are closed, so the steps in flight fail now rather than at their gRPC deadline;
recovery then sees the island dead without probing). The gRPC path stays as it was: whichever
signal comes first, the job's one recovery restarts the island once (`restart` is skipped for
an island already restarted since the death was seen: `generation`).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf.message import Message

from pathways_lite.v1 import worker_pb2, worker_pb2_grpc
from pathways_lite.workers.auth import Credential, CredentialMetadata
from pathways_lite.workers.host import WORKER_WIRE_VERSION
from pathways_lite.workers.tls import TlsConfig, aio_channel

logger = logging.getLogger(__name__)

INFO_TIMEOUT_S = 30.0
# How long a host may take to answer Info before its island counts as dead.
PROBE_TIMEOUT_S = 3.0
# An island's warm spares start this long after a data-parallel job's load: their process
# start (before the spare lowers its priority, workers/island_host.py's SPARE_NICE) would
# slow the load's compile and first steps on the island's node.
SPARE_DELAY_S = 1.0


class RpcByteCounter(grpc.aio.UnaryUnaryClientInterceptor):
    """Counts the serialized request and reply bytes of unary calls, per method."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes: collections.Counter[str] = collections.Counter()

    def add(self, method: str, size: int) -> None:
        """Count `size` bytes of `method`, a short name ("RunSlice": streams are counted by
        their callers, once per step)."""
        with self._lock:
            self.bytes[method] += size

    def _add(self, method: Any, size: int) -> None:
        name = method.decode() if isinstance(method, bytes) else str(method)
        with self._lock:
            self.bytes[name.rsplit("/", 1)[-1]] += size

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.bytes)

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        call = await continuation(client_call_details, request)
        self._add(client_call_details.method, request.ByteSize())
        try:
            reply = await call
        except grpc.aio.AioRpcError:
            return call
        self._add(client_call_details.method, reply.ByteSize())
        return call


# The controller's worker RPC bytes (every channel `connect_host` opens).
RPC_BYTES = RpcByteCounter()


class WireVersionError(RuntimeError):
    """A host speaks another worker wire version than this controller."""


@dataclasses.dataclass
class HostHandle:
    """A connection to one island host's worker service, with the host's facts."""

    address: str
    channel: grpc.aio.Channel
    stub: worker_pb2_grpc.WorkerServiceStub
    info: worker_pb2.InfoReply
    # The cluster credential its calls carry: unary calls get it from the channel's
    # interceptor; streams (RunSlice) pass `metadata()` themselves, which spares every
    # streamed reply grpc.aio's interceptor wrapping.
    credential: Credential | None = None

    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        """Call metadata carrying the credential's current secret (None: no credential)."""
        return None if self.credential is None else self.credential.metadata()

    async def close(self) -> None:
        await self.channel.close()


async def connect_host(
    address: str,
    *,
    credential: Credential | None = None,
    tls: TlsConfig | None = None,
    timeout_s: float = INFO_TIMEOUT_S,
    wire_version: int = WORKER_WIRE_VERSION,
) -> HostHandle:
    """Open a channel to a host, read its Info and check its wire version.

    Args:
        address: The host's host:port.
        credential: The cluster credential every call on the channel carries (its current
            secret at the time of the call); None for an in-process host without one.
        tls: The cluster's TLS setting and CA: the channel is TLS, verified against the CA
            and `address`, where it wants TLS (workers/tls.py); None: plaintext.
        timeout_s: How long the host may take to answer Info.
        wire_version: The worker wire version the host must speak.

    Raises:
        WireVersionError: the host reports another worker wire version.
        grpc.aio.AioRpcError: the host does not answer.
    """
    interceptors: list[Any] = [RPC_BYTES]
    if credential is not None:
        interceptors.append(CredentialMetadata(credential))
    channel = aio_channel(address, tls, interceptors=interceptors)
    stub = worker_pb2_grpc.WorkerServiceStub(channel)
    try:
        info = await stub.Info(worker_pb2.InfoRequest(), timeout=timeout_s, wait_for_ready=True)
    except BaseException:
        await channel.close()
        raise
    if info.wire_version.version != wire_version:
        await channel.close()
        raise WireVersionError(
            f"island host {address} speaks worker wire version {info.wire_version.version}, "
            f"but this controller speaks version {wire_version}; run matching pathways_lite "
            "versions."
        )
    return HostHandle(address, channel, stub, info, credential)


# A request for every host, or a function of (host index, host) giving each host's own.
Request = Message | Callable[[int, HostHandle], Message]


@dataclasses.dataclass(eq=False)
class Island:
    """An island as the controller drives it: its hosts, its island_seq counter, its group.

    Every host of an island receives the same island_seq for a step; the numbers are
    contiguous per island within one controller epoch (the hosts restart at 0 on a new one,
    and so does the counter: `take_seqs`).

    Attributes:
        id: the island's name.
        hosts: connections to its hosts, in host order.
        next_seq: the island_seq the next step gets.
        seq_epoch: the controller epoch `next_seq` counts in (None: no step numbered yet).
        group: the island's Ray host group (workers/island_host.py), if it can be restarted.
        credential: the cluster credential its hosts require (a restart reconnects with it).
        tls: the cluster's TLS setting and CA for the channels to its hosts.
    """

    id: str
    hosts: list[HostHandle]
    next_seq: int = 0
    seq_epoch: int | None = None
    group: Any = None
    credential: Credential | None = None
    tls: TlsConfig | None = None
    # Ray actors whose death is this island's (its hosts'); default: its group's actors.
    actors: list[Any] | None = None
    # Bumped at every restart; `dead` says why the current generation's hosts are dead.
    generation: int = 0
    dead: str | None = None
    _restart_lock: asyncio.Lock | None = dataclasses.field(default=None, repr=False)
    # Set when Ray reports the current generation's hosts dead (`host_died`).
    _died: asyncio.Event | None = dataclasses.field(default=None, repr=False)
    _spares_timer: asyncio.TimerHandle | None = dataclasses.field(default=None, repr=False)
    # How the last restart went (a warm spare promoted), for the job's events.
    restart_note: str = ""
    _spares_task: asyncio.Future | None = dataclasses.field(default=None, repr=False)

    def death(self) -> asyncio.Event:
        """Set once Ray reported a host of the current generation dead."""
        if self._died is None:
            self._died = asyncio.Event()
            if self.dead is not None:
                self._died.set()
        return self._died

    def watched_actors(self) -> list[Any]:
        """The Ray actors of its hosts (none: an island outside Ray)."""
        if self.actors is not None:
            return list(self.actors)
        return list(getattr(self.group, "actors", None) or [])

    async def host_died(self, generation: int, reason: str) -> bool:
        """Ray says a host of the island died: mark this generation dead and close its
        channels (steps in flight fail now). False when already known or stale."""
        if generation != self.generation or self.dead is not None:
            return False
        self.dead = reason
        self.death().set()
        logger.warning("island %s: a host died (%s)", self.id, reason)
        for host in self.hosts:
            try:
                await host.close()
            except Exception:  # noqa: BLE001 - closing a channel to a dead host
                logger.debug("closing a channel", exc_info=True)
        return True

    @property
    def devices(self) -> int:
        return int(self.hosts[0].info.island_device_count) if self.hosts else 0

    @property
    def restartable(self) -> bool:
        return self.group is not None

    def take_seqs(self, count: int, epoch: int) -> int:
        """The first of `count` contiguous island_seq numbers for steps sent under `epoch`.

        A host restarts its sequence at 0 when it adopts a newer epoch, so the counter does
        too when a dispatcher of another epoch numbers steps on this island (a handle kept
        across dispatchers: a bench's next run, a script's second controller); counting on
        from the old epoch's numbers, the hosts would wait for numbers that never come.
        """
        if self.seq_epoch is not None and self.seq_epoch != epoch:
            self.next_seq = 0
        self.seq_epoch = epoch
        seq = self.next_seq
        self.next_seq += count
        return seq

    def call_async(self, method: str, request: Request, *, timeout: float) -> list[asyncio.Future]:
        """Issue rpc `method` on every host; the futures, in host order."""
        futures = []
        for index, host in enumerate(self.hosts):
            if self.dead is not None:  # its channels are closed: fail as a lost host does
                futures.append(asyncio.ensure_future(self._unavailable(method)))
                continue
            message = request(index, host) if callable(request) else request
            if method == "LoadJob" and index == 0 and _data_parallel(message):
                # A job that recovers from a peer island: keep warm spares ready for it.
                self.prepare_spares(SPARE_DELAY_S)
            futures.append(
                asyncio.ensure_future(getattr(host.stub, method)(message, timeout=timeout))
            )
        return futures

    async def _unavailable(self, method: str) -> Any:
        """What a call to a host Ray reported dead answers: UNAVAILABLE, with the reason."""
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.UNAVAILABLE,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            details=f"{method} on island {self.id}: {self.dead}",
        )

    async def call(
        self, method: str, request: Request, *, timeout: float, return_exceptions: bool = False
    ) -> list[Any]:
        """Rpc `method` on every host; the replies in host order (exceptions in place with
        `return_exceptions`, else the first one raised)."""
        return await asyncio.gather(
            *self.call_async(method, request, timeout=timeout),
            return_exceptions=return_exceptions,
        )

    async def call_host(self, index: int, method: str, request: Message, *, timeout: float) -> Any:
        """Rpc `method` on host `index` alone (island 0's host 0 answers for checkpoints).

        A call whose channel `host_died` closes under it fails UNAVAILABLE: a cancellation
        the calling task did not ask for is the host's failure, not a stop of the controller
        (a job's task must not take it for one: controller/jobs.py requeues on those)."""
        if self.dead is not None:
            return await self._unavailable(method)
        try:
            return await getattr(self.hosts[index].stub, method)(request, timeout=timeout)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling() == 0 and self.dead is not None:
                return await self._unavailable(method)
            raise

    async def answers(self, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
        """Whether every host answers Info (gRPC health of the host processes); False at once
        for an island Ray reported dead."""
        if self.dead is not None:
            return False
        replies = await self.call(
            "Info", worker_pb2.InfoRequest(), timeout=timeout_s, return_exceptions=True
        )
        return not any(isinstance(r, BaseException) for r in replies)

    async def restart(self, seen_generation: int | None = None) -> None:
        """Restart every host of the island through Ray (a multi-host island re-forms its JAX
        runtime) and point the island at the new ones, island_seq from 0.

        With `seen_generation`, nothing happens when the island was restarted since then (a
        death handled once, whichever signal reported it first).

        Raises:
            RuntimeError: the island has no Ray group.
            IslandPlacementError: its node is gone (workers/island_host.py).
        """
        if self.group is None:
            raise RuntimeError(f"island {self.id} has no Ray group to restart.")
        if self._restart_lock is None:
            self._restart_lock = asyncio.Lock()
        async with self._restart_lock:
            if seen_generation is not None and seen_generation != self.generation:
                logger.info("island %s was restarted already", self.id)
                return
            started = time.monotonic()
            self.group = await asyncio.to_thread(restart_group, self.group)
            hosts = [
                await connect_host(m.address, credential=self.credential, tls=self.tls)
                for m in self.group.metadata
            ]
            old, self.hosts = self.hosts, hosts
            self.next_seq, self.seq_epoch = 0, None
            self.generation += 1
            self.dead = None
            self._died = None
            for host in old:
                try:
                    await host.close()
                except Exception:  # a channel to a dead host
                    logger.debug("closing a channel", exc_info=True)
            promoted = getattr(self.group, "promoted", None)
            self.restart_note = (
                ""
                if promoted is None
                else f"its warm spare took over (compiled ahead: {', '.join(promoted) or 'none'})"
            )
            logger.warning(
                "island %s restarted in %.1f s%s",
                self.id,
                time.monotonic() - started,
                f"; {self.restart_note}" if self.restart_note else "",
            )

    def prepare_spares(self, delay_s: float = 0.0) -> None:
        """Start the island's warm spares (workers/island_host.py) in `delay_s`, off the
        loop; nothing when its group keeps none or has them already. An island gets them
        once it holds a data-parallel job (whose recovery waits for its restart)."""
        group = self.group
        if group is None or not getattr(group, "spares_wanted", False) or group.spares_full:
            return

        def later() -> None:
            self._spares_task = asyncio.ensure_future(asyncio.to_thread(group.prepare_spares))

        loop = asyncio.get_running_loop()
        if self._spares_timer is not None:
            self._spares_timer.cancel()
        self._spares_timer = loop.call_later(delay_s, later)

    async def close(self) -> None:
        if self._spares_timer is not None:
            self._spares_timer.cancel()
        if self._spares_task is not None:
            await asyncio.gather(self._spares_task, return_exceptions=True)
        for host in self.hosts:
            await host.close()


def _data_parallel(message: Any) -> bool:
    """Whether a LoadJob request loads a job spread over islands as replicas (not a dry
    run, not a pipeline's stage)."""
    return message.num_islands > 1 and not message.dry_run and not message.HasField("pipeline")


async def call_all(
    islands: Sequence[Island],
    method: str,
    request: Message | Callable[[int, int, HostHandle], Message],
    *,
    timeout: float,
    return_exceptions: bool = False,
) -> list[Any]:
    """Rpc `method` on every host of every island at once; replies island by island, host by
    host. `request` is one message for all, or a function of (island index, host index, host).
    """
    futures: list[Awaitable[Any]] = []
    for island_index, island in enumerate(islands):
        per_host = (
            (lambda h, host, i=island_index: request(i, h, host)) if callable(request) else request
        )
        futures += island.call_async(method, per_host, timeout=timeout)
    return await asyncio.gather(*futures, return_exceptions=return_exceptions)


async def wait_unless_dead(
    tasks: set[asyncio.Future], islands: Sequence[Island], timeout_s: float
) -> set[asyncio.Future]:
    """Wait up to `timeout_s` for `tasks`, but no longer once Ray reports a host of one of
    `islands` dead (the tasks may wait on it: no point waiting). Returns those not done."""
    pending = {t for t in tasks if not t.done()}
    if not pending or any(island.dead is not None for island in islands):
        return pending
    deaths = [asyncio.ensure_future(island.death().wait()) for island in islands]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        while pending and not any(d.done() for d in deaths):
            left = deadline - loop.time()
            if left <= 0:
                break
            done, _ = await asyncio.wait(
                pending | set(deaths), timeout=left, return_when=asyncio.FIRST_COMPLETED
            )
            pending -= done
    finally:
        for d in deaths:
            d.cancel()
    return pending


class DeathWatch:
    """Watches the islands' host actors through Ray and reports a death at once.

    One thread keeps a pending `watch` call on every host actor of every watched island (of
    its current generation: a restarted island's new actors are watched as soon as it is
    back) and waits on them (`ray.wait`); when one fails (the actor's process or node died),
    `on_death(island, generation, reason)` runs on the event loop.

    Args:
        loop: the controller's event loop.
        on_death: called on the loop with (island, the generation that died, reason).
    """

    POLL_S = 0.1

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_death: Callable[[Island, int, str], None],
    ) -> None:
        self._loop = loop
        self._on_death = on_death
        self._islands: list[Island] = []
        # Pending watch ref -> (island, generation); the generation armed per island.
        self._refs: dict[Any, tuple[Island, int]] = {}
        self._armed: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, islands: Sequence[Island]) -> None:
        """Start watching the islands that have Ray actors."""
        self._islands += [i for i in islands if i.watched_actors()]
        if self._islands and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ray-death-watch", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _report(self, island: Island, generation: int, reason: str) -> None:
        try:
            self._loop.call_soon_threadsafe(self._on_death, island, generation, reason)
        except RuntimeError:  # the loop is closed: the controller stopped
            self._stop.set()

    def _arm(self) -> None:
        for island in self._islands:
            if island.dead is not None or self._armed.get(island.id) == island.generation:
                continue
            self._armed[island.id] = island.generation
            for actor in island.watched_actors():
                try:
                    self._refs[actor.watch.remote()] = (island, island.generation)
                except Exception as e:  # noqa: BLE001 - an actor already gone
                    self._report(island, island.generation, repr(e))

    def _run(self) -> None:
        import ray

        while not self._stop.is_set():
            self._arm()
            if not self._refs:
                self._stop.wait(self.POLL_S)
                continue
            ready, _ = ray.wait(list(self._refs), num_returns=1, timeout=self.POLL_S)
            for ref in ready:
                island, generation = self._refs.pop(ref)
                try:
                    ray.get(ref)
                    reason = "its host actor's watch call returned"
                except Exception as e:  # noqa: BLE001 - RayActorError, ActorDiedError...
                    reason = f"Ray reports its host actor dead ({type(e).__name__})"
                # The other actors of that generation need no watching any more.
                for other, (i, g) in list(self._refs.items()):
                    if i is island and g == generation:
                        del self._refs[other]
                self._report(island, generation, reason)


async def dead_islands(islands: Sequence[Island], timeout_s: float = PROBE_TIMEOUT_S) -> list[str]:
    """Ids of the islands with a host that does not answer Info: such an island restarts as
    a unit."""
    alive = await asyncio.gather(*(island.answers(timeout_s) for island in islands))
    return [island.id for island, ok in zip(islands, alive, strict=True) if not ok]


def restart_group(group: Any, *, attempts: int = 50) -> Any:
    """Kill every host of an island group and start them again, in place (blocking: Ray
    calls); returns the group. A killed detached actor's name is freed shortly after; starting
    waits for it.

    Raises:
        IslandPlacementError: no live node advertises the island's resource any more (its
            node is gone: this fails at once rather than after the placement timeout), or
            the hosts could not be placed in time.
    """
    import ray

    from pathways_lite.workers.island_host import IslandPlacementError

    if group.promote_spares():  # warm spares: no new process on the way back
        return group
    group.shutdown(patience_s=1.0)
    island = group.island
    total = ray.cluster_resources().get(island.resource, 0)
    if total < island.num_hosts:
        raise IslandPlacementError(
            f"island {island.name!r} cannot be restarted: no live Ray node advertises enough "
            f"of the resource {island.resource!r} (needs {island.num_hosts}, the cluster has "
            f"{total:g}); its node is gone."
        )
    last: BaseException | None = None
    for _ in range(attempts):
        try:
            group.start()
            return group
        except ValueError as e:  # the name is still held by the dying actor
            last = e
            time.sleep(0.2)
    raise RuntimeError(f"island {group.island.name!r} could not be restarted: {last!r}")


def attach_or_start(
    spec: Any,
    credential: Credential,
    issue_tls: Callable[[str], TlsConfig] | None = None,
    *,
    spares: bool | int = False,
) -> tuple[Any, bool]:
    """An island's host group: attached to its live named actors (a restarted controller,
    which hands them `credential` again: the state dir's secret, perhaps rotated meanwhile),
    or started afresh with it (killing survivors of a partly dead island first). Returns
    (group, whether it was started here). `issue_tls` makes a started host's certificate; an
    attached host keeps the one it has (the CA lives in the state dir too). With `spares`,
    the group keeps warm spares per host (a previous controller's, or `prepare_spares`'s).

    The live actors are found by name (every incarnation: `IslandSpec.actor_name`): one
    whole started incarnation is attached; anything else (a partly dead island, two started
    incarnations) is killed and the island starts afresh."""
    import ray

    from pathways_lite.workers.island_host import IslandHostGroup
    from pathways_lite.workers.ray_cluster import NAMESPACE

    group = IslandHostGroup(spec, credential, issue_tls=issue_tls, spares=spares)
    # Every live actor of the island, by incarnation: the started ones are its hosts, the
    # others a previous controller's warm spares.
    found: dict[int, dict[int, Any]] = collections.defaultdict(dict)
    for name in ray.util.list_named_actors():
        parsed = spec.parse_actor_name(name)
        if parsed is not None:
            try:
                found[parsed[1]][parsed[0]] = ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:  # gone meanwhile
                pass
    group.next_incarnation = max(found, default=-1) + 1
    try:
        started = {
            k: ray.get([a.started.remote() for a in actors.values()], timeout=30)
            for k, actors in found.items()
        }
    except Exception as e:  # noqa: BLE001 - an actor that died meanwhile
        logger.warning("island %s does not answer (%r); restarting it", spec.name, e)
        started = {}
    hosts = [k for k, flags in started.items() if any(flags)]
    spare = [k for k, flags in started.items() if not any(flags)]
    if len(hosts) == 1 and len(found[hosts[0]]) == spec.num_hosts and all(started[hosts[0]]):
        k = hosts[0]
        handles = [found[k][i] for i in range(spec.num_hosts)]
        try:
            group.actors, group.incarnation = handles, k
            group.metadata = ray.get([h.metadata.remote() for h in handles], timeout=30)
            ray.get([h.set_credential.remote(credential) for h in handles], timeout=30)
            # Whole spare sets, the oldest first, as many as the group keeps.
            whole = [k for k in sorted(spare) if len(found[k]) == spec.num_hosts]
            for k in whole[: group.spare_depth]:
                group.spare_sets.append((k, [found[k][i] for i in range(spec.num_hosts)]))
                spare.remove(k)
            for k in spare:
                group.shutdown_actors(list(found[k].values()))
            logger.info("attached to island %s", spec.name)
            return group, False
        except Exception as e:
            logger.warning("island %s does not answer (%r); restarting it", spec.name, e)
    # Kill what is left of it (a partly dead island restarts as a unit) and start afresh.
    group.actors = [a for actors in found.values() for a in actors.values()]
    group.spare_sets = []
    return restart_group(group), True
