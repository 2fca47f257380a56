"""Property test of admission at scale: random arrival / cancel / priority / failure sequences
drive the real admission, scheduler and job store, with real (unstarted) job runners whose
life (run, suspend when asked, resume when let, end, fail) is simulated on a clock, as the
controller's runner tasks do it. After every event and scheduling pass:

- every job is terminal, resident, or waiting with a sentence saying why;
- no island's residents exceed its budget, and no job appears twice on an island;
- gangs are all-or-none (a resident job holds exactly its islands' count);
- the pass is work-conserving: the first job in scheduling order that waits does not fit
  now (nothing can jump it, and it never waits beside room it fits in);
- once arrivals stop, every job ends (nothing waits forever beside idle islands).
"""

from __future__ import annotations

import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pathways_lite.controller.admission import Admission
from pathways_lite.controller.bus import EventBus, LogBuffer
from pathways_lite.controller.dispatch import Dispatcher
from pathways_lite.controller.jobs import Collaborators, JobRunner, Reporter
from pathways_lite.controller.recovery import Recovery
from pathways_lite.controller.resolved import ResolvedJob
from pathways_lite.controller.scheduler import Scheduler
from pathways_lite.controller.states import JobState
from pathways_lite.controller.store import JobRecord, JobStore
from pathways_lite.controller.views import Views
from pathways_lite.v1 import controller_pb2

pytestmark = pytest.mark.timeout(120)

ISLANDS = 6
BUDGET = 100


class SimClusterState:
    """Admission over a real store and scheduler; runners' lives on a simulated clock."""

    def __init__(self, path: str, backfill: bool) -> None:
        self.now = 0.0
        ids = [f"island-{i}" for i in range(ISLANDS)]
        self.store = JobStore(f"{path}/jobs.db")
        self.scheduler = Scheduler(ids, {i: BUDGET for i in ids})
        self.runners: dict[str, JobRunner] = {}
        self.bytes: dict[str, int] = {}
        self.duration: dict[str, float] = {}
        self.ends: dict[str, float] = {}  # resident, running job -> when it ends
        self.admission = Admission(
            self.store,
            self.scheduler,
            self.runners,
            self.resolve,
            self.start,
            lambda record: record,
            backfill=backfill,
            clock=lambda: self.now,
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
        self.count = 0

    def resolve(self, record: JobRecord) -> ResolvedJob:
        return ResolvedJob(record.spec, None, self.bytes[record.id], 0.0, 1)

    def start(self, record: JobRecord, islands: list[str]) -> None:
        runner = JobRunner(record, self.resolve(record), [], self.parts)
        runner.islands = islands
        self.runners[record.id] = runner
        self.store.transition(record.id, JobState.RUNNING, reason="scheduled")
        self.ends[record.id] = self.now + self.duration[record.id]

    # -- events ------------------------------------------------------------------------

    def submit(self, islands: int, nbytes: int, priority: int, steps: int) -> None:
        self.count += 1
        name = f"j{self.count}"
        spec = controller_pb2.JobSpec(name=name, islands=islands, devices_per_island=1)
        spec.priority = priority
        spec.train.steps = steps
        self.bytes[name] = nbytes
        self.duration[name] = float(steps)
        self.store.create_job(spec, job_id=name)

    def _live(self) -> list[JobRecord]:
        return [r for r in self.store.list_jobs(page_size=1000)[0] if not r.state.terminal]

    def cancel(self, pick: int) -> None:
        live = self._live()
        if not live:
            return
        record = live[pick % len(live)]
        runner = self.runners.pop(record.id, None)
        if runner is not None:
            runner.request_cancel()
            self.scheduler.release(record.id)
            self.ends.pop(record.id, None)
        self.store.transition(record.id, JobState.CANCELLED, reason="user_cancelled")

    def reprioritise(self, pick: int, priority: int) -> None:
        live = self._live()
        if not live:
            return
        record = live[pick % len(live)]
        self.store.set_priority(record.id, priority)
        if record.id in self.runners:
            self.runners[record.id].priority = priority

    def fail(self, pick: int, retry: bool) -> None:
        """A running job's host fails: it is rolled back and queued again, or fails."""
        running = sorted(self.ends)
        if not running:
            return
        job_id = running[pick % len(running)]
        del self.ends[job_id]
        self.scheduler.release(job_id)
        del self.runners[job_id]
        if retry:
            self.store.transition(job_id, JobState.QUEUED, reason="retry")
        else:
            self.store.transition(job_id, JobState.FAILED, reason="step_failed")

    def suspend(self, job_id: str) -> None:
        """A job asked to suspend reaches its next step boundary: state to host memory,
        devices freed."""
        runner = self.runners[job_id]
        left = self.ends.pop(job_id) - self.now
        self.duration[job_id] = max(0.5, left)
        self.scheduler.release(job_id)
        runner.resume.clear()
        runner.suspended = True
        self.store.transition(job_id, JobState.SUSPENDED, reason="preempted")

    def advance(self, seconds: float) -> None:
        """Time passes: asked jobs suspend, resumed jobs run again, due jobs end."""
        self.now += seconds
        for job_id, runner in list(self.runners.items()):
            if runner.suspend_requested and not runner.suspended and job_id in self.ends:
                self.suspend(job_id)
            elif runner.suspended and runner.resume.is_set():
                runner.suspended = runner.suspend_requested = False
                self.store.transition(job_id, JobState.RUNNING, reason="resumed")
                self.ends[job_id] = self.now + self.duration[job_id]
        for job_id, end in sorted(self.ends.items()):
            if end <= self.now:
                del self.ends[job_id]
                self.scheduler.release(job_id)
                del self.runners[job_id]
                self.store.transition(job_id, JobState.SUCCEEDED, reason="completed")

    # -- invariants --------------------------------------------------------------------

    def check(self) -> None:
        sched = self.scheduler
        for island in sched.island_ids:
            on = sched.jobs_on(island)
            assert len(on) == len(set(on)), (island, on)
            assert sched.used(island) == sum(sched.held(j) for j in on)
            assert sched.used(island) <= BUDGET, (island, sched.used(island))
        waiting = []
        for record in self.store.list_jobs(page_size=1000)[0]:
            held = sched.islands_of(record.id)
            if record.state.terminal:
                assert not held and record.id not in self.runners, record
                continue
            if held:  # a gang: all of its islands or none
                assert len(held) == record.spec.islands, (record.id, held)
                assert record.id in self.runners
                continue
            if record.state == JobState.RUNNING:  # suspending: its task releases it
                assert self.runners[record.id].suspend_requested
                continue
            assert self.admission.pending.get(record.id), record
            waiting.append(record)
        # Work conservation: the first waiting job in scheduling order has no room now.
        order = [r.id for r in self.store.jobs_in_states([JobState.QUEUED, JobState.SUSPENDED])]
        first = next((j for j in order if not sched.islands_of(j)), None)
        if first is not None:
            record = self.store.get_job(first)
            runner = self.runners.get(first)
            if record.state == JobState.SUSPENDED and runner is not None:
                if runner.resume.is_set():
                    return
                own = runner.islands
                assert any(sched.free_bytes(i) < self.bytes[first] for i in own), (
                    f"{first} waits suspended beside room on its islands {own}: "
                    f"{self.admission.pending.get(first)}"
                )
            else:
                room = [i for i in sched.island_ids if sched.free_bytes(i) >= self.bytes[first]]
                assert len(room) < record.spec.islands, (
                    f"{first} waits though {room} have room: {self.admission.pending.get(first)}"
                )


EVENT = st.one_of(
    st.tuples(
        st.just("submit"),
        st.sampled_from([1, 1, 2, 3, 6]),
        st.sampled_from([10, 40, 50, 60, 100]),
        st.integers(0, 3),
        st.integers(1, 20),
    ),
    st.tuples(st.just("cancel"), st.integers(0, 50)),
    st.tuples(st.just("priority"), st.integers(0, 50), st.integers(0, 3)),
    st.tuples(st.just("fail"), st.integers(0, 50), st.booleans()),
    st.tuples(st.just("advance"), st.sampled_from([0.5, 1.0, 3.0, 7.0])),
)


def _run(events, backfill: bool) -> None:
    with tempfile.TemporaryDirectory() as path:
        c = SimClusterState(path, backfill)
        try:
            for event in events:
                kind, *args = event
                if kind == "submit":
                    c.submit(*args)
                elif kind == "cancel":
                    c.cancel(*args)
                elif kind == "priority":
                    c.reprioritise(*args)
                elif kind == "fail":
                    c.fail(*args)
                else:
                    c.advance(*args)
                c.admission.schedule()
                c.check()
            # Arrivals stop: every job ends within a bounded time.
            for _ in range(400):
                if all(r.state.terminal for r in c.store.list_jobs(page_size=1000)[0]):
                    break
                c.advance(1.0)
                c.admission.schedule()
                c.check()
            stuck = [(r.id, r.state.value, c.admission.pending.get(r.id)) for r in c._live()]
            assert not stuck, f"jobs never ended beside idle islands: {stuck}"
        finally:
            c.store.close()


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
@given(st.lists(EVENT, min_size=1, max_size=40))
def test_admission_with_backfill_keeps_every_invariant(events) -> None:
    _run(events, backfill=True)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
@given(st.lists(EVENT, min_size=1, max_size=40))
def test_admission_in_strict_order_keeps_every_invariant(events) -> None:
    _run(events, backfill=False)


def _asked_to_suspend(c: SimClusterState) -> list[str]:
    return sorted(j for j, r in c.runners.items() if r.suspend_requested)


def test_a_waiting_job_asks_no_more_victims_while_the_first_ones_suspend() -> None:
    """Jobs asked to suspend free their memory only at their next step boundary. Passes
    before then (any wake) count that memory as freed: the waiting high-priority job asks no
    more victims on other islands (before: two more on each pass), and it starts where the
    first ones left."""
    with tempfile.TemporaryDirectory() as path:
        c = SimClusterState(path, backfill=True)
        try:
            for _ in range(2 * ISLANDS):  # two jobs of half an island's budget on each
                c.submit(1, BUDGET // 2, 0, 20)
            c.admission.schedule()
            assert all(c.scheduler.free_bytes(i) == 0 for i in c.scheduler.island_ids)
            c.submit(1, BUDGET // 2 + 10, 3, 5)
            high = f"j{c.count}"
            c.admission.schedule()
            first = _asked_to_suspend(c)
            assert len(first) == 2, first  # both jobs of one island
            (island,) = {i for j in first for i in c.scheduler.islands_of(j)}
            c.admission.schedule()
            c.admission.schedule()
            assert _asked_to_suspend(c) == first
            c.advance(0.5)  # their step boundary: they suspend
            c.admission.schedule()
            assert c.scheduler.islands_of(high) == [island]
            assert _asked_to_suspend(c) == first
            c.check()
        finally:
            c.store.close()


def test_room_a_waiting_job_preempted_for_is_not_taken_back_while_its_victims_suspend() -> None:
    """Islands 0-3 run priority-3 jobs, 4 and 5 priority-0 jobs j5 and j6; j7, a gang of two
    islands at priority 2, asks j5 and j6 to suspend. They reach their step boundaries one
    at a time: while j7 waits for j6, neither j5 (resumed on the island it freed) nor a new
    priority-0 job takes island 4 back, and j7 starts once j6 has left. Before, j5 resumed
    on island 4 at once, j7 asked it to suspend again once j6 had left, and j6 resumed:
    for ever, one victim after the other."""
    with tempfile.TemporaryDirectory() as path:
        c = SimClusterState(path, backfill=True)
        try:
            for priority in (3, 3, 3, 3, 0, 0):
                c.submit(1, BUDGET, priority, 1000)
            c.admission.schedule()
            c.submit(2, BUDGET, 2, 10)
            c.admission.schedule()
            assert _asked_to_suspend(c) == ["j5", "j6"]
            c.suspend("j5")  # its step boundary comes first
            c.submit(1, BUDGET, 0, 5)  # j8, behind j7
            for _ in range(3):
                c.admission.schedule()
            assert not c.runners["j5"].resume.is_set()
            assert c.scheduler.jobs_on("island-4") == [], c.scheduler.jobs_on("island-4")
            assert c.admission.pending["j5"].startswith("Suspended: its islands are kept for j7")
            c.suspend("j6")
            c.admission.schedule()
            assert c.scheduler.islands_of("j7") == ["island-4", "island-5"]
            c.check()
        finally:
            c.store.close()


def test_a_job_behind_the_head_that_would_outlast_its_reservation_keeps_off_its_islands() -> None:
    """The head (a gang of two) holds a reservation on islands 4 and 5 from t=21 (island 4
    frees at t=11, 5 at t=21). A 5,000-step job submitted at t=11 fits island 4 by the count
    rule but would run past t=21: it waits, and the head starts at t=21. Before, it took
    island 4 and the head waited until about t=1001, island 5 idle meanwhile."""
    with tempfile.TemporaryDirectory() as path:
        c = SimClusterState(path, backfill=True)
        try:
            c.submit(1, BUDGET, 0, 1)  # learns a step's seconds (1 s)
            c.admission.schedule()
            c.advance(1.0)
            c.admission.schedule()
            for steps in (1000, 1000, 1000, 1000, 10, 20):
                c.submit(1, BUDGET, 0, steps)
            c.admission.schedule()
            c.advance(1.0)
            c.submit(2, BUDGET, 0, 10)
            head = f"j{c.count}"
            c.admission.schedule()
            r = c.admission.reservation
            assert r is not None and r.job_id == head and r.islands == ("island-4", "island-5")
            c.advance(9.0)  # island 4 frees
            c.submit(1, BUDGET, 0, 5000)
            long = f"j{c.count}"
            c.admission.schedule()
            assert c.scheduler.islands_of(long) == []
            for _ in range(12):
                c.advance(1.0)
                c.admission.schedule()
            assert c.scheduler.islands_of(head) == ["island-4", "island-5"]
            c.check()
        finally:
            c.store.close()


@pytest.mark.parametrize("backfill", [True, False])
def test_a_job_that_needs_more_islands_than_are_up_holds_nobody_back(backfill) -> None:
    """The first job in the queue needs 2 islands, and only one is up: it cannot run until
    an island comes back, so it holds nobody back (no reservation, nobody kept from the free
    island), and says why; once the islands are back it runs."""
    with tempfile.TemporaryDirectory() as path:
        c = SimClusterState(path, backfill=backfill)
        try:
            for island in c.scheduler.island_ids[1:]:
                c.scheduler.mark_down(island, "its hosts are lost")
            c.submit(2, 60, 0, 5)
            c.submit(1, 60, 0, 5)
            c.admission.schedule()
            assert c.scheduler.islands_of("j2") == ["island-0"]
            why = c.admission.pending.get("j1")
            assert "cannot run until islands that are down come back" in why, why
            assert "only 1 such island(s) are up" in why, why
            assert c.admission.reservation is None
            events = [e.message for e in c.store.events("j1") if e.kind == "scheduler"]
            c.admission.schedule()
            assert [e.message for e in c.store.events("j1") if e.kind == "scheduler"] == events
            assert len(events) == 1, events  # said once, not at every pass
            for island in c.scheduler.island_ids[1:]:
                c.scheduler.mark_up(island)
            c.admission.schedule()
            assert len(c.scheduler.islands_of("j1")) == 2
            c.check()
        finally:
            c.store.close()


def test_a_backfill_whose_event_cannot_be_written_holds_nothing(monkeypatch) -> None:
    """The database is locked as a backfilled job's event is written: the pass fails, and
    the job holds nothing (before: its islands' memory stayed held with no runner, for good);
    the next pass backfills it."""
    import sqlite3

    with tempfile.TemporaryDirectory() as path:
        c = SimClusterState(path, backfill=True)
        try:
            c.submit(1, 10, 0, 1)  # learns the step time of a 1-island job
            c.admission.schedule()
            c.advance(1.0)
            c.submit(1, BUDGET, 0, 50)  # j2: the head below waits for it
            c.admission.schedule()
            c.submit(ISLANDS, BUDGET, 0, 5)  # j3: the head, with a reservation
            c.submit(1, BUDGET, 0, 5)  # j4: ends well before the reservation
            add_event = c.store.add_event
            failed = []

            def locked_once(job_id, kind, message):
                if not failed:
                    failed.append(message)
                    raise sqlite3.OperationalError("database is locked")
                return add_event(job_id, kind, message)

            monkeypatch.setattr(c.store, "add_event", locked_once)
            with pytest.raises(sqlite3.OperationalError):
                c.admission.schedule()
            assert failed and failed[0].startswith("Backfilled ahead of j3"), failed
            assert c.scheduler.held("j4") == 0 and "j4" not in c.runners
            assert sum(c.scheduler.used(i) for i in c.scheduler.island_ids) == BUDGET
            c.admission.schedule()
            assert c.scheduler.held("j4") == BUDGET and "j4" in c.runners
            assert "Backfilled ahead of j3" in c.admission.notes["j4"]
            c.check()
        finally:
            c.store.close()


def test_the_first_job_in_the_queue_is_not_said_to_wait_behind_itself() -> None:
    with tempfile.TemporaryDirectory() as path:
        c = SimClusterState(path, backfill=True)
        try:
            c.submit(1, 10, 0, 5)
            c.submit(1, 10, 0, 5)
            c.admission.pending.queue = c.store.jobs_in_states([JobState.QUEUED])
            first = c.admission.pending.get("j1")
            assert "behind j1" not in first and "First in the queue" in first, first
            assert "position 2, behind j1" in c.admission.pending.get("j2")
        finally:
            c.store.close()


def test_a_suspended_job_whose_island_is_down_holds_nobody_back() -> None:
    """A suspended job cannot resume while one of its own islands is down: it holds nobody
    back from its other island (nor asks anyone to suspend there), says why, and resumes
    once the island is back."""
    with tempfile.TemporaryDirectory() as path:
        c = SimClusterState(path, backfill=True)
        try:
            c.submit(2, 60, 1, 20)  # j1
            c.admission.schedule()
            assert c.scheduler.islands_of("j1") == ["island-0", "island-1"]
            c.submit(ISLANDS, 50, 2, 1)  # j2 suspends j1
            c.admission.schedule()
            c.advance(0.5)
            c.admission.schedule()
            assert c.store.get_job("j1").state == JobState.SUSPENDED
            assert len(c.scheduler.islands_of("j2")) == ISLANDS
            c.scheduler.mark_down("island-1", "its hosts are lost")
            c.submit(1, 50, 0, 20)  # j3: room beside j2 on any island that is up
            c.admission.schedule()
            assert c.scheduler.islands_of("j3") == ["island-0"]
            why = c.admission.pending.get("j1")
            assert "cannot resume until its islands are back" in why, why
            assert "island-1 (its hosts are lost)" in why, why
            c.scheduler.mark_up("island-1")
            c.advance(1.0)  # j2 ends
            c.admission.schedule()
            assert c.runners["j3"].suspend_requested  # j1 may preempt on its islands again
            c.check()
        finally:
            c.store.close()
