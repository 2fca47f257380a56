"""The controller under watch/submit load: 200 WatchJob streams + 100 concurrent submitters +
20 dashboard SSE clients, against the controller's step dispatch rate unloaded (bench/scale.py
runs it and prints its figures beside the others).

Four processes: the simulated island hosts (workers/sim_host.py, 0 ms steps), the
controller (this file's `controller` role: the real Controller, its gRPC service and its
dashboard, pinned to one core where `taskset` exists, the other processes pinned to the other
cores), and two load generators (this file's
`load` role: `--part streams`, the watchers and SSE clients; `--part submit`, the submitters).
50 one-island jobs with many steps run on 50 islands; the controller writes its
steps total every 0.25 s. The dispatch rate is steps per second over a window without load,
then over the same window with the load running; its ratio is `dispatch_under_load_ratio`.
The streams' load starts first and says it is ready once every stream has its first reply
(`streams_opened`: how many did): the load measured is 200 open streams, not 200 opening
at once (each replays its job's recorded steps; before stop 40 the first burst of
submissions met that replay, and it set `submit_p99_ms`). The submitters start then, the
loaded window once both run, and it ends both (SIGTERM).
The watchers are spread over the 50 jobs; each checks that the live updates' sequence numbers
follow one another (a gap not announced by a `dropped` resync counts as lost, and so does
every dropped update); `lost_events` sums them over the watchers and the SSE clients' resyncs.
Submissions are 1-island jobs that queue behind the running ones, 100 at once every
SUBMIT_EVERY_S (their specs made and the channel connected before the first burst);
`submit_p99_ms` is the client-side latency of SubmitJob. The watchers ask for live steps
in batches (`batch_steps`, as the client does; `--watch-unbatched`: one reply per step).
The SSE clients count the events they receive by kind (`sse_events`), and a load client
that fails is reported (`load_errors`, else []): before stop 32 the SSE clients died on their
first 2.4 MB overview event unnoticed, so earlier ratios were measured without them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

RUNNING_JOBS = 50
WATCHERS = 200
SUBMITTERS = 100
SSE_CLIENTS = 20
# Each submitter submits one job this often (SUBMITTERS at once: bursts of concurrent ones).
SUBMIT_EVERY_S = 2.0
# How long the streams' load waits for all its streams to open before it says it is ready.
OPEN_TIMEOUT_S = 60.0
# The watchers ask for live steps in batches (WatchJobRequest.batch_steps), as the client does.
BATCH_STEPS = True


def _spec(name: str, steps: int):
    from pathways_lite.spec import load_spec_text

    return load_spec_text(f"""
name: {name}
model: {{preset: palm-tiny}}
islands: 1
devices_per_island: 1
mesh: {{data: 1, model: 1}}
train: {{steps: {steps}, global_batch: 8, seq_len: 64}}
data: {{source: stdlib, vocab_size: 1024}}
""")


def _prepare(record, job):
    from pathways_lite.controller.resolved import DatasetRef

    return dataclasses.replace(job, dataset=DatasetRef("/sim", "sim", "sim", 1 << 20))


async def _controller(args) -> None:
    from pathways_lite.controller.core import Controller, settle_heap
    from pathways_lite.controller.dashboard import Dashboard
    from pathways_lite.controller.service import serve
    from pathways_lite.controller.store import JobStore
    from pathways_lite.workers.sim_host import connect_islands

    addresses = json.loads(Path(args.sim_addresses).read_text())
    islands = await connect_islands(addresses)
    store = JobStore.open_controller(args.state_dir)
    controller = Controller(store, islands, prepare=_prepare, peak_flops=1e12)
    dashboard = Dashboard(controller, token=None)
    stop = asyncio.Event()

    async def record_steps() -> None:
        with open(args.steps_file, "a", buffering=1) as out:
            while not stop.is_set():
                dropped = controller.events.dropped_total
                out.write(f"{time.monotonic()} {controller.steps_total} {dropped}\n")
                await asyncio.sleep(0.25)

    def started(port: int) -> None:
        settle_heap()  # as the controller's own entry point does
        info = {"grpc": f"127.0.0.1:{port}", "dashboard": dashboard.url}
        Path(args.port_file).write_text(json.dumps(info))

    await dashboard.start("127.0.0.1", 0)
    recorder = asyncio.create_task(record_steps())
    loop = asyncio.get_running_loop()
    import signal

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await serve(controller, "127.0.0.1", 0, started=started, stop=stop, grace_s=1.0)
    finally:
        stop.set()
        await recorder
        await dashboard.stop()


async def _load(args) -> None:
    import aiohttp
    import grpc

    from pathways_lite.v1 import controller_pb2, controller_pb2_grpc

    info = json.loads(Path(args.port_file).read_text())
    jobs = json.loads(Path(args.jobs_file).read_text())
    channel = grpc.aio.insecure_channel(info["grpc"])
    stub = controller_pb2_grpc.ControllerServiceStub(channel)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    opened = 0  # streams (watchers and SSE clients) that received their first reply
    all_open = asyncio.Event()
    lost = 0
    updates = 0
    submits: list[float] = []

    settled: set[int] = set()  # streams open, or failed before their first reply

    def open_one() -> None:
        nonlocal opened
        opened += 1

    def settle(n: int) -> None:
        settled.add(n)
        if len(settled) == streams:
            all_open.set()

    sse_events: dict[str, int] = {}  # events the SSE clients received, by kind

    async def watch(job_id: str, n: int) -> None:
        try:
            await _watch(job_id, n)
        finally:
            settle(n)  # (a stream that failed first: reported in load_errors)

    async def _watch(job_id: str, n: int) -> None:
        nonlocal lost, updates
        got = await stub.GetJob(controller_pb2.GetJobRequest(job_id=job_id, summary=True))
        request = controller_pb2.WatchJobRequest(
            job_id=job_id, from_step=got.job.steps_completed, batch_steps=BATCH_STEPS
        )
        call = stub.WatchJob(request)
        last = None
        first = True
        try:
            async for reply in call:
                if first:
                    open_one()
                    settle(n)
                    first = False
                if stop.is_set():
                    break
                if reply.dropped:
                    lost += reply.dropped
                    last = None  # resynced from the store
                if not reply.seq:
                    continue
                count = 1 + len(reply.more_metrics)  # a batch's steps: seq, seq + 1, ...
                updates += count
                if last is not None and reply.seq != last + 1:
                    lost += reply.seq - last - 1
                last = reply.seq + count - 1
        finally:
            call.cancel()

    async def submit(n: int) -> None:
        # A burst of SUBMITTERS concurrent submissions every SUBMIT_EVERY_S.
        spec = specs[n]
        while not stop.is_set():
            t = time.perf_counter()
            await stub.SubmitJob(controller_pb2.SubmitJobRequest(spec=spec))
            submits.append((time.perf_counter() - t) * 1e3)
            await asyncio.sleep(max(0.0, SUBMIT_EVERY_S - (time.perf_counter() - t)))

    async def sse(session: aiohttp.ClientSession, n: int) -> None:
        try:
            await _sse(session, n)
        finally:
            settle(n)  # (a stream that failed first: reported in load_errors)

    async def _sse(session: aiohttp.ClientSession, n: int) -> None:
        async with session.get(info["dashboard"] + "api/stream") as response:
            response.raise_for_status()
            event, pending = "", b""
            first = True
            # Read in chunks, not lines (aiohttp refuses a line over 512 KiB; a browser does not).
            async for chunk in response.content.iter_any():
                if first:
                    open_one()
                    settle(n)
                    first = False
                if stop.is_set():
                    break
                *lines, pending = (pending + chunk).split(b"\n")
                for raw in lines:
                    event = _sse_line(raw.decode().strip(), event)

    def _sse_line(line: str, event: str) -> str:
        """Count one line of the SSE stream; returns the event it belongs to."""
        nonlocal lost
        if line.startswith("event:"):
            event = line.split(":", 1)[1].strip()
            sse_events[event] = sse_events.get(event, 0) + 1
        elif line.startswith("data:") and event == "resync":
            lost += json.loads(line.split(":", 1)[1])["dropped"]
        return event

    streams = WATCHERS + SSE_CLIENTS if args.part in ("all", "streams") else 0
    if not streams:
        all_open.set()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        tasks = []
        if args.part in ("all", "streams"):
            tasks += [asyncio.create_task(watch(jobs[i % len(jobs)], i)) for i in range(WATCHERS)]
            tasks += [asyncio.create_task(sse(session, WATCHERS + i)) for i in range(SSE_CLIENTS)]
        # Ready once every stream is open (its first reply came): the load is steady from
        # here on, not the opening of 200 streams at once (each replays its job's steps).
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(all_open.wait(), OPEN_TIMEOUT_S)
        if args.part in ("all", "submit"):
            # The specs made and the channel connected first: each burst is SUBMITTERS
            # submissions at once (a spec parsed per submitter as it started spread the
            # first burst over the client's own parsing, and put that into its latencies).
            specs = [_spec(f"load-{n}", 2) for n in range(SUBMITTERS)]
            await channel.channel_ready()
            tasks += [asyncio.create_task(submit(n)) for n in range(SUBMITTERS)]
        Path(args.ready_file).write_text(json.dumps({"opened": opened, "streams": streams}))
        # Until the bench's loaded window ends (SIGTERM), at most `seconds`.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), args.seconds)
        stop.set()
        for task in tasks:
            task.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    # A load client that failed (a refused stream, a broken call) is reported, not ignored.
    errors = sorted({repr(e) for e in outcomes if isinstance(e, Exception) and not _cancelled(e)})
    await channel.close()
    submits.sort()
    Path(args.result_file).write_text(
        json.dumps(
            {
                "lost_events": lost,
                "watched_updates": updates,
                "sse_events": sse_events,
                "load_errors": errors,
                "submits": len(submits),
                "submit_p50_ms": submits[len(submits) // 2] if submits else None,
                "submit_p99_ms": submits[int(len(submits) * 0.99)] if submits else None,
            }
        )
    )


def _cancelled(error: BaseException) -> bool:
    """A call ended by the load generator's own cancel at the end of the run."""
    import grpc

    return isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.CANCELLED


def _rate(steps_file: Path, since: float, until: float) -> float:
    rows = [tuple(map(float, line.split())) for line in steps_file.read_text().splitlines()]
    window = [(t, s) for t, s, _ in rows if since <= t <= until]
    if len(window) < 2:
        return 0.0
    return (window[-1][1] - window[0][1]) / (window[-1][0] - window[0][0])


def _wait_file(path: Path, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{process.args} did not start")
        time.sleep(0.1)


def run(folder: Path, seconds: float = 15.0) -> dict:
    """The load figures (see the module's docstring), one run."""
    import grpc

    from pathways_lite.v1 import controller_pb2, controller_pb2_grpc

    me = [sys.executable, __file__]
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") and os.cpu_count() > 1 else []
    # The controller alone on one core, the simulated hosts and the load on the others.
    others = ["taskset", "-c", f"1-{os.cpu_count() - 1}"] if pin else []
    sim_file, port_file = folder / "load-sim.json", folder / "load-ports.json"
    steps_file, jobs_file = folder / "load-steps.txt", folder / "load-jobs.json"
    ready_file, result_file = folder / "load-ready", folder / "load-result.json"
    procs = []
    try:
        sim = subprocess.Popen(
            [
                *others,
                sys.executable,
                "-m",
                "pathways_lite.workers.sim_host",
                f"--islands={RUNNING_JOBS}",
                f"--address-file={sim_file}",
            ]
        )
        procs.append(sim)
        _wait_file(sim_file, sim)
        ctl = subprocess.Popen(
            [
                *pin,
                *me,
                "controller",
                f"--sim-addresses={sim_file}",
                f"--state-dir={folder / 'load-state'}",
                f"--port-file={port_file}",
                f"--steps-file={steps_file}",
            ]
        )
        procs.append(ctl)
        _wait_file(port_file, ctl)
        address = json.loads(port_file.read_text())["grpc"]

        async def submit_running() -> list[str]:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = controller_pb2_grpc.ControllerServiceStub(channel)
                ids = []
                for n in range(RUNNING_JOBS):
                    request = controller_pb2.SubmitJobRequest(spec=_spec(f"run-{n}", 10**7))
                    ids.append((await stub.SubmitJob(request)).job.id)
                return ids

        jobs = asyncio.run(submit_running())
        jobs_file.write_text(json.dumps(jobs))
        time.sleep(5.0)  # every job loaded and stepping
        t0 = time.monotonic()
        time.sleep(seconds)
        unloaded = _rate(steps_file, t0, time.monotonic())
        # Two load generators: the streams' clients, and the submitters in a process of
        # their own (the streams' replies kept one process's loop busy enough to add its lag
        # to every submission's latency).
        loads = []
        opened = {}
        # The streams first (ready once all are open), then the submitters; the loaded window
        # starts when both are running, and ends them (SIGTERM).
        for part in ("streams", "submit"):
            loads.append(
                subprocess.Popen(
                    [
                        *others,
                        *me,
                        "load",
                        f"--part={part}",
                        f"--port-file={port_file}",
                        f"--jobs-file={jobs_file}",
                        f"--ready-file={ready_file}.{part}",
                        f"--result-file={result_file}.{part}",
                        f"--seconds={seconds + OPEN_TIMEOUT_S + 30}",
                        *([] if BATCH_STEPS else ["--watch-unbatched"]),
                        f"--watchers={WATCHERS}",
                        f"--submitters={SUBMITTERS}",
                        f"--sse-clients={SSE_CLIENTS}",
                    ]
                )
            )
            procs.append(loads[-1])
            ready = Path(f"{ready_file}.{part}")
            _wait_file(ready, loads[-1], timeout_s=OPEN_TIMEOUT_S + 60)
            opened[part] = json.loads(ready.read_text())
        t1 = time.monotonic()
        time.sleep(seconds)
        loaded = _rate(steps_file, t1, time.monotonic())
        for load in loads:
            load.send_signal(signal.SIGTERM)
        for load in loads:
            load.wait(120)
        streams = json.loads(Path(f"{result_file}.streams").read_text())
        result = json.loads(Path(f"{result_file}.submit").read_text())
        for key in ("lost_events", "watched_updates", "sse_events"):
            result[key] = streams[key]
        result["load_errors"] = sorted({*streams["load_errors"], *result["load_errors"]})
        result["streams_opened"] = opened["streams"]["opened"]
        rows = steps_file.read_text().split()
        result.update(
            dispatch_steps_per_s_unloaded=unloaded,
            dispatch_steps_per_s_loaded=loaded,
            dispatch_under_load_ratio=loaded / unloaded if unloaded else 0.0,
            bus_dropped_total=int(float(rows[-1])) if rows else 0,
            controller_pinned=bool(pin),
            watch_batch_steps=BATCH_STEPS,
            load={"watchers": WATCHERS, "submitters": SUBMITTERS, "sse_clients": SSE_CLIENTS},
        )
        return result
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def main(argv: list[str] | None = None) -> int:
    global BATCH_STEPS, WATCHERS, SUBMITTERS, SSE_CLIENTS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", nargs="?", default="bench", choices=["bench", "controller", "load"])
    for flag in (
        "--sim-addresses",
        "--state-dir",
        "--port-file",
        "--steps-file",
        "--jobs-file",
        "--ready-file",
        "--result-file",
    ):
        parser.add_argument(flag)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument(
        "--part",
        choices=["all", "streams", "submit"],
        default="all",
        help="load role: the WatchJob and SSE clients, the submitters, or both",
    )
    parser.add_argument(
        "--watch-unbatched",
        action="store_true",
        help="watchers ask for one reply per update (WatchJob without batch_steps)",
    )
    # One part of the load alone (e.g. `--submitters 0 --sse-clients 0`): what each costs.
    parser.add_argument("--watchers", type=int, default=WATCHERS)
    parser.add_argument("--submitters", type=int, default=SUBMITTERS)
    parser.add_argument("--sse-clients", type=int, default=SSE_CLIENTS)
    args = parser.parse_args(argv)
    BATCH_STEPS = not args.watch_unbatched
    WATCHERS, SUBMITTERS, SSE_CLIENTS = args.watchers, args.submitters, args.sse_clients
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.role == "controller":
        import logging

        logging.basicConfig(level=logging.ERROR)
        asyncio.run(_controller(args))
    elif args.role == "load":
        asyncio.run(_load(args))
    else:
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="plload-"))
        try:
            print(json.dumps(run(folder, args.seconds)))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
