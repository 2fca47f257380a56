"""The Python SDK on the session's LocalCluster: lazy top-level imports, submit from a dict or a
YAML path, wait/status/metrics (a pyarrow Table)/sample/cancel, islands."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SPEC = {
    "name": "sdk-tiny",
    "model": {"preset": "palm-tiny"},
    "islands": 1,
    "devices_per_island": 2,
    "mesh": {"data": 1, "model": 2},
    "train": {"steps": 4, "global_batch": 4, "seq_len": 64, "seed": 2},
    "data": {"source": "stdlib", "vocab_size": 1024, "max_bytes": 1000000},
}


def test_import_is_light_and_exports_load_lazily() -> None:
    code = (
        "import sys, pathways_lite\n"
        "heavy = [m for m in ('jax', 'grpc', 'ray', 'pyarrow') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "from pathways_lite import Client, JobSpec, LocalCluster\n"
        "assert JobSpec.DESCRIPTOR.full_name == 'pathways_lite.v1.JobSpec'\n"
        "assert Client.__doc__ and 'Example' in Client.__doc__\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_submit_wait_metrics_and_islands(local_cluster, tmp_path) -> None:
    import pyarrow as pa

    from pathways_lite import Client

    with Client(local_cluster.state_dir) as client:
        (island,) = client.islands()
        assert island["id"] == "island-0" and island["devices"] == 2
        job = client.submit(SPEC)
        final = job.wait(timeout_s=180)
        assert final.state == "succeeded" and final["steps_completed"] == 4
        table = job.metrics()
        assert isinstance(table, pa.Table) and table.num_rows == 4
        assert table.column("step").to_pylist() == [0, 1, 2, 3]
        assert table.column("loss").to_pylist() == final.losses
        assert table.schema.field("time").type == pa.timestamp("us", tz="UTC")
        # Recorded metrics carry MFU too (tokens/s x FLOPs per token over the measured peak).
        assert all(0 < mfu < 1 for mfu in table.column("mfu").to_pylist()), table.column("mfu")
        # Ended: sampling loads its final checkpoint for the call (greedy: the same text twice).
        text = job.sample("def ", max_new_tokens=8)
        assert text and job.sample("def ", max_new_tokens=8) == text
        # A YAML path works too.
        import yaml

        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump({**SPEC, "name": "sdk-yaml", "train": {**SPEC["train"]}}))
        assert client.submit(str(path)).wait(timeout_s=180).state == "succeeded"


def test_sample_and_cancel_a_running_job(local_cluster) -> None:
    from pathways_lite import Client

    with Client(local_cluster.state_dir) as client:
        job = client.submit(
            {**SPEC, "name": "sdk-long", "train": {**SPEC["train"], "steps": 100000}}
        )
        try:
            deadline = time.monotonic() + 120
            while job.status().steps_completed < 2:
                assert time.monotonic() < deadline
                time.sleep(0.3)
            # One resolver: a unique name or id prefix names the job; the handle keeps its id.
            assert client.job("sdk-long").id == job.id
            assert client.job(job.id[: len("sdk-long-") + 4]).id == job.id
            text = job.sample("import ", max_new_tokens=8, temperature=0.7, top_k=20, seed=1)
            assert isinstance(text, str) and text
            # A seed takes all 64 bits (JAX's key takes an int64: 2**63 and above overflowed).
            assert job.sample("import ", max_new_tokens=4, temperature=0.7, seed=2**64 - 1)
            assert job.logs(tail=2) and len(job.logs(tail=2)) == 2
        finally:
            status = job.cancel("done with the SDK test")
        assert status.state == "cancelled" and "done with the SDK test" in status.message
