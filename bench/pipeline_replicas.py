"""A pipeline checkpoint restored onto another replica count: 2 stages x 1 replica train 2
steps and checkpoint (each stage its part, `<dir>/stage<s>/`); 2 stages x 2 replicas load
that checkpoint (each replica of a stage reads its stage's part) and train step 3. The 3
losses must be within 1e-5 (relative) of the single-process reference trainer's.

Island hosts are real worker services in this process (one CPU device each), driven by the
controller's Dispatcher and `palm_program` over gRPC, one Dispatcher for both runs (as the
controller's). Not in the suite for time (~30 s warm); exits 1 when the losses differ.

Run: .venv/bin/python bench/pipeline_replicas.py [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

TOLERANCE = 1e-5


async def train_then_restore(addresses: list[str], folder: str) -> list[float]:
    """Losses of 2 steps on 2 x 1 islands, then 1 step on 2 x 2 restored from step 2."""
    from test_pipeline import Record, pipe_spec

    from pathways_lite.controller.dispatch import Dispatcher
    from pathways_lite.controller.islands import Island, connect_host
    from pathways_lite.controller.resolved import palm_program
    from pathways_lite.workers.checkpoint import is_committed

    islands = [Island(f"r{i}", [await connect_host(a)]) for i, a in enumerate(addresses)]
    losses: list[float] = []
    try:
        dispatcher = Dispatcher(epoch=1)
        one = pipe_spec(2, 1, (1, 1), batch=16, stages=2, mb=4, sched="1f1b")
        first = dataclasses.replace(
            palm_program(Record("replicas", one)),
            steps=2,
            checkpoint_dir=folder,
            checkpoint_every=2,
        )
        await dispatcher.load(first, islands[:2])
        reports: list = []
        await dispatcher.run(first, islands[:2], on_step=reports.append)
        losses += [r.loss for r in reports]
        deadline = time.monotonic() + 120
        while not all(is_committed(f"{folder}/stage{s}/g0-step2") for s in (0, 1)):
            if time.monotonic() > deadline:
                raise RuntimeError("the step-2 checkpoint was not committed by every stage.")
            await asyncio.sleep(0.1)
        await dispatcher.unload("replicas", islands[:2])
        two = pipe_spec(4, 1, (1, 1), batch=16, stages=2, mb=4, sched="1f1b")
        second = dataclasses.replace(
            palm_program(Record("replicas", two, generation=1)),
            checkpoint_dir=folder,
            restore_from=f"{folder}/g0-step2",
            start_step=2,
        )
        await dispatcher.load(second, islands)
        reports = []
        await dispatcher.run(second, islands, on_step=reports.append)
        losses += [r.loss for r in reports]
        await dispatcher.unload("replicas", islands)
    finally:
        for island in islands:
            await island.close()
    return losses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    import conftest  # noqa: F401  (CPU devices and the compile cache, as the tests)
    from test_pipeline import max_rel_diff, pipe_spec, reference_losses, serve_hosts, stop_hosts

    hosts = serve_hosts([[0], [1], [2], [3]])
    try:
        with tempfile.TemporaryDirectory(prefix="pl-replicas-") as folder:
            losses = asyncio.run(train_then_restore([h.address for h in hosts], folder))
    finally:
        stop_hosts(hosts)
    reference = reference_losses(pipe_spec(4, 1, (1, 1), batch=16, stages=2, mb=4, sched="1f1b"))
    diff = max_rel_diff(losses, reference)
    ok = len(losses) == len(reference) and diff <= TOLERANCE
    if args.json:
        print(json.dumps({"losses": losses, "reference": reference, "max_rel_diff": diff}))
    else:
        print(f"2x1 then 2x2 losses: {losses}")
        print(f"reference losses:    {reference}")
        print(f"max relative difference {diff:.2e} (within {TOLERANCE:g}: {ok})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
