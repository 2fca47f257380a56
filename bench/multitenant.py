"""Multi-tenancy: two jobs of different sizes co-resident on the same islands vs each alone.

A local cluster (LocalCluster: a controller process and one Ray actor process per island,
one CPU device each) runs, one after the other:
1. the small job alone, 2. the large job alone (each job's solo rate: tokens per wall second
   of its steady state, from the hosts' execution logs, compile and first steps excluded);
3. both at once on the same islands with weights 1:2 (small:large);
4. the large job alone, 5. the small job alone again: each solo rate is the mean of its two
   runs, which bracket the shared run (the spread between them is printed: on a machine
   shared with other work it shows how far the numbers can be trusted).

Printed, all from the island hosts' own execution logs (ExecutionLog rpc), over the window in
which both jobs were resident and running (from the later first step to the earlier last one):
- efficiency = sum_j (tokens_j / solo_rate_j) / window (goal >= 0.97: Pathways reports no
  context-switch cost when programs fit);
- the device-time share of each job (sum of its steps' execution intervals over the sum of
  both) against its weight share, and the share error max_j |share_j - weight share_j|
  (goal <= 2%).
The scheduler shares by measured step time unless PATHWAYS_LITE_SHARE_BY=steps (then step
counts follow the weights and the time shares follow the step-time ratio instead).

Run: .venv/bin/python bench/multitenant.py [--steps 100 --islands 1] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import time

logger = logging.getLogger(__name__)

WARMUP_STEPS = 3


@dataclasses.dataclass(frozen=True)
class Entry:
    """One executed step as island 0's host logged it."""

    job_id: str
    step: int
    start_ns: int
    end_ns: int


def job_spec(name: str, *, islands: int, steps: int, d_model: int, weight: float, seed: int):
    from pathways_lite.spec import load_spec_text

    return load_spec_text(f"""
name: {name}
model: {{preset: palm-tiny, overrides: {{d_model: {d_model}}}}}
islands: {islands}
devices_per_island: 1
mesh: {{data: 1, model: 1}}
weight: {weight}
train: {{steps: {steps}, global_batch: 8, seq_len: 128, seed: {seed}}}
data: {{source: stdlib, vocab_size: 1024, max_bytes: 1000000}}
""")


def tokens_per_step(spec) -> int:
    return spec.train.global_batch * spec.train.seq_len


def host_entries(client, job_ids: set[str]) -> list[Entry]:
    """Island 0's execution log entries of `job_ids`, in island_seq order."""
    from pathways_lite.controller.auth import read_cluster_credential
    from pathways_lite.v1 import worker_pb2, worker_pb2_grpc
    from pathways_lite.workers.auth import host_channel

    credential = read_cluster_credential(client.state_dir)
    island = client.islands()[0]
    host = island.hosts[0]
    with host_channel(host.address or f"{host.node}:{host.port}", credential) as channel:
        reply = worker_pb2_grpc.WorkerServiceStub(channel).ExecutionLog(
            worker_pb2.ExecutionLogRequest(), timeout=60
        )
    return [
        Entry(e.job_id, e.step, e.start_unix_ns, e.end_unix_ns)
        for e in sorted(reply.entries, key=lambda e: e.island_seq)
        if e.job_id in job_ids
    ]


def solo_rate(client, spec, say=print) -> float:
    """Tokens per wall second of `spec` running alone, after its warm-up steps."""
    from pathways_lite.client import state_name

    job = client.wait(client.submit(spec).id, timeout_s=900)
    if state_name(job.state) != "succeeded":
        raise RuntimeError(f"solo job {job.id} ended {state_name(job.state)}: {job.message}")
    entries = [e for e in host_entries(client, {job.id}) if e.step >= WARMUP_STEPS]
    wall_s = (entries[-1].end_ns - entries[0].start_ns) / 1e9
    rate = len(entries) * tokens_per_step(spec) / wall_s
    step_s = sorted((e.end_ns - e.start_ns) / 1e9 for e in entries)[len(entries) // 2]
    say(
        f"  solo {spec.name}: {len(entries)} steps in {wall_s:.2f} s -> {rate:,.0f} tokens/s "
        f"(median step {step_s * 1e3:.1f} ms)",
        flush=True,
    )
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="steps of each job")
    parser.add_argument("--islands", type=int, default=1, help="islands (each job uses all)")
    parser.add_argument("--small", type=int, default=64, help="d_model of the small job")
    parser.add_argument("--large", type=int, default=128, help="d_model of the large job")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the figures as one JSON object (the text goes to stderr)",
    )
    args = parser.parse_args()
    # With --json the text goes to stderr and stdout holds the one JSON object.
    out_text = sys.stderr if args.json else sys.stdout

    def say(*parts: object, **kw: object) -> None:
        print(*parts, file=out_text, **kw)

    logging.basicConfig(level=logging.WARNING)

    from pathways_lite.client import ControllerClient, state_name
    from pathways_lite.local import LocalCluster

    small = job_spec(
        "small", islands=args.islands, steps=args.steps, d_model=args.small, weight=1, seed=1
    )
    large = job_spec(
        "large", islands=args.islands, steps=args.steps, d_model=args.large, weight=2, seed=2
    )
    share_by = os.environ.get("PATHWAYS_LITE_SHARE_BY", "time")
    state_dir = tempfile.mkdtemp(prefix="plbench-", dir="/tmp")
    cluster = LocalCluster(islands=args.islands, devices_per_island=1, state_dir=state_dir)
    started = time.monotonic()
    try:
        cluster.start()
        with ControllerClient(state_dir) as client:
            say(f"multitenant bench: {args.islands} island(s), share_by={share_by}", flush=True)
            before = {n: solo_rate(client, j, say) for n, j in (("small", small), ("large", large))}
            jobs = {s.name: client.submit(s) for s in (small, large)}
            ends = [client.wait(j.id, timeout_s=1800) for j in jobs.values()]
            for job in ends:
                if state_name(job.state) != "succeeded":
                    raise RuntimeError(f"{job.id} ended {state_name(job.state)}: {job.message}")
            ids = {j.id: name for name, j in jobs.items()}
            entries = [e for e in host_entries(client, set(ids)) if e.step >= WARMUP_STEPS]
            after = {n: solo_rate(client, j, say) for n, j in (("large", large), ("small", small))}
    finally:
        cluster.down()
        shutil.rmtree(state_dir, ignore_errors=True)

    # The window in which both were running: the later first step to the earlier last one.
    lo = max(min(e.start_ns for e in entries if e.job_id == j) for j in ids)
    hi = min(max(e.end_ns for e in entries if e.job_id == j) for j in ids)
    both = [e for e in entries if e.start_ns >= lo and e.end_ns <= hi]
    window_s = (hi - lo) / 1e9
    spec_of = {"small": small, "large": large}
    rates = {n: (before[n] + after[n]) / 2 for n in spec_of}
    spread = max(abs(before[n] - after[n]) / rates[n] for n in spec_of)
    weights = {"small": 1.0, "large": 2.0}
    busy = {name: 0.0 for name in spec_of}
    count = {name: 0 for name in spec_of}
    for e in both:
        busy[ids[e.job_id]] += (e.end_ns - e.start_ns) / 1e9
        count[ids[e.job_id]] += 1
    solo_s = sum(count[n] * tokens_per_step(spec_of[n]) / rates[n] for n in spec_of)
    efficiency = solo_s / window_s
    total_busy = sum(busy.values())
    error = 0.0
    shares = {}
    say(f"co-resident window: {window_s:.2f} s", flush=True)
    for name in spec_of:
        share = shares[name] = busy[name] / total_busy
        target = weights[name] / sum(weights.values())
        error = max(error, abs(share - target))
        say(
            f"  {name}: {count[name]} steps, device time {busy[name]:.2f} s, share "
            f"{share:.3f} (weight share {target:.3f}), steps share "
            f"{count[name] / max(1, len(both)):.3f}",
            flush=True,
        )
    say(f"efficiency: {efficiency:.3f} (goal >= 0.97; solo rates varied {spread:.0%})")
    say(f"share error: {error * 100:.1f}% (goal <= 2%)")
    say(f"bench wall time: {time.monotonic() - started:.0f} s")
    if args.json:
        out = {
            "efficiency": efficiency,
            "share_error": error,
            "shares": shares,
            "weight_shares": {n: w / sum(weights.values()) for n, w in weights.items()},
            "solo_tokens_per_s": rates,
            "solo_spread": spread,
            "co_resident_steps": count,
            "window_s": window_s,
            "share_by": share_by,
            "wall_s": time.monotonic() - started,
        }
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
