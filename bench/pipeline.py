"""Pipeline parallelism across islands: S stages x M microbatches vs one island, in one run.

Baseline: the same model as a non-pipelined job on ONE island host with the whole global
batch. Ours: pipelines of S stages (one island host each, one replica), every schedule and
microbatch count asked for. Every island host is its own process with one CPU device and
one XLA thread, pinned with `taskset -c` to core k mod cores (bench/dp_scaling.py's hosts).

Equal CPU per island: where S exceeds the cores, up to share = ceil(S / cores) stage hosts
share a core, so the baseline of that S is measured at the same share: `share` copies of
the baseline job run at once on hosts pinned to one core, and the baseline's tokens/s is
their mean (a copy's tokens/s at 1/share of a core). With S <= cores the share is 1: one
baseline host alone on its core. Each run reports the share and the baseline it is
compared with.
The controller side is this process (the Dispatcher and `palm_program`, over gRPC).

A second baseline separates pipelining from microbatching: on a CPU a smaller batch can run
faster per token (palm-small's logits at 64 x 64 tokens are 4096 x 8192 floats, 134 MB,
while a microbatch's stay nearer the caches), so a pipeline can beat S x the whole-batch
baseline without any pipelining merit. `efficiency_vs_microbatch` divides by S x the tokens/s
of the same non-pipelined island at the microbatch's batch (global batch / M, one update per
microbatch: a slightly pessimistic baseline, it applies the optimizer M times per global
batch) x (1 - theoretical bubble). Both baselines are measured again right before each
(S, M) pair of runs, at the same CPU share; the machine's load average (`os.getloadavg()`)
is recorded beside every figure (a shared machine: compare figures of one run only).

Per run, from the hosts' own step reports after warm-up (medians over steps):
- tokens/s; efficiency = tokens/s / (S x baseline tokens/s x (1 - theoretical bubble)), and
  the same against the microbatch-sized baseline;
- the measured bubble: the stages' mean share of their schedule time spent waiting for a
  neighbour, beside the theoretical (S - 1) / (M + S - 1);
- the activation and activation-gradient bytes the stages sent per step, beside the
  analytic 2 (S - 1) x B x T x D x 4 bytes;
- the peak stashed bytes (max over stages: the forwards' residuals, or with `--recompute on`
  the stage inputs) of 1F1B vs GPipe.

Run (the defaults are the issue's: palm-small, global batch 64 x 64, S in {2, 4}, M in
{4, 8, 16}, both schedules): .venv/bin/python bench/pipeline.py --json
     [--preset palm-small --batch 64 --stages 2,4 --microbatches 4,8,16
      --schedules 1f1b,gpipe --recompute off|on|both --steps 6 --warmup 2]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dp_scaling import spawn  # noqa: E402  (the pinned one-device host processes)

logger = logging.getLogger(__name__)

SEQ = 64


@dataclasses.dataclass
class Run:
    stages: int
    microbatches: int
    schedule: str
    tokens_per_s: float
    bubble_measured: float
    bubble_theory: float
    stage_bytes_per_step: int
    stage_bytes_analytic: int
    peak_stash_bytes: int
    efficiency_vs_ideal: float = 0.0
    # Stage hosts per core (the baseline is measured at the same share) and its tokens/s.
    cpu_share: int = 1
    baseline_tokens_per_s: float = 0.0
    # The non-pipelined island at the microbatch's batch (global batch / M), same share.
    microbatch_baseline_tokens_per_s: float = 0.0
    efficiency_vs_microbatch: float = 0.0
    # os.getloadavg() when the run ended (1, 5, 15 minutes).
    load_avg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    # The stages ran the forward again in the backward (pipeline.recompute).
    recompute: bool = False


def job_spec(
    args,
    islands: int,
    stages: int = 0,
    microbatches: int = 0,
    schedule: str = "",
    batch: int = 0,
    recompute: bool = False,
):
    from pathways_lite.v1 import controller_pb2

    spec = controller_pb2.JobSpec(
        name=f"pipe-bench-{stages}-{microbatches}-{schedule or 'none'}",
        islands=islands,
        devices_per_island=1,
        mesh=controller_pb2.JobSpec.Mesh(data=1, model=1),
        train=controller_pb2.JobSpec.Train(
            steps=args.steps, global_batch=batch or args.batch, seq_len=SEQ, seed=0, digest_every=0
        ),
        data=controller_pb2.JobSpec.Data(source="stdlib", vocab_size=1024, max_bytes=1_000_000),
    )
    spec.model.preset = args.preset
    if args.layers:
        spec.model.overrides.update({"n_layers": args.layers})
    if stages:
        spec.pipeline.stages = stages
        spec.pipeline.microbatches = microbatches
        spec.pipeline.schedule = schedule
        spec.pipeline.recompute = recompute
    return spec


async def run_job(addresses: list[str], spec, warmup: int, tag: str):
    from pathways_lite.controller.dispatch import Dispatcher
    from pathways_lite.controller.islands import Island, connect_host
    from pathways_lite.controller.resolved import palm_program

    @dataclasses.dataclass
    class Record:
        id: str
        spec: object
        generation: int = 0

    islands = [Island(f"i{k}", [await connect_host(a)]) for k, a in enumerate(addresses)]
    try:
        program = palm_program(Record(f"pbench-{tag}", spec))
        dispatcher = Dispatcher(epoch=int(time.time() * 1000) % (1 << 40), window=2)
        await dispatcher.load(program, islands)
        reports = []
        await dispatcher.run(program, islands, on_step=reports.append)
        await dispatcher.unload(program.job_id, islands)
    finally:
        for island in islands:
            await island.close()
    return reports[warmup:], program


async def baseline(args, addresses: list[str], batch: int = 0) -> float:
    """Tokens/s of the non-pipelined job (global batch `batch`, default the run's) on one
    island, `len(addresses)` copies of it running at once on hosts that share one core (each
    copy at that share of the core): the mean."""
    batch = batch or args.batch
    runs = await asyncio.gather(
        *(
            run_job(
                [address],
                job_spec(args, 1, batch=batch),
                args.warmup,
                f"base{len(addresses)}-b{batch}-{k}",
            )
            for k, address in enumerate(addresses)
        )
    )
    steps = [statistics.median(r.hosts[0].reply.step_s for r in reports) for reports, _ in runs]
    return statistics.mean(batch * SEQ / s for s in steps)


def measure(reports, stages, microbatches, schedule, batch, d_model) -> Run:
    step_s = statistics.median(max(h.reply.step_s for h in r.hosts) for r in reports)
    bubble = statistics.median(
        statistics.mean(h.reply.pipeline_wait_s / max(h.reply.pipeline_s, 1e-9) for h in r.hosts)
        for r in reports
    )
    sent = int(statistics.median(sum(h.reply.stage_bytes_sent for h in r.hosts) for r in reports))
    peak = max(h.reply.peak_stash_bytes for r in reports for h in r.hosts)
    return Run(
        stages=stages,
        microbatches=microbatches,
        schedule=schedule,
        tokens_per_s=batch * SEQ / step_s,
        bubble_measured=bubble,
        bubble_theory=(stages - 1) / (microbatches + stages - 1),
        stage_bytes_per_step=sent,
        stage_bytes_analytic=2 * (stages - 1) * batch * SEQ * d_model * 4,
        peak_stash_bytes=peak,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="palm-small")
    parser.add_argument("--layers", type=int, default=0, help="override n_layers (0: preset)")
    parser.add_argument("--batch", type=int, default=64, help="global batch (seq_len 64)")
    parser.add_argument("--stages", default="2,4")
    parser.add_argument("--microbatches", default="4,8,16")
    parser.add_argument("--schedules", default="1f1b,gpipe")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--recompute",
        choices=("off", "on", "both"),
        default="off",
        help="pipeline.recompute of the pipelines (both: each layout twice, side by side)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--no-microbatch-baseline",
        dest="microbatch_baseline",
        action="store_false",
        help="skip the baseline at the microbatch's batch (global batch / M)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from pathways_lite.controller import spec as spec_lib

    stage_counts = [int(s) for s in args.stages.split(",")]
    mb_counts = [int(m) for m in args.microbatches.split(",")]
    schedules = args.schedules.split(",")
    recomputes = {"off": (False,), "on": (True,), "both": (False, True)}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = max(1, cores or 1)
    d_model = spec_lib.to_configs(job_spec(args, 1)).model.d_model
    procs, addresses = [], []
    runs: list[Run] = []
    try:
        for k in range(max(stage_counts)):
            proc, address = spawn("host", k % cores, f"i{k}")
            procs.append(proc)
            addresses.append(address)
        baselines: dict[int, float] = {}  # the first whole-batch baseline, by hosts per core
        for stages in stage_counts:
            share = -(-stages // cores)
            # Hosts 0, cores, 2 cores... are all pinned to core 0.
            on_core0 = addresses[0 : share * cores : cores]
            for mb in mb_counts:
                # Measured again right before each (S, M) pair of runs: on a shared machine
                # the load moves within minutes, and a baseline taken once at a busier moment
                # made later pipelines "beat" S x baseline (efficiency 1.1-2.9 seen).
                base_tps = asyncio.run(baseline(args, on_core0))
                baselines.setdefault(share, base_tps)
                mb_tps = 0.0
                if args.microbatch_baseline:
                    mb_tps = asyncio.run(baseline(args, on_core0, args.batch // mb))
                logger.warning(
                    "baselines at 1/%d of a core before S=%d M=%d: %.0f tokens/s (batch %d), "
                    "%.0f tokens/s (batch %d); load %s",
                    share,
                    stages,
                    mb,
                    base_tps,
                    args.batch,
                    mb_tps,
                    args.batch // mb,
                    os.getloadavg(),
                )
                for schedule, recompute in (
                    (s, r) for s in schedules for r in recomputes[args.recompute]
                ):
                    spec = job_spec(args, stages, stages, mb, schedule, recompute=recompute)
                    tag = f"{stages}-{mb}-{schedule}{'-r' if recompute else ''}"
                    reports, _ = asyncio.run(run_job(addresses[:stages], spec, args.warmup, tag))
                    run = measure(reports, stages, mb, schedule, args.batch, d_model)
                    run.recompute = recompute
                    ideal = stages * (1 - run.bubble_theory)
                    run.efficiency_vs_ideal = run.tokens_per_s / (ideal * base_tps)
                    run.cpu_share, run.baseline_tokens_per_s = share, base_tps
                    run.microbatch_baseline_tokens_per_s = mb_tps
                    if mb_tps:
                        run.efficiency_vs_microbatch = run.tokens_per_s / (ideal * mb_tps)
                    run.load_avg = tuple(round(x, 2) for x in os.getloadavg())
                    logger.warning("%s", run)
                    runs.append(run)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    ratios = []
    for stages in stage_counts:
        for mb in mb_counts:
            for recompute in (False, True):
                by = {
                    r.schedule: r
                    for r in runs
                    if (r.stages, r.microbatches, r.recompute) == (stages, mb, recompute)
                }
                if "1f1b" in by and "gpipe" in by and by["gpipe"].peak_stash_bytes:
                    ratios.append(by["1f1b"].peak_stash_bytes / by["gpipe"].peak_stash_bytes)
    peak_ratio = max(ratios) if ratios else None
    if args.json:
        out = {
            "baseline_tokens_per_s": baselines.get(1, next(iter(baselines.values()))),
            "runs": [
                {
                    k: getattr(r, k)
                    for k in (
                        "stages",
                        "microbatches",
                        "schedule",
                        "recompute",
                        "tokens_per_s",
                        "efficiency_vs_ideal",
                        "bubble_measured",
                        "bubble_theory",
                        "stage_bytes_per_step",
                        "stage_bytes_analytic",
                        "peak_stash_bytes",
                        "cpu_share",
                        "baseline_tokens_per_s",
                        "microbatch_baseline_tokens_per_s",
                        "efficiency_vs_microbatch",
                        "load_avg",
                    )
                }
                for r in runs
            ],
            "peak_activation_ratio_1f1b_to_gpipe": peak_ratio,
            "cores": cores,
            "load_avg_end": [round(x, 2) for x in os.getloadavg()],
        }
        print(json.dumps(out, indent=1))
        return 0
    print(
        f"{args.preset}, global batch {args.batch} x seq {SEQ}, {args.steps} steps "
        f"({args.warmup} warm-up); each island host: 1 CPU device, 1 XLA thread, core k mod "
        f"{cores}"
    )
    for share, tps in sorted(baselines.items()):
        print(f"baseline (1 island, not pipelined) at 1/{share} of a core: {tps:10,.0f} tokens/s")
    for r in runs:
        print(
            f"S={r.stages} M={r.microbatches:2d} {r.schedule:5s}"
            f"{' recompute' if r.recompute else ''}: {r.tokens_per_s:10,.0f} "
            f"tokens/s, efficiency {r.efficiency_vs_ideal:.2f} (goal >= 0.95 for S=2, M >= 2S), "
            f"bubble {r.bubble_measured:.2f} measured vs {r.bubble_theory:.2f} theory, "
            f"stage bytes/step {r.stage_bytes_per_step:,} vs analytic "
            f"{r.stage_bytes_analytic:,}, peak stash {r.peak_stash_bytes:,} B, "
            f"{r.cpu_share} stage host(s) per core; vs the microbatch-sized baseline "
            f"({r.microbatch_baseline_tokens_per_s:,.0f} tokens/s): "
            f"{r.efficiency_vs_microbatch:.2f}; load {r.load_avg}"
        )
    if peak_ratio is not None:
        print(f"peak stashed activations 1F1B / GPipe (worst S, M): {peak_ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
