"""Admission and preemption: which queued or suspended job starts, resumes or waits, and why.

One pass goes over the queued and suspended jobs in priority-then-submission order (the
store's order). A job is admitted only when all of its islands fit it at once (the stride
scheduler's `place`, controller/scheduler.py); the first job that does not fit blocks the jobs
behind it (no job overtakes a waiting one), and may suspend lower-priority resident jobs to
make room: the fewest islands' worth, lowest priority (then newest) first. A suspended job
resumes on its own islands once they have room again. Every job left waiting gets one sentence
saying why (`pending`), which `why`, the job view and the dashboard show.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from .jobs import JobRunner
from .resolved import ResolvedJob
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
    """

    def __init__(
        self,
        store: JobStore,
        scheduler: Scheduler,
        runners: Mapping[str, JobRunner],
        resolve: Callable[[JobRecord], ResolvedJob | None],
        start: Callable[[JobRecord, list[str]], None],
        requeue_suspended: Callable[[JobRecord], JobRecord],
    ) -> None:
        self.store = store
        self.scheduler = scheduler
        self.runners = runners
        self._resolve = resolve
        self._start = start
        self._requeue_suspended = requeue_suspended
        # Why each queued job waits, for people.
        self.pending: dict[str, str] = {}

    def demand(self, record: JobRecord) -> Demand:
        """What the job asks of the cluster: the compiled step's bytes once it has loaded,
        else the estimate it was resolved with (0 when its spec no longer resolves)."""
        runner = self.runners.get(record.id)
        if runner is not None:
            bytes_per_device = runner.demand_bytes
        else:
            job = self._resolve(record)
            bytes_per_device = 0 if job is None else job.bytes_per_device
        return Demand(
            record.id, record.spec.islands, bytes_per_device, record.priority, record.weight
        )

    def schedule(self) -> None:
        """One scheduling pass over the queued and suspended jobs, priority then submission:
        admit what fits (all islands or none), resume suspended jobs whose islands have room,
        suspend lower-priority jobs for a higher-priority one, and say why the rest wait."""
        waiting = self.store.jobs_in_states([JobState.QUEUED, JobState.SUSPENDED])
        blocked: list[str] = []
        for record in waiting:
            runner = self.runners.get(record.id)
            if runner is not None and record.state == JobState.QUEUED:
                continue  # placed on this pass or an earlier one; its task starts it
            if record.state == JobState.SUSPENDED and runner is None:
                # Suspended under an earlier controller: its host copy is gone with it.
                record = self._requeue_suspended(record)
            demand = self.demand(record)
            if record.state == JobState.SUSPENDED:
                assert runner is not None
                if runner.resume.is_set():
                    continue
                if self.scheduler.place(demand, runner.islands) is not None:
                    self.pending.pop(record.id, None)
                    runner.resume.set()
                    continue
            elif not blocked:
                islands = self.scheduler.place(demand)
                if islands is not None:
                    self.pending.pop(record.id, None)
                    self._start(record, islands)
                    continue
            preempt = not blocked and record.state == JobState.QUEUED
            victims = self.preempt(demand) if preempt else []
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

    def preempt(self, demand: Demand) -> list[str]:
        """Suspend lower-priority resident jobs so that `demand` fits: the fewest islands'
        worth, lowest priority (then newest) first. Returns the jobs asked to suspend."""
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
            self.runners[job_id].request_suspend()
            logger.info(
                "suspending job %s for higher-priority job %s",
                job_id,
                demand.job_id,
                extra={"job_id": job_id},
            )
        return sorted(chosen)
