"""GPU check: palm-small on one GPU island, tokens/s and MFU against this GPU's measured peak.

One GPU island is the GPUs of one node (what workers/discovery.py makes of a GPU node). This
runs the step an island host compiles (the reference trainer's StepFunctions on a (`data`,
`model`) mesh over the devices JAX sees) with the GPU dtype defaults: bfloat16 compute,
float32 parameters. Baseline: the GPU's bfloat16 matmul peak measured in the same run (a
large square matmul, best of several). MFU = tokens/s x FLOPs per token (6N + 12 L H Q T) /
(peak x GPUs). On a machine without a GPU it exits with status 2 and one line saying so.

It runs the job twice: the compiled step in-process, then the island host's own path: the
worker gRPC service (WorkerServicer, real grpc.aio on loopback) loads `palm-small` from its
preset with the GPU dtype defaults ("auto": bfloat16 compute), reads the tokenized stdlib
corpus and runs RunStep calls with a window of 2 in flight, as the controller drives it. Ray
only places a host; the step path is this one. The island's memory budget is the GPU's own
limit, as an island host reads it.

Usage: python bench/gpu_check.py [--steps 20] [--batch 16] [--seq-len 1024] [--json]
                                 [--no-island]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

PALM_540B_MFU = 0.462
# Square bf16 matmul for the peak: large enough to saturate a datacenter GPU's tensor cores.
PEAK_N = 8192


def _gpus():
    """The GPUs JAX sees, or None (no CUDA JAX, no driver, no device)."""
    import jax

    try:
        return jax.devices("gpu")
    except RuntimeError:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="palm-small")
    parser.add_argument("--steps", type=int, default=20, help="timed steps after warm-up")
    parser.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--model", type=int, default=1, help="mesh model axis (data = rest)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--no-island", action="store_true", help="skip the run through the worker service"
    )
    parser.add_argument("--max-bytes", type=int, default=2_000_000, help="corpus cap (island)")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="FIELD=INT",
        help="PalmConfig field of the preset to change (e.g. n_layers=8); repeatable",
    )
    args = parser.parse_args()
    try:
        overrides = {k: int(v) for k, v in (o.split("=", 1) for o in args.override)}
    except ValueError:
        print(f"gpu_check: --override wants FIELD=INT, got {args.override!r}.", file=sys.stderr)
        return 2

    gpus = _gpus()
    if not gpus:
        import jax

        print(
            f"gpu_check: no GPU visible to JAX (platforms: {jax.default_backend()}); it needs "
            "an NVIDIA GPU and JAX for CUDA (pip install 'pathways-lite[gpu]').",
            file=sys.stderr,
        )
        return 2
    if len(gpus) % args.model:
        print(f"gpu_check: --model={args.model} does not divide {len(gpus)} GPUs.", file=sys.stderr)
        return 2

    import numpy as np

    from pathways_lite.model import estimates
    from pathways_lite.model.config import PalmConfig
    from pathways_lite.model.optim import OptimConfig
    from pathways_lite.model.train import StepFunctions, make_mesh

    peak = estimates.measure_matmul_peak_flops(gpus[0], n=PEAK_N)
    data = len(gpus) // args.model
    if args.batch % data:
        print(f"gpu_check: --batch={args.batch} is not divisible by data={data}.", file=sys.stderr)
        return 2
    # The GPU defaults of an island: bfloat16 compute, float32 parameters and optimizer state.
    cfg = PalmConfig.from_preset(args.preset, dtype="bfloat16", param_dtype="float32", **overrides)
    assert PalmConfig.from_preset(args.preset).compute_dtype == cfg.compute_dtype, "auto != bf16"
    mesh = make_mesh(data, args.model, devices=gpus)
    fns = StepFunctions(cfg, OptimConfig(), mesh)
    state = fns.init(0)
    rng = np.random.default_rng(0)
    batch_bt1 = rng.integers(0, cfg.vocab_size, size=(args.batch, args.seq_len + 1), dtype=np.int32)
    tokens_bt1 = fns.place_batch(batch_bt1)
    for _ in range(3):  # compile and warm up
        state, loss = fns.train_step(state, tokens_bt1)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, loss = fns.train_step(state, tokens_bt1)
    loss = float(loss)  # waits for the last step
    seconds = time.perf_counter() - start

    tokens_per_s = args.steps * args.batch * args.seq_len / seconds
    fpt = estimates.flops_per_token(cfg, args.seq_len)
    mfu = estimates.mfu(tokens_per_s, fpt, peak * len(gpus))
    result = {
        "preset": args.preset,
        "params": estimates.param_count(cfg),
        "gpus": len(gpus),
        "device_kind": gpus[0].device_kind,
        "mesh": {"data": data, "model": args.model},
        "dtype": cfg.dtype,
        "param_dtype": cfg.param_dtype,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "step_ms": 1000 * seconds / args.steps,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": fpt,
        "baseline": f"bf16 {PEAK_N}x{PEAK_N} matmul peak (20 chained) of one GPU, this run",
        "peak_flops_per_gpu": peak,
        "mfu": mfu,
        "mfu_vs_palm_540b": mfu / PALM_540B_MFU,
        "final_loss": loss,
    }
    if overrides:
        result["overrides"] = overrides
    if not args.no_island:
        island = through_island_service(args, cfg, gpus, data, overrides)
        island["mfu"] = estimates.mfu(island["tokens_per_s"], fpt, peak * len(gpus))
        island["tokens_per_s_vs_in_process"] = island["tokens_per_s"] / tokens_per_s
        result["island_service"] = island
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"{args.preset}: {result['params']:,} params on {len(gpus)} x {gpus[0].device_kind}, "
        f"mesh data={data} x model={args.model}, batch {args.batch} x {args.seq_len}, "
        f"{cfg.dtype} compute" + (f", overrides {overrides}" if overrides else "")
    )
    print(f"step {result['step_ms']:.1f} ms, {tokens_per_s:,.0f} tokens/s, loss {loss:.4f}")
    print(f"baseline: bf16 matmul peak {peak / 1e12:.1f} TFLOP/s per GPU (measured in this run)")
    print(
        f"MFU = {mfu:.1%}  (ours / matmul peak); vs PaLM 540B's 46.2%: {mfu / PALM_540B_MFU:.2f}x"
    )
    if not args.no_island:
        island = result["island_service"]
        print(
            f"through the island's worker gRPC service ({island['dtype']} compute, budget "
            f"{island['budget_bytes_per_device'] / 2**30:.1f} GiB/GPU): step "
            f"{island['step_ms']:.1f} ms, {island['tokens_per_s']:,.0f} tokens/s, "
            f"MFU {island['mfu']:.1%}, {island['tokens_per_s_vs_in_process']:.3f}x in-process, "
            f"loss {island['final_loss']:.4f}"
        )
    return 0


def through_island_service(args, cfg, gpus, data: int, overrides: dict) -> dict:
    """Train the preset through an island host's worker gRPC service on these GPUs."""

    import grpc

    from pathways_lite.controller.program import HostLoad
    from pathways_lite.controller.resolved import ResolvedJob, load_request
    from pathways_lite.v1 import controller_pb2, worker_pb2, worker_pb2_grpc
    from pathways_lite.workers.host import HostMetadata, default_memory_budget
    from pathways_lite.workers.service import BackgroundServer, WorkerServicer

    # The job as the controller resolves it (dtype "auto": bfloat16 compute on GPUs), its
    # dataset prepared, and the one LoadJobRequest builder.
    spec = controller_pb2.JobSpec(
        name="gpu-check",
        islands=1,
        devices_per_island=len(gpus),
        mesh=controller_pb2.JobSpec.Mesh(data=data, model=args.model),
        train=controller_pb2.JobSpec.Train(
            steps=1_000_000, global_batch=args.batch, seq_len=args.seq_len, seed=0
        ),
        data=controller_pb2.JobSpec.Data(
            source="stdlib", vocab_size=cfg.vocab_size, max_bytes=args.max_bytes
        ),
    )
    spec.model.preset = args.preset
    spec.model.overrides.update(overrides)
    spec.train.digest_every = 0
    job = ResolvedJob.resolve(spec).with_dataset("gpu-check")
    budget = default_memory_budget(gpus)
    meta = HostMetadata.in_process("gpu-check", gpus, budget)
    server = BackgroundServer(WorkerServicer(meta, gpus), "127.0.0.1", 0)
    port = server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        loaded = stub.LoadJob(load_request(job, HostLoad("gpu-check", epoch=1)), timeout=600)
        seq = 0

        def run(steps: range) -> list:
            nonlocal seq
            pending, replies = [], []
            for step in steps:
                req = worker_pb2.RunStepRequest(
                    job_id="gpu-check", step=step, island_seq=seq, epoch=1
                )
                seq += 1
                pending.append(stub.RunStep.future(req, timeout=600))
                if len(pending) >= 2:
                    replies.append(pending.pop(0).result())
            return replies + [f.result() for f in pending]

        run(range(3))  # warm up
        start = time.perf_counter()
        replies = run(range(3, 3 + args.steps))
        seconds = time.perf_counter() - start
        info = stub.Info(worker_pb2.InfoRequest(), timeout=30)
    finally:
        channel.close()
        server.stop()
    return {
        "path": "WorkerServicer over gRPC on loopback (the island host's step path)",
        "dtype": str(cfg.compute_dtype),
        "budget_bytes_per_device": budget,
        "compile_s": loaded.compile_s,
        "estimate_bytes_per_device": loaded.estimate_bytes_per_device,
        "compiled_total_bytes": loaded.memory.total_bytes,
        "devices": [d.kind for d in info.devices],
        "step_ms": 1000 * seconds / args.steps,
        "tokens_per_s": args.steps * args.batch * args.seq_len / seconds,
        "final_loss": replies[-1].loss,
    }


if __name__ == "__main__":
    sys.exit(main())
