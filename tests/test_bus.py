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


def steps(*ns: int) -> controller_pb2.WatchJobReply:
    """One bus update carrying the steps `ns` (the first in `metrics`, as the Reporter
    publishes a batch)."""
    reply = controller_pb2.WatchJobReply(metrics=controller_pb2.StepMetrics(step=ns[0], loss=1.0))
    reply.more_metrics.extend(controller_pb2.StepMetrics(step=n, loss=1.0) for n in ns[1:])
    return reply


def test_step_batches_are_numbered_step_by_step_and_replied_without_a_gap() -> None:
    """The Reporter publishes a job's steps once per flush, as one bus update numbered like as
    many updates; WatchJob (controller/service.py) takes the step updates that follow the last
    one read, up to a state change or a lost update, and replies with consecutive steps only,
    in batches or one per step; the client's `unbatched` gives back each step with its
    number."""
    from pathways_lite.client import unbatched
    from pathways_lite.controller.service import _step_replies

    events = bus.EventBus(queue_size=4)
    follower = events.subscribe("j")
    events.publish("j", steps(0, 1, 2), count=3)
    events.publish("j", steps(3), count=1)
    events.publish("j", controller_pb2.WatchJobReply(job=controller_pb2.Job(id="j")))
    events.publish("j", steps(4, 5), count=2)
    first = follower.get_nowait()
    assert (first.seq, follower.last_seq) == (1, 3)
    taken = follower.take_steps(10)
    assert [u.seq for u in taken] == [4] and follower.last_seq == 4  # not past the record
    assert follower.get_nowait().HasField("job") and follower.take_steps(10)[0].seq == 6
    # Batched: a reply per update; whole updates are passed as they are (shared, no copy).
    replies = _step_replies([first, *taken], -1, batch=True)
    assert [r is u for r, u in zip(replies, [first, *taken], strict=True)] == [True, True]
    assert [(r.seq, r.metrics.step) for r in unbatched(replies)] == [(1, 0), (2, 1), (3, 2), (4, 3)]
    # Steps already sent (run again after a rollback) are left out (the rest of the update
    # copied into a reply of its own); a gap in the steps starts a new reply.
    again = steps(2, 3)
    again.seq = 5
    later = steps(5)
    later.seq = 8
    replies = _step_replies([first, again, later], 1, batch=True)
    assert [(r.seq, r.metrics.step, len(r.more_metrics)) for r in replies] == [
        (3, 2, 0),
        (6, 3, 0),
        (8, 5, 0),
    ]
    assert [(r.seq, r.metrics.step) for r in unbatched(replies)] == [(3, 2), (6, 3), (8, 5)]
    following = steps(3, 4)
    following.seq = 4
    together = _step_replies([first, following], 1, batch=True)
    assert [(r.seq, r.metrics.step, len(r.more_metrics)) for r in together] == [
        (3, 2, 0),
        (4, 3, 1),
    ]
    assert together[1] is following
    one_each = _step_replies([first], 0, batch=False)
    assert [(r.seq, r.metrics.step) for r in one_each] == [(2, 1), (3, 2)]
    assert _step_replies([later], 4, batch=False)[0] is later  # one step: passed as it is
    # Lagging: a dropped update counts its steps, and nothing is taken past the loss.
    for n in range(10, 18, 2):
        events.publish("j", steps(n, n + 1), count=2)
    events.publish("j", steps(20, 21, 22), count=3)
    assert follower.take_steps(10) == [] and follower.take_dropped() == 2


def test_a_reply_carries_at_most_batch_steps_max_steps_and_never_a_step_twice() -> None:
    """A watcher that lagged takes many flushes at once: its replies stay under gRPC's message
    limit (BATCH_STEPS_MAX steps each); a batch whose steps do not follow each other (a
    rollback inside it) is never passed on whole."""
    from pathways_lite.controller.service import BATCH_STEPS_MAX, _step_replies

    big = steps(*range(BATCH_STEPS_MAX + 10))
    big.seq = 1
    replies = _step_replies([big], -1, batch=True)
    assert [(r.seq, r.metrics.step, len(r.more_metrics)) for r in replies] == [
        (1, 0, BATCH_STEPS_MAX - 1),
        (BATCH_STEPS_MAX + 1, BATCH_STEPS_MAX, 9),
    ]
    rolled_back = steps(48, 49, 50, 45, 46, 51)
    rolled_back.seq = 100
    replies = _step_replies([rolled_back], 47, batch=True)
    assert [(r.seq, [r.metrics.step, *(m.step for m in r.more_metrics)]) for r in replies] == [
        (100, [48, 49, 50]),
        (105, [51]),
    ]
