"""The exchange path alone (bench/dp_scaling.py's exchange_vs_raw and bytes-copied figures).

Two processes, pinned to their own cores like dp_scaling's island hosts, each serve an
ExchangeService and run the overlapped step's exchange without compute: every bucket of a
palm-small gradient started at once with `JobExchange.start_allreduce` (the step's exact
buckets and chunks), then waited for. Reported per host: the median seconds of one step's
exchange, the payload bytes sent and received, and the bytes copied on the path (the
staging copy of the callback, the exchange's own counted copies, the copy back onto the
device) over the gradient bytes.

Run through dp_scaling.py; alone: .venv/bin/python bench/exchange_alone.py --sizes 1000,2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

JOB = "exchange-alone"


def child(port_file: str, island: int, sizes: list[int], rounds: int) -> None:
    """One island host's exchange: serve, wait for the peers file, exchange, write results."""
    import grpc
    import numpy as np

    from pathways_lite.workers import rpc
    from pathways_lite.workers.exchange import JobExchange, expected_payload_bytes
    from pathways_lite.workers.exchange_service import SERVICE_NAME, ExchangeServicer
    from pathways_lite.workers.runtime import IslandJobSpec

    spec = IslandJobSpec(JOB, 0, "palm-small", num_islands=2)

    def loaded(job_id: str) -> IslandJobSpec:
        if job_id != JOB:
            raise rpc.RpcRejection(grpc.StatusCode.NOT_FOUND, f"job_id={job_id!r} unknown.")
        return spec

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    servicer = ExchangeServicer(loaded)

    tasks = []  # the server's task, referenced so it is not collected

    async def start() -> int:
        port = loop.create_future()
        tasks.append(
            asyncio.ensure_future(
                rpc.serve(
                    "exchange service",
                    {SERVICE_NAME: servicer.add_to_server},
                    "127.0.0.1",
                    0,
                    interceptors=[servicer.byte_counter],
                    started=port.set_result,
                    stop=asyncio.Event(),
                    grace_s=1.0,
                )
            )
        )
        return await port

    port = asyncio.run_coroutine_threadsafe(start(), loop).result(60)
    Path(port_file + ".tmp").write_text(str(port))
    os.replace(port_file + ".tmp", port_file)
    peers_file = Path(port_file + ".peers")
    while not peers_file.exists():
        time.sleep(0.05)
    addresses = json.loads(peers_file.read_text())
    exchange = JobExchange(
        loop,
        servicer.mailbox,
        servicer.peers,
        job_id=JOB,
        generation=0,
        island_index=island,
        addresses=addresses,
        timeout_s=120.0,
    )
    rng = np.random.default_rng(island)
    buffers = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    times, copied = [], 0
    for step in range(rounds + 2):
        exchange.reset_counters()
        started = time.perf_counter()
        futures = [exchange.start_allreduce(step, b, buf) for b, buf in enumerate(buffers)]
        for future in futures:
            future.result()
        times.append(time.perf_counter() - started)
        copied = exchange.copied_bytes
    n = sum(sizes)
    sent, received = expected_payload_bytes(n, 2, island, sizes)
    result = {
        "exchange_s": statistics.median(times[2:]),
        "sent": sent,
        "received": received,
        "gradient_bytes": 4 * n,
        # The callback's staging copy and the copy onto the device surround the exchange.
        "copied_bytes": copied + 8 * n,
    }
    Path(port_file + ".result").write_text(json.dumps(result))
    time.sleep(1.0)  # the peer may still be reading our last reduced parts
    os._exit(0)  # without tearing down the server's loop thread


def run(sizes: list[int], rounds: int = 5, cores: tuple[int, int] = (0, 1)) -> list[dict]:
    """Both hosts' results (island order)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    files, procs = [], []
    try:
        for island, core in enumerate(cores):
            port_file = tempfile.mktemp(prefix="pl-exalone-")
            files.append(port_file)
            cmd = ["taskset", "-c", str(core), sys.executable, __file__, "--child", port_file]
            cmd += ["--island", str(island), "--sizes", ",".join(map(str, sizes))]
            cmd += ["--rounds", str(rounds)]
            procs.append(subprocess.Popen(cmd, env=env))
        deadline = time.monotonic() + 120
        while not all(Path(f).exists() for f in files):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError("an exchange process did not start.")
            time.sleep(0.05)
        addresses = [f"127.0.0.1:{Path(f).read_text()}" for f in files]
        for f in files:
            Path(f + ".peers").write_text(json.dumps(addresses))
        for proc in procs:
            proc.wait(timeout=600)
        return [json.loads(Path(f + ".result").read_text()) for f in files]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for f in files:
            for suffix in ("", ".peers", ".result", ".tmp"):
                Path(f + suffix).unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--island", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="1000000", help="values per bucket, comma-separated")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.child:
        child(args.child, args.island, sizes, args.rounds)
        return 0
    print(json.dumps(run(sizes, args.rounds)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
