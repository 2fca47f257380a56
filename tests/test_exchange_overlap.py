"""The overlapped, bucketed exchange (workers/exchange_overlap.py): the buckets follow the
backward pass, and a peer killed mid-exchange fails the step with nothing applied.

The peer is a real process (bench/dp_scaling.py's host mode: a worker service with one CPU
device) killed with SIGKILL; this process serves the other island over loopback gRPC.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import jax
import pytest

from pathways_lite.controller import spec as spec_lib
from pathways_lite.controller.resolved import config_struct
from pathways_lite.model.config import PalmConfig
from pathways_lite.model.data import prepare_dataset
from pathways_lite.model.optim import OptimConfig
from pathways_lite.v1 import common_pb2, controller_pb2, worker_pb2, worker_pb2_grpc
from pathways_lite.workers.exchange_overlap import bucket_plan, param_bucket_sizes
from pathways_lite.workers.host import HostMetadata
from pathways_lite.workers.service import BackgroundServer, WorkerServicer

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parent.parent
SEQ = 64


def test_buckets_leave_last_layers_first_and_the_tied_embedding_alone_at_the_end() -> None:
    from flax import nnx

    from pathways_lite.model.palm import Palm

    abstract = nnx.eval_shape(lambda: Palm(PalmConfig.palm_small(), rngs=nnx.Rngs(0)))
    _, params = nnx.split(abstract, nnx.Param)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    paths = [jax.tree_util.keystr(p) for p, _ in flat]
    sizes = [leaf.size for _, leaf in flat]
    buckets = bucket_plan(paths, sizes, 1 << 20)
    assert sorted(i for b in buckets for i in b) == list(range(len(paths)))
    named = [[paths[i] for i in b] for b in buckets]
    assert any("final_norm" in p for p in named[0]) and any("[3]" in p for p in named[0])
    # The blocks leave from the last to the first.
    order = [int(p.split("['blocks'][")[1][0]) for b in named for p in b if "blocks" in p]
    assert order == sorted(order, reverse=True) and order[0] == 3 and order[-1] == 0
    assert len(named[-1]) == 1 and "embed" in named[-1][0]
    # A bucket closes once it holds bucket_bytes (the embedding's own bucket aside).
    assert all(4 * sum(sizes[i] for i in b) >= 1 << 20 for b in buckets[:-2])
    assert (
        param_bucket_sizes(PalmConfig.palm_small(), 1 << 40)[-1] == sizes[paths.index(named[-1][0])]
    )
    with pytest.raises(ValueError, match="exchange_bucket_bytes=0"):
        bucket_plan(paths, sizes, 0)


def spawn_peer() -> tuple[subprocess.Popen, str]:
    """A worker service with one CPU device in its own process (bench/dp_scaling.py --host)."""
    port_file = tempfile.mktemp(prefix="pl-overlap-port-")
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "bench" / "dp_scaling.py"),
            "--host",
            port_file,
            "--island",
            "p",
        ],
        env=env,
    )
    deadline = time.monotonic() + 120
    while not (Path(port_file).exists() and Path(port_file).read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the peer host process did not start.")
        time.sleep(0.1)
    port = Path(port_file).read_text()
    os.unlink(port_file)
    return proc, f"127.0.0.1:{port}"


def load_request(job_id: str, island: int, peers: list[str], timeout_s: float):
    spec = controller_pb2.JobSpec(
        name="overlap",
        islands=2,
        devices_per_island=1,
        mesh=controller_pb2.JobSpec.Mesh(data=1, model=1),
        train=controller_pb2.JobSpec.Train(steps=4, global_batch=4, seq_len=SEQ, seed=0),
        data=controller_pb2.JobSpec.Data(source="stdlib", vocab_size=1024, max_bytes=1_000_000),
    )
    spec.model.preset = "palm-tiny"
    configs = spec_lib.to_configs(spec)
    dataset = prepare_dataset(configs.data, seq_len=SEQ)
    return worker_pb2.LoadJobRequest(
        job_id=job_id,
        epoch=1,
        model=common_pb2.ModelConfig(
            preset="palm-tiny", config=config_struct(configs.model.to_dict())
        ),
        mesh=common_pb2.MeshShape(data=1, model=1),
        optimizer=common_pb2.OptimizerConfig(
            config=config_struct(dataclasses.asdict(OptimConfig(learning_rate=1e-2)))
        ),
        data=common_pb2.DataSpec(source="dataset", paths=[str(dataset.path)]),
        data_hash=dataset.hash,
        global_batch=4,
        seq_len=SEQ,
        island_index=island,
        num_islands=2,
        peers=peers,
        digest_every=1,
        exchange_timeout_s=timeout_s,
        # Small buckets: several leave during the backward pass of palm-tiny.
        exchange_bucket_bytes=64 << 10,
        exchange_overlap=True,
    )


def step(stub, job_id: str, n: int):
    seq = stub.Info(worker_pb2.InfoRequest(), timeout=10).next_island_seq
    request = worker_pb2.RunStepRequest(job_id=job_id, step=n, island_seq=seq, epoch=1)
    return stub.RunStep.future(request, timeout=120)


def test_a_peer_killed_mid_exchange_fails_the_step_and_nothing_is_applied() -> None:
    devices = [jax.devices()[0]]
    server = BackgroundServer(
        WorkerServicer(HostMetadata.in_process("here", devices, 256 << 20), devices),
        "127.0.0.1",
        0,
    )
    here = f"127.0.0.1:{server.start()}"
    peer, there = spawn_peer()
    channels = [grpc.insecure_channel(a) for a in (here, there)]
    stubs = [worker_pb2_grpc.WorkerServiceStub(c) for c in channels]
    try:
        for island, stub in enumerate(stubs):
            stub.LoadJob(load_request("ov", island, [here, there], 8.0), timeout=240)
        # A whole step first: both islands apply the same update.
        futures = [step(s, "ov", 0) for s in stubs]
        replies = [f.result(timeout=120) for f in futures]
        assert replies[0].param_digest == replies[1].param_digest != b""
        before = stubs[0].ParamDigest(worker_pb2.ParamDigestRequest(job_id="ov"), timeout=60)
        assert before.steps_applied == 1
        # Step 1 here only: its buckets leave during the backward pass and reach the peer,
        # which never sends its own; then the peer dies.
        waiting = step(stubs[0], "ov", 1)
        deadline = time.monotonic() + 60
        while True:
            stats = stubs[1].ExchangeStats(worker_pb2.ExchangeStatsRequest(job_id="ov"), timeout=10)
            if any(s.step == 1 and s.payload_bytes > 0 for s in stats.steps):
                break
            assert time.monotonic() < deadline, "no bucket of step 1 reached the peer"
            time.sleep(0.05)
        assert not waiting.done()
        peer.send_signal(signal.SIGKILL)
        peer.wait(timeout=30)
        with pytest.raises(grpc.RpcError) as failed:
            waiting.result(timeout=90)
        assert "island 1" in failed.value.details() or "127.0.0.1" in failed.value.details()
        # Nothing of step 1 was applied: the parameters are those after step 0, bitwise.
        after = stubs[0].ParamDigest(worker_pb2.ParamDigestRequest(job_id="ov"), timeout=60)
        assert after.steps_applied == 1
        assert after.sha256 == before.sha256
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.wait()
        for channel in channels:
            channel.close()
        server.stop()


def test_a_chunk_that_is_not_serialized_bytes_fails_the_send_at_once() -> None:
    """The cause of the pipeline sends that ended cancelled (issue 16's first merge): a
    GradientChunk message streamed through the raw (no serializer) call. gRPC swallows the
    failed write and cancels the call, so nothing reached the peer, whose receive waited out
    its 120 s; `Peers.send_serialized` refuses it at once with an ExchangeError instead."""
    import asyncio

    from pathways_lite.workers.exchange import ExchangeError, Peers, encode_chunk

    devices = jax.devices()[:1]
    meta = HostMetadata.in_process("raw", devices, 1 << 28)
    server = BackgroundServer(WorkerServicer(meta, devices), "127.0.0.1", 0)
    address = f"127.0.0.1:{server.start()}"
    head = worker_pb2.GradientChunk(job_id="nojob", phase=20, part_size=1)

    async def sends() -> tuple[str, str, str]:
        peers = Peers()
        try:
            # gRPC itself: the write fails inside the call, which ends cancelled.
            raw = asyncio.ensure_future(peers.raw_exchange(address)(iter([head]), timeout=10))
            try:
                await raw
                raw_outcome = "completed"
            except asyncio.CancelledError:
                raw_outcome = "cancelled"
            started = time.monotonic()
            with pytest.raises(ExchangeError, match="not serialized bytes") as err:
                await peers.send_serialized(address, [head], 10.0)
            assert time.monotonic() - started < 5
            # Serialized bytes go through (the peer refuses the unknown job by name).
            good = encode_chunk(head, memoryview(b"\0\0\0\0"))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await peers.send_serialized(address, [good], 10.0)
            return raw_outcome, str(err.value), refused.value.details() or ""
        finally:
            await peers.close()

    try:
        raw_outcome, message, refused = asyncio.run(sends())
    finally:
        server.stop()
    assert raw_outcome == "cancelled"
    assert address in message and "GradientChunk" in message
    assert "nojob" in refused, refused


def test_overlapped_islands_match_the_reference_and_share_one_compiled_program() -> None:
    """Two single-device islands served here, driven by the controller's Dispatcher with the
    overlapped exchange in small buckets: losses within 1e-5 of the single-process reference
    trainer and bitwise-equal parameters on both islands. A second job of the same shapes
    loads the program the first compiled (programs with host callbacks never reach JAX's
    persistent cache) and trains to the very same losses."""
    import asyncio

    import numpy as np

    from pathways_lite.controller.dispatch import Dispatcher
    from pathways_lite.controller.islands import Island, connect_host
    from pathways_lite.controller.resolved import palm_program
    from pathways_lite.model.train import ReferenceTrainer
    from pathways_lite.workers import exchange_overlap

    spec = controller_pb2.JobSpec(
        name="ov-ref",
        islands=2,
        devices_per_island=1,
        mesh=controller_pb2.JobSpec.Mesh(data=1, model=1),
        train=controller_pb2.JobSpec.Train(steps=4, global_batch=4, seq_len=SEQ, seed=0),
        data=controller_pb2.JobSpec.Data(source="stdlib", vocab_size=1024, max_bytes=1_000_000),
    )
    spec.model.preset = "palm-tiny"
    spec.model.overrides.update({"n_layers": 1})  # a shorter compile

    @dataclasses.dataclass
    class Record:
        id: str
        spec: controller_pb2.JobSpec
        generation: int = 0

    async def run(addresses: list[str], job_id: str, epoch: int):
        base = palm_program(Record(job_id, spec))

        def overlapped(at):
            request = base.load(at)
            request.exchange_overlap = True
            request.exchange_bucket_bytes = 16 << 10  # several buckets
            return request

        islands = [Island(f"ov-{i}", [await connect_host(a)]) for i, a in enumerate(addresses)]
        try:
            dispatcher = Dispatcher(epoch=epoch)
            program = dataclasses.replace(base, load=overlapped)
            await dispatcher.load(program, islands)
            reports: list = []
            await dispatcher.run(program, islands, on_step=reports.append)
            digests = [
                await i.hosts[0].stub.ParamDigest(worker_pb2.ParamDigestRequest(job_id=job_id))
                for i in islands
            ]
            await dispatcher.unload(job_id, islands)
            return [r.loss for r in reports], digests
        finally:
            for island in islands:
                await island.close()

    hosts = []
    for index in range(2):
        devices = [jax.devices()[index]]
        meta = HostMetadata.in_process(f"ov-{index}", devices, 256 << 20)
        server = BackgroundServer(WorkerServicer(meta, devices), "127.0.0.1", 0)
        hosts.append((server, f"127.0.0.1:{server.start()}"))
    addresses = [a for _, a in hosts]
    try:
        before = len(exchange_overlap._programs)
        losses, digests = asyncio.run(run(addresses, "ov-a", 11))
        compiled = len(exchange_overlap._programs)
        again, digests_again = asyncio.run(run(addresses, "ov-b", 12))
    finally:
        for server, _ in hosts:
            server.stop()
    configs = spec_lib.to_configs(spec)
    dataset = prepare_dataset(configs.data, seq_len=SEQ)
    train = configs.train
    reference = ReferenceTrainer(configs.model, configs.optim, train).losses(
        lambda s: dataset.global_batch(s, train.global_batch, train.seed)[0]
    )
    a, b = np.asarray(losses, np.float64), np.asarray(reference, np.float64)
    assert len(losses) == 4 and float(np.max(np.abs(a - b) / np.abs(b))) <= 1e-5, (a, b)
    assert len({d.sha256 for d in digests}) == 1 and {d.steps_applied for d in digests} == {4}
    # One program per island (each on its own device); the second job compiled none.
    assert compiled == min(before + 2, exchange_overlap._PROGRAMS_MAX)
    assert len(exchange_overlap._programs) == compiled
    assert again == losses and [d.sha256 for d in digests_again] == [d.sha256 for d in digests]
