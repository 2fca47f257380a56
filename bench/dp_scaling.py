"""Data parallelism across islands: 2 islands with half the global batch each vs 1 island.

Baseline: ONE island host with the whole global batch. Ours: TWO island hosts, each with half
of the same global batch, exchanging gradients host to host (workers/exchange.py). Every
island host is its own process with one CPU device, pinned to its own core with `taskset -c`
and limited to one XLA CPU thread (`--xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=1`), so each island host has the same CPU threads in both runs.
The controller side is this process: the controller's Dispatcher and `palm_program`, over
gRPC, as in production.

Printed, all measured in this one run:
- throughput ratio: tokens/s of 2 islands over tokens/s of 1 island (PaLM: 1.95x; goal
  >= 1.95x), from the hosts' own step times after warm-up;
- the share of the 2-island step time spent in the exchange (reported by the hosts);
- exchange bandwidth: payload bytes each host sent plus received per second of exchange,
  over the bandwidth of one raw gRPC client stream of the same total size on loopback
  (1 MiB chunks into a server that drops them), measured between two processes pinned the
  same way (goal >= 0.8).
No overlap of the exchange with the backward pass is implemented (PaLM did not overlap).

Run: .venv/bin/python bench/dp_scaling.py [--steps 12 --batch 16]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
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
    exchange_share: float
    exchange_bytes_per_s: float
    moved_bytes: int


async def run_job(addresses: list[str], steps: int, batch: int, warmup: int, tag: str) -> Run:
    from pathways_lite.controller.dispatch import Dispatcher
    from pathways_lite.controller.islands import Island, connect_host
    from pathways_lite.controller.resolved import palm_program
    from pathways_lite.v1 import controller_pb2, worker_pb2
    from pathways_lite.workers.exchange import expected_payload_bytes

    n_islands = len(addresses)
    spec = controller_pb2.JobSpec(
        name=f"dp-bench-{tag}",
        islands=n_islands,
        devices_per_island=1,
        mesh=controller_pb2.JobSpec.Mesh(data=1, model=1),
        train=controller_pb2.JobSpec.Train(steps=steps, global_batch=batch, seq_len=64, seed=0),
        data=controller_pb2.JobSpec.Data(source="stdlib", vocab_size=1024, max_bytes=1_000_000),
    )
    spec.model.preset = "palm-tiny"
    # The digest costs a parameter read-back per step: compare once at the end instead.
    spec.train.digest_every = steps

    @dataclasses.dataclass
    class Record:
        id: str
        spec: object
        generation: int = 0

    islands = [Island(f"i{k}", [await connect_host(a)]) for k, a in enumerate(addresses)]
    try:
        program = palm_program(Record(f"bench-{tag}", spec))
        dispatcher = Dispatcher(epoch=int(time.time()), window=2)
        await dispatcher.load(program, islands)
        reports = []
        await dispatcher.run(program, islands, on_step=reports.append)
        digest = (
            await islands[0]
            .hosts[0]
            .stub.ParamDigest(worker_pb2.ParamDigestRequest(job_id=program.job_id))
        )
        await dispatcher.unload(program.job_id, islands)
    finally:
        for island in islands:
            await island.close()
    timed = reports[warmup:]
    # A step's time on the hosts: the slowest host's own step time (they run in lockstep).
    step_s = statistics.median(max(h.reply.step_s for h in r.hosts) for r in timed)
    share = statistics.median(
        max(h.reply.exchange_s for h in r.hosts) / max(h.reply.step_s for h in r.hosts)
        for r in timed
    )
    moved = sum(expected_payload_bytes(digest.num_params, n_islands, 0))
    ex_s = statistics.median(r.hosts[0].reply.exchange_s for r in timed) if n_islands > 1 else 0
    return Run(
        tokens_per_s=batch * 64 / step_s,
        step_s=step_s,
        exchange_share=share if n_islands > 1 else 0.0,
        exchange_bytes_per_s=moved / ex_s if ex_s else 0.0,
        moved_bytes=moved,
    )


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
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16, help="global batch (seq_len 64)")
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
    cores = os.cpu_count() or 1
    if cores < 2:
        print("dp_scaling needs 2 CPU cores (one per island host).")
        return 2
    procs = []
    try:
        p0, a0 = spawn("host", 0, "i0")
        p1, a1 = spawn("host", 1, "i1")
        procs += [p0, p1]
        one = asyncio.run(run_job([a0], args.steps, args.batch, args.warmup, "one"))
        two = asyncio.run(run_job([a0, a1], args.steps, args.batch, args.warmup, "two"))
        raw_proc, raw_address = spawn("raw", 1)
        procs.append(raw_proc)
        raw = asyncio.run(raw_stream_bytes_per_s(raw_address, two.moved_bytes))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    ratio = two.tokens_per_s / one.tokens_per_s
    print(
        f"palm-tiny (vocab 1024), global batch {args.batch} x seq 64, {args.steps} steps "
        f"({args.warmup} warm-up); each island host: 1 CPU device, 1 XLA thread, own core"
    )
    for name, run in (("1 island  (all of the batch)", one), ("2 islands (half each)       ", two)):
        print(f"{name}: {run.tokens_per_s:10,.0f} tokens/s, step {run.step_s * 1e3:.1f} ms")
    print(f"throughput ratio 2 islands / 1 island: {ratio:.2f}x (PaLM 1.95x; goal >= 1.95x)")
    print(f"exchange share of the 2-island step time: {two.exchange_share:.1%}")
    print(
        f"exchange bandwidth {two.exchange_bytes_per_s / 1e6:,.0f} MB/s (sent + received per "
        f"host, {two.moved_bytes / 1e6:.1f} MB a step) vs raw gRPC stream on loopback "
        f"{raw / 1e6:,.0f} MB/s: ratio {two.exchange_bytes_per_s / raw:.2f} (goal >= 0.8)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
