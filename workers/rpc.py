"""Serving gRPC: one server start-up and one exception-to-status mapping for every server.

Both the worker service of an island host and the controller service are grpc.aio servers
with the same life: build the server (options, interceptors), add the servicers, serve the
standard health service (SERVING for "" and every named service) and reflection, bind
host:port, start, report the bound port, wait for a stop event, then enter the health
service's graceful shutdown and stop with a grace period (`serve`). `ServerThread` runs such
a coroutine on its own event loop in a daemon thread (inside a Ray actor, in tests).

Every servicer method is wrapped by the decorator `error_mapping(table)` makes: a
`RpcRejection` aborts with its own status; an exception of a class in the (ordered) table
aborts with that class's status and the exception's message (`e.message` when it has one,
else `str(e)`); a cancellation is re-raised; anything else is a bug, logged and answered
INTERNAL "<Method> failed: <repr>", and never takes the server down.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

logger = logging.getLogger(__name__)

# Adds one servicer to a server (a generated `add_XxxServicer_to_server` with its servicer).
Register = Callable[[grpc.aio.Server], None]
# (exception class, status) pairs, tried in order: put subclasses before their bases.
ErrorTable = Sequence[tuple[type[BaseException], grpc.StatusCode]]

HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class RpcRejection(Exception):
    """A request refused with a gRPC status; the message is a sentence naming the value."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _message(error: BaseException) -> str:
    message = getattr(error, "message", None)
    return message if isinstance(message, str) else str(error)


def error_mapping(
    table: ErrorTable = (), *, log: logging.Logger | None = None
) -> Callable[[Callable], Callable]:
    """A decorator for async servicer methods that answers exceptions with their status.

    Works on unary and client-streaming methods (`async def`) and on server-streaming ones
    (async generators). `RpcRejection` is always mapped first, to its own code.

    Args:
        table: (exception class, status code) pairs, tried in order.
        log: where an unexpected exception is logged (default: this module's logger).

    Returns:
        The decorator; the wrapped method keeps its name and docstring.
    """
    log = log or logger

    def status_of(error: BaseException) -> tuple[grpc.StatusCode, str] | None:
        if isinstance(error, RpcRejection):
            return error.code, error.message
        for cls, code in table:
            if isinstance(error, cls):
                return code, _message(error)
        return None

    async def answer(name: str, error: Exception, context: grpc.aio.ServicerContext) -> None:
        mapped = status_of(error)
        if mapped is None:  # a bug must not take the server down
            log.error("%s failed", name, exc_info=error)
            mapped = grpc.StatusCode.INTERNAL, f"{name} failed: {error!r}"
        await context.abort(*mapped)

    def decorate(method: Callable) -> Callable:
        if inspect.isasyncgenfunction(method):

            @functools.wraps(method)
            async def stream(self, request, context):
                try:
                    async for item in method(self, request, context):
                        yield item
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    await answer(method.__name__, e, context)

            return stream

        @functools.wraps(method)
        async def unary(self, request, context):
            try:
                return await method(self, request, context)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                await answer(method.__name__, e, context)

        return unary

    return decorate


async def _call(hook: Callable[..., Any] | None, *args: Any) -> None:
    if hook is not None:
        result = hook(*args)
        if inspect.isawaitable(result):
            await result


async def serve(
    name: str,
    services: Mapping[str, Register],
    host: str,
    port: int = 0,
    *,
    options: Sequence[tuple[str, Any]] = (),
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
    bound: Callable[[int], Awaitable[None] | None] | None = None,
    started: Callable[[int], Any] | None = None,
    stop: asyncio.Event | None = None,
    grace_s: float = 5.0,
    stopped: Callable[[], Awaitable[None] | None] | None = None,
) -> None:
    """Serve `services`, grpc.health.v1 and reflection on host:port until `stop` is set.

    Args:
        name: What the server is, for the bind error and the log ("worker service").
        services: Full service name -> a function adding its servicer to the server. Health
            reports SERVING for "" and each of these names; reflection lists them.
        host: Address to bind.
        port: Port to bind; 0 picks a free one.
        options: grpc.aio server options (e.g. `grpc.max_receive_message_length`).
        interceptors: Server interceptors, outermost first.
        credentials: TLS credentials (workers/tls.py); None serves plaintext.
        bound: Called (and awaited when it returns an awaitable) with the bound port before
            the server starts; an exception there stops the start-up.
        started: Called with the bound port once the server accepts calls.
        stop: Set to stop the server; None serves until the server terminates or the
            coroutine is cancelled.
        grace_s: Seconds in-flight calls get to finish when stopping.
        stopped: Called (and awaited) after the server stopped, even after a failure.

    Raises:
        OSError: host:port could not be bound.
    """
    server = grpc.aio.server(options=list(options), interceptors=list(interceptors) or None)
    for register in services.values():
        register(server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (*services, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    try:
        if credentials is None:
            port_bound = server.add_insecure_port(f"{host}:{port}")
        else:
            port_bound = server.add_secure_port(f"{host}:{port}", credentials)
    except RuntimeError as e:  # grpcio >= 1.6x raises where older versions returned 0
        raise OSError(f"could not bind the {name} to {host}:{port}: {e}") from e
    if port_bound == 0:
        raise OSError(f"could not bind the {name} to {host}:{port}.")
    await _call(bound, port_bound)
    try:
        await server.start()
        for service in ("", *services):
            await health.set(service, health_pb2.HealthCheckResponse.SERVING)
        tls = "TLS" if credentials is not None else "plaintext"
        logger.info("%s serving on %s:%d (%s)", name, host, port_bound, tls)
        if started is not None:
            started(port_bound)
        if stop is None:
            await server.wait_for_termination()
        else:
            await stop.wait()
    finally:
        await health.enter_graceful_shutdown()
        await server.stop(grace_s)
        await _call(stopped)


class ServerThread:
    """Runs a server coroutine on its own event loop in a daemon thread.

    Args:
        run: Makes the coroutine to run, given `started(port)` to call once it accepts calls
            and the stop event to wait on (pass both to `serve`).
        name: What the server is, in errors and logs ("worker service").
        thread_name: The thread's name.
    """

    def __init__(
        self,
        run: Callable[[Callable[[int], None], asyncio.Event], Awaitable[None]],
        name: str = "gRPC server",
        thread_name: str = "grpc-server",
    ) -> None:
        self._run_server = run
        self._name = name
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._bound = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)
        self.port = 0

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            self._stop = asyncio.Event()

            def started(port: int) -> None:
                self.port = port
                self._bound.set()

            await self._run_server(started, self._stop)

        try:
            self._loop.run_until_complete(main())
        except BaseException as e:
            self._error = e
            logger.exception("%s stopped with an error", self._name)
        finally:
            self._bound.set()
            self._cancel_pending()
            self._loop.close()

    def _cancel_pending(self) -> None:
        """Cancel the loop's tasks still pending and let them end, as `asyncio.run` does: a
        thread waiting on one (a step's gradient exchange, run here from the runtime thread)
        is released, not left waiting for ever on a closed loop."""
        try:
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            if pending:
                self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        except Exception:  # noqa: BLE001 - closing anyway
            logger.exception("%s: cancelling its pending tasks failed", self._name)

    def start(self, timeout_s: float = 30.0) -> int:
        """Start serving; return the bound port.

        Raises:
            TimeoutError: the server did not start within `timeout_s`.
            RuntimeError: the server failed to start (the cause is chained).
        """
        self._thread.start()
        if not self._bound.wait(timeout_s):
            raise TimeoutError(f"{self._name} did not start within {timeout_s} s.")
        if self._error is not None:
            raise RuntimeError(f"{self._name} failed to start: {self._error!r}")
        return self.port

    def stop(self, timeout_s: float = 10.0) -> None:
        """Set the stop event and wait up to `timeout_s` for the thread to finish."""
        if self._thread.is_alive() and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout_s)
