"""`submit --follow` and the user-facing formats: the ETA survives 80 columns and a pipe,
phases before the first step are shown, bytes read in binary units, data paths are checked."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from pathways_lite.cli_follow import follow
from pathways_lite.controller.data_paths import check_data_paths
from pathways_lite.controller.options import format_size
from pathways_lite.controller.spec import SpecError
from pathways_lite.controller.states import JobState
from pathways_lite.v1 import controller_pb2

pytestmark = pytest.mark.timeout(60)

STEPS = 40


def job(state: JobState = JobState.RUNNING, phase: str = "", done: int = 0):
    j = controller_pb2.Job(
        id="a-rather-long-job-name-0123abcd",
        name="a-rather-long-job-name",
        state=state.to_proto(),
        phase=phase,
        steps_completed=done,
    )
    j.spec.train.steps = STEPS
    return j


class FakeClient:
    """WatchJob replies of a job that prepares data, compiles, then runs STEPS steps."""

    def watch(self, job_id):
        yield controller_pb2.WatchJobReply(job=job(phase="preparing data"))
        yield controller_pb2.WatchJobReply(job=job(phase="compiling"))
        for step in range(STEPS):
            m = controller_pb2.StepMetrics(step=step, loss=5.0, tokens_per_s=12345.0, mfu=0.1234)
            yield controller_pb2.WatchJobReply(metrics=m)
        yield controller_pb2.WatchJobReply(job=job(JobState.SUCCEEDED, done=STEPS))

    def get(self, job_id):
        return job(JobState.SUCCEEDED, done=STEPS)


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal-80-columns", "no-terminal"])
def test_the_follow_line_keeps_its_eta_and_shows_the_phases(terminal) -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=80, color_system=None)
    final = follow(FakeClient(), job(JobState.QUEUED), console=console)
    assert final is not None and final.steps_completed == STEPS
    text = out.getvalue()
    # Redraws are separated by cursor controls on a terminal, by newlines in a log.
    lines = [ln for ln in re.split(r"[\r\n]|\x1b\[[0-9;?]*[A-Za-z]", text) if f"/{STEPS}" in ln]
    assert lines and all("ETA" in ln for ln in lines), text
    assert all(len(ln.rstrip()) <= 80 for ln in lines), text
    assert any(f"{STEPS}/{STEPS}" in ln and "ETA 0:00:00" in ln for ln in lines), text
    if not terminal:  # a CI log gets the phases as lines of their own
        assert "(preparing data)" in text and "(compiling)" in text, text
        assert len(lines) < STEPS, text  # about every 5%, not every step


def test_bytes_read_in_binary_units() -> None:
    # The figures of issue 21's report: `island-0: -2061292 of 15728640 free`.
    assert format_size(-2061292) == "-1.97 MiB"
    assert format_size(15728640) == "15.0 MiB"
    assert format_size(17789932) == "17.0 MiB"
    assert format_size(512) == "512 B" and format_size(3 * 2**30) == "3.00 GiB"


def test_data_paths_are_checked_at_submit_naming_the_entry(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("hello")
    spec = controller_pb2.JobSpec()
    spec.data.source = "files"
    spec.data.paths.extend([str(tmp_path / "*.txt"), str(tmp_path)])
    check_data_paths(spec)  # a glob and a folder
    spec.data.paths.append("/nonexistent/*.txt")
    with pytest.raises(SpecError) as missing:
        check_data_paths(spec)
    assert missing.value.field == "data.paths[2]" and "/nonexistent/*.txt" in str(missing.value)
    del spec.data.paths[2]
    # An object-store URL: nothing reads one (it failed at the job's start, "matches no files").
    spec.data.paths.append("gs://bucket/corpus/*")
    with pytest.raises(SpecError, match=r"data.paths\[2\].*is a URL"):
        check_data_paths(spec)
    spec.data.source = "stdlib"  # paths are not read: not checked
    check_data_paths(spec)
