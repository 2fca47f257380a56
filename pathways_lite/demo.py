"""`pathways-lite demo`: two PaLM models of different sizes trained at once on shared islands.

What it runs, for real: a LocalCluster on this machine (Ray on loopback, two island hosts of
one CPU device each, the controller as its own process) and two jobs submitted over gRPC like
`pathways-lite submit` does: a small palm-tiny (weight 1) and a larger one (weight 2). Both
span both islands (data parallel: each island reads half of every global batch, the hosts
exchange gradients over gRPC), so both are resident on both islands at once; the controller's
scheduler hands out step slots by stride scheduling so that device time follows the weights,
and every island runs the two jobs' steps in the one order the controller assigned.

Shown while they run: one progress bar per job (the controller's WatchJob streams) and the
dashboard's URL (with the cluster's access token) when the controller serves one. After they
end: the interleaved per-island timeline and device-time shares, from the controller's record
of who ran when (as each island's host 0 timed its steps), and a sample from each model. The
controller unloads a job when it ends, so each sample is taken a few steps before the job's
end (the demo prints after how many steps). Then the cluster shuts down.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

logger = logging.getLogger(__name__)

DEMO_PROMPT = "def "
DEMO_BATCH = 8
DEMO_SEQ_LEN = 128
DEMO_ISLANDS = 2
# name, d_model, weight (the large model gets twice the device time of the small one).
DEMO_JOBS = (("small", 64, 1.0), ("large", 128, 2.0))
# The sample is requested this many steps before the end (the job is unloaded when it ends).
SAMPLE_LEAD_STEPS = 8
# Characters of the per-island timeline printed (one per step).
TIMELINE_CHARS = 72


def demo_spec(name: str, d_model: int, weight: float, steps: int, seed: int = 0) -> Any:
    """One demo job: palm-tiny (d_model overridden) on the stdlib corpus across both islands."""
    from pathways_lite.v1 import controller_pb2

    spec = controller_pb2.JobSpec(
        name=f"demo-{name}",
        islands=DEMO_ISLANDS,
        devices_per_island=1,
        mesh=controller_pb2.JobSpec.Mesh(data=1, model=1),
        train=controller_pb2.JobSpec.Train(
            steps=steps, global_batch=DEMO_BATCH, seq_len=DEMO_SEQ_LEN, seed=seed
        ),
        data=controller_pb2.JobSpec.Data(source="stdlib"),
        weight=weight,
    )
    spec.model.preset = "palm-tiny"
    spec.model.overrides["d_model"] = d_model
    return spec


def run(steps: int = 120, json_output: bool = False, seed: int = 0) -> int:
    """Run the demo; returns the process exit code.

    Args:
        steps: optimizer steps of each job.
        json_output: print a JSON summary instead of the human report at the end.
        seed: seeds the initialisation, the data order and sampling.
    """
    from pathways_lite.client import ClientError, ControllerClient, state_name
    from pathways_lite.local import LocalCluster

    if steps <= SAMPLE_LEAD_STEPS:
        raise ValueError(f"steps={steps} must be more than {SAMPLE_LEAD_STEPS}.")
    console = Console(stderr=json_output)
    console.print(
        f"[bold]pathways-lite demo[/]: two PaLM models ({', '.join(n for n, *_ in DEMO_JOBS)}, "
        f"weights {':'.join(f'{w:g}' for *_, w in DEMO_JOBS)}) trained at once on "
        f"{DEMO_ISLANDS} shared local islands (1 CPU device each)"
    )
    specs = {
        name: demo_spec(name, d_model, weight, steps, seed + k)
        for k, (name, d_model, weight) in enumerate(DEMO_JOBS)
    }
    state_dir = tempfile.mkdtemp(prefix="pl-demo-", dir="/tmp")
    cluster = LocalCluster(islands=DEMO_ISLANDS, devices_per_island=1, state_dir=state_dir)
    started = time.perf_counter()
    summary: dict[str, Any] = {}
    try:
        with console.status(f"starting Ray, the controller and {DEMO_ISLANDS} island hosts"):
            cluster.start()
        console.print(f"cluster up in {time.perf_counter() - started:.1f} s ({state_dir})")
        with ControllerClient(state_dir) as client:
            try:  # the controller's web dashboard, while the jobs run
                console.print(f"dashboard: {client.dashboard_url(with_token=True)}")
            except ClientError:
                pass
            summary = _train(client, specs, steps, seed, console)
            summary["timeline"] = _timeline(client, summary["jobs"])
            for name, info in summary["jobs"].items():
                job = client.get(info["job_id"])
                info["state"] = state_name(job.state)
                if info["state"] != "succeeded":
                    console.print(f"[red]job {name} {info['state']}[/]: {job.message}")
    except ClientError as e:
        console.print(f"[red]demo failed[/]: {e}")
        return 1
    finally:
        with console.status("shutting the cluster down"):
            cluster.down()
            shutil.rmtree(state_dir, ignore_errors=True)
    summary["wall_s"] = time.perf_counter() - started
    ok = all(info.get("state") == "succeeded" for info in summary["jobs"].values())
    if json_output:
        print(json.dumps(summary, indent=2))
        return 0 if ok else 1
    _report(console, summary)
    return 0 if ok else 1


def _train(client, specs, steps, seed, console) -> dict[str, Any]:
    """Submit both jobs, follow them, sample each shortly before its end; the summary."""
    jobs = {name: client.submit(spec) for name, spec in specs.items()}
    console.print(
        "submitted "
        + ", ".join(
            f"{name} ({job.id}, weight {specs[name].weight:g})" for name, job in jobs.items()
        )
        + "; compiling on both islands"
    )
    info: dict[str, dict[str, Any]] = {
        name: {"job_id": job.id, "weight": specs[name].weight, "losses": [], "sample": {}}
        for name, job in jobs.items()
    }
    columns = (
        TextColumn("[progress.description]{task.description:<6}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TimeRemainingColumn(),
    )

    def take_sample(name: str) -> None:
        try:
            reply = client.sample(
                info[name]["job_id"],
                DEMO_PROMPT,
                max_new_tokens=96,
                temperature=0.8,
                top_k=40,
                seed=seed,
            )
            info[name]["sample"] = {"text": reply.prompt + reply.text, "steps": reply.steps_applied}
        except Exception as e:  # the demo still reports the training run
            info[name]["sample"] = {"error": str(e)}

    def follow(name: str, progress: Progress, task: Any) -> None:
        tokens, seconds = 0, 0.0
        sampler: threading.Thread | None = None
        for update in client.watch(info[name]["job_id"]):
            if not update.HasField("metrics"):
                continue
            m = update.metrics
            info[name]["losses"].append(m.loss)
            if m.step > 0:  # step 0 includes compilation
                tokens += DEMO_BATCH * DEMO_SEQ_LEN
                seconds += m.step_time_s
            info[name]["tokens_per_s"] = tokens / seconds if seconds else 0.0
            progress.update(task, completed=m.step + 1, loss=m.loss, tps=info[name]["tokens_per_s"])
            if m.step + 1 >= steps - SAMPLE_LEAD_STEPS and sampler is None:
                sampler = threading.Thread(target=take_sample, args=(name,), daemon=True)
                sampler.start()
        if sampler is not None:
            sampler.join(timeout=300)

    errors: list[BaseException] = []
    failed = threading.Event()

    def follow_or_report(name: str, progress: Progress, task: Any) -> None:
        try:
            follow(name, progress, task)
        except BaseException as e:  # raised again by the caller's thread, which reports it
            errors.append(e)
            failed.set()

    with Progress(*columns, console=console) as progress:
        threads = []
        for name in jobs:
            task = progress.add_task(name, total=steps, loss=float("nan"), tps=0.0)
            t = threading.Thread(target=follow_or_report, args=(name, progress, task), daemon=True)
            t.start()
            threads.append(t)
        # The first error ends the wait: the other job's stream ends with the cluster.
        while any(t.is_alive() for t in threads) and not failed.wait(0.2):
            pass
    if errors:
        raise errors[0]
    return {"steps": steps, "jobs": info}


def _timeline(client, jobs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per island: the two jobs' steps in the order its host ran them, and device time each,
    from the controller's record of who ran when (ListIslands with include_steps); where
    the record holds no step of a job, `missing` names it instead of the shares."""
    letter = {info["job_id"]: name[0].upper() for name, info in jobs.items()}
    names = {info["job_id"]: name for name, info in jobs.items()}
    out: dict[str, Any] = {}
    for island in client.islands(include_steps=True):
        entries = [e for e in island.recent_steps if e.job_id in letter]
        if not entries:
            continue
        order = "".join(letter[e.job_id] for e in entries)
        # A job with no step in the island's record (it ran none there, or its steps left
        # the record's window) shared nothing with the other one there.
        absent = [f"{names[j]} ({j})" for j in letter if all(e.job_id != j for e in entries)]
        if absent:
            out[island.id] = {
                "order": order,
                "missing": f"no step of {', '.join(absent)} in {island.id}'s recent steps",
            }
            continue
        # While both ran: from the later first step to the earlier last one.
        lo = max(min(e.start_unix_ns for e in entries if e.job_id == j) for j in letter)
        hi = min(max(e.end_unix_ns for e in entries if e.job_id == j) for j in letter)
        both = [e for e in entries if e.start_unix_ns >= lo and e.end_unix_ns <= hi]
        busy = {name: 0.0 for name in jobs}
        for e in both:
            busy[names[e.job_id]] += (e.end_unix_ns - e.start_unix_ns) / 1e9
        total = sum(busy.values()) or 1.0
        out[island.id] = {
            "order": order,
            "steps_while_both": {n: sum(names[e.job_id] == n for e in both) for n in jobs},
            "device_time_share_while_both": {n: busy[n] / total for n in jobs},
        }
    return out


def _report(console: Console, summary: dict[str, Any]) -> None:
    jobs = summary["jobs"]
    for name, info in jobs.items():
        losses = info["losses"]
        if losses:
            console.print(
                f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps, "
                f"{info.get('tokens_per_s', 0.0):,.0f} tokens/s while sharing the islands"
            )
    weights = {name: info["weight"] for name, info in jobs.items()}
    targets = {n: w / sum(weights.values()) for n, w in weights.items()}
    console.rule("per-island timeline (as the islands' hosts timed it; one letter per step)")
    for island, t in summary["timeline"].items():
        order = t["order"]
        shown = order[:TIMELINE_CHARS] + ("..." if len(order) > TIMELINE_CHARS else "")
        console.print(f"{island}: {shown}", markup=False, highlight=False)
        if "missing" in t:
            console.print(f"  {t['missing']}: no shares to compare", markup=False)
            continue
        shares = ", ".join(
            f"{n} {t['steps_while_both'][n]} steps / {t['device_time_share_while_both'][n]:.0%} "
            f"of device time (weight share {targets[n]:.0%})"
            for n in jobs
        )
        console.print(f"  while both ran: {shares}")
    for name, info in jobs.items():
        sample = info["sample"]
        console.rule(f"{name}: sample after {sample.get('steps', '?')} steps")
        console.print(
            sample.get("text") or sample.get("error", "(no sample)"), markup=False, highlight=False
        )
    console.rule()
    console.print(f"total {summary['wall_s']:.0f} s with start-up and shutdown")
