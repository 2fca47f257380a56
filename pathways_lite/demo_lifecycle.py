"""`pathways-lite demo --lifecycle`: a model's life, pre-training to evaluation, in one chain.

What it runs, for real: a LocalCluster on this machine (one island of two CPU devices) and one
chain of jobs submitted in one call, as `pathways-lite submit a.yaml b.yaml ...` does:

1. `pre`: palm-tiny pre-trained on a mixture of the stdlib corpus as a language model, the
   same text with T5 span corruption, and the `name_from_docstring` text-to-text task;
2. `tuned`: fine-tuned from `pre`'s last checkpoint (parameters only, fresh optimizer,
   resharded from a (1 x 2) to a (2 x 1) mesh) on the `docstring_from_body` task;
3. four `kind: eval` jobs: `pre` and `tuned`, each with 0 and 3 shots, on the task's held-out
   modules (loss and perplexity of the targets, greedy exact match and token F1).

The eval jobs wait for their checkpoints (`init_from` implies `after`). At the end it prints
one table of the results, then the cluster shuts down.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from typing import Any

from rich.console import Console
from rich.table import Table

COMMON = """\
model: {preset: palm-tiny}
islands: 1
devices_per_island: 2
"""
TASK = "data: {source: stdlib-tasks, task: docstring_from_body}\n"


def chain_specs(pre_steps: int, tune_steps: int, examples: int) -> list[str]:
    """The chain's YAML specs: pre-training, fine-tuning, and the four evaluations."""
    pre = f"""\
name: life-pre
{COMMON}mesh: {{data: 1, model: 2}}
train: {{steps: {pre_steps}, global_batch: 8, seq_len: 128, seed: 0}}
data:
  vocab_size: 2048
  max_bytes: 2000000
  mixture:
    - {{source: stdlib, weight: 3}}
    - {{source: stdlib, objective: span_corruption, weight: 1}}
    - {{source: stdlib-tasks, task: name_from_docstring, weight: 1}}
optimizer: {{learning_rate: 0.05, warmup_steps: 0}}
"""
    tuned = f"""\
name: life-tuned
{COMMON}mesh: {{data: 2, model: 1}}
init_from: {{job: life-pre}}
train: {{steps: {tune_steps}, global_batch: 8, seq_len: 128, seed: 1}}
{TASK}optimizer: {{learning_rate: 0.02, warmup_steps: 0}}
"""
    evals = [
        f"""\
name: life-eval-{source}-{shots}shot
kind: eval
{COMMON}mesh: {{data: 1, model: 2}}
init_from: {{job: life-{source}}}
train: {{global_batch: 8, seq_len: 128}}
{TASK}eval: {{shots: {shots}, max_examples: {examples}}}
"""
        for source in ("pre", "tuned")
        for shots in (0, 3)
    ]
    return [pre, tuned, *evals]


def run(
    pre_steps: int = 200, tune_steps: int = 100, examples: int = 50, json_output: bool = False
) -> int:
    """Run the life-cycle demo; returns the process exit code."""
    from pathways_lite.client import ClientError, ControllerClient, state_name
    from pathways_lite.local import LocalCluster
    from pathways_lite.spec import load_spec_text

    console = Console(stderr=json_output)
    console.print(
        "[bold]pathways-lite demo --lifecycle[/]: pre-train on a mixture, fine-tune on the "
        f"docstring task, evaluate both 0- and 3-shot ({pre_steps} + {tune_steps} steps)"
    )
    state_dir = tempfile.mkdtemp(prefix="pl-life-", dir="/tmp")
    cluster = LocalCluster(islands=1, devices_per_island=2, state_dir=state_dir)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    try:
        cluster.start()
        console.print(f"cluster up in {time.perf_counter() - started:.1f} s ({state_dir})")
        with ControllerClient(state_dir) as client:
            specs = [load_spec_text(text) for text in chain_specs(pre_steps, tune_steps, examples)]
            jobs = client.submit_chain(specs)
            for job in jobs:
                console.print(f"submitted {job.name} ({job.id})")
            for job in jobs:
                done = client.wait(job.id)
                state = state_name(done.state)
                took = done.finished_at.seconds - done.started_at.seconds
                console.print(f"{done.name}: {state} after {took} s")
                if state != "succeeded":
                    console.print(f"[red]{done.name} {state}[/]: {done.message}")
                    return 1
                for result in done.evals:
                    for name, e in result.sources.items():
                        rows.append(
                            {
                                "model": done.name.split("-")[2],  # life-eval-MODEL-Kshot
                                "shots": result.shots,
                                "step": result.step,
                                "source": name,
                                "loss": e.loss,
                                "perplexity": e.perplexity,
                                "exact_match": e.exact_match,
                                "token_f1": e.token_f1,
                                "examples": e.examples,
                            }
                        )
    except (ClientError, RuntimeError, ValueError) as e:
        console.print(f"[red]demo failed[/]: {e}")
        return 1
    finally:
        cluster.down()
        shutil.rmtree(state_dir, ignore_errors=True)
    if json_output:
        print(json.dumps({"evals": rows, "wall_s": time.perf_counter() - started}, indent=2))
        return 0
    table = Table(title="docstring_from_body, held-out modules")
    for column in ("model", "step", "shots", "loss", "perplexity", "exact match", "token F1"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in rows:
        table.add_row(
            r["model"],
            str(r["step"]),
            str(r["shots"]),
            f"{r['loss']:.3f}",
            f"{r['perplexity']:.1f}",
            f"{r['exact_match']:.3f}",
            f"{r['token_f1']:.3f}",
        )
    console.print(table)
    console.print(f"total {time.perf_counter() - started:.0f} s with start-up and shutdown")
    return 0
