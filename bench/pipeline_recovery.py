"""A pipeline job through the real controller: stages on different Ray nodes, one killed.

A LocalCluster (Ray on loopback, one node per island, the controller process) runs a
2-stage palm-tiny pipeline job (GPipe, 2 microbatches, checkpoints every 2 steps). Once a
checkpoint is committed and 2 more steps ran, the host of stage 1 (island-1) is SIGKILLed;
the job must roll back every stage to its last committed checkpoint, continue, succeed, and
give the single-process reference trainer's losses (within 1e-5 relative): what an
uninterrupted run gives. A cluster of its own (29 s on a quiet 2-core machine); the suite's
tests/test_pipeline.py kills a stage host the same way on the session's Ray nodes.

Run: .venv/bin/python bench/pipeline_recovery.py [--steps 10]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

SPEC = """
name: pipe-recovery
model: {{preset: palm-tiny}}
islands: 2
devices_per_island: 1
mesh: {{data: 1, model: 1}}
pipeline: {{stages: 2, microbatches: 2, schedule: gpipe}}
train: {{steps: {steps}, global_batch: 8, seq_len: 32, seed: 0, checkpoint_every: 2}}
data: {{source: stdlib, vocab_size: 1024, max_bytes: 1000000}}
"""


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout_s} s waiting for {what}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import numpy as np

    from pathways_lite.client import ControllerClient, state_name
    from pathways_lite.controller import spec as spec_lib
    from pathways_lite.controller.store import DB_NAME, JobStore
    from pathways_lite.local import LocalCluster
    from pathways_lite.model.data import prepare_dataset
    from pathways_lite.model.train import ReferenceTrainer
    from pathways_lite.spec import load_spec_text

    spec = load_spec_text(SPEC.format(steps=args.steps), validate=True)
    state_dir = Path(tempfile.mkdtemp(prefix="plpipe-", dir="/tmp"))
    cluster = LocalCluster(islands=2, devices_per_island=1, state_dir=state_dir)
    try:
        cluster.start()
        store = JobStore(state_dir / DB_NAME)
        with ControllerClient(str(state_dir)) as client:
            job = client.submit(spec)
            checkpoint = wait_for(lambda: store.latest_checkpoint(job.id), 240, "a checkpoint")
            wait_for(
                lambda: store.steps_completed(job.id) >= checkpoint.step + 2, 120, "2 more steps"
            )
            pid = next(int(i.hosts[0].pid) for i in client.islands() if i.id == "island-1")
            os.kill(pid, signal.SIGKILL)
            killed_after = store.steps_completed(job.id)
            job = client.wait(job.id, timeout_s=400)
    finally:
        cluster.down()
        shutil.rmtree(state_dir, ignore_errors=True)
    configs = spec_lib.to_configs(spec)
    dataset = prepare_dataset(configs.data, seq_len=configs.train.seq_len)
    trainer = ReferenceTrainer(configs.model, configs.optim, configs.train)
    reference = trainer.losses(
        lambda s: dataset.global_batch(s, configs.train.global_batch, configs.train.seed)[0]
    )
    losses = np.asarray(list(job.losses), np.float64)
    rel = float(np.max(np.abs(losses - reference) / np.abs(reference)))
    print(
        f"stage 1's host killed after {killed_after} steps (checkpoint at step "
        f"{checkpoint.step}); job {state_name(job.state)}: {job.message}"
    )
    print(f"{len(losses)} losses, max relative difference from the reference: {rel:.2e}")
    ok = state_name(job.state) == "succeeded" and len(losses) == args.steps and rel <= 1e-5
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
