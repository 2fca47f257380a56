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
