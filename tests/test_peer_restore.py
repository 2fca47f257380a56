"""Peer restore's state transfer (workers/peer_restore.py) over real loopback gRPC: state
larger than one gRPC message, resharded onto another host count, and a survivor that dies
mid-transfer. The hosts of a two-host island are simulated in this process by serving each
the shards of its own device (the test process has four CPU devices)."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from pathways_lite.v1 import worker_pb2_grpc
from pathways_lite.workers import rpc
from pathways_lite.workers.exchange import MAX_MESSAGE_BYTES
from pathways_lite.workers.exchange_service import SERVICE_NAME, ExchangeServicer
from pathways_lite.workers.peer_restore import (
    PeerRestoreError,
    assemble,
    fetch_state,
    state_pieces,
)

pytestmark = pytest.mark.timeout(120)

JOB = "peer-job"
OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def make_state(devices):
    """A state of 72 MiB on a 2-device mesh: a sharded matrix, a replicated vector, a
    scalar, as a job's params and optimizer state are."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(devices), ("model",))
    rng = np.random.default_rng(0)
    values = [
        rng.standard_normal((4096, 4608), dtype=np.float32),  # 72 MiB, split over the mesh
        rng.standard_normal((1000,), dtype=np.float32),  # replicated on both devices
        np.array(7, np.int32),  # the optimizer's step count
    ]
    specs = [PartitionSpec("model", None), PartitionSpec(), PartitionSpec()]
    return [
        jax.device_put(v, NamedSharding(mesh, s)) for v, s in zip(values, specs, strict=True)
    ], values


class Survivor:
    """One survivor host: an ExchangeService serving `leaves` (the shards on `devices`)."""

    def __init__(self, leaves, devices=None, die_mid_transfer=False) -> None:
        self.servicer = ExchangeServicer(lambda job_id: None)
        self.servicer.state_source = self._source
        self.leaves, self.devices, self.die = leaves, devices, die_mid_transfer
        self.stop = asyncio.Event()
        self.task: asyncio.Task | None = None

    async def _source(self, request):
        if self.die:  # the host goes away while its stream is being written
            asyncio.get_running_loop().call_later(0.01, self.task.cancel)
        return state_pieces(self.leaves, request, self.devices), len(self.leaves)

    async def start(self) -> str:
        port = asyncio.get_running_loop().create_future()
        self.task = asyncio.ensure_future(
            rpc.serve(
                "survivor",
                {SERVICE_NAME: self.servicer.add_to_server},
                "127.0.0.1",
                0,
                options=OPTIONS,
                started=port.set_result,
                stop=self.stop,
                grace_s=0.0,
            )
        )
        return f"127.0.0.1:{await port}"

    async def close(self) -> None:
        self.stop.set()
        try:
            await self.task
        except asyncio.CancelledError:
            pass


def like_on(leaves, devices):
    """(shape, dtype, sharding) of `leaves` on a mesh of the same shape over `devices`."""
    from jax.sharding import Mesh, NamedSharding

    mesh = Mesh(np.array(devices), ("model",))
    return [
        (tuple(x.shape), np.dtype(x.dtype), NamedSharding(mesh, x.sharding.spec)) for x in leaves
    ]


async def restore(survivors, like, chunk_bytes=0):
    addresses = [await s.start() for s in survivors]
    channels = [grpc.aio.insecure_channel(a, options=OPTIONS) for a in addresses]
    try:
        stubs = [worker_pb2_grpc.ExchangeServiceStub(c) for c in channels]
        return await fetch_state(stubs, JOB, 7, like, chunk_bytes=chunk_bytes)
    finally:
        for c in channels:
            await c.close()
        for s in survivors:
            await s.close()


def test_a_state_larger_than_a_grpc_message_moves_between_hosts_bitwise():
    import jax

    devices = jax.devices()
    leaves, values = make_state(devices[:2])
    assert sum(v.nbytes for v in values) > MAX_MESSAGE_BYTES
    like = like_on(leaves, devices[2:4])
    fetched = asyncio.run(restore([Survivor(leaves)], like))
    assert fetched.bytes >= sum(v.nbytes for v in values)
    restored = assemble(fetched, like)
    for got, want, (_, _, sharding) in zip(restored, values, like, strict=True):
        assert got.sharding == sharding
        assert np.array_equal(np.asarray(got), want)


def test_the_state_of_a_two_host_island_is_resharded_onto_one_host_of_the_same_mesh():
    import jax

    devices = jax.devices()
    leaves, values = make_state(devices[:2])
    # Host 0 of the survivor holds device 0's shards, host 1 device 1's; the new island's
    # single host needs both halves (same mesh shape, other host count).
    hosts = [Survivor(leaves, {devices[0]}), Survivor(leaves, {devices[1]})]
    like = like_on(leaves, devices[2:4])
    fetched = asyncio.run(restore(hosts, like, chunk_bytes=1 << 20))
    for got, want in zip(assemble(fetched, like), values, strict=True):
        assert np.array_equal(np.asarray(got), want)
    # Nothing was sent twice but the replicated leaves, which each host holds whole.
    assert fetched.bytes < sum(v.nbytes for v in values) + 2 * values[1].nbytes + 64


def test_a_survivor_dying_mid_transfer_fails_the_restore_with_the_reason():
    import jax

    devices = jax.devices()
    leaves, _ = make_state(devices[:2])
    with pytest.raises(PeerRestoreError, match="FetchState of job 'peer-job'"):
        asyncio.run(
            restore([Survivor(leaves, die_mid_transfer=True)], like_on(leaves, devices[2:4]))
        )


# ---- the worker service: rollback of a half-applied step, restore from a survivor ----------


def _serve_host(index: int, device_ids: list[int], **servicer):
    import jax

    from pathways_lite.workers.host import HostMetadata
    from pathways_lite.workers.service import BackgroundServer, WorkerServicer

    devices = [jax.devices()[i] for i in device_ids]
    meta = HostMetadata.in_process(f"peer-{index}", devices, 256 * 1024 * 1024)
    server = BackgroundServer(WorkerServicer(meta, devices, **servicer), "127.0.0.1", 0)
    address = f"127.0.0.1:{server.start()}"
    channel = grpc.insecure_channel(address)
    return server, address, channel, worker_pb2_grpc.WorkerServiceStub(channel)


def _load_request(job_id: str, index: int, peers: list[str], generation: int = 0, **fields):
    import dataclasses

    from pathways_lite.controller import spec as spec_lib
    from pathways_lite.controller.resolved import config_struct
    from pathways_lite.model.data import prepare_dataset
    from pathways_lite.model.optim import OptimConfig
    from pathways_lite.v1 import common_pb2, controller_pb2, worker_pb2

    spec = controller_pb2.JobSpec(
        name="peer",
        islands=2,
        devices_per_island=2,
        mesh=controller_pb2.JobSpec.Mesh(data=1, model=2),
        train=controller_pb2.JobSpec.Train(steps=4, global_batch=4, seq_len=64, seed=0),
        data=controller_pb2.JobSpec.Data(source="stdlib", vocab_size=1024, max_bytes=1_000_000),
    )
    spec.model.preset = "palm-tiny"
    spec.model.overrides.update({"n_layers": 1})
    configs = spec_lib.to_configs(spec)
    dataset = prepare_dataset(configs.data, seq_len=64)
    return worker_pb2.LoadJobRequest(
        job_id=job_id,
        generation=generation,
        epoch=1,
        model=common_pb2.ModelConfig(
            preset="palm-tiny", config=config_struct(configs.model.to_dict())
        ),
        mesh=common_pb2.MeshShape(data=1, model=2),
        optimizer=common_pb2.OptimizerConfig(
            config=config_struct(dataclasses.asdict(OptimConfig(learning_rate=1e-2)))
        ),
        data=common_pb2.DataSpec(source="dataset", paths=[str(dataset.path)]),
        data_hash=dataset.hash,
        global_batch=4,
        seq_len=64,
        island_index=index,
        num_islands=2,
        peers=peers,
        digest_every=1,
        **fields,
    )


def test_a_half_applied_step_is_rolled_back_and_a_replacement_loads_the_survivors_state(
    stdlib_dataset,
):
    """Island A applied step 2, island B died during it: A rolls step 2 back (keep_state),
    B's replacement loads A's state (restore_peers), digests equal, step 2 runs again
    bitwise as it first did. The replacement is B's warm spare, which compiled B's job
    ahead from B's loads (workers/warm_spare.py): its LoadJob compiles nothing."""
    import jax

    from pathways_lite.v1 import worker_pb2
    from pathways_lite.workers.warm_spare import PrecompiledRuntimes

    hosts = [_serve_host(0, [0, 1]), _serve_host(1, [2, 3])]
    stubs = [h[3] for h in hosts]
    peers = [h[1] for h in hosts]
    job = "half"

    def steps(generation: int, step: int) -> list:
        futures = []
        for stub in stubs:
            seq = stub.Info(worker_pb2.InfoRequest(), timeout=10).next_island_seq
            request = worker_pb2.RunStepRequest(
                job_id=job, generation=generation, step=step, island_seq=seq, epoch=1
            )
            futures.append(stub.RunStep.future(request, timeout=120))
        return [f.result() for f in futures]

    def digest(stub) -> worker_pb2.ParamDigestReply:
        return stub.ParamDigest(worker_pb2.ParamDigestRequest(job_id=job), timeout=60)

    try:
        for index, stub in enumerate(stubs):
            stub.LoadJob(_load_request(job, index, peers), timeout=240)
        steps(0, 0)
        steps(0, 1)
        after_1 = digest(stubs[0])
        first = steps(0, 2)
        after_2 = digest(stubs[0])
        assert after_2.steps_applied == 3 and after_2.sha256 != after_1.sha256
        # B's warm spare compiles B's job ahead, then B "dies": the spare replaces it.
        spare = PrecompiledRuntimes([jax.devices()[i] for i in (2, 3)])
        assert spare.compile_ahead(hosts[1][0].servicer.train_loads()) == [job]
        assert spare.compile_ahead(hosts[1][0].servicer.train_loads()) == []  # once
        # A host just promoted lists no job yet: what was compiled ahead stays.
        assert spare.compile_ahead([]) == [] and spare.job_ids() == [job]
        server, _, channel, _ = hosts[1]
        channel.close()
        server.stop()
        hosts[1] = _serve_host(1, [2, 3], runtime_factory=spare.factory)
        stubs[1], peers[1] = hosts[1][3], hosts[1][1]
        kept = stubs[0].LoadJob(
            _load_request(job, 0, peers, 1, keep_state=True, resume_step=2), timeout=60
        )
        assert kept.loaded and kept.compile_s == 0.0  # nothing was compiled again
        assert digest(stubs[0]).sha256 == after_1.sha256  # step 2 rolled back on A
        restored = stubs[1].LoadJob(
            _load_request(job, 1, peers, 1, restore_peers=[peers[0]], resume_step=2), timeout=240
        )
        assert restored.peer_restore_bytes > 0
        assert spare.reused == 1 and len(spare) == 0  # its runtime compiled ahead, taken once
        assert digest(stubs[1]).sha256 == after_1.sha256
        assert digest(stubs[1]).steps_applied == 2
        again = steps(1, 2)
        assert [r.loss for r in again] == [r.loss for r in first]
        assert digest(stubs[1]).sha256 == digest(stubs[0]).sha256 == after_2.sha256
        # Nothing older than the step before the last is held: rolling back two is refused.
        with pytest.raises(grpc.RpcError) as err:
            stubs[0].LoadJob(
                _load_request(job, 0, peers, 2, keep_state=True, resume_step=1), timeout=60
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        for server, _, channel, _ in hosts:
            channel.close()
            server.stop()


def test_a_failed_step_stops_waiting_for_the_other_hosts_once_ray_reports_an_island_dead():
    """The dispatcher's fail-fast grace (the other hosts may be stuck on the failed one) is
    cut short by Ray's death report of an island of the step, and runs out without one."""
    import asyncio

    from pathways_lite.controller.islands import Island, wait_unless_dead

    async def waited(report_death: bool) -> tuple[int, float]:
        island = Island("a", [])
        stuck = asyncio.ensure_future(asyncio.Event().wait())  # a host waiting on its peer
        loop = asyncio.get_running_loop()
        if report_death:
            loop.call_later(0.05, lambda: asyncio.ensure_future(island.host_died(0, "Ray")))
        started = loop.time()
        pending = await wait_unless_dead(
            {stuck}, [island], timeout_s=0.2 if not report_death else 30
        )
        took = loop.time() - started
        stuck.cancel()
        return len(pending), took

    pending, took = asyncio.run(waited(report_death=True))
    assert pending == 1 and took < 5  # not the 30 s grace
    pending, took = asyncio.run(waited(report_death=False))
    assert pending == 1 and took >= 0.2
