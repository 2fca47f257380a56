"""Asynchronous dispatch of a job's step program to the hosts of its islands (grpc.aio).

The controller grants a job a *slice* of K consecutive steps and sends it to every host of the
job's islands as one `RunSlice(job, generation, epoch, first_step, count, first_island_seq)`
stream per host; the host runs the steps back to back on its runtime thread
(workers/slices.py) and streams their replies (coalesced: the replies ready when a message is
written, about one message per 25 ms at most, REPLY_HOLD_S), which the controller consumes
step by step in step order. K is chosen from the job's measured step time so
that a slice lasts about `slice_s` (default 50 ms; K = 1 for longer steps), and ends at the
program's end and at the next checkpoint. The next slice is granted and sent while the current
one still has about `lead_s` to go (a window of at most `window` slices in flight), so an
island never idles waiting for the controller, and a stop (cancel, suspend, preemption) takes
effect within one slice plus the lead. Per-step semantics are those of RunStep: idempotent on
(job, generation, step), one island_seq per step, checkpoints after exact steps, digests.

The controller sends step numbers, never data: each island reads its own slice of the step's
global batch, and the islands exchange gradients among themselves every step
(workers/exchange.py): at load the controller tells host i of every island the addresses of
host i of the others (`peers`).

Jobs sharing islands take turns slice by slice through a `StepGate` (controller/scheduler.py's
Scheduler): every slice waits for a slot on all of the job's islands and frees it when its
hosts finish.

Serving cuts slices short (`cut`, issue 18): when a request arrives for a serve job on an
island a training job shares, the job's slices in flight end at one step boundary on every
host of all its islands. Phase one (CutSlice HOLD) stops every host before the first step it
has not started and answers that step; the cut step S is the largest answer (a step one host
started must run on all of them: they exchange its gradients); phase two (CUT before S) lets
the steps before S run and ends the slices there. The run goes on from S when the scheduler
grants it a slice again (not while the island serves).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import inspect
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import grpc

from pathways_lite.v1 import worker_pb2

from .islands import RPC_BYTES, Island, call_all, wait_unless_dead
from .program import HostLoad, StepProgram

logger = logging.getLogger(__name__)

# Slices in flight per job (1 = the next slice is sent once the current one has ended).
DEFAULT_WINDOW = 2
# How long a slice lasts (the controller's `--slice-ms`): K = slice_s / measured step time.
DEFAULT_SLICE_S = 0.05
# The next slice is sent when the current one has about this much left to run: more than
# the hosts' reply lag (workers/ordering.py REPLY_HOLD_S, 25 ms), or the island idles
# between slices (0.72 of in-process JAX with 40 ms, 0.69 with 25 ms).
DEFAULT_LEAD_S = 0.04
# The most steps in one slice (trivial steps).
MAX_SLICE_STEPS = 4096
# Deadlines of worker RPCs: a step may wait behind a compile of another job on the island.
STEP_TIMEOUT_S = 600.0
LOAD_TIMEOUT_S = 900.0
ABORT_TIMEOUT_S = 10.0
# After one host of a step failed, how long the others get to answer before the step is
# given up (they may be waiting on the failed one); not waited once Ray reports a host dead.
FAIL_FAST_GRACE_S = 2.0
# The longest a run consumes step replies already received without yielding to the event
# loop (a message may carry a whole slice of fast steps).
TURN_S = 0.0005
# While this thread dispatches steps back to back, the service's thread (every RPC and
# stream reply) waits for the GIL at each of its wakes until the interpreter forces a switch
# (5 ms): handing it over every YIELD_GIL_S lets that thread in at once (bench/scale_load.py,
# 100 submissions at once beside 50 jobs at 0 ms steps: submit p50 141 -> 61-68 ms, p99
# 383 -> 155-203 ms; the dispatch rate the same).
YIELD_GIL_S = 0.0002
# Deadline of one CutSlice phase.
CUT_TIMEOUT_S = 5.0
# How long a host holds a job's steps for the second phase of a cut at most (a controller
# that died between the phases must not stop the job's hosts for good): longer than both
# phases' deadlines, or a host held at once could run on past a cut its peers keep to.
CUT_HOLD_S = 3 * CUT_TIMEOUT_S
# A cut waits for its run to read the steps before it; no step read for this long (or three
# of the job's steps, when longer) ends the wait: a wedged step must not hang the serving
# request that asked for the cut (it holds its island meanwhile).
CUT_STALL_S = 30.0
# A run abandoned by a cut (an island of several hosts) whose hosts stop answering for this
# long (or three of its steps, when longer) has its streams cancelled: a wedged step must not
# keep a cancelled job on its islands until the stream's deadline.
ABANDON_GRACE_S = 30.0
# A SkipSeq of a cancelled slice's numbers: tries per host, the pause before the first retry
# (doubled for each next one) and each try's deadline (the host answers at once: the numbers
# are skipped later, when due). A hole left in an island's sequence holds up every later
# step there, so a failed SkipSeq is tried again rather than logged and dropped.
SKIP_ATTEMPTS = 4
SKIP_RETRY_S = 0.1
SKIP_TIMEOUT_S = 5.0
# What a SkipSeq is tried again after: a lost or late call (FAILED_PRECONDITION, a newer
# controller epoch, or NOT_FOUND do not change with a retry).
SKIP_RETRY_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)
_NOT_ANSWERED = object()


_gil_yielded_at = 0.0


def yield_gil(now: float) -> None:
    """Release the GIL and this core for a moment (os.sched_yield) once per YIELD_GIL_S:
    a thread waiting for the GIL takes it now; with none waiting it costs a system call."""
    global _gil_yielded_at
    if now - _gil_yielded_at >= YIELD_GIL_S:
        _gil_yielded_at = now
        os.sched_yield()


class DispatchError(RuntimeError):
    """A job's step program could not continue.

    Attributes:
        reason: short machine-readable cause (`load_failed`, `step_failed`, `nan_loss`...).
        code: the gRPC status of the failed call, if one failed.
    """

    def __init__(self, reason: str, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.code = code


@dataclasses.dataclass(slots=True)  # (not frozen: built per step, 3x faster)
class HostStep:
    """One host's reply to one step, with the host's own timestamps."""

    island: str
    host_index: int
    reply: worker_pb2.RunStepReply


@dataclasses.dataclass(slots=True)  # (not frozen: built per step, 3x faster)
class StepReport:
    """A completed step of a job over all its islands.

    Attributes:
        step: the step number.
        loss: the global batch's mean loss (the mean of the islands' equal-sized slices).
        tokens_per_s: tokens of the global batch over `step_time_s`.
        step_time_s: from the first host starting the step to the last one finishing it.
        hosts: every host's reply, island by island, host by host.
        checkpoints_committed: steps of the checkpoints host 0 of every writing island (the
            program's checkpoint_islands) has committed.
        loss_stats: a mixture step's global (sum, count) stats (island 0's host 0).
    """

    step: int
    loss: float
    tokens_per_s: float
    step_time_s: float
    hosts: tuple[HostStep, ...]
    checkpoints_committed: tuple[int, ...] = ()
    loss_stats: tuple[float, ...] = ()


OnStep = Callable[[StepReport], Awaitable[None] | None]


class StepGate(Protocol):
    """Who may step next on shared islands (controller/scheduler.py's Scheduler)."""

    async def acquire(self, job_id: str, steps: int = 1) -> bool:
        """Wait for a slot for a slice of `steps` steps on all of the job's islands; False:
        the job must stop."""
        ...

    def done(self, job_id: str, islands: list[str], step_s: float | None, steps: int = 1) -> None:
        """The granted slice of `steps` steps has finished on every host, in `step_s`
        host-measured seconds in all (None when it failed or was cut short)."""
        ...

    def refund(self, job_id: str, islands: list[str]) -> None:
        """The slice granted last was never sent: its slot back, its charge taken back."""
        ...


OVERLAP_MODES = ("auto", "on", "off")


def overlap_for(mode: str, islands: Sequence[Island]) -> bool:
    """Whether a data-parallel job on `islands` exchanges its gradients during the backward
    pass (workers/exchange_overlap.py) rather than after it.

    "auto" turns it on only where every island has accelerators: on CPU islands the
    exchange and the backward pass share the same cores (bench/dp_scaling.py measured no
    gain on two cores: 1.86x overlapped vs 1.89x after the backward pass at batch 64), and a
    program with host callbacks is compiled afresh by every host process (XLA keeps none in
    JAX's persistent cache), which a restarted or spare host pays again.
    """
    if mode != "auto":
        return mode == "on"
    platforms = {
        device.platform
        for island in islands
        for host in island.hosts
        for device in getattr(getattr(host, "info", None), "devices", ())
    }
    return bool(platforms) and "cpu" not in platforms


class Dispatcher:
    """Drives step programs on islands slice by slice, with a bounded window in flight.

    Args:
        epoch: this controller run's epoch, carried in every worker RPC.
        window: slices in flight per job (1 = synchronous dispatch).
        step_timeout_s: deadline of one RunSlice stream.
        slice_s: how long a slice lasts (K = slice_s / the job's measured step time).
        lead_s: how long before the current slice ends the next one is sent.
        max_slice_steps: the most steps in one slice.
        exchange_overlap: "on", "off" or "auto" (on only where every island of the job has
            accelerators; see `overlap_for`).
    """

    def __init__(
        self,
        epoch: int,
        *,
        window: int = DEFAULT_WINDOW,
        step_timeout_s: float = STEP_TIMEOUT_S,
        slice_s: float = DEFAULT_SLICE_S,
        lead_s: float = DEFAULT_LEAD_S,
        max_slice_steps: int = MAX_SLICE_STEPS,
        exchange_overlap: str = "auto",
    ) -> None:
        if window < 1:
            raise ValueError(f"window={window} must be at least 1.")
        if slice_s < 0:
            raise ValueError(f"slice_s={slice_s} must be >= 0.")
        if max_slice_steps < 1:
            raise ValueError(f"max_slice_steps={max_slice_steps} must be at least 1.")
        if exchange_overlap not in OVERLAP_MODES:
            raise ValueError(
                f"exchange_overlap={exchange_overlap!r} must be one of {', '.join(OVERLAP_MODES)}."
            )
        self.exchange_overlap = exchange_overlap
        self.epoch = epoch
        self.window = window
        self.step_timeout_s = step_timeout_s
        self.slice_s = slice_s
        self.lead_s = lead_s
        self.max_slice_steps = max_slice_steps
        # Each job's smoothed step seconds (host-measured), which sizes its slices.
        self._step_s: dict[str, float] = {}
        # The runs in progress (what `cut` acts on).
        self._runs: dict[str, _Run] = {}

    async def load(
        self, program: StepProgram, islands: Sequence[Island], *, dry_run: bool = False
    ) -> list[worker_pb2.LoadJobReply]:
        """LoadJob on every host of every island at once (a multi-host island compiles
        together); replies island by island, host by host.

        Raises:
            DispatchError: a host refused or failed the load (reason `load_failed`).
        """
        hosts_per_island = {len(island.hosts) for island in islands}
        if len(islands) > 1 and len(hosts_per_island) != 1:
            raise DispatchError(
                "load_failed",
                f"job {program.job_id!r} spans islands with different host counts "
                f"{sorted(hosts_per_island)}: host i of every island exchanges with host i.",
            )
        hosts = len(islands[0].hosts) if islands else 0
        peers = [[i.hosts[h].address for i in islands] for h in range(hosts)]

        def request(island_index: int, host_index: int, _host) -> worker_pb2.LoadJobRequest:
            return program.load(
                HostLoad(
                    job_id=program.job_id,
                    generation=program.generation,
                    epoch=self.epoch,
                    island_index=island_index,
                    num_islands=len(islands),
                    # Host i's counterparts: host i of every island, island order.
                    peers=tuple(peers[host_index]) if len(islands) > 1 else (),
                    checkpoint_dir=program.checkpoint_dir,
                    restore_from=program.restore_from,
                    dry_run=dry_run,
                    exchange_overlap=overlap_for(self.exchange_overlap, islands),
                )
            )

        results = await call_all(
            islands, "LoadJob", request, timeout=LOAD_TIMEOUT_S, return_exceptions=True
        )
        for result in results:
            if isinstance(result, grpc.aio.AioRpcError):
                raise DispatchError(
                    "load_failed",
                    f"loading job {program.job_id!r} failed: {result.details()}",
                    result.code(),
                )
            if isinstance(result, BaseException):
                raise result
        return list(results)

    async def abort(
        self, job_id: str, generation: int, islands: Sequence[Island], reason: str
    ) -> None:
        """Abort(job, generation) on every host: releases exchanges waiting on a peer that
        will not send (best effort; errors are logged)."""
        request = worker_pb2.AbortRequest(job_id=job_id, generation=generation, reason=reason)
        results = await call_all(
            islands, "Abort", request, timeout=ABORT_TIMEOUT_S, return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                logger.warning("aborting job %s: %r", job_id, result)

    async def unload(
        self, job_id: str, islands: Sequence[Island], generation: int | None = None
    ) -> None:
        """UnloadJob on every host (`generation`: only a load of it or an older one; None:
        any); errors are logged, not raised (best effort cleanup)."""
        self._step_s.pop(job_id, None)
        request = worker_pb2.UnloadJobRequest(job_id=job_id, epoch=self.epoch)
        if generation is not None:
            request.generation = generation
        results = await call_all(islands, "UnloadJob", request, timeout=60, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                logger.warning("unloading job %s: %r", job_id, result)

    async def fill_gaps(self, slices: Sequence[_Slice]) -> None:
        """SkipSeq the island_seq numbers of cancelled slices on every host, each number
        when its turn comes (`when_due`; a number already used is left alone), so the
        island's next steps are not held up by a stream that never arrived. Only these
        numbers: other jobs' slices granted since hold the numbers after them.

        Every host is asked at once, and a failed SkipSeq is tried again (`_skip_seqs`):
        one lost leaves a hole that every later step of its island waits on (then fails
        "skips ahead"), and the trouble that lost a slice's stream often loses it too.
        Never raises for a host's failure (logged)."""
        await asyncio.gather(
            *(
                self._skip_seqs(island, index, first_seq, count, generation)
                for sent in slices
                for island, first_seq, count, generation in sent.seqs
                for index in range(len(island.hosts))
            )
        )

    async def _skip_seqs(
        self, island: Island, index: int, first_seq: int, count: int, generation: int
    ) -> None:
        """SkipSeq(when_due) island_seq first_seq .. first_seq + count - 1 on one host of the
        island's `generation` (whose sequence they are), up to SKIP_ATTEMPTS times (a retry
        is safe: numbers already skipped or used are left alone); gives up at once on an
        island Ray reported dead or restarted since (its new hosts start a new sequence, and
        would skip those numbers of their own steps) and on an answer a retry cannot
        change."""
        request = worker_pb2.SkipSeqRequest(
            island_seq=first_seq,
            count=count,
            when_due=True,
            epoch=self.epoch,
            reason="slice cancelled",
        )
        pause = SKIP_RETRY_S
        for attempt in range(1, SKIP_ATTEMPTS + 1):
            if island.generation != generation:
                logger.info(
                    "island %s restarted: island_seq %d..%d of its old hosts not skipped",
                    island.id,
                    first_seq,
                    first_seq + count - 1,
                )
                return
            address = island.hosts[index].address
            try:
                await island.call_host(index, "SkipSeq", request, timeout=SKIP_TIMEOUT_S)
                return
            except grpc.aio.AioRpcError as e:
                final = (
                    attempt == SKIP_ATTEMPTS
                    or island.dead is not None
                    or e.code() not in SKIP_RETRY_CODES
                )
                logger.warning(
                    "skipping island_seq %d..%d on %s (try %d of %d%s): %s",
                    first_seq,
                    first_seq + count - 1,
                    address,
                    attempt,
                    SKIP_ATTEMPTS,
                    ", giving up" if final else "",
                    e.details(),
                )
                if final:
                    return
            await asyncio.sleep(pause)
            pause *= 2

    def slice_steps(self, program: StepProgram, next_step: int, since_checkpoint_s: float) -> int:
        """How many steps the next slice of `program` from `next_step` gets: about
        `slice_s` of the job's measured step time (1 while unmeasured or for steps longer
        than that), ending at the program's end, at the next checkpoint, after every
        `eval_every`-th step (train.eval_every) and before a step whose mixture weights wait
        on the losses of steps not read yet."""
        step_s = self._step_s.get(program.job_id)
        if step_s is None or step_s <= 0:
            k = 1
        else:
            k = max(1, min(self.max_slice_steps, int(self.slice_s / step_s)))
        k = min(k, program.steps - next_step)
        if program.eval_every > 0:
            # End at the next evaluation: it runs between the exact steps.
            k = min(k, program.eval_every - next_step % program.eval_every)
        mixture = program.mixture
        if mixture is not None:
            # Dynamic mixture weights: only steps whose weights can be decided now.
            for i in range(1, k):
                if not mixture.ready(next_step + i):
                    k = i
                    break
        if program.checkpoint_dir:
            for i in range(k):
                if program.checkpoint_after(next_step + i, since_checkpoint_s if i == 0 else 0.0):
                    return i + 1
        return k

    def running(self, job_id: str) -> bool:
        """Whether `job_id` has a step program running (slices may be in flight)."""
        return job_id in self._runs

    def abandon(self, job_id: str) -> None:
        """Apply the `abandon` of `job_id`'s run now, not at its next step read (the hosts'
        replies come about one message per REPLY_HOLD_S: a cancel waited up to two of them,
        50-60 ms): its slices' streams are cancelled at once, so each host stops after the
        step it is running; the run ends as an abandoned one when it next reads (on an
        island of several hosts: cut at one step, `_cut_abandoned`). A no-op without a run,
        or while the run's `abandon` is false."""
        run = self._runs.get(job_id)
        if run is None or run.state.closed or not run.abandon():
            return
        if run.one_program:
            self._cut_abandoned(run)
            return
        for sent in run.pending:
            sent.cancel()

    def _cut_abandoned(self, run: _Run) -> None:
        """Abandon a run whose island has several hosts by a cut (`cut`), not by cancelled
        streams. Those hosts run each step as one XLA program, and a cancel reaches each at
        its own moment: one host could start the next slice (a collective job's slice runs
        to its end) while another skips it, leaving the first inside a collective its peer
        never joins, where no Abort reaches. The cut stops every host at one step; the run
        reads the steps before it and ends. Once per run."""
        if run.abandon_cut is None and run.pending:
            run.abandon_cut = asyncio.ensure_future(self._abandon_by_cut(run))
            run.abandon_cut.add_done_callback(_log_failure)

    async def _abandon_by_cut(self, run: _Run) -> None:
        """The cut of an abandoned run, and a watch on its reads meanwhile: hosts that give
        no step for ABANDON_GRACE_S (or three steps) are stuck, and the run's streams are
        cancelled (its next read fails and it ends as an abandoned run)."""
        cut = asyncio.ensure_future(self.cut(run.program.job_id))
        cut.add_done_callback(_log_failure)
        grace = max(ABANDON_GRACE_S, 3 * self._step_s.get(run.program.job_id, 0.0))
        while not run.state.closed:
            try:
                await run.wait_progress(grace)
            except TimeoutError:
                logger.warning(
                    "job %s: no step read for %.0f s after its cut; its streams are cancelled",
                    run.program.job_id,
                    grace,
                )
                for sent in run.pending:
                    sent.cancel()
                return

    async def cut(self, job_id: str) -> int | None:
        """Cut the slices in flight of `job_id` at one step boundary on every host of all
        its islands (two CutSlice phases, see the module docstring) and wait until the steps
        before the cut have ended on all of them (their replies read; a run that reads no
        step for CUT_STALL_S is not waited for longer); returns the step the job goes on
        from, or None when nothing was cut (no run, a run at its end, or a host did not
        answer the first phase: the job's steps then go on as sent). The cut is never past
        the steps the run has sent. A run between two slices (nothing in flight, or its
        last steps read while the hosts were asked to hold) is cut where it stands, at its
        next step.

        Concurrent calls for one job share one cut. The run neither asks for nor grants
        itself a slice while a cut is in progress."""
        run = self._runs.get(job_id)
        if run is None or run.state.closed:
            return None
        if run.cutting is not None:
            return await asyncio.shield(run.cutting)
        if not run.pending:
            state = run.state
            return (
                None if state.stopped or state.next_step >= run.program.steps else state.next_step
            )
        run.cutting = asyncio.get_running_loop().create_future()
        result: int | None = None
        try:
            result = await self._cut(run)
        finally:
            run.cutting.set_result(result)
            run.cutting = None
        return result

    async def _cut(self, run: _Run) -> int | None:
        cut = await self._cut_phases(run)
        if cut is None:
            return None
        # The steps before the cut end on every island (a step one island started is a
        # collective of all of them) before the island is handed over.
        await self._read_to(run, cut)
        logger.info("job %s: slices cut before step %d", run.program.job_id, cut)
        return cut

    async def _cut_phases(self, run: _Run, *, closing: bool = False) -> int | None:
        """The two CutSlice phases of a cut of `run`'s slices in flight; returns the cut
        step (its slices trimmed to it), or None when a host did not answer the HOLD (or
        the run ended meanwhile, unless `closing`: the run's own failure path cuts it)."""
        program, islands = run.program, run.islands
        seq_below = [island.next_seq for island in islands]
        phase = worker_pb2.CutSliceRequest

        def request(kind: int, before: int = 0):
            return lambda i, _h, _host: worker_pb2.CutSliceRequest(
                job_id=program.job_id,
                generation=program.generation,
                epoch=self.epoch,
                phase=kind,
                before_step=before,
                seq_below=seq_below[i],
                hold_s=CUT_HOLD_S,
            )

        held = await call_all(
            islands, "CutSlice", request(phase.HOLD), timeout=CUT_TIMEOUT_S, return_exceptions=True
        )
        failed = [r for r in held if isinstance(r, BaseException)]
        if failed or (run.state.closed and not closing):
            if failed:
                logger.warning("cutting the slices of job %s: %r", program.job_id, failed[0])
            await call_all(
                islands,
                "CutSlice",
                request(phase.RELEASE),
                timeout=CUT_TIMEOUT_S,
                return_exceptions=True,
            )
            return None
        # Steps the controller has read ran on every host: the cut is never before them.
        read = run.state.next_step
        if run.pending:
            read = run.pending[0].first + run.pending[0].reported
        # A step one host started runs on all of them: the cut is the largest answer. But
        # never past what this run has sent: a host whose earlier hold lapsed (that cut's
        # CUT never reached it) ran on alone, and answers a step beyond the run's sent ones;
        # it is sent those steps again and only replays them. A cut past the steps sent
        # would wait for steps the run never sends.
        cut = min(max([r.next_step for r in held] + [read]), run.state.next_step)
        # The run reads its slices up to the cut only (before the hosts end their streams
        # there), and grants its next slice from it.
        for sent in run.pending:
            sent.count = max(sent.reported, min(sent.count, cut - sent.first))
        # A checkpoint trimmed away was never written: the time since the last one counts
        # from where it counted before that slice was sent (a checkpoint by time is due
        # again at the cut, not one interval later).
        trimmed = [s for s in run.pending if s.checkpoint >= s.first + s.count]
        if trimmed:
            run.state.last_checkpoint = trimmed[0].clock
        for sent in trimmed:
            sent.checkpoint = -1  # (a later cut, if it stays pending, does not count it)
        run.state.next_step = min(run.state.next_step, cut)
        done = await call_all(
            islands,
            "CutSlice",
            request(phase.CUT, cut),
            timeout=CUT_TIMEOUT_S,
            return_exceptions=True,
        )
        for result in done:
            if isinstance(result, BaseException):
                # That host's hold lapses (CUT_HOLD_S) and it runs on past the cut: the
                # job's next slice from the cut gets those steps replayed (their numbers
                # skipped). A collective job's host that runs on alone waits for peers that
                # stopped: an exchange's deadline fails it, inside one XLA program nothing
                # does (the hold outlasts both phases' deadlines to make that unlikely).
                logger.warning("cutting the slices of job %s: %r", program.job_id, result)
        return cut

    async def _read_to(self, run: _Run, cut: int) -> None:
        """Wait until `run` has read its steps before `cut`, it ends, or it has nothing
        left in flight (no step it reads could advance it). A run that reads no step for
        CUT_STALL_S (or three of its steps, when longer) is given up on with a warning: the
        serving request waiting for the cut must not wait on a wedged step for good."""
        stall_s = max(CUT_STALL_S, 3 * self._step_s.get(run.program.job_id, 0.0))
        while run.read < cut and run.pending and not run.state.closed:
            try:
                await run.wait_progress(stall_s)
            except TimeoutError:
                logger.warning(
                    "job %s: no step read for %.1f s while cut before step %d (read up to %d)",
                    run.program.job_id,
                    stall_s,
                    cut,
                    run.read,
                )
                return

    async def _end_by_cut(self, run: _Run) -> bool:
        """End the slices in flight of a run that failed on the controller's side (an
        `on_step` that raised, a gate's error, a cancelled task) by a cut, on an island of
        several hosts: those run each step as one XLA program, and cancelled streams reach
        each host at its own moment, leaving the host ahead in a collective its peer never
        joins (as `_cut_abandoned` for an abandon). Every host stops at one step, runs the
        steps before it and ends its streams there (skipping the numbers of the rest);
        their replies are read and dropped. Returns False when the cut could not be made (a
        host did not answer the HOLD) or the streams did not end within ABANDON_GRACE_S
        plus the steps before the cut: the caller then cancels them."""
        if run.cutting is not None:
            # A serving cut in progress: it gives up once it sees the run closed (woken by
            # `advanced`), releasing its hold, and this cut is made afresh.
            run.advanced(run.read)
            await asyncio.shield(run.cutting)
        try:
            cut = await self._cut_phases(run, closing=True)
        except Exception:  # noqa: BLE001 - the streams are cancelled instead
            logger.exception("cutting the slices of failed job %s", run.program.job_id)
            return False
        if cut is None:
            return False
        slices = list(run.pending)
        left = sum(max(0, min(sent.count, cut - sent.first) - sent.reported) for sent in slices)
        deadline = ABANDON_GRACE_S + left * self._step_s.get(run.program.job_id, 0.0)

        async def drain(stream: _HostStream) -> None:
            try:
                while True:
                    await stream.next()
            except grpc.aio.AioRpcError:
                return  # the stream's end (at the cut, or the host's own failure)

        try:
            await asyncio.wait_for(
                asyncio.gather(*(drain(stream) for sent in slices for *_, stream in sent.calls)),
                deadline,
            )
        except TimeoutError:
            logger.warning(
                "job %s: its slices did not end at their cut (step %d) within %.0f s",
                run.program.job_id,
                cut,
                deadline,
            )
            return False
        logger.info("job %s failed: its slices cut before step %d", run.program.job_id, cut)
        return True

    def _send(
        self, program: StepProgram, sent: _Slice, islands: Sequence[Island], checkpoint: int
    ) -> None:
        """Open `sent`'s RunSlice stream on every host (recording its island_seq numbers)."""
        first, count = sent.first, sent.count
        for island in islands:
            if island.dead is not None:
                raise DispatchError(
                    "step_failed",
                    f"step {first} of job {program.job_id!r}: island {island.id} is dead "
                    f"({island.dead}).",
                    grpc.StatusCode.UNAVAILABLE,
                )
        calls = sent.calls
        for island in islands:
            seq = island.take_seqs(count, self.epoch)
            sent.seqs.append((island, seq, count, island.generation))
            request = worker_pb2.RunSliceRequest(
                job_id=program.job_id,
                generation=program.generation,
                epoch=self.epoch,
                first_step=first,
                count=count,
                first_island_seq=seq,
            )
            if checkpoint >= 0:
                request.checkpoint_steps.append(checkpoint)
            mixture = program.mixture
            weights = [mixture.weights_for(first + i) for i in range(count)] if mixture else []
            if any(weights):
                # Per-step fields: the explicit form, one RunStepRequest per step.
                for i in range(count):
                    request.steps.append(
                        worker_pb2.RunStepRequest(
                            job_id=program.job_id,
                            generation=program.generation,
                            step=first + i,
                            island_seq=seq + i,
                            epoch=self.epoch,
                            checkpoint=first + i == checkpoint,
                            mixture_weights=weights[i],
                        )
                    )
            RPC_BYTES.add("RunSlice", request.ByteSize() * len(island.hosts))
            for host in island.hosts:
                try:
                    call = host.stub.RunSlice(
                        request, timeout=self.step_timeout_s, metadata=host.metadata()
                    )
                except Exception:
                    sent.cancel()
                    raise
                calls.append((island.id, host.info.host_index, _HostStream(call)))

    async def run(
        self,
        program: StepProgram,
        islands: Sequence[Island],
        *,
        on_step: OnStep | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        gate: StepGate | None = None,
        abandon: Callable[[], bool] = lambda: False,
    ) -> int:
        """Run the program's steps slice by slice; returns the number of steps completed
        (less than the program's when `should_stop` turned true).

        Every slice is one RunSlice stream per host (K steps, `slice_steps`); the next slice
        is granted and sent while the current one still has about `lead_s` of steps to go
        (at most `window` slices in flight), so the islands never wait for the controller,
        and a stop takes effect within one slice plus the lead.

        `abandon` (a cancelled job) cuts the slices in flight short: checked after every
        step read, and at once by `Dispatcher.abandon(job_id)` (the caller's cancel), it
        cancels their streams (each host stops after the step it is running and skips the
        island_seq numbers of the rest; `fill_gaps` covers a stream that never arrived), so
        a cancel takes effect within about one step. The steps such a host ran are not
        reported; use it only for a job whose state is discarded. A run on an island of
        several hosts is cut instead (`cut`: every host stops at one step, whose steps
        before it are read), within about a step and two CutSlice round trips.

        With a `gate` (controller/scheduler.py's Scheduler), every slice first waits for a
        slot on all of the job's islands (`gate.acquire(job_id, K)`; False stops the
        program) and frees it when its hosts have finished (`gate.done`), so jobs sharing
        islands take turns slice by slice in the order the scheduler grants.

        Raises:
            DispatchError: a step failed on a host (reason `step_failed`) or gave a
                non-finite loss (reason `nan_loss`); the slices in flight are cancelled (the
                hosts skip their steps not run).
        """
        pending: collections.deque[_Slice] = collections.deque()
        state = _RunState(program.start_step)
        completed = 0
        island_ids = [i.id for i in islands]
        loop = asyncio.get_running_loop()
        turn_start = loop.time()
        job_id = program.job_id
        run = _Run(
            program,
            list(islands),
            state,
            pending,
            read=program.start_step,
            abandon=abandon,
            one_program=any(len(island.hosts) > 1 for island in islands),
        )
        self._runs[job_id] = run

        def stopping() -> bool:
            return should_stop() or run.abandon_cut is not None

        def launch(granted: bool, count: int) -> None:
            """Send a granted slice to every island at once (no await: every island sees
            the jobs' slices in the one order the scheduler granted them)."""
            if not granted:
                state.stopped = True
                return
            blocked = getattr(gate, "blocked", None)
            if (run.cutting is not None or (blocked is not None and blocked(job_id))) and not (
                state.closed or stopping()
            ):
                # Granted just before an island of it began to serve (or while its slices
                # are being cut): give the slot back, uncharged, and ask again.
                if gate is not None:
                    gate.refund(job_id, island_ids)
                return
            if state.closed or stopping():
                state.stopped = True
                if gate is not None:
                    gate.refund(job_id, island_ids)
                return
            # Sized again from the step it starts at, by the checkpoint clock as it is now:
            # a cut since the slot was asked for took the run back (its slice would run past
            # a checkpoint or an evaluation), and may have put the clock back.
            since = time.monotonic() - state.last_checkpoint
            count = min(count, self.slice_steps(program, state.next_step, since))
            last = state.next_step + count - 1
            sent = _Slice(state.next_step, count, [])
            checkpoint = -1
            if program.checkpoint_after(last, since if count == 1 else 0.0):
                checkpoint = sent.checkpoint = last
                # The clock restarts here; a cut that trims the checkpoint away puts it back.
                sent.clock = state.last_checkpoint
                state.last_checkpoint = time.monotonic()
            try:
                self._send(program, sent, islands, checkpoint)
            except Exception as e:  # noqa: BLE001 - raised by the run loop
                # A closed channel (a dead island) raises here, in the grant's callback:
                # free the slot and fail the run from its loop.
                state.stopped = True
                state.error = e
                state.cut.append(sent)
                if gate is not None:
                    gate.refund(job_id, island_ids)  # (the run fails; its charge goes too)
                return
            sent.gate = gate
            sent.island_ids = island_ids
            pending.append(sent)
            state.next_step += count

        async def abandon_now() -> int:
            """Cut the slices in flight: their streams cancelled, the numbers of the steps
            not run skipped (`fill_gaps` covers a stream that never arrived, and a slice
            whose send failed half way, `state.cut`). A job on several islands is aborted
            too: an island whose host had started a step (a collective one runs to its
            slice's end) while another's stream went before it started must not wait out
            the exchange's deadline for a peer that will not send."""
            state.closed = True
            for sent in pending:
                sent.cancel()
                sent.release(job_id)
            cut = [*pending, *state.cut]
            pending.clear()
            state.cut.clear()
            if len(islands) > 1:
                await self.abort(
                    program.job_id, program.generation, islands, "the job was cancelled"
                )
            await self.fill_gaps(cut)
            return completed

        def granted(task: asyncio.Future, count: int) -> None:
            if state.acquiring is not task:
                return  # handled when the run ended
            state.acquiring = None
            if task.cancelled():
                return
            if task.exception() is not None:
                # Raised by the run loop: not a stop (the job must not end as completed).
                state.stopped = True
                state.error = task.exception()
                return
            launch(task.result(), count)

        try:
            while True:
                if state.error is not None:
                    raise state.error
                # No slot is asked for while a cut is in progress: a grant then would be
                # refused (`launch`, refunded) and asked for again at once, over and over.
                while (
                    state.acquiring is None
                    and run.cutting is None
                    and not state.stopped
                    and state.next_step < program.steps
                    and self._wants_slice(job_id, pending)
                ):
                    if stopping():
                        state.stopped = True
                        break
                    mixture = program.mixture
                    if pending and mixture is not None and not mixture.ready(state.next_step):
                        break  # its weights need the losses of a step still in flight
                    since = time.monotonic() - state.last_checkpoint
                    count = self.slice_steps(program, state.next_step, since)
                    if gate is None:
                        launch(True, count)
                        continue
                    # The slot is asked for while the current slice's steps are read (a
                    # slot frees when its slice is read to the end); the grant sends it.
                    task = asyncio.ensure_future(gate.acquire(job_id, count))
                    state.grant = functools.partial(granted, task, count)
                    task.add_done_callback(lambda _t, g=state.grant: g())
                    state.acquiring = task
                while pending and pending[0].reported >= pending[0].count:
                    pending.popleft().release(job_id)  # cut short (serving): read to its end
                if not pending:
                    if state.acquiring is not None:
                        await asyncio.wait([state.acquiring])
                        continue
                    if run.cutting is not None:
                        await asyncio.shield(run.cutting)
                        continue
                    if state.error is not None:
                        raise state.error
                    if state.next_step < program.steps and not state.stopped:
                        continue  # cut (serving): its next slice is asked for from the cut
                    return completed
                current = pending[0]
                now = loop.time()
                yield_gil(now)
                if now - turn_start >= TURN_S:
                    # Steps read from a message that carried many come without a wait:
                    # let the loop serve the other jobs, the watchers and the RPCs.
                    await asyncio.sleep(0)
                    turn_start = loop.time()
                try:
                    report = await self._collect(program, current)
                except DispatchError:
                    if current.reported >= current.count:
                        continue  # cut at this step while it was read: its streams ended
                    if abandon():  # its streams cancelled by `Dispatcher.abandon`: no failure
                        return await abandon_now()
                    raise
                current.reported += 1
                run.advanced(report.step + 1)
                if program.mixture is not None:
                    program.mixture.observe(report.step, report.loss_stats)
                completed += 1
                if current.reported == current.count:
                    pending.popleft()
                    current.release(job_id)
                if on_step is not None:
                    result = on_step(report)
                    if inspect.isawaitable(result):
                        await result
                if pending and abandon():
                    if not run.one_program:
                        return await abandon_now()
                    self._cut_abandoned(run)  # read on to the cut
        except BaseException as e:
            state.closed = True
            # A failure of the controller's own (no host failed, none is dead) on an island
            # of several hosts: its slices in flight end at one step on every host (a cut,
            # before any Abort, so the steps before the cut exchange normally).
            ended = (
                run.one_program
                and bool(pending)
                and not _host_failed(e, islands)
                and await self._end_by_cut(run)
            )
            # Release hosts waiting in an exchange on a peer whose step will not come.
            if len(islands) > 1:
                await self.abort(
                    program.job_id,
                    program.generation,
                    islands,
                    f"the controller stopped the step program: {e!r}"[:200],
                )
            # Otherwise cancel the slices in flight: the hosts skip their steps not run yet.
            # `fill_gaps` covers a stream that never arrived (after a cut too: its streams
            # have all ended, so its skips race no step for its number).
            for sent in pending:
                if not ended:
                    sent.cancel()
                sent.release(job_id)
            await self.fill_gaps([*pending, *state.cut])
            raise
        finally:
            state.closed = True
            run.advanced(run.read)
            if self._runs.get(job_id) is run:
                del self._runs[job_id]
            if state.acquiring is not None:
                if state.acquiring.done():
                    # Granted as the run ended, its callback not run yet: the slot is given
                    # back now (a loop turn later, the job's slot outlived its run).
                    state.grant()
                else:
                    state.acquiring.cancel()  # `acquire` frees a slot granted meanwhile

    def _wants_slice(self, job_id: str, pending: collections.deque[_Slice]) -> bool:
        """Whether to send the next slice now: none in flight, or room in the window and
        the newest one close to its end (about `lead_s` of its steps left)."""
        if not pending:
            return True
        if len(pending) >= self.window:
            return False
        newest = pending[-1]
        left = newest.count - newest.reported
        step_s = self._step_s.get(job_id) or 0.0
        return left <= 1 or left * step_s <= self.lead_s

    def _learn(self, job_id: str, step_s: float) -> None:
        old = self._step_s.get(job_id)
        self._step_s[job_id] = step_s if old is None else 0.8 * old + 0.2 * step_s

    async def _collect(self, program: StepProgram, sent: _Slice) -> StepReport:
        """The next step of a slice in flight, read from every host's stream."""
        step = sent.first + sent.reported
        calls = sent.calls
        if len(calls) == 1:
            try:
                results: list[Any] = [await calls[0][2].next()]
            except grpc.aio.AioRpcError as e:
                results = [e]
        elif all(stream.ready() for *_, stream in calls):
            results = [await stream.next() for *_, stream in calls]
        else:
            tasks = [asyncio.ensure_future(stream.next()) for *_, stream in calls]
            _, waiting = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            if waiting:
                # A host failed: the others may wait on it (an exchange, a multi-host
                # island's collective). Give them a moment (none once Ray reports an island
                # of the slice dead), then stop waiting: `run` aborts the exchanges.
                islands = [island for island, *_ in sent.seqs]
                waiting = await wait_unless_dead(waiting, islands, FAIL_FAST_GRACE_S)
                for task in waiting:
                    task.cancel()
                await asyncio.gather(*waiting, return_exceptions=True)
            results = [
                _NOT_ANSWERED if task.cancelled() else (task.exception() or task.result())
                for task in tasks
            ]
        hosts = []
        reply_bytes = 0
        for (island, host_index, _), result in zip(calls, results, strict=True):
            if (
                isinstance(result, grpc.aio.AioRpcError)
                and result.code() == grpc.StatusCode.DATA_LOSS
            ):
                raise DispatchError(
                    "silent_data_corruption",
                    f"step {step} of job {program.job_id!r} on island {island} host "
                    f"{host_index}: {result.details()}",
                    result.code(),
                )
        # The host that failed is named before those that did not answer after it (a
        # pipeline stage that timed out names the stage it waited for).
        for (island, host_index, _), result in zip(calls, results, strict=True):
            if isinstance(result, grpc.aio.AioRpcError):
                raise DispatchError(
                    "step_failed",
                    f"step {step} of job {program.job_id!r} failed on island {island} host "
                    f"{host_index}: {result.details()}",
                    result.code(),
                )
        for (island, host_index, _), result in zip(calls, results, strict=True):
            if result is _NOT_ANSWERED:
                raise DispatchError(
                    "step_failed",
                    f"step {step} of job {program.job_id!r} got no answer from island {island} "
                    f"host {host_index} after another host failed.",
                    grpc.StatusCode.UNAVAILABLE,
                )
            if isinstance(result, BaseException):
                raise result
            if result.step != step:
                raise DispatchError(
                    "step_failed",
                    f"island {island} host {host_index} answered step {result.step} of job "
                    f"{program.job_id!r} where step {step} was due.",
                    grpc.StatusCode.INTERNAL,
                )
            hosts.append(HostStep(island, host_index, result))
            reply_bytes += result.ByteSize()
        RPC_BYTES.add("RunSlice", reply_bytes)
        # Host 0 of each island reports its island's mean loss; the islands' slices are equal.
        if len(hosts) == 1:
            loss = hosts[0].reply.loss
        else:
            island_losses = [h.reply.loss for h in hosts if h.host_index == 0]
            loss = sum(island_losses) / len(island_losses)
        if loss != loss or loss in (float("inf"), float("-inf")):
            raise DispatchError(
                "nan_loss", f"step {step} of job {program.job_id!r} gave loss {loss}."
            )
        start_ns = min(h.reply.timings.start_unix_ns for h in hosts)
        end_ns = max(h.reply.timings.end_unix_ns for h in hosts)
        step_time_s = max(end_ns - start_ns, 1) / 1e9
        self._learn(program.job_id, step_time_s)
        sent.busy_s += step_time_s
        return StepReport(
            step=step,
            loss=loss,
            tokens_per_s=program.tokens_per_step / step_time_s,
            step_time_s=step_time_s,
            hosts=tuple(hosts),
            checkpoints_committed=_committed(hosts, sent.island_ids, program.checkpoint_islands),
            loss_stats=tuple(hosts[0].reply.loss_stats),
        )


def _host_failed(error: BaseException, islands: Sequence[Island]) -> bool:
    """Whether a run's `error` is a host's failure (a step's call failed, or an island is
    dead) rather than one of the controller's own (a callback, the gate, a cancel)."""
    if any(island.dead is not None for island in islands):
        return True
    if isinstance(error, grpc.aio.AioRpcError):
        return True
    return isinstance(error, DispatchError) and error.code is not None  # not nan_loss


def _log_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("a background cut failed", exc_info=task.exception())


def _unavailable(details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details
    )


def _committed(
    hosts: list[HostStep], island_ids: list[str], writers: tuple[int, ...]
) -> tuple[int, ...]:
    """The checkpoints host 0 of every writing island committed (a pipeline's stages each
    write their own part: a step counts once all of them have it)."""
    if len(hosts) == 1:  # one island, one host: the common case, once per step
        committed = hosts[0].reply.checkpoints_committed
        return tuple(sorted(set(committed))) if committed else ()
    ids = {island_ids[i] for i in writers if i < len(island_ids)} or {hosts[0].island}
    steps: set[int] | None = None
    for host in hosts:
        if host.host_index == 0 and host.island in ids:
            mine = set(host.reply.checkpoints_committed)
            steps = mine if steps is None else steps & mine
    return tuple(sorted(steps or ()))


class _HostStream:
    """One host's RunSlice stream, read step by step (a message may carry several steps)."""

    __slots__ = ("call", "_ready")

    def __init__(self, call: Any) -> None:
        self.call = call
        self._ready: collections.deque[worker_pb2.RunStepReply] = collections.deque()

    def cancel(self) -> None:
        self.call.cancel()

    def ready(self) -> bool:
        """Whether the next step's reply is here already (no read needed)."""
        return bool(self._ready)

    async def next(self) -> worker_pb2.RunStepReply:
        """The next step's reply (AioRpcError when the slice failed)."""
        if not self._ready:
            self._ready.extend((await _read(self.call)).steps)
        return self._ready.popleft()


async def _read(call: Any) -> worker_pb2.RunSliceReply:
    """The next message of a RunSlice stream (AioRpcError when the slice failed).

    A closed channel (DeathWatch closes a dead island's, `Island.host_died`) cancels its
    streams' reads: a cancellation this task did not ask for is the host's failure
    (UNAVAILABLE), not a stop of the controller."""
    try:
        reply = await call.read()
        if reply is grpc.aio.EOF:
            # The stream's error status, if any (a stream call is not awaitable: a CI run
            # met `await call` here as a TypeError when a cut slice's stream ended first).
            code = await call.code()
            if code != grpc.StatusCode.OK:
                raise grpc.aio.AioRpcError(
                    code, grpc.aio.Metadata(), grpc.aio.Metadata(), await call.details()
                )
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling() == 0:
            raise _unavailable("the host's channel was closed (its island died)") from None
        raise
    if reply is grpc.aio.EOF or not reply.steps:
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.INTERNAL,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            details="the host ended the slice's stream before its last step"
            if reply is grpc.aio.EOF
            else "the host sent a RunSlice message with no step",
        )
    return reply


class _RunState:
    """Where one `Dispatcher.run` is: the next step to grant, a slot being asked for."""

    def __init__(self, next_step: int) -> None:
        self.next_step = next_step
        self.last_checkpoint = time.monotonic()  # a run starts from a checkpoint or the seed
        self.acquiring: asyncio.Future | None = None
        self.grant: Callable[[], None] = lambda: None  # the acquiring's done callback
        self.stopped = False
        self.closed = False
        # An exception of a grant or a send (in a done callback), raised by the run loop.
        self.error: BaseException | None = None
        # Slices cut short before they were pending (a send that failed half way).
        self.cut: list[_Slice] = []


@dataclasses.dataclass
class _Run:
    """A `Dispatcher.run` in progress, as `Dispatcher.cut` sees it."""

    program: StepProgram
    islands: list[Island]
    state: _RunState
    pending: collections.deque
    # Set while a cut is in progress (its result: the step the run goes on from).
    cutting: asyncio.Future | None = None
    # The first step whose replies were not read yet, and a future set when it advances.
    read: int = 0
    progress: asyncio.Future | None = None
    # The run's `abandon` predicate (`Dispatcher.abandon` applies it at once).
    abandon: Callable[[], bool] = lambda: False
    # Whether an island of the run has several hosts (one XLA program across them): it is
    # abandoned by a cut (`Dispatcher._cut_abandoned`), and that cut in progress.
    one_program: bool = False
    abandon_cut: asyncio.Future | None = None

    async def wait_progress(self, timeout: float | None = None) -> None:
        """Until the run reads a step or ends (`advanced`); TimeoutError after `timeout`."""
        self.progress = self.progress or asyncio.get_running_loop().create_future()
        await asyncio.wait_for(asyncio.shield(self.progress), timeout)

    def advanced(self, read: int) -> None:
        self.read = read
        if self.progress is not None and not self.progress.done():
            self.progress.set_result(None)
        self.progress = None


class _Slice:
    """A slice in flight: steps first .. first + count - 1, one RunSlice stream per host."""

    __slots__ = (
        "first",
        "count",
        "calls",
        "seqs",
        "reported",
        "busy_s",
        "gate",
        "island_ids",
        "_freed",
        "checkpoint",
        "clock",
    )

    def __init__(self, first: int, count: int, calls: list[tuple[str, int, Any]]) -> None:
        self.first = first
        self.count = count
        self.calls = calls
        # (island, first island_seq, count, the island's generation) of every island it
        # was sent to.
        self.seqs: list[tuple[Island, int, int, int]] = []
        self.reported = 0
        self.busy_s = 0.0
        self.gate: StepGate | None = None
        self.island_ids: list[str] = []
        self._freed = False
        # The step the hosts checkpoint after (-1: none), and the run's checkpoint clock
        # (`_RunState.last_checkpoint`) before this slice restarted it.
        self.checkpoint = -1
        self.clock = 0.0

    def cancel(self) -> None:
        """Cancel the slice's streams (each host stops after the step it is running)."""
        for *_, stream in self.calls:
            stream.cancel()

    def release(self, job_id: str) -> None:
        """Free the slice's slot on the gate once (with its host-measured seconds when
        every step was read)."""
        if self._freed or self.gate is None:
            return
        self._freed = True
        busy = self.busy_s if self.reported == self.count else None
        self.gate.done(job_id, self.island_ids, busy, self.count)
