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


def test_a_slice_given_back_unsent_costs_its_job_nothing() -> None:
    """A granted slice that is never sent (an island of its job began to serve, the job
    stopped) is given back uncharged: its job keeps its turn, and a slice of it still in
    flight is charged (and corrected) as usual."""

    async def main() -> None:
        sched = Scheduler(["island-0"], slots=2, share_by="time")
        sched.join("a", ["island-0"], 1.0)
        sched.join("b", ["island-0"], 1.0)
        assert await sched.acquire("a", 4)
        sched.done("a", ["island-0"], 0.4, 4)  # a step time learned: 0.1 s
        assert sched.passes()["a"] == pytest.approx(0.4)
        assert await sched.acquire("a", 4)  # in flight: charged 0.4
        assert await sched.acquire("a", 2)  # charged 0.2, then given back unsent
        assert sched.passes()["a"] == pytest.approx(1.0)
        sched.refund("a", ["island-0"])  # its own charge back, not the one in flight's
        assert sched.passes()["a"] == pytest.approx(0.8)
        sched.done("a", ["island-0"], 0.2, 4)  # the one in flight ran faster than charged
        assert sched.passes()["a"] == pytest.approx(0.6)
        sched.leave("a")
        sched.leave("b")

    asyncio.run(main())


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


def test_a_jobs_islands_all_have_the_same_number_of_hosts() -> None:
    """Host i of each island of a job exchanges with host i of the others: a 2-island job is
    never placed on a 1-host and a 2-host island (found when such a job was placed on them
    and failed its load), and a job that no host count has enough islands for can never run."""
    ids = ["a", "b", "duo", "c"]
    sched = Scheduler(ids, {i: 100 for i in ids}, hosts={"a": 1, "b": 1, "duo": 2, "c": 1})
    assert sched.place(Demand("d", 1, 100), ["a"]) == ["a"]
    assert sched.place(Demand("n", 1, 100), ["b"]) == ["b"]
    assert sched.place(Demand("v", 2, 100)) is None  # free: duo (2 hosts) and c (1 host)
    sched.release("n")
    assert sched.place(Demand("v", 2, 100)) == ["b", "c"]
    never = sched.never_fits(4, 100)
    assert never is not None and "islands=4 with the same number of hosts" in never, never
    assert "3 x 1 host(s), 1 x 2 host(s)" in never, never
    assert sched.never_fits(3, 100) is None


# ---- admission over a real store -----------------------------------------------------------

BUDGET = 100


class Cluster:
    """Admission on two islands of BUDGET bytes per device, with a real store and scheduler;
    placed jobs get real (unstarted) runners, as the controller's `start` makes them."""

    def __init__(self, tmp_path, islands=("island-0", "island-1"), hosts=None) -> None:
        self.store = JobStore(tmp_path / "jobs.db")
        self.scheduler = Scheduler(list(islands), {i: BUDGET for i in islands}, hosts=hosts)
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

    def submit(
        self, name: str, islands: int, nbytes: int, priority: int = 0, kind: str = "train"
    ) -> str:
        spec = controller_pb2.JobSpec(name=name, islands=islands, devices_per_island=1)
        spec.priority = priority
        if kind != "train":
            spec.kind = kind
        record = self.store.create_job(spec, job_id=name)
        self.bytes[record.id] = nbytes
        return record.id

    def suspend_low_for_urgent(self) -> None:
        """A resident job "low" (80 bytes) suspended for a higher-priority "urgent" (80)."""
        self.submit("low", 1, 80)
        self.admission.schedule()
        self.submit("urgent", 1, 80, priority=5)
        self.admission.schedule()
        self.suspend("low")
        self.admission.schedule()

    def finish(self, job_id: str) -> None:
        """What a runner does when its job ends: free its memory, state succeeded."""
        self.scheduler.release(job_id)
        self.store.transition(job_id, JobState.SUCCEEDED, reason="completed")

    def suspend(self, job_id: str) -> None:
        """What a runner does when asked to suspend: free its memory, state suspended."""
        self.scheduler.release(job_id)
        self.store.transition(job_id, JobState.SUSPENDED, reason="preempted")


def test_a_job_behind_a_waiting_one_starts_only_when_it_cannot_hold_that_one_back(tmp_path):
    """Work conservation without starvation: a job behind a waiting gang starts at once when
    it fits beside the gang once the jobs the gang waits on leave; one that would take room
    the gang needs waits, and every waiting job says why."""
    c = Cluster(tmp_path)
    c.submit("big", 2, 60)
    c.submit("wide", 2, 60)
    c.submit("small", 1, 10)  # 10 + wide's 60 fit a budget of 100: no harm to wide
    c.submit("greedy", 1, 50)  # 50 + wide's 60 would not: it would hold wide back
    c.admission.schedule()
    assert sorted(c.runners) == ["big", "small"]
    assert c.scheduler.islands_of("big") == ["island-0", "island-1"]
    assert c.admission.pending["wide"].startswith("Needs 60 B per device on 2 island(s)")
    assert "Waits on big." in c.admission.pending["wide"]
    assert "greedy" not in c.runners
    assert "Jobs ahead in the queue wait too (wide)." in c.admission.pending["greedy"]
    # Once big has gone, wide fits beside small; greedy still waits for room.
    c.scheduler.release("big")
    c.store.transition("big", JobState.SUCCEEDED, reason="completed")
    c.admission.schedule()
    assert "wide" in c.runners and "greedy" not in c.runners


def test_a_resident_that_never_ends_holds_no_island_idle_for_a_job_it_blocks(tmp_path):
    """A serve job stays until cancelled: a 2-island job that waits on its island (and may
    not preempt it) cannot start while it stays, so it keeps no job behind it off the other,
    idle island; one that outranks the serve job suspends it and holds its room as usual."""
    c = Cluster(tmp_path)
    c.submit("svc", 1, 60, kind="serve")
    c.admission.schedule()
    assert c.scheduler.islands_of("svc") == ["island-0"]
    c.submit("wide", 2, 60)
    c.submit("small", 1, 60)
    c.admission.schedule()
    assert "wide" not in c.runners and "Waits on svc." in c.admission.pending["wide"]
    assert c.scheduler.islands_of("small") == ["island-1"]

    # A serve job backfilled beside the waiter's room counts once: here W needs 40 beside
    # it on island-0 once T leaves, so X (40) may not take that room.
    b = Cluster(tmp_path / "backfilled")
    b.submit("T", 1, 65)
    b.submit("B", 1, 100)
    b.submit("W", 2, 40)
    b.submit("S", 1, 35, kind="serve")  # beside T: W still fits beside it
    b.admission.schedule()
    assert b.scheduler.islands_of("S") == ["island-0"] and "W" not in b.runners
    b.finish("T")
    b.submit("X", 1, 40)
    b.admission.schedule()
    assert "X" not in b.runners
    b.finish("B")
    b.admission.schedule()
    assert b.scheduler.islands_of("W") == ["island-0", "island-1"]

    d = Cluster(tmp_path / "outranked")
    d.submit("svc", 1, 60, kind="serve")
    d.admission.schedule()
    d.submit("wide", 2, 60, priority=5)
    d.submit("small", 1, 60)
    d.admission.schedule()
    assert d.runners["svc"].suspend_requested and "small" not in d.runners
    d.suspend("svc")
    d.admission.schedule()
    assert d.scheduler.islands_of("wide") == ["island-0", "island-1"]


def test_admission_and_preemption_pick_islands_of_one_host_count(tmp_path):
    """A 2-island job waits while the only free islands differ in host count, starts on two
    1-host islands once they are free, and preempts lower-priority jobs only on islands of one
    host count."""
    ids = ("a", "duo", "c")
    c = Cluster(tmp_path, islands=ids, hosts={"a": 1, "duo": 2, "c": 1})
    c.submit("first", 1, 80)
    c.admission.schedule()
    assert c.scheduler.islands_of("first") == ["a"]
    c.submit("wide", 2, 80)
    c.admission.schedule()
    assert "wide" not in c.runners  # duo + c are free, but of different host counts
    c.finish("first")
    c.admission.schedule()
    assert c.scheduler.islands_of("wide") == ["a", "c"]
    c.submit("urgent", 2, 80, priority=5)
    c.admission.schedule()
    assert "wide" in c.runners and c.runners["wide"].suspend_requested
    assert "urgent" not in c.runners


def test_a_job_left_running_goes_back_to_the_islands_that_hold_its_state(tmp_path):
    """After a controller restart a job whose hosts still hold it is placed on those islands
    (its state is adopted there), before a job ahead of it in the queue could take them and
    not by first fit; when they cannot take it now the hint is dropped (first fit)."""
    c = Cluster(tmp_path, islands=("a", "b", "c"))
    c.submit("ahead", 1, 80)
    c.submit("left", 2, 80)
    c.submit("other", 2, 80)
    c.admission.kept_on.update({"left": ("b", "c"), "other": ("a", "c")})
    c.admission.schedule()
    assert c.scheduler.islands_of("left") == ["b", "c"]
    assert c.scheduler.islands_of("ahead") == ["a"]
    # "other"'s islands are taken: its hint is dropped, it waits like any job.
    assert "other" not in c.runners and c.admission.kept_on == {}


def test_the_sum_of_an_islands_residents_never_exceeds_its_budget(tmp_path):
    """Jobs are placed by what they hold; the measured figure of a kind replaces the
    estimate for the next job of that kind, and no placement overfills an island."""
    c = Cluster(tmp_path, islands=("island-0",))
    for name in ("a", "b", "c"):
        c.submit(name, 1, 45)
    c.admission.schedule()
    assert sorted(c.runners) == ["a", "b"]  # 90 of 100: a third would overfill it
    assert c.scheduler.used("island-0") == 90 <= BUDGET
    c.runners["a"].demand_bytes = 10
    c.scheduler.resize("a", 10)  # a's compiled step measured 10: room for c (10 + 45 + 45)
    c.admission.schedule()
    assert sorted(c.runners) == ["a", "b", "c"]
    assert c.scheduler.used("island-0") == 100 <= BUDGET
    c.submit("d", 1, 1)
    c.admission.schedule()
    assert "d" not in c.runners and c.scheduler.used("island-0") == 100


def test_a_job_that_can_never_fit_says_so_and_holds_nobody_back(tmp_path):
    """The budget shrank under a suspended job: it cannot resume on its islands, says so in
    `why` and in its events, and the job behind it runs on the idle island."""
    c = Cluster(tmp_path, islands=("island-0",))
    c.suspend_low_for_urgent()
    c.submit("later", 1, 40)
    c.finish("urgent")
    c.scheduler.budgets["island-0"] = 50  # the island came back smaller
    c.admission.schedule()
    assert not c.runners["low"].resume.is_set()
    why = c.admission.pending["low"]
    assert why.startswith("Suspended, and it can never resume on its islands:"), why
    assert "budget of island-0 is 50" in why
    assert [e.message for e in c.store.events("low") if e.kind == "scheduler"] == [why]
    assert "later" in c.runners  # the island does not idle behind it
    c.admission.schedule()  # said once, not at every pass
    assert len([e for e in c.store.events("low") if e.kind == "scheduler"]) == 1


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
    c.suspend_low_for_urgent()
    assert not c.runners["low"].resume.is_set()
    c.finish("urgent")
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


def test_a_measured_kind_is_admitted_by_its_measured_figure(tmp_path):
    """Before a kind of job has loaded it is placed by the estimate (an upper bound); once
    one has, the next job of the same (model, mesh, batch) is placed by what it measured."""
    from pathways_lite.controller.resolved import MemoryFigures
    from pathways_lite.spec import load_spec_text

    spec = load_spec_text("""
name: kind
model: {preset: palm-tiny}
islands: 1
devices_per_island: 2
mesh: {data: 1, model: 2}
train: {steps: 2, global_batch: 8, seq_len: 64}
data: {source: stdlib, vocab_size: 1024}
""")
    job = ResolvedJob.resolve(spec)
    smaller = controller_pb2.JobSpec()
    smaller.CopyFrom(spec)
    smaller.train.global_batch = 4
    other = ResolvedJob.resolve(smaller)
    figures = MemoryFigures()
    assert figures.bytes_per_device(job) == job.bytes_per_device
    figures.record(job, job.bytes_per_device * 4 // 5)
    assert figures.bytes_per_device(ResolvedJob.resolve(spec)) == job.bytes_per_device * 4 // 5
    assert figures.bytes_per_device(other) == other.bytes_per_device  # another batch


def test_a_suspended_job_raised_above_its_islands_residents_preempts_them(tmp_path):
    """Raising a suspended job's priority helps: it suspends the lower-priority job on its own
    islands (where its state is) and resumes there."""
    c = Cluster(tmp_path, islands=("island-0",))
    c.suspend_low_for_urgent()
    assert c.admission.pending["low"].startswith("Suspended: Needs 80 B per device on its")
    c.store.set_priority("low", 9)
    c.runners["low"].priority = 9
    c.admission.schedule()
    assert c.runners["urgent"].suspend_requested
    c.suspend("urgent")
    c.admission.schedule()
    assert c.runners["low"].resume.is_set() and c.scheduler.islands_of("low") == ["island-0"]


class ClockCluster(Cluster):
    """Cluster with EASY backfill on a clock the test moves."""

    def __init__(self, tmp_path, islands=("island-0",)) -> None:
        super().__init__(tmp_path, islands)
        self.now = 0.0
        self.admission = Admission(
            self.store,
            self.scheduler,
            self.runners,
            self.resolve,
            self.start,
            lambda record: record,
            backfill=True,
            clock=lambda: self.now,
        )

    def submit_kind(self, name: str, nbytes: int, steps: int = 0, kind: str = "train") -> str:
        spec = controller_pb2.JobSpec(name=name, islands=1, devices_per_island=1)
        if kind != "train":
            spec.kind = kind
        if steps:
            spec.train.steps = steps
        self.store.create_job(spec, job_id=name)
        self.bytes[name] = nbytes
        return name

    def learn_train_step_time(self) -> None:
        """A train job of 10 steps runs 10 s and succeeds: 1 s per step for its kind."""
        self.submit_kind("learn", 10, steps=10)
        self.admission.schedule()
        self.now += 10.0
        self.finish("learn")
        del self.runners["learn"]
        self.admission.schedule()


def test_an_eval_job_is_never_taken_for_a_zero_length_job_by_backfill(tmp_path):
    """An eval job has no train.steps: its length is unknown (not 0 x the step time of a
    train job of the same model), so it is not backfilled onto the head's reservation, and a
    resident eval job does not make the head's islands look free now."""
    c = ClockCluster(tmp_path)
    c.learn_train_step_time()
    assert c.admission.expected_s(c.store.get_job("learn")) == pytest.approx(10.0)
    # A resident train job (100 steps: expected to end at t=110) and a head that waits on it.
    c.submit_kind("resident", 50, steps=100)
    c.admission.schedule()
    c.submit_kind("head", 60, steps=10)
    c.submit_kind("eval", 45, kind="eval")  # fits now, but would hold the head back
    c.admission.schedule()
    assert c.admission.reservation is not None and c.admission.reservation.job_id == "head"
    assert c.admission.reservation.start == pytest.approx(110.0)
    assert "eval" not in c.runners and "head" not in c.runners
    assert c.admission.expected_s(c.store.get_job("eval")) is None

    # A resident eval job: no expected end, so no reservation that says "free now".
    d = ClockCluster(tmp_path / "second")
    d.learn_train_step_time()
    d.submit_kind("eval", 50, kind="eval")
    d.admission.schedule()
    d.submit_kind("head", 60, steps=10)
    d.admission.schedule()
    assert "head" not in d.runners
    assert d.admission.reservation is None, d.admission.pending["head"]
    assert "Holds a reservation" not in d.admission.pending["head"]
