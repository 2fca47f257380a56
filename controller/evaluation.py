"""Evaluations of a job's parameters: the Evaluate rpc on its first island, stored per source.

`kind: eval` jobs run one after loading their checkpoint; `train.eval_every` runs one every N
steps of a training job and after its last (between steps on the hosts; the result names the
steps its parameters had applied). Every host of the island runs the same SPMD program
(workers/evaluation.py); host 0's reply is stored, one row per source (controller/store.py),
with an `eval` event.
"""

from __future__ import annotations

import logging
import math

from pathways_lite.v1 import worker_pb2

from . import spec as spec_lib
from .islands import Island
from .store import EvalRow, JobRecord, JobStore

logger = logging.getLogger(__name__)

EVAL_TIMEOUT_S = 1800.0


async def evaluate_job(
    island: Island, record: JobRecord, store: JobStore, step: int | None = None
) -> list[EvalRow]:
    """Evaluate a loaded job's current parameters with its spec's `eval` settings on
    `island`, and store the result at `step` (default: the steps its parameters applied).

    Raises:
        grpc.aio.AioRpcError: a host could not evaluate.
    """
    settings = spec_lib.eval_settings(record.spec)
    request = worker_pb2.EvaluateRequest(
        job_id=record.id,
        max_examples=settings.max_examples,
        shots=settings.shots,
        split=settings.split,
    )
    reply = (await island.call("Evaluate", request, timeout=EVAL_TIMEOUT_S))[0]
    rows = [
        EvalRow(
            source=s.name,
            loss=s.loss,
            perplexity=math.exp(min(s.loss, 700.0)),  # exp overflows past ~709
            exact_match=s.exact_match if s.text_to_text else None,
            token_f1=s.token_f1 if s.text_to_text else None,
            examples=s.examples,
        )
        for s in reply.sources
    ]
    step = int(reply.steps_applied) if step is None else step
    store.record_eval(record.id, step, settings.shots, rows)
    logger.info(
        "job %s evaluated at step %d in %.1f s: %s",
        record.id,
        step,
        reply.seconds,
        ", ".join(f"{r.source} loss {r.loss:.4f}" for r in rows),
        extra={"job_id": record.id},
    )
    return rows
