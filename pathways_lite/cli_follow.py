"""`submit --follow`: one live progress line of a job until it ends.

On a terminal the line is redrawn in place (rich); its fields come in order of importance:
name and state (with the phase before the first step: `preparing data`, `compiling`),
steps, ETA, then loss, tokens/s and MFU, cut to the terminal's width from the end, and a bar
only when the width leaves room, so an 80-column terminal still shows the ETA. Without a
terminal (CI logs, a pipe) it prints a plain line at every change of state or phase and about
every 5% of the steps.
"""

from __future__ import annotations

import time
from typing import Any

# Widest terminal that gets no progress bar (the fields need about this much).
BAR_MIN_WIDTH = 110
# Longer job names are cut on the line (the id is printed at submit).
NAME_MAX = 24
# Without a terminal: a line about every this fraction of the steps.
PLAIN_EVERY = 0.05


def eta_text(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _Line:
    """What the progress line shows, updated from WatchJob replies."""

    def __init__(self, job, state: str) -> None:
        self.name = job.name
        self.total = job.spec.train.steps or 0
        self.state = state
        self.phase = job.phase
        self.completed = job.steps_completed
        self.loss = self.tps = self.mfu = "-"
        self.started = time.monotonic()
        self.first: tuple[float, int] | None = None  # (time, completed) at the first step seen

    def step(self, m) -> None:
        self.completed = m.step + 1
        self.loss, self.tps, self.mfu = f"{m.loss:.4f}", f"{m.tokens_per_s:,.0f}", f"{m.mfu:.2%}"
        self.phase = ""
        if self.first is None:
            self.first = (time.monotonic(), self.completed)

    def eta_s(self) -> float | None:
        if self.first is None or self.completed <= self.first[1]:
            return None
        rate = (self.completed - self.first[1]) / (time.monotonic() - self.first[0])
        return max(0.0, (self.total - self.completed) / rate)

    def state_text(self) -> str:
        return self.state + (f" ({self.phase})" if self.phase else "")

    def plain(self) -> str:
        name = self.name if len(self.name) <= NAME_MAX else self.name[: NAME_MAX - 1] + "~"
        return (
            f"{name} {self.state_text()} {self.completed}/{self.total} "
            f"ETA {eta_text(self.eta_s())} loss {self.loss} {self.tps} tok/s MFU {self.mfu}"
        )


def follow(client, job, console: Any = None):
    """Follow a job with a live progress line until it ends; Ctrl-C stops following only.

    Args:
        client: a ControllerClient.
        job: the job's record (from submit).
        console: a rich Console (tests pass one; default stdout's).

    Returns:
        The job's final record, or None when the user stopped following (Ctrl-C).
    """
    from rich.console import Console

    from pathways_lite.client import state_name

    console = console or Console()
    line = _Line(job, state_name(job.state))
    try:
        if console.is_terminal:
            _follow_live(client, job.id, line, console)
        else:
            _follow_plain(client, job.id, line, console)
    except KeyboardInterrupt:
        latest = client.get(job.id)
        console.print(
            f"stopped following {latest.id}; it is still {state_name(latest.state)} "
            f"(`pathways-lite status {latest.id}`)",
            markup=False,
            highlight=False,
        )
        return None
    job = client.get(job.id)
    console.print(f"{job.id} {state_name(job.state)}: {job.message}", markup=False, highlight=False)
    return job


def _updates(client, job_id: str, line: _Line):
    from pathways_lite.client import state_name

    for update in client.watch(job_id):
        if update.HasField("metrics"):
            line.step(update.metrics)
        elif update.HasField("job"):
            line.state = state_name(update.job.state)
            line.phase = update.job.phase
            line.completed = max(line.completed, update.job.steps_completed)
        yield update


def _follow_plain(client, job_id: str, line: _Line, console) -> None:
    every = max(1, int(line.total * PLAIN_EVERY))
    said = ("", -1)
    console.print(line.plain(), markup=False, highlight=False)
    for update in _updates(client, job_id, line):
        now = (line.state_text(), line.completed // every)
        if now != said or (update.HasField("metrics") and line.completed == line.total):
            said = now
            console.print(line.plain(), markup=False, highlight=False)


def _follow_live(client, job_id: str, line: _Line, console) -> None:
    from rich.progress import BarColumn, Progress, TextColumn

    # One text column cut to the width (what matters first comes first), and a bar when the
    # terminal is wide enough for both.
    columns: list[Any] = [TextColumn("{task.fields[line]}", markup=False)]
    if console.width >= BAR_MIN_WIDTH:
        columns.append(BarColumn())

    def text() -> str:
        return line.plain()[: console.width - 1 - (40 if len(columns) > 1 else 0)]

    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("train", total=line.total or None, line=text())
        for _ in _updates(client, job_id, line):
            progress.update(task, completed=line.completed, line=text())
