"""The controller's in-memory event bus and job log buffer (WatchJob, StreamLogs, dashboard).

Every state change and completed step is published on the bus under the job's id (and handed
to the followers of ALL_JOBS as `(job_id, update)`); followers read their own bounded queue, so
publishing never blocks and a lagging follower loses the oldest updates, never the newest.
WatchJob follows the bus, not the database. The log buffer keeps the newest records of each
job, fed by the controller's own loggers and by the island hosts' step reports.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any

from google.protobuf import timestamp_pb2

from pathways_lite.v1 import controller_pb2

# Log records kept per job, and jobs whose records are kept (oldest jobs' go first).
LOG_RECORDS_PER_JOB = 2000
LOG_JOBS = 256
# Updates a slow WatchJob/StreamLogs follower may lag behind before old ones are dropped.
FOLLOWER_QUEUE = 10000
# The key that follows every job at once (the dashboard); never a job id (those are
# [A-Za-z0-9._-]).
ALL_JOBS = "*"


def now() -> timestamp_pb2.Timestamp:
    """The current time as a protobuf Timestamp."""
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts


class EventBus:
    """Subscriber queues per key; publishing never blocks (a lagging follower loses the
    oldest updates, never the newest)."""

    def __init__(self) -> None:
        self._queues: dict[str, set[asyncio.Queue]] = collections.defaultdict(set)

    def subscribe(self, key: str) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(FOLLOWER_QUEUE)
        self._queues[key].add(queue)
        return queue

    def unsubscribe(self, key: str, queue: asyncio.Queue) -> None:
        self._queues[key].discard(queue)
        if not self._queues[key]:
            del self._queues[key]

    def publish(self, key: str, item: Any) -> None:
        """Hand `item` to the followers of `key`, and `(key, item)` to those of ALL_JOBS."""
        targets = [(q, item) for q in self._queues.get(key, ())]
        if key != ALL_JOBS:
            targets += [(q, (key, item)) for q in self._queues.get(ALL_JOBS, ())]
        for queue, value in targets:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(value)


class LogBuffer(logging.Handler):
    """A bounded in-memory buffer of job log records, fed by the controller's own loggers
    (records logged with `extra={"job_id": ...}`) and by the island hosts' step reports."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self._records: collections.OrderedDict[str, collections.deque] = collections.OrderedDict()
        self.followers = EventBus()
        self.loop: asyncio.AbstractEventLoop | None = None

    def add(self, job_id: str, record: controller_pb2.LogRecord) -> None:
        """Buffer a record of `job_id` and hand it to followers (call on the serving loop)."""
        buffer = self._records.get(job_id)
        if buffer is None:
            buffer = self._records[job_id] = collections.deque(maxlen=LOG_RECORDS_PER_JOB)
            while len(self._records) > LOG_JOBS:
                self._records.popitem(last=False)
        buffer.append(record)
        self.followers.publish(job_id, record)

    def records(self, job_id: str, tail: int = 0) -> list[controller_pb2.LogRecord]:
        records = list(self._records.get(job_id, ()))
        return records[-tail:] if tail > 0 else records

    def emit(self, record: logging.LogRecord) -> None:
        job_id = getattr(record, "job_id", None)
        if not job_id or self.loop is None:
            return
        ts = timestamp_pb2.Timestamp()
        ts.FromNanoseconds(int(record.created * 1e9))
        proto = controller_pb2.LogRecord(
            time=ts,
            source="controller",
            level=record.levelname,
            logger=record.name,
            message=record.getMessage(),
        )
        try:
            self.loop.call_soon_threadsafe(self.add, job_id, proto)
        except RuntimeError:  # the loop is closed: the controller is stopping
            pass
