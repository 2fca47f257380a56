"""The gRPC worker service of an island host (grpc.aio): ordering rules around a JobRuntime.

The servicer validates every request at the boundary, enforces the controller epoch and the
per-island sequence numbers, makes RunStep idempotent on (job, generation, step), and runs
the job runtime's blocking JAX work in one worker thread, so Info and the standard health
service answer while a step runs. It knows nothing of Ray.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from pathways_lite.v1 import common_pb2, worker_pb2, worker_pb2_grpc

from .checkpoint import CheckpointError, CheckpointWriter, checkpoint_path
from .exchange import (
    DEFAULT_TIMEOUT_S,
    MAX_MESSAGE_BYTES,
    ByteCounter,
    DigestMismatchError,
    ExchangeAbortedError,
    ExchangeError,
    ExchangeTimeoutError,
    JobExchange,
    Mailbox,
    Peers,
)
from .runtime import (
    JOB_ID_RE,
    JobRuntime,
    JobSpec,
    JobSpecError,
    MemoryReport,
    MeshSpec,
    RuntimeUnavailableError,
    StepResult,
    make_runtime,
)

logger = logging.getLogger(__name__)

# Bumped on every incompatible change of worker.proto; the controller compares it at connect.
WORKER_WIRE_VERSION = 2
SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name
# Recorded step results kept per job for idempotent retries (older ones are forgotten).
MAX_RECORDED_STEPS = 1024
# How long a RunStep whose island_seq is ahead of the next expected one waits for the missing
# numbers to arrive (concurrent RunSteps of a dispatch window may overtake each other on the
# wire) before it is rejected as a gap.
SEQ_GAP_WAIT_S = 2.0
# Executed steps kept in the host's execution log (ExecutionLog rpc).
EXECUTION_LOG_STEPS = 8192

RuntimeFactory = Callable[[JobSpec, Sequence[Any]], JobRuntime]


@dataclass(frozen=True)
class DeviceRecord:
    """One device as the host reports it."""

    id: int
    platform: str
    kind: str
    process_index: int


@dataclass(frozen=True)
class HostMetadata:
    """What an island host is, gathered once at start (the port is filled in at bind)."""

    island: str
    host_index: int
    num_hosts: int
    node_ip: str
    node_id: str
    pid: int
    devices: tuple[DeviceRecord, ...]
    island_device_count: int
    memory_budget_bytes_per_device: int
    port: int = 0
    wire_version: int = WORKER_WIRE_VERSION
    # Measured matmul FLOP/s of one accelerator (0 on CPU hosts).
    peak_flops_per_device: float = 0.0

    @property
    def address(self) -> str:
        return f"{self.node_ip}:{self.port}"

    @classmethod
    def in_process(
        cls, island: str, devices: Sequence[Any], budget_bytes_per_device: int
    ) -> HostMetadata:
        """A one-host island served by this process on loopback (tests, benchmarks, a GPU
        check without Ray): every device of `devices`, this process's pid."""
        return cls(
            island=island,
            host_index=0,
            num_hosts=1,
            node_ip="127.0.0.1",
            node_id="local",
            pid=os.getpid(),
            devices=tuple(DeviceRecord(d.id, d.platform, d.device_kind, 0) for d in devices),
            island_device_count=len(devices),
            memory_budget_bytes_per_device=budget_bytes_per_device,
        )


def default_memory_budget(devices: Sequence[Any]) -> int:
    """Bytes per device a host may fill: the accelerator's own limit (`memory_stats()`'s
    `bytes_limit` on GPUs), else half the machine's RAM shared by its (simulated) devices."""
    stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // (2 * len(devices))


class RpcRejection(Exception):
    """A request refused with a gRPC status; the message is a sentence naming the value."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class _Job:
    runtime: JobRuntime
    spec: JobSpec
    request: worker_pb2.LoadJobRequest
    reply: worker_pb2.LoadJobReply
    # (generation, step) -> recorded reply or rejection, oldest first.
    results: collections.OrderedDict = dataclasses.field(default_factory=collections.OrderedDict)
    # (generation, step) -> future of a step that is queued or running.
    inflight: dict = dataclasses.field(default_factory=dict)
    # Orbax checkpoint writer (island 0's hosts of a job with a checkpoint_dir), made at the
    # first save; closing it waits for the save in progress.
    writer: CheckpointWriter | None = None


def _rpc(method):
    """Turn RpcRejection into its status and any other exception into INTERNAL."""

    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except RpcRejection as e:
            await context.abort(e.code, e.message)
        except Exception as e:  # a bug must not take the server down
            if isinstance(e, asyncio.CancelledError):
                raise
            logger.exception("%s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__} failed: {e!r}")

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper


async def _run_on(executor: concurrent.futures.Executor, fn: Callable[..., Any], *args, **kw):
    """Await `fn(*args, **kw)` run on `executor` (off the event loop)."""
    return await asyncio.get_running_loop().run_in_executor(executor, lambda: fn(*args, **kw))


def _check_job_id(job_id: str) -> None:
    if not JOB_ID_RE.match(job_id):
        raise RpcRejection(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"job_id={job_id[:80]!r} must be 1-128 characters of [A-Za-z0-9._-].",
        )


def _memory_proto(report: MemoryReport) -> common_pb2.MemoryAnalysis:
    return common_pb2.MemoryAnalysis(
        argument_bytes=report.argument_bytes,
        output_bytes=report.output_bytes,
        temp_bytes=report.temp_bytes,
        generated_code_bytes=report.generated_code_bytes,
        alias_bytes=report.alias_bytes,
        total_bytes=report.total_bytes,
    )


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    """The worker service of one island host.

    Args:
        metadata: The host's metadata (port 0 until `set_port`).
        devices: The island's devices in mesh order (all hosts' devices in a multi-host
            island), handed to the runtime factory.
        runtime_factory: Builds a job's runtime; raises JobSpecError for a bad field and
            RuntimeUnavailableError when the host cannot run the model.
    """

    def __init__(
        self,
        metadata: HostMetadata,
        devices: Sequence[Any],
        runtime_factory: RuntimeFactory = make_runtime,
    ) -> None:
        self.metadata = metadata
        self._devices = list(devices)
        self._runtime_factory = runtime_factory
        self._jobs: dict[str, _Job] = {}
        self._newest_epoch = 0
        self._next_seq = 0
        self._running_job = ""
        # One thread runs every JAX call that touches the devices (steps, state in and out),
        # so they never overlap; loading a job's data and compiling its step touch no device
        # state and run on a thread of their own, so the island's other jobs keep stepping.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="island-runtime"
        )
        self._compile_executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="island-compile"
        )
        self._device_lock: asyncio.Lock | None = None
        # Set (and replaced) whenever _next_seq or the epoch changes; RunSteps ahead wait on it.
        self._seq_event: asyncio.Event | None = None
        # Gradient exchange between islands: parts received from peers, channels to them,
        # and the interceptor that counts received exchange bytes (installed by `serve`).
        self.mailbox = Mailbox()
        self.peers = Peers()
        self.byte_counter = ByteCounter()
        # Every executed step: (job, generation, step, island_seq, start, end, epoch).
        self.execution_log: collections.deque[worker_pb2.ExecutionEntry] = collections.deque(
            maxlen=EXECUTION_LOG_STEPS
        )

    def set_port(self, port: int) -> None:
        self.metadata = dataclasses.replace(self.metadata, port=port)

    def close(self) -> None:
        """Unload every job and stop the runtime thread."""
        for job in self._jobs.values():
            try:
                if job.writer is not None:
                    job.writer.close()
                job.runtime.unload()
            except Exception:
                logger.exception("unloading job %s failed", job.spec.job_id)
        self._jobs.clear()
        self._compile_executor.shutdown(wait=True, cancel_futures=True)
        self._executor.shutdown(wait=True, cancel_futures=True)

    def job_runtime(self, job_id: str) -> JobRuntime:
        """The runtime of a loaded job (for the host's diagnostics; not a wire operation).

        Raises:
            KeyError: the job is not loaded.
        """
        job = self._jobs.get(job_id)
        if job is None:
            raise KeyError(f"job_id={job_id!r} is not loaded on this host.")
        return job.runtime

    # ---- helpers -------------------------------------------------------------------------

    @property
    def _lock(self) -> asyncio.Lock:
        if self._device_lock is None:  # created on the serving loop
            self._device_lock = asyncio.Lock()
        return self._device_lock

    def _seq_advanced(self) -> None:
        """Wake RunSteps waiting for an earlier island_seq to arrive."""
        if self._seq_event is not None:
            self._seq_event.set()
            self._seq_event = None

    async def _wait_for_seq(self, island_seq: int, epoch: int, timeout_s: float) -> None:
        """Wait until every number before `island_seq` was received (or the epoch changed)."""
        deadline = time.monotonic() + timeout_s
        while island_seq > self._next_seq and epoch == self._newest_epoch:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if self._seq_event is None:
                self._seq_event = asyncio.Event()
            try:
                await asyncio.wait_for(self._seq_event.wait(), left)
            except TimeoutError:
                return

    async def _on_runtime_thread(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return await _run_on(self._executor, fn, *args, **kw)

    async def _on_compile_thread(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return await _run_on(self._compile_executor, fn, *args, **kw)

    def _check_epoch(self, epoch: int) -> None:
        """Reject a stale epoch; a newer one is adopted and starts a fresh island sequence."""
        if epoch < self._newest_epoch:
            raise RpcRejection(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"epoch={epoch} is older than the newest controller epoch "
                f"{self._newest_epoch} this host has seen.",
            )
        if epoch > self._newest_epoch:
            logger.info(
                "controller epoch %d replaces %d; island sequence restarts at 0",
                epoch,
                self._newest_epoch,
            )
            self._newest_epoch = epoch
            self._next_seq = 0
            self._seq_advanced()
            # Steps of the old controller may wait in an exchange on a peer that will never
            # send (it died between its RunSteps): release them, they are stale now.
            for job in self._jobs.values():
                self.mailbox.abort(
                    job.spec.job_id, job.spec.generation, f"controller epoch {epoch} started"
                )

    def _job(self, job_id: str) -> _Job:
        _check_job_id(job_id)
        job = self._jobs.get(job_id)
        if job is None:
            raise RpcRejection(
                grpc.StatusCode.NOT_FOUND, f"job_id={job_id!r} is not loaded on this host."
            )
        return job

    def _spec(self, request: worker_pb2.LoadJobRequest) -> JobSpec:
        """Decode and check a LoadJobRequest's fields (INVALID_ARGUMENT naming the value)."""

        def bad(message: str) -> RpcRejection:
            return RpcRejection(grpc.StatusCode.INVALID_ARGUMENT, message)

        _check_job_id(request.job_id)
        if not request.model.preset:
            raise bad("model.preset is empty; name a model preset.")
        mesh = MeshSpec(request.mesh.data, request.mesh.model)
        if mesh.data < 1 or mesh.model < 1:
            raise bad(f"mesh data={mesh.data}, model={mesh.model} must both be positive.")
        if mesh.size != self.metadata.island_device_count:
            raise bad(
                f"mesh data={mesh.data} x model={mesh.model} = {mesh.size} devices does not "
                f"match this island's {self.metadata.island_device_count} devices."
            )
        if request.num_islands < 1:
            raise bad(f"num_islands={request.num_islands} must be at least 1.")
        if request.island_index >= request.num_islands:
            raise bad(
                f"island_index={request.island_index} is out of range for "
                f"num_islands={request.num_islands}."
            )
        if request.global_batch < 1 or request.global_batch % request.num_islands:
            raise bad(
                f"global_batch={request.global_batch} must be positive and divisible by "
                f"num_islands={request.num_islands}."
            )
        if request.seq_len < 1:
            raise bad(f"seq_len={request.seq_len} must be positive.")
        if not request.data_hash:
            raise bad("data_hash is empty; the host verifies the dataset against it.")
        peers = tuple(request.peers)
        if peers and len(peers) != request.num_islands:
            raise bad(
                f"peers has {len(peers)} addresses but num_islands={request.num_islands}: give "
                "one per island (this host's own included) or none."
            )
        if not request.exchange_timeout_s >= 0:
            raise bad(f"exchange_timeout_s={request.exchange_timeout_s!r} must be >= 0.")
        try:
            overrides = json_format.MessageToDict(request.model.overrides)
            model_config = json_format.MessageToDict(request.model.config)
            optim_config = json_format.MessageToDict(request.optimizer.config)
            data = json_format.MessageToDict(request.data, preserving_proto_field_name=True)
        except Exception as e:
            raise bad(f"model, optimizer or data fields do not decode: {e}.") from e
        return JobSpec(
            job_id=request.job_id,
            generation=request.generation,
            preset=request.model.preset,
            overrides=overrides,
            mesh=mesh,
            model_config=model_config,
            optim_config=optim_config,
            data=data,
            data_hash=request.data_hash,
            seed=request.seed,
            global_batch=request.global_batch,
            seq_len=request.seq_len,
            island_index=request.island_index,
            num_islands=request.num_islands,
            peers=peers,
            digest_every=request.digest_every,
            exchange_timeout_s=request.exchange_timeout_s or DEFAULT_TIMEOUT_S,
        )

    def _make_exchange(self, runtime: JobRuntime, spec: JobSpec) -> None:
        """Give a runtime of a job on several islands its exchange with the peers (without
        peers, an island trains on its slice alone: the wiring tests of the probe job)."""
        if spec.num_islands < 2 or not spec.peers:
            return
        if not runtime.supports_exchange:
            raise JobSpecError(
                f"model.preset={spec.preset!r} cannot train across islands: its runtime does "
                f"not exchange gradients (num_islands={spec.num_islands})."
            )
        self.mailbox.clear_abort(spec.job_id, spec.generation)
        runtime.exchange = JobExchange(
            asyncio.get_running_loop(),
            self.mailbox,
            self.peers,
            job_id=spec.job_id,
            generation=spec.generation,
            island_index=spec.island_index,
            addresses=spec.peers,
            timeout_s=spec.exchange_timeout_s,
        )

    # ---- RPCs ----------------------------------------------------------------------------

    @_rpc
    async def LoadJob(self, request: worker_pb2.LoadJobRequest, context) -> Any:
        """Validate, check memory, compile; keep the job unless dry_run."""
        spec = self._spec(request)
        self._check_epoch(request.epoch)
        existing = self._jobs.get(spec.job_id)
        if existing is not None and not request.dry_run:
            if existing.spec.generation > spec.generation:
                raise RpcRejection(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"generation={spec.generation} of job {spec.job_id!r} is older than the "
                    f"loaded generation {existing.spec.generation}.",
                )
            if existing.spec.generation == spec.generation:
                if existing.request == request or _same_except_epoch(existing.request, request):
                    return existing.reply  # a retried load
                raise RpcRejection(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"job {spec.job_id!r} generation {spec.generation} is already loaded with "
                    "a different spec; bump the generation to replace it.",
                )

        def prepare() -> tuple[JobRuntime, str, int]:
            # Opening (or preparing) the dataset and estimating memory can take seconds:
            # off the event loop (Info and health keep answering) and off the runtime thread
            # (the island's other jobs keep stepping).
            runtime = self._runtime_factory(spec, self._devices)
            return runtime, runtime.data_hash(), int(runtime.estimate_bytes_per_device())

        try:
            runtime, expected_hash, estimate = await self._on_compile_thread(prepare)
            self._make_exchange(runtime, spec)
        except JobSpecError as e:
            raise RpcRejection(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
        except RuntimeUnavailableError as e:
            raise RpcRejection(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from e
        if spec.data_hash != expected_hash:
            raise RpcRejection(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"data_hash={spec.data_hash!r} does not match the content hash "
                f"{expected_hash!r} of the data this host reads.",
            )
        budget = self.metadata.memory_budget_bytes_per_device
        if estimate > budget:
            raise RpcRejection(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"job {spec.job_id!r} needs an estimated {estimate} bytes per device, more "
                f"than this island's budget of {budget} bytes per device.",
            )
        if existing is not None and not request.dry_run:
            # The replaced generation's steps may wait on a dead peer: release the lock.
            self.mailbox.abort(
                spec.job_id, existing.spec.generation, f"generation {spec.generation} loads"
            )
        started = time.perf_counter()
        try:
            # The compile touches no device state: the island's other jobs keep stepping.
            report = await self._on_compile_thread(runtime.compile)
        except JobSpecError as e:
            raise RpcRejection(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
        if report is None or not request.dry_run:
            async with self._lock:
                if existing is not None and not request.dry_run:
                    if existing.writer is not None:
                        await self._on_runtime_thread(existing.writer.close)
                    await self._on_runtime_thread(existing.runtime.unload)
                    self._jobs.pop(spec.job_id, None)
                try:
                    report = await self._on_runtime_thread(runtime.load, dry_run=request.dry_run)
                except JobSpecError as e:
                    raise RpcRejection(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
                finally:
                    if request.dry_run:
                        await self._on_runtime_thread(runtime.unload)
                compile_s = time.perf_counter() - started
                if request.restore_from and not request.dry_run:
                    await self._restore(runtime, request.restore_from)
        else:
            compile_s = time.perf_counter() - started
        reply = worker_pb2.LoadJobReply(
            job_id=spec.job_id,
            loaded=not request.dry_run,
            memory=_memory_proto(report),
            estimate_bytes_per_device=estimate,
            budget_bytes_per_device=budget,
            compile_s=compile_s,
        )
        if not request.dry_run:
            self._jobs[spec.job_id] = _Job(runtime, spec, request, reply)
            logger.info("loaded job %s generation %d", spec.job_id, spec.generation)
        return reply

    @_rpc
    async def RunStep(self, request: worker_pb2.RunStepRequest, context) -> Any:
        """Run one step in island-sequence order; a retry returns the recorded result."""
        received_ns = time.time_ns()
        _check_job_id(request.job_id)
        self._check_epoch(request.epoch)
        job = self._job(request.job_id)
        if job.runtime.suspended:
            raise RpcRejection(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"job {request.job_id!r} is suspended; Resume it before step {request.step}.",
            )
        if request.generation != job.spec.generation:
            raise RpcRejection(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"generation={request.generation} does not match job {request.job_id!r}'s "
                f"loaded generation {job.spec.generation}.",
            )
        key = (request.generation, request.step)
        if key in job.results:
            return _replay(job.results[key])
        if key in job.inflight:
            return _replay(await asyncio.shield(job.inflight[key]))
        if request.island_seq > self._next_seq:
            # A window of steps in flight: this one may have overtaken an earlier one on the
            # wire. Wait briefly for the missing numbers, then queue behind them in seq order.
            await self._wait_for_seq(request.island_seq, request.epoch, SEQ_GAP_WAIT_S)
            self._check_epoch(request.epoch)
            if key in job.results:
                return _replay(job.results[key])
            if key in job.inflight:
                return _replay(await asyncio.shield(job.inflight[key]))
        if request.island_seq != self._next_seq:
            if request.island_seq > self._next_seq:
                why = "skips ahead of"
            else:
                why = "was already used; this host now expects"
            raise RpcRejection(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"island_seq={request.island_seq} {why} the expected island_seq="
                f"{self._next_seq} (epoch {self._newest_epoch}); send the missing step or "
                "fill it with SkipSeq.",
            )
        self._next_seq += 1
        self._seq_advanced()
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        job.inflight[key] = future
        try:
            outcome = await self._execute_step(job, request, received_ns)
        except BaseException as e:  # cancelled while queued: later retries see the error
            outcome = RpcRejection(
                grpc.StatusCode.ABORTED, f"step {request.step} did not complete: {e!r}."
            )
            raise
        finally:
            job.inflight.pop(key, None)
            job.results[key] = outcome
            while len(job.results) > MAX_RECORDED_STEPS:
                job.results.popitem(last=False)
            future.set_result(outcome)
        if isinstance(outcome, RpcRejection):
            raise outcome
        return outcome

    async def _execute_step(
        self, job: _Job, request: worker_pb2.RunStepRequest, received_ns: int
    ) -> worker_pb2.RunStepReply | RpcRejection:
        async with self._lock:
            if request.epoch < self._newest_epoch:
                return RpcRejection(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"epoch={request.epoch} became older than the newest controller epoch "
                    f"{self._newest_epoch} while step {request.step} was queued.",
                )
            if self._jobs.get(request.job_id) is not job:
                return RpcRejection(
                    grpc.StatusCode.NOT_FOUND,
                    f"job_id={request.job_id!r} was unloaded while step {request.step} was queued.",
                )
            self._running_job = request.job_id
            start_ns = time.time_ns()
            try:
                result: StepResult = await self._on_runtime_thread(
                    job.runtime.run_step, request.step
                )
            except DigestMismatchError as e:
                logger.error("step %d of job %s: %s", request.step, request.job_id, e)
                return RpcRejection(grpc.StatusCode.DATA_LOSS, str(e))
            except ExchangeAbortedError as e:
                return RpcRejection(
                    grpc.StatusCode.ABORTED,
                    f"step {request.step} of job {request.job_id!r} was aborted: {e}",
                )
            except ExchangeTimeoutError as e:
                return RpcRejection(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))
            except ExchangeError as e:
                return RpcRejection(
                    grpc.StatusCode.UNAVAILABLE,
                    f"step {request.step} of job {request.job_id!r}: the gradient exchange "
                    f"failed: {e}",
                )
            except Exception as e:
                logger.exception("step %d of job %s failed", request.step, request.job_id)
                return RpcRejection(
                    grpc.StatusCode.INTERNAL,
                    f"step {request.step} of job {request.job_id!r} failed: {e!r}.",
                )
            finally:
                self._running_job = ""
            end_ns = time.time_ns()
            committed = await self._checkpoint_after_step(job, request)
            self.execution_log.append(
                worker_pb2.ExecutionEntry(
                    job_id=request.job_id,
                    generation=request.generation,
                    step=request.step,
                    island_seq=request.island_seq,
                    start_unix_ns=start_ns,
                    end_unix_ns=end_ns,
                    epoch=request.epoch,
                )
            )
        return worker_pb2.RunStepReply(
            job_id=request.job_id,
            generation=request.generation,
            step=request.step,
            island_seq=request.island_seq,
            loss=result.loss,
            timings=worker_pb2.StepTimings(
                received_unix_ns=received_ns, start_unix_ns=start_ns, end_unix_ns=end_ns
            ),
            example_ids=list(result.example_ids),
            param_digest=result.param_digest,
            exchange_s=result.exchange_s,
            exchange_bytes_sent=result.exchange_bytes_sent,
            step_s=(end_ns - start_ns) / 1e9,
            checkpoints_committed=committed,
        )

    # ---- checkpoints (workers/checkpoint.py) ----------------------------------------------

    @staticmethod
    def _writes_checkpoints(job: _Job) -> bool:
        """Island 0's hosts write a job's checkpoints (the parameters are the same on every
        island), when the job has a checkpoint folder and its runtime can."""
        return (
            bool(job.request.checkpoint_dir)
            and job.spec.island_index == 0
            and hasattr(job.runtime, "checkpoint_state")
        )

    def _save(self, job: _Job) -> tuple[int, str]:
        """Start an asynchronous save of the job's current state (runtime thread)."""
        params, opt_state, step = job.runtime.checkpoint_state()
        path = checkpoint_path(job.request.checkpoint_dir, job.spec.generation, step)
        if job.writer is None:
            job.writer = CheckpointWriter()
        job.writer.save(path, params, opt_state, step)
        return step, path

    async def _restore(self, runtime: JobRuntime, path: str) -> None:
        """Restore a freshly loaded runtime from a checkpoint (DATA_LOSS if unreadable)."""
        if not hasattr(runtime, "restore_checkpoint"):
            await self._on_runtime_thread(runtime.unload)
            raise RpcRejection(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"restore_from={path!r}: model.preset={runtime.spec.preset!r} has no checkpoints.",
            )
        try:
            await self._on_runtime_thread(runtime.restore_checkpoint, path)
        except CheckpointError as e:
            await self._on_runtime_thread(runtime.unload)
            raise RpcRejection(grpc.StatusCode.DATA_LOSS, str(e)) from e

    async def _checkpoint_after_step(
        self, job: _Job, request: worker_pb2.RunStepRequest
    ) -> list[int]:
        """Start the checkpoint a RunStep asked for (a failed save is logged, never fails the
        step: it is simply never committed); returns the committed steps."""
        if not self._writes_checkpoints(job):
            return []
        if request.checkpoint:
            try:
                await self._on_runtime_thread(self._save, job)
            except Exception:
                logger.exception(
                    "checkpoint after step %d of job %s failed", request.step, request.job_id
                )
        return [] if job.writer is None else job.writer.committed

    @_rpc
    async def SaveCheckpoint(self, request: worker_pb2.SaveCheckpointRequest, context) -> Any:
        """Checkpoint a job now (after the steps queued before it) and/or wait for the
        checkpoints in progress; hosts that do not write answer writer=false."""
        self._check_epoch(request.epoch)
        job = self._job(request.job_id)
        if request.generation != job.spec.generation:
            raise RpcRejection(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"generation={request.generation} does not match job {request.job_id!r}'s "
                f"loaded generation {job.spec.generation}.",
            )
        reply = worker_pb2.SaveCheckpointReply(job_id=request.job_id)
        if not self._writes_checkpoints(job):
            return reply
        reply.writer = True
        async with self._lock:
            try:
                if request.save:
                    reply.step, reply.path = await self._on_runtime_thread(self._save, job)
                if request.wait and job.writer is not None:
                    await self._on_runtime_thread(job.writer.wait)
            except RuntimeUnavailableError as e:
                raise RpcRejection(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from e
            except CheckpointError as e:
                raise RpcRejection(grpc.StatusCode.INTERNAL, str(e)) from e
        if job.writer is not None:
            reply.checkpoints_committed.extend(job.writer.committed)
        return reply

    @_rpc
    async def SkipSeq(self, request: worker_pb2.SkipSeqRequest, context) -> Any:
        """Fill the next expected sequence number (an already filled one is a no-op)."""
        self._check_epoch(request.epoch)
        if request.island_seq > self._next_seq:
            raise RpcRejection(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"island_seq={request.island_seq} skips ahead of the expected island_seq="
                f"{self._next_seq} (epoch {self._newest_epoch}); fill numbers one at a time.",
            )
        if request.island_seq < self._next_seq:
            return worker_pb2.SkipSeqReply(next_island_seq=self._next_seq, already_filled=True)
        self._next_seq += 1
        self._seq_advanced()
        logger.info("island_seq %d skipped: %s", request.island_seq, request.reason[:200])
        return worker_pb2.SkipSeqReply(next_island_seq=self._next_seq, already_filled=False)

    @_rpc
    async def ParamDigest(self, request: worker_pb2.ParamDigestRequest, context) -> Any:
        """Digest of a loaded job's parameters, after every step queued before it."""
        job = self._job(request.job_id)
        async with self._lock:
            digest = await self._on_runtime_thread(job.runtime.digest)
        return worker_pb2.ParamDigestReply(
            job_id=request.job_id,
            sha256=digest.sha256,
            steps_applied=digest.steps_applied,
            num_params=digest.num_params,
        )

    @_rpc
    async def UnloadJob(self, request: worker_pb2.UnloadJobRequest, context) -> Any:
        """Drop a job; unloading a job that is not loaded is a no-op."""
        _check_job_id(request.job_id)
        self._check_epoch(request.epoch)
        job = self._jobs.pop(request.job_id, None)
        if job is None:
            return worker_pb2.UnloadJobReply(unloaded=False)
        # A step of the job may wait on a peer that is gone: release it before queueing.
        self.mailbox.abort(job.spec.job_id, job.spec.generation, "the job was unloaded")
        async with self._lock:
            if job.writer is not None:  # the checkpoint in progress is committed first
                await self._on_runtime_thread(job.writer.close)
            await self._on_runtime_thread(job.runtime.unload)
        self.mailbox.forget(request.job_id)
        logger.info("unloaded job %s", request.job_id)
        return worker_pb2.UnloadJobReply(unloaded=True)

    @_rpc
    async def Suspend(self, request: worker_pb2.SuspendRequest, context) -> Any:
        """Move a job's state to host memory after the steps queued before this call."""
        self._check_epoch(request.epoch)
        job = self._job(request.job_id)
        async with self._lock:
            if job.runtime.suspended:
                return worker_pb2.SuspendReply(suspended=False, host_bytes=job.runtime.host_bytes())
            try:
                host_bytes = await self._on_runtime_thread(job.runtime.suspend)
            except RuntimeUnavailableError as e:
                raise RpcRejection(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from e
        return worker_pb2.SuspendReply(suspended=True, host_bytes=host_bytes)

    @_rpc
    async def Resume(self, request: worker_pb2.ResumeRequest, context) -> Any:
        """Put a suspended job's state back on the devices."""
        self._check_epoch(request.epoch)
        job = self._job(request.job_id)
        async with self._lock:
            if not job.runtime.suspended:
                return worker_pb2.ResumeReply(resumed=False)
            try:
                await self._on_runtime_thread(job.runtime.resume)
            except RuntimeUnavailableError as e:
                raise RpcRejection(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from e
            per_device = (
                await self._on_runtime_thread(self._job_memory, job)
            ).live_bytes_per_device
        return worker_pb2.ResumeReply(resumed=True, device_bytes_per_device=per_device)

    def _job_memory(self, job: _Job) -> worker_pb2.JobMemory:
        """The job's arrays among jax.live_arrays(), per device and in all (runtime thread)."""
        import jax

        mine = {id(a) for a in job.runtime.device_arrays()}
        per_device: collections.Counter = collections.Counter()
        for array in jax.live_arrays():
            if id(array) in mine and not array.is_deleted():
                for shard in array.addressable_shards:
                    per_device[shard.device.id] += shard.data.nbytes
        return worker_pb2.JobMemory(
            job_id=job.spec.job_id,
            live_bytes_per_device=max(per_device.values(), default=0),
            live_bytes=sum(per_device.values()),
            suspended=job.runtime.suspended,
            host_bytes=job.runtime.host_bytes(),
        )

    @_rpc
    async def ExecutionLog(self, request: worker_pb2.ExecutionLogRequest, context) -> Any:
        """The executed steps (island_seq order) and every loaded job's live device bytes."""

        def memory() -> tuple[list[worker_pb2.JobMemory], int]:
            import jax

            total = sum(
                shard.data.nbytes
                for array in jax.live_arrays()
                if not array.is_deleted()
                for shard in array.addressable_shards
            )
            return [self._job_memory(job) for job in list(self._jobs.values())], total

        jobs, total = await self._on_runtime_thread(memory)
        entries = [
            e
            for e in list(self.execution_log)
            if e.epoch == self._newest_epoch and e.island_seq >= request.from_island_seq
        ]
        return worker_pb2.ExecutionLogReply(entries=entries, jobs=jobs, live_bytes_total=total)

    @_rpc
    async def Sample(self, request: worker_pb2.SampleRequest, context) -> Any:
        """Generate from a loaded job's current parameters, between its steps."""
        from .sampling import sample

        job = self._job(request.job_id)
        async with self._lock:
            try:
                result = await self._on_runtime_thread(
                    sample,
                    job.runtime,
                    request.prompt,
                    max_new_tokens=request.max_new_tokens,
                    temperature=request.temperature,
                    top_k=request.top_k,
                    seed=request.seed,
                )
            except JobSpecError as e:
                raise RpcRejection(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
            except RuntimeUnavailableError as e:
                raise RpcRejection(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from e
        return worker_pb2.SampleReply(
            job_id=request.job_id,
            text=result.text,
            tokens=result.tokens,
            steps_applied=result.steps_applied,
            seconds=result.seconds,
        )

    @_rpc
    async def ExchangeGradients(self, request_iterator, context) -> Any:
        """File a peer's chunks in the mailbox; the runtime thread waits on them."""
        accepted = 0
        async for chunk in request_iterator:
            job = self._job(chunk.job_id)
            if chunk.generation != job.spec.generation:
                raise RpcRejection(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"generation={chunk.generation} does not match job {chunk.job_id!r}'s "
                    f"loaded generation {job.spec.generation}.",
                )
            if chunk.source_island >= job.spec.num_islands:
                raise RpcRejection(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"source_island={chunk.source_island} is out of range for "
                    f"num_islands={job.spec.num_islands}.",
                )
            try:
                self.mailbox.deliver(chunk)
            except ExchangeAbortedError as e:
                raise RpcRejection(grpc.StatusCode.ABORTED, str(e)) from e
            except ValueError as e:
                raise RpcRejection(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
            accepted += len(chunk.data)
        return worker_pb2.ExchangeGradientsReply(bytes=accepted)

    @_rpc
    async def Abort(self, request: worker_pb2.AbortRequest, context) -> Any:
        """Release the exchanges of (job, generation); other jobs are untouched."""
        _check_job_id(request.job_id)
        released = self.mailbox.abort(request.job_id, request.generation, request.reason[:200])
        logger.warning(
            "job %s generation %d aborted (%d waits released): %s",
            request.job_id,
            request.generation,
            released,
            request.reason[:200],
        )
        return worker_pb2.AbortReply(released=released)

    @_rpc
    async def ExchangeStats(self, request: worker_pb2.ExchangeStatsRequest, context) -> Any:
        """Exchange bytes received per job and step (the interceptor's counts)."""
        return worker_pb2.ExchangeStatsReply(
            steps=[
                worker_pb2.StepExchangeBytes(
                    job_id=job, step=step, wire_bytes=wire, payload_bytes=payload, chunks=chunks
                )
                for job, step, wire, payload, chunks in self.byte_counter.snapshot(request.job_id)
            ]
        )

    @_rpc
    async def Info(self, request: worker_pb2.InfoRequest, context) -> Any:
        """Metadata and state; never waits for the devices."""
        m = self.metadata
        return worker_pb2.InfoReply(
            island=m.island,
            host_index=m.host_index,
            num_hosts=m.num_hosts,
            node_ip=m.node_ip,
            node_id=m.node_id,
            address=m.address,
            port=m.port,
            pid=m.pid,
            devices=[
                worker_pb2.DeviceInfo(
                    id=d.id, platform=d.platform, kind=d.kind, process_index=d.process_index
                )
                for d in m.devices
            ],
            island_device_count=m.island_device_count,
            memory_budget_bytes_per_device=m.memory_budget_bytes_per_device,
            wire_version=common_pb2.WireVersion(version=m.wire_version),
            loaded_jobs=sorted(self._jobs),
            newest_epoch=self._newest_epoch,
            next_island_seq=self._next_seq,
            running_job=self._running_job,
            peak_flops_per_device=m.peak_flops_per_device,
        )


def _same_except_epoch(a: worker_pb2.LoadJobRequest, b: worker_pb2.LoadJobRequest) -> bool:
    a2, b2 = type(a)(), type(b)()
    a2.CopyFrom(a)
    b2.CopyFrom(b)
    a2.epoch = b2.epoch = 0
    return a2 == b2


def _replay(outcome: worker_pb2.RunStepReply | RpcRejection) -> worker_pb2.RunStepReply:
    if isinstance(outcome, RpcRejection):
        raise outcome
    reply = worker_pb2.RunStepReply()
    reply.CopyFrom(outcome)
    reply.replayed = True
    return reply


# ---- serving -------------------------------------------------------------------------------


async def serve(
    servicer: WorkerServicer,
    host: str,
    port: int = 0,
    *,
    started: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
    grace_s: float = 5.0,
) -> None:
    """Serve `servicer`, grpc.health.v1 and reflection on host:port until `stop` is set.

    Args:
        servicer: The worker servicer.
        host: Address to bind (the node's IP).
        port: Port to bind; 0 picks a free one.
        started: Called with the bound port once the server accepts calls.
        stop: Set to stop the server; None serves until cancelled.
        grace_s: Seconds in-flight calls get to finish when stopping.
    """
    server = grpc.aio.server(
        interceptors=[servicer.byte_counter],
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)],
    )
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind the worker service to {host}:{port}.")
    servicer.set_port(bound)
    try:
        await server.start()
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        m = servicer.metadata
        logger.info("worker service of island %s host %d on %s", m.island, m.host_index, m.address)
        if started is not None:
            started(bound)
        if stop is None:
            await server.wait_for_termination()
        else:
            await stop.wait()
    finally:
        await health.enter_graceful_shutdown()
        await server.stop(grace_s)
        await servicer.peers.close()


class BackgroundServer:
    """Runs `serve()` on its own event loop in a daemon thread (inside the Ray actor).

    Args:
        servicer: The worker servicer.
        host: Address to bind.
        port: Port to bind; 0 picks a free one.
    """

    def __init__(self, servicer: WorkerServicer, host: str, port: int = 0) -> None:
        self.servicer = servicer
        self._host = host
        self._port = port
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._bound = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="worker-grpc", daemon=True)
        self.port = 0

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            self._stop = asyncio.Event()

            def started(port: int) -> None:
                self.port = port
                self._bound.set()

            await serve(self.servicer, self._host, self._port, started=started, stop=self._stop)

        try:
            self._loop.run_until_complete(main())
        except BaseException as e:
            self._error = e
            logger.exception("worker service stopped with an error")
        finally:
            self._bound.set()
            self._loop.close()

    def start(self, timeout_s: float = 30.0) -> int:
        """Start serving; return the bound port."""
        self._thread.start()
        if not self._bound.wait(timeout_s):
            raise TimeoutError(f"worker service did not start within {timeout_s} s.")
        if self._error is not None:
            raise RuntimeError(f"worker service failed to start: {self._error!r}")
        return self.port

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop serving (in-flight calls get the grace period) and close the servicer."""
        if self._thread.is_alive() and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout_s)
        self.servicer.close()
