"""Job and checkpoint states, the job life cycle, and the errors client and server share.

A small module on purpose: the client (`pathways_lite.client`) imports it to name states, so it
imports nothing heavier than the generated protobuf enums (no SQLite, no JAX, no server code).
Job states follow `TRANSITIONS`; the store refuses any other change with
`IllegalTransitionError`.
"""

from __future__ import annotations

import enum

from pathways_lite.v1 import controller_pb2


class StoreError(Exception):
    """A job store operation that cannot be done; the message is a sentence for people."""


class JobNotFoundError(StoreError, LookupError):
    """No job has the given id (NOT_FOUND on the wire)."""


class AmbiguousJobError(StoreError, ValueError):
    """A job reference (name or id prefix) matches several jobs (INVALID_ARGUMENT); the
    message lists them."""


class StoreUnavailableError(StoreError):
    """The database could not be written now (locked past its timeout, disk full); what
    was to be written is kept for the next try."""


class RequestReusedError(StoreError):
    """A submission's request id names a job submitted with another spec (ALREADY_EXISTS):
    a retry sends the same spec again; a new submission needs a new request id."""


class IllegalTransitionError(StoreError):
    """A state change that the job life cycle does not allow (FAILED_PRECONDITION)."""


class JobState(enum.StrEnum):
    """A job's state, stored as its lowercase name."""

    QUEUED = "queued"
    RUNNING = "running"
    SUSPENDED = "suspended"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES

    def to_proto(self) -> controller_pb2.JobState.ValueType:
        """The wire enum value (JOB_STATE_QUEUED, ...)."""
        return controller_pb2.JobState.Value(f"JOB_STATE_{self.name}")

    @classmethod
    def from_proto(cls, value: int) -> JobState:
        """The state of a wire enum value.

        Raises:
            ValueError: the value is JOB_STATE_UNSPECIFIED or not a state at all.
        """
        try:
            name = controller_pb2.JobState.Name(value)
        except ValueError:
            raise ValueError(f"state={value!r} is not a job state.") from None
        if name == "JOB_STATE_UNSPECIFIED":
            raise ValueError("state=JOB_STATE_UNSPECIFIED is not a job state.")
        return cls[name.removeprefix("JOB_STATE_")]


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
# The job life cycle. Running -> queued is a requeue (a controller restart or a lost island
# before the job's first checkpoint); suspended jobs resume from their last checkpoint.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.FAILED, JobState.CANCELLED}),
    JobState.RUNNING: frozenset(
        {
            JobState.QUEUED,
            JobState.SUSPENDED,
            JobState.SUCCEEDED,
            JobState.FAILED,
            JobState.CANCELLED,
        }
    ),
    JobState.SUSPENDED: frozenset(
        {JobState.QUEUED, JobState.RUNNING, JobState.FAILED, JobState.CANCELLED}
    ),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


class CheckpointState(enum.StrEnum):
    """A registered checkpoint's state: only committed ones are ever restored."""

    COMMITTED = "committed"
    CORRUPT = "corrupt"  # failed to restore: skipped for the previous committed one
    DELETED = "deleted"  # dropped by retention
