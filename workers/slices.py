"""A RunSlice stream's steps on an island host: back to back on the runtime thread while
nothing needs the event loop, one at a time through RunStep's path when something does.

Back to back: the slice's island_seq numbers are taken at once (its first one's turn come,
none of its steps run or in flight), the device lock is held for the slice, and the runtime
thread runs step after step without returning to the event loop in between; each outcome is
recorded and streamed as it comes (one loop wake-up carries every outcome ready since the
last). The thread stops at a step boundary when the stream goes, a step fails, a newer
controller epoch is adopted, the job is unloaded, or a serving cut concerns the next step
(SliceCut.start_now); in the last three cases the steps left go one at a time, where the
cut's hold and the refusals are handled. Per-step semantics are RunStep's (workers/ordering.py):
idempotent on (generation, step), recorded outcomes, checkpoints at their steps.
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
        self.back_to_back = 0  # steps run back to back (for the tests)

    def stop(self) -> None:
        """The stream is gone: the step in progress completes and is recorded; the steps
        not started do not run."""
        self._halt.set()

    def _gap_wait_s(self) -> float:
        return max(self.host.order.gap_wait_s, self.wait_until - time.monotonic())

    async def produce(self) -> None:
        start, claimed = 0, None
        if _consecutive(self.steps):
            start, claimed = await self._back_to_back()
            if start is None:
                return
        await self._one_at_a_time(start, claimed)

    # ---- one at a time (RunStep's path) --------------------------------------------------

    async def _one_at_a_time(self, start: int, claimed: list[asyncio.Future] | None) -> None:
        """Steps `start`.. one at a time; `claimed`: their in-flight futures when their
        numbers were taken (back to back stopped), else None."""
        for index in range(start, len(self.steps)):
            step = self.steps[index]
            if self._halt.is_set():
                self._give_up(index, start, claimed)
                return
            try:
                if claimed is None:
                    reply = await self.host._run_step(step, self.received_ns, self._gap_wait_s())
                else:
                    reply = await self._run_claimed(step, claimed[index - start])
            except StepNotRun:
                # Cut for serving (CutSlice): the slice ends before this step, whose number
                # was used; the numbers of the steps after it are skipped.
                self._give_up(index + 1, start, claimed)
                self.replies.put_nowait(SLICE_END)
                return
            except BaseException as e:  # noqa: BLE001 - handed to the stream
                self.replies.put_nowait(e)
                self._give_up(index, start, claimed)
                return
            self.replies.put_nowait(reply)

    async def _run_claimed(
        self, step: worker_pb2.RunStepRequest, future: asyncio.Future
    ) -> worker_pb2.RunStepReply:
        host, job = self.host, self._job
        if job.runtime.suspended:
            raise RpcRejection(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"job {step.job_id!r} is suspended; Resume it before step {step.step}.",
            )
        return await job.records.run(
            (step.generation, step.step),
            lambda: host._execute_step(job, step, self.received_ns),
            future,
        )

    def _give_up(self, index: int, start: int, claimed: list[asyncio.Future] | None) -> None:
        """Steps `index`.. will not run: their numbers are skipped when their turns come (or
        were taken already: their waiting retries get ABORTED)."""
        rest = self.steps[index:]
        if claimed is None:
            self.host.order.skip_when_due([s.island_seq for s in rest], self.epoch)
            return
        for i, step in enumerate(rest, start=index):
            self._records.release(
                (step.generation, step.step),
                claimed[i - start],
                f"step {step.step} did not run: its slice ended before it.",
            )

    # ---- back to back --------------------------------------------------------------------

    async def _back_to_back(self) -> tuple[int | None, list[asyncio.Future] | None]:
        """Run the steps back to back on the runtime thread, as far as they go.

        Returns:
            (None, None) when the slice ended (every step ran, one failed, or the stream
            went); (0, None) when it could not start (the steps go one at a time, RunStep's
            path, which gives the refusals); (index, their in-flight futures) when the steps
            from `index` go one at a time with their numbers taken.
        """
        host, order, steps = self.host, self.host.order, self.steps
        first = steps[0]
        job = host._jobs.get(first.job_id)
        if job is None or job.spec.generation != first.generation:
            return 0, None
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
            return 0, None
        futures = order.claim(job.records, keys, first.island_seq)
        self._job, self._records = job, job.records
        cut = host.slice_cut(first.job_id)

        def deliver(index: int, outcome: Outcome | BaseException) -> None:
            recorded = outcome
            if not isinstance(outcome, (worker_pb2.RunStepReply, RpcRejection)):
                recorded = RpcRejection(
                    grpc.StatusCode.ABORTED, f"step {keys[index][1]} did not complete: {outcome!r}."
                )
            job.records.settle(keys[index], recorded, futures[index])
            self.replies.put_nowait(outcome)

        outbox = _Outbox(asyncio.get_running_loop(), deliver)
        index, why = 0, _ONE_AT_A_TIME
        try:
            async with host._lock:
                if host._refusal(job, first) is None:
                    index, why = await host._on_runtime_thread(self._run, job, cut, outbox)
        except BaseException as e:  # noqa: BLE001 - handed to the stream
            outbox.drain()
            self.replies.put_nowait(e)
            for key, future in zip(keys, futures, strict=True):
                job.records.release(key, future, f"step {key[1]} did not run: {e!r}.")
            return None, None
        outbox.drain()
        self.back_to_back = index
        if why == _ONE_AT_A_TIME:
            return index, futures[index:]
        for key, future in zip(keys[index:], futures[index:], strict=True):
            job.records.release(key, future, f"step {key[1]} did not run: its slice ended.")
        return None, None

    def _run(self, job: Any, cut: Any, outbox: _Outbox) -> tuple[int, str]:
        """On the runtime thread: the steps, back to back, until one needs the event loop.
        Returns (the first step not run, why it stopped)."""
        host = self.host
        for index, step in enumerate(self.steps):
            if self._halt.is_set():
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


def _consecutive(steps: list[worker_pb2.RunStepRequest]) -> bool:
    first = steps[0].island_seq
    return all(step.island_seq == first + i for i, step in enumerate(steps))
