"""The cluster CLI: up/down, submit --wait --json, jobs, status, cancel, islands, bad specs.

Job commands run against the session's LocalCluster (tests/conftest.py); `up`/`down` of a
second, smaller cluster run as real `pathways-lite` processes beside it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pathways_lite import cli
from pathways_lite.workers.ray_cluster import alive

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SPEC = """\
name: cli-tiny
model: {preset: palm-tiny}
islands: 1
devices_per_island: 2
mesh: {data: 1, model: 2}
train: {steps: 3, global_batch: 4, seq_len: 64, seed: 1}
data: {source: stdlib, vocab_size: 1024, max_bytes: 1000000}
"""


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pathways_lite.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def main(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_submit_wait_json_then_status_jobs_and_cancel(local_cluster, tmp_path, capsys) -> None:
    state = str(local_cluster.state_dir)
    spec = tmp_path / "tiny.yaml"
    spec.write_text(SPEC)
    done = run_cli("submit", str(spec), "--wait", "--json", "--state-dir", state)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["state"] == "succeeded" and len(record["losses"]) == 3
    assert all(isinstance(x, float) for x in record["losses"])

    code, out, _ = main(capsys, "status", record["id"], "--json", "--state-dir", state)
    assert code == 0 and json.loads(out)["losses"] == record["losses"]
    code, out, _ = main(capsys, "jobs", "--json", "--state-dir", state)
    assert code == 0 and record["id"] in [j["id"] for j in json.loads(out)]
    code, out, _ = main(capsys, "jobs", "--state-dir", state)
    assert code == 0 and record["id"] in out and "succeeded" in out
    assert out.split("\n")[0].split() == ["id", "state", "steps", "loss", "duration", "reason"]
    code, out, _ = main(
        capsys, "jobs", "--state", "succeeded", "--limit", "1", "--json", "--state-dir", state
    )
    (newest,) = json.loads(out)
    assert newest["id"] == record["id"] and newest["duration"] != "-"  # newest first
    # A job is named by its id, its unique name or a unique id prefix.
    code, out, _ = main(capsys, "status", record["id"][:-2], "--json", "--state-dir", state)
    assert code == 0 and json.loads(out)["id"] == record["id"]
    # `logs | head`: the reader closes the pipe; no BrokenPipe error, exit 0.
    reader = subprocess.Popen(
        [sys.executable, "-m", "pathways_lite.cli", "logs", record["id"], "--state-dir", state],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    reader.stdout.close()
    err = reader.stderr.read()
    assert reader.wait(60) == 0 and err == "", err

    # Cancelling a finished job is refused: one line, non-zero.
    code, _, err = main(capsys, "cancel", record["id"], "--state-dir", state)
    assert code != 0 and err.count("\n") == 1 and "already succeeded" in err

    # A queued-then-cancelled job: submit without --wait, cancel it at once.
    spec.write_text(SPEC.replace("steps: 3", "steps: 500"))
    code, out, _ = main(capsys, "submit", str(spec), "--json", "--state-dir", state)
    job_id = json.loads(out)["id"]
    code, out, _ = main(capsys, "cancel", job_id, "--state-dir", state)
    assert code == 0 and "cancelled" in out


def test_islands_json_lists_every_host(local_cluster, capsys) -> None:
    code, out, _ = main(capsys, "islands", "--json", "--state-dir", str(local_cluster.state_dir))
    assert code == 0
    (island,) = json.loads(out)
    (host,) = island["hosts"]
    assert {"node", "address", "pid", "port", "devices"} <= set(host)
    assert host["devices"] == 2 and host["node"] == "127.0.0.2"
    # Numbers as numbers (protobuf's JSON writes int64 as strings).
    assert isinstance(host["memory_bytes"], int) and host["memory_bytes"] > 0
    assert isinstance(host["wire_version"]["version"], int)
    # `health --json`: one document, the exit code as without it.
    code, out, err = main(capsys, "health", "--json", "--state-dir", str(local_cluster.state_dir))
    assert code == 0, err
    assert json.loads(out) == {
        "address": local_cluster.address,
        "service": "",
        "status": "SERVING",
    }


BAD = {
    "yaml that does not parse": ("name: [unclosed\n", "does not parse as YAML"),
    "unknown key": (SPEC + "colour: blue\n", "colour"),
    "wrong type": (SPEC.replace("steps: 3", "steps: many"), "train.steps"),
    "zero size": (SPEC.replace("global_batch: 4", "global_batch: 0"), "train.global_batch"),
    "negative size": (SPEC.replace("seq_len: 64", "seq_len: -1"), "train.seq_len"),
    "unknown preset": (SPEC.replace("palm-tiny", "palm-huge"), "model.preset"),
    "missing section": (SPEC.replace("mesh: {data: 1, model: 2}\n", ""), "mesh"),
    "absurd name": (SPEC.replace("cli-tiny", "n" * 10000), "name"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_specs_give_one_line_and_a_nonzero_exit(
    local_cluster, tmp_path, capsys, case
) -> None:
    text, field = BAD[case]
    spec = tmp_path / "bad.yaml"
    spec.write_text(text)
    code, out, err = main(capsys, "submit", str(spec), "--state-dir", str(local_cluster.state_dir))
    assert code != 0 and out == ""
    assert err.count("\n") == 1 and err.startswith("pathways-lite: error:")
    assert field in err and "Traceback" not in err


def test_commands_without_a_cluster_fail_in_one_line(tmp_path, capsys) -> None:
    for args in (("jobs",), ("status", "x"), ("islands",), ("down",), ("down", "--json")):
        code, _, err = main(capsys, *args, "--state-dir", str(tmp_path))
        assert code != 0 and err.count("\n") == 1, (args, err)


def test_up_refuses_a_standby_controller_for_simulated_islands(tmp_path, capsys) -> None:
    code, out, err = main(
        capsys,
        "up",
        "--simulate-islands",
        "2",
        "--standby-controller",
        "--state-dir",
        str(tmp_path),
    )
    assert code != 0 and out == "" and err.count("\n") == 1
    assert "--standby-controller" in err and "--simulate-islands" in err
    assert not (tmp_path / "cluster.json").exists()
    # Flags that shape real islands did nothing there, silently: refused, each named.
    code, out, err = main(
        capsys,
        "up",
        "--simulate-islands",
        "2",
        "--islands",
        "4",
        "--island-memory",
        "1GiB",
        "--state-dir",
        str(tmp_path),
    )
    assert code != 0 and out == "" and err.count("\n") == 1
    assert "--islands, --island-memory cannot be combined with --simulate-islands" in err
    assert not (tmp_path / "cluster.json").exists()


def test_two_clusters_side_by_side_and_down_leaves_nothing(local_cluster, capsys) -> None:
    other = Path(tempfile.mkdtemp(prefix="plc2-", dir="/tmp"))
    try:
        up = run_cli(
            "up",
            "--islands",
            "1",
            "--devices-per-island",
            "1",
            "--state-dir",
            str(other),
            "--standby-controller",
            "--json",
        )
        assert up.returncode == 0, up.stderr
        info = json.loads(up.stdout)
        assert info["state_dir"] == str(other) and info["controller"] != local_cluster.address
        # The controller keeps its standby itself (the CLI process has exited).
        assert alive([info["standby_pid"]]) == [info["standby_pid"]]
        record = json.loads((other / "cluster.json").read_text())
        code, out, err = main(capsys, "islands", "--json", "--state-dir", str(other))
        assert code == 0 and json.loads(out)[0]["hosts"][0]["devices"] == 1, err
        first = str(local_cluster.state_dir)
        code, out, err = main(capsys, "islands", "--json", "--state-dir", first)
        assert code == 0 and json.loads(out)[0]["hosts"][0]["devices"] == 2, err
        from pathways_lite.local import recorded_pids

        pids = recorded_pids(other)
        assert record["controller_pid"] in pids and info["standby_pid"] in pids and len(pids) > 3
    finally:
        down = run_cli("down", "--json", "--state-dir", str(other))
    assert down.returncode == 0, down.stderr
    # One document on stdout (the progress on stderr).
    said = json.loads(down.stdout)
    assert said["stopped"] and said["checkpointed"] and said["drain_error"] is None, said
    assert said["jobs"] == [] and said["state_dir"] == str(other)
    assert "no running or suspended jobs" in down.stderr
    assert alive(pids) == []
    assert not (other / "cluster.json").exists()
    # The first cluster is untouched.
    code, out, err = main(capsys, "islands", "--json", "--state-dir", str(local_cluster.state_dir))
    assert code == 0 and json.loads(out), err


def test_down_checkpoints_a_running_job_and_up_resumes_it_with_its_logs(tmp_path, capsys) -> None:
    other = Path(tempfile.mkdtemp(prefix="plc3-", dir="/tmp"))
    state = ("--state-dir", str(other))
    spec = tmp_path / "long.yaml"
    spec.write_text(
        SPEC.replace("devices_per_island: 2", "devices_per_island: 1")
        .replace("model: 2}", "model: 1}")
        .replace("steps: 3", "steps: 3000")
    )
    up = ("up", "--islands", "1", "--devices-per-island", "1", *state)
    try:
        assert run_cli(*up).returncode == 0
        code, out, _ = main(capsys, "submit", str(spec), "--json", *state)
        job_id = json.loads(out)["id"]
        deadline = time.monotonic() + 180
        phases = set()
        while time.monotonic() < deadline:
            code, out, _ = main(capsys, "status", job_id, "--json", *state)
            phases.add(json.loads(out)["phase"])
            if json.loads(out)["steps_completed"] >= 3:
                break
            time.sleep(0.3)
        # Before its first step the job said what it was doing.
        assert phases & {"preparing data", "compiling"}, phases
        down = run_cli("down", *state)
        assert down.returncode == 0, down.stderr
        said = re.search(rf"{job_id} \(cli-tiny\): Checkpointed at step (\d+)", down.stdout)
        assert said, down.stdout
        step = int(said.group(1))
        assert step >= 3 and (other / "logs" / f"{job_id}.log").exists()

        assert run_cli(*up).returncode == 0
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            code, out, _ = main(capsys, "status", job_id, "--json", *state)
            record = json.loads(out)
            if record["resumed_from_step"] is not None:
                break
            time.sleep(0.5)
        assert record["resumed_from_step"] == step, record
        messages = [e["message"] for e in record["events"]]
        assert any(f"Resumed from the checkpoint at step {step}" in m for m in messages)
        code, out, _ = main(capsys, "status", job_id, *state)
        assert f"Resumed from the checkpoint at step {step}" in out
        # The logs of the first run are served by the second controller.
        code, out, _ = main(capsys, "logs", job_id, *state)
        assert code == 0 and "step 0 (island_seq" in out, out[:2000]
        assert "is queued (controller_stopped)" in out, out[-3000:]
    finally:
        now = run_cli("down", "--now", *state)
        shutil.rmtree(other, ignore_errors=True)
    assert now.returncode == 0 and "without checkpoints" in now.stdout, now.stdout
