"""The job log buffer: records persist per job in the state dir, bounded and rotated."""

from __future__ import annotations

import pytest

from pathways_lite.controller import bus
from pathways_lite.v1 import controller_pb2

pytestmark = pytest.mark.timeout(60)


def record(i: int) -> controller_pb2.LogRecord:
    r = controller_pb2.LogRecord(source="island-0/0", level="INFO", logger="t", message=f"m{i}")
    r.time.FromNanoseconds(1_700_000_000_000_000_000 + i)
    return r


def test_job_logs_outlive_the_buffer_that_wrote_them(tmp_path) -> None:
    first = bus.LogBuffer(tmp_path)
    for i in range(5):
        first.add("job-a", record(i))
    first.close()  # the controller stops
    again = bus.LogBuffer(tmp_path)  # a new controller on the same state dir
    got = again.records("job-a")
    assert [r.message for r in got] == [f"m{i}" for i in range(5)]
    assert got[0].time.ToNanoseconds() == record(0).time.ToNanoseconds()
    assert [r.message for r in again.records("job-a", tail=2)] == ["m3", "m4"]
    assert again.records("job-b") == []


def test_a_job_log_is_rotated_and_bounded(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(bus, "LOG_FILE_BYTES", 2000)
    logs = bus.LogBuffer(tmp_path)
    for i in range(500):
        logs.add("job-a", record(i))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["job-a.log", "job-a.log.1"]
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) < 2 * 2000 + 400
    kept = [r.message for r in logs.records("job-a")]
    assert kept[-1] == "m499" and 10 < len(kept) < 500
    assert kept == [f"m{i}" for i in range(500 - len(kept), 500)]  # the newest, in order


def step(n: int) -> controller_pb2.WatchJobReply:
    return controller_pb2.WatchJobReply(metrics=controller_pb2.StepMetrics(step=n, loss=1.0))


def test_batched_watch_steps_follow_each_other_or_start_a_new_reply() -> None:
    """WatchJob's batch_steps (controller/service.py): the bus hands a watcher the step
    updates that follow the last one it read, up to a state change or a lost update; a reply
    carries only consecutive steps with consecutive sequence numbers, and the client's
    `unbatched` gives back each step with its own number."""
    from pathways_lite.client import unbatched
    from pathways_lite.controller.service import _step_batches

    events = bus.EventBus(queue_size=8)
    follower = events.subscribe("j")
    for n in range(3):
        events.publish("j", step(n))
    events.publish("j", controller_pb2.WatchJobReply(job=controller_pb2.Job(id="j")))
    events.publish("j", step(3))
    first = follower.get_nowait()
    taken = follower.take_steps(10)
    assert [u.metrics.step for u in taken] == [1, 2]  # not past the state change
    assert follower.last_seq == 3
    assert follower.get_nowait().HasField("job") and follower.take_steps(10)[0].seq == 5
    # A step run again (already sent) is left out and starts a new reply.
    again = [step(1), step(2), step(1), step(3)]
    for seq, update in enumerate(again, 2):
        update.seq = seq
    first.seq = 1
    replies = _step_batches(first, again)
    assert [[r.metrics.step, *(m.step for m in r.more_metrics)] for r in replies] == [
        [0, 1, 2],
        [3],
    ]
    assert [(r.seq, r.metrics.step) for r in unbatched(replies)] == [(1, 0), (2, 1), (3, 2), (5, 3)]
    # Lagging: updates lost are never taken past; the watcher resyncs first.
    for n in range(10, 20):
        events.publish("j", step(n))
    assert follower.take_steps(10) == [] and follower.take_dropped() == 2
