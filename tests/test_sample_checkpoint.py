"""`sample` of an ended job: its last checkpoint is loaded on an island for the call, sampled
(the reply names the checkpoint and its step) and unloaded, leaving the island as it was."""

from __future__ import annotations

import json

import pytest

from pathways_lite import cli
from pathways_lite.client import ControllerClient, state_name
from pathways_lite.controller.auth import read_cluster_credential
from pathways_lite.v1 import worker_pb2, worker_pb2_grpc
from pathways_lite.workers.auth import host_channel

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

STEPS = 3
SPEC = f"""\
name: sample-ckpt
model: {{preset: palm-tiny}}
islands: 1
devices_per_island: 2
mesh: {{data: 1, model: 2}}
train: {{steps: {STEPS}, global_batch: 4, seq_len: 64, seed: 1}}
data: {{source: stdlib, vocab_size: 1024, max_bytes: 1000000}}
"""


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(args))
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def island_memory(client: ControllerClient) -> list[worker_pb2.ExecutionLogReply]:
    """Every island host's loaded jobs and live device bytes (its own ExecutionLog)."""
    replies = []
    credential = read_cluster_credential(client.state_dir)
    for island in client.islands():
        for host in island.hosts:
            with host_channel(host.address or f"{host.node}:{host.port}", credential) as channel:
                stub = worker_pb2_grpc.WorkerServiceStub(channel)
                replies.append(stub.ExecutionLog(worker_pb2.ExecutionLogRequest(), timeout=60))
    return replies


def test_sample_of_a_succeeded_job_restores_its_last_checkpoint_and_unloads_it(
    local_cluster, tmp_path, capsys
) -> None:
    state = str(local_cluster.state_dir)
    spec_path = tmp_path / "sample-ckpt.yaml"
    spec_path.write_text(SPEC)
    code, out, _ = run_cli(capsys, "submit", str(spec_path), "--json", "--state-dir", state)
    assert code == 0
    job_id = json.loads(out)["id"]
    with ControllerClient(state) as client:
        job = client.wait(job_id, timeout_s=120)
        assert state_name(job.state) == "succeeded", job.message
        before = island_memory(client)
        assert all(not r.jobs for r in before), before

        samples = []
        for _ in range(2):
            code, out, err = run_cli(
                capsys,
                "sample",
                job_id,
                "--prompt",
                "def ",
                "--max-new-tokens",
                "8",
                "--json",
                "--state-dir",
                state,
            )
            assert code == 0, err
            samples.append(json.loads(out))
        first, second = samples
        assert first["job_id"] == job_id and first["text"] and first["island"] == "island-0"
        # The final checkpoint's parameters: every step applied, and it says which checkpoint.
        assert first["steps_applied"] == STEPS
        assert first["checkpoint"].endswith(f"-step{STEPS}"), first
        # Greedy decoding from the same checkpoint is deterministic.
        assert second["text"] == first["text"]

        after = island_memory(client)
        assert all(not r.jobs for r in after), after
        assert [r.live_bytes_total for r in after] == [r.live_bytes_total for r in before]
        assert all(not i.job_ids for i in client.islands())
