"""`pathways-lite model info`: the console script in a subprocess, table and JSON output."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLI = REPO / ".venv" / "bin" / "pathways-lite"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    assert CLI.exists(), f"{CLI} is missing: install the project into .venv (make test does)"
    return subprocess.run(
        [str(CLI), *args], capture_output=True, text=True, timeout=120, env=dict(os.environ)
    )


def test_model_info_json_for_palm_8b():
    proc = run_cli("model", "info", "--preset", "palm-8b", "--seq-len", "1024", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["params"] == 8_632_012_800
    assert info["flops_per_token"] == 6 * 8_632_012_800 + 12 * 32 * 16 * 256 * 1024
    assert info["seq_len"] == 1024
    assert info["params_bytes"] == 4 * 8_632_012_800 and info["opt_state_bytes"] > 0


def test_model_info_table_for_palm_tiny():
    proc = run_cli("model", "info", "--preset", "palm-tiny")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["quantity", "value"]
    rows = {line.split()[0]: line.split(None, 1)[1] for line in lines[1:]}
    assert rows["params"] == "151.74K"
    assert rows["seq_len"] == "2048"
    assert "FLOP" in rows["flops_per_token"] and "B" in rows["params_bytes"]


def test_unknown_preset_exits_non_zero_with_one_line():
    proc = run_cli("model", "info", "--preset", "palm-9000")
    assert proc.returncode != 0
    assert proc.stdout == ""
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "palm-9000" in err[0] and "palm-8b" in err[0]
