"""Data parallelism across islands: 2 islands with half the global batch each vs 1 island.

Baseline: ONE island host with the whole global batch. Ours: TWO island hosts, each with half
of the same global batch, exchanging gradients host to host (workers/exchange.py), with the
exchange overlapped with the backward pass (workers/exchange_overlap.py) and without (the
whole gradient after the backward pass, LoadJob exchange_overlap false). Every island host
is its own process with one CPU device, pinned to its own core with `taskset -c` and limited
to one XLA CPU thread (`--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1`),
so each island host has the same CPU threads in every run. The controller side is this
process: the controller's Dispatcher and `palm_program`, over gRPC, as in production.

Printed, all measured in this one run, the three runs interleaved in 3 rounds (medians):
- `ratio`: tokens/s of 2 islands (overlapped) over tokens/s of 1 island, from the hosts'
  own step times after warm-up (PaLM: 1.95x; goal >= 1.97x at batch 64, 1.8x at 16);
  `ratio_without_overlap` the same with the exchange after the backward pass;
- `hidden_fraction` = 1 - (overlapped step - compute-only step) / (exchange time without
  overlap), where the compute-only step is the non-overlapped step less its exchange, all
  from the hosts' timings;
- `exchange_vs_raw`: the exchange path alone (bench/exchange_alone.py: the same buckets, no
  compute, two processes pinned the same way), payload bytes each host sent plus received
  per second, over one raw gRPC client stream of the same total on loopback (1 MiB chunks
  into a server that drops them; goal >= 0.8);
- `copied_per_gradient_byte`: bytes a host copies on the exchange path per gradient byte
  (counted by workers/exchange.py), beside main's count by the same rule.

Run: .venv/bin/python bench/dp_scaling.py [--batch 64 --steps 8 --json]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
HOST_XLA_FLAGS = (
    "--xla_force_host_platform_device_count=1 --xla_cpu_multi_thread_eigen=false "
    "intra_op_parallelism_threads=1"
)
RAW_CHUNK = 1 << 20
# Set by `--gpu`: the island hosts run on the GPU (two processes sharing it).
GPU_ENV = "PATHWAYS_LITE_DP_GPU"


def serve_host(port_file: str, island: str) -> None:
    """Child process: one island host (one CPU device) serving until killed."""
    import jax

    from pathways_lite.workers.host import HostMetadata
    from pathways_lite.workers.service import BackgroundServer, WorkerServicer

    devices = jax.devices()
    meta = HostMetadata.in_process(island, devices, 8 << 30)
    server = BackgroundServer(WorkerServicer(meta, devices), "127.0.0.1", 0)
    port = server.start()
    Path(port_file).write_text(str(port))
    while True:
        time.sleep(3600)


def serve_raw(port_file: str) -> None:
    """Child process: a gRPC server whose one client-streaming method drops the bytes."""
    import grpc

    async def main() -> None:
        async def sink(request_iterator, context):
            n = 0
            async for chunk in request_iterator:
                n += len(chunk)
            return n.to_bytes(8, "little")

        handler = grpc.method_handlers_generic_handler(
            "raw.Sink",
            {
                "Put": grpc.stream_unary_rpc_method_handler(
                    sink, request_deserializer=None, response_serializer=None
                )
            },
        )
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        Path(port_file).write_text(str(port))
        await server.wait_for_termination()

    asyncio.run(main())


def spawn(mode: str, core: int, island: str = "") -> tuple[subprocess.Popen, str]:
    port_file = tempfile.mktemp(prefix="pl-dp-port-")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": HOST_XLA_FLAGS}
    env.setdefault("PATHWAYS_LITE_CACHE", str(REPO / ".cache" / "pathways_lite"))
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".cache" / "jax"))
    cmd = ["taskset", "-c", str(core), sys.executable, __file__, f"--{mode}", port_file]
    if mode == "host" and os.environ.get(GPU_ENV) == "1":
        # `--gpu`: every island host on the one GPU (two processes sharing it), unpinned.
        env.update(JAX_PLATFORMS="cuda", XLA_PYTHON_CLIENT_PREALLOCATE="false")
        env.pop("XLA_FLAGS")
        cmd = cmd[3:]
    if island:
        cmd += ["--island", island]
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.monotonic() + 120
    while not (Path(port_file).exists() and Path(port_file).read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{mode} process on core {core} did not start.")
        time.sleep(0.1)
    port = Path(port_file).read_text()
    os.unlink(port_file)
    return proc, f"127.0.0.1:{port}"


@dataclasses.dataclass
class Run:
    tokens_per_s: float
    step_s: float
    exchange_s: float  # the hosts' exchange time (overlapped: the wait after the backward)


def job_spec(islands: int, steps: int, batch: int, preset: str):
    from pathways_lite.v1 import controller_pb2

    spec = controller_pb2.JobSpec(
        name=f"dp-bench-{islands}",
        islands=islands,
        devices_per_island=1,
        mesh=controller_pb2.JobSpec.Mesh(data=1, model=1),
        train=controller_pb2.JobSpec.Train(steps=steps, global_batch=batch, seq_len=64, seed=0),
        data=controller_pb2.JobSpec.Data(source="stdlib", vocab_size=1024, max_bytes=1_000_000),
    )
    spec.model.preset = preset
    # The digest costs a parameter read-back per step: compare once at the end instead.
    spec.train.digest_every = steps
    return spec


async def run_job(
    addresses: list[str],
    args: argparse.Namespace,
    tag: str,
    *,
    overlap: bool = True,
    bucket_bytes: int = 0,
) -> Run:
    from pathways_lite.controller.dispatch import Dispatcher
    from pathways_lite.controller.islands import Island, connect_host
    from pathways_lite.controller.resolved import palm_program

    n_islands, steps, batch = len(addresses), args.steps, args.batch
    spec = job_spec(n_islands, steps, batch, args.preset)

    @dataclasses.dataclass
    class Record:
        id: str
        spec: object
        generation: int = 0

    islands = [Island(f"i{k}", [await connect_host(a)]) for k, a in enumerate(addresses)]
    try:
        program = palm_program(Record(f"bench-{tag}", spec))
        load = program.load

        def with_exchange(at):
            request = load(at)
            request.exchange_overlap = overlap
            request.exchange_bucket_bytes = bucket_bytes
            return request

        program = dataclasses.replace(program, load=with_exchange)
        dispatcher = Dispatcher(epoch=int(time.time() * 1000) % (1 << 31), window=2)
        await dispatcher.load(program, islands)
        reports = []
        await dispatcher.run(program, islands, on_step=reports.append)
        await dispatcher.unload(program.job_id, islands)
    finally:
        for island in islands:
            await island.close()
    timed = reports[args.warmup :]
    # A step's time on the hosts: the slowest host's own step time (they run in lockstep).
    step_s = statistics.median(max(h.reply.step_s for h in r.hosts) for r in timed)
    exchange_s = statistics.median(max(h.reply.exchange_s for h in r.hosts) for r in timed)
    return Run(tokens_per_s=batch * 64 / step_s, step_s=step_s, exchange_s=exchange_s)


def main_copies_per_gradient_byte(islands: int) -> float:
    """What main (before this change) copied per gradient byte, counted by the same rule as
    workers/exchange.py: the concatenation, `tobytes` and `SerializeToString` of every sent
    value, the receive into the part, the reduction's copy of its first term and its copy
    into the output, the gathered parts into the output, `astype` and the device copy."""
    own = 1 / islands
    sent = (1 - own) + own * (islands - 1)
    received = own * (islands - 1) + (1 - own)
    return 1 + 2 * sent + received + own + own + (1 - own) + 1 + 1


async def raw_stream_bytes_per_s(address: str, total: int, repeats: int = 5) -> float:
    import grpc

    channel = grpc.aio.insecure_channel(
        address, options=[("grpc.max_send_message_length", 64 << 20)]
    )
    put = channel.stream_unary("/raw.Sink/Put", request_serializer=None, response_deserializer=None)
    payload = os.urandom(RAW_CHUNK)
    chunks = [payload] * max(1, total // RAW_CHUNK)
    rates = []
    try:
        for _ in range(repeats + 1):
            started = time.perf_counter()
            await put(iter(chunks))
            rates.append(len(chunks) * RAW_CHUNK / (time.perf_counter() - started))
    finally:
        await channel.close()
    return statistics.median(rates[1:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16, help="global batch (seq_len 64)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--preset", default="palm-small")
    parser.add_argument("--bucket-bytes", type=int, default=0, help="0: the hosts' default")
    parser.add_argument(
        "--bucket-sweep",
        default="",
        help="comma-separated bucket sizes in bytes: one overlapped round each (the default's "
        "measurement) instead of the comparison",
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--gpu", action="store_true", help="island hosts on the GPU (two processes share it)"
    )
    parser.add_argument("--host", help=argparse.SUPPRESS)
    parser.add_argument("--raw", help=argparse.SUPPRESS)
    parser.add_argument("--island", default="bench", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.host:
        serve_host(args.host, args.island)
        return 0
    if args.raw:
        serve_raw(args.raw)
        return 0
    logging.basicConfig(level=logging.WARNING)
    if args.gpu:
        os.environ[GPU_ENV] = "1"
    cores = os.cpu_count() or 1
    if cores < 2:
        print("dp_scaling needs 2 CPU cores (one per island host).")
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import exchange_alone

    from pathways_lite.controller import spec as spec_lib
    from pathways_lite.workers.exchange import DEFAULT_BUCKET_BYTES
    from pathways_lite.workers.exchange_overlap import param_bucket_sizes

    bucket_bytes = args.bucket_bytes or DEFAULT_BUCKET_BYTES
    model_cfg = spec_lib.to_configs(job_spec(2, args.steps, args.batch, args.preset)).model
    buckets = param_bucket_sizes(model_cfg, bucket_bytes)
    procs = []
    one, ov, plain, sweep = [], [], [], {}
    load_before = os.getloadavg()[0]
    try:
        p0, a0 = spawn("host", 0, "i0")
        p1, a1 = spawn("host", 1, "i1")
        procs += [p0, p1]
        if args.bucket_sweep:
            for size in (int(x) for x in args.bucket_sweep.split(",")):
                run = asyncio.run(run_job([a0, a1], args, f"b{size}", bucket_bytes=size))
                sweep[size] = run.step_s
        else:
            for r in range(args.rounds):
                one.append(asyncio.run(run_job([a0], args, f"one{r}")))
                ov.append(asyncio.run(run_job([a0, a1], args, f"ov{r}", bucket_bytes=bucket_bytes)))
                plain.append(asyncio.run(run_job([a0, a1], args, f"plain{r}", overlap=False)))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    if sweep:
        for size, step_s in sweep.items():
            print(f"bucket {size / 2**20:7.2f} MiB: overlapped 2-island step {step_s * 1e3:.1f} ms")
        return 0
    alone = exchange_alone.run(buckets)
    moved = alone[0]["sent"] + alone[0]["received"]
    exchange_alone_s = max(h["exchange_s"] for h in alone)
    raw_proc, raw_address = spawn("raw", 1)
    try:
        raw = asyncio.run(raw_stream_bytes_per_s(raw_address, moved))
    finally:
        raw_proc.kill()
        raw_proc.wait()
    med = statistics.median
    result = {
        "batch": args.batch,
        "preset": args.preset,
        "ratio": med(o.tokens_per_s / b.tokens_per_s for o, b in zip(ov, one, strict=True)),
        "ratio_without_overlap": med(
            p.tokens_per_s / b.tokens_per_s for p, b in zip(plain, one, strict=True)
        ),
        "hidden_fraction": med(
            1 - (o.step_s - (p.step_s - p.exchange_s)) / p.exchange_s
            for o, p in zip(ov, plain, strict=True)
        ),
        "exchange_vs_raw": (moved / exchange_alone_s) / raw,
        "copied_per_gradient_byte": alone[0]["copied_bytes"] / alone[0]["gradient_bytes"],
        "main_copied_per_gradient_byte": main_copies_per_gradient_byte(2),
        "step_ms": {
            "one_island": med(r.step_s for r in one) * 1e3,
            "two_islands_overlapped": med(r.step_s for r in ov) * 1e3,
            "two_islands_after_backward": med(r.step_s for r in plain) * 1e3,
            "exchange_after_backward": med(r.exchange_s for r in plain) * 1e3,
            "exposed_exchange_overlapped": med(r.exchange_s for r in ov) * 1e3,
            "exchange_alone": exchange_alone_s * 1e3,
        },
        "buckets": len(buckets),
        "bucket_bytes": bucket_bytes,
        "gradient_bytes": alone[0]["gradient_bytes"],
        "load_average": [load_before, os.getloadavg()[0]],
    }
    if args.json:
        print(json.dumps(result))
        return 0
    st = result["step_ms"]
    print(
        f"{args.preset} (vocab 1024), global batch {args.batch} x seq 64, {args.steps} steps "
        f"({args.warmup} warm-up), {args.rounds} interleaved rounds; each island host: 1 CPU "
        f"device, 1 XLA thread, own core; load average {load_before:.1f}"
    )
    print(f"1 island  (all of the batch):           step {st['one_island']:8.1f} ms")
    print(f"2 islands (half each), overlapped:      step {st['two_islands_overlapped']:8.1f} ms")
    print(
        f"2 islands (half each), after backward:  step {st['two_islands_after_backward']:8.1f} ms"
    )
    print(
        f"throughput ratio 2 islands / 1 island: {result['ratio']:.2f}x overlapped, "
        f"{result['ratio_without_overlap']:.2f}x without (PaLM 1.95x; goal >= 1.97x at 64)"
    )
    print(
        f"exchange hidden under the backward pass: {result['hidden_fraction']:.0%} "
        f"(exchange {st['exchange_after_backward']:.1f} ms after the backward, "
        f"{st['exposed_exchange_overlapped']:.1f} ms exposed when overlapped; "
        f"{len(buckets)} buckets of {bucket_bytes / 2**20:.0f} MiB)"
    )
    print(
        f"exchange alone {moved / exchange_alone_s / 1e6:,.0f} MB/s (sent + received per host, "
        f"{moved / 1e6:.1f} MB a step) vs raw gRPC stream {raw / 1e6:,.0f} MB/s: ratio "
        f"{result['exchange_vs_raw']:.2f} (goal >= 0.8)"
    )
    print(
        f"bytes copied per gradient byte on the exchange path: "
        f"{result['copied_per_gradient_byte']:.1f} (main: "
        f"{result['main_copied_per_gradient_byte']:.1f}, same counting rule)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
