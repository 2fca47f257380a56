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

The gradients travel in buckets (workers/exchange_overlap.py cuts them as the backward pass
produces them); every bucket is reduced on its own by the algorithm above, its parts keyed by
(step, bucket, part). The reduction is elementwise, so the bucketing changes no value: the
bytes are those of one whole-vector exchange, whatever the bucket size.

No needless copies: a chunk goes on the wire serialized by hand from a view of the host's
buffer (one copy, into the message bytes; `encode_chunk`), the reduction writes straight into
the output vector, and `copied_bytes` counts what the host copies per step (see
bench/dp_scaling.py's bytes-copied figure).

Nothing here goes through Ray, files or the controller; streams carry chunks of at most
`CHUNK_ELEMENTS` values. Waits have deadlines, and `Mailbox.abort(job, generation)` releases
them (the Abort rpc) without touching other jobs.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
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
# The most values a part may hold (64 GiB of float32): a bound on what a peer's chunk can
# make a host allocate, far above any part a job here sends.
MAX_PART_ELEMENTS = 1 << 34
# A step's exchange ends by its deadline (timeout_s) on the service's loop; the runtime
# thread waits this much longer before it takes the loop for gone (a host stopping).
RESULT_MARGIN_S = 30.0
DEFAULT_TIMEOUT_S = 120.0
# Gradient bytes per bucket of the overlapped exchange (measured: bench/dp_scaling.py
# --bucket-sweep on palm-small; README).
DEFAULT_BUCKET_BYTES = 4 << 20
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


def expected_payload_bytes(
    n: int, islands: int, island: int, bucket_sizes: Sequence[int] | None = None
) -> tuple[int, int]:
    """(sent, received) gradient payload bytes of one host on one step for n float32 values,
    exchanged in buckets of `bucket_sizes` values (default: one bucket of n)."""
    if islands < 2:
        return 0, 0
    sizes = [n] if bucket_sizes is None else list(bucket_sizes)
    assert sum(sizes) == n, (sum(sizes), n)
    sent = received = 0
    for size in sizes:
        start, stop = part_bounds(size, islands)[island]
        own = stop - start
        sent += (size - own) + own * (islands - 1)
        received += own * (islands - 1) + (size - own)
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
            values[key] = (
                flat[offset : offset + size].reshape(shape).astype(original.dtype, copy=False)
            )
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
    offsets: set[int] = dataclasses.field(default_factory=set)  # the chunks received


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
        # Checked before a slot is made for it (a part_size of 2**60 was allocated as asked).
        # (The phase is not: the stage links' phases are theirs, workers/stage_link.py.)
        if chunk.phase != PHASE_DIGEST and chunk.part_size > MAX_PART_ELEMENTS:
            raise ValueError(
                f"part_size={chunk.part_size} is more than {MAX_PART_ELEMENTS} values."
            )
        key = (
            chunk.job_id,
            chunk.generation,
            chunk.step,
            chunk.phase,
            chunk.source_island,
            chunk.part,
            chunk.bucket,
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
        # The chunks `_chunks` makes, each once: a part is complete when every value of it
        # came (counted values alone took a repeated chunk for a missing one, and the part
        # completed with what np.empty held).
        expected = min(CHUNK_ELEMENTS, chunk.part_size - chunk.offset)
        if (
            slot.buffer.size != chunk.part_size
            or chunk.offset % CHUNK_ELEMENTS
            or values.size != max(expected, 0)
            or (chunk.offset >= chunk.part_size and chunk.part_size)
        ):
            raise ValueError(
                f"chunk at offset {chunk.offset} with {values.size} values does not fit part "
                f"{chunk.part} of {slot.buffer.size} values in chunks of {CHUNK_ELEMENTS}."
            )
        if chunk.offset in slot.offsets:
            raise ValueError(f"chunk at offset {chunk.offset} of part {key} arrived twice.")
        slot.offsets.add(chunk.offset)
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
        self._raw: dict[str, Any] = {}
        self._channel_of: dict[str, grpc.aio.Channel] = {}
        self._channels: list[grpc.aio.Channel] = []

    def raw_exchange(self, address: str) -> Any:
        """ExchangeGradients taking chunks already serialized (`encode_chunk`)."""
        call = self._raw.get(address)
        if call is None:
            self.stub(address)
            call = self._raw[address] = self._channel_of[address].stream_unary(
                EXCHANGE_METHOD,
                request_serializer=None,
                response_deserializer=worker_pb2.ExchangeGradientsReply.FromString,
            )
        return call

    async def send_serialized(self, address: str, chunks: Sequence[bytes], timeout: float) -> None:
        """Stream chunks serialized by `encode_chunk` (`_chunks`) to `address`.

        gRPC's aio client swallows an error raised while it writes the request stream (a chunk
        that is not `bytes` fails its write) and only cancels the call: the caller's await
        then ends in CancelledError, nothing reaches the peer, and the peer's wait runs to its
        deadline. Both are turned into an ExchangeError here, at once, naming the cause. gRPC
        also cancels (rather than fails) a call whose deadline passes while a chunk is being
        written: that one ends as the DEADLINE_EXCEEDED it is.

        Raises:
            grpc.aio.AioRpcError: the call failed or passed its deadline (the callers map its
                status).
            ExchangeError: a chunk is not serialized bytes; gRPC cancelled the stream.
        """
        for chunk in chunks:
            if not isinstance(chunk, bytes):
                raise ExchangeError(
                    f"a chunk for {address} is a {type(chunk).__name__}, not serialized bytes "
                    "(exchange._chunks / encode_chunk)."
                )
        started = time.monotonic()
        call = self.raw_exchange(address)(iter(chunks), timeout=timeout, metadata=self.metadata())
        try:
            await call
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # our own cancellation (a failed step, an abort)
            if time.monotonic() - started >= timeout:
                # The deadline passed while a chunk was being written (a busy event loop):
                # gRPC cancels the call then instead of ending it in DEADLINE_EXCEEDED.
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.aio.Metadata(),
                    grpc.aio.Metadata(),
                    details=f"the stream to {address} passed its {timeout:.3f} s deadline",
                ) from None
            raise ExchangeError(
                f"the stream to {address} was cancelled by gRPC before it finished (a chunk "
                "could not be written)."
            ) from None

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
            self._channel_of[address] = channel
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
        self._raw.clear()
        self._channel_of.clear()


_DATA_TAG = b"\x4a"  # GradientChunk.data: field 9, length-delimited


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def encode_chunk(head: worker_pb2.GradientChunk, data: memoryview) -> bytes:
    """One serialized GradientChunk: `head`'s fields, then `data` copied once into the
    message (protobuf lets the fields come in any order), instead of `tobytes()` and then
    SerializeToString's second copy."""
    return b"".join((head.SerializeToString(), _DATA_TAG, _varint(len(data)), data))


def _chunks(head: dict[str, Any], values: np.ndarray, part: int, bucket: int = 0) -> list[bytes]:
    data = np.ascontiguousarray(values, dtype="<f4")
    size = data.size
    raw = memoryview(data).cast("B")
    return [
        encode_chunk(
            worker_pb2.GradientChunk(
                **head, part=part, offset=offset, part_size=size, bucket=bucket
            ),
            raw[4 * offset : 4 * min(offset + CHUNK_ELEMENTS, size)],
        )
        for offset in range(0, max(size, 1), CHUNK_ELEMENTS)
    ]


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
        # Bytes this host copied for the exchange since the last `reset_counters` (staging,
        # serialization, receiving, reduction output); bench/dp_scaling.py reports them.
        self.copied_bytes = 0
        self._lock = threading.Lock()

    def reset_counters(self) -> None:
        with self._lock:
            self.bytes_sent = 0
            self.copied_bytes = 0

    def count(self, *, sent: int = 0, copied: int = 0) -> None:
        with self._lock:
            self.bytes_sent += sent
            self.copied_bytes += copied

    def _head(self, step: int, phase: int) -> dict[str, Any]:
        return dict(
            job_id=self.job_id,
            generation=self.generation,
            step=step,
            source_island=self.island,
            phase=phase,
        )

    async def _send(
        self, island: int, chunks: list[bytes], deadline: float, payload: int = 0
    ) -> None:
        """Stream serialized chunks (`_chunks`) to `island`; `payload`: their data bytes."""
        left = deadline - time.monotonic()
        try:
            await self.peers.send_serialized(self.addresses[island], chunks, max(left, 0.001))
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
        self.count(sent=payload)

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

    async def _allreduce(self, step: int, flat: np.ndarray, bucket: int = 0) -> np.ndarray:
        deadline = time.monotonic() + self.timeout_s
        n, me, islands = flat.size, self.island, self.islands
        bounds = part_bounds(n, islands)
        lo, hi = bounds[me]
        key = (self.job_id, self.generation, step)
        # 1. reduce-scatter: part j of our gradients to island j; the others' part `me` here.
        sends = []
        for j, (a, b) in enumerate(bounds):
            if j != me:
                chunks = _chunks(self._head(step, PHASE_SCATTER), flat[a:b], j, bucket)
                sends.append(self._send(j, chunks, deadline, 4 * (b - a)))
        waits = [
            self.mailbox.wait((*key, PHASE_SCATTER, j, me, bucket), deadline - time.monotonic())
            for j in range(islands)
            if j != me
        ]
        results = await self._gather_all(sends + waits)
        received = iter(results[len(sends) :])
        contributions = [flat[lo:hi] if j == me else next(received) for j in range(islands)]
        for j, part in enumerate(contributions):
            if part.size != hi - lo:  # (numpy would broadcast a part of one value)
                raise ExchangeError(
                    f"island {j} sent part {me} of {part.size} values for job "
                    f"{self.job_id!r} step {step} bucket {bucket}, expected {hi - lo}: the "
                    "layouts differ."
                )
        # Island order 0, 1, ..., I - 1, float32 throughout: the same bytes wherever computed;
        # written straight into our part of the output (no staging copy).
        out = np.empty(n, np.float32)
        reduced = out[lo:hi]
        np.add(contributions[0], contributions[1], out=reduced)
        for part in contributions[2:]:
            np.add(reduced, part, out=reduced)
        np.divide(reduced, np.float32(islands), out=reduced)
        # 2. all-gather: our reduced part to everyone; theirs here.
        chunks = _chunks(self._head(step, PHASE_GATHER), reduced, me, bucket)
        others = [j for j in range(islands) if j != me]
        sends = [self._send(j, chunks, deadline, 4 * (hi - lo)) for j in others]
        waits = [
            self.mailbox.wait((*key, PHASE_GATHER, j, j, bucket), deadline - time.monotonic())
            for j in others
        ]
        results = await self._gather_all(sends + waits)
        for j, part in zip(others, results[len(sends) :], strict=True):
            a, b = bounds[j]
            if part.size != b - a:
                raise ExchangeError(
                    f"island {j} sent a reduced part of {part.size} values for job "
                    f"{self.job_id!r} step {step} bucket {bucket}, expected {b - a}: the "
                    "layouts differ."
                )
            out[a:b] = part
        # Serialized once per destination message, received once into the mailbox's part,
        # gathered parts copied into `out`.
        sent_values = (n - (hi - lo)) + (hi - lo) * (islands - 1)
        received_values = (hi - lo) * (islands - 1) + (n - (hi - lo))
        self.count(copied=4 * (sent_values + 2 * received_values - (hi - lo) * (islands - 1)))
        return out

    async def _compare(self, step: int, digest: bytes) -> None:
        deadline = time.monotonic() + self.timeout_s
        chunk = worker_pb2.GradientChunk(**self._head(step, PHASE_DIGEST), data=digest)
        others = [j for j in range(self.islands) if j != self.island]
        sends = [self._send(j, [chunk.SerializeToString()], deadline) for j in others]
        waits = [
            self.mailbox.wait(
                (self.job_id, self.generation, step, PHASE_DIGEST, j, 0, 0),
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
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:  # (every wait inside has the call's deadline: this one only if the loop died)
            return future.result(self.timeout_s + RESULT_MARGIN_S)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise ExchangeTimeoutError(
                f"job {self.job_id!r}'s exchange did not end within {self.timeout_s:.1f} s: "
                "the host's service loop is gone."
            ) from None

    def allreduce_mean(self, step: int, flat: np.ndarray) -> np.ndarray:
        """The islands' mean of `flat` (this host's shards), bitwise equal on every island.

        Raises:
            ExchangeError (and its subclasses): a peer failed, a deadline passed, an abort.
        """
        self.reset_counters()
        return self._run(self._allreduce(step, np.asarray(flat, np.float32)))

    def start_allreduce(
        self, step: int, bucket: int, flat: np.ndarray
    ) -> concurrent.futures.Future:
        """Start the islands' mean of one bucket (`flat` must stay unchanged until done) on
        the service's loop and return at once: the future's result is the reduced bucket,
        bitwise equal on every island; its exception an ExchangeError."""
        return asyncio.run_coroutine_threadsafe(self._allreduce(step, flat, bucket), self.loop)

    def compare_digest(self, step: int, digest: bytes) -> None:
        """Send this host's parameter digest to the other islands and compare theirs.

        Raises:
            DigestMismatchError: a peer's digest differs (both are in the message).
        """
        self._run(self._compare(step, digest))
