"""Sampling: text from a job's parameters, on the islands that hold them or from a checkpoint.

A running job is sampled where it is resident: every host of its first island runs the same
SPMD decode and host 0 answers. An ended job is sampled from its newest committed checkpoint:
it is loaded on one island with room under a load key of its own (so it never meets a run of
the job), sampled, and unloaded again whatever happens.

A pipeline job (controller/pipeline.py) holds different blocks on different islands, so it is
always sampled from its newest committed checkpoint, running or ended: the whole model is
loaded on one island as a non-pipelined job that reads its parameters from the stage parts
(`<dir>/stage<s>/`, LoadJobRequest.restore_stage_bounds) and decodes as any job does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Mapping

import grpc

from pathways_lite.v1 import controller_pb2, worker_pb2
from pathways_lite.workers.rpc import RpcRejection

from . import spec as spec_lib
from .dispatch import Dispatcher, DispatchError
from .islands import Island
from .jobs import JobRunner
from .pipeline import flat_bounds, reading_stage_parts, whole_model_job
from .resolved import ResolvedJob, step_program
from .scheduler import Demand, Scheduler
from .states import IllegalTransitionError, JobState
from .store import JobRecord, JobStore

logger = logging.getLogger(__name__)

SAMPLE_TIMEOUT_S = 300.0
MAX_PROMPT_CHARS = 10_000
MAX_NEW_TOKENS = 1024


class NoRoomError(RuntimeError):
    """What a request needs does not fit on any island now (RESOURCE_EXHAUSTED)."""


def sample_request(request: controller_pb2.SampleJobRequest) -> worker_pb2.SampleRequest:
    """The hosts' SampleRequest for a user's request, checked at the boundary.

    Raises:
        ValueError: a bad prompt or setting, named with its value.
    """
    if not request.prompt:
        raise ValueError("prompt is empty; give some text to continue.")
    if len(request.prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"prompt is {len(request.prompt)} characters; at most {MAX_PROMPT_CHARS}.")
    max_new = request.max_new_tokens or 64
    if not 1 <= max_new <= MAX_NEW_TOKENS:
        raise ValueError(
            f"max_new_tokens={request.max_new_tokens} must be in [0, {MAX_NEW_TOKENS}]."
        )
    if not 0 <= request.temperature <= 10:
        raise ValueError(f"temperature={request.temperature} must be in [0, 10].")
    if request.top_k < 0:
        raise ValueError(f"top_k={request.top_k} must be >= 0.")
    return worker_pb2.SampleRequest(
        job_id=request.job_id,
        prompt=request.prompt,
        max_new_tokens=max_new,
        temperature=request.temperature,
        top_k=request.top_k,
        seed=request.seed,
    )


class Sampler:
    """Answers SampleJob requests.

    Args:
        store, scheduler, dispatcher: the controller's.
        islands: the islands by id.
        runners: the jobs placed on islands, by id.
        resolve: a job's ResolvedJob.
        prepare: prepares a resolved job's dataset (blocking).
        wake: asks the scheduler for another pass (after a sampling load frees its island).
    """

    def __init__(
        self,
        store: JobStore,
        scheduler: Scheduler,
        dispatcher: Dispatcher,
        islands: Mapping[str, Island],
        runners: Mapping[str, JobRunner],
        resolve: Callable[[JobRecord], ResolvedJob | None],
        prepare: Callable[[JobRecord, ResolvedJob], ResolvedJob],
        wake: Callable[[], None],
    ) -> None:
        self.store = store
        self.scheduler = scheduler
        self.dispatcher = dispatcher
        self.islands = islands
        self.runners = runners
        self._resolve = resolve
        self._prepare = prepare
        self._wake = wake
        # Checkpoint loads made to sample ended jobs (each gets a load key of its own).
        self._loads = 0

    async def sample(
        self, request: controller_pb2.SampleJobRequest
    ) -> controller_pb2.SampleJobReply:
        """Generate from a job's current parameters (or its newest checkpoint once ended, and
        always for a pipeline job).

        Raises:
            JobNotFoundError; IllegalTransitionError when the job holds no parameters;
            ValueError for a bad prompt or setting; NoRoomError.
        """
        record = self.store.get_job(request.job_id)
        wire = sample_request(request)
        wire.job_id = record.id
        if record.state.terminal or spec_lib.pipeline_settings(record.spec) is not None:
            return await self._sample_checkpoint(record, request, wire)
        runner = self.runners.get(record.id)
        if runner is None or not runner.loaded:
            if record.state == JobState.RUNNING:
                why = f"job {record.id!r} is still loading onto its islands; try again shortly."
            else:
                why = (
                    f"job {record.id!r} is {record.state.value}: it holds no parameters until "
                    "it runs."
                )
            raise IllegalTransitionError(why)
        island = self.islands[runner.islands[0]]
        reply = await self._sample_on(island, record.id, wire)
        return _answer(record, request, island, reply)

    async def _sample_on(
        self, island: Island, job_id: str, wire: worker_pb2.SampleRequest
    ) -> worker_pb2.SampleReply:
        """The Sample rpc on every host of `island` (host 0's reply), errors mapped for users."""
        try:
            replies = await island.call("Sample", wire, timeout=SAMPLE_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise ValueError(e.details()) from None
            if e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                raise IllegalTransitionError(
                    f"job {job_id!r} cannot be sampled now: {e.details()}"
                ) from None
            # The host's status (UNAVAILABLE: the island died; DEADLINE_EXCEEDED;
            # RESOURCE_EXHAUSTED), not INTERNAL with the error's repr: the caller can tell
            # whether to try again.
            raise RpcRejection(
                e.code(), f"sampling job {job_id!r} on island {island.id} failed: {e.details()}"
            ) from None
        except asyncio.CancelledError:
            # Its channel closed under it as the island died (`Island.call_host`).
            task = asyncio.current_task()
            if task is not None and task.cancelling() == 0 and island.dead is not None:
                raise RpcRejection(
                    grpc.StatusCode.UNAVAILABLE,
                    f"island {island.id} died while it sampled job {job_id!r}.",
                ) from None
            raise
        return replies[0]

    async def _sample_checkpoint(
        self,
        record: JobRecord,
        request: controller_pb2.SampleJobRequest,
        wire: worker_pb2.SampleRequest,
    ) -> controller_pb2.SampleJobReply:
        """Sample an ended job (or any pipeline job) from its newest committed checkpoint:
        load it on one island with room (under a load key of its own, so it never meets a run
        of the job; a pipeline job's whole model read from its stage parts), run Sample, and
        unload it again whatever happens.

        Raises:
            IllegalTransitionError: the job has no committed checkpoint, or the checkpoint
                cannot be loaded.
            NoRoomError: no island has room for it now.
        """
        pipe = spec_lib.pipeline_settings(record.spec)
        checkpoint = self.store.latest_checkpoint(record.id)
        if checkpoint is None and not record.state.terminal:  # a pipeline job
            raise IllegalTransitionError(
                f"job {record.id!r} is a pipeline (pipeline.stages={pipe.stages}) and "
                f"{record.state.value}: it is sampled from its newest committed checkpoint, "
                "and it has committed none yet (train.checkpoint_every sets how often)."
            )
        if checkpoint is None:
            raise IllegalTransitionError(
                f"job {record.id!r} has ended ({record.state.value}) without a committed "
                "checkpoint, so no parameters of it remain to sample from."
            )
        job = self._resolve(record)
        if job is None:
            raise IllegalTransitionError(f"job {record.id!r}'s spec no longer resolves.")
        if pipe is not None:  # the whole model on one island, read from the stage parts
            job = whole_model_job(job)
        self._loads += 1
        key = f"{record.id[:100]}.sample-{self._loads}"
        devices = record.spec.mesh.data * record.spec.mesh.model
        demand = Demand(key, 1, job.bytes_per_device, record.priority)
        whole = " (the whole model, on one island)" if pipe is not None else ""
        never = self.scheduler.never_fits(1, demand.bytes_per_device)
        if never is not None:  # not "try again later": it never will
            raise IllegalTransitionError(
                f"job {record.id!r}: sampling its checkpoint{whole} at step {checkpoint.step} "
                f"can never run: {never} It is loaded with its training state (a pipeline "
                "job's whole model on one island, which its stages split to fit)."
            )
        room = [i for i in self.scheduler.candidates(demand) if self.islands[i].devices == devices]
        if not room or self.scheduler.place(demand, room[:1]) is None:
            raise NoRoomError(
                f"job {record.id!r} is {record.state.value}; sampling its checkpoint{whole} "
                f"at step {checkpoint.step} needs {demand.bytes_per_device} bytes per device on "
                f"an island of {devices} devices, and none has room now; try again later."
            )
        island = self.islands[room[0]]
        try:
            job = await asyncio.to_thread(self._prepare, record, job)
            logger.info(
                "loading job %s's checkpoint at step %d on %s to sample it",
                record.id,
                checkpoint.step,
                island.id,
                extra={"job_id": record.id},
            )
            # Reads the checkpoint, writes none.
            program = step_program(key, record.generation, job)
            if pipe is not None:
                bounds = flat_bounds(job.configs.model, pipe.stages)
                program = dataclasses.replace(
                    program, load=reading_stage_parts(program.load, bounds)
                )
            try:
                await self.dispatcher.load(
                    dataclasses.replace(program, restore_from=checkpoint.path), [island]
                )
            except DispatchError as e:
                raise IllegalTransitionError(
                    f"job {record.id!r}'s checkpoint at step {checkpoint.step} "
                    f"({checkpoint.path}) could not be loaded for sampling: {e.message}"
                ) from None
            wire.job_id = key
            reply = await self._sample_on(island, record.id, wire)
        finally:
            await self.dispatcher.unload(key, [island])
            self.scheduler.release(key)
            self._wake()
        return _answer(record, request, island, reply, checkpoint.path)


def _answer(
    record: JobRecord,
    request: controller_pb2.SampleJobRequest,
    island: Island,
    reply: worker_pb2.SampleReply,
    checkpoint: str = "",
) -> controller_pb2.SampleJobReply:
    """The user's answer: host 0's text, where it ran, and the checkpoint it came from."""
    return controller_pb2.SampleJobReply(
        job_id=record.id,
        prompt=request.prompt,
        text=reply.text,
        steps_applied=reply.steps_applied,
        island=island.id,
        seconds=reply.seconds,
        checkpoint=checkpoint,
    )
