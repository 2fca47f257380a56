"""The controller's job store: jobs, events, metrics and checkpoints in SQLite.

`JobStore.open_controller(state_dir)` locks the state directory (controller/statedir.py),
brings the database (`<state_dir>/controller.db`, WAL mode) to the current schema
(controller/schema.py) and bumps the epoch stored there; the epoch is carried in every worker
RPC, so hosts can reject steps still in flight from a previous controller. The database also
holds the checkpoint registry (only committed checkpoints are registered) and per-job retry
counts of failure classes. State changes follow the life cycle of controller/states.py. Times
are integer microseconds since the epoch (UTC); job creation times are strictly increasing, so
(created, id) orders jobs by submission and is the key of ListJobs' keyset pagination.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import collections
import contextlib
import dataclasses
import logging
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from pathways_lite.v1 import controller_pb2

from . import spec as spec_lib
from .schema import migrate
from .statedir import StateDirLock
from .states import (
    TERMINAL_STATES,
    TRANSITIONS,
    AmbiguousJobError,
    CheckpointState,
    IllegalTransitionError,
    JobNotFoundError,
    JobState,
    StoreError,
)
from .store_progress import Checkpoint, ProgressTables

logger = logging.getLogger(__name__)

DB_NAME = "controller.db"
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# Changes of the jobs table remembered for queue_keys' incremental answers.
QUEUE_CHANGES_KEPT = 4096
_JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# The event every new job starts with.
QUEUED_EVENT = "Job queued."


@dataclasses.dataclass(frozen=True)
class EvalRow:
    """One source's evaluation (a row of the evals table)."""

    source: str
    loss: float
    perplexity: float
    exact_match: float | None
    token_f1: float | None
    examples: int
    step: int = 0
    shots: int = 0
    time_us: int = 0


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


def _queue_order(row: tuple) -> tuple:
    """A queue_keys row's place: priority (higher first), then submission, then id (the
    order of its SQL; ids are ASCII, so Python and SQLite compare them alike)."""
    return (-row[3], row[4], row[0])


def _now_us() -> int:
    return time.time_ns() // 1000


class JobStore(ProgressTables):
    """Jobs, events, metrics and checkpoints in SQLite; safe to share between threads of one
    process. The metrics, checkpoint and retry tables' methods come from `ProgressTables`.

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
        self.on_rollback = None
        # Bumped at every change of the jobs table (not of events or metrics): the
        # scheduling queue is read again only after one.
        self.jobs_version = 0
        # queue_keys' answers by states: (jobs_version, rows), patched from the changes.
        self._queue_cache: dict[tuple, tuple[int, list]] = {}
        # The jobs table's latest changes: (jobs_version, the job changed; None: many).
        self._changes: collections.deque[tuple[int, str | None]] = collections.deque(
            maxlen=QUEUE_CHANGES_KEPT
        )
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
    def open_controller(cls, state_dir: str | Path, *, wait: bool = False, **kwargs) -> JobStore:
        """Lock `state_dir`, open its database and start a new epoch.

        Args:
            wait: wait for the lock while another controller holds it (a standby controller)
                instead of raising.

        Raises:
            StateDirLockedError: another controller holds the state directory (no `wait`).
            SchemaVersionError: the database is newer than this code.
        """
        lock = StateDirLock(state_dir)
        lock.acquire(wait=wait)
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
    def _transaction(self, *, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back when the body or the COMMIT fails (a
        COMMIT that failed, on a full disk say, left the transaction open: every later BEGIN
        failed until the controller restarted).

        Args:
            durable: the commit is on disk when this returns, as what a caller was told
                (a job accepted, an epoch started) must be. Other commits (synchronous =
                NORMAL, in WAL mode) may be lost with the machine's power, never corrupted.
        """
        with self._mutex:
            if durable:
                self._conn.execute("PRAGMA synchronous = FULL")
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                    self._conn.execute("COMMIT")
                except BaseException:
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                    raise
            finally:
                # (Not inside a transaction a failed ROLLBACK left: SQLite refuses it there.)
                if durable and not self._conn.in_transaction:
                    self._conn.execute("PRAGMA synchronous = NORMAL")

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
        with self._transaction(durable=True) as conn:
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
        with self._transaction(durable=True) as conn:
            return self._create_job(conn, spec, job_id, request_id)

    def create_jobs(
        self, jobs: Sequence[tuple[controller_pb2.JobSpec, str | None]]
    ) -> list[tuple[JobRecord, bool]]:
        """Record new queued jobs, each (spec, request_id) as `create_job` with a new id, in
        one transaction. Each record comes with whether it is new (False: the job of its
        request_id, recorded before), which the caller's view of it needs."""
        with self._transaction(durable=True) as conn:
            out = []
            for spec, request_id in jobs:
                before = self.jobs_version
                record = self._create_job(conn, spec, None, request_id)
                out.append((record, self.jobs_version != before))
            return out

    def _create_job(
        self,
        conn: sqlite3.Connection,
        spec: controller_pb2.JobSpec,
        job_id: str | None,
        request_id: str | None,
    ) -> JobRecord:
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
        self._jobs_changed(new_id)
        conn.execute(
            "INSERT INTO jobs (id, name, spec, state, priority, weight, created_us, "
            "updated_us, request_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                new_id,
                spec.name,
                spec.SerializeToString(deterministic=True),
                JobState.QUEUED.value,
                spec_lib.priority(spec),
                spec_lib.weight(spec),
                now,
                now,
                request_id or None,
            ),
        )
        self._insert_event(conn, new_id, now, "state", QUEUED_EVENT)
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

    def checkpoint_by_path(self, path: str) -> Checkpoint | None:
        """The committed checkpoint registered at `path` (trailing slashes ignored), or None."""
        with self._mutex:
            row = self._conn.execute(
                "SELECT job_id, generation, step, path, state, created_us FROM checkpoints "
                "WHERE path = ? AND state = ?",
                (path.rstrip("/") or path, CheckpointState.COMMITTED.value),
            ).fetchone()
        if row is None:
            return None
        return Checkpoint(row[0], int(row[1]), int(row[2]), row[3], CheckpointState(row[4]), row[5])

    def record_eval(self, job_id: str, step: int, shots: int, sources: list[EvalRow]) -> None:
        """Store one evaluation of a job (one row per source) with an `eval` event.

        Raises:
            JobNotFoundError: no such job.
        """
        with self._transaction() as conn:
            self._require_job(conn, job_id)
            now = self._clock_us()
            for r in sources:
                conn.execute(
                    "INSERT INTO evals (job_id, step, shots, source, loss, perplexity, "
                    "exact_match, token_f1, examples, time_us) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (
                        job_id,
                        step,
                        shots,
                        r.source,
                        r.loss,
                        r.perplexity,
                        r.exact_match,
                        r.token_f1,
                        r.examples,
                        now,
                    ),
                )
            summary = ", ".join(f"{r.source} loss {r.loss:.4f}" for r in sources)
            self._insert_event(
                conn, job_id, now, "eval", f"Evaluated at step {step} ({shots}-shot): {summary}."
            )

    def evals(self, job_id: str) -> list[EvalRow]:
        """A job's evaluations, per source, oldest first."""
        with self._mutex:
            rows = self._conn.execute(
                "SELECT step, shots, source, loss, perplexity, exact_match, token_f1, examples, "
                "time_us FROM evals WHERE job_id = ? ORDER BY id",
                (job_id,),
            ).fetchall()
        return [
            EvalRow(r[2], r[3], r[4], r[5], r[6], int(r[7]), int(r[0]), int(r[1]), r[8])
            for r in rows
        ]

    def latest_evals(self) -> list[tuple[str, str, EvalRow]]:
        """(job id, job name, row) of the newest evaluation of every job and source (what
        /metrics exports), by job id then source."""
        with self._mutex:
            rows = self._conn.execute(
                "SELECT e.job_id, j.name, e.step, e.shots, e.source, e.loss, e.perplexity, "
                "e.exact_match, e.token_f1, e.examples, e.time_us FROM evals e "
                "JOIN jobs j ON j.id = e.job_id WHERE e.id IN "
                "(SELECT MAX(id) FROM evals GROUP BY job_id, source) ORDER BY e.job_id, e.source"
            ).fetchall()
        return [
            (
                r[0],
                r[1],
                EvalRow(r[4], r[5], r[6], r[7], r[8], int(r[9]), int(r[2]), int(r[3]), r[10]),
            )
            for r in rows
        ]

    def find_job(self, ref: str) -> JobRecord:
        """The one job a user means by `ref`: the job with that id, else the one job with
        that name, else the one job whose id starts with it (the resolver of every place a
        job is named; what is stored is always the id).

        Raises:
            JobNotFoundError: nothing matches.
            AmbiguousJobError: several jobs match (the message lists them, newest first), or
                `ref` is empty (it would match every job: the only one, say, cancelled by a
                `cancel "$JOB"` whose variable was unset).
        """
        if not ref.strip():
            raise AmbiguousJobError(
                f"job_id={ref!r} is empty: name a job by its id, its name or the start of its id."
            )
        try:
            return self.get_job(ref)
        except JobNotFoundError:
            pass
        # The start of an id, as typed (LIKE ignored case: "Train" named the job train-...).
        for where, args in (("name = ?", (ref,)), ("substr(id, 1, ?) = ?", (len(ref), ref))):
            with self._mutex:
                rows = self._conn.execute(
                    f"SELECT {_JOB_COLUMNS} FROM jobs WHERE {where} "
                    "ORDER BY created_us DESC, id DESC LIMIT 11",
                    args,
                ).fetchall()
            if len(rows) == 1:
                return _job_from_row(rows[0])
            if rows:
                jobs = [_job_from_row(r) for r in rows]
                listed = ", ".join(f"{j.id} ({j.state.value})" for j in jobs[:10])
                count = "more than 10" if len(jobs) > 10 else str(len(jobs))
                raise AmbiguousJobError(
                    f"{spec_lib.quote(ref)} matches {count} jobs: {listed}; name one by its id."
                )
        raise JobNotFoundError(
            f"job {spec_lib.quote(ref)} does not exist: no job has that id, name or id prefix "
            "(`pathways-lite jobs` lists them)."
        )

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
            self._jobs_changed(None)
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

    def queue_keys(self, states: Iterable[JobState]) -> list[tuple[str, int, str, int, int]]:
        """(id, updated_us, state, priority, created_us) of every job in one of `states`, in
        scheduling order (priority, then submission), without parsing specs: admission reads
        again only the records that changed. Incremental: the previous answer for the same
        states is patched with the rows of the jobs changed since (a full read only after
        many changes); an answer is never changed once returned."""
        values = tuple(sorted({JobState(s).value for s in states}))
        if not values:
            return []
        cached = self._queue_cache.get(values)
        if cached is not None and cached[0] == self.jobs_version:
            return cached[1]
        with self._mutex:
            version = self.jobs_version
            cached = self._queue_cache.get(values)
            if cached is not None and cached[0] == version:
                return cached[1]
            rows = None
            changed = None if cached is None else self._changed_since(cached[0])
            marks = ", ".join("?" * len(values))
            if cached is not None and changed is not None and len(changed) <= 500:
                fresh = self._conn.execute(
                    "SELECT id, updated_us, state, priority, created_us FROM jobs"
                    f" WHERE state IN ({marks}) AND id IN ({', '.join('?' * len(changed))})",
                    (*values, *changed),
                ).fetchall()
                rows = [r for r in cached[1] if r[0] not in changed]
                for row in fresh:
                    bisect.insort(rows, row, key=_queue_order)
            else:
                rows = self._conn.execute(
                    "SELECT id, updated_us, state, priority, created_us FROM jobs"
                    f" WHERE state IN ({marks})"
                    " ORDER BY priority DESC, created_us, id",
                    values,
                ).fetchall()
            self._queue_cache[values] = (version, rows)
        return rows

    def _jobs_changed(self, job_id: str | None) -> None:
        """A change of the jobs table (in a transaction): of `job_id`, or of many (None)."""
        self.jobs_version += 1
        self._changes.append((self.jobs_version, job_id))

    def _changed_since(self, version: int) -> set[str] | None:
        """The jobs changed after `version`, or None when not all are known."""
        changed: set[str] = set()
        expected = self.jobs_version
        for v, job_id in reversed(self._changes):
            if v <= version:
                break
            if job_id is None or v != expected:
                return None  # many at once, or a change the log no longer holds
            changed.add(job_id)
            expected -= 1
        return changed if expected == version else None

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
            self._jobs_changed(job_id)
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
            self._jobs_changed(job_id)
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
            self._jobs_changed(job_id)
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


def _encode_token(created_us: int, job_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_us}:{job_id}".encode()).decode("ascii")


def _decode_token(token: str) -> tuple[int, str]:
    try:
        created, job_id = base64.urlsafe_b64decode(token.encode("ascii")).decode().split(":", 1)
        if not 0 <= int(created) < 2**63:  # (SQLite's integers: a larger one raised INTERNAL)
            raise ValueError(created)
        return int(created), job_id
    except (ValueError, UnicodeError, binascii.Error):
        raise ValueError(
            f"page_token={spec_lib.quote(token)} is not a token from a previous ListJobs reply."
        ) from None
