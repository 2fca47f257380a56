"""A job's progress in the store: per-step metrics, the checkpoint registry, retry budgets.

`ProgressTables` is mixed into `JobStore` (controller/store.py) and works on its connection:
it uses the store's `_transaction()`, `_mutex`, `_conn`, `_clock_us`, `_require_job` and
`_insert_event`. Steps are recorded in order, one row per (job, step), and a retried step must
carry the same loss; only checkpoints that orbax finalised are registered, and retention marks
old ones deleted rather than forgetting them.
"""

from __future__ import annotations

import dataclasses
import math
import sqlite3
import threading
from collections.abc import Callable, Iterable

from .states import CheckpointState, StoreError


class MetricConflictError(StoreError):
    """A step's metrics were recorded before with a different loss, or out of order."""


@dataclasses.dataclass(frozen=True)
class MetricRow:
    """One row of the metrics table: one completed step of a job (the wire's StepMetrics is
    built from it in controller/views.py)."""

    job_id: str
    step: int
    loss: float
    tokens_per_s: float
    step_time_s: float
    time_us: int
    # Model FLOPs utilisation as measured when the step was recorded (None: not stored).
    mfu: float | None = None
    # A mixture step's per-source metrics as JSON (see schema.py); None for other jobs.
    sources: str | None = None


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One row of the checkpoint registry: the state of `job_id` after `step` steps."""

    job_id: str
    generation: int
    step: int
    path: str
    state: CheckpointState
    created_us: int


# ------------------------------------------------------------------------------------------
# The store
# ------------------------------------------------------------------------------------------


def _steps_recorded(conn: sqlite3.Connection, job_id: str) -> int:
    """How many steps of the job are recorded: its steps are 0, 1, ... without a gap (they
    are recorded in order and forgotten only from a step on), so the newest step + 1, one
    seek of the (job_id, step) key; COUNT(*) read every row of the job (4.8 ms at 200,000
    steps, on every batch of steps written)."""
    (last,) = conn.execute("SELECT MAX(step) FROM metrics WHERE job_id = ?", (job_id,)).fetchone()
    return 0 if last is None else int(last) + 1


class ProgressTables:
    """The metrics, checkpoints and retries tables of a `JobStore` (a mixin)."""

    # Provided by JobStore, with `_transaction()`, `_require_job()` and `_insert_event()`.
    _conn: sqlite3.Connection
    _mutex: threading.RLock
    _clock_us: Callable[[], int]
    # Told of each rollback (job id, step, metric rows forgotten: `truncate_metrics`) once
    # it is written (the controller's Reporter, which tells the job's followers).
    on_rollback: Callable[[str, int, int], None] | None

    # -- metrics -------------------------------------------------------------------------

    def record_metrics(
        self,
        job_id: str,
        step: int,
        loss: float,
        *,
        tokens_per_s: float = 0.0,
        step_time_s: float = 0.0,
        mfu: float | None = None,
        sources: str | None = None,
    ) -> bool:
        """Record a completed step. Steps are recorded in order, one row per (job, step).

        Recording a step again with the same loss is a no-op (a retried RunStep returns the
        recorded result), so this returns False; a different loss is a conflict.

        Returns:
            True when the row was inserted, False when the same step was already recorded.

        Raises:
            JobNotFoundError: no such job.
            ValueError: the loss is not finite, or step is negative.
            MetricConflictError: the step was recorded with another loss, or a step before
                it is missing.
        """
        if not math.isfinite(loss):
            raise ValueError(f"loss={loss!r} of step {step} is not finite.")
        if step < 0:
            raise ValueError(f"step={step} must be >= 0.")
        with self._transaction() as conn:
            self._require_job(conn, job_id)
            row = conn.execute(
                "SELECT loss FROM metrics WHERE job_id = ? AND step = ?", (job_id, step)
            ).fetchone()
            if row is not None:
                if row[0] == loss:
                    return False
                raise MetricConflictError(
                    f"step {step} of job {job_id!r} was recorded with loss {row[0]!r}, "
                    f"not {loss!r}."
                )
            count = _steps_recorded(conn, job_id)
            if step != count:
                raise MetricConflictError(
                    f"step {step} of job {job_id!r} arrived out of order: the next step to "
                    f"record is {count}."
                )
            conn.execute(
                "INSERT INTO metrics (job_id, step, loss, tokens_per_s, step_time_s, time_us, mfu,"
                " sources) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, step, loss, tokens_per_s, step_time_s, self._clock_us(), mfu, sources),
            )
        return True

    def record_metrics_batch(
        self,
        job_id: str,
        rows: list[tuple[int, float, float, float, float | None, str | None]],
    ) -> int:
        """Record consecutive completed steps in one transaction: `rows` of (step, loss,
        tokens_per_s, step_time_s, mfu, sources) in step order (the controller batches a slice's
        steps). Steps recorded before with the same loss are skipped (a replayed step), as
        in `record_metrics`; returns how many rows were inserted.

        Raises:
            JobNotFoundError: no such job.
            ValueError: a loss is not finite, or a step is negative.
            MetricConflictError: a step was recorded with another loss, or the steps are not
                consecutive from the next step to record.
        """
        if not rows:
            return 0
        for step, loss, *_ in rows:
            if not math.isfinite(loss):
                raise ValueError(f"loss={loss!r} of step {step} is not finite.")
            if step < 0:
                raise ValueError(f"step={step} must be >= 0.")
        with self._transaction() as conn:
            self._require_job(conn, job_id)
            first, last = rows[0][0], rows[-1][0]
            known = dict(
                conn.execute(
                    "SELECT step, loss FROM metrics WHERE job_id = ? AND step BETWEEN ? AND ?",
                    (job_id, first, last),
                ).fetchall()
            )
            count = _steps_recorded(conn, job_id)
            new = []
            for step, loss, tokens_per_s, step_time_s, mfu, sources in rows:
                if step in known:
                    if known[step] != loss:
                        raise MetricConflictError(
                            f"step {step} of job {job_id!r} was recorded with loss "
                            f"{known[step]!r}, not {loss!r}."
                        )
                    continue
                if step != count + len(new):
                    raise MetricConflictError(
                        f"step {step} of job {job_id!r} arrived out of order: the next step to "
                        f"record is {count + len(new)}."
                    )
                new.append(
                    (job_id, step, loss, tokens_per_s, step_time_s, self._clock_us(), mfu, sources)
                )
            conn.executemany(
                "INSERT INTO metrics (job_id, step, loss, tokens_per_s, step_time_s, time_us, mfu,"
                " sources) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                new,
            )
        return len(new)

    def truncate_metrics(self, job_id: str, from_step: int) -> int:
        """Forget the metrics of steps >= from_step (a rollback to a checkpoint), and the
        evaluations of parameters after more steps than from_step (they are evaluated again
        when the steps are run again); returns how many metric rows went."""
        with self._transaction() as conn:
            cur = conn.execute(
                "DELETE FROM metrics WHERE job_id = ? AND step >= ?", (job_id, from_step)
            )
            conn.execute("DELETE FROM evals WHERE job_id = ? AND step > ?", (job_id, from_step))
            # (Steps sent to followers before they were written went too: always noted.)
        if self.on_rollback is not None:
            self.on_rollback(job_id, from_step, cur.rowcount)
        return cur.rowcount

    def metrics(self, job_id: str, *, from_step: int = 0) -> list[MetricRow]:
        """A job's recorded steps >= from_step, in step order."""
        with self._mutex:
            rows = self._conn.execute(
                "SELECT job_id, step, loss, tokens_per_s, step_time_s, time_us, mfu, sources "
                "FROM metrics WHERE job_id = ? AND step >= ? ORDER BY step",
                (job_id, from_step),
            ).fetchall()
        return [MetricRow(*r) for r in rows]

    def losses(self, job_id: str) -> list[float]:
        """One loss per completed step, in step order."""
        with self._mutex:
            rows = self._conn.execute(
                "SELECT loss FROM metrics WHERE job_id = ? ORDER BY step", (job_id,)
            ).fetchall()
        return [r[0] for r in rows]

    def steps_completed(self, job_id: str) -> int:
        """How many steps of the job are recorded."""
        with self._mutex:
            return _steps_recorded(self._conn, job_id)

    # -- checkpoint registry and retry budgets ------------------------------------------

    def register_checkpoint(self, job_id: str, generation: int, step: int, path: str) -> bool:
        """Record a committed checkpoint (only after orbax finalised it) with a `checkpoint`
        event; registering it again is a no-op. Returns whether it was new.

        Raises:
            JobNotFoundError: no such job.
        """
        with self._transaction() as conn:
            self._require_job(conn, job_id)
            now = self._clock_us()
            cur = conn.execute(
                "INSERT OR IGNORE INTO checkpoints (job_id, generation, step, path, state, "
                "created_us, updated_us) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, generation, step, path, CheckpointState.COMMITTED.value, now, now),
            )
            if cur.rowcount == 0:
                return False
            self._insert_event(
                conn, job_id, now, "checkpoint", f"Checkpoint at step {step} committed ({path})."
            )
        return True

    def checkpoints(
        self, job_id: str, states: Iterable[CheckpointState] = (CheckpointState.COMMITTED,)
    ) -> list[Checkpoint]:
        """A job's registered checkpoints in the given states, oldest step first."""
        values = sorted({CheckpointState(s).value for s in states})
        if not values:
            return []
        with self._mutex:
            rows = self._conn.execute(
                "SELECT job_id, generation, step, path, state, created_us FROM checkpoints "
                f"WHERE job_id = ? AND state IN ({', '.join('?' * len(values))}) "
                "ORDER BY step, generation",
                (job_id, *values),
            ).fetchall()
        return [
            Checkpoint(r[0], int(r[1]), int(r[2]), r[3], CheckpointState(r[4]), r[5]) for r in rows
        ]

    def latest_checkpoint(self, job_id: str) -> Checkpoint | None:
        """The job's committed checkpoint of the most steps, or None."""
        committed = self.checkpoints(job_id)
        return committed[-1] if committed else None

    def restore_point(self, job_id: str, steps_completed: int) -> int:
        """Where a job found with fewer recorded steps than a follower was sent (by an
        earlier controller: the Reporter's `rolled_back` knows this one's) rolled back to:
        its newest committed checkpoint at most `steps_completed` steps in, else 0 (the
        steps a follower saw from there may have run again since)."""
        steps = [c.step for c in self.checkpoints(job_id) if c.step <= steps_completed]
        return steps[-1] if steps else 0

    def mark_checkpoint(
        self, checkpoint: Checkpoint, state: CheckpointState, message: str = ""
    ) -> None:
        """Change a checkpoint's state; with a message, also record a `warning` event."""
        with self._transaction() as conn:
            now = self._clock_us()
            conn.execute(
                "UPDATE checkpoints SET state = ?, updated_us = ? "
                "WHERE job_id = ? AND generation = ? AND step = ?",
                (
                    CheckpointState(state).value,
                    now,
                    checkpoint.job_id,
                    checkpoint.generation,
                    checkpoint.step,
                ),
            )
            if message:
                self._insert_event(conn, checkpoint.job_id, now, "warning", message)

    def retire_checkpoints(self, job_id: str, keep: int) -> list[Checkpoint]:
        """Retention: mark all but the newest `keep` committed checkpoints deleted; returns
        them (the caller removes their folders)."""
        if keep < 1:
            raise ValueError(f"keep={keep} must be at least 1.")
        old = self.checkpoints(job_id)[:-keep]
        for checkpoint in old:
            self.mark_checkpoint(checkpoint, CheckpointState.DELETED)
        return old

    def count_retry(self, job_id: str, failure_class: str) -> int:
        """Count one more retry of a failure class for a job; returns the count so far."""
        with self._transaction() as conn:
            self._require_job(conn, job_id)
            conn.execute(
                "INSERT INTO retries (job_id, failure_class, count) VALUES (?, ?, 1) "
                "ON CONFLICT (job_id, failure_class) DO UPDATE SET count = count + 1",
                (job_id, failure_class),
            )
            (count,) = conn.execute(
                "SELECT count FROM retries WHERE job_id = ? AND failure_class = ?",
                (job_id, failure_class),
            ).fetchone()
        return int(count)

    def retries(self, job_id: str) -> dict[str, int]:
        """Retries so far per failure class."""
        with self._mutex:
            rows = self._conn.execute(
                "SELECT failure_class, count FROM retries WHERE job_id = ?", (job_id,)
            ).fetchall()
        return {c: int(n) for c, n in rows}
