"""The controller's gRPC service (grpc.aio) and the controller core it fronts.

`Controller` owns the job store (locked state dir + epoch), the islands (connected worker
channels), the scheduler and one dispatch task per running job; it publishes every state change
and completed step on an in-memory event bus (WatchJob follows the bus, not the database) and
keeps a bounded buffer of each job's log records (StreamLogs). `ControllerServicer` answers
controller.proto's rpcs; `serve` adds the standard health service and reflection.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

import pathways_lite
from pathways_lite.v1 import common_pb2, controller_pb2, controller_pb2_grpc, worker_pb2

from . import spec as spec_lib
from .dispatch import (
    DEFAULT_WINDOW,
    Dispatcher,
    DispatchError,
    Island,
    StepProgram,
    StepReport,
    palm_program,
)
from .recovery import Attempt, IslandSupervisor, Recovery
from .scheduler import Demand, Scheduler
from .states import IllegalTransitionError, JobNotFoundError, JobState, StoreError
from .store import JobRecord, JobStore
from .views import job_record_proto
from .wire import CONTROLLER_WIRE_VERSION

logger = logging.getLogger(__name__)

SERVICE_NAME = controller_pb2.DESCRIPTOR.services_by_name["ControllerService"].full_name
# Log records kept per job, and jobs whose records are kept (oldest jobs' go first).
LOG_RECORDS_PER_JOB = 2000
LOG_JOBS = 256
# Updates a slow WatchJob/StreamLogs follower may lag behind before old ones are dropped.
FOLLOWER_QUEUE = 10000
# The key that follows every job at once (the dashboard); never a job id (those are
# [A-Za-z0-9._-]).
ALL_JOBS = "*"
# Steps remembered per island for the dashboard's timeline of who ran when.
TIMELINE_STEPS = 600
# How often the controller tries to restart an island it lost (its node may come back).
REVIVE_EVERY_S = 15.0


def job_peak_flops(devices: int, host_peaks: Sequence[float], cpu_peak: float | None) -> float:
    """The peak FLOP/s a job's MFU is measured against: `devices` x the hosts' measured
    per-device accelerator peak (the smallest, when islands differ), or, when the hosts are
    simulated CPU devices (peak 0), the machine's `cpu_peak` they share (0 while unknown)."""
    measured = [p for p in host_peaks if p > 0]
    if measured and len(measured) == len(host_peaks):
        return devices * min(measured)
    return cpu_peak or 0.0


class NoRoomError(RuntimeError):
    """What a request needs does not fit on any island now (RESOURCE_EXHAUSTED)."""


def _now() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts


class _Followers:
    """Subscriber queues per key; publishing never blocks (a lagging follower loses the
    oldest updates, never the newest)."""

    def __init__(self) -> None:
        self._queues: dict[str, set[asyncio.Queue]] = collections.defaultdict(set)

    def subscribe(self, key: str) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(FOLLOWER_QUEUE)
        self._queues[key].add(queue)
        return queue

    def unsubscribe(self, key: str, queue: asyncio.Queue) -> None:
        self._queues[key].discard(queue)
        if not self._queues[key]:
            del self._queues[key]

    def publish(self, key: str, item: Any) -> None:
        """Hand `item` to the followers of `key`, and `(key, item)` to those of ALL_JOBS."""
        targets = [(q, item) for q in self._queues.get(key, ())]
        if key != ALL_JOBS:
            targets += [(q, (key, item)) for q in self._queues.get(ALL_JOBS, ())]
        for queue, value in targets:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(value)


class LogBuffer(logging.Handler):
    """A bounded in-memory buffer of job log records, fed by the controller's own loggers
    (records logged with `extra={"job_id": ...}`) and by the island hosts' step reports."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self._records: collections.OrderedDict[str, collections.deque] = collections.OrderedDict()
        self.followers = _Followers()
        self.loop: asyncio.AbstractEventLoop | None = None

    def add(self, job_id: str, record: controller_pb2.LogRecord) -> None:
        """Buffer a record of `job_id` and hand it to followers (call on the serving loop)."""
        buffer = self._records.get(job_id)
        if buffer is None:
            buffer = self._records[job_id] = collections.deque(maxlen=LOG_RECORDS_PER_JOB)
            while len(self._records) > LOG_JOBS:
                self._records.popitem(last=False)
        buffer.append(record)
        self.followers.publish(job_id, record)

    def records(self, job_id: str, tail: int = 0) -> list[controller_pb2.LogRecord]:
        records = list(self._records.get(job_id, ()))
        return records[-tail:] if tail > 0 else records

    def emit(self, record: logging.LogRecord) -> None:
        job_id = getattr(record, "job_id", None)
        if not job_id or self.loop is None:
            return
        ts = timestamp_pb2.Timestamp()
        ts.FromNanoseconds(int(record.created * 1e9))
        proto = controller_pb2.LogRecord(
            time=ts,
            source="controller",
            level=record.levelname,
            logger=record.name,
            message=record.getMessage(),
        )
        try:
            self.loop.call_soon_threadsafe(self.add, job_id, proto)
        except RuntimeError:  # the loop is closed: the controller is stopping
            pass


@dataclasses.dataclass
class _RunningJob:
    job_id: str
    task: asyncio.Task
    islands: list[str]
    cancel_requested: bool = False
    # Preemption: set by the scheduler; the job drains, moves its state to host memory and
    # waits on `resume` (set when its islands have room again, or to finish a cancel).
    suspend_requested: bool = False
    resume: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    priority: int = 0
    # True while the job's parameters are resident on its islands (it can be sampled).
    loaded: bool = False


@dataclasses.dataclass(frozen=True)
class TimelineEntry:
    """One step of one job on one island, as host 0 of the island timed it."""

    job_id: str
    step: int
    start_ns: int
    end_ns: int


class Controller:
    """The single controller: jobs, islands, scheduling and dispatch on one event loop.

    Args:
        store: the job store, opened with `JobStore.open_controller` (lock + epoch).
        islands: the connected islands, in island order.
        state_dir: the state directory (reported by Info).
        window: steps in flight per job.
        prepare: turns a job record into its step program (blocking: it may prepare the
            dataset); None uses `palm_program`.
        supervisor: restarts lost islands through Ray (controller/recovery.py); None
            retries a failed job on the islands as they are.
    """

    def __init__(
        self,
        store: JobStore,
        islands: Sequence[Island],
        *,
        state_dir: str | Path = "",
        window: int = DEFAULT_WINDOW,
        prepare: Callable[[JobRecord], StepProgram] | None = None,
        supervisor: IslandSupervisor | None = None,
    ) -> None:
        self.store = store
        self.islands = {island.id: island for island in islands}
        self.state_dir = str(state_dir)
        self.dispatcher = Dispatcher(store.epoch, window=window)
        self.scheduler = Scheduler(
            [island.id for island in islands],
            {
                island.id: min(
                    (int(h.info.memory_budget_bytes_per_device) for h in island.hosts), default=0
                )
                for island in islands
            },
            slots=max(2, window),
        )
        # Bytes per device each job asks of every island (estimate, then the compiled step's).
        self._demand_bytes: dict[str, int] = {}
        # Checkpoint loads made to sample ended jobs (each gets a load key of its own).
        self._sample_loads = 0
        self.events = _Followers()
        self.logs = LogBuffer()
        self._prepare = prepare or palm_program
        # Failure classes, retries, checkpoints (`<state_dir>/checkpoints`), island restarts.
        self.recovery = Recovery(
            store,
            self.dispatcher,
            state_dir=state_dir,
            supervisor=supervisor,
            on_island_lost=self._island_lost,
        )
        # Lost islands being brought back (controller/recovery.py), by island id.
        self._revivers: dict[str, asyncio.Task] = {}
        self._running: dict[str, _RunningJob] = {}
        # For people (why, the dashboard, /metrics): why each queued job waits, the recent
        # steps of every island, bytes per device each resident job holds, counters.
        self.pending: dict[str, str] = {}
        self.timeline: dict[str, collections.deque[TimelineEntry]] = {
            island.id: collections.deque(maxlen=TIMELINE_STEPS) for island in islands
        }
        self.job_memory: dict[str, int] = {}
        self.steps_total = 0
        self.failures_total = 0
        self._flops_per_token: dict[str, float] = {}
        self.peak_flops: float | None = None
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self.started_at = _now()

    # -- life cycle ----------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self.store.epoch

    def cluster_shape(self) -> spec_lib.ClusterShape | None:
        devices = {island.devices for island in self.islands.values()}
        if not self.islands or len(devices) != 1:
            return None
        return spec_lib.ClusterShape(len(self.islands), devices.pop())

    async def start(self) -> None:
        """Requeue jobs a previous controller left running, then start scheduling."""
        self.logs.loop = asyncio.get_running_loop()
        logging.getLogger("pathways_lite").addHandler(self.logs)
        for record in self.store.jobs_in_states([JobState.RUNNING]):
            step = self.recovery.requeue(record.id)
            self._transition(
                record.id,
                JobState.QUEUED,
                reason="controller_restarted",
                message=f"The controller restarted; the job resumes from step {step}.",
            )
        self._wake = asyncio.Event()
        self._loop_task = asyncio.create_task(self._schedule_loop(), name="scheduler")
        self.wake()

    async def stop(self) -> None:
        """Stop dispatching; running jobs go back to the queue (a restart resumes them)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        for task in self._revivers.values():
            task.cancel()
        await asyncio.gather(*self._revivers.values(), return_exceptions=True)
        for running in list(self._running.values()):
            running.task.cancel()
        await asyncio.gather(*(r.task for r in self._running.values()), return_exceptions=True)
        for island in self.islands.values():
            await island.close()
        logging.getLogger("pathways_lite").removeHandler(self.logs)

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _island_lost(self, island: Island, reason: str) -> None:
        """An island's hosts could not be restarted: place nothing there (jobs go to free
        islands) and try to bring it back every REVIVE_EVERY_S (its node may return)."""
        if island.id in self.scheduler.down:
            return
        self.scheduler.mark_down(island.id, reason)
        logger.warning("island %s is down: %s", island.id, reason)
        self._revivers[island.id] = asyncio.create_task(
            self._revive(island), name=f"revive-{island.id}"
        )

    async def _revive(self, island: Island) -> None:
        supervisor = self.recovery.supervisor
        assert supervisor is not None
        while True:
            await asyncio.sleep(REVIVE_EVERY_S)
            try:
                await supervisor.restart(island)
            except Exception as e:
                logger.info("island %s is still down: %s", island.id, e)
                continue
            self.scheduler.mark_up(island.id)
            self._revivers.pop(island.id, None)
            logger.warning("island %s is back", island.id)
            self.wake()
            return

    # -- jobs ----------------------------------------------------------------------------

    def job_proto(self, record: JobRecord, *, include_losses: bool = True) -> controller_pb2.Job:
        job = job_record_proto(self.store, record, include_losses=include_losses)
        job.islands.extend(self.scheduler.islands_of(record.id))
        if record.state == JobState.QUEUED:
            queued = self.store.jobs_in_states([JobState.QUEUED])
            job.queue_position = 1 + next(
                (i for i, r in enumerate(queued) if r.id == record.id), len(queued)
            )
            job.jobs_ahead.extend(r.id for r in queued[: job.queue_position - 1])
            job.pending_reason = self.pending.get(
                record.id, "Waiting for the scheduler's next pass."
            )
        if job.steps_completed:
            (last,) = self.store.metrics(record.id, from_step=job.steps_completed - 1)[-1:]
            ts = timestamp_pb2.Timestamp()
            ts.FromMicroseconds(last.time_us)
            job.last_metrics.CopyFrom(
                controller_pb2.StepMetrics(
                    step=last.step,
                    loss=last.loss,
                    tokens_per_s=last.tokens_per_s,
                    step_time_s=last.step_time_s,
                    time=ts,
                    mfu=self.mfu(record, last.tokens_per_s),
                )
            )
            job.mfu = job.last_metrics.mfu
        return job

    def mfu(self, record: JobRecord, tokens_per_s: float) -> float:
        """Model FLOPs utilisation at `tokens_per_s`; 0 while the peak is unknown.

        The peak is the job's devices' (`job_peak_flops`): on accelerator islands, the
        hosts' measured per-device peak times the job's devices; on simulated CPU islands,
        this machine's measured matmul FLOP/s (`measure_peak`), which they all share.
        """
        peak = job_peak_flops(
            record.spec.islands * record.spec.devices_per_island,
            [h.info.peak_flops_per_device for i in self.islands.values() for h in i.hosts],
            self.peak_flops,
        )
        if not peak or tokens_per_s <= 0:
            return 0.0
        per_token = self._flops_per_token.get(record.id)
        if per_token is None:
            from pathways_lite.model import estimates

            try:
                configs = spec_lib.to_configs(record.spec)
                per_token = estimates.flops_per_token(configs.model, configs.train.seq_len)
            except (spec_lib.SpecError, ValueError):
                per_token = 0.0
            self._flops_per_token[record.id] = per_token
        return tokens_per_s * per_token / peak

    def measure_peak(self) -> float:
        """Measure this machine's matmul FLOP/s once (blocking; run it off the loop)."""
        if self.peak_flops is None:
            from pathways_lite.model import estimates

            self.peak_flops = estimates.measure_cpu_peak_flops(n=512, repeats=3)
            logger.info("peak %.3g FLOP/s for MFU", self.peak_flops)
        return self.peak_flops

    def why(self, record: JobRecord) -> str:
        """One sentence: why the job is (not) running."""
        if record.state == JobState.QUEUED:
            return self.pending.get(record.id, "Waiting for the scheduler's next pass.")
        if record.state == JobState.RUNNING:
            islands = ", ".join(self.scheduler.islands_of(record.id)) or "its islands"
            return f"Running on {islands}."
        return f"The job is {record.state.value}" + (
            f": {record.message}" if record.message else "."
        )

    def _transition(self, job_id: str, state: JobState, **kwargs: Any) -> JobRecord:
        record = self.store.transition(job_id, state, **kwargs)
        logger.info(
            "job %s is %s%s",
            job_id,
            state.value,
            f" ({kwargs['reason']})" if kwargs.get("reason") else "",
            extra={"job_id": job_id},
        )
        self.events.publish(
            job_id, controller_pb2.WatchJobReply(time=_now(), job=self.job_proto(record))
        )
        return record

    def submit(self, request: controller_pb2.SubmitJobRequest) -> controller_pb2.Job:
        """Validate and queue a job.

        Raises:
            spec_lib.SpecError: a bad spec (InfeasibleSpecError: it can never fit).
        """
        spec = request.spec
        spec_lib.validate_spec(spec, self.cluster_shape())
        never = self.scheduler.never_fits(spec.islands, self.estimate_bytes(spec))
        if never is not None:
            raise spec_lib.InfeasibleSpecError(
                "islands", spec.islands, f"The job can never run: {never}"
            )
        if request.validate_only:
            return controller_pb2.Job(
                name=spec.name, state=JobState.QUEUED.to_proto(), spec=spec, created_at=_now()
            )
        record = self.store.create_job(spec, request_id=request.request_id or None)
        logger.info("job %s queued", record.id, extra={"job_id": record.id})
        self.wake()
        return self.job_proto(record)

    def cancel(self, job_id: str, reason: str) -> controller_pb2.Job:
        """Cancel a queued or running job (its steps in flight finish on the hosts).

        Raises:
            JobNotFoundError, IllegalTransitionError.
        """
        record = self.store.get_job(job_id)
        if record.state.terminal:
            raise IllegalTransitionError(
                f"job {job_id!r} is already {record.state.value}; only queued or running jobs "
                "can be cancelled."
            )
        running = self._running.get(job_id)
        if running is not None:
            running.cancel_requested = True
            self.scheduler.interrupt(job_id)
            running.resume.set()  # a suspended job wakes up to unload
        message = f"Cancelled by a user: {reason[:200]}" if reason else "Cancelled by a user."
        record = self._transition(
            job_id, JobState.CANCELLED, reason="user_cancelled", message=message
        )
        return self.job_proto(record)

    def update(self, job_id: str, priority: int) -> controller_pb2.Job:
        """Re-prioritise a queued, running or suspended job; the scheduler runs a pass.

        Raises:
            ValueError: `priority` outside [PRIORITY_MIN, PRIORITY_MAX].
            JobNotFoundError, IllegalTransitionError.
        """
        if not spec_lib.PRIORITY_MIN <= priority <= spec_lib.PRIORITY_MAX:
            raise ValueError(
                f"priority={priority} is outside [{spec_lib.PRIORITY_MIN}, "
                f"{spec_lib.PRIORITY_MAX}]."
            )
        record = self.store.set_priority(job_id, priority)
        running = self._running.get(job_id)
        if running is not None:
            running.priority = priority  # what preemption compares
        demand_bytes = self._demand_bytes.get(job_id)
        logger.info(
            "job %s re-prioritised to %d%s",
            job_id,
            priority,
            f" ({demand_bytes} bytes per device)" if demand_bytes else "",
            extra={"job_id": job_id},
        )
        self.wake()
        return self.job_proto(record)

    # -- scheduling and dispatch ---------------------------------------------------------

    async def _schedule_loop(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                self._schedule()
            except Exception:
                logger.exception("scheduling failed")

    def estimate_bytes(self, spec: Any) -> int:
        """Bytes per device a job holds on each island, before anything is compiled:
        parameters, optimizer state and one gradient copy (model/estimates.py)."""
        from pathways_lite.model.estimates import memory_per_device

        try:
            configs = spec_lib.to_configs(spec)
            mem = memory_per_device(
                configs.model, {"data": spec.mesh.data, "model": spec.mesh.model}, configs.optim
            )
        except (spec_lib.SpecError, ValueError):
            return 0
        return int(mem["total_bytes"] + mem["params_bytes"])

    def _demand(self, record: JobRecord) -> Demand:
        if record.id not in self._demand_bytes:
            self._demand_bytes[record.id] = self.estimate_bytes(record.spec)
        return Demand(
            record.id,
            record.spec.islands,
            self._demand_bytes[record.id],
            record.priority,
            record.weight,
        )

    def _schedule(self) -> None:
        """One scheduling pass over the queued and suspended jobs, priority then submission:
        admit what fits (all islands or none), resume suspended jobs whose islands have room,
        suspend lower-priority jobs for a higher-priority one, and say why the rest wait."""
        waiting = self.store.jobs_in_states([JobState.QUEUED, JobState.SUSPENDED])
        blocked: list[str] = []
        for record in waiting:
            running = self._running.get(record.id)
            if running is not None and record.state == JobState.QUEUED:
                continue  # placed on this pass or an earlier one; its task starts it
            if record.state == JobState.SUSPENDED and running is None:
                # Suspended under an earlier controller: its host copy is gone with it.
                self._transition(
                    record.id,
                    JobState.QUEUED,
                    reason="controller_restarted",
                    message="The controller restarted while the job was suspended; it runs "
                    "again from step 0.",
                )
                self.store.truncate_metrics(record.id, 0)
                record = self.store.get_job(record.id)
            demand = self._demand(record)
            if record.state == JobState.SUSPENDED:
                assert running is not None
                if running.resume.is_set():
                    continue
                islands = self.scheduler.place(demand, running.islands)
                if islands is not None:
                    self.pending.pop(record.id, None)
                    running.resume.set()
                    continue
            elif not blocked:
                islands = self.scheduler.place(demand)
                if islands is not None:
                    self.pending.pop(record.id, None)
                    task = asyncio.create_task(
                        self._run_job(record, islands), name=f"job-{record.id}"
                    )
                    self._running[record.id] = _RunningJob(
                        record.id, task, islands, priority=record.priority
                    )
                    continue
            preempt = not blocked and record.state == JobState.QUEUED
            victims = self._preempt(demand) if preempt else []
            holders = sorted(
                {j for i in self.scheduler.island_ids for j in self.scheduler.jobs_on(i)}
            )
            reason = (
                f"Waiting for jobs ahead in the queue ({', '.join(blocked)})."
                if blocked
                else self.scheduler.lacking(demand)
                + (f" Waits on {', '.join(holders)}." if holders else "")
                + (f" Suspending lower-priority {', '.join(victims)}." if victims else "")
            )
            if record.state == JobState.SUSPENDED:
                reason = "Suspended: " + reason
            self.pending[record.id] = reason
            blocked.append(record.id)

    def _preempt(self, demand: Demand) -> list[str]:
        """Suspend lower-priority resident jobs so that `demand` fits: the fewest islands'
        worth, lowest priority (then newest) first. Returns the jobs asked to suspend."""
        reclaim: dict[str, int] = {}
        victims: dict[str, list[str]] = {}
        lower = sorted(
            (
                r
                for r in self._running.values()
                if r.priority < demand.priority
                and not r.suspend_requested
                and not r.cancel_requested
                and self.scheduler.held(r.job_id)
            ),
            key=lambda r: (r.priority, -self.store.get_job(r.job_id).created_us),
        )
        for island in self.scheduler.island_ids:
            for r in lower:
                if island in self.scheduler.islands_of(r.job_id):
                    if self.scheduler.free_bytes(island) + reclaim.get(island, 0) >= (
                        demand.bytes_per_device
                    ):
                        break
                    reclaim[island] = reclaim.get(island, 0) + self.scheduler.held(r.job_id)
                    victims.setdefault(island, []).append(r.job_id)
        room = self.scheduler.candidates(demand, reclaim=reclaim)
        if len(room) < demand.islands:
            return []
        chosen = set()
        for island in room[: demand.islands]:
            chosen.update(victims.get(island, []))
        for job_id in sorted(chosen):
            running = self._running[job_id]
            running.suspend_requested = True
            self.scheduler.interrupt(job_id)
            logger.info(
                "suspending job %s for higher-priority job %s",
                job_id,
                demand.job_id,
                extra={"job_id": job_id},
            )
        return sorted(chosen)

    async def _run_job(self, record: JobRecord, island_ids: list[str]) -> None:
        job_id = record.id
        islands = [self.islands[i] for i in island_ids]
        running = self._running[job_id]
        loaded = False
        attempt: Attempt | None = None
        try:
            self._transition(
                job_id,
                JobState.RUNNING,
                reason="scheduled",
                message=f"Running on {', '.join(island_ids)}.",
            )
            program = await asyncio.to_thread(self._prepare, record)
            logger.info("loading job %s on %s", job_id, island_ids, extra={"job_id": job_id})
            if self.peak_flops is None:
                await asyncio.to_thread(self.measure_peak)
            # From the newest readable committed checkpoint (or the seed), new generation.
            attempt, replies = await self.recovery.load(program, islands)
            program = attempt.program
            # The compiled step's own memory analysis replaces the estimate it was admitted on.
            measured = max(max(r.memory.total_bytes, r.estimate_bytes_per_device) for r in replies)
            self._demand_bytes[job_id] = measured
            self.scheduler.resize(job_id, measured)
            loaded = running.loaded = True
            self.job_memory[job_id] = max(r.memory.total_bytes for r in replies)
            logger.info(
                "job %s loaded (compile %.1f s, %d bytes per device)",
                job_id,
                max(r.compile_s for r in replies),
                max(r.memory.total_bytes for r in replies),
                extra={"job_id": job_id},
            )
            completed = 0
            while True:
                self.scheduler.join(job_id, island_ids, record.weight)
                try:
                    completed += await self.dispatcher.run(
                        dataclasses.replace(program, start_step=program.start_step + completed),
                        islands,
                        on_step=lambda report: self._step_done(job_id, report, attempt),
                        should_stop=lambda: running.cancel_requested or running.suspend_requested,
                        gate=self.scheduler,
                    )
                finally:
                    self.scheduler.leave(job_id)
                done = program.start_step + completed >= program.steps
                if running.cancel_requested or done or not running.suspend_requested:
                    break
                await self._suspend(running, islands, program.start_step + completed)
                if running.cancel_requested:
                    break
            await self.recovery.finish(attempt, islands)
            if loaded and not running.cancel_requested:
                # A job that says it ended has freed its memory on every island.
                loaded = False
                await self.dispatcher.unload(job_id, islands)
            if not running.cancel_requested:
                self._transition(
                    job_id,
                    JobState.SUCCEEDED,
                    reason="completed",
                    message=f"Completed {completed} steps.",
                )
        except asyncio.CancelledError:
            # The controller is stopping: the job goes back to the queue, nothing is lost.
            if not running.cancel_requested:
                try:
                    self._transition(
                        job_id,
                        JobState.QUEUED,
                        reason="controller_stopped",
                        message="The controller stopped; the job will run again.",
                    )
                    self.recovery.requeue(job_id)
                except StoreError:
                    logger.exception("requeueing job %s", job_id)
            raise
        except (DispatchError, spec_lib.SpecError) as e:
            await self._recover_or_fail(record, running, islands, attempt, e)
        except Exception as e:
            logger.exception("job %s failed", job_id)
            self._fail(job_id, running, "internal", f"{type(e).__name__}: {e}")
        finally:
            running.loaded = False
            self.job_memory.pop(job_id, None)
            self._flops_per_token.pop(job_id, None)
            if loaded:
                await self.dispatcher.unload(job_id, islands)
            self.scheduler.release(job_id)
            self._demand_bytes.pop(job_id, None)
            self.pending.pop(job_id, None)
            self._running.pop(job_id, None)
            self.wake()

    async def _suspend(self, running: _RunningJob, islands: list[Island], step: int) -> None:
        """Move the job's state to host memory on every host, free its device memory, and
        wait until the scheduler resumes it (or it is cancelled)."""
        job_id = running.job_id
        epoch = self.dispatcher.epoch
        await asyncio.gather(
            *(
                host.stub.Suspend(
                    worker_pb2.SuspendRequest(job_id=job_id, epoch=epoch), timeout=300
                )
                for island in islands
                for host in island.hosts
            )
        )
        running.resume.clear()
        self.scheduler.release(job_id)
        self._transition(
            job_id,
            JobState.SUSPENDED,
            reason="preempted",
            message=f"Suspended at step {step} for a higher-priority job; state in host memory.",
        )
        self.wake()
        await running.resume.wait()
        running.suspend_requested = False
        if running.cancel_requested:
            return
        await asyncio.gather(
            *(
                host.stub.Resume(worker_pb2.ResumeRequest(job_id=job_id, epoch=epoch), timeout=300)
                for island in islands
                for host in island.hosts
            )
        )
        self._transition(
            job_id, JobState.RUNNING, reason="resumed", message=f"Resumed at step {step}."
        )

    async def _recover_or_fail(
        self,
        record: JobRecord,
        running: _RunningJob,
        islands: list[Island],
        attempt: Attempt | None,
        error: DispatchError | spec_lib.SpecError,
    ) -> None:
        """A failed attempt: user errors fail the job at once; other classes roll it back
        (controller/recovery.py) and queue it again while their retry budget lasts."""
        reason = getattr(error, "reason", "invalid_spec")
        if running.cancel_requested:
            self._fail(record.id, running, reason, error.message)
            return
        try:
            retry = await self.recovery.retry(record, attempt, islands, error)
        except Exception:
            logger.exception("recovering job %s", record.id)
            retry = False
        if not retry:
            from .recovery import FailureClass, classify

            prefix = "User error, not retried: " if classify(error) == FailureClass.USER else ""
            self._fail(record.id, running, reason, prefix + error.message)
            return
        self._transition(
            record.id,
            JobState.QUEUED,
            reason="retry",
            message=f"Rolled back after a failure; it resumes from step "
            f"{self.recovery.resume_step(record.id)}: {error.message[:500]}",
        )

    def _step_done(self, job_id: str, report: StepReport, attempt: Attempt | None) -> None:
        """Record the step, then register the checkpoints it reports committed."""
        self._on_step(job_id, report)
        if attempt is not None:
            self.recovery.on_step(attempt, report.checkpoints_committed)

    def _fail(self, job_id: str, running: _RunningJob, reason: str, message: str) -> None:
        logger.warning("job %s failed: %s", job_id, message, extra={"job_id": job_id})
        if running.cancel_requested:
            return
        self.failures_total += 1
        try:
            self._transition(job_id, JobState.FAILED, reason=reason, message=message[:2000])
        except StoreError:
            logger.exception("recording the failure of job %s", job_id)

    def _on_step(self, job_id: str, report: StepReport) -> None:
        self.store.record_metrics(
            job_id,
            report.step,
            report.loss,
            tokens_per_s=report.tokens_per_s,
            step_time_s=report.step_time_s,
        )
        self.steps_total += 1
        record = self.store.get_job(job_id)
        metrics = controller_pb2.StepMetrics(
            step=report.step,
            loss=report.loss,
            tokens_per_s=report.tokens_per_s,
            step_time_s=report.step_time_s,
            time=_now(),
            mfu=self.mfu(record, report.tokens_per_s),
        )
        self.events.publish(job_id, controller_pb2.WatchJobReply(time=_now(), metrics=metrics))
        for host in report.hosts:
            if host.host_index == 0 and host.island in self.timeline:
                t = host.reply.timings
                self.timeline[host.island].append(
                    TimelineEntry(job_id, report.step, t.start_unix_ns, t.end_unix_ns)
                )
        for host in report.hosts:
            t = host.reply.timings
            queued_ms = (t.start_unix_ns - t.received_unix_ns) / 1e6
            ran_ms = (t.end_unix_ns - t.start_unix_ns) / 1e6
            ts = timestamp_pb2.Timestamp()
            ts.FromNanoseconds(t.end_unix_ns)
            self.logs.add(
                job_id,
                controller_pb2.LogRecord(
                    time=ts,
                    source=f"{host.island}/{host.host_index}",
                    level="INFO",
                    logger="pathways_lite.workers.service",
                    message=(
                        f"step {report.step} (island_seq {host.reply.island_seq}): loss "
                        f"{host.reply.loss:.6f}, queued {queued_ms:.1f} ms, ran {ran_ms:.1f} ms"
                    ),
                ),
            )

    async def sample(
        self, request: controller_pb2.SampleJobRequest
    ) -> controller_pb2.SampleJobReply:
        """Generate from a running job's current parameters on its first island (every host
        of that island runs the same SPMD decode; host 0 answers).

        Raises:
            JobNotFoundError; IllegalTransitionError when the job holds no parameters;
            ValueError for a bad prompt or setting.
        """
        record = self.store.get_job(request.job_id)
        if not request.prompt:
            raise ValueError("prompt is empty; give some text to continue.")
        if len(request.prompt) > 10_000:
            raise ValueError(f"prompt is {len(request.prompt)} characters; at most 10000.")
        max_new = request.max_new_tokens or 64
        if not 1 <= max_new <= 1024:
            raise ValueError(f"max_new_tokens={request.max_new_tokens} must be in [0, 1024].")
        if not 0 <= request.temperature <= 10:
            raise ValueError(f"temperature={request.temperature} must be in [0, 10].")
        if request.top_k < 0:
            raise ValueError(f"top_k={request.top_k} must be >= 0.")
        wire = worker_pb2.SampleRequest(
            job_id=record.id,
            prompt=request.prompt,
            max_new_tokens=max_new,
            temperature=request.temperature,
            top_k=request.top_k,
            seed=max(0, request.seed),
        )
        if record.state.terminal:
            return await self._sample_checkpoint(record, request, wire)
        running = self._running.get(record.id)
        if running is None or not running.loaded:
            if record.state == JobState.RUNNING:
                why = f"job {record.id!r} is still loading onto its islands; try again shortly."
            else:
                why = (
                    f"job {record.id!r} is {record.state.value}: it holds no parameters until "
                    "it runs."
                )
            raise IllegalTransitionError(why)
        island = self.islands[running.islands[0]]
        reply = await self._sample_on(island, record.id, wire)
        return controller_pb2.SampleJobReply(
            job_id=record.id,
            prompt=request.prompt,
            text=reply.text,
            steps_applied=reply.steps_applied,
            island=island.id,
            seconds=reply.seconds,
        )

    async def _sample_on(
        self, island: Island, job_id: str, wire: worker_pb2.SampleRequest
    ) -> worker_pb2.SampleReply:
        """The Sample rpc on every host of `island` (host 0's reply), errors mapped for users."""
        try:
            replies = await asyncio.gather(
                *(host.stub.Sample(wire, timeout=300) for host in island.hosts)
            )
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise ValueError(e.details()) from None
            if e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                raise IllegalTransitionError(
                    f"job {job_id!r} cannot be sampled now: {e.details()}"
                ) from None
            raise
        return replies[0]

    async def _sample_checkpoint(
        self,
        record: JobRecord,
        request: controller_pb2.SampleJobRequest,
        wire: worker_pb2.SampleRequest,
    ) -> controller_pb2.SampleJobReply:
        """Sample an ended job from its newest committed checkpoint: load it on one island
        with room (under a load key of its own, so it never meets a run of the job), run
        Sample, and unload it again whatever happens.

        Raises:
            IllegalTransitionError: the job ended without a committed checkpoint, or the
                checkpoint cannot be loaded.
            NoRoomError: no island has room for it now.
        """
        checkpoint = self.store.latest_checkpoint(record.id)
        if checkpoint is None:
            raise IllegalTransitionError(
                f"job {record.id!r} has ended ({record.state.value}) without a committed "
                "checkpoint, so no parameters of it remain to sample from."
            )
        self._sample_loads += 1
        key = f"{record.id[:100]}.sample-{self._sample_loads}"
        devices = record.spec.mesh.data * record.spec.mesh.model
        demand = Demand(key, 1, self.estimate_bytes(record.spec), record.priority)
        room = [i for i in self.scheduler.candidates(demand) if self.islands[i].devices == devices]
        if not room or self.scheduler.place(demand, room[:1]) is None:
            raise NoRoomError(
                f"job {record.id!r} has ended ({record.state.value}); sampling its checkpoint "
                f"at step {checkpoint.step} needs {demand.bytes_per_device} bytes per device on "
                f"an island of {devices} devices, and none has room now; try again later."
            )
        island = self.islands[room[0]]
        try:
            program = await asyncio.to_thread(self._prepare, record)
            inner = program.load

            def load(index: int, count: int) -> worker_pb2.LoadJobRequest:
                load_request = inner(index, count)
                load_request.job_id = key
                load_request.checkpoint_dir = ""  # reads the checkpoint, writes none
                load_request.restore_from = checkpoint.path
                return load_request

            logger.info(
                "loading job %s's checkpoint at step %d on %s to sample it",
                record.id,
                checkpoint.step,
                island.id,
                extra={"job_id": record.id},
            )
            try:
                await self.dispatcher.load(
                    dataclasses.replace(program, job_id=key, load=load), [island]
                )
            except DispatchError as e:
                raise IllegalTransitionError(
                    f"job {record.id!r}'s checkpoint at step {checkpoint.step} "
                    f"({checkpoint.path}) could not be loaded for sampling: {e.message}"
                ) from None
            wire.job_id = key
            reply = await self._sample_on(island, record.id, wire)
        finally:
            await self.dispatcher.unload(key, [island])
            self.scheduler.release(key)
            self.wake()
        return controller_pb2.SampleJobReply(
            job_id=record.id,
            prompt=request.prompt,
            text=reply.text,
            steps_applied=reply.steps_applied,
            island=island.id,
            seconds=reply.seconds,
            checkpoint=checkpoint.path,
        )

    def islands_proto(self) -> list[controller_pb2.Island]:
        out = []
        for island in self.islands.values():
            hosts = []
            for host in island.hosts:
                info = host.info
                hosts.append(
                    controller_pb2.IslandHost(
                        node=info.node_ip,
                        address=info.address,
                        port=info.port,
                        pid=info.pid,
                        devices=len(info.devices),
                        device_kind=info.devices[0].platform if info.devices else "",
                        memory_bytes=info.memory_budget_bytes_per_device * len(info.devices),
                        wire_version=info.wire_version,
                        state="dead" if island.id in self.scheduler.down else "ready",
                    )
                )
            out.append(
                controller_pb2.Island(
                    id=island.id,
                    hosts=hosts,
                    devices=island.devices,
                    job_ids=self.scheduler.jobs_on(island.id),
                    down=self.scheduler.down.get(island.id, ""),
                )
            )
        return out


# ---- the servicer --------------------------------------------------------------------------


def _rpc(method):
    """Map store and spec errors to their gRPC status; any other exception to INTERNAL."""

    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except spec_lib.InfeasibleSpecError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, e.message)
        except spec_lib.SpecError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, e.message)
        except JobNotFoundError as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except IllegalTransitionError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except NoRoomError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except StoreError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except Exception as e:
            if isinstance(e, asyncio.CancelledError):
                raise
            logger.exception("%s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__} failed: {e!r}")

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper


def _stream(method):
    """The server-streaming twin of `_rpc` (an async generator)."""

    async def wrapper(self, request, context):
        try:
            async for item in method(self, request, context):
                yield item
        except JobNotFoundError as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Exception as e:
            if isinstance(e, asyncio.CancelledError):
                raise
            logger.exception("%s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__} failed: {e!r}")

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper


class ControllerServicer(controller_pb2_grpc.ControllerServiceServicer):
    """controller.proto's ControllerService over a `Controller`."""

    def __init__(self, controller: Controller) -> None:
        self.c = controller

    @_rpc
    async def SubmitJob(self, request: controller_pb2.SubmitJobRequest, context) -> Any:
        """Validate the spec (INVALID_ARGUMENT naming the field) and queue the job."""
        return controller_pb2.SubmitJobReply(job=self.c.submit(request))

    @_rpc
    async def GetJob(self, request: controller_pb2.GetJobRequest, context) -> Any:
        """One job with its losses."""
        record = self.c.store.get_job(request.job_id)
        return controller_pb2.GetJobReply(job=self.c.job_proto(record))

    @_rpc
    async def ListJobs(self, request: controller_pb2.ListJobsRequest, context) -> Any:
        """A page of jobs, oldest first."""
        states = [JobState.from_proto(s) for s in request.states]
        records, token = self.c.store.list_jobs(
            page_size=request.page_size, page_token=request.page_token, states=states
        )
        jobs = [self.c.job_proto(r, include_losses=request.include_losses) for r in records]
        return controller_pb2.ListJobsReply(jobs=jobs, next_page_token=token)

    @_rpc
    async def CancelJob(self, request: controller_pb2.CancelJobRequest, context) -> Any:
        """Cancel a queued or running job."""
        return controller_pb2.CancelJobReply(job=self.c.cancel(request.job_id, request.reason))

    @_rpc
    async def UpdateJob(self, request: controller_pb2.UpdateJobRequest, context) -> Any:
        """Re-prioritise a queued, running or suspended job."""
        return controller_pb2.UpdateJobReply(job=self.c.update(request.job_id, request.priority))

    @_stream
    async def WatchJob(
        self, request: controller_pb2.WatchJobRequest, context
    ) -> AsyncIterator[controller_pb2.WatchJobReply]:
        """The job's record, its recorded metrics from from_step, then live updates."""
        if request.from_step < 0:
            raise ValueError(f"from_step={request.from_step} must be >= 0.")
        record = self.c.store.get_job(request.job_id)
        queue = self.c.events.subscribe(record.id)
        try:
            record = self.c.store.get_job(request.job_id)  # after subscribing: nothing missed
            yield controller_pb2.WatchJobReply(time=_now(), job=self.c.job_proto(record))
            last_step = request.from_step - 1
            for m in self.c.store.metrics(record.id, from_step=request.from_step):
                ts = timestamp_pb2.Timestamp()
                ts.FromMicroseconds(m.time_us)
                yield controller_pb2.WatchJobReply(
                    time=ts,
                    metrics=controller_pb2.StepMetrics(
                        step=m.step,
                        loss=m.loss,
                        tokens_per_s=m.tokens_per_s,
                        step_time_s=m.step_time_s,
                        time=ts,
                        mfu=self.c.mfu(record, m.tokens_per_s),
                    ),
                )
                last_step = m.step
            if record.state.terminal:
                return
            while True:
                update = await queue.get()
                if update.HasField("metrics"):
                    if update.metrics.step <= last_step:
                        continue
                    last_step = update.metrics.step
                yield update
                if update.HasField("job") and JobState.from_proto(update.job.state).terminal:
                    return
        finally:
            self.c.events.unsubscribe(record.id, queue)

    @_rpc
    async def ListIslands(self, request: controller_pb2.ListIslandsRequest, context) -> Any:
        """Every island and its hosts."""
        return controller_pb2.ListIslandsReply(islands=self.c.islands_proto())

    @_stream
    async def StreamLogs(
        self, request: controller_pb2.StreamLogsRequest, context
    ) -> AsyncIterator[controller_pb2.StreamLogsReply]:
        """The job's buffered records (the newest `tail`), then new ones with follow."""
        if request.tail < 0:
            raise ValueError(f"tail={request.tail} must be >= 0.")
        record = self.c.store.get_job(request.job_id)
        queue = self.c.logs.followers.subscribe(record.id)
        try:
            for item in self.c.logs.records(record.id, request.tail):
                yield controller_pb2.StreamLogsReply(record=item)
            if not request.follow:
                return
            events = self.c.events.subscribe(record.id)
            try:
                while not self.c.store.get_job(record.id).state.terminal:
                    getter = asyncio.ensure_future(queue.get())
                    watcher = asyncio.ensure_future(events.get())
                    done, _ = await asyncio.wait(
                        {getter, watcher}, return_when=asyncio.FIRST_COMPLETED
                    )
                    for pending in (getter, watcher):
                        if pending not in done:
                            pending.cancel()
                    if getter in done:
                        yield controller_pb2.StreamLogsReply(record=getter.result())
                while not queue.empty():
                    yield controller_pb2.StreamLogsReply(record=queue.get_nowait())
            finally:
                self.c.events.unsubscribe(record.id, events)
        finally:
            self.c.logs.followers.unsubscribe(record.id, queue)

    @_rpc
    async def Sample(self, request: controller_pb2.SampleJobRequest, context) -> Any:
        """Text from a running job's current parameters."""
        return await self.c.sample(request)

    @_rpc
    async def Info(self, request: controller_pb2.ControllerInfoRequest, context) -> Any:
        """Wire version, package version, epoch, state dir."""
        return controller_pb2.ControllerInfoReply(
            wire_version=common_pb2.WireVersion(version=CONTROLLER_WIRE_VERSION),
            version=pathways_lite.__version__,
            epoch=self.c.epoch,
            state_dir=self.c.state_dir,
            started_at=self.c.started_at,
        )


async def serve(
    controller: Controller,
    host: str,
    port: int = 0,
    *,
    started: Callable[[int], Any] | None = None,
    stop: asyncio.Event | None = None,
    grace_s: float = 5.0,
    token: str | None = None,
) -> None:
    """Serve the controller, grpc.health.v1 and reflection on host:port until `stop` is set.

    Args:
        controller: the controller (started here, stopped on the way out).
        host: the address to bind (127.0.0.1 unless a user asks otherwise).
        port: the port; 0 picks a free one.
        started: called with the bound port once the server accepts calls.
        stop: set to stop serving; None serves until cancelled.
        grace_s: seconds in-flight calls get when stopping.
        token: the access token every call but health and reflection must carry
            (controller/auth.py); None serves without one (in-process tests only).
    """
    from .auth import TokenInterceptor

    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", 16 * 1024 * 1024)],
        interceptors=[TokenInterceptor(token)] if token is not None else None,
    )
    controller_pb2_grpc.add_ControllerServiceServicer_to_server(
        ControllerServicer(controller), server
    )
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
        raise OSError(f"could not bind the controller service to {host}:{port}.")
    await controller.start()
    try:
        await server.start()
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        logger.info("controller on %s:%d (epoch %d)", host, bound, controller.epoch)
        if started is not None:
            started(bound)
        if stop is None:
            await server.wait_for_termination()
        else:
            await stop.wait()
    finally:
        await health.enter_graceful_shutdown()
        await server.stop(grace_s)
        await controller.stop()
