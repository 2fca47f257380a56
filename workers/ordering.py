"""The ordering rules of an island host's steps: controller epochs, island_seq, replays.

- `epoch` is the controller run's epoch. An epoch older than the newest one seen is refused
  (FAILED_PRECONDITION), so requests of a dead controller cannot land; a newer one is
  adopted and starts a fresh island sequence at 0 (and `on_new_epoch` releases the old
  controller's steps waiting in an exchange).
- `island_seq` numbers the host's steps contiguously. A RunStep ahead of the next expected
  number may have overtaken an earlier one on the wire (a dispatch window in flight): it
  waits up to `gap_wait_s` for the missing numbers, then is refused naming both numbers. A
  used number is refused; SkipSeq fills the next number without running anything.
- RunStep is idempotent on (job, generation, step): its outcome (reply or rejection) is
  recorded in the job's `StepRecords`, and a retry gets the recorded reply marked
  `replayed` (or the same rejection), also while the first call is still running. A load
  retried with the same request (only the epoch may differ) is the same load.

`StepOrder` holds the host's epoch and sequence; it runs on the service's event loop and
knows nothing of JAX or of the jobs' runtimes.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from pathways_lite.v1 import worker_pb2

from .rpc import RpcRejection

logger = logging.getLogger(__name__)

# Recorded step results kept per job for idempotent retries (older ones are forgotten).
MAX_RECORDED_STEPS = 1024
# How long a RunStep whose island_seq is ahead of the next expected one waits for the missing
# numbers to arrive (concurrent RunSteps of a dispatch window may overtake each other on the
# wire) before it is rejected as a gap.
SEQ_GAP_WAIT_S = 2.0

Outcome = worker_pb2.RunStepReply | RpcRejection


class StepNotRun(Exception):
    """A step cut before it started (CutSlice): its island_seq number is used, nothing is
    recorded (the controller sends the step again later), and its slice ends there."""


# Put in a slice's reply queue: the slice ends here, without an error (a cut).
SLICE_END = object()
# The outcome of a step whose slice ended before it (`StepRecords.release`): not run.
NOT_RUN = object()
# How long the island_seq numbers of a slice's steps that were not run wait for their turn
# to be skipped (the steps before them may still be queued behind other jobs' steps).
SKIP_WAIT_S = 600.0


# A RunSlice stream writes at most about one message per REPLY_HOLD_S: a step's reply ready
# sooner after the previous message waits that long for the replies of the steps after it,
# so fast steps cost the host and the controller one message per 25 ms, not per step. Each
# message is event-loop work on both sides that takes the GIL and a core from the step
# (trivial PaLM steps through the controller, bench/dispatch.py's job, interleaved with
# in-process JAX: 875 steps/s at 2 ms, 0.65-0.69 of in-process at 10 ms, 0.72-0.73 at 25 and
# at 50 ms; a step longer than this is written at once). The dispatcher sends the next slice
# DEFAULT_LEAD_S (40 ms) ahead, more than this lag.
REPLY_HOLD_S = 0.025


async def coalesced_replies(
    replies: asyncio.Queue, count: int, hold_s: float = REPLY_HOLD_S
) -> AsyncIterator[worker_pb2.RunSliceReply]:
    """A slice's `count` step outcomes, read from `replies` in step order, as RunSliceReply
    messages. Each message carries the replies ready when it is written; a reply that comes
    less than `hold_s` after the previous message waits out the rest of `hold_s` for more.
    An outcome that is an exception ends the slice: it is raised after the replies of the
    steps before it were yielded; SLICE_END ends it there without an error (a cut)."""
    loop = asyncio.get_running_loop()
    left = count
    last_write = -hold_s

    def ends(item: object) -> bool:
        return item is SLICE_END or isinstance(item, BaseException)

    while left > 0:
        batch = [await replies.get()]
        wait = last_write + hold_s - loop.time()
        if wait > 0 and left > 1 and not ends(batch[0]):
            await asyncio.sleep(wait)
        while len(batch) < left and not ends(batch[-1]) and replies.qsize():
            batch.append(replies.get_nowait())
        end = batch.pop() if ends(batch[-1]) else None
        if batch:
            yield worker_pb2.RunSliceReply(steps=batch)
            last_write = loop.time()
            left -= len(batch)
        if isinstance(end, BaseException):
            raise end
        if end is SLICE_END:
            return


def slice_steps(request: worker_pb2.RunSliceRequest) -> list[worker_pb2.RunStepRequest]:
    """The steps of a RunSlice, in order: its explicit `steps`, or the compact range.

    Raises:
        RpcRejection: INVALID_ARGUMENT naming the field whose value does not fit the slice.
    """
    if request.steps:
        for step in request.steps:
            for field in ("job_id", "generation", "epoch"):
                if getattr(step, field) != getattr(request, field):
                    raise RpcRejection(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"steps[].{field}={getattr(step, field)!r} does not match the slice's "
                        f"{field}={getattr(request, field)!r}.",
                    )
        return list(request.steps)
    if request.count < 1:
        raise RpcRejection(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"count={request.count} must be at least 1 (or give the steps).",
        )
    checkpoints = set(request.checkpoint_steps)
    return [
        worker_pb2.RunStepRequest(
            job_id=request.job_id,
            generation=request.generation,
            step=request.first_step + i,
            island_seq=request.first_island_seq + i,
            epoch=request.epoch,
            checkpoint=request.first_step + i in checkpoints,
        )
        for i in range(request.count)
    ]


class StepRecords:
    """One loaded job's recorded step outcomes, by (generation, step), oldest first."""

    def __init__(self, limit: int = MAX_RECORDED_STEPS) -> None:
        self.limit = limit
        self.results: collections.OrderedDict[tuple[int, int], Outcome] = collections.OrderedDict()
        # (generation, step) -> future of a step that is queued or running.
        self.inflight: dict[tuple[int, int], asyncio.Future] = {}

    async def replay(self, key: tuple[int, int]) -> worker_pb2.RunStepReply | None:
        """The recorded reply of `key` marked replayed (waiting for one in flight), or None
        when the step was never run.

        Raises:
            RpcRejection: the recorded outcome was a rejection.
        """
        if key in self.results:
            return _replayed(self.results[key])
        if key in self.inflight:
            outcome = await asyncio.shield(self.inflight[key])
            if outcome is NOT_RUN:
                return None  # its slice ended before it: this call runs it
            return _replayed(outcome)
        return None

    def known(self, key: tuple[int, int]) -> bool:
        """Whether `key` ran or is queued or running."""
        return key in self.results or key in self.inflight

    def claim(self, key: tuple[int, int]) -> asyncio.Future:
        """Mark `key` in flight; returns the future its retries wait on."""
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self.inflight[key] = future
        return future

    def record(self, key: tuple[int, int], outcome: Outcome) -> None:
        self.results[key] = outcome
        while len(self.results) > self.limit:
            self.results.popitem(last=False)

    def settle(self, key: tuple[int, int], outcome: Outcome, future: asyncio.Future) -> None:
        """`key` ended with `outcome`: recorded, and its retries get it."""
        self.inflight.pop(key, None)
        self.record(key, outcome)
        if not future.done():
            future.set_result(outcome)

    def release(self, key: tuple[int, int], future: asyncio.Future) -> None:
        """`key` will not run in the slice that took its number: nothing is recorded, and a
        call waiting for it (`replay`) runs it itself."""
        if self.inflight.get(key) is future:
            del self.inflight[key]
        if not future.done():
            future.set_result(NOT_RUN)

    async def run(
        self,
        key: tuple[int, int],
        execute: Callable[[], Awaitable[Outcome]],
        future: asyncio.Future,
    ) -> worker_pb2.RunStepReply:
        """Run a step whose number was taken (`future`: its in-flight future, `claim`):
        `execute` it and record its outcome (ABORTED when cancelled; nothing when it was cut,
        StepNotRun).

        Raises:
            RpcRejection: the step's rejection.
        """
        outcome: Outcome | None = None
        try:
            outcome = await execute()
        except StepNotRun:
            # Cut before it started: nothing to replay, the step comes again in a later slice
            # (one waiting for it already, `replay`, runs it itself).
            future.set_result(NOT_RUN)
            raise
        except BaseException as e:  # cancelled while queued: later retries see the error
            outcome = RpcRejection(
                grpc.StatusCode.ABORTED, f"step {key[1]} did not complete: {e!r}."
            )
            raise
        finally:
            self.inflight.pop(key, None)
            if outcome is not None:
                self.record(key, outcome)
                future.set_result(outcome)
        if isinstance(outcome, RpcRejection):
            raise outcome
        return outcome


def _replayed(outcome: Outcome) -> worker_pb2.RunStepReply:
    if isinstance(outcome, RpcRejection):
        raise outcome
    reply = worker_pb2.RunStepReply()
    reply.CopyFrom(outcome)
    reply.replayed = True
    return reply


def same_load(a: worker_pb2.LoadJobRequest, b: worker_pb2.LoadJobRequest) -> bool:
    """Whether two LoadJob requests are one load (a retry): equal except for the epoch."""
    if a == b:
        return True
    a2, b2 = type(a)(), type(b)()
    a2.CopyFrom(a)
    b2.CopyFrom(b)
    a2.epoch = b2.epoch = 0
    return a2 == b2


class StepOrder:
    """The host's controller epoch and island sequence (see the module docstring).

    Args:
        on_new_epoch: Called with a newly adopted epoch (after the sequence restarted).
        gap_wait_s: How long a RunStep ahead of the sequence waits for the missing numbers.
    """

    def __init__(
        self,
        on_new_epoch: Callable[[int], None] = lambda epoch: None,
        gap_wait_s: float = SEQ_GAP_WAIT_S,
    ) -> None:
        self._on_new_epoch = on_new_epoch
        self.gap_wait_s = gap_wait_s
        self.newest_epoch = 0
        self.next_seq = 0
        # Set (and replaced) whenever next_seq or the epoch changes; RunSteps ahead wait on it.
        self._seq_event: asyncio.Event | None = None
        self._skips: set[asyncio.Task] = set()

    def check_epoch(self, epoch: int) -> None:
        """Refuse a stale epoch; a newer one is adopted and starts a fresh island sequence.

        Raises:
            RpcRejection: FAILED_PRECONDITION naming both epochs.
        """
        if epoch < self.newest_epoch:
            raise RpcRejection(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"epoch={epoch} is older than the newest controller epoch "
                f"{self.newest_epoch} this host has seen.",
            )
        if epoch > self.newest_epoch:
            logger.info(
                "controller epoch %d replaces %d; island sequence restarts at 0",
                epoch,
                self.newest_epoch,
            )
            self.newest_epoch = epoch
            self.next_seq = 0
            self._advanced()
            # Steps of the old controller may wait in an exchange on a peer that will never
            # send (it died between its RunSteps): release them, they are stale now.
            self._on_new_epoch(epoch)

    def is_stale(self, epoch: int) -> bool:
        """Whether a newer epoch was adopted since a request of `epoch` was accepted."""
        return epoch < self.newest_epoch

    def _advanced(self) -> None:
        """Wake RunSteps waiting for an earlier island_seq to arrive."""
        if self._seq_event is not None:
            self._seq_event.set()
            self._seq_event = None

    async def wait_turn(self, island_seq: int, epoch: int, timeout_s: float) -> None:
        """Wait until every number before `island_seq` was received (or the epoch changed)."""
        deadline = time.monotonic() + timeout_s
        while island_seq > self.next_seq and epoch == self.newest_epoch:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if self._seq_event is None:
                self._seq_event = asyncio.Event()
            try:
                await asyncio.wait_for(self._seq_event.wait(), left)
            except TimeoutError:
                return

    def skip_when_due(self, island_seqs: list[int], epoch: int) -> None:
        """Skip `island_seqs` (ascending) as their turns come: the numbers of a slice's steps
        that were not run (a failed step, a cancelled stream). Numbers already used are left
        alone; a newer epoch drops the rest."""

        async def skip_all() -> None:
            for seq in island_seqs:
                if seq > self.next_seq:
                    await self.wait_turn(seq, epoch, SKIP_WAIT_S)
                if epoch != self.newest_epoch or seq > self.next_seq:
                    return
                if seq == self.next_seq:
                    self.skip(seq)

        task = asyncio.get_running_loop().create_task(skip_all())
        self._skips.add(task)
        task.add_done_callback(self._skips.discard)

    def skip(self, island_seq: int) -> tuple[int, bool]:
        """Fill `island_seq` without running anything (an already filled one is a no-op).

        Returns:
            (the next expected number, whether `island_seq` was already filled).

        Raises:
            RpcRejection: FAILED_PRECONDITION when `island_seq` skips ahead.
        """
        if island_seq > self.next_seq:
            raise RpcRejection(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"island_seq={island_seq} skips ahead of the expected island_seq="
                f"{self.next_seq} (epoch {self.newest_epoch}); fill numbers one at a time.",
            )
        if island_seq < self.next_seq:
            return self.next_seq, True
        self.next_seq += 1
        self._advanced()
        return self.next_seq, False

    async def run_step(
        self,
        records: StepRecords,
        key: tuple[int, int],
        island_seq: int,
        epoch: int,
        execute: Callable[[], Awaitable[Outcome]],
        gap_wait_s: float | None = None,
    ) -> worker_pb2.RunStepReply:
        """Run a step in island-sequence order, exactly once per (generation, step).

        The caller checked the epoch. A retry of `key` returns the recorded reply; otherwise
        the step takes `island_seq` (after waiting up to `gap_wait_s`, default the order's, for
        the missing numbers before it) and `execute` runs it; its outcome, or ABORTED when
        cancelled, is recorded.

        Raises:
            RpcRejection: a refused number, or the step's recorded rejection.
        """
        replay = await records.replay(key)
        if replay is not None:
            return replay
        if island_seq > self.next_seq:
            # A window of steps in flight: this one may have overtaken an earlier one on the
            # wire. Wait briefly for the missing numbers, then queue behind them in seq order.
            wait_s = self.gap_wait_s if gap_wait_s is None else gap_wait_s
            await self.wait_turn(island_seq, epoch, wait_s)
            self.check_epoch(epoch)
            replay = await records.replay(key)
            if replay is not None:
                return replay
        if island_seq != self.next_seq:
            if island_seq > self.next_seq:
                why = "skips ahead of"
            else:
                why = "was already used; this host now expects"
            raise RpcRejection(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"island_seq={island_seq} {why} the expected island_seq="
                f"{self.next_seq} (epoch {self.newest_epoch}); send the missing step or "
                "fill it with SkipSeq.",
            )
        self.next_seq += 1
        self._advanced()
        return await records.run(key, execute, records.claim(key))

    def claim(self, records: StepRecords, keys: list[tuple[int, int]], island_seq: int) -> list:
        """Take the numbers `island_seq`.. for `keys` (steps not run nor in flight, the
        first one's turn now), as many RunSteps would one after the other; returns each
        key's in-flight future (for `StepRecords.run`, `settle` or `release`)."""
        if island_seq != self.next_seq:
            raise ValueError(f"island_seq={island_seq} is not the next one ({self.next_seq})")
        self.next_seq += len(keys)
        self._advanced()
        return [records.claim(key) for key in keys]
