"""Host-to-host gradient exchange between islands: reduce-scatter then all-gather over gRPC.

Host i of every island holds the same shards of the gradients (the islands run the same mesh),
flattened into one float32 vector of N elements in a fixed order (`flat_shards`). The vector
is cut into I contiguous parts (I islands, `part_bounds`); island j owns part j:

1. reduce-scatter: every island streams part j of its own gradients to island j (phase 1);
   island j sums the I contributions to its part in island order 0, 1, ..., I - 1 in numpy
   float32 and divides by I (the mean of the islands' equal-sized slices);
2. all-gather: island j streams its reduced part to every other island (phase 2).

Why every island ends with bitwise the same reduced gradients: each part is reduced by ONE
island only, with a fixed order of float32 additions (numpy's elementwise add and divide are
exact IEEE operations, independent of SIMD width), and the others receive its bytes verbatim.
The same compiled apply program then runs on the same bytes on every island, so parameters
stay bitwise identical (checked with digests, phase 3).

A host sends (N - N/I) + N/I * (I - 1) elements per step, about 2 N (I - 1) / I, instead of the
N (I - 1) of sending everything to everyone: the traffic per host stays under 2 N for any I.

Nothing here goes through Ray, files or the controller; streams carry chunks of at most
`CHUNK_ELEMENTS` values. Waits have deadlines, and `Mailbox.abort(job, generation)` releases
them (the Abort rpc) without touching other jobs.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import numpy as np

from pathways_lite.v1 import worker_pb2, worker_pb2_grpc

from .auth import Credential
from .tls import TlsConfig, aio_channel

logger = logging.getLogger(__name__)

PHASE_SCATTER = 1
PHASE_GATHER = 2
PHASE_DIGEST = 3
# float32 values per chunk message (1 MiB of payload).
CHUNK_ELEMENTS = 1 << 18
DEFAULT_TIMEOUT_S = 120.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# (job, step) byte counts kept by the interceptor.
MAX_STATS_ENTRIES = 4096
EXCHANGE_METHOD = "/pathways_lite.v1.ExchangeService/ExchangeGradients"


class ExchangeError(RuntimeError):
    """An exchange could not complete (a peer failed, a deadline passed, a bad chunk)."""


class ExchangeAbortedError(ExchangeError):
    """The exchange was released by Abort(job, generation)."""


class ExchangeTimeoutError(ExchangeError):
    """A peer's chunks did not arrive before the exchange's deadline."""


class DigestMismatchError(ExchangeError):
    """The islands' parameters differ: silent data corruption."""


def part_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """[start, stop) of each of `parts` contiguous parts of n elements (np.array_split's)."""
    base, extra = divmod(n, parts)
    bounds, start = [], 0
    for j in range(parts):
        stop = start + base + (1 if j < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def expected_payload_bytes(n: int, islands: int, island: int) -> tuple[int, int]:
    """(sent, received) gradient payload bytes of one host on one step for n float32 values."""
    if islands < 2:
        return 0, 0
    start, stop = part_bounds(n, islands)[island]
    own = stop - start
    sent = (n - own) + own * (islands - 1)
    received = own * (islands - 1) + (n - own)
    return 4 * sent, 4 * received


def flat_shards(tree: Any) -> tuple[np.ndarray, list[tuple[int, Any, tuple]]]:
    """This host's distinct shards of every leaf, as one float32 vector in a fixed order.

    Returns:
        the vector, and the layout to rebuild the leaves: per leaf, its index in the tree
        and its shards' (index tuple) in the order they were flattened.
    """
    import jax

    leaves = jax.tree_util.tree_leaves(tree)
    pieces, layout = [], []
    for i, leaf in enumerate(leaves):
        seen: dict[tuple, Any] = {}
        for shard in leaf.addressable_shards:
            key = tuple(
                (s.start or 0, s.stop if s.stop is not None else dim)
                for s, dim in zip(shard.index, leaf.shape, strict=True)
            )
            if key not in seen:
                seen[key] = shard.data
        keys = sorted(seen)
        for key in keys:
            pieces.append(np.asarray(seen[key], dtype=np.float32).ravel())
        layout.append((i, leaf, tuple(keys)))
    if not pieces:
        return np.zeros(0, np.float32), layout
    return np.concatenate(pieces), layout


def unflatten_shards(flat: np.ndarray, layout: list[tuple[int, Any, tuple]], tree: Any) -> Any:
    """The tree of `flat_shards` with every leaf's shards replaced by `flat`'s values."""
    import jax

    leaves, treedef = jax.tree_util.tree_flatten(tree)
    offset = 0
    out = []
    for (i, _, keys), original in zip(layout, leaves, strict=True):
        assert i == len(out)
        values: dict[tuple, np.ndarray] = {}
        for key in keys:
            shape = tuple(stop - start for start, stop in key)
            size = int(np.prod(shape, dtype=np.int64))
            values[key] = flat[offset : offset + size].reshape(shape).astype(original.dtype)
            offset += size
        arrays = []
        for shard in original.addressable_shards:
            key = tuple(
                (s.start or 0, s.stop if s.stop is not None else dim)
                for s, dim in zip(shard.index, original.shape, strict=True)
            )
            arrays.append(jax.device_put(values[key], shard.device))
        out.append(
            jax.make_array_from_single_device_arrays(original.shape, original.sharding, arrays)
        )
    assert offset == flat.size, (offset, flat.size)
    return jax.tree_util.tree_unflatten(treedef, out)


# ---- the receiving side ----------------------------------------------------------------------


@dataclasses.dataclass
class _Slot:
    """One expected (or early) part from one peer."""

    future: asyncio.Future
    buffer: np.ndarray | None = None
    filled: int = 0


class Mailbox:
    """Parts received from peers, by (job, generation, step, phase, source island, part).

    Runs on the host's event loop: chunks land here from ExchangeGradients streams
    (workers/exchange_service.py), whether or not this host has reached the step yet; the
    runtime thread waits on a slot through `JobExchange`.
    """

    def __init__(self) -> None:
        self._slots: dict[tuple, _Slot] = {}
        # (job, generation) -> reason, for aborted generations.
        self._aborted: dict[tuple[str, int], str] = {}

    def _slot(self, key: tuple) -> _Slot:
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot(asyncio.get_running_loop().create_future())
        return slot

    def deliver(self, chunk: worker_pb2.GradientChunk) -> None:
        """File one chunk (on the loop).

        Raises:
            ExchangeAbortedError: the chunk's job generation was aborted.
            ValueError: the chunk does not fit its part.
        """
        reason = self._aborted.get((chunk.job_id, chunk.generation))
        if reason is not None:
            raise ExchangeAbortedError(
                f"job {chunk.job_id!r} generation {chunk.generation} was aborted: {reason}"
            )
        key = (
            chunk.job_id,
            chunk.generation,
            chunk.step,
            chunk.phase,
            chunk.source_island,
            chunk.part,
        )
        slot = self._slot(key)
        if slot.future.done():
            raise ValueError(f"part {key} was already complete; a chunk arrived twice.")
        if chunk.phase == PHASE_DIGEST:
            slot.future.set_result(bytes(chunk.data))
            return
        if len(chunk.data) % 4:
            raise ValueError(f"chunk of {len(chunk.data)} bytes is not whole float32 values.")
        values = np.frombuffer(chunk.data, dtype="<f4")
        if slot.buffer is None:
            slot.buffer = np.empty(chunk.part_size, np.float32)
        if slot.buffer.size != chunk.part_size or chunk.offset + values.size > chunk.part_size:
            raise ValueError(
                f"chunk at offset {chunk.offset} with {values.size} values does not fit part "
                f"{chunk.part} of {slot.buffer.size} values."
            )
        slot.buffer[chunk.offset : chunk.offset + values.size] = values
        slot.filled += values.size
        if slot.filled == slot.buffer.size:
            slot.future.set_result(slot.buffer)

    async def wait(self, key: tuple, timeout_s: float) -> Any:
        """The completed part (or digest) of `key`, waiting at most `timeout_s`.

        Raises:
            ExchangeAbortedError, ExchangeTimeoutError.
        """
        reason = self._aborted.get((key[0], key[1]))
        if reason is not None:
            raise ExchangeAbortedError(f"job {key[0]!r} generation {key[1]} was aborted: {reason}")
        slot = self._slot(key)
        try:
            return await asyncio.wait_for(asyncio.shield(slot.future), max(timeout_s, 0.0))
        except TimeoutError:
            raise ExchangeTimeoutError(
                f"no data from island {key[4]} for job {key[0]!r} step {key[2]} (phase "
                f"{key[3]}) within {timeout_s:.1f} s; the peer may be dead."
            ) from None
        finally:
            if slot.future.done():
                self._slots.pop(key, None)

    def abort(self, job_id: str, generation: int, reason: str) -> int:
        """Release every wait of (job, generation); returns how many were waiting."""
        self._aborted[(job_id, generation)] = reason or "aborted"
        released = 0
        for key in [k for k in self._slots if k[0] == job_id and k[1] == generation]:
            slot = self._slots.pop(key)
            if not slot.future.done():
                slot.future.set_exception(
                    ExchangeAbortedError(
                        f"job {job_id!r} generation {generation} was aborted: {reason}"
                    )
                )
                released += 1
        return released

    def forget(self, job_id: str) -> None:
        """Drop every slot and abort mark of a job (it was unloaded)."""
        for key in [k for k in self._slots if k[0] == job_id]:
            slot = self._slots.pop(key)
            if not slot.future.done():
                slot.future.cancel()
        for key in [k for k in self._aborted if k[0] == job_id]:
            del self._aborted[key]

    def clear_abort(self, job_id: str, generation: int) -> None:
        """A fresh load of (job, generation) starts without the old abort mark."""
        self._aborted.pop((job_id, generation), None)


class ByteCounter(grpc.aio.ServerInterceptor):
    """Counts the serialized ExchangeGradients chunks a host receives, per job and step."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (job, step) -> [wire bytes, payload bytes, chunks]
        self.counts: collections.OrderedDict[tuple[str, int], list[int]] = collections.OrderedDict()

    def record(self, job_id: str, step: int, wire: int, payload: int) -> None:
        with self._lock:
            entry = self.counts.get((job_id, step))
            if entry is None:
                entry = self.counts[(job_id, step)] = [0, 0, 0]
                while len(self.counts) > MAX_STATS_ENTRIES:
                    self.counts.popitem(last=False)
            entry[0] += wire
            entry[1] += payload
            entry[2] += 1

    def snapshot(self, job_id: str = "") -> list[tuple[str, int, int, int, int]]:
        """(job, step, wire bytes, payload bytes, chunks), ordered by job then step."""
        with self._lock:
            rows = [
                (job, step, *entry)
                for (job, step), entry in self.counts.items()
                if not job_id or job == job_id
            ]
        return sorted(rows)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method != EXCHANGE_METHOD:
            return handler
        deserialize = handler.request_deserializer

        def counting(data: bytes) -> worker_pb2.GradientChunk:
            chunk = deserialize(data)
            self.record(chunk.job_id, chunk.step, len(data), len(chunk.data))
            return chunk

        return grpc.stream_unary_rpc_method_handler(
            handler.stream_unary,
            request_deserializer=counting,
            response_serializer=handler.response_serializer,
        )


# ---- the sending side and one job's exchange -------------------------------------------------


class Peers:
    """Channels to peer hosts, opened once per address (on the service's loop); every call
    carries the cluster credential (`metadata()`) when there is one."""

    def __init__(self, credential: Credential | None = None, tls: TlsConfig | None = None) -> None:
        self.credential = credential
        self.tls = tls
        self._stubs: dict[str, worker_pb2_grpc.ExchangeServiceStub] = {}
        self._channels: list[grpc.aio.Channel] = []

    def stub(self, address: str) -> worker_pb2_grpc.ExchangeServiceStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = aio_channel(
                address,
                self.tls,
                options=[
                    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ],
            )
            self._channels.append(channel)
            stub = self._stubs[address] = worker_pb2_grpc.ExchangeServiceStub(channel)
        return stub

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata of a call to a peer: the cluster credential's current secret."""
        return () if self.credential is None else self.credential.metadata()

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
        self._channels.clear()
        self._stubs.clear()


def _chunks(
    head: dict[str, Any], values: np.ndarray, part: int
) -> Iterator[worker_pb2.GradientChunk]:
    data = np.ascontiguousarray(values, dtype="<f4")
    size = data.size
    for offset in range(0, max(size, 1), CHUNK_ELEMENTS):
        piece = data[offset : offset + CHUNK_ELEMENTS]
        yield worker_pb2.GradientChunk(
            **head, part=part, offset=offset, part_size=size, data=piece.tobytes()
        )


class JobExchange:
    """One job's exchange on one host, called from the runtime thread (blocking).

    Args:
        loop: the worker service's event loop (where streams and the mailbox live).
        mailbox: the service's mailbox.
        peers: the service's peer channels.
        job_id, generation: the job.
        island_index: this host's island.
        addresses: host:port of this host's counterpart in every island, island order.
        timeout_s: deadline of one exchange call (sends and waits).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        mailbox: Mailbox,
        peers: Peers,
        *,
        job_id: str,
        generation: int,
        island_index: int,
        addresses: Sequence[str],
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.loop = loop
        self.mailbox = mailbox
        self.peers = peers
        self.job_id = job_id
        self.generation = generation
        self.island = island_index
        self.addresses = list(addresses)
        self.islands = len(self.addresses)
        self.timeout_s = timeout_s
        self.bytes_sent = 0

    def _head(self, step: int, phase: int) -> dict[str, Any]:
        return dict(
            job_id=self.job_id,
            generation=self.generation,
            step=step,
            source_island=self.island,
            phase=phase,
        )

    async def _send(self, island: int, chunks: list[worker_pb2.GradientChunk], deadline: float):
        left = deadline - time.monotonic()
        try:
            await self.peers.stub(self.addresses[island]).ExchangeGradients(
                iter(chunks), timeout=max(left, 0.001), metadata=self.peers.metadata()
            )
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise ExchangeTimeoutError(
                    f"sending to island {island} ({self.addresses[island]}) for job "
                    f"{self.job_id!r} did not finish within {self.timeout_s:.1f} s."
                ) from None
            if e.code() == grpc.StatusCode.ABORTED:
                raise ExchangeAbortedError(e.details()) from None
            raise ExchangeError(
                f"sending to island {island} ({self.addresses[island]}) failed: "
                f"{e.code().name}: {e.details()}"
            ) from None
        self.bytes_sent += sum(len(c.data) for c in chunks)

    async def _gather_all(self, aws: list) -> list:
        """Await all; on the first failure cancel the rest and raise it."""
        tasks = [asyncio.ensure_future(a) for a in aws]
        try:
            return await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _allreduce(self, step: int, flat: np.ndarray) -> np.ndarray:
        deadline = time.monotonic() + self.timeout_s
        n, me, islands = flat.size, self.island, self.islands
        bounds = part_bounds(n, islands)
        lo, hi = bounds[me]
        # 1. reduce-scatter: part j of our gradients to island j; the others' part `me` here.
        sends = [
            self._send(j, list(_chunks(self._head(step, PHASE_SCATTER), flat[a:b], j)), deadline)
            for j, (a, b) in enumerate(bounds)
            if j != me
        ]
        waits = [
            self.mailbox.wait(
                (self.job_id, self.generation, step, PHASE_SCATTER, j, me),
                deadline - time.monotonic(),
            )
            for j in range(islands)
            if j != me
        ]
        results = await self._gather_all(sends + waits)
        received = iter(results[len(sends) :])
        contributions = [flat[lo:hi] if j == me else next(received) for j in range(islands)]
        # Island order 0, 1, ..., I - 1, float32 throughout: the same bytes wherever computed.
        reduced = np.array(contributions[0], dtype=np.float32, copy=True)
        for part in contributions[1:]:
            np.add(reduced, part, out=reduced)
        np.divide(reduced, np.float32(islands), out=reduced)
        # 2. all-gather: our reduced part to everyone; theirs here.
        out = np.empty(n, np.float32)
        out[lo:hi] = reduced
        chunks = list(_chunks(self._head(step, PHASE_GATHER), reduced, me))
        sends = [self._send(j, chunks, deadline) for j in range(islands) if j != me]
        others = [j for j in range(islands) if j != me]
        waits = [
            self.mailbox.wait(
                (self.job_id, self.generation, step, PHASE_GATHER, j, j),
                deadline - time.monotonic(),
            )
            for j in others
        ]
        results = await self._gather_all(sends + waits)
        for j, part in zip(others, results[len(sends) :], strict=True):
            a, b = bounds[j]
            if part.size != b - a:
                raise ExchangeError(
                    f"island {j} sent a reduced part of {part.size} values for job "
                    f"{self.job_id!r} step {step}, expected {b - a}: the layouts differ."
                )
            out[a:b] = part
        return out

    async def _compare(self, step: int, digest: bytes) -> None:
        deadline = time.monotonic() + self.timeout_s
        chunk = worker_pb2.GradientChunk(**self._head(step, PHASE_DIGEST), data=digest)
        others = [j for j in range(self.islands) if j != self.island]
        sends = [self._send(j, [chunk], deadline) for j in others]
        waits = [
            self.mailbox.wait(
                (self.job_id, self.generation, step, PHASE_DIGEST, j, 0),
                deadline - time.monotonic(),
            )
            for j in others
        ]
        results = await self._gather_all(sends + waits)
        for j, theirs in zip(others, results[len(sends) :], strict=True):
            if theirs != digest:
                raise DigestMismatchError(
                    f"silent data corruption in job {self.job_id!r} after step {step}: "
                    f"island {self.island} has parameter digest {digest.hex()} but island {j} "
                    f"has {theirs.hex()}."
                )

    def _run(self, coro) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def allreduce_mean(self, step: int, flat: np.ndarray) -> np.ndarray:
        """The islands' mean of `flat` (this host's shards), bitwise equal on every island.

        Raises:
            ExchangeError (and its subclasses): a peer failed, a deadline passed, an abort.
        """
        self.bytes_sent = 0
        return self._run(self._allreduce(step, np.asarray(flat, np.float32)))

    def compare_digest(self, step: int, digest: bytes) -> None:
        """Send this host's parameter digest to the other islands and compare theirs.

        Raises:
            DigestMismatchError: a peer's digest differs (both are in the message).
        """
        self._run(self._compare(step, digest))
