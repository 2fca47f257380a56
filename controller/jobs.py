"""The job runner: one job's life on its islands, from load to its last state.

A `JobRunner` is started by admission (controller/admission.py) once the scheduler has placed
the job. It prepares the job's data (off the event loop), loads it on every host of its
islands from its newest readable committed checkpoint (controller/recovery.py), steps it
through the dispatcher under the scheduler's step gate, suspends it to host memory when a
higher-priority job needs its islands and resumes it when they have room, and ends it:
succeeded, cancelled by a user, failed with a stated reason, or (after a recoverable failure)
rolled back and queued again. Whatever happens, it unloads the job and frees its islands.

`Reporter` records what happens to jobs for people: state transitions (store, log, bus), each
completed step (metrics with MFU, the islands' timeline, the hosts' step log lines) and the
controller's counters.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import json
import logging
import math
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from pathways_lite.v1 import controller_pb2, worker_pb2

from . import lineage
from . import spec as spec_lib
from .bus import EventBus, LogBuffer, now, timestamp_ns
from .dispatch import Dispatcher, DispatchError, StepReport
from .evaluation import evaluate_job
from .islands import Island, call_all
from .options import format_size
from .peer_recovery import PeerRecovery
from .recovery import Attempt, FailureClass, Recovery, classify
from .resolved import MemoryFigures, ResolvedJob, step_program
from .scheduler import Scheduler
from .serve_router import ServeRouter
from .states import JobState, StoreError, StoreUnavailableError
from .store import JobRecord, JobStore
from .views import TimelineEntry, Views, job_record_proto

logger = logging.getLogger(__name__)

# The DispatchError reason of a suspended job whose state in host memory is gone, or whose
# Suspend or Resume failed on a host: an infrastructure failure, rolled back to its
# checkpoint (no peer recovery: the other islands' copies are suspended, not running).
SUSPEND_FAILED = "suspend_failed"

SUSPEND_TIMEOUT_S = 300.0
# StartServe compiles the prefill and decode programs; StopServe waits for the loop.
SERVE_START_TIMEOUT_S = 300.0
# A serving job checks its replicas this often (StartServe is idempotent: a live engine
# answers at once; a failed engine or a restarted host answers an error).
SERVE_PROBE_S = 5.0
SERVE_PROBE_TIMEOUT_S = 30.0


class Reporter:
    """Records job transitions and steps in the store and on the bus, and keeps counters.

    Attributes:
        steps_total: steps completed since the controller started.
        failures_total: jobs failed since the controller started.
        job_memory: bytes per device each loaded job holds (its compiled step's peak).
    """

    def __init__(self, store: JobStore, views: Views, events: EventBus, logs: LogBuffer):
        self.store = store
        self.views = views
        self.events = events
        self.logs = logs
        self.steps_total = 0
        self.failures_total = 0
        self.job_memory: dict[str, int] = {}
        self._batches: dict[str, _StepBatch] = {}
        # When each job's steps were last written (monotonic): a batch is due FLUSH_S after.
        self._flushed_at: dict[str, float] = {}
        # Per followed job, its steps since the last flush as one reply (`publish_steps`).
        # (the record, and each step's row and the time it was recorded; the reply is made when
        # published).
        self._unpublished: dict[str, tuple[JobRecord, list[tuple[Any, ...]]]] = {}
        # Per job, the last step handed to its followers (a rollback below it is told).
        self._sent_to: dict[str, int] = {}
        # The rollbacks told to followers, numbered: per job its latest (number, step, the
        # bus's seq of the record that told it) ones; `rollback_mark` is the number of the
        # last (`rolled_back_since`).
        self._rollbacks: dict[str, collections.deque[tuple[int, int, int]]] = {}
        self.rollback_mark = 0

    def transition(self, job_id: str, state: JobState, **kwargs: Any) -> JobRecord:
        """Move a job to `state` in the store, log it and tell its followers."""
        record = self.store.transition(job_id, state, **kwargs)
        logger.info(
            "job %s is %s%s",
            job_id,
            state.value,
            f" ({kwargs['reason']})" if kwargs.get("reason") else "",
            extra={"job_id": job_id},
        )
        # Written: its followers are told whatever fails here (they end at a terminal
        # record, and nothing else would tell them).
        try:
            self.publish_steps(job_id)  # its followers see every step before the change
            view = self.followed(record)
        except Exception:  # noqa: BLE001 - told with its record alone
            logger.exception("the view of job %s at its change to %s", job_id, state.value)
            view = job_record_proto(self.store, record, new=True)  # (reads no store)
        self.events.publish(job_id, controller_pb2.WatchJobReply(time=now(), job=view))
        return record

    def phase(self, job_id: str, phase: str) -> None:
        """What a running job does before its first step (`preparing data`, `compiling`;
        "" once it steps): shown in its view, told to its followers."""
        if self.views.phases.get(job_id, "") == phase:
            return
        if phase:
            self.views.phases[job_id] = phase
            logger.info("job %s: %s", job_id, phase, extra={"job_id": job_id})
        else:
            self.views.phases.pop(job_id, None)
        try:
            record = self.store.get_job(job_id)
        except StoreError:
            return
        self.publish_steps(job_id)
        self.events.publish(
            job_id, controller_pb2.WatchJobReply(time=now(), job=self.followed(record))
        )

    def fail(self, job_id: str, reason: str, message: str) -> None:
        """The job failed with a stated reason."""
        logger.warning("job %s failed: %s", job_id, message, extra={"job_id": job_id})
        self.failures_total += 1
        try:
            self.transition(job_id, JobState.FAILED, reason=reason, message=message[:2000])
        except (StoreError, sqlite3.Error):
            logger.exception("recording the failure of job %s", job_id)

    def step(self, record: JobRecord, report: StepReport, mixture: Any = None) -> None:
        """Record a completed step: metrics, followers, the islands' timeline, host logs.

        The step's store row and its hosts' log lines are batched: written at most every
        FLUSH_S (one transaction, one log line per host for the steps since; a step that
        comes FLUSH_S or more after the last write is written at once), and whenever `flush`
        is called (before a checkpoint is registered and when the job's steps stop), so a
        crash loses at most steps after the newest registered checkpoint, which the job runs
        again from there: every step's metrics are recorded exactly once.
        """
        job_id = record.id
        if job_id in self.views.phases:
            self.phase(job_id, "")
        batch = self._batches.get(job_id)
        if batch is None:
            # Due FLUSH_S after the last write: slow steps go at once, fast ones in batches.
            due = self._flushed_at.get(job_id, -math.inf) + FLUSH_S
            # MFU is linear in tokens/s: one figure per batch, not a view's work per step.
            batch = self._batches[job_id] = _StepBatch(due, self.views.mfu(record, 1.0))
            # Written when due even when no further step comes (a pause, a slow step).
            wait_s = due - time.monotonic()
            if wait_s > 0:
                try:
                    asyncio.get_running_loop().call_later(wait_s, self._flush_due, job_id, batch)
                except RuntimeError:  # no loop (a direct call): the next step or flush writes it
                    pass
        mfu = batch.mfu_per_token_s * report.tokens_per_s
        sources = None
        if report.loss_stats and mixture is not None:
            losses, tokens = mixture.source_metrics(report.loss_stats)
            stats = list(report.loss_stats)  # exact: a restore recomputes weights from them
            sources = json.dumps({"loss": losses, "tokens": tokens, "stats": stats})
        batch.rows.append(
            (report.step, report.loss, report.tokens_per_s, report.step_time_s, mfu, sources)
        )
        self.steps_total += 1
        pending = self._unpublished.get(job_id)
        # A batch begun goes on while its job has no follower (a page's stream may come back
        # within the flush): its steps stay consecutive. The step's row and time only: the
        # reply is made once per flush (`publish_steps`), not a message per step.
        if pending is None and self.events.followed(job_id):
            pending = self._unpublished[job_id] = (record, [])
        if pending is not None:
            pending[1].append((*batch.rows[-1], time.time_ns()))
        for host in report.hosts:
            reply = host.reply
            t = reply.timings
            if host.host_index == 0:
                timeline = self.views.timeline.get(host.island)
                if timeline is not None:
                    timeline.append(
                        TimelineEntry(
                            job_id, report.step, t.start_unix_ns, t.end_unix_ns, reply.island_seq
                        )
                    )
            batch.host(host.island, host.host_index).add(report.step, reply)
        if time.monotonic() >= batch.due:
            try:
                self.flush(job_id)
            except StoreUnavailableError as e:  # kept: the next step's flush writes them
                logger.warning("%s", e)

    def _flush_retry(self, job_id: str, batch: _StepBatch) -> None:
        """The retry of `batch`'s failed write (one chain of them: a failure schedules the
        next, every FLUSH_RETRY_S while the database refuses it)."""
        batch.retry_set = False
        self._flush_due(job_id, batch)

    def _flush_due(self, job_id: str, batch: _StepBatch) -> None:
        """The timer of `batch`: flush it if it is still the job's pending batch."""
        if self._batches.get(job_id) is batch:
            try:
                self.flush(job_id)
            except StoreUnavailableError as e:
                logger.warning("%s", e)
            except StoreError:
                logger.exception("writing the steps of job %s", job_id)

    def publish_steps(self, job_id: str) -> None:
        """Hand the job's steps since the last flush to its followers, as one bus update of
        consecutive steps (a step per update cost the controller a reply, a queue entry and a
        wake-up per follower per step: most of its time under 200 watchers)."""
        pending = self._unpublished.pop(job_id, None)
        if pending is None:
            return
        record, steps = pending
        # Each step's message built in its place in the reply (no copies: 0.8 us a step, not
        # 2.2 us; 50 jobs at 0 ms steps publish 25,000 steps a second).
        reply = controller_pb2.WatchJobReply()
        add = reply.more_metrics.add
        fill = self.views.fill_step_metrics
        for i, (step, loss, tps, step_time_s, mfu, sources, ns) in enumerate(steps):
            metrics = add() if i else reply.metrics
            metrics.time.seconds, metrics.time.nanos = divmod(ns, 1_000_000_000)
            fill(metrics, record, step, loss, tps, step_time_s, mfu, sources)
        reply.time.CopyFrom(reply.metrics.time)
        self.events.publish(job_id, reply, count=len(steps))
        self._sent_to.pop(job_id, None)  # (kept in the order of the latest)
        self._sent_to[job_id] = steps[-1][0]
        if len(self._sent_to) > SENT_TO_KEPT:
            del self._sent_to[next(iter(self._sent_to))]

    def followed(self, record: JobRecord) -> controller_pb2.Job:
        """The job's record as its followers (WatchJob, the bus) get it: the detailed view
        without every step's loss (they have the steps)."""
        return self.views.job(record, step_losses=False)

    def rolled_back(self, job_id: str, step: int, forgotten: int = 0) -> None:
        """The job's recorded steps from `step` on were forgotten (a rollback: they run
        again; `forgotten` rows of them were written). If there were any, or its followers
        were handed any (written or not), they get its record marked `rolled_back_to`,
        after the steps they had, so the steps that come after it replace theirs from
        there. Never raises (the rollback is written)."""
        try:
            self.publish_steps(job_id)
            if not forgotten and self._sent_to.get(job_id, -1) < step:
                return  # nothing of it was recorded or handed to anyone (a first load)
            self._sent_to[job_id] = step - 1
            reply = controller_pb2.WatchJobReply(time=now(), rolled_back_to=step)
            try:
                reply.job.CopyFrom(self.followed(self.store.get_job(job_id)))
            except Exception:  # noqa: BLE001 - told without its record
                logger.exception("the record of job %s for its rollback", job_id)
            self.events.publish(job_id, reply)
            self.rollback_mark += 1
            kept = self._rollbacks.pop(job_id, None) or collections.deque(maxlen=ROLLBACKS_KEPT)
            kept.append((self.rollback_mark, step, reply.seq))
            self._rollbacks[job_id] = kept  # (in the order of the latest)
            if len(self._rollbacks) > SENT_TO_KEPT:
                del self._rollbacks[next(iter(self._rollbacks))]
        except Exception:  # noqa: BLE001 - the rollback is written all the same
            logger.exception("telling the followers of job %s of its rollback", job_id)

    def rolled_back_since(self, job_id: str, since: int) -> int | None:
        """The lowest step the job's rollbacks told after mark `since` (an earlier
        `rollback_mark`) went back to, or None: a follower that lagged past them gets its
        steps again from there. 0 when more happened than are kept (from the start)."""
        kept = self._rollbacks.get(job_id)
        if not kept or kept[-1][0] <= since:
            return None
        if kept[0][0] <= since or len(kept) < ROLLBACKS_KEPT:
            return min(step for mark, step, _ in kept if mark > since)
        return 0

    def old_run(self, job_id: str, update: controller_pb2.WatchJobReply, synced: int) -> bool:
        """Whether a step update of the job's came before a rollback told at or before bus
        seq `synced` (a stream's resync, which replayed from that rollback's step): its
        steps are of the run rolled back or in that replay, and the stream drops it. Any
        other goes by its steps (a rollback told after the resync comes to the stream as
        its record, after the updates before it)."""
        kept = self._rollbacks.get(job_id, ())
        return any(update.seq < seq <= synced for _, _, seq in kept)

    def discard(self, job_id: str) -> None:
        """Forget a job's steps not written yet (an attempt rolled back before they were)."""
        self._batches.pop(job_id, None)
        self._unpublished.pop(job_id, None)

    def flush(self, job_id: str) -> None:
        """Write a job's batched step rows (one transaction) and host log lines, and tell its
        followers its steps."""
        self.publish_steps(job_id)
        batch = self._batches.pop(job_id, None)
        if batch is None:
            return
        now_s = time.monotonic()
        self._flushed_at[job_id] = now_s
        if len(self._flushed_at) > FLUSHED_KEPT:  # older than FLUSH_S: as good as never
            for old_id, at in list(self._flushed_at.items()):
                if at < now_s - FLUSH_S:
                    del self._flushed_at[old_id]
        try:
            self.store.record_metrics_batch(job_id, batch.rows)
        except sqlite3.Error as e:
            # Not written (the database locked past its timeout, a full disk): the rows stay
            # the job's batch, first in line (no step came since the pop), for the next
            # flush. Dropped, every later batch would be refused as out of order.
            self._batches[job_id] = batch
            if not batch.retry_set:
                # Written later even when nothing else flushes the job (it ended: its final
                # flush failed, and no step or stream comes to write them).
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:  # no loop (a direct call): the next flush writes them
                    pass
                else:
                    batch.retry_set = True
                    loop.call_later(FLUSH_RETRY_S, self._flush_retry, job_id, batch)
            raise StoreUnavailableError(
                f"writing steps {batch.rows[0][0]}..{batch.rows[-1][0]} of job {job_id!r} "
                f"failed ({e}); they are written with the next flush."
            ) from e
        for (island, host_index), lines in batch.hosts.items():
            for end_ns, message in lines.messages():
                self.logs.add(
                    job_id,
                    controller_pb2.LogRecord(
                        time=timestamp_ns(end_ns),
                        source=f"{island}/{host_index}",
                        level="INFO",
                        logger="pathways_lite.workers.service",
                        message=message,
                    ),
                )


# Longest time a job's step rows and host log lines wait to be written.
FLUSH_S = 0.25
# Jobs whose last step handed to followers, and whose rollbacks told, are kept (the latest).
SENT_TO_KEPT = 4096
# Rollbacks kept per job for followers that lagged past them (`rolled_back_since`).
ROLLBACKS_KEPT = 8
FLUSH_RETRY_S = 1.0  # a batch whose write failed (the database locked) is tried again after
# Jobs whose last write time is kept past this many, only while under FLUSH_S old.
FLUSHED_KEPT = 1024


class Following:
    """Where one follower of a job's bus updates (a WatchJob stream, a job page's event
    stream) stands with the job's rollbacks: the last step it was sent, the bus sequence
    number its last sync reflects (the record and the store it was sent then), and the
    rollbacks told as of then (`Reporter.rollback_mark`).

    Args:
        rollbacks: the Reporter (`rollback_mark`, `rolled_back_since`, `old_run`); None:
            no rollback is known (every step goes by its number).
        job_id: the job followed.
        last_step: the last step it has (from_step - 1 before any).
    """

    def __init__(self, rollbacks: Reporter | None, job_id: str, last_step: int) -> None:
        self._rollbacks = rollbacks
        self.job_id = job_id
        self.last_step = last_step
        self.synced_seq = 0
        self.mark = 0 if rollbacks is None else rollbacks.rollback_mark

    def synced(self, seq: int) -> None:
        """Its record and the store's steps were read with the bus at `seq` (with the
        rollbacks told so far, which the replay reflects)."""
        self.synced_seq = seq
        if self._rollbacks is not None:
            self.mark = self._rollbacks.rollback_mark

    def lagged(self) -> None:
        """It lost updates: its replay starts where a rollback it may have missed went back
        to (`Reporter.rolled_back_since`), before `synced` marks the new sync."""
        if self._rollbacks is not None:
            rolled_back = self._rollbacks.rolled_back_since(self.job_id, self.mark)
            if rolled_back is not None:
                self.last_step = min(self.last_step, rolled_back - 1)

    def stale(self, update: controller_pb2.WatchJobReply) -> bool:
        """An update its last sync reflects already: a record, or steps of a run rolled back
        before it (in the replay, or forgotten); any other step update goes by its steps (one
        the replay lacks, as its write failed, still goes)."""
        if update.seq > self.synced_seq:
            return False
        if not update.HasField("metrics"):
            return True
        return self._rollbacks is not None and self._rollbacks.old_run(
            self.job_id, update, self.synced_seq
        )

    def told(self, update: controller_pb2.WatchJobReply) -> None:
        """A record it is sent: one marked `rolled_back_to` lowers its last step (the steps
        from there run again and come again as they run)."""
        if update.HasField("rolled_back_to"):
            self.last_step = min(self.last_step, update.rolled_back_to - 1)


class _HostLines:
    """One host's steps since the last flush: one log line per slice it ran."""

    __slots__ = (
        "done",
        "received_ns",
        "first",
        "last",
        "first_seq",
        "last_seq",
        "loss",
        "queued_ns",
        "ran_ns",
        "end_ns",
    )

    def __init__(self) -> None:
        self.done: list[tuple[int, str]] = []
        self.received_ns = -1
        self.first = self.last = -1
        self.first_seq = self.last_seq = 0
        self.loss = 0.0
        self.queued_ns = self.ran_ns = self.end_ns = 0

    def add(self, step: int, reply: worker_pb2.RunStepReply) -> None:
        t = reply.timings
        if t.received_unix_ns != self.received_ns:  # the first step of another slice
            if self.first >= 0:
                self.done.append((self.end_ns, self._message()))
            self.received_ns = t.received_unix_ns
            self.first, self.first_seq = step, reply.island_seq
            self.queued_ns = self.ran_ns = 0
        self.last, self.last_seq = step, reply.island_seq
        self.loss = reply.loss
        self.queued_ns += t.start_unix_ns - t.received_unix_ns
        self.ran_ns += t.end_unix_ns - t.start_unix_ns
        self.end_ns = t.end_unix_ns

    def messages(self) -> list[tuple[int, str]]:
        """(end time, line) of every slice since the last flush."""
        return [*self.done, (self.end_ns, self._message())] if self.first >= 0 else self.done

    def _message(self) -> str:
        n = self.last - self.first + 1
        queued_ms, ran_ms = self.queued_ns / 1e6 / n, self.ran_ns / 1e6 / n
        if n == 1:
            return (
                f"step {self.first} (island_seq {self.first_seq}): loss {self.loss:.6f}, "
                f"queued {queued_ms:.1f} ms, ran {ran_ms:.1f} ms"
            )
        return (
            f"steps {self.first}-{self.last} (island_seq {self.first_seq}-{self.last_seq}, "
            f"one slice): loss {self.loss:.6f} at step {self.last}, mean queued "
            f"{queued_ms:.2f} ms, mean ran {ran_ms:.3f} ms"
        )


class _StepBatch:
    """A job's completed steps not written yet."""

    def __init__(self, due: float, mfu_per_token_s: float) -> None:
        self.due = due  # when it is written (monotonic)
        self.mfu_per_token_s = mfu_per_token_s
        self.rows: list[tuple[int, float, float, float, float | None, str | None]] = []
        self.hosts: dict[tuple[str, int], _HostLines] = {}
        self.retry_set = False  # a retry of its failed write is scheduled

    def host(self, island: str, host_index: int) -> _HostLines:
        lines = self.hosts.get((island, host_index))
        if lines is None:
            lines = self.hosts[island, host_index] = _HostLines()
        return lines


@dataclasses.dataclass
class Collaborators:
    """What a job runner uses of the controller (each a narrow part of it)."""

    store: JobStore
    scheduler: Scheduler
    dispatcher: Dispatcher
    recovery: Recovery
    reporter: Reporter
    # Prepares the job's dataset (blocking; default: ResolvedJob.with_dataset).
    prepare: Callable[[JobRecord, ResolvedJob], ResolvedJob]
    # Measures the MFU peak once (blocking).
    measure_peak: Callable[[], float]
    # Asks the scheduler for another pass.
    wake: Callable[[], None]
    # Measured bytes per device by (model, mesh, batch), shared with admission.
    memory: MemoryFigures = dataclasses.field(default_factory=MemoryFigures)
    # The serve jobs' replicas (kind: serve, issue 18).
    serving: ServeRouter | None = None
    # Recovers a data-parallel job from its surviving islands (set by the controller).
    peers: PeerRecovery | None = None


def check_serve_islands(islands: Sequence[Island]) -> None:
    """A serve job decodes on single-host islands only: refused before its load, as the
    user's failure (`serve_multi_host` is a user reason: no retry)."""
    for island in islands:
        if len(island.hosts) != 1:
            raise DispatchError(
                "serve_multi_host",
                f"island {island.id} has {len(island.hosts)} hosts; a serve job decodes on "
                "single-host islands only.",
                code=grpc.StatusCode.FAILED_PRECONDITION,
            )


async def probe_serve(
    islands: Sequence[Island],
    generations: Sequence[int],
    start: worker_pb2.StartServeRequest,
) -> None:
    """A serving job's liveness check: a dead or restarted island, a host that lost the
    job, or a serve loop that failed raises DispatchError (UNAVAILABLE: the job goes
    through the normal recover-or-fail path)."""
    for island, generation in zip(islands, generations, strict=True):
        why = None
        if island.dead is not None:
            why = f"a host of island {island.id} died: {island.dead}"
        elif island.generation != generation:
            why = f"island {island.id} was restarted under the service"
        if why is not None:
            raise DispatchError(
                "serve_failed", f"Serving stopped: {why}.", code=grpc.StatusCode.UNAVAILABLE
            )
    try:
        await asyncio.gather(
            *(i.call_host(0, "StartServe", start, timeout=SERVE_PROBE_TIMEOUT_S) for i in islands)
        )
    except grpc.aio.AioRpcError as e:
        raise DispatchError(
            "serve_failed",
            f"Serving stopped: {e.details() or e.code().name}",
            code=grpc.StatusCode.UNAVAILABLE,
        ) from None
    except grpc.aio.UsageError as e:  # a channel closed under the service
        raise DispatchError(
            "serve_failed", f"Serving stopped: {e}", code=grpc.StatusCode.UNAVAILABLE
        ) from None


class JobRunner:
    """Runs one placed job on its islands (`start` makes its task).

    Attributes:
        job_id, islands: the job and the ids of its islands.
        cancel_requested: a user cancelled it; it unloads at the next step boundary.
        suspend_requested: preemption asked it to move to host memory and wait on `resume`.
        suspended_for: the higher-priority job it was suspended for ("" when unknown).
        resume: set when its islands have room again (or to finish a cancel).
        priority: what preemption compares.
        drain_requested: the controller is stopping gracefully: checkpoint at the next step
            boundary (a suspended job first comes back to its devices), unload, queue again.
        drained: what the drain did (None until it did).
        suspended: it waits in host memory for `resume`.
        loaded: its parameters are resident on its islands (it can be sampled).
        demand_bytes: bytes per device it holds on each island (the measured figure of its
            kind, else the estimate; its own compiled step's once it has loaded).
    """

    def __init__(
        self,
        record: JobRecord,
        job: ResolvedJob | None,
        islands: Sequence[Island],
        parts: Collaborators,
    ) -> None:
        self.record = record
        self.job = job
        self.job_id = record.id
        self.island_handles = list(islands)
        self.islands = [island.id for island in islands]
        self.parts = parts
        self.priority = record.priority
        self.cancel_requested = False
        self.suspend_requested = False
        self.suspended_for = ""
        self.drain_requested = False
        self.drained: controller_pb2.DrainedJob | None = None
        self.suspended = False
        self.resume = asyncio.Event()
        # Why the job's state held in host memory while suspended is gone (a host of its
        # island died or the island is down): it rolls back instead of resuming.
        self.suspended_state_lost = ""
        self.loaded = False
        # Steps completed so far (the next step to run): admission re-estimates the job's
        # end from it (controller/admission.py's reservations).
        self.steps_done = 0
        self.demand_bytes = 0 if job is None else parts.memory.bytes_per_device(job)
        # The part of demand_bytes that is a serve job's KV cache: the estimate until its
        # StartServe reports the cache's figure (swapped in, once per start).
        self.kv_counted = 0 if job is None else job.kv_bytes_per_device
        # The job as resolved at submit: the key its measured memory is kept under.
        self.admitted_as = job
        self.task: asyncio.Task | None = None
        self._attempt: Attempt | None = None
        # train.eval_every's evaluations in flight.
        self._evals: set[asyncio.Task] = set()
        # Set by a cancel, suspend or drain request (a serve job waits on it).
        self._poked = asyncio.Event()

    def start(self, on_exit: Callable[[JobRunner], None]) -> None:
        """Start the job's task; `on_exit` runs when it has released everything."""

        async def run() -> None:
            try:
                await self._run()
            finally:
                on_exit(self)

        self.task = asyncio.create_task(run(), name=f"job-{self.job_id}")

    def request_cancel(self) -> None:
        self.cancel_requested = True
        self.parts.scheduler.interrupt(self.job_id)
        self.parts.dispatcher.abandon(self.job_id)  # its slices in flight cut now
        self.resume.set()  # a suspended job wakes up to unload
        self._poked.set()

    def request_drain(self) -> None:
        self.drain_requested = True
        self.parts.scheduler.interrupt(self.job_id)
        self.resume.set()  # a suspended job comes back to its devices to be checkpointed
        self._poked.set()

    def request_lost(self, reason: str) -> None:
        """A host of the island holding this suspended job's state died (or the island is
        down): the job wakes up and rolls back to its checkpoint (recovery), rather than
        waiting to resume state that is gone, on an island nothing may be placed on."""
        if self.suspended and not self.suspended_state_lost:
            self.suspended_state_lost = reason
            self.resume.set()

    def poke(self) -> None:
        """Something changed under the job (a host of its island died): a serving job
        checks its replicas now."""
        self._poked.set()

    def request_suspend(self, by: str = "") -> None:
        """Preemption: suspend the job (for the higher-priority job `by`)."""
        self.suspend_requested = True
        self.suspended_for = by
        self.parts.scheduler.interrupt(self.job_id)
        self._poked.set()

    async def _run(self) -> None:
        p = self.parts
        job_id, islands = self.job_id, self.island_handles
        loaded = False
        try:
            p.reporter.transition(
                job_id,
                JobState.RUNNING,
                reason="scheduled",
                message=f"Running on {', '.join(self.islands)}.",
            )
            if self.job is None:  # its spec no longer resolves: fail it with the reason
                self.job = self.admitted_as = ResolvedJob.resolve(self.record.spec)
            if spec_lib.job_kind(self.record.spec) == "serve":
                check_serve_islands(islands)  # before the load, never retried
            p.reporter.phase(job_id, "preparing data")
            try:
                # init_from: its checkpoint, and the tokenizer the new data is read with.
                self.job = await asyncio.to_thread(self._with_init, self.job)
                self.job = await asyncio.to_thread(p.prepare, self.record, self.job)
                await asyncio.to_thread(self._keep_tokenizer)
            except spec_lib.SpecError:  # naming its field already
                raise
            except ValueError as e:  # the data's DataError (a missing file...): the user's
                raise spec_lib.SpecError("data", "", f"Preparing the data failed: {e}") from e
            program = step_program(job_id, self.record.generation, self.job)
            if program.mixture is not None:
                # Dynamic weights are job events: a restarted run sends the same ones.
                program.mixture.record = functools.partial(p.store.add_event, job_id)
                program.mixture.load_events((e.kind, e.message) for e in p.store.events(job_id))
                for m in p.store.metrics(job_id):  # the steps before a restore point
                    if m.sources:
                        program.mixture.observe(m.step, json.loads(m.sources).get("stats", ()))
            logger.info("loading job %s on %s", job_id, self.islands, extra={"job_id": job_id})
            p.reporter.phase(job_id, "compiling")
            await asyncio.to_thread(p.measure_peak)
            # From the newest readable committed checkpoint (or the seed), new generation.
            adopted = None
            if p.peers is not None:  # after a controller restart: the hosts' own state
                job_dir = p.recovery.job_dir(job_id)
                adopted = await p.peers.adopt(
                    program,
                    islands,
                    job_dir,
                    functools.partial(self._step_done, replayed=True),
                    flush=lambda: p.reporter.flush(job_id),
                )
            if adopted is None:
                # Steps a failed adoption replayed before it gave up are rolled back with the
                # rest: not written after the restore's truncation (out of order for good).
                # Any unwritten steps lie past the newest registered checkpoint (registered
                # only once the steps before it are written): run again from it.
                p.reporter.discard(job_id)
                self._attempt, replies = await p.recovery.load(program, islands)
            else:
                self._attempt, replies = adopted
            program = self._attempt.program
            loaded = self.loaded = True
            # The compiled step's own memory analysis (what the job holds at the peak of its
            # step) replaces the upper bound it was admitted on, for it and for every later
            # job of the same model, mesh and batch; the room it frees may admit another.
            measured = max(r.memory.total_bytes for r in replies)
            if measured > 0:
                # The step's figure is kept (a serve job's cache is added per job, by its own
                # settings); a serve job's slot cache comes with StartServe, after the load:
                # its room stays held (freed now, a pass could admit another job into it).
                p.memory.record(self.admitted_as, measured)
                self.kv_counted = self.job.kv_bytes_per_device
                self.demand_bytes = measured + self.kv_counted
                p.scheduler.resize(job_id, self.demand_bytes)
                p.wake()
            p.reporter.job_memory[job_id] = self.demand_bytes
            logger.info(
                "job %s loaded (compile %.1f s, %s per device; estimated %s)",
                job_id,
                max(r.compile_s for r in replies),
                format_size(measured),
                format_size(self.admitted_as.bytes_per_device),
                extra={"job_id": job_id},
            )
            if spec_lib.job_kind(self.record.spec) == "eval":
                await self._end_eval_job(islands)
                loaded = False
                return
            if spec_lib.job_kind(self.record.spec) == "serve":
                await self._serve(islands)
                return
            while True:
                try:
                    completed = await self._step_until_done(program)
                    break
                except DispatchError as e:
                    # A data-parallel job whose island died continues from a survivor's
                    # state with no step lost (controller/peer_recovery.py); else (a
                    # pipeline job too: its islands hold different stages) roll back.
                    attempt = None
                    if (
                        not self.cancel_requested
                        and p.peers is not None
                        and e.reason != SUSPEND_FAILED  # no survivor runs: states suspended
                        and spec_lib.pipeline_settings(self.record.spec) is None
                        and self._steps_written()
                    ):
                        attempt = await p.peers.recover(job_id, self._attempt, islands, e)
                    if attempt is None:
                        raise
                    self._attempt, program = attempt, attempt.program
            step = program.start_step + completed
            if self._evals:
                await asyncio.gather(*self._evals, return_exceptions=True)
            if self.record.spec.train.eval_every and step >= program.steps:
                await self._eval_logged(step)
            if self.drain_requested and not self.cancel_requested and step < program.steps:
                await self._drain(step)
                return
            if self.cancel_requested and len(islands) > 1:
                # A host that started a step its peers' cancelled streams skip waits in the
                # exchange (or a pipeline stage link) until its deadline: release it now,
                # so the final checkpoint and the unload do not queue behind it.
                await p.dispatcher.abort(
                    job_id, program.generation, islands, "the job was cancelled"
                )
            await p.recovery.finish(self._attempt, islands)
            if not self.cancel_requested:
                # A job that says it ended has freed its memory on every island.
                loaded = False
                await p.dispatcher.unload(job_id, islands)
                p.reporter.transition(
                    job_id,
                    JobState.SUCCEEDED,
                    reason="completed",
                    message=f"Completed {completed} steps.",
                )
        except asyncio.CancelledError:
            # The controller is stopping: the job goes back to the queue, nothing is lost.
            if not self.cancel_requested:
                try:
                    p.reporter.transition(
                        job_id,
                        JobState.QUEUED,
                        reason="controller_stopped",
                        message="The controller stopped; the job will run again.",
                    )
                    p.recovery.requeue(job_id)
                except StoreError:
                    logger.exception("requeueing job %s", job_id)
            raise
        except (DispatchError, spec_lib.SpecError) as e:
            await self._recover_or_fail(e)
        except Exception as e:
            logger.exception("job %s failed", job_id)
            self._fail("internal", f"{type(e).__name__}: {e}")
        finally:
            for task in list(self._evals):  # a failed or stopped run evaluates no further
                task.cancel()
            self.loaded = False
            p.reporter.phase(job_id, "")
            p.reporter.job_memory.pop(job_id, None)
            if loaded:
                await p.dispatcher.unload(job_id, islands)
            p.scheduler.release(job_id)
            p.wake()

    def _with_init(self, job: ResolvedJob) -> ResolvedJob:
        """The job with its init_from checkpoint and tokenizer (controller/lineage.py)."""
        return lineage.with_init(self.parts.store, self.record, job)

    def _keep_tokenizer(self) -> None:
        """The job's tokenizer beside its checkpoints, for jobs started from them; one that
        resumes from them must read its data with the same (`lineage.keep_tokenizer`)."""
        if self.job is not None and self.job.dataset is not None:
            resuming = self.parts.store.latest_checkpoint(self.job_id) is not None
            lineage.keep_tokenizer(
                self.parts.recovery.job_dir(self.job_id), self.job.dataset.path, resuming=resuming
            )

    async def _evaluate(self, step: int | None = None) -> None:
        """Evaluate the job's current parameters on its first island; store the result."""
        p = self.parts
        p.reporter.phase(self.job_id, "evaluating")
        try:
            await evaluate_job(self.island_handles[0], self.record, p.store, step)
        finally:
            p.reporter.phase(self.job_id, "")

    async def _eval_logged(self, step: int) -> None:
        """One evaluation whose failure is logged, never failing the training job
        (train.eval_every: at every N steps and after the last one)."""
        try:
            await self._evaluate()
        except Exception as e:  # noqa: BLE001 - the trained job still succeeds
            logger.warning(
                "evaluating job %s at step %d: %r",
                self.job_id,
                step,
                e,
                extra={"job_id": self.job_id},
            )

    async def _end_eval_job(self, islands: Sequence[Island]) -> None:
        """kind: eval: evaluate the loaded checkpoint, unload, succeed."""
        p = self.parts
        init = self.job.init if self.job is not None else None
        try:
            await self._evaluate(None if init is None else init.step)
        except grpc.aio.AioRpcError as e:
            raise DispatchError(
                "eval_failed", f"Evaluating failed: {e.details()}", code=e.code()
            ) from None
        await p.dispatcher.unload(self.job_id, islands)
        p.reporter.transition(
            self.job_id,
            JobState.SUCCEEDED,
            reason="completed",
            message="Evaluated"
            + (
                ""
                if init is None
                else f" the checkpoint of job {init.source_id} at step {init.step}"
            )
            + ".",
        )

    async def _serve(self, islands: Sequence[Island]) -> None:
        """kind: serve: start the service on every island (one replica each) and keep it
        until a cancel or drain; a preemption stops it (its open streams end UNAVAILABLE),
        suspends the job and starts it again on resume."""
        p = self.parts
        assert self.job is not None and p.serving is not None
        settings = spec_lib.serve_settings(self.record.spec, self.job.configs.model.max_seq_len)
        start = worker_pb2.StartServeRequest(
            job_id=self.job_id,
            max_batch=settings.max_batch,
            max_seq_len=settings.max_seq_len,
        )
        try:
            while True:
                await self._serve_until_stopped(islands, settings, start)
                if self.cancel_requested:
                    return
                if self.drain_requested:
                    self._drain_service()
                    return
                # Preempted: the router answers the job's requests UNAVAILABLE naming the
                # preemption while it waits in host memory; on resume it serves again.
                await self._suspend(None)
                if self.cancel_requested:
                    return
                if self.drain_requested:  # drained while suspended
                    self._drain_service()
                    return
        finally:
            p.serving.stopped(self.job_id)

    def _drain_service(self) -> None:
        """The controller stops gracefully: the serve job goes back to the queue (the next
        controller starts its service again)."""
        p = self.parts
        p.recovery.requeue(self.job_id)
        p.reporter.transition(
            self.job_id,
            JobState.QUEUED,
            reason="controller_stopped",
            message="The controller stopped; the service starts again with the next.",
        )
        self.drained = controller_pb2.DrainedJob(
            job_id=self.job_id, name=self.record.name, message="the controller is stopping"
        )

    async def _serve_until_stopped(
        self,
        islands: Sequence[Island],
        settings: spec_lib.ServeSettings,
        start: worker_pb2.StartServeRequest,
    ) -> None:
        """Start the service on every island and keep it until a cancel, drain or
        preemption; then stop it (its open streams end UNAVAILABLE naming why)."""
        p = self.parts
        assert p.serving is not None
        p.serving.loading(self.job_id, islands)
        p.reporter.phase(self.job_id, "starting service")
        try:
            replies = await asyncio.gather(
                *(
                    i.call_host(0, "StartServe", start, timeout=SERVE_START_TIMEOUT_S)
                    for i in islands
                )
            )
        except grpc.aio.AioRpcError as e:
            raise DispatchError(
                "serve_failed", f"Starting the service failed: {e.details()}", code=e.code()
            ) from None
        kv = max(r.kv_cache_bytes for r in replies)
        # The KV cache is held on the island beside the parameters: accounted. Its room was
        # held from the load on by the estimate (`kv_bytes_per_device`): the figure the
        # hosts report replaces it, and the job is placed by the whole figure when resumed.
        self.demand_bytes += kv - self.kv_counted  # again at a resume's start: no drift
        self.kv_counted = kv
        p.scheduler.resize(self.job_id, self.demand_bytes)
        p.reporter.job_memory[self.job_id] = self.demand_bytes
        p.serving.serving(
            self.job_id,
            kv,
            settings.max_batch,
            settings.target_p99_ms,
            max_seq_len=settings.max_seq_len,
        )
        p.reporter.phase(self.job_id, "serving")
        logger.info(
            "job %s serving on %s (KV cache %s; compile %.1f s)",
            self.job_id,
            self.islands,
            format_size(kv),
            max(r.compile_s for r in replies),
            extra={"job_id": self.job_id},
        )
        self._poked.clear()
        generations = [i.generation for i in islands]
        while not (self.cancel_requested or self.suspend_requested or self.drain_requested):
            try:
                await asyncio.wait_for(self._poked.wait(), SERVE_PROBE_S)
            except TimeoutError:
                pass
            self._poked.clear()
            if self.cancel_requested or self.suspend_requested or self.drain_requested:
                break
            await probe_serve(islands, generations, start)  # the runner's recovery unloads it
        if self.cancel_requested:
            reason = "the serve job was cancelled"
        elif self.drain_requested:
            reason = "the controller is stopping"
        else:
            by = f" {self.suspended_for}" if self.suspended_for else ""
            reason = f"the serve job was preempted by higher-priority job{by}"
        # The router refuses new requests first (UNAVAILABLE naming why), then the hosts end
        # the open streams.
        p.serving.stopping(self.job_id, reason)
        await asyncio.gather(
            *(
                i.call_host(
                    0,
                    "StopServe",
                    worker_pb2.StopServeRequest(job_id=self.job_id, reason=reason),
                    timeout=SERVE_START_TIMEOUT_S,
                )
                for i in islands
            ),
            return_exceptions=True,
        )

    async def _step_until_done(self, program: Any) -> int:
        """Step the program to its end (or a cancel), suspending and resuming on the way;
        returns the steps completed."""
        p = self.parts
        completed = 0
        while True:
            p.scheduler.join(self.job_id, self.islands, self.record.weight)
            try:
                completed += await p.dispatcher.run(
                    dataclasses.replace(program, start_step=program.start_step + completed),
                    self.island_handles,
                    on_step=self._step_done,
                    should_stop=lambda: (
                        self.cancel_requested or self.suspend_requested or self.drain_requested
                    ),
                    gate=p.scheduler,
                    abandon=lambda: self.cancel_requested,
                )
            finally:
                p.scheduler.leave(self.job_id)
                try:
                    p.reporter.flush(self.job_id)
                except StoreError:
                    logger.exception("recording the steps of job %s", self.job_id)
            done = program.start_step + completed >= program.steps
            stop = self.cancel_requested or self.drain_requested
            if stop or done or not self.suspend_requested:
                return completed
            await self._suspend(program.start_step + completed)
            if self.cancel_requested or self.drain_requested:
                return completed

    async def _suspend(self, step: int | None) -> None:
        """Move the job's state to host memory on every host, free its device memory, and
        wait until the scheduler resumes it (or it is cancelled). `step`: where a training
        job stopped (None: a service)."""
        p = self.parts
        where = "Suspended" if step is None else f"Suspended at step {step}"
        back = "Resumed; the service starts again." if step is None else f"Resumed at step {step}."
        by = f"higher-priority job {self.suspended_for}" if self.suspended_for else None
        # Cleared before the waits below: a cancel or a drain that comes during them sets it
        # again (cleared after, a drain would be lost and the job wait suspended for good).
        self.resume.clear()
        if self._evals:  # a Suspend would queue behind them on the hosts
            await asyncio.gather(*self._evals, return_exceptions=True)
        epoch = p.dispatcher.epoch
        await self._on_hosts("Suspend", worker_pb2.SuspendRequest(job_id=self.job_id, epoch=epoch))
        p.scheduler.release(self.job_id)
        p.wake()
        if not (self.cancel_requested or self.drain_requested):
            p.reporter.transition(
                self.job_id,
                JobState.SUSPENDED,
                reason="preempted",
                message=f"{where} for {by or 'a higher-priority job'}; state in host memory.",
            )
            self.suspended = True
            await self.resume.wait()
            self.suspended = False
        self.suspend_requested = False
        self.suspended_for = ""
        if self.cancel_requested:
            return
        lost, self.suspended_state_lost = self.suspended_state_lost, ""
        if lost:
            raise DispatchError(
                SUSPEND_FAILED,
                f"job {self.job_id!r} was suspended in host memory: {lost}",
                grpc.StatusCode.UNAVAILABLE,
            )
        await self._on_hosts("Resume", worker_pb2.ResumeRequest(job_id=self.job_id, epoch=epoch))
        if self.drain_requested:
            return  # back on its devices only to be checkpointed
        p.reporter.transition(self.job_id, JobState.RUNNING, reason="resumed", message=back)

    async def _on_hosts(self, rpc: str, request: Any) -> None:
        """Suspend or Resume on every host of the job; a host that fails it (dead, restarted
        without the job) is an infrastructure failure (recovery rolls the job back), not an
        internal error.

        Raises:
            DispatchError: UNAVAILABLE, naming the rpc and the host's status.
        """
        try:
            await call_all(self.island_handles, rpc, request, timeout=SUSPEND_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            raise DispatchError(
                SUSPEND_FAILED,
                f"{rpc} of job {self.job_id!r} failed on a host: {e.code().name}: {e.details()}",
                grpc.StatusCode.UNAVAILABLE,
            ) from e

    async def _drain(self, step: int) -> None:
        """The controller stops gracefully: make sure a committed checkpoint holds `step`,
        then queue the job again (the next controller resumes it from there)."""
        p = self.parts
        assert self._attempt is not None
        try:
            saved = await p.recovery.checkpoint_now(self._attempt, self.island_handles, step)
        except Exception as e:  # noqa: BLE001 - the job still goes back to the queue
            logger.warning(
                "checkpointing job %s: %r", self.job_id, e, extra={"job_id": self.job_id}
            )
            saved = False
        if self.cancel_requested:
            return  # cancelled while it saved: it ends cancelled, its steps all recorded
        resume_step = p.recovery.requeue(self.job_id)
        if saved:
            message = (
                f"Checkpointed at step {step} before the controller stopped; it resumes from there."
            )
        else:
            message = (
                f"The controller stopped at step {step} without a new checkpoint; it resumes "
                f"from step {resume_step}."
            )
        p.reporter.transition(
            self.job_id, JobState.QUEUED, reason="controller_stopped", message=message
        )
        self.drained = controller_pb2.DrainedJob(
            job_id=self.job_id,
            name=self.record.name,
            step=resume_step,
            checkpointed=saved,
            message=message,
        )

    def _steps_written(self) -> bool:
        """Write the job's batched steps; whether they are all in the store (a peer recovery
        resumes at the steps stored: with some unwritten, it would run them again behind
        their pending rows, refused as out of order; the job rolls back instead, which
        drops them)."""
        try:
            self.parts.reporter.flush(self.job_id)
        except StoreError as e:
            logger.warning("%s; job %s rolls back instead of a peer recovery", e, self.job_id)
            return False
        return True

    def _step_done(self, report: StepReport, replayed: bool = False) -> None:
        """Record the step, then register the checkpoints it reports committed (`replayed`:
        a step an earlier controller ran, recorded from the hosts: its parameters are gone,
        so no evaluation is due)."""
        reporter = self.parts.reporter
        attempt = self._attempt
        reporter.step(self.record, report, None if attempt is None else attempt.program.mixture)
        self.steps_done = report.step + 1
        if attempt is not None and report.checkpoints_committed:
            # Its steps written first (`Recovery.on_step`).
            self.parts.recovery.on_step(attempt, report.checkpoints_committed)
        every, done = self.record.spec.train.eval_every, report.step + 1
        if every and done % every == 0 and done < self.record.spec.train.steps and not replayed:
            # Between steps on the hosts (the Evaluate rpc queues behind the steps in flight):
            # the result names the steps its parameters had applied.
            task = asyncio.create_task(self._eval_logged(done), name=f"eval-{self.job_id}")
            self._evals.add(task)
            task.add_done_callback(self._evals.discard)

    def _fail(self, reason: str, message: str) -> None:
        if self.cancel_requested:
            logger.warning("job %s failed: %s", self.job_id, message, extra={"job_id": self.job_id})
            return
        self.parts.reporter.fail(self.job_id, reason, message)

    async def _recover_or_fail(self, error: DispatchError | spec_lib.SpecError) -> None:
        """A failed attempt: user errors fail the job at once; other classes roll it back
        (controller/recovery.py) and queue it again while their retry budget lasts."""
        p = self.parts
        reason = getattr(error, "reason", "invalid_spec")
        if self.cancel_requested:
            self._fail(reason, error.message)
            return
        try:
            retry = await p.recovery.retry(self.record, self._attempt, self.island_handles, error)
        except Exception:
            logger.exception("recovering job %s", self.job_id)
            retry = False
        if self.cancel_requested:
            return  # cancelled while it was rolled back: it stays cancelled, not queued
        if not retry:
            user = classify(error) == FailureClass.USER
            self._fail(reason, ("User error, not retried: " if user else "") + error.message)
            return
        p.reporter.transition(
            self.job_id,
            JobState.QUEUED,
            reason="retry",
            message=f"Rolled back after a failure; it resumes from step "
            f"{p.recovery.resume_step(self.job_id)}: {error.message[:500]}",
        )
