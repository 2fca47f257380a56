"""Data parallelism across islands: the islands train as the reference trainer does.

Two set-ups, both with real gRPC between the hosts and the controller's own code:
- end to end through the controller: a LocalCluster of 2 islands x 2 devices (mesh 1x2), a
  palm-tiny job submitted with the client like the CLI does;
- the controller's Dispatcher and `palm_program` in this process, driving 3 single-device
  island hosts served here (each a WorkerServicer on its own CPU device): what the hosts
  reply (example ids, digests, exchange bytes) is visible step by step.
Aborts, deadlines and digest mismatches use two hosts served in this process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import tempfile
import time
from collections.abc import Iterator

import grpc
import jax
import numpy as np
import pytest

from pathways_lite.controller import spec as spec_lib
from pathways_lite.controller.dispatch import Dispatcher, DispatchError
from pathways_lite.controller.islands import RPC_BYTES, Island, connect_host
from pathways_lite.controller.program import HostLoad
from pathways_lite.controller.resolved import config_struct, palm_program
from pathways_lite.model.data import prepare_dataset
from pathways_lite.model.optim import OptimConfig
from pathways_lite.model.train import ReferenceTrainer
from pathways_lite.v1 import common_pb2, controller_pb2, worker_pb2, worker_pb2_grpc
from pathways_lite.workers.exchange import (
    DEFAULT_BUCKET_BYTES,
    expected_payload_bytes,
    part_bounds,
)
from pathways_lite.workers.exchange_overlap import param_bucket_sizes
from pathways_lite.workers.host import HostMetadata
from pathways_lite.workers.service import BackgroundServer, WorkerServicer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

STEPS, SEQ = 20, 64
DATA = {"source": "stdlib", "vocab_size": 1024, "max_bytes": 1_000_000}
BUDGET = 256 * 1024 * 1024


def job_spec(islands: int, devices: int, mesh: tuple[int, int], batch: int, steps: int, **model):
    spec = controller_pb2.JobSpec(
        name=f"dp-{islands}x{devices}",
        islands=islands,
        devices_per_island=devices,
        mesh=controller_pb2.JobSpec.Mesh(data=mesh[0], model=mesh[1]),
        train=controller_pb2.JobSpec.Train(steps=steps, global_batch=batch, seq_len=SEQ, seed=0),
        data=controller_pb2.JobSpec.Data(**DATA),
    )
    spec.model.preset = "palm-tiny"
    spec.model.overrides.update(model)
    return spec


def reference_losses(spec) -> tuple[list[float], object]:
    configs = spec_lib.to_configs(spec)
    dataset = prepare_dataset(configs.data, seq_len=SEQ)
    train = configs.train
    trainer = ReferenceTrainer(configs.model, configs.optim, train)
    losses = trainer.losses(lambda s: dataset.global_batch(s, train.global_batch, train.seed)[0])
    return losses, dataset


def max_rel_diff(a, b) -> float:
    a_, b_ = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a_ - b_) / np.abs(b_)))


# ---- hosts served in this process -----------------------------------------------------------


@dataclasses.dataclass
class LocalHost:
    server: BackgroundServer
    address: str
    channel: grpc.Channel
    stub: worker_pb2_grpc.WorkerServiceStub


def serve_hosts(device_groups: list[list[int]]) -> list[LocalHost]:
    """One worker service per device group (an island of one host) on 127.0.0.1."""
    hosts = []
    for index, ids in enumerate(device_groups):
        devices = [jax.devices()[i] for i in ids]
        meta = HostMetadata.in_process(f"local-{index}", devices, BUDGET)
        server = BackgroundServer(WorkerServicer(meta, devices), "127.0.0.1", 0)
        port = server.start()
        address = f"127.0.0.1:{port}"
        channel = grpc.insecure_channel(address)
        hosts.append(
            LocalHost(server, address, channel, worker_pb2_grpc.WorkerServiceStub(channel))
        )
    return hosts


def stop_hosts(hosts: list[LocalHost]) -> None:
    for host in hosts:
        host.channel.close()
        host.server.stop()


@dataclasses.dataclass
class Record:
    """What palm_program reads of a job record."""

    id: str
    spec: controller_pb2.JobSpec
    generation: int = 0


async def dispatch(addresses: list[str], spec, job_id: str, epoch: int = 1, overlap="auto"):
    """Load, run and unload a job with the controller's Dispatcher; the step reports and the
    controller's RunSlice bytes over the run. `overlap`: the dispatcher's exchange_overlap
    ("auto" is the exchange after the backward pass on these CPU islands)."""
    islands = [Island(f"local-{i}", [await connect_host(a)]) for i, a in enumerate(addresses)]
    try:
        # A fresh epoch restarts the hosts' island sequence (as a new controller would).
        dispatcher = Dispatcher(epoch=epoch, exchange_overlap=overlap)
        program = palm_program(Record(job_id, spec))
        await dispatcher.load(program, islands)
        before = RPC_BYTES.snapshot().get("RunSlice", 0)
        reports = []
        await dispatcher.run(program, islands, on_step=reports.append)
        run_bytes = RPC_BYTES.snapshot().get("RunSlice", 0) - before
        digests = [
            await island.hosts[0].stub.ParamDigest(worker_pb2.ParamDigestRequest(job_id=job_id))
            for island in islands
        ]
        await dispatcher.unload(job_id, islands)
        return reports, run_bytes, digests
    finally:
        for island in islands:
            await island.close()


@pytest.fixture(scope="module")
def three_hosts() -> Iterator[list[LocalHost]]:
    hosts = serve_hosts([[0], [1], [2]])
    try:
        yield hosts
    finally:
        stop_hosts(hosts)


@pytest.fixture(scope="module")
def three_island_run(three_hosts):
    spec = job_spec(3, 1, (1, 1), batch=6, steps=STEPS)
    # The overlapped exchange (off by default on CPU islands: controller/dispatch.overlap_for).
    reports, run_bytes, digests = asyncio.run(
        dispatch([h.address for h in three_hosts], spec, "dp3", overlap="on")
    )
    stats = [
        h.stub.ExchangeStats(worker_pb2.ExchangeStatsRequest(job_id="dp3"), timeout=30)
        for h in three_hosts
    ]
    return spec, reports, run_bytes, digests, stats


def test_three_islands_match_the_reference_losses(three_island_run) -> None:
    spec, reports, *_ = three_island_run
    reference, _ = reference_losses(spec)
    losses = [r.loss for r in reports]
    assert len(losses) == STEPS == len(reference)
    assert max_rel_diff(losses, reference) <= 1e-5, (losses, reference)


def test_islands_read_disjoint_slices_that_make_the_global_batch(three_island_run) -> None:
    spec, reports, *_ = three_island_run
    configs = spec_lib.to_configs(spec)
    dataset = prepare_dataset(configs.data, seq_len=SEQ)
    for report in reports:
        per_island = [list(h.reply.example_ids) for h in report.hosts]
        flat = [i for ids in per_island for i in ids]
        assert len(set(flat)) == len(flat) == 6, per_island
        _, want = dataset.global_batch(report.step, 6, 0)
        assert flat == [int(i) for i in want]


def test_parameters_are_bitwise_identical_on_every_island_after_every_step(
    three_island_run,
) -> None:
    _, reports, _, digests, _ = three_island_run
    for report in reports:
        per_island = {h.reply.param_digest for h in report.hosts}
        assert len(per_island) == 1 and len(per_island.pop()) == 32, report.step
    assert len({d.sha256 for d in digests}) == 1
    assert {d.steps_applied for d in digests} == {STEPS}


def test_exchange_bytes_equal_the_reduce_scatter_all_gather_algorithm(three_island_run) -> None:
    spec, reports, _, digests, stats = three_island_run
    n = digests[0].num_params
    islands = 3
    # The overlapped exchange reduces every bucket on its own (workers/exchange_overlap.py).
    buckets = param_bucket_sizes(spec_lib.to_configs(spec).model, DEFAULT_BUCKET_BYTES)
    assert len(buckets) >= 2 and sum(buckets) == n
    for island, stat in enumerate(stats):
        sent, received = expected_payload_bytes(n, islands, island, buckets)
        # Each host sends N (I - 1) / I twice (its parts out, its reduced part back): under
        # 2 N, never the N (I - 1) of sending every gradient to every island.
        owns = [part_bounds(size, islands)[island] for size in buckets]
        assert sent == 4 * sum(
            (s - (b - a)) + (b - a) * (islands - 1) for s, (a, b) in zip(buckets, owns, strict=True)
        )
        assert sent < 2 * 4 * n
        assert [s.step for s in stat.steps] == list(range(STEPS))
        for entry in stat.steps:
            # Gradient parts plus one 32-byte digest from every other island.
            assert entry.payload_bytes == received + 32 * (islands - 1), entry
            assert entry.payload_bytes < entry.wire_bytes < entry.payload_bytes + 64 * entry.chunks
    sent_of = [expected_payload_bytes(n, islands, i, buckets)[0] for i in range(islands)]
    for report in reports:
        for island, host in enumerate(report.hosts):
            assert host.reply.exchange_bytes_sent == sent_of[island]
            assert 0 < host.reply.exchange_s < host.reply.step_s


def test_controller_bytes_per_step_do_not_grow_with_the_model(three_hosts, three_island_run):
    _, reports, tiny_bytes, tiny_digests, _ = three_island_run
    wide = job_spec(3, 1, (1, 1), batch=6, steps=2, d_model=512, n_layers=2)
    _, wide_bytes, wide_digests = asyncio.run(
        dispatch([h.address for h in three_hosts], wide, "dp3-wide", epoch=2)
    )
    assert wide_digests[0].num_params > 1.5 * tiny_digests[0].num_params
    tiny_per_step, wide_per_step = tiny_bytes / len(reports), wide_bytes / 2
    # Step numbers, losses, ids, timings and a digest: a few hundred bytes either way, while
    # the gradients the hosts exchanged grew with the model. Varints (example ids, byte
    # counts, timestamps) may differ by a few bytes per reply: at most 8 per host.
    assert tiny_per_step < 4096
    assert abs(wide_per_step - tiny_per_step) <= 8 * 3, (tiny_per_step, wide_per_step)


# ---- aborts, deadlines, corruption ----------------------------------------------------------


@pytest.fixture(scope="module")
def two_hosts() -> Iterator[list[LocalHost]]:
    hosts = serve_hosts([[0, 1], [2, 3]])
    try:
        yield hosts
    finally:
        stop_hosts(hosts)


def load_pair(hosts, job_id: str, *, timeout_s: float = 0, lrs=(1e-2, 1e-2), islands=2):
    """A 2-island palm-tiny job (n_layers 1) loaded straight over the worker wire."""
    spec = job_spec(2, 2, (1, 2), batch=4, steps=4, n_layers=1)
    configs = spec_lib.to_configs(spec)
    dataset = prepare_dataset(configs.data, seq_len=SEQ)
    for index, (host, lr) in enumerate(zip(hosts, lrs, strict=False)):
        request = worker_pb2.LoadJobRequest(
            job_id=job_id,
            epoch=1,
            model=common_pb2.ModelConfig(
                preset="palm-tiny", config=config_struct(configs.model.to_dict())
            ),
            mesh=common_pb2.MeshShape(data=1, model=2),
            optimizer=common_pb2.OptimizerConfig(
                config=config_struct(dataclasses.asdict(OptimConfig(learning_rate=lr)))
            ),
            data=common_pb2.DataSpec(source="dataset", paths=[str(dataset.path)]),
            data_hash=dataset.hash,
            global_batch=4,
            seq_len=SEQ,
            island_index=index,
            num_islands=islands,
            peers=[h.address for h in hosts],
            digest_every=1,
            exchange_timeout_s=timeout_s,
        )
        host.stub.LoadJob(request, timeout=240)


def run_step(host: LocalHost, job_id: str, step: int, timeout: float = 120):
    seq = host.stub.Info(worker_pb2.InfoRequest(), timeout=10).next_island_seq
    request = worker_pb2.RunStepRequest(job_id=job_id, step=step, island_seq=seq, epoch=1)
    return host.stub.RunStep.future(request, timeout=timeout)


def unload_all(hosts, job_id: str) -> None:
    for host in hosts:
        host.stub.UnloadJob(worker_pb2.UnloadJobRequest(job_id=job_id, epoch=1), timeout=60)


def test_abort_releases_a_host_waiting_on_a_dead_peer_and_spares_other_jobs(two_hosts) -> None:
    a, _ = two_hosts
    load_pair(two_hosts, "stuck", timeout_s=60)
    load_pair([a], "other", islands=1)
    try:
        waiting = run_step(a, "stuck", 0)  # its peer never runs the step
        time.sleep(2.0)
        assert not waiting.done()
        started = time.monotonic()
        reply = a.stub.Abort(
            worker_pb2.AbortRequest(job_id="stuck", generation=0, reason="peer died"), timeout=10
        )
        with pytest.raises(grpc.RpcError) as err:
            waiting.result(timeout=30)
        assert time.monotonic() - started < 10  # far inside the 60 s deadline
        assert reply.released >= 1
        assert err.value.code() == grpc.StatusCode.ABORTED
        assert "peer died" in err.value.details()
        # The other job on the same host is untouched and runs.
        other = run_step(a, "other", 0).result(timeout=120)
        assert np.isfinite(other.loss) and other.step == 0
    finally:
        unload_all(two_hosts, "stuck")
        unload_all([a], "other")


def test_an_exchange_with_a_silent_peer_fails_at_its_deadline(two_hosts) -> None:
    a, _ = two_hosts
    load_pair(two_hosts, "deadline", timeout_s=2.0)
    try:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            run_step(a, "deadline", 0).result(timeout=60)
        elapsed = time.monotonic() - started
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.value.details()
        assert 2.0 <= elapsed < 30, elapsed
        assert "island 1" in err.value.details()
    finally:
        unload_all(two_hosts, "deadline")


def test_a_digest_mismatch_stops_the_job_as_silent_data_corruption(two_hosts) -> None:
    # Island 1 applies another learning rate: its parameters differ after the first update.
    load_pair(two_hosts, "sdc", lrs=(1e-2, 2e-2))
    try:
        futures = [run_step(h, "sdc", 0) for h in two_hosts]
        errors = []
        for future in futures:
            with pytest.raises(grpc.RpcError) as err:
                future.result(timeout=120)
            errors.append(err.value)
        assert {e.code() for e in errors} == {grpc.StatusCode.DATA_LOSS}
        message = errors[0].details()
        assert "silent data corruption" in message
        digests = [w for w in message.replace(".", " ").split() if len(w) == 64]
        assert len(digests) == 2 and digests[0] != digests[1], message
    finally:
        unload_all(two_hosts, "sdc")


def test_the_dispatcher_fails_a_corrupted_job_with_its_reason(two_hosts) -> None:
    async def main() -> DispatchError:
        islands = [
            Island(f"i{k}", [await connect_host(h.address)]) for k, h in enumerate(two_hosts)
        ]
        load_pair(two_hosts, "sdc2", lrs=(1e-2, 3e-2))
        for island in islands:  # earlier tests used some of the hosts' sequence numbers
            island.next_seq = island.hosts[0].info.next_island_seq
        program = palm_program(Record("sdc2", job_spec(2, 2, (1, 2), 4, 3, n_layers=1)))
        # Already loaded by hand with the mismatching optimizers: run its steps only.
        try:
            with pytest.raises(DispatchError) as err:
                await Dispatcher(epoch=1).run(program, islands)
            return err.value
        finally:
            for island in islands:
                await island.close()

    try:
        error = asyncio.run(main())
        assert error.reason == "silent_data_corruption"
        assert error.code == grpc.StatusCode.DATA_LOSS
        assert "island 0 has parameter digest" in error.message
    finally:
        unload_all(two_hosts, "sdc2")


# ---- end to end through the controller: 2 islands x 2 devices, each island 2 hosts ---------
# Each island is two host processes (1 device each) joined by jax.distributed; host i of one
# island exchanges its shards with host i of the other.


@pytest.fixture(scope="module")
def two_island_cluster():
    from pathways_lite.local import LocalCluster
    from pathways_lite.workers.ray_cluster import alive

    state_dir = tempfile.mkdtemp(prefix="pldp-", dir="/tmp")
    cluster = LocalCluster(islands=2, devices_per_island=2, hosts_per_island=2, state_dir=state_dir)
    started: list[int] = []
    try:
        cluster.start()
        yield cluster
    finally:
        started = cluster.pids()
        cluster.down()
        shutil.rmtree(state_dir, ignore_errors=True)
    assert not alive(started)


def test_two_islands_of_two_hosts_each_match_the_reference_end_to_end(two_island_cluster) -> None:
    from pathways_lite.client import ControllerClient, state_name

    spec = job_spec(2, 2, (1, 2), batch=4, steps=STEPS)
    with ControllerClient(two_island_cluster.state_dir) as client:
        islands = client.islands()
        job = client.submit(spec)
        job = client.wait(job.id, timeout_s=280)
    assert [len(i.hosts) for i in islands] == [2, 2], islands
    assert len({h.pid for i in islands for h in i.hosts}) == 4
    assert state_name(job.state) == "succeeded", job.message
    assert sorted(job.islands) == ["island-0", "island-1"] or len(job.islands) in (0, 2)
    reference, _ = reference_losses(spec)
    assert len(job.losses) == STEPS
    assert max_rel_diff(list(job.losses), reference) <= 1e-5, (list(job.losses), reference)


def test_every_optimizer_field_reaches_the_hosts_as_the_controller_resolved_it() -> None:
    from google.protobuf import json_format

    from pathways_lite.workers.palm_runtime import model_config, optim_config

    spec = job_spec(2, 1, (1, 1), batch=4, steps=1)
    opt = spec.optimizer
    opt.learning_rate, opt.warmup_steps, opt.beta1, opt.decay_rate = 3e-3, 7, 0.5, 0.7
    opt.clip_norm, opt.clipping_threshold, opt.eps = 0.5, 2.0, 1e-20
    opt.multiply_by_parameter_scale = False
    opt.weight_decay.number_value = 0.01
    request = palm_program(Record("opt", spec)).load(HostLoad("opt", island_index=1, num_islands=2))
    configs = spec_lib.to_configs(spec)
    host_optim = optim_config(json_format.MessageToDict(request.optimizer.config))
    assert host_optim == configs.optim
    assert host_optim.clipping_threshold == 2.0 and host_optim.weight_decay == 0.01
    host_model = model_config(json_format.MessageToDict(request.model.config))
    assert host_model.d_model == configs.model.d_model
    assert (request.island_index, request.num_islands, request.digest_every) == (1, 2, 1)
