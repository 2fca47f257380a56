"""Views: the wire and dashboard representations of a job, each built in one place.

`job_record_proto` turns a stored job into its wire record (what the store knows: state, spec,
times, progress); `job_view` adds what only the controller knows (islands, queue position and
the jobs ahead, why it is pending, the latest step's metrics with MFU). `job_summary` turns
that finished wire record into the dashboard's JSON, so the dashboard shows what GetJob
answers; `step_point` is
one step as the dashboard's charts plot it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from google.protobuf import timestamp_pb2

from pathways_lite.v1 import controller_pb2

from . import spec as spec_lib
from .states import JobState
from .store import JobRecord, JobStore


def job_record_proto(
    store: JobStore, record: JobRecord, *, include_losses: bool = True
) -> controller_pb2.Job:
    """The wire record of a stored job (queue position and islands are the scheduler's to
    fill)."""
    job = controller_pb2.Job(
        id=record.id,
        name=record.name,
        state=record.state.to_proto(),
        reason=record.reason,
        message=record.message,
        generation=record.generation,
        steps_completed=store.steps_completed(record.id),
    )
    job.spec.CopyFrom(record.spec)
    if include_losses:
        job.losses.extend(store.losses(record.id))
    job.created_at.CopyFrom(_timestamp(record.created_us))
    job.updated_at.CopyFrom(_timestamp(record.updated_us))
    if record.started_us is not None:
        job.started_at.CopyFrom(_timestamp(record.started_us))
    if record.finished_us is not None:
        job.finished_at.CopyFrom(_timestamp(record.finished_us))
    return job


def job_view(
    store: JobStore,
    record: JobRecord,
    *,
    islands: Sequence[str],
    pending: Mapping[str, str],
    mfu: Callable[[JobRecord, float], float],
    queued: Sequence[JobRecord] | None = None,
    include_losses: bool = True,
) -> controller_pb2.Job:
    """The whole wire record of a job: the stored record and what the controller knows.

    Args:
        store: the job store.
        record: the job.
        islands: the islands the scheduler placed it on.
        pending: why each queued job waits (the scheduler's latest pass), by job id.
        mfu: the model FLOPs utilisation of a job at a throughput (tokens/s).
        queued: the queued jobs in scheduling order, when the caller builds many views at
            once (a page of jobs); None reads them from the store when the job is queued.
        include_losses: whether to carry every step's loss.
    """
    job = job_record_proto(store, record, include_losses=include_losses)
    job.islands.extend(islands)
    if record.state == JobState.QUEUED:
        if queued is None:
            queued = store.jobs_in_states([JobState.QUEUED])
        job.queue_position = 1 + next(
            (i for i, r in enumerate(queued) if r.id == record.id), len(queued)
        )
        job.jobs_ahead.extend(r.id for r in queued[: job.queue_position - 1])
        job.pending_reason = pending.get(record.id, "Waiting for the scheduler's next pass.")
    if job.steps_completed:
        (last,) = store.metrics(record.id, from_step=job.steps_completed - 1)[-1:]
        job.last_metrics.CopyFrom(
            controller_pb2.StepMetrics(
                step=last.step,
                loss=last.loss,
                tokens_per_s=last.tokens_per_s,
                step_time_s=last.step_time_s,
                time=_timestamp(last.time_us),
                mfu=mfu(record, last.tokens_per_s),
            )
        )
        job.mfu = job.last_metrics.mfu
    return job


def job_summary(job: controller_pb2.Job) -> dict[str, Any]:
    """One job as the dashboard's jobs list and job page show it, from its wire record.

    Times are seconds since the epoch (None when not reached); `loss`, `tokens_per_s` and
    `mfu` are the latest step's (None before the first step).
    """
    last = job.last_metrics if job.HasField("last_metrics") else None
    return {
        "id": job.id,
        "name": job.name,
        "state": JobState.from_proto(job.state).value,
        "steps_completed": job.steps_completed,
        "steps": job.spec.train.steps,
        "loss": None if last is None else _finite(last.loss),
        "tokens_per_s": None if last is None else last.tokens_per_s,
        "mfu": None if last is None else job.mfu,
        "priority": spec_lib.priority(job.spec),
        "weight": spec_lib.weight(job.spec),
        "queue_position": job.queue_position,
        "islands": list(job.islands),
        "model": job.spec.model.preset,
        "reason": job.reason,
        "message": job.message,
        "created": _seconds(job, "created_at"),
        "started": _seconds(job, "started_at"),
        "finished": _seconds(job, "finished_at"),
    }


def step_point(
    step: int, loss: float, tokens_per_s: float, time_s: float, mfu: float
) -> dict[str, Any]:
    """One completed step as the dashboard's charts plot it (a non-finite loss is None)."""
    return {
        "step": step,
        "loss": _finite(loss),
        "tokens_per_s": tokens_per_s,
        "mfu": mfu,
        "time": time_s,
    }


def _timestamp(us: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromMicroseconds(us)
    return ts


def _seconds(job: controller_pb2.Job, field: str) -> float | None:
    return getattr(job, field).ToMicroseconds() / 1e6 if job.HasField(field) else None


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
