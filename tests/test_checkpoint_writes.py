"""A host's checkpoint writes (workers/checkpoint.py's JobCheckpoints and CheckpointWriter)
with real orbax saves into a temporary folder."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import jax.numpy as jnp
import pytest

from pathways_lite.workers.checkpoint import (
    CheckpointWriter,
    JobCheckpoints,
    checkpoint_path,
    is_committed,
)

pytestmark = pytest.mark.timeout(60)


@dataclasses.dataclass
class StateOnTheMesh:
    """What JobCheckpoints reads of a loaded runtime: its spec and `checkpoint_state`
    (PalmRuntime's returns its params, optimizer state and steps applied)."""

    spec: object
    step: int = 3

    def checkpoint_state(self):
        params = {"w": jnp.arange(6.0, dtype=jnp.float32).reshape(2, 3) + self.step}
        return params, {"m": jnp.zeros((3,), jnp.float32)}, self.step


def writer_of(tmp_path: Path) -> tuple[JobCheckpoints, StateOnTheMesh]:
    spec = type("Spec", (), {"job_id": "p", "generation": 2, "island_index": 0})()
    runtime = StateOnTheMesh(spec)
    checkpoints = JobCheckpoints(runtime, str(tmp_path / "stage0"))
    assert checkpoints.writes
    return checkpoints, runtime


def test_a_save_of_a_step_already_committed_returns_it_instead_of_writing_again(tmp_path):
    """A drain's second SaveCheckpoint(save=True) reaches the stage that already committed
    the step (another stage had not): it answers with that checkpoint, as committed."""
    checkpoints, runtime = writer_of(tmp_path)
    try:
        first = checkpoints.save()
        checkpoints.wait()
        assert first == (3, checkpoint_path(tmp_path / "stage0", 2, 3))
        assert checkpoints.save() == first  # orbax: "Destination ... already exists"
        checkpoints.wait()
        assert checkpoints.committed == [3] and is_committed(first[1])
        runtime.step = 4  # a later step is written as before
        assert checkpoints.save() == (4, checkpoint_path(tmp_path / "stage0", 2, 4))
        checkpoints.wait()
        assert checkpoints.committed == [3, 4]
    finally:
        checkpoints.close()


def test_a_save_of_the_step_being_written_answers_with_that_write(tmp_path):
    """The first save's commit is held back: a second save of its step returns at once
    (nothing committed yet), and the one write commits."""
    checkpoints, _ = writer_of(tmp_path)
    checkpoints.writer = writer = CheckpointWriter()
    gate = threading.Event()
    finish = writer._checkpointer.wait_until_finished

    def held_back() -> None:  # the commit thread's wait (orbax's own save waits too)
        if threading.current_thread().name == "checkpoint-commit":
            assert gate.wait(30)
        finish()

    writer._checkpointer.wait_until_finished = held_back
    release = threading.Timer(1.0, gate.set)  # the old code waits for the first write
    try:
        first = checkpoints.save()
        release.start()
        assert checkpoints.save() == first
        assert checkpoints.committed == []  # still being written
        gate.set()
        checkpoints.wait()
        assert checkpoints.committed == [3] and is_committed(first[1])
        assert [p.name for p in (tmp_path / "stage0").iterdir()] == ["g2-step3"]
    finally:
        release.cancel()
        gate.set()
        checkpoints.close()


def test_a_failed_write_does_not_drop_the_next_checkpoint(tmp_path):
    """The write of step 3 fails as orbax finalises it (on the commit thread). The next
    save, step 4's (a RunStep's checkpoint), is written and committed; before, the failure
    of step 3 was raised again when step 4's save began, and step 4 was never written."""
    checkpoints, runtime = writer_of(tmp_path)
    checkpoints.writer = writer = CheckpointWriter()
    finish = writer._checkpointer.wait_until_finished
    failed: list[str] = []

    def fails_once() -> None:
        finish()
        if threading.current_thread().name == "checkpoint-commit" and not failed:
            failed.append("step 3")
            raise OSError("No space left on device")

    writer._checkpointer.wait_until_finished = fails_once
    try:
        checkpoints.save_after_step(2)  # the state after 3 steps
        runtime.step = 4
        checkpoints.save_after_step(3)
        checkpoints.wait()
        assert failed == ["step 3"]
        assert checkpoints.committed == [4]
        assert is_committed(checkpoint_path(tmp_path / "stage0", 2, 4))
    finally:
        checkpoints.close()
