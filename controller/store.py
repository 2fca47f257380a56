"""The controller's job store: jobs, events and metrics in SQLite, in a locked state directory.

One controller process owns a state directory. It holds an exclusive `fcntl.flock` on
`<state_dir>/controller.lock` for its whole life (a second controller gets a clear error), and
every start bumps the epoch stored in the database; the epoch is carried in every worker RPC,
so hosts can reject steps still in flight from a previous controller.

The database (`<state_dir>/controller.db`, WAL mode) also holds the checkpoint registry
(only committed checkpoints are registered) and per-job retry counts of failure classes. It is
versioned: `schema_version` holds the version, and `MIGRATIONS[i]` takes a database from
version i to i + 1, each in one transaction.
Job states follow `TRANSITIONS`; any other transition raises `IllegalTransitionError`. Times
are integer microseconds since the epoch (UTC); job creation times are strictly increasing, so
(created, id) orders jobs by submission and is the key of ListJobs' keyset pagination.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import enum
import fcntl
import logging
import math
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from google.protobuf import timestamp_pb2

from pathways_lite.v1 import controller_pb2

from . import spec as spec_lib

logger = logging.getLogger(__name__)

DB_NAME = "controller.db"
LOCK_NAME = "controller.lock"
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class StoreError(Exception):
    """A job store operation that cannot be done; the message is a sentence for people."""


class StateDirLockedError(StoreError):
    """Another process holds the state directory's lock."""


class SchemaVersionError(StoreError):
    """The database was written by a newer pathways_lite than this one."""


class JobNotFoundError(StoreError, LookupError):
    """No job has the given id (NOT_FOUND on the wire)."""


class IllegalTransitionError(StoreError):
    """A state change that the job life cycle does not allow (FAILED_PRECONDITION)."""


class MetricConflictError(StoreError):
    """A step's metrics were recorded before with a different loss, or out of order."""


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


@dataclasses.dataclass(frozen=True)
class JobRecord:
    """One row of the jobs table.

    Attributes:
        id: the job's id.
        name: the spec's name.
        spec: the spec as submitted.
        state: the current state.
        priority: scheduling priority (higher first).
        weight: fair-share weight.
        created_us: submission time, microseconds since the epoch; strictly increasing.
        updated_us: time of the latest change.
        started_us: first time the job ran, or None.
        finished_us: time it reached a terminal state, or None.
        reason: short machine-readable cause of the latest transition.
        message: a sentence explaining the latest transition.
        generation: bumped at every restart from a checkpoint.
        request_id: the submission's idempotency key, or None.
    """

    id: str
    name: str
    spec: controller_pb2.JobSpec
    state: JobState
    priority: int
    weight: float
    created_us: int
    updated_us: int
    started_us: int | None
    finished_us: int | None
    reason: str
    message: str
    generation: int
    request_id: str | None


@dataclasses.dataclass(frozen=True)
class Event:
    """Something that happened to a job; `id` increases with time across all jobs."""

    id: int
    job_id: str
    time_us: int
    kind: str
    message: str


@dataclasses.dataclass(frozen=True)
class StepMetrics:
    """The metrics of one completed step of a job."""

    job_id: str
    step: int
    loss: float
    tokens_per_s: float
    step_time_s: float
    time_us: int


class CheckpointState(enum.StrEnum):
    """A registered checkpoint's state: only committed ones are ever restored."""

    COMMITTED = "committed"
    CORRUPT = "corrupt"  # failed to restore: skipped for the previous committed one
    DELETED = "deleted"  # dropped by retention


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
# Schema
# ------------------------------------------------------------------------------------------

_STATES_SQL = ", ".join(f"'{s.value}'" for s in JobState)
_CHECKPOINT_STATES_SQL = ", ".join(f"'{s.value}'" for s in CheckpointState)

# MIGRATIONS[i] takes the schema from version i to i + 1. Append; never edit a released one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE controller (
            key TEXT PRIMARY KEY,
            value INTEGER NOT NULL
        )""",
        f"""CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            spec BLOB NOT NULL,
            state TEXT NOT NULL CHECK (state IN ({_STATES_SQL})),
            priority INTEGER NOT NULL,
            weight REAL NOT NULL,
            created_us INTEGER NOT NULL,
            updated_us INTEGER NOT NULL,
            started_us INTEGER,
            finished_us INTEGER,
            reason TEXT NOT NULL DEFAULT '',
            message TEXT NOT NULL DEFAULT '',
            generation INTEGER NOT NULL DEFAULT 0,
            request_id TEXT UNIQUE
        )""",
        "CREATE UNIQUE INDEX jobs_by_created ON jobs (created_us, id)",
        "CREATE INDEX jobs_by_state ON jobs (state, priority DESC, created_us, id)",
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            time_us INTEGER NOT NULL,
            kind TEXT NOT NULL,
            message TEXT NOT NULL
        )""",
        "CREATE INDEX events_by_job ON events (job_id, id)",
        """CREATE TABLE metrics (
            job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            step INTEGER NOT NULL CHECK (step >= 0),
            loss REAL NOT NULL,
            tokens_per_s REAL NOT NULL,
            step_time_s REAL NOT NULL,
            time_us INTEGER NOT NULL,
            PRIMARY KEY (job_id, step)
        )""",
    ),
    # 1 -> 2: the checkpoint registry and the retry budgets of failure classes (issue 8).
    (
        f"""CREATE TABLE checkpoints (
            job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            generation INTEGER NOT NULL CHECK (generation >= 0),
            step INTEGER NOT NULL CHECK (step >= 0),
            path TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ({_CHECKPOINT_STATES_SQL})),
            created_us INTEGER NOT NULL,
            updated_us INTEGER NOT NULL,
            PRIMARY KEY (job_id, generation, step)
        )""",
        "CREATE INDEX checkpoints_by_job ON checkpoints (job_id, state, step)",
        """CREATE TABLE retries (
            job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            failure_class TEXT NOT NULL,
            count INTEGER NOT NULL,
            PRIMARY KEY (job_id, failure_class)
        )""",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(conn: sqlite3.Connection) -> int:
    """The database's schema version; 0 for an empty database."""
    row = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    ).fetchone()
    if row is None:
        return 0
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    return 0 if row is None else int(row[0])


def migrate(
    conn: sqlite3.Connection, migrations: Sequence[Sequence[str]] = MIGRATIONS
) -> tuple[int, int]:
    """Bring a database to the newest schema, one transaction per migration.

    Args:
        conn: a connection in autocommit mode (isolation_level=None).
        migrations: migrations[i] holds the statements from version i to i + 1.

    Returns:
        (version before, version after).

    Raises:
        SchemaVersionError: the database is newer than the migrations know.
    """
    before = schema_version(conn)
    if before > len(migrations):
        raise SchemaVersionError(
            f"the job database has schema version {before}, newer than this pathways_lite's "
            f"{len(migrations)}; upgrade pathways_lite or use another --state-dir."
        )
    for version in range(before, len(migrations)):
        conn.execute("BEGIN IMMEDIATE")
        try:
            if version == 0:
                conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            for statement in migrations[version]:
                conn.execute(statement)
            conn.execute("DELETE FROM schema_version")
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version + 1,))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        logger.info("job database migrated to schema version %d", version + 1)
    return before, len(migrations)


# ------------------------------------------------------------------------------------------
# The state directory's lock
# ------------------------------------------------------------------------------------------


class StateDirLock:
    """An exclusive flock on `<state_dir>/controller.lock`, holding this process's pid.

    The lock belongs to the open file: it is released by `release()`, or by the kernel when the
    process dies, so a crashed controller never leaves a stale lock behind.
    """

    def __init__(self, state_dir: str | Path):
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock without waiting.

        Raises:
            StateDirLockedError: another process (or another StateDirLock) holds it.
        """
        if self._fd is not None:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise StateDirLockedError(
                f"state directory {str(self.state_dir)!r} is locked by another controller "
                f"(pid {holder}); stop it first or choose another --state-dir."
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd

    def release(self) -> None:
        """Give the lock up (the pid stays in the file for diagnostics; harmless)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> StateDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# ------------------------------------------------------------------------------------------
# The store
# ------------------------------------------------------------------------------------------


def _now_us() -> int:
    return time.time_ns() // 1000


class JobStore:
    """Jobs, events and metrics in SQLite; safe to share between threads of one process.

    Use `JobStore.open_controller(state_dir)` in the controller: it locks the directory,
    migrates the database and bumps the epoch. `JobStore(path)` alone opens a database without
    lock or epoch (tools, tests).

    Args:
        path: the database file.
        clock_us: the clock, microseconds since the epoch (tests pass a fake one).
    """

    def __init__(self, path: str | Path, *, clock_us: Callable[[], int] = _now_us):
        self.path = Path(path)
        self._clock_us = clock_us
        self._mutex = threading.RLock()
        self._lock: StateDirLock | None = None
        self._epoch = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
        self._conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=10.0
        )
        try:
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = NORMAL")
            self._conn.execute("PRAGMA foreign_keys = ON")
            migrate(self._conn)
        except BaseException:
            self._conn.close()
            raise

    @classmethod
    def open_controller(cls, state_dir: str | Path, **kwargs) -> JobStore:
        """Lock `state_dir`, open its database and start a new epoch.

        Raises:
            StateDirLockedError: another controller holds the state directory.
            SchemaVersionError: the database is newer than this code.
        """
        lock = StateDirLock(state_dir)
        lock.acquire()
        try:
            store = cls(Path(state_dir) / DB_NAME, **kwargs)
        except BaseException:
            lock.release()
            raise
        store._lock = lock
        store.bump_epoch()
        logger.info("controller state %s opened at epoch %d", state_dir, store.epoch)
        return store

    def close(self) -> None:
        """Close the database and release the state directory's lock."""
        with self._mutex:
            self._conn.close()
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._mutex:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    # -- epoch ---------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """This controller run's epoch (0 until `bump_epoch`)."""
        return self._epoch

    def stored_epoch(self) -> int:
        """The newest epoch recorded in the database (0 if none)."""
        with self._mutex:
            row = self._conn.execute("SELECT value FROM controller WHERE key = 'epoch'").fetchone()
        return 0 if row is None else int(row[0])

    def bump_epoch(self) -> int:
        """Start a new epoch: one more than any recorded before; returns it."""
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO controller (key, value) VALUES ('epoch', 1) "
                "ON CONFLICT (key) DO UPDATE SET value = value + 1"
            )
            (epoch,) = conn.execute("SELECT value FROM controller WHERE key = 'epoch'").fetchone()
        self._epoch = int(epoch)
        return self._epoch

    # -- jobs ----------------------------------------------------------------------------

    def create_job(
        self,
        spec: controller_pb2.JobSpec,
        *,
        job_id: str | None = None,
        request_id: str | None = None,
    ) -> JobRecord:
        """Record a new queued job (the spec must already be validated).

        Args:
            spec: the job's spec.
            job_id: the id to use; None picks `<name>-<8 hex digits>`.
            request_id: an idempotency key; when a job with it exists, that job is returned.

        Raises:
            ValueError: job_id is not 1-128 characters of [A-Za-z0-9._-].
            StoreError: job_id is taken.
        """
        if job_id is not None and not _JOB_ID_PATTERN.fullmatch(job_id):
            raise ValueError(
                f"job_id={spec_lib.quote(job_id)} must be 1-128 characters of letters, digits, "
                "'.', '_' or '-'."
            )
        blob = spec.SerializeToString(deterministic=True)
        with self._transaction() as conn:
            if request_id:
                row = conn.execute(
                    f"SELECT {_JOB_COLUMNS} FROM jobs WHERE request_id = ?", (request_id,)
                ).fetchone()
                if row is not None:
                    return _job_from_row(row)
            (last,) = conn.execute("SELECT MAX(created_us) FROM jobs").fetchone()
            now = max(self._clock_us(), (last or 0) + 1)  # strictly increasing
            for _ in range(8):
                new_id = job_id or f"{spec.name or 'job'}-{secrets.token_hex(4)}"
                if conn.execute("SELECT 1 FROM jobs WHERE id = ?", (new_id,)).fetchone() is None:
                    break
                if job_id is not None:
                    raise StoreError(f"job_id={job_id!r} is already taken.")
            else:  # pragma: no cover (eight random collisions in a row)
                raise StoreError("could not find a free job id.")
            conn.execute(
                "INSERT INTO jobs (id, name, spec, state, priority, weight, created_us, "
                "updated_us, request_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    new_id,
                    spec.name,
                    blob,
                    JobState.QUEUED.value,
                    spec_lib.priority(spec),
                    spec_lib.weight(spec),
                    now,
                    now,
                    request_id or None,
                ),
            )
            self._insert_event(conn, new_id, now, "state", "Job queued.")
            row = conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (new_id,))
            return _job_from_row(row.fetchone())

    def get_job(self, job_id: str) -> JobRecord:
        """One job by id.

        Raises:
            JobNotFoundError: no job has this id.
        """
        with self._mutex:
            row = self._conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
        if row is None:
            raise JobNotFoundError(f"job {spec_lib.quote(job_id)} does not exist.")
        return _job_from_row(row)

    def list_jobs(
        self,
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
        states: Iterable[JobState] = (),
        newest_first: bool = False,
    ) -> tuple[list[JobRecord], str]:
        """A page of jobs in creation order, with the token of the next page ("" at the end).

        Keyset pagination: the token holds the (created, id) of the page's last job, so pages
        stay consistent while jobs are added; `newest_first` walks the same index backwards
        (the dashboard's history).

        Raises:
            ValueError: page_size is negative, or page_token was not issued by this store.
        """
        if page_size < 0:
            raise ValueError(f"page_size={page_size} must be >= 0 (0: the default).")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        where, args = [], []
        if page_token:
            created, last_id = _decode_token(page_token)
            where.append(f"(created_us, id) {'<' if newest_first else '>'} (?, ?)")
            args += [created, last_id]
        state_values = sorted({JobState(s).value for s in states})
        if state_values:
            where.append(f"state IN ({', '.join('?' * len(state_values))})")
            args += state_values
        sql = f"SELECT {_JOB_COLUMNS} FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        order = "DESC" if newest_first else ""
        sql += f" ORDER BY created_us {order}, id {order} LIMIT ?"
        with self._mutex:
            rows = self._conn.execute(sql, (*args, size + 1)).fetchall()
        jobs = [_job_from_row(r) for r in rows[:size]]
        token = _encode_token(jobs[-1].created_us, jobs[-1].id) if len(rows) > size else ""
        return jobs, token

    def count_by_state(self) -> dict[JobState, int]:
        """How many jobs are in each state (every state present, zeros included)."""
        with self._mutex:
            rows = self._conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        counts = dict.fromkeys(JobState, 0)
        counts.update({JobState(s): int(n) for s, n in rows})
        return counts

    def prune_finished(self, created_before_us: int) -> int:
        """Delete finished jobs (succeeded, failed, cancelled) submitted before a time, with
        their events and metrics: the history retention. Returns how many jobs went."""
        terminal = sorted(s.value for s in TERMINAL_STATES)
        with self._transaction() as conn:
            cur = conn.execute(
                f"DELETE FROM jobs WHERE created_us < ? AND state IN "
                f"({', '.join('?' * len(terminal))})",
                (created_before_us, *terminal),
            )
        return cur.rowcount

    def jobs_in_states(self, states: Iterable[JobState]) -> list[JobRecord]:
        """Every job in one of `states`, in scheduling order (priority, then submission)."""
        values = sorted({JobState(s).value for s in states})
        if not values:
            return []
        with self._mutex:
            rows = self._conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state IN ({', '.join('?' * len(values))})"
                " ORDER BY priority DESC, created_us, id",
                values,
            ).fetchall()
        return [_job_from_row(r) for r in rows]

    def transition(
        self,
        job_id: str,
        state: JobState,
        *,
        reason: str = "",
        message: str = "",
        expected: JobState | None = None,
    ) -> JobRecord:
        """Move a job to `state` and record a `state` event, in one transaction.

        Args:
            job_id: the job.
            state: the new state.
            reason: a short machine-readable cause (`user_cancelled`, `nan_loss`...).
            message: a sentence for people.
            expected: if given, the job must currently be in this state.

        Raises:
            JobNotFoundError: no such job.
            IllegalTransitionError: the life cycle does not allow it (or `expected` differs).
        """
        state = JobState(state)
        with self._transaction() as conn:
            row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFoundError(f"job {spec_lib.quote(job_id)} does not exist.")
            current = JobState(row[0])
            if expected is not None and current != expected:
                raise IllegalTransitionError(
                    f"job {job_id!r} is {current.value}, not {JobState(expected).value}."
                )
            if state not in TRANSITIONS[current]:
                allowed = ", ".join(sorted(s.value for s in TRANSITIONS[current])) or "none"
                raise IllegalTransitionError(
                    f"job {job_id!r} cannot go from {current.value} to {state.value} "
                    f"(allowed: {allowed})."
                )
            now = self._clock_us()
            conn.execute(
                "UPDATE jobs SET state = ?, updated_us = ?, reason = ?, message = ?, "
                "started_us = CASE WHEN ? AND started_us IS NULL THEN ? ELSE started_us END, "
                "finished_us = CASE WHEN ? THEN ? ELSE finished_us END WHERE id = ?",
                (
                    state.value,
                    now,
                    reason,
                    message,
                    state == JobState.RUNNING,
                    now,
                    state.terminal,
                    now,
                    job_id,
                ),
            )
            text = f"Job {state.value}" + (f" ({reason})" if reason else "") + "."
            if message:
                text += f" {message}"
            self._insert_event(conn, job_id, now, "state", text)
            row = conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
            return _job_from_row(row.fetchone())

    def set_priority(self, job_id: str, priority: int) -> JobRecord:
        """Re-prioritise a job that has not ended (its record and its spec), with an event.

        Raises:
            JobNotFoundError: no such job.
            IllegalTransitionError: the job already ended.
        """
        with self._transaction() as conn:
            row = conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
            if row is None:
                raise JobNotFoundError(f"job {spec_lib.quote(job_id)} does not exist.")
            record = _job_from_row(row)
            if record.state.terminal:
                raise IllegalTransitionError(
                    f"job {job_id!r} is already {record.state.value}; only queued, running or "
                    "suspended jobs can be re-prioritised."
                )
            spec = record.spec
            spec.priority = int(priority)
            now = self._clock_us()
            conn.execute(
                "UPDATE jobs SET priority = ?, spec = ?, updated_us = ? WHERE id = ?",
                (int(priority), spec.SerializeToString(deterministic=True), now, job_id),
            )
            self._insert_event(
                conn, job_id, now, "priority", f"Priority {record.priority} -> {int(priority)}."
            )
            row = conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
            return _job_from_row(row.fetchone())

    def bump_generation(self, job_id: str) -> int:
        """Start a new generation of a job (a restart from a checkpoint); returns it.

        Raises:
            JobNotFoundError: no such job.
        """
        with self._transaction() as conn:
            cur = conn.execute(
                "UPDATE jobs SET generation = generation + 1, updated_us = ? WHERE id = ?",
                (self._clock_us(), job_id),
            )
            if cur.rowcount == 0:
                raise JobNotFoundError(f"job {spec_lib.quote(job_id)} does not exist.")
            (generation,) = conn.execute(
                "SELECT generation FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
        return int(generation)

    # -- events --------------------------------------------------------------------------

    def add_event(self, job_id: str, kind: str, message: str) -> Event:
        """Record an event of a job.

        Raises:
            JobNotFoundError: no such job.
        """
        with self._transaction() as conn:
            self._require_job(conn, job_id)
            return self._insert_event(conn, job_id, self._clock_us(), kind, message)

    def events(self, job_id: str, *, after_id: int = 0, limit: int | None = None) -> list[Event]:
        """A job's events in the order they happened, those with id > after_id."""
        sql = "SELECT id, job_id, time_us, kind, message FROM events WHERE job_id = ? AND id > ?"
        sql += " ORDER BY id"
        args: tuple = (job_id, after_id)
        if limit is not None:
            sql += " LIMIT ?"
            args += (limit,)
        with self._mutex:
            rows = self._conn.execute(sql, args).fetchall()
        return [Event(*r) for r in rows]

    def _insert_event(
        self, conn: sqlite3.Connection, job_id: str, time_us: int, kind: str, message: str
    ) -> Event:
        cur = conn.execute(
            "INSERT INTO events (job_id, time_us, kind, message) VALUES (?, ?, ?, ?)",
            (job_id, time_us, kind, message),
        )
        return Event(int(cur.lastrowid), job_id, time_us, kind, message)

    @staticmethod
    def _require_job(conn: sqlite3.Connection, job_id: str) -> None:
        if conn.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is None:
            raise JobNotFoundError(f"job {spec_lib.quote(job_id)} does not exist.")

    # -- metrics -------------------------------------------------------------------------

    def record_metrics(
        self,
        job_id: str,
        step: int,
        loss: float,
        *,
        tokens_per_s: float = 0.0,
        step_time_s: float = 0.0,
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
            (count,) = conn.execute(
                "SELECT COUNT(*) FROM metrics WHERE job_id = ?", (job_id,)
            ).fetchone()
            if step != count:
                raise MetricConflictError(
                    f"step {step} of job {job_id!r} arrived out of order: the next step to "
                    f"record is {count}."
                )
            conn.execute(
                "INSERT INTO metrics (job_id, step, loss, tokens_per_s, step_time_s, time_us) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, step, loss, tokens_per_s, step_time_s, self._clock_us()),
            )
        return True

    def truncate_metrics(self, job_id: str, from_step: int) -> int:
        """Forget the metrics of steps >= from_step (a rollback to a checkpoint); returns how
        many rows went."""
        with self._transaction() as conn:
            cur = conn.execute(
                "DELETE FROM metrics WHERE job_id = ? AND step >= ?", (job_id, from_step)
            )
        return cur.rowcount

    def metrics(self, job_id: str, *, from_step: int = 0) -> list[StepMetrics]:
        """A job's recorded steps >= from_step, in step order."""
        with self._mutex:
            rows = self._conn.execute(
                "SELECT job_id, step, loss, tokens_per_s, step_time_s, time_us FROM metrics "
                "WHERE job_id = ? AND step >= ? ORDER BY step",
                (job_id, from_step),
            ).fetchall()
        return [StepMetrics(*r) for r in rows]

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
            (count,) = self._conn.execute(
                "SELECT COUNT(*) FROM metrics WHERE job_id = ?", (job_id,)
            ).fetchone()
        return int(count)

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

    # -- wire ----------------------------------------------------------------------------

    def job_proto(self, record: JobRecord, *, include_losses: bool = True) -> controller_pb2.Job:
        """The wire record of a job (queue position and islands are the scheduler's to fill)."""
        job = controller_pb2.Job(
            id=record.id,
            name=record.name,
            state=record.state.to_proto(),
            reason=record.reason,
            message=record.message,
            generation=record.generation,
            steps_completed=self.steps_completed(record.id),
        )
        job.spec.CopyFrom(record.spec)
        if include_losses:
            job.losses.extend(self.losses(record.id))
        job.created_at.CopyFrom(_timestamp(record.created_us))
        job.updated_at.CopyFrom(_timestamp(record.updated_us))
        if record.started_us is not None:
            job.started_at.CopyFrom(_timestamp(record.started_us))
        if record.finished_us is not None:
            job.finished_at.CopyFrom(_timestamp(record.finished_us))
        return job


_JOB_COLUMNS = (
    "id, name, spec, state, priority, weight, created_us, updated_us, started_us, "
    "finished_us, reason, message, generation, request_id"
)


def _job_from_row(row: tuple) -> JobRecord:
    spec = controller_pb2.JobSpec()
    spec.ParseFromString(row[2])
    return JobRecord(
        id=row[0],
        name=row[1],
        spec=spec,
        state=JobState(row[3]),
        priority=int(row[4]),
        weight=float(row[5]),
        created_us=int(row[6]),
        updated_us=int(row[7]),
        started_us=row[8],
        finished_us=row[9],
        reason=row[10],
        message=row[11],
        generation=int(row[12]),
        request_id=row[13],
    )


def _timestamp(us: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromMicroseconds(us)
    return ts


def _encode_token(created_us: int, job_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_us}:{job_id}".encode()).decode("ascii")


def _decode_token(token: str) -> tuple[int, str]:
    try:
        created, job_id = base64.urlsafe_b64decode(token.encode("ascii")).decode().split(":", 1)
        return int(created), job_id
    except (ValueError, UnicodeError, binascii.Error):
        raise ValueError(
            f"page_token={spec_lib.quote(token)} is not a token from a previous ListJobs reply."
        ) from None
