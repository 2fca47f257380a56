"""Peer restore bandwidth: a job's state host to host (FetchState) against raw gRPC streaming.

One process, loopback gRPC, four virtual CPU devices: the "survivor" holds a state of
`--mib` MiB (a matrix split over a 2-device mesh, a replicated vector, a scalar) on devices
0-1 and serves it with ExchangeService's FetchState (workers/peer_restore.py); the "restarted
host" fetches it onto devices 2-3 (same mesh shape) and builds the arrays. The baseline
streams the same number of bytes as raw 4 MiB messages over a bare grpc.aio unary-stream
method (no protobuf, no copies beyond gRPC's own). Printed: MiB/s of each and the ratio
(FetchState / raw), fetch only and fetch + assemble on the devices; `--json` one object.

    .venv/bin/python bench/peer_restore.py [--mib 256] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

RAW_METHOD = "/bench.Raw/Stream"
CHUNK = 4 << 20


async def raw_bandwidth(total: int, options) -> float:
    """Seconds to stream `total` bytes as raw messages of CHUNK bytes over loopback."""
    import grpc

    payload = os.urandom(CHUNK)

    async def stream(request: bytes, context):
        sent = 0
        while sent < total:
            n = min(CHUNK, total - sent)
            yield payload[:n]
            sent += n

    handler = grpc.method_handlers_generic_handler(
        "bench.Raw", {"Stream": grpc.unary_stream_rpc_method_handler(stream)}
    )
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            call = channel.unary_stream(RAW_METHOD)
            started = time.perf_counter()
            got = 0
            async for message in call(b""):
                got += len(message)
            seconds = time.perf_counter() - started
        assert got == total
        return seconds
    finally:
        await server.stop(0)


async def fetch_once(leaves, like, options) -> tuple[float, float, int]:
    """(fetch seconds, fetch + assemble seconds, bytes) of one FetchState restore."""
    import grpc

    from pathways_lite.v1 import worker_pb2_grpc
    from pathways_lite.workers import rpc
    from pathways_lite.workers.exchange_service import SERVICE_NAME, ExchangeServicer
    from pathways_lite.workers.peer_restore import assemble, fetch_state, state_pieces

    servicer = ExchangeServicer(lambda job_id: None)

    async def source(request):
        return state_pieces(leaves, request), len(leaves)

    servicer.state_source = source
    stop = asyncio.Event()
    port = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(
        rpc.serve(
            "survivor",
            {SERVICE_NAME: servicer.add_to_server},
            "127.0.0.1",
            0,
            options=options,
            started=port.set_result,
            stop=stop,
            grace_s=0.0,
        )
    )
    address = f"127.0.0.1:{await port}"
    try:
        async with grpc.aio.insecure_channel(address, options=options) as channel:
            stub = worker_pb2_grpc.ExchangeServiceStub(channel)
            started = time.perf_counter()
            fetched = await fetch_state([stub], "bench", 0, like)
            fetch_s = time.perf_counter() - started
            arrays = assemble(fetched, like)
            for a in arrays:
                a.block_until_ready()
            return fetch_s, time.perf_counter() - started, fetched.bytes
    finally:
        stop.set()
        await task


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=256, help="state size in MiB (> 64: over a message)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from pathways_lite.workers.exchange import MAX_MESSAGE_BYTES

    devices = jax.devices()
    if len(devices) < 4:
        raise SystemExit(f"needs 4 devices, has {len(devices)}")
    rows = max(2, (args.mib << 20) // (4 * 4096) // 2 * 2)
    source_mesh = Mesh(np.array(devices[:2]), ("model",))
    target_mesh = Mesh(np.array(devices[2:4]), ("model",))
    specs = [PartitionSpec("model", None), PartitionSpec(), PartitionSpec()]
    values = [
        np.random.default_rng(0).standard_normal((rows, 4096), dtype=np.float32),
        np.arange(1000, dtype=np.float32),
        np.array(3, np.int32),
    ]
    leaves = [
        jax.device_put(v, NamedSharding(source_mesh, s)) for v, s in zip(values, specs, strict=True)
    ]
    like = [
        (v.shape, v.dtype, NamedSharding(target_mesh, s))
        for v, s in zip(values, specs, strict=True)
    ]
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]
    total = sum(v.nbytes for v in values)

    async def run() -> dict:
        fetch, full, raw = [], [], []
        for _ in range(args.repeat):
            f, a, got = await fetch_once(leaves, like, options)
            assert got == total, (got, total)
            fetch.append(f)
            full.append(a)
            raw.append(await raw_bandwidth(total, options))
        return {"fetch_s": min(fetch), "restore_s": min(full), "raw_s": min(raw)}

    r = asyncio.run(run())
    mib = total / (1 << 20)
    out = {
        "state_mib": round(mib, 1),
        "fetch_mib_s": round(mib / r["fetch_s"], 1),
        "restore_mib_s": round(mib / r["restore_s"], 1),
        "raw_grpc_mib_s": round(mib / r["raw_s"], 1),
        "fetch_over_raw": round(r["raw_s"] / r["fetch_s"], 3),
        "restore_over_raw": round(r["raw_s"] / r["restore_s"], 3),
    }
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"state {out['state_mib']} MiB over loopback gRPC (best of {args.repeat})")
    print(f"  raw gRPC streaming (baseline)  {out['raw_grpc_mib_s']:8.1f} MiB/s")
    print(
        f"  FetchState                     {out['fetch_mib_s']:8.1f} MiB/s  "
        f"{out['fetch_over_raw']:.2f} x raw"
    )
    print(
        f"  FetchState + arrays on devices {out['restore_mib_s']:8.1f} MiB/s  "
        f"{out['restore_over_raw']:.2f} x raw"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
