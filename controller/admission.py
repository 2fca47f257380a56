"""Admission and preemption: which queued or suspended job starts, resumes or waits, and why.

One pass goes over the queued and suspended jobs in priority-then-submission order (the
store's order). A job is placed only when all of its islands have room for what it will
really hold at once (the scheduler's `place`, controller/scheduler.py): its compiled step's
measured bytes per device when a job of the same (model, mesh, batch) has loaded before, else
the estimator's upper bound (controller/resolved.py's `MemoryFigures`). The sum of the
residents of an island never exceeds its budget.

A job that can wait ahead of others does not idle the cluster: a job behind it starts at once
when it fits, provided the first jobs waiting ahead of it (DETAILED_REASONS of them) would
still fit beside the jobs started this way once the jobs they wait on have left (so such jobs
never postpone them for good). The
first job that waits may suspend lower-priority resident jobs to make room: the fewest
islands' worth, lowest priority (then newest) first. A suspended job resumes on its own
islands (its state is in their hosts' memory) as soon as they have room again, and may itself
preempt there. A job that can never fit (its demand is above every budget left: the budget
shrank) holds nobody back; it says so in `why` and in its events. So does a job that cannot
run on the islands that are up (fewer of them than it needs, or a suspended job's own island
is down), until the islands that are down come back. A job asked to suspend frees its memory
at its next step boundary: until then it counts as freed, so a waiting job asks no more
victims meanwhile.
Every job left waiting gets one sentence saying why (`pending`).

Backfill (EASY style, `backfill=True`). The first job that waits (the head) holds a
reservation: the earliest time its islands are free, from the running jobs' expected ends
(their kind's learned seconds per step x their steps). A job behind it that fits now starts
also when it would take room the head needs, provided it is expected to end before that
reservation, so it never delays the head's start; `why` says which jobs were backfilled and
which job holds a reservation. With `backfill=False` nothing starts while a job ahead waits
(strict priority order: the baseline bench/scale.py compares against).

Cost. A pass reads the queue's keys (no spec is parsed again for a job that did not change),
keeps the islands' free room sorted so "does it fit now" is one comparison, and gives the
full sentence of what a job lacks only to the first jobs that wait (the others get their
place in the queue); every pass's latency from the event that asked for it is kept
(`decisions_ms`) and logged.
A queued job whose `after` (or `init_from.job`) has not succeeded yet waits apart and holds
nobody back (`why` names the jobs it waits for); once one of them failed or was cancelled, it
fails with that reason (controller/lineage.py).
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence

from . import lineage
from .jobs import JobRunner
from .resolved import MemoryFigures, ResolvedJob
from .scheduler import Demand, Scheduler
from .states import JobState
from .store import JobRecord, JobStore

logger = logging.getLogger(__name__)

# Waiting jobs that get the full sentence of what they lack (and who holds it) on a pass; the
# ones behind them get their place in the queue (cheap on a queue of thousands).
DETAILED_REASONS = 2
# Passes slower than this are logged at INFO (every pass is at DEBUG).
SLOW_PASS_MS = 10.0
# Latencies of the latest passes kept for the bench and the metrics.
DECISIONS_KEPT = 100_000


@dataclasses.dataclass(frozen=True)
class Reservation:
    """The head of the queue's reservation (EASY backfill).

    Attributes:
        job_id: the job that holds it.
        start: when (clock seconds) it is expected to find room, from the running jobs'
            expected ends.
        islands: the islands it is expected to start on.
    """

    job_id: str
    start: float
    islands: tuple[str, ...]


class Reasons(dict):
    """Why each waiting job waits: the sentences of the jobs a pass looked at closely; any
    other job in the queue gets its place in it (computed when asked, not at every pass)."""

    def __init__(self) -> None:
        super().__init__()
        # The queue as of the last pass (never changed once set: a pass sets a new list),
        # and its index (job id -> place), built when first asked for.
        self.queue: list[JobRecord] = []
        self._order: tuple[list[JobRecord], dict[str, int]] = ([], {})

    @property
    def order(self) -> dict[str, int]:
        """The queue as of the last pass: job id -> index (the first job first)."""
        queue, order = self._order
        if queue is not self.queue:
            queue = self.queue  # read once: a pass may set another meanwhile
            order = {r.id: n for n, r in enumerate(queue)}
            self._order = (queue, order)  # one assignment: readers on other threads
        return order

    def get(self, job_id: str, default: str | None = None) -> str | None:  # type: ignore[override]
        if job_id in self:
            return self[job_id]
        position = self.order.get(job_id)
        if position is None:
            return default
        if position == 0:  # no job ahead of it to name
            return "First in the queue; the next scheduling pass places it once it has room."
        head = next(iter(self.order))
        return (
            f"Waits in the queue at position {position + 1}, behind {head}; the jobs ahead "
            "of it take every island that has room now."
        )


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
        backfill: EASY backfill behind a waiting head (False: strict priority order).
        clock: seconds (monotonic) for expected ends and reservations.
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
        *,
        backfill: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.scheduler = scheduler
        self.runners = runners
        self._resolve = resolve
        self._start = start
        self._requeue_suspended = requeue_suspended
        self.memory = memory if memory is not None else MemoryFigures()
        self._fail = fail
        # Why each waiting job waits, for people (a job far down the queue: its place).
        self.pending = Reasons()
        # Jobs started while a job ahead of them waited: they count as staying for good when
        # admission checks that the jobs ahead still fit.
        self._backfilled: set[str] = set()
        # Jobs told (in an event) that they can never fit, with the sentence they were told.
        self._parked: dict[str, str] = {}
        self.backfill = backfill
        self.clock = clock
        # Running jobs' notes for `why` (backfilled ahead of whom, until when).
        self.notes: dict[str, str] = {}
        # Jobs a previous controller left running, with the islands whose hosts still hold
        # them (controller/core.py's `start`): placed there first, so that their state is
        # adopted (controller/peer_recovery.py) instead of restored from a checkpoint.
        self.kept_on: dict[str, tuple[str, ...]] = {}
        # Hints dropped (the job goes elsewhere): its copies there are unloaded at its start.
        self.kept_dropped: dict[str, tuple[str, ...]] = {}
        # The head of the queue's reservation, as of the last pass.
        self.reservation: Reservation | None = None
        # The latest backfills: (the job started, the head it went ahead of, the head's
        # reservation start then): what shows whether a backfill ever delayed a head.
        self.backfills: collections.deque[tuple[str, str, float]] = collections.deque(
            maxlen=DECISIONS_KEPT
        )
        # Latency (ms) of each pass from the event that asked for it.
        self.decisions_ms: collections.deque[float] = collections.deque(maxlen=DECISIONS_KEPT)
        # The same, the pass's own work only (without waiting for the event loop).
        self.pass_ms: collections.deque[float] = collections.deque(maxlen=DECISIONS_KEPT)
        # The same in this thread's CPU time: what the pass costs whatever else the machine
        # runs (on a shared machine the wall-clock figures include other processes' turns).
        self.pass_cpu_ms: collections.deque[float] = collections.deque(maxlen=DECISIONS_KEPT)
        # When the first event since the last pass asked for one (`wake`), clock seconds.
        self._asked_at: float | None = None
        # Seconds per step learned by job kind, and the jobs started: (kind, start, steps).
        self.step_seconds: dict[tuple, float] = {}
        self._started: dict[str, tuple[tuple, float, int]] = {}
        # Queue records by id with their updated_us (parsed again only when changed), and
        # the demands of those not placed (read again when the record or a figure changed).
        self._records: dict[str, tuple[int, JobRecord]] = {}
        self._demands: dict[str, tuple[tuple, Demand]] = {}
        # Whether each queued job names jobs it runs after (`_has_dependencies`), and its
        # kind for step times (`_kind_of`).
        self._deps: dict[str, bool] = {}
        self._kinds: dict[str, tuple] = {}
        self._keys: list | None = None
        self._queue: list[JobRecord] = []
        # Per pass: bytes per device that backfilled jobs hold on each island, and how many
        # islands each waiting job ahead could have once the others leave (`_ahead_still_fit`).
        self._staying: dict[str, int] = {}
        self._could: dict[str, int] = {}
        # Per pass: the residents that never end (`_ahead_changed`), and per waiter priority
        # what stays on each island (`_staying_for`).
        self._endless: list[tuple[int, int, list[str], bool]] = []
        self._staying_at: dict[int, tuple[dict[str, int], dict[str, int] | None]] = {}
        # Per job of a pass: islands claimed by a waiting preemptor it may not take (`_claims`).
        self._barred: set[str] = set()
        # (islands, bytes) of jobs held back behind waiters since the last placement.
        self._held_back: set[tuple[int, int]] = set()

    def demand(self, record: JobRecord) -> Demand:
        """What the job asks of the cluster: its compiled step's bytes once it has loaded (or
        once a job of the same model, mesh and batch has), else the estimator's upper bound
        (0 when its spec no longer resolves)."""
        runner = self.runners.get(record.id)
        if runner is not None:
            bytes_per_device = runner.demand_bytes
        else:
            key = (record.updated_us, record.priority, self.memory.version)
            cached = self._demands.get(record.id)
            if cached is not None and cached[0] == key:
                return cached[1]
            job = self._resolve(record)
            bytes_per_device = 0 if job is None else self.memory.bytes_per_device(job)
        demand = Demand(
            record.id, record.spec.islands, bytes_per_device, record.priority, record.weight
        )
        if runner is None:
            self._demands[record.id] = (key, demand)
        return demand

    def asked(self) -> None:
        """An event asked for a pass (the controller's `wake`): the decision latency of the
        next pass counts from the first such event."""
        if self._asked_at is None:
            self._asked_at = time.perf_counter()

    def _waiting(self) -> list[JobRecord]:
        """The queued and suspended jobs in scheduling order; a record is read again only
        when its row changed since the last pass."""
        keys = self.store.queue_keys([JobState.QUEUED, JobState.SUSPENDED])
        if keys is self._keys:
            return self._queue  # the jobs table did not change since the last pass
        records = {}
        out = []
        cache = self._records
        for row in keys:  # (id, updated_us, state, priority)
            cached = cache.get(row[0])
            if cached is None or cached[0] != row:
                cached = (row, self.store.get_job(row[0]))
            records[row[0]] = cached
            out.append(cached[1])
        self._records = records
        # Per-job caches pruned now and then (when twice the queue), not at every pass.
        keep = 2 * len(records) + 64
        if len(self._demands) > keep:
            self._demands = {j: d for j, d in self._demands.items() if j in records}
        if len(self._deps) > keep:
            self._deps = {j: d for j, d in self._deps.items() if j in records}
        if len(self._kinds) > keep + len(self._started):
            self._kinds = {
                j: k for j, k in self._kinds.items() if j in records or j in self._started
            }
        self._keys, self._queue = keys, out
        return out

    def _has_dependencies(self, record: JobRecord) -> bool:
        """Whether the job names jobs it runs after (its spec never changes: kept)."""
        has = self._deps.get(record.id)
        if has is None:
            has = self._deps[record.id] = bool(lineage.dependencies(record.spec))
        return has

    def schedule(self) -> None:
        """One scheduling pass over the queued and suspended jobs, priority then submission:
        admit what fits (all islands or none) without postponing the jobs ahead (EASY
        backfill: the head's reservation), resume suspended jobs whose islands have room,
        suspend lower-priority jobs for the first job that waits, and say why the rest wait."""
        began = time.perf_counter()
        began_cpu = time.thread_time()
        asked, self._asked_at = self._asked_at, None
        self._learn()
        self._backfilled = {j for j in self._backfilled if self.scheduler.held(j)}
        for job_id in [j for j in self.notes if not self.scheduler.held(j)]:
            del self.notes[job_id]
        self.reservation = None
        room = self._room()
        self._ahead_changed()
        ahead: list[tuple[Demand, tuple[str, ...] | None]] = []
        never_fits: dict[tuple, tuple[str | None, bool]] = {}
        placed = 0
        waiting = self._waiting()
        self.pending.queue = waiting
        claims = self._claims(waiting)
        if self.kept_on:  # before any job could take the islands that hold their state
            waiting = sorted(waiting, key=lambda r: r.id not in self.kept_on)
        queued_state = JobState.QUEUED
        for record in waiting:
            runner = self.runners.get(record.id)
            queued = record.state == queued_state
            if runner is not None and queued:
                continue  # placed on this pass or an earlier one; its task starts it
            if (
                queued
                and len(ahead) >= DETAILED_REASONS
                and (not room or room[-1] <= 0)
                and not self._has_dependencies(record)
            ):
                # Every island is full: nothing behind can start; its place, when asked.
                # (The most common case on a long queue: as cheap as can be.)
                self.pending.pop(record.id, None)
                continue
            if queued and self._has_dependencies(record) and self.waits_on_dependencies(record):
                continue  # holds nobody back: it could not start if it fitted
            if (
                len(ahead) >= DETAILED_REASONS
                and record.state == JobState.QUEUED
                and (not room or room[-1] <= 0)
            ):
                # Every island is full: nothing behind can start; its place, when asked.
                self.pending.pop(record.id, None)
                continue
            if record.state == JobState.SUSPENDED and runner is None:
                # Suspended under an earlier controller: its host copy is gone with it.
                record = self._requeue_suspended(record)
                runner = None
            suspended = record.state == JobState.SUSPENDED
            if suspended and runner is not None and runner.resume.is_set():
                continue
            demand = self.demand(record)
            own = tuple(runner.islands) if suspended and runner is not None else None
            if own is None and self.kept_on:
                own = self._kept(record.id, demand)
            if (
                own is None
                and len(ahead) >= DETAILED_REASONS
                and not _fits_now(room, demand.islands, demand.bytes_per_device)
            ):
                # Far down a long queue and no room for it now: its place, when asked.
                self.pending.pop(record.id, None)
                continue
            shape = (demand.islands, demand.bytes_per_device, own)
            if shape not in never_fits:  # alike jobs share the answer within a pass
                never = self.scheduler.never_fits(*shape)
                if never is not None:
                    never_fits[shape] = (never, True)
                else:  # or not while islands are down (a lost island may come back)
                    never_fits[shape] = (self.scheduler.lacks_up_islands(*shape), False)
            never, for_good = never_fits[shape]
            if never is not None:
                # It holds nobody back (no reservation, no preemption, no job kept from the
                # room it could not use), until an island that is down comes back.
                self._park(record, never, for_good=for_good)
                continue
            self._parked.pop(record.id, None)
            self._barred = {
                i for i, (p, by) in claims.items() if p >= record.priority and by != record.id
            }
            if own is not None and self._barred.intersection(own):
                by = sorted({claims[i][1] for i in self._barred.intersection(own)})
                self.pending[record.id] = (
                    f"Suspended: its islands are kept for {', '.join(by)}, which preempted it "
                    "and starts once the other jobs it preempted have left."
                )
                continue
            islands = self._admit(record, demand, own, ahead, room)
            if islands is not None:
                placed += 1
                room = self._room()
                if ahead:
                    self._backfilled.add(record.id)
                self._ahead_changed()
                self.pending.pop(record.id, None)
                if suspended:
                    assert runner is not None
                    runner.resume.set()
                else:
                    self.kept_on.pop(record.id, None)
                    self._start(record, islands)
                    self._started[record.id] = (
                        self._kind_of(record),
                        self.clock(),
                        max(0, record.spec.train.steps),
                    )
                if claims:
                    claims = self._claims(waiting)  # (a preemptor placed: its claim ends)
                continue
            if len(ahead) >= DETAILED_REASONS:
                # Behind the first waiters: its place in the queue, when asked (EASY: the
                # head's reservation, and the first waiters' room, are what is protected).
                self.pending.pop(record.id, None)
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
            if not ahead and own is None and self.backfill:
                self.reservation = self._reserve(demand)
                if self.reservation is not None:
                    reason += " " + self._reservation_sentence(self.reservation)
            self.pending[record.id] = ("Suspended: " if suspended else "") + reason
            ahead.append((demand, own))
        ended = time.perf_counter()
        took_ms = (ended - (asked or began)) * 1e3
        self.decisions_ms.append(took_ms)
        self.pass_ms.append((ended - began) * 1e3)
        self.pass_cpu_ms.append((time.thread_time() - began_cpu) * 1e3)
        logger.log(
            logging.INFO if took_ms > SLOW_PASS_MS else logging.DEBUG,
            "scheduling pass: %d placed, %d waiting, %.2f ms from the event",
            placed,
            len(ahead),
            took_ms,
        )

    def _claims(self, waiting: Sequence[JobRecord]) -> dict[str, tuple[int, str]]:
        """Islands a waiting job has asked jobs to leave (preemption): island -> (the
        highest priority among such waiting jobs, that job). While it waits, no job of its
        priority or lower is placed or resumed there (`_barred`): its victims suspend at
        their own step boundaries, and the room the first one freed was taken back at once
        (that victim resumed, or a job behind took it, since the preemptor did not fit yet),
        and the preemptor suspended it again: for ever, one victim after the other."""
        runners = self.runners
        priority = {
            r.id: r.priority
            for r in waiting
            # Still waiting: not placed (on this pass either), not being resumed.
            if (runner := runners.get(r.id)) is None
            or (runner.suspended and not runner.resume.is_set())
        }
        claims: dict[str, tuple[int, str]] = {}
        for r in self.runners.values():
            p = priority.get(r.suspended_for) if r.suspend_requested else None
            if p is None:
                continue
            for island in r.islands:
                if island not in claims or claims[island][0] < p:
                    claims[island] = (p, r.suspended_for)
        return claims

    def _kept(self, job_id: str, demand: Demand) -> tuple[str, ...] | None:
        """The islands that still hold the job's state when it can be placed on them now;
        else None (and the hint is dropped: it goes wherever it fits, from a checkpoint)."""
        kept = self.kept_on.get(job_id)
        if kept is None:
            return None
        sched = self.scheduler
        if len(kept) == demand.islands and all(
            i in sched.hosts
            and i not in sched.down
            and sched.free_bytes(i) >= demand.bytes_per_device
            for i in kept
        ):
            return kept
        self.kept_dropped[job_id] = self.kept_on.pop(job_id)
        return None

    def _admit(
        self,
        record: JobRecord,
        demand: Demand,
        own: tuple[str, ...] | None,
        ahead: Sequence[tuple[Demand, tuple[str, ...] | None]],
        room: list[float],
    ) -> list[str] | None:
        """Place the job if the policy lets it start now: first in line, or behind waiting
        jobs without holding them back (strict order: never behind them)."""
        if ahead and not self.backfill:
            return None
        if own is None and not _fits_now(room, demand.islands, demand.bytes_per_device):
            return None
        shape = (demand.islands, demand.bytes_per_device)
        if own is None and ahead and shape in self._held_back:
            islands = None  # an alike job was held back on this pass, nothing placed since
        else:
            islands = self._place(demand, own, ahead)
            if islands is None and own is None and ahead:
                self._held_back.add(shape)
        if islands is not None or not ahead or own is not None:
            return islands
        return self._backfill_before_reservation(record, demand)

    # ---- EASY backfill ----------------------------------------------------------------------

    def _room(self) -> list[float]:
        """Free bytes per device of every island that is up, ascending."""
        sched = self.scheduler
        return sorted(sched.free_bytes(i) for i in sched.island_ids if i not in sched.down)

    def _learn(self) -> None:
        """Learn seconds per step of a kind from the jobs started here that succeeded."""
        for job_id in [j for j in self._started if not self.scheduler.held(j)]:
            if job_id in self.runners:
                continue  # placed, not started yet, or suspended
            kind, started, steps = self._started.pop(job_id)
            try:
                record = self.store.get_job(job_id)
            except Exception:  # noqa: BLE001 - pruned meanwhile
                continue
            if record.state == JobState.SUCCEEDED and steps > 0:
                per_step = max(0.0, self.clock() - started) / steps
                old = self.step_seconds.get(kind)
                self.step_seconds[kind] = per_step if old is None else 0.7 * old + 0.3 * per_step

    def _kind_of(self, record: JobRecord) -> tuple:
        """`_kind(record)`, kept per job (what it reads of the spec never changes)."""
        kind = self._kinds.get(record.id)
        if kind is None:
            kind = self._kinds[record.id] = _kind(record)
        return kind

    def expected_s(self, record: JobRecord) -> float | None:
        """How long the job is expected to run (its kind's seconds per step x its steps), or
        None before a job of its kind has completed here, and for an eval job (its length is
        not a number of training steps)."""
        kind = self._kind_of(record)
        if kind[0] == "eval":
            return None
        per_step = self.step_seconds.get(kind)
        return None if per_step is None else per_step * max(0, record.spec.train.steps)

    def _expected_end(self, job_id: str) -> float:
        """When a resident job is expected to end (clock seconds; inf when unknown): from
        its progress once it has stepped (the steps left at its kind's pace), else from its
        start; never before now (a job late on its estimate is expected any moment, not in
        the past)."""
        started = self._started.get(job_id)
        if started is None:
            return math.inf
        kind, at, steps = started
        if kind[0] == "eval":
            return math.inf  # an eval job's length is not a number of training steps
        per_step = self.step_seconds.get(kind)
        if per_step is None:
            return math.inf
        now = self.clock()
        runner = self.runners.get(job_id)
        done = min(steps, getattr(runner, "steps_done", 0)) if runner is not None else 0
        if done > 0:
            return now + per_step * (steps - done)
        return max(now, at + per_step * steps)

    def _reserve(self, demand: Demand) -> Reservation | None:
        """The head's reservation: the earliest time `demand.islands` islands have room for
        it as the resident jobs end (None when some end is unknown)."""
        sched = self.scheduler
        now = self.clock()
        ready: list[tuple[float, int, str]] = []
        for n, island in enumerate(sched.island_ids):
            if island in sched.down:
                continue
            free = sched.free_bytes(island)
            at = now
            if free < demand.bytes_per_device:
                ends = sorted((self._expected_end(j), sched.held(j)) for j in sched.jobs_on(island))
                at = math.inf
                for end, nbytes in ends:
                    free += nbytes
                    if free >= demand.bytes_per_device:
                        at = end
                        break
            ready.append((at, n, island))
        ready.sort()
        # The earliest islands of one host count.
        chosen = sched.same_hosts([i for _, _, i in ready], demand.islands)
        if chosen is None:
            return None
        at_of = {island: at for at, _, island in ready}
        start = max(at_of[i] for i in chosen)
        if math.isinf(start):
            return None
        return Reservation(demand.job_id, start, tuple(chosen))

    def _reservation_sentence(self, r: Reservation) -> str:
        wait = max(0.0, r.start - self.clock())
        return (
            f"Holds a reservation: expected to start in about {wait:.0f} s on "
            f"{', '.join(r.islands)} as running jobs end; jobs behind it start first only if "
            "they are expected to end before then."
        )

    def _backfill_before_reservation(self, record: JobRecord, demand: Demand) -> list[str] | None:
        """Start a job behind the waiting head on room the head's reservation needs, when it
        is expected to end before the reservation starts (so the head is not delayed)."""
        r = self.reservation
        length = self.expected_s(record)
        if r is None or length is None:
            return None
        now = self.clock()
        if now + length > r.start:
            return None
        sched = self.scheduler
        room = [i for i in sched.candidates(demand) if i not in self._barred]
        # Islands the head does not need first: they hold it back in no case.
        room.sort(key=lambda i: i in r.islands)
        room = sched.same_hosts(room, demand.islands)
        if room is None:
            return None
        islands = sched.place(demand, sorted(room, key=sched.island_ids.index))
        if islands is not None:
            note = (
                f"Backfilled ahead of {r.job_id}: expected to end in about {length:.0f} s, "
                f"before {r.job_id}'s reservation in about {r.start - now:.0f} s."
            )
            try:
                self.store.add_event(record.id, "scheduler", note)
            except BaseException:
                # The pass ends here (the database locked): the job is not started, so it
                # must hold nothing (a hold without a runner is never released).
                sched.release(record.id)
                raise
            self.notes[record.id] = note
            self.backfills.append((record.id, r.job_id, r.start))
            logger.info(
                "job %s backfilled ahead of %s (ends in %.1f s, reservation in %.1f s)",
                record.id,
                r.job_id,
                length,
                r.start - now,
                extra={"job_id": record.id},
            )
        return islands

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
            # Islands of one host count (host i of each island exchanges with host i).
            groups: dict[int, list[str]] = {}
            chosen = []
            r = self.reservation
            # Behind the head: not on the islands of its reservation (the count rule below
            # would let a job that runs past the reservation's start take one, delaying the
            # head; one expected to end before it may, `_backfill_before_reservation`).
            reserved = r.islands if ahead and r is not None else ()
            for island in sched.candidates(demand):
                if island in self._barred or island in reserved:
                    continue
                group = groups.setdefault(sched.hosts[island], [])
                if self._ahead_still_fit(ahead, demand, [*group, island]):
                    group.append(island)
                    if len(group) == demand.islands:
                        chosen = group
                        break
            if len(chosen) < demand.islands:
                return None
        if not self._ahead_still_fit(ahead, demand, chosen):
            return None
        return sched.place(demand, sorted(chosen, key=sched.island_ids.index))

    def _ahead_changed(self) -> None:
        """Placements changed: what backfilled jobs hold per island, read again."""
        self._held_back.clear()
        sched = self.scheduler
        self._could = {}
        staying = dict.fromkeys(sched.island_ids, 0)
        for job_id in self._backfilled:  # a few jobs, not every island's residents
            held = sched.held(job_id)
            for island in sched.islands_of(job_id):
                staying[island] += held
        self._staying = staying
        # Residents that never end (serve jobs stay until cancelled) and are not leaving: a
        # waiter they outrank or equal (it cannot preempt them) waits for them in vain.
        # (priority, bytes per device, islands, backfilled: counted in `_staying` already)
        self._endless = [
            (r.priority, held, sched.islands_of(r.job_id), r.job_id in self._backfilled)
            for r in self.runners.values()
            if _job_kind(r.record) == "serve"
            and not (r.suspend_requested or r.cancel_requested)
            and (held := sched.held(r.job_id))
        ]
        self._staying_at = {}

    def _ahead_still_fit(
        self,
        ahead: Sequence[tuple[Demand, tuple[str, ...] | None]],
        demand: Demand,
        islands: Sequence[str],
    ) -> bool:
        """Whether every job waiting ahead could be placed once the jobs it waits on leave,
        with `demand` on `islands` and the jobs already started past it staying. A waiter
        that could not start while the residents that never end stay (a serve job it cannot
        preempt) holds no room: it would keep islands idle for as long as they run."""
        sched = self.scheduler
        for waiter, own in ahead:
            need = waiter.bytes_per_device
            needed = len(own) if own else waiter.islands
            staying, endless = self._staying_for(waiter.priority)
            without = self._could.get(waiter.job_id)
            if without is None:
                without = sum(
                    (sched.budget(i) or math.inf) - staying[i] >= need
                    for i in own or sched.island_ids
                    if i not in sched.down
                )
                if endless is not None and without < needed:
                    # With only the endless residents staying (the jobs started past it
                    # leave in time), is there room enough for it ever?
                    ever = sum(
                        (sched.budget(i) or math.inf) - endless[i] >= need
                        for i in own or sched.island_ids
                        if i not in sched.down
                    )
                    if ever < needed:
                        without = -1
                self._could[waiter.job_id] = without
            if without < 0:
                continue
            # Islands that `demand` would take from it: room for it before, none after.
            lost = sum(
                1
                for i in islands
                if i not in sched.down
                and (own is None or i in own)
                and (sched.budget(i) or math.inf) - staying[i] >= need
                and (sched.budget(i) or math.inf) - staying[i] - demand.bytes_per_device < need
            )
            with_ = without - lost
            # Only a placement that takes away room the waiter needs holds it back.
            if with_ < needed and with_ < without:
                return False
        return True

    def _staying_for(self, priority: int) -> tuple[dict[str, int], dict[str, int] | None]:
        """Bytes per device that stay on each island whatever a waiter of `priority` waits
        for (the jobs started past the waiters, and the residents that never end which it
        cannot preempt), and those of the residents that never end alone (None: there are
        none). Computed once per priority between placements (`_ahead_changed`)."""
        cached = self._staying_at.get(priority)
        if cached is not None:
            return cached
        staying, endless = self._staying, None
        for p, held, islands, backfilled in self._endless:
            if p < priority:
                continue  # it preempts them
            if endless is None:
                staying, endless = dict(staying), dict.fromkeys(staying, 0)
            for island in islands:
                endless[island] += held
                if not backfilled:
                    staying[island] += held
        self._staying_at[priority] = (staying, endless)
        return staying, endless

    def _park(self, record: JobRecord, never: str, *, for_good: bool = True) -> None:
        """A job that can never fit (`for_good`), or not while an island it needs is down: it
        holds nobody back, and says so once in its events."""
        suspended = record.state == JobState.SUSPENDED
        if for_good:
            lead = (
                "Suspended, and it can never resume on its islands: "
                if suspended
                else "It can never run on this cluster as it is: "
            )
        else:
            lead = (
                "Suspended, and it cannot resume until its islands are back: "
                if suspended
                else "It cannot run until islands that are down come back (it holds no "
                "job back meanwhile): "
            )
        sentence = lead + never
        self.pending[record.id] = sentence
        if self._parked.get(record.id) != sentence:
            logger.warning("job %s: %s", record.id, sentence, extra={"job_id": record.id})
            self.store.add_event(record.id, "scheduler", sentence)
            # Only once written: a write that failed (the database locked) is tried again
            # on the next pass.
            self._parked[record.id] = sentence

    def preempt(self, demand: Demand, own: Sequence[str] | None = None) -> list[str]:
        """Suspend lower-priority resident jobs so that `demand` fits (on `own` islands when
        given): the fewest islands' worth, lowest priority (then newest) first. Returns the
        jobs asked to suspend (none when `demand` fits once the jobs already asked to leave
        have left: it waits for them rather than asking more jobs on other islands)."""
        sched = self.scheduler
        # Memory already on its way out: jobs asked to suspend (or cancelled) free it at their
        # next step boundary. It counts as reclaimed, or every pass until they have left
        # (any wake) would suspend more victims on other islands for the same waiting job.
        leaving: dict[str, int] = {}
        for r in self.runners.values():
            if (r.suspend_requested or r.cancel_requested) and not r.suspended:
                held = sched.held(r.job_id)
                for island in sched.islands_of(r.job_id) if held else ():
                    leaving[island] = leaving.get(island, 0) + held
        if leaving:
            if own is not None:
                fits = all(
                    i not in sched.down
                    and sched.free_bytes(i) + leaving.get(i, 0) >= demand.bytes_per_device
                    for i in own
                )
            else:
                fits = (
                    sched.same_hosts(sched.candidates(demand, reclaim=leaving), demand.islands)
                    is not None
                )
            if fits:
                return []
        # Victims are chosen for what the leaving jobs do not free already.
        reclaim = dict(leaving)
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
            key=lambda r: (r.priority, -r.record.created_us),
        )
        # Each candidate's islands once (not per island of the loop below).
        where = {r.job_id: set(self.scheduler.islands_of(r.job_id)) for r in lower}
        for island in own or self.scheduler.island_ids:
            for r in lower:
                if island in where[r.job_id]:
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
            room = self.scheduler.same_hosts(
                self.scheduler.candidates(demand, reclaim=reclaim), demand.islands
            )
            if room is None:
                return []
        chosen = set()
        for island in room:
            chosen.update(victims.get(island, []))
        for job_id in sorted(chosen):
            self.runners[job_id].request_suspend(by=demand.job_id)
            logger.info(
                "suspending job %s for higher-priority job %s",
                job_id,
                demand.job_id,
                extra={"job_id": job_id},
            )
        return sorted(chosen)


def _fits_now(room: list[float], islands: int, bytes_per_device: int) -> bool:
    """Whether `islands` islands have `bytes_per_device` free (`room` ascending)."""
    return islands <= len(room) - bisect.bisect_left(room, bytes_per_device)


def _job_kind(record: JobRecord) -> str:
    """The job's `kind` (`train` unless set; the spec was checked on submission)."""
    spec = record.spec
    return spec.kind if spec.HasField("kind") else "train"


def _kind(record: JobRecord) -> tuple:
    """A job's kind for its step time: job kind (train, eval), model, islands, devices, mesh,
    batch, length."""
    spec = record.spec
    return (
        _job_kind(record),
        spec.model.SerializeToString(deterministic=True),
        spec.islands,
        spec.devices_per_island,
        spec.mesh.SerializeToString(deterministic=True),
        spec.train.global_batch,
        spec.train.seq_len,
    )
