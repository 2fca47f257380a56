"""A job's hosts' execution logs as a Chrome / Perfetto trace (`pathways-lite trace`).

The Trace Event Format's JSON object: one process per island, one thread (track) per host of
it; every step the host ran is a complete event ("ph": "X") named `step N` with the job in
its args, and the step's parts (a pipeline stage's microbatch forwards "F3" and backwards
"B3", its "exchange") are complete events nested inside it on the same track. Steps of other
jobs sharing the hosts are included under their own names (`other-job step N`), so the
trace shows co-residence. Times are microseconds from the earliest event.
"""

from __future__ import annotations

from typing import Any


def parse_steps(text: str) -> tuple[int, int]:
    """`A:B` (steps A to B - 1; either end may be empty) -> (first, stop).

    Raises:
        ValueError: not of that form, or an empty range.
    """
    first, sep, stop = text.partition(":")
    if not sep:
        raise ValueError(f"--steps={text!r} must be A:B (steps A to B - 1; A: or :B too).")
    try:
        a = int(first) if first else 0
        b = int(stop) if stop else 1 << 62
    except ValueError:
        raise ValueError(f"--steps={text!r} must be A:B with whole numbers.") from None
    if a < 0 or b <= a:
        raise ValueError(f"--steps={text!r} is an empty range.")
    return a, b


def chrome_trace(reply: Any, steps: tuple[int, int] = (0, 1 << 62)) -> dict[str, Any]:
    """The Chrome trace of a TraceReply, the job's steps limited to [first, stop) (and
    other jobs' steps to the time those steps span)."""
    job = reply.job_id
    first, stop = steps
    mine = [
        (h, s) for h in reply.hosts for s in h.steps if s.job_id == job and first <= s.step < stop
    ]
    if mine:
        lo = min(s.start_unix_ns for _, s in mine)
        hi = max(s.end_unix_ns for _, s in mine)
    else:
        lo, hi = 0, 0
    islands = sorted({h.island for h in reply.hosts})
    pid = {name: i + 1 for i, name in enumerate(islands)}
    events: list[dict[str, Any]] = []
    for name in islands:
        events.append({"ph": "M", "name": "process_name", "pid": pid[name], "args": {"name": name}})
    for h in reply.hosts:
        tid = h.host_index + 1
        events.append(
            {
                "ph": "M",
                "name": "thread_name",
                "pid": pid[h.island],
                "tid": tid,
                "args": {"name": f"host {h.host_index} ({h.address})"},
            }
        )
        for s in h.steps:
            if s.job_id == job:
                if not first <= s.step < stop:
                    continue
            elif not mine or s.end_unix_ns < lo or s.start_unix_ns > hi:
                continue
            label = f"step {s.step}" if s.job_id == job else f"{s.job_id} step {s.step}"
            common = {"pid": pid[h.island], "tid": tid}
            events.append(
                {
                    **common,
                    "ph": "X",
                    "cat": "step" if s.job_id == job else "co-resident",
                    "name": label,
                    "ts": (s.start_unix_ns - lo) / 1e3,
                    "dur": max(s.end_unix_ns - s.start_unix_ns, 0) / 1e3,
                    "args": {"job": s.job_id, "step": s.step, "generation": s.generation},
                }
            )
            for part in s.slices:
                kind = "exchange" if part.name == "exchange" else "microbatch"
                events.append(
                    {
                        **common,
                        "ph": "X",
                        "cat": kind,
                        "name": part.name,
                        "ts": (part.start_unix_ns - lo) / 1e3,
                        "dur": max(part.end_unix_ns - part.start_unix_ns, 0) / 1e3,
                        "args": {"job": s.job_id, "step": s.step},
                    }
                )
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"job": job}}
