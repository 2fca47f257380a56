"""workers/rpc.py: one error mapping for unary and streaming servicer methods, and one
server start-up (health, reflection, bind errors), as both gRPC servers use them."""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from pathways_lite.v1 import worker_pb2, worker_pb2_grpc
from pathways_lite.workers import rpc

pytestmark = pytest.mark.timeout(60)


class Aborted(Exception):
    """What a grpc.aio context's abort raises, with the status it was given."""


class Context:
    async def abort(self, code: grpc.StatusCode, message: str) -> None:
        raise Aborted(code, message)


class NotFound(LookupError):
    pass


class Infeasible(ValueError):
    def __init__(self, message: str) -> None:
        super().__init__("str() of an Infeasible is not its message")
        self.message = message


_rpc = rpc.error_mapping(
    (
        (Infeasible, grpc.StatusCode.RESOURCE_EXHAUSTED),  # before its base class
        (NotFound, grpc.StatusCode.NOT_FOUND),
        (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    )
)


class Servicer:
    @_rpc
    async def Unary(self, error, context):
        """A unary method."""
        if error is not None:
            raise error
        return "ok"

    @_rpc
    async def Stream(self, error, context):
        yield 1
        if error is not None:
            raise error
        yield 2


async def status(method, error) -> tuple[grpc.StatusCode, str] | object:
    try:
        result = method(error, Context())
        if hasattr(result, "__aiter__"):
            return [item async for item in result]
        return await result
    except Aborted as e:
        return e.args


@pytest.mark.parametrize("kind", ["Unary", "Stream"])
def test_exceptions_map_to_their_status_in_table_order_with_their_message(kind: str) -> None:
    method = getattr(Servicer(), kind)
    cases = [
        (rpc.RpcRejection(grpc.StatusCode.ABORTED, "own code"), grpc.StatusCode.ABORTED),
        (Infeasible("too big: 9 > 8"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (NotFound("job 'x' not found"), grpc.StatusCode.NOT_FOUND),
        (ValueError("seq_len=0 must be positive"), grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for error, code in cases:
        want = error.message if hasattr(error, "message") else str(error)
        assert asyncio.run(status(method, error)) == (code, want)
    assert asyncio.run(status(method, None)) == ("ok" if kind == "Unary" else [1, 2])


def test_an_unexpected_exception_is_internal_naming_the_method() -> None:
    code, message = asyncio.run(status(Servicer().Unary, KeyError("boom")))
    assert code == grpc.StatusCode.INTERNAL
    assert message == "Unary failed: KeyError('boom')"
    assert Servicer.Unary.__name__ == "Unary" and Servicer.Unary.__doc__ == "A unary method."


def test_a_cancellation_is_not_mapped() -> None:
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(status(Servicer().Unary, asyncio.CancelledError()))


class Info(worker_pb2_grpc.WorkerServiceServicer):
    async def Info(self, request, context):
        return worker_pb2.InfoReply(island="x")


NAME = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name


async def serve_once(port: int = 0) -> tuple[int, list[str]]:
    """Serve, call Info, health and reflection, stop; returns the port and the hooks run."""
    stop, ran, bound = asyncio.Event(), [], asyncio.get_running_loop().create_future()

    async def stopped() -> None:
        ran.append("stopped")

    task = asyncio.ensure_future(
        rpc.serve(
            "test service",
            {NAME: lambda s: worker_pb2_grpc.add_WorkerServiceServicer_to_server(Info(), s)},
            "127.0.0.1",
            port,
            options=[("grpc.max_receive_message_length", 1024)],
            bound=lambda p: ran.append("bound"),
            started=bound.set_result,
            stop=stop,
            stopped=stopped,
        )
    )
    port = await bound
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        assert (
            await worker_pb2_grpc.WorkerServiceStub(channel).Info(worker_pb2.InfoRequest())
        ).island == "x"
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", NAME):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        raw = channel.unary_unary(f"/{NAME}/Info")
        with pytest.raises(grpc.aio.AioRpcError) as err:  # the receive limit applies
            await raw(b"\x00" * 4096)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    stop.set()
    await task
    return port, ran


def test_serve_answers_health_and_stops_on_the_event_running_its_hooks() -> None:
    port, ran = asyncio.run(serve_once())
    assert port > 0 and ran == ["bound", "stopped"]


def test_serve_reflects_the_named_services() -> None:
    async def main() -> set[str]:
        stop, bound = asyncio.Event(), asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(
            rpc.serve(
                "test service",
                {NAME: lambda s: None},
                "127.0.0.1",
                started=bound.set_result,
                stop=stop,
            )
        )
        port = await bound
        try:
            return await asyncio.to_thread(reflected, port)
        finally:
            stop.set()
            await task

    def reflected(port: int) -> set[str]:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            return set(ProtoReflectionDescriptorDatabase(channel).get_services())

    assert {NAME, rpc.HEALTH_SERVICE_NAME} <= asyncio.run(main())


def test_a_port_in_use_is_an_os_error_naming_the_address() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(OSError, match=f"test service to 127.0.0.1:{port}"):
            asyncio.run(rpc.serve("test service", {}, "127.0.0.1", port))
