"""Unit tests of failure handling (no cluster): failure classes, the restore plan, checkpoint
registration and retention, and retry budgets, over a real job store."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import grpc
import pytest

from pathways_lite.controller import spec as spec_lib
from pathways_lite.controller.dispatch import Dispatcher, DispatchError
from pathways_lite.controller.program import StepProgram
from pathways_lite.controller.recovery import FailureClass, Recovery, classify
from pathways_lite.controller.store import JobStore
from pathways_lite.v1 import controller_pb2, worker_pb2
from pathways_lite.workers.checkpoint import checkpoint_path

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (spec_lib.SpecError("train.steps", 0, "steps=0 must be positive."), FailureClass.USER),
        (DispatchError("nan_loss", "loss nan"), FailureClass.USER),
        (DispatchError("step_failed", "x", grpc.StatusCode.INVALID_ARGUMENT), FailureClass.USER),
        (DispatchError("step_failed", "XLA: Out of memory allocating"), FailureClass.USER),
        (DispatchError("preempted", "a higher-priority job"), FailureClass.PREEMPTION),
        (
            DispatchError("step_failed", "x", grpc.StatusCode.UNAVAILABLE),
            FailureClass.INFRASTRUCTURE,
        ),
        (DispatchError("silent_data_corruption", "digests differ"), FailureClass.INFRASTRUCTURE),
        (DispatchError("load_failed", "x", grpc.StatusCode.DATA_LOSS), FailureClass.INFRASTRUCTURE),
        (ValueError("bad value"), FailureClass.USER),
        (RuntimeError("anything else"), FailureClass.INFRASTRUCTURE),
    ],
)
def test_failures_fall_in_the_class_that_decides_their_retry_budget(error, expected):
    assert classify(error) == expected


@pytest.fixture
def store(tmp_path: Path):
    with JobStore(tmp_path / "jobs.db") as store:
        store.create_job(controller_pb2.JobSpec(name="j", islands=1), job_id="j")
        yield store


def program(steps: int = 10) -> StepProgram:
    return StepProgram("j", 0, steps, 64, load=lambda at: None, checkpoint_every=2)


def test_a_restore_plan_starts_at_the_checkpoint_and_forgets_the_metrics_after_it(store, tmp_path):
    recovery = Recovery(store, Dispatcher(1), state_dir=tmp_path)
    for step in range(6):
        store.record_metrics("j", step, 1.0 / (step + 1))
    store.register_checkpoint("j", 0, 4, str(tmp_path / "ckpt-4"))
    attempt = recovery.plan(program(), store.latest_checkpoint("j"))
    assert attempt.program.start_step == 4
    assert attempt.program.restore_from == str(tmp_path / "ckpt-4")
    assert attempt.program.checkpoint_dir == str(tmp_path / "checkpoints" / "j")
    assert [m.step for m in store.metrics("j")] == [0, 1, 2, 3]
    assert attempt.program.checkpoint_after(5) and not attempt.program.checkpoint_after(4)
    fresh = recovery.plan(program(), None)
    assert (fresh.program.start_step, fresh.program.restore_from) == (0, "")
    assert store.metrics("j") == []


def test_without_a_state_dir_no_checkpoint_is_written(store):
    attempt = Recovery(store, Dispatcher(1)).plan(program(), None)
    assert attempt.program.checkpoint_dir == ""
    assert not any(attempt.program.checkpoint_after(s) for s in range(10))


def test_committed_checkpoints_are_registered_once_and_only_the_newest_are_kept(store, tmp_path):
    recovery = Recovery(store, Dispatcher(1), state_dir=tmp_path, keep=2)
    attempt = recovery.plan(program(), None)
    job_dir = Path(recovery.job_dir("j"))
    for step in (2, 4, 6):
        Path(checkpoint_path(str(job_dir), 0, step)).mkdir(parents=True)
        recovery.on_step(attempt, [s for s in (2, 4, 6) if s <= step])
    assert [c.step for c in store.checkpoints("j")] == [4, 6]
    assert not Path(checkpoint_path(str(job_dir), 0, 2)).exists()
    assert Path(checkpoint_path(str(job_dir), 0, 6)).exists()


def test_user_errors_are_never_retried_and_other_failures_until_their_budget_is_spent(store):
    recovery = Recovery(
        store, Dispatcher(1), budgets={FailureClass.INFRASTRUCTURE: 2, FailureClass.USER: 0}
    )
    record = store.get_job("j")

    async def retry(error) -> bool:
        return await recovery.retry(record, None, [], error)

    assert not asyncio.run(retry(DispatchError("nan_loss", "step 3 gave loss nan.")))
    infra = DispatchError("step_failed", "host gone", grpc.StatusCode.UNAVAILABLE)
    generation = store.get_job("j").generation
    assert asyncio.run(retry(infra)) and asyncio.run(retry(infra))
    assert store.get_job("j").generation == generation + 2
    assert not asyncio.run(retry(infra))
    messages = [e.message for e in store.events("j") if e.kind == "failure"]
    assert messages[0].startswith("User error (not retried)")
    assert "retry budget of 2 spent" in messages[-1]


def test_a_time_based_checkpoint_is_asked_for_once_its_interval_has_passed(store, tmp_path):
    every_s = dataclasses.replace(program(), checkpoint_every=0, checkpoint_every_s=60.0)
    attempt = Recovery(store, Dispatcher(1), state_dir=tmp_path).plan(every_s, None)
    assert not attempt.program.checkpoint_after(3, since_last_s=59.0)
    assert attempt.program.checkpoint_after(3, since_last_s=60.0)
    # checkpoint_every: 0 keeps its meaning (only the end by steps); 0 s: none by time.
    never = dataclasses.replace(attempt.program, checkpoint_every_s=0.0)
    assert not never.checkpoint_after(3, since_last_s=1e9) and never.checkpoint_after(9)


def test_a_spec_checkpoints_every_300_seconds_unless_it_says_otherwise():
    spec = controller_pb2.JobSpec()
    assert spec_lib.checkpoint_every_s(spec) == 300.0
    spec.train.checkpoint_every_s = 0
    assert spec_lib.checkpoint_every_s(spec) == 0.0


def test_final_and_drain_checkpoints_count_once_every_stage_committed_its_part(store, tmp_path):
    """A pipeline's replica 0 of every stage (islands 0 and 2 of 4) writes its stage's part:
    `finish` and `checkpoint_now` ask each of them and register only what all committed."""
    from pathways_lite.workers.sim_host import SimCluster, connect_islands

    recovery = Recovery(store, Dispatcher(1), state_dir=tmp_path)
    pipe = dataclasses.replace(program(), checkpoint_islands=(0, 2))

    async def run() -> tuple[list[int], list[int], bool, list[list[int]]]:
        cluster = SimCluster.uniform(4)
        islands = await connect_islands(await cluster.start())
        try:
            hosts = [cluster.hosts[i.id] for i in islands]
            for host in hosts:
                await host.LoadJob(
                    worker_pb2.LoadJobRequest(job_id="j", checkpoint_dir=str(tmp_path)), None
                )
                host.jobs["j"].steps_applied = 9
            hosts[0].jobs["j"].committed[:] = [4, 9]  # stage 0 has 9, stage 1 only 4
            hosts[2].jobs["j"].committed[:] = [4]
            attempt = recovery.plan(pipe, None)
            await recovery.finish(attempt, islands)
            after_finish = sorted(attempt.registered)
            drained = await recovery.checkpoint_now(attempt, islands, 9)
            return (
                after_finish,
                sorted(attempt.registered),
                drained,
                [h.jobs["j"].committed for h in hosts],
            )
        finally:
            await asyncio.gather(*(h.close() for i in islands for h in i.hosts))
            await cluster.stop()

    after_finish, after_drain, drained, committed = asyncio.run(run())
    assert after_finish == [4]  # stage 1 never committed 9: not registered
    assert drained and after_drain == [4, 9]
    assert 9 in committed[2] and committed[1] == committed[3] == []  # stage 1 saved it too
    assert [c.step for c in store.checkpoints("j")] == [4, 9]


def test_retention_deletes_every_stage_part_of_a_pipeline_checkpoint(store, tmp_path):
    """A pipeline's stages write `<job_dir>/stage<s>/g<g>-step<n>`; the store registers
    `<job_dir>/g<g>-step<n>`: retiring it deletes each stage's part."""
    recovery = Recovery(store, Dispatcher(1), state_dir=tmp_path, keep=1)
    attempt = recovery.plan(dataclasses.replace(program(), checkpoint_islands=(0, 2)), None)
    job_dir = Path(recovery.job_dir("j"))
    for step in (2, 4):
        for stage in ("stage0", "stage1"):
            Path(checkpoint_path(str(job_dir / stage), 0, step)).mkdir(parents=True)
        recovery.on_step(attempt, [s for s in (2, 4) if s <= step])
    assert [c.step for c in store.checkpoints("j")] == [4]
    assert sorted(p.name for p in job_dir.glob("stage*/*")) == ["g0-step4", "g0-step4"]


def test_a_checkpoint_is_registered_only_once_the_steps_before_it_are_written(store, tmp_path):
    """Metrics first for every registration (a step's report, a drain's checkpoint, the
    final one): while the database refuses the job's unwritten steps, a committed checkpoint
    is not registered; once they can be written, they are, and then it is. Before, only a
    step's report checked: a drain or the final checkpoint registered past a batch whose
    write had failed, and the job's next start dropped that batch (`Reporter.discard`): its
    steps' metrics were lost for good, below a checkpoint nothing runs again from."""
    import sqlite3

    from pathways_lite.controller.bus import EventBus, LogBuffer
    from pathways_lite.controller.dispatch import StepReport
    from pathways_lite.controller.jobs import Reporter
    from pathways_lite.controller.scheduler import Scheduler
    from pathways_lite.controller.states import StoreUnavailableError
    from pathways_lite.controller.views import Views

    views = Views(store, Scheduler(["island-0"], {"island-0": 1}), {}, {}, lambda r: None)
    reporter = Reporter(store, views, EventBus(), LogBuffer())
    recovery = Recovery(store, Dispatcher(1), state_dir=tmp_path)
    recovery.flush_metrics = reporter.flush  # as the controller wires them
    attempt = recovery.plan(program(), None)
    record = store.get_job("j")
    for step in range(4):  # the first is written at once, the others wait for the flush
        reporter.step(record, StepReport(step, 1.0, 100.0, 0.01, ()))
    store._conn.execute("PRAGMA busy_timeout = 50")  # fail fast while locked (10 s)
    other = sqlite3.connect(store.path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another writer holds the database
        with pytest.raises(StoreUnavailableError):
            reporter.flush("j")  # the job's last flush fails: steps 1-3 stay pending
        recovery.on_step(attempt, [4])  # not registered, and no error
        assert store.checkpoints("j") == [] and attempt.registered == set()
        other.execute("ROLLBACK")
    finally:
        other.close()
    recovery.on_step(attempt, [4])  # a drain's checkpoint, the database free again
    reporter.discard("j")  # the job's next start drops what is still unwritten
    assert [c.step for c in store.checkpoints("j")] == [4]
    assert [m.step for m in store.metrics("j")] == [0, 1, 2, 3]


def test_a_checkpoint_the_database_refuses_to_register_fails_nothing_and_is_registered_later(
    store, tmp_path
):
    """The job's steps are written, then the database refuses the checkpoint's row (another
    writer holds it past the timeout): registering it neither raises nor marks it
    registered, and the next report registers it. Before, the raw sqlite3 error failed a
    job whose steps had all run ("internal"), and with the database still refusing, the
    failure's own write raised too: the job stayed running with no runner."""
    import sqlite3

    recovery = Recovery(store, Dispatcher(1), state_dir=tmp_path)
    attempt = recovery.plan(program(), None)
    store._conn.execute("PRAGMA busy_timeout = 50")  # fail fast while locked (10 s)
    other = sqlite3.connect(store.path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        recovery.on_step(attempt, [4], ending=True)  # the final checkpoint's report
        assert attempt.registered == set()
        other.execute("ROLLBACK")
    finally:
        other.close()
    assert store.checkpoints("j") == []
    recovery.on_step(attempt, [4])
    assert [c.step for c in store.checkpoints("j")] == [4] and attempt.registered == {4}


def test_a_rollback_is_told_to_followers_who_had_its_steps_and_kept_for_laggards(store):
    """A rollback is told to the job's followers (its record with `rolled_back_to`, after
    the steps they had) when they had steps from there or some were recorded, not on a
    first load; a follower that lagged past several finds the lowest since its mark, and 0
    when more happened than are kept (it replays from the start)."""
    from pathways_lite.controller.bus import EventBus, LogBuffer
    from pathways_lite.controller.dispatch import StepReport
    from pathways_lite.controller.jobs import ROLLBACKS_KEPT, Reporter
    from pathways_lite.controller.scheduler import Scheduler
    from pathways_lite.controller.views import Views

    views = Views(store, Scheduler(["island-0"], {"island-0": 1}), {}, {}, lambda r: None)
    events = EventBus()
    reporter = Reporter(store, views, events, LogBuffer())
    store.on_rollback = reporter.rolled_back  # as the controller wires them
    follower = events.subscribe("j")
    store.truncate_metrics("j", 0)  # a first load: nothing to tell
    assert follower.empty()
    mark = reporter.rollback_mark
    record = store.get_job("j")
    for step in range(6):
        reporter.step(record, StepReport(step, 1.0, 100.0, 0.01, ()))
    reporter.flush("j")
    store.truncate_metrics("j", 4)
    store.truncate_metrics("j", 2)
    later = reporter.rollback_mark
    told, updates = [], []
    while not follower.empty():
        update = follower.get_nowait()
        updates.append(update)
        told.append(
            ("steps", update.metrics.step, len(update.more_metrics))
            if update.HasField("metrics")
            else ("rolled back to", update.rolled_back_to)
        )
    # The steps first (0 at once, 1-5 at the flush), then the rollbacks in order.
    assert told == [("steps", 0, 0), ("steps", 1, 4), ("rolled back to", 4), ("rolled back to", 2)]
    # A stream that resynced after the first rollback's record drops the steps before it (in
    # its replay or forgotten); one that resynced before it takes them by step (the record
    # comes after them and lowers its last step).
    steps, first_told = updates[1], updates[2].seq
    assert reporter.old_run("j", steps, synced=first_told)
    assert not reporter.old_run("j", steps, synced=first_told - 1)
    assert not reporter.old_run("j", updates[3], synced=updates[3].seq)  # (a record, after)
    assert reporter.rolled_back_since("j", mark) == 2
    assert reporter.rolled_back_since("j", later) is None
    assert reporter.rolled_back_since("other", mark) is None
    for _ in range(ROLLBACKS_KEPT - 1):  # (the one at 2 before `later` still kept)
        store.record_metrics("j", 2, 1.0)  # (recorded: each rollback forgets it)
        store.truncate_metrics("j", 2)
    assert reporter.rolled_back_since("j", later) == 2
    assert reporter.rolled_back_since("j", mark) == 0  # some it needs are no longer kept


def test_a_follower_that_lagged_across_a_rollback_replays_from_where_it_went_back(store):
    """`Following` (a WatchJob stream's, a job page's): a follower that had steps 0-5 stops
    reading while the job rolls back to step 2 and runs 2-4 again; its queue drops the
    rollback's record. Its resync replays from step 2 (from 6, it kept the old run's 2-5),
    and the updates still queued go by their steps; a record its resync reflects is dropped,
    and one marked `rolled_back_to` lowers its last step."""
    from pathways_lite.controller.bus import EventBus, LogBuffer
    from pathways_lite.controller.dispatch import StepReport
    from pathways_lite.controller.jobs import Following, Reporter
    from pathways_lite.controller.scheduler import Scheduler
    from pathways_lite.controller.views import Views

    views = Views(store, Scheduler(["island-0"], {"island-0": 1}), {}, {}, lambda r: None)
    events = EventBus(queue_size=2)
    reporter = Reporter(store, views, events, LogBuffer())
    store.on_rollback = reporter.rolled_back  # as the controller wires them
    queue = events.subscribe("j")
    follow = Following(reporter, "j", -1)
    follow.synced(events.seq["j"])
    record = store.get_job("j")
    for step in range(6):
        reporter.step(record, StepReport(step, 1.0, 100.0, 0.01, ()))
        reporter.flush("j")
        while not queue.empty():  # it reads as they come
            update = queue.get_nowait()
            assert not follow.stale(update)
            follow.last_step, old_run = update.metrics.step, update
    assert follow.last_step == 5 and not queue.take_dropped()
    store.truncate_metrics("j", 2)  # a retry from its checkpoint at 2
    for step in range(2, 5):
        reporter.step(record, StepReport(step, 2.0, 100.0, 0.01, ()))
        reporter.flush("j")
    update = queue.get_nowait()
    assert queue.take_dropped() == 2  # the rollback's record and step 2 of the new run
    follow.lagged()
    assert follow.last_step == 1  # its replay: steps 2-4 of the new run, from the store
    follow.synced(events.seq["j"])
    assert [(m.step, m.loss) for m in store.metrics("j", from_step=2)] == [
        (2, 2.0),
        (3, 2.0),
        (4, 2.0),
    ]
    follow.last_step = 4
    assert not follow.stale(update)  # new-run step 3: it goes by its step (sent already)
    assert follow.stale(old_run)  # old-run step 5 (read again, say): in the replay, or gone
    assert follow.stale(controller_pb2.WatchJobReply(job=views.job(record), seq=1))
    told = controller_pb2.WatchJobReply(rolled_back_to=3, seq=events.seq["j"] + 1)
    assert not follow.stale(told)
    follow.told(told)
    assert follow.last_step == 2

    def lag_past(steps) -> None:
        """The follower reads nothing while `steps` run (its queue drops), then resyncs."""
        for step in steps:
            reporter.step(record, StepReport(step, 3.0, 100.0, 0.01, ()))
            reporter.flush("j")
        while not queue.empty():
            queue.get_nowait()
        assert queue.take_dropped()
        follow.lagged()
        follow.synced(events.seq["j"])

    # Lagging again with no rollback since its last sync: the one to 2 it synced past
    # (before its resync above) does not take it back again.
    follow.last_step = 4
    lag_past(range(5, 8))
    assert follow.last_step == 4
    # A rollback (to 6) while it lags: its replay starts there.
    follow.last_step = 7
    store.truncate_metrics("j", 6)
    lag_past(range(6, 9))
    assert follow.last_step == 5


def test_a_pipeline_checkpoint_with_a_stage_part_missing_is_not_committed_here(tmp_path):
    """`committed_here` of a pipeline's checkpoint asks for every stage's part: with one
    missing it is not committed (it was, and the hosts' "missing" was retried as an unshared
    state directory until the job failed, never falling back to the previous checkpoint)."""
    from pathways_lite.controller.recovery import committed_here

    path = tmp_path / "job" / "g1-step8"
    for stage in (0, 2):
        (tmp_path / "job" / f"stage{stage}" / "g1-step8").mkdir(parents=True)
    assert not committed_here(str(path), 3)
    (tmp_path / "job" / "stage1" / "g1-step8").mkdir(parents=True)
    assert committed_here(str(path), 3)
    assert not committed_here(str(tmp_path / "job" / "g1-step9"), 1)


def test_a_state_change_is_told_to_followers_even_when_its_view_fails(store):
    """Reporter.transition writes the change, then tells the job's followers: a view that
    fails to build (a store read refused, a bug) still tells them the new state, which is
    how a follower learns that the job ended (it waited for ever)."""
    from pathways_lite.controller.bus import EventBus, LogBuffer
    from pathways_lite.controller.jobs import Reporter
    from pathways_lite.controller.scheduler import Scheduler
    from pathways_lite.controller.views import Views

    views = Views(store, Scheduler(["island-0"], {"island-0": 1}), {}, {}, lambda r: None)
    events = EventBus()
    reporter = Reporter(store, views, events, LogBuffer())
    follower = events.subscribe("j")

    def broken(*args, **kwargs):
        raise RuntimeError("a view that cannot be built")

    views.job = broken
    from pathways_lite.controller.states import JobState

    reporter.transition("j", JobState.CANCELLED, reason="user_cancelled", message="bye")
    update = follower.get_nowait()
    assert update.job.id == "j" and update.job.state == controller_pb2.JOB_STATE_CANCELLED
    assert (update.job.reason, update.job.message) == ("user_cancelled", "bye")
