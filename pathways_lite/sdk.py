"""The Python SDK: `Client`, `Job` handles, `JobSpec` and a `LocalCluster` for notebooks.

`Client` answers with job handles and plain dicts over the wire client (client.py);
`JobSpec` is the wire message (controller.proto) and `LocalCluster` the local cluster of
local.py, exported here under their one public name.

Example (a local cluster of one island with two CPU devices, one tiny job)::

    from pathways_lite import Client, LocalCluster

    with LocalCluster(islands=1, devices_per_island=2, state_dir="/tmp/pl-demo") as cluster:
        client = cluster.client()
        job = client.submit({
            "name": "tiny",
            "model": {"preset": "palm-tiny"},
            "islands": 1,
            "devices_per_island": 2,
            "mesh": {"data": 1, "model": 2},
            "train": {"steps": 20, "global_batch": 4, "seq_len": 64},
            "data": {"source": "stdlib", "vocab_size": 1024, "max_bytes": 1000000},
        })
        print(job.wait().state)                  # "succeeded"
        print(job.metrics().to_pandas().tail())  # step, loss, tokens_per_s, ...
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pathways_lite import client as client_lib
from pathways_lite.local import LocalCluster
from pathways_lite.v1.controller_pb2 import JobSpec

logger = logging.getLogger(__name__)

__all__ = ["Client", "Job", "JobSpec", "JobStatus", "LocalCluster", "ClientError"]

ClientError = client_lib.ClientError


class JobStatus(dict):
    """A job's record as a dict (`id`, `name`, `state`, `steps_completed`, `steps`, `losses`,
    `queue_position`, `pending_reason`, ...), with attribute access: `status.state`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Job:
    """A handle on one submitted job.

    Example::

        job = client.submit("examples/tiny.yaml")
        job.status().state        # "queued", "running", ...
        job.wait(timeout_s=600)   # the final JobStatus
        job.sample("def ")        # while it runs: text from its current parameters
    """

    def __init__(self, client: Client, job_id: str) -> None:
        self.client = client
        self.id = job_id

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def status(self) -> JobStatus:
        """The job's current record."""
        return JobStatus(client_lib.job_to_dict(self.client.raw.get(self.id)))

    def evals(self) -> list[dict[str, Any]]:
        """The job's evaluations, oldest first: {"step", "shots", "sources": {name: {"loss",
        "perplexity", "examples"[, "exact_match", "token_f1"]}}}."""
        return [client_lib.eval_to_dict(e) for e in self.client.raw.get(self.id).evals]

    def wait(self, timeout_s: float | None = None) -> JobStatus:
        """Block until the job ends; returns its final record.

        Raises:
            ClientError: the wait timed out (DEADLINE_EXCEEDED) or the stream broke.
        """
        return JobStatus(client_lib.job_to_dict(self.client.raw.wait(self.id, timeout_s)))

    def metrics(self):
        """Every completed step as a pyarrow Table: step, loss, tokens_per_s, step_time_s,
        mfu, time (UTC)."""
        import pyarrow as pa

        rows = self.client.raw.metrics(self.id)
        return pa.table(
            {
                "step": pa.array([m.step for m in rows], pa.int32()),
                "loss": pa.array([m.loss for m in rows], pa.float64()),
                "tokens_per_s": pa.array([m.tokens_per_s for m in rows], pa.float64()),
                "step_time_s": pa.array([m.step_time_s for m in rows], pa.float64()),
                "mfu": pa.array([m.mfu for m in rows], pa.float64()),
                "time": pa.array(
                    [m.time.ToMicroseconds() for m in rows], pa.timestamp("us", tz="UTC")
                ),
            }
        )

    def sample(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        seed: int = 0,
    ) -> str:
        """Continue `prompt` with the running job's current parameters (an ended job: its
        last checkpoint's); returns the new text.

        Raises:
            ClientError: FAILED_PRECONDITION when the job holds no parameters (queued, or
                ended without a checkpoint), RESOURCE_EXHAUSTED when an ended job's checkpoint
                fits on no island now, INVALID_ARGUMENT for a bad prompt or setting.
        """
        reply = self.client.raw.sample(
            self.id,
            prompt,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            seed=seed,
        )
        return reply.text

    def generate(
        self,
        prompt: str,
        *,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 0.0,
        seed: int = 0,
        stop: Sequence[str] = (),
        stream: bool = False,
    ) -> Any:
        """Generate from this serving job (`kind: serve`, issue 18).

        Returns:
            The generated text; with `stream=True`, an iterator of text pieces.

        Raises:
            ClientError: FAILED_PRECONDITION when the job is not serving (or still "loading"),
                RESOURCE_EXHAUSTED when its queue is full, INVALID_ARGUMENT for a bad prompt.
        """
        replies = self.client.raw.generate(
            self.id,
            prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=stop,
        )
        if stream:
            return (r.text for r in replies if r.text)
        return "".join(r.text for r in replies)

    def cancel(self, reason: str = "") -> JobStatus:
        """Cancel the job (queued or running); returns its record."""
        return JobStatus(client_lib.job_to_dict(self.client.raw.cancel(self.id, reason)))

    def logs(self, tail: int = 0) -> list[dict[str, Any]]:
        """The job's buffered log records (the newest `tail`; 0 = all)."""
        return [client_lib.log_to_dict(r) for r in self.client.raw.logs(self.id, tail=tail)]


class Client:
    """A connection to a controller, for people and notebooks.

    Args:
        state_dir: the cluster's state directory (default: $PATHWAYS_LITE_STATE or
            ~/.pathways_lite): its controller address and access token are read from there.
        address: the controller's host:port, instead of the state dir's.
        token: the access token, instead of the state dir's.

    Example::

        from pathways_lite import Client
        client = Client("/tmp/pl-demo")
        [island["id"] for island in client.islands()]   # ["island-0"]
        job = client.submit("spec.yaml")
    """

    def __init__(
        self,
        state_dir: str | Path | None = None,
        *,
        address: str | None = None,
        token: str | None = None,
    ) -> None:
        self.raw = client_lib.ControllerClient(state_dir, address=address, token=token)

    def close(self) -> None:
        self.raw.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, spec: JobSpec | dict[str, Any] | str | Path) -> Job:
        """Submit a job: a JobSpec proto, a dict shaped like the YAML, or a YAML file path.

        Raises:
            SpecError: the spec is malformed (named field); ClientError: the controller
                refused it (INVALID_ARGUMENT / RESOURCE_EXHAUSTED with the field named).
        """
        return Job(self, self.raw.submit(_proto(spec)).id)

    def submit_chain(self, specs: list[JobSpec | dict[str, Any] | str | Path]) -> list[Job]:
        """Submit a chain in one call (`pathways-lite submit a.yaml b.yaml`): a spec's `after`
        or `init_from.job` may name another spec of the list, which is submitted first.

        Raises:
            SpecError: two specs share a name or their references close a cycle (nothing is
                submitted); ClientError: the controller refused one.
        """
        return [Job(self, j.id) for j in self.raw.submit_chain([_proto(s) for s in specs])]

    def job(self, ref: str) -> Job:
        """A handle on an existing job named by its id, its unique name or a unique prefix of
        its id (the controller's resolver; the handle keeps the id).

        Raises:
            ClientError: NOT_FOUND when nothing matches, INVALID_ARGUMENT when several jobs
                do (the message lists them).
        """
        return Job(self, self.raw.get(ref).id)

    def jobs(self, states: tuple[str, ...] = (), limit: int = 0) -> list[JobStatus]:
        """Job records, newest first (the newest `limit` when > 0); `states` filters
        (`"running"`, ...)."""
        jobs = self.raw.list(states=states, limit=limit)
        return [JobStatus(client_lib.job_to_dict(j)) for j in jobs]

    def islands(self) -> list[dict[str, Any]]:
        """Every island: id, devices, job_ids, hosts."""
        return [client_lib.island_to_dict(i) for i in self.raw.islands()]

    def dashboard_url(self, with_token: bool = True) -> str:
        """The dashboard's URL (with the token, which the page trades for a cookie)."""
        return self.raw.dashboard_url(with_token=with_token)


def _proto(spec: JobSpec | dict[str, Any] | str | Path) -> JobSpec:
    """A JobSpec from a proto, a dict shaped like the YAML, or a YAML file path."""
    from pathways_lite.spec import load_spec_file, spec_from_dict

    if isinstance(spec, dict):
        return spec_from_dict(spec)
    if isinstance(spec, str | Path):
        return load_spec_file(spec)
    if isinstance(spec, JobSpec):
        return spec
    raise TypeError(f"spec must be a JobSpec, a dict or a YAML path, got {type(spec).__name__}.")
