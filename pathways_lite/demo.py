"""`pathways-lite demo`: train palm-tiny on the embedded default corpus, then sample from it.

At this stage the demo runs the single-process reference trainer; the multi-island demo builds
on the same steps once the controller drives islands.
"""

from __future__ import annotations

import json
import logging
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

logger = logging.getLogger(__name__)

DEMO_PROMPT = "def "
DEMO_BATCH = 16
DEMO_SEQ_LEN = 128


def run(steps: int = 300, json_output: bool = False, seed: int = 0) -> int:
    """Run the demo; returns the process exit code.

    Args:
        steps: optimizer steps to train.
        json_output: print a JSON summary instead of the human report at the end.
        seed: seeds the initialisation, the data order and sampling.
    """
    import jax

    from pathways_lite.model import estimates
    from pathways_lite.model.config import PalmConfig
    from pathways_lite.model.data import DataSpec, prepare_dataset
    from pathways_lite.model.optim import OptimConfig
    from pathways_lite.model.sampling import generate
    from pathways_lite.model.train import ReferenceTrainer, TrainConfig

    console = Console(stderr=json_output)
    console.print("[bold]pathways-lite demo[/]: palm-tiny on the Python standard library")
    with console.status("preparing the default corpus and tokenizer (cached after the first run)"):
        dataset = prepare_dataset(DataSpec(source="stdlib"), seq_len=DEMO_SEQ_LEN)
    tok = dataset.tokenizer
    console.print(
        f"dataset {dataset.hash[:12]}: {dataset.num_examples} sequences of {dataset.seq_len} "
        f"tokens, vocabulary {tok.vocab_size}"
    )

    model_cfg = PalmConfig.from_preset("palm-tiny", vocab_size=tok.vocab_size)
    train_cfg = TrainConfig(steps=steps, global_batch=DEMO_BATCH, seq_len=DEMO_SEQ_LEN, seed=seed)
    # A short run: PaLM's schedule (1e-2 for 10k steps) with a warm-up that suits 300 steps.
    optim_cfg = OptimConfig()
    flops_per_token = estimates.flops_per_token(model_cfg, DEMO_SEQ_LEN)
    peak = estimates.measure_cpu_peak_flops()

    trainer = ReferenceTrainer(model_cfg, optim_cfg, train_cfg)
    losses: list[float] = []
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TextColumn("MFU {task.fields[mfu]:.1%}"),
        TimeRemainingColumn(),
    )
    started = time.perf_counter()
    timed_tokens, timed_seconds = 0, 0.0
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("training", total=steps, loss=float("nan"), tps=0.0, mfu=0.0)
        for record in trainer.run(lambda step: dataset.global_batch(step, DEMO_BATCH, seed)[0]):
            losses.append(record.loss)
            if record.step > 0:  # step 0 includes compilation
                timed_tokens += record.tokens
                timed_seconds += record.seconds
            tps = timed_tokens / timed_seconds if timed_seconds else 0.0
            mfu = estimates.mfu(tps, flops_per_token, peak)
            progress.update(task, advance=1, loss=record.loss, tps=tps, mfu=mfu)
    wall = time.perf_counter() - started

    prompt_ids = tok.encode(DEMO_PROMPT)
    out_ids = generate(
        trainer.fns.model(trainer.state),
        prompt_ids,
        max_new_tokens=96,
        temperature=0.8,
        top_k=40,
        rng=jax.random.key(seed),
    )
    sample = tok.decode(list(prompt_ids) + [int(i) for i in out_ids])
    summary = {
        "steps": steps,
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "tokens_per_s": timed_tokens / timed_seconds if timed_seconds else 0.0,
        "mfu": estimates.mfu(timed_tokens / timed_seconds, flops_per_token, peak)
        if timed_seconds
        else 0.0,
        "wall_s": wall,
        "dataset_hash": dataset.hash,
        "sample": sample,
    }
    if json_output:
        print(json.dumps(summary, indent=2))
    else:
        console.print(
            f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {steps} steps ({wall:.1f} s); "
            f"{summary['tokens_per_s']:,.0f} tokens/s, MFU {summary['mfu']:.1%}"
        )
        console.rule("sample")
        console.print(sample, markup=False, highlight=False)
        console.rule()
    return 0
