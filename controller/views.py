"""Views: every wire and dashboard representation of jobs and islands, built in one place.

`job_record_proto` is what the store knows of a job (state, spec, times, progress); `Views.job`
adds what only the controller knows (its islands, its place in the queue and why it waits, the
latest step's metrics), and is the one job view: GetJob, ListJobs, WatchJob and the dashboard
all show it. `job_summary` turns that wire record into the dashboard's JSON and `step_point`
is one step as its charts plot it. Also here: the one islands view, the one `StepMetrics`
builder (MFU against the job's devices' peak), and `why`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from google.protobuf import timestamp_pb2

from pathways_lite.v1 import controller_pb2

from . import lineage
from . import spec as spec_lib
from .islands import Island
from .pipeline import stage_lines
from .resolved import ResolvedJob
from .scheduler import Scheduler
from .states import JobState
from .store import QUEUED_EVENT, JobRecord, JobStore

logger = logging.getLogger(__name__)

# Steps remembered per island for the dashboard's timeline of who ran when.
TIMELINE_STEPS = 600
WAITING = "Waiting for the scheduler's next pass."


def job_peak_flops(devices: int, host_peaks: Sequence[float], cpu_peak: float | None) -> float:
    """The peak FLOP/s a job's MFU is measured against: `devices` x the hosts' measured
    per-device accelerator peak (the smallest, when islands differ), or, when the hosts are
    simulated CPU devices (peak 0), the machine's `cpu_peak` they share (0 while unknown)."""
    measured = [p for p in host_peaks if p > 0]
    if measured and len(measured) == len(host_peaks):
        return devices * min(measured)
    return cpu_peak or 0.0


def timestamp_us(us: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromMicroseconds(us)
    return ts


def job_record_proto(
    store: JobStore,
    record: JobRecord,
    *,
    include_losses: bool = True,
    new: bool = False,
    step_losses: bool = True,
) -> controller_pb2.Job:
    """The wire record of a stored job (queue position and islands are the scheduler's to
    fill); `new`: a job just created, with nothing recorded (the store is not read);
    `step_losses`: with `include_losses`, whether `losses` carries every step's."""
    job = controller_pb2.Job(
        id=record.id,
        name=record.name,
        state=record.state.to_proto(),
        reason=record.reason,
        message=record.message,
        generation=record.generation,
        steps_completed=0 if new else store.steps_completed(record.id),
    )
    job.spec.CopyFrom(record.spec)
    job.depends_on.extend(lineage.dependencies(record.spec))
    if include_losses and not new:
        if step_losses:
            job.losses.extend(store.losses(record.id))
        job.evals.extend(eval_protos(store.evals(record.id)))
    job.created_at.CopyFrom(timestamp_us(record.created_us))
    job.updated_at.CopyFrom(timestamp_us(record.updated_us))
    if record.started_us is not None:
        job.started_at.CopyFrom(timestamp_us(record.started_us))
    if record.finished_us is not None:
        job.finished_at.CopyFrom(timestamp_us(record.finished_us))
    return job


def eval_protos(rows: Sequence[Any]) -> list[controller_pb2.EvalResult]:
    """The store's per-source eval rows grouped into one EvalResult per evaluation."""
    out: list[controller_pb2.EvalResult] = []
    for row in rows:
        if (
            not out
            or (out[-1].step, out[-1].shots) != (row.step, row.shots)
            or (row.source in out[-1].sources)
        ):
            out.append(
                controller_pb2.EvalResult(
                    step=row.step, shots=row.shots, time=timestamp_us(row.time_us)
                )
            )
        entry = out[-1].sources[row.source]
        entry.loss, entry.perplexity, entry.examples = row.loss, row.perplexity, row.examples
        if row.exact_match is not None:
            entry.exact_match = row.exact_match
        if row.token_f1 is not None:
            entry.token_f1 = row.token_f1
    return out


def eval_json(result: controller_pb2.EvalResult) -> dict[str, Any]:
    """One evaluation as `pathways-lite eval --json` and the dashboard show it."""
    sources = {}
    for name, e in sorted(result.sources.items()):
        entry: dict[str, Any] = {
            "loss": _finite(e.loss),
            "perplexity": _finite(e.perplexity),
            "examples": e.examples,
        }
        if e.HasField("exact_match"):
            entry["exact_match"] = e.exact_match
        if e.HasField("token_f1"):
            entry["token_f1"] = e.token_f1
        sources[name] = entry
    return {"step": result.step, "shots": result.shots, "sources": sources}


def job_summary(job: controller_pb2.Job) -> dict[str, Any]:
    """One job as the dashboard's jobs list and job page show it, from its wire record.

    Times are seconds since the epoch (None when not reached); `loss`, `tokens_per_s` and
    `mfu` are the latest step's (None before the first step).
    """
    last = job.last_metrics if job.HasField("last_metrics") else None
    return {
        "id": job.id,
        "name": job.name,
        "state": JobState.from_proto(job.state).value,
        "steps_completed": job.steps_completed,
        "steps": job.spec.train.steps,
        "loss": None if last is None else _finite(last.loss),
        "tokens_per_s": None if last is None else last.tokens_per_s,
        "mfu": None if last is None else job.mfu,
        "phase": job.phase,
        "priority": spec_lib.priority(job.spec),
        "weight": spec_lib.weight(job.spec),
        "queue_position": job.queue_position,
        "islands": list(job.islands),
        "model": job.spec.model.preset,
        "reason": job.reason,
        "message": job.message,
        "created": _seconds(job, "created_at"),
        "started": _seconds(job, "started_at"),
        "finished": _seconds(job, "finished_at"),
        "kind": spec_lib.job_kind(job.spec),
        "depends_on": list(job.depends_on),
        "init_from": (
            job.spec.init_from.job or job.spec.init_from.checkpoint
            if job.spec.HasField("init_from")
            else None
        ),
        "init_checkpoint": job.init_checkpoint,
        "evals": [eval_json(e) for e in job.evals],
    }


def step_point(
    step: int, loss: float, tokens_per_s: float, time_s: float, mfu: float
) -> dict[str, Any]:
    """One completed step as the dashboard's charts plot it (a non-finite loss is None)."""
    return {
        "step": step,
        "loss": _finite(loss),
        "tokens_per_s": tokens_per_s,
        "mfu": mfu,
        "time": time_s,
    }


def resumed_step(message: str) -> int:
    """The step a `restore` (or `resume`) event's sentence says the job resumed from (recovery.py's
    "Resumed from the checkpoint at step N ..." or "Resumed from step 0: ...")."""
    found = re.search(r"step (\d+)", message)
    return int(found.group(1)) if found else 0


def _seconds(job: controller_pb2.Job, field: str) -> float | None:
    return getattr(job, field).ToMicroseconds() / 1e6 if job.HasField(field) else None


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


@dataclasses.dataclass(slots=True)  # (not frozen: built per step, 3x faster)
class TimelineEntry:
    """One step of one job on one island, as host 0 of the island timed it."""

    job_id: str
    step: int
    start_ns: int
    end_ns: int
    island_seq: int = 0


class Views:
    """Builds the controller's views of jobs and islands.

    Args:
        store: the job store.
        scheduler: who holds which islands, and which are down.
        islands: the islands by id (their hosts' facts).
        pending: why each queued job waits (controller/admission.py keeps it).
        resolved: a job's ResolvedJob (None when the spec no longer resolves).
    """

    def __init__(
        self,
        store: JobStore,
        scheduler: Scheduler,
        islands: Mapping[str, Island],
        pending: Mapping[str, str],
        resolved: Callable[[JobRecord], ResolvedJob | None],
        *,
        peak_flops: float | None = None,
        peak_cache_dir: str | None = None,
    ) -> None:
        self.store = store
        self.scheduler = scheduler
        self.islands = islands
        self.pending = pending
        # Running jobs' scheduling notes (admission's: backfilled ahead of whom).
        self.notes: Mapping[str, str] = {}
        self._resolved = resolved
        # The machine's peak FLOP/s for MFU on simulated CPU islands and where it came from
        # ("--peak-flops", "cached" or "measured"): set by `measure_peak`, or the override.
        self.peak_flops: float | None = peak_flops
        self.peak_source = "--peak-flops" if peak_flops else ""
        self._peak_cache_dir = peak_cache_dir
        self._peak_lock = threading.Lock()
        # What each running job does before its first step (jobs.py's Reporter.phase).
        self.phases: dict[str, str] = {}
        self.timeline: dict[str, collections.deque[TimelineEntry]] = {
            island_id: collections.deque(maxlen=TIMELINE_STEPS) for island_id in islands
        }

    def measure_peak(self) -> float:
        """This machine's matmul FLOP/s, read from the per-machine cache or measured once
        and cached there (blocking; run it off the loop); `--peak-flops` overrides both."""
        with self._peak_lock:
            if self.peak_flops is None:
                from pathways_lite.model import estimates
                from pathways_lite.model.tokenizer import default_cache_dir

                self.peak_flops, self.peak_source = estimates.cached_peak_flops(
                    self._peak_cache_dir or default_cache_dir()
                )
                logger.info("peak %.4g FLOP/s for MFU (%s)", self.peak_flops, self.peak_source)
        return self.peak_flops

    def job_peak(self, record: JobRecord) -> float:
        """The peak FLOP/s the job's MFU is measured against (0 while unknown)."""
        return job_peak_flops(
            record.spec.islands * record.spec.devices_per_island,
            [h.info.peak_flops_per_device for i in self.islands.values() for h in i.hosts],
            self.peak_flops,
        )

    def island_peak(self, island: Island) -> float:
        """The peak FLOP/s a job on all of `island`'s devices is measured against (0 while
        unknown)."""
        return job_peak_flops(
            island.devices, [h.info.peak_flops_per_device for h in island.hosts], self.peak_flops
        )

    def mfu(self, record: JobRecord, tokens_per_s: float) -> float:
        """Model FLOPs utilisation at `tokens_per_s`; 0 while the peak is unknown.

        The peak is the job's devices' (`job_peak_flops`): on accelerator islands, the
        hosts' measured per-device peak times the job's devices; on simulated CPU islands,
        this machine's measured matmul FLOP/s (`measure_peak`), which they all share.
        """
        peak = self.job_peak(record)
        if not peak or tokens_per_s <= 0:
            return 0.0
        job = self._resolved(record)
        return 0.0 if job is None else tokens_per_s * job.flops_per_token / peak

    def step_metrics(
        self,
        record: JobRecord,
        step: int,
        loss: float,
        tokens_per_s: float,
        step_time_s: float,
        time: timestamp_pb2.Timestamp,
        mfu: float | None = None,
        sources: str | None = None,
    ) -> controller_pb2.StepMetrics:
        """One step's metrics as the wire carries them (MFU computed when not given;
        `sources`: a mixture step's per-source JSON as the store keeps it)."""
        metrics = controller_pb2.StepMetrics(time=time)
        self.fill_step_metrics(metrics, record, step, loss, tokens_per_s, step_time_s, mfu, sources)
        return metrics

    def fill_step_metrics(
        self,
        into: controller_pb2.StepMetrics,
        record: JobRecord,
        step: int,
        loss: float,
        tokens_per_s: float,
        step_time_s: float,
        mfu: float | None = None,
        sources: str | None = None,
    ) -> None:
        """`step_metrics` but its time, filled in place (a reply's repeated field built where
        it lies: a built message would be copied into it, at 2 us a step)."""
        into.step = step
        into.loss = loss
        into.tokens_per_s = tokens_per_s
        into.step_time_s = step_time_s
        into.mfu = self.mfu(record, tokens_per_s) if mfu is None else mfu
        if sources:
            d = json.loads(sources)
            into.source_loss.update(d.get("loss", {}))
            into.source_tokens.update(d.get("tokens", {}))

    def job(
        self,
        record: JobRecord,
        *,
        include_losses: bool = True,
        queued: Sequence[JobRecord] | None = None,
        new: bool = False,
        step_losses: bool = True,
    ) -> controller_pb2.Job:
        """The job as the wire and the dashboard show it.

        Args:
            record: the job.
            include_losses: whether to carry every step's loss.
            queued: the queued jobs in scheduling order, when the caller builds many views
                at once (a page of jobs); None reads them from the store when it is queued.
            new: a job just created (store.create_jobs): its only event is its queuing, and
                the store is not read for steps, losses, evals or events.
            step_losses: with `include_losses`, whether `losses` carries every step's
                (False: the detailed view without them, for WatchJob's records, whose
                followers have the steps: 8 bytes a step made a long job's record pass
                gRPC's 4 MiB reply limit, and each was read from the store again).
        """
        job = job_record_proto(
            self.store, record, include_losses=include_losses, new=new, step_losses=step_losses
        )
        job.islands.extend(self.scheduler.islands_of(record.id))
        if record.state == JobState.RUNNING:
            job.phase = self.phases.get(record.id, "")
        if include_losses and record.spec.HasField("pipeline"):
            job.stage_layout.extend(stage_lines(record.spec, list(job.islands)))
        if include_losses and new:
            job.events.add(time=timestamp_us(record.created_us), kind="state", message=QUEUED_EVENT)
        elif include_losses:  # the detailed view (GetJob, WatchJob) carries the events
            for event in self.store.events(record.id):
                job.events.add(
                    time=timestamp_us(event.time_us), kind=event.kind, message=event.message
                )
                if event.kind in ("restore", "resume"):  # recovery.py's load
                    job.resumed_from_step = resumed_step(event.message)
                if event.kind == "init":  # jobs.py: the init_from checkpoint it started from
                    job.init_checkpoint = lineage.init_path(event.message)
        if record.state == JobState.QUEUED:
            # The queue's ids only (no spec parsed): the store keeps them until a job changes.
            ids = (
                [row[0] for row in self.store.queue_keys([JobState.QUEUED])]
                if queued is None
                else [r.id for r in queued]
            )
            job.queue_position = 1 + next(
                (i for i, job_id in enumerate(ids) if job_id == record.id), len(ids)
            )
            job.jobs_ahead.extend(ids[: job.queue_position - 1])
            job.pending_reason = self.pending.get(record.id, WAITING)
        elif record.state == JobState.SUSPENDED:
            job.pending_reason = self.pending.get(record.id, "")
        # The count and the last row are two reads: a rollback on the controller's thread
        # may truncate the metrics between them (this runs on the service's thread).
        latest = (
            self.store.metrics(record.id, from_step=job.steps_completed - 1)[-1:]
            if job.steps_completed
            else []
        )
        for last in latest:
            job.last_metrics.CopyFrom(
                self.step_metrics(
                    record,
                    last.step,
                    last.loss,
                    last.tokens_per_s,
                    last.step_time_s,
                    timestamp_us(last.time_us),
                    last.mfu,
                )
            )
            job.mfu = job.last_metrics.mfu
        return job

    def why(self, record: JobRecord) -> str:
        """One sentence: why the job is (not) running."""
        if record.state == JobState.QUEUED:
            return self.pending.get(record.id, WAITING)  # admission.py says which jobs it waits for
        if record.state == JobState.RUNNING:
            islands = ", ".join(self.scheduler.islands_of(record.id)) or "its islands"
            note = self.notes.get(record.id)
            return f"Running on {islands}." + (f" {note}" if note else "")
        if record.state == JobState.SUSPENDED and record.id in self.pending:
            return self.pending[record.id]  # why it has not resumed yet, as of the last pass
        return f"The job is {record.state.value}" + (
            f": {record.message}" if record.message else "."
        )

    def island_list(self, *, include_steps: bool = False) -> list[controller_pb2.Island]:
        """Every island, its hosts and the jobs resident on it (and its recent steps, in the
        order it ran them, with `include_steps`)."""
        out = []
        for island in self.islands.values():
            down = island.id in self.scheduler.down
            hosts = [
                controller_pb2.IslandHost(
                    node=info.node_ip,
                    address=info.address,
                    port=info.port,
                    pid=info.pid,
                    devices=len(info.devices),
                    device_kind=info.devices[0].platform if info.devices else "",
                    memory_bytes=info.memory_budget_bytes_per_device * len(info.devices),
                    wire_version=info.wire_version,
                    state="dead" if down else "ready",
                )
                for info in (host.info for host in island.hosts)
            ]
            out.append(
                controller_pb2.Island(
                    id=island.id,
                    hosts=hosts,
                    devices=island.devices,
                    job_ids=self.scheduler.jobs_on(island.id),
                    down=self.scheduler.down.get(island.id, ""),
                    peak_flops=self.island_peak(island),
                    peak_flops_source=(
                        "measured on the devices"
                        if any(h.info.peak_flops_per_device > 0 for h in island.hosts)
                        else self.peak_source
                    ),
                    recent_steps=[
                        controller_pb2.IslandStep(
                            job_id=e.job_id,
                            step=e.step,
                            island_seq=e.island_seq,
                            start_unix_ns=e.start_ns,
                            end_unix_ns=e.end_ns,
                        )
                        for e in sorted(self.timeline.get(island.id, ()), key=lambda e: e.start_ns)
                    ]
                    if include_steps
                    else [],
                )
            )
        return out
