"""Serving (issue 18): which serve jobs answer requests, on which islands, and the Generate
stream routed to the least-loaded replica.

A `kind: serve` job's runner (jobs.py) registers its replicas (one per island) as loading,
then as serving once every replica's StartServe has compiled; preemption, cancel or a drain
stop them, ending the open streams with UNAVAILABLE naming why (the hosts do that). Tokens come
from the island hosts (workers/serve_rpc.py); the controller only routes and relays.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Sequence

import grpc

from pathways_lite.v1 import controller_pb2, worker_pb2
from pathways_lite.workers.rpc import RpcRejection

from .islands import Island
from .states import IllegalTransitionError
from .store import JobStore

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 64
MAX_PROMPT_CHARS = 10_000
GENERATE_TIMEOUT_S = 600.0
# Latency samples kept per job (the dashboard's serve page and `why`).
WINDOW = 4096


@dataclasses.dataclass
class Replica:
    island: Island
    inflight: int = 0


@dataclasses.dataclass
class Served:
    """A serve job as the router sees it."""

    job_id: str
    replicas: list[Replica]
    status: str = "loading"  # loading | serving
    kv_cache_bytes: int = 0
    slots: int = 0  # cache slots over all replicas
    requests: int = 0
    tokens: int = 0
    # (unix seconds, ttft ms, ms per token, tokens) per finished request.
    finished: collections.deque = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=WINDOW)
    )


class ServeRouter:
    """The controller's serving jobs and the Generate stream."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.jobs: dict[str, Served] = {}

    def loading(self, job_id: str, islands: Sequence[Island]) -> Served:
        served = Served(job_id, [Replica(i) for i in islands])
        self.jobs[job_id] = served
        return served

    def serving(self, job_id: str, kv_cache_bytes: int, max_batch: int = 0) -> None:
        served = self.jobs.get(job_id)
        if served is not None:
            served.status = "serving"
            served.kv_cache_bytes = kv_cache_bytes
            served.slots = max_batch * len(served.replicas)

    def stopped(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)

    def stats(self, job_id: str, window_s: float = 60.0) -> dict:
        """Requests/s, tokens/s, occupancy and latency percentiles over the last window."""
        served = self.jobs.get(job_id)
        if served is None:
            return {}
        cut = time.time() - window_s
        recent = [f for f in served.finished if f[0] >= cut]

        def pct(values: list[float], q: float) -> float:
            if not values:
                return 0.0
            values = sorted(values)
            return values[min(len(values) - 1, int(q * len(values)))]

        ttft = [f[1] for f in recent]
        per = [f[2] for f in recent]
        return {
            "status": served.status,
            "replicas": [r.island.id for r in served.replicas],
            "inflight": sum(r.inflight for r in served.replicas),
            "slots": served.slots,
            "requests": served.requests,
            "tokens": served.tokens,
            "requests_per_s": len(recent) / window_s,
            "tokens_per_s": sum(f[3] for f in recent) / window_s,
            "ttft_p50_ms": pct(ttft, 0.5),
            "ttft_p99_ms": pct(ttft, 0.99),
            "token_p50_ms": pct(per, 0.5),
            "token_p99_ms": pct(per, 0.99),
            "kv_cache_bytes": served.kv_cache_bytes,
        }

    async def generate(
        self, request: controller_pb2.GenerateJobRequest
    ) -> AsyncIterator[controller_pb2.GenerateJobReply]:
        """Stream a generation from the job's least-loaded replica.

        Raises:
            JobNotFoundError (unknown job), IllegalTransitionError (not serving, loading),
            ValueError (bad prompt or setting), RpcRejection (the host's own answer).
        """
        record = self.store.find_job(request.job_id)
        served = self.jobs.get(record.id)
        if served is None:
            kind = record.spec.kind if record.spec.HasField("kind") else "train"
            if kind == "serve" and record.state.value == "running":
                raise IllegalTransitionError(
                    f"job {record.id!r} is loading its parameters; try again shortly."
                )
            hint = (
                " (use `pathways-lite sample` for a job that is not serving)"
                if kind != "serve"
                else ""
            )
            raise IllegalTransitionError(
                f"job {record.id!r} ({kind}, {record.state.value}) is not serving{hint}."
            )
        if served.status == "loading":
            raise IllegalTransitionError(f"job {record.id!r} is loading; try again shortly.")
        if not request.prompt:
            raise ValueError("prompt is empty; give some text to continue.")
        if len(request.prompt) > MAX_PROMPT_CHARS:
            raise ValueError(
                f"prompt is {len(request.prompt)} characters; at most {MAX_PROMPT_CHARS}."
            )
        max_tokens = request.max_tokens or DEFAULT_MAX_TOKENS
        if max_tokens < 0:
            raise ValueError(f"max_tokens={request.max_tokens} must be >= 1.")
        if request.top_k < 0:
            raise ValueError(f"top_k={request.top_k} must be >= 0.")
        live = [r for r in served.replicas if r.island.dead is None]
        if not live:
            raise RpcRejection(
                grpc.StatusCode.UNAVAILABLE,
                f"every replica of job {record.id!r} is on a dead island "
                f"({served.replicas[0].island.dead}); the job recovers or fails shortly.",
            )
        replica = min(live, key=lambda r: r.inflight)
        host = replica.island.hosts[0]
        wire = worker_pb2.GenerateRequest(
            job_id=record.id,
            prompt=request.prompt,
            max_tokens=max_tokens,
            temperature=request.temperature,
            top_k=request.top_k,
            top_p=request.top_p,
            seed=max(0, request.seed),
            stop=list(request.stop),
        )
        call = None
        replica.inflight += 1
        try:
            served.requests += 1
            call = host.stub.Generate(wire, timeout=GENERATE_TIMEOUT_S, metadata=host.metadata())
            async for reply in call:
                if reply.done:
                    served.tokens += reply.tokens
                    served.finished.append(
                        (time.time(), reply.ttft_ms, reply.ms_per_token, reply.tokens)
                    )
                yield controller_pb2.GenerateJobReply(
                    text=reply.text,
                    token=reply.token,
                    done=reply.done,
                    finish_reason=reply.finish_reason,
                    tokens=reply.tokens,
                    ttft_ms=reply.ttft_ms,
                    ms_per_token=reply.ms_per_token,
                    island=replica.island.id,
                    job_id=record.id,
                )
        except grpc.aio.AioRpcError as e:
            code = e.code()
            if code == grpc.StatusCode.NOT_FOUND:  # unloaded under us: not serving any more
                code = grpc.StatusCode.UNAVAILABLE
            raise RpcRejection(code, e.details() or str(code)) from None
        except grpc.aio.UsageError as e:  # the host's channel closed (its island died)
            raise RpcRejection(
                grpc.StatusCode.UNAVAILABLE,
                f"island {replica.island.id} of job {record.id!r} is not reachable: {e}",
            ) from None
        finally:
            replica.inflight -= 1
            if call is not None:
                call.cancel()  # a client that went away frees its slot on the host
