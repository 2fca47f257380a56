"""`pathways-lite rotate-secret` signals only a verified controller of the state dir: a stale
controller.json's pid, another process's by now, gets no SIGHUP (its default action would
kill it) and the error names the state dir."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from pathways_lite.controller.auth import TokenError, request_rotation

pytestmark = pytest.mark.timeout(60)


def test_rotation_refuses_a_stale_controller_record_and_signals_nothing(tmp_path) -> None:
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        (tmp_path / "controller.json").write_text(
            json.dumps({"address": "127.0.0.1:1", "pid": bystander.pid})
        )
        with pytest.raises(TokenError, match=rf"{tmp_path}.*pid {bystander.pid}.*not a controller"):
            request_rotation(tmp_path, grace_s=10, timeout_s=1)
        assert bystander.poll() is None
        assert not (tmp_path / "rotate.json").exists()
    finally:
        if bystander.poll() is None:
            os.killpg(bystander.pid, signal.SIGKILL)
        bystander.wait(10)
