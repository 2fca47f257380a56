"""`pathways-lite demo`: palm-tiny trained data-parallel across two local islands, then a sample.

What it runs, for real: a LocalCluster on this machine (Ray on loopback, two island hosts of
one CPU device each, the controller as its own process), one palm-tiny job submitted over
gRPC like `pathways-lite submit` does, spanning both islands. Each island reads half of every
global batch; the two hosts exchange gradients directly over gRPC and apply the same update,
comparing parameter digests every step. The progress bar follows the controller's WatchJob
stream. Shortly before the end the demo asks the controller for a sample (the controller's
Sample rpc, decoded on island 0 from the job's resident parameters; the demo says after how
many steps). Then the cluster is shut down. Both islands share this machine's CPU cores, so
the MFU shown is against the peak measured here for all of them together.
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
# The sample is requested this many steps before the end (the job is unloaded when it ends).
SAMPLE_LEAD_STEPS = 8


def demo_spec(steps: int, seed: int = 0) -> Any:
    """The demo's job: palm-tiny on the stdlib corpus across two one-device islands."""
    from pathways_lite.v1 import controller_pb2

    spec = controller_pb2.JobSpec(
        name="demo-palm-tiny",
        islands=DEMO_ISLANDS,
        devices_per_island=1,
        mesh=controller_pb2.JobSpec.Mesh(data=1, model=1),
        train=controller_pb2.JobSpec.Train(
            steps=steps, global_batch=DEMO_BATCH, seq_len=DEMO_SEQ_LEN, seed=seed
        ),
        data=controller_pb2.JobSpec.Data(source="stdlib"),
    )
    spec.model.preset = "palm-tiny"
    return spec


def run(steps: int = 300, json_output: bool = False, seed: int = 0) -> int:
    """Run the demo; returns the process exit code.

    Args:
        steps: optimizer steps to train.
        json_output: print a JSON summary instead of the human report at the end.
        seed: seeds the initialisation, the data order and sampling.
    """
    from pathways_lite.client import Client, ClientError, state_name
    from pathways_lite.controller import spec as spec_lib
    from pathways_lite.local import LocalCluster
    from pathways_lite.model import estimates

    console = Console(stderr=json_output)
    console.print(
        f"[bold]pathways-lite demo[/]: palm-tiny data parallel across {DEMO_ISLANDS} local "
        "islands (1 CPU device each), gradients exchanged host to host over gRPC"
    )
    spec = demo_spec(steps, seed)
    configs = spec_lib.to_configs(spec)
    flops_per_token = estimates.flops_per_token(configs.model, DEMO_SEQ_LEN)
    with console.status("measuring this machine's CPU peak FLOP/s (for MFU)"):
        peak = estimates.measure_cpu_peak_flops()
    state_dir = tempfile.mkdtemp(prefix="pl-demo-", dir="/tmp")
    cluster = LocalCluster(islands=DEMO_ISLANDS, devices_per_island=1, state_dir=state_dir)
    started = time.perf_counter()
    summary: dict[str, Any] = {}
    try:
        with console.status("starting Ray, the controller and 2 island hosts"):
            cluster.start()
        console.print(f"cluster up in {time.perf_counter() - started:.1f} s ({state_dir})")
        with Client(state_dir) as client:
            summary = _train(client, spec, steps, seed, console, flops_per_token, peak)
            job = client.get(summary["job_id"])
            summary["state"] = state_name(job.state)
            summary["islands"] = list(job.islands)
            if summary["state"] != "succeeded":
                console.print(f"[red]job {summary['state']}[/]: {job.message}")
    except ClientError as e:
        console.print(f"[red]demo failed[/]: {e}")
        return 1
    finally:
        with console.status("shutting the cluster down"):
            cluster.down()
            shutil.rmtree(state_dir, ignore_errors=True)
    summary["wall_s"] = time.perf_counter() - started
    if json_output:
        print(json.dumps(summary, indent=2))
    else:
        losses = summary["losses"]
        console.print(
            f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps on "
            f"{DEMO_ISLANDS} islands; {summary['tokens_per_s']:,.0f} tokens/s, MFU "
            f"{summary['mfu']:.1%} (total {summary['wall_s']:.0f} s with start-up and shutdown)"
        )
        console.rule(f"sample after {summary.get('sample_steps', '?')} steps")
        console.print(summary.get("sample") or "(no sample)", markup=False, highlight=False)
        console.rule()
    return 0 if summary.get("state") == "succeeded" else 1


def _train(client, spec, steps, seed, console, flops_per_token, peak) -> dict[str, Any]:
    """Submit, follow the progress, sample shortly before the end; the run's summary."""
    from pathways_lite.model import estimates

    job = client.submit(spec)
    console.print(f"job {job.id} submitted; compiling on both islands")
    losses: list[float] = []
    sample: dict[str, Any] = {}

    def take_sample() -> None:
        try:
            reply = client.sample(
                job.id, DEMO_PROMPT, max_new_tokens=96, temperature=0.8, top_k=40, seed=seed
            )
            sample["text"] = reply.prompt + reply.text
            sample["steps"] = reply.steps_applied
        except Exception as e:  # the demo still reports the training run
            sample["error"] = str(e)

    sampler = threading.Thread(target=take_sample, name="demo-sample", daemon=True)
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TextColumn("MFU {task.fields[mfu]:.1%}"),
        TimeRemainingColumn(),
    )
    tokens, seconds = 0, 0.0
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("training", total=steps, loss=float("nan"), tps=0.0, mfu=0.0)
        for update in client.watch(job.id):
            if not update.HasField("metrics"):
                continue
            m = update.metrics
            losses.append(m.loss)
            if m.step > 0:  # step 0 includes compilation
                tokens += DEMO_BATCH * DEMO_SEQ_LEN
                seconds += m.step_time_s
            tps = tokens / seconds if seconds else 0.0
            progress.update(
                task,
                completed=m.step + 1,
                loss=m.loss,
                tps=tps,
                mfu=estimates.mfu(tps, flops_per_token, peak),
            )
            if m.step + 1 >= steps - SAMPLE_LEAD_STEPS and not sampler.is_alive() and not sample:
                if not sampler.ident:
                    sampler.start()
    sampler.join(timeout=300) if sampler.ident else take_sample()
    tps = tokens / seconds if seconds else 0.0
    return {
        "job_id": job.id,
        "steps": steps,
        "losses": losses,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "tokens_per_s": tps,
        "mfu": estimates.mfu(tps, flops_per_token, peak),
        "sample": sample.get("text") or sample.get("error", ""),
        "sample_steps": sample.get("steps"),
    }
