"""The controller's in-memory event bus and job log buffer (WatchJob, StreamLogs, dashboard).

Every state change and completed step is published on the bus under the job's id (and handed
to the followers of ALL_JOBS as `(job_id, update)`); followers read their own bounded queue, so
publishing never blocks and a lagging follower loses the oldest updates, never the newest.
Every update carries a sequence number (per job; the ALL_JOBS followers see the bus's own),
kept beside it in the follower's queue: a follower reads them (`last_seq`) to prove that
nothing was lost, and one that lagged is told how many updates it lost (`take_dropped`) so it
resyncs from the store (WatchJob sends the record again and replays the metrics it missed; the
dashboard's streams send a `resync` event); a log follower that lagged gets a line saying how
many records it lost (`dropped_logs_record`). `dropped_total` counts them over the process.
WatchJob follows the bus, not the database. The log buffer keeps the newest records of each
job, fed by the controller's own loggers and by the island hosts' step reports; with a folder
(`<state_dir>/logs`) it writes them there too, one JSON line per record in `<job_id>.log`,
rotated to `<job_id>.log.1` past LOG_FILE_BYTES (so a job keeps at most twice that), and
serves them from there, so `pathways-lite logs` still has them after a restart.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import time
from pathlib import Path
from typing import IO, Any

from google.protobuf import timestamp_pb2

from pathways_lite.v1 import controller_pb2

# Log records kept per job, and jobs whose records are kept (oldest jobs' go first).
LOG_RECORDS_PER_JOB = 2000
LOG_JOBS = 256
# A job's log file is rotated past this size (one older file is kept).
LOG_FILE_BYTES = 512 * 1024
# Log files kept open at once (the least recently written are closed).
OPEN_LOG_FILES = 32
# Updates a slow WatchJob/StreamLogs follower may lag behind before old ones are dropped.
FOLLOWER_QUEUE = 10000
# The key that follows every job at once (the dashboard); never a job id (those are
# [A-Za-z0-9._-]).
ALL_JOBS = "*"


def now() -> timestamp_pb2.Timestamp:
    """The current time as a protobuf Timestamp."""
    return timestamp_ns(time.time_ns())  # GetCurrentTime goes through datetime: 3x slower


def timestamp_ns(ns: int) -> timestamp_pb2.Timestamp:
    """A protobuf Timestamp of `ns` nanoseconds since the epoch."""
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def dropped_logs_record(count: int) -> controller_pb2.LogRecord:
    """The line a log follower gets in place of `count` records it lagged too far to get."""
    return controller_pb2.LogRecord(
        time=now(),
        source="controller",
        level="WARNING",
        logger=__name__,
        message=f"... {count} log records dropped (the reader was too slow) ...",
    )


def _first_seq(item: Any, last: int) -> int:
    """The first sequence number of a queued item whose last is `last` (a reply of several
    steps takes several)."""
    if isinstance(item, controller_pb2.WatchJobReply) and item.more_metrics:
        return item.seq
    return last


class Follower(asyncio.Queue):
    """A follower's bounded queue of updates, each kept with its sequence number.

    Attributes:
        last_seq: the sequence number of the update read last (0 before any).
        dropped: updates lost to lagging since the last `take_dropped`.
    """

    def __init__(self, maxsize: int = FOLLOWER_QUEUE) -> None:
        super().__init__(maxsize)
        self.last_seq = 0
        self.dropped = 0

    def _put(self, entry: tuple[int, Any]) -> None:
        self._queue.append(entry)

    def _get(self) -> Any:
        self.last_seq, item = self._queue.popleft()
        return item

    def offer(self, seq: int, item: Any) -> int:
        """Enqueue without blocking (`seq`: the item's last sequence number); when full, drop
        the oldest (counted by the updates it stood for). Returns how many were dropped."""
        lost = 0
        if self.full():
            last, oldest = self._queue.popleft()
            lost = last - _first_seq(oldest, last) + 1
            self.dropped += lost
        self.put_nowait((seq, item))
        return lost

    def take_steps(self, limit: int) -> list[Any]:
        """Take at most `limit` step updates (WatchJobReply with `metrics`) from the head of
        the queue while each one's sequence number follows the last read; none after a drop
        (the caller resyncs first)."""
        taken: list[Any] = []
        queue = self._queue
        while queue and len(taken) < limit and not self.dropped:
            seq, item = queue[0]
            if not item.HasField("metrics") or item.seq != self.last_seq + 1:
                break
            queue.popleft()
            self.last_seq = seq
            taken.append(item)
        return taken

    def take_dropped(self) -> int:
        """How many updates were lost since the last call (0: none; resync when not)."""
        dropped, self.dropped = self.dropped, 0
        return dropped


class EventBus:
    """Subscriber queues per key; publishing never blocks (a lagging follower loses the
    oldest updates, never the newest, and is told so).

    Args:
        queue_size: updates a follower may lag behind.
    """

    def __init__(self, queue_size: int = FOLLOWER_QUEUE) -> None:
        self._queues: dict[str, set[Follower]] = collections.defaultdict(set)
        self.queue_size = queue_size
        # The latest sequence number per key (ALL_JOBS: over every job).
        self.seq: collections.Counter[str] = collections.Counter()
        self.dropped_total = 0

    def subscribe(self, key: str) -> Follower:
        queue = Follower(self.queue_size)
        queue.last_seq = self.seq[key]
        self._queues[key].add(queue)
        return queue

    def unsubscribe(self, key: str, queue: asyncio.Queue) -> None:
        self._queues[key].discard(queue)
        if not self._queues[key]:
            del self._queues[key]

    def followed(self, key: str) -> bool:
        """Whether anyone follows `key` (directly or through ALL_JOBS)."""
        return bool(self._queues.get(key)) or bool(self._queues.get(ALL_JOBS))

    def publish(self, key: str, item: Any, count: int = 1) -> None:
        """Hand `item` to the followers of `key`, and `(key, item)` to those of ALL_JOBS,
        each with the next sequence number of its key. An item that stands for `count`
        updates (a reply of consecutive steps: `metrics`, then `more_metrics`) takes as many
        numbers of its job's, the first on the item; one of ALL_JOBS's."""
        self.seq[key] += count
        if isinstance(item, controller_pb2.WatchJobReply):
            item.seq = self.seq[key] - count + 1  # the same for every follower of the job
        for queue in self._queues.get(key, ()):
            self.dropped_total += queue.offer(self.seq[key], item)
        if key != ALL_JOBS:
            self.seq[ALL_JOBS] += 1
            for queue in self._queues.get(ALL_JOBS, ()):
                self.dropped_total += queue.offer(self.seq[ALL_JOBS], (key, item))


class LogBuffer(logging.Handler):
    """A bounded buffer of job log records, fed by the controller's own loggers (records
    logged with `extra={"job_id": ...}`) and by the island hosts' step reports.

    Args:
        folder: where each job's records persist (rotated files); None keeps them in memory
            only.
    """

    def __init__(self, folder: str | Path | None = None) -> None:
        super().__init__(logging.INFO)
        self._records: collections.OrderedDict[str, collections.deque] = collections.OrderedDict()
        self.folder = None if folder is None else Path(folder)
        self._files: collections.OrderedDict[str, IO[str]] = collections.OrderedDict()
        self.followers = EventBus()
        self.loop: asyncio.AbstractEventLoop | None = None

    def add(self, job_id: str, record: controller_pb2.LogRecord) -> None:
        """Buffer a record of `job_id` and hand it to followers (call on the serving loop)."""
        if self.folder is not None:
            self._write(job_id, record)
        buffer = self._records.get(job_id)
        if buffer is None:
            buffer = self._records[job_id] = collections.deque(maxlen=LOG_RECORDS_PER_JOB)
            while len(self._records) > LOG_JOBS:
                self._records.popitem(last=False)
        buffer.append(record)
        self.followers.publish(job_id, record)

    def records(self, job_id: str, tail: int = 0) -> list[controller_pb2.LogRecord]:
        """The job's records, oldest first (the newest `tail` when > 0)."""
        if self.folder is None:
            records = list(self._records.get(job_id, ()))
        else:
            records = []
            path = self._path(job_id)
            for name in (path.with_name(path.name + ".1"), path):
                try:
                    lines = name.read_text(errors="replace").splitlines()
                except OSError:
                    continue
                records += [r for r in map(_from_line, lines) if r is not None]
        return records[-tail:] if tail > 0 else records

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()
        super().close()

    def _path(self, job_id: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{job_id}.log"

    def _write(self, job_id: str, record: controller_pb2.LogRecord) -> None:
        path = self._path(job_id)
        try:
            handle = self._files.pop(job_id, None)
            if handle is not None and handle.tell() > LOG_FILE_BYTES:
                handle.close()
                os.replace(path, path.with_name(path.name + ".1"))
                handle = None
            if handle is None:
                path.parent.mkdir(parents=True, exist_ok=True)
                handle = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
            self._files[job_id] = handle
            while len(self._files) > OPEN_LOG_FILES:
                self._files.popitem(last=False)[1].close()
            handle.write(_to_line(record) + "\n")
        except OSError as e:  # a full disk must not stop the controller
            logging.getLogger(__name__).warning("writing the log of job %s: %s", job_id, e)

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


def _to_line(record: controller_pb2.LogRecord) -> str:
    return json.dumps(
        {
            "time_ns": record.time.ToNanoseconds(),
            "source": record.source,
            "level": record.level,
            "logger": record.logger,
            "message": record.message,
        }
    )


def _from_line(line: str) -> controller_pb2.LogRecord | None:
    try:
        fields = json.loads(line)
        record = controller_pb2.LogRecord(
            source=fields["source"],
            level=fields["level"],
            logger=fields["logger"],
            message=fields["message"],
        )
        record.time.FromNanoseconds(int(fields["time_ns"]))
    except (ValueError, KeyError, TypeError):  # a line cut by a crash
        return None
    return record
