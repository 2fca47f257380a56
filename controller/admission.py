"""Admission and preemption: which queued or suspended job starts, resumes or waits, and why.

One pass goes over the queued and suspended jobs in priority-then-submission order (the
store's order). A job is placed only when all of its islands have room for what it will
really hold at once (the scheduler's `place`, controller/scheduler.py): its compiled step's
measured bytes per device when a job of the same (model, mesh, batch) has loaded before, else
the estimator's upper bound (controller/resolved.py's `MemoryFigures`). The sum of the
residents of an island never exceeds its budget.

A job that can wait ahead of others does not idle the cluster: a job behind it starts at once
when it fits, provided every job waiting ahead of it would still fit beside the jobs started
this way once the jobs it waits on have left (so such jobs never postpone it for good). The
first job that waits may suspend lower-priority resident jobs to make room: the fewest
islands' worth, lowest priority (then newest) first. A suspended job resumes on its own
islands (its state is in their hosts' memory) as soon as they have room again, and may itself
preempt there. A job that can never fit (its demand is above every budget left: the budget
shrank, an island was lost for good) holds nobody back; it says so in `why` and in its events.
Every job left waiting gets one sentence saying why (`pending`). A queued job whose `after`
(or `init_from.job`) has not succeeded yet waits apart and holds nobody back (`why` names the
jobs it waits for); once one of them failed or was cancelled, it fails with that reason
(controller/lineage.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from . import lineage
from .jobs import JobRunner
from .resolved import MemoryFigures, ResolvedJob
from .scheduler import Demand, Scheduler
from .states import JobState
from .store import JobRecord, JobStore

logger = logging.getLogger(__name__)


class Admission:
    """Admits, resumes and preempts jobs on the scheduler's islands.

    Args:
        store: the job store (the queue).
        scheduler: the islands' memory and who holds them.
        runners: the jobs placed on islands, by id (admission adds to it via `start`).
        resolve: a job's ResolvedJob (resolved once, cached by the controller).
        start: starts a runner for a record placed on the given islands.
        requeue_suspended: moves a job suspended under an earlier controller back to the
            queue; returns its record.
        memory: measured bytes per device by (model, mesh, batch); None starts empty.
        fail: fails a job with (job id, reason, message): a job whose dependency failed.
    """

    def __init__(
        self,
        store: JobStore,
        scheduler: Scheduler,
        runners: Mapping[str, JobRunner],
        resolve: Callable[[JobRecord], ResolvedJob | None],
        start: Callable[[JobRecord, list[str]], None],
        requeue_suspended: Callable[[JobRecord], JobRecord],
        memory: MemoryFigures | None = None,
        fail: Callable[[str, str, str], None] | None = None,
    ) -> None:
        self.store = store
        self.scheduler = scheduler
        self.runners = runners
        self._resolve = resolve
        self._start = start
        self._requeue_suspended = requeue_suspended
        self.memory = memory if memory is not None else MemoryFigures()
        self._fail = fail
        # Why each waiting job waits, for people.
        self.pending: dict[str, str] = {}
        # Jobs started while a job ahead of them waited: they count as staying for good when
        # admission checks that the jobs ahead still fit.
        self._backfilled: set[str] = set()
        # Jobs told (in an event) that they can never fit, with the sentence they were told.
        self._parked: dict[str, str] = {}

    def demand(self, record: JobRecord) -> Demand:
        """What the job asks of the cluster: its compiled step's bytes once it has loaded (or
        once a job of the same model, mesh and batch has), else the estimator's upper bound
        (0 when its spec no longer resolves)."""
        runner = self.runners.get(record.id)
        if runner is not None:
            bytes_per_device = runner.demand_bytes
        else:
            job = self._resolve(record)
            bytes_per_device = 0 if job is None else self.memory.bytes_per_device(job)
        return Demand(
            record.id, record.spec.islands, bytes_per_device, record.priority, record.weight
        )

    def schedule(self) -> None:
        """One scheduling pass over the queued and suspended jobs, priority then submission:
        admit what fits (all islands or none) without postponing the jobs ahead for good,
        resume suspended jobs whose islands have room, suspend lower-priority jobs for the
        first job that waits, and say why the rest wait."""
        self._backfilled = {j for j in self._backfilled if self.scheduler.held(j)}
        waiting = self.store.jobs_in_states([JobState.QUEUED, JobState.SUSPENDED])
        ahead: list[tuple[Demand, tuple[str, ...] | None]] = []
        for record in waiting:
            runner = self.runners.get(record.id)
            if runner is not None and record.state == JobState.QUEUED:
                continue  # placed on this pass or an earlier one; its task starts it
            if record.state == JobState.QUEUED and self.waits_on_dependencies(record):
                continue  # holds nobody back: it could not start if it fitted
            if record.state == JobState.SUSPENDED and runner is None:
                # Suspended under an earlier controller: its host copy is gone with it.
                record = self._requeue_suspended(record)
                runner = None
            suspended = record.state == JobState.SUSPENDED
            if suspended and runner is not None and runner.resume.is_set():
                continue
            demand = self.demand(record)
            own = tuple(runner.islands) if suspended and runner is not None else None
            never = self.scheduler.never_fits(demand.islands, demand.bytes_per_device, own)
            if never is not None:
                self._park(record, never)
                continue
            self._parked.pop(record.id, None)
            islands = self._place(demand, own, ahead)
            if islands is not None:
                self.pending.pop(record.id, None)
                if ahead:
                    self._backfilled.add(record.id)
                if suspended:
                    assert runner is not None
                    runner.resume.set()
                else:
                    self._start(record, islands)
                continue
            victims = self.preempt(demand, own) if not ahead else []
            holders = sorted(
                {j for i in own or self.scheduler.island_ids for j in self.scheduler.jobs_on(i)}
            )
            reason = (
                self.scheduler.lacking(demand, own)
                + (f" Waits on {', '.join(holders)}." if holders else "")
                + (f" Suspending lower-priority {', '.join(victims)}." if victims else "")
            )
            if ahead:
                reason += (
                    f" Jobs ahead in the queue wait too ({', '.join(d.job_id for d, _ in ahead)})."
                )
            self.pending[record.id] = ("Suspended: " if suspended else "") + reason
            ahead.append((demand, own))

    def waits_on_dependencies(self, record: JobRecord) -> bool:
        """A queued job whose `after` (or `init_from.job`) has not succeeded yet waits, saying
        for which; one whose dependency failed or was cancelled fails with that reason."""
        waiting, failed = lineage.blockers(self.store, record)
        if failed is not None:
            self.pending.pop(record.id, None)
            message = (
                f"Job {failed.id} ({failed.name}), which it runs after, is "
                f"{failed.state.value}" + (f": {failed.message}" if failed.message else ".")
            )
            if self._fail is not None:
                self._fail(record.id, f"dependency_{failed.state.value}", message)
            return True
        if not waiting:
            return False
        self.pending[record.id] = (
            f"Waits for {', '.join(waiting)} to succeed (after"
            + (", init_from" if record.spec.init_from.job in waiting else "")
            + ")."
        )
        return True

    def _place(
        self,
        demand: Demand,
        own: Sequence[str] | None,
        ahead: Sequence[tuple[Demand, tuple[str, ...] | None]],
    ) -> list[str] | None:
        """Place `demand` (on `own` islands when given) if it fits now and every job waiting
        ahead would still fit beside it and the other jobs started past them."""
        sched = self.scheduler
        if own is not None:
            chosen = list(own)
            if any(sched.free_bytes(i) < demand.bytes_per_device for i in chosen):
                return None
            if any(i in sched.down for i in chosen):
                return None
        else:
            chosen = []
            for island in sched.candidates(demand):
                if len(chosen) == demand.islands:
                    break
                if self._ahead_still_fit(ahead, demand, [*chosen, island]):
                    chosen.append(island)
            if len(chosen) < demand.islands:
                return None
        if not self._ahead_still_fit(ahead, demand, chosen):
            return None
        return sched.place(demand, sorted(chosen, key=sched.island_ids.index))

    def _ahead_still_fit(
        self,
        ahead: Sequence[tuple[Demand, tuple[str, ...] | None]],
        demand: Demand,
        islands: Sequence[str],
    ) -> bool:
        """Whether every job waiting ahead could be placed once the jobs it waits on leave,
        with `demand` on `islands` and the jobs already started past it staying."""
        sched = self.scheduler
        for waiter, own in ahead:
            without = with_ = 0
            for i in own or sched.island_ids:
                if i in sched.down:
                    continue
                budget = sched.budget(i) or float("inf")
                staying = sum(sched.held(j) for j in sched.jobs_on(i) if j in self._backfilled)
                without += budget - staying >= waiter.bytes_per_device
                if i in islands:
                    staying += demand.bytes_per_device
                with_ += budget - staying >= waiter.bytes_per_device
            # Only a placement that takes away room the waiter needs holds it back.
            if with_ < (len(own) if own else waiter.islands) and with_ < without:
                return False
        return True

    def _park(self, record: JobRecord, never: str) -> None:
        """A job that can never fit: it holds nobody back, and says so once in its events."""
        suspended = record.state == JobState.SUSPENDED
        sentence = (
            "Suspended, and it can never resume on its islands: "
            if suspended
            else "It can never run on this cluster as it is: "
        ) + never
        self.pending[record.id] = sentence
        if self._parked.get(record.id) != sentence:
            self._parked[record.id] = sentence
            logger.warning("job %s: %s", record.id, sentence, extra={"job_id": record.id})
            self.store.add_event(record.id, "scheduler", sentence)

    def preempt(self, demand: Demand, own: Sequence[str] | None = None) -> list[str]:
        """Suspend lower-priority resident jobs so that `demand` fits (on `own` islands when
        given): the fewest islands' worth, lowest priority (then newest) first. Returns the
        jobs asked to suspend."""
        reclaim: dict[str, int] = {}
        victims: dict[str, list[str]] = {}
        lower = sorted(
            (
                r
                for r in self.runners.values()
                if r.priority < demand.priority
                and not r.suspend_requested
                and not r.cancel_requested
                and self.scheduler.held(r.job_id)
            ),
            key=lambda r: (r.priority, -self.store.get_job(r.job_id).created_us),
        )
        for island in own or self.scheduler.island_ids:
            for r in lower:
                if island in self.scheduler.islands_of(r.job_id):
                    if self.scheduler.free_bytes(island) + reclaim.get(island, 0) >= (
                        demand.bytes_per_device
                    ):
                        break
                    reclaim[island] = reclaim.get(island, 0) + self.scheduler.held(r.job_id)
                    victims.setdefault(island, []).append(r.job_id)
        if own is not None:
            room = [
                i
                for i in own
                if self.scheduler.free_bytes(i) + reclaim.get(i, 0) >= demand.bytes_per_device
            ]
            if len(room) < len(own):
                return []
        else:
            room = self.scheduler.candidates(demand, reclaim=reclaim)
            if len(room) < demand.islands:
                return []
        chosen = set()
        for island in room[: len(own) if own else demand.islands]:
            chosen.update(victims.get(island, []))
        for job_id in sorted(chosen):
            self.runners[job_id].request_suspend()
            logger.info(
                "suspending job %s for higher-priority job %s",
                job_id,
                demand.job_id,
                extra={"job_id": job_id},
            )
        return sorted(chosen)
