"""PaLM jobs on real island hosts: the 2D layout, equivalence with the reference, bad input.

Every job operation goes over the worker gRPC service of detached Ray actor island hosts on
the session cluster of tests/conftest.py: `solo` (one host, 4 CPU devices) is reused by every
test; `duo` (two hosts x 2 devices, one jax.distributed runtime) runs the same job as a 2-host
island. The data is the shared `stdlib_dataset` (prepared once, from the on-disk cache), sent
as a prepared dataset folder with its hash.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest

from pathways_lite.controller.resolved import config_struct
from pathways_lite.model.config import PalmConfig
from pathways_lite.model.optim import OptimConfig
from pathways_lite.model.train import ReferenceTrainer, TrainConfig
from pathways_lite.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from pathways_lite.workers.auth import Credential, host_channel
from pathways_lite.workers.island_host import IslandHostGroup, IslandSpec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

BATCH, SEQ, STEPS = 8, 64, 10
EPOCH = 1
# Fits palm-tiny (under 1 MiB per device) with room; a widened model does not.
BUDGET = 64 * 1024 * 1024
MESHES = [(1, 4), (2, 2), (4, 1)]


@dataclass
class Island:
    """A started island and one stub per host; tracks the hosts' next island_seq."""

    group: IslandHostGroup
    stubs: list[worker_pb2_grpc.WorkerServiceStub]
    channels: list[grpc.Channel]
    seq: int = 0

    def on_all(self, method: str, request, timeout: float = 240):
        """Send one request to every host at once (they run one SPMD program)."""
        futures = [getattr(s, method).future(request, timeout=timeout) for s in self.stubs]
        return [f.result() for f in futures]

    def run_steps(self, job_id: str, steps: int) -> list[worker_pb2.RunStepReply]:
        """Steps 0 .. steps - 1 in island order; the replies of host 0."""
        replies = []
        for k in range(steps):
            request = worker_pb2.RunStepRequest(
                job_id=job_id, step=k, island_seq=self.seq, epoch=EPOCH
            )
            per_host = self.on_all("RunStep", request)
            self.seq += 1
            assert len({r.loss for r in per_host}) == 1, per_host
            replies.append(per_host[0])
        return replies

    def close(self) -> None:
        for c in self.channels:
            c.close()
        self.group.shutdown()


def _start(name: str, num_hosts: int, devices_per_host: int) -> Island:
    spec = IslandSpec(
        name,
        num_hosts=num_hosts,
        devices_per_host=devices_per_host,
        memory_budget_bytes_per_device=BUDGET,
    )
    credential = Credential("island-palm-test-secret")
    group = IslandHostGroup(spec, credential)
    group.start()
    channels = [host_channel(m.address, credential) for m in group.metadata]
    return Island(group, [worker_pb2_grpc.WorkerServiceStub(c) for c in channels], channels)


@pytest.fixture(scope="module")
def solo(ray_cluster) -> Iterator[Island]:
    island = _start("solo", 1, 4)
    try:
        yield island
    finally:
        island.close()


@pytest.fixture(scope="module")
def dataset(stdlib_dataset):
    assert stdlib_dataset.seq_len == SEQ, "the shared test dataset is built for seq_len 64"
    return stdlib_dataset


@pytest.fixture(scope="module")
def reference_losses(dataset) -> list[float]:
    """The single-device reference run on the same global batches."""
    cfg = PalmConfig.from_preset("palm-tiny", vocab_size=dataset.tokenizer.vocab_size)
    trainer = ReferenceTrainer(
        cfg, OptimConfig(), TrainConfig(steps=STEPS, global_batch=BATCH, seq_len=SEQ)
    )
    return trainer.losses(lambda step: dataset.global_batch(step, BATCH, 0)[0])


def load_request(dataset, job_id: str, mesh: tuple[int, int], **kw) -> worker_pb2.LoadJobRequest:
    """palm-tiny as the controller resolves it: every PalmConfig and OptimConfig field."""
    cfg = PalmConfig.from_preset(
        "palm-tiny", vocab_size=dataset.tokenizer.vocab_size, **kw.pop("overrides", {})
    )
    model_dict = {**cfg.to_dict(), **kw.pop("extra_model_keys", {})}
    request = worker_pb2.LoadJobRequest(
        job_id=job_id,
        epoch=kw.pop("epoch", EPOCH),
        model=common_pb2.ModelConfig(preset="palm-tiny", config=config_struct(model_dict)),
        mesh=common_pb2.MeshShape(data=mesh[0], model=mesh[1]),
        optimizer=common_pb2.OptimizerConfig(
            config=config_struct(dataclasses.asdict(OptimConfig()))
        ),
        data=common_pb2.DataSpec(source="dataset", paths=[str(dataset.path)]),
        data_hash=kw.pop("data_hash", dataset.hash),
        seed=0,
        global_batch=BATCH,
        seq_len=SEQ,
        island_index=0,
        num_islands=1,
        dry_run=kw.pop("dry_run", False),
    )
    assert not kw, kw
    return request


def max_rel_diff(a: list[float], b: list[float]) -> float:
    a_, b_ = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a_ - b_) / np.abs(b_)))


def unload(island: Island, job_id: str) -> None:
    replies = island.on_all("UnloadJob", worker_pb2.UnloadJobRequest(job_id=job_id, epoch=EPOCH))
    assert all(r.unloaded for r in replies)


def rejection(call, request) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=240)
    return err.value.code(), err.value.details()


@pytest.mark.parametrize("mesh", MESHES, ids=[f"{d}x{m}" for d, m in MESHES])
def test_island_mesh_matches_reference_losses_and_reads_the_global_batch(
    solo: Island, dataset, reference_losses: list[float], mesh: tuple[int, int]
) -> None:
    job_id = f"eq-{mesh[0]}x{mesh[1]}"
    (loaded,) = solo.on_all("LoadJob", load_request(dataset, job_id, mesh))
    assert loaded.loaded and loaded.memory.total_bytes > 0
    assert 0 < loaded.estimate_bytes_per_device <= loaded.budget_bytes_per_device == BUDGET
    try:
        replies = solo.run_steps(job_id, STEPS)
        losses = [r.loss for r in replies]
        assert max_rel_diff(losses, reference_losses) <= 1e-5, (losses, reference_losses)
        for k, reply in enumerate(replies):
            _, ids = dataset.global_batch(k, BATCH, 0)
            assert list(reply.example_ids) == ids.tolist()
        (digest,) = solo.on_all("ParamDigest", worker_pb2.ParamDigestRequest(job_id=job_id))
        assert digest.steps_applied == STEPS and len(digest.sha256) == 32
    finally:
        unload(solo, job_id)


def test_mlp_kernels_are_split_across_model_devices(solo: Island, dataset) -> None:
    job_id = "layout"
    solo.on_all("LoadJob", load_request(dataset, job_id, (2, 2)))
    try:
        (layout,) = solo.group.execute("job_param_layout", job_id)
    finally:
        unload(solo, job_id)
    mlp_in = {k: v for k, v in layout.items() if "gate_kernel" in k or "up_kernel" in k}
    assert mlp_in, f"no MLP input kernel among {sorted(layout)}"
    for name, entry in mlp_in.items():
        d, f = entry["shape"]
        shards = entry["shards"]
        # Four devices, each holding one quarter: "embed" over data (2), "mlp" over model (2).
        assert len({device for device, _, _ in shards}) == 4, (name, shards)
        assert {shape for _, shape, _ in shards} == {(d // 2, f // 2)}, (name, shards)
        assert len({index for _, _, index in shards}) == 4, (name, shards)
        assert {index[1] for _, _, index in shards} == {(0, f // 2), (f // 2, f)}
        assert entry["spec"].replace("PartitionSpec", "P") == "P('data', 'model')", entry["spec"]


def test_bad_input_gets_its_status_naming_the_value_and_the_host_keeps_serving(
    solo: Island, dataset
) -> None:
    stub = solo.stubs[0]
    wide = {"d_model": 1024, "n_layers": 8, "head_dim": 256}
    cases = [
        (load_request(dataset, "bad-mesh", (3, 1)), grpc.StatusCode.INVALID_ARGUMENT, "data=3"),
        (
            load_request(dataset, "too-big", (2, 2), overrides=wide),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            str(BUDGET),
        ),
        (
            load_request(dataset, "bad-key", (2, 2), extra_model_keys={"d_modle": 64}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "model.config.d_modle",
        ),
        (
            load_request(dataset, "bad-hash", (2, 2), data_hash="f00d" * 16),
            grpc.StatusCode.FAILED_PRECONDITION,
            "f00d" * 16,
        ),
    ]
    for request, want, named in cases:
        code, message = rejection(stub.LoadJob, request)
        assert code == want, (request.job_id, message)
        assert named in message, message
    code, message = rejection(
        stub.RunStep, worker_pb2.RunStepRequest(job_id="ghost", island_seq=solo.seq, epoch=EPOCH)
    )
    assert code == grpc.StatusCode.NOT_FOUND and "'ghost'" in message
    code, message = rejection(stub.ParamDigest, worker_pb2.ParamDigestRequest(job_id="ghost"))
    assert code == grpc.StatusCode.NOT_FOUND and "'ghost'" in message
    # Nothing was allocated for a refused job.
    assert stub.Info(worker_pb2.InfoRequest(), timeout=30).loaded_jobs == []

    job_id = "after-errors"
    (loaded,) = solo.on_all("LoadJob", load_request(dataset, job_id, (2, 2)))
    try:
        assert loaded.loaded
        code, message = rejection(
            stub.RunStep,
            worker_pb2.RunStepRequest(job_id=job_id, step=0, island_seq=solo.seq, epoch=EPOCH - 1),
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION and f"epoch={EPOCH - 1}" in message
        (reply,) = solo.run_steps(job_id, 1)
        assert np.isfinite(reply.loss) and len(reply.example_ids) == BATCH
    finally:
        unload(solo, job_id)


def test_a_job_compiling_does_not_stop_a_resident_job_stepping(solo: Island, dataset) -> None:
    """LoadJob compiles off the island's runtime thread: a resident job's steps go on while a
    newcomer compiles (a model shape of its own, so no compilation cache can answer it)."""
    stub = solo.stubs[0]
    stub.LoadJob(load_request(dataset, "resident", (1, 4)), timeout=240)
    fresh = {"max_seq_len": 64 + random.SystemRandom().randrange(1, 1 << 20)}
    step = 0
    try:
        solo.run_steps("resident", 2)  # compiled and warm
        step = 2
        loading = stub.LoadJob.future(
            load_request(dataset, "newcomer", (2, 2), overrides=fresh), timeout=240
        )
        during = 0
        while not loading.done():
            stub.RunStep(
                worker_pb2.RunStepRequest(
                    job_id="resident", step=step, island_seq=solo.seq, epoch=EPOCH
                ),
                timeout=240,
            )
            solo.seq += 1
            step += 1
            during += not loading.done()
        reply = loading.result()
        assert reply.loaded and reply.compile_s > 0
        # Steps ran to completion while the newcomer compiled (the compile takes seconds;
        # a palm-tiny step on 4 CPU devices tens of milliseconds).
        assert during >= 3, (during, reply.compile_s)
        first = stub.RunStep(
            worker_pb2.RunStepRequest(job_id="newcomer", step=0, island_seq=solo.seq, epoch=EPOCH),
            timeout=240,
        )
        solo.seq += 1
        assert np.isfinite(first.loss)
    finally:
        unload(solo, "resident")
        try:
            unload(solo, "newcomer")
        except (AssertionError, grpc.RpcError):
            pass


def test_dry_run_reports_compiled_memory_and_keeps_nothing(solo: Island, dataset) -> None:
    (reply,) = solo.on_all("LoadJob", load_request(dataset, "dry", (1, 4), dry_run=True))
    assert not reply.loaded
    assert reply.memory.argument_bytes > 0 and reply.memory.temp_bytes > 0
    assert reply.memory.total_bytes >= reply.memory.argument_bytes
    assert solo.stubs[0].Info(worker_pb2.InfoRequest(), timeout=30).loaded_jobs == []


def test_two_host_island_matches_one_host_island_of_the_same_devices(
    solo: Island, dataset, reference_losses: list[float]
) -> None:
    steps = 4
    job_id = "hosts"
    losses = {}
    digests = {}
    duo = _start("duo", 2, 2)
    try:
        assert [m.island_device_count for m in duo.group.metadata] == [4, 4]
        for name, island in (("solo", solo), ("duo", duo)):
            loaded = island.on_all("LoadJob", load_request(dataset, job_id, (2, 2)))
            assert all(r.loaded for r in loaded)
            try:
                replies = island.run_steps(job_id, steps)
                losses[name] = [r.loss for r in replies]
                for k, reply in enumerate(replies):
                    assert list(reply.example_ids) == dataset.global_batch(k, BATCH, 0)[1].tolist()
                request = worker_pb2.ParamDigestRequest(job_id=job_id)
                per_host = island.on_all("ParamDigest", request)
                assert len({d.sha256 for d in per_host}) == 1  # every host sees the same params
                digests[name] = per_host[0]
            finally:
                unload(island, job_id)
    finally:
        duo.close()
    assert max_rel_diff(losses["duo"], losses["solo"]) <= 1e-5, losses
    assert max_rel_diff(losses["duo"], reference_losses[:steps]) <= 1e-5
    assert digests["duo"].num_params == digests["solo"].num_params
