"""Failure handling: failure classes and retry budgets, checkpoints, and island restarts.

A job's attempt (load, then steps) fails with a DispatchError or a SpecError. `classify` puts
the failure in a class: infrastructure (a host lost, an RPC deadline, an exchange aborted by a
dead peer), preemption, or user error (invalid spec, NaN/Inf loss, out of memory). Each class
has its own retry budget, counted per job in the store (so a controller restart does not
reset it); a user error is never retried: the job fails at once with the reason.

An infrastructure failure rolls the job back: the job's exchanges are aborted on every island
(`Dispatcher.abort`), the islands whose hosts do not answer (or whose peer host is gone: a
multi-host island restarts as a unit) are restarted through Ray (`Island.restart`), and the
job is loaded again under a new generation from its last committed checkpoint. An island that
cannot be restarted (its node is gone) is reported lost (`on_island_lost`: the controller
places nothing there until it is back) and the job is queued again, so it takes free islands
with room instead. A checkpoint that does not read back is marked corrupt, with a warning
event, and the previous committed one is used. Metrics from the restored step on are
truncated, so the metrics have neither duplicated nor missing steps.

Checkpoints: the island hosts write them (workers/checkpoint.py) into
`<state_dir>/checkpoints/<job_id>`; a checkpoint is registered in the store only once host 0
of every writing island (island 0; a pipeline's replica 0 of every stage) reports it
committed; retention keeps the newest `keep` of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import shutil
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from pathways_lite.v1 import worker_pb2
from pathways_lite.workers.checkpoint import MISSING, checkpoint_path, is_committed

from . import spec as spec_lib
from .dispatch import Dispatcher, DispatchError
from .islands import Island, dead_islands
from .program import StepProgram
from .states import CheckpointState, StoreError
from .store import JobRecord, JobStore
from .store_progress import Checkpoint

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
DEFAULT_KEEP = 3
FINAL_CHECKPOINT_TIMEOUT_S = 300.0


class FailureClass(enum.StrEnum):
    """Why an attempt of a job failed; each class has its own retry budget."""

    INFRASTRUCTURE = "infrastructure"
    PREEMPTION = "preemption"
    USER = "user"


DEFAULT_BUDGETS = {
    FailureClass.INFRASTRUCTURE: 3,
    FailureClass.PREEMPTION: 100,
    FailureClass.USER: 0,
}
_USER_REASONS = {"nan_loss", "invalid_spec", "serve_multi_host"}
_USER_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
_INFRA_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.FAILED_PRECONDITION,  # a host restarted under the job (lost its state)
}


def classify(error: BaseException) -> FailureClass:
    """The failure class of an attempt's error."""
    if isinstance(error, spec_lib.SpecError):
        return FailureClass.USER
    if isinstance(error, DispatchError):
        if error.reason == "preempted":
            return FailureClass.PREEMPTION
        if error.reason in _USER_REASONS or error.code in _USER_CODES:
            return FailureClass.USER
        if "out of memory" in error.message.lower():
            return FailureClass.USER
        if error.code in _INFRA_CODES or error.reason == "silent_data_corruption":
            return FailureClass.INFRASTRUCTURE
    return FailureClass.USER if isinstance(error, ValueError) else FailureClass.INFRASTRUCTURE


def _stage_parts(path: str) -> list[Path]:
    """A pipeline job's parts of the checkpoint `<job_dir>/g<g>-step<n>`: every
    `<job_dir>/stage<s>/g<g>-step<n>` folder there is (each stage writes its own)."""
    folder = Path(path)
    return [
        stage / folder.name
        for stage in folder.parent.glob("stage*")
        if stage.name[len("stage") :].isdigit() and (stage / folder.name).exists()
    ]


def remove_checkpoint(path: str) -> None:
    """Delete a retired checkpoint: its folder, and a pipeline job's stage parts of it."""
    shutil.rmtree(path, ignore_errors=True)
    for part in _stage_parts(path):
        shutil.rmtree(part, ignore_errors=True)


def committed_here(path: str, stages: int) -> bool:
    """Whether this process finds the checkpoint committed: its folder, or for a pipeline
    job of `stages` stages every stage's part of it (one missing: not committed; it was
    taken for committed, and the checkpoint retried as unseen by the hosts, never skipped)."""
    if is_committed(path):
        return True
    folder = Path(path)
    parts = [folder.parent / f"stage{s}" / folder.name for s in range(stages)]
    return stages > 1 and all(is_committed(part) for part in parts)


def _all_committed(replies: Sequence[Any]) -> list[int]:
    """The steps every reply reports committed (host 0 of each writing island)."""
    steps: set[int] | None = None
    for reply in replies:
        mine = set(reply.checkpoints_committed)
        steps = mine if steps is None else steps & mine
    return sorted(steps or ())


@dataclasses.dataclass
class Attempt:
    """One load-and-run of a job: its program (generation, start step, restore point)."""

    program: StepProgram
    restored: Checkpoint | None
    registered: set[int] = dataclasses.field(default_factory=set)


class Recovery:
    """The controller's failure paths and checkpoint bookkeeping for its jobs.

    Args:
        store: the job store (registry, events, metrics, retry counts).
        dispatcher: the controller's dispatcher.
        state_dir: the controller's state directory; checkpoints go below it. Empty: no
            checkpoints are written.
        keep: committed checkpoints kept per job (retention).
        budgets: retries per failure class.
        on_island_lost: called with (island, reason) when a dead island cannot be restarted;
            the controller stops placing jobs there and keeps trying to bring it back.
    """

    def __init__(
        self,
        store: JobStore,
        dispatcher: Dispatcher,
        *,
        state_dir: str | Path = "",
        keep: int = DEFAULT_KEEP,
        budgets: dict[FailureClass, int] | None = None,
        on_island_lost: Callable[[Island, str], None] | None = None,
    ) -> None:
        self.on_island_lost = on_island_lost
        self.store = store
        self.dispatcher = dispatcher
        self.root = Path(state_dir) / CHECKPOINT_DIR if state_dir else None
        self.keep = keep
        self.budgets = dict(DEFAULT_BUDGETS if budgets is None else budgets)
        # Writes a job's recorded steps not written yet (the controller's Reporter.flush):
        # a checkpoint is registered only after them (`on_step`).
        self.flush_metrics: Callable[[str], None] | None = None

    def job_dir(self, job_id: str) -> str:
        return "" if self.root is None else str(self.root / job_id)

    def resume_step(self, job_id: str) -> int:
        """The step a job resumes from: its newest committed checkpoint's, or 0."""
        latest = self.store.latest_checkpoint(job_id)
        return 0 if latest is None else latest.step

    def requeue(self, job_id: str) -> int:
        """A running job goes back to the queue (controller stop or restart): forget metrics
        after its resume point; a new generation, so hosts drop the old state. Returns the
        resume step."""
        step = self.resume_step(job_id)
        self.store.truncate_metrics(job_id, step)
        self.store.bump_generation(job_id)
        return step

    def plan(self, program: StepProgram, checkpoint: Checkpoint | None) -> Attempt:
        """The program of an attempt restoring `checkpoint` (None: from the seed, step 0):
        checkpoint folder and restore point in every LoadJob, steps from the restore point,
        metrics after it forgotten."""
        start = 0 if checkpoint is None else checkpoint.step
        self.store.truncate_metrics(program.job_id, start)
        program = dataclasses.replace(
            program,
            start_step=start,
            checkpoint_dir=self.job_dir(program.job_id),
            restore_from="" if checkpoint is None else checkpoint.path,
        )
        return Attempt(program, checkpoint)

    async def load(
        self, program: StepProgram, islands: Sequence[Island]
    ) -> tuple[Attempt, list[worker_pb2.LoadJobReply]]:
        """Load a job from its newest readable committed checkpoint (or from the seed).

        A checkpoint the hosts cannot read (DATA_LOSS) is marked corrupt with a warning
        event, and the previous committed one is tried.
        """
        while True:
            checkpoint = self.store.latest_checkpoint(program.job_id)
            attempt = self.plan(program, checkpoint)
            try:
                replies = await self.dispatcher.load(attempt.program, islands)
            except DispatchError as e:
                if checkpoint is None or e.code != grpc.StatusCode.DATA_LOSS:
                    raise
                stages = len(program.checkpoint_islands)  # a pipeline's: one per stage
                if MISSING in e.message and committed_here(checkpoint.path, stages):
                    # Not lost: the hosts do not see what this controller sees. Marked
                    # corrupt, it and every older one (the hosts see none of them) were
                    # skipped, and the job started again from step 0.
                    raise DispatchError(
                        "checkpoint_not_found",
                        f"The hosts cannot find the checkpoint at step {checkpoint.step} "
                        f"({checkpoint.path}), which the controller finds committed: is the "
                        "state directory on storage every island's node shares? It is kept. "
                        + e.message[:500],
                        grpc.StatusCode.UNAVAILABLE,
                    ) from e
                message = (
                    f"Checkpoint at step {checkpoint.step} ({checkpoint.path}) is unreadable "
                    f"and was skipped for the previous committed one: {e.message[:500]}"
                )
                logger.warning("job %s: %s", program.job_id, message)
                self.store.mark_checkpoint(checkpoint, CheckpointState.CORRUPT, message)
                # Islands that read their part (a pipeline's other stages, say) hold this
                # generation: they would refuse the previous checkpoint's load of it.
                await self.dispatcher.unload(program.job_id, islands)
                continue
            if checkpoint is not None:
                self.store.add_event(
                    program.job_id,
                    "restore",
                    f"Resumed from the checkpoint at step {checkpoint.step} ({checkpoint.path}) "
                    f"on {', '.join(i.id for i in islands)} as generation "
                    f"{program.generation}; steps {checkpoint.step} to {program.steps - 1} "
                    "run again.",
                )
            elif program.generation > 0:  # it ran before: say that its work starts over
                self.store.add_event(
                    program.job_id, "resume", "Resumed from step 0: no checkpoint."
                )
            return attempt, replies

    def on_step(self, attempt: Attempt, committed: Sequence[int], *, ending: bool = False) -> None:
        """Register the checkpoints the writing islands report committed; apply retention.

        Metrics first: a registered checkpoint never runs ahead of the written steps, so a
        batch of steps that is lost (a crash, a write the database refused, dropped at the
        job's next start) lies past the newest checkpoint and is run and recorded again from
        it. When the steps cannot be written (the database locked), nothing is registered
        now: the next report, or a drain's checkpoint, tries again; the job resumes from the
        checkpoint before. Before stop 40 only a step's report checked this; a drain's
        checkpoint registered past a batch whose write had failed, and the job's next start
        dropped those steps for good. `ending`: the job's final checkpoint (it succeeded and
        does not start again: nothing drops its steps, which the Reporter writes when it
        can), registered all the same, as jobs that start from it need it.
        """
        new = [s for s in committed if s not in attempt.registered]
        if not new or self.root is None:
            return
        program = attempt.program
        if self.flush_metrics is not None:
            try:
                self.flush_metrics(program.job_id)
            except StoreError as e:
                if not ending:
                    logger.warning("%s; checkpoint not registered", e)
                    return
                logger.warning("%s; the final checkpoint is registered all the same", e)
        restored = attempt.restored
        for step in new:
            if step < program.start_step or (
                step == program.start_step and restored is not None and restored.step == step
            ):
                attempt.registered.add(step)
                continue  # the restored one, or one of before it
            path = checkpoint_path(self.job_dir(program.job_id), program.generation, step)
            try:
                self.store.register_checkpoint(program.job_id, program.generation, step, path)
            except sqlite3.Error as e:
                # The database refused it (locked past its timeout, a full disk): the next
                # report of the step registers it. Raised, it failed a job whose steps
                # all ran ("internal"), and with the database still refusing, the job's
                # failure could not be written either: it stayed running with no runner.
                logger.warning("registering checkpoint %s of job %s: %s", path, program.job_id, e)
                return
            attempt.registered.add(step)
        for old in self.store.retire_checkpoints(program.job_id, self.keep):
            remove_checkpoint(old.path)

    def writers(self, program: StepProgram, islands: Sequence[Island]) -> list[Island]:
        """The islands that write the job's checkpoints: island 0, or a pipeline's replica 0
        of every stage (each writes its own stage's part)."""
        chosen = [islands[i] for i in program.checkpoint_islands if i < len(islands)]
        return chosen or list(islands[:1])

    async def finish(self, attempt: Attempt, islands: Sequence[Island]) -> None:
        """Wait until the checkpoints in progress (the last step's) are committed on every
        writing island and register those that all of them committed."""
        if self.root is None or not islands:
            return
        program = attempt.program
        request = worker_pb2.SaveCheckpointRequest(
            job_id=program.job_id,
            generation=program.generation,
            epoch=self.dispatcher.epoch,
            wait=True,
        )
        writers = self.writers(program, islands)
        try:
            replies = await asyncio.gather(
                *(
                    island.call_host(
                        0, "SaveCheckpoint", request, timeout=FINAL_CHECKPOINT_TIMEOUT_S
                    )
                    for island in writers
                )
            )
        except grpc.aio.AioRpcError as e:
            logger.warning("final checkpoint of job %s: %s", program.job_id, e.details())
            # Told to its user too (a log line alone was all a failed final write left).
            with contextlib.suppress(StoreError, sqlite3.Error):
                self.store.add_event(
                    program.job_id,
                    "checkpoint",
                    f"The final checkpoint was not written: {e.details()[:500]}",
                )
            return
        self.on_step(attempt, _all_committed(replies), ending=True)

    async def checkpoint_now(self, attempt: Attempt, islands: Sequence[Island], step: int) -> bool:
        """Make sure a committed checkpoint holds the state after `step` applied steps (the
        job stopped there; a graceful controller stop): wait for the saves in progress, and
        write one when none of them is that step's. Every writing island (a pipeline's
        replica 0 of every stage) saves; a step counts once all of them committed it.
        Returns whether one is registered.

        Raises:
            grpc.aio.AioRpcError: a host could not save.
        """
        program = attempt.program
        restored = attempt.restored
        if step == program.start_step and restored is not None and restored.step == step:
            return True  # it stopped where its checkpoint put it: nothing new to save
        if self.root is None or not islands or step <= 0 or step < program.start_step:
            return False
        # An attempt that started from state not saved at its start step (adopted from the
        # hosts, or a peer's after an island died) saves it even with no step run since.
        writers = self.writers(program, islands)
        for save in (False, True):
            request = worker_pb2.SaveCheckpointRequest(
                job_id=program.job_id,
                generation=program.generation,
                epoch=self.dispatcher.epoch,
                save=save,
                wait=True,
            )
            # Every host of a writing island writes its own shards of a checkpoint.
            try:
                replies = await asyncio.gather(
                    *(
                        island.call("SaveCheckpoint", request, timeout=FINAL_CHECKPOINT_TIMEOUT_S)
                        for island in writers
                    )
                )
            except grpc.aio.AioRpcError as e:
                if save:
                    raise
                # A write in progress failed (a host tells it once): one is written afresh.
                # Before, the drain gave up here and the job resumed from an older one.
                logger.warning(
                    "job %s: %s; checkpointing step %d afresh", program.job_id, e.details(), step
                )
                continue
            self.on_step(attempt, _all_committed([r[0] for r in replies]))
            if step in attempt.registered:
                return True
        return False

    async def retry(
        self, record: JobRecord, attempt: Attempt | None, islands: Sequence[Island], error: Any
    ) -> bool:
        """Decide whether a failed attempt runs again; if so, roll back: abort the job's
        exchanges, restart dead islands, start a new generation. False: the job fails."""
        job_id = record.id
        failure = classify(error)
        message = getattr(error, "message", None) or str(error)
        if failure == FailureClass.USER:
            self.store.add_event(job_id, "failure", f"User error (not retried): {message[:1000]}")
            return False
        count = self.store.count_retry(job_id, failure.value)
        budget = self.budgets.get(failure, 0)
        if count > budget:
            self.store.add_event(
                job_id,
                "failure",
                f"{failure.value} failure, retry budget of {budget} spent: {message[:1000]}",
            )
            return False
        started = time.monotonic()
        if attempt is not None:
            await self.dispatcher.abort(
                job_id, attempt.program.generation, islands, f"{failure.value} failure"
            )
        # The generation each island is at before it is probed: a restart asked for by
        # another job (or a Ray death report) since then is not done twice.
        seen = {island.id: island.generation for island in islands}
        dead = await dead_islands(islands)
        self.store.add_event(
            job_id,
            "failure",
            f"{failure.value} failure (retry {count} of {budget}): {message[:1000]}"
            + (f" Island(s) {', '.join(dead)} lost." if dead else ""),
        )
        for island in islands:
            if island.id not in dead:
                continue
            if not island.restartable:
                logger.warning("island %s is lost and has no Ray group to restart", island.id)
                # A Ray-hosted island that cannot come back (Ray reported it, or the probe
                # found it before Ray's report did): lost, so the job goes elsewhere.
                if (island.dead or island.watched_actors()) and self.on_island_lost is not None:
                    self.on_island_lost(island, island.dead or "its hosts do not answer")
                continue
            try:
                await island.restart(seen[island.id])
            except Exception as e:  # its node is gone, or Ray cannot place it in time
                logger.warning("island %s is lost: %s", island.id, e)
                self.store.add_event(
                    job_id,
                    "island",
                    f"Island {island.id} is lost and could not be restarted ({e}); the job "
                    "runs again on islands with room.",
                )
                if self.on_island_lost is not None:
                    self.on_island_lost(island, str(e))
                continue
            self.store.add_event(job_id, "island", f"Island {island.id} restarted.")
        generation = self.store.bump_generation(job_id)
        logger.warning(
            "job %s rolls back after a %s failure (generation %d, %.1f s to recover islands)",
            job_id,
            failure.value,
            generation,
            time.monotonic() - started,
            extra={"job_id": job_id},
        )
        return True
