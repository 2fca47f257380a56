"""Benchmark: palm-small step time through an island host's gRPC service vs in-process JAX.

Ours: a real island host (a detached Ray actor on a local loopback Ray cluster) runs the job;
this process drives it over the worker gRPC service with RunStep calls sent back to back (a
window of calls in flight: the service queues the next step while one runs).
Baseline: the same compiled step (the reference trainer's StepFunctions, grad_fn then
apply_fn) run in this process on the same mesh shape over the same number of devices, reading
the same batches. Short rounds of both alternate (each starts on idle devices), so background
load hits both alike; the headline ratio is the median over rounds of (ours / baseline) of
adjacent rounds. Goal: ours / baseline <= 1.02 at ~100 ms per step.

Usage: python bench/island_overhead.py [--devices 2] [--data 1] [--batch 4] [--seq-len 64]
                                       [--steps 10] [--rounds 9] [--window 2] [--tls on|off]
                                       [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="palm-small")
    parser.add_argument("--devices", type=int, default=2, help="devices of the island")
    parser.add_argument("--data", type=int, default=1, help="mesh data axis (model = rest)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=1024, help="tokenizer (and model) vocab")
    parser.add_argument("--max-bytes", type=int, default=1_000_000, help="stdlib corpus cap")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--window", type=int, default=2, help="RunSteps in flight")
    parser.add_argument(
        "--tls",
        choices=("on", "off"),
        default="off",
        help="TLS between this driver and the island host (a per-run cluster CA)",
    )
    parser.add_argument("--json", action="store_true")
    return parser.parse_args()


def main() -> None:
    args = _parse()
    if args.devices % args.data:
        sys.exit(f"--data={args.data} does not divide --devices={args.devices}.")
    # Both processes (this one and the island host, which inherits it through Ray) share
    # one persistent compilation cache and one data cache.
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".cache" / "jax"))
    os.environ.setdefault("PATHWAYS_LITE_CACHE", str(REPO / ".cache" / "pathways_lite"))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import numpy as np

    from pathways_lite.model.data import DataSpec, prepare_dataset

    dataset = prepare_dataset(
        DataSpec(source="stdlib", vocab_size=args.vocab, max_bytes=args.max_bytes),
        seq_len=args.seq_len,
    )
    mesh_shape = (args.data, args.devices // args.data)
    baseline = InProcess(args, dataset, mesh_shape)
    state_dir = tempfile.mkdtemp(prefix="plbench-", dir="/tmp")
    island = None
    try:
        island = ThroughIsland(args, dataset, mesh_shape, state_dir)
        step = args.warmup
        ours_s, base_s = [], []
        base_losses: list[float] = []
        ours_losses: list[float] = []
        baseline.run(range(args.warmup))
        island.run(range(args.warmup))
        island.host_busy_s = island.wall_s = 0.0
        for _ in range(args.rounds):
            steps = range(step, step + args.steps)
            seconds, losses = baseline.run(steps)
            base_s.append(seconds / args.steps)
            base_losses += losses
            seconds, losses = island.run(steps)
            ours_s.append(seconds / args.steps)
            ours_losses += losses
            step += args.steps
        busy = island.host_busy_s / island.wall_s
        same = float(np.max(np.abs(np.subtract(ours_losses, base_losses)) / np.abs(base_losses)))
    finally:
        if island is not None:
            island.close()
        shutil.rmtree(state_dir, ignore_errors=True)

    ours, base = statistics.median(ours_s), statistics.median(base_s)
    ratio = statistics.median(a / b for a, b in zip(ours_s, base_s, strict=True))
    result = {
        "preset": args.preset,
        "mesh": {"data": mesh_shape[0], "model": mesh_shape[1]},
        "batch": args.batch,
        "seq_len": args.seq_len,
        "vocab": dataset.tokenizer.vocab_size,
        "window": args.window,
        "island_step_ms": 1000 * ours,
        "baseline_step_ms": 1000 * base,
        "baseline": "in-process StepFunctions (grad_fn + apply_fn) on the same mesh shape",
        "ratio": ratio,
        "ratio_of_medians": ours / base,
        "ratio_of_best_rounds": min(ours_s) / min(base_s),
        "rounds_island_ms": [1000 * s for s in ours_s],
        "rounds_baseline_ms": [1000 * s for s in base_s],
        "max_rel_loss_diff": same,
        "island_host_busy_fraction": busy,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"{args.preset} (vocab {result['vocab']}), batch {args.batch} x {args.seq_len}, mesh "
        f"data={mesh_shape[0]} x model={mesh_shape[1]}, {args.rounds} rounds of "
        f"{args.steps} steps"
    )
    print(f"island host over gRPC (window {args.window}): {result['island_step_ms']:.1f} ms/step")
    print(f"baseline ({result['baseline']}): {result['baseline_step_ms']:.1f} ms/step")
    print(
        f"ratio ours / baseline = {ratio:.3f} (median of per-round ratios; goal <= 1.02); "
        f"ratio of medians {ours / base:.3f}, of best rounds {result['ratio_of_best_rounds']:.3f}"
    )
    rounds = zip(result["rounds_island_ms"], result["rounds_baseline_ms"], strict=True)
    print("per round (island / baseline ms): " + ", ".join(f"{a:.1f}/{b:.1f}" for a, b in rounds))
    print(f"island host busy running steps {busy:.1%} of the driven wall time")
    print(f"losses, island vs baseline: max relative difference {same:.2e}")


class InProcess:
    """The baseline: StepFunctions on a mesh of this process's devices, step after step."""

    def __init__(self, args: argparse.Namespace, dataset, mesh_shape: tuple[int, int]) -> None:
        from pathways_lite.model.config import PalmConfig
        from pathways_lite.model.optim import OptimConfig
        from pathways_lite.model.train import StepFunctions, make_mesh

        cfg = PalmConfig.from_preset(args.preset, vocab_size=dataset.tokenizer.vocab_size)
        self.fns = StepFunctions(cfg, OptimConfig(), make_mesh(*mesh_shape))
        self.state = self.fns.init(0)
        self.dataset = dataset
        self.batch = args.batch

    def run(self, steps: range) -> tuple[float, list[float]]:
        import jax

        start = time.perf_counter()
        losses = []
        for step in steps:
            tokens_bt1, _ = self.dataset.global_batch(step, self.batch, 0)
            loss, _, grads = self.fns.grad_fn(self.state, self.fns.place_batch(tokens_bt1))
            self.state = self.fns.apply_fn(self.state, grads)
            losses.append(float(loss))
        seconds = time.perf_counter() - start
        self.state.params = jax.block_until_ready(self.state.params)  # idle before the next round
        return seconds, losses


def bench_spec(args: argparse.Namespace, mesh_shape: tuple[int, int]):
    """The benchmark's job as a JobSpec (one island, no digests: nothing to compare with)."""
    from pathways_lite.v1 import controller_pb2

    spec = controller_pb2.JobSpec(
        name="bench",
        islands=1,
        devices_per_island=args.devices,
        mesh=controller_pb2.JobSpec.Mesh(data=mesh_shape[0], model=mesh_shape[1]),
        train=controller_pb2.JobSpec.Train(
            steps=1_000_000, global_batch=args.batch, seq_len=args.seq_len, seed=0
        ),
        data=controller_pb2.JobSpec.Data(
            source="stdlib", vocab_size=args.vocab, max_bytes=args.max_bytes
        ),
    )
    spec.model.preset = args.preset
    spec.train.digest_every = 0
    return spec


class ThroughIsland:
    """Ours: an island host on a local Ray cluster, driven over gRPC."""

    def __init__(
        self, args: argparse.Namespace, dataset, mesh_shape: tuple[int, int], state_dir: str
    ) -> None:
        import secrets

        from pathways_lite.v1 import worker_pb2, worker_pb2_grpc
        from pathways_lite.workers.auth import Credential, host_channel
        from pathways_lite.workers.island_host import IslandHostGroup, IslandSpec
        from pathways_lite.workers.ray_cluster import LocalRayCluster, connect

        self.worker_pb2 = worker_pb2
        self.window = args.window
        self.cluster = LocalRayCluster(state_dir, head_resources={"island_bench": 1}, num_cpus=2)
        self.group = None
        self.channel = None
        self.seq = 0
        self.host_busy_s = 0.0
        self.wall_s = 0.0
        try:
            self.cluster.start()
            connect(self.cluster.address, token_path=self.cluster.token_path)
            # Every call carries the cluster credential, as the controller's do.
            credential = Credential(secrets.token_urlsafe(32))
            spec = IslandSpec("bench", devices_per_host=args.devices)
            tls = issue = None
            if args.tls == "on":
                from pathways_lite.workers.tls import ClusterCA

                ca = ClusterCA(Path(state_dir) / "tls")
                tls, issue = ca.client("on"), (lambda host: ca.issue(host, "on"))
            self.group = IslandHostGroup(spec, credential, issue_tls=issue)
            (meta,) = self.group.start()
            self.channel = host_channel(meta.address, credential, tls)
            self.stub = worker_pb2_grpc.WorkerServiceStub(self.channel)
            from pathways_lite.controller.program import HostLoad
            from pathways_lite.controller.resolved import ResolvedJob, load_request

            # What the controller sends: the job resolved once, its dataset (the one the
            # baseline reads, from the same cache), one LoadJobRequest built the one way.
            job = ResolvedJob.resolve(bench_spec(args, mesh_shape)).with_dataset("bench")
            assert job.dataset is not None and job.dataset.hash == dataset.hash
            reply = self.stub.LoadJob(load_request(job, HostLoad("bench", epoch=1)), timeout=600)
            print(f"island host {meta.address}: job loaded, compiled in {reply.compile_s:.1f} s")
        except BaseException:
            self.close()
            raise

    def run(self, steps: range) -> tuple[float, list[float]]:
        pb = self.worker_pb2
        start = time.perf_counter()
        pending = []
        replies = []
        for step in steps:
            request = pb.RunStepRequest(job_id="bench", step=step, island_seq=self.seq, epoch=1)
            self.seq += 1
            pending.append(self.stub.RunStep.future(request, timeout=600))
            if len(pending) >= self.window:
                replies.append(pending.pop(0).result())
        replies += [f.result() for f in pending]
        seconds = time.perf_counter() - start
        losses = [r.loss for r in replies]
        # Host-side step time (start to result ready): what the RPC path adds is the rest.
        self.host_busy_s += sum(
            (r.timings.end_unix_ns - r.timings.start_unix_ns) / 1e9 for r in replies
        )
        self.wall_s += seconds
        # Waits for the last update: the host is idle before the next round.
        self.stub.ParamDigest(pb.ParamDigestRequest(job_id="bench"), timeout=600)
        return seconds, losses

    def close(self) -> None:
        import ray

        if self.channel is not None:
            self.channel.close()
        if self.group is not None:
            self.group.shutdown()
        ray.shutdown()
        self.cluster.stop()


if __name__ == "__main__":
    main()
