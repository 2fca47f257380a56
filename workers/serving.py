"""Serving an island host's WorkerService: `serve` (on the caller's loop) and
`BackgroundServer` (its own loop in a daemon thread, inside the Ray actor).

The worker service, the peers' ExchangeService, grpc.health.v1 and reflection share one port.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc

from pathways_lite.v1 import worker_pb2

from . import exchange_service, rpc
from .auth import host_auth
from .exchange import MAX_MESSAGE_BYTES

if TYPE_CHECKING:
    from .service import WorkerServicer

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name


async def serve(
    servicer: WorkerServicer,
    host: str,
    port: int = 0,
    *,
    started: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
    grace_s: float = 5.0,
) -> None:
    """Serve WorkerService, ExchangeService, grpc.health.v1 and reflection on host:port
    until `stop` is set (workers/rpc.py's `serve`).

    Args:
        servicer: The worker servicer (its `exchange` is the ExchangeService).
        host: Address to bind (the node's IP).
        port: Port to bind; 0 picks a free one.
        started: Called with the bound port once the server accepts calls.
        stop: Set to stop the server; None serves until cancelled.
        grace_s: Seconds in-flight calls get to finish when stopping.
    """
    m = servicer.metadata
    # The credential check comes first: a refused call never reaches the byte counter's
    # deserializer, let alone a servicer.
    interceptors: list[grpc.aio.ServerInterceptor] = [servicer.exchange.byte_counter]
    if servicer.credential is not None:
        interceptors.insert(0, host_auth(servicer.credential))
    tls = servicer.tls
    credentials = tls.server_credentials() if tls is not None and tls.wanted(host) else None
    await rpc.serve(
        f"worker service of island {m.island} host {m.host_index}",
        {
            SERVICE_NAME: servicer.add_to_server,
            exchange_service.SERVICE_NAME: servicer.exchange.add_to_server,
        },
        host,
        port,
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)],
        interceptors=interceptors,
        credentials=credentials,
        bound=servicer.set_port,
        started=started,
        stop=stop,
        grace_s=grace_s,
        stopped=servicer.exchange.peers.close,
    )


class BackgroundServer(rpc.ServerThread):
    """Runs `serve()` on its own event loop in a daemon thread (inside the Ray actor).

    Args:
        servicer: The worker servicer.
        host: Address to bind.
        port: Port to bind; 0 picks a free one.
    """

    def __init__(self, servicer: WorkerServicer, host: str, port: int = 0) -> None:
        self.servicer = servicer
        super().__init__(
            lambda started, stop: serve(servicer, host, port, started=started, stop=stop),
            name="worker service",
            thread_name="worker-grpc",
        )

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop serving (in-flight calls get the grace period) and close the servicer."""
        super().stop(timeout_s)
        self.servicer.close()
