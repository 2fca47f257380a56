"""Pipeline parallelism across islands: stages train as the single-process reference does.

Island hosts are real worker services served in this process (one CPU device group each),
driven by the controller's own Dispatcher and `palm_program`; activations and their
gradients travel host to host over gRPC between the stages, the replicas of a stage
exchange gradients as a data-parallel job's islands do.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import jax
import numpy as np
import pytest

from pathways_lite.controller import spec as spec_lib
from pathways_lite.controller.dispatch import Dispatcher
from pathways_lite.controller.islands import Island, connect_host
from pathways_lite.controller.program import HostLoad
from pathways_lite.controller.resolved import palm_program
from pathways_lite.model.config import PalmConfig
from pathways_lite.model.data import prepare_dataset
from pathways_lite.model.pipeline import SCHEDULES, peak_stash, schedule_order, stage_split
from pathways_lite.model.train import ReferenceTrainer
from pathways_lite.v1 import controller_pb2, worker_pb2, worker_pb2_grpc
from pathways_lite.workers.host import HostMetadata
from pathways_lite.workers.service import BackgroundServer, WorkerServicer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

STEPS, SEQ = 3, 32
DATA = {"source": "stdlib", "vocab_size": 1024, "max_bytes": 1_000_000}
BUDGET = 256 * 1024 * 1024


def pipe_spec(
    islands: int, devices: int, mesh: tuple[int, int], batch: int, stages: int, mb: int, sched: str
) -> controller_pb2.JobSpec:
    spec = controller_pb2.JobSpec(
        name=f"pipe-{islands}",
        islands=islands,
        devices_per_island=devices,
        mesh=controller_pb2.JobSpec.Mesh(data=mesh[0], model=mesh[1]),
        train=controller_pb2.JobSpec.Train(steps=STEPS, global_batch=batch, seq_len=SEQ, seed=0),
        data=controller_pb2.JobSpec.Data(**DATA),
        pipeline=controller_pb2.JobSpec.Pipeline(stages=stages, microbatches=mb, schedule=sched),
    )
    spec.model.preset = "palm-tiny"
    return spec


def reference_losses(spec) -> list[float]:
    configs = spec_lib.to_configs(spec)
    dataset = prepare_dataset(configs.data, seq_len=SEQ)
    train = configs.train
    trainer = ReferenceTrainer(configs.model, configs.optim, train)
    return trainer.losses(lambda s: dataset.global_batch(s, train.global_batch, train.seed)[0])


def max_rel_diff(a, b) -> float:
    a_, b_ = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a_ - b_) / np.abs(b_)))


@dataclasses.dataclass
class LocalHost:
    server: BackgroundServer
    address: str
    channel: grpc.Channel
    stub: worker_pb2_grpc.WorkerServiceStub


def serve_hosts(device_groups: list[list[int]]) -> list[LocalHost]:
    hosts = []
    for index, ids in enumerate(device_groups):
        devices = [jax.devices()[i] for i in ids]
        meta = HostMetadata.in_process(f"pipe-{index}", devices, BUDGET)
        server = BackgroundServer(WorkerServicer(meta, devices), "127.0.0.1", 0)
        address = f"127.0.0.1:{server.start()}"
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
    id: str
    spec: controller_pb2.JobSpec
    generation: int = 0


async def dispatch(addresses: list[str], spec, job_id: str, epoch: int):
    """Load, run and unload a job with the controller's Dispatcher: its step reports and
    every island's final ParamDigest."""
    islands = [Island(f"local-{i}", [await connect_host(a)]) for i, a in enumerate(addresses)]
    try:
        program = palm_program(Record(job_id, spec))
        return await dispatch_on(islands, Dispatcher(epoch=epoch), program)
    finally:
        for island in islands:
            await island.close()


async def dispatch_on(islands: list[Island], dispatcher: Dispatcher, program, *, unload=True):
    """Load and run `program` on `islands` (within 120 s: a step that never starts fails
    here, not at the module's timeout), then unload it unless `unload` is False: its step
    reports and every island's ParamDigest."""
    await dispatcher.load(program, islands)
    reports: list = []
    await asyncio.wait_for(dispatcher.run(program, islands, on_step=reports.append), 120)
    digests = [
        await island.hosts[0].stub.ParamDigest(worker_pb2.ParamDigestRequest(job_id=program.job_id))
        for island in islands
    ]
    if unload:
        await dispatcher.unload(program.job_id, islands)
    return reports, digests


@pytest.fixture(scope="module")
def four_hosts() -> Iterator[list[LocalHost]]:
    hosts = serve_hosts([[0], [1], [2], [3]])
    try:
        yield hosts
    finally:
        stop_hosts(hosts)


# ---- the split and the schedules (no hosts) -------------------------------------------------


def test_split_is_contiguous_balanced_and_gives_the_ends_fewer_blocks() -> None:
    cfg = PalmConfig.palm_small(n_layers=8)
    bounds = stage_split(cfg, 4)
    assert bounds[0][0] == 0 and bounds[-1][1] == 8
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    sizes = [hi - lo for lo, hi in bounds]
    assert min(sizes) >= 1 and sizes[-1] <= sizes[1], sizes  # the head costs the last stage
    assert stage_split(PalmConfig.palm_tiny(), 2) == ((0, 1), (1, 2))


def test_1f1b_stashes_at_most_stages_microbatches_and_gpipe_all() -> None:
    for stage in range(3):
        assert peak_stash("1f1b", stage, 4, 8) == 4 - stage
        assert peak_stash("gpipe", stage, 4, 8) == 8
        for sched in ("gpipe", "1f1b"):
            order = schedule_order(sched, stage, 4, 8)
            assert [m for k, m in order if k == "B"] == list(range(8))  # backward order fixed
            assert sorted(m for k, m in order if k == "F") == list(range(8))


@pytest.mark.parametrize("stage", [0, 1])
def test_a_backward_from_the_forwards_residuals_equals_one_that_runs_the_forward_again(
    stage: int,
) -> None:
    """Stage 0 (embedding + block) and a middle stage (blocks only) of a 3-stage palm-tiny:
    the gradients `bwd` computes from the residuals `fwd` stashed, with the parameters left
    out of the stash, are those of a VJP that runs the stage's forward again."""
    from pathways_lite.model.optim import OptimConfig
    from pathways_lite.model.pipeline import StageFunctions, StagePlan

    cfg = PalmConfig.palm_tiny(n_layers=3)
    fns = StageFunctions(cfg, OptimConfig(), StagePlan(stage, 3, stage_split(cfg, 3)))
    params, _ = fns.init(0)
    rng = np.random.default_rng(stage)
    b, t = 2, 16
    if stage == 0:
        x_in = jax.numpy.asarray(rng.integers(0, cfg.vocab_size, (b, t + 1)), np.int32)
    else:
        x_in = jax.numpy.asarray(rng.standard_normal((b, t, cfg.d_model)), np.float32)
    g = jax.numpy.asarray(rng.standard_normal((b, t, cfg.d_model)), np.float32)
    with jax.set_mesh(fns.mesh):
        y, residuals = fns.fwd(params, x_in)
        grads, g_x = fns.bwd(params, residuals, g)
    # The parameters are passed to the backward, not copied into the stash.
    weights = {leaf.shape for leaf in jax.tree.leaves(params) if leaf.ndim >= 2}
    assert residuals and not {r.shape for r in residuals} & weights
    if stage == 0:
        y_again, vjp = jax.vjp(lambda p: fns._stage_out(p, x_in), params)
        want, want_x = vjp(g)[0], None
    else:
        y_again, vjp = jax.vjp(fns._stage_out, params, x_in)
        want, want_x = vjp(g)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_again), rtol=1e-6, atol=1e-6)
    pairs = list(zip(jax.tree.leaves(grads), jax.tree.leaves(want), strict=True))
    assert (g_x is None) == (stage == 0)
    if want_x is not None:
        pairs.append((g_x, want_x))
    for got, exp in pairs:  # equal up to float rounding (another program, other fusions)
        exp = np.asarray(exp)
        scale = float(np.abs(exp).max())
        np.testing.assert_allclose(np.asarray(got), exp, rtol=1e-5, atol=1e-5 * scale)


def test_bfloat16_stages_through_a_float32_link_are_bitwise_the_bfloat16_reference() -> None:
    """bf16 compute, one microbatch: stage 0's output and stage 1's input gradient go through
    float32 numpy arrays as workers/stage_link.py carries them, and the loss and every
    gradient (the embedding's as first + last) are bitwise the whole bf16 model's. XLA's
    excess precision is off here: with it, CPU XLA keeps bf16 values in float32 across
    casts as each program's fusions allow, which differs between the stage programs and the
    whole model's (the hosts' test below bounds that)."""
    from pathways_lite.model.optim import OptimConfig
    from pathways_lite.model.pipeline import StageFunctions, StagePlan
    from pathways_lite.model.train import StepFunctions

    def run(fn, *args):
        compiled = fn.lower(*args).compile(compiler_options={"xla_allow_excess_precision": False})
        return compiled(*args)

    def link(array):  # what the receiving stage places: float32 values
        return jax.numpy.asarray(np.asarray(array, np.float32))

    cfg = PalmConfig.palm_tiny(dtype="bfloat16")
    tokens = jax.numpy.asarray(
        np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 17)), np.int32
    )
    whole = StepFunctions(cfg, OptimConfig(), None)
    want_loss, _, want = run(whole._grad, whole.init(0).params, tokens)
    bounds = stage_split(cfg, 2)
    first, last = (StageFunctions(cfg, OptimConfig(), StagePlan(s, 2, bounds)) for s in (0, 1))
    (p0, _), (p1, _) = first.init(0), last.init(0)
    with jax.set_mesh(first.mesh):
        y, residuals = run(first.fwd, p0, tokens)
        loss, g1, g_x = run(last.fwdbwd, p1, link(y), tokens)
        g0, _ = run(first.bwd, p0, residuals, link(g_x))
    assert float(loss) == float(want_loss)
    want_leaves = {
        jax.tree_util.keystr(k): np.asarray(v)
        for k, v in jax.tree_util.tree_flatten_with_path(want)[0]
    }
    embed = "['embed']['embedding'].value"
    got_leaves = {embed: 0.0}
    for grads, lo in ((g0, bounds[0][0]), (g1, bounds[1][0])):
        for k, v in jax.tree_util.tree_flatten_with_path(grads)[0]:
            key = jax.tree_util.keystr(k).replace("['blocks'][0]", f"['blocks'][{lo}]")
            got_leaves[key] = got_leaves[key] + np.asarray(v) if key == embed else np.asarray(v)
    assert got_leaves.keys() == want_leaves.keys()
    for key, value in want_leaves.items():
        np.testing.assert_array_equal(got_leaves[key], value, err_msg=key)


@pytest.mark.parametrize(
    ("preset", "batch", "seq", "dtype"),
    [
        ("palm-tiny", 4, 64, "float32"),
        ("palm-small", 4, 128, "float32"),
        ("palm-small", 16, 64, "float32"),
        ("palm-small", 1, 32, "float32"),
        ("palm-small", 1, 32, "bfloat16"),
        ("palm-small", 16, 64, "bfloat16"),
    ],
)
def test_the_stash_estimate_bounds_a_stages_residuals(preset, batch, seq, dtype) -> None:
    """Admission's figure per stashed microbatch (model/estimates.py) against the residuals
    the stage's forward really returns (shapes only, nothing computed): never below, within
    a quarter above in float32 (bf16 residuals are smaller: the estimate counts 4 bytes);
    no residual is a copy of a weight (with bf16 compute, the weights' casts)."""
    from pathways_lite.model.estimates import stash_bytes_per_microbatch
    from pathways_lite.model.optim import OptimConfig
    from pathways_lite.model.pipeline import StageFunctions, StagePlan

    cfg = PalmConfig.from_preset(preset, dtype=dtype)
    bounds = stage_split(cfg, 2)
    fns = StageFunctions(cfg, OptimConfig(), StagePlan(0, 2, bounds))
    params, _ = jax.eval_shape(lambda: fns._init_impl(0))
    tokens = jax.ShapeDtypeStruct((batch, seq + 1), np.int32)
    _, residuals = jax.eval_shape(fns._fwd_impl, params, tokens)
    weights = {leaf.shape for leaf in jax.tree.leaves(params) if leaf.ndim >= 2}
    assert not {r.shape for r in residuals} & weights
    real = sum(int(np.prod(r.shape)) * r.dtype.itemsize for r in residuals)
    estimate = stash_bytes_per_microbatch(
        cfg, {"data": 1, "model": 1}, examples_per_device=batch, seq_len=seq, layers=bounds[0][1]
    )
    assert real <= estimate <= (1.25 if dtype == "float32" else 2.5) * real, (real, estimate)


# ---- distributed runs -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_by_two_runs(four_hosts):
    """palm-tiny (2 blocks) as 2 stages x 2 replicas on the same hosts: 1F1B under controller
    epoch 1; its controller then dies (the job stays loaded on the hosts) and a restarted one
    (epoch 2, on the same island handles) runs GPipe, then the 1F1B job again as generation 1
    (`1f1b-restarted`; from the seed: restoring a pipeline's checkpoint is the Ray test's)."""
    specs = {s: pipe_spec(4, 1, (1, 1), batch=16, stages=2, mb=4, sched=s) for s in SCHEDULES}

    async def main() -> dict:
        islands = [
            Island(f"local-{i}", [await connect_host(h.address)]) for i, h in enumerate(four_hosts)
        ]
        try:
            first = palm_program(Record("pipe-1f1b", specs["1f1b"]))
            runs = {"1f1b": await dispatch_on(islands, Dispatcher(1), first, unload=False)}
            restarted = Dispatcher(2)
            gpipe = palm_program(Record("pipe-gpipe", specs["gpipe"]))
            runs["gpipe"] = await dispatch_on(islands, restarted, gpipe)
            again = palm_program(Record("pipe-1f1b", specs["1f1b"], generation=1))
            runs["1f1b-restarted"] = await dispatch_on(islands, restarted, again)
            return runs
        finally:
            for island in islands:
                await island.close()

    return specs["1f1b"], asyncio.run(main())


def test_a_restarted_controller_runs_pipelines_on_hosts_that_hold_its_predecessors_job(
    two_by_two_runs,
) -> None:
    """After a controller restart (new epoch, the dead controller's job still loaded) every
    stage steps again: a new job runs (GPipe: the other tests check it), and the job itself,
    reloaded as a new generation, gives bitwise the losses and parameters of its first run."""
    _, runs = two_by_two_runs
    reports, digests = runs["1f1b-restarted"]
    assert [r.loss for r in reports] == [r.loss for r in runs["1f1b"][0]]
    assert [d.sha256 for d in digests] == [d.sha256 for d in runs["1f1b"][1]]


def test_a_restarted_controller_restores_a_pipeline_from_its_checkpoint() -> None:
    """A restarted controller does not adopt a pipeline's state from its hosts (its stages'
    digests never agree, its stage links are bound to the loaded generation): `adopt` declines
    at once, before any host is asked, and the job restores its checkpoint (as above)."""
    from pathways_lite.controller.peer_recovery import PeerRecovery

    recovery = PeerRecovery(store=None, dispatcher=None)  # neither may be used
    program = palm_program(Record("p", pipe_spec(2, 1, (1, 1), 8, stages=2, mb=2, sched="1f1b")))
    assert program.checkpoint_islands == (0, 1)
    recovery.remember("p", 0, 2)
    assert asyncio.run(recovery.adopt(program, [], "", lambda report: None)) is None
    assert "p" not in recovery.adoptable


def test_two_stages_two_replicas_match_the_reference_losses(two_by_two_runs) -> None:
    spec, runs = two_by_two_runs
    reference = reference_losses(spec)
    losses = [r.loss for r in runs["1f1b"][0]]
    assert len(losses) == STEPS == len(reference)
    assert max_rel_diff(losses, reference) <= 1e-5, (losses, reference)


def test_gpipe_and_1f1b_give_bitwise_the_same_losses_and_parameters(two_by_two_runs) -> None:
    _, runs = two_by_two_runs
    assert [r.loss for r in runs["1f1b"][0]] == [r.loss for r in runs["gpipe"][0]]
    assert [d.sha256 for d in runs["1f1b"][1]] == [d.sha256 for d in runs["gpipe"][1]]


def test_stages_send_exactly_the_activations_and_1f1b_stashes_less(two_by_two_runs) -> None:
    _, runs = two_by_two_runs
    d_model = PalmConfig.palm_tiny().d_model
    per_replica = 16 // 2 * SEQ * d_model * 4  # (B / R, T, D) float32, forward or backward
    for report in runs["1f1b"][0]:
        assert [h.reply.stage_bytes_sent for h in report.hosts] == [per_replica] * 4
    peak = {
        s: max(h.reply.peak_stash_bytes for r in runs[s][0] for h in r.hosts) for s in SCHEDULES
    }
    # Stage 0 stashes its forwards' residuals: 2 (= S) microbatches under 1F1B, all 4 under
    # GPipe.
    assert peak["1f1b"] * 2 == peak["gpipe"] > 0


def test_stage_parameters_are_bitwise_identical_across_replicas(two_by_two_runs) -> None:
    _, runs = two_by_two_runs
    reports, digests = runs["1f1b"]
    # Islands 0, 1: stage 0's replicas; islands 2, 3: stage 1's.
    assert digests[0].sha256 == digests[1].sha256
    assert digests[2].sha256 == digests[3].sha256
    assert digests[0].sha256 != digests[2].sha256
    assert {d.steps_applied for d in digests} == {STEPS}
    for report in reports:
        by_island = [h.reply.param_digest for h in report.hosts]
        assert by_island[0] == by_island[1] and by_island[2] == by_island[3]
        # Activations (and gradients back) moved between the stages' hosts every step.
        assert all(h.reply.exchange_bytes_sent > 0 for h in report.hosts)


def test_the_trace_has_a_track_per_host_with_steps_and_nested_microbatches(
    four_hosts, two_by_two_runs
) -> None:
    import json

    from pathways_lite.controller.trace import job_trace
    from pathways_lite.trace import chrome_trace

    async def collect():
        islands = [
            Island(f"island-{i}", [await connect_host(h.address)]) for i, h in enumerate(four_hosts)
        ]
        try:
            return await job_trace("pipe-gpipe", islands)
        finally:
            for island in islands:
                await island.close()

    reply = asyncio.run(collect())
    trace = json.loads(json.dumps(chrome_trace(reply, (1, 3))))
    # The dashboard's schedule chart of the same logs: a row per stage, 4 forwards and
    # backwards each per step, the bubble measured beside the theoretical 1/5.
    from pathways_lite.controller.trace import pipeline_gantt

    gantt = pipeline_gantt(reply, stages=2, microbatches=4)
    assert gantt["steps"] == [1, 2] and gantt["bubble_theory"] == pytest.approx(0.2)
    assert {b["stage"] for b in gantt["bars"]} == {0, 1}
    assert len([b for b in gantt["bars"] if b["stage"] == 0 and b["kind"] == "forward"]) == 8
    assert 0.0 <= gantt["bubble_measured"] < 1.0
    events = trace["traceEvents"]
    tracks = {(e["pid"], e["tid"]) for e in events if e["ph"] == "M" and "tid" in e}
    assert len(tracks) == 4
    for pid, tid in tracks:
        mine = [e for e in events if e["ph"] == "X" and (e["pid"], e["tid"]) == (pid, tid)]
        steps = [e for e in mine if e["cat"] == "step"]
        assert sorted(e["args"]["step"] for e in steps) == [1, 2]
        for step in steps:
            parts = [
                e for e in mine if e["cat"] != "step" and e["args"]["step"] == step["args"]["step"]
            ]
            names = sorted(e["name"] for e in parts)
            # 4 microbatches: forwards and backwards (the last stage's are fused "B"), exchange.
            assert names.count("exchange") == 1 and len([n for n in names if n[0] == "B"]) == 4
            for e in parts:  # nested inside the step's slice
                assert (
                    step["ts"] - 1 <= e["ts"] and e["ts"] + e["dur"] <= step["ts"] + step["dur"] + 1
                )


def test_two_stages_on_a_model_parallel_mesh_match_the_reference(four_hosts) -> None:
    hosts = serve_hosts([[0, 1], [2, 3]])
    try:
        spec = pipe_spec(2, 2, (1, 2), batch=8, stages=2, mb=2, sched="1f1b")
        reports, digests = asyncio.run(dispatch([h.address for h in hosts], spec, "pipe-m2", 1))
    finally:
        stop_hosts(hosts)
    assert max_rel_diff([r.loss for r in reports], reference_losses(spec)) <= 1e-5


def test_four_stages_of_one_block_each_match_the_reference(four_hosts) -> None:
    """With `recompute`: the stages stash their inputs only and run the forward again."""
    spec = pipe_spec(4, 1, (1, 1), batch=8, stages=4, mb=4, sched="gpipe")
    spec.model.overrides.update({"n_layers": 4})
    spec.pipeline.recompute = True
    reports, digests = asyncio.run(
        dispatch([h.address for h in four_hosts], spec, "pipe-4x1", epoch=5)
    )
    assert max_rel_diff([r.loss for r in reports], reference_losses(spec)) <= 1e-5
    assert len({d.sha256 for d in digests}) == 4  # four different stages
    # Stage 0 stashes the tokens of its 4 microbatches (2 x 33 int32 each), nothing more.
    assert max(h.reply.peak_stash_bytes for r in reports for h in r.hosts[:1]) == 4 * 2 * 33 * 4


def test_a_bfloat16_pipeline_loads_trains_and_matches_the_bfloat16_reference(four_hosts) -> None:
    """bf16 compute (what `dtype: auto` is on GPU) on the hosts: every stage compiles and
    loads (the stages meet in float32, exact for bf16), and 3 steps of forwards and backwards
    give the bf16 reference's losses up to CPU XLA's excess precision, which the stage
    programs and the whole model's keep in different places (the test above is bitwise
    without it): measured 1.1e-4 relative at most, 4e-5 at step 0."""
    spec = pipe_spec(2, 1, (1, 1), batch=8, stages=2, mb=2, sched="1f1b")
    spec.model.overrides.update({"dtype": "bfloat16"})
    reports, _ = asyncio.run(
        dispatch([h.address for h in four_hosts[:2]], spec, "pipe-bf16", epoch=6)
    )
    losses = [r.loss for r in reports]
    assert len(losses) == STEPS
    reference = reference_losses(spec)
    assert max_rel_diff(losses, reference) <= 3e-4, (losses, reference)
    # Activations travel as float32 whatever the compute dtype: (B, T, D) x 4 bytes per stage.
    d_model = PalmConfig.palm_tiny().d_model
    for report in reports:
        assert [h.reply.stage_bytes_sent for h in report.hosts] == [8 * SEQ * d_model * 4] * 2


def test_a_hung_stage_fails_the_step_naming_stage_host_and_microbatch(four_hosts) -> None:
    a, b = four_hosts[:2]
    spec = pipe_spec(2, 1, (1, 1), batch=4, stages=2, mb=2, sched="1f1b")
    program = palm_program(Record("hung", spec))
    peers = (a.address, b.address)
    for index, host in enumerate((a, b)):
        request = program.load(
            HostLoad("hung", epoch=9, island_index=index, num_islands=2, peers=peers)
        )
        request.exchange_timeout_s = 2.0
        host.stub.LoadJob(request, timeout=240)
    try:
        seq = a.stub.Info(worker_pb2.InfoRequest(), timeout=10).next_island_seq
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:  # stage 1 (host b) never runs the step
            a.stub.RunStep(
                worker_pb2.RunStepRequest(job_id="hung", step=0, island_seq=seq, epoch=9),
                timeout=60,
            )
        assert time.monotonic() - started < 30
        details = err.value.details()
        assert "stage 1" in details and b.address in details and "microbatch 0" in details
        assert err.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
    finally:
        for host in (a, b):
            host.stub.UnloadJob(worker_pb2.UnloadJobRequest(job_id="hung", epoch=9), timeout=60)


async def dispatch_beside(addresses: list[str], jobs: list[tuple], epoch: int) -> dict:
    """Load several jobs on the same islands and run them at once as the controller does:
    one Dispatcher, the islands shared, the controller's Scheduler granting step slots
    (counted in steps) by weight. `jobs`: (job_id, spec, weight). Returns each job's losses."""
    from pathways_lite.controller.scheduler import Scheduler

    islands = [Island(f"local-{i}", [await connect_host(a)]) for i, a in enumerate(addresses)]
    ids = [island.id for island in islands]
    scheduler = Scheduler(ids, slots=2, share_by="steps")
    dispatcher = Dispatcher(epoch=epoch, slice_s=0.0)  # one step per slice
    losses: dict[str, list[float]] = {}

    async def run(program, weight: float) -> None:
        scheduler.join(program.job_id, ids, weight)
        reports: list = []
        try:
            await dispatcher.run(program, islands, on_step=reports.append, gate=scheduler)
        finally:
            scheduler.leave(program.job_id)
        losses[program.job_id] = [r.loss for r in reports]

    try:
        programs = [(palm_program(Record(job_id, spec)), w) for job_id, spec, w in jobs]
        for program, _ in programs:
            await dispatcher.load(program, islands)
        await asyncio.gather(*(run(program, w) for program, w in programs))
        for program, _ in programs:
            await dispatcher.unload(program.job_id, islands)
        return losses
    finally:
        for island in islands:
            await island.close()


def test_a_pipeline_job_shares_its_islands_with_another_job_by_weight(four_hosts) -> None:
    """A two-stage pipeline (weight 2) and a data-parallel job (weight 1) resident on the same
    two islands: while both run, each island's own execution log holds two pipeline steps per
    data-parallel step, both islands ran the jobs' steps in one order, and the pipeline's
    losses are still the reference trainer's."""
    hosts = four_hosts[2:]
    pipe = pipe_spec(2, 1, (1, 1), batch=8, stages=2, mb=2, sched="1f1b")
    pipe.train.steps = 16
    dp = pipe_spec(2, 1, (1, 1), batch=8, stages=2, mb=2, sched="1f1b")
    dp.ClearField("pipeline")
    dp.train.steps = 8
    losses = asyncio.run(
        dispatch_beside(
            [h.address for h in hosts], [("share-pipe", pipe, 2.0), ("share-dp", dp, 1.0)], 10
        )
    )
    assert max_rel_diff(losses["share-pipe"], reference_losses(pipe)) <= 1e-5
    assert len(losses["share-dp"]) == 8
    orders = []
    for host in hosts:
        log = host.stub.ExecutionLog(worker_pb2.ExecutionLogRequest(), timeout=60)
        entries = sorted(
            (e for e in log.entries if e.job_id in ("share-pipe", "share-dp")),
            key=lambda e: e.island_seq,
        )
        orders.append([(e.job_id, e.step) for e in entries])
        spans = {
            j: (
                min(e.start_unix_ns for e in entries if e.job_id == j),
                max(e.end_unix_ns for e in entries if e.job_id == j),
            )
            for j in ("share-pipe", "share-dp")
        }
        first = max(lo for lo, _ in spans.values())
        last = min(hi for _, hi in spans.values())
        both = [e for e in entries if e.start_unix_ns >= first and e.end_unix_ns <= last]
        n_pipe = sum(e.job_id == "share-pipe" for e in both)
        n_dp = sum(e.job_id == "share-dp" for e in both)
        assert n_dp >= 5 and abs(n_pipe / n_dp - 2.0) <= 0.25, (n_pipe, n_dp, orders[-1])
    assert orders[0] == orders[1]


# ---- the spec and admission (no hosts) -------------------------------------------------------

ISSUE_SPEC = """
name: pipe-2x2
model: {preset: palm-tiny}
islands: 4
devices_per_island: 2
mesh: {data: 1, model: 2}
pipeline: {stages: 2, microbatches: 8, schedule: 1f1b}
train: {steps: 20, global_batch: 16, seq_len: 64, seed: 0}
data: {source: stdlib}
"""


def test_the_issues_spec_parses_and_validates_with_its_pipeline() -> None:
    from pathways_lite.spec import load_spec_text

    spec = load_spec_text(ISSUE_SPEC, validate=True)
    pipe = spec_lib.pipeline_settings(spec)
    assert (pipe.stages, pipe.microbatches, pipe.schedule) == (2, 8, "1f1b")


@pytest.mark.parametrize(
    "change, field, quoted",
    [
        ("pipeline: {stages: 3}", "pipeline.stages", "islands=4"),
        ("pipeline: {stages: 2, microbatches: 3}", "train.global_batch", "microbatches=3"),
        ("pipeline: {stages: 4}", "pipeline.stages", "n_layers=2"),
        ("pipeline: {stages: 2, schedule: zigzag}", "pipeline.schedule", "zigzag"),
        ("pipeline: {stages: 1}", "pipeline.stages", "stages=1"),
        ("pipeline: {stages: 2, microbatches: 0}", "pipeline.microbatches", "=0"),
        ("pipeline: {stages: 2}\nkind: eval", "pipeline", "kind='eval'"),
        ("pipeline: {stages: 2}\ninit_from: {checkpoint: /x}", "init_from", "pipeline"),
    ],
)
def test_bad_pipeline_specs_name_the_field_and_value(change: str, field: str, quoted: str) -> None:
    from pathways_lite.spec import load_spec_text

    text = ISSUE_SPEC.replace("pipeline: {stages: 2, microbatches: 8, schedule: 1f1b}", change)
    with pytest.raises(spec_lib.SpecError) as err:
        load_spec_text(text, validate=True)
    assert err.value.field == field, err.value
    assert quoted in str(err.value), err.value


@pytest.mark.parametrize(
    "data, field, value, quoted",
    [
        (
            "data: {source: stdlib-tasks, task: name_from_docstring}",
            "data.task",
            "name_from_docstring",
            "data.task='name_from_docstring'",
        ),
        (
            "data: {mixture: [{source: stdlib}, {source: files, paths: [/x]}]}",
            "data.mixture",
            ["stdlib", "files"],
            "['stdlib', 'files']",
        ),
        (
            "data: {source: stdlib, objective: span_corruption}",
            "data.objective",
            "span_corruption",
            "data.objective='span_corruption'",
        ),
        (
            "data: {source: text2text, paths: [/x.jsonl]}",
            "data.source",
            "text2text",
            "data.source='text2text'",
        ),
    ],
)
def test_a_pipeline_refuses_data_that_is_not_plain_language_modelling_naming_field_and_value(
    data: str, field: str, value: object, quoted: str
) -> None:
    from pathways_lite.spec import load_spec_text

    with pytest.raises(spec_lib.SpecError) as err:
        load_spec_text(ISSUE_SPEC.replace("data: {source: stdlib}", data), validate=True)
    assert (err.value.field, err.value.value) == (field, value), err.value
    assert quoted in str(err.value) and "pipeline" in str(err.value)


def test_a_pipeline_in_a_job_that_is_not_training_names_its_stages() -> None:
    from pathways_lite.spec import load_spec_text

    text = ISSUE_SPEC.replace(
        "pipeline: {stages: 2, microbatches: 8, schedule: 1f1b}",
        "pipeline: {stages: 2}\nkind: eval",
    )
    with pytest.raises(spec_lib.SpecError) as err:
        load_spec_text(text, validate=True)
    assert (err.value.field, err.value.value) == ("pipeline", 2), err.value
    assert "pipeline.stages=2" in str(err.value) and "kind='eval'" in str(err.value)


def test_global_batch_message_names_replicas_microbatches_and_mesh_data() -> None:
    from pathways_lite.spec import load_spec_text

    text = ISSUE_SPEC.replace("global_batch: 16", "global_batch: 12")
    with pytest.raises(spec_lib.SpecError) as err:
        load_spec_text(text, validate=True)
    message = str(err.value)
    assert "replicas=2" in message and "microbatches=8" in message and "mesh.data=1" in message


def test_a_model_too_big_for_one_island_is_refused_alone_and_admitted_as_two_stages() -> None:
    from pathways_lite.controller.resolved import ResolvedJob
    from pathways_lite.controller.scheduler import Scheduler
    from pathways_lite.spec import load_spec_text

    big = ISSUE_SPEC.replace("{preset: palm-tiny}", "{preset: palm-small}")
    big = big.replace("islands: 4", "islands: 2").replace("seq_len: 64", "seq_len: 128")
    plain = load_spec_text(big.replace(ISSUE_SPEC.splitlines()[6], ""), validate=True)
    # Activations dominate here: the stage keeps its inputs only (`recompute`).
    piped = load_spec_text(
        big.replace("microbatches: 8", "microbatches: 4, recompute: true"), validate=True
    )
    stashing = load_spec_text(big.replace("microbatches: 8", "microbatches: 4"), validate=True)
    whole = ResolvedJob.resolve(plain).bytes_per_device
    stage = ResolvedJob.resolve(piped).bytes_per_device
    assert stage < 0.8 * whole, (stage, whole)
    # A second microbatch of three blocks' residuals (1F1B, stage 0; the first is the
    # forward's own activations) against two inputs.
    assert ResolvedJob.resolve(stashing).bytes_per_device > stage + 25 * 2**20
    budget = (stage + whole) // 2
    scheduler = Scheduler(["i0", "i1"], {"i0": budget, "i1": budget})
    assert scheduler.never_fits(plain.islands, whole) is not None
    assert scheduler.never_fits(piped.islands, stage) is None


def test_sampling_a_pipeline_job_that_can_never_fit_one_island_says_so(tmp_path) -> None:
    """A pipeline job admitted only as stages is sampled as its whole model (with its
    training state) on one island: where no island can ever hold that, the refusal says so
    (FAILED_PRECONDITION), not "none has room now; try again later"."""
    from pathways_lite.controller.resolved import ResolvedJob
    from pathways_lite.controller.sampling import Sampler
    from pathways_lite.controller.scheduler import Scheduler
    from pathways_lite.controller.states import IllegalTransitionError, JobState
    from pathways_lite.controller.store import JobStore
    from pathways_lite.spec import load_spec_text

    big = ISSUE_SPEC.replace("{preset: palm-tiny}", "{preset: palm-small}")
    big = big.replace("islands: 4", "islands: 2").replace("seq_len: 64", "seq_len: 128")
    piped = load_spec_text(
        big.replace("microbatches: 8", "microbatches: 4, recompute: true"), validate=True
    )
    budget = int(1.2 * ResolvedJob.resolve(piped).bytes_per_device)  # the stages fit
    scheduler = Scheduler(["i0", "i1"], {"i0": budget, "i1": budget})
    with JobStore(tmp_path / "jobs.db") as store:
        job_id = store.create_job(piped).id
        store.transition(job_id, JobState.RUNNING, reason="scheduled", message="")
        store.register_checkpoint(job_id, 0, 4, str(tmp_path / "g0-step4"))
        store.transition(job_id, JobState.SUCCEEDED, reason="done", message="")
        sampler = Sampler(
            store,
            scheduler,
            None,
            {},
            {},
            lambda record: ResolvedJob.resolve(record.spec),
            None,
            lambda: None,
        )
        request = controller_pb2.SampleJobRequest(job_id=job_id, prompt="x", max_new_tokens=1)
        with pytest.raises(IllegalTransitionError, match="can never run"):
            asyncio.run(sampler.sample(request))


def test_the_trace_command_writes_a_chrome_trace_of_a_job(local_cluster, tmp_path, capsys):
    """`pathways-lite trace` on the session's LocalCluster (a data-parallel job here)."""
    import json

    from pathways_lite import cli

    spec = tmp_path / "tr.yaml"
    spec.write_text(
        "name: traced\nmodel: {preset: palm-tiny}\nislands: 1\ndevices_per_island: 2\n"
        "mesh: {data: 1, model: 2}\ntrain: {steps: 3, global_batch: 4, seq_len: 64, seed: 1}\n"
        "data: {source: stdlib, vocab_size: 1024, max_bytes: 1000000}\n"
    )
    state = ["--state-dir", str(local_cluster.state_dir)]
    assert cli.main(["submit", str(spec), "--json", *state]) == 0
    job_id = json.loads(capsys.readouterr().out)["id"]
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline:
        cli.main(["status", job_id, "--json", *state])
        record = json.loads(capsys.readouterr().out)
        if record["state"] not in ("queued", "running"):
            break
        time.sleep(0.3)
    assert record["state"] == "succeeded", record
    out = tmp_path / "trace.json"
    assert cli.main(["trace", job_id, "--steps", "1:3", "-o", str(out), *state]) == 0
    trace = json.loads(out.read_text())
    steps = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["cat"] == "step"]
    assert sorted(e["args"]["step"] for e in steps) == [1, 2]
    assert all(e["args"]["job"] == job_id and e["dur"] > 0 for e in steps)
    names = [e for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"]
    assert names and all("host 0" in e["args"]["name"] for e in names)
    assert cli.main(["trace", job_id, "--steps", "3:1", "-o", str(out), *state]) != 0


def test_the_status_layout_names_each_stages_blocks_and_islands() -> None:
    from pathways_lite.controller.pipeline import stage_lines

    spec = pipe_spec(4, 1, (1, 1), batch=16, stages=2, mb=4, sched="1f1b")
    lines = stage_lines(spec, ["a", "b", "c", "d"])
    assert lines[0] == "stage 0: blocks 0..0 + embedding; islands a, b"
    assert lines[1].startswith("stage 1: blocks 1..1 + final norm") and lines[1].endswith("c, d")


def test_the_status_layout_shows_the_blocks_the_hosts_load_with_the_datas_vocabulary() -> None:
    """The embedding's cost moves the split: palm-tiny's 4 blocks on 2 stages are 2 + 2 with
    the preset's placeholder vocabulary (512) but 3 + 1 with the data's 4096. `status` shows
    what the hosts' LoadJobRequests carry (the resolved model), given or resolved alone."""
    from pathways_lite.controller.pipeline import stage_lines
    from pathways_lite.controller.resolved import DatasetRef, ResolvedJob, load_request

    spec = pipe_spec(4, 1, (1, 1), batch=16, stages=2, mb=4, sched="1f1b")
    spec.model.overrides.update({"n_layers": 4})
    spec.data.vocab_size = 4096
    job = dataclasses.replace(ResolvedJob.resolve(spec), dataset=DatasetRef("/d", "h", "t", 1))
    peers = tuple(f"h{i}:1" for i in range(4))
    loaded = {
        tuple(
            load_request(
                job, HostLoad("p", island_index=i, num_islands=4, peers=peers)
            ).pipeline.block_bounds
        )
        for i in range(4)
    }
    assert loaded == {(0, 3, 3, 4)}
    lines = stage_lines(spec, [])
    assert lines[0].startswith("stage 0: blocks 0..2 + embedding"), lines
    assert lines[1].startswith("stage 1: blocks 3..3 + final norm"), lines
    assert stage_lines(spec, [], job.configs.model) == lines


def test_a_checkpoint_counts_once_every_stage_committed_its_part() -> None:
    """Replica 0 of every stage writes its stage's checkpoint: the controller registers a
    step only when host 0 of each of those islands reports it committed."""
    from pathways_lite.controller.dispatch import HostStep, _committed
    from pathways_lite.controller.resolved import checkpoint_islands

    spec = pipe_spec(4, 1, (1, 1), batch=16, stages=2, mb=4, sched="1f1b")
    assert checkpoint_islands(spec) == (0, 2)  # stage-major: stage 0 = islands 0, 1
    spec.ClearField("pipeline")
    assert checkpoint_islands(spec) == (0,)
    ids = ["i0", "i1", "i2", "i3"]

    def hosts(*committed: list[int]) -> list:
        return [
            HostStep(i, 0, worker_pb2.RunStepReply(checkpoints_committed=c))
            for i, c in zip(ids, committed, strict=True)
        ]

    assert _committed(hosts([4, 9], [], [4], []), ids, (0, 2)) == (4,)
    assert _committed(hosts([4, 9], [], [4, 9], []), ids, (0, 2)) == (4, 9)
    assert _committed(hosts([4, 9], [], [4, 9], []), ids, (0,)) == (4, 9)
    assert _committed(hosts([4], [], [], []), ids, (0, 2)) == ()


def test_a_job_started_from_a_pipeline_job_reads_the_whole_model_from_its_stage_parts(
    tmp_path,
) -> None:
    """init_from a pipeline job (or one of its checkpoints) is accepted at submit, and the
    hosts' load names the stage split to read the whole model from (init_stage_bounds)."""
    from pathways_lite.controller.lineage import resolve_references, with_init
    from pathways_lite.controller.resolved import DatasetRef, ResolvedJob, load_request
    from pathways_lite.controller.store import JobStore
    from pathways_lite.spec import load_spec_text

    source = load_spec_text(ISSUE_SPEC, validate=True)
    tune = load_spec_text(
        ISSUE_SPEC.replace("pipeline: {stages: 2, microbatches: 8, schedule: 1f1b}\n", "")
        + "init_from: {job: pipe-src}\n",
        validate=True,
    )
    folder = tmp_path / "pipe-src"
    folder.mkdir()
    (folder / "tokenizer.model").write_text("")  # with_init needs it beside the checkpoint
    with JobStore(tmp_path / "jobs.db") as store:
        job_id = store.create_job(source, job_id="pipe-src").id
        store.register_checkpoint(job_id, 0, 4, str(folder / "g0-step4"))
        resolved = resolve_references(tune, store)
        by_path = controller_pb2.JobSpec()
        by_path.CopyFrom(tune)
        by_path.init_from.checkpoint = str(folder / "g0-step4")
        resolve_references(by_path, store)  # accepted too
        record = store.create_job(resolved, job_id="tune")
        job = with_init(store, record, ResolvedJob.resolve(resolved))
    assert job.init.stages == 2 and job.init.path == str(folder / "g0-step4")
    job = dataclasses.replace(job, dataset=DatasetRef("/d", "h", "t", 1))
    request = load_request(job, HostLoad("tune"))
    bounds = stage_split(job.configs.model, 2)
    assert list(request.init_stage_bounds) == [b for pair in bounds for b in pair]
    assert request.init_from == str(folder / "g0-step4") and not request.restore_stage_bounds


def test_each_stage_receive_has_its_own_deadline_from_when_it_starts_waiting() -> None:
    """A step's compute longer than the link timeout uses up none of a receive's wait; a
    receive that gets nothing fails after the timeout, naming stage, host and microbatch."""
    import concurrent.futures
    import threading
    import types

    from pathways_lite.workers.exchange_service import ExchangeServicer
    from pathways_lite.workers.stage_link import PHASE_ACT, StageLink, StageTimeoutError

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    servicer = ExchangeServicer(lambda job: types.SimpleNamespace(generation=0, num_islands=1))

    async def serve() -> tuple[grpc.aio.Server, str]:
        server = grpc.aio.server()
        servicer.add_to_server(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, f"127.0.0.1:{port}"

    server, address = asyncio.run_coroutine_threadsafe(serve(), loop).result(10)
    try:
        links = [
            StageLink(
                loop,
                servicer.mailbox,
                servicer.peers,
                job_id="j",
                generation=0,
                replica=0,
                stage=s,
                addresses=[address, address],
                timeout_s=1.0,
            )
            for s in (0, 1)
        ]
        for link in links:
            link.begin(0)
        time.sleep(1.2)  # stage 1 computes longer than the timeout before it waits
        values = np.arange(6, dtype=np.float32)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            got = pool.submit(links[1].receive, 0, PHASE_ACT, 0, "activations of microbatch 0")
            time.sleep(0.4)
            links[0].send(1, PHASE_ACT, 0, values, "activations of microbatch 0")
            assert links[0].finish() == values.nbytes
            np.testing.assert_array_equal(got.result(10), values)
        started = time.monotonic()
        with pytest.raises(StageTimeoutError) as err:
            links[1].receive(0, PHASE_ACT, 1, "activations of microbatch 1")
        assert 0.9 <= time.monotonic() - started < 5
        message = str(err.value)
        assert "stage 1" in message and "from stage 0" in message and address in message
        assert "microbatch 1" in message
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(10)
        asyncio.run_coroutine_threadsafe(servicer.peers.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


# ---- a pipeline job through the real controller, its hosts on the session's Ray nodes ---------

RAY_PIPE = """
name: {name}
model: {{preset: palm-tiny}}
islands: 2
devices_per_island: 1
mesh: {{data: 1, model: 1}}
priority: 0
pipeline: {{stages: 2, microbatches: 2, schedule: 1f1b}}
train: {{steps: {steps}, global_batch: 8, seq_len: 32, seed: 2, checkpoint_every: 4}}
data: {{source: stdlib, vocab_size: 1024, max_bytes: 1000000}}
"""
# Runs until cancelled once it has at least RAY_PIPE_MIN_STEPS losses; the reference runs
# RAY_PIPE_REF_STEPS meanwhile (the job cannot pass it between a poll and the cancel).
RAY_PIPE_STEPS, RAY_PIPE_MIN_STEPS, RAY_PIPE_REF_STEPS = 5000, 9, 40


def ray_spec(name: str, steps: int = RAY_PIPE_STEPS, *, whole: bool = False, **changes: str):
    """The pipeline job's spec; `whole`: the same model as a one-island job; `changes`
    replace whole lines by their key (`train`, `priority`...) or add them."""
    from pathways_lite.spec import load_spec_text

    lines = RAY_PIPE.format(name=name, steps=steps).strip().splitlines()
    if whole:
        lines = [line for line in lines if not line.startswith("pipeline:")]
        lines = ["islands: 1" if line.startswith("islands:") else line for line in lines]
    for key, value in changes.items():
        lines = [line for line in lines if not line.startswith(f"{key}:")]
        lines.append(f"{key}: {value}")
    return load_spec_text("\n".join(lines) + "\n", validate=True)


@pytest.fixture(scope="module")
def ray_pipe_cluster(ray_cluster, stdlib_dataset):
    """The controller joined to the session's Ray cluster with two one-device islands on its
    two worker nodes (east on 127.0.0.3, west on 127.0.0.4: the stages on different nodes).
    A device's budget holds the whole model alone (the high-priority job, a sampling load),
    or a stage of the pipeline, but not both at once (the high-priority job preempts)."""
    import shutil
    import tempfile

    from pathways_lite.controller.resolved import ResolvedJob
    from pathways_lite.local import LocalCluster
    from pathways_lite.workers.ray_cluster import alive

    whole = ResolvedJob.resolve(ray_spec("high", whole=True)).bytes_per_device
    stage = ResolvedJob.resolve(ray_spec("p")).bytes_per_device
    assert stage < whole
    budget = whole + 256 * 1024
    state_dir = tempfile.mkdtemp(prefix="plpipe-", dir="/tmp")
    cluster = LocalCluster(
        state_dir=state_dir,
        ray_address=ray_cluster.address,
        ray_token_file=ray_cluster.token_path,
        island_specs=[f"east:1:1:{budget}", f"west:1:1:{budget}"],
    )
    started: list[int] = []
    try:
        cluster.start()
        started = cluster.pids()
        yield cluster
    finally:
        started = sorted(set(started) | set(cluster.pids()))
        cluster.down()
        shutil.rmtree(state_dir, ignore_errors=True)
    assert not alive(started), alive(started)


def assembled_palm(checkpoint: str, model_cfg: PalmConfig, stages: int):
    """The reference `Palm` holding a pipeline checkpoint's parameters, read independently of
    the hosts' reader: each stage part restored into that stage's `StageModel` view of one
    `Palm` (the views share the whole model's modules). Returns (model, step)."""
    from pathlib import Path

    import orbax.checkpoint as ocp
    from flax import nnx

    from pathways_lite.model.palm import Palm
    from pathways_lite.model.pipeline import StageModel

    full = Palm(model_cfg, rngs=nnx.Rngs(0))
    bounds = stage_split(model_cfg, stages)
    path = Path(checkpoint)
    steps = set()
    for s, (lo, hi) in enumerate(bounds):
        view = StageModel(full, lo, hi, first=s == 0, last=s == stages - 1)
        leaves, treedef = jax.tree_util.tree_flatten(nnx.state(view, nnx.Param))
        with ocp.PyTreeCheckpointer() as checkpointer:
            stored = checkpointer.restore(str(path.parent / f"stage{s}" / path.name))
        assert len(stored["params"]) == len(leaves)
        loaded = [np.asarray(stored["params"][f"{i:05d}"]) for i in range(len(leaves))]
        nnx.update(view, jax.tree_util.tree_unflatten(treedef, loaded))
        steps.add(int(np.asarray(stored["step"])))
    assert len(steps) == 1, steps
    return full, steps.pop()


def held(client, credential) -> list:
    """What still holds the islands: their jobs, every host's loaded jobs and live bytes."""
    from pathways_lite.workers.auth import host_channel

    out = []
    for island in client.islands():
        out += list(island.job_ids)
        for host in island.hosts:
            with host_channel(host.address, credential) as channel:
                log = worker_pb2_grpc.WorkerServiceStub(channel).ExecutionLog(
                    worker_pb2.ExecutionLogRequest(), timeout=60
                )
            out += [j.job_id for j in log.jobs] + [log.live_bytes_total or ""]
    return [x for x in out if x]


def test_a_pipeline_job_on_ray_is_preempted_resumed_cancelled_and_sampled_whole(
    ray_pipe_cluster, capsys
) -> None:
    """Through the real controller, its two stages' hosts on two Ray nodes: a pipeline job
    preempted by a higher-priority job resumes and matches the reference trainer's losses;
    `why` and the job's logs speak of it; cancelled, it ends and frees its islands; `sample`
    (the CLI) reads its stage checkpoint parts as one model: greedy text equals the
    reference model's with the same parameters."""
    import json

    from flax import nnx

    from pathways_lite import cli
    from pathways_lite.client import ControllerClient, state_name
    from pathways_lite.controller.auth import read_cluster_credential
    from pathways_lite.model.sampling import generate
    from pathways_lite.workers.checkpoint import CheckpointError
    from pathways_lite.workers.pipeline import read_stage_parts

    state = ["--state-dir", str(ray_pipe_cluster.state_dir)]
    spec = ray_spec("pipe-ray")
    configs = spec_lib.to_configs(spec)
    dataset = prepare_dataset(configs.data, seq_len=32)
    prompt = "def "
    train = dataclasses.replace(configs.train, steps=RAY_PIPE_REF_STEPS)
    trainer = ReferenceTrainer(configs.model, configs.optim, train)
    pool = concurrent.futures.ThreadPoolExecutor(1)  # the reference while the job runs
    reference_of = pool.submit(trainer.losses, lambda s: dataset.global_batch(s, 8, 2)[0])
    pool.shutdown(wait=False)
    with ControllerClient(ray_pipe_cluster.state_dir) as client:
        islands = {i.id: {h.node for h in i.hosts} for i in client.islands()}
        assert islands == {"east": {"127.0.0.3"}, "west": {"127.0.0.4"}}, islands
        job = client.submit(spec)
        # Loading: no checkpoint yet, and a pipeline job is sampled from its checkpoints.
        assert cli.main(["sample", job.id, "--prompt", prompt, *state]) != 0
        assert "committed none yet" in capsys.readouterr().err
        while not client.get(job.id).losses:
            assert state_name(client.get(job.id).state) in ("queued", "running")
            time.sleep(0.05)
        high = client.submit(ray_spec("high", 2, whole=True, priority="5"))
        deadline = time.monotonic() + 120
        while (now := state_name(client.get(job.id).state)) != "suspended":
            assert now == "running" and time.monotonic() < deadline, client.get(job.id)
            time.sleep(0.02)
        assert cli.main(["why", job.id, "--json", *state]) == 0
        why = json.loads(capsys.readouterr().out)
        assert why["state"] == "suspended" and why["reason"], why
        assert state_name(client.wait(high.id, timeout_s=120).state) == "succeeded"
        while len(client.get(job.id).losses) < RAY_PIPE_MIN_STEPS:  # resumed
            assert state_name(client.get(job.id).state) in ("suspended", "running")
            time.sleep(0.05)
        client.cancel(job.id, reason="test")
        ended = client.wait(job.id, timeout_s=60)
        assert state_name(ended.state) == "cancelled", ended
        credential = read_cluster_credential(client.state_dir)
        deadline = time.monotonic() + 30  # its hosts unload it after its last checkpoint
        while held(client, credential):
            assert time.monotonic() < deadline, held(client, credential)
            time.sleep(0.1)
        logged = [r.message for r in client.logs(job.id)]
        assert any("pipeline layout" in m and "stage 1: blocks 1..1" in m for m in logged)

        losses = list(ended.losses)
        assert RAY_PIPE_MIN_STEPS <= len(losses) <= RAY_PIPE_REF_STEPS
        reference = reference_of.result(timeout=120)[: len(losses)]
        assert max_rel_diff(losses, reference) <= 1e-5, (losses, reference)

        # Sampling (the CLI's path): the whole model read from the stage parts on one island.
        argv = ["sample", job.id, "--prompt", prompt, "--max-new-tokens", "8", "--json"]
        assert cli.main(argv + state) == 0
        sampled = json.loads(capsys.readouterr().out)
    model, step = assembled_palm(sampled["checkpoint"], configs.model, 2)
    assert step == sampled["steps_applied"] and step % 4 == 0 and step >= 8, sampled
    tokens = generate(model, dataset.tokenizer.encode(prompt), 8)
    assert sampled["text"] == dataset.tokenizer.decode([int(t) for t in tokens])
    # The hosts' reader alone (init_from's path: parameters only) gives the same arrays.
    params = nnx.state(model, nnx.Param)
    like = jax.eval_shape(lambda: params)
    opt_like = jax.eval_shape(trainer.fns.tx.init, params)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shard = lambda tree: jax.tree.map(lambda _: device, tree)  # noqa: E731
    bounds = stage_split(configs.model, 2)
    read, _, read_step = read_stage_parts(
        sampled["checkpoint"],
        bounds,
        configs.model,
        configs.optim,
        like,
        opt_like,
        shard(like),
        shard(opt_like),
        params_only=True,
    )
    assert read_step == step
    assert all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(read), jax.tree.leaves(params), strict=True)
    )
    with pytest.raises(CheckpointError, match="stage"):  # another split is refused
        read_stage_parts(
            sampled["checkpoint"],
            ((0, 2), (2, 2)),
            configs.model,
            configs.optim,
            like,
            opt_like,
            shard(like),
            shard(opt_like),
            params_only=True,
        )


def test_the_job_page_draws_a_running_pipelines_schedule_in_chromium(ray_pipe_cluster) -> None:
    """The dashboard's page of a running pipeline job, in headless Chromium (Playwright, as
    tests/test_dashboard_browser.py): the schedule chart (plotly) has a row per stage, stage
    0's forward bars and both stages' backward bars (the last stage's forward is fused into its
    backward), M per stage and step shown, and the hint gives the measured bubble
    beside the theoretical (S-1)/(M+S-1) = 1/3."""
    import json
    import subprocess
    import sys

    from pathways_lite.client import ControllerClient, state_name

    chromium = "/usr/bin/chromium"  # tests/test_dashboard_browser.py's, with its flags
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
    assert os.path.exists(chromium), f"{chromium} is missing (apt-get install chromium)."
    from playwright.sync_api import sync_playwright

    state = str(ray_pipe_cluster.state_dir)
    dashboard = subprocess.run(
        [sys.executable, "-m", "pathways_lite.cli", "dashboard", "--json", "--state-dir", state],
        capture_output=True,
        text=True,
        timeout=120,
    )
    url = json.loads(dashboard.stdout)["url_with_token"]
    with ControllerClient(state) as client:
        job = client.submit(ray_spec("pipe-gantt"))
        try:
            while len(client.get(job.id).losses) < 2:
                assert state_name(client.get(job.id).state) in ("queued", "running")
                time.sleep(0.05)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium, args=args)
                try:
                    page = browser.new_page(viewport={"width": 1440, "height": 1000})
                    errors: list[str] = []
                    page.on("pageerror", lambda e: errors.append(str(e)))
                    page.goto(url)  # trades the token for a cookie
                    page.goto(url.split("?")[0] + f"jobs/{job.id}")
                    page.wait_for_selector("#pipe-card:not([hidden])", timeout=60_000)
                    traces = page.evaluate(
                        "document.getElementById('pipe-chart').data.map("
                        "t => [t.name, Array.from(new Set(t.y)).sort(), t.x.length])"
                    )
                    hint = page.inner_text("#pipe-hint")
                    artifacts = Path(__file__).resolve().parent.parent / "test-artifacts"
                    artifacts.mkdir(exist_ok=True)
                    page.screenshot(path=str(artifacts / "dashboard-pipeline.png"), full_page=True)
                finally:
                    browser.close()
        finally:
            client.cancel(job.id, reason="test")
        assert state_name(client.wait(job.id, timeout_s=60).state) == "cancelled"
    # M = 2 bars per stage and step (a stage may not have logged the newest step yet).
    (fwd, fwd_rows, n_fwd), (bwd, bwd_rows, n_bwd) = traces
    assert (fwd, fwd_rows, bwd, bwd_rows) == (
        "forward",
        ["stage 0"],
        "backward",
        ["stage 0", "stage 1"],
    ), traces
    assert n_fwd in (2, 4) and n_bwd in (4, 6, 8), traces
    assert "theory" in hint and "0.33 theory" in hint and "S=2, M=2" in hint, hint
    assert errors == []


def test_a_pipeline_job_on_ray_rolls_back_when_a_stage_host_is_killed(ray_pipe_cluster) -> None:
    """SIGKILL of stage 1's island host (west, on its own Ray node) two steps past a committed
    checkpoint: every stage rolls back to that checkpoint and the job ends with the reference
    trainer's losses, what an uninterrupted run gives (runs last: it kills a host)."""
    import signal

    from pathways_lite.client import ControllerClient, state_name
    from pathways_lite.controller.store import DB_NAME, JobStore

    steps = 60
    train = f"{{steps: {steps}, global_batch: 8, seq_len: 32, seed: 2, checkpoint_every: 4}}"
    spec = ray_spec("pipe-kill", steps, train=train)
    configs = spec_lib.to_configs(spec)
    dataset = prepare_dataset(configs.data, seq_len=32)
    store = JobStore(Path(ray_pipe_cluster.state_dir) / DB_NAME)
    with ControllerClient(ray_pipe_cluster.state_dir) as client:
        job = client.submit(spec)
        deadline = time.monotonic() + 240
        while (checkpoint := store.latest_checkpoint(job.id)) is None or (
            done := store.steps_completed(job.id)
        ) < checkpoint.step + 2:
            assert time.monotonic() < deadline, "no checkpoint and two steps after it"
            time.sleep(0.02)
        assert done < steps, (checkpoint.step, done)  # the kill lands while the job runs
        pid = next(int(i.hosts[0].pid) for i in client.islands() if i.id == "west")
        assert pid > 0, pid  # (0 would signal this whole process group)
        os.kill(pid, signal.SIGKILL)
        assert store.steps_completed(job.id) < steps, "the job ended before the kill landed"
        ended = client.wait(job.id, timeout_s=240)
    assert state_name(ended.state) == "succeeded", ended
    restores = [e for e in store.events(job.id) if e.kind == "restore"]
    assert restores, store.events(job.id)
    restored = int(restores[0].message.split("step ")[1].split()[0])
    assert checkpoint.step <= restored < steps, restores[0].message
    trainer = ReferenceTrainer(configs.model, configs.optim, configs.train)
    reference = trainer.losses(lambda s: dataset.global_batch(s, 8, 2)[0])
    assert len(ended.losses) == steps
    assert max_rel_diff(list(ended.losses), list(reference)) <= 1e-5


def test_a_host_refuses_stage_ranges_that_overlap_or_leave_a_gap():
    """A LoadJob's pipeline.block_bounds must be contiguous non-empty ranges from block 0:
    [0, 3, 1, 4] (stage 1 holding blocks 1-3 again) trained another model, silently."""
    from pathways_lite.v1 import worker_pb2
    from pathways_lite.workers.pipeline import JobSpecError, decode_placement

    def placement(bounds):
        request = worker_pb2.LoadJobRequest()
        request.pipeline.stages, request.pipeline.microbatches = 2, 2
        request.pipeline.schedule = "1f1b"
        request.pipeline.block_bounds.extend(bounds)
        return decode_placement(request)

    assert placement([0, 2, 2, 4]).bounds == ((0, 2), (2, 4))
    for bad in ([0, 3, 1, 4], [0, 1, 2, 4], [0, 2, 2, 2]):
        with pytest.raises(JobSpecError, match=r"pipeline\.block_bounds"):
            placement(bad)
