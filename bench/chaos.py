"""Goodput under chaos: random SIGKILLs of island hosts (and once the controller) mid-training.

A local cluster (Ray on loopback, islands a, b, c of 1 host x 2 CPU devices, the controller as
its own process beside a standby controller) trains palm-tiny data parallel on `--islands`
islands while the island hosts of the job are SIGKILLed at random, seeded times (`--seed`: a
run repeats), and once, half way, the controller (killed; its standby takes over the state
dir, or with `--no-standby` a new controller starts cold; off with `--no-controller-kill`).
The next kill comes only after the previous recovery's first completed step, `--interval-s`
later on average (exponential gaps of at least 1 s, scaled so that their mean is exactly
`--interval-s`).

The reference (the losses the chaos job must reproduce bitwise) is the same job, uninterrupted,
run **beside** the chaos job on a cluster of its own (its own Ray, controller and islands of
the same layout: no kill touches it), from the chaos job's start to its end: a first run takes
about its kills' time, not twice it (~28 min with the reference first). The two share the
machine's cores, so the reference is paused (SIGSTOP of its island hosts, `ReferencePause`)
while the chaos job starts and from each kill to `SETTLE_S` after the recovery's first step:
recoveries (and the warm spares that start after them) are measured without its load, which
otherwise turned some into cold starts of 3-6 s. Goodput then counts each step at the solo
step time of its conditions: the chaos job's clear steps with the reference paused (its start)
for the steps run while it was, its clear steps beside the running reference
(`beside_step_s`) for the others. Without `--steps` the chaos job is open-ended:
it is cancelled once its last kill's recovery has settled (`SETTLE_S`) and `TAIL_S` more
seconds of steps ran (`job_state` "cancelled", `job_ended_as_asked`), and the reference
once it has the chaos job's steps (a step's loss does not depend on the job's total: its
learning-rate schedule has no horizon and each step's batch is a function of the step).

`--reference-first` runs the reference alone before the chaos job instead (the chaos job then
has the machine to itself): sized to the drawn gaps at the reference's step time (its steps
300-600; it is submitted long and cancelled once it has the steps needed), and cached
(bench/chaos_reference.py: keyed by the spec, the island layout, the versions, the CPU and a
hash of the sources; `--no-reference-cache` runs it anyway), so that a rerun with nothing
changed skips it. The output says where the reference came from (`reference`,
`reference_beside`, `reference_from_cache`).

Measured per kill, from the job's metrics and events in the controller's database:
`kill_to_next_step_s` (the SIGKILL to the end of the next completed step, everything
included: detection, restart, compile, transfer), the steps lost (steps recorded when the
host died minus the step the job resumed at; 0 with a peer restore), and whether the job
resumed from a surviving replica or from its checkpoint. At the end: goodput (steps kept x
the solo step time / the chaos run's wall time from its first step to its last), losses bitwise
those of the reference, every step's metrics exactly once.

The solo step time is measured in this run, on the chaos job itself: its mean wall time per
step (checkpoints included) over the steps clear of every kill, i.e. from `SETTLE_S` after its
first step (its warm spares' start-up) and outside each kill's window (the kill to its
recovery's first step, plus `SETTLE_S` for the new warm spares). The first kill waits until
`--solo-s` seconds of such steps have run, so there are always some. A reference's step time
(cached: another time, another load) would bias goodput; it is used only when the run has too
few clear steps (`--solo-s 0` and kills close together), and `solo_step_source` says which.

    .venv/bin/python bench/chaos.py [--islands 2] [--kills 20] [--interval-s 30] [--json]
    .venv/bin/python bench/chaos.py --kills 2 --interval-s 8 --json   # a short check
    .venv/bin/python bench/chaos.py --reference-first [--no-reference-cache]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import chaos_reference

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".cache" / "jax"))
os.environ.setdefault("PATHWAYS_LITE_CACHE", str(REPO / ".cache" / "pathways_lite"))

SPEC = """
name: {name}
model: {{preset: palm-tiny}}
islands: {islands}
devices_per_island: 2
mesh: {{data: 2, model: 1}}
train: {{steps: {steps}, global_batch: {batch}, seq_len: 64, seed: 0, checkpoint_every: {every}}}
data: {{source: stdlib, vocab_size: 1024, max_bytes: 1000000}}
"""


def wait_for(predicate, timeout_s: float, what: str, every_s: float = 0.02):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")


# What the run's length allows per kill: the next kill waits for the recovery's first step.
RECOVERY_ALLOWANCE_S = 2.0
# Seconds of clear steps after the last recovery has settled (an open-ended run stops then).
TAIL_S = 15.0
CONTROLLER_ALLOWANCE_S = 10.0
# Steps this long after the job's first step, or after a recovery's first step, are not counted
# for the solo step time: the island's warm spares start (SPARE_DELAY_S after the load, then
# JAX and the job's compile, at nice 19) and share the 2 cores with the steps meanwhile.
SETTLE_S = 10.0
# Fewer clear steps than this and the solo step time falls back to the reference's.
MIN_SOLO_STEPS = 20
ISLAND_SPECS = ["a:1:2", "b:1:2", "c:1:2"]
# The reference sizes the run from its steps SIZE_FROM..SIZE_TO (after the warm spares'
# start-up) with a SIZE_MARGIN (a run sized short would end before its last kills);
# submitted MAX_STEPS long, it is cancelled once it has the steps the chaos run needs.
SIZE_FROM, SIZE_TO = 300, 600
SIZE_MARGIN = 1.05
MAX_STEPS = 100_000


def draw_schedule(rng: random.Random, n: int, interval_s: float, islands: int) -> list:
    """n (gap in seconds, island index) draws: exponential gaps (at least 1 s), scaled so that
    their mean is `interval_s` exactly (a run of n kills lasts n intervals, whatever the seed),
    and uniformly drawn islands."""
    draws = [(rng.expovariate(1.0 / interval_s), rng.randrange(islands)) for _ in range(n)]
    scale = interval_s * n / max(sum(g for g, _ in draws), 1e-9)
    return [(max(1.0, g * scale), island) for g, island in draws]


def undisturbed_step_s(
    times_us: list[int],
    quiet_from_us: int,
    kills: list[tuple[int, int]],
    settle_s: float,
    paused: list[tuple[int, int]] | None = None,
    in_pause: bool = True,
) -> tuple[float | None, int]:
    """The mean wall time per step over the gaps between consecutive steps clear of any kill.

    Args:
        times_us: when each step was recorded, in step order.
        quiet_from_us: gaps that begin earlier are not counted (the job's start-up).
        kills: (the kill, its recovery's first step) times; a gap that overlaps a kill's
            window, from the kill to `settle_s` after that step, is not counted.
        settle_s: how long a recovery disturbs the steps after its first one.
        paused: (start, end) times the reference beside was paused; with them, only the gaps
            inside one (`in_pause`) or only those clear of all of them are counted.

    Returns:
        (seconds per step, or None without a clear gap; how many gaps were counted).
    """
    windows = [(kill, recovered + int(settle_s * 1e6)) for kill, recovered in kills]
    gaps = [
        b - a
        for a, b in itertools.pairwise(times_us)
        if a >= quiet_from_us
        and not any(a < end and b > kill for kill, end in windows)
        and (paused is None or (within(a, b, paused) if in_pause else not overlaps(a, b, paused)))
    ]
    return (sum(gaps) / len(gaps) / 1e6 if gaps else None, len(gaps))


def within(a: int, b: int, intervals: list[tuple[int, int]]) -> bool:
    """Whether [a, b] lies inside one of `intervals`."""
    return any(start <= a and b <= end for start, end in intervals)


def overlaps(a: int, b: int, intervals: list[tuple[int, int]]) -> bool:
    """Whether (a, b) overlaps one of `intervals`."""
    return any(a < end and b > start for start, end in intervals)


def solo_step_time(
    times_us: list[int],
    kills: list[tuple[int, int]],
    ref_step_s: float,
    ref_source: str,
    paused: list[tuple[int, int]] | None = None,
    in_pause: bool = True,
) -> tuple[float, str, int]:
    """Goodput's solo step time: (seconds per step, its source, the steps it was measured on).

    The chaos job's own steps clear of its start-up and of every kill's window
    (`undisturbed_step_s` with `SETTLE_S`; with `paused`, those inside the reference's
    pauses or, `in_pause` False, those beside it running), source "chaos_run"; with fewer
    than `MIN_SOLO_STEPS` of them, `ref_step_s` under `ref_source`."""
    if not times_us:
        return ref_step_s, ref_source, 0
    step_s, counted = undisturbed_step_s(
        times_us, times_us[0] + int(SETTLE_S * 1e6), kills, SETTLE_S, paused, in_pause
    )
    if step_s is None or counted < MIN_SOLO_STEPS:
        return ref_step_s, ref_source, counted
    return step_s, "chaos_run", counted


def ideal_s(
    times_us: list[int], paused: list[tuple[int, int]], alone_s: float, beside_s: float
) -> float:
    """The time the run's steps take undisturbed: `alone_s` per step inside the reference's
    pauses (or across a pause's edge: the smaller cost, so goodput is not flattered), else
    `beside_s` per step."""
    return sum(
        alone_s if overlaps(a, b, paused) else beside_s for a, b in itertools.pairwise(times_us)
    )


class ReferencePause:
    """The reference's island hosts stopped (SIGSTOP) while the chaos job starts and recovers:
    its load would otherwise be measured as part of each recovery (cold starts of warm spares
    that could not warm up at nice 19 beside two jobs' steps). Its gRPC deadlines (a slice
    600 s, an exchange 120 s) are far longer than a pause."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = [p for p in pids if p > 0]
        self.intervals: list[tuple[int, int]] = []  # (start, end) times, microseconds
        self._since: int | None = None

    def stop(self) -> None:
        if self._since is None:
            for pid in self.pids:
                os.kill(pid, signal.SIGSTOP)
            self._since = time.time_ns() // 1000

    def resume(self) -> None:
        if self._since is not None:
            for pid in self.pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            self.intervals.append((self._since, time.time_ns() // 1000))
            self._since = None


def median_step_s(metrics) -> float:
    """The median time between consecutive recorded steps (recoveries are the outliers)."""
    gaps = sorted(b.time_us - a.time_us for a, b in itertools.pairwise(metrics))
    return gaps[len(gaps) // 2] / 1e6 if gaps else 0.0


def restore_after(store, job_id: str, after_us: int):
    """The job's first restore (or resume from step 0) event after `after_us`."""
    return next(
        (
            e
            for e in store.events(job_id)
            if e.kind in ("restore", "resume") and e.time_us >= after_us
        ),
        None,
    )


def first_step_after(store, job_id: str, after_us: int):
    return next((m for m in store.metrics(job_id) if m.time_us > after_us), None)


def resumed_at(event) -> int:
    """The step a restore event resumed at ("resume" events: step 0)."""
    if event.kind == "resume":
        return 0
    return int(event.message.split("step ")[1].split()[0])


def reference_first(args, client, store, spec, chaos_s: float) -> tuple:
    """`--reference-first`: the reference alone before the chaos job, from the cache when
    nothing it depends on changed (bench/chaos_reference.py), else run now and kept.

    Without `--steps` it is submitted long, timed over its steps SIZE_FROM..SIZE_TO (the warm
    spares' start-up is over by then) to size the chaos job to `chaos_s` seconds of steps,
    and cancelled once past them (a step's loss does not depend on the total).

    Returns:
        (the chaos job's steps, the reference's losses over them, its wall time per step, its
        median step time, the step time the job was sized with or None, where it came from).
    """

    key_fields = chaos_reference.determinants(
        SPEC.format(
            name="-", islands=args.islands, steps="-", batch=2 * args.islands, every=args.every
        ),
        ISLAND_SPECS,
    )
    cache_file = chaos_reference.cache_path(key_fields)
    cached = None if args.no_reference_cache else chaos_reference.load(cache_file)
    steps = args.steps
    if not steps and cached is not None:
        steps = int(SIZE_MARGIN * chaos_s / cached["solo_step_s"])
    if cached is not None and len(cached["losses"]) >= steps:
        where = f"cache {cache_file.name} (run {cached['created']}, load {cached['loadavg']})"
        step_s, median = cached["solo_step_s"], cached["step_s_median"]
        return steps, cached["losses"][:steps], step_s, median, None, where
    ref = client.submit(spec("chaos-ref", args.steps or MAX_STEPS)).id
    sizing_step_s = None
    if not args.steps:
        wait_for(lambda: store.steps_completed(ref) >= SIZE_TO, 900, "sizing steps", 0.5)
        rows = store.metrics(ref)[SIZE_FROM:SIZE_TO]
        sizing_step_s = (rows[-1].time_us - rows[0].time_us) / 1e6 / (len(rows) - 1)
        steps = int(SIZE_MARGIN * chaos_s / sizing_step_s)
    ref_metrics = finish_reference(client, store, ref, steps, fixed=bool(args.steps))
    losses, step_s, median = reference_figures(ref_metrics, steps)
    where = "run now"
    if not args.no_reference_cache:
        chaos_reference.save(
            cache_file,
            key_fields,
            [m.loss for m in ref_metrics],
            solo_step_s=step_s,
            step_s_median=median,
            loadavg=[round(x, 2) for x in os.getloadavg()],
        )
        where += f" (kept in the cache as {cache_file.name})"
    return steps, losses, step_s, median, sizing_step_s, where


def finish_reference(client, store, ref: str, steps: int, fixed: bool) -> list:
    """The reference's metrics once it has `steps` steps and has ended: it succeeds when its
    length was `fixed` (--steps), else it is cancelled here (a step's loss does not depend on
    the job's total: bench/chaos_reference.py)."""
    from pathways_lite.client import state_name

    wait_for(lambda: store.steps_completed(ref) >= steps, 3600, "the reference", 0.5)
    if not fixed:
        client.cancel(ref, reason="the reference has the steps the chaos run needs")
    final = client.wait(ref, timeout_s=3600)
    assert state_name(final.state) == ("succeeded" if fixed else "cancelled"), final.message
    return store.metrics(ref)


def reference_figures(metrics, steps: int) -> tuple[list[float], float, float]:
    """A reference's losses over its first `steps` steps, its wall time per step over them
    (checkpoints included) and their median step time.

    Raises:
        AssertionError: the reference does not have steps 0..steps-1 exactly once.
    """
    assert [m.step for m in metrics[:steps]] == list(range(steps)), "the reference's steps"
    first, last = metrics[0], metrics[steps - 1]
    step_s = (last.time_us - first.time_us) / 1e6 / max(steps - 1, 1)
    return [m.loss for m in metrics[:steps]], step_s, median_step_s(metrics[:steps])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--islands", type=int, default=2, choices=(2, 3))
    p.add_argument("--kills", type=int, default=20, help="island host kills")
    p.add_argument("--interval-s", type=float, default=30.0, help="mean seconds between kills")
    p.add_argument(
        "--steps",
        type=int,
        default=0,
        help="job steps (0: the chaos job runs until its last kill's recovery has settled)",
    )
    p.add_argument("--every", type=int, default=50, help="checkpoint every N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--solo-s",
        type=float,
        default=20.0,
        help="seconds of undisturbed steps (after the job's start-up) before the first kill: "
        "the solo step time goodput uses is measured on them and on the other clear steps",
    )
    p.add_argument("--no-controller-kill", action="store_true")
    p.add_argument(
        "--reference-first",
        action="store_true",
        help="run the uninterrupted reference alone before the chaos job (its losses cached "
        "for reruns) instead of beside it on a cluster of its own: the chaos job then has the "
        "machine to itself, and a first run takes about twice as long",
    )
    p.add_argument(
        "--no-reference-cache",
        action="store_true",
        help="with --reference-first: run the reference even if cached (and do not cache it)",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the state dirs (logs)")
    p.add_argument(
        "--no-standby",
        action="store_true",
        help="no standby controller: the controller kill is followed by a cold start (a new "
        "process imports everything) instead of the standby's takeover",
    )
    args = p.parse_args(argv)

    from pathways_lite.client import ControllerClient, state_name
    from pathways_lite.controller.store import DB_NAME, JobStore
    from pathways_lite.local import LocalCluster
    from pathways_lite.spec import load_spec_text

    # A timeout's SIGTERM unwinds through the finally below: the clusters go down with us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rng = random.Random(args.seed)
    progress = sys.stderr if args.json else sys.stdout  # stdout stays one JSON object
    batch = 2 * args.islands
    beside = not args.reference_first
    started = time.monotonic()
    load_start = [round(x, 2) for x in os.getloadavg()]
    state_dir = Path(tempfile.mkdtemp(prefix="plch-", dir="/tmp"))
    cluster = LocalCluster(
        state_dir=state_dir, island_specs=ISLAND_SPECS, standby_controller=not args.no_standby
    )
    # The reference beside the chaos job: the same job on a cluster of its own (its own Ray,
    # controller and islands of the same layout), so no kill, not even the controller's,
    # touches it.
    ref_dir = Path(tempfile.mkdtemp(prefix="plch-ref-", dir="/tmp")) if beside else None
    ref_cluster = (
        LocalCluster(state_dir=ref_dir, island_specs=ISLAND_SPECS[: args.islands])
        if beside
        else None
    )
    kills: list[dict] = []
    controller: dict = {}
    result: dict = {}
    pause: ReferencePause | None = None
    try:

        def spec(name: str, steps: int) -> object:
            text = SPEC.format(
                name=name, islands=args.islands, steps=steps, batch=batch, every=args.every
            )
            return load_spec_text(text)

        if ref_cluster is not None:
            ref_cluster.start()
            ref_store = JobStore(ref_dir / DB_NAME)
            ref_client = ControllerClient(ref_dir)
            ref = ref_client.submit(spec("chaos-ref", args.steps or MAX_STEPS)).id
            print("reference: beside, on a cluster of its own", file=progress, flush=True)
        cluster.start()
        store = JobStore(state_dir / DB_NAME)
        client = ControllerClient(state_dir)

        # The kills, drawn ahead from the seed: when (gaps) and which island's host.
        controller_kill_at = None if args.no_controller_kill else max(1, args.kills // 2)
        schedule = draw_schedule(
            rng, args.kills + (controller_kill_at is not None), args.interval_s, args.islands
        )
        steps, sizing_step_s, ref_from_cache = args.steps, None, False
        if not beside:
            # Seconds of steps for the schedule's gaps, a recovery per kill (the
            # controller's longer) and a tail (the chaos job's steps are no faster than the
            # reference's).
            chaos_s = sum(g for g, _ in schedule) + RECOVERY_ALLOWANCE_S * args.kills + TAIL_S
            chaos_s += CONTROLLER_ALLOWANCE_S if controller_kill_at is not None else 0.0
            chaos_s += SETTLE_S + args.solo_s  # the undisturbed steps before the first kill
            first = reference_first(args, client, store, spec, chaos_s)
            steps, ref_losses, ref_step_s, ref_step_s_median, sizing_step_s, reference = first
            ref_from_cache = reference.startswith("cache")
            print(f"reference: {reference}; {steps} steps", file=progress, flush=True)
            # Every island free first (a cancelled reference is still unloading for a
            # moment): the job goes where a restarted controller would place it again (the
            # lowest free islands), so the controller kill tests adoption, not a move.
            wait_for(lambda: not any(i.job_ids for i in client.islands()), 120, "free islands", 0.2)
        open_ended = not steps  # beside, without --steps: stopped after its last kill
        job = client.submit(spec("chaos", steps or MAX_STEPS)).id
        islands = list(wait_for(lambda: client.get(job).islands, 120, "placement"))
        wait_for(lambda: store.steps_completed(job) >= 5, 300, "the first steps")
        # The reference beside is paused while the chaos job starts (its solo segment) and
        # from each kill to SETTLE_S after the recovery's first step (ReferencePause).
        if ref_cluster is not None:
            pause = ReferencePause([int(h.pid) for i in ref_client.islands() for h in i.hosts])
            pause.stop()
        resume_at = None  # when the reference runs again after a recovery
        first_step_us = store.metrics(job)[0].time_us
        # The solo segment: --solo-s of steps past the start-up before the first kill.
        solo_until = first_step_us / 1e6 + SETTLE_S + args.solo_s
        recovered: list[tuple[int, int]] = []  # (kill, its recovery's first step) times
        for n, (gap, island_index) in enumerate(schedule):
            target = islands[island_index]
            kill_at = time.time() + (max(gap, solo_until - time.time()) if n == 0 else gap)
            if pause is not None and resume_at is not None and resume_at < kill_at:
                time.sleep(max(0.0, resume_at - time.time()))
                pause.resume()
            time.sleep(max(0.0, kill_at - time.time()))
            if steps and store.steps_completed(job) >= steps - 2:
                break
            if pause is not None:
                pause.stop()
            done_before = store.steps_completed(job)
            if controller_kill_at is not None and n == controller_kill_at:
                client.close()
                os.kill(cluster.controller_pid, signal.SIGKILL)
                killed_us = time.time_ns() // 1000
                cluster.restart_controller()
                client = ControllerClient(state_dir)
                what = "controller"
            else:
                pid = next(int(i.hosts[0].pid) for i in client.islands() if i.id == target)
                os.kill(pid, signal.SIGKILL)
                killed_us = time.time_ns() // 1000
                what = f"island {target} host 0"
            restore = wait_for(lambda t=killed_us: restore_after(store, job, t), 600, "a restore")
            # The first step completed after the restore (steps finished before the kill may
            # be recorded after it).
            step = wait_for(
                lambda t=restore.time_us: first_step_after(store, job, t), 600, "a step"
            )
            recovered.append((killed_us, step.time_us))
            resume_at = step.time_us / 1e6 + SETTLE_S
            record = {
                "what": what,
                "kill_to_next_step_s": round((step.time_us - killed_us) / 1e6, 3),
                "steps_lost": max(0, done_before - resumed_at(restore)),
                "from": "replica"
                if "surviving island" in restore.message
                else "kept state"  # a controller restart: the islands kept theirs
                if "islands kept" in restore.message
                else "checkpoint",
                "restore": restore.message,
            }
            if what == "controller":
                controller = record
            else:
                kills.append(record)
            # Progress on a long run (stderr with --json: stdout stays one JSON object).
            print(
                f"{what:<20} next step after {record['kill_to_next_step_s']:6.2f} s, "
                f"{record['steps_lost']} lost, from {record['from']} "
                f"(load {os.getloadavg()[0]:.2f})",
                file=progress,
                flush=True,
            )
        if pause is not None:
            time.sleep(max(0.0, (resume_at or 0.0) - time.time()))
            pause.resume()
        if open_ended:
            # Open-ended: stopped once the last recovery's new warm spare has started and a
            # tail of clear steps has run.
            time.sleep(TAIL_S if pause is not None else SETTLE_S + TAIL_S)
            client.cancel(job, reason="the chaos run's kills are done")
        final = client.wait(job, timeout_s=3600)
        # A cancelled job's steps in flight finish on the hosts and are recorded after its
        # state changed: read its metrics once it has left its islands.
        wait_for(lambda: not any(job in i.job_ids for i in client.islands()), 120, "unload", 0.2)
        metrics = store.metrics(job)
        steps = steps or (metrics[-1].step + 1 if metrics else 0)
        if ref_cluster is not None:
            # The reference has run beside all along; it stops once it has the chaos job's
            # steps (a step's loss does not depend on the total: bench/chaos_reference.py).
            ref_metrics = finish_reference(ref_client, ref_store, ref, steps, bool(args.steps))
            ref_losses, ref_step_s, ref_step_s_median = reference_figures(ref_metrics, steps)
            reference = f"run beside on a cluster of its own ({len(ref_metrics)} steps)"
            ref_client.close()
            ref_store.close()
        losses = [m.loss for m in metrics]
        chaos_wall_s = (metrics[-1].time_us - metrics[0].time_us) / 1e6
        ref_source = (
            "reference_beside"
            if beside
            else "reference_cache"
            if ref_from_cache
            else "reference_run"
        )
        times_us = [m.time_us for m in metrics]
        paused = pause.intervals if pause is not None else None
        solo_step_s, solo_source, solo_steps = solo_step_time(
            times_us, recovered, ref_step_s, ref_source, paused
        )
        ideal = (len(metrics) - 1) * solo_step_s
        beside_step_s, beside_steps = None, 0
        if paused is not None:
            # Steps beside the running reference count at its cost: their own clear steps'.
            beside_step_s, _, beside_steps = solo_step_time(
                times_us, recovered, solo_step_s, solo_source, paused, in_pause=False
            )
            ideal = ideal_s(times_us, paused, solo_step_s, beside_step_s)
        ended_as_asked = state_name(final.state) == ("cancelled" if open_ended else "succeeded")
        result = {
            "islands": args.islands,
            "steps": steps,
            "seed": args.seed,
            "kills": len(kills),
            "survived": sum(1 for k in kills if k["from"] == "replica") if ended_as_asked else 0,
            "steps_lost": sum(k["steps_lost"] for k in kills) + controller.get("steps_lost", 0),
            "goodput": round(ideal / chaos_wall_s, 3),
            # The solo step time goodput counts kept steps at, and where it was measured:
            # "chaos_run" (this job's steps clear of every kill: `solo_steps` of them), else
            # the reference's ("reference_beside", "reference_run" or "reference_cache").
            "solo_step_s": round(solo_step_s, 4),
            "solo_step_source": solo_source,
            "solo_steps": solo_steps,
            # With the reference beside: the chaos job's clear steps while it ran (goodput
            # counts the steps run beside it at this cost), and how long it was paused.
            "beside_step_s": None if beside_step_s is None else round(beside_step_s, 4),
            "beside_steps": beside_steps,
            "reference_paused_s": None
            if paused is None
            else round(sum(b - a for a, b in paused) / 1e6, 1),
            # The reference's wall time per step, and goodput had it been the solo step time.
            "ref_step_s": round(ref_step_s, 4),
            "goodput_at_ref_step_s": round((len(metrics) - 1) * ref_step_s / chaos_wall_s, 3),
            # The step time the job was sized with (the reference's steps 300-600; None: the
            # steps came from --steps or the cache).
            "probe_step_s": None if sizing_step_s is None else round(sizing_step_s, 4),
            "reference": reference,
            # The reference ran beside the chaos job (on its own cluster, same 2 cores: the
            # chaos job's steps and recoveries were measured under its load), else before it.
            "reference_beside": beside,
            "reference_from_cache": ref_from_cache,
            # The steps' own speed (medians: recoveries left out), the chaos job's against
            # the reference's: what the warm spares' start-ups cost the job's steps.
            "step_s_median": round(median_step_s(metrics), 4),
            "ref_step_s_median": round(ref_step_s_median, 4),
            "kill_to_next_step_s_max": max((k["kill_to_next_step_s"] for k in kills), default=0),
            "controller_kill_to_next_step_s": controller.get("kill_to_next_step_s"),
            "controller_steps_lost": controller.get("steps_lost"),
            "standby_controller": not args.no_standby,
            "bitwise_equal": losses == ref_losses,
            # The first step whose loss differs from the reference's (None: none does).
            "first_mismatch_step": next(
                (n for n, (x, y) in enumerate(zip(losses, ref_losses, strict=False)) if x != y),
                None if len(losses) == len(ref_losses) else min(len(losses), len(ref_losses)),
            ),
            "metrics_exactly_once": [m.step for m in metrics] == list(range(steps)),
            # "succeeded", or "cancelled" by this benchmark once its kills were done (an
            # open-ended run: without --steps, the reference beside).
            "job_state": state_name(final.state),
            "job_ended_as_asked": ended_as_asked,
            "loadavg_start": load_start,
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "bench_wall_s": round(time.monotonic() - started, 1),
            "per_kill_s": [k["kill_to_next_step_s"] for k in kills],
        }
        client.close()
        store.close()
    finally:
        if pause is not None:
            pause.resume()  # a stopped host would hold its cluster's stop up
        for each, folder in ((cluster, state_dir), (ref_cluster, ref_dir)):
            if each is None:
                continue
            each.down()
            if args.keep or not result.get("bitwise_equal", True):  # kept to look into
                print(f"state dir kept: {folder}", file=progress, flush=True)
            else:
                shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:<32} {value}")
        print("per kill:")
        for k in kills + ([controller] if controller else []):
            print(f"  {k['what']}: {k['restore']}")
    ok = result["bitwise_equal"] and result["metrics_exactly_once"]
    return 0 if ok and result["job_ended_as_asked"] else 1


if __name__ == "__main__":
    sys.exit(main())
