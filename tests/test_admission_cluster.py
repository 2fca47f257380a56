"""Admission on a live cluster started by `pathways-lite up --island-memory 56MiB`: the README's
job holds about 17 MiB per device at the peak of its step, so one fits an island's 28 MiB per
device and two do not. Also the MFU peak: measured once per machine, the same after down/up.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pathways_lite import cli
from pathways_lite.client import ControllerClient, state_name
from pathways_lite.spec import load_spec_text

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

# The README's quick-start job (a smaller corpus, so its tokenizer trains in seconds).
README_JOB = """\
name: {name}
model: {{preset: palm-tiny}}
islands: 2
devices_per_island: 2
mesh: {{data: 1, model: 2}}
train: {{steps: {steps}, global_batch: 8, seq_len: 64, seed: 0}}
data: {{source: stdlib, vocab_size: 8192, max_bytes: 1000000}}
"""
TERMINAL = {"succeeded", "failed", "cancelled"}


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pathways_lite.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def islands_json(state_dir: str, capsys) -> list[dict]:
    """The islands once the controller knows its MFU peak (read or measured at its start)."""
    deadline = time.monotonic() + 60
    while True:
        assert cli.main(["islands", "--json", "--state-dir", state_dir]) == 0
        islands = json.loads(capsys.readouterr().out)
        if all(i["peak_flops"] > 0 for i in islands) or time.monotonic() > deadline:
            return islands
        time.sleep(0.2)


def test_one_job_per_island_at_a_time_and_a_preempted_job_resumes_once_it_fits(capsys) -> None:
    """The issue's scenario: A runs, B and C wait (never two on an island); B raised above A
    suspends A; when B ends A resumes and C runs after it: every job ends, no island idles
    for good. The peak MFU is measured against is shown by `islands` and is the same after
    `down` and `up`."""
    state = Path(tempfile.mkdtemp(prefix="pladm-", dir="/tmp"))
    up = ["up", "--islands", "2", "--devices-per-island", "2", "--island-memory", "56MiB"]
    try:
        started = run_cli(*up, "--state-dir", str(state))
        assert started.returncode == 0, started.stderr
        first = islands_json(str(state), capsys)
        peak = first[0]["peak_flops"]
        assert peak > 0 and {i["peak_flops"] for i in first} == {peak}, first
        specs = {}
        for name, steps in (("a", 60), ("b", 5), ("c", 5)):
            specs[name] = state / f"{name}.yaml"
            specs[name].write_text(README_JOB.format(name=name, steps=steps))
        with ControllerClient(str(state)) as client:
            ids = {n: client.submit(load_spec_text(p.read_text())).id for n, p in specs.items()}
            seen = {"suspended": False}

            def watch() -> dict[str, str]:
                for island in client.islands():
                    # The sum of the residents never exceeds the budget: one job at a time.
                    assert len(island.job_ids) <= 1, island
                states = {n: state_name(client.get(j).state) for n, j in ids.items()}
                if states["a"] == "suspended":
                    seen["suspended"] = True
                    seen["why"] = seen.get("why") or client.get(ids["a"]).pending_reason
                return states

            deadline = time.monotonic() + 240
            while watch()["a"] != "running" or len(client.get(ids["a"]).losses) < 2:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            states = watch()
            assert states["b"] == states["c"] == "queued", states
            why_b = client.get(ids["b"]).pending_reason
            assert "MiB per device" in why_b and ids["a"] in why_b, why_b
            assert cli.main(["priority", ids["b"], "10", "--state-dir", str(state)]) == 0
            capsys.readouterr()
            while not TERMINAL >= set(states.values()):
                assert time.monotonic() < deadline, states
                time.sleep(0.1)
                states = watch()
            assert states == {"a": "succeeded", "b": "succeeded", "c": "succeeded"}, states
            assert seen["suspended"], "a was never suspended for b"
            # While suspended, `why` says what it waits for (not the preemption's message).
            assert seen["why"] == "" or seen["why"].startswith(
                ("Suspended: Needs", f"Suspended: its islands are kept for {ids['b']}")
            ), seen
            ends = {n: client.get(j) for n, j in ids.items()}
            # A resumed after B ended; C ran after A had resumed (it came later in the queue).
            assert ends["b"].finished_at.ToNanoseconds() <= ends["a"].finished_at.ToNanoseconds()
            assert len(ends["a"].losses) == 60
        down = run_cli("down", "--state-dir", str(state))
        assert down.returncode == 0, down.stderr
        again = run_cli(*up, "--state-dir", str(state))
        assert again.returncode == 0, again.stderr
        second = islands_json(str(state), capsys)
        assert [i["peak_flops"] for i in second] == [i["peak_flops"] for i in first]
        assert second[0]["peak_flops_source"] == "cached", second
        assert cli.main(["islands", "--state-dir", str(state)]) == 0
        assert f"peak of {peak:.4g} FLOP/s (cached)" in capsys.readouterr().out
    finally:
        run_cli("down", "--state-dir", str(state))
        shutil.rmtree(state, ignore_errors=True)
