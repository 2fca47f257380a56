"""Unit tests of the scheduler and admission (no cluster, no JAX): stride-scheduled step
slots, memory-aware gang placement, down islands, and admission's queue order, reasons,
preemption and resumption over a real job store."""

from __future__ import annotations

import asyncio
import random

import pytest

from pathways_lite.controller.admission import Admission
from pathways_lite.controller.bus import EventBus, LogBuffer
from pathways_lite.controller.dispatch import Dispatcher
from pathways_lite.controller.jobs import Collaborators, JobRunner, Reporter
from pathways_lite.controller.recovery import Recovery
from pathways_lite.controller.resolved import ResolvedJob
from pathways_lite.controller.scheduler import Demand, Scheduler
from pathways_lite.controller.states import JobState
from pathways_lite.controller.store import JobRecord, JobStore
from pathways_lite.controller.views import Views
from pathways_lite.v1 import controller_pb2

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("share_by", ["time", "steps"])
def test_stride_scheduler_shares_follow_weights(share_by) -> None:
    """The scheduler alone (no cluster): two jobs with weights 1:2 and step times 30 ms vs
    70 ms (+-20% noise) share one island with 2 step slots, each job asking for its next slot
    while its previous step runs (as the dispatcher's window does) and the island running
    granted steps one at a time in grant order. Under share_by="time" device seconds follow
    the weights, under "steps" granted slots do."""

    async def simulate() -> tuple[dict[str, float], dict[str, int]]:
        sched = Scheduler(["island-0"], slots=2, share_by=share_by)
        rng = random.Random(0)
        step_s = {"light": 0.030, "heavy": 0.070}
        busy = {j: 0.0 for j in step_s}
        count = {j: 0 for j in step_s}
        sched.join("light", ["island-0"], 1.0)
        sched.join("heavy", ["island-0"], 2.0)
        granted: asyncio.Queue = asyncio.Queue()  # the island's one order of steps

        done = asyncio.Event()

        async def job(job_id: str) -> None:
            while not done.is_set() and await sched.acquire(job_id):
                await granted.put(job_id)

        async def island() -> None:
            while sum(count.values()) < 900:
                job_id = await granted.get()
                took = step_s[job_id] * rng.uniform(0.8, 1.2)
                busy[job_id] += took
                count[job_id] += 1
                await asyncio.sleep(0)
                sched.done(job_id, ["island-0"], took)

        tasks = [asyncio.create_task(job(j)) for j in step_s]
        await island()
        done.set()
        for j in step_s:
            sched.leave(j)
        await asyncio.gather(*tasks)
        return busy, count

    busy, count = asyncio.run(simulate())
    if share_by == "time":
        assert abs(busy["heavy"] / sum(busy.values()) - 2 / 3) <= 0.02, (busy, count)
    else:
        assert abs(count["heavy"] / sum(count.values()) - 2 / 3) <= 0.02, (busy, count)


def test_down_islands_take_no_jobs_until_they_are_back() -> None:
    """The scheduler alone: an island marked down (its hosts lost) is never chosen, an
    explicit placement on it is refused, `why` names it, and it takes jobs again once up."""
    sched = Scheduler(["island-0", "island-1"], {"island-0": 100, "island-1": 100})
    sched.mark_down("island-0", "its node is gone")
    assert sched.place(Demand("a", 1, 10)) == ["island-1"]
    assert sched.free() == []
    assert sched.place(Demand("b", 1, 10), ["island-0"]) is None
    assert sched.place(Demand("b", 1, 10)) == ["island-1"]  # co-resident: room on island-1
    lacking = sched.lacking(Demand("c", 2, 10))
    assert "island-0: down (its node is gone)" in lacking and "1 island(s) have room" in lacking
    assert sched.place(Demand("c", 2, 10)) is None
    sched.mark_up("island-0")
    assert sched.place(Demand("c", 2, 10)) == ["island-0", "island-1"]


# ---- admission over a real store -----------------------------------------------------------

BUDGET = 100


class Cluster:
    """Admission on two islands of BUDGET bytes per device, with a real store and scheduler;
    placed jobs get real (unstarted) runners, as the controller's `start` makes them."""

    def __init__(self, tmp_path, islands=("island-0", "island-1")) -> None:
        self.store = JobStore(tmp_path / "jobs.db")
        self.scheduler = Scheduler(list(islands), {i: BUDGET for i in islands})
        self.runners: dict[str, JobRunner] = {}
        self.bytes: dict[str, int] = {}
        self.admission = Admission(
            self.store,
            self.scheduler,
            self.runners,
            self.resolve,
            self.start,
            lambda record: record,
        )
        views = Views(self.store, self.scheduler, {}, self.admission.pending, self.resolve)
        dispatcher = Dispatcher(1)
        self.parts = Collaborators(
            store=self.store,
            scheduler=self.scheduler,
            dispatcher=dispatcher,
            recovery=Recovery(self.store, dispatcher),
            reporter=Reporter(self.store, views, EventBus(), LogBuffer()),
            prepare=lambda record, job: job,
            measure_peak=lambda: 0.0,
            wake=lambda: None,
        )

    def resolve(self, record: JobRecord) -> ResolvedJob:
        return ResolvedJob(record.spec, None, self.bytes[record.id], 0.0, 1)

    def start(self, record: JobRecord, islands: list[str]) -> None:
        self.runners[record.id] = JobRunner(record, self.resolve(record), [], self.parts)
        self.runners[record.id].islands = islands
        self.store.transition(record.id, JobState.RUNNING, reason="scheduled")

    def submit(self, name: str, islands: int, nbytes: int, priority: int = 0) -> str:
        spec = controller_pb2.JobSpec(name=name, islands=islands, devices_per_island=1)
        spec.priority = priority
        record = self.store.create_job(spec, job_id=name)
        self.bytes[record.id] = nbytes
        return record.id

    def suspend(self, job_id: str) -> None:
        """What a runner does when asked to suspend: free its memory, state suspended."""
        self.scheduler.release(job_id)
        self.store.transition(job_id, JobState.SUSPENDED, reason="preempted")


def test_a_job_that_does_not_fit_holds_back_the_jobs_behind_it_and_each_says_why(tmp_path):
    c = Cluster(tmp_path)
    c.submit("big", 2, 60)
    c.submit("wide", 2, 60)
    c.submit("small", 1, 10)
    c.admission.schedule()
    assert list(c.runners) == ["big"]
    assert c.scheduler.islands_of("big") == ["island-0", "island-1"]
    assert c.admission.pending["wide"].startswith("Needs 60 B per device on 2 island(s)")
    assert "Waits on big." in c.admission.pending["wide"]
    # "small" would fit, but it never overtakes the waiting job ahead of it.
    assert c.admission.pending["small"] == "Waiting for jobs ahead in the queue (wide)."
    assert "small" not in c.runners


def test_a_higher_priority_job_suspends_only_the_lowest_priority_residents_it_needs(tmp_path):
    c = Cluster(tmp_path, islands=("island-0",))
    c.submit("low", 1, 40, priority=0)
    c.submit("mid", 1, 40, priority=1)
    c.admission.schedule()
    assert sorted(c.runners) == ["low", "mid"]
    c.submit("urgent", 1, 50, priority=5)
    c.admission.schedule()
    # 20 bytes free + low's 40 make room: mid keeps running.
    assert c.runners["low"].suspend_requested and not c.runners["mid"].suspend_requested
    assert "Suspending lower-priority low." in c.admission.pending["urgent"]
    c.suspend("low")
    c.admission.schedule()
    assert c.scheduler.islands_of("urgent") == ["island-0"]
    assert c.admission.pending["low"].startswith("Suspended: Needs 40 B per device")


def test_a_suspended_job_resumes_on_its_own_islands_once_they_have_room(tmp_path):
    c = Cluster(tmp_path, islands=("island-0",))
    c.submit("low", 1, 80)
    c.admission.schedule()
    c.submit("urgent", 1, 80, priority=5)
    c.admission.schedule()
    c.suspend("low")
    c.admission.schedule()
    assert not c.runners["low"].resume.is_set()
    c.scheduler.release("urgent")
    c.store.transition("urgent", JobState.SUCCEEDED, reason="completed")
    c.admission.schedule()
    assert c.runners["low"].resume.is_set()
    assert c.scheduler.islands_of("low") == ["island-0"]
    assert "low" not in c.admission.pending


def test_a_job_is_never_preempted_for_one_of_equal_priority(tmp_path):
    c = Cluster(tmp_path, islands=("island-0",))
    c.submit("first", 1, 80, priority=3)
    c.submit("second", 1, 80, priority=3)
    c.admission.schedule()
    assert not c.runners["first"].suspend_requested
    assert "Suspending" not in c.admission.pending["second"]
    assert Demand("x", 1, 80) == c.admission.demand(c.store.get_job("second")).__class__("x", 1, 80)
