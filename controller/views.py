"""Views: the wire and dashboard representations of a job, each built in one place.

`job_record_proto` turns a stored job into its wire record (what the store knows: state, spec,
times, progress); the controller adds what only it knows (islands, queue position, why it is
pending, the latest step's metrics and MFU). `job_summary` turns that finished wire record
into the dashboard's JSON, so the dashboard shows exactly what GetJob answers.
"""

from __future__ import annotations

import math
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


def _timestamp(us: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromMicroseconds(us)
    return ts


def _seconds(job: controller_pb2.Job, field: str) -> float | None:
    return getattr(job, field).ToMicroseconds() / 1e6 if job.HasField(field) else None


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
