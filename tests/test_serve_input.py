"""A Generate request on the controller: checked before an island is touched, its time to
first token counted from before training yields the island, the island left when the host's
stream ends however slowly the client reads, and the dashboard's query parsed per parameter.

The router, the arbiter and the scheduler are real; the island host is a gRPC server that
streams a fixed generation (the engine's own tests are in test_serve_decode.py), and the
training job's cut takes CUT_S, as a step in progress would."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from pathways_lite.controller.islands import HostHandle, Island
from pathways_lite.controller.scheduler import Demand, Scheduler
from pathways_lite.controller.serve_router import ServeArbiter, ServeRouter
from pathways_lite.controller.store import JobStore
from pathways_lite.spec import load_spec_text
from pathways_lite.v1 import controller_pb2, worker_pb2, worker_pb2_grpc
from pathways_lite.workers.rpc import RpcRejection

pytestmark = pytest.mark.timeout(60)

SERVE = """\
name: srv
kind: serve
model: {preset: palm-tiny}
islands: 1
devices_per_island: 1
data: {source: stdlib, vocab_size: 1024, max_bytes: 1000000}
init_from: {job: src}
serve: {max_batch: 4, max_seq_len: 128, target_p99_ms: 5000}
"""
CUT_S = 0.3
TOKENS = 5


class _Host(worker_pb2_grpc.WorkerServiceServicer):
    """An island host's Generate: TOKENS tokens 10 ms apart, then the totals (its own time
    to first token: 1 ms, counted after the request reached it)."""

    def __init__(self) -> None:
        self.requests: list[worker_pb2.GenerateRequest] = []

    async def Generate(self, request, context):
        self.requests.append(request)
        for i in range(TOKENS):
            await asyncio.sleep(0.01)
            yield worker_pb2.GenerateReply(text=f"t{i} ", token=i)
        yield worker_pb2.GenerateReply(
            done=True, token=-1, finish_reason="length", tokens=TOKENS, ttft_ms=1.0
        )


class _Training:
    """The dispatcher's view of one training job on the island: a cut waits CUT_S (the rest
    of the step in progress)."""

    def __init__(self) -> None:
        self.cuts = 0

    def running(self, job_id: str) -> bool:
        return True

    async def cut(self, job_id: str) -> int:
        self.cuts += 1
        await asyncio.sleep(CUT_S)
        return 1


def _serve(tmp_path, test) -> None:
    """Run `await test(router, arbiter, host, training, job_id)` with a serve job serving
    on island i0 (one training job resident there) whose host is `_Host`."""
    store = JobStore(tmp_path / "controller.db")
    record = store.create_job(load_spec_text(SERVE))

    async def main() -> None:
        host = _Host()
        server = grpc.aio.server()
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(host, server)
        address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        channel = grpc.aio.insecure_channel(address)
        try:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            island = Island("i0", [HostHandle(address, channel, stub, worker_pb2.InfoReply())])
            scheduler = Scheduler(["i0"])
            scheduler.place(Demand("train", 1, 0), ["i0"])
            scheduler.join("train", ["i0"], 1.0)
            training = _Training()
            arbiter = ServeArbiter(scheduler, training)
            router = ServeRouter(store, arbiter)
            router.loading(record.id, [island])
            router.serving(record.id, 0, 4, 5000.0, max_seq_len=128)
            await test(router, arbiter, host, training, record.id)
        finally:
            await channel.close()
            await server.stop(0)

    try:
        asyncio.run(main())
    finally:
        store.close()


def _request(job_id: str, **kw) -> controller_pb2.GenerateJobRequest:
    return controller_pb2.GenerateJobRequest(job_id=job_id, prompt="def main(", **kw)


def test_a_request_the_host_would_refuse_never_cuts_training(tmp_path) -> None:
    """Settings out of range, too many or too long stop strings, max_tokens past
    serve.max_seq_len: refused naming the field before the island is cut. A seed takes all
    64 bits (the field is uint64, as the hosts'), none of which a request can get wrong."""

    async def test(router, arbiter, host, training, job_id) -> None:
        for bad, message in (
            ({"temperature": 11.0}, "temperature=11.0 must be in"),
            ({"top_p": 1.5}, "top_p=1.5 must be in"),
            ({"top_k": -1}, r"top_k=-1 must be in \[0, 2\*\*31\)"),
            ({"max_tokens": 128}, "max_tokens=128 leaves no room .* serve.max_seq_len=128"),
            ({"stop": ["x"] * 17}, "stop has 17 strings; at most 16"),
            ({"stop": ["a", "b", "c", "y" * 300]}, r"stop\[3\] is 300 characters long"),
            ({"stop": ["a", ""]}, r"stop\[1\] is empty"),
        ):
            with pytest.raises(ValueError, match=message):
                async for _ in router.generate(_request(job_id, **bad)):
                    pass
        assert training.cuts == 0 and not host.requests and "i0" not in arbiter.islands
        assert router.jobs[job_id].replicas[0].inflight == 0
        # A seed of 64 bits goes to the host whole (an int64 field could not carry the top bit).
        for seed in (2**40 + 5, 2**64 - 1):
            replies = [r async for r in router.generate(_request(job_id, seed=seed))]
            assert replies[-1].done and host.requests[-1].seed == seed

    _serve(tmp_path, test)


def test_time_to_first_token_includes_the_wait_for_training_to_yield(tmp_path) -> None:
    """The latency policy sees the request's wait for the cut (CUT_S), not the host's own
    time to first token (1 ms): training that delays requests makes holdoff grow."""

    async def test(router, arbiter, host, training, job_id) -> None:
        replies = [r async for r in router.generate(_request(job_id))]
        assert training.cuts == 1
        [(ttft_ms, _, tokens)] = arbiter.islands["i0"].latency
        assert ttft_ms >= CUT_S * 1e3 and tokens == TOKENS
        assert replies[-1].ttft_ms == ttft_ms
        assert router.jobs[job_id].finished[-1][1] == ttft_ms

    _serve(tmp_path, test)


def test_the_island_is_left_when_the_host_ends_not_when_a_slow_client_reads(tmp_path) -> None:
    """A client that stops reading a generation does not keep training off the island:
    `leave` comes with the host's last reply, once."""

    async def test(router, arbiter, host, training, job_id) -> None:
        stream = router.generate(_request(job_id))
        first = await stream.__anext__()
        assert not first.done and arbiter.islands["i0"].busy == 1
        deadline = time.monotonic() + 5
        while arbiter.islands["i0"].busy and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # the client reads nothing meanwhile
        st = arbiter.islands["i0"]
        assert st.busy == 0 and st.periods == 1 and not st.held
        assert router.jobs[job_id].replicas[0].inflight == 0
        rest = [r async for r in stream]  # every reply is still delivered, in order
        assert [r.text for r in [first, *rest][:-1]] == [f"t{i} " for i in range(TOKENS)]
        assert rest[-1].done and rest[-1].tokens == TOKENS
        assert st.busy == 0 and st.periods == 1 and len(st.latency) == 1  # left once

    _serve(tmp_path, test)


def test_the_dashboards_generate_query_names_the_parameter_it_cannot_use(tmp_path) -> None:
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    from pathways_lite.controller.core import Controller
    from pathways_lite.controller.dashboard import Dashboard

    store = JobStore(tmp_path / "controller.db")
    dashboard = Dashboard(Controller(store, []), token=None)

    async def status(query: str) -> tuple[int, str]:
        request = make_mocked_request(
            "GET", f"/api/jobs/srv/generate?prompt=hi&{query}", match_info={"job_id": "srv"}
        )
        with pytest.raises(web.HTTPException) as refused:
            await dashboard._api_generate(request)
        return refused.value.status, refused.value.text

    async def main() -> None:
        for query, message in (
            ("max_tokens=abc", "query parameter max_tokens='abc' is not an integer"),
            ("temperature=hot", "query parameter temperature='hot' is not a number"),
            ("top_k=99999999999", "query parameter top_k=99999999999 is out of range"),
            ("seed=1&top_p=x", "query parameter top_p='x' is not a number"),
            ("seed=-3", "query parameter seed=-3 is out of range [0, 2"),
            (f"seed={2**64}", f"query parameter seed={2**64} is out of range"),
        ):
            code, text = await status(query)
            assert code == 400 and message in text, (query, text)
        # Well formed (a seed takes all 64 bits): the job is unknown.
        for query in ("max_tokens=5&seed=7", f"seed={2**64 - 1}"):
            code, text = await status(query)
            assert code == 404, (query, text)

    try:
        asyncio.run(main())
    finally:
        store.close()


def test_a_stream_whose_host_dies_mid_generation_ends_unavailable_not_short(tmp_path) -> None:
    """The island dies while a request decodes (DeathWatch closes its channel: the read is
    cancelled): the caller gets UNAVAILABLE naming the island, not a shortened stream that
    looks finished (the relay's reader ended quietly on the cancel)."""

    async def test(router, arbiter, host, training, job_id) -> None:
        island = router.jobs[job_id].replicas[0].island
        stream = router.generate(_request(job_id))
        first = await stream.__anext__()
        assert not first.done
        await island.host_died(island.generation, "test: the host died")
        with pytest.raises(RpcRejection) as ended:
            async for _ in stream:
                pass
        assert ended.value.code == grpc.StatusCode.UNAVAILABLE and "i0" in ended.value.message
        assert router.jobs[job_id].replicas[0].inflight == 0
        assert arbiter.islands["i0"].busy == 0

    _serve(tmp_path, test)


def test_a_replica_whose_host_answers_unavailable_draws_no_requests_for_a_while(
    tmp_path,
) -> None:
    """Two replicas; the first's engine failed (its host answers UNAVAILABLE at once). After
    one request meets that, the next go to the other replica. Before, the failed one,
    its in-flight count always 0, drew nearly every request until the probe saw it (each
    cutting its island's training for nothing)."""

    class _Failed(worker_pb2_grpc.WorkerServiceServicer):
        def __init__(self) -> None:
            self.requests = 0

        async def Generate(self, request, context):
            self.requests += 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the serve loop failed")
            yield  # (a stream)

    store = JobStore(tmp_path / "controller.db")
    record = store.create_job(load_spec_text(SERVE))

    async def main() -> None:
        failed, good = _Failed(), _Host()
        servers, channels, islands = [], [], []
        for name, servicer in (("i0", failed), ("i1", good)):
            server = grpc.aio.server()
            worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server)
            address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
            await server.start()
            channel = grpc.aio.insecure_channel(address)
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            servers.append(server)
            channels.append(channel)
            islands.append(
                Island(name, [HostHandle(address, channel, stub, worker_pb2.InfoReply())])
            )
        try:
            router = ServeRouter(store, None)
            router.loading(record.id, islands)
            router.serving(record.id, 0, 4, 5000.0, max_seq_len=128)
            with pytest.raises(RpcRejection, match="the serve loop failed"):
                async for _ in router.generate(_request(record.id)):
                    pass
            for _ in range(3):
                replies = [r async for r in router.generate(_request(record.id))]
                assert replies[-1].done
            assert (failed.requests, len(good.requests)) == (1, 3)
        finally:
            for channel in channels:
                await channel.close()
            for server in servers:
                await server.stop(0)

    try:
        asyncio.run(main())
    finally:
        store.close()
