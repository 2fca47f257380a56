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
