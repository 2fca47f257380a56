"""The peer endpoint of an island host: worker.proto's ExchangeService.

Host i of every island of a job streams host i of the others chunks of gradient parts (and
parameter digests) with ExchangeGradients (workers/exchange.py has the algorithm). The
servicer files each chunk in the host's `Mailbox`, where the job's runtime thread waits for
it; it checks only that the job is loaded here in the chunk's generation. It also owns the
host's channels to its peers (`Peers`), the interceptor that counts received exchange bytes
(`ByteCounter`), gives a loaded job's runtime its `JobExchange` (`connect`), and serves the
worker service's Abort and ExchangeStats (`abort`, `stats`). Served on the worker service's
port; its clients are the peers, never the controller.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from pathways_lite.v1 import worker_pb2, worker_pb2_grpc

from .auth import Credential
from .exchange import ByteCounter, ExchangeAbortedError, JobExchange, Mailbox, Peers
from .peer_restore import state_chunks
from .rpc import RpcRejection, error_mapping
from .runtime import IslandJobSpec, JobRuntime, JobSpecError, RuntimeUnavailableError
from .tls import TlsConfig

logger = logging.getLogger(__name__)

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["ExchangeService"].full_name

_rpc = error_mapping(
    (
        (ExchangeAbortedError, grpc.StatusCode.ABORTED),
        (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
        (RuntimeUnavailableError, grpc.StatusCode.FAILED_PRECONDITION),
    ),
    log=logger,
)


class ExchangeServicer(worker_pb2_grpc.ExchangeServiceServicer):
    """ExchangeService of one island host.

    Args:
        loaded: The spec of a job loaded on this host; raises RpcRejection (NOT_FOUND or
            INVALID_ARGUMENT naming the job id) otherwise.
        credential: The cluster credential this host presents to its peers (the server's
            interceptor, workers/auth.py, checks theirs before a chunk is parsed); None only
            for in-process servers of tests and benchmarks.
        tls: The cluster's TLS setting: peers off loopback (or all, `--tls on`) are dialled
            over TLS verified against the cluster CA.
    """

    def __init__(
        self,
        loaded: Callable[[str], IslandJobSpec],
        credential: Credential | None = None,
        tls: TlsConfig | None = None,
    ) -> None:
        self._loaded = loaded
        self.mailbox = Mailbox()
        self.peers = Peers(credential, tls)
        self.byte_counter = ByteCounter()
        # Set by the worker service: (the pieces of a job's state a FetchState asks for,
        # the state's leaf count), read on its runtime thread (workers/peer_restore.py).
        self.state_source: Callable[[Any], Awaitable[tuple[list, int]]] | None = None

    def add_to_server(self, server: grpc.aio.Server) -> None:
        worker_pb2_grpc.add_ExchangeServiceServicer_to_server(self, server)

    @_rpc
    async def ExchangeGradients(self, request_iterator, context) -> Any:
        """File a peer's chunks in the mailbox; the runtime thread waits on them."""
        accepted = 0
        async for chunk in request_iterator:
            spec = self._loaded(chunk.job_id)
            if chunk.generation != spec.generation:
                raise RpcRejection(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"generation={chunk.generation} does not match job {chunk.job_id!r}'s "
                    f"loaded generation {spec.generation}.",
                )
            if chunk.source_island >= spec.num_islands:
                raise RpcRejection(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"source_island={chunk.source_island} is out of range for "
                    f"num_islands={spec.num_islands}.",
                )
            self.mailbox.deliver(chunk)  # ABORTED after an Abort, INVALID_ARGUMENT if misfit
            accepted += len(chunk.data)
        return worker_pb2.ExchangeGradientsReply(bytes=accepted)

    @_rpc
    async def FetchState(self, request: worker_pb2.FetchStateRequest, context) -> Any:
        """Stream a restarted peer the parts of a job's state it asks for, in chunks."""
        if self.state_source is None:
            raise RpcRejection(
                grpc.StatusCode.UNIMPLEMENTED, "this host serves no job state to its peers."
            )
        pieces, num_leaves = await self.state_source(request)
        for chunk in state_chunks(pieces, num_leaves, request.chunk_bytes):
            yield chunk

    def connect(self, runtime: JobRuntime, loop: asyncio.AbstractEventLoop) -> None:
        """Give the runtime of a job on several islands its exchange with the peers (without
        peers, an island trains on its slice alone: the wiring tests of the probe job).

        Raises:
            JobSpecError: the job spans islands but its runtime cannot exchange gradients.
        """
        spec = runtime.spec
        if spec.num_islands < 2 or not spec.peers:
            return
        if not runtime.supports_exchange:
            raise JobSpecError(
                f"model.preset={spec.preset!r} cannot train across islands: its runtime does "
                f"not exchange gradients (num_islands={spec.num_islands})."
            )
        self.mailbox.clear_abort(spec.job_id, spec.generation)
        runtime.exchange = JobExchange(
            loop,
            self.mailbox,
            self.peers,
            job_id=spec.job_id,
            generation=spec.generation,
            island_index=spec.island_index,
            addresses=spec.peers,
            timeout_s=spec.exchange_timeout_s,
        )

    def abort(self, job_id: str, generation: int, reason: str) -> int:
        """Release the exchanges of (job, generation) (the Abort rpc); returns how many."""
        released = self.mailbox.abort(job_id, generation, reason[:200])
        logger.warning(
            "job %s generation %d aborted (%d waits released): %s",
            job_id,
            generation,
            released,
            reason[:200],
        )
        return released

    def stats(self, job_id: str = "") -> worker_pb2.ExchangeStatsReply:
        """Exchange bytes received per job and step, as counted by the interceptor."""
        return worker_pb2.ExchangeStatsReply(
            steps=[
                worker_pb2.StepExchangeBytes(
                    job_id=job, step=step, wire_bytes=wire, payload_bytes=payload, chunks=chunks
                )
                for job, step, wire, payload, chunks in self.byte_counter.snapshot(job_id)
            ]
        )
