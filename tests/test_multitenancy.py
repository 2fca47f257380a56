"""Multi-tenancy on a live local cluster: admission, shared islands, weights, preemption.

One LocalCluster (2 islands x 1 CPU device, a 19 MiB budget per device) serves every test of
the module. Everything is judged from the island hosts' own records (the ExecutionLog rpc:
which job's step ran under which island_seq and when, and the live device arrays per job),
not from the controller's bookkeeping.
"""

from __future__ import annotations

import os
import re
import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pathways_lite.client import ClientError, ControllerClient, state_name
from pathways_lite.controller import spec as spec_lib
from pathways_lite.controller.auth import read_cluster_credential
from pathways_lite.spec import load_spec_text
from pathways_lite.v1 import worker_pb2, worker_pb2_grpc
from pathways_lite.workers.auth import host_channel

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# Sized by what the jobs' compiled steps hold at their peak: a small job (batch 2 per island)
# about 4 MiB per device, a big one (batch 16 per island) about 16.7 MiB (17.7 estimated): two
# small jobs share an island, a big one fits alone, a big one beside a small one does not (so
# it preempts or waits).
BUDGET_PER_DEVICE = 19 * 1024 * 1024
BIG_BATCH = 32
TERMINAL = {"succeeded", "failed", "cancelled"}


def spec(
    name: str,
    *,
    islands: int = 2,
    steps: int = 8,
    weight: float = 1.0,
    priority: int = 0,
    d_model: int = 64,
    seed: int = 0,
    global_batch: int = 4,
):
    return load_spec_text(f"""
name: {name}
model: {{preset: palm-tiny, overrides: {{d_model: {d_model}}}}}
islands: {islands}
devices_per_island: 1
mesh: {{data: 1, model: 1}}
priority: {priority}
weight: {weight}
train: {{steps: {steps}, global_batch: {global_batch}, seq_len: 32, seed: {seed}}}
data: {{source: stdlib, vocab_size: 1024, max_bytes: 1000000}}
""")


@pytest.fixture(scope="module")
def cluster(stdlib_dataset):
    import shutil
    import tempfile

    from pathways_lite.local import LocalCluster

    # Step slots (not seconds) follow the weights here: the test counts slots in the hosts'
    # logs; wall-clock shares are bench/multitenant.py's.
    os.environ["PATHWAYS_LITE_SHARE_BY"] = "steps"
    # A short path: Ray's socket paths under it must stay within AF_UNIX's 107 bytes.
    state_dir = tempfile.mkdtemp(prefix="plmt-", dir="/tmp")
    c = LocalCluster(
        islands=2, devices_per_island=1, state_dir=state_dir, island_memory=BUDGET_PER_DEVICE
    )
    try:
        c.start()
        yield c
    finally:
        c.down()
        os.environ.pop("PATHWAYS_LITE_SHARE_BY", None)
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def client(cluster):
    with ControllerClient(cluster.state_dir) as c:
        yield c


@pytest.fixture(scope="module")
def hosts(client):
    """One worker stub per island host, by island id."""
    channels, stubs = [], {}
    credential = read_cluster_credential(client.state_dir)
    for island in client.islands():
        for host in island.hosts:
            channel = host_channel(host.address or f"{host.node}:{host.port}", credential)
            channels.append(channel)
            stubs.setdefault(island.id, []).append(worker_pb2_grpc.WorkerServiceStub(channel))
    yield stubs
    for channel in channels:
        channel.close()


def logs(hosts) -> dict[str, worker_pb2.ExecutionLogReply]:
    return {
        i: s[0].ExecutionLog(worker_pb2.ExecutionLogRequest(), timeout=60) for i, s in hosts.items()
    }


def wait_all(client, ids, timeout_s=240):
    return [client.wait(j, timeout_s=timeout_s) for j in ids]


def test_infeasible_jobs_are_rejected_at_once(client) -> None:
    started = time.monotonic()
    with pytest.raises(ClientError) as too_many:
        client.submit(spec("four", islands=4))
    assert too_many.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "islands=4" in str(too_many.value)
    with pytest.raises(ClientError) as too_big:
        client.submit(spec("huge", islands=1, d_model=1024))
    assert too_big.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert re.search(r"\d [KMGT]iB per device", str(too_big.value)), too_big.value
    assert time.monotonic() - started < 10


def test_weights_one_to_two_give_step_slots_one_to_two(client, hosts) -> None:
    light = client.submit(spec("w1", steps=20, weight=1.0))
    heavy = client.submit(spec("w2", steps=40, weight=2.0))
    jobs = wait_all(client, [light.id, heavy.id])
    assert [state_name(j.state) for j in jobs] == ["succeeded", "succeeded"], jobs
    by_island = logs(hosts)
    orders = []
    for reply in by_island.values():
        entries = [e for e in reply.entries if e.job_id in (light.id, heavy.id)]
        orders.append([(e.job_id, e.step) for e in sorted(entries, key=lambda e: e.island_seq)])
        # Count slots while both jobs are resident: from the later first step to the
        # earlier last step.
        first = max(
            min(e.start_unix_ns for e in entries if e.job_id == j) for j in (light.id, heavy.id)
        )
        last = min(
            max(e.end_unix_ns for e in entries if e.job_id == j) for j in (light.id, heavy.id)
        )
        both = [e for e in entries if e.start_unix_ns >= first and e.end_unix_ns <= last]
        n_light = sum(e.job_id == light.id for e in both)
        n_heavy = sum(e.job_id == heavy.id for e in both)
        assert n_light >= 5, (n_light, n_heavy)
        # 1:2 up to the one slot the window's ends can cut (a CI run saw 9:19: 2.11, a ratio
        # within 0.1 of 2 asked more than one slot allows at 9).
        assert abs(n_heavy - 2 * n_light) <= 1, (n_light, n_heavy)
    # Both islands ran the two jobs' steps in the one order the controller assigned.
    assert orders[0] == orders[1]


def test_disjoint_islands_run_at_the_same_time(client, hosts) -> None:
    # Open-ended jobs, cancelled once both have stepped: on a loaded machine a job of a fixed
    # length could finish while the other one was still compiling on its own island (a CI run
    # saw it with 300 steps).
    a = client.submit(spec("solo-a", islands=1, steps=100_000, seed=1))
    b = client.submit(spec("solo-b", islands=1, steps=100_000, seed=2))
    deadline = time.monotonic() + 240
    while not all(client.get(j.id).steps_completed >= 5 for j in (a, b)):
        assert time.monotonic() < deadline, "the two jobs did not both start stepping"
        time.sleep(0.2)
    for j in (a, b):
        client.cancel(j.id, reason="both ran")
    jobs = wait_all(client, [a.id, b.id])
    assert [state_name(j.state) for j in jobs] == ["cancelled", "cancelled"]
    while any(i.job_ids for i in client.islands()):  # unloaded before the next test
        assert time.monotonic() < deadline + 60, "the cancelled jobs stayed loaded"
        time.sleep(0.2)
    spans = {}
    for island, reply in logs(hosts).items():
        for e in reply.entries:
            if e.job_id in (a.id, b.id):
                lo, hi = spans.get(e.job_id, (e.start_unix_ns, e.end_unix_ns))
                spans[e.job_id] = (min(lo, e.start_unix_ns), max(hi, e.end_unix_ns))
                spans.setdefault(("island", e.job_id), island)
    assert spans[("island", a.id)] != spans[("island", b.id)]
    (a0, a1), (b0, b1) = spans[a.id], spans[b.id]
    assert min(a1, b1) > max(a0, b0), "the two jobs' execution intervals do not overlap"


def test_preempted_job_resumes_bitwise_and_memory_is_accounted(client, hosts) -> None:
    from pathways_lite.model.estimates import memory_per_device

    # Long enough that the low job is still running when the high one arrives (its steps are
    # tens of ms; the store sees them up to 250 ms late).
    steps = 120
    reference = client.wait(client.submit(spec("low-ref", steps=steps, seed=3)).id, timeout_s=240)
    assert state_name(reference.state) == "succeeded", reference.message

    low = client.submit(spec("low", steps=steps, seed=3))
    while len(client.get(low.id).losses) < 3:
        time.sleep(0.1)
    # Resident now: the host's live arrays of the job are its params + optimizer state.
    memory = {m.job_id: m for m in logs(hosts)["island-0"].jobs}
    high = client.submit(spec("high", steps=4, priority=5, global_batch=BIG_BATCH, seed=4))
    configs_low = spec_lib.to_configs(client.get(low.id).spec)
    est = memory_per_device(configs_low.model, {"data": 1, "model": 1}, configs_low.optim)
    live = memory[low.id].live_bytes_per_device
    assert abs(live - est["total_bytes"]) <= 0.02 * est["total_bytes"] + 64, (live, est)
    suspended_seen = False
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline:
        if state_name(client.get(low.id).state) == "suspended":
            for reply in logs(hosts).values():
                mem = {m.job_id: m for m in reply.jobs}
                assert mem[low.id].suspended and mem[low.id].live_bytes == 0, mem[low.id]
                assert mem[low.id].host_bytes >= est["total_bytes"]
            suspended_seen = True
            break
        time.sleep(0.1)
    assert suspended_seen, client.get(low.id)
    high_done, low_done = wait_all(client, [high.id, low.id])
    assert state_name(high_done.state) == "succeeded", high_done.message
    assert state_name(low_done.state) == "succeeded", low_done.message
    assert list(low_done.losses) == list(reference.losses)
    for reply in logs(hosts).values():
        assert not reply.jobs and reply.live_bytes_total == 0, reply


def _serve_spec(name: str, source: str):
    return load_spec_text(f"""
name: {name}
kind: serve
init_from: {{job: {source}}}
model: {{preset: palm-tiny, overrides: {{d_model: 64}}}}
islands: 1
devices_per_island: 1
mesh: {{data: 1, model: 1}}
train: {{global_batch: 2, seq_len: 32}}
serve: {{max_batch: 2, max_seq_len: 256, target_p99_ms: 5000}}
data: {{source: stdlib, vocab_size: 1024, max_bytes: 1000000}}
""")


def wait_islands_empty(hosts, why: str = "", timeout_s: float = 30) -> None:
    """Wait until no host holds a job or live device bytes (fails naming what is left)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        replies = logs(hosts)
        if all(not r.jobs and r.live_bytes_total == 0 for r in replies.values()):
            return
        time.sleep(0.2)
    raise AssertionError(f"islands not back to zero{f' ({why})' if why else ''}: {replies}")


def _greedy(client, job_id: str) -> str:
    return "".join(r.text for r in client.generate(job_id, "def main(", max_tokens=12))


def test_a_preempted_serve_job_ends_its_streams_naming_it_then_suspends_and_serves_again(
    client, cluster, hosts
) -> None:
    """Issue 18: preempting a `kind: serve` job ends its open streams (decoding or queued)
    with UNAVAILABLE naming the preemption and the job it yields to; the router refuses its
    requests the same way while it waits suspended in host memory; once the higher-priority
    job ends it resumes and serves the same completions from the same parameters."""
    from pathways_lite.controller import auth
    from pathways_lite.v1 import controller_pb2, controller_pb2_grpc

    src = client.submit(spec("serve-src", islands=1, steps=2, seed=8))
    assert state_name(client.wait(src.id, timeout_s=200).state) == "succeeded"
    srv = client.submit(_serve_spec("served", src.id))
    started = [srv.id]  # ended below, or here when an assertion fails (a serve job stays)
    try:
        deadline = time.monotonic() + 200
        while True:
            try:
                before = _greedy(client, srv.id)
                break
            except ClientError as e:
                assert e.code == grpc.StatusCode.FAILED_PRECONDITION, e  # loading
                assert time.monotonic() < deadline, e
                time.sleep(0.2)
        assert before
        island = client.get(srv.id).islands[0]

        # Ten long streams on two slots (the most the host takes: two decode, eight wait in its
        # queue); the higher-priority job comes while they run.
        token = auth.read_token(auth.token_path(cluster.state_dir))
        meta = ((auth.METADATA_KEY, auth.bearer(token)),)
        with grpc.insecure_channel(cluster.address) as channel:
            stub = controller_pb2_grpc.ControllerServiceStub(channel)
            streams = [
                stub.Generate(
                    controller_pb2.GenerateJobRequest(
                        job_id=srv.id, prompt="import", max_tokens=240
                    ),
                    metadata=meta,
                    timeout=120,
                )
                for _ in range(10)
            ]
            next(streams[0])
            # Both islands, a big batch: the serve job's island has no room for it beside.
            high = client.submit(
                spec("high-srv", steps=3, priority=5, global_batch=BIG_BATCH, seed=9)
            )
            started.append(high.id)
            ends = []
            for call in streams:
                try:
                    for _ in call:
                        pass
                    ends.append("ok")
                except grpc.RpcError as e:
                    assert e.code() in (
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                    ), (e.code(), e.details())
                    ends.append(e.details())
        preempted = f"preempted by higher-priority job {high.id}"
        full = "the serve queue is full"
        # Every stream either ran to its end before the service stopped or ended naming the
        # preemption (how many finished first depends on the machine's speed): none is cut
        # silently, and the ones still open or queued at the stop are told why. The ten
        # requests fill the host's two slots and its queue of eight only once the slots have
        # taken their first two: one that comes before is refused, saying so (a CI run saw it).
        assert any(preempted in e for e in ends) and all(
            e == "ok" or preempted in e or full in e for e in ends
        ), ends
        assert sum(full in e for e in ends) <= 2, ends

        # Suspended: its parameters in host memory, nothing of it on the device; the router
        # refuses its requests naming the preemption (none reaches a host).
        deadline = time.monotonic() + 60
        while state_name((job := client.get(srv.id)).state) != "suspended":
            assert time.monotonic() < deadline, job
            time.sleep(0.05)
        assert high.id in job.message, job.message
        mem = {m.job_id: m for m in logs(hosts)[island].jobs}
        assert mem[srv.id].suspended and mem[srv.id].live_bytes == 0, mem[srv.id]
        with pytest.raises(ClientError) as refused:
            _greedy(client, srv.id)
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        assert preempted in str(refused.value), refused.value

        # The higher-priority job ends; the service comes back with the same parameters.
        assert state_name(client.wait(high.id, timeout_s=200).state) == "succeeded"
        deadline = time.monotonic() + 200
        while True:
            try:
                after = _greedy(client, srv.id)
                break
            except ClientError as e:
                # Suspended still (its resume not done yet), then loading.
                assert e.code in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.FAILED_PRECONDITION,
                ), e
                assert time.monotonic() < deadline, e
                time.sleep(0.2)
        assert after == before
        assert state_name(client.get(srv.id).state) == "running"
        client.cancel(srv.id, reason="done")
        assert state_name(client.wait(srv.id, timeout_s=60).state) == "cancelled"
        wait_islands_empty(hosts, "a KV cache left?")
    finally:
        for job_id in started:
            if state_name(client.get(job_id).state) not in ("succeeded", "failed", "cancelled"):
                client.cancel(job_id, reason="test cleanup")


def test_why_queue_and_reprioritise(client, cluster, capsys) -> None:
    """A job that cannot fit waits with its position, the jobs ahead and what it lacks;
    `pathways-lite why` prints them; UpdateJob moves a queued job ahead of another."""
    import json

    from pathways_lite import cli

    # Open-ended (cancelled once the queue is checked): a fixed length could run out first.
    big = client.submit(spec("big", steps=10**6, global_batch=BIG_BATCH, seed=5))
    while state_name(client.get(big.id).state) != "running":
        time.sleep(0.05)
    second = client.submit(spec("second", steps=2, global_batch=BIG_BATCH, seed=6))
    third = client.submit(spec("third", steps=2, seed=7))
    time.sleep(0.5)  # a scheduling pass
    queued_second, queued_third = client.get(second.id), client.get(third.id)
    assert state_name(queued_second.state) == "queued", queued_second
    assert queued_second.queue_position == 1 and not queued_second.jobs_ahead
    assert re.search(r"\d [KMGT]iB per device", queued_second.pending_reason), (
        queued_second.pending_reason
    )
    assert big.id in queued_second.pending_reason
    assert state_name(queued_third.state) == "queued", queued_third
    assert list(queued_third.jobs_ahead) == [second.id]
    assert second.id in queued_third.pending_reason
    assert cli.main(["why", third.id, "--json", "--state-dir", str(cluster.state_dir)]) == 0
    why = json.loads(capsys.readouterr().out)
    assert why["queue_position"] == 2 and why["jobs_ahead"] == [second.id], why
    # Equal priority to `big` (no preemption) but above `second`: it moves to the front.
    state_dir = str(cluster.state_dir)
    assert cli.main(["priority", second.id, "-1", "--state-dir", state_dir]) == 0
    assert f"{second.id} has priority -1" in capsys.readouterr().out
    assert client.get(second.id).spec.priority == -1
    moved = client.get(third.id)
    if state_name(moved.state) == "queued":
        assert moved.queue_position == 1 and not moved.jobs_ahead, moved
    assert list(client.get(second.id).jobs_ahead) in ([third.id], [])
    client.cancel(big.id, reason="the queue was checked")
    ends = wait_all(client, [big.id, second.id, third.id])
    assert [state_name(j.state) for j in ends] == ["cancelled", "succeeded", "succeeded"], ends
    # `third` (priority 0 now ahead) started before `second` (lowered to -1).
    assert ends[2].started_at.ToNanoseconds() < ends[1].started_at.ToNanoseconds()


@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([1, 2, 4]),  # islands (4 is infeasible)
            st.sampled_from([0, 1]),  # priority
            st.sampled_from([1.0, 2.0]),  # weight
            st.booleans(),  # cancel it soon after submitting
            st.sampled_from([None, -1, 3]),  # re-prioritise it to this, or leave it
        ),
        min_size=1,
        max_size=3,
    )
)
def test_churn_ends_every_job_terminal_without_deadlock(client, hosts, jobs) -> None:
    submitted = []
    for k, (islands, priority, weight, cancel, new_priority) in enumerate(jobs):
        try:
            job = client.submit(
                spec(f"churn-{k}", islands=islands, steps=3, priority=priority, weight=weight)
            )
        except ClientError as e:
            assert islands == 4 and e.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            continue
        submitted.append((job.id, cancel))
        if new_priority is not None:
            try:
                updated = client.update(job.id, priority=new_priority)
            except ClientError as e:
                assert e.code == grpc.StatusCode.FAILED_PRECONDITION  # it already finished
            else:
                assert updated.spec.priority == new_priority, updated
                assert client.get(job.id).spec.priority == new_priority
    for job_id, cancel in submitted:
        if cancel:
            try:
                client.cancel(job_id, "churn")
            except ClientError as e:
                assert e.code == grpc.StatusCode.FAILED_PRECONDITION  # it already finished
        else:
            record = client.get(job_id)
            if state_name(record.state) == "queued":
                assert record.pending_reason
    ends = wait_all(client, [j for j, _ in submitted], timeout_s=200)
    for job, (_, cancel) in zip(ends, submitted, strict=True):
        assert state_name(job.state) in TERMINAL, job
        if not cancel:
            assert state_name(job.state) == "succeeded", job.message
    wait_islands_empty(hosts)
