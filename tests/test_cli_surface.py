"""The user-facing CLI on the session's LocalCluster: logs, why, sample, dashboard, cancel
--json, submit --follow (and Ctrl-C stops following, not the job); every --json output parses
and every error path is one line with a non-zero exit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pathways_lite import cli, cli_cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SPEC = """\
name: {name}
model: {{preset: palm-tiny}}
islands: 1
devices_per_island: 2
mesh: {{data: 1, model: 2}}
train: {{steps: {steps}, global_batch: 4, seq_len: 64, seed: 1}}
data: {{source: stdlib, vocab_size: 1024, max_bytes: 1000000}}
"""


def main(capsys, *args: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(args))
    except SystemExit as e:  # argparse usage errors
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def spec_file(tmp_path, name: str, steps: int) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(SPEC.format(name=name, steps=steps))
    return str(path)


def wait_running(state: str, job_id: str, capsys, min_steps: int = 1, timeout_s: float = 120):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code, out, _ = main(capsys, "status", job_id, "--json", "--state-dir", state)
        record = json.loads(out)
        if record["state"] == "running" and record["steps_completed"] >= min_steps:
            return record
        assert record["state"] in ("queued", "running"), record
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not run {min_steps} steps in {timeout_s} s")


def test_json_outputs_parse_and_sample_why_logs_work_on_a_running_job(
    local_cluster, tmp_path, capsys
) -> None:
    state = str(local_cluster.state_dir)
    code, out, _ = main(
        capsys,
        "submit",
        spec_file(tmp_path, "surface-long", 100000),
        "--json",
        "--state-dir",
        state,
    )
    assert code == 0
    long_id = json.loads(out)["id"]
    code, out, _ = main(
        capsys, "submit", spec_file(tmp_path, "surface-next", 5), "--json", "--state-dir", state
    )
    next_id = json.loads(out)["id"]
    try:
        wait_running(state, long_id, capsys)
        # `why` of a second job: queued behind the long one (its reason names what it lacks),
        # or, when the scheduler fits both on the island (multi-tenancy), running beside it.
        code, out, _ = main(capsys, "why", next_id, "--json", "--state-dir", state)
        why = json.loads(out)
        assert code == 0 and why["id"] == next_id and why["reason"]
        if why["state"] == "queued":
            assert why["queue_position"] >= 1 and why["reason"] != "Running on island-0."
        else:
            assert why["state"] in ("running", "succeeded"), why
        code, out, _ = main(capsys, "why", long_id, "--json", "--state-dir", state)
        assert json.loads(out)["reason"] == "Running on island-0."
        code, out, _ = main(capsys, "why", long_id, "--state-dir", state)
        assert code == 0 and "why" in out and "Running on island-0." in out

        code, out, _ = main(
            capsys,
            "sample",
            long_id,
            "--prompt",
            "def ",
            "--max-new-tokens",
            "8",
            "--json",
            "--state-dir",
            state,
        )
        sample = json.loads(out)
        assert code == 0 and sample["job_id"] == long_id and sample["prompt"] == "def "
        assert sample["text"] and sample["steps_applied"] >= 1 and sample["island"] == "island-0"

        code, out, _ = main(capsys, "logs", long_id, "--tail", "5", "--json", "--state-dir", state)
        lines = [json.loads(line) for line in out.splitlines()]
        assert code == 0 and 1 <= len(lines) <= 5 and all("message" in r for r in lines)
        code, out, _ = main(capsys, "logs", long_id, "--tail", "3", "--state-dir", state)
        assert code == 0 and len(out.splitlines()) == 3 and "loss" in out

        code, out, _ = main(capsys, "dashboard", "--json", "--state-dir", state)
        dash = json.loads(out)
        assert (
            dash["dashboard"].startswith("http://127.0.0.1:")
            and "?token=" in dash["url_with_token"]
        )
        for args in (("jobs",), ("islands",), ("status", long_id)):
            code, out, _ = main(capsys, *args, "--json", "--state-dir", state)
            assert code == 0 and json.loads(out) is not None
        code, out, _ = main(capsys, "status", long_id, "--json", "--state-dir", state)
        record = json.loads(out)
        assert record["last_metrics"]["loss"] > 0 and record["mfu"] >= 0
    finally:
        code, out, _ = main(capsys, "cancel", long_id, "--json", "--state-dir", state)
    assert code == 0 and json.loads(out)["state"] == "cancelled"
    # Cancelled before any checkpoint: nothing remains to sample, and sample says so in one line.
    code, _, err = main(capsys, "sample", long_id, "--prompt", "def ", "--state-dir", state)
    assert code != 0 and err.count("\n") == 1 and "ended (cancelled)" in err
    assert "without a committed checkpoint" in err


def test_submit_follow_ends_with_the_final_state(local_cluster, tmp_path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pathways_lite.cli",
            "submit",
            spec_file(tmp_path, "surface-follow", 6),
            "--follow",
            "--state-dir",
            str(local_cluster.state_dir),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    assert "6/6" in done.stdout and "succeeded: Completed 6 steps." in done.stdout
    assert "loss" in done.stdout and "tok/s" in done.stdout and "MFU" in done.stdout


def test_ctrl_c_stops_following_not_the_job(local_cluster, tmp_path, capsys) -> None:
    state = str(local_cluster.state_dir)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pathways_lite.cli",
            "submit",
            spec_file(tmp_path, "surface-interrupt", 100000),
            "--follow",
            "--state-dir",
            state,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    job_id = None
    try:
        deadline = time.monotonic() + 120
        while job_id is None and time.monotonic() < deadline:
            code, out, _ = main(capsys, "jobs", "--json", "--state-dir", state)
            ids = [j["id"] for j in json.loads(out) if j["name"] == "surface-interrupt"]
            job_id = ids[0] if ids else None
            time.sleep(0.3)
        assert job_id is not None
        wait_running(state, job_id, capsys)
        os.kill(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert f"stopped following {job_id}" in out
        code, out, _ = main(capsys, "status", job_id, "--json", "--state-dir", state)
        assert json.loads(out)["state"] == "running"
    finally:
        if proc.poll() is None:
            proc.kill()
        if job_id is not None:
            main(capsys, "cancel", job_id, "--state-dir", state)


def test_every_error_path_is_one_line_and_nonzero(local_cluster, tmp_path, capsys) -> None:
    state = str(local_cluster.state_dir)
    cases = [
        (("why", "no-such-job"), "does not exist"),
        (("logs", "no-such-job"), "does not exist"),
        (("sample", "no-such-job", "--prompt", "x"), "does not exist"),
        (("status", "no-such-job", "--json"), "does not exist"),
        (("cancel", "no-such-job", "--json"), "does not exist"),
        (("sample", "x", "--prompt", "x", "--max-new-tokens", "0"), "--max-new-tokens=0"),
        (("sample", "x"), "--prompt"),  # argparse: a missing option
        (("logs",), "job"),
        (("jobs", "--bogus"), "--bogus"),
    ]
    for args, needle in cases:
        code, out, err = main(capsys, *args, "--state-dir", state)
        assert code != 0 and err.count("\n") == 1, (args, err)
        assert needle in err and "Traceback" not in err, (args, err)
    # The spec's name validation refuses markup in a job name (the dashboard test shows the
    # escaping of other user strings): one line too.
    path = tmp_path / "xss.yaml"
    path.write_text(SPEC.format(name="'<script>alert(1)</script>'", steps=1))
    code, _, err = main(capsys, "submit", str(path), "--state-dir", state)
    assert code != 0 and err.count("\n") == 1 and "name=" in err
    # Without a cluster: one line each.
    for args in (("why", "x"), ("sample", "x", "--prompt", "y"), ("logs", "x"), ("dashboard",)):
        code, _, err = main(capsys, *args, "--state-dir", str(tmp_path / "none"))
        assert code != 0 and err.count("\n") == 1 and "no controller" in err, (args, err)


def test_up_records_the_dashboard_and_a_private_token(local_cluster) -> None:
    info = cli_cluster.up_info(local_cluster)
    assert info["dashboard"].startswith("http://127.0.0.1:")
    assert info["controller"].startswith("127.0.0.1:")
    token_file = local_cluster.state_dir / "token"
    assert info["token_file"] == str(token_file)
    assert (token_file.stat().st_mode & 0o777) == 0o600
