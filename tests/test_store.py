"""The controller's job store: migrations, the job life cycle, pagination, events, metrics, and
the state directory's lock and epoch across processes."""

from __future__ import annotations

import base64
import itertools
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from pathways_lite.controller.schema import (
    MIGRATIONS,
    SCHEMA_VERSION,
    SchemaVersionError,
    migrate,
    schema_version,
)
from pathways_lite.controller.statedir import StateDirLock, StateDirLockedError
from pathways_lite.controller.states import (
    TRANSITIONS,
    IllegalTransitionError,
    JobNotFoundError,
    JobState,
)
from pathways_lite.controller.store import DB_NAME, JobStore
from pathways_lite.controller.store_progress import MetricConflictError
from pathways_lite.controller.views import job_record_proto
from pathways_lite.spec import load_spec_text
from pathways_lite.v1 import controller_pb2

SPEC = load_spec_text(
    """\
name: tiny
model: {preset: palm-tiny}
islands: 1
devices_per_island: 2
mesh: {data: 1, model: 2}
train: {steps: 4, global_batch: 4, seq_len: 16}
data: {source: stdlib}
priority: 3
weight: 2
"""
)


def frozen_clock(start_us: int = 1_700_000_000_000_000):
    """A clock that only moves when told (every call returns the same time by default)."""
    now = [start_us]

    def clock() -> int:
        return now[0]

    clock.now = now  # type: ignore[attr-defined]
    return clock


@pytest.fixture
def store(tmp_path):
    with JobStore(tmp_path / DB_NAME, clock_us=frozen_clock()) as s:
        yield s


def _job_in(store: JobStore, state: JobState) -> str:
    """A job brought to `state` through legal transitions."""
    job_id = store.create_job(SPEC).id
    path = {
        JobState.QUEUED: [],
        JobState.RUNNING: [JobState.RUNNING],
        JobState.SUSPENDED: [JobState.RUNNING, JobState.SUSPENDED],
        JobState.SUCCEEDED: [JobState.RUNNING, JobState.SUCCEEDED],
        JobState.FAILED: [JobState.FAILED],
        JobState.CANCELLED: [JobState.CANCELLED],
    }[state]
    for s in path:
        store.transition(job_id, s)
    assert store.get_job(job_id).state == state
    return job_id


# -- schema ------------------------------------------------------------------------------


def test_empty_database_is_migrated_to_the_current_schema(tmp_path):
    path = tmp_path / "fresh" / DB_NAME
    JobStore(path).close()
    conn = sqlite3.connect(path)
    assert schema_version(conn) == SCHEMA_VERSION == len(MIGRATIONS)
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert {"schema_version", "controller", "jobs", "events", "metrics"} <= names
    assert {"jobs_by_created", "jobs_by_state", "events_by_job"} <= names
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # Opening again applies nothing.
    assert migrate(conn) == (SCHEMA_VERSION, SCHEMA_VERSION)


def test_a_later_migration_keeps_the_data_and_a_newer_database_is_refused(tmp_path):
    path = tmp_path / DB_NAME
    with JobStore(path) as store:
        job_id = store.create_job(SPEC).id
    conn = sqlite3.connect(path, isolation_level=None)
    later = (*MIGRATIONS, ("ALTER TABLE jobs ADD COLUMN note TEXT NOT NULL DEFAULT ''",))
    assert migrate(conn, later) == (SCHEMA_VERSION, SCHEMA_VERSION + 1)
    assert conn.execute("SELECT id, note FROM jobs").fetchall() == [(job_id, "")]
    conn.close()
    with pytest.raises(SchemaVersionError, match=f"schema version {SCHEMA_VERSION + 1}"):
        JobStore(path)


def test_a_failing_migration_is_rolled_back(tmp_path):
    conn = sqlite3.connect(tmp_path / DB_NAME, isolation_level=None)
    broken = (*MIGRATIONS, ("CREATE TABLE extra (x INTEGER)", "THIS IS NOT SQL"))
    with pytest.raises(sqlite3.OperationalError):
        migrate(conn, broken)
    assert schema_version(conn) == SCHEMA_VERSION
    assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'extra'").fetchone() is None


def test_the_released_migrations_spell_out_every_state_of_the_enums():
    """The CHECK lists of migrations 0 and 1 are literal (built from the enums, a state added
    later changed them for new databases only); a new state needs a new migration, and then
    this test's lists."""
    from pathways_lite.controller import schema
    from pathways_lite.controller.states import CheckpointState, JobState

    assert schema._STATES_SQL == ", ".join(f"'{s.value}'" for s in JobState)
    assert schema._CHECKPOINT_STATES_SQL == ", ".join(f"'{s.value}'" for s in CheckpointState)


def test_a_commit_that_fails_is_rolled_back_and_the_store_goes_on(store):
    """A COMMIT that fails (a deferred constraint here; a full disk, an I/O error) left its
    transaction open: every later write failed "cannot start a transaction within a
    transaction" until the controller restarted."""
    job = store.create_job(SPEC)
    with pytest.raises(sqlite3.IntegrityError):
        with store._transaction() as conn:
            conn.execute("PRAGMA defer_foreign_keys = ON")
            conn.execute("DELETE FROM jobs WHERE id = ?", (job.id,))
            conn.execute(
                "INSERT INTO checkpoints (job_id, generation, step, path, state, created_us, "
                "updated_us) VALUES ('no-such-job', 0, 0, '/x', 'committed', 0, 0)"
            )
    assert not store._conn.in_transaction
    assert store.get_job(job.id).id == job.id  # the delete was rolled back with it
    assert store.create_job(SPEC).id != job.id


# -- jobs and transitions ----------------------------------------------------------------


def test_new_job_is_queued_with_its_spec_priority_and_weight(store):
    job = store.create_job(SPEC)
    assert job.state == JobState.QUEUED
    assert job.id.startswith("tiny-") and job.name == "tiny"
    assert job.spec == SPEC
    assert (job.priority, job.weight) == (3, 2.0)
    assert job.started_us is None and job.finished_us is None
    assert store.get_job(job.id) == job
    assert [e.message for e in store.events(job.id)] == ["Job queued."]


def test_life_cycle_records_times_and_state_events(store):
    clock = store._clock_us
    job_id = store.create_job(SPEC).id
    for i, state in enumerate(
        [JobState.RUNNING, JobState.SUSPENDED, JobState.RUNNING, JobState.SUCCEEDED], start=1
    ):
        clock.now[0] += 1_000_000
        job = store.transition(job_id, state, reason=f"r{i}", message=f"Step {i}.")
        assert job.state == state and job.reason == f"r{i}" and job.updated_us == clock.now[0]
    assert job.started_us == 1_700_000_001_000_000  # the first start, not the resume
    assert job.finished_us == clock.now[0]
    kinds = [(e.kind, e.message) for e in store.events(job_id)]
    assert kinds == [
        ("state", "Job queued."),
        ("state", "Job running (r1). Step 1."),
        ("state", "Job suspended (r2). Step 2."),
        ("state", "Job running (r3). Step 3."),
        ("state", "Job succeeded (r4). Step 4."),
    ]


ILLEGAL = [(a, b) for a, b in itertools.product(JobState, JobState) if b not in TRANSITIONS[a]]


@pytest.mark.parametrize("current, target", ILLEGAL, ids=[f"{a}->{b}" for a, b in ILLEGAL])
def test_illegal_transitions_are_rejected(store, current, target):
    job_id = _job_in(store, current)
    events = len(store.events(job_id))
    with pytest.raises(IllegalTransitionError, match=f"from {current} to {target}"):
        store.transition(job_id, target)
    assert store.get_job(job_id).state == current
    assert len(store.events(job_id)) == events  # nothing recorded


def test_terminal_states_allow_nothing_and_every_live_state_can_be_cancelled():
    for state in JobState:
        assert (not TRANSITIONS[state]) == state.terminal
        if not state.terminal:
            assert JobState.CANCELLED in TRANSITIONS[state]


def test_expected_state_guards_a_transition(store):
    job_id = _job_in(store, JobState.RUNNING)
    with pytest.raises(IllegalTransitionError, match="is running, not queued"):
        store.transition(job_id, JobState.CANCELLED, expected=JobState.QUEUED)
    assert store.transition(job_id, JobState.CANCELLED, expected=JobState.RUNNING).state == (
        JobState.CANCELLED
    )


def test_unknown_job_is_not_found(store):
    with pytest.raises(JobNotFoundError, match="'nope' does not exist"):
        store.get_job("nope")
    with pytest.raises(JobNotFoundError):
        store.transition("nope", JobState.RUNNING)
    with pytest.raises(JobNotFoundError):
        store.record_metrics("nope", 0, 1.0)
    with pytest.raises(JobNotFoundError):
        store.add_event("nope", "note", "hello")


def test_request_id_makes_submission_idempotent(store):
    first = store.create_job(SPEC, request_id="req-1")
    again = store.create_job(SPEC, request_id="req-1")
    other = store.create_job(SPEC, request_id="req-2")
    assert again.id == first.id and other.id != first.id
    assert len(store.list_jobs()[0]) == 2


def test_a_burst_of_jobs_is_created_in_one_transaction_with_request_ids_kept(store):
    """create_jobs (a burst of SubmitJob calls): each job as create_job makes it, a request id
    seen before (in the store or earlier in the burst) giving back its job, marked not new;
    a new job's view made without reading the store equals the one read from it."""
    from pathways_lite.controller.views import job_record_proto

    before = store.create_job(SPEC, request_id="req-0")
    created = store.create_jobs([(SPEC, "req-0"), (SPEC, "req-1"), (SPEC, None), (SPEC, "req-1")])
    assert [new for _, new in created] == [False, True, True, False]
    (r0, _), (r1, _), (r2, _), (r1_again, _) = created
    assert r0.id == before.id and r1_again.id == r1.id and len({r0.id, r1.id, r2.id}) == 3
    assert r1.created_us < r2.created_us  # submission order kept
    assert len(store.list_jobs()[0]) == 3
    assert job_record_proto(store, r2, new=True) == job_record_proto(store, r2)


def test_explicit_job_ids_are_checked_and_unique(store):
    assert store.create_job(SPEC, job_id="my-job").id == "my-job"
    with pytest.raises(Exception, match="already taken"):
        store.create_job(SPEC, job_id="my-job")
    with pytest.raises(ValueError, match="job_id="):
        store.create_job(SPEC, job_id="../bad")


def test_generation_bumps(store):
    job_id = store.create_job(SPEC).id
    assert store.get_job(job_id).generation == 0
    assert [store.bump_generation(job_id) for _ in range(2)] == [1, 2]
    assert store.get_job(job_id).generation == 2


# -- pagination --------------------------------------------------------------------------


def test_list_jobs_pages_in_creation_order_with_a_frozen_clock(store):
    # The clock never moves: creation times must still be strictly increasing.
    ids = [store.create_job(SPEC).id for _ in range(7)]
    created = [store.get_job(i).created_us for i in ids]
    assert created == sorted(set(created))

    seen, token, pages = [], "", 0
    while True:
        page, token = store.list_jobs(page_size=3, page_token=token)
        seen += [j.id for j in page]
        pages += 1
        if pages == 1:
            late = store.create_job(SPEC).id  # added while paging: shows up once, at the end
        if not token:
            break
    assert seen == ids + [late]
    assert pages == 3


def test_list_jobs_filters_by_state_and_rejects_bad_tokens(store):
    queued = store.create_job(SPEC).id
    running = _job_in(store, JobState.RUNNING)
    failed = _job_in(store, JobState.FAILED)
    page, token = store.list_jobs(states=[JobState.RUNNING, JobState.FAILED])
    assert [j.id for j in page] == [running, failed] and token == ""
    assert [j.id for j in store.list_jobs(states=[JobState.QUEUED])[0]] == [queued]
    with pytest.raises(ValueError, match="page_token="):
        store.list_jobs(page_token="not a token!")
    # A forged token past SQLite's integers raised OverflowError (INTERNAL on the wire).
    forged = base64.urlsafe_b64encode(b"99999999999999999999999:x").decode()
    with pytest.raises(ValueError, match="page_token="):
        store.list_jobs(page_token=forged)
    with pytest.raises(ValueError, match="page_size=-1"):
        store.list_jobs(page_size=-1)


def test_scheduling_order_is_priority_then_submission(store):
    low = store.create_job(SPEC).id
    high_spec = controller_pb2.JobSpec()
    high_spec.CopyFrom(SPEC)
    high_spec.priority = 10
    high = store.create_job(high_spec).id
    low2 = store.create_job(SPEC).id
    assert [j.id for j in store.jobs_in_states([JobState.QUEUED])] == [high, low, low2]


@pytest.mark.timeout(60)
def test_the_incremental_queue_equals_a_full_read_after_any_changes(store):
    """queue_keys patches its last answer with the changed jobs; after random submissions,
    transitions, re-prioritisations and a prune it equals the SQL order read in full, and an
    answer already returned never changes."""
    import random

    rng = random.Random(7)
    states = [JobState.QUEUED, JobState.SUSPENDED]

    def full() -> list[tuple]:
        return store._conn.execute(
            "SELECT id, updated_us, state, priority, created_us FROM jobs WHERE state IN "
            "('queued', 'suspended') ORDER BY priority DESC, created_us, id"
        ).fetchall()

    ids: list[str] = []
    for round_ in range(60):
        before = store.queue_keys(states)
        frozen = list(before)
        for _ in range(rng.randint(1, 6)):
            op = rng.random()
            live = [j for j in ids if not store.get_job(j).state.terminal]
            if op < 0.4 or not live:
                spec = controller_pb2.JobSpec()
                spec.CopyFrom(SPEC)
                spec.priority = rng.randint(0, 3)
                ids.append(store.create_job(spec).id)
            elif op < 0.6:
                store.set_priority(rng.choice(live), rng.randint(0, 3))
            else:
                job = store.get_job(rng.choice(live))
                nxt = {
                    JobState.QUEUED: [JobState.RUNNING, JobState.CANCELLED],
                    JobState.RUNNING: [JobState.SUSPENDED, JobState.SUCCEEDED, JobState.QUEUED],
                    JobState.SUSPENDED: [JobState.RUNNING, JobState.QUEUED],
                }[job.state]
                store.transition(job.id, rng.choice(nxt), reason="test")
        if round_ == 30:
            store.prune_finished(10**18)  # many at once: a full read follows
            ids = [r[0] for r in full()]
        assert store.queue_keys(states) == full()
        assert before == frozen  # the earlier answer was not changed in place
    assert store.queue_keys([JobState.QUEUED]) == [r for r in full() if r[2] == "queued"]


# -- events and metrics ------------------------------------------------------------------


def test_events_are_ordered_and_can_be_followed(store):
    job_id = store.create_job(SPEC).id
    other = store.create_job(SPEC).id
    first = store.add_event(job_id, "checkpoint", "Checkpoint at step 2.")
    store.add_event(other, "note", "Not this job's.")
    second = store.add_event(job_id, "retry", "Step 3 retried.")
    assert [e.id for e in store.events(job_id)][-2:] == [first.id, second.id]
    assert store.events(job_id, after_id=first.id) == [second]
    assert store.events(job_id, limit=1)[0].message == "Job queued."


def test_metrics_are_unique_per_step_and_in_order(store, tmp_path):
    job_id = store.create_job(SPEC).id
    assert store.record_metrics(job_id, 0, 5.5, tokens_per_s=100.0, step_time_s=0.5)
    assert store.record_metrics(job_id, 1, 5.25)
    # A retried step with the same result is a no-op; a different result is a conflict.
    assert store.record_metrics(job_id, 1, 5.25) is False
    with pytest.raises(MetricConflictError, match="recorded with loss 5.25, not 4.0"):
        store.record_metrics(job_id, 1, 4.0)
    with pytest.raises(MetricConflictError, match="out of order"):
        store.record_metrics(job_id, 3, 4.0)
    with pytest.raises(ValueError, match="not finite"):
        store.record_metrics(job_id, 2, float("nan"))
    assert store.losses(job_id) == [5.5, 5.25]
    assert store.steps_completed(job_id) == 2
    m0 = store.metrics(job_id)[0]
    assert (m0.step, m0.loss, m0.tokens_per_s, m0.step_time_s) == (0, 5.5, 100.0, 0.5)
    assert [m.step for m in store.metrics(job_id, from_step=1)] == [1]

    # The database itself refuses a second row for a (job, step).
    conn = sqlite3.connect(tmp_path / DB_NAME)
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute(
            "INSERT INTO metrics (job_id, step, loss, tokens_per_s, step_time_s, time_us) "
            "VALUES (?, 1, 1.0, 0, 0, 0)",
            (job_id,),
        )
    conn.close()

    # A rollback forgets the steps after the checkpoint; they can be recorded again.
    assert store.truncate_metrics(job_id, 1) == 1
    assert store.record_metrics(job_id, 1, 4.0)
    assert store.losses(job_id) == [5.5, 4.0]


def test_a_rollback_forgets_the_evaluations_of_the_steps_it_forgets(store):
    """Evaluations of parameters after the checkpoint's step go with the steps a rollback
    forgets (run again, they are evaluated again: recorded twice before); the one at the
    checkpoint's own step stays."""
    from pathways_lite.controller.store import EvalRow

    job_id = store.create_job(SPEC).id
    for step in range(12):
        store.record_metrics(job_id, step, 1.0)
    for step in (5, 10, 12):
        store.record_eval(job_id, step, 0, [EvalRow("held-out", 2.0, 7.4, None, None, 8)])
    store.truncate_metrics(job_id, 10)
    assert [e.step for e in store.evals(job_id)] == [5, 10]


def test_a_steps_mfu_is_stored_with_it_and_steps_from_before_read_as_unknown(store):
    job_id = store.create_job(SPEC).id
    store.record_metrics(job_id, 0, 5.5, tokens_per_s=100.0, mfu=0.25)
    store.record_metrics(job_id, 1, 5.0, tokens_per_s=100.0)
    assert [m.mfu for m in store.metrics(job_id)] == [0.25, None]


def test_job_proto_carries_state_spec_losses_and_times(store):
    job_id = _job_in(store, JobState.RUNNING)
    store.record_metrics(job_id, 0, 3.0)
    store.record_metrics(job_id, 1, 2.5)
    record = store.get_job(job_id)
    job = job_record_proto(store, record)
    assert job.id == job_id and job.state == controller_pb2.JOB_STATE_RUNNING
    assert job.spec == SPEC and list(job.losses) == [3.0, 2.5] and job.steps_completed == 2
    assert job.created_at.ToMicroseconds() == record.created_us
    assert job.started_at.ToMicroseconds() == record.started_us
    assert not job.HasField("finished_at")
    assert list(job_record_proto(store, record, include_losses=False).losses) == []
    for state in JobState:
        assert JobState.from_proto(state.to_proto()) == state
    with pytest.raises(ValueError, match="JOB_STATE_UNSPECIFIED"):
        JobState.from_proto(controller_pb2.JOB_STATE_UNSPECIFIED)


# -- the state directory: lock and epoch -------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys
    from pathways_lite.controller.store import JobStore
    store = JobStore.open_controller(sys.argv[1])
    print(store.epoch, flush=True)
    sys.stdin.readline()  # hold the lock until told to go
    store.close()
    """
)


def _start_holder(state_dir) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(state_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    assert line, f"the lock holder exited with {proc.wait(timeout=30)}"
    return proc, int(line)


def test_state_dir_is_locked_by_one_process_at_a_time(tmp_path):
    state_dir = tmp_path / "state"
    holder, epoch = _start_holder(state_dir)
    try:
        assert epoch == 1
        with pytest.raises(StateDirLockedError, match=f"pid {holder.pid}"):
            JobStore.open_controller(state_dir)
        with pytest.raises(StateDirLockedError, match="another controller"):
            StateDirLock(state_dir).acquire()
    finally:
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(timeout=30) == 0
    # Released: this process gets it, in the next epoch.
    with JobStore.open_controller(state_dir) as store:
        assert store.epoch == 2
        job_id = store.create_job(SPEC).id
    # And a second process now sees the job and the epoch after it.
    holder, epoch = _start_holder(state_dir)
    holder.stdin.write("\n")
    holder.stdin.flush()
    assert holder.wait(timeout=30) == 0
    assert epoch == 3
    with JobStore.open_controller(state_dir) as store:
        assert store.get_job(job_id).state == JobState.QUEUED


def test_lock_of_a_killed_controller_is_released(tmp_path):
    state_dir = tmp_path / "state"
    holder, _ = _start_holder(state_dir)
    holder.kill()
    holder.wait(timeout=30)
    with JobStore.open_controller(state_dir) as store:
        assert store.epoch == 2


STANDBY = textwrap.dedent(
    """
    import sys
    from pathways_lite.controller.store import JobStore
    print("waiting", flush=True)
    store = JobStore.open_controller(sys.argv[1], wait=True)
    print(store.epoch, flush=True)
    store.close()
    """
)


def test_a_standby_takes_the_lock_only_once_its_holder_is_killed(tmp_path):
    state_dir = tmp_path / "state"
    holder, _ = _start_holder(state_dir)
    standby = subprocess.Popen(
        [sys.executable, "-c", STANDBY, str(state_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert standby.stdout.readline() == "waiting\n"
        time.sleep(1.0)
        # Still waiting while the holder lives: no epoch started, nothing printed.
        assert standby.poll() is None
        with JobStore(state_dir / DB_NAME) as store:
            assert store.stored_epoch() == 1
        holder.kill()
        holder.wait(timeout=30)
        # The kernel dropped the dead holder's lock: the standby has it, in the next epoch.
        assert standby.stdout.readline() == "2\n"
        assert standby.wait(timeout=30) == 0
    finally:
        for proc in (holder, standby):
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


def test_epoch_increases_on_every_open(tmp_path):
    epochs = []
    for _ in range(3):
        with JobStore.open_controller(tmp_path) as store:
            epochs.append(store.epoch)
            assert store.stored_epoch() == store.epoch
    assert epochs == [1, 2, 3]
    # Opening the database without the controller's lock starts no epoch.
    with JobStore(tmp_path / DB_NAME) as store:
        assert store.epoch == 0 and store.stored_epoch() == 3


def test_a_job_is_found_by_id_then_unique_name_then_unique_id_prefix(store) -> None:
    from pathways_lite.controller.states import AmbiguousJobError, JobNotFoundError

    a = store.create_job(SPEC, job_id="tiny-aa11")
    b = store.create_job(SPEC, job_id="tiny-ab22")
    other = controller_pb2.JobSpec()
    other.CopyFrom(SPEC)
    other.name = "solo"
    solo = store.create_job(other, job_id="solo-cc33")
    assert store.find_job("tiny-aa11").id == a.id  # exact id
    assert store.find_job("solo").id == solo.id  # unique name
    assert store.find_job("tiny-ab").id == b.id  # unique id prefix
    with pytest.raises(AmbiguousJobError) as ambiguous:
        store.find_job("tiny")  # a name two jobs share: both are listed
    assert "tiny-aa11" in str(ambiguous.value) and "tiny-ab22" in str(ambiguous.value)
    with pytest.raises(AmbiguousJobError):
        store.find_job("tiny-a")
    with pytest.raises(JobNotFoundError, match="id, name or id prefix"):
        store.find_job("nothing%")
    # An id's start as typed (`cancel Solo` cancelled solo-cc33: LIKE ignores case).
    for ref in ("Solo-", "SOLO-CC", "solo_", "sol%"):
        with pytest.raises(JobNotFoundError):
            store.find_job(ref)
    assert store.find_job("solo-c").id == solo.id


def test_an_empty_job_reference_is_refused_not_taken_for_the_only_job(store) -> None:
    """`""` matched every job id (a prefix of all): with one job stored, `cancel "$JOB"`
    with the variable unset cancelled it."""
    from pathways_lite.controller.states import AmbiguousJobError

    store.create_job(SPEC, job_id="only-aa11")
    for ref in ("", "  "):
        with pytest.raises(AmbiguousJobError, match="is empty"):
            store.find_job(ref)


def test_a_rollback_is_told_once_written_with_the_rows_it_forgot(store):
    """`truncate_metrics` tells `on_rollback` (the controller's Reporter, which tells the
    job's followers) the job, the step and how many recorded steps it forgot."""
    job = store.create_job(SPEC).id
    for step in range(5):
        store.record_metrics(job, step, 1.0)
    told = []
    store.on_rollback = lambda *args: told.append(args)
    store.truncate_metrics(job, 3)
    store.truncate_metrics(job, 0)
    assert told == [(job, 3, 2), (job, 0, 3)]
