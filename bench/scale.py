"""The controller at cluster scale: 1,000 jobs on 64 simulated islands, backfill vs strict
order, decision latency, idle fraction, and the jobs page over 10,000 finished jobs.

The real controller (core, admission, scheduler, store, dispatcher, job runners) runs in this
process; the 64 island hosts are simulated (workers/sim_host.py: worker.proto over real gRPC,
no JAX) in a process of their own. Workload (seeded): jobs needing 1, 2, 4, 8 or 16 islands
(weights 40/25/15/12/8 %), lognormal step counts (durations), three priorities, all submitted
at once; every job holds a whole island (its measured memory is the island's budget). Steps
take 0.2 s, so 64 busy islands ask ~320 steps/s of the controller, below what it dispatches
(bench/scale_load.py measures ~700 steps/s on one core): the figures are the scheduler's, not
a saturated dispatcher's.

Figures, side by side in one run:
- decision latency p50/p99: a scheduling pass, from the event that asked for it (a job's
  end, a submission) to its placements committed (admission's `decisions_ms`), and the
  pass's own work alone (`pass_ms`: without the wait for the busy event loop);
- idle_fraction: island-seconds idle while a waiting job fits on idle islands that the head's
  reservation does not hold, over island-seconds while work waits (sampled every 50 ms);
- mean queue wait with EASY backfill vs strict priority order (the baseline, same workload);
- reservation overruns: heads that started later than their first reservation (+1 s), and
  heads delayed by a backfill (`heads_delayed_by_backfill`: a job started ahead of a head
  still ran past the head's reservation (+1 s) while the head waited; 0 is "no job starved
  past its reservation");
- jobs_page_ms: a ListJobs page of 100 (keyset, newest first, each job's view built as the
  servicer does) with 10,000 finished jobs in the store, 50 pages deep (median);
- ray_death_to_recovery_s: a 2-island job on simulated hosts that are Ray actors; one actor's
  process is killed (SIGKILL); time to the job's recovery starting with Ray's death report
  (DeathWatch), and without it (`grpc_death_to_recovery_s`: the steps' gRPC errors alone).
- lost_events, submit_p99_ms, dispatch_under_load_ratio: bench/scale_load.py (200 WatchJob
  streams, 100 concurrent submitters, 20 SSE clients against the controller process alone on
  one core; dispatch rate with and without that load).

Run: .venv/bin/python bench/scale.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = (1, 2, 4, 8, 16)
SIZE_WEIGHTS = (40, 25, 15, 12, 8)
PRIORITIES = (0, 1, 2)
# Examples per island per step (the global batch grows with the gang: alike memory per island).
PER_ISLAND_BATCH = 8


def spec_for(name: str, islands: int, steps: int, priority: int):
    from pathways_lite.spec import load_spec_text

    spec = load_spec_text(f"""
name: {name}
model: {{preset: palm-tiny}}
islands: {islands}
devices_per_island: 1
mesh: {{data: 1, model: 1}}
train: {{steps: {steps}, global_batch: {PER_ISLAND_BATCH * islands}, seq_len: 64}}
data: {{source: stdlib, vocab_size: 1024}}
""")
    spec.priority = priority
    return spec


def workload(n: int, seed: int, mean_steps: float) -> list[tuple[int, int, int]]:
    """(islands, steps, priority) of n jobs."""
    rng = random.Random(seed)
    sigma = 0.8
    mu = math.log(mean_steps) - sigma**2 / 2
    return [
        (
            rng.choices(SIZES, SIZE_WEIGHTS)[0],
            max(2, int(rng.lognormvariate(mu, sigma))),
            rng.choice(PRIORITIES),
        )
        for _ in range(n)
    ]


def budget_bytes() -> int:
    """An island budget that holds exactly one job of every size (estimate and measured)."""
    from pathways_lite.controller.resolved import ResolvedJob

    estimates = [ResolvedJob.resolve(spec_for("e", k, 2, 0)).bytes_per_device for k in SIZES]
    budget = max(estimates)
    assert 2 * min(estimates) > budget, estimates
    return budget


@dataclasses.dataclass
class SimHosts:
    """The simulated island hosts in a process of their own."""

    process: subprocess.Popen
    addresses: dict[str, str]

    @classmethod
    def start(cls, islands: int, step_s: float, budget: int, folder: Path) -> SimHosts:
        address_file = folder / f"sim-{os.getpid()}-{time.monotonic_ns()}.json"
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pathways_lite.workers.sim_host",
                f"--islands={islands}",
                f"--step-s={step_s}",
                f"--budget={budget}",
                f"--job-bytes={budget}",
                f"--address-file={address_file}",
            ]
        )
        deadline = time.monotonic() + 120
        while not address_file.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError("the simulated hosts did not start")
            time.sleep(0.1)
        return cls(process, json.loads(address_file.read_text()))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _prepare(record, job):
    from pathways_lite.controller.resolved import DatasetRef

    return dataclasses.replace(job, dataset=DatasetRef("/sim", "sim", "sim", 1 << 20))


async def run_queue(
    addresses: dict[str, str], jobs: list[tuple[int, int, int]], backfill: bool, folder: Path
) -> dict:
    """Submit every job at once to a fresh controller on the simulated islands; run them all
    to the end; the figures of the run."""
    from pathways_lite.controller.core import Controller
    from pathways_lite.controller.states import JobState
    from pathways_lite.controller.store import JobStore
    from pathways_lite.v1 import controller_pb2
    from pathways_lite.workers.sim_host import connect_islands

    islands = await connect_islands(addresses)
    store = JobStore.open_controller(folder / f"state-{'bf' if backfill else 'strict'}")
    controller = Controller(
        store, islands, state_dir="", prepare=_prepare, peak_flops=1e12, backfill=backfill
    )
    admission, sched = controller.admission, controller.scheduler
    await controller.start()
    ids = []
    for n, (k, steps, priority) in enumerate(jobs):
        request = controller_pb2.SubmitJobRequest(spec=spec_for(f"j{n}", k, steps, priority))
        ids.append(controller.submit(request).id)
    began = time.monotonic()
    idle_fit = busy_wait = 0.0
    reserved: dict[str, float] = {}
    last = time.monotonic()
    while True:
        await asyncio.sleep(0.05)
        now = time.monotonic()
        dt, last = now - last, now
        r = admission.reservation
        if r is not None and r.job_id not in reserved:
            reserved[r.job_id] = r.start
        waiting = [j for j in admission.pending if j not in controller.runners]
        if not waiting and not controller.runners:
            if all(store.get_job(j).state.terminal for j in ids):
                break
            continue
        if waiting:
            busy_wait += dt * len(sched.island_ids)
            idle = [i for i in sched.free() if r is None or i not in r.islands]
            smallest = min(
                (store.get_job(j).spec.islands for j in waiting if r is None or j != r.job_id),
                default=math.inf,
            )
            if idle and smallest <= len(idle):
                idle_fit += dt * len(idle)
    makespan = time.monotonic() - began
    records = [store.get_job(j) for j in ids]
    waits = [(r.started_us - r.created_us) / 1e6 for r in records if r.started_us]
    offset = time.time() - time.monotonic()  # wall clock -> admission's clock

    def at(us: int | None) -> float:
        return math.inf if us is None else us / 1e6 - offset

    overruns = sum(1 for j, r in reserved.items() if at(store.get_job(j).started_us) > r + 1.0)
    # Starvation by backfill: a job started ahead of a head that was still running past that
    # head's reservation (+1 s) while the head had not started: the one way EASY backfill
    # could delay a head. Heads late for other reasons (running jobs slower than expected)
    # are in `reservation_overruns`.
    starved = {
        head
        for job, head, r in admission.backfills
        if at(store.get_job(job).finished_us) > r + 1.0
        and at(store.get_job(head).started_us) > r + 1.0
    }
    states = [r.state for r in records]
    decisions = sorted(admission.decisions_ms)
    passes = sorted(admission.pass_ms)
    cpu = sorted(admission.pass_cpu_ms)
    await controller.stop()
    store.close()
    return {
        "jobs": len(ids),
        "succeeded": sum(s == JobState.SUCCEEDED for s in states),
        "makespan_s": makespan,
        "mean_wait_s": statistics.fmean(waits) if waits else 0.0,
        "decision_p50_ms": decisions[len(decisions) // 2] if decisions else 0.0,
        "decision_p99_ms": decisions[int(len(decisions) * 0.99)] if decisions else 0.0,
        "passes": len(decisions),
        "pass_p99_ms": passes[int(len(passes) * 0.99)] if passes else 0.0,
        "pass_cpu_p50_ms": cpu[len(cpu) // 2] if cpu else 0.0,
        "pass_cpu_p99_ms": cpu[int(len(cpu) * 0.99)] if cpu else 0.0,
        "idle_fraction": idle_fit / busy_wait if busy_wait else 0.0,
        "reservations": len(reserved),
        "reservation_overruns": overruns,
        "backfills": len(admission.backfills),
        "heads_delayed_by_backfill": len(starved),
    }


def jobs_page_ms(folder: Path, finished: int) -> float:
    """Median time of a ListJobs page (100 jobs, newest first, keyset) deep in a store of
    `finished` finished jobs."""
    from pathways_lite.controller.states import JobState
    from pathways_lite.controller.store import JobStore
    from pathways_lite.v1 import controller_pb2

    store = JobStore(folder / "page.db")
    spec = spec_for("p", 1, 2, 0)
    for n in range(finished):
        record = store.create_job(controller_pb2.JobSpec(name=f"p{n}", islands=1), job_id=f"p{n}")
        store.transition(record.id, JobState.RUNNING, reason="scheduled")
        store.transition(record.id, JobState.SUCCEEDED, reason="completed")
    del spec
    # The page as ListJobs answers it: the keyset page, then each job's view.
    from pathways_lite.controller.scheduler import Scheduler
    from pathways_lite.controller.views import Views

    views = Views(store, Scheduler([]), {}, {}, lambda record: None)
    times, token = [], ""
    for _ in range(50):
        t = time.perf_counter()
        page, token = store.list_jobs(page_size=100, page_token=token, newest_first=True)
        queued = store.jobs_in_states([JobState.QUEUED])
        [views.job(r, include_losses=False, queued=queued) for r in page]
        times.append((time.perf_counter() - t) * 1e3)
    store.close()
    return statistics.median(times)


async def _death_run(actors, addresses, watch_ray: bool, folder: Path) -> float:
    """A 2-island job runs on Ray-hosted simulated islands; island-r0's actor process is
    killed (SIGKILL); seconds from the kill to the job's recovery starting (its failure
    event, written once the failed attempt is classified and the islands probed)."""
    import signal

    import ray

    from pathways_lite.controller.core import Controller
    from pathways_lite.controller.store import JobStore
    from pathways_lite.v1 import controller_pb2
    from pathways_lite.workers.sim_host import connect_islands

    islands = await connect_islands(addresses)
    for island, actor in zip(islands, actors, strict=True):
        island.actors = [actor]
    store = JobStore.open_controller(folder / f"death-{watch_ray}")
    controller = Controller(
        store, islands, state_dir="", prepare=_prepare, peak_flops=1e12, watch_ray=watch_ray
    )
    await controller.start()
    try:
        spec = spec_for("victim", 2, 100_000, 0)
        job = controller.submit(controller_pb2.SubmitJobRequest(spec=spec)).id
        while not store.metrics(job, from_step=5):
            await asyncio.sleep(0.05)
        pid = ray.get(actors[0].pid.remote(), timeout=30)
        killed_us = time.time() * 1e6
        os.kill(pid, signal.SIGKILL)
        while True:
            failures = [e for e in store.events(job) if e.kind == "failure"]
            if failures:
                return (failures[0].time_us - killed_us) / 1e6
            if store.get_job(job).state.terminal:
                raise RuntimeError("the job ended without a recovery")
            await asyncio.sleep(0.01)
    finally:
        if not store.get_job(job).state.terminal:
            controller.cancel(job, "bench over")
        await controller.stop()
        store.close()


def ray_death_to_recovery(folder: Path) -> tuple[float, float]:
    """(seconds from an island host actor's kill to the job's recovery starting with Ray's
    death report, the same without it: the gRPC errors of the steps alone)."""
    import ray

    from pathways_lite.workers.ray_cluster import LocalRayCluster, connect
    from pathways_lite.workers.sim_host import SimHostActor

    state = tempfile.mkdtemp(prefix="plray-", dir="/tmp")
    cluster = LocalRayCluster(state, head_resources={}, num_cpus=2)
    cluster.start()
    try:
        connect(cluster.address, token_path=cluster.token_path)
        budget = budget_bytes()
        out = []
        for watch_ray in (True, False):
            actor_cls = ray.remote(max_concurrency=4)(SimHostActor)
            actors = [actor_cls.remote(f"island-r{i}", 0.02, budget) for i in range(2)]
            addresses = {
                f"island-r{i}": ray.get(a.address.remote(), timeout=60)
                for i, a in enumerate(actors)
            }
            out.append(asyncio.run(_death_run(actors, addresses, watch_ray, folder)))
            for a in actors:
                ray.kill(a)
        return out[0], out[1]
    finally:
        ray.shutdown()
        cluster.stop()
        shutil.rmtree(state, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 jobs on 16 islands, short load")
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--islands", type=int, default=None)
    parser.add_argument("--step-s", type=float, default=0.2)
    parser.add_argument("--load-seconds", type=float, default=10.0)
    parser.add_argument("--mean-steps", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--only-death", action="store_true", help="the Ray death figure only")
    args = parser.parse_args(argv)
    n_jobs = args.jobs or (200 if args.quick else 1000)
    n_islands = args.islands or (16 if args.quick else 64)
    if args.quick:
        args.load_seconds = min(args.load_seconds, 5.0)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    logging.basicConfig(level=logging.ERROR)
    # Ray prints its workers' deaths (the killed host actor) on stdout: keep stdout for the
    # figures alone.
    out, sys.stdout = sys.stdout, sys.stderr
    folder = Path(tempfile.mkdtemp(prefix="plscale-"))
    jobs = [(min(k, n_islands), s, p) for k, s, p in workload(n_jobs, args.seed, args.mean_steps)]
    if args.only_death:
        death_s, death_grpc_s = ray_death_to_recovery(folder)
        sys.stdout = out
        shutil.rmtree(folder, ignore_errors=True)
        print(json.dumps({"ray_death_to_recovery_s": death_s, "grpc_s": death_grpc_s}))
        return 0
    budget = budget_bytes()
    load_start = os.getloadavg()  # a shared machine's figures mean little without it
    results = {}
    for backfill in (True, False):
        hosts = SimHosts.start(n_islands, args.step_s, budget, folder)
        try:
            results[backfill] = asyncio.run(run_queue(hosts.addresses, jobs, backfill, folder))
        finally:
            hosts.stop()
    page_ms = jobs_page_ms(folder, 10_000)
    death_s, death_grpc_s = ray_death_to_recovery(folder)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import scale_load

    load = scale_load.run(folder, seconds=args.load_seconds)
    bf, strict = results[True], results[False]
    figures = {
        "jobs": n_jobs,
        "islands": n_islands,
        "decision_p50_ms": bf["decision_p50_ms"],
        "decision_p99_ms": bf["decision_p99_ms"],
        "decision_p99_ms_no_backfill": strict["decision_p99_ms"],
        "pass_p99_ms": bf["pass_p99_ms"],
        "pass_cpu_p50_ms": bf["pass_cpu_p50_ms"],
        "pass_cpu_p99_ms": bf["pass_cpu_p99_ms"],
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "idle_fraction": bf["idle_fraction"],
        "idle_fraction_no_backfill": strict["idle_fraction"],
        "mean_wait_s_backfill": bf["mean_wait_s"],
        "mean_wait_s_no_backfill": strict["mean_wait_s"],
        "wait_ratio": bf["mean_wait_s"] / strict["mean_wait_s"] if strict["mean_wait_s"] else 0,
        "makespan_s_backfill": bf["makespan_s"],
        "makespan_s_no_backfill": strict["makespan_s"],
        "reservation_overruns": bf["reservation_overruns"],
        "reservations": bf["reservations"],
        "backfills": bf["backfills"],
        "heads_delayed_by_backfill": bf["heads_delayed_by_backfill"],
        "succeeded": [bf["succeeded"], strict["succeeded"]],
        "jobs_page_ms": page_ms,
        "lost_events": load["lost_events"],
        "watched_updates": load["watched_updates"],
        "watch_batch_steps": load["watch_batch_steps"],
        "sse_events": load["sse_events"],
        "load_errors": load["load_errors"],
        "submit_p50_ms": load["submit_p50_ms"],
        "submit_p99_ms": load["submit_p99_ms"],
        "dispatch_steps_per_s_unloaded": load["dispatch_steps_per_s_unloaded"],
        "dispatch_steps_per_s_loaded": load["dispatch_steps_per_s_loaded"],
        "dispatch_under_load_ratio": load["dispatch_under_load_ratio"],
        "ray_death_to_recovery_s": death_s,
        "grpc_death_to_recovery_s": death_grpc_s,
    }
    sys.stdout = out
    shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"{n_jobs} jobs on {n_islands} simulated islands (step {args.step_s} s)")
        print(f"{'':28}{'backfill':>14}{'strict order':>14}")
        for key, label in (
            ("mean_wait_s", "mean queue wait (s)"),
            ("makespan_s", "makespan (s)"),
            ("decision_p50_ms", "decision p50 (ms)"),
            ("decision_p99_ms", "decision p99 (ms)"),
            ("pass_p99_ms", "pass alone p99 (ms)"),
            ("pass_cpu_p99_ms", "pass CPU time p99 (ms)"),
            ("idle_fraction", "idle fraction"),
            ("succeeded", "succeeded"),
        ):
            print(f"{label:28}{bf[key]:>14.3f}{strict[key]:>14.3f}")
        print(f"wait ratio backfill / strict: {figures['wait_ratio']:.3f}")
        print(
            f"reservation overruns: {bf['reservation_overruns']} of {bf['reservations']} heads "
            f"started > 1 s after their first reservation; heads delayed by a backfill: "
            f"{bf['heads_delayed_by_backfill']} ({bf['backfills']} backfills)"
        )
        print(f"jobs page with 10,000 finished jobs: {page_ms:.2f} ms")
        print(
            f"200 watchers + 100 submitters + 20 SSE clients: {load['lost_events']} lost of "
            f"{load['watched_updates']} watched updates; submit p50/p99 "
            f"{load['submit_p50_ms']:.0f}/{load['submit_p99_ms']:.0f} ms; dispatch "
            f"{load['dispatch_steps_per_s_loaded']:.0f} vs "
            f"{load['dispatch_steps_per_s_unloaded']:.0f} steps/s unloaded "
            f"(ratio {load['dispatch_under_load_ratio']:.2f}); SSE events received "
            f"{load['sse_events']}; load clients failed: {load['load_errors'] or 'none'}"
        )
        print(
            f"host actor killed -> recovery starts: {death_s:.3f} s with Ray's report, "
            f"{death_grpc_s:.3f} s from the gRPC errors alone"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
