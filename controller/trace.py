"""A job's trace: the execution logs of the hosts of its islands, gathered for `trace`.

Every island host keeps the steps it ran (the ExecutionLog rpc: start and end of each step,
and a pipeline stage's microbatch forwards, backwards and exchange as slices). The controller
asks every host of the job's islands (all islands when the job has none recorded) and passes
the entries on unchanged, co-resident jobs' steps included, so the trace shows what shared the
hosts; the client turns them into a Chrome trace (pathways_lite/trace.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from pathways_lite.v1 import controller_pb2, worker_pb2

from .islands import Island

logger = logging.getLogger(__name__)

TRACE_TIMEOUT_S = 30.0


async def job_trace(job_id: str, islands: Sequence[Island]) -> controller_pb2.TraceReply:
    """The execution logs of every host of `islands`, in island then host order."""
    hosts = [(island, index, host) for island in islands for index, host in enumerate(island.hosts)]

    async def one(host) -> worker_pb2.ExecutionLogReply | None:
        try:
            return await host.stub.ExecutionLog(
                worker_pb2.ExecutionLogRequest(), timeout=TRACE_TIMEOUT_S
            )
        except Exception as e:  # noqa: BLE001 - a dead host is left out of the trace
            logger.warning("trace of job %s: host %s gave no log: %s", job_id, host.address, e)
            return None

    logs = await asyncio.gather(*(one(host) for _, _, host in hosts))
    reply = controller_pb2.TraceReply(job_id=job_id)
    for (island, index, host), log in zip(hosts, logs, strict=True):
        trace = reply.hosts.add(island=island.id, host_index=index, address=host.address)
        for e in log.entries if log is not None else ():
            trace.steps.add(
                job_id=e.job_id,
                generation=e.generation,
                step=e.step,
                start_unix_ns=e.start_unix_ns,
                end_unix_ns=e.end_unix_ns,
                slices=[
                    controller_pb2.TraceSpan(
                        name=s.name, start_unix_ns=s.start_unix_ns, end_unix_ns=s.end_unix_ns
                    )
                    for s in e.slices
                ],
            )
    return reply


def pipeline_gantt(
    reply: controller_pb2.TraceReply, stages: int, microbatches: int, last_steps: int = 2
) -> dict:
    """The dashboard's pipeline chart of a pipeline job's trace (hosts in the job's island
    order, stage-major): one row per stage (host 0 of replica 0's island), its microbatch
    forwards and backwards of the newest `last_steps` steps as bars (ms from the first), and
    the measured bubble beside the theoretical (S - 1) / (M + S - 1).

    The measured bubble of a step: 1 - (a stage's microbatch busy time) / (the step's span
    from the first microbatch start to the last microbatch end over all stages), averaged
    over the stages and the steps shown.
    """
    job = reply.job_id
    replicas = max(1, len({h.island for h in reply.hosts}) // max(stages, 1))
    islands: list[str] = []
    for h in reply.hosts:
        if h.island not in islands:
            islands.append(h.island)
    rows: list[list] = []
    for s in range(stages):
        index = s * replicas
        host = next(
            (h for h in reply.hosts if index < len(islands) and h.island == islands[index]), None
        )
        steps = [e for e in (host.steps if host else []) if e.job_id == job and e.slices]
        rows.append(steps)
    shown = sorted({e.step for row in rows for e in row})[-last_steps:]
    bars, bubbles = [], []
    origin = min(
        (p.start_unix_ns for row in rows for e in row if e.step in shown for p in e.slices),
        default=0,
    )
    for step in shown:
        parts = [
            (s, p)
            for s, row in enumerate(rows)
            for e in row
            if e.step == step
            for p in e.slices
            if p.name != "exchange"
        ]
        if not parts:
            continue
        span = max(p.end_unix_ns for _, p in parts) - min(p.start_unix_ns for _, p in parts)
        for s in range(stages):
            busy = sum(p.end_unix_ns - p.start_unix_ns for t, p in parts if t == s)
            if span > 0:
                bubbles.append(1.0 - busy / span)
        for s, p in parts:
            bars.append(
                {
                    "stage": s,
                    "step": step,
                    "name": p.name,
                    "kind": "forward" if p.name.startswith("F") else "backward",
                    "start_ms": (p.start_unix_ns - origin) / 1e6,
                    "duration_ms": (p.end_unix_ns - p.start_unix_ns) / 1e6,
                }
            )
    return {
        "stages": stages,
        "microbatches": microbatches,
        "steps": shown,
        "bars": bars,
        "bubble_measured": sum(bubbles) / len(bubbles) if bubbles else None,
        "bubble_theory": (stages - 1) / (microbatches + stages - 1),
    }
