"""The gRPC worker service of an island host (grpc.aio): the controller's operations on jobs.

The servicer validates every request at the boundary (workers/requests.py), applies the
ordering rules (workers/ordering.py: epochs, island_seq, idempotent RunStep), runs the job
runtime's blocking JAX work on one runtime thread (compiles on a thread of their own), so
Info and the standard health service answer while a step runs, and asks for checkpoints
(workers/checkpoint.py). The peers' endpoint, ExchangeService (workers/exchange_service.py),
is served beside it on the same port (workers/serving.py's `serve`). It knows nothing of Ray.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import functools
import gc
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import grpc

from pathways_lite.v1 import worker_pb2, worker_pb2_grpc

from . import rpc
from .auth import Credential
from .checkpoint import CheckpointError, CheckpointWriteError, JobCheckpoints, init_job, restore_job
from .exchange import (
    DigestMismatchError,
    ExchangeAbortedError,
    ExchangeError,
    ExchangeTimeoutError,
)
from .exchange_service import ExchangeServicer
from .host import HostMetadata, info_reply
from .memory import job_memory, live_bytes_total, memory_proto
from .ordering import (
    StepNotRun,
    StepOrder,
    StepRecords,
    coalesced_replies,
    same_load,
    slice_steps,
)
from .peer_restore import (
    PeerRestoreError,
    abstract_like,
    assemble,
    fetch_state,
    rollback,
    served_leaves,
    state_pieces,
    train_state,
)
from .requests import check_job_id, decode_load
from .rpc import RpcRejection
from .runtime import IslandJobSpec, JobRuntime, JobSpecError, RuntimeUnavailableError, StepResult
from .runtimes import RuntimeFactory, make_runtime
from .serve_rpc import ServingHost
from .serving import SERVICE_NAME, BackgroundServer, serve  # noqa: F401 (re-exported)
from .slices import SliceRun
from .tls import TlsConfig

logger = logging.getLogger(__name__)

# Executed steps kept in the host's execution log (ExecutionLog rpc).
EXECUTION_LOG_STEPS = 8192

_rpc = rpc.error_mapping(
    (
        (JobSpecError, grpc.StatusCode.INVALID_ARGUMENT),
        (RuntimeUnavailableError, grpc.StatusCode.FAILED_PRECONDITION),
        (CheckpointWriteError, grpc.StatusCode.INTERNAL),
        (CheckpointError, grpc.StatusCode.DATA_LOSS),  # a checkpoint to restore is unreadable
    ),
    log=logger,
)


def _collect_garbage() -> int:
    """A full collection, on the runtime thread (no step creates or deletes arrays meanwhile);
    returns the bytes of arrays it freed."""
    held = live_bytes_total()
    gc.collect()
    return held - live_bytes_total()


@dataclass
class _Job:
    runtime: JobRuntime
    spec: IslandJobSpec
    request: worker_pb2.LoadJobRequest
    reply: worker_pb2.LoadJobReply
    checkpoints: JobCheckpoints
    records: StepRecords = dataclasses.field(default_factory=StepRecords)


async def _run_on(executor: concurrent.futures.Executor, fn: Callable[..., Any], *args, **kw):
    """Await `fn(*args, **kw)` run on `executor` (off the event loop)."""
    return await asyncio.get_running_loop().run_in_executor(executor, lambda: fn(*args, **kw))


def _same_job(a: worker_pb2.LoadJobRequest, b: worker_pb2.LoadJobRequest) -> bool:
    """Whether two loads are one job's, apart from what a new generation may change."""
    a2, b2 = type(a)(), type(b)()
    for src, dst in ((a, a2), (b, b2)):
        dst.CopyFrom(src)
        for name in ("generation", "epoch", "peers", "keep_state", "resume_step"):
            dst.ClearField(name)
        for name in (
            "restore_from",
            "restore_peers",
            "init_from",
            "restore_stage_bounds",
            "init_stage_bounds",
        ):
            dst.ClearField(name)
    return a2 == b2


def _step_rejection(error: Exception, request: worker_pb2.RunStepRequest) -> RpcRejection:
    """The recorded outcome of a step whose runtime raised `error`."""
    where = f"step {request.step} of job {request.job_id!r}"
    if isinstance(error, DigestMismatchError):
        logger.error("%s: %s", where, error)
        return RpcRejection(grpc.StatusCode.DATA_LOSS, str(error))
    if isinstance(error, ExchangeAbortedError):
        return RpcRejection(grpc.StatusCode.ABORTED, f"{where} was aborted: {error}")
    if isinstance(error, ExchangeTimeoutError):
        return RpcRejection(grpc.StatusCode.DEADLINE_EXCEEDED, str(error))
    if isinstance(error, ExchangeError):
        return RpcRejection(
            grpc.StatusCode.UNAVAILABLE, f"{where}: the gradient exchange failed: {error}"
        )
    logger.error("%s failed", where, exc_info=error)
    return RpcRejection(grpc.StatusCode.INTERNAL, f"{where} failed: {error!r}.")


# StepResult's fields that only some steps set (RunStepReply fields of the same names).
_STEP_EXTRAS = (
    "loss_stats",
    "pipeline_wait_s",
    "stage_bytes_sent",
    "peak_stash_bytes",
    "pipeline_s",
    "param_digest",
    "exchange_s",
    "exchange_bytes_sent",
)


class Executed(NamedTuple):
    """A step of the execution log, as it is kept (its ExecutionEntry is built when the log
    is asked for, not on the runtime thread between two steps)."""

    job_id: str
    generation: int
    step: int
    island_seq: int
    start_unix_ns: int
    end_unix_ns: int
    epoch: int
    received_unix_ns: int
    slices: Sequence[tuple[str, int, int]]

    def entry(self) -> worker_pb2.ExecutionEntry:
        return worker_pb2.ExecutionEntry(
            job_id=self.job_id,
            generation=self.generation,
            step=self.step,
            island_seq=self.island_seq,
            start_unix_ns=self.start_unix_ns,
            end_unix_ns=self.end_unix_ns,
            epoch=self.epoch,
            received_unix_ns=self.received_unix_ns,
            slices=[
                worker_pb2.TraceSlice(name=n, start_unix_ns=a, end_unix_ns=b)
                for n, a, b in self.slices
            ],
        )


class WorkerServicer(ServingHost, worker_pb2_grpc.WorkerServiceServicer):
    """The worker service of one island host.

    Args:
        metadata: The host's metadata (port 0 until `set_port`).
        devices: The island's devices in mesh order (all hosts' devices in a multi-host
            island), handed to the runtime factory.
        runtime_factory: Builds a job's runtime; raises JobSpecError for a bad field and
            RuntimeUnavailableError when the host cannot run the model.
        credential: The cluster credential every call to this host must carry, and that it
            presents to its peers (workers/auth.py). An island host always has one; None
            (every call accepted) is for in-process servers of tests and benchmarks.
        tls: The cluster's TLS setting with this host's certificate (workers/tls.py): the
            service serves TLS where `tls.wanted(its address)`, and so do its peer channels.
    """

    def __init__(
        self,
        metadata: HostMetadata,
        devices: Sequence[Any],
        runtime_factory: RuntimeFactory = make_runtime,
        credential: Credential | None = None,
        tls: TlsConfig | None = None,
    ) -> None:
        self.metadata = metadata
        self.credential = credential
        self.tls = tls
        self._devices = list(devices)
        self._runtime_factory = runtime_factory
        self._jobs: dict[str, _Job] = {}
        self._running_job = ""
        self.order = StepOrder(on_new_epoch=self._release_stale_exchanges)
        # The peers' endpoint: the mailbox of received gradient parts, the channels to the
        # peers, and the interceptor that counts received exchange bytes.
        self.exchange = ExchangeServicer(lambda job_id: self._job(job_id).spec, credential, tls)
        self.exchange.state_source = self._state_pieces
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
        self._serving_init()
        # One LoadJob of a job at a time (created on the serving loop).
        self._load_locks: dict[str, asyncio.Lock] = {}
        # The tasks running RunSlice streams' steps.
        self._slices: set[asyncio.Future] = set()
        # Every executed step (the last EXECUTION_LOG_STEPS).
        self.execution_log: collections.deque[Executed] = collections.deque(
            maxlen=EXECUTION_LOG_STEPS
        )

    def add_to_server(self, server: grpc.aio.Server) -> None:
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(self, server)

    def set_port(self, port: int) -> None:
        self.metadata = dataclasses.replace(self.metadata, port=port)

    def close(self) -> None:
        """Unload every job and stop the runtime thread."""
        self._stop_all_engines("the island host is stopping")
        for job in self._jobs.values():
            try:
                job.checkpoints.close()
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

    def train_loads(self) -> list[bytes]:
        """The serialized LoadJob requests of the data-parallel training jobs loaded here
        (what a warm spare compiles ahead, workers/warm_spare.py; not a wire operation)."""
        return [
            job.request.SerializeToString()
            for job in list(self._jobs.values())
            if hasattr(job.runtime, "pre_step")
            and job.spec.num_islands > 1
            and job.spec.pipeline is None
        ]

    # ---- helpers -------------------------------------------------------------------------

    @property
    def _lock(self) -> asyncio.Lock:
        if self._device_lock is None:  # created on the serving loop
            self._device_lock = asyncio.Lock()
        return self._device_lock

    async def _on_runtime_thread(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return await _run_on(self._executor, fn, *args, **kw)

    async def _on_compile_thread(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return await _run_on(self._compile_executor, fn, *args, **kw)

    def _release_stale_exchanges(self, epoch: int) -> None:
        for job in self._jobs.values():
            self.exchange.mailbox.abort(
                job.spec.job_id, job.spec.generation, f"controller epoch {epoch} started"
            )

    def _job(self, job_id: str) -> _Job:
        check_job_id(job_id)
        job = self._jobs.get(job_id)
        if job is None:
            raise RpcRejection(
                grpc.StatusCode.NOT_FOUND, f"job_id={job_id!r} is not loaded on this host."
            )
        return job

    @staticmethod
    def _check_generation(job: _Job, generation: int) -> None:
        if generation != job.spec.generation:
            raise RpcRejection(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"generation={generation} does not match job {job.spec.job_id!r}'s "
                f"loaded generation {job.spec.generation}.",
            )

    # ---- RPCs ----------------------------------------------------------------------------

    @_rpc
    async def LoadJob(self, request: worker_pb2.LoadJobRequest, context) -> Any:
        """Validate, check memory, compile; keep the job unless dry_run.

        Loads of one job run one at a time, in arrival order: a new generation waits for
        one still loading (a dead controller's), so every host of a multi-host island runs
        their collective programs in the same order.
        """
        if request.dry_run:
            return await self._load_job(request)
        lock = self._load_locks.setdefault(request.job_id, asyncio.Lock())
        async with lock:
            return await self._load_job(request)

    async def _load_job(self, request: worker_pb2.LoadJobRequest) -> Any:
        spec = decode_load(request, self.metadata.island_device_count)
        self.order.check_epoch(request.epoch)
        existing = self._jobs.get(spec.job_id)
        if existing is not None and not request.dry_run:
            if existing.spec.generation > spec.generation:
                raise RpcRejection(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"generation={spec.generation} of job {spec.job_id!r} is older than the "
                    f"loaded generation {existing.spec.generation}.",
                )
            if existing.spec.generation == spec.generation:
                if same_load(existing.request, request):
                    return existing.reply  # a retried load
                raise RpcRejection(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"job {spec.job_id!r} generation {spec.generation} is already loaded with "
                    "a different spec; bump the generation to replace it.",
                )
        if request.keep_state and not request.dry_run:
            return await self._keep_state(spec, request, existing)

        def prepare() -> tuple[JobRuntime, str, int]:
            # Opening (or preparing) the dataset and estimating memory can take seconds:
            # off the event loop (Info and health keep answering) and off the runtime thread
            # (the island's other jobs keep stepping).
            runtime = self._runtime_factory(spec, self._devices)
            return runtime, runtime.data_hash(), int(runtime.estimate_bytes_per_device())

        runtime, expected_hash, estimate = await self._on_compile_thread(prepare)
        self.exchange.connect(runtime, asyncio.get_running_loop())
        if spec.pipeline is not None:  # workers/pipeline.py: links to the other stages
            self.exchange.mailbox.clear_abort(spec.job_id, spec.generation)
            runtime.connect_stages(
                self.exchange.mailbox, self.exchange.peers, asyncio.get_running_loop()
            )
        if spec.data_hash != expected_hash:
            raise RpcRejection(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"data_hash={spec.data_hash!r} does not match the content hash "
                f"{expected_hash!r} of the data this host reads.",
            )
        from pathways_lite.model.estimates import ESTIMATE_MAX_OVER

        budget = self.metadata.memory_budget_bytes_per_device
        if estimate > budget * ESTIMATE_MAX_OVER:
            # The estimate is at most ESTIMATE_MAX_OVER above the compiled figure: no need to
            # compile to know that this one cannot fit.
            raise RpcRejection(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"job {spec.job_id!r} holds an estimated {estimate} bytes per device, more "
                f"than this island's budget of {budget} bytes per device.",
            )
        started = time.perf_counter()
        peer_s, peer_bytes = 0.0, 0
        # The compile touches no device state: the island's other jobs keep stepping.
        report = await self._on_compile_thread(runtime.compile)
        # Checked before anything is allocated: the compiled step's own figure, or the
        # estimate (an upper bound) of a runtime that compiles only in `load`.
        needs, what = (
            (estimate, "an estimated")
            if report is None
            else (report.total_bytes, "at the peak of its compiled step")
        )
        if needs > budget:
            raise RpcRejection(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"job {spec.job_id!r} holds {what} {needs} bytes per device, more than this "
                f"island's budget of {budget} bytes per device.",
            )
        if existing is not None and not request.dry_run:
            # The replaced generation's steps may wait on a dead peer: release the lock.
            self.exchange.mailbox.abort(
                spec.job_id, existing.spec.generation, f"generation {spec.generation} loads"
            )
        if report is None or not request.dry_run:
            async with self._lock:
                if existing is not None and not request.dry_run:
                    await asyncio.to_thread(
                        self._stop_engine, spec.job_id, f"generation {spec.generation} loads"
                    )
                    await self._on_runtime_thread(existing.checkpoints.close)
                    await self._on_runtime_thread(self.device_locked, existing.runtime.unload)
                    self._jobs.pop(spec.job_id, None)
                extra = {}
                if request.restore_peers and not request.dry_run:
                    # The survivors' state, fetched before any is built here.
                    extra["state"], peer_s, peer_bytes = await self._fetch_from_peers(
                        runtime, request
                    )
                try:
                    report = await self._on_runtime_thread(
                        runtime.load, dry_run=request.dry_run, **extra
                    )
                finally:
                    if request.dry_run:
                        await self._on_runtime_thread(runtime.unload)
                compile_s = time.perf_counter() - started - peer_s
                if request.restore_peers:
                    pass  # loaded with the survivors' state
                elif request.restore_from and not request.dry_run:
                    await self._on_runtime_thread(restore_job, runtime, request.restore_from)
                elif request.init_from and not request.dry_run:
                    await self._on_runtime_thread(init_job, runtime, request.init_from)
        else:
            compile_s = time.perf_counter() - started
        reply = worker_pb2.LoadJobReply(
            job_id=spec.job_id,
            loaded=not request.dry_run,
            memory=memory_proto(report),
            estimate_bytes_per_device=estimate,
            budget_bytes_per_device=budget,
            compile_s=compile_s,
            peer_restore_s=peer_s,
            peer_restore_bytes=peer_bytes,
        )
        if not request.dry_run:
            checkpoints = JobCheckpoints(runtime, request.checkpoint_dir)
            self._jobs[spec.job_id] = _Job(runtime, spec, request, reply, checkpoints)
            logger.info("loaded job %s generation %d", spec.job_id, spec.generation)
        return reply

    async def _keep_state(
        self, spec: IslandJobSpec, request: worker_pb2.LoadJobRequest, existing: _Job | None
    ) -> worker_pb2.LoadJobReply:
        """LoadJob with keep_state: a survivor of a peer's death takes the new generation and
        peers with its state resident, rolled back to `resume_step` (peer_restore.py)."""
        where = f"keep_state of job {spec.job_id!r} generation {spec.generation}"
        if (
            existing is None
            or existing.runtime.suspended
            or not hasattr(existing.runtime, "pre_step")
        ):
            raise RpcRejection(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{where}: the job's state is not resident on this host.",
            )
        if not _same_job(existing.request, request):
            raise RpcRejection(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{where}: the job is loaded here with a different spec.",
            )
        # Steps of the old generation may wait on the dead peer: release them first.
        self.exchange.mailbox.abort(
            spec.job_id, existing.spec.generation, f"generation {spec.generation} keeps the state"
        )
        async with self._lock:
            runtime = existing.runtime
            await self._on_runtime_thread(rollback, runtime, request.resume_step)
            await self._on_runtime_thread(existing.checkpoints.close)
            runtime.spec = spec
            runtime.exchange = None
            self.exchange.connect(runtime, asyncio.get_running_loop())
            reply = worker_pb2.LoadJobReply()
            reply.CopyFrom(existing.reply)
            reply.compile_s = 0.0
            checkpoints = JobCheckpoints(runtime, request.checkpoint_dir)
            self._jobs[spec.job_id] = _Job(runtime, spec, request, reply, checkpoints)
        logger.info(
            "job %s generation %d keeps its state after %d steps",
            spec.job_id,
            spec.generation,
            request.resume_step,
        )
        return reply

    async def _fetch_from_peers(
        self, runtime: JobRuntime, request: worker_pb2.LoadJobRequest
    ) -> tuple[Any, float, int]:
        """A compiled job's state from a surviving replica (FetchState from the hosts in
        `restore_peers`) on this host's mesh; (state, seconds, bytes). UNAVAILABLE when a
        survivor fails."""
        if not hasattr(runtime, "pre_step"):
            raise RpcRejection(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"restore_peers: job {request.job_id!r}'s runtime cannot load a peer's state.",
            )
        try:
            like, treedef = await self._on_compile_thread(abstract_like, runtime)
            peers = self.exchange.peers
            fetched = await fetch_state(
                [peers.stub(address) for address in request.restore_peers],
                request.job_id,
                request.resume_step,
                like,
                metadata=peers.metadata(),
            )
            leaves = await self._on_runtime_thread(assemble, fetched, like)
        except PeerRestoreError as e:
            await self._on_runtime_thread(runtime.unload)
            raise RpcRejection(grpc.StatusCode.UNAVAILABLE, str(e)) from e
        logger.info(
            "job %s: %d bytes of state from its peers in %.2f s",
            request.job_id,
            fetched.bytes,
            fetched.seconds,
        )
        state = train_state(leaves, treedef, request.resume_step)
        return state, fetched.seconds, fetched.bytes

    async def _state_pieces(self, request: worker_pb2.FetchStateRequest) -> tuple[list, int]:
        """What a FetchState streams: the parts of the wanted boxes this host holds."""
        job = self._job(request.job_id)

        def read() -> tuple[list, int]:
            leaves = served_leaves(job.runtime, request.steps_applied)
            return state_pieces(leaves, request), len(leaves)

        async with self._lock:
            return await self._on_runtime_thread(read)

    @_rpc
    async def RunStep(self, request: worker_pb2.RunStepRequest, context) -> Any:
        """Run one step in island-sequence order; a retry returns the recorded result."""
        try:
            return await self._run_step(request, time.time_ns())
        except StepNotRun as e:
            raise RpcRejection(grpc.StatusCode.ABORTED, str(e)) from None

    @_rpc
    async def RunSlice(self, request: worker_pb2.RunSliceRequest, context) -> Any:
        """Run a slice of steps back to back, streaming their replies in step order (coalesced:
        `coalesced_replies`).

        The steps run back to back on the runtime thread where they can, one at a time
        through RunStep's path where they cannot (workers/slices.py); either way each has
        RunStep's semantics (ordering, idempotency, checkpoints). The stream ends at the
        first failed step with its status; the island_seq numbers of the steps not run are
        skipped, so the island's next steps are not held up by them.
        """
        received_ns = time.time_ns()
        check_job_id(request.job_id)
        self.order.check_epoch(request.epoch)
        steps = slice_steps(request)
        # A slice queued behind other slices (or an Evaluate holding the device) waits for
        # its island_seq numbers as long as its stream lives.
        remaining = context.time_remaining() if context is not None else None
        wait_until = time.monotonic() + (remaining if remaining is not None else 0.0)
        # The steps run in a task of their own while this handler writes their replies: a
        # step never waits for the previous reply's write.
        run = SliceRun(self, steps, request.epoch, received_ns, wait_until)
        producer = asyncio.ensure_future(run.produce())
        self._slices.add(producer)
        producer.add_done_callback(self._slices.discard)
        try:
            async for message in coalesced_replies(run.replies, len(steps)):
                yield message
        finally:
            run.stop()

    async def _run_step(
        self,
        request: worker_pb2.RunStepRequest,
        received_ns: int,
        gap_wait_s: float | None = None,
    ) -> worker_pb2.RunStepReply:
        check_job_id(request.job_id)
        self.order.check_epoch(request.epoch)
        job = self._job(request.job_id)
        if job.runtime.suspended:
            raise RpcRejection(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"job {request.job_id!r} is suspended; Resume it before step {request.step}.",
            )
        self._check_generation(job, request.generation)
        return await self.order.run_step(
            job.records,
            (request.generation, request.step),
            request.island_seq,
            request.epoch,
            lambda: self._execute_step(job, request, received_ns),
            gap_wait_s,
        )

    async def _execute_step(
        self,
        job: _Job,
        request: worker_pb2.RunStepRequest,
        received_ns: int,
        locked: bool = False,
    ) -> worker_pb2.RunStepReply | RpcRejection:
        """Admit a step (a serving cut), then run it under the device lock (`locked`: the
        caller holds it, a slice's step, workers/slices.py)."""
        # A cut for serving (CutSlice) holds or ends the slice at this step boundary.
        await self.slice_cut(request.job_id).admit(
            request.generation, request.step, request.island_seq, request.epoch
        )
        if locked:
            return await self._step_now(job, request, received_ns)
        async with self._lock:
            return await self._step_now(job, request, received_ns)

    async def _step_now(
        self, job: _Job, request: worker_pb2.RunStepRequest, received_ns: int
    ) -> worker_pb2.RunStepReply | RpcRejection:
        refused = self._refusal(job, request)
        if refused is not None:
            return refused
        return await self._on_runtime_thread(self.step_on_thread, job, request, received_ns)

    def _refusal(self, job: _Job, request: worker_pb2.RunStepRequest) -> RpcRejection | None:
        """Why a queued step may not run now (a newer controller, the job unloaded or
        suspended), or None."""
        if self.order.is_stale(request.epoch):
            return RpcRejection(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"epoch={request.epoch} became older than the newest controller epoch "
                f"{self.order.newest_epoch} while step {request.step} was queued.",
            )
        if self._jobs.get(request.job_id) is not job:
            return RpcRejection(
                grpc.StatusCode.NOT_FOUND,
                f"job_id={request.job_id!r} was unloaded while step {request.step} was queued.",
            )
        if job.runtime.suspended:
            return RpcRejection(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"job {request.job_id!r} was suspended while step {request.step} was queued; "
                "Resume it first.",
            )
        return None

    def step_on_thread(
        self, job: _Job, request: worker_pb2.RunStepRequest, received_ns: int
    ) -> worker_pb2.RunStepReply | RpcRejection:
        """Run one admitted step on the runtime thread (under the device lock): the step, its
        checkpoint, its execution-log entry; returns its reply or its rejection.

        Raises:
            CheckpointWriteError: the step's checkpoint could not be written.
        """
        self._running_job = request.job_id
        started = [time.time_ns()]
        try:
            weights = tuple(request.mixture_weights)
            extra = {"weights": weights} if weights else {}
            # Serving goes first: the step waits while requests decode (issue 18). Its
            # start is taken after that wait: the serve job's time is not the step's.
            result: StepResult = self.training_step(
                functools.partial(job.runtime.run_step, request.step, **extra),
                job.runtime,
                lambda: started.__setitem__(0, time.time_ns()),
            )
        except Exception as e:
            return _step_rejection(e, request)
        finally:
            self._running_job = ""
        end_ns = time.time_ns()
        start_ns = started[0]
        if request.checkpoint and job.checkpoints.writes:
            job.checkpoints.save_after_step(request.step)
        committed = job.checkpoints.committed
        self.execution_log.append(
            Executed(
                request.job_id,
                request.generation,
                request.step,
                request.island_seq,
                start_ns,
                end_ns,
                request.epoch,
                received_ns,
                result.slices,
            )
        )
        # The fields of multi-island, pipeline and mixture steps only when they have a value:
        # a fast step's reply is built on the runtime thread between two steps.
        extra = {name: value for name in _STEP_EXTRAS if (value := getattr(result, name))}
        return worker_pb2.RunStepReply(
            job_id=request.job_id,
            generation=request.generation,
            step=request.step,
            island_seq=request.island_seq,
            loss=result.loss,
            timings=worker_pb2.StepTimings(
                received_unix_ns=received_ns, start_unix_ns=start_ns, end_unix_ns=end_ns
            ),
            example_ids=result.example_ids,
            step_s=(end_ns - start_ns) / 1e9,
            checkpoints_committed=committed,
            **extra,
        )

    @_rpc
    async def SaveCheckpoint(self, request: worker_pb2.SaveCheckpointRequest, context) -> Any:
        """Checkpoint a job now (after the steps queued before it) and/or wait for the
        checkpoints in progress; hosts that do not write answer writer=false."""
        self.order.check_epoch(request.epoch)
        job = self._job(request.job_id)
        self._check_generation(job, request.generation)
        reply = worker_pb2.SaveCheckpointReply(job_id=request.job_id)
        if not job.checkpoints.writes:
            return reply
        reply.writer = True
        async with self._lock:
            if request.save:
                reply.step, reply.path = await self._on_runtime_thread(job.checkpoints.save)
            if request.wait:
                await self._on_runtime_thread(job.checkpoints.wait)
        reply.checkpoints_committed.extend(job.checkpoints.committed)
        return reply

    @_rpc
    async def SkipSeq(self, request: worker_pb2.SkipSeqRequest, context) -> Any:
        """Fill the next expected sequence number (an already filled one is a no-op); with
        `when_due`, fill `count` numbers from `island_seq` each when its turn comes."""
        self.order.check_epoch(request.epoch)
        if request.when_due:
            seqs = range(request.island_seq, request.island_seq + max(1, request.count))
            self.order.skip_when_due(list(seqs), request.epoch)
            logger.info(
                "island_seq %d.. (%d) skipped when due: %s",
                seqs[0],
                len(seqs),
                request.reason[:200],
            )
            return worker_pb2.SkipSeqReply(next_island_seq=self.order.next_seq)
        next_seq, already_filled = self.order.skip(request.island_seq)
        if not already_filled:
            logger.info("island_seq %d skipped: %s", request.island_seq, request.reason[:200])
        return worker_pb2.SkipSeqReply(next_island_seq=next_seq, already_filled=already_filled)

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
        """Drop a job; unloading a job that is not loaded is a no-op, and so is one that
        names an older generation than the one loaded (its unload was sent for state an
        earlier controller left, and a new load replaced it)."""
        check_job_id(request.job_id)
        self.order.check_epoch(request.epoch)
        loaded = self._jobs.get(request.job_id)
        if (
            loaded is not None
            and request.HasField("generation")
            and loaded.spec.generation > request.generation
        ):
            return worker_pb2.UnloadJobReply(unloaded=False)
        job = self._jobs.pop(request.job_id, None)
        if job is not None:
            # A step of the job may wait on a peer that is gone: release it before queueing
            # (and before the serve engine, which may wait behind that step, is joined).
            self.exchange.mailbox.abort(
                job.spec.job_id, job.spec.generation, "the job was unloaded"
            )
        await asyncio.to_thread(self._stop_engine, request.job_id, "the job was unloaded")
        self.forget_cut(request.job_id)
        if job is None:
            return worker_pb2.UnloadJobReply(unloaded=False)
        async with self._lock:
            # The checkpoint in progress is committed first.
            await self._on_runtime_thread(job.checkpoints.close)
            await self._on_runtime_thread(self.device_locked, job.runtime.unload)
        self.exchange.mailbox.forget(request.job_id)
        del job
        # Arrays held only by garbage cycles (a failed step's traceback holds its frames'
        # gradients and stash) are freed now, not at the next full collection, which an idle
        # host may not run for minutes: the next job gets the device memory (a test saw a
        # cancelled pipeline stage's 600 KB still live on its host 30 s after the unload).
        freed = await self._on_runtime_thread(_collect_garbage)
        logger.info(
            "unloaded job %s%s",
            request.job_id,
            f" (a collection freed ~{freed} bytes of arrays)" if freed > 0 else "",
        )
        return worker_pb2.UnloadJobReply(unloaded=True)

    @_rpc
    async def Suspend(self, request: worker_pb2.SuspendRequest, context) -> Any:
        """Move a job's state to host memory after the steps queued before this call."""
        self.order.check_epoch(request.epoch)
        job = self._job(request.job_id)
        await asyncio.to_thread(self._stop_engine, request.job_id, "the job was suspended")
        async with self._lock:
            if job.runtime.suspended:
                return worker_pb2.SuspendReply(suspended=False, host_bytes=job.runtime.host_bytes())
            host_bytes = await self._on_runtime_thread(self.device_locked, job.runtime.suspend)
        return worker_pb2.SuspendReply(suspended=True, host_bytes=host_bytes)

    @_rpc
    async def Resume(self, request: worker_pb2.ResumeRequest, context) -> Any:
        """Put a suspended job's state back on the devices."""
        self.order.check_epoch(request.epoch)
        job = self._job(request.job_id)
        async with self._lock:
            if not job.runtime.suspended:
                return worker_pb2.ResumeReply(resumed=False)
            await self._on_runtime_thread(job.runtime.resume)
            memory = await self._on_runtime_thread(job_memory, job.spec.job_id, job.runtime)
        return worker_pb2.ResumeReply(
            resumed=True, device_bytes_per_device=memory.live_bytes_per_device
        )

    @_rpc
    async def ExecutionLog(self, request: worker_pb2.ExecutionLogRequest, context) -> Any:
        """The executed steps (island_seq order) and every loaded job's live device bytes."""

        def memory() -> tuple[list[worker_pb2.JobMemory], int]:
            jobs = [job_memory(j.spec.job_id, j.runtime) for j in list(self._jobs.values())]
            return jobs, live_bytes_total()

        jobs, total = await self._on_runtime_thread(memory)
        entries = [
            e.entry()
            for e in list(self.execution_log)
            if e.epoch == self.order.newest_epoch and e.island_seq >= request.from_island_seq
        ]
        return worker_pb2.ExecutionLogReply(entries=entries, jobs=jobs, live_bytes_total=total)

    StartServe = _rpc(ServingHost.StartServe)
    StopServe = _rpc(ServingHost.StopServe)
    CutSlice = _rpc(ServingHost.CutSlice)
    Generate = _rpc(ServingHost.Generate)

    @_rpc
    async def Sample(self, request: worker_pb2.SampleRequest, context) -> Any:
        """Generate from a loaded job's current parameters, between its steps."""
        from .sampling import sample

        job = self._job(request.job_id)
        async with self._lock:
            result = await self._on_runtime_thread(
                sample,
                job.runtime,
                request.prompt,
                max_new_tokens=request.max_new_tokens,
                temperature=request.temperature,
                top_k=request.top_k,
                seed=request.seed,
            )
        return worker_pb2.SampleReply(
            job_id=request.job_id,
            text=result.text,
            tokens=result.tokens,
            steps_applied=result.steps_applied,
            seconds=result.seconds,
        )

    @_rpc
    async def Evaluate(self, request: worker_pb2.EvaluateRequest, context) -> Any:
        """Score a loaded job's current parameters on its sources, between its steps."""
        from .evaluation import evaluate

        job = self._job(request.job_id)
        if request.max_examples <= 0:
            raise RpcRejection(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"max_examples={request.max_examples} must be positive.",
            )
        started = time.perf_counter()
        async with self._lock:
            steps, scores = await self._on_runtime_thread(
                evaluate,
                job.runtime,
                max_examples=request.max_examples,
                shots=request.shots,
                split=request.split or "heldout",
            )
        reply = worker_pb2.EvaluateReply(
            job_id=request.job_id, steps_applied=steps, seconds=time.perf_counter() - started
        )
        for score in scores:
            reply.sources.add(
                name=score.name,
                loss=score.loss,
                examples=score.examples,
                text_to_text=score.exact_match is not None,
                exact_match=score.exact_match or 0.0,
                token_f1=score.token_f1 or 0.0,
            )
        return reply

    @_rpc
    async def Abort(self, request: worker_pb2.AbortRequest, context) -> Any:
        """Release the exchanges of (job, generation); other jobs are untouched."""
        check_job_id(request.job_id)
        released = self.exchange.abort(request.job_id, request.generation, request.reason)
        return worker_pb2.AbortReply(released=released)

    @_rpc
    async def ExchangeStats(self, request: worker_pb2.ExchangeStatsRequest, context) -> Any:
        """Exchange bytes received per job and step (the interceptor's counts)."""
        return self.exchange.stats(request.job_id)

    @_rpc
    async def Info(self, request: worker_pb2.InfoRequest, context) -> Any:
        """Metadata and state; never waits for the devices."""
        return info_reply(
            self.metadata,
            loaded_jobs=sorted(self._jobs),
            newest_epoch=self.order.newest_epoch,
            next_island_seq=self.order.next_seq,
            running_job=self._running_job,
        )
