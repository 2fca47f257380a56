"""Use a running docker-compose deployment from the host as a user would (`make deploy-test`).

Run by deploy/deploy-test.sh once every service is healthy, with the client state dir that
holds the controller's `controller.json` and access token copied out of the `state` volume:

1. A corpus made of the repo's own text is copied into the `datasets` volume (where users put
   theirs), and a reference run: the same 2-island palm-tiny spec on a LocalCluster on this
   machine, reading the same corpus from the host. (The `stdlib` source would differ: it
   is the standard library of whichever Python runs the controller.)
2. `pathways-lite health` answers SERVING on the published controller port; a
   ControllerService call without the token, or with a wrong one, is refused
   (UNAUTHENTICATED); `pathways-lite islands` lists the island nodes' two islands.
3. The dashboard on its published port answers 401 without the token and 200 with it.
4. `pathways-lite submit --wait` runs the spec through the deployment: it succeeds with the
   reference's per-step losses (relative difference at most 1e-5, DESIGN.md's invariant).
5. The same spec again, and while it runs, one island's container is killed (`docker kill`)
   and started again: the job rolls back to its last checkpoint, succeeds, and its losses
   are bitwise those of the uninterrupted run.

Every step prints one line; the first failure raises with what was seen.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc

from pathways_lite.sdk import Client, LocalCluster
from pathways_lite.v1 import controller_pb2, controller_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
STEPS = 40
CHECKPOINT_EVERY = 5
SPEC = """\
name: {name}
model: {{preset: palm-tiny}}
islands: 2
devices_per_island: 2
mesh: {{data: 1, model: 2}}
train: {{steps: {steps}, global_batch: 4, seq_len: 64, seed: 0, checkpoint_every: {every}}}
data: {{source: files, paths: [{corpus}], vocab_size: 1024, max_bytes: 1000000}}
"""
# The island nodes' loopback addresses (deploy/docker-compose.loopback.yml).
ISLAND_NODE_IPS = {"a": "127.0.0.3", "b": "127.0.0.4"}
# Where the corpus lies in the controller's container: the `datasets` volume.
VOLUME_CORPUS = "/datasets/deploy-test-corpus.txt"
RELATIVE_TOLERANCE = 1e-5
T0 = time.monotonic()


class CheckFailed(AssertionError):
    """What the deployment did differs from what a user is promised."""


def say(message: str) -> None:
    print(f"check [{time.monotonic() - T0:6.1f}s] {message}", flush=True)


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def write_spec(directory: Path, name: str, corpus: str = VOLUME_CORPUS) -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(SPEC.format(name=name, steps=STEPS, every=CHECKPOINT_EVERY, corpus=corpus))
    return path


def write_corpus(path: Path) -> Path:
    """About 0.5 MB of English and Python: the repo's documentation and code, in name order."""
    folders = ("model", "workers", "controller", "pathways_lite", "tests", "bench")
    files = sorted(REPO.glob("*.md")) + sorted(f for d in folders for f in (REPO / d).glob("*.py"))
    path.write_text("\n".join(f.read_text() for f in files))
    return path


def copy_into_volume(corpus: Path, controller: str) -> None:
    """`docker cp` the corpus to the controller's /datasets, readable by its user."""
    corpus.chmod(0o644)
    target = f"{controller}:{VOLUME_CORPUS}"
    subprocess.run(["docker", "cp", str(corpus), target], check=True, timeout=60)


def cli(state_dir: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`pathways-lite ARGS --state-dir STATE_DIR` (the installed CLI beside this Python)."""
    exe = str(Path(sys.executable).parent / "pathways-lite")
    command = [exe, *args, f"--state-dir={state_dir}"]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def cli_json(state_dir: Path, *args: str, timeout: float = 120):
    result = cli(state_dir, *args, "--json", timeout=timeout)
    check(
        result.returncode == 0,
        f"pathways-lite {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}",
    )
    return json.loads(result.stdout)


def reference_losses(work: Path, corpus: Path) -> list[float]:
    """The spec's per-step losses on a LocalCluster of this machine (2 islands x 2 devices)."""
    with LocalCluster(islands=2, devices_per_island=2, state_dir=work / "local") as cluster:
        with cluster.client() as client:
            job = client.submit(write_spec(work, "reference", str(corpus)))
            status = job.wait(timeout_s=600)
    check(status.state == "succeeded", f"the LocalCluster reference job ended {status}")
    return list(status.losses)


def check_health_and_auth(state_dir: Path, address: str) -> None:
    result = cli(state_dir, "health", f"--address={address}")
    check(
        result.returncode == 0 and "SERVING" in result.stdout,
        f"`pathways-lite health --address {address}`: {result.stdout}{result.stderr}",
    )
    with grpc.insecure_channel(address) as channel:
        stub = controller_pb2_grpc.ControllerServiceStub(channel)
        for metadata in ((), (("authorization", "Bearer not-the-token"),)):
            try:
                stub.ListJobs(controller_pb2.ListJobsRequest(), metadata=metadata, timeout=10)
            except grpc.RpcError as e:
                check(
                    e.code() == grpc.StatusCode.UNAUTHENTICATED,
                    f"a call with metadata {metadata} got {e.code()}, not UNAUTHENTICATED",
                )
            else:
                raise CheckFailed(f"a call with metadata {metadata} was answered")
    say(f"controller {address}: SERVING; calls without the token are UNAUTHENTICATED")


def check_islands(state_dir: Path) -> None:
    islands = cli_json(state_dir, "islands")
    names = sorted(island["id"] for island in islands)
    check(names == ["a", "b"], f"islands {names}, not the island nodes' ['a', 'b']: {islands}")
    for island in islands:
        check(not island["down"], f"island {island['id']} is down: {island}")
        check(island["devices"] == 2, f"island {island['id']} has {island['devices']} devices")
    hosts = {island["id"]: [h.get("address", "") for h in island["hosts"]] for island in islands}
    for name, ip in ISLAND_NODE_IPS.items():
        check(
            len(hosts[name]) == 1 and hosts[name][0].startswith(f"{ip}:"),
            f"island {name}'s host should serve on its node's address {ip}: {hosts[name]}",
        )
    say(f"islands a and b, 2 devices each, hosts {hosts}")


def check_dashboard(url: str, token: str) -> None:
    api = url.rstrip("/") + "/api/overview"
    try:
        urllib.request.urlopen(api, timeout=10)
    except urllib.error.HTTPError as e:
        check(e.code == 401, f"GET {api} without the token answered {e.code}, not 401")
    else:
        raise CheckFailed(f"GET {api} without the token was answered")
    request = urllib.request.Request(api, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        check(response.status == 200, f"GET {api} with the token answered {response.status}")
        json.loads(response.read())
    say(f"dashboard {url}: 401 without the token, 200 with it")


def compare(losses: list[float], reference: list[float], what: str) -> float:
    check(
        len(losses) == len(reference) == STEPS,
        f"{what}: {len(losses)} losses vs {len(reference)} of the reference ({STEPS} steps)",
    )
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses, reference, strict=True))
    check(
        worst <= RELATIVE_TOLERANCE,
        f"{what}: losses differ from the reference by {worst:.3e} (relative) > "
        f"{RELATIVE_TOLERANCE}: {losses} vs {reference}",
    )
    return worst


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise CheckFailed(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def check_recovery(state_dir: Path, work: Path, container: str, losses: list[float]) -> None:
    """Kill an island's container under a running job, start it again, see the job finish."""
    submitted = cli_json(state_dir, "submit", str(write_spec(work, "recovery")))
    job_id = submitted["id"]

    # Steps take a fraction of a second: watch through the SDK (no process start per look),
    # so the kill lands soon after the first checkpoint, well before the last step.
    with Client(state_dir) as client:

        def past_a_checkpoint():
            job = client.job(job_id).status()
            check(job["state"] in ("queued", "running"), f"job {job_id} ended early: {job}")
            return job if job["steps_completed"] > CHECKPOINT_EVERY else None

        job = wait_for(past_a_checkpoint, 300, f"job {job_id} to pass a checkpoint", 0.05)
    subprocess.run(["docker", "kill", container], check=True, capture_output=True, timeout=60)
    say(f"job {job_id} at step {job['steps_completed']}/{STEPS}: killed container {container}")

    def island_down():
        islands = {i["id"]: i for i in cli_json(state_dir, "islands")}
        job = cli_json(state_dir, "status", job_id)
        check(job["state"] != "succeeded", f"job {job_id} finished before the kill took hold")
        return islands["a"]["down"] or job["generation"] > 0

    wait_for(island_down, 120, "the controller to see island a fail", 1.0)
    subprocess.run(["docker", "start", container], check=True, capture_output=True, timeout=60)
    say(f"the controller saw island a fail; started {container} again")

    def ended():
        job = cli_json(state_dir, "status", job_id)
        return job if job["state"] in ("succeeded", "failed", "cancelled") else None

    final = wait_for(ended, 600, f"job {job_id} to end after the restart", 2.0)
    check(final["state"] == "succeeded", f"job {job_id} did not recover: {final}")
    check(final["generation"] > 0, f"job {job_id} never rolled back: {final}")
    check(
        final["losses"] == losses,
        f"job {job_id}'s losses after the restart are not bitwise those of the uninterrupted "
        f"run: {final['losses']} vs {losses}",
    )
    islands = {i["id"]: i for i in cli_json(state_dir, "islands")}
    check(not islands["a"]["down"], f"island a is still down: {islands['a']}")
    say(
        f"job {job_id} rolled back (generation {final['generation']}) and succeeded with the "
        "same losses, bitwise"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", type=Path, required=True, help="the client state dir")
    parser.add_argument("--address", required=True, help="the published controller address")
    parser.add_argument("--dashboard", required=True, help="the published dashboard URL")
    parser.add_argument("--island-container", required=True, help="island a's container")
    parser.add_argument("--controller-container", required=True, help="the controller's")
    args = parser.parse_args(argv)
    token = (args.state_dir / "token").read_text().strip()
    recorded = json.loads((args.state_dir / "controller.json").read_text())["address"]
    check(recorded == args.address, f"controller.json says {recorded}, not {args.address}")

    with tempfile.TemporaryDirectory(prefix="pl-check-", dir="/tmp") as tmp:
        work = Path(tmp)
        corpus = write_corpus(work / "corpus.txt")
        copy_into_volume(corpus, args.controller_container)
        say(f"corpus of {corpus.stat().st_size} bytes copied to {VOLUME_CORPUS}")
        reference = reference_losses(work, corpus)
        say(f"LocalCluster reference: {STEPS} steps, last loss {reference[-1]:.6f}")
        check_health_and_auth(args.state_dir, args.address)
        check_islands(args.state_dir)
        check_dashboard(args.dashboard, token)
        job = cli_json(
            args.state_dir, "submit", str(write_spec(work, "deployed")), "--wait", timeout=900
        )
        check(job["state"] == "succeeded", f"the deployed job ended {job}")
        worst = compare(job["losses"], reference, f"job {job['id']}")
        say(f"job {job['id']} succeeded: losses = the reference's (max relative {worst:.1e})")
        check_recovery(args.state_dir, work, args.island_container, job["losses"])
    say("all checks passed")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CheckFailed as e:
        print(f"check FAILED: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
