"""A RunSlice stream's steps on an island host: back to back on the runtime thread while
nothing needs the event loop, one at a time through RunStep's path when something does.

Back to back: the slice's island_seq numbers are taken at once (its first one's turn come,
none of its steps run or in flight), the device lock is held for the whole slice, and the
runtime thread runs step after step without returning to the event loop in between; each
outcome is recorded and streamed as it comes (one loop wake-up carries every outcome ready
since the last). The thread stops at a step boundary when the stream goes, a step fails, a
newer controller epoch is adopted, the job is unloaded or suspended, or a serving cut
concerns the next step (SliceCut.start_now); in the last four cases the steps left go one at
a time on the event loop, still under the device lock, where the cut's hold and the refusals
are handled: the island's steps run in island_seq order whatever happens (another slice,
whose numbers come after this one's, waits for the lock). Per-step semantics are RunStep's
(workers/ordering.py): idempotent on (generation, step), recorded outcomes, checkpoints at
their steps. RPCs that need the device (Suspend, SaveCheckpoint, Evaluate...) wait for the
slice in progress, as they waited for the steps queued before them.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

from pathways_lite.v1 import worker_pb2

from .ordering import REPLY_HOLD_S, SLICE_END, Outcome, StepNotRun
from .rpc import RpcRejection

if TYPE_CHECKING:
    from .service import WorkerServicer

# Why the runtime thread stopped running a slice's steps back to back.
_DONE, _HALTED, _FAILED, _ONE_AT_A_TIME = "done", "halted", "failed", "one at a time"


class _Outbox:
    """The runtime thread's step outcomes into the event loop, at most about one loop
    wake-up per `hold_s` while steps keep coming: after a delivery the loop looks again
    `hold_s` later (the stream writes no more often than that anyway, REPLY_HOLD_S), and
    the thread wakes the loop itself only when no such look is due."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        deliver: Callable[[int, Any], None],
        hold_s: float = REPLY_HOLD_S,
    ) -> None:
        self.loop = loop
        self.deliver = deliver
        self.hold_s = hold_s
        self._lock = threading.Lock()
        self._items: list[tuple[int, Any]] = []
        self._due = False  # a drain is scheduled (woken or timed)
        self._closed = False

    def put(self, index: int, outcome: Any) -> None:
        with self._lock:
            self._items.append((index, outcome))
            if self._due:
                return
            self._due = True
        self.loop.call_soon_threadsafe(self._drain_due)

    def _drain_due(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            # Steps still coming: look again after hold_s rather than being woken per step.
            self._due = bool(items) and not self._closed
        if self._due:
            self.loop.call_later(self.hold_s, self._drain_due)
        for index, outcome in items:
            self.deliver(index, outcome)

    def drain(self) -> None:
        """Deliver what was put, and stop looking (on the event loop, the thread done)."""
        with self._lock:
            items, self._items = self._items, []
            self._closed = True
        for index, outcome in items:
            self.deliver(index, outcome)


class SliceRun:
    """One RunSlice stream's steps (see the module docstring); `replies` gets each step's
    outcome in order (a reply, an exception ending the slice, or SLICE_END)."""

    def __init__(
        self,
        host: WorkerServicer,
        steps: list[worker_pb2.RunStepRequest],
        epoch: int,
        received_ns: int,
        wait_until: float,
    ) -> None:
        self.host = host
        self.steps = steps
        self.epoch = epoch
        self.received_ns = received_ns
        # A slice queued behind other slices waits for its island_seq numbers as long as its
        # stream lives, not the short gap wait of a lone RunStep.
        self.wait_until = wait_until
        self.replies: asyncio.Queue = asyncio.Queue()
        self._halt = threading.Event()
        # Whether the stream's end stops the slice run back to back (`_stops`).
        self._collective = False

    def stop(self) -> None:
        """The stream is gone: the step in progress completes and is recorded; the steps
        not started do not run (a collective job's slice run back to back runs to its end,
        `_stops`)."""
        self._halt.set()

    def _stops(self) -> bool:
        """Whether the slice stops here because its stream went. A step of a collective job
        (the hosts of a multi-host island in one XLA program, islands exchanging gradients,
        pipeline stages) is run by every host of the job, and their streams end at different
        moments (a controller's death): each stopping at its own step boundary would leave
        one host in a collective its peers never join (a CI run saw a two-host island's
        host die so). Their slices, the same steps on every host, run to their end, so the
        hosts stop at one step; a failed or aborted step still ends the slice at once."""
        return self._halt.is_set() and not self._collective

    def _gap_wait_s(self) -> float:
        return max(self.host.order.gap_wait_s, self.wait_until - time.monotonic())

    async def produce(self) -> None:
        if _consecutive(self.steps) and await self._back_to_back():
            return
        await self._one_at_a_time()

    # ---- one at a time (RunStep's path) --------------------------------------------------

    async def _one_at_a_time(self) -> None:
        """The steps one at a time through RunStep's path (a slice that could not start back
        to back: a retried one, numbers not consecutive; that path gives the refusals)."""
        order = self.host.order
        for index, step in enumerate(self.steps):
            if self._halt.is_set():
                order.skip_when_due([s.island_seq for s in self.steps[index:]], self.epoch)
                return
            try:
                reply = await self.host._run_step(step, self.received_ns, self._gap_wait_s())
            except StepNotRun:
                # Cut for serving (CutSlice): the slice ends before this step, whose number
                # was used; the numbers of the steps after it are skipped.
                order.skip_when_due([s.island_seq for s in self.steps[index + 1 :]], self.epoch)
                self.replies.put_nowait(SLICE_END)
                return
            except BaseException as e:  # noqa: BLE001 - handed to the stream
                self.replies.put_nowait(e)
                order.skip_when_due([s.island_seq for s in self.steps[index:]], self.epoch)
                return
            if reply.replayed:
                # The step ran before (its recorded reply) and did not take its number here:
                # skipped when due, or the slice's later steps and the island's wait for it.
                order.skip_when_due([step.island_seq], self.epoch)
            self.replies.put_nowait(reply)

    # ---- back to back --------------------------------------------------------------------

    async def _back_to_back(self) -> bool:
        """Run the slice with its numbers taken at once and the device lock held: back to
        back on the runtime thread as far as it goes, the rest one at a time (module
        docstring). Returns False when it could not start (nothing was taken)."""
        host, order, steps = self.host, self.host.order, self.steps
        first = steps[0]
        job = host._jobs.get(first.job_id)
        if job is None or job.spec.generation != first.generation:
            return False
        if first.island_seq > order.next_seq:
            await order.wait_turn(first.island_seq, self.epoch, self._gap_wait_s())
        keys = [(s.generation, s.step) for s in steps]
        if (
            self._halt.is_set()
            or order.newest_epoch != self.epoch
            or first.island_seq != order.next_seq
            or host._jobs.get(first.job_id) is not job
            or job.runtime.suspended
            or any(job.records.known(key) for key in keys)
        ):
            return False
        futures = order.claim(job.records, keys, first.island_seq)
        cut = host.slice_cut(first.job_id)
        spec = job.spec
        self._collective = (
            host.metadata.num_hosts > 1
            or getattr(spec, "num_islands", 1) > 1
            or getattr(spec, "pipeline", None) is not None
        )

        def deliver(index: int, outcome: Outcome | BaseException) -> None:
            recorded = outcome
            if not isinstance(outcome, (worker_pb2.RunStepReply, RpcRejection)):
                recorded = RpcRejection(
                    grpc.StatusCode.ABORTED, f"step {keys[index][1]} did not complete: {outcome!r}."
                )
            job.records.settle(keys[index], recorded, futures[index])
            self.replies.put_nowait(outcome)

        outbox = _Outbox(asyncio.get_running_loop(), deliver)
        try:
            async with host._lock:
                index, why = 0, _ONE_AT_A_TIME
                if host._refusal(job, first) is None:
                    index, why = await host._on_runtime_thread(self._run, job, cut, outbox)
                outbox.drain()
                if why == _ONE_AT_A_TIME:
                    index = await self._rest_under_lock(job, index, keys, futures)
        except BaseException as e:  # noqa: BLE001 - handed to the stream
            self._collective = False  # the thread stops at its next step boundary
            self._halt.set()
            outbox.drain()
            self.replies.put_nowait(e)
            index = 0
        for key, future in zip(keys[index:], futures[index:], strict=True):
            job.records.release(key, future)
        return True

    def _run(self, job: Any, cut: Any, outbox: _Outbox) -> tuple[int, str]:
        """On the runtime thread: the steps, back to back, until one needs the event loop.
        Returns (the first step not run, why it stopped)."""
        host = self.host
        for index, step in enumerate(self.steps):
            if self._stops():
                return index, _HALTED
            if host._refusal(job, step) is not None or not cut.start_now(
                step.generation, step.step, step.island_seq, step.epoch
            ):
                return index, _ONE_AT_A_TIME
            try:
                outcome = host.step_on_thread(job, step, self.received_ns)
            except BaseException as e:  # noqa: BLE001 - recorded and handed to the stream
                outbox.put(index, e)
                return index + 1, _FAILED
            outbox.put(index, outcome)
            if isinstance(outcome, RpcRejection):
                return index + 1, _FAILED
        return len(self.steps), _DONE

    async def _rest_under_lock(
        self, job: Any, start: int, keys: list[tuple[int, int]], futures: list[asyncio.Future]
    ) -> int:
        """Steps `start`.. one at a time under the device lock (a cut's hold, a refusal);
        returns the first step not run."""
        host = self.host
        for index in range(start, len(self.steps)):
            step = self.steps[index]
            if self._stops():
                return index
            try:
                reply = await job.records.run(
                    keys[index],
                    lambda step=step: host._execute_step(job, step, self.received_ns, locked=True),
                    futures[index],
                )
            except StepNotRun:
                # Cut for serving (CutSlice): the slice ends before this step.
                self.replies.put_nowait(SLICE_END)
                return index + 1
            except BaseException as e:  # noqa: BLE001 - handed to the stream
                self.replies.put_nowait(e)
                return index + 1
            self.replies.put_nowait(reply)
        return len(self.steps)


def _consecutive(steps: list[worker_pb2.RunStepRequest]) -> bool:
    first = steps[0].island_seq
    return all(step.island_seq == first + i for i, step in enumerate(steps))
