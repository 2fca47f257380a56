"""A serve job's slot KV cache in admission: the real controller over a simulated island
(workers/sim_host.py, no JAX), as tests/test_scale_harness.py runs it.

Claim: the room of a serve job's KV cache stays held from its load to its StartServe (which
allocates the cache), so no job is admitted into it and an island's budget is never
exceeded; a serve job's measured figure (with its cache) is never a training job's.
"""

from __future__ import annotations

import asyncio

import pytest
from test_scale_harness import STEP_S, _controller, _finished_source, _spec, _until

from pathways_lite.controller.resolved import ResolvedJob
from pathways_lite.controller.states import JobState
from pathways_lite.controller.store import JobStore
from pathways_lite.spec import load_spec_text
from pathways_lite.v1 import controller_pb2
from pathways_lite.workers.sim_host import SimCluster, SimIsland

pytestmark = pytest.mark.timeout(60)

MEASURED = 1 << 20  # what each loaded job measures on the simulated host


def _serve_spec(source_id: str):
    return load_spec_text(f"""
name: srv
kind: serve
model: {{preset: palm-tiny}}
islands: 1
devices_per_island: 1
mesh: {{data: 1, model: 1}}
init_from: {{job: {source_id}}}
train: {{global_batch: 8, seq_len: 64}}
data: {{source: stdlib, vocab_size: 1024}}
serve: {{max_batch: 2, max_seq_len: 64}}
""")


def test_a_serve_jobs_cache_room_is_held_from_its_load_so_no_job_takes_it(tmp_path) -> None:
    """Budget: the serve job's measured figure plus a training job's, nothing more. Before,
    the serve job's demand dropped to its compiled step's figure at load (no cache), the
    training job was admitted into the cache's room, and StartServe's cache then put the
    island over its budget."""

    async def run() -> None:
        store = JobStore.open_controller(tmp_path / "state")
        source = _finished_source(store, tmp_path)
        serve = _serve_spec(source.id)
        training = _spec("train", 1, 10_000)
        training.train.global_batch = 16  # not the serve job's memory key in any case
        resolved = ResolvedJob.resolve(serve)
        trainer = ResolvedJob.resolve(training).bytes_per_device
        budget = MEASURED + trainer  # no room for the cache beside both
        assert budget >= resolved.bytes_per_device
        sim = SimCluster([SimIsland("island-0", STEP_S, budget, MEASURED)])
        async with _controller(sim, store) as c:
            over: list[int] = []

            def watch() -> bool:
                used = c.scheduler.used("island-0")
                if used > budget:
                    over.append(used)
                return False

            srv = c.submit(controller_pb2.SubmitJobRequest(spec=serve)).id
            trained = c.submit(controller_pb2.SubmitJobRequest(spec=training)).id

            def serving() -> bool:
                watch()
                job = c.serving.jobs.get(srv)
                return job is not None and job.status == "serving"

            await _until(serving, 20)
            for _ in range(20):  # a few scheduling passes with the service up
                watch()
                await asyncio.sleep(0.02)
            assert not over, (over, budget)
            assert store.get_job(trained).state == JobState.QUEUED
            assert c.scheduler.held(srv) == MEASURED + MEASURED // 10  # the host's cache
            # The measured figure is the compiled step's: a training job's kind keeps its own,
            # and another serve job adds the cache its own settings size.
            assert c.memory.bytes_per_device(ResolvedJob.resolve(training)) == trainer
            bigger = _serve_spec(source.id)
            bigger.serve.max_batch = 64
            big = ResolvedJob.resolve(bigger)
            assert big.kv_bytes_per_device > resolved.kv_bytes_per_device
            assert c.memory.bytes_per_device(big) == MEASURED + big.kv_bytes_per_device
            # Preempted and resumed, the service starts again: its figure stays the same.
            c.cancel(trained, "room for the preemption below")
            high = _spec("high", 1, 10_000, priority=5)
            high.train.global_batch = 16
            c.submit(controller_pb2.SubmitJobRequest(spec=high))
            # It resumes once the high job's measured figure leaves it room again.
            await _until(
                lambda: any("the service starts again" in e.message for e in store.events(srv)),
                20,
            )
            await _until(serving, 20)
            assert c.scheduler.held(srv) == MEASURED + MEASURED // 10
            assert c.scheduler.used("island-0") <= budget

    asyncio.run(run())
