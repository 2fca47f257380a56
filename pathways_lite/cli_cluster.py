"""The `pathways-lite` commands that talk to a cluster: `up`/`down` and the job commands.

Each command talks to the controller through the wire client (client.py), prints an aligned
table or, with `--json`, one JSON document, and raises `CliError` for what the user must fix.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

from pathways_lite.cli_common import CliError, print_json, print_table
from pathways_lite.cli_follow import follow
from pathways_lite.cli_jobs import (
    add_eval_command,
    add_job_listing_options,
    add_trace_command,
    cmd_jobs,
    cmd_logs,
    cmd_status,
    print_job,
)


def _client(args: argparse.Namespace):
    from pathways_lite.client import ControllerClient

    return ControllerClient(args.state_dir)


def _island_flags(args: argparse.Namespace) -> list[str]:
    """The flags given that shape the local islands `up` starts."""
    return [
        flag
        for flag, value in (
            ("--islands", args.islands),
            ("--devices-per-island", args.devices_per_island),
            ("--hosts-per-island", args.hosts_per_island),
            ("--island-memory", args.island_memory),
        )
        if value is not None
    ]


def _cmd_up(args: argparse.Namespace) -> int:
    from pathways_lite.controller.options import parse_size
    from pathways_lite.local import LocalCluster

    if args.simulate_islands is not None:
        given = _island_flags(args) + (["--ray-address"] if args.ray_address else [])
        if given:
            raise CliError(
                f"{', '.join(given)} cannot be combined with --simulate-islands: its islands "
                "are simulated in the controller's process (no devices, no Ray)."
            )
        if args.standby_controller:
            raise CliError(
                "--standby-controller cannot be combined with --simulate-islands: the "
                "simulated islands live in the controller's process, so a standby could not "
                "adopt them."
            )
        cluster = LocalCluster(
            state_dir=args.state_dir, simulate_islands=args.simulate_islands, tls=args.tls
        )
        cluster.start()
        if args.json:
            print_json(up_info(cluster))
        else:
            _print_up(cluster)
        return 0
    if args.ray_address is not None:
        given = _island_flags(args)
        if given:
            raise CliError(
                f"{', '.join(given)} cannot be combined with --ray-address: the islands come "
                "from the Ray cluster's node resources (island_<name>)."
            )
        cluster = LocalCluster(
            state_dir=args.state_dir,
            ray_address=args.ray_address,
            ray_token_file=args.ray_token_file,
            node_ip=args.node_ip,
            tls=args.tls,
            standby_controller=args.standby_controller,
        )
        cluster.start()
        if args.json:
            print_json(up_info(cluster))
        else:
            _print_up(cluster)
        return 0
    missing = [
        flag
        for flag, value in (
            ("--islands", args.islands),
            ("--devices-per-island", args.devices_per_island),
        )
        if value is None
    ]
    if missing:
        raise CliError(
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required unless "
            "--ray-address is given."
        )
    memory = None
    if args.island_memory is not None:
        try:
            memory = parse_size(args.island_memory)
        except ValueError as e:
            raise CliError(f"--island-memory: {e}") from None
    try:
        cluster = LocalCluster(
            islands=args.islands,
            devices_per_island=args.devices_per_island,
            hosts_per_island=args.hosts_per_island or 1,
            island_memory=memory,
            state_dir=args.state_dir,
            tls=args.tls,
            standby_controller=args.standby_controller,
        )
    except ValueError as e:
        raise CliError(str(e)) from None
    cluster.start()
    if args.json:
        print_json(up_info(cluster))
    else:
        _print_up(cluster)
    return 0


def up_info(cluster) -> dict[str, Any]:
    """What `up --json` prints: the controller, dashboard and token file of a cluster, and
    its standby controller's pid where it keeps one (`--standby-controller`)."""
    from pathways_lite.controller.options import ADDRESS_FILE
    from pathways_lite.controller.standby import read_standby_pid

    info = json.loads((cluster.state_dir / ADDRESS_FILE).read_text())
    up = {
        "controller": cluster.address,
        "state_dir": str(cluster.state_dir),
        "dashboard": info.get("dashboard", ""),
        "token_file": info.get("token_file", ""),
    }
    standby = read_standby_pid(cluster.state_dir)
    if standby and standby != info.get("pid"):
        up["standby_pid"] = standby
    return up


def _print_up(cluster) -> None:
    info = up_info(cluster)
    print_table(
        [
            ("controller", info["controller"]),
            ("dashboard", info["dashboard"]),
            ("state dir", info["state_dir"]),
            ("token file", info["token_file"]),
            *([("standby pid", str(info["standby_pid"]))] if "standby_pid" in info else []),
        ],
        header=("", ""),
    )
    print("open the dashboard with: pathways-lite dashboard --state-dir " + info["state_dir"])


def _cmd_down(args: argparse.Namespace) -> int:
    """`down`; with `--json`, one document on stdout ({"state_dir", "checkpointed": whether
    the jobs were drained, "jobs": [what was done to each], "drain_error", "stopped"}) and the
    progress lines on stderr. A `down` that stops nothing (no cluster there) fails as every
    command does: one line on stderr, nothing on stdout, a non-zero exit."""
    from pathways_lite.local import CLUSTER_FILE, default_state_dir, drain, stop_recorded

    state_dir = Path(args.state_dir or default_state_dir())
    say = functools.partial(print, file=sys.stderr if args.json else sys.stdout, flush=True)
    if not (state_dir / CLUSTER_FILE).exists():
        raise CliError(f"no cluster was started in state dir {str(state_dir)!r}.")
    drained, drain_error = [], None
    if args.now:
        say("stopping without checkpoints (--now): running jobs resume from their last one")
    else:
        say("checkpointing running and suspended jobs (skip with --now) ...")
        try:
            drained = drain(state_dir)
        except Exception as e:  # a dead controller: nothing to checkpoint, stop anyway
            drain_error = str(e)
            print(f"could not checkpoint the jobs: {e}", file=sys.stderr)
        for job in drained:
            say(f"{job.job_id} ({job.name}): {job.message}")
        if not drained:
            say("no running or suspended jobs")
    if not stop_recorded(state_dir):
        raise CliError(f"no cluster was started in state dir {str(state_dir)!r}.")
    say(f"stopped the cluster of {state_dir}; `pathways-lite up` resumes its queued jobs")
    if args.json:
        jobs = [
            {
                "job_id": j.job_id,
                "name": j.name,
                "step": j.step,
                "checkpointed": j.checkpointed,
                "message": j.message,
            }
            for j in drained
        ]
        print_json(
            {
                "state_dir": str(state_dir),
                "checkpointed": not args.now and drain_error is None,
                "jobs": jobs,
                "drain_error": drain_error,
                "stopped": True,
            }
        )
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    """`submit a.yaml [b.yaml ...]`; `--json` prints one document: the job's record for one
    file, {"jobs": [records in file order]} for several (with "error" when the controller
    refused one part way: the jobs submitted before it are listed, and the exit is non-zero)."""
    from pathways_lite.client import ChainError, ClientError, job_to_dict, state_name
    from pathways_lite.spec import load_spec_file

    specs = [load_spec_file(path, validate=True) for path in args.spec]
    client = _client(args)
    try:
        # A chain: later files may name earlier ones in after / init_from.
        key = args.request_id
        if len(specs) > 1:
            jobs = client.submit_chain(specs, request_id=key)
        else:
            jobs = [client.submit(specs[0], request_id=key)]
    except ChainError as e:
        if args.json:
            print_json({"jobs": [job_to_dict(j) for j in e.submitted], "error": e.message})
        else:
            for job in e.submitted:
                print(f"submitted {job.id} ({state_name(job.state)})")
        raise CliError(e.message) from None
    if not args.json:
        for job in jobs:
            print(f"submitted {job.id} ({state_name(job.state)})")
    if args.follow and not args.json:
        last = follow(client, jobs[-1])
        if last is None:  # Ctrl-C stopped following, not the jobs
            return 0
        jobs = [client.wait(job.id) for job in jobs[:-1]] + [last]
    elif args.wait or args.follow:
        if args.json:
            try:
                jobs = [client.wait(job.id) for job in jobs]
            except ClientError as e:  # their ids, still: they were submitted
                print_json({"jobs": [job_to_dict(j) for j in jobs], "error": e.message})
                raise CliError(e.message) from None
        else:
            for job in jobs[:-1]:
                client.wait(job.id)
            _print_updates(client, jobs[-1].id)
            jobs = [client.get(job.id) for job in jobs]
    if args.json:
        if len(jobs) == 1:
            print_job(jobs[0], True)
        else:
            print_json({"jobs": [job_to_dict(job) for job in jobs]})
    if not (args.wait or args.follow):
        return 0
    failed = [job for job in jobs if state_name(job.state) != "succeeded"]
    if not args.json:
        for job in failed:
            print(
                f"pathways-lite: error: job {job.id} {state_name(job.state)}: {job.message}",
                file=sys.stderr,
            )
    return 1 if failed else 0


def _print_updates(client, job_id: str) -> None:
    """Print a job's steps and state changes until it ends (`submit --wait`)."""
    from pathways_lite.client import state_name

    for update in client.watch(job_id):
        if update.HasField("metrics"):
            m = update.metrics
            print(f"step {m.step}: loss {m.loss:.6f} ({m.tokens_per_s:,.0f} tokens/s)")
        elif update.HasField("job"):
            phase = f" ({update.job.phase})" if update.job.phase else ""
            print(f"{update.job.id} is {state_name(update.job.state)}{phase}")


def _cmd_why(args: argparse.Namespace) -> int:
    from pathways_lite.client import state_name

    job = _client(args).get(args.job)
    state = state_name(job.state)
    if state == "queued" or (state == "suspended" and job.pending_reason):
        reason = job.pending_reason
    elif state == "running":
        reason = f"Running on {', '.join(job.islands) or 'its islands'}."
    else:
        reason = f"The job is {state}" + (f": {job.message}" if job.message else ".")
    record = {
        "id": job.id,
        "state": state,
        "queue_position": job.queue_position,
        "jobs_ahead": list(job.jobs_ahead),
        "reason": reason,
    }
    if args.json:
        print_json(record)
        return 0
    rows = [("job", job.id), ("state", state)]
    if state == "queued":
        rows.append(("queue position", job.queue_position))
        rows.append(("jobs ahead", ", ".join(job.jobs_ahead) or "none"))
    rows.append(("why", reason))
    print_table(rows, header=("field", "value"))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    """`generate JOB "prompt"`: a serving job's completion, streamed with --stream."""
    if args.max_tokens < 1:
        raise CliError(f"--max-tokens={args.max_tokens} must be a positive integer.")
    started = time.perf_counter()
    text, tokens, final = [], [], None
    for reply in _client(args).generate(
        args.job,
        args.prompt,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop or (),
    ):
        if reply.done:
            final = reply
            continue
        text.append(reply.text)
        if reply.token >= 0:
            tokens.append(int(reply.token))
        if args.stream and not args.json:
            print(reply.text, end="", flush=True)
    wall_ms = (time.perf_counter() - started) * 1e3
    if args.json:
        print_json(
            {
                "text": "".join(text),
                "tokens": tokens,
                "ttft_ms": final.ttft_ms if final else wall_ms,
                "ms_per_token": final.ms_per_token if final else 0.0,
                "finish_reason": final.finish_reason if final else "",
                "island": final.island if final else "",
            }
        )
    elif args.stream:
        print()
    else:
        print(args.prompt + "".join(text))
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens={args.max_new_tokens} must be a positive integer.")
    reply = _client(args).sample(
        args.job,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
    )
    if args.json:
        print_json(
            {
                "job_id": reply.job_id,
                "prompt": reply.prompt,
                "text": reply.text,
                "steps_applied": reply.steps_applied,
                "island": reply.island,
                "seconds": reply.seconds,
                "checkpoint": reply.checkpoint,
            }
        )
        return 0
    print(reply.prompt + reply.text)
    if not reply.text.strip():
        print(
            f"-- the model generated only whitespace: after {reply.steps_applied} steps it has "
            "not learned much yet (train longer, e.g. train.steps: 300, or raise --temperature)",
            file=sys.stderr,
        )
    source = f", from checkpoint {reply.checkpoint}" if reply.checkpoint else ""
    print(
        f"-- {reply.job_id} after {reply.steps_applied} steps, on {reply.island} "
        f"({reply.seconds:.2f} s{source})",
        file=sys.stderr,
    )
    return 0


def _cmd_dashboard(args: argparse.Namespace) -> int:
    client = _client(args)
    url = client.dashboard_url(with_token=True)
    if args.json:
        print_json({"dashboard": client.dashboard_url(), "url_with_token": url})
        return 0
    print(url)
    if args.open:
        import webbrowser

        webbrowser.open(dashboard_opener(client.state_dir, url).as_uri())
    return 0


OPENER_FILE = "dashboard.html"


def dashboard_opener(state_dir: str | Path, url_with_token: str) -> Path:
    """A page (`<state_dir>/dashboard.html`, mode 0600) that sends the browser on to
    `url_with_token`: the browser is started with this file's path, so the token never is
    on a command line (`ps` shows those to every user). The dashboard trades the token in
    the URL for a cookie and drops it from the address bar (controller/dashboard_auth.py)."""
    import html

    from pathways_lite.controller.auth import write_secret

    target = html.escape(url_with_token, quote=True)
    page = (
        '<!doctype html><html><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="0; url={target}">'
        '<meta name="referrer" content="no-referrer"><title>pathways-lite dashboard</title>'
        f'</head><body><a href="{target}">Open the pathways-lite dashboard</a></body></html>'
    )
    path = Path(state_dir).resolve() / OPENER_FILE
    write_secret(path, page)
    return path


def _cmd_cancel(args: argparse.Namespace) -> int:
    from pathways_lite.client import job_to_dict, state_name

    job = _client(args).cancel(args.job, args.reason)
    if args.json:
        print_json(job_to_dict(job))
        return 0
    print(f"{job.id} is {state_name(job.state)}")
    return 0


def _cmd_priority(args: argparse.Namespace) -> int:
    from pathways_lite.client import job_to_dict, state_name

    job = _client(args).update(args.job, priority=args.priority)
    if args.json:
        print_json(job_to_dict(job))
        return 0
    where = f", queue position {job.queue_position}" if job.queue_position else ""
    print(f"{job.id} has priority {args.priority} ({state_name(job.state)}{where})")
    return 0


def _cmd_islands(args: argparse.Namespace) -> int:
    from pathways_lite.client import island_to_dict

    islands = [island_to_dict(i) for i in _client(args).islands()]
    if args.json:
        print_json(islands)
        return 0
    rows = [
        (
            i["id"],
            h["node"],
            h["address"],
            h["pid"],
            h["port"],
            h["devices"],
            h.get("state", "ready"),
            ",".join(i["job_ids"]) or "-",
        )
        for i in islands
        for h in i["hosts"]
    ]
    print_table(
        rows, header=("island", "node", "address", "pid", "port", "devices", "state", "job")
    )
    for i in islands:
        if i["down"]:
            print(f"island {i['id']} is down: {i['down']}")
    for i in islands:
        if i["peak_flops"]:
            print(
                f"island {i['id']}: MFU is measured against a peak of {i['peak_flops']:.4g} "
                f"FLOP/s ({i['peak_flops_source']})"
            )
    return 0


def _cmd_health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from pathways_lite.local import default_state_dir, read_address

    address = args.address or read_address(args.state_dir or default_state_dir())
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as e:
            raise CliError(f"health check of {address}: {e.code().name}: {e.details()}") from None
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if args.json:
        print_json({"address": address, "service": args.service, "status": status})
    else:
        print(f"{address} {args.service or '(server)'}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be a positive integer")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"{value} must be in [0, 2**64)")
    return value


def _cmd_rotate_secret(args: argparse.Namespace) -> int:
    from pathways_lite.controller.auth import TokenError, request_rotation
    from pathways_lite.local import default_state_dir

    if not 0 <= args.grace <= 7 * 86400:
        raise CliError(f"--grace {args.grace:g} must be between 0 and 604800 seconds.")
    state_dir = args.state_dir or default_state_dir()
    try:
        result = request_rotation(state_dir, args.grace)
    except TokenError as e:
        raise CliError(str(e)) from None
    if not result.get("ok"):
        raise CliError(f"the controller could not rotate its secrets: {result.get('message')}")
    if args.json:
        print_json({"rotated": True, "grace_s": result["grace_s"]})
    else:
        print(
            f"rotated the access token and the cluster secret of {state_dir}; the old ones are "
            f"accepted for {result['grace_s']:g} s more"
        )
    return 0


def add_cluster_commands(sub) -> None:
    """Add the cluster and job commands to the `pathways-lite` subparsers."""

    def add(name: str, help_text: str, func, json_flag: bool = True):
        p = sub.add_parser(name, help=help_text)
        p.add_argument(
            "--state-dir",
            default=None,
            help="the cluster's state dir (default $PATHWAYS_LITE_STATE or ~/.pathways_lite)",
        )
        if json_flag:
            p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(func=func)
        return p

    up = add("up", "start a local cluster in the background", _cmd_up)
    up.add_argument(
        "--islands", type=_positive_int, default=None, help="number of islands (local Ray)"
    )
    up.add_argument(
        "--devices-per-island", type=_positive_int, default=None, help="devices per island"
    )
    up.add_argument(
        "--hosts-per-island", type=_positive_int, default=None, help="hosts per island (1)"
    )
    up.add_argument(
        "--ray-address",
        default=None,
        help="join this Ray cluster (head host:port) instead of starting one; islands come "
        "from its nodes' island_<name> resources",
    )
    up.add_argument("--ray-token-file", default=None, help="the Ray cluster's auth token file")
    up.add_argument(
        "--node-ip", default=None, help="with --ray-address: the controller's Ray node address"
    )
    up.add_argument("--island-memory", default=None, help="memory of one island (e.g. 4GiB)")
    up.add_argument(
        "--simulate-islands",
        type=_positive_int,
        default=None,
        help="N simulated islands (no JAX, no Ray): the scale harness",
    )
    up.add_argument(
        "--tls",
        choices=("on", "off", "auto"),
        default="auto",
        help="TLS between the controller, island hosts and peers (auto: off loopback)",
    )
    up.add_argument(
        "--standby-controller",
        action="store_true",
        help="keep a standby controller (imports done, Ray connected) that takes over the "
        "moment the controller dies, then keeps the next standby itself (not with "
        "--simulate-islands)",
    )
    down = add(
        "down",
        "checkpoint running and suspended jobs, then stop the local cluster of a state dir",
        _cmd_down,
    )
    down.add_argument(
        "--now", action="store_true", help="stop at once, without checkpointing running jobs"
    )
    rotate = add(
        "rotate-secret",
        "replace the access token and the island hosts' secret; jobs keep running",
        _cmd_rotate_secret,
    )
    rotate.add_argument(
        "--grace",
        type=float,
        default=300.0,
        help="seconds the old token and secret stay accepted (default 300)",
    )
    submit = add("submit", "submit job specs (YAML); several files make a chain", _cmd_submit)
    submit.add_argument(
        "spec",
        nargs="+",
        help="the job spec files; a later file's after / init_from.job may name an earlier one",
    )
    submit.add_argument("--wait", action="store_true", help="wait until the job ends")
    submit.add_argument(
        "--request-id",
        default="",
        help="an idempotency key: submitting the same spec again with it answers the job the "
        "first submission created (a submit whose answer was lost says its key); several "
        "files get KEY-0, KEY-1, ...",
    )
    submit.add_argument(
        "--follow",
        action="store_true",
        help="follow the job with a live progress bar until it ends (Ctrl-C stops following)",
    )
    add_job_listing_options(add("jobs", "list jobs, newest first", cmd_jobs))
    status = add("status", "show one job", cmd_status)
    status.add_argument("job", help="the job: its id, its name or a unique id prefix")
    cancel = add("cancel", "cancel a job", _cmd_cancel)
    cancel.add_argument("job", help="the job: its id, its name or a unique id prefix")
    cancel.add_argument("--reason", default="", help="why (recorded with the job)")
    prio = add("priority", "re-prioritise a queued, running or suspended job", _cmd_priority)
    prio.add_argument("job", help="the job: its id, its name or a unique id prefix")
    prio.add_argument("priority", type=int, help="the new priority in [-1000, 1000]")
    add("islands", "list the islands and their hosts", _cmd_islands)
    logs = add("logs", "print a job's log records (controller and island hosts)", cmd_logs)
    logs.add_argument("job", help="the job: its id, its name or a unique id prefix")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new records")
    logs.add_argument("--tail", type=int, default=0, help="only the newest N records (0 = all)")
    why = add("why", "why a job is pending (queue position, jobs ahead, what it lacks)", _cmd_why)
    why.add_argument("job", help="the job: its id, its name or a unique id prefix")
    sample = add(
        "sample",
        "generate text from a job's current parameters (an ended job: its last checkpoint)",
        _cmd_sample,
    )
    sample.add_argument("job", help="the job: its id, its name or a unique id prefix")
    sample.add_argument("--prompt", required=True, help="the text to continue")
    sample.add_argument(
        "--max-new-tokens", "--max-tokens", type=int, default=64, help="tokens (default 64)"
    )
    sample.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    sample.add_argument("--top-k", type=int, default=0, help="sample among the top k (0 = all)")
    sample.add_argument("--seed", type=_seed, default=0, help="sampling seed, in [0, 2**64)")
    gen = add(
        "generate",
        "generate text from a serving job (kind: serve); `sample` is for jobs not serving",
        _cmd_generate,
    )
    gen.add_argument("job", help="the serve job: its id, its name or a unique id prefix")
    gen.add_argument("prompt", help="the text to continue")
    gen.add_argument(
        "--max-tokens", "--max-new-tokens", type=int, default=64, help="tokens (default 64)"
    )
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the top k (0 = all)")
    gen.add_argument("--top-p", type=float, default=0.0, help="nucleus mass (0 = off)")
    gen.add_argument("--seed", type=_seed, default=0, help="sampling seed, in [0, 2**64)")
    gen.add_argument("--stop", action="append", help="end before this string (repeatable)")
    gen.add_argument("--stream", action="store_true", help="print tokens as they come")
    add_eval_command(add)
    add_trace_command(add)
    dash = add("dashboard", "print the dashboard's URL (with the access token)", _cmd_dashboard)
    dash.add_argument(
        "--open",
        action="store_true",
        help="also open it in a browser (through a private page in the state dir, so the "
        "token is on no command line)",
    )
    health = add(
        "health",
        "check a server through grpc.health.v1 (exit 0 when SERVING)",
        _cmd_health,
    )
    health.add_argument(
        "--address", default=None, help="host:port (default: the state dir's controller)"
    )
    health.add_argument("--service", default="", help="service name ('' = the whole server)")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
