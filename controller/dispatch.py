"""Asynchronous dispatch of a job's per-step program to the hosts of its islands (grpc.aio).

A job becomes a per-step program: for every step the controller sends
`RunStep(job, generation, step, island_seq, epoch)` to every host of the job's islands, keeps
a bounded window of steps in flight (default 2: step k + 1 is on the wire before step k has
finished) and consumes the replies as futures, in step order. The controller sends step
numbers, never data: each island reads its own slice of the step's global batch, and the
islands exchange gradients among themselves (workers/exchange.py): at load the controller
tells host i of every island the addresses of host i of the others (`peers`). A client
interceptor on the controller's channels counts its RPC bytes (`RPC_BYTES`), which do not grow
with the model.

`palm_program` resolves a job spec once (controller/spec.py's `to_configs`) into what the hosts
load: the PalmConfig and OptimConfig field dicts, the train fields, and the dataset the
controller prepared where every host can read it, with its content hash.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf import struct_pb2

from pathways_lite.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from pathways_lite.workers.host import WORKER_WIRE_VERSION

logger = logging.getLogger(__name__)

DEFAULT_WINDOW = 2
# Deadlines of worker RPCs: a step may wait behind a compile of another job on the island.
STEP_TIMEOUT_S = 600.0
LOAD_TIMEOUT_S = 900.0
INFO_TIMEOUT_S = 30.0
ABORT_TIMEOUT_S = 10.0
# After one host of a step failed, how long the others get to answer before the step is
# given up (they may be waiting on the failed one).
FAIL_FAST_GRACE_S = 2.0
_NOT_ANSWERED = object()
# Parameter digests are compared every step below this many parameters, else every
# DIGEST_EVERY_LARGE steps (a digest reads every parameter back to the host).
DIGEST_EVERY_STEP_MAX_PARAMS = 200_000_000
DIGEST_EVERY_LARGE = 100


class RpcByteCounter(grpc.aio.UnaryUnaryClientInterceptor):
    """Counts the serialized request and reply bytes of unary calls, per method."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()

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


class DispatchError(RuntimeError):
    """A job's step program could not continue.

    Attributes:
        reason: short machine-readable cause (`load_failed`, `step_failed`, `nan_loss`...).
        code: the gRPC status of the failed call, if one failed.
    """

    def __init__(self, reason: str, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.code = code


@dataclasses.dataclass
class HostHandle:
    """A connection to one island host's worker service."""

    address: str
    channel: grpc.aio.Channel
    stub: worker_pb2_grpc.WorkerServiceStub
    info: worker_pb2.InfoReply

    async def close(self) -> None:
        await self.channel.close()


async def connect_host(
    address: str, *, timeout_s: float = INFO_TIMEOUT_S, wire_version: int = WORKER_WIRE_VERSION
) -> HostHandle:
    """Open a channel to a host, read its Info and check its wire version.

    Raises:
        WireVersionError: the host reports another worker wire version.
        grpc.aio.AioRpcError: the host does not answer.
    """
    channel = grpc.aio.insecure_channel(address, interceptors=[RPC_BYTES])
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
    return HostHandle(address, channel, stub, info)


@dataclasses.dataclass
class Island:
    """An island as the dispatcher drives it: its hosts and its island_seq counter.

    Every host of an island receives the same island_seq for a step; the numbers are
    contiguous per island within one controller epoch (the hosts restart at 0 on a new one).
    """

    id: str
    hosts: list[HostHandle]
    next_seq: int = 0

    @property
    def devices(self) -> int:
        return int(self.hosts[0].info.island_device_count) if self.hosts else 0

    def take_seq(self) -> int:
        seq = self.next_seq
        self.next_seq += 1
        return seq

    async def close(self) -> None:
        for host in self.hosts:
            await host.close()


@dataclasses.dataclass(frozen=True)
class HostStep:
    """One host's reply to one step, with the host's own timestamps."""

    island: str
    host_index: int
    reply: worker_pb2.RunStepReply


@dataclasses.dataclass(frozen=True)
class StepReport:
    """A completed step of a job over all its islands.

    Attributes:
        step: the step number.
        loss: the global batch's mean loss (the mean of the islands' equal-sized slices).
        tokens_per_s: tokens of the global batch over `step_time_s`.
        step_time_s: from the first host starting the step to the last one finishing it.
        hosts: every host's reply, island by island, host by host.
        checkpoints_committed: steps of the checkpoints island 0's host 0 has committed.
    """

    step: int
    loss: float
    tokens_per_s: float
    step_time_s: float
    hosts: tuple[HostStep, ...]
    checkpoints_committed: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class StepProgram:
    """What the dispatcher runs: a loaded job stepped from `start_step` to `steps`.

    Attributes:
        job_id: the job's id.
        generation: its restart generation.
        steps: total steps of the job.
        tokens_per_step: tokens of one global batch (for throughput).
        load: builds the LoadJobRequest of island `i` of `n` (epoch is filled in later).
        start_step: the first step to run (after a resume).
    """

    job_id: str
    generation: int
    steps: int
    tokens_per_step: int
    load: Callable[[int, int], worker_pb2.LoadJobRequest]
    start_step: int = 0
    # Checkpoints (controller/recovery.py): with `checkpointing`, the hosts checkpoint after
    # every `checkpoint_every` steps (0: none in between) and after the last step.
    checkpoint_every: int = 0
    checkpointing: bool = False

    def checkpoint_after(self, step: int) -> bool:
        """Whether the hosts checkpoint the state after `step`."""
        done = step + 1
        every = self.checkpoint_every
        return self.checkpointing and (done == self.steps or (every > 0 and done % every == 0))


OnStep = Callable[[StepReport], Awaitable[None] | None]


class Dispatcher:
    """Drives step programs on islands with a bounded window of steps in flight.

    Args:
        epoch: this controller run's epoch, carried in every worker RPC.
        window: steps in flight per job (1 = synchronous dispatch).
        step_timeout_s: deadline of one RunStep.
    """

    def __init__(
        self, epoch: int, *, window: int = DEFAULT_WINDOW, step_timeout_s: float = STEP_TIMEOUT_S
    ) -> None:
        if window < 1:
            raise ValueError(f"window={window} must be at least 1.")
        self.epoch = epoch
        self.window = window
        self.step_timeout_s = step_timeout_s

    async def load(
        self, program: StepProgram, islands: Sequence[Island], *, dry_run: bool = False
    ) -> list[worker_pb2.LoadJobReply]:
        """LoadJob on every host of every island at once (a multi-host island compiles
        together); replies island by island, host by host.

        Raises:
            DispatchError: a host refused or failed the load (reason `load_failed`).
        """
        hosts_per_island = {len(island.hosts) for island in islands}
        if len(islands) > 1 and len(hosts_per_island) != 1:
            raise DispatchError(
                "load_failed",
                f"job {program.job_id!r} spans islands with different host counts "
                f"{sorted(hosts_per_island)}: host i of every island exchanges with host i.",
            )
        calls = []
        for index, island in enumerate(islands):
            for host_index, host in enumerate(island.hosts):
                request = program.load(index, len(islands))
                request.epoch = self.epoch
                request.dry_run = dry_run
                if len(islands) > 1:
                    # Host i's counterparts: host i of every island, island order.
                    del request.peers[:]
                    request.peers.extend(i.hosts[host_index].address for i in islands)
                calls.append(host.stub.LoadJob(request, timeout=LOAD_TIMEOUT_S))
        results = await asyncio.gather(*calls, return_exceptions=True)
        for result in results:
            if isinstance(result, grpc.aio.AioRpcError):
                raise DispatchError(
                    "load_failed",
                    f"loading job {program.job_id!r} failed: {result.details()}",
                    result.code(),
                )
            if isinstance(result, BaseException):
                raise result
        return list(results)

    async def abort(
        self, job_id: str, generation: int, islands: Sequence[Island], reason: str
    ) -> None:
        """Abort(job, generation) on every host: releases exchanges waiting on a peer that
        will not send (best effort; errors are logged)."""
        request = worker_pb2.AbortRequest(job_id=job_id, generation=generation, reason=reason)
        calls = [
            host.stub.Abort(request, timeout=ABORT_TIMEOUT_S)
            for island in islands
            for host in island.hosts
        ]
        for result in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(result, BaseException):
                logger.warning("aborting job %s: %r", job_id, result)

    async def unload(self, job_id: str, islands: Sequence[Island]) -> None:
        """UnloadJob on every host; errors are logged, not raised (best effort cleanup)."""
        calls = [
            host.stub.UnloadJob(
                worker_pb2.UnloadJobRequest(job_id=job_id, epoch=self.epoch), timeout=60
            )
            for island in islands
            for host in island.hosts
        ]
        for result in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(result, BaseException):
                logger.warning("unloading job %s: %r", job_id, result)

    async def fill_gaps(self, islands: Sequence[Island]) -> None:
        """SkipSeq every island_seq a host has not received (a step whose RunStep never
        arrived), so the island's next step is not held up by the hole."""
        for island in islands:
            for host in island.hosts:
                try:
                    info = await host.stub.Info(worker_pb2.InfoRequest(), timeout=INFO_TIMEOUT_S)
                    if info.newest_epoch != self.epoch:
                        continue
                    for seq in range(info.next_island_seq, island.next_seq):
                        await host.stub.SkipSeq(
                            worker_pb2.SkipSeqRequest(
                                island_seq=seq, epoch=self.epoch, reason="step not delivered"
                            ),
                            timeout=INFO_TIMEOUT_S,
                        )
                except grpc.aio.AioRpcError as e:
                    logger.warning("filling island_seq gaps on %s: %s", host.address, e.details())

    def _send(
        self, program: StepProgram, step: int, islands: Sequence[Island]
    ) -> list[tuple[str, int, asyncio.Task]]:
        calls = []
        for island in islands:
            seq = island.take_seq()
            request = worker_pb2.RunStepRequest(
                job_id=program.job_id,
                generation=program.generation,
                step=step,
                island_seq=seq,
                epoch=self.epoch,
                checkpoint=program.checkpoint_after(step),
            )
            for host in island.hosts:
                call = host.stub.RunStep(request, timeout=self.step_timeout_s)
                calls.append((island.id, host.info.host_index, asyncio.ensure_future(call)))
        return calls

    async def run(
        self,
        program: StepProgram,
        islands: Sequence[Island],
        *,
        on_step: OnStep | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        gate: Any = None,
    ) -> int:
        """Run the program's steps with up to `window` steps in flight; returns the number of
        steps completed (less than the program's when `should_stop` turned true).

        With a `gate` (controller/scheduler.py's Scheduler), every step first waits for a
        step slot on all of the job's islands (`gate.acquire(job_id)`; False stops the
        program) and frees it when its hosts have finished (`gate.done`), so jobs sharing
        islands take turns in the order the scheduler grants.

        Raises:
            DispatchError: a step failed on a host (reason `step_failed`) or gave a
                non-finite loss (reason `nan_loss`); steps already in flight are drained.
        """
        pending: collections.deque = collections.deque()
        next_step = program.start_step
        completed = 0
        try:
            while True:
                while next_step < program.steps and len(pending) < self.window:
                    if should_stop():
                        break
                    if gate is not None:
                        if not await gate.acquire(program.job_id):
                            break
                        if should_stop():
                            gate.done(program.job_id, [i.id for i in islands], None)
                            break
                    calls = self._send(program, next_step, islands)
                    if gate is not None:
                        _release_when_done(gate, program.job_id, islands, calls)
                    pending.append((next_step, calls))
                    next_step += 1
                if not pending:
                    return completed
                step, calls = pending.popleft()
                report = await self._collect(program, step, calls)
                completed += 1
                if on_step is not None:
                    result = on_step(report)
                    if inspect.isawaitable(result):
                        await result
        except BaseException as e:
            # Release hosts waiting in an exchange on a peer whose step will not come.
            if len(islands) > 1:
                await self.abort(
                    program.job_id,
                    program.generation,
                    islands,
                    f"the controller stopped the step program: {e!r}"[:200],
                )
            # Let the steps already sent settle (the hosts run them anyway), then clean up.
            for _, calls in pending:
                for *_, task in calls:
                    task.cancel()
            await asyncio.gather(
                *(task for _, calls in pending for *_, task in calls), return_exceptions=True
            )
            await self.fill_gaps(islands)
            raise

    async def _collect(
        self, program: StepProgram, step: int, calls: list[tuple[str, int, asyncio.Task]]
    ) -> StepReport:
        tasks = [task for *_, task in calls]
        _, waiting = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        if waiting:
            # A host failed: the others may wait on it (an exchange, a multi-host island's
            # collective). Give them a moment, then stop waiting: `run` aborts the exchanges.
            _, waiting = await asyncio.wait(waiting, timeout=FAIL_FAST_GRACE_S)
            for task in waiting:
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
        results = [
            _NOT_ANSWERED if task.cancelled() else (task.exception() or task.result())
            for task in tasks
        ]
        hosts = []
        for (island, host_index, _), result in zip(calls, results, strict=True):
            if (
                isinstance(result, grpc.aio.AioRpcError)
                and result.code() == grpc.StatusCode.DATA_LOSS
            ):
                raise DispatchError(
                    "silent_data_corruption",
                    f"step {step} of job {program.job_id!r} on island {island} host "
                    f"{host_index}: {result.details()}",
                    result.code(),
                )
        for (island, host_index, _), result in zip(calls, results, strict=True):
            if isinstance(result, grpc.aio.AioRpcError):
                raise DispatchError(
                    "step_failed",
                    f"step {step} of job {program.job_id!r} failed on island {island} host "
                    f"{host_index}: {result.details()}",
                    result.code(),
                )
            if result is _NOT_ANSWERED:
                raise DispatchError(
                    "step_failed",
                    f"step {step} of job {program.job_id!r} got no answer from island {island} "
                    f"host {host_index} after another host failed.",
                    grpc.StatusCode.UNAVAILABLE,
                )
            if isinstance(result, BaseException):
                raise result
            hosts.append(HostStep(island, host_index, result))
        # Host 0 of each island reports its island's mean loss; the islands' slices are equal.
        island_losses = [h.reply.loss for h in hosts if h.host_index == 0]
        loss = sum(island_losses) / len(island_losses)
        if loss != loss or loss in (float("inf"), float("-inf")):
            raise DispatchError(
                "nan_loss", f"step {step} of job {program.job_id!r} gave loss {loss}."
            )
        start_ns = min(h.reply.timings.start_unix_ns for h in hosts)
        end_ns = max(h.reply.timings.end_unix_ns for h in hosts)
        step_time_s = max(end_ns - start_ns, 1) / 1e9
        return StepReport(
            step=step,
            loss=loss,
            tokens_per_s=program.tokens_per_step / step_time_s,
            step_time_s=step_time_s,
            hosts=tuple(hosts),
            checkpoints_committed=tuple(hosts[0].reply.checkpoints_committed),
        )


def _release_when_done(
    gate: Any, job_id: str, islands: Sequence[Island], calls: list[tuple[str, int, asyncio.Task]]
) -> None:
    """Call `gate.done` once every host has answered the step (whether or not the
    controller has read the replies yet), with the step's host-measured seconds."""
    left = [len(calls)]

    def finished(_: asyncio.Task) -> None:
        left[0] -= 1
        if left[0]:
            return
        step_s = None
        for *_, task in calls:
            if not task.cancelled() and task.exception() is None:
                t = task.result().timings
                step_s = max(step_s or 0.0, (t.end_unix_ns - t.start_unix_ns) / 1e9)
        gate.done(job_id, [i.id for i in islands], step_s)

    for *_, task in calls:
        task.add_done_callback(finished)


# ---- the step program of a PaLM job --------------------------------------------------------


def config_struct(values: dict[str, Any]) -> struct_pb2.Struct:
    """A config dataclass's field dict as a protobuf Struct (what the hosts rebuild from)."""
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def config_protos(
    preset: str, model_cfg: Any, optim_cfg: Any
) -> tuple[common_pb2.ModelConfig, common_pb2.OptimizerConfig]:
    """The model and optimizer as hosts load them: the preset's name and every resolved field
    of the PalmConfig and OptimConfig (hosts never resolve a preset themselves)."""
    return (
        common_pb2.ModelConfig(preset=preset, config=config_struct(model_cfg.to_dict())),
        common_pb2.OptimizerConfig(config=config_struct(dataclasses.asdict(optim_cfg))),
    )


def default_digest_every(model_cfg: Any) -> int:
    """Every step for small models; every DIGEST_EVERY_LARGE steps for large ones."""
    from pathways_lite.model.estimates import param_count

    return 1 if param_count(model_cfg) <= DIGEST_EVERY_STEP_MAX_PARAMS else DIGEST_EVERY_LARGE


def palm_program(record: Any) -> StepProgram:
    """A PaLM job's step program: the spec resolved once into the configs the hosts load.

    Prepares (or opens the cached) dataset in the controller's cache, which every host can
    read; the hosts get its folder and content hash and verify it, and read their own
    slices of every step's batch.

    Raises:
        SpecError: the spec does not validate.
    """
    from pathways_lite.model.data import prepare_dataset

    from . import spec as spec_lib

    spec = record.spec
    configs = spec_lib.to_configs(spec)
    dataset = prepare_dataset(configs.data, seq_len=configs.train.seq_len)
    # The model embeds exactly the tokenizer's vocabulary unless the spec overrides it.
    configs = spec_lib.to_configs(spec, vocab_size=dataset.tokenizer.vocab_size)
    logger.info(
        "job %s reads dataset %s (%d examples)",
        record.id,
        dataset.hash[:12],
        dataset.num_examples,
        extra={"job_id": record.id},
    )
    train = configs.train
    digest_every = spec_lib.digest_every(spec)
    if digest_every is None:
        digest_every = default_digest_every(configs.model)
    model, optimizer = config_protos(spec.model.preset, configs.model, configs.optim)
    data = common_pb2.DataSpec(
        source="dataset", paths=[str(dataset.path)], tokenizer_hash=dataset.tokenizer.hash
    )

    def load(island_index: int, num_islands: int) -> worker_pb2.LoadJobRequest:
        return worker_pb2.LoadJobRequest(
            job_id=record.id,
            generation=record.generation,
            model=model,
            mesh=common_pb2.MeshShape(data=spec.mesh.data, model=spec.mesh.model),
            optimizer=optimizer,
            data=data,
            data_hash=dataset.hash,
            seed=train.seed,
            global_batch=train.global_batch,
            seq_len=train.seq_len,
            island_index=island_index,
            num_islands=num_islands,
            digest_every=digest_every,
        )

    return StepProgram(
        job_id=record.id,
        generation=record.generation,
        steps=train.steps,
        tokens_per_step=train.global_batch * train.seq_len,
        load=load,
        checkpoint_every=max(0, spec.train.checkpoint_every),
    )
