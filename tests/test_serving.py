"""A `kind: serve` job on a real cluster (issue 18): loaded from another job's checkpoint,
answering Generate streams over real gRPC (and server-sent events, and the CLI) from the
island host's continuous batching loop, beside a training job; its errors; its end."""

from __future__ import annotations

import concurrent.futures
import json
import time
import urllib.error
import urllib.parse
import urllib.request

import grpc
import pytest

from pathways_lite import cli
from pathways_lite.client import ClientError, ControllerClient, state_name
from pathways_lite.controller import auth
from pathways_lite.spec import SpecError, load_spec_text
from pathways_lite.v1 import controller_pb2, controller_pb2_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

COMMON = """\
model: {preset: palm-tiny}
islands: 1
devices_per_island: 2
mesh: {data: 1, model: 2}
data: {source: stdlib, vocab_size: 1024, max_bytes: 1000000}
"""
SOURCE = f"""\
name: srv-src
{COMMON}train: {{steps: 3, global_batch: 4, seq_len: 64, seed: 1}}
optimizer: {{learning_rate: 0.05, warmup_steps: 0}}
"""
SERVE = f"""\
name: srv
kind: serve
{COMMON}init_from: {{job: srv-src}}
train: {{global_batch: 4, seq_len: 64}}
serve: {{max_batch: 4, max_seq_len: 128, target_p99_ms: 5000}}
"""
CO_TRAIN = f"""\
name: srv-cotrain
{COMMON}train: {{steps: 12, global_batch: 4, seq_len: 64, seed: 2}}
"""
PROMPT = "def main("


def _text(client: ControllerClient, job: str, prompt: str = PROMPT, **kw) -> tuple[str, dict]:
    pieces, final = [], {}
    for r in client.generate(job, prompt, **kw):
        if r.done:
            final = {"reason": r.finish_reason, "tokens": r.tokens, "island": r.island}
        else:
            pieces.append(r.text)
    return "".join(pieces), final


def _code(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(ClientError) as e:
        fn()
    return e.value.code, str(e.value)


def test_serve_spec_rules() -> None:
    with pytest.raises(SpecError, match="kind='serve' needs init_from"):
        load_spec_text(SERVE.replace("init_from: {job: srv-src}\n", ""), validate=True)
    with pytest.raises(SpecError, match="serve.max_batch=0"):
        load_spec_text(SERVE.replace("max_batch: 4", "max_batch: 0"), validate=True)
    with pytest.raises(SpecError, match="serve.max_seq_len=4096"):
        load_spec_text(SERVE.replace("max_seq_len: 128", "max_seq_len: 4096"), validate=True)
    with pytest.raises(SpecError, match="serve settings only apply to kind='serve'"):
        load_spec_text(SOURCE + "serve: {max_batch: 2}\n", validate=True)
    with pytest.raises(SpecError, match="pipeline is only for train jobs"):
        load_spec_text(SERVE + "pipeline: {stages: 2}\n", validate=True)
    spec = load_spec_text(
        SERVE.replace("serve: {max_batch: 4, max_seq_len: 128, target_p99_ms: 5000}\n", "")
    )
    from pathways_lite.controller import spec as spec_lib

    assert spec_lib.serve_settings(spec, 256) == spec_lib.ServeSettings(8, 256, 200.0)


def test_a_serve_job_on_a_multi_host_island_is_refused_as_the_users_failure() -> None:
    from pathways_lite.controller.islands import Island
    from pathways_lite.controller.jobs import check_serve_islands
    from pathways_lite.controller.recovery import FailureClass, classify

    check_serve_islands([Island("island-0", [None])])
    with pytest.raises(Exception, match="island-1 has 2 hosts") as refused:
        check_serve_islands([Island("island-0", [None]), Island("island-1", [None, None])])
    assert classify(refused.value) == FailureClass.USER  # failed at once, never retried


def test_a_job_started_from_a_serve_job_names_its_kind(tmp_path) -> None:
    from pathways_lite.controller import lineage
    from pathways_lite.controller.spec_errors import SpecError as ControllerSpecError
    from pathways_lite.controller.store import JobStore

    store = JobStore(tmp_path / "controller.db")
    source = store.create_job(load_spec_text(SERVE), job_id="srv-1")
    init = load_spec_text(SERVE.replace("srv-src", "srv-1")).init_from
    with pytest.raises(ControllerSpecError, match="init_from.job='srv-1' is a serve job"):
        lineage._check_source(source, init, store)
    store.close()


async def _closed_host():
    """A host handle whose channel is closed (every call on it fails at once)."""
    from pathways_lite.controller.islands import HostHandle
    from pathways_lite.v1 import worker_pb2, worker_pb2_grpc

    channel = grpc.aio.insecure_channel("localhost:1")
    await channel.close()
    return HostHandle(
        "localhost:1", channel, worker_pb2_grpc.WorkerServiceStub(channel), worker_pb2.InfoReply()
    )


def test_the_router_and_the_probe_skip_dead_islands_and_never_leak_inflight(tmp_path) -> None:
    """A replica on a dead island is never chosen; a host whose channel closed answers
    UNAVAILABLE and its in-flight count comes back (least-loaded routing stays right)."""
    import asyncio

    from pathways_lite.controller.dispatch import DispatchError
    from pathways_lite.controller.islands import Island
    from pathways_lite.controller.jobs import probe_serve
    from pathways_lite.controller.recovery import FailureClass, classify
    from pathways_lite.controller.serve_router import ServeRouter
    from pathways_lite.controller.store import JobStore
    from pathways_lite.v1 import worker_pb2
    from pathways_lite.workers.rpc import RpcRejection

    store = JobStore(tmp_path / "controller.db")
    record = store.create_job(load_spec_text(SERVE))

    async def main() -> None:
        host = await _closed_host()
        dead, closed = Island("island-0", [host], dead="host 0 died"), Island("island-1", [host])
        router = ServeRouter(store)
        router.loading(record.id, [dead, closed])
        router.serving(record.id, 0, 4)
        request = controller_pb2.GenerateJobRequest(job_id=record.id, prompt="hi")
        for _ in range(3):
            with pytest.raises(RpcRejection, match="island-1 .* not reachable") as e:
                async for _ in router.generate(request):
                    pass
            assert e.value.code == grpc.StatusCode.UNAVAILABLE
        assert [r.inflight for r in router.jobs[record.id].replicas] == [0, 0]
        # The serve job's liveness probe: a channel closed, a restart, a death: UNAVAILABLE,
        # an infrastructure failure (recovered, or failed when its budget is spent).
        start = worker_pb2.StartServeRequest(job_id=record.id, max_batch=4, max_seq_len=128)
        for why, generation in (("not reachable|closed", 0), ("restarted", 1)):
            with pytest.raises(DispatchError, match=why) as stopped:
                await probe_serve([closed], [generation], start)
            assert classify(stopped.value) == FailureClass.INFRASTRUCTURE
        closed.dead = "host 0 died"
        with pytest.raises(DispatchError, match="host 0 died"):
            await probe_serve([closed], [0], start)
        with pytest.raises(RpcRejection, match="dead island"):
            async for _ in router.generate(request):
                pass

    asyncio.run(main())
    store.close()


def test_a_request_every_replica_would_refuse_is_refused_before_training_is_cut(
    tmp_path,
) -> None:
    """A replica holds serve.max_batch requests in its cache and QUEUE_FACTOR times as many
    waiting; one more was sent (cutting training on its island first) for its host to refuse
    RESOURCE_EXHAUSTED. Now the router refuses it before the cut."""
    import asyncio

    from pathways_lite.controller.islands import Island
    from pathways_lite.controller.serve_router import ServeArbiter, ServeRouter
    from pathways_lite.controller.store import JobStore
    from pathways_lite.workers.rpc import RpcRejection
    from pathways_lite.workers.serve_engine import QUEUE_FACTOR

    store = JobStore(tmp_path / "controller.db")
    record = store.create_job(load_spec_text(SERVE))

    class Counting(ServeArbiter):
        """Counts the cuts asked for (the arbiter's `enter` cuts training on the island)."""

        entered = 0

        async def enter(self, island: str, job_id: str, target_ms: float) -> None:
            Counting.entered += 1

        def leave(self, island: str, sample=None) -> None:
            pass

    async def main() -> None:
        host = await _closed_host()
        router = ServeRouter(store, Counting(None, None))
        router.loading(record.id, [Island("island-0", [host])])
        router.serving(record.id, 0, 4)
        (replica,) = router.jobs[record.id].replicas
        replica.inflight = (1 + QUEUE_FACTOR) * 4
        request = controller_pb2.GenerateJobRequest(job_id=record.id, prompt="hi")
        with pytest.raises(RpcRejection, match="is full") as full:
            async for _ in router.generate(request):
                pass
        assert full.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert Counting.entered == 0 and replica.inflight == (1 + QUEUE_FACTOR) * 4
        replica.inflight -= 1  # room for one: sent (to a host that is not there)
        with pytest.raises(RpcRejection, match="not reachable"):
            async for _ in router.generate(request):
                pass
        assert Counting.entered == 1

    asyncio.run(main())
    store.close()


def test_a_serve_job_answers_streams_beside_training(local_cluster, capsys) -> None:
    state = str(local_cluster.state_dir)
    with ControllerClient(state) as client:
        src = client.submit(load_spec_text(SOURCE))
        srv = client.submit(load_spec_text(SERVE))
        assert state_name(client.wait(src.id, timeout_s=200).state) == "succeeded"
        code, msg = _code(lambda: _text(client, src.id))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "sample" in msg
        # Loading answers FAILED_PRECONDITION "loading" until the replicas have compiled.
        deadline, seen = time.monotonic() + 200, set()
        while True:
            try:
                greedy, final = _text(client, "srv", max_tokens=16)
                break
            except ClientError as e:
                assert e.code == grpc.StatusCode.FAILED_PRECONDITION, e
                seen.add("loading" if "loading" in str(e) else "not serving")
                assert time.monotonic() < deadline, e
                time.sleep(0.2)
        assert "loading" in seen  # the load and compile take seconds: the poll sees them
        assert final["tokens"] == 16 or final["reason"] in ("stop", "eos")
        job = client.get(srv.id)
        assert state_name(job.state) == "running"
        # The served greedy completion equals the one-off `sample` path's greedy decode
        # (model/sampling.py) of the same resident parameters.
        reference = client.sample(srv.id, PROMPT, max_new_tokens=final["tokens"]).text
        assert greedy == reference[: len(greedy)] and greedy

        # Bad input: clear errors, and the service keeps serving.
        assert _code(lambda: _text(client, "srv", ""))[0] == grpc.StatusCode.INVALID_ARGUMENT
        code, msg = _code(lambda: _text(client, "srv", max_tokens=500))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_seq_len=128" in msg
        code, msg = _code(lambda: _text(client, "srv", "x" * 20_000))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "at most" in msg
        assert _code(lambda: _text(client, "no-such-job"))[0] == grpc.StatusCode.NOT_FOUND

        # Continuous batching: 6 concurrent clients on 4 slots, one disconnecting mid-way;
        # a seeded request's text depends only on its prompt and seed.
        token = auth.read_token(auth.token_path(local_cluster.state_dir))
        meta = ((auth.METADATA_KEY, auth.bearer(token)),)
        channel = grpc.insecure_channel(local_cluster.address)
        stub = controller_pb2_grpc.ControllerServiceStub(channel)
        gone = stub.Generate(
            controller_pb2.GenerateJobRequest(job_id="srv", prompt=PROMPT, max_tokens=100),
            metadata=meta,
            timeout=60,
        )
        next(gone)
        gone.cancel()
        sampled = dict(temperature=0.8, top_k=20, seed=5, max_tokens=12)
        alone = _text(client, "srv", **sampled)[0]
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(_text, client, "srv", **sampled)] + [
                pool.submit(_text, client, "srv", f"import {i}", max_tokens=20) for i in range(5)
            ]
            results = [f.result(timeout=120) for f in futures]
        assert results[0][0] == alone
        assert all(r[1]["reason"] for r in results)

        # A full queue (4 slots + 4 x 4 waiting) answers RESOURCE_EXHAUSTED.
        with channel:
            calls = [
                stub.Generate(
                    controller_pb2.GenerateJobRequest(job_id="srv", prompt=PROMPT, max_tokens=110),
                    metadata=meta,
                    timeout=120,
                )
                for _ in range(30)
            ]
            codes = []
            for call in calls:
                try:
                    for _ in call:
                        pass
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as e:
                    codes.append(e.code())
                    if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        assert "queue is full" in e.details()
            assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and grpc.StatusCode.OK in codes
            # Without the token: refused.
            with pytest.raises(grpc.RpcError) as refused:
                next(
                    stub.Generate(
                        controller_pb2.GenerateJobRequest(job_id="srv", prompt=PROMPT), timeout=10
                    )
                )
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

        # Server-sent events on the dashboard, with the same token.
        query = urllib.parse.urlencode({"prompt": PROMPT, "max_tokens": 16})
        url = client.dashboard_url().rstrip("/") + f"/api/jobs/srv/generate?{query}"
        with pytest.raises(urllib.error.HTTPError) as no_token:
            urllib.request.urlopen(url, timeout=30)
        assert no_token.value.code == 401
        req = urllib.request.Request(url, headers={"Authorization": auth.bearer(token)})
        body = urllib.request.urlopen(req, timeout=60).read().decode()
        events = [b for b in body.split("\n\n") if b.strip()]
        sse_text = "".join(
            json.loads(e.split("data: ", 1)[1])["text"]
            for e in events
            if e.startswith("event: token")
        )
        assert events[-1].startswith("event: done") and sse_text == greedy
        stats = json.loads(
            urllib.request.urlopen(
                urllib.request.Request(
                    client.dashboard_url().rstrip("/") + "/api/jobs/srv/serve",
                    headers={"Authorization": auth.bearer(token)},
                ),
                timeout=30,
            ).read()
        )
        assert stats["status"] == "serving" and stats["requests"] >= 8 and stats["kv_cache_bytes"]
        assert stats["slots"] == 4 and stats["token_p99_ms"] > 0
        page = urllib.request.urlopen(
            urllib.request.Request(
                client.dashboard_url().rstrip("/") + "/jobs/srv/serve",
                headers={"Authorization": auth.bearer(token)},
            ),
            timeout=30,
        ).read()
        assert b"serve.js" in page

        # The SDK, streamed and whole.
        from pathways_lite.sdk import Client

        with Client(local_cluster.state_dir) as sdk:
            pieces = list(sdk.job("srv").generate(PROMPT, max_tokens=16, stream=True))
            assert "".join(pieces) == greedy and len(pieces) > 1
            assert sdk.job("srv").generate(PROMPT, max_tokens=16) == greedy

        # The CLI.
        capsys.readouterr()
        code = cli.main(
            ["generate", "srv", PROMPT, "--max-tokens", "16", "--json"] + ["--state-dir", state]
        )
        out = json.loads(capsys.readouterr().out)
        assert code == 0 and out["text"] == greedy and len(out["tokens"]) == 16
        assert out["ttft_ms"] > 0

        # Training beside the service, through the controller: while a request decodes, no
        # step of the co-resident job runs (its slices are cut at a step boundary before the
        # request goes to the host), and it resumes once the service is idle.
        co = client.submit(load_spec_text(CO_TRAIN))
        requests = 0
        while state_name(client.get(co.id).state) not in ("succeeded", "failed"):
            if not client.metrics(co.id) or requests >= 8:
                time.sleep(0.05)
                continue
            assert _text(client, "srv", max_tokens=16)[1]["tokens"] >= 1
            requests += 1
            time.sleep(0.2)  # the island goes back to training
        assert state_name(client.get(co.id).state) == "succeeded" and requests
        island = client.islands(include_steps=True)[0]
        steps = [(e.start_unix_ns, e.end_unix_ns) for e in island.recent_steps if e.job_id == co.id]
        # Each request's busy period as the controller timed it: from when training had
        # yielded the island (its slices cut, the steps before the cut ended) to the end of
        # the request's stream (before training gets the island back).
        periods = [
            (e.start_unix_ns, e.end_unix_ns) for e in island.recent_steps if e.job_id == srv.id
        ]
        assert len(steps) == 12
        # No step of the job ran while a request was in the island's hands (the step in
        # progress when it arrived had ended before).
        overlapping = [(a, b, s, e) for a, b in steps for s, e in periods if a < e and b > s]
        assert not overlapping, overlapping
        # Paused and resumed: some request has the job's steps before it and after it.
        assert any(
            any(b <= s for _, b in steps) and any(a >= e for a, _ in steps) for s, e in periods
        )
        stats = json.loads(
            urllib.request.urlopen(
                urllib.request.Request(
                    client.dashboard_url().rstrip("/") + "/api/jobs/srv/serve",
                    headers={"Authorization": auth.bearer(token)},
                ),
                timeout=30,
            ).read()
        )
        shared = stats["islands"][island.id]
        assert shared["training_cuts"] >= 1 and shared["busy_periods"] >= requests, stats

        # Cancelling the serve job ends its open streams with UNAVAILABLE naming why (12
        # streams on 4 slots: the waiting ones cannot finish before the cancel lands).
        with grpc.insecure_channel(local_cluster.address) as channel:
            stub = controller_pb2_grpc.ControllerServiceStub(channel)
            streams = [
                stub.Generate(
                    controller_pb2.GenerateJobRequest(job_id="srv", prompt=PROMPT, max_tokens=110),
                    metadata=meta,
                    timeout=120,
                )
                for _ in range(12)
            ]
            next(streams[0])
            client.cancel(srv.id, reason="done serving")
            ends = []
            for call in streams:
                try:
                    for _ in call:
                        pass
                    ends.append("ok")
                except grpc.RpcError as e:
                    # A call that reached the controller after the cancel: not serving.
                    late = e.code() == grpc.StatusCode.FAILED_PRECONDITION
                    assert e.code() == grpc.StatusCode.UNAVAILABLE or late, e
                    assert not late or "is not serving" in e.details(), e
                    ends.append(e.details())
            assert any("cancelled" in e for e in ends if e != "ok"), ends
        assert state_name(client.wait(srv.id, timeout_s=60).state) == "cancelled"


def test_a_request_cuts_a_two_island_job_on_both_islands_at_one_step_until_it_is_served():
    """The controller decides once per step for the whole training job (review finding 4):
    a request arriving on island A of a two-island job cuts its slices on both islands at
    the same step, no step of it starts on either island while the request is served, and
    it goes on from that step when A's service is idle (every step run once, in order).
    Real worker services (the probe job) over gRPC, the real Dispatcher, Scheduler and
    ServeArbiter; the request's decoding is the time between `enter` and `leave`."""
    import asyncio

    import jax

    from pathways_lite.controller.dispatch import Dispatcher
    from pathways_lite.controller.islands import Island, connect_host
    from pathways_lite.controller.program import HostLoad, StepProgram, placement_request
    from pathways_lite.controller.scheduler import Demand, Scheduler
    from pathways_lite.controller.serve_router import ServeArbiter
    from pathways_lite.v1 import common_pb2, worker_pb2
    from pathways_lite.workers.host import HostMetadata
    from pathways_lite.workers.probe_runtime import PROBE_DATA_HASH, PROBE_PRESET
    from pathways_lite.workers.service import WorkerServicer
    from pathways_lite.workers.serving import BackgroundServer

    steps, ids = 600, ["cut-a", "cut-b"]

    def load(at: HostLoad) -> worker_pb2.LoadJobRequest:
        request = placement_request(at)
        request.ClearField("peers")  # the probe trains each island's slice alone
        request.model.CopyFrom(common_pb2.ModelConfig(preset=PROBE_PRESET))
        request.mesh.CopyFrom(common_pb2.MeshShape(data=1, model=1))
        request.data_hash = PROBE_DATA_HASH
        request.global_batch = 8
        request.seq_len = 1
        request.model.overrides.update({"d_in": 8, "d_out": 8, "learning_rate": 1e-3})
        return request

    servicers = [
        WorkerServicer(HostMetadata.in_process(i, [d], 256 << 20), [d])
        for i, d in zip(ids, jax.devices()[:2], strict=True)
    ]
    servers = [BackgroundServer(s, "127.0.0.1", 0) for s in servicers]
    addresses = [f"127.0.0.1:{server.start()}" for server in servers]
    periods: list[tuple] = []
    marks: dict[str, int] = {}

    async def main() -> tuple[list[int], int | None]:
        islands = [Island(i, [await connect_host(a)]) for i, a in zip(ids, addresses, strict=True)]
        scheduler = Scheduler(ids)
        dispatcher = Dispatcher(5, slice_s=0.05)
        arbiter = ServeArbiter(scheduler, dispatcher, lambda *period: periods.append(period))
        prog = StepProgram(job_id="train", generation=0, steps=steps, tokens_per_step=8, load=load)
        await dispatcher.load(prog, islands)
        scheduler.place(Demand("train", 2, 0), ids)
        scheduler.join("train", ids, 1.0)
        reports: list[int] = []

        async def request() -> None:
            while len(reports) < 100:
                await asyncio.sleep(0.001)
            await arbiter.enter("cut-a", "srv", 200.0)
            marks["served"] = time.time_ns()
            await asyncio.sleep(0.3)  # the request decodes
            marks["idle"] = time.time_ns()
            arbiter.leave("cut-a", (5.0, 2.0, 10))

        served = asyncio.ensure_future(request())
        try:
            await dispatcher.run(
                prog, islands, on_step=lambda r: reports.append(r.step), gate=scheduler
            )
            await served
            await dispatcher.unload("train", islands)
        finally:
            for island in islands:
                await island.close()
        return reports, arbiter.stats("cut-a")["training_cuts"]

    try:
        reports, cuts = asyncio.run(main())
    finally:
        for server in servers:
            server.stop()
    assert reports == list(range(steps)) and cuts == 1
    logs = [[e for e in s.execution_log if e.job_id == "train"] for s in servicers]
    for log in logs:
        assert sorted(e.step for e in log) == list(range(steps))  # each step once per host
    # Both islands stopped before the same step (the steps before it ended before the
    # request went to the host) and started none while it was served.
    before = [{e.step for e in log if e.start_unix_ns < marks["served"]} for log in logs]
    cut = len(before[0])
    assert before[0] == before[1] == set(range(cut)) and 100 <= cut < steps
    assert not [
        e.step for log in logs for e in log if marks["served"] <= e.start_unix_ns < marks["idle"]
    ]
    assert all(e.step >= cut for log in logs for e in log if e.start_unix_ns >= marks["idle"])
    assert [(p[0], p[1]) for p in periods] == [("cut-a", "srv")]


def test_the_latency_policy_holds_training_off_longer_over_the_target_and_relaxes_under_it():
    """serve.target_p99_ms: over it, training waits longer after the island's last request
    (holdoff doubles up to its cap); under half of it, holdoff halves back to 0. A request's
    per-token latency is its whole time, its wait for the first token included, over its
    tokens; the p99 is over the island's recent requests."""
    import asyncio

    from pathways_lite.controller import serve_router
    from pathways_lite.controller.dispatch import Dispatcher
    from pathways_lite.controller.scheduler import Scheduler
    from pathways_lite.controller.serve_router import ServeArbiter, token_latency_p99

    # A request that waited 900 ms for its first token (a long training step in progress),
    # then 10 ms per token: (900 + 15 x 10) / 16 ms per token; its batch-mates 10.
    slow, fast = (900.0, 10.0, 16), (10.0, 10.0, 16)
    assert token_latency_p99([slow] + [fast] * 29) == 1050 / 16
    assert token_latency_p99([slow] + [fast] * 199) == 10.0  # under 1% of the requests

    async def main() -> list[float]:
        scheduler = Scheduler(["i0"])
        arbiter = ServeArbiter(scheduler, Dispatcher(1))
        holdoffs = []
        for ttft in [900.0] * 6 + [10.0] * 400:
            await arbiter.enter("i0", "srv", 50.0)
            assert "i0" in scheduler.serving  # no training slice while it is served
            arbiter.leave("i0", (ttft, 10.0, 16))
            holdoffs.append(arbiter.islands["i0"].holdoff_s)
        await asyncio.sleep(holdoffs[-1] + 0.01)
        assert "i0" not in scheduler.serving  # idle: training has the island back
        return holdoffs

    holdoffs = asyncio.run(main())
    top = serve_router.HOLDOFF_MAX_S
    assert holdoffs[:6] == [0.05, 0.1, 0.2, 0.4, 0.8, top]
    assert max(holdoffs) == top and holdoffs[-1] == 0.0  # relaxed once the p99 fell
