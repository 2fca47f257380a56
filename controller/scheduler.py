"""The scheduler: memory-aware gang admission, shared islands, stride-scheduled step slots.

Admission. Every island has a device-memory budget per device (the hosts report it: `up
--island-memory` on simulated islands, the device's limit on GPUs). A job's demand is bytes
per device on each of its islands: what its compiled step holds at its peak (measured at
its load, or at the load of an earlier job of the same model, mesh and batch), else the
estimator's upper bound of it. A job holds all of its islands or none; a job that can never
fit (more islands than the cluster, more memory than any island's budget) is refused at once;
the rest wait (controller/admission.py orders them). Several jobs may be resident on one
island as long as the sum of their demands fits its budget: `place` never exceeds it.

Step slots. Jobs resident on shared islands take turns through `acquire`, slice by slice (a
slot holds a slice of K consecutive steps, controller/dispatch.py): every island has `slots`
slices in flight at most (over all its jobs), and a free slot goes to the waiting job with the
smallest stride-scheduling pass; a job's pass advances by K x (its measured step seconds) /
weight per granted slice, so device time follows the weights (`share_by="time"`), or by
K / weight so step counts do (`share_by="steps"`). Time is the default: the slice is
charged at grant time by the job's smoothed step seconds and corrected by what the hosts
measured when it ends. A job first in pass order that is not asking for a moment (its
controller loop is reading a reply) keeps its turn for up to HOLD_S while its islands are
still busy with a step in flight, so shares follow the weights rather than whoever happens to
be asking, without idling the devices. A waiting job reserves the islands
it could not get, so jobs behind it in pass order cannot starve a multi-island gang, while
jobs on disjoint islands proceed at once. The controller sends a granted step to all of the
job's islands in one synchronous call, so every island sees the jobs' steps in the one
order in which they were granted (per-island island_seq): no two jobs can wait on each other
across islands.

Serving (issue 18). While an island's service answers requests (controller/serve_router.py's
ServeArbiter holds it: `hold_for_serving`), no slice is granted to a job on that island, on
any of its islands; the job reserves nothing meanwhile, so the jobs that do not share the
serving island use its other islands.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping, Sequence

from .options import format_size

logger = logging.getLogger(__name__)

# Weight of a new step-time measurement in a job's moving average of step seconds.
STEP_TIME_EMA = 0.3
# How long a free slot is held for a job that is first in pass order but not asking at the
# moment (its controller loop is reading a reply): only while the island still has a step in
# flight, so a hold never idles the devices; after it, the slot goes to the next waiter.
HOLD_S = 0.25


@dataclasses.dataclass(frozen=True)
class Demand:
    """What a job asks of the cluster.

    Attributes:
        job_id: the job.
        islands: how many islands (a gang: all or none).
        bytes_per_device: device memory it holds on each of its islands.
        priority: higher first.
        weight: share of device time among the jobs it shares islands with.
    """

    job_id: str
    islands: int
    bytes_per_device: int
    priority: int = 0
    weight: float = 1.0


@dataclasses.dataclass
class _Slots:
    """A resident job's stride-scheduling state."""

    islands: tuple[str, ...]
    weight: float
    pass_: float = 0.0
    order: int = 0
    step_s: float | None = None
    waiter: asyncio.Future | None = None
    inflight: int = 0
    # Steps in the slice it is asking for.
    asking: int = 1
    # Until when (event-loop time) a free slot is held for it while it is not asking.
    hold_until: float = 0.0
    # Costs charged at grant time for steps not finished yet (corrected by `done`).
    charged: collections.deque = dataclasses.field(default_factory=collections.deque)


class Scheduler:
    """Island memory bookkeeping, gang placement and stride-scheduled step slots.

    Args:
        island_ids: the cluster's islands, in island order.
        budgets: bytes per device each island may hold (0 or absent: unlimited).
        slots: steps in flight per island over all its jobs.
        share_by: "time" (a slot costs the job's measured step seconds) or "steps";
            None reads PATHWAYS_LITE_SHARE_BY (default "time").
    """

    def __init__(
        self,
        island_ids: Sequence[str],
        budgets: Mapping[str, int] | None = None,
        *,
        slots: int = 2,
        share_by: str | None = None,
        hosts: Mapping[str, int] | None = None,
    ) -> None:
        # PATHWAYS_LITE_SHARE_BY=steps makes slot counts (not seconds) follow the weights.
        share_by = share_by or os.environ.get("PATHWAYS_LITE_SHARE_BY", "time")
        if share_by not in ("time", "steps"):
            raise ValueError(f"share_by={share_by!r} must be 'time' or 'steps'.")
        if slots < 1:
            raise ValueError(f"slots={slots} must be at least 1.")
        self.island_ids = list(island_ids)
        self.budgets = {i: int((budgets or {}).get(i, 0)) for i in self.island_ids}
        # Hosts per island: a job's islands all have as many (host i of each island exchanges
        # with host i of the others).
        self.hosts = {i: int((hosts or {}).get(i, 1)) for i in self.island_ids}
        self.slots = slots
        self.share_by = share_by
        # job -> (islands, bytes per device held on each).
        self._held: dict[str, tuple[tuple[str, ...], int]] = {}
        # The same, indexed by island (jobs in placement order, bytes held in all), so a
        # scheduling pass over a long queue never scans every placement per island.
        self._on: dict[str, dict[str, None]] = {i: {} for i in self.island_ids}
        self._used: dict[str, int] = {i: 0 for i in self.island_ids}
        self._index = {i: n for n, i in enumerate(self.island_ids)}
        self._jobs: dict[str, _Slots] = {}
        self._inflight: dict[str, int] = {i: 0 for i in self.island_ids}
        self._order = 0
        # Islands that are lost (their hosts could not be restarted), with the reason: no job
        # is placed on them until they are back (`mark_up`).
        self.down: dict[str, str] = {}
        # Islands whose service holds them (`hold_for_serving`): their jobs get no slice.
        self.serving: set[str] = set()

    # ---- memory and placement --------------------------------------------------------------

    def budget(self, island: str) -> int:
        """The island's budget per device; 0 means unlimited."""
        return self.budgets[island]

    def used(self, island: str) -> int:
        """Bytes per device the island's resident jobs hold."""
        return self._used[island]

    def free_bytes(self, island: str) -> float:
        """Bytes per device still free on the island (inf when unlimited)."""
        budget = self.budgets[island]
        return float("inf") if budget == 0 else budget - self._used[island]

    def free(self) -> list[str]:
        """Islands that are up and that no job holds memory on, in island order."""
        return [i for i in self.island_ids if not self._on[i] and i not in self.down]

    def mark_down(self, island: str, reason: str) -> None:
        """Place nothing on `island` until `mark_up` (its hosts are lost)."""
        self.down[island] = reason

    def mark_up(self, island: str) -> None:
        self.down.pop(island, None)

    def never_fits(
        self, islands: int, bytes_per_device: int, own: Sequence[str] | None = None
    ) -> str | None:
        """Why a job of `islands` islands x `bytes_per_device` can never run (on its `own`
        islands, for a suspended job whose state is on them), or None."""
        if own is not None:
            small = [i for i in own if 0 < self.budgets[i] < bytes_per_device]
            if small:
                return (
                    f"it holds {bytes_per_device} bytes per device but the budget of "
                    + ", ".join(f"{i} is {self.budgets[i]}" for i in small)
                    + " bytes per device."
                )
            return None
        if islands < 1 or islands > len(self.island_ids):
            return (
                f"the job needs islands={islands} but the cluster has "
                f"{len(self.island_ids)} island{'s' if len(self.island_ids) != 1 else ''}."
            )
        big = sorted((self.budgets[i] or float("inf") for i in self.island_ids), reverse=True)
        if big[islands - 1] < bytes_per_device:
            return (
                f"the job needs {format_size(bytes_per_device)} per device on each of "
                f"{islands} island(s), but only {sum(b >= bytes_per_device for b in big)} "
                f"island(s) have that budget (largest: {format_size(max(big))} per device)."
            )
        if islands == 1:
            return None
        counts = collections.Counter(
            self.hosts[i]
            for i in self.island_ids
            if (self.budgets[i] or float("inf")) >= bytes_per_device
        )
        if max(counts.values()) < islands:
            return (
                f"the job needs islands={islands} with the same number of hosts (host i of "
                "each island exchanges with host i), but the cluster's islands with room have "
                + ", ".join(f"{n} x {h} host(s)" for h, n in sorted(counts.items()))
                + "."
            )
        return None

    def lacks_up_islands(
        self, islands: int, bytes_per_device: int, own: Sequence[str] | None = None
    ) -> str | None:
        """Why a job of `islands` islands x `bytes_per_device` (on its `own` islands, for a
        suspended job whose state is on them) cannot run on the islands that are up now,
        though it could on the whole cluster (`never_fits` says None): too few islands with
        its budget (of one host count) are up, or one of its own islands is down. None when
        it could run on them once they have room. Unlike `never_fits`, this lasts only until
        the islands are back (`mark_up`), so submissions are not refused for it."""
        if not self.down:
            return None
        if own is not None:
            lost = [i for i in own if i in self.down]
            if not lost:
                return None
            down = ", ".join(f"{i} ({self.down[i]})" for i in lost)
            return f"its island(s) {down} are down."
        counts = collections.Counter(
            self.hosts[i]
            for i in self.island_ids
            if i not in self.down and (self.budgets[i] or float("inf")) >= bytes_per_device
        )
        usable = max(counts.values(), default=0)
        if usable >= islands:
            return None
        return (
            f"the job needs {format_size(bytes_per_device)} per device on each of {islands} "
            f"island(s) (of one host count), but only {usable} such island(s) are up; down: "
            + ", ".join(f"{i} ({reason})" for i, reason in self.down.items())
            + "."
        )

    def fits_ever(self, islands: int, bytes_per_device: int = 0) -> bool:
        """Whether such a job can ever run on this cluster."""
        return self.never_fits(islands, bytes_per_device) is None

    def candidates(self, demand: Demand, *, reclaim: Mapping[str, int] | None = None) -> list[str]:
        """Islands with room for `demand` (counting `reclaim` bytes as freed), fewest
        resident jobs first, then island order."""
        reclaim = reclaim or {}
        room = [
            i
            for i in self.island_ids
            if self.free_bytes(i) + reclaim.get(i, 0) >= demand.bytes_per_device
            and demand.job_id not in self._on[i]
            and i not in self.down
        ]
        return sorted(room, key=lambda i: (len(self._on[i]), self._index[i]))

    def same_hosts(self, room: Sequence[str], islands: int) -> list[str] | None:
        """The first `islands` islands of `room` (in its order) that have one host count, or
        None: a job's islands all have as many hosts."""
        groups: dict[int, list[str]] = {}
        for island in room:
            group = groups.setdefault(self.hosts[island], [])
            group.append(island)
            if len(group) == islands:
                return group
        return None

    def place(self, demand: Demand, islands: Sequence[str] | None = None) -> list[str] | None:
        """Hold `demand` on `islands` (or the best free ones of one host count): all of them,
        or None."""
        if islands is None:
            room = self.same_hosts(self.candidates(demand), demand.islands)
            if room is None:
                return None
            chosen = sorted(room, key=self._index.__getitem__)
        else:
            if any(self.free_bytes(i) < demand.bytes_per_device or i in self.down for i in islands):
                return None
            chosen = list(islands)
        self.release(demand.job_id)
        self._hold(demand.job_id, tuple(chosen), demand.bytes_per_device)
        logger.info(
            "job %s holds %d bytes per device on %s", demand.job_id, demand.bytes_per_device, chosen
        )
        return chosen

    def assign(self, job_id: str, islands: int, bytes_per_device: int = 0) -> list[str] | None:
        """`place` for a bare job id (the pre-multi-tenancy call)."""
        return self.place(Demand(job_id, islands, bytes_per_device))

    def resize(self, job_id: str, bytes_per_device: int) -> None:
        """Change what a placed job holds (the measured figure replaces the estimate)."""
        islands, old = self._held[job_id]
        self._held[job_id] = (islands, int(bytes_per_device))
        for i in islands:
            self._used[i] += int(bytes_per_device) - old

    def _hold(self, job_id: str, islands: tuple[str, ...], nbytes: int) -> None:
        self._held[job_id] = (islands, nbytes)
        for i in islands:
            self._on[i][job_id] = None
            self._used[i] += nbytes

    def release(self, job_id: str) -> list[str]:
        """Free the memory `job_id` holds; returns its islands."""
        islands, nbytes = self._held.pop(job_id, ((), 0))
        for i in islands:
            self._on[i].pop(job_id, None)
            self._used[i] -= nbytes
        return list(islands)

    def held(self, job_id: str) -> int:
        """Bytes per device `job_id` holds on each of its islands (0 when none)."""
        return self._held.get(job_id, ((), 0))[1]

    def islands_of(self, job_id: str) -> list[str]:
        """The islands `job_id` holds, in island order."""
        islands, _ = self._held.get(job_id, ((), 0))
        return sorted(islands, key=self._index.__getitem__)

    def jobs_on(self, island: str) -> list[str]:
        """Ids of the jobs holding memory on `island`, in placement order."""
        return list(self._on[island])

    def lacking(self, demand: Demand, own: Sequence[str] | None = None) -> str:
        """A sentence: what `demand` lacks now (on its `own` islands when given) and who
        holds it."""
        room = [i for i in self.candidates(demand) if own is None or i in own]
        parts = []
        for i in own or self.island_ids:
            if i in self.down:
                parts.append(f"{i}: down ({self.down[i]})")
                continue
            holders = self.jobs_on(i)
            budget = self.budgets[i]
            parts.append(
                f"{i}: {format_size(self.free_bytes(i))} of {format_size(budget)} free"
                + (f" (held by {', '.join(holders)})" if holders else "")
                if budget
                else f"{i}: unlimited"
            )
        where = f"its island(s) {', '.join(own)}" if own else f"{demand.islands} island(s)"
        return (
            f"Needs {format_size(demand.bytes_per_device)} per device on {where}; "
            f"{len(room)} island(s) have room now ({'; '.join(parts)})."
        )

    # ---- step slots (stride scheduling) -----------------------------------------------------

    def join(self, job_id: str, islands: Iterable[str], weight: float) -> None:
        """Start giving `job_id` step slots on `islands`; its pass starts at the smallest pass
        of the jobs already there (no credit for time it was absent)."""
        islands = tuple(islands)
        if weight <= 0:
            raise ValueError(f"weight={weight!r} must be positive.")
        others = [s.pass_ for s in self._jobs.values() if set(s.islands) & set(islands)]
        self._order += 1
        previous = self._jobs.get(job_id)
        self._jobs[job_id] = _Slots(
            islands,
            weight,
            pass_=min(others, default=0.0),
            order=self._order,
            step_s=previous.step_s if previous else None,
        )

    def hold_for_serving(self, island: str, on: bool) -> None:
        """Grant no slice to a job on `island` while `on` (its service answers requests);
        off: its jobs take turns again at once."""
        if on:
            self.serving.add(island)
        else:
            self.serving.discard(island)
            self._grant()

    def blocked(self, job_id: str) -> bool:
        """Whether an island of `job_id` serves now (a slice granted before the hold began
        is not sent: controller/dispatch.py asks again)."""
        slots = self._jobs.get(job_id)
        return slots is not None and bool(set(slots.islands) & self.serving)

    def leave(self, job_id: str) -> None:
        """Stop giving `job_id` slots; a pending `acquire` returns False."""
        slots = self._jobs.pop(job_id, None)
        if slots is not None and slots.waiter is not None and not slots.waiter.done():
            slots.waiter.set_result(False)
        self._grant()

    def interrupt(self, job_id: str) -> None:
        """Make a pending `acquire` of `job_id` return False (cancel or suspend)."""
        slots = self._jobs.get(job_id)
        if slots is not None:
            slots.hold_until = 0.0
        if slots is not None and slots.waiter is not None and not slots.waiter.done():
            slots.waiter.set_result(False)
            slots.waiter = None
        self._grant()

    async def acquire(self, job_id: str, steps: int = 1) -> bool:
        """Wait for a slot for a slice of `steps` steps on every island of `job_id`; False
        when interrupted. The slice is charged `steps` times the job's step cost."""
        slots = self._jobs.get(job_id)
        if slots is None:
            return True  # not stride-scheduled (a job outside the arbiter)
        slots.asking = max(1, steps)
        slots.waiter = asyncio.get_running_loop().create_future()
        waiter = slots.waiter
        self._grant()
        try:
            return await waiter
        except asyncio.CancelledError:
            # Granted just before the asker gave up: free the slot it will never use.
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self.refund(job_id, slots.islands)
            raise

    def done(
        self, job_id: str, islands: Iterable[str], step_s: float | None, steps: int = 1
    ) -> None:
        """A granted slice of `steps` steps finished on its hosts in `step_s` seconds in all
        (None: failed or cut short): free its slots, learn its step time."""
        slots = self._free(job_id, islands)
        if slots is not None:
            charged = slots.charged.popleft() if slots.charged else None
            if self.share_by == "time" and charged is not None and step_s is not None:
                # Charge what the step really took instead of the estimate granted on.
                slots.pass_ += (step_s - charged) / slots.weight
            elif self.share_by == "steps" and charged is not None:
                # The steps the slice carried (fewer than granted: sized again at its send,
                # or cut short by serving).
                slots.pass_ += (max(1, steps) - charged) / slots.weight
            if step_s is not None and step_s > 0:
                per_step = step_s / max(1, steps)
                slots.step_s = (
                    per_step
                    if slots.step_s is None
                    else (1 - STEP_TIME_EMA) * slots.step_s + STEP_TIME_EMA * per_step
                )
        self._grant()

    def refund(self, job_id: str, islands: Iterable[str]) -> None:
        """The slice granted last to `job_id` was never sent (its job stopped, or an island
        of it began to serve, before it went): free its slots and take back what it was
        charged, so a job whose grants are given back keeps its share."""
        slots = self._free(job_id, islands)
        if slots is not None and slots.charged:
            # The slice granted last (the slices before it may still run): a job asks for
            # one slice at a time, and gives a slice back before it asks again.
            slots.pass_ -= slots.charged.pop() / slots.weight
        self._grant()

    def _free(self, job_id: str, islands: Iterable[str]) -> _Slots | None:
        """Free a granted slice's slots; returns the job's stride state (None: it left)."""
        for island in islands:
            self._inflight[island] = max(0, self._inflight[island] - 1)
        slots = self._jobs.get(job_id)
        if slots is not None:
            slots.inflight = max(0, slots.inflight - 1)
            if slots.hold_until:  # it asks again once its controller loop has the reply
                slots.hold_until = self._now() + HOLD_S
        return slots

    def _cost(self, slots: _Slots) -> float:
        """The estimated cost of a job's next step (seconds, or 1 slot)."""
        if self.share_by == "steps":
            return 1.0
        if slots.step_s is not None:
            return slots.step_s
        known = [s.step_s for s in self._jobs.values() if s.step_s is not None]
        return sum(known) / len(known) if known else 0.0

    @staticmethod
    def _now() -> float:
        try:
            return asyncio.get_running_loop().time()
        except RuntimeError:
            return 0.0

    def _holding(self, slots: _Slots, now: float) -> bool:
        """Whether a job that is not asking keeps its turn: recently active, room for another
        step of its own, and every island of it still busy with a step in flight."""
        return (
            now < slots.hold_until
            and slots.inflight < self.slots
            and all(self._inflight[i] >= 1 for i in slots.islands)
        )

    def _grant(self) -> None:
        now = self._now()
        turns = sorted(
            (s.pass_, s.order, job_id)
            for job_id, s in self._jobs.items()
            if (s.waiter is not None and not s.waiter.done()) or self._holding(s, now)
        )
        reserved: set[str] = set()
        held = False
        for _, _, job_id in turns:
            slots = self._jobs[job_id]
            islands = set(slots.islands)
            if islands & self.serving:
                continue  # an island of it serves: no turn, and nothing reserved
            if slots.waiter is None or slots.waiter.done():
                # First in pass order but not asking right now: keep its slot a moment.
                reserved |= islands
                held = True
                continue
            if islands & reserved or any(self._inflight[i] >= self.slots for i in islands):
                reserved |= islands
                continue
            for island in islands:
                self._inflight[island] += 1
            slots.inflight += 1
            cost = self._cost(slots) * slots.asking
            slots.charged.append(cost)
            slots.pass_ += cost / slots.weight
            slots.hold_until = now + HOLD_S
            assert slots.waiter is not None
            slots.waiter.set_result(True)
            slots.waiter = None
        if held:
            try:
                asyncio.get_running_loop().call_later(HOLD_S, self._grant)
            except RuntimeError:
                pass

    def passes(self) -> dict[str, float]:
        """Each stride-scheduled job's pass (for diagnostics)."""
        return {job_id: s.pass_ for job_id, s in self._jobs.items()}
