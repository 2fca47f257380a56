"""The single controller: it wires the roles together and takes users' requests.

`Controller` owns the job store (locked state dir + epoch), the islands (controller/islands.py),
the scheduler, and one job runner per placed job (controller/jobs.py). Each role has its file
and gets only the collaborators it uses: admission and preemption (admission.py), the runners
(jobs.py), sampling (sampling.py), the views (views.py), the event bus and log buffer (bus.py).
What stays here is the life cycle (start, stop, lost islands brought back), the user's
submit / cancel / update, and each job's spec resolved once (`resolved`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pathways_lite.v1 import controller_pb2, worker_pb2

from . import lineage
from . import spec as spec_lib
from .admission import Admission
from .bus import EventBus, LogBuffer, now
from .data_paths import check_data_paths
from .dispatch import DEFAULT_SLICE_S, DEFAULT_WINDOW, Dispatcher
from .islands import DeathWatch, Island
from .jobs import Collaborators, JobRunner, Reporter
from .options import format_size
from .peer_recovery import PeerRecovery
from .recovery import Recovery
from .resolved import MemoryFigures, ResolvedJob
from .sampling import Sampler
from .scheduler import Scheduler
from .serve_router import ServeArbiter, ServeRouter
from .states import IllegalTransitionError, JobState, RequestReusedError, StoreUnavailableError
from .store import JobRecord, JobStore
from .views import TimelineEntry, Views, job_record_proto

logger = logging.getLogger(__name__)

# Job log files, below the state dir.
LOGS_DIR = "logs"
# How often the controller tries to restart an island it lost (its node may come back).
REVIVE_EVERY_S = 15.0


_UNKNOWN = object()  # not resolved yet (None: does not resolve)


def settle_heap() -> None:
    """Once a controller process is up: move every object it holds now (JAX, Flax, gRPC and
    the rest of its imports: most of its heap) out of the garbage collector's reach. Each
    full collection walked them all (90-130 ms with the GIL held, every few seconds under
    load, finding ~0 garbage), stalling every submission and step dispatch in flight; it
    now walks what the controller made since (30-70 ms at 1,000 jobs). For the controller's
    own entry points only (a test process that runs many controllers would keep their
    garbage)."""
    gc.collect()
    gc.freeze()


def prepare_data(record: JobRecord, job: ResolvedJob) -> ResolvedJob:
    """The default data preparation: the job's dataset in the controller's cache."""
    return job if job.dataset is not None else job.with_dataset(record.id)


class Controller:
    """The single controller: jobs, islands, scheduling and dispatch on one event loop.

    Args:
        store: the job store, opened with `JobStore.open_controller` (lock + epoch).
        islands: the connected islands, in island order (with their Ray groups, if they can
            be restarted).
        state_dir: the state directory (reported by Info; checkpoints go below it).
        window: step slices in flight per job.
        slice_s: how long a job's slice of consecutive steps lasts (controller/dispatch.py).
        prepare: prepares a resolved job's data (blocking); default `prepare_data`.
        peak_flops: the peak FLOP/s MFU is measured against on simulated CPU islands
            (`--peak-flops`); None reads this machine's cached peak (measured once).
        backfill: EASY backfill (False: strict priority order; controller/admission.py).
        watch_ray: act on island host deaths as Ray reports them (False: only the gRPC
            errors and deadlines of the steps tell).
        exchange_overlap: "auto", "on" or "off": data-parallel jobs exchange gradients
            during the backward pass (auto: only on islands with accelerators).
    """

    def __init__(
        self,
        store: JobStore,
        islands: Sequence[Island],
        *,
        state_dir: str | Path = "",
        window: int = DEFAULT_WINDOW,
        slice_s: float = DEFAULT_SLICE_S,
        prepare: Callable[[JobRecord, ResolvedJob], ResolvedJob] = prepare_data,
        peak_flops: float | None = None,
        backfill: bool = True,
        watch_ray: bool = True,
        exchange_overlap: str = "auto",
    ) -> None:
        self.store = store
        self.islands = {island.id: island for island in islands}
        self.state_dir = str(state_dir)
        self.dispatcher = Dispatcher(
            store.epoch, window=window, slice_s=slice_s, exchange_overlap=exchange_overlap
        )
        self.scheduler = Scheduler(
            [island.id for island in islands],
            {
                island.id: min(
                    (int(h.info.memory_budget_bytes_per_device) for h in island.hosts), default=0
                )
                for island in islands
            },
            slots=max(2, window),
            hosts={island.id: len(island.hosts) for island in islands},
        )
        self.events = EventBus()
        # Job logs persist in `<state_dir>/logs` (rotated per job), so restarts keep them.
        self.logs = LogBuffer(Path(state_dir) / LOGS_DIR if state_dir else None)
        # Failure classes, retries, checkpoints (`<state_dir>/checkpoints`), island restarts.
        self.recovery = Recovery(
            store, self.dispatcher, state_dir=state_dir, on_island_lost=self._island_lost
        )
        self.runners: dict[str, JobRunner] = {}
        # What jobs really hold, measured at their loads, by (model, mesh, batch).
        self.memory = MemoryFigures()
        # Each job's spec resolved once (at submit, or when first seen after a restart).
        self._resolved: dict[str, ResolvedJob | None] = {}
        self.admission = Admission(
            store,
            self.scheduler,
            self.runners,
            self.resolved,
            self._start_job,
            self._requeue_suspended,
            self.memory,
            fail=lambda job_id, reason, message: self.reporter.fail(job_id, reason, message),
            backfill=backfill,
        )
        self.views = Views(
            store,
            self.scheduler,
            self.islands,
            self.admission.pending,
            self.resolved,
            peak_flops=peak_flops,
        )
        self.views.notes = self.admission.notes
        self.reporter = Reporter(store, self.views, self.events, self.logs)
        self.recovery.flush_metrics = self.reporter.flush  # before registering a checkpoint
        store.on_rollback = self.reporter.rolled_back  # followers get the steps run again
        # Serving before training on shared islands (their slices cut, the island held).
        self.serving = ServeRouter(
            store, ServeArbiter(self.scheduler, self.dispatcher, self._serve_period)
        )
        self._parts = Collaborators(
            store=store,
            scheduler=self.scheduler,
            dispatcher=self.dispatcher,
            recovery=self.recovery,
            reporter=self.reporter,
            prepare=prepare,
            measure_peak=self.views.measure_peak,
            wake=self.wake,
            memory=self.memory,
            serving=self.serving,
            peers=PeerRecovery(store, self.dispatcher),
        )
        self.sampler = Sampler(
            store,
            self.scheduler,
            self.dispatcher,
            self.islands,
            self.runners,
            self.resolved,
            prepare,
            self.wake,
        )
        # Lost islands being brought back, by island id.
        self._revivers: dict[str, asyncio.Task] = {}
        self._unloads: set[asyncio.Future] = set()
        # The generation of the state hosts kept from an earlier controller, per kept job.
        self._kept_generation: dict[str, int] = {}
        self._wake: asyncio.Event | None = None
        # The loop the controller's state lives on (set by `start`); the service's thread
        # hands work over to it (`on_loop`).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        # A graceful stop is under way (`drain`): nothing new is started.
        self.draining = False
        self._loop_task: asyncio.Task | None = None
        self._death_watch: DeathWatch | None = None
        self._watch_ray = watch_ray
        self._deaths: set[asyncio.Task] = set()
        self._peak_task: asyncio.Task | None = None
        self.started_at = now()

    # -- what the servicer and the dashboard read --------------------------------------

    @property
    def epoch(self) -> int:
        return self.store.epoch

    @property
    def steps_total(self) -> int:
        return self.reporter.steps_total

    @property
    def failures_total(self) -> int:
        return self.reporter.failures_total

    @property
    def job_memory(self) -> dict[str, int]:
        return self.reporter.job_memory

    @property
    def timeline(self) -> dict[str, Any]:
        return self.views.timeline

    def _serve_period(self, island: str, job_id: str, start_ns: int, end_ns: int, n: int) -> None:
        """A serve job's busy period on `island`, on the island's timeline beside the
        training steps its hosts timed (the dashboard's shares)."""
        timeline = self.views.timeline.get(island)
        if timeline is not None:
            timeline.append(TimelineEntry(job_id, n, start_ns, end_ns))

    @property
    def pending(self) -> dict[str, str]:
        return self.admission.pending

    def job_proto(self, record: JobRecord, *, include_losses: bool = True) -> controller_pb2.Job:
        return self.views.job(record, include_losses=include_losses)

    def islands_proto(self) -> list[controller_pb2.Island]:
        return self.views.island_list()

    def mfu(self, record: JobRecord, tokens_per_s: float) -> float:
        return self.views.mfu(record, tokens_per_s)

    def why(self, record: JobRecord) -> str:
        return self.views.why(record)

    def resolved(self, record: JobRecord) -> ResolvedJob | None:
        """The job's spec resolved once (None when it no longer resolves); kept only when
        asked on the controller's loop (the service's thread reads, never writes)."""
        job = self._resolved.get(record.id, _UNKNOWN)
        if job is not _UNKNOWN:
            return job
        try:
            job = ResolvedJob.resolve(record.spec)
        except (spec_lib.SpecError, ValueError):
            job = None
        if self._loop_thread in (None, threading.get_ident()):
            self._resolved[record.id] = job
        return job

    def cluster_shape(self) -> spec_lib.ClusterShape | None:
        devices = {island.devices for island in self.islands.values()}
        if not self.islands or len(devices) != 1:
            return None
        return spec_lib.ClusterShape(len(self.islands), devices.pop())

    # -- life cycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Requeue jobs a previous controller left running, then start scheduling."""
        self._loop = self.logs.loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        logging.getLogger("pathways_lite").addHandler(self.logs)
        for record in self.store.jobs_in_states([JobState.RUNNING]):
            peers = self._parts.peers
            if peers is not None and spec_lib.job_kind(record.spec) == "train":
                # Its hosts may still hold its state (controller/peer_recovery.py's adopt);
                # if not, its load truncates the metrics to the checkpoint it restores.
                step = self.store.steps_completed(record.id)
                peers.remember(record.id, record.generation, step)
                # Placed on the islands whose hosts hold it (their Info at attach), if whole.
                kept = tuple(
                    island.id
                    for island in self.islands.values()
                    if island.hosts and all(record.id in h.info.loaded_jobs for h in island.hosts)
                )
                if len(kept) == record.spec.islands:
                    self.admission.kept_on[record.id] = kept
                    self._kept_generation[record.id] = record.generation
                self.store.bump_generation(record.id)
            else:
                step = self.recovery.requeue(record.id)
            self.reporter.transition(
                record.id,
                JobState.QUEUED,
                reason="controller_restarted",
                message=f"The controller restarted; the job resumes from step {step}.",
            )
        await self._unload_leftovers()
        self._wake = asyncio.Event()
        self._loop_task = asyncio.create_task(self._schedule_loop(), name="scheduler")
        # Island host deaths as Ray reports them, acted on at once (controller/islands.py).
        if self._watch_ray:
            self._death_watch = DeathWatch(asyncio.get_running_loop(), self._host_died)
            self._death_watch.watch(list(self.islands.values()))
        if self.islands:  # `islands` shows the peak from the start (cached: no measuring)
            # JAX is imported here, on the loop's thread, before a worker thread reads the
            # peak: two threads importing it at once can meet a half-initialised module.
            from pathways_lite.model import estimates  # noqa: F401

            self._peak_task = asyncio.create_task(asyncio.to_thread(self.views.measure_peak))
        self.wake()

    async def _unload_leftovers(self) -> None:
        """Unload what an earlier controller left on the hosts (their Info at attach) and
        this one will not adopt: all but the RUNNING training jobs kept where they are
        (`admission.kept_on`). A job suspended at its crash, cancelled or placed elsewhere
        since, a serve job's replica, a one-off sample: device (or host) memory the scheduler
        does not count, which the next job placed there could run out of. Done before the
        first scheduling pass: an unload names no generation, and must not reach a host
        after a new load of the same job there."""
        request = worker_pb2.UnloadJobRequest
        calls, names = [], []
        for island in self.islands.values():
            if island.dead is not None:
                continue
            for index, host in enumerate(island.hosts):
                for job_id in host.info.loaded_jobs:
                    if island.id in self.admission.kept_on.get(job_id, ()):
                        continue
                    unload = request(job_id=job_id, epoch=self.dispatcher.epoch)
                    calls.append(island.call_host(index, "UnloadJob", unload, timeout=60))
                    names.append(f"{job_id} on {island.id}/{index}")
        if not calls:
            return
        logger.info("unloading what an earlier controller left: %s", ", ".join(names))
        for name, result in zip(
            names, await asyncio.gather(*calls, return_exceptions=True), strict=True
        ):
            if isinstance(result, BaseException):
                logger.warning("unloading %s: %r", name, result)

    def _unload_kept(self, job_id: str, keep: Sequence[str] = ()) -> None:
        """A job whose state hosts kept from an earlier controller (`admission.kept_on`)
        that will not be adopted there (placed elsewhere, cancelled while queued): unload
        it from those islands (but `keep`, where its new load replaces it)."""
        kept = self.admission.kept_on.pop(job_id, None) or self.admission.kept_dropped.pop(
            job_id, None
        )
        # Only the kept generation: a late unload must not remove a newer load there (the
        # job placed back on one of those islands meanwhile).
        generation = self._kept_generation.pop(job_id, None)
        islands = [self.islands[i] for i in kept or () if i not in keep and i in self.islands]
        if islands:
            task = asyncio.ensure_future(self.dispatcher.unload(job_id, islands, generation))
            self._unloads.add(task)
            task.add_done_callback(self._unloads.discard)

    async def stop(self) -> None:
        """Stop dispatching; running jobs go back to the queue (a restart resumes them)."""
        if self._death_watch is not None:
            self._death_watch.stop()
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        if self._peak_task is not None:
            await asyncio.gather(self._peak_task, return_exceptions=True)
        await asyncio.gather(*self._unloads, return_exceptions=True)
        for task in self._revivers.values():
            task.cancel()
        await asyncio.gather(*self._revivers.values(), return_exceptions=True)
        tasks = [r.task for r in self.runners.values() if r.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for island in self.islands.values():
            await island.close()
        logging.getLogger("pathways_lite").removeHandler(self.logs)
        self.logs.close()

    async def drain(self) -> list[controller_pb2.DrainedJob]:
        """Prepare a graceful stop (`pathways-lite down`): start nothing new, checkpoint every
        running job at its next step boundary, unload it and queue it again; then the same
        for the suspended ones (back on their devices once the running ones have left).
        Returns what it did to each job, in job id order.

        A drain its caller gives up on (`pathways-lite down` interrupted, its deadline
        passed) is undone: the jobs asked to drain finish their drain (checkpointed, queued:
        their runners are not cancelled) and the controller schedules again."""
        self.draining = True
        drained: list[controller_pb2.DrainedJob] = []
        runners = list(self.runners.values())
        try:
            for group in (
                [r for r in runners if not r.suspended],
                [r for r in runners if r.suspended],
            ):
                for runner in group:
                    runner.request_drain()
                await asyncio.shield(
                    asyncio.gather(
                        *(r.task for r in group if r.task is not None), return_exceptions=True
                    )
                )
                drained += [r.drained for r in group if r.drained is not None]
        except asyncio.CancelledError:
            logger.warning(
                "the drain was given up by its caller: scheduling again (the jobs it drained "
                "are queued)"
            )
            self.draining = False
            self.wake()
            raise
        logger.info("drained: %s", ", ".join(f"{d.job_id}@{d.step}" for d in drained) or "none")
        return sorted(drained, key=lambda d: d.job_id)

    def wake(self) -> None:
        """Ask for a scheduling pass."""
        self.admission.asked()
        if self._wake is not None:
            self._wake.set()

    async def _schedule_loop(self) -> None:
        """Run a scheduling pass whenever woken. A pass that fails (the database locked
        while it writes an event) left the rest of the queue unexamined: it is run again
        after `retry_s`, not only at the next unrelated event (there may be none); the wait
        doubles while passes keep failing (up to a minute: a lasting fault logs its traceback
        once a minute, not every second) and is back to 1 s after a pass that works."""
        assert self._wake is not None
        retry_s = 1.0
        retry: asyncio.TimerHandle | None = None
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self.draining:
                    continue
                try:
                    self.admission.schedule()
                except Exception:
                    logger.exception("scheduling failed; trying again in %.0f s", retry_s)
                    if retry is not None:
                        retry.cancel()  # one retry pending at most
                    retry = loop.call_later(retry_s, self.wake)
                    retry_s = min(2 * retry_s, 60.0)
                else:
                    retry_s = 1.0
        finally:
            if retry is not None:
                retry.cancel()

    def _start_job(self, record: JobRecord, island_ids: list[str]) -> None:
        self._unload_kept(record.id, keep=island_ids)
        islands = [self.islands[i] for i in island_ids]
        runner = JobRunner(record, self.resolved(record), islands, self._parts)
        self.runners[record.id] = runner
        runner.start(self._job_exited)

    def _job_exited(self, runner: JobRunner) -> None:
        self.admission.pending.pop(runner.job_id, None)
        if self.runners.get(runner.job_id) is runner:
            del self.runners[runner.job_id]
        if self.store.get_job(runner.job_id).state.terminal:
            self._resolved.pop(runner.job_id, None)
        self.wake()

    def _requeue_suspended(self, record: JobRecord) -> JobRecord:
        """A job suspended under an earlier controller: its copy in host memory is not
        adopted; it runs again from its newest committed checkpoint (the metrics after it
        forgotten, those before kept), in a new generation (hosts that still hold the old
        state drop it rather than refuse the load)."""
        step = self.recovery.resume_step(record.id)
        self.reporter.transition(
            record.id,
            JobState.QUEUED,
            reason="controller_restarted",
            message="The controller restarted while the job was suspended; it runs "
            f"again from step {step}.",
        )
        self.recovery.requeue(record.id)
        return self.store.get_job(record.id)

    def _host_died(self, island: Island, generation: int, reason: str) -> None:
        """Ray reports a host of `island` dead: close its channels now (its jobs' steps in
        flight fail at once and their recovery starts); nothing more when already known."""

        async def handle() -> None:
            if not await island.host_died(generation, reason):
                return
            for job_id in self.scheduler.jobs_on(island.id):
                self.store.add_event(job_id, "island", f"Island {island.id}: {reason}.")
                runner = self.runners.get(job_id)
                if runner is not None:
                    runner.poke()  # a serving job has no step to fail: it checks now
            self._suspended_state_lost(island, f"a host of island {island.id} died ({reason})")

        task = asyncio.ensure_future(handle())
        self._deaths.add(task)
        task.add_done_callback(self._deaths.discard)

    def _suspended_state_lost(self, island: Island, reason: str) -> None:
        """The jobs suspended on `island` (not its scheduler's: they released their slots)
        lost the state they kept in its hosts' memory: each rolls back now."""
        for runner in list(self.runners.values()):
            if runner.suspended and island.id in runner.islands:
                self.store.add_event(runner.job_id, "island", f"Island {island.id}: {reason}.")
                runner.request_lost(reason)

    def _island_lost(self, island: Island, reason: str) -> None:
        """An island's hosts could not be restarted: place nothing there (jobs go to free
        islands) and try to bring it back every REVIVE_EVERY_S (its node may return)."""
        if island.id in self.scheduler.down:
            return
        self.scheduler.mark_down(island.id, reason)
        logger.warning("island %s is down: %s", island.id, reason)
        self._suspended_state_lost(island, f"island {island.id} is down ({reason})")
        self._revivers[island.id] = asyncio.create_task(
            self._revive(island), name=f"revive-{island.id}"
        )

    async def _revive(self, island: Island) -> None:
        while True:
            await asyncio.sleep(REVIVE_EVERY_S)
            try:
                await island.restart()
            except Exception as e:
                logger.info("island %s is still down: %s", island.id, e)
                continue
            self.scheduler.mark_up(island.id)
            self._revivers.pop(island.id, None)
            logger.warning("island %s is back", island.id)
            self.wake()
            return

    # -- users' requests -----------------------------------------------------------------

    def submit(self, request: controller_pb2.SubmitJobRequest) -> controller_pb2.Job:
        """Validate, resolve and queue a job. Safe to call from the service's thread
        (controller/service.py): it reads the cluster's shape and budgets, writes only the
        store (thread-safe), and hands the rest to the controller's loop; the job is in the
        store (committed) when this returns.

        Raises:
            spec_lib.SpecError: a bad spec (InfeasibleSpecError: it can never fit).
        """
        (outcome,) = self.submit_many([request])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def submit_many(
        self, requests: Sequence[controller_pb2.SubmitJobRequest]
    ) -> list[controller_pb2.Job | Exception]:
        """`submit` for several requests at once (a burst of concurrent submissions): each
        validated and resolved on its own (a bad one fails alone, its outcome the exception
        `submit` raises: SpecError, or a store error), the good ones queued in one store
        transaction and one hand-off to the controller's loop. Outcomes in request order."""
        outcomes: list[Any] = [None] * len(requests)
        accepted: list[tuple[int, Any, str | None, ResolvedJob]] = []
        for i, request in enumerate(requests):
            try:
                spec, job = self._admissible(request)
            except Exception as e:  # raised to this request's caller alone
                outcomes[i] = e
                continue
            if request.validate_only:
                outcomes[i] = controller_pb2.Job(
                    name=spec.name, state=JobState.QUEUED.to_proto(), spec=spec, created_at=now()
                )
            else:
                accepted.append((i, spec, request.request_id or None, job))
        if not accepted:
            return outcomes
        try:
            created = self.store.create_jobs([(spec, key) for _, spec, key, _ in accepted])
        except Exception as e:  # (locked, say: none of them was queued) raised to each caller
            for i, *_ in accepted:
                outcomes[i] = e
            return outcomes
        # Committed: whatever a view does, every job is handed to the controller's loop (a
        # job seen before by its request id too: a retry after a reply that was lost).
        queued = []
        try:
            for (i, spec, key, job), (record, new) in zip(accepted, created, strict=True):
                if not new and not _same_submission(record.spec, spec):
                    # Not this spec's job (it was answered as if this one had been queued).
                    outcomes[i] = RequestReusedError(
                        f"request_id={key!r} was given to job {record.id} with another spec; "
                        "a new submission needs a new request id (a retry, the same spec)."
                    )
                    continue
                if new:
                    logger.info("job %s queued", record.id, extra={"job_id": record.id})
                view = None
                try:
                    # A new job's view reads no steps, losses, evals or events from the store
                    # (every SQLite call on the server's thread lets the busy controller
                    # thread take the GIL, which it then waits to get back).
                    outcomes[i] = view = self.views.job(record, new=new)
                except Exception:  # noqa: BLE001 - queued all the same: its record alone
                    logger.exception("the view of job %s at its submission", record.id)
                    outcomes[i] = job_record_proto(self.store, record, new=True)
                if new or not record.state.terminal:  # (a finished one is not run again)
                    queued.append((record.id, job, view if new else None))
        finally:
            self.on_loop(self._queued, queued)
        return outcomes

    def _admissible(self, request: controller_pb2.SubmitJobRequest) -> tuple[Any, ResolvedJob]:
        """A submission's spec with its references resolved, and its job resolved.

        Raises:
            spec_lib.SpecError: a bad spec (InfeasibleSpecError: it can never fit).
        """
        spec_lib.validate_spec(request.spec, self.cluster_shape())
        # `after` and `init_from.job` stored as job ids, the sources checked.
        spec = lineage.resolve_references(request.spec, self.store)
        check_data_paths(spec)
        # A spec with no reference to resolve is the one just validated.
        unchanged = not spec.after and not spec.HasField("init_from")
        job = ResolvedJob.resolve(spec, validated=unchanged)
        never = self.scheduler.never_fits(spec.islands, self.memory.bytes_per_device(job))
        if never is not None:
            raise spec_lib.InfeasibleSpecError(
                "islands", spec.islands, f"The job can never run: {never}"
            )
        return spec, job

    def _queued(self, jobs: list[tuple[str, ResolvedJob, controller_pb2.Job | None]]) -> None:
        """Submitted jobs: kept resolved; a new one's view told to its followers (the cluster
        page lists it) unless a pass started it meanwhile; a scheduling pass."""
        for job_id, job, view in jobs:
            self._resolved.setdefault(job_id, job)
            if view is not None and job_id not in self.runners:
                self.events.publish(job_id, controller_pb2.WatchJobReply(time=now(), job=view))
        self.wake()

    def on_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` on the controller's loop: now when called there (or before the
        loop is known), else handed over (the next turn of that loop)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            fn(*args)
            return
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is loop:
            fn(*args)
        else:
            loop.call_soon_threadsafe(fn, *args)

    def cancel(self, job_id: str, reason: str) -> controller_pb2.Job:
        """Cancel a queued or running job (its steps in flight finish on the hosts).

        Raises:
            JobNotFoundError, IllegalTransitionError; sqlite3.OperationalError: the database
                is locked (nothing was cancelled).
        """
        record = self.store.get_job(job_id)
        if record.state.terminal:
            raise IllegalTransitionError(
                f"job {job_id!r} is already {record.state.value}; only queued or running jobs "
                "can be cancelled."
            )
        message = f"Cancelled by a user: {reason[:200]}" if reason else "Cancelled by a user."
        try:
            self.reporter.flush(job_id)  # its steps so far are recorded before it ends
        except StoreUnavailableError as e:
            logger.warning("%s", e)
        # Written before the runner hears of it: a state change the database refuses
        # (locked) cancels nothing, and the caller is told; the other way round the runner
        # stopped and the job stayed running in the store with nothing running it.
        record = self.reporter.transition(
            job_id, JobState.CANCELLED, reason="user_cancelled", message=message
        )
        runner = self.runners.get(job_id)
        if runner is not None:
            runner.request_cancel()
        else:
            self._unload_kept(job_id)
        # A queued job held the jobs behind it back (it may have been the queue's head with
        # no runner: between two attempts, or never placed): a pass now, not at the next
        # event.
        self.wake()
        return self.views.job(record)

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
        runner = self.runners.get(job_id)
        if runner is not None:
            runner.priority = priority  # what preemption compares
        demand_bytes = self.admission.demand(record).bytes_per_device
        logger.info(
            "job %s re-prioritised to %d%s",
            job_id,
            priority,
            f" ({format_size(demand_bytes)} per device)" if demand_bytes else "",
            extra={"job_id": job_id},
        )
        self.wake()
        # Told to its followers (the cluster page shows a queued job's priority).
        try:
            view = self.reporter.followed(record)
            self.events.publish(job_id, controller_pb2.WatchJobReply(time=now(), job=view))
        except Exception:  # noqa: BLE001 - changed all the same
            logger.exception("the record of job %s at its new priority", job_id)
        return self.views.job(record)

    async def sample(
        self, request: controller_pb2.SampleJobRequest
    ) -> controller_pb2.SampleJobReply:
        """Text from a job's parameters (controller/sampling.py)."""
        return await self.sampler.sample(request)


def _same_submission(stored: controller_pb2.JobSpec, spec: controller_pb2.JobSpec) -> bool:
    """Whether a job's stored spec is `spec` submitted again (a retry): its priority aside,
    which UpdateJob changes in the stored spec."""
    a, b = controller_pb2.JobSpec(), controller_pb2.JobSpec()
    a.CopyFrom(stored)
    b.CopyFrom(spec)
    a.ClearField("priority")
    b.ClearField("priority")
    return a == b
