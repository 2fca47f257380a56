"""The `pathways-lite` commands that show jobs: `jobs`, `status`, `logs` and `eval`.

A job is named by its id, its unique name or a unique prefix of its id; the controller
resolves it (one resolver for every command and the SDK). `jobs` lists the newest first.
Output into a closed pipe (`logs JOB | head`) ends quietly.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

from pathways_lite.cli_common import print_json, print_table

# Events `status` prints (the newest; `--json` has them all).
EVENTS_SHOWN = 8
JOB_STATES = ("queued", "running", "suspended", "succeeded", "failed", "cancelled")


def _client(args: argparse.Namespace):
    from pathways_lite.client import ControllerClient

    return ControllerClient(args.state_dir)


def print_job(job, as_json: bool) -> None:
    """`status`: one job's fields, its newest events (`--json`: everything)."""
    from pathways_lite.client import job_to_dict

    record = job_to_dict(job)
    if as_json:
        print_json(record)
        return
    state = record["state"] + (f" ({record['phase']})" if record["phase"] else "")
    rows = [("id", record["id"]), ("name", record["name"]), ("state", state)]
    rows += [(k, record[k]) for k in ("steps_completed", "reason")]
    rows.append(("islands", ", ".join(record["islands"])))
    if record["message"]:
        rows.append(("message", record["message"]))
    if record["losses"]:
        rows.append(("last loss", f"{record['losses'][-1]:.6f}"))
    if record["resumed_from_step"] is not None:
        rows.append(("resumed from step", record["resumed_from_step"]))
    print_table(rows, header=("field", "value"))
    if job.stage_layout:
        print("\npipeline stages:")
        for line in job.stage_layout:
            print(f"  {line}")
    if record["events"]:
        print("\nevents (newest last):")
        for event in record["events"][-EVENTS_SHOWN:]:
            print(f"  {event['time'][:19].replace('T', ' ')}  {event['message']}")


def cmd_status(args: argparse.Namespace) -> int:
    print_job(_client(args).get(args.job), args.json)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """`eval JOB`: the job's newest evaluation per source (`--all`: every one; `--json`:
    {"step", "sources": {NAME: {"loss", "perplexity", "exact_match", "token_f1",
    "examples"}}}, exact match and F1 only for text-to-text sources)."""
    from pathways_lite.client import eval_to_dict

    job = _client(args).get(args.job)
    results = [eval_to_dict(e) for e in job.evals]
    if not results:
        print(
            f"pathways-lite: error: job {job.id} has no evaluation yet (kind: eval jobs and "
            "train.eval_every record them).",
            file=sys.stderr,
        )
        return 1
    shown = results if args.all else results[-1:]
    if args.json:
        print_json(shown if args.all else shown[0])
        return 0
    rows = []
    for r in shown:
        for name, e in r["sources"].items():
            rows.append(
                (
                    r["step"],
                    r["shots"],
                    name,
                    f"{e['loss']:.4f}",
                    f"{e['perplexity']:.2f}",
                    "-" if "exact_match" not in e else f"{e['exact_match']:.3f}",
                    "-" if "token_f1" not in e else f"{e['token_f1']:.3f}",
                    e["examples"],
                )
            )
    print_table(rows, header=("step", "shots", "source", "loss", "ppl", "exact", "f1", "examples"))
    return 0


def add_eval_command(add) -> None:
    """Register `eval` with the CLI's `add(name, help, fn)`."""
    ev = add("eval", "print a job's evaluation (loss, perplexity, exact match, F1)", cmd_eval)
    ev.add_argument("job", help="the job: its id, its name or a unique id prefix")
    ev.add_argument("--all", action="store_true", help="every evaluation, oldest first")


def duration(job, now: datetime.datetime | None = None) -> str:
    """How long a job has run (until it ended, or until now): `1h02m`, `3m05s`, `12s`."""
    if not job.HasField("started_at"):
        return "-"
    start = job.started_at.ToDatetime(tzinfo=datetime.UTC)
    if job.HasField("finished_at"):
        end = job.finished_at.ToDatetime(tzinfo=datetime.UTC)
    else:
        end = now or datetime.datetime.now(datetime.UTC)
    seconds = max(0, int((end - start).total_seconds()))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def cmd_jobs(args: argparse.Namespace) -> int:
    """`jobs [--state S]... [--limit N]`: the newest jobs first."""
    from pathways_lite.client import job_to_dict, state_name

    jobs = _client(args).list(states=tuple(args.state or ()), limit=args.limit)
    if args.json:
        print_json([job_to_dict(j) | {"duration": duration(j)} for j in jobs])
        return 0
    rows = []
    for j in jobs:
        state = state_name(j.state) + (f" ({j.phase})" if j.phase else "")
        loss = f"{j.last_metrics.loss:.4f}" if j.HasField("last_metrics") else "-"
        steps = f"{j.steps_completed}/{j.spec.train.steps}"
        rows.append((j.id, state, steps, loss, duration(j), j.reason))
    print_table(rows, header=("id", "state", "steps", "loss", "duration", "reason"))
    return 0


def add_job_listing_options(jobs: argparse.ArgumentParser) -> None:
    jobs.add_argument(
        "--state",
        action="append",
        choices=JOB_STATES,
        help="only jobs in this state (repeat for several)",
    )
    jobs.add_argument(
        "--limit", type=int, default=0, help="only the newest N jobs (default 0: all)"
    )


def cmd_logs(args: argparse.Namespace) -> int:
    from pathways_lite.client import log_to_dict

    records = _client(args).logs(args.job, tail=args.tail, follow=args.follow)
    try:
        for record in records:
            if args.json:
                line = json.dumps(log_to_dict(record), sort_keys=True)
            else:
                when = record.time.ToDatetime().strftime("%H:%M:%S.%f")[:-3]
                line = f"{when} {record.source:<12} {record.level:<7} {record.message}"
            print(line, flush=True)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `logs JOB | head`: the reader has what it wanted
        quiet_stdout()
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    """Write the job's hosts' execution logs as a Chrome / Perfetto trace."""
    from pathways_lite.cli_common import CliError
    from pathways_lite.trace import chrome_trace, parse_steps

    try:
        steps = parse_steps(args.steps) if args.steps else (0, 1 << 62)
    except ValueError as e:
        raise CliError(str(e)) from None
    reply = _client(args).trace(args.job)
    trace = chrome_trace(reply, steps)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(trace, f)
    spans = sum(1 for e in trace["traceEvents"] if e["ph"] == "X")
    if args.json:
        print(json.dumps({"job": reply.job_id, "path": args.output, "events": spans}))
    else:
        print(f"wrote {spans} slices of job {reply.job_id} to {args.output}")
    return 0


def add_trace_command(add) -> None:
    trace = add("trace", "write a job's hosts' execution logs as a Chrome trace", cmd_trace)
    trace.add_argument("job", help="the job: its id, its name or a unique id prefix")
    trace.add_argument("--steps", default="", help="A:B: only steps A to B - 1")
    trace.add_argument("-o", "--output", required=True, help="the trace file (JSON) to write")


def quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush into the closed pipe does
    not print an error."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
